"""One request to an endpoint of the core's micro services (admin, jobs): its error ladder.

Both services take a JSON object, run a handler on it and answer ``{"ok": ...}``; what
can go wrong on the way is the same for every endpoint, so it is decided here once: a
reply subject outside the reply namespace (for a user's request: not one nats-server made
on the import, ``_R_.``) drops the request unanswered (fleetbus would otherwise publish
where the requester chose, docs/bus-api.md "Reply subjects"); a
:class:`FleetbusError` is its own code; a validation error is ``invalid_request``;
anything else is a bug, logged here and answered ``internal`` without its text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.micro.request import Request as MicroRequest
from pydantic import ValidationError

from .errors import FleetbusError, InternalError, InvalidRequest
from .messages import describe_validation_error, parse_json_object
from .subjects import ReplySubjects, identity_in, reply_allowed

log = logging.getLogger("fleetbus.endpoint")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def answer(req: MicroRequest, replies: ReplySubjects,
                 handler: Handler) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Parse ``req``'s body, run ``handler`` on it and respond.

    Returns the parsed body (``{}`` when it did not parse) and the reply sent, for the
    caller's audit record; None when the request was dropped for its reply subject.
    """
    reply_to = req._msg.reply  # nats-py's micro Request keeps the message private
    if reply_to and not reply_allowed(replies, reply_to, identity_in(req.headers)):
        return None
    body: dict[str, Any] = {}
    try:
        body = parse_json_object(req.data)
        reply = await handler(body)
    except FleetbusError as exc:
        reply = {"ok": False, "error": exc.to_wire()}
    except ValidationError as exc:
        reply = {"ok": False, "error": InvalidRequest(describe_validation_error(exc)).to_wire()}
    except Exception:
        log.exception("request on %s failed", req.subject)
        reply = {"ok": False, "error": InternalError("internal error; see the core's log").to_wire()}
    await req.respond(json.dumps(reply, default=str).encode())
    return body, reply

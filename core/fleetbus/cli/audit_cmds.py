"""``fleetbus audit``: read the audit trail through the ``audit.query`` admin endpoint.

The owner and any user granted ``--admin audit.query`` read it the same way; nobody
needs JetStream access (users have none). Each row names the identity NATS verified;
the requester the request declared is shown beside it only where the two differ.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click

from ..client import Client
from .context import Globals, client_call, pass_globals
from .render import emit_json, shown, table, who

#: The core reads for up to 5 s (auditquery.QUERY_TIME_S); the answer needs a little more.
AUDIT_TIMEOUT_S = 15.0
#: How often --follow asks for new records.
FOLLOW_EVERY_S = 1.0


def identity_text(record: dict[str, Any]) -> str:
    """Who an audit record names (render.who); ``?`` for a record written before
    verified identities were recorded."""
    return who(record.get("identity"), record.get("requester"), unknown="?")


def _outcome(record: dict[str, Any]) -> str:
    outcome = str(record.get("outcome", ""))
    exit_code = record.get("exit_code")
    return f"{outcome} (exit {exit_code})" if outcome == "ok" and exit_code not in (None, 0) else outcome


@click.command("audit")
@click.option("--server", metavar="NAME", help="Only this server's records (_admin: admin changes).")
@click.option("--op", metavar="OP", help="Only this operation: exec, put, get, ...; users.add, ... with --server _admin.")
@click.option("--user", metavar="USER", help="Only this user: its name or key, or the requester it declared.")
@click.option("--outcome", metavar="CODE", help="Only this outcome: ok, forbidden, timeout, ...")
@click.option("--since", metavar="WHEN", help="From this time: RFC 3339 or a duration ago (1h, 2d).")
@click.option("--until", metavar="WHEN", help="Up to this time: RFC 3339 or a duration ago.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True,
              help="The most records to show.")
@click.option("--after-seq", type=click.IntRange(0), help="Records after this stream sequence (the next page).")
@click.option("--before-seq", type=click.IntRange(1), help="Records before this stream sequence (the page before).")
@click.option("--follow", "-f", is_flag=True,
              help="Then keep printing new records as they are written (one line each; JSON lines with --json).")
@click.option("--json", "as_json", is_flag=True, help="Print the reply as JSON: records, next, truncated.")
@pass_globals
def audit(g: Globals, server: str | None, op: str | None, user: str | None, outcome: str | None,
          since: str | None, until: str | None, limit: int, after_seq: int | None,
          before_seq: int | None, follow: bool, as_json: bool) -> None:
    """Show the audit trail: who ran what, where, and how it ended (newest last).

    Without --since or --after-seq it shows the latest records; with them, the first
    ones from there on. --follow then asks for newer ones every second, so it works
    for a user too (nothing is sent to it unasked).
    """
    body: dict[str, Any] = {"limit": limit}
    for key, value in (("server", server), ("op", op), ("user", user), ("outcome", outcome),
                       ("since", since), ("until", until), ("after_seq", after_seq),
                       ("before_seq", before_seq)):
        if value is not None:
            body[key] = value
    if follow:
        if until is not None or before_seq is not None:
            raise click.UsageError("--follow reads on to the newest records: not with --until or --before-seq")
        client_call(g, lambda c: _follow(c, body, as_json))
        return
    reply = client_call(g, lambda c: c.admin("audit.query", body, AUDIT_TIMEOUT_S))
    if as_json:
        emit_json({k: v for k, v in reply.items() if k != "ok"})
        return
    records = reply["records"]
    if records:
        table(["seq", "time", "server", "op", "outcome", "identity", "summary"],
              [[r["seq"], r.get("ts"), r.get("server"), r.get("op"), _outcome(r), identity_text(r),
                r.get("summary") or ""] for r in records])
    else:
        click.echo("no records")
    nxt = reply.get("next") or {}
    if reply.get("truncated"):
        click.echo(f"fleetbus: the scan stopped after {reply.get('scanned')} records; more may match",
                   err=True)
    if "after_seq" in nxt:
        click.echo(f"more: add --after-seq {nxt['after_seq']}", err=True)
    elif "before_seq" in nxt:
        click.echo(f"earlier: add --before-seq {nxt['before_seq']}", err=True)


def _line(record: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(record, sort_keys=True, default=str)
    return "  ".join(shown(v) for v in (record["seq"], record.get("ts"), record.get("server"), record.get("op"),
                                         _outcome(record), identity_text(record), record.get("summary") or ""))


async def _follow(client: Client, body: dict[str, Any], as_json: bool) -> None:
    """Print the query's records, then newer ones as they come, until interrupted.

    Each poll asks for what follows the last stream sequence the core read (its
    ``read_to``), so records that do not match are not read twice."""
    reply = await client.admin("audit.query", body, AUDIT_TIMEOUT_S)
    filters = {k: v for k, v in body.items() if k not in ("after_seq", "limit", "since")}
    while True:
        for record in reply["records"]:
            click.echo(_line(record, as_json))
        if reply.get("next") and "after_seq" in reply["next"]:
            # Paging forward with more to read: read on at once.
            reply = await client.admin("audit.query", {**filters, "limit": 1000, **reply["next"]}, AUDIT_TIMEOUT_S)
            continue
        await asyncio.sleep(FOLLOW_EVERY_S)
        reply = await client.admin("audit.query", {**filters, "limit": 1000, "after_seq": reply["read_to"]},
                                   AUDIT_TIMEOUT_S)

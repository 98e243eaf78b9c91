"""The one way into fleetbus's errors (errors.py), the one string-shortening helper
(fleetbus_base.text), the request headers and subjects read in one place
(subjects.py), and the host's one error ladder (commandrun.py) seen from the bus."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fleetbus.errors import (
    REACHING,
    RUNNING,
    AuthFailed,
    FleetbusError,
    InternalError,
    NotFound,
    ServerOffline,
    TransportError,
    error_for_code,
    mapped_errors,
)
from fleetbus.home import Home
from fleetbus.host import HostSettings, PluginHost
from fleetbus.jetstream import open_state
from fleetbus.records import Server
from fleetbus.registry import Registry
from fleetbus.subjects import (
    HDR_DEADLINE,
    HDR_REQUESTER,
    MAX_REQUESTER_CHARS,
    Names,
    deadline_in,
    request_headers,
    requester_in,
)
from fleetbus.transport import (
    Credential,
    ExecResult,
    ExecSpec,
    FileStat,
    OutputSink,
    PutSpec,
    RemoteFile,
    ServerFacts,
    Session,
    Transport,
)
from fleetbus_base.text import first_line, one_line, readable, shorten
from nats.aio.client import Client as NATS

# --- error_for_code: one fallback rule ----------------------------------------------


def test_a_known_code_is_its_class_whoever_reports_it() -> None:
    assert isinstance(error_for_code("not_found", "gone"), NotFound)
    error = error_for_code("auth_failed", "refused", reporter="the agent")
    assert isinstance(error, AuthFailed) and error.message == "refused"


def test_fleetbus_s_own_unknown_code_is_internal() -> None:
    error = error_for_code("made-up", "what")
    assert type(error) is InternalError and error.message == "what"


@pytest.mark.parametrize("code", ["internal", "made-up", None])
def test_a_peer_s_internal_or_unknown_code_is_the_transport_failing(code: str | None) -> None:
    error = error_for_code(code, "blew up", reporter="the agent")
    assert type(error) is TransportError
    assert error.message == "the agent failed: blew up"


def test_reported_details_never_set_before_start() -> None:
    error = FleetbusError.from_wire({"code": "timeout", "message": "m",
                                     "details": {"before_start": True, "stdout": "x"}})
    assert error.before_start is False
    assert error.details == {"before_start": True, "stdout": "x"}


def test_before_start_is_a_constructor_field() -> None:
    assert ServerOffline("down").before_start is False
    assert ServerOffline("down", before_start=True).before_start is True
    assert ServerOffline("down", before_start=True).to_wire() == {"code": "server_offline", "message": "down"}
    assert ServerOffline("down").not_started().before_start is True


# --- mapped_errors: the OS's errors through one table ---------------------------------


def test_reaching_maps_os_errors_to_server_offline_not_started() -> None:
    cause = ConnectionRefusedError(111, "Connection refused")
    with pytest.raises(ServerOffline) as raised, mapped_errors(REACHING, "cannot reach web1 over ssh",
                                                               before_start=True):
        raise cause
    assert raised.value.message == "cannot reach web1 over ssh: [Errno 111] Connection refused"
    assert raised.value.before_start is True
    assert raised.value.__cause__ is cause


def test_running_maps_os_errors_to_transport_error_on_one_bounded_line() -> None:
    with pytest.raises(TransportError) as raised, mapped_errors(RUNNING, "ssh transport failed"):
        raise OSError("broken pipe " + "x" * 500 + "\nsecond line")
    message = raised.value.message
    assert message.startswith("ssh transport failed: broken pipe x")
    assert "second" not in message and message.endswith("...")
    assert len(message) == len("ssh transport failed: ") + 200
    assert raised.value.before_start is False


def test_fleetbus_errors_pass_and_are_marked_when_nothing_started() -> None:
    with pytest.raises(AuthFailed) as raised, mapped_errors(REACHING, "x", before_start=True):
        raise AuthFailed("no")
    assert raised.value.before_start is True


def test_other_exceptions_pass_unchanged_for_the_host_to_call_internal() -> None:
    with pytest.raises(KeyError), mapped_errors(RUNNING, "x"):
        raise KeyError("bug")


# --- fleetbus_base.text: one helper that shortens ------------------------------------


def test_shorten_keeps_what_fits_and_cuts_the_rest_to_the_limit() -> None:
    assert shorten("abc", 3) == "abc"
    assert shorten("abcd", 3) == "..."
    assert shorten("x" * 500, 80) == "x" * 77 + "..."
    assert len(shorten("y" * 1000, 300)) == 300


def test_the_small_helpers_say_what_is_quoted() -> None:
    assert readable("C:\\dir") == "C:\\dir"
    assert readable("a\nb") == "'a\\nb'"
    assert one_line(" a \r\n\t b ") == "a b"
    assert first_line(OSError("first\nsecond")) == "first"
    assert first_line(TimeoutError()) == "TimeoutError"


# --- subjects: headers and subjects read in one place -----------------------------------


def test_request_headers_round_trip() -> None:
    headers = request_headers("billing", 1234.5)
    assert headers == {HDR_REQUESTER: "billing", HDR_DEADLINE: "1234.500"}
    assert requester_in(headers) == "billing" and deadline_in(headers) == 1234.5
    assert request_headers("cli") == {HDR_REQUESTER: "cli"}


def test_what_a_request_does_not_say_or_says_badly() -> None:
    assert requester_in(None) == "bus" and deadline_in(None) is None
    assert requester_in({HDR_REQUESTER: "r" * 1000}) == "r" * MAX_REQUESTER_CHARS
    for bad in ("soon", "inf", "nan"):
        assert deadline_in({HDR_DEADLINE: bad}) is None


def test_server_subjects_read_back() -> None:
    names = Names("acme")
    assert Names.server_op(names.server("web-1", "exec")) == ("web-1", "exec")
    assert Names.server_op(names.server("*", "cancel")) == ("*", "cancel")


# --- the host's one error ladder, seen from the bus ---------------------------------------


class _BrokenSession(Session):
    """Fails every exec the way a socket under a transport does."""

    async def exec(self, spec: ExecSpec, output: OutputSink) -> ExecResult:
        raise OSError(5, "Input/output error")

    async def put(self, spec: PutSpec, source: AsyncIterator[bytes]) -> FileStat:
        raise NotImplementedError

    async def get(self, path: str) -> RemoteFile:
        raise NotImplementedError

    async def info(self) -> ServerFacts:
        raise KeyError("a bug in the transport")

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class _BrokenTransport(Transport):
    name = "broken"
    version = "1"

    async def open(self, server: Server, credential: Credential | None) -> Session:
        if server.options.get("unreachable"):
            raise ConnectionRefusedError(111, "Connection refused")
        return _BrokenSession()


async def _request(nc: NATS, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=20)
    return json.loads(msg.data)


async def test_the_host_maps_each_failure_once(nc: NATS, prefix: str, tmp_path: Path) -> None:
    names = Names(prefix)
    state = await open_state(nc, names)
    host = PluginHost(nc, state, {"broken": _BrokenTransport}, vault=None,
                      settings=HostSettings(home=Home(tmp_path)))
    await host.start()
    try:
        registry = Registry(state.servers, state.status)
        await registry.add(Server(name="up1", transport="broken"))
        await registry.add(Server(name="down1", transport="broken", options={"unreachable": True}))
        deadline = time.monotonic() + 20
        for name in ("up1", "down1"):
            assert await host.wait_served(name, max(deadline - time.monotonic(), 0.1)), name

        # An OS error once the command ran: transport_error, and its reply is kept.
        ran = await _request(nc, names.server("up1", "exec"), {"id": "ran-1", "argv": ["x"]})
        assert ran["error"]["code"] == "transport_error"
        assert ran["error"]["message"] == "broken transport failed: [Errno 5] Input/output error"
        assert await host.memory.load("up1", "exec", "ran-1") is not None

        # An OS error reaching the server: server_offline, and nothing ran, so the id's
        # claim is dropped (a retry with it runs the command). The drop follows the reply
        # (commandrun._settle: a retry in between waits on the claim), so it is awaited.
        unreached = await _request(nc, names.server("down1", "exec"), {"id": "never-1", "argv": ["x"]})
        assert unreached["error"]["code"] == "server_offline"
        assert unreached["error"]["message"].startswith("cannot reach down1 over broken: ")
        while await host.memory.load("down1", "exec", "never-1") is not None:
            assert time.monotonic() < deadline, "the claim of a command that never ran was kept"
            await asyncio.sleep(0.01)

        # A transport's bug: internal, saying only where to look.
        bug = await _request(nc, names.server("up1", "info"), {})
        assert bug["error"] == {"code": "internal", "message": "internal error in the plugin host; see its log"}

        # Refused before anything: invalid_request, under a fresh id.
        refused = await _request(nc, names.server("up1", "exec"), {"argv": []})
        assert refused["error"]["code"] == "invalid_request" and refused["id"]
    finally:
        await asyncio.wait_for(host.stop(), 30)

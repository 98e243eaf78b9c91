"""Validation at the boundary: names, bus requests, error codes."""

from __future__ import annotations

import json

import pytest
from fleetbus.errors import (
    ERROR_CODES,
    FleetbusError,
    InvalidRequest,
    NotFound,
    ServerOffline,
)
from fleetbus.messages import (
    MAX_JSON_DEPTH,
    ExecRequest,
    GetRequest,
    PutRequest,
    describe_validation_error,
    parse_json_object,
    parse_request,
)
from fleetbus.names import check_command_id, check_server_name
from fleetbus.records import Server
from fleetbus.subjects import Names, ReplySubjects
from pydantic import ValidationError


@pytest.mark.parametrize("name", ["web1", "a", "db-01", "x" * 63])
def test_good_server_names(name: str) -> None:
    assert check_server_name(name) == name


@pytest.mark.parametrize("name", ["", "Web1", "web.1", "web*", "web>", "-web", "web-", "we b", "x" * 64, "wéb"])
def test_bad_server_names_are_refused_clearly(name: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid server name"):
        check_server_name(name)


def test_server_record_validates_name_and_labels() -> None:
    with pytest.raises(ValidationError):
        Server(name="Bad.Name", transport="local")
    with pytest.raises(ValidationError):
        Server(name="ok", transport="local", labels={"Bad Key": "x"})
    with pytest.raises(ValidationError):
        Server(name="ok", transport="local", unknown_field=1)  # type: ignore[call-arg]
    assert Server(name="ok", transport="ssh", port=22, roles=["web"]).port == 22


def test_exec_needs_exactly_one_of_argv_and_shell() -> None:
    assert ExecRequest(argv=["true"]).argv == ["true"]
    assert ExecRequest(shell="true").shell == "true"
    with pytest.raises(ValidationError, match="exactly one"):
        ExecRequest()
    with pytest.raises(ValidationError, match="exactly one"):
        ExecRequest(argv=["true"], shell="true")


def test_exec_rejects_bad_env_names_timeouts_and_subjects() -> None:
    with pytest.raises(ValidationError, match="environment variable name"):
        ExecRequest(argv=["true"], env={"A=B": "x"})
    with pytest.raises(ValidationError):
        ExecRequest(argv=["true"], timeout_s=0)
    with pytest.raises(ValidationError, match="output_subject"):
        ExecRequest(argv=["true"], output_subject="_INBOX.>")
    with pytest.raises(ValidationError, match="unknown|Extra"):
        ExecRequest.model_validate({"argv": ["true"], "bogus": 1})


def test_exec_wrong_types_are_refused() -> None:
    with pytest.raises(ValidationError):
        ExecRequest.model_validate({"argv": "true"})
    with pytest.raises(ValidationError):
        ExecRequest.model_validate({"argv": ["true"], "timeout_s": "soon"})


def test_put_modes_and_sources() -> None:
    assert PutRequest(path="/x", content_b64="", mode="0640").mode == 0o640
    assert PutRequest(path="/x", content_b64="aGk=", mode=0o600).content() == b"hi"
    with pytest.raises(ValidationError, match="octal"):
        PutRequest(path="/x", content_b64="", mode="rw")
    with pytest.raises(ValidationError, match="exactly one"):
        PutRequest(path="/x")
    with pytest.raises(ValidationError, match="base64"):
        PutRequest(path="/x", content_b64="not base64!")
    with pytest.raises(ValidationError, match="NUL"):
        GetRequest(path="/x\x00y")


@pytest.mark.parametrize("mode", ["-0", "0o777", "  0644", "+644", "0644 ", "0x1ff", "", "07777", "8",
                                  "1_0", "\u0664", True, 1.5, -1, 0o10000, [420]])
def test_mode_is_strict_octal(mode: object) -> None:
    with pytest.raises(ValidationError, match="mode"):
        PutRequest.model_validate({"path": "/x", "content_b64": "", "mode": mode})


@pytest.mark.parametrize(("mode", "value"), [("0644", 0o644), ("644", 0o644), ("7", 7), ("7777", 0o7777),
                                             ("0000", 0), (420, 0o644), (0, 0), (0o7777, 0o7777), (None, None)])
def test_mode_accepts_octal_digits_and_plain_integers(mode: object, value: int | None) -> None:
    assert PutRequest.model_validate({"path": "/x", "content_b64": "", "mode": mode}).mode == value


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b'{"argv": ["true"], "env": ' + b'{"a":' * 500 + b'"x"' + b"}" * 500 + b"}",
    b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1),
])
def test_deeply_nested_json_is_an_invalid_request(body: bytes) -> None:
    with pytest.raises(InvalidRequest, match="nests deeper than"):
        parse_json_object(body)


def test_nesting_up_to_the_limit_parses() -> None:
    depth = MAX_JSON_DEPTH
    body = parse_json_object(b'{"a":' * (depth - 1) + b"[]" + b"}" * (depth - 1))
    assert isinstance(body["a"], dict)
    # Brackets inside strings are text, not nesting.
    assert parse_json_object(b'{"shell": "' + b"[[{" * 100 + b'"}')["shell"].startswith("[[{")



@pytest.mark.parametrize("body", [
    rb'{"shell": "echo \ud800"}',                      # an escaped lone surrogate
    rb'{"\uDFFF": 1}',                                 # in a key
    b'{"labels": {"a": "b\xed\xa0\x80"}}',             # its raw bytes, which json.loads passes
])
def test_lone_surrogates_are_an_invalid_request(body: bytes) -> None:
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        parse_json_object(body)


def test_text_that_merely_looks_like_a_surrogate_parses() -> None:
    # A pair escapes one character; ED starts Hangul syllables too.
    assert parse_json_object(rb'{"a": "\ud83d\ude00"}') == {"a": "\U0001f600"}
    assert parse_json_object('{"a": "\ud7a3"}'.encode()) == {"a": "\ud7a3"}

@pytest.mark.parametrize("subject", [
    "fleetbus.v1.admin.servers.remove", "fleetbus.v1.servers.web2.exec", "fleetbus.v1.audit.x",
    "$JS.API.STREAM.DELETE.FLEETBUS_AUDIT", "$SYS.REQ.SERVER.PING", "$SRV.PING", "$KV.b.k", "$O.b.C.x",
    "_INBOX", "_INBOXES.x", "inbox.x", "$JS.API._INBOX.x",
])
def test_only_reply_subjects_may_be_named_for_output_and_transfers(subject: str) -> None:
    bodies = {
        "exec": {"argv": ["true"], "output_subject": subject},
        "put": {"path": "/x", "stream": {"subject": subject}},
        "get": {"path": "/x", "stream": {"subject": subject}},
    }
    for op, body in bodies.items():
        with pytest.raises(InvalidRequest, match="not a reply subject: .* under _INBOX\\.") as caught:
            parse_request(op, json.dumps(body).encode())
        assert ("output_subject" if op == "exec" else "stream.subject") in caught.value.message
    # Building a model directly applies the same rule (no context: the default namespace).
    with pytest.raises(ValidationError, match="not a reply subject"):
        ExecRequest(argv=["true"], output_subject=subject)


def test_inbox_subjects_are_reply_subjects() -> None:
    _, req = parse_request("exec", b'{"argv": ["true"], "output_subject": "_INBOX.abc.1"}')
    assert isinstance(req, ExecRequest) and req.output_subject == "_INBOX.abc.1"
    _, get = parse_request("get", b'{"path": "/x", "stream": {"subject": "_INBOX.k"}}')
    assert isinstance(get, GetRequest) and get.stream is not None and get.stream.subject == "_INBOX.k"


def test_a_configured_reply_prefix_is_a_reply_subject_and_the_default_stays_strict() -> None:
    replies = ReplySubjects.parse("_INBOX, ci.replies.", own_prefix="fleetbus")
    assert replies.prefixes == ("_INBOX.", "ci.replies.")
    body = json.dumps({"path": "/x", "stream": {"subject": "ci.replies.42"}}).encode()
    _, put = parse_request("put", body, replies)
    assert isinstance(put, PutRequest) and put.stream is not None and put.stream.subject == "ci.replies.42"
    with pytest.raises(InvalidRequest, match="not a reply subject"):
        parse_request("put", body)  # not configured: refused
    with pytest.raises(InvalidRequest, match="not a reply subject"):
        parse_request("exec", b'{"argv": ["true"], "output_subject": "ci.replies2.x"}', replies)


@pytest.mark.parametrize("setting", ["$JS", "$JS.API.", "$", "fleetbus", "fleetbus.v1.", "a.*", "a.>", "a b", ".x"])
def test_a_reply_prefix_under_reserved_subjects_cannot_be_configured(setting: str) -> None:
    with pytest.raises(InvalidRequest, match="reply prefix"):
        ReplySubjects.parse(setting, own_prefix="fleetbus")


def test_the_own_prefix_is_never_a_reply_subject_even_if_configured_otherwise() -> None:
    replies = Names("acme").reply_subjects(("_INBOX.",))
    assert replies.allows("_INBOX.x") and not replies.allows("acme.v1.admin.servers.remove")
    with pytest.raises(InvalidRequest, match="reply prefix"):
        Names("acme").reply_subjects(("acme.replies.",))
    assert ReplySubjects.parse("", "acme").prefixes == ("_INBOX.",)


def test_validation_message_is_one_line_naming_the_field() -> None:
    try:
        ExecRequest.model_validate({"argv": ["true"], "bogus": 1})
    except ValidationError as exc:
        text = describe_validation_error(exc)
    assert "bogus" in text and "unknown field" in text and "\n" not in text


def test_parse_json_object() -> None:
    assert parse_json_object(b"") == {}
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        parse_json_object(b"\xff\xfe garbage")
    with pytest.raises(InvalidRequest, match="JSON object"):
        parse_json_object(b"[1, 2]")


def test_command_ids() -> None:
    assert check_command_id("abc-DEF_1") == "abc-DEF_1"
    with pytest.raises(InvalidRequest):
        check_command_id("has space")


def test_error_codes_round_trip_over_the_wire() -> None:
    assert set(ERROR_CODES) == {
        "invalid_request", "not_found", "server_offline", "timeout", "cancelled",
        "auth_failed", "transport_error", "too_large", "busy", "lost", "forbidden", "internal",
    }
    err = FleetbusError.from_wire(NotFound("no server named x").to_wire())
    assert FleetbusError.from_wire({"code": "lost", "message": "m"}).code == "lost"
    assert isinstance(err, NotFound) and err.message == "no server named x"
    assert isinstance(FleetbusError.from_wire({"code": "server_offline", "message": "m"}), ServerOffline)
    assert FleetbusError.from_wire({"code": "made-up"}).code == "internal"


def test_a_trailing_newline_passes_no_name_or_subject_check() -> None:
    # re's "$" also matches before a final "\n": a subject "_INBOX.x\n" would end the
    # NATS protocol line early on fleetbus's own connection, an id would split a header.
    with pytest.raises(InvalidRequest):
        check_server_name("web1\n")
    with pytest.raises(InvalidRequest):
        check_command_id("abc\n")
    for body in ({"argv": ["true"], "output_subject": "_INBOX.x\n"}, {"argv": ["true"], "id": "abc\n"},
                 {"argv": ["true"], "env": {"A\n": "x"}}):
        with pytest.raises(InvalidRequest):
            parse_request("exec", json.dumps(body).encode())
    with pytest.raises(InvalidRequest):
        parse_request("put", json.dumps({"path": "/x", "object": "a\n"}).encode())
    with pytest.raises(ValidationError):
        Server(name="ok", transport="local", labels={"k\n": "v"})

"""Validation at the boundary: names, bus requests, error codes."""

from __future__ import annotations

import pytest
from fleetbus.errors import (
    ERROR_CODES,
    FleetbusError,
    InvalidRequest,
    NotFound,
    ServerOffline,
)
from fleetbus.messages import (
    ExecRequest,
    GetRequest,
    PutRequest,
    describe_validation_error,
    parse_json_object,
)
from fleetbus.names import check_command_id, check_server_name
from fleetbus.records import Server
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
        ExecRequest(argv=["true"], output_subject="a.>")
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
        "auth_failed", "transport_error", "too_large", "busy", "internal",
    }
    err = FleetbusError.from_wire(NotFound("no server named x").to_wire())
    assert isinstance(err, NotFound) and err.message == "no server named x"
    assert isinstance(FleetbusError.from_wire({"code": "server_offline", "message": "m"}), ServerOffline)
    assert FleetbusError.from_wire({"code": "made-up"}).code == "internal"

"""Resolving a job's selection against registry records (pure; no NATS)."""

from __future__ import annotations

import pytest
from fleetbus.errors import InvalidRequest, NotFound
from fleetbus.records import Server
from fleetbus.selection import Selection, resolve
from pydantic import ValidationError


def srv(name: str, roles: list[str] | None = None, env: str | None = None, **labels: str) -> Server:
    return Server(name=name, transport="local", roles=roles or [], environment=env, labels=labels)


FLEET = [
    srv("web-2", ["web"], "production", team="core", zone="a"),
    srv("web-1", ["web", "api"], "production", team="core", zone="b"),
    srv("web-10", ["web"], "staging", team="core"),
    srv("db1", ["db"], "production", team="data"),
    srv("db2", ["db"], "staging", team="data"),
    srv("local"),
]


def names(selection: Selection) -> list[str]:
    return [s.name for s in resolve(selection, FLEET)]


def test_each_criterion_alone() -> None:
    assert names(Selection(all=True)) == ["db1", "db2", "local", "web-1", "web-10", "web-2"]
    assert names(Selection(role="web")) == ["web-1", "web-10", "web-2"]
    assert names(Selection(role="api")) == ["web-1"]
    assert names(Selection(environment="staging")) == ["db2", "web-10"]
    assert names(Selection(labels={"team": "data"})) == ["db1", "db2"]
    assert names(Selection(servers=["web-?"])) == ["web-1", "web-2"]
    assert names(Selection(servers=["web-*", "db1"])) == ["db1", "web-1", "web-10", "web-2"]
    assert names(Selection(servers=["db[12]"])) == ["db1", "db2"]


def test_criteria_are_anded_and_labels_all_must_match() -> None:
    assert names(Selection(role="web", environment="production")) == ["web-1", "web-2"]
    assert names(Selection(role="web", labels={"team": "core", "zone": "a"})) == ["web-2"]
    assert names(Selection(servers=["web-*"], environment="staging")) == ["web-10"]
    assert names(Selection(all=True, role="db")) == ["db1", "db2"]
    # A label the server lacks never matches, not even an empty value.
    assert names(Selection(labels={"zone": "b"})) == ["web-1"]
    with pytest.raises(NotFound):
        resolve(Selection(labels={"team": "core", "zone": ""}), FLEET)


def test_globs_are_case_sensitive_and_whole_name() -> None:
    assert names(Selection(servers=["web-1*"])) == ["web-1", "web-10"]
    with pytest.raises(NotFound, match="no server matches servers eb"):
        resolve(Selection(servers=["eb*"]), FLEET)


def test_empty_selection_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="selection is empty"):
        resolve(Selection(), FLEET)
    with pytest.raises(InvalidRequest):
        resolve(Selection(servers=[], labels={}), FLEET)


def test_matching_nothing_is_not_found_naming_the_selection() -> None:
    with pytest.raises(NotFound, match="no server matches role web, environment qa"):
        resolve(Selection(role="web", environment="qa"), FLEET)
    with pytest.raises(NotFound):
        resolve(Selection(all=True), [])


def test_an_unregistered_plain_name_is_an_error_not_a_smaller_job() -> None:
    with pytest.raises(NotFound, match="no server named web-3"):
        resolve(Selection(servers=["web-1", "web-3"]), FLEET)
    # A name that exists but fails another criterion simply is not selected.
    assert names(Selection(servers=["web-1", "db1"], role="db")) == ["db1"]


@pytest.mark.parametrize("bad", [
    {"servers": ["Web-1"]}, {"servers": ["a.b"]}, {"servers": [">"]}, {"servers": [""]},
    {"role": "Bad Role"}, {"labels": {"Bad": "x"}}, {"hosts": ["x"]},
])
def test_bad_fields_are_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Selection.model_validate(bad)

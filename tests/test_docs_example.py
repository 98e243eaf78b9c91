"""docs/bus-api.md and its worked example stay true to the code.

The example runs as another system would run it (a separate Python process, nats-py
only) against a real `fleetbus up`; the reference is checked against the request
models, error codes, records and admin endpoints, so a new field or code that is not
documented fails here.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from fleetbus.admin import CredentialAdd, CredentialRemove, NameBody, ServerAdd, UserChange, UserReach
from fleetbus.audit import AuditRecord
from fleetbus.auditquery import AuditQuery
from fleetbus.errors import ERROR_CODES
from fleetbus.messages import REQUEST_MODELS, CancelRequest
from fleetbus.output import HDR_COMMAND, HDR_END, HDR_ERROR, HDR_EXIT, HDR_SEQ, HDR_STREAM
from fleetbus.records import CredentialInfo, Server, ServerStatus
from support.processes import Fleet

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bus-api.md"
EXAMPLE = ROOT / "docs" / "examples" / "bus_example.py"
CONTENT = "hello from the fleetbus bus API example\n"


def run_example(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True,
        timeout=120, stdin=subprocess.DEVNULL, check=False,
    )


def test_example_runs_against_a_real_fleet(fleet: Fleet, tmp_path: Path) -> None:
    remote = tmp_path / "example.txt"
    proc = run_example(fleet.environ(), str(remote))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    uname = subprocess.run(["uname", "-a"], capture_output=True, text=True, check=True).stdout
    out = proc.stdout
    assert uname in out  # the live output, written as it arrived
    assert "== exit code 0 (end marker exit code 0)" in out
    assert f"== put local:{remote}: {len(CONTENT)} bytes, mode 0644" in out
    assert f"== get local:{remote}: {len(CONTENT)} bytes" in out
    assert CONTENT in out.split(f"== get local:{remote}", 1)[1]  # the round-tripped content
    assert out.rstrip().endswith("== all good")
    assert remote.read_text() == CONTENT and (remote.stat().st_mode & 0o777) == 0o644


def test_example_fails_with_a_clear_message_and_non_zero_exit(fleet: Fleet, tmp_path: Path) -> None:
    # The same NATS under another prefix: nobody serves `local` there, so NATS answers
    # "no responders" and the example must say so and exit non-zero.
    home = tmp_path / "home"
    home.mkdir()
    run = json.loads((fleet.home / "run.json").read_text())
    (home / "run.json").write_text(json.dumps({**run, "prefix": "nobody"}))
    shutil.copy(fleet.home / "nats.token", home / "nats.token")
    env = {**fleet.environ(), "FLEETBUS_HOME": str(home)}
    proc = run_example(env, str(tmp_path / "never.txt"))
    assert proc.returncode == 1
    assert "no responders on nobody.v1.servers.local.exec" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "never.txt").exists()

    missing = run_example({**fleet.environ(), "FLEETBUS_HOME": str(tmp_path / "none")})
    assert missing.returncode == 1 and "is `fleetbus up` running?" in missing.stderr


# The reference -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def section(doc: str, heading_end: str) -> str:
    """The text under the level-3 heading ending in ``heading_end``, up to the next heading."""
    lines = doc.splitlines()
    starts = [i for i, line in enumerate(lines)
              if line.startswith("### ") and line.rstrip().endswith(heading_end)]
    assert len(starts) == 1, f"expected one heading ending in {heading_end!r}, found {len(starts)}"
    start = starts[0]
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith(("## ", "### "))),
               len(lines))
    return "\n".join(lines[start:end])


def test_every_error_code_is_in_the_error_table(doc: str) -> None:
    table = doc.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE)
    assert sorted(documented) == sorted(ERROR_CODES)


@pytest.mark.parametrize("op", sorted(REQUEST_MODELS))
def test_every_request_field_is_documented_under_its_subject(doc: str, op: str) -> None:
    text = section(doc, f"<prefix>.v1.servers.<server>.{op}`")
    for name in REQUEST_MODELS[op].model_fields:
        assert f"| `{name}` |" in text, f"{op}: field {name!r} is not in its table"


def test_cancel_fields_are_documented(doc: str) -> None:
    text = section(doc, "<prefix>.v1.servers.<server>.cancel`")
    for name in CancelRequest.model_fields:
        assert f"| `{name}` |" in text


def test_live_output_headers_are_documented(doc: str) -> None:
    text = doc.split("## Live output", 1)[1].split("\n## ", 1)[0]
    for header in (HDR_STREAM, HDR_SEQ, HDR_COMMAND, HDR_END, HDR_EXIT, HDR_ERROR):
        assert f"| `{header}` |" in text


@pytest.mark.parametrize("model", [Server, CredentialAdd])
def test_admin_record_fields_are_documented(doc: str, model: type) -> None:
    text = doc.split("## Admin API", 1)[1].split("\n## ", 1)[0]
    for name in model.model_fields:
        assert f"| `{name}` |" in text, f"{model.__name__}.{name}"


@pytest.mark.parametrize("model", [ServerAdd, NameBody, CredentialRemove, ServerStatus, CredentialInfo,
                                   AuditQuery, UserReach, UserChange])
def test_admin_bodies_are_documented(doc: str, model: type) -> None:
    text = doc.split("## Admin API", 1)[1].split("\n## ", 1)[0]
    for name in model.model_fields:
        assert f"`{name}`" in text or f'"{name}"' in text, f"{model.__name__}.{name}"


def test_audit_record_fields_are_documented(doc: str) -> None:
    text = doc.split("## Audit trail", 1)[1].split("\n## ", 1)[0]
    for name in AuditRecord.model_fields:
        assert f"| `{name}` |" in text


def test_the_python_example_in_the_doc_is_the_script(doc: str) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```$", doc, flags=re.MULTILINE | re.DOTALL)
    assert EXAMPLE.read_text() in blocks


async def test_every_admin_endpoint_is_documented(fleet: Fleet, doc: str) -> None:
    nc = await nats.connect(fleet.nats_url, user="owner", password=fleet.token)
    try:
        msg = await nc.request("$SRV.INFO.fleetbus-admin", b"", timeout=10)
    finally:
        await nc.close()
    endpoints = [e["subject"] for e in json.loads(msg.data)["endpoints"]]
    assert endpoints
    for subject in endpoints:
        assert subject.startswith("fleetbus.v1.admin.")
        assert f"`<prefix>.v1.admin.{subject.removeprefix('fleetbus.v1.admin.')}`" in doc


def test_job_fields_and_records_are_documented(doc: str) -> None:
    from fleetbus.jobrecords import JobCounts, JobSummary, ServerResult
    from fleetbus.jobrequest import JobRequest
    from fleetbus.selection import Selection

    text = doc.split("\n## Jobs\n", 1)[1].split("\n## ", 1)[0]
    for model in (JobRequest, Selection, ServerResult):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name}"
    for model in (JobSummary, JobCounts):
        for name in model.model_fields:
            assert f"`{name}`" in text, f"{model.__name__}.{name}"
    for verb in ("start", "get", "list", "cancel", "rerun"):
        assert f"| `<prefix>.v1.jobs.{verb}` |" in text

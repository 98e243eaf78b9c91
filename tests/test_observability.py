"""Observability with real parts: metrics scraped from a running `fleetbus up`, server
checks flipping with a real agent, the ops/ files checked by promtool and loaded by a
real Prometheus, NATS micro discovery, and the Grafana dashboard's queries.

Prometheus and promtool come from Debian's `prometheus` package (`python3 dev.py test`
installs it as root); without them these tests skip, or fail when CI is set.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families
from support.agents import Agent, add_agent_server, gateway_of
from support.ports import free_port
from support.processes import Fleet, stop_process, wait_for

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "ops" / "prometheus"
DASHBOARD = ROOT / "ops" / "grafana" / "fleetbus-dashboard.json"
DOC = ROOT / "docs" / "observability.md"
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

# Every label name fleetbus may put on a sample ("le" is the histogram's own).
ALLOWED_LABELS = {"transport", "op", "outcome", "server", "reason", "version", "user", "le"}
ALERTS = {"FleetbusProcessDown", "FleetbusServerDown", "FleetbusServerFlapping",
          "FleetbusAuthFailureBurst", "FleetbusCommandErrorRatio",
          "FleetbusBlockingPoolSaturated", "FleetbusCommandsQueued", "FleetbusJobStopped"}
CHECK_INTERVAL_S = 0.5


def need(path: str) -> str:
    if Path(path).exists():
        return path
    message = (f"{path} is missing: install Debian's prometheus package "
               "(`python3 dev.py test` does it when run as root)")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """conftest's `fleet`, with server checks every 0.5 s so state changes show quickly."""
    stack = Fleet(tmp_path_factory.mktemp("obs") / "home",
                  extra_args=["--check-interval", str(CHECK_INTERVAL_S)]).start()
    yield stack
    stack.stop()


# scraping -------------------------------------------------------------------------------
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(fleet: Fleet) -> str:
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def metric(fleet: Fleet, name: str, **labels: str) -> float | None:
    return parse(scrape(fleet)).get((name, frozenset(labels.items())))


def exported_names(text: str) -> set[str]:
    """Every sample name the exposition can hold, from its families (even empty ones)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("", "_count", "_sum", "_created")}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def families(text: str) -> dict[str, str]:
    """Family name as it appears in a query (counters with _total) -> type."""
    return {(f.name + "_total" if f.type == "counter" else f.name): f.type
            for f in text_string_to_metric_families(text)
            if not f.name.endswith("_created")}  # prometheus-client's companions, documented once


# PromQL ----------------------------------------------------------------------------------
_NOT_METRICS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                "unless", "offset", "inf", "nan", "atan2"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and labels left out)."""
    grafana = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]\w*\s*\)\s*", expr, re.DOTALL)
    if grafana:  # a Grafana variable query: label_values(SELECTOR, label)
        expr = grafana.group(1)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    found = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        word = m.group(0)
        if e[m.end():].lstrip().startswith("(") or word.lower() in _NOT_METRICS:
            continue
        found.add(word)
    return found


def test_promql_metric_extraction() -> None:
    assert promql_metrics('histogram_quantile(0.99, sum by (le, op) (rate(a_bucket{x=~"$y"}[$__rate_interval])))'
                          ) == {"a_bucket"}
    assert promql_metrics("b / c > 0.9 and on (instance) d offset 5m") == {"b", "c", "d"}
    assert promql_metrics('label_values(e{job=~"$job"}, instance)') == {"e"}
    assert promql_metrics("count(max by (server) (f) == 0) or vector(0)") == {"f"}


# command metrics -------------------------------------------------------------------------
def cli_ok(fleet: Fleet, *args: str, code: int = 0, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = fleet.cli(*args, **kw)
    assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def histogram_is_cumulative(samples: Samples, name: str, **labels: str) -> None:
    want = frozenset(labels.items())
    buckets = sorted((float(dict(k)["le"]), v) for (n, k), v in samples.items()
                     if n == f"{name}_bucket" and k - {("le", dict(k)["le"])} == want)
    assert buckets and buckets[-1][0] == math.inf
    values = [v for _, v in buckets]
    assert values == sorted(values), f"{name}{labels} buckets are not cumulative: {buckets}"
    assert values[-1] == val(samples, f"{name}_count", **labels)


def test_commands_are_counted_timed_and_sized(fleet: Fleet, tmp_path: Path) -> None:
    before = parse(scrape(fleet))
    ok = {"transport": "local", "op": "exec", "outcome": "ok"}
    timed = {"transport": "local", "op": "exec"}
    cli_ok(fleet, "run", "local", "--", "true")
    cli_ok(fleet, "run", "local", "--", "sh", "-c", "exit 3", code=3)  # exits non-zero: still ok
    assert cli_ok(fleet, "run", "local", "--", "echo", "hello").stdout == "hello\n"
    cli_ok(fleet, "run", "local", "--timeout", "0.3", "--", "sleep", "5", code=124)
    src = tmp_path / "payload.bin"
    src.write_bytes(os.urandom(100_000))
    cli_ok(fleet, "put", "local", str(src), str(tmp_path / "copy.bin"))

    # The worker replies first and counts right after: wait for the counts to arrive.
    def settled() -> Samples | None:
        now = parse(scrape(fleet))
        done = (val(now, "fleetbus_commands_total", **ok) >= val(before, "fleetbus_commands_total", **ok) + 3
                and val(now, "fleetbus_commands_total", transport="local", op="put", outcome="ok")
                >= val(before, "fleetbus_commands_total", transport="local", op="put", outcome="ok") + 1
                and val(now, "fleetbus_command_duration_seconds_count", **timed)
                >= val(before, "fleetbus_command_duration_seconds_count", **timed) + 4)
        return now if done else None

    after = wait_for(settled, what="the command counters")

    def delta(name: str, **labels: str) -> float:
        return val(after, name, **labels) - val(before, name, **labels)

    assert delta("fleetbus_commands_total", **ok) == 3
    assert delta("fleetbus_commands_total", transport="local", op="exec", outcome="timeout") == 1
    assert delta("fleetbus_commands_total", transport="local", op="put", outcome="ok") == 1
    assert delta("fleetbus_command_duration_seconds_count", **timed) == 4
    assert delta("fleetbus_command_duration_seconds_sum", **timed) >= 0.3  # the timed-out sleep
    # The 0.3 s one is above the 0.25 s bucket; the three quick ones are below 5 s.
    assert delta("fleetbus_command_duration_seconds_bucket", le="0.25", **timed) <= 3
    assert delta("fleetbus_command_duration_seconds_bucket", le="5.0", **timed) == 4
    histogram_is_cumulative(after, "fleetbus_command_duration_seconds", **timed)
    histogram_is_cumulative(after, "fleetbus_command_duration_seconds", transport="local", op="put")
    assert delta("fleetbus_transferred_bytes_total", transport="local", op="put") >= 100_000
    assert delta("fleetbus_transferred_bytes_total", transport="local", op="exec") >= len("hello\n")
    for gauge in ("fleetbus_commands_in_flight", "fleetbus_commands_queued"):
        assert val(after, gauge, transport="local") == 0
    assert val(after, "fleetbus_blocking_threads_max") > 0
    assert val(after, "fleetbus_server_up", server="local", transport="local") == 1
    assert [v for (n, _), v in after.items() if n == "fleetbus_info"] == [1]


def test_no_secret_in_any_label_and_few_label_names(fleet: Fleet, tmp_path: Path) -> None:
    secret = "obs-secret-" + secrets.token_hex(16)
    cli_ok(fleet, "credentials", "add", "obs-cred", "--type", "password", "--user", "admin",
           input=secret.encode())
    # A server using it (its check opens the credential and fails: nothing listens there),
    # and a command whose environment, argv and output carry the secret.
    cli_ok(fleet, "servers", "add", "obs-ssh", "--transport", "ssh", "--host", "127.0.0.1",
           "--port", str(free_port()), "--credential", "obs-cred", "--label", f"note={secret}")
    out = cli_ok(fleet, "run", "local", "--env", f"TOKEN={secret}", "--", "sh", "-c",
                 f'echo "$TOKEN" {secret}').stdout
    assert secret in out
    wait_for(lambda: metric(fleet, "fleetbus_server_up", server="obs-ssh", transport="ssh") == 0,
             what="the failed check of obs-ssh")
    text = scrape(fleet)
    assert secret not in text
    assert secret[len("obs-secret-"):] not in text
    names = {name for family in text_string_to_metric_families(text)
             for s in family.samples for name in s.labels}
    assert names <= ALLOWED_LABELS, names - ALLOWED_LABELS

    # A removed server's gauges go away with it.
    cli_ok(fleet, "servers", "remove", "obs-ssh")
    wait_for(lambda: metric(fleet, "fleetbus_server_up", server="obs-ssh", transport="ssh") is None,
             what="obs-ssh's gauges to be dropped")
    cli_ok(fleet, "credentials", "remove", "obs-cred")


def test_auth_failures_are_counted_by_reason(fleet: Fleet, tmp_path: Path) -> None:
    before = metric(fleet, "fleetbus_auth_failures_total", transport="agent-outbound",
                    reason="unknown_key") or 0
    gw = gateway_of(fleet)
    agent = Agent(tmp_path / "bogus", gw["address"], gw["fingerprint"],
                  "fbk1_" + secrets.token_urlsafe(32)).start()
    try:
        wait_for(lambda: (metric(fleet, "fleetbus_auth_failures_total", transport="agent-outbound",
                                 reason="unknown_key") or 0) > before,
                 what="an unknown_key auth failure")
    finally:
        agent.stop()
    assert "fbk1_" not in scrape(fleet)


# server checks ---------------------------------------------------------------------------
def server_state(fleet: Fleet, name: str) -> str | None:
    proc = fleet.cli("servers", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    found = {s["name"]: s for s in json.loads(proc.stdout)}
    status = (found.get(name) or {}).get("status") or {}
    return status.get("state")


def checked(fleet: Fleet, name: str, state: str) -> Callable[[], bool]:
    up = 1 if state == "online" else 0
    return lambda: (metric(fleet, "fleetbus_server_up", server=name, transport="agent-outbound") == up
                    and server_state(fleet, name) == state)


def test_server_check_follows_the_agent(fleet: Fleet, tmp_path: Path) -> None:
    name = "obs-flip"
    key = add_agent_server(fleet, name)
    gw = gateway_of(fleet)

    def agent() -> Agent:
        return Agent(tmp_path / "agent", gw["address"], gw["fingerprint"], key).start()

    running = agent()
    try:
        wait_for(checked(fleet, name, "online"), what=f"{name} online and up 1")
        assert metric(fleet, "fleetbus_gateway_agents_connected") >= 1
        running.stop()
        wait_for(checked(fleet, name, "offline"), what=f"{name} offline and up 0")
        running = agent()
        wait_for(checked(fleet, name, "online"), what=f"{name} online again and up 1")
    finally:
        running.stop()
        fleet.cli("servers", "remove", name)
    assert (metric(fleet, "fleetbus_server_checks_total", transport="agent-outbound", outcome="failed")
            or 0) >= 1


async def until(predicate: Callable[[], Any], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def test_server_check_publishes_online_and_offline_events(fleet: Fleet, fleet_nc: NATS,
                                                                tmp_path: Path) -> None:
    name = "obs-events"
    prefix = json.loads((fleet.home / "run.json").read_text())["prefix"]
    events: list[dict[str, Any]] = []

    async def on_event(msg: Any) -> None:
        events.append({"subject": msg.subject, **json.loads(msg.data)})

    await fleet_nc.subscribe(f"{prefix}.v1.events.servers.{name}.*", cb=on_event)
    await fleet_nc.flush()
    key = await asyncio.to_thread(add_agent_server, fleet, name)
    gw = await asyncio.to_thread(gateway_of, fleet)

    def agent() -> Agent:
        return Agent(tmp_path / "agent", gw["address"], gw["fingerprint"], key).start()

    async def event(state: str, after: int) -> None:
        subject = f"{prefix}.v1.events.servers.{name}.{state}"

        def seen() -> bool:
            return any(e["subject"] == subject and e["state"] == state and e["server"] == name
                       for e in events[after:])

        # Status and gauge already show the change; the event is due within a check or two.
        await until(seen, f"an event on {subject}", timeout=3)

    running = agent()
    try:
        mark = len(events)
        await until(checked(fleet, name, "online"), f"{name} online")
        await event("online", mark)
        mark = len(events)
        await asyncio.to_thread(running.stop)
        await until(checked(fleet, name, "offline"), f"{name} offline")
        await event("offline", mark)
        mark = len(events)
        running = agent()
        await until(checked(fleet, name, "online"), f"{name} online again")
        await event("online", mark)
    finally:
        await asyncio.to_thread(running.stop)
        await asyncio.to_thread(fleet.cli, "servers", "remove", name)


# NATS micro discovery ---------------------------------------------------------------------
async def gather_replies(nc: NATS, subject: str, enough: Callable[[list[dict[str, Any]]], bool],
                         window: float = 3.0) -> list[dict[str, Any]]:
    """Every reply to one request until ``enough`` says so or the window closes."""
    replies: list[dict[str, Any]] = []
    done = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        replies.append(json.loads(msg.data))
        if enough(replies):
            done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    await nc.publish(subject, b"", reply=inbox)
    try:
        await asyncio.wait_for(done.wait(), window)
    except TimeoutError:
        pass
    await sub.unsubscribe()
    return replies


async def test_micro_discovery_lists_admin_and_worker(fleet: Fleet, fleet_nc: NATS) -> None:
    pings = await gather_replies(
        fleet_nc, "$SRV.PING", lambda r: {"fleetbus-admin", "fleetbus-worker"} <= {x["name"] for x in r})
    by_name = {p["name"]: p for p in pings}
    assert {"fleetbus-admin", "fleetbus-worker"} <= set(by_name), pings
    assert all(p["type"] == "io.nats.micro.v1.ping_response" and p["id"] and p["version"] for p in pings)

    info = await gather_replies(fleet_nc, "$SRV.INFO.fleetbus-worker", lambda r: len(r) >= 1)
    assert [i["type"] for i in info] == ["io.nats.micro.v1.info_response"], info
    transports = info[0]["metadata"]["transports"].split(",")
    assert {"local", "agent-outbound"} <= set(transports)
    assert info[0]["metadata"]["prefix"] and info[0]["metadata"]["worker"]

    prefix = json.loads((fleet.home / "run.json").read_text())["prefix"]
    reply = await fleet_nc.request(f"{prefix}.v1.admin.servers.list", b"{}", timeout=10)
    assert json.loads(reply.data)["ok"]
    stats = await gather_replies(fleet_nc, "$SRV.STATS.fleetbus-admin", lambda r: len(r) >= 1)
    assert [s["type"] for s in stats] == ["io.nats.micro.v1.stats_response"], stats
    endpoints = {e["name"]: e for e in stats[0]["endpoints"]}
    assert endpoints["servers-list"]["num_requests"] >= 1
    assert endpoints["servers-list"]["subject"] == f"{prefix}.v1.admin.servers.list"


# ops/ files ---------------------------------------------------------------------------------
def test_promtool_accepts_config_rules_and_rule_tests(tmp_path: Path) -> None:
    promtool = need(PROMTOOL)
    work = tmp_path / "prometheus"
    shutil.copytree(PROM_DIR, work)
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        proc = subprocess.run([promtool, *args], cwd=work, capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    tests = (work / "alerts_test.yml").read_text()
    assert "alertname: FleetbusServerDown" in tests and "alertname: FleetbusAuthFailureBurst" in tests


def test_alert_rules_use_only_exported_metrics(fleet: Fleet) -> None:
    exported = exported_names(scrape(fleet))
    text = (PROM_DIR / "alerts.yml").read_text()
    used = set(re.findall(r"\bfleetbus_[a-z0-9_]+", text))
    assert used and used <= exported, used - exported
    for alert in ALERTS:
        assert f"alert: {alert}\n" in text


def prom_get(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (("?" + urllib.parse.urlencode(params)) if params else "")
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def test_a_real_prometheus_scrapes_the_fleet_and_loads_the_rules(fleet: Fleet, tmp_path: Path) -> None:
    prometheus = need(PROMETHEUS)
    shutil.copy(PROM_DIR / "alerts.yml", tmp_path / "alerts.yml")
    target = urllib.parse.urlsplit(fleet.metrics_url)
    config = {  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "fleetbus", "metrics_path": target.path,
                            "static_configs": [{"targets": [target.netloc]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config, indent=2))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for(ready, timeout=30, what="prometheus to be ready")

        def local_up() -> bool:
            result = prom_get(base, "/api/v1/query", query="fleetbus_server_up")["result"]
            return any(r["metric"].get("server") == "local" and r["value"][1] == "1" for r in result)

        wait_for(local_up, timeout=20, what="fleetbus_server_up{server=local} == 1 in prometheus")
        targets = prom_get(base, "/api/v1/targets")["activeTargets"]
        assert [(t["labels"]["job"], t["scrapeUrl"], t["health"]) for t in targets] == [
            ("fleetbus", fleet.metrics_url, "up")], targets

        cli_ok(fleet, "run", "local", "--", "true")
        wait_for(lambda: any(float(r["value"][1]) > 0 for r in prom_get(
            base, "/api/v1/query", query='sum(fleetbus_commands_total{transport="local", op="exec"})')["result"]),
            timeout=20, what="sum(fleetbus_commands_total) > 0 in prometheus")

        exported = exported_names(scrape(fleet)) | {"up"}

        def rules_evaluated() -> list[dict[str, Any]] | None:
            groups = prom_get(base, "/api/v1/rules")["groups"]
            rules = [r for g in groups if g["name"] == "fleetbus" for r in g["rules"]]
            return rules if rules and all(r["health"] == "ok" for r in rules) else None

        rules = wait_for(rules_evaluated, timeout=20, what="every fleetbus rule evaluated without error")
        assert {r["name"] for r in rules} == ALERTS
        for rule in rules:
            assert rule["type"] == "alerting" and rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description"} <= set(rule["annotations"])
            used = promql_metrics(rule["query"])
            assert used and used <= exported, (rule["name"], used - exported)

        # A server that nobody serves: its alert goes pending (it fires only after 2 min).
        cli_ok(fleet, "servers", "add", "obs-down", "--transport", "agent-outbound")

        def pending() -> list[dict[str, Any]]:
            return [a for a in prom_get(base, "/api/v1/alerts")["alerts"]
                    if a["labels"]["alertname"] == "FleetbusServerDown"
                    and a["labels"].get("server") == "obs-down"]

        alert = wait_for(pending, timeout=20, what="FleetbusServerDown pending for obs-down")[0]
        assert alert["state"] == "pending"
        assert alert["labels"] == {"alertname": "FleetbusServerDown", "server": "obs-down",
                                   "transport": "agent-outbound", "severity": "warning"}
        assert alert["annotations"]["summary"] == "server obs-down (agent-outbound) is down"
        assert not [a for a in prom_get(base, "/api/v1/alerts")["alerts"] if a["state"] == "firing"]
    finally:
        stop_process(proc)
        fleet.cli("servers", "remove", "obs-down")


def dashboard_queries(dash: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    panels: list[dict[str, Any]] = []
    stack = list(dash["panels"])
    while stack:
        panel = stack.pop(0)
        panels.append(panel)
        stack.extend(panel.get("panels", []))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return panels, exprs


def test_grafana_dashboard_queries_only_exported_metrics(fleet: Fleet) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels, exprs = dashboard_queries(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    for panel in graphs:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])

    exported = exported_names(scrape(fleet))
    used: set[str] = set()
    for expr in exprs:
        names = promql_metrics(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported, (expr, names - exported)
        used |= names
    assert {"fleetbus_commands_total", "fleetbus_command_duration_seconds_bucket",
            "fleetbus_transferred_bytes_total", "fleetbus_server_up", "fleetbus_server_check_duration_seconds",
            "fleetbus_gateway_agents_connected", "fleetbus_auth_failures_total",
            "fleetbus_commands_in_flight", "fleetbus_commands_queued", "fleetbus_blocking_threads_busy",
            "fleetbus_blocking_threads_max"} <= used
    quantiles = [e for e in exprs if "histogram_quantile" in e and "fleetbus_command_duration_seconds" in e]
    assert any("0.5," in e for e in quantiles) and any("0.99," in e for e in quantiles)
    assert all(re.search(r"by \(le, transport, op\)", e) for e in quantiles)


def test_docs_describe_every_exported_metric(fleet: Fleet) -> None:
    doc = DOC.read_text()
    missing = [name for name in families(scrape(fleet)) if f"`{name}`" not in doc]
    assert not missing, f"docs/observability.md does not describe {missing}"
    for alert in ALERTS:
        assert alert in doc

"""The job runner's rules, driven with fake results (pure; no NATS, no clock)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from fleetbus.jobplan import Amount, JobPlan, Outcome, PlanOptions


def names(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def drive(plan: JobPlan, outcome_of: Callable[[str], Outcome] = lambda _: "ok",
          finish_order: str = "fifo") -> tuple[list[str], int, list[list[str]]]:
    """Run ``plan`` to the end; return the start order, the highest concurrency seen and
    the groups started together."""
    started: list[str] = []
    groups: list[list[str]] = []
    running: list[str] = []
    peak = 0
    while True:
        starts = plan.next_starts()
        if starts:
            groups.append(starts)
        started += starts
        running += starts
        peak = max(peak, len(running))
        assert len(running) == len(plan.running)
        if not running:
            assert plan.done
            return started, peak, groups
        name = running.pop(0 if finish_order == "fifo" else -1)
        plan.finished(name, outcome_of(name))


def test_amounts_parse_and_round_as_documented() -> None:
    assert Amount.parse("25%", "x", 1) == Amount(25, True)
    assert Amount.parse(" 7 ", "x", 1) == Amount(7) == Amount.parse(7, "x", 1)
    assert Amount(25, True).up(10) == 3 and Amount(25, True).down(10) == 2
    assert Amount(5, True).down(10) == 0 and Amount(1, True).up(10) == 1
    assert Amount(100, True).up(7) == 7 and Amount(100, True).down(7) == 7
    assert Amount(3).up(100) == 3 == Amount(3).down(100)
    for bad in ("0", "101%", "-1", "1.5", "x%", "", True):
        with pytest.raises(ValueError):
            Amount.parse(bad, "max-concurrency", 1)
    assert Amount.parse("0", "max-errors", 0) == Amount(0)


@pytest.mark.parametrize(("limit", "total", "expected"), [
    (Amount(1), 5, 1), (Amount(3), 10, 3), (Amount(25, True), 10, 3), (Amount(50, True), 3, 2),
    (Amount(20), 5, 5),
])
def test_concurrency_never_exceeds_the_limit(limit: Amount, total: int, expected: int) -> None:
    for order in ("fifo", "lifo"):
        plan = JobPlan(names(total), PlanOptions(max_concurrency=limit))
        started, peak, _ = drive(plan, finish_order=order)
        assert started == names(total)  # in order, each once
        assert peak == expected
        assert plan.outcomes == dict.fromkeys(names(total), "ok") and plan.stopped is None


@pytest.mark.parametrize("max_errors", [0, 1, 3])
def test_budget_is_spent_by_the_error_after_max_errors(max_errors: int) -> None:
    # Concurrency 1 makes the boundary exact: errors on every server.
    plan = JobPlan(names(10), PlanOptions(max_concurrency=Amount(1), max_errors=Amount(max_errors)))
    started, _, _ = drive(plan, lambda _: "failed")
    assert len(started) == max_errors + 1  # the (N+1)th error spends it
    assert plan.stopped == "budget" and plan.errors == max_errors + 1
    assert plan.skipped() == names(10)[max_errors + 1:]


def test_exactly_max_errors_holds_the_budget() -> None:
    failing = {"s01", "s04"}
    plan = JobPlan(names(6), PlanOptions(max_concurrency=Amount(1), max_errors=Amount(2)))
    started, _, _ = drive(plan, lambda n: "failed" if n in failing else "ok")
    assert started == names(6) and plan.stopped != "budget" and plan.skipped() == []
    assert plan.errors == 2


def test_percent_budget_rounds_down() -> None:
    # 25% of 10 = 2.5 -> 2 errors allowed; the third spends the budget.
    plan = JobPlan(names(10), PlanOptions(max_concurrency=Amount(1), max_errors=Amount(25, True)))
    started, _, _ = drive(plan, lambda _: "timeout")
    assert len(started) == 3 and plan.stopped == "budget"
    # 5% of 10 = 0: the first error spends it.
    plan = JobPlan(names(10), PlanOptions(max_concurrency=Amount(1), max_errors=Amount(5, True)))
    assert len(drive(plan, lambda _: "error")[0]) == 1


def test_running_servers_finish_after_the_budget_is_spent() -> None:
    plan = JobPlan(names(8), PlanOptions(max_concurrency=Amount(4), max_errors=Amount(0)))
    assert plan.next_starts() == names(4)
    plan.finished("s00", "failed")
    assert plan.stopped == "budget" and plan.next_starts() == [] and not plan.done
    for name in ("s01", "s02", "s03"):
        plan.finished(name, "ok")
    assert plan.done and plan.skipped() == names(8)[4:]
    assert plan.outcomes == {"s00": "failed", "s01": "ok", "s02": "ok", "s03": "ok"}


def test_no_budget_runs_everything() -> None:
    plan = JobPlan(names(5), PlanOptions(max_concurrency=Amount(2)))
    started, _, _ = drive(plan, lambda _: "failed")
    assert started == names(5) and plan.errors == 5 and plan.stopped is None


def test_batches_are_strict_waves() -> None:
    plan = JobPlan(names(7), PlanOptions(max_concurrency=Amount(10), batch=Amount(3)))
    _, peak, groups = drive(plan)
    assert groups == [names(7)[0:3], names(7)[3:6], names(7)[6:7]]
    assert peak == 3
    # Mid-wave, a finished server does not let the next wave begin.
    plan = JobPlan(names(4), PlanOptions(batch=Amount(2)))
    assert plan.next_starts() == ["s00", "s01"]
    plan.finished("s00", "ok")
    assert plan.next_starts() == []
    plan.finished("s01", "ok")
    assert plan.next_starts() == ["s02", "s03"]


def test_batch_with_lower_concurrency_and_percent() -> None:
    # batch 50% of 8 = 4, concurrency 2: waves of 4, never more than 2 at once.
    plan = JobPlan(names(8), PlanOptions(max_concurrency=Amount(2), batch=Amount(50, True)))
    started, peak, _ = drive(plan)
    assert started == names(8) and peak == 2 and plan.batch_size == 4


def test_canary_runs_first_alone() -> None:
    plan = JobPlan(names(6), PlanOptions(max_concurrency=Amount(10), canary=2))
    assert plan.next_starts() == ["s00", "s01"]
    plan.finished("s00", "ok")
    assert plan.next_starts() == []  # the rest waits for every canary
    plan.finished("s01", "ok")
    assert plan.next_starts() == names(6)[2:]


def test_a_failed_canary_stops_the_job_even_without_a_budget() -> None:
    plan = JobPlan(names(6), PlanOptions(max_concurrency=Amount(10), canary=2))
    plan.next_starts()
    plan.finished("s01", "failed")
    assert plan.stopped == "canary" and plan.next_starts() == []
    plan.finished("s00", "ok")
    assert plan.done and plan.skipped() == names(6)[2:]


def test_canary_then_batches() -> None:
    plan = JobPlan(names(7), PlanOptions(max_concurrency=Amount(10), batch=Amount(3), canary=1))
    _, _, groups = drive(plan)
    assert groups == [["s00"], ["s01", "s02", "s03"], ["s04", "s05", "s06"]]


def test_offline_is_an_error_that_gives_its_place_back() -> None:
    plan = JobPlan(names(6), PlanOptions(max_concurrency=Amount(2), batch=Amount(2), max_errors=Amount(1)))
    assert plan.next_starts() == ["s00", "s01"]
    plan.finished("s00", "offline")
    # Its slot and its place in the wave go to the next target at once.
    assert plan.next_starts() == ["s02"] and plan.errors == 1 and plan.stopped != "budget"
    plan.finished("s01", "ok")
    assert plan.next_starts() == []  # the wave (s01, s02) is not done
    plan.finished("s02", "offline")
    assert plan.stopped == "budget" and plan.next_starts() == []
    assert plan.done and plan.skipped() == ["s03", "s04", "s05"]


def test_stop_starts_nothing_more_and_our_cancels_are_not_errors() -> None:
    plan = JobPlan(names(5), PlanOptions(max_concurrency=Amount(2), max_errors=Amount(0)))
    plan.next_starts()
    plan.stop("cancelled")
    plan.stop("deadline")  # the first reason stays
    plan.finished("s00", "cancelled")
    plan.finished("s01", "ok")
    assert plan.stopped == "cancelled" and plan.errors == 0 and plan.done
    assert plan.skipped() == ["s02", "s03", "s04"]


def test_a_cancel_by_someone_else_is_an_error() -> None:
    plan = JobPlan(names(2), PlanOptions(max_errors=Amount(0)))
    plan.next_starts()
    plan.finished("s00", "cancelled")
    assert plan.stopped == "budget"


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError):
        JobPlan(["a", "a"])
    plan = JobPlan(["a"])
    with pytest.raises(ValueError):
        plan.finished("a", "ok")


# waiting for offline servers (wait_online_s) ---------------------------------------------
def test_a_waiting_server_holds_no_slot_and_starts_first_when_it_comes_online() -> None:
    plan = JobPlan(names(4), PlanOptions(max_concurrency=Amount(2), max_errors=Amount(0)))
    assert plan.next_starts() == ["s00", "s01"]
    plan.wait("s00")  # offline: it gives back its slot, and is no error yet
    assert plan.waiting == ["s00"] and plan.errors == 0 and not plan.done
    assert plan.next_starts() == ["s02"]
    plan.finished("s01", "ok")
    plan.online("s00")  # back first in line, ahead of s03
    assert plan.next_starts() == ["s00"]
    plan.finished("s00", "ok")
    assert plan.next_starts() == ["s03"]
    for name in ("s02", "s03"):
        plan.finished(name, "ok")
    assert plan.done and plan.stopped is None and plan.outcomes["s00"] == "ok"


def test_an_expired_wait_counts_against_the_budget_only_then() -> None:
    plan = JobPlan(names(3), PlanOptions(max_concurrency=Amount(1), max_errors=Amount(0)))
    assert plan.next_starts() == ["s00"]
    plan.wait("s00")
    assert plan.next_starts() == ["s01"]
    plan.finished("s01", "ok")
    assert plan.next_starts() == ["s02"] and plan.stopped is None
    plan.expired("s00")  # the (N+1)th error: the budget is spent now, not when it went offline
    assert plan.errors == 1 and plan.stopped == "budget" and plan.outcomes["s00"] == "offline"
    plan.finished("s02", "ok")
    assert plan.done and plan.skipped() == []


def test_the_job_is_not_done_while_a_server_waits() -> None:
    plan = JobPlan(names(1))
    plan.next_starts()
    plan.wait("s00")
    assert not plan.done and plan.next_starts() == []
    plan.expired("s00")
    assert plan.done and plan.outcomes == {"s00": "offline"}


def test_a_stop_ends_waiting_servers_offline_without_spending_the_budget() -> None:
    plan = JobPlan(names(3), PlanOptions(max_concurrency=Amount(1), max_errors=Amount(0)))
    plan.next_starts()
    plan.wait("s00")
    assert plan.next_starts() == ["s01"]
    plan.stop("deadline")
    assert plan.given_up == ["s00"] and plan.outcomes["s00"] == "offline" and plan.errors == 0
    plan.wait("s01")  # found offline after the stop: given up too, never tried again
    assert plan.given_up == ["s00", "s01"] and plan.done and plan.skipped() == ["s02"]
    assert plan.stopped == "deadline"


def test_a_budget_stop_gives_up_the_waiting_ones() -> None:
    plan = JobPlan(names(3), PlanOptions(max_concurrency=Amount(2), max_errors=Amount(0)))
    plan.next_starts()
    plan.wait("s00")
    plan.finished("s01", "failed")
    assert plan.stopped == "budget" and plan.given_up == ["s00"] and plan.waiting == []
    assert plan.done and plan.skipped() == ["s02"]


def test_a_waiting_server_gives_its_place_in_the_wave_to_the_next() -> None:
    plan = JobPlan(names(4), PlanOptions(batch=Amount(2)))
    assert plan.next_starts() == ["s00", "s01"]
    plan.wait("s00")
    assert plan.next_starts() == ["s02"]  # the wave of 2 takes s02 in s00's place
    plan.finished("s01", "ok")
    plan.finished("s02", "ok")
    plan.online("s00")
    assert plan.next_starts() == ["s00", "s03"]  # the next wave, s00 first


def test_a_canary_whose_wait_runs_out_stops_the_job() -> None:
    plan = JobPlan(names(3), PlanOptions(canary=1))
    assert plan.next_starts() == ["s00"]
    plan.wait("s00")
    assert plan.next_starts() == ["s01"]  # the canary wave takes the next target
    plan.finished("s01", "ok")
    plan.expired("s00")
    assert plan.stopped == "canary" and plan.done and plan.skipped() == ["s02"]


def test_the_tally_counts_the_outcomes_as_recorded() -> None:
    # Progress reads the tally on every result instead of counting the outcomes.
    plan = JobPlan(names(8), PlanOptions(max_concurrency=Amount(3)))
    outcomes = ["ok", "failed", "offline", "ok", "timeout", "ok"]
    plan.next_starts()
    for outcome in outcomes:
        plan.finished(min(plan.running), outcome)  # type: ignore[arg-type]
        plan.next_starts()
        assert plan.tally == Counter(plan.outcomes.values())
    waiting = min(plan.running)
    plan.wait(waiting)
    plan.stop("cancelled")
    assert plan.outcomes[waiting] == "offline"
    assert plan.tally == Counter(plan.outcomes.values())
    assert plan.skipped_count == len(plan.skipped())

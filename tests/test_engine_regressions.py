"""Regression tests for lifecycle bugs found in review (each failed before its fix)."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from helpers import llm, scenario
from policies import registry
from policies.base import BasePolicy
from sim.engine import Simulation, prepare_inputs
from sim.errors import RouteSimError, ScenarioError
from sim.metrics import summarize
from sim.record import write_json
from sim.runner import build_workload
from sim.types import Decision


class Always(BasePolicy):
    name = "always_test"

    def __init__(self, target="gpt-4", extra=(), keep="primary"):
        super().__init__()
        self.target, self.extra, self.keep = target, extra, keep

    def route(self, query, view):
        extra = tuple(e for e in self.extra if e in view.names)
        return Decision(self.target, extra=extra, keep=self.keep)


def run(sc, policy):
    wl = build_workload(sc, sc.seed)
    res = Simulation(sc, policy, prepare_inputs(sc, wl, sc.seed), seed=sc.seed).run()
    return res


def test_reference_cost_follows_price_changes():
    sc = scenario(duration_s=300, llms=[llm("gpt-4", slots=100)], run={"drain_s": None},
                  events=[{"at_s": 100, "price_change": {"llm": "gpt-4",
                                                         "price_in_per_mtok": 5.0,
                                                         "price_out_per_mtok": 15.0}}])
    res = run(sc, Always())
    s = summarize(res.requests, res.timeline, sc, "always", sc.seed)
    assert s["completed"] == s["arrived"]
    assert s["cost_pct_of_reference"] == pytest.approx(100.0, rel=1e-3)
    assert s["quality_pct_of_reference"] == pytest.approx(100.0, rel=1e-6)


def test_max_queue_zero_still_serves_free_slots():
    sc = scenario(duration_s=100, arrivals={"kind": "poisson", "rate_per_s": 0.2},
                  llms=[llm("gpt-4", slots=100, max_queue=0)], run={"drain_s": None})
    res = run(sc, registry.create("least_loaded"))
    assert (res.requests["outcome"] == "completed").all()


def test_rate_limit_below_one_per_second_admits_at_that_rate():
    sc = scenario(duration_s=2000, arrivals={"kind": "poisson", "rate_per_s": 2.0},
                  llms=[llm("gpt-4", slots=100, rate_limit_per_s=0.5)], run={"drain_s": None})
    res = run(sc, Always())
    done = res.requests.filter(pl.col("outcome") == "completed").height
    # A bucket of one token refills in 1/r = 2 s, then waits Exp(mean 1/lambda = 0.5 s) for
    # the next arrival: admissions form a renewal process with cycle mean mu = 2.5 s and
    # variance s2 = 0.25, so the count in T = 2000 s is ~ N(T/mu = 800, T*s2/mu^3 = 32).
    # Five standard deviations: 28.
    assert abs(done - 800) < 28


def test_overlapping_outages_keep_the_replica_down_until_the_last_ends():
    sc = scenario(duration_s=300, arrivals={"kind": "poisson", "rate_per_s": 2.0},
                  llms=[llm("gpt-4", slots=100)], run={"drain_s": None, "max_retries": 0},
                  events=[{"at_s": 100, "outage": {"llm": "gpt-4", "duration_s": 100}},
                          {"at_s": 150, "outage": {"llm": "gpt-4", "duration_s": 100}}])
    res = run(sc, Always())
    req = res.requests
    started_down = req.filter((pl.col("start_s") > 100) & (pl.col("start_s") < 250))
    assert started_down.height == 0
    assert req.filter(pl.col("start_s") >= 250).height > 0
    rec = res.events.filter(pl.col("kind") == "recover")["t_s"].to_list()
    assert rec == [200.0, 250.0]


def test_patience_is_not_renewed_by_a_reoffer():
    sc = scenario(duration_s=200, arrivals={"kind": "poisson", "rate_per_s": 3.0},
                  llms=[llm("gpt-4", slots=1, decode_tps=5),
                        llm("mistral-7b", slots=1, decode_tps=5)],
                  users={"patience_s": {"kind": "deterministic", "mean": 10.0}},
                  events=[{"at_s": 100, "remove_llm": "gpt-4"}], run={"drain_s": None})

    class Prefer(BasePolicy):
        name = "prefer_test"

        def route(self, query, view):
            return Decision("gpt-4" if "gpt-4" in view.names else "mistral-7b")

    res = run(sc, Prefer())
    ab = res.requests.filter(pl.col("outcome") == "abandoned")
    assert ab.height > 0
    assert np.allclose(ab["wait_s"].to_numpy(), 10.0)


def test_topk_primary_answer_is_not_held_back_by_a_slow_copy():
    sc = scenario(duration_s=100, arrivals={"kind": "poisson", "rate_per_s": 0.5},
                  llms=[llm("gpt-4", slots=100, decode_tps=1000),
                        llm("mistral-7b", slots=100, decode_tps=0.5)],
                  run={"drain_s": None})
    fast = run(sc, Always("gpt-4"))
    both = run(sc, Always("gpt-4", extra=("mistral-7b",)))
    a, b = fast.requests, both.requests
    assert np.allclose(a["latency_s"].to_numpy(), b["latency_s"].to_numpy())
    assert (b["cost_usd"] > a["cost_usd"]).all()
    assert (b["outcome"] == "completed").all()


def test_readding_a_removed_name_is_rejected():
    with pytest.raises(ScenarioError, match="unique over the whole run"):
        scenario(llms=[llm("gpt-4"), llm("mistral-7b")],
                 events=[{"at_s": 10, "remove_llm": "mistral-7b"},
                         {"at_s": 20, "add_llm": llm("mistral-7b")}])


def test_outage_of_more_replicas_than_exist_is_rejected():
    with pytest.raises(ScenarioError, match="has only 2 replica"):
        scenario(llms=[llm("gpt-4", replicas=2)],
                 events=[{"at_s": 10, "outage": {"llm": "gpt-4", "duration_s": 5,
                                                 "replicas": 3}}])


def test_summary_json_is_strict_json(tmp_path):
    sc = scenario(duration_s=50, arrivals={"kind": "poisson", "rate_per_s": 0.001})
    res = run(sc, Always())
    s = summarize(res.requests, res.timeline, sc, "always", sc.seed)
    write_json(s, tmp_path / "s.json")
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))


def test_workload_is_read_only_for_policies():
    sc = scenario(duration_s=10)
    wl = build_workload(sc, 1)
    with pytest.raises(ValueError):
        wl.features[0, 0] = math.pi


def test_policies_see_slowdowns_in_the_view():
    class Watch(BasePolicy):
        name = "watch_test"

        def __init__(self):
            super().__init__()
            self.seen = []

        def route(self, query, view):
            self.seen.append((view.now, float(view.speed_factor[0]),
                              float(view.mean_service_s[0]), float(view.decode_tps[0])))
            return Decision("gpt-4")

    sc = scenario(duration_s=300, llms=[llm("gpt-4", slots=100, decode_tps=40)],
                  events=[{"at_s": 100, "slowdown": {"llm": "gpt-4", "factor": 4.0,
                                                     "duration_s": 100}}],
                  run={"drain_s": None})
    pol = Watch()
    run(sc, pol)
    before = [s for s in pol.seen if s[0] < 100]
    during = [s for s in pol.seen if 100 <= s[0] < 200]
    after = [s for s in pol.seen if s[0] >= 200]
    assert {s[1] for s in before} == {1.0} and {s[1] for s in during} == {4.0}
    assert {s[1] for s in after} == {1.0} and {s[3] for s in pol.seen} == {40.0}
    # The service-time estimate jumps with the slowdown instead of lagging behind it.
    assert during[0][2] > 3.0 * before[-1][2]


@pytest.mark.parametrize("bad", [{"keep": "best"}, {"scores": np.zeros(1)}])
def test_malformed_decisions_are_named(bad):
    class Bad(BasePolicy):
        name = "bad_test"

        def route(self, query, view):
            return Decision(view.names[0], **bad)

    sc = scenario(duration_s=20)
    field = "decision.keep" if "keep" in bad else "decision.scores"
    with pytest.raises(RouteSimError, match=field):
        run(sc, Bad())


# ------------------------------------------ requests with several jobs (fourth review pass)
DET_1S = {"kind": "deterministic", "mean_s": 1.0}


def test_a_slowdown_re_times_the_jobs_it_overlaps(tmp_path):
    """A slowdown slows what is left of every running job while it lasts, and only that: a
    job started before it is slowed too, one started during it speeds up again after it
    (the factor used to be fixed into a job's whole service time when it started)."""
    path = tmp_path / "arrivals.csv"
    path.write_text("t\n0\n15\n")
    sc = scenario(
        duration_s=40.0, arrivals={"kind": "trace", "path": str(path)},
        llms=[llm("gpt-4", slots=2, service={"kind": "deterministic", "mean_s": 100.0})],
        events=[{"at_s": 10.0, "slowdown": {"llm": "gpt-4", "factor": 10.0,
                                            "duration_s": 20.0}}],
        run={"drain_s": None}, feedback={"probability": 0.0},
    )
    req = run(sc, registry.create("random")).requests.sort("arrival_s")
    # Job 0: 10 s of work, then 20 s at a tenth of the speed (2 s of work), then 88 s.
    # Job 1: 15 s at a tenth of the speed (1.5 s of work), then 98.5 s.
    assert req["end_s"].to_list() == pytest.approx([118.0, 128.5])
    assert req["service_s"].to_list() == pytest.approx([118.0, 113.5])


def traced(tmp_path, times, **kw):
    """A scenario whose requests arrive at `times` (a trace), LLMs all on gpt-4's answers."""
    path = tmp_path / "arrivals.csv"
    path.write_text("t\n" + "".join(f"{t}\n" for t in times))
    data = {
        "arrivals": {"kind": "trace", "path": str(path)},
        "duration_s": 10.0,
        "workload": {"source": "synthetic", "reference_llm": "A", "n_queries": 50},
        "feedback": {"probability": 0.0},
    }
    data.update(kw)
    return scenario(**data)


class Scripted(BasePolicy):
    """Routes request i by `plan[i]` (first decision) and `retry` (later rounds)."""

    name = "scripted_test"

    def __init__(self, plan, retry=None, escalate=None):
        super().__init__()
        self.plan, self.retry, self.escalate = plan, retry, escalate
        self.feedback_seen_at = {}  # request id -> feedback items received before it
        self.received = []

    def route(self, query, view):
        if query.attempt == 0:
            self.feedback_seen_at[query.id] = len(self.received)
            return self.plan[query.id]
        return self.retry

    def on_answer(self, query, answer, view):
        return self.escalate if query.id == 1 and query.attempt == 1 else None

    def feedback(self, fb):
        self.received.append(fb)


def test_fan_out_retry_after_an_outage_is_offered_when_the_last_copy_gives_up(tmp_path):
    # Request 1 fans out to A and B. A serves it from 0.1 and fails in the outage at 1.0
    # (A is back at 1.5); B's copy waits behind request 0 until its user's patience ends at
    # 2.1. A copy was served, so the user did not leave: the request is retried, at 2.1.
    # Before, the retry was noticed only at the next arrival (5.0) and started at 2.1 in
    # the past; an intermediate fix ended it abandoned.
    sc = traced(
        tmp_path, [0.0, 0.1, 5.0],
        llms=[llm("A", model="gpt-4", slots=1, service=DET_1S),
              llm("B", model="gpt-4", slots=1, service={"kind": "deterministic", "mean_s": 10})],
        events=[{"at_s": 1.0, "outage": {"llm": "A", "duration_s": 0.5}}],
        users={"patience_s": {"kind": "deterministic", "mean": 2.0}},
        run={"drain_s": None, "max_retries": 2},
    )
    plan = [Decision("B"), Decision("A", extra=("B",)), Decision("A")]
    req = run(sc, Scripted(plan, retry=Decision("A"))).requests
    r1 = req.row(1, named=True)
    assert (r1["outcome"], r1["retries"]) == ("completed", 1)
    assert r1["start_s"] == pytest.approx(2.1) and r1["end_s"] == pytest.approx(3.1)
    assert r1["wait_s"] == pytest.approx(2.0)  # the round's longest-queued copy, B's
    r2 = req.row(2, named=True)
    assert (r2["start_s"], r2["wait_s"]) == (5.0, 0.0)


def test_fan_out_whose_copies_all_gave_up_is_abandoned_at_their_deadline(tmp_path):
    # Both copies of request 2 queue behind requests 0 and 1 and give up at 2.1 (noticed at
    # the arrival at 5.0): abandoned when it happened, on the primary copy's deployment.
    slow = {"kind": "deterministic", "mean_s": 10}
    sc = traced(
        tmp_path, [0.0, 0.0, 0.1, 5.0],
        llms=[llm(n, model="gpt-4", slots=1, service=slow) for n in "AB"],
        users={"patience_s": {"kind": "deterministic", "mean": 2.0}},
        run={"drain_s": None, "max_retries": 2},
    )
    plan = [Decision("A"), Decision("B"), Decision("A", extra=("B",)), Decision("A")]
    r2 = run(sc, Scripted(plan, retry=Decision("A"))).requests.row(2, named=True)
    assert (r2["outcome"], r2["retries"], r2["llm"]) == ("abandoned", 0, "A")
    assert r2["end_s"] == pytest.approx(2.1) and r2["wait_s"] == pytest.approx(2.0)


def test_feedback_of_an_abandoned_escalation_reaches_the_next_decision(tmp_path):
    # Request 1's answer from A (done at 0.6) is escalated to B, busy with request 0; the
    # user gives up at 1.6 and keeps A's answer, whose feedback is due at 1.61. The decision
    # at 5.0 must have it: before, feedback was handed over before queues were expired.
    sc = traced(
        tmp_path, [0.0, 0.1, 5.0],
        llms=[llm("A", model="gpt-4", slots=1, service={"kind": "deterministic", "mean_s": 0.5}),
              llm("B", model="gpt-4", slots=1, service={"kind": "deterministic", "mean_s": 100})],
        users={"patience_s": {"kind": "deterministic", "mean": 1.0}},
        feedback={"probability": 1.0, "delay_s": {"kind": "deterministic", "mean": 0.01}},
        run={"drain_s": 0.0},
    )
    pol = Scripted([Decision("B"), Decision("A"), Decision("A")], escalate=Decision("B"))
    req = run(sc, pol).requests
    assert req.row(1, named=True)["feedback_s"] == pytest.approx(1.61)
    assert pol.feedback_seen_at[2] == 1


def test_requests_are_billed_at_the_prices_they_were_routed_at(tmp_path):
    # Request 1 arrives at 0.5 and queues behind request 0; gpt-4's price rises tenfold at
    # 0.8, before it starts. Its reference cost is priced at arrival, so an always-reference
    # router must cost 100% of the reference (before: 375.6%, billed at service start). (No
    # retries here: a retry is a new call, billed at the prices when it is routed.)
    sc = traced(
        tmp_path, [0.0, 0.5, 5.0],
        llms=[llm("A", model="gpt-4", slots=1, service=DET_1S)],
        events=[{"at_s": 0.8, "price_change": {"llm": "A", "price_in_per_mtok": 100.0,
                                               "price_out_per_mtok": 300.0}}],
        run={"drain_s": None},
    )
    res = run(sc, Always("A"))
    req = res.requests
    assert req["start_s"].to_list() == [0.0, 1.0, 5.0]
    np.testing.assert_allclose(req["cost_usd"].to_numpy(), req["ref_cost_usd"].to_numpy())
    s = summarize(req, res.timeline, sc, "always", sc.seed)
    assert s["cost_pct_of_reference"] == pytest.approx(100.0)


@pytest.mark.parametrize("fan_out", [False, True])
def test_a_retried_request_keeps_the_wait_of_its_first_round(tmp_path, fan_out):
    # Request 2 queues 0.9 s at A (and B, fanned out) behind requests 0 and 1, starts at
    # 1.0, fails in the outage at 1.5 and is retried on C (and D) with no wait. Its wait is
    # 0.9 s either way; before, the fan-out's retry overwrote it with the last round's 0.
    sc = traced(
        tmp_path, [0.0, 0.0, 0.1],
        llms=[llm(n, model="gpt-4", slots=1, service=DET_1S) for n in "ABCD"],
        events=[{"at_s": 1.5, "outage": {"llm": "A", "duration_s": 0.1}},
                {"at_s": 1.5, "outage": {"llm": "B", "duration_s": 0.1}}],
        run={"drain_s": None, "max_retries": 1},
    )
    extra = ("B",) if fan_out else ()
    retry = Decision("C", extra=("D",) if fan_out else ())
    plan = [Decision("A"), Decision("B"), Decision("A", extra=extra)]
    r2 = run(sc, Scripted(plan, retry=retry)).requests.row(2, named=True)
    assert (r2["outcome"], r2["retries"], r2["start_s"]) == ("completed", 1, 1.5)
    assert r2["wait_s"] == pytest.approx(0.9)


def test_an_in_flight_fan_out_waits_as_long_as_its_longest_copy(tmp_path):
    # Both copies of request 2 queue from 0.1 until the run ends at 10: 9.9 s, not the
    # 19.8 s of the two copies summed.
    slow = {"kind": "deterministic", "mean_s": 100.0}
    sc = traced(
        tmp_path, [0.0, 0.0, 0.1], duration_s=1.0,
        llms=[llm(n, model="gpt-4", slots=1, service=slow) for n in "AB"],
        run={"drain_s": 9.0},
    )
    plan = [Decision("A"), Decision("B"), Decision("A", extra=("B",))]
    res = run(sc, Scripted(plan))
    r2 = res.requests.row(2, named=True)
    assert r2["outcome"] == "in_flight" and res.end_s == 10.0
    assert r2["wait_s"] == pytest.approx(9.9)


def _det(mean_s: float) -> dict:
    return {"kind": "deterministic", "mean_s": mean_s}


@pytest.mark.parametrize("fan_out", [False, True])
def test_a_retry_keeps_only_the_patience_left(tmp_path, fan_out):
    # Request 4 queues 0.9 s at A (and B) behind requests 0 and 1, is served from 1.0 and
    # fails at 1.5; its retry on C (and D) queues behind requests 2 and 3 with 2.0 - 0.9 =
    # 1.1 s of patience left, so it gives up at 2.6 having waited 2.0 s in all. Before, a
    # fan-out's retry got the full 2.0 s again (wait 2.9 s, beyond the user's patience).
    sc = traced(
        tmp_path, [0.0, 0.0, 0.0, 0.0, 0.1],
        llms=[llm(n, model="gpt-4", slots=1, service=_det(1.0 if n in "AB" else 50.0))
              for n in "ABCD"],
        events=[{"at_s": 1.5, "outage": {"llm": "A", "duration_s": 0.1}},
                {"at_s": 1.5, "outage": {"llm": "B", "duration_s": 0.1}}],
        users={"patience_s": {"kind": "deterministic", "mean": 2.0}},
        run={"drain_s": None, "max_retries": 1},
    )
    extra = ("B",) if fan_out else ()
    plan = [Decision(n) for n in "ABCD"] + [Decision("A", extra=extra)]
    retry = Decision("C", extra=("D",) if fan_out else ())
    r4 = run(sc, Scripted(plan, retry=retry)).requests.row(4, named=True)
    assert (r4["outcome"], r4["retries"]) == ("abandoned", 1)
    assert r4["end_s"] == pytest.approx(2.6) and r4["wait_s"] == pytest.approx(2.0)


@pytest.mark.parametrize("keep", ["best_realised", "best_judged"])
def test_a_fan_out_waits_as_long_as_its_longest_copy_completed_or_not(tmp_path, keep):
    # Request 1's copy on A starts at once; its copy on B queues behind request 0 until 3.0.
    # The user waits for both: 2.9 s, whether the run sees it complete (at 6.0) or ends
    # while it is in flight (at 5.0). Before, a completed one counted only the kept copy's
    # wait (A's, 0).
    def requests(**kw):
        sc = traced(
            tmp_path, [0.0, 0.1],
            llms=[llm("A", model="gpt-4", slots=1, service=_det(1.0)),
                  llm("B", model="gpt-4", slots=1, service=_det(3.0))],
            judge={"noise": 0.0}, **kw,
        )
        return run(sc, Scripted([Decision("B"), Decision("A", extra=("B",), keep=keep)]))

    done = requests(run={"drain_s": None}).requests.row(1, named=True)
    cut = requests(duration_s=1.0, run={"drain_s": 4.0}).requests.row(1, named=True)
    assert (done["outcome"], done["end_s"]) == ("completed", 6.0)
    assert cut["outcome"] == "in_flight"
    assert done["wait_s"] == pytest.approx(2.9) and cut["wait_s"] == pytest.approx(2.9)


def test_a_lone_answer_of_a_best_judged_fan_out_is_not_judged(tmp_path):
    # The extra copy goes to B, which is down: A's is the only answer, kept unjudged, so the
    # request costs what A's answer costs (as in the offline evaluator). Before, the engine
    # billed the judge ($0.01) for it.
    costs = []
    for extra in ((), ("B",)):
        sc = traced(
            tmp_path, [0.5],
            llms=[llm(n, model="gpt-4", slots=1, service=_det(1.0)) for n in "AB"],
            events=[{"at_s": 0.0, "outage": {"llm": "B", "duration_s": 5.0}}],
            judge={"noise": 0.0, "cost_usd": 0.01},
            run={"drain_s": None},
        )
        # (Always: no on_answer, so a single answer is not sent to the judge for a cascade.)
        res = run(sc, Always("A", extra=extra, keep="best_judged"))
        costs.append(res.requests.row(0, named=True)["cost_usd"])
    assert costs[1] == pytest.approx(costs[0])


def test_an_escalated_answer_in_hand_survives_a_fan_out_retry_that_gives_up(tmp_path):
    # Request 1: A answers at 0.6 and it is escalated to B, which fails in the outage at 1.0;
    # the retry fans out to C and D, both busy, and the user gives up. A's answer was paid
    # for and is in hand: the request completes with it, as a single-copy retry does.
    sc = traced(
        tmp_path, [0.0, 0.1],
        llms=[llm("A", model="gpt-4", slots=1, service=_det(0.5)),
              llm("B", model="gpt-4", slots=1, service=_det(5.0)),
              llm("C", model="gpt-4", slots=1, service=_det(50.0)),
              llm("D", model="gpt-4", slots=1, service=_det(50.0))],
        events=[{"at_s": 1.0, "outage": {"llm": "B", "duration_s": 0.5}}],
        users={"patience_s": {"kind": "deterministic", "mean": 2.0}},
        run={"drain_s": None, "max_retries": 1},
    )
    for retry in (Decision("C"), Decision("C", extra=("D",))):
        pol = Scripted([Decision("C", extra=("D",)), Decision("A")], retry=retry,
                       escalate=Decision("B"))
        r1 = run(sc, pol).requests.row(1, named=True)
        assert (r1["outcome"], r1["llm"], r1["retries"]) == ("completed", "A", 1)


def test_the_retry_wake_up_is_not_a_float_short_of_the_deadline(tmp_path):
    # As the fan-out retry test, with an outage at 0.4 and a deadline at 0.1 + 1.7 = 1.8:
    # 0.4 + (1.8 - 0.4) is 1.7999999999999998 in floats, and a wake-up there found nothing
    # expired, so the retry waited for the arrival at 5.0 (and pushed request 2 back).
    sc = traced(
        tmp_path, [0.0, 0.1, 5.0],
        llms=[llm("A", model="gpt-4", slots=1, service=DET_1S),
              llm("B", model="gpt-4", slots=1, service=_det(10.0))],
        events=[{"at_s": 0.4, "outage": {"llm": "A", "duration_s": 0.1}}],
        users={"patience_s": {"kind": "deterministic", "mean": 1.7}},
        run={"drain_s": None, "max_retries": 2, "sample_every_s": 10.0},
    )
    plan = [Decision("B"), Decision("A", extra=("B",)), Decision("A")]
    req = run(sc, Scripted(plan, retry=Decision("A"))).requests
    assert req.row(1, named=True)["start_s"] == pytest.approx(1.8)
    assert (req.row(2, named=True)["start_s"], req.row(2, named=True)["wait_s"]) == (5.0, 0.0)


def test_an_answer_in_hand_is_kept_through_several_fan_out_rounds(tmp_path):
    # Request 2: A answers at 0.6 and it is escalated to E, which fails at 1.0. With A's
    # answer in hand, the retry asks on_answer again (not route): round 2 fans out to B
    # (served, fails at 1.5) and C (busy), retried when C's copy gives up at 5.0. Round 3
    # (C and D, both busy, no patience left) gives up too. A's answer, in hand all along,
    # is what the user gets.
    class Rounds(Scripted):
        def route(self, query, view):
            assert query.attempt == 0, "a request with an answer in hand was routed afresh"
            return self.plan[query.id]

        def on_answer(self, query, answer, view):
            if query.id != 2:
                return None
            assert answer.llm == "A"
            return {1: Decision("E"), 2: Decision("B", extra=("C",))}.get(
                query.attempt, Decision("C", extra=("D",)))

    sc = traced(
        tmp_path, [0.0, 0.0, 0.1],
        llms=[llm("A", model="gpt-4", slots=1, service=_det(0.5)),
              llm("B", model="gpt-4", slots=1, service=_det(5.0)),
              llm("C", model="gpt-4", slots=1, service=_det(50.0)),
              llm("D", model="gpt-4", slots=1, service=_det(50.0)),
              llm("E", model="gpt-4", slots=1, service=_det(5.0))],
        events=[{"at_s": 1.0, "outage": {"llm": "E", "duration_s": 0.2}},
                {"at_s": 1.5, "outage": {"llm": "B", "duration_s": 0.2}}],
        users={"patience_s": {"kind": "deterministic", "mean": 4.0}},
        run={"drain_s": None, "max_retries": 3, "sample_every_s": 50.0},
    )
    r2 = run(sc, Rounds([Decision("C"), Decision("D"), Decision("A")])).requests.row(
        2, named=True)
    assert (r2["outcome"], r2["llm"], r2["retries"]) == ("completed", "A", 2)
    assert r2["wait_s"] == pytest.approx(4.0)  # all of the user's patience, no more


def test_a_keep_primary_round_waits_only_for_its_primary(tmp_path):
    # The primary copy on A starts at once and answers at 5.1; the extra copy on B queued
    # 0.9 s behind request 0 before it ran. The user got the primary's answer: wait 0.
    sc = traced(
        tmp_path, [0.0, 0.1],
        llms=[llm("A", model="gpt-4", slots=1, service=_det(5.0)),
              llm("B", model="gpt-4", slots=1, service=DET_1S)],
        run={"drain_s": None},
    )
    plan = [Decision("B"), Decision("A", extra=("B",), keep="primary")]
    r1 = run(sc, Scripted(plan)).requests.row(1, named=True)
    assert (r1["outcome"], r1["llm"], r1["end_s"]) == ("completed", "A", pytest.approx(5.1))
    assert r1["wait_s"] == 0.0


def test_a_round_ends_when_its_last_copy_ends_not_when_that_is_noticed(tmp_path):
    # Request 1's copy on A answers at 3.1; its copy on B gave up at 1.1, which nothing
    # notices before the arrival at 5.0. The request ends at 3.1 with A's answer, not at
    # 1.1 (before the answer existed) or 5.0.
    sc = traced(
        tmp_path, [0.0, 0.1, 5.0],
        llms=[llm("A", model="gpt-4", slots=1, service=_det(3.0)),
              llm("B", model="gpt-4", slots=1, service=_det(10.0))],
        users={"patience_s": {"kind": "deterministic", "mean": 1.0}},
        run={"drain_s": None, "sample_every_s": 100.0},
    )
    plan = [Decision("B"), Decision("A", extra=("B",), keep="best_realised"), Decision("A")]
    r1 = run(sc, Scripted(plan)).requests.row(1, named=True)
    assert (r1["outcome"], r1["llm"]) == ("completed", "A")
    assert r1["end_s"] == pytest.approx(3.1) and r1["wait_s"] == pytest.approx(1.0)


@pytest.mark.parametrize("split", ["test", "validation", "train", "all"])
def test_policies_never_learn_from_the_rows_arrivals_sample(split):
    # Before, policies learned from every train and validation row whatever
    # workload.split was: with split: validation a kNN router was scored on the very
    # answers it had been fitted and calibrated on.
    from sim.errors import PolicyError

    sc = scenario(workload={"source": "synthetic", "reference_llm": "gpt-4",
                            "n_queries": 600, "split": split})
    wl = build_workload(sc, sc.seed)
    inputs = prepare_inputs(sc, wl, sc.seed)
    for name in ("least_loaded", "knn"):
        pol = registry.create(name)
        if split == "all" and name == "knn":
            with pytest.raises(PolicyError, match="training rows") as err:
                Simulation(sc, pol, inputs, seed=sc.seed)
            assert err.value.field == "workload.split"
            continue
        Simulation(sc, pol, inputs, seed=sc.seed)
        assert not np.isin(inputs.rows, pol.ctx.train.rows).any()
        assert (len(pol.ctx.train.rows) == 0) == (split == "all")


class CascadeLog(BasePolicy):
    """A two-step cascade A -> (B, else C) that logs every call the engine makes to it."""

    name = "cascade_log_test"

    def __init__(self, escalation=None):
        super().__init__()
        self.calls = []
        self.escalation = escalation

    def route(self, query, view):
        self.calls.append(("route", query.id, query.attempt))
        return Decision("A")

    def on_answer(self, query, answer, view):
        self.calls.append(("on_answer", query.id, query.attempt, answer.llm))
        if answer.llm != "A":
            return None
        if self.escalation is not None:
            return self.escalation
        up = {n for n, ok in zip(view.names, view.up, strict=True) if ok}
        return next((Decision(n) for n in ("B", "C") if n in up), None)


def _cascade_scenario(tmp_path, events, **kw):
    return traced(
        tmp_path, [0.0],
        llms=[llm("A", model="gpt-4", slots=1, service=_det(1.0)),
              llm("B", model="gpt-4", slots=1, service=_det(5.0)),
              llm("C", model="gpt-4", slots=1, service=_det(2.0))],
        events=events, judge={"noise": 0.0, "cost_usd": 0.01},
        run={"drain_s": None, "max_retries": 2}, **kw,
    )


def test_a_failed_escalation_is_decided_again_from_the_answer_in_hand(tmp_path):
    # A answers at 1.0 and is escalated to B, which fails in the outage at 3.0. Before, the
    # retry went back to route: A was called, paid and judged again before escalating again.
    # Now on_answer decides again on A's answer (judged once): C, up, answers at 5.0.
    sc = _cascade_scenario(tmp_path, [{"at_s": 3.0, "outage": {"llm": "B", "duration_s": 5.0}}])
    pol = CascadeLog()
    res = run(sc, pol)
    r = res.requests.row(0, named=True)
    assert pol.calls == [("route", 0, 0), ("on_answer", 0, 1, "A"), ("on_answer", 0, 2, "A"),
                         ("on_answer", 0, 3, "C")]
    assert (r["outcome"], r["llm"], r["attempts"], r["retries"]) == ("completed", "C", 3, 1)
    assert r["end_s"] == pytest.approx(5.0)
    wl = build_workload(sc, sc.seed)
    row, col = int(r["row"]), wl.models.index("gpt-4")
    call = (wl.input_tokens[row] * 10.0 + wl.output_tokens[row, col] * 30.0) / 1e6
    assert r["cost_usd"] == pytest.approx(2 * call + 2 * 0.01)  # A and C, both judged


def test_an_escalation_queued_at_a_removed_llm_is_decided_again_not_routed_afresh(tmp_path):
    # Request 1's answer from A (1.0 -> 2.0) is escalated to B, busy with request 0 until
    # 5.0; B is removed at 3.0. The re-offer asks on_answer about A's answer (C is chosen)
    # instead of routing to A again.
    sc = traced(
        tmp_path, [0.0, 1.0],
        llms=[llm("A", model="gpt-4", slots=1, service=_det(1.0)),
              llm("B", model="gpt-4", slots=1, service=_det(5.0)),
              llm("C", model="gpt-4", slots=1, service=_det(2.0))],
        events=[{"at_s": 3.0, "remove_llm": "B"}], judge={"noise": 0.0},
        run={"drain_s": None},
    )

    class FirstToB(CascadeLog):
        def route(self, query, view):
            self.calls.append(("route", query.id, query.attempt))
            return Decision("B") if query.id == 0 else Decision("A")

        def on_answer(self, query, answer, view):
            if query.id == 0:
                return None
            return super().on_answer(query, answer, view)

    pol = FirstToB()
    r1 = run(sc, pol).requests.row(1, named=True)
    assert [c for c in pol.calls if c[1] == 1] == [
        ("route", 1, 0), ("on_answer", 1, 1, "A"), ("on_answer", 1, 2, "A"),
        ("on_answer", 1, 3, "C")]
    assert (r1["outcome"], r1["llm"], r1["attempts"]) == ("completed", "C", 3)
    assert r1["end_s"] == pytest.approx(5.0)


def test_an_escalation_that_fans_out_is_a_fan_out_round(tmp_path):
    # on_answer may return any decision: its extra LLMs were dropped by the engine (which
    # called B only), while the offline evaluator called B and C and kept the better answer.
    sc = _cascade_scenario(tmp_path, [])
    pol = CascadeLog(escalation=Decision("B", extra=("C",), keep="best_realised"))
    r = run(sc, pol).requests.row(0, named=True)
    assert (r["outcome"], r["attempts"]) == ("completed", 3)
    assert r["end_s"] == pytest.approx(6.0)  # the round waits for B (5 s) and C (2 s)
    assert pol.calls == [("route", 0, 0), ("on_answer", 0, 1, "A")]  # a fan-out ends it


@pytest.mark.parametrize("a_service,outage,end_s", [
    # A is down throughout: copies on B (1 s) and C (20 s) run; B's answer is delivered at
    # 1.5. Before, the request ended when C's copy did (20.5).
    (1.0, {"at_s": 0.0, "outage": {"llm": "A", "duration_s": 100.0}}, 1.5),
    # B answers at 1.5 while A still runs; A fails in the outage at 3.0: B's answer is
    # delivered when the primary is known lost, not before and not later (or retried).
    (10.0, {"at_s": 3.0, "outage": {"llm": "A", "duration_s": 1.0}}, 3.0),
])
def test_a_lost_primary_is_replaced_by_the_first_other_answer(tmp_path, a_service, outage,
                                                              end_s):
    sc = traced(
        tmp_path, [0.5],
        llms=[llm("A", model="gpt-4", service=_det(a_service)),
              llm("B", model="gpt-4", service=_det(1.0)),
              llm("C", model="gpt-4", service=_det(20.0))],
        events=[outage], run={"drain_s": None, "max_retries": 2},
    )
    r = run(sc, Always("A", extra=("B", "C"), keep="primary")).requests.row(0, named=True)
    assert (r["outcome"], r["llm"], r["end_s"], r["latency_s"], r["retries"]) == (
        "completed", "B", pytest.approx(end_s), pytest.approx(end_s - 0.5), 0)
    assert r["cost_usd"] > 0 and r["wait_s"] == 0.0


@pytest.mark.parametrize("previous", [0.2, 1.5])
def test_an_arrival_at_an_outage_end_sees_the_deployment_up(tmp_path, previous):
    # Outage [1, 2). Ties used to go by creation order: a request at 2.0 was rejected when
    # the previous one came before the outage began (its arrival event was older than the
    # recovery) and served when it came during it.
    sc = traced(
        tmp_path, [previous, 2.0],
        llms=[llm("A", model="gpt-4", service=_det(0.1))],
        events=[{"at_s": 1.0, "outage": {"llm": "A", "duration_s": 1.0}}],
        run={"drain_s": None, "max_retries": 0},
    )
    r = run(sc, Always("A")).requests.row(1, named=True)
    assert (r["outcome"], r["start_s"]) == ("completed", 2.0)


def test_a_job_ending_as_an_outage_starts_is_completed_not_failed(tmp_path):
    sc = traced(
        tmp_path, [0.0],
        llms=[llm("A", model="gpt-4", service=_det(1.0))],
        events=[{"at_s": 1.0, "outage": {"llm": "A", "duration_s": 0.5}}],
        run={"drain_s": None, "max_retries": 0},
    )
    r = run(sc, Always("A")).requests.row(0, named=True)
    assert (r["outcome"], r["end_s"]) == ("completed", 1.0)


@pytest.mark.parametrize("service_s", [1.0, 0.3])
def test_an_arrival_as_a_job_completes_finds_its_slot_free(tmp_path, service_s):
    # One slot and no queue: request 1 arrives exactly as request 0 ends. Completions come
    # before arrivals at the same time, so it is served at once, not rejected.
    sc = traced(
        tmp_path, [0.0, service_s],
        llms=[llm("A", model="gpt-4", replicas=1, slots=1, max_queue=0,
                  service=_det(service_s))],
        run={"drain_s": None},
    )
    req = run(sc, Always("A")).requests
    assert req["outcome"].to_list() == ["completed", "completed"]
    assert req["end_s"][0] == req["start_s"][1] == req["arrival_s"][1]


def test_arrivals_at_a_repeated_trace_time_keep_the_clock_going_forward(tmp_path):
    # 0.3 + (0.9 - 0.3) rounds to one ulp above 0.9: the arrival at 0.9 was scheduled as a
    # delay from the one before, so the next one, at 0.9 again, had a negative delay (a
    # crash) or moved the clock back.
    sc = traced(tmp_path, [0.3, 0.9, 0.9], llms=[llm("A", model="gpt-4")],
                run={"drain_s": None})
    req = run(sc, Always("A")).requests
    assert req["outcome"].to_list() == ["completed"] * 3
    assert req["start_s"].to_list() == [0.3, 0.9, 0.9] == req["arrival_s"].to_list()


def test_unsorted_arrival_times_are_refused():
    sc = scenario(duration_s=20.0)
    wl = build_workload(sc, 1)
    inputs = prepare_inputs(sc, wl, 1)
    inputs.arrival_s[[1, 2]] = inputs.arrival_s[[2, 1]]
    with pytest.raises(RouteSimError, match="must be sorted") as err:
        Simulation(sc, Always("gpt-4"), inputs, seed=1)
    assert err.value.field == "inputs.arrival_s"


class ScoresOf(BasePolicy):
    name = "scores_of_test"

    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def route(self, query, view):
        return Decision(view.names[0], scores=self.scores)


@pytest.mark.parametrize("scores", [[None, 0.5], ["0.5", "0.25"]])
def test_a_score_that_is_not_a_number_is_a_clear_error(scores):
    sc = scenario(duration_s=5.0)
    with pytest.raises(RouteSimError, match="scores must be numbers") as err:
        run(sc, ScoresOf(scores))
    assert err.value.field == "decision.scores"


@pytest.mark.parametrize("primary,extra", [("A", "B"), ("B", "A")])
def test_an_abandoned_fan_out_is_recorded_at_its_primary(tmp_path, primary, extra):
    # Both copies queue behind requests 0 and 1 and give up together at 2.1; the request
    # was recorded at A (the first deployment in cluster order) whichever was the primary.
    sc = traced(
        tmp_path, [0.0, 0.0, 0.1, 5.0],
        llms=[llm(n, model="gpt-4", slots=1, service=_det(10.0)) for n in "AB"],
        users={"patience_s": {"kind": "deterministic", "mean": 2.0}},
        run={"drain_s": None},
    )
    plan = [Decision("A"), Decision("B"), Decision(primary, extra=(extra,)), Decision("A")]
    r2 = run(sc, Scripted(plan)).requests.row(2, named=True)
    assert (r2["outcome"], r2["llm"]) == ("abandoned", primary)


@pytest.mark.parametrize("event", [
    {"at_s": 1.0, "outage": {"llm": "A", "duration_s": 0.5}},
    {"at_s": 1.0, "remove_llm": "A"},
])
def test_a_slot_freed_as_an_event_strikes_is_filled_after_it(tmp_path, event):
    # Request 0 ends on A exactly when A goes down (or is removed); request 1 is queued
    # behind it. Completing first must not start request 1 on A just before the event
    # fails it (or leaves it on a removed deployment): it waits for A to be back at 1.5,
    # or is re-offered (to B).
    sc = traced(
        tmp_path, [0.0, 0.1],
        llms=[llm("A", model="gpt-4", slots=1, service=_det(1.0)),
              llm("B", model="gpt-4", slots=1, service=_det(1.0))],
        events=[event], run={"drain_s": None, "max_retries": 0},
    )
    plan = [Decision("A"), Decision("A")]
    req = run(sc, Scripted(plan, retry=Decision("B"))).requests
    r0, r1 = req.row(0, named=True), req.row(1, named=True)
    assert (r0["outcome"], r0["end_s"]) == ("completed", 1.0)
    expected = ("A", 1.5) if "outage" in event else ("B", 1.0)
    assert (r1["outcome"], r1["retries"], r1["llm"], r1["start_s"]) == (
        "completed", 0, *expected)


def test_a_lost_primarys_wait_ignores_copies_whose_answer_was_not_kept(tmp_path):
    # A is down, so request 1's primary is rejected; its copy on B answers at 5.1 and is
    # kept. Its copy on C queued behind request 0: 2.9 s if C frees at 3.0, not at all if
    # at 5.5. The user's wait must not depend on that unused copy.
    waits = []
    for c_service in (3.0, 5.5):
        sc = traced(
            tmp_path, [0.0, 0.1],
            llms=[llm("A", model="gpt-4", service=_det(1.0)),
                  llm("B", model="gpt-4", slots=1, service=_det(5.0)),
                  llm("C", model="gpt-4", slots=1, service=_det(c_service))],
            events=[{"at_s": 0.0, "outage": {"llm": "A", "duration_s": 100.0}}],
            run={"drain_s": None},
        )
        plan = [Decision("C"), Decision("A", extra=("B", "C"), keep="primary")]
        r1 = run(sc, Scripted(plan)).requests.row(1, named=True)
        assert (r1["llm"], r1["end_s"]) == ("B", pytest.approx(5.1))
        waits.append(r1["wait_s"])
    assert waits == [0.0, 0.0]


class _FailsAfter(Always):
    """Routes like Always, then raises on the n-th query."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.seen = n, 0

    def route(self, query, view):
        self.seen += 1
        if self.seen == self.n:
            raise RuntimeError("policy failed mid-run")
        return super().route(query, view)


@pytest.mark.parametrize("fails", [False, True])
def test_a_run_restores_the_processs_garbage_collector_settings(fails):
    import gc

    import sim.engine as engine

    before = gc.get_threshold()
    seen = []
    sc = scenario(duration_s=60, llms=[llm("gpt-4", slots=100)], run={"drain_s": None})
    policy = _FailsAfter(5 if fails else 10**9)
    real_route = policy.route

    def route(query, view):  # the thresholds in force while the run is going
        seen.append(gc.get_threshold())
        return real_route(query, view)

    policy.route = route
    try:
        gc.set_threshold(123, 4, 5)
        if fails:
            with pytest.raises(RuntimeError, match="policy failed mid-run"):
                run(sc, policy)
        else:
            run(sc, policy)
        assert gc.get_threshold() == (123, 4, 5)
    finally:
        gc.set_threshold(*before)
    assert seen and set(seen) == {(engine.GC_YOUNG_THRESHOLD, 4, 5)}

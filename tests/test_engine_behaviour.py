"""Request lifecycle mechanics: outages, removal, rejection, abandonment, prices, top-k,
cascades, feedback timing, batching, and common random numbers across policies."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from helpers import llm, scenario
from policies import registry
from policies.base import BasePolicy
from sim.engine import Simulation, prepare_inputs
from sim.metrics import SUMMARY_KEYS, summarize
from sim.runner import build_workload
from sim.types import Decision


class Fixed(BasePolicy):
    """Always the first listed preference that is present (test helper)."""

    name = "fixed_test"

    def __init__(self, prefs=("gpt-4",), extra=(), keep="primary"):
        super().__init__()
        self.prefs, self.extra, self.keep = prefs, extra, keep
        self.fb = []
        self.offers = []

    def route(self, query, view):
        self.offers.append((query.id, query.attempt, view.now))
        for p in self.prefs:
            if p in view.names:
                extra = tuple(e for e in self.extra if e in view.names and e != p)
                return Decision(p, extra=extra, keep=self.keep)
        return Decision(view.names[0])

    def feedback(self, fb):
        # Index of the next decision: feedback must reach the policy before it.
        self.fb.append((fb, len(self.offers)))


def run(sc, policy):
    wl = build_workload(sc, sc.seed)
    inputs = prepare_inputs(sc, wl, sc.seed)
    sim = Simulation(sc, policy, inputs, seed=sc.seed)
    res = sim.run()
    return res, inputs


def test_outage_fails_running_jobs_and_retries_elsewhere():
    sc = scenario(
        duration_s=100,
        arrivals={"kind": "poisson", "rate_per_s": 3.0},
        llms=[llm("gpt-4", slots=50, decode_tps=2), llm("mistral-7b", slots=50)],
        events=[{"at_s": 50, "outage": {"llm": "gpt-4", "duration_s": 1000}}],
        run={"drain_s": None, "max_retries": 1},
    )
    res, _ = run(sc, Fixed(prefs=("gpt-4", "mistral-7b")))
    req = res.requests
    retried = req.filter(pl.col("retries") > 0)
    assert retried.height > 0
    # Fixed keeps choosing gpt-4 although the view says it is down: the retry is rejected.
    assert set(retried["outcome"].unique()) == {"rejected"}
    assert "outage" in res.events["kind"].to_list()


def test_outage_without_retries_records_failed():
    sc = scenario(
        duration_s=60,
        arrivals={"kind": "poisson", "rate_per_s": 2.0},
        llms=[llm("gpt-4", slots=100, decode_tps=1)],
        events=[{"at_s": 30, "outage": {"llm": "gpt-4", "duration_s": 5}}],
        run={"drain_s": None, "max_retries": 0},
    )
    res, _ = run(sc, registry.create("random"))
    failed = res.requests.filter(pl.col("outcome") == "failed")
    assert failed.height > 0
    assert (failed["end_s"] == 30.0).all()


def test_removed_llm_queue_is_reoffered():
    sc = scenario(
        duration_s=100,
        arrivals={"kind": "poisson", "rate_per_s": 5.0},
        llms=[llm("gpt-4", slots=1, decode_tps=5), llm("mistral-7b", slots=50)],
        events=[{"at_s": 50, "remove_llm": "gpt-4"}],
        run={"drain_s": None},
    )
    pol = Fixed(prefs=("gpt-4", "mistral-7b"))
    res, _ = run(sc, pol)
    reoffers = [o for o in pol.offers if o[1] > 0]
    assert reoffers and all(t == pytest.approx(50.0) for _, _, t in reoffers)
    req = res.requests
    moved = req.filter(pl.col("attempts") > 1)
    assert moved.height == len(reoffers)
    assert (moved["llm"] == "mistral-7b").all()
    assert req.filter((pl.col("arrival_s") > 50) & (pl.col("llm") == "gpt-4")).height == 0


def test_full_queue_rejects():
    sc = scenario(
        duration_s=100,
        arrivals={"kind": "poisson", "rate_per_s": 5.0},
        llms=[llm("gpt-4", slots=1, max_queue=0, decode_tps=5)],
        run={"drain_s": None},
    )
    res, _ = run(sc, registry.create("random"))
    req = res.requests
    rej = req.filter(pl.col("outcome") == "rejected")
    assert rej.height > 0 and (rej["wait_s"] == 0).all() and (rej["cost_usd"] == 0).all()


def test_impatient_users_abandon_at_their_deadline():
    sc = scenario(
        duration_s=200,
        arrivals={"kind": "poisson", "rate_per_s": 5.0},
        llms=[llm("gpt-4", slots=1, decode_tps=5)],
        users={"patience_s": {"kind": "deterministic", "mean": 3.0}},
        run={"drain_s": None},
    )
    res, _ = run(sc, registry.create("random"))
    ab = res.requests.filter(pl.col("outcome") == "abandoned")
    assert ab.height > 0
    # Patience is deterministic 3 s: the wait of an abandoned request is exactly 3 s.
    assert np.allclose(ab["wait_s"].to_numpy(), 3.0)
    assert np.allclose((ab["end_s"] - ab["arrival_s"]).to_numpy(), 3.0)
    done = res.requests.filter(pl.col("outcome") == "completed")
    assert (done["wait_s"] <= 3.0 + 1e-9).all()


def test_price_change_changes_cost():
    base = dict(duration_s=200, arrivals={"kind": "poisson", "rate_per_s": 1.0},
                llms=[llm("gpt-4", slots=100)], run={"drain_s": None})
    sc = scenario(**base, events=[{"at_s": 100, "price_change": {
        "llm": "gpt-4", "price_in_per_mtok": 0.0, "price_out_per_mtok": 0.0}}])
    res, _ = run(sc, registry.create("random"))
    req = res.requests.filter(pl.col("outcome") == "completed")
    assert (req.filter(pl.col("start_s") >= 100)["cost_usd"] == 0).all()
    assert (req.filter(pl.col("start_s") < 100)["cost_usd"] > 0).all()


class PriceWatcher(Fixed):
    """Records every on_price_changed call and the view prices of the next decision."""

    name = "price_watcher_test"

    def __init__(self):
        super().__init__(prefs=("gpt-4",))
        self.changes = []  # (LLMInfo, index of the next decision)
        self.seen = []  # (view.now, gpt-4's in price, mistral-7b's in price) per decision

    def route(self, query, view):
        self.seen.append((view.now, *view.price_in_per_mtok[[view.index("gpt-4"),
                                                             view.index("mistral-7b")]]))
        return super().route(query, view)

    def on_price_changed(self, llm):
        self.changes.append((llm, len(self.seen)))


def test_price_change_fires_the_policy_hook_once_per_event_with_the_new_prices():
    sc = scenario(duration_s=300, llms=[llm("gpt-4", slots=100), llm("mistral-7b", slots=100)],
                  run={"drain_s": None},
                  events=[{"at_s": 100, "price_change": {"llm": "gpt-4", "price_in_per_mtok": 5.0}},
                          {"at_s": 200, "price_change": {"llm": "mistral-7b",
                                                         "price_in_per_mtok": 1.0,
                                                         "price_out_per_mtok": 2.0}}])
    pol = PriceWatcher()
    run(sc, pol)
    got = [(x.name, x.model, x.price_in_per_mtok, x.price_out_per_mtok) for x, _ in pol.changes]
    # An omitted price keeps its value (gpt-4's output price stays 30).
    assert got == [("gpt-4", "gpt-4", 5.0, 30.0), ("mistral-7b", "mistral-7b", 1.0, 2.0)]
    # Fired between the last decision before the event and the first one after it, when the
    # view already shows the new prices.
    for (info, nxt), at in zip(pol.changes, (100.0, 200.0), strict=True):
        assert pol.seen[nxt - 1][0] < at <= pol.seen[nxt][0]
        col = 1 if info.name == "gpt-4" else 2
        assert pol.seen[nxt][col] == info.price_in_per_mtok


def test_topk_pays_for_every_answer_and_keeps_the_best():
    sc = scenario(duration_s=200, llms=[llm("gpt-4", slots=100),
                                        llm("mistral-7b", slots=100, price_in_per_mtok=0.2,
                                            price_out_per_mtok=0.2)],
                  run={"drain_s": None})
    res1, inputs = run(sc, Fixed(prefs=("mistral-7b",)))
    res2, _ = run(sc, Fixed(prefs=("mistral-7b",), extra=("gpt-4",), keep="best_realised"))
    a, b = res1.requests, res2.requests
    assert (b["attempts"] == 2).all()
    assert (b["cost_usd"] > a["cost_usd"]).all()
    # Best realised is the better of the two answers: mistral's (run a) and gpt-4's, which
    # is the reference, so its answer's quality is ref_quality.
    best = np.maximum(a["quality"].to_numpy(), b["ref_quality"].to_numpy())
    np.testing.assert_array_equal(b["quality"].to_numpy(), best)


class Escalate(BasePolicy):
    """Cheapest first; escalate to gpt-4 whenever the judge score is below 0.5."""

    name = "escalate_test"

    def route(self, query, view):
        return Decision("mistral-7b")

    def on_answer(self, query, answer, view):
        if answer.llm == "mistral-7b" and answer.judge_score < 0.5:
            return Decision("gpt-4")
        return None


def test_cascade_escalation_queues_and_pays_each_attempt():
    sc = scenario(duration_s=300, llms=[llm("gpt-4", slots=100),
                                        llm("mistral-7b", slots=100, price_in_per_mtok=0.2,
                                            price_out_per_mtok=0.2)],
                  judge={"noise": 0.0}, run={"drain_s": None})
    res, _ = run(sc, Escalate())
    req = res.requests.filter(pl.col("outcome") == "completed")
    esc = req.filter(pl.col("attempts") == 2)
    one = req.filter(pl.col("attempts") == 1)
    assert esc.height > 0 and one.height > 0
    assert (esc["llm"] == "gpt-4").all() and (one["llm"] == "mistral-7b").all()
    # With a noiseless judge, accepted first answers were good.
    assert (one["quality"] >= 0.5).all()
    assert (esc["latency_s"] > esc["service_s"]).all()


def test_feedback_arrives_after_its_delay():
    sc = scenario(duration_s=300, llms=[llm("gpt-4", slots=100)],
                  feedback={"probability": 1.0, "delay_s": {"kind": "deterministic",
                                                            "mean": 10.0}, "noise": 0.0},
                  run={"drain_s": None})
    pol = Fixed()
    res, _ = run(sc, pol)
    assert pol.fb
    req = res.requests
    for fb, next_offer in pol.fb:
        row = req.row(fb.query_id, named=True)
        assert fb.time_s == pytest.approx(row["end_s"] + 10.0)
        # Delivered after it was sent, and before the first decision after that moment.
        assert pol.offers[next_offer][2] >= fb.time_s
        assert next_offer == 0 or pol.offers[next_offer - 1][2] < fb.time_s
        assert fb.reward == float(row["quality"] >= 0.5)
        assert row["feedback"] == int(fb.reward)


def test_batching_slows_decode():
    base = dict(duration_s=400, arrivals={"kind": "poisson", "rate_per_s": 2.0},
                run={"drain_s": None})
    fast = scenario(**base, llms=[llm("gpt-4", slots=32, batching_slowdown=0.0)])
    slow = scenario(**base, llms=[llm("gpt-4", slots=32, batching_slowdown=0.5)])
    a, _ = run(fast, registry.create("random"))
    b, _ = run(slow, registry.create("random"))
    assert (a.requests["outcome"] == "completed").all()
    assert (b.requests["outcome"] == "completed").all()
    assert b.requests["service_s"].mean() > 1.2 * a.requests["service_s"].mean()


def test_common_random_numbers_across_policies():
    sc = scenario(duration_s=200)
    wl = build_workload(sc, sc.seed)
    i1 = prepare_inputs(sc, wl, sc.seed)
    i2 = prepare_inputs(sc, build_workload(sc, sc.seed), sc.seed)
    assert np.array_equal(i1.arrival_s, i2.arrival_s) and np.array_equal(i1.rows, i2.rows)
    a = Simulation(sc, registry.create("random"), i1, seed=sc.seed).run().requests
    b = Simulation(sc, registry.create("cheapest"), i1, seed=sc.seed).run().requests
    for col in ("arrival_s", "row", "input_tokens", "ref_quality", "ref_cost_usd"):
        assert a[col].equals(b[col])
    assert not a["llm"].equals(b["llm"])


def test_summary_has_every_design_key():
    sc = scenario(duration_s=100, warmup_s=10)
    res, _ = run(sc, registry.create("least_loaded"))
    s = summarize(res.requests, res.timeline, sc, "least_loaded", sc.seed)
    for k in SUMMARY_KEYS:
        assert k in s
    assert abs(sum(s["route_share"].values()) - 1) < 1e-9
    assert set(s["saturation"].values()) <= {"stable", "backlogged", "overloaded"}


def test_overload_is_labelled():
    sc = scenario(duration_s=300, arrivals={"kind": "poisson", "rate_per_s": 5.0},
                  llms=[llm("gpt-4", slots=1, decode_tps=5, max_queue=20),
                        llm("mistral-7b", slots=200)])
    res, _ = run(sc, Fixed(prefs=("gpt-4",)))
    s = summarize(res.requests, res.timeline, sc, "fixed", sc.seed)
    assert s["saturation"]["gpt-4"] == "overloaded"
    assert s["saturation"]["mistral-7b"] == "stable"
    rej = res.requests.filter(pl.col("outcome") == "rejected")
    assert rej.height > 0 and (rej["reject_reason"] == "queue_full").all()


def test_rejections_during_an_outage_are_not_overload():
    # gpt-4 has ample slots for 1 request/s; while it is down every request sent to it is
    # rejected, which says nothing about its load.
    sc = scenario(duration_s=300, arrivals={"kind": "poisson", "rate_per_s": 1.0},
                  llms=[llm("gpt-4", slots=100), llm("mistral-7b", slots=100)],
                  events=[{"at_s": 100, "outage": {"llm": "gpt-4", "duration_s": 100}}],
                  run={"drain_s": None, "max_retries": 0})
    res, _ = run(sc, Fixed(prefs=("gpt-4",)))
    req = res.requests
    rej = req.filter(pl.col("outcome") == "rejected")
    assert rej.height > 50
    assert (rej["reject_reason"] == "down").all() and (rej["llm"] == "gpt-4").all()
    assert req.filter(pl.col("outcome") != "rejected")["reject_reason"].is_null().all()
    s = summarize(req, res.timeline, sc, "fixed", sc.seed)
    assert s["rejected"] == rej.height
    assert s["saturation"]["gpt-4"] == "stable"


class FanOut(BasePolicy):
    """Primary gpt-4, one extra copy on mistral-7b."""

    name = "fan-out"

    def __init__(self, keep: str):
        super().__init__()
        self.keep = keep

    def route(self, query, view):
        return Decision("gpt-4", extra=("mistral-7b",), keep=self.keep)


def fan_out_scenario(**kw):
    # gpt-4 admits one request at a time and queues none: most primary copies are turned
    # away for load; mistral-7b has room for everything.
    return scenario(duration_s=300, arrivals={"kind": "poisson", "rate_per_s": 3.0},
                    llms=[llm("gpt-4", slots=1, max_queue=0, decode_tps=5),
                          llm("mistral-7b", slots=200, price_in_per_mtok=0.2,
                              price_out_per_mtok=0.2)],
                    run={"drain_s": None, "max_retries": 0}, **kw)


def test_load_rejections_of_copies_count_although_the_request_completed():
    sc = fan_out_scenario()
    res, _ = run(sc, FanOut("best_realised"))
    req = res.requests
    assert (req["outcome"] == "completed").all()  # mistral-7b answered every request
    s = summarize(req, res.timeline, sc, "fan-out", sc.seed)
    assert s["rejected"] == 0
    assert s["saturation"]["gpt-4"] == "overloaded"
    assert s["saturation"]["mistral-7b"] == "stable"
    # The timeline's per-job count covers the arrival period after warm-up only.
    final = res.timeline.group_by("llm").agg(pl.col("load_rejected").max())
    counts = dict(final.iter_rows())
    assert counts["mistral-7b"] == 0 and counts["gpt-4"] > 100


def test_a_fan_out_rejected_everywhere_is_recorded_as_its_primary_copy_ended():
    # mistral-7b is down the whole run: its copy is rejected as "down"; gpt-4's primary copy
    # is mostly rejected for a full queue, and that is what the request records.
    sc = fan_out_scenario(events=[{"at_s": 0.0, "outage": {"llm": "mistral-7b",
                                                           "duration_s": 10_000}}])
    res, _ = run(sc, FanOut("best_realised"))
    rej = res.requests.filter(pl.col("outcome") == "rejected")
    assert rej.height > 100
    assert (rej["llm"] == "gpt-4").all() and (rej["reject_reason"] == "queue_full").all()
    s = summarize(res.requests, res.timeline, sc, "fan-out", sc.seed)
    assert s["saturation"] == {"gpt-4": "overloaded", "mistral-7b": "stable"}


class Bare:
    """A policy not built on BasePolicy, with only the required methods."""

    name = "bare"

    def setup(self, ctx):
        pass

    def route(self, query, view):
        return Decision(view.names[0])


def test_a_policy_without_the_price_hook_runs_through_a_price_change():
    sc = scenario(duration_s=100, llms=[llm("gpt-4"), llm("mistral-7b")],
                  events=[{"at_s": 50, "price_change": {"llm": "gpt-4", "price_in_per_mtok": 1.0}}])
    res, _ = run(sc, Bare())
    assert (res.requests["outcome"] == "completed").all()
    assert res.events.filter(pl.col("kind") == "price_change").height == 1


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_best_judged_keeps_the_answer_the_judge_scores_highest(noise):
    sc = scenario(duration_s=200, llms=[llm("gpt-4", slots=100),
                                        llm("mistral-7b", slots=100, price_in_per_mtok=0.2,
                                            price_out_per_mtok=0.2)],
                  judge={"noise": noise}, run={"drain_s": None})
    res, inputs = run(sc, Fixed(prefs=("mistral-7b",), extra=("gpt-4",), keep="best_judged"))
    req = res.requests
    assert res.realised_picks == 0  # a rule a real router can run: not an upper bound
    assert (req["attempts"] == 2).all() and (req["outcome"] == "completed").all()
    wl = inputs.workload
    cols = {name: wl.models.index(name) for name in ("mistral-7b", "gpt-4")}
    picked_gpt4 = 0
    for rid, row in enumerate(inputs.rows):
        # Answer 0 is the primary (mistral-7b), answer 1 the extra copy (gpt-4), round 0.
        scores = [
            min(1.0, max(0.0, float(wl.quality[row, cols[m]])
                         + noise * inputs.judge_normal(rid, 0, a)))
            for a, m in enumerate(("mistral-7b", "gpt-4"))
        ]
        want = "gpt-4" if scores[1] > scores[0] else "mistral-7b"
        assert req["llm"][rid] == want
        picked_gpt4 += want == "gpt-4"
    assert 0 < picked_gpt4 < req.height  # the judge really chose between them
    if noise == 0.0:  # a perfect judge keeps what the realised rule keeps
        best, _ = run(sc, Fixed(prefs=("mistral-7b",), extra=("gpt-4",), keep="best_realised"))
        assert best.requests["quality"].equals(req["quality"])
        assert best.realised_picks == req.height


def test_a_run_keeping_realised_best_answers_is_labelled_an_upper_bound():
    from sim.runner import run as run_scenario
    from sim.scenario import PolicySpec

    sc = scenario(duration_s=60, llms=[llm("gpt-4", slots=100), llm("mistral-7b", slots=100)])
    res = run_scenario(sc, [
        PolicySpec(name="mixllm", label="top2-realised", params={"top_k": 2,
                                                                 "keep": "best_realised"}),
        PolicySpec(name="mixllm", label="top2-judged", params={"top_k": 2,
                                                               "keep": "best_judged"}),
    ], seeds=1, keep_requests=False)
    flags = dict(res.summary.select("policy", "upper_bound").iter_rows())
    assert flags == {"top2-realised": True, "top2-judged": False}


class Burst(BasePolicy):
    """gpt-4 only for t in [51, 55), mistral-7b otherwise."""

    name = "burst"

    def route(self, query, view):
        if 51 <= view.now < 55 and "gpt-4" in view.names:
            return Decision("gpt-4")
        return Decision("mistral-7b")


def test_load_rejections_of_a_removed_llm_still_label_it():
    # gpt-4 takes one request at a time and queues none; it is removed at t = 55, between
    # two timeline ticks (every 10 s), right after turning requests away.
    sc = scenario(duration_s=100, arrivals={"kind": "poisson", "rate_per_s": 5.0},
                  llms=[llm("gpt-4", slots=1, max_queue=0, decode_tps=1),
                        llm("mistral-7b", price_in_per_mtok=0.2, price_out_per_mtok=0.2,
                            slots=100)],
                  events=[{"at_s": 55, "remove_llm": "gpt-4"}])
    res, _ = run(sc, Burst())
    req = res.requests
    n = req.filter((pl.col("llm") == "gpt-4") & (pl.col("reject_reason") == "queue_full")).height
    assert n > 5
    last = res.timeline.filter(pl.col("llm") == "gpt-4").sort("t_s").tail(1)
    assert last["t_s"][0] == 55.0 and last["load_rejected"][0] == n
    s = summarize(req, res.timeline, sc, "burst", sc.seed)
    assert s["saturation"]["gpt-4"] == "overloaded"


@pytest.mark.parametrize("drain", [None, 30.0])
def test_the_timeline_has_one_row_per_llm_and_time(drain):
    sc = scenario(duration_s=100, run={"drain_s": drain})
    res, _ = run(sc, Fixed())
    tl = res.timeline
    assert tl.group_by("t_s", "llm").len()["len"].max() == 1
    assert tl["t_s"].max() == pytest.approx(res.end_s)  # the last sample closes the run


@pytest.mark.parametrize("which", ["cascade", "best_judged"])
def test_each_judged_answer_bills_the_judges_call_and_the_tokens_it_reads(which):
    def go(judge):
        sc = scenario(duration_s=200, llms=[llm("gpt-4", slots=100),
                                            llm("mistral-7b", slots=100, price_in_per_mtok=0.2,
                                                price_out_per_mtok=0.2)],
                      judge={"noise": 0.5, **judge}, run={"drain_s": None})
        pol = (Escalate() if which == "cascade"
               else Fixed(prefs=("mistral-7b",), extra=("gpt-4",), keep="best_judged"))
        res, inputs = run(sc, pol)
        return res.requests, inputs.workload

    (free, wl), (paid, _) = go({}), go({"cost_usd": 0.001, "price_in_per_mtok": 300.0})
    # The judge's price changes no decision (its noise is keyed per answer), only the bill.
    assert paid["llm"].equals(free["llm"]) and paid["attempts"].equals(free["attempts"])
    # Both policies call mistral first and gpt-4 as the second call; every call's answer is
    # judged (nothing is rejected here): per call 0.001 plus the query and answer tokens.
    rows = paid["row"].to_numpy()
    calls = paid["attempts"].to_numpy()
    out_tok = {name: wl.output_tokens[rows, wl.model_index(name)].astype(float)
               for name in ("mistral-7b", "gpt-4")}
    inp = paid["input_tokens"].to_numpy().astype(float)
    read = calls * inp + out_tok["mistral-7b"] + np.where(calls > 1, out_tok["gpt-4"], 0.0)
    expected = 0.001 * calls + read * 300.0 / 1e6
    np.testing.assert_allclose((paid["cost_usd"] - free["cost_usd"]).to_numpy(), expected,
                               rtol=1e-9, atol=1e-12)
    if which == "cascade":
        assert (calls > 1).any() and (calls == 1).any()
    else:
        assert (calls == 2).all()

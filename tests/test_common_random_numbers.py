"""Common random numbers: per-job noise is keyed on (request, attempt, answer), so policies
run on the same scenario and seed see the same noise for the same job, whatever the order in
which events happen in each run."""

from __future__ import annotations

import polars as pl

from helpers import llm, scenario
from policies.base import BasePolicy
from sim.engine import Inputs, Simulation, keyed_rng, prepare_inputs
from sim.runner import build_workload
from sim.scenario import Scenario
from sim.types import Decision

SMALL, MID, LARGE = "mistral-7b", "gpt-3.5-turbo", "gpt-4"


def _inputs(sc: Scenario, seed: int | None = None) -> Inputs:
    seed = sc.seed if seed is None else seed
    return prepare_inputs(sc, build_workload(sc, seed), seed)


def _run(sc: Scenario, policy: BasePolicy, inputs: Inputs) -> pl.DataFrame:
    return Simulation(sc, policy, inputs, seed=sc.seed).run().requests


# ------------------------------------------------------------------- the draws themselves
def test_first_answer_draws_are_the_pre_drawn_arrays():
    inp = _inputs(scenario(duration_s=50))
    for rid in (0, 7, inp.arrival_s.size - 1):
        assert inp.service_exp1(rid, 0, 0) == inp.exp1[rid]
        assert inp.service_norm(rid, 0, 0) == inp.norm[rid]
        assert inp.judge_normal(rid, 0, 0) == inp.judge_z[rid]


def test_keyed_draws_depend_only_on_seed_and_key():
    sc = scenario(duration_s=50)
    a, b = _inputs(sc), _inputs(sc)
    keys = [(0, 1, 0), (3, 0, 1), (3, 0, 2), (3, 1, 0), (3, 2, 0), (40, 1, 1)]
    draws = {
        f: [getattr(a, f)(*k) for k in keys]
        for f in ("service_exp1", "service_norm", "judge_normal")
    }
    for f, vals in draws.items():
        # Another Inputs, keys asked in the opposite order: the same numbers.
        again = [getattr(b, f)(*k) for k in reversed(keys)][::-1]
        assert vals == again
        assert len(set(vals)) == len(vals)  # distinct keys, distinct draws
    # The service and judge streams are separate, and so are seeds.
    assert draws["service_norm"] != draws["judge_normal"]
    other = _inputs(sc, seed=sc.seed + 1)
    assert [other.judge_normal(*k) for k in keys] != draws["judge_normal"]


def test_keyed_streams_never_reuse_the_batch_stream():
    # The batch arrays come from the subsystem's own stream; a keyed generator extends its
    # spawn key, so even key (0, 0, 0) gives numbers unrelated to judge_z[0].
    inp = _inputs(scenario(duration_s=50))
    batch = set(inp.judge_z.tolist())
    # None of the first draws of many keyed generators appears among the batch draws (a
    # keyed generator replaying the batch stream would hit it at once).
    keyed = {
        float(keyed_rng(inp.judge_stream, rid, rnd, ans).standard_normal())
        for rid in range(len(inp.judge_z)) for rnd in range(2) for ans in range(2)
    }
    assert len(batch) > 50 and not keyed & batch
    assert keyed_rng(inp.judge_stream, 5, 1, 0).standard_normal() == inp.judge_normal(5, 1, 0)


# ------------------------------------------------------------------------- judge, end to end
class Escalating(BasePolicy):
    """Odd requests start on `odd` (so the event order differs between instances), the
    rest on SMALL; a low judge score escalates to LARGE. Records every judge score."""

    name = "escalating_test"

    def __init__(self, odd: str = SMALL):
        super().__init__()
        self.odd = odd
        self.scores: dict[tuple[int, int, str], float] = {}

    def route(self, query, view):
        return Decision(self.odd if query.id % 2 else SMALL)

    def on_answer(self, query, answer, view):
        # Without fan-out, query.attempt (LLM calls so far) is the routing round + 1.
        self.scores[(query.id, query.attempt, answer.llm)] = answer.judge_score
        if answer.llm != LARGE and answer.judge_score < 0.6:
            return Decision(LARGE)
        return None


def _judge_scenario() -> Scenario:
    return scenario(
        duration_s=300,
        arrivals={"kind": "poisson", "rate_per_s": 3.0},
        llms=[llm(LARGE, slots=4), llm(MID, slots=4), llm(SMALL, slots=4)],
        judge={"noise": 0.3},
        run={"drain_s": None},
    )


def test_judge_scores_match_across_policies_for_the_same_job():
    sc = _judge_scenario()
    inp = _inputs(sc)
    a, b = Escalating(), Escalating(odd=MID)
    ra, rb = _run(sc, a, inp), _run(sc, b, inp)
    # The policies' timings differ (odd requests go elsewhere), so shared queues do too.
    assert not ra["end_s"].equals(rb["end_s"])
    shared = a.scores.keys() & b.scores.keys()
    assert any(k[1] == 1 for k in shared) and any(k[1] == 2 for k in shared)
    for k in shared:
        assert a.scores[k] == b.scores[k], k
    # Every even request's first answer (same LLM, same round) is in both runs.
    even = {k for k in a.scores if k[0] % 2 == 0 and k[1] == 1}
    assert even <= shared


def test_judge_score_is_quality_plus_keyed_noise():
    sc = _judge_scenario()
    inp = _inputs(sc)
    pol = Escalating()
    _run(sc, pol, inp)
    wl = inp.workload
    col = {m: wl.models.index(m) for m in (SMALL, LARGE)}
    for (rid, attempt, name), score in pol.scores.items():
        qual = float(wl.quality[inp.rows[rid], col[name]])
        z = inp.judge_normal(rid, attempt - 1, 0)
        assert score == min(1.0, max(0.0, qual + 0.3 * z))


# ------------------------------------------------------------------- retries, end to end
class RetryElsewhere(BasePolicy):
    """First route: LARGE (odd requests to `odd`); any retry goes to SMALL."""

    name = "retry_elsewhere_test"

    def __init__(self, odd: str = LARGE):
        super().__init__()
        self.odd = odd

    def route(self, query, view):
        if query.attempt:
            return Decision(SMALL)
        want = self.odd if query.id % 2 else LARGE
        return Decision(want if want in view.names else SMALL)


MEAN_S = 20.0


def _retry_scenario() -> Scenario:
    svc = {"kind": "exponential", "mean_s": MEAN_S}
    return scenario(
        duration_s=200,
        arrivals={"kind": "poisson", "rate_per_s": 2.0},
        llms=[llm(LARGE, slots=500, service=svc), llm(MID, slots=500, service=svc),
              llm(SMALL, slots=500, service=svc)],
        events=[{"at_s": 60, "outage": {"llm": LARGE, "duration_s": 30}},
                {"at_s": 130, "outage": {"llm": LARGE, "duration_s": 30}}],
        run={"drain_s": None, "max_retries": 1},
    )


def test_retry_service_draws_match_across_policies():
    sc = _retry_scenario()
    inp = _inputs(sc)
    ra = _run(sc, RetryElsewhere(), inp)
    rb = _run(sc, RetryElsewhere(odd=MID), inp)
    # Odd requests never fail in b, so the order of failures differs between the runs.
    assert ra.filter(pl.col("retries") > 0).height > rb.filter(pl.col("retries") > 0).height
    cols = ["request_id", "llm", "retries", "service_s"]
    done = pl.col("outcome") == "completed"
    both = ra.filter(done).select(cols).join(rb.filter(done).select(cols), on="request_id")
    retried = both.filter((pl.col("retries") == 1) & (pl.col("retries_right") == 1))
    assert retried.height > 5
    assert (retried["llm"] == SMALL).all() and (retried["llm_right"] == SMALL).all()
    assert retried["service_s"].to_list() == retried["service_s_right"].to_list()
    # ...and each one is the keyed draw of round 1, not the first answer's.
    for rid, svc in retried.select("request_id", "service_s").iter_rows():
        assert svc == MEAN_S * inp.service_exp1(rid, 1, 0)
        assert svc != MEAN_S * inp.exp1[rid]


class FanOut(BasePolicy):
    name = "fan_out_test"

    def route(self, query, view):
        return Decision(LARGE, extra=(MID, SMALL), keep="best_realised")


def test_each_top_k_answer_has_its_own_keyed_draw():
    svc = {"kind": "exponential", "mean_s": MEAN_S}
    sc = scenario(duration_s=100, llms=[llm(LARGE, slots=500, service=svc),
                                        llm(MID, slots=500, service=svc),
                                        llm(SMALL, slots=500, service=svc)],
                  run={"drain_s": None})
    inp = _inputs(sc)
    req = _run(sc, FanOut(), inp).filter(pl.col("outcome") == "completed")
    answer = {LARGE: 0, MID: 1, SMALL: 2}
    kept = set()
    for rid, name, svc_s in req.select("request_id", "llm", "service_s").iter_rows():
        assert svc_s == MEAN_S * inp.service_exp1(rid, 0, answer[name])
        kept.add(name)
    assert len(kept) >= 2  # the extra answers' draws were exercised, not only the primary's


# --------------------------------------------------------------------------- determinism
def test_same_seed_same_output_with_keyed_draws():
    for sc, make in ((_judge_scenario(), Escalating), (_retry_scenario(), RetryElsewhere)):
        first = _run(sc, make(), _inputs(sc))
        again = _run(sc, make(), _inputs(sc))
        assert first.equals(again, null_equal=True)

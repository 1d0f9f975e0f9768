"""MixLLM policy: the documented score, LinUCB algebra, latency penalty, LLM changes, params.

Every workload here is synthetic and built in this file (the price-change test runs a small
scenario through the engine); each test runs in well under a second (kNN predictors on a few
hundred rows).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import helpers
from policies import registry
from policies.mixllm.decision import (
    LinUCBBank,
    cost_weight,
    latency_penalty,
    quality_weight,
    sherman_morrison_update,
)
from policies.mixllm.policy import MixLLMPolicy
from sim.context import context_for
from sim.engine import Simulation, prepare_inputs
from sim.errors import PolicyError
from sim.offline import evaluate_offline, idle_view
from sim.runner import build_workload
from sim.scenario import JudgeSpec
from sim.types import (
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VALID,
    ClusterView,
    Decision,
    LLMInfo,
    PolicyContext,
    Query,
    Workload,
)

MODELS = ("cheap", "mid", "dear")
PRICES = {"cheap": (0.2, 0.2), "mid": (1.0, 2.0), "dear": (10.0, 30.0)}


def make_workload(n: int = 600, seed: int = 0, *, p=None, p_test=None) -> Workload:
    """Three models; `cheap` is right where x0 > 0, `mid` where x1 > 0, `dear` mostly.

    `p` (n, 3) success probabilities override the default; `p_test` replaces them on the
    test rows only (a shift between the training data and live traffic)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    if p is None:
        p = np.column_stack(
            [np.where(x[:, 0] > 0, 0.9, 0.1), np.where(x[:, 1] > 0, 0.85, 0.3), np.full(n, 0.9)]
        )
    u = rng.random(n)
    split = np.where(u < 0.5, SPLIT_TRAIN, np.where(u < 0.6, SPLIT_VALID, SPLIT_TEST))
    if p_test is not None:
        p = np.where((split == SPLIT_TEST)[:, None], p_test, p)
    quality = (rng.random(p.shape) < p).astype(np.float32)
    return Workload(
        name="mixllm-synthetic",
        models=MODELS[: p.shape[1]],
        features=(x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32),
        task=(x[:, 3] > 0).astype(np.int16),
        task_names=("t0", "t1"),
        input_tokens=rng.integers(100, 400, n).astype(np.int32),
        quality=quality,
        output_tokens=np.full((n, p.shape[1]), 60.0, dtype=np.float32),
        split=split.astype(np.int8),
    )


def infos(wl: Workload, names=None, prices=PRICES) -> list[LLMInfo]:
    names = names or wl.models
    return [LLMInfo(m, m, wl.models.index(m), *prices[m]) for m in names]


def context(wl: Workload, llms, seed: int = 0) -> PolicyContext:
    return context_for(wl, llms, reference_llm=llms[-1].name, rng=np.random.default_rng(seed))


def make_policy(wl, llms, seed: int = 0, **params) -> MixLLMPolicy:
    pol = registry.create("mixllm", params)
    pol.setup(context(wl, llms, seed))
    return pol


def query(wl: Workload, i: int, row: int) -> Query:
    return Query(i, row, float(i), int(wl.input_tokens[row]), int(wl.task[row]))


def recompute_score(dec: Decision, lam: float) -> np.ndarray:
    t = dec.terms
    return (
        quality_weight(lam) * t["quality_pred"] - cost_weight(lam) * t["cost_pred_ref_queries"]
        + t["uncertainty_bonus"] - t["latency_penalty"]
    )


# ----------------------------------------------------------------------------- decisions
def test_decision_is_argmax_of_documented_score():
    wl = make_workload()
    llms = infos(wl)
    lam = 3.0
    pol = make_policy(wl, llms, lambda_=lam, alpha=0.2)
    view = idle_view(llms)
    view.est_wait_s[:] = [0.0, 12.0, 40.0]  # penalty differs per candidate
    for i, row in enumerate(wl.rows(SPLIT_TEST)[:200]):
        dec = pol.route(query(wl, i, int(row)), view)
        assert set(dec.terms) == {"quality_pred", "cost_pred_ref_queries", "uncertainty_bonus",
                                  "latency_penalty"}
        for arr in (*dec.terms.values(), dec.scores):
            assert arr.shape == (len(llms),)
        expected = recompute_score(dec, lam)
        np.testing.assert_allclose(dec.scores, expected, rtol=1e-12, atol=1e-12)
        assert dec.llm == view.names[int(np.argmax(expected))]
    pen = latency_penalty(view.est_wait_s, beta=0.1, gamma=0.1, xi=0.8, tau_s=30.0)
    np.testing.assert_allclose(dec.terms["latency_penalty"], pen)


def test_uncertainty_term_is_alpha_sqrt_x_ainv_x_of_the_queries_each_llm_served():
    # A_l = I + sum of x x^T over the queries l served, rebuilt here from scratch and solved
    # directly (the policy keeps A^-1 by rank-one updates).
    wl = make_workload()
    llms = infos(wl)
    alpha = 0.2
    pol = make_policy(wl, llms, lambda_=3.0, alpha=alpha, update_every=1)
    view = idle_view(llms)
    d = pol._u.shape[1]
    a = {x.name: np.eye(d) for x in llms}
    for i, row in enumerate(wl.rows(SPLIT_TEST)[:150]):
        dec = pol.route(query(wl, i, int(row)), view)
        x = pol._u[row]
        expected = [alpha * np.sqrt(x @ np.linalg.solve(a[nm], x)) for nm in view.names]
        np.testing.assert_allclose(dec.terms["uncertainty_bonus"], expected, rtol=1e-9)
        a[dec.llm] += np.outer(x, x)
    # The check covered matrices that had learned something, for more than one LLM.
    assert sum(np.trace(m) > d for m in a.values()) >= 2


def test_only_accepting_llms_are_chosen():
    wl = make_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms)
    view = idle_view(llms)
    view.accepting[:] = [False, True, False]
    for i, row in enumerate(wl.rows(SPLIT_TEST)[:50]):
        assert pol.route(query(wl, i, int(row)), view).llm == "mid"


def test_admission_off_routes_by_score_alone_but_never_to_a_down_llm():
    wl = make_workload()
    llms = infos(wl)
    on = make_policy(wl, llms, uncertainty=False)
    off = make_policy(wl, llms, uncertainty=False, admission=False)
    full = idle_view(llms)
    rows = wl.rows(SPLIT_TEST)[:100]
    picks = [on.route(query(wl, i, int(r)), full).llm for i, r in enumerate(rows)]
    favourite = max(set(picks), key=picks.count)
    j = full.names.index(favourite)
    full.accepting[j] = False  # its queue is full: up, but a request would be rejected
    for i, r in enumerate(rows):
        q = query(wl, i, int(r))
        assert on.route(q, full).llm != favourite
    assert sum(off.route(query(wl, i, int(r)), full).llm == favourite
               for i, r in enumerate(rows)) == picks.count(favourite)
    full.up[j] = False  # down: skipped either way
    assert all(off.route(query(wl, i, int(r)), full).llm != favourite
               for i, r in enumerate(rows))


def test_lambda_trades_quality_for_cost():
    wl = make_workload(1000)
    llms = infos(wl)
    rows = wl.rows(SPLIT_TEST)
    pol = make_policy(wl, llms, online=False, uncertainty=False)
    points = []
    for lam in (0.05, 1.0, 100.0):
        pol.set_tradeoff(lam)
        res = evaluate_offline(pol, wl, llms, rows, reference=llms[-1])
        points.append((res.cost_pct, res.quality_pct))
    costs, quals = zip(*points, strict=True)
    assert costs[0] < costs[1] < costs[2]
    assert quals[0] < quals[2]
    # A small lambda is "cheapest wins"; a large one buys quality (dear is the best overall).
    assert costs[0] < 5.0
    assert quals[2] > 90.0


def test_top_k_sends_the_next_best_and_documents_keep():
    wl = make_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms, top_k=2, keep="best_realised")
    view = idle_view(llms)
    dec = pol.route(query(wl, 0, int(wl.rows(SPLIT_TEST)[0])), view)
    order = np.argsort(-dec.scores, kind="stable")
    assert dec.llm == view.names[order[0]]
    assert dec.extra == (view.names[order[1]],)
    assert dec.keep == "best_realised"
    res = evaluate_offline(pol, wl, llms, wl.rows(SPLIT_TEST), reference=llms[-1])
    assert np.all(res.attempts == 2)  # cost is the sum of both answers
    assert res.realised_picks == len(res.chosen)  # every answer kept by ground truth


def test_top_k_keep_rules_order_as_they_should_offline():
    wl = make_workload()
    llms = infos(wl)
    rows = wl.rows(SPLIT_TEST)

    def kept(keep: str, judge_noise: float = 0.5, judge_cost: float = 0.0,
             judge_per_mtok: float = 0.0):
        pol = make_policy(wl, llms, top_k=2, keep=keep)
        judge = JudgeSpec(noise=judge_noise, cost_usd=judge_cost,
                          price_in_per_mtok=judge_per_mtok)
        return evaluate_offline(pol, wl, llms, rows, reference=llms[-1], judge=judge)

    primary, judged, realised = kept("primary"), kept("best_judged"), kept("best_realised")
    assert judged.realised_picks == 0 and primary.realised_picks == 0
    assert primary.cost_usd == judged.cost_usd == realised.cost_usd  # both answers paid
    # Per query the realised rule keeps the better answer, so it dominates both others; a
    # noiseless judge is the realised rule.
    assert realised.quality_sum >= max(primary.quality_sum, judged.quality_sum)
    exact = kept("best_judged", judge_noise=0.0)
    np.testing.assert_array_equal(exact.chosen, realised.chosen)
    # A priced judge bills both answers of every query and changes nothing else.
    billed = kept("best_judged", judge_cost=0.01)
    np.testing.assert_array_equal(billed.chosen, judged.chosen)
    assert billed.cost_usd == pytest.approx(judged.cost_usd + 0.01 * 2 * len(rows))
    assert kept("best_realised", judge_cost=0.01).cost_usd == pytest.approx(realised.cost_usd)
    # Priced per token, the judge reads the query and both answers. Which two LLMs answered
    # a row is the policy's choice: replayed on a fresh copy, as evaluate_offline routes.
    per_token = kept("best_judged", judge_per_mtok=50.0)
    np.testing.assert_array_equal(per_token.chosen, judged.chosen)
    replay, view, read = make_policy(wl, llms, top_k=2, keep="best_judged"), idle_view(llms), 0.0
    col = {x.name: x.model_col for x in llms}
    for i, row in enumerate(rows):
        q = Query(id=i, row=int(row), arrival_s=float(i),
                  input_tokens=int(wl.input_tokens[row]), task=int(wl.task[row]))
        d = replay.route(q, view)
        read += sum(q.input_tokens + float(wl.output_tokens[row, col[name]])
                    for name in (d.llm, *d.extra))
    assert per_token.cost_usd == pytest.approx(judged.cost_usd + read * 50.0 / 1e6)
    # A noisy judge sometimes keeps the worse answer, but mostly not: at noise 0.5 it orders
    # a right and a wrong answer correctly with probability about P(N(0, 2 * 0.5^2) < 1) =
    # 0.92 (clipping aside). Here (237 test rows) the second answer is the better one on 13
    # rows; primary keeps 217 right answers, best-judged 225, best-realised 230.
    assert judged.quality_sum < realised.quality_sum
    assert judged.quality_sum > primary.quality_sum
    # Ties go to the earlier answer: with equal qualities the primary is kept.
    same = np.flatnonzero(wl.quality[rows, 0] == wl.quality[rows, 1])
    pol = make_policy(wl, llms[:2], top_k=2, keep="best_realised")
    res = evaluate_offline(pol, wl, llms[:2], rows[same], reference=llms[-1])
    firsts = [pol.route(query(wl, i, int(r)), idle_view(llms[:2])).llm for i, r in
              enumerate(rows[same])]
    assert [llms[j].name for j in res.chosen] == firsts


def test_one_answer_is_never_billed_a_judge_whatever_the_keep_rule():
    # best_judged with top_k 1, or a fan-out none of whose extras accept: one answer, no
    # judge call, in the offline evaluator as in the engine.
    wl = make_workload()
    llms = infos(wl)
    rows = wl.rows(SPLIT_TEST)
    judge = JudgeSpec(cost_usd=0.01, price_in_per_mtok=50.0)
    single = {}
    for keep in ("primary", "best_judged"):
        pol = make_policy(wl, llms, top_k=1, keep=keep)
        single[keep] = evaluate_offline(pol, wl, llms, rows, reference=llms[-1], judge=judge)
        assert pol.route(query(wl, 0, int(rows[0])), idle_view(llms)).keep == "primary"
    assert single["best_judged"].cost_usd == single["primary"].cost_usd
    view = idle_view(llms)
    view.accepting[:] = [False, False, True]
    dec = make_policy(wl, llms, top_k=2, keep="best_judged").route(query(wl, 0, int(rows[0])), view)
    assert dec.extra == () and dec.keep == "primary"


def test_best_judged_fan_outs_count_the_judges_price_in_each_answers_cost():
    from dataclasses import replace

    from sim.types import JudgeInfo

    wl = make_workload()
    llms = infos(wl)
    judge = JudgeInfo(cost_usd=1e-4, price_in_per_mtok=2.0)

    def cost_terms(keep: str, top_k: int = 2):
        pol = registry.create("mixllm", {"top_k": top_k, "keep": keep})
        pol.setup(replace(context(wl, llms), judge=judge))
        return pol, pol.route(query(wl, 0, 5), idle_view(llms)).terms["cost_pred_ref_queries"]

    pol, judged = cost_terms("best_judged")
    _, primary = cost_terms("primary")
    _, single = cost_terms("best_judged", top_k=1)  # nothing to judge between
    np.testing.assert_array_equal(single, primary)
    read = wl.input_tokens[5] + pol.len_hat[5, [x.model_col for x in llms]]
    extra_usd = 1e-4 + read * 2.0 / 1e6
    np.testing.assert_allclose((judged - primary) * pol._cost_unit, extra_usd, rtol=1e-9)


# ------------------------------------------------------------------------------- LinUCB
def test_sherman_morrison_and_batched_flush_equal_direct_inverse():
    rng = np.random.default_rng(3)
    d = 9
    xs = rng.normal(size=(40, d))
    direct = np.linalg.inv(np.eye(d) + xs.T @ xs)
    one_by_one = np.eye(d)
    for x in xs:
        sherman_morrison_update(one_by_one, x)
    np.testing.assert_allclose(one_by_one, direct, rtol=1e-9, atol=1e-12)
    bank = LinUCBBank(xs, capacity=1)
    s0, s1 = bank.add_slot(), bank.add_slot(prior_scale=4.0)  # grows past capacity
    s2 = bank.add_slot()
    # Two flushes; slots interleaved, with more contexts than dimensions (s0's first batch)
    # and fewer (s0's second, s1's one, s2's three).
    for row in range(25):
        bank.observe(s0, row)
    bank.observe(s1, 0)
    bank.flush()
    for i in range(15):
        bank.observe(s0, 25 + i)
        if i < 3:
            bank.observe(s2, i)
    bank.flush()
    np.testing.assert_allclose(bank.ainv[s0], direct, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        bank.ainv[s1], np.linalg.inv(np.eye(d) / 4.0 + np.outer(xs[0], xs[0])), rtol=1e-9
    )
    np.testing.assert_allclose(
        bank.ainv[s2], np.linalg.inv(np.eye(d) + xs[:3].T @ xs[:3]), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_array_equal(bank.ainv[s2], bank.ainv[s2].T)
    bank.observe(s1, 1)  # a single update is one Sherman-Morrison step
    bank.flush()
    np.testing.assert_allclose(
        bank.ainv[s1], np.linalg.inv(np.eye(d) / 4.0 + xs[:2].T @ xs[:2]), rtol=1e-9
    )


def test_uncertainty_bonus_shrinks_as_an_llm_serves_similar_queries():
    wl = make_workload()
    llms = infos(wl)
    # The bonus is recorded for every candidate whatever is chosen.
    pol = make_policy(wl, llms, alpha=0.5, update_every=1, online=False)
    view = idle_view(llms)
    view.accepting[:] = [False, True, False]  # only `mid` may serve
    chosen = 1
    row = int(wl.rows(SPLIT_TEST)[0])
    bonus = np.array(
        [pol.route(query(wl, i, row), view).terms["uncertainty_bonus"] for i in range(30)]
    )
    served = bonus[:, chosen]
    assert np.all(np.diff(served) < 0)  # strictly shrinking for the LLM that serves
    assert served[-1] < 0.25 * served[0]  # ~ alpha / sqrt(1 + n) for a unit-norm context
    others = np.delete(bonus, chosen, axis=1)
    np.testing.assert_allclose(others, np.tile(others[0], (len(others), 1)))  # untouched


# ----------------------------------------------------------------------- latency penalty
def test_latency_penalty_moves_traffic_away_from_a_long_wait():
    wl = make_workload()
    llms = infos(wl)
    rows = wl.rows(SPLIT_TEST)
    pol = make_policy(wl, llms, lambda_=100.0, online=False, uncertainty=False)
    idle = idle_view(llms)
    busy = idle_view(llms)
    busy.est_wait_s[:] = [0.0, 0.0, 120.0]  # dear: four times the tolerable 30 s
    n_idle = sum(pol.route(query(wl, i, int(r)), idle).llm == "dear" for i, r in enumerate(rows))
    n_busy = sum(pol.route(query(wl, i, int(r)), busy).llm == "dear" for i, r in enumerate(rows))
    assert n_idle > 0.5 * len(rows)  # quality-hungry lambda: dear is the usual pick
    assert n_busy == 0  # a penalty of 0.1 * e^9.6 outweighs any quality difference
    off = make_policy(wl, llms, lambda_=100.0, online=False, uncertainty=False, penalty=False)
    n_off = sum(off.route(query(wl, i, int(r)), busy).llm == "dear" for i, r in enumerate(rows))
    assert n_off == n_idle  # switched off, the wait is ignored


def test_penalty_term_follows_the_formula_and_never_overflows():
    w = np.array([0.0, 24.0, 100.0, 1e9, np.inf])
    pen = latency_penalty(w, beta=0.1, gamma=0.1, xi=0.8, tau_s=30.0)
    assert pen[1] == pytest.approx(0.1)  # w = xi * tau: exactly beta
    assert pen[0] == pytest.approx(0.1 * np.exp(-2.4))
    assert np.all(np.isfinite(pen)) and np.all(np.diff(pen) >= 0)


# ---------------------------------------------------------------------- LLM add / remove
def test_added_llm_is_explored_and_predicted_from_a_warm_start():
    # `late` is as good as `mid` and as cheap; it joins after 300 queries.
    rng = np.random.default_rng(1)
    n = 1200
    base = make_workload(n, seed=1)
    p = np.column_stack([np.full(n, 0.5), np.full(n, 0.7), np.full(n, 0.7)])
    q = (rng.random(p.shape) < p).astype(np.float32)
    wl = Workload(
        "late", ("cheap", "mid", "late"), base.features, base.task, base.task_names,
        base.input_tokens, q, base.output_tokens, base.split,
    )
    prices = {"cheap": (0.2, 0.2), "mid": (0.5, 0.5), "late": (0.5, 0.5)}
    all_llms = infos(wl, prices=prices)
    rows = wl.rows(SPLIT_TEST)

    def picks_after_joining(n_after: int = 400, pin_below_mid: bool = True, **params):
        pol = make_policy(wl, all_llms[:2], lambda_=5.0, online=False, **params)
        v0 = idle_view(all_llms[:2])
        for i in range(300):
            pol.route(query(wl, i, int(rows[i % len(rows)])), v0)
        pol.on_llm_added(all_llms[2])
        assert np.isfinite(pol.q_hat[:, 2]).all()  # the newcomer has predictions for all rows
        if pin_below_mid:
            # Which 30 warm-start rows are drawn decides whether `late` looks better or worse
            # than `mid`; pinned a little worse, only the uncertainty bonus can pick it.
            pol.q_hat[:, 2] = pol.q_hat[:, 1] - 0.02
            pol._q_live[:, 2] = pol.q_hat[:, 2]
            pol._names = None  # rebind the candidates' arrays
        v1 = idle_view(all_llms)
        return [
            pol.route(query(wl, i, int(rows[i % len(rows)])), v1).llm for i in range(n_after)
        ]

    explored = picks_after_joining(alpha=0.3, warm_start_n=30)
    not_explored = picks_after_joining(uncertainty=False, warm_start_n=30)
    assert not_explored.count("late") == 0
    first, last = explored[:100].count("late"), explored[300:].count("late")
    assert first >= 50  # a fresh A = I / new_llm_explore: a bonus far above a 0.02 gap
    assert last < first  # and it shrinks as the newcomer serves (LinUCB), so exploring ends
    # A prior only (no warm-start rows): still tried.
    assert "late" in picks_after_joining(200, False, alpha=0.3, warm_start_n=0)


def test_removed_llm_is_never_chosen_and_others_are_not_refitted():
    wl = make_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms, lambda_=100.0)
    q_before = pol.q_hat.copy()
    pol.on_llm_removed("dear")
    view = idle_view(llms[:2])
    picks = {pol.route(query(wl, i, int(r)), view).llm for i, r in enumerate(wl.rows(SPLIT_TEST))}
    assert picks <= {"cheap", "mid"} and picks
    np.testing.assert_array_equal(pol.q_hat, q_before)
    # feedback for the removed LLM arriving late is ignored, not an error
    from sim.types import Feedback

    pol.feedback(Feedback(0, int(wl.rows(SPLIT_TEST)[0]), "dear", 1.0, 0.0))
    pol.apply_feedback()


def test_unannounced_llm_in_the_view_is_added_lazily():
    wl = make_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms[:2])
    dec = pol.route(query(wl, 0, int(wl.rows(SPLIT_TEST)[0])), idle_view(llms))
    assert dec.scores.shape == (3,)
    assert np.isfinite(pol.q_hat[:, 2]).all()


# -------------------------------------------------------------------------------- params
@pytest.mark.parametrize(
    "params, field",
    [
        ({"lambda": 1.4}, "policy.params.lambda"),  # the Python keyword is spelled lambda_
        ({"lambda_": 0}, "policy.params.lambda_"),
        ({"alpha": -0.1}, "policy.params.alpha"),
        ({"predictor": "svm"}, "policy.params.predictor"),
        ({"top_k": 0}, "policy.params.top_k"),
        ({"keep": "any"}, "policy.params.keep"),
        ({"update_every": 0}, "policy.params.update_every"),
    ],
)
def test_bad_params_raise_policy_error_naming_the_field(params, field):
    with pytest.raises(PolicyError) as err:
        registry.validate_params("mixllm", params)
    assert err.value.field == field
    assert repr(next(iter(params.values()))) in str(err.value)


def test_unknown_param_lists_the_allowed_ones():
    with pytest.raises(PolicyError, match="allowed params: .*lambda_.*alpha"):
        registry.validate_params("mixllm", {"lamda": 1.0})


@pytest.mark.parametrize("predictor", ["knn", "random_forest", "mlp"])
def test_registered_and_deterministic_per_seed(predictor):
    from policies.mixllm import policy as mixllm_policy

    assert "mixllm" in registry.names()
    wl = make_workload()
    llms = infos(wl)
    rows = wl.rows(SPLIT_TEST)
    runs = []
    for _ in range(2):
        # Process-wide caches would hand the second run the first one's predictions.
        for cache in (mixllm_policy._PREDICTION_CACHE, mixllm_policy._KNN_K_CACHE,
                      mixllm_policy._NEIGHBOUR_CACHE):
            cache.clear()
        pol = make_policy(wl, llms, seed=7, online=True, predictor=predictor, n_estimators=20)
        res = evaluate_offline(pol, wl, llms, rows, reference=llms[-1], feedback_probability=0.5)
        runs.append((res.chosen, pol.q_hat.copy()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


def test_views_with_inf_wait_for_down_llms_are_handled():
    wl = make_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms)
    view = ClusterView(
        names=tuple(x.name for x in llms),
        models=tuple(x.model for x in llms),
        model_cols=np.array([x.model_col for x in llms]),
        price_in_per_mtok=np.array([x.price_in_per_mtok for x in llms]),
        price_out_per_mtok=np.array([x.price_out_per_mtok for x in llms]),
        up=np.array([True, True, False]),
        capacity=np.array([8, 8, 0]),
        busy=np.zeros(3, dtype=int),
        queue_len=np.zeros(3, dtype=int),
        max_queue=np.full(3, 100),
        mean_service_s=np.ones(3),
    )
    with np.errstate(all="raise"):
        dec = pol.route(query(wl, 0, int(wl.rows(SPLIT_TEST)[0])), view)
    assert dec.llm != "dear"
    assert np.isfinite(dec.scores).all()
    # gamma 0: the penalty is beta whatever the wait, an infinite one too (not 0 * inf).
    flat = make_policy(wl, llms, gamma=0.0, beta=0.1)
    view.est_wait_s[:] = [0.0, 5.0, np.inf]
    with np.errstate(all="raise"):
        dec = flat.route(query(wl, 0, int(wl.rows(SPLIT_TEST)[0])), view)
    np.testing.assert_array_equal(dec.terms["latency_penalty"], [0.1, 0.1, 0.1])
    assert np.isfinite(dec.scores).all()
    np.testing.assert_array_equal(
        latency_penalty(view.est_wait_s, beta=0.1, gamma=0.0, xi=0.8, tau_s=30.0), [0.1] * 3
    )


# ------------------------------------------------------------------------ kNN's k by CV
def test_cv_picks_a_small_k_for_local_signal_and_a_large_k_for_noise():
    from policies.mixllm.predictors import choose_knn_k

    rng = np.random.default_rng(3)
    n = 1500
    x = rng.normal(size=(n, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    angle = np.arctan2(x[:, 1], x[:, 0])
    # Right where the angle falls in alternating 30-degree sectors: only a query's closest
    # neighbours share its sector, so averaging many neighbours blurs the signal away.
    local = (np.floor(angle / (np.pi / 6)) % 2 == 0).astype(float)[:, None]
    k_local, brier_local = choose_knn_k(x, local, grid=(5, 25, 100, 400))
    assert k_local <= 25
    assert brier_local[k_local] < brier_local[400]
    # Pure coin flips: every neighbour is as informative as any other, the most win.
    noise = (rng.random((n, 2)) < 0.6).astype(float)
    k_noise, brier_noise = choose_knn_k(x, noise, grid=(5, 25, 100, 400))
    assert k_noise == 400
    assert brier_noise[5] > brier_noise[400]


def test_knn_k_is_chosen_by_cv_unless_given():
    wl = make_workload(800)
    llms = infos(wl)
    chosen = make_policy(wl, llms)
    assert chosen.knn_k in (25, 50, 100, 150, 200, 300, 400)
    fixed = make_policy(wl, llms, knn_k=7)
    assert fixed.knn_k == 7
    # The choice depends on the data only, not on the run's seed (recomputed, not cached).
    from policies.mixllm import policy as mixllm_policy

    mixllm_policy._KNN_K_CACHE.clear()
    assert make_policy(wl, llms, seed=11).knn_k == chosen.knn_k
    assert len(mixllm_policy._KNN_K_CACHE) == 1


def test_setup_with_no_initial_llm_then_llms_joining():
    wl = make_workload()
    pol = registry.create("mixllm", {})
    pol.setup(context_for(wl, [], reference_llm="dear", rng=np.random.default_rng(0)))
    llms = infos(wl)
    for llm in llms:
        pol.on_llm_added(llm)
    row = int(wl.rows(SPLIT_TEST)[0])
    assert pol.route(query(wl, 0, row), idle_view(llms)).llm in wl.models
    # The cost unit (what lambda trades quality against) is the reference LLM's, as when
    # every LLM is there at setup; before, it stayed at 1 USD and the cost term vanished.
    assert pol._cost_unit == pytest.approx(make_policy(wl, llms)._cost_unit)


def test_a_unit_set_before_the_reference_joins_is_replaced_by_it_once():
    wl = make_workload()
    llms = infos(wl)  # cheap, mid, dear; dear is the reference
    pol = registry.create("mixllm", {"uncertainty": False, "penalty": False})
    pol.setup(context_for(wl, llms[:1], reference_llm="dear", rng=np.random.default_rng(0)))
    provisional = pol._cost_unit
    pol.on_llm_added(llms[1])
    assert pol._cost_unit == provisional  # still no reference: unchanged
    pol.on_llm_added(llms[2])
    ref_unit = make_policy(wl, llms)._cost_unit
    assert pol._cost_unit == pytest.approx(ref_unit) and ref_unit > 10 * provisional
    row = int(wl.rows(SPLIT_TEST)[0])
    cost = pol.route(query(wl, 0, row), idle_view(llms)).terms["cost_pred_ref_queries"]
    # Every answer is 60 tokens, so warm-start length predictions are exact: same costs.
    np.testing.assert_allclose(cost, make_policy(wl, llms).route(
        query(wl, 0, row), idle_view(llms)).terms["cost_pred_ref_queries"], rtol=1e-12)
    # Removed and re-added, the reference does not move the unit again.
    pol.on_llm_removed("dear")
    pol.on_llm_added(llms[2])
    assert pol._cost_unit == pytest.approx(ref_unit)


# --------------------------------------------------------------------------- price changes
def test_price_change_reprices_the_cost_term_and_moves_traffic():
    """The engine's price_change reaches MixLLM through on_price_changed: gpt-4's recorded
    cost term (predicted cost / the cost unit fixed at setup) falls with its price, and
    traffic moves to it."""
    at = 150.0
    sc = helpers.scenario(
        duration_s=300,
        llms=[helpers.llm("gpt-4", slots=100),
              helpers.llm("mistral-7b", slots=100, price_in_per_mtok=0.2, price_out_per_mtok=0.2)],
        events=[{"at_s": at, "price_change": {"llm": "gpt-4", "price_in_per_mtok": 0.01,
                                              "price_out_per_mtok": 0.01}}],
        run={"drain_s": None},
    )
    inputs = prepare_inputs(sc, build_workload(sc, sc.seed), sc.seed)
    req = Simulation(sc, registry.create("mixllm"), inputs, seed=sc.seed).run().requests
    before = req.filter(pl.col("arrival_s") < at)
    after = req.filter(pl.col("arrival_s") >= at)
    # Against mistral-7b's unchanged term, per request: gpt-4's price fell at least 1000x
    # (10/30 -> 0.01/0.01 per Mtok), so the ratio's median falls by far more than 100x.
    ratio = (pl.col("cost_pred_ref_queries__gpt-4")
             / pl.col("cost_pred_ref_queries__mistral-7b")).median()
    r_before = before.select(ratio).item()
    r_after = after.select(ratio).item()
    assert r_after < r_before / 100

    def share(frame: pl.DataFrame) -> float:
        return frame.filter(pl.col("llm") == "gpt-4").height / frame.height

    # Now cheaper than mistral-7b and predicted better: nearly always chosen (was ~75%).
    assert share(after) > max(share(before), 0.9)


def test_tags_on_a_workload_without_texts_is_an_error_not_a_silent_no_op():
    wl = make_workload()
    assert wl.texts is None
    with pytest.raises(PolicyError, match="tags: true needs query texts"):
        make_policy(wl, infos(wl), tags=True)


def _with_texts(wl: Workload) -> Workload:
    import dataclasses

    topics = ("photosynthesis in green plant leaves", "python function sorting a list",
              "ancient empire trade routes")
    texts = tuple(f"Question {i}: explain {topics[i % 3]} and its {i % 7}th detail."
                  for i in range(len(wl.task)))
    return dataclasses.replace(wl, texts=texts)


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None, reason="torch not installed"
)
def test_tags_on_a_workload_with_texts_fine_tunes_and_is_deterministic(tmp_path):
    wl = _with_texts(make_workload(n=120))
    enc = {"kind": "hashing", "dim": 32, "cache_dir": str(tmp_path)}
    plain = make_policy(wl, infos(wl))
    a = make_policy(wl, infos(wl), tags=True, tag_epochs=1, encoder=enc)
    b = make_policy(wl, infos(wl), tags=True, tag_epochs=1,
                    encoder={**enc, "cache_dir": str(tmp_path / "fresh")})
    assert list(tmp_path.glob("mixllm_encoder/*/linear.npy"))  # a fine-tune ran
    np.testing.assert_array_equal(a.q_hat, b.q_hat)  # same seed, no cache: same predictions
    assert not np.array_equal(a.q_hat, plain.q_hat)  # the tag embeddings were used


def test_tags_encoder_errors_name_the_policy_param(tmp_path):
    wl = _with_texts(make_workload(n=60))
    with pytest.raises(PolicyError, match="mixllm.params.encoder.model_path") as err:
        make_policy(wl, infos(wl), tags=True,
                    encoder={"model_path": str(tmp_path / "missing")})
    assert "workload.encoder" not in str(err.value)


def test_refit_columns_fits_a_model_on_its_own_rows_only():
    # As if only those answers were logged: the column's predictions are those of a policy
    # set up on exactly those training rows (same k); other columns are left alone.
    from sim.context import training_set
    from sim.types import TrainingSet

    wl = make_workload()
    llms = infos(wl)
    pol = make_policy(wl, llms, knn_k=15)
    full = training_set(wl)
    subset = np.arange(0, len(full.rows), 3)
    before = pol.q_hat.copy()
    pol.refit_columns({0: subset})
    sub = TrainingSet(rows=full.rows[subset], models=full.models,
                      quality=full.quality[subset], output_tokens=full.output_tokens[subset],
                      valid_mask=np.zeros(len(subset), dtype=bool))
    ref = registry.create("mixllm", {"knn_k": 15})
    ref.setup(context_for(wl, llms, reference_llm=llms[-1].name,
                          rng=np.random.default_rng(0), train=sub))
    np.testing.assert_allclose(pol.q_hat[:, 0], ref.q_hat[:, 0])
    assert not np.allclose(before[:, 0], pol.q_hat[:, 0])
    np.testing.assert_array_equal(before[:, 1:], pol.q_hat[:, 1:])
    with pytest.raises(PolicyError, match="must index one of"):
        pol.refit_columns({1: np.array([len(full.rows)])})

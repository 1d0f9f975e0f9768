"""FrugalGPT-style cascade: escalation, paying for every attempt, acceptance calibration."""

from __future__ import annotations

import numpy as np
import pytest
from routing_workloads import MODELS, context, learnable_workload, llm_infos, reference

from policies import registry
from policies.cascade import ACCEPT_GRID
from reports.frontier import SingleLLM
from sim.context import request_cost_usd
from sim.offline import evaluate_offline, idle_view
from sim.types import SPLIT_TEST, Answer, JudgeInfo, LLMInfo, Query


@pytest.fixture(scope="module")
def wl():
    return learnable_workload()


@pytest.fixture(scope="module")
def cascade(wl):
    pol = registry.create("cascade")
    pol.setup(context(wl, llm_infos()))
    return pol


def _offline(pol, wl, seed=0):
    llms = llm_infos()
    return evaluate_offline(
        pol, wl, llms, wl.rows(SPLIT_TEST), reference=reference(llms), seed=seed
    )


def test_learned_chain_goes_cheapest_first(cascade):
    prices = {x.name: x.price_out_per_mtok for x in llm_infos()}
    chain = cascade.chain
    assert 2 <= len(chain) <= 3
    assert [prices[n] for n in chain] == sorted(prices[n] for n in chain)
    assert chain[0] == "small"


def test_cost_includes_every_attempt(cascade, wl):
    cascade.set_tradeoff(0.9)
    res = _offline(cascade, wl)
    assert 1.0 < res.attempts.mean() < len(cascade.chain)  # some escalate, not all
    # Recompute the bill by hand: query i paid for the first attempts[i] rungs.
    rows = wl.rows(SPLIT_TEST)
    info = {x.name: x for x in llm_infos()}
    total = 0.0
    for i, row in enumerate(rows):
        for name in cascade.chain[: res.attempts[i]]:
            x = info[name]
            total += float(
                request_cost_usd(
                    wl.input_tokens[row],
                    wl.output_tokens[row, x.model_col],
                    x.price_in_per_mtok,
                    x.price_out_per_mtok,
                )
            )
    assert res.cost_usd == pytest.approx(total, rel=1e-9)


def test_threshold_extremes(cascade, wl):
    cascade.set_tradeoff(0.0)
    first = _offline(cascade, wl)
    assert np.all(first.attempts == 1)
    assert first.route_share[cascade.chain[0]] == 1.0
    cascade.set_tradeoff(1.0)
    full = _offline(cascade, wl)
    assert np.all(full.attempts == len(cascade.chain))
    assert full.route_share[cascade.chain[-1]] == 1.0


def test_knob_is_monotone_and_beats_random(cascade, wl):
    llms = llm_infos()
    costs, quals = [], []
    for t in ACCEPT_GRID:
        cascade.set_tradeoff(t)
        r = _offline(cascade, wl)
        costs.append(r.cost_pct)
        quals.append(r.quality_pct)
    # Same judge draws per attempt (same seed): a higher threshold accepts at no rung where
    # a lower one escalated, so every query's bill is non-decreasing: exact monotonicity.
    assert np.all(np.diff(costs) >= -1e-9)
    rows = wl.rows(SPLIT_TEST)
    singles = [
        evaluate_offline(SingleLLM(x.name), wl, llms, rows, reference=reference(llms)) for x in llms
    ]
    rand_q = np.mean([s.quality_pct for s in singles])
    rand_c = np.mean([s.cost_pct for s in singles])
    costs, quals = np.array(costs), np.array(quals)
    # Margin as in test_predictive (sd of a test quality % about 2.6 points).
    assert quals[costs <= rand_c].max() > rand_q + 10.0


def test_acceptance_rises_with_the_judge_score(cascade, wl):
    cascade.set_tradeoff(0.5)
    llms = llm_infos()
    view = idle_view(llms)
    row = int(wl.rows(SPLIT_TEST)[0])
    q = Query(id=0, row=row, arrival_s=0.0, input_tokens=100, task=0)
    first = cascade.route(q, view).llm
    assert first == cascade.chain[0]
    col = cascade.llms[first].model_col
    p = cascade._p_good(col, np.linspace(0, 1, 11), np.full(11, cascade.q_hat[row, col]))
    assert np.all(np.diff(p) > 0)
    good = Answer(llm=first, judge_score=1.0, cost_usd=0.0, latency_s=0.0)
    bad = Answer(llm=first, judge_score=0.0, cost_usd=0.0, latency_s=0.0)
    assert cascade.on_answer(q, good, view) is None
    assert cascade.on_answer(q, bad, view).llm == cascade.chain[1]
    # The next rung cannot take it: skip to one that can, or accept when none is left.
    j = view.index(cascade.chain[1])
    view.up[j] = False
    view.refresh(j)
    nxt = cascade.on_answer(q, bad, view)
    assert (nxt is None) if len(cascade.chain) == 2 else (nxt.llm == cascade.chain[2])


def test_noisier_judge_is_trusted_less(wl):
    # With a judge as noisy as a coin, a perfect score says little, so the fitted
    # acceptance of a top score must fall.
    sharp = registry.create("cascade", {"judge_noise": 0.05, "chain": ["small", "large"]})
    blunt = registry.create("cascade", {"judge_noise": 1.0, "chain": ["small", "large"]})
    for pol in (sharp, blunt):
        pol.setup(context(wl, llm_infos()))
    args = (0, np.array([1.0]), np.array([0.5]))
    assert sharp._p_good(*args)[0] > blunt._p_good(*args)[0]
    assert sharp.chain == ("small", "large")


def test_the_acceptance_rule_is_calibrated_for_the_scenarios_judge(wl):
    """Without a judge_noise param the cascade calibrates for the judge it will meet (the
    scenario's judge.noise, via PolicyContext); the param overrides it."""
    from dataclasses import replace

    def fitted(ctx_noise, **params):
        pol = registry.create("cascade", {"chain": ["small", "large"], **params})
        pol.setup(replace(context(wl, llm_infos()), judge=JudgeInfo(noise=ctx_noise)))
        return pol

    sharp_scenario = fitted(0.05)
    assert sharp_scenario.judge_noise == 0.05
    assert fitted(1.0, judge_noise=0.05).judge_noise == 0.05
    args = (0, np.array([1.0]), np.array([0.5]))
    assert sharp_scenario._p_good(*args)[0] == pytest.approx(
        fitted(1.0, judge_noise=0.05)._p_good(*args)[0])
    assert sharp_scenario._p_good(*args)[0] > fitted(1.0)._p_good(*args)[0]


def test_validation_counts_the_judges_price_of_every_answer_but_the_last_rungs(wl):
    """The chain and threshold are chosen on validation costs that include judging each
    answer the cascade acts on: accepting the first answer pays one judged answer per row;
    running the whole chain pays one per rung except the last, whose answer is final."""
    from dataclasses import replace

    from policies.quality_model import validation_truth

    def fitted(judge):
        pol = registry.create("cascade", {"chain": ["small", "mid", "large"]})
        pol.setup(replace(context(wl, llm_infos()), judge=judge))
        return pol

    free, paid = fitted(JudgeInfo()), fitted(JudgeInfo(cost_usd=0.001))
    truth = validation_truth(free.ctx, free.split, list(free.ctx.llms), free.reference)
    n = len(free.split.valid_rows)
    for threshold, calls in ((0.0, 1), (1.0, 2)):
        q0, c0 = free._validation_point(threshold, truth)
        q1, c1 = paid._validation_point(threshold, truth)
        assert q1 == q0
        assert c1 - c0 == pytest.approx(100 * 0.001 * calls * n / truth.ref_cost)


def test_the_last_rungs_answer_is_final_and_not_judged(wl):
    """A chain that never accepts pays the judge for every answer but the last rung's, whose
    decision says final, offline and in the engine; a later rung that left the cluster
    makes an earlier one final."""
    from dataclasses import replace

    from helpers import llm, scenario
    from sim.engine import Simulation, prepare_inputs
    from sim.runner import build_workload
    from sim.scenario import JudgeSpec

    chain = ["small", "mid", "large"]
    llms = llm_infos()
    rows = wl.rows(SPLIT_TEST)

    def offline(cost):
        pol = registry.create("cascade", {"chain": chain, "accept_threshold": 1.0})
        pol.setup(replace(context(wl, llms), judge=JudgeInfo(cost_usd=cost)))
        return evaluate_offline(pol, wl, llms, rows, reference=reference(llms),
                                judge=JudgeSpec(cost_usd=cost))

    free, paid = offline(0.0), offline(0.01)
    assert (paid.attempts == 3).all()
    assert paid.cost_usd - free.cost_usd == pytest.approx(0.02 * len(rows))

    pol = registry.create("cascade", {"chain": chain, "accept_threshold": 1.0})
    pol.setup(context(wl, llms))
    q = Query(id=0, row=int(rows[0]), arrival_s=0.0, input_tokens=10, task=0)
    assert not pol.route(q, idle_view(llms)).final
    steps = [pol.on_answer(q, Answer(name, 0.0, 0.0, 0.0), idle_view(llms))
             for name in chain[:2]]
    assert [(d.llm, d.final) for d in steps] == [("mid", False), ("large", True)]
    without_large = idle_view([x for x in llms if x.name != "large"])
    assert pol.on_answer(q, Answer("small", 0.0, 0.0, 0.0), without_large).final

    def engine(cost):
        sc = scenario(duration_s=60, judge={"noise": 0.0, "cost_usd": cost},
                      llms=[llm("mistral-7b", price_in_per_mtok=0.2, price_out_per_mtok=0.2),
                            llm("mixtral-8x7b", price_in_per_mtok=0.6,
                                price_out_per_mtok=0.6), llm("gpt-4")],
                      run={"drain_s": None})
        pol = registry.create("cascade", {"chain": ["mistral-7b", "mixtral-8x7b", "gpt-4"],
                                          "accept_threshold": 1.0})
        inputs = prepare_inputs(sc, build_workload(sc, sc.seed), sc.seed)
        return Simulation(sc, pol, inputs, seed=sc.seed).run().requests

    free, paid = engine(0.0), engine(0.01)
    assert (paid["attempts"] == 3).all() and (paid["llm"] == "gpt-4").all()
    np.testing.assert_allclose((paid["cost_usd"] - free["cost_usd"]).to_numpy(), 0.02)


def test_the_engine_hands_the_scenarios_judge_to_policies():
    from helpers import llm, scenario
    from sim.engine import Simulation, prepare_inputs
    from sim.runner import build_workload

    sc = scenario(duration_s=20, judge={"noise": 0.2, "cost_usd": 0.001,
                                        "price_in_per_mtok": 3.0},
                  llms=[llm("gpt-4"), llm("mistral-7b", price_in_per_mtok=0.2,
                                          price_out_per_mtok=0.2)])
    pol = registry.create("cascade")
    wl = build_workload(sc, sc.seed)
    Simulation(sc, pol, prepare_inputs(sc, wl, sc.seed), seed=sc.seed)
    assert pol.ctx.judge == JudgeInfo(noise=0.2, cost_usd=0.001, price_in_per_mtok=3.0)
    assert pol.judge_noise == 0.2


def test_added_llm_joins_a_learned_chain(wl):
    pol = registry.create("cascade", {"accept_threshold": 0.5})
    pol.setup(context(wl, llm_infos(("mid", "large"))))
    assert pol.chain == ("mid", "large")
    small = llm_infos(("small",))[0]
    pol.on_llm_added(small)
    # `small` is the cheapest and right on half the queries: the learned chain starts there.
    assert pol.chain[0] == "small"
    pol.on_llm_removed("small")
    assert "small" not in pol.chain


def test_a_price_change_re_learns_the_chain(wl):
    pol = registry.create("cascade", {"accept_threshold": 0.5})
    pol.setup(context(wl, llm_infos()))
    assert pol.chain[0] == "small"
    # `small` now costs more than `large` while being worse: no longer Pareto-efficient.
    pol.on_price_changed(LLMInfo("small", "small", MODELS.index("small"), 100.0, 100.0))
    assert "small" not in pol.chain
    prices = {x.name: x.price_out_per_mtok for x in pol.llms.values()}
    assert [prices[n] for n in pol.chain] == sorted(prices[n] for n in pol.chain)


def test_threshold_one_runs_the_whole_chain_even_for_a_model_never_wrong_in_training(wl):
    import dataclasses

    from sim.errors import PolicyError
    from sim.types import SPLIT_TRAIN, SPLIT_VALID

    # `mid` right on every training and validation row: its calibration saturates at
    # p = 1.0 exactly, which used to pass p >= 1 and stop the chain at the first rung.
    q = wl.quality.copy()
    q[np.isin(wl.split, [SPLIT_TRAIN, SPLIT_VALID]), 1] = 1.0
    wl2 = dataclasses.replace(wl, quality=q)
    pol = registry.create("cascade", {"chain": ["mid", "large"], "accept_threshold": 1.0})
    pol.setup(context(wl2, llm_infos()))
    assert pol._p_good(1, np.array([0.0]), np.array([0.0]))[0] == 1.0
    assert (_offline(pol, wl2).attempts == 2).all()
    # A chain of one LLM is no cascade: refused up front, not a crash in setup.
    with pytest.raises(PolicyError, match="max_chain"):
        registry.create("cascade", {"max_chain": 1})

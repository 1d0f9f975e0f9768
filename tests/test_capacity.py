"""Capacity planning: Erlang C formulas, the search, minimality of the plan, bad input."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from typer.testing import CliRunner

from helpers import llm
from reports.capacity import Planner, planning_p95_wait, with_replicas, write_plan
from reports.erlang import erlang_b, erlang_c, late_share, replicas_for, wait_exceeds
from sim.cli import app
from sim.errors import RouteSimError
from sim.scenario import Scenario, load_scenario, parse_scenario

runner = CliRunner()


def _data(**kw) -> dict:
    """An API LLM with room to spare and two self-hosted LLMs with few slots, so their
    replica counts decide the wait; `random` spreads traffic evenly (load-independent)."""
    data = {
        "name": "cap",
        "seed": 5,
        "duration_s": 600.0,
        "warmup_s": 60.0,
        "arrivals": {"kind": "poisson", "rate_per_s": 3.0},
        "workload": {"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 800},
        "llms": [
            llm("gpt-4", replicas=4, slots=32),
            llm("llama-3.1-70b", price_in_per_mtok=0.0, price_out_per_mtok=0.0, slots=4,
                decode_tps=45, replica_cost_per_hour=12.0),
            llm("llama-3.1-8b", price_in_per_mtok=0.0, price_out_per_mtok=0.0, slots=8,
                decode_tps=130, replica_cost_per_hour=3.0),
        ],
        "users": {"patience_s": {"kind": "exponential", "mean": 60}},
        "policies": ["random"],
    }
    data.update(kw)
    return data


def _scenario(**kw) -> Scenario:
    return parse_scenario(_data(**kw))


# ------------------------------------------------------------------------------ Erlang C
def test_erlang_c_known_values():
    assert erlang_b(1, 1.0) == pytest.approx(0.5)
    assert erlang_c(1, 0.7) == pytest.approx(0.7)  # M/M/1: P(wait) = rho
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)  # M/M/2 at rho = 0.5
    assert erlang_c(3, 3.0) == 1.0 and erlang_c(3, 0.0) == 0.0
    # M/M/1: P(W > t) = rho * exp(-(mu - lam) t)
    assert wait_exceeds(1, 0.5, 1.0, 2.0) == pytest.approx(0.5 * math.exp(-1.0))


def test_replicas_for_is_the_smallest_sufficient_count():
    rates, weights, s, slots, slo = [2.0, 6.0], [1.0, 1.0], 4.0, 4, 2.0
    r = replicas_for(rates, weights, s, slots, slo, max_replicas=20)
    assert r is not None and r > 1
    assert late_share(r * slots, rates, weights, s, slo) <= 0.05
    assert late_share((r - 1) * slots, rates, weights, s, slo) > 0.05
    assert replicas_for(rates, weights, s, slots, slo, max_replicas=r - 1) is None


def test_with_replicas_changes_initial_and_added_llms():
    sc = _scenario(events=[{"at_s": 100, "add_llm": llm(
        "mixtral-8x7b", price_in_per_mtok=0.0, price_out_per_mtok=0.0,
        replica_cost_per_hour=6.0)}])
    new = with_replicas(sc, {"llama-3.1-70b": 5, "mixtral-8x7b": 3})
    assert new.llm("llama-3.1-70b").replicas == 5
    assert new.llm("mixtral-8x7b").replicas == 3
    assert new.llm("llama-3.1-8b").replicas == 1 and sc.llm("llama-3.1-70b").replicas == 1


def test_rejections_count_as_missed_waits():
    import polars as pl

    m = pl.DataFrame({"outcome": ["completed"] * 90 + ["rejected"] * 10,
                      "wait_s": [0.0] * 100})
    assert planning_p95_wait(m) == math.inf
    # Requests still queued when the run stops count with their wait so far (as in the
    # summary): before, they were left out and a backlog at the horizon looked feasible.
    stuck = pl.DataFrame({"outcome": ["completed"] * 90 + ["in_flight"] * 10,
                          "wait_s": [0.0] * 90 + [16.0] * 10})
    assert planning_p95_wait(stuck) == pytest.approx(16.0)


# -------------------------------------------------------------------------------- search
@pytest.fixture(scope="module")
def plan():
    planner = Planner(_scenario(), "random", 2.0, max_replicas=8, seeds=2)
    return planner.plan()


def test_plan_meets_the_slo_at_the_stated_cost(plan, tmp_path):
    assert plan.feasible and plan.minimal
    ev = plan.chosen
    assert ev.meets_slo and ev.p95_wait_s <= 2.0
    reps = plan.replicas()
    assert set(reps) == {"llama-3.1-70b", "llama-3.1-8b"}  # the API LLM is not sized
    assert ev.replica_cost_per_hour == pytest.approx(
        12.0 * reps["llama-3.1-70b"] + 3.0 * reps["llama-3.1-8b"])
    assert ev.cost_per_hour == pytest.approx(ev.replica_cost_per_hour + ev.api_cost_per_hour)
    assert ev.api_cost_per_hour > 0  # random sends a third of the traffic to gpt-4
    # the slow, few-slot 70B needs more than one replica at a third of 3 req/s
    assert reps["llama-3.1-70b"] >= 2
    js, html = write_plan(plan, tmp_path)
    data = json.loads(js.read_text())
    for key in ("replicas", "cost_per_hour", "p95_wait_s", "meets_slo",
                "quality_pct_of_reference"):
        assert key in data
    assert data["replicas"] == reps and data["meets_slo"] is True
    assert 'name="routesim-figures"' in html.read_text(encoding="utf-8")
    # The resolved config beside it: as planned, and with the chosen replicas (runnable).
    planned = load_scenario(tmp_path / "scenario.yaml")
    chosen = load_scenario(tmp_path / "chosen.yaml")
    assert planned.slo.p95_wait_s == 2.0 and [p.name for p in planned.policies] == ["random"]
    assert {x.name: x.replicas for x in chosen.llms if x.name in reps} == reps
    assert chosen.model_copy(update={"llms": planned.llms}) == planned


def test_plan_is_minimal(plan):
    """Removing one replica from any LLM breaks the SLO: checked by a fresh planner (no
    cache) on the same seeds."""
    fresh = Planner(_scenario(), "random", 2.0, max_replicas=8, seeds=2)
    again = fresh.evaluate(plan.chosen.config, "check")
    assert again.feasible and again.p95_wait_s == pytest.approx(plan.chosen.p95_wait_s)
    checked = 0
    for i, name in enumerate(fresh.llms):
        cfg = list(plan.chosen.config)
        if cfg[i] == 1:
            continue  # every LLM keeps at least one replica
        cfg[i] -= 1
        ev = fresh.evaluate(tuple(cfg), "minus one")
        assert not ev.meets_slo, f"{name}: {cfg} still meets the SLO"
        checked += 1
    assert checked >= 1


def test_analytic_start_comes_from_observed_shares(plan):
    a = plan.analytic["llama-3.1-70b"]
    # random over three LLMs: a third of the traffic each. About 3 req/s x 540 s = 1620
    # measured requests, so the share's sd is sqrt(1/3 x 2/3 / 1620) = 0.0117: 4.5 of them.
    assert abs(a["route_share_pilot"] - 1 / 3) < 4.5 * math.sqrt(2 / 9 / 1620)
    assert a["replicas"] >= 1 and a["mean_service_full_batch_s"] > 0
    assert any(e.stage == "analytic" for e in plan.tried)


def test_plan_for_a_load_following_router_is_the_cheapest_of_all_configurations():
    # least_loaded sends more traffic to the self-hosted 8B as it gets replicas, which
    # takes per-token spend off gpt-4: a replica added can lower the cost per hour. The
    # search used to only remove replicas and stopped at 70b=1, 8b=1 ($82.29/h); every one
    # of the 36 configurations, simulated on the same seeds, says 70b=1, 8b=5 ($73.12/h).
    import itertools

    planner = Planner(_scenario(), "least_loaded", 2.0, max_replicas=6, seeds=2)
    plan = planner.plan()
    assert plan.feasible and plan.minimal
    feasible = [ev for cfg in itertools.product(range(1, 7), repeat=2)
                if (ev := planner.evaluate(cfg, "all")).feasible]
    best = min(feasible, key=lambda e: e.cost_per_hour)
    assert plan.chosen.config == best.config
    assert plan.chosen.cost_per_hour == pytest.approx(best.cost_per_hour)


def test_quality_floor_is_a_constraint():
    planner = Planner(_scenario(), "random", 2.0, max_replicas=3, seeds=1,
                      quality_floor=150.0)
    result = planner.plan()
    assert not result.feasible
    assert "quality floor 150%" in result.message and "best found" in result.message


# ------------------------------------------------------------------------------- the CLI
def _write(tmp_path, data) -> str:
    path = tmp_path / "cap.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_impossible_slo_says_so_and_exits_non_zero(tmp_path):
    path = _write(tmp_path, _data(duration_s=300.0))
    out = tmp_path / "plan"
    res = runner.invoke(app, ["plan", path, "--policy", "random", "--slo-p95-wait", "2",
                              "--max-replicas", "1", "--seeds", "1", "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "no configuration within --max-replicas 1" in res.output
    assert "best found" in res.output
    data = json.loads((out / "plan.json").read_text())
    assert data["meets_slo"] is False and data["feasible"] is False
    assert data["replicas"] == {"llama-3.1-70b": 1, "llama-3.1-8b": 1}
    assert (out / "plan.html").is_file()


def test_no_self_hosted_llm_is_bad_input(tmp_path):
    data = _data()
    for spec in data["llms"]:
        spec.pop("replica_cost_per_hour", None)
    path = _write(tmp_path, data)
    res = runner.invoke(app, ["plan", path, "--policy", "random",
                              "--slo-p95-wait", "2", "--out", str(tmp_path / "p")])
    assert res.exit_code == 2
    # Names the file (not the scenario's name) and the field.
    assert f"{path}: llms.replica_cost_per_hour" in res.output
    assert not (tmp_path / "p").exists()


def test_unknown_policy_and_bad_slo_are_bad_input(tmp_path):
    path = _write(tmp_path, _data())
    res = runner.invoke(app, ["plan", path, "--policy", "nope", "--slo-p95-wait", "2"])
    assert res.exit_code == 2 and "unknown policy 'nope'" in res.output
    with pytest.raises(RouteSimError, match="--slo-p95-wait"):
        Planner(_scenario(), "random", -1.0)


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_the_plan_never_simulates_more_configurations_than_its_budget(budget):
    # A quality floor no configuration meets (5x the reference LLM's): the climb spends the
    # whole budget, and the last-resort check of every LLM at --max-replicas must not add
    # one more.
    plan = Planner(_scenario(), "random", 2.0, max_replicas=3, seeds=1, quality_floor=500.0,
                   max_evaluations=budget).plan()
    assert not plan.feasible
    assert len(plan.tried) == budget
    # Said as it is: the budget ran out before every LLM at --max-replicas was tried, or
    # that configuration, the most capacity there is, fails too.
    top_tried = (3, 3) in {e.config for e in plan.tried}
    assert ("no configuration within" if top_tried else "evaluation budget of") in plan.message


def test_plans_for_routers_that_see_ground_truth_are_labelled_upper_bounds(tmp_path):
    """The oracle and a fan-out kept by realised quality route traffic no deployable router
    would: their plans say so in the message, plan.json and plan.html; a plain router's
    plan does not."""
    plain = Planner(_scenario(), "random", 2.0, max_replicas=3, seeds=1,
                    max_evaluations=2).plan()
    assert not plain.upper_bound and "UPPER BOUND" not in plain.message
    assert plain.as_json()["upper_bound"] is False

    oracle = Planner(_scenario(), "oracle", 2.0, max_replicas=3, seeds=1,
                     max_evaluations=2).plan()
    assert oracle.upper_bound and "true quality" in oracle.upper_bound_reason
    assert "UPPER BOUND" in oracle.message

    fan_out = _scenario(policies=[{"name": "mixllm", "label": "mixllm top-2",
                                   "params": {"top_k": 2, "keep": "best_realised"}}])
    plan = Planner(fan_out, "mixllm top-2", 2.0, max_replicas=3, seeds=1,
                   max_evaluations=2).plan()
    assert plan.upper_bound and "by realised quality" in plan.upper_bound_reason
    js, html = write_plan(plan, tmp_path)
    data = json.loads(js.read_text())
    assert data["upper_bound"] is True and "realised" in data["upper_bound_reason"]
    assert "Upper bound:" in html.read_text(encoding="utf-8")

    judged = _scenario(policies=[{"name": "mixllm", "label": "mixllm judged",
                                  "params": {"top_k": 2, "keep": "best_judged"}}])
    assert not Planner(judged, "mixllm judged", 2.0, max_replicas=3, seeds=1,
                       max_evaluations=2).plan().upper_bound


def test_plan_takes_data_like_run_and_rejects_it_for_a_synthetic_scenario(tmp_path):
    data_file = tmp_path / "data.csv"
    data_file.write_text("a,b\n1,2\n")
    res = runner.invoke(app, ["plan", _write(tmp_path, _data()), "--policy", "random",
                              "--slo-p95-wait", "2", "--data", str(data_file),
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "--data" in res.output and "synthetic" in res.output
    assert not (tmp_path / "p").exists()


def test_plan_errors_in_a_scenario_policys_params_point_at_its_entry(tmp_path):
    data = _data(policies=["random", {"name": "threshold", "params": {"strong": "gpt-5"}}])
    path = _write(tmp_path, data)
    res = runner.invoke(app, ["plan", path, "--policy", "threshold", "--slo-p95-wait", "2",
                              "--out", str(tmp_path / "p")])
    assert res.exit_code == 2
    assert f"{path}: policies.1.params.strong: 'gpt-5'" in res.output
    assert not (tmp_path / "p").exists()


def test_the_planning_percentile_interpolates_like_numpy_and_handles_rejections():
    import numpy as np

    from reports.capacity import _percentile

    rng = np.random.default_rng(3)
    for n in (1, 2, 20, 21, 101):
        w = rng.exponential(1.0, n)
        for q in (50.0, 95.0, 99.0):
            assert _percentile(w, q) == pytest.approx(float(np.percentile(w, q)), rel=1e-12)
    # 21 waits, one rejection (inf): the 95th percentile's rank (19) is the finite 1.0;
    # numpy gives NaN there (1.0 + (inf - 1.0) * 0), which used to become inf.
    w = np.array([0.0] * 19 + [1.0, math.inf])
    assert _percentile(w, 95.0) == 1.0
    assert _percentile(np.array([0.0] * 18 + [1.0, math.inf, math.inf]), 95.0) == math.inf
    assert _percentile(np.array([0.0, 2.0, math.inf]), 25.0) == 1.0

"""Every class of bad scenario input: a clear message (file, field, rule), exit code 2, no
traceback and no output directory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sim.cli import app
from sim.errors import ScenarioError
from sim.scenario import load_scenario

GOOD = {
    "name": "bad_input",
    "seed": 1,
    "duration_s": 100,
    "workload": {"source": "synthetic", "reference_llm": "gpt-4", "n_queries": 100},
    "arrivals": {"kind": "poisson", "rate_per_s": 1.0},
    "llms": [
        {"name": "gpt-4", "price_in_per_mtok": 10, "price_out_per_mtok": 30, "slots": 4},
        {"name": "mistral-7b", "price_in_per_mtok": 0.2, "price_out_per_mtok": 0.2},
    ],
    "events": [{"at_s": 50, "outage": {"llm": "gpt-4", "duration_s": 10}}],
    "policies": ["random"],
}


def mutate(fn):
    d = copy.deepcopy(GOOD)
    fn(d)
    return d


CASES = {
    "missing_field": (mutate(lambda d: d.pop("duration_s")), "duration_s",
                      "required field is missing"),
    "missing_llm_price": (mutate(lambda d: d["llms"][0].pop("price_in_per_mtok")),
                          "llms.0.price_in_per_mtok", "missing"),
    "wrong_type": (mutate(lambda d: d["llms"][0].update(slots="many")), "llms.0.slots",
                   "integer"),
    "zero_rate": (mutate(lambda d: d["arrivals"].update(rate_per_s=0)), "arrivals.rate_per_s",
                  "greater than 0"),
    "negative_rate": (mutate(lambda d: d["arrivals"].update(rate_per_s=-2)),
                      "arrivals.rate_per_s", "greater than 0"),
    "zero_slots": (mutate(lambda d: d["llms"][0].update(slots=0)), "llms.0.slots",
                   "greater than or equal to 1"),
    "unknown_kind": (mutate(lambda d: d["arrivals"].update(kind="bursty")), "arrivals.kind",
                     "unknown kind 'bursty'"),
    "unknown_key": (mutate(lambda d: d["llms"][0].update(replica=2)), "llms.0.replica",
                    "did you mean 'replicas'"),
    "unknown_top_key": (mutate(lambda d: d.update(duraton_s=5)), "duraton_s",
                        "did you mean 'duration_s'"),
    "unknown_llm_in_event": (
        mutate(lambda d: d["events"][0]["outage"].update(llm="gpt-5")),
        "events.0.outage.llm", "'gpt-5': names no LLM in the cluster"),
    "event_before_zero": (mutate(lambda d: d["events"][0].update(at_s=-1)), "events.0.at_s",
                          "greater than or equal to 0"),
    "event_two_actions": (
        mutate(lambda d: d["events"][0].update(remove_llm="mistral-7b")), "events.0",
        "exactly one of"),
    "duplicate_llm": (mutate(lambda d: d["llms"].append(dict(d["llms"][0]))), "llms.2.name",
                      "unique"),
    "bad_reference": (mutate(lambda d: d["workload"].update(reference_llm="gpt-9")),
                      "workload.reference_llm", "must name one of"),
    "warmup_too_long": (mutate(lambda d: d.update(warmup_s=200)), "warmup_s",
                        "less than duration_s"),
    "infinite_duration": (mutate(lambda d: d.update(duration_s=float("inf"))), "duration_s",
                          "finite number"),
    "nan_rate": (mutate(lambda d: d["arrivals"].update(rate_per_s=float("nan"))),
                 "arrivals.rate_per_s", "finite number"),
    "boolean_seed": (mutate(lambda d: d.update(seed=True)), "seed", "valid integer"),
    "fractional_slots": (mutate(lambda d: d["llms"][0].update(slots=2.0)), "llms.0.slots",
                         "valid integer"),
    "dots_name": (mutate(lambda d: d.update(name="..")), "name", "only dots"),
    "event_after_arrivals_stop": (mutate(lambda d: d["events"][0].update(at_s=100)),
                                  "events.0.at_s", "must be before duration_s=100"),
    "unknown_family_in_mix": (
        mutate(lambda d: d["workload"].update(mix={"cod": 1.0})), "workload.mix.cod",
        "unknown task family (did you mean 'code'?)"),
    "reserved_name": (mutate(lambda d: d.update(name="summary.parquet")), "name",
                      "a file routesim writes"),
    "name_too_long": (mutate(lambda d: d.update(name="a" * 121)), "name",
                      "at most 120 characters"),
    "a_mapping_for_a_number": (mutate(lambda d: d.update(duration_s={"s": 1})), "duration_s",
                               "valid number (got a mapping)"),
    "quoted_number": (mutate(lambda d: d.update(duration_s="100")), "duration_s",
                      "valid number"),
    "switch_as_number": (mutate(lambda d: d.update(judge={"noise": True})), "judge.noise",
                         "valid number"),
    "quoted_probability": (mutate(lambda d: d.update(feedback={"probability": "0.5"})),
                           "feedback.probability", "valid number"),
    "quoted_fraction": (mutate(lambda d: d["workload"].update(train_fraction="0.5")),
                        "workload.train_fraction", "valid number"),
    "quoted_amplitude": (
        mutate(lambda d: d.update(arrivals={"kind": "diurnal", "mean_rate_per_s": 1.0,
                                            "amplitude": "0.5"})),
        "arrivals.amplitude", "valid number"),
    "quoted_cv": (
        mutate(lambda d: d.update(users={"patience_s": {"kind": "lognormal", "mean": 30,
                                                        "cv": "2"}})),
        "users.patience_s.cv", "valid number"),
    "slots_beyond_int64": (mutate(lambda d: d["llms"][0].update(slots=2**63)), "llms.0.slots",
                           "less than or equal to 1000000000"),
    "huge_patience_cv": (
        mutate(lambda d: d.update(users={"patience_s": {"kind": "lognormal", "mean": 30,
                                                        "cv": 1e200}})),
        "users.patience_s.cv", "less than or equal to 1000"),
    "rate_beyond_any_run": (mutate(lambda d: d["arrivals"].update(rate_per_s=1e12)),
                            "arrivals.rate_per_s", "arrivals in duration_s=100"),
    "empty_mix_change": (
        mutate(lambda d: d["events"].append({"at_s": 50, "mix_change": {"mix": {}}})),
        "events.1.mix_change.mix", "an empty mix names no family"),
    "mix_change_to_a_family_without_rows": (
        mutate(lambda d: (d["workload"].update(mix={"knowledge_qa": 1}), d["events"].append(
            {"at_s": 50, "mix_change": {"mix": {"code": 1}}}))),
        "events.1.mix_change.mix.code", "has no rows in workload.split='test'"),
    "train_mix_of_a_data_file": (
        mutate(lambda d: d["workload"].update(source="routerbench", path="x.csv",
                                              train_mix={"mbpp": 1})),
        "workload.train_mix", "synthetic workload's training split only"),
    "mmpp_with_two_closed_classes": (
        mutate(lambda d: d.update(arrivals={"kind": "mmpp", "states": [
            {"rate_per_s": 1, "mean_sojourn_s": 1}, {"rate_per_s": 1, "mean_sojourn_s": 1},
            {"rate_per_s": 50, "mean_sojourn_s": 1}, {"rate_per_s": 50, "mean_sojourn_s": 1}],
            "transition": [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]})),
        "arrivals.transition", "once in states {0, 1} and {2, 3}"),
    "mmpp_switching_too_often": (  # 2e6 expected switches: beyond the 1e6 simulated
        mutate(lambda d: d.update(duration_s=1000, arrivals={"kind": "mmpp", "states": [
            {"rate_per_s": 1, "mean_sojourn_s": 5e-4},
            {"rate_per_s": 2, "mean_sojourn_s": 5e-4}]})),
        "arrivals.states.0.mean_sojourn_s", "2e+06 state switches"),
    "mmpp_switching_forever": (
        mutate(lambda d: d.update(arrivals={"kind": "mmpp", "states": [
            {"rate_per_s": 1, "mean_sojourn_s": 1e-20},
            {"rate_per_s": 2, "mean_sojourn_s": 1e-6}]})),
        "arrivals.states.0.mean_sojourn_s", "state switches"),
    "samples_beyond_any_run": (mutate(lambda d: d.update(run={"sample_every_s": 1e-300})),
                               "run.sample_every_s", "timeline samples"),
    "unknown_family_in_mix_change": (
        mutate(lambda d: d["events"].append({"at_s": 60, "mix_change": {"mix": {"fooo": 1}}})),
        "events.1.mix_change.mix.fooo", "unknown task family"),
}


def write(tmp_path: Path, data) -> Path:
    p = tmp_path / "scenario.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_good_scenario_loads(tmp_path):
    sc = load_scenario(write(tmp_path, GOOD))
    assert sc.llms[0].slots == 4


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_scenario_error_names_file_and_field(tmp_path, case):
    data, field, rule = CASES[case]
    p = write(tmp_path, data)
    with pytest.raises(ScenarioError) as exc:
        load_scenario(p)
    msg = str(exc.value)
    assert str(p) in msg and field in msg and rule in msg, msg
    assert "(top level)" not in msg and "(got 'dict')" not in msg, msg


@pytest.mark.parametrize(
    "text, rule",
    [("", "the file is empty"), ("name: [unclosed\n", "malformed YAML at line"),
     ("- a\n- b\n", "a scenario is a YAML mapping")],
)
def test_unparseable_files(tmp_path, text, rule):
    p = write(tmp_path, text)
    with pytest.raises(ScenarioError, match=rule):
        load_scenario(p)


def test_missing_file_lists_builtins(tmp_path):
    with pytest.raises(ScenarioError, match="no such file; built-in scenarios: .*load_spike"):
        load_scenario(tmp_path / "nope.yaml")


def test_a_missing_file_is_never_replaced_by_the_builtin_of_that_name(tmp_path):
    """Only a bare name (or the shipped scenarios/NAME.yaml path) means a built-in: a
    missing file elsewhere that happens to be called steady.yaml is an error."""
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "experiments" / "steady.yaml")
    res = runner.invoke(app, ["validate", str(tmp_path / "experiments" / "outage.yaml")])
    assert res.exit_code == 2 and "no such file" in res.output
    assert load_scenario("steady").name == load_scenario("steady.yaml").name == "steady"
    assert load_scenario("scenarios/outage.yaml").name == "outage"


def test_yaml_merge_keys_still_work(tmp_path):
    """`<<: *anchor` copies a mapping whose keys the new one may override: not a repeat."""
    text = yaml.safe_dump(GOOD, sort_keys=False).replace(
        "- name: gpt-4\n", "- &big\n  name: gpt-4\n").replace(
        "- name: mistral-7b\n", "- <<: *big\n  name: mistral-7b\n")
    assert "<<: *big" in text
    sc = load_scenario(write(tmp_path, text))
    assert [x.name for x in sc.llms] == ["gpt-4", "mistral-7b"]
    assert sc.llms[1].slots == 4  # from the anchor
    assert sc.llms[1].price_in_per_mtok == 0.2  # overridden
    # Two `<<` in one mapping would drop the first one's keys: a repeated key too.
    twice = text.replace("- <<: *big\n", "- <<: *big\n  <<: *big\n")
    with pytest.raises(ScenarioError, match="duplicate key '<<'"):
        load_scenario(write(tmp_path, twice))


def test_a_repeated_key_in_a_sweep_grid_is_an_error(tmp_path):
    from sim.sweep import GridError, load_grid

    p = tmp_path / "g.yaml"
    p.write_text("name: g\nbase: steady\nname: h\n")
    with pytest.raises(GridError, match="duplicate key 'name'"):
        load_grid(p)


def test_a_repeated_key_is_an_error_not_last_one_wins(tmp_path):
    text = yaml.safe_dump(GOOD, sort_keys=False).replace(
        "duration_s: 100\n", "duration_s: 100\nduration_s: 200\n")
    p = write(tmp_path, text)
    with pytest.raises(ScenarioError, match=r"malformed YAML at line \d+.*duplicate key "
                                            r"'duration_s' \(first at line \d+\)"):
        load_scenario(p)


runner = CliRunner()


@pytest.mark.parametrize("case", ["zero_rate", "unknown_llm_in_event", "unknown_key"])
def test_cli_run_bad_scenario_exit_2_no_output(tmp_path, case):
    data, field, _ = CASES[case]
    p = write(tmp_path, data)
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(p), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert field in res.output and str(p) in res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_cli_unknown_policy_lists_choices(tmp_path):
    p = write(tmp_path, mutate(lambda d: d.update(policies=["random", "smartest"])))
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(p), "--out", str(out)])
    assert res.exit_code == 2
    assert "policies.1" in res.output and "unknown policy 'smartest'" in res.output
    assert "least_loaded" in res.output and not out.exists()
    res = runner.invoke(app, ["run", str(p), "--policy", "nope", "--out", str(out)])
    assert res.exit_code == 2 and "--policy" in res.output and not out.exists()


def test_cli_bad_policy_params(tmp_path):
    p = write(tmp_path, mutate(lambda d: d.update(
        policies=[{"name": "cheapest", "params": {"output_shar": 0.3}}])))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2
    assert "policies.0.params.output_shar" in res.output and "output_share" in res.output


@pytest.mark.parametrize(
    "name, params, field",
    [("knn", {"k": True}, "k"), ("knn", {"k": "5"}, "k"), ("knn", {"k": 2.0}, "k"),
     ("knn", {"same_task": "no"}, "same_task"), ("cheapest", {"output_share": "0.5"},
                                                  "output_share"),
     ("mixllm", {"online": "yes"}, "online"), ("mixllm", {"online": 1}, "online"),
     ("cascade", {"chain": [1, 2]}, "chain.0")],
)
def test_policy_params_are_not_coerced(tmp_path, name, params, field):
    p = write(tmp_path, mutate(lambda d: d.update(policies=[{"name": name, "params": params}])))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2, res.output
    assert f"policies.0.params.{field}" in res.output and "Traceback" not in res.output


def test_policy_params_take_ints_as_floats_and_lists_as_chains(tmp_path):
    p = write(tmp_path, mutate(lambda d: d.update(policies=[
        {"name": "mixllm", "params": {"lambda_": 8, "online": True}},
        {"name": "cascade", "params": {"chain": ["mistral-7b", "gpt-4"]}}])))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 0, res.output


def test_cli_validate_ok_and_empty_file(tmp_path):
    res = runner.invoke(app, ["validate", str(write(tmp_path, GOOD))])
    assert res.exit_code == 0 and "ok" in res.output
    res = runner.invoke(app, ["validate", str(write(tmp_path, ""))])
    assert res.exit_code == 2 and "empty" in res.output and "Traceback" not in res.output


def test_policy_params_naming_absent_llms_fail_validation_before_any_run(tmp_path):
    p = write(tmp_path, mutate(lambda d: d.update(policies=[
        "random", {"name": "threshold", "params": {"strong": "gpt-5"}}])))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and str(p) in res.output
    assert "policies.1.params.strong" in res.output and "gpt-5" in res.output
    assert "choose from: gpt-4, mistral-7b" in res.output
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(p), "--out", str(out)])
    assert res.exit_code == 2 and not out.exists()  # random did not run first
    p = write(tmp_path, mutate(lambda d: d.update(policies=[
        {"name": "cascade", "params": {"chain": ["mistral-7b", "nope"]}}])))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "policies.0.params.chain" in res.output
    assert "'nope'" in res.output


def test_files_a_scenario_reads_are_checked_up_front(tmp_path):
    trace = mutate(lambda d: d.update(arrivals={"kind": "trace", "path": "missing.csv"}))
    res = runner.invoke(app, ["validate", str(write(tmp_path, trace))])
    assert res.exit_code == 2 and "arrivals.path" in res.output
    assert "no such file" in res.output
    data = mutate(lambda d: d.update(workload={"source": "routerbench", "path": "nope.csv",
                                               "reference_llm": "gpt-4"}))
    p = write(tmp_path, data)
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(p), "--out", str(out)])
    assert res.exit_code == 2 and "workload.path" in res.output and "--data" in res.output
    assert not out.exists()


def test_data_for_a_synthetic_scenario_is_an_error(tmp_path):
    data_file = tmp_path / "data.csv"
    data_file.write_text("a,b\n1,2\n")
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(write(tmp_path, GOOD)), "--data", str(data_file),
                              "--out", str(out)])
    assert res.exit_code == 2 and "--data" in res.output and "synthetic" in res.output
    assert not out.exists()


def test_mixllm_tags_on_a_synthetic_workload_fails_validation_before_any_run(tmp_path):
    p = write(tmp_path, mutate(lambda d: d.update(policies=[
        "random", {"name": "mixllm", "params": {"tags": True}}])))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "policies.1.params.tags" in res.output
    assert "needs query texts" in res.output


@pytest.mark.parametrize("learner", ["knn", "strongest", "mixllm"])
def test_a_learning_router_with_no_training_rows_fails_before_any_run(tmp_path, learner):
    # workload.split 'all': arrivals sample every row, and no policy learns from a row it
    # may be scored on, so nothing is left to learn from.
    p = write(tmp_path, mutate(lambda d: (
        d["workload"].update(split="all"), d.update(policies=["random", learner]))))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "workload.split" in res.output
    assert f"'{learner}'" in res.output and "split 'test'" in res.output
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", str(p), "--out", str(out)])
    assert res.exit_code == 2 and not out.exists()  # random did not run first
    ok = write(tmp_path, mutate(lambda d: (
        d["workload"].update(split="all"), d.update(policies=["random", "least_loaded"]))))
    assert runner.invoke(app, ["validate", str(ok)]).exit_code == 0


def test_validate_reads_a_trace_whose_times_miss_the_run(tmp_path):
    trace = tmp_path / "epoch.csv"
    trace.write_text("t\n1700000000\n1700000001\n")
    p = write(tmp_path, mutate(lambda d: d.update(
        arrivals={"kind": "trace", "path": str(trace)})))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "shift_to_zero" in res.output


def test_deeply_nested_yaml_is_bad_input_not_a_crash(tmp_path):
    p = write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ScenarioError, match="malformed YAML"):
        load_scenario(p)


def test_infinite_policy_params_are_refused(tmp_path):
    data = mutate(lambda d: d.update(
        policies=[{"name": "mixllm", "params": {"beta": float("inf")}}]))
    p = write(tmp_path, data)
    assert "beta: .inf" in p.read_text()
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "policies.0.params.beta" in res.output, res.output
    assert "finite number" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "body, rule",
    [("t\n", "no timestamps"), ("t\ntrue\nfalse\n", "true/false"),
     ("t\n1\ninf\n", "infinite")],
)
def test_bad_trace_contents(tmp_path, body, rule):
    (tmp_path / "trace.csv").write_text(body)
    data = mutate(lambda d: d.update(arrivals={"kind": "trace", "path": "trace.csv"}))
    res = runner.invoke(app, ["validate", str(write(tmp_path, data))])
    assert res.exit_code == 2 and rule in res.output and "arrivals." in res.output, res.output


def test_a_looped_trace_beyond_any_run_is_refused(tmp_path):
    (tmp_path / "trace.csv").write_text("t\n0\n1e-9\n")
    data = mutate(lambda d: d.update(
        arrivals={"kind": "trace", "path": "trace.csv", "loop": True}))
    res = runner.invoke(app, ["validate", str(write(tmp_path, data))])
    assert res.exit_code == 2 and "arrivals.loop" in res.output, res.output


def test_validate_reads_the_data_files_family_names(tmp_path):
    # A typo in a RouterBench mix passed validate and failed every run.
    from test_routerbench import make_rows, write_scenario
    from test_routerbench import write as write_table

    sc = write_scenario(
        tmp_path, write_table(tmp_path, make_rows()),
        [{"name": "big-model", "price_in_per_mtok": 1, "price_out_per_mtok": 1}],
        events=[{"at_s": 10, "mix_change": {"mix": {"quiz": 1, "cods": 1}}}])
    res = runner.invoke(app, ["validate", str(sc)])
    assert res.exit_code == 2, res.output
    assert "events.0.mix_change.mix.cods" in res.output and "did you mean 'code'" in res.output


def test_validate_checks_the_text_encoders_weights_before_the_data(tmp_path):
    (tmp_path / "garbage.csv").write_text("a,b\n1,2\n")  # never read: the encoder fails first
    sc = tmp_path / "rb.yaml"
    sc.write_text(yaml.safe_dump({
        "name": "rb", "duration_s": 10, "arrivals": {"kind": "poisson", "rate_per_s": 1},
        "workload": {"source": "routerbench", "path": "garbage.csv",
                     "reference_llm": "gpt-4-1106-preview",
                     "encoder": {"model_path": str(tmp_path / "no_model")}},
        "llms": [{"name": "gpt-4-1106-preview", "price_in_per_mtok": 10,
                  "price_out_per_mtok": 30}],
    }))
    for command in ("validate", "run"):
        res = runner.invoke(app, [command, str(sc), "--out", str(tmp_path / "o")]
                            if command == "run" else [command, str(sc)])
        assert res.exit_code == 2, res.output
        assert "workload.encoder.model_path" in res.output and "no config.json" in res.output
        assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_validate_reads_the_data_files_columns(tmp_path):
    (tmp_path / "garbage.csv").write_text("a,b\n1,2\n")
    res = runner.invoke(app, ["validate", "routerbench_steady", "--data",
                              str(tmp_path / "garbage.csv")])
    assert res.exit_code == 2 and "missing required column 'prompt'" in res.output, res.output


@pytest.mark.parametrize("out", ["", "   "])
def test_an_empty_out_is_bad_input(tmp_path, out, monkeypatch):
    from sim.errors import RouteSimError
    from sim.runner import run

    grid = tmp_path / "grid" / "g.yaml"
    grid.parent.mkdir()
    grid.write_text("name: g\nbase: steady\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(RouteSimError, match="is empty"):
        run("steady", policies=["random"], out=out)
    for command in (["run", "steady", "--policy", "random"], ["frontier", "steady"],
                    ["plan", "steady", "--policy", "random", "--slo-p95-wait", "2"],
                    ["sweep", str(grid)]):
        res = runner.invoke(app, [*command, "--out", out])
        assert res.exit_code == 2 and "--out" in res.output, (command, res.output)
    assert list(work.iterdir()) == []  # nothing written into the working directory


def test_an_unwritable_out_is_bad_input(tmp_path, monkeypatch):
    import os

    import sim.record

    real = os.access
    monkeypatch.setattr(sim.record.os, "access",
                        lambda p, mode: False if Path(p) == tmp_path else real(p, mode))
    res = runner.invoke(app, ["run", "--policy", "random", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not writable" in res.output and "--out" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_a_label_too_long_for_a_directory_fails_before_any_run(tmp_path):
    p = write(tmp_path, mutate(lambda d: d.update(policies=[
        "random", {"name": "random", "label": "r" * 256}])))
    assert runner.invoke(app, ["validate", str(p)]).exit_code == 0  # no directory: fine
    res = runner.invoke(app, ["run", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "policies.1.label" in res.output and "256 bytes long" in res.output
    assert not (tmp_path / "o").exists()


def test_an_out_the_system_refuses_to_create_is_bad_input(tmp_path, monkeypatch):
    # E.g. --out under /proc, or a name too long for the file system: os.access says yes,
    # mkdir says no.
    real = Path.mkdir

    def refuse(self, *a, **k):
        if ".partial-" in self.name:
            raise OSError(36, "File name too long")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", refuse)
    out = tmp_path / "new" / "o"
    res = runner.invoke(app, ["run", "--policy", "random", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "--out" in res.output and "File name too long" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "new").exists()


def test_a_failed_write_is_a_routesim_error(tmp_path, monkeypatch):
    import tempfile

    from sim.errors import RouteSimError
    from sim.record import write_text

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(RouteSimError, match="cannot write .*x.txt: Permission denied"):
        write_text("hi", tmp_path / "x.txt")


def test_a_grid_file_that_is_not_utf8_is_bad_input(tmp_path):
    from sim.sweep import GridError, load_grid

    p = tmp_path / "grid.yaml"
    p.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(GridError, match="cannot read"):
        load_grid(p)


@pytest.mark.parametrize("seeds", [2.0, "2", [True]])
def test_grid_seeds_are_integers(seeds):
    from sim.sweep import GridError, parse_grid

    with pytest.raises(GridError, match="seeds"):
        parse_grid({"name": "g", "base": "steady", "seeds": seeds}, source="g.yaml")


def test_numbers_with_an_exponent_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) would read 2e0 and 1.8e3 as text; a scenario reads them as the
    numbers everyone means. Quoted, they stay text (and are refused)."""
    text = yaml.safe_dump(GOOD).replace("rate_per_s: 1.0", "rate_per_s: 2e0").replace(
        "duration_s: 100", "duration_s: 1.8e2")
    sc = load_scenario(write(tmp_path, text))
    assert sc.arrivals.rate_per_s == 2.0 and sc.duration_s == 180.0
    with pytest.raises(ScenarioError, match="duration_s"):
        load_scenario(write(tmp_path, text.replace("duration_s: 1.8e2", "duration_s: '1.8e2'")))


@pytest.mark.parametrize(
    "arrivals",
    [
        # a week at 5/s with a ten-minute spike at 200/s: 3.1e6 arrivals
        {"kind": "piecewise", "phases": [{"until_s": 3600, "rate_per_s": 5},
                                         {"until_s": 4200, "rate_per_s": 200},
                                         {"until_s": 604800, "rate_per_s": 5}]},
        # a burst state at 1e5/s visited for 0.1 s in every 1000 s
        {"kind": "mmpp", "states": [{"rate_per_s": 2, "mean_sojourn_s": 1000},
                                    {"rate_per_s": 1e5, "mean_sojourn_s": 0.1}]},
    ],
)
def test_long_runs_with_short_peaks_are_not_refused(tmp_path, arrivals):
    data = mutate(lambda d: d.update(arrivals=arrivals, duration_s=604800, events=[]))
    load_scenario(write(tmp_path, data))


def test_a_write_that_fails_midway_is_a_routesim_error(tmp_path, monkeypatch):
    import errno
    import os

    from sim.errors import RouteSimError
    from sim.record import write_text

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(RouteSimError, match="No space left"):
        write_text("hi", tmp_path / "x.txt")
    assert list(tmp_path.iterdir()) == []  # the temp file is gone too


def test_a_mix_change_at_zero_shadows_workload_mix_in_validation(tmp_path):
    # workload.mix only shapes the test split then (no arrival draws from it): sampling the
    # validation split by the t = 0 mix works, so validation must not refuse it.
    data = copy.deepcopy(GOOD)
    data["workload"].update(split="validation", mix={"code": 1, "math": 1},
                            train_mix={"knowledge_qa": 1, "reasoning": 1})
    data["events"] = [{"at_s": 0, "mix_change": {"mix": {"knowledge_qa": 1}}}]
    res = runner.invoke(app, ["validate", str(write(tmp_path, data))])
    assert res.exit_code == 0, res.output


def test_a_directory_as_data_and_a_frontier_missing_its_data_are_named(tmp_path):
    res = runner.invoke(app, ["run", "routerbench_steady", "--data", str(tmp_path),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--data: is a directory" in res.output, res.output
    sc = write(tmp_path, mutate(lambda d: d.update(workload={
        "source": "routerbench", "path": str(tmp_path / "absent.csv"),
        "reference_llm": "gpt-4", "encoder": {"kind": "hashing"}})))
    res = runner.invoke(app, ["frontier", str(sc), "--out", str(tmp_path / "f")])
    assert res.exit_code == 2, res.output
    assert f"{sc}: workload.path: no such file" in " ".join(res.output.split())
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()

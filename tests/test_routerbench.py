"""RouterBench-format loader: both column styles, splits, ground truth and every bad input."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sim.errors import DataError
from sim.routerbench import ROUTERBENCH_PRICES_PER_MTOK, load_routerbench_workload
from sim.scenario import EncoderSpec, WorkloadSpec
from sim.types import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID

MODELS = ("big-model", "small/model-7b", "mid-model")
PRICES = {"big-model": (10.0, 30.0), "small/model-7b": (0.2, 0.2), "mid-model": (1.0, 2.0)}
SHARED_CSV = "routerbench_arc_mbpp_winogrande.csv"


def shared_data_dir() -> Path:
    env = os.environ.get("ROUTESIM_SHARED_DATA")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return base / "routerbench"


def make_rows(n: int = 40, seed: int = 0) -> dict[str, list]:
    """A small table in this project's column style: 2 tasks, train/test split."""
    rng = np.random.default_rng(seed)
    tasks = ["quiz" if i % 3 else "code" for i in range(n)]
    data: dict[str, list] = {
        "eval_name": tasks,
        "split": ["test" if i % 4 == 0 else "train" for i in range(n)],
        "prompt": [f"Example {i}.\n\nQuestion number {i} about {t}?" for i, t in enumerate(tasks)],
    }
    for m in MODELS:
        data[f"{m}|score"] = rng.integers(0, 2, n).astype(float).tolist()
        data[f"{m}|response_chars"] = rng.integers(1, 900, n).tolist()
        data[f"{m}|cost"] = rng.random(n).tolist()
    return data


def write(tmp_path: Path, data: dict, name: str = "bench.csv") -> Path:
    path = tmp_path / name
    df = pl.DataFrame(data)
    if name.endswith(".parquet"):
        df.write_parquet(path)
    else:
        df.write_csv(path)
    return path


def spec_for(path: Path, tmp_path: Path, **kw) -> WorkloadSpec:
    enc = EncoderSpec(kind="hashing", dim=32, cache_dir=str(tmp_path / "cache"))
    return WorkloadSpec(source="routerbench", path=str(path), encoder=enc, **kw)


def load(path: Path, tmp_path: Path, models=MODELS, seed=0, **kw):
    return load_routerbench_workload(
        spec_for(path, tmp_path, **kw), list(models), seed, progress=False
    )


# ------------------------------------------------------------------------- good input
def test_project_style_ground_truth(tmp_path):
    data = make_rows()
    w = load(write(tmp_path, data), tmp_path, models=("mid-model", "big-model"))
    assert w.models == ("mid-model", "big-model")
    assert w.n == 40
    np.testing.assert_array_equal(w.quality[:, 0], data["mid-model|score"])
    np.testing.assert_array_equal(w.quality[:, 1], data["big-model|score"])
    expected_out = np.maximum(np.array(data["big-model|response_chars"]) / 4.0, 1.0)
    np.testing.assert_allclose(w.output_tokens[:, 1], expected_out, rtol=1e-6)
    expected_in = [math.ceil(len(p) / 4) for p in data["prompt"]]
    np.testing.assert_array_equal(w.input_tokens, expected_in)
    assert w.texts == tuple(data["prompt"])
    assert w.task_names == ("code", "quiz")
    np.testing.assert_array_equal(w.task, [w.task_names.index(t) for t in data["eval_name"]])
    assert w.features.shape == (40, 32) and w.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(w.features, axis=1), 1.0, rtol=1e-5)
    assert w.quality.dtype == np.float32 and w.output_tokens.dtype == np.float32


def test_splits_follow_file_and_carve_validation_from_train(tmp_path):
    data = make_rows(n=80)
    path = write(tmp_path, data)
    w = load(path, tmp_path, validation_fraction=0.25)
    is_test = np.array(data["split"]) == "test"
    np.testing.assert_array_equal(w.split == SPLIT_TEST, is_test)
    n_train_file = int((~is_test).sum())
    # Stratified per task: round(0.25 * train rows of each task).
    tasks = np.array(data["eval_name"])
    expect = sum(round(0.25 * int(((tasks == t) & ~is_test).sum())) for t in ("code", "quiz"))
    assert int((w.split == SPLIT_VALID).sum()) == expect
    assert int((w.split == SPLIT_TRAIN).sum()) == n_train_file - expect
    again = load(path, tmp_path, validation_fraction=0.25)
    np.testing.assert_array_equal(w.split, again.split)  # same seed -> same split
    seeds = [load(path, tmp_path, seed=s, validation_fraction=0.25).split for s in range(1, 6)]
    assert any(not np.array_equal(w.split, s) for s in seeds)


def test_seed_sequence_is_accepted_and_not_consumed(tmp_path):
    path = write(tmp_path, make_rows())
    ss = np.random.SeedSequence(42)
    a = load(path, tmp_path, seed=ss)
    b = load(path, tmp_path, seed=ss)
    np.testing.assert_array_equal(a.split, b.split)


def test_no_split_column_gives_seeded_split(tmp_path):
    data = make_rows(n=60)
    del data["split"]
    path = write(tmp_path, data)
    a = load(path, tmp_path, seed=3)
    b = load(path, tmp_path, seed=3)
    np.testing.assert_array_equal(a.split, b.split)
    assert set(np.unique(a.split)) == {SPLIT_TRAIN, SPLIT_TEST, SPLIT_VALID}
    for t in range(len(a.task_names)):  # every task is represented in test
        assert ((a.task == t) & (a.split == SPLIT_TEST)).any()


def test_original_routerbench_style_recovers_output_tokens_from_cost(tmp_path):
    n = 12
    prompts = [f"Question {i}: what is {i} + {i}?" for i in range(n)]
    out_tokens = np.arange(1, n + 1) * 10.0
    data: dict[str, list] = {
        "sample_id": [f"s.{i}" for i in range(n)],
        # upstream stores texts as the repr of a one-element Python list
        "prompt": [repr([p]) for p in prompts],
        "eval_name": ["math"] * n,
        "split": ["train", "test"] * (n // 2),
    }
    for m, (pin, pout) in PRICES.items():
        in_tok = np.array([math.ceil(len(p) / 4) for p in prompts])
        data[m] = [float(i % 2) for i in range(n)]
        data[f"{m}|total_cost"] = ((in_tok * pin + out_tokens * pout) / 1e6).tolist()
    path = write(tmp_path, data)
    w = load_routerbench_workload(
        spec_for(path, tmp_path, validation_fraction=0.0), list(MODELS), 0,
        prices=PRICES, progress=False,
    )
    assert w.texts == tuple(prompts)  # unwrapped
    np.testing.assert_allclose(w.output_tokens, np.repeat(out_tokens[:, None], 3, 1), rtol=1e-6)
    np.testing.assert_array_equal(w.quality[:, 0], data["big-model"])


def test_original_style_response_text_gives_lengths(tmp_path):
    n = 6
    data = {
        "prompt": ["Q?"] * n,
        "eval_name": ["t"] * n,
        "split": ["train", "test"] * 3,
        "m": [1.0] * n,
        "m|total_cost": [0.1] * n,
        "m|model_response": [repr(["x" * (40 * (i + 1))]) for i in range(n)],
    }
    w = load(write(tmp_path, data), tmp_path, models=("m",), validation_fraction=0.0)
    np.testing.assert_allclose(w.output_tokens[:, 0], [10.0 * (i + 1) for i in range(n)])


def test_parquet_matches_csv(tmp_path):
    data = make_rows()
    a = load(write(tmp_path, data, "b.csv"), tmp_path)
    b = load(write(tmp_path, data, "b.parquet"), tmp_path)
    np.testing.assert_array_equal(a.quality, b.quality)
    np.testing.assert_array_equal(a.output_tokens, b.output_tokens)
    np.testing.assert_array_equal(a.split, b.split)
    assert a.texts == b.texts


def test_missing_scores_are_excluded_and_reported(tmp_path, caplog):
    data = make_rows()
    data["big-model|score"][3] = None
    data["mid-model|score"][5] = None
    data["small/model-7b|score"][7] = None
    path = write(tmp_path, data)
    with caplog.at_level(logging.WARNING, logger="sim.routerbench"):
        w = load(path, tmp_path, models=("big-model", "mid-model"))
        again = load(path, tmp_path, models=("big-model", "mid-model"))
    assert w.n == again.n == 38  # row 7 misses only an unselected model's score: kept
    assert caplog.text.count("excluded 2 of 40 rows") == 1  # said once per process
    assert "big-model: 1" in caplog.text and "mid-model: 1" in caplog.text
    kept_prompts = [p for i, p in enumerate(data["prompt"]) if i not in (3, 5)]
    assert w.texts == tuple(kept_prompts)
    assert not np.isnan(w.quality).any()


def test_duplicate_models_are_dropped(tmp_path):
    w = load(write(tmp_path, make_rows()), tmp_path, models=("mid-model", "mid-model"))
    assert w.models == ("mid-model",)


# -------------------------------------------------------------------------- bad input
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file") as e:
        load(tmp_path / "nope.csv", tmp_path)
    assert "nope.csv" in str(e.value)


def test_unsupported_suffix(tmp_path):
    p = tmp_path / "bench.json"
    p.write_text("{}")
    with pytest.raises(DataError, match="allowed: .csv, .parquet"):
        load(p, tmp_path)


@pytest.mark.parametrize("column", ["prompt", "eval_name"])
def test_missing_required_column(tmp_path, column):
    data = make_rows()
    del data[column]
    path = write(tmp_path, data)
    with pytest.raises(DataError, match=f"missing required column '{column}'") as e:
        load(path, tmp_path)
    assert str(path) in str(e.value)


def test_no_score_columns(tmp_path):
    data = {k: v for k, v in make_rows().items() if not k.endswith("|score")}
    path = write(tmp_path, data)
    with pytest.raises(DataError, match="no score columns") as e:
        load(path, tmp_path)
    assert str(path) in str(e.value)


def test_model_absent_lists_models_present(tmp_path):
    path = write(tmp_path, make_rows())
    with pytest.raises(DataError) as e:
        load(path, tmp_path, models=("big-model", "gpt-9"))
    msg = str(e.value)
    assert str(path) in msg and "'gpt-9'" in msg and "gpt-9|score" in msg
    for m in MODELS:
        assert m in msg


def test_non_numeric_score(tmp_path):
    data = make_rows()
    data["mid-model|score"] = [str(v) for v in data["mid-model|score"]]
    data["mid-model|score"][4] = "yes"
    path = write(tmp_path, data)
    with pytest.raises(DataError, match="non-numeric value 'yes' in row 5") as e:
        load(path, tmp_path)
    assert "mid-model|score" in str(e.value) and str(path) in str(e.value)


def test_score_out_of_range(tmp_path):
    data = make_rows()
    data["big-model|score"][2] = 7.0
    with pytest.raises(DataError, match=r"outside \[0, 1\]") as e:
        load(write(tmp_path, data), tmp_path)
    assert "big-model|score" in str(e.value)


def test_empty_arrival_split(tmp_path):
    data = make_rows()
    data["split"] = ["train"] * len(data["split"])
    path = write(tmp_path, data)
    with pytest.raises(DataError, match="split 'test'") as e:
        load(path, tmp_path, split="test")
    assert str(path) in str(e.value) and "split:" in str(e.value)
    load(path, tmp_path, split="train")  # the train split is fine


def test_unknown_split_value(tmp_path):
    data = make_rows()
    data["split"][0] = "holdout"
    with pytest.raises(DataError, match="'holdout'.*allowed: train, test, validation"):
        load(write(tmp_path, data), tmp_path)


def test_all_rows_missing_a_score(tmp_path):
    data = make_rows()
    data["big-model|score"] = [None] * len(data["big-model|score"])
    with pytest.raises(DataError, match="no row has a score"):
        load(write(tmp_path, data), tmp_path)


def test_no_length_information(tmp_path):
    data = {k: v for k, v in make_rows().items() if not k.startswith("mid-model|") or
            k.endswith("|score")}
    with pytest.raises(DataError, match="neither") as e:
        load(write(tmp_path, data), tmp_path)
    assert "mid-model|cost" in str(e.value)


def test_cost_without_known_price(tmp_path):
    data = {k: v for k, v in make_rows().items() if not k.endswith("|response_chars")}
    with pytest.raises(DataError, match="no list price known"):
        load(write(tmp_path, data), tmp_path)


# ------------------------------------------------------------------------ shared file
@pytest.fixture(scope="module")
def shared_csv() -> Path:
    path = shared_data_dir() / SHARED_CSV
    if not path.is_file():
        pytest.skip(f"shared RouterBench file not found at {path} (set ROUTESIM_SHARED_DATA)")
    return path


def test_shared_file(shared_csv, tmp_path, caplog, monkeypatch):
    import sim.routerbench

    monkeypatch.setattr(sim.routerbench, "_NOTED", set())  # not yet said by this process
    models = list(ROUTERBENCH_PRICES_PER_MTOK)
    with caplog.at_level(logging.WARNING, logger="sim.routerbench"):
        w = load(shared_csv, tmp_path, models=models)
    # Figures from shared/data/routerbench/README.md: 3,178 rows, 3,150 complete
    # (train 2,205, test 945).
    assert "excluded 28 of 3178 rows" in caplog.text
    assert w.n == 3150
    assert int((w.split == SPLIT_TEST).sum()) == 945
    n_valid = int((w.split == SPLIT_VALID).sum())
    assert int((w.split == SPLIT_TRAIN).sum()) + n_valid == 2205
    assert abs(n_valid - 0.2 * 2205) <= 3  # per-task rounding moves it by at most 1 per task
    assert w.task_names == ("arc-challenge", "mbpp", "winogrande")
    gpt4 = w.models.index("gpt-4-1106-preview")
    assert w.quality[:, gpt4].mean() == pytest.approx(0.879, abs=5e-4)  # README table
    # Output tokens from response characters: MBPP answers are code, ARC answers a letter.
    mbpp = w.task == w.task_names.index("mbpp")
    assert w.output_tokens[mbpp, gpt4].mean() > 200
    assert w.output_tokens[~mbpp, gpt4].mean() < 2


def test_routerbench_steady_scenario(tmp_path):
    from sim.scenario import load_scenario

    path = Path(__file__).resolve().parents[1] / "scenarios" / "routerbench_steady.yaml"
    sc = load_scenario(path)
    assert sc.workload.source == "routerbench" and sc.workload.split == "test"
    assert Path(sc.workload.path).name == SHARED_CSV
    assert len(sc.llms) == 11 and sc.workload.reference_llm == "gpt-4"
    for llm in sc.llms:  # every LLM serves a RouterBench model at its list prices
        assert (llm.price_in_per_mtok, llm.price_out_per_mtok) == (
            ROUTERBENCH_PRICES_PER_MTOK[llm.model_name]
        )
    assert {p.name for p in sc.policy_specs} == {
        "random", "round_robin", "cheapest", "strongest", "least_loaded", "oracle",
    }
    if Path(sc.workload.path).is_file():
        spec = sc.workload.model_copy(update={"encoder": EncoderSpec(
            kind="hashing", dim=16, cache_dir=str(tmp_path))})
        w = load_routerbench_workload(spec, [x.model_name for x in sc.llms], sc.seed,
                                      progress=False)
        assert w.models == tuple(x.model_name for x in sc.llms)


def write_scenario(tmp_path: Path, table: Path, llms: list[dict], **extra) -> Path:
    """A scenario over the data file `table` (hashing encoder), the first LLM the reference."""
    import yaml

    sc = tmp_path / "rb.yaml"
    sc.write_text(yaml.safe_dump({
        "name": "rb", "duration_s": 100, "arrivals": {"kind": "poisson", "rate_per_s": 1},
        "workload": {"source": "routerbench", "path": str(table),
                     "reference_llm": llms[0]["name"], "encoder": {"kind": "hashing"}},
        "llms": llms, **extra,
    }))
    return sc


def test_an_llm_without_data_is_the_scenarios_field_before_any_data_is_read(tmp_path):
    from typer.testing import CliRunner

    from sim.cli import app

    sc = write_scenario(tmp_path, write(tmp_path, make_rows()), [
        {"name": "big", "model": "big-model", "price_in_per_mtok": 10, "price_out_per_mtok": 30},
        {"name": "new", "model": "gpt-9", "price_in_per_mtok": 1, "price_out_per_mtok": 1}])
    for command in ("validate", "run"):
        res = CliRunner().invoke(app, [command, str(sc)] + (
            ["--out", str(tmp_path / "o")] if command == "run" else []))
        assert res.exit_code == 2, res.output
        msg = " ".join(res.output.split())
        assert f"{sc}: llms.1.model: 'gpt-9' is not a model of the data file" in msg, msg
        assert "big-model, small/model-7b, mid-model" in msg

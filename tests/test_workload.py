"""The built-in catalog, the synthetic calibrated workload and query sampling."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from sim import catalog
from sim.errors import DataError
from sim.scenario import WorkloadSpec
from sim.types import SPLIT_NAMES, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Workload
from sim.workload import (
    OUTPUT_CV,
    calibrate_intercepts,
    expected_accuracy,
    load_workload,
    make_synthetic_workload,
    sample_query_rows,
    total_logit_sd,
)

MODELS = list(catalog.known_models())
# Two-sided z for statistical checks: each check below runs on a fixed seed, and z = 4.5
# gives a per-check false alarm probability of ~7e-6, so even the 60 calibration cells
# together would fail by chance with probability < 5e-4 for a correct generator.
Z = 4.5


@pytest.fixture(scope="module")
def default_workload() -> Workload:
    return make_synthetic_workload(WorkloadSpec(), MODELS, 11)


@pytest.fixture(scope="module")
def big_workload() -> Workload:
    return make_synthetic_workload(WorkloadSpec(n_queries=60_000), MODELS, 5)


# ----------------------------------------------------------------------------- catalog
def test_catalog_covers_required_models_and_families():
    required = {
        "gpt-4",
        "gpt-3.5-turbo",
        "claude-v2",
        "claude-instant-v1",
        "llama-2-70b",
        "mixtral-8x7b",
        "mistral-7b",
        "yi-34b",
        "llama-3.1-8b",
        "llama-3.1-70b",
    }
    assert required <= set(catalog.known_models())
    assert set(catalog.FAMILIES) >= {
        "knowledge_qa",
        "reasoning",
        "commonsense",
        "code",
        "math",
        "open_chat",
    }
    for name in catalog.known_models():
        entry = catalog.model_entry(name)
        assert entry.name == name
        assert entry.price_in_per_mtok > 0 and entry.price_out_per_mtok > 0
        assert tuple(entry.families) == catalog.FAMILIES
        for fam in catalog.FAMILIES:
            stats = entry.stats(fam)
            assert 0.0 < stats.accuracy < 1.0
            assert stats.output_tokens >= 1.0
    for fam in catalog.FAMILIES:
        info = catalog.family_info(fam)
        assert info.input_tokens >= 1.0 and info.input_cv > 0


def test_catalog_entries_are_frozen():
    entry = catalog.model_entry("gpt-4")
    with pytest.raises(AttributeError):
        entry.price_in_per_mtok = 0.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        entry.families["math"] = entry.families["code"]  # type: ignore[index]


def test_catalog_unknown_model_lists_known_names():
    with pytest.raises(DataError) as exc:
        catalog.model_entry("gpt-5-ultra")
    msg = str(exc.value)
    assert "gpt-5-ultra" in msg and "gpt-4" in msg and "llama-3.1-70b" in msg
    with pytest.raises(DataError, match="poetry"):
        catalog.family_info("poetry")


# ------------------------------------------------------------------------- calibration
def test_intercept_solver_round_trips():
    acc = np.array([[0.05, 0.5, 0.954], [0.33, 0.686, 0.99]])
    a = calibrate_intercepts(acc, total_logit_sd())
    np.testing.assert_allclose(expected_accuracy(a, total_logit_sd()), acc, atol=1e-9)
    with pytest.raises(DataError):
        calibrate_intercepts(np.array([0.5, 1.0]), 1.0)


def test_per_family_accuracy_matches_catalog(big_workload: Workload):
    # Rows are i.i.d. and the intercepts make E[p] equal the catalog accuracy, so each row's
    # quality is marginally Bernoulli(acc): the family mean has binomial standard error.
    w = big_workload
    for j, model in enumerate(w.models):
        entry = catalog.model_entry(model)
        for f, fam in enumerate(w.task_names):
            q = w.quality[w.task == f, j]
            acc = entry.families[fam].accuracy
            se = np.sqrt(acc * (1 - acc) / q.size)
            assert abs(q.mean() - acc) <= Z * se, (model, fam, q.mean(), acc, q.size)


def test_token_lengths_match_catalog(big_workload: Workload):
    # Lognormal with the catalog mean: the sample mean has SE = mean * cv / sqrt(n); whole-
    # token rounding moves it by far less than 0.5 token. Short (1-token) answers are only
    # checked for their floor.
    w = big_workload
    for f, fam in enumerate(w.task_names):
        rows = w.task == f
        info = catalog.family_info(fam)
        got = w.input_tokens[rows].mean()
        tol = Z * info.input_tokens * info.input_cv / np.sqrt(rows.sum()) + 0.5
        assert abs(got - info.input_tokens) <= tol, (fam, got, info.input_tokens)
        for j, model in enumerate(w.models):
            mean = catalog.model_entry(model).families[fam].output_tokens
            out = w.output_tokens[rows, j]
            assert out.min() >= 1.0
            if mean >= 20:
                tol = Z * mean * OUTPUT_CV / np.sqrt(out.size) + 0.5
                assert abs(out.mean() - mean) <= tol, (model, fam, out.mean(), mean)


# ------------------------------------------------------------------------ structure
def test_shapes_dtypes_and_splits(default_workload: Workload):
    w = default_workload
    spec = WorkloadSpec()
    n, m = spec.n_queries, len(MODELS)
    assert w.models == tuple(MODELS)
    assert w.task_names == catalog.FAMILIES
    assert w.features.shape == (n, spec.feature_dim) and w.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(w.features, axis=1), 1.0, atol=1e-5)
    assert w.quality.shape == (n, m) and w.quality.dtype == np.float32
    assert set(np.unique(w.quality)) <= {0.0, 1.0}
    assert w.output_tokens.shape == (n, m) and w.output_tokens.dtype == np.float32
    assert w.input_tokens.dtype == np.int32 and w.input_tokens.min() >= 1
    assert w.task.dtype == np.int16 and w.split.dtype == np.int8
    n_train = round(n * spec.train_fraction)
    n_valid = round(n_train * spec.validation_fraction)
    assert (w.split == SPLIT_VALID).sum() == n_valid
    assert (w.split == SPLIT_TRAIN).sum() == n_train - n_valid
    assert (w.split == SPLIT_TEST).sum() == n - n_train
    # distinct queries: no two feature rows coincide
    assert np.unique(w.features, axis=0).shape[0] == n


def test_mix_and_train_mix_choose_families():
    spec = WorkloadSpec(train_mix={"code": 1.0}, mix={"math": 1.0, "open_chat": 3.0})
    w = make_synthetic_workload(spec, ["gpt-4", "mistral-7b"], 3)
    names = np.array(w.task_names)
    assert set(names[w.task[w.split != SPLIT_TEST]]) == {"code"}
    test_fams = names[w.task[w.split == SPLIT_TEST]]
    assert set(test_fams) == {"math", "open_chat"}
    n_test = test_fams.size
    share = (test_fams == "open_chat").mean()
    assert abs(share - 0.75) <= Z * np.sqrt(0.75 * 0.25 / n_test)


def test_same_seed_same_arrays_and_other_seed_differs():
    spec = WorkloadSpec(n_queries=2000)
    a = make_synthetic_workload(spec, MODELS, 42)
    b = make_synthetic_workload(spec, MODELS, np.random.SeedSequence(42))
    c = make_synthetic_workload(spec, MODELS, 43)
    for field in ("features", "task", "input_tokens", "quality", "output_tokens", "split"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.quality, c.quality)
    assert not np.array_equal(a.features, c.features)


def test_model_column_does_not_depend_on_other_models():
    spec = WorkloadSpec(n_queries=1000)
    full = make_synthetic_workload(spec, MODELS, 9)
    pair = make_synthetic_workload(spec, ["llama-3.1-70b", "gpt-4", "gpt-4"], 9)
    assert pair.models == ("llama-3.1-70b", "gpt-4")  # repeats dropped, order kept
    for j, model in enumerate(pair.models):
        k = full.models.index(model)
        np.testing.assert_array_equal(pair.quality[:, j], full.quality[:, k])
        np.testing.assert_array_equal(pair.output_tokens[:, j], full.output_tokens[:, k])
    np.testing.assert_array_equal(pair.features, full.features)


def test_unknown_model_is_a_data_error_listing_the_catalog():
    with pytest.raises(DataError) as exc:
        make_synthetic_workload(WorkloadSpec(), ["gpt-4", "my-finetune"], 0)
    msg = str(exc.value)
    assert "my-finetune" in msg and "mixtral-8x7b" in msg and "claude-v2" in msg


def test_unknown_family_in_mix_is_a_data_error():
    with pytest.raises(DataError) as exc:
        make_synthetic_workload(WorkloadSpec(mix={"code": 1, "poetry": 2}), ["gpt-4"], 0)
    msg = str(exc.value)
    assert "workload.mix" in msg and "poetry" in msg and "open_chat" in msg
    with pytest.raises(DataError, match="workload.train_mix"):
        make_synthetic_workload(WorkloadSpec(train_mix={"Code": 1}), ["gpt-4"], 0)


# ----------------------------------------------------------------------- learnability
def test_quality_is_learnable_but_not_predictable(default_workload: Workload):
    # With ~2,400 test rows an AUC's standard error is ~0.01, so 0.6 is far above chance and
    # 0.95 far below a perfect predictor.
    w = default_workload
    fit = w.split != SPLIT_TEST
    test = w.split == SPLIT_TEST
    for model in ("gpt-4", "mistral-7b", "llama-3.1-70b"):
        y = w.quality[:, w.models.index(model)]
        lr = LogisticRegression(max_iter=1000).fit(w.features[fit], y[fit])
        p_lr = lr.predict_proba(w.features[test])[:, 1]
        knn = KNeighborsClassifier(n_neighbors=25).fit(w.features[fit], y[fit])
        p_knn = knn.predict_proba(w.features[test])[:, 1]
        for p in (p_lr, p_knn):
            auc = roc_auc_score(y[test], p)
            assert 0.6 < auc < 0.95, (model, auc)
        # not only the family: features also rank queries within one family
        within = [
            roc_auc_score(y[test][w.task[test] == f], p_lr[w.task[test] == f])
            for f in range(len(w.task_names))
        ]
        assert 0.6 < float(np.mean(within)) < 0.95, (model, within)


def test_hard_queries_are_hard_for_all_models(default_workload: Workload):
    # A shared difficulty makes models' 0/1 scores positively correlated within a family
    # (RouterBench's ARC and MBPP: mean pairwise correlation ~0.35-0.43).
    w = default_workload
    iu = np.triu_indices(len(w.models), 1)
    for f in range(len(w.task_names)):
        corr = np.corrcoef(w.quality[w.task == f].T)[iu]
        assert np.nanmean(corr) > 0.15


# ---------------------------------------------------------------------------- sampler
def test_sampler_draws_from_the_requested_split(default_workload: Workload):
    w = default_workload
    rng = np.random.default_rng(0)
    times = np.linspace(0, 100, 5000)
    for split in ("train", "test", "validation"):
        rows = sample_query_rows(w, WorkloadSpec(split=split), times, [], rng)
        assert rows.dtype == np.int64 and rows.shape == times.shape
        assert np.all(w.split[rows] == SPLIT_NAMES[split])
    rows = sample_query_rows(w, WorkloadSpec(split="all"), times, [], rng)
    assert set(np.unique(w.split[rows])) == {SPLIT_TRAIN, SPLIT_TEST, SPLIT_VALID}


def test_sampler_family_shares_follow_the_mix(default_workload: Workload):
    w = default_workload
    mix = {"code": 1.0, "math": 3.0, "reasoning": 4.0}
    n = 40_000
    for how in ("with_replacement", "without_replacement"):
        spec = WorkloadSpec(mix=mix, sample=how)
        rows = sample_query_rows(w, spec, np.zeros(n), [], np.random.default_rng(1))
        fams = np.array(w.task_names)[w.task[rows]]
        assert set(fams) == set(mix)
        for fam, weight in mix.items():
            p = weight / sum(mix.values())
            assert abs((fams == fam).mean() - p) <= Z * np.sqrt(p * (1 - p) / n), (how, fam)


def test_a_mix_draws_the_same_queries_whatever_the_order_of_its_keys(default_workload):
    # A mix is a mapping: writing its families in another order must not change a run.
    # Before, the families were indexed in the mapping's order, so the same seed drew other
    # queries (a rewritten domain_shift.yaml moved mixllm's quality by 0.1-1.0 points).
    w = default_workload
    times = np.linspace(0.0, 100.0, 2000)
    a = {"code": 1.0, "math": 3.0, "reasoning": 4.0}
    b = {"reasoning": 4.0, "code": 1.0, "math": 3.0}
    change_a, change_b = [(50.0, dict(reversed(list(a.items()))))], [(50.0, a)]
    for how in ("with_replacement", "without_replacement"):
        ra = sample_query_rows(w, WorkloadSpec(mix=a, sample=how), times, change_a,
                               np.random.default_rng(7))
        rb = sample_query_rows(w, WorkloadSpec(mix=b, sample=how), times, change_b,
                               np.random.default_rng(7))
        np.testing.assert_array_equal(ra, rb)


def test_without_replacement_covers_the_pool_once_per_pass(default_workload: Workload):
    w = default_workload
    pool = np.flatnonzero(w.split == SPLIT_TEST)
    size = pool.size
    n = 3 * size + 17
    spec = WorkloadSpec(sample="without_replacement")
    rows = sample_query_rows(w, spec, np.zeros(n), [], np.random.default_rng(2))
    for k in range(3):
        np.testing.assert_array_equal(np.sort(rows[k * size : (k + 1) * size]), pool)
    assert np.unique(rows[3 * size :]).size == 17
    assert not np.array_equal(rows[:size], rows[size : 2 * size])  # reshuffled each pass
    # with a mix, each family's rows are walked the same way
    spec = WorkloadSpec(sample="without_replacement", mix={"code": 1.0, "math": 1.0})
    rows = sample_query_rows(w, spec, np.zeros(n), [], np.random.default_rng(3))
    code = catalog.FAMILIES.index("code")
    code_pool = pool[w.task[pool] == code]
    code_rows = rows[w.task[rows] == code]
    for k in range(code_rows.size // code_pool.size):
        block = code_rows[k * code_pool.size : (k + 1) * code_pool.size]
        np.testing.assert_array_equal(np.sort(block), code_pool)


def test_mix_changes_take_effect_at_their_time(default_workload: Workload):
    w = default_workload
    times = np.arange(0.0, 300.0, 0.05)
    changes = [(200.0, {"reasoning": 1.0}), (100.0, {"code": 1.0})]  # any order
    rows = sample_query_rows(w, WorkloadSpec(), times, changes, np.random.default_rng(4))
    fams = np.array(w.task_names)[w.task[rows]]
    assert len(set(fams[times < 100])) == len(catalog.FAMILIES)  # no mix: whole pool
    assert set(fams[(times >= 100) & (times < 200)]) == {"code"}
    assert set(fams[times >= 200]) == {"reasoning"}
    assert fams[times == 100.0][0] == "code"  # in force from at_s on
    # a scenario mix holds until the first change
    spec = WorkloadSpec(mix={"math": 1.0})
    rows = sample_query_rows(w, spec, times, changes[1:], np.random.default_rng(5))
    fams = np.array(w.task_names)[w.task[rows]]
    assert set(fams[times < 100]) == {"math"} and set(fams[times >= 100]) == {"code"}


@pytest.mark.parametrize("sample", ["with_replacement", "without_replacement"])
@pytest.mark.parametrize("start_mix", [None, {"math": 1.0, "code": 2.0}])
def test_a_mix_change_leaves_the_queries_before_it_alone(default_workload, sample, start_mix):
    # Common random numbers: the family draws and family walks used to share one stream
    # with the rest, so adding a change at t=150 replaced most rows asked before 150 too.
    w = default_workload
    times = np.sort(np.random.default_rng(8).uniform(0, 300, 3000))
    spec = WorkloadSpec(sample=sample, mix=start_mix)
    base = sample_query_rows(w, spec, times, [], np.random.default_rng(9))
    for change in ({"open_chat": 1.0}, {"math": 3.0, "reasoning": 1.0}):
        rows = sample_query_rows(w, spec, times, [(150.0, change)], np.random.default_rng(9))
        before = times < 150.0
        np.testing.assert_array_equal(rows[before], base[before])
        fams = set(np.array(w.task_names)[w.task[rows[~before]]])
        assert fams == set(change)


def test_sampler_is_deterministic_and_handles_a_million_arrivals(default_workload: Workload):
    w = default_workload
    times = np.sort(np.random.default_rng(6).uniform(0, 3600, 1_000_000))
    changes = [(1800.0, {"open_chat": 2.0, "code": 1.0})]
    spec = WorkloadSpec(sample="without_replacement")
    a = sample_query_rows(w, spec, times, changes, np.random.default_rng(7))
    b = sample_query_rows(w, spec, times, changes, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1_000_000,) and a.min() >= 0 and a.max() < w.n
    assert sample_query_rows(w, spec, np.array([]), [], np.random.default_rng(0)).size == 0


def test_sampler_rejects_unknown_or_empty_families(default_workload: Workload):
    w = default_workload
    times = np.zeros(10)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError) as exc:
        sample_query_rows(w, WorkloadSpec(mix={"poetry": 1.0}), times, [], rng)
    msg = str(exc.value)
    assert "workload.mix" in msg and "poetry" in msg and "knowledge_qa" in msg
    with pytest.raises(DataError, match="mix_change.*haiku"):
        sample_query_rows(w, WorkloadSpec(), times, [(5.0, {"haiku": 1.0})], rng)
    only_code = make_synthetic_workload(
        WorkloadSpec(n_queries=200, train_mix={"code": 1.0}, mix={"code": 1.0}), ["gpt-4"], 0
    )
    with pytest.raises(DataError, match="'math' has no rows"):
        sample_query_rows(only_code, WorkloadSpec(mix={"math": 1.0}), times, [], rng)


# --------------------------------------------------------------------------- dispatch
def test_load_workload_dispatches_on_source(monkeypatch):
    spec = WorkloadSpec(n_queries=300)
    a = load_workload(spec, ["gpt-4"], 1)
    b = make_synthetic_workload(spec, ["gpt-4"], 1)
    np.testing.assert_array_equal(a.quality, b.quality)

    calls = []

    def fake_loader(spec, models, seed):
        calls.append((spec.path, tuple(models), seed))
        return b

    fake = types.ModuleType("sim.routerbench")
    fake.load_routerbench_workload = fake_loader  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sim.routerbench", fake)
    rb_spec = WorkloadSpec(source="routerbench", path="bench.csv")
    assert load_workload(rb_spec, ["gpt-4"], 3) is b
    assert calls == [("bench.csv", ("gpt-4",), 3)]

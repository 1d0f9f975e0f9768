"""Query sources: the built-in synthetic, calibrated workload, and sampling queries to arrivals.

Synthetic workload (the default, `workload: {source: synthetic}`)
-----------------------------------------------------------------
Each query i gets a task family f_i, latent skill coordinates z_i ~ N(0, I_k) and a
difficulty h_i ~ N(0, 1). For model m, the chance of a correct answer (quality 1, as in
RouterBench's 0/1 scores) is

    p_im = sigmoid(a[m, f_i] + w_m . z_i - b * h_i + e_im),   e_im ~ N(0, s_e^2)

- h is shared by all models, so a hard query is hard for every model (correlated errors, as in
  real benchmark data); w_m is a model's own profile over the latent skills, so models
  disagree on which queries they get right (what makes per-query routing worth anything);
  e_im is per-(query, model) luck that no feature reveals.
- The intercepts a[m, f] are solved numerically (bisection over a Gauss-Hermite expectation)
  so that E[p] over the query population equals the catalog accuracy of (m, f). Since the
  rows are i.i.d., each row's quality is marginally Bernoulli(catalog accuracy): the
  empirical per-family accuracy has exactly the binomial standard error.
- Features (an embedding stand-in) are a family centroid + a linear image of z + the
  difficulty along one direction + isotropic noise, L2-normalised, float32. So a model's
  quality is learnable from features (family, skills, difficulty all leak into them) but not
  perfectly predictable (e_im, the Bernoulli draw and the feature noise are not).

Lengths: output tokens of (i, m) are lognormal with the catalog mean of (m, f_i) and a
coefficient of variation of 0.5 (MBPP answers in the RouterBench subset measure 0.36-0.40; 0.5
leaves room for open-ended families), with half of the log-variance shared by all models of
a query (a question that calls for a long answer gets long answers). Input tokens are
lognormal around the family's typical prompt length with the family's measured cv. Both are
rounded to whole tokens, at least 1.

Randomness: query-level draws (families, splits, z, h, features, input lengths) come from
one stream of the seed; each model's draws come from a stream keyed by its catalog index,
so a model's column does not change when other models are added to or removed from the list.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache

import numpy as np

from sim import catalog
from sim.errors import DataError
from sim.scenario import WorkloadSpec
from sim.types import SPLIT_NAMES, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Workload

# ------------------------------------------------------------------ generator parameters
LATENT_DIM = 8  # latent skill coordinates z
DIFFICULTY_SCALE = 2.2  # b: weight of the shared difficulty in every model's logit
SKILL_SCALE = 1.2  # |w_m|: spread of a model's logit explained by its skill profile
LUCK_SCALE = 0.5  # s_e: per-(query, model) noise no feature reveals
FEATURE_CENTROID = 1.0  # norm of a family centroid in feature space
FEATURE_SKILL = 0.3  # feature weight of each latent skill coordinate
FEATURE_DIFFICULTY = 0.35  # feature weight of the visible part of the difficulty
VISIBLE_DIFFICULTY = 0.3  # share of the difficulty's variance that the features carry
FEATURE_NOISE = 0.7  # norm (in expectation) of the isotropic feature noise
OUTPUT_CV = 0.5  # coefficient of variation of output tokens around the catalog mean
OUTPUT_SHARED = 0.5  # share of output log-variance common to all models of a query
_GH_POINTS = 64  # Gauss-Hermite nodes for the calibration expectation
_SYNTHETIC_NAME = "synthetic"


# ------------------------------------------------------------------------- public API
def load_workload(
    spec: WorkloadSpec, models: Sequence[str], seed: int | np.random.SeedSequence
) -> Workload:
    """The workload a scenario asks for: synthetic (built in) or a RouterBench-format file."""
    if spec.source == "synthetic":
        return make_synthetic_workload(spec, models, seed)
    if spec.source == "routerbench":
        from sim.routerbench import load_routerbench_workload

        return load_routerbench_workload(spec, models, seed)
    raise DataError(  # pragma: no cover - WorkloadSpec already restricts `source`
        f"unknown source {spec.source!r}; allowed: synthetic, routerbench",
        field="workload.source",
    )


def make_synthetic_workload(
    spec: WorkloadSpec, models: Sequence[str], seed: int | np.random.SeedSequence
) -> Workload:
    """A calibrated synthetic workload of `spec.n_queries` distinct queries for `models`.

    `models` are catalog names (repeats are dropped, order kept); the workload's columns
    follow them. Same `seed` -> identical arrays.
    """
    names = _dedupe(models)
    if not names:
        raise DataError(
            "no models given; the synthetic workload needs at least one of: "
            + ", ".join(catalog.known_models()),
            field="llms",
        )
    entries = [_entry_for(name) for name in names]
    families = catalog.FAMILIES
    n_fam = len(families)
    train_w = _family_weights(spec.train_mix, families, "workload.train_mix")
    test_w = _family_weights(spec.mix, families, "workload.mix")

    root = _seed_sequence(seed)
    rng = np.random.default_rng(_child(root, 0))

    # --- splits and families
    n = spec.n_queries
    n_train = min(max(int(round(n * spec.train_fraction)), 1), n - 1)
    n_valid = min(int(round(n_train * spec.validation_fraction)), n_train - 1)
    task = np.empty(n, dtype=np.int16)
    task[:n_train] = rng.choice(n_fam, size=n_train, p=train_w)
    task[n_train:] = rng.choice(n_fam, size=n - n_train, p=test_w)
    split = np.full(n, SPLIT_TEST, dtype=np.int8)
    split[:n_train] = SPLIT_TRAIN
    split[rng.choice(n_train, size=n_valid, replace=False)] = SPLIT_VALID
    order = rng.permutation(n)  # so a row's index says nothing about its split
    task, split = task[order], split[order]

    # --- latent query attributes and features
    z = rng.standard_normal((n, LATENT_DIM))
    h_seen = rng.standard_normal(n)  # the part of the difficulty an embedding reflects
    h = np.sqrt(VISIBLE_DIFFICULTY) * h_seen
    h += np.sqrt(1.0 - VISIBLE_DIFFICULTY) * rng.standard_normal(n)
    features = _features(rng, task, z, h_seen, n_fam, spec.feature_dim)

    fam_info = [catalog.family_info(f) for f in families]
    in_mean = np.array([fi.input_tokens for fi in fam_info])[task]
    in_cv = np.array([fi.input_cv for fi in fam_info])[task]
    input_tokens = _round_tokens(_lognormal(rng.standard_normal(n), in_mean, in_cv))
    shared_len = rng.standard_normal(n)

    # --- per-model ground truth
    m = len(names)
    accuracy = np.array([[e.families[f].accuracy for f in families] for e in entries])
    intercepts = calibrate_intercepts(accuracy, total_logit_sd())  # (m, families)
    quality = np.empty((n, m), dtype=np.float32)
    output_tokens = np.empty((n, m), dtype=np.float32)
    for j, entry in enumerate(entries):
        mrng = np.random.default_rng(_child(root, 1 + catalog.model_index(entry.name)))
        w = mrng.standard_normal(LATENT_DIM)
        w *= SKILL_SCALE / np.linalg.norm(w)
        logit = intercepts[j][task] + z @ w - DIFFICULTY_SCALE * h
        logit += LUCK_SCALE * mrng.standard_normal(n)
        quality[:, j] = mrng.random(n) < _sigmoid(logit)
        out_mean = np.array([entry.families[f].output_tokens for f in families])[task]
        own_len = mrng.standard_normal(n)
        eps = np.sqrt(OUTPUT_SHARED) * shared_len + np.sqrt(1.0 - OUTPUT_SHARED) * own_len
        output_tokens[:, j] = _round_tokens(_lognormal(eps, out_mean, OUTPUT_CV))

    return Workload(
        name=_SYNTHETIC_NAME,
        models=names,
        features=features,
        task=task,
        task_names=families,
        input_tokens=input_tokens.astype(np.int32),
        quality=quality,
        output_tokens=output_tokens,
        split=split,
    )


def sample_query_rows(
    workload: Workload,
    spec: WorkloadSpec,
    arrival_times: np.ndarray,
    mix_changes: Sequence[tuple[float, Mapping[str, float]]],
    rng: np.random.Generator,
) -> np.ndarray:
    """The workload row (int64) each arrival asks, vectorised over all arrivals.

    Rows come from split `spec.split` ("all": every row). "with_replacement" draws uniformly;
    "without_replacement" walks random permutations of the pool, reshuffled each pass. While
    a family mix is in force (`spec.mix` from the start, then each `(at_s, mix)` of
    `mix_changes` for arrivals at t >= at_s), an arrival first draws a family by the mix's
    weights (families not named get none), then a row of that family from the pool. Without
    replacement, each family's rows are walked on their own, and arrivals under no mix walk
    the whole pool on their own too. Within a walk no row repeats before the walk's rows are
    used up; separate walks do not see each other, so across a mix change (or between mixed
    and unmixed periods) a row can repeat before every row of the pool was asked.

    Common random numbers: the unrestricted walk draws from `rng` itself, and the family
    draws (one uniform per arrival, in time order) and each family's walk from streams of
    their own, so a mix change at t leaves every arrival before t with the row it had
    without the change.
    """
    times = np.asarray(arrival_times, dtype=float)
    n = times.shape[0]
    pool = _pool(workload, spec.split)
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out

    changes = sorted(mix_changes, key=lambda c: c[0])
    regimes: list[Mapping[str, float] | None] = [spec.mix]
    fields = ["workload.mix"]
    for at_s, mix in changes:
        regimes.append(mix)
        fields.append(f"events.mix_change (at_s={at_s:g}).mix")
    # regime of each arrival: 0 before the first change, k after the k-th change
    regime = np.searchsorted(np.array([c[0] for c in changes], dtype=float), times, "right")

    pool_task = workload.task[pool]
    fam_pools: dict[int, np.ndarray] = {}
    chosen_fam = np.full(n, -1, dtype=np.int64)  # -1: unrestricted (no mix in force)
    fam_u = _stream(rng, 0).random(n) if any(m is not None for m in regimes) else None
    for k, mix in enumerate(regimes):
        if mix is None:
            continue
        idx, weights = _mix_indices(mix, workload.task_names, fields[k])
        sel = np.flatnonzero(regime == k)
        if sel.size == 0:
            continue
        for fi in idx:
            if fi not in fam_pools:
                fam_pools[fi] = pool[pool_task == fi]
                if fam_pools[fi].size == 0:
                    raise DataError(
                        f"family {workload.task_names[fi]!r} has no rows in split "
                        f"{spec.split!r} of workload {workload.name!r}; families with rows "
                        f"there: {', '.join(_families_in(workload, pool))}",
                        field=fields[k],
                    )
        # Inverse CDF of the mix's weights at the arrival's own uniform.
        pick = np.searchsorted(np.cumsum(weights), fam_u[sel], side="right")
        chosen_fam[sel] = np.asarray(idx)[np.minimum(pick, len(idx) - 1)]

    free = np.flatnonzero(chosen_fam < 0)
    if free.size:
        out[free] = _draw(pool, free.size, spec.sample, rng)
    for fi, fpool in fam_pools.items():
        sel = np.flatnonzero(chosen_fam == fi)
        if sel.size:
            out[sel] = _draw(fpool, sel.size, spec.sample, _stream(rng, 1 + fi))
    return out


def _stream(rng: np.random.Generator, key: int) -> np.random.Generator:
    """A generator of its own for `key`, derived from `rng`'s seed without drawing from it
    (two-element spawn key: never one of `rng`'s own spawned children)."""
    ss = rng.bit_generator.seed_seq
    return np.random.default_rng(
        np.random.SeedSequence(ss.entropy, spawn_key=(*ss.spawn_key, 0x5EED, key))
    )


def calibrate_intercepts(accuracy: np.ndarray, logit_sd: float) -> np.ndarray:
    """Intercepts a with E[sigmoid(a + logit_sd * N(0, 1))] = accuracy, elementwise.

    The expectation is a Gauss-Hermite sum; the root is found by bisection (the expectation
    is increasing in a), to ~1e-12 in accuracy.
    """
    acc = np.asarray(accuracy, dtype=float)
    if np.any((acc <= 0.0) | (acc >= 1.0)):
        raise DataError(f"accuracies must lie strictly in (0, 1); got {acc.tolist()}")
    nodes, weights = _gauss_hermite()
    lo = np.full(acc.shape, -40.0)
    hi = np.full(acc.shape, 40.0)
    for _ in range(60):  # 80 / 2**60: far below float accuracy of an intercept
        mid = 0.5 * (lo + hi)
        mean = _sigmoid(mid[..., None] + logit_sd * nodes) @ weights
        too_low = mean < acc
        lo = np.where(too_low, mid, lo)
        hi = np.where(too_low, hi, mid)
    return 0.5 * (lo + hi)


def expected_accuracy(intercept: np.ndarray, logit_sd: float) -> np.ndarray:
    """E[sigmoid(a + logit_sd * N(0, 1))]: the population accuracy an intercept yields."""
    nodes, weights = _gauss_hermite()
    return _sigmoid(np.asarray(intercept, dtype=float)[..., None] + logit_sd * nodes) @ weights


def total_logit_sd() -> float:
    """Standard deviation of w_m . z - b h + e around the intercept (|w_m| = SKILL_SCALE)."""
    return float(np.sqrt(SKILL_SCALE**2 + DIFFICULTY_SCALE**2 + LUCK_SCALE**2))


# ------------------------------------------------------------------------------ helpers
@cache
def _gauss_hermite() -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E[g(N(0, 1))] ~= sum(weights * g(nodes))."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(_GH_POINTS)
    return nodes, weights / weights.sum()


def _dedupe(models: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(models))


def _entry_for(name: str) -> catalog.ModelEntry:
    try:
        return catalog.model_entry(name)
    except DataError:
        raise DataError(
            f"model {name!r} is not in the built-in catalog, so the synthetic workload has no "
            f"data for it; catalog models: {', '.join(catalog.known_models())} (or set "
            "`model:` of the LLM to one of them)",
            field="llms.model",
        ) from None


def _seed_sequence(seed: int | np.random.SeedSequence) -> np.random.SeedSequence:
    if isinstance(seed, np.random.SeedSequence):
        return seed
    return np.random.SeedSequence(int(seed))


def _child(root: np.random.SeedSequence, key: int) -> np.random.SeedSequence:
    """A child stream addressed by `key`, independent of how many children exist."""
    return np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, key))


def _family_weights(
    mix: Mapping[str, float] | None, families: tuple[str, ...], field: str
) -> np.ndarray:
    if mix is None:
        return np.full(len(families), 1.0 / len(families))
    idx, w = _mix_indices(mix, families, field)
    out = np.zeros(len(families))
    out[idx] = w
    return out


def _mix_indices(
    mix: Mapping[str, float], families: Sequence[str], field: str
) -> tuple[list[int], np.ndarray]:
    """Family indices named by `mix` and their normalised weights; unknown names -> error."""
    if not mix:
        raise DataError(
            f"an empty mix names no family; allowed families: {', '.join(families)}",
            field=field,
        )
    idx: list[int] = []
    weights: list[float] = []
    for name, weight in mix.items():
        if name not in families:
            raise DataError(
                f"unknown task family {name!r}; allowed: {', '.join(families)}", field=field
            )
        if not weight > 0:
            raise DataError(f"weight of {name!r} must be > 0, got {weight!r}", field=field)
        idx.append(families.index(name))
        weights.append(float(weight))
    # In the workload's family order, not the mapping's: the same mix written with its keys
    # in another order must draw the same queries.
    order = np.argsort(idx, kind="stable")
    w = np.asarray(weights)[order]
    return [idx[i] for i in order], w / w.sum()


def _features(
    rng: np.random.Generator,
    task: np.ndarray,
    z: np.ndarray,
    h: np.ndarray,
    n_fam: int,
    dim: int,
) -> np.ndarray:
    centroids = _unit_rows(rng.standard_normal((n_fam, dim))) * FEATURE_CENTROID
    skill_dirs = _unit_rows(rng.standard_normal((z.shape[1], dim)))  # one direction per z_k
    difficulty_dir = _unit_rows(rng.standard_normal((1, dim)))[0]
    noise = rng.standard_normal((z.shape[0], dim)) * (FEATURE_NOISE / np.sqrt(dim))
    x = centroids[task] + FEATURE_SKILL * (z @ skill_dirs)
    x += FEATURE_DIFFICULTY * h[:, None] * difficulty_dir
    x += noise
    return _unit_rows(x).astype(np.float32)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def _lognormal(eps: np.ndarray, mean: np.ndarray, cv: float | np.ndarray) -> np.ndarray:
    """Lognormal values with the given mean and coefficient of variation, from N(0,1) eps."""
    s2 = np.log1p(np.square(cv))
    return mean * np.exp(np.sqrt(s2) * eps - 0.5 * s2)


def _round_tokens(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.rint(x), 1.0)


def _pool(workload: Workload, split: str) -> np.ndarray:
    if split == "all":
        pool = np.arange(workload.n, dtype=np.int64)
    else:
        pool = np.flatnonzero(workload.split == SPLIT_NAMES[split]).astype(np.int64)
    if pool.size == 0:
        raise DataError(
            f"workload {workload.name!r} has no rows in split {split!r}; choose another "
            "split (train, test, validation, all)",
            field="workload.split",
        )
    return pool


def _families_in(workload: Workload, pool: np.ndarray) -> list[str]:
    present = np.unique(workload.task[pool])
    return [workload.task_names[i] for i in present]


def _draw(pool: np.ndarray, k: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """k rows of `pool`: uniform with replacement, or consecutive random permutations."""
    size = pool.size
    if how == "with_replacement":
        return pool[rng.integers(0, size, size=k)]
    passes = -(-k // size)
    perms = rng.permuted(np.broadcast_to(np.arange(size), (passes, size)), axis=1)
    return pool[perms.reshape(-1)[:k]]

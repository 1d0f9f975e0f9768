"""MixLLM on RouterBench and under load: frontier, online learning, ablations.

Prints five tables (each part can be run alone with --part): (tune) the 5-fold CV on the
training rows that picks the default lambda, then

(a) frontier: uncongested, fitted on the train+validation rows, evaluated on the test split
    (reports.frontier, the same route path as the simulator): every single LLM, random,
    the oracle, the learned baselines (default: the plain kNN router) and MixLLM as its
    lambda varies; AIQ (RouterBench's area under the frontier); the hull quality of MixLLM
    and kNN at cost levels 5%..50% of gpt-4's cost; MixLLM's shipped default point.
(b) online: predictors fitted on 30% of the train+validation rows; the other 70% arrive as
    a stream with binary feedback on every answer (online learning on) or without learning
    (offline-only); both are then scored on the test split (no more feedback), at the
    default lambda, over several random 30% subsets (paired: the same subset and stream).
    With --workload synthetic, the same protocol on the built-in synthetic workload
    (RouterBench-era catalog LLMs, --n-queries distinct queries): it needs no data file, and
    its queries carry more within-task signal a larger training set can learn than
    RouterBench's do (compare the full-information ceilings). With --holdout-share H, both
    are scored on a share H of the training rows held out from the fit and the stream
    instead of on the test split (the stream is then the other 1 - 0.3 - H).
(e) bandit: what the information bandit feedback gives is worth, whatever learns from it.
    On the subsets of (b), the predictors are refitted offline on the 30% plus, for each
    streamed query, one answer only: the answer of the LLM the offline policy chose (what
    its users' feedback reveals) or of a uniformly random LLM (feedback under pure
    exploration); then scored on the test split like (b), against the offline-only policy
    and the full-information ceiling.
(d) top-k (the paper's open question): k = 1, 2, 3 best-scored LLMs answer; the user keeps
    the primary answer, the one the scenario judge scores highest (`best_judged`), or the
    best realised one (`best_realised`, an upper bound); quality and cost at the default
    lambda and the frontier's hull quality at 25% and 50% of gpt-4's cost.
(c) ablation: the defaults, then one part switched at a time (tags on, when the
    tag-enhanced encoder can run; uncertainty off; penalty off; the admission check off, with
    and without the penalty; online learning on: it is off by default), everything off but
    the admission check, and
    the penalty on/off at a quality-hungry lambda. Columns: quality
    % and cost % of gpt-4 on the RouterBench test split (uncongested, feedback on 30% of
    answers as in scenarios/routerbench_steady.yaml), and quality %, cost %, p95 wait and
    rejected + abandoned requests in the load-spike scenario (synthetic workload, engine).

Data: the shared RouterBench CSV, located relative to the repository (or $ROUTESIM_SHARED_DATA,
or --data). Prompt embeddings come from the workload loader (cached on disk after the first
run, which takes minutes on CPU).

    python benchmarks/bench_mixllm.py [--part all|tune|frontier|online|bandit|ablation|topk]
        [--seeds 30] [--data CSV] [--baselines knn,...] [--no-tags] [--params JSON]
        [--workload routerbench|synthetic] [--n-queries 6000] [--offline-share 0.3]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from policies import registry  # noqa: E402
from sim.context import context_for, training_set  # noqa: E402
from sim.offline import evaluate_offline  # noqa: E402
from sim.routerbench import ROUTERBENCH_PRICES_PER_MTOK, load_routerbench_workload  # noqa: E402
from sim.scenario import (  # noqa: E402
    EncoderSpec,
    JudgeSpec,
    PolicySpec,
    WorkloadSpec,
    load_scenario,
)
from sim.types import SPLIT_TEST, LLMInfo, PolicyContext, TrainingSet, Workload  # noqa: E402

REFERENCE = "gpt-4-1106-preview"
CSV_NAME = "routerbench_arc_mbpp_winogrande.csv"
COST_LEVELS = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50)


def data_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    root = os.environ.get("ROUTESIM_SHARED_DATA")
    base = Path(root) if root else REPO.parent / "shared" / "data"
    return base / "routerbench" / CSV_NAME


def load(path: Path, encoder: str) -> tuple[Workload, list[LLMInfo], LLMInfo]:
    spec = WorkloadSpec(source="routerbench", path=str(path), encoder=EncoderSpec(kind=encoder))
    models = list(ROUTERBENCH_PRICES_PER_MTOK)
    wl = load_routerbench_workload(spec, models, 0, progress=False)
    llms = [
        LLMInfo(m, m, wl.models.index(m), *ROUTERBENCH_PRICES_PER_MTOK[m]) for m in wl.models
    ]
    ref = next(x for x in llms if x.name == REFERENCE)
    return wl, llms, ref


# The synthetic workload's LLMs: the RouterBench-era catalog models (Llama 3.1 came later).
SYNTHETIC_SEED = 7


def load_synthetic(n_queries: int) -> tuple[Workload, list[LLMInfo], LLMInfo]:
    from sim import catalog
    from sim.workload import make_synthetic_workload

    models = [m for m in catalog.known_models() if not m.startswith("llama-3.1")]
    wl = make_synthetic_workload(
        WorkloadSpec(source="synthetic", n_queries=n_queries), models, SYNTHETIC_SEED
    )
    llms = []
    for i, m in enumerate(wl.models):
        e = catalog.model_entry(m)
        llms.append(LLMInfo(m, m, i, e.price_in_per_mtok, e.price_out_per_mtok))
    ref = next(x for x in llms if x.name == "gpt-4")
    return wl, llms, ref


def context(wl: Workload, llms, ref: LLMInfo, train: TrainingSet, seed: int,
            judge: JudgeSpec | None = None) -> PolicyContext:
    return context_for(wl, llms, reference_llm=ref.name, rng=np.random.default_rng(seed),
                       train=train, judge=(judge or JudgeSpec()).info())


def short(name: str) -> str:
    return name.split("/")[-1][:24]


# ------------------------------------------------------------------------------ (a)
def part_frontier(wl, llms, ref, baselines: list[str]) -> None:
    from reports.frontier import frontier_table, hull_quality_at

    t0 = time.perf_counter()
    res = frontier_table(wl, llms, ref, [*baselines, "mixllm"])
    pts = res.points
    print(f"\n(a) frontier on the test split ({len(wl.rows(SPLIT_TEST))} queries), % of gpt-4 "
          f"[{time.perf_counter() - t0:.0f} s]")
    print(f"{'point':34s} {'quality %':>9s} {'cost %':>8s}")
    for row in pts.iter_rows(named=True):
        if row["kind"] in ("llm", "random", "oracle") and row["policy"] != "oracle_frontier":
            print(f"{row['kind'] + ' ' + short(row['policy']):34s} "
                  f"{row['quality_pct']:9.1f} {row['cost_pct']:8.1f}")
    for name in (*baselines, "mixllm"):
        sub = pts.filter(pts["policy"] == name)
        for row in sub.iter_rows(named=True):
            knob = "" if row["knob_value"] is None else f" {row['knob']}={row['knob_value']:g}"
            mark = "  <- default" if row["is_default"] else ""
            print(f"{name + knob:34s} {row['quality_pct']:9.1f} {row['cost_pct']:8.1f}{mark}")
    print("\nAIQ (mean of the non-decreasing hull over the single LLMs' cost range):")
    for row in res.summary.iter_rows(named=True):
        print(f"  {row['policy']:20s} {row['aiq_pct']:7.2f}")
    print("\nhull quality % at a cost level (mixllm vs baselines):")
    header = "cost %   " + " ".join(f"{n:>9s}" for n in ("mixllm", *baselines))
    print(header)
    for level in COST_LEVELS:
        vals = []
        for name in ("mixllm", *baselines):
            sub = pts.filter(pts["policy"] == name)
            vals.append(hull_quality_at(sub["cost_pct"].to_numpy(), sub["quality_pct"].to_numpy(),
                                        level))
        print(f"{level:6d}   " + " ".join(f"{v:9.1f}" for v in vals))
    d = pts.filter((pts["policy"] == "mixllm") & pts["is_default"]).row(0, named=True)
    ok = d["quality_pct"] >= 97.0 and d["cost_pct"] <= 25.0
    print(f"\nmixllm default (lambda_={d['knob_value']:g}): {d['quality_pct']:.2f}% quality at "
          f"{d['cost_pct']:.2f}% cost; target >= 97% at <= 25%: {'met' if ok else 'NOT met'}")


# ---------------------------------------------------------------------------- (tune)
TUNE_LAMBDAS = (5.0, 6.0, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0, 12.0, 15.0)
TUNE_BUDGET_PCT = 24.0  # a point under the 25% target: CV costs carry sampling error


def part_tune(wl, llms, ref, folds: int = 5) -> None:
    """Choose the default lambda on training data only: `folds`-fold cross-validation over
    the train+validation rows (fit on the other folds, route the held-out fold uncongested
    with feedback on 30% of answers), quality and cost pooled over folds; the pick is the
    lambda with the highest CV quality whose CV cost is within TUNE_BUDGET_PCT."""
    full = training_set(wl)
    rng = np.random.default_rng(0)
    fold = rng.permutation(len(full.rows)) % folds
    q = np.zeros(len(TUNE_LAMBDAS))
    c = np.zeros(len(TUNE_LAMBDAS))
    rq = rc = 0.0
    for f in range(folds):
        keep = fold != f
        sub = TrainingSet(rows=full.rows[keep], models=full.models, quality=full.quality[keep],
                          output_tokens=full.output_tokens[keep],
                          valid_mask=np.zeros(int(keep.sum()), dtype=bool))
        held = full.rows[~keep]
        pol = registry.create("mixllm", {})
        pol.setup(context(wl, llms, ref, sub, f))
        for i, lam in enumerate(TUNE_LAMBDAS):
            pol.set_tradeoff(lam)
            r = evaluate_offline(pol, wl, llms, held, reference=ref, feedback_probability=0.3,
                                 feedback_noise=0.05, seed=f)
            q[i] += r.quality_sum
            c[i] += r.cost_usd
        rq += r.quality_sum / r.quality_pct * 100
        rc += r.cost_usd / r.cost_pct * 100
    print(f"\n(tune) {folds}-fold CV on the {len(full.rows)} train+validation rows "
          f"(test rows unused); pick: best CV quality with CV cost <= {TUNE_BUDGET_PCT}%")
    qp, cp = q / rq * 100, c / rc * 100
    ok = cp <= TUNE_BUDGET_PCT
    pick = int(np.flatnonzero(ok)[np.argmax(qp[ok])]) if ok.any() else int(np.argmin(cp))
    for i, lam in enumerate(TUNE_LAMBDAS):
        mark = "  <- pick" if i == pick else ""
        print(f"  lambda_={lam:<5g} CV quality {qp[i]:6.2f}%  CV cost {cp[i]:6.2f}%{mark}")


# ------------------------------------------------------------------------------ (b)
LAMBDA_SWEEP = (0.3, 1.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 15.0, 20.0, 30.0, 60.0)


def test_frontier(pol, wl, llms, ref, rows, seed: int = 0,
                  judge: JudgeSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cost %, quality %) on `rows` at each lambda of LAMBDA_SWEEP, keeping what `pol`
    learned (each point from a copy, scored without feedback; `seed`: the judge's draws)."""
    import copy

    pts = []
    for lam in LAMBDA_SWEEP:
        p = copy.deepcopy(pol)
        p.set_tradeoff(lam, reset=False)
        r = evaluate_offline(p, wl, llms, rows, reference=ref, seed=seed, judge=judge)
        pts.append((r.cost_pct, r.quality_pct))
    c, q = np.array(pts).T
    return c, q


def part_online(wl, llms, ref, seeds: int, online_params: dict | None = None,
                share: float = 0.3, holdout: float = 0.0) -> None:
    from policies.quality_model import hull_mean_quality
    from reports.frontier import hull_quality_at

    online_params = online_params or {}
    full = training_set(wl)
    test = wl.rows(SPLIT_TEST)
    n_holdout = int(round(holdout * len(full.rows)))
    if not (share > 0 and holdout >= 0 and share + holdout < 1) or (holdout > 0) != (
            n_holdout > 0):
        sys.exit(f"--offline-share {share:g} and --holdout-share {holdout:g} must be >= 0 with "
                 "a sum below 1 (the rest is the stream), and a holdout share must hold at "
                 f"least one of the {len(full.rows)} training rows")
    scored_on = (f"a held-out {holdout:.0%} of train+validation (the test split unused)"
                 if holdout > 0 else "the test split")
    print(f"\n(b) online learning: fit on {share:.0%} of train+validation, binary feedback on "
          f"every answer of the other {1 - share - holdout:.0%} (stream), then scored on "
          f"{scored_on} without feedback")
    print(f"{'seed':>4s} {'offline q/c %':>14s} {'online q/c %':>13s} {'offline q at':>12s} "
          f"{'AIQ5-50 off':>11s} {'AIQ5-50 on':>10s} {'AIQ ceiling':>12s} {'stream q off/on':>16s}")
    print(f"{'':4s} {'(default lambda)':>28s} {'online cost':>12s}")
    rows = []
    for seed in range(seeds):
        rng = np.random.default_rng(1000 + seed)
        perm = rng.permutation(len(full.rows))
        k = int(round(share * len(perm)))
        h = int(round(holdout * len(perm)))
        keep = np.sort(perm[:k])
        ceiling_fit = full
        if h:
            test = full.rows[perm[len(perm) - h :]]
            perm = perm[: len(perm) - h]
            seen = np.sort(perm)
            ceiling_fit = TrainingSet(
                rows=full.rows[seen], models=full.models, quality=full.quality[seen],
                output_tokens=full.output_tokens[seen], valid_mask=np.zeros(len(seen), bool),
            )
        stream = full.rows[perm[k:]]  # arrival order: random
        sub = TrainingSet(
            rows=full.rows[keep],
            models=full.models,
            quality=full.quality[keep],
            output_tokens=full.output_tokens[keep],
            valid_mask=np.zeros(k, dtype=bool),
        )
        out = {}
        # The ceiling: offline on the 30% plus every model's answer to the stream's queries
        # (full information, which bandit feedback on the chosen LLM never gives).
        for name, fit, online in (("off", sub, False), ("on", sub, True),
                                  ("ceil", ceiling_fit, False)):
            pol = registry.create("mixllm", {**online_params, "online": online})
            pol.setup(context(wl, llms, ref, fit, seed))
            s = evaluate_offline(pol, wl, llms, stream, reference=ref,
                                 feedback_probability=1.0 if online else 0.0, seed=seed)
            c, q = test_frontier(pol, wl, llms, ref, test)
            t = evaluate_offline(pol, wl, llms, test, reference=ref, seed=seed)
            out[name] = (t.quality_pct, t.cost_pct, s.quality_pct, c, q)
        off, on = out["off"], out["on"]
        matched = hull_quality_at(off[3], off[4], on[1])
        aiq = {n: hull_mean_quality(v[3], v[4], 5.0, 50.0) for n, v in out.items()}
        ceil = out["ceil"]
        rows.append((on[0] - off[0], on[1] - off[1], on[0] - matched, aiq["on"] - aiq["off"],
                     aiq["ceil"] - aiq["off"], hull_quality_at(ceil[3], ceil[4], on[1]) - matched))
        print(f"{seed:4d} {off[0]:6.2f}/{off[1]:6.2f} {on[0]:6.2f}/{on[1]:6.2f} {matched:12.2f} "
              f"{aiq['off']:11.2f} {aiq['on']:10.2f} {aiq['ceil']:12.2f} "
              f"{off[2]:8.2f}/{on[2]:6.2f}")
    d = np.array(rows)
    se = d.std(axis=0, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.full(d.shape[1], np.nan)
    print(f"mean online - offline (se): at the default lambda quality {d[:, 0].mean():+.2f} "
          f"({se[0]:.2f}), cost {d[:, 1].mean():+.2f} ({se[1]:.2f}) points; against the "
          f"offline frontier at the same cost {d[:, 2].mean():+.2f} ({se[2]:.2f}); "
          f"AIQ 5-50% {d[:, 3].mean():+.2f} ({se[3]:.2f}). Full-information ceiling minus "
          f"offline, AIQ 5-50%: {d[:, 4].mean():+.2f} ({se[4]:.2f}), at the online point's cost: "
          f"{d[:, 5].mean():+.2f} ({se[5]:.2f}): what any learner from this stream could gain "
          "at most. Paper: +1.31% with binary feedback.")


# ------------------------------------------------------------------------------ (e)
def _subset(full: TrainingSet, idx: np.ndarray) -> TrainingSet:
    idx = np.sort(idx)
    return TrainingSet(rows=full.rows[idx], models=full.models, quality=full.quality[idx],
                       output_tokens=full.output_tokens[idx],
                       valid_mask=np.zeros(len(idx), dtype=bool))


def part_bandit(wl, llms, ref, seeds: int, share: float = 0.3) -> None:
    from policies.quality_model import hull_mean_quality

    full = training_set(wl)
    test = wl.rows(SPLIT_TEST)
    cols = np.array([x.model_col for x in llms])
    print(f"\n(e) bandit information: fit on {share:.0%} of train+validation plus one answer "
          f"per streamed query (the other {1 - share:.0%}), refitted offline; AIQ 5-50% on the "
          "test split minus the offline-only policy's")
    print(f"{'seed':>4s} {'offline AIQ':>11s} {'own choices':>11s} {'random LLM':>10s} "
          f"{'all answers':>11s}")

    def aiq(pol, stream) -> float:
        # Route the stream first without feedback, as (b) does for every policy: routing
        # alone moves the LinUCB bonus, and the comparison must not credit that to the fit.
        evaluate_offline(pol, wl, llms, full.rows[stream], reference=ref, seed=0)
        c, q = test_frontier(pol, wl, llms, ref, test)
        return hull_mean_quality(c, q, 5.0, 50.0)

    out = []
    for seed in range(seeds):
        perm = np.random.default_rng(1000 + seed).permutation(len(full.rows))  # as (b)
        k = int(round(share * len(perm)))
        keep, stream = perm[:k], perm[k:]
        off = registry.create("mixllm", {})
        off.setup(context(wl, llms, ref, _subset(full, keep), seed))
        chosen = evaluate_offline(off, wl, llms, full.rows[stream], reference=ref,
                                  seed=seed).chosen
        off = registry.create("mixllm", {})
        off.setup(context(wl, llms, ref, _subset(full, keep), seed))
        a_off = aiq(off, stream)
        random_llm = np.random.default_rng(seed).integers(len(llms), size=len(stream))
        row = [a_off]
        for answered in (cols[chosen], cols[random_llm]):
            pol = registry.create("mixllm", {"knn_k": int(off.knn_k or 100)})
            both = np.sort(np.concatenate([keep, stream]))
            pol.setup(context(wl, llms, ref, _subset(full, both), seed))
            pos = np.searchsorted(both, keep), np.searchsorted(both, stream)
            pol.refit_columns({int(c): np.concatenate([pos[0], pos[1][answered == c]])
                               for c in np.unique(cols)})
            row.append(aiq(pol, stream))
        ceil = registry.create("mixllm", {})
        ceil.setup(context(wl, llms, ref, full, seed))
        row.append(aiq(ceil, stream))
        out.append([v - a_off for v in row[1:]])
        print(f"{seed:4d} {a_off:11.2f} {row[1] - a_off:+11.2f} {row[2] - a_off:+10.2f} "
              f"{row[3] - a_off:+11.2f}")
    d = np.array(out)
    se = d.std(axis=0, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else np.full(3, np.nan)
    print(f"mean minus offline-only (se): own choices {d[:, 0].mean():+.2f} ({se[0]:.2f}), "
          f"random LLM {d[:, 1].mean():+.2f} ({se[1]:.2f}), all answers {d[:, 2].mean():+.2f} "
          f"({se[2]:.2f})")


# ------------------------------------------------------------------------------ (d)
TOPK_KEEP = ("primary", "best_judged", "best_realised")
TOPK_JUDGE_SEEDS = 10  # best_judged depends on the judge's draws: mean (sd) over these


def part_topk(wl, llms, ref) -> None:
    """Top-k, the paper's open question: fitted on train+validation, scored on the test split
    (uncongested), the judge at its default noise (0.5, as for cascades)."""
    import copy

    from policies.quality_model import hull_mean_quality

    full = training_set(wl)
    test = wl.rows(SPLIT_TEST)
    print("\n(d) top-k: the k best-scored LLMs answer; the user keeps the primary answer, the "
          "one the judge scores highest (realised quality + N(0, 0.5), clipped), or the best "
          "realised one (an upper bound). RouterBench test split, uncongested.")
    print("AIQ 5-50% counts the hull as 0 below the cheapest cost k answers reach, so compare "
          "top-k at a cost level (hull quality at 25% and 50% of gpt-4's cost; '-': that "
          "cost is out of reach). The judge is free (a small scorer) or, 'LLM judge', priced "
          f"as one gpt-3.5 call per answer. best_judged: mean (sd) over {TOPK_JUDGE_SEEDS} "
          "judge seeds.")
    from reports.frontier import hull_quality_at

    def cell(values: list[float], width: int) -> str:
        if not np.isfinite(values).all():
            return "-".rjust(width)
        if len(values) == 1:
            return f"{values[0]:{width}.2f}"
        return f"{np.mean(values):.2f} ({np.std(values, ddof=1):.2f})".rjust(width)

    # An LLM-as-judge alternative to a free scorer: one gpt-3.5-turbo call per judged
    # answer, reading the query and the answer at its input price (RouterBench list prices;
    # the instruction's and verdict's few tokens neglected). The mean below is for scale.
    pin = ROUTERBENCH_PRICES_PER_MTOK["gpt-3.5-turbo-1106"][0]
    llm_judge_spec = JudgeSpec(price_in_per_mtok=pin)
    read = wl.input_tokens[test].astype(float) + wl.output_tokens[test].astype(float).mean(1)
    llm_judge = float(read.mean()) * pin / 1e6
    ref_cost = float(np.mean(
        (wl.input_tokens[test] * ref.price_in_per_mtok
         + wl.output_tokens[test, ref.model_col] * ref.price_out_per_mtok) / 1e6
    ))
    print(f"LLM judge: ${llm_judge:.2e} per judged answer, {100 * llm_judge / ref_cost:.1f}% of "
          "gpt-4's mean cost per query (billed per token of each query and answer)")
    print(f"{'k':>2s} {'keep':28s} {'q % (default)':>13s} {'c %':>6s} {'AIQ 5-50%':>10s} "
          f"{'hull q at 25%':>13s} {'at 50%':>7s}")
    free = JudgeSpec()
    variants = [(1, "primary", free)]
    for k in (2, 3):
        variants += [(k, "primary", free), (k, "best_judged", free),
                     (k, "best_judged", llm_judge_spec), (k, "best_realised", free)]
    for k, keep, judge in variants:
        pol = registry.create("mixllm", {"top_k": k, "keep": keep})
        pol.setup(context(wl, llms, ref, full, 0, judge))  # it prices the judge's calls
        cols: list[list[float]] = [[], [], [], [], []]
        for seed in range(TOPK_JUDGE_SEEDS if keep == "best_judged" else 1):
            c, q = test_frontier(pol, wl, llms, ref, test, seed=seed, judge=judge)
            # A copy: serving the split moves the LinUCB matrices, and every judge seed
            # must start from the same fitted policy.
            r = evaluate_offline(copy.deepcopy(pol), wl, llms, test, reference=ref,
                                 seed=seed, judge=judge)
            for col, v in zip(cols, (r.quality_pct, r.cost_pct,
                                     hull_mean_quality(c, q, 5.0, 50.0),
                                     hull_quality_at(c, q, 25.0), hull_quality_at(c, q, 50.0)),
                              strict=True):
                col.append(v)
        label = keep + (" (upper bound)" if keep == "best_realised" else "")
        label += ", LLM judge" if judge is llm_judge_spec else ""
        print(f"{k:2d} {label:28s} {cell(cols[0], 13)} {cell(cols[1], 6)} "
              f"{cell(cols[2], 10)} {cell(cols[3], 13)} {cell(cols[4], 7)}")


# ------------------------------------------------------------------------------ (c)
ABLATIONS: list[tuple[str, dict]] = [
    ("defaults", {}),
    ("uncertainty off", {"uncertainty": False}),
    ("penalty off (beta=0)", {"penalty": False}),
    # Without the admission check only the penalty keeps requests off full queues.
    ("admission check off", {"admission": False}),
    ("admission off, penalty off", {"admission": False, "penalty": False}),
    ("online on", {"online": True}),
    ("all off (predictors only)", {"uncertainty": False, "penalty": False, "online": False}),
    # A quality-hungry trade-off loads gpt-4, the slowest and scarcest deployment, during
    # the spike: where the latency penalty has queues to avoid.
    ("lambda_=30", {"lambda_": 30.0}),
    ("lambda_=30, penalty off", {"lambda_": 30.0, "penalty": False}),
]


def tags_available() -> bool:
    try:
        import torch  # noqa: F401

        import policies.mixllm.encoder  # noqa: F401
    except ImportError:
        return False
    return True


def part_ablation(wl, llms, ref, with_tags: bool) -> None:
    from sim.runner import run as run_scenario

    variants = list(ABLATIONS)
    if with_tags:
        if tags_available():
            variants.insert(1, ("tags on", {"tags": True}))
        else:
            print("(tags on skipped: the tag-enhanced encoder needs torch and transformers)")
    spike = load_scenario("load_spike")
    print("\n(c) ablation. RouterBench test split, uncongested (feedback on 30% of answers) | "
          "load_spike scenario (synthetic workload, seed 7)")
    print("rb AIQ: AIQ 5-50% of the variant's own lambda sweep (a fixed lambda lands each "
          "variant at a different cost, so compare variants there)")
    print(f"{'variant':28s} {'rb q %':>7s} {'rb c %':>7s} {'rb AIQ':>7s} | {'q %':>6s} "
          f"{'c %':>6s} {'p95 wait s':>10s} {'rejected':>8s} {'abandoned':>9s}")
    from policies.quality_model import hull_mean_quality

    full = training_set(wl)
    test = wl.rows(SPLIT_TEST)
    for label, params in variants:
        pol = registry.create("mixllm", params)
        pol.setup(context(wl, llms, ref, full, 0))
        sweep = []
        for lam in pol.tradeoff_grid:
            pol.set_tradeoff(lam)  # every point starts from the state after setup
            r = evaluate_offline(pol, wl, llms, test, reference=ref, feedback_probability=0.3,
                                 feedback_noise=0.05, seed=0)
            sweep.append((r.cost_pct, r.quality_pct))
        c, q = np.array(sweep).T
        rb_aiq = hull_mean_quality(c, q, 5.0, 50.0)
        pol.set_tradeoff(params.get("lambda_", pol.params.lambda_))
        rb = evaluate_offline(pol, wl, llms, test, reference=ref, feedback_probability=0.3,
                              feedback_noise=0.05, seed=0)
        spike_params = {k: v for k, v in params.items() if k != "tags"}  # no texts there
        res = run_scenario(spike, [PolicySpec(name="mixllm", params=spike_params, label=label)],
                           seeds=1, keep_requests=False)
        s = res.summaries[0]
        print(f"{label:28s} {rb.quality_pct:7.1f} {rb.cost_pct:7.1f} {rb_aiq:7.2f} | "
              f"{s['quality_pct_of_reference']:6.1f} {s['cost_pct_of_reference']:6.1f} "
              f"{s['p95_wait_s']:10.2f} {s['rejected']:8d} {s['abandoned']:9d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all",
                    choices=["all", "tune", "frontier", "online", "bandit", "ablation",
                             "topk"])
    ap.add_argument("--data", default=None, help="RouterBench-format CSV")
    ap.add_argument("--encoder", default="transformer", choices=["transformer", "hashing"])
    ap.add_argument("--seeds", type=int, default=30, help="random offline subsets in (b) "
                    "(10 left differences of 0.3 points undecided on RouterBench)")
    ap.add_argument("--baselines", default="knn", help="comma-separated learned routers")
    ap.add_argument("--no-tags", dest="tags", action="store_false",
                    help="leave 'tags on' out of the ablation (it fine-tunes the encoder: "
                    "minutes on CPU the first time, cached after)")
    ap.add_argument("--offline-share", type=float, default=0.3,
                    help="share of the training rows fitted offline in (b)")
    ap.add_argument("--holdout-share", type=float, default=0.0,
                    help="(b) scores on this share of the training rows, held out from both "
                    "the fit and the stream, instead of on the test split")
    ap.add_argument("--workload", default="routerbench", choices=["routerbench", "synthetic"],
                    help="data of the online part (b); the other parts need RouterBench")
    ap.add_argument("--n-queries", type=int, default=6000,
                    help="distinct queries of the synthetic workload")
    ap.add_argument("--params", default="{}", help="JSON mixllm params for (b), e.g. "
                    "'{\"online_pg\": 1}'")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_engine

    params = bench_engine.checked_cli(ap, "mixllm", args.params,
                                      {"--seeds": args.seeds, "--n-queries": args.n_queries})
    logging.basicConfig(level=logging.ERROR)
    if args.workload == "synthetic":
        if args.part != "online":
            sys.exit("--workload synthetic runs the online part only: add --part online")
        wl, llms, ref = load_synthetic(args.n_queries)
        part_online(wl, llms, ref, args.seeds, params, args.offline_share,
                    args.holdout_share)
        return
    path = data_path(args.data)
    if not path.is_file():
        sys.exit(f"no RouterBench data at {path}; pass --data CSV or set ROUTESIM_SHARED_DATA")
    wl, llms, ref = load(path, args.encoder)
    baselines = [b for b in args.baselines.split(",") if b]
    if args.part in ("all", "tune"):
        part_tune(wl, llms, ref)
    if args.part in ("all", "frontier"):
        part_frontier(wl, llms, ref, baselines)
    if args.part in ("all", "online"):
        part_online(wl, llms, ref, args.seeds, params, args.offline_share,
                    args.holdout_share)
    if args.part in ("all", "bandit"):
        part_bandit(wl, llms, ref, args.seeds, args.offline_share)
    if args.part in ("all", "ablation"):
        part_ablation(wl, llms, ref, args.tags)
    if args.part in ("all", "topk"):
        part_topk(wl, llms, ref)


if __name__ == "__main__":
    main()

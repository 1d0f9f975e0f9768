"""Do tag-enhanced embeddings (MixLLM stage 1) predict per-LLM quality better than generic ones?

On the shared RouterBench file: the encoder is fine-tuned on the train rows (minus the
validation rows carved from them), a k-nearest-neighbour predictor (cosine similarity, the
neighbours' mean 0/1 score) estimates each LLM's chance to answer a query correctly, and the
prediction is scored per LLM by AUC (ranking) and Brier score (calibration) on the
validation rows and on the test split. A second probe, per-LLM logistic regression on the
embedding plus the task one-hot, checks that the verdict is not an artefact of kNN. The
probe's knob (k, or the regularisation C) is chosen per embedding on validation; among
the tag-enhanced variants (epochs, temperature, domain count, anchor weight, concatenation
with the generic vector) the one with the best validation Brier score is "selected"; test
numbers of every variant are printed, but nothing is chosen on them.

Reference rows: the generic encoder on the full prompt (what the loader computes: left-
truncated to 256 tokens), the generic encoder on the question part only, without shared
instruction lines (exactly what the fine-tuned encoder reads, so the comparison separates
the choice of input from the fine-tune),
and a per-task prior (each LLM's mean score per eval_name on the train rows: what knowing the
task alone gives). "within-task AUC" averages AUC over the three tasks, which shows whether
an embedding ranks queries of one task, beyond telling tasks apart.

    python benchmarks/bench_tag_embeddings.py [--data CSV] [--cache-dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

# This checkout's packages, not whichever tree is installed (comparing two checkouts runs
# each one's copy of this script).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from policies.mixllm.encoder import FineTuneSettings, encoder_inputs, fine_tune  # noqa: E402
from sim.embeddings import encode_texts, l2_normalise  # noqa: E402
from sim.routerbench import ROUTERBENCH_PRICES_PER_MTOK, load_routerbench_workload  # noqa: E402
from sim.scenario import EncoderSpec, WorkloadSpec  # noqa: E402
from sim.types import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Workload  # noqa: E402

K_CHOICES = (5, 10, 20, 40, 80, 160, 320)
LOGISTIC_C = (0.1, 1.0, 10.0)
DEFAULT_DATA = (
    Path(os.environ.get("ROUTESIM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared"
                        / "data"))
    / "routerbench" / "routerbench_arc_mbpp_winogrande.csv"
)


@dataclass
class Scores:
    auc: np.ndarray  # (m,) per LLM
    within_auc: np.ndarray  # (m,) per LLM, mean over tasks
    brier: np.ndarray  # (m,)


def knn_predict(emb: np.ndarray, pool: np.ndarray, rows: np.ndarray, y: np.ndarray, k: int):
    """(len(rows), m) mean score of each row's k most cosine-similar pool rows."""
    sims = emb[rows] @ emb[pool].T
    top = np.argpartition(-sims, kth=min(k, len(pool)) - 1, axis=1)[:, :k]
    return y[pool][top].mean(axis=1)


def score(pred: np.ndarray, truth: np.ndarray, task: np.ndarray) -> Scores:
    m = truth.shape[1]
    auc = np.full(m, np.nan)
    within = np.full(m, np.nan)
    for j in range(m):
        if len(np.unique(truth[:, j])) == 2:
            auc[j] = roc_auc_score(truth[:, j], pred[:, j])
        per_task = [
            roc_auc_score(truth[task == t, j], pred[task == t, j])
            for t in np.unique(task)
            if len(np.unique(truth[task == t, j])) == 2
        ]
        within[j] = np.mean(per_task) if per_task else np.nan
    return Scores(auc, within, ((pred - truth) ** 2).mean(axis=0))


def bootstrap_gap(pred_a, pred_b, truth, *, n_boot: int = 300, seed: int = 0):
    """Paired bootstrap over test queries of (b - a) in mean AUC and mean Brier: 95% CIs."""
    rng = np.random.default_rng(seed)
    n, m = truth.shape
    d_auc, d_brier = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        y = truth[idx]
        ok = [j for j in range(m) if 0 < y[:, j].sum() < n]
        auc_a = np.mean([roc_auc_score(y[:, j], pred_a[idx, j]) for j in ok])
        auc_b = np.mean([roc_auc_score(y[:, j], pred_b[idx, j]) for j in ok])
        d_auc.append(auc_b - auc_a)
        d_brier.append(((pred_b[idx] - y) ** 2).mean() - ((pred_a[idx] - y) ** 2).mean())
    return np.percentile(d_auc, [2.5, 97.5]), np.percentile(d_brier, [2.5, 97.5])


@dataclass
class Row:
    name: str
    knob: float  # the probe's k or C, chosen on validation
    valid: Scores
    test: Scores
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    test_pred: np.ndarray | None = None


def logistic_predict(emb, w: Workload, fit, rows, y, c: float) -> np.ndarray:
    """Per LLM, L2-regularised logistic regression on [embedding, task one-hot]."""
    from sklearn.linear_model import LogisticRegression

    onehot = np.eye(len(w.task_names))[w.task]
    x = np.hstack([emb, onehot])
    out = np.empty((len(rows), y.shape[1]))
    for j in range(y.shape[1]):
        model = LogisticRegression(C=c, max_iter=2000).fit(x[fit], y[fit, j])
        out[:, j] = model.predict_proba(x[rows])[:, 1]
    return out


PROBES = {
    # name: (predict(emb, w, fit, rows, y, knob), knob choices, knob label)
    "kNN": (lambda e, w, f, r, y, k: knn_predict(e, f, r, y, k), K_CHOICES, "k"),
    "logistic": (logistic_predict, LOGISTIC_C, "C"),
}


def evaluate(probe: str, name: str, emb: np.ndarray, w: Workload, fit, valid, test,
             **kw) -> Row:
    """The probe's knob chosen on validation (best mean Brier), then scored on test."""
    predict, knobs, _ = PROBES[probe]
    y = w.quality.astype(np.float64)
    best = None
    for knob in knobs:
        s = score(predict(emb, w, fit, valid, y, knob), y[valid], w.task[valid])
        if best is None or s.brier.mean() < best[1].brier.mean():
            best = (knob, s)
    knob, vs = best
    pred = predict(emb, w, fit, test, y, knob)
    return Row(name, knob, vs, score(pred, y[test], w.task[test]), test_pred=pred, **kw)


def task_prior(w: Workload, fit, rows) -> np.ndarray:
    y = w.quality.astype(np.float64)
    means = np.stack([y[fit][w.task[fit] == t].mean(axis=0) for t in range(len(w.task_names))])
    return means[w.task[rows]]


def fmt(x: float) -> str:
    return "   -  " if np.isnan(x) else f"{x:6.3f}"


def print_summary(probe: str, rows: list[Row], selected: str) -> None:
    print()
    print(f"probe: {probe}")
    print(f"{'embedding':52s} {PROBES[probe][2]:>5s} | {'valid AUC':>9s} {'Brier':>6s} | "
          f"{'test AUC':>8s} {'in-task':>7s} {'Brier':>6s} | {'wall s':>6s} {'cpu s':>6s}")
    print("-" * 121)
    for r in rows:
        mark = "*" if r.name == selected else " "
        print(
            f"{mark}{r.name:51s} {r.knob:5g} | {fmt(np.nanmean(r.valid.auc)):>9s} "
            f"{fmt(r.valid.brier.mean())} | {fmt(np.nanmean(r.test.auc)):>8s} "
            f"{fmt(np.nanmean(r.test.within_auc)):>7s} {fmt(r.test.brier.mean())} | "
            f"{r.seconds:6.0f} {r.cpu_seconds:6.0f}"
        )
    print("(* = tag-enhanced variant selected on validation Brier; AUC/Brier are means over "
          "the 11 LLMs; in-task = AUC within each task, averaged)")


def print_per_model(models, generic: Row, tuned: Row) -> None:
    print()
    print(f"test split, per LLM: {generic.name} vs {tuned.name}")
    print(f"{'LLM':36s} {'AUC gen':>8s} {'AUC tag':>8s} {'Brier gen':>9s} {'Brier tag':>9s}")
    for j, m in enumerate(models):
        print(f"{m:36s} {fmt(generic.test.auc[j]):>8s} {fmt(tuned.test.auc[j]):>8s} "
              f"{fmt(generic.test.brier[j]):>9s} {fmt(tuned.test.brier[j]):>9s}")
    print(f"{'mean':36s} {fmt(np.nanmean(generic.test.auc)):>8s} "
          f"{fmt(np.nanmean(tuned.test.auc)):>8s} {fmt(generic.test.brier.mean()):>9s} "
          f"{fmt(tuned.test.brier.mean()):>9s}")


def variants(quick: bool) -> list[tuple[str, FineTuneSettings]]:
    """(label, settings); each is also evaluated concatenated with the generic embedding."""
    base = FineTuneSettings()
    out = [("tag-enhanced (defaults)", base)]
    if quick:
        return out
    out += [
        ("tag-enhanced, 4 epochs", replace(base, epochs=4)),
        ("tag-enhanced, temperature 0.3", replace(base, temperature=0.3)),
        ("tag-enhanced, 4 domains", replace(base, n_domains=4)),
        ("tag-enhanced, 32 domains", replace(base, n_domains=32)),
        ("tag-enhanced, anchor weight 0.2", replace(base, anchor_weight=0.2)),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--cache-dir", default=None, help="embedding cache (default: ROUTESIM_CACHE"
                    " or ~/.cache/routesim)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="only the default fine-tune")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.data.is_file():
        print(f"no data file at {args.data}; pass --data PATH", file=sys.stderr)
        return 2

    encoder = EncoderSpec(cache_dir=args.cache_dir)
    spec = WorkloadSpec(source="routerbench", path=str(args.data), validation_fraction=0.2,
                        encoder=encoder)
    models = list(ROUTERBENCH_PRICES_PER_MTOK)
    t0 = time.perf_counter()
    w = load_routerbench_workload(spec, models, args.seed, progress=True)
    print(f"loaded {w.n} queries, generic embeddings in {time.perf_counter() - t0:.0f} s")
    fit, valid, test = (w.rows(s) for s in (SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST))
    print(f"rows: fit {len(fit)}, validation {len(valid)}, test {len(test)}")
    texts = list(w.texts or ())
    evals = [w.task_names[t] for t in w.task]

    y = w.quality.astype(np.float64)
    q_enc = encoder.model_copy(update={"max_tokens": FineTuneSettings().max_tokens})
    generic_q = encode_texts(encoder_inputs(texts, fit), q_enc, progress=True)
    references = {
        "generic, full prompt (left-truncated 256)": w.features,
        "generic, question part (128)": generic_q,
    }
    tuned: dict[str, tuple[np.ndarray, float, float]] = {}
    for label, settings in variants(args.quick):
        c0 = time.process_time()
        res = fine_tune(texts, evals, encoder=encoder, train_rows=fit, seed=args.seed,
                        settings=settings, progress=True)
        cpu = time.process_time() - c0
        note = " (cached)" if res.cached else ""
        print(f"{label}: fine-tune {res.seconds:.0f} s wall, {cpu:.0f} s cpu{note}; "
              f"epoch losses {[round(x, 3) for x in res.losses]}")
        tuned[label] = (res.embeddings, res.seconds, cpu)
        both = l2_normalise(np.hstack([w.features, res.embeddings]))
        tuned[label + " + generic concat"] = (both, 0.0, 0.0)

    prior = Row("per-task prior (no embedding)", 0,
                score(task_prior(w, fit, valid), y[valid], w.task[valid]),
                score(task_prior(w, fit, test), y[test], w.task[test]))
    for probe in PROBES:
        ref_rows = [evaluate(probe, n, e, w, fit, valid, test) for n, e in references.items()]
        tuned_rows = [
            evaluate(probe, n, e, w, fit, valid, test, seconds=sec, cpu_seconds=cpu)
            for n, (e, sec, cpu) in tuned.items()
        ]
        selected = min(tuned_rows, key=lambda r: r.valid.brier.mean())
        print_summary(probe, [prior, *ref_rows, *tuned_rows], selected.name)
        print_per_model(w.models, ref_rows[0], selected)
        for ref in ref_rows:
            ci_auc, ci_brier = bootstrap_gap(ref.test_pred, selected.test_pred, y[test])
            print(f"selected minus {ref.name}, 95% paired-bootstrap CI over test queries: "
                  f"mean AUC [{ci_auc[0]:+.4f}, {ci_auc[1]:+.4f}], "
                  f"mean Brier [{ci_brier[0]:+.4f}, {ci_brier[1]:+.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Columnar recording: preallocated numpy columns, one row per request, written as parquet.

Arrivals are generated before the run, so the number of requests is known and every column
is allocated once (no per-request dicts or objects kept until the end). Output columns are
declared once, here, with units in their names.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from sim.errors import RouteSimError

# Outcome codes (exactly one per request).
COMPLETED, REJECTED, ABANDONED, FAILED, IN_FLIGHT = 0, 1, 2, 3, 4
OUTCOMES = ("completed", "rejected", "abandoned", "failed", "in_flight")

# Why a request was rejected (one per rejected request). Kept apart because only some are
# load: a down deployment or a removed one rejects whatever the load.
REJECT_DOWN, REJECT_RATE_LIMITED, REJECT_QUEUE_FULL, REJECT_REMOVED = 0, 1, 2, 3
REJECT_REASONS = ("down", "rate_limited", "queue_full", "removed")

# name -> (numpy dtype, fill value). Times in seconds from the start of the run.
REQUEST_COLUMNS: dict[str, tuple[str, float | int]] = {
    "arrival_s": ("f8", np.nan),
    "row": ("i4", -1),  # workload row (the query)
    "task": ("i2", -1),  # the query's task family (written as its name)
    "input_tokens": ("i4", 0),
    # Index into the run's LLM names: the deployment whose answer was kept; for a request
    # not completed, where its last call ended (a fan-out: its primary copy's, or the
    # deployment where its user gave up); in flight when the run ended, where it was
    # queued or in service (a fan-out: its primary copy, if still out).
    "llm": ("i2", -1),
    "outcome": ("i1", IN_FLIGHT),
    "reject_reason": ("i1", -1),  # one of REJECT_REASONS when rejected; null otherwise
    "attempts": ("i2", 0),  # LLM calls made (retries, escalations, top-k fan-out)
    "retries": ("i2", 0),  # re-offers after an outage failure
    "start_s": ("f8", np.nan),  # service start of the kept answer
    "end_s": ("f8", np.nan),  # completion, rejection, abandonment or failure time
    # Time queued, summed over the request's routing rounds; service lost in an outage is
    # not waiting. A fan-out round counts its longest-queued copy once (the user waits for
    # every copy), except a keep="primary" round: answered by its primary, that copy's
    # wait; its primary lost, the longer of the primary's wait and the kept copy's.
    "wait_s": ("f8", np.nan),
    "ttft_s": ("f8", np.nan),  # arrival -> first token of the kept answer
    "service_s": ("f8", np.nan),
    "latency_s": ("f8", np.nan),  # arrival -> last token
    "output_tokens": ("f4", np.nan),
    "cost_usd": ("f8", 0.0),  # every billed attempt
    "quality": ("f4", np.nan),  # realised quality of the kept answer (NaN: not completed)
    "ref_quality": ("f4", np.nan),  # reference LLM's ground-truth quality on this query
    "ref_cost_usd": ("f8", np.nan),  # what the reference LLM would have cost
    "feedback": ("i1", -1),  # -1 none; binary 0/1; refined mode stores round(100 * reward)
    "feedback_s": ("f8", np.nan),  # when the feedback reached the router
    "score": ("f4", np.nan),  # the chosen deployment's decision score (first decision)
}


class RequestRecorder:
    """Preallocated per-request columns plus per-candidate decision matrices."""

    def __init__(self, n: int, llm_names: Sequence[str], task_names: Sequence[str] = ()):
        self.n = n
        self.llm_names = list(llm_names)
        self.task_names = list(task_names)
        self.cols: dict[str, np.ndarray] = {
            name: np.full(n, fill, dtype=dtype) for name, (dtype, fill) in REQUEST_COLUMNS.items()
        }
        # term name -> (n, n_llms) float32, allocated on first use (NaN where not a candidate)
        self.terms: dict[str, np.ndarray] = {}

    def decision_terms(self, rid: int, cand_idx: np.ndarray | slice, term: str, values):
        """Record one decision's per-candidate values of `term`. `cand_idx` maps candidates
        to LLM columns; a slice when they are the leading columns in order (the usual case,
        and a much cheaper write than fancy indexing)."""
        mat = self.terms.get(term)
        if mat is None:
            mat = np.full((self.n, len(self.llm_names)), np.nan, dtype=np.float32)
            self.terms[term] = mat
        mat[rid, cand_idx] = values

    def frame(self, request_id_offset: int = 0) -> pl.DataFrame:
        data: dict[str, Any] = {"request_id": np.arange(self.n, dtype=np.int64)}
        for name, arr in self.cols.items():
            data[name] = arr
        df = pl.DataFrame(data)
        df = df.with_columns(
            pl.Series("llm", _labels(self.cols["llm"], self.llm_names)),
            pl.Series("outcome", _labels(self.cols["outcome"], OUTCOMES)),
            pl.Series("reject_reason", _labels(self.cols["reject_reason"], REJECT_REASONS)),
            pl.Series("task", _labels(self.cols["task"], self.task_names))
            if self.task_names else pl.col("task"),
        ).with_columns(
            pl.when(pl.col("feedback") >= 0).then(pl.col("feedback")).otherwise(None)
            .alias("feedback")
        )
        extra = {}
        for term, mat in self.terms.items():
            for j, llm in enumerate(self.llm_names):
                extra[f"{term}__{llm}"] = mat[:, j]
        if extra:
            df = df.hstack(pl.DataFrame(extra))
        return df


def _labels(codes: np.ndarray, labels: Sequence[str]) -> pl.Series:
    """Strings for integer codes (a negative code: null), gathered by polars: no numpy
    unicode array of the column's length (at a million requests that is tens of MiB)."""
    idx = np.where(codes < 0, len(labels), codes).astype(np.uint32)
    return pl.Series("labels", [*labels, None], dtype=pl.Utf8).gather(idx)


class GrowingColumns:
    """Append-only numeric columns (timeline samples, events) without per-row dicts."""

    def __init__(self, names: Sequence[str]):
        self._data: dict[str, list] = {n: [] for n in names}

    def append(self, *values) -> None:
        for col, v in zip(self._data.values(), values, strict=True):
            col.append(v)

    def frame(self, schema: dict[str, Any] | None = None) -> pl.DataFrame:
        return pl.DataFrame(self._data, schema=schema)


# Files written next to scenario and policy directories (a directory of one of these names
# would collide with them).
RESERVED_NAMES = frozenset({
    "summary.parquet", "report.html", "scenario.yaml", "summary.json", "requests.parquet",
    "timeline.parquet", "events.parquet", "sweep.parquet", "sweep_report.html", "plan.json",
    "plan.html",
})


# ----------------------------------------------------------------------------- atomic I/O
def check_out_dir(path: str | Path, *, field: str = "out") -> None:
    """Raise unless `path` is or can become a directory: checked before any work, so a
    mistyped --out fails at once rather than after the whole simulation."""
    if str(path).strip() == "":
        raise RouteSimError("is empty; give a new or existing directory (. for the current "
                            "one)", field=field)
    p = Path(path)
    for q in (p, *p.parents):
        if q.is_symlink() and not q.exists():
            raise RouteSimError(f"{q} is a symbolic link to nothing; give a new or existing "
                                "directory", source=str(p), field=field)
        if not q.exists():
            continue
        if not q.is_dir():
            where = "exists and is not a directory" if q == p else f"{q} is not a directory"
            raise RouteSimError(f"{where}; give a new or existing directory",
                                source=str(p), field=field)
        # The deepest existing directory is where outputs (or their parents) get created.
        if not os.access(q, os.W_OK | os.X_OK):
            where = "is" if q == p else f"would be created in {q}, which is"
            raise RouteSimError(f"{where} not writable by this user; give a writable "
                                "directory", source=str(p), field=field)
        return


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temp file in the same directory, then rename (no partial files)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # unwritable, a full disk, a file where a directory should be
        raise RouteSimError(f"cannot write {path}: {exc.strerror or exc}",
                            source=str(path), field="out") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp creates 0600 files; outputs are meant to be shared like any other file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except OSError as exc:  # a full disk, a quota
        tmp_path.unlink(missing_ok=True)
        raise RouteSimError(f"cannot write {path}: {exc.strerror or exc}",
                            source=str(path), field="out") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_parquet(df: pl.DataFrame, path: str | Path) -> None:
    _atomic(Path(path), lambda p: df.write_parquet(p))


def _finite(obj: Any) -> Any:
    """NaN/inf become null: strict JSON readers (jq, JSON.parse) reject NaN literals."""
    if isinstance(obj, float | np.floating):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj: Any, path: str | Path) -> None:
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=_json_default,
                      allow_nan=False)
    _atomic(Path(path), lambda p: p.write_text(text + "\n", encoding="utf-8"))


def write_text(text: str, path: str | Path) -> None:
    _atomic(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

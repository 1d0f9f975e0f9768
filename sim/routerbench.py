"""RouterBench-format workloads: one row per query, per-model scores and costs, as a `Workload`.

Accepted table (CSV or parquet, read with polars):

- ``prompt`` and ``eval_name`` (required), ``split`` (optional: train / test / validation).
- Per model M, either this project's style: ``M|score`` (0..1), ``M|cost`` (USD),
  optional ``M|response_chars``; or the original RouterBench style: ``M`` (the score),
  ``M|total_cost``, optional ``M|model_response`` (the answer text).
  Prompts (and responses) stored as the repr of a one-element Python list, as upstream
  RouterBench does, are unwrapped to plain text.

Hidden ground truth per (query, model): quality = the score; output tokens = response
characters / 4, or, without a response length, recovered from the cost and the model's list
prices. Input tokens = prompt characters / 4. Four characters per token is the usual rule of
thumb for English text, and the shared RouterBench file's costs follow it: the median of
gpt-4's cost / ((prompt chars / 4) * $10 + (response chars / 4) * $30) per 1M tokens is 1.00
on ARC-Challenge and 0.98 on MBPP. Using the same rule for input and output keeps simulated
costs consistent with the data's.

Rows with a missing score for any selected model are excluded and reported (a warning with
counts per model), never treated as 0. Features are the prompts' embeddings, computed here
in one batch (sim.embeddings) so no encoder runs during the simulation.
"""

from __future__ import annotations

import ast
import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from sim.embeddings import encode_texts
from sim.errors import DataError
from sim.scenario import WorkloadSpec
from sim.types import SPLIT_NAMES, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, Workload

log = logging.getLogger(__name__)
_NOTED: set[str] = set()  # data warnings already given by this process

CHARS_PER_TOKEN = 4.0

# List prices in USD per 1M tokens (input, output) of the RouterBench models, from
# `TOKEN_COSTS` in routers/common.py of the GitHub repository withmartian/routerbench (read
# as per-1M-token list prices, which is what the data's cost columns follow; see
# shared/data/routerbench/README.md). Used to recover output tokens from costs when a table
# has no response lengths.
ROUTERBENCH_PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "claude-v1": (8.0, 24.0),
    "claude-v2": (8.0, 24.0),
    "gpt-3.5-turbo-1106": (1.0, 2.0),
    "meta/llama-2-70b-chat": (0.9, 0.9),
    "claude-instant-v1": (0.8, 2.4),
    "zero-one-ai/Yi-34B-Chat": (0.8, 0.8),
    "meta/code-llama-instruct-34b-chat": (0.776, 0.776),
    "mistralai/mixtral-8x7b-chat": (0.6, 0.6),
    "WizardLM/WizardLM-13B-V1.2": (0.3, 0.3),
    "mistralai/mistral-7b-chat": (0.2, 0.2),
}

# Without a split column the rows are split at random (per eval_name) with this test share;
# RouterDC's re-split of RouterBench, which the shared file uses, is about 70/30.
DEFAULT_TEST_FRACTION = 0.3

_VALIDATION_ALIASES = {"valid": "validation", "val": "validation", "dev": "validation"}


def load_routerbench_workload(
    spec: WorkloadSpec,
    models: Sequence[str],
    seed: int | np.random.SeedSequence,
    *,
    prices: Mapping[str, tuple[float, float]] | None = None,
    progress: bool = True,
) -> Workload:
    """Read `spec.path` into a `Workload` over `models` (in that order, duplicates dropped).

    All rows are kept whatever `spec.split` says (the engine samples arrivals from that
    split); `spec.validation_fraction` of each task's training rows become validation rows,
    chosen with a generator seeded by `seed`. `prices` (USD per 1M tokens, input and output)
    extend or override `ROUTERBENCH_PRICES_PER_MTOK` for cost-based output lengths.
    """
    if not spec.path:
        raise DataError("no data file given (workload.path)", field="workload.path")
    path = Path(spec.path)
    source = str(path)
    df = read_table(path)
    models = list(dict.fromkeys(models))
    present = check_columns(df.columns, models, source)
    score_cols = [present[m] for m in models]
    scores = np.column_stack([_numeric(df, c, source) for c in score_cols])
    for j, c in enumerate(score_cols):
        col = scores[:, j]
        bad = np.flatnonzero(~np.isnan(col) & ((col < 0) | (col > 1)))
        if bad.size:
            raise DataError(
                f"score {col[bad[0]]!r} in row {bad[0] + 1} is outside [0, 1]; scores are "
                f"per-query quality between 0 (wrong) and 1 (right)",
                source=source,
                field=c,
            )
    missing = np.isnan(scores)
    keep = ~missing.any(axis=1)
    if not keep.all():
        per_model = {m: int(k) for m, k in zip(models, missing.sum(axis=0), strict=True) if k}
        note = (f"{source}: excluded {int((~keep).sum())} of {len(keep)} rows with a missing "
                "score for a selected model (missing per model: "
                f"{', '.join(f'{m}: {k}' for m, k in per_model.items())})")
        # Once per process: a run, its report and every seed read the same file.
        if note not in _NOTED:
            _NOTED.add(note)
            log.warning("%s", note)
    if not keep.any():
        raise DataError(
            "no row has a score for every selected model",
            source=source,
            field=score_cols[0],
        )
    df = df.filter(pl.Series(keep))
    scores = scores[keep]

    texts = _text_column(df, "prompt", source)
    eval_names = _text_column(df, "eval_name", source)
    input_tokens = np.array(
        [max(1, math.ceil(len(t) / CHARS_PER_TOKEN)) for t in texts], dtype=np.int32
    )
    price_table = dict(ROUTERBENCH_PRICES_PER_MTOK)
    if prices:
        price_table.update(prices)
    output_tokens = np.column_stack(
        [_output_tokens(df, m, input_tokens, price_table.get(m), source) for m in models]
    ).astype(np.float32)

    task_names = tuple(sorted(set(eval_names)))
    task_index = {t: i for i, t in enumerate(task_names)}
    task = np.array([task_index[t] for t in eval_names], dtype=np.int16)

    rng = np.random.default_rng(seed)
    split = _splits(df, task, spec, rng, source)
    _check_splits(split, spec, source)

    features = encode_texts(texts, spec.encoder, progress=progress)
    return Workload(
        name=path.stem,
        models=tuple(models),
        features=features,
        task=task,
        task_names=task_names,
        input_tokens=input_tokens,
        quality=scores.astype(np.float32),
        output_tokens=output_tokens,
        split=split,
        texts=tuple(texts),
    )


# ------------------------------------------------------------------------------ reading
def check_columns(columns: Sequence[str], models: Sequence[str], source: str) -> dict[str, str]:
    """Model name -> score column, after checking the table has the required columns and a
    score column for every model in `models`."""
    if not models:
        raise DataError("no models selected: the scenario lists no LLMs", source=source)
    df_columns = list(columns)
    for col in ("prompt", "eval_name"):
        if col not in df_columns:
            raise DataError(
                f"missing required column {col!r}; the table has columns: "
                f"{_show_columns(df_columns)}",
                source=source,
                field=col,
            )
    present = models_in_table(df_columns)
    if not present:
        raise DataError(
            "no score columns: expected per-model columns 'MODEL|score' (with 'MODEL|cost') "
            "or RouterBench's 'MODEL' with 'MODEL|total_cost'; the table has columns: "
            f"{_show_columns(df_columns)}",
            source=source,
            field="MODEL|score",
        )
    for m in models:
        if m not in present:
            raise DataError(
                f"model {m!r} (named by the scenario) has no data in this file; models in "
                f"the file: {', '.join(present)}",
                source=source,
                field=f"{m}|score",
            )
    return present


def check_table(path: Path, models: Sequence[str]) -> None:
    """The checks `load_routerbench_workload` starts with, on the header alone (for
    `routesim validate`: a data file it accepts is one a run can start from)."""
    columns = read_table(path, header_only=True).columns
    check_columns(columns, list(dict.fromkeys(models)), str(path))


def check_mix_families(path: Path, mixes: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Every family a mix names (`(field, names)` pairs) is an `eval_name` of the table
    (for `routesim validate`; a run checks them when it samples), reading that column only."""
    if not mixes:
        return
    source = str(path)
    try:
        if path.suffix.lower() == ".csv":
            col = pl.read_csv(path, columns=["eval_name"], infer_schema_length=None)
        else:
            col = pl.read_parquet(path, columns=["eval_name"])
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise DataError(f"cannot read the table: {exc}", source=source) from None
    names = sorted({str(v).strip() for v in col["eval_name"].to_list() if v is not None})
    for field, families in mixes:
        for family in families:
            if family not in names:
                hint = difflib.get_close_matches(family, names, n=1)
                raise DataError(
                    f"unknown task family {family!r}"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; the data file's families (eval_name): {', '.join(names)}",
                    source=source, field=f"{field}.{family}",
                )


def read_table(path: Path, *, header_only: bool = False) -> pl.DataFrame:
    """The whole table (or, `header_only`, its columns without rows); CSV (types inferred
    from every row) or parquet, by file suffix."""
    source = str(path)
    if not path.is_file():
        raise DataError("no such data file", source=source, field="workload.path")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            if header_only:
                return pl.read_csv(path, n_rows=0)
            return pl.read_csv(path, infer_schema_length=None)
        if suffix in (".parquet", ".pq"):
            if header_only:
                return pl.DataFrame(schema=pl.read_parquet_schema(path))
            return pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError, ValueError) as exc:
        raise DataError(f"cannot read the table: {exc}", source=source) from None
    raise DataError(
        f"unsupported file type {suffix or '(none)'!r}; allowed: .csv, .parquet",
        source=source,
        field="workload.path",
    )


def models_in_table(columns: Sequence[str]) -> dict[str, str]:
    """Model name -> its score column, for both column styles, in table order."""
    cols = set(columns)
    found: dict[str, str] = {}
    for c in columns:
        if c.endswith("|score"):
            found.setdefault(c[: -len("|score")], c)
        elif c.endswith("|total_cost"):
            m = c[: -len("|total_cost")]
            if m in cols:
                found.setdefault(m, m)
    return found


def _show_columns(columns: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(columns[:limit])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > limit else "")


def _numeric(df: pl.DataFrame, col: str, source: str) -> np.ndarray:
    """A column as float64 with NaN for missing; a DataError naming a non-numeric value."""
    s = df[col]
    if s.dtype == pl.Boolean or s.dtype.is_numeric():
        return s.cast(pl.Float64).fill_null(float("nan")).to_numpy()
    if s.dtype in (pl.String, pl.Utf8):
        stripped = s.str.strip_chars()
        stripped = pl.Series(col, [None if v == "" else v for v in stripped.to_list()])
        parsed = stripped.cast(pl.Float64, strict=False)
        bad = stripped.is_not_null() & parsed.is_null()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"non-numeric value {stripped[i]!r} in row {i + 1}; expected a number "
                f"(or an empty cell for a missing value)",
                source=source,
                field=col,
            )
        return parsed.fill_null(float("nan")).to_numpy()
    if s.dtype == pl.Null:
        return np.full(len(s), np.nan)
    raise DataError(f"column has type {s.dtype}, expected numbers", source=source, field=col)


def _unwrap(text: str) -> str:
    """Upstream RouterBench stores texts as the repr of a Python list of strings."""
    t = text.strip()
    if len(t) >= 4 and t[0] == "[" and t[-1] == "]" and t[1] in "'\"":
        try:
            value = ast.literal_eval(t)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return text
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value)
    return text


def _text_column(df: pl.DataFrame, col: str, source: str) -> list[str]:
    s = df[col]
    if s.dtype == pl.List(pl.String):
        values = ["\n".join(v) if v is not None else None for v in s.to_list()]
    else:
        values = s.cast(pl.String).to_list()
    nulls = [i for i, v in enumerate(values) if v is None]
    if nulls:
        raise DataError(
            f"{len(nulls)} empty cell(s), first in data row {nulls[0] + 1} (after excluding "
            f"rows with missing scores); every query needs a {col}",
            source=source,
            field=col,
        )
    return [_unwrap(v) for v in values] if col == "prompt" else [v.strip() for v in values]


def _response_chars(df: pl.DataFrame, model: str, source: str) -> np.ndarray | None:
    """Characters of each answer, NaN where unknown; None when the table has no such column."""
    col = f"{model}|response_chars"
    if col in df.columns:
        return _numeric(df, col, source)
    col = f"{model}|model_response"
    if col in df.columns:
        s = df[col]
        if s.dtype == pl.List(pl.String):
            vals = ["\n".join(v) if v is not None else None for v in s.to_list()]
        else:
            vals = s.cast(pl.String).to_list()
        return np.array([np.nan if v is None else len(_unwrap(v)) for v in vals], dtype=float)
    return None


def _output_tokens(
    df: pl.DataFrame,
    model: str,
    input_tokens: np.ndarray,
    price: tuple[float, float] | None,
    source: str,
) -> np.ndarray:
    """Output tokens per row: response chars / 4, else recovered from cost and list prices."""
    n = len(input_tokens)
    out = np.full(n, np.nan)
    chars = _response_chars(df, model, source)
    if chars is not None:
        out = np.where(np.isnan(chars), np.nan, np.maximum(chars / CHARS_PER_TOKEN, 1.0))
    cost_col = next((c for c in (f"{model}|cost", f"{model}|total_cost") if c in df.columns), None)
    if np.isnan(out).any() and cost_col is not None:
        if price is None or price[1] <= 0:
            if chars is None:
                raise DataError(
                    f"no '{model}|response_chars' column and no list price known for "
                    f"{model!r}, so its output lengths cannot be recovered from {cost_col!r}; "
                    f"add response lengths or pass prices=",
                    source=source,
                    field=cost_col,
                )
        else:
            cost = _numeric(df, cost_col, source)
            # cost = (in_tok * p_in + out_tok * p_out) / 1e6  =>  solve for out_tok
            recovered = (cost * 1e6 - input_tokens * price[0]) / price[1]
            fill = np.isnan(out) & ~np.isnan(cost)
            out[fill] = np.maximum(recovered[fill], 1.0)
    if chars is None and cost_col is None:
        raise DataError(
            f"model {model!r} has neither a '{model}|response_chars' nor a '{model}|cost' "
            f"column, so its answers' lengths are unknown",
            source=source,
            field=f"{model}|cost",
        )
    gaps = np.isnan(out)
    if gaps.all():
        raise DataError(
            f"no row has a response length or cost for model {model!r}",
            source=source,
            field=cost_col or f"{model}|response_chars",
        )
    if gaps.any():
        # A missing length is a small gap in otherwise good data: use the model's median
        # over the rows that have one, rather than dropping a scored query.
        median = float(np.median(out[~gaps]))
        log.warning(
            "%s: %d rows have no response length or cost for %s; using its median, %.1f tokens",
            source,
            int(gaps.sum()),
            model,
            median,
        )
        out[gaps] = median
    return out


# ------------------------------------------------------------------------------- splits
def _splits(
    df: pl.DataFrame,
    task: np.ndarray,
    spec: WorkloadSpec,
    rng: np.random.Generator,
    source: str,
) -> np.ndarray:
    n = len(task)
    if "split" in df.columns:
        raw = df["split"].cast(pl.String).to_list()
        split = np.empty(n, dtype=np.int8)
        for i, v in enumerate(raw):
            name = (v or "").strip().lower()
            name = _VALIDATION_ALIASES.get(name, name)
            if name not in SPLIT_NAMES:
                raise DataError(
                    f"value {v!r} in data row {i + 1} is not a split name; allowed: "
                    f"{', '.join(SPLIT_NAMES)}",
                    source=source,
                    field="split",
                )
            split[i] = SPLIT_NAMES[name]
    else:
        split = np.full(n, SPLIT_TRAIN, dtype=np.int8)
        for t in np.unique(task):
            rows = rng.permutation(np.flatnonzero(task == t))
            split[rows[: round(DEFAULT_TEST_FRACTION * len(rows))]] = SPLIT_TEST
    if spec.validation_fraction > 0 and not (split == SPLIT_VALID).any():
        # Stratified by task so the validation rows have the training rows' task mix.
        for t in np.unique(task):
            rows = rng.permutation(np.flatnonzero((task == t) & (split == SPLIT_TRAIN)))
            split[rows[: round(spec.validation_fraction * len(rows))]] = SPLIT_VALID
    return split


def _check_splits(split: np.ndarray, spec: WorkloadSpec, source: str) -> None:
    counts = {name: int((split == code).sum()) for name, code in SPLIT_NAMES.items()}
    if spec.split != "all" and counts[spec.split] == 0:
        raise DataError(
            f"split {spec.split!r} (workload.split, the rows arrivals sample from) has no "
            f"rows with every selected model's score; rows per split: {counts}",
            source=source,
            field="split",
        )
    if counts["train"] == 0:
        raise DataError(
            f"the training split is empty, so learned routers have nothing to fit; rows per "
            f"split: {counts}",
            source=source,
            field="split",
        )

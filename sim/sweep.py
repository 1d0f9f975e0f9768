"""Sweeps: scenario variants x policies x policy params x seeds, one simulation run per cell.

A grid file (YAML) names a base scenario and what to vary::

    name: capacity
    base: load_spike                 # scenario file (relative to the grid) or built-in name
    overrides:                       # dotted paths set in every cell (before the axes)
      duration_s: 900
      arrivals: {kind: poisson, rate_per_s: 2.0}
    axes:                            # dotted path -> values; cells are the cross product
      arrivals.rate_per_s: [2.0, 6.0]
      llms.0.replicas: [1, 2]
    policies:                        # default: the base scenario's policies
      - least_loaded
      - {name: threshold, params: {C: 1.0}, axes: {strong_share: [0.2, 0.5]}}
    seeds: [1, 2]                    # or a count: the scenario seed, seed + 1, ...

A cell is one (scenario variant, policy variant, seed). Its id is a stable hash of the
resolved scenario (with the cell's policy) and the seed, so an edited grid reuses every cell
whose inputs did not change. Each cell writes OUT/cells/<cell-id>/ (cell.json, scenario.yaml,
requests/timeline/events.parquet, summary.json) with atomic writes and `done.json` last;
a rerun skips cells that have `done.json`. A cell that raises writes `error.json` (with the
traceback) instead and the other cells go on; a rerun tries it again. OUT/sweep.parquet has
one row per cell: axis values, status and the summary keys.

Backends run cells in parallel: `local` (a process pool on this machine), `ray` (an existing
Ray cluster, or a local one started for the sweep) and `inline` (this process, sequential;
for debugging). All produce the same files for the same grid.

Caveats: the local pool spawns its workers, so a script calling `run_sweep` with it needs
the `if __name__ == "__main__":` guard, and policies must be registered by an importable
module (built-ins are). A cell id covers the inputs, not the simulator's code: after
changing the code, sweep into a fresh OUT.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import polars as pl
import typer
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from sim.errors import RouteSimError, ScenarioError
from sim.record import check_out_dir, write_json, write_parquet, write_text
from sim.scenario import (
    PolicySpec,
    Scenario,
    dump_scenario,
    load_scenario,
    parse_scenario,
    unknown_key_message,
)
from sim.yamlfile import read_yaml_file

CELLS_DIR = "cells"
DONE_FILE = "done.json"
ERROR_FILE = "error.json"
SWEEP_PARQUET = "sweep.parquet"
SWEEP_META = "sweep.json"

# Scenario keys a grid varies through its own keys, not through `axes`/`overrides`.
_RESERVED_PATHS = {
    "policies": "list policies under the grid's `policies` key",
    "seed": "list seeds under the grid's `seeds` key",
}

# Functions called with OUT after a sweep finishes (the CLI's report writers register here;
# `sim` does not import `reports`).
AFTER_SWEEP_HOOKS: list[Callable[[Path], Path | None]] = []


class GridError(ScenarioError):
    """A grid file that does not validate or does not fit its base scenario."""


# ----------------------------------------------------------------------------- grid model
class _GridSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyVariants(_GridSpec):
    """One policy with fixed `params` and optional param `axes` (param -> values)."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    label: str | None = None


class Grid(_GridSpec):
    """A sweep grid file."""

    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: str = ""
    base: Annotated[str, Field(min_length=1)]
    overrides: dict[str, Any] = Field(default_factory=dict)
    axes: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    policies: list[str | PolicyVariants] | None = None
    seeds: (Annotated[int, Field(strict=True, ge=1)]
            | Annotated[list[Annotated[int, Field(strict=True)]], Field(min_length=1)]) = 1
    save_requests: bool = True  # requests.parquet per cell (the largest output)
    save_timeline: bool = True
    # Where the grid came from: error messages name it; relative paths are relative to it.
    _source: str = PrivateAttr(default="<grid>")
    _dir: Path | None = PrivateAttr(default=None)

    @field_validator("policies")
    @classmethod
    def _nonempty(cls, v: list | None) -> list | None:
        if v is not None and not v:
            raise ValueError("list at least one policy (or leave `policies` out)")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list):
            if len(set(v)) != len(v):
                raise ValueError(f"seeds must be distinct, got {v}")
            if any(s < 0 for s in v):
                raise ValueError(f"seeds must be >= 0, got {v}")
        return v


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file."""
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise GridError("no such grid file", source=src)
    data = read_yaml_file(p, GridError, src)
    g = parse_grid(data, source=src)
    g._dir = p.resolve().parent
    return g


def parse_grid(data: Any, *, source: str = "<grid>") -> Grid:
    """Validate an already-parsed grid document; errors name the key and what is allowed."""
    if not isinstance(data, dict):
        raise GridError(
            f"a grid is a YAML mapping, got {type(data).__name__}", source=source
        )
    try:
        g = Grid.model_validate(data)
        g._source = source
        return g
    except ValidationError as exc:
        # A union (`policies` entries, `seeds`) reports one error per member: the deepest
        # location is the member the user meant.
        def clean(e: Any) -> list:
            return [p for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS)]

        err = max(exc.errors(), key=lambda e: len(clean(e)))
        loc = clean(err)
        fld = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            allowed = _grid_keys_at(loc)
            raise GridError(unknown_key_message(str(loc[-1]), allowed), source=source,
                            field=fld) from None
        if err["type"] == "missing":
            raise GridError("required field is missing", source=source, field=fld) from None
        msg = err["msg"].removeprefix("Value error, ")
        shown = err.get("input")
        shown = type(shown).__name__ if isinstance(shown, dict | list) else repr(shown)
        raise GridError(f"{msg} (got {shown})", source=source, field=fld) from None


_UNION_TAGS = {"str", "PolicyVariants", "int", "list[int]", "constrained-int"}


def _grid_keys_at(loc: list) -> list[str]:
    if len(loc) >= 3 and loc[0] == "policies":
        return list(PolicyVariants.model_fields)
    return list(Grid.model_fields)


# ----------------------------------------------------------------------- dotted paths
def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        return f"valid keys: {', '.join(map(str, obj)) or '(none)'}"
    if isinstance(obj, list):
        return f"a list of {len(obj)} item(s); valid indices: 0..{len(obj) - 1}" if obj \
            else "an empty list"
    return f"a value ({obj!r}), not a mapping or list"


def set_path(
    data: dict[str, Any], path: str, value: Any, *, free_dict_paths: set[str], where: str
) -> None:
    """Set `data[path]` (dotted, list indices as numbers) in place.

    Every step must exist (a scenario dump lists every field, defaults included), except the
    last key of a free-form mapping (e.g. `workload.mix`), which may be new. Errors name the
    path, the step that failed and the valid keys there.
    """
    parts = path.split(".")
    if not path or any(p == "" for p in parts):
        raise GridError(f"{path!r} is not a dotted path like 'llms.0.replicas'", field=where)
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[:i]) or "(scenario)"
        if isinstance(cur, list):
            if not part.isdigit() or int(part) >= len(cur):
                raise GridError(
                    f"path {path!r}: {part!r} is not an index of {here!r}, {_describe(cur)}",
                    field=where,
                )
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
        elif isinstance(cur, dict):
            if part not in cur and not (last and ".".join(parts[:i]) in free_dict_paths):
                hint = ""
                if "kind" in cur:
                    hint = (f" ({here} is of kind {cur['kind']!r}; to use another kind set "
                            f"the whole {here!r} under `overrides`)")
                raise GridError(
                    f"path {path!r}: no key {part!r} under {here!r}; {_describe(cur)}{hint}",
                    field=where,
                )
            if last:
                cur[part] = value
            else:
                cur = cur[part]
        else:
            raise GridError(
                f"path {path!r}: cannot go into {here!r}, it is {_describe(cur)}", field=where
            )


def _free_dict_paths(scenario: Scenario) -> set[str]:
    """Dotted paths of free-form mappings (not models) in a scenario, where new keys are ok."""
    out: set[str] = set()

    def walk(obj: Any, prefix: str) -> None:
        if isinstance(obj, BaseModel):
            for name in type(obj).model_fields:
                walk(getattr(obj, name), f"{prefix}.{name}" if prefix else name)
        elif isinstance(obj, list | tuple):
            for i, item in enumerate(obj):
                walk(item, f"{prefix}.{i}")
        elif isinstance(obj, dict):
            out.add(prefix)

    walk(scenario, "")
    return out


# ------------------------------------------------------------------------------- cells
@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a resolved scenario (with exactly one policy) and a seed."""

    cell_id: str
    index: int
    values: dict[str, Any]  # column -> value: scenario axes, "policy.<param>" axes
    policy: str  # display label
    policy_name: str
    policy_base: str  # label without the param-axis values (groups lines in reports)
    seed: int
    scenario: dict[str, Any]  # model_dump(mode="json") of the resolved scenario


def cell_hash(scenario: dict[str, Any], seed: int) -> str:
    """Stable id of a cell's resolved params (canonical JSON -> sha256, 16 hex digits)."""
    blob = json.dumps({"scenario": scenario, "seed": seed}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _fmt_value(v: Any) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else str(v)


def _policy_variants(grid: Grid, base: Scenario, source: str) -> list[tuple[PolicySpec, dict]]:
    """(spec, param-axis values) for every policy variant, validated against the registry."""
    from sim.runner import resolve_policies

    entries: list[PolicyVariants] = []
    if grid.policies is None:
        for s in base.policy_specs:
            entries.append(PolicyVariants(name=s.name, params=s.params, label=s.label))
    else:
        for p in grid.policies:
            entries.append(PolicyVariants(name=p) if isinstance(p, str) else p)
    out: list[tuple[PolicySpec, dict]] = []
    for i, e in enumerate(entries):
        where = f"policies.{i}"
        overlap = set(e.params) & set(e.axes)
        if overlap:
            raise GridError(
                f"param(s) {sorted(overlap)} are both fixed (`params`) and varied (`axes`)",
                source=source, field=where,
            )
        keys = list(e.axes)
        _no_duplicates(e.axes, source, f"{where}.axes")
        base_label = e.label or e.name
        for combo in itertools.product(*(e.axes[k] for k in keys)):
            varied = dict(zip(keys, combo, strict=True))
            label = base_label
            if varied:
                label += "[" + ",".join(f"{k}={_fmt_value(v)}" for k, v in varied.items()) + "]"
            spec = PolicySpec(name=e.name, params={**e.params, **varied}, label=label)
            try:
                resolve_policies(base, [spec])
            except RouteSimError as exc:
                msg = str(exc)
                if exc.field and msg.startswith(f"{exc.field}: "):
                    msg = msg[len(exc.field) + 2:]
                sub = (exc.field or "").removeprefix("--policy")
                raise GridError(msg, source=source, field=where + sub) from None
            out.append((spec, {f"policy.{k}": v for k, v in varied.items()}))
    labels = [s.display for s, _ in out]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise GridError(
            f"policy label(s) {sorted(dup)} appear twice; give one of them a `label`",
            source=source, field="policies",
        )
    return out


def _no_duplicates(axes: dict[str, list[Any]], source: str, where: str) -> None:
    for k, vals in axes.items():
        keys = [json.dumps(v, sort_keys=True, default=str) for v in vals]
        if len(set(keys)) != len(keys):
            raise GridError(f"lists a value twice: {vals}", source=source, field=f"{where}.{k}")


def expand(grid: Grid) -> list[Cell]:
    """Every cell of a grid, in a fixed order (axes in file order, then policies, then seeds).

    Dotted paths, scenario values and policy params are all checked here, before anything
    runs; errors name the grid key, the path and what is valid there.
    """
    from sim.scenario import _resolve_paths  # relative paths in a grid are relative to it

    source, grid_dir = grid._source, grid._dir
    base_ref = grid.base
    if grid_dir is not None and (grid_dir / base_ref).is_file():
        base_ref = str(grid_dir / base_ref)
    try:
        base = load_scenario(base_ref)
    except RouteSimError as exc:
        raise GridError(f"base scenario: {exc}", source=source, field="base") from None

    for key, where in [(k, "overrides") for k in grid.overrides] + [
        (k, "axes") for k in grid.axes
    ]:
        root = key.split(".")[0]
        if root in _RESERVED_PATHS and (where == "axes" or root == "policies"):
            raise GridError(_RESERVED_PATHS[root], source=source, field=f"{where}.{key}")
    _no_duplicates(grid.axes, source, "axes")

    data = base.model_dump(mode="json")
    free = _free_dict_paths(base)
    for path, value in grid.overrides.items():
        _set(data, path, value, free, source, f"overrides.{path}")
    fixed = _validate(data, source, "overrides", grid_dir, _resolve_paths)
    data = fixed.model_dump(mode="json")
    free |= _free_dict_paths(fixed)
    variants = _policy_variants(grid, fixed, source)
    seeds = (
        [fixed.seed + k for k in range(grid.seeds)]
        if isinstance(grid.seeds, int) else list(grid.seeds)
    )

    keys = list(grid.axes)
    cells: list[Cell] = []
    seen: dict[str, int] = {}
    for combo in itertools.product(*(grid.axes[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        d = json.loads(json.dumps(data))  # deep copy of plain JSON data
        for path, value in values.items():
            _set(d, path, value, free, source, f"axes.{path}")
        where = "axes (" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in values.items()) + ")"
        sc = _validate(d, source, where, grid_dir, _resolve_paths)
        for spec, pvalues in variants:
            one = sc.model_copy(update={"policies": [spec]})
            sdict = one.model_dump(mode="json")
            for seed in seeds:
                cid = cell_hash(sdict, seed)
                if cid in seen:
                    raise GridError(
                        f"two cells resolve to the same run (cells {seen[cid]} and "
                        f"{len(cells)}, {where}); remove the duplicate value",
                        source=source, field="axes",
                    )
                seen[cid] = len(cells)
                base_label = spec.display.split("[", 1)[0] if pvalues else spec.display
                cells.append(Cell(
                    cell_id=cid, index=len(cells), values={**values, **pvalues},
                    policy=spec.display, policy_name=spec.name, policy_base=base_label,
                    seed=seed, scenario=sdict,
                ))
    return cells


def _set(d: dict, path: str, value: Any, free: set[str], source: str, where: str) -> None:
    try:
        set_path(d, path, value, free_dict_paths=free, where=where)
    except GridError as exc:
        raise GridError(str(exc).removeprefix(f"{where}: "), source=source, field=where) from None


def _validate(d: dict, source: str, where: str, grid_dir: Path | None, resolve) -> Scenario:
    try:
        sc = parse_scenario(d, source=f"{source}: {where}")
    except ScenarioError as exc:
        raise GridError(str(exc)) from None
    return resolve(sc, grid_dir) if grid_dir is not None else sc


# --------------------------------------------------------------------- running one cell
@dataclass(frozen=True)
class CellTask:
    """What a worker needs to run one cell (plain data: it crosses process boundaries)."""

    cell_id: str
    scenario: dict[str, Any]
    seed: int
    save_requests: bool = True
    save_timeline: bool = True


@dataclass
class CellOutcome:
    """A finished cell. `frames` are set only when the worker did not write them itself."""

    cell_id: str
    ok: bool
    elapsed_s: float
    summary: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    frames: dict[str, pl.DataFrame] | None = field(default=None, repr=False)


def compute_cell(task: CellTask, out_dir: str | None = None) -> CellOutcome:
    """Run one cell. With `out_dir` the worker writes the cell's files itself (a file system
    shared with the driver); without, it returns the frames for the driver to write."""
    from sim.runner import run

    t0 = time.perf_counter()
    try:
        scenario = parse_scenario(task.scenario, source=f"cell {task.cell_id}")
        res = run(scenario, None, [task.seed], None, keep_requests=task.save_requests)
        summary = res.summaries[0]
        frames = {"events": _untag(res.events)}
        if task.save_requests:
            frames["requests"] = _untag(res.requests)
        if task.save_timeline:
            frames["timeline"] = _untag(res.timeline)
        outcome = CellOutcome(task.cell_id, True, time.perf_counter() - t0, summary=summary,
                              frames=frames)
    except Exception as exc:  # a failed cell is recorded, the sweep goes on
        outcome = CellOutcome(task.cell_id, False, time.perf_counter() - t0,
                              error=error_record(exc))
    if out_dir is not None:
        write_cell_outcome(Path(out_dir), outcome)
        outcome.frames = None
    return outcome


def _untag(df: pl.DataFrame) -> pl.DataFrame:
    """Drop the scenario/policy/seed columns the runner adds (cell.json has them)."""
    return df.drop([c for c in ("scenario", "policy", "seed") if c in df.columns])


def error_record(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def cell_dir(out: Path, cell_id: str) -> Path:
    return out / CELLS_DIR / cell_id


def write_cell_outcome(out: Path, outcome: CellOutcome) -> None:
    """Write a finished cell: outputs, then `done.json` last (or `error.json`)."""
    d = cell_dir(out, outcome.cell_id)
    if not outcome.ok:
        write_json({"cell_id": outcome.cell_id, "elapsed_s": outcome.elapsed_s,
                    **(outcome.error or {})}, d / ERROR_FILE)
        return
    for name, frame in (outcome.frames or {}).items():
        write_parquet(frame, d / f"{name}.parquet")
    write_json(outcome.summary, d / "summary.json")
    (d / ERROR_FILE).unlink(missing_ok=True)
    write_json({"cell_id": outcome.cell_id, "elapsed_s": outcome.elapsed_s}, d / DONE_FILE)


def is_done(out: Path, cell_id: str, *, save_requests: bool = False,
            save_timeline: bool = False) -> bool:
    """The cell finished, with the outputs this sweep asks for (a cell run earlier without
    save_requests is run again when a rerun asks for its requests)."""
    d = cell_dir(out, cell_id)
    wanted = [n for n, on in (("requests", save_requests), ("timeline", save_timeline)) if on]
    return (d / DONE_FILE).is_file() and all((d / f"{n}.parquet").is_file() for n in wanted)


# ------------------------------------------------------------------------------ backends
OnOutcome = Callable[[CellOutcome], None]


class Backend(ABC):
    """Runs cell tasks somewhere and reports each outcome as it finishes (any order)."""

    name: str

    @abstractmethod
    def run(self, tasks: Sequence[CellTask], out: Path, on_outcome: OnOutcome) -> None: ...


class InlineBackend(Backend):
    """Cells one after the other in this process (debugging, tiny grids)."""

    name = "inline"

    def run(self, tasks: Sequence[CellTask], out: Path, on_outcome: OnOutcome) -> None:
        for t in tasks:
            on_outcome(compute_cell(t, str(out)))


def _end_with_driver(driver_pid: int) -> None:
    """Pool worker initializer: on Linux, have the kernel send the worker SIGTERM when the
    driver ends, even by SIGKILL, which no handler of the driver sees (without this, a
    worker ran on until its cell ended: minutes). Elsewhere a no-op. The signal follows the
    thread that started the worker: the pool starts them from the driver's main thread."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # from <linux/prctl.h>
    try:
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # no usable libc: lose the guard, not the sweep
        return
    if os.getppid() != driver_pid:  # the driver ended before the request took effect
        os._exit(1)


class LocalBackend(Backend):
    """A pool of `workers` processes on this machine; workers write their cells directly.

    Processes are spawned, not forked: forking a parent that already runs polars' thread
    pool can deadlock. On Linux the workers end with the driver, however it ends.
    """

    name = "local"

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def run(self, tasks: Sequence[CellTask], out: Path, on_outcome: OnOutcome) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        if not tasks:
            return
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(tasks)), mp_context=ctx,
                                   initializer=_end_with_driver, initargs=(os.getpid(),))
        try:
            futures = {pool.submit(compute_cell, t, str(out)): t for t in tasks}
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    outcome = fut.result()
                except Exception as exc:  # the worker died (e.g. killed for memory)
                    outcome = CellOutcome(task.cell_id, False, 0.0, error=error_record(exc))
                    write_cell_outcome(out, outcome)
                on_outcome(outcome)
        except BaseException:
            # Interrupted: stop the workers now rather than after their current cells (a
            # cell can take minutes). Cells in flight have no done marker and rerun on resume.
            # concurrent.futures has no public way to do this before Python 3.14.
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)


class RayBackend(Backend):
    """Cells as Ray tasks (one CPU each), at most `workers` in flight.

    Connects to `address` (an existing cluster: "auto", "ray://head:10001", ...) or starts a
    local Ray with `workers` CPUs, and stops it again when it started it. Workers return the
    frames and the driver writes them, so the cluster needs no shared file system.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        self.workers = workers
        self.address = address

    def run(self, tasks: Sequence[CellTask], out: Path, on_outcome: OnOutcome) -> None:
        try:
            import ray
        except ImportError:
            raise RouteSimError(
                "the Ray backend needs Ray: pip install 'routesim[ray]'", field="--backend"
            ) from None
        if not tasks:
            return
        started = False
        if not ray.is_initialized():
            import logging

            try:
                if self.address:  # an existing cluster: it has its own resources, dashboard
                    ray.init(address=self.address, logging_level=logging.WARNING)
                else:
                    # "local": a new private instance, even if a `ray start` cluster runs here
                    ray.init(address="local", num_cpus=self.workers or os.cpu_count() or 1,
                             include_dashboard=False, logging_level=logging.WARNING)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                where = f"at {self.address!r}" if self.address else "locally"
                raise RouteSimError(f"cannot start or reach Ray {where}: {exc}",
                                    field="--address" if self.address else "--backend") from None
            started = True
        pending: dict[Any, CellTask] = {}
        try:
            limit = self.workers or max(int(ray.cluster_resources().get("CPU", 1)), 1)
            remote = ray.remote(num_cpus=1)(compute_cell)
            todo = list(tasks)
            while todo or pending:
                while todo and len(pending) < limit:
                    t = todo.pop(0)
                    pending[remote.remote(t, None)] = t
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as exc:  # worker crash, lost node, ...
                        outcome = CellOutcome(task.cell_id, False, 0.0, error=error_record(exc))
                    write_cell_outcome(out, outcome)
                    outcome.frames = None
                    on_outcome(outcome)
        except BaseException:
            for ref in pending:  # interrupted: do not leave tasks running on the cluster
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()


class BackendName(StrEnum):
    local = "local"
    ray = "ray"
    inline = "inline"


def make_backend(name: str, workers: int | None = None, address: str | None = None) -> Backend:
    if name == "local":
        return LocalBackend(workers)
    if name == "ray":
        return RayBackend(workers, address)
    if name == "inline":
        return InlineBackend()
    raise RouteSimError(f"unknown backend {name!r}; choose one of: local, ray, inline",
                        field="--backend")


# ------------------------------------------------------------------------------- a sweep
@dataclass
class SweepResult:
    """What `run_sweep` did: the combined frame and the cell counts."""

    out: Path
    frame: pl.DataFrame
    cells: list[Cell]
    ran: int
    skipped: int
    failed: int
    elapsed_s: float


def run_sweep(
    grid: Grid | str | Path,
    out: str | Path,
    *,
    backend: str | Backend = "local",
    workers: int | None = None,
    address: str | None = None,
    on_cell_done: Callable[[Cell, CellOutcome], None] | None = None,
    on_start: Callable[[list[Cell], int], None] | None = None,
) -> SweepResult:
    """Run every cell of `grid` not already done under `out`; write OUT/sweep.parquet.

    `grid` is a Grid or a grid file. Finished cells (with done.json) are skipped, so an
    interrupted sweep resumes where it stopped; failed cells are tried again.
    """
    t0 = time.perf_counter()
    out_dir = Path(out)
    check_out_dir(out_dir)
    g = grid if isinstance(grid, Grid) else load_grid(grid)
    cells = expand(g)
    be = backend if isinstance(backend, Backend) else make_backend(backend, workers, address)
    todo = [c for c in cells if not is_done(out_dir, c.cell_id, save_requests=g.save_requests,
                                             save_timeline=g.save_timeline)]
    skipped = len(cells) - len(todo)
    write_text(yaml.safe_dump(g.model_dump(mode="json"), sort_keys=False),
               out_dir / "grid.yaml")
    write_json(sweep_meta(g, cells, g._source), out_dir / SWEEP_META)
    for c in todo:
        d = cell_dir(out_dir, c.cell_id)
        write_json(cell_record(c), d / "cell.json")
        # With the cell's seed: `routesim run` on this file reproduces the cell.
        write_text(dump_scenario(parse_scenario({**c.scenario, "seed": c.seed})),
                   d / "scenario.yaml")
    if on_start:
        on_start(cells, skipped)
    by_id = {c.cell_id: c for c in cells}
    counts = {"ran": 0, "failed": 0}

    def on_outcome(o: CellOutcome) -> None:
        counts["ran"] += 1
        counts["failed"] += 0 if o.ok else 1
        if on_cell_done:
            on_cell_done(by_id[o.cell_id], o)

    tasks = [CellTask(c.cell_id, c.scenario, c.seed, g.save_requests, g.save_timeline)
             for c in todo]
    try:
        be.run(tasks, out_dir, on_outcome)
    finally:  # an interrupted sweep still leaves a sweep.parquet of what is there
        frame = collect(out_dir, cells)
        write_parquet(frame, out_dir / SWEEP_PARQUET)
    return SweepResult(out_dir, frame, cells, counts["ran"], skipped, counts["failed"],
                       time.perf_counter() - t0)


def cell_record(c: Cell) -> dict[str, Any]:
    return {"cell_id": c.cell_id, "index": c.index, "values": c.values, "policy": c.policy,
            "policy_name": c.policy_name, "policy_base": c.policy_base, "seed": c.seed}


def sweep_meta(g: Grid, cells: list[Cell], source: str) -> dict[str, Any]:
    """Which columns of sweep.parquet are axes (for reports)."""
    policy_axes = list(dict.fromkeys(k for c in cells for k in c.values if k.startswith(
        "policy.")))
    return {
        "name": g.name,
        "grid": source,
        "base": g.base,
        "axes": list(g.axes),
        "policy_axes": policy_axes,
        "policies": list(dict.fromkeys(c.policy_base for c in cells)),
        "seeds": sorted({c.seed for c in cells}),
        "cells": len(cells),
    }


def collect(out: Path, cells: Sequence[Cell]) -> pl.DataFrame:
    """One row per cell from what is on disk: status ok / failed / pending."""
    rows = []
    for c in cells:
        d = cell_dir(out, c.cell_id)
        row: dict[str, Any] = {"cell_id": c.cell_id, "index": c.index}
        row.update(c.values)
        row.update(policy=c.policy, policy_base=c.policy_base, policy_name=c.policy_name,
                   seed=c.seed)
        if (d / DONE_FILE).is_file():
            summary = json.loads((d / "summary.json").read_text())
            done = json.loads((d / DONE_FILE).read_text())
            row["status"] = "ok"
            for k, v in summary.items():
                row.setdefault(k, json.dumps(v, sort_keys=True) if isinstance(v, dict) else v)
            row["error"] = None
            row["elapsed_s"] = done.get("elapsed_s")
        elif (d / ERROR_FILE).is_file():
            err = json.loads((d / ERROR_FILE).read_text())
            row["status"] = "failed"
            row["error"] = f"{err.get('type')}: {err.get('message')}"
            row["elapsed_s"] = err.get("elapsed_s")
        else:
            row["status"] = "pending"
            row["error"] = None
            row["elapsed_s"] = None
        rows.append(row)
    if not rows:
        return pl.DataFrame()
    axis_cols = list(dict.fromkeys(k for c in cells for k in c.values))
    for col in axis_cols:
        _normalise_column(rows, col)
    df = pl.DataFrame(rows, infer_schema_length=None)
    first = ["cell_id", "index", "status", *axis_cols, "policy", "policy_base", "policy_name",
             "seed"]
    return df.select(first + [c for c in df.columns if c not in first])


def _normalise_column(rows: list[dict[str, Any]], col: str) -> None:
    """One dtype per axis column: numbers as float (or int), else JSON text."""
    vals = [r.get(col) for r in rows if r.get(col) is not None]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
        return
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
        for r in rows:
            if r.get(col) is not None:
                r[col] = float(r[col])
        return
    if all(isinstance(v, str) for v in vals) or all(isinstance(v, bool) for v in vals):
        return
    for r in rows:
        if col in r and r[col] is not None:
            r[col] = _fmt_value(r[col])


def read_sweep(out: str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """OUT/sweep.parquet and OUT/sweep.json (axes) of a finished or partial sweep."""
    o = Path(out)
    p = o / SWEEP_PARQUET
    if not p.is_file():
        raise RouteSimError("no sweep.parquet here; run `routesim sweep GRID.yaml` first",
                            source=str(o))
    meta_path = o / SWEEP_META
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RouteSimError(f"unreadable sweep metadata: {exc}", source=str(meta_path)) from None
    if not isinstance(meta, dict):
        raise RouteSimError("sweep metadata is not a JSON object", source=str(meta_path))
    try:
        df = pl.read_parquet(p)
    except Exception as exc:  # noqa: BLE001 - any unreadable parquet is the same user error
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RouteSimError(f"cannot read parquet ({first}); run the sweep again to rewrite "
                            "it", source=str(p)) from None
    return df, meta


# ----------------------------------------------------------------------------------- CLI
def register(app) -> None:
    """Add `routesim sweep GRID.yaml` to the CLI."""
    @app.command("sweep")
    def sweep(
        grid: Annotated[str, typer.Argument(help="grid YAML (base scenario, axes, seeds)")],
        backend: Annotated[BackendName, typer.Option(
            help="local: process pool; ray: Ray cluster; inline: this process")
        ] = BackendName.local,
        workers: Annotated[int | None, typer.Option(
            min=1, help="parallel cells (default: CPU count / cluster CPUs)")] = None,
        out: Annotated[str | None, typer.Option(
            help="output directory (default: runs/sweeps/<grid name>)")] = None,
        address: Annotated[str | None, typer.Option(
            help="Ray cluster address (default: start a local Ray)")] = None,
        report: Annotated[bool, typer.Option(help="write OUT/sweep_report.html")] = True,
    ) -> None:
        """Run every cell of a grid in parallel; resumes, skipping finished cells."""
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from sim.cli import console, fail, say, terminate_as_exit

        try:
            g = load_grid(grid)
            out_dir = Path("runs") / "sweeps" / g.name if out is None else out
            check_out_dir(out_dir, field="--out")
            out_dir = Path(out_dir)
        except RouteSimError as exc:
            fail(exc)
        if backend is BackendName.ray:
            try:
                import ray  # noqa: F401
            except ImportError:
                fail(RouteSimError("the Ray backend needs Ray: pip install 'routesim[ray]'",
                                   field="--backend"))
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                      TimeElapsedColumn(), console=console) as prog:
            state: dict[str, Any] = {"failed": 0}

            def on_start(cells: list[Cell], skipped: int) -> None:
                state["task"] = prog.add_task(g.name, total=len(cells), completed=skipped,
                                              note=f"({skipped} already done)")

            def on_done(cell: Cell, o: CellOutcome) -> None:
                state["failed"] += 0 if o.ok else 1
                note = f"[red]{state['failed']} failed[/]" if state["failed"] else ""
                prog.update(state["task"], advance=1, note=note)

            try:
                # SIGTERM unwinds like Ctrl-C: the workers are stopped and sweep.parquet
                # lists the cells finished so far.
                with terminate_as_exit():
                    res = run_sweep(grid, out_dir, backend=backend.value, workers=workers,
                                    address=address, on_cell_done=on_done, on_start=on_start)
            except RouteSimError as exc:
                prog.stop()
                fail(exc)
            except KeyboardInterrupt:
                prog.stop()
                say(f"interrupted; finished cells are kept in {out_dir}/{CELLS_DIR}; run "
                    "the same command again to resume")
                raise typer.Exit(130) from None
            except SystemExit:  # SIGTERM (terminate_as_exit)
                prog.stop()
                say(f"terminated; finished cells are kept in {out_dir}/{CELLS_DIR}; run "
                    "the same command again to resume")
                raise
        console.print(
            f"{len(res.cells)} cells: {res.ran - res.failed} ran, {res.skipped} skipped "
            f"(done before), {res.failed} failed; {res.elapsed_s:.1f}s with "
            f"{backend.value}"
        )
        if res.failed:
            bad = res.frame.filter(pl.col("status") == "failed")
            for r in bad.head(5).iter_rows(named=True):
                console.print("[red]failed[/] " + escape(f"{r['cell_id']}: {r['error']}"),
                              highlight=False)
            say(f"tracebacks: {out_dir}/{CELLS_DIR}/<cell-id>/{ERROR_FILE}")
        say(f"results: {out_dir / SWEEP_PARQUET}")
        if report:
            for hook in AFTER_SWEEP_HOOKS:
                path = hook(out_dir)
                if path is not None:
                    say(f"report: {path}")
        if res.failed:
            raise typer.Exit(1)


"""Runs a scenario for several policies and seeds, and writes the outputs.

Layout (README, "Outputs"): OUT/<scenario>/<policy>/seed<k>/{requests,timeline,events}
.parquet and summary.json, OUT/<scenario>/scenario.yaml (the resolved config),
OUT/summary.parquet across all runs. Every file is written atomically, and a scenario's
directory appears (or replaces the previous one) only once all its runs succeeded. Policies
are created through `policies.registry` only (the engine's one door to policy code).
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from sim.engine import Simulation, prepare_inputs, subsystem_seed
from sim.errors import PolicyError, RouteSimError
from sim.metrics import summarize
from sim.record import RESERVED_NAMES, check_out_dir, write_json, write_parquet, write_text
from sim.scenario import (
    DEFAULT_SCENARIO,
    PolicySpec,
    Scenario,
    dump_scenario,
    load_scenario,
)
from sim.types import Workload

# Staging names inside OUT (dot-prefixed: reports skip them; see `_Staging`).
PARTIAL_MARK = ".partial-"
OLD_MARK = ".old-"


def _registry():
    from policies import registry  # the composition root's door to policy code

    return registry


def scenario_policy_entry(scenario: Scenario, name: str) -> tuple[int | None, PolicySpec]:
    """The scenario's policy entry that `name` picks (a label first, else the first entry of
    that policy, with its params) and its index, or a bare spec of policy `name` and None."""
    specs = scenario.policy_specs
    for matches in (lambda s: s.display == name, lambda s: s.name == name):
        index = next((i for i, s in enumerate(specs) if matches(s)), None)
        if index is not None:
            return index, specs[index]
    return None, PolicySpec(name=name)


def baseline_label(scenario: Scenario, baseline: str | None, labels: Sequence[str],
                   field: str = "baseline") -> str | None:
    """The label of the run `baseline` names: a label run, or a policy name whose scenario
    entry (as `--policy` picks it) was run; anything else is an error listing the labels."""
    if baseline is None or baseline in labels:
        return baseline
    picked = scenario_policy_entry(scenario, baseline)[1].display
    if picked in labels:
        return picked
    raise RouteSimError(
        f"{baseline!r} is not one of the policies run; choose one of: {', '.join(labels)}",
        field=field,
    )


def resolve_policies(
    scenario: Scenario, names: Sequence[str | PolicySpec] | None = None
) -> list[PolicySpec]:
    """Policy specs from `names` (CLI: a name or label of the scenario's list picks that
    entry, params and all; another policy name runs with default params) or the scenario,
    validated against the registry."""
    reg = _registry()
    if names:
        specs = [n if isinstance(n, PolicySpec) else scenario_policy_entry(scenario, n)[1]
                 for n in names]
        where = "--policy"
    else:
        specs = scenario.policy_specs
        where = "policies"
    seen: set[str] = set()
    dirs: dict[str, str] = {}
    for i, spec in enumerate(specs):
        f = f"{where}.{i}" if where == "policies" else where
        reg.validate_params(spec.name, spec.params, field=f)
        reg.check_against_scenario(
            spec.name, spec.params, [x.name for x in scenario.llms],
            has_texts=scenario.workload.source != "synthetic", field=f,
            has_training_rows=scenario.workload.split != "all")
        if spec.display in seen:
            raise PolicyError(
                f"policy {spec.display!r} is given twice; each runs once"
                if where == "--policy" else
                f"policy label {spec.display!r} appears twice; give one of them a `label`",
                field=f,
            )
        seen.add(spec.display)
        # Each label names an output directory: two labels that map to one would overwrite
        # each other (casefolded: on macOS and Windows "A" and "a" are one directory).
        label_field = f"{f}.label" if where == "policies" else f
        d = safe_dirname(spec.display, field=label_field)
        if d.casefold() in dirs:
            raise PolicyError(
                f"labels {dirs[d.casefold()]!r} and {spec.display!r} give the same output "
                f"directory {d!r}; give one of them a label that differs in a letter, digit, "
                "'_', '.', '=' or '-'",
                field=label_field,
            )
        dirs[d.casefold()] = spec.display
    return specs


def check_models(scenario: Scenario) -> None:
    """Every LLM (initial or added later) serves a model the workload has: the synthetic
    catalog's, or a data file's (read from its header); a real-data workload's text encoder
    has its weights. Checked before any data is read, naming the scenario's field."""
    places = [(f"llms.{i}", x) for i, x in enumerate(scenario.llms)]
    places += [(f"events.{i}.add_llm", e.add_llm) for i, e in enumerate(scenario.events)
               if e.add_llm is not None]
    if scenario.workload.source == "synthetic":
        from sim.catalog import known_models

        known, where = sorted(known_models()), "the synthetic workload"
    else:
        if scenario.workload.encoder.kind == "transformer":
            from sim.embeddings import resolve_model_path

            resolve_model_path(scenario.workload.encoder.model_path)
        if not scenario.workload.path:
            return
        from sim.routerbench import check_columns, models_in_table, read_table

        path = Path(scenario.workload.path)
        columns = read_table(path, header_only=True).columns
        known = list(models_in_table(columns))
        if not known or not {"prompt", "eval_name"} <= set(columns):
            # The table's own faults first, as a run meets them (this raises).
            check_columns(columns, [x.model_name for _, x in places], str(path))
        where = f"the data file {path}"
    for at, spec in places:
        if spec.model_name not in known:
            raise RouteSimError(
                f"{spec.model_name!r} is not a model of {where}; set `model` to one of: "
                f"{', '.join(known)}",
                field=f"{at}.model" if spec.model else f"{at}.name",
            )


def build_workload(scenario: Scenario, seed: int) -> Workload:
    from sim.workload import load_workload

    models = list(dict.fromkeys(s.model_name for s in scenario.all_llms()))
    wl = load_workload(scenario.workload, models, subsystem_seed(seed, "workload"))
    # Shared by every policy of a seed: read-only, so one policy cannot alter the next's.
    for arr in (wl.features, wl.task, wl.input_tokens, wl.quality, wl.output_tokens, wl.split):
        arr.flags.writeable = False
    return wl


@dataclass
class Results:
    """Everything one `run` produced, as polars frames (for notebooks)."""

    summary: pl.DataFrame
    requests: pl.DataFrame
    timeline: pl.DataFrame
    events: pl.DataFrame
    summaries: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None


def safe_dirname(label: str, *, field: str | None = None) -> str:
    """`label` as one directory name: runs of other characters become "_". A label that
    would be "", "." or ".." (this directory or its parent) raises RouteSimError."""
    name = re.sub(r"[^A-Za-z0-9_.=\-]+", "_", label)
    if name in ("", ".", ".."):
        raise RouteSimError(
            f"{label!r} cannot name an output directory; use letters, digits, '_', '.', '=' "
            "or '-', and not only dots",
            field=field,
        )
    if name.lower() in RESERVED_NAMES:
        raise RouteSimError(
            f"{label!r} is the name of a file routesim writes beside the run directories; "
            f"choose another (reserved: {', '.join(sorted(RESERVED_NAMES))})",
            field=field,
        )
    return name


# Most file systems allow 255 bytes in one file name.
MAX_DIRNAME_BYTES = 255


def check_dirname_length(label: str, field: str) -> None:
    """A policy label names its runs' directory: it must fit one file name."""
    n = len(safe_dirname(label, field=field).encode())
    if n > MAX_DIRNAME_BYTES:
        raise RouteSimError(
            f"{label[:40]!r}... names the runs' directory, and is {n} bytes long; file "
            f"systems allow {MAX_DIRNAME_BYTES}: give it a shorter `label`",
            field=field,
        )


def run(
    scenario: Scenario | str | Path | None = None,
    policies: Sequence[str | PolicySpec] | None = None,
    seeds: int | Sequence[int] = 1,
    out: str | Path | None = None,
    *,
    keep_requests: bool = True,
    on_progress: Callable[[str, float], None] | None = None,
    on_run_done: Callable[[dict[str, Any]], None] | None = None,
    cache_dir: str | None = None,
    baseline: str | None = None,
) -> Results:
    """Run every (policy, seed) of a scenario; write outputs under `out` when given.

    `scenario` is a Scenario, a path, a built-in name, or None for the built-in load spike.
    `seeds` is a count (scenario.seed, +1, ...) or explicit seeds. summary.parquet holds
    one row per run plus, per policy, the mean and 95% CI across seeds of each headline
    metric and the paired difference against `baseline` (default: the first policy).
    """
    if scenario is None:
        scenario = DEFAULT_SCENARIO
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario)
    specs = resolve_policies(scenario, policies)
    check_models(scenario)
    labels = [s.display for s in specs]
    baseline = baseline_label(scenario, baseline, labels)  # before any run, not after all
    seed_list = (
        [scenario.seed + k for k in range(seeds)] if isinstance(seeds, int) else list(seeds)
    )
    if not seed_list:
        raise RouteSimError("at least one seed is needed", field="seeds")
    reg = _registry()
    out_dir = Path(out) if out is not None else None
    staging = None
    where = "--policy" if policies else "policies"
    summaries: list[dict[str, Any]] = []
    req_frames, tl_frames, ev_frames = [], [], []
    if out_dir is not None:
        for i, spec in enumerate(specs):
            check_dirname_length(spec.display, f"{where}.{i}.label" if where == "policies"
                                 else where)
    try:
        if out_dir is not None:
            check_out_dir(out)  # as given: Path("") would already be "."
            # Held: a Ctrl-C or SIGTERM between making the staging directory and knowing it
            # here would leave it behind.
            with _signals_held():
                staging = _Staging(out_dir, scenario.name)
        for seed in seed_list:
            workload = build_workload(scenario, seed)
            inputs = prepare_inputs(scenario, workload, seed)
            for i, spec in enumerate(specs):
                label = spec.display
                cb = (lambda t, _l=label: on_progress(_l, t)) if on_progress else None
                try:
                    policy = reg.create(spec.name, spec.params)
                    sim = Simulation(scenario, policy, inputs, seed=seed, cache_dir=cache_dir,
                                     progress=cb)  # runs the policy's setup
                except RouteSimError as exc:
                    raise _at_entry(exc, spec, f"{where}.{i}" if where == "policies"
                                    else where) from None
                upper_bound = bool(getattr(policy, "uses_ground_truth", False))
                res = sim.run()
                del sim, policy  # free the policy's models before the frames are summarised
                summary = summarize(res.requests, res.timeline, scenario, label, seed)
                summary["policy_name"] = spec.name
                # Keeping fan-out answers by realised quality is ground truth too.
                summary["upper_bound"] = upper_bound or res.realised_picks > 0
                summaries.append(summary)
                tag = {"scenario": scenario.name, "policy": label, "seed": seed}
                if staging is not None:
                    d = staging.dir / safe_dirname(label) / f"seed{seed}"
                    write_parquet(res.requests, d / "requests.parquet")
                    write_parquet(res.timeline, d / "timeline.parquet")
                    write_parquet(res.events, d / "events.parquet")
                    write_json(summary, d / "summary.json")
                if keep_requests:
                    req_frames.append(_tagged(res.requests, tag))
                tl_frames.append(_tagged(res.timeline, tag))
                ev_frames.append(_tagged(res.events, tag))
                if on_run_done:
                    on_run_done(summary)
        from sim.compare import compare, with_comparison

        summary_df = summaries_frame(summaries)
        summary_df = with_comparison(summary_df,
                                     compare(summary_df, baseline or specs[0].display))
        if staging is not None:
            # The policies actually run (--policy replaces the file's list), with every
            # param written out (defaults too), so running the saved file again runs them
            # again even if a default changes.
            ran = scenario.model_copy(update={"policies": [
                s.model_copy(update={"params": reg.validate_params(s.name, s.params)
                                     .model_dump(mode="json")}) for s in specs]})
            staging.commit(summary_df, dump_scenario(ran))
    except BaseException:
        if staging is not None:
            staging.abort()
        raise
    return Results(
        summary=summary_df,
        requests=pl.concat(req_frames, how="diagonal") if req_frames else pl.DataFrame(),
        timeline=pl.concat(tl_frames, how="diagonal") if tl_frames else pl.DataFrame(),
        events=pl.concat(ev_frames, how="diagonal") if ev_frames else pl.DataFrame(),
        summaries=summaries,
        out=out_dir,
    )


def _at_entry(exc: RouteSimError, spec: PolicySpec, entry: str) -> RouteSimError:
    """A policy's setup error, placed at its entry in the scenario: policies name their own
    params `<name>.params.x`, which the user wrote at `policies.<i>.params.x`."""
    f = exc.field or ""
    for own in (spec.name, "policy"):  # "policy.params.x": a policy not naming itself
        if f == own or f.startswith(f"{own}."):
            return type(exc)(exc.message, source=exc.source, field=entry + f[len(own):])
    return type(exc)(f"{exc.message} (setting up policy {spec.display!r}, {entry})",
                     source=exc.source, field=exc.field)


class _Staging:
    """One scenario's outputs, written under OUT/.<scenario>.partial-<run token> and moved to
    OUT/<scenario> only when every run has succeeded: a failed or interrupted run leaves OUT
    as it was, and a re-run replaces the scenario's directory instead of mixing into it.

    The token is host, pid and a random part, so runs on other machines or containers
    sharing OUT never take each other's staging for a dead run's. The swap itself runs
    under a lock on OUT and with Ctrl-C/SIGTERM held back, so concurrent runs and signals
    cannot leave the directory and summary.parquet disagreeing."""

    def __init__(self, out: Path, scenario_name: str):
        self.out = out
        self.name = scenario_name
        base = safe_dirname(scenario_name, field="name")
        self.target = out / base
        if self.target.is_symlink() or (self.target.exists() and not self.target.is_dir()):
            # A run replaces this directory as a whole: through a link it would land on the
            # wrong file system, replace a file, or drop the link.
            raise RouteSimError(
                f"{self.target} is {'a symbolic link' if self.target.is_symlink() else 'a file'}"
                "; a run replaces a scenario's directory as a whole, so give --out a real "
                "directory (OUT itself may be a link to other storage)",
                field="--out",
            )
        token = f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
        self.dir = out / f".{base}{PARTIAL_MARK}{token}"
        self._old = out / f".{base}{OLD_MARK}{token}"
        self._summary = out / f".summary.parquet{PARTIAL_MARK}{token}"
        # Created here, so removed again on failure (the CLI promises no output directory
        # from a failed run).
        self._made = [p for p in (out, *out.parents) if not p.exists()]
        # Read now only to fail before the runs if it is unreadable; the rows kept are read
        # again at commit, so a scenario another process finished meanwhile is not lost.
        _other_scenarios(out / "summary.parquet", scenario_name)
        try:
            self.dir.mkdir(parents=True)
        except OSError as exc:
            self.abort()
            raise RouteSimError(
                f"cannot create {self.dir}: {exc.strerror or exc}; give --out a writable "
                "directory", field="--out",
            ) from None
        try:
            with _out_lock(out):
                _remove_dead_staging(out, base)
        except BaseException:
            self.abort()
            raise

    def commit(self, summary: pl.DataFrame, scenario_yaml: str) -> None:
        write_text(scenario_yaml, self.dir / "scenario.yaml")
        with _out_lock(self.out), _signals_held():
            # summary.parquet lists every run under OUT: other scenarios' rows stay.
            kept = _other_scenarios(self.out / "summary.parquet", self.name)
            merged = (pl.concat([kept, summary], how="diagonal_relaxed") if kept is not None
                      else summary)
            write_parquet(merged, self._summary)
            moved = swapped = False
            try:
                if self.target.exists():
                    os.rename(self.target, self._old)
                    moved = True
                os.rename(self.dir, self.target)
                swapped = True
                os.replace(self._summary, self.out / "summary.parquet")
            except BaseException:
                # Undo in reverse so OUT is as it was; abort() then removes the staging.
                if swapped:
                    os.rename(self.target, self.dir)
                if moved:
                    os.rename(self._old, self.target)
                raise
            _remove(self._old)
            # It shows the runs it was made from; `routesim report` writes it again.
            (self.out / "report.html").unlink(missing_ok=True)

    def abort(self) -> None:
        _remove(self.dir)
        self._summary.unlink(missing_ok=True)
        for p in self._made:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break


_HOST = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname()) or "host"


@contextmanager
def _out_lock(out: Path):
    """An exclusive lock on the OUT directory itself (POSIX advisory lock; elsewhere none),
    held while staging is cleaned up or swapped in. Locking the directory leaves no lock
    file behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the block ends: a signal between two renames of a swap,
    or between making a staging directory and knowing it, would leave something behind.

    While the block runs, handlers that only note the signal replace the process's; after
    it, those are restored and each noted signal is raised again. (Blocking the signals in
    the main thread would not do: numpy and polars run other threads, the kernel hands the
    signal to one of them, and Python still runs the handler in the main thread at once.)
    Only the main thread can set handlers; elsewhere the block runs unprotected.
    """
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in held}
    if (threading.current_thread() is not threading.main_thread()
            or any(h is None for h in previous.values())):  # a handler Python cannot restore
        yield
        return
    noted: list[int] = []

    def note(signum, _frame):
        if signum not in noted:
            noted.append(signum)

    for s in held:
        signal.signal(s, note)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for s in noted:
            signal.raise_signal(s)


def _remove_dead_staging(out: Path, name: str) -> None:
    """Staging of `name` left by runs on this host that were killed (their process is gone:
    SIGKILL or a power cut gives no chance to clean up). A previous result set aside by a
    run killed mid-swap is put back if nothing replaced it. Other hosts' staging is never
    touched: their processes cannot be seen from here."""
    for mark in (PARTIAL_MARK, OLD_MARK):
        for path in sorted(out.glob(f".{glob.escape(name)}{mark}{glob.escape(_HOST)}-*")):
            parts = path.name.rsplit(mark, 1)[-1].split("-")
            if len(parts) != 3 or not parts[1].isdigit() or _process_alive(int(parts[1])):
                continue
            target = out / name
            if mark == OLD_MARK and not (target.exists() or target.is_symlink()):
                os.rename(path, target)
            else:
                _remove(path)


def _process_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no harmless liveness probe (os.kill would terminate it): leave it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but is not ours
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _other_scenarios(path: Path, scenario_name: str) -> pl.DataFrame | None:
    """The rows of OUT/summary.parquet that belong to other scenarios (None: no rows)."""
    if not path.exists():
        return None
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable parquet is the same user error
        raise RouteSimError(
            f"cannot read it to keep the other scenarios' runs ({exc}); remove it or choose "
            "another output directory", source=str(path)) from None
    if "scenario" not in df.columns:
        raise RouteSimError(
            "not a routesim summary (no `scenario` column); remove it or choose another "
            "output directory", source=str(path))
    df = df.filter(pl.col("scenario") != scenario_name)
    return df if df.height else None


def _tagged(df: pl.DataFrame, tag: dict[str, Any]) -> pl.DataFrame:
    return df.with_columns(
        pl.lit(tag["scenario"]).alias("scenario"),
        pl.lit(tag["policy"]).alias("policy"),
        pl.lit(tag["seed"]).alias("seed"),
    )


def summaries_frame(summaries: Sequence[dict[str, Any]]) -> pl.DataFrame:
    """One row per run; dict-valued keys (route_share, saturation) as JSON strings."""
    import json

    rows = []
    for s in summaries:
        r = dict(s)
        for k in ("route_share", "saturation"):
            r[k] = json.dumps(r.get(k, {}), sort_keys=True)
        rows.append(r)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()

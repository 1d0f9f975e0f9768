"""Finds and reads the runs a `routesim run` wrote under an output directory.

Layout (README, "Outputs"): OUT/<scenario>/scenario.yaml and
OUT/<scenario>/<policy>/seed<k>/{summary.json, requests.parquet, timeline.parquet,
events.parquet}, and OUT/summary.parquet, which (when present) lists the runs to report.
Only these files are read; nothing is simulated again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from sim.errors import RouteSimError
from sim.runner import OLD_MARK, PARTIAL_MARK, summaries_frame
from sim.scenario import Scenario, parse_scenario


@dataclass
class RunFiles:
    """One (policy, seed) run on disk."""

    dir: Path
    summary: dict[str, Any]

    @property
    def policy(self) -> str:
        return str(self.summary["policy"])

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])

    def requests(self, columns: list[str] | None = None) -> pl.DataFrame:
        return _read(self.dir / "requests.parquet", columns)

    def timeline(self) -> pl.DataFrame:
        return _read(self.dir / "timeline.parquet", None)

    def events(self) -> pl.DataFrame:
        return _read(self.dir / "events.parquet", None)


@dataclass
class ScenarioRuns:
    """Every run of one scenario found under the output directory."""

    name: str
    dir: Path
    scenario: Scenario | None
    runs: list[RunFiles] = field(default_factory=list)

    @cached_property
    def policies(self) -> list[str]:
        """Policy labels: the scenario file's order first, then any others by name."""
        found = {r.policy for r in self.runs}
        order: list[str] = []
        if self.scenario is not None:
            order = [p.display for p in self.scenario.policy_specs if p.display in found]
        return order + sorted(found - set(order))

    @cached_property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.runs})

    def runs_of(self, policy: str) -> list[RunFiles]:
        return sorted((r for r in self.runs if r.policy == policy), key=lambda r: r.seed)

    def first_run(self, policy: str) -> RunFiles:
        return self.runs_of(policy)[0]

    def summaries(self) -> pl.DataFrame:
        return summaries_frame([r.summary for r in self.runs])

    @property
    def warmup_s(self) -> float:
        return self.scenario.warmup_s if self.scenario is not None else 0.0


def _read(path: Path, columns: list[str] | None) -> pl.DataFrame:
    if not path.is_file():
        raise RouteSimError("missing output file (an interrupted run?)", source=str(path))
    try:
        df = pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable parquet is the same user error
        raise RouteSimError(f"cannot read parquet: {exc}", source=str(path)) from None
    if columns is not None:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise RouteSimError(
                f"missing column(s) {', '.join(missing)}; columns: {', '.join(df.columns)}",
                source=str(path),
            )
        df = df.select(columns)
    return df


def _load_scenario(path: Path) -> Scenario | None:
    if not path.is_file():
        return None
    try:
        return parse_scenario(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))
    except (OSError, yaml.YAMLError, RouteSimError):
        return None


def discover_runs(out_dir: str | Path) -> list[ScenarioRuns]:
    """Every scenario with at least one run under `out_dir`; none -> RouteSimError."""
    out = Path(out_dir)
    hint = (
        "expected <scenario>/<policy>/seed<k>/summary.json as written by "
        f"`routesim run --out {out}`"
    )
    if not out.is_dir():
        raise RouteSimError(f"no such directory; {hint}", source=str(out))
    listed = _listed_runs(out / "summary.parquet")
    listed_scenarios = {s for s, _, _ in listed or ()}
    found: list[ScenarioRuns] = []
    for sdir in sorted(p for p in out.iterdir() if p.is_dir() and not _is_staging(p)):
        runs = []
        for summary_path in sorted(sdir.glob("*/seed*/summary.json")):
            try:
                summary = json.loads(summary_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise RouteSimError(
                    f"unreadable summary: {exc}", source=str(summary_path)
                ) from None
            if not isinstance(summary, dict) or not {"policy", "seed"} <= summary.keys():
                raise RouteSimError(
                    "not a routesim summary (needs keys policy and seed)", source=str(summary_path)
                )
            seed = summary["seed"]
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise RouteSimError(
                    f"not a routesim summary: seed is {seed!r}, not an integer",
                    source=str(summary_path), field="seed",
                )
            scen = str(summary.get("scenario"))
            key = (scen, str(summary["policy"]), seed)
            # Only a scenario summary.parquet lists has a known set of finished runs; one it
            # does not list (written by an older routesim, or by another process meanwhile)
            # is reported whole rather than dropped.
            if listed is None or scen not in listed_scenarios or key in listed:
                runs.append(RunFiles(summary_path.parent, summary))
        if runs:
            scenario = _load_scenario(sdir / "scenario.yaml")
            name = scenario.name if scenario is not None else str(runs[0].summary.get(
                "scenario", sdir.name))
            found.append(ScenarioRuns(name, sdir, scenario, runs))
    if not found:
        raise RouteSimError(f"no runs found; {hint}", source=str(out))
    return found


def _is_staging(path: Path) -> bool:
    """A scenario directory `routesim run` is still writing, or one left by a failed run."""
    return path.name.startswith(".") and (PARTIAL_MARK in path.name or OLD_MARK in path.name)


def _listed_runs(path: Path) -> set[tuple[str, str, int]] | None:
    """(scenario, policy, seed) of every run OUT/summary.parquet lists (None: no file).

    `routesim run` writes it last, so it names the runs that finished: a run directory of a
    listed scenario that it does not list is stale and is not reported."""
    if not path.is_file():
        return None
    try:
        df = pl.read_parquet(path, columns=["scenario", "policy", "seed"])
    except Exception as exc:  # noqa: BLE001 - any unreadable parquet is the same user error
        raise RouteSimError(
            "cannot read the list of runs (needs columns scenario, policy, seed): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            source=str(path),
        ) from None
    return {(str(s), str(p), int(k)) for s, p, k in df.iter_rows()}

"""Speed-up of a sweep with 1 and 2 workers, local process pool and Ray, on this machine.

Runs the 16 cells of sweeps/example_grid.yaml (or --grid), each stretched to --duration-s
(default 2700 s, three times the grid's 900 s, so cells outweigh worker start-up), into
fresh directories: inline (this process, no pool: the sequential reference), then each
backend with 1 and 2 workers; each row is the best of --repeats (default 2) sweeps.
Wall time includes starting the worker processes and their first imports; Ray's own start
(`ray.init`) is timed apart because a cluster is started once and reused. Speed-up is the
1-worker time of the same backend over the N-worker time, so per-backend overhead cancels.
Other processes on the machine slow everything and cap the speed-up; the load average and
the speed-up of a pure CPU loop with 2 processes (the ceiling right now) are printed too.

    python benchmarks/bench_sweep.py [--grid sweeps/example_grid.yaml] [--no-ray]
        [--duration-s 2700] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# This checkout's packages, not whichever tree is installed (comparing two checkouts runs
# each one's copy of this script).
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sim.sweep import Grid, RayBackend, load_grid, parse_grid, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed_sweep(grid, out: Path, backend, workers: int | None, repeats: int) -> tuple[float, int]:
    """Best wall time of `repeats` full sweeps (each into an empty directory)."""
    best = float("inf")
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        res = run_sweep(grid, out, backend=backend, workers=workers)
        best = min(best, time.perf_counter() - t0)
        if res.failed:
            bad = res.frame.filter(res.frame["status"] != "ok")["error"].to_list()
            raise SystemExit(f"{res.failed} cell(s) failed: {bad[:3]}")
    return best, res.ran


def _spin(n: int) -> int:
    s = 0
    for i in range(n):
        s += i * i
    return s


def cpu_ceiling(n: int = 4_000_000, jobs: int = 8) -> float:
    """Speed-up of a pure CPU loop with 2 processes over 1, measured now: the most any sweep
    can gain while other programs share the cores (2.0 on an idle 2-core machine)."""
    from concurrent.futures import ProcessPoolExecutor

    times = {}
    for w in (1, 2):
        with ProcessPoolExecutor(w) as ex:
            list(ex.map(_spin, [10] * w))  # start the processes before timing
            t0 = time.perf_counter()
            list(ex.map(_spin, [n] * jobs))
            times[w] = time.perf_counter() - t0
    return times[1] / times[2]


def with_duration(grid: Grid, duration_s: float) -> Grid:
    """The same grid with every cell simulating `duration_s` seconds of arrivals."""
    data = grid.model_dump(mode="json")
    data["overrides"] = {**data["overrides"], "duration_s": duration_s}
    g = parse_grid(data, source=grid._source)
    g._dir = grid._dir
    return g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default=str(ROOT / "sweeps" / "example_grid.yaml"))
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray backend")
    ap.add_argument("--repeats", type=int, default=2, help="best of N sweeps per row")
    ap.add_argument("--duration-s", type=float, default=2700.0,
                    help="simulated seconds per cell (the grid's overrides.duration_s; 0 keeps "
                         "the grid's): longer cells let start-up costs matter less")
    args = ap.parse_args()
    grid = load_grid(args.grid)
    if args.duration_s > 0:
        grid = with_duration(grid, args.duration_s)
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    rows: list[tuple[str, int | str, float, int]] = []
    load_start = os.getloadavg()[0]
    try:
        wall, n = timed_sweep(grid, tmp / "inline", "inline", None, args.repeats)
        rows.append(("inline (no pool)", "-", wall, n))
        for w in (1, 2):
            wall, n = timed_sweep(grid, tmp / f"local{w}", "local", w, args.repeats)
            rows.append(("local", w, wall, n))
        ray_init = None
        if not args.no_ray:
            try:
                import ray
            except ImportError:
                print("Ray is not installed (pip install 'routesim[ray]'): Ray rows skipped")
            else:
                t0 = time.perf_counter()
                ray.init(address="local", num_cpus=2, include_dashboard=False,
                         logging_level=logging.WARNING)
                ray_init = time.perf_counter() - t0
                try:
                    for w in (1, 2):
                        wall, n = timed_sweep(grid, tmp / f"ray{w}", RayBackend(w), w,
                                              args.repeats)
                        rows.append(("ray", w, wall, n))
                finally:
                    ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ceiling = cpu_ceiling()
    base = {b: wall for b, w, wall, _ in rows if w == 1}
    print(f"\nsweep of {rows[0][3]} cells ({Path(args.grid).name}, duration_s="
          f"{args.duration_s or 'as in the grid'}) on {os.cpu_count()} cores; "
          f"load average (1 min) {load_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; best of {args.repeats}")
    print(f"{'backend':<18}{'workers':>8}{'wall s':>9}{'cells/s':>9}{'speed-up':>10}")
    for b, w, wall, n in rows:
        sp = f"{base[b] / wall:.2f}x" if b in base else "-"
        print(f"{b:<18}{w!s:>8}{wall:>9.1f}{n / wall:>9.2f}{sp:>10}")
    print(f"ceiling now: a pure CPU loop runs {ceiling:.2f}x faster with 2 processes than 1")
    if ray_init is not None:
        print(f"ray.init (local, 2 CPUs): {ray_init:.1f}s, not included above")


if __name__ == "__main__":  # the local pool spawns workers, which re-import this module
    main()

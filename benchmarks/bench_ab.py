"""Paired speed comparison of two checkouts of routesim on the engine benchmark's scenario.

A machine's speed can drift by 10-25% within seconds, which hides a change worth a few
percent when each checkout is timed on its own. Here one worker process per checkout sets
the scenario up once; then the two take turns (A B, B A, A B, ...) and each adjacent pair
of runs gives one ratio of the run thread's CPU times, old / new. The script prints the mean
of those ratios with its standard error, and their median: > 1 means the new checkout is
faster.

Usage: python benchmarks/bench_ab.py OLD_DIR NEW_DIR [--policy mixllm] [--params JSON]
       [--n 20000] [--pairs 40] [--rate 150]
(e.g. OLD_DIR from `git worktree add /tmp/old HEAD~1`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(n: int, policy: str, params: dict, rate: float) -> None:
    """Child process: set up once, then one timed run per line read from stdin."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_engine

    from policies import registry
    from sim.engine import Simulation, prepare_inputs
    from sim.runner import build_workload

    sc = bench_engine.scenario_for(n, policy, rate)
    inputs = prepare_inputs(sc, build_workload(sc, sc.seed), sc.seed)
    print("ready", flush=True)
    for _ in sys.stdin:
        sim = Simulation(sc, registry.create(policy, params), inputs, seed=sc.seed)
        # The CPU time of this thread: less sensitive than wall time to other load, and,
        # unlike the process's, blind to BLAS worker threads that a setup's last matrix
        # product leaves spinning into the run (a run itself is single-threaded).
        t = time.thread_time()
        sim.run()
        print(time.thread_time() - t, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("old", help="checkout timed as the reference")
    ap.add_argument("new", help="checkout compared with it")
    ap.add_argument("--policy", default="mixllm")
    ap.add_argument("--params", default=None,
                    help='policy params as JSON (default for mixllm: {"online": true})')
    ap.add_argument("--n", type=int, default=20_000, help="requests per run")
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--rate", type=float, default=150.0, help="arrivals per second")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    params_json = args.params or ('{"online": true}' if args.policy == "mixllm" else "{}")
    if not args.worker:
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_engine

        bench_engine.checked_cli(ap, args.policy, params_json,
                                 {"--n": args.n, "--pairs": args.pairs, "--rate": args.rate})
    if args.worker:
        worker(args.n, args.policy, json.loads(params_json), args.rate)
        return

    def start(tree: str) -> subprocess.Popen:
        root = Path(tree).resolve()
        script = root / "benchmarks" / "bench_ab.py"
        if not script.is_file():  # an older checkout: run this script against its code
            script = Path(__file__).resolve()
        proc = subprocess.Popen(
            [sys.executable, str(script), "--worker", tree, tree, "--policy", args.policy,
             "--params", params_json, "--n", str(args.n), "--rate", str(args.rate)],
            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(root)},
        )
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"the worker for {tree} did not start")
        return proc

    def timed(proc: subprocess.Popen) -> float:
        proc.stdin.write("run\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())

    old, new = start(args.old), start(args.new)
    ratios = []
    try:
        for i in range(args.pairs):
            if i % 2:
                t_new, t_old = timed(new), timed(old)
            else:
                t_old, t_new = timed(old), timed(new)
            ratios.append(t_old / t_new)
    finally:
        for proc in (old, new):
            proc.stdin.close()
            proc.wait()
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    print(f"speed-up new / old ({args.policy}, {args.n:,} requests, {len(ratios)} pairs): "
          f"mean {statistics.mean(ratios):.3f} +- {se:.3f} (standard error), median "
          f"{statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()

"""Scale limit: one run of 1,000,000 requests, wall time and peak memory (target < 1 GiB).

The cluster and workload are the built-in load spike's (five LLMs, synthetic queries), with
steady Poisson arrivals at --rate per second for 1e6 / rate seconds, so about 1,000,000
requests arrive (Poisson: +- 0.1% at one standard deviation). The run goes through
`sim.runner.run` with outputs written (requests.parquet of every request, timeline, events,
summary), exactly as `routesim run` does, into a temporary directory that is removed after.

Peak RSS is this process's high-water mark (resource.getrusage, Linux reports KiB),
including the interpreter, numpy/polars/sklearn and the policy; the RSS after imports is
printed too (the workload and the policy are built inside the run), so the run's own share
is visible.

The policy is MixLLM (`mixllm`); while it is not registered, least_loaded is used and the
output says so.

    python benchmarks/bench_scale.py [--requests 1000000] [--rate 10] [--policy mixllm]
"""

from __future__ import annotations

import argparse
import resource
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

GIB = 1024**3


def peak_rss_bytes() -> int:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes


def current_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000, help="expected arrivals")
    ap.add_argument("--rate", type=float, default=10.0, help="arrivals per second")
    ap.add_argument("--policy", default="mixllm")
    ap.add_argument("--keep", type=Path, default=None, help="write outputs here and keep them")
    args = ap.parse_args()

    from policies import registry
    from sim.runner import run
    from sim.scenario import PolicySpec, Scenario, load_scenario

    policy = args.policy
    note = ""
    if policy not in registry.names():
        note = f"policy {policy!r} is not registered yet; measured with least_loaded instead"
        policy = "least_loaded"
    base = load_scenario("load_spike")
    d = base.model_dump(mode="json")
    d["name"] = "scale_1m"
    d["duration_s"] = args.requests / args.rate
    d["warmup_s"] = 0.0  # every request is measured
    d["arrivals"] = {"kind": "poisson", "rate_per_s": args.rate}
    d["policies"] = [policy]
    scenario = Scenario.model_validate(d)

    rss_start = current_rss_bytes()
    out = args.keep or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    t0 = time.perf_counter()
    try:
        res = run(scenario, [PolicySpec(name=policy)], [scenario.seed], out,
                  keep_requests=False)
        wall = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in out.rglob("*.parquet"))
    finally:
        if args.keep is None:
            shutil.rmtree(out, ignore_errors=True)
    s = res.summaries[0]
    peak = peak_rss_bytes()
    print(f"policy: {policy}" + (f"  ({note})" if note else ""))
    print(f"scenario: load_spike cluster, poisson {args.rate:g}/s for "
          f"{scenario.duration_s:,.0f} s, seed {scenario.seed}")
    print(f"requests arrived: {s['arrived']:,}  completed: {s['completed']:,}  "
          f"rejected: {s['rejected']:,}  abandoned: {s['abandoned']:,}")
    print(f"wall time: {wall:.1f} s  ({s['arrived'] / wall:,.0f} requests/s, outputs written: "
          f"{size / 2**20:.0f} MiB parquet)")
    print(f"RSS after imports: {rss_start / 2**20:.0f} MiB; peak RSS: {peak / 2**20:.0f} MiB "
          f"({peak / GIB:.2f} GiB; target < 1 GiB: {'met' if peak < GIB else 'NOT met'})")
    print(f"quality {s['quality_pct_of_reference']:.1f}% of reference, cost "
          f"{s['cost_pct_of_reference']:.1f}%, p95 wait {s['p95_wait_s']:.2f} s")


if __name__ == "__main__":
    main()

"""The benchmark scripts run their parts on a small workload, and treat bad flags like the
CLI treats bad input: one line naming the flag and the rule, exit code 2, no traceback,
before any timing starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    "script, args, said",
    [
        ("bench_engine.py", ["--policy", "nope"], "--policy: unknown policy 'nope'"),
        ("bench_engine.py", ["--rate", "-5"], "--rate: must be > 0"),
        ("bench_engine.py", ["--params", '{"k": 1}'], "--params: k: Extra inputs"),
        ("bench_mixllm.py", ["--part", "online", "--workload", "synthetic", "--params",
                             '{"alpha": -1}'], "--params: alpha: Input should be greater"),
        ("bench_mixllm.py", ["--params", "notjson"], "--params: not JSON"),
        ("bench_mixllm.py", ["--params", "[1]"], "--params: a JSON object"),
        ("bench_ab.py", [".", ".", "--params", '{"online": "yes"}'],
         "--params: online: Input should be a valid boolean"),
    ],
)
def test_bad_flags_are_usage_errors(script, args, said):
    res = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert said in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_the_mixllm_benchmark_parts_run_on_a_small_synthetic_workload(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_mixllm

    wl, llms, ref = bench_mixllm.load_synthetic(600)
    bench_mixllm.part_frontier(wl, llms, ref, ["knn"])
    bench_mixllm.part_online(wl, llms, ref, 2, {"online": True})
    out = capsys.readouterr().out
    assert "AIQ (mean of the non-decreasing hull" in out and "mixllm default" in out
    assert "mean online - offline (se)" in out

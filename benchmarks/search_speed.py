"""Speed of the plan search on a synthetic Llama-3-8B-shaped profile (32 layers x 8 KV heads).

Targets (issue 6): inner knapsack solve <= 1 s; 200-trial predicted-objective study <= 2 min
on a 2-core CPU. Run: ``python benchmarks/search_speed.py [--trials 200]``. Prints one
line per measurement and a JSON summary; the load average is printed too, because on a
shared machine it moves these numbers a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from moa_search.search import plan_search
from moa_search.search.costs import build_problem
from moa_search.search.knapsack import Capacity, solve
from moa_search.search.synthetic import make_synthetic_profile, synthetic_identity
from moa_search.search.table import load_profile

CASES = [  # (memory fraction, bandwidth fraction or None, max distinct per layer or None)
    (0.25, None, None),
    (0.25, 0.2, None),
    (0.15, None, None),
    (0.25, 0.2, 2),
    (0.15, None, 2),
    (0.5, 0.3, 1),
]


def time_solver(profile: Path, repeats: int) -> list[dict]:
    problem = build_problem(load_profile(profile), None, ("dense", "window", "elastic", "sparq"))
    values = problem.loss.mean(axis=2)
    rows = []
    for mem, bw, distinct in CASES:
        caps = []
        for n in problem.lengths:
            caps.append(
                Capacity(
                    f"memory@{n}", problem.bytes_per_head("memory", n), mem * problem.dense_bytes(n)
                )
            )
            if bw:
                caps.append(
                    Capacity(
                        f"bandwidth@{n}",
                        problem.bytes_per_head("bandwidth", n),
                        bw * problem.dense_bytes(n),
                    )
                )
        times, sol = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            sol = solve(values, caps, problem.layer_of(), distinct)
            times.append(time.perf_counter() - start)
        row = {
            "memory": mem,
            "bandwidth": bw,
            "max_distinct": distinct,
            "median_s": statistics.median(times),
            "max_s": max(times),
            "gap": sol.gap,
            "caps": len(caps),
        }
        print(
            f"solver memory={mem} bandwidth={bw} distinct={distinct}: "
            f"median {row['median_s']:.3f} s, max {row['max_s']:.3f} s, gap {sol.gap:.2e}"
        )
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moa-search-bench-") as tmp:
        start = time.perf_counter()
        profile = make_synthetic_profile(
            Path(tmp) / "profile",
            synthetic_identity(32, 8, 4, 128),
            lengths=(2048, 4096, 8192),
            seed=0,
        )
        print(
            f"synthetic profile: {time.perf_counter() - start:.1f} s "
            f"(32 layers x 8 KV heads x 40 candidates x 3 lengths)"
        )
        solver = time_solver(profile, args.repeats)
        start = time.perf_counter()
        result = plan_search(
            profile, budgets=["memory=0.25", "bandwidth=0.2"], trials=args.trials, seed=0
        )
        study_s = time.perf_counter() - start
        frame = result.trials
        print(
            f"study: {args.trials} trials in {study_s:.1f} s "
            f"({study_s / args.trials:.3f} s/trial; solver mean "
            f"{np.nanmean(frame['solver_s']):.3f} s, max {np.nanmax(frame['solver_s']):.3f} s;"
            f" {int(frame['pareto'].sum())} Pareto plans)"
        )
    summary = {
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "solver": solver,
        "study": {
            "trials": args.trials,
            "seconds": study_s,
            "solver_mean_s": float(np.nanmean(frame["solver_s"])),
            "solver_max_s": float(np.nanmax(frame["solver_s"])),
            "max_gap": float(np.nanmax(frame["solver_gap"])),
        },
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""End-to-end figures on the real node (or E2E_CLUSTER=kind|existing), from the e2e suite
itself: each round runs tests/e2e/test_chart.py (image build, ``helm install``, the user's
story, ``helm uninstall``) and collects the ``[figure]`` lines it prints; the summary gives
the median, min and max of each over the rounds.

Figures: image build (warm caches) and size; ``helm install --wait`` → operator, SSE,
webhooks and Redis Ready; install → webhooks answering through their Service;
``kubectl create`` → first SSE event through the Service; the worker pod running a run
deleted → run resumed on another worker (and, without workers, on the standby operator).

Usage: .venv/bin/python bench/bench_e2e.py [--rounds 3]   (make cluster-up first, or let the
suite bring the cluster up; it is left running when it was up before)
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Anywhere in a line: with -s, pytest's progress dots share the line a test's output starts.
FIGURE = re.compile(r"\[figure\] (?P<name>.+?): (?P<value>[0-9.]+)(?P<unit>s| MiB)$")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for n in range(1, args.rounds + 1):
        started = time.monotonic()
        print(f"round {n}/{args.rounds}: pytest tests/e2e/test_chart.py", file=sys.stderr)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "tests/e2e/test_chart.py",
                "-q",
                "-s",
                "-p",
                "no:randomly",
                "-m",
                "e2e",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "K8S_VERSION": os.environ.get("K8S_VERSION", "1.34")},
        )
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
            print(f"round {n} failed ({proc.returncode})", file=sys.stderr)
            return 1
        for line in proc.stdout.splitlines():
            m = FIGURE.search(line.strip())
            if m:
                values[(m["name"], m["unit"].strip())].append(float(m["value"]))
        print(f"round {n} done in {time.monotonic() - started:.0f}s", file=sys.stderr)
    print(f"\n{'figure':<64} {'median':>8} {'min':>8} {'max':>8}  (over {args.rounds} rounds)")
    for (name, unit), vs in values.items():
        row = [statistics.median(vs), min(vs), max(vs)]
        print(f"{name:<64} " + " ".join(f"{v:>7.2f}{unit[:1]}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())

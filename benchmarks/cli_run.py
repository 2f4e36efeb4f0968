"""Run one ``spade-ad`` command in its own process and measure it (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time

RUNNER = """
import resource, sys, time
from spade_ad.delivery.cli import main
sys.argv = ["spade-ad", *sys.argv[1:]]
t = time.perf_counter()
code = 0
try:
    main()
except SystemExit as e:
    code = int(e.code or 0)
print("RESULT", code, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def run(args: list[str], src: str | None = None) -> dict[str, float]:
    """``spade-ad ARGS`` in a fresh process: its wall seconds (start-up excluded) and peak RSS (MB); also
    ``process_seconds`` (the whole process, start-up and imports included) and ``cpu_seconds`` (user + system
    time of the process and its threads).

    ``src``: import ``spade_ad`` from this folder (another checkout's ``src``) rather than the installed one.
    """
    env = None if src is None else {**os.environ, "PYTHONPATH": src}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=env)
    process = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    if out.returncode or not line or line[-1].split()[1] != "0":
        raise SystemExit(f"command failed: spade-ad {' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    _, _, secs, kib = line[-1].split()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"seconds": round(float(secs), 1), "peak_rss_mb": round(int(kib) / 1024, 1),
            "process_seconds": round(process, 2), "cpu_seconds": round(cpu, 2)}

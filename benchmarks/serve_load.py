"""A whole line under load: ``spade-ad serve MODELS_DIR`` with 3 models and 16 concurrent clients, loopback only.

Fits 3 models (bottle, metal_plate, bsdata by default: ``--train`` good images each), starts a real
``spade-ad serve`` process on a folder holding them, then runs ``--clients`` client threads that each POST
test images to the models in turn (``/models/<name>/predict``) for ``--seconds`` after a ``--warmup``. Records
every request's latency and status, and the server process's resident memory every second. Prints and saves
one JSON document: p50 / p90 / p99 latency, requests per second, errors, and the memory in the first and the
last 10 s of the measured minute (flat: no growth with requests once the upload caches are full).

    python benchmarks/serve_load.py --seconds 60 --clients 16
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from spade_ad import Spade
from spade_ad.evaluate import machine_description

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SETS = {"bottle": SHARED / "mvtec_ad" / "bottle", "metal_plate": SHARED / "mpdd" / "metal_plate",
        "bsdata": SHARED / "bsdata"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--images", type=int, default=6, help="test images per model, sent in turn")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spade-load-"))
    payloads: list[tuple[str, str, bytes]] = []
    for name, root in SETS.items():
        train = sorted(p for p in (root / "train" / "good").iterdir() if p.suffix in (".png", ".jpg"))[: args.train]
        t0 = time.perf_counter()
        Spade().fit([str(p) for p in train]).save(work / name)
        print(f"fitted {name} on {len(train)} images in {time.perf_counter() - t0:.1f}s", flush=True)
        tests = sorted(p for p in (root / "test").glob("*/*") if p.suffix in (".png", ".jpg"))
        for p in tests[:: max(1, len(tests) // args.images)][: args.images]:
            payloads.append((name, p.name, p.read_bytes()))

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "spade_ad.delivery.cli", "serve", str(work), "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise SystemExit(f"the server did not start: {server.stderr.read() if server.stderr else ''}")
        time.sleep(0.2)

    lat: list[tuple[float, float, int]] = []  # (start, seconds, status)
    lock = threading.Lock()
    t_start = time.monotonic()
    t_end = t_start + args.warmup + args.seconds
    memory: list[tuple[float, float]] = []

    def client(k: int) -> None:
        c = httpx.Client(base_url=url, timeout=300)
        i = k
        while time.monotonic() < t_end:
            name, fname, data = payloads[i % len(payloads)]
            i += 1
            t0 = time.monotonic()
            try:
                status = c.post(f"/models/{name}/predict", files={"file": (fname, data)}).status_code
            except httpx.HTTPError:
                status = -1
            with lock:
                lat.append((t0 - t_start, time.monotonic() - t0, status))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for t in threads:
        t.start()
    while time.monotonic() < t_end:
        memory.append((time.monotonic() - t_start, rss_mb(server.pid)))
        time.sleep(1.0)
    for t in threads:
        t.join()
    server.terminate()
    server.wait(timeout=60)

    measured = [(s, d, st) for s, d, st in lat if s >= args.warmup]
    secs = np.array([d for _, d, st in measured if st == 200])
    errors = sum(st != 200 for _, _, st in measured)
    warm_mem = [m for t, m in memory if t <= args.warmup]
    end_mem = [m for t, m in memory if t >= args.warmup + args.seconds - 10]
    first_mem = [m for t, m in memory if args.warmup <= t < args.warmup + 10]
    doc = {
        "models": list(SETS), "train_images": args.train, "clients": args.clients, "seconds": args.seconds,
        "warmup_seconds": args.warmup, "requests": len(measured), "errors": errors,
        "requests_per_second": len(measured) / args.seconds,
        "latency_seconds": {"p50": float(np.percentile(secs, 50)), "p90": float(np.percentile(secs, 90)),
                            "p99": float(np.percentile(secs, 99)), "mean": float(secs.mean()),
                            "max": float(secs.max())} if len(secs) else None,
        "server_rss_mb": {"end_of_warmup": warm_mem[-1] if warm_mem else None,
                          "first_10s_median": statistics.median(first_mem) if first_mem else None,
                          "last_10s_median": statistics.median(end_mem) if end_mem else None,
                          "max": max(m for _, m in memory)},
        "memory_samples": [[round(t, 1), round(m, 1)] for t, m in memory],
        "machine": machine_description(),
        "command": " ".join(sys.argv),
    }
    print(json.dumps({k: v for k, v in doc.items() if k != "memory_samples"}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "serve_load.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()

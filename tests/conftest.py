from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

REPO = Path(__file__).resolve().parents[1]
BOTTLE = REPO.parent / "shared" / "datasets" / "mvtec_ad" / "bottle"
METAL_PLATE = REPO.parent / "shared" / "datasets" / "mpdd" / "metal_plate"
BSDATA = REPO.parent / "shared" / "datasets" / "bsdata"


@pytest.fixture(scope="session")
def bottle() -> Path:
    if not BOTTLE.is_dir():
        pytest.fail(f"real data missing: {BOTTLE} (the MVTec AD bottle category must sit in ../shared)")
    return BOTTLE


@pytest.fixture(scope="session")
def metal_plate() -> Path:
    if not METAL_PLATE.is_dir():
        pytest.fail(f"real data missing: {METAL_PLATE} (the MPDD metal_plate category must sit in ../shared)")
    return METAL_PLATE


@pytest.fixture(scope="session")
def bsdata() -> Path:
    if not BSDATA.is_dir():
        pytest.fail(f"real data missing: {BSDATA} (the BSData set must sit in ../shared)")
    return BSDATA


@pytest.fixture(scope="session")
def small_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few small synthetic good images on disk (fast model tests)."""
    from spade_ad.synthetic import make_dataset

    root = tmp_path_factory.mktemp("synth")
    return make_dataset(root, n_train=8, n_test_good=2, n_test_defect=4, size=96, seed=1)


def rng_images(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``spade-ad ARGV`` in-process through the real entry point; (exit code, stdout, stderr)."""
    import sys

    from spade_ad.delivery import cli

    old = sys.argv
    sys.argv = ["spade-ad", *argv]
    cli._state["debug"] = False
    try:
        with pytest.raises(SystemExit) as exc:
            cli.main()
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def serve_app(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread: yields its URL, then stops it."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()

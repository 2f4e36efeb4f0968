"""The ``spade-ad-runtime`` command: ``spade-ad-runtime predict DEPLOY IMAGES... --out OUT``.

The options, files, rows and exit codes of ``spade-ad predict`` (0 success, 1 unexpected error, 2 bad input
or unreadable images, 130 interrupted, 143 terminated); one line per error, the traceback with ``--debug``.
argparse, not typer: the runtime installs nothing beyond numpy, onnxruntime, Pillow and safetensors.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from . import __version__
from .errors import SpadeError
from .io import printable
from .result import MIN_AREA_HELP
from .runs import BATCH_SIZE, check_failed, summary_line


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl+C so that every ``finally`` and cleanup runs (a run finishes ``interrupted``)."""


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


ENDINGS = (SpadeError, KeyboardInterrupt, Terminated)  # what ends a command with its own code and line


def ending(exc: SpadeError | KeyboardInterrupt | Terminated) -> tuple[int, str]:
    """The exit code and line of a command ended by ``exc`` (both packages' commands): bad input 2, Ctrl+C
    130, SIGTERM 143 (anything else is an unexpected error, reported by the caller)."""
    if isinstance(exc, SpadeError):
        return 2, f"error: {exc}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted"
    return 143, "terminated"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spade-ad-runtime", description="Run spade-ad deploy folders without PyTorch.")
    p.add_argument("--version", action="version", version=f"spade-ad-runtime {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("predict", help="score images: overlay PNG, raw map, mask PNG and a predictions.jsonl row each",
                        description="Score images into OUT exactly as `spade-ad predict` does (same files and rows). "
                        "OUT must be empty, new, or a folder a predict run wrote before; anything else is refused "
                        "unless --overwrite.")
    pr.add_argument("deploy", type=Path, help="deploy folder written by `spade-ad export`")
    pr.add_argument("images", type=Path, nargs="+", help="image files and/or folders")
    pr.add_argument("--out", type=Path, required=True, help="output folder")
    pr.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the backbone runs")
    pr.add_argument("--threshold", type=float, help="pixel threshold for the masks (default: the model's)")
    pr.add_argument("--min-area", type=int, help=f"{MIN_AREA_HELP} (default: the model's)")
    pr.add_argument("--raw", default="npy", help="raw map format: npy (float32) or png16 (16-bit, scaled)")
    pr.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per step (outputs are written "
                    "after each step)")
    pr.add_argument("--max-pixels", type=int, help="refuse larger images from their header")
    pr.add_argument("--on-error", default="stop", metavar="skip|stop", help="an unreadable image: stop (the "
                    "default) or skip it (its row says why, exit code 2 at the end)")
    pr.add_argument("--overwrite", action="store_true", help="allow OUT to hold files a run did not write")
    return p


def _say(text: str) -> None:
    print(printable(text), file=sys.stderr, flush=True)  # control characters in file names shown escaped


def run(argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` and run the command (errors propagate: :func:`main` turns them into exit codes)."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        raise SpadeError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise SpadeError(f"--max-pixels must be at least 1, got {args.max_pixels}")
    from .predict import predict

    def progress(stage: str, done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\r{stage}: {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    summary = predict(args.deploy, args.images, args.out, device=args.device, threshold=args.threshold,
                      min_area=args.min_area, raw=args.raw,
                      batch_size=args.batch_size, max_pixels=args.max_pixels, on_error=args.on_error,
                      overwrite=args.overwrite, progress=progress)
    _say(summary_line(args.out, summary))
    check_failed(args.out, summary)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: one clear line per error (``--debug`` for the traceback), non-zero exit."""
    signal.signal(signal.SIGTERM, on_sigterm)
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    try:
        run(argv)
    except ENDINGS as exc:
        if debug and isinstance(exc, SpadeError):
            raise
        code, line = ending(exc)
        _say(line)
        sys.exit(code)
    except Exception as exc:  # anything unexpected
        if debug:
            raise
        _say(f"error: {type(exc).__name__}: {exc} (rerun with --debug for details)")
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()

"""What the benchmarks share: which checkpoint to run."""
from __future__ import annotations

import argparse
import tempfile
import time

from backend.sam3.checkpoints import build_checkpoint


def add_checkpoint_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("checkpoint", nargs="?", help="a checkpoint folder or hub id")
    ap.add_argument("--random-full", action="store_true", help="build a full-size random-weight SAM 3 (real compute)")
    ap.add_argument("--random-tiny", action="store_true", help="build the tests' tiny random-weight SAM 3")


def checkpoint_path(ap: argparse.ArgumentParser, args) -> tuple[str, object]:
    """The checkpoint to load, and the temporary folder that holds it (keep it alive while it is used)."""
    if args.random_full or args.random_tiny:
        tmp = tempfile.TemporaryDirectory()
        t = time.perf_counter()
        path = str(build_checkpoint(tmp.name, tiny=args.random_tiny))
        kind = "tiny" if args.random_tiny else "full-size"
        print(f"built {kind} random checkpoint in {time.perf_counter() - t:.0f}s")
        return path, tmp
    if args.checkpoint:
        return args.checkpoint, None
    ap.error("give a checkpoint, --random-full or --random-tiny")

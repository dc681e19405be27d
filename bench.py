"""The project's one benchmark script: speed and quality figures measured on real data.

Usage: python3 bench.py [--dev PATH] [--only NAME[,NAME...]] [--checkpoint RUN [RUN...] (for onnx_agreement)]
Each benchmark prints one or more `name: value` lines to stdout. The benchmarks themselves live in
benchmarks/, one module per kind of figure; this file chooses which run, in what order.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cli import ArgumentParser, int_at_least, positive_int

# Importing the row modules registers their @benchmark rows in BENCHMARKS.
from benchmarks import (  # noqa: F401
    answering, distillation, korquad2, onnx_profile, oracles, pipeline, pretraining, serving, training)
from benchmarks.harness import BENCHMARKS, DEV_CANDIDATES, ROOT, print_provenance

# Every row, in the order a plain `python3 bench.py` runs them and --help lists them.
ORDER = ("tokenize", "tokenize_long", "features", "feature_cache", "decode", "oracle", "oracle_v2", "max_context",
         "train_throughput", "step_vs_transformers", "predict", "onnx_profile", "onnx_agreement", "serve", "gpu",
         "pretrain", "pretrain_tiny", "pretrain_reference", "train_scale", "distill", "korquad2")
# Benchmarks on made-up inputs, which run without the dev set.
WITHOUT_DEV = {"max_context"}


def batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated whole numbers, each at least 1."""
    try:
        sizes = [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"every batch size must be at least 1, got {text!r}")
    return sizes


def check_revision(revision: str) -> None:
    """Exit in one line unless `revision` names a commit of this checkout's git repository (train_scale
    archives it only after its own long runs)."""
    found = False
    if revision and not revision.startswith("-"):  # git would read "-x" as an option, here and in `git archive`
        try:
            found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet",
                                    f"{revision}^{{commit}}"], capture_output=True, text=True).returncode == 0
        except OSError as err:  # no git on PATH
            sys.exit(f"bench.py: --compare_rev needs git ({err.strerror or err})")
    if not found:
        sys.exit(f"bench.py: --compare_rev {revision!r}: not a commit of the git repository at {ROOT}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path, default=None,
                        help="KorQuAD v1.0 dev JSON (if not given: data/ or ../shared/data/).")
    parser.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                        help="Trained runs or checkpoints for onnx_agreement, each measured in turn (if not given: "
                             "it is skipped).")
    parser.add_argument("--compare_rev", default=None,
                        help="train_scale: also measure the train.py of this git revision (e.g. HEAD~1), side by side.")
    # Checked here, not when pretrain_reference's turn comes after the other rows (a long run).
    parser.add_argument("--steps", type=int_at_least(3), default=600,
                        help="pretrain_reference: optimizer steps per run (held-out scores at a third, two thirds "
                             "and the end).")
    parser.add_argument("--seeds", type=positive_int, default=3, help="pretrain_reference: seeds per batch size.")
    parser.add_argument("--batch_sizes", type=batch_sizes, default=[16, 128],
                        help="pretrain_reference: comma-separated batch sizes (pairs per step).")
    parser.add_argument("--only", default=None,
                        help="Comma-separated benchmark names (if not given: all): " + ", ".join(ORDER) + ".")
    args = parser.parse_args(argv)
    names = list(ORDER) if args.only is None else [n for n in args.only.split(",") if n]
    if not names:  # an empty --only (an unset shell variable) is not a request for every row: hours of them
        sys.exit(f"bench.py: --only {args.only!r} names no benchmark (leave --only out to run them all)")
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        sys.exit(f"bench.py: unknown benchmark(s) for --only: {', '.join(unknown)}")
    missing = [str(path) for path in args.checkpoint or [] if not path.exists()]
    if missing:
        sys.exit(f"bench.py: --checkpoint {missing[0]}: no such file or directory")
    if args.compare_rev is not None:
        check_revision(args.compare_rev)
    if args.dev is None:
        args.dev = next((p for p in DEV_CANDIDATES if p.is_file()), None)
    if (args.dev is None or not args.dev.is_file()) and not set(names) <= WITHOUT_DEV:
        sys.exit("bench.py: KorQuAD_v1.0_dev.json not found; pass --dev PATH (or run `python3 download.py`)")
    print_provenance()
    for name in names:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    main()

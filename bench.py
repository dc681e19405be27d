"""The project's one benchmark script: speed and quality figures measured on real data.

Usage: python3 bench.py [--dev PATH] [--only NAME[,NAME...]] [--checkpoint RUN [RUN...] (for onnx_agreement)]
Each benchmark prints one or more `name: value` lines to stdout. The benchmarks themselves live in
benchmarks/, one module per kind of figure; this file chooses which run, in what order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Importing the row modules registers their @benchmark rows in BENCHMARKS.
from benchmarks import (  # noqa: F401
    answering, distillation, korquad2, onnx_profile, oracles, pipeline, pretraining, serving, training)
from benchmarks.harness import BENCHMARKS, DEV_CANDIDATES, print_provenance

# Every row, in the order a plain `python3 bench.py` runs them and --help lists them.
ORDER = ("tokenize", "tokenize_long", "features", "feature_cache", "decode", "oracle", "oracle_v2", "max_context",
         "train_throughput", "step_vs_transformers", "predict", "onnx_profile", "onnx_agreement", "serve", "gpu",
         "pretrain", "pretrain_tiny", "pretrain_reference", "train_scale", "distill", "korquad2")
# Benchmarks on made-up inputs, which run without the dev set.
WITHOUT_DEV = {"max_context"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path, default=None,
                        help="KorQuAD v1.0 dev JSON (if not given: data/ or ../shared/data/).")
    parser.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                        help="Trained runs or checkpoints for onnx_agreement, each measured in turn (if not given: "
                             "it is skipped).")
    parser.add_argument("--compare_rev", default=None,
                        help="train_scale: also measure the train.py of this git revision (e.g. HEAD~1), side by side.")
    parser.add_argument("--steps", type=int, default=600, help="pretrain_reference: optimizer steps per run.")
    parser.add_argument("--seeds", type=int, default=3, help="pretrain_reference: seeds per batch size.")
    parser.add_argument("--batch_sizes", type=lambda text: [int(v) for v in text.split(",")], default=[16, 128],
                        help="pretrain_reference: comma-separated batch sizes (pairs per step).")
    parser.add_argument("--only", default="",
                        help="Comma-separated benchmark names (if not given: all): " + ", ".join(ORDER) + ".")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        sys.exit(f"bench.py: unknown benchmark(s) for --only: {', '.join(unknown)}")
    missing = [str(path) for path in args.checkpoint or [] if not path.exists()]
    if missing:
        sys.exit(f"bench.py: --checkpoint {missing[0]}: no such file or directory")
    if args.dev is None:
        args.dev = next((p for p in DEV_CANDIDATES if p.is_file()), None)
    if (args.dev is None or not args.dev.is_file()) and not set(names) <= WITHOUT_DEV:
        sys.exit("bench.py: KorQuAD_v1.0_dev.json not found; pass --dev PATH (or run `python3 download.py`)")
    print_provenance()
    for name in names:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    main()

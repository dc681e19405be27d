"""The project's one benchmark script: speed and quality figures measured on real data.

Usage: python3 bench.py [--dev PATH] [--only NAME[,NAME...]]
Each benchmark prints one or more `name: value` lines to stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
DEV_CANDIDATES = (ROOT / "data" / "KorQuAD_v1.0_dev.json",
                  ROOT.parent / "shared" / "data" / "KorQuAD_v1.0_dev.json")
VOCAB_FILE = ROOT / "data" / "ko_vocab_32k.txt"

BENCHMARKS: dict[str, Callable[[argparse.Namespace], None]] = {}


def benchmark(name: str):
    """Register a benchmark under `name` (run order is registration order)."""
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


# --- tokenizer (issue 3) -----------------------------------------------------------------

# --- features, decoding, oracle (issue 4) ------------------------------------------------

# --- training throughput (issue 6) -------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path, default=None, help="KorQuAD v1.0 dev JSON")
    parser.add_argument("--only", default="", help="comma-separated benchmark names: " + ", ".join(BENCHMARKS))
    args = parser.parse_args()
    if args.dev is None:
        args.dev = next((p for p in DEV_CANDIDATES if p.is_file()), None)
    if args.dev is None or not args.dev.is_file():
        sys.exit("bench.py: KorQuAD_v1.0_dev.json not found; pass --dev PATH (or run `python3 download.py`)")
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"bench.py: unknown benchmark(s) for --only: {', '.join(unknown)}")
    for name in names:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    main()

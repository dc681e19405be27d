"""Predictions for a KorQuAD v1.0 file in the leaderboard's submission form: INPUT.json in, OUTPUT.json out.

    python3 submit.py INPUT.json OUTPUT.json
    python3 submit.py INPUT.json OUTPUT.json --checkpoint output/korquad_2.bin

As the contest baseline's submit.py: on the CPU, from `korquad_3.bin` beside this file with the config
and vocab in `data/` beside it (unless the checkpoint's training run brings its own), 512-piece windows
with a stride of 64, questions of up to 64 pieces, answers of up to 30, 20 candidates, 16 windows a batch.
OUTPUT.json is {question id: answer text}, as the official evaluate-v1.0.py reads it. The work is eval.py's:
with unanswerable questions (a run trained with --version_2_with_negative remembers it) a question is
answered "" where eval.py's predictions.json answers it so, at the same --null_score_diff_threshold.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import eval as evaluate_script
import onnx_reader
import predict
from cli import (ArgumentParser, ROOT, WINDOW_SIZES, add_no_answer_args, check_data_args, check_version_2,
                 refuse_output_over_input, run_cli, setup_logging)
from checkpoints import checkpoint_inputs, explicit_flags, resolve_finetuned_settings
from atomic_files import atomic_write, json_bytes
from decoding import abstain

logger = logging.getLogger("korquad")

DEFAULT_CHECKPOINT = ROOT / "korquad_3.bin"
# The baseline submit.py's settings, as eval.py flags.
BASELINE_FLAGS = ["--max_seq_length=512", "--doc_stride=64", "--max_query_length=64", "--max_answer_length=30",
                  "--n_best_size=20", "--train_batch_size=16"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="submit.py", description="Write a KorQuAD v1.0 file's predictions as a "
                                                         "leaderboard submission does, on the CPU.")
    parser.add_argument("input", metavar="INPUT.json", help="KorQuAD v1.0-format questions to answer.")
    parser.add_argument("output", metavar="OUTPUT.json", help="Where the {id: answer} predictions go.")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="A fine-tuned checkpoint, run directory or transformers QA directory "
                             "(if not given: korquad_3.bin beside submit.py).")
    parser.add_argument("--analyzer", default=None,
                        help="Morpheme analyzer (if not given: the checkpoint's training run's, else mecab).")
    parser.add_argument("--quiet", action="store_true", help="Warnings only, no progress bars.")
    add_no_answer_args(parser, remembered=True)
    args = parser.parse_args(argv)
    # Not given, the threshold is the ONNX export's recorded one (0 for a checkpoint), as in eval.py.
    args.threshold_given = "null_score_diff_threshold" in explicit_flags(parser, argv, ("null_score_diff_threshold",))
    return args


def check_output(own: argparse.Namespace) -> Path:
    """Refuse an OUTPUT.json that cannot be written, or that is INPUT.json or the checkpoint, before any work."""
    path = predict.check_output(own.output, "OUTPUT.json")
    refuse_output_over_input("OUTPUT.json", [path], [("INPUT.json", own.input), ("--checkpoint", own.checkpoint),
                                                     *checkpoint_inputs(own.checkpoint)])
    return path


def eval_args(own: argparse.Namespace, scratch: str) -> argparse.Namespace:
    """eval.py's settings for submit.py's flags: the baseline's, on the CPU, features built in `scratch`."""
    no_answer = ["--version_2_with_negative"] if own.version_2_with_negative else []
    return evaluate_script.parse_args(
        ["--checkpoint", own.checkpoint, f"--predict_file={own.input}", f"--output_dir={scratch}",
         f"--cache_dir={scratch}", "--no_cuda", *BASELINE_FLAGS, *(["--quiet"] if own.quiet else []),
         *([f"--analyzer={own.analyzer}"] if own.analyzer else []), *no_answer,
         *([f"--null_score_diff_threshold={own.null_score_diff_threshold!r}"] if own.threshold_given else [])])


def main(argv: Sequence[str] | None = None) -> None:
    own = parse_args(argv)
    setup_logging(own.quiet)
    output = check_output(own)
    with tempfile.TemporaryDirectory(prefix="submit_") as scratch:   # features are built afresh, not cached
        args = eval_args(own, scratch)
        config = resolve_finetuned_settings(args)
        if isinstance(config, onnx_reader.ExportSettings):
            onnx_reader.apply_no_answer_settings(args, config)
        args.explicit_flags -= set(WINDOW_SIZES)  # submit.py's fixed windows, fitted to a model with fewer positions
        check_data_args(args, config)
        check_version_2(args)
        _, predictions, nbest, odds = evaluate_script.predict_questions(args, config)
    unwritable = evaluate_script.drop_unwritable_questions(predictions, nbest, odds)
    if odds is not None:   # as eval.py writes predictions.json: "" where the null score wins by the threshold
        predictions = abstain(predictions, odds, args.null_score_diff_threshold)
    atomic_write(output, lambda file: file.write(json_bytes(predictions)))
    logger.info("wrote %d predictions to %s", len(predictions), output)
    if unwritable:
        sys.exit(f"submit.py: {unwritable} question(s) left out of the predictions (see the lines above)")


if __name__ == "__main__":
    run_cli(main)

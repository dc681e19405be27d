"""Evaluate fine-tuned checkpoints on a KorQuAD v1.0 file: predictions, n-best lists and EM/F1.

    python3 eval.py --checkpoint=output/korquad_3.bin --output_dir=debug \
        --predict_file=data/KorQuAD_v1.0_dev.json

Several `--checkpoint` files make an ensemble: their start/end logits are averaged before decoding.
The last stdout line is `{"exact_match": .., "f1": ..}` (skipped for a file without answers).

With unanswerable questions (SQuAD 2.0 style, KLUE-MRC; a model trained with the flag remembers it):

    python3 eval.py --checkpoint=output --version_2_with_negative --predict_file=klue-mrc-v1.1_dev.json \
        --metric klue --null_score_diff_threshold best_f1

answers "" where the null score beats the best span by more than the threshold (`best_f1`: tuned
on the file itself), writes `null_odds.json` and `na_probs.json` too, and prints the metric's keys
(`--metric squad2`, the default then: evaluate_v2_0.py's; `klue`: evaluate_klue_mrc.py's).

ONNX exports (`export.py --format onnx`: the directory, or one of its .onnx files) run in ONNX
Runtime without torch, with the export's window settings unless flags say otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import korquad2
import onnx_reader
from cli import (ArgumentParser, TUNED_THRESHOLDS, UsageError, add_data_args, add_no_answer_args, check_data_args,
                 check_version_2, positive_int, prepare_output_dir, refuse_output_over_input, run_cli, setup_logging)
from devices import add_compile_args, autocast_dtype, check_compile_args, pick_device
from checkpoints import WINDOW_FLAGS, build_tokenizer, explicit_flags, model_inputs, resolve_finetuned_settings
from scoring import (average_logits, check_metric_dataset, ensemble_logits, has_answers, score, score_no_answer,
                     tuned_threshold)
from decoding import abstain, decode_predictions, null_odds, write_null_files, write_predictions
from korquad_utils import load_or_build_features
from squad_examples import SquadExample

logger = logging.getLogger("korquad")

# What eval.py writes in --output_dir (write_predictions; write_null_files with --version_2_with_negative).
OUTPUT_NAMES = ("predictions.json", "nbest_predictions.json", "null_odds.json", "na_probs.json")
DEFAULT_CHECKPOINT = "output/korquad_3.bin"   # train.py's defaults write it


# --- CLI -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Evaluate KorQuAD v1.0 checkpoints (several = an ensemble).")
    # default None, not the list: "extend" would add a given --checkpoint to a list default
    parser.add_argument("--checkpoint", nargs="+", action="extend", default=None,
                        help="Fine-tuned checkpoint(s), training run directories (their newest korquad_N.bin), "
                             "transformers QA model directories, hub ids or ONNX exports (a directory or one of "
                             "its .onnx files); several are ensembled by averaging their logits "
                             f"(default: {DEFAULT_CHECKPOINT}, the last epoch of train.py's defaults, as the "
                             "baseline's eval.py).")
    parser.add_argument("--predict_file", default="data/KorQuAD_v1.0_dev.json",
                        help="KorQuAD-format JSON to predict (and score, if it has answers).")
    parser.add_argument("--output_dir", default="debug", help="Where predictions.json and nbest_predictions.json go.")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config (if not given: the one train.py saved beside the checkpoint, "
                             "else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="WordPiece vocab (if not given: the training run's, else data/ko_vocab_32k.txt).")
    parser.add_argument("--train_batch_size", "--batch_size", dest="batch_size", type=positive_int, default=16,
                        help="Features per forward pass.")
    parser.add_argument("--n_best_size", type=positive_int, default=20,
                        help="Candidate answers kept per question in nbest_predictions.json.")
    parser.add_argument("--quiet", action="store_true", help="Warnings only, no progress bars.")
    parser.add_argument("--metric", choices=("korquad", "squad2", "klue", "korquad2"), default=None,
                        help="korquad: the official v1.0 EM/F1; squad2: SQuAD 2.0's rules and keys with KorQuAD's "
                             "character F1 (evaluate_v2_0.py); klue: KLUE-MRC's EM/ROUGE-W per question type "
                             "(evaluate_klue_mrc.py); korquad2: KorQuAD 2.x's EM/F1 over HTML answers "
                             "(evaluate_korquad_v2.py) (if not given: korquad2 for a KorQuAD 2.x file or directory, "
                             "squad2 with --version_2_with_negative, else korquad).")
    add_no_answer_args(parser, remembered=True, tunable=True)
    add_data_args(parser)
    add_compile_args(parser)
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        args.checkpoint = [DEFAULT_CHECKPOINT]
    # The threshold too: an ONNX export records one, which only a threshold given here replaces.
    args.explicit_flags = explicit_flags(parser, argv, (*WINDOW_FLAGS, "null_score_diff_threshold"))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    refuse_output_over_input("--output_dir", [Path(args.output_dir) / name for name in OUTPUT_NAMES],
                             [("--predict_file", args.predict_file), *model_inputs(args)])
    config = resolve_finetuned_settings(args)
    if isinstance(config, onnx_reader.ExportSettings):
        onnx_reader.require_onnxruntime("eval.py on an ONNX export")  # before --output_dir is made
        onnx_reader.apply_no_answer_settings(args, config)
    check_data_args(args, config)
    check_version_2(args)
    metric = args.metric or ("squad2" if args.version_2_with_negative else "korquad")
    check_metric_dataset(args.predict_file, metric)
    if metric == "korquad2" and not korquad2.is_dataset_path(args.predict_file):
        raise UsageError(f"--metric korquad2: {args.predict_file} is not a KorQuAD 2.x file or directory")
    output_dir = prepare_output_dir(args.output_dir)
    examples, predictions, nbest, odds = predict_questions(args, config)
    if korquad2.has_html_examples(examples):  # the answers are HTML: only the 2.x metric reads them
        if args.metric not in (None, "korquad2"):
            raise UsageError(f"--metric {args.metric} cannot score the KorQuAD 2.x dataset {args.predict_file}; "
                             f"use --metric korquad2")
        metric = "korquad2"
    unwritable = drop_unwritable_questions(predictions, nbest, odds)
    if odds is None:
        write_predictions(predictions, nbest, output_dir)
        logger.info("wrote %s and %s", output_dir / "predictions.json", output_dir / "nbest_predictions.json")
        scores = None
        if has_answers(examples, metric):
            scores = score(args.predict_file, predictions) if metric == "korquad" else \
                korquad2.score(args.predict_file, predictions) if metric == "korquad2" else \
                score_no_answer(args.predict_file, metric, predictions, None)
    else:
        threshold = args.null_score_diff_threshold
        if threshold in TUNED_THRESHOLDS:
            if not has_answers(examples):
                raise UsageError(f"--null_score_diff_threshold {threshold}: {args.predict_file} has no answers "
                                 f"to tune on")
            threshold = tuned_threshold(args.predict_file, predictions, odds, threshold)
            logger.info("null_score_diff_threshold tuned on %s (%s): %.6g", args.predict_file,
                        args.null_score_diff_threshold, threshold)
        write_predictions(abstain(predictions, odds, threshold), nbest, output_dir)
        write_null_files(odds, output_dir)
        logger.info("wrote predictions.json, nbest_predictions.json, null_odds.json and na_probs.json in %s "
                    "(threshold %.6g: %d of %d questions answered \"\")", output_dir, threshold,
                    sum(value > threshold for value in odds.values()), len(odds))
        scores = score_no_answer(args.predict_file, metric, predictions, odds, threshold) \
            if has_answers(examples, metric) else None
    if scores is None:
        print(f"{args.predict_file} has no answers (a test set?): predictions written, scoring skipped",
              file=sys.stderr)
    else:
        print(json.dumps(scores, ensure_ascii=False))
    if unwritable:
        sys.exit(f"eval.py: {unwritable} question(s) left out of the predictions (see the lines above)")


def predict_questions(args: argparse.Namespace, config
                      ) -> tuple[list[SquadExample], dict[str, str], dict[str, list[dict]], dict[str, float] | None]:
    """The questions of `args.predict_file`, with the ensemble's best answer and n-best list for each,
    and (with --version_2_with_negative) each question's null-score odds (`args` as parse_args leaves
    it, its settings resolved by resolve_finetuned_settings); submit.py's too."""
    onnx = isinstance(config, onnx_reader.ExportSettings)
    if not onnx:
        device = pick_device(args.no_cuda)
        amp_dtype = autocast_dtype(args, device)
        check_compile_args(args, device)

    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    version_2 = getattr(args, "version_2_with_negative", False)
    examples, features = load_or_build_features(
        args.predict_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
        is_training=False, cache_dir=args.cache_dir, overwrite_cache=args.overwrite_cache,
        num_workers=args.preprocess_workers, progress=not args.quiet, version_2_with_negative=version_2)
    logger.info("%d questions, %d features from %s", len(examples), len(features), args.predict_file)

    if onnx:
        mean_starts, mean_ends = average_logits(
            onnx_reader.OnnxReaderModel(path).predict_logits(features, args.batch_size, not args.quiet)
            for path in args.checkpoint)
    else:
        mean_starts, mean_ends = ensemble_logits(args, config, features, device, amp_dtype)
    predictions, nbest = decode_predictions(examples, features, mean_starts, mean_ends,
                                            n_best_size=args.n_best_size, max_answer_length=args.max_answer_length)
    predictions = korquad2.html_predictions(examples, predictions, nbest)  # KorQuAD 2.x: cut from the HTML
    odds = null_odds(examples, features.feature_example, mean_starts, mean_ends, nbest) if version_2 else None
    return examples, predictions, nbest, odds


def drop_unwritable_questions(predictions: dict[str, str], nbest: dict[str, list[dict]],
                              odds: dict[str, float] | None = None) -> int:
    """Leave out, with one line each, the questions whose id or answer is not writable as UTF-8 (a lone
    surrogate such as "\\ud800" that JSON escapes allow), so the others' predictions are still written."""
    dropped = 0
    for qas_id in list(predictions):
        try:
            json.dumps([qas_id, predictions[qas_id], nbest.get(qas_id)], ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            print(f"eval.py: question {qas_id}: its id or answer holds a lone surrogate (not Unicode text); "
                  f"left out", file=sys.stderr)
            del predictions[qas_id]
            nbest.pop(qas_id, None)
            if odds is not None:
                odds.pop(qas_id, None)
            dropped += 1
    return dropped


if __name__ == "__main__":
    run_cli(main)

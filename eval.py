"""Evaluate fine-tuned checkpoints on a KorQuAD v1.0 file: predictions, n-best lists and EM/F1.

    python3 eval.py --checkpoint=output/korquad_3.bin --output_dir=debug \
        --predict_file=data/KorQuAD_v1.0_dev.json

Several `--checkpoint` files make an ensemble: their start/end logits are averaged before decoding.
The last stdout line is `{"exact_match": .., "f1": ..}` (skipped for a file without answers).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from cli_common import (ArgumentParser, add_compile_args, add_data_args, autocast_dtype, build_tokenizer,
                        check_compile_args, check_data_args, ensemble_logits, has_answers, pick_device, positive_int,
                        prepare_output_dir, resolve_finetuned_settings, run_cli, score, setup_logging)
from korquad_utils import SquadExample, decode_predictions, load_or_build_features, write_predictions
from modeling import Config

logger = logging.getLogger("korquad")


# --- CLI -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Evaluate KorQuAD v1.0 checkpoints (several = an ensemble).")
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                        help="Fine-tuned checkpoint(s), training run directories (their newest korquad_N.bin), "
                             "transformers QA model directories or hub ids; several are ensembled by averaging "
                             "their logits.")
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
    add_data_args(parser)
    add_compile_args(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    config = resolve_finetuned_settings(args)
    check_data_args(args, config)
    output_dir = prepare_output_dir(args.output_dir)
    examples, predictions, nbest = predict_questions(args, config)
    unwritable = drop_unwritable_questions(predictions, nbest)
    write_predictions(predictions, nbest, output_dir)
    logger.info("wrote %s and %s", output_dir / "predictions.json", output_dir / "nbest_predictions.json")
    if not has_answers(examples):
        print(f"{args.predict_file} has no answers (a test set?): predictions written, scoring skipped",
              file=sys.stderr)
    else:
        print(json.dumps(score(args.predict_file, predictions)))
    if unwritable:
        sys.exit(f"eval.py: {unwritable} question(s) left out of the predictions (see the lines above)")


def predict_questions(args: argparse.Namespace, config: Config
                      ) -> tuple[list[SquadExample], dict[str, str], dict[str, list[dict]]]:
    """The questions of `args.predict_file`, with the ensemble's best answer and n-best list for each
    (`args` as parse_args leaves it, its settings resolved by resolve_finetuned_settings); submit.py's too."""
    device = pick_device(args.no_cuda)
    amp_dtype = autocast_dtype(args, device)
    check_compile_args(args, device)

    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    examples, features = load_or_build_features(
        args.predict_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
        is_training=False, cache_dir=args.cache_dir, overwrite_cache=args.overwrite_cache,
        num_workers=args.preprocess_workers, progress=not args.quiet)
    logger.info("%d questions, %d features from %s", len(examples), len(features), args.predict_file)

    mean_starts, mean_ends = ensemble_logits(args, config, features, device, amp_dtype)
    predictions, nbest = decode_predictions(examples, features, mean_starts, mean_ends,
                                            n_best_size=args.n_best_size, max_answer_length=args.max_answer_length)
    return examples, predictions, nbest


def drop_unwritable_questions(predictions: dict[str, str], nbest: dict[str, list[dict]]) -> int:
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
            dropped += 1
    return dropped


if __name__ == "__main__":
    run_cli(main)

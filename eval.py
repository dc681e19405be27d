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
from pathlib import Path
from collections.abc import Sequence

from cli_common import (UsageError, add_compile_args, add_data_args, autocast_dtype, build_tokenizer,
                        check_compile_args, check_data_args, compile_model, has_answers, pick_device, predict_logits,
                        prepare_output_dir, resolve_from_training_run, run_cli, score, setup_logging)
from korquad_utils import decode_predictions, load_or_build_features, write_predictions
from modeling import Config, QuestionAnswering, load_checkpoint

logger = logging.getLogger("korquad")


# --- CLI -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate KorQuAD v1.0 checkpoints (several = an ensemble).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                        help="fine-tuned checkpoint(s); several are ensembled by averaging logits")
    parser.add_argument("--predict_file", default="data/KorQuAD_v1.0_dev.json")
    parser.add_argument("--output_dir", default="debug", help="where predictions.json and nbest_predictions.json go")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="model config (default: the one train.py saved beside the checkpoint, "
                             "else data/bert_small.json)")
    parser.add_argument("--vocab_file", default=None, help="default: the training run's, else data/ko_vocab_32k.txt")
    parser.add_argument("--train_batch_size", "--batch_size", dest="batch_size", type=int, default=16,
                        help="features per forward pass")
    parser.add_argument("--n_best_size", type=int, default=20)
    parser.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    add_data_args(parser)
    add_compile_args(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.n_best_size < 1 or args.preprocess_workers < 1:
        parser.error("--train_batch_size, --n_best_size and --preprocess_workers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    resolve_from_training_run(args)
    config = Config.from_json_file(args.model_config)
    check_data_args(args, config)
    for path in args.checkpoint:
        if not Path(path).is_file():
            raise UsageError(f"--checkpoint {path}: file not found")
    output_dir = prepare_output_dir(args.output_dir)
    device = pick_device(args.no_cuda)
    amp_dtype = autocast_dtype(args, device)
    check_compile_args(args, device)

    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config)
    examples, features = load_or_build_features(
        args.predict_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
        is_training=False, cache_dir=args.cache_dir, overwrite_cache=args.overwrite_cache,
        num_workers=args.preprocess_workers, progress=not args.quiet)
    logger.info("%d questions, %d features from %s", len(examples), len(features), args.predict_file)

    model = QuestionAnswering(config).to(device)
    # Loading a checkpoint changes only parameter values: one compilation serves an ensemble.
    compiled = compile_model(model, args, device, max_width=args.max_seq_length)
    summed_starts = summed_ends = None
    for path in args.checkpoint:
        if load_checkpoint(model, path) != "finetuned":
            raise UsageError(f"--checkpoint {path} is a pretrained encoder without a trained span head; "
                             f"pass a fine-tuned korquad_*.bin from train.py")
        starts, ends = predict_logits(compiled, features, args.batch_size, device, amp_dtype, not args.quiet,
                                      pad_to_multiple=args.compile_bucket if args.compile else None)
        if summed_starts is None:
            summed_starts, summed_ends = starts, ends
        else:
            summed_starts = [a + b for a, b in zip(summed_starts, starts)]
            summed_ends = [a + b for a, b in zip(summed_ends, ends)]
    n = len(args.checkpoint)
    mean_starts = [s / n for s in summed_starts]
    mean_ends = [e / n for e in summed_ends]
    predictions, nbest = decode_predictions(examples, features, mean_starts, mean_ends,
                                            n_best_size=args.n_best_size, max_answer_length=args.max_answer_length)
    write_predictions(predictions, nbest, output_dir)
    logger.info("wrote %s and %s", output_dir / "predictions.json", output_dir / "nbest_predictions.json")
    if not has_answers(examples):
        print(f"{args.predict_file} has no answers (a test set?): predictions written, scoring skipped",
              file=sys.stderr)
        return
    print(json.dumps(score(args.predict_file, predictions)))


if __name__ == "__main__":
    run_cli(main)

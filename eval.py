"""Evaluate fine-tuned checkpoints on a KorQuAD v1.0 file: predictions, n-best lists and EM/F1.

    python3 eval.py --checkpoint=output/korquad_3.bin --output_dir=debug \
        --predict_file=data/KorQuAD_v1.0_dev.json

Several `--checkpoint` files make an ensemble: their start/end logits are averaged before decoding.
The last stdout line is `{"exact_match": .., "f1": ..}` (skipped for a file without answers).
ONNX exports (`export.py --format onnx`: the directory, or one of its .onnx files) run in ONNX
Runtime without torch, with the export's window settings unless flags say otherwise.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import onnx_reader
from cli_common import (ArgumentParser, add_compile_args, add_data_args, autocast_dtype, average_logits,
                        build_tokenizer, check_compile_args, check_data_args, ensemble_logits, explicit_flags,
                        has_answers, pick_device, positive_int, prepare_output_dir, resolve_finetuned_settings,
                        run_cli, score, setup_logging)
from korquad_utils import decode_predictions, load_or_build_features, write_predictions

logger = logging.getLogger("korquad")


# --- CLI -------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Evaluate KorQuAD v1.0 checkpoints (several = an ensemble).")
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                        help="Fine-tuned checkpoint(s), training run directories (their newest korquad_N.bin), "
                             "transformers QA model directories, hub ids or ONNX exports (a directory or one of "
                             "its .onnx files); several are ensembled by averaging their logits.")
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
    args = parser.parse_args(argv)
    args.explicit_flags = explicit_flags(parser, argv)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    config = resolve_finetuned_settings(args)
    check_data_args(args, config)
    output_dir = prepare_output_dir(args.output_dir)
    onnx = isinstance(config, onnx_reader.ExportSettings)
    if not onnx:
        device = pick_device(args.no_cuda)
        amp_dtype = autocast_dtype(args, device)
        check_compile_args(args, device)

    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    examples, features = load_or_build_features(
        args.predict_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
        is_training=False, cache_dir=args.cache_dir, overwrite_cache=args.overwrite_cache,
        num_workers=args.preprocess_workers, progress=not args.quiet)
    logger.info("%d questions, %d features from %s", len(examples), len(features), args.predict_file)

    if onnx:
        mean_starts, mean_ends = average_logits(
            onnx_reader.OnnxReaderModel(path).predict_logits(features, args.batch_size, not args.quiet)
            for path in args.checkpoint)
    else:
        mean_starts, mean_ends = ensemble_logits(args, config, features, device, amp_dtype)
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

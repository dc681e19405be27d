"""Write a fine-tuned checkpoint as a transformers model directory.

    python3 export.py --checkpoint=output/korquad_3.bin --output_dir=exported
    python3 export.py --checkpoint=lm_run --output_dir=exported_lm    # pretrain.py: BertForPreTraining, both heads

The directory holds config.json, model.safetensors, vocab.txt and tokenizer_config.json, and loads
with `AutoModelForQuestionAnswering.from_pretrained` and `AutoTokenizer.from_pretrained` (and back
into train.py/eval.py as `--checkpoint exported`). Config, vocab, lower-casing and analyzer come
from the training run beside the checkpoint. The analyzer is recorded in config.json as
`korquad_analyzer`: a model fine-tuned on Mecab-split text expects Mecab-split text.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from cli_common import (ANALYZER_CONFIG_KEY, ArgumentParser, UsageError, copy_vocab_into, load_finetuned,
                        prepare_output_dir, resolve_finetuned_settings, run_cli, setup_logging, write_json_atomic)
from korquad_utils import atomic_write
from modeling import (TRANSFORMERS_CONFIG, BertForPreTraining, QuestionAnswering, config_to_transformers,
                      load_checkpoint, read_state_dict, to_transformers_pretraining_state, to_transformers_state)
from tokenization import build_vocab, read_vocab_tokens

logger = logging.getLogger("korquad")

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Write a fine-tuned checkpoint as a transformers model directory.")
    parser.add_argument("--checkpoint", required=True,
                        help="A fine-tuned korquad_*.bin from train.py, or its run directory (the newest one); or a "
                             "pretrain_*.bin from pretrain.py, or its run directory (written as BertForPreTraining).")
    parser.add_argument("--output_dir", required=True, help="The transformers model directory to write.")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config (if not given: the training run's, else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="WordPiece vocab (if not given: the training run's, else data/ko_vocab_32k.txt).")
    parser.add_argument("--analyzer", default=None,
                        help="The analyzer the model was fine-tuned with (if not given: the training run's).")
    parser.add_argument("--quiet", action="store_true", help="Warnings only.")
    return parser.parse_args(argv)


def export(model: QuestionAnswering | BertForPreTraining, vocab_file: str | Path, do_lower_case: bool, analyzer: str,
           output_dir: Path) -> None:
    """Write `model` with its tokenizer files into `output_dir` as transformers reads them."""
    if isinstance(model, BertForPreTraining):
        config = config_to_transformers(model.config, architectures=["BertForPreTraining"],
                                        **{ANALYZER_CONFIG_KEY: analyzer})
        state = to_transformers_pretraining_state(model)
    else:
        config = config_to_transformers(model.config, **{ANALYZER_CONFIG_KEY: analyzer})
        state = to_transformers_state(model)
    write_json_atomic(config, output_dir / TRANSFORMERS_CONFIG)
    weights = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write(output_dir / WEIGHTS_NAME, lambda file: file.write(weights))
    copy_vocab_into(vocab_file, output_dir)
    # strip_accents false: transformers would otherwise NFD-strip with lower-casing, breaking Hangul into jamo.
    write_json_atomic({"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case, "strip_accents": False,
                       "tokenize_chinese_chars": True, "model_max_length": model.config.max_position_embeddings,
                       "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                       "mask_token": "[MASK]"}, output_dir / TOKENIZER_CONFIG_NAME)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    args.checkpoint = [args.checkpoint]
    config = resolve_finetuned_settings(args)
    vocab_tokens = read_vocab_tokens(args.vocab_file)
    build_vocab(vocab_tokens, args.vocab_file)  # checks the special tokens are there
    vocab_size = len(vocab_tokens)
    if vocab_size != config.vocab_size:
        raise UsageError(f"vocab file {args.vocab_file} has {vocab_size} entries but the model config says "
                         f"vocab_size {config.vocab_size}")
    output_dir = prepare_output_dir(args.output_dir)
    checkpoint = Path(args.checkpoint[0])
    if checkpoint.is_file() and any(name.startswith("cls.") for name in read_state_dict(checkpoint)):
        model = BertForPreTraining(config)  # pretrain.py's output: encoder and both pre-training heads
        load_checkpoint(model, checkpoint)
    else:
        model = load_finetuned(checkpoint, config, torch.device("cpu"))
    export(model, args.vocab_file, args.do_lower_case, args.analyzer, output_dir)
    if args.analyzer != "none":
        logger.warning("fine-tuned with analyzer %r: transformers users must split text into %s morphemes "
                       "(space-separated) before tokenizing, or answers will be worse", args.analyzer, args.analyzer)
    print(output_dir)


if __name__ == "__main__":
    run_cli(main)

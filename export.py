"""Write a fine-tuned checkpoint as a transformers model directory.

    python3 export.py --checkpoint=output/korquad_3.bin --output_dir=exported

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

from cli_common import (ANALYZER_CONFIG_KEY, CHECKPOINT_NAME, SAVED_ARGS_NAME, SAVED_VOCAB_NAME, ArgumentParser,
                        UsageError, json_bytes, load_finetuned, prepare_output_dir, resolve_finetuned_settings, run_cli,
                        setup_logging)
from korquad_utils import atomic_write_files
from modeling import TRANSFORMERS_CONFIG, QuestionAnswering, config_to_transformers, to_transformers_state
from tokenization import ANALYZER_NAMES, build_vocab, read_vocab_tokens

logger = logging.getLogger("korquad")

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Write a fine-tuned checkpoint as a transformers model directory.")
    parser.add_argument("--checkpoint", required=True,
                        help="A fine-tuned korquad_*.bin from train.py, or its run directory (the newest one).")
    parser.add_argument("--output_dir", required=True, help="The transformers model directory to write.")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config (if not given: the training run's, else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="WordPiece vocab (if not given: the training run's, else data/ko_vocab_32k.txt).")
    parser.add_argument("--analyzer", default=None,
                        help="The analyzer the model was fine-tuned with (if not given: the training run's).")
    parser.add_argument("--quiet", action="store_true", help="Warnings only.")
    return parser.parse_args(argv)


def export(model: QuestionAnswering, vocab_file: str | Path, do_lower_case: bool, analyzer: str,
           output_dir: Path) -> None:
    """Write `model` with its tokenizer files into `output_dir` as transformers reads them."""
    config = config_to_transformers(model.config, **{ANALYZER_CONFIG_KEY: analyzer})
    weights = safetensors_bytes(to_transformers_state(model), metadata={"format": "pt"})
    vocab = Path(vocab_file).read_bytes()
    # strip_accents false: transformers would otherwise NFD-strip with lower-casing, breaking Hangul into jamo.
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case, "strip_accents": False,
                        "tokenize_chinese_chars": True, "model_max_length": model.config.max_position_embeddings,
                        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                        "mask_token": "[MASK]"}
    # All four or none: a config.json beside another export's weights would describe the wrong model.
    atomic_write_files({output_dir / TRANSFORMERS_CONFIG: lambda file: file.write(json_bytes(config)),
                        output_dir / WEIGHTS_NAME: lambda file: file.write(weights),
                        output_dir / SAVED_VOCAB_NAME: lambda file: file.write(vocab),
                        output_dir / TOKENIZER_CONFIG_NAME: lambda file: file.write(json_bytes(tokenizer_config))})


def check_output_dir(output_dir: Path, checkpoint: Path) -> None:
    """Refuse to export into the source model's directory or into a training run's: the export's
    config.json would replace the one the run's checkpoints (or the source model) are read with."""
    source_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if output_dir.exists() and output_dir.resolve() == source_dir.resolve():
        raise UsageError(f"--output_dir {output_dir} is the directory of --checkpoint {checkpoint}; exporting "
                         f"there would overwrite its {TRANSFORMERS_CONFIG}: pass a new directory")
    if output_dir.is_dir():
        run_files = sorted(child.name for child in output_dir.iterdir()
                           if CHECKPOINT_NAME.fullmatch(child.name) or child.name == SAVED_ARGS_NAME)
        if run_files:
            raise UsageError(f"--output_dir {output_dir} holds a training run ({', '.join(run_files[:3])}); "
                             f"exporting there would overwrite its {TRANSFORMERS_CONFIG}: pass a new directory")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    args.checkpoint = [args.checkpoint]
    config = resolve_finetuned_settings(args)
    if args.analyzer not in ANALYZER_NAMES:
        raise UsageError(f"--analyzer {args.analyzer!r} (given, or the training run's) is not one of "
                         f"{', '.join(ANALYZER_NAMES)}")
    check_output_dir(Path(args.output_dir), Path(args.checkpoint[0]))
    vocab_tokens = read_vocab_tokens(args.vocab_file)
    build_vocab(vocab_tokens, args.vocab_file)  # checks the special tokens are there
    vocab_size = len(vocab_tokens)
    if vocab_size != config.vocab_size:
        raise UsageError(f"vocab file {args.vocab_file} has {vocab_size} entries but the model config says "
                         f"vocab_size {config.vocab_size}")
    output_dir = prepare_output_dir(args.output_dir)
    model = load_finetuned(args.checkpoint[0], config, torch.device("cpu"))
    export(model, args.vocab_file, args.do_lower_case, args.analyzer, output_dir)
    if args.analyzer != "none":
        logger.warning("fine-tuned with analyzer %r: transformers users must split text into %s morphemes "
                       "(space-separated) before tokenizing, or answers will be worse", args.analyzer, args.analyzer)
    print(output_dir)


if __name__ == "__main__":
    run_cli(main)

"""What train.py, eval.py and predict.py share: flags, device and precision, the tokenizer and
model settings of a training run, run-directory files, the evaluation loop and one-line CLI errors.

Each entry point imports from here and does only its own job; nothing here imports an entry point.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

import evaluate_v1_0
from korquad_utils import (InputFeature, KorquadFormatError, SquadExample, atomic_write, collate_features,
                           decode_predictions, make_length_grouped_batches)
from modeling import CheckpointError, Config, ConfigError
from tokenization import BertTokenizer, TokenizerError

logger = logging.getLogger("korquad")

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "data" / "bert_small.json"
DEFAULT_VOCAB = ROOT / "data" / "ko_vocab_32k.txt"
SAVED_CONFIG_NAME = "config.json"          # written by train.py beside its checkpoints
SAVED_ARGS_NAME = "training_args.json"


class UsageError(ValueError):
    """A flag or input file that cannot work; the message names it."""


# What a user can cause: reported as one line. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, ConfigError, CheckpointError, TokenizerError, KorquadFormatError, OSError)


# --- flags and checks ------------------------------------------------------------------------

def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The flags for turning KorQuAD JSON into features, shared by every entry point (baseline names and defaults)."""
    parser.add_argument("--max_seq_length", type=int, default=512, help="pieces per window, [CLS]/[SEP] included")
    parser.add_argument("--max_query_length", type=int, default=96, help="question pieces kept")
    parser.add_argument("--doc_stride", type=int, default=128, help="step between context windows, in pieces")
    parser.add_argument("--max_answer_length", type=int, default=30, help="longest answer, in pieces")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--analyzer", default=None,
                        help="morpheme analyzer: mecab (default), okt, komoran, kkma, hannanum or none")
    parser.add_argument("--cache_dir", default=None, help="where feature caches go (default: beside the data file)")
    parser.add_argument("--overwrite_cache", action="store_true", help="rebuild cached features")
    parser.add_argument("--preprocess_workers", type=int, default=1, help="processes for tokenization")
    parser.add_argument("--no_cuda", action="store_true", help="run on the CPU even if a GPU is present")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA only)")
    precision.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA or CPU)")
    precision.add_argument("--fp32", action="store_true",
                           help="full precision even on a GPU (default there: bf16 where supported, else fp16)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch


def check_data_args(args: argparse.Namespace, config: Config) -> None:
    """Refuse lengths that cannot produce valid windows, before any work is done."""
    if args.max_seq_length > config.max_position_embeddings:
        raise UsageError(f"--max_seq_length {args.max_seq_length} is larger than the model's "
                         f"max_position_embeddings {config.max_position_embeddings}")
    if args.max_query_length < 1:
        raise UsageError("--max_query_length must be at least 1")
    window = args.max_seq_length - args.max_query_length - 3
    if window < 1:
        raise UsageError(f"--max_seq_length {args.max_seq_length} leaves no room for the context after "
                         f"--max_query_length {args.max_query_length} and [CLS]/[SEP]/[SEP]")
    if not 0 < args.doc_stride < window:
        raise UsageError(f"--doc_stride {args.doc_stride} must be positive and smaller than the context window "
                         f"({window} pieces = max_seq_length - max_query_length - 3)")
    if args.max_answer_length < 1:
        raise UsageError("--max_answer_length must be at least 1")


def prepare_output_dir(path: str) -> Path:
    """Create the output directory, refusing a path that is a file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--output_dir {out}: cannot create it ({err.strerror})") from None
    return out


def build_tokenizer(vocab_file: str | os.PathLike, analyzer: str, config: Config) -> BertTokenizer:
    """The morpheme-level tokenizer, checked against the model's vocabulary size."""
    tokenizer = BertTokenizer(str(vocab_file), analyzer=analyzer, do_lower_case=True)
    if len(tokenizer.vocab) != config.vocab_size:
        raise UsageError(f"vocab file {vocab_file} has {len(tokenizer.vocab)} entries but the model config says "
                         f"vocab_size {config.vocab_size}")
    return tokenizer


def pick_device(no_cuda: bool) -> torch.device:
    """The GPU when there is one (and --no_cuda is not given), else the CPU."""
    if torch.cuda.is_available() and not no_cuda:
        # TF32 for whatever runs outside autocast (or all of it under --fp32) on Ampere and newer.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype: on a GPU bf16 where supported, else fp16 (unless --fp32); on a CPU only if asked."""
    if args.fp16:
        if device.type != "cuda":
            raise UsageError("--fp16 needs a CUDA GPU; use --bf16 for mixed precision on a CPU")
        return torch.float16
    if args.bf16:
        if device.type == "cuda" and not has_native_bf16(device):
            raise UsageError("--bf16: this GPU has no native bfloat16 (it needs compute capability 8.0+); use --fp16")
        return torch.bfloat16
    if device.type == "cuda" and not args.fp32:
        return torch.bfloat16 if has_native_bf16(device) else torch.float16
    return None


def has_native_bf16(device: torch.device) -> bool:
    """Ampere (compute capability 8.0) and newer. `torch.cuda.is_bf16_supported()` also says yes
    for older GPUs that only emulate bf16, slowly (a Colab T4), where fp16 is the right choice."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """One autocast context for the whole forward pass (a no-op in full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_logging(quiet: bool = False) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_cli(main: Callable[[Sequence[str] | None], None],
            user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> None:
    """Run a CLI: a user error becomes one line on stderr and exit status 1, never a traceback."""
    prog = Path(sys.argv[0]).name
    try:
        main(None)
    except KeyboardInterrupt:
        sys.exit(f"{prog}: interrupted")
    except torch.cuda.OutOfMemoryError:
        sys.exit(f"{prog}: error: CUDA out of memory; lower --train_batch_size (train.py: raise "
                 f"--gradient_accumulation_steps to keep the global batch) or --max_seq_length")
    except user_errors as err:
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        sys.exit(f"{prog}: error: {message}")


# --- torch.compile ---------------------------------------------------------------------------

def add_compile_args(parser: argparse.ArgumentParser) -> None:
    """--compile and its bucket width, shared by the entry points."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model, with CUDA-graph replay on a GPU (slower on a CPU)")
    parser.add_argument("--compile_bucket", type=int, default=64,
                        help="with --compile, pad batches up to a multiple of this many pieces, so that a run "
                             "compiles one input shape per bucket")


def check_compile_args(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse --compile where it cannot work, before any data is read."""
    if not args.compile:
        return
    if args.compile_bucket < 1:
        raise UsageError(f"--compile_bucket must be at least 1, got {args.compile_bucket}")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UsageError("--compile on a GPU needs Triton (pip install triton), or leave --compile off")
    elif not (os.environ.get("CXX") or any(shutil.which(name) for name in ("g++", "c++", "clang++"))):
        raise UsageError("--compile on a CPU needs a C++ compiler (g++ or clang++, or set CXX); "
                         "install one or leave --compile off")


def compile_padding(args: argparse.Namespace, rows: int, max_width: int) -> dict:
    """collate_features arguments that keep a compiled model to one input shape per bucket (none without --compile)."""
    if not args.compile:
        return {}
    return {"pad_to_multiple": args.compile_bucket, "max_width": max_width, "pad_rows_to": rows}


def compile_model(model: torch.nn.Module, args: argparse.Namespace, device: torch.device,
                  max_width: int) -> torch.nn.Module:
    """`model` compiled for static, bucketed shapes (the model itself without --compile).

    On one GPU, mode "reduce-overhead" replays each shape as a CUDA graph: a step of this small model
    is bound by kernel launches, not arithmetic. The compiled module shares `model`'s parameters.
    """
    if not args.compile:
        return model
    buckets = math.ceil(max_width / args.compile_bucket)
    # One graph per bucket, in training and in evaluation mode; past the limit torch falls back to eager.
    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 2 * buckets + 2))
    # CUDA graphs cannot hold DDP's gradient all-reduce hooks: under torchrun, fused kernels only.
    distributed = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    mode = "reduce-overhead" if device.type == "cuda" and not distributed else None
    logger.info("compiling the model for up to %d sequence buckets of %d pieces (mode %s); the first batch "
                "of each bucket waits for its compilation", buckets, args.compile_bucket, mode or "default")
    return torch.compile(model, mode=mode, dynamic=False)


# --- run-directory files ---------------------------------------------------------------------

def save_torch_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file and a rename: `path` is never half-written."""
    atomic_write(path, lambda file: torch.save(obj, file))


def write_json_atomic(obj, path: Path) -> None:
    """Indented UTF-8 JSON (Korean unescaped), written atomically."""
    atomic_write(path, lambda file: file.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))


def resolve_from_training_run(args: argparse.Namespace) -> None:
    """Fill config, vocab and analyzer from the training run beside the first checkpoint, else defaults."""
    run_dir = Path(args.checkpoint[0]).parent
    saved_args: dict = {}
    if (run_dir / SAVED_ARGS_NAME).is_file():
        try:
            with open(run_dir / SAVED_ARGS_NAME, encoding="utf-8") as f:
                saved_args = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{run_dir / SAVED_ARGS_NAME}: not readable JSON ({err}); pass --vocab_file "
                             f"and --analyzer, or remove the file") from None
    if args.model_config is None:
        saved_config = run_dir / SAVED_CONFIG_NAME
        args.model_config = str(saved_config if saved_config.is_file() else DEFAULT_CONFIG)
    if args.vocab_file is None:
        saved_vocab = saved_args.get("vocab_file")
        if saved_vocab and not Path(saved_vocab).is_file():
            logger.warning("the training run's vocab %s is not here; using %s", saved_vocab, DEFAULT_VOCAB)
            saved_vocab = None
        args.vocab_file = saved_vocab or str(DEFAULT_VOCAB)
    if args.analyzer is None:
        args.analyzer = saved_args.get("analyzer", "mecab")


# --- evaluation ------------------------------------------------------------------------------

@torch.no_grad()
def predict_logits(model: torch.nn.Module, features: Sequence[InputFeature], batch_size: int,
                   device: torch.device, amp_dtype: torch.dtype | None = None,
                   show_progress: bool = True,
                   pad_to_multiple: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits for every feature (float32 arrays as long as its input_ids), in feature order.

    Batches are length-sorted and padded to their own longest feature, so little compute goes to padding;
    with `pad_to_multiple` (for a compiled model) to that multiple and to `batch_size` rows.
    Logits come back to the host without a wait per batch: one synchronisation at the end.
    """
    was_training = model.training
    model.eval()
    starts: list[np.ndarray | None] = [None] * len(features)
    ends: list[np.ndarray | None] = [None] * len(features)
    lengths = [len(f.input_ids) for f in features]
    padding = {} if pad_to_multiple is None else {
        "pad_to_multiple": pad_to_multiple, "max_width": max(lengths, default=0), "pad_rows_to": batch_size}
    batches = make_length_grouped_batches(lengths, batch_size, shuffle=False)
    on_gpu = device.type == "cuda"
    pending = []
    for batch in tqdm(batches, desc="predict", unit="batch", disable=not show_progress):
        tensors = collate_features([features[i] for i in batch], is_training=False, **padding)
        inputs = {k: (v.pin_memory() if on_gpu else v).to(device, non_blocking=True) for k, v in tensors.items()}
        with autocast_context(device, amp_dtype):
            start_logits, end_logits = model(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"])
        # stack copies: a CUDA-graph replay overwrites its outputs on the next call.
        logits = torch.stack([start_logits, end_logits]).float()
        pending.append((batch, logits.to("cpu", non_blocking=True)))
    if on_gpu:
        torch.cuda.synchronize(device)
    for batch, logits in pending:
        batch_logits = logits.numpy()
        for row, index in enumerate(batch):
            starts[index], ends[index] = batch_logits[0, row, :lengths[index]], batch_logits[1, row, :lengths[index]]
    model.train(was_training)
    return starts, ends


def has_answers(examples: Sequence[SquadExample]) -> bool:
    return any(example.answers for example in examples)


def score(predict_file: str | os.PathLike, predictions: dict[str, str]) -> dict[str, float]:
    """EM/F1 from the official KorQuAD v1.0 metric."""
    with open(predict_file, encoding="utf-8") as f:
        dataset = json.load(f)["data"]
    return evaluate_v1_0.evaluate(dataset, predictions)


def evaluate_model(model: torch.nn.Module, examples: Sequence[SquadExample], features: Sequence[InputFeature],
                   args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None,
                   batch_size: int) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Predictions and n-best lists of one model (train.py calls this after each epoch)."""
    starts, ends = predict_logits(model, features, batch_size, device, amp_dtype,
                                  pad_to_multiple=args.compile_bucket if args.compile else None)
    return decode_predictions(examples, features, starts, ends, n_best_size=args.n_best_size,
                              max_answer_length=args.max_answer_length)

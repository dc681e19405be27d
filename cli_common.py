"""What train.py, eval.py and predict.py share: flags, device and precision, the tokenizer and
model settings of a training run, run-directory files, the evaluation loop and one-line CLI errors.

Each entry point imports from here and does only its own job; nothing here imports an entry point.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

import evaluate_klue_mrc
import evaluate_v1_0
import evaluate_v2_0
import onnx_reader
from korquad_utils import (FeatureTable, KorquadFormatError, SquadExample, abstain, atomic_write, collate_features,
                           decode_predictions, make_length_grouped_batches, null_odds)
from tokenization import BertTokenizer, TokenizerError, read_do_lower_case, read_vocab_tokens

# torch and modeling (which needs torch) are imported where they are used: an ONNX model answers
# through eval.py and predict.py without torch installed.
if TYPE_CHECKING:
    import torch

    from modeling import Config, QuestionAnswering

logger = logging.getLogger("korquad")

ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "data" / "bert_small.json"
DEFAULT_VOCAB = ROOT / "data" / "ko_vocab_32k.txt"
SAVED_CONFIG_NAME = "config.json"          # written by train.py beside its checkpoints
SAVED_ARGS_NAME = "training_args.json"
SAVED_VOCAB_NAME = "vocab.txt"             # train.py copies the vocab here, so a moved run directory works
ANALYZER_CONFIG_KEY = "korquad_analyzer"   # recorded in an exported transformers config.json
# A hub model id such as `monologg/koelectra-small-v3-discriminator` (a local path wins).
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer_config.json")


class UsageError(ValueError):
    """A flag or input file that cannot work; the message names it."""


# What a user can cause: reported as one line. Anything else is a bug and keeps its traceback.
# run_cli adds modeling's ConfigError and CheckpointError once modeling has been imported.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError, TokenizerError, KorquadFormatError, onnx_reader.OnnxExportError, OSError)


def model_errors() -> tuple[type[BaseException], ...]:
    """modeling's user errors, if modeling is loaded (if it is not, nothing can have raised them)."""
    modeling = sys.modules.get("modeling")
    return (modeling.ConfigError, modeling.CheckpointError) if modeling is not None else ()


def is_cuda_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)


# --- flags and checks ------------------------------------------------------------------------

class HelpFormatter(argparse.HelpFormatter):
    """--help that shows each flag's default once: appended as "(default: X)" unless the help text
    already says it ("(if not given: ...)" for defaults that depend on something else)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text or "if not given" in text):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """The entry points' parser: --help in `HelpFormatter`'s style, and a bad flag reported as one
    line (argparse would print the whole usage block above it)."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum`."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number
    return parse


def finite_float(low: float = -math.inf, high: float = math.inf, low_inclusive: bool = True,
                 high_inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: a finite number within [low, high] (`*_inclusive=False` opens that end).

    float() accepts "nan" and "inf", which pass every `<` check; they are refused here."""
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        too_low = number < low if low_inclusive else number <= low
        too_high = number > high if high_inclusive else number >= high
        if not math.isfinite(number) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"expected a finite number {allowed}, got {value!r}")
        return number
    bounds = ([f"{'>=' if low_inclusive else '>'} {low:g}"] if math.isfinite(low) else []) + (
        [f"{'<=' if high_inclusive else '<'} {high:g}"] if math.isfinite(high) else [])
    allowed = " and ".join(bounds)
    return parse


positive_int = int_at_least(1)
positive_float = finite_float(0.0, low_inclusive=False)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The flags for turning KorQuAD JSON into features, shared by every entry point (baseline names and defaults)."""
    add_window_args(parser)
    parser.add_argument("--seed", type=int, default=42, help="Random seed for initialisation and shuffling.")
    parser.add_argument("--cache_dir", default=None,
                        help="Where feature caches go (if not given: cache/ beside the data file).")
    parser.add_argument("--overwrite_cache", action="store_true", help="Rebuild cached features.")
    parser.add_argument("--preprocess_workers", type=positive_int, default=1, help="Processes for tokenization.")
    add_device_args(parser)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch


def add_window_args(parser: argparse.ArgumentParser) -> None:
    """How text becomes windows and answers are bounded: eval.py and predict.py must agree on these."""
    parser.add_argument("--max_seq_length", type=positive_int, default=512,
                        help="Pieces per window, [CLS]/[SEP] included.")
    parser.add_argument("--max_query_length", type=positive_int, default=96, help="Question pieces kept.")
    parser.add_argument("--doc_stride", type=positive_int, default=128,
                        help="Step between context windows, in pieces.")
    parser.add_argument("--max_answer_length", type=positive_int, default=30, help="Longest answer, in pieces.")
    parser.add_argument("--analyzer", default=None,
                        help="Morpheme analyzer: mecab, okt, komoran, kkma, hannanum or none "
                             "(if not given: the model's or training run's, else mecab).")


TUNED_THRESHOLDS = ("best_f1", "best_exact")   # eval.py: tune --null_score_diff_threshold on the file scored


def null_threshold(value: str) -> float | str:
    """An argparse type: a finite number, or one of `TUNED_THRESHOLDS`."""
    return value if value in TUNED_THRESHOLDS else finite_float()(value)


def add_no_answer_args(parser: argparse.ArgumentParser, remembered: bool = False, tunable: bool = False) -> None:
    """--version_2_with_negative and --null_score_diff_threshold (the baseline's and run_qa's names).

    `remembered`: when not given, the training run's setting is used (eval.py, predict.py).
    `tunable`: the threshold may be `best_f1`/`best_exact`, tuned on the file being scored (eval.py)."""
    parser.add_argument("--version_2_with_negative", action="store_true", default=None if remembered else False,
                        help="Questions may have no answer (SQuAD 2.0, KLUE-MRC): 'is_impossible': true or an "
                             "empty answer list; such a question trains to [CLS] and is answered \"\" when the null "
                             "score wins" + (" (if not given: the training run's setting, else off)." if remembered
                                             else "."))
    parser.add_argument("--null_score_diff_threshold", type=null_threshold if tunable else finite_float(),
                        default=0.0,
                        help="With --version_2_with_negative: answer \"\" when the null score minus the best "
                             "span's score exceeds this" + (
                                 "; best_f1 (or best_exact) tunes it on --predict_file itself" if tunable else ""))


def check_version_2(args: argparse.Namespace) -> None:
    """Refuse a threshold given without the version-2 reading it applies to."""
    if not args.version_2_with_negative and args.null_score_diff_threshold != 0.0:
        raise UsageError("--null_score_diff_threshold only applies with --version_2_with_negative (a model trained "
                         "with it remembers it)")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--no_cuda and the precision flags."""
    parser.add_argument("--no_cuda", action="store_true", help="Run on the CPU even if a GPU is present.")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="Float16 autocast (CUDA only).")
    precision.add_argument("--bf16", action="store_true", help="Bfloat16 autocast (CUDA or CPU).")
    precision.add_argument("--fp32", action="store_true",
                           help="Full precision even on a GPU (if not given there: bf16 where supported, "
                                "else fp16).")


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


def prepare_output_dir(path: str, flag: str = "--output_dir") -> Path:
    """Create the output directory and prove it writable by writing (and removing) a file there,
    so a read-only or full directory is found before any work rather than after it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{flag} {out}: cannot create it ({err.strerror})") from None
    # A real write, not os.access: root passes os.access everywhere, and neither sees a read-only mount.
    probe = out / f".write_test.{os.getpid()}.tmp"
    try:
        with open(probe, "wb") as file:
            file.write(b"0")
    except OSError as err:
        with contextlib.suppress(OSError):  # created but not written (a full disk): tidy up
            probe.unlink()
        raise UsageError(f"{flag} {out}: cannot write there ({err.strerror})") from None
    probe.unlink()
    return out


def is_same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name one existing file: the same path, a symlink to it, or a hard link."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (then nothing can be overwritten) or cannot be read
        return False


def refuse_output_over_input(output_flag: str, outputs: Iterable[str | os.PathLike],
                             inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse, before any work, an output file that is one of the inputs (by its own path or another
    name for it): writing the results there would destroy the input they were computed from.

    `outputs` are the files an entry point may write (through `output_flag`); `inputs` pairs each
    input flag with its path (None: not given)."""
    given = [(flag, path) for flag, path in inputs if path is not None]
    for output in outputs:
        for input_flag, path in given:
            if is_same_file(output, path):
                raise UsageError(f"{output_flag}: writing {output} would overwrite {input_flag} {path} (the same "
                                 f"file); choose another {output_flag}")


def model_inputs(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """The model files a run reads, as `refuse_output_over_input` takes them: every --checkpoint,
    --model_config and --vocab_file (`args.checkpoint` a list, as eval.py and predict.py parse it)."""
    return [*(("--checkpoint", path) for path in args.checkpoint), ("--model_config", args.model_config),
            ("--vocab_file", args.vocab_file)]


def check_checkpoint_file(path: str, flag: str = "--checkpoint") -> None:
    """Refuse a checkpoint path that is missing or a directory (other than a transformers model directory)."""
    from modeling import is_transformers_dir

    checkpoint = Path(path)
    if is_transformers_dir(checkpoint) or newest_pretraining_checkpoint(checkpoint):
        return
    if checkpoint.is_dir():
        newest = newest_run_checkpoint(checkpoint)
        hint = (f"pass one of its checkpoints, e.g. {newest}" if newest
                else "it holds no korquad_*.bin; pass a checkpoint file")
        raise UsageError(f"{flag} {path} is a directory, not a checkpoint file: {hint}")
    if not checkpoint.is_file():
        raise UsageError(f"{flag} {path}: file not found")


def build_tokenizer(vocab_file: str | os.PathLike, analyzer: str, config: Config,
                    do_lower_case: bool = True) -> BertTokenizer:
    """The morpheme-level tokenizer, checked against the model's vocabulary size."""
    tokenizer = BertTokenizer(str(vocab_file), analyzer=analyzer, do_lower_case=do_lower_case)
    if len(tokenizer.vocab) != config.vocab_size:
        raise UsageError(f"vocab file {vocab_file} has {len(tokenizer.vocab)} entries but the model config says "
                         f"vocab_size {config.vocab_size}")
    return tokenizer


def pick_device(no_cuda: bool) -> torch.device:
    """The GPU when there is one (and --no_cuda is not given), else the CPU."""
    import torch

    if torch.cuda.is_available() and not no_cuda:
        # TF32 for whatever runs outside autocast (or all of it under --fp32) on Ampere and newer.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype: on a GPU bf16 where supported, else fp16 (unless --fp32); on a CPU only if asked."""
    import torch

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
    import torch

    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """One autocast context for the whole forward pass (a no-op in full precision)."""
    import torch

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
    except Exception as err:
        if is_cuda_out_of_memory(err):
            sys.exit(f"{prog}: error: CUDA out of memory; lower --train_batch_size (train.py: raise "
                     f"--gradient_accumulation_steps to keep the global batch) or --max_seq_length")
        if not isinstance(err, user_errors + model_errors()):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, OSError) and err.filename and str(err.filename) not in message:
            message = f"{err.filename}: {message}"
        sys.exit(f"{prog}: error: {message}")


# --- torch.compile ---------------------------------------------------------------------------

def add_compile_args(parser: argparse.ArgumentParser) -> None:
    """--compile and its bucket width, shared by the entry points."""
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model, with CUDA-graph replay on a GPU (slower on a CPU).")
    parser.add_argument("--compile_bucket", type=positive_int, default=64,
                        help="With --compile, pad batches up to a multiple of this many pieces, so that a run "
                             "compiles one input shape per bucket.")


def check_compile_args(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse --compile where it cannot work, before any data is read."""
    if not args.compile:
        return
    if args.compile_bucket < 1:
        raise UsageError(f"--compile_bucket must be at least 1, got {args.compile_bucket}")
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise UsageError("--compile on a GPU needs Triton (pip install triton), or leave --compile off")
    else:
        check_cpu_compiler()


def check_cpu_compiler() -> None:
    """The C++ compiler TorchInductor will call on a CPU ($CXX, else g++; clang++ on macOS) must answer --version,
    as Inductor itself first asks it: a bogus CXX is found now, not as a traceback after the data is built."""
    chosen = os.environ.get("CXX")  # set but empty counts: Inductor then calls "" and fails
    compiler = chosen if chosen is not None else ("clang++" if sys.platform == "darwin" else "g++")
    try:
        subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        if chosen is not None:
            raise UsageError(f"--compile on a CPU: CXX={chosen or '(empty)'} is not a working C++ compiler "
                             f"(`{chosen} --version` failed); point CXX at g++ or clang++, unset it, or leave "
                             f"--compile off") from None
        raise UsageError("--compile on a CPU needs a C++ compiler (g++ or clang++, or set CXX); "
                         "install one or leave --compile off") from None


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
    import torch

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
    import torch

    atomic_write(path, lambda file: torch.save(obj, file))


def json_bytes(obj) -> bytes:
    """Indented UTF-8 JSON (Korean unescaped), as the toolkit writes its JSON files."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(obj, path: Path) -> None:
    """Indented UTF-8 JSON (Korean unescaped), written atomically."""
    data = json_bytes(obj)
    atomic_write(path, lambda file: file.write(data))


CHECKPOINT_NAME = re.compile(r"korquad_(\d+)\.bin")   # train.py's per-epoch checkpoints
PRETRAIN_CHECKPOINT_NAME = re.compile(r"pretrain_(\d+)\.bin")   # pretrain.py's (encoder + pre-training heads)


def newest_run_checkpoint(run_dir: Path, pattern: re.Pattern = CHECKPOINT_NAME) -> Path | None:
    """A training run's last checkpoint: the `korquad_N.bin` (or other `pattern`) with the highest N (None if
    it has none)."""
    numbered = [(int(match.group(1)), child) for child in run_dir.iterdir()
                if (match := pattern.fullmatch(child.name)) and child.is_file()]
    return max(numbered)[1] if numbered else None


def newest_pretraining_checkpoint(path: str | os.PathLike) -> Path | None:
    """A pretrain.py run directory's newest `pretrain_N.bin` (None for anything else)."""
    path = Path(path)
    return newest_run_checkpoint(path, PRETRAIN_CHECKPOINT_NAME) if path.is_dir() else None


def resolve_checkpoints(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Checkpoints for `--checkpoint` values: a file or a transformers model directory as it is, a
    hub model id downloaded (`fetch_hub_model`), a training run directory as its newest
    `korquad_N.bin` (highest N). Several make an ensemble."""
    resolved = []
    for path in (Path(fetch_hub_model(str(value))) for value in paths):
        if onnx_reader.find_export(path) is not None:
            resolved.append(path)
            continue
        from modeling import is_transformers_dir
        if is_transformers_dir(path):
            pass
        elif path.is_dir():
            newest = newest_run_checkpoint(path) or newest_pretraining_checkpoint(path)
            if newest is None:
                raise UsageError(f"--checkpoint {path}: a directory without any korquad_N.bin checkpoint, nor a "
                                 f"transformers model directory (pass a training run's output_dir, a checkpoint "
                                 f"file, or a directory with config.json and model.safetensors/pytorch_model.bin)")
            path = newest
        elif not path.is_file():
            raise UsageError(f"--checkpoint {path}: file not found")
        resolved.append(path)
    return resolved


def resolve_finetuned_settings(args: argparse.Namespace) -> Config | onnx_reader.ExportSettings:
    """eval.py, predict.py, export.py: resolve `args.checkpoint` (a list) and fill config, vocab,
    lower-casing and analyzer from the first one's transformers directory or training run.

    For ONNX exports the answer is their `ExportSettings` (torch is not imported): it carries the
    config's vocab_size and max_position_embeddings for check_data_args and build_tokenizer."""
    given = {name: getattr(args, name) for name in ("model_config", "vocab_file", "analyzer")}
    args.checkpoint = resolve_checkpoints(args.checkpoint)
    if any(onnx_reader.find_export(path) is not None for path in args.checkpoint):
        return settings_from_onnx_export(args)
    config = _settings_of_first_checkpoint(args)
    if len(args.checkpoint) > 1:
        check_ensemble_members(args, config, given)
    return config


def _settings_of_first_checkpoint(args: argparse.Namespace) -> Config:
    from modeling import Config, is_transformers_dir

    if is_transformers_dir(args.checkpoint[0]):
        config = settings_from_model_dir(args, args.checkpoint[0])
    else:
        resolve_from_training_run(args)
        config = Config.from_json_file(args.model_config)
    if getattr(args, "version_2_with_negative", False) is None:  # a transformers directory does not say
        args.version_2_with_negative = False
    return config


# Config keys that change nothing at inference: members may differ in them.
_TRAINING_ONLY_KEYS = ("dropout_prob", "initializer_range")


def check_ensemble_members(args: argparse.Namespace, config: Config, given: dict[str, str | None]) -> None:
    """Refuse, before any work, an ensemble member that the first member's tokenizer and model cannot
    serve: another analyzer, casing or vocab, other model settings, or tensors of other shapes.

    `args` holds the first member's resolved settings, `given` the flags as the user gave them (each
    member resolves its own from them, as it would alone)."""
    import torch

    from modeling import QuestionAnswering, load_checkpoint

    first_vocab = read_vocab_tokens(args.vocab_file)
    first_config = config.to_dict()
    with torch.device("meta"):  # shapes only: no memory for the weights
        shape_model = QuestionAnswering(config)
    for path in args.checkpoint:
        member = argparse.Namespace(**{**vars(args), **given, "checkpoint": [path]})
        member_config = _settings_of_first_checkpoint(member).to_dict()
        differences = [f"{name} {member_config[name]!r} (vs {first_config[name]!r})" for name in first_config
                       if name not in _TRAINING_ONLY_KEYS and member_config[name] != first_config[name]]
        if member.analyzer != args.analyzer:
            differences.append(f"analyzer {member.analyzer!r} (vs {args.analyzer!r})")
        if member.do_lower_case != args.do_lower_case:
            differences.append(f"do_lower_case {member.do_lower_case} (vs {args.do_lower_case})")
        if read_vocab_tokens(member.vocab_file) != first_vocab:
            differences.append(f"vocab {member.vocab_file} (vs {args.vocab_file})")
        if differences:
            raise UsageError(f"--checkpoint {path} cannot join an ensemble with {args.checkpoint[0]}: "
                             f"{'; '.join(differences)}")
        with warnings.catch_warnings():  # loading into meta tensors is the no-op meant here
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            kind = load_checkpoint(shape_model, path)
        if kind != "finetuned":
            raise not_finetuned(path)


def not_finetuned(path: str | os.PathLike) -> UsageError:
    return UsageError(f"--checkpoint {path} is a pretrained encoder without a trained span head; "
                      f"pass a fine-tuned korquad_*.bin from train.py")


def load_finetuned(path: str | os.PathLike, config: Config, device: torch.device,
                   into: QuestionAnswering | None = None) -> QuestionAnswering:
    """A fine-tuned QA model from `path`, in eval mode on `device`; a bare pretrained encoder is refused.

    With `into`, the weights are loaded into that model (its compiled wrapper keeps working)."""
    from modeling import QuestionAnswering, load_checkpoint

    model = into if into is not None else QuestionAnswering(config)
    if load_checkpoint(model, path) != "finetuned":
        raise not_finetuned(path)
    return model.to(device).eval()


def average_logits(member_logits: Iterable[tuple[list[np.ndarray], list[np.ndarray]]]
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The mean of several models' per-feature (start, end) logits: how an ensemble decodes.

    Taking an iterable lets a caller load one member at a time and drop it once its logits are in.
    """
    summed_starts: list[np.ndarray] | None = None
    summed_ends: list[np.ndarray] = []
    count = 0
    for starts, ends in member_logits:
        if summed_starts is None:
            summed_starts, summed_ends = list(starts), list(ends)
        else:
            summed_starts = [a + b for a, b in zip(summed_starts, starts)]
            summed_ends = [a + b for a, b in zip(summed_ends, ends)]
        count += 1
    if summed_starts is None:
        raise ValueError("average_logits needs at least one model's logits")
    if count == 1:
        return summed_starts, summed_ends
    return [s / count for s in summed_starts], [e / count for e in summed_ends]


def ensemble_logits(args: argparse.Namespace, config: Config, features: FeatureTable,
                    device: torch.device, amp_dtype: torch.dtype | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The mean start/end logits of every checkpoint in `args.checkpoint` over `features`.

    One model is built (and compiled, with --compile) and each member's weights loaded into it in
    turn: one member in memory at a time, one compilation for the whole ensemble.
    """
    from modeling import QuestionAnswering

    model = QuestionAnswering(config).to(device)
    compiled = compile_model(model, args, device, max_width=args.max_seq_length)
    padding = args.compile_bucket if args.compile else None

    def member_logits() -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
        for path in args.checkpoint:
            load_finetuned(path, config, device, into=model)
            yield predict_logits(compiled, features, args.batch_size, device, amp_dtype, not args.quiet, padding)

    return average_logits(member_logits())


def resolve_from_training_run(args: argparse.Namespace) -> None:
    """Fill config, vocab and analyzer from the training run beside the first checkpoint, else defaults.

    `args.checkpoint` must already be resolved to files (`resolve_checkpoints`).
    """
    settings_from_run_dir(args, Path(args.checkpoint[0]).parent)


def settings_from_run_dir(args: argparse.Namespace, run_dir: Path) -> None:
    """Config, vocab, lower-casing and analyzer from a train.py or pretrain.py run directory's files, where
    the flags leave them open (defaults where the directory has none)."""
    saved_args: dict = {}
    if (run_dir / SAVED_ARGS_NAME).is_file():
        try:
            with open(run_dir / SAVED_ARGS_NAME, encoding="utf-8-sig") as f:
                saved_args = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{run_dir / SAVED_ARGS_NAME}: not readable JSON ({err}); pass --vocab_file "
                             f"and --analyzer, or remove the file") from None
    if args.model_config is None:
        saved_config = run_dir / SAVED_CONFIG_NAME
        args.model_config = str(saved_config if saved_config.is_file() else DEFAULT_CONFIG)
    args.do_lower_case = saved_args.get("do_lower_case", True)
    if args.vocab_file is None and (run_dir / SAVED_VOCAB_NAME).is_file():
        args.vocab_file = str(run_dir / SAVED_VOCAB_NAME)
    if args.vocab_file is None:
        saved_vocab = saved_args.get("vocab_file")
        if saved_vocab and not Path(saved_vocab).is_file():
            logger.warning("the training run's vocab %s is not here; using %s", saved_vocab, DEFAULT_VOCAB)
            saved_vocab = None
        args.vocab_file = saved_vocab or str(DEFAULT_VOCAB)
    if args.analyzer is None:
        args.analyzer = saved_args.get("analyzer", "mecab")
    if getattr(args, "version_2_with_negative", False) is None:
        args.version_2_with_negative = saved_args.get("version_2_with_negative", False) is True


def fetch_hub_model(checkpoint: str) -> str:
    """A local path as it is; a hub model id (not a local path) downloaded with huggingface_hub into its cache."""
    if Path(checkpoint).exists() or not HUB_MODEL_ID.fullmatch(checkpoint) or checkpoint.endswith(
            (".bin", ".pt", ".pth", ".safetensors")):
        return checkpoint
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"--checkpoint {checkpoint}: no such file or directory; to use the hub model of that name, "
                         f"pip install huggingface_hub, or git clone https://huggingface.co/{checkpoint} and pass "
                         f"the directory") from None
    logger.info("downloading %s from the model hub", checkpoint)
    try:
        return _download_while_progressing(checkpoint, lambda: snapshot_download(
            repo_id=checkpoint, allow_patterns=list(HUB_FILES)))
    except UsageError:
        raise
    except Exception as err:  # network, authentication and not-found errors come in many types
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise UsageError(f"--checkpoint {checkpoint}: not a local path, and the hub download failed ({message})"
                         ) from None


# huggingface_hub asks for a repository's file list without any timeout: an endpoint that accepts
# the connection and never answers would hang the run forever. Give up after this long without a
# byte arriving in the download's cache folder (a slow but moving download goes on).
HUB_STALL_SECONDS = 60.0


def _download_while_progressing(checkpoint: str, download: Callable[[], str]) -> str:
    """`download()` in a daemon thread, abandoned once the repository's cache folder has not grown for
    HUB_STALL_SECONDS (a daemon thread does not keep the process alive after the error)."""
    import huggingface_hub

    constants = getattr(huggingface_hub, "constants", None)  # where its cache and endpoint are
    cache = Path(constants.HF_HUB_CACHE) / f"models--{checkpoint.replace('/', '--')}" if constants else None
    endpoint = f"the model hub ({constants.ENDPOINT})" if constants else "the model hub"
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["path"] = download()
        except BaseException as err:  # handed to the caller's thread
            result["error"] = err

    thread = threading.Thread(target=run, name="hub-download", daemon=True)
    thread.start()
    size, changed = -1, time.monotonic()
    while thread.is_alive():
        thread.join(timeout=min(1.0, HUB_STALL_SECONDS))
        now_size = _folder_bytes(cache)
        if now_size != size:
            size, changed = now_size, time.monotonic()
        elif thread.is_alive() and time.monotonic() - changed > HUB_STALL_SECONDS:
            raise UsageError(f"--checkpoint {checkpoint}: {endpoint} sent nothing for "
                             f"{HUB_STALL_SECONDS:g} s; check the network (or HF_ENDPOINT), or download the model "
                             f"directory and pass its path")
    if "error" in result:
        raise result["error"]
    return str(result["path"])


def _folder_bytes(folder: Path | None) -> int:
    """The bytes of the files under `folder` (0 if there is none); files renamed meanwhile are skipped."""
    total = 0
    if folder is not None and folder.is_dir():
        for file in folder.rglob("*"):
            with contextlib.suppress(OSError):
                total += file.stat().st_size if file.is_file() else 0
    return total


def settings_from_model_dir(args: argparse.Namespace, model_dir: str | os.PathLike) -> Config:
    """Config, vocab, lower-casing and analyzer of a transformers model directory, into `args`."""
    from modeling import config_from_transformers, read_transformers_config

    model_dir = Path(model_dir)
    if args.model_config is not None:
        raise UsageError(f"--model_config: the transformers model directory {model_dir} brings its own "
                         f"config.json; leave --model_config out")
    raw_config = read_transformers_config(model_dir)
    config = config_from_transformers(raw_config, str(model_dir / "config.json"))
    if args.vocab_file is None:
        if not (model_dir / SAVED_VOCAB_NAME).is_file():
            raise UsageError(f"--checkpoint {model_dir}: no vocab.txt in the model directory; pass --vocab_file")
        args.vocab_file = str(model_dir / SAVED_VOCAB_NAME)
    args.do_lower_case = read_do_lower_case(model_dir)
    if args.analyzer is None:
        args.analyzer = raw_config.get(ANALYZER_CONFIG_KEY, "mecab")
    return config


WINDOW_FLAGS = ("max_seq_length", "doc_stride", "max_query_length", "max_answer_length")


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                   names: Sequence[str] = WINDOW_FLAGS) -> set[str]:
    """Which of the single-value flags `names` `argv` gives (argparse leaves a value it finds already
    set alone, so one filled with a marker beforehand still holds it where the flag was not given)."""
    unset = object()
    marked = vars(parser.parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in names})))
    return {name for name in names if marked[name] is not unset}


def settings_from_onnx_export(args: argparse.Namespace) -> onnx_reader.ExportSettings:
    """Vocab, lower-casing and analyzer of the ONNX export(s) in `args.checkpoint`, into `args`, and its
    window settings where the caller did not set them (`args.explicit_flags`, if present, names those)."""
    exports = [onnx_reader.find_export(path) for path in args.checkpoint]
    if not all(exports):
        raise UsageError("--checkpoint: an ensemble is either all ONNX exports or none (export the others with "
                         "export.py --format onnx)")
    settings = onnx_reader.read_settings(exports[0])
    for path, export in zip(args.checkpoint[1:], exports[1:]):
        other = onnx_reader.read_settings(export)
        if (other.vocab_size, other.analyzer, other.do_lower_case) != (
                settings.vocab_size, settings.analyzer, settings.do_lower_case):
            raise UsageError(f"--checkpoint {path}: tokenized differently from {args.checkpoint[0]} "
                             f"(vocab size, analyzer or lower-casing), so they cannot be ensembled")
    if getattr(args, "model_config", None) is not None:
        raise UsageError(f"--model_config: the ONNX export {exports[0]} holds its model; leave --model_config out")
    for flag in ("fp16", "bf16", "compile"):
        if getattr(args, flag, False):
            raise UsageError(f"--{flag} is for PyTorch models; an ONNX model runs in ONNX Runtime (model_int8.onnx "
                             f"for int8)")
    if args.vocab_file is None:
        args.vocab_file = str(exports[0] / SAVED_VOCAB_NAME)
    args.do_lower_case = settings.do_lower_case
    if args.analyzer is None:
        args.analyzer = settings.analyzer
    given = getattr(args, "explicit_flags", set())
    for name in WINDOW_FLAGS:
        if name not in given and hasattr(args, name):
            setattr(args, name, getattr(settings, name))
    return settings


def resolve_model_settings(args: argparse.Namespace, checkpoint: str) -> Config:
    """train.py, pretrain.py: the model config, vocab, lower-casing and analyzer that go with `checkpoint`
    (a transformers directory or a pretrain.py run brings its own, setting `args.checkpoint` to the run's
    newest checkpoint file; otherwise the flags or the published model's)."""
    from modeling import Config, is_transformers_dir

    # train.py's parse_args has already refused any other directory (check_checkpoint_file).
    if checkpoint.lower() != "none" and is_transformers_dir(checkpoint):
        return settings_from_model_dir(args, checkpoint)
    newest = newest_pretraining_checkpoint(checkpoint) if checkpoint.lower() != "none" else None
    if newest is not None:  # a pretrain.py run: its newest encoder, with the run's config and vocab
        args.checkpoint = str(newest)
        settings_from_run_dir(args, newest.parent)
        return Config.from_json_file(args.model_config)
    args.model_config = args.model_config or str(DEFAULT_CONFIG)
    args.vocab_file = args.vocab_file or str(DEFAULT_VOCAB)
    args.do_lower_case = True  # the published vocab is uncased
    args.analyzer = args.analyzer or "mecab"
    return Config.from_json_file(args.model_config)


def copy_vocab_into(vocab_file: str | os.PathLike, directory: Path) -> None:
    """Copy the vocab into a run or model directory as vocab.txt (atomically), so it works once moved."""
    target = directory / SAVED_VOCAB_NAME
    if Path(vocab_file).resolve() != target.resolve():
        with open(vocab_file, "rb") as source:
            atomic_write(target, lambda file: shutil.copyfileobj(source, file))


# --- evaluation ------------------------------------------------------------------------------

def without_grad(function: Callable) -> Callable:
    """`torch.no_grad()` around `function`, with torch imported only once it runs."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        import torch
        with torch.no_grad():
            return function(*args, **kwargs)
    return run


@without_grad
def predict_logits(model: torch.nn.Module, features: FeatureTable, batch_size: int,
                   device: torch.device, amp_dtype: torch.dtype | None = None,
                   show_progress: bool = True,
                   pad_to_multiple: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits for every window of `features` (float32 arrays as long as its input ids), in order.

    Batches are length-sorted and padded to their own longest feature, so little compute goes to padding;
    with `pad_to_multiple` (for a compiled model) to that multiple and to `batch_size` rows.
    Logits come back to the host without a wait per batch: one synchronisation at the end.
    """
    import torch

    was_training = model.training
    model.eval()
    starts: list[np.ndarray | None] = [None] * len(features)
    ends: list[np.ndarray | None] = [None] * len(features)
    lengths = features.lengths
    padding = {} if pad_to_multiple is None else {
        "pad_to_multiple": pad_to_multiple, "max_width": int(lengths.max(initial=0)), "pad_rows_to": batch_size}
    batches = make_length_grouped_batches(lengths, batch_size, shuffle=False)
    on_gpu = device.type == "cuda"
    pending = []
    for batch in tqdm(batches, desc="predict", unit="batch", disable=not show_progress):
        arrays = collate_features(features, batch, is_training=False, **padding)
        inputs = {k: (torch.from_numpy(v).pin_memory() if on_gpu else torch.from_numpy(v)).to(device, non_blocking=True)
                  for k, v in arrays.items()}
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
    return evaluate_v1_0.evaluate(read_dataset(predict_file)["data"], predictions)


def read_dataset(predict_file: str | os.PathLike) -> dict:
    with open(predict_file, encoding="utf-8-sig") as f:
        return json.load(f)


def check_metric_dataset(predict_file: str | os.PathLike, metric: str) -> None:
    """Refuse, before any work, a file the chosen metric cannot score (KLUE needs `question_type`)."""
    checker = {"squad2": evaluate_v2_0.check_dataset, "klue": evaluate_klue_mrc.check_dataset}.get(metric)
    if checker is not None:
        try:
            dataset = read_dataset(predict_file)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"--predict_file {predict_file}: not valid UTF-8 JSON ({err})") from None
        try:
            checker(dataset, str(predict_file))
        except ValueError as err:
            raise UsageError(f"--metric {metric}: {err}") from None


def score_no_answer(predict_file: str | os.PathLike, metric: str, span_predictions: dict[str, str],
                    odds: dict[str, float] | None, threshold: float = 0.0) -> dict:
    """Scores of the predictions that abstain where `odds` > `threshold` (never without `odds`), by `metric`.

    squad2: evaluate_v2_0's dict, its best_* keys tuned over `odds` on the span predictions (so the
    best threshold is in --null_score_diff_threshold's units); klue: evaluate_klue_mrc's; korquad:
    v1.0's EM/F1 (questions without answers left out)."""
    dataset = read_dataset(predict_file)["data"]
    if metric == "squad2":
        return evaluate_v2_0.evaluate(dataset, span_predictions, odds, threshold)
    predictions = span_predictions if odds is None else abstain(span_predictions, odds, threshold)
    if metric == "klue":
        return evaluate_klue_mrc.evaluate(dataset, predictions)
    return evaluate_v1_0.evaluate(dataset, predictions)


def tuned_threshold(predict_file: str | os.PathLike, span_predictions: dict[str, str], odds: dict[str, float],
                    which: str = "best_f1") -> float:
    """The --null_score_diff_threshold that maximises F1 (or EM) on `predict_file`, as SQuAD 2.0 defines it."""
    scores = evaluate_v2_0.evaluate(read_dataset(predict_file)["data"], span_predictions, odds)
    return scores[f"{which}_thresh"]


def evaluate_model(model: torch.nn.Module, examples: Sequence[SquadExample], features: FeatureTable,
                   args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None,
                   batch_size: int) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Predictions and n-best lists of one model (train.py calls this after each epoch)."""
    return evaluate_model_with_odds(model, examples, features, args, device, amp_dtype, batch_size)[:2]


def evaluate_model_with_odds(model: torch.nn.Module, examples: Sequence[SquadExample],
                             features: FeatureTable, args: argparse.Namespace, device: torch.device,
                             amp_dtype: torch.dtype | None, batch_size: int
                             ) -> tuple[dict[str, str], dict[str, list[dict]], dict[str, float]]:
    """`evaluate_model`'s span predictions and n-best lists, and each question's `null_odds`."""
    starts, ends = predict_logits(model, features, batch_size, device, amp_dtype,
                                  pad_to_multiple=args.compile_bucket if args.compile else None)
    predictions, nbest = decode_predictions(examples, features, starts, ends, n_best_size=args.n_best_size,
                                            max_answer_length=args.max_answer_length)
    return predictions, nbest, null_odds(examples, features.feature_example, starts, ends, nbest)

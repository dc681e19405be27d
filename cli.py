"""Command-line flags and their checks, one-line user errors and `run_cli`: how every entry
point parses its flags and reports a mistake."""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from pathlib import Path
from typing import NoReturn, TYPE_CHECKING
from collections.abc import Callable, Collection, Iterable, Sequence

import onnx_reader
from squad_examples import KorquadFormatError
from tokenization import TokenizerError

if TYPE_CHECKING:
    from modeling import Config


ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = ROOT / "data" / "bert_small.json"
DEFAULT_VOCAB = ROOT / "data" / "ko_vocab_32k.txt"


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

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        for dest in ("output_dir", "checkpoint", "teacher"):  # Path("") is the current directory: never meant
            given = getattr(parsed, dest, None)
            if any(isinstance(value, str) and not value.strip() for value in
                   (given if isinstance(given, list) else [given])):
                self.error(f"argument --{dest}: expected a path, got an empty one")
        return parsed, extras


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum` (and <= `maximum`, if given)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        if maximum is not None and number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {number}")
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
            raise argparse.ArgumentTypeError(f"expected a finite number{allowed}, got {value!r}")
        return number
    bounds = ([f"{'>=' if low_inclusive else '>'} {low:g}"] if math.isfinite(low) else []) + (
        [f"{'<=' if high_inclusive else '<'} {high:g}"] if math.isfinite(high) else [])
    allowed = " " + " and ".join(bounds) if bounds else ""
    return parse


positive_int = int_at_least(1)
# The seeds every generator takes (numpy's legacy RandomState is the narrowest); a negative or huge one
# would otherwise raise only once training starts, after the features are built.
random_seed = int_at_least(0, 2**32 - 1)
positive_float = finite_float(0.0, low_inclusive=False)
# A learning rate: any positive value past 1e3 only diverges, and past float32's range torch cannot hold it.
learning_rate = finite_float(0.0, 1e3, low_inclusive=False)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The flags for turning KorQuAD JSON into features, shared by every entry point (baseline names and defaults)."""
    add_window_args(parser)
    parser.add_argument("--seed", type=random_seed, default=42, help="Random seed for initialisation and shuffling.")
    parser.add_argument("--cache_dir", default=None,
                        help="Where feature caches go (if not given: cache/ beside the data file).")
    parser.add_argument("--overwrite_cache", action="store_true", help="Rebuild cached features.")
    parser.add_argument("--preprocess_workers", type=positive_int, default=1,
                        help="Processes for tokenization (at most this machine's CPUs).")
    add_device_args(parser)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch
    # The original baseline's flags that have nothing left to do, taken so that its command lines run unchanged:
    # lower-casing comes with the model (its run or vocab), logging detail from --quiet, and mixed precision
    # from torch's autocast (apex's opt levels are gone). Their own dests: nothing reads them.
    parser.add_argument("--do_lower_case", dest="baseline_do_lower_case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--verbose_logging", dest="baseline_verbose_logging", action="store_true",
                        help=argparse.SUPPRESS)
    parser.add_argument("--fp16_opt_level", dest="baseline_fp16_opt_level", choices=("O0", "O1", "O2", "O3"),
                        help=argparse.SUPPRESS)


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
    """Refuse a threshold given without the version-2 reading it applies to, and the version-2 reading
    of a KorQuAD 2.x dataset (HTML pages, whose reader has no unanswerable questions)."""
    if not args.version_2_with_negative and args.null_score_diff_threshold != 0.0:
        raise UsageError("--null_score_diff_threshold only applies with --version_2_with_negative (a model trained "
                         "with it remembers it)")
    if args.version_2_with_negative:
        import korquad2
        for flag in ("--train_file", "--eval_file", "--predict_file"):
            path = getattr(args, flag[2:], None)
            if path is None or not Path(path).exists() or Path(path).is_dir() and not any(Path(path).glob("*.json")):
                continue  # nothing of 2.x there: the data checks name what is wrong
            if korquad2.is_dataset_path(path):
                raise UsageError(f"--version_2_with_negative does not apply to {flag} {path}, a KorQuAD 2.x dataset "
                                 "(its questions all have answers)")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """--no_cuda and the precision flags."""
    parser.add_argument("--no_cuda", action="store_true", help="Run on the CPU even if a GPU is present.")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="Float16 autocast (CUDA only).")
    precision.add_argument("--bf16", action="store_true", help="Bfloat16 autocast (CUDA or CPU).")
    precision.add_argument("--fp32", action="store_true",
                           help="Full precision even on a GPU (if not given there: bf16 where supported, "
                                "else fp16).")


def capped_windows(windows: dict[str, int], max_positions: int, source: str,
                   keep: Collection[str] = ()) -> dict[str, int]:
    """`windows` shrunk to `max_positions` pieces: the question and stride in the same proportion (at least
    1, the stride below the context's share), so the settings pass the window checks; those named in `keep`
    (given as flags) stay as they are."""
    length = windows["max_seq_length"]
    query = windows["max_query_length"] if "max_query_length" in keep else \
        max(1, windows["max_query_length"] * max_positions // length)
    context = max_positions - query - 3
    if context < 2 and "max_query_length" not in keep:  # a given one too long is the window checks' to name
        raise UsageError(f"{source}: the model's max_position_embeddings {max_positions} leaves no room for a "
                         f"question and context window")
    stride = windows["doc_stride"] if "doc_stride" in keep else \
        min(max(1, windows["doc_stride"] * max_positions // length), max(1, context - 1))
    logging.getLogger("korquad").warning(
        "%s: the model has %d positions, fewer than the %d-piece window; using max_seq_length %d, doc_stride %d, "
        "max_query_length %d", source, max_positions, length, max_positions, stride, query)
    return {**windows, "max_seq_length": max_positions, "doc_stride": stride, "max_query_length": query}


WINDOW_SIZES = ("max_seq_length", "doc_stride", "max_query_length")


def check_data_args(args: argparse.Namespace, config: Config) -> None:
    """Refuse lengths that cannot produce valid windows, before any work is done. Windows left at their defaults
    (a reader's `args.explicit_flags` does not name them) are fitted to a model with fewer positions instead."""
    given = getattr(args, "explicit_flags", {"max_seq_length"})
    if args.max_seq_length > config.max_position_embeddings and "max_seq_length" not in given:
        windows = capped_windows({name: getattr(args, name) for name in WINDOW_SIZES}, config.max_position_embeddings,
                                 "--checkpoint", keep=given)
        for name in WINDOW_SIZES:
            setattr(args, name, windows[name])
    if args.max_seq_length > config.max_position_embeddings:
        raise UsageError(f"--max_seq_length {args.max_seq_length} is larger than the model's "
                         f"max_position_embeddings {config.max_position_embeddings}")
    if args.max_query_length < 1:
        raise UsageError("--max_query_length must be at least 1")
    window = args.max_seq_length - args.max_query_length - 3
    if window < 1:
        raise UsageError(f"--max_seq_length {args.max_seq_length} leaves no room for the context after "
                         f"--max_query_length {args.max_query_length} and [CLS]/[SEP]/[SEP]")
    if args.doc_stride < 1:
        raise UsageError(f"--doc_stride {args.doc_stride} must be at least 1")
    if args.doc_stride >= window:  # taken, as the original baseline does: windows then follow each other
        logging.getLogger("korquad").warning(
            "--doc_stride %d is not smaller than the context window (%d pieces = max_seq_length - max_query_length "
            "- 3): windows may not overlap, and an answer across a window border is then found in neither",
            args.doc_stride, window)
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

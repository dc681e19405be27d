"""Checkpoints and run directories: finding, reading and writing training runs, transformers
model directories, hub ids, ONNX exports and ensembles, and the settings read back from them."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import threading
import time
import warnings
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import onnx_reader
from atomic_files import atomic_write
from squad_examples import parse_json
from tokenization import TOKENIZER_JSON, BertTokenizer, read_do_lower_case, read_vocab_tokens, vocab_file_bytes
from cli import DEFAULT_CONFIG, DEFAULT_VOCAB, UsageError

if TYPE_CHECKING:
    import torch
    from modeling import Config, QuestionAnswering

logger = logging.getLogger("korquad")


SAVED_CONFIG_NAME = "config.json"          # written by train.py beside its checkpoints
SAVED_ARGS_NAME = "training_args.json"
SAVED_VOCAB_NAME = "vocab.txt"             # train.py copies the vocab here, so a moved run directory works
ANALYZER_CONFIG_KEY = "korquad_analyzer"   # recorded in an exported transformers config.json
# A hub model id such as `monologg/koelectra-small-v3-discriminator` (a local path wins).
HUB_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Patterns for snapshot_download: a file the model lacks is simply not fetched (transformers 5 saves tokenizer.json
# without vocab.txt; older models have vocab.txt only).
HUB_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "vocab.txt", TOKENIZER_JSON,
             "tokenizer_config.json")


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
    # Ids are line numbers, so the line count must match: a repeated line still takes an id, and the last
    # lines' ids would fall outside the embedding table.
    if len(tokenizer) != config.vocab_size:
        repeated = next((token for index, token in tokenizer.ids_to_tokens.items()
                         if tokenizer.vocab[token] != index), None)
        detail = (f" ({len(tokenizer.vocab)} distinct: {repeated!r} is repeated, at lines "
                  f"{tokenizer.vocab[repeated] + 1} and later)" if repeated is not None else "")
        raise UsageError(f"vocab file {vocab_file} has {len(tokenizer)} entries{detail} but the model config says "
                         f"vocab_size {config.vocab_size}")
    return tokenizer


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


STATE_NAME = "training_state.pt"    # what train.py and pretrain.py resume from
LOG_NAME = "training_log.jsonl"
CURVES_NAME = "training_curves.png"


def files_of_a_run(output_dir: Path) -> list[Path]:
    """What a train.py or pretrain.py run leaves there and a new run replaces: state, log, args, curves, checkpoints."""
    if not output_dir.is_dir():
        return []
    epochs = {p: int(m.group(1)) for p in output_dir.iterdir()
              if (m := CHECKPOINT_NAME.fullmatch(p.name) or PRETRAIN_CHECKPOINT_NAME.fullmatch(p.name))}
    named = [output_dir / name for name in (STATE_NAME, LOG_NAME, SAVED_ARGS_NAME, CURVES_NAME)]
    return [p for p in named if p.exists()] + sorted(epochs, key=lambda p: (p.name[0], epochs[p]))


def check_output_dir(args: argparse.Namespace, run_kind: str) -> None:
    """Refuse, before anything is written, an --output_dir whose contents `run_kind` would destroy: a transformers
    model (the --checkpoint one too), or a run of either program unless --resume or --overwrite_output_dir."""
    from modeling import is_transformers_dir
    out, source = Path(args.output_dir), Path(args.checkpoint)
    if not out.is_dir():
        return
    if args.checkpoint.lower() != "none" and source.is_dir() and source.resolve() == out.resolve():
        raise UsageError(f"--output_dir {out} is the model directory given as --checkpoint: {run_kind} would write "
                         f"its own config.json over the model's; choose another --output_dir")
    if is_transformers_dir(out):
        raise UsageError(f"--output_dir {out} holds a transformers model (config.json): {run_kind} would write its "
                         f"own config.json over it; choose another --output_dir")
    run_files = files_of_a_run(out)
    shown = ", ".join(p.name for p in run_files[:3]) + (", ..." if len(run_files) > 3 else "")
    kind = ("pre-training" if any(PRETRAIN_CHECKPOINT_NAME.fullmatch(p.name) for p in run_files) else
            "training" if any(CHECKPOINT_NAME.fullmatch(p.name) for p in run_files) else run_kind)
    if run_files and not (args.resume or args.overwrite_output_dir):
        resume = "--resume to continue it, " if kind == run_kind else ""  # only its own program resumes a run
        raise UsageError(f"--output_dir {out} holds a {kind} run ({shown}); pass {resume}--overwrite_output_dir to "
                         f"replace it, or choose another --output_dir")
    # Without a checkpoint (killed before its first save: args and log only) a fresh start loses nothing.
    if args.resume and any(p.suffix == ".bin" for p in run_files) and not (out / STATE_NAME).is_file():
        # Starting afresh there would leave the old run's later checkpoints beside the new run's.
        raise UsageError(f"--resume: --output_dir {out} holds a {kind} run ({shown}) but no {STATE_NAME} to resume "
                         f"from; pass --overwrite_output_dir to replace it, or choose another --output_dir")
    if args.overwrite_output_dir and source.is_file() and source.resolve() in {p.resolve() for p in run_files}:
        raise UsageError(f"--checkpoint {source} is one of the files --overwrite_output_dir would delete from "
                         f"{out}; copy it elsewhere first or choose another --output_dir")


def remove_previous_run(output_dir: Path) -> None:
    """--overwrite_output_dir, once training starts: the old run's files go, so none is mistaken for the new run's."""
    old = files_of_a_run(output_dir) + sorted((output_dir / "tensorboard").glob("events.out.tfevents.*"))
    for path in old:
        path.unlink(missing_ok=True)
    if old:
        logger.info("--overwrite_output_dir: removed %d file(s) of the previous run in %s", len(old), output_dir)


def resolve_checkpoints(paths: Sequence[str | os.PathLike], flag: str = "--checkpoint") -> list[Path]:
    """Checkpoints for `--checkpoint` values: a file or a transformers model directory as it is, a
    hub model id downloaded (`fetch_hub_model`), a training run directory as its newest
    `korquad_N.bin` (highest N). Several make an ensemble. Errors name `flag`."""
    resolved = []
    for path in (Path(fetch_hub_model(str(value), flag)) for value in paths):
        if onnx_reader.find_export(path) is not None:
            resolved.append(path)
            continue
        if not path.exists():
            raise UsageError(f"{flag} {path}: file not found")
        try:
            from modeling import is_transformers_dir
        except ImportError:   # a deployment with only the ONNX requirements
            raise UsageError(f"{flag} {path} is not an ONNX export; a PyTorch checkpoint needs torch "
                             f"(pip install torch)") from None
        if is_transformers_dir(path):
            pass
        elif path.is_dir():
            newest = newest_run_checkpoint(path) or newest_pretraining_checkpoint(path)
            if newest is None:
                raise UsageError(f"{flag} {path}: a directory without any korquad_N.bin checkpoint, nor a "
                                 f"transformers model directory (pass a training run's output_dir, a checkpoint "
                                 f"file, or a directory with config.json and model.safetensors/pytorch_model.bin)")
            path = newest
        elif not path.is_file():
            raise UsageError(f"{flag} {path}: not a regular file")
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
                saved_args = parse_json(f.read())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UsageError(f"{run_dir / SAVED_ARGS_NAME}: not readable JSON ({err}); pass --vocab_file "
                             f"and --analyzer, or remove the file") from None
    if args.model_config is None:  # the run's copy, else the file it trained with, else the published one
        recorded = saved_args.get("model_config")
        args.model_config = str(next((path for path in (run_dir / SAVED_CONFIG_NAME, recorded)
                                      if isinstance(path, (str, Path)) and Path(path).is_file()), DEFAULT_CONFIG))
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


# Files a model directory (a training run, an ONNX export, a transformers model) is read from, each once.
MODEL_DIR_FILES = tuple(dict.fromkeys((SAVED_CONFIG_NAME, SAVED_ARGS_NAME, SAVED_VOCAB_NAME, *HUB_FILES,
                                       onnx_reader.SETTINGS_NAME, onnx_reader.MODEL_NAME, onnx_reader.INT8_MODEL_NAME)))


def checkpoint_inputs(checkpoint: str | os.PathLike) -> list[tuple[str, Path]]:
    """The files a `--checkpoint` value may be read from, as `refuse_output_over_input` takes them: the file
    itself, or a directory's checkpoints; the config, training arguments, vocab and ONNX files beside them;
    and the vocab and config its training_args.json names. Empty for a hub id or a missing path."""
    path = Path(checkpoint)
    directory = path if path.is_dir() else path.parent
    if not directory.is_dir():
        return []
    try:
        children = list(directory.iterdir()) if path.is_dir() else []
    except OSError:   # unreadable: loading it fails with its own message
        children = []
    files = [path] if path.is_file() else [child for child in children if CHECKPOINT_NAME.fullmatch(child.name)
                                            or PRETRAIN_CHECKPOINT_NAME.fullmatch(child.name)]
    files += [directory / name for name in MODEL_DIR_FILES]
    try:
        saved_args = parse_json((directory / SAVED_ARGS_NAME).read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError):
        saved_args = None   # unreadable: settings_from_run_dir says so, if the run is read at all
    if isinstance(saved_args, dict):
        files += [Path(value) for value in (saved_args.get("vocab_file"), saved_args.get("model_config"))
                  if isinstance(value, str)]
    return [(f"a file of --checkpoint {checkpoint},", file) for file in files if file.is_file()]


def model_inputs(args: argparse.Namespace) -> list[tuple[str, str | os.PathLike | None]]:
    """The model files a run reads, as `refuse_output_over_input` takes them: every --checkpoint and the
    files read with it (`checkpoint_inputs`), --model_config and --vocab_file, and the default config and
    vocab that stand in for them (`args.checkpoint` a list, as eval.py and predict.py parse it)."""
    return [*(("--checkpoint", path) for path in args.checkpoint),
            *(entry for path in args.checkpoint for entry in checkpoint_inputs(path)),
            ("--model_config", args.model_config), ("--vocab_file", args.vocab_file),
            ("the default --model_config", DEFAULT_CONFIG), ("the default --vocab_file", DEFAULT_VOCAB)]


def fetch_hub_model(checkpoint: str, flag: str = "--checkpoint") -> str:
    """A local path as it is; a hub model id (not a local path) downloaded with huggingface_hub into its cache."""
    if Path(checkpoint).exists() or not HUB_MODEL_ID.fullmatch(checkpoint) or checkpoint.endswith(
            (".bin", ".pt", ".pth", ".safetensors")):
        return checkpoint
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UsageError(f"{flag} {checkpoint}: no such file or directory; to use the hub model of that name, "
                         f"pip install huggingface_hub, or git clone https://huggingface.co/{checkpoint} and pass "
                         f"the directory") from None
    logger.info("downloading %s from the model hub", checkpoint)
    try:
        return _download_while_progressing(checkpoint, flag, lambda: snapshot_download(
            repo_id=checkpoint, allow_patterns=list(HUB_FILES)))
    except UsageError:
        raise
    except Exception as err:  # network, authentication and not-found errors come in many types
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise UsageError(f"{flag} {checkpoint}: not a local path, and the hub download failed ({message})"
                         ) from None


# huggingface_hub asks for a repository's file list without any timeout: an endpoint that accepts
# the connection and never answers would hang the run forever. Give up after this long without a
# byte arriving in the download's cache folder (a slow but moving download goes on).
HUB_STALL_SECONDS = 60.0


def _download_while_progressing(checkpoint: str, flag: str, download: Callable[[], str]) -> str:
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
            raise UsageError(f"{flag} {checkpoint}: {endpoint} sent nothing for "
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
        # tokenizer.json alone is what transformers 5 saves; read_vocab_tokens reads its WordPiece vocab.
        vocab = next((model_dir / name for name in (SAVED_VOCAB_NAME, TOKENIZER_JSON) if (model_dir / name).is_file()),
                     None)
        if vocab is None:
            raise UsageError(f"--checkpoint {model_dir}: no vocab.txt nor tokenizer.json in the model directory; "
                             f"pass --vocab_file")
        args.vocab_file = str(vocab)
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
    newest checkpoint file, as does one pretrain_N.bin or korquad_N.bin of a run; otherwise the flags or the
    published model's)."""
    from modeling import Config, is_transformers_dir

    # train.py's parse_args has already refused any other directory (check_checkpoint_file).
    if checkpoint.lower() != "none" and is_transformers_dir(checkpoint):
        return settings_from_model_dir(args, checkpoint)
    newest = newest_pretraining_checkpoint(checkpoint) if checkpoint.lower() != "none" else None
    if newest is not None:  # a pretrain.py run: its newest encoder, with the run's config and vocab
        args.checkpoint = str(newest)
        settings_from_run_dir(args, newest.parent)
        return Config.from_json_file(args.model_config)
    file = Path(checkpoint)
    if ((CHECKPOINT_NAME.fullmatch(file.name) or PRETRAIN_CHECKPOINT_NAME.fullmatch(file.name))
            and (file.parent / SAVED_ARGS_NAME).is_file()):   # one checkpoint of a run: the run's settings
        settings_from_run_dir(args, file.parent)
        logger.info("--checkpoint %s: config %s, vocab %s, analyzer %s from its run", checkpoint, args.model_config,
                    args.vocab_file, args.analyzer)
        return Config.from_json_file(args.model_config)
    args.model_config = args.model_config or str(DEFAULT_CONFIG)
    args.vocab_file = args.vocab_file or str(DEFAULT_VOCAB)
    args.do_lower_case = True  # the published vocab is uncased
    args.analyzer = args.analyzer or "mecab"
    return Config.from_json_file(args.model_config)


def copy_vocab_into(vocab_file: str | os.PathLike, directory: Path) -> None:
    """Copy the vocab into a run or model directory as vocab.txt (atomically), so it works once moved
    (a tokenizer.json's vocab is written one token a line)."""
    target = directory / SAVED_VOCAB_NAME
    if Path(vocab_file).resolve() != target.resolve():
        data = vocab_file_bytes(vocab_file)
        atomic_write(target, lambda file: file.write(data))

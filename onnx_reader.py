"""A reader exported by `export.py --format onnx`, run by ONNX Runtime: no torch anywhere on this path.

An export directory holds `model.onnx` (and `model_int8.onnx` with `--quantize int8`), `vocab.txt`
and `onnx_reader.json` (tokenizer, analyzer, window and no-answer settings, and each model's size and
CRC-32, checked when it is loaded: a truncated, damaged or half-replaced model is refused by name;
the settings file is written last, so a killed export never leaves one describing models it did not
write). The model's inputs are int64
`input_ids`, `token_type_ids` and `attention_mask` (batch, sequence), its outputs float32
`start_logits` and `end_logits` (batch, sequence): the names transformers and optimum use.

`find_export` recognises a directory or one of its .onnx files, `read_settings` reads the JSON,
`OnnxReaderModel` answers the same `predict_logits` call as a PyTorch model through scoring.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from feature_table import FeatureTable
from korquad_utils import collate_features, make_length_grouped_batches
from squad_examples import parse_json

logger = logging.getLogger("korquad")

SETTINGS_NAME = "onnx_reader.json"
MODEL_NAME = "model.onnx"
INT8_MODEL_NAME = "model_int8.onnx"
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")
FORMAT = "korquad-onnx-reader"
FORMAT_VERSION = 2
# Version 1 (before the no-answer settings and model checksums) reads as a version-1 model: never abstaining.
READABLE_VERSIONS = (1, 2)


class OnnxExportError(ValueError):
    """An ONNX export that cannot be used (missing runtime, damaged settings); the message says why."""


@dataclass
class ExportSettings:
    """What `onnx_reader.json` records besides the model: enough to tokenize and window text as in training.

    It carries `vocab_size` and `max_position_embeddings` under the model config's names, so the
    checks that take a model config (cli.check_data_args, checkpoints.build_tokenizer) take it too, and
    the no-answer decision eval.py and predict.py make for the training run (--version_2_with_negative,
    --null_score_diff_threshold), which they make for the export where their flags do not say otherwise."""
    vocab_size: int
    max_position_embeddings: int
    do_lower_case: bool
    analyzer: str
    max_seq_length: int
    doc_stride: int
    max_query_length: int
    max_answer_length: int
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0
    # {file name: {"bytes": size, "crc32": checksum}} of the models written with these settings.
    models: dict[str, dict[str, int]] = field(default_factory=dict)
    # How model_int8.onnx was quantized and for which CPUs (INT8_TARGETS); empty without one.
    quantization: dict[str, str | bool] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self), "inputs": list(INPUT_NAMES),
                "outputs": list(OUTPUT_NAMES)}


def model_digest(data: bytes) -> dict[str, int]:
    """What onnx_reader.json records of one model file: its size and CRC-32 (about 1 GB/s: a cheap check at load)."""
    return {"bytes": len(data), "crc32": zlib.crc32(data)}


def find_export(path: str | os.PathLike) -> Path | None:
    """The export directory `path` names (the directory itself, or the directory of one of its .onnx
    files), or None when `path` is not an ONNX export. A .onnx file, or a directory of our model files
    (and no config.json of another format), without onnx_reader.json beside it is an OnnxExportError."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent if path.suffix == ".onnx" and path.is_file() else None
    if directory is None or (directory / SETTINGS_NAME).is_file():
        return directory
    if path.is_file() or (any((directory / name).is_file() for name in (MODEL_NAME, INT8_MODEL_NAME))
                          and not (directory / "config.json").is_file()):
        raise OnnxExportError(f"--checkpoint {path}: an ONNX export without its {SETTINGS_NAME} (copied in part?); "
                              f"export it again with export.py --format onnx")
    return None


def model_file(path: str | os.PathLike) -> Path:
    """The .onnx file to run for `path`: that file, or a directory's fp32 `model.onnx`."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_NAME
        if not path.is_file():
            raise OnnxExportError(f"--checkpoint {path.parent}: no {MODEL_NAME} in the ONNX export directory")
    return path


def read_settings(export_dir: Path) -> ExportSettings:
    """The export's `onnx_reader.json`, checked field by field."""
    source = export_dir / SETTINGS_NAME
    try:
        raw = parse_json(source.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnnxExportError(f"{source}: not readable JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise OnnxExportError(f"{source}: not an export.py --format onnx settings file (\"format\" is not {FORMAT!r})")
    version = raw.get("version")
    if version not in READABLE_VERSIONS:
        raise OnnxExportError(f"{source}: version {version!r}; this toolkit reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))} (export it again with this export.py)")
    values = {}
    for setting in fields(ExportSettings):
        if setting.name not in raw and (setting.name in OPTIONAL_FIELDS or
                                        version == 1 and setting.name in VERSION_2_FIELDS):
            continue  # its default: a version-1 export never abstains and records no checksums
        value = raw.get(setting.name)
        problem = SETTING_CHECKS[setting.type](value)
        if problem:
            raise OnnxExportError(f"{source}: \"{setting.name}\" must be {problem}, got {value!r}")
        values[setting.name] = value
    settings = ExportSettings(**values)
    # Checked here, naming the file: cli.check_data_args would blame flags the user never gave.
    window = settings.max_seq_length - settings.max_query_length - 3
    if not (settings.max_seq_length <= settings.max_position_embeddings and window >= 1 and settings.doc_stride >= 1):
        raise OnnxExportError(f"{source}: its windows (max_seq_length {settings.max_seq_length}, max_query_length "
                              f"{settings.max_query_length}, doc_stride {settings.doc_stride}) do not fit "
                              f"max_position_embeddings {settings.max_position_embeddings} with [CLS]/[SEP]/[SEP]; "
                              f"export it again with export.py --format onnx")
    return settings


VERSION_2_FIELDS = ("version_2_with_negative", "null_score_diff_threshold", "models")
# Added within version 2: exports written before it lack it.
OPTIONAL_FIELDS = ("quantization",)


def _model_records_problem(value: object) -> str | None:
    is_count = lambda number: isinstance(number, int) and not isinstance(number, bool) and number >= 0  # noqa: E731
    if isinstance(value, dict) and all(
            isinstance(record, dict) and set(record) == {"bytes", "crc32"} and all(map(is_count, record.values()))
            for record in value.values()):
        return None
    return 'an object of {"bytes": N, "crc32": N} per model file'


# Why a setting's JSON value is unusable (None: it is fine), by the field's annotation.
SETTING_CHECKS = {
    "int": lambda value: None if isinstance(value, int) and not isinstance(value, bool) and value >= 1
    else "a positive whole number",
    "bool": lambda value: None if isinstance(value, bool) else "true or false",
    "str": lambda value: None if isinstance(value, str) else "a string",
    "float": lambda value: None if isinstance(value, (int, float)) and not isinstance(value, bool)
    and math.isfinite(value) else "a finite number",
    "dict[str, dict[str, int]]": _model_records_problem,
    "dict[str, str | bool]": lambda value: None if isinstance(value, dict) and all(
        isinstance(key, str) and isinstance(item, (str, bool)) for key, item in value.items())
    else "an object of strings and true/false values",
}


# The int8 matrix instructions ONNX Runtime's u8 x s8 kernels run on, and whether an export for them needs
# 7-bit weights (reduce_range): without VNNI, x86 multiplies u8 by s8 pairs and adds them in 16 bits
# (vpmaddubsw), which saturates for large activations and weights; VNNI and AMX add in 32 bits.
INT8_TARGETS = {"vnni": False, "avx2": True}


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU as /proc/cpuinfo lists them (empty where it does not)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cpu_int8_target() -> str:
    """This CPU's INT8_TARGETS entry: "vnni" with AVX-512 VNNI, AVX-VNNI or AMX, "avx2" for x86 without them,
    and "vnni" where no x86 flags are listed (ARM's dot-product kernels add in 32 bits too)."""
    flags = cpu_flags()
    if not flags or flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "vnni"
    return "avx2"


def check_model_bytes(path: Path, data: bytes, settings: ExportSettings) -> None:
    """Refuse a model file that is not the one export.py recorded beside it (cut short, damaged, or
    left from another export); a file of another name (a user's own), or beside version-1 settings
    (which record none), is taken as it is."""
    recorded = settings.models.get(path.name)
    if recorded is None and settings.models and path.name in (MODEL_NAME, INT8_MODEL_NAME):
        raise OnnxExportError(f"--checkpoint {path}: {SETTINGS_NAME} does not list it, so it is left from an "
                              f"earlier export (the last one wrote {', '.join(sorted(settings.models))}); export "
                              f"again, or remove it")
    found = model_digest(data)
    if recorded is not None and found != recorded:
        what = (f"{found['bytes']} bytes, {SETTINGS_NAME} records {recorded['bytes']}"
                if found["bytes"] != recorded["bytes"] else f"its CRC-32 is not the one {SETTINGS_NAME} records")
        raise OnnxExportError(f"--checkpoint {path}: not the model export.py wrote ({what}): truncated, damaged "
                              f"or from an interrupted export; export it again")


def apply_no_answer_settings(args: argparse.Namespace, settings: ExportSettings) -> None:
    """The export's no-answer decision into `args` where the flags leave it open, as checkpoints does for a
    training run: --version_2_with_negative not given (None) takes the export's, and so does
    --null_score_diff_threshold unless `args.explicit_flags` (required: the flags given) names it."""
    explicit = getattr(args, "explicit_flags", None)
    if not isinstance(explicit, set):   # a guess from the value would take a threshold of 0 given as not given
        raise TypeError("apply_no_answer_settings needs args.explicit_flags, the flags given "
                        "(checkpoints.explicit_flags)")
    if getattr(args, "version_2_with_negative", False) is None:
        args.version_2_with_negative = settings.version_2_with_negative
    if args.version_2_with_negative and "null_score_diff_threshold" not in explicit:
        args.null_score_diff_threshold = settings.null_score_diff_threshold


def physical_cores() -> int:
    """CPU cores this process may run on, hyper-threads counted once: ONNX Runtime's matmuls gain
    nothing from a core's second thread and lose to the contention."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def require_onnxruntime(what: str) -> None:
    """Refuse in one line, before any work, when ONNX Runtime is not installed."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise OnnxExportError(f"{what} needs ONNX Runtime: pip install -r requirements-onnx.txt")


# export.py writes Add + LayerNormalization where ORT would fuse a SkipLayerNormalization: its CPU kernel
# was the slower (onnxruntime 1.32: int8 batches 1.2x faster unfused, fp32 about 5%).
UNFUSED_OPTIMIZERS = ["SkipLayerNormFusion"]


def open_session(path: Path, threads: int = 1, model_bytes: bytes | None = None,
                 profile_prefix: str | None = None):
    """An `onnxruntime.InferenceSession` on the CPU with every graph optimisation but UNFUSED_OPTIMIZERS and
    `threads` threads of its own for each run (of `model_bytes` when given, else of the file; `path` names it
    in messages); with `profile_prefix`, ONNX Runtime's profiler writes there."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxExportError(f"--checkpoint {path} is an ONNX model, which needs ONNX Runtime: "
                              f"pip install -r requirements-onnx.txt") from None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # its warnings about serialising optimised graphs say nothing to a user
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        session = onnxruntime.InferenceSession(str(path) if model_bytes is None else model_bytes, options,
                                               providers=["CPUExecutionProvider"],
                                               disabled_optimizers=UNFUSED_OPTIMIZERS)
    except Exception as err:  # onnxruntime raises its own types for damaged or foreign files
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise OnnxExportError(f"--checkpoint {path}: ONNX Runtime cannot load it ({message})") from None
    names = [tensor.name for tensor in session.get_inputs()], [tensor.name for tensor in session.get_outputs()]
    if names != (list(INPUT_NAMES), list(OUTPUT_NAMES)):
        raise OnnxExportError(f"--checkpoint {path}: inputs {names[0]} and outputs {names[1]}, expected "
                              f"{list(INPUT_NAMES)} and {list(OUTPUT_NAMES)} (export it with export.py --format onnx)")
    return session


# Windows per session run. ONNX Runtime's CPU attention holds every head's scores of a whole run at once
# (8 heads x 251 x 251 floats is 2 MB a window): past one or two windows they fall out of the caches, and
# int8 BERT-small ran 1.2x faster one window at a time than in runs of 8 (`bench.py --only predict`). One
# window a run also needs no padding, and makes int8 answers independent of the other questions asked
# alongside (dynamic quantization scales each run by its own activations).
WINDOWS_PER_RUN = 1


class OnnxReaderModel:
    """One exported model in an ONNX Runtime session, answering batches of features.

    Runs go side by side, one per physical core, each on one thread: a window's operators are too small to
    split over cores without the threads waiting on each other (int8 BERT-small, 2-core Zen 4: 70 windows/s
    side by side, 42-64 from one run at a time on two threads; `bench.py --only predict`). One thread a run
    also keeps every answer the same whatever the number of cores."""

    def __init__(self, path: str | os.PathLike, workers: int | None = None, windows_per_run: int = WINDOWS_PER_RUN):
        self.path = model_file(path)
        self.windows_per_run = windows_per_run
        self.workers = workers or physical_cores()
        export_dir = find_export(self.path)
        try:
            data = self.path.read_bytes()
        except OSError as err:
            raise OnnxExportError(f"--checkpoint {self.path}: cannot read it ({err.strerror or err})") from None
        if export_dir is not None:
            settings = read_settings(export_dir)
            check_model_bytes(self.path, data, settings)
            target = settings.quantization.get("for") if self.path.name == INT8_MODEL_NAME else None
            if target in INT8_TARGETS and not INT8_TARGETS[target] and INT8_TARGETS[cpu_int8_target()]:
                logger.warning("%s was quantized for CPUs with VNNI; this one has none, and its int8 products "
                               "can saturate here: export again with --quantize int8 --int8_for avx2", self.path)
        self.session = open_session(self.path, model_bytes=data)
        logger.info("loaded ONNX model %s (%d runs side by side)", self.path, self.workers)

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Start and end logits (batch, width) for one collated batch of int64 arrays."""
        start_logits, end_logits = self.session.run(OUTPUT_NAMES, {name: batch[name] for name in INPUT_NAMES})
        return start_logits, end_logits

    def predict_logits(self, features: FeatureTable, batch_size: int,
                       show_progress: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits of every window, in order, as scoring.predict_logits gives them: runs of
        at most `windows_per_run` (and `batch_size`) length-grouped windows, each padded to its longest."""
        lengths = features.lengths
        starts: list[np.ndarray] = [np.empty(0, np.float32)] * len(features)
        ends: list[np.ndarray] = [np.empty(0, np.float32)] * len(features)
        runs = make_length_grouped_batches(lengths, min(batch_size, self.windows_per_run), shuffle=False)

        def answer(batch: list[int]) -> tuple[list[int], tuple[np.ndarray, np.ndarray]]:
            return batch, self.run(collate_features(features, batch, is_training=False))

        # One worker thread per core; the runs' results come back in order.
        workers = min(self.workers, len(runs))
        pool = ThreadPoolExecutor(workers, thread_name_prefix="onnx-run") if workers > 1 else None
        try:
            answered = pool.map(answer, runs) if pool is not None else map(answer, runs)
            for batch, (start_logits, end_logits) in tqdm(
                    answered, total=len(runs), desc="predict", disable=not show_progress,
                    unit="window" if self.windows_per_run == 1 else "batch"):
                for row, index in enumerate(batch):
                    starts[index], ends[index] = start_logits[row, :lengths[index]], end_logits[row, :lengths[index]]
        finally:
            if pool is not None:   # a failed run (or Ctrl-C) starts no more of them
                pool.shutdown(cancel_futures=True)
        return starts, ends

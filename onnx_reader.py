"""A reader exported by `export.py --format onnx`, run by ONNX Runtime: no torch anywhere on this path.

An export directory holds `model.onnx` (and `model_int8.onnx` with `--quantize int8`), `vocab.txt`
and `onnx_reader.json` (tokenizer, analyzer and window settings). The model's inputs are int64
`input_ids`, `token_type_ids` and `attention_mask` (batch, sequence), its outputs float32
`start_logits` and `end_logits` (batch, sequence): the names transformers and optimum use.

`find_export` recognises a directory or one of its .onnx files, `read_settings` reads the JSON,
`OnnxReaderModel` answers the same `predict_logits` call as a PyTorch model through cli_common.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from korquad_utils import FeatureTable, collate_features, make_length_grouped_batches

logger = logging.getLogger("korquad")

SETTINGS_NAME = "onnx_reader.json"
MODEL_NAME = "model.onnx"
INT8_MODEL_NAME = "model_int8.onnx"
INPUT_NAMES = ("input_ids", "token_type_ids", "attention_mask")
OUTPUT_NAMES = ("start_logits", "end_logits")
FORMAT = "korquad-onnx-reader"
FORMAT_VERSION = 1


class OnnxExportError(ValueError):
    """An ONNX export that cannot be used (missing runtime, damaged settings); the message says why."""


@dataclass
class ExportSettings:
    """What `onnx_reader.json` records besides the model: enough to tokenize and window text as in training.

    It carries `vocab_size` and `max_position_embeddings` under the model config's names, so the
    checks that take a model config (cli_common.check_data_args, build_tokenizer) take it too."""
    vocab_size: int
    max_position_embeddings: int
    do_lower_case: bool
    analyzer: str
    max_seq_length: int
    doc_stride: int
    max_query_length: int
    max_answer_length: int

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, **asdict(self), "inputs": list(INPUT_NAMES),
                "outputs": list(OUTPUT_NAMES)}


def find_export(path: str | os.PathLike) -> Path | None:
    """The export directory `path` names (the directory itself, or the directory of one of its .onnx
    files), or None when `path` is not an ONNX export."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent if path.suffix == ".onnx" and path.is_file() else None
    return directory if directory is not None and (directory / SETTINGS_NAME).is_file() else None


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
        raw = json.loads(source.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OnnxExportError(f"{source}: not readable JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise OnnxExportError(f"{source}: not an export.py --format onnx settings file (\"format\" is not {FORMAT!r})")
    if raw.get("version") != FORMAT_VERSION:
        raise OnnxExportError(f"{source}: version {raw.get('version')!r}; this toolkit reads version {FORMAT_VERSION}")
    values = {}
    for field in fields(ExportSettings):
        kind = {"int": int, "bool": bool, "str": str}[field.type]
        value = raw.get(field.name)
        if not isinstance(value, kind) or (kind is int and (isinstance(value, bool) or value < 1)):
            wanted = "positive whole number" if kind is int else kind.__name__
            raise OnnxExportError(f"{source}: \"{field.name}\" must be a {wanted}, got {value!r}")
        values[field.name] = value
    return ExportSettings(**values)


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


def open_session(path: Path, threads: int | None = None, model_bytes: bytes | None = None):
    """An `onnxruntime.InferenceSession` on the CPU with every graph optimisation but UNFUSED_OPTIMIZERS and
    one thread per physical core (of `model_bytes` when given, else of the file; `path` names it in messages)."""
    try:
        import onnxruntime
    except ImportError:
        raise OnnxExportError(f"--checkpoint {path} is an ONNX model, which needs ONNX Runtime: "
                              f"pip install -r requirements-onnx.txt") from None
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # its warnings about serialising optimised graphs say nothing to a user
    try:
        session = onnxruntime.InferenceSession(model_bytes or str(path), options, providers=["CPUExecutionProvider"],
                                               disabled_optimizers=UNFUSED_OPTIMIZERS)
    except Exception as err:  # onnxruntime raises its own types for damaged or foreign files
        message = " ".join(str(err).split())[:300] or type(err).__name__
        raise OnnxExportError(f"--checkpoint {path}: ONNX Runtime cannot load it ({message})") from None
    names = [tensor.name for tensor in session.get_inputs()], [tensor.name for tensor in session.get_outputs()]
    if names != (list(INPUT_NAMES), list(OUTPUT_NAMES)):
        raise OnnxExportError(f"--checkpoint {path}: inputs {names[0]} and outputs {names[1]}, expected "
                              f"{list(INPUT_NAMES)} and {list(OUTPUT_NAMES)} (export it with export.py --format onnx)")
    return session


class OnnxReaderModel:
    """One exported model in an ONNX Runtime session, answering batches of features."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = model_file(path)
        self.session = open_session(self.path, threads)
        logger.info("loaded ONNX model %s (%d threads)", self.path,
                    self.session.get_session_options().intra_op_num_threads)

    def run(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Start and end logits (batch, width) for one collated batch of int64 arrays."""
        start_logits, end_logits = self.session.run(OUTPUT_NAMES, {name: batch[name] for name in INPUT_NAMES})
        return start_logits, end_logits

    def predict_logits(self, features: FeatureTable, batch_size: int,
                       show_progress: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Start and end logits of every window, in order, as cli_common.predict_logits gives them:
        length-grouped batches, each padded to its own longest window."""
        lengths = features.lengths
        starts: list[np.ndarray] = [np.empty(0, np.float32)] * len(features)
        ends: list[np.ndarray] = [np.empty(0, np.float32)] * len(features)
        for batch in tqdm(make_length_grouped_batches(lengths, batch_size, shuffle=False), desc="predict",
                          unit="batch", disable=not show_progress):
            start_logits, end_logits = self.run(collate_features(features, batch, is_training=False))
            for row, index in enumerate(batch):
                starts[index], ends[index] = start_logits[row, :lengths[index]], end_logits[row, :lengths[index]]
        return starts, ends

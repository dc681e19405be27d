"""What every row of bench.py shares: the registry of rows, the paths of the data they read, the dev-set
features built once per process, the median timer, and the provenance lines printed before the figures."""
from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[1]
DEV_CANDIDATES = (ROOT / "data" / "KorQuAD_v1.0_dev.json",
                  ROOT.parent / "shared" / "data" / "KorQuAD_v1.0_dev.json")
VOCAB_FILE = ROOT / "data" / "ko_vocab_32k.txt"

PREDICT_QUESTIONS = 64   # the first dev questions (with their real, shared contexts) predict's rows answer

BENCHMARKS: dict[str, Callable[[argparse.Namespace], None]] = {}


def benchmark(name: str):
    """Register a benchmark under `name` (bench.py runs them in its own ORDER)."""
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


def skipped_without(row: str, *modules: str) -> bool:
    """Whether `row` cannot run because one of `modules` cannot be imported; if so, it says so in one line
    (checked first in the row, before any of its work)."""
    import importlib

    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        needed = "it is" if len(missing) == 1 else "they are"
        print(f"{row}: skipped (pip install {' '.join(missing)}; {needed} needed for this benchmark only)")
    return bool(missing)


def dev_contexts(dev_file: Path) -> list[str]:
    """The distinct paragraph contexts of a KorQuAD file, in file order."""
    import json

    with open(dev_file, encoding="utf-8") as handle:
        articles = json.load(handle)["data"]
    contexts = (paragraph["context"] for article in articles for paragraph in article["paragraphs"])
    return list(dict.fromkeys(contexts))


def dev_questions(dev_file: Path, count: int) -> list[dict]:
    """The first `count` questions of a KorQuAD file as predict.py's input records."""
    from korquad_utils import read_squad_examples

    examples = read_squad_examples(dev_file, is_training=False)[:count]
    return [{"id": e.qas_id, "question": e.question_text, "context": e.context_text} for e in examples]


def write_random_run(run: Path, config) -> None:
    """A training run directory holding `config` and one randomly initialised fine-tuned checkpoint."""
    import json

    import torch

    from modeling import QuestionAnswering

    (run / "config.json").write_text(json.dumps(config.to_dict()))
    torch.manual_seed(0)
    torch.save(QuestionAnswering(config).state_dict(), run / "korquad_1.bin")


def export_onnx_beside(reader, run: Path) -> Path:
    """`reader`'s model exported to ONNX (fp32 and int8, in its windows) as run/onnx."""
    import export
    import onnx_reader

    config, onnx_dir = reader.models[0].config, run / "onnx"
    onnx_dir.mkdir()
    export.export_onnx(reader.models[0], VOCAB_FILE, onnx_reader.ExportSettings(
        vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings, do_lower_case=True,
        analyzer="mecab", **{name: getattr(reader, name) for name in export.DEFAULT_WINDOWS}), onnx_dir,
        quantize=True)
    return onnx_dir


# --- features, decoding, oracle (issue 4) ------------------------------------------------
# Dev set at 512 / 128 / 96 with Mecab; times are the median of 3 runs, each with a fresh tokenizer.
KQ_SETTINGS = {"max_seq_length": 512, "doc_stride": 128, "max_query_length": 96}
_KQ_RUNS = 3
_kq_built: dict = {}


def kq_tokenizer():
    from tokenization import BertTokenizer
    return BertTokenizer(str(VOCAB_FILE), analyzer="mecab", do_lower_case=True)


def kq_median_seconds(run: Callable[[], object], prepare: Callable[[], object] = lambda: None) -> float:
    """Median wall time of `run(prepare())` over _KQ_RUNS runs; `prepare` is not timed."""
    import statistics
    import time
    seconds = []
    for _ in range(_KQ_RUNS):
        prepared = prepare()
        began = time.perf_counter()
        run(prepared)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def kq_dev_features(dev: Path):
    """Training-mode dev examples and features (gold positions for the oracle), built once."""
    if dev not in _kq_built:
        from korquad_utils import convert_examples_to_features, read_squad_examples
        examples = read_squad_examples(dev, is_training=True)
        features = convert_examples_to_features(examples, kq_tokenizer(), is_training=True, progress=False,
                                                **KQ_SETTINGS)
        _kq_built[dev] = examples, features
    return _kq_built[dev]


def print_provenance() -> None:
    """What every figure depends on, printed once before the benchmarks (docs/measurements.md records it per row)."""
    import datetime
    import importlib.metadata
    import os
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # the first core's lines are enough: every core has the same model
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or "unknown"
    cpu_flags = set(fields.get("flags", "").split())
    # The instruction sets that decide matmul speed: AVX2, AVX-512, VNNI (int8), AMX (bf16/int8 tiles).
    speed_flags = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                   if flag in cpu_flags]
    versions = []
    for package in ("torch", "onnxruntime", "transformers", "numpy"):
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            version = None
        # Installed metadata does not make a package importable (removed files, a blocked import): the rows
        # that need it are then skipped, and its version is not one any figure was measured with.
        importable = _importable(package)
        if version is None and not importable:
            versions.append(f"{package} not installed")
        elif not importable:
            versions.append(f"{package} not importable ({version} installed)")
        else:
            versions.append(f"{package} {version or '(no version metadata)'}")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"provenance.date: {datetime.date.today().isoformat()}")
    print(f"provenance.cpu: {model}, {os.cpu_count()} logical cores, "
          f"flags: {' '.join(speed_flags) or 'none of avx2/avx512/amx'}")
    print(f"provenance.versions: {', '.join(versions)}, python {platform.python_version()}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch
        torch_threads = str(torch.get_num_threads())
    except ImportError:
        torch_threads = "no torch"
    print(f"provenance.threads: torch {torch_threads}, OMP_NUM_THREADS={threads}, usable cores {usable}")


def _importable(module: str) -> bool:
    """Whether `module` can be found for import, without importing it."""
    import importlib.util
    import sys

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: already imported, without a spec (so it is importable)
        return module in sys.modules and sys.modules[module] is not None

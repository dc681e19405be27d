"""Shared test fixtures: where the real data lives, and skipping cleanly where it does not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB_FILE = ROOT / "data" / "ko_vocab_32k.txt"
CONFIG_FILE = ROOT / "data" / "bert_small.json"
SAMPLE_FILE = ROOT / "data" / "korquad_sample.json"   # bundled: every fresh clone has it
DEV_CANDIDATES = (
    ROOT.parent / "shared" / "data" / "KorQuAD_v1.0_dev.json",
    ROOT / "data" / "KorQuAD_v1.0_dev.json",
)


def find_dev_file() -> Path | None:
    """The real KorQuAD v1.0 dev set, if this checkout has one beside it or in data/."""
    return next((p for p in DEV_CANDIDATES if p.is_file()), None)


@pytest.fixture(scope="session")
def dev_file() -> Path:
    path = find_dev_file()
    if path is None:
        pytest.skip("KorQuAD_v1.0_dev.json not found in ../shared/data/ or data/ "
                    "(run `python3 download.py` to fetch it)")
    return path


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    return VOCAB_FILE


@pytest.fixture(scope="session")
def config_file() -> Path:
    return CONFIG_FILE


TINY_CONFIG = dict(act_fn="gelu", dropout_prob=0.0, ff_dim=128, hidden_size=64, initializer_range=0.02,
                   max_position_embeddings=512, num_heads=4, num_hidden_layers=2, type_vocab_size=2,
                   vocab_size=32000)
# The baseline's data flags, at lengths that keep a CPU test quick.
DATA_FLAGS = ["--max_seq_length=192", "--max_query_length=32", "--max_answer_length=30", "--doc_stride=64"]


def run_script(script: str, *flags: str, env: dict | None = None, timeout: int = 300,
               input: str | None = None) -> subprocess.CompletedProcess:
    """Run one of the project's scripts as a user would, capturing its output."""
    return subprocess.run([sys.executable, str(ROOT / script), *flags], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})}, input=input)


# Python's own warning filters for a script (pytest records warnings instead of printing them), less the one
# that shows the script's own DeprecationWarnings.
SCRIPT_WARNING_FILTERS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def run_in_process(script: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """What run_script returns, with the script run as `__main__` in this process: the same argv, working
    directory, environment, stdout, stderr (its logging, warnings and progress bars included) and exit status,
    without a process start (about 1.5 s, mostly torch's import) that would cost more than the check. For runs
    that stop at a user error; tests/test_hardening.py keeps real processes for each command's exit contract."""
    import contextlib
    import io
    import logging
    import runpy
    import warnings

    root_logger = logging.getLogger()
    saved_logging = root_logger.handlers[:], root_logger.level
    saved_environ, saved_argv, saved_cwd = dict(os.environ), sys.argv[:], os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()
    returncode = 0
    try:
        root_logger.handlers.clear()  # so the script's logging.basicConfig sets up its stderr as it would
        # A process whose output is a pipe formats help and usage at COLUMNS, else 80 wide; this one may have a tty.
        os.environ.setdefault("COLUMNS", "80")
        os.environ.update(env or {})
        sys.argv = [str(ROOT / script), *flags]
        os.chdir(ROOT)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.resetwarnings()
            for category in SCRIPT_WARNING_FILTERS:
                warnings.simplefilter("ignore", category)
            warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                runpy.run_path(str(ROOT / script), run_name="__main__")
            except SystemExit as stop:
                if stop.code is None or isinstance(stop.code, int):
                    returncode = stop.code or 0
                else:
                    print(stop.code, file=sys.stderr)
                    returncode = 1
    finally:
        for handler in root_logger.handlers:
            handler.close()
        root_logger.handlers[:], root_logger.level = saved_logging
        os.environ.clear()
        os.environ.update(saved_environ)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess([sys.executable, str(ROOT / script), *flags], returncode, stdout.getvalue(),
                                       stderr.getvalue())


def write_subset(source: Path, path: Path, num_questions: int, skip_paragraphs: int = 0) -> list[str]:
    """The first `num_questions` questions of a KorQuAD file (whole paragraphs), as a KorQuAD file."""
    dataset = json.loads(source.read_text(encoding="utf-8"))
    paragraphs, ids = [], []
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            if skip_paragraphs:
                skip_paragraphs -= 1
                continue
            if len(ids) >= num_questions:
                break
            qas = paragraph["qas"][: num_questions - len(ids)]
            paragraphs.append({"context": paragraph["context"], "qas": qas})
            ids += [qa["id"] for qa in qas]
    path.write_text(json.dumps({"version": dataset["version"], "data": [{"title": "subset", "paragraphs": paragraphs}]},
                               ensure_ascii=False), encoding="utf-8")
    return ids


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> Path:
    """A tiny config (`tiny.json`), a pretrained-format encoder checkpoint (`pretrained.bin`) and
    24 questions of the bundled sample (`train.json`): what training tests need, in any clone."""
    import torch

    from modeling import Config, QuestionAnswering

    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).bert.state_dict(), root / "pretrained.bin")
    write_subset(SAMPLE_FILE, root / "train.json", 24)
    return root


def sample_texts() -> list[str]:
    """Every context, question and answer of the bundled sample."""
    dataset = json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))
    texts = []
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            texts.append(paragraph["context"])
            for qa in paragraph["qas"]:
                texts += [qa["question"], *(answer["text"] for answer in qa.get("answers", []))]
    return texts


def write_sample_vocab(path: Path) -> Path:
    """The real vocab cut to the special tokens and the pieces the bundled sample needs under the
    `none` and `mecab` analyzers, in the real order. Greedy longest-match WordPiece keeps every
    piece it picked from the full vocab and finds no longer one, so it cuts the same pieces; a
    tiny model's 32k-row embedding (most of its weights and of each optimizer step) shrinks to ~1k."""
    from tokenization import SPECIAL_TOKENS, BertTokenizer, read_vocab_tokens

    used, texts = set(SPECIAL_TOKENS), sample_texts()
    for analyzer in ("none", "mecab"):
        tokenizer = BertTokenizer(VOCAB_FILE, analyzer=analyzer)
        for text in texts:
            used.update(tokenizer.tokenize(text))
    path.write_text("".join(f"{token}\n" for token in read_vocab_tokens(VOCAB_FILE) if token in used),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def sample_vocab(tmp_path_factory) -> tuple[Path, dict]:
    """The sample-only vocab and TINY_CONFIG sized to it: for tests that train on the bundled sample."""
    vocab = write_sample_vocab(tmp_path_factory.mktemp("vocab") / "sample_vocab.txt")
    size = len(vocab.read_text(encoding="utf-8").splitlines())
    return vocab, {**TINY_CONFIG, "vocab_size": size}


# Keep CPU tests deterministic and polite on a 2-core runner.
os.environ.setdefault("OMP_NUM_THREADS", "2")


# Files that train models, the slowest first (their times in a 2-core `make test`, from pytest's --durations):
# `make test` runs one worker per core (pytest-xdist, a file to a worker), hands out the files in this order
# (--no-loadscope-reorder; xdist's default order is by test count), and starting the long files first lets the
# workers finish together. test_compile.py's first test compiles with a cold cache in a fresh clone (~35 s).
SLOWEST_FILES = ["test_notebook.py", "test_training.py", "test_distill.py", "test_long_runs.py",
                 "test_pretraining.py", "test_compile.py", "test_korquad2.py", "test_interop.py", "test_serve.py",
                 "test_onnx_hardening.py", "test_onnx.py", "test_predict.py", "test_noanswer.py",
                 "test_distill_hardening.py", "test_inputs.py", "test_hardening.py", "test_tokenization.py",
                 "test_korquad_utils.py", "test_cache_and_schedule.py"]


def pytest_configure(config) -> None:
    """Under pytest-xdist each worker, and every process it starts, keeps to one CPU of its own: torch and ONNX
    Runtime then size their thread pools to that one CPU, and no two workers' threads fight over a core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(worker.removeprefix("gw")) % len(cpus)]})


def pytest_collection_modifyitems(config, items) -> None:
    """SLOWEST_FILES first, in that order; every file's own tests keep their order."""
    rank = {name: index for index, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

"""KorQuAD v1.0 data path: reading the JSON, sliding-window features, batching, n-best decoding.

Flow: `read_squad_examples` -> `convert_examples_to_features` (or `load_or_build_features`, which
caches the features) -> batches from `make_length_grouped_batches` + `collate_features` -> model
logits -> `decode_predictions` -> `write_predictions`.

Features are assembled from a compact table (each distinct context's pieces and offsets stored once,
plus a few integers per window); that table is also what the feature cache stores, so a cache hit
and a fresh build go through the same assembly code.
"""
from __future__ import annotations

import gc
import hashlib
import heapq
import json
import logging
import math
import multiprocessing
import os
import re
import secrets
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Bump whenever reading, tokenising or windowing changes what the features contain.
CACHE_VERSION = 3

# Features whose logits are masked and ranked together in one set of numpy operations; small enough
# that a chunk's (features x length) arrays stay in cache (measured faster than 512 here).
_DECODE_CHUNK = 64


class KorquadFormatError(ValueError):
    """A KorQuAD/SQuAD-format file that cannot be used; the message names the file and the spot."""


@dataclass
class SquadExample:
    """One question on one context. `start_char`/`end_char` (end exclusive) are set for training."""
    qas_id: str
    question_text: str
    context_text: str
    answers: list[dict]
    start_char: int | None = None
    end_char: int | None = None


@dataclass
class InputFeature:
    """One `[CLS] question [SEP] context-window [SEP]` model input, unpadded."""
    unique_id: int
    example_index: int
    doc_span_index: int
    input_ids: list[int]
    segment_ids: list[int]
    token_offsets: list[tuple[int, int] | None]
    token_is_max_context: list[bool]
    start_position: int = 0
    end_position: int = 0


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic containers.

    Creating hundreds of thousands of lists, tuples and dicts triggers collection after collection,
    each walking the (large, cycle-free) features already built; this nearly doubled decoding time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ----------------------------------------------------------------------------- reading


def _load_json_file(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a BOM (Windows Notepad) is fine too
            return json.load(file)
    except OSError as error:
        raise KorquadFormatError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise KorquadFormatError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise KorquadFormatError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} "
                                 f"column {error.colno})") from None


def _field(record: Any, key: str, kind: type, where: str) -> Any:
    """`record[key]`, checked to exist and be of `kind`."""
    if not isinstance(record, dict):
        raise KorquadFormatError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise KorquadFormatError(f"{where}: missing '{key}'")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise KorquadFormatError(f"{where}: '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _read_answers(qa: dict, where: str, is_training: bool) -> list[dict]:
    answers = qa.get("answers", [])
    if not isinstance(answers, list):
        raise KorquadFormatError(f"{where}: 'answers' must be a list, got {type(answers).__name__}")
    for answer_number, answer in enumerate(answers):
        answer_where = f"{where} answer {answer_number}"
        _field(answer, "text", str, answer_where)
        if is_training:
            _field(answer, "answer_start", int, answer_where)
    return answers


def _training_span(context: str, answers: list[dict]) -> tuple[int, int] | str:
    """Character span (end exclusive) of the first answer, whitespace trimmed, or why it is unusable."""
    if not answers:
        return "no answer to train on"
    text, start = answers[0]["text"], answers[0]["answer_start"]
    if start < 0 or context[start:start + len(text)] != text:
        return f"answer_start {start} does not point at the answer text {text!r}"
    stripped = text.strip()
    if not stripped:
        return "the answer text is blank"
    start += len(text) - len(text.lstrip())
    return start, start + len(stripped)


@_gc_paused()
def read_squad_examples(input_file: str | os.PathLike, is_training: bool) -> list[SquadExample]:
    """Read a SQuAD/KorQuAD-format JSON file into examples, validating its structure.

    Structural problems raise `KorquadFormatError`. For training, a question whose first answer does
    not match its context (or has none) is skipped with a warning; a file without answers reads
    fine for prediction.
    """
    path = Path(input_file)
    return squad_examples_from_json(_load_json_file(path), str(path), is_training)


def squad_examples_from_json(dataset: Any, name: str, is_training: bool) -> list[SquadExample]:
    """`read_squad_examples` for a file already parsed (e.g. read from stdin); messages name `name`."""
    articles = _field(dataset, "data", list, name)
    examples: list[SquadExample] = []
    seen_ids: set[str] = set()
    skipped = 0
    for article_number, article in enumerate(articles):
        article_where = f"{name}: article {article_number}"
        for paragraph_number, paragraph in enumerate(_field(article, "paragraphs", list, article_where)):
            paragraph_where = f"{article_where} paragraph {paragraph_number}"
            context = _field(paragraph, "context", str, paragraph_where)
            for qa_number, qa in enumerate(_field(paragraph, "qas", list, paragraph_where)):
                qas_id = _field(qa, "id", str, f"{paragraph_where} question {qa_number}")
                where = f"{name}: question {qas_id}"
                if qas_id in seen_ids:
                    raise KorquadFormatError(f"{where}: duplicate question id")
                seen_ids.add(qas_id)
                example = SquadExample(qas_id, _field(qa, "question", str, where), context,
                                       _read_answers(qa, where, is_training))
                if is_training:
                    span = _training_span(context, example.answers)
                    if isinstance(span, str):
                        logger.warning("%s: %s; question skipped", where, span)
                        skipped += 1
                        continue
                    example.start_char, example.end_char = span
                examples.append(example)
    if skipped:
        logger.warning("%s: skipped %d of %d training questions", name, skipped, len(seen_ids))
    return examples


# ----------------------------------------------------------------------------- tokenising

# The tokenizer workers use: set before a fork-started pool, so the (unpicklable) Mecab object is
# inherited by the workers rather than sent to them.
_WORKER_TOKENIZER: Any = None


def _tokenize_context(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Piece ids (int32) and their (start, end) character offsets (int32, shape (n, 2))."""
    pieces_with_offsets = tokenizer.tokenize_with_offsets(text)
    if not pieces_with_offsets:
        return np.zeros(0, np.int32), np.zeros((0, 2), np.int32)
    pieces, starts, ends = zip(*pieces_with_offsets)
    ids = np.asarray(tokenizer.convert_tokens_to_ids(list(pieces)), dtype=np.int32)
    return ids, np.stack([np.asarray(starts, np.int32), np.asarray(ends, np.int32)], axis=1)


def _tokenize_question(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))


def _run_in_worker(task: tuple[Callable[[Any, str], Any], str]) -> Any:
    function, text = task
    return function(_WORKER_TOKENIZER, text)


def _tokenize_all(tokenizer: Any, contexts: list[str], questions: list[str], num_workers: int,
                  progress: bool) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[list[int]]]:
    """Tokenize each distinct context (with offsets) and question, in `num_workers` processes."""
    global _WORKER_TOKENIZER
    tasks = [(_tokenize_context, text) for text in contexts] + [(_tokenize_question, text) for text in questions]
    bar = tqdm(total=len(tasks), desc="tokenizing", unit="text", disable=not progress)
    if num_workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        logger.warning("num_workers=%d needs the 'fork' start method, absent here; using one process",
                       num_workers)
        num_workers = 1
    results = []
    try:
        if num_workers == 1:
            for function, text in tasks:
                results.append(function(tokenizer, text))
                bar.update()
        else:
            _WORKER_TOKENIZER = tokenizer
            # Frozen objects are skipped by the workers' garbage collector, so it does not touch
            # (and copy) every page of the inherited heap.
            gc.freeze()
            with multiprocessing.get_context("fork").Pool(num_workers) as pool:
                for result in pool.imap(_run_in_worker, tasks, chunksize=16):
                    results.append(result)
                    bar.update()
    finally:
        gc.unfreeze()
        _WORKER_TOKENIZER = None
        bar.close()
    return results[:len(contexts)], results[len(contexts):]


# ----------------------------------------------------------------------------- windows


def _doc_windows(num_pieces: int, max_pieces: int, doc_stride: int) -> list[tuple[int, int]]:
    """(start, length) of each context window: `max_pieces` long, stepping by `doc_stride`."""
    windows = []
    start = 0
    while True:
        length = min(num_pieces - start, max_pieces)
        windows.append((start, length))
        if start + length >= num_pieces:
            return windows
        start += min(length, doc_stride)


def _max_context_flags(windows: list[tuple[int, int]], num_pieces: int) -> list[np.ndarray]:
    """Per window, whether each of its pieces has its most context there (the original BERT rule).

    A piece's score in a window is min(pieces left of it, pieces right of it) + 0.01 x the window's
    length; the highest score wins, the earlier window on a tie. The length term matters where the
    last window is short: it can outweigh a one-piece difference in context. Memory and time are
    linear in the pieces: one best-so-far array, updated window by window.
    """
    if len(windows) == 1:
        return [np.ones(windows[0][1], dtype=bool)]
    best_score = np.full(num_pieces, -np.inf)
    best_window = np.zeros(num_pieces, dtype=np.int64)
    for index, (start, length) in enumerate(windows):
        left = np.arange(length)
        score = np.minimum(left, length - 1 - left) + 0.01 * length
        better = score > best_score[start:start + length]
        best_score[start:start + length][better] = score[better]
        best_window[start:start + length][better] = index
    return [best_window[start:start + length] == index for index, (start, length) in enumerate(windows)]


def _answer_pieces(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int] | None:
    """First and last piece overlapping the character span, or None if no piece does."""
    first = int(np.searchsorted(offsets[:, 1], start_char, side="right"))
    last = int(np.searchsorted(offsets[:, 0], end_char, side="left")) - 1
    return (first, last) if first <= last else None


def _check_lengths(max_seq_length: int, doc_stride: int, max_query_length: int) -> None:
    if max_query_length < 1:
        raise ValueError(f"max_query_length must be at least 1, got {max_query_length}")
    if doc_stride < 1:
        raise ValueError(f"doc_stride must be at least 1, got {doc_stride}")
    if max_seq_length < max_query_length + 4:
        raise ValueError(f"max_seq_length ({max_seq_length}) must exceed max_query_length "
                         f"({max_query_length}) + 3, to leave room for context")


# ----------------------------------------------------------------------------- features


@dataclass
class _FeatureTable:
    """Features in flat arrays: each distinct context stored once, windows as integers."""
    special_ids: np.ndarray         # [cls_id, sep_id]
    context_ids: np.ndarray         # piece ids of all distinct contexts, back to back
    context_offsets: np.ndarray     # (pieces, 2) character offsets, same order
    context_bounds: np.ndarray      # context c is context_ids[bounds[c]:bounds[c + 1]]
    example_context: np.ndarray     # per example: its context's index
    query_ids: np.ndarray           # truncated question ids of all examples, back to back
    query_bounds: np.ndarray        # per example, like context_bounds
    feature_example: np.ndarray     # per feature: example index
    feature_span_index: np.ndarray  # per feature: window number within its example
    feature_doc_start: np.ndarray   # per feature: first context piece of the window
    feature_doc_length: np.ndarray  # per feature: pieces in the window
    feature_positions: np.ndarray   # per feature: (start_position, end_position)
    max_context: np.ndarray         # the windows' max-context flags, back to back


def _bounds(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _number_distinct(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct texts in first-seen order, and each text's number among them."""
    numbers: dict[str, int] = {}
    numbered = [numbers.setdefault(text, len(numbers)) for text in texts]
    return list(numbers), numbered


def _build_feature_table(examples: Sequence[SquadExample], tokenizer: Any, max_seq_length: int,
                         doc_stride: int, max_query_length: int, is_training: bool, num_workers: int,
                         progress: bool) -> _FeatureTable:
    _check_lengths(max_seq_length, doc_stride, max_query_length)
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if is_training:
        unlabelled = next((ex.qas_id for ex in examples if ex.start_char is None), None)
        if unlabelled is not None:
            raise ValueError(f"question {unlabelled} has no answer span; read training files with is_training=True")
    distinct_contexts, example_context = _number_distinct([ex.context_text for ex in examples])
    distinct_questions, example_question = _number_distinct([ex.question_text for ex in examples])
    contexts, questions = _tokenize_all(tokenizer, distinct_contexts, distinct_questions, num_workers, progress)
    example_query = [questions[number][:max_query_length] for number in example_question]

    windows_by_shape: dict[tuple[int, int], tuple[list[tuple[int, int]], list[np.ndarray]]] = {}
    feature_rows: list[tuple[int, int, int, int, int, int]] = []
    max_context: list[np.ndarray] = []
    for example_index, example in enumerate(examples):
        _, offsets = contexts[example_context[example_index]]
        prefix = len(example_query[example_index]) + 2     # [CLS] question [SEP]
        shape = (len(offsets), max_seq_length - prefix - 1)
        if shape not in windows_by_shape:
            windows = _doc_windows(*shape, doc_stride)
            windows_by_shape[shape] = windows, _max_context_flags(windows, len(offsets))
        windows, flags = windows_by_shape[shape]
        answer = _answer_pieces(offsets, example.start_char, example.end_char) if is_training else None
        for span_index, (doc_start, doc_length) in enumerate(windows):
            positions = (0, 0)
            if answer and doc_start <= answer[0] and answer[1] < doc_start + doc_length:
                positions = (answer[0] - doc_start + prefix, answer[1] - doc_start + prefix)
            feature_rows.append((example_index, span_index, doc_start, doc_length, *positions))
            max_context.append(flags[span_index])
    rows = np.array(feature_rows, dtype=np.int64).reshape(-1, 6)
    return _FeatureTable(
        special_ids=np.array([tokenizer.cls_token_id, tokenizer.sep_token_id], dtype=np.int64),
        context_ids=np.concatenate([ids for ids, _ in contexts] or [np.zeros(0, np.int32)]),
        context_offsets=np.concatenate([offsets for _, offsets in contexts] or [np.zeros((0, 2), np.int32)]),
        context_bounds=_bounds([len(ids) for ids, _ in contexts]),
        example_context=np.array(example_context, dtype=np.int64),
        query_ids=np.array(list(chain.from_iterable(example_query)), dtype=np.int32),
        query_bounds=_bounds([len(query) for query in example_query]),
        feature_example=rows[:, 0], feature_span_index=rows[:, 1], feature_doc_start=rows[:, 2],
        feature_doc_length=rows[:, 3], feature_positions=rows[:, 4:6],
        max_context=np.concatenate(max_context or [np.zeros(0, bool)]))


def _split(flat: list, bounds: np.ndarray) -> list[list]:
    return [flat[begin:end] for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


@_gc_paused()
def _assemble_features(table: _FeatureTable) -> list[InputFeature]:
    """Turn the table into `InputFeature`s; per-feature work is list slicing only."""
    cls_id, sep_id = table.special_ids.tolist()
    context_ids = _split(table.context_ids.tolist(), table.context_bounds)
    context_offsets = _split(list(zip(*table.context_offsets.T.tolist())), table.context_bounds)
    queries = _split(table.query_ids.tolist(), table.query_bounds)
    example_context = table.example_context.tolist()
    max_context = _split(table.max_context.tolist(), _bounds(table.feature_doc_length))
    features = []
    for unique_id, (example_index, span_index, doc_start, doc_length, (start_position, end_position)) in enumerate(
            zip(table.feature_example.tolist(), table.feature_span_index.tolist(), table.feature_doc_start.tolist(),
                table.feature_doc_length.tolist(), table.feature_positions.tolist())):
        context = example_context[example_index]
        query = queries[example_index]
        doc_end = doc_start + doc_length
        prefix = len(query) + 2
        features.append(InputFeature(
            unique_id=unique_id, example_index=example_index, doc_span_index=span_index,
            input_ids=[cls_id, *query, sep_id, *context_ids[context][doc_start:doc_end], sep_id],
            segment_ids=[0] * prefix + [1] * (doc_length + 1),
            token_offsets=[None] * prefix + context_offsets[context][doc_start:doc_end] + [None],
            token_is_max_context=[False] * prefix + max_context[unique_id] + [False],
            start_position=start_position, end_position=end_position))
    return features


def convert_examples_to_features(examples: Sequence[SquadExample], tokenizer: Any, max_seq_length: int,
                                 doc_stride: int, max_query_length: int, is_training: bool,
                                 num_workers: int = 1, progress: bool = True) -> list[InputFeature]:
    """Cut each example into `[CLS] question [SEP] context-window [SEP]` features (unpadded).

    The question keeps its first `max_query_length` pieces; context windows step by `doc_stride`.
    Each distinct context and question is tokenized once, in `num_workers` processes.
    """
    return _assemble_features(_build_feature_table(examples, tokenizer, max_seq_length, doc_stride,
                                                   max_query_length, is_training, num_workers, progress))


# ----------------------------------------------------------------------------- feature cache


def _hash_file(digest: Any, path: str | os.PathLike) -> None:
    # The length prefix keeps two files' bytes from running together ambiguously.
    digest.update(f"{os.path.getsize(path)}\0".encode())
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)


def _tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    missing = [name for name in ("vocab_file", "analyzer_name", "do_lower_case") if not hasattr(tokenizer, name)]
    if missing:
        raise TypeError(f"the feature cache needs tokenizer attribute(s) {', '.join(missing)}")
    return {"vocab_file": str(tokenizer.vocab_file), "analyzer": str(tokenizer.analyzer_name),
            "do_lower_case": bool(tokenizer.do_lower_case)}


def feature_cache_key(input_file: str | os.PathLike, tokenizer: Any, max_seq_length: int, doc_stride: int,
                      max_query_length: int, is_training: bool) -> str:
    """sha256 over everything the features depend on: the data and vocab contents, and the settings."""
    settings = _tokenizer_settings(tokenizer)
    digest = hashlib.sha256(f"korquad-features-v{CACHE_VERSION}\0".encode())
    _hash_file(digest, input_file)
    _hash_file(digest, settings["vocab_file"])
    digest.update(json.dumps({"analyzer": settings["analyzer"], "do_lower_case": settings["do_lower_case"],
                              "max_seq_length": max_seq_length, "doc_stride": doc_stride,
                              "max_query_length": max_query_length, "is_training": is_training},
                             sort_keys=True).encode())
    return digest.hexdigest()


def _cache_paths(input_file: Path, cache_dir: Path, analyzer: str, max_seq_length: int, doc_stride: int,
                 max_query_length: int, is_training: bool) -> tuple[Path, Path]:
    mode = "train" if is_training else "eval"
    name = f"{input_file.stem}.{analyzer}.{mode}.{max_seq_length}_{doc_stride}_{max_query_length}"
    stem = re.sub(r"[^\w.-]", "_", name)
    return cache_dir / f"{stem}.features.npz", cache_dir / f"{stem}.features.json"


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write through a temporary file in the same directory, then rename it into place, so a reader
    (or a crash half-way) never leaves half a file under `path`. An OSError names `path`."""
    atomic_write_files({path: write})


def atomic_write_files(files: dict[str | os.PathLike, Callable[[IO[bytes]], None]]) -> None:
    """Write files that belong together (a model directory, predictions with their n-best lists)
    whole or not at all: each goes to a temporary file beside it, and only once every one of them
    is on disk are they renamed into place. A failed write (a full disk) replaces none of them, and
    its OSError names the file being written, not its temporary name. A path that is a symlink is
    written through to its target (the rename would otherwise replace the link with a plain file)."""
    written: list[tuple[Path, Path]] = []
    try:
        for target, write in files.items():
            path = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
            temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
            written.append((temp, path))
            try:
                # os.open with mode 0o666 lets the user's umask decide the final permissions, as for a plain open().
                with os.fdopen(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as file:
                    write(file)
                    file.flush()
                    os.fsync(file.fileno())  # the data is on disk before the name points at it
            except OSError as error:
                if error.filename not in (None, str(temp)):
                    raise  # about another file (a source being copied): it names that one
                raise OSError(error.errno, error.strerror or str(error), str(target)) from None
        for temp, path in written:
            os.replace(temp, path)
    except BaseException:
        for temp, _path in written:
            temp.unlink(missing_ok=True)
        raise


def _read_cached_table(npz_path: Path, key: str, num_examples: int) -> _FeatureTable | None:
    """The cached table if it exists, carries `key` and hangs together; otherwise None."""
    try:
        # The key lives inside the .npz, so data and key are always replaced together.
        with np.load(npz_path, allow_pickle=False) as arrays:
            if str(arrays["key"]) != key:
                logger.info("feature cache %s is stale; rebuilding", npz_path)
                return None
            table = _FeatureTable(**{field.name: arrays[field.name] for field in fields(_FeatureTable)})
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, AttributeError, EOFError, zipfile.BadZipFile) as error:
        logger.warning("feature cache %s is unreadable (%s); rebuilding", npz_path, error)
        return None
    if (len(table.example_context) != num_examples or len(table.max_context) != table.feature_doc_length.sum()
            or table.context_bounds[-1] != len(table.context_ids)):
        logger.warning("feature cache %s is inconsistent; rebuilding", npz_path)
        return None
    return table


def _is_writable_dir(directory: Path) -> bool:
    """Whether `directory` (or, if missing, its nearest existing parent) may be written to.

    Checks the write bits as well as os.access: root may write anywhere, but a directory without
    any write bit (a shared, read-only data folder) is meant to be left alone.
    """
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory.is_dir() and os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


def _write_cached_table(table: _FeatureTable, npz_path: Path, json_path: Path, key: str,
                        metadata: dict[str, Any]) -> None:
    if not _is_writable_dir(npz_path.parent):
        logger.warning("%s is not writable: features are not cached (pass cache_dir to cache them elsewhere)",
                       npz_path.parent)
        return
    arrays = {field.name: getattr(table, field.name) for field in fields(_FeatureTable)}
    try:
        npz_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(npz_path, lambda file: np.savez(file, key=np.array(key), **arrays))
        # The sidecar is for people and tools: what the cache was built from.
        sidecar = {"key": key, "cache_version": CACHE_VERSION, "num_examples": len(table.example_context),
                   "num_features": len(table.feature_example), **metadata}
        atomic_write(json_path, lambda file: file.write(json.dumps(sidecar, indent=1).encode("utf-8")))
    except OSError as error:
        logger.warning("cannot write the feature cache in %s (%s): features are not cached",
                       npz_path.parent, error.strerror or error)
        return
    logger.info("feature cache written: %s", npz_path)


def load_or_build_features(input_file: str | os.PathLike, tokenizer: Any, max_seq_length: int, doc_stride: int,
                           max_query_length: int, is_training: bool, cache_dir: str | os.PathLike | None = None,
                           overwrite_cache: bool = False, num_workers: int = 1,
                           progress: bool = True) -> tuple[list[SquadExample], list[InputFeature]]:
    """Examples read from `input_file`, and their features from the cache when it is current.

    The cache (an .npz of flat arrays plus a JSON sidecar, no pickle) lives in `cache_dir`, by default
    `cache/` beside the data file, and is keyed by `feature_cache_key`. A cache that cannot be
    written (read-only data directory) is skipped with a warning.
    """
    input_file = Path(input_file)
    examples = read_squad_examples(input_file, is_training)
    settings = _tokenizer_settings(tokenizer)
    key = feature_cache_key(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training)
    npz_path, json_path = _cache_paths(input_file, Path(cache_dir) if cache_dir else input_file.parent / "cache",
                                       settings["analyzer"], max_seq_length, doc_stride, max_query_length,
                                       is_training)
    table = None if overwrite_cache else _read_cached_table(npz_path, key, len(examples))
    if table is not None:
        logger.info("features loaded from cache %s", npz_path)
    else:
        table = _build_feature_table(examples, tokenizer, max_seq_length, doc_stride, max_query_length,
                                     is_training, num_workers, progress)
        _write_cached_table(table, npz_path, json_path, key, {
            "input_file": str(input_file), **settings, "max_seq_length": max_seq_length,
            "doc_stride": doc_stride, "max_query_length": max_query_length, "is_training": is_training})
    return examples, _assemble_features(table)


# ----------------------------------------------------------------------------- batching


def make_length_grouped_batches(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0,
                                group_factor: int = 50) -> list[list[int]]:
    """Indices into `lengths` cut into batches of similar lengths, so padding per batch stays small.

    Without shuffle: longest first. With shuffle: a seeded permutation cut into groups of
    `batch_size * group_factor`, each sorted by length and cut into batches, the full batches then
    shuffled; the one short batch, if any, stays last.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if group_factor < 1:
        raise ValueError(f"group_factor must be at least 1, got {group_factor}")
    lengths = np.asarray(lengths, dtype=np.int64)
    if not shuffle:
        order = np.argsort(-lengths, kind="stable")
        return [order[begin:begin + batch_size].tolist() for begin in range(0, len(order), batch_size)]
    rng = np.random.default_rng(seed)
    permutation = rng.permutation(len(lengths))
    group_size = batch_size * group_factor
    batches = []
    for begin in range(0, len(permutation), group_size):
        group = permutation[begin:begin + group_size]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches.extend(group[start:start + batch_size].tolist() for start in range(0, len(group), batch_size))
    short = batches.pop() if batches and len(batches[-1]) < batch_size else None
    batches = [batches[index] for index in rng.permutation(len(batches))]
    return batches + [short] if short else batches


def bucket_width(length: int, multiple: int, max_width: int | None = None) -> int:
    """`length` rounded up to a multiple of `multiple`, capped at `max_width` (never below `length`):
    the padded width of a bucket."""
    if multiple < 1:
        raise ValueError(f"multiple must be at least 1, got {multiple}")
    rounded = -(-length // multiple) * multiple
    return rounded if max_width is None else min(rounded, max(max_width, length))


def collate_features(features: list[InputFeature], is_training: bool, pad_id: int = 0,
                     pad_to_multiple: int | None = None, max_width: int | None = None,
                     pad_rows_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest feature: int64 `input_ids`, `token_type_ids`, `attention_mask`
    (1 = real token) and, for training, `start_positions`/`end_positions`.

    For a compiled model, which compiles once per input shape: `pad_to_multiple` pads the width up
    to a multiple of it (at most `max_width`), and `pad_rows_to` adds filler rows up to that many
    rows. A filler row attends only to its first token and its positions are -1, which the loss
    ignores, so real rows train and predict as without it.
    """
    if not features:
        raise ValueError("collate_features needs at least one feature")
    lengths = np.array([len(feature.input_ids) for feature in features])
    width = int(lengths.max())
    if pad_to_multiple is not None:
        width = bucket_width(width, pad_to_multiple, max_width)
    rows = max(len(features), pad_rows_to or 0)
    real = np.zeros((rows, width), dtype=bool)
    real[:len(features)] = np.arange(width) < lengths[:, None]
    total = int(lengths.sum())
    input_ids = np.full(real.shape, pad_id, dtype=np.int64)
    input_ids[real] = np.fromiter(chain.from_iterable(f.input_ids for f in features), np.int64, count=total)
    token_type_ids = np.zeros(real.shape, dtype=np.int64)
    token_type_ids[real] = np.fromiter(chain.from_iterable(f.segment_ids for f in features), np.int64, count=total)
    attention_mask = real.astype(np.int64)
    attention_mask[len(features):, 0] = 1  # a row with no key to attend to would give NaN
    batch = {"input_ids": torch.from_numpy(input_ids), "token_type_ids": torch.from_numpy(token_type_ids),
             "attention_mask": torch.from_numpy(attention_mask)}
    if is_training:
        filler = [-1] * (rows - len(features))
        batch["start_positions"] = torch.tensor([f.start_position for f in features] + filler, dtype=torch.int64)
        batch["end_positions"] = torch.tensor([f.end_position for f in features] + filler, dtype=torch.int64)
    return batch


# ----------------------------------------------------------------------------- decoding


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest values in each row (in no particular order)."""
    if k >= scores.shape[1]:
        return np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


class _RankedSpans:
    """The valid (start, end) pairs of a chunk of features, served best first per feature.

    Only the best `block` pairs of each feature are sorted and converted up front: most questions
    never need more. The rest are sorted on demand.
    """

    def __init__(self, pair_scores: np.ndarray, start_values: np.ndarray, end_values: np.ndarray,
                 top_starts: np.ndarray, top_ends: np.ndarray, block: int):
        self.pair_scores = pair_scores      # (features, k * k), -inf where the pair is invalid
        self.start_values, self.end_values = start_values, end_values
        self.top_starts, self.top_ends = top_starts, top_ends
        self.counts = np.isfinite(pair_scores).sum(axis=1).tolist()
        head = _top_k(pair_scores, min(block, pair_scores.shape[1]))
        head_order = np.argsort(-np.take_along_axis(pair_scores, head, axis=1), axis=1, kind="stable")
        self.head_pairs = np.take_along_axis(head, head_order, axis=1)
        rows = np.arange(len(pair_scores))[:, None]
        self.heads = [column.tolist() for column in self._columns(rows, self.head_pairs)]

    def _columns(self, rows: np.ndarray | int, pairs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Scores, start logits, end logits, start positions and end positions of `pairs`."""
        starts, ends = np.divmod(pairs, self.top_starts.shape[1])
        return (self.pair_scores[rows, pairs], self.start_values[rows, starts], self.end_values[rows, ends],
                self.top_starts[rows, starts], self.top_ends[rows, ends])

    def candidates(self, row: int, feature_number: int) -> Iterator[tuple]:
        """(score, start logit, end logit, start, end, feature_number) tuples, best first."""
        count = self.counts[row]
        head_count = min(count, self.head_pairs.shape[1])
        head = zip(*(column[row][:head_count] for column in self.heads), repeat(feature_number))
        return chain(head, self._rest(row, feature_number)) if count > head_count else head

    def _rest(self, row: int, feature_number: int) -> Iterator[tuple]:
        valid_pairs = np.argsort(-self.pair_scores[row], kind="stable")[:self.counts[row]]
        rest = valid_pairs[~np.isin(valid_pairs, self.head_pairs[row])]
        yield from zip(*(column.tolist() for column in self._columns(row, rest)), repeat(feature_number))


def _masked_logits(features: Sequence[InputFeature], start_logits: Sequence,
                   end_logits: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(features, longest) start and end logits, -inf wherever a span may not start or end."""
    lengths = np.array([len(feature.input_ids) for feature in features])
    real = np.arange(lengths.max()) < lengths[:, None]
    for feature, length, row_start, row_end in zip(features, lengths, start_logits, end_logits):
        if min(len(row_start), len(row_end)) < length:
            raise ValueError(f"logits of feature {feature.unique_id} are shorter than its {length} input ids")
    # Flat per-token values scattered into the padded arrays; padding stays -inf / False.
    start = np.full(real.shape, -np.inf)
    start[real] = np.concatenate([np.asarray(row[:n], dtype=np.float64) for row, n in zip(start_logits, lengths)])
    end = np.full(real.shape, -np.inf)
    end[real] = np.concatenate([np.asarray(row[:n], dtype=np.float64) for row, n in zip(end_logits, lengths)])
    # bytes() over a list of bools (or of bool(offset)) runs in C: far faster than a Python loop.
    in_context = np.zeros(real.shape, dtype=bool)
    in_context[real] = np.frombuffer(bytes(map(bool, chain.from_iterable(f.token_offsets for f in features))), bool)
    max_context = np.zeros(real.shape, dtype=bool)
    max_context[real] = np.frombuffer(b"".join([bytes(f.token_is_max_context) for f in features]), bool)
    return np.where(max_context & in_context, start, -np.inf), np.where(in_context, end, -np.inf)


def _rank_spans(features: Sequence[InputFeature], start_logits: Sequence, end_logits: Sequence,
                n_best_size: int, max_answer_length: int) -> _RankedSpans:
    """Pair each feature's `n_best_size` best valid starts and ends; keep the valid pairs."""
    start, end = _masked_logits(features, start_logits, end_logits)
    k = min(n_best_size, start.shape[1])
    top_starts, top_ends = _top_k(start, k), _top_k(end, k)
    start_values = np.take_along_axis(start, top_starts, axis=1)
    end_values = np.take_along_axis(end, top_ends, axis=1)
    span_lengths = top_ends[:, None, :] - top_starts[:, :, None] + 1
    scores = start_values[:, :, None] + end_values[:, None, :]
    valid = (span_lengths >= 1) & (span_lengths <= max_answer_length) & np.isfinite(scores)
    pair_scores = np.where(valid, scores, -np.inf).reshape(len(features), k * k)
    return _RankedSpans(pair_scores, start_values, end_values, top_starts, top_ends, block=n_best_size)


def _softmax(scores: list[float]) -> list[float]:
    highest = max(scores)
    exps = [math.exp(score - highest) for score in scores]
    total = sum(exps)
    return [value / total for value in exps]


def gold_logits(features: Sequence[InputFeature]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits pointing at each training feature's gold start/end (flat in windows without the answer).

    Decoding these measures the pipeline's own ceiling: what a perfect model could score after
    tokenization, windowing and decoding.
    """
    starts, ends = [], []
    for feature in features:
        start, end = np.zeros(len(feature.input_ids), np.float32), np.zeros(len(feature.input_ids), np.float32)
        if feature.start_position:
            start[feature.start_position] = end[feature.end_position] = 10.0
        starts.append(start)
        ends.append(end)
    return starts, ends


@_gc_paused()
def decode_predictions(examples: Sequence[SquadExample], features: Sequence[InputFeature], start_logits: Sequence,
                       end_logits: Sequence, n_best_size: int = 20, max_answer_length: int = 30,
                       progress: bool = False) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """Best answer text per question, and its n-best list, from per-feature start/end logits.

    `start_logits[i]`/`end_logits[i]` belong to `features[i]` and are at least as long as its
    `input_ids`. Candidates pair the `n_best_size` best starts (at max-context pieces) and ends of each
    feature's context, `start <= end`, at most `max_answer_length` pieces. Answer texts are slices of
    the original context, and each n-best entry carries its `start`/`end` character offsets
    (`context[start:end] == text`); duplicates are dropped; probabilities are a softmax over the kept
    ones. A question without any valid candidate gets "" (n-best offsets None).
    """
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(f"got {len(start_logits)} start and {len(end_logits)} end logit rows "
                         f"for {len(features)} features")
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(f"n_best_size ({n_best_size}) and max_answer_length ({max_answer_length}) must be >= 1")
    candidate_streams: dict[int, list] = {}
    for begin in range(0, len(features), _DECODE_CHUNK):
        chunk = slice(begin, begin + _DECODE_CHUNK)
        ranked = _rank_spans(features[chunk], start_logits[chunk], end_logits[chunk], n_best_size, max_answer_length)
        for row, feature in enumerate(features[chunk]):
            if not 0 <= feature.example_index < len(examples):
                raise ValueError(f"feature {feature.unique_id} points at example {feature.example_index}, "
                                 f"but there are {len(examples)} examples")
            candidate_streams.setdefault(feature.example_index, []).append(
                ranked.candidates(row, begin + row))

    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict[str, Any]]] = {}
    for example_index, example in enumerate(tqdm(examples, desc="decoding", unit="question", disable=not progress)):
        # Each feature's candidates come best first; merge them lazily.
        streams = candidate_streams.get(example_index, [])
        candidates = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=itemgetter(0), reverse=True)
        kept = (_distinct_texts(example.context_text, features, candidates, n_best_size)
                or [("", 0.0, 0.0, 0.0, None, None)])
        probabilities = _softmax([candidate[1] for candidate in kept])
        predictions[example.qas_id] = kept[0][0]
        nbest[example.qas_id] = [
            {"text": text, "probability": probability, "start_logit": start_logit, "end_logit": end_logit,
             "start": start, "end": end}
            for (text, _, start_logit, end_logit, start, end), probability in zip(kept, probabilities)]
    return predictions, nbest


def _distinct_texts(context: str, features: Sequence[InputFeature], candidates: Iterator[tuple],
                    n_best_size: int) -> list[tuple[str, float, float, float, int, int]]:
    """(text, score, start logit, end logit, start char, end char) of the first `n_best_size`
    candidates with distinct texts; text == context[start char:end char]."""
    kept: list[tuple[str, float, float, float, int, int]] = []
    seen_texts: set[str] = set()
    for score, start_logit, end_logit, start, end, feature_number in candidates:
        offsets = features[feature_number].token_offsets
        start_char, end_char = offsets[start][0], offsets[end][1]
        text = context[start_char:end_char]
        if text not in seen_texts:
            seen_texts.add(text)
            kept.append((text, score, start_logit, end_logit, start_char, end_char))
            if len(kept) == n_best_size:
                break
    return kept


def write_predictions(predictions: dict[str, str], nbest: dict[str, list[dict[str, Any]]],
                      output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `predictions.json` and `nbest_predictions.json` (UTF-8, Korean unescaped), both or neither."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = output_dir / "predictions.json", output_dir / "nbest_predictions.json"
    texts = [(json.dumps(content, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
             for content in (predictions, nbest)]
    # Both or neither: predictions.json never stands beside the n-best lists of another run.
    atomic_write_files({path: lambda file, text=text: file.write(text) for path, text in zip(paths, texts)})
    return paths

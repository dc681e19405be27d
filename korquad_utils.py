"""KorQuAD v1.0 data path: reading the JSON, sliding-window features, batching, n-best decoding.

Flow: `read_squad_examples` -> `convert_examples_to_features` (or `load_or_build_features`, which
caches the features) -> batches from `make_length_grouped_batches` + `collate_features` -> model
logits -> `decode_predictions` -> `write_predictions`.

Features live in one `FeatureTable` for their whole life: flat numpy arrays (each distinct context's
pieces and offsets stored once, a few integers per window), which the feature cache stores as `.npy`
files and every process memory-maps. Batches are cut from it when collated (numpy, no torch here),
and decoding reads offsets and max-context flags from the same arrays.
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
import shutil
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Bump whenever reading, tokenising or windowing changes what the features contain.
CACHE_VERSION = 4
# The feature cache's index file: key, settings, and each array's shape, type and checksum.
TABLE_INDEX = "table.json"

# Features whose logits are masked and ranked together in one set of numpy operations; small enough
# that a chunk's (features x length) arrays stay in cache (measured faster than 512 here).
_DECODE_CHUNK = 64


class KorquadFormatError(ValueError):
    """A KorQuAD/SQuAD-format file that cannot be used; the message names the file and the spot."""


@dataclass
class SquadExample:
    """One question on one context. `start_char`/`end_char` (end exclusive) are set for training.

    Read with `version_2_with_negative`: `is_impossible` marks a question without an answer in its
    context (it trains to [CLS]); KLUE-MRC's `question_type` and `plausible_answers` are kept as read
    (plausible answers are never trained on)."""
    qas_id: str
    question_text: str
    context_text: str
    answers: list[dict]
    start_char: int | None = None
    end_char: int | None = None
    is_impossible: bool = False
    question_type: int | None = None
    plausible_answers: list[dict] = field(default_factory=list)


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


def load_json_file(path: Path) -> Any:
    """A JSON file's content (a BOM allowed), or KorquadFormatError naming the file and what is wrong."""
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


def _question_id(qa: Any, where: str, version_2_with_negative: bool) -> str:
    """`id`, or with version 2 KLUE-MRC's `guid` where there is no `id`."""
    if version_2_with_negative and isinstance(qa, dict) and "id" not in qa and "guid" in qa:
        return _field(qa, "guid", str, where)
    if isinstance(qa, dict) and "id" not in qa and "guid" in qa:
        raise KorquadFormatError(f"{where}: missing 'id' (a KLUE-MRC file with 'guid' ids? read it with "
                                 f"--version_2_with_negative)")
    return _field(qa, "id", str, where)


def _read_unanswerable(qa: dict, example: SquadExample, where: str) -> None:
    """Fill the version-2 fields of `example`: unanswerable when `is_impossible` is true or it has no answers."""
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise KorquadFormatError(f"{where}: 'is_impossible' must be true or false, got {impossible!r}")
    if impossible and example.answers:
        raise KorquadFormatError(f"{where}: 'is_impossible' is true but it has {len(example.answers)} answer(s); "
                                 f"an unanswerable question's answers go in 'plausible_answers'")
    example.is_impossible = impossible or not example.answers
    question_type = qa.get("question_type")
    if question_type is not None and (isinstance(question_type, bool) or not isinstance(question_type, int)):
        raise KorquadFormatError(f"{where}: 'question_type' must be a whole number, got {question_type!r}")
    example.question_type = question_type
    plausible = qa.get("plausible_answers", [])
    if not isinstance(plausible, list):
        raise KorquadFormatError(f"{where}: 'plausible_answers' must be a list, got {type(plausible).__name__}")
    example.plausible_answers = plausible


@_gc_paused()
def read_squad_examples(input_file: str | os.PathLike, is_training: bool,
                        version_2_with_negative: bool = False) -> list[SquadExample]:
    """Read a SQuAD/KorQuAD-format JSON file into examples, validating its structure.

    A KorQuAD 2.x file or directory (documents with an HTML "context" and "qas", no "paragraphs") is
    read by `korquad2.read_examples` into examples on each page's text.

    Structural problems raise `KorquadFormatError`. For training, a question whose first answer does
    not match its context (or has none) is skipped with a warning; a file without answers reads
    fine for prediction.

    With `version_2_with_negative` (SQuAD 2.0, KLUE-MRC): a question with `"is_impossible": true` or
    an empty answer list is unanswerable (trained to [CLS], never skipped); `guid` is the id where
    there is no `id`; `is_impossible` must be a boolean and false wherever there are answers.
    """
    path = Path(input_file)
    import korquad2  # KorQuAD 2.x (HTML pages) is recognised by its structure; it imports this module

    if path.is_dir():
        return korquad2.read_examples(path, is_training)
    dataset = load_json_file(path)
    if korquad2.is_korquad2(dataset):
        return korquad2.examples_from_dataset(dataset, str(path), is_training)
    return squad_examples_from_json(dataset, str(path), is_training, version_2_with_negative)


def squad_examples_from_json(dataset: Any, name: str, is_training: bool,
                             version_2_with_negative: bool = False) -> list[SquadExample]:
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
                qas_id = _question_id(qa, f"{paragraph_where} question {qa_number}", version_2_with_negative)
                where = f"{name}: question {qas_id}"
                if qas_id in seen_ids:
                    raise KorquadFormatError(f"{where}: duplicate question id")
                seen_ids.add(qas_id)
                example = SquadExample(qas_id, _field(qa, "question", str, where), context,
                                       _read_answers(qa, where, is_training))
                if version_2_with_negative:
                    _read_unanswerable(qa, example, where)
                if is_training and not example.is_impossible:
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


# The arrays of a FeatureTable, as stored in its cache: each distinct context's pieces once, a few
# integers per window. A window is `[CLS] question [SEP] context[doc_start:doc_start + doc_length] [SEP]`.
TABLE_ARRAYS = (
    "special_ids",         # [cls_id, sep_id]
    "context_ids",         # piece ids of all distinct contexts, back to back (int32)
    "context_offsets",     # (pieces, 2) character offsets, same order (int32)
    "context_bounds",      # context c is context_ids[bounds[c]:bounds[c + 1]]
    "example_context",     # per example: its context's index
    "query_ids",           # truncated question ids of all examples, back to back (int32)
    "query_bounds",        # per example, like context_bounds
    "feature_example",     # per window: example index
    "feature_span_index",  # per window: window number within its example
    "feature_doc_start",   # per window: first context piece of the window
    "feature_doc_length",  # per window: pieces in the window
    "feature_positions",   # per window: (start_position, end_position); (0, 0) = [CLS]
    "max_context",         # the windows' max-context flags, back to back (bool)
)


@dataclass
class InputFeature:
    """One window as Python lists, made on demand by `FeatureTable.feature(i)` (for inspection and
    tests; the training, evaluation and decoding paths read the table's arrays instead)."""
    unique_id: int
    example_index: int
    doc_span_index: int
    input_ids: list[int]
    segment_ids: list[int]
    token_offsets: list[tuple[int, int] | None]
    token_is_max_context: list[bool]
    start_position: int = 0
    end_position: int = 0


class FeatureTable:
    """Every window of a data file as flat arrays (`TABLE_ARRAYS`), in memory or memory-mapped
    read-only from the feature cache, so that all processes of a machine share one copy.

    Nothing per window is kept as Python objects: batches are cut from the arrays when they are
    collated (`collate_features`) and decoding reads offsets and max-context flags from them.
    `len(table)` is the number of windows; `table.lengths[i]` is window i's number of input ids.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = [name for name in TABLE_ARRAYS if name not in arrays]
        if missing:
            raise ValueError(f"feature table arrays missing: {', '.join(missing)}")
        self.arrays = {name: arrays[name] for name in TABLE_ARRAYS}
        for name, array in self.arrays.items():
            setattr(self, name, array)
        self.cls_id, self.sep_id = (int(value) for value in self.special_ids)
        # Small per-window integers derived once per process (a few MB for a KorQuAD-sized file).
        query_lengths = np.diff(self.query_bounds)
        self.prefix = query_lengths[self.feature_example] + 2  # [CLS] question [SEP]
        self.lengths = self.prefix + self.feature_doc_length + 1
        self.window_start = self.context_bounds[self.example_context[self.feature_example]] + self.feature_doc_start
        self.max_context_bounds = _bounds(self.feature_doc_length)

    def __len__(self) -> int:
        return len(self.feature_example)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FeatureTable):
            return NotImplemented
        return all(np.array_equal(self.arrays[name], other.arrays[name]) for name in TABLE_ARRAYS)

    @property
    def num_examples(self) -> int:
        """The number of examples (questions) the windows were cut from."""
        return len(self.example_context)

    @property
    def example_index(self) -> np.ndarray:
        """Per window: the index of its example (question)."""
        return self.feature_example

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays.values())

    def input_ids(self, index: int) -> np.ndarray:
        """Window `index`'s input ids (int64), built from the flat arrays."""
        example = self.feature_example[index]
        query = self.query_ids[self.query_bounds[example]:self.query_bounds[example + 1]]
        start = self.window_start[index]
        context = self.context_ids[start:start + self.feature_doc_length[index]]
        return np.concatenate([[self.cls_id], query, [self.sep_id], context, [self.sep_id]]).astype(np.int64)

    def char_span(self, index: int, start_token: int, end_token: int) -> tuple[int, int]:
        """Character offsets (end exclusive) in the context of window `index`'s tokens
        `start_token`..`end_token` (both context pieces)."""
        base = self.window_start[index] - self.prefix[index]
        return int(self.context_offsets[base + start_token, 0]), int(self.context_offsets[base + end_token, 1])

    def token_offsets(self, index: int) -> np.ndarray:
        """(length, 2) character offsets of window `index`'s tokens; (-1, -1) outside the context."""
        offsets = np.full((self.lengths[index], 2), -1, dtype=np.int64)
        prefix, start, length = self.prefix[index], self.window_start[index], self.feature_doc_length[index]
        offsets[prefix:prefix + length] = self.context_offsets[start:start + length]
        return offsets

    def context_masks(self, indices: Sequence[int], width: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, width) masks of the windows `indices`: which tokens are context pieces, and which
        of those have their maximum context in that window."""
        in_context = np.zeros((len(indices), width), dtype=bool)
        max_context = np.zeros((len(indices), width), dtype=bool)
        for row, index in enumerate(indices):
            prefix, length = self.prefix[index], self.feature_doc_length[index]
            in_context[row, prefix:prefix + length] = True
            max_context[row, prefix:prefix + length] = \
                self.max_context[self.max_context_bounds[index]:self.max_context_bounds[index + 1]]
        return in_context, max_context

    def feature(self, index: int) -> InputFeature:
        """Window `index` as an `InputFeature` of Python lists."""
        prefix, length = int(self.prefix[index]), int(self.feature_doc_length[index])
        offsets = [(int(start), int(end)) if start >= 0 else None for start, end in self.token_offsets(index)]
        flags = self.max_context[self.max_context_bounds[index]:self.max_context_bounds[index + 1]].tolist()
        start_position, end_position = (int(value) for value in self.feature_positions[index])
        return InputFeature(
            unique_id=index, example_index=int(self.feature_example[index]),
            doc_span_index=int(self.feature_span_index[index]), input_ids=self.input_ids(index).tolist(),
            segment_ids=[0] * prefix + [1] * (length + 1), token_offsets=offsets,
            token_is_max_context=[False] * prefix + flags + [False],
            start_position=start_position, end_position=end_position)

    def __getitem__(self, index: int) -> InputFeature:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        return self.feature(index % len(self))

    def __iter__(self) -> Iterator[InputFeature]:
        return (self.feature(index) for index in range(len(self)))

    def check(self, num_examples: int) -> str | None:
        """Why the arrays do not describe `num_examples` examples' windows consistently, or None."""
        num_contexts, num_features = len(self.context_bounds) - 1, len(self)
        context_lengths = np.diff(self.context_bounds)
        problems = (
            (len(self.special_ids) != 2, "special ids"),
            (self.context_bounds[-1] != len(self.context_ids) or len(self.context_offsets) != len(self.context_ids),
             "context bounds"),
            (len(self.example_context) != num_examples or len(self.query_bounds) != num_examples + 1
             or self.query_bounds[-1] != len(self.query_ids), "examples"),
            (num_examples and (self.example_context.min() < 0 or self.example_context.max() >= num_contexts),
             "example contexts"),
            (any(len(self.arrays[name]) != num_features for name in
                 ("feature_span_index", "feature_doc_start", "feature_doc_length", "feature_positions")),
             "window columns"),
            (num_features and (self.feature_example.min() < 0 or self.feature_example.max() >= num_examples),
             "window examples"),
            (len(self.max_context) != self.feature_doc_length.sum(), "max-context flags"),
        )
        problem = next((what for failed, what in problems if failed), None)
        if problem is None and num_features:
            windows_end = self.feature_doc_start + self.feature_doc_length
            if (self.feature_doc_start.min() < 0
                    or (windows_end > context_lengths[self.example_context[self.feature_example]]).any()
                    or (self.feature_positions < 0).any()
                    or (self.feature_positions >= self.lengths[:, None]).any()):
                problem = "window bounds"
        return problem


def _bounds(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _number_distinct(texts: Sequence[str]) -> tuple[list[str], list[int]]:
    """The distinct texts in first-seen order, and each text's number among them."""
    numbers: dict[str, int] = {}
    numbered = [numbers.setdefault(text, len(numbers)) for text in texts]
    return list(numbers), numbered


def _build_feature_table(examples: Sequence[SquadExample], tokenizer: Any, max_seq_length: int,
                         doc_stride: int, max_query_length: int, is_training: bool, num_workers: int,
                         progress: bool) -> FeatureTable:
    _check_lengths(max_seq_length, doc_stride, max_query_length)
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    if is_training:
        unlabelled = next((ex.qas_id for ex in examples if ex.start_char is None and not ex.is_impossible), None)
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
        # An unanswerable question keeps (0, 0), [CLS], in every window, as do windows without the answer.
        answer = (_answer_pieces(offsets, example.start_char, example.end_char)
                  if is_training and not example.is_impossible else None)
        for span_index, (doc_start, doc_length) in enumerate(windows):
            positions = (0, 0)
            if answer and doc_start <= answer[0] and answer[1] < doc_start + doc_length:
                positions = (answer[0] - doc_start + prefix, answer[1] - doc_start + prefix)
            feature_rows.append((example_index, span_index, doc_start, doc_length, *positions))
            max_context.append(flags[span_index])
    rows = np.array(feature_rows, dtype=np.int64).reshape(-1, 6)
    return FeatureTable({
        "special_ids": np.array([tokenizer.cls_token_id, tokenizer.sep_token_id], dtype=np.int64),
        "context_ids": np.concatenate([ids for ids, _ in contexts] or [np.zeros(0, np.int32)]),
        "context_offsets": np.concatenate([offsets for _, offsets in contexts] or [np.zeros((0, 2), np.int32)]),
        "context_bounds": _bounds([len(ids) for ids, _ in contexts]),
        "example_context": np.array(example_context, dtype=np.int64),
        "query_ids": np.array(list(chain.from_iterable(example_query)), dtype=np.int32),
        "query_bounds": _bounds([len(query) for query in example_query]),
        "feature_example": rows[:, 0].copy(), "feature_span_index": rows[:, 1].copy(),
        "feature_doc_start": rows[:, 2].copy(), "feature_doc_length": rows[:, 3].copy(),
        "feature_positions": rows[:, 4:6].copy(),
        "max_context": np.concatenate(max_context or [np.zeros(0, bool)])})


def convert_examples_to_features(examples: Sequence[SquadExample], tokenizer: Any, max_seq_length: int,
                                 doc_stride: int, max_query_length: int, is_training: bool,
                                 num_workers: int = 1, progress: bool = True) -> FeatureTable:
    """Cut each example into `[CLS] question [SEP] context-window [SEP]` windows, as a `FeatureTable`.

    The question keeps its first `max_query_length` pieces; context windows step by `doc_stride`.
    Each distinct context and question is tokenized once, in `num_workers` processes.
    """
    return _build_feature_table(examples, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                                num_workers, progress)


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
                      max_query_length: int, is_training: bool, version_2_with_negative: bool = False) -> str:
    """sha256 over everything the features depend on: the data and vocab contents, and the settings."""
    settings = _tokenizer_settings(tokenizer)
    digest = hashlib.sha256(f"korquad-features-v{CACHE_VERSION}\0".encode())
    if os.path.isdir(input_file):  # a KorQuAD 2.x directory: its files, and the HTML reader's version
        import korquad2

        digest.update(korquad2.dataset_digest(input_file).encode())
    else:
        _hash_file(digest, input_file)
    _hash_file(digest, settings["vocab_file"])
    key_settings = {"analyzer": settings["analyzer"], "do_lower_case": settings["do_lower_case"],
                    "max_seq_length": max_seq_length, "doc_stride": doc_stride,
                    "max_query_length": max_query_length, "is_training": is_training}
    if version_2_with_negative:  # only then, so that version-1 caches keep their keys
        key_settings["version_2_with_negative"] = True
    digest.update(json.dumps(key_settings, sort_keys=True).encode())
    return digest.hexdigest()


def _cache_path(input_file: Path, cache_dir: Path, analyzer: str, max_seq_length: int, doc_stride: int,
                max_query_length: int, is_training: bool, version_2_with_negative: bool = False) -> Path:
    mode = ("train" if is_training else "eval") + (".v2" if version_2_with_negative else "")
    name = f"{input_file.stem}.{analyzer}.{mode}.{max_seq_length}_{doc_stride}_{max_query_length}"
    stem = re.sub(r"[^\w.-]", "_", name)
    return cache_dir / f"{stem}.features"


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


def _checksum(array: np.ndarray) -> int:
    # crc32 catches any flipped byte or cut run of bytes and reads ~1 GB/s: a train-sized table in ~0.1 s.
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # bytes, no copy; empty arrays too


def _read_cached_table(directory: Path, key: str, num_examples: int | None) -> FeatureTable | None:
    """The cached table, memory-mapped read-only, if it exists, carries `key`, every array matches
    its recorded shape, type and checksum, and the windows hang together (for `num_examples`
    examples; None: as many as the cache says, which its key ties to the data file); otherwise None."""
    index_path = directory / TABLE_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        logger.warning("feature cache %s is unreadable (%s); rebuilding", index_path, error)
        return None
    if not isinstance(index, dict) or index.get("key") != key:
        logger.info("feature cache %s is stale; rebuilding", directory)
        return None
    arrays = {}
    try:
        for name in TABLE_ARRAYS:
            expected = index["arrays"][name]
            array = np.load(directory / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if (list(array.shape) != expected["shape"] or array.dtype.str != expected["dtype"]
                    or _checksum(array) != expected["crc32"]):
                raise ValueError(f"{name}.npy does not match its recorded shape, type or checksum")
            arrays[name] = array
        table = FeatureTable(arrays)
        problem = table.check(index["num_examples"] if num_examples is None else num_examples)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("feature cache %s is damaged (%s); rebuilding", directory, error)
        return None
    if problem:
        logger.warning("feature cache %s is inconsistent (%s); rebuilding", directory, problem)
        return None
    return table


def _cache_key(directory: Path) -> str | None:
    """The key a cache directory's index records, None if it has no readable index."""
    try:
        index = json.loads((directory / TABLE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index.get("key") if isinstance(index, dict) else None


def _is_writable_dir(directory: Path) -> bool:
    """Whether `directory` (or, if missing, its nearest existing parent) may be written to.

    Checks the write bits as well as os.access: root may write anywhere, but a directory without
    any write bit (a shared, read-only data folder) is meant to be left alone.
    """
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory.is_dir() and os.access(directory, os.W_OK) and bool(directory.stat().st_mode & 0o222)


def _write_cached_table(table: FeatureTable, directory: Path, key: str, metadata: dict[str, Any]) -> bool:
    """Write the table as one `.npy` file per array plus `table.json` (key, shapes, checksums) into a
    temporary directory, then rename it into place: readers see the old cache or the new one, whole."""
    if not _is_writable_dir(directory.parent):
        logger.warning("%s is not writable: features are not cached (pass cache_dir to cache them elsewhere)",
                       directory.parent)
        return False
    temp = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    old = directory.with_name(f".{directory.name}.{os.getpid()}.{secrets.token_hex(4)}.old.tmp")
    try:
        temp.mkdir(parents=True)
        index = {"key": key, "cache_version": CACHE_VERSION, "num_examples": len(table.example_context),
                 "num_features": len(table), **metadata, "arrays": {}}
        for name, array in table.arrays.items():
            array = np.ascontiguousarray(array)
            with open(temp / f"{name}.npy", "wb") as file:
                np.save(file, array, allow_pickle=False)
                file.flush()
                os.fsync(file.fileno())
            index["arrays"][name] = {"shape": list(array.shape), "dtype": array.dtype.str,
                                     "crc32": _checksum(array)}
        atomic_write(temp / TABLE_INDEX, lambda file: file.write(json.dumps(index, indent=1).encode("utf-8")))
        if directory.exists():
            directory.rename(old)  # a reader that has it mapped keeps its files until it closes them
        temp.rename(directory)
    except OSError as error:
        if _cache_key(directory) == key:  # another process (a second run on the same data) got there first
            logger.info("feature cache %s was written by another process meanwhile; using it", directory)
            return True
        logger.warning("cannot write the feature cache in %s (%s): features are not cached",
                       directory.parent, error.strerror or error)
        return False
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    logger.info("feature cache written: %s", directory)
    return True


def load_or_build_features(input_file: str | os.PathLike, tokenizer: Any, max_seq_length: int, doc_stride: int,
                           max_query_length: int, is_training: bool, cache_dir: str | os.PathLike | None = None,
                           overwrite_cache: bool = False, num_workers: int = 1, progress: bool = True,
                           version_2_with_negative: bool = False) -> tuple[list[SquadExample], FeatureTable]:
    """Examples read from `input_file`, and their feature table from the cache when it is current.

    The cache is a directory of `.npy` arrays plus `table.json` (no pickle) in `cache_dir`, by default
    `cache/` beside the data file, keyed by `feature_cache_key`. The table comes back memory-mapped
    from it, also right after building it, so every process of a machine reads the same pages. A
    damaged cache is rebuilt with a warning; one that cannot be written (read-only data directory) is
    skipped with a warning and the table stays in memory. `version_2_with_negative` reads
    unanswerable questions (see `read_squad_examples`).
    """
    examples = read_squad_examples(input_file, is_training, version_2_with_negative)
    return examples, _load_or_build_table(Path(input_file), examples, tokenizer, max_seq_length, doc_stride,
                                          max_query_length, is_training, version_2_with_negative, cache_dir,
                                          not overwrite_cache, num_workers, progress)


def load_or_build_table(input_file: str | os.PathLike, tokenizer: Any, max_seq_length: int, doc_stride: int,
                        max_query_length: int, is_training: bool, cache_dir: str | os.PathLike | None = None,
                        overwrite_cache: bool = False, num_workers: int = 1, progress: bool = True,
                        version_2_with_negative: bool = False) -> FeatureTable:
    """`load_or_build_features` without the examples, for training, which needs only the windows: a
    cache hit then never parses the JSON file (its key already vouches for the contents), so each
    process of a run holds little beyond the shared, memory-mapped table."""
    input_file = Path(input_file)
    table = None if overwrite_cache else _read_cached_table(
        _cache_directory(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                         version_2_with_negative, cache_dir),
        feature_cache_key(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                          version_2_with_negative), None)
    if table is not None:
        logger.info("features loaded from cache for %s", input_file)
        return table
    return _load_or_build_table(input_file, read_squad_examples(input_file, is_training, version_2_with_negative),
                                tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                                version_2_with_negative, cache_dir, False, num_workers, progress)


def _cache_directory(input_file: Path, tokenizer: Any, max_seq_length: int, doc_stride: int, max_query_length: int,
                     is_training: bool, version_2_with_negative: bool, cache_dir: str | os.PathLike | None) -> Path:
    return _cache_path(input_file, Path(cache_dir) if cache_dir else input_file.parent / "cache",
                       _tokenizer_settings(tokenizer)["analyzer"], max_seq_length, doc_stride, max_query_length,
                       is_training, version_2_with_negative)


def _load_or_build_table(input_file: Path, examples: list[SquadExample], tokenizer: Any, max_seq_length: int,
                         doc_stride: int, max_query_length: int, is_training: bool, version_2_with_negative: bool,
                         cache_dir: str | os.PathLike | None, read_cache: bool, num_workers: int,
                         progress: bool) -> FeatureTable:
    key = feature_cache_key(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                            version_2_with_negative)
    directory = _cache_directory(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                                 version_2_with_negative, cache_dir)
    table = _read_cached_table(directory, key, len(examples)) if read_cache else None
    if table is not None:
        logger.info("features loaded from cache %s", directory)
        return table
    table = _build_feature_table(examples, tokenizer, max_seq_length, doc_stride, max_query_length,
                                 is_training, num_workers, progress)
    written = _write_cached_table(table, directory, key, {
        "input_file": str(input_file), **_tokenizer_settings(tokenizer), "max_seq_length": max_seq_length,
        "doc_stride": doc_stride, "max_query_length": max_query_length, "is_training": is_training,
        "version_2_with_negative": version_2_with_negative})
    # Map what was just written, dropping the built copy: this process then holds no private copy.
    return (written and _read_cached_table(directory, key, len(examples))) or table


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


def collate_features(table: FeatureTable, indices: Sequence[int], is_training: bool, pad_id: int = 0,
                     pad_to_multiple: int | None = None, max_width: int | None = None,
                     pad_rows_to: int | None = None) -> dict[str, np.ndarray]:
    """Windows `indices` of `table`, padded to the longest of them: int64 numpy arrays `input_ids`,
    `token_type_ids`, `attention_mask` (1 = real token) and, for training, `start_positions`/
    `end_positions`. Cut from the flat arrays here, so no window exists before its batch does;
    `torch.from_numpy` turns each array into a tensor without a copy.

    For a compiled model, which compiles once per input shape: `pad_to_multiple` pads the width up
    to a multiple of it (at most `max_width`), and `pad_rows_to` adds filler rows up to that many
    rows. A filler row attends only to its first token and its positions are -1, which the loss
    ignores, so real rows train and predict as without it.
    """
    if len(indices) == 0:
        raise ValueError("collate_features needs at least one window")
    indices = np.asarray(indices, dtype=np.int64)
    lengths = table.lengths[indices]
    width = int(lengths.max())
    if pad_to_multiple is not None:
        width = bucket_width(width, pad_to_multiple, max_width)
    rows = max(len(indices), pad_rows_to or 0)
    input_ids = np.full((rows, width), pad_id, dtype=np.int64)
    token_type_ids = np.zeros((rows, width), dtype=np.int64)
    attention_mask = np.zeros((rows, width), dtype=np.int64)
    for row, index in enumerate(indices.tolist()):
        length = int(lengths[row])
        input_ids[row, :length] = table.input_ids(index)
        token_type_ids[row, table.prefix[index]:length] = 1
        attention_mask[row, :length] = 1
    attention_mask[len(indices):, 0] = 1  # a row with no key to attend to would give NaN
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
    if is_training:
        positions = np.full((rows, 2), -1, dtype=np.int64)
        positions[:len(indices)] = table.feature_positions[indices]
        batch["start_positions"], batch["end_positions"] = positions[:, 0].copy(), positions[:, 1].copy()
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


def _masked_logits(table: FeatureTable, indices: range, start_logits: Sequence,
                   end_logits: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(windows, longest) start and end logits of the windows `indices`, -inf wherever a span may
    not start or end."""
    lengths = table.lengths[indices]
    real = np.arange(lengths.max()) < lengths[:, None]
    for index, length, row_start, row_end in zip(indices, lengths, start_logits, end_logits):
        if min(len(row_start), len(row_end)) < length:
            raise ValueError(f"logits of window {index} are shorter than its {length} input ids")
    # Flat per-token values scattered into the padded arrays; padding stays -inf.
    start = np.full(real.shape, -np.inf)
    start[real] = np.concatenate([np.asarray(row[:n], dtype=np.float64) for row, n in zip(start_logits, lengths)])
    end = np.full(real.shape, -np.inf)
    end[real] = np.concatenate([np.asarray(row[:n], dtype=np.float64) for row, n in zip(end_logits, lengths)])
    in_context, max_context = table.context_masks(indices, real.shape[1])
    return np.where(max_context, start, -np.inf), np.where(in_context, end, -np.inf)


def _rank_spans(table: FeatureTable, indices: range, start_logits: Sequence, end_logits: Sequence,
                n_best_size: int, max_answer_length: int) -> _RankedSpans:
    """Pair each window's `n_best_size` best valid starts and ends; keep the valid pairs."""
    start, end = _masked_logits(table, indices, start_logits, end_logits)
    k = min(n_best_size, start.shape[1])
    top_starts, top_ends = _top_k(start, k), _top_k(end, k)
    start_values = np.take_along_axis(start, top_starts, axis=1)
    end_values = np.take_along_axis(end, top_ends, axis=1)
    span_lengths = top_ends[:, None, :] - top_starts[:, :, None] + 1
    scores = start_values[:, :, None] + end_values[:, None, :]
    valid = (span_lengths >= 1) & (span_lengths <= max_answer_length) & np.isfinite(scores)
    pair_scores = np.where(valid, scores, -np.inf).reshape(len(indices), k * k)
    return _RankedSpans(pair_scores, start_values, end_values, top_starts, top_ends, block=n_best_size)


def _softmax(scores: list[float]) -> list[float]:
    highest = max(scores)
    exps = [math.exp(score - highest) for score in scores]
    total = sum(exps)
    return [value / total for value in exps]


def gold_logits(table: FeatureTable, null_label: bool = False) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits pointing at each training window's gold start/end (flat in windows without the answer).

    Decoding these measures the pipeline's own ceiling: what a perfect model could score after
    tokenization, windowing and decoding. With `null_label` (version 2), a window labelled [CLS]
    (no answer in it, or an unanswerable question) points at [CLS] instead of staying flat, as the
    model is trained to.
    """
    starts, ends = [], []
    for length, (start_position, end_position) in zip(table.lengths.tolist(), table.feature_positions.tolist()):
        start, end = np.zeros(length, np.float32), np.zeros(length, np.float32)
        if start_position or null_label:
            start[start_position] = end[end_position] = 10.0
        starts.append(start)
        ends.append(end)
    return starts, ends


@_gc_paused()
def decode_predictions(examples: Sequence[SquadExample], table: FeatureTable, start_logits: Sequence,
                       end_logits: Sequence, n_best_size: int = 20, max_answer_length: int = 30,
                       progress: bool = False) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    """Best answer text per question, and its n-best list, from per-window start/end logits.

    `start_logits[i]`/`end_logits[i]` belong to window i of `table` and are at least as long as its
    input ids. Candidates pair the `n_best_size` best starts (at max-context pieces) and ends of each
    window's context, `start <= end`, at most `max_answer_length` pieces. Answer texts are slices of
    the original context, and each n-best entry carries its `start`/`end` character offsets
    (`context[start:end] == text`); duplicates are dropped; probabilities are a softmax over the kept
    ones. A question without any valid candidate gets "" (n-best offsets None).
    """
    if len(start_logits) != len(table) or len(end_logits) != len(table):
        raise ValueError(f"got {len(start_logits)} start and {len(end_logits)} end logit rows "
                         f"for {len(table)} windows")
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(f"n_best_size ({n_best_size}) and max_answer_length ({max_answer_length}) must be >= 1")
    if len(table) and not 0 <= int(table.feature_example.min()) <= int(table.feature_example.max()) < len(examples):
        raise ValueError(f"the windows point at examples beyond the {len(examples)} given")
    candidate_streams: dict[int, list] = {}
    for begin in range(0, len(table), _DECODE_CHUNK):
        indices = range(begin, min(begin + _DECODE_CHUNK, len(table)))
        chunk = slice(indices.start, indices.stop)
        ranked = _rank_spans(table, indices, start_logits[chunk], end_logits[chunk], n_best_size, max_answer_length)
        for row, example_index in enumerate(table.feature_example[chunk].tolist()):
            candidate_streams.setdefault(example_index, []).append(ranked.candidates(row, begin + row))

    predictions: dict[str, str] = {}
    nbest: dict[str, list[dict[str, Any]]] = {}
    for example_index, example in enumerate(tqdm(examples, desc="decoding", unit="question", disable=not progress)):
        # Each window's candidates come best first; merge them lazily.
        streams = candidate_streams.get(example_index, [])
        candidates = streams[0] if len(streams) == 1 else heapq.merge(*streams, key=itemgetter(0), reverse=True)
        kept = (_distinct_texts(example.context_text, table, candidates, n_best_size)
                or [("", 0.0, 0.0, 0.0, None, None)])
        probabilities = _softmax([candidate[1] for candidate in kept])
        predictions[example.qas_id] = kept[0][0]
        nbest[example.qas_id] = [
            {"text": text, "probability": probability, "start_logit": start_logit, "end_logit": end_logit,
             "start": start, "end": end}
            for (text, _, start_logit, end_logit, start, end), probability in zip(kept, probabilities)]
    return predictions, nbest


def _distinct_texts(context: str, table: FeatureTable, candidates: Iterator[tuple],
                    n_best_size: int) -> list[tuple[str, float, float, float, int, int]]:
    """(text, score, start logit, end logit, start char, end char) of the first `n_best_size`
    candidates with distinct texts; text == context[start char:end char]."""
    kept: list[tuple[str, float, float, float, int, int]] = []
    seen_texts: set[str] = set()
    for score, start_logit, end_logit, start, end, window in candidates:
        start_char, end_char = table.char_span(window, start, end)
        text = context[start_char:end_char]
        if text not in seen_texts:
            seen_texts.add(text)
            kept.append((text, score, start_logit, end_logit, start_char, end_char))
            if len(kept) == n_best_size:
                break
    return kept


# ----------------------------------------------------------------------------- unanswerable questions


def null_odds(examples: Sequence[SquadExample], feature_example: Sequence[int], start_logits: Sequence,
              end_logits: Sequence, nbest: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Per question: its null score minus its best span's score (higher = more likely no answer).

    The null score is [CLS]'s start + end logit (position 0 of every window), the minimum over the
    question's windows: the window most sure there is an answer decides. The best span's score is
    the start + end logit of the first n-best entry; a question without any valid span gets +inf.
    `feature_example[i]` is the example index of window i, whose logits are `start_logits[i]`.
    """
    null = np.full(len(examples), np.inf)
    cls_scores = np.array([float(start[0]) + float(end[0]) for start, end in zip(start_logits, end_logits)])
    np.minimum.at(null, np.asarray(feature_example, dtype=np.int64), cls_scores)
    odds = {}
    for example, null_score in zip(examples, null.tolist()):
        best = nbest[example.qas_id][0]
        span_score = best["start_logit"] + best["end_logit"] if best["start"] is not None else -math.inf
        odds[example.qas_id] = null_score - span_score
    return odds


def abstain(predictions: dict[str, str], odds: dict[str, float], threshold: float) -> dict[str, str]:
    """`predictions` with "" wherever the null score beats the best span by more than `threshold`."""
    return {qas_id: "" if odds[qas_id] > threshold else text for qas_id, text in predictions.items()}


def no_answer_probability(odds: float) -> float:
    """The two-way softmax of the null score against the best span: sigmoid(null - best).

    "" is predicted exactly where it exceeds sigmoid(threshold), 0.5 at the default threshold 0."""
    return 1.0 / (1.0 + math.exp(-odds)) if odds > -700 else 0.0


def write_null_files(odds: dict[str, float], output_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write `null_odds.json` (null minus best span score per question; +inf, written as 1e30, where
    no span exists) and `na_probs.json` (`no_answer_probability`), both usable as evaluate_v2_0.py's
    --na-prob-file, atomically."""
    output_dir = Path(output_dir)
    paths = output_dir / "null_odds.json", output_dir / "na_probs.json"
    finite = {qas_id: min(value, 1e30) for qas_id, value in odds.items()}
    probabilities = {qas_id: no_answer_probability(value) for qas_id, value in odds.items()}
    for path, content in zip(paths, (finite, probabilities)):
        text = json.dumps(content, ensure_ascii=False, indent=2) + "\n"
        atomic_write(path, lambda file, text=text: file.write(text.encode("utf-8")))
    return paths


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


# ----------------------------------------------------------------------------- teacher targets (distillation)

TEACHER_TARGETS_FORMAT = "korquad-char-targets/1"
TEACHER_TARGETS_NPZ = "teacher_targets.npz"
TEACHER_TARGETS_JSON = "teacher_targets.json"


@dataclass
class TeacherTargets:
    """A teacher's start/end probabilities per question, at the character level (see the README's format).

    Question `i` (id `question_ids[i]`) has start mass `start_probs[b:e]` at the characters
    `start_chars[b:e]` of its context, with `b, e = start_bounds[i], start_bounds[i + 1]`; likewise
    for the end, whose characters are an answer's LAST character (inclusive).
    """
    key: str                  # sha256 over the train file, the teachers and the settings
    train_file_sha256: str
    question_ids: np.ndarray  # unicode strings
    start_bounds: np.ndarray
    start_chars: np.ndarray
    start_probs: np.ndarray
    end_bounds: np.ndarray
    end_chars: np.ndarray
    end_probs: np.ndarray


def sha256_of_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (what identifies a train file, whatever its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_teacher_targets(targets: TeacherTargets, directory: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """`teacher_targets.npz` (the arrays, key inside) and its `teacher_targets.json` sidecar, both or neither:
    each is written to a temporary file, and only once both are on disk are they renamed into place."""
    directory = Path(directory)
    arrays = {field.name: getattr(targets, field.name) for field in fields(TeacherTargets)}
    arrays["key"], arrays["train_file_sha256"] = np.array(targets.key), np.array(targets.train_file_sha256)
    sidecar = {"format": TEACHER_TARGETS_FORMAT, "key": targets.key, "train_file_sha256": targets.train_file_sha256,
               "num_questions": len(targets.question_ids), **metadata}
    sidecar_bytes = (json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    npz_path = directory / TEACHER_TARGETS_NPZ
    atomic_write_files({npz_path: lambda file: np.savez(file, format=np.array(TEACHER_TARGETS_FORMAT), **arrays),
                        directory / TEACHER_TARGETS_JSON: lambda file: file.write(sidecar_bytes)})
    return npz_path


def _one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut short (zipfile quotes whole damaged headers)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _target_arrays_problem(values: dict[str, np.ndarray]) -> str | None:
    """What is wrong with the arrays of a teacher-targets file (types, shapes, bounds, probabilities), or None."""
    if any(values[name].shape != () or values[name].dtype.kind != "U" for name in ("key", "train_file_sha256")):
        return "key or train_file_sha256 is not one string"
    ids = values["question_ids"]
    if ids.ndim != 1 or ids.dtype.kind != "U":
        return "question_ids is not a list of strings"
    for side in ("start", "end"):
        bounds, chars, probs = (values[f"{side}_{name}"] for name in ("bounds", "chars", "probs"))
        if any(array.ndim != 1 for array in (bounds, chars, probs)):
            return f"{side} arrays are not one-dimensional"
        if bounds.dtype.kind not in "iu" or chars.dtype.kind not in "iu" or probs.dtype.kind != "f":
            return f"{side} arrays have the wrong types ({bounds.dtype}, {chars.dtype}, {probs.dtype})"
        if (len(bounds) != len(ids) + 1 or bounds[0] != 0 or (np.diff(bounds) < 0).any()
                or bounds[-1] != len(chars) or len(chars) != len(probs)):
            return f"inconsistent {side}_bounds"
        if len(chars) and chars.min() < 0:
            return f"negative {side}_chars"
        if not np.isfinite(probs).all() or (probs < 0).any():
            return f"{side}_probs that are not finite non-negative numbers"
    return None


def read_teacher_targets(directory: str | os.PathLike) -> TeacherTargets:
    """The targets distill.py wrote into `directory`; `KorquadFormatError` naming the file if it is missing,
    damaged (truncated, a flipped byte: the zip's CRC says so) or holds arrays that do not fit together."""
    path = Path(directory) / TEACHER_TARGETS_NPZ
    if not path.exists():
        raise KorquadFormatError(f"{path}: not found; write the targets with distill.py --output_dir {directory}")
    if not path.is_file():
        raise KorquadFormatError(f"{path}: not a file; write the targets with distill.py --output_dir {directory}")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if str(arrays["format"]) != TEACHER_TARGETS_FORMAT:
                raise KorquadFormatError(f"{path}: format {arrays['format']}, expected {TEACHER_TARGETS_FORMAT}")
            values = {field.name: arrays[field.name] for field in fields(TeacherTargets)}
    except KorquadFormatError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise KorquadFormatError(f"{path}: not teacher targets written by distill.py ({_one_line(error)}); "
                                 f"rerun distill.py") from None
    problem = _target_arrays_problem(values)
    if problem:
        raise KorquadFormatError(f"{path}: {problem}; rerun distill.py")
    return TeacherTargets(**{**values, "key": str(values["key"]), "train_file_sha256": str(values["train_file_sha256"])})


def teacher_targets_are_current(directory: str | os.PathLike, key: str) -> bool:
    """Whether `directory` holds whole targets made under `key`: the npz readable and carrying it, and its
    sidecar readable JSON naming the same key (a damaged or foreign sidecar is written anew with the targets)."""
    directory = Path(directory)
    try:
        if read_teacher_targets(directory).key != key:
            return False
        sidecar = json.loads((directory / TEACHER_TARGETS_JSON).read_text(encoding="utf-8"))
    except (KorquadFormatError, OSError, ValueError):
        return False
    return isinstance(sidecar, dict) and sidecar.get("key") == key


def project_char_targets(token_offsets: np.ndarray, char_positions: np.ndarray, char_probs: np.ndarray,
                         is_end: bool, char_rows: np.ndarray | None = None) -> np.ndarray:
    """Character-level teacher probabilities as distributions over windows' tokens.

    `token_offsets`: one window's (n, 2) [start, end) character offsets, or a batch's (rows, n, 2),
    with -1 for tokens outside the context ([CLS], question, [SEP], padding); context tokens in text
    order. `char_positions`/`char_probs`: characters carrying mass (for an end, an answer's last
    character); with a batch, `char_rows` says which row each belongs to.

    Mass at a character goes to the context token whose span contains it; at a character no token
    covers but inside the window's text (whitespace the student's tokenizer drops) to the next token
    for a start, the previous one for an end; mass outside the window goes to token 0 ([CLS]), as the
    gold label does for an answer outside the window. Each row is normalised to sum to 1 (a sparse
    teacher's dropped tail spread proportionally); a row without any mass stays all zero.
    """
    offsets = np.asarray(token_offsets)
    single = offsets.ndim == 2
    offsets = offsets.reshape(-1, offsets.shape[-2], 2)
    rows, width = offsets.shape[:2]
    chars = np.asarray(char_positions, dtype=np.int64)
    probs = np.asarray(char_probs, dtype=np.float64)
    char_rows = np.zeros(len(chars), np.int64) if char_rows is None else np.asarray(char_rows, dtype=np.int64)
    token_index = np.flatnonzero(offsets[..., 0].ravel() >= 0)
    token_row = token_index // width
    token_start = offsets[..., 0].ravel()[token_index].astype(np.int64)
    token_end = offsets[..., 1].ravel()[token_index].astype(np.int64)
    columns = char_rows * width  # [CLS] of each character's row, unless a token of the window takes it
    if len(token_index):
        # Rows one after another on one axis: row r's character c is r * scale + c.
        scale = int(max(token_end.max(), chars.max(initial=0))) + 2
        query = char_rows * scale + chars
        first = np.searchsorted(token_row, char_rows, side="left")
        last = np.searchsorted(token_row, char_rows, side="right") - 1
        has_tokens = first <= last
        if is_end:  # the last token starting at or before c, if c is before the window's last token ends
            found = np.searchsorted(token_row * scale + token_start, query, side="right") - 1
            inside = has_tokens & (found >= first) & (chars < token_end[np.clip(last, 0, None)])
        else:       # the first token ending after c, if c is not before the window's first token
            found = np.searchsorted(token_row * scale + token_end, query, side="right")
            inside = has_tokens & (found <= last) & (chars >= token_start[np.minimum(first, len(token_index) - 1)])
        columns = np.where(inside, token_index[np.clip(found, 0, len(token_index) - 1)], columns)
    targets = np.zeros(rows * width, np.float64)
    np.add.at(targets, columns, probs)
    targets = targets.reshape(rows, width)
    totals = np.bincount(char_rows, weights=probs, minlength=rows)[:, None]
    targets = np.divide(targets, totals, out=np.zeros_like(targets), where=totals > 0).astype(np.float32)
    return targets[0] if single else targets


def teacher_batch_targets(targets: TeacherTargets, question_rows: Sequence[int],
                          token_offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, width) start and end target distributions of a batch: row i is a window of question
    `question_rows[i]` (an index into `targets`, -1 for a filler row), `token_offsets` its (rows, width, 2)."""
    distributions = []
    for side in ("start", "end"):
        bounds, chars, probs = (getattr(targets, f"{side}_{name}") for name in ("bounds", "chars", "probs"))
        pieces = [(row, bounds[q], bounds[q + 1]) for row, q in enumerate(question_rows) if q >= 0]
        counts = np.array([end - begin for _, begin, end in pieces], dtype=np.int64)
        char_rows = np.repeat(np.array([row for row, _, _ in pieces], dtype=np.int64), counts)
        picked = np.concatenate([np.arange(begin, end) for _, begin, end in pieces] or [np.zeros(0, np.int64)])
        distributions.append(project_char_targets(token_offsets, chars[picked], probs[picked], side == "end",
                                                  char_rows))
    return distributions[0], distributions[1]

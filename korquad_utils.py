"""KorQuAD v1.0 data path: reading the JSON, sliding-window features, batching, n-best decoding.

Flow: `read_squad_examples` -> `convert_examples_to_features` (or `load_or_build_features`, which
caches the features) -> batches from `make_length_grouped_batches` + `collate_features` -> model
logits -> `decode_predictions` -> `write_predictions`.

This module tokenises examples and cuts them into windows (a `FeatureTable`), loads the table from
the feature cache or builds it into it, and batches it (numpy, no torch here). The other steps have
their own modules: reading (`squad_examples`), the table (`feature_table`) and its cache
(`feature_cache`), decoding and writing predictions (`decoding`), distillation targets
(`teacher_targets`) and atomic writes (`atomic_files`). A change to what the windows contain bumps
`feature_cache.CACHE_VERSION`.
"""
from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

# The baseline's names: everything its users import from korquad_utils stays importable from here, also what
# moved to its own module (reading, the table and its cache, decoding, teacher targets, atomic writes).
from atomic_files import atomic_write, atomic_write_files  # noqa: F401
from decoding import (abstain, decode_predictions, gold_logits, no_answer_probability, null_odds,  # noqa: F401
                      write_null_files, write_predictions)
from feature_cache import (CACHE_VERSION, TABLE_INDEX, cache_directory, feature_cache_key,  # noqa: F401
                           read_cached_table, tokenizer_settings, write_cached_table)
from feature_table import TABLE_ARRAYS, FeatureTable, InputFeature, bounds  # noqa: F401
from squad_examples import (KorquadFormatError, SquadExample, load_json_file, read_squad_examples,  # noqa: F401
                            squad_examples_from_json)
from teacher_targets import (TEACHER_TARGETS_FORMAT, TEACHER_TARGETS_JSON, TEACHER_TARGETS_NPZ,  # noqa: F401
                             TeacherTargets, project_char_targets, read_teacher_targets, sha256_of_file,
                             teacher_batch_targets, teacher_targets_are_current, write_teacher_targets)

logger = logging.getLogger(__name__)


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


_CHUNK_SIZE = 16  # texts per task a worker takes


def pool_size(num_workers: int, num_tasks: int) -> int:
    """--preprocess_workers clamped to this machine's CPUs and the chunks of work there are: each worker of a
    Pool is forked up front, so a typo (=4000) would fork that many copies of a torch-loaded process."""
    chunks = max(1, -(-num_tasks // _CHUNK_SIZE))
    cpus = os.cpu_count() or 1
    size = max(1, min(num_workers, cpus, chunks))
    if size < num_workers:
        (logger.warning if num_workers > cpus else logger.info)(
            "--preprocess_workers %d: using %d process(es) (%d CPU(s), %d chunk(s) of %d texts to tokenize)",
            num_workers, size, cpus, chunks, _CHUNK_SIZE)
    return size


def _tokenize_all(tokenizer: Any, contexts: list[str], questions: list[str], num_workers: int,
                  progress: bool) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[list[int]]]:
    """Tokenize each distinct context (with offsets) and question, in `num_workers` processes."""
    global _WORKER_TOKENIZER
    tasks = [(_tokenize_context, text) for text in contexts] + [(_tokenize_question, text) for text in questions]
    bar = tqdm(total=len(tasks), desc="tokenizing", unit="text", disable=not progress)
    if num_workers > 1:
        num_workers = pool_size(num_workers, len(tasks))
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
                for result in pool.imap(_run_in_worker, tasks, chunksize=_CHUNK_SIZE):
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
    unplaced = 0  # training questions whose answer no window holds whole
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
        placed = False
        for span_index, (doc_start, doc_length) in enumerate(windows):
            positions = (0, 0)
            if answer and doc_start <= answer[0] and answer[1] < doc_start + doc_length:
                positions = (answer[0] - doc_start + prefix, answer[1] - doc_start + prefix)
                placed = True
            feature_rows.append((example_index, span_index, doc_start, doc_length, *positions))
            max_context.append(flags[span_index])
        unplaced += bool(answer) and not placed
    if unplaced:
        logger.warning("%d of %d training question(s) have an answer that fits in no window of --max_seq_length %d "
                       "(--doc_stride %d): they train only to [CLS], no answer; a longer --max_seq_length fits more",
                       unplaced, len(examples), max_seq_length, doc_stride)
    rows = np.array(feature_rows, dtype=np.int64).reshape(-1, 6)
    return FeatureTable({
        "special_ids": np.array([tokenizer.cls_token_id, tokenizer.sep_token_id], dtype=np.int64),
        "context_ids": np.concatenate([ids for ids, _ in contexts] or [np.zeros(0, np.int32)]),
        "context_offsets": np.concatenate([offsets for _, offsets in contexts] or [np.zeros((0, 2), np.int32)]),
        "context_bounds": bounds([len(ids) for ids, _ in contexts]),
        "example_context": np.array(example_context, dtype=np.int64),
        "query_ids": np.array(list(chain.from_iterable(example_query)), dtype=np.int32),
        "query_bounds": bounds([len(query) for query in example_query]),
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


# ----------------------------------------------------------------------------- from the cache, or built


def load_or_build_features(input_file: str | os.PathLike, tokenizer: Any, max_seq_length: int, doc_stride: int,
                           max_query_length: int, is_training: bool, cache_dir: str | os.PathLike | None = None,
                           overwrite_cache: bool = False, num_workers: int = 1, progress: bool = True,
                           version_2_with_negative: bool = False, examples: list[SquadExample] | None = None
                           ) -> tuple[list[SquadExample], FeatureTable]:
    """Examples read from `input_file` (or the `examples` already read from it), and their feature table from the
    cache when it is current.

    The cache is a directory of `.npy` arrays plus `table.json` (no pickle) in `cache_dir`, by default
    `cache/` beside the data file, keyed by `feature_cache_key`. The table comes back memory-mapped
    from it, also right after building it, so every process of a machine reads the same pages. A
    damaged cache is rebuilt with a warning; one that cannot be written (read-only data directory) is
    skipped with a warning and the table stays in memory. `version_2_with_negative` reads
    unanswerable questions (see `read_squad_examples`).
    """
    if examples is None:
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
    table = None if overwrite_cache else read_cached_table(
        cache_directory(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                        version_2_with_negative, cache_dir),
        feature_cache_key(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                          version_2_with_negative), None)
    if table is not None:
        logger.info("features loaded from cache for %s", input_file)
        return table
    return _load_or_build_table(input_file, read_squad_examples(input_file, is_training, version_2_with_negative),
                                tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                                version_2_with_negative, cache_dir, False, num_workers, progress)


def _load_or_build_table(input_file: Path, examples: list[SquadExample], tokenizer: Any, max_seq_length: int,
                         doc_stride: int, max_query_length: int, is_training: bool, version_2_with_negative: bool,
                         cache_dir: str | os.PathLike | None, read_cache: bool, num_workers: int,
                         progress: bool) -> FeatureTable:
    key = feature_cache_key(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                            version_2_with_negative)
    directory = cache_directory(input_file, tokenizer, max_seq_length, doc_stride, max_query_length, is_training,
                                version_2_with_negative, cache_dir)
    table = read_cached_table(directory, key, len(examples)) if read_cache else None
    if table is not None:
        logger.info("features loaded from cache %s", directory)
        return table
    table = _build_feature_table(examples, tokenizer, max_seq_length, doc_stride, max_query_length,
                                 is_training, num_workers, progress)
    written = write_cached_table(table, directory, key, {
        "input_file": str(input_file), **tokenizer_settings(tokenizer), "max_seq_length": max_seq_length,
        "doc_stride": doc_stride, "max_query_length": max_query_length, "is_training": is_training,
        "version_2_with_negative": version_2_with_negative})
    # Map what was just written, dropping the built copy: this process then holds no private copy.
    return (written and read_cached_table(directory, key, len(examples))) or table


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

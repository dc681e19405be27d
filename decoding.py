"""Decoding: the n-best answer spans of each question from per-window start/end logits, the null odds of
version 2 (SQuAD 2.0, KLUE-MRC) and abstaining past a threshold, and writing predictions.

Answers are slices of the original context, found through the `FeatureTable`'s offsets and
max-context flags; all in numpy (no torch here).
"""
from __future__ import annotations

import heapq
import json
import math
import os
from collections.abc import Iterator, Sequence
from itertools import chain, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from atomic_files import atomic_write, atomic_write_files
from feature_table import FeatureTable
from squad_examples import SquadExample, gc_paused

# Features whose logits are masked and ranked together in one set of numpy operations; small enough
# that a chunk's (features x length) arrays stay in cache (measured faster than 512 here).
_DECODE_CHUNK = 64


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


@gc_paused()
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

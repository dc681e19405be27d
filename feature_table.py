"""The feature table: every window of a data file as a few flat numpy arrays (`TABLE_ARRAYS`).

Each distinct context's pieces and offsets are stored once and each window is a few integers, so a
KorQuAD-sized table is small, the feature cache stores it as `.npy` files and every process maps the
same pages. `korquad_utils.convert_examples_to_features` builds it; batches are cut from it when
collated, and decoding reads offsets and max-context flags from the same arrays.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


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
        self.max_context_bounds = bounds(self.feature_doc_length)

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


def bounds(lengths: Sequence[int]) -> np.ndarray:
    """Where runs of these lengths, laid back to back, begin and end: [0, l0, l0 + l1, ...] (int64)."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])

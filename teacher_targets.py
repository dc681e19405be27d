"""Teacher targets for distillation: a teacher's start/end probabilities per question at the character
level (`TeacherTargets`, the `teacher_targets.npz` + `.json` that distill.py writes and train.py reads),
and their projection onto each student window's tokens through its character offsets.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from atomic_files import atomic_write_files
from squad_examples import KorquadFormatError


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

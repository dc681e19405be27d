"""The pre-training data: corpus files read into documents, tokenized once into a cached, memory-mapped
token file, cut into pairs of consecutive segments of one document, and masked afresh each epoch
(ALBERT's n-gram whole-word masking and sentence-order swap), as pretrain.py trains on them.

Kept apart from the trainer, as google-research/bert keeps creating pre-training data apart from
running it: nothing here knows about the model beyond the label that marks a padded prediction.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cli import UsageError
from korquad_utils import atomic_write, bucket_width
from long_run import file_digest
from modeling import IGNORE_LABEL
from squad_examples import parse_json
from tokenization import CLS, MASK, SEP, SPECIAL_TOKENS

logger = logging.getLogger("korquad")

TOKEN_CACHE_VERSION = 3   # 3: as feature_cache.CACHE_VERSION 6 (the lower-casing of Σ)
MAX_NGRAM = 3
NGRAM_PROBABILITIES = np.array([1 / n for n in range(1, MAX_NGRAM + 1)]) / sum(1 / n for n in range(1, MAX_NGRAM + 1))
EVAL_EPOCH = 2 ** 32 - 1   # the held-out pairs' masks: drawn once, the same at every evaluation
SENTENCE_END = re.compile(r"(?<=[.?!])\s+")
# The first bytes of compressed files a corpus is often shipped in: named, so that the user knows to unpack it.
COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip-compressed file", b"PK\x03\x04": "zip archive", b"BZh": "bzip2-compressed file",
                    b"\xfd7zXZ\x00": "xz-compressed file", b"(\xb5/\xfd": "zstd-compressed file"}


# --- the corpus ------------------------------------------------------------------------------

def expand_train_files(patterns: Sequence[str]) -> list[Path]:
    """Files for --train_files: paths as given, a quoted glob expanded (shells on Windows/Colab cells may not)."""
    files: list[Path] = []
    for pattern in patterns:
        if not Path(pattern).exists() and glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise UsageError(f"--train_files {pattern}: no file matches")
            files += [Path(match) for match in matches]
        else:
            files.append(Path(pattern))
    for path in files:
        if not path.is_file():
            raise UsageError(f"--train_files {path}: {'a directory' if path.is_dir() else 'file not found'}")
    return files


def read_documents(path: Path) -> Iterator[list[str]]:
    """The documents of one corpus file, each a list of lines (sentences or paragraphs)."""
    if path.suffix.lower() == ".json":
        yield from _json_documents(path)
        return
    document: list[str] = []
    with open(path, "rb") as file:
        head = file.read(8)
        kind = next((name for magic, name in COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
        if kind:
            raise UsageError(f"--train_files {path}: a {kind}, not UTF-8 text; unpack it first")
        file.seek(0)
        for number, raw in enumerate(_lines(file), 1):
            if b"\0" in raw:
                raise UsageError(f"--train_files {path}: line {number} holds a NUL byte: a binary file, not UTF-8 text")
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as err:
                raise UsageError(f"--train_files {path}: line {number} is not UTF-8 text (byte {err.start}); "
                                 f"convert the file to UTF-8") from None
            if line:
                document.append(line)
            elif document:
                yield document
                document = []
    if document:
        yield document


def _lines(file) -> Iterator[bytes]:
    """The lines of a binary file: ended by \n (or \r\n), or by \r in a file of old Mac OS's line endings
    (\r and no \n in its first 64 KiB), which iterating the file would read as one line, one document."""
    sample = file.read(1 << 16)
    file.seek(0)
    if b"\n" in sample or b"\r" not in sample:
        yield from file
        return
    rest = b""
    for block in iter(lambda: file.read(1 << 20), b""):
        # Any line end from here on (a file may switch to \n part way); a last line without its end, or
        # ending in a \r whose \n may open the next block, waits for that block.
        *lines, rest = (rest + block).splitlines(keepends=True)
        if rest.endswith(b"\n"):
            lines.append(rest)
            rest = b""
        yield from lines
    if rest:
        yield rest


def _json_documents(path: Path) -> Iterator[list[str]]:
    """KorQuAD/SQuAD JSON: each distinct context is a document, split into sentences."""
    try:
        dataset = parse_json(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--train_files {path}: not readable JSON ({err})") from None
    articles = dataset.get("data") if isinstance(dataset, dict) else None
    if not isinstance(articles, list):
        raise UsageError(f"--train_files {path}: not KorQuAD/SQuAD JSON (no 'data' list at the top level)")
    seen: set[str] = set()
    for index, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise UsageError(f"--train_files {path}: data[{index}] has no 'paragraphs' list")
        for paragraph in paragraphs:
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str):
                raise UsageError(f"--train_files {path}: a paragraph of data[{index}] has no 'context' string")
            if context.strip() and context not in seen:
                seen.add(context)
                yield [s for s in (part.strip() for part in SENTENCE_END.split(context)) if s]


@dataclass
class TokenFile:
    """A tokenized corpus: all piece ids in one array, lines as [start, end) bounds into it, documents as
    bounds into the lines."""

    ids: np.ndarray            # int32, memory-mapped from the cache
    line_bounds: np.ndarray    # int64, lines + 1
    doc_bounds: np.ndarray     # int64, documents + 1


def token_file_key(files: Sequence[Path], tokenizer, max_seq_length: int) -> str:
    """sha256 over the corpus files' and vocab's contents and the tokenization settings."""
    settings = {"version": TOKEN_CACHE_VERSION, "files": [file_digest("--train_files", f) for f in files],
                "vocab": file_digest("--vocab_file", tokenizer.vocab_file), "analyzer": tokenizer.analyzer_name,
                "do_lower_case": tokenizer.do_lower_case, "max_seq_length": max_seq_length}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def load_or_build_token_file(files: Sequence[Path], tokenizer, max_seq_length: int, cache_dir: Path,
                             overwrite: bool = False, progress: bool = True) -> TokenFile:
    """The corpus's token file from the cache when it is current; otherwise tokenized and cached.

    The ids are written first and the index (which holds the key) last, each atomically: a run
    killed in between leaves no index, and the next run tokenizes again.
    """
    key = token_file_key(files, tokenizer, max_seq_length)
    stem = f"pretrain.{files[0].stem}.{tokenizer.analyzer_name}.{key[:16]}"
    ids_path, index_path = cache_dir / f"{stem}.ids.npy", cache_dir / f"{stem}.index.npz"
    if not overwrite and index_path.is_file() and ids_path.is_file():
        try:
            with np.load(index_path, allow_pickle=False) as index:
                cached = TokenFile(np.load(ids_path, mmap_mode="r"), index["line_bounds"], index["doc_bounds"])
                if str(index["key"]) == key:
                    check_token_file(cached, len(tokenizer.vocab))
                    logger.info("token file loaded from cache %s (%d pieces)", ids_path, len(cached.ids))
                    return cached
        # A damaged cache (a truncated copy, a full disk, bytes flipped) is only a slower start: tokenize again.
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            logger.warning("token file cache %s is damaged (%s); tokenizing again", ids_path.parent,
                           " ".join(str(err).split()))
    tokens = tokenize_corpus(files, tokenizer, max_seq_length - 3, progress)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(ids_path, lambda file: np.save(file, tokens.ids))
        atomic_write(index_path, lambda file: np.savez(file, key=np.array(key), line_bounds=tokens.line_bounds,
                                                       doc_bounds=tokens.doc_bounds))
    except OSError as err:
        logger.warning("cannot write the token file in %s (%s): kept in memory only", cache_dir,
                       err.strerror or err)
        return tokens
    logger.info("token file written: %s (%d pieces, %d lines, %d documents)", ids_path, len(tokens.ids),
                len(tokens.line_bounds) - 1, len(tokens.doc_bounds) - 1)
    return TokenFile(np.load(ids_path, mmap_mode="r"), tokens.line_bounds, tokens.doc_bounds)


def check_token_file(tokens: TokenFile, vocab_size: int) -> None:
    """ValueError unless the arrays are a token file: ids in the vocabulary, bounds ascending and in range."""
    ids, lines, docs = tokens.ids, tokens.line_bounds, tokens.doc_bounds
    if ids.ndim != 1 or ids.dtype != np.int32 or lines.ndim != 1 or docs.ndim != 1 or len(lines) < 2 or len(docs) < 2:
        raise ValueError("arrays of the wrong shape or type")
    if lines[0] != 0 or lines[-1] != len(ids) or docs[0] != 0 or docs[-1] != len(lines) - 1 or (
            np.diff(lines) < 0).any() or (np.diff(docs) <= 0).any():
        raise ValueError(f"line or document bounds do not fit {len(ids)} pieces")
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"piece ids outside the {vocab_size}-piece vocabulary")


def tokenize_corpus(files: Sequence[Path], tokenizer, window: int, progress: bool = True) -> TokenFile:
    """Every document's lines as piece ids; a line longer than `window` pieces is cut at word starts into
    parts that fit (one warning per file names the first such line)."""
    ids: list[np.ndarray] = []
    line_bounds, doc_bounds = [0], [0]
    continuation = continuation_table(tokenizer)
    bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="tokenize",
               disable=not progress)
    done = 0
    for path in files:
        size = path.stat().st_size
        long_lines, first_long = 0, None
        for document in read_documents(path):
            lines_before = len(line_bounds)
            for line in document:
                bar.update(min(len(line.encode("utf-8")) + 1, done + size - bar.n))
                pieces = np.asarray(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(line)), dtype=np.int32)
                if len(pieces) > window:
                    long_lines += 1
                    first_long = first_long or line[:40]
                for part in split_at_word_starts(pieces, continuation, window):
                    ids.append(part)
                    line_bounds.append(line_bounds[-1] + len(part))
            if len(line_bounds) > lines_before:
                doc_bounds.append(len(line_bounds) - 1)
        done += size
        bar.update(done - bar.n)  # JSON syntax is not text: the bar catches up at each file's end
        if long_lines:
            logger.warning("--train_files %s: %d line(s) longer than the %d-piece window (max_seq_length - 3), "
                           "the first starting %r, are cut into parts that fit", path, long_lines, window,
                           first_long)
    bar.close()
    if line_bounds[-1] == 0:
        raise UsageError(f"--train_files {', '.join(map(str, files))}: no text to pre-train on (empty, blank lines "
                         f"only, or JSON without contexts)")
    if len(line_bounds) < 3:
        raise UsageError(f"--train_files {', '.join(map(str, files))}: one line of text only; pre-training pairs "
                         f"consecutive sentences: give a sentence or paragraph a line, a blank line between documents")
    return TokenFile(np.concatenate(ids), np.asarray(line_bounds, np.int64), np.asarray(doc_bounds, np.int64))


def continuation_table(tokenizer) -> np.ndarray:
    """Per vocabulary id: whether the piece continues a word (`##`)."""
    return np.array([tokenizer.ids_to_tokens[i].startswith("##") for i in range(len(tokenizer.ids_to_tokens))])


def split_at_word_starts(pieces: np.ndarray, continuation: np.ndarray, window: int) -> list[np.ndarray]:
    """`pieces` cut into parts of at most `window`, each starting at a word start where one is in reach."""
    parts = []
    while len(pieces) > window:
        starts = np.flatnonzero(~continuation[pieces[1:window + 1]]) + 1
        cut = int(starts[-1]) if len(starts) else window
        parts.append(pieces[:cut])
        pieces = pieces[cut:]
    return parts + ([pieces] if len(pieces) else [])


# --- pairs of segments -----------------------------------------------------------------------

def make_pairs(tokens: TokenFile, continuation: np.ndarray, max_seq_length: int, seed: int,
               documents: range | None = None) -> np.ndarray:
    """(start, middle, end) into `tokens.ids` for each pair: A = ids[start:middle], B = ids[middle:end].

    Consecutive lines of a document fill a pair up to max_seq_length - 3 pieces; A and B split the
    pair at a random line boundary, or inside a single line at a random word start.
    """
    window = max_seq_length - 3
    rng = np.random.default_rng([seed, 1])
    lines = tokens.line_bounds
    pairs = []

    def add_pair(first_line: int, end_line: int) -> None:
        start, end = int(lines[first_line]), int(lines[end_line])
        middle = _split_point(start, end, [int(lines[i]) for i in range(first_line + 1, end_line)], tokens.ids,
                              continuation, rng)
        if middle is not None:
            pairs.append((start, middle, end))

    for doc in documents if documents is not None else range(len(tokens.doc_bounds) - 1):
        first, last = int(tokens.doc_bounds[doc]), int(tokens.doc_bounds[doc + 1])
        chunk_first = first  # every line fits the window (tokenize_corpus cut the longer ones)
        for line in range(first + 1, last + 1):
            if line == last or lines[line + 1] - lines[chunk_first] > window:
                add_pair(chunk_first, line)
                chunk_first = line
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 3)


def _split_point(start: int, end: int, line_starts: list[int], ids: np.ndarray, continuation: np.ndarray,
                 rng: np.random.Generator) -> int | None:
    if line_starts:
        return int(line_starts[rng.integers(len(line_starts))])
    word_starts = np.flatnonzero(~continuation[ids[start + 1:end]]) + start + 1
    return int(word_starts[rng.integers(len(word_starts))]) if len(word_starts) else None


# --- masking ---------------------------------------------------------------------------------

def mask_pieces(ids: np.ndarray, candidate: np.ndarray, continuation: np.ndarray, rng: np.random.Generator, *,
                mask_id: int, random_ids: np.ndarray, masked_lm_prob: float = 0.15, max_predictions: int = 20
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """ALBERT's n-gram whole-word masking of one sequence (pure numpy).

    `candidate`: which positions may be masked ([CLS]/[SEP]/[PAD] may not). A word is a candidate piece
    and the `##` continuations after it. About `masked_lm_prob` of the candidate pieces are masked (at
    most `max_predictions`), as spans of n = 1..3 whole words drawn with probability 1/n; a span that
    would overshoot the share is taken only when that lands nearer to it. At least one word is masked
    (only a word longer than `max_predictions` is cut). Each masked piece becomes [MASK] (80%), a piece from
    `random_ids` (10%) or stays (10%).

    Returns the masked ids, the masked positions (ascending), the original ids there (the labels), and
    the span lengths in words.
    """
    positions = np.flatnonzero(candidate)
    if len(positions) == 0:
        return ids.copy(), positions, ids[positions], []
    previous_candidate = np.r_[False, candidate[:-1]][positions]
    is_start = ~continuation[ids[positions]] | ~previous_candidate | (np.diff(positions, prepend=-2) != 1)
    word_of = np.cumsum(is_start) - 1
    word_first = positions[is_start]
    word_length = np.bincount(word_of)
    num_words = len(word_first)
    target = min(max_predictions, max(1, round(len(positions) * masked_lm_prob)))
    covered = np.zeros(num_words + 1, dtype=np.int64)  # 1 where a word is masked; cumulative sums find gaps
    chosen: list[tuple[int, int]] = []
    count = 0
    while count < target:
        n = int(rng.choice(MAX_NGRAM, p=NGRAM_PROBABILITIES)) + 1
        taken = np.concatenate([[0], np.cumsum(covered[:num_words])])
        starts = np.flatnonzero(taken[n:] - taken[:-n] == 0) if n <= num_words else np.array([], np.int64)
        if len(starts) == 0:
            break
        first = int(starts[rng.integers(len(starts))])
        pieces = int(word_length[first:first + n].sum())
        total = count + pieces
        if total > max_predictions or (total > target and total - target > target - count):
            break
        covered[first:first + n] = 1
        chosen.append((first, n))
        count = total
    if not chosen:
        # The first span drawn did not fit (a short pair of long words, or a small max_predictions): one word that
        # fits, else the first pieces of one, so that no pair is without labels (a batch of such pairs has a NaN loss).
        fitting = np.flatnonzero(word_length <= max_predictions)
        chosen.append((int(fitting[rng.integers(len(fitting))]) if len(fitting) else int(rng.integers(num_words)), 1))
    masked = np.sort(np.concatenate([np.arange(word_first[w], word_first[w] + word_length[w])
                                     for first, n in chosen for w in range(first, first + n)])
                     ).astype(np.int64)[:max_predictions]
    labels = ids[masked]
    output = ids.copy()
    roll = rng.random(len(masked))
    output[masked[roll < 0.8]] = mask_id
    replaced = masked[(roll >= 0.8) & (roll < 0.9)]
    output[replaced] = random_ids[rng.integers(len(random_ids), size=len(replaced))]
    return output, masked, labels, [n for _, n in chosen]


@dataclass
class PairMaker:
    """Turns a pair into a training example for an epoch: SOP swap and masking, reproducible from the seed."""

    ids: np.ndarray
    pairs: np.ndarray
    continuation: np.ndarray
    cls_id: int
    sep_id: int
    mask_id: int
    random_ids: np.ndarray
    seed: int
    masked_lm_prob: float
    max_predictions: int

    def lengths(self) -> np.ndarray:
        return self.pairs[:, 2] - self.pairs[:, 0] + 3

    def pair(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
        """[CLS] A [SEP] B [SEP], or B before A (swapped, half the time): ids, token types, which
        positions may be masked (all but [CLS]/[SEP]), and whether it was swapped."""
        start, middle, end = (int(v) for v in self.pairs[index])
        first, second = self.ids[start:middle], self.ids[middle:end]
        swapped = bool(rng.random() < 0.5)
        if swapped:
            first, second = second, first
        ids = np.concatenate([[self.cls_id], first, [self.sep_id], second, [self.sep_id]]).astype(np.int64)
        types = np.zeros(len(ids), dtype=np.int64)
        types[len(first) + 2:] = 1
        candidate = np.ones(len(ids), dtype=bool)
        candidate[[0, len(first) + 1, len(ids) - 1]] = False
        return ids, types, candidate, swapped

    def example(self, index: int, epoch: int) -> dict[str, np.ndarray]:
        """The pair, swapped or not (sop_label 1 = swapped), masked; the same for the same (seed, epoch, index)."""
        rng = np.random.default_rng([self.seed, epoch, index])
        ids, types, candidate, swapped = self.pair(index, rng)
        masked_ids, positions, labels, _ = mask_pieces(
            ids, candidate, self.continuation, rng, mask_id=self.mask_id, random_ids=self.random_ids,
            masked_lm_prob=self.masked_lm_prob, max_predictions=self.max_predictions)
        return {"input_ids": masked_ids, "token_type_ids": types, "masked_positions": positions,
                "mlm_labels": labels, "sop_label": np.int64(swapped)}


def collate(examples: list[dict[str, np.ndarray]], width_multiple: int | None = None, max_width: int | None = None,
            predictions: int | None = None) -> dict[str, torch.Tensor]:
    """Pad to the batch's longest pair (with --compile: to its bucket) and to its most predictions (with
    --compile: to --max_predictions_per_seq); padded predictions have label IGNORE_LABEL."""
    width = max(len(e["input_ids"]) for e in examples)
    if width_multiple:
        width = bucket_width(width, width_multiple, max_width)
    slots = predictions or max(1, max(len(e["masked_positions"]) for e in examples))
    batch = {"input_ids": np.zeros((len(examples), width), np.int64),
             "token_type_ids": np.zeros((len(examples), width), np.int64),
             "attention_mask": np.zeros((len(examples), width), np.int64),
             "masked_positions": np.zeros((len(examples), slots), np.int64),
             "mlm_labels": np.full((len(examples), slots), IGNORE_LABEL, np.int64),
             "sop_labels": np.array([e["sop_label"] for e in examples], np.int64)}
    for row, e in enumerate(examples):
        length, count = len(e["input_ids"]), len(e["masked_positions"])
        batch["input_ids"][row, :length] = e["input_ids"]
        batch["token_type_ids"][row, :length] = e["token_type_ids"]
        batch["attention_mask"][row, :length] = 1
        batch["masked_positions"][row, :count] = e["masked_positions"]
        batch["mlm_labels"][row, :count] = e["mlm_labels"]
    return {k: torch.from_numpy(v) for k, v in batch.items()}


# --- the training and held-out pairs ---------------------------------------------------------

def build_pair_makers(args: argparse.Namespace, tokenizer, tokens: TokenFile) -> tuple[PairMaker, PairMaker]:
    """Training pairs, and held-out pairs from the last --held_out_share of the documents."""
    continuation = continuation_table(tokenizer)
    num_docs = len(tokens.doc_bounds) - 1
    held_out = min(num_docs - 1, math.ceil(num_docs * args.held_out_share)) if args.held_out_share else 0
    special = {tokenizer.vocab[t] for t in SPECIAL_TOKENS} | {
        i for t, i in tokenizer.vocab.items() if t.startswith("[unused")}
    random_ids = np.array([i for i in range(len(tokenizer.vocab)) if i not in special], dtype=np.int64)

    def maker(documents: range) -> PairMaker:
        pairs = make_pairs(tokens, continuation, args.max_seq_length, args.seed, documents)
        return PairMaker(tokens.ids, pairs, continuation, tokenizer.vocab[CLS], tokenizer.vocab[SEP],
                         tokenizer.vocab[MASK], random_ids, args.seed, args.masked_lm_prob,
                         args.max_predictions_per_seq)

    return maker(range(num_docs - held_out)), maker(range(num_docs - held_out, num_docs))


def most_frequent_piece_accuracy(train: PairMaker, held_out: PairMaker, max_pairs: int) -> tuple[int, float]:
    """The baseline the MLM accuracy must beat: always guessing the training pairs' most frequent piece."""
    # The training documents come first in the token file, the held-out ones after them.
    counts = np.bincount(train.ids[:int(train.pairs[:, 2].max(initial=0))], minlength=len(train.continuation))
    counts[[train.cls_id, train.sep_id, train.mask_id]] = 0
    piece = int(counts.argmax())
    labels = [held_out.example(i, EVAL_EPOCH)["mlm_labels"] for i in range(min(len(held_out.pairs), max_pairs))]
    labels = np.concatenate(labels) if labels else np.array([], np.int64)
    return piece, float((labels == piece).mean()) if len(labels) else 0.0

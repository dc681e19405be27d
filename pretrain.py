"""Continued pre-training: masked LM with n-gram whole-word masking plus sentence-order prediction.

    python3 pretrain.py --checkpoint=pretrain_ckpt/bert_small_ckpt.bin --model_config=data/bert_small.json \
        --train_files corpus/*.txt data/KorQuAD_v1.0_train.json --output_dir=lm_run --max_steps=10000
    torchrun --nproc_per_node=4 pretrain.py ...      # DistributedDataParallel, one share of each batch per rank

The corpus: UTF-8 text, one sentence or paragraph a line, a blank line between documents (BERT's
format), and KorQuAD/SQuAD JSON, whose contexts are documents (split into sentences after . ? !).
It is tokenized once with the fine-tuning analyzer and vocab into a memory-mapped token file
(`cache/` beside the first file, keyed by the files' contents and the settings; a damaged one is
tokenized again, with a warning) and cut into pairs of consecutive segments of one document, up to
--max_seq_length pieces. A compressed file, binary data or a corpus of one line is refused.

Objectives as ALBERT pre-trained: 15% of the pieces masked by whole words, in n-grams of 1-3 words
drawn 6:3:2 (probability 1/n), each masked piece [MASK] 80% / a random piece 10% / kept 10%, at most
--max_predictions_per_seq per pair, drawn afresh each epoch from --seed; half the pairs swapped
(sentence-order label 1). A "word" is a piece and its `##` continuations: with Mecab that is one
morpheme, the unit the published model's vocabulary was built on (an eojeol is 1-3 morphemes, so an
n-gram of up to 3 words covers most eojeols whole). Loss = MLM + SOP.

Writes `output_dir/pretrain_{epoch}.bin` (a plain state dict: `bert.*` + transformers' `cls.*` heads)
after each epoch and at the end, with config.json, vocab.txt and training_args.json, so that the
directory is a `--checkpoint` for train.py (fine-tunes the encoder) and export.py (a transformers
BertForPreTraining directory); `training_log.jsonl`, `training_curves.png` (loss; held-out MLM loss,
MLM accuracy and SOP accuracy) and `training_state.pt` for `--resume`.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import logging
import math
import re
import signal
import sys
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cli import (ArgumentParser, USER_ERRORS, UsageError, add_device_args, finite_float, positive_float, positive_int,
                 prepare_output_dir, run_cli, setup_logging)
from devices import add_compile_args, autocast_context, autocast_dtype, check_compile_args, compile_model
from checkpoints import (SAVED_ARGS_NAME, SAVED_CONFIG_NAME, build_tokenizer, check_checkpoint_file, copy_vocab_into,
                         fetch_hub_model, resolve_model_settings, write_json_atomic)
from cli import refuse_output_over_input
from korquad_utils import atomic_write, bucket_width, make_length_grouped_batches
from long_run import (CheckpointWriteError, DirectoryLocked, Distributed, RunLock, StopSignals, TrainingDiverged,
                      TrainingStopped, build_optimizer, check_same_settings, file_digest, keep_log_until,
                      linear_warmup_decay, read_log, read_loss, read_training_state, remove_dead_temp_files,
                      save_checked, setup_distributed, step_seed)
from modeling import IGNORE_LABEL, BertForPreTraining, Config, count_parameters, load_checkpoint, pretraining_loss
from tokenization import CLS, MASK, SEP, SPECIAL_TOKENS

logger = logging.getLogger("korquad")

STATE_NAME = "training_state.pt"
LOG_NAME = "training_log.jsonl"
CURVES_NAME = "training_curves.png"
CHECKPOINT_PREFIX = "pretrain_"      # pretrain_{epoch}.bin; checkpoints.PRETRAIN_CHECKPOINT_NAME finds them
STATE_KEYS = ("epoch", "steps_in_epoch", "epoch_finished", "global_step", "model", "optimizer", "scheduler",
              "scaler", "settings", "paths", "loss_sum", "loss_count")
TOKEN_CACHE_VERSION = 1
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
        for number, raw in enumerate(file, 1):
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


def _json_documents(path: Path) -> Iterator[list[str]]:
    """KorQuAD/SQuAD JSON: each distinct context is a document, split into sentences."""
    try:
        dataset = json.loads(path.read_bytes().decode("utf-8-sig"))
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
    would overshoot the share is taken only when that lands nearer to it. Each masked piece becomes
    [MASK] (80%), a piece from `random_ids` (10%) or stays (10%).

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
    masked = np.sort(np.concatenate([np.arange(word_first[w], word_first[w] + word_length[w])
                                     for first, n in chosen for w in range(first, first + n)] or [[]])
                     ).astype(np.int64)
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


# --- flags -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Continued pre-training (MLM with n-gram whole-word masking + SOP).")
    parser.add_argument("--train_files", nargs="+", required=True,
                        help="UTF-8 text (a sentence or paragraph a line, a blank line between documents) and/or "
                             "KorQuAD/SQuAD .json files (contexts as documents); globs are expanded.")
    parser.add_argument("--output_dir", required=True, help="Where checkpoints and run files go.")
    parser.add_argument("--checkpoint", default="pretrain_ckpt/bert_small_ckpt.bin",
                        help="Encoder to start from: the published checkpoint, a transformers BertForPreTraining/"
                             "BertForMaskedLM/BertModel directory, a pretrain.py run or its pretrain_N.bin; "
                             "'none' = random initialisation.")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config JSON (if not given: the checkpoint's own, else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="WordPiece vocab (if not given: the checkpoint's own, else data/ko_vocab_32k.txt).")
    parser.add_argument("--analyzer", default=None,
                        help="Morpheme analyzer: mecab, okt, komoran, kkma, hannanum or none "
                             "(if not given: the checkpoint's, else mecab).")
    parser.add_argument("--max_seq_length", type=positive_int, default=512,
                        help="Pieces per pair, [CLS] and two [SEP] included.")
    parser.add_argument("--max_predictions_per_seq", type=positive_int, default=None,
                        help="Most masked pieces per pair (if not given: 15%% of --max_seq_length rounded up to a "
                             "multiple of 4: 20 at 128, 80 at 512).")
    parser.add_argument("--masked_lm_prob", type=finite_float(0.0, 1.0, low_inclusive=False), default=0.15,
                        help="Share of the pieces masked.")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--max_steps", type=positive_int, default=None, help="Optimizer steps to train.")
    steps.add_argument("--num_train_epochs", type=positive_float, default=None,
                       help="Epochs to train (if neither this nor --max_steps is given: 1).")
    parser.add_argument("--train_batch_size", type=positive_int, default=32, help="Pairs per step on each rank.")
    parser.add_argument("--learning_rate", type=positive_float, default=1e-4, help="Peak AdamW learning rate.")
    parser.add_argument("--warmup_proportion", type=finite_float(0.0, 1.0, high_inclusive=False), default=0.01,
                        help="Share of the steps over which the learning rate rises linearly.")
    parser.add_argument("--weight_decay", type=finite_float(0.0), default=0.01,
                        help="AdamW weight decay (not on biases and LayerNorm weights).")
    parser.add_argument("--adam_epsilon", type=positive_float, default=1e-6, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="Gradient norm clipping threshold.")
    parser.add_argument("--held_out_share", type=finite_float(0.0, 0.5), default=0.01,
                        help="Share of the documents (the last ones) held out for the MLM/SOP accuracy curves.")
    parser.add_argument("--max_eval_pairs", type=positive_int, default=1000, help="Held-out pairs evaluated.")
    parser.add_argument("--eval_steps", type=positive_int, default=500,
                        help="Optimizer steps between held-out evaluations (also after each epoch).")
    parser.add_argument("--eval_batch_size", type=positive_int, default=64, help="Pairs per evaluation batch.")
    parser.add_argument("--logging_steps", type=positive_int, default=50, help="Optimizer steps between loss read-outs.")
    parser.add_argument("--save_steps", type=positive_int, default=None,
                        help="Also write the resumable training_state.pt every N optimizer steps "
                             "(if not given: after each epoch only).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the newest training_state.pt in --output_dir, mid-epoch if it was "
                             "written there.")
    parser.add_argument("--seed", type=int, default=42, help="Random seed: initialisation, pairs, masks, order.")
    parser.add_argument("--cache_dir", default=None,
                        help="Where the token file goes (if not given: cache/ beside the first train file).")
    parser.add_argument("--overwrite_cache", action="store_true", help="Tokenize the corpus again.")
    parser.add_argument("--quiet", action="store_true", help="Warnings only, no progress bars.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch
    add_device_args(parser)
    add_compile_args(parser)
    args = parser.parse_args(argv)
    if args.max_predictions_per_seq is None:
        args.max_predictions_per_seq = 4 * math.ceil(args.max_seq_length * args.masked_lm_prob / 4)
    if args.max_steps is None and args.num_train_epochs is None:
        args.num_train_epochs = 1.0
    if args.max_seq_length < 5:
        parser.error(f"argument --max_seq_length: must be at least 5 ([CLS] A [SEP] B [SEP]), got "
                     f"{args.max_seq_length}")
    if args.checkpoint.lower() != "none" and Path(args.checkpoint).exists():
        check_checkpoint_file(args.checkpoint)  # says what to pass instead of a directory
    return args


def run_settings(args: argparse.Namespace, files: Sequence[Path], config: Config, do_lower_case: bool,
                 world_size: int) -> dict:
    """What shapes the run's trajectory; `--resume` must find it unchanged."""
    return {"--train_files": [file_digest("--train_files", f) for f in files],
            "--vocab_file": file_digest("--vocab_file", args.vocab_file), "--analyzer": args.analyzer,
            "lower-casing": do_lower_case, "--max_seq_length": args.max_seq_length,
            "--max_predictions_per_seq": args.max_predictions_per_seq, "--masked_lm_prob": args.masked_lm_prob,
            "--held_out_share": args.held_out_share, "model config": config.to_dict(),
            "global batch (--train_batch_size x ranks)": args.train_batch_size * world_size,
            "--max_steps": args.max_steps, "--num_train_epochs": args.num_train_epochs,
            "--learning_rate": args.learning_rate, "--warmup_proportion": args.warmup_proportion,
            "--weight_decay": args.weight_decay, "--adam_epsilon": args.adam_epsilon,
            "--max_grad_norm": args.max_grad_norm, "--seed": args.seed}


# --- the model -------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, config: Config) -> BertForPreTraining:
    """The pre-training model, from --checkpoint (heads it lacks start fresh) or random initialisation."""
    torch.manual_seed(args.seed)
    model = BertForPreTraining(config)
    if args.checkpoint.lower() == "none":
        logger.warning("--checkpoint none: pre-training from random initialisation")
    else:
        load_checkpoint(model, args.checkpoint)
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, maker: PairMaker, args: argparse.Namespace, device: torch.device,
             amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Held-out MLM loss and accuracy (over masked pieces) and SOP accuracy, with masks fixed for the run."""
    was_training = model.training
    model.eval()
    count = min(len(maker.pairs), args.max_eval_pairs)
    lengths = maker.lengths()[:count]
    loss_sum = correct = predicted = sop_correct = 0.0
    for batch in make_length_grouped_batches(lengths, args.eval_batch_size, shuffle=False):
        inputs = {k: v.to(device) for k, v in collate([maker.example(i, EVAL_EPOCH) for i in batch]).items()}
        with autocast_context(device, amp_dtype):
            mlm_logits, sop_logits = model(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"],
                                           inputs["masked_positions"])
        labels = inputs["mlm_labels"]
        kept = labels != IGNORE_LABEL
        loss_sum += float(torch.nn.functional.cross_entropy(mlm_logits.float()[kept], labels[kept], reduction="sum"))
        correct += float((mlm_logits.argmax(-1)[kept] == labels[kept]).sum())
        predicted += float(kept.sum())
        sop_correct += float((sop_logits.argmax(-1) == inputs["sop_labels"]).sum())
    model.train(was_training)
    return {"eval_mlm_loss": loss_sum / max(predicted, 1), "eval_mlm_accuracy": correct / max(predicted, 1),
            "eval_sop_accuracy": sop_correct / max(count, 1)}


def most_frequent_piece_accuracy(train: PairMaker, held_out: PairMaker, max_pairs: int) -> tuple[int, float]:
    """The baseline the MLM accuracy must beat: always guessing the training pairs' most frequent piece."""
    # The training documents come first in the token file, the held-out ones after them.
    counts = np.bincount(train.ids[:int(train.pairs[:, 2].max(initial=0))], minlength=len(train.continuation))
    counts[[train.cls_id, train.sep_id, train.mask_id]] = 0
    piece = int(counts.argmax())
    labels = [held_out.example(i, EVAL_EPOCH)["mlm_labels"] for i in range(min(len(held_out.pairs), max_pairs))]
    labels = np.concatenate(labels) if labels else np.array([], np.int64)
    return piece, float((labels == piece).mean()) if len(labels) else 0.0


# --- the run ---------------------------------------------------------------------------------

@dataclass
class PretrainingRun:
    args: argparse.Namespace
    ctx: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None
    output_dir: Path
    model: BertForPreTraining
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    settings: dict
    paths: dict
    total_steps: int
    held_out: PairMaker
    stop: StopSignals

    def log(self, record: dict) -> None:
        with open(self.output_dir / LOG_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self, epoch: int, global_step: int) -> None:
        if not self.ctx.is_main or len(self.held_out.pairs) == 0:
            return
        result = evaluate(self.model, self.held_out, self.args, self.device, self.amp_dtype)
        logger.info("step %d held-out: MLM loss %.4f, MLM accuracy %.4f, SOP accuracy %.4f", global_step,
                    result["eval_mlm_loss"], result["eval_mlm_accuracy"], result["eval_sop_accuracy"])
        self.log({"epoch": epoch, "step": global_step, **result})
        write_curves(self.output_dir)

    def save_checkpoint(self, epoch: int) -> None:
        if self.ctx.is_main:
            path = self.output_dir / f"{CHECKPOINT_PREFIX}{epoch}.bin"
            save_checked({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)
            logger.info("wrote %s", path)

    def save_state(self, epoch: int, steps_in_epoch: int, epoch_finished: bool, global_step: int,
                   loss_sum: float = 0.0, loss_count: int = 0) -> None:
        if self.ctx.is_main:
            save_checked({"epoch": epoch, "steps_in_epoch": steps_in_epoch, "epoch_finished": epoch_finished,
                          "global_step": global_step,
                          "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                          "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                          "scaler": self.scaler.state_dict(), "settings": self.settings, "paths": self.paths,
                          "loss_sum": loss_sum, "loss_count": loss_count}, self.output_dir / STATE_NAME)

    def stop_requested(self) -> bool:
        return self.ctx.any_rank(self.stop.requested is not None)

    def stopped(self, global_step: int) -> TrainingStopped:
        sig = self.stop.requested
        message = (f"pretrain.py: stopped by {sig.name if sig else 'a signal on another rank'} after optimizer step "
                   f"{global_step}; the resumable state is in {self.output_dir / STATE_NAME}; to continue, run the "
                   f"same command with --resume") if self.ctx.is_main else ""
        return TrainingStopped(message, 128 + (sig or signal.SIGTERM))


def rank_batches(maker: PairMaker, args: argparse.Namespace, ctx: Distributed, epoch: int) -> list[np.ndarray]:
    """This rank's share of each length-grouped global batch of `epoch` (the same on every rank count)."""
    global_batches = make_length_grouped_batches(maker.lengths(), args.train_batch_size * ctx.world_size,
                                                 shuffle=True, seed=args.seed + epoch)
    return [np.array_split(np.asarray(b), ctx.world_size)[ctx.rank] for b in global_batches
            if len(b) >= ctx.world_size]


def train_one_epoch(run: PretrainingRun, maker: PairMaker, batches: list[np.ndarray], *, epoch: int,
                    first_step: int, global_step: int, pending_loss: tuple[float, int]) -> tuple[int, bool]:
    """Optimizer steps `first_step`.. of `epoch`; returns the global step reached and whether a signal stopped it."""
    args, ctx, device = run.args, run.ctx, run.device
    padding = dict(width_multiple=args.compile_bucket, max_width=args.max_seq_length,
                   predictions=args.max_predictions_per_seq) if args.compile else {}
    loss_sum = torch.full((), pending_loss[0], device=device)  # read back only when shown: no sync per step
    loss_count = pending_loss[1]
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    progress = tqdm(total=len(batches), initial=first_step, desc=f"epoch {epoch}", unit="step",
                    disable=args.quiet or not ctx.is_main)
    run.train_model.train()
    for step in range(first_step, len(batches)):
        torch.manual_seed(step_seed(args.seed, epoch, step, ctx.rank))
        inputs = {k: v.to(device, non_blocking=True)
                  for k, v in collate([maker.example(int(i), epoch) for i in batches[step]], **padding).items()}
        with autocast_context(device, run.amp_dtype):
            mlm_logits, sop_logits = run.train_model(inputs["input_ids"], inputs["token_type_ids"],
                                                     inputs["attention_mask"], inputs["masked_positions"])
        loss = pretraining_loss(mlm_logits, sop_logits, inputs["mlm_labels"], inputs["sop_labels"])
        run.scaler.scale(loss).backward()
        loss = loss.detach()
        first_bad_step = torch.where(~torch.isfinite(loss) & (first_bad_step < 0), global_step + 1, first_bad_step)
        loss_sum += loss
        loss_count += 1
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        global_step += 1
        progress.update(1)
        finished = step + 1 == len(batches) or global_step >= run.total_steps
        if global_step % args.logging_steps == 0 or finished:
            mean_loss = read_loss(loss_sum, loss_count, first_bad_step, ctx)
            lr = run.scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if ctx.is_main:
                run.log({"epoch": epoch, "step": global_step, "loss": mean_loss, "lr": lr})
            loss_sum.zero_()
            loss_count = 0
        if finished:
            break  # the epoch's end evaluates and writes the state
        if global_step % args.eval_steps == 0:
            run.evaluate(epoch, global_step)
        stopping = run.stop_requested()
        if stopping or (args.save_steps and global_step % args.save_steps == 0):
            read_loss(loss_sum, loss_count, first_bad_step, ctx)  # never save weights a NaN has touched
            run.save_state(epoch, step + 1, False, global_step, float(loss_sum), loss_count)
            if stopping:
                progress.close()
                return global_step, True
    progress.close()
    return global_step, False


def write_curves(output_dir: Path) -> None:
    """Training loss, and held-out MLM loss, MLM accuracy and SOP accuracy, over optimizer steps, as one PNG."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", CURVES_NAME)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir / LOG_NAME)
    panels = [("training loss (MLM + SOP)", "loss"), ("held-out MLM loss", "eval_mlm_loss"),
              ("held-out MLM accuracy", "eval_mlm_accuracy"), ("held-out SOP accuracy", "eval_sop_accuracy")]
    baseline = next((r["baseline_mlm_accuracy"] for r in records if "baseline_mlm_accuracy" in r), None)
    figure, axes = plt.subplots(1, 4, figsize=(18, 4), gridspec_kw=dict(left=0.05, right=0.98, wspace=0.3))
    for axis, (title, key) in zip(axes, panels):
        points = [r for r in records if key in r]
        axis.plot([r["step"] for r in points], [r[key] for r in points], marker="o" if "eval" in key else None)
        axis.set(title=title, xlabel="optimizer step")
        axis.grid(alpha=0.3)
    if baseline is not None:
        axes[2].axhline(baseline, color="gray", linestyle="--", label="most frequent piece")
        axes[2].legend()
    try:
        atomic_write(output_dir / CURVES_NAME, lambda file: figure.savefig(file, format="png", dpi=100))
    finally:
        plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ctx, device = setup_distributed(args.no_cuda)
    setup_logging(args.quiet or not ctx.is_main)
    try:
        run_pretraining(args, ctx, device)
    finally:
        if ctx.enabled:
            dist.destroy_process_group()


def run_pretraining(args: argparse.Namespace, ctx: Distributed, device: torch.device) -> None:
    files = expand_train_files(args.train_files)
    if args.checkpoint.lower() != "none":
        args.checkpoint = fetch_hub_model(args.checkpoint)
        if not Path(args.checkpoint).exists():
            raise UsageError(f"--checkpoint {args.checkpoint}: file not found; download the published checkpoint "
                             f"as pretrain_ckpt/README.md says, or pass --checkpoint none to start from scratch")
    config = resolve_model_settings(args, args.checkpoint)
    # A run's own checkpoints are what --resume goes on rewriting; a new run must not start from one it replaces.
    starts_from = [] if args.resume or args.checkpoint.lower() == "none" else [("--checkpoint", args.checkpoint)]
    written = [*(Path(args.output_dir) / name for name in (STATE_NAME, LOG_NAME, CURVES_NAME, SAVED_CONFIG_NAME,
                                                           SAVED_ARGS_NAME)),
               *Path(args.output_dir).glob(f"{CHECKPOINT_PREFIX}*.bin")]
    refuse_output_over_input("--output_dir", written, [*(("--train_files", file) for file in files), *starts_from])
    if args.max_seq_length > config.max_position_embeddings:
        raise UsageError(f"--max_seq_length {args.max_seq_length} is larger than the model's "
                         f"max_position_embeddings {config.max_position_embeddings}")
    if args.max_predictions_per_seq > args.max_seq_length - 3:
        raise UsageError(f"--max_predictions_per_seq {args.max_predictions_per_seq} is more than the pieces of a "
                         f"pair (--max_seq_length {args.max_seq_length} - 3)")
    check_compile_args(args, device)
    output_dir = prepare_output_dir(args.output_dir)
    lock = RunLock(output_dir)
    ctx.on_main(lock.acquire)
    try:
        if ctx.is_main:
            remove_dead_temp_files(output_dir)
        pretrain_in_locked_dir(args, ctx, device, config, files, output_dir)
    finally:
        if ctx.is_main:
            lock.release()


def pretrain_in_locked_dir(args: argparse.Namespace, ctx: Distributed, device: torch.device, config: Config,
                           files: list[Path], output_dir: Path) -> None:
    amp_dtype = autocast_dtype(args, device)
    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    settings = run_settings(args, files, config, tokenizer.do_lower_case, ctx.world_size)
    paths = {"--train_files": [str(f) for f in files], "--vocab_file": str(args.vocab_file)}
    state = None
    if args.resume:
        if (output_dir / STATE_NAME).is_file():
            state = read_training_state(output_dir / STATE_NAME, STATE_KEYS, "pretrain.py")
            check_same_settings(state["settings"], settings, state["paths"], paths)
        else:
            logger.warning("--resume: no %s in %s, starting from the first epoch", STATE_NAME, output_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else files[0].parent / "cache"
    tokens = ctx.main_first(lambda: load_or_build_token_file(
        files, tokenizer, args.max_seq_length, cache_dir, args.overwrite_cache and ctx.is_main,
        progress=not args.quiet))
    train_pairs, held_out = build_pair_makers(args, tokenizer, tokens)
    batches_per_epoch = len(rank_batches(train_pairs, args, ctx, 0))
    if batches_per_epoch == 0:
        raise UsageError(f"--train_files: {len(train_pairs.pairs)} training pair(s), fewer than the {ctx.world_size} "
                         f"rank(s); add text or lower --held_out_share")
    total_steps = args.max_steps or max(1, int(batches_per_epoch * args.num_train_epochs))
    num_epochs = math.ceil(total_steps / batches_per_epoch)

    model = build_model(args, config) if state is None else BertForPreTraining(config)
    if state is not None:
        model.load_state_dict(state["model"])
    model.to(device)
    optimizer = build_optimizer(model, args, device)
    scheduler = linear_warmup_decay(optimizer, int(total_steps * args.warmup_proportion), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, first_step, global_step, pending_loss = 0, 0, 0, (0.0, 0)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        global_step = state["global_step"]
        if state["epoch_finished"]:
            start_epoch = state["epoch"] + 1
        else:
            start_epoch, first_step = state["epoch"], state["steps_in_epoch"]
            pending_loss = (state["loss_sum"], state["loss_count"])
        logger.info("resuming at epoch %d, step %d of %d (optimizer step %d)", start_epoch, first_step,
                    batches_per_epoch, global_step)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.enabled else model
    train_model = compile_model(train_model, args, device, max_width=args.max_seq_length)
    run = PretrainingRun(args, ctx, device, amp_dtype, output_dir, model, train_model, optimizer, scheduler, scaler,
                         settings, paths, total_steps, held_out, StopSignals())
    if ctx.is_main:
        keep_log_until(output_dir / LOG_NAME, global_step)
        write_json_atomic(config.to_dict(), output_dir / SAVED_CONFIG_NAME)
        copy_vocab_into(args.vocab_file, output_dir)
        write_json_atomic({**vars(args), "checkpoint": str(args.checkpoint), "world_size": ctx.world_size,
                           "global_batch_size": args.train_batch_size * ctx.world_size}, output_dir / SAVED_ARGS_NAME)
        if state is None and len(held_out.pairs):
            piece, accuracy = most_frequent_piece_accuracy(train_pairs, held_out, args.max_eval_pairs)
            logger.info("held-out baseline: always %r gives MLM accuracy %.4f", tokenizer.ids_to_tokens[piece],
                        accuracy)
            run.log({"step": 0, "baseline_piece": tokenizer.ids_to_tokens[piece], "baseline_mlm_accuracy": accuracy})
    logger.info("%d pieces, %d training and %d held-out pairs; %d parameters; %d optimizer steps (%d a epoch); "
                "global batch %d; device %s, autocast %s", len(tokens.ids), len(train_pairs.pairs),
                len(held_out.pairs), count_parameters(model), total_steps, batches_per_epoch,
                args.train_batch_size * ctx.world_size, device, amp_dtype)

    with run.stop:
        for epoch in range(start_epoch, num_epochs):
            if global_step >= total_steps:
                break
            global_step, stopped = train_one_epoch(run, train_pairs, rank_batches(train_pairs, args, ctx, epoch),
                                                   epoch=epoch, first_step=first_step, global_step=global_step,
                                                   pending_loss=pending_loss)
            first_step, pending_loss = 0, (0.0, 0)
            if not stopped:
                run.save_checkpoint(epoch)
                run.save_state(epoch, 0, True, global_step)
                run.evaluate(epoch, global_step)
                stopped = run.stop_requested()
            ctx.barrier()
            if stopped:
                raise run.stopped(global_step)
    if ctx.is_main:
        write_curves(output_dir)
        print(output_dir)


def cli(argv: Sequence[str] | None = None) -> None:
    try:
        main(argv)
    except TrainingStopped as stop:
        if stop.message:
            print(stop.message, file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    run_cli(cli, USER_ERRORS + (TrainingDiverged, CheckpointWriteError, DirectoryLocked))

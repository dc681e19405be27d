"""The feature cache: a `FeatureTable` stored as one `.npy` file per array plus `table.json` (key, shapes,
checksums), memory-mapped read-only by every process that reads it.

`feature_cache_key` hashes everything the windows depend on (the data and vocab contents, the settings);
a cache that is stale, damaged or inconsistent is rebuilt with a message, and one that cannot be written
is skipped. `korquad_utils.load_or_build_features` and `load_or_build_table` are the way in.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from atomic_files import atomic_write
from feature_table import TABLE_ARRAYS, FeatureTable

# The baseline's logger name (this was part of korquad_utils): its messages read and filter as before.
logger = logging.getLogger("korquad_utils")

# Bump whenever reading, tokenising or windowing changes what the features contain.
CACHE_VERSION = 6   # 6: a word-final capital sigma lower-cased on its own (σ), as transformers
# The feature cache's index file: key, settings, and each array's shape, type and checksum.
TABLE_INDEX = "table.json"


def _hash_file(digest: Any, path: str | os.PathLike) -> None:
    # The length prefix keeps two files' bytes from running together ambiguously.
    digest.update(f"{os.path.getsize(path)}\0".encode())
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)


def tokenizer_settings(tokenizer: Any) -> dict[str, Any]:
    """What of the tokenizer the features depend on: its vocab file, analyzer and lower-casing."""
    missing = [name for name in ("vocab_file", "analyzer_name", "do_lower_case") if not hasattr(tokenizer, name)]
    if missing:
        raise TypeError(f"the feature cache needs tokenizer attribute(s) {', '.join(missing)}")
    return {"vocab_file": str(tokenizer.vocab_file), "analyzer": str(tokenizer.analyzer_name),
            "do_lower_case": bool(tokenizer.do_lower_case)}


def feature_cache_key(input_file: str | os.PathLike, tokenizer: Any, max_seq_length: int, doc_stride: int,
                      max_query_length: int, is_training: bool, version_2_with_negative: bool = False) -> str:
    """sha256 over everything the features depend on: the data and vocab contents, and the settings."""
    settings = tokenizer_settings(tokenizer)
    digest = hashlib.sha256(f"korquad-features-v{CACHE_VERSION}\0".encode())
    import korquad2

    if os.path.isdir(input_file):  # a KorQuAD 2.x directory: its files, and the HTML reader's version
        digest.update(korquad2.dataset_digest(input_file).encode())
    else:
        _hash_file(digest, input_file)
        # A file may be KorQuAD 2.x too, whose text the HTML reader extracts; telling would mean parsing the
        # file, which a cache hit never does, so every file's key has the reader's version, from version 2 on
        # (the keys written while it was 1 stay valid).
        if korquad2.READER_VERSION != 1:
            digest.update(f"korquad2-reader-v{korquad2.READER_VERSION}\0".encode())
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


def cache_directory(input_file: Path, tokenizer: Any, max_seq_length: int, doc_stride: int, max_query_length: int,
                    is_training: bool, version_2_with_negative: bool, cache_dir: str | os.PathLike | None) -> Path:
    """The cache directory for these settings: in `cache_dir`, by default `cache/` beside the data file."""
    return _cache_path(input_file, Path(cache_dir) if cache_dir else input_file.parent / "cache",
                       tokenizer_settings(tokenizer)["analyzer"], max_seq_length, doc_stride, max_query_length,
                       is_training, version_2_with_negative)


def _checksum(array: np.ndarray) -> int:
    # crc32 catches any flipped byte or cut run of bytes and reads ~1 GB/s: a train-sized table in ~0.1 s.
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))  # bytes, no copy; empty arrays too


def read_cached_table(directory: Path, key: str, num_examples: int | None) -> FeatureTable | None:
    """The cached table, memory-mapped read-only, if it exists, carries `key`, every array matches
    its recorded shape, type and checksum, and the windows hang together (for `num_examples`
    examples; None: as many as the cache says, which its key ties to the data file); otherwise None."""
    index_path = directory / TABLE_INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):  # none yet, or a --cache_dir that is a file (said on writing)
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


def _unwritable(directory: Path) -> str | None:
    """Why `directory` (or, if missing, its nearest existing parent) may not be written to; None if it may.

    Checks the write bits as well as os.access: root may write anywhere, but a directory without
    any write bit (a shared, read-only data folder) is meant to be left alone.
    """
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if os.access(existing, os.W_OK) and existing.stat().st_mode & 0o222:
        return None
    return f"{existing} is not writable" if existing == directory else \
        f"{directory} does not exist and {existing}, where it would be made, is not writable"


def write_cached_table(table: FeatureTable, directory: Path, key: str, metadata: dict[str, Any]) -> bool:
    """Write the table as one `.npy` file per array plus `table.json` (key, shapes, checksums) into a
    temporary directory, then rename it into place: readers see the old cache or the new one, whole."""
    problem = _unwritable(directory.parent)
    if problem:
        logger.warning("%s: features are not cached (pass --cache_dir a writable directory to cache them)", problem)
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

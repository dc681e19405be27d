"""Rows on the data pipeline's speed: tokenizing, building the feature table (and reading it from its cache),
n-best decoding, and window ownership of one very long context."""
from __future__ import annotations

import argparse

from benchmarks.harness import KQ_SETTINGS, VOCAB_FILE, benchmark, dev_contexts, kq_dev_features, \
    kq_median_seconds, kq_tokenizer


# --- tokenizer (issue 3) -----------------------------------------------------------------

@benchmark("tokenize")
def bench_tokenize(args: argparse.Namespace) -> None:
    """Mecab + WordPiece over every dev context: time, pieces, `##` and [UNK] shares."""
    import time

    from tokenization import BertTokenizer, make_analyzer

    contexts = dev_contexts(args.dev)
    analyzer = make_analyzer("mecab")
    started = time.perf_counter()
    for context in contexts:
        analyzer.spans(context.lower())
    analyzer_seconds = time.perf_counter() - started

    tokenizer = BertTokenizer(VOCAB_FILE, analyzer="mecab")  # fresh: empty caches
    started = time.perf_counter()
    pieces = [piece for context in contexts for piece, _, _ in tokenizer.tokenize_with_offsets(context)]
    seconds = time.perf_counter() - started
    continuations = sum(piece.startswith("##") for piece in pieces)
    unknowns = sum(piece == "[UNK]" for piece in pieces)
    print(f"tokenize.contexts: {len(contexts)}")
    print(f"tokenize.analyzer_only_seconds: {analyzer_seconds:.2f}")
    print(f"tokenize.seconds: {seconds:.2f}")
    print(f"tokenize.pieces: {len(pieces)}")
    print(f"tokenize.continuation_share: {continuations / len(pieces):.2%}")
    print(f"tokenize.unk_share: {unknowns / len(pieces):.3%}")
    # The same vocab on whitespace words (the original baseline): how far from the pretraining pieces it is.
    whitespace_tokenizer = BertTokenizer(VOCAB_FILE, analyzer="none")
    spaced = [piece for context in contexts for piece in whitespace_tokenizer.tokenize(context)]
    print(f"tokenize.continuation_share[analyzer=none]: {sum(p.startswith('##') for p in spaced) / len(spaced):.2%}")



@benchmark("tokenize_long")
def bench_tokenize_long(args: argparse.Namespace) -> None:
    """Mecab + WordPiece over one long document (dev contexts joined, repeated to length): seconds
    per length, and the seconds per 100k characters, which stay flat when tokenization is linear."""
    import time

    from tokenization import BertTokenizer

    joined = " ".join(dev_contexts(args.dev))
    for length in (58_000, 116_000, 232_000, 1_200_000):
        text = (joined * (length // len(joined) + 1))[:length]
        tokenizer = BertTokenizer(VOCAB_FILE, analyzer="mecab")  # fresh: empty caches
        started = time.perf_counter()
        pieces = tokenizer.tokenize_with_offsets(text)
        seconds = time.perf_counter() - started
        print(f"tokenize_long[{length} chars]: {seconds:.2f} s, {len(pieces)} pieces, "
              f"{seconds / length * 100_000:.2f} s per 100k chars")


# --- features, decoding, window ownership (issue 4) --------------------------------------

@benchmark("features")
def bench_features(args: argparse.Namespace) -> None:
    """Reading + Mecab + WordPiece + windows for the dev set, in 1 and 2 processes (target: <= 4.0 s)."""
    from korquad_utils import convert_examples_to_features, read_squad_examples
    for workers in (1, 2):
        seconds = kq_median_seconds(
            lambda tokenizer: convert_examples_to_features(read_squad_examples(args.dev, is_training=False),
                                                           tokenizer, is_training=False, num_workers=workers,
                                                           progress=False, **KQ_SETTINGS),
            prepare=kq_tokenizer)
        print(f"features_dev_s[num_workers={workers}]: {seconds:.2f}")


@benchmark("feature_cache")
def bench_feature_cache(args: argparse.Namespace) -> None:
    """load_or_build_features on the dev set when its cache is current (read + cache load + assembly)."""
    import tempfile
    from korquad_utils import load_or_build_features

    def load(tokenizer, cache_dir: str):
        return load_or_build_features(args.dev, tokenizer, is_training=False, cache_dir=cache_dir, progress=False,
                                      **KQ_SETTINGS)
    with tempfile.TemporaryDirectory() as cache_dir:
        load(kq_tokenizer(), cache_dir)
        seconds = kq_median_seconds(lambda tokenizer: load(tokenizer, cache_dir), prepare=kq_tokenizer)
    print(f"features_dev_s[cache_hit]: {seconds:.2f}")


@benchmark("decode")
def bench_decode(args: argparse.Namespace) -> None:
    """n-best decoding of all dev questions, from gold and from random logits (target: <= 1.0 s)."""
    import numpy as np
    from korquad_utils import decode_predictions, gold_logits
    examples, features = kq_dev_features(args.dev)
    rng = np.random.default_rng(0)
    random_logits = [[rng.normal(size=n).astype(np.float32) for n in features.lengths.tolist()] for _ in range(2)]
    for name, (starts, ends) in (("gold", gold_logits(features)), ("random", random_logits)):
        seconds = kq_median_seconds(lambda _: decode_predictions(examples, features, starts, ends))
        print(f"decode_dev_s[{name}_logits]: {seconds:.2f}")


@benchmark("max_context")
def bench_max_context(args: argparse.Namespace) -> None:
    """Window ownership (max-context flags) of one very long context: time and peak memory (linear in pieces)."""
    import time
    import tracemalloc

    from korquad_utils import _doc_windows, _max_context_flags
    for num_pieces in (80_000, 230_000):
        windows = _doc_windows(num_pieces, 512 - 96 - 3, 128)  # the 512 / 128 / 96 settings
        tracemalloc.start()
        started = time.perf_counter()
        _max_context_flags(windows, num_pieces)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"max_context[{num_pieces} pieces, {len(windows)} windows]: {seconds:.3f} s, peak {peak / 2**20:.1f} MiB")

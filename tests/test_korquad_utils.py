"""korquad_utils: reading, windows, features, cache, batching, decoding and the dev-set oracle."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import korquad_utils as ku
from conftest import ROOT
from evaluate_v1_0 import evaluate


class WhitespaceTokenizer:
    """Test double: each word and each punctuation mark is one piece; ids are stable across processes."""
    cls_token_id, sep_token_id, pad_token_id = 2, 3, 0

    def __init__(self, vocab_file: Path, analyzer_name: str = "whitespace", do_lower_case: bool = True):
        self.vocab_file = vocab_file
        self.analyzer_name = analyzer_name
        self.do_lower_case = do_lower_case
        self.calls = 0

    def tokenize_with_offsets(self, text: str) -> list[tuple[str, int, int]]:
        self.calls += 1
        return [(match.group(), match.start(), match.end()) for match in re.finditer(r"\w+|[^\w\s]", text)]

    def tokenize(self, text: str) -> list[str]:
        self.calls += 1
        return re.findall(r"\w+|[^\w\s]", text)

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [5 + zlib.crc32(token.encode()) % 30000 for token in tokens]


class ExplodingTokenizer(WhitespaceTokenizer):
    """Fails on any tokenization: proves a cache hit tokenizes nothing."""

    def tokenize_with_offsets(self, text):
        raise AssertionError("tokenized despite a cache hit")

    tokenize = tokenize_with_offsets


WORDS = [f"w{i}" for i in range(20)]
CONTEXT = " ".join(WORDS)


def _char_span(words: list[str]) -> tuple[int, str]:
    text = " ".join(words)
    return CONTEXT.index(text), text


def _write_squad(path: Path, paragraphs: list[dict], version: str = "KorQuAD_v1.0") -> Path:
    path.write_text(json.dumps({"version": version, "data": [{"title": "t", "paragraphs": paragraphs}]},
                               ensure_ascii=False), encoding="utf-8")
    return path


def _qa(qid: str, question: str, text: str | None = None, start: int | None = None) -> dict:
    answers = [] if text is None else [{"text": text, "answer_start": start}]
    return {"id": qid, "question": question, "answers": answers}


@pytest.fixture
def tokenizer(tmp_path) -> WhitespaceTokenizer:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-8")
    return WhitespaceTokenizer(vocab)


@pytest.fixture
def long_file(tmp_path) -> Path:
    """20-word context; answers straddling a window edge and at the very end."""
    straddling_start, straddling = _char_span(WORDS[6:10])
    last_start, last = _char_span(WORDS[19:])
    return _write_squad(tmp_path / "long.json", [{"context": CONTEXT, "qas": [
        _qa("straddle", "q0 q1", straddling, straddling_start),
        _qa("end", "q0 q1", last, last_start)]}])


# 2 question pieces + [CLS] [SEP] [SEP] + 8 context pieces = 13; windows step by 3.
WINDOW_SETTINGS = dict(max_seq_length=13, doc_stride=3, max_query_length=8)


def _context_words(feature: ku.InputFeature, context: str = CONTEXT) -> list[str]:
    return [context[start:end] for start, end in filter(None, feature.token_offsets)]


# ----------------------------------------------------------------------------- reading


def test_read_keeps_all_answers_and_training_span(tmp_path):
    path = _write_squad(tmp_path / "d.json", [{"context": "서울은  대한민국의 수도", "qas": [
        {"id": "a", "question": "수도는?", "answers": [{"text": " 대한민국", "answer_start": 4},
                                                      {"text": "대한민국의 수도", "answer_start": 5}]}]}])
    (example,) = ku.read_squad_examples(path, is_training=True)
    assert (example.qas_id, example.question_text, len(example.answers)) == ("a", "수도는?", 2)
    # The training span is the first answer, its surrounding whitespace trimmed.
    assert example.context_text[example.start_char:example.end_char] == "대한민국"
    (for_prediction,) = ku.read_squad_examples(path, is_training=False)
    assert for_prediction.start_char is None and for_prediction.answers == example.answers


def test_mismatched_answer_is_skipped_for_training_with_a_warning(tmp_path, caplog):
    path = _write_squad(tmp_path / "d.json", [{"context": "서울은 대한민국의 수도", "qas": [
        _qa("good", "?", "서울", 0), _qa("bad", "?", "서울", 4), _qa("none", "?"),
        _qa("blank", "\u3000\u200b", "서울", 0)]}])
    with caplog.at_level(logging.WARNING, logger="korquad_utils"):
        examples = ku.read_squad_examples(path, is_training=True)
    assert [ex.qas_id for ex in examples] == ["good"]
    assert "question bad" in caplog.text and "question none" in caplog.text
    assert "question blank: the question is blank" in caplog.text and "skipped 3 of 4" in caplog.text
    # Prediction ignores answer positions: every question stays.
    assert len(ku.read_squad_examples(path, is_training=False)) == 4


@pytest.mark.parametrize("content, fragment", [
    ("{not json", "not valid JSON"),
    ('{"version": "x"}', "missing 'data'"),
    ('{"data": [{"title": "t"}]}', "article 0: missing 'paragraphs'"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', "paragraph 0: missing 'context'"),
    ('{"data": [{"paragraphs": [{"context": "c"}]}]}', "paragraph 0: missing 'qas'"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "?"}]}]}]}', "question 0: missing 'id'"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q7"}]}]}]}', "question q7: missing 'question'"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q7", "question": "?", "answers": '
     '[{"text": "c"}]}]}]}]}', "question q7 answer 0: missing 'answer_start'"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "q", "question": "?"}, '
     '{"id": "q", "question": "?"}]}]}]}', "question q: duplicate question id"),
])
def test_format_errors_name_file_and_spot_in_one_line(tmp_path, content, fragment):
    path = tmp_path / "broken.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ku.KorquadFormatError) as error:
        ku.read_squad_examples(path, is_training=True)
    message = str(error.value)
    assert str(path) in message and fragment in message and "\n" not in message


# ----------------------------------------------------------------------------- windows


def test_long_context_is_cut_into_overlapping_windows(long_file, tokenizer):
    examples = ku.read_squad_examples(long_file, is_training=True)
    features = ku.convert_examples_to_features(examples, tokenizer, is_training=True, progress=False,
                                               **WINDOW_SETTINGS)
    windows = [f for f in features if f.example_index == 0]
    assert [_context_words(f) for f in windows] == [WORDS[s:s + 8] for s in (0, 3, 6, 9, 12)]
    for feature in features:
        assert len(feature.input_ids) <= 13
        assert feature.input_ids[0] == tokenizer.cls_token_id
        assert feature.input_ids[3] == feature.input_ids[-1] == tokenizer.sep_token_id
        assert feature.segment_ids == [0] * 4 + [1] * (len(feature.input_ids) - 4)
        assert feature.token_offsets[:4] == [None] * 4 and feature.token_offsets[-1] is None
        assert len(feature.token_offsets) == len(feature.token_is_max_context) == len(feature.input_ids)
    assert [f.unique_id for f in features] == list(range(len(features)))
    assert [f.doc_span_index for f in windows] == list(range(5))


def test_answer_straddling_a_window_edge_is_labelled_only_where_it_fits(long_file, tokenizer):
    examples = ku.read_squad_examples(long_file, is_training=True)
    features = ku.convert_examples_to_features(examples, tokenizer, is_training=True, progress=False,
                                               **WINDOW_SETTINGS)
    # Answer w6..w9; windows start at 0, 3, 6, 9, 12 with 4 pieces before the context.
    positions = [(f.start_position, f.end_position) for f in features if f.example_index == 0]
    assert positions == [(0, 0), (6 - 3 + 4, 9 - 3 + 4), (4, 7), (0, 0), (0, 0)]
    for feature, (start, end) in zip(features, positions):
        if start:
            assert CONTEXT[feature.token_offsets[start][0]:feature.token_offsets[end][1]] == "w6 w7 w8 w9"


def test_answer_at_the_very_end_of_the_context(long_file, tokenizer):
    examples = ku.read_squad_examples(long_file, is_training=True)
    features = ku.convert_examples_to_features(examples, tokenizer, is_training=True, progress=False,
                                               **WINDOW_SETTINGS)
    last_window = [f for f in features if f.example_index == 1][-1]
    assert last_window.start_position == last_window.end_position == len(last_window.input_ids) - 2
    assert CONTEXT[slice(*last_window.token_offsets[last_window.start_position])] == "w19"


def test_each_piece_is_max_context_in_the_window_centring_it(long_file, tokenizer):
    examples = ku.read_squad_examples(long_file, is_training=False)
    windows = [f for f in ku.convert_examples_to_features(examples, tokenizer, is_training=False,
                                                          progress=False, **WINDOW_SETTINGS)
               if f.example_index == 0]
    owner = {}
    for number, feature in enumerate(windows):
        for word, is_max in zip(_context_words(feature), feature.token_is_max_context[4:-1]):
            if is_max:
                assert word not in owner, f"{word} is max-context in two windows"
                owner[word] = number
        assert not any(feature.token_is_max_context[:4]) and not feature.token_is_max_context[-1]
    assert sorted(owner, key=WORDS.index) == WORDS
    # Hand-computed: w5 ties between windows 0 and 1 (2 pieces on its short side in both): the first
    # wins; w6 has 1 piece right of it in window 0, 3 in window 1, 0 left of it in window 2.
    assert owner["w0"] == 0 and owner["w5"] == 0 and owner["w6"] == 1 and owner["w10"] == 2
    assert owner["w17"] == owner["w19"] == 4


def test_answer_glued_to_neighbouring_pieces(tmp_path, tokenizer):
    context = "수도(서울)이다."
    path = _write_squad(tmp_path / "g.json", [{"context": context, "qas": [_qa("g", "q", "서울", 3)]}])
    (feature,) = ku.convert_examples_to_features(ku.read_squad_examples(path, True), tokenizer, 16, 4, 4, True,
                                                 progress=False)
    # Pieces: [CLS] q [SEP] 수도 ( 서울 ) 이다 . [SEP]
    assert (feature.start_position, feature.end_position) == (5, 5)


def test_windows_leave_no_gap_when_the_stride_exceeds_the_window(long_file, tokenizer):
    examples = ku.read_squad_examples(long_file, is_training=False)
    features = ku.convert_examples_to_features(examples, tokenizer, 13, 50, 8, False, progress=False)
    assert [_context_words(f) for f in features if f.example_index == 0] == [WORDS[:8], WORDS[8:16], WORDS[16:]]


def test_question_is_cut_to_max_query_length(tmp_path, tokenizer):
    path = _write_squad(tmp_path / "q.json", [{"context": "a b c", "qas": [_qa("q", "q0 q1 q2 q3 q4 q5", "b", 2)]}])
    examples = ku.read_squad_examples(path, is_training=True)
    (feature,) = ku.convert_examples_to_features(examples, tokenizer, max_seq_length=16, doc_stride=4,
                                                 max_query_length=3, is_training=True, progress=False)
    assert feature.input_ids[1:4] == tokenizer.convert_tokens_to_ids(["q0", "q1", "q2"])
    assert feature.input_ids[4] == tokenizer.sep_token_id
    assert (feature.start_position, feature.end_position) == (6, 6)


def test_each_context_and_question_is_tokenized_once(tmp_path, tokenizer):
    qas = [_qa(f"q{i}", "same question", "b", 2) for i in range(5)]
    path = _write_squad(tmp_path / "d.json", [{"context": "a b c", "qas": qas}])
    features = ku.convert_examples_to_features(ku.read_squad_examples(path, True), tokenizer, 16, 4, 4, True,
                                               progress=False)
    assert len(features) == 5 and tokenizer.calls == 2


def test_file_without_answers_gives_features_and_predictions(tmp_path, tokenizer):
    path = _write_squad(tmp_path / "test.json", [{"context": "서울은 대한민국의 수도", "qas": [
        {"id": "t1", "question": "수도는?"}, {"id": "t2", "question": "어디?"}]}])
    examples = ku.read_squad_examples(path, is_training=False)
    features = ku.convert_examples_to_features(examples, tokenizer, 32, 8, 8, is_training=False, progress=False)
    logits = [np.arange(len(f.input_ids), dtype=np.float32) for f in features]
    predictions, _ = ku.decode_predictions(examples, features, logits, logits)
    assert set(predictions) == {"t1", "t2"} and all(p in examples[0].context_text for p in predictions.values())


TWO_WORKERS = """
import sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
import korquad_utils as ku
from test_korquad_utils import WINDOW_SETTINGS, WhitespaceTokenizer
tokenizer = WhitespaceTokenizer(Path({vocab!r}))
examples = ku.read_squad_examples(Path({data!r}), is_training=True)
one = ku.convert_examples_to_features(examples, tokenizer, is_training=True, progress=False, **WINDOW_SETTINGS)
two = ku.convert_examples_to_features(examples, tokenizer, is_training=True, num_workers=2, progress=False,
                                      **WINDOW_SETTINGS)
print(len(one), one == two)
"""


def test_two_workers_build_the_same_features(long_file, tokenizer):
    """In a process of its own, as train.py forks its tokenizing workers: a pytest worker that has run other tests
    holds threads (progress-bar monitors, compile pools, kernel clients) that a fork must not copy mid-lock."""
    script = TWO_WORKERS.format(root=str(ROOT), tests=str(ROOT / "tests"), vocab=str(tokenizer.vocab_file),
                                data=str(long_file))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, same = result.stdout.split()
    assert int(count) > 2 and same == "True"


def test_impossible_lengths_are_refused(long_file, tokenizer):
    examples = ku.read_squad_examples(long_file, is_training=True)
    with pytest.raises(ValueError, match="max_seq_length"):
        ku.convert_examples_to_features(examples, tokenizer, 10, 3, 8, True)
    with pytest.raises(ValueError, match="doc_stride"):
        ku.convert_examples_to_features(examples, tokenizer, 64, 0, 8, True)


# ----------------------------------------------------------------------------- feature cache


def _cached(path, tokenizer, cache_dir, **overrides):
    settings = dict(max_seq_length=13, doc_stride=3, max_query_length=8, is_training=True, cache_dir=cache_dir,
                    progress=False) | overrides
    return ku.load_or_build_features(path, tokenizer, **settings)


def test_cache_hit_skips_tokenization(long_file, tokenizer, tmp_path):
    cache_dir = tmp_path / "cache"
    examples, built = _cached(long_file, tokenizer, cache_dir)
    (table_dir,) = cache_dir.iterdir()
    assert table_dir.suffix == ".features"
    assert sorted(p.name for p in table_dir.iterdir()) == sorted([f"{name}.npy" for name in ku.TABLE_ARRAYS]
                                                                 + ["table.json"])
    for name in ku.TABLE_ARRAYS:   # plain arrays: no pickle needed, none allowed
        assert np.load(table_dir / f"{name}.npy", allow_pickle=False).dtype != object
    hit_examples, hit = _cached(long_file, ExplodingTokenizer(tokenizer.vocab_file), cache_dir)
    assert hit == built and hit_examples == examples
    # Both the build and the hit are read-only maps of the cache files, not private copies.
    for table in (built, hit):
        assert all(isinstance(array, np.memmap) and not array.flags.writeable for array in table.arrays.values())
    # overwrite_cache rebuilds even though the cache is current.
    with pytest.raises(AssertionError, match="despite a cache hit"):
        _cached(long_file, ExplodingTokenizer(tokenizer.vocab_file), cache_dir, overwrite_cache=True)


@pytest.mark.parametrize("change", ["vocab", "analyzer", "lower_case", "length", "stride", "file"])
def test_cache_misses_when_anything_it_depends_on_changes(long_file, tokenizer, tmp_path, change):
    cache_dir = tmp_path / "cache"
    _cached(long_file, tokenizer, cache_dir)
    original_key = ku.feature_cache_key(long_file, tokenizer, 13, 3, 8, True)
    vocab, analyzer, lower_case, overrides = tokenizer.vocab_file, "whitespace", True, {}
    if change == "vocab":
        vocab.write_text(vocab.read_text(encoding="utf-8") + "[MASK]\n", encoding="utf-8")
    elif change == "analyzer":
        analyzer = "other"
    elif change == "lower_case":
        lower_case = False
    elif change == "length":
        overrides = {"max_seq_length": 14}
    elif change == "stride":
        overrides = {"doc_stride": 4}
    else:
        long_file.write_text(long_file.read_text(encoding="utf-8").replace("q0 q1", "q0 q2"), encoding="utf-8")
    changed = ExplodingTokenizer(vocab, analyzer, lower_case)
    with pytest.raises(AssertionError, match="despite a cache hit"):
        _cached(long_file, changed, cache_dir, **overrides)
    # The key itself changes, not only the cache file's name.
    key_settings = dict(max_seq_length=13, doc_stride=3, max_query_length=8, is_training=True)
    assert original_key != ku.feature_cache_key(long_file, changed, **key_settings | overrides)


@pytest.mark.parametrize("damage", ["cut in half", "flipped byte in the ids", "foreign array", "foreign index"])
def test_damaged_cache_is_rebuilt_with_a_warning(long_file, tokenizer, tmp_path, caplog, damage):
    cache_dir = tmp_path / "cache"
    _, built = _cached(long_file, tokenizer, cache_dir)
    expected = {name: np.array(array) for name, array in built.arrays.items()}
    (table_dir,) = cache_dir.iterdir()
    ids = table_dir / "context_ids.npy"
    data = bytearray(ids.read_bytes())
    if damage == "cut in half":
        ids.write_bytes(data[:len(data) // 2])
    elif damage == "flipped byte in the ids":
        data[-3] ^= 0x10   # inside the array's data, past the .npy header: a different piece id
        ids.write_bytes(bytes(data))
    elif damage == "foreign array":   # a well-formed array of the right shape from somewhere else
        np.save(ids, np.zeros(len(expected["context_ids"]), np.int32))
    else:
        (table_dir / "table.json").write_text(json.dumps({"key": "another file's key"}))
    del built
    with caplog.at_level(logging.INFO, logger="korquad_utils"):
        _, rebuilt = _cached(long_file, tokenizer, cache_dir)
    assert ("stale" if damage == "foreign index" else "damaged") in caplog.text
    assert all(np.array_equal(rebuilt.arrays[name], expected[name]) for name in ku.TABLE_ARRAYS)
    # The rebuilt cache is whole again: the next load is a hit.
    _, hit = _cached(long_file, ExplodingTokenizer(tokenizer.vocab_file), cache_dir)
    assert hit == rebuilt


def test_a_file_without_usable_windows_caches_an_empty_table(tmp_path, tokenizer):
    path = _write_squad(tmp_path / "d.json", [{"context": CONTEXT, "qas": [_qa("q", "q0", "not in it", 3)]}])
    for _ in range(2):   # built and written, then read back from the cache
        _, table = _cached(path, tokenizer, tmp_path / "cache")
        assert len(table) == 0 and table.num_examples == 0


def test_cache_defaults_beside_the_data(long_file, tokenizer):
    _cached(long_file, tokenizer, None)
    assert len(list((long_file.parent / "cache").glob("long.*.features"))) == 1


def test_read_only_data_dir_is_left_alone(tmp_path, tokenizer, caplog):
    read_only = tmp_path / "shared"
    read_only.mkdir()
    data = _write_squad(read_only / "d.json", [{"context": CONTEXT, "qas": [_qa("q", "q0", "w1", 3)]}])
    read_only.chmod(0o555)   # even root, who could write here, must not
    try:
        with caplog.at_level(logging.WARNING, logger="korquad_utils"):
            _, features = _cached(data, tokenizer, None)
        assert features and "not writable" in caplog.text
        assert sorted(p.name for p in read_only.iterdir()) == ["d.json"]
    finally:
        read_only.chmod(0o755)


def test_unwritable_cache_dir_only_costs_the_cache(long_file, tokenizer, tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="korquad_utils"):
        _, features = _cached(long_file, tokenizer, blocker / "cache")
    assert features and "not cached" in caplog.text



def test_the_uncached_warning_names_the_flag_and_what_is_wrong(long_file, tokenizer, tmp_path, caplog):
    """A --cache_dir that is a file is "not a directory" (and no "unreadable cache" warning before it); one
    missing under an unwritable directory names that directory, the one that failed."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for cache_dir, problem in ((a_file, f"{a_file} is not a directory"),
                                   (locked / "sub", f"{locked / 'sub'} does not exist and {locked}, where it would "
                                                    f"be made, is not writable")):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="korquad_utils"):
                _, features = _cached(long_file, tokenizer, cache_dir)
            assert features and [r.getMessage() for r in caplog.records] == [
                f"{problem}: features are not cached (pass --cache_dir a writable directory to cache them)"]
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------- batching


def test_batches_without_shuffle_are_longest_first():
    lengths = [5, 9, 1, 7, 3, 8, 2]
    batches = ku.make_length_grouped_batches(lengths, batch_size=3, shuffle=False)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [lengths[i] for b in batches for i in b] == sorted(lengths, reverse=True)


def test_shuffled_batches_are_seeded_permutations_that_pad_little():
    rng = np.random.default_rng(1)
    lengths = rng.integers(20, 512, size=1003).tolist()
    batches = ku.make_length_grouped_batches(lengths, batch_size=8, shuffle=True, seed=3, group_factor=10)
    assert sorted(i for b in batches for i in b) == list(range(1003))
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 1003 % 8
    assert batches == ku.make_length_grouped_batches(lengths, 8, shuffle=True, seed=3, group_factor=10)
    assert batches != ku.make_length_grouped_batches(lengths, 8, shuffle=True, seed=4, group_factor=10)

    def padding(batch_list):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batch_list)
    permutation = rng.permutation(1003).tolist()
    random_batches = [permutation[i:i + 8] for i in range(0, 1003, 8)]
    assert padding(batches) < 0.2 * padding(random_batches)


def _hand_made_table() -> ku.FeatureTable:
    """Two questions ([7] and [8, 6]) on two contexts ([4] and [9, 4, 5]); one window each, the second
    window holding context pieces 1..2 only."""
    arrays = dict(special_ids=[2, 3], context_ids=np.array([4, 9, 4, 5], np.int32),
                  context_offsets=np.array([[0, 1], [0, 2], [3, 4], [5, 6]], np.int32), context_bounds=[0, 1, 4],
                  example_context=[0, 1], query_ids=np.array([7, 8, 6], np.int32), query_bounds=[0, 1, 3],
                  feature_example=[0, 1], feature_span_index=[0, 1], feature_doc_start=[0, 1],
                  feature_doc_length=[1, 2], feature_positions=[[3, 3], [5, 6]], max_context=[True, True, False])
    return ku.FeatureTable({name: np.asarray(value) for name, value in arrays.items()})


def test_collate_pads_to_the_longest_in_the_batch():
    table = _hand_made_table()
    assert table.lengths.tolist() == [5, 7] and table.check(num_examples=2) is None
    batch = ku.collate_features(table, [0, 1], is_training=True, pad_id=0)
    assert batch["input_ids"].tolist() == [[2, 7, 3, 4, 3, 0, 0], [2, 8, 6, 3, 4, 5, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["start_positions"].tolist() == [3, 5] and batch["end_positions"].tolist() == [3, 6]
    assert all(isinstance(array, np.ndarray) and array.dtype == np.int64 for array in batch.values())
    assert ku.collate_features(table, [1], is_training=False)["input_ids"].tolist() == [[2, 8, 6, 3, 4, 5, 3]]
    assert set(ku.collate_features(table, [0], is_training=False)) == {"input_ids", "token_type_ids", "attention_mask"}
    # The on-demand window view agrees with the table.
    window = table.feature(1)
    assert window.input_ids == [2, 8, 6, 3, 4, 5, 3] and window.segment_ids == [0] * 4 + [1] * 3
    assert window.token_offsets == [None] * 4 + [(3, 4), (5, 6), None]
    assert window.token_is_max_context == [False] * 4 + [True, False, False]
    assert (window.start_position, window.end_position) == (5, 6)


# ----------------------------------------------------------------------------- decoding


def _windowed(long_file, tokenizer):
    examples = ku.read_squad_examples(long_file, is_training=False)
    features = ku.convert_examples_to_features(examples, tokenizer, is_training=False, progress=False,
                                               **WINDOW_SETTINGS)
    return examples, features


def _logits(features, marks: dict[int, dict[int, float]], pad: int = 0) -> list[list[float]]:
    """Per feature: 0 everywhere (plus `pad` extra entries), with `marks[feature][position]` set."""
    rows = []
    for number, feature in enumerate(features):
        row = [0.0] * (len(feature.input_ids) + pad)
        for position, value in marks.get(number, {}).items():
            row[position] = value
        rows.append(row)
    return rows


def test_decode_returns_exact_context_slices_best_first(tmp_path, tokenizer):
    context = "서울은  대한민국의\t수도이다"
    path = _write_squad(tmp_path / "d.json", [{"context": context, "qas": [_qa("q", "수도는?")]}])
    examples = ku.read_squad_examples(path, is_training=False)
    features = ku.convert_examples_to_features(examples, tokenizer, 32, 8, 8, False, progress=False)
    # Pieces: [CLS] 수도는 ? [SEP] 서울은 대한민국의 수도이다 [SEP]; best span: 서울은..대한민국의
    starts = _logits(features, {0: {4: 5.0, 5: 1.0, 1: 50.0}}, pad=7)   # 1 is the question: never a candidate
    ends = _logits(features, {0: {5: 4.0, 4: 2.0, 6: -1.0, 7: 60.0}}, pad=7)   # 7 is the final [SEP]
    predictions, nbest = ku.decode_predictions(examples, features, starts, ends)
    assert predictions == {"q": "서울은  대한민국의"}
    texts = [entry["text"] for entry in nbest["q"]]
    assert texts[:3] == ["서울은  대한민국의", "서울은", "대한민국의"]
    assert all(text in context for text in texts) and len(set(texts)) == len(texts) == 6
    assert sum(entry["probability"] for entry in nbest["q"]) == pytest.approx(1.0)
    assert [entry["probability"] for entry in nbest["q"]] == sorted((e["probability"] for e in nbest["q"]),
                                                                     reverse=True)
    assert (nbest["q"][0]["start_logit"], nbest["q"][0]["end_logit"]) == (5.0, 4.0)
    # max_answer_length 1: only single pieces remain.
    predictions, _ = ku.decode_predictions(examples, features, starts, ends, max_answer_length=1)
    assert predictions == {"q": "서울은"}


def test_decode_starts_only_at_max_context_pieces(long_file, tokenizer):
    examples, features = _windowed(long_file, tokenizer)
    # w5 is seen in windows 0 (position 4+5) and 1 (position 4+2) but is max-context only in window 0,
    # so "w5 w6" from window 1 is no candidate; w6 (4+3 in window 1) is max-context there.
    starts = _logits(features, {1: {6: 9.0}, 0: {9: 1.0}})
    ends = _logits(features, {1: {7: 9.0}, 0: {9: 1.0}})
    predictions, _ = ku.decode_predictions(examples, features, starts, ends)
    assert predictions["straddle"] == "w6"


def test_decode_drops_duplicate_texts(tmp_path, tokenizer):
    path = _write_squad(tmp_path / "d.json", [{"context": "서울 부산 서울", "qas": [_qa("q", "?")]}])
    examples = ku.read_squad_examples(path, is_training=False)
    features = ku.convert_examples_to_features(examples, tokenizer, 16, 4, 4, False, progress=False)
    # Pieces: [CLS] ? [SEP] 서울 부산 서울 [SEP]: both 서울 spans score 10, one is kept.
    logits = _logits(features, {0: {3: 5.0, 5: 5.0}})
    _, nbest = ku.decode_predictions(examples, features, logits, logits)
    # Scores: 서울 and 서울 부산 서울 tie at 10, 서울 부산 and 부산 서울 at 5, 부산 is 0. The order
    # within a tie is not specified; the ranking between scores and the probabilities are.
    texts = [entry["text"] for entry in nbest["q"]]
    assert len(texts) == len(set(texts)) == 5
    assert set(texts[:2]) == {"서울", "서울 부산 서울"} and set(texts[2:4]) == {"서울 부산", "부산 서울"}
    assert texts[4] == "부산"
    probabilities = [entry["probability"] for entry in nbest["q"]]
    assert probabilities[0] == pytest.approx(probabilities[1]) and probabilities[2] == pytest.approx(probabilities[3])
    assert probabilities[1] > probabilities[2] > probabilities[4]
    # With n_best_size 2 the two best pairs are both 서울; the next text must still be found.
    starts, ends = _logits(features, {0: {3: 1.0, 5: 5.0}}), _logits(features, {0: {3: 10.0, 5: 5.0}})
    _, nbest = ku.decode_predictions(examples, features, starts, ends, n_best_size=2)
    assert [(e["text"], e["start_logit"], e["end_logit"]) for e in nbest["q"]] == [("서울", 1.0, 10.0),
                                                                                 ("서울 부산 서울", 1.0, 5.0)]


def test_decode_without_any_valid_candidate_gives_empty_text(tmp_path, tokenizer):
    path = _write_squad(tmp_path / "d.json", [{"context": "   ", "qas": [_qa("q", "what")]}])
    examples = ku.read_squad_examples(path, is_training=False)
    features = ku.convert_examples_to_features(examples, tokenizer, 16, 4, 4, False, progress=False)
    predictions, nbest = ku.decode_predictions(examples, features, _logits(features, {}), _logits(features, {}))
    assert predictions == {"q": ""} and nbest["q"][0]["text"] == ""


def test_decode_refuses_logits_shorter_than_the_feature(long_file, tokenizer):
    examples, features = _windowed(long_file, tokenizer)
    short = [row[:-1] for row in _logits(features, {})]
    with pytest.raises(ValueError, match="shorter than its 13 input ids"):
        ku.decode_predictions(examples, features, short, short)


def test_write_predictions_is_utf8_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "out"
    paths = ku.write_predictions({"q": "서울"}, {"q": [{"text": "서울", "probability": 1.0,
                                                        "start_logit": 1.0, "end_logit": 2.0}]}, out)
    assert [p.name for p in paths] == ["predictions.json", "nbest_predictions.json"]
    assert '"서울"' in paths[0].read_text(encoding="utf-8")
    assert json.loads(paths[1].read_text(encoding="utf-8"))["q"][0]["end_logit"] == 2.0
    assert sorted(p.name for p in out.iterdir()) == ["nbest_predictions.json", "predictions.json"]


def test_a_write_that_fails_half_way_leaves_the_old_file(tmp_path):
    target = tmp_path / "predictions.json"
    target.write_text('{"q": "old"}', encoding="utf-8")

    def fail_half_way(file):
        file.write(b'{"q": "ne')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ku.atomic_write(target, fail_half_way)
    assert target.read_text(encoding="utf-8") == '{"q": "old"}'
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.json"]


# ----------------------------------------------------------------------------- the dev-set oracle


def test_oracle_reaches_the_ceiling_on_the_dev_set(dev_file, vocab_file):
    tokenization = pytest.importorskip("tokenization")
    tokenizer = tokenization.BertTokenizer(str(vocab_file), analyzer="mecab", do_lower_case=True)
    examples = ku.read_squad_examples(dev_file, is_training=True)
    features = ku.convert_examples_to_features(examples, tokenizer, 512, 128, 96, is_training=True, progress=False)
    predictions, _ = ku.decode_predictions(examples, features, *ku.gold_logits(features))
    with open(dev_file, encoding="utf-8") as file:
        scores = evaluate(json.load(file)["data"], predictions)
    assert scores["exact_match"] >= 99.65 and scores["f1"] >= 99.9, scores


def test_the_data_path_runs_without_torch(tmp_path, long_file):
    """Reading, windows, the cache, collation and decoding import no torch (the ONNX deployment has none)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('torch is not installed here')\n")
    (tmp_path / "v.txt").write_text("[PAD]\n")
    script = (f"import sys; sys.path[:0] = [{str(blocker)!r}, {str(Path(ku.__file__).parent)!r}]\n"
              "import korquad_utils as ku\n"
              "from test_korquad_utils import WhitespaceTokenizer\n"
              f"examples, table = ku.load_or_build_features({str(long_file)!r}, "
              f"WhitespaceTokenizer({str(tmp_path / 'v.txt')!r}), 13, 3, 8, False, cache_dir={str(tmp_path)!r}, "
              "progress=False)\n"
              "batch = ku.collate_features(table, range(len(table)), is_training=False)\n"
              "logits = [batch['attention_mask'][i, :n].astype(float) for i, n in enumerate(table.lengths)]\n"
              "predictions, _ = ku.decode_predictions(examples, table, logits, logits)\n"
              "print(len(predictions), 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "False"]


def test_preprocess_workers_are_clamped_to_the_cpus_and_the_work(monkeypatch, caplog, tokenizer):
    """Every worker of a Pool forks up front: --preprocess_workers=4000 must not fork 4000 processes."""
    monkeypatch.setattr(ku.os, "cpu_count", lambda: 2)
    with caplog.at_level(logging.INFO, logger="korquad_utils"):
        assert ku.pool_size(4000, 10_000) == 2
        assert ku.pool_size(2, 20) == 2 and ku.pool_size(2, 16) == 1 and ku.pool_size(1, 5) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "--preprocess_workers 4000: using 2 process(es) (2 CPU(s)" in warnings[0].getMessage()
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]

    # One chunk of work: tokenized in this process, nothing forked.
    def no_fork(*args, **kwargs):
        raise AssertionError("forked a pool for one chunk of work")
    monkeypatch.setattr(ku.multiprocessing, "get_context", no_fork)
    contexts, questions = ku._tokenize_all(tokenizer, ["a b c"], ["q"], num_workers=4000, progress=False)
    assert len(contexts) == 1 and len(questions) == 1


def test_the_korquad2_reader_version_is_in_a_single_files_cache_key(monkeypatch, tokenizer):
    """A reader change alters a 2.x file's extracted text: its cached windows must not be reused, for one file as
    for a directory."""
    import korquad2
    file = ROOT / "data" / "korquad2_sample" / "korquad2.1_dev_00.json"
    before = {path: ku.feature_cache_key(path, tokenizer, 192, 64, 32, False) for path in (file, file.parent)}
    monkeypatch.setattr(korquad2, "READER_VERSION", korquad2.READER_VERSION + 1)
    after = {path: ku.feature_cache_key(path, tokenizer, 192, 64, 32, False) for path in (file, file.parent)}
    assert before[file] != after[file] and before[file.parent] != after[file.parent]


def test_training_questions_whose_answer_fits_in_no_window_are_counted_in_one_warning(long_file, tokenizer, caplog):
    """Such a question trains only to [CLS] in every window: a file of many (2.x tables at a short
    --max_seq_length) would train on noise unseen."""
    examples = ku.read_squad_examples(long_file, is_training=True)
    with caplog.at_level(logging.WARNING, logger="korquad_utils"):
        # 3 context pieces a window: the 4-word answer fits in none, the 1-word one does.
        table = ku.convert_examples_to_features(examples, tokenizer, 8, 2, 2, is_training=True, progress=False)
        assert all(tuple(p) == (0, 0) for p, e in zip(table.feature_positions, table.feature_example) if e == 0)
        ku.convert_examples_to_features(examples, tokenizer, **WINDOW_SETTINGS, is_training=True, progress=False)
    assert [r.getMessage() for r in caplog.records] == [
        "1 of 2 training question(s) have an answer that fits in no window of --max_seq_length 8 (--doc_stride 2): "
        "they train only to [CLS], no answer; a longer --max_seq_length fits more"]

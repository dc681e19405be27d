"""Tests of the morpheme-level tokenizer: each stage, each edge, and the dev-set figures."""
from __future__ import annotations

import json
import logging
import re
import shutil
import sys

import pytest

import tokenization
from conftest import SAMPLE_FILE, VOCAB_FILE, sample_texts
from tokenization import (BertTokenizer, SurfaceAnalyzer, TokenizerError, clean, complete_spans,
                          lower_case, make_analyzer)

SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "a", "##a", "."]


@pytest.fixture(scope="module")
def mecab_tokenizer(vocab_file) -> BertTokenizer:
    return BertTokenizer(vocab_file, analyzer="mecab")


@pytest.fixture
def small_vocab_file(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SMALL_VOCAB) + "\n", encoding="utf-8")
    return path


def assert_offsets_exact(text: str, pieces: list[tuple[str, int, int]]) -> None:
    """Every piece spells its span; pieces are in order; every non-separator is covered once."""
    covered = []
    previous_end = 0
    for index, (piece, start, end) in enumerate(pieces):
        assert previous_end <= start < end <= len(text), (piece, start, end)
        if piece == "[UNK]":
            # an unknown word is whole: no continuation of it follows directly
            following = pieces[index + 1] if index + 1 < len(pieces) else None
            assert not (following and following[1] == end and following[0].startswith("##"))
        else:
            assert text[start:end].lower() == piece.removeprefix("##"), (piece, text[start:end])
        covered.extend(range(start, end))
        previous_end = end
    expected = [i for i, char in enumerate(text) if not tokenization.is_separator(char)]
    assert covered == expected


# --- vocab and ids -------------------------------------------------------------------------

def test_vocab_ids_are_line_numbers_and_special_ids_come_from_the_file(mecab_tokenizer, vocab_file):
    lines = vocab_file.read_text(encoding="utf-8").split("\n")[:-1]
    assert len(mecab_tokenizer) == len(mecab_tokenizer.vocab) == len(lines) == 32000
    # the real vocab has a blank line: it must keep its id or every later id would shift
    assert mecab_tokenizer.ids_to_tokens[31999] == lines[31999]
    assert mecab_tokenizer.vocab["에서"] == lines.index("에서")
    assert [mecab_tokenizer.pad_token_id, mecab_tokenizer.unk_token_id, mecab_tokenizer.cls_token_id,
            mecab_tokenizer.sep_token_id, mecab_tokenizer.mask_token_id] == [0, 1, 2, 3, 4]
    assert list(mecab_tokenizer.vocab)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_convert_tokens_and_ids(mecab_tokenizer):
    ids = mecab_tokenizer.convert_tokens_to_ids(["[CLS]", "에서", "no-such-token", "[SEP]"])
    assert ids[0] == 2 and ids[2] == 1 and ids[3] == 3
    assert mecab_tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "에서", "[UNK]", "[SEP]"]
    with pytest.raises(TokenizerError, match="40000"):
        mecab_tokenizer.convert_ids_to_tokens([5, 40000])


def test_the_sample_vocab_cuts_the_sample_into_the_pieces_the_full_vocab_does(sample_vocab):
    """Training tests use the cut vocab for speed; what they claim holds only if the pieces are the same."""
    vocab, config = sample_vocab
    assert 500 < config["vocab_size"] < 5000
    for analyzer in ("none", "mecab"):
        full, cut = BertTokenizer(VOCAB_FILE, analyzer=analyzer), BertTokenizer(vocab, analyzer=analyzer)
        for text in sample_texts():
            assert cut.tokenize_with_offsets(text) == full.tokenize_with_offsets(text)


def test_max_len_warns_on_longer_sequences(small_vocab_file, caplog):
    tokenizer = BertTokenizer(small_vocab_file, analyzer="none", max_len=3)
    with caplog.at_level(logging.WARNING, logger="tokenization"):
        tokenizer.convert_tokens_to_ids(["a", "a", "a"])
        assert not caplog.records
        tokenizer.convert_tokens_to_ids(["a"] * 4)
    assert "4" in caplog.text and "max_len 3" in caplog.text


def test_public_attributes_for_the_feature_cache(small_vocab_file):
    tokenizer = BertTokenizer(small_vocab_file, analyzer="none", do_lower_case=False)
    assert tokenizer.vocab_file == str(small_vocab_file)
    assert tokenizer.analyzer_name == tokenizer.analyzer == "none"
    assert tokenizer.do_lower_case is False


# --- errors a user can cause ---------------------------------------------------------------

def test_missing_and_empty_vocab_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="not found: .*nope.txt"):
        BertTokenizer(tmp_path / "nope.txt", analyzer="none")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="empty: .*empty.txt"):
        BertTokenizer(empty, analyzer="none")


def test_vocab_without_a_special_token_names_it(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(t for t in SMALL_VOCAB if t != "[MASK]"), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab.txt lacks special token\(s\): \[MASK\]"):
        BertTokenizer(path, analyzer="none")


def test_a_repeated_vocab_line_is_refused_naming_the_token(tmp_path):
    from types import SimpleNamespace

    from checkpoints import build_tokenizer
    from cli import UsageError

    # Ids are line numbers: 12 lines hold 11 distinct tokens, and the last id (11) is past a vocab_size of 11.
    path = tmp_path / "dup_vocab.txt"
    path.write_text("\n".join([*SMALL_VOCAB[:-1], "un", "."]) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"dup_vocab.txt has 12 entries \(11 distinct: 'un' is repeated, at lines 6 "
                                         r"and later\) but the model config says vocab_size 11"):
        build_tokenizer(path, "none", SimpleNamespace(vocab_size=len(SMALL_VOCAB)))


def tokenizer_json(vocab: dict[str, int], normalizer: dict | None = None) -> str:
    return json.dumps({"normalizer": normalizer, "model": {"type": "WordPiece", "vocab": vocab}})


def test_a_tokenizer_json_vocab_reads_in_id_order_and_writes_as_vocab_txt(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer_json({token: index for index, token in reversed(list(enumerate(SMALL_VOCAB)))}))
    assert tokenization.read_vocab_tokens(path) == SMALL_VOCAB
    assert tokenization.vocab_file_bytes(path) == ("\n".join(SMALL_VOCAB) + "\n").encode("utf-8")
    assert BertTokenizer(path, analyzer="none").tokenize("unaffable") == ["un", "##aff", "##able"]
    path.write_text(tokenizer_json({token: index * 2 for index, token in enumerate(SMALL_VOCAB)}))
    with pytest.raises(TokenizerError, match=r"tokenizer.json: model.vocab ids are not 0..10, each once"):
        tokenization.read_vocab_tokens(path)
    path.write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    with pytest.raises(TokenizerError, match=r"tokenizer.json: model.type is 'BPE', not a WordPiece tokenizer"):
        tokenization.read_vocab_tokens(path)


@pytest.mark.parametrize("tokenizer_config, normalizer, lower, warns", [
    ({"do_lower_case": True, "strip_accents": False}, None, True, False),
    ({"do_lower_case": True}, None, True, True),            # transformers strips accents when lower-casing
    ({"do_lower_case": False}, None, False, False),
    (None, {"type": "BertNormalizer", "lowercase": False, "strip_accents": None}, False, False),
    ({}, {"type": "Sequence", "normalizers": [{"type": "BertNormalizer", "lowercase": True, "strip_accents": False}]},
     True, False),
    ({"strip_accents": True, "do_lower_case": False}, None, False, True),
])
def test_lower_casing_and_accent_stripping_of_a_model_dir(tmp_path, caplog, tokenizer_config, normalizer, lower,
                                                         warns):
    if tokenizer_config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if normalizer is not None:
        (tmp_path / "tokenizer.json").write_text(tokenizer_json({"[PAD]": 0}, normalizer))
    with caplog.at_level(logging.WARNING, logger=tokenization.logger.name):
        assert tokenization.read_do_lower_case(tmp_path) is lower
    assert ("breaking Hangul into jamo" in caplog.text) is warns


def test_bad_analyzer_and_max_len_are_rejected(small_vocab_file):
    with pytest.raises(TokenizerError, match="unknown analyzer 'mecub'; choose one of: mecab, okt"):
        BertTokenizer(small_vocab_file, analyzer="mecub")
    with pytest.raises(TokenizerError, match="max_len"):
        BertTokenizer(small_vocab_file, analyzer="none", max_len=0)
    with pytest.raises(TokenizerError, match="must be a str"):
        BertTokenizer(small_vocab_file, analyzer="none").tokenize(None)


def test_missing_mecab_says_what_to_pip_install(monkeypatch):
    konlpy_tag = pytest.importorskip("konlpy.tag")

    def no_system_mecab(*args, **kwargs):
        raise Exception("Install MeCab in order to use it")

    monkeypatch.setattr(konlpy_tag, "Mecab", no_system_mecab)
    monkeypatch.setitem(sys.modules, "mecab", None)  # makes `import mecab` fail
    with pytest.raises(TokenizerError, match="pip install python-mecab-ko python-mecab-ko-dic"):
        make_analyzer("mecab")


def test_missing_java_says_what_to_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(TokenizerError, match="'komoran' needs Java.*apt-get install -y default-jdk"):
        make_analyzer("komoran")


# --- stage 1: clean ------------------------------------------------------------------------

def test_clean_spaces_separators_in_place_and_drops_format_characters():
    text = "a\tb\nc\u202fd\u3000e\xa0f\x00g\x07h\ufffdi\u2028j"
    assert clean(text) == ("a b c d e f g h i j", None)
    assert clean("가나 다") == ("가나 다", None)
    # Zero-width space, word joiner, BOM, soft hyphen: dropped, each kept character's index in the text.
    assert clean("대한\u200b민\u2060국\ufeff의\u00ad") == ("대한민국의", [0, 1, 3, 5, 7])


@pytest.mark.parametrize("mark", ["\u200b", "\u2060", "\ufeff", "\u00ad", "\u200d"])
def test_a_zero_width_character_inside_a_word_gives_the_pieces_of_the_word(mecab_tokenizer, mark):
    text = "대한민국의 수도는 서울이다."
    marked = text[:2] + mark + text[2:8] + mark + text[8:]
    shift = [0, 0] + [1] * 6 + [2] * (len(text) - 8 + 1)   # a clean index's shift in the marked text
    expected = [(piece, start + shift[start], end + shift[end - 1]) for piece, start, end in
                mecab_tokenizer.tokenize_with_offsets(text)]
    assert mecab_tokenizer.tokenize_with_offsets(marked) == expected


def test_control_characters_and_unusual_spaces_split_words_with_exact_offsets(small_vocab_file):
    # Analyzer `none` cleans as transformers' BertTokenizer: control and format characters are
    # dropped (`aff\x00a` is one word), unusual spaces split words.
    tokenizer = BertTokenizer(small_vocab_file, analyzer="none")
    text = "un\u202faff\x00a\u3000.\u200ba"
    pieces = tokenizer.tokenize_with_offsets(text)
    assert pieces == [("un", 0, 2), ("[UNK]", 3, 8), (".", 9, 10), ("a", 11, 12)]


def test_empty_and_blank_texts_give_no_pieces(mecab_tokenizer):
    for text in ("", "   ", "\n\t\u202f", "\x00\x01"):
        assert mecab_tokenizer.tokenize_with_offsets(text) == []


# --- stage 2: lower-case -------------------------------------------------------------------

def test_lower_case_keeps_hangul_whole_and_maps_expanding_characters():
    assert lower_case("BERT 한국어") == ("bert 한국어", None)  # no NFD: syllables stay syllables
    lowered, origin = lower_case("aİb")
    assert lowered == "ai\u0307b" and origin == [0, 1, 1, 2]


def test_latin_capitals_are_lower_cased_only_when_asked(mecab_tokenizer, vocab_file):
    text = "KorQuAD는 BERT를"
    pieces = mecab_tokenizer.tokenize_with_offsets(text)
    assert [p for p, _, _ in pieces] == ["kor", "##qu", "##ad", "는", "ber", "##t", "를"]
    assert_offsets_exact(text, pieces)
    cased = BertTokenizer(vocab_file, analyzer="mecab", do_lower_case=False)
    assert cased.tokenize("BERT를") == ["[UNK]", "를"]  # the vocab is uncased


def test_dotted_capital_i_keeps_exact_offsets(mecab_tokenizer):
    text = "İstanbul에서 İİ 만났다"
    pieces = mecab_tokenizer.tokenize_with_offsets(text)
    assert_offsets_exact(text, pieces)
    assert ("[UNK]", 0, 1) in pieces and ("에서", 8, 10) in pieces and ("다", 16, 17) in pieces


def test_a_piece_boundary_inside_one_character_makes_the_word_unknown(tmp_path):
    # with `i` and `##\u0307` in the vocab, WordPiece would cut İ's lower-case form in two
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(SMALL_VOCAB + ["i", "##i", "##\u0307", "##\u0307a"]), encoding="utf-8")
    tokenizer = BertTokenizer(path, analyzer="none")
    assert tokenizer.tokenize_with_offsets("aİ İa") == [("[UNK]", 0, 2), ("[UNK]", 3, 5)]
    assert tokenizer.tokenize_with_offsets("a aİ") == [("a", 0, 1), ("[UNK]", 2, 4)]


# --- stage 3: morpheme analysis ------------------------------------------------------------

def test_mecab_splits_morphemes_and_digits_glued_to_hangul(mecab_tokenizer):
    text = "1990년에 태어났다"
    pieces = mecab_tokenizer.tokenize_with_offsets(text)
    assert pieces == [("1990", 0, 4), ("년", 4, 5), ("에", 5, 6), ("태어났", 7, 10), ("다", 10, 11)]


def test_none_analyzer_splits_on_whitespace_only(vocab_file, mecab_tokenizer):
    tokenizer = BertTokenizer(vocab_file, analyzer="none")
    assert tokenizer.tokenize("한국어에서 왔다") == ["한국어", "##에", "##서", "왔", "##다"]
    assert mecab_tokenizer.tokenize("한국어에서 왔다") == ["한국어", "에서", "왔", "다"]


def test_mecab_lattice_fast_path_matches_public_parse():
    analyzer = make_analyzer("mecab")
    if not isinstance(analyzer, tokenization.MecabKoAnalyzer):
        pytest.skip("konlpy's Mecab is installed, so python-mecab-ko is not used")
    for context in _contexts(SAMPLE_FILE):  # real Korean paragraphs, in every clone
        assert analyzer.spans(context) == analyzer._parse_spans(context)


def test_surface_only_mecab_aligns_to_the_same_pieces_as_spans(vocab_file, mecab_tokenizer):
    # konlpy's Mecab returns surfaces only; aligning them must reproduce the span path exactly.
    import mecab

    tagger = mecab.MeCab()
    surfaces = SurfaceAnalyzer("mecab", lambda text: [m.surface for m in tagger.parse(text)])
    aligned = BertTokenizer(vocab_file, analyzer=surfaces)
    for context in _contexts(SAMPLE_FILE):
        assert aligned.tokenize_with_offsets(context) == mecab_tokenizer.tokenize_with_offsets(context)


def test_analyzer_that_restores_base_forms_keeps_offsets_and_text(mecab_tokenizer):
    # komoran-like output: 끌려갔다 -> 끌리 + 어 + 가 + 았 + 다; 하여 -> 하 + 아
    restoring = SurfaceAnalyzer("fake", lambda text: ["그", "는", "끌리", "어", "가", "았", "다", ".",
                                                      "하", "아", "보", "았", "다"])
    tokenizer = BertTokenizer(mecab_tokenizer.vocab_file, analyzer=restoring)
    text = "그는 끌려갔다. 하여 보았다"
    pieces = tokenizer.tokenize_with_offsets(text)
    assert_offsets_exact(text, pieces)
    units = [text[s:e] for p, s, e in pieces if not p.startswith("##")]
    # aligned morphemes stay separate; the unaligned rest of a word is one unit
    assert units[:5] == ["그", "는", "끌려갔", "다", "."]
    assert units[5:] == ["하", "여", "보", "았", "다"]


def test_analyzer_that_aligns_nowhere_or_fails_falls_back_to_words(small_vocab_file, caplog):
    text = "unaff a.a"
    garbage = BertTokenizer(small_vocab_file, analyzer=SurfaceAnalyzer("x", lambda t: ["zz", "q"]))
    assert garbage.tokenize_with_offsets(text) == [("un", 0, 2), ("##aff", 2, 5), ("a", 6, 7),
                                                   (".", 7, 8), ("a", 8, 9)]

    def broken(text):
        raise RuntimeError("java.lang.NullPointerException")

    failing = BertTokenizer(small_vocab_file, analyzer=SurfaceAnalyzer("x", broken))
    with caplog.at_level(logging.WARNING, logger="tokenization"):
        assert failing.tokenize(text) == ["un", "##aff", "a", ".", "a"]
    assert "NullPointerException" in caplog.text


def test_complete_spans_repairs_overlaps_spaces_and_gaps():
    text = "abc de  fg"
    spans = [(0, 2), (1, 3), (4, 9), (20, 30)]  # overlap, a span across spaces, out of range
    assert complete_spans(text, spans) == [(0, 2), (2, 3), (4, 6), (8, 9), (9, 10)]


def test_analyzer_runs_once_per_distinct_text(small_vocab_file):
    calls = []

    class Counting(tokenization.WhitespaceAnalyzer):
        def spans(self, text):
            calls.append(text)
            return super().spans(text)

    tokenizer = BertTokenizer(small_vocab_file, analyzer=Counting())
    first = tokenizer.tokenize_with_offsets("unaff a")
    first.append(("mutated", 0, 0))
    assert tokenizer.tokenize_with_offsets("unaff a") == [("un", 0, 2), ("##aff", 2, 5), ("a", 6, 7)]
    tokenizer.tokenize("a")
    assert calls == ["unaff a", "a"]


def test_java_tagger_restoring_forms_keeps_offsets(vocab_file):
    if shutil.which("java") is None:
        pytest.skip("Java is not installed")
    pytest.importorskip("jpype")
    tokenizer = BertTokenizer(vocab_file, analyzer="komoran")
    text = "그는 끌려갔다. 가😀나 İ 1990년"  # komoran restores forms and chokes on emoji
    pieces = tokenizer.tokenize_with_offsets(text)
    assert_offsets_exact(text, pieces)
    assert ("[UNK]", 10, 11) in pieces and ("1990", 15, 19) in pieces


# --- stages 4 and 5: punctuation, Hanja, emoji, WordPiece ----------------------------------

def test_punctuation_and_hanja_become_single_characters(mecab_tokenizer):
    text = "漢字(한자)·韓國"
    pieces = mecab_tokenizer.tokenize_with_offsets(text)
    assert [p for p, _, _ in pieces] == ["漢", "字", "(", "한자", ")", "·", "韓", "國"]
    assert_offsets_exact(text, pieces)


def test_emoji_is_an_unknown_word_of_its_own(mecab_tokenizer):
    text = "가😀나 👍🏽"
    pieces = mecab_tokenizer.tokenize_with_offsets(text)
    assert pieces[:3] == [("가", 0, 1), ("[UNK]", 1, 2), ("나", 2, 3)]
    assert_offsets_exact(text, pieces)


def test_wordpiece_greedy_longest_match_and_unknown_words(small_vocab_file):
    tokenizer = BertTokenizer(small_vocab_file, analyzer="none")
    assert tokenizer.tokenize("unaffable aaa") == ["un", "##aff", "##able", "a", "##a", "##a"]
    # one unmatched part makes the whole word one [UNK] over its whole span
    assert tokenizer.tokenize_with_offsets("unaffz a") == [("[UNK]", 0, 6), ("a", 7, 8)]
    long_word = "a" * (tokenization.MAX_WORD_CHARS + 1)
    assert tokenizer.tokenize_with_offsets(long_word) == [("[UNK]", 0, len(long_word))]
    assert tokenizer.tokenize("a" * tokenization.MAX_WORD_CHARS)[:2] == ["a", "##a"]


# --- the real dev set ----------------------------------------------------------------------

def _contexts(korquad_file) -> list[str]:
    with open(korquad_file, encoding="utf-8") as handle:
        articles = json.load(handle)["data"]
    return list(dict.fromkeys(p["context"] for a in articles for p in a["paragraphs"]))


def test_dev_contexts_unk_and_continuation_shares_and_exact_offsets(dev_file, mecab_tokenizer):
    pieces_total = unknowns = continuations = 0
    for context in _contexts(dev_file):
        pieces = mecab_tokenizer.tokenize_with_offsets(context)
        assert_offsets_exact(context, pieces)
        pieces_total += len(pieces)
        unknowns += sum(piece == "[UNK]" for piece, _, _ in pieces)
        continuations += sum(piece.startswith("##") for piece, _, _ in pieces)
    assert pieces_total > 250_000
    assert unknowns / pieces_total <= 0.002
    assert continuations / pieces_total <= 0.08


def test_a_long_run_without_spaces_reaches_the_morpheme_analyzer_in_parts():
    """mecab's time on one unknown run grows with its square: it only ever sees runs of LONG_RUN_CHARS at most,
    and texts without such a run go to it whole, unchanged."""
    seen: list[str] = []

    def words(text: str) -> list[tuple[int, int]]:
        seen.append(text)
        return [match.span() for match in re.finditer(r"[^ ]+", text)]

    limit = tokenization.LONG_RUN_CHARS
    text = "서울 " + "a" * (2 * limit + 500) + " 부산"
    spans = tokenization.spans_in_parts(words, text)
    assert max(len(word) for part in seen for word in part.split(" ")) == limit
    assert [text[start:end] for start, end in spans] == ["서울", "a" * limit, "a" * limit, "a" * 500, "부산"]
    seen.clear()
    assert tokenization.spans_in_parts(words, "서울 부산") == [(0, 2), (3, 5)] and seen == ["서울 부산"]
    analyzer = tokenization.make_analyzer("mecab")
    assert "".join(text[start:end] for start, end in analyzer.spans(text)) == text.replace(" ", "")



@pytest.mark.parametrize("text", ["молоко́ 우유", "서울은̈ 크다", "q̇ 서울 café"])
def test_a_mark_without_a_precomposed_form_keeps_its_pieces_and_offsets_in_nfd_text(mecab_tokenizer, text):
    """Where composing leaves a mark a character of its own, it keeps its own span: the NFD text gets the NFC text's
    pieces, each cut from the NFD text at the same characters."""
    import unicodedata

    decomposed = unicodedata.normalize("NFD", text)
    assert decomposed != text
    composed_pieces = mecab_tokenizer.tokenize_with_offsets(text)
    pieces = mecab_tokenizer.tokenize_with_offsets(decomposed)
    assert [piece for piece, _, _ in pieces] == [piece for piece, _, _ in composed_pieces]
    assert [unicodedata.normalize("NFC", decomposed[start:end]) for _, start, end in pieces] == [
        text[start:end] for _, start, end in composed_pieces]

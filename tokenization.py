"""Morpheme-level WordPiece tokenizer with exact character offsets into the original text.

The pretrained model saw Mecab morphemes split further by WordPiece, so text goes through:

  clean       every whitespace kind, control, format and invalid character becomes a separator
  compose     Unicode NFC, so decomposed Hangul (NFD: what macOS writes) gives the same pieces as
              composed Hangul; the vocab and the analyzer only know composed syllables
  lower-case  character by character, without Unicode decomposition (NFD turns Hangul into jamo)
  analyze     morphemes from an analyzer chosen by name (`mecab` by default, `none` = whitespace
              with transformers' BertTokenizer cleaning, so pieces equal its own)
  split       punctuation and CJK ideographs become words of one character
  WordPiece   greedy longest match with `##` continuations; a word with no match becomes one [UNK]

Every piece keeps the (start, end) character offsets of the text it came from in the string
the caller passed in (before composition), so answers are cut from the original context, never
re-assembled.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import string
import unicodedata
from pathlib import Path
from typing import Protocol
from collections.abc import Callable, Iterable, Sequence

logger = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"
MAX_WORD_CHARS = 100
ANALYZER_NAMES = ("mecab", "okt", "komoran", "kkma", "hannanum", "none")

Span = tuple[int, int]
Piece = tuple[str, int, int]

# Texts are usually tokenized several times in a row (one context per question of a paragraph);
# a small cache of whole results keeps the analyzer to one run per distinct text.
_TEXT_CACHE_SIZE = 128
# WordPiece results per analyzer unit; cleared when full so memory stays bounded on big corpora.
_WORD_CACHE_LIMIT = 1 << 18
# How far the aligner looks for a morpheme the analyzer reports but the text does not hold
# where expected (a restored base form): a few characters within the word, a few words ahead.
_ALIGN_WINDOW_CHARS = 32
_ALIGN_LOOKAHEAD_WORDS = 3

_WORD = re.compile(r"[^ ]+")
# A run this long without a space goes to a morpheme analyzer in parts: mecab takes an unknown run of one
# character class (Latin letters, digits, kana) whole, in time quadratic in its length (10 s for 200k letters).
LONG_RUN_CHARS = 1000
_LONG_RUN = re.compile(r"[^ ]{%d,}" % (LONG_RUN_CHARS + 1))
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
_CJK_IDEOGRAPH_RANGES = (
    (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0x2F800, 0x2FA1F),
)


class TokenizerError(ValueError):
    """A bad vocab file, analyzer name or missing analyzer; its message is one line for a CLI."""


# --- vocab ---------------------------------------------------------------------------------

TOKENIZER_JSON = "tokenizer.json"   # transformers' fast tokenizer file: what transformers 5 saves, without vocab.txt


def read_vocab_tokens(vocab_file: str | os.PathLike[str]) -> list[str]:
    """The tokens of a WordPiece vocab file, one per line (a token's id is its line number), or of a
    transformers tokenizer.json (any `*.json`: its WordPiece `model.vocab`, in id order)."""
    path = Path(vocab_file)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not part of [PAD]
    except FileNotFoundError:
        raise TokenizerError(f"vocab file not found: {path}") from None
    except UnicodeDecodeError:
        raise TokenizerError(f"vocab file is not UTF-8 text: {path}") from None
    except OSError as error:
        raise TokenizerError(f"cannot read vocab file {path}: {error.strerror or error}") from None
    if path.suffix == ".json":
        tokens = _tokenizer_json_tokens(text, path)
    else:
        # Split on "\n" only: str.splitlines would also break tokens at \x1c, \x85, \u2028 and the like.
        tokens = [line.rstrip("\r") for line in text.split("\n")]
        if tokens and tokens[-1] == "":
            tokens.pop()
    if not any(token.strip() for token in tokens):
        raise TokenizerError(f"vocab file is empty: {path}")
    return tokens


def _tokenizer_json_tokens(text: str, path: Path) -> list[str]:
    """The WordPiece vocab of a tokenizer.json's `model.vocab` (token -> id), ordered by id."""
    data = _parse_json(text, path)
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "WordPiece" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: model.type is {kind!r}, not a WordPiece tokenizer with a model.vocab; "
                             f"pass a vocab.txt")
    vocab: dict = model["vocab"]
    ids = list(vocab.values())
    if not all(type(index) is int for index in ids) or sorted(ids) != list(range(len(ids))):
        raise TokenizerError(f"{path}: model.vocab ids are not 0..{len(ids) - 1}, each once (gaps, repeats or "
                             f"non-integers); pass a vocab.txt")
    tokens = sorted(vocab, key=vocab.__getitem__)
    # Copied into a run or export as vocab.txt lines (vocab_file_bytes): a line break would shift every later id.
    broken = next((token for token in tokens if "\n" in token or "\r" in token), None)
    if broken is not None:
        raise TokenizerError(f"{path}: model.vocab token {broken!r} holds a line break; pass a vocab.txt")
    return tokens


def vocab_file_bytes(vocab_file: str | os.PathLike[str]) -> bytes:
    """The contents of vocab.txt for `vocab_file`: the file itself, or a tokenizer.json's vocab one token a line."""
    path = Path(vocab_file)
    if path.suffix == ".json":
        return "".join(f"{token}\n" for token in read_vocab_tokens(path)).encode("utf-8")
    return path.read_bytes()


def _parse_json(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path}: not readable JSON ({_one_line(error)})") from None
    except RecursionError:
        raise TokenizerError(f"{path}: not readable JSON (nested too deeply)") from None


def build_vocab(tokens: Sequence[str], vocab_file: str | os.PathLike[str]) -> dict[str, int]:
    """Token -> id (first line wins for a repeated token); checks the special tokens are there."""
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    if missing:
        raise TokenizerError(f"vocab file {vocab_file} lacks special token(s): {' '.join(missing)}")
    return vocab


def read_do_lower_case(model_dir: str | os.PathLike[str]) -> bool:
    """`do_lower_case` of a transformers model directory: tokenizer_config.json's, else the `lowercase` of
    tokenizer.json's BertNormalizer, else transformers' default (True). Warns where transformers would strip
    accents, which this toolkit never does."""
    directory = Path(model_dir)
    config_path = directory / "tokenizer_config.json"
    settings = _read_json_file(config_path) if config_path.is_file() else {}
    if not isinstance(settings, dict):
        raise TokenizerError(f"{config_path}: expected a JSON object")
    normalizer = _bert_normalizer(directory / TOKENIZER_JSON)
    source = config_path if "do_lower_case" in settings or not normalizer else directory / TOKENIZER_JSON
    value = settings.get("do_lower_case", normalizer.get("lowercase", True))
    if not isinstance(value, bool):
        key = "do_lower_case" if source == config_path else "normalizer.lowercase"
        raise TokenizerError(f"{source}: {key} must be true or false, not {value!r}")
    strip_accents = settings.get("strip_accents")
    if strip_accents is None:
        strip_accents = normalizer.get("strip_accents")
    # transformers strips accents when strip_accents is unset and lower-casing is on (mBERT uncased's jamo vocab).
    if strip_accents or (strip_accents is None and value):
        why = "strip_accents is true" if strip_accents else "do_lower_case without strip_accents: false"
        logger.warning("%s: transformers strips accents here (%s), breaking Hangul into jamo; this toolkit keeps "
                       "Hangul composed, so text is not tokenized as in this model's training", directory, why)
    return value


def _read_json_file(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path}: not readable JSON ({_one_line(error)})") from None
    return _parse_json(text, path)


def _bert_normalizer(path: Path) -> dict:
    """tokenizer.json's BertNormalizer settings (alone or in a Sequence); empty without one."""
    if not path.is_file():
        return {}
    data = _read_json_file(path)
    normalizer = data.get("normalizer") if isinstance(data, dict) else None
    parts = normalizer.get("normalizers") if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence" \
        else [normalizer]
    return next((part for part in parts or () if isinstance(part, dict) and part.get("type") == "BertNormalizer"), {})


# --- stage 1: clean ------------------------------------------------------------------------

def is_separator(char: str) -> bool:
    """True for characters that only separate words: whitespace, control/format, invalid ones."""
    return (char.isspace() or char == "\ufffd"
            or unicodedata.category(char) in ("Cc", "Cf", "Cs"))


def is_blank(text: str) -> bool:
    """Whether `text` holds nothing but separators (spaces of any kind, control and zero-width characters),
    so that it has no pieces."""
    return all(map(is_separator, text))


class _SeparatorTable(dict):
    """str.translate table for `clean`, filled lazily per code point: format characters deleted, other
    separators mapped to a space."""

    def __missing__(self, code: int) -> int | None:
        char = chr(code)
        value = None if _is_format(char) else 0x20 if is_separator(char) else code
        self[code] = value
        return value


def _is_format(char: str) -> bool:
    """Zero-width spaces and joiners, BOM, soft hyphen, direction marks: characters that render as nothing."""
    return unicodedata.category(char) == "Cf"


_SEPARATORS_TO_SPACE = _SeparatorTable()


def clean(text: str) -> tuple[str, list[int] | None]:
    """Replace each separator character with one space, and drop format characters.

    A control character or an unusual space separates words (it keeps its index, as a space); a format
    character such as a zero-width space or a soft hyphen inside a word is dropped, so `대한<ZWSP>민국` reads
    as `대한민국`, as transformers' BertTokenizer reads it. Returns the cleaned text and, only when
    characters were dropped, the index in `text` of each of its characters; otherwise None.
    """
    # Only a space among the separators is printable, so most texts need no per-character work.
    if text.isprintable() and "\ufffd" not in text:
        return text, None
    cleaned = text.translate(_SEPARATORS_TO_SPACE)
    if len(cleaned) == len(text):
        return cleaned, None
    return cleaned, [index for index, char in enumerate(text) if not _is_format(char)]


def bert_clean(text: str) -> tuple[str, list[int] | None]:
    """Clean `text` as transformers' BertTokenizer does (analyzer `none`): control, format and
    private-use characters, NUL and U+FFFD are dropped, every other whitespace becomes a space.

    Dropping (rather than spacing) keeps `ab<zero-width space>cd` one word, as transformers sees it.
    Returns the cleaned text and, only when characters were dropped, the index in `text` of each
    of its characters; otherwise None.
    """
    if text.isprintable() and "\ufffd" not in text:
        return text, None
    kept: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        if char in "\t\n\r" or (char.isspace() and unicodedata.category(char) != "Cc"):
            kept.append(" ")
        elif char == "\ufffd" or unicodedata.category(char) in ("Cc", "Cf", "Co"):
            continue
        else:
            kept.append(char)
        origin.append(index)
    return "".join(kept), (origin if len(origin) < len(text) else None)


# --- stage 2: compose ---------------------------------------------------------------------

def compose(text: str) -> tuple[str, list[Span] | None]:
    """`text` in Unicode NFC, and, only when that changed it, the span of `text` each composed
    character came from; None means index i of one is index i of the other.

    The text is composed one cluster at a time (a character that combines with nothing before it,
    plus what follows and combines with it), so every composed character has one source span.
    """
    if unicodedata.is_normalized("NFC", text):
        return text, None
    parts: list[str] = []
    spans: list[Span] = []
    cluster_start = 0
    for index in range(1, len(text) + 1):
        if index < len(text) and not _starts_cluster(text, cluster_start, index):
            continue
        composed = unicodedata.normalize("NFC", text[cluster_start:index])
        parts.append(composed)
        spans.extend(_cluster_spans(text, cluster_start, index, composed))
        cluster_start = index
    return "".join(parts), spans


def _cluster_spans(text: str, start: int, end: int, composed: str) -> list[Span]:
    """The source span of each character `text[start:end]` composed into: its own run where the cluster
    decomposes character by character in order (a mark with no precomposed form stays a character of its own,
    so it keeps its own span and pieces), else the whole cluster for each."""
    spans, at = [], start
    for char in composed:
        source = unicodedata.normalize("NFD", char)
        if text[at:at + len(source)] != source:
            return [(start, end)] * len(composed)
        spans.append((at, at + len(source)))
        at += len(source)
    return spans if at == end else [(start, end)] * len(composed)


def _starts_cluster(text: str, cluster_start: int, index: int) -> bool:
    """Whether text[index] leaves the cluster text[cluster_start:index] as it is: a starter that
    does not compose with it (Hangul vowel and final jamo are starters that do)."""
    char = text[index]
    if unicodedata.combining(char):
        return False
    cluster = text[cluster_start:index]
    composed = unicodedata.normalize("NFC", cluster)
    return unicodedata.normalize("NFC", cluster + char) == composed + unicodedata.normalize("NFC", char)


# --- stage 3: lower-case -------------------------------------------------------------------

def lower_case(text: str) -> tuple[str, list[int] | None]:
    """Lower-case `text` without decomposing it.

    Returns the lower-cased text and, only when its length changed (`İ` becomes two
    characters), the index in `text` that produced each of its characters; otherwise None,
    meaning index i of one is index i of the other.
    """
    # Character by character, as transformers' tokenizers do: str.lower() of a whole text turns a word-final
    # capital sigma into ς (its Final_Sigma rule, the only one that reads the neighbours).
    lowered = "".join(map(str.lower, text)) if "Σ" in text else text.lower()
    if len(lowered) == len(text):
        return lowered, None
    parts: list[str] = []
    origin: list[int] = []
    for index, char in enumerate(text):
        low = char.lower()
        parts.append(low)
        origin.extend([index] * len(low))
    return "".join(parts), origin


# --- stage 4: morpheme analysis ------------------------------------------------------------

class Analyzer(Protocol):
    """Splits a cleaned text, whose only separator is a space, into morpheme spans."""

    name: str

    def spans(self, text: str) -> list[Span]:
        """(start, end) of each morpheme in `text`, in order."""
        ...


class WhitespaceAnalyzer:
    """Analyzer `none`: words are the runs between spaces, as in the original baseline."""

    name = "none"

    def spans(self, text: str) -> list[Span]:
        return [match.span() for match in _WORD.finditer(text)]


class MecabKoAnalyzer:
    """Analyzer `mecab` via python-mecab-ko: mecab-ko-dic morphemes with their character spans."""

    name = "mecab"

    def __init__(self) -> None:
        import mecab  # ImportError here means python-mecab-ko is missing; the caller says so.

        self._mecab = mecab.MeCab()
        self._create_lattice = self._find_lattice_api()

    def _find_lattice_api(self) -> Callable[[str], object] | None:
        # MeCab.parse builds a Morpheme with a parsed Feature for every node, two thirds of its
        # time; reading the nodes straight off the lattice skips that. The lattice API is not
        # public, so fall back to parse() where this python-mecab-ko version lacks it.
        try:
            from mecab.utils import create_lattice
        except ImportError:
            return None
        return create_lattice if hasattr(getattr(self._mecab, "_tagger", None), "parse") else None

    def spans(self, text: str) -> list[Span]:
        return spans_in_parts(self._spans_of_part, text)

    def _spans_of_part(self, text: str) -> list[Span]:
        if self._create_lattice is None:
            return self._parse_spans(text)
        lattice = self._create_lattice(text)
        if not self._mecab._tagger.parse(lattice):
            raise TokenizerError(f"mecab failed: {self._mecab._tagger.what()}")
        return _node_spans(text, lattice.bos_node().next)

    def _parse_spans(self, text: str) -> list[Span]:
        """Spans through the public MeCab.parse (the slower path). Its spans, like the lattice
        iterator's, leave out leading spaces, so the text goes in without them."""
        body = text.lstrip(" ")
        lead = len(text) - len(body)
        return [(morpheme.span.start + lead, morpheme.span.end + lead) for morpheme in self._mecab.parse(body)]


def spans_in_parts(spans_of: Callable[[str], list[Span]], text: str) -> list[Span]:
    """`spans_of(text)`, each run of more than LONG_RUN_CHARS characters without a space cut into parts of that
    length, each analysed as a text of its own (a word that long is [UNK] to WordPiece whole anyway)."""
    cuts = [cut for run in _LONG_RUN.finditer(text)
            for cut in range(run.start() + LONG_RUN_CHARS, run.end(), LONG_RUN_CHARS)]
    if not cuts:
        return spans_of(text)
    spans, start = [], 0
    for end in (*cuts, len(text)):
        spans.extend((first + start, last + start) for first, last in spans_of(text[start:end]))
        start = end
    return spans


_MECAB_EOS = 3  # node.stat of the end-of-sentence node


def _node_spans(text: str, node) -> list[Span]:
    """Character spans of Mecab's lattice nodes from their byte lengths, in one pass over `text`.

    Not the lattice's own (span, node) iterator: it converts every span from the start of the
    text (quadratic: 36 s for 232k characters) and drops leading spaces from its count, so a text
    starting with a separator came back shifted by one character per separator.
    """
    data = text.encode("utf-8")
    spans: list[Span] = []
    byte = char = 0
    while node is not None and node.stat != _MECAB_EOS:
        start = byte + node.rlength - node.length   # rlength counts the spaces skipped before it
        char += len(data[byte:start].decode("utf-8"))
        end = char + len(node.surface)
        spans.append((char, end))
        char, byte = end, start + node.length
        node = node.next
    return spans


class SurfaceAnalyzer:
    """An analyzer that returns morpheme strings only (konlpy's taggers), aligned to the text.

    `bmp_only` replaces characters beyond the Basic Multilingual Plane (emoji) with spaces
    before calling it: konlpy's Java taggers mis-decode them and fail on the whole text.
    Those characters still become words of their own, as every uncovered character does.
    """

    def __init__(self, name: str, morphemes: Callable[[str], list[str]], bmp_only: bool = False):
        self.name = name
        self._morphemes = morphemes
        self._bmp_only = bmp_only

    def spans(self, text: str) -> list[Span]:
        return spans_in_parts(self._spans_of_part, text)

    def _spans_of_part(self, text: str) -> list[Span]:
        query = _ASTRAL.sub(" ", text) if self._bmp_only else text
        if not query.strip(" "):
            return []  # konlpy's Hannanum hangs on blank input, Komoran and Kkma throw.
        try:
            surfaces = self._morphemes(query)
        except Exception as error:  # Java taggers throw assorted JVM errors on odd input.
            logger.warning("analyzer %r failed on a text of %d characters (%s); "
                           "splitting that text on whitespace only", self.name, len(text),
                           _one_line(error))
            return []
        return align_surfaces(query, surfaces)


def align_surfaces(text: str, surfaces: Iterable[str]) -> list[Span]:
    """Spans in `text` of the morpheme strings an analyzer returned, for those that can be found.

    A morpheme is looked for in the current word from the last match on (within a short
    window), then at the start of the next few words; one found nowhere is a form the analyzer
    restored (komoran: `끌려` -> `끌리 + 어`) and is skipped. What no span covers is made into
    units of its own later (`complete_spans`), so nothing is dropped. Linear in the text.
    """
    words = [match.span() for match in _WORD.finditer(text)]
    spans: list[Span] = []
    word_index = 0
    cursor = words[0][0] if words else 0
    for surface in surfaces:
        if word_index >= len(words):
            break
        if not surface:
            continue
        word_end = words[word_index][1]
        window_end = min(word_end, cursor + len(surface) + _ALIGN_WINDOW_CHARS)
        start = text.find(surface, cursor, window_end)
        if start < 0:
            later = _word_starting_with(text, surface, words, word_index + 1)
            if later < 0:
                continue
            word_index, start = later, words[later][0]
        cursor = start + len(surface)
        spans.append((start, cursor))
        if cursor >= words[word_index][1]:
            word_index += 1
            cursor = words[word_index][0] if word_index < len(words) else len(text)
    return spans


def _word_starting_with(text: str, surface: str, words: Sequence[Span], first: int) -> int:
    """Index of the first of a few words from `first` on that begins with `surface`, else -1."""
    for index in range(first, min(first + _ALIGN_LOOKAHEAD_WORDS, len(words))):
        start, end = words[index]
        if text.startswith(surface, start, end):
            return index
    return -1


def complete_spans(text: str, spans: Iterable[Span]) -> list[Span]:
    """Analyzer spans made safe: in order, non-overlapping, never across a space, and covering
    every non-space character (each uncovered run inside a word becomes a unit of its own)."""
    units: list[Span] = []
    cursor = 0
    length = len(text)
    for start, end in spans:
        if start < cursor:
            start = cursor
        if end > length:
            end = length
        if end <= start:
            continue
        if start > cursor and text.count(" ", cursor, start) != start - cursor:
            units.extend(match.span() for match in _WORD.finditer(text, cursor, start))
        if text.find(" ", start, end) < 0:
            units.append((start, end))
        else:
            units.extend(match.span() for match in _WORD.finditer(text, start, end))
        cursor = end
    units.extend(match.span() for match in _WORD.finditer(text, cursor, length))
    return units


def make_analyzer(name: str) -> Analyzer:
    """The analyzer called `name` (see ANALYZER_NAMES), loaded now.

    Raises TokenizerError for an unknown name or one whose software is not installed.
    """
    if name == "none":
        return WhitespaceAnalyzer()
    if name == "mecab":
        return _load_mecab()
    if name in _JAVA_TAGGERS:
        return _load_java_tagger(name)
    raise TokenizerError(f"unknown analyzer {name!r}; choose one of: {', '.join(ANALYZER_NAMES)}")


def _one_line(error: BaseException) -> str:
    """An exception as `Type: message` on one line, for a CLI's one-line error."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _load_mecab() -> Analyzer:
    """konlpy's Mecab where a system mecab-ko is installed (as on Colab), else python-mecab-ko."""
    try:
        from konlpy.tag import Mecab

        return SurfaceAnalyzer("mecab", Mecab().morphs)
    except Exception as error:  # konlpy raises a bare Exception when mecab-ko is not installed.
        logger.debug("konlpy's Mecab is unavailable (%s); using python-mecab-ko", _one_line(error))
    try:
        return MecabKoAnalyzer()
    except ImportError as error:
        raise TokenizerError(
            "analyzer 'mecab' needs mecab-ko: pip install python-mecab-ko python-mecab-ko-dic "
            f"(or install a system mecab-ko for konlpy) [{_one_line(error)}]") from None
    except Exception as error:  # a broken dictionary install surfaces as various errors
        raise TokenizerError(
            f"analyzer 'mecab' failed to start ({_one_line(error)}); reinstall it: "
            "pip install --force-reinstall python-mecab-ko python-mecab-ko-dic") from None


_JAVA_TAGGERS = {"okt": "Okt", "komoran": "Komoran", "kkma": "Kkma", "hannanum": "Hannanum"}
_JAVA_HELP = "install Java 8+ (e.g. apt-get install -y default-jdk) and pip install konlpy JPype1"


def _load_java_tagger(name: str) -> Analyzer:
    """One of konlpy's Java taggers; starting it starts a JVM, so it happens only when asked."""
    class_name = _JAVA_TAGGERS[name]
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise TokenizerError(f"analyzer {name!r} needs Java, which was not found: {_JAVA_HELP}")
    try:
        import jpype  # konlpy imports it lazily; importing it here gives a clear message
        from konlpy import tag
        del jpype  # only its presence was checked
    except ImportError as error:
        raise TokenizerError(f"analyzer {name!r} needs konlpy and JPype1 "
                             f"[{_one_line(error)}]: {_JAVA_HELP}") from None
    try:
        tagger = getattr(tag, class_name)()
    except Exception as error:  # JVM start-up failures come in many exception types
        raise TokenizerError(f"analyzer {name!r}: konlpy's {class_name} failed to start "
                             f"[{_one_line(error)}]: {_JAVA_HELP}") from None
    return SurfaceAnalyzer(name, tagger.morphs, bmp_only=True)


# --- stage 5: punctuation and CJK ideographs -----------------------------------------------

@functools.lru_cache(maxsize=4096)
def is_split_character(char: str) -> bool:
    """True for punctuation (Unicode P* or any ASCII symbol) and CJK ideographs (Hanja)."""
    if char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P"):
        return True
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_IDEOGRAPH_RANGES)


def split_punctuation(word: str) -> list[Span]:
    """Spans of `word` with each punctuation mark and CJK ideograph as a word of its own."""
    spans: list[Span] = []
    run_start = 0
    for index, char in enumerate(word):
        if is_split_character(char):
            if run_start < index:
                spans.append((run_start, index))
            spans.append((index, index + 1))
            run_start = index + 1
    if run_start < len(word):
        spans.append((run_start, len(word)))
    return spans


# --- stage 6: WordPiece --------------------------------------------------------------------

class WordPiece:
    """Greedy longest-match-first WordPiece over a vocab."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        # No piece is longer than the longest token, which bounds the search for each piece.
        self._longest = max(len(token) - len(CONTINUATION_PREFIX)
                            if token.startswith(CONTINUATION_PREFIX) else len(token)
                            for token in vocab)

    def split(self, text: str, start: int, end: int) -> list[Piece]:
        """Pieces of the word text[start:end] with their offsets in `text`.

        A word over MAX_WORD_CHARS characters, or one with a part no token matches, becomes
        a single [UNK] over the whole word.
        """
        if end - start > MAX_WORD_CHARS:
            return [(UNK, start, end)]
        pieces: list[Piece] = []
        position = start
        while position < end:
            prefix = CONTINUATION_PREFIX if position > start else ""
            piece_end = min(end, position + self._longest)
            while piece_end > position and prefix + text[position:piece_end] not in self.vocab:
                piece_end -= 1
            if piece_end == position:
                return [(UNK, start, end)]
            pieces.append((prefix + text[position:piece_end], position, piece_end))
            position = piece_end
        return pieces


# --- the tokenizer -------------------------------------------------------------------------

class BertTokenizer:
    """Morpheme-level WordPiece tokenizer with character offsets (BERT's class name, kept so
    existing code works).

    `analyzer` is a name from ANALYZER_NAMES or an object with `name` and `spans(text)`.
    `max_len`, when set, makes convert_tokens_to_ids warn about longer sequences.
    """

    def __init__(self, vocab_file: str | os.PathLike[str], analyzer: str | Analyzer = "mecab",
                 do_lower_case: bool = True, max_len: int | None = None):
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                                    or max_len <= 0):
            raise TokenizerError(f"max_len must be a positive integer or None, not {max_len!r}")
        self.vocab_file = str(vocab_file)
        tokens = read_vocab_tokens(vocab_file)
        self.vocab = build_vocab(tokens, vocab_file)
        self.ids_to_tokens = dict(enumerate(tokens))
        self.do_lower_case = bool(do_lower_case)
        self.max_len = max_len
        self._analyzer = self._resolve_analyzer(analyzer)
        self.analyzer_name: str = self._analyzer.name
        self._wordpiece = WordPiece(self.vocab)
        self._word_cache: dict[str, tuple[Piece, ...]] = {}
        self._cached_tokenize = functools.lru_cache(maxsize=_TEXT_CACHE_SIZE)(self._tokenize_text)

    @staticmethod
    def _resolve_analyzer(analyzer: str | Analyzer) -> Analyzer:
        if isinstance(analyzer, str):
            return make_analyzer(analyzer)
        if not callable(getattr(analyzer, "spans", None)) or not isinstance(
                getattr(analyzer, "name", None), str):
            raise TokenizerError(f"analyzer must be one of {', '.join(ANALYZER_NAMES)} or an "
                                 f"object with a `name` and `spans(text)`, not {analyzer!r}")
        return analyzer

    @property
    def analyzer(self) -> str:
        """The analyzer's name (the same as `analyzer_name`)."""
        return self.analyzer_name

    def __len__(self) -> int:
        return len(self.ids_to_tokens)

    @property
    def pad_token_id(self) -> int:
        return self.vocab[PAD]

    @property
    def unk_token_id(self) -> int:
        return self.vocab[UNK]

    @property
    def cls_token_id(self) -> int:
        return self.vocab[CLS]

    @property
    def sep_token_id(self) -> int:
        return self.vocab[SEP]

    @property
    def mask_token_id(self) -> int:
        return self.vocab[MASK]

    def tokenize(self, text: str) -> list[str]:
        """The WordPiece tokens of `text`."""
        return [piece for piece, _start, _end in self.tokenize_with_offsets(text)]

    def tokenize_with_offsets(self, text: str) -> list[Piece]:
        """Each piece of `text` with its (start, end) character offsets in `text`.

        text[start:end], lower-cased, is the piece without `##`; for [UNK] it is the whole
        unknown word. Pieces are in order and never overlap.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text to tokenize must be a str, not {type(text).__name__}")
        return list(self._cached_tokenize(text))

    def _tokenize_text(self, text: str) -> tuple[Piece, ...]:
        cleaned, kept = bert_clean(text) if self.analyzer_name == "none" else clean(text)
        composed, sources = compose(cleaned)
        normalized, lower_origin = lower_case(composed) if self.do_lower_case else (composed, None)
        if not normalized.strip(" "):
            return ()
        units = complete_spans(normalized, self._analyzer.spans(normalized))
        if lower_origin is not None:
            sources = [sources[i] if sources else (i, i + 1) for i in lower_origin]
        if kept is not None:  # spans of `cleaned` become spans of `text`, over what cleaning dropped
            spans = sources or [(i, i + 1) for i in range(len(normalized))]
            sources = [(kept[start], kept[end - 1] + 1) for start, end in spans]
        if sources is None:
            return tuple(self._pieces_of_units(normalized, units))
        return tuple(self._pieces_through_sources(normalized, units, sources))

    def _pieces_of_units(self, text: str, units: Iterable[Span]) -> list[Piece]:
        pieces: list[Piece] = []
        cache = self._word_cache
        for start, end in units:
            word = text[start:end]
            relative = cache.get(word) or self._word_pieces(word)
            if len(relative) == 1:  # most units are one piece: skip the comprehension
                pieces.append((relative[0][0], start, end))
            else:
                pieces.extend([(piece, start + s, start + e) for piece, s, e in relative])
        return pieces

    def _pieces_through_sources(self, text: str, units: list[Span],
                                sources: list[Span]) -> list[Piece]:
        """Pieces of a normalised text whose characters came from `sources` spans of the caller's text.

        A boundary inside one source span (between `i` and the dot of lower-cased `İ`, or between
        two characters one cluster composed to) has no offset in the caller's text: units split
        there are joined, and a unit whose pieces would split there becomes one [UNK] over it.
        """
        def inside_source(index: int) -> bool:
            return 0 < index < len(sources) and sources[index] == sources[index - 1]

        joined: list[Span] = []
        for start, end in units:
            if joined and joined[-1][1] == start and inside_source(start):
                joined[-1] = (joined[-1][0], end)
            else:
                joined.append((start, end))
        pieces: list[Piece] = []
        for start, end in joined:
            unit_pieces = self._pieces_of_units(text, [(start, end)])
            if any(inside_source(piece_start) for _, piece_start, _ in unit_pieces):
                unit_pieces = [(UNK, start, end)]
            pieces.extend((piece, sources[s][0], sources[e - 1][1]) for piece, s, e in unit_pieces)
        return pieces

    def _word_pieces(self, word: str) -> tuple[Piece, ...]:
        """Pieces of one analyzer unit, offsets relative to it; memoised per distinct unit."""
        cached = self._word_cache.get(word)
        if cached is None:
            if len(self._word_cache) >= _WORD_CACHE_LIMIT:
                self._word_cache.clear()
            cached = tuple(piece for start, end in split_punctuation(word)
                           for piece in self._wordpiece.split(word, start, end))
            self._word_cache[word] = cached
        return cached

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Vocab ids of `tokens`; a token not in the vocab gets the [UNK] id."""
        unk_id = self.unk_token_id
        ids = [self.vocab.get(token, unk_id) for token in tokens]
        if self.max_len is not None and len(ids) > self.max_len:
            logger.warning("sequence of %d token ids is longer than max_len %d; the model "
                           "cannot take it in one piece", len(ids), self.max_len)
        return ids

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Tokens of vocab ids; raises TokenizerError for an id outside the vocab."""
        tokens = []
        for index in ids:
            token = self.ids_to_tokens.get(index) if isinstance(index, int) else None
            if token is None:
                raise TokenizerError(f"token id {index!r} is not in the vocab of {len(self)} "
                                     f"tokens ({self.vocab_file})")
            tokens.append(token)
        return tokens

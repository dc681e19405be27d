"""KorQuAD 2.x: HTML pages turned into the text the model reads, with every character mapped back.

A KorQuAD 2.x dataset is one JSON file or a directory of them (`korquad2.1_train_00.json`, ...),
each `{"version", "data": [{"title", "url", "context": HTML, "raw_html", "qas": [{"id", "question",
"answer": {"text", "answer_start"}}]}]}`, one answer per question, `answer_start` indexing the HTML
`context`, and a table or list answer given as its HTML.

`parse_page` reads the HTML with Python's own `html.parser.HTMLParser` (`convert_charrefs=False`):
it reports every run of text, entity reference and character reference as it meets it, and
`getpos()` then gives that item's exact place in the source, so each extracted character carries
the HTML span it came from. BeautifulSoup (beautifulsoup4) builds a tree and decodes entities
before we could see where they were, which loses exactly that map; the official metric still uses
it, in `evaluate_korquad_v2.py`, to score the HTML answers this module cuts.

What becomes text is set by `ExtractOptions`: block elements (headings, paragraphs, list items,
table rows) end a line, table cells of a row are joined by a marker, and scripts, styles,
navigation, edit links and reference lists are dropped. Whitespace runs become one space.
Characters the extraction adds (line breaks, cell markers) map to an empty HTML span.

`HtmlPage.html_answer` cuts a text span back out of the original HTML; a span covering the whole
text of a table, list or paragraph comes back as that element's HTML, tags included, as the
official answers do. `read_examples` gives `HtmlExample`s (`SquadExample`s whose context is the
page text), so windowing (`korquad_utils`) and decoding (`decoding`) run on pages unchanged;
`html_predictions` turns decoded text spans back into HTML answers.
"""
from __future__ import annotations

import hashlib
import html
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from squad_examples import KorquadFormatError, SquadExample, load_json_file

logger = logging.getLogger(__name__)

# Part of every KorQuAD 2.x feature-cache key: bump whenever the extracted text can change.
READER_VERSION = 1

# Elements that end a line of text where they start and where they end.
BLOCK_TAGS = frozenset({
    "address", "article", "aside", "blockquote", "caption", "dd", "div", "dl", "dt", "figcaption", "figure",
    "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "ol", "p", "pre", "section",
    "table", "tbody", "tfoot", "thead", "tr", "ul"})
CELL_TAGS = frozenset({"td", "th"})
# Elements without content or end tag.
VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param",
                       "source", "track", "wbr"})
# Elements whose end tag HTML lets a page leave out, and what their start tag closes when one is open.
IMPLIED_END = {"li": ("li",), "dt": ("dt", "dd"), "dd": ("dt", "dd"), "tr": ("tr", "td", "th"),
               "td": ("td", "th"), "th": ("td", "th"), "p": ("p",)}
OPTIONAL_END_TAGS = frozenset({"body", "colgroup", "dd", "dt", "head", "html", "li", "option", "p", "tbody",
                               "td", "tfoot", "th", "thead", "tr"})
# Elements whose whole text, when it is the whole answer, comes back as the element's HTML.
WHOLE_ELEMENT_TAGS = frozenset({"dl", "ol", "p", "table", "ul"})


class HtmlPageError(ValueError):
    """HTML this reader cannot map: an element never closed (unless `parse_page(close_at_end=True)`);
    the message says which and where."""


@dataclass(frozen=True)
class ExtractOptions:
    """What of a page becomes text: separators, and the elements dropped with all they hold."""
    cell_separator: str = " | "
    line_separator: str = "\n"
    drop_tags: frozenset[str] = frozenset({"head", "nav", "noscript", "script", "style", "template"})
    drop_classes: frozenset[str] = frozenset({"catlinks", "mw-editsection", "navbox", "reference", "references",
                                              "reflist", "toc"})


DEFAULT_OPTIONS = ExtractOptions()


@dataclass
class HtmlPage:
    """A page's text, and for each text character the HTML span [source_start, source_end) it came from."""
    html: str
    text: str
    source_start: np.ndarray
    source_end: np.ndarray
    # (first, end) text span of a whole-element tag's trimmed text -> the outermost such element's HTML span.
    element_spans: dict[tuple[int, int], tuple[int, int]]
    # With close_at_end: "<h2> at line 24 column 1 is never closed" when an element that needs an end tag was
    # still open at the end of the page (closed there, as browsers and BeautifulSoup do); "" otherwise.
    unclosed: str = ""

    def _trimmed(self, start: int, end: int) -> tuple[int, int]:
        """[start, end) without whitespace or added separators at either edge."""
        while start < end and (self.text[start].isspace() or self.source_start[start] == self.source_end[start]):
            start += 1
        while end > start and (self.text[end - 1].isspace()
                               or self.source_start[end - 1] == self.source_end[end - 1]):
            end -= 1
        return start, end

    def text_span(self, html_start: int, html_end: int) -> tuple[int, int] | None:
        """The text span of the HTML span [html_start, html_end) (whole characters inside it), or None."""
        first = int(np.searchsorted(self.source_start, html_start, side="left"))
        end = int(np.searchsorted(self.source_end, html_end, side="right"))
        start, end = self._trimmed(first, max(first, end))
        return (start, end) if start < end else None

    def html_span(self, start: int, end: int) -> tuple[int, int] | None:
        """The HTML span of the text span [start, end): its characters' sources, or the whole element
        (tags included) whose text it is; None for a span of nothing but whitespace or separators."""
        start, end = self._trimmed(start, end)
        if start >= end:
            return None
        return self.element_spans.get((start, end),
                                      (int(self.source_start[start]), int(self.source_end[end - 1])))

    def html_answer(self, start: int, end: int) -> str:
        """The HTML the text span [start, end) stands for ("" for an empty span)."""
        span = self.html_span(start, end)
        return "" if span is None else self.html[span[0]:span[1]]


@dataclass
class _OpenElement:
    tag: str
    html_start: int
    text_start: int
    dropped: bool
    line: int
    column: int
    cells: int = 0


class _PageParser(HTMLParser):
    """Walks the HTML once, appending text characters and their source spans."""

    def __init__(self, markup: str, options: ExtractOptions):
        super().__init__(convert_charrefs=False)
        self.markup, self.options = markup, options
        self.line_offsets = [0]
        for line in markup.split("\n")[:-1]:
            self.line_offsets.append(self.line_offsets[-1] + len(line) + 1)
        self.chars: list[str] = []
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.open: list[_OpenElement] = []
        self.dropping = 0
        self.element_spans: dict[tuple[int, int], tuple[int, int]] = {}

    def position(self) -> int:
        line, column = self.getpos()
        return self.line_offsets[line - 1] + column

    # --- text

    def _append(self, char: str, start: int, end: int) -> None:
        if char.isspace():
            if not self.chars or self.chars[-1].isspace():
                return
            char = " "
        self.chars.append(char)
        self.starts.append(start)
        self.ends.append(end)

    def _drop_trailing_space(self) -> None:
        while self.chars and self.chars[-1] == " " and self.starts[-1] != self.ends[-1]:
            for column in (self.chars, self.starts, self.ends):
                column.pop()

    def _add_separator(self, separator: str, at: int) -> None:
        self._drop_trailing_space()
        if not self.chars or self.chars[-1] == "\n":
            return
        for char in separator:
            self.chars.append(char)
            self.starts.append(at)
            self.ends.append(at)

    def handle_data(self, data: str) -> None:
        if self.dropping:
            return
        at = self.position()
        for offset, char in enumerate(data):
            self._append(char, at + offset, at + offset + 1)

    def _reference(self, prefix: str, name: str) -> None:
        if self.dropping:
            return
        at = self.position()
        end = at + len(prefix) + len(name)
        if self.markup.startswith(";", end):
            end += 1
        decoded = html.unescape(self.markup[at:end])
        for char in decoded:
            self._append(char, at, end)

    def handle_entityref(self, name: str) -> None:
        self._reference("&", name)

    def handle_charref(self, name: str) -> None:
        self._reference("&#", name)

    # --- structure

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        at = self.position()
        for closed_by in IMPLIED_END.get(tag, ()):
            self._close_implied(closed_by, at)
        if tag in BLOCK_TAGS and tag != "p":
            self._close_implied("p", at)
        if self.dropping:
            if tag not in VOID_TAGS:
                self._push(tag, at, dropped=True)
            return
        if tag == "br" or tag in BLOCK_TAGS:
            self._add_separator(self.options.line_separator, at)
        if tag in CELL_TAGS:
            row = next((element for element in reversed(self.open) if element.tag == "tr"), None)
            if row is not None:
                if row.cells:
                    self._add_separator(self.options.cell_separator, at)
                row.cells += 1
        if tag in VOID_TAGS:
            return
        classes = set((dict(attrs).get("class") or "").split())
        self._push(tag, at, dropped=tag in self.options.drop_tags or bool(classes & self.options.drop_classes))

    def _push(self, tag: str, at: int, dropped: bool) -> None:
        line, column = self.getpos()
        self.open.append(_OpenElement(tag, at, len(self.chars), dropped, line, column))
        self.dropping += dropped

    def _close_implied(self, tag: str, at: int) -> None:
        """Close an open `tag` that a new start tag ends, unless a table or list lies between them."""
        for depth in range(len(self.open) - 1, -1, -1):
            open_tag = self.open[depth].tag
            if open_tag == tag:
                self._close_down_to(depth, at)
                return
            if open_tag in ("table", "ul", "ol", "dl", "div") or open_tag not in OPTIONAL_END_TAGS:
                return

    def handle_endtag(self, tag: str) -> None:
        at = self.position()
        depth = next((d for d in range(len(self.open) - 1, -1, -1) if self.open[d].tag == tag), None)
        if depth is None:  # a stray end tag closes nothing, as in a browser
            return
        end = self.markup.find(">", at)
        self._close_down_to(depth, len(self.markup) if end < 0 else end + 1)

    def _close_down_to(self, depth: int, html_end: int) -> None:
        while len(self.open) > depth:
            element = self.open.pop()
            self.dropping -= element.dropped
            if self.dropping or element.dropped:
                continue
            if element.tag in WHOLE_ELEMENT_TAGS:
                text_span = self._trimmed_text(element.text_start)
                if text_span is not None:
                    self.element_spans[text_span] = (element.html_start, html_end)
            if element.tag in BLOCK_TAGS:
                self._add_separator(self.options.line_separator, html_end)

    def _trimmed_text(self, text_start: int) -> tuple[int, int] | None:
        start, end = text_start, len(self.chars)
        while start < end and (self.chars[start].isspace() or self.starts[start] == self.ends[start]):
            start += 1
        while end > start and (self.chars[end - 1].isspace() or self.starts[end - 1] == self.ends[end - 1]):
            end -= 1
        return (start, end) if start < end else None

    def finish(self, close_at_end: bool) -> HtmlPage:
        self.close()
        unclosed = next((element for element in self.open if element.tag not in OPTIONAL_END_TAGS), None)
        note = "" if unclosed is None else \
            f"<{unclosed.tag}> at line {unclosed.line} column {unclosed.column + 1} is never closed"
        if note and not close_at_end:
            raise HtmlPageError(note)
        self._close_down_to(0, len(self.markup))  # what is still open ends with the page, as in a browser
        while self.chars and (self.chars[-1].isspace()):
            for column in (self.chars, self.starts, self.ends):
                column.pop()
        return HtmlPage(self.markup, "".join(self.chars), np.array(self.starts, dtype=np.int64),
                        np.array(self.ends, dtype=np.int64), self.element_spans, note)


def parse_page(markup: str, options: ExtractOptions = DEFAULT_OPTIONS, close_at_end: bool = False) -> HtmlPage:
    """The text of an HTML page and its map back to the HTML; HtmlPageError for HTML it cannot map. With
    `close_at_end`, elements still open at the end are closed there, as a browser does (`HtmlPage.unclosed`)."""
    parser = _PageParser(markup, options)
    parser.feed(markup)
    return parser.finish(close_at_end)


# ----------------------------------------------------------------------------- datasets


@dataclass
class HtmlExample(SquadExample):
    """A KorQuAD 2.x question: its context is the page text, its answer span in that text; `page`
    maps spans back to the HTML and `html_answer` is the official answer as given."""
    page: HtmlPage | None = field(default=None, repr=False, compare=False)
    html_answer: str | None = None


def dataset_files(path: str | os.PathLike) -> list[Path]:
    """The JSON files of a KorQuAD 2.x dataset: the file itself, or every *.json of a directory, sorted."""
    path = Path(path)
    if path.is_dir():
        files = sorted(child for child in path.iterdir() if child.suffix == ".json" and child.is_file())
        if not files:
            raise KorquadFormatError(f"{path}: the directory holds no .json file")
        return files
    return [path]


def is_korquad2(dataset: Any) -> bool:
    """Whether a parsed file has KorQuAD 2.x's shape: documents with "context" and "qas", no "paragraphs"."""
    data = dataset.get("data") if isinstance(dataset, dict) else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return False
    return "paragraphs" not in data[0] and "context" in data[0] and "qas" in data[0]


def is_dataset_path(path: str | os.PathLike) -> bool:
    """Whether `path` is a KorQuAD 2.x directory, or a file of KorQuAD 2.x's shape (False if unreadable)."""
    if Path(path).is_dir():
        return True
    try:
        return is_korquad2(load_json_file(Path(path)))
    except KorquadFormatError:
        return False


def dataset_digest(path: str | os.PathLike) -> str:
    """sha256 over a KorQuAD 2.x dataset's files (names and contents) and this reader's version."""
    digest = hashlib.sha256(f"korquad2-reader-v{READER_VERSION}\0".encode())
    for file in dataset_files(path):
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _string(record: Any, key: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(key), str):
        raise KorquadFormatError(f"{where}: missing string '{key}'")
    return record[key]


def read_examples(path: str | os.PathLike, is_training: bool,
                  options: ExtractOptions = DEFAULT_OPTIONS) -> list[HtmlExample]:
    """Every question of a KorQuAD 2.x file or directory, on its page's text.

    Refuses, naming file and question: HTML that cannot be mapped, an answer_start that does not point
    at the answer text, a duplicate id. For training, such an answer_start or an answer without any text
    (an image) is skipped with a warning. A page ending with elements still open is read, with a warning."""
    examples: list[HtmlExample] = []
    seen_ids: set[str] = set()
    for file in dataset_files(path):
        dataset = load_json_file(file)
        if Path(path).is_dir() and not is_korquad2(dataset):  # the user gave the directory, not this file
            raise KorquadFormatError(f"{path}: a directory is read as a KorQuAD 2.x dataset, and {file.name} in it "
                                     f"is not a KorQuAD 2.x file; pass a KorQuAD 1.0 file itself, not its directory")
        examples += examples_from_dataset(dataset, str(file), is_training, options, seen_ids)
    return examples


def examples_from_dataset(dataset: Any, name: str, is_training: bool, options: ExtractOptions = DEFAULT_OPTIONS,
                          seen_ids: set[str] | None = None) -> list[HtmlExample]:
    """`read_examples` for one parsed file; messages name `name`."""
    if not is_korquad2(dataset):
        raise KorquadFormatError(f"{name}: not a KorQuAD 2.x file (expected 'data' documents with 'context' "
                                 f"and 'qas')")
    seen_ids = set() if seen_ids is None else seen_ids
    examples: list[HtmlExample] = []
    for number, document in enumerate(dataset["data"]):
        where = f"{name}: document {number}"
        context = _string(document, "context", where)
        qas = document.get("qas")
        if not isinstance(qas, list):
            raise KorquadFormatError(f"{where}: missing 'qas' list")
        first = qas[0].get("id") if qas and isinstance(qas[0], dict) else None
        try:
            page = parse_page(context, options, close_at_end=True)  # one truncated page must not stop a dataset
        except HtmlPageError as error:
            raise KorquadFormatError(f"{where} ({document.get('title')!r}, question {first}): HTML does not "
                                     f"parse: {error}") from None
        if page.unclosed:
            logger.warning("%s (%r, question %s): %s; closed at the end of the page", where,
                           document.get("title"), first, page.unclosed)
        for qa in qas:
            example = _example(qa, page, where, is_training, seen_ids)
            if example is not None:
                examples.append(example)
    return examples


def _example(qa: Any, page: HtmlPage, where: str, is_training: bool, seen_ids: set[str]) -> HtmlExample | None:
    qas_id = _string(qa, "id", f"{where} question")
    where = f"{where.split(': document')[0]}: question {qas_id}"
    if qas_id in seen_ids:
        raise KorquadFormatError(f"{where}: duplicate question id")
    seen_ids.add(qas_id)
    question = _string(qa, "question", where)
    answer = qa.get("answer")
    if answer is None and not is_training:  # a test set
        return HtmlExample(qas_id, question, page.text, [], page=page)
    answer_text = _string(answer, "text", f"{where} answer")
    answer_start = answer.get("answer_start") if isinstance(answer, dict) else None
    if not isinstance(answer_start, int) or isinstance(answer_start, bool):
        raise KorquadFormatError(f"{where}: answer 'answer_start' must be a whole number, got {answer_start!r}")
    if answer_start < 0 or page.html[answer_start:answer_start + len(answer_text)] != answer_text:
        problem = (f"answer_start {answer_start} does not point at the answer text {_clip(answer_text)!r} "
                   f"in the HTML context")
        if is_training:  # as KorQuAD 1.0 training does; a score would change, so evaluation refuses
            logger.warning("%s: %s; question skipped", where, problem)
            return None
        raise KorquadFormatError(f"{where}: {problem}")
    span = page.text_span(answer_start, answer_start + len(answer_text))
    if span is None:
        if is_training:
            logger.warning("%s: the answer %r holds no text; question skipped", where, _clip(answer_text))
            return None
        span = (0, 0)
    start, end = span
    return HtmlExample(qas_id, question, page.text, [{"text": page.text[start:end], "answer_start": start}],
                       start_char=start if is_training else None, end_char=end if is_training else None,
                       page=page, html_answer=answer_text)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def has_html_examples(examples: Sequence[SquadExample]) -> bool:
    return any(isinstance(example, HtmlExample) for example in examples)


def html_predictions(examples: Sequence[SquadExample], predictions: dict[str, str],
                     nbest: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """Predictions with each KorQuAD 2.x answer cut back out of its page's HTML (others as they are);
    every n-best entry of such a question gains its `html`."""
    answers = dict(predictions)
    for example in examples:
        if not isinstance(example, HtmlExample) or example.qas_id not in answers:
            continue
        for entry in nbest.get(example.qas_id, []):
            entry["html"] = "" if entry["start"] is None else example.page.html_answer(entry["start"], entry["end"])
        entries = nbest.get(example.qas_id)
        answers[example.qas_id] = entries[0]["html"] if entries else ""
    return answers


def score(dataset: str | os.PathLike, predictions: dict[str, str]) -> dict[str, float]:
    """The official KorQuAD 2.x EM/F1 (evaluate_korquad_v2.py) of HTML predictions."""
    import evaluate_korquad_v2

    try:
        return evaluate_korquad_v2.evaluate(evaluate_korquad_v2.load_documents(str(dataset)), predictions)
    except ValueError as error:
        raise KorquadFormatError(f"--metric korquad2: {error}") from None


def oracle_predictions(examples: Sequence[HtmlExample]) -> dict[str, str]:
    """Each gold answer through the text map and back: what a perfect span model would answer."""
    return {example.qas_id: example.page.html_answer(example.answers[0]["answer_start"],
                                                     example.answers[0]["answer_start"]
                                                     + len(example.answers[0]["text"]))
            for example in examples if example.answers}

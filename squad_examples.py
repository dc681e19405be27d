"""Reading KorQuAD/SQuAD-format JSON (KorQuAD v1.0, SQuAD 2.0, KLUE-MRC) into `SquadExample`s, validated.

Structural problems raise `KorquadFormatError`, naming the file and the spot; KorQuAD 2.x files and
directories are recognised by their structure and read by `korquad2`.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenization import is_blank

# The baseline's logger name (this was part of korquad_utils): its warnings read and filter as before.
logger = logging.getLogger("korquad_utils")


class KorquadFormatError(ValueError):
    """A KorQuAD/SQuAD-format file that cannot be used; the message names the file and the spot."""


@dataclass
class SquadExample:
    """One question on one context. `start_char`/`end_char` (end exclusive) are set for training.

    Read with `version_2_with_negative`: `is_impossible` marks a question without an answer in its
    context (it trains to [CLS]); KLUE-MRC's `question_type` and `plausible_answers` are kept as read
    (plausible answers are never trained on)."""
    qas_id: str
    question_text: str
    context_text: str
    answers: list[dict]
    start_char: int | None = None
    end_char: int | None = None
    is_impossible: bool = False
    # `is_impossible: true` in the file (not merely no answers): a gold "no answer" the SQuAD 2.0 metric scores.
    marked_impossible: bool = False
    question_type: int | None = None
    plausible_answers: list[dict] = field(default_factory=list)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small acyclic containers.

    Creating hundreds of thousands of lists, tuples and dicts triggers collection after collection,
    each walking the (large, cycle-free) features already built; this nearly doubled decoding time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class JSONTooDeepError(json.JSONDecodeError):
    """JSON nested deeper than the parser can recurse; it has no line or column that would help."""

    def __init__(self) -> None:
        super().__init__("nested too deeply", "", 0)

    def __str__(self) -> str:
        return self.msg


class JSONNumberError(json.JSONDecodeError):
    """A number the reader cannot take: a whole number past Python's digit limit for int(), or (asked for
    finite numbers) NaN, ±Infinity or a float beyond a double's range. No line or column: the hooks lack them."""

    def __init__(self, description: str) -> None:
        super().__init__(description, "", 0)

    def __str__(self) -> str:
        return self.msg


def whole_number(digits: str) -> int:
    number = int_or_marker(digits)
    if isinstance(number, UnusableNumber):   # json.loads would raise a plain ValueError: not a JSONDecodeError
        raise JSONNumberError(number.description)
    return number


@dataclass
class UnusableNumber:
    """Stands in, while parsing, for a number json.loads would accept but a reader cannot take: NaN or
    ±Infinity (not JSON, and an answer echoing them could not be strict JSON), a float beyond a double's range
    (1e999) or a whole number past Python's digit limit for int(); the field holding it is named later."""
    description: str


def not_json_constant(text: str) -> UnusableNumber:
    return UnusableNumber(f"{text}, which is not JSON")


def finite_float_or_marker(text: str) -> float | UnusableNumber:
    number = float(text)
    if math.isfinite(number):
        return number
    return UnusableNumber(f"{text if len(text) <= 20 else text[:17] + '...'}, a number beyond the range of a double")


def int_or_marker(digits: str) -> int | UnusableNumber:
    try:
        return int(digits)
    except ValueError:   # more digits than sys.get_int_max_str_digits() allows
        return UnusableNumber(f"a whole number of {len(digits.lstrip('-'))} digits, more than the "
                              f"{sys.get_int_max_str_digits()} Python reads")


def unusable_number_in(value: Any) -> UnusableNumber | None:
    """The first UnusableNumber anywhere in a parsed JSON value (walked without recursion: an "id" may nest
    as deep as json.loads allows)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, UnusableNumber):
            return item
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return None


def _finite_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, value in pairs:
        found = unusable_number_in(value)
        if found is not None:
            raise JSONNumberError(f"{json.dumps(key, ensure_ascii=False)} holds {found.description}")
    return dict(pairs)


def parse_json(document: str | bytes, finite: bool = False) -> Any:
    """`json.loads` for user input, where every problem is a JSONDecodeError: JSON nested too deeply
    (`JSONTooDeepError`, where json.loads raises RecursionError) and a whole number past Python's digit
    limit (`JSONNumberError`, where json.loads raises a plain ValueError). With `finite`, NaN, ±Infinity and
    floats beyond a double (1e999), which strict JSON cannot carry, are a JSONNumberError naming their field."""
    hooks: dict[str, Any] = {"parse_int": whole_number}
    if finite:
        hooks.update(parse_constant=not_json_constant, parse_float=finite_float_or_marker, parse_int=int_or_marker,
                     object_pairs_hook=_finite_object)
    try:
        value = json.loads(document, **hooks)
    except RecursionError:
        raise JSONTooDeepError() from None
    found = unusable_number_in(value) if finite else None
    if found is not None:
        raise JSONNumberError(found.description)
    return value


def load_json_file(path: Path) -> Any:
    """A JSON file's content (a BOM allowed), or KorquadFormatError naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a BOM (Windows Notepad) is fine too
            return parse_json(file.read())
    except OSError as error:
        raise KorquadFormatError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise KorquadFormatError(f"{path}: not UTF-8 text") from None
    except (JSONTooDeepError, JSONNumberError) as error:
        raise KorquadFormatError(f"{path}: not valid JSON ({error})") from None
    except json.JSONDecodeError as error:
        raise KorquadFormatError(f"{path}: not valid JSON ({error.msg} at line {error.lineno} "
                                 f"column {error.colno})") from None


def _field(record: Any, key: str, kind: type, where: str) -> Any:
    """`record[key]`, checked to exist and be of `kind`."""
    if not isinstance(record, dict):
        raise KorquadFormatError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise KorquadFormatError(f"{where}: missing '{key}'")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise KorquadFormatError(f"{where}: '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _read_answers(qa: dict, where: str, is_training: bool) -> list[dict]:
    answers = qa.get("answers", [])
    if not isinstance(answers, list):
        raise KorquadFormatError(f"{where}: 'answers' must be a list, got {type(answers).__name__}")
    for answer_number, answer in enumerate(answers):
        answer_where = f"{where} answer {answer_number}"
        _field(answer, "text", str, answer_where)
        if is_training:
            _field(answer, "answer_start", int, answer_where)
    return answers


def _training_span(context: str, answers: list[dict]) -> tuple[int, int] | str:
    """Character span (end exclusive) of the first answer, whitespace trimmed, or why it is unusable."""
    if not answers:
        return "no answer to train on"
    text, start = answers[0]["text"], answers[0]["answer_start"]
    if start < 0 or context[start:start + len(text)] != text:
        return f"answer_start {start} does not point at the answer text {text!r}"
    stripped = text.strip()
    if not stripped:
        return "the answer text is blank"
    start += len(text) - len(text.lstrip())
    return start, start + len(stripped)


def _question_id(qa: Any, where: str, version_2_with_negative: bool) -> str:
    """`id`, or with version 2 KLUE-MRC's `guid` where there is no `id`."""
    if version_2_with_negative and isinstance(qa, dict) and "id" not in qa and "guid" in qa:
        return _field(qa, "guid", str, where)
    if isinstance(qa, dict) and "id" not in qa and "guid" in qa:
        raise KorquadFormatError(f"{where}: missing 'id' (a KLUE-MRC file with 'guid' ids? read it with "
                                 f"--version_2_with_negative)")
    return _field(qa, "id", str, where)


def _read_unanswerable(qa: dict, example: SquadExample, where: str) -> None:
    """Fill the version-2 fields of `example`: unanswerable when `is_impossible` is true or it has no answers."""
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise KorquadFormatError(f"{where}: 'is_impossible' must be true or false, got {impossible!r}")
    if impossible and example.answers:
        raise KorquadFormatError(f"{where}: 'is_impossible' is true but it has {len(example.answers)} answer(s); "
                                 f"an unanswerable question's answers go in 'plausible_answers'")
    example.is_impossible = impossible or not example.answers
    example.marked_impossible = impossible
    question_type = qa.get("question_type")
    if question_type is not None and (isinstance(question_type, bool) or not isinstance(question_type, int)):
        raise KorquadFormatError(f"{where}: 'question_type' must be a whole number, got {question_type!r}")
    example.question_type = question_type
    plausible = qa.get("plausible_answers", [])
    if not isinstance(plausible, list):
        raise KorquadFormatError(f"{where}: 'plausible_answers' must be a list, got {type(plausible).__name__}")
    example.plausible_answers = plausible


@gc_paused()
def read_squad_examples(input_file: str | os.PathLike, is_training: bool,
                        version_2_with_negative: bool = False) -> list[SquadExample]:
    """Read a SQuAD/KorQuAD-format JSON file into examples, validating its structure.

    A KorQuAD 2.x file or directory (documents with an HTML "context" and "qas", no "paragraphs") is
    read by `korquad2.read_examples` into examples on each page's text.

    Structural problems raise `KorquadFormatError`. For training, a question whose first answer does
    not match its context (or has none) is skipped with a warning; a file without answers reads
    fine for prediction.

    With `version_2_with_negative` (SQuAD 2.0, KLUE-MRC): a question with `"is_impossible": true` or
    an empty answer list is unanswerable (trained to [CLS], never skipped); `guid` is the id where
    there is no `id`; `is_impossible` must be a boolean and false wherever there are answers.
    """
    path = Path(input_file)
    import korquad2  # KorQuAD 2.x (HTML pages) is recognised by its structure; it imports this module

    if path.is_dir():
        return korquad2.read_examples(path, is_training)
    dataset = load_json_file(path)
    if korquad2.is_korquad2(dataset):
        return korquad2.examples_from_dataset(dataset, str(path), is_training)
    return squad_examples_from_json(dataset, str(path), is_training, version_2_with_negative)


def squad_examples_from_json(dataset: Any, name: str, is_training: bool,
                             version_2_with_negative: bool = False) -> list[SquadExample]:
    """`read_squad_examples` for a file already parsed (e.g. read from stdin); messages name `name`."""
    articles = _field(dataset, "data", list, name)
    examples: list[SquadExample] = []
    seen_ids: set[str] = set()
    skipped = 0
    for article_number, article in enumerate(articles):
        article_where = f"{name}: article {article_number}"
        for paragraph_number, paragraph in enumerate(_field(article, "paragraphs", list, article_where)):
            paragraph_where = f"{article_where} paragraph {paragraph_number}"
            context = _field(paragraph, "context", str, paragraph_where)
            for qa_number, qa in enumerate(_field(paragraph, "qas", list, paragraph_where)):
                qas_id = _question_id(qa, f"{paragraph_where} question {qa_number}", version_2_with_negative)
                where = f"{name}: question {qas_id}"
                if qas_id in seen_ids:
                    raise KorquadFormatError(f"{where}: duplicate question id")
                seen_ids.add(qas_id)
                example = SquadExample(qas_id, _field(qa, "question", str, where), context,
                                       _read_answers(qa, where, is_training))
                if version_2_with_negative:
                    _read_unanswerable(qa, example, where)
                if is_training and is_blank(example.question_text):   # nothing to learn from
                    logger.warning("%s: the question is blank; question skipped", where)
                    skipped += 1
                    continue
                if is_training and not example.is_impossible:
                    span = _training_span(context, example.answers)
                    if isinstance(span, str):
                        logger.warning("%s: %s; question skipped", where, span)
                        skipped += 1
                        continue
                    example.start_char, example.end_char = span
                examples.append(example)
    if skipped:
        logger.warning("%s: skipped %d of %d training questions", name, skipped, len(seen_ids))
    return examples

"""The official KorQuAD 2.0 / 2.1 metric: EM and character F1 over answers that may be HTML.

Usage: python3 evaluate_korquad_v2.py DATASET PREDICTIONS.json

DATASET is one KorQuAD 2.x JSON file or a directory of them (every `*.json` in it, as the
official script reads a directory). Each file is `{"version", "data": [{"title", "context",
"qas": [{"id", "question", "answer": {"text", "answer_start"}}]}]}` with one answer per question.
PREDICTIONS maps question id to answer text (HTML or plain text). Prints one JSON line,
`{"exact_match": ..., "f1": ...}`, as percentages.

The published rules: the text of the answer is extracted with an HTML parser (BeautifulSoup's
`get_text()`); quote and bracket marks ' " 《 》 < > 〈 〉 ( ) ‘ ’ become spaces; the text is
lower-cased; ASCII punctuation is dropped; then **all** whitespace is removed. EM compares the
normalised strings; F1 counts common characters. A question without a prediction scores 0.

Stands alone with one dependency, beautifulsoup4, and always parses with Python's own html.parser:
the official script lets BeautifulSoup pick whichever parser is installed, and those disagree on
malformed fragments (lxml drops a stray "<" and everything after it; html.parser keeps it as
text), so a fixed parser keeps a score from depending on what else a machine has installed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import string
import sys
import warnings
from collections import Counter
from typing import Any

try:
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
except ImportError:  # named in one line by main() (and by the toolkit before any work); the metric needs it
    BeautifulSoup = None
MISSING_BS4 = "the KorQuAD 2.0 metric needs beautifulsoup4: pip install beautifulsoup4"

_SPACED_MARKS = re.compile("['\"《》<>〈〉()‘’]")
_ASCII_PUNCTUATION = frozenset(string.punctuation)
def html_text(markup: str) -> str:
    """The text of an HTML fragment, as BeautifulSoup's get_text() gives it (entities decoded)."""
    with warnings.catch_warnings():
        # An answer such as "1990.5" looks like a file name to bs4, which only warns about it.
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        return BeautifulSoup(markup, features="html.parser").get_text()


def normalize_answer(text: str) -> str:
    """HTML text, marks to spaces, lower case, no ASCII punctuation, and no whitespace at all."""
    text = _SPACED_MARKS.sub(" ", html_text(text)).lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
    return "".join(text.split())


def exact_match_score(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Character F1 of the normalised answers; 0 when they share no character (both empty included)."""
    prediction_chars = normalize_answer(prediction)
    truth_chars = normalize_answer(truth)
    num_same = sum((Counter(prediction_chars) & Counter(truth_chars)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_chars)
    recall = num_same / len(truth_chars)
    return 2 * precision * recall / (precision + recall)


def evaluate(documents: list[dict[str, Any]], predictions: dict[str, str]) -> dict[str, float]:
    """EM and F1 in percent over every question of `documents` (the files' `data` lists joined)."""
    exact_match = f1 = 0.0
    total = 0
    for document in documents:
        for qa in document["qas"]:
            total += 1
            if qa["id"] not in predictions:
                print(f"Unanswered question {qa['id']} will receive score 0.", file=sys.stderr)
                continue
            truth = qa["answer"]["text"]
            exact_match += exact_match_score(predictions[qa["id"]], truth)
            f1 += f1_score(predictions[qa["id"]], truth)
    if total == 0:
        raise ValueError("dataset has no question to score")
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def dataset_files(path: str) -> list[str]:
    """The JSON files of a KorQuAD 2.x dataset: the file itself, or every *.json of a directory, sorted."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, name) for name in os.listdir(path)
                       if name.endswith(".json") and os.path.isfile(os.path.join(path, name)))
        if not files:
            raise ValueError(f"dataset {path}: directory holds no .json file")
        return files
    if not os.path.exists(path):
        raise ValueError(f"dataset {path}: no such file or directory")
    return [path]


def _load_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as file:
            return json.load(file)
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot read: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{what} {path}: not valid JSON: {error}") from None
    except RecursionError:  # json's parser recurses once per nested [ or {
        raise ValueError(f"{what} {path}: not valid JSON: nested too deeply") from None


def load_documents(path: str) -> list[dict[str, Any]]:
    """Every document of the dataset at `path`, checked to have what the metric reads."""
    documents: list[dict[str, Any]] = []
    for file in dataset_files(path):
        content = _load_json(file, "dataset")
        data = content.get("data") if isinstance(content, dict) else None
        if not isinstance(data, list):
            raise ValueError(f"dataset {file}: expected an object with a 'data' list")
        for index, document in enumerate(data):
            qas = document.get("qas") if isinstance(document, dict) else None
            if not isinstance(qas, list):
                raise ValueError(f"dataset {file}: document {index}: missing 'qas' list")
            for qa in qas:
                if not isinstance(qa, dict) or not isinstance(qa.get("id"), str):
                    raise ValueError(f"dataset {file}: document {index}: a question lacks a string 'id'")
                answer = qa.get("answer")
                if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
                    raise ValueError(f"dataset {file}: question {qa['id']}: 'answer' must be an object "
                                     "with a 'text' (is this a test set without answers?)")
        documents.extend(data)
    return documents


def load_predictions(path: str) -> dict[str, str]:
    predictions = _load_json(path, "predictions")
    if not isinstance(predictions, dict):
        raise ValueError(f"predictions {path}: expected an object mapping question id to answer text")
    for question_id, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(f"predictions {path}: question {question_id}: answer must be a string, "
                             f"got {type(text).__name__}")
    return predictions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluation for KorQuAD 2.0 / 2.1")
    parser.add_argument("dataset", help="a KorQuAD 2.x JSON file, or a directory of them")
    parser.add_argument("prediction_file", help="predictions JSON: {question id: answer text or HTML}")
    args = parser.parse_args(argv)
    if BeautifulSoup is None:
        print(f"evaluate_korquad_v2.py: error: {MISSING_BS4}", file=sys.stderr)
        return 1
    try:
        documents = load_documents(args.dataset)
        predictions = load_predictions(args.prediction_file)
        scores = evaluate(documents, predictions)
    except ValueError as error:
        print(f"evaluate_korquad_v2.py: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The official KorQuAD v1.0 metric: exact match and character-level F1, as percentages.

Usage: python3 evaluate_v1_0.py DATASET.json PREDICTIONS.json

Stands alone (standard library only), like the official script, and agrees with it to the last
digit: the same normalisation, the same arithmetic in the same order.
"""
from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import Counter
from typing import Any
from collections.abc import Callable, Iterable, Mapping

EXPECTED_VERSION_PREFIX = "KorQuAD_v1.0"

# Quote and bracket marks become spaces before punctuation is dropped, so "(가)나" scores as "가 나".
_SPACED_MARKS = re.compile("['\"《》<>〈〉()‘’]")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Quote/bracket marks to spaces, lower-case, drop ASCII punctuation, collapse whitespace."""
    text = _SPACED_MARKS.sub(" ", text).lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
    return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    """Whether the two answers are equal after normalisation."""
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """F1 over the characters of the normalised answers, spaces left out; 0 when none is shared."""
    prediction_chars = normalize_answer(prediction).replace(" ", "")
    truth_chars = normalize_answer(ground_truth).replace(" ", "")
    num_same = sum((Counter(prediction_chars) & Counter(truth_chars)).values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_chars)
    recall = 1.0 * num_same / len(truth_chars)
    return (2 * precision * recall) / (precision + recall)


def best_over_ground_truths(metric: Callable[[str, str], float], prediction: str,
                            ground_truths: Iterable[str]) -> float:
    """The best score of `prediction` against any of the gold answers."""
    return max(metric(prediction, truth) for truth in ground_truths)


def evaluate(dataset: list[dict[str, Any]] | Mapping[str, Any],
             predictions: Mapping[str, str]) -> dict[str, float]:
    """Score `predictions` ({question id: answer text}) against the dataset's articles.

    `dataset` is the file's `data` list (as in the official script) or the whole file's object.
    A question without a prediction scores 0 and is reported on stderr. A question whose `answers`
    list is empty has nothing to score against: it is left out of the average (where the official
    script would crash), and how many were left out is reported on stderr.
    """
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    exact_match = f1 = 0.0
    total = without_answers = 0
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if not qa["answers"]:
                    without_answers += 1
                    continue
                total += 1
                if qa["id"] not in predictions:
                    print(f"Unanswered question {qa['id']} will receive score 0.", file=sys.stderr)
                    continue
                ground_truths = [answer["text"] for answer in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += best_over_ground_truths(exact_match_score, prediction, ground_truths)
                f1 += best_over_ground_truths(f1_score, prediction, ground_truths)
    if total == 0:
        raise ValueError("dataset has no question with answers to score (is this a test set without answers?)")
    if without_answers:
        print(f"Warning: {without_answers} question(s) with an empty 'answers' list were not scored.",
              file=sys.stderr)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _load_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: a BOM (Windows Notepad) is fine too
            return json.load(file)
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot read: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path}: not valid JSON: {error}") from None
    except RecursionError:  # json's parser recurses once per nested [ or {
        raise ValueError(f"{what} {path}: not valid JSON: nested too deeply") from None


def _check_dataset(dataset: Any, path: str) -> None:
    if not isinstance(dataset, dict) or not isinstance(dataset.get("data"), list):
        raise ValueError(f"dataset {path}: expected an object with a 'data' list")
    for article_index, article in enumerate(dataset["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise ValueError(f"dataset {path}: article {article_index}: missing 'paragraphs' list")
        for paragraph in paragraphs:
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise ValueError(f"dataset {path}: article {article_index}: a paragraph lacks a 'qas' list")
            for qa in qas:
                if not isinstance(qa, dict) or "id" not in qa:
                    raise ValueError(f"dataset {path}: article {article_index}: a question lacks an 'id'")
                answers = qa.get("answers")
                if not isinstance(answers, list) or not all(
                        isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers):
                    raise ValueError(f"dataset {path}: question {qa['id']}: 'answers' must be a "
                                     "list of objects with a 'text' (is this a test set without answers?)")


def _check_predictions(predictions: Any, path: str) -> None:
    if not isinstance(predictions, dict):
        raise ValueError(f"predictions {path}: expected an object mapping question id to answer text")
    for question_id, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(f"predictions {path}: question {question_id}: answer must be a string, "
                             f"got {type(text).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Evaluation for KorQuAD v1.0")
    parser.add_argument("dataset_file", help="KorQuAD v1.0 dataset JSON (with answers)")
    parser.add_argument("prediction_file", help="predictions JSON: {question id: answer text}")
    args = parser.parse_args(argv)
    try:
        dataset = _load_json(args.dataset_file, "dataset")
        _check_dataset(dataset, args.dataset_file)
        predictions = _load_json(args.prediction_file, "predictions")
        _check_predictions(predictions, args.prediction_file)
        version = str(dataset.get("version", ""))
        if not version.startswith(EXPECTED_VERSION_PREFIX):
            print(f"Evaluation expects {EXPECTED_VERSION_PREFIX}, but got dataset with version {version!r}",
                  file=sys.stderr)
        scores = evaluate(dataset["data"], predictions)
    except ValueError as error:
        print(f"evaluate_v1_0.py: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())

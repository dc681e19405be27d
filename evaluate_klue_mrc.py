"""KLUE-MRC's metric: exact match and character ROUGE-W, overall and per question type, as percentages.

Usage: python3 evaluate_klue_mrc.py DATASET.json PREDICTIONS.json

Prints one JSON line: {"exact_match", "rouge_w", "type1": {"exact_match", "rouge_w", "total"},
"type2": ..., "type3": ...}. Computed as the KLUE baseline computes it:
- answers are lower-cased, ASCII punctuation dropped and whitespace collapsed. The baseline's
  pattern meant to turn quote marks into spaces only matches a mark followed by the four characters
  `()‘’`, so marks such as 《》 and ‘’ stay: reproduced here, as that is what its figures measure;
- ROUGE-W is the F1 of the longest common *consecutive* run of characters (the longest common
  substring) between prediction and gold: precision = run / len(prediction), recall = run /
  len(gold); against a gold "" it is 1 only for an empty prediction. The run is found with difflib
  as in the baseline (whose junk heuristic only acts on gold answers of 200+ characters);
- per question, the best score over its gold answers; an unanswerable question (`is_impossible`
  true, or no answers) has the single gold "";
- the overall figures average over all questions, each type's over its own questions
  (`question_type` 1, 2 or 3; KLUE's type 3 is the unanswerable one).
Question ids are `guid` (KLUE's files) or `id`. Stands alone (standard library only).
"""
from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections.abc import Mapping
from difflib import SequenceMatcher
from typing import Any

QUESTION_TYPES = (1, 2, 3)
# As written in the KLUE baseline: a character class followed by the literal "()‘’".
_BASELINE_MARKS = re.compile("['\"《》<>〈〉]\\(\\)‘’")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    text = _BASELINE_MARKS.sub(" ", text.lower())
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
    return " ".join(text.split())


def longest_common_run(prediction: str, truth: str) -> int:
    """Length of the longest substring shared by the two texts."""
    return SequenceMatcher(None, prediction, truth).find_longest_match(0, len(prediction), 0, len(truth)).size


def rouge_w(prediction: str, truth: str) -> float:
    """F1 of the longest common substring of two normalised answers."""
    if not truth:
        return float(not prediction)
    run = longest_common_run(prediction, truth)
    if run == 0:
        return 0.0
    precision, recall = run / len(prediction), run / len(truth)
    return 2 * precision * recall / (precision + recall)


def question_id(qa: Mapping[str, Any]) -> str:
    return qa["guid"] if "guid" in qa else qa["id"]


def evaluate(dataset: list[dict[str, Any]] | Mapping[str, Any], predictions: Mapping[str, str]) -> dict[str, Any]:
    """KLUE-MRC's EM and ROUGE-W of `predictions` ({question id: text}); a missing prediction scores 0."""
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    per_type: dict[int, list[tuple[float, float]]] = {kind: [] for kind in QUESTION_TYPES}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = question_id(qa)
                if qid not in predictions:
                    print(f"Missing prediction for {qid}: scored 0.", file=sys.stderr)
                    per_type[qa["question_type"]].append((0.0, 0.0))
                    continue
                prediction = normalize_answer(predictions[qid])
                impossible = qa.get("is_impossible") is True or not qa["answers"]
                truths = [""] if impossible else [normalize_answer(answer["text"]) for answer in qa["answers"]]
                per_type[qa["question_type"]].append((max(float(prediction == truth) for truth in truths),
                                                      max(rouge_w(prediction, truth) for truth in truths)))
    every = [pair for pairs in per_type.values() for pair in pairs]
    if not every:
        raise ValueError("dataset has no questions to score")
    result: dict[str, Any] = _averages(every)
    for kind, pairs in per_type.items():
        result[f"type{kind}"] = {**(_averages(pairs) if pairs else {"exact_match": None, "rouge_w": None}),
                                 "total": len(pairs)}
    return result


def _averages(pairs: list[tuple[float, float]]) -> dict[str, float]:
    return {"exact_match": 100.0 * sum(em for em, _ in pairs) / len(pairs),
            "rouge_w": 100.0 * sum(rouge for _, rouge in pairs) / len(pairs)}


# --- the command line ------------------------------------------------------------------------

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


def check_dataset(dataset: Any, path: str) -> None:
    """Refuse a dataset the scoring cannot use, naming the article or question at fault."""
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
                if not isinstance(qa, dict) or not isinstance(qa.get("guid", qa.get("id")), str):
                    raise ValueError(f"dataset {path}: article {article_index}: a question lacks a string "
                                     f"'guid' or 'id'")
                where = f"dataset {path}: question {question_id(qa)}"
                answers = qa.get("answers")
                if not isinstance(answers, list) or not all(
                        isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers):
                    raise ValueError(f"{where}: 'answers' must be a list of objects with a 'text'")
                kind = qa.get("question_type")
                if isinstance(kind, bool) or kind not in QUESTION_TYPES:
                    raise ValueError(f"{where}: 'question_type' must be 1, 2 or 3, got {kind!r}")
                impossible = qa.get("is_impossible", False)
                if not isinstance(impossible, bool):
                    raise ValueError(f"{where}: 'is_impossible' must be true or false, got {impossible!r}")
                if impossible and answers:
                    raise ValueError(f"{where}: 'is_impossible' is true but it has answers")


def check_predictions(predictions: Any, path: str) -> None:
    if not isinstance(predictions, dict):
        raise ValueError(f"predictions {path}: expected an object mapping question id to answer text")
    for qid, text in predictions.items():
        if not isinstance(text, str):
            raise ValueError(f"predictions {path}: question {qid}: answer must be a string, got {type(text).__name__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="KLUE-MRC evaluation: exact match and ROUGE-W per question type")
    parser.add_argument("dataset_file", help="KLUE-MRC dataset JSON (with answers and question_type)")
    parser.add_argument("prediction_file", help="predictions JSON: {question id (guid): answer text}")
    args = parser.parse_args(argv)
    try:
        dataset = _load_json(args.dataset_file, "dataset")
        check_dataset(dataset, args.dataset_file)
        predictions = _load_json(args.prediction_file, "predictions")
        check_predictions(predictions, args.prediction_file)
        scores = evaluate(dataset["data"], predictions)
    except ValueError as error:
        print(f"evaluate_klue_mrc.py: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(scores, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

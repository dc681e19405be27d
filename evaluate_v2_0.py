"""The SQuAD 2.0 rules with KorQuAD's character-level EM/F1, as percentages.

Usage: python3 evaluate_v2_0.py DATASET.json PREDICTIONS.json [--na-prob-file NA.json] [--na-prob-thresh 1.0]
                                 [--out-file EVAL.json]

The official evaluate-v2.0.py's flags and short forms work: `-n`, `-t`, `-o` (writes the JSON line printed
to that file too); `--out-image-dir/-p` (precision-recall plots) and `--verbose/-v` are accepted and ignored,
with a note.

Question ids are `id`, or KLUE-MRC's `guid` where there is no `id`.

Prints one JSON line with the official SQuAD 2.0 script's keys: `exact`, `f1`, `total`,
`HasAns_exact/f1/total`, `NoAns_exact/f1/total` (each group only when the file has such questions)
and, with --na-prob-file, `best_exact`, `best_exact_thresh`, `best_f1`, `best_f1_thresh`.

A question is unanswerable when `is_impossible` is true or its `answers` list is empty; its only
gold answer is "", so an empty prediction scores 1 exactly there. Answers are compared as KorQuAD
v1.0 does (quote/bracket marks to spaces, lower case, ASCII punctuation dropped; F1 over characters,
spaces left out). Stands alone (standard library only), like evaluate_v1_0.py.

The best thresholds follow the official definition: questions are taken in ascending order of
their no-answer probability, starting from "every prediction empty" (reported as threshold 0.0);
each question's prediction is kept from that point on, and the threshold is the probability at
which the running total last strictly improved.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import string
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

# Quote and bracket marks become spaces before punctuation is dropped, as in KorQuAD v1.0's metric.
_SPACED_MARKS = re.compile("['\"《》<>〈〉()‘’]")
_ASCII_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """KorQuAD v1.0's normalisation: marks to spaces, lower-case, no ASCII punctuation, single spaces."""
    text = _SPACED_MARKS.sub(" ", text).lower()
    text = "".join(ch for ch in text if ch not in _ASCII_PUNCTUATION)
    return " ".join(text.split())


def exact_score(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def f1_score(prediction: str, truth: str) -> float:
    """Character F1 of the normalised answers (spaces left out); 1 when both are empty, 0 when one is."""
    prediction_chars = normalize_answer(prediction).replace(" ", "")
    truth_chars = normalize_answer(truth).replace(" ", "")
    if not prediction_chars or not truth_chars:
        return float(prediction_chars == truth_chars)
    num_same = sum((Counter(prediction_chars) & Counter(truth_chars)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_chars)
    recall = num_same / len(truth_chars)
    return 2 * precision * recall / (precision + recall)


def question_id(qa: Mapping[str, Any]) -> str:
    """`id`, or KLUE-MRC's `guid` where there is no `id`."""
    return qa["id"] if "id" in qa else qa["guid"]


def is_unanswerable(qa: Mapping[str, Any]) -> bool:
    return qa.get("is_impossible") is True or not qa["answers"]


def gold_answers(qa: Mapping[str, Any]) -> list[str]:
    """The texts a prediction is scored against: [""] for an unanswerable question."""
    if is_unanswerable(qa):
        return [""]
    texts = [answer["text"] for answer in qa["answers"] if normalize_answer(answer["text"])]
    return texts or [""]


def raw_scores(articles: list[dict[str, Any]], predictions: Mapping[str, str]
               ) -> tuple[dict[str, float], dict[str, float], dict[str, bool]]:
    """Per question: exact and F1 before any threshold, and whether it has an answer.

    A question without a prediction scores 0 (reported on stderr)."""
    exact: dict[str, float] = {}
    f1: dict[str, float] = {}
    has_answer: dict[str, bool] = {}
    for article in articles:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = question_id(qa)
                has_answer[qid] = not is_unanswerable(qa)
                if qid not in predictions:
                    print(f"Missing prediction for {qid}: scored 0.", file=sys.stderr)
                    exact[qid] = f1[qid] = 0.0
                    continue
                truths = gold_answers(qa)
                exact[qid] = max(exact_score(predictions[qid], truth) for truth in truths)
                f1[qid] = max(f1_score(predictions[qid], truth) for truth in truths)
    return exact, f1, has_answer


def apply_threshold(scores: Mapping[str, float], has_answer: Mapping[str, bool], na_probs: Mapping[str, float],
                    threshold: float) -> dict[str, float]:
    """Scores after predicting "" wherever the no-answer probability exceeds `threshold`."""
    return {qid: float(not has_answer[qid]) if na_probs.get(qid, 0.0) > threshold else score
            for qid, score in scores.items()}


def _averages(exact: Mapping[str, float], f1: Mapping[str, float], question_ids: list[str]) -> tuple[float, float]:
    total = len(question_ids)
    return (100.0 * sum(exact[q] for q in question_ids) / total, 100.0 * sum(f1[q] for q in question_ids) / total)


def best_threshold(scores: Mapping[str, float], has_answer: Mapping[str, bool],
                   na_probs: Mapping[str, float]) -> tuple[float, float]:
    """The best score (percentage) over no-answer thresholds and the threshold reaching it.

    Start with every prediction empty (unanswerable questions score 1, the others 0, threshold
    0.0 as the official script has it, below any probability; for no-answer odds, which can be
    negative, the float just below the least); then keep the predictions one question at a time
    in ascending order of no-answer probability: keeping one changes the total by its raw score
    minus what "" would have scored. A strictly better total records that question's probability
    as the threshold.
    """
    running = best = float(sum(not answerable for answerable in has_answer.values()))
    lowest = min((na_probs[qid] for qid in scores if qid in na_probs), default=0.0)
    best_thresh = 0.0 if lowest >= 0 else math.nextafter(lowest, -math.inf)
    for qid in sorted(na_probs, key=na_probs.__getitem__):
        if qid not in scores:
            continue
        running += scores[qid] - float(not has_answer[qid])
        if running > best:
            best, best_thresh = running, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def evaluate(dataset: list[dict[str, Any]] | Mapping[str, Any], predictions: Mapping[str, str],
             na_probs: Mapping[str, float] | None = None, na_prob_thresh: float = 1.0) -> dict[str, float]:
    """The official SQuAD 2.0 evaluation dict for `predictions` ({question id: text}).

    `dataset` is the file's `data` list or the whole file's object. With `na_probs` ({question id:
    no-answer probability}, any scale where higher means "more likely no answer"), predictions
    whose probability exceeds `na_prob_thresh` count as "", and the best thresholds are added.
    """
    articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
    exact_raw, f1_raw, has_answer = raw_scores(articles, predictions)
    if not has_answer:
        raise ValueError("dataset has no questions to score")
    probabilities = na_probs or {}
    exact = apply_threshold(exact_raw, has_answer, probabilities, na_prob_thresh)
    f1 = apply_threshold(f1_raw, has_answer, probabilities, na_prob_thresh)
    all_ids = list(has_answer)
    result: dict[str, float] = {}
    result["exact"], result["f1"] = _averages(exact, f1, all_ids)
    result["total"] = len(all_ids)
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        group = [qid for qid in all_ids if has_answer[qid] is wanted]
        if group:
            result[f"{prefix}_exact"], result[f"{prefix}_f1"] = _averages(exact, f1, group)
            result[f"{prefix}_total"] = len(group)
    if na_probs is not None:
        result["best_exact"], result["best_exact_thresh"] = best_threshold(exact_raw, has_answer, na_probs)
        result["best_f1"], result["best_f1_thresh"] = best_threshold(f1_raw, has_answer, na_probs)
    return result


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
                if not isinstance(qa, dict) or not isinstance(qa.get("id", qa.get("guid")), str):
                    raise ValueError(f"dataset {path}: article {article_index}: a question lacks a string 'id' "
                                     f"(or KLUE-MRC 'guid')")
                where = f"dataset {path}: question {question_id(qa)}"
                answers = qa.get("answers")
                if not isinstance(answers, list) or not all(
                        isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers):
                    raise ValueError(f"{where}: 'answers' must be a list of objects with a 'text'")
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
            raise ValueError(f"predictions {path}: question {qid}: answer must be a string, "
                             f"got {type(text).__name__}")


def _check_na_probs(na_probs: Any, path: str) -> None:
    if not isinstance(na_probs, dict):
        raise ValueError(f"--na-prob-file {path}: expected an object mapping question id to a number")
    for qid, value in na_probs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"--na-prob-file {path}: question {qid}: expected a number, got {value!r}")


def _threshold(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if math.isnan(number):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SQuAD 2.0-style evaluation with KorQuAD's character F1")
    parser.add_argument("dataset_file", help="dataset JSON (SQuAD 2.0 / KLUE-MRC style, with answers)")
    parser.add_argument("prediction_file", help="predictions JSON: {question id: answer text, '' for no answer}")
    parser.add_argument("--na-prob-file", "-n", default=None,
                        help="JSON {question id: no-answer probability or score} (e.g. null_odds.json)")
    parser.add_argument("--na-prob-thresh", "-t", type=_threshold, default=1.0,
                        help="predict '' where the no-answer probability exceeds this (default: 1.0)")
    parser.add_argument("--out-file", "-o", default=None, help="also write the scores' JSON to this file")
    parser.add_argument("--out-image-dir", "-p", default=None,
                        help="accepted for the official script's command lines; no plots are drawn here")
    parser.add_argument("--verbose", "-v", action="store_true", help="accepted for the official script's command "
                                                                     "lines; changes nothing")
    args = parser.parse_args(argv)
    for flag, given, why in (("--out-image-dir", args.out_image_dir is not None, "no precision-recall plots here"),
                             ("--verbose", args.verbose, "it changes nothing here")):
        if given:
            print(f"evaluate_v2_0.py: note: {flag} is ignored ({why})", file=sys.stderr)
    try:
        if args.out_file is not None:
            _check_out_file(args.out_file, [args.dataset_file, args.prediction_file, args.na_prob_file])
        dataset = _load_json(args.dataset_file, "dataset")
        check_dataset(dataset, args.dataset_file)
        predictions = _load_json(args.prediction_file, "predictions")
        check_predictions(predictions, args.prediction_file)
        na_probs = None
        if args.na_prob_file is not None:
            na_probs = _load_json(args.na_prob_file, "--na-prob-file")
            _check_na_probs(na_probs, args.na_prob_file)
        scores = evaluate(dataset["data"], predictions, na_probs, args.na_prob_thresh)
        if args.out_file is not None:
            _write_scores(scores, args.out_file)
    except ValueError as error:
        print(f"evaluate_v2_0.py: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(scores))
    return 0


def _check_out_file(path: str, inputs: list[str | None]) -> None:
    """Refuse an --out-file that is one of the inputs (the scores would replace it)."""
    for given in inputs:
        if given is not None and os.path.exists(path) and os.path.exists(given) and os.path.samefile(path, given):
            raise ValueError(f"--out-file {path} is the input {given}; the scores would replace it")


def _write_scores(scores: Mapping[str, Any], path: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as file:
            file.write(json.dumps(scores) + "\n")
    except OSError as error:
        raise ValueError(f"--out-file {path}: cannot write: {error.strerror or error}") from None


if __name__ == "__main__":
    sys.exit(main())

"""evaluate_v2_0.py (SQuAD 2.0 rules, KorQuAD character F1) and evaluate_klue_mrc.py (KLUE EM / ROUGE-W):
hand-computed cases, an independent reference for ROUGE-W, and the command lines."""
from __future__ import annotations

import json
import random

import pytest

import evaluate_klue_mrc
import evaluate_v2_0
from conftest import run_script


def _squad2(*questions: tuple[str, list[str], bool]) -> dict:
    qas = [{"id": qid, "question": "?", "is_impossible": impossible,
            "answers": [{"text": text, "answer_start": 0} for text in answers]}
           for qid, answers, impossible in questions]
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}


# Five questions worked by hand (see each test):
#   q1 answerable 세종대왕, predicted exactly                  exact 1, f1 1,   no-answer prob 0.1
#   q2 answerable 서울특별시, predicted 서울                   exact 0, f1 4/7, prob 0.6  (P 1, R 2/5)
#   q3 unanswerable, predicted ""                             exact 1, f1 1,   prob 0.9
#   q4 unanswerable, predicted 부산                           exact 0, f1 0,   prob 0.7
#   q5 answerable 1443년, predicted ""                        exact 0, f1 0,   prob 0.8
DATASET = _squad2(("q1", ["세종대왕"], False), ("q2", ["서울특별시"], False), ("q3", [], True),
                  ("q4", [], False), ("q5", ["1443년"], False))
PREDICTIONS = {"q1": "세종대왕", "q2": "서울", "q3": "", "q4": "부산", "q5": ""}
NA_PROBS = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.7, "q5": 0.8}
F1_Q2 = 2 * 1.0 * 0.4 / 1.4


def test_squad2_structure_without_probabilities():
    scores = evaluate_v2_0.evaluate(DATASET, PREDICTIONS)
    assert list(scores) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total",
                            "NoAns_exact", "NoAns_f1", "NoAns_total"]
    assert scores["exact"] == pytest.approx(100 * 2 / 5)
    assert scores["f1"] == pytest.approx(100 * (2 + F1_Q2) / 5)
    assert scores["total"] == 5
    assert scores["HasAns_exact"] == pytest.approx(100 / 3)
    assert scores["HasAns_f1"] == pytest.approx(100 * (1 + F1_Q2) / 3)
    assert (scores["HasAns_total"], scores["NoAns_total"]) == (3, 2)
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == 50.0


def test_squad2_best_thresholds():
    scores = evaluate_v2_0.evaluate(DATASET, PREDICTIONS, NA_PROBS)
    # All empty: the two unanswerable questions score 1 (2/5). In ascending probability, keeping q1 (0.1):
    # +1 -> 3; q2 (0.6): exact +0, f1 +4/7 -> f1 3.571; q4 (0.7): -1; q5 (0.8): +0; q3 (0.9): 1 - 1 = 0.
    assert scores["best_exact"] == pytest.approx(60.0) and scores["best_exact_thresh"] == 0.1
    assert scores["best_f1"] == pytest.approx(100 * (3 + F1_Q2) / 5) and scores["best_f1_thresh"] == 0.6
    # The plain figures are those at --na-prob-thresh 1.0 (no probability exceeds it).
    assert scores["exact"] == pytest.approx(40.0)


def test_squad2_best_threshold_of_all_empty_predictions_with_negative_odds_applies_as_it_scores():
    # null_odds.json values can be negative: answering "" everywhere (the best here) needs a threshold below
    # every one of them, not the official script's 0.0.
    odds = {"q1": 0.5, "q2": 0.3, "q3": -0.2, "q4": -0.1, "q5": 0.2}   # q3, q4 unanswerable, kept first: worse
    scores = evaluate_v2_0.evaluate(DATASET, {**PREDICTIONS, "q1": "틀린 답"}, odds)
    threshold = scores["best_f1_thresh"]
    assert threshold < -0.2
    again = evaluate_v2_0.evaluate(DATASET, {**PREDICTIONS, "q1": "틀린 답"}, odds, na_prob_thresh=threshold)
    assert again["f1"] == pytest.approx(scores["best_f1"]) and again["exact"] == pytest.approx(40.0)


def test_squad2_na_prob_thresh_applies():
    # Above 0.5: q2, q5 (answerable -> 0) and q4, q3 (unanswerable -> 1) become "".
    scores = evaluate_v2_0.evaluate(DATASET, PREDICTIONS, NA_PROBS, na_prob_thresh=0.5)
    assert scores["exact"] == scores["f1"] == pytest.approx(60.0)
    assert scores["NoAns_exact"] == 100.0 and scores["HasAns_exact"] == pytest.approx(100 / 3)


def test_squad2_rules_for_empty_answers():
    # An empty prediction scores 1 exactly when the gold is unanswerable; an empty answer list is unanswerable.
    assert evaluate_v2_0.f1_score("", "") == 1.0 and evaluate_v2_0.f1_score("", "서울") == 0.0
    assert evaluate_v2_0.f1_score("서울", "") == 0.0
    scores = evaluate_v2_0.evaluate(_squad2(("a", [], False), ("b", ["《가》"], False)), {"a": "", "b": "가"})
    assert scores["NoAns_total"] == 1 and scores["exact"] == 100.0  # KorQuAD normalisation: 《가》 == 가
    # Without unanswerable questions the figures are KorQuAD v1.0's.
    import evaluate_v1_0
    dataset = _squad2(("x", ["서울특별시"], False), ("y", ["부산"], False))
    predictions = {"x": "서울시", "y": "부산"}
    v1 = evaluate_v1_0.evaluate(dataset, predictions)
    v2 = evaluate_v2_0.evaluate(dataset, predictions)
    assert (v2["exact"], v2["f1"]) == (v1["exact_match"], v1["f1"]) and "NoAns_total" not in v2


def test_evaluate_v2_cli(tmp_path):
    data, preds, na = tmp_path / "data.json", tmp_path / "pred.json", tmp_path / "na.json"
    data.write_text(json.dumps(DATASET, ensure_ascii=False), encoding="utf-8")
    preds.write_text(json.dumps(PREDICTIONS, ensure_ascii=False), encoding="utf-8")
    na.write_text(json.dumps(NA_PROBS))
    result = run_script("evaluate_v2_0.py", str(data), str(preds), "--na-prob-file", str(na))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == evaluate_v2_0.evaluate(DATASET, PREDICTIONS, NA_PROBS)
    result = run_script("evaluate_v2_0.py", str(data), str(preds), "--na-prob-thresh", "0.5", "-n", str(na))
    assert json.loads(result.stdout)["exact"] == pytest.approx(60.0)


@pytest.mark.parametrize("change, expected", [
    (lambda qa: qa.update(is_impossible=True, answers=[{"text": "x", "answer_start": 0}]),
     "question q1: 'is_impossible' is true but it has answers"),
    (lambda qa: qa.update(is_impossible="yes"), "question q1: 'is_impossible' must be true or false"),
])
def test_evaluate_v2_cli_bad_dataset(tmp_path, change, expected):
    dataset = json.loads(json.dumps(DATASET))
    change(dataset["data"][0]["paragraphs"][0]["qas"][0])
    data, preds = tmp_path / "data.json", tmp_path / "pred.json"
    data.write_text(json.dumps(dataset), encoding="utf-8")
    preds.write_text(json.dumps(PREDICTIONS), encoding="utf-8")
    for script in ("evaluate_v2_0.py", "evaluate_klue_mrc.py"):
        if script == "evaluate_klue_mrc.py":
            for qa in dataset["data"][0]["paragraphs"][0]["qas"]:
                qa["question_type"] = 1
            data.write_text(json.dumps(dataset), encoding="utf-8")
        result = run_script(script, str(data), str(preds))
        assert result.returncode == 1 and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    result = run_script("evaluate_v2_0.py", str(data), str(preds), "--na-prob-thresh", "nan")
    assert result.returncode == 2 and "--na-prob-thresh" in result.stderr


# --- KLUE-MRC ---------------------------------------------------------------------------------

def _reference_lcs_run(a: str, b: str) -> int:
    """Longest common substring by the textbook dynamic programme (independent of difflib)."""
    best = 0
    previous = [0] * (len(b) + 1)
    for i in range(1, len(a) + 1):
        current = [0] * (len(b) + 1)
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def _reference_normalize(text: str) -> str:
    # KLUE's published normalisation as it behaves: lower case, ASCII punctuation out, whitespace
    # collapsed (its quote-mark pattern needs a mark followed by "()‘’", which never occurs in these cases).
    import string
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(text.split())


def _reference_klue(questions: list[dict], predictions: dict[str, str]) -> dict:
    """The KLUE baseline's figures by its published definition, computed the plain way."""
    per_type = {1: [], 2: [], 3: []}
    for qa in questions:
        prediction = _reference_normalize(predictions[qa["guid"]])
        golds = [_reference_normalize(a["text"]) for a in qa["answers"]] or [""]
        ems, rouges = [0.0], [0.0]
        for gold in golds:
            ems.append(1.0 if prediction == gold else 0.0)
            if gold == "":
                rouges.append(1.0 if prediction == "" else 0.0)
                continue
            run = _reference_lcs_run(prediction, gold)
            p = run / len(prediction) if prediction else 0.0
            r = run / len(gold)
            rouges.append(0.0 if p + r == 0 else 2 * p * r / (p + r))
        per_type[qa["question_type"]].append((max(ems), max(rouges)))
    every = [s for scores in per_type.values() for s in scores]
    out = {"exact_match": 100 * sum(e for e, _ in every) / len(every),
           "rouge_w": 100 * sum(r for _, r in every) / len(every)}
    for kind, scores in per_type.items():
        out[f"type{kind}"] = {"exact_match": 100 * sum(e for e, _ in scores) / len(scores),
                              "rouge_w": 100 * sum(r for _, r in scores) / len(scores), "total": len(scores)}
    return out


def _klue_file(questions: list[dict]) -> dict:
    return {"version": "1.1", "data": [{"title": "t", "news_category": None, "source": "wikipedia",
                                        "paragraphs": [{"context": "c", "qas": questions}]}]}


def test_klue_hand_computed():
    assert evaluate_klue_mrc.rouge_w("서울특별시청", "서울특별시") == pytest.approx(10 / 11)  # run 5: P 5/6, R 1
    assert evaluate_klue_mrc.rouge_w("가나다", "나다라마") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert evaluate_klue_mrc.rouge_w("", "") == 1.0 and evaluate_klue_mrc.rouge_w("가", "") == 0.0
    assert evaluate_klue_mrc.rouge_w("", "가") == 0.0 and evaluate_klue_mrc.rouge_w("가다", "나라") == 0.0
    # Consecutive characters only: 가나다 vs 가x나x다 shares runs of one (an LCS subsequence would be 3).
    assert evaluate_klue_mrc.rouge_w("가나다", "가x나x다") == pytest.approx(2 * (1 / 3) * (1 / 5) / (1 / 3 + 1 / 5))
    # KLUE keeps 《》 (its pattern never fires), so unlike KorQuAD these differ.
    assert evaluate_klue_mrc.normalize_answer("《세종》 (대왕)") == "《세종》 대왕"
    questions = [
        {"guid": "a", "question": "?", "question_type": 1, "is_impossible": False,
         "answers": [{"text": "세종대왕", "answer_start": 0}, {"text": "세종", "answer_start": 0}],
         "plausible_answers": []},
        {"guid": "b", "question": "?", "question_type": 2, "is_impossible": False,
         "answers": [{"text": "세종", "answer_start": 0}], "plausible_answers": []},
        {"guid": "c", "question": "?", "question_type": 3, "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "한글", "answer_start": 0}]},
        {"guid": "d", "question": "?", "question_type": 3, "is_impossible": True, "answers": [],
         "plausible_answers": [{"text": "한글", "answer_start": 0}]},
    ]
    predictions = {"a": "세종", "b": "《세종》", "c": "", "d": "한글"}
    scores = evaluate_klue_mrc.evaluate(_klue_file(questions), predictions)
    # a: EM 1, ROUGE 1; b: EM 0, ROUGE run 2 of 4 -> 2/3; c: 1, 1; d (plausible answers never count): 0, 0.
    assert scores["type1"] == {"exact_match": 100.0, "rouge_w": 100.0, "total": 1}
    assert scores["type2"] == {"exact_match": 0.0, "rouge_w": pytest.approx(200 / 3), "total": 1}
    assert scores["type3"] == {"exact_match": 50.0, "rouge_w": 50.0, "total": 2}
    assert scores["exact_match"] == 50.0 and scores["rouge_w"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 4)
    # The SQuAD 2.0 scorer reads KLUE's guid ids too: a and c right, b 《세종》 == 세종 under KorQuAD's rules.
    squad2 = evaluate_v2_0.evaluate(_klue_file(questions), predictions)
    assert (squad2["HasAns_exact"], squad2["NoAns_exact"], squad2["NoAns_total"]) == (100.0, 50.0, 2)


def test_klue_equals_reference_on_random_predictions(tmp_path):
    rng = random.Random(3)
    alphabet = "가나다라마바사 아자차,.!"
    questions, predictions = [], {}
    for number in range(300):
        kind = rng.choice((1, 2, 3))
        answers = [] if kind == 3 else [
            {"text": "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))), "answer_start": 0}
            for _ in range(rng.randint(1, 3))]
        guid = f"klue-mrc-v1_dev_{number:05d}"
        questions.append({"guid": guid, "question": "?", "question_type": kind, "is_impossible": kind == 3,
                          "answers": answers, "plausible_answers": []})
        source = rng.random()
        predictions[guid] = ("" if source < 0.2 else answers[0]["text"] if answers and source < 0.4 else
                             "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 15))))
    expected = _reference_klue(questions, predictions)
    data, preds = tmp_path / "klue.json", tmp_path / "pred.json"
    data.write_text(json.dumps(_klue_file(questions), ensure_ascii=False), encoding="utf-8")
    preds.write_text(json.dumps(predictions, ensure_ascii=False), encoding="utf-8")
    result = run_script("evaluate_klue_mrc.py", str(data), str(preds))
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert list(scores) == ["exact_match", "rouge_w", "type1", "type2", "type3"]
    for key in ("exact_match", "rouge_w"):
        assert abs(scores[key] - expected[key]) < 1e-9
        for kind in ("type1", "type2", "type3"):
            assert abs(scores[kind][key] - expected[kind][key]) < 1e-9
            assert scores[kind]["total"] == expected[kind]["total"]
    assert 0 < scores["rouge_w"] < 100 and scores["type3"]["total"] > 50


def test_klue_lower_cases_latin_letters_as_klue_does():
    """KLUE's normalisation lower-cases: an answer differing from the gold only in Latin case matches exactly."""
    questions = [{"guid": "a", "question": "?", "question_type": 1, "is_impossible": False,
                  "answers": [{"text": "BERT", "answer_start": 0}], "plausible_answers": []},
                 {"guid": "b", "question": "?", "question_type": 2, "is_impossible": False,
                  "answers": [{"text": "KorQuAD 데이터", "answer_start": 0}], "plausible_answers": []}]
    scores = evaluate_klue_mrc.evaluate(_klue_file(questions), {"a": "bert", "b": "korquad 데이터"})
    assert (scores["exact_match"], scores["rouge_w"]) == (100.0, 100.0)


def test_evaluate_v2_cli_takes_the_official_scripts_flags(tmp_path):
    """Command lines written for the official evaluate-v2.0.py: -o writes the scores' JSON there, -n/-t as
    before, -p (plots) and -v are accepted and ignored with a note."""
    data, preds, na = tmp_path / "data.json", tmp_path / "pred.json", tmp_path / "na.json"
    data.write_text(json.dumps(DATASET, ensure_ascii=False), encoding="utf-8")
    preds.write_text(json.dumps(PREDICTIONS, ensure_ascii=False), encoding="utf-8")
    na.write_text(json.dumps(NA_PROBS))
    out = tmp_path / "eval.json"
    result = run_script("evaluate_v2_0.py", str(data), str(preds), "-o", str(out), "-n", str(na), "-t", "0.5",
                        "-p", str(tmp_path / "plots"), "-v")
    assert result.returncode == 0, result.stderr
    expected = evaluate_v2_0.evaluate(DATASET, PREDICTIONS, NA_PROBS, 0.5)
    assert json.loads(out.read_text(encoding="utf-8")) == json.loads(result.stdout) == expected
    assert result.stderr.splitlines() == [
        "evaluate_v2_0.py: note: --out-image-dir is ignored (no precision-recall plots here)",
        "evaluate_v2_0.py: note: --verbose is ignored (it changes nothing here)"]
    assert not (tmp_path / "plots").exists()
    refused = run_script("evaluate_v2_0.py", str(data), str(preds), "--out-file", str(tmp_path / "no" / "e.json"))
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"evaluate_v2_0.py: error: --out-file {tmp_path / 'no' / 'e.json'}: cannot write: No such file or directory"]
    over_input = run_script("evaluate_v2_0.py", str(data), str(preds), "-o", str(preds))
    assert over_input.returncode == 1 and over_input.stderr.strip() == (
        f"evaluate_v2_0.py: error: --out-file {preds} is the input {preds}; the scores would replace it")
    assert json.loads(preds.read_text(encoding="utf-8")) == PREDICTIONS

"""The official KorQuAD v1.0 metric: hand-computed cases and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluate_v1_0 import evaluate, exact_match_score, f1_score, normalize_answer

SCRIPT = Path(__file__).resolve().parent.parent / "evaluate_v1_0.py"


@pytest.mark.parametrize("text, normalized", [
    ('《서울》 "대한민국"의 (수도)', "서울 대한민국 의 수도"),
    ("‘한강’ 〈기적〉 <KorQuAD>", "한강 기적 korquad"),
    ("a(b)c", "a b c"),            # brackets become spaces ...
    ("a<b>c", "a b c"),            # ... angle brackets too (at a word's edge they hide: see <KorQuAD> above)
    ("a《b》c〈d〉e‘f’g\"h\"i'j", "a b c d e f g h i j"),
    ("a-b.c!", "abc"),             # ... other ASCII punctuation just goes
    ("  1,000  원 ", "1000 원"),
    ("「가」·나", "「가」·나"),        # non-ASCII punctuation outside the list stays
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_after_normalisation():
    assert exact_match_score("《KorQuAD》", "korquad")
    assert exact_match_score("a-b", "ab")
    assert not exact_match_score("a(b", "ab")     # "a b" is not "ab"
    assert not exact_match_score("서울 시", "서울시")


def test_f1_is_over_characters_without_spaces():
    # 서울특별시 vs 서울시: 3 shared characters; precision 3/5, recall 3/3.
    assert f1_score("서울특별시", "서울시") == pytest.approx(2 * 0.6 * 1.0 / 1.6)
    assert f1_score("서울 시", "서울시") == 1.0
    # Character multisets: one shared 아 out of three predicted.
    assert f1_score("아아아", "아") == pytest.approx(0.5)
    assert f1_score("부산", "서울") == 0
    assert f1_score("(  )", "서울") == 0


def _dataset(*questions: tuple[str, list[str]]) -> list[dict]:
    qas = [{"id": qid, "question": "?", "answers": [{"text": t, "answer_start": 0} for t in answers]}
           for qid, answers in questions]
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]


def test_evaluate_takes_best_gold_and_scores_missing_as_zero(capsys):
    dataset = _dataset(("q1", ["서울특별시", "서울"]),   # prediction matches the second gold exactly
                       ("q2", ["서울시"]),               # partial: F1 0.75, EM 0
                       ("q3", ["부산"]),                 # no prediction
                       ("q4", ["대전"]))                 # wrong
    predictions = {"q1": "서울", "q2": "서울특별시", "q4": "광주"}
    scores = evaluate(dataset, predictions)
    assert scores == {"exact_match": 100.0 * 1 / 4, "f1": 100.0 * (1.0 + 0.75) / 4}
    assert "q3" in capsys.readouterr().err
    # The whole file's object works as well as its `data` list.
    assert evaluate({"version": "KorQuAD_v1.0_dev", "data": dataset}, predictions) == scores


def _run_cli(tmp_path, dataset: dict, predictions: dict | str) -> subprocess.CompletedProcess:
    dataset_file = tmp_path / "dataset.json"
    prediction_file = tmp_path / "predictions.json"
    dataset_file.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    prediction_file.write_text(predictions if isinstance(predictions, str) else json.dumps(predictions),
                               encoding="utf-8")
    return subprocess.run([sys.executable, str(SCRIPT), str(dataset_file), str(prediction_file)],
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_scores_and_notes_only_a_foreign_version(tmp_path):
    data = _dataset(("q1", ["서울"]), ("q2", ["부산"]))
    result = _run_cli(tmp_path, {"version": "KorQuAD_v1.0_dev", "data": data}, {"q1": "서울", "q2": "부산항"})
    assert result.returncode == 0
    assert json.loads(result.stdout) == {"exact_match": 50.0, "f1": 100.0 * (1.0 + 2 * (2 / 3) * 1.0 / (2 / 3 + 1)) / 2}
    assert result.stderr == ""
    result = _run_cli(tmp_path, {"version": "1.1", "data": data}, {"q1": "서울", "q2": "부산"})
    assert json.loads(result.stdout) == {"exact_match": 100.0, "f1": 100.0}
    assert "KorQuAD_v1.0" in result.stderr and "'1.1'" in result.stderr


@pytest.mark.parametrize("dataset, predictions, message", [
    ({"version": "KorQuAD_v1.0", "data": _dataset(("q1", ["서울"]))}, "{not json", "predictions"),
    ({"version": "KorQuAD_v1.0", "data": _dataset(("q1", ["서울"]))}, {"q1": 3}, "question q1"),
    ({"version": "KorQuAD_v1.0"}, {}, "'data'"),
    ({"version": "KorQuAD_v1.0", "data": _dataset(("q1", []))}, {}, "no question with answers"),
    ({"version": "KorQuAD_v1.0", "data": _dataset(("q1", [7]))}, {}, "question q1"),
])
def test_cli_bad_input_is_one_line(tmp_path, dataset, predictions, message):
    result = _run_cli(tmp_path, dataset, predictions)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_gold_answers_score_100_on_the_dev_set(dev_file):
    with open(dev_file, encoding="utf-8") as file:
        dataset = json.load(file)
    gold = {qa["id"]: qa["answers"][0]["text"]
            for article in dataset["data"] for paragraph in article["paragraphs"] for qa in paragraph["qas"]}
    assert len(gold) == 5774
    assert evaluate(dataset["data"], gold) == {"exact_match": 100.0, "f1": 100.0}
    # What the official rules forgive keeps 100; one character more or less does not.
    dressed = {qid: f" 《{text}》. " for qid, text in gold.items()}
    assert evaluate(dataset["data"], dressed) == {"exact_match": 100.0, "f1": 100.0}
    longer = evaluate(dataset["data"], {qid: text + "는" for qid, text in gold.items()})
    assert longer["exact_match"] < 1.0 and 80.0 < longer["f1"] < 100.0


def test_near_misses_lose_exact_match_and_part_of_f1():
    # One character more: precision 5/6, recall 1.
    assert not exact_match_score("서울특별시청", "서울특별시")
    assert f1_score("서울특별시청", "서울특별시") == pytest.approx(2 * (5 / 6) / (5 / 6 + 1))
    # One character less: precision 1, recall 4/5.
    assert f1_score("서울특별", "서울특별시") == pytest.approx(2 * 0.8 / 1.8)


def test_official_normalisation_of_whitespace_quotes_and_punctuation():
    assert exact_match_score("  서울 \t특별시\n", "서울 특별시")    # runs of whitespace are one space
    assert exact_match_score("\"서울\"", "서울") and exact_match_score("《서울》", "서울")
    assert exact_match_score("1,000원.", "1000원") and exact_match_score("KorQuAD", "korquad")
    assert not exact_match_score("서울특별시", "서울 특별시")          # EM keeps the space ...
    assert f1_score("서울특별시", "서울 특별시") == 1.0                # ... F1 does not
    assert not exact_match_score("서울·부산", "서울부산")              # non-ASCII punctuation stays


def test_several_gold_answers_each_metric_takes_its_best():
    dataset = _dataset(("q", ["서울특별시 중구", "중구청", "시청"]))
    # "중구": EM 0 against all; F1 2/7 recall vs the first (0.444), 2/3 vs the second (0.8), 0 vs the third.
    assert evaluate(dataset, {"q": "중구"}) == {"exact_match": 0.0, "f1": pytest.approx(80.0)}
    # "시청" is exact for the last gold only; F1 is then 100 too, not an average over the golds.
    assert evaluate(dataset, {"q": "시청"}) == {"exact_match": 100.0, "f1": 100.0}


def test_a_dataset_written_in_nfd_scores_as_the_same_text_composed(tmp_path):
    """The metric counts characters: eval.py scores in NFC, so decomposed Hangul (answers cut from an NFD context)
    gets the clean text's EM/F1 rather than one over jamo."""
    import unicodedata

    from scoring import score

    dataset = {"version": "KorQuAD_v1.0", "data": [{"title": "t", "paragraphs": [{
        "context": "훈민정음은 1443년 세종대왕이 창제하였다.", "qas": [
            {"id": "a", "question": "언제?", "answers": [{"text": "1443년", "answer_start": 6}]},
            {"id": "b", "question": "누가?", "answers": [{"text": "세종대왕이", "answer_start": 12}]}]}]}]}
    predictions = {"a": "1443년 세종대왕이", "b": "세종대왕"}   # over jamo, F1 53.8 and 90.9 instead of 66.7 and 88.9
    clean, decomposed = tmp_path / "clean.json", tmp_path / "nfd.json"
    clean.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    decomposed.write_text(unicodedata.normalize("NFD", json.dumps(dataset, ensure_ascii=False)), encoding="utf-8")
    expected = score(clean, predictions)
    assert 50 < expected["f1"] < 100
    assert score(decomposed, {k: unicodedata.normalize("NFD", v) for k, v in predictions.items()}) == expected


def test_eval_py_without_checkpoint_evaluates_output_korquad_3_bin_as_the_baseline_does(tiny_setup, tmp_path):
    """The baseline's `python eval.py` after `python train.py` (both with their defaults) evaluates
    output/korquad_3.bin; a --checkpoint given replaces that default, it does not join it in an ensemble."""
    import importlib

    import torch

    from conftest import DATA_FLAGS, ROOT, TINY_CONFIG
    from modeling import Config, QuestionAnswering

    parse_args = importlib.import_module("eval").parse_args
    assert parse_args([]).checkpoint == ["output/korquad_3.bin"]
    assert parse_args(["--checkpoint=run1"]).checkpoint == ["run1"]
    assert parse_args(["--checkpoint", "a", "b", "--checkpoint", "c"]).checkpoint == ["a", "b", "c"]

    def eval_py(*flags: str) -> subprocess.CompletedProcess:   # run where a user would: output/ is relative
        return subprocess.run([sys.executable, str(ROOT / "eval.py"), *flags], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    flags = (f"--predict_file={tiny_setup / 'train.json'}", f"--model_config={tiny_setup / 'tiny.json'}",
             f"--vocab_file={ROOT / 'data' / 'ko_vocab_32k.txt'}", *DATA_FLAGS, "--no_cuda", "--quiet")
    missing = eval_py(*flags)
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert missing.returncode != 0 and lines == ["eval.py: error: --checkpoint output/korquad_3.bin: file not found"]
    (tmp_path / "output").mkdir()
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), tmp_path / "output" / "korquad_3.bin")
    evaluated = eval_py(*flags)
    assert evaluated.returncode == 0, evaluated.stderr
    assert set(json.loads(evaluated.stdout.splitlines()[-1])) == {"exact_match", "f1"}
    assert len(json.loads((tmp_path / "debug" / "predictions.json").read_text(encoding="utf-8"))) == 24

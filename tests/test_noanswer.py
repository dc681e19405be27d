"""Unanswerable questions (--version_2_with_negative): reading and validation, [CLS] labels, null decoding,
the version-2 oracle on the real dev set, a tiny model that learns to abstain, and the command lines."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import korquad_utils as ku
from benchmarks.oracles import add_unanswerable, oracle_v2_scores
from conftest import DATA_FLAGS, SAMPLE_FILE, TINY_CONFIG, run_in_process, run_script


def _write(path: Path, dataset: dict) -> Path:
    path.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    return path


def _one_paragraph(*qas: dict, context: str = "세종대왕은 1443년에 훈민정음을 창제하였다.") -> dict:
    return {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": list(qas)}]}]}


ANSWERABLE = {"id": "a", "question": "누가 창제했나?", "is_impossible": False,
              "answers": [{"text": "세종대왕", "answer_start": 0}]}
IMPOSSIBLE = {"id": "b", "question": "누가 만들었나?", "is_impossible": True, "answers": [],
              "plausible_answers": [{"text": "세종대왕", "answer_start": 0}]}
EMPTY = {"id": "c", "question": "언제 죽었나?", "answers": []}


def _mixed_sample(questions_per_article: int = 3, margin: int = 60) -> dict:
    """Questions of four of the sample's articles, each on a short snippet around its answer (one
    window: a quick test), and each also asked, unanswerable, on the next article's first snippet."""
    sample = json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))
    articles = []
    for article in sample["data"][:4]:
        paragraphs = []
        for qa in article["paragraphs"][0]["qas"][:questions_per_article]:
            answer = qa["answers"][0]
            begin = max(0, answer["answer_start"] - margin)
            context = article["paragraphs"][0]["context"][begin:answer["answer_start"] + len(answer["text"]) + margin]
            paragraphs.append({"context": context, "qas": [
                {**qa, "answers": [{"text": answer["text"], "answer_start": answer["answer_start"] - begin}]}]})
        articles.append({"title": article["title"], "paragraphs": paragraphs})
    return add_unanswerable({"version": sample["version"], "data": articles}, every=1)


# --- reading ----------------------------------------------------------------------------------

def test_version_2_reading(tmp_path):
    path = _write(tmp_path / "v2.json", _one_paragraph(ANSWERABLE, IMPOSSIBLE, EMPTY))
    examples = ku.read_squad_examples(path, is_training=True, version_2_with_negative=True)
    assert [(e.qas_id, e.is_impossible, e.start_char) for e in examples] == [
        ("a", False, 0), ("b", True, None), ("c", True, None)]
    assert examples[1].plausible_answers == IMPOSSIBLE["plausible_answers"] and examples[1].answers == []
    # Without the flag: exactly today's reading (the questions without answers are skipped for training).
    plain = ku.read_squad_examples(path, is_training=True)
    assert [(e.qas_id, e.is_impossible) for e in plain] == [("a", False)]


def test_klue_mrc_file_as_published(tmp_path):
    qas = [{"question": "누가?", "answers": [{"text": "세종대왕", "answer_start": 0}], "plausible_answers": [],
            "question_type": 1, "is_impossible": False, "guid": "klue-mrc-v1_train_00001"},
           {"question": "왜?", "answers": [], "plausible_answers": [{"text": "훈민정음", "answer_start": 13}],
            "question_type": 3, "is_impossible": True, "guid": "klue-mrc-v1_train_00002"}]
    dataset = {"version": "1.1", "data": [{"title": "t", "source": "wikipedia", "news_category": None,
                                           "paragraphs": [{"context": "세종대왕은 1443년에 훈민정음을 창제하였다.", "qas": qas}]}]}
    path = _write(tmp_path / "klue-mrc-v1.1_train.json", dataset)
    examples = ku.read_squad_examples(path, is_training=True, version_2_with_negative=True)
    assert [(e.qas_id, e.question_type, e.is_impossible) for e in examples] == [
        ("klue-mrc-v1_train_00001", 1, False), ("klue-mrc-v1_train_00002", 3, True)]
    with pytest.raises(ku.KorquadFormatError, match="missing 'id'.*--version_2_with_negative"):
        ku.read_squad_examples(path, is_training=False)


@pytest.mark.parametrize("qa, message", [
    ({**IMPOSSIBLE, "answers": ANSWERABLE["answers"]}, "question b: 'is_impossible' is true but it has 1 answer"),
    ({**IMPOSSIBLE, "is_impossible": "true"}, "question b: 'is_impossible' must be true or false, got 'true'"),
    ({**IMPOSSIBLE, "is_impossible": 1}, "question b: 'is_impossible' must be true or false, got 1"),
])
def test_bad_unanswerable_fields_name_the_question(tmp_path, qa, message):
    path = _write(tmp_path / "bad.json", _one_paragraph(ANSWERABLE, qa))
    with pytest.raises(ku.KorquadFormatError, match=message):
        ku.read_squad_examples(path, is_training=False, version_2_with_negative=True)


def test_unanswerable_trains_to_cls_in_every_window(tmp_path, vocab_file):
    from tokenization import BertTokenizer
    context = " ".join(f"문장{i}은 여기에 있다." for i in range(40))
    path = _write(tmp_path / "v2.json", _one_paragraph(
        {"id": "a", "question": "무엇?", "answers": [{"text": "문장39은", "answer_start": context.index("문장39은")}]},
        {"id": "b", "question": "무엇?", "answers": [], "is_impossible": True}, context=context))
    examples = ku.read_squad_examples(path, is_training=True, version_2_with_negative=True)
    features = ku.convert_examples_to_features(examples, BertTokenizer(str(vocab_file), analyzer="mecab"),
                                               64, 16, 16, is_training=True, progress=False)
    answerable = [(f.start_position, f.end_position) for f in features if f.example_index == 0]
    impossible = [(f.start_position, f.end_position) for f in features if f.example_index == 1]
    assert len(impossible) == len(answerable) > 3
    assert set(impossible) == {(0, 0)}
    assert answerable[-1] != (0, 0) and answerable[0] == (0, 0)


# --- decoding ---------------------------------------------------------------------------------

def test_null_odds_takes_the_minimum_null_score_over_windows():
    examples = [ku.SquadExample("q1", "?", "ctx", []), ku.SquadExample("q2", "?", "ctx", [])]
    # q1 has two windows with [CLS] scores 3 + 1 and 0.5 + 0.5: its null score is 1.0.
    starts = [np.array([3.0, 0]), np.array([0.5, 0]), np.array([2.0, 0])]
    ends = [np.array([1.0, 0]), np.array([0.5, 0]), np.array([2.0, 0])]
    nbest = {"q1": [{"start_logit": 0.25, "end_logit": 0.5, "start": 0, "end": 1}],
             "q2": [{"start_logit": 0.0, "end_logit": 0.0, "start": None, "end": None}]}
    odds = ku.null_odds(examples, [0, 0, 1], starts, ends, nbest)
    assert odds == {"q1": 1.0 - 0.75, "q2": math.inf}
    assert ku.abstain({"q1": "ctx", "q2": ""}, odds, 0.0) == {"q1": "", "q2": ""}
    assert ku.abstain({"q1": "ctx", "q2": ""}, odds, 0.25) == {"q1": "ctx", "q2": ""}  # "" only past the threshold
    assert ku.no_answer_probability(0.0) == 0.5 and ku.no_answer_probability(-1e6) == 0.0
    assert ku.no_answer_probability(math.inf) == 1.0


def test_version_2_oracle_on_the_dev_set(dev_file, vocab_file):
    """Gold spans and [CLS] as logits on real dev questions with unanswerable ones added: HasAns at the
    piece-boundary ceiling, NoAns 100 (`bench.py --only oracle_v2` runs it on the whole dev set)."""
    from tokenization import BertTokenizer
    dev = json.loads(dev_file.read_text(encoding="utf-8"))
    dataset = add_unanswerable({"version": dev["version"], "data": dev["data"][:6]}, every=3)
    scores = oracle_v2_scores(dataset, BertTokenizer(str(vocab_file), analyzer="mecab"),
                              {"max_seq_length": 512, "doc_stride": 128, "max_query_length": 96})
    assert scores["NoAns_total"] == 52 and scores["HasAns_total"] == 155  # 6 articles, every 3rd question
    assert scores["NoAns_exact"] == scores["NoAns_f1"] == 100.0
    assert scores["HasAns_exact"] >= 99.0 and scores["HasAns_f1"] >= 99.5, scores
    assert scores["best_f1"] >= scores["f1"]


# --- a tiny model learns to abstain ------------------------------------------------------------

@pytest.fixture(scope="module")
def abstaining_run(tiny_setup, tmp_path_factory) -> tuple[Path, Path]:
    import train
    root = tmp_path_factory.mktemp("noans")
    data = _write(root / "mixed.json", _mixed_sample())
    out = root / "run"
    train.main([f"--output_dir={out}", f"--checkpoint={tiny_setup / 'pretrained.bin'}",
                f"--model_config={tiny_setup / 'tiny.json'}", f"--train_file={data}", *DATA_FLAGS,
                "--train_batch_size=8", "--learning_rate=2e-3", "--num_train_epochs=20", "--seed=42", "--no_cuda",
                "--quiet", f"--cache_dir={root / 'cache'}", "--version_2_with_negative", f"--eval_file={data}"])
    return data, out


def test_training_logs_the_tuned_threshold_each_epoch(abstaining_run):
    _, out = abstaining_run
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    evaluations = [record for record in records if "f1" in record]
    assert [record["epoch"] for record in evaluations] == list(range(20))
    assert all(math.isfinite(record["best_f1_thresh"]) and record["best_f1"] >= record["f1"] for record in evaluations)
    # Measured (encoder and --seed both 42: torch 2.13.0 at 1 thread, 2.14.1 at 1 and 2; both 1, 2 and 3: 2.13.0 at
    # 1 thread, and 1: 2.14.1 at 2): NoAns F1 100 and HasAns F1 91.7 to 100 at the last epoch in each (HasAns 0 to 8
    # at the first).
    assert evaluations[-1]["NoAns_f1"] >= 80 and evaluations[-1]["HasAns_f1"] >= 70


def test_trained_model_abstains_and_remembers_the_flag(abstaining_run):
    from predict import Reader
    data, out = abstaining_run
    assert json.loads((out / "training_args.json").read_text())["version_2_with_negative"] is True
    reader = Reader.load(out, max_seq_length=192, max_query_length=32, doc_stride=64, no_cuda=True)
    assert reader.version_2_with_negative  # remembered from the run, not passed
    dataset = json.loads(data.read_text(encoding="utf-8"))
    questions = [(qa, paragraph["context"]) for article in dataset["data"] for paragraph in article["paragraphs"]
                 for qa in paragraph["qas"]]
    answers = reader.answer_all([(qa["question"], context) for qa, context in questions])
    impossible = [a for (qa, _), a in zip(questions, answers) if qa.get("is_impossible")]
    answerable = [(qa, a) for (qa, _), a in zip(questions, answers) if not qa.get("is_impossible")]
    assert len(impossible) == len(answerable) == 12
    # Measured as in the training log's test: 12 of 12 abstain and 11 to 12 of 12 exact in each.
    assert sum(a["answer"] == "" for a in impossible) >= 10, impossible
    assert sum(a["answer"] == qa["answers"][0]["text"] for qa, a in answerable) >= 9, answerable
    assert all(0.0 <= a["no_answer_probability"] <= 1.0 for a in answers)
    assert all((a["answer"] == "") == (a["no_answer_probability"] > 0.5) for a in answers)
    assert all(a["start"] is None and a["end"] is None for a in impossible if a["answer"] == "")


def test_eval_scores_squad2_with_a_tuned_threshold(abstaining_run, tmp_path, capsys):
    import eval as eval_script
    data, out = abstaining_run
    flags = [f"--checkpoint={out}", f"--predict_file={data}", *DATA_FLAGS, "--no_cuda", "--quiet",
             f"--cache_dir={tmp_path / 'cache'}"]
    eval_script.main(flags + [f"--output_dir={tmp_path / 'fixed'}"])
    fixed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(fixed) == ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact",
                           "NoAns_f1", "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"]
    assert fixed["total"] == 24 and fixed["NoAns_exact"] >= 80  # 100 in each run measured for the log's test
    odds = json.loads((tmp_path / "fixed" / "null_odds.json").read_text())
    na_probs = json.loads((tmp_path / "fixed" / "na_probs.json").read_text())
    predictions = json.loads((tmp_path / "fixed" / "predictions.json").read_text(encoding="utf-8"))
    assert set(odds) == set(na_probs) == set(predictions)
    assert all((predictions[q] == "") == (odds[q] > 0) for q in odds)
    # The standalone script agrees on the written files.
    result = run_script("evaluate_v2_0.py", str(data), str(tmp_path / "fixed" / "predictions.json"))
    standalone = json.loads(result.stdout)
    assert standalone["exact"] == fixed["exact"] and standalone["f1"] == fixed["f1"]

    eval_script.main(flags + [f"--output_dir={tmp_path / 'tuned'}", "--null_score_diff_threshold=best_f1"])
    tuned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tuned["f1"] == pytest.approx(fixed["best_f1"]) and tuned["best_f1"] == fixed["best_f1"]
    # A numeric threshold works as before: one that abstains everywhere.
    eval_script.main(flags + [f"--output_dir={tmp_path / 'all'}", "--null_score_diff_threshold=-1e9"])
    everywhere = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert everywhere["NoAns_exact"] == 100.0 and everywhere["HasAns_exact"] == 0.0

    # The same questions as a KLUE-MRC file (guid ids, question types): --metric klue, tuned threshold.
    klue = json.loads(data.read_text(encoding="utf-8"))
    for article in klue["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["guid"] = qa.pop("id")
                qa["question_type"] = 3 if qa.get("is_impossible") else 1
                qa["is_impossible"] = qa["question_type"] == 3
    klue_file = _write(tmp_path / "klue-mrc-v1.1_dev.json", klue)
    eval_script.main([*flags[:1], f"--predict_file={klue_file}", *flags[2:], f"--output_dir={tmp_path / 'klue'}",
                      "--metric=klue", "--null_score_diff_threshold=best_f1"])
    klue_scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(klue_scores) == ["exact_match", "rouge_w", "type1", "type2", "type3"]
    assert klue_scores["type1"]["total"] == klue_scores["type3"]["total"] == 12 and klue_scores["type2"]["total"] == 0
    import evaluate_klue_mrc
    written = json.loads((tmp_path / "klue" / "predictions.json").read_text(encoding="utf-8"))
    assert klue_scores == evaluate_klue_mrc.evaluate(klue, written)


# --- command lines: bad input -------------------------------------------------------------------

@pytest.mark.parametrize("script", ["train.py", "eval.py", "predict.py"])
def test_nan_threshold_is_refused_by_name(script):
    result = run_in_process(script, "--checkpoint=x", "--null_score_diff_threshold=nan")
    assert result.returncode == 2 and "--null_score_diff_threshold" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_bad_is_impossible_is_one_line(tiny_setup, tmp_path):
    import torch
    from modeling import Config, QuestionAnswering
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), tmp_path / "model.bin")
    data = _write(tmp_path / "bad.json", _one_paragraph(ANSWERABLE, {**IMPOSSIBLE, "is_impossible": "no"}))
    result = run_in_process("eval.py", f"--checkpoint={tmp_path / 'model.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
                            f"--predict_file={data}", f"--output_dir={tmp_path / 'out'}", "--version_2_with_negative",
                            *DATA_FLAGS, "--no_cuda", "--quiet")
    assert result.returncode == 1 and "question b: 'is_impossible' must be true or false" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    result = run_in_process("eval.py", f"--checkpoint={tmp_path / 'model.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
                            f"--predict_file={data}", f"--output_dir={tmp_path / 'out'}", "--null_score_diff_threshold=1",
                            *DATA_FLAGS, "--no_cuda", "--quiet")
    assert result.returncode == 1 and "only applies with --version_2_with_negative" in result.stderr


def test_a_file_of_only_unanswerable_questions_is_scored_and_one_without_any_gold_is_not(tiny_setup, tmp_path):
    """Questions marked `"is_impossible": true` are a gold "no answer" SQuAD 2.0 scores (the file that measures
    false positives), with a fixed or a tuned threshold; a file with no answers and no mark stays a test set."""
    import torch
    from modeling import Config, QuestionAnswering
    from scoring import has_answers
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), tmp_path / "model.bin")
    impossible = _write(tmp_path / "impossible.json", _one_paragraph(IMPOSSIBLE, {**IMPOSSIBLE, "id": "b2"}))
    unmarked = _write(tmp_path / "unmarked.json", _one_paragraph(EMPTY))
    flags = [f"--checkpoint={tmp_path / 'model.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
             f"--output_dir={tmp_path / 'out'}", "--version_2_with_negative", *DATA_FLAGS, "--no_cuda", "--quiet",
             f"--cache_dir={tmp_path / 'cache'}"]
    for threshold in ("0", "best_exact"):
        result = run_in_process("eval.py", *flags, f"--predict_file={impossible}",
                                f"--null_score_diff_threshold={threshold}")
        assert result.returncode == 0, result.stderr
        scores = json.loads(result.stdout.strip().splitlines()[-1])
        assert scores["total"] == scores["NoAns_total"] == 2 and "HasAns_total" not in scores
    result = run_in_process("eval.py", *flags, f"--predict_file={unmarked}")
    assert result.returncode == 0
    assert "has no answers (a test set?): predictions written, scoring skipped" in result.stderr
    examples = ku.read_squad_examples(impossible, is_training=False, version_2_with_negative=True)
    assert has_answers(examples) and has_answers(examples, "klue") and not has_answers(examples, "korquad")
    assert not has_answers(ku.read_squad_examples(impossible, is_training=False))  # read as version 1
    assert not has_answers(ku.read_squad_examples(unmarked, is_training=False, version_2_with_negative=True))

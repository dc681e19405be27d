"""submit.py against its documented baseline settings and eval.py's predictions (no-answer decisions
included), every entry point refusing an output that is one of its inputs, and eval.py's
--null_score_diff_threshold best_exact (issue 28)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cli import UsageError
from conftest import ROOT, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, write_subset

QUESTIONS = '{"version": "KorQuAD_v1.0", "data": []}\n'


def _second_name(original: Path, kind: str) -> Path:
    """Another path for `original`: the same string, a ./ spelling, a symlink or a hard link."""
    if kind == "same path":
        return original
    if kind == "dot spelling":
        return original.parent / "." / original.name
    other = original.with_name(f"{kind.replace(' ', '_')}_{original.name}")
    (os.symlink if kind == "symlink" else os.link)(original, other)
    return other


SPELLINGS = ["same path", "dot spelling", "symlink", "hard link"]


# --- 1. an output that is an input is refused before any work ----------------------------------------

def test_submit_refuses_its_input_as_output_from_the_command_line(tmp_path):
    questions = tmp_path / "X.json"
    questions.write_text(QUESTIONS, encoding="utf-8")
    result = run_in_process("submit.py", str(questions), str(questions), f"--checkpoint={tmp_path / 'missing.bin'}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"submit.py: error: OUTPUT.json: writing {questions} would overwrite "
                                          f"INPUT.json {questions} (the same file); choose another OUTPUT.json"]
    assert questions.read_text(encoding="utf-8") == QUESTIONS


@pytest.mark.parametrize("kind", SPELLINGS)
def test_submit_refuses_any_name_of_its_input(tmp_path, kind):
    import submit

    questions = tmp_path / "X.json"
    questions.write_text(QUESTIONS, encoding="utf-8")
    output = _second_name(questions, kind)
    # A missing checkpoint: the refusal comes before the checkpoint is even looked for.
    with pytest.raises(UsageError, match=r"^OUTPUT.json: writing .* would overwrite INPUT.json"):
        submit.main([str(questions), str(output), f"--checkpoint={tmp_path / 'missing.bin'}"])
    assert questions.read_text(encoding="utf-8") == QUESTIONS
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted({questions.name, output.name})


def test_submit_refuses_the_checkpoint_as_output(tmp_path):
    import submit

    checkpoint = tmp_path / "korquad_3.bin"
    checkpoint.write_bytes(b"weights")
    (tmp_path / "X.json").write_text(QUESTIONS, encoding="utf-8")
    with pytest.raises(UsageError, match=r"would overwrite --checkpoint .*korquad_3.bin"):
        submit.main([str(tmp_path / "X.json"), str(checkpoint), f"--checkpoint={checkpoint}"])
    assert checkpoint.read_bytes() == b"weights"


@pytest.mark.parametrize("kind", SPELLINGS)
def test_eval_refuses_an_output_dir_whose_files_are_inputs(tmp_path, kind):
    import eval as evaluate_script

    debug = tmp_path / "debug"
    debug.mkdir()
    predict_file, output_dir = debug / "predictions.json", debug
    if kind == "dot spelling":
        output_dir = tmp_path / "." / "debug"
    elif kind == "symlink":
        output_dir = tmp_path / "linked_debug"
        output_dir.symlink_to(debug)
    elif kind == "hard link":  # the questions under a name of their own, hard-linked as predictions.json
        predict_file = tmp_path / "dev.json"
    predict_file.write_text(QUESTIONS, encoding="utf-8")
    if kind == "hard link":
        os.link(predict_file, debug / "predictions.json")
    with pytest.raises(UsageError, match=r"^--output_dir: writing .*predictions.json would overwrite --predict_file"):
        evaluate_script.main([f"--checkpoint={tmp_path / 'missing.bin'}", f"--predict_file={predict_file}",
                              f"--output_dir={output_dir}", "--quiet"])
    assert predict_file.read_text(encoding="utf-8") == QUESTIONS


def test_eval_refuses_an_output_dir_file_that_is_the_checkpoint(tmp_path):
    import eval as evaluate_script

    (tmp_path / "dev.json").write_text(QUESTIONS, encoding="utf-8")
    checkpoint = tmp_path / "nbest_predictions.json"
    checkpoint.write_bytes(b"weights")
    with pytest.raises(UsageError, match=r"nbest_predictions.json would overwrite --checkpoint"):
        evaluate_script.main([f"--checkpoint={checkpoint}", f"--predict_file={tmp_path / 'dev.json'}",
                              f"--output_dir={tmp_path}", "--quiet"])
    assert checkpoint.read_bytes() == b"weights"


@pytest.mark.parametrize("flag", ["--input", "--context_file", "--checkpoint"])
def test_predict_refuses_an_output_that_is_an_input(tmp_path, flag):
    import predict

    source = tmp_path / "source.txt"
    source.write_text('{"question": "누가?", "context": "세종대왕이 만들었다."}\n', encoding="utf-8")
    output = _second_name(source, "hard link")
    sources = {"--input": [f"--input={source}"], "--context_file": ["--question=누가?", f"--context_file={source}"],
               "--checkpoint": ["--question=누가?", "--context=세종대왕이 만들었다."]}[flag]
    checkpoint = source if flag == "--checkpoint" else tmp_path / "missing.bin"
    with pytest.raises(UsageError, match=rf"^--output: writing .* would overwrite {flag} {source}"):
        predict.main([f"--checkpoint={checkpoint}", *sources, f"--output={output}", "--quiet"])
    assert source.read_text(encoding="utf-8").startswith('{"question": "누가?"')


@pytest.mark.parametrize("command", ["predict", "submit"])
@pytest.mark.parametrize("name", ["korquad_1.bin", "korquad_2.bin", "config.json", "training_args.json",
                                  "vocab named by training_args.json", "model_int8.onnx", "onnx_reader.json"])
def test_an_output_over_a_file_read_with_a_checkpoint_directory_is_refused(tmp_path, command, name):
    """A run directory (or an ONNX export) as --checkpoint: every file read from it, or named by its
    training_args.json, is an input too."""
    import predict
    import submit

    run = tmp_path / "run"
    run.mkdir()
    vocab = tmp_path / "elsewhere_vocab.txt"
    for path in (run / "korquad_1.bin", run / "korquad_2.bin", run / "config.json", run / "model_int8.onnx",
                 run / "onnx_reader.json", vocab):
        path.write_bytes(b"model")
    (run / "training_args.json").write_text(json.dumps({"vocab_file": str(vocab)}), encoding="utf-8")
    output = vocab if name.startswith("vocab") else run / name
    before = output.read_bytes()
    (tmp_path / "X.json").write_text(QUESTIONS, encoding="utf-8")
    with pytest.raises(UsageError, match=rf"would overwrite a file of --checkpoint {run}, {output} \(the same file\)"):
        if command == "predict":
            predict.main([f"--checkpoint={run}", "--question=누가?", "--context=세종대왕", f"--output={output}"])
        else:
            submit.main([str(tmp_path / "X.json"), str(output), f"--checkpoint={run}"])
    assert output.read_bytes() == before


@pytest.mark.parametrize("target", ["teacher_targets.npz", "teacher_targets.json"])
def test_distill_refuses_targets_over_its_train_file(tmp_path, target):
    import distill

    train_file = tmp_path / "out" / target
    train_file.parent.mkdir()
    train_file.write_text(QUESTIONS, encoding="utf-8")
    with pytest.raises(UsageError, match=rf"^--output_dir: writing .*{target} would overwrite --train_file"):
        distill.main([f"--teacher={tmp_path / 'missing'}", f"--train_file={train_file}",
                      f"--output_dir={tmp_path / 'out'}", "--quiet"])
    assert train_file.read_text(encoding="utf-8") == QUESTIONS


@pytest.mark.parametrize("export_format, name, flag", [("transformers", "config.json", "--model_config"),
                                                        ("transformers", "model.safetensors", "--checkpoint"),
                                                        ("onnx", "model.onnx", "--checkpoint"),
                                                        ("onnx", "vocab.txt", "--vocab_file")])
def test_export_refuses_files_over_its_inputs(tmp_path, export_format, name, flag):
    import export

    source = tmp_path / "elsewhere" / "input"
    source.parent.mkdir()
    source.write_bytes(b"input")
    (tmp_path / "exported").mkdir()
    os.link(source, tmp_path / "exported" / name)
    inputs = {"--checkpoint": tmp_path / "missing.bin", "--model_config": None, "--vocab_file": None, flag: source}
    with pytest.raises(UsageError, match=rf"^--output_dir: writing .*{name} would overwrite {flag} {source}"):
        export.main([f"--output_dir={tmp_path / 'exported'}", f"--format={export_format}", "--quiet",
                     *(f"{key}={value}" for key, value in inputs.items() if value is not None)])
    assert source.read_bytes() == b"input"


def test_pretrain_refuses_to_start_from_a_checkpoint_it_would_replace(tmp_path):
    import pretrain

    run = tmp_path / "lm_run"
    run.mkdir()
    (run / "pretrain_1.bin").write_bytes(b"encoder")
    flags = ["--train_files", str(SAMPLE_FILE), f"--output_dir={run}", f"--checkpoint={run / 'pretrain_1.bin'}",
             "--no_cuda", "--quiet", "--max_seq_length=100000"]
    with pytest.raises(UsageError, match=r"^--output_dir: writing .*pretrain_1.bin would overwrite --checkpoint"):
        pretrain.main(flags)
    # --resume goes on with the run's own checkpoints: this check passes (the next one, cheap, stops it).
    with pytest.raises(UsageError, match="--max_seq_length 100000 is larger than the model's"):
        pretrain.main([*flags, "--resume"])
    # A corpus file is never overwritten, --resume or not.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("한 문장.\n두 문장.\n", encoding="utf-8")
    os.link(corpus, run / "training_log.jsonl")
    with pytest.raises(UsageError, match=r"training_log.jsonl would overwrite --train_files .*corpus.txt"):
        pretrain.main(["--train_files", str(corpus), f"--output_dir={run}", "--checkpoint=none", "--no_cuda",
                       "--quiet", "--resume"])
    assert (run / "pretrain_1.bin").read_bytes() == b"encoder"


# --- 2. submit.py answers "" where eval.py does ------------------------------------------------------

@pytest.fixture(scope="module")
def no_answer_run(tmp_path_factory) -> Path:
    """A run directory as train.py --version_2_with_negative leaves it (random tiny weights)."""
    import torch

    from modeling import Config, QuestionAnswering

    run = tmp_path_factory.mktemp("v2_run")
    (run / "config.json").write_text(json.dumps(TINY_CONFIG))
    (run / "training_args.json").write_text(json.dumps({"analyzer": "mecab", "do_lower_case": True,
                                                        "version_2_with_negative": True}))
    shutil.copy(VOCAB_FILE, run / "vocab.txt")
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), run / "korquad_0.bin")
    return run


def test_submit_writes_eval_predictions_with_their_empty_answers(no_answer_run, tmp_path, capsys):
    import eval as evaluate_script
    import submit

    questions = tmp_path / "dev.json"
    ids = write_subset(SAMPLE_FILE, questions, 8)
    eval_flags = [f"--checkpoint={no_answer_run}", f"--predict_file={questions}", "--no_cuda", "--quiet",
                  *submit.BASELINE_FLAGS, f"--cache_dir={tmp_path / 'cache'}"]
    evaluate_script.main([*eval_flags, f"--output_dir={tmp_path / 'probe'}"])
    # A threshold between the questions' null odds, whatever this machine computes them to be: some
    # questions are answered "", the others keep their span.
    odds = sorted(json.loads((tmp_path / "probe" / "null_odds.json").read_text()).values())
    threshold = (odds[len(odds) // 2 - 1] + odds[len(odds) // 2]) / 2
    assert odds[len(odds) // 2 - 1] < threshold < odds[len(odds) // 2]
    evaluate_script.main([*eval_flags, f"--output_dir={tmp_path / 'eval'}", f"--null_score_diff_threshold={threshold!r}"])
    submit.main([str(questions), str(tmp_path / "submission.json"), f"--checkpoint={no_answer_run}", "--quiet",
                 f"--null_score_diff_threshold={threshold!r}"])
    capsys.readouterr()
    submitted = json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))
    assert submitted == json.loads((tmp_path / "eval" / "predictions.json").read_text(encoding="utf-8"))
    assert set(submitted) == set(ids)
    assert 0 < sum(answer == "" for answer in submitted.values()) < len(ids)


# --- 3. submit.py's settings are the documented baseline's ------------------------------------------

def test_submit_defaults_are_the_documented_contest_baseline(tmp_path, monkeypatch):
    import submit
    from checkpoints import resolve_finetuned_settings

    # README.md, "리더보드 제출 형식 (submit.py)" / "Leaderboard submission (submit.py)": on the CPU, korquad_3.bin
    # beside submit.py, data/bert_small.json and data/ko_vocab_32k.txt, 512-piece windows, stride 64, questions of
    # up to 64 pieces, answers of up to 30, 20 candidates, batches of 16; the analyzer the run's, else mecab.
    own = submit.parse_args(["INPUT.json", "OUTPUT.json"])
    assert Path(own.checkpoint) == ROOT / "korquad_3.bin"
    args = submit.eval_args(own, str(tmp_path))
    assert args.no_cuda is True
    assert (args.max_seq_length, args.doc_stride, args.max_query_length, args.max_answer_length,
            args.n_best_size, args.batch_size) == (512, 64, 64, 30, 20, 16)
    assert (args.predict_file, args.output_dir, args.cache_dir) == ("INPUT.json", str(tmp_path), str(tmp_path))

    # A bare korquad_3.bin (no training run beside it): the published model's files and lower-casing.
    monkeypatch.setattr(submit, "DEFAULT_CHECKPOINT", tmp_path / "korquad_3.bin")
    (tmp_path / "korquad_3.bin").write_bytes(b"")
    args = submit.eval_args(submit.parse_args(["INPUT.json", "OUTPUT.json"]), str(tmp_path))
    resolve_finetuned_settings(args)
    assert Path(args.model_config) == ROOT / "data" / "bert_small.json"
    assert Path(args.vocab_file) == ROOT / "data" / "ko_vocab_32k.txt"
    assert (args.do_lower_case, args.analyzer) == (True, "mecab")
    assert (args.version_2_with_negative, args.null_score_diff_threshold) == (False, 0.0)


# --- 4. --null_score_diff_threshold best_exact tunes for exact match -------------------------------

# Worked by hand (evaluate_v2_0.best_threshold keeps questions in ascending null odds):
#   a answerable 세종대왕, span 세종대왕 (EM 1, F1 1),              odds -3
#   b answerable 1443년, span "1443년에 훈민정음을" (EM 0, F1 > 0), odds -2
#   c unanswerable, span 훈민정음 (EM 0, F1 0),                     odds -1
# EM: keeping a raises the total (1 -> 2), keeping b adds nothing: best_exact_thresh -3, so b and c abstain.
# F1: keeping b adds its partial F1: best_f1_thresh -2, so only c abstains.
CONTEXT = "세종대왕은 1443년에 훈민정음을 창제하였다."
SPANS = {"a": "세종대왕", "b": "1443년에 훈민정음을", "c": "훈민정음"}
ODDS = {"a": -3.0, "b": -2.0, "c": -1.0}


@pytest.mark.parametrize("tuned, expected", [("best_exact", {"a": "세종대왕", "b": "", "c": ""}),
                                             ("best_f1", {"a": "세종대왕", "b": "1443년에 훈민정음을", "c": ""})])
def test_eval_applies_the_threshold_its_flag_names(tmp_path, monkeypatch, capsys, tuned, expected):
    import eval as evaluate_script
    import korquad_utils as ku

    qas = [{"id": "a", "question": "누가?", "answers": [{"text": "세종대왕", "answer_start": 0}]},
           {"id": "b", "question": "언제?", "answers": [{"text": "1443년", "answer_start": 6}]},
           {"id": "c", "question": "어디서?", "answers": [], "is_impossible": True}]
    dataset = tmp_path / "v2.json"
    dataset.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": [
        {"context": CONTEXT, "qas": qas}]}]}, ensure_ascii=False), encoding="utf-8")
    examples = ku.read_squad_examples(dataset, is_training=False, version_2_with_negative=True)

    def known_answers(args, config):
        nbest = {qas_id: [{"text": text, "probability": 1.0}] for qas_id, text in SPANS.items()}
        return examples, dict(SPANS), nbest, dict(ODDS)

    monkeypatch.setattr(evaluate_script, "predict_questions", known_answers)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    (tmp_path / "model.bin").write_bytes(b"")   # never loaded: predict_questions is replaced
    evaluate_script.main([f"--checkpoint={tmp_path / 'model.bin'}", f"--model_config={tmp_path / 'tiny.json'}",
                          f"--predict_file={dataset}", f"--output_dir={tmp_path / 'out'}", "--version_2_with_negative",
                          f"--null_score_diff_threshold={tuned}", "--no_cuda", "--quiet"])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8")) == expected
    assert scores["exact"] == pytest.approx(scores["best_exact"])   # both thresholds reach the best EM here
    assert scores["f1"] == pytest.approx(scores["best_f1"] if tuned == "best_f1" else 100 * 2 / 3)


# --- 4. outputs that are not regular files, and failures while writing -------------------------------

def test_a_fifo_output_is_written_through_not_replaced(tmp_path):
    """A rename over a FIFO (or /dev/null) would replace it with a plain file, and its reader would get nothing."""
    import stat
    import threading

    from atomic_files import atomic_write, writes_through

    fifo = tmp_path / "answers.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write(fifo, lambda file: file.write(b'{"answer": "x"}\n'))
    reader.join(timeout=10)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and received == [b'{"answer": "x"}\n']
    assert sorted(path.name for path in tmp_path.iterdir()) == ["answers.fifo"]
    assert writes_through("/dev/null") and not writes_through(tmp_path) and not writes_through(tmp_path / "new")


def test_a_failed_cleanup_does_not_hide_the_write_error(tmp_path, monkeypatch):
    """On a read-only mount even unlinking a missing temporary file fails: the error raised must stay the write's."""
    import errno

    from atomic_files import atomic_write

    def read_only_unlink(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    def full_disk(file):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "unlink", read_only_unlink)
    with pytest.raises(OSError) as error:
        atomic_write(tmp_path / "out.json", full_disk)
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(tmp_path / "out.json"))


def test_submit_refuses_an_unwritable_output_directory_before_any_work(tmp_path, monkeypatch):
    """As predict.py: found before the model loads (here: a checkpoint that does not exist), not after the work,
    by a real write: root passes os.access everywhere, and nobody's os.access sees a read-only mount or /proc."""
    import errno

    import submit

    (tmp_path / "dev.json").write_text(QUESTIONS, encoding="utf-8")
    missing = f"--checkpoint={tmp_path / 'missing.bin'}"
    with pytest.raises(UsageError, match=r"^OUTPUT.json /proc/out.json: cannot write in /proc \("):
        submit.main([str(tmp_path / "dev.json"), "/proc/out.json", missing])
    read_only = tmp_path / "read_only"   # what a read-only mount answers, whatever os.access says
    read_only.mkdir()
    real_open = os.open

    def open_read_only(path, flags, *args, **kwargs):
        if Path(path).parent == read_only and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", open_read_only)
    assert os.access(read_only, os.W_OK)
    with pytest.raises(UsageError, match=rf"^OUTPUT.json {read_only / 'out.json'}: cannot write in {read_only} "
                                         r"\(Read-only file system\)$"):
        submit.main([str(tmp_path / "dev.json"), str(read_only / "out.json"), missing])
    assert list(read_only.iterdir()) == []


def test_an_output_ending_in_a_path_separator_is_refused_not_written_as_a_file(tmp_path):
    """`predictions/` means a directory; Path would drop the slash and write a file called predictions."""
    import submit

    (tmp_path / "dev.json").write_text(QUESTIONS, encoding="utf-8")
    output = f"{tmp_path / 'predictions'}/"
    with pytest.raises(UsageError, match=f"^OUTPUT.json {output} ends in a path separator"):
        submit.main([str(tmp_path / "dev.json"), output, f"--checkpoint={tmp_path / 'missing.bin'}"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dev.json"]

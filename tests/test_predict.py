"""predict.py: a user's questions about their own text, from flags, files, pipes and Python."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import pytest
import torch

from conftest import DATA_FLAGS, ROOT, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, run_script, write_subset
from modeling import Config, QuestionAnswering

# The window flags of DATA_FLAGS as Reader.load settings.
WINDOWS = dict(max_seq_length=192, max_query_length=32, max_answer_length=30, doc_stride=64)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run directory as train.py leaves it: config, training args and two epochs' checkpoints."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(TINY_CONFIG))
    (run / "training_args.json").write_text(json.dumps({"vocab_file": str(VOCAB_FILE), "analyzer": "mecab"}))
    for epoch in (2, 10):   # 10 is the newest: a numeric, not alphabetical, choice
        torch.manual_seed(epoch)
        torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), run / f"korquad_{epoch}.bin")
    return run


@pytest.fixture(scope="module")
def reader(run_dir):
    from predict import Reader
    return Reader.load(run_dir, no_cuda=True, **WINDOWS)


def predict(*flags: str, input: str | None = None) -> subprocess.CompletedProcess:
    return run_script("predict.py", *flags, *DATA_FLAGS, "--no_cuda", "--quiet", input=input)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def assert_offsets_slice_the_context(answer: dict, context: str) -> None:
    for entry in [answer, *answer.get("answers", [])]:
        assert context[entry["start"]:entry["end"]] == entry["answer"] != ""
        assert 0 < entry["probability"] <= 1


def test_a_run_directory_means_its_newest_checkpoint(run_dir, tmp_path):
    from cli import UsageError
    from checkpoints import resolve_checkpoints

    assert resolve_checkpoints([run_dir, run_dir / "korquad_2.bin"]) == [run_dir / "korquad_10.bin",
                                                                          run_dir / "korquad_2.bin"]
    with pytest.raises(UsageError, match="without any korquad_N.bin"):
        resolve_checkpoints([tmp_path])


def test_korquad_input_gives_eval_predictions(run_dir, tiny_setup, tmp_path):
    import eval as eval_cli
    import predict as predict_cli

    eval_cli.main([f"--checkpoint={run_dir / 'korquad_10.bin'}", f"--predict_file={tiny_setup / 'train.json'}",
                   f"--output_dir={tmp_path / 'eval'}", f"--cache_dir={tmp_path / 'cache'}", *DATA_FLAGS,
                   "--no_cuda", "--quiet"])
    predict_cli.main([f"--checkpoint={run_dir}", f"--input={tiny_setup / 'train.json'}",
                      f"--output={tmp_path / 'answers.jsonl'}", *DATA_FLAGS, "--no_cuda", "--quiet"])
    expected = json.loads((tmp_path / "eval" / "predictions.json").read_text(encoding="utf-8"))
    answers = json_lines((tmp_path / "answers.jsonl").read_text(encoding="utf-8"))
    assert {answer["id"]: answer["answer"] for answer in answers} == expected
    assert [answer["id"] for answer in answers] == list(expected)   # file order kept
    # The n-best file carries the same offsets and probabilities.
    nbest = json.loads((tmp_path / "eval" / "nbest_predictions.json").read_text(encoding="utf-8"))
    for answer in answers:
        best = nbest[answer["id"]][0]
        assert (best["start"], best["end"], best["probability"]) == (answer["start"], answer["end"],
                                                                     pytest.approx(answer["probability"]))


def test_json_lines_keep_ids_and_offsets_slice_real_dev_contexts(run_dir, dev_file, tmp_path):
    write_subset(dev_file, tmp_path / "dev.json", 40, skip_paragraphs=100)
    paragraphs = json.loads((tmp_path / "dev.json").read_text(encoding="utf-8"))["data"][0]["paragraphs"]
    questions = [{"id": f"dev-{qa['id']}", "question": qa["question"], "context": p["context"]}
                 for p in paragraphs for qa in p["qas"]]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions),
                                       encoding="utf-8")
    result = predict(f"--checkpoint={run_dir}", f"--input={tmp_path / 'in.jsonl'}", "--top_k=5")
    assert result.returncode == 0, result.stderr
    answers = json_lines(result.stdout)
    assert [a["id"] for a in answers] == [q["id"] for q in questions]
    for question, answer in zip(questions, answers):
        assert len(answer["answers"]) == 5 and answer["answers"][0]["answer"] == answer["answer"]
        assert_offsets_slice_the_context(answer, question["context"])


def test_stdin_and_the_python_reader_agree(run_dir, reader):
    context = json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))["data"][0]["paragraphs"][0]["context"]
    lines = [{"question": "언제 시작되었나?", "context": context}, {"id": 7, "question": "누구인가?", "context": context}]
    result = predict(f"--checkpoint={run_dir}", "--input=-",
                     input="\ufeff" + "\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    assert result.returncode == 0, result.stderr
    piped = json_lines(result.stdout)
    assert "id" not in piped[0] and piped[1]["id"] == 7
    assert piped[0] == reader(lines[0]["question"], context)
    assert piped == reader.answer_all(lines)


def test_interactive_answers_each_line_of_a_pipe(run_dir):
    context = "서울은 대한민국의 수도이고, 부산은 대한민국 제2의 도시이다."
    result = predict(f"--checkpoint={run_dir}", "--interactive", input=f"{context}\n수도는?\n\n제2의 도시는?\n")
    assert result.returncode == 0, result.stderr
    answers = json_lines(result.stdout)
    assert len(answers) == 2
    for answer in answers:
        assert_offsets_slice_the_context(answer, context)


def test_a_30000_character_context_is_answered(reader):
    paragraphs = [p["context"] for article in json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))["data"]
                  for p in article["paragraphs"]]
    context = ""
    while len(context) < 30_000:
        context += "\n\n".join(paragraphs)
    context = context[:30_000]
    answer = reader("이 글에서 가장 중요한 사건은?", context, top_k=3)
    assert_offsets_slice_the_context(answer, context)


def test_odd_text_keeps_offsets_in_the_text_as_given(reader):
    # NFD Hangul, a BOM, an ideographic space and a no-break space: offsets index the string as passed.
    context = "\ufeff" + unicodedata.normalize("NFD", "세종대왕은\u3000훈민정음을 1443년에\u00a0창제하였다.")
    answer = reader("훈민정음은 언제 창제되었나?", context, top_k=3)
    assert_offsets_slice_the_context(answer, context)


@pytest.mark.parametrize("context", ["", "\u200b", "\u3000\ufeff\n"])
def test_a_context_without_any_piece_is_refused_as_empty(reader, context):
    from predict import InputError

    with pytest.raises(InputError, match='"context" is empty'):
        reader("무엇인가?", context, top_k=3)


def test_bad_lines_are_reported_and_the_others_answered(run_dir):
    lines = ['{"id": "ok1", "question": "수도는?", "context": "서울은 수도이다."}',
             'this is not JSON',
             '{"id": "q3", "question": "\\u3000\\u200b", "context": "서울은 수도이다."}',
             '{"id": "q4", "question": "수도는?"}',
             '["a", "list"]',
             '{"id": "ok6", "question": "수도는?", "context": "부산은 도시이다."}']
    result = predict(f"--checkpoint={run_dir}", "--input=-", input="\n".join(lines) + "\n")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [a["id"] for a in json_lines(result.stdout)] == ["ok1", "ok6"]
    errors = result.stderr.splitlines()
    assert [line.split(":")[1].strip() for line in errors[:4]] == [f"input line {n}" for n in (2, 3, 4, 5)]
    assert "not JSON" in errors[0] and '"question" is empty' in errors[1] and 'missing "context"' in errors[2]
    assert len(errors) == 5 and "4 question(s) could not be answered" in errors[4]


@pytest.mark.parametrize("flags, message", [
    (["--question=수도는?"], "--question needs --context or --context_file"),
    (["--question= ", "--context=서울"], "--question is empty"),
    (["--question=수도는?", "--context=\u200b\u3000\ufeff"], "--context is empty"),
    (["--question=수도는?", "--context_file=/nonexistent/doc.txt"], "/nonexistent/doc.txt"),
    (["--input=/nonexistent/in.jsonl"], "/nonexistent/in.jsonl"),
    (["--input=-", "--output=/nonexistent/dir/out.jsonl"], "/nonexistent/dir does not exist"),
    (["--input=-", "--top_k=0"], "argument --top_k: must be at least 1"),
    (["--input=-", "--top_k=101"], "argument --top_k: must be at most 100"),   # serve.py's bound
    (["--input=-", "--output="], "--output '' is not a file name"),
    # Command-line bytes that are not UTF-8 (Python reads them as lone surrogates): named before the model loads.
    (["--question=누구", "--context=\udcff홍길동이다"], "--context is not UTF-8 text (byte 0xff at character 0)"),
    (["--question=누구\udcff", "--context=홍길동이다"], "--question is not UTF-8 text (byte 0xff at character 2)"),
    (["--interactive", "--context=\udcff홍길동"], "--context is not UTF-8 text (byte 0xff at character 0)"),
    (["--interactive", "--context= \u3000"], "--interactive: --context is empty"),   # every question would fail
    # A real write, not os.access (root passes it everywhere): /proc takes no new files.
    (["--input=-", "--output=/proc/answers.jsonl"], "--output /proc/answers.jsonl: cannot write in /proc"),
    (["--input=-", "--output=/nonexistent/answers/"], "--output /nonexistent/answers/ ends in a path separator"),
])
def test_bad_flags_are_one_clear_line(run_dir, flags, message):
    result = predict(f"--checkpoint={run_dir}", *flags, input="")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr


def test_an_empty_context_file_is_named_and_an_empty_input_is_a_warning(run_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\ufeff \n", encoding="utf-8")   # a BOM and blanks only
    result = predict(f"--checkpoint={run_dir}", "--question=수도는?", f"--context_file={empty}")
    assert result.returncode == 1 and result.stderr.strip() == f"predict.py: error: --context_file {empty} is empty"
    result = run_in_process("predict.py", f"--checkpoint={run_dir}", f"--input={empty}", *DATA_FLAGS, "--no_cuda")
    assert result.returncode == 0 and result.stdout == ""
    assert "the input holds no questions" in result.stderr
    result = predict(f"--checkpoint={run_dir}", "--interactive", f"--context_file={empty}", input="수도는?\n")
    assert result.returncode == 1
    assert result.stderr.strip() == f"predict.py: error: --interactive: --context_file {empty} is empty"


def test_a_reader_that_stops_early_ends_the_run_quietly(run_dir):
    line = json.dumps({"question": "수도는?", "context": "서울은 대한민국의 수도이다. " * 3}, ensure_ascii=False)
    process = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), f"--checkpoint={run_dir}", "--input=-",
                                *DATA_FLAGS, "--no_cuda", "--quiet"], cwd=ROOT, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdin.write((line + "\n") * 1000)   # ~90 KB of answers: more than a pipe holds
    process.stdin.close()
    assert json.loads(process.stdout.readline())["answer"]
    process.stdout.close()
    assert process.wait(timeout=120) != 0
    assert process.stderr.read() == ""


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_checkpoint_holding_nan_or_infinite_weights_is_refused_in_one_line(run_dir, tmp_path, bad):
    """A diverged run's checkpoint would answer "" to everything (and export so); it is named at load."""
    import shutil

    from modeling import CheckpointError, load_checkpoint

    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    state = torch.load(run / "korquad_10.bin", weights_only=True)
    state["qa_outputs.weight"][0, 0] = bad
    torch.save(state, run / "korquad_10.bin")
    result = run_in_process("predict.py", f"--checkpoint={run}", "--question=누가?", "--context=세종대왕",
                            *DATA_FLAGS, "--no_cuda", "--quiet")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"predict.py: error: {run / 'korquad_10.bin'}: 1 tensor(s) hold NaN or "
                                          f"infinite values: qa_outputs.weight (a diverged or damaged checkpoint)"]
    encoder = {name.removeprefix("bert."): tensor for name, tensor in state.items() if name.startswith("bert.")}
    encoder["embeddings.word_embeddings.weight"][3, 1] = bad
    torch.save(encoder, tmp_path / "pretrained.bin")
    with pytest.raises(CheckpointError, match="embeddings.word_embeddings.weight .*diverged or damaged"):
        load_checkpoint(QuestionAnswering(Config(**TINY_CONFIG)), tmp_path / "pretrained.bin")


def test_a_context_file_is_read_as_given_so_that_offsets_index_its_text(run_dir, tmp_path):
    """A BOM, CRLF and a lone CR are kept: the answer is the file's text[start:end], as for --context."""
    text = "\ufeff세종대왕이 1443년\r\n훈민정음을 창제하였다.\r한글은 과학적이다.\r\n"
    path = tmp_path / "context.txt"
    path.write_bytes(text.encode("utf-8"))
    from_file, given = (json.loads(predict(f"--checkpoint={run_dir}", "--question=누가 창제하였나?", "--top_k=3",
                                           flag).stdout) for flag in (f"--context_file={path}", f"--context={text}"))
    assert from_file == given
    for answer in [from_file, *from_file["answers"]]:
        assert text[answer["start"]:answer["end"]] == answer["answer"]


def test_output_dev_stdout_on_a_pipe_is_written_through(run_dir):
    """/dev/stdout on a pipe cannot be renamed over (there is no directory to write a temporary file in)."""
    result = predict(f"--checkpoint={run_dir}", "--question=수도는?", "--context=서울은 수도이다.",
                     "--output=/dev/stdout")
    assert result.returncode == 0 and result.stderr == ""
    assert json_lines(result.stdout)[0]["answer"]


@pytest.mark.parametrize("source", [["--input=-"], ["--interactive", "--context=서울은 수도이다."]])
def test_stdin_redirected_from_the_output_is_refused_before_any_work(tmp_path, source):
    questions = tmp_path / "questions.jsonl"
    questions.write_text('{"question": "수도는?", "context": "서울은 수도이다."}\n', encoding="utf-8")
    with open(questions, "rb") as stdin:
        result = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"--checkpoint={tmp_path / 'missing.bin'}",
                                 *source, f"--output={questions}", "--quiet"], stdin=stdin, capture_output=True,
                                text=True, cwd=ROOT, timeout=120)
    flag = "--input -" if source == ["--input=-"] else "--interactive"
    assert result.returncode == 1 and result.stderr == (
        f"predict.py: error: --output: writing {questions} would overwrite {flag} (stdin, the same file); "
        f"choose another --output\n")
    assert questions.read_text(encoding="utf-8").startswith('{"question"')


def test_a_pretty_printed_question_or_a_json_array_reads_as_the_same_json_lines(run_dir, tmp_path):
    records = [{"id": "a", "question": "수도는?", "context": "대한민국의 수도는 서울이다."},
               {"id": "b", "question": "강은?", "context": "서울에는 한강이 흐른다."}]
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    (tmp_path / "one.json").write_text(json.dumps(records[0], ensure_ascii=False, indent=2), "utf-8")
    (tmp_path / "array.json").write_text(json.dumps([*records, {"id": "c"}, {"version": "1", "data": []}],
                                                    ensure_ascii=False, indent=2), "utf-8")
    answered = {name: predict(f"--checkpoint={run_dir}", f"--input={tmp_path / name}")
                for name in ("lines.jsonl", "one.json", "array.json")}
    assert answered["lines.jsonl"].returncode == answered["one.json"].returncode == 0
    expected = json_lines(answered["lines.jsonl"].stdout)
    assert json_lines(answered["one.json"].stdout) == expected[:1]
    # An array answers each of its objects; a bad one fails alone, named by its place.
    assert json_lines(answered["array.json"].stdout)[:2] == expected
    assert "input item 3" in answered["array.json"].stderr and 'missing "question"' in answered["array.json"].stderr
    assert "input item 4: a KorQuAD/SQuAD file's object inside a JSON array" in answered["array.json"].stderr


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(process.stdout)


def test_temporary_answers_a_killed_run_left_are_removed_and_no_others(run_dir, tmp_path):
    """kill -9 leaves the temporary file of the answers so far beside --output; the next run to that file removes
    it, and leaves a live run's and another file's alone."""
    output = tmp_path / "answers.jsonl"
    pid = dead_pid()
    dead = tmp_path / f".answers.jsonl.{pid}.0badcafe.tmp"
    kept = [tmp_path / f".answers.jsonl.{os.getpid()}.0badcafe.tmp", tmp_path / f".other.jsonl.{pid}.0badcafe.tmp"]
    for path in (dead, *kept):
        path.write_text('{"answer": "so far"}\n')
    result = predict(f"--checkpoint={run_dir}", "--question=수도는?", "--context=서울은 수도이다.", f"--output={output}")
    assert result.returncode == 0, result.stderr
    assert sorted(tmp_path.iterdir()) == sorted([output, *kept])


def test_sigterm_while_answering_into_output_leaves_no_temporary_file(run_dir, tmp_path):
    line = json.dumps({"question": "수도는?", "context": "서울은 대한민국의 수도이다. " * 3}, ensure_ascii=False)
    questions = tmp_path / "questions.jsonl"
    questions.write_text((line + "\n") * 20000, encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    process = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), f"--checkpoint={run_dir}",
                                f"--input={questions}", f"--output={out / 'answers.jsonl'}", *DATA_FLAGS, "--no_cuda",
                                "--quiet"], cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.iterdir()) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)   # until the answers are being written
        assert process.poll() is None, "finished before it could be stopped"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert process.stderr.read().splitlines() == [
        f"predict.py: stopped by SIGTERM before --output {out / 'answers.jsonl'} was written whole"]
    assert list(out.iterdir()) == []

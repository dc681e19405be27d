"""ONNX exports of a --version_2_with_negative run abstain as the run does; export.py refuses NaN logits;
a killed export, a damaged model or settings file, and an output directory over the checkpoint are caught."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_FLAGS, ROOT, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, run_script
from test_noanswer import _mixed_sample

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

WINDOWS = dict(max_seq_length=192, max_query_length=32, doc_stride=64, max_answer_length=30)


def export_flags(checkpoint: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--output_dir", str(output_dir), "--format", "onnx", "--quiet", *extra]


@pytest.fixture(scope="module")
def v2_run(tiny_setup, tmp_path_factory) -> tuple[Path, Path]:
    """(questions file, run directory): a tiny --version_2_with_negative run, two epochs on 8 answerable
    questions each also asked unanswerable; it abstains on some and answers others, which is all these
    tests need (test_noanswer.py shows such a run learning)."""
    import train

    root = tmp_path_factory.mktemp("v2")
    data = root / "mixed.json"
    data.write_text(json.dumps(_mixed_sample(questions_per_article=2), ensure_ascii=False), encoding="utf-8")
    run = root / "run"
    train.main([f"--output_dir={run}", f"--checkpoint={tiny_setup / 'pretrained.bin'}",
                f"--model_config={tiny_setup / 'tiny.json'}", f"--train_file={data}", *DATA_FLAGS,
                "--train_batch_size=8", "--learning_rate=2e-3", "--num_train_epochs=2", "--seed=42", "--no_cuda",
                "--quiet", f"--cache_dir={root / 'cache'}", "--version_2_with_negative"])
    return data, run


def eval_outputs(checkpoint: Path, data: Path, output_dir: Path, capsys, *flags: str) -> tuple[dict, dict, dict]:
    """(scores, predictions.json, na_probs.json) of eval.py on `checkpoint`, run in this process."""
    import eval as eval_script

    eval_script.main([f"--checkpoint={checkpoint}", f"--predict_file={data}", f"--output_dir={output_dir}",
                      *DATA_FLAGS, "--no_cuda", "--quiet", f"--cache_dir={output_dir / 'cache'}", *flags])
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    read = lambda name: json.loads((output_dir / name).read_text(encoding="utf-8"))  # noqa: E731
    return scores, read("predictions.json"), read("na_probs.json")


@pytest.fixture(scope="module")
def split_threshold(v2_run, tmp_path_factory) -> float:
    """A --null_score_diff_threshold that makes the run answer about half the questions and abstain on the
    rest: midway between two neighbouring null odds, far from both (an fp32 graph moves odds by ~1e-6)."""
    import eval as eval_script

    data, run = v2_run
    out = tmp_path_factory.mktemp("odds")
    eval_script.main([f"--checkpoint={run}", f"--predict_file={data}", f"--output_dir={out}", *DATA_FLAGS,
                      "--no_cuda", "--quiet", f"--cache_dir={out / 'cache'}"])
    odds = sorted(v for v in json.loads((out / "null_odds.json").read_text()).values() if v < 1e29)
    middle = len(odds) // 2
    gap, low = max((odds[i + 1] - odds[i], i) for i in range(middle - 3, middle + 3))
    assert gap > 1e-3, odds
    return (odds[low] + odds[low + 1]) / 2


@pytest.fixture(scope="module")
def exports(v2_run, split_threshold, tmp_path_factory) -> dict[str, Path]:
    """"plain": the run exported as it is; "split": with split_threshold recorded, and an int8 model too."""
    import export

    _, run = v2_run
    root = tmp_path_factory.mktemp("exports")
    export.main(export_flags(run, root / "plain"))
    export.main(export_flags(run, root / "split", "--quantize", "int8",
                             f"--null_score_diff_threshold={split_threshold}"))
    return {"plain": root / "plain", "split": root / "split"}


# --- the export abstains as the run does --------------------------------------------------------

def test_the_export_records_the_runs_no_answer_setting_and_its_models(exports, split_threshold):
    import onnx_reader

    plain = onnx_reader.read_settings(exports["plain"])
    assert plain.version_2_with_negative is True and plain.null_score_diff_threshold == 0.0
    split = onnx_reader.read_settings(exports["split"])
    assert split.version_2_with_negative is True and split.null_score_diff_threshold == split_threshold
    assert sorted(split.models) == ["model.onnx", "model_int8.onnx"]
    for name, record in split.models.items():
        assert record == onnx_reader.model_digest((exports["split"] / name).read_bytes())


def assert_same_lines(got: list[dict], expected: list[dict]) -> None:
    """Answers and offsets equal; probabilities equal to float tolerance (fp32 sums in another order)."""
    assert len(got) == len(expected)
    for answer, reference in zip(got, expected):
        assert (answer["answer"], answer["start"], answer["end"]) == (
            reference["answer"], reference["start"], reference["end"])
        assert answer["probability"] == pytest.approx(reference["probability"], abs=1e-5)
        assert answer["no_answer_probability"] == pytest.approx(reference["no_answer_probability"], abs=1e-5)


def test_eval_through_the_export_abstains_as_through_the_checkpoint(v2_run, exports, split_threshold, tmp_path,
                                                                      capsys):
    data, run = v2_run
    cases = [  # (export, flags for it, flags for the checkpoint that should give the same)
        ("plain", [], []),
        ("split", [], [f"--null_score_diff_threshold={split_threshold}"]),
        ("split", ["--null_score_diff_threshold=0"], []),   # a threshold given replaces the recorded one
    ]
    for number, (name, onnx_flags, torch_flags) in enumerate(cases):
        scores, predictions, na_probs = eval_outputs(exports[name], data, tmp_path / f"onnx{number}", capsys,
                                                     *onnx_flags)
        reference = eval_outputs(run, data, tmp_path / f"torch{number}", capsys, *torch_flags)
        assert predictions == reference[1]
        assert na_probs == pytest.approx(reference[2], abs=1e-5)
        assert {k: v for k, v in scores.items() if "thresh" not in k} == pytest.approx(
            {k: v for k, v in reference[0].items() if "thresh" not in k}, abs=1e-9)
        assert "NoAns_exact" in scores   # scored as version 2 without being told
        if number == 1:   # at split_threshold: both kinds of answer compared
            assert 0 < sum(answer == "" for answer in predictions.values()) < len(predictions)


def predict_lines(capsys, *flags: str) -> list[dict]:
    import predict

    predict.main([*flags, "--quiet"])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_through_the_export_abstains_as_through_the_checkpoint(v2_run, exports, split_threshold, capsys):
    data, run = v2_run
    window_flags = [f"--{name}={value}" for name, value in WINDOWS.items()]
    got = predict_lines(capsys, "--checkpoint", str(exports["split"]), "--input", str(data))
    expected = predict_lines(capsys, "--checkpoint", str(run), "--input", str(data), *window_flags, "--no_cuda",
                             f"--null_score_diff_threshold={split_threshold}")
    assert_same_lines(got, expected)
    assert {line["answer"] == "" for line in got} == {True, False}
    assert all((line["answer"] == "") == (line["no_answer_probability"] > 1 / (1 + math.exp(-split_threshold)))
               for line in got)
    plain = predict_lines(capsys, "--checkpoint", str(exports["plain"]), "--input", str(data))
    assert_same_lines(plain, predict_lines(capsys, "--checkpoint", str(run), "--input", str(data), *window_flags,
                                           "--no_cuda"))


def test_the_reader_serve_uses_abstains_on_the_export_as_on_the_run(v2_run, exports, split_threshold):
    from predict import Reader

    data, run = v2_run
    dataset = json.loads(data.read_text(encoding="utf-8"))
    questions = [(qa["question"], paragraph["context"]) for article in dataset["data"]
                 for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    expected = Reader.load(run, no_cuda=True, null_score_diff_threshold=split_threshold,
                           **WINDOWS).answer_all(questions, top_k=2)
    reader = Reader.load(exports["split"])
    assert reader.version_2_with_negative and reader.null_score_diff_threshold == split_threshold
    got = reader.answer_all(questions, top_k=2)
    assert_same_lines(got, expected)
    assert [[a["answer"] for a in line["answers"]] for line in got] == [
        [a["answer"] for a in line["answers"]] for line in expected]
    # A threshold given replaces the recorded one.
    assert_same_lines(Reader.load(exports["split"], null_score_diff_threshold=0.0).answer_all(questions),
                      Reader.load(run, no_cuda=True, **WINDOWS).answer_all(questions))


class Served(Exception):
    """Raised in place of serving: serve.main built its reader (`args[0]`) and would listen now."""


def served_reader(monkeypatch, *flags: str):
    """The Reader serve.py would serve with `flags` (on a free port of 127.0.0.1), stopped before it serves."""
    import serve

    def stop_before_serving(reader, args, announce=None):
        raise Served(reader)
    monkeypatch.setattr(serve, "server_config", stop_before_serving)
    monkeypatch.setattr(signal, "signal", lambda number, handler: None)   # pytest's own handlers stay
    with pytest.raises(Served) as served:
        serve.main([*flags, "--host=127.0.0.1", "--port=0", "--quiet"])
    return served.value.args[0]


def test_serve_takes_window_flags_and_a_threshold_given_over_the_exports(v2_run, exports, split_threshold,
                                                                         monkeypatch):
    """As predict.py: not given, the export's windows and threshold; given, the flags' (0 included), and a window
    the model cannot hold is refused in one line before serving."""
    from cli import UsageError
    from predict import Reader

    data, run = v2_run
    dataset = json.loads(data.read_text(encoding="utf-8"))
    questions = [(qa["question"], paragraph["context"]) for article in dataset["data"]
                 for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    recorded = served_reader(monkeypatch, f"--checkpoint={exports['split']}")
    assert (recorded.max_seq_length, recorded.max_query_length, recorded.doc_stride) == (192, 32, 64)
    assert recorded.null_score_diff_threshold == split_threshold
    small = dict(max_seq_length=64, max_query_length=8, doc_stride=16)
    given = served_reader(monkeypatch, f"--checkpoint={exports['split']}", "--null_score_diff_threshold=0",
                          *(f"--{name}={value}" for name, value in small.items()))
    assert (given.max_seq_length, given.max_query_length, given.doc_stride) == (64, 8, 16)
    assert given.null_score_diff_threshold == 0.0
    assert_same_lines(given.answer_all(questions), Reader.load(run, no_cuda=True, **{**WINDOWS, **small},
                                                               null_score_diff_threshold=0.0).answer_all(questions))
    with pytest.raises(UsageError, match="^--max_seq_length 600 is larger than the model's max_position_embeddings"):
        served_reader(monkeypatch, f"--checkpoint={exports['split']}", "--max_seq_length=600")


def test_int8_export_abstains_by_the_recorded_threshold(v2_run, exports, split_threshold):
    from predict import Reader

    data, _ = v2_run
    dataset = json.loads(data.read_text(encoding="utf-8"))
    questions = [(qa["question"], paragraph["context"]) for article in dataset["data"]
                 for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    int8 = Reader.load(exports["split"] / "model_int8.onnx").answer_all(questions)
    cut = 1 / (1 + math.exp(-split_threshold))
    assert all((line["answer"] == "") == (line["no_answer_probability"] > cut) for line in int8)
    assert all(line["start"] is None or questions[i][1][line["start"]:line["end"]] == line["answer"]
               for i, line in enumerate(int8))


# --- export.py refuses NaN logits ----------------------------------------------------------------

def tiny_model(seed: int):
    from modeling import Config, QuestionAnswering

    torch.manual_seed(seed)
    return QuestionAnswering(Config(**TINY_CONFIG)).eval()


@pytest.mark.parametrize("output", [0, 1], ids=["start_logits", "end_logits"])
def test_verification_refuses_a_graph_with_nan_logits(output):
    import export
    from cli import UsageError

    model = tiny_model(3)
    batch = {"input_ids": np.array([[2, 10, 11, 3, 12, 13, 3]]), "token_type_ids": np.array([[0, 0, 0, 0, 1, 1, 1]]),
             "attention_mask": np.ones((1, 7), dtype=np.int64)}
    graph = export.onnx_graph(model)
    bias = next(tensor for tensor in graph.graph.initializer if tensor.name == "qa_outputs.bias")
    poisoned = onnx.numpy_helper.to_array(bias).copy()
    poisoned[output] = np.nan
    bias.CopyFrom(onnx.numpy_helper.from_array(poisoned, "qa_outputs.bias"))
    name = ("start_logits", "end_logits")[output]
    with pytest.raises(UsageError, match=rf"^model.onnx: model.onnx {name} are NaN or infinite .*; nothing written$"):
        export.verify(model, graph.SerializeToString(), "model.onnx", batch, export.FP32_TOLERANCE)


@pytest.mark.parametrize("weight", [float("nan"), 3e38])
def test_export_of_a_checkpoint_with_a_nan_weight_is_one_line_and_writes_nothing(tmp_path, weight):
    """A NaN weight is refused as the checkpoint loads; a finite one whose logits overflow, by the check
    of the sample windows."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TINY_CONFIG))
    model = tiny_model(4)
    with torch.no_grad():
        model.qa_outputs.weight[1, :] = weight   # the end logits only
    torch.save(model.state_dict(), run / "korquad_1.bin")
    out = tmp_path / "out"
    result = run_in_process("export.py", *export_flags(run, out, "--vocab_file", str(VOCAB_FILE), "--analyzer", "none"))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"export.py: error: {run / 'korquad_1.bin'}: 1 tensor(s) hold NaN or infinite values: qa_outputs.weight (a "
        f"diverged or damaged checkpoint)" if weight != weight else
        "export.py: error: model.onnx: the checkpoint's own end_logits are NaN or infinite on the sample windows; "
        "nothing written"]
    assert not out.exists()   # not even an empty directory: this run made it, and removes it


def test_export_of_a_model_with_fewer_positions_than_the_default_window_caps_the_windows(tmp_path, capsys):
    """A bare checkpoint of a 128-position model exports at 128-piece windows (not predict.py's default 512,
    which once indexed past the position table in a traceback), says so in one line, and the export answers."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**TINY_CONFIG, "max_position_embeddings": 128}))
    torch.save(_model_at(128).state_dict(), run / "korquad_1.bin")
    out = tmp_path / "out"
    result = run_in_process("export.py", *export_flags(run, out, "--vocab_file", str(VOCAB_FILE), "--analyzer", "none"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "positions" in line]
    assert len(warnings) == 1 and "128 positions, fewer than the 512-piece window" in warnings[0], result.stderr
    settings = json.loads((out / "onnx_reader.json").read_text(encoding="utf-8"))
    assert (settings["max_seq_length"], settings["doc_stride"], settings["max_query_length"]) == (128, 32, 24)
    data = tmp_path / "one.json"
    qa = {"id": "q1", "question": "대한민국의 수도는?", "answers": [{"text": "서울", "answer_start": 10}]}
    paragraph = {"context": "대한민국의 수도는 서울이다. " * 40, "qas": [qa]}   # longer than one 128-piece window
    data.write_text(json.dumps({"version": "1", "data": [{"title": "t", "paragraphs": [paragraph]}]},
                               ensure_ascii=False), encoding="utf-8")
    capsys.readouterr()
    lines = predict_lines(capsys, "--checkpoint", str(out), "--input", str(data))
    assert [line["id"] for line in lines] == ["q1"]


@pytest.mark.parametrize("positions", [6, 16, 64, 128, 511])
def test_capped_windows_pass_the_readers_checks(tmp_path, positions):
    import argparse
    import export
    from cli import check_data_args
    from modeling import Config

    windows = export.training_windows(tmp_path / "run", positions)
    check_data_args(argparse.Namespace(**windows), Config(**{**TINY_CONFIG, "max_position_embeddings": positions}))
    assert windows["max_seq_length"] == positions
    assert export.training_windows(tmp_path / "run", 512) == export.DEFAULT_WINDOWS


def test_a_model_with_too_few_positions_for_any_window_is_one_line(tmp_path):
    import export
    from cli import UsageError

    with pytest.raises(UsageError, match=r"^--checkpoint \S+: the model's max_position_embeddings 5 leaves no room"):
        export.training_windows(tmp_path / "run", 5)


def _model_at(positions: int):
    from modeling import Config, QuestionAnswering

    torch.manual_seed(5)
    return QuestionAnswering(Config(**{**TINY_CONFIG, "max_position_embeddings": positions})).eval()


# --- a killed export, damaged files ----------------------------------------------------------------

KILL_AT_REPLACE = """
import os, signal, sys
sys.path.insert(0, {root!r})
calls = 0
real_replace = os.replace
def replace(*args, **kwargs):  # SIGKILL this process at the Nth rename into place
    global calls
    calls += 1
    if calls == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(*args, **kwargs)
os.replace = replace
import export
from cli import run_cli
sys.argv = ["export.py", *{flags!r}]
run_cli(export.main)
"""


def killed_export(flags: list[str], kill_at: int) -> subprocess.CompletedProcess:
    """export.py, SIGKILLed as it makes its `kill_at`-th rename (fp32: model.onnx, vocab.txt, onnx_reader.json)."""
    script = KILL_AT_REPLACE.format(root=str(ROOT), kill_at=kill_at, flags=flags)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)


def predict_once(checkpoint: Path) -> subprocess.CompletedProcess:
    return run_script("predict.py", "--checkpoint", str(checkpoint), "--question", "수도는?", "--context",
                      "서울은 대한민국의 수도이다.", "--quiet")


def other_run(v2_run, tmp_path: Path) -> Path:
    """A copy of the v2 run with other weights: its export differs byte for byte."""
    _, run = v2_run
    other = tmp_path / "other_run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("korquad_*.bin", "training_state.pt"))
    torch.save(tiny_model(5).state_dict(), other / "korquad_1.bin")
    return other


def test_an_export_killed_before_its_settings_leaves_nothing_that_loads(v2_run, exports, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(exports["plain"], out)
    before = predict_once(out)
    assert before.returncode == 0, before.stderr
    flags = export_flags(other_run(v2_run, tmp_path), out)
    # Killed at the first rename: the previous export is whole and answers as before.
    assert killed_export(flags, kill_at=1).returncode == -signal.SIGKILL
    assert predict_once(out).stdout == before.stdout
    # Killed at the last rename: new model and vocab beside the previous settings, which refuse that model.
    assert killed_export(flags, kill_at=3).returncode == -signal.SIGKILL
    result = predict_once(out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"predict.py: error: --checkpoint {out / 'model.onnx'}: not the model export.py wrote (its CRC-32 is not "
        f"the one onnx_reader.json records): truncated, damaged or from an interrupted export; export it again"]
    # A rerun succeeds and sweeps the killed runs' temporary files.
    import export
    export.main(flags)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "onnx_reader.json", "vocab.txt"]
    assert predict_once(out).returncode == 0


def test_a_sigkill_during_quantization_leaves_the_previous_export_and_a_rerun_cleans_up(v2_run, exports, tmp_path):
    _, run = v2_run
    out = tmp_path / "export"
    shutil.copytree(exports["split"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    command = [sys.executable, str(ROOT / "export.py"), *export_flags(run, out, "--quantize", "int8")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".quantize.") for p in out.iterdir()):
            assert process.poll() is None and time.monotonic() < deadline, "export.py never started quantizing"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
    import export
    export.main(export_flags(run, out, "--quantize", "int8"))
    assert sorted(p.name for p in out.iterdir()) == sorted(before)   # the scratch directory is gone


def damaged_copy(source: Path, tmp_path: Path, name: str, damage) -> Path:
    copy = tmp_path / f"damaged_{name}"
    shutil.copytree(source, copy)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(damage(data))
    return copy


def flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


@pytest.mark.parametrize("name, damage, message", [
    ("model.onnx", lambda data: data[:len(data) // 2], r"model.onnx: not the model export.py wrote \(\d+ bytes, "
                                                       r"onnx_reader.json records \d+\)"),
    ("model.onnx", flip_middle_byte, r"model.onnx: not the model export.py wrote \(its CRC-32"),
    ("onnx_reader.json", lambda data: data[:len(data) // 2], r"onnx_reader.json: not readable JSON"),
])
@pytest.mark.parametrize("script", ["predict.py", "eval.py"])
def test_a_damaged_export_is_one_line_naming_the_file(v2_run, exports, tmp_path, script, name, damage, message):
    data, _ = v2_run
    damaged = damaged_copy(exports["plain"], tmp_path, name, damage)
    flags = (["--question", "q", "--context", "c"] if script == "predict.py"
             else ["--predict_file", str(data), "--output_dir", str(tmp_path / "out")])
    result = run_script(script, "--checkpoint", str(damaged), *flags, "--quiet")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]) and str(damaged) in lines[0], lines


def test_a_model_left_from_an_earlier_export_is_refused(exports, tmp_path):
    """An fp32-only export into a directory that held an int8 model too: that int8 model is another run's."""
    out = tmp_path / "export"
    shutil.copytree(exports["split"], out)
    shutil.copy(exports["plain"] / "onnx_reader.json", out / "onnx_reader.json")   # as an fp32-only rerun leaves it
    result = predict_once(out / "model_int8.onnx")
    assert result.returncode == 1 and "onnx_reader.json does not list it, so it is left from an earlier export" \
        in result.stderr and "Traceback" not in result.stderr


def test_version_1_settings_still_read_and_never_abstain(exports, tmp_path):
    import onnx_reader

    raw = json.loads((exports["plain"] / "onnx_reader.json").read_text(encoding="utf-8"))
    for key in ("version_2_with_negative", "null_score_diff_threshold", "models"):
        del raw[key]
    (tmp_path / "onnx_reader.json").write_text(json.dumps({**raw, "version": 1}))
    settings = onnx_reader.read_settings(tmp_path)
    assert settings.version_2_with_negative is False and settings.models == {}
    (tmp_path / "onnx_reader.json").write_text(json.dumps({**raw, "version": 2}))
    with pytest.raises(onnx_reader.OnnxExportError, match='"version_2_with_negative" must be true or false, got None'):
        onnx_reader.read_settings(tmp_path)


def test_settings_whose_windows_cannot_fit_name_the_file_not_a_flag(exports, tmp_path):
    import onnx_reader

    raw = json.loads((exports["plain"] / "onnx_reader.json").read_text(encoding="utf-8"))
    for bad in ({"max_seq_length": raw["max_position_embeddings"] + 1},
                {"max_query_length": raw["max_seq_length"] - 3}):
        (tmp_path / "onnx_reader.json").write_text(json.dumps({**raw, **bad}))
        with pytest.raises(onnx_reader.OnnxExportError, match=r"onnx_reader\.json: its windows .* do not fit"):
            onnx_reader.read_settings(tmp_path)
    (tmp_path / "onnx_reader.json").write_text(json.dumps(raw))
    assert onnx_reader.read_settings(tmp_path).max_seq_length == raw["max_seq_length"]
    # A stride at or past the window, which train.py takes (as the original baseline), is read as it was trained.
    (tmp_path / "onnx_reader.json").write_text(json.dumps({**raw, "doc_stride": raw["max_seq_length"]}))
    assert onnx_reader.read_settings(tmp_path).doc_stride == raw["max_seq_length"]


# --- int8 for the CPU it runs on -----------------------------------------------------------------------

def int8_weights(model_file: Path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    return [numpy_helper.to_array(tensor) for tensor in onnx.load(model_file).graph.initializer
            if tensor.data_type == onnx.TensorProto.INT8]


def test_int8_for_cpus_without_vnni_has_7_bit_weights_and_says_so(v2_run, exports, tmp_path, monkeypatch, caplog):
    import export
    import onnx_reader

    _, run = v2_run
    here = onnx_reader.read_settings(exports["split"]).quantization
    assert here == {"method": "dynamic", "weights": "int8 per tensor" + (", 7-bit" if here["reduce_range"] else ""),
                    "activations": "uint8 per run", "embeddings": "fp16 word table", "for": onnx_reader.cpu_int8_target(),
                    "reduce_range": onnx_reader.INT8_TARGETS[onnx_reader.cpu_int8_target()], "chosen": "this CPU's"}
    export.main(export_flags(run, tmp_path / "avx2", "--quantize", "int8", "--int8_for", "avx2"))
    recorded = onnx_reader.read_settings(tmp_path / "avx2").quantization
    assert recorded["for"] == "avx2" and recorded["reduce_range"] is True and recorded["chosen"] == "--int8_for"
    seven_bit = int8_weights(tmp_path / "avx2" / "model_int8.onnx")
    assert seven_bit and max(int(np.abs(w.astype(np.int16)).max()) for w in seven_bit) <= 64
    export.main(export_flags(run, tmp_path / "vnni", "--quantize", "int8", "--int8_for", "vnni"))
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in int8_weights(tmp_path / "vnni" / "model_int8.onnx")) > 64

    # A VNNI export opened where there is no VNNI warns once, naming what to do; the avx2 export does not.
    monkeypatch.setattr(onnx_reader, "cpu_flags", lambda: {"avx2", "avx512f"})
    with caplog.at_level("WARNING", logger="korquad"):
        onnx_reader.OnnxReaderModel(tmp_path / "avx2" / "model_int8.onnx")
        assert not caplog.records
        onnx_reader.OnnxReaderModel(tmp_path / "vnni" / "model_int8.onnx")
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'vnni' / 'model_int8.onnx'} was quantized for CPUs with VNNI; this one has none, and its int8 "
        f"products can saturate here: export again with --quantize int8 --int8_for avx2"]


@pytest.mark.parametrize("flags, target", [({"avx2", "avx512f", "avx512_vnni"}, "vnni"), ({"avx2", "avx_vnni"}, "vnni"),
                                           ({"avx2", "amx_int8"}, "vnni"), ({"avx2", "fma"}, "avx2"),
                                           ({"avx2", "avx512f"}, "avx2"), (set(), "vnni")])
def test_the_int8_target_follows_the_cpus_instructions(monkeypatch, flags, target):
    import onnx_reader

    monkeypatch.setattr(onnx_reader, "cpu_flags", lambda: flags)
    assert onnx_reader.cpu_int8_target() == target


def test_settings_written_before_the_quantization_record_still_read(exports, tmp_path):
    import onnx_reader

    raw = json.loads((exports["split"] / "onnx_reader.json").read_text(encoding="utf-8"))
    del raw["quantization"]
    (tmp_path / "onnx_reader.json").write_text(json.dumps(raw))
    assert onnx_reader.read_settings(tmp_path).quantization == {}
    (tmp_path / "onnx_reader.json").write_text(json.dumps({**raw, "quantization": {"for": 3}}))
    with pytest.raises(onnx_reader.OnnxExportError, match='"quantization" must be an object of strings'):
        onnx_reader.read_settings(tmp_path)


def test_int8_for_without_quantize_is_one_line(v2_run, tmp_path, capsys):
    import export

    _, run = v2_run
    with pytest.raises(SystemExit) as refused:
        export.main(export_flags(run, tmp_path / "out", "--int8_for", "avx2"))
    assert refused.value.code == 2 and "--int8_for needs --quantize int8" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- output directories over the checkpoint -------------------------------------------------------------

def test_export_refuses_to_write_over_its_checkpoint_before_any_work(v2_run, exports, tmp_path, monkeypatch):
    import export
    from cli import UsageError

    _, run = v2_run
    checkpoint = run / "korquad_1.bin"
    original = checkpoint.read_bytes()
    link = tmp_path / "link_to_run"
    link.symlink_to(run)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")
    monkeypatch.setattr(export, "load_finetuned", no_model)
    cases = [
        (run, run, "is the directory of --checkpoint"),
        (run, link, "is the directory of --checkpoint"),
        (checkpoint, run, "is the directory of --checkpoint"),
        (run, checkpoint, "exists and is not a directory"),
        (exports["plain"], exports["plain"], "is an ONNX export already"),
    ]
    for source, output_dir, message in cases:
        with pytest.raises(UsageError, match=message):
            export.main(export_flags(source, output_dir))
    assert checkpoint.read_bytes() == original
    assert not any(p.name.endswith(".onnx") for p in run.iterdir())


def test_a_pretrain_checkpoint_as_onnx_is_one_line_and_leaves_no_directory(tmp_path):
    from modeling import BertForPreTraining, Config

    torch.manual_seed(5)
    torch.save(BertForPreTraining(Config(**TINY_CONFIG)).state_dict(), tmp_path / "pretrain_1.bin")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "new" / "onnx"
    result = run_in_process("export.py", *export_flags(tmp_path / "pretrain_1.bin", out, "--vocab_file",
                                                       str(VOCAB_FILE), "--model_config", str(tmp_path / "tiny.json")))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "is a pretrain.py checkpoint without a question-answering head" in result.stderr
    assert not (tmp_path / "new").exists()


def test_export_refuses_a_directory_holding_the_other_formats_export_before_writing(v2_run, exports, tmp_path):
    """A transformers model and an ONNX export in one directory would share (and replace) one vocab.txt, and
    readers would pick either model: each format refuses the other's directory, leaving it as it was."""
    import export
    from cli import UsageError

    _, run = v2_run
    transformers_dir = tmp_path / "transformers"
    export.main(["--checkpoint", str(run), "--output_dir", str(transformers_dir), "--quiet"])
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(exports["plain"], onnx_dir)
    cases = [(export_flags(run, transformers_dir), transformers_dir,
              rf"^--output_dir {transformers_dir} holds a transformers export \(config.json, model.safetensors\); "
              r"--format onnx there would replace its vocab.txt"),
             (["--checkpoint", str(run), "--output_dir", str(onnx_dir), "--quiet"], onnx_dir,
              rf"^--output_dir {onnx_dir} holds an ONNX export \(model.onnx, onnx_reader.json\); "
              r"--format transformers there would replace its vocab.txt")]
    for flags, directory, message in cases:
        before = {path.name: path.read_bytes() for path in directory.iterdir()}
        with pytest.raises(UsageError, match=message):
            export.main(flags)
        assert {path.name: path.read_bytes() for path in directory.iterdir()} == before


def test_submit_through_the_export_abstains_by_the_recorded_threshold(v2_run, exports, tmp_path, capsys):
    """submit.py on a v2 export answers as eval.py does with the baseline's windows: "" where the
    recorded threshold says so, unless --null_score_diff_threshold replaces it."""
    import submit

    data, _ = v2_run
    baseline = [flag for flag in submit.BASELINE_FLAGS if not flag.startswith("--train_batch_size")]
    expected = eval_outputs(exports["split"], data, tmp_path / "eval", capsys, *baseline)[1]
    assert "" in expected.values() and set(expected.values()) != {""}
    submit.main([str(data), str(tmp_path / "out.json"), f"--checkpoint={exports['split']}", "--quiet"])
    assert json.loads((tmp_path / "out.json").read_text(encoding="utf-8")) == expected
    submit.main([str(data), str(tmp_path / "zero.json"), f"--checkpoint={exports['split']}", "--quiet",
                 "--null_score_diff_threshold=0"])
    plain = eval_outputs(exports["split"], data, tmp_path / "eval0", capsys, *baseline,
                         "--null_score_diff_threshold=0")[1]
    assert json.loads((tmp_path / "zero.json").read_text(encoding="utf-8")) == plain != expected


def test_eval_on_an_onnx_export_without_onnxruntime_is_one_line_and_makes_no_output_dir(exports, tmp_path,
                                                                                      monkeypatch):
    import importlib.util

    import eval as eval_script
    import onnx_reader

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "onnxruntime" else find_spec(name, *rest))
    with pytest.raises(onnx_reader.OnnxExportError, match=r"^eval\.py on an ONNX export needs ONNX Runtime: pip "):
        eval_script.main(["--checkpoint", str(exports["plain"]), f"--predict_file={SAMPLE_FILE}",
                          f"--output_dir={tmp_path / 'out'}", "--quiet"])
    assert not (tmp_path / "out").exists()

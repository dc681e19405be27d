"""Hardening 3 (issue 23): text, config, input and output edge cases a careless or hostile user hits."""
from __future__ import annotations

import json
import math

import pytest

from conftest import TINY_CONFIG, VOCAB_FILE
from modeling import Config, ConfigError, config_from_transformers
from tokenization import BertTokenizer


@pytest.fixture(scope="module")
def mecab_tokenizer() -> BertTokenizer:
    return BertTokenizer(VOCAB_FILE, analyzer="mecab")


TEXT = "솔매골은 강원도 산간 지역이다. 1950년대 KBS가 방송했다."


@pytest.mark.parametrize("prefix", [" ", "\n", "\ufeff", "\u200b", " \n\u3000"])
def test_a_text_starting_with_a_separator_gives_the_clean_texts_pieces_shifted(mecab_tokenizer, prefix):
    clean = mecab_tokenizer.tokenize_with_offsets(TEXT)
    shifted = [(piece, start + len(prefix), end + len(prefix)) for piece, start, end in clean]
    assert mecab_tokenizer.tokenize_with_offsets(prefix + TEXT) == shifted
    assert mecab_tokenizer.tokenize_with_offsets(TEXT + prefix) == clean


def test_mecab_spans_of_a_long_text_are_the_lattices_own(mecab_tokenizer):
    """The one-pass span reader gives what the lattice iterator gives where that one is right."""
    from mecab.utils import create_lattice

    analyzer = mecab_tokenizer._analyzer
    text = (TEXT + " 이순신은 조선 중기의 무신이었다.  😀 Ⅻ ﬁ") * 50
    lattice = create_lattice(text)
    assert analyzer._mecab._tagger.parse(lattice)
    assert analyzer.spans(text) == [tuple(span) for span, _node in lattice]


BAD_VALUES = [("num_heads", 0), ("hidden_size", -64), ("ff_dim", -1), ("vocab_size", 0),
              ("dropout_prob", 1.5), ("dropout_prob", math.nan), ("type_vocab_size", 0),
              ("initializer_range", -0.1), ("initializer_range", math.nan), ("act_fn", ["gelu"]),
              ("num_hidden_layers", -1), ("num_hidden_layers", 0), ("layer_norm_eps", math.nan),
              ("layer_norm_eps", 0.0), ("max_position_embeddings", -1), ("embedding_size", 0),
              ("model_type", ["bert"]), ("hidden_size", 64.5)]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_our_config_refuses_a_bad_value_naming_file_and_key(tmp_path, key, value):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**TINY_CONFIG, key: value}))  # json writes NaN as NaN, which json reads
    with pytest.raises(ConfigError, match=rf"^{path}: key '{key}' must be .*, got") as error:
        Config.from_json_file(path)
    assert "\n" not in str(error.value)


TRANSFORMERS_BAD = [("num_attention_heads", 0), ("hidden_size", -64), ("intermediate_size", -1),
                    ("hidden_dropout_prob", 1.5), ("attention_probs_dropout_prob", math.nan),
                    ("type_vocab_size", 0), ("initializer_range", -1.0), ("initializer_range", math.nan),
                    ("hidden_act", ["gelu"]), ("num_hidden_layers", -1), ("layer_norm_eps", math.nan)]


@pytest.mark.parametrize("key, value", TRANSFORMERS_BAD)
def test_transformers_config_refuses_a_bad_value_naming_its_own_key(key, value):
    good = {"model_type": "bert", "vocab_size": 32000, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "hidden_act": "gelu"}
    config_from_transformers(good, "hf/config.json")
    with pytest.raises(ConfigError, match=rf"^hf/config.json: (key '{key}' must be|{key} .* is not supported)"):
        config_from_transformers({**good, key: value}, "hf/config.json")


# --- run directories, export, eval -----------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run directory as train.py leaves it (random weights: only shapes and files matter)."""
    import shutil

    import torch

    from modeling import QuestionAnswering

    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps({**TINY_CONFIG, "layer_norm_eps": 1e-5}))
    (run / "training_args.json").write_text(json.dumps({"vocab_file": str(VOCAB_FILE), "analyzer": "mecab",
                                                        "do_lower_case": False}))
    shutil.copy(VOCAB_FILE, run / "vocab.txt")
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**{**TINY_CONFIG, "layer_norm_eps": 1e-5})).state_dict(),
               run / "korquad_0.bin")
    return run


def _export(run_dir, output_dir, *flags: str):
    import export

    export.main([f"--checkpoint={run_dir / 'korquad_0.bin'}", f"--output_dir={output_dir}", "--quiet", *flags])


def test_export_refuses_the_runs_own_directory_and_its_source_model(run_dir, tmp_path):
    from cli import UsageError

    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    with pytest.raises(UsageError, match=r"--output_dir .* is the directory of --checkpoint"):
        _export(run_dir, run_dir)
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    (other_run / "korquad_3.bin").write_bytes(b"weights")
    with pytest.raises(UsageError, match=r"--output_dir .*other_run holds a training run \(korquad_3.bin\)"):
        _export(run_dir, other_run)
    _export(run_dir, tmp_path / "hf")
    import export
    with pytest.raises(UsageError, match="is the directory of --checkpoint"):  # the export as a source
        export.main([f"--checkpoint={tmp_path / 'hf'}", f"--output_dir={tmp_path / 'hf'}", "--quiet"])
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before


def test_export_refuses_an_unknown_analyzer(run_dir, tmp_path):
    from cli import UsageError

    with pytest.raises(UsageError, match=r"--analyzer 'bogus' .* is not one of mecab, "):
        _export(run_dir, tmp_path / "hf", "--analyzer=bogus")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def _full_disk_on(monkeypatch, name_part: str) -> None:
    """Every fsync of a temporary file whose name holds `name_part` fails as a full disk does."""
    import errno
    import os

    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if name_part in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_a_full_disk_leaves_a_previous_export_whole_and_names_the_file(run_dir, tmp_path, monkeypatch):
    _export(run_dir, tmp_path / "hf", "--analyzer=none")
    before = {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()}
    _full_disk_on(monkeypatch, "model.safetensors")
    with pytest.raises(OSError, match="No space left on device") as error:
        _export(run_dir, tmp_path / "hf")   # analyzer mecab this time
    assert error.value.filename == str(tmp_path / "hf" / "model.safetensors")
    assert {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()} == before  # no temp files either


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_a_full_disk_writes_neither_prediction_file_and_names_the_one_it_failed_on(tmp_path, monkeypatch):
    from korquad_utils import write_predictions

    write_predictions({"q": "old"}, {"q": []}, tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    _full_disk_on(monkeypatch, "nbest_predictions.json")
    with pytest.raises(OSError) as error:
        write_predictions({"q": "new"}, {"q": [{"text": "new"}]}, tmp_path)
    assert error.value.filename == str(tmp_path / "nbest_predictions.json")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_sharded_transformers_weights_are_named(tmp_path):
    from modeling import CheckpointError, read_transformers_dir

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": 32000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"sharded weights \(model.safetensors.index.json\) are not supported"):
        read_transformers_dir(tmp_path)


def test_export_keeps_layer_norm_eps_and_a_cased_runs_casing(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from modeling import read_transformers_dir

    _export(run_dir, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["layer_norm_eps"] == 1e-5
    assert read_transformers_dir(tmp_path / "hf")[0].layer_norm_eps == 1e-5
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs.tokenize("Seoul KBS") == BertTokenizer(VOCAB_FILE, "none", do_lower_case=False).tokenize(
        "Seoul KBS") != BertTokenizer(VOCAB_FILE, "none").tokenize("Seoul KBS")
    assert transformers.AutoConfig.from_pretrained(str(tmp_path / "hf")).layer_norm_eps == 1e-5


# --- predict.py and eval.py input ------------------------------------------------------------

WINDOW_FLAGS = ["--max_seq_length=128", "--doc_stride=64", "--max_query_length=32", "--no_cuda", "--quiet"]
CONTEXT = "세종대왕은 조선의 제4대 왕이다. 훈민정음을 1443년에 창제하였고 1446년에 반포하였다."


def _predict(monkeypatch, capsys, stdin: bytes, *flags: str) -> tuple[int, list[dict], list[str]]:
    """predict.main in this process on `stdin`: exit status, answers, stderr lines."""
    import io
    import sys

    import predict

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    status = 0
    try:
        predict.main([*flags, *WINDOW_FLAGS])
    except SystemExit as exit_:
        status = 1 if exit_.code else 0
    captured = capsys.readouterr()
    return status, [json.loads(line) for line in captured.out.split("\n") if line], captured.err.splitlines()


def _line(**record) -> str:
    return json.dumps(record, ensure_ascii=False)


def test_json_lines_are_split_on_newlines_only(run_dir, monkeypatch, capsys):
    lines = [_line(id="a", question="언제 창제되었나?", context=CONTEXT.replace(" ", "\u2028", 1)),
             "not JSON", _line(id="c", question="누가?", context="\u2029" + CONTEXT + "\x85")]
    status, answers, errors = _predict(monkeypatch, capsys, "\n".join(lines).encode(),
                                       f"--checkpoint={run_dir}", "--input=-")
    assert [answer["id"] for answer in answers] == ["a", "c"]
    assert errors[0].startswith("predict.py: input line 2: not JSON") and status == 1


def test_a_lone_surrogate_in_an_id_fails_that_question_only(run_dir, monkeypatch, capsys):
    lines = ['{"id": "bad\\ud800", "question": "누가?", "context": "세종대왕이 만들었다."}',
             _line(id="ok", question="누가?", context=CONTEXT)]
    status, answers, errors = _predict(monkeypatch, capsys, "\n".join(lines).encode(),
                                       f"--checkpoint={run_dir}", "--input=-")
    assert [answer["id"] for answer in answers] == ["ok"]
    assert errors[0] == 'predict.py: input line 1: "id" holds a lone surrogate (not Unicode text)'
    assert status == 1 and len(errors) == 1


def test_a_malformed_korquad_document_on_stdin_is_named_stdin(run_dir, monkeypatch, capsys):
    from korquad_utils import KorquadFormatError

    document = {"version": "1", "data": [{"title": "t", "paragraphs": [{"context": 5, "qas": []}]}]}
    with pytest.raises(KorquadFormatError, match=r"^stdin: article 0 paragraph 0: 'context' must be str"):
        _predict(monkeypatch, capsys, json.dumps(document).encode(), f"--checkpoint={run_dir}", "--input=-")


def test_invalid_utf8_is_refused_on_stdin_as_from_a_file(run_dir, monkeypatch, capsys, tmp_path):
    from cli import UsageError

    data = _line(question="누가?", context=CONTEXT).encode()[:-5] + b"\xff\xfe" + b'"}\n'
    (tmp_path / "in.jsonl").write_bytes(data)
    for source, name in (("-", "stdin"), (str(tmp_path / "in.jsonl"), str(tmp_path / "in.jsonl"))):
        with pytest.raises(UsageError, match=rf"^--input {name}: not UTF-8 text"):
            _predict(monkeypatch, capsys, data, f"--checkpoint={run_dir}", f"--input={source}")


def test_interactive_skips_a_question_line_that_is_not_utf8_and_answers_the_rest(run_dir):
    """Real stdin in a fresh process, decoded strictly as on a UTF-8 desktop locale: one line naming
    stdin and the line, the other questions answered, exit status 1, no traceback."""
    import subprocess
    import sys

    from conftest import ROOT

    stdin = CONTEXT.encode() + "\n언제 창제되었나?\n수도".encode() + b"\xff?\n" + "누가?\n".encode()
    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"--checkpoint={run_dir}", "--interactive",
                             *WINDOW_FLAGS], input=stdin, capture_output=True, cwd=ROOT, timeout=120,
                            env={**__import__("os").environ, "PYTHONIOENCODING": "utf-8:strict"})
    answers = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.stderr.decode().splitlines() == [
        "predict.py: stdin line 3: not UTF-8 text (byte 6 of the line)",
        "predict.py: 1 question(s) could not be answered (see the lines above)"]
    assert len(answers) == 2 and result.returncode == 1
    assert all(CONTEXT[answer["start"]:answer["end"]] == answer["answer"] for answer in answers)


def test_interactive_refuses_a_context_line_that_is_not_utf8(run_dir, monkeypatch, capsys):
    from cli import UsageError

    stdin = "\n".encode() + CONTEXT.encode()[:6] + b"\xc0\xaf" + "\n누가?\n".encode()
    with pytest.raises(UsageError, match=r"^--interactive: stdin line 2 \(the context\): not UTF-8 text "
                                         r"\(byte 6 of the line\)$"):
        _predict(monkeypatch, capsys, stdin, f"--checkpoint={run_dir}", "--interactive")
    assert capsys.readouterr().out == ""


def test_interactive_odd_text_gets_the_answers_of_clean_text(run_dir, monkeypatch, capsys):
    """A BOM opening stdin, CRLF line ends, NFD Hangul, ideographic / no-break / zero-width spaces:
    the answers (and probabilities) of the clean lines, with offsets into the text as typed."""
    import unicodedata

    questions = ["훈민정음은 언제 창제되었나?", "누가 반포하였나?"]

    def session(context: str, *question_lines: str, before: str = "", end: str = "\n") -> list[dict]:
        stdin = before + context + end + "".join(question + end for question in question_lines)
        status, answers, errors = _predict(monkeypatch, capsys, stdin.encode(), f"--checkpoint={run_dir}",
                                           "--interactive")
        assert status == 0 and errors == [] and len(answers) == len(question_lines)
        return answers

    clean = session(CONTEXT, *questions)
    odd_questions = [variant for question in questions for variant in (
        unicodedata.normalize("NFD", question), question.replace(" ", "\u3000"),
        "\u200b" + question.replace(" ", "\u00a0"), "\ufeff" + question)]
    for answer, expected in zip(session(CONTEXT, *odd_questions, before="\ufeff", end="\r\n"),
                                [answer for answer in clean for _ in range(4)]):
        assert answer == expected
    odd_spaces = CONTEXT.replace(" ", "\u3000", 2).replace(" ", "\u00a0")   # swapped one for one
    for answer, expected in zip(session(odd_spaces, *questions, before="\ufeff"), clean):
        assert {**answer, "answer": answer["answer"].replace("\u3000", " ").replace("\u00a0", " ")} == expected
        assert answer["answer"] == odd_spaces[answer["start"]:answer["end"]]
    decomposed = unicodedata.normalize("NFD", CONTEXT)
    for answer, expected in zip(session(decomposed, *questions, end="\r\n"), clean):
        start, end = (len(unicodedata.normalize("NFD", CONTEXT[:offset])) for offset in (expected["start"],
                                                                                           expected["end"]))
        assert (answer["answer"], answer["start"], answer["end"]) == (decomposed[start:end], start, end)
        assert answer["probability"] == pytest.approx(expected["probability"], abs=1e-6)


def test_an_output_symlink_is_written_through_to_its_target(run_dir, monkeypatch, capsys, tmp_path):
    target = tmp_path / "answers" / "latest.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(target)
    status, _, _ = _predict(monkeypatch, capsys, (_line(id=1, question="누가?", context=CONTEXT) + "\n").encode(),
                            f"--checkpoint={run_dir}", "--input=-", f"--output={link}")
    assert status == 0 and link.is_symlink() and link.resolve() == target
    assert json.loads(target.read_text())["id"] == 1
    assert sorted(path.name for path in target.parent.iterdir()) == ["latest.jsonl"]


@pytest.fixture(scope="module")
def reader(run_dir):
    from predict import Reader

    return Reader.load(run_dir, no_cuda=True, max_seq_length=128, doc_stride=64, max_query_length=32,
                       n_best_size=3)


@pytest.mark.parametrize("before, after", [("  ", " \n"), ("\n\t", ""), ("\ufeff", "\ufeff"), ("\ufeff ", "")])
def test_leading_and_trailing_whitespace_and_a_bom_shift_the_answer_only(reader, before, after):
    clean = reader("훈민정음은 언제 창제되었나?", CONTEXT, top_k=3)
    padded = reader(before + "훈민정음은 언제 창제되었나?" + after, before + CONTEXT + after, top_k=3)
    shift = len(before)
    for ours, theirs in zip([clean, *clean["answers"]], [padded, *padded["answers"]]):
        assert (theirs["answer"], theirs["start"], theirs["end"]) == (ours["answer"], ours["start"] + shift,
                                                                       ours["end"] + shift)
        assert theirs["probability"] == pytest.approx(ours["probability"], abs=1e-6)


def test_top_k_larger_than_n_best_size_lists_top_k_answers(reader):
    answer = reader("훈민정음은 언제 창제되었나?", CONTEXT, top_k=8)
    assert reader.n_best_size == 3 and len(answer["answers"]) == 8
    assert [entry["probability"] for entry in answer["answers"]] == sorted(
        (entry["probability"] for entry in answer["answers"]), reverse=True)
    assert answer["answers"][0]["answer"] == answer["answer"]


def _korquad_file(path, questions: list[tuple[str, str]]) -> None:
    """A KorQuAD file of `CONTEXT` with (id, question) pairs, each answered by 1443년."""
    start = CONTEXT.index("1443년")
    qas = [{"id": qas_id, "question": question, "answers": [{"text": "1443년", "answer_start": start}]}
           for qas_id, question in questions]
    path.write_text(json.dumps({"version": "KorQuAD_v1.0", "data": [
        {"title": "t", "paragraphs": [{"context": CONTEXT, "qas": qas}]}]}), encoding="utf-8")


def test_eval_leaves_out_a_question_whose_id_is_a_lone_surrogate(run_dir, tmp_path, capfd):
    import eval as evaluate_script

    _korquad_file(tmp_path / "dev.json", [("bad\ud800", "언제?"), ("ok", "훈민정음은 언제 창제되었나?")])
    with pytest.raises(SystemExit, match=r"1 question\(s\) left out"):
        evaluate_script.main([f"--checkpoint={run_dir}", f"--predict_file={tmp_path / 'dev.json'}",
                              f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}",
                              *WINDOW_FLAGS])
    out, err = capfd.readouterr()
    assert set(json.loads((tmp_path / "out" / "predictions.json").read_text())) == {"ok"}
    assert set(json.loads((tmp_path / "out" / "nbest_predictions.json").read_text())) == {"ok"}
    assert "lone surrogate" in err and set(json.loads(out.splitlines()[-1])) == {"exact_match", "f1"}


def test_a_hub_endpoint_that_never_answers_fails_in_bounded_time(tmp_path):
    """An endpoint that accepts the connection and then says nothing: one line, within seconds."""
    import socket
    import subprocess
    import sys
    import time

    from conftest import ROOT

    pytest.importorskip("huggingface_hub")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)   # accepted by the kernel; never read, never answered
        port = server.getsockname()[1]
        script = ("import checkpoints, sys; checkpoints.HUB_STALL_SECONDS = 1\n"
                  "try:\n    checkpoints.fetch_hub_model('someone/silent-model')\n"
                  "except checkpoints.UsageError as error:\n    sys.exit(str(error))\n")
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={**__import__("os").environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}",
                                     "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"})
    assert time.monotonic() - started < 30
    assert result.returncode == 1
    assert result.stderr.strip().startswith("--checkpoint someone/silent-model: the model hub "
                                            f"(http://127.0.0.1:{port}) sent nothing for 1 s")


# --- ensembles -------------------------------------------------------------------------------

def _copy_run(run_dir, path, seed: int, config: dict | None = None, **training_args):
    """Another run beside `run_dir`: its own weights, optionally its own config and training args."""
    import shutil

    import torch

    from modeling import QuestionAnswering

    shutil.copytree(run_dir, path)
    saved = {**json.loads((run_dir / "training_args.json").read_text()), **training_args}
    (path / "training_args.json").write_text(json.dumps(saved))
    config = config or json.loads((run_dir / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    torch.save(QuestionAnswering(Config(**config)).state_dict(), path / "korquad_0.bin")
    return path


@pytest.mark.parametrize("change, message", [
    (dict(analyzer="none"), "analyzer 'none' (vs 'mecab')"),
    (dict(do_lower_case=True), "do_lower_case True (vs False)"),
    (dict(config={**TINY_CONFIG, "layer_norm_eps": 1e-5, "num_hidden_layers": 3}), "num_hidden_layers 3 (vs 2)"),
])
def test_ensemble_members_that_do_not_match_are_refused_before_any_work(run_dir, tmp_path, change, message,
                                                                        monkeypatch):
    import cli
    import scoring
    import eval as evaluate_script

    other = _copy_run(run_dir, tmp_path / "other", 1, **change)
    monkeypatch.setattr(scoring, "predict_logits", lambda *a, **k: pytest.fail("inference ran"))
    _korquad_file(tmp_path / "dev.json", [("q", "언제?")])
    flags = [f"--predict_file={tmp_path / 'dev.json'}", f"--output_dir={tmp_path / 'out'}",
             f"--cache_dir={tmp_path / 'cache'}", *WINDOW_FLAGS]
    for members in ([run_dir, other], [other, run_dir]):  # refused in either order
        with pytest.raises(cli.UsageError, match=r"cannot join an ensemble with .*" + __import__("re").escape(
                message if members[0] == run_dir else message.split(" (vs")[0].split(" ")[0])):
            evaluate_script.main(["--checkpoint", *map(str, members), *flags])


def test_an_ensemble_member_of_other_shapes_is_refused_before_any_work(run_dir, tmp_path, monkeypatch):
    import torch

    import cli
    import scoring
    import eval as evaluate_script
    from modeling import CheckpointError, QuestionAnswering

    other = _copy_run(run_dir, tmp_path / "other", 1)
    torch.save(QuestionAnswering(Config(**{**TINY_CONFIG, "hidden_size": 32})).state_dict(), other / "korquad_0.bin")
    monkeypatch.setattr(scoring, "predict_logits", lambda *a, **k: pytest.fail("inference ran"))
    _korquad_file(tmp_path / "dev.json", [("q", "언제?")])
    with pytest.raises(CheckpointError, match=r"korquad_0.bin: shape mismatch"):
        evaluate_script.main(["--checkpoint", str(run_dir), str(other), f"--predict_file={tmp_path / 'dev.json'}",
                              f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}", *WINDOW_FLAGS])


def test_ensemble_nbest_logits_and_probabilities_are_the_members_mean(run_dir, tmp_path):
    import numpy as np
    import torch

    import eval as evaluate_script
    from checkpoints import build_tokenizer, load_finetuned
    from scoring import predict_logits
    from korquad_utils import decode_predictions, load_or_build_features

    other = _copy_run(run_dir, tmp_path / "other", 1)
    _korquad_file(tmp_path / "dev.json", [("q1", "훈민정음은 언제 창제되었나?"), ("q2", "누가 반포하였나?")])
    flags = [f"--predict_file={tmp_path / 'dev.json'}", f"--cache_dir={tmp_path / 'cache'}", *WINDOW_FLAGS]
    evaluate_script.main(["--checkpoint", str(run_dir), str(other), f"--output_dir={tmp_path / 'out'}",
                          "--n_best_size=5", *flags])
    ensemble = json.loads((tmp_path / "out" / "nbest_predictions.json").read_text())

    config = Config.from_json_file(run_dir / "config.json")
    tokenizer = build_tokenizer(VOCAB_FILE, "mecab", config, do_lower_case=False)
    examples, features = load_or_build_features(tmp_path / "dev.json", tokenizer, 128, 64, 32, is_training=False,
                                                cache_dir=tmp_path / "cache")
    members = [predict_logits(load_finetuned(run / "korquad_0.bin", config, torch.device("cpu")), features, 16,
                              torch.device("cpu"), show_progress=False) for run in (run_dir, other)]
    mean_starts = [(a + b) / 2 for a, b in zip(members[0][0], members[1][0])]
    mean_ends = [(a + b) / 2 for a, b in zip(members[0][1], members[1][1])]
    _, expected = decode_predictions(examples, features, mean_starts, mean_ends, n_best_size=5)
    assert set(ensemble) == {"q1", "q2"}
    for qas_id, entries in expected.items():
        assert [entry["text"] for entry in ensemble[qas_id]] == [entry["text"] for entry in entries]
        for key in ("start_logit", "end_logit", "probability"):
            assert np.allclose([entry[key] for entry in ensemble[qas_id]], [entry[key] for entry in entries],
                               atol=1e-5), key


# --- submit.py -------------------------------------------------------------------------------

def test_submit_writes_eval_predictions_in_the_leaderboard_form(run_dir, tmp_path, monkeypatch):
    import eval as evaluate_script
    import submit

    _korquad_file(tmp_path / "dev.json", [("q1", "훈민정음은 언제 창제되었나?"), ("q2", "누가 반포하였나?")])
    submit.main([str(tmp_path / "dev.json"), str(tmp_path / "submission.json"), f"--checkpoint={run_dir}",
                 "--quiet"])
    submitted = json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))
    assert not (tmp_path / "cache").exists()   # nothing left beside the input
    evaluate_script.main([f"--checkpoint={run_dir}", f"--predict_file={tmp_path / 'dev.json'}", "--no_cuda",
                          f"--output_dir={tmp_path / 'eval'}", *submit.BASELINE_FLAGS, "--quiet"])
    assert submitted == json.loads((tmp_path / "eval" / "predictions.json").read_text(encoding="utf-8"))
    assert set(submitted) == {"q1", "q2"}

    monkeypatch.setattr(submit, "DEFAULT_CHECKPOINT", tmp_path / "korquad_3.bin")   # the baseline's default
    from cli import UsageError
    with pytest.raises(UsageError, match=r"korquad_3.bin: file not found"):
        submit.main([str(tmp_path / "dev.json"), str(tmp_path / "other.json")])


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_a_full_disk_under_predict_output_names_the_file_and_keeps_the_old_one(run_dir, monkeypatch, capsys,
                                                                                tmp_path):
    output = tmp_path / "answers.jsonl"
    output.write_text("old\n")
    _full_disk_on(monkeypatch, "answers.jsonl")
    with pytest.raises(OSError, match="No space left on device") as error:
        _predict(monkeypatch, capsys, (_line(question="누가?", context=CONTEXT) + "\n").encode(),
                 f"--checkpoint={run_dir}", "--input=-", f"--output={output}")
    assert error.value.filename == str(output) and output.read_text() == "old\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["answers.jsonl"]


def test_answers_print_as_utf8_whatever_the_locale_of_stdout(run_dir):
    """A latin-1 (or ASCII) stdout cannot print Korean: the JSON lines still come out, as UTF-8."""
    import subprocess
    import sys

    from conftest import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "predict.py"), f"--checkpoint={run_dir}",
                             "--question", "언제 창제되었나?", "--context", CONTEXT, *WINDOW_FLAGS],
                            capture_output=True, cwd=ROOT, timeout=120,
                            env={**__import__("os").environ, "PYTHONIOENCODING": "latin-1"})
    assert result.returncode == 0 and result.stderr == b""
    answer = json.loads(result.stdout.decode("utf-8"))
    assert CONTEXT[answer["start"]:answer["end"]] == answer["answer"]


def test_zero_width_characters_inside_words_give_the_answers_of_the_text_without_them(reader):
    def marked(text: str) -> str:   # a zero-width space or word joiner after every fifth character
        return "".join(char + ("\u200b\u2060"[index % 2] if index % 5 == 4 else "") for index, char in
                       enumerate(text))

    question = "훈민정음은 언제 창제되었나?"
    clean, odd = reader(question, CONTEXT, top_k=3), reader(marked(question), marked(CONTEXT), top_k=3)
    for ours, theirs in zip([clean, *clean["answers"]], [odd, *odd["answers"]]):
        assert theirs["answer"].replace("\u200b", "").replace("\u2060", "") == ours["answer"]
        assert marked(CONTEXT)[theirs["start"]:theirs["end"]] == theirs["answer"]
        assert theirs["probability"] == pytest.approx(ours["probability"], abs=1e-6)


def test_numbers_strict_json_or_int_cannot_carry_fail_their_line_only(run_dir, monkeypatch, capsys):
    """NaN, ±Infinity and 1e999 would be echoed back as output no strict JSON parser reads (serve.py refuses
    them too); a whole number past int()'s digit limit is a ValueError json.loads does not turn into bad JSON."""
    lines = ['{"id": NaN, "question": "누가?", "context": "세종대왕이 만들었다."}',
             '{"id": [1, 1e999], "question": "누가?", "context": "세종대왕이 만들었다."}',
             '{"question": "누가?", "context": "세종대왕이 만들었다.", "extra": {"deep": -Infinity}}',
             '{"id": ' + "9" * 5000 + ', "question": "누가?", "context": "세종대왕이 만들었다."}',
             _line(id="ok", question="누가?", context=CONTEXT)]
    status, answers, errors = _predict(monkeypatch, capsys, "\n".join(lines).encode(),
                                       f"--checkpoint={run_dir}", "--input=-")
    assert errors == ['predict.py: input line 1: "id" holds NaN, which is not JSON',
                      'predict.py: input line 2: "id" holds 1e999, a number beyond the range of a double',
                      'predict.py: input line 3: "deep" holds -Infinity, which is not JSON',
                      "predict.py: input line 4: \"id\" holds a whole number of 5000 digits, more than the "
                      f"{__import__('sys').get_int_max_str_digits()} Python reads"]
    assert [answer["id"] for answer in answers] == ["ok"] and status == 1


def test_a_korquad_file_with_a_too_long_whole_number_is_refused_naming_the_file(run_dir, monkeypatch, capsys,
                                                                                 tmp_path):
    from squad_examples import KorquadFormatError, load_json_file

    document = tmp_path / "dev.json"
    document.write_text('{"version": "1", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": '
                        '"q", "question": "q", "answers": [{"text": "c", "answer_start": ' + "9" * 5000 + '}]}]}]}]}')
    message = rf"^{document}: not valid JSON \(a whole number of 5000 digits, more than the \d+ Python reads\)$"
    with pytest.raises(KorquadFormatError, match=message):
        load_json_file(document)   # eval.py's and train.py's reader
    with pytest.raises(KorquadFormatError, match=message):
        _predict(monkeypatch, capsys, b"", f"--checkpoint={run_dir}", f"--input={document}")

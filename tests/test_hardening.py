"""Hostile-user hardening (issue 13): decomposed Hangul, window ownership, empty answer lists, flags
checked before work, unreadable checkpoints, download flags, directories given as checkpoints,
byte-order marks, a very long context, --help of every entry point, and JSON nested too deeply."""
from __future__ import annotations

import argparse
import json
import pickle
import re
import tracemalloc
import unicodedata
from pathlib import Path

import pytest
import torch

import cli
import scoring
import download
import evaluate_v1_0
import korquad_utils as ku
from conftest import DATA_FLAGS, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, run_script
from modeling import CheckpointError, Config, QuestionAnswering, read_state_dict
from squad_examples import KorquadFormatError
from test_korquad_utils import WINDOW_SETTINGS, WORDS, WhitespaceTokenizer, _char_span, _qa, _write_squad
from tokenization import BertTokenizer, read_vocab_tokens


def _nfd_copy(source: Path, path: Path) -> Path:
    """The KorQuAD file `source` with every string decomposed (NFD), answer_start moved to match."""
    dataset = json.loads(source.read_text(encoding="utf-8"))
    for article in dataset["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            paragraph["context"] = unicodedata.normalize("NFD", context)
            for qa in paragraph["qas"]:
                qa["question"] = unicodedata.normalize("NFD", qa["question"])
                for answer in qa["answers"]:
                    answer["answer_start"] = len(unicodedata.normalize("NFD", context[:answer["answer_start"]]))
                    answer["text"] = unicodedata.normalize("NFD", answer["text"])
    path.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mecab_tokenizer() -> BertTokenizer:
    return BertTokenizer(str(VOCAB_FILE), analyzer="mecab")


# --- 1. decomposed (NFD) Hangul ---------------------------------------------------------------

def test_nfd_text_gives_the_pieces_of_nfc_text_with_offsets_into_itself(mecab_tokenizer):
    composed = "대한민국의 수도는 서울이다. Café İstanbul"
    decomposed = unicodedata.normalize("NFD", composed)
    assert len(decomposed) > len(composed)
    nfc_pieces = mecab_tokenizer.tokenize_with_offsets(composed)
    nfd_pieces = mecab_tokenizer.tokenize_with_offsets(decomposed)
    assert [piece for piece, _, _ in nfd_pieces] == [piece for piece, _, _ in nfc_pieces]
    assert "[UNK]" not in mecab_tokenizer.tokenize(unicodedata.normalize("NFD", "대한민국의 수도는 서울이다."))
    for (_, start, end), (_, nfc_start, nfc_end) in zip(nfd_pieces, nfc_pieces):
        assert unicodedata.normalize("NFC", decomposed[start:end]) == composed[nfc_start:nfc_end]


def test_nfd_and_nfc_samples_give_the_same_features_and_scores(mecab_tokenizer, tmp_path):
    nfd_file = _nfd_copy(SAMPLE_FILE, tmp_path / "sample_nfd.json")
    results = {}
    for name, path in (("nfc", SAMPLE_FILE), ("nfd", nfd_file)):
        examples = ku.read_squad_examples(path, is_training=True)
        features = ku.convert_examples_to_features(examples, mecab_tokenizer, 256, 128, 32, is_training=True,
                                                   progress=False)
        predictions, _ = ku.decode_predictions(examples, features, *ku.gold_logits(features))
        dataset = json.loads(path.read_text(encoding="utf-8"))
        results[name] = examples, features, predictions, evaluate_v1_0.evaluate(dataset, predictions)
    nfc_examples, nfc_features, _, nfc_scores = results["nfc"]
    nfd_examples, nfd_features, nfd_predictions, nfd_scores = results["nfd"]
    assert len(nfd_examples) == len(nfc_examples) == 56
    # Same model inputs and labels, so training and prediction are the same too.
    assert [(f.input_ids, f.start_position, f.end_position, f.token_is_max_context) for f in nfd_features] == \
           [(f.input_ids, f.start_position, f.end_position, f.token_is_max_context) for f in nfc_features]
    assert nfd_scores == nfc_scores and nfc_scores["exact_match"] > 90
    # The answers are slices of the user's own (decomposed) contexts.
    for example in nfd_examples:
        assert nfd_predictions[example.qas_id] in example.context_text


# --- 2 and 11. window ownership: the original rule, linear in the pieces -----------------------

def _original_owner(windows: list[tuple[int, int]], position: int) -> int:
    """Google BERT's _check_is_max_context, written out for one position."""
    best_score, best_window = None, None
    for index, (start, length) in enumerate(windows):
        end = start + length - 1
        if start <= position <= end:
            score = min(position - start, end - position) + 0.01 * length
            if best_score is None or score > best_score:
                best_score, best_window = score, index
    return best_window


def test_a_short_last_window_owns_what_the_original_rule_gives_it():
    windows = ku._doc_windows(500, 490, 128)
    assert windows == [(0, 490), (128, 372)]
    flags = ku._max_context_flags(windows, 500)
    # Position 309: 180 pieces of context in window 0 (+4.9), 181 in window 1 (+3.72): window 0 wins.
    assert flags[0][309] and not flags[1][309 - 128]


@pytest.mark.parametrize("num_pieces, window, stride", [(500, 490, 128), (1000, 413, 128), (37, 8, 3), (64, 10, 7)])
def test_max_context_flags_follow_the_original_rule_everywhere(num_pieces, window, stride):
    windows = ku._doc_windows(num_pieces, window, stride)
    flags = ku._max_context_flags(windows, num_pieces)
    for position in range(num_pieces):
        owners = [index for index, (start, length) in enumerate(windows)
                  if start <= position < start + length and flags[index][position - start]]
        assert owners == [_original_owner(windows, position)], position


def test_max_context_memory_is_linear_in_the_pieces():
    num_pieces = 80_000  # the old windows x pieces matrix took 381 MB here
    windows = ku._doc_windows(num_pieces, 413, 128)
    tracemalloc.start()
    try:
        ku._max_context_flags(windows, num_pieces)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * num_pieces  # a few arrays of one entry per piece, not windows x pieces


# --- 13. window edges: an answer ending at, just before and just past a window's last piece ----

@pytest.mark.parametrize("answer_words, first_window_positions", [
    (WORDS[4:7], (4 + 4, 4 + 6)),    # ends one piece before the edge of window 0 (w0..w7)
    (WORDS[5:8], (4 + 5, 4 + 7)),    # ends exactly on its last piece
    (WORDS[6:9], (0, 0)),            # ends one piece past it: not in window 0 (its end would be [SEP])
])
def test_answer_ending_at_a_window_edge(tmp_path, answer_words, first_window_positions):
    tokenizer = WhitespaceTokenizer(tmp_path / "vocab.txt")
    start, text = _char_span(answer_words)
    path = _write_squad(tmp_path / "edge.json", [{"context": " ".join(WORDS), "qas": [_qa("q", "q0 q1", text, start)]}])
    examples = ku.read_squad_examples(path, is_training=True)
    features = ku.convert_examples_to_features(examples, tokenizer, is_training=True, progress=False,
                                               **WINDOW_SETTINGS)
    assert (features[0].start_position, features[0].end_position) == first_window_positions
    for feature in features:
        if feature.start_position:
            assert feature.input_ids[feature.end_position] != tokenizer.sep_token_id
            offsets = feature.token_offsets
            assert examples[0].context_text[offsets[feature.start_position][0]:offsets[feature.end_position][1]] == text


# --- 3. questions with "answers": [] -------------------------------------------------------------

def test_questions_without_answers_are_left_out_of_the_score_with_a_count(capsys):
    dataset = [{"title": "t", "paragraphs": [{"context": "c", "qas": [
        {"id": "q1", "question": "?", "answers": [{"text": "서울", "answer_start": 0}]},
        {"id": "q2", "question": "?", "answers": []},
        {"id": "q3", "question": "?", "answers": [{"text": "부산", "answer_start": 0}]},
        {"id": "q4", "question": "?", "answers": []}]}]}]
    scores = evaluate_v1_0.evaluate(dataset, {"q1": "서울", "q2": "x", "q3": "광주", "q4": "y"})
    assert scores == {"exact_match": 50.0, "f1": 50.0}
    assert "2 question(s) with an empty 'answers' list were not scored" in capsys.readouterr().err


def test_eval_predicts_a_question_without_answers_and_scores_the_rest(tiny_setup, tmp_path, capsys):
    import eval as eval_cli

    dataset = json.loads((tiny_setup / "train.json").read_text(encoding="utf-8"))
    emptied = dataset["data"][0]["paragraphs"][0]["qas"][0]
    emptied["answers"] = []
    predict_file = tmp_path / "predict.json"
    predict_file.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), tmp_path / "model.bin")
    eval_cli.main([f"--checkpoint={tmp_path / 'model.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
                   f"--output_dir={tmp_path / 'out'}", f"--predict_file={predict_file}", *DATA_FLAGS,
                   "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}"])
    captured = capsys.readouterr()
    assert set(json.loads(captured.out.strip().splitlines()[-1])) == {"exact_match", "f1"}
    assert "1 question(s) with an empty 'answers' list" in captured.err
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))
    assert emptied["id"] in predictions and len(predictions) == 24


def test_eval_refuses_a_file_where_only_some_questions_lack_answers_before_predicting(tiny_setup, tmp_path):
    import eval as eval_cli

    dataset = json.loads((tiny_setup / "train.json").read_text(encoding="utf-8"))
    questions = [qa for paragraph in dataset["data"][0]["paragraphs"] for qa in paragraph["qas"]]
    del questions[1]["answers"]
    predict_file = tmp_path / "predict.json"
    predict_file.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), tmp_path / "model.bin")
    with pytest.raises(KorquadFormatError, match=rf"^{re.escape(str(predict_file))}: question {questions[1]['id']}: "
                                                 r"no 'answers' list, though other questions have answers"):
        eval_cli.main([f"--checkpoint={tmp_path / 'model.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
                       f"--output_dir={tmp_path / 'out'}", f"--predict_file={predict_file}", *DATA_FLAGS,
                       "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}"])
    assert not (tmp_path / "out").exists()  # refused before the output directory, let alone predictions
    for qa in questions:  # none with answers: a test set, predicted and not scored
        qa.pop("answers", None)
    scoring.check_answers_everywhere(dataset, "test.json")


# --- 4. flags checked before any work --------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--learning_rate", "nan"), ("--learning_rate", "0"), ("--num_train_epochs", "nan"),
    ("--num_train_epochs", "inf"), ("--warmup_proportion", "nan"), ("--adam_epsilon", "-1e-6"),
    ("--max_grad_norm", "inf"), ("--weight_decay", "nan"), ("--n_best_size", "0"), ("--eval_batch_size", "0"),
    ("--preprocess_workers", "0"), ("--doc_stride", "-5"), ("--seed", "-1"), ("--seed", str(2**32)),
    ("--seed", "1e3"), ("--learning_rate", "1e300"), ("--learning_rate", "1e4"), ("--distill_temperature", "1e300"),
    ("--distill_temperature", "1e20"), ("--distill_temperature", "1e-300"),
])
def test_train_refuses_bad_numbers_while_reading_its_flags(flag, value, capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("value, says", [("-1", "must be at least 0, got -1"),
                                         (str(10**23), f"must be at most {2**32 - 1}, got {10**23}")])
def test_pretrain_refuses_a_seed_numpy_cannot_take_while_reading_its_flags(value, says, capsys):
    import pretrain

    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--train_files=corpus.txt", "--output_dir=out", f"--seed={value}"])
    assert exit_info.value.code == 2
    assert f"argument --seed: {says}" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("low, high, says", [(-float("inf"), float("inf"), "expected a finite number, got 'nan'"),
                                             (0.0, 1.0, "expected a finite number >= 0 and <= 1, got 'nan'")])
def test_finite_float_says_its_bounds_without_a_stray_space(low, high, says):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(says)}$"):
        cli.finite_float(low, high)("nan")


@pytest.mark.parametrize("flag, value", [("--n_best_size", "0"), ("--train_batch_size", "-1"),
                                         ("--max_answer_length", "0")])
def test_eval_refuses_bad_numbers_while_reading_its_flags(flag, value, capsys):
    import eval as eval_cli

    with pytest.raises(SystemExit):
        eval_cli.parse_args(["--checkpoint", "x.bin", flag, value])
    assert flag in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc for a directory nobody can write")
def test_an_output_dir_that_cannot_be_written_is_found_before_any_work():
    # /proc/self refuses new files even to root, who passes every permission check elsewhere.
    with pytest.raises(cli.UsageError, match=r"--output_dir /proc/self: cannot write there"):
        cli.prepare_output_dir("/proc/self")


def test_prepare_output_dir_leaves_nothing_behind(tmp_path):
    assert cli.prepare_output_dir(str(tmp_path / "new" / "dir")) == tmp_path / "new" / "dir"
    assert list((tmp_path / "new" / "dir").iterdir()) == []


# --- 6. corrupt, foreign and empty checkpoint files ------------------------------------------------

class Foreign:
    """Something that is not a tensor."""


def _write_bad_checkpoints(root: Path) -> dict[str, Path]:
    good = root / "good.bin"
    torch.save({"weight": torch.zeros(64)}, good)
    files = {name: root / f"{name}.bin" for name in ("empty", "text", "pickle", "truncated")}
    files["empty"].write_bytes(b"")
    files["text"].write_text("not a checkpoint\n")
    files["pickle"].write_bytes(pickle.dumps(Foreign(), protocol=2))
    files["truncated"].write_bytes(good.read_bytes()[:200])
    files["directory"] = root
    return files


@pytest.mark.parametrize("name, says", [
    ("empty", "empty (0-byte) file"), ("text", "is not a PyTorch checkpoint"),
    ("pickle", "objects other than tensors"), ("truncated", "not a complete PyTorch checkpoint"),
    ("directory", "is a directory"),
])
def test_unreadable_checkpoints_say_what_the_file_is_not(tmp_path, name, says):
    path = _write_bad_checkpoints(tmp_path)[name]
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message
    assert "weights_only" not in message  # torch's advice to unpickle anyway is wrong here


# --- 7. download.py flags ------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragment", [
    (["--timeout", "-1"], "--timeout"), (["--timeout", "nan"], "--timeout"), (["--timeout", "0"], "--timeout"),
    (["--data_dir", str(SAMPLE_FILE)], "is not a directory"),
    (["--base_url", "notaurl"], "argument --base_url: expected an http(s):// or file:// URL, got 'notaurl'"),
    pytest.param(["--data_dir", "/proc/x"], "--data_dir /proc/x: cannot create it",
                 marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")),
])
def test_download_refuses_bad_flags_in_one_line(flags, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--base_url", "http://127.0.0.1:9/none", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err.splitlines()[-1] and err.count("error:") == 1 and "[Errno" not in err


@pytest.mark.parametrize("flag, says", [
    ("--steps=-1", "argument --steps: must be at least 3, got -1"),
    ("--seeds=0", "argument --seeds: must be at least 1, got 0"),
    ("--batch_sizes=a,b", "argument --batch_sizes: expected comma-separated whole numbers, got 'a,b'"),
    ("--batch_sizes=16,0", "argument --batch_sizes: every batch size must be at least 1, got '16,0'"),
])
def test_bench_refuses_bad_pretrain_reference_flags_before_any_row_runs(flag, says, capsys):
    import bench

    with pytest.raises(SystemExit) as exit_info:  # a row that ran would print its provenance first
        bench.main([flag, "--only=max_context"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert len(captured.err.splitlines()) == 1 and says in captured.err


# --- 8. a directory given as --checkpoint ----------------------------------------------------------

def test_eval_checkpoint_directory_without_a_model_says_what_to_pass(tmp_path):
    import eval as eval_cli

    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(cli.UsageError) as error:
        eval_cli.main([f"--checkpoint={tmp_path}", f"--output_dir={tmp_path / 'out'}", "--no_cuda", "--quiet"])
    assert "without any korquad_N.bin" in str(error.value)
    assert "transformers model directory" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_train_checkpoint_that_is_a_directory_says_so(tmp_path):
    import train

    with pytest.raises(cli.UsageError, match="is a directory, not a checkpoint file"):
        train.parse_args([f"--checkpoint={tmp_path}"])


# --- 9. a UTF-8 byte-order mark (Windows Notepad) --------------------------------------------------

def _with_bom(source: Path, path: Path) -> Path:
    path.write_bytes(b"\xef\xbb\xbf" + source.read_bytes())
    return path


def test_transformers_dir_json_files_may_carry_a_bom(tmp_path):
    from modeling import is_transformers_dir, read_transformers_config
    from tokenization import read_do_lower_case

    config = {"model_type": "bert", "num_attention_heads": 2, "hidden_size": 8}
    (tmp_path / "config.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(config).encode("utf-8"))
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xef\xbb\xbf" + b'{"do_lower_case": false}')
    assert is_transformers_dir(tmp_path) and read_transformers_config(tmp_path) == config
    assert read_do_lower_case(tmp_path) is False


def test_a_byte_order_mark_is_accepted_on_every_input(tmp_path, capsys):
    dataset = _with_bom(SAMPLE_FILE, tmp_path / "sample.json")
    assert len(ku.read_squad_examples(dataset, is_training=True)) == 56
    predictions = tmp_path / "predictions.json"
    predictions.write_bytes(b"\xef\xbb\xbf" + json.dumps({"x": "y"}).encode())
    assert evaluate_v1_0.main([str(dataset), str(predictions)]) == 0
    assert json.loads(capsys.readouterr().out) == {"exact_match": 0.0, "f1": 0.0}
    assert read_vocab_tokens(_with_bom(VOCAB_FILE, tmp_path / "vocab.txt"))[0] == "[PAD]"
    config = tmp_path / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps(TINY_CONFIG).encode())
    assert Config.from_json_file(config) == Config(**TINY_CONFIG)
    assert scoring.score(dataset, {})["exact_match"] == 0.0


# --- 15. JSON nested too deeply ----------------------------------------------------------------------

def test_json_nested_too_deeply_is_one_line_naming_the_file_in_every_reader(tmp_path):
    """json.loads raises RecursionError on it, which is no ValueError: every reader let it out as a traceback."""
    import evaluate_klue_mrc
    import evaluate_korquad_v2
    import evaluate_v2_0
    import predict
    from modeling import ConfigError

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    # The reader of --train_file, --predict_file, submit.py's INPUT.json, and eval.py's scoring.
    with pytest.raises(KorquadFormatError, match=rf"^{re.escape(str(deep))}: not valid JSON \(nested too deeply\)$"):
        scoring.read_dataset(deep)
    with pytest.raises(ConfigError, match=r": not a readable JSON config \(nested too deeply\)$"):
        Config.from_json_file(deep)  # --model_config
    assert [str(item) for _where, item in predict.json_lines_items([deep.read_text()])] == [
        "not JSON (nested too deeply)"]
    for scorer in (evaluate_v1_0, evaluate_v2_0, evaluate_korquad_v2, evaluate_klue_mrc):
        with pytest.raises(ValueError, match=rf"^dataset {re.escape(str(deep))}: not valid JSON: nested too deeply$"):
            scorer._load_json(str(deep), "dataset")


# --- 14. --help of every entry point --------------------------------------------------------------

# The merger adds predict.py and export.py here once they land.
ENTRY_POINTS = ["train.py", "eval.py", "predict.py", "export.py", "download.py", "bench.py", "evaluate_v1_0.py",
                "submit.py"]
_DEFAULT_NOTES = re.compile(r"\(default: |\(if not given: ")


def _help_entries(help_text: str) -> dict[str, str]:
    """Each option or positional of an argparse --help, with its help text (without the invocation)."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text.split("\n\n", 2)[-1].splitlines():
        option = re.match(r"  (\S.*?)(?:  +(\S.*))?$", line)
        if option and not line.startswith(" " * 4):
            current = option.group(1)
            entries[current] = option.group(2) or ""
        elif current and line.startswith(" " * 4):
            entries[current] += " " + line.strip()
        elif not line.strip() or not line.startswith(" "):
            current = None
    return entries


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_gives_every_flag_a_sentence_and_its_default_once(script):
    result = run_in_process(script, "--help")
    assert result.returncode == 0, result.stderr
    entries = _help_entries(result.stdout)
    assert len(entries) >= 2
    for invocation, text in entries.items():
        if invocation.startswith("-h"):
            continue
        assert len(text.split()) >= 2, f"{script} {invocation}: no help sentence"
        assert len(_DEFAULT_NOTES.findall(text)) <= 1, f"{script} {invocation}: default given twice: {text}"
        assert "(default: None)" not in text, f"{script} {invocation}: {text}"


@pytest.mark.parametrize("script, flags, says", [
    ("train.py", ["--learning_rate=nan"], "argument --learning_rate: expected a finite number"),
    ("eval.py", ["--checkpoint=x.bin", "--doc_stride=0"], "argument --doc_stride: must be at least 1, got 0"),
    ("predict.py", ["--checkpoint=x.bin", "--input=-", "--top_k=-1"], "argument --top_k: must be at least 1, got -1"),
    ("export.py", ["--checkpoint=x.bin"], "the following arguments are required: --output_dir"),
])
def test_a_bad_flag_is_one_line_naming_it(script, flags, says):
    result = run_script(script, *flags, timeout=120)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"{script}: error: {says}") and f"see {script} --help" in result.stderr


@pytest.mark.parametrize("script, flags", [
    ("train.py", ["--train_file=/nonexistent/train.json", "--no_cuda"]),
    ("train.py", ["--num_train_epochs=nan"]),
    ("distill.py", ["--teacher=/nonexistent/run", f"--train_file={SAMPLE_FILE}", "--output_dir=/nonexistent/out"]),
    ("pretrain.py", ["--train_files=/nonexistent/corpus.txt", "--output_dir=/nonexistent/out"]),
    ("eval.py", ["--checkpoint=/nonexistent/model.bin", "--no_cuda", "--help"]),
])
def test_a_script_run_in_process_says_what_its_process_says(script, flags):
    """run_in_process stands in for a real process in most one-line checks: the same exit status, stdout and
    stderr (logging and warnings included) as `python3 script ...`."""
    real, here = run_script(script, *flags, timeout=120), run_in_process(script, *flags)
    assert real.returncode != 0 or "--help" in flags, real.stderr
    assert (here.returncode, here.stdout, here.stderr) == (real.returncode, real.stdout, real.stderr)


def test_a_script_run_in_process_logs_to_its_stderr(tmp_path):
    """Lines the script logs before it stops are in run_in_process's stderr, as they are in a process's."""
    torch.save(QuestionAnswering(Config(**{**TINY_CONFIG, "hidden_size": 32})).bert.state_dict(), tmp_path / "w.bin")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    result = run_in_process("train.py", f"--train_file={SAMPLE_FILE}", f"--checkpoint={tmp_path / 'w.bin'}",
                            f"--model_config={tmp_path / 'tiny.json'}", f"--output_dir={tmp_path / 'out'}",
                            f"--cache_dir={tmp_path / 'cache'}", *DATA_FLAGS, "--no_cuda")
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and any("INFO korquad_utils: feature cache written" in line for line in lines)
    assert lines[-1].startswith("train.py: error: ") and "shape mismatch" in lines[-1]


def test_help_formatter_shows_a_default_once():
    parser = __import__("argparse").ArgumentParser(formatter_class=cli.HelpFormatter)
    parser.add_argument("--plain", type=int, default=3, help="A number.")
    parser.add_argument("--told", default=None, help="A path (if not given: beside the data).")
    parser.add_argument("--switch", action="store_true", help="A switch.")
    text = " ".join(parser.format_help().split())
    assert "A number. (default: 3)" in text
    assert "A path (if not given: beside the data)." in text and "default: None" not in text
    assert "default: False" not in text


# --- audit 4a/4b: runs that could not work, refused before the work -------------------------------

def _train_flags(setup: Path, output_dir: Path, *extra: str) -> list[str]:
    return [f"--output_dir={output_dir}", f"--checkpoint={setup / 'pretrained.bin'}",
            f"--model_config={setup / 'tiny.json'}", f"--train_file={setup / 'train.json'}", *DATA_FLAGS,
            "--train_batch_size=4", "--learning_rate=2e-3", "--num_train_epochs=2", "--seed=42", "--no_cuda",
            "--quiet", f"--cache_dir={setup / 'cache'}", "--logging_steps=1", *extra]


def test_a_global_batch_with_more_shares_than_the_epoch_has_windows_is_refused(tiny_setup, tmp_path):
    import train

    out = tmp_path / "out"
    with pytest.raises(cli.UsageError, match=r"--train_file \S+train\.json gives \d+ windows, fewer than the 200 "
                                             r"shares one global batch is split into \(1 ranks x "
                                             r"--gradient_accumulation_steps 200\): no optimizer step would run"):
        train.main(_train_flags(tiny_setup, out, "--train_batch_size=1", "--gradient_accumulation_steps=200"))
    assert not list(out.glob("korquad_*.bin")) and not (out / "training_args.json").exists()


def test_resume_into_a_run_without_its_state_is_refused_and_an_empty_dir_starts(tiny_setup, tmp_path):
    import train

    out = tmp_path / "run"
    out.mkdir()
    (out / "korquad_1.bin").write_bytes(b"the old run's last epoch")
    (out / "training_log.jsonl").write_text('{"epoch": 0, "step": 1, "loss": 5.0, "lr": 0.001}\n')
    with pytest.raises(cli.UsageError, match=r"--resume: --output_dir \S+run holds a training run \(training_log"
                                             r"\.jsonl, korquad_1\.bin\) but no training_state\.pt to resume from; "
                                             r"pass --overwrite_output_dir"):
        train.main(_train_flags(tiny_setup, out, "--resume"))
    assert (out / "korquad_1.bin").read_bytes() == b"the old run's last epoch"
    assert len((out / "training_log.jsonl").read_text().splitlines()) == 1
    fresh = tmp_path / "fresh"   # a new directory (the "always --resume" notebook): warned, and trained
    train.main(_train_flags(tiny_setup, fresh, "--resume", "--max_steps=1"))
    assert (fresh / "korquad_0.bin").is_file()
    # A run killed in its first epoch leaves its args and log, no checkpoint: --resume starts it afresh.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "training_args.json").write_text("{}")
    (killed / "training_log.jsonl").write_text('{"epoch": 0, "step": 1, "loss": 5.0, "lr": 0.001}\n')
    train.main(_train_flags(tiny_setup, killed, "--resume", "--max_steps=1"))
    assert (killed / "korquad_0.bin").is_file()


def test_pretrain_resume_into_a_run_without_its_state_is_refused(tmp_path):
    import pretrain

    out = tmp_path / "run"
    out.mkdir()
    (out / "pretrain_0.bin").write_bytes(b"the old run's checkpoint")
    with pytest.raises(cli.UsageError, match=r"--resume: --output_dir \S+run holds a pre-training run "
                                             r"\(pretrain_0\.bin\) but no training_state\.pt to resume from"):
        pretrain.main(["--train_files", str(SAMPLE_FILE), f"--output_dir={out}", "--checkpoint=none",
                       "--max_seq_length=64", "--no_cuda", "--quiet", "--resume"])
    assert (out / "pretrain_0.bin").read_bytes() == b"the old run's checkpoint"


KORQUAD2_DIR = Path(cli.ROOT) / "data" / "korquad2_sample"


@pytest.mark.parametrize("flag, path", [("train_file", KORQUAD2_DIR),
                                        ("eval_file", KORQUAD2_DIR / "korquad2.1_dev_00.json"),
                                        ("predict_file", KORQUAD2_DIR / "korquad2.1_dev_00.json")])
def test_version_2_on_a_korquad2_dataset_is_refused_up_front(flag, path, tmp_path):
    args = argparse.Namespace(version_2_with_negative=True, null_score_diff_threshold=0.0, **{flag: str(path)})
    with pytest.raises(cli.UsageError, match=f"--version_2_with_negative does not apply to --{flag} "
                                             f"{re.escape(str(path))}, a KorQuAD 2.x dataset"):
        cli.check_version_2(args)
    cli.check_version_2(argparse.Namespace(version_2_with_negative=True, null_score_diff_threshold=0.0,
                                           **{flag: str(SAMPLE_FILE)}))  # a 1.0 file reads either way
    # A directory without any JSON is no 2.x dataset: the data checks say what it lacks.
    cli.check_version_2(argparse.Namespace(version_2_with_negative=True, null_score_diff_threshold=0.0,
                                           **{flag: str(tmp_path)}))


def test_train_refuses_version_2_on_korquad2_before_its_output_dir(tiny_setup, tmp_path):
    import train

    with pytest.raises(cli.UsageError, match="does not apply to --train_file"):
        train.main(_train_flags(tiny_setup, tmp_path / "out", f"--train_file={KORQUAD2_DIR}",
                                "--version_2_with_negative"))
    assert not (tmp_path / "out").exists()


def test_a_missing_eval_file_is_named_before_the_train_features_and_the_output_dir(tiny_setup, tmp_path):
    import train

    flags = _train_flags(tiny_setup, tmp_path / "out", f"--eval_file={tmp_path / 'missing.json'}",
                         f"--cache_dir={tmp_path / 'cache'}")
    with pytest.raises(cli.UsageError, match=r"^--eval_file \S+missing\.json: not found$"):
        train.main(flags)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_doc_stride_as_long_as_the_window_trains_on_windows_that_follow_each_other(tiny_setup, tmp_path, caplog):
    """The original baseline takes such a stride (--max_seq_length 224 beside its default stride 128 and query 96)."""
    import train

    flags = _train_flags(tiny_setup, tmp_path / "out", "--max_steps=1")
    flags = [f for f in flags if not f.startswith(("--max_seq_length", "--doc_stride"))]
    train.main([*flags, "--max_seq_length=96", "--doc_stride=64"])  # a window of 96 - 32 - 3 = 61 pieces
    assert (tmp_path / "out" / "korquad_0.bin").is_file()
    assert "--doc_stride 64 is not smaller than the context window (61 pieces" in caplog.text
    windows = ku._doc_windows(150, 61, 64)
    assert windows == [(0, 61), (61, 61), (122, 28)]


def test_an_eval_file_the_metric_cannot_score_is_refused_before_the_first_epoch(tiny_setup, tmp_path):
    """A question without an 'answers' list among answered ones: the v1.0 metric would fail only after an epoch."""
    import train

    dataset = json.loads((tiny_setup / "train.json").read_text(encoding="utf-8"))
    del dataset["data"][0]["paragraphs"][0]["qas"][0]["answers"]
    eval_file = tmp_path / "mixed.json"
    eval_file.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(KorquadFormatError, match=r"mixed\.json: question \S+: no 'answers' list"):
        train.main(_train_flags(tiny_setup, tmp_path / "out", f"--eval_file={eval_file}"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--max_steps=34"], []])
def test_a_negative_window_ratio_runs_every_planned_step_down_to_a_learning_rate_of_0(extra, tiny_setup, tmp_path):
    """Each epoch draws its own windows (here 17, then 16 steps): --max_steps runs exactly that many steps, and
    without it the two epochs' own steps; either way the linear decay ends at 0."""
    import train

    out = tmp_path / "out"
    train.main(_train_flags(tiny_setup, out, "--negative_window_ratio=0.5", "--logging_steps=100", *extra))
    last = json.loads((out / "training_log.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == 0.0, last
    if extra:
        assert last["step"] == 34, last


def test_fp16_on_a_cpu_is_refused_before_the_output_dir(tiny_setup, tmp_path):
    import train

    with pytest.raises(cli.UsageError, match="--fp16 needs a CUDA GPU"):
        train.main(_train_flags(tiny_setup, tmp_path / "out", "--fp16"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--distill_alpha=1", "--distill_temperature=4"])
def test_distill_flags_without_teacher_targets_are_refused(flag, capsys):
    import train

    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([flag])
    assert exit_info.value.code == 2
    assert f"{flag.split('=')[0]} only applies with --teacher_targets" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("value", ["1e300", "1e4"])
def test_pretrain_refuses_a_learning_rate_beyond_any_use_while_reading_its_flags(value, capsys):
    import pretrain

    with pytest.raises(SystemExit) as exit_info:
        pretrain.parse_args(["--train_files=corpus.txt", "--output_dir=out", f"--learning_rate={value}"])
    assert exit_info.value.code == 2
    assert "argument --learning_rate: expected a finite number > 0 and <= 1000" in \
        capsys.readouterr().err.splitlines()[-1]


def test_a_resume_refusal_says_not_given_for_a_flag_left_out():
    from long_run import check_same_settings

    with pytest.raises(cli.UsageError, match="--max_steps was 8 in the interrupted run, now not given;"):
        check_same_settings({"--max_steps": 8}, {"--max_steps": None}, {}, {})


def test_quiet_training_draws_no_progress_bar_for_its_evaluations(tiny_setup, tmp_path):
    trained = run_script("train.py", *_train_flags(tiny_setup, tmp_path / "run", "--max_steps=2",
                                                   f"--eval_file={tiny_setup / 'train.json'}"))
    assert trained.returncode == 0, trained.stderr
    assert "predict" not in trained.stderr and "%|" not in trained.stderr, trained.stderr


EMPTY_PATH_CASES = {
    "export --output_dir": ["--checkpoint=run", "--output_dir="],
    "export --checkpoint": ["--checkpoint=", "--output_dir=out"],
    "eval --output_dir": ["--checkpoint=run", "--output_dir="],
    "eval --checkpoint": ["--checkpoint", "run", "", "--output_dir=out"],
    "train --output_dir": ["--output_dir="],
    "train --checkpoint": ["--checkpoint= ", "--output_dir=out"],
    "pretrain --output_dir": [f"--train_files={SAMPLE_FILE}", "--output_dir="],
    "distill --output_dir": ["--teacher=run", f"--train_file={SAMPLE_FILE}", "--output_dir="],
    "distill --teacher": ["--teacher", "run", "", f"--train_file={SAMPLE_FILE}", "--output_dir=out"],
}


@pytest.mark.parametrize("case", sorted(EMPTY_PATH_CASES))
def test_an_empty_path_is_refused_rather_than_read_as_the_current_directory(case, tmp_path, monkeypatch, capsys):
    import importlib

    command, flag = case.split()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(command).main(EMPTY_PATH_CASES[case])
    assert exit_info.value.code == 2
    assert f"error: argument {flag}: expected a path, got an empty one" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_run_directory_without_its_config_copy_reads_the_config_it_trained_with(tiny_setup, tmp_path):
    from checkpoints import settings_from_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "training_args.json").write_text(json.dumps({"model_config": str(tiny_setup / "tiny.json")}))
    args = argparse.Namespace(model_config=None, vocab_file=None, analyzer=None)
    settings_from_run_dir(args, run)
    assert args.model_config == str(tiny_setup / "tiny.json")
    (run / "config.json").write_text(json.dumps(TINY_CONFIG))
    args = argparse.Namespace(model_config=None, vocab_file=None, analyzer=None)
    settings_from_run_dir(args, run)
    assert args.model_config == str(run / "config.json")


def test_a_model_with_fewer_positions_than_the_default_window_is_read_with_fitted_windows(tmp_path, capsys, caplog):
    """No window flag given: the defaults (512 pieces) shrink to the model's 128 positions; given, it is refused."""
    import predict

    config = {**TINY_CONFIG, "max_position_embeddings": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "training_args.json").write_text(json.dumps({"vocab_file": str(VOCAB_FILE), "analyzer": "mecab"}))
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**config)).state_dict(), tmp_path / "korquad_0.bin")
    context = "마을에 사람이 처음 정착한 시기는 조선 숙종 때인 1692년이다. " * 20
    predict.main([f"--checkpoint={tmp_path}", "--question=언제인가?", f"--context={context}", "--no_cuda", "--quiet"])
    answer = json.loads(capsys.readouterr().out)
    assert context[answer["start"]:answer["end"]] == answer["answer"] != ""
    assert "using max_seq_length 128, doc_stride 32, max_query_length 24" in caplog.text
    with pytest.raises(cli.UsageError, match="--max_seq_length 192 is larger than the model's max_position_embeddings"):
        predict.main([f"--checkpoint={tmp_path}", "--question=언제인가?", f"--context={context}", "--no_cuda",
                      "--quiet", "--max_seq_length=192"])
    caplog.clear()   # a given question length is kept, and the fitted stride stays inside the window it leaves
    predict.main([f"--checkpoint={tmp_path}", "--question=언제인가?", f"--context={context}", "--no_cuda", "--quiet",
                  "--max_query_length=100"])
    assert "using max_seq_length 128, doc_stride 24, max_query_length 100" in caplog.text
    assert "not smaller than the context window" not in caplog.text
    import submit   # its windows are fixed (the contest baseline's 512), never given: fitted the same way

    submit.main([str(SAMPLE_FILE), str(tmp_path / "submission.json"), f"--checkpoint={tmp_path}", "--quiet"])
    predictions = json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))
    assert len(predictions) == sum(len(p["qas"]) for a in json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))["data"]
                                   for p in a["paragraphs"])


def test_a_version_2_eval_file_the_metric_cannot_score_names_the_eval_file_flag(tiny_setup, tmp_path):
    """train.py has no --metric flag: the SQuAD 2.0 metric's refusal names --eval_file."""
    import train

    dataset = json.loads((tiny_setup / "train.json").read_text(encoding="utf-8"))
    dataset["data"][0]["paragraphs"][0]["qas"][0]["answers"] = "not a list"
    eval_file = tmp_path / "bad_answers.json"
    eval_file.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(cli.UsageError, match=r"^--eval_file: dataset \S+bad_answers\.json: question \S+: 'answers' "
                                             r"must be a list"):
        train.main(_train_flags(tiny_setup, tmp_path / "out", f"--eval_file={eval_file}", "--version_2_with_negative"))
    assert not (tmp_path / "out").exists()


def test_a_structural_fault_of_the_eval_file_is_named_before_the_train_features_are_built(tiny_setup, tmp_path):
    import train

    dataset = json.loads((tiny_setup / "train.json").read_text(encoding="utf-8"))
    dataset["data"][0]["paragraphs"][0]["qas"][0]["question"] = None
    eval_file = tmp_path / "bad_question.json"
    eval_file.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(KorquadFormatError, match=r"bad_question\.json: question \S+: 'question' must be str"):
        train.main(_train_flags(tiny_setup, tmp_path / "out", f"--eval_file={eval_file}",
                                f"--cache_dir={tmp_path / 'cache'}"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_korquad2_scoring_without_beautifulsoup4_is_one_line_before_any_work(tiny_setup, tmp_path, monkeypatch):
    """The 2.x metric (evaluate_korquad_v2.py, as the official one) needs bs4: said up front, not after an epoch."""
    import evaluate_korquad_v2
    import train

    monkeypatch.setattr(evaluate_korquad_v2, "BeautifulSoup", None)
    for data in (KORQUAD2_DIR, KORQUAD2_DIR / "korquad2.1_dev_00.json"):
        with pytest.raises(cli.UsageError, match=r"^the KorQuAD 2\.0 metric needs beautifulsoup4: pip install "
                                                 r"beautifulsoup4$"):
            scoring.check_metric_dataset(data, "korquad")
    with pytest.raises(cli.UsageError, match="needs beautifulsoup4"):
        train.main(_train_flags(tiny_setup, tmp_path / "out", f"--eval_file={KORQUAD2_DIR / 'korquad2.1_dev_00.json'}"))
    assert not (tmp_path / "out").exists()
    scoring.check_metric_dataset(tiny_setup / "train.json", "korquad")  # KorQuAD 1.0 needs no bs4

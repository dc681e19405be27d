"""distill.py and the teacher-target file under stress: concurrent writers, kill -9 mid-write, damaged files,
stale keys; and what reaches the student: the max-context window per token, alpha and temperature as given."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

import distill
import korquad_utils as ku
from checkpoints import build_tokenizer, load_finetuned
from scoring import predict_logits
from conftest import DATA_FLAGS, ROOT, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, write_subset
from modeling import Config, QuestionAnswering

# Short windows: every question of the sample spans several, so the max-context rule decides many tokens.
WINDOWS = ["--max_seq_length=64", "--doc_stride=24", "--max_query_length=16"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A run directory of ours with random weights (`run/`), logits spread over several units so that windows
    disagree visibly, and 4 questions of the sample (`train.json`)."""
    root = tmp_path_factory.mktemp("teacher")
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(TINY_CONFIG))
    (run / "training_args.json").write_text(json.dumps({"analyzer": "none", "do_lower_case": True}))
    shutil.copy(VOCAB_FILE, run / "vocab.txt")
    torch.manual_seed(3)
    model = QuestionAnswering(Config(**TINY_CONFIG))
    torch.nn.init.normal_(model.qa_outputs.weight, std=0.6)
    torch.save(model.state_dict(), run / "korquad_0.bin")
    write_subset(SAMPLE_FILE, root / "train.json", 4)
    return root


@pytest.fixture(scope="module")
def made_targets(teacher) -> Path:
    """Targets of `teacher` at the default settings, made once: tests damage copies of them."""
    run_distill(teacher, teacher / "targets")
    return teacher / "targets"


@pytest.fixture
def targets_copy(made_targets, tmp_path) -> Path:
    return Path(shutil.copytree(made_targets, tmp_path / "targets"))


def run_distill(teacher: Path, output_dir: Path, *flags: str, run: str = "run") -> str:
    """distill.main in this process; returns what it printed (the targets' path)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        distill.main([f"--teacher={teacher / run}", f"--train_file={teacher / 'train.json'}",
                      f"--output_dir={output_dir}", *WINDOWS, "--no_cuda", "--quiet",
                      f"--cache_dir={teacher / 'cache'}", *flags])
    return printed.getvalue()


@pytest.fixture
def teacher_calls(monkeypatch) -> list[int]:
    """One entry per teacher forward pass over the windows distill.py makes."""
    calls: list[int] = []
    real = distill.predict_logits

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(distill, "predict_logits", counting)
    return calls


def one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(fragment in lines[0] for fragment in fragments), lines[0]
    return lines[0]


# --- each token's target from its max-context window ------------------------------------------------

def single_char_window(first: int, count: int, logits: np.ndarray) -> distill.Window:
    """`count` one-character tokens from character `first` on, their start and end logits both `logits`."""
    offsets = np.stack([np.arange(first, first + count), np.arange(first + 1, first + count + 1)], axis=1)
    return offsets, logits, logits


@pytest.mark.parametrize("case", ["tie goes to the earlier window", "longer window wins a near tie"])
def test_each_token_takes_its_logits_from_the_window_where_it_has_most_context(case):
    """Score: min(tokens left, tokens right) + 0.01 x window length. Windows of 6 tokens at 0 and 1: token 3
    scores 2.06 in both (the first wins), token 4 scores 1.06 then 2.06 (the second). Windows of 6 at 0 and 7
    at 3: token 4 scores 1.06 against 1.07, only the length term separates them."""
    context = "abcdefghij"
    rng = np.random.default_rng(0)
    if case == "tie goes to the earlier window":
        (first_start, first_len), (second_start, second_len), from_first = (0, 6), (1, 6), {0, 1, 2, 3}
    else:
        (first_start, first_len), (second_start, second_len), from_first = (0, 6), (3, 7), {0, 1, 2, 3}
    first_logits, second_logits = rng.normal(0, 3, first_len), rng.normal(0, 3, second_len)
    windows = [single_char_window(first_start, first_len, first_logits),
               single_char_window(second_start, second_len, second_logits)]
    tokens = range(second_start + second_len)
    chosen = np.array([first_logits[t - first_start] if t in from_first else second_logits[t - second_start]
                       for t in tokens])
    expected = np.exp(chosen - chosen.max()) / np.exp(chosen - chosen.max()).sum()
    for (chars, probs) in distill.question_distributions(windows, context):
        np.testing.assert_array_equal(chars, list(tokens))
        np.testing.assert_allclose(probs, expected, rtol=1e-12)


def test_distilled_targets_follow_the_feature_tables_max_context_flags(teacher, tmp_path):
    """End to end: the teacher's targets equal one softmax over each question's context tokens, each token's
    logit taken from the window the QA feature table flags as its max-context one (decoding's rule)."""
    run_distill(teacher, tmp_path / "targets", "--target_mass=1")
    targets = ku.read_teacher_targets(tmp_path / "targets")
    config = Config(**TINY_CONFIG)
    tokenizer = build_tokenizer(teacher / "run" / "vocab.txt", "none", config, True)
    examples = ku.read_squad_examples(teacher / "train.json", is_training=False)
    features = ku.convert_examples_to_features(examples, tokenizer, 64, 24, 16, is_training=False, progress=False)
    assert np.bincount(features.example_index).min() >= 3, "every question needs several windows"
    model = load_finetuned(teacher / "run" / "korquad_0.bin", config, torch.device("cpu"))
    starts, ends = predict_logits(model, features, 16, torch.device("cpu"), show_progress=False)
    row_of = {q: i for i, q in enumerate(targets.question_ids.tolist())}
    for example_index, example in enumerate(examples):
        text = example.context_text

        def first_char(span):  # a start's mass sits on the token's first non-space character
            return next((c for c in range(span[0], span[1]) if not text[c].isspace()), None)

        def last_char(span):   # an end's on its last
            return next((c for c in reversed(range(span[0], span[1])) if not text[c].isspace()), None)
        for side, logits_of, char_of in (("start", starts, first_char), ("end", ends, last_char)):
            logits, chars = [], []
            for window in np.flatnonzero(features.example_index == example_index):
                _, max_context = features.context_masks([window], features.lengths[window])
                logits += logits_of[window][max_context[0]].tolist()
                chars += [char_of(span) for span in features.token_offsets(window)[max_context[0]].tolist()]
            logits = np.array(logits, dtype=np.float64)
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            expected: dict[int, float] = {}
            for char, prob in zip(chars, probs):
                if char is not None:
                    expected[char] = expected.get(char, 0.0) + prob
            bounds = getattr(targets, f"{side}_bounds")
            row = row_of[example.qas_id]
            got = dict(zip(getattr(targets, f"{side}_chars")[bounds[row]:bounds[row + 1]].tolist(),
                           getattr(targets, f"{side}_probs")[bounds[row]:bounds[row + 1]].tolist()))
            # --target_mass 1 still drops characters beyond 1 - 1e-12 of the mass.
            assert set(got) <= set(expected), (example.qas_id, side)
            assert sum(p for c, p in expected.items() if c not in got) < 1e-9, (example.qas_id, side)
            np.testing.assert_allclose([got[c] for c in sorted(got)], [expected[c] for c in sorted(got)],
                                       rtol=1e-5, atol=1e-7)


# --- the targets' key: a changed setting never reuses stale targets ----------------------------------

def test_same_settings_reuse_the_targets_and_each_changed_one_makes_new_ones(teacher, tmp_path, teacher_calls):
    out = tmp_path / "targets"
    run_distill(teacher, out)
    assert len(teacher_calls) == 1
    keys = {ku.read_teacher_targets(out).key}
    assert run_distill(teacher, out).strip() == str(out / ku.TEACHER_TARGETS_NPZ)
    assert len(teacher_calls) == 1, "the same settings ran the teacher again"
    for flag in ("--target_mass=0.9", "--max_seq_length=72", "--doc_stride=20", "--max_query_length=12"):
        before = len(teacher_calls)
        run_distill(teacher, out, flag)  # the flag given last wins over WINDOWS' value
        assert len(teacher_calls) == before + 1, f"{flag}: stale targets reused"
        keys.add(ku.read_teacher_targets(out).key)
    assert len(keys) == 5


@pytest.mark.parametrize("change", ["vocab", "config"])
def test_a_teacher_runs_vocab_or_config_changed_under_the_same_weights_makes_new_targets(teacher, tmp_path,
                                                                                       teacher_calls, change):
    shutil.copytree(teacher / "run", tmp_path / "run")
    out = tmp_path / "targets"
    run_distill(tmp_path, out, f"--train_file={teacher / 'train.json'}")
    if change == "vocab":  # same size, one piece spelled differently: other ids for some text
        vocab = (tmp_path / "run" / "vocab.txt").read_text(encoding="utf-8").splitlines()
        (tmp_path / "run" / "vocab.txt").write_text("\n".join(vocab[:-1] + ["##없는조각"]) + "\n", encoding="utf-8")
    else:
        (tmp_path / "run" / "config.json").write_text(json.dumps({**TINY_CONFIG, "dropout_prob": 0.1}))
    run_distill(tmp_path, out, f"--train_file={teacher / 'train.json'}")
    assert len(teacher_calls) == 2, f"a changed {change} reused the targets"


def test_default_windows_fit_a_teacher_of_fewer_positions(teacher, tmp_path, caplog):
    # A run of a 128-position model as teacher, no window flags: windows fitted to it (as train.py and eval.py
    # fit them), not refused for the 512-piece default.
    short = tmp_path / "short_run"
    shutil.copytree(teacher / "run", short)
    config = {**TINY_CONFIG, "max_position_embeddings": 128}
    (short / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**config)).state_dict(), short / "korquad_0.bin")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        distill.main([f"--teacher={short}", f"--train_file={teacher / 'train.json'}", f"--output_dir={tmp_path / 'out'}",
                      "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}"])
    assert printed.getvalue().strip() == str(tmp_path / "out" / ku.TEACHER_TARGETS_NPZ)
    assert "fewer than the 512-piece window; using max_seq_length 128" in caplog.text
    assert len(ku.read_teacher_targets(tmp_path / "out").question_ids) == 4


# --- damaged files --------------------------------------------------------------------------------

def rewritten(npz: Path, **arrays: np.ndarray) -> None:
    values = dict(np.load(npz))
    np.savez(npz, **{**values, **arrays})


def flipped_in_probs(data: bytes) -> bytes:
    """The npz with one byte of start_probs' numbers flipped (past its .npy header of 128 bytes)."""
    at = data.index(b"\x93NUMPY", data.index(b"start_probs.npy")) + 130
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


DAMAGE = {
    "empty": lambda npz: npz.write_bytes(b""),
    "truncated": lambda npz: npz.write_bytes(npz.read_bytes()[:len(npz.read_bytes()) // 2]),
    "tail cut": lambda npz: npz.write_bytes(npz.read_bytes()[:-1]),
    "flipped byte in the arrays": lambda npz: npz.write_bytes(flipped_in_probs(npz.read_bytes())),
    "not a zip": lambda npz: npz.write_text("teacher targets"),
    "a directory": lambda npz: (npz.unlink(), npz.mkdir()),
    "NaN probability": lambda npz: rewritten(npz, start_probs=np.full(len(np.load(npz)["start_probs"]), np.nan,
                                                                     np.float32)),
    "negative character": lambda npz: rewritten(npz, end_chars=-np.load(npz)["end_chars"] - 1),
    "bounds running backwards": lambda npz: rewritten(npz, start_bounds=np.load(npz)["start_bounds"][::-1].copy()),
    "characters as floats": lambda npz: rewritten(npz, start_chars=np.load(npz)["start_chars"] + 0.5),
    "a key that is no string": lambda npz: rewritten(npz, key=np.arange(3)),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_targets_are_refused_naming_the_file(targets_copy, damage):
    out = targets_copy
    npz = out / ku.TEACHER_TARGETS_NPZ
    DAMAGE[damage](npz)
    with pytest.raises(ku.KorquadFormatError) as refused:
        ku.read_teacher_targets(out)
    message = str(refused.value)
    assert message.startswith(f"{npz}: ") and "\n" not in message and len(message) < 400, message
    assert "distill.py" in message  # what to do about it


def test_truncated_targets_stop_train_py_with_one_line(teacher, targets_copy, tiny_setup, tmp_path):
    out = targets_copy
    npz = out / ku.TEACHER_TARGETS_NPZ
    npz.write_bytes(npz.read_bytes()[:1000])
    result = run_in_process("train.py", f"--output_dir={tmp_path / 'student'}", f"--train_file={teacher / 'train.json'}",
                            f"--checkpoint={tiny_setup / 'pretrained.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
                            *DATA_FLAGS, "--no_cuda", "--quiet", f"--teacher_targets={out}",
                            f"--cache_dir={tmp_path / 'cache'}")
    one_line_error(result, str(npz), "rerun distill.py")
    assert not list((tmp_path / "student").glob("korquad_*.bin"))


def test_targets_past_a_questions_context_stop_train_py_with_one_line(teacher, targets_copy, tiny_setup, tmp_path):
    out = targets_copy
    npz = out / ku.TEACHER_TARGETS_NPZ
    rewritten(npz, start_chars=np.load(npz)["start_chars"] + 100_000)   # a sound file, about other text
    result = run_in_process("train.py", f"--output_dir={tmp_path / 'student'}", f"--train_file={teacher / 'train.json'}",
                            f"--checkpoint={tiny_setup / 'pretrained.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
                            *DATA_FLAGS, "--no_cuda", "--quiet", f"--teacher_targets={out}",
                            f"--cache_dir={tmp_path / 'cache'}")
    one_line_error(result, f"--teacher_targets {out}: start_chars", "is past its context", "rerun distill.py")
    assert not list((tmp_path / "student").glob("korquad_*.bin"))


def test_the_context_check_reads_each_questions_own_row_of_targets():
    import argparse
    import types

    import train
    from cli import UsageError
    from teacher_targets import TeacherTargets

    def targets(ids: list[str], start_chars: list[int]) -> TeacherTargets:
        bounds, chars = np.arange(len(ids) + 1), np.array(start_chars)
        return TeacherTargets("key", "sha", np.array(ids), bounds, chars, np.ones(len(ids)), bounds,
                              np.zeros(len(ids), np.int64), np.ones(len(ids)))

    examples = [types.SimpleNamespace(qas_id=qid, context_text="가" * 10) for qid in ("a", "b")]
    features = types.SimpleNamespace(example_index=np.array([0, 1]))
    args = argparse.Namespace(teacher_targets="T", distill_alpha=0.5, distill_temperature=1.0)
    # A row repeated under one id (a hand-made file): the one read is checked, the other not read at all.
    train.teacher_for(args, targets(["a", "a", "b"], [50, 9, 9]), examples, features)
    with pytest.raises(UsageError, match=r"start_chars 10 of question b is past its context \(10 characters"):
        train.teacher_for(args, targets(["a", "b"], [9, 10]), examples, features)


@pytest.mark.parametrize("sidecar", ["garbage", "another key", "missing"])
def test_a_damaged_or_foreign_sidecar_is_written_anew_by_a_rerun(teacher, targets_copy, teacher_calls, sidecar):
    out = targets_copy
    run_distill(teacher, out)
    assert not teacher_calls  # whole targets and sidecar: current
    path = out / ku.TEACHER_TARGETS_JSON
    if sidecar == "garbage":
        path.write_bytes(b"\x00{not json")
    elif sidecar == "another key":
        path.write_text(json.dumps({**json.loads(path.read_text()), "key": "0" * 64}))
    else:
        path.unlink()
    run_distill(teacher, out)
    assert len(teacher_calls) == 1, "targets beside a damaged sidecar counted as current"
    assert json.loads(path.read_text())["key"] == ku.read_teacher_targets(out).key


# --- kill -9 while writing, and two writers at once --------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
import numpy as np
sys.path.insert(0, {root!r})
import korquad_utils as ku
from long_run import RunLock
from pathlib import Path

out = Path({out!r})
RunLock(out, program="distill.py").acquire()  # as distill.py holds it; the kill leaves it behind
targets = ku.read_teacher_targets(out)
targets.key = "new" + targets.key[3:]
if {point!r} == "inside the npz":
    real_savez = np.savez
    def savez_then_die(file, **arrays):
        real_savez(file, **arrays)
        file.flush()
        file.truncate(file.tell() // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    np.savez = savez_then_die
else:
    real_replace = os.replace
    def replace_once_then_die(source, target):
        if Path(target).name == ku.TEACHER_TARGETS_JSON:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, target)
    os.replace = replace_once_then_die
ku.write_teacher_targets(targets, out, {{}})
"""


@pytest.mark.parametrize("point", ["inside the npz", "between the two renames"])
def test_kill_9_while_writing_leaves_whole_targets_and_a_rerun_repairs_everything(teacher, targets_copy,
                                                                                   teacher_calls, point):
    out = targets_copy
    before = ku.read_teacher_targets(out)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER.format(root=str(ROOT), out=str(out), point=point)],
                            capture_output=True, text=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = ku.read_teacher_targets(out)  # what train.py reads: whole, old or new, never half
    if point == "inside the npz":
        assert after.key == before.key and np.array_equal(after.start_probs, before.start_probs)
        assert list(out.glob(".teacher_targets.npz.*.tmp")), "the killed writer's temporary file"
    else:
        assert after.key == "new" + before.key[3:]  # the npz went in, its sidecar did not
    # The rerun takes over the dead writer's lock, removes its temporary files, and finds the old targets
    # current (the killed writer's never went in) or, beside a foreign sidecar, writes them anew.
    run_distill(teacher, out)
    assert len(teacher_calls) == (0 if point == "inside the npz" else 1)
    assert ku.teacher_targets_are_current(out, before.key)
    assert sorted(p.name for p in out.iterdir()) == sorted([ku.TEACHER_TARGETS_NPZ, ku.TEACHER_TARGETS_JSON])


def test_a_second_distill_into_a_directory_in_use_is_one_line_and_touches_nothing(teacher, targets_copy):
    out = targets_copy
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".train.lock").write_text(json.dumps({"program": "distill.py", "pid": holder.pid,
                                                     "host": os.uname().nodename, "started": "now",
                                                     "heartbeat": time.time()}))
        result = run_in_process("distill.py", f"--teacher={teacher / 'run'}", f"--train_file={teacher / 'train.json'}",
                                f"--output_dir={out}", *WINDOWS, "--target_mass=0.5", "--no_cuda", "--quiet")
    finally:
        holder.kill()
        holder.wait()
    one_line_error(result, str(out), f"in use by distill.py pid {holder.pid}")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".train.lock"} == before


def test_two_distills_at_once_leave_valid_targets(teacher, tmp_path):
    """Whichever order they run in, each either writes or is refused with the lock's one line; the directory
    ends holding one whole set of targets whose sidecar names the same key."""
    out = tmp_path / "targets"
    command = [sys.executable, str(ROOT / "distill.py"), f"--teacher={teacher / 'run'}",
               f"--train_file={teacher / 'train.json'}", f"--output_dir={out}", *WINDOWS, "--no_cuda", "--quiet",
               f"--cache_dir={tmp_path / 'cache'}"]
    runs = [subprocess.Popen(command + [f"--target_mass={mass}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT) for mass in (0.9, 0.99)]
    results = [(run.wait(timeout=300), *run.communicate()) for run in runs]
    for code, _, stderr in results:
        assert "Traceback" not in stderr, stderr
        assert code == 0 or (code == 1 and len(stderr.strip().splitlines()) == 1 and "in use by distill.py" in stderr)
    assert any(code == 0 for code, _, _ in results)
    targets = ku.read_teacher_targets(out)
    assert json.loads((out / ku.TEACHER_TARGETS_JSON).read_text())["key"] == targets.key
    assert sorted(p.name for p in out.iterdir()) == sorted([ku.TEACHER_TARGETS_NPZ, ku.TEACHER_TARGETS_JSON])


# --- alpha and temperature reach the loss as given ----------------------------------------------------

@pytest.fixture
def student(tiny_setup, tmp_path) -> tuple[list[str], Path]:
    """train.py flags for a dropout-free student on 4 questions, and synthetic targets for them."""
    from test_distill import synthetic_targets
    write_subset(SAMPLE_FILE, tmp_path / "train.json", 4)
    targets = synthetic_targets(tmp_path / "train.json", tmp_path / "targets", seed=5)
    return [f"--checkpoint={tiny_setup / 'pretrained.bin'}", f"--model_config={tiny_setup / 'tiny.json'}",
            f"--train_file={tmp_path / 'train.json'}", *DATA_FLAGS, "--train_batch_size=4", "--learning_rate=2e-3",
            "--seed=42", "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}", "--logging_steps=1"], targets


def logged_losses(output_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (output_dir / "training_log.jsonl").read_text().splitlines())
            if "loss" in r]


def test_alpha_zero_trains_exactly_as_the_plain_run(student, tmp_path):
    import train
    flags, targets = student
    train.main(flags + [f"--output_dir={tmp_path / 'plain'}", "--max_steps=3"])
    train.main(flags + [f"--output_dir={tmp_path / 'alpha0'}", "--max_steps=3", f"--teacher_targets={targets}",
                        "--distill_alpha=0", "--distill_temperature=3"])
    assert logged_losses(tmp_path / "alpha0") == logged_losses(tmp_path / "plain")


def test_the_first_steps_loss_is_the_alpha_mix_at_the_given_temperature(student, tmp_path):
    """(1 - a) x gold cross-entropy + a x T^2 x KL(teacher_T || student_T), start and end averaged, computed
    here from the model train.py starts from and the first batch it draws, with a = 0.3 and T = 3 (neither
    a default)."""
    import train
    from long_run import Distributed
    from modeling import load_checkpoint

    flags, targets_dir = student
    alpha, temperature = 0.3, 3.0
    train.main(flags + [f"--output_dir={tmp_path / 'run'}", "--max_steps=1", f"--teacher_targets={targets_dir}",
                        f"--distill_alpha={alpha}", f"--distill_temperature={temperature}"])
    (logged,) = logged_losses(tmp_path / "run")

    args = train.parse_args(flags + [f"--output_dir={tmp_path / 'x'}"])
    config = train.resolve_model_settings(args, args.checkpoint)
    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    examples, features = ku.load_or_build_features(args.train_file, tokenizer, 192, 64, 32, is_training=True,
                                                   cache_dir=args.cache_dir, progress=False)
    first_batch = train.rank_batches(features.lengths, args, Distributed(), 0)[0][0]
    teacher = train.teacher_for(argparse.Namespace(teacher_targets=targets_dir, distill_alpha=None,
                                                   distill_temperature=None),
                                ku.read_teacher_targets(targets_dir), examples, features)
    batch = teacher.collate(list(first_batch), partial(train.collate_tensors, features=features, is_training=True))
    torch.manual_seed(args.seed)
    model = QuestionAnswering(config)
    load_checkpoint(model, args.checkpoint)
    with torch.no_grad():
        start, end = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    padding = batch["attention_mask"] == 0

    def cross_entropy(logits, positions):
        return torch.nn.functional.cross_entropy(logits.masked_fill(padding, -torch.inf), positions)

    def kd(logits, target):
        teacher_t = target.double() ** (1 / temperature)
        teacher_t = teacher_t / teacher_t.sum(-1, keepdim=True)
        student_t = torch.log_softmax((logits.double() / temperature).masked_fill(padding, -torch.inf), -1)
        per_row = torch.where(teacher_t > 0, teacher_t * (teacher_t.log() - student_t), 0.0).sum(-1)
        return temperature ** 2 * per_row.mean()

    gold = (cross_entropy(start, batch["start_positions"]) + cross_entropy(end, batch["end_positions"])) / 2
    distilled = (kd(start, batch["start_targets"]) + kd(end, batch["end_targets"])) / 2
    assert logged == pytest.approx(((1 - alpha) * gold + alpha * distilled).item(), rel=1e-5)
    # Neither term alone, nor the default temperature, gives that loss.
    assert abs(gold.item() - distilled.item()) > 1e-2 * logged


def test_a_missing_teacher_is_named_by_the_teacher_flag(teacher, tmp_path):
    """distill.py has no --checkpoint flag: the refusal names the one the user gave, before any model runs."""
    missing = tmp_path / "missing_run"
    result = run_in_process("distill.py", "--teacher", str(teacher / "run"), str(missing),
                            f"--train_file={teacher / 'train.json'}", f"--output_dir={tmp_path / 'targets'}",
                            *WINDOWS, "--no_cuda", "--quiet")
    assert one_line_error(result) == f"distill.py: error: --teacher {missing}: file not found"
    assert not (tmp_path / "targets").exists()
    empty = tmp_path / "empty_run"
    empty.mkdir()
    result = run_in_process("distill.py", "--teacher", str(empty), f"--train_file={teacher / 'train.json'}",
                            f"--output_dir={tmp_path / 'targets'}", *WINDOWS, "--no_cuda", "--quiet")
    assert one_line_error(result).startswith(f"distill.py: error: --teacher {empty}: a directory without any korquad_N")


def test_a_transformers_package_that_is_installed_but_does_not_import_is_one_line(monkeypatch):
    """Found (its spec is there) but broken, or missing one of its own dependencies: one line, not a traceback."""
    import importlib.util

    import distill
    from cli import UsageError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object())
    monkeypatch.setitem(sys.modules, "transformers", None)   # `import transformers` now raises ImportError
    with pytest.raises(UsageError, match=r"^--teacher: the transformers package does not import \(.+\); reinstall "
                                         r"it: pip install --force-reinstall transformers$"):
        distill.import_transformers()

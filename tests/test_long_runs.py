"""Long runs: mid-epoch states, kill -9 / SIGTERM and resume, one writer per directory, refused resumes,
best epoch, curves, a full disk, and torchrun stopping as one job. Tiny model on the bundled sample."""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_FLAGS, ROOT, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, run_script, write_subset

# Run train.py, sending itself a signal at one chosen moment: in the Nth optimizer step (the Nth gradient
# clipping), before the Nth training micro-batch's forward pass (with accumulation: between the micro-batches
# of one step) or while writing the Nth torch file (after part of it is on disk). A test hook only: train.py
# itself is run unchanged, as a user would.
STOPPER = '''
import os, signal, sys
sys.path.insert(0, {root!r})
sys.argv[0] = "train.py"
import torch
import modeling
import train

when, sig, where = int(os.environ["STOP_AT"]), signal.Signals[os.environ["STOP_SIGNAL"]], os.environ["STOP_WHERE"]
calls = 0


def stop_here():
    os.kill(os.getppid() if where == "agent" else os.getpid(), sig)


def clip_then_maybe_stop(*args, **kwargs):
    global calls
    calls += 1
    if calls == when and int(os.environ.get("RANK", "0")) == 0:
        stop_here()
    return real_clip(*args, **kwargs)


def save_then_maybe_stop(obj, file, *args, **kwargs):
    global calls
    calls += 1
    if calls == when:
        file.write(b"half a checkpoint")
        stop_here()
    return real_save(obj, file, *args, **kwargs)


def forward_then_maybe_stop(self, *args, **kwargs):
    global calls
    if self.training:
        calls += 1
        if calls == when:
            stop_here()
    return real_forward(self, *args, **kwargs)


real_clip, real_save, real_forward = torch.nn.utils.clip_grad_norm_, torch.save, modeling.QuestionAnswering.forward
if where == "save":
    torch.save = save_then_maybe_stop
elif where == "micro_batch":
    modeling.QuestionAnswering.forward = forward_then_maybe_stop
else:
    torch.nn.utils.clip_grad_norm_ = clip_then_maybe_stop
train.run_cli(train.cli, train.USER_ERRORS + (train.TrainingDiverged, train.CheckpointWriteError,
                                             train.DirectoryLocked))
'''
EPOCHS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    """Configs (with dropout: the random state after a resume matters), encoder, 4 questions (5 steps of
    4 features a epoch, whole for 1 or 2 ranks), the stopper."""
    root = tmp_path_factory.mktemp("long")
    (root / "dropout.json").write_text(json.dumps({**TINY_CONFIG, "dropout_prob": 0.1}))
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    torch.manual_seed(0)
    from modeling import Config, QuestionAnswering
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).bert.state_dict(), root / "pretrained.bin")
    write_subset(SAMPLE_FILE, root / "train.json", 4)
    write_subset(SAMPLE_FILE, root / "other.json", 4, skip_paragraphs=3)
    (root / "stopper.py").write_text(STOPPER.format(root=str(ROOT)))
    return root


def flags(setup: Path, output_dir: Path, *extra: str, config: str = "dropout.json") -> list[str]:
    return [f"--output_dir={output_dir}", f"--checkpoint={setup / 'pretrained.bin'}",
            f"--model_config={setup / config}", f"--train_file={setup / 'train.json'}", *DATA_FLAGS,
            "--train_batch_size=4", "--learning_rate=2e-3", f"--num_train_epochs={EPOCHS}", "--seed=42",
            "--no_cuda", "--quiet", f"--cache_dir={setup / 'cache'}", "--logging_steps=1", *extra]


def run_stopped(setup: Path, args: list[str], signal_name: str, when: int, where: str = "step",
                torchrun: bool = False) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] \
        if torchrun else [sys.executable]
    env = {**os.environ, "STOP_AT": str(when), "STOP_SIGNAL": signal_name, "STOP_WHERE": where,
           "OMP_NUM_THREADS": "1" if torchrun else os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([*launcher, str(setup / "stopper.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def straight(setup) -> Path:
    """An uninterrupted run: what every interrupted and resumed run must end equal to."""
    import train

    output_dir = setup / "straight"
    train.main(flags(setup, output_dir))
    return output_dir


# 2 micro-batches of 2 features a step (5 steps an epoch, one epoch) and a loss line every 3 steps: stops fall
# inside steps and between loss lines, where a resume must skip whole steps' micro-batches and carry the
# losses not yet shown.
ACCUMULATED = ["--train_batch_size=2", "--gradient_accumulation_steps=2", "--logging_steps=3", "--num_train_epochs=1"]


@pytest.fixture(scope="module")
def straight_accumulated(setup) -> Path:
    """An uninterrupted run with ACCUMULATED: what the interrupted accumulated runs must end equal to."""
    import train

    output_dir = setup / "straight_accumulated"
    train.main(flags(setup, output_dir, *ACCUMULATED))
    return output_dir


def assert_same_end(expected_run: Path, run: Path, tolerance: float = 1e-6,
                    checkpoint: str = f"korquad_{EPOCHS - 1}.bin") -> None:
    """The same final weights, and a loss log that reads as one run (no step lost, none twice)."""
    expected = torch.load(expected_run / checkpoint, weights_only=True)
    actual = torch.load(run / checkpoint, weights_only=True)
    assert expected.keys() == actual.keys()
    for name in expected:
        if tolerance > 1e-6 and name == "qa_outputs.bias":
            continue  # zero true gradient: across process layouts Adam amplifies rounding (see test_training)
        assert torch.allclose(actual[name], expected[name], atol=tolerance, rtol=0), name

    def log(output_dir: Path) -> list[dict]:
        records = [json.loads(line) for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
        return [r for r in records if "loss" in r]
    assert [r["step"] for r in log(run)] == [r["step"] for r in log(expected_run)]
    np.testing.assert_allclose([r["loss"] for r in log(run)], [r["loss"] for r in log(expected_run)],
                               rtol=1e-5 if tolerance <= 1e-6 else 1e-4, atol=1e-6)


def temp_files(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob(".*.tmp"))


def test_kill_9_anywhere_then_resume_ends_like_an_uninterrupted_run(setup, straight, tmp_path):
    out = tmp_path / "run"
    run = flags(setup, out, "--save_steps=2")
    assert len((straight / "training_log.jsonl").read_text().splitlines()) == 5 * EPOCHS

    def position() -> tuple:
        state = torch.load(out / "training_state.pt", weights_only=True)
        return state["epoch"], state["steps_in_epoch"], state["epoch_finished"]

    killed = run_stopped(setup, run, "SIGKILL", when=3)  # inside step 3; the newest state is step 2's
    assert killed.returncode == -signal.SIGKILL and position() == (0, 2, False)
    assert (out / ".train.lock").is_file()  # a dead run's lock: the next run takes it over

    # Resumed, killed while writing its 2nd torch file: step 4's state, then korquad_0.bin.
    killed = run_stopped(setup, run + ["--resume"], "SIGKILL", when=2, where="save")
    assert killed.returncode == -signal.SIGKILL and position() == (0, 4, False)
    assert temp_files(out) and not (out / "korquad_0.bin").exists()

    killed = run_stopped(setup, run + ["--resume"], "SIGKILL", when=3)  # steps 5 (epoch end), 6 (saved), 7
    assert killed.returncode == -signal.SIGKILL and position() == (1, 1, False)
    assert temp_files(out) == []  # the half-written checkpoint of the killed run is gone
    assert (out / "korquad_0.bin").is_file()

    finished = run_script("train.py", *run, "--resume")
    assert finished.returncode == 0, finished.stderr
    assert_same_end(straight, out)
    assert not (out / ".train.lock").exists() and temp_files(out) == []


def test_sigterm_finishes_the_step_writes_the_state_and_says_how_to_resume(setup, straight, tmp_path):
    out = tmp_path / "run"
    stopped = run_stopped(setup, flags(setup, out), "SIGTERM", when=3)
    assert stopped.returncode == 128 + signal.SIGTERM
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stopped.stderr, stopped.stderr
    assert "stopped by SIGTERM after optimizer step 3" in lines[0] and "--resume" in lines[0]
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert (state["epoch"], state["steps_in_epoch"], state["global_step"]) == (0, 3, 3)

    resumed = run_script("train.py", *flags(setup, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_end(straight, out)


def test_resume_skips_consumed_batches_without_collating_or_running_them(setup, tmp_path, monkeypatch):
    import modeling
    import train

    out = tmp_path / "run"
    real_clip, steps = torch.nn.utils.clip_grad_norm_, []

    def clip_and_stop_at_step_2(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler, in this process
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_and_stop_at_step_2)
    with pytest.raises(train.TrainingStopped):
        train.main(flags(setup, out, "--num_train_epochs=1"))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    assert len((out / "training_log.jsonl").read_text().splitlines()) == 2

    collated, forwards = [], []
    real_collate, real_forward = train.collate_features, modeling.QuestionAnswering.forward
    monkeypatch.setattr(train, "collate_features", lambda *a, **kw: collated.append(1) or real_collate(*a, **kw))
    monkeypatch.setattr(modeling.QuestionAnswering, "forward",
                        lambda self, *a, **kw: forwards.append(1) or real_forward(self, *a, **kw))
    train.main(flags(setup, out, "--num_train_epochs=1", "--resume"))
    assert len((out / "training_log.jsonl").read_text().splitlines()) == 5
    assert len(collated) == len(forwards) == 3  # only the steps still to do


def test_second_run_into_a_live_runs_directory_is_refused(setup, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = {"pid": os.getppid(), "host": socket.gethostname(), "started": "earlier", "heartbeat": time.time()}
    (out / ".train.lock").write_text(json.dumps(holder))
    result = run_in_process("train.py", *flags(setup, out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"pid {os.getppid()}" in lines[0] and str(out) in lines[0]
    assert json.loads((out / ".train.lock").read_text()) == holder
    assert sorted(p.name for p in out.iterdir()) == [".train.lock"]  # nothing written, nothing removed


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_dead_runs_lock_and_temp_files_are_taken_over_and_changed_resumes_refused(setup, tmp_path):
    import train

    out = tmp_path / "run"
    out.mkdir()
    gone = dead_pid()
    (out / ".train.lock").write_text(json.dumps({"pid": gone, "host": socket.gethostname(), "started": "x",
                                                 "heartbeat": time.time()}))
    (out / f".korquad_0.bin.{gone}.0123abcd.tmp").write_bytes(b"half a checkpoint")
    (out / f".predictions.json.{os.getpid()}.4567cdef.tmp").write_bytes(b"eval.py writing now")
    train.main(flags(setup, out, "--num_train_epochs=1"))
    assert temp_files(out) == [f".predictions.json.{os.getpid()}.4567cdef.tmp"]  # a live writer's file stays
    assert not (out / ".train.lock").exists()
    args_before = (out / "training_args.json").read_bytes()

    refusals = {
        "--train_file": ([f"--train_file={setup / 'other.json'}"], ["--train_file", "other.json", "train.json"]),
        "--max_seq_length": (["--max_seq_length=128"], ["--max_seq_length was 192", "now 128"]),
        "model config": ([f"--model_config={setup / 'tiny.json'}"], ["dropout_prob was 0.1", "now 0.0"]),
    }
    for name, (changed, expected) in refusals.items():
        with pytest.raises(train.UsageError) as refused:
            train.main(flags(setup, out, "--num_train_epochs=1", "--resume") + changed)
        assert all(part in str(refused.value) for part in expected), (name, str(refused.value))
        assert (out / "training_args.json").read_bytes() == args_before
        assert not (out / ".train.lock").exists()


def test_a_setting_only_the_interrupted_run_had_is_a_difference():
    """A flag recorded only when used (--version_2_with_negative, a teacher) must not vanish unnoticed."""
    from long_run import check_same_settings
    from cli import UsageError

    common = {"--seed": 42}
    with pytest.raises(UsageError, match="the interrupted run had --version_2_with_negative True, this one has "
                                         "none"):
        check_same_settings({**common, "--version_2_with_negative": True}, common, {}, {})
    with pytest.raises(UsageError, match=r"had no --teacher_targets, this one has --teacher_targets new \(sha256 "
                                         r"abcdef012345\)"):
        check_same_settings(common, {**common, "--teacher_targets": "abcdef0123456789"}, {},
                            {"--teacher_targets": "new"})
    check_same_settings(common, dict(common), {}, {})  # the same settings resume


def test_a_torn_last_log_line_is_dropped_on_resume_and_a_damaged_earlier_one_is_named(tmp_path, caplog):
    """training_log.jsonl is appended in place: kill -9 mid-append leaves half a last line."""
    from long_run import keep_log_until, read_log
    from cli import UsageError

    log = tmp_path / "training_log.jsonl"
    lines = [json.dumps({"epoch": 0, "step": step, "loss": 1.0 / step}) + "\n" for step in (1, 2, 3)]
    log.write_text("".join(lines) + '{"epoch": 0, "step"\n')
    with caplog.at_level("WARNING", logger="korquad"):
        keep_log_until(log, 2)
    assert log.read_text() == "".join(lines[:2]) and "line 4 is torn" in caplog.text
    for damaged in (lines[1][:-5] + "\n", lines[1].replace("step", "st\udcffep")):  # cut short; a byte not UTF-8
        log.write_bytes("".join([lines[0], damaged, lines[2]]).encode("utf-8", "surrogateescape"))
        for call in (lambda: read_log(log), lambda: keep_log_until(log, 3)):
            with pytest.raises(UsageError, match=f"^{re.escape(str(log))}: line 2 is not valid JSON"):
                call()


class Foreign:
    """Not a tensor nor a plain value: what a malicious or foreign pickle holds."""


@pytest.mark.parametrize("content", ["empty", "missing key", "foreign object", "garbage"])
def test_unreadable_training_state_is_refused_without_unsafe_advice(content, setup, tmp_path):
    import train

    out = tmp_path / "run"
    out.mkdir()
    state = out / "training_state.pt"
    if content == "empty":
        state.write_bytes(b"")
    elif content == "missing key":
        torch.save({"epoch": 0, "global_step": 3}, state)
    elif content == "foreign object":
        torch.save({"epoch": Foreign()}, state)
    else:
        state.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(train.UsageError) as refused:
        train.main(flags(setup, out, "--resume"))
    message = str(refused.value)
    assert str(state) in message and "not a training state" in message
    assert "weights_only" not in message
    assert not (out / "training_args.json").exists()


def test_best_epoch_is_named_kept_under_save_total_limit_and_curves_drawn(setup, tmp_path, monkeypatch, capsys):
    import matplotlib.image

    import train

    scores = iter([(40.0, 50.0), (70.0, 80.0), (50.0, 60.0)])  # epoch 1 is the best, epoch 2 the last
    monkeypatch.setattr(train, "score", lambda path, predictions: dict(zip(("exact_match", "f1"), next(scores))))
    out = tmp_path / "run"
    train.main(flags(setup, out, "--num_train_epochs=3", "--save_total_limit=1", "--tensorboard",
                     f"--eval_file={setup / 'train.json'}", config="tiny.json"))

    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["epoch"], summary["f1"], summary["best_epoch"], summary["best_f1"]) == (2, 60.0, 1, 80.0)
    assert sorted(p.name for p in out.glob("korquad_*.bin")) == ["korquad_1.bin", "korquad_2.bin"]
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["f1"]) for r in log if "f1" in r] == [(0, 50.0), (1, 80.0), (2, 60.0)]

    image = matplotlib.image.imread(out / "training_curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # lines drawn, not a blank canvas
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_disk_full_while_saving_is_one_line_and_keeps_what_was_written(setup, tmp_path):
    """A file-size limit (what a full disk looks like to a write) small enough for the checkpoint, not the state."""
    out = tmp_path / "run"
    checkpoint_bytes = sum(t.numel() * 4 for t in torch.load(setup / "pretrained.bin", weights_only=True).values())
    limit = int(checkpoint_bytes * 1.6)  # the state also holds Adam's two moments per weight

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *flags(setup, out, "--num_train_epochs=1")],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, preexec_fn=limit_file_size)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "training_state.pt" in lines[0] and "file-size limit" in lines[0] and "intact" in lines[0]
    assert torch.load(out / "korquad_0.bin", weights_only=True).keys()  # written before, still whole
    assert not (out / "training_state.pt").exists() and temp_files(out) == []


def test_torchrun_sigterm_leaves_one_state_and_the_resumed_job_ends_like_an_uninterrupted_one(setup, tmp_path):
    import train

    reference = tmp_path / "single"
    train.main(flags(setup, reference, config="tiny.json"))  # dropout off: ranks draw differently
    out = tmp_path / "ddp"
    ddp_flags = flags(setup, out, "--train_batch_size=2", config="tiny.json")
    stopped = run_stopped(setup, ddp_flags, "SIGTERM", when=3, where="agent", torchrun=True)
    assert stopped.returncode != 0
    assert stopped.stderr.count("stopped by SIGTERM") == 1, stopped.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.pt")) == ["training_state.pt"] and temp_files(out) == []
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert state["global_step"] == state["steps_in_epoch"] >= 3  # the agent relays the signal a little later

    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *ddp_flags, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_end(reference, out, tolerance=1e-4)


DAY = 24 * 3600.0


@pytest.mark.parametrize("host, pid, age, taken", [
    ("here", "live", 5.0, False),
    ("here", "live", 295.0, False),        # a live pid whose heartbeat is just under the 5-minute limit
    ("here", "live", 301.0, True),         # recycled after a container restart: pid 1 lives, the run does not
    ("here", "live", DAY, True),
    ("here", "live", None, False),         # a lock without a heartbeat: only its pid can say
    ("here", "ours", 5.0, True),           # our own pid in a lock we never took: a previous container's process
    ("another-machine", 1, 5.0, False),    # a shared Drive or NFS folder: a pid there cannot be checked
    ("another-machine", 1, 295.0, False),
    ("another-machine", 1, 301.0, True),
])
def test_lock_holder_lives_while_its_pid_lives_here_and_its_heartbeat_is_under_5_minutes(tmp_path, host, pid, age,
                                                                                          taken):
    from long_run import DirectoryLocked, RunLock

    holder = {"pid": {"live": 1, "ours": os.getpid()}.get(pid, pid),
              "host": socket.gethostname() if host == "here" else host, "started": "earlier"}
    if age is not None:
        holder["heartbeat"] = time.time() - age
    (tmp_path / ".train.lock").write_text(json.dumps(holder))
    lock = RunLock(tmp_path)
    if not taken:
        with pytest.raises(DirectoryLocked, match=f"pid {holder['pid']} on {holder['host']}"):
            lock.acquire()
        assert json.loads((tmp_path / ".train.lock").read_text()) == holder
        return
    lock.acquire()
    assert json.loads((tmp_path / ".train.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".train.lock").exists()


def test_heartbeat_is_refreshed_while_the_run_lives_and_never_written_over_a_new_holder(tmp_path, monkeypatch):
    import long_run

    monkeypatch.setattr(long_run, "HEARTBEAT_SECONDS", 0.05)
    path = tmp_path / ".train.lock"
    lock = long_run.RunLock(tmp_path)
    lock.acquire()
    try:
        first = json.loads(path.read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads(path.read_text())["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.01)
        assert json.loads(path.read_text())["heartbeat"] > first
        # Suspended past the stale limit, this run's lock was taken over: its heartbeat must not take it back.
        newcomer = {"pid": 1, "host": socket.gethostname(), "started": "later", "heartbeat": time.time()}
        path.write_text(json.dumps(newcomer))
        time.sleep(0.3)
        assert json.loads(path.read_text()) == newcomer
    finally:
        lock.release()
    assert json.loads(path.read_text()) == newcomer  # releasing removes only its own lock


def _race_for_the_lock(directory: Path, start_at: float, results, everyone_looked) -> None:
    """One contender (a forked process): acquire at `start_at`; a winner holds the lock until all have looked."""
    from long_run import DirectoryLocked, RunLock

    lock = RunLock(directory, program="distill.py")
    while time.time() < start_at:
        pass
    try:
        lock.acquire()
    except DirectoryLocked as refused:
        results.put(("refused", str(refused)))
        return
    results.put(("won", ""))
    everyone_looked.wait(30)
    lock.release()


@pytest.mark.parametrize("links", ["hard links", "no hard links (a FUSE drive)"])
@pytest.mark.parametrize("left_behind", ["no lock", "a dead run's lock"])
def test_of_runs_started_at_the_same_moment_exactly_one_takes_the_lock(tmp_path, monkeypatch, left_behind, links):
    import errno
    import multiprocessing

    if links != "hard links":
        def no_links(*_):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_links)  # the forked contenders inherit it
    context = multiprocessing.get_context("fork")
    contenders = 6
    for round_number in range(3):
        directory = tmp_path / f"round{round_number}"
        directory.mkdir()
        if left_behind != "no lock":
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            (directory / ".train.lock").write_text(json.dumps({"program": "distill.py", "pid": dead.pid,
                                                                "host": socket.gethostname(), "started": "x"}))
        results, everyone_looked = context.Queue(), context.Event()
        start_at = time.time() + 0.5
        processes = [context.Process(target=_race_for_the_lock, args=(directory, start_at, results, everyone_looked))
                     for _ in range(contenders)]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=60) for _ in range(contenders)]
        everyone_looked.set()
        for process in processes:
            process.join(30)
        assert [kind for kind, _ in outcomes].count("won") == 1, outcomes
        assert all("is in use by distill.py pid" in message for kind, message in outcomes if kind == "refused")
        assert not (directory / ".train.lock").exists()  # released by its one holder
        assert sorted(p.name for p in directory.iterdir()) == []  # nothing left aside


def directory_contents(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_new_run_into_a_runs_directory_is_refused_unless_resumed_or_overwritten(setup, straight, tmp_path,
                                                                                monkeypatch):
    import train

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = directory_contents(out)
    with pytest.raises(train.UsageError) as refused:
        train.main(flags(setup, out, "--num_train_epochs=0.2"))
    message = str(refused.value)
    assert f"--output_dir {out} holds a training run" in message
    assert "--resume" in message and "--overwrite_output_dir" in message
    assert directory_contents(out) == before

    # --overwrite_output_dir, killed while the features are built: the old run is still whole.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(train, "load_or_build_table", killed)
        with pytest.raises(KeyboardInterrupt):
            train.main(flags(setup, out, "--num_train_epochs=0.2", "--overwrite_output_dir"))
    assert directory_contents(out) == before

    # Once it trains, nothing of the old 2-epoch run is left to be mistaken for the new one's.
    train.main(flags(setup, out, "--num_train_epochs=0.2", "--overwrite_output_dir"))  # one step
    assert sorted(p.name for p in out.glob("korquad_*.bin")) == ["korquad_0.bin"]
    assert [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()] == [1]
    assert torch.load(out / "training_state.pt", weights_only=True)["global_step"] == 1


def transformers_model_dir(path: Path) -> Path:
    """A BERT model directory as transformers saves one (config.json, model.safetensors, vocab.txt)."""
    from safetensors.torch import save_file

    from modeling import Config, QuestionAnswering, config_to_transformers, to_transformers_state

    path.mkdir()
    torch.manual_seed(0)
    model = QuestionAnswering(Config(**TINY_CONFIG))
    (path / "config.json").write_text(json.dumps(config_to_transformers(model.config)))
    save_file({k: v.contiguous() for k, v in to_transformers_state(model).items()}, str(path / "model.safetensors"))
    shutil.copy(VOCAB_FILE, path / "vocab.txt")
    return path


def test_output_dir_holding_the_model_being_fine_tuned_or_any_transformers_model_is_refused(setup, tmp_path):
    import train

    model_dir = transformers_model_dir(tmp_path / "bert")
    before = directory_contents(model_dir)
    common = [f"--train_file={setup / 'train.json'}", *DATA_FLAGS, "--analyzer=none", "--no_cuda", "--quiet",
              f"--cache_dir={setup / 'cache'}", "--num_train_epochs=1"]
    for source, expected in ((model_dir, "is the model directory given as --checkpoint"),
                             ("none", "holds a transformers model")):
        with pytest.raises(train.UsageError, match=expected) as refused:
            train.main([f"--checkpoint={source}", f"--output_dir={model_dir}", *common,
                        *([f"--model_config={setup / 'tiny.json'}"] if source == "none" else []),
                        "--overwrite_output_dir"])
        assert f"--output_dir {model_dir}" in str(refused.value) and "\n" not in str(refused.value)
        assert directory_contents(model_dir) == before


def call_hook(monkeypatch, owner, name: str, on_call: Callable[[int], None],
              counted: Callable[..., bool] = lambda *args, **kwargs: True) -> list[int]:
    """Patch `owner.name` to run `on_call(n)` before its nth counted call; returns the counted calls' numbers."""
    real, calls = getattr(owner, name), []

    def hooked(*args, **kwargs):
        if counted(*args, **kwargs):
            calls.append(len(calls) + 1)
            on_call(calls[-1])
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, hooked)
    return calls


def sigterm_at(nth: int) -> Callable[[int], None]:
    """Send this process SIGTERM (train.py's own handler takes it) at the nth call."""
    return lambda n: n == nth and os.kill(os.getpid(), signal.SIGTERM)


class Killed(BaseException):
    """What kill -9 does to a run in this process: nothing after that moment runs on (bar `finally` blocks)."""


def kill_at(nth: int) -> Callable[[int], None]:
    def maybe_kill(n: int) -> None:
        if n == nth:
            raise Killed
    return maybe_kill


def in_evaluation(model, *args, **kwargs) -> bool:
    return not model.training


def state_position(output_dir: Path) -> tuple:
    state = torch.load(output_dir / "training_state.pt", weights_only=True)
    return state["epoch"], state["steps_in_epoch"], state["epoch_finished"], state["global_step"], state.get(
        "evaluation_pending")


def evaluations(output_dir: Path) -> list[tuple]:
    records = [json.loads(line) for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
    return [(r["epoch"], r["step"], r["f1"]) for r in records if "f1" in r]


def test_stops_during_evaluation_are_finished_on_resume_and_the_best_epoch_survives_save_total_limit(
        setup, straight, tmp_path, monkeypatch, capsys):
    import modeling
    import train

    scores = iter([(70.0, 80.0), (40.0, 50.0)])  # epoch 0 is the best; an evaluation scores once, when it ends
    monkeypatch.setattr(train, "score", lambda path, predictions: dict(zip(("exact_match", "f1"), next(scores))))
    out = tmp_path / "run"
    run = flags(setup, out, f"--eval_file={setup / 'train.json'}", "--eval_batch_size=2", "--save_total_limit=1")

    # SIGTERM in epoch 0's first evaluation batch: out at once, no further batch nor optimizer step.
    with monkeypatch.context() as patch:
        evaluated = call_hook(patch, modeling.QuestionAnswering, "forward", sigterm_at(1), in_evaluation)
        steps = call_hook(patch, torch.nn.utils, "clip_grad_norm_", lambda n: None)
        with pytest.raises(train.TrainingStopped) as stopped:
            train.main(run)
    assert "stopped by SIGTERM after optimizer step 5" in stopped.value.message
    assert evaluated == [1] and len(steps) == 5
    assert state_position(out) == (0, 0, True, 5, True) and evaluations(out) == []

    # Resumed, it evaluates epoch 0 before anything else, and is killed in that evaluation: still pending.
    with monkeypatch.context() as patch:
        call_hook(patch, modeling.QuestionAnswering, "forward", kill_at(2), in_evaluation)
        steps = call_hook(patch, torch.nn.utils, "clip_grad_norm_", lambda n: None)
        with pytest.raises(Killed):
            train.main(run + ["--resume"])
    assert steps == [] and state_position(out) == (0, 0, True, 5, True) and evaluations(out) == []

    # Resumed again: epoch 0 scored (the best), then stopped in epoch 1's 2nd step.
    with monkeypatch.context() as patch:
        call_hook(patch, torch.nn.utils, "clip_grad_norm_", sigterm_at(2))
        with pytest.raises(train.TrainingStopped):
            train.main(run + ["--resume"])
    assert state_position(out) == (1, 2, False, 7, False) and evaluations(out) == [(0, 5, 80.0)]

    # To the end: epoch 1 scores lower, and the resumed run still knows epoch 0 was the best.
    capsys.readouterr()
    train.main(run + ["--resume"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["epoch"], summary["f1"], summary["best_epoch"], summary["best_f1"]) == (1, 50.0, 0, 80.0)
    assert sorted(p.name for p in out.glob("korquad_*.bin")) == ["korquad_0.bin", "korquad_1.bin"]
    assert evaluations(out) == [(0, 5, 80.0), (1, 10, 50.0)]
    assert_same_end(straight, out)


def test_kill_and_sigterm_with_accumulation_and_sparse_logging_resume_like_an_uninterrupted_run(
        setup, straight_accumulated, tmp_path, monkeypatch):
    """With ACCUMULATED, in this process: each stop falls between loss lines."""
    import train

    out = tmp_path / "run"
    run = flags(setup, out, *ACCUMULATED, "--save_steps=2")
    with monkeypatch.context() as patch:  # killed inside step 3: the newest state is step 2's
        call_hook(patch, torch.nn.utils, "clip_grad_norm_", kill_at(3))
        with pytest.raises(Killed):
            train.main(run)
    assert state_position(out)[:4] == (0, 2, False, 2)
    assert torch.load(out / "training_state.pt", weights_only=True)["loss_count"] == 4  # steps 1-2's micro-batches

    with monkeypatch.context() as patch:  # resumed at step 3, stopped after step 4 (step 3 logged, 4 not)
        call_hook(patch, torch.nn.utils, "clip_grad_norm_", sigterm_at(2))
        with pytest.raises(train.TrainingStopped):
            train.main(run + ["--resume"])
    assert state_position(out)[:4] == (0, 4, False, 4)

    train.main(run + ["--resume"])
    assert [r["step"] for r in map(json.loads, (out / "training_log.jsonl").read_text().splitlines())] == [3, 5]
    assert_same_end(straight_accumulated, out, checkpoint="korquad_0.bin")


def test_kill_9_between_micro_batches_and_after_a_save_then_resume_ends_like_an_uninterrupted_run(
        setup, straight_accumulated, tmp_path):
    """A real kill -9 with ACCUMULATED: once between the two micro-batches of a step, once just after a saved
    state, before the next step's first micro-batch. Each resume skips whole steps' micro-batches."""
    import train

    out = tmp_path / "run"
    run = flags(setup, out, *ACCUMULATED, "--save_steps=2")

    def losses_not_yet_shown() -> int:
        return torch.load(out / "training_state.pt", weights_only=True)["loss_count"]

    # Micro-batches 1-4 are steps 1-2 (state saved, their 4 losses not yet shown); killed after micro-batch 5,
    # the first half of step 3, whose gradient dies with the process.
    killed = run_stopped(setup, run, "SIGKILL", when=6, where="micro_batch")
    assert killed.returncode == -signal.SIGKILL and state_position(out)[:4] == (0, 2, False, 2)
    assert losses_not_yet_shown() == 4

    # Resumed at micro-batch 5: steps 3 (shown) and 4 (saved, its 2 losses pending); killed before step 5.
    killed = run_stopped(setup, run + ["--resume"], "SIGKILL", when=5, where="micro_batch")
    assert killed.returncode == -signal.SIGKILL and state_position(out)[:4] == (0, 4, False, 4)
    assert losses_not_yet_shown() == 2

    train.main(run + ["--resume"])  # to the end in this process: the kills above were the real ones
    assert_same_end(straight_accumulated, out, tolerance=0.0, checkpoint="korquad_0.bin")  # tensor-identical
    assert (out / "training_log.jsonl").read_text() == (straight_accumulated / "training_log.jsonl").read_text()


def test_a_log_line_that_is_json_but_not_a_record_is_named_not_a_traceback(tmp_path):
    from long_run import keep_log_until, read_log
    from cli import UsageError

    log = tmp_path / "training_log.jsonl"
    good = [json.dumps({"epoch": 0, "step": step, "loss": 1.0}) + "\n" for step in (1, 2)]
    for odd in ("{}", "[1, 2]", "3", '{"epoch": 0, "step": "2"}', '{"step": 2.5}', "null"):
        log.write_text(good[0] + odd + "\n" + good[1])
        for call in (lambda: read_log(log), lambda: keep_log_until(log, 3)):
            with pytest.raises(UsageError, match=f'^{re.escape(str(log))}: line 2 is not a log record \\(a JSON '
                                                 f'object with a whole number "step"\\); repair or delete that line$'):
                call()
    log.write_text(good[0] + "\n" + good[1])   # a blank line is no record, and no damage either
    assert [record["step"] for record in read_log(log)] == [1, 2]


def test_resume_into_the_other_programs_run_directory_says_whose_run_it_is(setup, straight, tmp_path):
    import pretrain
    import train

    pretrain_flags = ["--train_files", str(SAMPLE_FILE), f"--model_config={setup / 'tiny.json'}", "--checkpoint=none",
                      "--max_seq_length=64", "--train_batch_size=4", "--max_steps=1", "--no_cuda", "--quiet",
                      f"--cache_dir={tmp_path / 'cache'}"]
    pretrained = tmp_path / "pretrained_run"
    pretrain.main([*pretrain_flags, f"--output_dir={pretrained}"])
    with pytest.raises(train.UsageError) as refused:
        train.main(flags(setup, pretrained, "--resume"))
    assert str(refused.value) == (f"--resume: {pretrained} holds a pretrain.py run, not a train.py run; resume it "
                                  f"with pretrain.py, or train into a new --output_dir")
    fine_tuned = tmp_path / "fine_tuned_run"
    shutil.copytree(straight, fine_tuned)
    before = {path.name: path.read_bytes() for path in fine_tuned.iterdir() if path.is_file()}
    with pytest.raises(pretrain.UsageError) as refused:
        pretrain.main([*pretrain_flags, f"--output_dir={fine_tuned}", "--resume"])
    assert str(refused.value) == (f"--resume: {fine_tuned} holds a train.py run, not a pretrain.py run; resume it "
                                  f"with train.py, or train into a new --output_dir")
    assert {path.name: path.read_bytes() for path in fine_tuned.iterdir() if path.is_file()} == before

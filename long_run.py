"""What keeps a long training run safe and visible, apart from the training itself: one writer per output
directory (a lock file), stop signals turned into a flag, and the training curves picture.

Nothing here knows about the model or the data; train.py and pretrain.py wire these into their loops, and
share from here what both loops need: torchrun ranks, AdamW and its schedule, step seeds, checked checkpoint
writes, resume checks and the loss read-out."""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import pickle
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from cli import UsageError
from devices import pick_device
from atomic_files import atomic_write, pid_is_alive, save_torch_atomic

logger = logging.getLogger("korquad")

LOCK_NAME = ".train.lock"
# A holder on another machine (a shared Drive or NFS folder) cannot be asked whether it lives;
# its heartbeat can: one older than this means it is gone.
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 10 * HEARTBEAT_SECONDS


class DirectoryLocked(RuntimeError):
    """Another live process is writing into the same output directory (a training run, distill.py)."""


class RunLock:
    """`.train.lock` in the output directory: program, pid, host and a heartbeat of the one process writing there.
    A second run is refused while the holder lives; a lock whose process is dead (same host) or whose
    heartbeat stopped (any host) is taken over, so a killed run needs no manual cleanup."""

    def __init__(self, output_dir: Path, program: str = "train.py"):
        self.path = output_dir / LOCK_NAME
        self.program = program
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._started: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock or raise DirectoryLocked naming its live holder. Creating the file is one atomic
        step, so of two runs started at the same moment exactly one gets it and the other is refused."""
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")
        for _ in range(5):
            if self._create():
                break
            holder = self._read_lock(wait_for_content=True)
            if holder is None:
                continue  # its holder released it between our two looks: try again
            if self._holder_is_alive(holder):
                raise DirectoryLocked(
                    f"{self.path.parent} is in use by {holder.get('program', 'train.py')} pid {holder.get('pid')} "
                    f"on {holder.get('host')} (started {holder.get('started')}); wait for it, stop it, or choose "
                    f"another --output_dir")
            logger.warning("taking over the lock of a dead run (pid %s on %s) in %s",
                           holder.get("pid"), holder.get("host"), self.path.parent)
            self._remove_dead_lock(holder)
        else:
            raise DirectoryLocked(f"{self.path.parent}: other runs keep taking and leaving the lock; try again")
        self._thread = threading.Thread(target=self._beat, name="train-lock-heartbeat", daemon=True)
        self._thread.start()

    def _create(self) -> bool:
        """Create the lock file holding our record unless one exists (False then). A hard link of a written
        temporary file: the lock never exists half-written. Where links are not supported (some FUSE mounts
        of shared drives), exclusive creation and then the write; readers wait for its content."""
        temp = self.path.with_name(f".{self.path.name}.{self.pid}.{secrets.token_hex(4)}.tmp")
        temp.write_text(json.dumps(self._record()), encoding="utf-8")
        try:
            os.link(temp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            pass
        finally:
            temp.unlink(missing_ok=True)
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(json.dumps(self._record()))
        return True

    def _remove_dead_lock(self, dead: dict) -> None:
        """Move the dead holder's lock aside, atomically, so that two runs taking it over cannot both win;
        a lock that turns out to be a new one, taken in between, goes back."""
        aside = self.path.with_name(f".{self.path.name}.{self.pid}.{secrets.token_hex(4)}.tmp")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run moved it first
        try:
            if json.loads(aside.read_text(encoding="utf-8")) != dead:
                self._put_back(aside)
        except (OSError, ValueError):
            pass  # unreadable: it was the dead one
        finally:
            aside.unlink(missing_ok=True)

    def _put_back(self, aside: Path) -> None:
        try:
            os.link(aside, self.path)
        except FileExistsError:
            pass  # a newer lock is there already: it stays
        except OSError:  # no hard links here
            if not self.path.exists():
                os.rename(aside, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._is_mine(self._read_lock()):
            self.path.unlink(missing_ok=True)

    def _record(self) -> dict:
        return {"program": self.program, "pid": self.pid, "host": self.host, "started": self._started,
                "heartbeat": time.time()}

    def _write(self) -> None:
        record = self._record()
        atomic_write(self.path, lambda file: file.write(json.dumps(record).encode("utf-8")))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            if not self._is_mine(self._read_lock()):
                # Taken over after a pause longer than the stale limit (a suspended process): never write over it.
                logger.warning("%s was taken over by another run; no longer refreshing it", self.path)
                return
            try:
                self._write()
            except OSError as err:  # a full disk must not kill training; the next save says so
                logger.warning("could not refresh %s (%s)", self.path, err)

    def _read_lock(self, wait_for_content: bool = False) -> dict | None:
        """The lock's record, None without a lock, {} for an unreadable one (which counts as dead). With
        `wait_for_content`, an unreadable lock is read again for up to a second: one created by exclusive
        creation is empty until its writer has written it."""
        for attempt in range(20 if wait_for_content else 1):
            try:
                record = json.loads(self.path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return None
            except (OSError, ValueError):
                if attempt < 19 and wait_for_content:
                    time.sleep(0.05)
                continue
            return record if isinstance(record, dict) else {}
        return {}

    def _is_mine(self, record: dict | None) -> bool:
        return bool(record) and (record.get("pid"), record.get("host"), record.get("started")) == (
            self.pid, self.host, self._started)

    def _holder_is_alive(self, record: dict) -> bool:
        """Same host: its pid lives and its heartbeat (if any) is fresh; another host: its heartbeat is fresh.
        After a container restart pids are recycled: the recorded pid may be ours or some other live
        process (pid 1), so a stale heartbeat wins over a live pid."""
        pid, host, heartbeat = record.get("pid"), record.get("host"), record.get("heartbeat")
        has_heartbeat = isinstance(heartbeat, (int, float)) and not isinstance(heartbeat, bool)
        fresh = has_heartbeat and time.time() - heartbeat < STALE_AFTER_SECONDS
        if host == self.host and isinstance(pid, int):
            return pid != self.pid and pid_is_alive(pid) and (fresh or not has_heartbeat)
        return host is not None and fresh


class StopSignals:
    """While active, SIGTERM and SIGINT only set `requested` (the loop stops at the next step or batch boundary);
    further signals change nothing: under torchrun or Slurm one stop arrives several times at once."""
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signal handlers live only there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum)
            logger.info("%s received: stopping after the current optimizer step or evaluation batch",
                        self.requested.name)


def read_log(log_file: Path) -> list[dict]:
    """training_log.jsonl's records. Its lines are appended in place: a torn last line (a crash mid-append) is
    dropped with a warning; any other line that is not JSON (or not UTF-8), or not a record, is refused, naming it."""
    lines = log_file.read_bytes().splitlines() if log_file.is_file() else []
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError from a damaged byte
            if any(rest.strip() for rest in lines[number:]):
                raise UsageError(f"{log_file}: line {number} is not valid JSON; repair or delete that line") from None
            logger.warning("%s: line %d is torn (the run was killed while writing it); dropped", log_file, number)
            continue
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise UsageError(f'{log_file}: line {number} is not a log record (a JSON object with a whole number '
                             f'"step"); repair or delete that line')
        records.append(record)
    return records


def plot_training_curves(records: Sequence[dict], path: Path) -> None:
    """Loss and learning rate over optimizer steps, and EM/F1 per epoch where evaluated, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display on a server or in a Colab worker
    import matplotlib.pyplot as plt

    losses = [r for r in records if "loss" in r]
    scores = [r for r in records if "f1" in r]
    # Fixed margins: tight_layout would double the drawing time, paid after every evaluation.
    figure, axes = plt.subplots(1, 3 if scores else 2, figsize=(15 if scores else 10, 4), squeeze=False,
                                gridspec_kw=dict(left=0.06, right=0.98, bottom=0.13, top=0.92, wspace=0.25))
    axes = axes[0]
    axes[0].plot([r["step"] for r in losses], [r["loss"] for r in losses], color="tab:blue")
    axes[0].set(title="training loss", xlabel="optimizer step", ylabel="loss")
    axes[1].plot([r["step"] for r in losses], [r["lr"] for r in losses], color="tab:orange")
    axes[1].set(title="learning rate", xlabel="optimizer step", ylabel="learning rate")
    if scores:
        epochs = [r["epoch"] for r in scores]
        axes[2].plot(epochs, [r["exact_match"] for r in scores], marker="o", label="exact match")
        axes[2].plot(epochs, [r["f1"] for r in scores], marker="o", label="F1")
        axes[2].set(title="evaluation", xlabel="epoch", ylabel="score")
        axes[2].xaxis.get_major_locator().set_params(integer=True)
        axes[2].legend()
    for axis in axes:
        axis.grid(alpha=0.3)
    try:
        atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
    finally:
        plt.close(figure)


# --- what the training loops of train.py and pretrain.py share ----------------------------

T = TypeVar("T")
NO_DECAY = ("bias", "LayerNorm.weight", "attention_norm.weight", "ffn_norm.weight")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or training state could not be written (disk full, file-size limit)."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run after writing a resumable state; `message` says how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (a single process is rank 0 of 1)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cpu_group: object = None  # a gloo group for small CPU-side agreements (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run `work` on rank 0 only (None elsewhere); if it fails there, every rank stops."""
        if not self.enabled:
            return work()
        result = None
        if self.is_main:
            try:
                result = work()
            except BaseException:
                self._all_succeeded(False)
                raise
        if not self._all_succeeded(True):
            raise UsageError("rank 0 failed while preparing the data; its error message says why")
        return result

    def main_first(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0, then on the other ranks (which then find rank 0's cache)."""
        result = self.on_main(work)
        return result if self.is_main else work()

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a CPU all-reduce: no GPU sync)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(value.item())

    def _all_succeeded(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def setup_distributed(no_cuda: bool) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), pick_device(no_cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(no_cuda)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    cpu_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return Distributed(int(os.environ["RANK"]), world_size, local_rank, device, cpu_group), device


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (none on biases and LayerNorm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, eps=args.adam_epsilon, fused=device.type == "cuda")


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning rate rising linearly over the warm-up, then falling linearly to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def file_digest(flag: str, path: str | os.PathLike) -> str:
    """sha256 of a file's contents: what identifies a train file or vocab, whatever its name."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    return digest.hexdigest()


def check_same_settings(saved: dict, current: dict, saved_paths: dict, current_paths: dict) -> None:
    """Refuse a resume whose settings differ from the interrupted run's, naming the first difference."""
    advice = "resume with the interrupted run's settings, or train into a new --output_dir"
    # A setting only one of the runs has (a teacher, --version_2_with_negative) differs too.
    for name in [*current, *(name for name in saved if name not in current)]:
        was, now = ("not given" if value is None else value for value in (saved.get(name), current.get(name)))
        if was == now:
            continue
        if name not in current:
            raise UsageError(f"--resume: the interrupted run had {name} {_setting_shown(name, saved, saved_paths)}, "
                             f"this one has none; {advice}")
        if name not in saved:
            raise UsageError(f"--resume: the interrupted run had no {name}, this one has {name} "
                             f"{_setting_shown(name, current, current_paths)}; {advice}")
        if name in current_paths:  # files: compared by contents, shown by name
            raise UsageError(f"--resume: {name} {current_paths[name]} (sha256 {now[:12]}) differs from the "
                             f"interrupted run's {saved_paths.get(name)} (sha256 {str(was)[:12]}); {advice}")
        if isinstance(now, dict) and isinstance(was, dict):
            key = next(k for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k))
            raise UsageError(f"--resume: {name} {key} was {was.get(key)} in the interrupted run, now {now.get(key)}; "
                             f"{advice}")
        raise UsageError(f"--resume: {name} was {was} in the interrupted run, now {now}; {advice}")


def _setting_shown(name: str, settings: dict, paths: dict) -> str:
    """A setting as a refusal names it: a file by its path and the start of its digest, else its value."""
    value = settings[name]
    return f"{paths[name]} (sha256 {str(value)[:12]})" if name in paths else str(value)


def read_training_state(path: Path, keys: Sequence[str], writer: str) -> dict:
    """A training state written by `writer` (train.py, pretrain.py), read safely, with every one of `keys`;
    anything else (the other program's state too) is refused with what it is not."""
    what = f"not a training state written by {writer}"
    remedy = "delete it to start over, or train into a new --output_dir"
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: empty file, {what}; {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False: wrong for a damaged file, unsafe for a malicious one.
        raise UsageError(f"{path}: {what} (it holds objects other than tensors and plain values; "
                         f"nothing in it was run); {remedy}") from None
    except Exception:  # truncated, not a zip/pickle at all: torch raises several types
        raise UsageError(f"{path}: {what} (damaged or not a torch file); {remedy}") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: {what} (it holds a {type(state).__name__}); {remedy}")
    paths = state["paths"] if isinstance(state.get("paths"), dict) else {}   # its input flag tells who wrote it
    owner = "pretrain.py" if "--train_files" in paths else "train.py" if "--train_file" in paths else writer
    if owner != writer:
        raise UsageError(f"--resume: {path.parent} holds a {owner} run, not a {writer} run; resume it with "
                         f"{owner}, or train into a new --output_dir")
    missing = [key for key in keys if key not in state]
    if missing:
        raise UsageError(f"{path}: {what} or by an older version (no {', '.join(missing)}); {remedy}")
    return state


def save_checked(obj, path: Path) -> None:
    """`save_torch_atomic`, with a failed write (disk full, file-size limit) as one line that says nothing was lost."""
    try:
        save_torch_atomic(obj, path)
    except (OSError, RuntimeError) as err:
        # torch reports a failed write as a RuntimeError whose context is the OSError that says why.
        cause = err if isinstance(err, OSError) else err.__context__
        code = cause.errno if isinstance(cause, OSError) else None
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EFBIG: "the file-size limit is reached"}.get(code) or " ".join(str(cause or err).split())
        raise CheckpointWriteError(f"{path}: could not be written ({reason}); nothing was replaced, the previous "
                                   f"{path.name} (if any) is intact; free space, then rerun with --resume") from None


def step_seed(seed: int, epoch: int, step_in_epoch: int, rank: int) -> int:
    """The random seed of one optimizer step: dropout depends on where a step is, not on how the run got there,
    so a run resumed mid-epoch draws what an uninterrupted one would have drawn."""
    return int(np.random.SeedSequence([seed, epoch, step_in_epoch, rank]).generate_state(1, np.uint64)[0])


def keep_log_until(log_file: Path, last_step: int) -> None:
    """Drop log lines past `last_step` (all for a fresh run; what a resumed run will redo) and a torn last line."""
    if log_file.is_file():  # json.dumps, as train.py and pretrain.py write each line: kept lines stay the same
        kept = [record for record in read_log(log_file) if record["step"] <= last_step]
        atomic_write(log_file, lambda file: file.write("".join(f"{json.dumps(r)}\n" for r in kept).encode("utf-8")))


def read_loss(loss_sum: torch.Tensor, count: int, first_bad_step: torch.Tensor, ctx: Distributed) -> float:
    """The mean loss since the last read-out over all ranks; raises on every rank if any saw a non-finite loss."""
    mean_loss = (loss_sum / max(count, 1)).reshape(1)
    bad_step = first_bad_step.reshape(1).clone()
    if ctx.enabled:
        dist.all_reduce(mean_loss)
        mean_loss /= ctx.world_size
        dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
    mean, bad = mean_loss.item(), int(bad_step.item())
    if bad >= 0:
        raise TrainingDiverged(f"non-finite loss at optimizer step {bad}; stopped without writing this epoch's "
                               "checkpoint (try a lower --learning_rate)")
    return mean

"""What keeps a long training run safe and visible, apart from the training itself: one writer per
output directory (a lock file), removal of a killed process's temporary files, stop signals turned
into a flag, and the training curves picture.

Nothing here knows about the model or the data; train.py wires these into its loop.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from korquad_utils import atomic_write

logger = logging.getLogger("korquad")

LOCK_NAME = ".train.lock"
# A holder on another machine (a shared Drive or NFS folder) cannot be asked whether it lives;
# its heartbeat can: one older than this means it is gone.
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 10 * HEARTBEAT_SECONDS
# korquad_utils.atomic_write names its temporary files `.{name}.{pid}.{random hex}.tmp`.
TEMP_FILE = re.compile(r"^\..+\.(\d+)\.[0-9a-f]+\.tmp$")


class DirectoryLocked(RuntimeError):
    """Another live process is training into the same output directory."""


def pid_is_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just someone else's
        return True
    return True


class RunLock:
    """`.train.lock` in the output directory: pid, host and a heartbeat of the one process writing there.

    A second run is refused while the holder lives; a lock whose process is dead (same host) or whose
    heartbeat stopped (any host) is taken over, so a killed run needs no manual cleanup.
    """

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_NAME
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._started: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        holder = self._read_lock()
        if holder is not None and self._holder_is_alive(holder):
            raise DirectoryLocked(
                f"{self.path.parent} is in use by train.py pid {holder.get('pid')} on {holder.get('host')} "
                f"(started {holder.get('started')}); wait for it, stop it, or choose another --output_dir")
        if holder is not None:
            logger.warning("taking over the lock of a dead run (pid %s on %s) in %s",
                           holder.get("pid"), holder.get("host"), self.path.parent)
        self._started = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write()
        if not self._is_mine(self._read_lock()):  # another run took it over in the same instant
            raise DirectoryLocked(f"{self.path.parent}: another train.py took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, name="train-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._is_mine(self._read_lock()):
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        record = {"pid": self.pid, "host": self.host, "started": self._started, "heartbeat": time.time()}
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

    def _read_lock(self) -> dict | None:
        """The lock's record, None without a lock, {} for an unreadable one (which counts as dead)."""
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _is_mine(self, record: dict | None) -> bool:
        return bool(record) and (record.get("pid"), record.get("host"), record.get("started")) == (
            self.pid, self.host, self._started)

    def _holder_is_alive(self, record: dict) -> bool:
        """Same host: its pid lives and its heartbeat (if any) is fresh; another host: its heartbeat is fresh.

        After a container restart pids are recycled: the recorded pid may be ours or some other live
        process (pid 1), so a stale heartbeat wins over a live pid.
        """
        pid, host, heartbeat = record.get("pid"), record.get("host"), record.get("heartbeat")
        has_heartbeat = isinstance(heartbeat, (int, float)) and not isinstance(heartbeat, bool)
        fresh = has_heartbeat and time.time() - heartbeat < STALE_AFTER_SECONDS
        if host == self.host and isinstance(pid, int):
            return pid != self.pid and pid_is_alive(pid) and (fresh or not has_heartbeat)
        return host is not None and fresh


def remove_dead_temp_files(directory: Path) -> list[Path]:
    """Delete temporary files that a killed process left in `directory` (up to a whole checkpoint each).

    Only files whose writer is dead go: eval.py may be writing into the same directory right now.
    """
    removed = []
    for path in directory.iterdir():
        match = TEMP_FILE.match(path.name)
        if match and path.is_file() and not pid_is_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d temporary file(s) of a killed run in %s", len(removed), directory)
    return removed


class StopSignals:
    """While active, SIGTERM and SIGINT only set `requested` (the loop stops at the next step or batch boundary).

    Further signals change nothing: under torchrun or Slurm one stop arrives several times at once.
    """

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
    if not log_file.is_file():
        return []
    return [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines() if line.strip()]


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

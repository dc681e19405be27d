"""notebooks/korquad_colab.ipynb: committed without outputs, every command in it documented in the Colab guide of
both languages (docs/ko/colab.md, docs/en/colab.md), and in
demo mode (KORQUAD_DEMO=1) executed top to bottom in a real kernel, where an interrupted training cell resumes
when run again and the evaluation cell prints what `make demo` prints."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "korquad_colab.ipynb"
COLAB_GUIDES = [ROOT / "docs" / language / "colab.md" for language in ("ko", "en")]
DEMO_STEPS = 360          # make demo: 40 epochs of 9 optimizer steps
INTERRUPT_AT_STEP = 60    # a logged step well inside the run
TIMEOUT = 1800            # seconds, per cell and for make demo: generous for a loaded 2-core box (35 s idle)


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def tagged(notebook, tag: str):
    (cell,) = [cell for cell in code_cells(notebook) if tag in cell.metadata.get("tags", [])]
    return cell


def output_text(cell) -> str:
    """What a cell printed (streams, plain-text results and an error's name and message)."""
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}")
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(part if part.endswith("\n") else part + "\n" for part in parts)


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    assert len(cells) >= 8
    for cell in cells:
        assert cell.outputs == [] and cell.execution_count is None, f"outputs left in cell: {cell.source[:60]!r}"
    assert 'DEMO = os.environ.get("KORQUAD_DEMO", "0") == "1"' in cells[0].source


def test_every_command_in_the_notebook_is_documented_in_the_colab_guides():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    source = "\n".join(cell.source for cell in code_cells(notebook))
    scripts = set(re.findall(r'"([a-z_0-9]+\.py)"', source))
    assert {"download.py", "train.py", "eval.py", "export.py", "distill.py"} <= scripts
    flags = set(re.findall(r"(--[a-z][a-z_]+)", source))
    assert {"--resume", "--save_steps", "--eval_file", "--teacher_targets"} <= flags
    programs = {'"git", "clone"': "git clone", '"pip", "install"': "pip install", '"gdown"': "gdown"}
    for guide in COLAB_GUIDES:
        text = guide.read_text(encoding="utf-8")
        missing = sorted(s for s in scripts | flags if s not in text)
        missing += [shown for written, shown in programs.items() if written in source and shown not in text]
        assert not missing, f"the notebook runs what {guide.relative_to(ROOT)} does not document: {missing}"
        assert "https://colab.research.google.com/github/" in text and "notebooks/korquad_colab.ipynb" in text
        assert "predict.Reader" in text or "from predict import Reader" in text


# `make demo` and the notebook run side by side, one thread each, so that each has a core of its own and the
# two train with the same arithmetic (thread counts change float summation order).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def make_demo_scores(directory: Path) -> dict:
    """The last line `make demo` prints, from the Makefile's own commands (its .venv set-up skipped)."""
    command = ["make", "-s", "-o", ".venv/.installed", "demo", f"DEMO_DIR={directory}", f"PY={sys.executable}"]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, env={**os.environ, **ONE_THREAD}) as made:
        try:
            stdout, stderr = made.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(made.pid, signal.SIGKILL)  # make's train.py too
            raise
    assert made.returncode == 0, stderr[-2000:]
    return json.loads(stdout.strip().splitlines()[-1])


def venv_kernel(kernel_dirs: Path) -> AsyncKernelManager:
    """A kernel running this interpreter (the venv's python), whatever kernels the machine has installed."""
    spec = kernel_dirs / "korquad-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "korquad test", "language": "python"}))
    return AsyncKernelManager(kernel_name="korquad-test", connection_file=str(kernel_dirs / "connection.json"),
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dirs)]))


def interrupt_when_logged(km: AsyncKernelManager, log_file: Path, step: int, done: threading.Event,
                          sent: list) -> None:
    """A kernel interrupt (what ■ sends) once training_log.jsonl has reached `step`."""
    while not done.wait(0.2):
        records = [json.loads(line) for line in log_file.read_text(encoding="utf-8").splitlines()
                   if line.strip()] if log_file.is_file() else []
        if any(record.get("step", 0) >= step for record in records):
            asyncio.run(km.interrupt_kernel())
            sent.append(max(record["step"] for record in records))
            return


def run_demo_notebook(work: Path) -> dict:
    """Execute the notebook in demo mode (writing into `work`) top to bottom, as a user would: the training cell is
    interrupted once training has logged INTERRUPT_AT_STEP, then run again. Returns what the test looks at."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    km = venv_kernel(work / "kernels")
    client = NotebookClient(notebook, km=km, timeout=TIMEOUT,
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    drive = work / "drive"
    env = {**os.environ, **ONE_THREAD, "KORQUAD_DEMO": "1", "KORQUAD_DEMO_DIR": str(drive)}
    train_cell, eval_cell = tagged(notebook, "train"), tagged(notebook, "evaluate")
    seen = {"drive": drive}
    with client.setup_kernel(env=env):
        for index, cell in enumerate(notebook.cells):
            if cell is not train_cell:
                client.execute_cell(cell, index)
                continue
            done, sent = threading.Event(), []
            watcher = threading.Thread(target=interrupt_when_logged,
                                       args=(km, drive / "demo" / "training_log.jsonl", INTERRUPT_AT_STEP, done, sent))
            watcher.start()
            try:
                with pytest.raises(CellExecutionError, match="KeyboardInterrupt"):
                    client.execute_cell(cell, index)
            finally:
                done.set()
                watcher.join()
            seen.update(interrupt_sent=bool(sent), interrupted=output_text(cell))
            client.execute_cell(cell, index)  # the same cell again
            seen.update(resumed=output_text(cell), resumed_outputs=list(cell.outputs))
    seen["evaluation"] = output_text(eval_cell)
    return seen


def test_demo_mode_runs_resumes_after_an_interrupt_and_scores_like_make_demo(tmp_path):
    made: dict = {}

    def run_make_demo() -> None:
        try:
            made["scores"] = make_demo_scores(tmp_path / "make_demo")
        except BaseException as err:  # re-raised below, in the test's own thread
            made["error"] = err

    beside = threading.Thread(target=run_make_demo)
    beside.start()
    try:
        seen = run_demo_notebook(tmp_path)
    finally:
        beside.join()
    if "error" in made:
        raise made["error"]
    expected = made["scores"]

    assert seen["interrupt_sent"], "training ended before the test could interrupt it"
    stopped = re.search(r"train\.py: stopped by SIGINT after optimizer step (\d+)", seen["interrupted"])
    assert stopped, seen["interrupted"][-3000:]
    stop_step = int(stopped.group(1))
    assert INTERRUPT_AT_STEP <= stop_step < DEMO_STEPS
    resuming = re.search(r"resuming at epoch \d+, step \d+ of \d+ \(optimizer step (\d+)\)", seen["resumed"])
    assert resuming and int(resuming.group(1)) == stop_step, seen["resumed"][-3000:]
    assert "starting from the first epoch" not in seen["resumed"]
    assert any("image/png" in output.get("data", {}) for output in seen["resumed_outputs"]), "no curves shown inline"
    drive = seen["drive"]
    assert (drive / "demo" / "korquad_39.bin").is_file()

    last_json = [line for line in seen["evaluation"].splitlines() if line.startswith("{")][-1]
    assert json.loads(last_json) == expected
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json"} <= {
        path.name for path in (drive / "demo_transformers").iterdir()}

"""bench.py's refusals and skips: checked up front, one line each, before any row's work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import bench
from benchmarks import harness


def _block(monkeypatch, *modules: str) -> None:
    """Make `modules` unimportable, as if they were not installed (a None entry in sys.modules)."""
    for module in modules:
        for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, module, None)


def _no_row_work(monkeypatch) -> None:
    """Fail the test if a row goes past its dependency check (these are its first uses of the dev set)."""
    def work(*args, **kwargs):
        raise AssertionError("the row started its work")
    monkeypatch.setattr("benchmarks.onnx_profile.dev_questions", work)
    monkeypatch.setattr("benchmarks.pretraining._reference_corpus", work)
    monkeypatch.setattr("benchmarks.answering.dev_questions", work)


@pytest.mark.parametrize("row, module, says", [
    ("onnx_profile", "onnxruntime",
     "onnx_profile: skipped (pip install onnxruntime; it is needed for this benchmark only)"),
    ("onnx_profile", "onnx", "onnx_profile: skipped (pip install onnx; it is needed for this benchmark only)"),
    ("pretrain_reference", "transformers",
     "pretrain_reference: skipped (pip install transformers; it is needed for this benchmark only)"),
    ("predict", "onnxruntime", "predict: skipped (pip install onnxruntime; it is needed for this benchmark only)"),
    ("onnx_agreement", "onnx", "onnx_agreement: skipped (pip install onnx; it is needed for this benchmark only)"),
])
def test_a_row_without_its_optional_dependency_is_skipped_in_one_line(row, module, says, tmp_path, monkeypatch,
                                                                      capsys):
    _block(monkeypatch, module)
    _no_row_work(monkeypatch)
    dev = tmp_path / "dev.json"
    dev.write_text("{}")
    bench.main(["--only", row, "--dev", str(dev), "--steps=3", "--seeds=1", "--batch_sizes=2",
                f"--checkpoint={tmp_path}"])
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if not line.startswith("provenance.")] == [says]
    versions = next(line for line in out if line.startswith("provenance.versions: "))
    assert f"{module} not importable" in versions or module == "onnx"  # onnx is not among provenance's packages


def test_provenance_does_not_give_a_version_for_a_package_that_cannot_be_imported(monkeypatch, capsys):
    _block(monkeypatch, "onnxruntime")
    harness.print_provenance()
    versions = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("provenance.versions"))
    assert "onnxruntime not importable" in versions and "torch 2." in versions


@pytest.fixture
def fake_rows(monkeypatch) -> list[str]:
    """Every row replaced by one that records its name, and no provenance: a check that fails to stop bench.py
    then fails the test at once instead of running the rows (hours)."""
    ran: list[str] = []
    monkeypatch.setattr(bench, "BENCHMARKS", {name: lambda args, name=name: ran.append(name) for name in bench.ORDER})
    monkeypatch.setattr(bench, "print_provenance", lambda: None)
    return ran


@pytest.mark.parametrize("only", ["", ",", ",,"])
def test_an_empty_only_is_refused_not_read_as_every_row(only, fake_rows, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main([f"--only={only}"])
    assert fake_rows == [] and capsys.readouterr().out == ""
    assert exit_info.value.code == f"bench.py: --only {only!r} names no benchmark (leave --only out to run them all)"


def _fake_git(monkeypatch, returncode: int | None) -> list[list[str]]:
    """subprocess.run replaced by a git that answers `returncode` (None: git is not installed)."""
    calls: list[list[str]] = []

    def run(command, **kwargs):
        calls.append(list(command))
        if returncode is None:
            raise FileNotFoundError(2, "No such file or directory", "git")
        return subprocess.CompletedProcess(command, returncode, "", "")
    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_compare_rev_that_is_not_a_commit_is_refused_before_any_row(fake_rows, monkeypatch, capsys):
    calls = _fake_git(monkeypatch, 128)  # what `git rev-parse --verify` answers for an unknown revision
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--compare_rev", "nosuchrev", "--only=train_scale"])
    assert calls == [["git", "-C", str(Path(bench.__file__).resolve().parent), "rev-parse", "--verify", "--quiet",
                      "nosuchrev^{commit}"]]
    assert fake_rows == [] and capsys.readouterr().out == ""
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith("bench.py: --compare_rev 'nosuchrev': not a commit of the git repository at ")


@pytest.mark.parametrize("revision", ["", "-x"])
def test_compare_rev_empty_or_like_an_option_is_refused_without_asking_git(revision, fake_rows, monkeypatch):
    calls = _fake_git(monkeypatch, 0)
    with pytest.raises(SystemExit, match=r"^bench\.py: --compare_rev .*: not a commit of the git repository at "):
        bench.main([f"--compare_rev={revision}", "--only=train_scale"])
    assert calls == [] and fake_rows == []


def test_compare_rev_without_git_is_one_line(fake_rows, monkeypatch):
    _fake_git(monkeypatch, None)
    with pytest.raises(SystemExit, match=r"^bench\.py: --compare_rev needs git \(No such file or directory\)$"):
        bench.main(["--compare_rev", "HEAD~1", "--only=train_scale"])
    assert fake_rows == []


def test_compare_rev_that_git_knows_goes_on_to_the_rows(fake_rows, monkeypatch):
    _fake_git(monkeypatch, 0)
    bench.main(["--compare_rev", "HEAD~1", "--only=max_context"])
    assert fake_rows == ["max_context"]

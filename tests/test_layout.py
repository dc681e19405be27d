"""The code's layout: one file per command at the top level, library modules that hold one concept each and
stay small, and imports that never run from a library module back up to a command. A command may keep its parts
in a package of its own (bench.py's rows in benchmarks/): those modules belong to the command, so they may import
other commands, and they stay as small as library modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"train", "eval", "predict", "export", "distill", "pretrain", "serve", "submit", "bench", "download"}
# Packages that are part of a command, by the command they belong to.
COMMAND_PACKAGES = {"benchmarks": "bench"}
# The baseline's model and tokenizer keep their names and their size.
LARGE_BY_NAME = {"modeling", "tokenization"}
MAX_LIBRARY_LINES = 520


def library_modules() -> list[Path]:
    return sorted(path for path in ROOT.glob("*.py") if path.stem not in COMMANDS)


def command_package_modules() -> list[Path]:
    return sorted(path for package in COMMAND_PACKAGES for path in (ROOT / package).glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_command_is_a_file_at_the_top_level():
    assert {path.stem for path in ROOT.glob("*.py")} >= COMMANDS
    assert set(COMMAND_PACKAGES.values()) <= COMMANDS and all((ROOT / package).is_dir() for package in COMMAND_PACKAGES)


def test_no_library_module_imports_a_command():
    offenders = {path.name: sorted(imported_modules(path) & (COMMANDS | set(COMMAND_PACKAGES)))
                 for path in library_modules()}
    assert not {name: found for name, found in offenders.items() if found}


def test_library_modules_stay_small():
    sizes = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in library_modules()
             if path.stem not in LARGE_BY_NAME}
    assert max(sizes.values()) <= MAX_LIBRARY_LINES, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_command_packages_stay_small():
    sizes = {str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
             for path in command_package_modules()}
    assert sizes and max(sizes.values()) <= MAX_LIBRARY_LINES, sorted(sizes.items(), key=lambda item: -item[1])[:3]


def test_bench_runs_every_row_of_benchmarks_once():
    import bench
    from benchmarks.harness import BENCHMARKS

    assert len(set(bench.ORDER)) == len(bench.ORDER) and set(bench.ORDER) == set(BENCHMARKS)

"""The READMEs and the guides in docs/ko and docs/en: every command they show is one a named test or CI runs, the
two languages show the same commands under the same sections, links resolve, the READMEs stay small, and every
figure lives in docs/measurements.md with the command that prints it."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
LANGUAGES = {"ko": ROOT / "README.md", "en": ROOT / "README.en.md"}
README_LIMIT_BYTES = 15 * 1024
MEASUREMENTS = DOCS / "measurements.md"
# The line right after a command block names what runs it, in the guide's language.
RUN_BY = {"ko": "실행하는 테스트:", "en": "Run by:"}
# Runners that are not test functions: CI's entry point and the Makefile (make demo / make test).
OTHER_RUNNERS = {".ci/run", "Makefile"}
# A command's program, and how a runner's source shows that it runs it.
PROGRAM_ALIASES = {"torchrun": ("torchrun", "torch.distributed.run")}


@dataclass(frozen=True)
class CommandBlock:
    """One fenced bash or python block of a markdown file: its commands without comments, and who runs it."""
    language: str
    commands: tuple[str, ...]
    runners: tuple[str, ...]
    section: int          # index of the heading the block sits under
    line: int


def guide_names(language: str) -> list[str]:
    return sorted(path.name for path in (DOCS / language).glob("*.md"))


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every markdown heading outside code blocks."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) (.+)", line)):
            found.append((len(match.group(1)), match.group(2)))
    return found


def without_comment(line: str) -> str:
    """A shell or python line without its trailing `# ...` comment (comments are translated; commands are not)."""
    return re.sub(r"(^|\s)#.*$", "", line).rstrip()


def command_blocks(text: str, language: str) -> list[CommandBlock]:
    """The bash and python blocks of a markdown file, each with the runners named on the line after it."""
    lines = text.splitlines()
    blocks, section, index = [], -1, 0
    while index < len(lines):
        line = lines[index]
        if re.match(r"#{1,6} ", line):
            section += 1
        opening = re.match(r"```(\w*)$", line)
        if not opening:
            index += 1
            continue
        end = lines.index("```", index + 1)
        if opening.group(1) in ("bash", "python"):
            joined = "\n".join(without_comment(body) for body in lines[index + 1:end]).replace("\\\n", " ")
            commands = tuple(" ".join(command.split()) for command in joined.splitlines() if command.strip())
            following = next((later for later in lines[end + 1:] if later.strip()), "")
            runners = tuple(re.findall(r"`([^`]+)`", following)) if following.startswith(RUN_BY[language]) else ()
            blocks.append(CommandBlock(opening.group(1), commands, runners, section, index + 1))
        index = end + 1
    return blocks


def runner_source(runner: str) -> str:
    """What a runner's source says: a test function's file with conftest.py (its fixtures and shared flags), or the
    CI script / Makefile itself. Fails where the runner does not exist."""
    if runner in OTHER_RUNNERS:
        return (ROOT / runner).read_text(encoding="utf-8")
    file_name, _, test_name = runner.partition("::")
    path = ROOT / file_name
    assert file_name.startswith("tests/test_") and path.is_file(), f"no such test file: {runner}"
    source = path.read_text(encoding="utf-8")
    defined = {node.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
    assert test_name in defined, f"{file_name} defines no {test_name}"
    return source + (ROOT / "tests" / "conftest.py").read_text(encoding="utf-8")


def runs_script(source: str, script: str) -> bool:
    module = script.removesuffix(".py")
    return script in source or bool(re.search(rf"\bimport {module}\b|\bfrom {module} import|\b{module}\.main\(", source))


def missing_from_runners(block: CommandBlock) -> list[str]:
    """The parts of a block's commands (scripts, flags, make targets, requirement files, URL paths, Python names)
    that none of its runners' sources contains."""
    source = "\n".join(runner_source(runner) for runner in block.runners)
    missing = []
    for command in block.commands:
        if block.language == "python":
            names = re.findall(r"from (\w+) import (\w+)", command)
            missing += [f"{module}.{name}" for module, name in names if not runs_script(source, f"{module}.py")
                        or name not in source]
            missing += [call for call in re.findall(r"\.(\w+)\(", command) if call not in source]
            continue
        missing += [script for script in re.findall(r"\b([a-z_0-9]+\.py)\b", command)
                    if not runs_script(source, script)]
        missing += [flag for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", command) if flag not in source]
        missing += [f"make {target}" for target in re.findall(r"\bmake (\w+)", command) if target not in source]
        missing += [path for path in re.findall(r"-r (\S+)", command)
                    if not (ROOT / path).is_file() or path not in source]
        missing += [path for path in re.findall(r"localhost:\d+(/\w+)", command) if f'"{path}' not in source]
        for program, shown_as in PROGRAM_ALIASES.items():
            if re.match(rf"{program}\b", command) and not any(alias in source for alias in shown_as):
                missing.append(program)
    return missing


def documents(language: str) -> list[Path]:
    return [LANGUAGES[language]] + [DOCS / language / name for name in guide_names(language)]


ALL_DOCUMENTS = [(language, path) for language in LANGUAGES for path in documents(language)]


def test_both_languages_have_the_same_guides():
    assert guide_names("ko") == guide_names("en")
    for name in ("training.md", "predict.md", "onnx_serving.md", "distillation.md", "pretraining.md",
                 "unanswerable.md", "long_runs.md", "transformers.md", "big_files.md", "colab.md",
                 "measurements.md", "design.md", "korquad2.md"):
        assert name in guide_names("en"), name


@pytest.mark.parametrize("language, path", ALL_DOCUMENTS, ids=lambda value: getattr(value, "name", value))
def test_every_command_is_run_by_the_test_or_ci_it_names(language, path):
    for block in command_blocks(path.read_text(encoding="utf-8"), language):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        assert block.runners, f"{where}: no `{RUN_BY[language]}` line naming the test that runs this block"
        missing = missing_from_runners(block)
        assert not missing, f"{where}: {block.runners} run no {missing}"


@pytest.mark.parametrize("name", ["README"] + guide_names("en"))
def test_korean_and_english_show_the_same_commands_under_the_same_sections(name):
    ko_path, en_path = (LANGUAGES["ko"], LANGUAGES["en"]) if name == "README" else (
        DOCS / "ko" / name, DOCS / "en" / name)
    ko_text, en_text = ko_path.read_text(encoding="utf-8"), en_path.read_text(encoding="utf-8")
    assert [level for level, _ in headings(ko_text)] == [level for level, _ in headings(en_text)], \
        f"{name}: the two languages have different sections"
    ko_blocks, en_blocks = command_blocks(ko_text, "ko"), command_blocks(en_text, "en")
    assert [(b.section, b.commands, b.runners) for b in ko_blocks] == \
           [(b.section, b.commands, b.runners) for b in en_blocks], f"{name}: the two languages show different commands"


@pytest.mark.parametrize("language", LANGUAGES)
def test_readme_is_small_links_the_other_language_and_every_guide(language):
    readme = LANGUAGES[language]
    text = readme.read_text(encoding="utf-8")
    assert len(text.encode("utf-8")) <= README_LIMIT_BYTES, f"{readme.name} is over 15 KB"
    other = next(path for lang, path in LANGUAGES.items() if lang != language)
    assert f"]({other.name})" in "\n".join(text.splitlines()[:5]), f"{readme.name} does not link {other.name} on top"
    for name in guide_names(language):
        assert f"](docs/{language}/{name})" in text, f"{readme.name} does not link docs/{language}/{name}"
    assert "](docs/measurements.md" in text
    # The original contest baseline's command lines, unchanged.
    assert ("python3 train.py --output_dir=output --checkpoint=pretrain_ckpt/bert_small_ckpt.bin "
            "--model_config=data/bert_small.json --train_file=data/KorQuAD_v1.0_train.json --max_seq_length=512 "
            "--max_query_length=96 --max_answer_length=30 --doc_stride=128 --train_batch_size=16 --learning_rate=5e-5 "
            "--num_train_epochs=4.0 --seed=42") in [c for b in command_blocks(text, language) for c in b.commands]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text


@pytest.mark.parametrize("path", [MEASUREMENTS] + [path for _, path in ALL_DOCUMENTS],
                         ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = path.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+:", target):
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links a missing {target}"


# A measured figure: a decimal number with a unit or a score name. Guides link docs/measurements.md instead.
FIGURE = re.compile(r"\d\.\d+\s*(%|x\b|s\b|ms\b|MB\b|GB\b|MiB\b|answers/s|features/s|steps/s)|\b(EM|F1) \d")


@pytest.mark.parametrize("path", [DOCS / language / name for language in LANGUAGES for name in guide_names(language)],
                         ids=lambda path: str(path.relative_to(DOCS)))
def test_guides_quote_no_figures_in_prose(path):
    fenced = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fenced = fenced != line.startswith("```")
        assert fenced or not FIGURE.search(line), f"{path.relative_to(ROOT)}:{number}: a figure outside " \
                                                  f"docs/measurements.md: {line.strip()[:80]}"


def test_every_figure_names_its_command_date_machine_and_versions():
    benchmarks = {name for path in (ROOT / "benchmarks").glob("*.py")
                  for name in re.findall(r'@benchmark\("(\w+)"\)', path.read_text(encoding="utf-8"))}
    rows = [line for line in MEASUREMENTS.read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) >= 20
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split(" | ")]
        assert len(cells) == 8 and all(cells), f"a figure without all of its provenance: {row[:80]}"
        _, _, command, date, cpu, *versions = cells
        assert command.startswith("`") or command.startswith("not"), row[:80]
        for names in re.findall(r"bench\.py --only ([\w,]+)", command):
            assert set(names.split(",")) <= benchmarks, f"bench.py has no {names}"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}.*|not recorded.*", date), row[:80]

"""The feature cache's hit itself (the training path, a second train.py run), writers racing on one cache, and
the learning-rate schedule train.py logs."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import korquad_utils as ku
from conftest import DATA_FLAGS, SAMPLE_FILE, write_subset
from test_korquad_utils import CONTEXT, WORDS, ExplodingTokenizer, WhitespaceTokenizer, _qa, _write_squad

SETTINGS = dict(max_seq_length=13, doc_stride=3, max_query_length=8, is_training=True)


@pytest.fixture
def data(tmp_path) -> tuple[Path, WhitespaceTokenizer]:
    """A 20-word context with two questions, and a tokenizer of one piece per word."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n", encoding="utf-8")
    path = _write_squad(tmp_path / "d.json", [{"context": CONTEXT, "qas": [
        _qa("a", "q0 q1", " ".join(WORDS[6:10]), CONTEXT.index(" ".join(WORDS[6:10]))),
        _qa("b", "q2", WORDS[19], CONTEXT.index(WORDS[19]))]}])
    return path, WhitespaceTokenizer(vocab)


def table(path: Path, tokenizer, cache_dir: Path, **overrides) -> ku.FeatureTable:
    return ku.load_or_build_table(path, tokenizer, **(SETTINGS | overrides), cache_dir=cache_dir, progress=False)


# --- the cache hit on the training path ----------------------------------------------------------

def test_training_table_hit_neither_tokenizes_nor_reads_the_json(data, tmp_path, monkeypatch):
    path, tokenizer = data
    built = table(path, tokenizer, tmp_path / "cache")
    assert tokenizer.calls > 0

    def no_json(*args, **kwargs):
        raise AssertionError("the JSON was parsed despite a cache hit")
    with monkeypatch.context() as patch:
        patch.setattr(ku, "read_squad_examples", no_json)
        hit = table(path, ExplodingTokenizer(tokenizer.vocab_file), tmp_path / "cache")
    assert hit == built and all(isinstance(array, np.memmap) for array in hit.arrays.values())


@pytest.mark.parametrize("change", [{"max_seq_length": 14}, {"doc_stride": 4}, {"max_query_length": 1},
                                    {"is_training": False}])
def test_training_table_misses_when_a_window_setting_changes(data, tmp_path, change):
    path, tokenizer = data
    table(path, tokenizer, tmp_path / "cache")
    with pytest.raises(AssertionError, match="despite a cache hit"):
        table(path, ExplodingTokenizer(tokenizer.vocab_file), tmp_path / "cache", **change)


def test_a_second_train_run_loads_the_cache_and_a_changed_stride_builds_anew(tiny_setup, tmp_path, monkeypatch):
    """Counted where the windows are cut: the second run with the same flags cuts none."""
    import train

    builds = []
    real_build = ku._build_feature_table

    def counting_build(*args, **kwargs):
        builds.append(1)
        return real_build(*args, **kwargs)
    monkeypatch.setattr(ku, "_build_feature_table", counting_build)

    def run(name: str, *extra: str) -> None:
        train.main([f"--output_dir={tmp_path / name}", f"--checkpoint={tiny_setup / 'pretrained.bin'}",
                    f"--model_config={tiny_setup / 'tiny.json'}", f"--train_file={tiny_setup / 'train.json'}",
                    *DATA_FLAGS, "--max_steps=1", "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}",
                    *extra])
    run("first")
    assert len(builds) == 1
    run("second")
    assert len(builds) == 1, "the second run with the same settings rebuilt the features"
    run("third", "--doc_stride=48")
    assert len(builds) == 2, "a changed --doc_stride reused the cached windows"


# --- writers racing on one cache -----------------------------------------------------------------

def test_a_writer_beaten_to_the_cache_uses_the_winners_cache(data, tmp_path, monkeypatch, caplog):
    """Process B publishes the cache while A is about to rename its own copy into place: A's rename fails
    (the directory is there now, not empty), and A maps B's cache instead of saying it could not cache."""
    path, tokenizer = data
    cache_dir = tmp_path / "cache"
    real_rename, raced = Path.rename, []

    def rename_after_another_writer(self, target):
        if Path(target).suffix == ".features" and not raced:
            raced.append(1)
            table(path, WhitespaceTokenizer(tokenizer.vocab_file), cache_dir)  # B, whole, in between
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", rename_after_another_writer)
    with caplog.at_level(logging.INFO, logger="korquad_utils"):
        first = table(path, tokenizer, cache_dir)
    assert raced and "not cached" not in caplog.text and "another process" in caplog.text
    assert all(isinstance(array, np.memmap) for array in first.arrays.values())  # B's files, not a private copy
    monkeypatch.undo()
    (cache,) = cache_dir.iterdir()  # one cache, no temporary directory left behind
    assert table(path, ExplodingTokenizer(tokenizer.vocab_file), cache_dir) == first


def test_a_reader_during_a_rewrite_gets_whole_windows(data, tmp_path, monkeypatch):
    """A rewrite (--overwrite_cache) moves the old cache aside before renaming the new one in: a reader in that
    gap finds no cache, builds its own, and both end with the same whole table."""
    path, tokenizer = data
    cache_dir = tmp_path / "cache"
    expected = table(path, tokenizer, cache_dir)
    expected_arrays = {name: np.array(array) for name, array in expected.arrays.items()}
    real_rename, read_in_gap = Path.rename, []

    def rename_then_read(self, target):
        moved = real_rename(self, target)
        if Path(target).name.endswith(".old.tmp") and not read_in_gap:
            read_in_gap.append(table(path, WhitespaceTokenizer(tokenizer.vocab_file), cache_dir))
        return moved
    monkeypatch.setattr(Path, "rename", rename_then_read)
    rewritten = table(path, tokenizer, cache_dir, overwrite_cache=True)
    monkeypatch.undo()
    for result in (rewritten, *read_in_gap):
        assert all(np.array_equal(result.arrays[name], expected_arrays[name]) for name in ku.TABLE_ARRAYS)
    assert len(read_in_gap) == 1 and len(list(cache_dir.iterdir())) == 1


# --- the learning-rate schedule -------------------------------------------------------------------

def test_logged_learning_rate_rises_over_the_warmup_then_falls_to_zero_at_the_last_step(tiny_setup, tmp_path,
                                                                                         monkeypatch):
    """10 optimizer steps, warm-up 0.3 (W = 3), peak 2e-3. Step s trains at s/W of the peak up to W, then at
    (T - s + 1)/(T - W); the log's lr at step s is the rate after it (the one step s + 1 trains with), so it
    reads (s + 1)/W during the warm-up, the peak at W and (T - s)/(T - W) after, 0 at the last step. With
    gradient accumulation the schedule counts optimizer steps, not micro-batches."""
    import train

    peak, warmup, total = 2e-3, 3, 10
    used_expected = [peak * (s / warmup if s <= warmup else (total - s + 1) / (total - warmup))
                     for s in range(1, total + 1)]
    logged_expected = [peak * ((s + 1) / warmup if s < warmup else (total - s) / (total - warmup))
                       for s in range(1, total + 1)]
    assert logged_expected[warmup - 1] == peak and logged_expected[-1] == 0
    write_subset(SAMPLE_FILE, tmp_path / "train.json", 8)
    for name, extra in (("whole", []), ("accumulated", ["--train_batch_size=2", "--gradient_accumulation_steps=2"])):
        out = tmp_path / name
        with monkeypatch.context() as patch:
            used: list[float] = []  # the rate each optimizer step applies, read as it steps
            optimizer_class = torch.optim.AdamW
            real_step = optimizer_class.step

            def recording_step(self, *args, **kwargs):
                used.append(self.param_groups[0]["lr"])
                return real_step(self, *args, **kwargs)
            patch.setattr(optimizer_class, "step", recording_step)
            train.main([f"--output_dir={out}", f"--checkpoint={tiny_setup / 'pretrained.bin'}",
                        f"--model_config={tiny_setup / 'tiny.json'}", f"--train_file={tmp_path / 'train.json'}",
                        *DATA_FLAGS, "--train_batch_size=4", f"--learning_rate={peak}", f"--max_steps={total}",
                        "--warmup_proportion=0.3", "--logging_steps=1", "--no_cuda", "--quiet",
                        f"--cache_dir={tmp_path / 'cache'}", *extra])
        records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
        steps = [record for record in records if "lr" in record]
        assert [record["step"] for record in steps] == list(range(1, total + 1)), name
        assert [record["lr"] for record in steps] == pytest.approx(logged_expected, rel=1e-9, abs=1e-15), name
        assert used == pytest.approx(used_expected, rel=1e-9), name

"""--compile: bucketed padding, and a compiled model that trains and predicts as the eager one does.

Compiling on a CPU is slow, so one module-scoped pair of short runs (eager and compiled) serves
the training tests, at a small width with narrow buckets.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SAMPLE_FILE, TINY_CONFIG, run_in_process
import numpy as np

from korquad_utils import FeatureTable, bucket_width, collate_features
from modeling import Config, QuestionAnswering
from test_training import assert_same_training, train_flags

MAX_SEQ_LENGTH, BUCKET, BATCH_SIZE = 128, 64, 8
NUM_BUCKETS = MAX_SEQ_LENGTH // BUCKET
NARROW_FLAGS = [f"--max_seq_length={MAX_SEQ_LENGTH}", "--doc_stride=64"]


def windows(*specs: tuple[int, int, int]) -> FeatureTable:
    """One question per (length, start, end): a window of `length` ids, half question, with those positions."""
    query_lengths = [length // 2 - 2 for length, _, _ in specs]
    doc_lengths = [length - length // 2 - 1 for length, _, _ in specs]
    bounds = np.concatenate([[0], np.cumsum(doc_lengths)])
    return FeatureTable({
        "special_ids": np.array([2, 3]), "context_ids": np.arange(100, 100 + bounds[-1], dtype=np.int32),
        "context_offsets": np.zeros((bounds[-1], 2), np.int32), "context_bounds": bounds,
        "example_context": np.arange(len(specs)), "query_ids": np.full(sum(query_lengths), 50, np.int32),
        "query_bounds": np.concatenate([[0], np.cumsum(query_lengths)]), "feature_example": np.arange(len(specs)),
        "feature_span_index": np.zeros(len(specs), np.int64), "feature_doc_start": np.zeros(len(specs), np.int64),
        "feature_doc_length": np.array(doc_lengths), "feature_positions": np.array([s[1:] for s in specs]),
        "max_context": np.ones(bounds[-1], bool)})


def test_bucket_width_rounds_up_to_the_multiple_and_stops_at_the_max():
    assert [bucket_width(n, 64, 192) for n in (1, 64, 65, 128, 150, 192)] == [64, 64, 128, 128, 192, 192]
    assert bucket_width(170, 64, 180) == 180  # a max that is no multiple still caps the width
    assert bucket_width(170, 64) == 192


def test_bucketed_batch_trains_and_predicts_like_the_unpadded_one():
    table = windows((37, 5, 9), (21, 0, 0), (30, 12, 12))
    plain = {k: torch.from_numpy(v) for k, v in collate_features(table, [0, 1, 2], is_training=True).items()}
    bucketed = {k: torch.from_numpy(v) for k, v in collate_features(
        table, [0, 1, 2], is_training=True, pad_to_multiple=BUCKET, max_width=MAX_SEQ_LENGTH,
        pad_rows_to=BATCH_SIZE).items()}
    assert plain["input_ids"].shape == (3, 37)
    assert {name: tuple(t.shape) for name, t in bucketed.items()} == {
        "input_ids": (8, BUCKET), "token_type_ids": (8, BUCKET), "attention_mask": (8, BUCKET),
        "start_positions": (8,), "end_positions": (8,)}
    assert torch.equal(bucketed["input_ids"][:3, :37], plain["input_ids"])
    assert bucketed["attention_mask"][:3].sum() == plain["attention_mask"].sum()

    torch.manual_seed(0)
    model = QuestionAnswering(Config(**TINY_CONFIG)).eval()
    with torch.no_grad():
        assert torch.allclose(model(**bucketed), model(**plain), atol=1e-6)
        bucketed_starts, _ = model(bucketed["input_ids"], bucketed["token_type_ids"], bucketed["attention_mask"])
        plain_starts, _ = model(plain["input_ids"], plain["token_type_ids"], plain["attention_mask"])
    assert torch.isfinite(bucketed_starts).all()  # filler rows too: a NaN there would poison the gradients
    # What keeps them finite on every kernel: each filler row attends to exactly one key, its first token
    # (a row with no key at all is NaN on some kernels, zeros on this CPU one).
    filler_mask = bucketed["attention_mask"][3:]
    assert filler_mask.sum(1).tolist() == [1] * 5 and bool(filler_mask[:, 0].all())
    real = plain["attention_mask"].bool()
    assert torch.allclose(bucketed_starts[:3, :37][real], plain_starts[real], atol=1e-5)


@pytest.fixture(scope="module")
def eager_and_compiled_runs(tiny_setup, tmp_path_factory):
    """One epoch eager and one with --compile (same seed and data), with the batch shapes each collated."""
    import train

    root = tmp_path_factory.mktemp("compile")
    shapes: dict[str, list[tuple[int, ...]]] = {"eager": [], "compiled": []}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for run, extra in (("eager", []), ("compiled", ["--compile", f"--compile_bucket={BUCKET}"])):
        def recording_collate(*args, _seen=shapes[run], **kwargs):
            batch = collate_features(*args, **kwargs)
            _seen.append(tuple(batch["input_ids"].shape))
            return batch
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(train, "collate_features", recording_collate)
            train.main(train_flags(tiny_setup, root / run, epochs=1, batch_size=BATCH_SIZE) + NARROW_FLAGS + extra)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return root, shapes, graphs


def test_compiled_training_matches_eager_losses_and_weights(eager_and_compiled_runs):
    root, _, _ = eager_and_compiled_runs
    assert_same_training(root / "eager", root / "compiled", "korquad_0.bin")


def test_a_compiled_epoch_compiles_at_most_one_shape_per_bucket(eager_and_compiled_runs):
    _, shapes, graphs = eager_and_compiled_runs
    compiled_shapes = set(shapes["compiled"])
    assert all(rows == BATCH_SIZE and width % BUCKET == 0 and width <= MAX_SEQ_LENGTH
               for rows, width in compiled_shapes), compiled_shapes
    assert 0 < graphs <= len(compiled_shapes) <= NUM_BUCKETS
    # Without buckets this epoch would have needed more shapes: the bound is doing the work.
    assert len(set(shapes["eager"])) > len(compiled_shapes)


class ShapeRecorder(torch.nn.Module):
    """The model as compile_model returns it, noting the shape of every input_ids it is given."""

    def __init__(self, model: torch.nn.Module, seen: list[tuple[int, ...]]):
        super().__init__()
        self.model, self.seen = model, seen

    def forward(self, input_ids, *args, **kwargs):
        self.seen.append(tuple(input_ids.shape))
        return self.model(input_ids, *args, **kwargs)


def test_compiled_eval_predicts_what_eager_eval_predicts_in_one_shape_per_bucket(eager_and_compiled_runs, tiny_setup,
                                                                                 tmp_path, monkeypatch):
    import scoring
    import eval as eval_script

    root, _, _ = eager_and_compiled_runs
    predictions, shapes = {}, {}
    real_compile_model = scoring.compile_model
    for run, extra in (("eager", []), ("compiled", ["--compile", f"--compile_bucket={BUCKET}"])):
        seen = shapes[run] = []
        monkeypatch.setattr(scoring, "compile_model",
                            lambda *args, _seen=seen, **kwargs: ShapeRecorder(real_compile_model(*args, **kwargs), _seen))
        eval_script.main([f"--checkpoint={root / 'compiled' / 'korquad_0.bin'}", f"--output_dir={tmp_path / run}",
                          f"--predict_file={SAMPLE_FILE}", *NARROW_FLAGS, "--max_query_length=32",
                          "--train_batch_size=16", "--no_cuda", "--quiet", f"--cache_dir={tiny_setup / 'cache'}",
                          *extra])
        predictions[run] = json.loads((tmp_path / run / "predictions.json").read_text(encoding="utf-8"))
    assert len(predictions["eager"]) == 56
    assert predictions["compiled"] == predictions["eager"]
    compiled_shapes = set(shapes["compiled"])
    assert all(rows == 16 and width % BUCKET == 0 and width <= MAX_SEQ_LENGTH for rows, width in compiled_shapes), \
        compiled_shapes
    assert len(compiled_shapes) <= NUM_BUCKETS < len(set(shapes["eager"]))


def test_compile_without_a_cpp_compiler_is_one_clear_line(tiny_setup, tmp_path, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    result = run_in_process("train.py", *train_flags(tiny_setup, tmp_path / "out", epochs=1), "--compile",
                            env={"PATH": str(Path(tiny_setup) / "no-such-bin")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "train.py: error: --compile on a CPU needs a C++ compiler (g++ or clang++, or set CXX); "
        "install one or leave --compile off"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cxx", ["no-such-c++", "false"])  # not on PATH; a program that is no compiler
def test_a_cxx_that_is_no_working_compiler_is_refused_before_the_data_is_built(cxx, tiny_setup, tmp_path,
                                                                                  monkeypatch):
    import train

    cxx = shutil.which(cxx) or cxx
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(train.UsageError) as refused:
        train.main(train_flags(tiny_setup, tmp_path / "out", epochs=1) + ["--compile",
                                                                          f"--cache_dir={tmp_path / 'cache'}"])
    assert str(refused.value).startswith(f"--compile on a CPU: CXX={cxx} is not a working C++ compiler")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_compile_bucket_must_be_positive(tiny_setup, tmp_path):
    result = run_in_process("eval.py", f"--checkpoint={tiny_setup / 'pretrained.bin'}", f"--output_dir={tmp_path}",
                            "--compile", "--compile_bucket=0", "--no_cuda")
    assert result.returncode == 2
    assert result.stderr.strip() == ("eval.py: error: argument --compile_bucket: must be at least 1, got 0 "
                                     "(see eval.py --help)")


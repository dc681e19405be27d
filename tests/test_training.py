"""train.py and eval.py through their real command lines: fitting, resume, torchrun DDP, ensembles."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_FLAGS, ROOT, TINY_CONFIG, VOCAB_FILE, run_in_process, run_script
from modeling import Config, QuestionAnswering


def assert_same_training(expected_run: Path, run: Path, checkpoint: str) -> None:
    """Two runs that must train alike: the same loss at every step and the same final weights."""
    def losses(output_dir: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
    assert len(losses(run)) == len(losses(expected_run)) > 4
    np.testing.assert_allclose(losses(run), losses(expected_run), rtol=1e-4, atol=1e-5)
    expected = torch.load(expected_run / checkpoint, weights_only=True)
    actual = torch.load(run / checkpoint, weights_only=True)
    for name in expected:
        if name == "qa_outputs.bias":
            # Its true gradient is exactly zero (a softmax ignores a shift shared by all positions), so
            # Adam turns rounding noise of either run into steps of +-lr: nothing to compare.
            continue
        assert torch.allclose(actual[name], expected[name], atol=1e-4), name


def train_flags(setup: Path, output_dir: Path, epochs: int, batch_size: int = 8, lr: float = 2e-3) -> list[str]:
    return [f"--output_dir={output_dir}", f"--checkpoint={setup / 'pretrained.bin'}",
            f"--model_config={setup / 'tiny.json'}", f"--train_file={setup / 'train.json'}", *DATA_FLAGS,
            f"--train_batch_size={batch_size}", f"--learning_rate={lr}", f"--num_train_epochs={epochs}",
            "--seed=42", "--no_cuda", "--quiet", f"--cache_dir={setup / 'cache'}", "--logging_steps=1"]


def test_train_then_eval_fits_the_questions_it_saw(tiny_setup, tmp_path):
    out = tmp_path / "output"
    # The original baseline's flags that no longer do anything are taken, so its command lines still run.
    trained = run_script("train.py", *train_flags(tiny_setup, out, epochs=30), "--save_total_limit=2",
                         f"--eval_file={tiny_setup / 'train.json'}", "--verbose_logging", "--fp16_opt_level=O1",
                         timeout=600)  # 30 evaluations and curves
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    assert {"exact_match", "f1", "best_epoch"} <= set(summary)
    kept = {f"korquad_{epoch}.bin" for epoch in (28, 29, summary["best_epoch"])}
    assert sorted(p.name for p in out.glob("korquad_*.bin")) == sorted(kept)
    assert {"config.json", "training_args.json", "training_state.pt", "training_log.jsonl"} <= {
        p.name for p in out.iterdir()}
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log if "loss" in record]
    # Measured (encoder and --seed both 42: torch 2.13.0 at 1 thread, 2.14.1 at 1 and 2; both 1, 2 and 3: 2.13.0 at
    # 1 thread, and 1: 2.14.1 at 2): 18.6 to 642 times lower.
    assert losses[-1] < losses[0] / 5
    assert [record["epoch"] for record in log if "f1" in record] == list(range(30))

    debug = tmp_path / "debug"
    evaluated = run_script("eval.py", f"--checkpoint={out / 'korquad_29.bin'}", f"--output_dir={debug}",
                           f"--predict_file={tiny_setup / 'train.json'}", *DATA_FLAGS, "--train_batch_size=16",
                           "--n_best_size=20", "--seed=42", f"--cache_dir={tiny_setup / 'cache'}", "--do_lower_case",
                           "--verbose_logging")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert set(result) == {"exact_match", "f1"}
    # Measured as above: EM 75.0 to 87.5 (18 to 21 of 24; 0 to 8.3 after the first epoch). 60 = 15 of 24.
    assert result["exact_match"] >= 60, result
    predictions = json.loads((debug / "predictions.json").read_text(encoding="utf-8"))
    nbest = json.loads((debug / "nbest_predictions.json").read_text(encoding="utf-8"))
    assert len(predictions) == 24 and set(nbest) == set(predictions)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_after_a_lost_session_ends_with_the_same_weights(precision, tiny_setup, tmp_path, monkeypatch):
    """Dropout on, so the random state after resuming matters; fp16 (forced on the CPU) brings the GradScaler in."""
    import train

    (tmp_path / "dropout.json").write_text(json.dumps({**TINY_CONFIG, "dropout_prob": 0.1}))
    if precision == "fp16":
        monkeypatch.setattr(train, "autocast_dtype", lambda args, device: torch.float16)

    def flags(run: str) -> list[str]:
        return train_flags(tiny_setup, tmp_path / run, epochs=2, batch_size=4) + [
            f"--model_config={tmp_path / 'dropout.json'}"]

    train.main(flags("straight"))
    real_epoch = train.train_one_epoch

    def lose_session_in_epoch_1(*args, epoch, **kwargs):
        if epoch == 1:
            raise KeyboardInterrupt("Colab session lost")
        return real_epoch(*args, epoch=epoch, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", lose_session_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags("resumed"))
    assert not (tmp_path / "resumed" / "korquad_1.bin").exists()
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    train.main(flags("resumed") + ["--resume"])

    straight = torch.load(tmp_path / "straight" / "korquad_1.bin", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "korquad_1.bin", weights_only=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.allclose(straight[name], resumed[name], atol=1e-6, rtol=0), name
    # The loss log of the resumed run reads as one run: no step twice.
    assert ((tmp_path / "resumed" / "training_log.jsonl").read_text()
            == (tmp_path / "straight" / "training_log.jsonl").read_text())


def test_resume_on_another_precision_starts_a_fresh_scaler(tiny_setup, tmp_path, monkeypatch, caplog):
    """A bf16 run (an A100) resumed in fp16 (a T4) must not trip over the empty scaler state."""
    import train

    flags = train_flags(tiny_setup, tmp_path / "run", epochs=2, batch_size=4)
    train.main(flags + ["--num_train_epochs=1", "--bf16"])
    monkeypatch.setattr(train, "autocast_dtype", lambda args, device: torch.float16)
    with pytest.raises(train.UsageError, match="num_train_epochs was 1.0"):
        train.main(flags + ["--resume"])  # a changed schedule is refused...
    with caplog.at_level(logging.WARNING, logger="korquad"):
        train.main(flags + ["--num_train_epochs=1", "--resume"])  # ...the same one resumes (nothing left to do)
    assert (tmp_path / "run" / "korquad_0.bin").is_file()
    assert "the interrupted run trained in bf16, this one goes on in fp16" in caplog.text


def test_gradient_accumulation_trains_like_the_whole_global_batch(tiny_setup, tmp_path):
    import train

    train.main(train_flags(tiny_setup, tmp_path / "whole", epochs=1, batch_size=8))
    train.main(train_flags(tiny_setup, tmp_path / "accumulated", epochs=1, batch_size=4)
               + ["--gradient_accumulation_steps=2"])

    assert_same_training(tmp_path / "whole", tmp_path / "accumulated", "korquad_0.bin")


def test_max_steps_stops_there_with_the_schedule_spanning_them(tiny_setup, tmp_path):
    import train

    out = tmp_path / "out"
    flags = train_flags(tiny_setup, out, epochs=30, batch_size=24) + ["--warmup_proportion=0"]
    train.main(flags + ["--max_steps=5"])
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    steps = [record for record in log if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3, 4, 5]
    # The linear decay reaches zero at step 5, not at 30 epochs' worth of steps.
    assert [record["lr"] for record in steps] == pytest.approx([2e-3 * (5 - s) / 5 for s in range(1, 6)])
    epochs = sorted({record["epoch"] for record in steps})
    assert len(epochs) >= 2 and epochs == list(range(len(epochs)))  # 5 steps cross an epoch of these windows
    assert sorted(p.name for p in out.glob("korquad_*.bin")) == [f"korquad_{epoch}.bin" for epoch in epochs]
    # It is one of the run's settings: a resume with another value is refused.
    with pytest.raises(train.UsageError, match="--max_steps was 5 in the interrupted run, now 6"):
        train.main(flags + ["--max_steps=6", "--resume"])


def test_default_precision_on_gpus(monkeypatch):
    """bf16 only where the GPU has it natively (an A100), fp16 with a scaler on a T4; --fp32 turns autocast off."""
    import argparse

    import cli
    import devices

    gpu = torch.device("cuda", 0)
    flags = dict(fp16=False, bf16=False, fp32=False)
    for capability, expected in (((8, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert devices.autocast_dtype(argparse.Namespace(**flags), gpu) == expected
    assert devices.autocast_dtype(argparse.Namespace(**{**flags, "fp32": True}), gpu) is None
    with pytest.raises(cli.UsageError, match="no native bfloat16"):
        devices.autocast_dtype(argparse.Namespace(**{**flags, "bf16": True}), gpu)
    assert devices.autocast_dtype(argparse.Namespace(**flags), torch.device("cpu")) is None
    assert devices.autocast_dtype(argparse.Namespace(**{**flags, "bf16": True}), torch.device("cpu")) == torch.bfloat16


def test_torchrun_two_ranks_match_one_process_with_the_same_global_batch(tiny_setup, tmp_path):
    single = run_script("train.py", *train_flags(tiny_setup, tmp_path / "single", epochs=2, batch_size=8))
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
         *train_flags(tiny_setup, tmp_path / "ddp", epochs=2, batch_size=4)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    written = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert written == ["config.json", "korquad_0.bin", "korquad_1.bin", "training_args.json",
                        "training_curves.png", "training_log.jsonl", "training_state.pt", "vocab.txt"]
    args = json.loads((tmp_path / "ddp" / "training_args.json").read_text())
    assert (args["world_size"], args["global_batch_size"]) == (2, 8)

    assert_same_training(tmp_path / "single", tmp_path / "ddp", "korquad_1.bin")


def test_ensemble_decodes_the_mean_of_its_members_logits(tiny_setup, tmp_path):
    import eval as eval_cli
    from korquad_utils import decode_predictions, load_or_build_features
    from tokenization import BertTokenizer

    config = Config(**TINY_CONFIG)
    models = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = QuestionAnswering(config).eval()
        torch.save(model.state_dict(), tmp_path / f"member{seed}.bin")
        models.append(model)
    eval_cli.main([f"--checkpoint={tmp_path / 'member1.bin'}", f"--checkpoint={tmp_path / 'member2.bin'}",
                   f"--model_config={tiny_setup / 'tiny.json'}", f"--output_dir={tmp_path / 'ens'}",
                   f"--predict_file={tiny_setup / 'train.json'}", *DATA_FLAGS, "--no_cuda", "--quiet",
                   f"--cache_dir={tiny_setup / 'cache'}"])
    ensembled = json.loads((tmp_path / "ens" / "predictions.json").read_text(encoding="utf-8"))

    tokenizer = BertTokenizer(str(VOCAB_FILE))
    examples, features = load_or_build_features(tiny_setup / "train.json", tokenizer, 192, 64, 32,
                                                is_training=False, cache_dir=tiny_setup / "cache")
    member_logits = []
    with torch.no_grad():
        for model in models:
            outputs = [model(torch.tensor([f.input_ids]), torch.tensor([f.segment_ids])) for f in features]
            member_logits.append(([s[0].numpy() for s, _ in outputs], [e[0].numpy() for _, e in outputs]))
    mean_starts = [(a + b) / 2 for a, b in zip(member_logits[0][0], member_logits[1][0])]
    mean_ends = [(a + b) / 2 for a, b in zip(member_logits[0][1], member_logits[1][1])]
    expected, _ = decode_predictions(examples, features, mean_starts, mean_ends, n_best_size=20, max_answer_length=30)
    assert ensembled == expected
    first_alone, _ = decode_predictions(examples, features, *member_logits[0], n_best_size=20, max_answer_length=30)
    assert first_alone != expected  # the members disagree, so the average decides


BAD_INPUT_CASES = {
    "missing train file": (["--train_file=/nonexistent/train.json"], "/nonexistent/train.json"),
    "train file not JSON": (["--train_file={bad_json}"], "bad.json"),
    "checkpoint shapes": (["--checkpoint={wrong_ckpt}"], "embeddings.word_embeddings.weight"),
    "vocab size": (["--vocab_file={small_vocab}"], "vocab_size"),
    "max_seq_length": (["--max_seq_length=600"], "max_position_embeddings"),
    "doc_stride": (["--doc_stride=0"], "--doc_stride"),
    "output dir is a file": (["--output_dir={a_file}"], "--output_dir"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT_CASES))
def test_bad_input_is_one_clear_line(case, tiny_setup, tmp_path):
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    torch.save(QuestionAnswering(Config(**{**TINY_CONFIG, "hidden_size": 32})).bert.state_dict(), tmp_path / "w.bin")
    vocab = VOCAB_FILE.read_text(encoding="utf-8").splitlines()[:1000]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp_path / "file").write_text("x")
    paths = dict(bad_json=tmp_path / "bad.json", wrong_ckpt=tmp_path / "w.bin", small_vocab=tmp_path / "vocab.txt",
                 a_file=tmp_path / "file")
    overrides, expected = BAD_INPUT_CASES[case]
    flags = train_flags(tiny_setup, tmp_path / "out", epochs=1) + [f.format(**paths) for f in overrides]
    result = run_in_process("train.py", *flags)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert not list((tmp_path / "out").glob("korquad_*.bin")) if (tmp_path / "out").is_dir() else True


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_setup, tmp_path, monkeypatch):
    import modeling
    import train

    out = tmp_path / "run"
    flags = train_flags(tiny_setup, out, epochs=2, batch_size=8) + ["--logging_steps=50"]
    train.main(flags[:-1] + ["--num_train_epochs=1", f"--output_dir={tmp_path / 'reference'}"])
    steps_per_epoch = sum(1 for _ in (tmp_path / "reference" / "training_log.jsonl").open())
    nan_step = steps_per_epoch + 2  # in the second epoch
    real_loss, calls = modeling.span_loss, []

    def loss_that_turns_nan(logits, positions, mask):
        calls.append(1)
        loss = real_loss(logits, positions, mask)
        return loss * float("nan") if len(calls) > 2 * (nan_step - 1) else loss  # two calls per step

    monkeypatch.setattr(modeling, "span_loss", loss_that_turns_nan)
    with pytest.raises(train.TrainingDiverged, match=f"non-finite loss at optimizer step {nan_step}"):
        train.main(flags)
    assert (out / "korquad_0.bin").is_file() and not (out / "korquad_1.bin").exists()
    state = torch.load(out / "korquad_0.bin", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_torchrun_every_rank_stops_on_a_bad_train_file(tiny_setup, tmp_path):
    (tmp_path / "broken.json").write_text('{"data": [{"paragraphs": [{"qas": []}]}]}', encoding="utf-8")
    flags = train_flags(tiny_setup, tmp_path / "out", epochs=1) + [f"--train_file={tmp_path / 'broken.json'}"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(ROOT / "train.py"), *flags], capture_output=True, text=True, cwd=ROOT, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "train.py: error: " in result.stderr and "broken.json" in result.stderr
    assert "rank 0 failed while preparing the data" in result.stderr  # rank 1 stopped too, without hanging
    assert not (tmp_path / "out" / "korquad_0.bin").exists()


def test_eval_bad_input_is_one_clear_line(tiny_setup, tmp_path):
    finetuned = tmp_path / "korquad_0.bin"
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), finetuned)
    (tmp_path / "bad.json").write_text('{"data": [{"paragraphs": [{"context": "x"}]}]}', encoding="utf-8")
    common = [f"--model_config={tiny_setup / 'tiny.json'}", f"--output_dir={tmp_path / 'debug'}", *DATA_FLAGS,
              "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}"]
    cases = {
        "missing checkpoint": ([f"--checkpoint={tmp_path / 'absent.bin'}",
                                f"--predict_file={tiny_setup / 'train.json'}"], "absent.bin: file not found"),
        "predict file without qas": ([f"--checkpoint={finetuned}", f"--predict_file={tmp_path / 'bad.json'}"],
                                     "bad.json: article 0 paragraph 0: missing 'qas'"),
        "pretrained encoder": ([f"--checkpoint={tiny_setup / 'pretrained.bin'}",
                                f"--predict_file={tiny_setup / 'train.json'}"], "without a trained span head"),
        "published config on a tiny checkpoint": ([f"--checkpoint={finetuned}",
                                                   f"--predict_file={tiny_setup / 'train.json'}",
                                                   "--model_config=data/bert_small.json"], "shape mismatch"),
    }
    for name, (flags, expected) in cases.items():
        result = run_in_process("eval.py", *common, *flags)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, (name, result.stderr)
        assert expected in lines[0], (name, lines[0])
    assert not (tmp_path / "debug" / "predictions.json").exists()

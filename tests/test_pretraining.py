"""Continued pre-training: heads equal to transformers' BertForPreTraining both ways, the masking
statistics, starting from an encoder-only checkpoint, kill -9 and resume, bad corpora, and the run
directory as train.py's / eval.py's / export.py's --checkpoint. Tiny models, the bundled sample."""
from __future__ import annotations

import gzip
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_FLAGS, ROOT, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, run_script

import pretrain
import pretraining_data
from modeling import (BertForPreTraining, BertModel, Config, load_checkpoint, pretraining_loss, read_state_dict,
                      read_transformers_dir)

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_act="gelu_new", max_position_embeddings=64)
FLAGS = ["--max_seq_length=64", "--train_batch_size=4", "--learning_rate=1e-3", "--seed=7", "--no_cuda",
         "--quiet", "--logging_steps=1", "--eval_steps=1000", "--held_out_share=0.2"]


def _inputs(vocab_size: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab_size, (3, 17), generator=g)
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def _perturb(module: torch.nn.Module) -> None:
    """Non-trivial values everywhere (biases and LayerNorms start at 0 and 1)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)


def test_heads_equal_transformers_in_both_directions(tmp_path):
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**SMALL)).eval()
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    config, _ = read_transformers_dir(tmp_path / "theirs")
    ours = BertForPreTraining(config).eval()
    assert load_checkpoint(ours, tmp_path / "theirs") == "pretraining"
    inputs = _inputs()
    with torch.no_grad():
        expected = theirs(**inputs)
        mlm, sop = ours(**inputs)
        positions = torch.tensor([[1, 4, 16], [0, 2, 3], [5, 6, 11]])
        at_positions, _ = ours(**inputs, masked_positions=positions)
    torch.testing.assert_close(mlm, expected.prediction_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(sop, expected.seq_relationship_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(at_positions, expected.prediction_logits.gather(
        1, positions[..., None].expand(-1, -1, 100)), atol=1e-5, rtol=0)

    # Back: our weights written by export.py's writer, read by transformers.
    from export import export
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]))
    _perturb(ours)
    (tmp_path / "ours").mkdir()
    export(ours, vocab, True, "mecab", tmp_path / "ours")
    reloaded = transformers.BertForPreTraining.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        mlm, sop = ours(**inputs)
        again = reloaded(**inputs)
    torch.testing.assert_close(again.prediction_logits, mlm, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.seq_relationship_logits, sop, atol=1e-5, rtol=0)
    assert reloaded.cls.predictions.decoder.weight.data_ptr() == reloaded.bert.embeddings.word_embeddings.weight.data_ptr()


def test_masked_lm_directory_loads_its_mlm_head_and_a_fresh_sop_head(tmp_path, caplog):
    theirs = transformers.BertForMaskedLM(transformers.BertConfig(**SMALL)).eval()
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "mlm")
    config, _ = read_transformers_dir(tmp_path / "mlm")
    ours = BertForPreTraining(config).eval()
    with caplog.at_level(logging.INFO):
        assert load_checkpoint(ours, tmp_path / "mlm") == "masked_lm"
    assert "no sentence-order head" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(ours(**_inputs())[0], theirs(**_inputs()).logits, atol=1e-5, rtol=0)


def test_encoder_only_checkpoint_starts_with_fresh_tied_heads(tiny_setup, caplog):
    """The published format (bare names): the encoder is the checkpoint's, the decoder is the embeddings."""
    args = pretrain.parse_args(["--train_files", str(SAMPLE_FILE), "--output_dir", "unused",
                                f"--checkpoint={tiny_setup / 'pretrained.bin'}"])
    with caplog.at_level(logging.INFO):
        model = pretrain.build_model(args, Config(**TINY_CONFIG)).eval()
    assert "no pre-training heads" in caplog.text
    encoder = BertModel(Config(**TINY_CONFIG)).eval()
    encoder.load_state_dict(read_state_dict(tiny_setup / "pretrained.bin"))
    inputs = _inputs(TINY_CONFIG["vocab_size"])
    with torch.no_grad():
        for ours, published in zip(model.bert(**inputs), encoder(**inputs)):
            assert torch.equal(ours, published)
        sequence_output, _ = model.bert(**inputs)
        mlm, _ = model(**inputs)
        head = model.cls.predictions
        tied = head.transform(sequence_output) @ model.bert.embeddings.word_embeddings.weight.T + head.bias
    torch.testing.assert_close(mlm, tied)
    assert not any("decoder" in name for name in model.state_dict())


def _sample_pairs(max_seq_length: int = 128) -> pretraining_data.PairMaker:
    from tokenization import BertTokenizer

    tokenizer = BertTokenizer(VOCAB_FILE)
    tokens = pretraining_data.tokenize_corpus([SAMPLE_FILE], tokenizer, max_seq_length - 3, progress=False)
    args = pretrain.parse_args(["--train_files", str(SAMPLE_FILE), "--output_dir", "unused", "--held_out_share=0",
                                f"--max_seq_length={max_seq_length}"])
    return pretraining_data.build_pair_makers(args, tokenizer, tokens)[0]


def test_masking_statistics_over_a_corpus():
    """15% of the pieces, n-grams 6:3:2, 80/10/10, never a special token, never part of a word; SOP 50%."""
    maker = _sample_pairs()
    specials = {maker.cls_id, maker.sep_id, 0}
    candidates = masked = mask_count = random_count = kept_count = swaps = total = 0
    spans = np.zeros(4)
    for epoch in range(60):
        for index in range(len(maker.pairs)):
            rng = np.random.default_rng([epoch, index])
            ids, _, candidate, swapped = maker.pair(index, rng)
            output, positions, labels, lengths = pretraining_data.mask_pieces(
                ids, candidate, maker.continuation, rng, mask_id=maker.mask_id, random_ids=maker.random_ids,
                max_predictions=maker.max_predictions)
            assert len(positions) <= maker.max_predictions and np.array_equal(labels, ids[positions])
            assert not set(ids[positions].tolist()) & specials
            chosen = np.zeros(len(ids), dtype=bool)
            chosen[positions] = True
            # A continuation piece is masked exactly when the piece before it is: words stay whole.
            continues = maker.continuation[ids] & candidate & np.r_[False, candidate[:-1]]
            assert np.array_equal(chosen[1:][continues[1:]], chosen[:-1][continues[1:]])
            candidates += candidate.sum()
            masked += len(positions)
            mask_count += (output[positions] == maker.mask_id).sum()
            changed = (output[positions] != ids[positions]) & (output[positions] != maker.mask_id)
            random_count += changed.sum()
            kept_count += len(positions) - (output[positions] == maker.mask_id).sum() - changed.sum()
            spans += np.bincount(lengths, minlength=4)
            swaps += swapped
            total += 1
    assert abs(masked / candidates - 0.15) <= 0.005, masked / candidates
    shares = spans[1:] / spans.sum()
    assert np.abs(shares - np.array([6, 3, 2]) / 11).max() <= 0.02, shares
    # A random piece may happen to be the original one: that is counted as kept (1 in 32k).
    assert abs(mask_count / masked - 0.8) <= 0.02 and abs(random_count / masked - 0.1) <= 0.02
    assert abs(kept_count / masked - 0.1) <= 0.02
    assert abs(swaps / total - 0.5) <= 0.02, swaps / total


@pytest.mark.parametrize("max_predictions", [1, 2, 3, 20])
def test_every_pair_gets_a_masked_piece_even_when_the_first_span_drawn_does_not_fit(max_predictions):
    """Three words of three pieces: a first draw that overshot ended the masking with nothing masked, and a batch
    of such pairs had a NaN loss. A word that fits is masked instead, or the first pieces of one."""
    continuation = np.zeros(100, dtype=bool)
    continuation[50:] = True   # ids from 50 on are ## pieces
    ids = np.array([1, 10, 60, 61, 11, 62, 63, 12, 64, 65, 2])
    candidate = np.ones(len(ids), dtype=bool)
    candidate[[0, -1]] = False
    for seed in range(40):
        _, positions, labels, _ = pretraining_data.mask_pieces(
            ids, candidate, continuation, np.random.default_rng(seed), mask_id=3, random_ids=np.arange(10, 20),
            max_predictions=max_predictions)
        assert 1 <= len(positions) <= max_predictions and np.array_equal(labels, ids[positions])
        if max_predictions >= 3:   # whole words
            assert len(positions) % 3 == 0 and np.all(ids[positions[::3]] < 50)


def test_masks_are_dynamic_and_reproducible():
    maker = _sample_pairs()
    first = maker.example(0, epoch=0)
    assert all(np.array_equal(first[k], maker.example(0, epoch=0)[k]) for k in first)
    assert any(not np.array_equal(maker.example(0, epoch=e)["masked_positions"], first["masked_positions"])
               for e in range(1, 4))


def _run(tmp_path: Path, output: str, *extra: str, checkpoint: str = "none") -> subprocess.CompletedProcess:
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return run_script("pretrain.py", "--train_files", str(SAMPLE_FILE), f"--output_dir={tmp_path / output}",
                      f"--checkpoint={checkpoint}", f"--model_config={tmp_path / 'tiny.json'}",
                      f"--cache_dir={tmp_path / 'cache'}", *FLAGS, *extra)


KILLER = '''
import os, signal, sys
sys.path.insert(0, {root!r})
sys.argv[0] = "pretrain.py"
import torch
import pretrain
calls, real_clip = 0, torch.nn.utils.clip_grad_norm_


def clip_then_maybe_die(*args, **kwargs):
    global calls
    calls += 1
    if calls == int(os.environ["KILL_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_clip(*args, **kwargs)


torch.nn.utils.clip_grad_norm_ = clip_then_maybe_die
pretrain.run_cli(pretrain.cli)
'''


def test_resume_after_kill_9_mid_epoch_is_bit_identical(tmp_path):
    (tmp_path / "killer.py").write_text(KILLER.format(root=str(ROOT)))
    steps = ["--max_steps=5", "--save_steps=2"]
    whole = _run(tmp_path, "whole", *steps)
    assert whole.returncode == 0, whole.stderr
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    flags = ["--train_files", str(SAMPLE_FILE), f"--output_dir={tmp_path / 'killed'}", "--checkpoint=none",
             f"--model_config={tmp_path / 'tiny.json'}", f"--cache_dir={tmp_path / 'cache'}", *FLAGS, *steps]
    killed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *flags], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "KILL_AT": "4"}, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    # The lock it left names pretrain.py, as a second run's refusal would while it lived.
    assert json.loads((tmp_path / "killed" / ".train.lock").read_text())["program"] == "pretrain.py"
    state = torch.load(tmp_path / "killed" / "training_state.pt", weights_only=True)
    assert (state["global_step"], state["epoch_finished"]) == (2, False)  # mid-epoch (12 steps an epoch)
    resumed = run_script("pretrain.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    final = sorted((tmp_path / "whole").glob("pretrain_*.bin"))[-1].name
    a, b = (torch.load(tmp_path / run / final, weights_only=True) for run in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(line) for line in (tmp_path / run / "training_log.jsonl").read_text().splitlines()]
            for run in ("whole", "killed")]
    assert logs[0] == logs[1]


# gzip's mtime is 0 so that every pytest-xdist worker collects the same test ids.
BAD_CORPORA = [(b"", "no text to pre-train on"), (b"\n\n   \n", "no text to pre-train on"),
               ("한국어 문장 하나뿐입니다.\n".encode(), "one line of text only"),
               (b"PK\x03\x04\x00\x00binary", "a zip archive, not UTF-8 text; unpack it first"),
               (gzip.compress("한국어 문장.\n".encode() * 9, mtime=0), "a gzip-compressed file"),
               (b"text\n" + bytes(range(11, 256)), "line 2 is not UTF-8 text"),
               (b"binary\x00\x01\n", "NUL byte: a binary file"),
               ("한국어 문장\n".encode("utf-16"), "not UTF-8 text"), (b'{"version": 1}', "not KorQuAD/SQuAD JSON")]


@pytest.mark.parametrize("content, expected", BAD_CORPORA, ids=[expected for _, expected in BAD_CORPORA])
def test_bad_corpus_is_one_line_naming_the_file(tmp_path, content, expected):
    from cli import UsageError

    corpus = tmp_path / ("corpus.json" if content.startswith(b"{") else "corpus.txt")
    corpus.write_bytes(content)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    flags = ["--train_files", str(corpus), f"--output_dir={tmp_path / 'out'}", "--checkpoint=none",
             f"--model_config={tmp_path / 'tiny.json'}", *FLAGS, "--max_steps=1"]
    if content == b"":  # once through the script: one line on stderr, no traceback, exit status 1
        result = run_in_process("pretrain.py", *flags)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert expected in result.stderr and str(corpus) in result.stderr
        return
    with pytest.raises(UsageError) as error:
        pretrain.main(flags)
    assert expected in str(error.value) and str(corpus) in str(error.value) and "\n" not in str(error.value)


def test_a_korquad2_file_is_refused_as_a_corpus_in_one_line(tmp_path):
    from cli import UsageError
    corpus = ROOT / "data" / "korquad2_sample" / "korquad2.1_train_00.json"
    with pytest.raises(UsageError, match="a KorQuAD 2.x file .* not supported as a pre-training corpus") as error:
        pretrain.main(["--train_files", str(corpus), f"--output_dir={tmp_path / 'out'}", "--checkpoint=none", *FLAGS])
    assert str(corpus) in str(error.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, derived", [(["--masked_lm_prob=1", "--max_seq_length=64"], 61),
                                            (["--max_seq_length=5"], 2), ([], 80)])
def test_the_derived_max_predictions_never_exceeds_the_pieces_of_a_pair(flags, derived):
    """Not refused over a flag the user did not give: the documented minimum --max_seq_length 5 runs."""
    assert pretrain.parse_args(["--train_files", "x.txt", "--output_dir=x", *flags]).max_predictions_per_seq == derived


def test_a_resume_with_another_masked_lm_prob_names_it(tmp_path):
    """Not the --max_predictions_per_seq derived from it, which differs too."""
    from cli import UsageError
    from long_run import check_same_settings
    flags = ["--train_files", str(SAMPLE_FILE), "--output_dir=x", f"--vocab_file={VOCAB_FILE}", "--analyzer=none"]
    settings = [pretrain.run_settings(pretrain.parse_args([*flags, *extra]), [SAMPLE_FILE], Config(**TINY_CONFIG),
                                      False, 1) for extra in ([], ["--masked_lm_prob=0.3"])]
    with pytest.raises(UsageError, match="--resume: --masked_lm_prob was 0.15 in the interrupted run, now 0.3"):
        check_same_settings(*settings, {}, {})


def test_a_line_longer_than_the_window_is_cut_with_one_warning(tmp_path):
    corpus = tmp_path / "long.txt"
    corpus.write_text("짧은 문장입니다.\n" + "아주 긴 문장이 계속 이어집니다 " * 40 + "\n다음 문장.\n\n둘째 문서입니다.\n"
                      "그리고 또 한 줄.\n", encoding="utf-8")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    result = run_script("pretrain.py", "--train_files", str(corpus), f"--output_dir={tmp_path / 'out'}",
                        "--checkpoint=none", f"--model_config={tmp_path / 'tiny.json'}", *FLAGS, "--max_steps=1",
                        "--held_out_share=0")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line and "longer than" in line]
    assert len(warnings) == 1 and str(corpus) in warnings[0]


def test_run_directory_fine_tunes_evaluates_and_exports(tmp_path, tiny_setup):
    """pretrain.py's output as train.py's --checkpoint (its encoder), then eval.py; export.py writes both heads."""
    run = _run(tmp_path, "lm", "--max_steps=3", "--held_out_share=0.2", "--eval_steps=2",
               checkpoint=str(tiny_setup / "pretrained.bin"))
    assert run.returncode == 0, run.stderr
    log = [json.loads(line) for line in (tmp_path / "lm" / "training_log.jsonl").read_text().splitlines()]
    assert any("baseline_mlm_accuracy" in r for r in log) and any("eval_sop_accuracy" in r for r in log)
    assert (tmp_path / "lm" / "training_curves.png").is_file()
    train = run_script("train.py", f"--checkpoint={tmp_path / 'lm'}", f"--output_dir={tmp_path / 'qa'}",
                       f"--train_file={tiny_setup / 'train.json'}", *DATA_FLAGS, "--train_batch_size=8",
                       "--num_train_epochs=1", "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}")
    assert train.returncode == 0, train.stderr
    qa = torch.load(tmp_path / "qa" / "korquad_0.bin", weights_only=True)
    assert "qa_outputs.weight" in qa and not any(k.startswith("cls.") for k in qa)
    # One pretrain_N.bin of the run brings the run's config and vocab as the directory does.
    newest = sorted((tmp_path / "lm").glob("pretrain_*.bin"))[-1]
    from_file = run_script("train.py", f"--checkpoint={newest}", f"--output_dir={tmp_path / 'qa_from_file'}",
                           f"--train_file={tiny_setup / 'train.json'}", *DATA_FLAGS, "--train_batch_size=8",
                           "--num_train_epochs=1", "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}")
    assert from_file.returncode == 0, from_file.stderr
    assert torch.equal(torch.load(tmp_path / "qa_from_file" / "korquad_0.bin", weights_only=True)["qa_outputs.weight"],
                       qa["qa_outputs.weight"])
    evaluated = run_script("eval.py", f"--checkpoint={tmp_path / 'qa'}", f"--predict_file={tiny_setup / 'train.json'}",
                           *DATA_FLAGS, "--no_cuda", "--quiet", f"--output_dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "f1" in json.loads(evaluated.stdout.strip().splitlines()[-1])
    exported = run_script("export.py", f"--checkpoint={tmp_path / 'lm'}", f"--output_dir={tmp_path / 'hf'}")
    assert exported.returncode == 0, exported.stderr
    theirs = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf").eval()
    ours = BertForPreTraining(Config(**TINY_CONFIG)).eval()
    assert load_checkpoint(ours, sorted((tmp_path / "lm").glob("pretrain_*.bin"))[-1]) == "pretraining"
    inputs = _inputs(TINY_CONFIG["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).prediction_logits, ours(**inputs)[0], atol=1e-5, rtol=0)


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "training_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_torchrun_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    """Each rank takes its half of every global batch (the masks depend on the pair, not the rank); DDP
    averages the ranks' gradients, which weights the masked pieces by rank rather than all alike, so the
    losses agree closely rather than bit for bit. One writer: one log, one checkpoint."""
    single = _run(tmp_path, "single", "--max_steps=6")
    assert single.returncode == 0, single.stderr
    flags = ["--train_files", str(SAMPLE_FILE), f"--output_dir={tmp_path / 'ddp'}", "--checkpoint=none",
             f"--model_config={tmp_path / 'tiny.json'}", f"--cache_dir={tmp_path / 'cache'}", *FLAGS,
             "--max_steps=6", "--train_batch_size=2"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "pretrain.py"), *flags], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    args = json.loads((tmp_path / "ddp" / "training_args.json").read_text())
    assert (args["world_size"], args["global_batch_size"]) == (2, 4)
    single_losses, ddp_losses = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(ddp_losses) == len(single_losses) == 6  # logged once per step, not once per rank
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=0.03)
    assert [p.name for p in (tmp_path / "ddp").glob("pretrain_*.bin")] == \
        [p.name for p in (tmp_path / "single").glob("pretrain_*.bin")]


def test_bf16_autocast_pretrains_and_keeps_fp32_weights(tmp_path):
    fp32 = _run(tmp_path, "fp32", "--max_steps=4")
    bf16 = _run(tmp_path, "bf16", "--max_steps=4", "--bf16")
    assert fp32.returncode == 0 and bf16.returncode == 0, bf16.stderr
    np.testing.assert_allclose(_losses(tmp_path / "bf16"), _losses(tmp_path / "fp32"), rtol=0.05)
    weights = torch.load(next((tmp_path / "bf16").glob("pretrain_*.bin")), weights_only=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


def test_compiled_pretraining_trains_as_eager_in_one_shape_per_bucket(tmp_path, monkeypatch):
    """--compile pads every batch to its width bucket and to --max_predictions_per_seq prediction slots,
    so the compiled model sees one shape per bucket; the padding changes no loss. Dynamo's guards (what
    decides recompiling) run with the aot_eager backend: Inductor's C++ build of a training graph takes
    about a minute on this CPU, and its code is what test_compile.py checks for train.py."""
    monkeypatch.setattr(pretrain, "check_compile_args", lambda args, device: None)  # aot_eager needs no C++ compiler
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, dynamic=None: real_compile(
        model, backend="aot_eager", dynamic=dynamic))
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    shapes: dict[str, set] = {"eager": set(), "compiled": set()}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for run, extra in (("eager", []), ("compiled", ["--compile", "--compile_bucket=32"])):
        def recording_collate(*args, _seen=shapes[run], _compiled=bool(extra), **kwargs):
            batch = real_collate(*args, **kwargs)
            if kwargs or not _compiled:  # training batches; the held-out evaluation runs the eager model
                _seen.add((tuple(batch["input_ids"].shape), tuple(batch["masked_positions"].shape)))
            return batch
        real_collate = pretraining_data.collate
        with monkeypatch.context() as patch:
            patch.setattr(pretrain, "collate", recording_collate)
            pretrain.main(["--train_files", str(SAMPLE_FILE), f"--output_dir={tmp_path / run}", "--checkpoint=none",
                           f"--model_config={tmp_path / 'tiny.json'}", f"--cache_dir={tmp_path / 'cache'}", *FLAGS,
                           "--max_steps=6", *extra])
    widths = {width for (_, width), _ in shapes["compiled"]}
    saved = json.loads((tmp_path / "compiled" / "training_args.json").read_text())["max_predictions_per_seq"]
    assert widths <= {32, 64} and {slots for _, (_, slots) in shapes["compiled"]} == {saved or 12}, shapes
    assert len(shapes["eager"]) > len(shapes["compiled"]), shapes  # eager pads each batch to its own longest pair
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(widths)
    np.testing.assert_allclose(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rtol=1e-5)


def _known_pair_maker() -> pretraining_data.PairMaker:
    """One document of two lines, A = 10 11 12 and B = 20 21 (a 30-id vocabulary, no `##` pieces)."""
    tokens = pretraining_data.TokenFile(np.array([10, 11, 12, 20, 21], np.int32), np.array([0, 3, 5]), np.array([0, 2]))
    continuation = np.zeros(30, dtype=bool)
    pairs = pretraining_data.make_pairs(tokens, continuation, max_seq_length=16, seed=0)
    assert pairs.tolist() == [[0, 3, 5]]
    return pretraining_data.PairMaker(tokens.ids, pairs, continuation, cls_id=2, sep_id=3, mask_id=4,
                                      random_ids=np.arange(5, 30), seed=0, masked_lm_prob=0.15, max_predictions=2)


def test_sop_label_is_one_exactly_for_a_swapped_pair_and_token_types_mark_the_second_segment():
    """transformers' convention (next_sentence_label 0 = B continues A, 1 = not): [CLS] B [SEP] A [SEP] has
    label 1. Token type 1 for every piece after the first [SEP] through the second, 0 up to the first [SEP]."""
    maker = _known_pair_maker()
    orders = set()
    for epoch in range(20):
        example = maker.example(0, epoch)
        original = example["input_ids"].copy()
        original[example["masked_positions"]] = example["mlm_labels"]
        swapped = original.tolist() == [2, 20, 21, 3, 10, 11, 12, 3]
        assert swapped or original.tolist() == [2, 10, 11, 12, 3, 20, 21, 3]
        assert example["sop_label"] == int(swapped)
        first_length = 2 if swapped else 3
        assert example["token_type_ids"].tolist() == [0] * (first_length + 2) + [1] * (6 - first_length)
        orders.add(swapped)
    assert orders == {False, True}
    batch = pretraining_data.collate([maker.example(0, 0), {**maker.example(0, 0), "input_ids": np.array([2, 10, 3]),
                                                            "token_type_ids": np.array([0, 0, 1])}])
    assert batch["token_type_ids"][1].tolist() == [0, 0, 1, 0, 0, 0, 0, 0]  # padding is type 0


def _document_of(tokens: pretraining_data.TokenFile, piece_index: int) -> int:
    line = np.searchsorted(tokens.line_bounds, piece_index, side="right") - 1
    return int(np.searchsorted(tokens.doc_bounds, line, side="right") - 1)


def _sample_tokens():
    from tokenization import BertTokenizer

    tokenizer = BertTokenizer(VOCAB_FILE)
    return tokenizer, pretraining_data.tokenize_corpus([SAMPLE_FILE], tokenizer, 61, progress=False)


def test_held_out_documents_never_reach_training_and_share_0_holds_none_out():
    tokenizer, tokens = _sample_tokens()
    num_docs = len(tokens.doc_bounds) - 1
    for share, expected_held_out in (("0.2", math.ceil(num_docs * 0.2)), ("0", 0)):
        args = pretrain.parse_args(["--train_files", str(SAMPLE_FILE), "--output_dir", "unused",
                                    f"--held_out_share={share}", "--max_seq_length=64"])
        train, held_out = pretraining_data.build_pair_makers(args, tokenizer, tokens)
        # Every piece of a pair (A and B alike) lies in one document; the two sides share none.
        train_docs = {_document_of(tokens, i) for start, _, end in train.pairs for i in (start, end - 1)}
        held_docs = {_document_of(tokens, i) for start, _, end in held_out.pairs for i in (start, end - 1)}
        assert not train_docs & held_docs
        assert len(train_docs) == num_docs - expected_held_out and len(held_docs) == expected_held_out


def test_held_out_share_0_runs_no_held_out_evaluation(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    pretrain.main(["--train_files", str(SAMPLE_FILE), f"--output_dir={tmp_path / 'run'}", "--checkpoint=none",
                   f"--model_config={tmp_path / 'tiny.json'}", f"--cache_dir={tmp_path / 'cache'}", *FLAGS,
                   "--held_out_share=0", "--max_steps=2", "--eval_steps=1"])
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]  # the losses only: no baseline, no evaluation record
    assert not any(key.startswith(("eval_", "baseline")) for r in log for key in r)


def test_mlm_decoder_is_the_word_embeddings_and_one_step_moves_it():
    """No decoder of its own: the embedding Parameter is the decoder, and the gradient through it moves the
    row of a piece that is only a label (never in the input)."""
    model = BertForPreTraining(Config(**TINY_CONFIG))
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert sum(p is embeddings for p in model.parameters()) == 1
    assert not any(p.shape == embeddings.shape for name, p in model.named_parameters() if "word_embeddings" not in name)
    before = embeddings[777].detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    mlm, sop = model(torch.tensor([[2, 10, 11, 3, 12, 3]]), masked_positions=torch.tensor([[1]]))
    pretraining_loss(mlm, sop, torch.tensor([[777]]), torch.tensor([0])).backward()
    optimizer.step()
    assert not torch.equal(embeddings[777], before)


DAMAGES = {"truncated ids": lambda ids, index: ids.write_bytes(ids.read_bytes()[:200]),
           "index not a zip": lambda ids, index: index.write_bytes(b"\x93NUMPY garbage" * 20),
           "truncated index": lambda ids, index: index.write_bytes(index.read_bytes()[:300]),
           "ids outside the vocabulary": lambda ids, index: np.save(ids, np.load(ids) + 40_000)}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_token_cache_is_tokenized_again_with_one_warning(tmp_path, caplog, damage):
    tokenizer, fresh = _sample_tokens()
    pretraining_data.load_or_build_token_file([SAMPLE_FILE], tokenizer, 64, tmp_path, progress=False)
    (ids_path,), (index_path,) = tmp_path.glob("*.ids.npy"), tmp_path.glob("*.index.npz")
    DAMAGES[damage](ids_path, index_path)
    with caplog.at_level(logging.WARNING):
        tokens = pretraining_data.load_or_build_token_file([SAMPLE_FILE], tokenizer, 64, tmp_path, progress=False)
    assert np.array_equal(tokens.ids, fresh.ids) and np.array_equal(tokens.doc_bounds, fresh.doc_bounds)
    assert [r.message.count("\n") for r in caplog.records if "damaged" in r.message] == [0]
    caplog.clear()
    with caplog.at_level(logging.INFO):  # rewritten whole: the next run reads it
        again = pretraining_data.load_or_build_token_file([SAMPLE_FILE], tokenizer, 64, tmp_path, progress=False)
    assert "loaded from cache" in caplog.text and np.array_equal(again.ids, fresh.ids)


SAVE_KILLER = '''
import os, signal, sys
sys.path.insert(0, {root!r})
sys.argv[0] = "pretrain.py"
import torch
import pretrain
saves, real_save = 0, torch.save


def save_half_then_die(obj, file, *args, **kwargs):
    """The second training-state write dies half-way through (kill -9 while the disk is busy)."""
    global saves
    if isinstance(obj, dict) and "optimizer" in obj:
        saves += 1
        if saves == 2:
            file.write(b"PK\\x03\\x04 half a state")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, file, *args, **kwargs)


torch.save = save_half_then_die
pretrain.run_cli(pretrain.cli)
'''


def test_kill_9_during_a_state_save_leaves_the_previous_state_to_resume_from(tmp_path):
    (tmp_path / "killer.py").write_text(SAVE_KILLER.format(root=str(ROOT)))
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    flags = ["--train_files", str(SAMPLE_FILE), f"--output_dir={tmp_path / 'run'}", "--checkpoint=none",
             f"--model_config={tmp_path / 'tiny.json'}", f"--cache_dir={tmp_path / 'cache'}", *FLAGS,
             "--max_steps=3", "--save_steps=1"]
    killed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *flags], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)
    assert state["global_step"] == 1  # the first save, whole; the half-written second one never took its name
    assert [p.name for p in (tmp_path / "run").glob(".training_state.pt.*.tmp")]
    resumed = run_script("pretrain.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)["global_step"] == 3
    assert not list((tmp_path / "run").glob(".*.tmp"))  # the dead writer's temporary file is gone


def test_a_corpus_with_carriage_return_line_endings_keeps_its_lines_and_documents(tmp_path):
    """Old Mac OS's lone \r ends a line as \n and \r\n do (iterating a file splits on \n only: such a corpus was
    one line, one document); \r\n stays one line break."""
    text = "첫 문장.\n둘째 문장.\n\n다른 문서.\n\n\n셋째 문서 첫 줄.\n끝.\n"
    read = {}
    for name, ending in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        path = tmp_path / f"{name}.txt"
        path.write_bytes(text.replace("\n", ending).encode("utf-8"))
        read[name] = list(pretraining_data.read_documents(path))
    assert read["lf"] == [["첫 문장.", "둘째 문장."], ["다른 문서."], ["셋째 문서 첫 줄.", "끝."]]
    assert read["crlf"] == read["cr"] == read["lf"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"one\rtwo\r\xff\r")
    with pytest.raises(pretraining_data.UsageError, match=r"line 3 is not UTF-8"):
        list(pretraining_data.read_documents(bad))
    # A stray \r inside a \n corpus's line is left as it was read.
    stray = tmp_path / "stray.txt"
    stray.write_bytes("가\r나\n\n다\n".encode())
    assert list(pretraining_data.read_documents(stray)) == [["가\r나"], ["다"]]


def test_a_carriage_return_corpus_that_switches_to_newlines_keeps_every_line(tmp_path):
    """\r-only for over the first 64 KiB (how the reader tells), then \n and \r\n (two files joined): each ends a line."""
    head = "".join(f"문장 {i}.\r" for i in range(8000)) + "\r"      # one document, then a blank line
    path = tmp_path / "joined.txt"
    path.write_bytes((head + "다음 문서.\n둘째 줄.\r\n\r\n끝 문서.\n").encode("utf-8"))
    documents = list(pretraining_data.read_documents(path))
    assert len(head.encode("utf-8")) > 1 << 16
    assert documents == [[f"문장 {i}." for i in range(8000)], ["다음 문서.", "둘째 줄."], ["끝 문서."]]


def test_a_new_run_over_a_training_run_is_refused_and_one_over_an_old_run_replaces_it_whole(tmp_path):
    """Without --resume or --overwrite_output_dir a run directory (here train.py's) is refused untouched; with
    --overwrite_output_dir the old run's later checkpoints go, so train.py cannot pick one up as the new run's."""
    from cli import UsageError

    (tmp_path / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "run"
    out.mkdir()
    (out / "korquad_0.bin").write_bytes(b"a fine-tuned model")
    (out / "training_args.json").write_text("{}")
    flags = ["--train_files", str(SAMPLE_FILE), f"--output_dir={out}", "--checkpoint=none",
             f"--model_config={tmp_path / 'tiny.json'}", f"--cache_dir={tmp_path / 'cache'}", *FLAGS, "--max_steps=1"]
    with pytest.raises(UsageError, match=r"--output_dir \S+run holds a training run \(training_args\.json, "
                                         r"korquad_0\.bin\); pass --overwrite_output_dir to replace it"):
        pretrain.main(flags)
    assert (out / "korquad_0.bin").read_bytes() == b"a fine-tuned model"
    assert (out / "training_args.json").read_text() == "{}"
    (out / "pretrain_2.bin").write_bytes(b"an older pre-training run's last epoch")
    pretrain.main([*flags, "--overwrite_output_dir"])
    assert sorted(p.name for p in out.glob("*.bin")) == ["pretrain_0.bin"]

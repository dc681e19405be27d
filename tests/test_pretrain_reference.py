"""Pre-training learns as transformers' BertForPreTraining does: one optimizer step from the same weights on
the same batch (built by our pairing and masking) gives the same loss and the same updated weights, heads
included; fresh heads follow BERT's initialisation; dropout sits where BERT has it."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import pretrain
import pretraining_data
from long_run import build_optimizer
from modeling import BertForPreTraining, Config, QuestionAnswering, config_from_transformers, load_checkpoint, \
    pretraining_loss, to_transformers_pretraining_state

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_act="gelu_new", max_position_embeddings=64, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)
CLS_ID, SEP_ID, MASK_ID = 2, 3, 4
OPTIMIZER = argparse.Namespace(learning_rate=1e-3, weight_decay=0.01, adam_epsilon=1e-6)  # pretrain.py's defaults
MAX_SEQ_LENGTH = 24


def _tiny_corpus() -> pretraining_data.PairMaker:
    """Three documents of 3-4 lines, every piece id distinct across the corpus (so a segment names its place)."""
    rng = np.random.default_rng(0)
    lengths = [[3, 4, 5], [6, 2, 3, 4], [5, 5, 4]]
    ids = rng.permutation(np.arange(5, 100))[:sum(map(sum, lengths))].astype(np.int32)
    line_bounds = np.concatenate([[0], np.cumsum([n for doc in lengths for n in doc])])
    doc_bounds = np.concatenate([[0], np.cumsum([len(doc) for doc in lengths])])
    tokens = pretraining_data.TokenFile(ids, line_bounds.astype(np.int64), doc_bounds.astype(np.int64))
    continuation = np.zeros(100, dtype=bool)
    pairs = pretraining_data.make_pairs(tokens, continuation, MAX_SEQ_LENGTH, seed=1)
    return pretraining_data.PairMaker(tokens.ids, pairs, continuation, CLS_ID, SEP_ID, MASK_ID, np.arange(5, 100),
                                      seed=1, masked_lm_prob=0.3, max_predictions=6)


def _batches(maker: pretraining_data.PairMaker, epoch: int = 0) -> tuple[dict, dict]:
    """Our collated batch, and transformers' inputs for the same pairs derived from the corpus alone: which
    segment came first (SOP label), the token types, and the original pieces at the masked positions."""
    examples = [maker.example(i, epoch) for i in range(len(maker.pairs))]
    ours = pretraining_data.collate(examples)
    rows, width = ours["input_ids"].shape
    types = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100)
    order = torch.zeros(rows, dtype=torch.long)
    for row, (example, (start, middle, end)) in enumerate(zip(examples, maker.pairs)):
        a, b = maker.ids[start:middle], maker.ids[middle:end]
        first_sep = int(np.flatnonzero(example["input_ids"] == SEP_ID)[0])
        unmasked = np.setdiff1d(np.arange(1, first_sep), example["masked_positions"])
        assert len(unmasked), "a first segment wholly masked: the order cannot be read"
        swapped = first_sep - 1 != len(a) or not np.isin(example["input_ids"][unmasked], a).all()
        order[row] = int(swapped)  # next_sentence_label: 0 = B continues A, 1 = not (here: swapped)
        original = np.concatenate([[CLS_ID], *((b, [SEP_ID], a) if swapped else (a, [SEP_ID], b)), [SEP_ID]])
        types[row, first_sep + 1:len(original)] = 1
        labels[row, example["masked_positions"]] = torch.from_numpy(original[example["masked_positions"]])
    theirs = {"input_ids": ours["input_ids"], "attention_mask": ours["attention_mask"], "token_type_ids": types,
              "labels": labels, "next_sentence_label": order}
    return ours, theirs


def _step_both(ours: BertForPreTraining, theirs, maker: pretraining_data.PairMaker) -> None:
    """One AdamW step (pretrain.py's optimizer, weight-decay groups and clipping) of each model on the same
    pairs; the losses and every updated weight, under transformers' names, agree to 1e-5."""
    our_batch, their_batch = _batches(maker)
    assert their_batch["next_sentence_label"].unique().numel() == 2  # both orders are in the batch
    ours.train()
    theirs.train()
    losses = []
    for model, loss_of in ((ours, lambda: pretraining_loss(
            *ours(our_batch["input_ids"], our_batch["token_type_ids"], our_batch["attention_mask"],
                  our_batch["masked_positions"]), our_batch["mlm_labels"], our_batch["sop_labels"])),
                           (theirs, lambda: theirs(**their_batch).loss)):
        optimizer = build_optimizer(model, OPTIMIZER, torch.device("cpu"))
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    mine, expected = to_transformers_pretraining_state(ours), theirs.state_dict()
    assert set(expected) - {"bert.embeddings.position_ids", "bert.embeddings.token_type_ids"} <= set(mine)
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_one_step_from_transformers_weights_equals_bert_for_pretraining(tmp_path):
    """Loaded from a transformers BertForPreTraining directory (non-trivial heads): tie, loss average, labels,
    SOP convention and token types all show in the updated weights."""
    torch.manual_seed(0)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**SMALL))
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = BertForPreTraining(config_from_transformers(theirs.config.to_dict()))
    assert load_checkpoint(ours, tmp_path / "theirs") == "pretraining"
    _step_both(ours, theirs, _tiny_corpus())


def test_one_step_from_an_encoder_only_checkpoint_equals_bert_for_pretraining(tmp_path):
    """pretrain.py's start from the published format: the heads it creates are initialised as transformers
    initialises them (constants exactly, random draws at the same scale), then one step agrees."""
    config = config_from_transformers({**SMALL, "model_type": "bert"})
    torch.manual_seed(0)
    torch.save(QuestionAnswering(config).bert.state_dict(), tmp_path / "encoder.bin")
    args = pretrain.parse_args(["--train_files", "unused", "--output_dir", "unused",
                                f"--checkpoint={tmp_path / 'encoder.bin'}", "--seed=3"])
    ours = pretrain.build_model(args, config)
    torch.manual_seed(5)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**SMALL))
    mine = to_transformers_pretraining_state(ours)
    fresh = theirs.state_dict()
    for name in [n for n in fresh if n.startswith("cls.") and n != "cls.predictions.decoder.weight"]:
        if fresh[name].unique().numel() == 1:  # zeros and ones: exactly BERT's
            assert torch.equal(mine[name], fresh[name]), name
        else:  # normal(0, initializer_range): the same scale, then the same draw on both sides
            assert 0.7 < float(mine[name].std() / fresh[name].std()) < 1.4, name
            assert abs(float(mine[name].mean())) < 0.01, name
    theirs.load_state_dict({k: v for k, v in mine.items() if k in fresh}, strict=False)
    _step_both(ours, theirs, _tiny_corpus())


def test_fresh_heads_follow_bert_initialisation(tmp_path):
    """Heads created for an encoder-only checkpoint: normal(0, initializer_range) dense layers, zero biases,
    LayerNorm at ones and zeros, the decoder the word embeddings themselves."""
    config = Config(vocab_size=500, hidden_size=64, num_hidden_layers=1, num_heads=4, ff_dim=128,
                    initializer_range=0.05)
    torch.manual_seed(0)
    torch.save(QuestionAnswering(config).bert.state_dict(), tmp_path / "encoder.bin")
    args = pretrain.parse_args(["--train_files", "unused", "--output_dir", "unused",
                                f"--checkpoint={tmp_path / 'encoder.bin'}"])
    model = pretrain.build_model(args, config)
    heads = model.cls
    for weight in (heads.predictions.transform.dense.weight.detach(), heads.seq_relationship.weight.detach()):
        assert abs(float(weight.std()) - 0.05) < 0.1 * 0.05 and abs(float(weight.mean())) < 0.01
    for bias in (heads.predictions.transform.dense.bias, heads.predictions.bias, heads.seq_relationship.bias,
                 heads.predictions.transform.LayerNorm.bias):
        assert torch.equal(bias, torch.zeros_like(bias))
    assert torch.equal(heads.predictions.transform.LayerNorm.weight, torch.ones(64))
    word_embeddings = model.bert.embeddings.word_embeddings.weight
    assert torch.equal(word_embeddings, torch.load(tmp_path / "encoder.bin", weights_only=True)[
        "embeddings.word_embeddings.weight"])
    inputs = torch.tensor([[2, 7, 8, 3]])
    mlm, _ = model(inputs, masked_positions=torch.tensor([[1]]))
    mlm[0, 0, 400].backward()  # piece 400 is not in the input: only the decoder reaches its embedding row
    assert word_embeddings.grad[400].abs().sum() > 0


def test_dropout_sits_where_bert_has_it():
    """Every nn.Dropout transformers' BertForPreTraining applies, ours applies at the same place and rate."""
    values = {**SMALL, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**values)).train()
    ours = BertForPreTraining(config_from_transformers({**values, "model_type": "bert"})).train()
    called: dict[str, set] = {"ours": set(), "theirs": set()}
    for side, model, rename in (("ours", ours, _our_module_to_theirs), ("theirs", theirs, lambda name: name)):
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout):
                module.register_forward_hook(
                    lambda m, i, o, n=rename(name), s=side: called[s].add((n, m.p)))
    inputs = torch.tensor([[2, 7, 8, 3, 9, 3]])
    ours(inputs)
    theirs(inputs)
    assert called["ours"] == called["theirs"] and len(called["theirs"]) == 1 + 2 * SMALL["num_hidden_layers"]


def _our_module_to_theirs(name: str) -> str:
    """Our dropout module names under transformers' (the attention's is BertSelfOutput's)."""
    parts = name.split(".")
    if len(parts) > 3 and parts[1] == "encoder":
        where = {"attn": "attention.output", "ffn": "output"}[parts[4]]
        return ".".join(["bert", "encoder", "layer", parts[3], where, parts[-1]])
    return name

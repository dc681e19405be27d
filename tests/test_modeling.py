"""The model against an independent float64 reference, and the checkpoint formats users hold."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from modeling import CheckpointError, Config, ConfigError, QuestionAnswering, BertModel, load_checkpoint

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_heads=4, ff_dim=64, act_fn="gelu",
            dropout_prob=0.1, max_position_embeddings=40, type_vocab_size=2, initializer_range=0.02)


def published_encoder_names(num_layers: int) -> list[str]:
    """The published checkpoint's tensor names, spelled out here independently of modeling.py."""
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for i in range(num_layers):
        for part in ("attn.query", "attn.key", "attn.value", "attn.o_proj", "attention_norm",
                     "ffn.fc1", "ffn.fc2", "ffn_norm"):
            names += [f"encoder.layer.{i}.{part}.weight", f"encoder.layer.{i}.{part}.bias"]
    return names + ["pooler.dense.weight", "pooler.dense.bias"]


def random_encoder_state(config: Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict in the published format with random values of the right shapes."""
    g = torch.Generator().manual_seed(seed)
    h, f, L = config.hidden_size, config.ff_dim, config.num_hidden_layers
    shapes = {"embeddings.word_embeddings.weight": (config.vocab_size, h),
              "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
              "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
              "pooler.dense.weight": (h, h)}
    for i in range(L):
        for p in ("query", "key", "value", "o_proj"):
            shapes[f"encoder.layer.{i}.attn.{p}.weight"] = (h, h)
        shapes[f"encoder.layer.{i}.ffn.fc1.weight"] = (f, h)
        shapes[f"encoder.layer.{i}.ffn.fc1.bias"] = (f,)
        shapes[f"encoder.layer.{i}.ffn.fc2.weight"] = (h, f)
    state = {}
    for name in published_encoder_names(L):
        shape = shapes.get(name, (h,))
        state[name] = torch.randn(shape, generator=g) * 0.5
    return state


def reference_logits(state: dict[str, torch.Tensor], config: Config, input_ids, token_type_ids, mask):
    """BERT forward pass by explicit float64 matrix products, from the published formulas."""
    W = {k: v.double() for k, v in state.items()}
    n_heads, h = config.num_heads, config.hidden_size
    d = h // n_heads

    def layer_norm(x, prefix):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-12) * W[prefix + ".weight"] + W[prefix + ".bias"]

    def linear(x, prefix):
        return x @ W[prefix + ".weight"].T + W[prefix + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    seq = input_ids.shape[1]
    x = (W["bert.embeddings.word_embeddings.weight"][input_ids]
         + W["bert.embeddings.position_embeddings.weight"][torch.arange(seq)]
         + W["bert.embeddings.token_type_embeddings.weight"][token_type_ids])
    x = layer_norm(x, "bert.embeddings.LayerNorm")
    for i in range(config.num_hidden_layers):
        p = f"bert.encoder.layer.{i}."
        q, k, v = (linear(x, p + "attn." + n) for n in ("query", "key", "value"))
        out = torch.zeros_like(x)
        for b in range(x.shape[0]):
            for head in range(n_heads):
                cols = slice(head * d, (head + 1) * d)
                scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(d)
                scores[:, mask[b] == 0] = float("-inf")
                probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
                probs = probs / probs.sum(-1, keepdim=True)
                out[b, :, cols] = probs @ v[b, :, cols]
        x = layer_norm(x + linear(out, p + "attn.o_proj"), p + "attention_norm")
        x = layer_norm(x + linear(gelu_tanh(linear(x, p + "ffn.fc1")), p + "ffn.fc2"), p + "ffn_norm")
    logits = linear(x, "qa_outputs")
    return logits[..., 0], logits[..., 1]


def random_batch(config: Config, batch=3, seq=17, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    token_type_ids = torch.randint(0, 2, (batch, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    lengths[0] = seq  # one row without padding
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return input_ids, token_type_ids, mask


def test_logits_match_float64_reference_with_padding():
    config = Config(**TINY)
    model = QuestionAnswering(config).double().eval()
    state = {f"bert.{k}": v for k, v in random_encoder_state(config).items()}
    state["qa_outputs.weight"] = torch.randn(2, config.hidden_size) * 0.5
    state["qa_outputs.bias"] = torch.randn(2)
    model.load_state_dict(state)
    for seed in (1, 2, 3):
        ids, types, mask = random_batch(config, seed=seed)
        with torch.no_grad():
            start, end = model(ids, types, mask)
        ref_start, ref_end = reference_logits(state, config, ids, types, mask)
        assert torch.allclose(start, ref_start, atol=1e-5, rtol=0)
        assert torch.allclose(end, ref_end, atol=1e-5, rtol=0)


def test_padding_does_not_change_logits_of_real_tokens():
    config = Config(**TINY)
    model = QuestionAnswering(config).eval()
    ids, types, _ = random_batch(config, batch=1, seq=10)
    padded_ids = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    padded_types = torch.cat([types, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1).long()
    with torch.no_grad():
        short = model(ids, types, torch.ones(1, 10, dtype=torch.long))
        long = model(padded_ids, padded_types, mask)
    for a, b in zip(short, long):
        assert torch.allclose(a, b[:, :10], atol=1e-5)


def test_published_encoder_checkpoint_loads_into_qa_model(tmp_path):
    config = Config(**TINY)
    state = random_encoder_state(config, seed=5)
    path = tmp_path / "bert_small_ckpt.bin"
    torch.save(state, path)
    model = QuestionAnswering(config)
    head_before = model.qa_outputs.weight.detach().clone()
    assert load_checkpoint(model, path) == "pretrained"
    loaded = model.bert.state_dict()
    assert sorted(loaded) == sorted(published_encoder_names(config.num_hidden_layers))
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert torch.equal(model.qa_outputs.weight, head_before)  # the span head keeps its initialisation

    encoder = BertModel(config)
    assert load_checkpoint(encoder, path) == "pretrained"
    assert torch.equal(encoder.encoder.layer[1].ffn.fc2.weight, state["encoder.layer.1.ffn.fc2.weight"])


def test_finetuned_checkpoint_round_trip(tmp_path):
    config = Config(**TINY)
    trained = QuestionAnswering(config).eval()
    path = tmp_path / "korquad_0.bin"
    torch.save(trained.state_dict(), path)
    assert sorted(trained.state_dict()) == sorted(
        [f"bert.{n}" for n in published_encoder_names(config.num_hidden_layers)] + ["qa_outputs.weight", "qa_outputs.bias"])
    restored = QuestionAnswering(config).eval()
    assert load_checkpoint(restored, path) == "finetuned"
    ids, types, mask = random_batch(config)
    with torch.no_grad():
        for a, b in zip(trained(ids, types, mask), restored(ids, types, mask)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_ddp_or_compile_prefixed_checkpoint_loads(tmp_path, prefix):
    # What torch.save of a DDP-wrapped, a torch.compile'd, or a compiled DDP model's state_dict() writes.
    config = Config(**TINY)
    trained = QuestionAnswering(config)
    torch.save({f"{prefix}{k}": v for k, v in trained.state_dict().items()}, tmp_path / "wrapped.bin")
    restored = QuestionAnswering(config)
    assert load_checkpoint(restored, tmp_path / "wrapped.bin") == "finetuned"
    assert torch.equal(restored.qa_outputs.weight, trained.qa_outputs.weight)


def test_shape_mismatch_names_the_tensor_and_shapes(tmp_path):
    config = Config(**TINY)
    state = random_encoder_state(Config(**{**TINY, "vocab_size": 120}))
    torch.save(state, tmp_path / "other_vocab.bin")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(QuestionAnswering(config), tmp_path / "other_vocab.bin")
    message = str(err.value)
    assert "embeddings.word_embeddings.weight" in message
    assert "(120, 32)" in message and "(100, 32)" in message
    assert "\n" not in message


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    config = Config(**TINY)
    state = random_encoder_state(config)
    del state["encoder.layer.1.attn.key.bias"]
    state["encoder.layer.1.attn.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.bin")
    with pytest.raises(CheckpointError, match=r"missing 1 tensor.*attn\.key\.bias.*unexpected 1 tensor.*attn\.extra"):
        load_checkpoint(QuestionAnswering(config), tmp_path / "odd.bin")


def test_lm_head_is_dropped_with_one_log_line(tmp_path, caplog):
    config = Config(**TINY)
    state = random_encoder_state(config)
    state["cls.predictions.bias"] = torch.zeros(config.vocab_size)
    state["cls.predictions.transform.dense.weight"] = torch.zeros(config.hidden_size, config.hidden_size)
    torch.save(state, tmp_path / "with_lm_head.bin")
    model = QuestionAnswering(config)
    with caplog.at_level(logging.INFO, logger="modeling"):
        assert load_checkpoint(model, tmp_path / "with_lm_head.bin") == "pretrained"
    assert len([r for r in caplog.records if "cls." in r.getMessage()]) == 1
    assert torch.equal(model.bert.pooler.dense.weight, state["pooler.dense.weight"])


class PickledObject:
    pass


def test_unsafe_or_missing_checkpoint_is_refused(tmp_path):
    torch.save({"x": PickledObject()}, tmp_path / "pickled.bin")  # would run code if unpickled freely
    with pytest.raises(CheckpointError, match="pickled.bin"):
        load_checkpoint(QuestionAnswering(Config(**TINY)), tmp_path / "pickled.bin")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(QuestionAnswering(Config(**TINY)), tmp_path / "absent.bin")


def test_loss_ignores_positions_outside_the_sequence():
    config = Config(**{**TINY, "dropout_prob": 0.0})
    model = QuestionAnswering(config)
    ids, types, mask = random_batch(config, batch=2, seq=8)
    start, end = model(ids, types, mask)
    inside = torch.nn.functional.cross_entropy
    expected = (inside(start[:1], torch.tensor([3])) + inside(end[:1], torch.tensor([4]))) / 2
    loss = model(ids, types, mask, start_positions=torch.tensor([3, 50]), end_positions=torch.tensor([4, 50]))
    assert torch.allclose(loss, expected, atol=1e-6)


def test_loss_does_not_depend_on_padding():
    config = Config(**{**TINY, "dropout_prob": 0.0})
    model = QuestionAnswering(config)
    ids, types, _ = random_batch(config, batch=1, seq=9)
    positions = dict(start_positions=torch.tensor([2]), end_positions=torch.tensor([5]))
    short = model(ids, types, torch.ones_like(ids), **positions)
    padded = model(torch.cat([ids, torch.zeros(1, 7, dtype=torch.long)], 1),
                   torch.cat([types, torch.zeros(1, 7, dtype=torch.long)], 1),
                   torch.cat([torch.ones(1, 9), torch.zeros(1, 7)], 1).long(), **positions)
    assert torch.allclose(short, padded, atol=1e-6)


def test_bf16_autocast_forward_and_backward_on_cpu():
    config = Config(**TINY)
    model = QuestionAnswering(config).train()
    ids, types, mask = random_batch(config)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        start, _ = model(ids, types, mask)
        loss = model(ids, types, mask, start_positions=torch.tensor([1, 2, 0]), end_positions=torch.tensor([2, 3, 0]))
    assert start.dtype == torch.bfloat16
    assert torch.isfinite(loss)
    loss.backward()
    # The pooler feeds no loss term; every other parameter must receive a finite gradient.
    grads = {n: p.grad for n, p in model.named_parameters() if not n.startswith("bert.pooler.")}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_config_file_keys(tmp_path, config_file):
    config = Config.from_json_file(config_file)
    assert (config.hidden_size, config.num_hidden_layers, config.num_heads, config.ff_dim, config.vocab_size) == (
        256, 12, 8, 1024, 32000)
    values = json.loads(config_file.read_text())
    del values["num_heads"]
    (tmp_path / "bad.json").write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=r"bad.json: missing key\(s\) \['num_heads'\]"):
        Config.from_json_file(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({**values, "num_heads": 8, "hiden_size": 3}))
    with pytest.raises(ConfigError, match="hiden_size"):
        Config.from_json_file(tmp_path / "typo.json")
    (tmp_path / "round.json").write_text(json.dumps(config.to_dict()))
    assert Config.from_json_file(tmp_path / "round.json") == config


def test_only_transformers_configs_make_a_transformers_dir(tmp_path):
    from modeling import is_transformers_dir

    # Our run: Config.to_dict() (with model_type) beside korquad_N.bin.
    (tmp_path / "config.json").write_text(json.dumps(Config(**TINY, model_type="electra").to_dict()))
    (tmp_path / "korquad_0.bin").write_bytes(b"")
    assert not is_transformers_dir(tmp_path)
    # A DistilBERT directory has no num_attention_heads, but is still read as a transformers one (and refused there).
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "distilbert", "n_heads": 4, "dim": 32}))
    assert not is_transformers_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert is_transformers_dir(tmp_path)

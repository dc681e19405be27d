"""transformers interop: BERT/ELECTRA model directories in, our fine-tuned models out, same numbers both ways.

The transformers models are small random ones built here; transformers is a test-only dependency.
"""
from __future__ import annotations

import itertools
import json
import logging
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import (DATA_FLAGS, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, find_dev_file, run_in_process, run_script,
                     write_subset)

transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency "
                                                          "(pip install -r requirements-dev.txt)")

from cli import UsageError
from checkpoints import fetch_hub_model
from modeling import (Config, ConfigError, QuestionAnswering, load_checkpoint, read_transformers_dir,  # noqa: E402
                      to_transformers_state)
from tokenization import BertTokenizer  # noqa: E402

SIZES = dict(vocab_size=32000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=256)


def hf_tokenizer(do_lower_case: bool, tmp_path: Path):
    """transformers' BERT tokenizer over our vocab, without accent stripping."""
    vocab_dir = tmp_path / f"vocab_lower_{do_lower_case}"
    vocab_dir.mkdir(exist_ok=True)
    shutil.copy(VOCAB_FILE, vocab_dir / "vocab.txt")
    return transformers.BertTokenizerFast.from_pretrained(str(vocab_dir), do_lower_case=do_lower_case,
                                                          strip_accents=False)


def save_transformers_dir(model, directory: Path, do_lower_case: bool, weights: str,
                          old_layer_norm_names: bool = False) -> Path:
    """A model directory as the hub holds them: config.json, weights, vocab.txt, tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(directory))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if old_layer_norm_names:
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in state.items()}
    if weights == "safetensors":
        from safetensors.torch import save_file
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, directory / "pytorch_model.bin")
    shutil.copy(VOCAB_FILE, directory / "vocab.txt")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": do_lower_case}))
    return directory


def bert_qa(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.BertForQuestionAnswering(transformers.BertConfig(**SIZES)).eval()


def electra_qa(seed: int = 0):
    torch.manual_seed(seed)
    return transformers.ElectraForQuestionAnswering(transformers.ElectraConfig(embedding_size=16, **SIZES)).eval()


def text_batch(tokenizer: BertTokenizer, num_questions: int = 6, max_length: int = 128):
    """Input ids of real question/context pairs (the dev set if present, else the bundled sample), padded."""
    dataset = json.loads((find_dev_file() or SAMPLE_FILE).read_text(encoding="utf-8"))["data"]
    pairs = [(qa["question"], paragraph["context"]) for article in dataset for paragraph in article["paragraphs"]
             for qa in paragraph["qas"]][:num_questions]
    rows, segments = [], []
    for question, context in pairs:
        q_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(question))[:32]
        c_ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(context))[: max_length - len(q_ids) - 3]
        rows.append([tokenizer.cls_token_id, *q_ids, tokenizer.sep_token_id, *c_ids, tokenizer.sep_token_id])
        segments.append([0] * (len(q_ids) + 2) + [1] * (len(c_ids) + 1))
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    token_types = torch.tensor([s + [0] * (width - len(s)) for s in segments])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, token_types, mask


def assert_same_logits(ours: QuestionAnswering, theirs, tokenizer: BertTokenizer) -> None:
    ids, token_types, mask = text_batch(tokenizer)
    with torch.no_grad():
        our_start, our_end = ours.eval()(ids, token_types, mask)
        output = theirs.eval()(input_ids=ids, token_type_ids=token_types, attention_mask=mask)
    real = mask.bool()
    assert (our_start - output.start_logits)[real].abs().max() < 1e-5
    assert (our_end - output.end_logits)[real].abs().max() < 1e-5


@pytest.mark.parametrize("family, weights, old_names", [
    ("bert", "safetensors", False), ("bert", "bin", True), ("electra", "safetensors", False), ("electra", "bin", False)])
def test_transformers_qa_model_gives_the_same_logits(tmp_path, family, weights, old_names):
    import argparse

    from checkpoints import settings_from_model_dir

    theirs = bert_qa() if family == "bert" else electra_qa()
    do_lower_case = family == "bert"  # BERT uncased, ELECTRA cased (as KoELECTRA)
    model_dir = save_transformers_dir(theirs, tmp_path / "model", do_lower_case, weights, old_names)
    args = argparse.Namespace(model_config=None, vocab_file=None, analyzer="none")
    config = settings_from_model_dir(args, model_dir)
    assert args.do_lower_case is do_lower_case and args.vocab_file == str(model_dir / "vocab.txt")
    assert config.model_type == family and config.act_fn == "gelu_exact"  # transformers' "gelu" is the erf one
    ours = QuestionAnswering(config)
    assert load_checkpoint(ours, model_dir) == "finetuned"
    tokenizer = BertTokenizer(args.vocab_file, analyzer="none", do_lower_case=args.do_lower_case)
    assert_same_logits(ours, theirs, tokenizer)


def test_pretraining_heads_are_dropped_and_a_fresh_span_head_starts(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    torch.manual_seed(0)
    discriminator = transformers.ElectraForPreTraining(transformers.ElectraConfig(embedding_size=16, **SIZES))
    model_dir = save_transformers_dir(discriminator, tmp_path / "electra", False, "safetensors")
    config, state = read_transformers_dir(model_dir)
    assert not any(k.startswith(("discriminator_predictions", "qa_outputs")) for k in state)
    assert "discriminator_predictions.*" in caplog.text
    model = QuestionAnswering(config)
    assert load_checkpoint(model, model_dir) == "pretrained"
    assert torch.equal(model.bert.embeddings_project.weight, discriminator.electra.embeddings_project.weight)


def test_analyzer_none_tokenizes_as_bert_tokenizer_fast_on_tricky_text(tmp_path):
    # Zero-width space, soft hyphen and BOM are dropped (words stay whole), other whitespace splits,
    # Hanja and punctuation are words of their own, Hangul is never decomposed; a word-final capital sigma is
    # lower-cased on its own (σ), not by Python's context rule (ς).
    texts = ("대한\u200b민국 ABC\u00adDef\ufeff 서울特別市\u3000(1990년)\x07끝 İstanbul", "ΣΑΣ ΟΔΟΣ. ς")
    for text, do_lower_case in itertools.product(texts, (True, False)):
        ours = BertTokenizer(VOCAB_FILE, analyzer="none", do_lower_case=do_lower_case)
        theirs = hf_tokenizer(do_lower_case, tmp_path)
        pieces = ours.tokenize_with_offsets(text)
        assert [p for p, _, _ in pieces] == theirs.tokenize(text)
        assert ours.convert_tokens_to_ids(ours.tokenize(text)) == theirs(text, add_special_tokens=False)["input_ids"]
        assert all(text[start:end].strip() for _, start, end in pieces)  # offsets still index the original text


def test_analyzer_none_tokenizes_every_dev_text_as_bert_tokenizer_fast(dev_file, tmp_path):
    dataset = json.loads(dev_file.read_text(encoding="utf-8"))["data"]
    texts = [text for article in dataset for paragraph in article["paragraphs"]
             for text in [paragraph["context"], *(qa["question"] for qa in paragraph["qas"])]]
    for do_lower_case in (True, False):
        ours = BertTokenizer(VOCAB_FILE, analyzer="none", do_lower_case=do_lower_case)
        theirs = hf_tokenizer(do_lower_case, tmp_path)
        expected_ids = theirs(texts, add_special_tokens=False)["input_ids"]
        for text, ids in zip(texts, expected_ids):
            tokens = ours.tokenize(text)
            assert tokens == theirs.convert_ids_to_tokens(ids), text[:80]
            assert ours.convert_tokens_to_ids(tokens) == ids


def test_train_fits_default_windows_to_a_model_of_fewer_positions(tmp_path):
    # A 128-position BERT (as KcBERT has 300) trained without window flags: the 512-piece default window is
    # fitted to the model, as eval.py and predict.py fit it, and the run records what it used.
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(**{**SIZES, "max_position_embeddings": 128}))
    model_dir = save_transformers_dir(model, tmp_path / "short_bert", True, "safetensors")
    write_subset(SAMPLE_FILE, tmp_path / "train.json", 8)
    trained = run_script("train.py", f"--checkpoint={model_dir}", f"--train_file={tmp_path / 'train.json'}",
                         f"--output_dir={tmp_path / 'run'}", "--num_train_epochs=1", "--train_batch_size=8",
                         "--analyzer=none", "--no_cuda", f"--cache_dir={tmp_path / 'cache'}")
    assert trained.returncode == 0, trained.stderr
    assert "fewer than the 512-piece window; using max_seq_length 128" in trained.stderr
    saved_args = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert saved_args["max_seq_length"] == 128 and saved_args["doc_stride"] < 128 - saved_args["max_query_length"] - 3
    # A window given past the model is still refused.
    refused = run_script("train.py", f"--checkpoint={model_dir}", f"--train_file={tmp_path / 'train.json'}",
                         f"--output_dir={tmp_path / 'run2'}", "--max_seq_length=256", "--no_cuda")
    assert refused.returncode != 0 and "--max_seq_length 256 is larger than" in refused.stderr


def test_train_from_an_electra_dir_then_eval_the_moved_run(tmp_path):
    torch.manual_seed(0)
    discriminator = transformers.ElectraForPreTraining(transformers.ElectraConfig(embedding_size=16, **SIZES))
    model_dir = save_transformers_dir(discriminator, tmp_path / "koelectra", False, "safetensors")
    write_subset(SAMPLE_FILE, tmp_path / "train.json", 16)
    flags = [*DATA_FLAGS, "--analyzer=none", "--no_cuda", "--quiet", f"--cache_dir={tmp_path / 'cache'}"]
    trained = run_script("train.py", f"--checkpoint={model_dir}", f"--train_file={tmp_path / 'train.json'}",
                         f"--eval_file={tmp_path / 'train.json'}", f"--output_dir={tmp_path / 'run'}",
                         "--num_train_epochs=1", "--train_batch_size=8", *flags)
    assert trained.returncode == 0, trained.stderr
    saved_args = json.loads((tmp_path / "run" / "training_args.json").read_text())
    assert saved_args["do_lower_case"] is False and saved_args["analyzer"] == "none"

    shutil.move(tmp_path / "run", tmp_path / "moved")
    shutil.rmtree(model_dir)  # the run must not need the model directory any more
    evaluated = run_script("eval.py", f"--checkpoint={tmp_path / 'moved' / 'korquad_0.bin'}",
                           f"--predict_file={tmp_path / 'train.json'}", f"--output_dir={tmp_path / 'eval'}", *flags)
    assert evaluated.returncode == 0, evaluated.stderr
    # The moved run reads text as training did (vocab, casing, analyzer): the scores train.py measured itself.
    scores, during_training = json.loads(evaluated.stdout.splitlines()[-1]), json.loads(trained.stdout.splitlines()[-1])
    assert scores == pytest.approx({key: during_training[key] for key in ("exact_match", "f1")}, abs=1e-6)
    contexts = {qa["id"]: paragraph["context"] for paragraph in json.loads((tmp_path / "train.json").read_text(
        encoding="utf-8"))["data"][0]["paragraphs"] for qa in paragraph["qas"]}
    nbest = json.loads((tmp_path / "eval" / "nbest_predictions.json").read_text(encoding="utf-8"))
    assert set(nbest) == set(contexts)
    for qas_id, entries in nbest.items():
        assert all(contexts[qas_id][entry["start"]:entry["end"]] == entry["text"] != "" for entry in entries)


@pytest.mark.parametrize("model_type", ["bert", "electra"])
def test_export_loads_in_transformers_with_the_same_logits_and_reimports(tmp_path, model_type):
    # Our fine-tuned checkpoint in a run directory as train.py leaves it (published activation: tanh GELU).
    config = Config(**{**TINY_CONFIG, "model_type": model_type,
                       "embedding_size": 32 if model_type == "electra" else None})
    torch.manual_seed(1)
    ours = QuestionAnswering(config).eval()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(config.to_dict()))
    (run_dir / "training_args.json").write_text(json.dumps({"analyzer": "mecab", "do_lower_case": True}))
    shutil.copy(VOCAB_FILE, run_dir / "vocab.txt")
    torch.save(ours.state_dict(), run_dir / "korquad_0.bin")

    exported = run_script("export.py", f"--checkpoint={run_dir / 'korquad_0.bin'}", f"--output_dir={tmp_path / 'hf'}")
    assert exported.returncode == 0, exported.stderr
    theirs = transformers.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "hf"))
    assert type(theirs).__name__ == f"{'Bert' if model_type == 'bert' else 'Electra'}ForQuestionAnswering"
    tokenizer = BertTokenizer(VOCAB_FILE, analyzer="none")
    assert_same_logits(ours, theirs, tokenizer)

    their_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "대한민국 서울 ABC"
    assert their_tokenizer.tokenize(text) == tokenizer.tokenize(text)  # lower-cased, Hangul not decomposed
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["korquad_analyzer"] == "mecab"

    reimported_config, state = read_transformers_dir(tmp_path / "hf")
    assert reimported_config == config
    original = {k: v for k, v in ours.state_dict().items() if not k.startswith("bert.pooler.")}
    assert set(state) == set(original)
    assert all(torch.equal(state[k], original[k]) for k in original)
    assert set(to_transformers_state(ours)) == set(theirs.state_dict())


def test_a_dir_with_tokenizer_json_and_no_vocab_txt_is_read_and_exported(tmp_path, caplog):
    # As transformers 5's save_pretrained leaves it: the vocab and the normalizer only in tokenizer.json.
    model = bert_qa()
    model_dir = save_transformers_dir(model, tmp_path / "v5", False, "safetensors")
    hf_tokenizer(False, tmp_path).save_pretrained(str(model_dir))
    (model_dir / "vocab.txt").unlink()
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"strip_accents": False}))

    from checkpoints import copy_vocab_into, resolve_model_settings

    args = types.SimpleNamespace(model_config=None, vocab_file=None, analyzer=None)
    with caplog.at_level(logging.WARNING):
        resolve_model_settings(args, str(model_dir))
    assert args.vocab_file == str(model_dir / "tokenizer.json") and args.do_lower_case is False
    assert "jamo" not in caplog.text
    assert BertTokenizer(args.vocab_file, analyzer="none").vocab == BertTokenizer(VOCAB_FILE, analyzer="none").vocab
    copy_vocab_into(args.vocab_file, tmp_path)  # what a run directory gets
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8").split() == Path(VOCAB_FILE).read_text(
        encoding="utf-8").split()

    exported = run_script("export.py", f"--checkpoint={model_dir}", f"--output_dir={tmp_path / 'hf'}",
                          "--analyzer=none")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "vocab.txt").read_bytes() == (tmp_path / "vocab.txt").read_bytes()


def test_export_into_an_earlier_model_dir_removes_what_transformers_would_read_instead(tmp_path):
    model_dir = save_transformers_dir(bert_qa(), tmp_path / "model", True, "safetensors")
    out = tmp_path / "hf"
    out.mkdir()
    stale = ["tokenizer.json", "special_tokens_map.json", "added_tokens.json", "pytorch_model.bin",
             "model.safetensors.index.json", "model-00001-of-00002.safetensors"]
    for name in stale:
        (out / name).write_text("{}")
    (out / "README.md").write_text("kept")
    exported = run_script("export.py", f"--checkpoint={model_dir}", f"--output_dir={out}", "--analyzer=none")
    assert exported.returncode == 0, exported.stderr
    assert not [name for name in stale if (out / name).exists()] and (out / "README.md").is_file()
    assert len(transformers.AutoTokenizer.from_pretrained(str(out))) == 32000
    # A --vocab_file among the files it would delete is refused before anything is touched.
    (out / "tokenizer.json").write_bytes((model_dir / "vocab.txt").read_bytes())
    refused = run_script("export.py", f"--checkpoint={model_dir}", f"--output_dir={out}", "--analyzer=none",
                         f"--vocab_file={out / 'tokenizer.json'}")
    assert refused.returncode == 1 and "would overwrite --vocab_file" in refused.stderr
    assert (out / "tokenizer.json").is_file()


def unsupported_dir(tmp_path: Path, change: str) -> Path:
    model = bert_qa()
    model_dir = save_transformers_dir(model, tmp_path / change, True, "safetensors")
    values = json.loads((model_dir / "config.json").read_text())
    if change == "relative_positions":
        values["position_embedding_type"] = "relative_key"
    elif change == "roberta":
        values["model_type"] = "roberta"
    elif change == "distilbert":  # DistilBERT names its heads n_heads
        values.update(model_type="distilbert", n_heads=values.pop("num_attention_heads"))
    elif change == "no_heads":
        del values["num_attention_heads"]
    else:
        values["intermediate_size"] = 48  # the weights say 64
    (model_dir / "config.json").write_text(json.dumps(values))
    return model_dir


@pytest.mark.parametrize("change, message", [
    ("relative_positions", "position_embedding_type 'relative_key' is not supported"),
    ("roberta", "model_type 'roberta' is not supported"),
    ("distilbert", "model_type 'distilbert' is not supported"),
    ("no_heads", "missing key(s) ['num_attention_heads']"),
    ("shapes", "intermediate_size 48"),
])
def test_unsupported_transformers_dir_is_one_line(tmp_path, change, message):
    model_dir = unsupported_dir(tmp_path, change)
    result = run_in_process("eval.py", f"--checkpoint={model_dir}", f"--predict_file={SAMPLE_FILE}",
                            f"--output_dir={tmp_path / 'eval'}", "--analyzer=none", "--no_cuda", *DATA_FLAGS)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("eval.py: error:") and message in error
    if change == "shapes":
        assert "tensor bert.encoder.layer.0.intermediate.dense." in error


def test_hub_id_downloads_through_huggingface_hub(tmp_path, monkeypatch):
    model_dir = save_transformers_dir(bert_qa(), tmp_path / "snapshot", True, "safetensors")
    calls = []

    def snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(model_dir)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert fetch_hub_model("someone/koelectra-small") == str(model_dir)
    assert calls[0][0] == "someone/koelectra-small" and {"vocab.txt", "tokenizer.json"} <= set(calls[0][1])
    # Local paths are never sent to the hub.
    assert fetch_hub_model(str(model_dir)) == str(model_dir)
    assert fetch_hub_model("pretrain_ckpt/bert_small_ckpt.bin") == "pretrain_ckpt/bert_small_ckpt.bin"


def test_hub_id_without_huggingface_hub_says_how_to_get_the_files(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(UsageError, match=r"pip install huggingface_hub, or git clone https://huggingface.co/a/b"):
        fetch_hub_model("a/b")


def test_unknown_activation_is_refused_naming_the_field():
    from modeling import config_from_transformers

    values = {"model_type": "bert", "hidden_act": "swish", **SIZES}
    with pytest.raises(ConfigError, match="hidden_act 'swish' is not supported"):
        config_from_transformers(values)

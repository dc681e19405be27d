"""Hardening 3 (issue 23): text, config, input and output edge cases a careless or hostile user hits."""
from __future__ import annotations

import json
import math

import pytest

from conftest import TINY_CONFIG, VOCAB_FILE
from modeling import Config, ConfigError, config_from_transformers
from tokenization import BertTokenizer


@pytest.fixture(scope="module")
def mecab_tokenizer() -> BertTokenizer:
    return BertTokenizer(VOCAB_FILE, analyzer="mecab")


TEXT = "솔매골은 강원도 산간 지역이다. 1950년대 KBS가 방송했다."


@pytest.mark.parametrize("prefix", [" ", "\n", "\ufeff", "\u200b", " \n\u3000"])
def test_a_text_starting_with_a_separator_gives_the_clean_texts_pieces_shifted(mecab_tokenizer, prefix):
    clean = mecab_tokenizer.tokenize_with_offsets(TEXT)
    shifted = [(piece, start + len(prefix), end + len(prefix)) for piece, start, end in clean]
    assert mecab_tokenizer.tokenize_with_offsets(prefix + TEXT) == shifted
    assert mecab_tokenizer.tokenize_with_offsets(TEXT + prefix) == clean


def test_mecab_spans_of_a_long_text_are_the_lattices_own(mecab_tokenizer):
    """The one-pass span reader gives what the lattice iterator gives where that one is right."""
    from mecab.utils import create_lattice

    analyzer = mecab_tokenizer._analyzer
    text = (TEXT + " 이순신은 조선 중기의 무신이었다.  😀 Ⅻ ﬁ") * 50
    lattice = create_lattice(text)
    assert analyzer._mecab._tagger.parse(lattice)
    assert analyzer.spans(text) == [tuple(span) for span, _node in lattice]


BAD_VALUES = [("num_heads", 0), ("hidden_size", -64), ("ff_dim", -1), ("vocab_size", 0),
              ("dropout_prob", 1.5), ("dropout_prob", math.nan), ("type_vocab_size", 0),
              ("initializer_range", -0.1), ("initializer_range", math.nan), ("act_fn", ["gelu"]),
              ("num_hidden_layers", -1), ("num_hidden_layers", 0), ("layer_norm_eps", math.nan),
              ("layer_norm_eps", 0.0), ("max_position_embeddings", -1), ("embedding_size", 0),
              ("model_type", ["bert"]), ("hidden_size", 64.5)]


@pytest.mark.parametrize("key, value", BAD_VALUES)
def test_our_config_refuses_a_bad_value_naming_file_and_key(tmp_path, key, value):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**TINY_CONFIG, key: value}))  # json writes NaN as NaN, which json reads
    with pytest.raises(ConfigError, match=rf"^{path}: key '{key}' must be .*, got") as error:
        Config.from_json_file(path)
    assert "\n" not in str(error.value)


TRANSFORMERS_BAD = [("num_attention_heads", 0), ("hidden_size", -64), ("intermediate_size", -1),
                    ("hidden_dropout_prob", 1.5), ("attention_probs_dropout_prob", math.nan),
                    ("type_vocab_size", 0), ("initializer_range", -1.0), ("initializer_range", math.nan),
                    ("hidden_act", ["gelu"]), ("num_hidden_layers", -1), ("layer_norm_eps", math.nan)]


@pytest.mark.parametrize("key, value", TRANSFORMERS_BAD)
def test_transformers_config_refuses_a_bad_value_naming_its_own_key(key, value):
    good = {"model_type": "bert", "vocab_size": 32000, "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 128, "hidden_act": "gelu"}
    config_from_transformers(good, "hf/config.json")
    with pytest.raises(ConfigError, match=rf"^hf/config.json: (key '{key}' must be|{key} .* is not supported)"):
        config_from_transformers({**good, key: value}, "hf/config.json")


# --- run directories, export, eval -----------------------------------------------------------

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run directory as train.py leaves it (random weights: only shapes and files matter)."""
    import shutil

    import torch

    from modeling import QuestionAnswering

    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps({**TINY_CONFIG, "layer_norm_eps": 1e-5}))
    (run / "training_args.json").write_text(json.dumps({"vocab_file": str(VOCAB_FILE), "analyzer": "mecab",
                                                        "do_lower_case": False}))
    shutil.copy(VOCAB_FILE, run / "vocab.txt")
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**{**TINY_CONFIG, "layer_norm_eps": 1e-5})).state_dict(),
               run / "korquad_0.bin")
    return run


def _export(run_dir, output_dir, *flags: str):
    import export

    export.main([f"--checkpoint={run_dir / 'korquad_0.bin'}", f"--output_dir={output_dir}", "--quiet", *flags])


def test_export_refuses_the_runs_own_directory_and_its_source_model(run_dir, tmp_path):
    from cli_common import UsageError

    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    with pytest.raises(UsageError, match=r"--output_dir .* is the directory of --checkpoint"):
        _export(run_dir, run_dir)
    other_run = tmp_path / "other_run"
    other_run.mkdir()
    (other_run / "korquad_3.bin").write_bytes(b"weights")
    with pytest.raises(UsageError, match=r"--output_dir .*other_run holds a training run \(korquad_3.bin\)"):
        _export(run_dir, other_run)
    _export(run_dir, tmp_path / "hf")
    import export
    with pytest.raises(UsageError, match="is the directory of --checkpoint"):  # the export as a source
        export.main([f"--checkpoint={tmp_path / 'hf'}", f"--output_dir={tmp_path / 'hf'}", "--quiet"])
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before


def test_export_refuses_an_unknown_analyzer(run_dir, tmp_path):
    from cli_common import UsageError

    with pytest.raises(UsageError, match=r"--analyzer 'bogus' .* is not one of mecab, "):
        _export(run_dir, tmp_path / "hf", "--analyzer=bogus")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def _full_disk_on(monkeypatch, name_part: str) -> None:
    """Every fsync of a temporary file whose name holds `name_part` fails as a full disk does."""
    import errno
    import os

    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        if name_part in os.readlink(f"/proc/self/fd/{descriptor}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_a_full_disk_leaves_a_previous_export_whole_and_names_the_file(run_dir, tmp_path, monkeypatch):
    _export(run_dir, tmp_path / "hf", "--analyzer=none")
    before = {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()}
    _full_disk_on(monkeypatch, "model.safetensors")
    with pytest.raises(OSError, match="No space left on device") as error:
        _export(run_dir, tmp_path / "hf")   # analyzer mecab this time
    assert error.value.filename == str(tmp_path / "hf" / "model.safetensors")
    assert {path.name: path.read_bytes() for path in (tmp_path / "hf").iterdir()} == before  # no temp files either


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_a_full_disk_writes_neither_prediction_file_and_names_the_one_it_failed_on(tmp_path, monkeypatch):
    from korquad_utils import write_predictions

    write_predictions({"q": "old"}, {"q": []}, tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    _full_disk_on(monkeypatch, "nbest_predictions.json")
    with pytest.raises(OSError) as error:
        write_predictions({"q": "new"}, {"q": [{"text": "new"}]}, tmp_path)
    assert error.value.filename == str(tmp_path / "nbest_predictions.json")
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_sharded_transformers_weights_are_named(tmp_path):
    from modeling import CheckpointError, read_transformers_dir

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "bert", "vocab_size": 32000, "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 128}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"sharded weights \(model.safetensors.index.json\) are not supported"):
        read_transformers_dir(tmp_path)


def test_export_keeps_layer_norm_eps_and_a_cased_runs_casing(run_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    from modeling import read_transformers_dir

    _export(run_dir, tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["layer_norm_eps"] == 1e-5
    assert read_transformers_dir(tmp_path / "hf")[0].layer_norm_eps == 1e-5
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert theirs.tokenize("Seoul KBS") == BertTokenizer(VOCAB_FILE, "none", do_lower_case=False).tokenize(
        "Seoul KBS") != BertTokenizer(VOCAB_FILE, "none").tokenize("Seoul KBS")
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(str(tmp_path / "hf"))
    assert model.config.layer_norm_eps == 1e-5

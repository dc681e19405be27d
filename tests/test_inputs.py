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

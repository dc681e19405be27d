"""BERT-small for extractive question answering, written to load the published Korean checkpoint.

The architecture and every parameter name follow the published pretrained checkpoint
(`pretrain_ckpt/bert_small_ckpt.bin`): post-LayerNorm Transformer blocks whose attention
projections are `attn.query/key/value/o_proj` and whose feed-forward layers are `ffn.fc1/fc2`.
A fine-tuned checkpoint is the plain state dict of `QuestionAnswering`: `bert.<encoder name>`
plus `qa_outputs.*`, the format the original contest baseline reads and writes.
"""
from __future__ import annotations

import json
import logging
import math
import os
import zipfile
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-12
MODEL_TYPES = ("bert", "electra")
ACTIVATIONS = {
    # The checkpoint was pre-trained with GELU in its tanh approximation.
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_exact": F.gelu,
    "relu": F.relu,
}


class ConfigError(ValueError):
    """A model config file that cannot be used; the message names the file and key."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names the file, keys and shapes."""


@dataclass
class Config:
    """Model hyper-parameters under the published config's own key names."""

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_heads: int = 8
    ff_dim: int = 1024
    act_fn: str = "gelu"
    dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # Optional keys (absent from the published config): what transformers BERT and ELECTRA models need.
    embedding_size: int | None = None    # ELECTRA: smaller embeddings projected up; None = hidden_size
    layer_norm_eps: float = LAYER_NORM_EPS
    model_type: str = "bert"             # "bert" or "electra": only the tensor names of an export differ

    def __post_init__(self) -> None:
        check_config_values(self.to_dict())

    @property
    def embedding_dim(self) -> int:
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @classmethod
    def from_dict(cls, values: dict, source: str = "config", names: dict[str, str] | None = None) -> Config:
        """Build a config from a dict; every key must be known, every required key present and every
        value of its type and in its range. `names` gives the file's own key for a message (transformers')."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a JSON object of model hyper-parameters")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; expected keys are {sorted(known)}")
        missing = sorted(set(known) - set(values) - set(OPTIONAL_CONFIG_KEYS))
        if missing:
            raise ConfigError(f"{source}: missing key(s) {missing}")
        try:
            check_config_values(values, names)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> Config:
        """Read a config JSON file such as `data/bert_small.json`."""
        try:
            with open(path, encoding="utf-8-sig") as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: model config file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a readable JSON config ({err})") from None
        except RecursionError:   # json's parser recurses once per nested [ or {
            raise ConfigError(f"{path}: not a readable JSON config (nested too deeply)") from None
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


OPTIONAL_CONFIG_KEYS = ("embedding_size", "layer_norm_eps", "model_type")
# Smallest allowed value of each whole-number key. Two token types: the question and the context segment.
_MINIMUM_INTS = {"vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_heads": 1, "ff_dim": 1,
                 "max_position_embeddings": 1, "type_vocab_size": 2, "embedding_size": 1}
# Allowed range of each number key as (low, low_inclusive, high, high_inclusive).
_FLOAT_RANGES = {"dropout_prob": (0.0, True, 1.0, False), "initializer_range": (0.0, True, math.inf, False),
                 "layer_norm_eps": (0.0, False, math.inf, False)}
_CHOICES = {"act_fn": tuple(ACTIVATIONS), "model_type": MODEL_TYPES}


def check_config_values(values: dict, names: dict[str, str] | None = None) -> None:
    """Refuse a config value of the wrong type or out of range, naming the key (`names`: the file's own
    key for ours) and the value: a bad value would otherwise surface as a traceback deep in the model,
    or train something silently wrong (0 layers, NaN LayerNorm)."""
    def problem(name: str, what: str) -> ConfigError:
        return ConfigError(f"key {(names or {}).get(name, name)!r} {what}, got {values[name]!r}")

    for name, value in values.items():
        if name == "embedding_size" and value is None:
            continue
        if name in _MINIMUM_INTS:
            if not isinstance(value, int) or isinstance(value, bool):
                raise problem(name, "must be a whole number")
            if value < _MINIMUM_INTS[name]:
                raise problem(name, f"must be at least {_MINIMUM_INTS[name]}")
        elif name in _FLOAT_RANGES:
            low, low_inclusive, high, high_inclusive = _FLOAT_RANGES[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise problem(name, "must be a number")
            if not (math.isfinite(value) and (value >= low if low_inclusive else value > low)
                    and (value <= high if high_inclusive else value < high)):
                bounds = [f"{'>=' if low_inclusive else '>'} {low:g}"] + (
                    [f"{'<=' if high_inclusive else '<'} {high:g}"] if math.isfinite(high) else [])
                raise problem(name, f"must be a finite number {' and '.join(bounds)}")
        elif name in _CHOICES and (not isinstance(value, str) or value not in _CHOICES[name]):
            raise problem(name, f"must be one of {list(_CHOICES[name])}")
    hidden, heads = values.get("hidden_size"), values.get("num_heads")
    if hidden is not None and heads is not None and hidden % heads:
        raise ConfigError(f"hidden_size {hidden} is not divisible by {(names or {}).get('num_heads', 'num_heads')} "
                          f"{heads}")


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, summed, normalised and dropped out."""

    def __init__(self, config: Config):
        super().__init__()
        size = config.embedding_dim
        self.word_embeddings = nn.Embedding(config.vocab_size, size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, size)
        self.LayerNorm = nn.LayerNorm(size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings(token_type_ids))
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention` (fused kernels on GPUs)."""

    def __init__(self, config: Config):
        super().__init__()
        self.num_heads = config.num_heads
        self.dropout_prob = config.dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # BERT drops out the projected output too (transformers' BertSelfOutput), before the residual sum.
        self.dropout = nn.Dropout(config.dropout_prob)

    def forward(self, x: torch.Tensor, keep_mask: torch.Tensor | None) -> torch.Tensor:
        """`keep_mask`: bool (batch, 1, 1, seq), True where a key may be attended to."""
        batch, seq, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.num_heads, hidden // self.num_heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
            attn_mask=keep_mask, dropout_p=self.dropout_prob if self.training else 0.0)
        return self.dropout(self.o_proj(context.transpose(1, 2).reshape(batch, seq, hidden)))


class FeedForward(nn.Module):
    """Position-wise feed-forward: Linear, activation, Linear, dropout."""

    def __init__(self, config: Config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.ff_dim)
        self.fc2 = nn.Linear(config.ff_dim, config.hidden_size)
        self.activation = ACTIVATIONS[config.act_fn]
        self.dropout = nn.Dropout(config.dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation(self.fc1(x))))


class EncoderLayer(nn.Module):
    """One post-LayerNorm Transformer block."""

    def __init__(self, config: Config):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention_norm(x + self.attn(x, keep_mask))
        return self.ffn_norm(x + self.ffn(x))


class Encoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, keep_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, keep_mask)
        return x


class Pooler(nn.Module):
    """tanh(Linear(first token)): kept so the pretrained checkpoint loads whole."""

    def __init__(self, config: Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(sequence_output[:, 0]))


class BertModel(nn.Module):
    """The encoder; its state dict uses the published checkpoint's bare names."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        # ELECTRA's small embeddings are projected up to the hidden size; BERT has no such layer.
        self.embeddings_project = (nn.Linear(config.embedding_dim, config.hidden_size)
                                   if config.embedding_dim != config.hidden_size else None)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns `(sequence_output, pooled_output)`; `attention_mask` is 1 for real tokens, 0 for padding."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # Broadcast over heads and query positions; padded keys get no attention.
        keep_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        embedded = self.embeddings(input_ids, token_type_ids)
        if self.embeddings_project is not None:
            embedded = self.embeddings_project(embedded)
        sequence_output = self.encoder(embedded, keep_mask)
        return sequence_output, self.pooler(sequence_output)


def init_weights(config: Config, module: nn.Module) -> None:
    """BERT's initialisation: normal(0, initializer_range) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=config.initializer_range)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class QuestionAnswering(nn.Module):
    """BERT with a span head: a start and an end logit for every token."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.apply(partial(init_weights, config))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, start_positions: torch.Tensor | None = None,
                end_positions: torch.Tensor | None = None, start_targets: torch.Tensor | None = None,
                end_targets: torch.Tensor | None = None, distill_alpha: float = 0.0,
                distill_temperature: float = 1.0):
        """With positions: the mean of start and end cross-entropy. Without: `(start_logits, end_logits)`.

        With a teacher's `start_targets`/`end_targets` (per-token probabilities at temperature 1):
        (1 - distill_alpha) x that cross-entropy + distill_alpha x the mean start/end `distill_loss`.
        """
        sequence_output, _ = self.bert(input_ids, token_type_ids, attention_mask)
        start_logits, end_logits = self.qa_outputs(sequence_output).unbind(dim=-1)
        if start_positions is None or end_positions is None:
            return start_logits, end_logits
        loss = (span_loss(start_logits, start_positions, attention_mask)
                + span_loss(end_logits, end_positions, attention_mask)) / 2
        if start_targets is None or end_targets is None:
            return loss
        distill = (distill_loss(start_logits, start_targets, attention_mask, distill_temperature)
                   + distill_loss(end_logits, end_targets, attention_mask, distill_temperature)) / 2
        return (1 - distill_alpha) * loss + distill_alpha * distill


def span_loss(logits: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy over the real tokens; targets outside the sequence are ignored (0 if all are).

    Padding is excluded from the softmax, so a feature's loss does not depend on how far its
    batch was padded (batches are padded only to their own longest feature).
    """
    seq_len = logits.size(1)
    logits = logits.float()
    if attention_mask is not None:
        logits = logits.masked_fill(attention_mask == 0, torch.finfo(logits.dtype).min)
    positions = torch.where((positions < 0) | (positions >= seq_len), seq_len, positions)
    total = F.cross_entropy(logits, positions, ignore_index=seq_len, reduction="sum")
    return total / (positions != seq_len).sum().clamp(min=1)


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, attention_mask: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher_T || student_T) over the real tokens, averaged over the rows that have a target.

    `targets` are the teacher's probabilities at temperature 1; teacher_T = targets^(1/T), renormalised
    (= softmax(teacher logits / T)), computed in log space so that a small T cannot underflow it to zero.
    A row of zeros has no target (a filler row) and is left out. Padding is excluded from both
    distributions, as in `span_loss`.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 under autocast; float64 stays
    scaled = logits.to(dtype) / temperature
    targets = targets.to(dtype)
    if attention_mask is not None:
        scaled = scaled.masked_fill(attention_mask == 0, torch.finfo(scaled.dtype).min)
        targets = targets.masked_fill(attention_mask == 0, 0.0)
    log_student = F.log_softmax(scaled, dim=-1)
    has_target = targets.sum(dim=-1) > 0
    log_targets = torch.where(targets > 0, targets.clamp(min=torch.finfo(dtype).tiny).log(), -torch.inf)
    # Each row's largest entry at 0 before dividing by T, so that a tiny T leaves it finite; a filler row
    # gets a finite stand-in and no weight.
    log_targets = torch.where(has_target.unsqueeze(-1), log_targets - log_targets.amax(dim=-1, keepdim=True), 0.0)
    log_teacher = F.log_softmax(log_targets / temperature, dim=-1)
    teacher = log_teacher.exp()
    kl = torch.where(teacher > 0, teacher * (log_teacher - log_student), 0.0).sum(dim=-1)
    has_target = has_target.to(dtype)
    return temperature ** 2 * (kl * has_target).sum() / has_target.sum().clamp(min=1)


class PredictionTransform(nn.Module):
    """transformers' `cls.predictions.transform`: Linear, the encoder's activation, LayerNorm."""

    def __init__(self, config: Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.act_fn]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.activation(self.dense(x)))


class MaskedLMHead(nn.Module):
    """transformers' `cls.predictions`: the transform, then the word embeddings (tied decoder) plus a bias."""

    def __init__(self, config: Config):
        super().__init__()
        self.transform = PredictionTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        # The decoder is the embedding matrix itself, not a copy: tied by construction, never saved twice.
        return F.linear(self.transform(x), word_embeddings, self.bias)


class PreTrainingHeads(nn.Module):
    """transformers' `cls`: the masked-LM head and `seq_relationship`, the sentence-order head on the pooler."""

    def __init__(self, config: Config):
        super().__init__()
        self.predictions = MaskedLMHead(config)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


# The heads' tensor names, under transformers' `BertForPreTraining` names (ours are the same).
HEAD_NAMES = ("cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
              "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
              "cls.predictions.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias")
SOP_HEAD_NAMES = ("cls.seq_relationship.weight", "cls.seq_relationship.bias")


class BertForPreTraining(nn.Module):
    """The encoder with the masked-LM and sentence-order heads, as transformers' `BertForPreTraining`.

    State dict: `bert.<encoder name>` + `cls.*` (transformers' head names; the decoder is the word
    embeddings). Sentence-order label 1 means the two segments were swapped (transformers' NSP
    label 1, "not the next segment").
    """

    def __init__(self, config: Config):
        super().__init__()
        if config.model_type != "bert" or config.embedding_dim != config.hidden_size:
            raise ConfigError("pre-training heads are implemented for BERT models only (model_type 'bert', "
                              "no embedding_size)")
        self.config = config
        self.bert = BertModel(config)
        self.cls = PreTrainingHeads(config)
        self.apply(partial(init_weights, config))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                masked_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mlm_logits, sop_logits)`. With `masked_positions` (batch, predictions), the vocabulary logits
        are computed at those positions only (batch, predictions, vocab): a sixth of a full (batch, seq,
        vocab) projection, which is most of this small model's compute otherwise."""
        sequence_output, pooled_output = self.bert(input_ids, token_type_ids, attention_mask)
        if masked_positions is not None:
            index = masked_positions.unsqueeze(-1).expand(-1, -1, sequence_output.size(-1))
            sequence_output = sequence_output.gather(1, index)
        mlm_logits = self.cls.predictions(sequence_output, self.bert.embeddings.word_embeddings.weight)
        return mlm_logits, self.cls.seq_relationship(pooled_output)


IGNORE_LABEL = -100  # a masked_positions slot that is padding (transformers' ignore index)


def pretraining_loss(mlm_logits: torch.Tensor, sop_logits: torch.Tensor, mlm_labels: torch.Tensor,
                     sop_labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy (mean over the predicted pieces) + sentence-order cross-entropy."""
    mlm = F.cross_entropy(mlm_logits.float().flatten(0, 1), mlm_labels.flatten(), ignore_index=IGNORE_LABEL)
    return mlm + F.cross_entropy(sop_logits.float(), sop_labels)


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> str:
    """Load a pretrained-encoder or fine-tuned QA checkpoint into `model`; returns which kind it was.

    Accepted: the published encoder (bare names), a fine-tuned `QuestionAnswering` state dict
    (`bert.*` + `qa_outputs.*`), either with an LM head (`cls.*`, dropped) or with the `module.` /
    `_orig_mod.` prefix that DistributedDataParallel / torch.compile add, and a transformers BERT/ELECTRA
    model directory (see `read_transformers_dir`). Anything else raises `CheckpointError`.
    """
    may_lack_pooler = is_transformers_dir(path)
    if isinstance(model, BertForPreTraining):
        return _load_pretraining_checkpoint(model, path, may_lack_pooler)
    state = read_transformers_dir(path)[1] if may_lack_pooler else read_state_dict(path)
    if any(k.startswith("cls.") for k in state):
        dropped = [k for k in state if k.startswith("cls.")]
        logger.info("%s: dropping the pre-training LM head (%d tensors: cls.*)", path, len(dropped))
        state = {k: v for k, v in state.items() if not k.startswith("cls.")}
        if not any(k.startswith("qa_outputs.") for k in state):  # pretrain.py's output: its encoder
            state = _bare_encoder(state)

    is_finetuned = any(k.startswith(("bert.", "qa_outputs.")) for k in state)
    if isinstance(model, QuestionAnswering):
        if not is_finetuned:
            state = {f"bert.{k}": v for k, v in state.items()}
        # A pretrained encoder has no span head: it keeps its fresh initialisation.
        may_be_missing = set() if is_finetuned else {"qa_outputs.weight", "qa_outputs.bias"}
        if may_lack_pooler:  # transformers QA and ELECTRA models have none; ours is never used for QA
            may_be_missing |= {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    elif isinstance(model, BertModel):
        if is_finetuned:
            state = {k[len("bert."):]: v for k, v in state.items() if k.startswith("bert.")}
        may_be_missing = {"pooler.dense.weight", "pooler.dense.bias"} if may_lack_pooler else set()
    else:
        raise TypeError(f"load_checkpoint expects QuestionAnswering, BertModel or BertForPreTraining, "
                        f"got {type(model).__name__}")

    _check_and_load(model, state, may_be_missing, path)
    kind = "finetuned" if is_finetuned else "pretrained"
    logger.info("loaded %s checkpoint %s (%d tensors)", kind, path, len(state))
    return kind


def _bare_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`bert.<name>` -> `<name>` (tensors without the prefix are kept as they are)."""
    return {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in state.items()}


def _load_pretraining_checkpoint(model: BertForPreTraining, path: str | os.PathLike, is_directory: bool) -> str:
    """Encoder and, where the checkpoint has them, the heads; heads it lacks start fresh (said in the log).

    Returns "pretraining" (encoder and both heads loaded), "masked_lm" (no SOP head) or "pretrained"
    (encoder only)."""
    state = read_transformers_dir(path, keep_heads=True)[1] if is_directory else read_state_dict(path)
    heads = {k: v for k, v in state.items() if k.startswith("cls.")}
    encoder = {k: v for k, v in state.items() if not k.startswith(("cls.", "qa_outputs."))}
    if len(encoder) + len(heads) < len(state):
        logger.info("%s: dropping the span head (qa_outputs.*): pre-training does not use it", path)
    # transformers' tied copies: the decoder is the word embeddings and its bias cls.predictions.bias.
    heads.pop("cls.predictions.decoder.weight", None)
    heads.pop("cls.predictions.decoder.bias", None)
    full = {f"bert.{k}": v for k, v in _bare_encoder(encoder).items()} | heads
    fresh = set(HEAD_NAMES) - set(heads)
    may_be_missing = fresh | ({"bert.pooler.dense.weight", "bert.pooler.dense.bias"} if is_directory else set())
    _check_and_load(model, full, may_be_missing, path)
    if fresh == set(HEAD_NAMES):
        logger.info("%s has no pre-training heads: the MLM head (decoder tied to the word embeddings) and "
                    "the sentence-order head start fresh", path)
        return "pretrained"
    if fresh:
        logger.info("%s has no sentence-order head (cls.seq_relationship): it starts fresh", path)
        return "masked_lm"
    logger.info("loaded the encoder and both pre-training heads from %s", path)
    return "pretraining"


def _check_and_load(model: nn.Module, state: dict[str, torch.Tensor], may_be_missing: set[str],
                    path: str | os.PathLike) -> None:
    """load_state_dict, after naming every missing, unexpected and misshapen tensor in one CheckpointError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - may_be_missing)
    unexpected = sorted(set(state) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if mismatched:
        problems.append("shape mismatch " + "; ".join(_first(mismatched))
                        + " (does the model config, e.g. vocab_size or hidden_size, match the checkpoint?)")
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(_first(missing))}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {', '.join(_first(unexpected))}")
    # A diverged or damaged checkpoint would otherwise answer "" to every question, or train to a NaN loss.
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        problems.append(f"{len(non_finite)} tensor(s) hold NaN or infinite values: {', '.join(_first(non_finite))} "
                        f"(a diverged or damaged checkpoint)")
    if problems:
        raise CheckpointError(f"{path}: " + " | ".join(problems))
    model.load_state_dict(state, strict=not may_be_missing)


# What torch.save(model.state_dict()) prefixes every name with when the model is wrapped (in DistributedDataParallel,
# by torch.compile, or both, in either order).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a plain state dict safely (`weights_only=True`, onto the CPU), without DDP's or torch.compile's
    prefix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint file not found") from None
    except Exception:  # torch raises many types for a file that is not a checkpoint
        # torch's own message advises weights_only=False: wrong for a damaged file, unsafe for a
        # malicious one. Say instead what the file is not.
        raise CheckpointError(f"{path}: {_why_unreadable(Path(path))}") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: expected a plain state dict of named tensors")
    while wrapper := next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None):
        state = {k[len(wrapper):]: v for k, v in state.items()}
    return state


_PICKLE_PROTOCOL_OPCODE = 0x80  # the first byte of a pickle of protocol 2 or newer (torch's legacy format)


def _why_unreadable(path: Path) -> str:
    """What a file torch.load(weights_only=True) refused is, in words a user can act on."""
    if path.is_dir():
        return "is a directory, not a checkpoint file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            head = file.read(4)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if size == 0:
        return "is an empty (0-byte) file, not a checkpoint (an interrupted copy or download?)"
    if zipfile.is_zipfile(path):
        return ("is a zip archive but not a complete PyTorch checkpoint (damaged, truncated, or a different "
                "kind of archive)")
    if head[:1] == bytes([_PICKLE_PROTOCOL_OPCODE]):
        return ("is a pickle holding objects other than tensors, not a plain state dict; it is never unpickled "
                "here, for safety (save checkpoints with torch.save(model.state_dict(), path))")
    if head.startswith(b"PK"):
        return "is a damaged zip archive, not a complete PyTorch checkpoint (a truncated copy?)"
    return "is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; damaged or another format)"


def _first(items: list[str], limit: int = 5) -> list[str]:
    return items[:limit] + ([f"... {len(items) - limit} more"] if len(items) > limit else [])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())



# --- transformers model directories ----------------------------------------------------------
# Read and written by mapping names and settings: transformers itself is never imported.

TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# transformers' activation names -> ours, by meaning: its "gelu" is the exact erf GELU, while
# ours (the published config's) is the tanh approximation that its "gelu_new" names.
ACTIVATIONS_FROM_TRANSFORMERS = {"gelu": "gelu_exact", "gelu_python": "gelu_exact", "gelu_new": "gelu",
                                 "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu", "relu": "relu"}
ACTIVATIONS_TO_TRANSFORMERS = {"gelu": "gelu_new", "gelu_new": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}
QA_ARCHITECTURES = {"bert": "BertForQuestionAnswering", "electra": "ElectraForQuestionAnswering"}
# Tensors of pre-training heads QA has no use for, and buffers transformers re-creates itself.
DROPPED_PREFIXES = ("cls.", "discriminator_predictions.", "generator_predictions.", "generator_lm_head.")
DROPPED_BUFFERS = ("embeddings.position_ids",)
# Per-layer names: transformers' -> ours.
_LAYER_NAMES = {"attention.self.query": "attn.query", "attention.self.key": "attn.key",
                "attention.self.value": "attn.value", "attention.output.dense": "attn.o_proj",
                "attention.output.LayerNorm": "attention_norm", "intermediate.dense": "ffn.fc1",
                "output.dense": "ffn.fc2", "output.LayerNorm": "ffn_norm"}
_LAYER_NAMES_BACK = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}


def is_transformers_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a transformers `config.json`: one with `num_attention_heads` (ours, from
    train.py, names it num_heads), or any other transformers config (DistilBERT's, ...) beside transformers
    weights, so that config_from_transformers names what is not supported."""
    directory = Path(path)
    config_file = directory / TRANSFORMERS_CONFIG
    if not config_file.is_file():
        return False
    try:
        values = json.loads(config_file.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return True  # read_transformers_dir says what is wrong with it
    if not isinstance(values, dict):
        return False
    if "num_attention_heads" in values:
        return True
    # Our run's config.json (Config.to_dict) may hold model_type but never architectures or
    # transformers_version, and sits beside korquad_N.bin, not transformers weights.
    has_weights = any((directory / name).is_file() or (directory / f"{name}.index.json").is_file()
                      for name in TRANSFORMERS_WEIGHTS)
    return has_weights and any(key in values for key in ("model_type", "architectures", "transformers_version"))


def config_from_transformers(values: dict, source: str = TRANSFORMERS_CONFIG) -> Config:
    """Our Config from a transformers BERT/ELECTRA config dict; what we do not implement is refused, naming the field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    model_type = values.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (only {' and '.join(MODEL_TYPES)})")
    position_type = values.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ConfigError(f"{source}: position_embedding_type {position_type!r} is not supported (only 'absolute')")
    activation = values.get("hidden_act", "gelu")
    if not isinstance(activation, str) or activation not in ACTIVATIONS_FROM_TRANSFORMERS:
        raise ConfigError(f"{source}: hidden_act {activation!r} is not supported "
                          f"(one of {sorted(ACTIVATIONS_FROM_TRANSFORMERS)})")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [key for key in required if key not in values]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {missing}")
    if "attention_probs_dropout_prob" in values:  # not used, but a bad value is still a bad file
        try:
            check_config_values({"dropout_prob": values["attention_probs_dropout_prob"]},
                                {"dropout_prob": "attention_probs_dropout_prob"})
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    if values.get("attention_probs_dropout_prob", values.get("hidden_dropout_prob")) != values.get(
            "hidden_dropout_prob"):
        logger.info("%s: one dropout probability for all layers here: hidden_dropout_prob", source)
    hidden_size = values["hidden_size"]
    embedding_size = values.get("embedding_size", hidden_size) if model_type == "electra" else hidden_size
    ours = {"vocab_size": values["vocab_size"], "hidden_size": hidden_size,
            "num_hidden_layers": values["num_hidden_layers"], "num_heads": values["num_attention_heads"],
            "ff_dim": values["intermediate_size"], "act_fn": ACTIVATIONS_FROM_TRANSFORMERS[activation],
            "dropout_prob": values.get("hidden_dropout_prob", 0.1),
            "max_position_embeddings": values.get("max_position_embeddings", 512),
            "type_vocab_size": values.get("type_vocab_size", 2),
            "initializer_range": values.get("initializer_range", 0.02),
            "embedding_size": None if embedding_size == hidden_size else embedding_size,
            "layer_norm_eps": values.get("layer_norm_eps", LAYER_NORM_EPS), "model_type": model_type}
    return Config.from_dict(ours, source, names=_NAMES_IN_TRANSFORMERS)


# Our config keys under another name in a transformers config.json (for messages about that file).
_NAMES_IN_TRANSFORMERS = {"num_heads": "num_attention_heads", "ff_dim": "intermediate_size",
                          "act_fn": "hidden_act", "dropout_prob": "hidden_dropout_prob"}


def config_to_transformers(config: Config, **extra) -> dict:
    """A transformers config dict for `config` as a QA model; `extra` keys are added (e.g. our analyzer)."""
    values = {"architectures": [QA_ARCHITECTURES[config.model_type]], "model_type": config.model_type,
              "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
              "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_heads,
              "intermediate_size": config.ff_dim, "hidden_act": ACTIVATIONS_TO_TRANSFORMERS[config.act_fn],
              "hidden_dropout_prob": config.dropout_prob, "attention_probs_dropout_prob": config.dropout_prob,
              "max_position_embeddings": config.max_position_embeddings, "type_vocab_size": config.type_vocab_size,
              "initializer_range": config.initializer_range, "layer_norm_eps": config.layer_norm_eps,
              "position_embedding_type": "absolute", "pad_token_id": 0}
    if config.model_type == "electra":
        values["embedding_size"] = config.embedding_dim
    return {**values, **extra}


def read_transformers_config(directory: str | os.PathLike) -> dict:
    """The raw config.json of a transformers model directory."""
    config_file = Path(directory) / TRANSFORMERS_CONFIG
    try:
        return json.loads(config_file.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{config_file}: not a readable JSON config ({err})") from None
    except RecursionError:
        raise ConfigError(f"{config_file}: not a readable JSON config (nested too deeply)") from None


def read_transformers_dir(path: str | os.PathLike,
                          keep_heads: bool = False) -> tuple[Config, dict[str, torch.Tensor]]:
    """The Config and the state dict, in our names, of a transformers BERT/ELECTRA model directory.

    A model with a QA head gives our fine-tuned format (`bert.*` + `qa_outputs.*`), a bare or
    pre-training model our pretrained-encoder format (bare names); pre-training heads are dropped.
    Every tensor's shape is checked against config.json; a mismatch names the tensor. With
    `keep_heads`, BERT's pre-training heads are kept under their own names (`cls.*`).
    """
    directory = Path(path)
    config = config_from_transformers(read_transformers_config(directory), str(directory / TRANSFORMERS_CONFIG))
    weights_file = next((directory / name for name in TRANSFORMERS_WEIGHTS if (directory / name).is_file()), None)
    if weights_file is None:
        shard_index = next((f"{name}.index.json" for name in TRANSFORMERS_WEIGHTS
                            if (directory / f"{name}.index.json").is_file()), None)
        if shard_index is not None:
            raise CheckpointError(f"{directory}: sharded weights ({shard_index}) are not supported; save the model "
                                  f"in one file (save_pretrained(..., max_shard_size=\"10GB\"))")
        raise CheckpointError(f"{directory}: no {' or '.join(TRANSFORMERS_WEIGHTS)} beside config.json")
    theirs = _read_transformers_weights(weights_file)
    state, source_names = from_transformers_state(theirs, str(weights_file), keep_heads)
    _check_shapes(state, source_names, config, weights_file)
    return config, state


def _read_transformers_weights(weights_file: Path) -> dict[str, torch.Tensor]:
    if weights_file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights_file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{weights_file}: not a readable safetensors file ({err})") from None
    return read_state_dict(weights_file)


def from_transformers_state(theirs: dict[str, torch.Tensor], source: str = "weights",
                            keep_heads: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """transformers tensor names -> ours; also returns ours -> theirs, for messages.

    With `keep_heads`, BERT's `cls.*` heads are kept (their names are ours too; the older
    gamma/beta LayerNorm spelling is renamed) and the encoder keeps the bare names."""
    kept_heads = {}
    if keep_heads:
        for name in [k for k in theirs if k.startswith("cls.")]:
            module, _, leaf = name.rpartition(".")
            kept_heads[f"{module}.{ {'gamma': 'weight', 'beta': 'bias'}.get(leaf, leaf)}"] = theirs[name].float()
        theirs = {k: v for k, v in theirs.items() if not k.startswith("cls.")}
    dropped = sorted(k for k in theirs if k.startswith(DROPPED_PREFIXES))
    if dropped:
        heads = sorted({k.split(".")[0] for k in dropped})
        logger.info("%s: dropping the pre-training head(s) QA does not use (%d tensors: %s)",
                    source, len(dropped), ", ".join(f"{h}.*" for h in heads))
    has_qa_head = any(k.startswith("qa_outputs.") for k in theirs)
    state: dict[str, torch.Tensor] = {}
    source_names: dict[str, str] = {}
    for name, tensor in theirs.items():
        if name.startswith(DROPPED_PREFIXES):
            continue
        encoder_name = name.split(".", 1)[1] if name.startswith(("bert.", "electra.")) else name
        if encoder_name.endswith(DROPPED_BUFFERS):
            continue
        ours = encoder_name if encoder_name.startswith("qa_outputs.") else _encoder_name_to_ours(encoder_name)
        if ours is None:
            raise CheckpointError(f"{source}: tensor {name} is not part of a BERT or ELECTRA encoder")
        if has_qa_head and not ours.startswith("qa_outputs."):
            ours = f"bert.{ours}"
        state[ours] = tensor.float()
        source_names[ours] = name
    state.update(kept_heads)
    source_names.update({name: name for name in kept_heads})
    return state, source_names


def _encoder_name_to_ours(name: str) -> str | None:
    """`encoder.layer.3.attention.self.query.weight` -> `encoder.layer.3.attn.query.weight`, etc.; None if unknown."""
    module, _, leaf = name.rpartition(".")
    leaf = {"gamma": "weight", "beta": "bias"}.get(leaf, leaf)  # the older LayerNorm spelling
    if module.startswith("encoder.layer."):
        _, _, index, layer_module = module.split(".", 3)
        if layer_module not in _LAYER_NAMES:
            return None
        return f"encoder.layer.{index}.{_LAYER_NAMES[layer_module]}.{leaf}"
    if module in ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings",
                  "embeddings.LayerNorm", "embeddings_project", "pooler.dense"):
        return f"{module}.{leaf}"
    return None


def _check_shapes(state: dict[str, torch.Tensor], source_names: dict[str, str], config: Config,
                  weights_file: Path) -> None:
    with torch.device("meta"):
        expected = QuestionAnswering(config).state_dict()
    for ours, tensor in state.items():
        key = ours if ours in expected or ours.startswith("qa_outputs.") else f"bert.{ours}"
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{weights_file}: tensor {source_names[ours]} has shape {tuple(tensor.shape)} but config.json "
                f"(hidden_size {config.hidden_size}, embedding_size {config.embedding_dim}, vocab_size "
                f"{config.vocab_size}, intermediate_size {config.ff_dim}) needs {tuple(expected[key].shape)}")


def to_transformers_state(model: QuestionAnswering) -> dict[str, torch.Tensor]:
    """The QA model's weights under transformers' `...ForQuestionAnswering` names (no pooler: it has none)."""
    prefix = f"{model.config.model_type}."
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("bert.pooler."):
            continue
        if name.startswith("bert."):
            name = prefix + _encoder_name_to_theirs(name[len("bert."):])
        state[name] = tensor.detach().cpu().contiguous()
    return state


def to_transformers_pretraining_state(model: BertForPreTraining) -> dict[str, torch.Tensor]:
    """The weights under transformers' `BertForPreTraining` names, pooler and both heads included.

    The tied decoder is written out as its own copy (`cls.predictions.decoder.*`) too: transformers 4.x
    files carry it, and versions that tie it on loading overwrite it with the same values."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("bert."):
            name = "bert." + _encoder_name_to_theirs(name[len("bert."):])
        state[name] = tensor.detach().cpu().contiguous()
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"].clone()
    return state


def _encoder_name_to_theirs(name: str) -> str:
    """`encoder.layer.3.attn.query.weight` -> `encoder.layer.3.attention.self.query.weight`, etc."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("encoder.layer."):
        _, _, index, layer_module = module.split(".", 3)
        module = f"encoder.layer.{index}.{_LAYER_NAMES_BACK[layer_module]}"
    return f"{module}.{leaf}"

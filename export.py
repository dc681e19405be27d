"""Write a fine-tuned checkpoint as a transformers model directory, or as an ONNX reader.

    python3 export.py --checkpoint=output/korquad_3.bin --output_dir=exported
    python3 export.py --checkpoint=lm_run --output_dir=exported_lm    # pretrain.py: BertForPreTraining, both heads
    python3 export.py --checkpoint=output --output_dir=exported_onnx --format onnx --quantize int8

The directory holds config.json, model.safetensors, vocab.txt and tokenizer_config.json, and loads
with `AutoModelForQuestionAnswering.from_pretrained` and `AutoTokenizer.from_pretrained` (and back
into train.py/eval.py as `--checkpoint exported`). Config, vocab, lower-casing and analyzer come
from the training run beside the checkpoint. The analyzer is recorded in config.json as
`korquad_analyzer`: a model fine-tuned on Mecab-split text expects Mecab-split text.

`--format onnx` writes `model.onnx` (dynamic batch and length; inputs input_ids, token_type_ids,
attention_mask; outputs start_logits, end_logits), vocab.txt and onnx_reader.json (tokenizer,
analyzer, the training run's window settings, its --version_2_with_negative and the
--null_score_diff_threshold given here, which eval.py and predict.py then apply as they do for the
run; and each model's size and CRC-32); `--quantize int8` adds `model_int8.onnx`,
dynamically quantized. The graph is written with ONNX Runtime's fused transformer operators
(EmbedLayerNormalization, Attention, FastGelu; residual + LayerNormalization), which its int8
quantizer turns into QAttention and DynamicQuantizeMatMul; model_int8.onnx keeps the word table in
fp16. Each model is checked against the eager model on windows of the bundled sample before it is
written (NaN or infinite logits are refused), and onnx_reader.json is renamed into place last.
eval.py, predict.py and serve.py take the directory (or one of its .onnx files) as --checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes

import onnx_reader
from cli import (ArgumentParser, ROOT, UsageError, add_no_answer_args, capped_windows, check_version_2,
                 prepare_output_dir, refuse_output_over_input, run_cli, setup_logging)
from checkpoints import (ANALYZER_CONFIG_KEY, CHECKPOINT_NAME, SAVED_ARGS_NAME, SAVED_VOCAB_NAME, build_tokenizer,
                         load_finetuned, model_inputs, resolve_finetuned_settings)
from atomic_files import atomic_write, atomic_write_files, json_bytes, pid_is_alive, remove_dead_temp_files
from korquad_utils import collate_features, convert_examples_to_features
from squad_examples import parse_json, read_squad_examples
from modeling import (TRANSFORMERS_CONFIG, BertForPreTraining, QuestionAnswering, config_to_transformers,
                      load_checkpoint, read_state_dict, to_transformers_pretraining_state, to_transformers_state)
from tokenization import ANALYZER_NAMES, TOKENIZER_JSON, build_vocab, read_vocab_tokens, vocab_file_bytes

logger = logging.getLogger("korquad")

WEIGHTS_NAME = "model.safetensors"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
# What each --format writes in --output_dir.
WRITTEN_FILES = {"transformers": (TRANSFORMERS_CONFIG, WEIGHTS_NAME, SAVED_VOCAB_NAME, TOKENIZER_CONFIG_NAME),
                 "onnx": (onnx_reader.MODEL_NAME, onnx_reader.INT8_MODEL_NAME, SAVED_VOCAB_NAME, onnx_reader.SETTINGS_NAME)}
# Files an earlier save_pretrained (or another export tool) may have left in --output_dir that transformers reads
# in preference to ours (tokenizer.json over vocab.txt, an index or .bin beside our safetensors): deleted first.
STALE_TRANSFORMERS_FILES = (TOKENIZER_JSON, "special_tokens_map.json", "added_tokens.json",
                            "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
STALE_SHARDS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Write a fine-tuned checkpoint as a transformers model directory.")
    parser.add_argument("--checkpoint", required=True,
                        help="A fine-tuned korquad_*.bin from train.py, or its run directory (the newest one); or a "
                             "pretrain_*.bin from pretrain.py, or its run directory (written as BertForPreTraining).")
    parser.add_argument("--output_dir", required=True, help="The transformers model directory to write.")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config (if not given: the training run's, else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="WordPiece vocab (if not given: the training run's, else data/ko_vocab_32k.txt).")
    parser.add_argument("--analyzer", default=None,
                        help="The analyzer the model was fine-tuned with (if not given: the training run's).")
    parser.add_argument("--format", choices=("transformers", "onnx"), default="transformers",
                        help="A transformers model directory, or an ONNX reader for ONNX Runtime.")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="With --format onnx: also write model_int8.onnx, dynamically quantized "
                             "(if not given: fp32 only).")
    parser.add_argument("--int8_for", choices=("auto", *onnx_reader.INT8_TARGETS), default="auto",
                        help="With --quantize int8: the CPUs it will run on. vnni (AVX-512 VNNI, AVX-VNNI, AMX, "
                             "ARM): 8-bit weights; avx2 (x86 without VNNI): 7-bit weights, since those CPUs add "
                             "int8 products in 16 bits, which can saturate. auto: this machine's (recorded in "
                             "onnx_reader.json).")
    # Recorded in onnx_reader.json: eval.py and predict.py decide "" for the export as for the run.
    add_no_answer_args(parser, remembered=True)
    parser.add_argument("--quiet", action="store_true", help="Warnings only.")
    args = parser.parse_args(argv)
    if args.quantize is not None and args.format != "onnx":
        parser.error("--quantize needs --format onnx")
    if args.int8_for != "auto" and args.quantize is None:
        parser.error("--int8_for needs --quantize int8")
    if args.format != "onnx" and (args.version_2_with_negative or args.null_score_diff_threshold != 0.0):
        parser.error("--version_2_with_negative and --null_score_diff_threshold need --format onnx (a transformers "
                     "directory does not record them: pass them to eval.py or predict.py)")
    return args


def export(model: QuestionAnswering | BertForPreTraining, vocab_file: str | Path, do_lower_case: bool, analyzer: str,
           output_dir: Path) -> None:
    """Write `model` with its tokenizer files into `output_dir` as transformers reads them."""
    if isinstance(model, BertForPreTraining):
        config = config_to_transformers(model.config, architectures=["BertForPreTraining"],
                                        **{ANALYZER_CONFIG_KEY: analyzer})
        state = to_transformers_pretraining_state(model)
    else:
        config = config_to_transformers(model.config, **{ANALYZER_CONFIG_KEY: analyzer})
        state = to_transformers_state(model)
    weights = safetensors_bytes(state, metadata={"format": "pt"})
    vocab = vocab_file_bytes(vocab_file)
    # strip_accents false: transformers would otherwise NFD-strip with lower-casing, breaking Hangul into jamo.
    tokenizer_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": do_lower_case, "strip_accents": False,
                        "tokenize_chinese_chars": True, "model_max_length": model.config.max_position_embeddings,
                        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                        "mask_token": "[MASK]"}
    # Removed before the write: a failed write then leaves the old model with its own vocab.txt, never the new
    # model beside another model's tokenizer.json.
    for stale in [*(output_dir / name for name in STALE_TRANSFORMERS_FILES),
                  *(path for pattern in STALE_SHARDS for path in output_dir.glob(pattern))]:
        if stale.is_file() or stale.is_symlink():
            logger.info("removing %s: transformers would read it instead of the export's files", stale)
            stale.unlink()
    # All four or none: a config.json beside another export's weights would describe the wrong model.
    atomic_write_files({output_dir / TRANSFORMERS_CONFIG: lambda file: file.write(json_bytes(config)),
                        output_dir / WEIGHTS_NAME: lambda file: file.write(weights),
                        output_dir / SAVED_VOCAB_NAME: lambda file: file.write(vocab),
                        output_dir / TOKENIZER_CONFIG_NAME: lambda file: file.write(json_bytes(tokenizer_config))})


# What marks a directory as each --format's export: another format's export there would replace its vocab.txt,
# and readers would pick one of the two models.
FORMAT_MARKERS = {"transformers": (TRANSFORMERS_CONFIG, WEIGHTS_NAME, "pytorch_model.bin"),
                  "onnx": (onnx_reader.SETTINGS_NAME, "*.onnx")}


def check_output_dir(output_dir: Path, checkpoint: Path, export_format: str) -> None:
    """Refuse to export into the source model's directory, into a training run's, or over the other format's
    export: the export's config.json would replace the one the run's checkpoints (or the source model) are read
    with, and its vocab.txt the other export's."""
    source_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if output_dir.exists() and output_dir.resolve() == source_dir.resolve():
        raise UsageError(f"--output_dir {output_dir} is the directory of --checkpoint {checkpoint}; exporting "
                         f"there would overwrite its {TRANSFORMERS_CONFIG}: pass a new directory")
    if output_dir.is_dir():
        run_files = sorted(child.name for child in output_dir.iterdir()
                           if CHECKPOINT_NAME.fullmatch(child.name) or child.name == SAVED_ARGS_NAME)
        if run_files:
            raise UsageError(f"--output_dir {output_dir} holds a training run ({', '.join(run_files[:3])}); "
                             f"exporting there would overwrite its {TRANSFORMERS_CONFIG}: pass a new directory")
        for other, markers in FORMAT_MARKERS.items():
            found = sorted({path.name for marker in markers for path in output_dir.glob(marker) if path.is_file()})
            if other != export_format and found:
                kind = "an ONNX" if other == "onnx" else "a transformers"
                raise UsageError(f"--output_dir {output_dir} holds {kind} export ({', '.join(found[:3])}); "
                                 f"--format {export_format} there would replace its {SAVED_VOCAB_NAME} and mix "
                                 f"two models: pass another --output_dir")


# --- ONNX ------------------------------------------------------------------------------------

# predict.py's defaults, for a checkpoint without its training run's settings.
DEFAULT_WINDOWS = {"max_seq_length": 512, "doc_stride": 128, "max_query_length": 96, "max_answer_length": 30}
# Largest start/end logit difference to the eager model on the check windows. fp32 differs only in
# summation order (about 1e-6 here); int8 moves logits by a few hundredths on a trained model.
FP32_TOLERANCE = 1e-3
INT8_TOLERANCE = 1.0
CHECK_FILE = ROOT / "data" / "korquad_sample.json"
CHECK_QUESTIONS = 8
MICROSOFT = "com.microsoft"


def require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError:
        raise UsageError("export.py --format onnx needs onnx and onnxruntime: pip install onnx -r requirements-onnx.txt"
                         ) from None


def training_windows(checkpoint: Path, max_positions: int | None = None) -> dict[str, int]:
    """The window settings of the training run beside `checkpoint` (predict.py's defaults where it has none),
    capped at the model's `max_positions` (a bare checkpoint or transformers model with fewer positions than
    the default window)."""
    saved = Path(checkpoint).parent / SAVED_ARGS_NAME
    values: dict = {}
    if saved.is_file() and not Path(checkpoint).is_dir():
        try:
            values = parse_json(saved.read_text(encoding="utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            values = {}
    windows = {name: value if isinstance(value := values.get(name), int) and value > 0 else default
               for name, default in DEFAULT_WINDOWS.items()}
    if max_positions is None or windows["max_seq_length"] <= max_positions:
        return windows
    return capped_windows(windows, max_positions, f"--checkpoint {checkpoint}")


def onnx_graph(model: QuestionAnswering, fp16_word_lookup: bool = False):
    """`model` as an ONNX graph of ONNX Runtime's fused BERT operators, weights as initializers.

    Written by hand rather than traced: torch's exporter emits attention as dozens of small ops that
    ONNX Runtime's transformer optimizer does not recognise, so it runs unfused, and its int8
    quantizer then has no QAttention to map to.

    `fp16_word_lookup` (the int8 model's): the word table stored in fp16 and looked up by Gather, Cast, the
    sums and LayerNormalization in place of EmbedLayerNormalization, which takes fp32 or int8 tables only.
    Quantized with one scale (QEmbedLayerNormalization), the table moved held-out answers (mean agreement
    96.05% vs 97.39% over 8 checkpoints of a small model); kept in fp32 it grew predict.py's peak memory
    from 139 to 207 MB, in fp16 to 178 MB; all three ran at the same speed (docs/measurements.md).
    """
    from onnx import TensorProto, helper, numpy_helper

    config = model.config
    state = {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()}
    initializers, nodes = [], []

    def weight(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str] | None = None, domain: str | None = None, **attributes):
        name = f"{op}_{len(nodes)}"
        outputs = outputs or [f"{name}_output"]
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attributes))
        return outputs[0] if len(outputs) == 1 else outputs

    def matmul(x: str, name: str) -> str:
        """x @ W for torch's Linear weight W (stored transposed)."""
        return node("MatMul", [x, weight(name, state[name].T)])

    def linear(x: str, prefix: str) -> str:
        return node("Add", [matmul(x, f"{prefix}.weight"), weight(f"{prefix}.bias", state[f"{prefix}.bias"])])

    eps = config.layer_norm_eps
    ids, types, mask = onnx_reader.INPUT_NAMES
    mask = node("Cast", [mask], to=TensorProto.INT32)
    embeddings = "bert.embeddings."
    words = state[embeddings + "word_embeddings.weight"]
    tables = [weight(embeddings + name, state[embeddings + name]) for name in (
        "position_embeddings.weight", "token_type_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias")]
    if fp16_word_lookup:
        looked_up = node("Gather", [weight(embeddings + "word_embeddings.weight", words.astype(np.float16)), ids])
        first_positions = node("Slice", [tables[0], weight("first_position", np.array([0], dtype=np.int64)),
                                         node("Shape", [ids], start=1, end=2)])
        summed = node("Add", [node("Add", [node("Cast", [looked_up], to=TensorProto.FLOAT), first_positions]),
                              node("Gather", [tables[1], types])])
        x = node("LayerNormalization", [summed, *tables[2:]], axis=-1, epsilon=eps)
    else:
        ids, types = (node("Cast", [name], to=TensorProto.INT32) for name in (ids, types))
        x, _ = node("EmbedLayerNormalization", [ids, types, weight(embeddings + "word_embeddings.weight", words),
                                                *tables], ["embedded", "mask_index"], domain=MICROSOFT, epsilon=eps)
    if "bert.embeddings_project.weight" in state:
        x = linear(x, "bert.embeddings_project")
    for index in range(config.num_hidden_layers):
        prefix = f"bert.encoder.layer.{index}."
        # Attention takes the raw 0/1 mask (any padding side), and query, key and value packed into one matmul.
        qkv_weight = np.concatenate([state[f"{prefix}attn.{n}.weight"].T for n in ("query", "key", "value")], axis=1)
        qkv_bias = np.concatenate([state[f"{prefix}attn.{n}.bias"] for n in ("query", "key", "value")])
        attended = node("Attention", [x, weight(f"{prefix}attn.qkv.weight", qkv_weight),
                                      weight(f"{prefix}attn.qkv.bias", qkv_bias), mask],
                        domain=MICROSOFT, num_heads=config.num_heads)
        x = residual_layer_norm(node, weight, state, matmul(attended, f"{prefix}attn.o_proj.weight"), x,
                            f"{prefix}attention_norm", f"{prefix}attn.o_proj.bias", eps)
        hidden = matmul(x, f"{prefix}ffn.fc1.weight")
        bias = weight(f"{prefix}ffn.fc1.bias", state[f"{prefix}ffn.fc1.bias"])
        if config.act_fn in ("gelu", "gelu_new"):   # the tanh approximation
            hidden = node("FastGelu", [hidden, bias], domain=MICROSOFT)
        elif config.act_fn == "gelu_exact":
            hidden = node("BiasGelu", [hidden, bias], domain=MICROSOFT)
        else:
            hidden = node("Relu", [node("Add", [hidden, bias])])
        x = residual_layer_norm(node, weight, state, matmul(hidden, f"{prefix}ffn.fc2.weight"), x,
                            f"{prefix}ffn_norm", f"{prefix}ffn.fc2.bias", eps)
    start, end = node("Split", [linear(x, "qa_outputs")], ["start_split", "end_split"], axis=-1, num_outputs=2)
    last_axis = weight("last_axis", np.array([-1], dtype=np.int64))
    for split, name in zip((start, end), onnx_reader.OUTPUT_NAMES):
        node("Squeeze", [split, last_axis], [name])
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        nodes, "korquad_reader",
        [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name in onnx_reader.INPUT_NAMES],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name in onnx_reader.OUTPUT_NAMES],
        initializers)
    graph_model = helper.make_model(graph, producer_name="korquad export.py",
                                    opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MICROSOFT, 1)])
    graph_model.ir_version = 8  # readable by ONNX Runtime 1.14 and newer
    return graph_model


def residual_layer_norm(node, weight, state, x: str, skip: str, norm: str, bias: str, eps: float) -> str:
    """LayerNorm(x + bias + skip) as two Adds and ONNX's LayerNormalization, deliberately not as ORT's fused
    SkipLayerNormalization: with onnxruntime 1.32 on this CPU that kernel took a fifth of an int8 batch,
    the unfused three a twentieth (`bench.py --only predict`); open_session keeps ORT from re-fusing them."""
    residual = node("Add", [node("Add", [x, weight(bias, state[bias])]), skip])
    return node("LayerNormalization", [residual, weight(f"{norm}.weight", state[f"{norm}.weight"]),
                                       weight(f"{norm}.bias", state[f"{norm}.bias"])], axis=-1, epsilon=eps)


# Where each fused attention operator takes its 0/1 mask.
MASK_INPUT = {"Attention": 3, "QAttention": 5}


def attend_unmasked_when_unpadded(model_bytes: bytes) -> bytes:
    """`model_bytes` with each (Q)Attention behind an `If`: a run without padding (every attention_mask
    value 1, as in the reader's one-window runs) takes the operator without its mask, whose CPU kernel then
    adds no mask to the scores (BERT-small one window a run: int8 1.05x faster, fp32 1.04x; `bench.py --only
    onnx_profile`); a padded run takes it with the mask, as before. Both branches share the outer graph's weights."""
    import onnx
    from onnx import TensorProto, helper

    graph_model = onnx.load_from_string(model_bytes)
    graph = graph_model.graph
    nodes = [helper.make_node("ReduceMin", ["attention_mask"], ["mask_min"], name="mask_min", keepdims=0),
             helper.make_node("Constant", [], ["mask_one"], name="mask_one",
                              value=helper.make_tensor("mask_one", TensorProto.INT64, [], [1])),
             helper.make_node("Equal", ["mask_min", "mask_one"], ["unpadded"], name="unpadded")]

    def branch(attention, masked: bool):
        inputs = list(attention.input)
        if not masked:
            inputs[MASK_INPUT[attention.op_type]] = ""   # an optional input left out
        while inputs[-1] == "":
            inputs.pop()
        name = f"{attention.name}_{'masked' if masked else 'unmasked'}"
        inner = helper.make_node(attention.op_type, inputs, [f"{name}_output"], name=name, domain=attention.domain)
        inner.attribute.extend(attention.attribute)
        return helper.make_graph([inner], name, [], [helper.make_tensor_value_info(f"{name}_output",
                                                                                  TensorProto.FLOAT, None)])

    for original in graph.node:
        if original.domain == MICROSOFT and original.op_type in MASK_INPUT:
            nodes.append(helper.make_node("If", ["unpadded"], list(original.output), name=f"{original.name}_if",
                                          then_branch=branch(original, masked=False),
                                          else_branch=branch(original, masked=True)))
        else:
            nodes.append(original)
    del graph.node[:]
    graph.node.extend(nodes)
    return graph_model.SerializeToString()


def quantize_int8(fp32_bytes: bytes, scratch: Path, reduce_range: bool = False) -> bytes:
    """Dynamic int8 of the matmuls and attention: weights signed int8 per tensor (7-bit with `reduce_range`),
    activations uint8 quantized per run at run time (u8s8 runs on the VNNI/AVX2 int8 kernels; u8u8 ran at fp32
    speed; per-channel weights were no faster; static QDQ, calibrated, was slower: `bench.py --only predict`,
    docs/measurements.md). The embeddings are left as the graph has them: see `onnx_graph`'s fp16 lookup."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = scratch / "fp32.onnx", scratch / "int8.onnx"
    source.write_bytes(fp32_bytes)
    # The quantizer logs a line per tensor on the root logger; a user needs none of them.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        # The fused operators are outside ONNX's shape inference: their outputs are float32, as the quantizer is told.
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=False, reduce_range=reduce_range,
                         op_types_to_quantize=["MatMul", "Attention"],
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.setLevel(level)
    return target.read_bytes()


def check_batch(model: QuestionAnswering, settings: onnx_reader.ExportSettings, vocab_file: str | Path
                ) -> dict[str, np.ndarray]:
    """Windows of the bundled sample's first questions, tokenized as the model reads text, as one batch."""
    tokenizer = build_tokenizer(vocab_file, settings.analyzer, model.config, settings.do_lower_case)
    examples = read_squad_examples(CHECK_FILE, is_training=False)[:CHECK_QUESTIONS]
    width = min(settings.max_seq_length, 256)
    query = min(settings.max_query_length, width // 4)
    features = convert_examples_to_features(examples, tokenizer, width, max(1, (width - query - 3) // 2), query,
                                            is_training=False, progress=False)
    batch = collate_features(features, range(min(CHECK_QUESTIONS, len(features))), is_training=False)
    return {name: batch[name] for name in onnx_reader.INPUT_NAMES}


def verify(model: QuestionAnswering, model_bytes: bytes, name: str, batch: dict[str, np.ndarray],
           tolerance: float) -> None:
    """Refuse `model_bytes` if its logits on `batch` are not finite, or differ from the eager model's by
    more than `tolerance`."""
    session = onnx_reader.open_session(Path(name), model_bytes=model_bytes)
    with torch.inference_mode():
        expected = [logits.numpy() for logits in model(*(torch.from_numpy(batch[n]) for n in onnx_reader.INPUT_NAMES))]
    real = batch["attention_mask"] == 1
    # The batch as one run (padded: the graph's masked branch), and each window alone, cut to its length, as
    # the reader runs it (the unmasked branch), set back into the batch's shape.
    batched = session.run(onnx_reader.OUTPUT_NAMES, batch)
    alone = [np.zeros_like(logits) for logits in expected]
    for row, length in enumerate(real.sum(axis=1)):
        window = {n: batch[n][row:row + 1, :length] for n in onnx_reader.INPUT_NAMES}
        for output, logits in zip(alone, session.run(onnx_reader.OUTPUT_NAMES, window)):
            output[row, :length] = logits[0]
    for source, outputs in (("the checkpoint's own", expected), (name, batched), (f"{name} one window a run", alone)):
        for output, logits in zip(onnx_reader.OUTPUT_NAMES, outputs):
            if not np.isfinite(logits[real]).all():
                raise UsageError(f"{name}: {source} {output} are NaN or infinite on the sample windows; "
                                 f"nothing written")
    # One array, not Python's max(): max(0.1, nan) is 0.1, so a NaN end logit would pass a start logit's check.
    difference = float(np.max([np.abs(g[real] - e[real]).max() for g, e in zip(batched + alone, expected * 2)]))
    rows, width = batch["input_ids"].shape
    print(f"{name}: max start/end logit difference to the eager model {difference:.2e} "
          f"on {rows} sample windows of up to {width} pieces, in one run and one window a run (allowed {tolerance:g})")
    if not difference <= tolerance:
        raise UsageError(f"{name}: logits differ from the eager model's by {difference:.3g} (allowed {tolerance:g}); "
                         f"nothing written")


def export_onnx(model: QuestionAnswering, vocab_file: str | Path, settings: onnx_reader.ExportSettings,
                output_dir: Path, quantize: bool, int8_for: str = "auto") -> None:
    """model.onnx (and model_int8.onnx, for the CPUs `int8_for` names), vocab.txt and onnx_reader.json in
    `output_dir`, each model verified against `model` before anything is written."""
    remove_dead_scratch(output_dir)
    batch = check_batch(model, settings, vocab_file)
    fp32_bytes = attend_unmasked_when_unpadded(onnx_graph(model).SerializeToString())
    verify(model, fp32_bytes, onnx_reader.MODEL_NAME, batch, FP32_TOLERANCE)
    models = {onnx_reader.MODEL_NAME: fp32_bytes}
    if quantize:
        target = onnx_reader.cpu_int8_target() if int8_for == "auto" else int8_for
        reduce_range = onnx_reader.INT8_TARGETS[target]
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}.", dir=output_dir) as scratch:
            # Quantized before the Ifs go in: the quantizer reads no If branches.
            graph_bytes = onnx_graph(model, fp16_word_lookup=True).SerializeToString()
            int8_bytes = attend_unmasked_when_unpadded(quantize_int8(graph_bytes, Path(scratch), reduce_range))
        settings.quantization = {"method": "dynamic", "weights": "int8 per tensor" + (", 7-bit" if reduce_range else ""),
                                 "activations": "uint8 per run", "embeddings": "fp16 word table", "for": target,
                                 "reduce_range": reduce_range,
                                 "chosen": "this CPU's" if int8_for == "auto" else "--int8_for"}
        verify(model, int8_bytes, onnx_reader.INT8_MODEL_NAME, batch, INT8_TOLERANCE)
        models[onnx_reader.INT8_MODEL_NAME] = int8_bytes
    settings.models = {name: onnx_reader.model_digest(data) for name, data in models.items()}
    files = {output_dir / name: (lambda file, data=model_bytes: file.write(data)) for name, model_bytes in models.items()}
    vocab = vocab_file_bytes(vocab_file)
    files[output_dir / SAVED_VOCAB_NAME] = lambda file: file.write(vocab)
    atomic_write_files(files)
    # The settings last and on their own: a process killed between the renames above leaves the previous
    # settings, whose recorded checksums then refuse the new models by name instead of misdescribing them.
    atomic_write(output_dir / onnx_reader.SETTINGS_NAME, lambda file: file.write(json_bytes(settings.to_json())))


# quantize_int8's scratch directories: `.quantize.{pid}.{random}` in the output directory (a model's size each).
SCRATCH_PREFIX = ".quantize."


def remove_dead_scratch(output_dir: Path) -> None:
    """Delete what a killed export left in `output_dir`: its temporary files and quantization scratch."""
    remove_dead_temp_files(output_dir)
    for path in output_dir.glob(f"{SCRATCH_PREFIX}*"):
        pid = path.name[len(SCRATCH_PREFIX):].partition(".")[0]
        if path.is_dir() and pid.isdigit() and not pid_is_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def already_onnx(checkpoint: str | Path) -> UsageError:
    return UsageError(f"--checkpoint {checkpoint} is an ONNX export already; export its PyTorch checkpoint")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    if onnx_reader.find_export(args.checkpoint) is not None:
        raise already_onnx(args.checkpoint)
    # Before the checkpoint is looked for: an output over the model read is refused whatever else is wrong.
    check_output_dir(Path(args.output_dir), Path(args.checkpoint), args.format)
    args.checkpoint = [args.checkpoint]
    # The stale files an export deletes count as written: a --vocab_file among them would be lost.
    replaced = (*WRITTEN_FILES[args.format], *(STALE_TRANSFORMERS_FILES if args.format == "transformers" else ()))
    refuse_output_over_input("--output_dir", [Path(args.output_dir) / name for name in replaced], model_inputs(args))
    config = resolve_finetuned_settings(args)
    if isinstance(config, onnx_reader.ExportSettings):   # a hub model id that named one
        raise already_onnx(args.checkpoint[0])
    check_version_2(args)
    if args.analyzer not in ANALYZER_NAMES:
        raise UsageError(f"--analyzer {args.analyzer!r} (given, or the training run's) is not one of "
                         f"{', '.join(ANALYZER_NAMES)}")
    vocab_tokens = read_vocab_tokens(args.vocab_file)
    build_vocab(vocab_tokens, args.vocab_file)  # checks the special tokens are there
    vocab_size = len(vocab_tokens)
    if vocab_size != config.vocab_size:
        raise UsageError(f"vocab file {args.vocab_file} has {vocab_size} entries but the model config says "
                         f"vocab_size {config.vocab_size}")
    if args.format == "onnx":
        onnx_reader.require_onnxruntime("export.py --format onnx")
        require_onnx()
    # --output_dir is proved writable before the model loads; a refusal after that leaves no directory it made.
    with removed_if_failed(Path(args.output_dir)):
        output_dir = prepare_output_dir(args.output_dir)
        write_export(args, config, read_model(args, config), output_dir)


def read_model(args: argparse.Namespace, config) -> QuestionAnswering | BertForPreTraining:
    """The checked model of --checkpoint: fine-tuned, or pretrain.py's (transformers format only)."""
    checkpoint = Path(args.checkpoint[0])
    is_pretraining = checkpoint.is_file() and any(name.startswith("cls.") for name in read_state_dict(checkpoint))
    if is_pretraining and args.format == "onnx":
        raise UsageError(f"--format onnx: {checkpoint} is a pretrain.py checkpoint without a question-answering "
                         "head; fine-tune it with train.py first")
    if is_pretraining:
        model = BertForPreTraining(config)  # pretrain.py's output: encoder and both pre-training heads
        load_checkpoint(model, checkpoint)
        return model
    return load_finetuned(checkpoint, config, torch.device("cpu"))


@contextlib.contextmanager
def removed_if_failed(output_dir: Path) -> Iterator[None]:
    """The directories this run creates for `output_dir` removed again, where still empty, if the export fails
    (a refused checkpoint, NaN logits on the check windows): a refusal leaves nothing behind."""
    missing = [path for path in (output_dir, *output_dir.parents) if not path.exists()]
    try:
        yield
    except BaseException:
        for path in missing:   # the directory itself first, then the parents made for it
            with contextlib.suppress(OSError):
                path.rmdir()   # only if empty: what another process put there stays
        raise


def write_export(args: argparse.Namespace, config, model, output_dir: Path) -> None:
    """The checked `model` written in `output_dir` as --format says."""
    if args.format == "onnx":
        settings = onnx_reader.ExportSettings(
            vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings,
            do_lower_case=args.do_lower_case, analyzer=args.analyzer,
            **training_windows(args.checkpoint[0], config.max_position_embeddings),
            version_2_with_negative=args.version_2_with_negative,
            null_score_diff_threshold=args.null_score_diff_threshold)
        export_onnx(model, args.vocab_file, settings, output_dir, quantize=args.quantize == "int8",
                    int8_for=args.int8_for)
        print(output_dir)
        return
    export(model, args.vocab_file, args.do_lower_case, args.analyzer, output_dir)
    if args.analyzer != "none":
        logger.warning("fine-tuned with analyzer %r: transformers users must split text into %s morphemes "
                       "(space-separated) before tokenizing, or answers will be worse", args.analyzer, args.analyzer)
    print(output_dir)


if __name__ == "__main__":
    run_cli(main)

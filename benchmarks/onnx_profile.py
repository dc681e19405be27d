"""The onnx_profile row: where the ONNX models' time goes in predict's ONNX rows (ONNX Runtime's profiler per
operator, the masked attention branch), and the model's int8 matmuls and attention products against the same
kernels alone on this CPU."""
from __future__ import annotations

import argparse
import collections
from pathlib import Path

from benchmarks.harness import (PREDICT_QUESTIONS, ROOT, benchmark, dev_questions, export_onnx_beside,
                                kq_median_seconds, skipped_without, write_random_run)


@benchmark("onnx_profile")
def bench_onnx_profile(args: argparse.Namespace) -> None:
    """Where the model's time goes in the ONNX rows of `predict`: ONNX Runtime's profiler over the same 64 dev
    questions' windows, one window a run on one thread as the reader runs them, kernel time per operator type
    (fp32, int8); then the time per window unpadded and with one padding piece (the attention's masked branch);
    then the int8 matmuls' rate in the model against one such matmul alone (this CPU's ceiling for them), and
    one layer's attention products alone in fp32 and in int8 (what an int8 attention core would gain)."""
    if skipped_without("onnx_profile", "onnx", "onnxruntime"):  # the export writes with onnx, ORT runs it
        return
    import tempfile

    import numpy as np

    import onnx_reader
    from korquad_utils import collate_features, convert_examples_to_features
    from modeling import Config
    from predict import Reader
    from squad_examples import SquadExample

    config = Config.from_json_file(ROOT / "data" / "bert_small.json")
    questions = dev_questions(args.dev, PREDICT_QUESTIONS)
    with tempfile.TemporaryDirectory() as run:
        write_random_run(Path(run), config)
        reader = Reader.load(run, no_cuda=True, analyzer="mecab")
        onnx_dir = export_onnx_beside(reader, Path(run))
        examples = [SquadExample(str(n), q["question"], q["context"], []) for n, q in enumerate(questions)]
        features = convert_examples_to_features(examples, reader.tokenizer, reader.max_seq_length, reader.doc_stride,
                                                reader.max_query_length, is_training=False, progress=False)
        runs = [{name: array for name, array in collate_features(features, [index], is_training=False).items()
                 if name in onnx_reader.INPUT_NAMES} for index in range(len(features))]
        # The same windows with one padding piece each: the graph's masked attention branch.
        padded = [{name: np.pad(array, ((0, 0), (0, 1))) for name, array in feed.items()} for feed in runs]
        profiles = {}
        for label, name in (("fp32", onnx_reader.MODEL_NAME), ("int8", onnx_reader.INT8_MODEL_NAME)):
            session = onnx_reader.open_session(onnx_dir / name, profile_prefix=str(Path(run) / label))
            for feed in runs:
                session.run(onnx_reader.OUTPUT_NAMES, feed)
            spent = profiles[label] = _kernel_micros(session)
            # An If's time includes its branch's (the attention operator, also counted on its own): only what
            # it adds is its own.
            spent["If"] -= spent["Attention"] + spent["QAttention"]
            total = sum(spent.values())
            print(f"onnx_profile[{label}, {len(runs)} windows one a run, 1 thread]: "
                  + ", ".join(f"{op} {100 * micros / total:.1f}%" for op, micros in spent.most_common() if
                              micros >= total / 200))
            session = onnx_reader.open_session(onnx_dir / name)
            seconds = {}
            for case, feeds in (("unpadded", runs), ("padded", padded)):
                seconds[case] = kq_median_seconds(
                    lambda _, feeds=feeds: [session.run(onnx_reader.OUTPUT_NAMES, f) for f in feeds]) / len(feeds)
            print(f"onnx_profile[{label}, ms per window]: unpadded (attention without its mask) "
                  f"{1000 * seconds['unpadded']:.2f}, with one padding piece (the masked branch) "
                  f"{1000 * seconds['padded']:.2f}: {seconds['padded'] / seconds['unpadded']:.2f}x")
        # The int8 matmuls outside attention (output projection, FFN, span head) against one such matmul alone.
        lengths = [feed["input_ids"].shape[1] for feed in runs]
        hidden, ffn = config.hidden_size, config.ff_dim
        operations = sum(2 * length * (config.num_hidden_layers * (hidden * hidden + 2 * hidden * ffn) + 2 * hidden)
                         for length in lengths)
        rows = round(sum(lengths) / len(lengths))
        alone = _int8_matmul_rate(rows, hidden, ffn, Path(run) / "alone")
        in_model = operations / profiles["int8"]["DynamicQuantizeMatMul"] / 1e3
        print(f"onnx_profile[int8 matmuls, 1 thread]: the model's DynamicQuantizeMatMul {in_model:.0f} GOP/s; one "
              f"{rows}x{hidden}x{ffn} DynamicQuantizeMatMul alone {alone:.0f} GOP/s ({in_model / alone:.0%})")
        heads, head_size = config.num_heads, hidden // config.num_heads
        fp32_rate, int8_rate = _attention_core_rates(heads, rows, head_size, Path(run) / "core")
        print(f"onnx_profile[attention core, 1 thread]: one layer's {heads} heads, {rows}x{head_size} by "
              f"{head_size}x{rows} then {rows}x{rows} by {rows}x{head_size}: fp32 MatMul {fp32_rate:.0f} GFLOP/s, int8 "
              f"DynamicQuantizeMatMul {int8_rate:.0f} GOP/s ({int8_rate / fp32_rate:.2f}x)")


def _kernel_events(session) -> list[dict]:
    """The kernel-time events of a profiling `session`'s runs (ends its profiling)."""
    import json

    events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
    return [event for event in events if event.get("cat") == "Node" and event["name"].endswith("_kernel_time")]


def _kernel_micros(session) -> collections.Counter:
    """Microseconds of kernel time per operator type in a profiling `session`'s runs (ends its profiling)."""
    spent = collections.Counter()
    for event in _kernel_events(session):
        spent[event["args"]["op_name"]] += event["dur"]
    return spent


def _lone_kernel_micros(nodes: list, feed: dict, initializers: list, profile_prefix: Path, runs: int = 200) -> float:
    """Microseconds one run of `nodes` (a graph of their own, fed `feed`) spends in their kernels on one thread:
    the sum of each node's median over `runs` runs (a host's slow patch moves a sum of a few hundred short runs)."""
    import statistics

    import onnxruntime
    from onnx import helper

    from export import MICROSOFT

    def value(name: str, array=None):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype) if array is not None
                                             else 1, None if array is None else array.shape)

    graph = helper.make_graph(nodes, "lone", [value(name, array) for name, array in feed.items()],
                              [value(node.output[0]) for node in nodes], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MICROSOFT, 1)])
    model.ir_version = 8
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_profiling, options.profile_file_prefix = True, str(profile_prefix)
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    per_node = collections.defaultdict(list)
    for event in _kernel_events(session):
        per_node[event["name"]].append(event["dur"])
    return sum(statistics.median(durations) for durations in per_node.values())


def _int8_matmul_rate(rows: int, inner: int, outer: int, profile_prefix: Path) -> float:
    """GOP/s of ONNX Runtime's DynamicQuantizeMatMul (uint8 activations quantized per run, int8 weights) alone,
    `rows` x `inner` times `inner` x `outer`, on one thread: this CPU's ceiling for the model's matmuls."""
    import numpy as np
    from onnx import helper, numpy_helper

    from export import MICROSOFT

    generator = np.random.default_rng(0)
    weights = [numpy_helper.from_array(generator.integers(-127, 128, (inner, outer), dtype=np.int8), "weight"),
               numpy_helper.from_array(np.array(0.01, dtype=np.float32), "scale"),
               numpy_helper.from_array(np.array(0, dtype=np.int8), "zero_point")]
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "weight", "scale", "zero_point"], ["y"], domain=MICROSOFT)
    feed = {"x": generator.standard_normal((rows, inner), dtype=np.float32)}
    return 2 * rows * inner * outer / _lone_kernel_micros([node], feed, weights, profile_prefix) / 1e3


def _attention_core_rates(heads: int, length: int, head_size: int, profile_prefix: Path) -> tuple[float, float]:
    """G(FL)OP/s on one thread of one layer's attention products (scores Q K^T, then weights times V, all heads
    at once) as fp32 MatMuls and as int8 DynamicQuantizeMatMuls (K^T and V uint8 inputs, quantized per run as
    they would be): what an int8 attention core could gain over QAttention's fp32 one."""
    import numpy as np
    from onnx import helper, numpy_helper

    from export import MICROSOFT

    generator = np.random.default_rng(0)
    shapes = {"q": (1, heads, length, head_size), "k_t": (1, heads, head_size, length),
              "p": (1, heads, length, length), "v": (1, heads, length, head_size)}
    floats = {name: generator.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    # Named nodes: the kernel times are grouped by node name.
    fp32 = [helper.make_node("MatMul", ["q", "k_t"], ["scores"], name="scores"),
            helper.make_node("MatMul", ["p", "v"], ["context"], name="context")]
    bytes_ = {name: generator.integers(0, 256, shapes[name], dtype=np.uint8) for name in ("k_t", "v")}
    scales = [numpy_helper.from_array(np.array(0.01, dtype=np.float32), "scale"),
              numpy_helper.from_array(np.array(128, dtype=np.uint8), "zero_point")]
    int8 = [helper.make_node("DynamicQuantizeMatMul", [a, b, "scale", "zero_point"], [y], name=y, domain=MICROSOFT)
            for a, b, y in (("q", "k_t", "scores"), ("p", "v", "context"))]
    operations = 2 * 2 * heads * length * length * head_size
    return (operations / _lone_kernel_micros(fp32, floats, [], profile_prefix.with_name("core_fp32")) / 1e3,
            operations / _lone_kernel_micros(int8, {**floats, **bytes_}, scales,
                                             profile_prefix.with_name("core_int8")) / 1e3)

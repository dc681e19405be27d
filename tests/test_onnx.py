"""ONNX export and the torch-free ONNX Runtime path: export.py --format onnx, eval.py and predict.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_FLAGS, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_in_process, run_script, write_subset
from modeling import Config, QuestionAnswering

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

WINDOWS = dict(max_seq_length=192, max_query_length=32, max_answer_length=30, doc_stride=64)
CONTEXT = "서울은 대한민국의 수도이다. 부산은 항구 도시이고, 인천에는 국제공항이 있다."
QUESTIONS = ["대한민국의 수도는?", "국제공항이 있는 곳은?", "항구 도시는?"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run as train.py leaves it (window settings included), with a tiny fine-tuned model."""
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(TINY_CONFIG))
    (run / "training_args.json").write_text(json.dumps({"vocab_file": str(VOCAB_FILE), "analyzer": "mecab", **WINDOWS}))
    torch.manual_seed(3)
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), run / "korquad_1.bin")
    return run


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "reader"
    result = run_script("export.py", "--checkpoint", str(run_dir), "--output_dir", str(out), "--format", "onnx",
                        "--quantize", "int8", "--quiet")
    assert result.returncode == 0, result.stderr
    # The check against the eager model is printed for both models.
    assert "model.onnx: max start/end logit difference" in result.stdout
    assert "model_int8.onnx: max start/end logit difference" in result.stdout
    return out


@pytest.fixture(scope="module")
def eager(run_dir) -> QuestionAnswering:
    model = QuestionAnswering(Config(**TINY_CONFIG))
    model.load_state_dict(torch.load(run_dir / "korquad_1.bin", weights_only=True))
    return model.eval()


def sample_batch(rows: int, width: int, seed: int) -> dict[str, np.ndarray]:
    """Random ids, two segments and right padding of different lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(width // 2, width + 1, rows)
    lengths[0] = width
    mask = (np.arange(width) < lengths[:, None]).astype(np.int64)
    ids = rng.integers(5, TINY_CONFIG["vocab_size"], (rows, width)) * mask
    types = ((np.arange(width) >= width // 4) & (mask == 1)).astype(np.int64)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def eager_logits(model: QuestionAnswering, batch: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        return [t.numpy() for t in model(*(torch.from_numpy(batch[name]) for name in
                                           ("input_ids", "token_type_ids", "attention_mask")))]


def test_the_export_holds_what_a_deployment_needs(export_dir):
    assert sorted(p.name for p in export_dir.iterdir()) == ["model.onnx", "model_int8.onnx", "onnx_reader.json",
                                                           "vocab.txt"]
    settings = json.loads((export_dir / "onnx_reader.json").read_text(encoding="utf-8"))
    assert settings["analyzer"] == "mecab" and settings["do_lower_case"] is True
    assert {k: settings[k] for k in WINDOWS} == WINDOWS   # the training run's windows
    assert settings["inputs"] == ["input_ids", "token_type_ids", "attention_mask"]
    assert (export_dir / "vocab.txt").read_bytes() == VOCAB_FILE.read_bytes()


def test_a_bare_session_gives_the_eager_logits_at_any_batch_and_length(export_dir, eager):
    session = onnxruntime.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "token_type_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["start_logits", "end_logits"]
    for rows, width, seed in ((1, 17, 0), (5, 192, 1), (3, 64, 2)):
        batch = sample_batch(rows, width, seed)
        start, end = session.run(["start_logits", "end_logits"], batch)
        expected_start, expected_end = eager_logits(eager, batch)
        real = batch["attention_mask"] == 1
        assert start.shape == end.shape == (rows, width)
        np.testing.assert_allclose(start[real], expected_start[real], atol=1e-4, rtol=0)
        np.testing.assert_allclose(end[real], expected_end[real], atol=1e-4, rtol=0)


def test_int8_logits_stay_close(export_dir, eager):
    session = onnxruntime.InferenceSession(str(export_dir / "model_int8.onnx"), providers=["CPUExecutionProvider"])
    for rows, seed in ((4, 5), (1, 6)):   # padded, and one window alone (the graph's unmasked branch)
        batch = sample_batch(rows, 128, seed)
        start, end = session.run(None, batch)
        expected_start, expected_end = eager_logits(eager, batch)
        real = batch["attention_mask"] == 1
        spread = float(np.ptp(expected_start[real]))
        assert np.abs(start[real] - expected_start[real]).max() < 0.1 * spread
        assert np.abs(end[real] - expected_end[real]).max() < 0.1 * spread
    graph = __import__("onnx").load(export_dir / "model_int8.onnx").graph
    branches = [(node.attribute[0].g if node.attribute[0].name == "then_branch" else node.attribute[1].g, node)
                for node in graph.node if node.op_type == "If"]
    inner = [branch.node[0] for branch, _ in branches]
    # The word table in fp16 (an int8 table moved held-out answers), looked up by Gather; the rest is int8.
    tables = {tensor.name: tensor.data_type for tensor in graph.initializer}
    lookup = next(node for node in graph.node if node.op_type == "Gather" and node.input[1] == "input_ids")
    assert tables[lookup.input[0]] == __import__("onnx").TensorProto.FLOAT16
    assert "QEmbedLayerNormalization" not in {node.op_type for node in graph.node}
    # Attention in int8 too: every layer's QAttention behind its If, with the mask only on the padded branch.
    assert [node.op_type for node in inner] == ["QAttention"] * TINY_CONFIG["num_hidden_layers"]
    for _, node in branches:
        masked = {a.name: a.g.node[0] for a in node.attribute}
        assert len(masked["else_branch"].input) > 5 and masked["else_branch"].input[5] != ""
        assert len(masked["then_branch"].input) <= 5 or masked["then_branch"].input[5] == ""


def test_reader_from_an_export_answers_as_pytorch(run_dir, export_dir):
    from predict import Reader

    questions = [(question, CONTEXT) for question in QUESTIONS]
    expected = Reader.load(run_dir, no_cuda=True, **WINDOWS).answer_all(questions, top_k=3)
    for checkpoint in (export_dir, export_dir / "model.onnx"):
        reader = Reader.load(checkpoint)   # the export's own window settings
        assert (reader.max_seq_length, reader.doc_stride) == (192, 64)
        got = reader.answer_all(questions, top_k=3)
        for answer, reference in zip(got, expected):
            assert (answer["answer"], answer["start"], answer["end"]) == (
                reference["answer"], reference["start"], reference["end"])
            assert answer["probability"] == pytest.approx(reference["probability"], abs=1e-5)
            assert [a["answer"] for a in answer["answers"]] == [a["answer"] for a in reference["answers"]]
    int8 = Reader.load(export_dir / "model_int8.onnx").answer_all(questions)
    assert all(CONTEXT[a["start"]:a["end"]] == a["answer"] for a in int8)


def test_int8_answers_do_not_depend_on_the_other_questions_asked_alongside(export_dir):
    """Dynamic int8 scales a run by its own activations: the reader runs each window alone, so a question's
    logits are the same asked alone or among others, whatever --batch_size says."""
    import onnx_reader
    from korquad_utils import convert_examples_to_features
    from predict import Reader
    from squad_examples import SquadExample

    reader = Reader.load(export_dir / "model_int8.onnx", batch_size=8)
    other = "일본의 수도는 도쿄이고, 오사카는 상업 도시이다. " * 6  # longer, so its activations reach further
    mixed = [SquadExample("0", QUESTIONS[0], CONTEXT, []), SquadExample("1", "상업 도시는?", other, []),
             SquadExample("2", QUESTIONS[1], CONTEXT, [])]

    def logits(examples):
        features = convert_examples_to_features(examples, reader.tokenizer, reader.max_seq_length,
                                                reader.doc_stride, reader.max_query_length, is_training=False,
                                                progress=False)
        return reader.models[0].predict_logits(features, 8, show_progress=False)

    together = logits(mixed)
    alone = logits(mixed[:1])
    assert np.array_equal(together[0][0], alone[0][0]) and np.array_equal(together[1][0], alone[1][0])
    assert reader.models[0].windows_per_run == onnx_reader.WINDOWS_PER_RUN == 1
    batched = onnx_reader.OnnxReaderModel(export_dir / "model_int8.onnx", windows_per_run=8)
    features = convert_examples_to_features(mixed, reader.tokenizer, reader.max_seq_length, reader.doc_stride,
                                            reader.max_query_length, is_training=False, progress=False)
    # The premise: in one run of all three, the first question's logits move with the others'.
    assert not np.array_equal(batched.predict_logits(features, 8, show_progress=False)[0][0], alone[0][0])


def test_runs_side_by_side_give_the_logits_of_one_run_at_a_time(export_dir, monkeypatch):
    """The reader runs windows on every core at once, each on one thread: the logits are those of running
    them one after another, in the features' order; a failed run is raised and starts no more of them."""
    import threading
    import time

    import onnx_reader
    from korquad_utils import convert_examples_to_features
    from predict import Reader
    from squad_examples import SquadExample

    reader = Reader.load(export_dir / "model_int8.onnx")
    examples = [SquadExample(str(n), question, CONTEXT * (1 + n % 4), []) for n, question in enumerate(QUESTIONS * 3)]
    features = convert_examples_to_features(examples, reader.tokenizer, reader.max_seq_length, reader.doc_stride,
                                            reader.max_query_length, is_training=False, progress=False)
    assert len(set(features.lengths.tolist())) > 2
    path = export_dir / "model_int8.onnx"
    one_at_a_time = onnx_reader.OnnxReaderModel(path, workers=1).predict_logits(features, 8, show_progress=False)
    side_by_side = onnx_reader.OnnxReaderModel(path, workers=4)
    assert side_by_side.session.get_session_options().intra_op_num_threads == 1
    got = side_by_side.predict_logits(features, 8, show_progress=False)
    for ours, theirs in zip(got, one_at_a_time):
        assert [len(logits) for logits in ours] == features.lengths.tolist()
        assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))

    started = []
    lock = threading.Lock()

    def failing_run(batch):
        with lock:
            started.append(batch)
            first = len(started) == 1
        time.sleep(0.05)
        if first:
            raise RuntimeError("run failed")
        return onnx_reader.OnnxReaderModel.run(side_by_side, batch)

    monkeypatch.setattr(side_by_side, "run", failing_run)
    with pytest.raises(RuntimeError, match="run failed"):
        side_by_side.predict_logits(features, 8, show_progress=False)
    time.sleep(0.3)   # what was already running ends; nothing more starts
    assert len(started) < len(features)


def test_eval_from_an_export_writes_the_pytorch_predictions(run_dir, export_dir, tmp_path):
    data = tmp_path / "dev.json"
    write_subset(SAMPLE_FILE, data, 16)
    predictions = {}
    for name, checkpoint in (("torch", run_dir), ("onnx", export_dir)):
        result = run_script("eval.py", "--checkpoint", str(checkpoint), "--predict_file", str(data),
                            "--output_dir", str(tmp_path / name), "--cache_dir", str(tmp_path / "cache"),
                            *DATA_FLAGS, "--no_cuda", "--quiet")
        assert result.returncode == 0, result.stderr
        predictions[name] = json.loads((tmp_path / name / "predictions.json").read_text(encoding="utf-8"))
        assert "exact_match" in json.loads(result.stdout.splitlines()[-1])
    assert predictions["onnx"] == predictions["torch"]


def shim(tmp_path: Path, module: str) -> dict[str, str]:
    """An environment where `import module` fails, as where it is not installed."""
    directory = tmp_path / f"no_{module}"
    directory.mkdir(exist_ok=True)
    (directory / f"{module}.py").write_text(f"raise ImportError(\"No module named {module!r}\")\n")
    return {"PYTHONPATH": str(directory)}


def test_predict_answers_from_an_export_without_torch(run_dir, export_dir, tmp_path):
    flags = ["--question", QUESTIONS[0], "--context", CONTEXT, "--quiet"]
    no_torch = shim(tmp_path, "torch")
    result = run_script("predict.py", "--checkpoint", str(export_dir), *flags, env=no_torch)
    assert result.returncode == 0, result.stderr
    with_torch = run_script("predict.py", "--checkpoint", str(run_dir), *flags, *DATA_FLAGS, "--no_cuda")
    assert with_torch.returncode == 0, with_torch.stderr
    answer, reference = json.loads(result.stdout), json.loads(with_torch.stdout)
    assert (answer["answer"], answer["start"], answer["end"]) == (reference["answer"], reference["start"],
                                                                 reference["end"])
    # Without torch, a PyTorch checkpoint and an export missing its onnx_reader.json are one line each.
    partial = Path(shutil.copytree(export_dir, tmp_path / "partial"))
    (partial / "onnx_reader.json").unlink()
    for checkpoint, says in ((run_dir, "is not an ONNX export; a PyTorch checkpoint needs torch (pip install torch)"),
                             (partial, "an ONNX export without its onnx_reader.json"),
                             (partial / "model.onnx", "an ONNX export without its onnx_reader.json")):
        refused = run_script("predict.py", "--checkpoint", str(checkpoint), *flags, env=no_torch)
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 1 and len(lines) == 1 and says in lines[0], refused.stderr


def test_an_export_without_onnxruntime_is_one_line(export_dir, run_dir, tmp_path):
    no_runtime = shim(tmp_path, "onnxruntime")
    result = run_script("predict.py", "--checkpoint", str(export_dir), "--question", QUESTIONS[0],
                        "--context", CONTEXT, "--quiet", env=no_runtime)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"predict.py: error: --checkpoint {export_dir / 'model.onnx'} is an ONNX model, which needs ONNX Runtime: "
        f"pip install -r requirements-onnx.txt"]
    result = run_script("export.py", "--checkpoint", str(run_dir), "--output_dir", str(tmp_path / "out"),
                        "--format", "onnx", env=no_runtime)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "pip install onnx -r requirements-onnx.txt" in result.stderr and not (tmp_path / "out").exists()


def test_bad_exports_and_flags_are_one_line(export_dir, run_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "onnx_reader.json").write_text(json.dumps({"format": "korquad-onnx-reader", "version": 1}))
    (broken / "model.onnx").write_bytes(b"not a model")
    cases = [
        (["--checkpoint", str(broken)], "\"vocab_size\" must be a positive whole number"),
        (["--checkpoint", str(export_dir), "--bf16"], "--bf16 is for PyTorch models"),
        (["--checkpoint", str(export_dir), str(run_dir / "korquad_1.bin")], "either all ONNX exports or none"),
        (["--checkpoint", str(export_dir), "--max_seq_length", "1024"], "larger than the model's"),
    ]
    for flags, message in cases:
        result = run_in_process("predict.py", *flags, "--question", "q", "--context", "c", "--quiet")
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, flags
    result = run_in_process("export.py", "--checkpoint", str(run_dir), "--output_dir", str(tmp_path / "x"),
                            "--quantize", "int8")
    assert result.returncode == 2 and "--quantize needs --format onnx" in result.stderr


def test_the_int8_models_fp16_word_lookup_reads_as_the_fused_embeddings(eager):
    """model_int8.onnx's embeddings (fp16 word table, Gather, position slice, LayerNormalization) before
    quantization: the eager logits to fp16's rounding, for BERT's embeddings and ELECTRA's projected ones."""
    import export

    torch.manual_seed(3)
    electra = QuestionAnswering(Config(**{**TINY_CONFIG, "embedding_size": 16})).eval()
    batch = sample_batch(3, 48, 11)
    real = batch["attention_mask"] == 1
    for model in (eager, electra):
        expected = eager_logits(model, batch)
        for fp16_word_lookup, tolerance in ((False, 1e-4), (True, 5e-3)):
            graph = export.onnx_graph(model, fp16_word_lookup=fp16_word_lookup).SerializeToString()
            got = onnxruntime.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, batch)
            for logits, reference in zip(got, expected):
                np.testing.assert_allclose(logits[real], reference[real], atol=tolerance, rtol=0)


def test_export_refuses_a_model_whose_logits_drift(eager):
    import export
    from cli import UsageError

    batch = sample_batch(2, 32, 9)
    graph = export.onnx_graph(eager)
    shifted = np.full(2, 5.0, dtype=np.float32)
    graph.graph.initializer[-2].CopyFrom(  # qa_outputs.bias, shifted
        __import__("onnx").numpy_helper.from_array(shifted, "qa_outputs.bias"))
    with pytest.raises(UsageError, match=r"differ from the eager model.s by 5 \(allowed 0.001\); nothing written"):
        export.verify(eager, graph.SerializeToString(), "model.onnx", batch, export.FP32_TOLERANCE)
    export.verify(eager, export.onnx_graph(eager).SerializeToString(), "model.onnx", batch, export.FP32_TOLERANCE)


def test_our_sessions_run_the_residual_layer_norms_unfused(export_dir, tmp_path):
    """The speed choice export.py and onnx_reader make together: ORT would fuse each residual Add +
    LayerNormalization back into its slower SkipLayerNormalization; our sessions keep them apart (in
    both the fp32 and the int8 model), while a bare session may fuse them and still answers the same."""
    import onnx

    import onnx_reader

    batch = sample_batch(3, 48, 5)
    for name in (onnx_reader.MODEL_NAME, onnx_reader.INT8_MODEL_NAME):
        written = onnx.load(str(export_dir / name))
        assert "SkipLayerNormalization" not in {n.op_type for n in written.graph.node}
        optimized = tmp_path / f"optimized_{name}"
        options = onnxruntime.SessionOptions()
        options.optimized_model_filepath = str(optimized)
        ours = onnxruntime.InferenceSession(str(export_dir / name), options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=onnx_reader.UNFUSED_OPTIMIZERS)
        ops = {n.op_type for n in onnx.load(str(optimized)).graph.node}
        assert "LayerNormalization" in ops and "SkipLayerNormalization" not in ops, ops
        bare = onnxruntime.InferenceSession(str(export_dir / name), providers=["CPUExecutionProvider"])
        for got, expected in zip(ours.run(None, batch), bare.run(None, batch)):
            np.testing.assert_allclose(got, expected, atol=1e-4)

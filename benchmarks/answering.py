"""Rows on answering: predict.py's rates (PyTorch, ONNX fp32 and int8, next to transformers' pipeline), its
start-up time and memory, and ONNX answers against PyTorch's."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Callable

from benchmarks.harness import (PREDICT_QUESTIONS, ROOT, VOCAB_FILE, benchmark, dev_questions,
                                export_onnx_beside, kq_median_seconds, skipped_without, write_random_run)


# --- predict.py (issue 10) ---------------------------------------------------------------
PREDICT_QUESTIONS = 64   # the first dev questions, with their real (shared) contexts


def _question_answering_pipeline(config):
    """transformers' `pipeline("question-answering")` on a randomly initialised BertForQuestionAnswering
    of the same size and our vocab: `answer(question, context)` and its tokenizer; None where the
    installed transformers has no such pipeline (5.x dropped it) or none is installed."""
    if not _has_question_answering_pipeline():
        return None
    import shutil
    import tempfile

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as vocab_dir:
        shutil.copy(VOCAB_FILE, Path(vocab_dir) / "vocab.txt")
        # No accent stripping: with lower-casing it would decompose Hangul into jamo, all [UNK].
        tokenizer = transformers.BertTokenizerFast.from_pretrained(vocab_dir, do_lower_case=True,
                                                                   strip_accents=False)
    torch.manual_seed(0)
    model = transformers.BertForQuestionAnswering(transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ff_dim, hidden_act="gelu_new",
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size)).eval()
    pipeline = transformers.pipeline("question-answering", model=model, tokenizer=tokenizer, device=-1)

    def answer(question: str, context: str) -> dict:
        # Our windows: 512 pieces, 128-piece stride, 96 question pieces, answers up to 30 pieces.
        return pipeline(question=question, context=context, max_seq_len=512, doc_stride=128,
                        max_question_len=96, max_answer_len=30)
    return answer, tokenizer


def _has_question_answering_pipeline() -> bool:
    try:
        from transformers.pipelines import SUPPORTED_TASKS
    except ImportError:
        return False
    return "question-answering" in SUPPORTED_TASKS


@benchmark("predict")
def bench_predict(args: argparse.Namespace) -> None:
    """predict.py on CPU with BERT-small (random weights: speed only): load time, answers per second
    one at a time and batched next to transformers' question-answering pipeline; PyTorch and the ONNX
    exports (fp32, int8; int8 also as the reader ran it before) batched, each in a process of its own, with
    the shares of tokenizing and decoding, next to the pipeline in a process of its own (goals: batched >= 2x,
    int8 ONNX >= 4x the pipeline, fp32 ONNX no slower than PyTorch); then process start to first answer and
    peak memory, ONNX vs PyTorch."""
    if skipped_without("predict", "onnx", "onnxruntime"):  # the ONNX rows export with onnx, ORT runs them
        return
    import tempfile
    import time

    import torch

    import onnx_reader
    from korquad_utils import SquadExample, convert_examples_to_features
    from modeling import Config
    from predict import Reader

    config = Config.from_json_file(ROOT / "data" / "bert_small.json")
    questions = dev_questions(args.dev, PREDICT_QUESTIONS)
    with tempfile.TemporaryDirectory() as run:
        write_random_run(Path(run), config)
        started = time.perf_counter()
        reader = Reader.load(run, no_cuda=True, analyzer="mecab")
        load_seconds = time.perf_counter() - started
        readers = {"batched": reader, "batched_bf16": Reader.load(run, no_cuda=True, analyzer="mecab", bf16=True),
                   "batched_32": Reader.load(run, no_cuda=True, analyzer="mecab", batch_size=32)}
        onnx_dir = export_onnx_beside(reader, Path(run))
        threads = onnx_reader.physical_cores()
        int8_file = str(onnx_dir / onnx_reader.INT8_MODEL_NAME)
        side_by_side = f"{threads} runs side by side on 1 thread each, 1 window a run"
        own_process = _rates_in_own_processes({
            "PyTorch": ([run], {"no_cuda": True, "analyzer": "mecab"}, {}),
            f"ONNX fp32, {side_by_side}": ([str(onnx_dir)], {}, {}),
            f"ONNX int8, {side_by_side}": ([int8_file], {}, {}),
            # What the reader did before: one run at a time on every core's thread; before that, whole batches.
            f"ONNX int8, 1 run at a time on {threads} threads, 1 window a run": (
                [int8_file], {}, {"workers": 1, "threads": threads}),
            f"ONNX int8, 1 run at a time on {threads} threads, runs of {reader.batch_size} windows": (
                [int8_file], {}, {"workers": 1, "threads": threads, "windows_per_run": reader.batch_size}),
            # The pipeline in a process of its own too, as the exports run: its readings here and there differ.
            **({_PIPELINE: ([_PIPELINE], {}, {})} if _has_question_answering_pipeline() else {})},
            questions)
        own_pipeline = own_process.pop(_PIPELINE, {}).get("rate")
        startup = _startup_and_memory(run, onnx_dir, questions[0])
    reader("워밍업?", questions[0]["context"])   # first-call costs (allocator, Mecab dictionary) not timed
    pipeline, pipeline_tokenizer = _question_answering_pipeline(config) or (None, None)
    runs: dict[str, Callable[[], object]] = {
        "one_at_a_time": lambda: [reader(q["question"], q["context"]) for q in questions],
        **{name: (lambda r=r: r.answer_all(questions)) for name, r in readers.items()}}
    if pipeline is not None:
        pipeline("워밍업?", questions[0]["context"])
        runs["transformers_pipeline"] = lambda: [pipeline(q["question"], q["context"]) for q in questions]

    # Interleaved, so drifting machine load hurts all alike; the best of three runs each.
    rates: dict[str, float] = dict.fromkeys(runs, 0.0)
    for _ in range(3):
        for name, answer_questions in runs.items():
            started = time.perf_counter()
            answer_questions()
            rates[name] = max(rates[name], len(questions) / (time.perf_counter() - started))
    examples = [SquadExample(str(n), q["question"], q["context"], []) for n, q in enumerate(questions)]
    features = convert_examples_to_features(examples, reader.tokenizer, reader.max_seq_length, reader.doc_stride,
                                            reader.max_query_length, is_training=False, progress=False)
    print(f"predict: {len(questions)} dev questions with their real contexts, BERT-small, "
          f"CPU x{torch.get_num_threads()} threads; {len(features)} windows, "
          f"{features.lengths.mean():.0f} pieces each (Mecab + WordPiece)")
    print(f"predict.load_seconds: {load_seconds:.2f}")
    labels = {"one_at_a_time": "one_at_a_time", "batched": f"batched, batch {reader.batch_size}",
              "batched_32": "batched, batch 32", "batched_bf16": f"batched, batch {reader.batch_size}, --bf16"}
    theirs = rates.get("transformers_pipeline")
    for name, label in labels.items():
        versus = f" ({rates[name] / theirs:.2f}x the pipeline)" if theirs else ""
        print(f"predict.answers_per_second[{label}]: {rates[name]:.2f}{versus}")
    # The own-process rows against the pipeline's faster reading, in this process or its own: its rate moves
    # from run to run more than the exports' do.
    fastest = max(theirs or 0.0, own_pipeline or 0.0)
    for name, measured in own_process.items():
        rate = measured["rate"]
        versus = f" ({rate / fastest:.2f}x the pipeline's faster reading)" if fastest else ""
        if name != "PyTorch":
            versus += f" ({rate / own_process['PyTorch']['rate']:.2f}x PyTorch in its own process)"
        detail = "without torch" if name.startswith("ONNX") else "fp32"
        shares = {stage: measured[stage] / measured["seconds"] for stage in ("tokenize", "decode")}
        print(f"predict.answers_per_second[own process: {name}, batch {reader.batch_size}, {detail}]: "
              f"{rate:.2f}{versus}; time: tokenizing and windows {100 * shares['tokenize']:.1f}%, model and "
              f"the rest {100 * (1 - sum(shares.values())):.1f}%, decoding {100 * shares['decode']:.1f}%")
    if theirs is None:
        print("predict.answers_per_second[transformers_pipeline]: skipped (needs transformers 4.x, which has "
              "pipeline(\"question-answering\"))")
    else:
        import transformers

        their_pieces = [len(pipeline_tokenizer(q["question"], q["context"], truncation="only_second",
                                               max_length=reader.max_seq_length)["input_ids"]) for q in questions]
        print(f"predict.answers_per_second[transformers {transformers.__version__} pipeline, fp32, one at a time]: "
              f"{theirs:.2f} in this process, {own_pipeline:.2f} in its own (its first windows: "
              f"{sum(their_pieces) / len(their_pieces):.0f} pieces each)")
    for name, (seconds, megabytes) in startup.items():
        print(f"predict.start_to_first_answer[{name}]: {seconds:.2f} s, peak RSS {megabytes:.0f} MB")
    onnx_seconds, onnx_megabytes = startup["ONNX int8, without torch"]
    torch_seconds, torch_megabytes = startup["PyTorch"]
    print(f"predict.start_to_first_answer[ONNX int8 vs PyTorch]: {torch_seconds / onnx_seconds:.2f}x sooner, "
          f"{onnx_megabytes / torch_megabytes:.2f}x the peak memory")


def _without_torch_env(directory: Path) -> dict[str, str]:
    """This process's environment with `directory` first on PYTHONPATH, holding a `torch` that cannot be
    imported: a deployment that installed only the ONNX requirements."""
    import os

    (directory / "torch.py").write_text("raise ImportError(\"No module named 'torch'\")\n")
    return {**os.environ, "PYTHONPATH": str(directory)}


# The checkpoint that stands for transformers' question-answering pipeline in _rates_in_own_processes.
_PIPELINE = "transformers-pipeline"
# Loads a Reader (argv: questions JSON, checkpoint, Reader.load keywords as JSON, attributes to set on each
# model as JSON; "threads" reopens an ONNX model's session with that many threads a run), or for _PIPELINE
# transformers' pipeline answering one question at a time, and prints, as JSON, its best answers/s over three
# passes and the seconds those passes spent tokenizing and cutting windows, in the model, and decoding spans.
_RATE_PROBE = """
import json, sys, time
import onnx_reader
import predict
from predict import Reader
questions = json.loads(open(sys.argv[1], encoding="utf-8").read())
if sys.argv[2] == "%s":
    from benchmarks.answering import _question_answering_pipeline
    from modeling import Config
    pipeline, _ = _question_answering_pipeline(Config.from_json_file("data/bert_small.json"))
    answer_all = lambda questions: [pipeline(q["question"], q["context"]) for q in questions]
else:
    reader = Reader.load(sys.argv[2], **json.loads(sys.argv[3]))
    answer_all = reader.answer_all
    for model in reader.models:
        for name, value in json.loads(sys.argv[4]).items():
            if name == "threads":   # an ONNX session's own threads for each run
                model.session = onnx_reader.open_session(model.path, threads=value)
            else:
                setattr(model, name, value)
spent = {"tokenize": 0.0, "decode": 0.0}
def timed(stage, function):
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[stage] += time.perf_counter() - started
    return run
predict.convert_examples_to_features = timed("tokenize", predict.convert_examples_to_features)
predict.decode_predictions = timed("decode", predict.decode_predictions)
answer_all(questions[:8])
best, total = 0.0, 0.0
spent.update(tokenize=0.0, decode=0.0)
for _ in range(3):
    started = time.perf_counter()
    answer_all(questions)
    seconds = time.perf_counter() - started
    best, total = max(best, len(questions) / seconds), total + seconds
print(json.dumps({"rate": best, "seconds": total, **spent}))
""" % _PIPELINE


def _rates_in_own_processes(cases: dict[str, tuple[list[str], dict, dict]], questions: list[dict]
                            ) -> dict[str, dict[str, float]]:
    """Batched answers/s of each case (checkpoint, Reader.load keywords, attributes set on its models) in a
    process of its own, as it is deployed, with the shares of its time spent tokenizing, in the model and
    decoding: ONNX Runtime's and torch's thread pools each spin-wait after their work, so two runtimes timed
    in one process slow each other down. ONNX runs where torch cannot be imported. Interleaved processes,
    the best of two rounds."""
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        without_torch = _without_torch_env(Path(work))
        (Path(work) / "questions.json").write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
        results: dict[str, dict[str, float]] = {}
        for _ in range(2):
            for name, ([checkpoint], keywords, attributes) in cases.items():
                env = without_torch if name.startswith("ONNX") else os.environ
                result = subprocess.run([sys.executable, "-c", _RATE_PROBE, str(Path(work) / "questions.json"),
                                         checkpoint, json.dumps(keywords), json.dumps(attributes)],
                                        capture_output=True, text=True, env=env, cwd=ROOT)
                if result.returncode:
                    raise RuntimeError(f"predict rate ({name}) failed: {result.stderr.strip()[-300:]}")
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                if measured["rate"] > results.get(name, {"rate": 0.0})["rate"]:
                    results[name] = measured
    return results


# Runs one command and prints, as JSON, the seconds to its first stdout line and its peak RSS. A child's
# ru_maxrss keeps the high-water mark of the process it was spawned from (Linux carries it across exec),
# so the command is spawned from this small process, not from bench.py with its models loaded.
_STARTUP_PROBE = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
line = process.stdout.readline()
seconds = time.perf_counter() - started
process.stdout.read()
status = process.wait()
peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": seconds, "status": status, "answered": bool(line.strip()), "peak_kib": peak_kib}))
"""


def _startup_and_memory(run: str, onnx_dir: Path, question: dict) -> dict[str, tuple[float, float]]:
    """predict.py --question as a fresh process: seconds from its start to the answer line, and its peak
    RSS, for the PyTorch checkpoint and the int8 ONNX export (in an environment where torch cannot be
    imported, as in a deployment without it). The best of three, interleaved."""
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as shim:
        cases = {"PyTorch": ([run, "--no_cuda"], os.environ),
                 "ONNX int8, without torch": ([str(onnx_dir / "model_int8.onnx")], _without_torch_env(Path(shim)))}
        best: dict[str, tuple[float, float]] = {}
        for _ in range(3):
            for name, (checkpoint, env) in cases.items():
                probe = subprocess.run(
                    [sys.executable, "-c", _STARTUP_PROBE, sys.executable, str(ROOT / "predict.py"), "--checkpoint",
                     *checkpoint, "--quiet", "--question", question["question"], "--context", question["context"]],
                    capture_output=True, text=True, env=env, cwd=ROOT, check=True)
                result = json.loads(probe.stdout)
                if result["status"] != 0 or not result["answered"]:
                    raise RuntimeError(f"predict.py ({name}) failed with status {result['status']}")
                previous = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(previous[0], result["seconds"]), min(previous[1], result["peak_kib"] / 1024))
    return best


@benchmark("onnx_agreement")
def bench_onnx_agreement(args: argparse.Namespace) -> None:
    """Each trained --checkpoint (run directory or file) on the dev questions, in PyTorch fp32 and exported to
    ONNX fp32 and int8: how often each ONNX answer equals PyTorch's, and EM/F1 of each (goals: fp32
    identical on nearly every question; int8 identical on >= 97%, EM within 1 point); with several
    checkpoints (a run's epochs), the spread of int8's agreement over them."""
    import json

    import evaluate_v1_0

    if args.checkpoint is None:
        print("onnx_agreement: skipped (pass --checkpoint with a trained run)")
        return
    if skipped_without("onnx_agreement", "onnx", "onnxruntime"):
        return
    questions = dev_questions(args.dev, 10 ** 9)
    with open(args.dev, encoding="utf-8-sig") as handle:
        dataset = json.load(handle)["data"]
    int8_agreement = []
    for checkpoint in args.checkpoint:
        answers, windows = _answers_in_pytorch_and_onnx(checkpoint, questions)
        reference = answers["PyTorch fp32"]
        print(f"onnx_agreement: {len(questions)} questions of {args.dev.name}, checkpoint {checkpoint}, "
              f"windows {windows}")
        for name, predicted in answers.items():
            scores = evaluate_v1_0.evaluate(dataset, predicted)
            same = sum(predicted[key] == reference[key] for key in reference) / len(reference)
            if name == "ONNX int8":
                int8_agreement.append(same)
            print(f"onnx_agreement[{name}]: identical to PyTorch fp32 on {100 * same:.2f}% of questions; "
                  f"EM {scores['exact_match']:.2f} / F1 {scores['f1']:.2f}")
    if len(int8_agreement) > 1:
        print(f"onnx_agreement[ONNX int8, {len(int8_agreement)} checkpoints]: identical on "
              f"{100 * min(int8_agreement):.2f}-{100 * max(int8_agreement):.2f}% of questions, mean "
              f"{100 * sum(int8_agreement) / len(int8_agreement):.2f}%; >= 97% on "
              f"{sum(share >= 0.97 for share in int8_agreement)} of {len(int8_agreement)}")


def _answers_in_pytorch_and_onnx(checkpoint: Path, questions: list[dict]) -> tuple[dict[str, dict[str, str]], dict]:
    """{reader: {question id: answer}} for `checkpoint` in PyTorch fp32, exported to ONNX fp32 and int8, and
    int8 one run at a time as the reader ran before; and the training run's windows, which all of them read."""
    import tempfile

    import export
    import onnx_reader
    from checkpoints import resolve_checkpoints
    from predict import Reader

    windows = export.training_windows(resolve_checkpoints([checkpoint])[0])
    with tempfile.TemporaryDirectory() as onnx_dir:
        export.main(["--checkpoint", str(checkpoint), "--output_dir", onnx_dir, "--format", "onnx",
                     "--quantize", "int8", "--quiet"])
        int8_file = Path(onnx_dir) / onnx_reader.INT8_MODEL_NAME
        readers = {"PyTorch fp32": Reader.load(checkpoint, no_cuda=True, **windows),
                   "ONNX fp32": Reader.load(onnx_dir, **windows), "ONNX int8": Reader.load(int8_file, **windows)}
        # The reader before runs went side by side: one run at a time on every core's thread.
        threads = onnx_reader.physical_cores()
        one_at_a_time = readers[f"ONNX int8, 1 run at a time on {threads} threads"] = Reader.load(int8_file, **windows)
        one_at_a_time.models[0].workers = 1
        one_at_a_time.models[0].session = onnx_reader.open_session(int8_file, threads=threads)
        answers = {name: {q["id"]: a["answer"] for q, a in zip(questions, r.answer_all(questions, progress=True))}
                   for name, r in readers.items()}
    return answers, windows

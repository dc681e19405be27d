"""The project's one benchmark script: speed and quality figures measured on real data.

Usage: python3 bench.py [--dev PATH] [--only NAME[,NAME...]] [--checkpoint RUN (for onnx_agreement)]
Each benchmark prints one or more `name: value` lines to stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Callable

ROOT = Path(__file__).resolve().parent
DEV_CANDIDATES = (ROOT / "data" / "KorQuAD_v1.0_dev.json",
                  ROOT.parent / "shared" / "data" / "KorQuAD_v1.0_dev.json")
VOCAB_FILE = ROOT / "data" / "ko_vocab_32k.txt"

BENCHMARKS: dict[str, Callable[[argparse.Namespace], None]] = {}


def benchmark(name: str):
    """Register a benchmark under `name` (run order is registration order)."""
    def register(fn):
        BENCHMARKS[name] = fn
        return fn
    return register


# --- tokenizer (issue 3) -----------------------------------------------------------------

def _dev_contexts(dev_file: Path) -> list[str]:
    """The distinct paragraph contexts of a KorQuAD file, in file order."""
    import json

    with open(dev_file, encoding="utf-8") as handle:
        articles = json.load(handle)["data"]
    contexts = (paragraph["context"] for article in articles for paragraph in article["paragraphs"])
    return list(dict.fromkeys(contexts))


@benchmark("tokenize")
def bench_tokenize(args: argparse.Namespace) -> None:
    """Mecab + WordPiece over every dev context: time, pieces, `##` and [UNK] shares."""
    import time

    from tokenization import BertTokenizer, make_analyzer

    contexts = _dev_contexts(args.dev)
    analyzer = make_analyzer("mecab")
    started = time.perf_counter()
    for context in contexts:
        analyzer.spans(context.lower())
    analyzer_seconds = time.perf_counter() - started

    tokenizer = BertTokenizer(VOCAB_FILE, analyzer="mecab")  # fresh: empty caches
    started = time.perf_counter()
    pieces = [piece for context in contexts for piece, _, _ in tokenizer.tokenize_with_offsets(context)]
    seconds = time.perf_counter() - started
    continuations = sum(piece.startswith("##") for piece in pieces)
    unknowns = sum(piece == "[UNK]" for piece in pieces)
    print(f"tokenize.contexts: {len(contexts)}")
    print(f"tokenize.analyzer_only_seconds: {analyzer_seconds:.2f}")
    print(f"tokenize.seconds: {seconds:.2f}")
    print(f"tokenize.pieces: {len(pieces)}")
    print(f"tokenize.continuation_share: {continuations / len(pieces):.2%}")
    print(f"tokenize.unk_share: {unknowns / len(pieces):.3%}")
    # The same vocab on whitespace words (the original baseline): how far from the pretraining pieces it is.
    whitespace_tokenizer = BertTokenizer(VOCAB_FILE, analyzer="none")
    spaced = [piece for context in contexts for piece in whitespace_tokenizer.tokenize(context)]
    print(f"tokenize.continuation_share[analyzer=none]: {sum(p.startswith('##') for p in spaced) / len(spaced):.2%}")



@benchmark("tokenize_long")
def bench_tokenize_long(args: argparse.Namespace) -> None:
    """Mecab + WordPiece over one long document (dev contexts joined, repeated to length): seconds
    per length, and the seconds per 100k characters, which stay flat when tokenization is linear."""
    import time

    from tokenization import BertTokenizer

    joined = " ".join(_dev_contexts(args.dev))
    for length in (58_000, 116_000, 232_000, 1_200_000):
        text = (joined * (length // len(joined) + 1))[:length]
        tokenizer = BertTokenizer(VOCAB_FILE, analyzer="mecab")  # fresh: empty caches
        started = time.perf_counter()
        pieces = tokenizer.tokenize_with_offsets(text)
        seconds = time.perf_counter() - started
        print(f"tokenize_long[{length} chars]: {seconds:.2f} s, {len(pieces)} pieces, "
              f"{seconds / length * 100_000:.2f} s per 100k chars")

# --- features, decoding, oracle (issue 4) ------------------------------------------------
# Dev set at 512 / 128 / 96 with Mecab; times are the median of 3 runs, each with a fresh tokenizer.
_KQ_SETTINGS = {"max_seq_length": 512, "doc_stride": 128, "max_query_length": 96}
_KQ_RUNS = 3
_kq_built: dict = {}


def _kq_tokenizer():
    from tokenization import BertTokenizer
    return BertTokenizer(str(VOCAB_FILE), analyzer="mecab", do_lower_case=True)


def _kq_median_seconds(run: Callable[[], object], prepare: Callable[[], object] = lambda: None) -> float:
    """Median wall time of `run(prepare())` over _KQ_RUNS runs; `prepare` is not timed."""
    import statistics
    import time
    seconds = []
    for _ in range(_KQ_RUNS):
        prepared = prepare()
        began = time.perf_counter()
        run(prepared)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def _kq_dev_features(dev: Path):
    """Training-mode dev examples and features (gold positions for the oracle), built once."""
    if dev not in _kq_built:
        from korquad_utils import convert_examples_to_features, read_squad_examples
        examples = read_squad_examples(dev, is_training=True)
        features = convert_examples_to_features(examples, _kq_tokenizer(), is_training=True, progress=False,
                                                **_KQ_SETTINGS)
        _kq_built[dev] = examples, features
    return _kq_built[dev]


@benchmark("features")
def bench_features(args: argparse.Namespace) -> None:
    """Reading + Mecab + WordPiece + windows for the dev set, in 1 and 2 processes (target: <= 4.0 s)."""
    from korquad_utils import convert_examples_to_features, read_squad_examples
    for workers in (1, 2):
        seconds = _kq_median_seconds(
            lambda tokenizer: convert_examples_to_features(read_squad_examples(args.dev, is_training=False),
                                                           tokenizer, is_training=False, num_workers=workers,
                                                           progress=False, **_KQ_SETTINGS),
            prepare=_kq_tokenizer)
        print(f"features_dev_s[num_workers={workers}]: {seconds:.2f}")


@benchmark("feature_cache")
def bench_feature_cache(args: argparse.Namespace) -> None:
    """load_or_build_features on the dev set when its cache is current (read + cache load + assembly)."""
    import tempfile
    from korquad_utils import load_or_build_features

    def load(tokenizer, cache_dir: str):
        return load_or_build_features(args.dev, tokenizer, is_training=False, cache_dir=cache_dir, progress=False,
                                      **_KQ_SETTINGS)
    with tempfile.TemporaryDirectory() as cache_dir:
        load(_kq_tokenizer(), cache_dir)
        seconds = _kq_median_seconds(lambda tokenizer: load(tokenizer, cache_dir), prepare=_kq_tokenizer)
    print(f"features_dev_s[cache_hit]: {seconds:.2f}")


@benchmark("decode")
def bench_decode(args: argparse.Namespace) -> None:
    """n-best decoding of all dev questions, from gold and from random logits (target: <= 1.0 s)."""
    import numpy as np
    from korquad_utils import decode_predictions, gold_logits
    examples, features = _kq_dev_features(args.dev)
    rng = np.random.default_rng(0)
    random_logits = [[rng.normal(size=n).astype(np.float32) for n in features.lengths.tolist()] for _ in range(2)]
    for name, (starts, ends) in (("gold", gold_logits(features)), ("random", random_logits)):
        seconds = _kq_median_seconds(lambda _: decode_predictions(examples, features, starts, ends))
        print(f"decode_dev_s[{name}_logits]: {seconds:.2f}")


@benchmark("oracle")
def bench_oracle(args: argparse.Namespace) -> None:
    """Gold positions as logits -> decode_predictions -> evaluate_v1_0 (target: EM >= 99.65, F1 >= 99.9)."""
    import json
    import evaluate_v1_0
    from korquad_utils import decode_predictions, gold_logits
    examples, features = _kq_dev_features(args.dev)
    predictions, _ = decode_predictions(examples, features, *gold_logits(features))
    with open(args.dev, encoding="utf-8") as file:
        scores = evaluate_v1_0.evaluate(json.load(file)["data"], predictions)
    print(f"oracle_dev_exact_match: {scores['exact_match']:.2f}")
    print(f"oracle_dev_f1: {scores['f1']:.2f}")


def add_unanswerable(dataset: dict, every: int = 5) -> dict:
    """A SQuAD 2.0-style copy of a KorQuAD file: every `every`-th question is also asked, as an
    unanswerable question (`is_impossible`, no answers, id + "_unanswerable"), on the first
    paragraph of the next article, whose text is about something else."""
    import copy
    articles = copy.deepcopy(dataset["data"])
    moved: list[list[dict]] = [[] for _ in articles]
    number = 0
    for index, article in enumerate(articles):
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                if number % every == 0:
                    moved[(index + 1) % len(articles)].append(
                        {"id": f"{qa['id']}_unanswerable", "question": qa["question"], "answers": [],
                         "is_impossible": True})
                number += 1
    for article, questions in zip(articles, moved):
        article["paragraphs"][0]["qas"].extend(questions)
    return {"version": "v2.0", "data": articles}


def oracle_v2_scores(dataset: dict, tokenizer, settings: dict) -> dict:
    """The version-2 oracle: gold spans, and [CLS] in windows labelled so, as logits -> null decoding
    at threshold 0 -> evaluate_v2_0 (with the score differences as no-answer probabilities)."""
    import json
    import tempfile

    import evaluate_v2_0
    from korquad_utils import (abstain, convert_examples_to_features, decode_predictions, gold_logits, null_odds,
                               read_squad_examples)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "v2.json"
        path.write_text(json.dumps(dataset, ensure_ascii=False), encoding="utf-8")
        examples = read_squad_examples(path, is_training=True, version_2_with_negative=True)
    features = convert_examples_to_features(examples, tokenizer, is_training=True, progress=False, **settings)
    starts, ends = gold_logits(features, null_label=True)
    predictions, nbest = decode_predictions(examples, features, starts, ends)
    odds = null_odds(examples, features.feature_example, starts, ends, nbest)
    return evaluate_v2_0.evaluate(dataset, abstain(predictions, odds, 0.0), odds)


@benchmark("oracle_v2")
def bench_oracle_v2(args: argparse.Namespace) -> None:
    """The oracle on the dev set with every 5th question added unanswerable on another article's
    paragraph (target: HasAns at the v1.0 oracle's ceiling, NoAns 100)."""
    import json
    with open(args.dev, encoding="utf-8") as file:
        dataset = add_unanswerable(json.load(file))
    scores = oracle_v2_scores(dataset, _kq_tokenizer(), _KQ_SETTINGS)
    for key in ("HasAns_total", "NoAns_total"):
        print(f"oracle_v2_dev_{key}: {scores[key]}")
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        print(f"oracle_v2_dev_{key}: {scores[key]:.2f}")


@benchmark("max_context")
def bench_max_context(args: argparse.Namespace) -> None:
    """Window ownership (max-context flags) of one very long context: time and peak memory (linear in pieces)."""
    import time
    import tracemalloc

    from korquad_utils import _doc_windows, _max_context_flags
    for num_pieces in (80_000, 230_000):
        windows = _doc_windows(num_pieces, 512 - 96 - 3, 128)  # the 512 / 128 / 96 settings
        tracemalloc.start()
        started = time.perf_counter()
        _max_context_flags(windows, num_pieces)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"max_context[{num_pieces} pieces, {len(windows)} windows]: {seconds:.3f} s, peak {peak / 2**20:.1f} MiB")


# --- training throughput (issue 6) -------------------------------------------------------

def _timed_training_steps(model, optimizer, batches) -> float:
    """Seconds for forward + backward + AdamW over `batches` (dicts of tensors), after one warm-up step."""
    import time

    def step(batch):
        loss = model(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return time.perf_counter() - start


@benchmark("train_throughput")
def bench_train_throughput(args: argparse.Namespace) -> None:
    """Features per second on real dev features: length-grouped dynamic padding vs padding to 512."""
    import torch
    from korquad_utils import convert_examples_to_features, make_length_grouped_batches, read_squad_examples
    from modeling import Config, QuestionAnswering
    from tokenization import BertTokenizer
    from train import collate_tensors

    torch.manual_seed(0)
    examples = read_squad_examples(str(args.dev), is_training=True)
    features = convert_examples_to_features(examples, BertTokenizer(str(VOCAB_FILE)), 512, 128, 96, is_training=True,
                                            progress=False)
    lengths = features.lengths
    batch_size, num_batches = 16, 6
    batches = make_length_grouped_batches(lengths, batch_size, shuffle=True, seed=0)[:num_batches]
    dynamic = [collate_tensors(b, features, is_training=True) for b in batches]
    padded = []
    for batch in dynamic:  # the same features, every batch padded to max_seq_length as the baseline did
        grow = 512 - batch["input_ids"].shape[1]
        padded.append({k: torch.nn.functional.pad(v, (0, grow)) if v.dim() == 2 else v for k, v in batch.items()})
    model = QuestionAnswering(Config.from_json_file(ROOT / "data" / "bert_small.json")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    n = sum(len(b) for b in batches)
    dynamic_rate = n / _timed_training_steps(model, optimizer, dynamic)
    padded_rate = n / _timed_training_steps(model, optimizer, padded)
    print(f"train_throughput: dev features mean length {sum(lengths) / len(lengths):.0f} pieces, "
          f"{num_batches} batches of {batch_size}, BERT-small, CPU x{torch.get_num_threads()} threads")
    print(f"train_throughput: length-grouped dynamic padding {dynamic_rate:.2f} features/s, "
          f"padded to 512 {padded_rate:.2f} features/s, speed-up {dynamic_rate / padded_rate:.2f}x")


@benchmark("step_vs_transformers")
def bench_step_vs_transformers(args: argparse.Namespace) -> None:
    """fwd+bwd step time of our model vs transformers' BertForQuestionAnswering (sdpa), same shape."""
    import time

    import torch
    from modeling import Config, QuestionAnswering
    try:
        import transformers
    except ImportError:
        print("step_vs_transformers: skipped (pip install transformers; it is needed for this benchmark only)")
        return
    config = Config.from_json_file(ROOT / "data" / "bert_small.json")
    theirs = transformers.BertForQuestionAnswering(transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ff_dim, hidden_act="gelu_new",
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        attn_implementation="sdpa")).train()
    ours = QuestionAnswering(config).train()
    batch, length, repeats = 4, 512, 3
    g = torch.Generator().manual_seed(0)
    inputs = dict(input_ids=torch.randint(5, config.vocab_size, (batch, length), generator=g),
                  token_type_ids=torch.zeros(batch, length, dtype=torch.long),
                  attention_mask=torch.ones(batch, length, dtype=torch.long),
                  start_positions=torch.randint(0, length, (batch,), generator=g),
                  end_positions=torch.randint(0, length, (batch,), generator=g))

    def seconds_per_step(model, loss_of) -> float:
        loss_of(model).backward()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            model.zero_grad(set_to_none=True)
            loss_of(model).backward()
        return (time.perf_counter() - start) / repeats

    # Interleave the two so that drifting machine load hurts both alike.
    ours_s = seconds_per_step(ours, lambda m: m(**inputs))
    theirs_s = seconds_per_step(theirs, lambda m: m(**inputs).loss)
    ours_s = min(ours_s, seconds_per_step(ours, lambda m: m(**inputs)))
    theirs_s = min(theirs_s, seconds_per_step(theirs, lambda m: m(**inputs).loss))
    print(f"step_vs_transformers: B={batch} L={length} fwd+bwd, CPU x{torch.get_num_threads()} threads: "
          f"ours {ours_s:.2f} s/step, transformers {transformers.__version__} sdpa {theirs_s:.2f} s/step "
          f"(ours/theirs {ours_s / theirs_s:.2f})")


# --- predict.py (issue 10) ---------------------------------------------------------------
_PREDICT_QUESTIONS = 64   # the first dev questions, with their real (shared) contexts


def _dev_questions(dev_file: Path, count: int) -> list[dict]:
    """The first `count` questions of a KorQuAD file as predict.py's input records."""
    from korquad_utils import read_squad_examples

    examples = read_squad_examples(dev_file, is_training=False)[:count]
    return [{"id": e.qas_id, "question": e.question_text, "context": e.context_text} for e in examples]


def _question_answering_pipeline(config):
    """transformers' `pipeline("question-answering")` on a randomly initialised BertForQuestionAnswering
    of the same size and our vocab: `answer(question, context)` and its tokenizer; None where the
    installed transformers has no such pipeline (5.x dropped it) or none is installed."""
    import torch

    try:
        import transformers
        from transformers.pipelines import SUPPORTED_TASKS
    except ImportError:
        return None
    if "question-answering" not in SUPPORTED_TASKS:
        return None
    import shutil
    import tempfile

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


def _write_random_run(run: Path, config) -> None:
    """A training run directory holding `config` and one randomly initialised fine-tuned checkpoint."""
    import json

    import torch

    from modeling import QuestionAnswering

    (run / "config.json").write_text(json.dumps(config.to_dict()))
    torch.manual_seed(0)
    torch.save(QuestionAnswering(config).state_dict(), run / "korquad_1.bin")


@benchmark("predict")
def bench_predict(args: argparse.Namespace) -> None:
    """predict.py on CPU with BERT-small (random weights: speed only): load time, answers per second
    one at a time and batched next to transformers' question-answering pipeline; PyTorch and the ONNX
    exports (fp32, int8) batched, each in a process of its own (goals: batched >= 2x, int8 ONNX >= 2x
    the pipeline, fp32 ONNX no slower than PyTorch); then process start to first answer and peak
    memory, ONNX vs PyTorch."""
    import tempfile
    import time

    import torch

    import export
    import onnx_reader
    from korquad_utils import SquadExample, convert_examples_to_features
    from modeling import Config
    from predict import Reader

    config = Config.from_json_file(ROOT / "data" / "bert_small.json")
    questions = _dev_questions(args.dev, _PREDICT_QUESTIONS)
    with tempfile.TemporaryDirectory() as run:
        _write_random_run(Path(run), config)
        started = time.perf_counter()
        reader = Reader.load(run, no_cuda=True, analyzer="mecab")
        load_seconds = time.perf_counter() - started
        readers = {"batched": reader, "batched_bf16": Reader.load(run, no_cuda=True, analyzer="mecab", bf16=True),
                   "batched_32": Reader.load(run, no_cuda=True, analyzer="mecab", batch_size=32)}
        onnx_dir = Path(run) / "onnx"
        onnx_dir.mkdir()
        windows = {name: getattr(reader, name) for name in export.DEFAULT_WINDOWS}
        export.export_onnx(reader.models[0], VOCAB_FILE, onnx_reader.ExportSettings(
            vocab_size=config.vocab_size, max_position_embeddings=config.max_position_embeddings, do_lower_case=True,
            analyzer="mecab", **windows), onnx_dir, quantize=True)
        threads = onnx_reader.physical_cores()
        own_process = _rates_in_own_processes({
            "PyTorch": ([run], {"no_cuda": True, "analyzer": "mecab"}),
            "ONNX fp32": ([str(onnx_dir)], {}), "ONNX int8": ([str(onnx_dir / onnx_reader.INT8_MODEL_NAME)], {})},
            questions)
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
    for name, rate in own_process.items():
        versus = f" ({rate / theirs:.2f}x the pipeline)" if theirs else ""
        if name != "PyTorch":
            versus += f" ({rate / own_process['PyTorch']:.2f}x PyTorch in its own process)"
        detail = f"{threads} threads, without torch" if name.startswith("ONNX") else "fp32"
        print(f"predict.answers_per_second[own process: {name} batched, batch {reader.batch_size}, {detail}]: "
              f"{rate:.2f}{versus}")
    if theirs is None:
        print("predict.answers_per_second[transformers_pipeline]: skipped (needs transformers 4.x, which has "
              "pipeline(\"question-answering\"))")
    else:
        import transformers

        their_pieces = [len(pipeline_tokenizer(q["question"], q["context"], truncation="only_second",
                                               max_length=reader.max_seq_length)["input_ids"]) for q in questions]
        print(f"predict.answers_per_second[transformers {transformers.__version__} pipeline, fp32, one at a time]: "
              f"{theirs:.2f} (its first windows: {sum(their_pieces) / len(their_pieces):.0f} pieces each)")
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


# Loads a Reader (argv: questions JSON, checkpoint, Reader.load keywords as JSON) and prints its best
# answers/s over three passes.
_RATE_PROBE = """
import json, sys, time
from predict import Reader
questions = json.loads(open(sys.argv[1], encoding="utf-8").read())
reader = Reader.load(sys.argv[2], **json.loads(sys.argv[3]))
reader.answer_all(questions[:8])
best = 0.0
for _ in range(3):
    started = time.perf_counter()
    reader.answer_all(questions)
    best = max(best, len(questions) / (time.perf_counter() - started))
print(best)
"""


def _rates_in_own_processes(cases: dict[str, tuple[list[str], dict]], questions: list[dict]) -> dict[str, float]:
    """Batched answers/s of each case (checkpoint, Reader.load keywords) in a process of its own, as it is
    deployed: ONNX Runtime's and torch's thread pools each spin-wait after their work, so two runtimes
    timed in one process slow each other down. ONNX runs where torch cannot be imported. Interleaved
    processes, the best of two rounds."""
    import json
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        without_torch = _without_torch_env(Path(work))
        (Path(work) / "questions.json").write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
        rates = dict.fromkeys(cases, 0.0)
        for _ in range(2):
            for name, ([checkpoint], keywords) in cases.items():
                env = without_torch if name.startswith("ONNX") else os.environ
                result = subprocess.run([sys.executable, "-c", _RATE_PROBE, str(Path(work) / "questions.json"),
                                         checkpoint, json.dumps(keywords)], capture_output=True, text=True, env=env,
                                        cwd=ROOT)
                if result.returncode:
                    raise RuntimeError(f"predict rate ({name}) failed: {result.stderr.strip()[-300:]}")
                rates[name] = max(rates[name], float(result.stdout.split()[-1]))
    return rates


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
    """A trained --checkpoint (run directory or file) on the dev questions, in PyTorch fp32 and exported to
    ONNX fp32 and int8: how often each ONNX answer equals PyTorch's, and EM/F1 of each (goals: fp32
    identical on nearly every question; int8 identical on >= 97%, EM within 1 point)."""
    import json
    import tempfile

    import evaluate_v1_0
    import export
    import onnx_reader
    from checkpoints import resolve_checkpoints
    from predict import Reader

    if args.checkpoint is None:
        print("onnx_agreement: skipped (pass --checkpoint with a trained run)")
        return
    questions = _dev_questions(args.dev, 10 ** 9)
    # All three read text in the training run's windows.
    windows = export.training_windows(resolve_checkpoints([args.checkpoint])[0])
    reader = Reader.load(args.checkpoint, no_cuda=True, **windows)
    with tempfile.TemporaryDirectory() as onnx_dir:
        export.main(["--checkpoint", str(args.checkpoint), "--output_dir", onnx_dir, "--format", "onnx",
                     "--quantize", "int8", "--quiet"])
        readers = {"PyTorch fp32": reader, "ONNX fp32": Reader.load(onnx_dir, **windows),
                   "ONNX int8": Reader.load(Path(onnx_dir) / onnx_reader.INT8_MODEL_NAME, **windows)}
        answers = {name: {q["id"]: a["answer"] for q, a in zip(questions, r.answer_all(questions, progress=True))}
                   for name, r in readers.items()}
    with open(args.dev, encoding="utf-8-sig") as handle:
        dataset = json.load(handle)["data"]
    reference = answers["PyTorch fp32"]
    print(f"onnx_agreement: {len(questions)} questions of {args.dev.name}, checkpoint {args.checkpoint}, "
          f"windows {windows}")
    for name, predicted in answers.items():
        scores = evaluate_v1_0.evaluate(dataset, predicted)
        same = sum(predicted[key] == reference[key] for key in reference) / len(reference)
        print(f"onnx_agreement[{name}]: identical to PyTorch fp32 on {100 * same:.2f}% of questions; "
              f"EM {scores['exact_match']:.2f} / F1 {scores['f1']:.2f}")


# --- serve.py (issue 20) -----------------------------------------------------------------
_SERVE_QUESTIONS = 64   # the first dev questions, with their real contexts
_SERVE_CLIENTS = 16


def _on_a_thread(work: Callable[[], object]) -> None:
    import threading

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


def _serve_rate(port: int, questions: list[dict]) -> float:
    """Answers/s of serve.py on 127.0.0.1:`port` with _SERVE_CLIENTS clients, each on one keep-alive
    connection, sending its share of `questions` one request at a time."""
    import http.client
    import json
    import time
    from concurrent.futures import ThreadPoolExecutor

    def client(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for question in questions[number::_SERVE_CLIENTS]:
            connection.request("POST", "/answer", json.dumps(question, ensure_ascii=False).encode("utf-8"),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"serve.py answered {response.status}: {response.read()[:200]!r}")
            response.read()
        connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(_SERVE_CLIENTS) as pool:
        list(pool.map(client, range(_SERVE_CLIENTS)))
    return len(questions) / (time.perf_counter() - started)


@benchmark("serve")
def bench_serve(args: argparse.Namespace) -> None:
    """serve.py under 16 concurrent loopback clients next to predict.py's offline batched rate, same model
    (BERT-small, random weights: speed only), same dev questions, same run (goal: serve >= 0.8x offline)."""
    import signal
    import subprocess
    import tempfile
    import time

    import torch

    from modeling import Config
    from predict import Reader

    config = Config.from_json_file(ROOT / "data" / "bert_small.json")
    questions = _dev_questions(args.dev, _SERVE_QUESTIONS)
    with tempfile.TemporaryDirectory() as run:
        _write_random_run(Path(run), config)
        reader = Reader.load(run, no_cuda=True, analyzer="mecab")
        server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"--checkpoint={run}", "--port=0",
                                   "--no_cuda", "--analyzer=mecab", "--quiet"], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE)
        try:
            line = server.stdout.readline()
            if "serving on" not in line:
                print(f"serve: skipped (serve.py did not start: {line.strip() or 'see its messages above'})")
                return
            port = int(line.rsplit(":", 1)[1])
            reader("워밍업?", questions[0]["context"])   # first-call costs not timed, here or there
            _serve_rate(port, questions[:_SERVE_CLIENTS])
            # Interleaved, so drifting machine load hurts all alike; the best of two runs each. The offline
            # rate is taken on the main thread (as predict.py runs) and on a worker thread (as serve.py runs
            # the model): on a CPU shared with other work, OpenMP runs slower from the main thread.
            rates = {"offline": 0.0, "offline_thread": 0.0, "served": 0.0}
            runs = {"offline": lambda: reader.answer_all(questions),
                    "offline_thread": lambda: _on_a_thread(lambda: reader.answer_all(questions)),
                    "served": lambda: _serve_rate(port, questions)}
            for _ in range(2):
                for name, run_once in runs.items():
                    started = time.perf_counter()
                    run_once()
                    rates[name] = max(rates[name], len(questions) / (time.perf_counter() - started))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    print(f"serve: {len(questions)} dev questions with their real contexts, BERT-small, CPU "
          f"x{torch.get_num_threads()} threads, serve.py defaults (--max_batch 32, --max_wait_ms 5)")
    offline, served = rates["offline"], rates["served"]
    print(f"serve.answers_per_second[predict.py offline, batched, batch {reader.batch_size}]: {offline:.2f}")
    print(f"serve.answers_per_second[predict.py offline, batched, on a worker thread]: {rates['offline_thread']:.2f}")
    print(f"serve.answers_per_second[serve.py, {_SERVE_CLIENTS} concurrent loopback clients, one question per "
          f"request]: {served:.2f} ({served / offline:.2f}x offline, {served / rates['offline_thread']:.2f}x "
          f"offline on a worker thread; goal >= 0.8x)")


# --- the compiled CUDA loop (issue 12) ---------------------------------------------------
_GPU_BATCH_SIZE = 16              # the recipe's
_GPU_TIMED_STEPS = 150
_RECIPE_TRAIN_QUESTIONS = 60_400  # KorQuAD v1.0 train
_RECIPE_EPOCHS = 4


def _gpu_training_rate(model, batches, device, amp_dtype, warm_up: int) -> tuple[float, float, float]:
    """(features/s, seconds of warm-up, peak GiB) of train.py's step: collation, pinned copies, autocast,
    AdamW (fused), clipping. The first `warm_up` batches are run untimed (compilation happens there)."""
    import time

    import torch
    from devices import autocast_context
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def step(collate):
        inputs = {k: v.pin_memory().to(device, non_blocking=True) for k, v in collate().items()}
        with autocast_context(device, amp_dtype):
            loss = model(**inputs)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    began = time.perf_counter()
    for collate in batches[:warm_up]:
        step(collate)
    torch.cuda.synchronize()
    warm_up_seconds = time.perf_counter() - began
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for collate in batches[warm_up:]:
        step(collate)
    torch.cuda.synchronize()
    rate = _GPU_BATCH_SIZE * (len(batches) - warm_up) / (time.perf_counter() - began)
    return rate, warm_up_seconds, torch.cuda.max_memory_allocated() / 2**30


@benchmark("gpu")
def bench_gpu(args: argparse.Namespace) -> None:
    """Training features/s at the recipe shape on a GPU: (a) padded to 512, (b) length-grouped, (c) (b) + --compile;
    peak memory, evaluation features/s and the projected time of the 4-epoch recipe (goals: (c) >= 2x (b), < 3 min)."""
    import time
    from functools import partial

    import torch
    if not torch.cuda.is_available():
        print("gpu: skipped (torch sees no CUDA GPU; run this on a GPU machine)")
        return
    from devices import compile_model, has_native_bf16, pick_device
    from scoring import predict_logits
    from korquad_utils import bucket_width, make_length_grouped_batches
    from modeling import Config, QuestionAnswering
    from train import collate_tensors

    device = pick_device(no_cuda=False)
    amp_dtype = torch.bfloat16 if has_native_bf16(device) else torch.float16
    compile_args = argparse.Namespace(compile=True, compile_bucket=64)
    examples, features = _kq_dev_features(args.dev)
    lengths = features.lengths
    batches = [b for b in make_length_grouped_batches(lengths, _GPU_BATCH_SIZE, shuffle=True, seed=0)
               if len(b) == _GPU_BATCH_SIZE]
    config = Config.from_json_file(ROOT / "data" / "bert_small.json")

    def fresh_model():
        torch.manual_seed(0)
        return QuestionAnswering(config).to(device).train()

    def collations(**padding):
        return [partial(collate_tensors, b, features, is_training=True, **padding) for b in batches]

    # (c) first sees one batch of every bucket in its warm-up, so that all compilation happens there.
    by_bucket = {}
    for index, batch in enumerate(batches):
        by_bucket.setdefault(bucket_width(max(lengths[i] for i in batch), 64, 512), index)
    warm_first = sorted(by_bucket.values())
    order = warm_first + [i for i in range(len(batches)) if i not in by_bucket.values()]
    batches = [batches[i] for i in order][:len(warm_first) + _GPU_TIMED_STEPS]

    print(f"gpu.name: {torch.cuda.get_device_name(device)} (torch {torch.__version__}, autocast {amp_dtype})")
    print(f"gpu.shape: BERT-small, batch {_GPU_BATCH_SIZE}, dev windows at 512/128/96, {_GPU_TIMED_STEPS} timed steps")
    rates = {}
    runs = {"padded_512_eager": (fresh_model(), dict(pad_to_multiple=512, max_width=512), 3),
            "length_grouped_eager": (fresh_model(), {}, 3)}
    for name, (model, padding, warm_up) in runs.items():
        rates[name], _, peak = _gpu_training_rate(model, collations(**padding), device, amp_dtype, warm_up)
        print(f"gpu.train_features_per_s[{name}]: {rates[name]:.0f} (peak {peak:.2f} GiB)")
        del model
    model = fresh_model()
    compiled = compile_model(model, compile_args, device, max_width=512)
    rates["length_grouped_compiled"], compile_seconds, peak = _gpu_training_rate(
        compiled, collations(pad_to_multiple=64, max_width=512, pad_rows_to=_GPU_BATCH_SIZE), device, amp_dtype,
        len(warm_first))
    print(f"gpu.train_features_per_s[length_grouped_compiled]: {rates['length_grouped_compiled']:.0f} "
          f"(peak {peak:.2f} GiB; compiling {len(warm_first)} buckets took {compile_seconds:.0f} s)")
    speed_up = rates["length_grouped_compiled"] / rates["length_grouped_eager"]
    print(f"gpu.compile_speed_up: {speed_up:.2f}x over length-grouped eager (goal: 2x)")

    for name, eval_model, multiple in (("eager", model, None), ("compiled", compiled, 64)):
        predict_logits(eval_model, features, 64, device, amp_dtype, show_progress=False,
                       pad_to_multiple=multiple)  # warm-up (and compilation of the evaluation graphs)
        began = time.perf_counter()
        predict_logits(eval_model, features, 64, device, amp_dtype, show_progress=False, pad_to_multiple=multiple)
        print(f"gpu.eval_features_per_s[{name}]: {len(features) / (time.perf_counter() - began):.0f}")

    windows = _RECIPE_TRAIN_QUESTIONS * len(features) / len(examples)
    for name, extra_seconds in (("length_grouped_eager", 0.0), ("length_grouped_compiled", compile_seconds)):
        minutes = (_RECIPE_EPOCHS * windows / rates[name] + extra_seconds) / 60
        print(f"gpu.recipe_minutes[{name}]: {minutes:.1f} ({_RECIPE_EPOCHS} epochs x {windows:,.0f} windows, "
              f"compilation included, tokenization and evaluation not; goal < 3)")


# --- pre-training (issue 22) -------------------------------------------------------------
_PRETRAIN_SHAPE = {"batch": 16, "max_seq_length": 128, "steps": 2}


def _dev_pair_maker(dev: Path, max_seq_length: int):
    """pretrain.py's training pairs over the dev contexts (Mecab + the real vocab), nothing held out."""
    import pretrain
    from tokenization import BertTokenizer

    tokenizer = BertTokenizer(VOCAB_FILE)
    tokens = pretrain.tokenize_corpus([dev], tokenizer, max_seq_length - 3, progress=False)
    args = pretrain.parse_args(["--train_files", str(dev), "--output_dir", "unused", "--held_out_share=0",
                                f"--max_seq_length={max_seq_length}"])
    return pretrain.build_pair_makers(args, tokenizer, tokens)[0]


@benchmark("pretrain")
def bench_pretrain(args: argparse.Namespace) -> None:
    """Masking statistics over the dev contexts; pre-training steps/s vs transformers' BertForPreTraining."""
    import time

    import numpy as np
    import torch
    import pretrain
    from modeling import BertForPreTraining, Config, pretraining_loss
    try:
        import transformers
    except ImportError:
        transformers = None

    shape = _PRETRAIN_SHAPE
    maker = _dev_pair_maker(args.dev, shape["max_seq_length"])
    candidates = masked = replaced_by_mask = swaps = 0
    spans = np.zeros(pretrain.MAX_NGRAM + 1)
    for index in range(len(maker.pairs)):
        rng = np.random.default_rng([0, index])
        ids, _, candidate, swapped = maker.pair(index, rng)
        output, positions, _, lengths = pretrain.mask_pieces(
            ids, candidate, maker.continuation, rng, mask_id=maker.mask_id, random_ids=maker.random_ids,
            max_predictions=maker.max_predictions)
        candidates += candidate.sum()
        masked += len(positions)
        replaced_by_mask += (output[positions] == maker.mask_id).sum()
        spans += np.bincount(lengths, minlength=len(spans))
        swaps += swapped
    shares = spans[1:] / spans.sum()
    print(f"pretrain.masking: {len(maker.pairs)} dev-context pairs of <= {shape['max_seq_length']} pieces: masked "
          f"{masked / candidates:.2%} of the pieces (goal 15% +- 0.5), n-grams 1/2/3 "
          f"{' / '.join(f'{s:.3f}' for s in shares)} (goal 0.545 / 0.273 / 0.182 +- 0.02), [MASK] "
          f"{replaced_by_mask / masked:.1%} (goal 80%), swapped {swaps / len(maker.pairs):.1%} (goal 50%)")

    config = Config.from_json_file(ROOT / "data" / "bert_small.json")
    torch.manual_seed(0)
    batches = [pretrain.collate([maker.example(i, 0) for i in range(start, start + shape["batch"])])
               for start in range(0, shape["batch"] * (shape["steps"] + 1), shape["batch"])]
    ours = BertForPreTraining(config).train()
    ours_optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-5)

    def our_step(batch) -> None:
        mlm, sop = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                        batch["masked_positions"])
        pretraining_loss(mlm, sop, batch["mlm_labels"], batch["sop_labels"]).backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad(set_to_none=True)

    def timed(step, prepared) -> float:
        step(prepared[0])  # warm-up
        start = time.perf_counter()
        for batch in prepared[1:]:
            step(batch)
        return len(prepared[1:]) / (time.perf_counter() - start)

    line = f"pretrain.steps_per_second: BERT-small, batch {shape['batch']} x {shape['max_seq_length']} pieces, CPU " \
           f"x{torch.get_num_threads()} threads, torch {torch.__version__}: ours (masked positions only, sdpa)"
    if transformers is None:
        print(f"{line} {timed(our_step, batches):.3f} (transformers not installed: no comparison)")
        return
    theirs = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_heads, intermediate_size=config.ff_dim, hidden_act="gelu_new",
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        attn_implementation="sdpa")).train()
    theirs_optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-5)
    their_batches = []
    for batch in batches:  # the same pairs and masks, as transformers' labels: -100 except at the masked pieces
        labels = torch.full_like(batch["input_ids"], -100)
        rows = torch.arange(len(labels))[:, None].expand_as(batch["masked_positions"])
        kept = batch["mlm_labels"] != -100
        labels[rows[kept], batch["masked_positions"][kept]] = batch["mlm_labels"][kept]
        their_batches.append({"input_ids": batch["input_ids"], "token_type_ids": batch["token_type_ids"],
                              "attention_mask": batch["attention_mask"], "labels": labels,
                              "next_sentence_label": batch["sop_labels"]})

    def their_step(batch) -> None:
        theirs(**batch).loss.backward()
        theirs_optimizer.step()
        theirs_optimizer.zero_grad(set_to_none=True)

    # Interleaved, best of two: drifting machine load hurts both alike.
    ours_rate, theirs_rate = timed(our_step, batches), timed(their_step, their_batches)
    ours_rate, theirs_rate = max(ours_rate, timed(our_step, batches)), max(theirs_rate, timed(their_step,
                                                                                              their_batches))
    print(f"{line} {ours_rate:.3f}, transformers {transformers.__version__} BertForPreTraining (sdpa, plain loop) "
          f"{theirs_rate:.3f}: {ours_rate / theirs_rate:.2f}x (goal >= 1.5x)")


@benchmark("pretrain_tiny")
def bench_pretrain_tiny(args: argparse.Namespace) -> None:
    """A tiny config from random initialisation on the dev contexts: held-out MLM accuracy against always
    guessing the most frequent piece; then train.py fine-tunes the result and eval.py scores it."""
    import json
    import subprocess
    import tempfile

    # Batches of 128 pairs at 1.5e-3: at 16 pairs (2e-3) or at 3e-3 the model stayed on the unigram plateau
    # (always the same few pieces) for the whole run, and transformers' BertForPreTraining did the same there.
    tiny = dict(act_fn="gelu", dropout_prob=0.0, ff_dim=512, hidden_size=128, initializer_range=0.02,
                max_position_embeddings=512, num_heads=4, num_hidden_layers=2, type_vocab_size=2, vocab_size=32000)
    steps, batch_size = 600, 128
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        (work / "tiny.json").write_text(json.dumps(tiny))

        def run(script: str, *flags: str) -> str:
            result = subprocess.run([sys.executable, str(ROOT / script), *flags, "--no_cuda", "--quiet"],
                                    capture_output=True, text=True, cwd=ROOT)
            if result.returncode:
                sys.exit(f"bench.py pretrain_tiny: {script} failed: {result.stderr.strip()[-500:]}")
            return result.stdout

        run("pretrain.py", "--train_files", str(args.dev), f"--output_dir={work / 'lm'}", "--checkpoint=none",
            f"--model_config={work / 'tiny.json'}", f"--cache_dir={work / 'cache'}", "--max_seq_length=64",
            f"--train_batch_size={batch_size}", "--learning_rate=1.5e-3", "--warmup_proportion=0.1",
            f"--max_steps={steps}", "--eval_steps=100", "--held_out_share=0.03", "--seed=0")
        log = [json.loads(line) for line in (work / "lm" / "training_log.jsonl").read_text().splitlines()]
        baseline = next(r for r in log if "baseline_mlm_accuracy" in r)
        evaluations = [r for r in log if "eval_mlm_accuracy" in r and r["step"] % 100 == 0]  # not the epoch ends
        curve = ", ".join(f"step {r['step']} {r['eval_mlm_accuracy']:.3f}" for r in evaluations)
        print(f"pretrain_tiny.mlm_accuracy: hidden 128 x 2 layers from random init, {steps} steps of {batch_size} x 64 "
              f"on the dev contexts (3% of them held out): {curve}; always {baseline['baseline_piece']!r}: "
              f"{baseline['baseline_mlm_accuracy']:.3f}; final SOP accuracy {evaluations[-1]['eval_sop_accuracy']:.3f}",
              flush=True)
        data = json.loads(args.dev.read_text(encoding="utf-8"))
        data["data"] = data["data"][:3]
        (work / "qa.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        window = ["--max_seq_length=128", "--doc_stride=64", "--max_query_length=32"]
        run("train.py", f"--checkpoint={work / 'lm'}", f"--output_dir={work / 'qa'}", f"--train_file={work / 'qa.json'}",
            *window, "--num_train_epochs=2", "--train_batch_size=16", "--learning_rate=1e-3",
            f"--cache_dir={work / 'cache'}")
        scores = json.loads(run("eval.py", f"--checkpoint={work / 'qa'}", f"--predict_file={work / 'qa.json'}",
                                *window, f"--output_dir={work / 'eval'}").strip().splitlines()[-1])
        print(f"pretrain_tiny.finetune: train.py --checkpoint <the pretrain run> 2 epochs on the first 3 dev articles, "
              f"eval.py on the same: exact_match {scores['exact_match']:.2f}, f1 {scores['f1']:.2f} (a pipeline check: "
              f"a model this small is not expected to answer)")

# --- pre-training against transformers (issue 29) ----------------------------------------
# The setting: a published-format tiny encoder, the dev set's first 800 contexts as the corpus.
_REFERENCE_TINY = dict(act_fn="gelu", dropout_prob=0.1, ff_dim=512, hidden_size=128, initializer_range=0.02,
                       max_position_embeddings=512, num_heads=4, num_hidden_layers=2, type_vocab_size=2,
                       vocab_size=32000)
_REFERENCE_CONTEXTS = 800
_REFERENCE_FLAGS = ["--max_seq_length=128", "--learning_rate=1e-3", "--held_out_share=0.03"]


def _reference_corpus(dev: Path, path: Path, contexts: int) -> None:
    """The first `contexts` distinct contexts of the dev set, as a KorQuAD JSON corpus."""
    import json

    paragraphs = [{"context": context, "qas": []} for context in _dev_contexts(dev)[:contexts]]
    path.write_text(json.dumps({"version": "subset", "data": [{"title": "corpus", "paragraphs": paragraphs}]},
                               ensure_ascii=False), encoding="utf-8")


def _transformers_pretraining(config, encoder_state: dict):
    """transformers' BertForPreTraining with our encoder's weights; its heads keep transformers' own init."""
    import transformers

    from modeling import config_to_transformers

    theirs = transformers.BertForPreTraining(transformers.BertConfig(
        **{**config_to_transformers(config), "architectures": ["BertForPreTraining"]}, attn_implementation="sdpa"))
    missing, unexpected = theirs.load_state_dict(encoder_state, strict=False)
    if unexpected or any(name.startswith("bert.") for name in missing):
        sys.exit(f"bench.py pretrain_reference: encoder names do not map: {unexpected or missing}")
    return theirs


def _their_outputs(theirs, batch: dict):
    """BertForPreTraining's own modules, with the vocabulary projection at the masked positions only
    (what its loss reads; the full projection would be 6x this tiny model's compute)."""
    sequence_output, pooled_output = theirs.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                 token_type_ids=batch["token_type_ids"], return_dict=False)[:2]
    index = batch["masked_positions"].unsqueeze(-1).expand(-1, -1, sequence_output.size(-1))
    return theirs.cls(sequence_output.gather(1, index), pooled_output)


def _their_loss(mlm_logits, sop_logits, batch: dict):
    """BertForPreTraining's loss as it computes it: cross-entropy over the labelled pieces plus over the pairs."""
    import torch

    loss = torch.nn.CrossEntropyLoss()
    return (loss(mlm_logits.reshape(-1, mlm_logits.size(-1)), batch["mlm_labels"].reshape(-1))
            + loss(sop_logits.reshape(-1, 2), batch["sop_labels"].reshape(-1)))


def _check_shortcut(theirs, batch: dict) -> None:
    """Exit unless the masked-positions shortcut gives BertForPreTraining's own loss (full logits, `labels`)."""
    import torch

    labels = torch.full_like(batch["input_ids"], -100)
    kept = batch["mlm_labels"] != -100
    rows = torch.arange(len(labels))[:, None].expand_as(kept)
    labels[rows[kept], batch["masked_positions"][kept]] = batch["mlm_labels"][kept]
    theirs.eval()
    with torch.no_grad():
        full = theirs(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                      attention_mask=batch["attention_mask"], labels=labels,
                      next_sentence_label=batch["sop_labels"]).loss
        shortcut = _their_loss(*_their_outputs(theirs, batch), batch)
    if abs(float(full - shortcut)) > 1e-4:
        sys.exit(f"bench.py pretrain_reference: masked-positions loss {float(shortcut)} != BertForPreTraining's "
                 f"{float(full)}")


def _held_out_scores(forward, batches: list[dict]) -> tuple[float, float]:
    """(masked-piece accuracy, MLM loss per masked piece) over fixed held-out batches, dropout off."""
    import torch

    correct = loss = count = 0.0
    with torch.no_grad():
        for batch in batches:
            mlm_logits, _ = forward(batch)
            kept = batch["mlm_labels"] != -100
            logits, labels = mlm_logits[kept].float(), batch["mlm_labels"][kept]
            correct += float((logits.argmax(-1) == labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += float(kept.sum())
    return correct / count, loss / count


@benchmark("pretrain_reference")
def bench_pretrain_reference(args: argparse.Namespace) -> None:
    """Ours against transformers' BertForPreTraining on the same masked batches, from the same encoder weights,
    with the same AdamW, schedule and clipping: held-out masked-piece accuracy and MLM loss along the way."""
    import statistics
    import tempfile

    import torch

    import pretrain
    from korquad_utils import make_length_grouped_batches
    from long_run import build_optimizer, linear_warmup_decay, step_seed
    from modeling import Config, QuestionAnswering, to_transformers_pretraining_state
    from tokenization import BertTokenizer

    if args.steps < 3 or args.seeds < 1 or min(args.batch_sizes) < 1:
        sys.exit("bench.py pretrain_reference: --steps must be at least 3 (held-out scores at a third, two thirds "
                 "and the end), --seeds and --batch_sizes at least 1")
    steps, checkpoints = args.steps, sorted({args.steps * k // 3 for k in (1, 2, 3)})
    config = Config(**_REFERENCE_TINY)
    results: dict[tuple, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        corpus = work / "corpus.json"
        _reference_corpus(args.dev, corpus, _REFERENCE_CONTEXTS)
        tokenizer = BertTokenizer(VOCAB_FILE)
        tokens = pretrain.tokenize_corpus([corpus], tokenizer, 128 - 3, progress=False)
        for batch_size in args.batch_sizes:
            for seed in range(args.seeds):
                flags = pretrain.parse_args(["--train_files", str(corpus), "--output_dir", "unused",
                                             "--checkpoint", str(work / f"encoder{seed}.bin"), *_REFERENCE_FLAGS,
                                             f"--train_batch_size={batch_size}", f"--max_steps={steps}",
                                             f"--seed={seed}"])
                torch.manual_seed(1000 + seed)  # the published-format encoder: bare names, no heads
                torch.save(QuestionAnswering(config).bert.state_dict(), flags.checkpoint)
                train, held_out = pretrain.build_pair_makers(flags, tokenizer, tokens)
                held_out_batches = [pretrain.collate([held_out.example(i, pretrain.EVAL_EPOCH) for i in b])
                                    for b in make_length_grouped_batches(held_out.lengths(), 64, shuffle=False)]
                if seed == 0 and batch_size == args.batch_sizes[0]:
                    piece, baseline = pretrain.most_frequent_piece_accuracy(train, held_out, 10 ** 9)
                    print(f"pretrain_reference.baseline: {len(train.pairs)} training and {len(held_out.pairs)} "
                          f"held-out pairs; always {tokenizer.ids_to_tokens[piece]!r}: {baseline:.4f}", flush=True)
                ours = pretrain.build_model(flags, config)  # heads fresh, by our initialisation
                torch.manual_seed(2000 + seed)
                encoder = {k: v for k, v in to_transformers_pretraining_state(ours).items() if k.startswith("bert.")}
                theirs = _transformers_pretraining(config, encoder)
                models = {"ours": (ours, lambda b: ours(b["input_ids"], b["token_type_ids"], b["attention_mask"],
                                                        b["masked_positions"]), pretraining_loss_of_batch),
                          "transformers": (theirs, lambda b: _their_outputs(theirs, b), _their_loss)}
                optimizers = {name: build_optimizer(model, flags, torch.device("cpu"))
                              for name, (model, _, _) in models.items()}
                schedules = {name: linear_warmup_decay(optimizer, int(steps * flags.warmup_proportion), steps)
                             for name, optimizer in optimizers.items()}
                _check_shortcut(theirs, held_out_batches[0])
                order = []
                for epoch in range(steps):
                    order += [(epoch, b) for b in make_length_grouped_batches(
                        train.lengths(), batch_size, shuffle=True, seed=seed + epoch) if len(b) == batch_size]
                    if len(order) >= steps:
                        break
                for step, (epoch, indices) in enumerate(order[:steps], 1):
                    batch = pretrain.collate([train.example(i, epoch) for i in indices])
                    for name, (model, forward, loss_of) in models.items():
                        model.train()
                        torch.manual_seed(step_seed(seed, epoch, step, 0))
                        loss = loss_of(*forward(batch), batch)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(model.parameters(), flags.max_grad_norm)
                        optimizers[name].step()
                        optimizers[name].zero_grad(set_to_none=True)
                        schedules[name].step()
                        if step in checkpoints:
                            model.eval()
                            results.setdefault((batch_size, step, name), []).append(
                                _held_out_scores(forward, held_out_batches))
                    if step in checkpoints:
                        scores = {name: results[(batch_size, step, name)][-1] for name in models}
                        print(f"pretrain_reference.seed: batch {batch_size} seed {seed} step {step}: " + ", ".join(
                            f"{name} accuracy {a:.4f} loss {l:.3f}" for name, (a, l) in scores.items()), flush=True)

    def spread(values: list[float], digits: int) -> str:
        return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    for batch_size in args.batch_sizes:
        for step in checkpoints:
            ours_runs, their_runs = results[(batch_size, step, "ours")], results[(batch_size, step, "transformers")]
            cells, inside = [], []
            for column, digits in ((0, 4), (1, 3)):
                mine, theirs_ = [r[column] for r in ours_runs], [r[column] for r in their_runs]
                cells.append(f"{('accuracy', 'MLM loss')[column]} ours {spread(mine, digits)} transformers "
                             f"{spread(theirs_, digits)}")
                inside.append(min(theirs_) <= statistics.mean(mine) <= max(theirs_)
                              or min(mine) <= statistics.mean(theirs_) <= max(mine))
            print(f"pretrain_reference: batch {batch_size} x 128, lr 1e-3, step {step}/{steps}, {len(ours_runs)} "
                  f"seeds, mean (min-max): {'; '.join(cells)}; a mean inside the other's range: "
                  f"{'yes' if all(inside) else 'NO'}", flush=True)


def pretraining_loss_of_batch(mlm_logits, sop_logits, batch: dict):
    """Our pretraining_loss on a collated batch."""
    from modeling import pretraining_loss

    return pretraining_loss(mlm_logits, sop_logits, batch["mlm_labels"], batch["sop_labels"])


# --- training data at scale (issue 18) ---------------------------------------------------
# The dev set repeated 11 times, each copy's contexts made distinct: about KorQuAD's 60,407 training
# questions. train.py runs a tiny model for a few steps, so that the data path is what is measured.
_SCALE_COPIES = 11
_SCALE_TINY_CONFIG = {"act_fn": "gelu", "dropout_prob": 0.0, "ff_dim": 128, "hidden_size": 64,
                      "initializer_range": 0.02, "max_position_embeddings": 512, "num_heads": 4,
                      "num_hidden_layers": 2, "type_vocab_size": 2, "vocab_size": 32000}


def _write_scaled_copy(dev: Path, path: Path, copies: int) -> int:
    """`copies` copies of `dev` in one file, each context ending in its copy's number (answer offsets
    stay valid) and each question id suffixed: returns the number of questions."""
    import json

    with open(dev, encoding="utf-8") as file:
        dataset = json.load(file)
    articles = []
    for copy in range(copies):
        for article in dataset["data"]:
            paragraphs = [{"context": f"{p['context']} (사본 {copy})",
                           "qas": [{**qa, "id": f"{qa['id']}-{copy}"} for qa in p["qas"]]}
                          for p in article["paragraphs"]]
            articles.append({"title": f"{article['title']} {copy}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": dataset["version"], "data": articles}, ensure_ascii=False),
                    encoding="utf-8")
    return sum(len(p["qas"]) for a in articles for p in a["paragraphs"])


def _process_memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a live process in bytes, from /proc; (0, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as file:
            values = dict(line.split()[:2] for line in file if line.startswith(("Rss:", "Pss:")))
        return int(values["Rss:"]) * 1024, int(values["Pss:"]) * 1024
    except (OSError, KeyError, ValueError):
        return 0, 0


def _descendants(pid: int) -> list[int]:
    import os
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as file:
                    parent = int(file.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def _measured_run(command: list[str], ranks_named: str, cwd: Path) -> dict[str, float]:
    """Run `command`, sampling every 50 ms the processes of its tree whose command line holds
    `ranks_named`: wall seconds, the highest single RSS, and the highest PSS summed over them
    (shared pages, such as a memory-mapped feature table, counted once in all)."""
    import subprocess
    import threading
    import time

    began = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"rss": 0, "pss_total": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pids = [process.pid] + _descendants(process.pid)
            ranks = []
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as file:
                        cmdline = file.read()
                except OSError:
                    continue
                if ranks_named.encode() in cmdline and b"torch.distributed.run" not in cmdline:  # not the launcher
                    ranks.append(pid)
            memory = [_process_memory(pid) for pid in ranks]
            peaks["rss"] = max([peaks["rss"]] + [rss for rss, _ in memory])
            peaks["pss_total"] = max(peaks["pss_total"], sum(pss for _, pss in memory))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed ({process.returncode}): {stderr.strip()[-2000:]}")
    return {"seconds": time.perf_counter() - began, "rss_mb": peaks["rss"] / 2**20,
            "pss_total_mb": peaks["pss_total"] / 2**20}


def _scale_runs(code: Path, work: Path, big: Path, sample: Path, label: str, torchrun: bool) -> None:
    """The figures of train_scale for the train.py in `code`."""
    import shutil
    import sys

    config = work / "tiny.json"
    window = ["--max_seq_length=512", "--doc_stride=128", "--max_query_length=96"]
    steps = ["--max_steps=3"] if "--max_steps" in (code / "train.py").read_text(encoding="utf-8") else \
        ["--num_train_epochs=0.001"]  # revisions before --max_steps: a sliver of an epoch

    def train(train_file: Path, name: str, launcher: list[str]) -> dict[str, float]:
        output = work / f"{label}-{name}"
        shutil.rmtree(output, ignore_errors=True)
        return _measured_run(launcher + [str(code / "train.py"), f"--train_file={train_file}",
                                         f"--output_dir={output}", "--checkpoint=none", f"--model_config={config}",
                                         f"--cache_dir={work / (label + '-cache')}", "--train_batch_size=8",
                                         "--no_cuda", "--quiet", *window, *steps], "train.py", code)

    python = [sys.executable]
    build = train(big, "build", python)
    hit = train(big, "hit", python)
    train(sample, "sample-warm", python)  # builds the sample's cache: the next run is a hit as well
    small = train(sample, "sample", python)
    print(f"train_scale[{label}].build: {build['seconds']:.1f} s, peak RSS {build['rss_mb']:.0f} MB")
    print(f"train_scale[{label}].cache_hit: {hit['seconds']:.1f} s, peak RSS {hit['rss_mb']:.0f} MB "
          f"(PSS {hit['pss_total_mb']:.0f} MB); the 56-question sample: {small['seconds']:.1f} s, "
          f"peak RSS {small['rss_mb']:.0f} MB; time ratio {hit['seconds'] / small['seconds']:.2f}x")
    if torchrun:
        launcher = python + ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533"]
        two = train(big, "torchrun", launcher)
        print(f"train_scale[{label}].torchrun_2_ranks: {two['seconds']:.1f} s, PSS of both ranks "
              f"{two['pss_total_mb']:.0f} MB = {two['pss_total_mb'] / hit['pss_total_mb']:.2f}x one process's "
              f"{hit['pss_total_mb']:.0f} MB (peak RSS of a rank {two['rss_mb']:.0f} MB)")


@benchmark("train_scale")
def bench_train_scale(args: argparse.Namespace) -> None:
    """train.py on the dev set x11 (63,514 questions, 512/128/96, tiny model, 3 steps): feature build time,
    cache-hit run time and peak memory, one process and two torchrun ranks (gloo); with --compare_rev REV,
    the same figures for the train.py of that git revision, run side by side (targets: build peak <= 800 MB,
    cache hit <= 400 MB above a bare `import torch` and <= 1.5x the sample run's time, table load <= 1 s,
    two ranks <= 1.3x one)."""
    import subprocess
    import sys
    import tempfile
    import time

    from korquad_utils import load_or_build_features, read_squad_examples
    from tokenization import BertTokenizer

    with tempfile.TemporaryDirectory() as temp:
        work = Path(temp)
        big = work / "korquad_dev_x11.json"
        questions = _write_scaled_copy(args.dev, big, _SCALE_COPIES)
        (work / "tiny.json").write_text(__import__("json").dumps(_SCALE_TINY_CONFIG))
        print(f"train_scale: {questions} questions ({big.stat().st_size / 2**20:.0f} MB of JSON)")
        bare_python = [sys.executable, "-c", "import torch, time; time.sleep(1)"]
        bare = _measured_run(bare_python, "import torch", ROOT)
        bare_two = _measured_run(["bash", "-c", f"{' '.join(map(repr, bare_python))} & " * 2 + "wait"], "import torch",
                                 ROOT)
        print(f"train_scale.bare_import_torch: peak RSS {bare['rss_mb']:.0f} MB, PSS {bare['pss_total_mb']:.0f} MB; "
              f"two at once: PSS {bare_two['pss_total_mb']:.0f} MB = {bare_two['pss_total_mb'] / bare['pss_total_mb']:.2f}x "
              f"(the floor of the two-rank ratio: what each process holds privately before any data)")
        _scale_runs(ROOT, work, big, ROOT / "data" / "korquad_sample.json", "this", torchrun=True)

        tokenizer = BertTokenizer(str(VOCAB_FILE), analyzer="mecab")
        began = time.perf_counter()
        read_squad_examples(big, is_training=True)
        read_seconds = time.perf_counter() - began
        began = time.perf_counter()
        _, table = load_or_build_features(big, tokenizer, 512, 128, 96, is_training=True,
                                          cache_dir=work / "this-cache", progress=False)
        load_seconds = time.perf_counter() - began
        print(f"train_scale.cache_load: {len(table)} windows, table {table.nbytes / 2**20:.0f} MB mapped; "
              f"load_or_build_features {load_seconds:.2f} s of which reading the JSON {read_seconds:.2f} s, "
              f"the table {load_seconds - read_seconds:.2f} s")
        if args.compare_rev:
            old = work / "old"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.compare_rev], check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            (old / "data" / "ko_vocab_32k.txt").write_bytes(VOCAB_FILE.read_bytes())
            _scale_runs(old, work, big, old / "data" / "korquad_sample.json", args.compare_rev, torchrun=True)


# --- distillation (issue 19) -------------------------------------------------------------

def _char_targets(examples, start_chars: list, start_probs: list, end_chars: list, end_probs: list):
    """TeacherTargets over `examples` from per-question lists of characters and their probabilities."""
    import numpy as np
    from korquad_utils import TeacherTargets

    def flat(per_question: list, dtype) -> np.ndarray:
        return np.concatenate([np.asarray(x, dtype) for x in per_question] or [np.zeros(0, dtype)])
    def bounds(per_question: list) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(c) for c in per_question])]).astype(np.int64)
    return TeacherTargets("bench", "", np.array([ex.qas_id for ex in examples]),
                          bounds(start_chars), flat(start_chars, np.int32), flat(start_probs, np.float32),
                          bounds(end_chars), flat(end_chars, np.int32), flat(end_probs, np.float32))


def oracle_targets_logits(examples, features, chunk: int = 256):
    """The gold "oracle teacher": all mass on each answer's first and last character, projected onto
    `features`' windows (train.py's projection), as logits: log of the projected probabilities."""
    import numpy as np
    from korquad_utils import teacher_batch_targets
    ones = [[1.0]] * len(examples)
    targets = _char_targets(examples, [[ex.start_char] for ex in examples], ones,
                            [[ex.end_char - 1] for ex in examples], ones)
    starts, ends = [], []
    for begin in range(0, len(features), chunk):
        batch = range(begin, min(begin + chunk, len(features)))
        offsets = np.full((len(batch), int(features.lengths[batch].max()), 2), -1)
        for row, index in enumerate(batch):
            offsets[row, :features.lengths[index]] = features.token_offsets(index)
        start, end = teacher_batch_targets(targets, features.example_index[batch], offsets)
        for row, index in enumerate(batch):
            n = features.lengths[index]
            starts.append(np.log(np.maximum(start[row, :n], 1e-9)))
            ends.append(np.log(np.maximum(end[row, :n], 1e-9)))
    return starts, ends


def exact_match_f1(examples, predictions: dict[str, str]) -> dict[str, float]:
    """The official v1.0 scores of `predictions` against the answers the examples carry."""
    import evaluate_v1_0
    dataset = [{"paragraphs": [{"qas": [{"id": ex.qas_id, "answers": ex.answers} for ex in examples]}]}]
    return evaluate_v1_0.evaluate(dataset, {ex.qas_id: predictions[ex.qas_id] for ex in examples})


@benchmark("distill")
def bench_distill(args: argparse.Namespace) -> None:
    """Gold characters as a teacher projected onto Mecab windows (target: the oracle row within 0.1), and a
    distillation step vs a plain one on the same batches (target: <= 10% more time)."""
    import statistics
    import time
    from functools import partial

    import numpy as np
    import torch
    from devices import autocast_context, has_native_bf16
    from korquad_utils import decode_predictions, make_length_grouped_batches
    from modeling import Config, QuestionAnswering
    from train import TeacherBatches, collate_tensors

    examples, features = _kq_dev_features(args.dev)
    predictions, _ = decode_predictions(examples, features, *oracle_targets_logits(examples, features))
    with open(args.dev, encoding="utf-8") as file:
        import evaluate_v1_0
        import json
        scores = evaluate_v1_0.evaluate(json.load(file)["data"], predictions)
    print(f"distill.oracle_dev_exact_match[gold characters -> Mecab windows]: {scores['exact_match']:.2f}")
    print(f"distill.oracle_dev_f1[gold characters -> Mecab windows]: {scores['f1']:.2f}")

    # A teacher as sparse as a real one: 100 characters per question for the start and for the end.
    rng = np.random.default_rng(0)
    chars = [np.sort(rng.choice(len(ex.context_text), min(100, len(ex.context_text)), replace=False))
             for ex in examples]
    start_probs, end_probs = ([rng.dirichlet(np.ones(len(c))) for c in chars] for _ in range(2))
    targets = _char_targets(examples, chars, start_probs, chars, end_probs)
    teacher = TeacherBatches(targets, features, features.example_index, 0.5, 2.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = (torch.bfloat16 if has_native_bf16(device) else torch.float16) if device.type == "cuda" else None
    torch.manual_seed(0)
    model = QuestionAnswering(Config.from_json_file(ROOT / "data" / "bert_small.json")).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch_size = 16
    num_steps = 40 if device.type == "cuda" else 4
    batches = make_length_grouped_batches(features.lengths, batch_size, shuffle=True,
                                          seed=0)[:num_steps + 1]
    plain_collate = partial(collate_tensors, features=features, is_training=True)
    distill_collate = partial(teacher.collate, collate=plain_collate)
    kwargs = {"distill_alpha": 0.5, "distill_temperature": 2.0}

    def step(batch: list[int], distilled: bool) -> float:
        """One training step from collation to the optimizer, as train.py runs it (wall seconds)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        tensors = distill_collate(batch) if distilled else plain_collate(batch)
        tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        with autocast_context(device, amp_dtype):
            loss = model(**tensors, **(kwargs if distilled else {}))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    step(batches[0], False)
    step(batches[0], True)
    plain, distilled = [], []
    for batch in batches[1:]:  # side by side: each batch once each way
        plain.append(step(batch, False))
        distilled.append(step(batch, True))
    collate_seconds = []
    for batch in batches[1:]:
        began = time.perf_counter()
        distill_collate(batch)
        collate_seconds.append(time.perf_counter() - began)
    plain_s, distill_s = statistics.median(plain), statistics.median(distilled)
    where = f"{torch.cuda.get_device_name(device)} autocast {amp_dtype}" if device.type == "cuda" else \
        f"CPU x{torch.get_num_threads()} threads"
    print(f"distill.step_s: plain {plain_s:.4f}, distillation {distill_s:.4f}, ratio {distill_s / plain_s:.3f} "
          f"(median of {len(plain)} batches of {batch_size} dev windows, BERT-small, {where}, torch "
          f"{torch.__version__}; target <= 1.10)")
    print(f"distill.collate_with_targets_s: {statistics.median(collate_seconds):.4f} "
          f"(100 characters per question and side)")


# --- KorQuAD 2.x (issue 31) ---------------------------------------------------------------

# Published KorQuAD 2.0 sizes (korquad.github.io; read from memory, the site is not reachable here).
KORQUAD2_TRAIN = {"documents": 47_957, "questions": 83_486}


def _korquad2_generator():
    sys.path.insert(0, str(ROOT / "scripts"))
    import make_korquad2_sample
    return make_korquad2_sample


def _korquad2_pages(dev: Path, num_pages: int, directory: Path) -> Path:
    """`num_pages` generated KorQuAD 2.x pages from the dev set's articles, in the split-file layout."""
    import json
    generator = _korquad2_generator()
    source = json.loads(dev.read_text(encoding="utf-8"))
    generator.write_split(generator.make_dataset(source, num_pages), directory, train_files=2)
    return directory


def _long_page(dev: Path, min_text_chars: int) -> dict:
    """One generated page whose text is at least `min_text_chars` long: dev articles merged into one."""
    import json
    import random
    generator = _korquad2_generator()
    articles = json.loads(dev.read_text(encoding="utf-8"))["data"]
    merged = {"title": "merged", "paragraphs": []}
    for article in articles:
        merged["paragraphs"] += article["paragraphs"]
        if sum(len(paragraph["context"]) for paragraph in merged["paragraphs"]) >= min_text_chars:
            break
    return generator.make_page(merged, 0, random.Random(0))


@benchmark("korquad2")
def bench_korquad2(args: argparse.Namespace) -> None:
    """KorQuAD 2.x pages generated from the dev set: windows, features time, peak memory, gold-span oracle."""
    import json
    import tempfile
    import tracemalloc
    import numpy as np
    import korquad2
    from korquad_utils import convert_examples_to_features, decode_predictions, gold_logits
    tokenizer = _kq_tokenizer()
    settings = {"max_seq_length": 384, "doc_stride": 128, "max_query_length": 64}
    print(f"korquad2_settings: max_seq_length={settings['max_seq_length']} doc_stride={settings['doc_stride']}")
    with tempfile.TemporaryDirectory() as work:
        memory, windows = {}, {}
        for num_pages in (10, 100):
            directory = _korquad2_pages(args.dev, num_pages, Path(work) / f"pages_{num_pages}")
            tracemalloc.start()
            examples = korquad2.read_examples(directory, is_training=True)
            features = convert_examples_to_features(examples, tokenizer, is_training=True, progress=False,
                                                    **settings)
            memory[num_pages] = tracemalloc.get_traced_memory()[1]
            windows[num_pages] = len(features)
            tracemalloc.stop()
            pages = {id(example.page): len(example.page.text) for example in examples}
            print(f"korquad2_pages[{num_pages}]: {len(pages)} pages, {len(examples)} questions, "
                  f"{sum(pages.values()) / len(pages):.0f} text chars per page")
            print(f"korquad2_features_per_page[{num_pages}]: {len(features) / len(pages):.1f} (each question "
                  f"on the page has its own windows)")
            print(f"korquad2_windows_per_question[{num_pages}]: {len(features) / len(examples):.1f}")
            print(f"korquad2_peak_mib[{num_pages}]: {memory[num_pages] / 2**20:.1f}")
            if num_pages == 10:
                predictions, nbest = decode_predictions(examples, features, *gold_logits(features),
                                                        max_answer_length=4096)
                html = korquad2.html_predictions(examples, predictions, nbest)
                decoded = korquad2.score(directory, html)
                mapped = korquad2.score(directory, korquad2.oracle_predictions(examples))
                print(f"korquad2_oracle_map[{num_pages}]: EM {mapped['exact_match']:.2f} F1 {mapped['f1']:.2f}")
                print(f"korquad2_oracle_decoded[{num_pages}]: EM {decoded['exact_match']:.2f} "
                      f"F1 {decoded['f1']:.2f}")
                # A training window holds a question's answer only when both its ends fit in it.
                held = np.unique(features.feature_example[features.feature_positions[:, 0] > 0])
                print(f"korquad2_answers_longer_than_a_window[{num_pages}]: {len(examples) - len(held)} of "
                      f"{len(examples)} (no window holds them whole, so no span model can answer them)")
                # Decoding starts an answer only where its first piece has the most context (as for v1); a long
                # answer whose first piece is best read in a window that cuts its end off comes back shortened.
                held = set(held.tolist())
                shortened = sum(
                    1 for number, example in enumerate(examples)
                    if number in held and html[example.qas_id] != example.html_answer
                    and nbest[example.qas_id][0]["end"] == example.end_char
                    and nbest[example.qas_id][0]["start"] > example.start_char)
                print(f"korquad2_answers_shortened_by_the_max_context_rule[{num_pages}]: {shortened} of "
                      f"{len(examples)}")
        # The feature table grows with windows; a generated page holds all its article's ~45 questions where
        # KorQuAD 2.0 has under 2 per page on far longer pages, so scale per window, not per page.
        per_window = (memory[100] - memory[10]) / (windows[100] - windows[10])
        print(f"korquad2_bytes_per_window: {per_window:.0f} (slope of peak memory from 10 to 100 pages)")

        page = _long_page(args.dev, 50_000)
        path = Path(work) / "long.json"
        path.write_text(json.dumps({"version": "KorQuAD_2.1_sample", "data": [page]}, ensure_ascii=False),
                        encoding="utf-8")
        question = korquad2.read_examples(path, is_training=False)[:1]

        def features_of_page(fresh_tokenizer):
            examples = korquad2.read_examples(path, is_training=False)[:1]
            return convert_examples_to_features(examples, fresh_tokenizer, is_training=False, progress=False, **settings)
        page_windows = len(features_of_page(_kq_tokenizer()))
        seconds = _kq_median_seconds(features_of_page, prepare=_kq_tokenizer)
        print(f"korquad2_long_page: {len(question[0].context_text)} text chars, {len(page['context'])} HTML chars, "
              f"{page_windows} windows per question")
        print(f"korquad2_long_page_features_s: {seconds:.2f} (HTML reading + Mecab + WordPiece + windows, "
              f"fresh tokenizer)")
        estimate = KORQUAD2_TRAIN["questions"] * page_windows * per_window
        print(f"korquad2_train_features_gib_estimate: {estimate / 2**30:.1f} ({KORQUAD2_TRAIN['questions']} "
              f"questions, each on a page like this one; the feature cache memory-maps it)")


# Benchmarks on made-up inputs, which run without the dev set.
WITHOUT_DEV = {"max_context"}


def print_provenance() -> None:
    """What every figure depends on, printed once before the benchmarks (docs/measurements.md records it per row)."""
    import datetime
    import importlib.metadata
    import os
    import platform

    cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").is_file() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():  # the first core's lines are enough: every core has the same model
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or "unknown"
    cpu_flags = set(fields.get("flags", "").split())
    # The instruction sets that decide matmul speed: AVX2, AVX-512, VNNI (int8), AMX (bf16/int8 tiles).
    speed_flags = [flag for flag in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                   if flag in cpu_flags]
    versions = []
    for package in ("torch", "onnxruntime", "transformers", "numpy"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"provenance.date: {datetime.date.today().isoformat()}")
    print(f"provenance.cpu: {model}, {os.cpu_count()} logical cores, "
          f"flags: {' '.join(speed_flags) or 'none of avx2/avx512/amx'}")
    print(f"provenance.versions: {', '.join(versions)}, python {platform.python_version()}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torch
        torch_threads = str(torch.get_num_threads())
    except ImportError:
        torch_threads = "no torch"
    print(f"provenance.threads: torch {torch_threads}, OMP_NUM_THREADS={threads}, usable cores {usable}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path, default=None,
                        help="KorQuAD v1.0 dev JSON (if not given: data/ or ../shared/data/).")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="A trained run or checkpoint for onnx_agreement (if not given: it is skipped).")
    parser.add_argument("--compare_rev", default=None,
                        help="train_scale: also measure the train.py of this git revision (e.g. HEAD~1), side by side.")
    parser.add_argument("--steps", type=int, default=600, help="pretrain_reference: optimizer steps per run.")
    parser.add_argument("--seeds", type=int, default=3, help="pretrain_reference: seeds per batch size.")
    parser.add_argument("--batch_sizes", type=lambda text: [int(v) for v in text.split(",")], default=[16, 128],
                        help="pretrain_reference: comma-separated batch sizes (pairs per step).")
    parser.add_argument("--only", default="",
                        help="Comma-separated benchmark names (if not given: all): " + ", ".join(BENCHMARKS) + ".")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"bench.py: unknown benchmark(s) for --only: {', '.join(unknown)}")
    if args.dev is None:
        args.dev = next((p for p in DEV_CANDIDATES if p.is_file()), None)
    if (args.dev is None or not args.dev.is_file()) and not set(names) <= WITHOUT_DEV:
        sys.exit("bench.py: KorQuAD_v1.0_dev.json not found; pass --dev PATH (or run `python3 download.py`)")
    print_provenance()
    for name in names:
        BENCHMARKS[name](args)


if __name__ == "__main__":
    main()

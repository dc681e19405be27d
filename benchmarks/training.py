"""Rows on training speed and memory: features per second on a CPU and on a GPU (eager and compiled), one
step next to transformers, and train.py's time and memory on a dev set grown to KorQuAD's training size."""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.harness import ROOT, VOCAB_FILE, benchmark, kq_dev_features


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
    examples, features = kq_dev_features(args.dev)
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

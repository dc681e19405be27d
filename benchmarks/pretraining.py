"""Rows on pre-training: masking statistics and steps per second, a tiny model pre-trained and fine-tuned
end to end, and held-out scores next to transformers' BertForPreTraining on the same batches."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.harness import ROOT, VOCAB_FILE, benchmark, dev_contexts, skipped_without


# --- pre-training (issue 22) -------------------------------------------------------------
_PRETRAIN_SHAPE = {"batch": 16, "max_seq_length": 128, "steps": 2}


def _dev_pair_maker(dev: Path, max_seq_length: int):
    """pretrain.py's training pairs over the dev contexts (Mecab + the real vocab), nothing held out."""
    import pretrain
    import pretraining_data
    from tokenization import BertTokenizer

    tokenizer = BertTokenizer(VOCAB_FILE)
    tokens = pretraining_data.tokenize_corpus([dev], tokenizer, max_seq_length - 3, progress=False)
    args = pretrain.parse_args(["--train_files", str(dev), "--output_dir", "unused", "--held_out_share=0",
                                f"--max_seq_length={max_seq_length}"])
    return pretraining_data.build_pair_makers(args, tokenizer, tokens)[0]


@benchmark("pretrain")
def bench_pretrain(args: argparse.Namespace) -> None:
    """Masking statistics over the dev contexts; pre-training steps/s vs transformers' BertForPreTraining."""
    import time

    import numpy as np
    import torch
    import pretraining_data
    from modeling import BertForPreTraining, Config, pretraining_loss
    try:
        import transformers
    except ImportError:
        transformers = None

    shape = _PRETRAIN_SHAPE
    maker = _dev_pair_maker(args.dev, shape["max_seq_length"])
    candidates = masked = replaced_by_mask = swaps = 0
    spans = np.zeros(pretraining_data.MAX_NGRAM + 1)
    for index in range(len(maker.pairs)):
        rng = np.random.default_rng([0, index])
        ids, _, candidate, swapped = maker.pair(index, rng)
        output, positions, _, lengths = pretraining_data.mask_pieces(
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
    batches = [pretraining_data.collate([maker.example(i, 0) for i in range(start, start + shape["batch"])])
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

    paragraphs = [{"context": context, "qas": []} for context in dev_contexts(dev)[:contexts]]
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
    if skipped_without("pretrain_reference", "transformers"):
        return
    import statistics
    import tempfile

    import torch

    import pretrain
    import pretraining_data
    from korquad_utils import make_length_grouped_batches
    from long_run import build_optimizer, linear_warmup_decay, step_seed
    from modeling import Config, QuestionAnswering, to_transformers_pretraining_state
    from tokenization import BertTokenizer

    steps, checkpoints = args.steps, sorted({args.steps * k // 3 for k in (1, 2, 3)})
    config = Config(**_REFERENCE_TINY)
    results: dict[tuple, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        corpus = work / "corpus.json"
        _reference_corpus(args.dev, corpus, _REFERENCE_CONTEXTS)
        tokenizer = BertTokenizer(VOCAB_FILE)
        tokens = pretraining_data.tokenize_corpus([corpus], tokenizer, 128 - 3, progress=False)
        for batch_size in args.batch_sizes:
            for seed in range(args.seeds):
                flags = pretrain.parse_args(["--train_files", str(corpus), "--output_dir", "unused",
                                             "--checkpoint", str(work / f"encoder{seed}.bin"), *_REFERENCE_FLAGS,
                                             f"--train_batch_size={batch_size}", f"--max_steps={steps}",
                                             f"--seed={seed}"])
                torch.manual_seed(1000 + seed)  # the published-format encoder: bare names, no heads
                torch.save(QuestionAnswering(config).bert.state_dict(), flags.checkpoint)
                train, held_out = pretraining_data.build_pair_makers(flags, tokenizer, tokens)
                held_out_batches = [pretraining_data.collate([held_out.example(i, pretraining_data.EVAL_EPOCH) for i in b])
                                    for b in make_length_grouped_batches(held_out.lengths(), 64, shuffle=False)]
                if seed == 0 and batch_size == args.batch_sizes[0]:
                    piece, baseline = pretraining_data.most_frequent_piece_accuracy(train, held_out, 10 ** 9)
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
                    batch = pretraining_data.collate([train.example(i, epoch) for i in indices])
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

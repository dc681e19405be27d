"""The distillation row: gold characters as a teacher projected onto the student's windows, and the cost of a
distillation step next to a plain one."""
from __future__ import annotations

import argparse

from benchmarks.harness import ROOT, benchmark, kq_dev_features


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

    examples, features = kq_dev_features(args.dev)
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

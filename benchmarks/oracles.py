"""Rows on the quality ceilings: gold positions as logits through decoding and the official metric, for
KorQuAD v1.0 and for a version-2 copy of it with unanswerable questions added."""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.harness import KQ_SETTINGS, benchmark, kq_dev_features, kq_tokenizer


@benchmark("oracle")
def bench_oracle(args: argparse.Namespace) -> None:
    """Gold positions as logits -> decode_predictions -> evaluate_v1_0 (target: EM >= 99.65, F1 >= 99.9)."""
    import json
    import evaluate_v1_0
    from korquad_utils import decode_predictions, gold_logits
    examples, features = kq_dev_features(args.dev)
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
    scores = oracle_v2_scores(dataset, kq_tokenizer(), KQ_SETTINGS)
    for key in ("HasAns_total", "NoAns_total"):
        print(f"oracle_v2_dev_{key}: {scores[key]}")
    for key in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        print(f"oracle_v2_dev_{key}: {scores[key]:.2f}")

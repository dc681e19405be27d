"""data/korquad_sample.json: valid KorQuAD v1.0 format, exact answer offsets, and big enough for the demo."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

SAMPLE_FILE = Path(__file__).resolve().parent.parent / "data" / "korquad_sample.json"
LONG_CONTEXT_CHARS = 700  # spans several windows at max_seq_length 128-256
MAX_ANSWER_CHARS = 20  # KorQuAD-like short spans: names, dates, numbers, terms


@pytest.fixture(scope="module")
def sample() -> dict:
    with open(SAMPLE_FILE, encoding="utf-8") as f:
        return json.load(f)


def paragraphs(sample: dict) -> list[dict]:
    return [paragraph for article in sample["data"] for paragraph in article["paragraphs"]]


def questions(sample: dict) -> list[tuple[str, dict]]:
    return [(paragraph["context"], qa) for paragraph in paragraphs(sample) for qa in paragraph["qas"]]


def test_sample_has_korquad_v1_shape(sample):
    assert sample["version"] == "KorQuAD_v1.0_sample"
    for article in sample["data"]:
        assert isinstance(article["title"], str) and article["title"]
        for paragraph in article["paragraphs"]:
            assert isinstance(paragraph["context"], str) and paragraph["context"]
            for qa in paragraph["qas"]:
                assert isinstance(qa["id"], str) and qa["question"].strip()
                assert qa["answers"], qa["id"]
                for answer in qa["answers"]:
                    assert set(answer) == {"text", "answer_start"}
                    assert isinstance(answer["answer_start"], int)


def test_every_answer_start_points_at_its_text(sample):
    for context, qa in questions(sample):
        for answer in qa["answers"]:
            start, text = answer["answer_start"], answer["text"]
            assert context[start:start + len(text)] == text, qa["id"]


def test_answers_are_short_spans_without_edge_spaces(sample):
    for _, qa in questions(sample):
        for answer in qa["answers"]:
            assert 0 < len(answer["text"]) <= MAX_ANSWER_CHARS, qa["id"]
            assert answer["text"] == answer["text"].strip(), qa["id"]


def test_question_ids_are_unique(sample):
    ids = [qa["id"] for _, qa in questions(sample)]
    assert len(ids) == len(set(ids))


def test_sample_is_large_enough_for_the_demo(sample):
    assert len(sample["data"]) >= 4
    assert len(paragraphs(sample)) >= 8
    assert len(questions(sample)) >= 40
    assert sum(len(p["context"]) > LONG_CONTEXT_CHARS for p in paragraphs(sample)) >= 2


def test_sample_text_is_not_taken_from_korquad_dev(sample, dev_file):
    with open(dev_file, encoding="utf-8") as f:
        dev_text = "\n".join(p["context"] for article in json.load(f)["data"] for p in article["paragraphs"])
    for paragraph in paragraphs(sample):
        for sentence in re.split(r"(?<=다\.)\s+", paragraph["context"]):
            if len(sentence) >= 30:
                assert sentence not in dev_text, sentence

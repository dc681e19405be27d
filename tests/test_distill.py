"""Distillation: distill.py's character-level teacher targets, their projection onto student windows, the KD loss."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_FLAGS, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_script, write_subset
from korquad_utils import (TeacherTargets, convert_examples_to_features, decode_predictions, gold_logits,
                           project_char_targets, read_squad_examples, read_teacher_targets, teacher_batch_targets)
from modeling import Config, QuestionAnswering, distill_loss
from tokenization import BertTokenizer

WINDOWS = ["--max_seq_length=256", "--max_query_length=32", "--doc_stride=64"]
NONE_WINDOWS = dict(max_seq_length=256, doc_stride=64, max_query_length=32)


# --- the projection, on its own ---------------------------------------------------------------

def window(*context: tuple[int, int], question_tokens: int = 2) -> np.ndarray:
    """[CLS] question [SEP] context [SEP] offsets, -1 outside the context."""
    return np.array([(-1, -1)] * (question_tokens + 2) + list(context) + [(-1, -1)])


def test_projection_puts_each_character_on_its_token_and_the_rest_on_cls():
    offsets = window((10, 12), (12, 15), (16, 20))  # context tokens at columns 4, 5, 6; a space at 15
    start = project_char_targets(offsets, [10, 13, 15, 5, 25], [0.1, 0.2, 0.3, 0.15, 0.25], is_end=False)
    # 13 inside (12, 15); 15 (a space) goes to the next token; 5 and 25 lie outside the window.
    np.testing.assert_allclose(start, [0.4, 0, 0, 0, 0.1, 0.2, 0.3, 0], atol=1e-7)
    end = project_char_targets(offsets, [11, 14, 15, 19, 9], [0.1, 0.2, 0.3, 0.15, 0.25], is_end=True)
    # An end at 15 (the space) belongs to the token before it; 9 is before the window.
    np.testing.assert_allclose(end, [0.25, 0, 0, 0, 0.1, 0.5, 0.15, 0], atol=1e-7)
    # A sparse teacher's kept mass (here 0.5) is renormalised.
    np.testing.assert_allclose(project_char_targets(offsets, [16], [0.5], is_end=False)[6], 1.0)
    assert project_char_targets(offsets, [], [], is_end=True).sum() == 0  # no mass: no target


def test_projection_of_a_batch_is_the_projection_of_each_row():
    rng = np.random.default_rng(0)
    rows = [window((0, 3), (4, 6), (6, 9)), window((30, 31), (31, 35), (36, 38), question_tokens=1),
            window(question_tokens=4)]  # a window without context: all mass on [CLS]
    width = max(len(r) for r in rows) + 2
    batch = np.full((len(rows), width, 2), -1)
    for i, r in enumerate(rows):
        batch[i, :len(r)] = r
    chars = [rng.integers(0, 40, 6) for _ in rows]
    probs = [rng.random(6) for _ in rows]
    for is_end in (False, True):
        together = project_char_targets(batch, np.concatenate(chars), np.concatenate(probs), is_end,
                                        np.repeat(np.arange(len(rows)), 6))
        for i in range(len(rows)):
            np.testing.assert_allclose(together[i], project_char_targets(batch[i], chars[i], probs[i], is_end),
                                       atol=1e-7)
            assert together[i].sum() == pytest.approx(1, abs=1e-6)
        assert together[2, 0] == pytest.approx(1)


# --- the loss -----------------------------------------------------------------------------------

def test_kd_term_equals_the_transformers_squad_distillation_formula():
    """transformers' SQuAD distillation example: for start and for end,
    KLDivLoss(reduction="batchmean")(log_softmax(student / T), softmax(teacher / T)) * T^2, then averaged."""
    torch.manual_seed(0)
    logits = [torch.randn(5, 40, dtype=torch.float64) * 3 for _ in range(4)]
    mask = torch.ones(5, 40, dtype=torch.long)
    for dtype, temperature in [(dtype, t) for dtype in (torch.float64, torch.float32) for t in (0.5, 1.0, 2.0, 4.0)]:
        student_start, student_end, teacher_start, teacher_end = (x.to(dtype) for x in logits)
        kl = torch.nn.KLDivLoss(reduction="batchmean")

        def published(student, teacher):
            return kl(torch.log_softmax(student / temperature, -1), torch.softmax(teacher / temperature, -1)) \
                * temperature ** 2
        expected = (published(student_start, teacher_start) + published(student_end, teacher_end)) / 2
        ours = (distill_loss(student_start, torch.softmax(teacher_start, -1), mask, temperature)
                + distill_loss(student_end, torch.softmax(teacher_end, -1), mask, temperature)) / 2
        # float32 rounds a value near 10 at about 1e-6: there, the same to float32 precision.
        assert abs(ours.item() - expected.item()) < (1e-6 if dtype == torch.float64 else 1e-6 * expected.item())


def test_kd_term_ignores_padding_and_rows_without_targets():
    torch.manual_seed(1)
    logits, teacher = torch.randn(2, 10), torch.softmax(torch.randn(2, 6), -1)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[:, :6] = 1
    targets = torch.zeros(3, 10)
    targets[:2, :6] = teacher
    padded = torch.cat([logits, torch.randn(1, 10)]).masked_fill(torch.tensor([[0] * 6 + [1] * 4] * 3).bool(), 50.0)
    ours = distill_loss(padded, targets, torch.cat([mask, mask[:1]]), 2.0)  # row 2: a filler without targets
    assert ours.item() == pytest.approx(distill_loss(logits[:, :6], teacher, None, 2.0).item(), abs=1e-6)


def test_model_loss_is_the_alpha_mix_and_alpha_zero_is_plain_training():
    torch.manual_seed(2)
    model = QuestionAnswering(Config(**TINY_CONFIG)).eval()
    ids = torch.randint(5, 1000, (3, 12))
    mask = torch.ones_like(ids)
    positions = dict(start_positions=torch.tensor([3, 4, 0]), end_positions=torch.tensor([5, 4, 0]))
    targets = dict(start_targets=torch.softmax(torch.randn(3, 12), -1), end_targets=torch.softmax(torch.randn(3, 12), -1))
    plain = model(ids, None, mask, **positions)
    assert torch.equal(model(ids, None, mask, **positions, **targets, distill_alpha=0.0, distill_temperature=2.0), plain)
    start, end = model(ids, None, mask)
    kd = (distill_loss(start, targets["start_targets"], mask, 2.0) + distill_loss(end, targets["end_targets"], mask, 2.0)) / 2
    mixed = model(ids, None, mask, **positions, **targets, distill_alpha=0.3, distill_temperature=2.0)
    assert mixed.item() == pytest.approx((0.7 * plain + 0.3 * kd).item(), abs=1e-6)

"""The evaluation loop: logits over a feature table, decoding, and the official metrics
(KorQuAD v1.0, SQuAD 2.0, KLUE-MRC) of the predictions."""
from __future__ import annotations

import argparse
import functools
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

import evaluate_klue_mrc
import evaluate_v1_0
import evaluate_v2_0
from decoding import abstain, decode_predictions, null_odds
from feature_table import FeatureTable
from korquad_utils import collate_features, make_length_grouped_batches
from squad_examples import KorquadFormatError, SquadExample, load_json_file
from cli import UsageError
from devices import autocast_context, compile_model
from checkpoints import load_finetuned

if TYPE_CHECKING:
    import torch
    from modeling import Config


def average_logits(member_logits: Iterable[tuple[list[np.ndarray], list[np.ndarray]]]
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The mean of several models' per-feature (start, end) logits: how an ensemble decodes.

    Taking an iterable lets a caller load one member at a time and drop it once its logits are in.
    """
    summed_starts: list[np.ndarray] | None = None
    summed_ends: list[np.ndarray] = []
    count = 0
    for starts, ends in member_logits:
        if summed_starts is None:
            summed_starts, summed_ends = list(starts), list(ends)
        else:
            summed_starts = [a + b for a, b in zip(summed_starts, starts)]
            summed_ends = [a + b for a, b in zip(summed_ends, ends)]
        count += 1
    if summed_starts is None:
        raise ValueError("average_logits needs at least one model's logits")
    if count == 1:
        return summed_starts, summed_ends
    return [s / count for s in summed_starts], [e / count for e in summed_ends]


def ensemble_logits(args: argparse.Namespace, config: Config, features: FeatureTable,
                    device: torch.device, amp_dtype: torch.dtype | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The mean start/end logits of every checkpoint in `args.checkpoint` over `features`.

    One model is built (and compiled, with --compile) and each member's weights loaded into it in
    turn: one member in memory at a time, one compilation for the whole ensemble.
    """
    from modeling import QuestionAnswering

    model = QuestionAnswering(config).to(device)
    compiled = compile_model(model, args, device, max_width=args.max_seq_length)
    padding = args.compile_bucket if args.compile else None

    def member_logits() -> Iterator[tuple[list[np.ndarray], list[np.ndarray]]]:
        for path in args.checkpoint:
            load_finetuned(path, config, device, into=model)
            yield predict_logits(compiled, features, args.batch_size, device, amp_dtype, not args.quiet, padding)

    return average_logits(member_logits())


def without_grad(function: Callable) -> Callable:
    """`torch.no_grad()` around `function`, with torch imported only once it runs."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        import torch
        with torch.no_grad():
            return function(*args, **kwargs)
    return run


@without_grad
def predict_logits(model: torch.nn.Module, features: FeatureTable, batch_size: int,
                   device: torch.device, amp_dtype: torch.dtype | None = None,
                   show_progress: bool = True,
                   pad_to_multiple: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Start and end logits for every window of `features` (float32 arrays as long as its input ids), in order.

    Batches are length-sorted and padded to their own longest feature, so little compute goes to padding;
    with `pad_to_multiple` (for a compiled model) to that multiple and to `batch_size` rows.
    Logits come back to the host without a wait per batch: one synchronisation at the end.
    """
    import torch

    was_training = model.training
    model.eval()
    starts: list[np.ndarray | None] = [None] * len(features)
    ends: list[np.ndarray | None] = [None] * len(features)
    lengths = features.lengths
    padding = {} if pad_to_multiple is None else {
        "pad_to_multiple": pad_to_multiple, "max_width": int(lengths.max(initial=0)), "pad_rows_to": batch_size}
    batches = make_length_grouped_batches(lengths, batch_size, shuffle=False)
    on_gpu = device.type == "cuda"
    pending = []
    for batch in tqdm(batches, desc="predict", unit="batch", disable=not show_progress):
        arrays = collate_features(features, batch, is_training=False, **padding)
        inputs = {k: (torch.from_numpy(v).pin_memory() if on_gpu else torch.from_numpy(v)).to(device, non_blocking=True)
                  for k, v in arrays.items()}
        with autocast_context(device, amp_dtype):
            start_logits, end_logits = model(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"])
        # stack copies: a CUDA-graph replay overwrites its outputs on the next call.
        logits = torch.stack([start_logits, end_logits]).float()
        pending.append((batch, logits.to("cpu", non_blocking=True)))
    if on_gpu:
        torch.cuda.synchronize(device)
    for batch, logits in pending:
        batch_logits = logits.numpy()
        for row, index in enumerate(batch):
            starts[index], ends[index] = batch_logits[0, row, :lengths[index]], batch_logits[1, row, :lengths[index]]
    model.train(was_training)
    return starts, ends


def has_answers(examples: Sequence[SquadExample], metric: str = "squad2") -> bool:
    """Whether `examples` hold a gold to score against: an answer, or (read with --version_2_with_negative,
    for the SQuAD 2.0 and KLUE metrics) a question marked `"is_impossible": true`, whose gold is "no answer".
    A file without answers or the mark (a test set) has none; KorQuAD's metrics score answers only."""
    counts_marked = metric not in ("korquad", "korquad2")
    return any(example.answers or counts_marked and example.marked_impossible for example in examples)


def score(predict_file: str | os.PathLike, predictions: dict[str, str]) -> dict[str, float]:
    """EM/F1 from the official KorQuAD v1.0 metric."""
    return evaluate_v1_0.evaluate(scored_articles(predict_file), composed(predictions))


def scored_articles(predict_file: str | os.PathLike) -> list:
    """The file's articles as the metrics read them, in NFC (`composed`)."""
    return composed(read_dataset(predict_file)["data"])


def composed(value: Any) -> Any:
    """`value` (parsed JSON) with every string in Unicode NFC. The metrics count characters: a dataset written in
    NFD (and answers cut from its contexts) would otherwise score otherwise than the same text composed, as the
    official data is. NFC text is returned as it is."""
    if isinstance(value, str):
        return value if unicodedata.is_normalized("NFC", value) else unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [composed(item) for item in value]
    if isinstance(value, dict):
        return {key: composed(item) for key, item in value.items()}
    return value


def read_dataset(predict_file: str | os.PathLike) -> dict:
    return load_json_file(Path(predict_file))


def check_metric_dataset(predict_file: str | os.PathLike, metric: str, named: str | None = None) -> None:
    """Refuse, before any work, a file the chosen metric cannot score (KLUE needs `question_type`, KorQuAD
    v1.0 an 'answers' list on every question of a file with answers). The refusal names `named` (default:
    the --metric flag). KorQuAD 2.x data (a directory or a file of its shape) needs the 2.x metric's beautifulsoup4."""
    if metric in ("korquad", "korquad2"):
        import korquad2

        dataset = None if Path(predict_file).is_dir() else read_dataset(predict_file)
        if dataset is None or korquad2.is_korquad2(dataset):
            import evaluate_korquad_v2

            if evaluate_korquad_v2.BeautifulSoup is None:  # said now, not after the whole prediction pass
                raise UsageError(evaluate_korquad_v2.MISSING_BS4)
        elif metric == "korquad":
            check_answers_everywhere(dataset, str(predict_file))
    checker = {"squad2": evaluate_v2_0.check_dataset, "klue": evaluate_klue_mrc.check_dataset}.get(metric)
    if checker is not None:
        dataset = read_dataset(predict_file)
        try:
            checker(dataset, str(predict_file))
        except ValueError as err:
            raise UsageError(f"{named or f'--metric {metric}'}: {err}") from None


def check_answers_everywhere(dataset: Any, name: str) -> None:
    """Refuse a file where some questions have answers and another has no 'answers' list: the v1.0 metric
    cannot score it, and would stop only after the prediction pass. A file without any answers is a test
    set (predicted, not scored); other faults of its structure are the example reader's to name."""
    questions = [qa for article in _list_of(dataset, "data") for paragraph in _list_of(article, "paragraphs")
                 for qa in _list_of(paragraph, "qas") if isinstance(qa, dict)]
    lacking = next((qa for qa in questions if "answers" not in qa), None)
    if lacking is not None and any(qa.get("answers") for qa in questions):
        raise KorquadFormatError(f"{name}: question {lacking.get('id')}: no 'answers' list, though other questions "
                                 f"have answers; the KorQuAD v1.0 metric cannot score it (add its answers, or "
                                 f"leave the question out)")


def _list_of(record: Any, key: str) -> list:
    """`record[key]` if that is a list, else [] (a malformed file: the example reader names its fault)."""
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, list) else []


def score_no_answer(predict_file: str | os.PathLike, metric: str, span_predictions: dict[str, str],
                    odds: dict[str, float] | None, threshold: float = 0.0) -> dict:
    """Scores of the predictions that abstain where `odds` > `threshold` (never without `odds`), by `metric`.

    squad2: evaluate_v2_0's dict, its best_* keys tuned over `odds` on the span predictions (so the
    best threshold is in --null_score_diff_threshold's units); klue: evaluate_klue_mrc's; korquad:
    v1.0's EM/F1 (questions without answers left out)."""
    dataset, span_predictions = scored_articles(predict_file), composed(span_predictions)
    if metric == "squad2":
        return evaluate_v2_0.evaluate(dataset, span_predictions, odds, threshold)
    predictions = span_predictions if odds is None else abstain(span_predictions, odds, threshold)
    if metric == "klue":
        return evaluate_klue_mrc.evaluate(dataset, predictions)
    return evaluate_v1_0.evaluate(dataset, predictions)


def tuned_threshold(predict_file: str | os.PathLike, span_predictions: dict[str, str], odds: dict[str, float],
                    which: str = "best_f1") -> float:
    """The --null_score_diff_threshold that maximises F1 (or EM) on `predict_file`, as SQuAD 2.0 defines it."""
    scores = evaluate_v2_0.evaluate(scored_articles(predict_file), composed(span_predictions), odds)
    return scores[f"{which}_thresh"]


def evaluate_model(model: torch.nn.Module, examples: Sequence[SquadExample], features: FeatureTable,
                   args: argparse.Namespace, device: torch.device, amp_dtype: torch.dtype | None,
                   batch_size: int) -> tuple[dict[str, str], dict[str, list[dict]]]:
    """Predictions and n-best lists of one model (train.py calls this after each epoch)."""
    return evaluate_model_with_odds(model, examples, features, args, device, amp_dtype, batch_size)[:2]


def evaluate_model_with_odds(model: torch.nn.Module, examples: Sequence[SquadExample],
                             features: FeatureTable, args: argparse.Namespace, device: torch.device,
                             amp_dtype: torch.dtype | None, batch_size: int
                             ) -> tuple[dict[str, str], dict[str, list[dict]], dict[str, float]]:
    """`evaluate_model`'s span predictions and n-best lists, and each question's `null_odds`."""
    starts, ends = predict_logits(model, features, batch_size, device, amp_dtype,
                                  pad_to_multiple=args.compile_bucket if args.compile else None,
                                  show_progress=not getattr(args, "quiet", False))
    predictions, nbest = decode_predictions(examples, features, starts, ends, n_best_size=args.n_best_size,
                                            max_answer_length=args.max_answer_length)
    return predictions, nbest, null_odds(examples, features.feature_example, starts, ends, nbest)

"""Fine-tune BERT-small on KorQuAD v1.0, on one device or several through torchrun.

    python3 train.py --output_dir=output --checkpoint=pretrain_ckpt/bert_small_ckpt.bin \
        --model_config=data/bert_small.json --train_file=data/KorQuAD_v1.0_train.json
    torchrun --nproc_per_node=4 train.py ...      # DistributedDataParallel, one shard per rank

Writes `output_dir/korquad_{epoch}.bin` (a plain state dict: `bert.*` + `qa_outputs.*`) after each
epoch, with `config.json` and `training_args.json` beside it, `training_log.jsonl` (loss, learning
rate, EM/F1), `training_curves.png`, and `training_state.pt`: the newest resumable state (after each
epoch, every `--save_steps` optimizer steps and on SIGTERM/SIGINT), which `--resume` continues from.
The global batch is train_batch_size x ranks x gradient_accumulation_steps.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from collections.abc import Callable, Sequence

import korquad2
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cli import (ArgumentParser, USER_ERRORS, UsageError, add_data_args, add_no_answer_args, check_data_args,
                 check_version_2, finite_float, learning_rate, positive_float, positive_int, prepare_output_dir,
                 run_cli, setup_logging)
from devices import (add_compile_args, autocast_context, autocast_dtype, check_compile_args, compile_model,
                     compile_padding)
from checkpoints import (CURVES_NAME, LOG_NAME, SAVED_ARGS_NAME, SAVED_CONFIG_NAME, STATE_NAME, build_tokenizer,
                         check_checkpoint_file, check_output_dir, copy_vocab_into, explicit_flags, fetch_hub_model,
                         remove_previous_run, resolve_model_settings)
from scoring import (check_metric_dataset, evaluate_model, evaluate_model_with_odds, has_answers, score,
                     score_no_answer)
from feature_table import FeatureTable
from atomic_files import remove_dead_temp_files, write_json_atomic
from squad_examples import read_squad_examples
from korquad_utils import collate_features, load_or_build_features, load_or_build_table, make_length_grouped_batches
from teacher_targets import TeacherTargets, read_teacher_targets, teacher_batch_targets
from long_run import (CheckpointWriteError, DirectoryLocked, Distributed, RunLock, StopSignals, TrainingDiverged,
                      TrainingStopped, build_optimizer, check_same_settings, file_digest, keep_log_until,
                      linear_warmup_decay, plot_training_curves, read_log, read_loss, read_training_state,
                      save_checked, setup_distributed, step_seed)
from modeling import Config, QuestionAnswering, count_parameters, load_checkpoint

logger = logging.getLogger("korquad")

# Each epoch's steps are planned before training (with --negative_window_ratio < 1, by drawing its windows):
# a fine-tuning run of more epochs than this is a typo, and planning it would run for hours or forever.
MAX_EPOCHS = 10_000
STATE_KEYS = ("epoch", "steps_in_epoch", "epoch_finished", "global_step", "model", "optimizer", "scheduler",
              "scaler", "settings", "paths", "loss_sum", "loss_count")
class EvaluationStopped(Exception):
    """A stop signal came during the per-epoch evaluation; the state says it is pending, --resume redoes it."""


class StopBetweenBatches(torch.nn.Module):
    """`model` for evaluation that stops before the next batch once a stop signal came.

    Only rank 0 evaluates, so this reads its own flag: the other ranks are waiting, not asking.
    """

    def __init__(self, model: torch.nn.Module, stop: StopSignals):
        super().__init__()
        self.model, self.stop = model, stop

    def forward(self, *inputs, **kwargs):
        if self.stop.requested is not None:
            raise EvaluationStopped
        return self.model(*inputs, **kwargs)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Fine-tune BERT-small on KorQuAD v1.0.")
    parser.add_argument("--train_file", default="data/KorQuAD_v1.0_train.json",
                        help="KorQuAD-format training JSON, or a KorQuAD 2.x file or directory (HTML pages).")
    parser.add_argument("--output_dir", default="output", help="Where checkpoints and run files go.")
    parser.add_argument("--checkpoint", default="pretrain_ckpt/bert_small_ckpt.bin",
                        help="Pretrained encoder, fine-tuned checkpoint, transformers BERT/ELECTRA model directory "
                             "or hub model id; 'none' = random initialisation.")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config JSON (if not given: a transformers directory's own, "
                             "else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="WordPiece vocab (if not given: a transformers directory's vocab.txt, "
                             "else data/ko_vocab_32k.txt).")
    parser.add_argument("--train_batch_size", type=positive_int, default=16, help="Features per step on each rank.")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1,
                        help="Micro-batches per optimizer step.")
    parser.add_argument("--learning_rate", type=learning_rate, default=5e-5, help="Peak AdamW learning rate.")
    parser.add_argument("--num_train_epochs", type=finite_float(0.0, MAX_EPOCHS, low_inclusive=False), default=4.0,
                        help=f"Epochs to train (a fraction ends mid-epoch; at most {MAX_EPOCHS}).")
    parser.add_argument("--max_steps", type=positive_int, default=None,
                        help="Stop after this many optimizer steps, the learning-rate schedule spanning them "
                             "(overrides --num_train_epochs; if not given: the epochs decide).")
    parser.add_argument("--warmup_proportion", type=finite_float(0.0, 1.0, high_inclusive=False), default=0.1,
                        help="Share of the steps over which the learning rate rises linearly.")
    parser.add_argument("--weight_decay", type=finite_float(0.0), default=0.01,
                        help="AdamW weight decay (not on biases and LayerNorm weights).")
    parser.add_argument("--adam_epsilon", type=positive_float, default=1e-6, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="Gradient norm clipping threshold.")
    parser.add_argument("--eval_file", default=None, help="Evaluate on this file after each epoch and log EM/F1.")
    parser.add_argument("--eval_batch_size", type=positive_int, default=64,
                        help="Features per forward pass in evaluation.")
    parser.add_argument("--n_best_size", type=positive_int, default=20,
                        help="Candidate answers per question when evaluating.")
    parser.add_argument("--logging_steps", type=positive_int, default=50,
                        help="Optimizer steps between loss read-outs.")
    parser.add_argument("--save_total_limit", type=positive_int, default=None,
                        help="Keep only the newest N korquad_{epoch}.bin files, and the best-scoring one with "
                             "--eval_file (if not given: keep all).")
    parser.add_argument("--save_steps", type=positive_int, default=None,
                        help="Also write the resumable training_state.pt every N optimizer steps "
                             "(if not given: after each epoch only).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the newest training_state.pt in --output_dir, mid-epoch if it was "
                             "written there.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace the training run already in --output_dir (its checkpoints, state and log "
                             "go once the new run starts training); without it such a directory is refused.")
    parser.add_argument("--tensorboard", action="store_true",
                        help="Also log loss, learning rate and EM/F1 for TensorBoard in output_dir/tensorboard.")
    parser.add_argument("--quiet", action="store_true", help="Warnings only, no progress bars.")
    add_no_answer_args(parser)
    parser.add_argument("--negative_window_ratio", type=finite_float(0.0, 1.0), default=1.0,
                        help="Share of the windows without their question's answer trained on, drawn afresh each "
                             "epoch (windows with the answer are all kept); 1 keeps every window. A KorQuAD 2.x "
                             "page gives hundreds of windows, nearly all without the answer: 0.1 is a usual choice.")
    parser.add_argument("--teacher_targets", default=None,
                        help="Distil from the teacher targets distill.py wrote into this directory.")
    parser.add_argument("--distill_alpha", type=finite_float(0.0, 1.0), default=0.5,
                        help="With --teacher_targets: loss = (1 - alpha) x gold cross-entropy + alpha x T^2 x "
                             "KL(teacher_T || student_T); 1 = teacher only (gold answers not needed).")
    parser.add_argument("--distill_temperature", type=finite_float(1e-3, 1e3), default=2.0,
                        help="With --teacher_targets: the temperature T of both distributions in the KL term.")
    add_data_args(parser)
    add_compile_args(parser)
    args = parser.parse_args(argv)
    if args.resume and args.overwrite_output_dir:
        parser.error("--resume continues the run in --output_dir, --overwrite_output_dir replaces it: pass one")
    if args.teacher_targets is None:
        for flag in ("--distill_alpha", "--distill_temperature"):
            if getattr(args, flag[2:]) != parser.get_default(flag[2:]):
                parser.error(f"{flag} only applies with --teacher_targets")
    if Path(args.checkpoint).is_dir():
        check_checkpoint_file(args.checkpoint)  # says what to pass instead of a directory
    # Windows left at their defaults are fitted to a model of fewer positions (e.g. a 300-position BERT).
    args.explicit_flags = explicit_flags(parser, argv)
    return args


def epoch_batches(features: FeatureTable, args: argparse.Namespace, ctx: Distributed,
                  epoch: int) -> tuple[list[np.ndarray], list[float]]:
    """`rank_batches` over the windows `epoch` trains on: all of them, or with --negative_window_ratio
    below 1 those with their answer plus that share of the others (the same draw on every rank)."""
    if args.negative_window_ratio >= 1:
        return rank_batches(features.lengths, args, ctx, epoch)
    kept = epoch_windows(features, args, epoch)
    batches, weights = rank_batches(features.lengths[kept], args, ctx, epoch)
    return [kept[batch] for batch in batches], weights


def epoch_windows(features: FeatureTable, args: argparse.Namespace, epoch: int) -> np.ndarray:
    """The windows `epoch` trains on under --negative_window_ratio below 1: those with their answer
    plus that share of the others (the same draw on every rank)."""
    has_answer = features.feature_positions[:, 0] > 0
    draw = np.random.default_rng([args.seed, epoch]).random(len(has_answer))
    return np.flatnonzero(has_answer | (draw < args.negative_window_ratio))


def plan_steps(features: FeatureTable, args: argparse.Namespace, ctx: Distributed) -> tuple[int, int, int]:
    """(optimizer steps of epoch 0, total optimizer steps, epochs to run).

    Every epoch has the same steps, unless --negative_window_ratio below 1 draws each epoch's windows
    afresh: then each epoch's own count decides, so --max_steps runs exactly that many steps and the
    learning rate ends at 0. An epoch 0 without a single optimizer step is refused."""
    def steps_of(epoch: int) -> int:
        return len(epoch_batches(features, args, ctx, epoch)[0]) // args.gradient_accumulation_steps

    first = steps_of(0)
    if first == 0:
        shares = ctx.world_size * args.gradient_accumulation_steps
        windows = len(features) if args.negative_window_ratio >= 1 else len(epoch_windows(features, args, 0))
        drawn = "" if args.negative_window_ratio >= 1 else \
            f" (with --negative_window_ratio {args.negative_window_ratio:g})"
        raise UsageError(f"--train_file {args.train_file} gives {windows} windows{drawn}, fewer than the {shares} "
                         f"shares one global batch is split into ({ctx.world_size} ranks x "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps}): no optimizer step "
                         f"would run")
    if args.negative_window_ratio >= 1:
        if args.max_steps:
            return first, args.max_steps, math.ceil(args.max_steps / first)
        return first, max(1, int(first * args.num_train_epochs)), math.ceil(args.num_train_epochs)
    counts = [first]
    if args.max_steps:
        if args.max_steps > first * MAX_EPOCHS:
            raise UsageError(f"--max_steps {args.max_steps} would take over {MAX_EPOCHS} epochs of about {first} "
                             f"optimizer steps; train at most {MAX_EPOCHS} epochs")
        while sum(counts) < args.max_steps:
            counts.append(steps_of(len(counts)))
        return first, args.max_steps, len(counts)
    whole, part = divmod(args.num_train_epochs, 1)
    counts += [steps_of(epoch) for epoch in range(1, math.ceil(args.num_train_epochs))]
    total = sum(counts[:int(whole)]) + (int(counts[int(whole)] * part) if part else 0)
    return first, max(1, total), math.ceil(args.num_train_epochs)


def rank_batches(lengths: Sequence[int], args: argparse.Namespace, ctx: Distributed,
                 epoch: int) -> tuple[list[np.ndarray], list[float]]:
    """This rank's micro-batches for `epoch`, and their loss weights.

    Every rank draws the same length-grouped global batches (same seed). Each global batch is one
    optimizer step: it is cut into ranks x gradient_accumulation_steps shares, and this rank takes
    one share per micro-step. So a global batch trains alike whatever the number of ranks and
    micro-steps it is spread over. A share's weight, its size x shares / global batch size, keeps
    the averaged gradient the mean over the whole global batch when it does not split evenly.
    """
    accumulation = args.gradient_accumulation_steps
    num_shares = ctx.world_size * accumulation
    global_batches = make_length_grouped_batches(lengths, args.train_batch_size * num_shares,
                                                 shuffle=True, seed=args.seed + epoch)
    micro_batches, weights = [], []
    for batch in global_batches:
        if len(batch) < num_shares:  # a last scrap too small to give every share a feature
            continue
        shares = np.array_split(np.asarray(batch), num_shares)
        for micro_step in range(accumulation):
            share = shares[micro_step * ctx.world_size + ctx.rank]
            micro_batches.append(share)
            weights.append(len(share) * num_shares / len(batch))
    return micro_batches, weights


def run_settings(args: argparse.Namespace, config: Config, do_lower_case: bool, world_size: int) -> dict:
    """Everything that shapes a run's trajectory, under the names a user knows; `--resume` must find them unchanged.

    The global batch counts, not its split over ranks and accumulation steps (`rank_batches` trains alike).
    """
    settings = {
        "--train_file": korquad2.dataset_digest(args.train_file) if Path(args.train_file).is_dir()
        else file_digest("--train_file", args.train_file),
        "--vocab_file": file_digest("--vocab_file", args.vocab_file),
        "--analyzer": args.analyzer, "lower-casing": do_lower_case,
        "--max_seq_length": args.max_seq_length, "--max_query_length": args.max_query_length,
        "--doc_stride": args.doc_stride, "model config": config.to_dict(),
        "global batch (--train_batch_size x ranks x --gradient_accumulation_steps)":
            args.train_batch_size * world_size * args.gradient_accumulation_steps,
        "--num_train_epochs": args.num_train_epochs, "--max_steps": args.max_steps,
        "--learning_rate": args.learning_rate,
        "--warmup_proportion": args.warmup_proportion, "--weight_decay": args.weight_decay,
        "--adam_epsilon": args.adam_epsilon, "--max_grad_norm": args.max_grad_norm, "--seed": args.seed,
    }
    if args.version_2_with_negative:  # only then: runs from before the flag resume as they were
        settings["--version_2_with_negative"] = True
    if args.negative_window_ratio < 1:  # likewise
        settings["--negative_window_ratio"] = args.negative_window_ratio
    if args.teacher_targets is not None:  # likewise absent without a teacher: older states still resume
        settings |= {"--teacher_targets": args.teacher_targets_key, "--distill_alpha": args.distill_alpha,
                     "--distill_temperature": args.distill_temperature}
    return settings


def best_evaluation(evaluations: Sequence[dict]) -> dict | None:
    """The evaluated epoch with the highest F1 (then EM; the earliest on a tie)."""
    return max(evaluations, key=lambda e: (e["f1"], e["exact_match"]), default=None)


@dataclass
class TeacherBatches:
    """Teacher targets for the training windows: each window's question row in `targets`."""

    targets: TeacherTargets
    features: FeatureTable
    feature_rows: np.ndarray
    alpha: float
    temperature: float

    def collate(self, indices: list[int], collate: Callable[..., dict]) -> dict:
        """The batch `collate` makes of windows `indices`, plus each window's start/end targets projected
        onto its tokens by their character offsets (from the feature table: nothing stored per window)."""
        batch = collate(indices)
        rows, width = batch["input_ids"].shape
        offsets = np.full((rows, width, 2), -1, dtype=np.int64)
        for row, index in enumerate(indices):
            window_offsets = self.features.token_offsets(index)
            offsets[row, :len(window_offsets)] = window_offsets
        question_rows = np.full(rows, -1, dtype=np.int64)
        question_rows[:len(indices)] = self.feature_rows[np.asarray(indices, dtype=np.int64)]
        start, end = teacher_batch_targets(self.targets, question_rows, offsets)
        return {**batch, "start_targets": torch.from_numpy(start), "end_targets": torch.from_numpy(end)}


def read_targets_for(args: argparse.Namespace, train_file_sha256: str) -> TeacherTargets:
    """--teacher_targets, refused unless made for this very --train_file."""
    targets = read_teacher_targets(args.teacher_targets)
    if targets.train_file_sha256 != train_file_sha256:
        raise UsageError(f"--teacher_targets {args.teacher_targets} were made for another train file (sha256 "
                         f"{targets.train_file_sha256[:12]}, --train_file {args.train_file} has "
                         f"{train_file_sha256[:12]}); run distill.py on this --train_file")
    return targets


def teacher_for(args: argparse.Namespace, targets: TeacherTargets, examples, features) -> TeacherBatches:
    """Each feature's row in `targets`; a question without targets is refused, naming it."""
    row_of = {question_id: row for row, question_id in enumerate(targets.question_ids.tolist())}
    missing = [example.qas_id for example in examples if example.qas_id not in row_of]
    if missing:
        raise UsageError(f"--teacher_targets {args.teacher_targets}: no targets for question {missing[0]} "
                         f"({len(missing)} of {len(examples)} questions lack them); rerun distill.py")
    example_rows = np.array([row_of[example.qas_id] for example in examples], dtype=np.int64)
    # Each question's characters within its own context: distill.py writes nothing else, so one past it
    # means targets made from other text under these question ids.
    context_length = np.full(len(targets.question_ids), np.iinfo(np.int64).max)   # rows no question reads: unchecked
    context_length[example_rows] = [len(example.context_text) for example in examples]
    for side in ("start", "end"):
        bounds, chars = getattr(targets, f"{side}_bounds"), getattr(targets, f"{side}_chars")
        owner = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
        past = np.flatnonzero(chars >= context_length[owner])
        if len(past):
            row, char = owner[past[0]], chars[past[0]]
            raise UsageError(f"--teacher_targets {args.teacher_targets}: {side}_chars {char} of question "
                             f"{targets.question_ids[row]} is past its context ({context_length[row]} characters; "
                             f"{len(past)} such positions); rerun distill.py on this --train_file")
    return TeacherBatches(targets, features, example_rows[features.example_index], args.distill_alpha,
                          args.distill_temperature)


@dataclass
class TrainingRun:
    """One training run's moving parts, shared by the epoch loop and the step loop."""

    args: argparse.Namespace
    ctx: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None
    output_dir: Path
    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    settings: dict
    paths: dict
    total_steps: int
    teacher: TeacherBatches | None = None
    stop: StopSignals = field(default_factory=StopSignals)
    tensorboard: object = None
    evaluations: list[dict] = field(default_factory=list)

    @property
    def eval_model(self) -> torch.nn.Module:
        """What rank 0 evaluates with: the compiled model where there is one, but never through DDP."""
        return self.model if self.ctx.enabled else self.train_model

    @property
    def log_file(self) -> Path:
        return self.output_dir / LOG_NAME

    def log(self, record: dict) -> None:
        """One line of training_log.jsonl (rank 0), mirrored to TensorBoard when asked."""
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key in ("loss", "lr", "exact_match", "f1"):
                if key in record:
                    self.tensorboard.add_scalar(f"{'train' if key in ('loss', 'lr') else 'eval'}/{key}",
                                                record[key], record["step"])
            self.tensorboard.flush()

    def stop_requested(self) -> bool:
        """Whether any rank received a stop signal: every rank stops at the same step."""
        return self.ctx.any_rank(self.stop.requested is not None)

    def save_state(self, epoch: int, steps_in_epoch: int, epoch_finished: bool, global_step: int,
                   loss_sum: float = 0.0, loss_count: int = 0, evaluation_pending: bool = False) -> None:
        """The resumable state (rank 0): weights, optimizer, scheduler, scaler and the position in the epoch.

        `evaluation_pending`: the finished epoch is still to be evaluated; the log says whether that happened.
        """
        if not self.ctx.is_main:
            return
        save_checked({"epoch": epoch, "steps_in_epoch": steps_in_epoch, "epoch_finished": epoch_finished,
                      "evaluation_pending": evaluation_pending, "global_step": global_step,
                      "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                      "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                      "scaler": self.scaler.state_dict(), "settings": self.settings, "paths": self.paths,
                      "loss_sum": loss_sum, "loss_count": loss_count, "precision": precision_name(self.amp_dtype)},
                     self.output_dir / STATE_NAME)

    def stopped(self, global_step: int) -> TrainingStopped:
        sig = self.stop.requested
        message = (f"train.py: stopped by {sig.name if sig else 'a signal on another rank'} after optimizer step "
                   f"{global_step}; the resumable state is in {self.output_dir / STATE_NAME}; to continue, run the "
                   f"same command with --resume") if self.ctx.is_main else ""
        return TrainingStopped(message, 128 + (sig or signal.SIGTERM))

    def write_curves(self) -> None:
        try:
            plot_training_curves(read_log(self.log_file), self.output_dir / CURVES_NAME)
        except ImportError:
            logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", CURVES_NAME)


def precision_name(amp_dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]


def load_resume_state(run_dir: Path, settings: dict, paths: dict) -> dict | None:
    """The newest resumable state in `run_dir`, if its settings match this run's (None: nothing to resume;
    `check_output_dir` has refused a directory holding a run without a state)."""
    path = run_dir / STATE_NAME
    if not path.is_file():
        logger.warning("--resume: no %s in %s, starting from the first epoch", STATE_NAME, run_dir)
        return None
    state = read_training_state(path, STATE_KEYS, "train.py")
    check_same_settings(state["settings"], settings, state["paths"], paths)
    return state


def collate_tensors(indices: list[int], features: FeatureTable, **settings) -> dict[str, torch.Tensor]:
    """`collate_features` as tensors (sharing the numpy arrays' memory): the DataLoader's collate_fn."""
    return {name: torch.from_numpy(array) for name, array in collate_features(features, indices, **settings).items()}


def train_one_epoch(run: TrainingRun, features: FeatureTable, batches: list[np.ndarray], weights: list[float], *,
                    epoch: int,
                    first_step: int, global_step: int,
                    pending_loss: tuple[float, int] = (0.0, 0)) -> tuple[int, bool]:
    """This rank's batches of `epoch` from optimizer step `first_step` on (see `rank_batches`).

    Returns the global step reached and whether a stop signal ended the epoch early (its state then written).
    Skipped steps cost nothing: their batches are sliced off before the loader collates anything.
    """
    args, ctx, device = run.args, run.ctx, run.device
    accumulation = args.gradient_accumulation_steps
    steps_in_epoch = len(batches) // accumulation
    collate = partial(collate_tensors, features=features, is_training=True,
                      **compile_padding(args, rows=args.train_batch_size, max_width=args.max_seq_length))
    distill = {}
    if run.teacher is not None:
        collate = partial(run.teacher.collate, collate=collate)
        distill = {"distill_alpha": run.teacher.alpha, "distill_temperature": run.teacher.temperature}
    # The dataset is the window numbers: each batch is cut from the feature table only when collated.
    loader = DataLoader(range(len(features)), batch_sampler=batches[first_step * accumulation:], collate_fn=collate,
                        pin_memory=device.type == "cuda")
    loss_sum = torch.full((), pending_loss[0], device=device)  # read back only when shown: no sync per step
    loss_count = pending_loss[1]
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    progress = tqdm(total=min(steps_in_epoch, first_step + run.total_steps - global_step), initial=first_step,
                    desc=f"epoch {epoch}", unit="step",
                    disable=args.quiet or not ctx.is_main)
    step = first_step
    run.train_model.train()
    for micro_step, (batch, weight) in enumerate(zip(loader, weights[first_step * accumulation:])):
        if micro_step % accumulation == 0:
            torch.manual_seed(step_seed(args.seed, epoch, step, ctx.rank))
        is_update = (micro_step + 1) % accumulation == 0  # rank_batches gives whole groups
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # Gradients are all-reduced only on the micro-step that updates the weights.
        sync = contextlib.nullcontext() if is_update or not ctx.enabled else run.train_model.no_sync()
        with sync:
            with autocast_context(device, run.amp_dtype):
                loss = run.train_model(**inputs, **distill) * weight
            run.scaler.scale(loss / accumulation).backward()
        loss = loss.detach()
        first_bad_step = torch.where(~torch.isfinite(loss) & (first_bad_step < 0), global_step + 1, first_bad_step)
        loss_sum += loss
        loss_count += 1
        if not is_update:
            continue
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        global_step += 1
        step += 1
        progress.update(1)
        finished = step == steps_in_epoch or global_step >= run.total_steps
        if global_step % args.logging_steps == 0 or finished:
            mean_loss = read_loss(loss_sum, loss_count, first_bad_step, ctx)
            lr = run.scheduler.get_last_lr()[0]
            progress.set_postfix(step=global_step, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if ctx.is_main:
                run.log({"epoch": epoch, "step": global_step, "loss": mean_loss, "lr": lr})
            loss_sum.zero_()
            loss_count = 0
        if finished:
            break  # the epoch's end writes the state
        stopping = run.stop_requested()
        if stopping or (args.save_steps and global_step % args.save_steps == 0):
            # Never save weights that a non-finite loss has already touched.
            read_loss(loss_sum, loss_count, first_bad_step, ctx)
            run.save_state(epoch, step, False, global_step, float(loss_sum), loss_count)
            if stopping:
                progress.close()
                return global_step, True
    progress.close()
    return global_step, False


def finish_epoch(run: TrainingRun, epoch: int, global_step: int, eval_data) -> bool:
    """After an epoch: its checkpoint and the resumable state, then `evaluate_epoch`.

    Returns whether a stop signal came (then the evaluation is skipped or cut short: a grace period is short)."""
    if run.ctx.is_main:
        checkpoint = run.output_dir / f"korquad_{epoch}.bin"
        # CPU tensors, so the file loads anywhere, also with a plain torch.load.
        save_checked({k: v.detach().cpu() for k, v in run.model.state_dict().items()}, checkpoint)
        # Written before the evaluation: a kill during it leaves a state that says the evaluation is due.
        run.save_state(epoch, 0, True, global_step, evaluation_pending=eval_data is not None)
        logger.info("epoch %d done at step %d: wrote %s", epoch, global_step, checkpoint)
    if run.stop_requested():
        return True
    return evaluate_epoch(run, epoch, global_step, eval_data)


def evaluate_epoch(run: TrainingRun, epoch: int, global_step: int, eval_data) -> bool:
    """With --eval_file, EM/F1 of the model as `epoch` left it, logged; then the kept checkpoints.

    Returns whether a stop signal came; one during the evaluation ends it at once, unrecorded (the state
    still says it is pending, so --resume does it again)."""
    ctx, args = run.ctx, run.args
    interrupted = False
    if ctx.is_main and eval_data is not None:
        eval_examples, eval_features = eval_data
        eval_model = StopBetweenBatches(run.eval_model, run.stop)
        try:
            if args.version_2_with_negative:
                record = {"epoch": epoch, "step": global_step,
                          **evaluate_no_answer(run, eval_model, eval_examples, eval_features)}
            else:
                predictions, nbest = evaluate_model(eval_model, eval_examples, eval_features, args, run.device,
                                                    run.amp_dtype, args.eval_batch_size)
                result = korquad2.score(args.eval_file, korquad2.html_predictions(eval_examples, predictions, nbest)) \
                    if korquad2.has_html_examples(eval_examples) else score(args.eval_file, predictions)
                logger.info("epoch %d on %s: exact_match %.2f, f1 %.2f", epoch, args.eval_file,
                            result["exact_match"], result["f1"])
                record = {"epoch": epoch, "step": global_step, "exact_match": result["exact_match"],
                          "f1": result["f1"]}
        except EvaluationStopped:
            interrupted = True
            logger.info("evaluation of epoch %d interrupted; --resume does it again", epoch)
        else:
            run.log(record)
            run.evaluations.append(record)
            run.write_curves()
    if ctx.is_main and args.save_total_limit is not None and not interrupted:
        remove_old_checkpoints(run.output_dir, epoch, args.save_total_limit, best_evaluation(run.evaluations))
    return run.stop_requested()  # every rank learns here of a signal any rank got (rank 0's: in the evaluation)


def evaluate_no_answer(run: TrainingRun, model: torch.nn.Module, examples, features) -> dict:
    """SQuAD 2.0 scores of an unanswerable-question dev file at --null_score_diff_threshold, and the
    threshold tuned on it (logged: pass it to eval.py/predict.py, or let eval.py tune with best_f1)."""
    args = run.args
    predictions, _, odds = evaluate_model_with_odds(model, examples, features, args, run.device,
                                                    run.amp_dtype, args.eval_batch_size)
    result = score_no_answer(args.eval_file, "squad2", predictions, odds, args.null_score_diff_threshold)
    logger.info("on %s: exact %.2f, f1 %.2f (HasAns f1 %s, NoAns f1 %s) at null_score_diff_threshold %g; "
                "tuned null_score_diff_threshold %.6g gives best_f1 %.2f", args.eval_file, result["exact"],
                result["f1"], _percent(result.get("HasAns_f1")), _percent(result.get("NoAns_f1")),
                args.null_score_diff_threshold, result["best_f1_thresh"], result["best_f1"])
    return {"exact_match": result["exact"], "f1": result["f1"], "HasAns_f1": result.get("HasAns_f1"),
            "NoAns_f1": result.get("NoAns_f1"), "best_f1": result["best_f1"],
            "best_f1_thresh": result["best_f1_thresh"]}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def remove_old_checkpoints(output_dir: Path, last_epoch: int, limit: int, best: dict | None) -> None:
    """Keep the newest `limit` epoch checkpoints up to `last_epoch`, and the best-scoring one."""
    keep = set(range(last_epoch - limit + 1, last_epoch + 1)) | ({best["epoch"]} if best else set())
    for epoch in range(last_epoch + 1):
        if epoch not in keep:
            (output_dir / f"korquad_{epoch}.bin").unlink(missing_ok=True)


def check_eval_file(path: str) -> None:
    """--eval_file found and readable now, not after the train features are built."""
    eval_path = Path(path)
    if not eval_path.exists():
        raise UsageError(f"--eval_file {path}: not found")
    if eval_path.is_file():
        try:
            with open(eval_path, "rb") as file:
                file.read(1)
        except OSError as err:
            raise UsageError(f"--eval_file {path}: cannot read it ({err.strerror or err})") from None


def read_eval_examples(args: argparse.Namespace) -> list:
    """--eval_file's questions, read before the train features are built so that a fault in them (or one the
    metric cannot score) is said now, not after the first epoch and again on every --resume."""
    check_metric_dataset(args.eval_file, "squad2" if args.version_2_with_negative else "korquad", "--eval_file")
    examples = read_squad_examples(args.eval_file, False, args.version_2_with_negative)
    if not has_answers(examples):
        raise UsageError(f"--eval_file {args.eval_file} has no answers to score against")
    return examples


def import_summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ctx, device = setup_distributed(args.no_cuda)
    setup_logging(args.quiet or not ctx.is_main)
    try:
        run_training(args, ctx, device)
        # Ranks leave together: one that tears gloo down while rank 0 still writes its last files can abort
        # (SIGABRT, "terminate called without an active exception") and fail a run that succeeded.
        ctx.barrier()
    finally:
        if ctx.enabled:
            dist.destroy_process_group()


def run_training(args: argparse.Namespace, ctx: Distributed, device: torch.device) -> None:
    if args.checkpoint.lower() != "none":
        args.checkpoint = fetch_hub_model(args.checkpoint)
    config = resolve_model_settings(args, args.checkpoint)
    check_data_args(args, config)
    check_version_2(args)
    if args.eval_file:
        check_eval_file(args.eval_file)
    check_compile_args(args, device)
    autocast_dtype(args, device)  # a precision this device lacks is said before --output_dir is made
    if args.checkpoint.lower() != "none" and not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: file not found; download the pretrained checkpoint "
                         f"as pretrain_ckpt/README.md says, or pass --checkpoint none to train from scratch")
    if args.tensorboard:
        import_summary_writer()  # a missing package is said now, not after the features are built
    check_output_dir(args, "training")
    eval_examples = ctx.on_main(lambda: read_eval_examples(args)) if args.eval_file else None  # rank 0 evaluates
    output_dir = prepare_output_dir(args.output_dir)
    # One writer per directory: rank 0 holds the lock for the whole job, before anything is written.
    lock = RunLock(output_dir)
    ctx.on_main(lock.acquire)
    try:
        if ctx.is_main:
            remove_dead_temp_files(output_dir)
        train_in_locked_dir(args, ctx, device, config, output_dir, eval_examples)
    finally:
        if ctx.is_main:
            lock.release()


def train_in_locked_dir(args: argparse.Namespace, ctx: Distributed, device: torch.device, config: Config,
                        output_dir: Path, eval_examples: list | None) -> None:
    amp_dtype = autocast_dtype(args, device)
    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    targets = None
    if args.teacher_targets is not None:
        targets = read_targets_for(args, file_digest("--train_file", args.train_file))
        args.teacher_targets_key = targets.key
    settings = run_settings(args, config, tokenizer.do_lower_case, ctx.world_size)
    paths = {"--train_file": str(args.train_file), "--vocab_file": str(args.vocab_file)}
    if targets is not None:  # a refused resume names the targets' directories (compared by their key)
        paths["--teacher_targets"] = str(args.teacher_targets)
    state = load_resume_state(output_dir, settings, paths) if args.resume else None
    if ctx.enabled and args.preprocess_workers > 1:
        # Forking tokenizer workers from a process whose process group (and CUDA) threads are
        # running can deadlock; build the cache once in a single-process run to get both.
        logger.warning("--preprocess_workers is 1 under torchrun")
        args.preprocess_workers = 1

    # Rank 0 builds (and caches) the features first; the others then read its cache. Learning from the
    # teacher alone needs no gold answer: every question's windows, as for prediction.
    teacher_only = targets is not None and args.distill_alpha == 1
    window_settings = dict(is_training=not teacher_only, cache_dir=args.cache_dir,
                           overwrite_cache=args.overwrite_cache and ctx.is_main, num_workers=args.preprocess_workers,
                           progress=not args.quiet, version_2_with_negative=args.version_2_with_negative)
    if targets is None:
        # Without a teacher only the windows are needed: a cache hit reads no JSON, so a rank holds
        # little beyond the shared, memory-mapped table.
        examples, features = None, ctx.main_first(lambda: load_or_build_table(
            args.train_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
            **window_settings))
    else:  # the teacher's targets are found by question id
        examples, features = ctx.main_first(lambda: load_or_build_features(
            args.train_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
            **window_settings))
    if not len(features):
        raise UsageError(f"--train_file {args.train_file}: no usable training questions")
    optimizer_steps_per_epoch, total_steps, num_epochs = plan_steps(features, args, ctx)
    teacher = teacher_for(args, targets, examples, features) if targets is not None else None
    eval_data = None
    if args.eval_file:
        eval_data = ctx.on_main(lambda: load_or_build_features(
            args.eval_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
            is_training=False, cache_dir=args.cache_dir, overwrite_cache=args.overwrite_cache,
            num_workers=args.preprocess_workers, progress=not args.quiet,
            version_2_with_negative=args.version_2_with_negative, examples=eval_examples))

    torch.manual_seed(args.seed)
    model = QuestionAnswering(config)
    if state is not None:
        model.load_state_dict(state["model"])
    elif args.checkpoint.lower() == "none":
        logger.warning("--checkpoint none: training from random initialisation (expect far lower scores)")
    else:
        load_checkpoint(model, args.checkpoint)
    # The span head never reads the pooler; frozen, it keeps its pretrained weights and DDP
    # does not wait for gradients that never come.
    model.bert.pooler.requires_grad_(False)

    model.to(device)
    optimizer = build_optimizer(model, args, device)
    scheduler = linear_warmup_decay(optimizer, int(total_steps * args.warmup_proportion), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, first_step, global_step, pending_loss = 0, 0, 0, (0.0, 0)
    if state is not None:
        # Allowed (a bf16 run on an A100 resumed in fp16 on a T4), but said: the run then mixes number formats.
        if state.get("precision", precision_name(amp_dtype)) != precision_name(amp_dtype):
            logger.warning("--resume: the interrupted run trained in %s, this one goes on in %s",
                           state["precision"], precision_name(amp_dtype))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        elif scaler.is_enabled():
            logger.info("the interrupted run did not use fp16: starting a fresh gradient scaler")
        global_step = state["global_step"]
        if state["epoch_finished"]:
            start_epoch = state["epoch"] + 1
        else:
            start_epoch, first_step = state["epoch"], state["steps_in_epoch"]
            pending_loss = (state["loss_sum"], state["loss_count"])
        logger.info("resuming at epoch %d, step %d of %d (optimizer step %d)", start_epoch, first_step,
                    optimizer_steps_per_epoch, global_step)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.enabled else model
    train_model = compile_model(train_model, args, device, max_width=args.max_seq_length)

    run = TrainingRun(args, ctx, device, amp_dtype, output_dir, model, train_model, optimizer, scheduler, scaler,
                      settings, paths, total_steps, teacher)
    if ctx.is_main:
        # Training starts now: only from here on does this run change what is in output_dir.
        if args.overwrite_output_dir:
            remove_previous_run(output_dir)
        keep_log_until(run.log_file, global_step)
        run.evaluations = [r for r in read_log(run.log_file) if "f1" in r]
        write_json_atomic(config.to_dict(), output_dir / SAVED_CONFIG_NAME)
        copy_vocab_into(args.vocab_file, output_dir)
        saved_args = {name: value for name, value in vars(args).items() if name != "explicit_flags"}
        write_json_atomic({**saved_args, "world_size": ctx.world_size,
                           "global_batch_size": args.train_batch_size * ctx.world_size
                           * args.gradient_accumulation_steps}, output_dir / SAVED_ARGS_NAME)
        if args.tensorboard:
            # purge_step drops what a resumed run logs again (the interrupted run's steps past its state).
            run.tensorboard = import_summary_writer()(str(output_dir / "tensorboard"),
                                                      purge_step=global_step + 1 if state is not None else None)
    logger.info("%d questions, %d features; %d parameters; %d epochs of %d optimizer steps; global batch %d "
                "(%d per rank x %d ranks x %d accumulation steps); device %s, autocast %s", features.num_examples,
                len(features), count_parameters(model), num_epochs, optimizer_steps_per_epoch,
                args.train_batch_size * ctx.world_size * args.gradient_accumulation_steps, args.train_batch_size,
                ctx.world_size, args.gradient_accumulation_steps, device, amp_dtype)

    try:
        with run.stop:
            if state is not None and state["epoch_finished"] and state.get("evaluation_pending", False):
                # Interrupted between the epoch's state and its score: the state's weights are the epoch's.
                done = any(r["epoch"] == state["epoch"] for r in run.evaluations)
                if ctx.is_main and eval_data is None and not done:
                    logger.warning("epoch %d was not evaluated (interrupted); without --eval_file it stays so",
                                   state["epoch"])
                if evaluate_epoch(run, state["epoch"], global_step, None if done else eval_data):
                    raise run.stopped(global_step)
            for epoch in range(start_epoch, num_epochs):
                if global_step >= total_steps:
                    break
                batches, weights = epoch_batches(features, args, ctx, epoch)
                global_step, stopped = train_one_epoch(run, features, batches, weights, epoch=epoch,
                                                       first_step=first_step, global_step=global_step,
                                                       pending_loss=pending_loss)
                first_step, pending_loss = 0, (0.0, 0)
                if not stopped:
                    stopped = finish_epoch(run, epoch, global_step, eval_data)
                ctx.barrier()
                if stopped:
                    raise run.stopped(global_step)
        if ctx.is_main:
            finish_run(run)
    finally:
        if run.tensorboard is not None:
            run.tensorboard.close()


def finish_run(run: TrainingRun) -> None:
    """Curves, and with --eval_file the last epoch's scores and the best epoch (the last stdout line)."""
    run.write_curves()
    best = best_evaluation(run.evaluations)
    if best is None:
        return
    logger.info("best epoch %d: exact_match %.2f, f1 %.2f (%s)", best["epoch"], best["exact_match"], best["f1"],
                run.output_dir / f"korquad_{best['epoch']}.bin")
    last = run.evaluations[-1]
    print(json.dumps({"exact_match": last["exact_match"], "f1": last["f1"], "epoch": last["epoch"],
                      "best_epoch": best["epoch"], "best_exact_match": best["exact_match"], "best_f1": best["f1"]}))


def cli(argv: Sequence[str] | None = None) -> None:
    """main, with a stop signal turned into its one line and exit status 128 + the signal number."""
    try:
        main(argv)
    except TrainingStopped as stop:
        if stop.message:
            print(stop.message, file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    run_cli(cli, USER_ERRORS + (TrainingDiverged, CheckpointWriteError, DirectoryLocked))

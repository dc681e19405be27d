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
import errno
import hashlib
import json
import logging
import math
import os
import pickle
import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TypeVar
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cli_common import (SAVED_ARGS_NAME, SAVED_CONFIG_NAME, USER_ERRORS, ArgumentParser, UsageError, add_compile_args,
                        add_data_args, autocast_context, autocast_dtype, build_tokenizer, check_checkpoint_file,
                        check_compile_args, check_data_args, compile_model, compile_padding, copy_vocab_into,
                        evaluate_model, fetch_hub_model, finite_float, has_answers, pick_device, positive_float,
                        positive_int, prepare_output_dir, resolve_model_settings, run_cli, save_torch_atomic, score,
                        setup_logging, write_json_atomic)
from korquad_utils import (FeatureTable, atomic_write, collate_features, load_or_build_features,
                           make_length_grouped_batches)
from long_run import DirectoryLocked, RunLock, StopSignals, plot_training_curves, read_log, remove_dead_temp_files
from modeling import Config, QuestionAnswering, count_parameters, load_checkpoint

logger = logging.getLogger("korquad")

STATE_NAME = "training_state.pt"
LOG_NAME = "training_log.jsonl"
CURVES_NAME = "training_curves.png"
STATE_KEYS = ("epoch", "steps_in_epoch", "epoch_finished", "global_step", "model", "optimizer", "scheduler",
              "scaler", "settings", "paths", "loss_sum", "loss_count")
T = TypeVar("T")
NO_DECAY = ("bias", "LayerNorm.weight", "attention_norm.weight", "ffn_norm.weight")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint or training state could not be written (disk full, file-size limit)."""


class TrainingStopped(Exception):
    """SIGTERM or SIGINT stopped the run after writing a resumable state; `message` says how to resume."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    cpu_group: object = None  # a gloo group for small CPU-side agreements (None: the default group)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, work: Callable[[], T]) -> T | None:
        """Run `work` on rank 0 only (None elsewhere); if it fails there, every rank stops."""
        if not self.enabled:
            return work()
        result = None
        if self.is_main:
            try:
                result = work()
            except BaseException:
                self._all_succeeded(False)
                raise
        if not self._all_succeeded(True):
            raise UsageError("rank 0 failed while preparing the data; its error message says why")
        return result

    def main_first(self, work: Callable[[], T]) -> T:
        """Run `work` on rank 0, then on the other ranks (which then find rank 0's cache)."""
        result = self.on_main(work)
        return result if self.is_main else work()

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is set on any rank (a CPU all-reduce: no GPU sync)."""
        if not self.enabled:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(value.item())

    def _all_succeeded(self, ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def setup_distributed(no_cuda: bool) -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (NCCL on GPUs, gloo on CPUs)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Distributed(), pick_device(no_cuda)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(no_cuda)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    cpu_group = dist.new_group(backend="gloo") if device.type == "cuda" else None
    return Distributed(int(os.environ["RANK"]), world_size, local_rank, device, cpu_group), device


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Fine-tune BERT-small on KorQuAD v1.0.")
    parser.add_argument("--train_file", default="data/KorQuAD_v1.0_train.json", help="KorQuAD-format training JSON.")
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
    parser.add_argument("--learning_rate", type=positive_float, default=5e-5, help="Peak AdamW learning rate.")
    parser.add_argument("--num_train_epochs", type=positive_float, default=4.0,
                        help="Epochs to train (a fraction ends mid-epoch).")
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
    parser.add_argument("--tensorboard", action="store_true",
                        help="Also log loss, learning rate and EM/F1 for TensorBoard in output_dir/tensorboard.")
    parser.add_argument("--quiet", action="store_true", help="Warnings only, no progress bars.")
    add_data_args(parser)
    add_compile_args(parser)
    args = parser.parse_args(argv)
    if Path(args.checkpoint).is_dir():
        check_checkpoint_file(args.checkpoint)  # says what to pass instead of a directory
    return args


def build_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (none on biases and LayerNorm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, eps=args.adam_epsilon, fused=device.type == "cuda")


def linear_warmup_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Learning rate rising linearly over the warm-up, then falling linearly to zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def file_digest(flag: str, path: str | os.PathLike) -> str:
    """sha256 of a file's contents: what identifies a train file or vocab, whatever its name."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    return digest.hexdigest()


def run_settings(args: argparse.Namespace, config: Config, do_lower_case: bool, world_size: int) -> dict:
    """Everything that shapes a run's trajectory, under the names a user knows; `--resume` must find them unchanged.

    The global batch counts, not its split over ranks and accumulation steps (`rank_batches` trains alike).
    """
    return {
        "--train_file": file_digest("--train_file", args.train_file),
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


def check_same_settings(saved: dict, current: dict, saved_paths: dict, current_paths: dict) -> None:
    """Refuse a resume whose settings differ from the interrupted run's, naming the first difference."""
    advice = "resume with the interrupted run's settings, or train into a new --output_dir"
    for name, now in current.items():
        was = saved.get(name)
        if was == now:
            continue
        if name in current_paths:  # files: compared by contents, shown by name
            raise UsageError(f"--resume: {name} {current_paths[name]} (sha256 {now[:12]}) differs from the "
                             f"interrupted run's {saved_paths.get(name)} (sha256 {str(was)[:12]}); {advice}")
        if isinstance(now, dict) and isinstance(was, dict):
            key = next(k for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k))
            raise UsageError(f"--resume: {name} {key} was {was.get(key)} in the interrupted run, now {now.get(key)}; "
                             f"{advice}")
        raise UsageError(f"--resume: {name} was {was} in the interrupted run, now {now}; {advice}")


def read_training_state(path: Path) -> dict:
    """A training state written by this train.py, read safely; anything else is refused with what it is not."""
    what = "not a training state written by train.py"
    remedy = "delete it to start over, or train into a new --output_dir"
    if path.stat().st_size == 0:
        raise UsageError(f"{path}: empty file, {what}; {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False: wrong for a damaged file, unsafe for a malicious one.
        raise UsageError(f"{path}: {what} (it holds objects other than tensors and plain values; "
                         f"nothing in it was run); {remedy}") from None
    except Exception:  # truncated, not a zip/pickle at all: torch raises several types
        raise UsageError(f"{path}: {what} (damaged or not a torch file); {remedy}") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path}: {what} (it holds a {type(state).__name__}); {remedy}")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise UsageError(f"{path}: {what} or by an older version (no {', '.join(missing)}); {remedy}")
    return state


def save_checked(obj, path: Path) -> None:
    """`save_torch_atomic`, with a failed write (disk full, file-size limit) as one line that says nothing was lost."""
    try:
        save_torch_atomic(obj, path)
    except (OSError, RuntimeError) as err:
        # torch reports a failed write as a RuntimeError whose context is the OSError that says why.
        cause = err if isinstance(err, OSError) else err.__context__
        code = cause.errno if isinstance(cause, OSError) else None
        reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                  errno.EFBIG: "the file-size limit is reached"}.get(code) or " ".join(str(cause or err).split())
        raise CheckpointWriteError(f"{path}: could not be written ({reason}); nothing was replaced, the previous "
                                   f"{path.name} (if any) is intact; free space, then rerun with --resume") from None


def step_seed(seed: int, epoch: int, step_in_epoch: int, rank: int) -> int:
    """The random seed of one optimizer step: dropout depends on where a step is, not on how the run got there,
    so a run resumed mid-epoch draws what an uninterrupted one would have drawn."""
    return int(np.random.SeedSequence([seed, epoch, step_in_epoch, rank]).generate_state(1, np.uint64)[0])


def keep_log_until(log_file: Path, last_step: int) -> None:
    """Drop log lines past `last_step` (all of them for a fresh run; what a resumed run will redo)."""
    if not log_file.is_file():
        return
    lines = log_file.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write(log_file, lambda file: file.write("".join(line + "\n" for line in kept).encode("utf-8")))


def best_evaluation(evaluations: Sequence[dict]) -> dict | None:
    """The evaluated epoch with the highest F1 (then EM; the earliest on a tie)."""
    return max(evaluations, key=lambda e: (e["f1"], e["exact_match"]), default=None)


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
                   loss_sum: float = 0.0, loss_count: int = 0) -> None:
        """The resumable state (rank 0): weights, optimizer, scheduler, scaler and the position in the epoch."""
        if not self.ctx.is_main:
            return
        save_checked({"epoch": epoch, "steps_in_epoch": steps_in_epoch, "epoch_finished": epoch_finished,
                      "global_step": global_step,
                      "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                      "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                      "scaler": self.scaler.state_dict(), "settings": self.settings, "paths": self.paths,
                      "loss_sum": loss_sum, "loss_count": loss_count}, self.output_dir / STATE_NAME)

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


def load_resume_state(run_dir: Path, settings: dict, paths: dict) -> dict | None:
    """The newest resumable state in `run_dir`, if its settings match this run's (None: nothing to resume)."""
    path = run_dir / STATE_NAME
    if not path.is_file():
        logger.warning("--resume: no %s in %s, starting from the first epoch", STATE_NAME, run_dir)
        return None
    state = read_training_state(path)
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
    # The dataset is the window numbers: each batch is cut from the feature table only when collated.
    loader = DataLoader(range(len(features)), batch_sampler=batches[first_step * accumulation:], collate_fn=collate,
                        pin_memory=device.type == "cuda")
    loss_sum = torch.full((), pending_loss[0], device=device)  # read back only when shown: no sync per step
    loss_count = pending_loss[1]
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    progress = tqdm(total=steps_in_epoch, initial=first_step, desc=f"epoch {epoch}", unit="step",
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
                loss = run.train_model(**inputs) * weight
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


def read_loss(loss_sum: torch.Tensor, count: int, first_bad_step: torch.Tensor, ctx: Distributed) -> float:
    """The mean loss since the last read-out over all ranks; raises on every rank if any saw a non-finite loss."""
    mean_loss = (loss_sum / max(count, 1)).reshape(1)
    bad_step = first_bad_step.reshape(1).clone()
    if ctx.enabled:
        dist.all_reduce(mean_loss)
        mean_loss /= ctx.world_size
        dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
    mean, bad = mean_loss.item(), int(bad_step.item())
    if bad >= 0:
        raise TrainingDiverged(f"non-finite loss at optimizer step {bad}; stopped without writing this epoch's "
                               "checkpoint (try a lower --learning_rate)")
    return mean


def finish_epoch(run: TrainingRun, epoch: int, global_step: int, eval_data) -> bool:
    """After an epoch: its checkpoint and the resumable state; with --eval_file, EM/F1, the kept checkpoints, curves.

    Returns whether a stop signal came (then the evaluation is skipped: a grace period is short)."""
    ctx, args = run.ctx, run.args
    if ctx.is_main:
        checkpoint = run.output_dir / f"korquad_{epoch}.bin"
        # CPU tensors, so the file loads anywhere, also with a plain torch.load.
        save_checked({k: v.detach().cpu() for k, v in run.model.state_dict().items()}, checkpoint)
        run.save_state(epoch, 0, True, global_step)
        logger.info("epoch %d done at step %d: wrote %s", epoch, global_step, checkpoint)
    if run.stop_requested():
        return True
    if ctx.is_main and eval_data is not None:
        eval_examples, eval_features = eval_data
        predictions, _ = evaluate_model(run.eval_model, eval_examples, eval_features, args, run.device, run.amp_dtype,
                                        args.eval_batch_size)
        result = score(args.eval_file, predictions)
        logger.info("epoch %d on %s: exact_match %.2f, f1 %.2f", epoch, args.eval_file,
                    result["exact_match"], result["f1"])
        record = {"epoch": epoch, "step": global_step, "exact_match": result["exact_match"], "f1": result["f1"]}
        run.log(record)
        run.evaluations.append(record)
        run.write_curves()
    if ctx.is_main and args.save_total_limit is not None:
        remove_old_checkpoints(run.output_dir, epoch, args.save_total_limit, best_evaluation(run.evaluations))
    return False


def remove_old_checkpoints(output_dir: Path, last_epoch: int, limit: int, best: dict | None) -> None:
    """Keep the newest `limit` epoch checkpoints up to `last_epoch`, and the best-scoring one."""
    keep = set(range(last_epoch - limit + 1, last_epoch + 1)) | ({best["epoch"]} if best else set())
    for epoch in range(last_epoch + 1):
        if epoch not in keep:
            (output_dir / f"korquad_{epoch}.bin").unlink(missing_ok=True)


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
    finally:
        if ctx.enabled:
            dist.destroy_process_group()


def run_training(args: argparse.Namespace, ctx: Distributed, device: torch.device) -> None:
    if args.checkpoint.lower() != "none":
        args.checkpoint = fetch_hub_model(args.checkpoint)
    config = resolve_model_settings(args, args.checkpoint)
    check_data_args(args, config)
    check_compile_args(args, device)
    if args.checkpoint.lower() != "none" and not Path(args.checkpoint).exists():
        raise UsageError(f"--checkpoint {args.checkpoint}: file not found; download the pretrained checkpoint "
                         f"as pretrain_ckpt/README.md says, or pass --checkpoint none to train from scratch")
    if args.tensorboard:
        import_summary_writer()  # a missing package is said now, not after the features are built
    output_dir = prepare_output_dir(args.output_dir)
    # One writer per directory: rank 0 holds the lock for the whole job, before anything is written.
    lock = RunLock(output_dir)
    ctx.on_main(lock.acquire)
    try:
        if ctx.is_main:
            remove_dead_temp_files(output_dir)
        train_in_locked_dir(args, ctx, device, config, output_dir)
    finally:
        if ctx.is_main:
            lock.release()


def train_in_locked_dir(args: argparse.Namespace, ctx: Distributed, device: torch.device, config: Config,
                        output_dir: Path) -> None:
    amp_dtype = autocast_dtype(args, device)
    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    settings = run_settings(args, config, tokenizer.do_lower_case, ctx.world_size)
    paths = {"--train_file": str(args.train_file), "--vocab_file": str(args.vocab_file)}
    state = load_resume_state(output_dir, settings, paths) if args.resume else None
    if ctx.enabled and args.preprocess_workers > 1:
        # Forking tokenizer workers from a process whose process group (and CUDA) threads are
        # running can deadlock; build the cache once in a single-process run to get both.
        logger.warning("--preprocess_workers is 1 under torchrun")
        args.preprocess_workers = 1

    # Rank 0 builds (and caches) the features first; the others then read its cache.
    examples, features = ctx.main_first(lambda: load_or_build_features(
        args.train_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
        is_training=True, cache_dir=args.cache_dir, overwrite_cache=args.overwrite_cache and ctx.is_main,
        num_workers=args.preprocess_workers, progress=not args.quiet))
    if not len(features):
        raise UsageError(f"--train_file {args.train_file}: no usable training questions")
    eval_data = None
    if args.eval_file:
        def load_eval_data():
            examples_and_features = load_or_build_features(
                args.eval_file, tokenizer, args.max_seq_length, args.doc_stride, args.max_query_length,
                is_training=False, cache_dir=args.cache_dir, overwrite_cache=args.overwrite_cache,
                num_workers=args.preprocess_workers, progress=not args.quiet)
            if not has_answers(examples_and_features[0]):
                raise UsageError(f"--eval_file {args.eval_file} has no answers to score against")
            return examples_and_features
        eval_data = ctx.on_main(load_eval_data)  # only rank 0 evaluates

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
    lengths = features.lengths
    optimizer_steps_per_epoch = len(rank_batches(lengths, args, ctx, 0)[0]) // args.gradient_accumulation_steps
    if args.max_steps:
        total_steps = args.max_steps
        num_epochs = math.ceil(total_steps / max(1, optimizer_steps_per_epoch))
    else:
        total_steps = max(1, int(optimizer_steps_per_epoch * args.num_train_epochs))
        num_epochs = math.ceil(args.num_train_epochs)

    model.to(device)
    optimizer = build_optimizer(model, args, device)
    scheduler = linear_warmup_decay(optimizer, int(total_steps * args.warmup_proportion), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, first_step, global_step, pending_loss = 0, 0, 0, (0.0, 0)
    if state is not None:
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
                      settings, paths, total_steps)
    if ctx.is_main:
        keep_log_until(run.log_file, global_step)
        run.evaluations = [r for r in read_log(run.log_file) if "f1" in r]
        write_json_atomic(config.to_dict(), output_dir / SAVED_CONFIG_NAME)
        copy_vocab_into(args.vocab_file, output_dir)
        write_json_atomic({**vars(args), "world_size": ctx.world_size,
                           "global_batch_size": args.train_batch_size * ctx.world_size
                           * args.gradient_accumulation_steps}, output_dir / SAVED_ARGS_NAME)
        if args.tensorboard:
            # purge_step drops what a resumed run logs again (the interrupted run's steps past its state).
            run.tensorboard = import_summary_writer()(str(output_dir / "tensorboard"),
                                                      purge_step=global_step + 1 if state is not None else None)
    logger.info("%d questions, %d features; %d parameters; %d epochs of %d optimizer steps; global batch %d "
                "(%d per rank x %d ranks x %d accumulation steps); device %s, autocast %s", len(examples),
                len(features), count_parameters(model), num_epochs, optimizer_steps_per_epoch,
                args.train_batch_size * ctx.world_size * args.gradient_accumulation_steps, args.train_batch_size,
                ctx.world_size, args.gradient_accumulation_steps, device, amp_dtype)

    try:
        with run.stop:
            for epoch in range(start_epoch, num_epochs):
                if global_step >= total_steps:
                    break
                batches, weights = rank_batches(lengths, args, ctx, epoch)
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

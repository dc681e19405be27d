"""Fine-tune BERT-small on KorQuAD v1.0, on one device or several through torchrun.

    python3 train.py --output_dir=output --checkpoint=pretrain_ckpt/bert_small_ckpt.bin \
        --model_config=data/bert_small.json --train_file=data/KorQuAD_v1.0_train.json
    torchrun --nproc_per_node=4 train.py ...      # DistributedDataParallel, one shard per rank

Writes `output_dir/korquad_{epoch}.bin` (a plain state dict: `bert.*` + `qa_outputs.*`) after each
epoch, with `config.json` and `training_args.json` beside it, and `training_state.pt` for `--resume`.
The global batch is train_batch_size x ranks x gradient_accumulation_steps.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass
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

from cli_common import (SAVED_ARGS_NAME, SAVED_CONFIG_NAME, USER_ERRORS, UsageError, add_compile_args, add_data_args,
                        autocast_context, autocast_dtype, build_tokenizer, check_compile_args, check_data_args,
                        compile_model, compile_padding, evaluate_model, has_answers, pick_device, prepare_output_dir,
                        run_cli, save_torch_atomic, score, setup_logging, write_json_atomic)
from korquad_utils import atomic_write, collate_features, load_or_build_features, make_length_grouped_batches
from modeling import Config, QuestionAnswering, count_parameters, load_checkpoint

logger = logging.getLogger("korquad")

ROOT = Path(__file__).resolve().parent
STATE_NAME = "training_state.pt"
T = TypeVar("T")
NO_DECAY = ("bias", "LayerNorm.weight", "attention_norm.weight", "ffn_norm.weight")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Distributed:
    """Where this process stands in a torchrun job (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

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
    return Distributed(int(os.environ["RANK"]), world_size, local_rank, device), device


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune BERT-small on KorQuAD v1.0.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--train_file", default="data/KorQuAD_v1.0_train.json")
    parser.add_argument("--output_dir", default="output")
    parser.add_argument("--checkpoint", default="pretrain_ckpt/bert_small_ckpt.bin",
                        help="pretrained encoder (or a fine-tuned checkpoint); 'none' = random initialisation")
    parser.add_argument("--model_config", "--config_name", dest="model_config",
                        default=str(ROOT / "data" / "bert_small.json"))
    parser.add_argument("--vocab_file", default=str(ROOT / "data" / "ko_vocab_32k.txt"))
    parser.add_argument("--train_batch_size", type=int, default=16, help="features per step on each rank")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--num_train_epochs", type=float, default=4.0)
    parser.add_argument("--warmup_proportion", type=float, default=0.1)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--adam_epsilon", type=float, default=1e-6)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--eval_file", default=None, help="evaluate on this file after each epoch and log EM/F1")
    parser.add_argument("--eval_batch_size", type=int, default=64)
    parser.add_argument("--n_best_size", type=int, default=20)
    parser.add_argument("--logging_steps", type=int, default=50, help="optimizer steps between loss read-outs")
    parser.add_argument("--save_total_limit", type=int, default=None,
                        help="keep only the newest N korquad_{epoch}.bin files (default: keep all)")
    parser.add_argument("--resume", action="store_true", help="continue from the last finished epoch in --output_dir")
    parser.add_argument("--quiet", action="store_true", help="warnings only, no progress bars")
    add_data_args(parser)
    add_compile_args(parser)
    parser.set_defaults(analyzer="mecab")
    args = parser.parse_args(argv)
    for flag in ("train_batch_size", "gradient_accumulation_steps", "logging_steps", "eval_batch_size",
                 "save_total_limit", "preprocess_workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.num_train_epochs <= 0 or args.learning_rate <= 0:
        parser.error("--num_train_epochs and --learning_rate must be positive")
    if not 0 <= args.warmup_proportion < 1:
        parser.error("--warmup_proportion must be in [0, 1)")
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


def load_resume_state(output_dir: Path, model: torch.nn.Module, args: argparse.Namespace,
                      world_size: int) -> dict | None:
    """The saved training state of the last finished epoch, with that epoch's weights loaded into `model`."""
    path = output_dir / STATE_NAME
    if not path.is_file():
        logger.warning("--resume: no %s in %s, starting from the first epoch", STATE_NAME, output_dir)
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path}: unreadable training state ({str(err).splitlines()[0]})") from None
    for key in ("global_batch_size", "num_train_epochs", "learning_rate", "seed"):
        if state["schedule"][key] != schedule_settings(args, world_size)[key]:
            raise UsageError(f"--resume: {key} was {state['schedule'][key]} in the interrupted run; "
                             f"resume with the same settings (or a new --output_dir)")
    load_checkpoint(model, output_dir / f"korquad_{state['epoch']}.bin")
    return state


def keep_log_until(log_file: Path, last_step: int) -> None:
    """Drop loss-log lines past `last_step` (all of them for a fresh run; a resumed run's lost epoch)."""
    if not log_file.is_file():
        return
    lines = log_file.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write(log_file, lambda file: file.write("".join(line + "\n" for line in kept).encode("utf-8")))


def schedule_settings(args: argparse.Namespace, world_size: int) -> dict:
    """What the optimizer schedule depends on, checked when resuming."""
    return {"global_batch_size": args.train_batch_size * world_size * args.gradient_accumulation_steps,
            "num_train_epochs": args.num_train_epochs, "learning_rate": args.learning_rate,
            "seed": args.seed, "world_size": world_size}


def train_one_epoch(model, optimizer, scheduler, scaler, features, batches, weights, args, ctx: Distributed,
                    device: torch.device, amp_dtype, epoch: int, global_step: int, total_steps: int,
                    log_file: Path) -> int:
    """One pass over this rank's batches (see `rank_batches`); returns the global optimizer step reached."""
    collate = partial(collate_features, is_training=True,
                      **compile_padding(args, rows=args.train_batch_size, max_width=args.max_seq_length))
    loader = DataLoader(features, batch_sampler=batches, collate_fn=collate, pin_memory=device.type == "cuda")
    accumulation = args.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=device)       # read back only when shown: no sync per step
    loss_count = 0
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    progress = tqdm(total=len(batches) // accumulation, desc=f"epoch {epoch}", unit="step",
                    disable=args.quiet or not ctx.is_main)
    model.train()
    for micro_step, (batch, weight) in enumerate(zip(loader, weights)):
        is_update = (micro_step + 1) % accumulation == 0  # rank_batches gives whole groups
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        # Gradients are all-reduced only on the micro-step that updates the weights.
        sync = contextlib.nullcontext() if is_update or not ctx.enabled else model.no_sync()
        with sync:
            with autocast_context(device, amp_dtype):
                loss = model(**inputs) * weight
            scaler.scale(loss / accumulation).backward()
        loss = loss.detach()
        first_bad_step = torch.where(~torch.isfinite(loss) & (first_bad_step < 0), global_step + 1, first_bad_step)
        loss_sum += loss
        loss_count += 1
        if not is_update:
            continue
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        global_step += 1
        progress.update(1)
        if global_step % args.logging_steps == 0 or micro_step + 1 == len(batches) or global_step >= total_steps:
            mean_loss = read_loss(loss_sum, loss_count, first_bad_step, ctx)
            lr = scheduler.get_last_lr()[0]
            progress.set_postfix(step=global_step, loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if ctx.is_main:
                with open(log_file, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"epoch": epoch, "step": global_step, "loss": mean_loss, "lr": lr}) + "\n")
            loss_sum.zero_()
            loss_count = 0
        if global_step >= total_steps:
            break
    progress.close()
    return global_step


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
    config = Config.from_json_file(args.model_config)
    check_data_args(args, config)
    check_compile_args(args, device)
    if args.checkpoint.lower() != "none" and not Path(args.checkpoint).is_file():
        raise UsageError(f"--checkpoint {args.checkpoint}: file not found; download the pretrained checkpoint "
                         f"as pretrain_ckpt/README.md says, or pass --checkpoint none to train from scratch")
    output_dir = prepare_output_dir(args.output_dir)
    amp_dtype = autocast_dtype(args, device)
    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config)
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
    if not features:
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
    if args.checkpoint.lower() == "none":
        logger.warning("--checkpoint none: training from random initialisation (expect far lower scores)")
    else:
        load_checkpoint(model, args.checkpoint)
    # The span head never reads the pooler; frozen, it keeps its pretrained weights and DDP
    # does not wait for gradients that never come.
    model.bert.pooler.requires_grad_(False)
    lengths = [len(f.input_ids) for f in features]
    optimizer_steps_per_epoch = len(rank_batches(lengths, args, ctx, 0)[0]) // args.gradient_accumulation_steps
    total_steps = max(1, int(optimizer_steps_per_epoch * args.num_train_epochs))
    num_epochs = math.ceil(args.num_train_epochs)

    start_epoch, global_step, state = 0, 0, None
    if args.resume:
        state = load_resume_state(output_dir, model, args, ctx.world_size)
        if state is not None:
            start_epoch, global_step = state["epoch"] + 1, state["global_step"]
    model.to(device)
    optimizer = build_optimizer(model, args, device)
    scheduler = linear_warmup_decay(optimizer, int(total_steps * args.warmup_proportion), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        elif scaler.is_enabled():
            logger.info("the interrupted run did not use fp16: starting a fresh gradient scaler")
        logger.info("resumed after epoch %d (optimizer step %d)", state["epoch"], global_step)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.enabled else model
    train_model = compile_model(train_model, args, device, max_width=args.max_seq_length)
    eval_model = model if ctx.enabled else train_model  # rank 0 alone evaluates: not through DDP

    log_file = output_dir / "training_log.jsonl"
    if ctx.is_main:
        keep_log_until(log_file, global_step)
        write_json_atomic(config.to_dict(), output_dir / SAVED_CONFIG_NAME)
        schedule = schedule_settings(args, ctx.world_size)
        write_json_atomic({**vars(args), "world_size": ctx.world_size,
                           "global_batch_size": schedule["global_batch_size"]}, output_dir / SAVED_ARGS_NAME)
    logger.info("%d questions, %d features; %d parameters; %d epochs of %d optimizer steps; global batch %d "
                "(%d per rank x %d ranks x %d accumulation steps); device %s, autocast %s", len(examples),
                len(features), count_parameters(model), num_epochs, optimizer_steps_per_epoch,
                args.train_batch_size * ctx.world_size * args.gradient_accumulation_steps, args.train_batch_size,
                ctx.world_size, args.gradient_accumulation_steps, device, amp_dtype)

    result = None
    for epoch in range(start_epoch, num_epochs):
        # Every epoch's randomness (batch order, dropout) derives from (seed, epoch, rank) alone,
        # so a resumed run repeats exactly what the lost one would have done.
        torch.manual_seed(args.seed + 1000 * epoch + ctx.rank)
        batches, weights = rank_batches(lengths, args, ctx, epoch)
        global_step = train_one_epoch(train_model, optimizer, scheduler, scaler, features, batches, weights, args, ctx,
                                      device, amp_dtype, epoch=epoch, global_step=global_step,
                                      total_steps=total_steps, log_file=log_file)
        if ctx.is_main:
            checkpoint = output_dir / f"korquad_{epoch}.bin"
            # CPU tensors, so the file loads anywhere, also with a plain torch.load.
            save_torch_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, checkpoint)
            save_torch_atomic({"epoch": epoch, "global_step": global_step, "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                               "schedule": schedule_settings(args, ctx.world_size)}, output_dir / STATE_NAME)
            logger.info("epoch %d done at step %d: wrote %s", epoch, global_step, checkpoint)
            if args.save_total_limit is not None and epoch >= args.save_total_limit:
                (output_dir / f"korquad_{epoch - args.save_total_limit}.bin").unlink(missing_ok=True)
            if eval_data is not None:
                eval_examples, eval_features = eval_data
                predictions, _ = evaluate_model(eval_model, eval_examples, eval_features, args, device, amp_dtype,
                                                args.eval_batch_size)
                result = score(args.eval_file, predictions)
                logger.info("epoch %d on %s: exact_match %.2f, f1 %.2f", epoch, args.eval_file,
                            result["exact_match"], result["f1"])
        ctx.barrier()
    if ctx.is_main and result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main, USER_ERRORS + (TrainingDiverged,))

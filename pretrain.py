"""Continued pre-training: masked LM with n-gram whole-word masking plus sentence-order prediction.

    python3 pretrain.py --checkpoint=pretrain_ckpt/bert_small_ckpt.bin --model_config=data/bert_small.json \
        --train_files corpus/*.txt data/KorQuAD_v1.0_train.json --output_dir=lm_run --max_steps=10000
    torchrun --nproc_per_node=4 pretrain.py ...      # DistributedDataParallel, one share of each batch per rank

The corpus: UTF-8 text, one sentence or paragraph a line, a blank line between documents (BERT's
format), and KorQuAD/SQuAD JSON, whose contexts are documents (split into sentences after . ? !).
It is tokenized once with the fine-tuning analyzer and vocab into a memory-mapped token file
(`cache/` beside the first file, keyed by the files' contents and the settings; a damaged one is
tokenized again, with a warning) and cut into pairs of consecutive segments of one document, up to
--max_seq_length pieces. A compressed file, binary data or a corpus of one line is refused.

Objectives as ALBERT pre-trained: 15% of the pieces masked by whole words, in n-grams of 1-3 words
drawn 6:3:2 (probability 1/n), each masked piece [MASK] 80% / a random piece 10% / kept 10%, at most
--max_predictions_per_seq per pair, drawn afresh each epoch from --seed; half the pairs swapped
(sentence-order label 1). A "word" is a piece and its `##` continuations: with Mecab that is one
morpheme, the unit the published model's vocabulary was built on (an eojeol is 1-3 morphemes, so an
n-gram of up to 3 words covers most eojeols whole). Loss = MLM + SOP.

Writes `output_dir/pretrain_{epoch}.bin` (a plain state dict: `bert.*` + transformers' `cls.*` heads)
after each epoch and at the end, with config.json, vocab.txt and training_args.json, so that the
directory is a `--checkpoint` for train.py (fine-tunes the encoder) and export.py (a transformers
BertForPreTraining directory); `training_log.jsonl`, `training_curves.png` (loss; held-out MLM loss,
MLM accuracy and SOP accuracy) and `training_state.pt` for `--resume`.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cli import (ArgumentParser, USER_ERRORS, UsageError, add_device_args, finite_float, learning_rate, positive_float,
                 positive_int, prepare_output_dir, random_seed, run_cli, setup_logging)
from devices import add_compile_args, autocast_context, autocast_dtype, check_compile_args, compile_model
from checkpoints import (CURVES_NAME, LOG_NAME, SAVED_ARGS_NAME, SAVED_CONFIG_NAME, STATE_NAME, build_tokenizer,
                         check_checkpoint_file, check_output_dir, copy_vocab_into, fetch_hub_model,
                         remove_previous_run, resolve_model_settings)
from cli import refuse_output_over_input
import korquad2
from atomic_files import atomic_write, remove_dead_temp_files, write_json_atomic
from korquad_utils import make_length_grouped_batches
from long_run import (CheckpointWriteError, DirectoryLocked, Distributed, RunLock, StopSignals, TrainingDiverged,
                      TrainingStopped, build_optimizer, check_same_settings, file_digest, keep_log_until,
                      linear_warmup_decay, read_log, read_loss, read_training_state, save_checked,
                      setup_distributed, step_seed)
from modeling import IGNORE_LABEL, BertForPreTraining, Config, count_parameters, load_checkpoint, pretraining_loss
from pretraining_data import (EVAL_EPOCH, PairMaker, build_pair_makers, collate, expand_train_files,
                              load_or_build_token_file, most_frequent_piece_accuracy)

logger = logging.getLogger("korquad")

CHECKPOINT_PREFIX = "pretrain_"      # pretrain_{epoch}.bin; checkpoints.PRETRAIN_CHECKPOINT_NAME finds them
STATE_KEYS = ("epoch", "steps_in_epoch", "epoch_finished", "global_step", "model", "optimizer", "scheduler",
              "scaler", "settings", "paths", "loss_sum", "loss_count")


# --- flags -----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Continued pre-training (MLM with n-gram whole-word masking + SOP).")
    parser.add_argument("--train_files", nargs="+", required=True,
                        help="UTF-8 text (a sentence or paragraph a line, a blank line between documents) and/or "
                             "KorQuAD/SQuAD .json files (contexts as documents); globs are expanded.")
    parser.add_argument("--output_dir", required=True, help="Where checkpoints and run files go.")
    parser.add_argument("--checkpoint", default="pretrain_ckpt/bert_small_ckpt.bin",
                        help="Encoder to start from: the published checkpoint, a transformers BertForPreTraining/"
                             "BertForMaskedLM/BertModel directory, a pretrain.py run or its pretrain_N.bin; "
                             "'none' = random initialisation.")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config JSON (if not given: the checkpoint's own, else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="WordPiece vocab (if not given: the checkpoint's own, else data/ko_vocab_32k.txt).")
    parser.add_argument("--analyzer", default=None,
                        help="Morpheme analyzer: mecab, okt, komoran, kkma, hannanum or none "
                             "(if not given: the checkpoint's, else mecab).")
    parser.add_argument("--max_seq_length", type=positive_int, default=512,
                        help="Pieces per pair, [CLS] and two [SEP] included.")
    parser.add_argument("--max_predictions_per_seq", type=positive_int, default=None,
                        help="Most masked pieces per pair (if not given: --masked_lm_prob of --max_seq_length rounded "
                             "up to a multiple of 4, at most the pieces of a pair: 20 at 128, 80 at 512).")
    parser.add_argument("--masked_lm_prob", type=finite_float(0.0, 1.0, low_inclusive=False), default=0.15,
                        help="Share of the pieces masked.")
    steps = parser.add_mutually_exclusive_group()
    steps.add_argument("--max_steps", type=positive_int, default=None, help="Optimizer steps to train.")
    steps.add_argument("--num_train_epochs", type=positive_float, default=None,
                       help="Epochs to train (if neither this nor --max_steps is given: 1).")
    parser.add_argument("--train_batch_size", type=positive_int, default=32, help="Pairs per step on each rank.")
    parser.add_argument("--learning_rate", type=learning_rate, default=1e-4, help="Peak AdamW learning rate.")
    parser.add_argument("--warmup_proportion", type=finite_float(0.0, 1.0, high_inclusive=False), default=0.01,
                        help="Share of the steps over which the learning rate rises linearly.")
    parser.add_argument("--weight_decay", type=finite_float(0.0), default=0.01,
                        help="AdamW weight decay (not on biases and LayerNorm weights).")
    parser.add_argument("--adam_epsilon", type=positive_float, default=1e-6, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="Gradient norm clipping threshold.")
    parser.add_argument("--held_out_share", type=finite_float(0.0, 0.5), default=0.01,
                        help="Share of the documents (the last ones) held out for the MLM/SOP accuracy curves.")
    parser.add_argument("--max_eval_pairs", type=positive_int, default=1000, help="Held-out pairs evaluated.")
    parser.add_argument("--eval_steps", type=positive_int, default=500,
                        help="Optimizer steps between held-out evaluations (also after each epoch).")
    parser.add_argument("--eval_batch_size", type=positive_int, default=64, help="Pairs per evaluation batch.")
    parser.add_argument("--logging_steps", type=positive_int, default=50, help="Optimizer steps between loss read-outs.")
    parser.add_argument("--save_steps", type=positive_int, default=None,
                        help="Also write the resumable training_state.pt every N optimizer steps "
                             "(if not given: after each epoch only).")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the newest training_state.pt in --output_dir, mid-epoch if it was "
                             "written there.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace the run already in --output_dir (its checkpoints, state and log go once the "
                             "new run starts training); without it such a directory is refused.")
    parser.add_argument("--seed", type=random_seed, default=42,
                        help="Random seed: initialisation, pairs, masks, order.")
    parser.add_argument("--cache_dir", default=None,
                        help="Where the token file goes (if not given: cache/ beside the first train file).")
    parser.add_argument("--overwrite_cache", action="store_true", help="Tokenize the corpus again.")
    parser.add_argument("--quiet", action="store_true", help="Warnings only, no progress bars.")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # torch.distributed.launch
    add_device_args(parser)
    add_compile_args(parser)
    args = parser.parse_args(argv)
    if args.resume and args.overwrite_output_dir:
        parser.error("--resume continues the run in --output_dir, --overwrite_output_dir replaces it: pass one")
    if args.max_steps is None and args.num_train_epochs is None:
        args.num_train_epochs = 1.0
    if args.max_seq_length < 5:
        parser.error(f"argument --max_seq_length: must be at least 5 ([CLS] A [SEP] B [SEP]), got "
                     f"{args.max_seq_length}")
    pieces = args.max_seq_length - 3
    if args.max_predictions_per_seq is not None:
        if args.max_predictions_per_seq > pieces:
            parser.error(f"argument --max_predictions_per_seq: {args.max_predictions_per_seq} is more than the "
                         f"{pieces} pieces of a pair (--max_seq_length {args.max_seq_length} - 3)")
    else:
        # A default derived from the flags given: never more than a pair holds (a short --max_seq_length, or
        # a --masked_lm_prob near 1, would otherwise be refused over a flag the user did not give).
        args.max_predictions_per_seq = min(pieces, 4 * math.ceil(args.max_seq_length * args.masked_lm_prob / 4))
    if args.checkpoint.lower() != "none" and Path(args.checkpoint).exists():
        check_checkpoint_file(args.checkpoint)  # says what to pass instead of a directory
    return args


def run_settings(args: argparse.Namespace, files: Sequence[Path], config: Config, do_lower_case: bool,
                 world_size: int) -> dict:
    """What shapes the run's trajectory; `--resume` must find it unchanged."""
    return {"--train_files": [file_digest("--train_files", f) for f in files],
            "--vocab_file": file_digest("--vocab_file", args.vocab_file), "--analyzer": args.analyzer,
            "lower-casing": do_lower_case, "--max_seq_length": args.max_seq_length,
            # Ahead of --max_predictions_per_seq, derived from it if not given: a refused resume names this one.
            "--masked_lm_prob": args.masked_lm_prob, "--max_predictions_per_seq": args.max_predictions_per_seq,
            "--held_out_share": args.held_out_share, "model config": config.to_dict(),
            "global batch (--train_batch_size x ranks)": args.train_batch_size * world_size,
            "--max_steps": args.max_steps, "--num_train_epochs": args.num_train_epochs,
            "--learning_rate": args.learning_rate, "--warmup_proportion": args.warmup_proportion,
            "--weight_decay": args.weight_decay, "--adam_epsilon": args.adam_epsilon,
            "--max_grad_norm": args.max_grad_norm, "--seed": args.seed}


# --- the model -------------------------------------------------------------------------------

def build_model(args: argparse.Namespace, config: Config) -> BertForPreTraining:
    """The pre-training model, from --checkpoint (heads it lacks start fresh) or random initialisation."""
    torch.manual_seed(args.seed)
    model = BertForPreTraining(config)
    if args.checkpoint.lower() == "none":
        logger.warning("--checkpoint none: pre-training from random initialisation")
    else:
        load_checkpoint(model, args.checkpoint)
    return model


@torch.no_grad()
def evaluate(model: torch.nn.Module, maker: PairMaker, args: argparse.Namespace, device: torch.device,
             amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Held-out MLM loss and accuracy (over masked pieces) and SOP accuracy, with masks fixed for the run."""
    was_training = model.training
    model.eval()
    count = min(len(maker.pairs), args.max_eval_pairs)
    lengths = maker.lengths()[:count]
    loss_sum = correct = predicted = sop_correct = 0.0
    for batch in make_length_grouped_batches(lengths, args.eval_batch_size, shuffle=False):
        inputs = {k: v.to(device) for k, v in collate([maker.example(i, EVAL_EPOCH) for i in batch]).items()}
        with autocast_context(device, amp_dtype):
            mlm_logits, sop_logits = model(inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"],
                                           inputs["masked_positions"])
        labels = inputs["mlm_labels"]
        kept = labels != IGNORE_LABEL
        loss_sum += float(torch.nn.functional.cross_entropy(mlm_logits.float()[kept], labels[kept], reduction="sum"))
        correct += float((mlm_logits.argmax(-1)[kept] == labels[kept]).sum())
        predicted += float(kept.sum())
        sop_correct += float((sop_logits.argmax(-1) == inputs["sop_labels"]).sum())
    model.train(was_training)
    return {"eval_mlm_loss": loss_sum / max(predicted, 1), "eval_mlm_accuracy": correct / max(predicted, 1),
            "eval_sop_accuracy": sop_correct / max(count, 1)}


# --- the run ---------------------------------------------------------------------------------

@dataclass
class PretrainingRun:
    args: argparse.Namespace
    ctx: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None
    output_dir: Path
    model: BertForPreTraining
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    settings: dict
    paths: dict
    total_steps: int
    held_out: PairMaker
    stop: StopSignals

    def log(self, record: dict) -> None:
        with open(self.output_dir / LOG_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def evaluate(self, epoch: int, global_step: int) -> None:
        if not self.ctx.is_main or len(self.held_out.pairs) == 0:
            return
        result = evaluate(self.model, self.held_out, self.args, self.device, self.amp_dtype)
        logger.info("step %d held-out: MLM loss %.4f, MLM accuracy %.4f, SOP accuracy %.4f", global_step,
                    result["eval_mlm_loss"], result["eval_mlm_accuracy"], result["eval_sop_accuracy"])
        self.log({"epoch": epoch, "step": global_step, **result})
        write_curves(self.output_dir)

    def save_checkpoint(self, epoch: int) -> None:
        if self.ctx.is_main:
            path = self.output_dir / f"{CHECKPOINT_PREFIX}{epoch}.bin"
            save_checked({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, path)
            logger.info("wrote %s", path)

    def save_state(self, epoch: int, steps_in_epoch: int, epoch_finished: bool, global_step: int,
                   loss_sum: float = 0.0, loss_count: int = 0) -> None:
        if self.ctx.is_main:
            save_checked({"epoch": epoch, "steps_in_epoch": steps_in_epoch, "epoch_finished": epoch_finished,
                          "global_step": global_step,
                          "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                          "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                          "scaler": self.scaler.state_dict(), "settings": self.settings, "paths": self.paths,
                          "loss_sum": loss_sum, "loss_count": loss_count}, self.output_dir / STATE_NAME)

    def stop_requested(self) -> bool:
        return self.ctx.any_rank(self.stop.requested is not None)

    def stopped(self, global_step: int) -> TrainingStopped:
        sig = self.stop.requested
        message = (f"pretrain.py: stopped by {sig.name if sig else 'a signal on another rank'} after optimizer step "
                   f"{global_step}; the resumable state is in {self.output_dir / STATE_NAME}; to continue, run the "
                   f"same command with --resume") if self.ctx.is_main else ""
        return TrainingStopped(message, 128 + (sig or signal.SIGTERM))


def rank_batches(maker: PairMaker, args: argparse.Namespace, ctx: Distributed, epoch: int) -> list[np.ndarray]:
    """This rank's share of each length-grouped global batch of `epoch` (the same on every rank count)."""
    global_batches = make_length_grouped_batches(maker.lengths(), args.train_batch_size * ctx.world_size,
                                                 shuffle=True, seed=args.seed + epoch)
    return [np.array_split(np.asarray(b), ctx.world_size)[ctx.rank] for b in global_batches
            if len(b) >= ctx.world_size]


def train_one_epoch(run: PretrainingRun, maker: PairMaker, batches: list[np.ndarray], *, epoch: int,
                    first_step: int, global_step: int, pending_loss: tuple[float, int]) -> tuple[int, bool]:
    """Optimizer steps `first_step`.. of `epoch`; returns the global step reached and whether a signal stopped it."""
    args, ctx, device = run.args, run.ctx, run.device
    padding = dict(width_multiple=args.compile_bucket, max_width=args.max_seq_length,
                   predictions=args.max_predictions_per_seq) if args.compile else {}
    loss_sum = torch.full((), pending_loss[0], device=device)  # read back only when shown: no sync per step
    loss_count = pending_loss[1]
    first_bad_step = torch.full((), -1, device=device, dtype=torch.long)
    progress = tqdm(total=len(batches), initial=first_step, desc=f"epoch {epoch}", unit="step",
                    disable=args.quiet or not ctx.is_main)
    run.train_model.train()
    for step in range(first_step, len(batches)):
        torch.manual_seed(step_seed(args.seed, epoch, step, ctx.rank))
        inputs = {k: v.to(device, non_blocking=True)
                  for k, v in collate([maker.example(int(i), epoch) for i in batches[step]], **padding).items()}
        with autocast_context(device, run.amp_dtype):
            mlm_logits, sop_logits = run.train_model(inputs["input_ids"], inputs["token_type_ids"],
                                                     inputs["attention_mask"], inputs["masked_positions"])
        loss = pretraining_loss(mlm_logits, sop_logits, inputs["mlm_labels"], inputs["sop_labels"])
        run.scaler.scale(loss).backward()
        loss = loss.detach()
        first_bad_step = torch.where(~torch.isfinite(loss) & (first_bad_step < 0), global_step + 1, first_bad_step)
        loss_sum += loss
        loss_count += 1
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        global_step += 1
        progress.update(1)
        finished = step + 1 == len(batches) or global_step >= run.total_steps
        if global_step % args.logging_steps == 0 or finished:
            mean_loss = read_loss(loss_sum, loss_count, first_bad_step, ctx)
            lr = run.scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
            if ctx.is_main:
                run.log({"epoch": epoch, "step": global_step, "loss": mean_loss, "lr": lr})
            loss_sum.zero_()
            loss_count = 0
        if finished:
            break  # the epoch's end evaluates and writes the state
        if global_step % args.eval_steps == 0:
            run.evaluate(epoch, global_step)
        stopping = run.stop_requested()
        if stopping or (args.save_steps and global_step % args.save_steps == 0):
            read_loss(loss_sum, loss_count, first_bad_step, ctx)  # never save weights a NaN has touched
            run.save_state(epoch, step + 1, False, global_step, float(loss_sum), loss_count)
            if stopping:
                progress.close()
                return global_step, True
    progress.close()
    return global_step, False


def write_curves(output_dir: Path) -> None:
    """Training loss, and held-out MLM loss, MLM accuracy and SOP accuracy, over optimizer steps, as one PNG."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s (pip install matplotlib)", CURVES_NAME)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(output_dir / LOG_NAME)
    panels = [("training loss (MLM + SOP)", "loss"), ("held-out MLM loss", "eval_mlm_loss"),
              ("held-out MLM accuracy", "eval_mlm_accuracy"), ("held-out SOP accuracy", "eval_sop_accuracy")]
    baseline = next((r["baseline_mlm_accuracy"] for r in records if "baseline_mlm_accuracy" in r), None)
    figure, axes = plt.subplots(1, 4, figsize=(18, 4), gridspec_kw=dict(left=0.05, right=0.98, wspace=0.3))
    for axis, (title, key) in zip(axes, panels):
        points = [r for r in records if key in r]
        axis.plot([r["step"] for r in points], [r[key] for r in points], marker="o" if "eval" in key else None)
        axis.set(title=title, xlabel="optimizer step")
        axis.grid(alpha=0.3)
    if baseline is not None:
        axes[2].axhline(baseline, color="gray", linestyle="--", label="most frequent piece")
        axes[2].legend()
    try:
        atomic_write(output_dir / CURVES_NAME, lambda file: figure.savefig(file, format="png", dpi=100))
    finally:
        plt.close(figure)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    ctx, device = setup_distributed(args.no_cuda)
    setup_logging(args.quiet or not ctx.is_main)
    try:
        run_pretraining(args, ctx, device)
        # Ranks leave together: one that tears gloo down while rank 0 still writes its last files can abort
        # (SIGABRT, "terminate called without an active exception") and fail a run that succeeded.
        ctx.barrier()
    finally:
        if ctx.enabled:
            dist.destroy_process_group()


def run_pretraining(args: argparse.Namespace, ctx: Distributed, device: torch.device) -> None:
    files = expand_train_files(args.train_files)
    for file in files:  # the corpus reader knows only 1.0/SQuAD's 'paragraphs'; say why a 2.x file is no corpus
        if file.suffix.lower() == ".json" and korquad2.is_dataset_path(file):
            raise UsageError(f"--train_files {file}: a KorQuAD 2.x file (HTML pages) is not supported as a "
                             f"pre-training corpus; pass KorQuAD 1.0/SQuAD JSON or text files")
    if args.checkpoint.lower() != "none":
        args.checkpoint = fetch_hub_model(args.checkpoint)
        if not Path(args.checkpoint).exists():
            raise UsageError(f"--checkpoint {args.checkpoint}: file not found; download the published checkpoint "
                             f"as pretrain_ckpt/README.md says, or pass --checkpoint none to start from scratch")
    config = resolve_model_settings(args, args.checkpoint)
    # A run's own checkpoints are what --resume goes on rewriting; a new run must not start from one it replaces.
    starts_from = [] if args.resume or args.checkpoint.lower() == "none" else [("--checkpoint", args.checkpoint)]
    written = [*(Path(args.output_dir) / name for name in (STATE_NAME, LOG_NAME, CURVES_NAME, SAVED_CONFIG_NAME,
                                                           SAVED_ARGS_NAME)),
               *Path(args.output_dir).glob(f"{CHECKPOINT_PREFIX}*.bin")]
    refuse_output_over_input("--output_dir", written, [*(("--train_files", file) for file in files), *starts_from])
    if args.max_seq_length > config.max_position_embeddings:
        raise UsageError(f"--max_seq_length {args.max_seq_length} is larger than the model's "
                         f"max_position_embeddings {config.max_position_embeddings}")
    check_compile_args(args, device)
    check_output_dir(args, "pre-training")
    output_dir = prepare_output_dir(args.output_dir)
    lock = RunLock(output_dir, program="pretrain.py")
    ctx.on_main(lock.acquire)
    try:
        if ctx.is_main:
            remove_dead_temp_files(output_dir)
        pretrain_in_locked_dir(args, ctx, device, config, files, output_dir)
    finally:
        if ctx.is_main:
            lock.release()


def pretrain_in_locked_dir(args: argparse.Namespace, ctx: Distributed, device: torch.device, config: Config,
                           files: list[Path], output_dir: Path) -> None:
    amp_dtype = autocast_dtype(args, device)
    tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
    settings = run_settings(args, files, config, tokenizer.do_lower_case, ctx.world_size)
    paths = {"--train_files": [str(f) for f in files], "--vocab_file": str(args.vocab_file)}
    state = None
    if args.resume:
        if (output_dir / STATE_NAME).is_file():
            state = read_training_state(output_dir / STATE_NAME, STATE_KEYS, "pretrain.py")
            check_same_settings(state["settings"], settings, state["paths"], paths)
        else:
            logger.warning("--resume: no %s in %s, starting from the first epoch", STATE_NAME, output_dir)
    cache_dir = Path(args.cache_dir) if args.cache_dir else files[0].parent / "cache"
    tokens = ctx.main_first(lambda: load_or_build_token_file(
        files, tokenizer, args.max_seq_length, cache_dir, args.overwrite_cache and ctx.is_main,
        progress=not args.quiet))
    train_pairs, held_out = build_pair_makers(args, tokenizer, tokens)
    batches_per_epoch = len(rank_batches(train_pairs, args, ctx, 0))
    if batches_per_epoch == 0:
        raise UsageError(f"--train_files: {len(train_pairs.pairs)} training pair(s), fewer than the {ctx.world_size} "
                         f"rank(s); add text or lower --held_out_share")
    total_steps = args.max_steps or max(1, int(batches_per_epoch * args.num_train_epochs))
    num_epochs = math.ceil(total_steps / batches_per_epoch)

    model = build_model(args, config) if state is None else BertForPreTraining(config)
    if state is not None:
        model.load_state_dict(state["model"])
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
        global_step = state["global_step"]
        if state["epoch_finished"]:
            start_epoch = state["epoch"] + 1
        else:
            start_epoch, first_step = state["epoch"], state["steps_in_epoch"]
            pending_loss = (state["loss_sum"], state["loss_count"])
        logger.info("resuming at epoch %d, step %d of %d (optimizer step %d)", start_epoch, first_step,
                    batches_per_epoch, global_step)
    train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ctx.enabled else model
    train_model = compile_model(train_model, args, device, max_width=args.max_seq_length)
    run = PretrainingRun(args, ctx, device, amp_dtype, output_dir, model, train_model, optimizer, scheduler, scaler,
                         settings, paths, total_steps, held_out, StopSignals())
    if ctx.is_main:
        # Training starts now: only from here on does this run change what is in output_dir.
        if args.overwrite_output_dir:
            remove_previous_run(output_dir)
        keep_log_until(output_dir / LOG_NAME, global_step)
        write_json_atomic(config.to_dict(), output_dir / SAVED_CONFIG_NAME)
        copy_vocab_into(args.vocab_file, output_dir)
        write_json_atomic({**vars(args), "checkpoint": str(args.checkpoint), "world_size": ctx.world_size,
                           "global_batch_size": args.train_batch_size * ctx.world_size}, output_dir / SAVED_ARGS_NAME)
        if state is None and len(held_out.pairs):
            piece, accuracy = most_frequent_piece_accuracy(train_pairs, held_out, args.max_eval_pairs)
            logger.info("held-out baseline: always %r gives MLM accuracy %.4f", tokenizer.ids_to_tokens[piece],
                        accuracy)
            run.log({"step": 0, "baseline_piece": tokenizer.ids_to_tokens[piece], "baseline_mlm_accuracy": accuracy})
    logger.info("%d pieces, %d training and %d held-out pairs; %d parameters; %d optimizer steps (%d a epoch); "
                "global batch %d; device %s, autocast %s", len(tokens.ids), len(train_pairs.pairs),
                len(held_out.pairs), count_parameters(model), total_steps, batches_per_epoch,
                args.train_batch_size * ctx.world_size, device, amp_dtype)

    with run.stop:
        for epoch in range(start_epoch, num_epochs):
            if global_step >= total_steps:
                break
            global_step, stopped = train_one_epoch(run, train_pairs, rank_batches(train_pairs, args, ctx, epoch),
                                                   epoch=epoch, first_step=first_step, global_step=global_step,
                                                   pending_loss=pending_loss)
            first_step, pending_loss = 0, (0.0, 0)
            if not stopped:
                run.save_checkpoint(epoch)
                run.save_state(epoch, 0, True, global_step)
                run.evaluate(epoch, global_step)
                stopped = run.stop_requested()
            ctx.barrier()
            if stopped:
                raise run.stopped(global_step)
    if ctx.is_main:
        write_curves(output_dir)
        print(output_dir)


def cli(argv: Sequence[str] | None = None) -> None:
    try:
        main(argv)
    except TrainingStopped as stop:
        if stop.message:
            print(stop.message, file=sys.stderr)
        sys.exit(stop.exit_code)


if __name__ == "__main__":
    run_cli(cli, USER_ERRORS + (TrainingDiverged, CheckpointWriteError, DirectoryLocked))

"""Teacher soft targets for distillation: per question, character-level start/end probabilities.

    python3 distill.py --teacher monologg/koelectra-base-v3-finetuned-korquad \
        --train_file data/KorQuAD_v1.0_train.json --output_dir teacher_targets
    python3 distill.py --teacher seed1/ seed2/ seed3/ --train_file ... --output_dir ...   # an ensemble

A teacher is a transformers question-answering model directory or hub id (run through transformers
with its own fast tokenizer; `pip install transformers`), or one of this toolkit's fine-tuned
checkpoints or run directories (our model and tokenizer). Several teachers are an ensemble: their
character probabilities are averaged. Targets are at the character level, so a student with any
tokenizer can use them (`train.py --teacher_targets DIR`).

Per question, each teacher window's start and end logits over its context tokens are combined: every
token takes its logits from the window where it has the most context (the BERT rule: min(tokens
left, tokens right) + 0.01 x window length); one softmax over those tokens gives the probabilities,
a token's start mass placed on its first character, its end mass on its last. Kept: the most
probable characters carrying at least --target_mass of each distribution. Written atomically as
`teacher_targets.npz` + `teacher_targets.json` (format in the README); a rerun with the same train
file, teachers and settings finds them current and does nothing.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from cli import (ArgumentParser, USER_ERRORS, UsageError, add_data_args, check_data_args, finite_float,
                 prepare_output_dir, run_cli, setup_logging)
from devices import autocast_context, autocast_dtype, pick_device
from checkpoints import (build_tokenizer, explicit_flags, fetch_hub_model, load_finetuned, resolve_checkpoints,
                         resolve_from_training_run)
from scoring import predict_logits
from cli import refuse_output_over_input
from korquad_utils import load_or_build_features, make_length_grouped_batches
from squad_examples import SquadExample, read_squad_examples
from teacher_targets import (TEACHER_TARGETS_FORMAT, TEACHER_TARGETS_JSON, TEACHER_TARGETS_NPZ, TeacherTargets,
                             sha256_of_file, teacher_targets_are_current, write_teacher_targets)
from atomic_files import remove_dead_temp_files
from long_run import DirectoryLocked, RunLock, file_digest
from modeling import Config, is_transformers_dir, read_transformers_config
import onnx_reader

logger = logging.getLogger("korquad")

# Every code point str.isspace() accepts (none lies above U+3000).
SPACE_CODE_POINTS = np.array([code for code in range(0x3001) if chr(code).isspace()], dtype=np.uint32)
# Part of the targets' key: targets from when a transformers teacher's --doc_stride was its windows' overlap
# are not current for the same flags now.
WINDOWS_RULE = "window starts --doc_stride tokens apart"
# One teacher window: its context tokens' (m, 2) character offsets, start logits (m), end logits (m).
Window = tuple[np.ndarray, np.ndarray, np.ndarray]
# One question's sparse distribution: characters and their probabilities.
Sparse = tuple[np.ndarray, np.ndarray]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="Teacher soft targets (character-level start/end probabilities) "
                                        "for train.py --teacher_targets.")
    parser.add_argument("--teacher", nargs="+", required=True,
                        help="transformers QA model directories or hub ids, and/or this toolkit's fine-tuned "
                             "checkpoints or run directories; several = an ensemble (probabilities averaged).")
    parser.add_argument("--train_file", required=True, help="The KorQuAD-format file the student will train on.")
    parser.add_argument("--output_dir", required=True, help="Where teacher_targets.npz/.json go.")
    parser.add_argument("--batch_size", type=int, default=64, help="Teacher windows per forward pass.")
    parser.add_argument("--target_mass", type=finite_float(0.0, 1.0, low_inclusive=False), default=0.999,
                        help="Keep the most probable characters carrying at least this share of each distribution.")
    parser.add_argument("--quiet", action="store_true", help="Warnings only, no progress bars.")
    add_data_args(parser)  # windows of our own teachers; a transformers teacher keeps its own (see the README)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"argument --batch_size: must be at least 1, got {args.batch_size}")
    args.explicit_flags = explicit_flags(parser, argv)   # windows left at their defaults fit a shorter teacher
    return args


# --- combining a question's windows ----------------------------------------------------------

def question_distributions(windows: Sequence[Window], context: str) -> tuple[Sparse, Sparse]:
    """Start and end character probabilities of one question from its teacher windows (module docstring)."""
    offsets, starts, ends, scores, keys = [], [], [], [], []
    for window_offsets, start_logits, end_logits in windows:
        m = len(window_offsets)
        position = np.arange(m)
        offsets.append(window_offsets)
        starts.append(start_logits)
        ends.append(end_logits)
        scores.append(np.minimum(position, m - 1 - position) + 0.01 * m)
        # A token is known across windows by its span and its rank among tokens sharing that span
        # (byte-level tokenizers cut one character into several tokens with the same offsets).
        same_as_previous = np.r_[False, (window_offsets[1:] == window_offsets[:-1]).all(axis=1)]
        group_start = np.maximum.accumulate(np.where(same_as_previous, 0, position))
        keys.append(np.column_stack([window_offsets, position - group_start]))
    offsets, keys = np.concatenate(offsets).reshape(-1, 2), np.concatenate(keys).reshape(-1, 3)
    starts, ends, scores = np.concatenate(starts), np.concatenate(ends), np.concatenate(scores)
    # Best-scoring window first within each token (the earlier window on a tie), then one row per token.
    order = np.lexsort((np.arange(len(scores)), -scores, keys[:, 2], keys[:, 1], keys[:, 0]))
    keys = keys[order]
    first_of_token = np.r_[True, (keys[1:] != keys[:-1]).any(axis=1)]
    chosen = order[first_of_token]
    first_char, last_char = trimmed_spans(offsets[chosen], context)
    usable = first_char <= last_char  # drops tokens that cover only whitespace (or nothing)
    if not usable.any():  # no context token in any window: no target (train.py leaves such windows out)
        nothing = (np.zeros(0, np.int64), np.zeros(0))
        return nothing, nothing
    return (sparse_softmax(starts[chosen][usable], first_char[usable]),
            sparse_softmax(ends[chosen][usable], last_char[usable]))


def trimmed_spans(offsets: np.ndarray, context: str) -> tuple[np.ndarray, np.ndarray]:
    """First and last (inclusive) non-space character of each [start, end) span."""
    is_space = np.isin(np.frombuffer(context.encode("utf-32-le"), dtype=np.uint32), SPACE_CODE_POINTS)
    # next_text[i]: the first non-space index >= i; last_text[i]: the last non-space index <= i.
    indices = np.arange(len(context) + 1)
    text_here = np.r_[~is_space, True]
    next_text = np.minimum.accumulate(np.where(text_here, indices, len(context))[::-1])[::-1]
    last_text = np.maximum.accumulate(np.where(np.r_[~is_space, False], indices, -1))
    starts = np.clip(offsets[:, 0], 0, len(context))
    ends = np.clip(offsets[:, 1], 0, len(context))
    return next_text[starts], np.where(ends > 0, last_text[np.maximum(ends - 1, 0)], -1)


def sparse_softmax(logits: np.ndarray, chars: np.ndarray) -> Sparse:
    """softmax(logits) as mass on `chars` (mass of tokens sharing a character summed)."""
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    unique_chars, where = np.unique(chars, return_inverse=True)
    return unique_chars, np.bincount(where, weights=probs, minlength=len(unique_chars))


def keep_top_mass(distribution: Sparse, mass: float) -> Sparse:
    """The most probable characters whose probabilities sum to at least `mass` of the whole distribution
    (all of them if they carry less), in character order."""
    chars, probs = distribution
    order = np.argsort(-probs, kind="stable")
    count = int(np.searchsorted(np.cumsum(probs[order]), min(mass, probs.sum()) - 1e-12)) + 1
    kept = np.sort(order[:min(count, len(order))])
    return chars[kept], probs[kept]


def average_distributions(members: Sequence[Sparse]) -> Sparse:
    """The mean of several sparse distributions over the same characters."""
    chars, where = np.unique(np.concatenate([c for c, _ in members]), return_inverse=True)
    return chars, np.bincount(where, weights=np.concatenate([p for _, p in members]),
                              minlength=len(chars)) / len(members)


# --- teachers ----------------------------------------------------------------------------------

def import_transformers():
    if importlib.util.find_spec("transformers") is None:
        raise UsageError("--teacher: a transformers model needs the transformers package: pip install transformers")
    try:
        import transformers
    except ImportError as error:  # installed but broken (or one of its own dependencies missing)
        raise UsageError(f"--teacher: the transformers package does not import ({error}); reinstall it: "
                         f"pip install --force-reinstall transformers") from None
    transformers.logging.set_verbosity_error()  # its notes about unused weights are not the user's business
    return transformers


def check_transformers_teacher(directory: Path, teacher: str, args: argparse.Namespace):
    """The fast tokenizer of a transformers QA model directory; refuses a model without a QA head or offsets,
    and windows that leave its longest question no context."""
    transformers = import_transformers()
    config = read_transformers_config(directory)
    architectures = config.get("architectures") or []
    if architectures and not any(name.endswith("ForQuestionAnswering") for name in architectures):
        raise UsageError(f"--teacher {teacher}: not a question-answering model (its config.json says "
                         f"architectures {architectures}); pass a model fine-tuned for extractive QA")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    except Exception as err:  # missing or unreadable tokenizer files raise many types
        raise UsageError(f"--teacher {teacher}: its tokenizer does not load ({' '.join(str(err).split())[:200]})"
                         ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"--teacher {teacher}: its tokenizer ({type(tokenizer).__name__}) is a slow one without "
                         f"character offsets; distillation needs a fast tokenizer (tokenizer.json)")
    # Without its vocabulary file transformers builds a tokenizer of only the special tokens, and every
    # token the teacher sees is [UNK]; a vocab_size rounded up for speed stays well within half.
    vocab_size = config.get("vocab_size")
    if isinstance(vocab_size, int) and len(tokenizer) < vocab_size / 2:
        raise UsageError(f"--teacher {teacher}: its tokenizer has {len(tokenizer)} entries but its config.json says "
                         f"vocab_size {vocab_size}; the directory lacks its vocabulary (vocab.txt or tokenizer.json)")
    weights = directory / "model.safetensors"
    if weights.is_file():  # its header covers every byte: a truncated or damaged file is refused before any work
        try:
            with safe_open(str(weights), "pt"):
                pass
        except SafetensorError as err:
            raise unreadable_weights(teacher, directory, err) from None
    limit = window_limit(config, tokenizer, args)
    if limit - args.max_query_length - tokenizer.num_special_tokens_to_add(pair=True) < 1:
        raise UsageError(f"--teacher {teacher}: its windows of {limit} tokens leave no room for the context after "
                         f"--max_query_length {args.max_query_length}; lower --max_query_length")
    return tokenizer


def unreadable_weights(teacher: str, directory: Path, err: Exception) -> UsageError:
    return UsageError(f"--teacher {teacher}: {directory / 'model.safetensors'}: not a readable safetensors file "
                      f"({' '.join(str(err).split())[:200]})")


def is_onnx_export(path: Path) -> bool:
    """A .onnx file, or a directory export.py --format onnx wrote (complete or not; a transformers directory
    that also holds a .onnx file is not one)."""
    return path.suffix == ".onnx" or path.is_dir() and ((path / onnx_reader.SETTINGS_NAME).is_file() or (
        any(path.glob("*.onnx")) and not (path / "config.json").is_file()))


def window_limit(config: dict, tokenizer, args: argparse.Namespace) -> int:
    """A transformers teacher's window length: --max_seq_length, capped by the model's and tokenizer's limits."""
    return min(args.max_seq_length, config.get("max_position_embeddings") or args.max_seq_length,
               tokenizer.model_max_length)


def load_transformers_model(directory: Path, teacher: str, device: torch.device, quiet: bool):
    transformers = import_transformers()
    if quiet:  # --quiet means no progress bars, transformers' weight-loading bar included
        transformers.utils.logging.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForQuestionAnswering.from_pretrained(str(directory),
                                                                                 output_loading_info=True)
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"--teacher {teacher}: not a transformers question-answering model "
                         f"({' '.join(str(err).split())[:200]})") from None
    except SafetensorError as err:
        raise unreadable_weights(teacher, directory, err) from None
    if info.get("missing_keys"):
        raise UsageError(f"--teacher {teacher}: no trained question-answering head (missing "
                         f"{', '.join(sorted(info['missing_keys'])[:3])}); pass a model fine-tuned for extractive QA")
    return model.to(device).eval()


def transformers_windows(directory: Path, teacher: str, tokenizer, examples: Sequence[SquadExample],
                         args: argparse.Namespace, device: torch.device, amp_dtype) -> list[list[Window]]:
    """Each question's windows as the transformers model sees them: windows of its own tokens cut by its
    tokenizer's overflow, at most --max_seq_length and the model's own limit long, their starts --doc_stride
    tokens apart as in train.py (the tokenizer's `stride` is the overlap: window length - --doc_stride)."""
    model = load_transformers_model(directory, teacher, device, args.quiet)
    limit = window_limit(read_transformers_config(directory), tokenizer, args)
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    questions = [truncated_question(tokenizer, ex.question_text, args.max_query_length) for ex in examples]
    # The context's share of a window, and so the overlap, depends on the question's length: one
    # tokenizer call per question length.
    question_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    by_length: dict[int, list[int]] = {}
    for example_index, length in enumerate(question_lengths):
        by_length.setdefault(length, []).append(example_index)
    chunks = [(length, group[begin:begin + 256]) for length, group in sorted(by_length.items())
              for begin in range(0, len(group), 256)]
    inputs, spans = [], []
    for length, chunk in tqdm(chunks, desc=f"tokenizing for {teacher}", unit="chunk", disable=args.quiet):
        context_budget = limit - length - specials  # at least 1: check_transformers_teacher
        encoded = tokenizer([questions[i] for i in chunk], [examples[i].context_text for i in chunk],
                            truncation="only_second", max_length=limit,
                            stride=max(0, context_budget - args.doc_stride),
                            return_overflowing_tokens=True, return_offsets_mapping=True)
        window_number = np.zeros(len(chunk), dtype=np.int64)
        for row, in_chunk in enumerate(encoded["overflow_to_sample_mapping"]):
            in_context = np.array([sequence == 1 for sequence in encoded.sequence_ids(row)])
            offsets = np.asarray(encoded["offset_mapping"][row], dtype=np.int64).reshape(-1, 2)
            inputs.append({name: encoded[name][row] for name in ("input_ids", "token_type_ids", "attention_mask")
                           if name in encoded})
            spans.append((chunk[in_chunk], window_number[in_chunk], np.flatnonzero(in_context), offsets[in_context]))
            window_number[in_chunk] += 1
    # Filled by window number: the max-context rule breaks ties by window order, whatever the batch order.
    counts = np.bincount([example_index for example_index, *_ in spans], minlength=len(examples))
    windows: list[list[Window]] = [[None] * count for count in counts.tolist()]
    pad_id = tokenizer.pad_token_id or 0
    batches = make_length_grouped_batches([len(x["input_ids"]) for x in inputs], args.batch_size, shuffle=False)
    with torch.no_grad():
        for batch in tqdm(batches, desc=f"teacher {teacher}", unit="batch", disable=args.quiet):
            width = max(len(inputs[i]["input_ids"]) for i in batch)
            tensors = {name: torch.tensor([inputs[i][name] + [pad_id if name == "input_ids" else 0]
                                           * (width - len(inputs[i][name])) for i in batch], device=device)
                       for name in inputs[batch[0]]}
            with autocast_context(device, amp_dtype):
                output = model(**tensors)
            start_logits = output.start_logits.float().cpu().numpy()
            end_logits = output.end_logits.float().cpu().numpy()
            for row, index in enumerate(batch):
                example_index, number, columns, offsets = spans[index]
                windows[example_index][number] = (offsets, start_logits[row, columns], end_logits[row, columns])
    return windows


def truncated_question(tokenizer, question: str, max_tokens: int) -> str:
    """The question cut after its first `max_tokens` tokens (our --max_query_length rule, by characters)."""
    offsets = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return question if len(offsets) <= max_tokens else question[:offsets[max_tokens - 1][1]]


def our_teacher_settings(checkpoint: Path, args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the model config, vocab, analyzer and lower-casing of the run beside `checkpoint`."""
    settings = copy.copy(args)
    settings.checkpoint, settings.model_config, settings.vocab_file = [checkpoint], None, None
    resolve_from_training_run(settings)
    return settings


def our_teacher_digest(settings: argparse.Namespace) -> str:
    """sha256 over what makes one of our teachers' windows and logits: its weights, config, vocab and text rules
    (a run directory's vocab.txt or analyzer changed under the same weights makes other targets)."""
    described = {"weights": sha256_of_file(settings.checkpoint[0]),
                 "config": file_digest("--teacher's config", settings.model_config),
                 "vocab": file_digest("--teacher's vocab", settings.vocab_file), "analyzer": settings.analyzer,
                 "do_lower_case": settings.do_lower_case}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def our_windows(teachers: Sequence[argparse.Namespace], examples: Sequence[SquadExample], args: argparse.Namespace,
                device: torch.device, amp_dtype) -> list[list[list[Window]]]:
    """Each of our teachers' windows per question (`our_teacher_settings`: its own run's tokenizer, analyzer
    and config)."""
    members = []
    for settings in teachers:
        checkpoint = settings.checkpoint[0]
        config = Config.from_json_file(settings.model_config)
        check_data_args(settings, config)
        tokenizer = build_tokenizer(settings.vocab_file, settings.analyzer, config, settings.do_lower_case)
        # The windows as check_data_args left them: fitted to a teacher of fewer positions unless given.
        _, features = load_or_build_features(args.train_file, tokenizer, settings.max_seq_length, settings.doc_stride,
                                             settings.max_query_length, is_training=False, cache_dir=args.cache_dir,
                                             overwrite_cache=args.overwrite_cache,
                                             num_workers=args.preprocess_workers, progress=not args.quiet)
        model = load_finetuned(checkpoint, config, device)
        starts, ends = predict_logits(model, features, args.batch_size, device, amp_dtype, not args.quiet)
        windows: list[list[Window]] = [[] for _ in examples]
        for index, (example_index, start_logits, end_logits) in enumerate(zip(features.example_index, starts, ends)):
            offsets = features.token_offsets(index)
            in_context = offsets[:, 0] >= 0
            windows[example_index].append((offsets[in_context], start_logits[in_context], end_logits[in_context]))
        members.append(windows)
        del model
    return members


def transformers_digest(path: Path) -> str:
    """sha256 over a transformers teacher directory's files: its weights, config and tokenizer."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin", ".txt",
                                                                               ".model"))
    for file in files:
        digest.update(f"{file.name}\0{sha256_of_file(file)}\0".encode())
    return digest.hexdigest()


def targets_key(train_sha: str, teacher_digests: Sequence[str], settings: dict) -> str:
    """What identifies a set of targets: the train file's contents, the teachers, the window rule and every
    setting that shapes the targets (window lengths, analyzer, --target_mass); a change to any makes new ones."""
    return hashlib.sha256(json.dumps({"format": TEACHER_TARGETS_FORMAT, "train_file_sha256": train_sha,
                                      "teachers": list(teacher_digests), "windows": WINDOWS_RULE, **settings},
                                     sort_keys=True).encode()).hexdigest()


# --- main ---------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.quiet)
    if Path(args.train_file).is_dir():  # train.py --teacher_targets identifies its --train_file by one file's bytes
        raise UsageError(f"--train_file {args.train_file}: a directory (a KorQuAD 2.x dataset?); distill.py and "
                         f"train.py --teacher_targets take one train file, so pass one of its .json files")
    if not Path(args.train_file).is_file():
        raise UsageError(f"--train_file {args.train_file}: file not found")
    refuse_output_over_input("--output_dir", [Path(args.output_dir) / TEACHER_TARGETS_NPZ,
                                              Path(args.output_dir) / TEACHER_TARGETS_JSON],
                             [("--train_file", args.train_file), *(("--teacher", path) for path in args.teacher)])
    # Every teacher is resolved and checked before any model runs.
    teachers = []  # (name, kind, path, tokenizer for transformers or our run's settings, digest)
    for teacher in args.teacher:
        if is_onnx_export(Path(teacher)):
            raise UsageError(f"--teacher {teacher}: an ONNX export cannot be a teacher (it gives no PyTorch model to "
                             f"run); pass the checkpoint or run directory it was exported from, or a transformers "
                             f"model directory")
        # A transformers directory or hub id goes through transformers; anything else is a checkpoint or run of ours.
        directory = Path(fetch_hub_model(teacher, "--teacher"))
        if is_transformers_dir(directory):
            teachers.append((teacher, "transformers", directory, check_transformers_teacher(directory, teacher, args),
                             transformers_digest(directory)))
        else:
            checkpoint = resolve_checkpoints([teacher], "--teacher")[0]
            ours = our_teacher_settings(checkpoint, args)
            teachers.append((teacher, "korquad", checkpoint, ours, our_teacher_digest(ours)))
    output_dir = prepare_output_dir(args.output_dir)
    # One distill.py per targets directory: a second one is refused at once rather than racing the first.
    lock = RunLock(output_dir, program="distill.py")
    lock.acquire()
    try:
        remove_dead_temp_files(output_dir)  # what a killed writer left (the targets themselves are whole)
        write_targets(args, teachers, output_dir)
    finally:
        lock.release()


def write_targets(args: argparse.Namespace, teachers: list[tuple], output_dir: Path) -> None:
    """The targets of `teachers` into `output_dir`, unless the ones there are current."""
    train_sha = sha256_of_file(args.train_file)
    described = [{"teacher": name, "kind": kind, "sha256": digest} for name, kind, _, _, digest in teachers]
    settings = {"max_seq_length": args.max_seq_length, "doc_stride": args.doc_stride,
                "max_query_length": args.max_query_length, "analyzer": args.analyzer,
                "target_mass": args.target_mass}
    key = targets_key(train_sha, [t["sha256"] for t in described], settings)
    if teacher_targets_are_current(output_dir, key):
        logger.info("%s is current for this train file, these teachers and settings: nothing to do",
                    output_dir / TEACHER_TARGETS_NPZ)
        print(output_dir / TEACHER_TARGETS_NPZ)
        return
    device = pick_device(args.no_cuda)
    amp_dtype = autocast_dtype(args, device)

    examples = read_squad_examples(args.train_file, is_training=False)
    if not examples:
        raise UsageError(f"--train_file {args.train_file}: no questions")
    # Each member kept sparse at a higher mass, so their average still carries --target_mass.
    member_mass = 1 - (1 - args.target_mass) / len(teachers)
    members: list[list[tuple[Sparse, Sparse]]] = []

    def add_member(windows: list[list[Window]]) -> None:
        combining = tqdm(zip(windows, examples), total=len(examples), desc="combining windows", unit="question",
                         disable=args.quiet)
        members.append([tuple(keep_top_mass(d, member_mass) for d in question_distributions(w, ex.context_text))
                        for w, ex in combining])

    ours = [settings for _, kind, _, settings, _ in teachers if kind == "korquad"]
    for windows in our_windows(ours, examples, args, device, amp_dtype) if ours else []:
        add_member(windows)
    for name, kind, path, tokenizer, _ in teachers:
        if kind == "transformers":
            add_member(transformers_windows(path, name, tokenizer, examples, args, device, amp_dtype))

    sides = {}
    for side in (0, 1):
        per_question = [keep_top_mass(average_distributions([member[q][side] for member in members]),
                                      args.target_mass) for q in range(len(examples))]
        sides[side] = (np.concatenate([[0], np.cumsum([len(c) for c, _ in per_question])]).astype(np.int64),
                       np.concatenate([c for c, _ in per_question]).astype(np.int32),
                       np.concatenate([p for _, p in per_question]).astype(np.float32))
    targets = TeacherTargets(key, train_sha, np.array([ex.qas_id for ex in examples]), *sides[0], *sides[1])
    path = write_teacher_targets(targets, output_dir, {"train_file": str(args.train_file), "teachers": described,
                                                       **settings})
    logger.info("%d questions; %.1f start and %.1f end characters kept per question on average", len(examples),
                len(targets.start_chars) / len(examples), len(targets.end_chars) / len(examples))
    print(path)


if __name__ == "__main__":
    run_cli(main, USER_ERRORS + (DirectoryLocked,))

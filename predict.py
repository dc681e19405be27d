"""Ask a fine-tuned model questions about your own Korean text: from the shell, a file, a pipe or Python.

    python3 predict.py --checkpoint=output --question="수도는?" --context="서울은 대한민국의 수도이다."
    python3 predict.py --checkpoint=output --input=questions.jsonl --output=answers.jsonl
    python3 predict.py --checkpoint=output --interactive --context_file=article.txt

Input lines are JSON objects {"id": .., "question": .., "context": ..} (id optional), or the whole
input is a KorQuAD/SQuAD-format file. Each answer is one JSON line: id (when given), answer, start,
end (context[start:end] == answer) and probability; --top_k K adds the K best as `answers`.
A model trained with --version_2_with_negative (or the flag given here) may answer "" (start and
end null) when the question has no answer in the context, and every line carries
`no_answer_probability`.

From Python:

    from predict import Reader
    reader = Reader.load("output")
    reader("수도는?", "서울은 대한민국의 수도이다.")   # {"answer": "서울", "start": 0, "end": 2, ...}

An ONNX export (`export.py --format onnx`) works the same way, given as its directory (fp32
model.onnx) or one of its .onnx files (model_int8.onnx); it runs in ONNX Runtime without torch,
one thread per physical core, with the export's window settings unless flags say otherwise.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import logging
import os
import re
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import korquad2
import onnx_reader
from cli import (ArgumentParser, UsageError, add_device_args, add_no_answer_args, add_window_args, check_data_args,
                 check_version_2, int_at_least, positive_int, refuse_output_over_input, run_cli, setup_logging)
from devices import add_compile_args, autocast_dtype, check_compile_args, compile_model, pick_device
from checkpoints import (WINDOW_FLAGS, build_tokenizer, explicit_flags, load_finetuned, model_inputs,
                         resolve_finetuned_settings)
from scoring import average_logits, predict_logits
from atomic_files import atomic_write, remove_dead_temp_files, temp_path_for, writes_through
from decoding import decode_predictions, no_answer_probability, null_odds
from korquad_utils import convert_examples_to_features
from squad_examples import (JSONNumberError, JSONTooDeepError, KorquadFormatError, SquadExample, parse_json,
                            squad_examples_from_json)
from tokenization import BertTokenizer, is_blank

# torch is imported where a PyTorch model needs it: an ONNX export answers without torch installed.
if TYPE_CHECKING:
    import torch

logger = logging.getLogger("korquad")

PROG = "predict.py"
# Questions answered together from --input: enough to fill length-grouped batches, few enough
# that answers stream out and memory stays flat on a large file.
CHUNK_QUESTIONS = 1024
# Windows per forward pass. On a CPU every size from 1 to 16 runs about equally fast and 32 about
# 1.5x slower (its activations outgrow the caches): `python3 bench.py --only predict`.
CUDA_BATCH_SIZE = 32
CPU_BATCH_SIZE = 8
# --top_k (and a serve.py request's "top_k") above n_best_size widens the n-best search; this keeps decoding bounded.
MAX_TOP_K = 100
# The flags an ONNX export's onnx_reader.json fills in unless they are given: its windows and threshold.
EXPORT_DEFAULTED_FLAGS = (*WINDOW_FLAGS, "null_score_diff_threshold")


class InputError(ValueError):
    """One question that cannot be answered (empty text, a missing field); the message says why."""


def check_question(record: Any) -> dict[str, Any]:
    """`record` as {"id"?, "question", "context"}, or InputError naming what is wrong with it."""
    if not isinstance(record, Mapping):
        raise InputError(f"expected a JSON object with \"question\" and \"context\", got {type(record).__name__}")
    checked: dict[str, Any] = {}
    if record.get("id") is not None:
        checked["id"] = record["id"]
    for field in ("question", "context"):
        if field not in record:
            raise InputError(f"missing \"{field}\"")
        if not isinstance(record[field], str):
            raise InputError(f"\"{field}\" must be a string, got {type(record[field]).__name__}")
        checked[field] = record[field]
    for field, value in checked.items():
        try:  # what is echoed back must be writable: JSON's \\ud800 escapes give lone surrogates
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"\"{field}\" holds a lone surrogate (not Unicode text)") from None
        if field != "id" and is_blank(value):
            raise InputError(f"\"{field}\" is empty")
    return checked


@dataclass
class Reader:
    """A fine-tuned model (or ensemble) and its tokenizer, loaded once, answering many questions."""
    # QuestionAnswering or its torch.compile wrapper; or OnnxReaderModel, whose device is None.
    models: list[torch.nn.Module] | list[onnx_reader.OnnxReaderModel]
    tokenizer: BertTokenizer
    device: torch.device | None
    amp_dtype: torch.dtype | None
    max_seq_length: int = 512
    max_query_length: int = 96
    doc_stride: int = 128
    max_answer_length: int = 30
    n_best_size: int = 20
    batch_size: int = 32
    pad_to_multiple: int | None = None   # with --compile: a few static shapes
    version_2_with_negative: bool = False  # may answer "": the null score against the best span
    null_score_diff_threshold: float = 0.0

    @classmethod
    def load(cls, checkpoint: str | os.PathLike | Sequence[str | os.PathLike], **settings: Any) -> Reader:
        """Load a checkpoint, a training run directory (its newest checkpoint), a transformers QA model
        directory or hub id, or several of these (an ensemble).

        `settings` are predict.py's flags by name (model_config, vocab_file, analyzer, batch_size,
        max_seq_length, doc_stride, max_query_length, max_answer_length, n_best_size, no_cuda, bf16,
        fp16, fp32, compile, compile_bucket, version_2_with_negative, null_score_diff_threshold); anything
        not given is read from the training run or takes the flag's default.
        """
        checkpoints = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
        args = build_parser().parse_args(["--checkpoint", *map(str, checkpoints)])
        unknown = sorted(set(settings) - set(vars(args)) - {"checkpoint"})
        if unknown:
            raise TypeError(f"Reader.load got unknown setting(s): {', '.join(unknown)}")
        vars(args).update(settings)
        args.explicit_flags = set(settings)
        check_numbers(args)
        return cls.from_args(args)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Reader:
        """The Reader predict.py's flags describe; config, vocab, lower-casing and analyzer default
        to the training run's or the transformers directory's. `args.explicit_flags` must name the flags given
        (`given_flags`): an ONNX export's recorded settings replace the others."""
        if not isinstance(getattr(args, "explicit_flags", None), set):
            raise TypeError("Reader.from_args needs args.explicit_flags, the flags given (predict.given_flags): "
                            "without it an ONNX export's settings would replace every window flag")
        config = resolve_finetuned_settings(args)
        check_data_args(args, config)
        if isinstance(config, onnx_reader.ExportSettings):
            return cls.from_onnx_args(args, config)
        check_version_2(args)
        device = pick_device(args.no_cuda)
        amp_dtype = autocast_dtype(args, device)
        check_compile_args(args, device)
        if args.batch_size is None:
            args.batch_size = CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE
        tokenizer = build_tokenizer(args.vocab_file, args.analyzer, config, args.do_lower_case)
        models = [compile_model(load_finetuned(path, config, device), args, device, max_width=args.max_seq_length)
                  for path in args.checkpoint]
        return cls(models, tokenizer, device, amp_dtype, args.max_seq_length, args.max_query_length,
                   args.doc_stride, args.max_answer_length, args.n_best_size, args.batch_size,
                   args.compile_bucket if args.compile else None, args.version_2_with_negative,
                   args.null_score_diff_threshold)

    @classmethod
    def from_onnx_args(cls, args: argparse.Namespace, settings: onnx_reader.ExportSettings) -> Reader:
        """The Reader of ONNX exports (torch is not imported): ONNX Runtime on the CPU."""
        if args.batch_size is None:
            args.batch_size = CPU_BATCH_SIZE
        onnx_reader.apply_no_answer_settings(args, settings)
        check_version_2(args)
        tokenizer = build_tokenizer(args.vocab_file, args.analyzer, settings, args.do_lower_case)
        models = [onnx_reader.OnnxReaderModel(path) for path in args.checkpoint]
        return cls(models, tokenizer, None, None, args.max_seq_length, args.max_query_length, args.doc_stride,
                   args.max_answer_length, args.n_best_size, args.batch_size,
                   version_2_with_negative=args.version_2_with_negative,
                   null_score_diff_threshold=args.null_score_diff_threshold)

    def __call__(self, question: str, context: str, top_k: int | None = None) -> dict[str, Any]:
        """The best answer to one question: answer, start, end, probability (and `answers` with top_k)."""
        return self.answer_all([{"question": question, "context": context}], top_k=top_k)[0]

    def answer_all(self, questions: Iterable[Mapping[str, Any] | tuple[str, str]], top_k: int | None = None,
                   progress: bool = False) -> list[dict[str, Any]]:
        """Answers to many questions at once, in order: {"id"?, "question", "context"} mappings or
        (question, context) pairs. Windows of all of them go through the model in length-grouped,
        dynamically padded batches; a context shared by several questions is tokenized once."""
        records = []
        for number, item in enumerate(questions):
            record = {"question": item[0], "context": item[1]} if isinstance(item, tuple) else item
            try:
                records.append(check_question(record))
            except InputError as err:
                raise InputError(f"question {number}: {err}") from None
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if not records:
            return []
        examples = [SquadExample(str(number), record["question"], record["context"], [])
                    for number, record in enumerate(records)]
        features = convert_examples_to_features(examples, self.tokenizer, self.max_seq_length, self.doc_stride,
                                                self.max_query_length, is_training=False, progress=False)
        if self.device is None:
            starts, ends = average_logits(model.predict_logits(features, self.batch_size, progress)
                                          for model in self.models)
        else:
            import torch
            with torch.inference_mode():
                starts, ends = average_logits(
                    predict_logits(model, features, self.batch_size, self.device, self.amp_dtype, progress,
                                   self.pad_to_multiple)
                    for model in self.models)
        _, nbest = decode_predictions(examples, features, starts, ends,
                                      n_best_size=max(self.n_best_size, top_k or 1),
                                      max_answer_length=self.max_answer_length)
        odds = (null_odds(examples, features.feature_example, starts, ends, nbest)
                if self.version_2_with_negative else {})
        return [answer_record(record, nbest[example.qas_id], top_k, odds.get(example.qas_id),
                              self.null_score_diff_threshold) for record, example in zip(records, examples)]


def answer_record(record: Mapping[str, Any], nbest: list[dict[str, Any]], top_k: int | None,
                  odds: float | None = None, threshold: float = 0.0) -> dict[str, Any]:
    """The output line of one question from its n-best list; no possible span: "" and null offsets.

    With `odds` (null minus best span score, version 2): `no_answer_probability`, and "" with null
    offsets and probability 0 when `odds` exceeds `threshold` (`answers` still lists the spans)."""
    ranked = [{"answer": entry["text"], "start": entry["start"], "end": entry["end"],
               "probability": entry["probability"] if entry["start"] is not None else 0.0} for entry in nbest]
    answer = {"id": record["id"]} if "id" in record else {}
    answer.update(ranked[0])
    if odds is not None:
        if odds > threshold:
            answer.update(answer="", start=None, end=None, probability=0.0)
        answer["no_answer_probability"] = no_answer_probability(odds)
    if top_k is not None:
        answer["answers"] = [entry for entry in ranked[:top_k] if entry["start"] is not None]
    return answer


# --- reading questions -----------------------------------------------------------------------

# A question to answer, or the reason an input line cannot be one; `where` names it for messages.
Item = tuple[str, dict[str, Any] | InputError]


def read_input_text(path: str) -> str:
    """The whole of --input (a file, or stdin for "-"), a leading BOM dropped; the same UTF-8 rule for both."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as file:
                data = file.read()
    except OSError as err:
        raise UsageError(f"--input {name}: cannot read it ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"--input {name}: not UTF-8 text (byte {err.start})") from None
    return text.removeprefix("\ufeff")


def korquad_items(path: str, dataset: dict, version_2_with_negative: bool = False) -> list[Item]:
    """The questions of a KorQuAD/SQuAD-format input, checked by the same reader eval.py uses
    (with `version_2_with_negative`, KLUE-MRC's `guid` ids work too)."""
    examples = squad_examples_from_json(dataset, "stdin" if path == "-" else path, is_training=False,
                                        version_2_with_negative=version_2_with_negative)
    items: list[Item] = []
    for example in examples:
        record = {"id": example.qas_id, "question": example.question_text, "context": example.context_text}
        try:
            items.append((f"question {example.qas_id}", check_question(record)))
        except InputError as err:
            items.append((f"question {example.qas_id}", err))
    return items


def json_lines_items(lines: Iterable[str]) -> Iterator[Item]:
    """One item per non-blank JSON line, numbered from 1 as an editor shows them."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"input line {number}"
        try:
            yield where, check_question(parse_json(line, finite=True))
        except JSONNumberError as err:   # NaN or 1e999 would be echoed back as output that is not JSON
            yield where, InputError(str(err))
        except JSONTooDeepError as err:
            yield where, InputError(f"not JSON ({err})")
        except json.JSONDecodeError as err:
            yield where, InputError(f"not JSON ({err.msg} at column {err.colno})")
        except InputError as err:
            yield where, err


def checked_item(where: str, record: Any) -> Item:
    if isinstance(record, dict) and "data" in record and "question" not in record:
        return where, InputError("a KorQuAD/SQuAD file's object inside a JSON array: pass the file itself")
    try:
        return where, check_question(record)
    except InputError as err:
        return where, err


def input_items(path: str, version_2_with_negative: bool = False) -> list[Item] | Iterator[Item]:
    """The questions of --input: a KorQuAD/SQuAD file when the whole input is one, else JSON lines."""
    text = read_input_text(path)
    try:
        whole = parse_json(text)
    except JSONNumberError as err:
        if is_korquad_document(text):   # refused whole, as eval.py refuses it; a JSON line fails alone
            raise KorquadFormatError(f"{'stdin' if path == '-' else path}: not valid JSON ({err})") from None
        whole = None
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "data" in whole:
        return korquad_items(path, whole, version_2_with_negative)
    # One question pretty-printed over several lines, or a JSON array of them: read line by line, each of
    # its lines would fail as a JSON line of its own.
    if isinstance(whole, dict) and "\n" in text.strip():
        return [checked_item("input", whole)]
    if isinstance(whole, list):
        return [checked_item(f"input item {number}", record) for number, record in enumerate(whole, start=1)]
    # "\n" only: str.splitlines also breaks at U+2028, U+2029 and U+0085, which JSON strings may hold raw.
    return json_lines_items(text.split("\n"))


def is_korquad_document(text: str) -> bool:
    """Whether `text` is one JSON object with "data", even with a whole number too long for int()
    (parse_int=float reads any length)."""
    try:
        whole = json.loads(text, parse_int=float)
    except (ValueError, RecursionError):
        return False
    return isinstance(whole, dict) and "data" in whole


def stdin_lines(stdin: BinaryIO) -> Iterator[tuple[int, str | UnicodeDecodeError]]:
    """Each line of `stdin`, numbered from 1, as text without its line end (a BOM opening the stream
    dropped), or the error of a line that is not UTF-8.

    Lines are decoded here, as --input decodes stdin: a text-mode sys.stdin would follow the locale
    and replace, escape or crash on bytes that are not UTF-8."""
    for number, raw in enumerate(stdin, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield number, err
            continue
        if number == 1:
            line = line.removeprefix("\ufeff")
        yield number, line.removesuffix("\n").removesuffix("\r")


def interactive_items(context: str | None, stdin: BinaryIO) -> Iterator[Item]:
    """A context (given, else the first non-blank line read), then one question per line until EOF.

    A question line that is not UTF-8 fails alone (like a bad --input line); a context line that is
    not UTF-8 ends the session, as every question would be asked about it."""
    prompt = stdin.isatty()
    lines = stdin_lines(stdin)
    if context is None:
        if prompt:
            print("context> ", end="", file=sys.stderr, flush=True)
        for number, line in lines:
            if isinstance(line, UnicodeDecodeError):
                raise UsageError(f"--interactive: stdin line {number} (the context): "
                                 f"not UTF-8 text (byte {line.start} of the line)")
            if not is_blank(line):
                context = line
                break
        else:
            raise UsageError("--interactive: no context given (pass --context/--context_file or type it first)")
    if prompt:
        print("question> ", end="", file=sys.stderr, flush=True)
    for number, line in lines:
        where = f"stdin line {number}"
        if isinstance(line, UnicodeDecodeError):
            yield where, InputError(f"not UTF-8 text (byte {line.start} of the line)")
        elif line.strip():
            try:
                yield where, check_question({"question": line, "context": context})
            except InputError as err:
                yield where, err
        if prompt:
            print("question> ", end="", file=sys.stderr, flush=True)


# --- answering -------------------------------------------------------------------------------

def answer_items(reader: Reader, items: Iterable[Item], emit: Callable[[str], None], top_k: int | None,
                 chunk_questions: int, progress: bool) -> int:
    """Answer every valid item (chunk by chunk, in order) through `emit`; report the others on
    stderr, one line each. Returns how many items failed."""
    failures = seen = 0
    chunk: list[dict[str, Any]] = []

    def flush() -> None:
        for answer in reader.answer_all(chunk, top_k=top_k, progress=progress):
            emit(json.dumps(answer, ensure_ascii=False, allow_nan=False))   # strict JSON, whatever came in
        chunk.clear()

    for where, item in items:
        seen += 1
        if isinstance(item, InputError):
            failures += 1
            print(f"{PROG}: {where}: {item}", file=sys.stderr, flush=True)
            continue
        chunk.append(item)
        if len(chunk) >= chunk_questions:
            flush()
    if chunk:
        flush()
    if not seen:
        logger.warning("the input holds no questions: nothing to answer")
    return failures


def question_items(args: argparse.Namespace) -> Iterable[Item]:
    """The questions the flags ask for (read now where cheap, so bad input fails before the model loads)."""
    context = read_context(args)
    context_flag = "--context" if args.context_file is None else f"--context_file {args.context_file}"
    if args.question is not None:
        return [("--question", check_question_flag(args.question, context, context_flag))]
    if args.input is not None:
        # A KLUE file's guid ids need the flag now, before the model (and the run's setting) is read.
        return input_items(args.input, args.version_2_with_negative is True)
    if context is not None and is_blank(context):   # every question would be asked about it
        raise UsageError(f"--interactive: {context_flag} is empty")
    return interactive_items(context, sys.stdin.buffer)


def read_context(args: argparse.Namespace) -> str | None:
    if args.context_file is None:
        return None if args.context is None else check_flag_text(args.context, "--context")
    try:  # as given (a BOM, CRLF and lone CR kept): answers' offsets index the file's text
        with open(args.context_file, encoding="utf-8", newline="") as file:
            return file.read()
    except UnicodeDecodeError:
        raise UsageError(f"--context_file {args.context_file}: not UTF-8 text") from None
    except OSError as err:
        raise UsageError(f"--context_file {args.context_file}: cannot read it ({err.strerror or err})") from None


def read_html_page(args: argparse.Namespace) -> korquad2.HtmlPage:
    """The --html page, parsed now so that HTML the reader cannot map fails before the model loads."""
    flag = "--context" if args.context_file is None else f"--context_file {args.context_file}"
    try:
        page = korquad2.parse_page(read_context(args))
    except korquad2.HtmlPageError as err:
        raise UsageError(f"{flag}: HTML does not parse: {err}") from None
    if is_blank(page.text):
        raise UsageError(f"{flag}: the HTML page holds no text")
    return page


@dataclass
class HtmlPageReader:
    """A Reader answering about one HTML page's text, each answer cut back out of the HTML."""
    reader: Reader
    page: korquad2.HtmlPage

    def answer_all(self, questions: Iterable[Mapping[str, Any]], top_k: int | None = None,
                   progress: bool = False) -> list[dict[str, Any]]:
        answers = self.reader.answer_all(questions, top_k, progress)
        for answer in answers:
            cut_answer_from_html(answer, self.page)
        return answers


def cut_answer_from_html(answer: dict[str, Any], page: korquad2.HtmlPage) -> None:
    """Turn an answer about `page`'s text (and its n-best list) into the HTML it stands for: `answer`
    cut from the page, `start`/`end` offsets into the HTML as sent."""
    for entry in [answer, *answer.get("answers", [])]:
        span = None if entry["start"] is None else page.html_span(entry["start"], entry["end"])
        entry["start"], entry["end"] = span or (None, None)
        entry["answer"] = "" if span is None else page.html[span[0]:span[1]]


def check_question_flag(question: str, context: str | None, context_flag: str = "--context") -> dict[str, Any]:
    if context is None:
        raise UsageError("--question needs --context or --context_file")
    check_flag_text(question, "--question")
    if is_blank(question):
        raise UsageError("--question is empty")
    if is_blank(context):
        raise UsageError(f"{context_flag} is empty")
    return {"question": question, "context": context}


# Python reads command-line bytes that are not UTF-8 as lone surrogates U+DC80-U+DCFF (surrogateescape).
NOT_UNICODE = re.compile("[\ud800-\udfff]")


def check_flag_text(text: str, flag: str) -> str:
    """`text` given as `flag` on the command line, or UsageError if it holds bytes that are not UTF-8."""
    found = NOT_UNICODE.search(text)
    if found is None:
        return text
    code = ord(found.group())
    byte = f"byte 0x{code - 0xdc00:02x}" if 0xdc80 <= code <= 0xdcff else f"U+{code:04X}"
    raise UsageError(f"{flag} is not UTF-8 text ({byte} at character {found.start()})")


# --- CLI -------------------------------------------------------------------------------------

def add_reader_args(parser: argparse.ArgumentParser) -> None:
    """The flags that describe a Reader (`Reader.from_args`): checkpoint, model files, batch, windows, device.
    serve.py takes the same ones."""
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True,
                        help="Fine-tuned checkpoint(s), training run directories (their newest korquad_N.bin), "
                             "transformers QA model directories, hub ids, or ONNX exports (a directory or one "
                             "of its .onnx files).")
    parser.add_argument("--model_config", "--config_name", dest="model_config", default=None,
                        help="Model config (if not given: the training run's, else data/bert_small.json).")
    parser.add_argument("--vocab_file", default=None,
                        help="Vocabulary (if not given: the training run's, else data/ko_vocab_32k.txt).")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="Windows per forward pass (if not given: 32 on a GPU, 8 on a CPU, where larger "
                             "batches fall out of the caches and run slower). ONNX exports run one window at a "
                             "time whatever it says.")
    parser.add_argument("--n_best_size", type=positive_int, default=20,
                        help="Spans the probabilities are spread over, as in eval.py.")
    add_no_answer_args(parser, remembered=True)
    add_window_args(parser)
    add_device_args(parser)
    add_compile_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Answer questions about your own text with a "
                                     "fine-tuned checkpoint (several = an ensemble).")
    add_reader_args(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--question", help="One question, about --context or --context_file.")
    source.add_argument("--input", metavar="FILE",
                        help="JSON lines {\"id\", \"question\", \"context\"} (or one such object, or a JSON array of "
                             "them) or a KorQuAD/SQuAD file; - for stdin.")
    source.add_argument("--interactive", action="store_true",
                        help="Read a context (unless given), then answer one question per line until EOF.")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--context", help="The text to answer from.")
    text.add_argument("--context_file", metavar="FILE", help="A UTF-8 text file to answer from.")
    parser.add_argument("--html", action="store_true",
                        help="--context/--context_file is an HTML page (KorQuAD 2.x): the model reads its text, "
                             "and each answer is cut from the HTML (a whole table or list as its HTML), with "
                             "start/end offsets into the HTML.")
    parser.add_argument("--output", metavar="FILE", help="Write the JSON lines here (if not given: stdout).")
    parser.add_argument("--top_k", type=int_at_least(1, MAX_TOP_K), default=None,
                        help=f"Also list the K best answers as `answers`, K up to {MAX_TOP_K} (if not given: "
                             "the best one only).")
    parser.add_argument("--quiet", action="store_true", help="Warnings only.")
    return parser


def check_numbers(args: argparse.Namespace) -> None:
    for name in ("batch_size", "n_best_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if getattr(args, "top_k", None) is not None and args.top_k < 1:
        raise UsageError("--top_k must be at least 1")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.question is None and args.input is None and not args.interactive:
        parser.error("give --question (with --context or --context_file), --input FILE or --interactive")
    if args.input is not None and (args.context is not None or args.context_file is not None):
        parser.error("--input brings its own contexts; drop --context/--context_file")
    if args.html and args.context is None and args.context_file is None:
        parser.error("--html needs the page as --context or --context_file")
    args.explicit_flags = given_flags(parser, argv)
    return args


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Which of EXPORT_DEFAULTED_FLAGS `argv` gives, for `args.explicit_flags` (serve.py's parser too): those
    an ONNX export's recorded windows and threshold do not replace."""
    return explicit_flags(parser, argv, EXPORT_DEFAULTED_FLAGS)


def check_output(path: str | None, flag: str = "--output") -> Path | None:
    """Refuse an output file (`flag`) that cannot be written, before the model loads (submit.py's too)."""
    if path is None:
        return None
    if not path:
        raise UsageError(f"{flag} '' is not a file name")
    if path.endswith(("/", os.sep)):   # Path would drop the separator and write a file of that name
        raise UsageError(f"{flag} {path} ends in a path separator: give a file name, not a directory")
    output = Path(path)
    if writes_through(output):   # /dev/null, a FIFO, /dev/stdout on a pipe: opened as it is, never replaced
        if not os.access(output, os.W_OK):
            raise UsageError(f"{flag} {output} is not writable")
        return output
    # A symlink is written through to its target (atomic_write renames beside the target).
    target = Path(os.path.realpath(output)) if output.is_symlink() else output
    via = f" (a symlink to {target})" if target != output else ""
    if target.is_dir():
        raise UsageError(f"{flag} {output}{via} is a directory")
    if not target.parent.is_dir():
        raise UsageError(f"{flag} {output}{via}: directory {target.parent} does not exist")
    # A real write, not os.access: root passes os.access everywhere, and neither sees a read-only mount or /proc.
    # Named as atomic_write names its temporary files, so that a run killed right here leaves nothing for good.
    probe = temp_path_for(target)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise UsageError(f"{flag} {output}{via}: cannot write in {target.parent} ({err.strerror or err})") from None
    probe.unlink()
    remove_dead_temp_files(target.parent, target.name)  # the answers so far of a killed run
    return output


@contextlib.contextmanager
def sigterm_as_exit(output: Path) -> Iterator[None]:
    """While active (in the main thread), SIGTERM ends the run through SystemExit, status 128 + 15, with one line:
    the cleanup a KeyboardInterrupt gets (atomic_write's temporary file removed) instead of a plain death."""
    if threading.current_thread() is not threading.main_thread():   # signal handlers live only there
        yield
        return

    def stop(number: int, frame: Any) -> None:
        print(f"{PROG}: stopped by SIGTERM before --output {output} was written whole", file=sys.stderr, flush=True)
        raise SystemExit(128 + number)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def refuse_output_over_stdin(output: Path | None, stdin_flag: str) -> None:
    """Refuse a stdin redirected from the --output file (`< FILE`), which the answers would replace: stdin
    has no path for refuse_output_over_input, so its open file is compared with the output's."""
    if output is None:
        return
    try:
        stdin, written = os.fstat(0), os.stat(output)
    except OSError:
        return   # no stdin, or no output file yet: nothing to overwrite
    if stat.S_ISREG(written.st_mode) and os.path.samestat(stdin, written):
        raise UsageError(f"--output: writing {output} would overwrite {stdin_flag} (stdin, the same file); "
                         f"choose another --output")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    check_numbers(args)
    setup_logging(args.quiet)
    output = check_output(args.output)
    refuse_output_over_input("--output", [output] if output else [], [
        ("--input", None if args.input == "-" else args.input), ("--context_file", args.context_file),
        *model_inputs(args)])
    if args.input == "-" or args.interactive:
        refuse_output_over_stdin(output, "--input -" if args.input == "-" else "--interactive")
    page = read_html_page(args) if args.html else None
    if page is not None:  # the model reads the page's text; answers go back to the HTML
        args.context, args.context_file = page.text, None
    items = question_items(args)
    reader = Reader.from_args(args)
    if page is not None:
        reader = HtmlPageReader(reader, page)
    # Interactive answers go out one by one, as they are typed.
    chunk_questions = 1 if args.interactive else CHUNK_QUESTIONS
    progress = not args.quiet and args.input is not None
    if output is None:
        def emit(line: str) -> None:
            print(line, flush=args.interactive)
        failures = answer_items(reader, items, emit, args.top_k, chunk_questions, progress)
    else:
        failures = 0

        def write_all(file) -> None:
            nonlocal failures
            failures = answer_items(reader, items, lambda line: file.write((line + "\n").encode("utf-8")),
                                    args.top_k, chunk_questions, progress)
        with sigterm_as_exit(output):   # the temporary file goes, as it does on Ctrl-C
            atomic_write(output, write_all)
    if failures:
        sys.exit(f"{PROG}: {failures} question(s) could not be answered (see the lines above)")


def utf8_stdout() -> None:
    """Answers go out as UTF-8 JSON lines (RFC 8259's encoding) whatever the locale: a latin-1 or ASCII
    stdout cannot print Korean and would end the run in a UnicodeEncodeError."""
    if codecs.lookup(sys.stdout.encoding or "ascii").name != "utf-8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(encoding="utf-8")


def main_quiet_on_broken_pipe(argv: Sequence[str] | None = None) -> None:
    """main, but a reader that stops early (`| head`) ends the run without a message or traceback."""
    utf8_stdout()
    try:
        main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python flushes stdout again at exit; point it at devnull so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main_quiet_on_broken_pipe)

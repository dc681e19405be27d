"""Serve a fine-tuned reader over HTTP: a JSON API that batches concurrent requests, and one page to try it.

    python3 serve.py --checkpoint=output                       # http://127.0.0.1:8000
    curl -s localhost:8000/answer -H 'Content-Type: application/json' \\
         -d '{"question": "수도는?", "context": "서울은 대한민국의 수도이다."}'

POST /answer takes {"question", "context", "id"?, "top_k"?, "html"?} or a list of such objects, and answers
each as predict.py does: answer, start, end (character offsets into the context as sent), probability, and
with top_k the `answers` list. With "html": true the context is an HTML page (KorQuAD 2.x): the model reads
its text, and each answer is cut back out of the HTML (a whole table or list as its HTML), as predict.py --html. GET /health says whether it is serving; GET / is a page to paste a text and ask.

Requests wait in one bounded queue; a single worker thread takes up to --max_batch questions at a time
(waiting up to --max_wait_ms for more to come) and answers them together with predict.Reader, so the model
runs off the event loop and many clients share it; a request of more questions than a batch holds is split
over several. A full queue answers 503 at once; a request that times out leaves the queue at once. A connection
that has not sent a request's line and headers within --header_timeout is closed (408), so that slow clients
cannot hold --max_connections. Numbers strict JSON cannot carry (NaN, Infinity, 1e999, whole numbers past
Python's 4,300-digit limit) get 400 naming the field. SIGTERM (or Ctrl-C) stops accepting connections,
answers every request already accepted, then exits 0; a second Ctrl-C forces quit, dropping requests in flight (exit 1).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cli import ArgumentParser, UsageError, int_at_least, positive_float, positive_int, run_cli, setup_logging
import korquad2
from squad_examples import finite_float_or_marker, int_or_marker, not_json_constant, unusable_number_in
from predict import (MAX_TOP_K, InputError, Reader, add_reader_args, check_numbers, check_question, given_flags,
                     cut_answer_from_html)
from tokenization import is_blank

try:
    import h11  # noqa: F401  (uvicorn's HTTP/1.1 parser, which the protocol below subclasses)
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route
except ImportError as missing:   # reported as one line by main(); the rest of the project runs without them
    MISSING_PACKAGE: str | None = missing.name or str(missing)
else:
    MISSING_PACKAGE = None

logger = logging.getLogger("korquad")

PROG = "serve.py"
FIELDS = ("question", "context", "id", "top_k", "html")
MAX_WAIT_MS = 60_000   # a batch that waits longer than this for company is never worth it


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message naming what is wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


class QueueFull(Exception):
    """No room for a request's questions (or the server is stopping): answered with 503 at once."""


class WorkerStopped(Exception):
    """The worker thread has died (a bug): nothing can be answered any more, so every request gets 503."""


# --- the batching worker ---------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    """One request's questions, waiting for the worker; its answers arrive on `future`, in `loop`."""
    records: list[dict[str, Any]]
    top_ks: list[int | None]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    taken: int = 0      # questions handed to the worker so far: a job larger than a batch's room is split
    answers: list[dict[str, Any]] = field(default_factory=list)   # to its first len(answers) questions
    abandoned: bool = False   # timed out or failed: what is not computed yet never will be


@dataclass(frozen=True)
class Piece:
    """Questions start:stop of one job, as part of a batch."""
    job: Job
    start: int
    stop: int


def answer_questions(reader: Reader, records: Sequence[dict[str, Any]],
                     top_ks: Sequence[int | None]) -> list[dict[str, Any]]:
    """What `reader(question, context, top_k)` returns for each record, computed in as few batches as
    possible: one `answer_all` per n-best size (just one unless a top_k exceeds the reader's n_best_size)."""
    answers: list[dict[str, Any]] = [{}] * len(records)
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for index, top_k in enumerate(top_ks):
        groups[max(reader.n_best_size, top_k or 1)].append(index)
    for indices in groups.values():
        asked = [top_ks[i] for i in indices if top_ks[i] is not None]
        batch = reader.answer_all([records[i] for i in indices], top_k=max(asked, default=None))
        for index, answer in zip(indices, batch):
            if top_ks[index] is None:
                answer.pop("answers", None)
            else:
                # Equal to asking for top_ks[index] alone: only an answerless n-best holds an entry without
                # offsets (and then nothing else), so cutting the filtered list is cutting the n-best.
                answer["answers"] = answer["answers"][:top_ks[index]]
            answers[index] = answer
    return answers


class Batcher:
    """A bounded queue of jobs and the one thread that answers them, up to `max_batch` questions at a time."""

    def __init__(self, reader: Reader, queue_size: int, max_batch: int, max_wait_s: float) -> None:
        self.reader = reader
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queued = 0   # questions waiting, not yet taken by the worker
        self._jobs: collections.deque[Job] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._open: set[Job] = set()   # submitted and not yet resolved: failed at once if the worker dies
        self.dead = False
        self._thread = threading.Thread(target=self._work, name="reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """Answer every job already queued, then end the worker; without `drain` (a forced quit), drop the
        queued jobs and leave the worker (a daemon) to end with the process, after the batch it is on."""
        with self._changed:
            self._stopping = True
            if not drain:
                for job in self._jobs:
                    job.abandoned = True
                self._jobs.clear()
                self.queued = 0
            self._changed.notify()
        if drain:
            self._thread.join()

    def submit(self, records: list[dict[str, Any]], top_ks: list[int | None]) -> Job:
        """Queue one request's questions (from the event loop); QueueFull when they do not fit."""
        loop = asyncio.get_running_loop()
        job = Job(records, top_ks, loop, loop.create_future())
        with self._changed:
            if self.dead:
                raise WorkerStopped(WORKER_STOPPED)
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.queued + len(records) > self.queue_size:
                raise QueueFull(f"the server is busy ({self.queued} questions queued, room for "
                                f"{self.queue_size}); retry shortly")
            self._jobs.append(job)
            self._open.add(job)
            self.queued += len(records)
            self._changed.notify()
        job.future.add_done_callback(lambda _: self._forget(job))
        return job

    def _forget(self, job: Job) -> None:
        with self._changed:
            self._open.discard(job)

    def abandon(self, job: Job) -> None:
        """Give up a job (its request timed out, or one of its questions failed): its questions still queued
        leave the queue at once, and the worker computes no more of it."""
        with self._changed:
            job.abandoned = True
            if job.taken < len(job.records):   # still in the queue, in part at least
                self._jobs.remove(job)
                self.queued -= len(job.records) - job.taken

    def _take(self) -> list[Piece] | None:
        """The next batch: up to max_batch questions from the oldest jobs on, waiting up to max_wait_s for
        more to fill it; a job that does not fit goes on in the next batch. None once stopping with nothing left."""
        with self._changed:
            while not self._jobs:
                if self._stopping:
                    return None
                self._changed.wait()
            batch: list[Piece] = []
            count = 0
            deadline = time.monotonic() + self.max_wait_s
            while True:
                while self._jobs and count < self.max_batch:
                    job = self._jobs[0]
                    stop = min(len(job.records), job.taken + self.max_batch - count)
                    batch.append(Piece(job, job.taken, stop))
                    count += stop - job.taken
                    self.queued -= stop - job.taken
                    job.taken = stop
                    if stop == len(job.records):
                        self._jobs.popleft()
                remaining = deadline - time.monotonic()
                if count == self.max_batch or remaining <= 0 or self._stopping:
                    return batch
                self._changed.wait(remaining)

    def _work(self) -> None:
        try:
            while (batch := self._take()) is not None:
                self._answer([piece for piece in batch if not piece.job.abandoned])
        except BaseException:   # a bug in the worker itself: say so, and fail fast rather than time out
            logger.exception("the worker thread stopped; every request gets 503 from now on")
            with self._changed:
                self.dead = True
                waiting = list(self._open)
                self._jobs.clear()
                self.queued = 0
            for job in waiting:
                deliver(job, WorkerStopped(WORKER_STOPPED))

    def _answer(self, pieces: list[Piece]) -> None:
        if not pieces:
            return
        try:
            answers = answer_questions(self.reader, [r for p in pieces for r in p.job.records[p.start:p.stop]],
                                       [k for p in pieces for k in p.job.top_ks[p.start:p.stop]])
        except Exception as error:  # a bug on some input must cost that request only, not the whole batch
            if len(pieces) > 1:
                for piece in pieces:
                    if not piece.job.abandoned:   # else it has failed already, in an earlier piece
                        self._answer([piece])
                return
            logger.exception("answering a request failed")
            self.abandon(pieces[0].job)
            deliver(pieces[0].job, error)
            return
        start = 0
        for piece in pieces:
            piece.job.answers += answers[start:start + piece.stop - piece.start]
            start += piece.stop - piece.start
            if len(piece.job.answers) == len(piece.job.records):
                deliver(piece.job, piece.job.answers)


WORKER_STOPPED = "the server's worker thread has stopped (its log says why); restart the server"


def deliver(job: Job, outcome: list[dict[str, Any]] | BaseException) -> None:
    """Hand a job's answers (or its error) to the request waiting in the event loop."""
    def resolve() -> None:
        if job.future.done():   # cancelled by the request's timeout meanwhile
            return
        if isinstance(outcome, BaseException):
            job.future.set_exception(outcome)
        else:
            job.future.set_result(outcome)
    with contextlib.suppress(RuntimeError):   # the loop has closed: nobody is waiting any more
        job.loop.call_soon_threadsafe(resolve)


# --- reading a request -----------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_items: int
    max_context_chars: int


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 beyond). A declared Content-Length past the limit gets
    413 before any of the body is read (so no 100 Continue invites it), and the connection is closed; a longer
    chunked body is read to its end and dropped, so that the client, still sending, receives the 413 rather
    than a reset connection."""
    too_large = f"the request body is larger than {limit} bytes (--max_body_bytes)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, too_large, {"Connection": "close"})
    body = bytearray()
    async for chunk in request.stream():
        if len(body) <= limit:
            body += chunk
    if len(body) > limit:
        raise RequestError(413, too_large)
    return bytes(body)


def check_content_type(value: str | None) -> None:
    media_type, *parameters = (value or "").split(";")
    if media_type.strip().lower() != "application/json":
        raise RequestError(415, f"send the questions as JSON with Content-Type: application/json "
                                f"(got {value!r})" if value else "send Content-Type: application/json")
    for parameter in parameters:
        name, _, charset = parameter.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise RequestError(415, f"the body must be UTF-8 JSON (Content-Type says charset={charset.strip()})")


def parse_payload(body: bytes, limits: Limits) -> tuple[list[dict[str, Any]], list[int | None], bool]:
    """(records, top_ks, single) from a body holding one question object or a list of them."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"the body is not UTF-8 (invalid byte at position {error.start})") from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise RequestError(400, "the body is empty; send {\"question\": ..., \"context\": ...}")
    try:
        payload = json.loads(text, parse_constant=not_json_constant, parse_float=finite_float_or_marker,
                             parse_int=int_or_marker)
    except json.JSONDecodeError as error:
        raise RequestError(400, f"the body is not valid JSON ({error.msg} at line {error.lineno} "
                                f"column {error.colno})") from None
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    if isinstance(payload, dict):
        record, top_k = check_item(payload, "", limits)
        return [record], [top_k], True
    if not isinstance(payload, list):
        raise RequestError(400, f"expected a JSON object {{\"question\", \"context\"}} or a list of them, "
                                f"got {json_type(payload)}")
    if not payload:
        raise RequestError(400, "an empty list: send at least one question")
    if len(payload) > limits.max_items:
        raise RequestError(413, f"{len(payload)} questions in one request; this server takes at most "
                                f"{limits.max_items} (--max_items)")
    checked = [check_item(item, f"item {number}: ", limits) for number, item in enumerate(payload)]
    return [record for record, _ in checked], [top_k for _, top_k in checked], False


def check_item(item: Any, where: str, limits: Limits) -> tuple[dict[str, Any], int | None]:
    """One question object as a predict.py record and its top_k, or RequestError naming the field at fault."""
    if not isinstance(item, dict):
        raise RequestError(400, f"{where}expected a JSON object with \"question\" and \"context\", "
                                f"got {json_type(item)}")
    unknown = [name for name in item if name not in FIELDS]
    if unknown:
        raise RequestError(400, f"{where}unknown field \"{unknown[0]}\" (expected {', '.join(FIELDS)})")
    for name, value in item.items():
        if (number := unusable_number_in(value)) is not None:
            raise RequestError(400, f"{where}\"{name}\" holds {number.description}")
    for name in ("question", "context"):   # named in JSON's terms here; predict's check says the rest
        if name in item and not isinstance(item[name], str):
            raise RequestError(400, f"{where}\"{name}\" must be a string, got {json_type(item[name])}")
    html = item.get("html", False)
    if not isinstance(html, bool):
        raise RequestError(400, f"{where}\"html\" must be true or false, got {json_type(html)}")
    page = html_page(item, where, limits) if html else None
    try:
        record = check_question({**item, "context": page.text} if page is not None else item)
    except InputError as error:
        raise RequestError(400, f"{where}{error}") from None
    if page is not None:   # answers are cut back out of this page before they are sent
        record[HTML_PAGE] = page
    for name in ("question", "context"):   # check_question has refused lone surrogates (\ud800) already
        check_length(record[name], name, where, limits)
    top_k = item.get("top_k")
    if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= MAX_TOP_K):
        raise RequestError(400, f"{where}\"top_k\" must be a whole number from 1 to {MAX_TOP_K}, got "
                                f"{json.dumps(top_k)}")
    return record, top_k


def check_length(text: str, name: str, where: str, limits: Limits) -> None:
    """413 naming the field when `text` is longer than --max_context_chars."""
    if len(text) > limits.max_context_chars:
        raise RequestError(413, f"{where}\"{name}\" is {len(text)} characters; this server takes at most "
                                f"{limits.max_context_chars} (--max_context_chars)")


HTML_PAGE = "html_page"   # a record's parsed page, when its context was sent as HTML


def html_page(item: dict[str, Any], where: str, limits: Limits) -> korquad2.HtmlPage:
    """The page of an item whose "context" is HTML (a KorQuAD 2.x page), or RequestError naming it."""
    markup = item.get("context")
    if not isinstance(markup, str):
        raise RequestError(400, f"{where}\"context\" is missing; \"html\": true needs the page there")
    check_length(markup, "context", where, limits)   # the page as sent, before parsing it
    try:
        page = korquad2.parse_page(markup)
    except korquad2.HtmlPageError as error:
        raise RequestError(400, f"{where}\"context\": HTML does not parse: {error}") from None
    if is_blank(page.text):
        raise RequestError(400, f"{where}\"context\": the HTML page holds no text")
    return page


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number")


# --- the application -------------------------------------------------------------------------

def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def build_app(reader: Reader, batcher: Batcher, limits: Limits, request_timeout: float,
              announce: str | None = None) -> Starlette:
    """The ASGI application: /answer, /health and the page, around a started-on-startup `batcher`.
    `announce` is printed to stdout once the worker runs (the address, for whoever started the server)."""
    counts = dict.fromkeys(("accepted", "answered", "refused", "timed_out", "failed", "bad_requests"), 0)

    async def answer(request: Request) -> JSONResponse:
        began = time.monotonic()
        check_content_type(request.headers.get("content-type"))
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):   # an empty header names no encoding either
            raise RequestError(415, f"Content-Encoding {encoding} is not supported; send the JSON uncompressed")
        try:
            body = await asyncio.wait_for(read_body(request, limits.max_body_bytes), request_timeout)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the body did not arrive within {request_timeout:g} s "
                                    f"(--request_timeout)") from None
        records, top_ks, single = parse_payload(body, limits)
        try:
            job = batcher.submit(records, top_ks)
        except QueueFull as full:
            counts["refused"] += 1
            return error_response(503, str(full), {"Retry-After": "1"})
        except WorkerStopped as stopped:
            counts["failed"] += 1
            return error_response(503, str(stopped))
        counts["accepted"] += 1
        try:
            answers = await asyncio.wait_for(job.future, max(0.0, request_timeout - (time.monotonic() - began)))
        except asyncio.TimeoutError:
            batcher.abandon(job)
            counts["timed_out"] += 1
            return error_response(504, f"not answered within {request_timeout:g} s (--request_timeout); "
                                       f"the server is overloaded")
        except WorkerStopped as stopped:
            counts["failed"] += 1
            return error_response(503, str(stopped))
        except Exception:   # logged by the worker, with its traceback; the client gets one line
            counts["failed"] += 1
            return error_response(500, "answering this request failed (the server's log says why)")
        counts["answered"] += 1
        for record, answer in zip(records, answers):
            if HTML_PAGE in record:
                cut_answer_from_html(answer, record[HTML_PAGE])
        return JSONResponse(answers[0] if single else answers)

    async def health(request: Request) -> JSONResponse:
        if batcher.dead:
            return JSONResponse({"status": "worker stopped", "queued": 0, **counts}, status_code=503)
        return JSONResponse({"status": "ok", "queued": batcher.queued, **counts})

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def refused(request: Request, error: RequestError) -> JSONResponse:
        counts["bad_requests"] += 1
        return error_response(error.status, str(error), error.headers)

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        counts["bad_requests"] += 1
        message = {404: f"no page {request.url.path}; the API is POST /answer",
                   405: f"{request.method} is not allowed on {request.url.path} (use "
                        f"{(error.headers or {}).get('Allow', 'another method')})"}.get(error.status_code, error.detail)
        return error_response(error.status_code, message, error.headers)

    async def server_error(request: Request, error: Exception) -> JSONResponse:
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=error)
        return error_response(500, "internal server error (the server's log says why)")

    async def client_gone(request: Request, error: ClientDisconnect) -> JSONResponse:
        return error_response(400, "the client disconnected before sending the whole body")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        batcher.start()
        if announce:
            print(announce, flush=True)
        forced = False
        try:
            yield
        except asyncio.CancelledError:   # a forced quit: uvicorn drops the requests in flight, and so their questions
            forced = True
            raise
        finally:
            batcher.stop(drain=not forced)   # else uvicorn gets here after the requests in flight have their answers
            logger.info("stopped: %s", ", ".join(f"{count} {name}" for name, count in counts.items()))

    app = Starlette(routes=[Route("/", page, methods=["GET"]), Route("/health", health, methods=["GET"]),
                            Route("/answer", answer, methods=["POST"])],
                    exception_handlers={RequestError: refused, HTTPException: http_error,
                                        ClientDisconnect: client_gone, Exception: server_error},
                    lifespan=lifespan)
    # No 307 from /answer/ to /answer: its Location would be built from the client's Host header.
    app.router.redirect_slashes = False
    return app


# The page: plain HTML and a little JavaScript, served as it is (no build step, nothing fetched elsewhere).
PAGE = """<!doctype html>
<html lang="ko">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>질문하기 · Ask the reader</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 50rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.6; }
  label { display: block; margin-top: 1rem; font-weight: 600; }
  textarea, input { width: 100%; box-sizing: border-box; font: inherit; padding: .4rem; }
  textarea { height: 12rem; }
  button { font: inherit; margin: 1rem 0; padding: .4rem 1.4rem; }
  #passage { white-space: pre-wrap; border: 1px solid #ccc; border-radius: 4px; padding: .8rem; }
  mark { background: #ffe066; }
  #error { color: #b00020; }
</style>
</head>
<body>
<h1>질문하기 · Ask the reader</h1>
<label for="context">문맥 · Text</label>
<textarea id="context" placeholder="답을 찾을 글을 붙여 넣으세요 · Paste the text to answer from"></textarea>
<label for="question">질문 · Question</label>
<input id="question" placeholder="예: 훈민정음은 언제 창제되었나?">
<button id="ask" type="button">답 찾기 · Answer</button>
<p id="result" hidden>답 · Answer: <strong id="answer-text"></strong> (확률 · probability <span id="probability"></span>)</p>
<p id="error" role="alert"></p>
<div id="passage" hidden></div>
<ol id="others"></ol>
<script>
"use strict";
const $ = (id) => document.getElementById(id);

async function ask() {
  const context = $("context").value, question = $("question").value;
  $("ask").disabled = true;
  $("error").textContent = "";
  $("result").hidden = $("passage").hidden = true;
  try {
    const response = await fetch("answer", {method: "POST", headers: {"Content-Type": "application/json"},
                                            body: JSON.stringify({question, context, top_k: 3})});
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || response.status + " " + response.statusText);
    show(context, body);
  } catch (error) {
    $("others").replaceChildren();
    $("error").textContent = error.message;
  } finally {
    $("ask").disabled = false;
  }
}

function percent(probability) { return (100 * probability).toFixed(1) + "%"; }

function show(context, best) {
  // The server counts characters as Python does (code points), not as JavaScript strings do (UTF-16 units).
  const chars = Array.from(context);
  const passage = $("passage");
  passage.replaceChildren();
  if (best.start === null) {
    passage.append(context);
    $("answer-text").textContent = "(없음 · none)";
  } else {
    const mark = document.createElement("mark");
    mark.id = "highlight";
    mark.textContent = chars.slice(best.start, best.end).join("");
    passage.append(chars.slice(0, best.start).join(""), mark, chars.slice(best.end).join(""));
    $("answer-text").textContent = best.answer;
  }
  $("probability").textContent = percent(best.probability);
  $("others").replaceChildren(...best.answers.slice(1).map((other) => {
    const item = document.createElement("li");
    item.textContent = other.answer + " (" + percent(other.probability) + ")";
    return item;
  }));
  $("result").hidden = passage.hidden = false;
  const mark = $("highlight");
  if (mark) mark.scrollIntoView({block: "center"});
}

$("ask").addEventListener("click", ask);
$("question").addEventListener("keydown", (event) => { if (event.key === "Enter") ask(); });
</script>
</body>
</html>
"""


# --- CLI -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="Serve a fine-tuned reader over HTTP: POST /answer (JSON), "
                                                   "GET /health, and a page at GET /.")
    add_reader_args(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on; 0.0.0.0 makes the server reachable from other machines.")
    parser.add_argument("--port", type=int_at_least(0, 65535), default=8000,
                        help="Port to listen on (0: any free one).")
    parser.add_argument("--queue_size", type=positive_int, default=256,
                        help="Questions that may wait for the model; past that, requests get 503 at once.")
    parser.add_argument("--max_batch", type=positive_int, default=32,
                        help="Questions answered together, from as many requests as fit.")
    parser.add_argument("--max_wait_ms", type=int_at_least(0, MAX_WAIT_MS), default=5,
                        help="How long the worker waits for more requests to fill a batch; less than "
                             "--request_timeout.")
    parser.add_argument("--max_items", type=positive_int, default=64, help="Questions in one request, at most.")
    parser.add_argument("--max_body_bytes", type=positive_int, default=4 * 2**20,
                        help="Largest request body; larger ones get 413.")
    parser.add_argument("--max_context_chars", type=positive_int, default=100_000,
                        help="Longest context (or question), in characters; longer ones get 413.")
    parser.add_argument("--request_timeout", type=positive_float, default=30.0,
                        help="Seconds a request may take, from its first byte to its answer (408/504 past it).")
    parser.add_argument("--max_connections", type=positive_int, default=512,
                        help="Open connections at most; past that, new ones get 503 (bounds memory under a flood).")
    parser.add_argument("--header_timeout", type=positive_float, default=10.0,
                        help="Seconds a connection may take to send a request's line and headers (from opening, or "
                             "from the previous answer on it); slower ones are closed, so that they cannot hold "
                             "--max_connections.")
    parser.add_argument("--access_log", action="store_true", help="Log one line per request.")
    parser.add_argument("--quiet", action="store_true", help="Warnings only.")
    return parser


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, opened before the model loads so that a taken port fails at once."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise UsageError(f"--host {host}: not an address of this machine ({error.strerror})") from None
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None
    return sock


def header_timeout_protocol(header_timeout: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 protocol (h11), closing a connection that has not sent a whole request line and
    headers within `header_timeout` seconds of opening, or of the previous answer on it. uvicorn has no such
    limit (its keep-alive timer stops at a request's first byte) and counts these connections against
    --max_connections, so a few clients sending a byte now and then would keep every other client at 503.
    It also answers what uvicorn answers in plain text (bad framing, the connection limit) as JSON, and
    still answers a client that half-closes its side after sending its request."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    def error_body(message: str) -> bytes:
        return json.dumps({"error": message}).encode("utf-8")

    message = error_body(f"the request line and headers did not arrive within {header_timeout:g} s "
                         f"(--header_timeout)")
    overdue = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(message), message))
    malformed = error_body("not a valid HTTP/1.1 request (its request line, headers, Content-Length or chunked "
                           "framing)")
    busy = error_body("too many open connections (--max_connections); retry shortly")
    busy_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(busy)),
                    (b"connection", b"close"), (b"retry-after", b"1")]

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None
        half_closed = False   # the client has sent its last byte (shutdown(SHUT_WR)) and waits for the answer

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The connection limit is checked in limited() instead, where the 503 can be JSON.
            self.connection_limit, self.limit_concurrency = self.limit_concurrency, None
            self.app = self.limited(self.app)

        def limited(self, app: Any) -> Any:
            async def guarded(scope: Any, receive: Any, send: Any) -> None:
                # As uvicorn counts: this request's own task is in self.tasks by now, hence the "> limit".
                if self.connection_limit is not None and (len(self.connections) >= self.connection_limit
                                                          or len(self.tasks) > self.connection_limit):
                    self.logger.warning("Exceeded concurrency limit.")
                    await send({"type": "http.response.start", "status": 503, "headers": busy_headers})
                    await send({"type": "http.response.body", "body": busy})
                    return
                await app(scope, receive, send)
            return guarded

        def send_400_response(self, msg: str) -> None:
            # uvicorn's own, with a JSON body of a stated length (uvicorn's is text, chunked on HTTP/1.1).
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(malformed)),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=malformed), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def eof_received(self) -> bool | None:
            # asyncio closes the transport when this returns a false value: do so unless a whole request is
            # being answered, whose answer can still be written (and then the connection is closed).
            if self.cycle is not None and not self.cycle.response_complete and not self.cycle.more_body:
                self.half_closed = True
                return True
            return None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self.await_headers()

        def on_response_complete(self) -> None:
            if self.half_closed:
                self.transport.close()   # the client can send no more requests: this answer was the last
            else:
                self.await_headers()   # the next request's line and headers are due from now on
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def await_headers(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(header_timeout, self.headers_overdue)

        def headers_overdue(self) -> None:
            if self.cycle is not None and not self.cycle.response_complete:
                return   # its request is under way: the body and the answer have --request_timeout
            if self.conn.trailing_data[0] and not self.transport.is_closing():   # part of a request came
                self.transport.write(overdue)
            self.timeout_keep_alive_handler()   # uvicorn's own way to close a connection between requests

    return HeaderTimeoutProtocol


def server_config(reader: Reader, args: argparse.Namespace, announce: str | None = None) -> uvicorn.Config:
    """uvicorn's configuration for serving `reader` as the flags say."""
    batcher = Batcher(reader, args.queue_size, args.max_batch, args.max_wait_ms / 1000)
    limits = Limits(args.max_body_bytes, args.max_items, args.max_context_chars)
    app = build_app(reader, batcher, limits, args.request_timeout, announce)
    # uvicorn answers 503 once the open connections, the one asking included, reach limit_concurrency.
    # ws="none": the app has no WebSocket routes, and the header timer would cut an upgraded connection.
    return uvicorn.Config(app, http=header_timeout_protocol(args.header_timeout), ws="none", log_config=None,
                          access_log=args.access_log, lifespan="on",
                          limit_concurrency=args.max_connections + 1, timeout_keep_alive=5,
                          timeout_graceful_shutdown=args.request_timeout + 5)


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    # As predict.py: window flags and a threshold given win over an ONNX export's recorded ones.
    args.explicit_flags = given_flags(parser, argv)
    if MISSING_PACKAGE is not None:
        raise UsageError(f"{MISSING_PACKAGE} is not installed; serve.py needs: pip install -r requirements-serve.txt")
    check_numbers(args)
    if args.max_items > args.queue_size:
        raise UsageError(f"--max_items {args.max_items} is larger than --queue_size {args.queue_size}: "
                         f"such a request could never be queued")
    if args.max_wait_ms >= args.request_timeout * 1000:
        raise UsageError(f"--max_wait_ms {args.max_wait_ms} is not shorter than --request_timeout "
                         f"{args.request_timeout:g} s: a lone request would time out waiting for its batch")
    setup_logging(args.quiet)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not (host.startswith("127.") or host == "::1"):
        logger.warning("listening on %s: anyone who can reach this machine can use the server (no authentication)",
                       host)
    for stop_signal in (signal.SIGTERM, signal.SIGINT):   # loading a model can take a while
        signal.signal(stop_signal, stopped_while_loading)
    reader = Reader.from_args(args)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    config = server_config(reader, args, announce=f"{PROG}: serving on {url}")
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again under the handler that was
    # there before; a handler that ignores it lets the process end with status 0 after the clean shutdown.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda number, frame: None)
    server = uvicorn.Server(config)
    # A forced quit cancels every request in flight, and uvicorn logs each cancellation with a traceback: the
    # one line below says it all.
    logging.getLogger("uvicorn.error").addFilter(lambda record: not server.force_exit or record.levelno < logging.ERROR)
    server.run(sockets=[sock])
    if server.force_exit:   # a second Ctrl-C during the graceful shutdown: uvicorn dropped what was in flight
        print(f"{PROG}: forced to quit by a second SIGINT; requests still being answered were dropped",
              file=sys.stderr, flush=True)
        logging.shutdown()
        # Not sys.exit: the worker thread may be inside the model, and tearing the interpreter down under torch's
        # running threads aborts the process (SIGABRT) instead of exiting 1.
        os._exit(1)


def stopped_while_loading(number: int, frame: Any) -> None:
    """Before the server runs, SIGTERM/SIGINT end the process at once, with one line and status 128 + signal."""
    print(f"{PROG}: stopped by {signal.Signals(number).name} before serving", file=sys.stderr, flush=True)
    sys.exit(128 + number)


if __name__ == "__main__":
    run_cli(main)

"""serve.py: concurrent clients get their own answers, a flood gets fast 503s, bad requests get 4xx JSON,
SIGTERM loses no accepted request, and the page works in a real browser. All on 127.0.0.1, bounded."""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SAMPLE_FILE, TINY_CONFIG, VOCAB_FILE, run_script
from modeling import Config, QuestionAnswering

pytest.importorskip("starlette", reason="serve.py's stack is not installed: pip install -r requirements-serve.txt")
pytest.importorskip("uvicorn", reason="serve.py's stack is not installed: pip install -r requirements-serve.txt")

WINDOWS = dict(max_seq_length=128, doc_stride=64, max_query_length=32)
WINDOW_FLAGS = [f"--{name}={value}" for name, value in WINDOWS.items()]
LIMITS = dict(queue_size=48, max_batch=16, max_items=16, max_body_bytes=256 * 1024, max_context_chars=3000)
# A tiny model on a shared 2-core machine: one thread each keeps server and tests from fighting over cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A training run directory with a tiny randomly initialised model (what it answers does not matter,
    only that the server answers as the Reader does)."""
    run = tmp_path_factory.mktemp("serve_run")
    (run / "config.json").write_text(json.dumps(TINY_CONFIG))
    (run / "training_args.json").write_text(json.dumps({"vocab_file": str(VOCAB_FILE), "analyzer": "mecab"}))
    torch.manual_seed(0)
    torch.save(QuestionAnswering(Config(**TINY_CONFIG)).state_dict(), run / "korquad_1.bin")
    return run


@pytest.fixture(scope="module")
def reader(run_dir):
    from predict import Reader
    return Reader.load(run_dir, no_cuda=True, **WINDOWS)


def reference(reader, records: list[dict], top_k: int | None = None) -> list[dict]:
    """The Reader's own answers (what predict.py prints), computed on one thread like the server."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reader.answer_all(records, top_k=top_k)
    finally:
        torch.set_num_threads(threads)


def sample_texts() -> tuple[list[str], list[str]]:
    """The bundled sample's sentences and questions."""
    articles = json.loads(SAMPLE_FILE.read_text(encoding="utf-8"))["data"]
    paragraphs = [paragraph for article in articles for paragraph in article["paragraphs"]]
    sentences = [s.strip() + "." for p in paragraphs for s in p["context"].split(". ") if s.strip()]
    return sentences, [qa["question"] for p in paragraphs for qa in p["qas"]]


def distinct_questions(count: int, sentences_each: int = 2) -> list[dict]:
    """`count` questions, each with a context of its own (numbered, so no two are equal)."""
    sentences, questions = sample_texts()
    return [{"id": f"q{n}", "question": questions[n % len(questions)],
             "context": f"{n}번 글. " + " ".join(sentences[(n + k) % len(sentences)] for k in range(sentences_each))}
            for n in range(count)]


def same_answer(got: dict, expected: dict) -> bool:
    """Equal answers; probabilities to float noise (the server batches other requests' windows alongside)."""
    def plain(answer: dict) -> dict:
        return {k: v for k, v in answer.items() if k not in ("probability", "answers")}
    if plain(got) != plain(expected) or got["probability"] != pytest.approx(expected["probability"], abs=1e-5):
        return False
    return [plain(a) for a in got.get("answers", [])] == [plain(a) for a in expected.get("answers", [])]


class Server:
    """serve.py in its own process, on a free port of 127.0.0.1."""

    def __init__(self, run_dir: Path, log: Path, *flags: str) -> None:
        self.log = log
        limits = [f"--{name}={value}" for name, value in LIMITS.items()]
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "serve.py"), f"--checkpoint={run_dir}", "--port=0", "--no_cuda",
             *WINDOW_FLAGS, *limits, *flags], cwd=ROOT, env={**os.environ, **ONE_THREAD}, text=True,
            stdout=subprocess.PIPE, stderr=open(log, "w"))
        line = self._read_line(deadline=time.monotonic() + 90)
        match = re.fullmatch(r"serve\.py: serving on http://127\.0\.0\.1:(\d+)", line.strip())
        assert match, f"no address announced: {line!r}\n{log.read_text()}"
        self.port = int(match.group(1))

    def _read_line(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            if select.select([self.process.stdout], [], [], 0.2)[0]:
                return self.process.stdout.readline()
            if self.process.poll() is not None:
                break
        self.process.kill()
        raise AssertionError(f"serve.py did not start:\n{self.log.read_text()}")

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=60)
        finally:
            self.process.kill()

    def rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def post(connection: http.client.HTTPConnection, payload, path: str = "/answer") -> tuple[int, object]:
    body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def health(port: int) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200
    return json.loads(response.read())


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    running = Server(run_dir, tmp_path_factory.mktemp("serve_log") / "server.log")
    yield running
    assert running.stop() == 0, running.log.read_text()
    assert "Traceback" not in running.log.read_text()


# --- answers ---------------------------------------------------------------------------------

def test_16_concurrent_clients_each_get_their_own_answer(server, reader):
    # The load: 16 clients at once sending 500 requests in all, each with a context of its own, so
    # that an answer handed to the wrong request, or lost, shows.
    questions = distinct_questions(500)
    # Every seventh request asks for its top 1-3 too: the server batches those beside plain ones.
    top_ks = [(n // 7) % 3 + 1 if n % 7 == 0 else None for n in range(len(questions))]
    expected: list[dict] = [{}] * len(questions)
    for top_k in set(top_ks):
        indices = [n for n, k in enumerate(top_ks) if k == top_k]
        for n, answer in zip(indices, reference(reader, [questions[n] for n in indices], top_k)):
            expected[n] = answer
    before = health(server.port)

    def client(number: int) -> list[tuple[int, int, object]]:
        connection = server.connect()   # one keep-alive connection per client
        results = []
        for n in range(number, len(questions), 16):
            request = {**questions[n], **({"top_k": top_ks[n]} if top_ks[n] else {})}
            results.append((n, *post(connection, request)))
        return results

    with ThreadPoolExecutor(16) as pool:
        results = [result for client_results in pool.map(client, range(16)) for result in client_results]
    assert sorted(n for n, _, _ in results) == list(range(len(questions)))
    assert all(status == 200 for _, status, _ in results)
    wrong = [(n, got, expected[n]) for n, _, got in results if not same_answer(got, expected[n])]
    assert not wrong, f"{len(wrong)} of {len(results)} answers differ from the Reader's, e.g. {wrong[0]}"
    after = health(server.port)
    assert after["accepted"] - before["accepted"] == after["answered"] - before["answered"] == len(questions)


CLEAN = "세종대왕은 1443년에 훈민정음을 창제하였다. 훈민정음은 1446년에 반포되었다."
QUESTION = "훈민정음은 언제 창제되었나?"


def odd_forms_answer_alike(server, reader, odd: str) -> None:
    """`odd` (CLEAN in another form) and CLEAN, sent as a list: answered as the Reader answers each, the
    same span of the text, with offsets into each caller's own string."""
    import unicodedata

    items = [{"question": QUESTION, "context": text, "top_k": 3} for text in (CLEAN, odd)]
    status, answers = post(server.connect(), items)
    assert status == 200 and len(answers) == 2
    for item, answer in zip(items, answers):
        assert same_answer(answer, reference(reader, [item], top_k=3)[0])
        assert item["context"][answer["start"]:answer["end"]] == answer["answer"]
    same_spaces = unicodedata.normalize("NFC", answers[1]["answer"]).replace("\u3000", " ").replace("\u00a0", " ")
    assert same_spaces == answers[0]["answer"]


def test_nfd_and_odd_spaces_answer_as_clean_text(server, reader):
    import unicodedata

    odd = unicodedata.normalize("NFD", CLEAN).replace(" ", "\u3000", 1).replace(" ", "\u00a0", 1)
    odd_forms_answer_alike(server, reader, odd)


def test_a_context_opening_with_a_bom_answers_as_clean_text(server, reader):
    # Needs Mecab spans that skip leading separators (issue 23's tokenizer fix).
    odd_forms_answer_alike(server, reader, "\ufeff" + CLEAN)


def test_top_k_beyond_n_best_size_answers_as_the_reader_does(reader):
    from serve import answer_questions

    records = distinct_questions(3, sentences_each=4)
    got = answer_questions(reader, records, [None, 25, 2])
    assert "answers" not in got[0] and len(got[1]["answers"]) == 25 and len(got[2]["answers"]) == 2
    for record, top_k, answer in zip(records, [None, 25, 2], got):
        assert same_answer(answer, reference(reader, [record], top_k)[0])


# --- protection ------------------------------------------------------------------------------

async def flood_request(port: int, body: bytes) -> tuple[int, float, object]:
    """One POST on its own connection: (status, seconds to the response, the JSON it returned)."""
    began = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 60)
    seconds = time.monotonic() - began
    response = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    return int(status_line.split()[1]), seconds, json.loads(response.split(b"\r\n\r\n", 1)[1])


def test_a_flood_beyond_the_queue_gets_fast_503s_and_memory_stays_bounded(server, reader):
    sentences, _ = sample_texts()
    long_context = " ".join(sentences * 4)[:1200]
    items = [{"question": f"{n}번째 질문: 무엇인가?", "context": long_context} for n in range(LIMITS["max_items"])]
    body = json.dumps(items, ensure_ascii=False).encode("utf-8")
    expected = reference(reader, items)

    async def flood() -> list[tuple[int, float, object]]:
        return await asyncio.gather(*(flood_request(server.port, body) for _ in range(100)))

    assert asyncio.run(flood_request(server.port, body))[0] == 200   # first-use allocations happen here
    rss = [server.rss_mib()]
    for _ in range(2):
        outcomes = asyncio.run(flood())
        rss.append(server.rss_mib())
        assert {status for status, _, _ in outcomes} <= {200, 503}
        refused = sorted(seconds for status, seconds, _ in outcomes if status == 503)
        answered = sorted(seconds for status, seconds, _ in outcomes if status == 200)
        assert all(all(map(same_answer, answers, expected)) for status, _, answers in outcomes if status == 200)
        # The queue holds 3 of these requests: most of the others are turned away, and at once.
        assert len(refused) >= 70 and answered, (refused, answered)
        assert refused[len(refused) // 2] < 1.0 and refused[len(refused) // 2] < answered[-1], (refused, answered)
    # Memory does not grow with the floods: a request's worth each, not a queue's worth per request.
    assert rss[1] - rss[0] < 64 and rss[2] - rss[1] < 16, rss
    status, answers = post(server.connect(), items)
    assert status == 200 and all(same_answer(got, want) for got, want in zip(answers, expected))


LONG = "가" * (LIMITS["max_context_chars"] + 1)
GOOD = {"question": "수도는?", "context": "서울은 대한민국의 수도이다."}


def json_body(payload) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


BAD_REQUESTS = {   # kind: (method, path, content type, body, status, part of the message)
    "not JSON": ("POST", "/answer", "application/json", b'{"question": "a",', 400, "not valid JSON"),
    "not UTF-8": ("POST", "/answer", "application/json", b'{"question": "\xff\xfe", "context": "a"}', 400,
                  "not UTF-8"),
    "empty body": ("POST", "/answer", "application/json", b"", 400, "the body is empty"),
    "no question": ("POST", "/answer", "application/json", json_body({"context": "a"}), 400, 'missing "question"'),
    "no context": ("POST", "/answer", "application/json", json_body({"question": "a"}), 400, 'missing "context"'),
    "question a number": ("POST", "/answer", "application/json", json_body({**GOOD, "question": 3}), 400,
                          '"question" must be a string, got a number'),
    "context null": ("POST", "/answer", "application/json", json_body({**GOOD, "context": None}), 400,
                     '"context" must be a string, got null'),
    "blank question": ("POST", "/answer", "application/json", json_body({**GOOD, "question": " \n\u200b\u3000"}), 400,
                       '"question" is empty'),
    "a bare string": ("POST", "/answer", "application/json", json_body("수도는?"), 400, "got a string"),
    "empty list": ("POST", "/answer", "application/json", b"[]", 400, "empty list"),
    "too many items": ("POST", "/answer", "application/json", json_body([GOOD] * (LIMITS["max_items"] + 1)), 413,
                       "--max_items"),
    "list item not an object": ("POST", "/answer", "application/json", json_body([GOOD, [1]]), 400,
                                "item 1: expected a JSON object"),
    "unknown field": ("POST", "/answer", "application/json", json_body({**GOOD, "questoin": "a"}), 400,
                      'unknown field "questoin"'),
    "top_k zero": ("POST", "/answer", "application/json", json_body({**GOOD, "top_k": 0}), 400, '"top_k"'),
    "top_k a string": ("POST", "/answer", "application/json", json_body({**GOOD, "top_k": "3"}), 400, '"top_k"'),
    "top_k true": ("POST", "/answer", "application/json", json_body({**GOOD, "top_k": True}), 400, '"top_k"'),
    "top_k NaN": ("POST", "/answer", "application/json", b'{"question": "a", "context": "b", "top_k": NaN}', 400,
                  '"top_k"'),
    "top_k too large": ("POST", "/answer", "application/json", json_body({**GOOD, "top_k": 101}), 400, '"top_k"'),
    "context too long": ("POST", "/answer", "application/json", json_body({**GOOD, "context": LONG}), 413,
                         "--max_context_chars"),
    "body too large": ("POST", "/answer", "application/json",
                       json_body([{**GOOD, "context": "가" * 2000}] * 50), 413, "--max_body_bytes"),
    "lone surrogate": ("POST", "/answer", "application/json", b'{"question": "\\ud800", "context": "a"}', 400,
                       "lone surrogate"),
    "nested too deeply": ("POST", "/answer", "application/json", b"[" * 100_000 + b"]" * 100_000, 400,
                          "nested too deeply"),
    "form content type": ("POST", "/answer", "application/x-www-form-urlencoded", b"question=a", 415,
                          "Content-Type: application/json"),
    "no content type": ("POST", "/answer", None, json_body(GOOD), 415, "Content-Type: application/json"),
    "latin-1 charset": ("POST", "/answer", "application/json; charset=latin-1", json_body(GOOD), 415, "UTF-8"),
    "GET /answer": ("GET", "/answer", None, b"", 405, "use POST"),
    "PUT /answer": ("PUT", "/answer", "application/json", json_body(GOOD), 405, "use POST"),
    "POST /": ("POST", "/", "application/json", json_body(GOOD), 405, "not allowed"),
    "unknown path": ("GET", "/answers", None, b"", 404, "POST /answer"),
    # No 307 to the same path without its slash: its Location would name the client's Host header.
    "POST /answer/": ("POST", "/answer/", "application/json", json_body(GOOD), 404, "no page /answer/"),
    "GET /health/": ("GET", "/health/", None, b"", 404, "no page /health/"),
}


@pytest.mark.parametrize("kind", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_answering(server, kind):
    method, path, content_type, body, status, message = BAD_REQUESTS[kind]
    connection = server.connect()
    connection.request(method, path, body, {"Content-Type": content_type} if content_type else {})
    response = connection.getresponse()
    text = response.read().decode("utf-8")
    assert response.status == status and response.headers["content-type"] == "application/json", text
    assert list(json.loads(text)) == ["error"] and message in json.loads(text)["error"], text
    assert "Traceback" not in text
    assert post(server.connect(), GOOD)[0] == 200


def test_a_compressed_body_gets_415_naming_content_encoding(server):
    import gzip

    for encoding, status in (("gzip", 415), ("identity", 200), ("", 200)):
        body = json_body(GOOD)
        connection = server.connect()
        connection.request("POST", "/answer", gzip.compress(body) if encoding == "gzip" else body,
                           {"Content-Type": "application/json", "Content-Encoding": encoding})
        response = connection.getresponse()
        answer = json.loads(response.read().decode("utf-8"))
        assert response.status == status, answer
        if status == 415:
            assert answer == {"error": "Content-Encoding gzip is not supported; send the JSON uncompressed"}


MANY_DIGITS = "7" * 4301   # one more than Python's int() reads by default
NOT_STRICT_JSON = {   # body: the error names the field and what it holds
    '{"question": "a", "context": "b", "id": NaN}': '"id" holds NaN, which is not JSON',
    '{"question": "a", "context": "b", "id": Infinity}': '"id" holds Infinity, which is not JSON',
    '{"question": "a", "context": "b", "id": -Infinity}': '"id" holds -Infinity, which is not JSON',
    '{"question": "a", "context": "b", "id": 1e999}': '"id" holds 1e999, a number beyond the range of a double',
    '{"question": "a", "context": "b", "id": -1e999}': '"id" holds -1e999, a number beyond',
    f'{{"question": "a", "context": "b", "id": {MANY_DIGITS}}}': '"id" holds a whole number of 4301 digits',
    f'{{"question": "a", "context": "b", "id": -{MANY_DIGITS}}}': '"id" holds a whole number of 4301 digits',
    '{"question": "a", "context": "b", "id": {"run": [1, 2, NaN]}}': '"id" holds NaN',
    '{"question": 1e999, "context": "b"}': '"question" holds 1e999',
    f'{{"question": "a", "context": {MANY_DIGITS}}}': '"context" holds a whole number of 4301 digits',
    '{"question": "a", "context": "b", "top_k": Infinity}': '"top_k" holds Infinity',
    f'{{"question": "a", "context": "b", "top_k": {MANY_DIGITS}}}': '"top_k" holds a whole number of 4301 digits',
    '[{"question": "a", "context": "b"}, {"question": "a", "context": "b", "id": NaN}]': 'item 1: "id" holds NaN',
}


@pytest.mark.parametrize("body", NOT_STRICT_JSON, ids=lambda body: body[:60])
def test_numbers_strict_json_cannot_carry_get_400_naming_the_field(server, body):
    connection = server.connect()
    connection.request("POST", "/answer", body.encode("utf-8"), {"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode("utf-8")
    assert response.status == 400 and list(json.loads(text)) == ["error"], text
    assert NOT_STRICT_JSON[body] in json.loads(text)["error"], text
    assert "Traceback" not in server.log.read_text()


def test_ids_strict_json_can_carry_are_echoed(server):
    ids = [1.5, -2.5e-300, 1e308, int("9" * 4300), {"run": [1, None, True]}]
    status, answers = post(server.connect(), [{**GOOD, "id": answer_id} for answer_id in ids])
    assert status == 200 and [answer["id"] for answer in answers] == ids


def test_a_body_too_large_without_content_length_gets_413(server):
    connection = server.connect()
    connection.putrequest("POST", "/answer")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = b"x" * 65536
    for _ in range(LIMITS["max_body_bytes"] // len(chunk) + 2):
        connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 413 and "--max_body_bytes" in json.loads(response.read())["error"]


class WorkerBug(BaseException):
    """A failure that no `except Exception` catches: it ends the worker thread."""


class ScriptedReader:
    """A stand-in Reader: "slow" questions take 0.6 s, "hold" ones wait for `release`, "boom" ones raise,
    "fatal" ones end the worker thread, others answer at once with their context's first character. `batches`
    lists the questions of every call."""
    n_best_size = 20

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def answer_all(self, records, top_k=None):
        self.batches.append(sorted(record["question"] for record in records))
        if any(record["question"] == "boom" for record in records):
            raise RuntimeError("a bug met on this question")
        if any(record["question"] == "fatal" for record in records):
            raise WorkerBug("the worker itself breaks")
        if any(record["question"] == "slow" for record in records):
            time.sleep(0.6)
        if any(record["question"] == "hold" for record in records):
            self.release.wait(30)
        return [{"answer": record["context"][:1], "start": 0, "end": 1, "probability": 1.0} for record in records]


SCRIPTED_FLAGS = ["--checkpoint=unused", "--queue_size=8", "--max_batch=8", "--max_wait_ms=200",
                  "--request_timeout=0.5",
                  *(f"--{name}={LIMITS[name]}" for name in ("max_body_bytes", "max_items", "max_context_chars"))]


@pytest.fixture
def scripted_server():
    """Start serve.py's server around a ScriptedReader, in this process (uvicorn on a thread), configured by
    serve.py's own flags: a 0.5 s request timeout and a 200 ms batching wait unless `flags` say otherwise.
    Returns (port, reader)."""
    import uvicorn

    import serve

    running: list[tuple[uvicorn.Server, threading.Thread, ScriptedReader]] = []

    def start(*flags: str) -> tuple[int, ScriptedReader]:
        reader = ScriptedReader()
        args = serve.build_parser().parse_args([*SCRIPTED_FLAGS, *flags])
        sock = serve.listen("127.0.0.1", 0)
        server = uvicorn.Server(serve.server_config(reader, args))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
        thread.start()
        running.append((server, thread, reader))
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        return sock.getsockname()[1], reader

    yield start
    for server, thread, reader in running:
        reader.release.set()
        server.should_exit = True
        thread.join(timeout=30)


def plain_question(question: str) -> dict:
    return {"question": question, "context": "가나"}


def local_connection(port: int) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=30)


def test_timeouts_and_a_failing_request_cost_only_that_request(scripted_server):
    port, reader = scripted_server()
    status, body = post(local_connection(port), plain_question("slow"))
    assert status == 504 and "--request_timeout" in body["error"]
    # A body that stops arriving: 408 once the timeout passes, not a connection held forever.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"question\": ")
        response = http.client.HTTPResponse(slow)
        response.begin()
        assert response.status == 408 and "--request_timeout" in json.loads(response.read())["error"]
    # A request that breaks the reader gets a 500 of its own; one batched beside it is still answered.
    with ThreadPoolExecutor(2) as pool:
        boom, fine = pool.map(lambda question: post(local_connection(port), plain_question(question)),
                              ["boom", "fine"])
    assert boom[0] == 500 and "Traceback" not in boom[1]["error"] and list(boom[1]) == ["error"]
    assert fine == (200, {"answer": "가", "start": 0, "end": 1, "probability": 1.0})
    assert ["boom", "fine"] in reader.batches   # they were one batch, answered again one by one


def wait_until(condition, seconds: float = 10) -> None:
    """Poll `condition` (blocking: in a coroutine too, where the worker thread needs no loop meanwhile)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_request_of_exactly_queue_size_questions_is_queued_and_one_more_is_refused(scripted_server):
    port, reader = scripted_server()   # --queue_size=8, --max_items=16
    items = [plain_question(f"q{n}") for n in range(9)]
    status, answers = post(local_connection(port), items[:8])
    assert status == 200 and [answer["answer"] for answer in answers] == ["가"] * 8
    status, body = post(local_connection(port), items)
    assert status == 503 and "room for 8" in body["error"]
    assert sorted(question for batch in reader.batches for question in batch) == [f"q{n}" for n in range(8)]


def test_a_request_that_times_out_in_the_queue_is_never_computed_and_frees_its_room(scripted_server):
    port, reader = scripted_server()   # --request_timeout=0.5
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(post, local_connection(port), plain_question("hold"))
        wait_until(lambda: ["hold"] in reader.batches)   # the worker is busy with it
        status, body = post(local_connection(port), [plain_question("queued")] * 3)
        assert status == 504 and "--request_timeout" in body["error"]
        assert health(port)["queued"] == 0   # its 3 questions no longer take room in the queue
        reader.release.set()
        assert held.result()[0] == 504   # it was being computed when its time ran out
    assert post(local_connection(port), plain_question("after"))[0] == 200   # the worker has moved past it
    assert all("queued" not in batch for batch in reader.batches), reader.batches


def run_batcher(batcher, scenario) -> object:
    """`scenario(batcher)` in an event loop, with the batcher's worker running; the worker stopped after."""
    batcher.start()
    try:
        return asyncio.run(scenario(batcher))
    finally:
        batcher.reader.release.set()
        batcher.stop()


def test_a_job_abandoned_while_its_batch_fills_is_not_computed():
    from serve import Batcher

    async def scenario(batcher) -> None:
        job = batcher.submit([plain_question("late")], [None])
        wait_until(lambda: batcher.queued == 0)   # the worker has taken it and waits up to 30 s for more
        batcher.abandon(job)

    reader = ScriptedReader()
    run_batcher(Batcher(reader, queue_size=8, max_batch=8, max_wait_s=30), scenario)   # stop() ends the wait
    assert reader.batches == []


def test_no_batch_exceeds_max_batch_and_every_question_gets_its_own_answer():
    from serve import Batcher

    sizes = [3, 2, 1, 6, 1, 1]   # 14 questions; the 6 is larger than a whole batch
    starts = [sum(sizes[:n]) for n in range(len(sizes))]
    requests = [[{"question": f"q{start + k:02d}", "context": chr(ord("가") + start + k)} for k in range(size)]
                for start, size in zip(starts, sizes)]

    async def scenario(batcher) -> list[list[dict]]:
        held = batcher.submit([plain_question("hold")], [None])
        wait_until(lambda: batcher.reader.batches)   # all the others queue up behind it
        jobs = [batcher.submit(records, [None] * len(records)) for records in requests]
        batcher.reader.release.set()
        await asyncio.wait_for(held.future, 30)
        return [await asyncio.wait_for(job.future, 30) for job in jobs]

    reader = ScriptedReader()
    answers = run_batcher(Batcher(reader, queue_size=32, max_batch=4, max_wait_s=0.05), scenario)
    for records, got in zip(requests, answers):
        assert [answer["answer"] for answer in got] == [record["context"] for record in records]
    assert reader.batches[0] == ["hold"]
    # Full batches of 4, whatever the requests' sizes, and each question computed once.
    assert [len(batch) for batch in reader.batches[1:]] == [4, 4, 4, 2], reader.batches
    assert sorted(sum(reader.batches[1:], [])) == [f"q{n:02d}" for n in range(14)]


def test_max_connections_connections_are_served_at_once_and_one_more_is_not(scripted_server):
    port, _ = scripted_server("--max_connections=3")
    with contextlib.ExitStack() as open_connections:
        for _ in range(2):
            open_connections.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        assert health(port)["status"] == "ok"   # asked on a 3rd connection
        open_connections.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
        connection = local_connection(port)   # a 4th
        connection.request("GET", "/health")
        response = connection.getresponse()
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert "--max_connections" in json.loads(response.read())["error"]


TRICKLED = b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 40\r\n"


def trickle(port: int, after_a_request: bool, connected: threading.Barrier, give_up_s: float) -> tuple[float, bytes]:
    """Open a connection (after_a_request: have one request answered on it first) and send TRICKLED one byte
    every 0.5 s, never ending the headers. (seconds from the answer, or from opening, to the server closing
    it; what the server sent then), or (inf, b"") if it is still open after `give_up_s`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if after_a_request:
            time.sleep(0.6)   # the answer comes late enough that the timer from opening alone would cut short
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            received = b""
            while not received.endswith(b"}"):
                received += sock.recv(4096)
        began = time.monotonic()
        connected.wait(10)
        for byte in TRICKLED:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return time.monotonic() - began, b""
            if select.select([sock], [], [], 0.5)[0]:
                closed_at, sent = time.monotonic(), b""
                with contextlib.suppress(OSError):
                    while chunk := sock.recv(4096):
                        sent += chunk
                return closed_at - began, sent
            if time.monotonic() - began > give_up_s:
                break
    return math.inf, b""


def test_connections_that_never_finish_their_headers_are_closed_and_others_answered(scripted_server):
    port, _ = scripted_server("--max_connections=3", "--header_timeout=1", "--request_timeout=5")
    connected = threading.Barrier(4)
    with ThreadPoolExecutor(3) as pool:
        # Three trickling connections: as many as --max_connections; one of them has had an answer already.
        tricklers = [pool.submit(trickle, port, n == 0, connected, 1 + 6) for n in range(3)]
        connected.wait(10)
        began = time.monotonic()
        statuses = []
        while time.monotonic() - began < 1 + 4 and (not statuses or statuses[-1] == 503):
            connection = local_connection(port)
            connection.request("POST", "/answer", json_body(plain_question("q")),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            connection.close()
            statuses.append(response.status)
            time.sleep(0.1 if response.status == 503 else 0)
        answered_after = time.monotonic() - began
        outcomes = [trickler.result() for trickler in tricklers]
    # Turned away while the trickling connections fill the server; answered once they are cut off.
    assert statuses[-1] == 200 and answered_after < 1 + 4, (statuses, answered_after)
    for seconds, sent in outcomes:
        assert 0.7 < seconds < 1 + 4, outcomes   # not before --header_timeout, give or take a client's delay
        assert sent.startswith(b"HTTP/1.1 408 ") and b"--header_timeout" in sent, outcomes
    # Headers in time, then a body slower than --header_timeout: answered (the body has --request_timeout).
    body = json_body(plain_question("q"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        for part in (body[:5], body[5:]):
            time.sleep(0.7)
            sock.sendall(part)
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 200, response.read()


def raw_exchange(port: int, request: bytes, half_close: bool = False) -> tuple[float, bytes]:
    """Send `request` on a new connection (then shutdown(SHUT_WR) if `half_close`) and read until the server
    closes it: (seconds taken, all it sent)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return time.monotonic() - began, received


def json_error_of(answer: bytes) -> tuple[int, dict[str, str], dict]:
    """(status, headers in lower case, JSON body) of one whole HTTP/1.1 answer with a Content-Length."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    assert headers["content-type"] == "application/json" and len(body) == int(headers["content-length"]), answer
    return int(status_line.split()[1]), headers, json.loads(body)


POST_HEAD = b"POST /answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
MALFORMED = {   # kind: a request uvicorn's parser (h11) refuses before the app sees it
    "negative Content-Length": POST_HEAD + b"Content-Length: -5\r\n\r\n",
    "Content-Length not a number": POST_HEAD + b"Content-Length: abc\r\n\r\n",
    "bad chunk size": POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "garbage request line": b"HELLO\r\n\r\n",
    # Unended, so that h11 sees more than its 16 KiB limit on an incomplete head (a whole one read at once passes).
    "huge header": b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000,
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_http_gets_a_400_json_error(scripted_server, kind):
    port, _ = scripted_server()
    status, headers, body = json_error_of(raw_exchange(port, MALFORMED[kind])[1])
    assert status == 400 and headers["connection"] == "close" and "not a valid HTTP/1.1 request" in body["error"]


def test_a_declared_body_over_max_body_bytes_gets_413_at_once_without_100_continue(scripted_server):
    port, _ = scripted_server("--request_timeout=5")
    # Only the headers: the body is never sent, so waiting for it would end in a 408 after 5 s.
    seconds, answer = raw_exchange(port, POST_HEAD + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                                   % (LIMITS["max_body_bytes"] + 1))
    assert answer.startswith(b"HTTP/1.1 413 ") and seconds < 2, answer
    status, headers, body = json_error_of(answer)
    assert headers["connection"] == "close" and "--max_body_bytes" in body["error"]


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_a_client_that_half_closes_after_its_request_gets_its_answer(scripted_server, version):
    port, _ = scripted_server()
    body = json_body(plain_question("q"))
    request = (b"POST /answer HTTP/%s\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (version.encode(), len(body), body))
    seconds, answer = raw_exchange(port, request, half_close=True)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b'"probability":1.0}'), answer
    assert seconds < 2   # and the server closed the connection after the answer, not at a timeout


def test_a_dead_worker_gets_503_at_once_and_health_says_so(scripted_server):
    port, _ = scripted_server("--request_timeout=5")
    began = time.monotonic()
    status, body = post(local_connection(port), plain_question("fatal"))
    assert status == 503 and "worker thread has stopped" in body["error"] and time.monotonic() - began < 2
    connection = local_connection(port)
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 503 and json.loads(response.read())["status"] == "worker stopped"
    began = time.monotonic()
    assert post(local_connection(port), plain_question("q"))[0] == 503 and time.monotonic() - began < 1


# --- shutting down ---------------------------------------------------------------------------

def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(run_dir, reader, tmp_path):
    server = Server(run_dir, tmp_path / "server.log")
    items = distinct_questions(4 * 8, sentences_each=6)
    requests = [items[n:n + 4] for n in range(0, len(items), 4)]
    expected = reference(reader, items)
    received: list[tuple[float, int, int, object]] = []   # (time, request, status, body)
    failures: list[str] = []
    lock = threading.Lock()
    stop_sending = threading.Event()

    def client(number: int) -> None:
        connection = server.connect()
        while not stop_sending.is_set():
            try:
                status, body = post(connection, requests[number])
            except (ConnectionError, http.client.HTTPException, OSError) as error:
                with lock:
                    failures.append(type(error).__name__)
                return   # the server no longer takes connections
            with lock:
                received.append((time.monotonic(), number, status, body))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(received) < 16 and time.monotonic() < deadline:
        time.sleep(0.02)
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    returncode = server.process.wait(timeout=60)
    stop_sending.set()
    for thread in threads:
        thread.join(timeout=60)
    log = server.log.read_text()
    assert returncode == 0, log
    assert all(status == 200 for _, _, status, _ in received), received
    for _, number, _, body in received:
        assert all(same_answer(got, want) for got, want in zip(body, expected[4 * number:4 * number + 4]))
    counts = dict((name, int(count)) for count, name in re.findall(r"(\d+) (\w+)", log.split("stopped: ")[-1]))
    # Every request the server accepted was answered, and that answer reached its client.
    assert counts["accepted"] == counts["answered"] == len(received), (counts, len(received), failures)
    assert any(when > signalled for when, *_ in received), "no request was in flight at SIGTERM"
    assert len(failures) == len(requests)   # each client then found the server gone
    assert "Traceback" not in log


# serve.main around a stand-in Reader that takes LOAD_S to load and ANSWER_S to answer: signals at any moment.
FAKE_SERVE = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
sys.argv[0] = "serve.py"
import cli, serve

class SlowReader:
    n_best_size = 20

    @classmethod
    def from_args(cls, args):
        print("loading", flush=True)
        time.sleep(float(os.environ["LOAD_S"]))
        return cls()

    def answer_all(self, records, top_k=None):
        print("answering", flush=True)
        time.sleep(float(os.environ["ANSWER_S"]))
        return [dict(answer="", start=None, end=None, probability=1.0) for record in records]

serve.Reader = SlowReader
cli.run_cli(serve.main)
"""


def fake_server(load_s: float, answer_s: float, *flags: str) -> subprocess.Popen:
    """FAKE_SERVE in its own process on a free port of 127.0.0.1, once it has printed "loading"."""
    process = subprocess.Popen([sys.executable, "-c", FAKE_SERVE, "--checkpoint=unused", "--port=0", *flags],
                               cwd=ROOT, env={**os.environ, "LOAD_S": str(load_s), "ANSWER_S": str(answer_s)},
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert select.select([process.stdout], [], [], 60)[0] and process.stdout.readline() == "loading\n"
    return process


def test_sigterm_while_the_model_loads_is_one_line(tmp_path):
    process = fake_server(load_s=30, answer_s=0)
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert process.stderr.read().splitlines() == ["serve.py: stopped by SIGTERM before serving"]


def test_a_second_sigint_forces_quit_at_once_and_exits_non_zero():
    # One question a batch of 2 s: one being answered and five queued behind it, 12 s of work in all.
    process = fake_server(0, 2, "--max_batch=1", "--max_wait_ms=0", "--request_timeout=60")
    try:
        assert select.select([process.stdout], [], [], 30)[0], "not serving"
        port = int(re.search(r":(\d+)$", process.stdout.readline().strip()).group(1))
        body = json_body(plain_question("q"))
        with contextlib.ExitStack() as connections:
            for _ in range(6):
                sock = connections.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
                sock.sendall(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert select.select([process.stdout], [], [], 10)[0] and process.stdout.readline() == "answering\n"
            time.sleep(0.3)   # the other five are queued by now
            process.send_signal(signal.SIGINT)
            time.sleep(0.3)
            process.send_signal(signal.SIGINT)
            forced = time.monotonic()
            returncode = process.wait(timeout=15)
            quit_s = time.monotonic() - forced
    finally:
        process.kill()
    assert returncode == 1
    assert quit_s < 3, f"the queued questions were answered first ({quit_s:.1f} s)"
    stderr = process.stderr.read()
    assert "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == ("serve.py: forced to quit by a second SIGINT; requests still being "
                                       "answered were dropped")


def test_a_second_sigint_while_a_real_model_answers_exits_1_not_abort(run_dir, tmp_path):
    # Tearing the interpreter down while the worker thread is inside torch aborted the process (SIGABRT).
    running = Server(run_dir, tmp_path / "server.log", "--max_batch=8", "--max_wait_ms=0", "--request_timeout=120",
                     "--queue_size=400", "--max_items=100", "--max_body_bytes=4000000", "--max_context_chars=20000")
    context = "대한민국의 수도는 서울이다. " * 1200   # many windows a question: far more work than the test waits
    body = json_body([{"question": f"수도는 어디인가 {n}?", "context": context} for n in range(50)])
    try:
        with contextlib.ExitStack() as connections:
            for _ in range(6):
                sock = connections.enter_context(socket.create_connection(("127.0.0.1", running.port), timeout=30))
                sock.sendall(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(1.5)   # the worker is deep in its batches by now
            running.process.send_signal(signal.SIGINT)
            time.sleep(0.3)
            running.process.send_signal(signal.SIGINT)
            returncode = running.process.wait(timeout=30)
    finally:
        running.process.kill()
    log = running.log.read_text()
    assert returncode == 1, log[-2000:]
    assert log.splitlines()[-1] == ("serve.py: forced to quit by a second SIGINT; requests still being answered "
                                    "were dropped")


# --- flags -----------------------------------------------------------------------------------

def test_a_taken_port_and_impossible_limits_are_refused_before_the_model_loads(tmp_path):
    import serve
    from cli import UsageError

    missing = str(tmp_path / "no_such_run")   # never read: the flags fail first
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(UsageError, match=f"--port {port}: cannot listen there"):
            serve.main([f"--checkpoint={missing}", f"--port={port}"])
    finally:
        taken.close()
    with pytest.raises(UsageError, match="--max_items 10 is larger than --queue_size 5"):
        serve.main([f"--checkpoint={missing}", "--max_items=10", "--queue_size=5"])
    with pytest.raises(UsageError, match="--max_wait_ms 500 is not shorter than --request_timeout 0.5 s"):
        serve.main([f"--checkpoint={missing}", "--max_wait_ms=500", "--request_timeout=0.5"])
    # Past threading.TIMEOUT_MAX the worker's wait would raise (OverflowError) and end the thread.
    for value in ("-1", "10000000000000"):
        with pytest.raises(SystemExit):
            serve.build_parser().parse_args([f"--checkpoint={missing}", f"--max_wait_ms={value}"])


@pytest.mark.parametrize("flag, value", [
    *(("--header_timeout", value) for value in ("nan", "inf", "0", "-1", "soon")),
    ("--port", "65536"), ("--port", "70000"), ("--port", "-1"),   # 70000 would listen on 70000 - 65536
])
def test_a_bad_header_timeout_or_port_is_one_line_naming_the_flag(flag, value, capsys):
    import serve

    with pytest.raises(SystemExit) as exit_info:
        serve.build_parser().parse_args(["--checkpoint=unused", f"{flag}={value}"])
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and f"argument {flag}: " in lines[0], lines


@pytest.mark.parametrize("package", ["uvicorn", "h11"])
def test_a_missing_package_is_one_line_naming_it(package, run_dir, tmp_path):
    fake = tmp_path / package   # shadows the installed package, as if it were not there
    fake.mkdir()
    (fake / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{package}'\", name='{package}')\n")
    result = run_script("serve.py", f"--checkpoint={run_dir}", env={"PYTHONPATH": str(tmp_path)}, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"serve.py: error: {package} is not installed; serve.py needs: "
                                     "pip install -r requirements-serve.txt")


# --- the page --------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


@pytest.fixture
def browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                                                   "(pip install -r requirements-dev.txt)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_highlights_the_answer_in_a_real_browser(server, reader, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ask(question: str) -> dict:
        browser.find_element(By.ID, "question").clear()
        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "ask").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "result").is_displayed()
                                         or b.find_element(By.ID, "error").text)
        return browser.execute_script(
            "const mark = document.getElementById('highlight');"
            "return {error: document.getElementById('error').textContent, answer: mark && mark.textContent,"
            " before: mark && mark.previousSibling.textContent,"
            " probability: document.getElementById('probability').textContent};")

    browser.get(f"http://127.0.0.1:{server.port}/")
    sentences, questions = sample_texts()
    context = " ".join(sentences[:3]) + "\n" + " ".join(sentences[3:5])
    browser.find_element(By.ID, "context").send_keys(context)   # typed, key by key
    shown = ask(questions[0])
    expected = reference(reader, [{"question": questions[0], "context": context}], top_k=3)[0]
    assert shown["error"] == "" and shown["answer"] == expected["answer"] != ""
    assert shown["before"] == context[:expected["start"]]
    assert float(shown["probability"].rstrip("%")) == pytest.approx(100 * expected["probability"], abs=0.11)

    # Characters beyond the BMP count once in Python's offsets but twice in JavaScript's strings.
    emoji_context = "🙂🙂 " + context
    browser.execute_script("document.getElementById('context').value = arguments[0];", emoji_context)
    shown = ask(questions[0])
    expected = reference(reader, [{"question": questions[0], "context": emoji_context}], top_k=3)[0]
    assert shown["answer"] == expected["answer"] and shown["before"] == emoji_context[:expected["start"]]

    shown = ask(" ")
    assert '"question" is empty' in shown["error"]


# --- KorQuAD 2.x pages -----------------------------------------------------------------------

HTML_PAGE = ("<div><h2>역사</h2><p>훈민정음은 1443년에 <b>세종</b>이 창제하였다.</p>"
             "<table><tr><th>연도</th><th>사건</th></tr><tr><td>1446</td><td>반포</td></tr></table></div>")


def test_an_html_page_is_answered_from_its_text_and_cut_back_out_of_the_html(server, reader):
    """"html": true reads the page's text as predict.py --html does, and every answer (and n-best entry)
    comes back as the HTML it stands for, with offsets into the HTML as sent."""
    import korquad2
    from predict import HtmlPageReader

    page = korquad2.parse_page(HTML_PAGE)
    record = {"id": "h1", "question": "훈민정음은 누가 창제하였나?", "context": HTML_PAGE}
    expected = HtmlPageReader(reader, page).answer_all([{**record, "context": page.text}], top_k=3)[0]
    status, answer = post(server.connect(), {**record, "html": True, "top_k": 3})
    assert status == 200 and same_answer(answer, expected), (answer, expected)
    for entry in [answer, *answer["answers"]]:
        if entry["start"] is not None:
            assert HTML_PAGE[entry["start"]:entry["end"]] == entry["answer"]
    status, plain = post(server.connect(), record)  # without the flag, the markup is plain text
    assert status == 200 and plain["answer"] in HTML_PAGE


@pytest.mark.parametrize("item, expected", [
    ({"html": "yes"}, '"html" must be true or false, got a string'),
    ({"html": True, "context": "<div><p>열린 채 끝나는 문단"}, '"context": HTML does not parse'),
    ({"html": True, "context": "<script>var a = 1;</script>"}, '"context": the HTML page holds no text'),
])
def test_bad_html_items_get_400_naming_the_field(server, item, expected):
    status, body = post(server.connect(), {"question": "누가?", "context": HTML_PAGE, **item})
    assert status == 400 and expected in body["error"], body

"""Rows on serving: serve.py under concurrent loopback clients next to predict.py's offline batched rate."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from collections.abc import Callable

from benchmarks.harness import ROOT, benchmark, dev_questions, write_random_run


# --- serve.py (issue 20) -----------------------------------------------------------------
_SERVE_QUESTIONS = 64   # the first dev questions, with their real contexts
_SERVE_CLIENTS = 16


def _on_a_thread(work: Callable[[], object]) -> None:
    import threading

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()


def _serve_rate(port: int, questions: list[dict]) -> float:
    """Answers/s of serve.py on 127.0.0.1:`port` with _SERVE_CLIENTS clients, each on one keep-alive
    connection, sending its share of `questions` one request at a time."""
    import http.client
    import json
    import time
    from concurrent.futures import ThreadPoolExecutor

    def client(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        for question in questions[number::_SERVE_CLIENTS]:
            connection.request("POST", "/answer", json.dumps(question, ensure_ascii=False).encode("utf-8"),
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"serve.py answered {response.status}: {response.read()[:200]!r}")
            response.read()
        connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(_SERVE_CLIENTS) as pool:
        list(pool.map(client, range(_SERVE_CLIENTS)))
    return len(questions) / (time.perf_counter() - started)


@benchmark("serve")
def bench_serve(args: argparse.Namespace) -> None:
    """serve.py under 16 concurrent loopback clients next to predict.py's offline batched rate, same model
    (BERT-small, random weights: speed only), same dev questions, same run (goal: serve >= 0.8x offline)."""
    import signal
    import subprocess
    import tempfile
    import time

    import torch

    from modeling import Config
    from predict import Reader

    config = Config.from_json_file(ROOT / "data" / "bert_small.json")
    questions = dev_questions(args.dev, _SERVE_QUESTIONS)
    with tempfile.TemporaryDirectory() as run:
        write_random_run(Path(run), config)
        reader = Reader.load(run, no_cuda=True, analyzer="mecab")
        server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), f"--checkpoint={run}", "--port=0",
                                   "--no_cuda", "--analyzer=mecab", "--quiet"], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE)
        try:
            line = server.stdout.readline()
            if "serving on" not in line:
                print(f"serve: skipped (serve.py did not start: {line.strip() or 'see its messages above'})")
                return
            port = int(line.rsplit(":", 1)[1])
            reader("워밍업?", questions[0]["context"])   # first-call costs not timed, here or there
            _serve_rate(port, questions[:_SERVE_CLIENTS])
            # Interleaved, so drifting machine load hurts all alike; the best of two runs each. The offline
            # rate is taken on the main thread (as predict.py runs) and on a worker thread (as serve.py runs
            # the model): on a CPU shared with other work, OpenMP runs slower from the main thread.
            rates = {"offline": 0.0, "offline_thread": 0.0, "served": 0.0}
            runs = {"offline": lambda: reader.answer_all(questions),
                    "offline_thread": lambda: _on_a_thread(lambda: reader.answer_all(questions)),
                    "served": lambda: _serve_rate(port, questions)}
            for _ in range(2):
                for name, run_once in runs.items():
                    started = time.perf_counter()
                    run_once()
                    rates[name] = max(rates[name], len(questions) / (time.perf_counter() - started))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)
    print(f"serve: {len(questions)} dev questions with their real contexts, BERT-small, CPU "
          f"x{torch.get_num_threads()} threads, serve.py defaults (--max_batch 32, --max_wait_ms 5)")
    offline, served = rates["offline"], rates["served"]
    print(f"serve.answers_per_second[predict.py offline, batched, batch {reader.batch_size}]: {offline:.2f}")
    print(f"serve.answers_per_second[predict.py offline, batched, on a worker thread]: {rates['offline_thread']:.2f}")
    print(f"serve.answers_per_second[serve.py, {_SERVE_CLIENTS} concurrent loopback clients, one question per "
          f"request]: {served:.2f} ({served / offline:.2f}x offline, {served / rates['offline_thread']:.2f}x "
          f"offline on a worker thread; goal >= 0.8x)")

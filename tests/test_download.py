"""download.py against a local HTTP server on 127.0.0.1: full, resumed, restarted and rejected downloads."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import download
from conftest import SAMPLE_FILE

DEV = download.FILES["dev"]
TRAIN = download.FILES["train"]
SMALL_TRAIN = json.dumps({"version": "KorQuAD_v1.0_train", "data": [{"title": "t", "paragraphs": [
    {"context": "솔매골은 1692년에 생겼다.", "qas": [{"id": "q1", "question": "언제 생겼나?",
                                            "answers": [{"text": "1692년", "answer_start": 5}]}]}]}]},
                         ensure_ascii=False).encode("utf-8")


class FileServer(ThreadingHTTPServer):
    """Serves `files` under /dataset/, optionally ignoring Range or cutting the next body in half."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.honor_range = True
        self.cut_next_response = False
        self.misplaced_range_start: int | None = None  # answer any Range with a 206 from this byte instead
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range header, status sent)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/dataset"


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        body = self.server.files.get(self.path.removeprefix("/dataset/"))
        requested = self.headers.get("Range")
        if body is None:
            self._log(requested, 404)
            self.send_error(404)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", requested).group(1)) if requested and self.server.honor_range else 0
        if start >= len(body) and start:
            self._log(requested, 416)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        misplaced = requested is not None and self.server.misplaced_range_start is not None
        if misplaced:
            start = self.server.misplaced_range_start
        status = 206 if start or misplaced else 200
        self._log(requested, status)
        self.send_response(status)
        if start or misplaced:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.server.cut_next_response:
            # Promise the whole body, send half, hang up: what a dropped connection looks like.
            self.server.cut_next_response = False
            payload = payload[:len(payload) // 2]
            self.close_connection = True
        self.wfile.write(payload)

    def _log(self, requested: str | None, status: int) -> None:
        self.server.requests.append((self.path, requested, status))

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server():
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dev_bytes(monkeypatch) -> bytes:
    """What the server serves as the dev file: the bundled sample, its hash standing in for the published
    one, so these tests run in any clone (the published hash itself is checked against the real file below)."""
    sample = SAMPLE_FILE.read_bytes()
    monkeypatch.setitem(download.KNOWN_SHA256, DEV, hashlib.sha256(sample).hexdigest())
    return sample


def test_published_hash_is_the_real_dev_file(dev_file: Path):
    assert download.sha256_of(dev_file) == download.KNOWN_SHA256[DEV]


def fetch(server: FileServer, data_dir: Path, name: str = DEV, **kwargs) -> bool:
    kwargs = {"retries": 0, "retry_wait": 0.0, "timeout": 10.0, "progress": False, **kwargs}
    return download.download_file(name, data_dir, server.base_url, **kwargs)


def run_cli(server_url: str, data_dir: Path, *extra: str) -> int:
    return download.main(["--data_dir", str(data_dir), "--base_url", server_url, "--no_progress",
                          "--timeout", "10", *extra])


def test_full_download_verifies_then_skips_present_files(server, dev_bytes, tmp_path, capsys):
    server.files = {DEV: dev_bytes, TRAIN: SMALL_TRAIN}
    assert run_cli(server.base_url, tmp_path) == 0
    assert (tmp_path / DEV).read_bytes() == dev_bytes
    assert (tmp_path / TRAIN).read_bytes() == SMALL_TRAIN
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([DEV, TRAIN])  # no .part left
    out = capsys.readouterr().out
    assert "downloaded, verified" in out and "Pretrained checkpoint" in out

    requests_before = len(server.requests)
    assert run_cli(server.base_url, tmp_path) == 0
    assert len(server.requests) == requests_before
    assert capsys.readouterr().out.count("already present, verified") == 2


def test_resume_after_a_cut_connection(server, dev_bytes, tmp_path):
    server.files = {DEV: dev_bytes}
    server.cut_next_response = True
    with pytest.raises(download.TransferInterrupted, match=re.escape(f"{server.base_url}/{DEV}")):
        fetch(server, tmp_path)
    half = len(dev_bytes) // 2
    assert not (tmp_path / DEV).exists()
    assert (tmp_path / (DEV + ".part")).stat().st_size == half

    assert fetch(server, tmp_path) is True
    assert server.requests[-1][1:] == (f"bytes={half}-", 206)
    assert (tmp_path / DEV).read_bytes() == dev_bytes
    assert not (tmp_path / (DEV + ".part")).exists()


def test_cut_connection_is_resumed_within_one_run(server, dev_bytes, tmp_path):
    server.files = {DEV: dev_bytes}
    server.cut_next_response = True
    assert fetch(server, tmp_path, retries=1) is True
    assert [r[1:] for r in server.requests] == [(None, 200), (f"bytes={len(dev_bytes) // 2}-", 206)]
    assert (tmp_path / DEV).read_bytes() == dev_bytes


def test_server_ignoring_range_restarts_from_zero(server, dev_bytes, tmp_path):
    server.files = {DEV: dev_bytes}
    server.honor_range = False
    # A stale part whose bytes are wrong: appending to it would fail the sha256 check.
    (tmp_path / (DEV + ".part")).write_bytes(b"\0" * 1000)
    assert fetch(server, tmp_path) is True
    assert server.requests[-1][1:] == ("bytes=1000-", 200)
    assert (tmp_path / DEV).read_bytes() == dev_bytes


def test_a_206_for_another_range_restarts_and_verifies(server, dev_bytes, tmp_path):
    server.files = {DEV: dev_bytes}
    server.misplaced_range_start = 0   # "206, bytes 0-N/N": the whole file, not the part asked for
    (tmp_path / (DEV + ".part")).write_bytes(dev_bytes[:1000])
    assert fetch(server, tmp_path) is True
    assert [r[1:] for r in server.requests] == [("bytes=1000-", 206), (None, 200)]
    assert (tmp_path / DEV).read_bytes() == dev_bytes and not (tmp_path / (DEV + ".part")).exists()


def test_complete_part_file_is_finished_without_transfer(server, dev_bytes, tmp_path):
    server.files = {DEV: dev_bytes}
    (tmp_path / (DEV + ".part")).write_bytes(dev_bytes)
    assert fetch(server, tmp_path) is True
    assert [r[2] for r in server.requests] == [416]
    assert (tmp_path / DEV).read_bytes() == dev_bytes


def test_corrupted_dev_file_is_rejected_and_removed(server, dev_bytes, tmp_path, capsys):
    corrupted = bytearray(dev_bytes)
    corrupted[len(corrupted) // 3] ^= 0x01
    server.files = {DEV: bytes(corrupted)}
    assert run_cli(server.base_url, tmp_path, "--files", "dev") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and DEV in err and "sha256" in err
    assert list(tmp_path.iterdir()) == []


def test_corrupted_file_already_in_place_is_downloaded_again(server, dev_bytes, tmp_path):
    server.files = {DEV: dev_bytes}
    (tmp_path / DEV).write_bytes(dev_bytes[:-10])
    assert fetch(server, tmp_path) is True
    assert (tmp_path / DEV).read_bytes() == dev_bytes


def test_train_without_known_hash_must_parse_as_korquad(server, tmp_path, capsys):
    server.files = {TRAIN: b"<html><body>Service unavailable</body></html>"}
    assert run_cli(server.base_url, tmp_path, "--files", "train") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and TRAIN in err and "KorQuAD JSON" in err
    assert list(tmp_path.iterdir()) == []


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/dataset"


def test_unreachable_server_is_one_line_naming_the_url(tmp_path, capsys):
    base_url = closed_port_url()
    assert run_cli(base_url, tmp_path, "--files", "dev") == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{base_url}/{DEV}" in err
    assert list(tmp_path.iterdir()) == []


def test_missing_file_fails_with_its_url_and_the_others_still_download(server, dev_bytes, tmp_path, capsys):
    server.files = {DEV: dev_bytes}  # train is a 404
    assert run_cli(server.base_url, tmp_path) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"download.py: error: {server.base_url}/{TRAIN}: HTTP 404 Not Found"
    assert (tmp_path / DEV).read_bytes() == dev_bytes
    assert not (tmp_path / TRAIN).exists()


def test_unknown_file_key_is_a_one_line_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--data_dir", str(tmp_path), "--files", "train,test"])
    assert exit_info.value.code == 2
    assert "--files" in capsys.readouterr().err.splitlines()[-1]


def test_resuming_a_part_from_a_file_url_restarts_and_logs_cleanly(dev_bytes, tmp_path, caplog):
    # A file:// response has no HTTP status (None) and ignores Range: the restart is logged without a
    # "--- Logging error ---" (pytest's log handler raises on a message that cannot be formatted).
    served, data_dir = tmp_path / "served", tmp_path / "data"
    served.mkdir()
    data_dir.mkdir()
    (served / DEV).write_bytes(dev_bytes)
    download.part_path(data_dir / DEV).write_bytes(dev_bytes[:1000])
    caplog.set_level(logging.INFO, logger=download.logger.name)
    assert download.download_file(DEV, data_dir, served.as_uri(), retries=0, timeout=10.0, progress=False)
    assert (data_dir / DEV).read_bytes() == dev_bytes
    assert sorted(p.name for p in data_dir.iterdir()) == [DEV]
    assert "did not resume at byte 1000 (no HTTP status); downloading from the start" in caplog.text


@pytest.mark.parametrize("flags, fragment", [
    (["--timeout=nan"], "argument --timeout: expected a number of seconds > 0 (got 'nan')"),
    (["--retries=-1"], "argument --retries: expected a whole number >= 0 (got '-1')"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
])
def test_flag_errors_are_one_line_naming_the_flag_like_the_other_entry_points(flags, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        download.main(["--data_dir", str(tmp_path / "data"), *flags])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "data").exists()  # before any work
    assert captured.err == f"download.py: error: {fragment} (see download.py --help)\n"


def test_a_directory_in_the_place_of_the_file_is_said_before_any_transfer(server, dev_bytes, tmp_path, capsys):
    server.files = {DEV: dev_bytes}
    (tmp_path / DEV).mkdir()
    assert run_cli(server.base_url, tmp_path, "--files", "dev") == 1
    assert f"{tmp_path / DEV} exists and is not a file" in capsys.readouterr().err
    assert not server.requests and sorted(p.name for p in tmp_path.iterdir()) == [DEV]

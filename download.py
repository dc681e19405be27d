"""Fetch KorQuAD v1.0 train and dev into data/, resuming partial downloads and verifying each file.

Usage: python3 download.py [--data_dir data] [--files train,dev] [--base_url URL]

Only the standard library talks to the network. A download goes to `<name>.part` first and is
renamed to its final name only once verified, so an interrupted or corrupted transfer never
looks like a finished file; running the command again resumes the `.part` with an HTTP Range
request.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

from tqdm import tqdm

from cli import ArgumentParser

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = ROOT / "data"
DEFAULT_BASE_URL = "https://korquad.github.io/dataset"
FILES = {
    "train": "KorQuAD_v1.0_train.json",
    "dev": "KorQuAD_v1.0_dev.json",
}
# Published hashes. A file without one is checked by parsing it as KorQuAD JSON instead.
KNOWN_SHA256 = {
    "KorQuAD_v1.0_dev.json": "25ffeb51e6c51ec02c071b60a10188e10005c144110f0d876b26079d80a35bdf",
}
CHUNK_BYTES = 1 << 16
USER_AGENT = "korquad-download/1.0 (python urllib)"
CHECKPOINT_FILE = ROOT / "pretrain_ckpt" / "bert_small_ckpt.bin"
CHECKPOINT_DRIVE_ID = "13D9Fnnl0ra1qjPgtSWdp1-xIs6DfJ7Zg"


class DownloadError(OSError):
    """A download that cannot finish: unreachable server, HTTP error, or a failed check."""


class TransferInterrupted(DownloadError):
    """The connection ended before the whole file arrived; the `.part` file is kept to resume."""


class VerificationError(DownloadError):
    """A downloaded file's content is not what was expected; it has been removed."""


def part_path(path: Path) -> Path:
    """Where the bytes of `path` accumulate until the file is verified."""
    return path.with_name(path.name + ".part")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_content(path: Path, name: str) -> None:
    """Raise VerificationError unless `path` holds the expected content for file `name`.

    With a known sha256 the hash decides; otherwise the file must parse as KorQuAD JSON with a
    non-empty `data` list (which catches truncation and HTML error pages served with status 200).
    """
    expected = KNOWN_SHA256.get(name)
    if expected is not None:
        actual = sha256_of(path)
        if actual != expected:
            raise VerificationError(f"{path}: sha256 {actual} does not match the published {expected}")
        return
    try:
        with open(path, encoding="utf-8-sig") as f:
            content = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{path}: not valid KorQuAD JSON ({e})") from None
    except RecursionError:
        raise VerificationError(f"{path}: not valid KorQuAD JSON (nested too deeply)") from None
    if not isinstance(content, dict) or not isinstance(content.get("data"), list) or not content["data"]:
        raise VerificationError(f"{path}: JSON has no non-empty 'data' list, so it is not a KorQuAD file")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    """GET `url`, asking for the bytes from `offset` on when resuming."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _content_range(headers: Message) -> tuple[int | None, int | None]:
    """(first byte, total size) from a Content-Range header; None where absent or unknown."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", headers.get("Content-Range", "").strip())
    if match is None:
        return None, None
    start, total = match.groups()
    return (int(start) if start else None), (int(total) if total and total != "*" else None)


def _expected_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The full file size the server promises, or None if it does not say."""
    _, total = _content_range(response.headers)
    if total is not None:
        return total
    length = response.headers.get("Content-Length")
    return offset + int(length) if length and length.isdigit() else None


def fetch_to_part(url: str, part: Path, *, timeout: float = 60.0, progress: bool = True) -> None:
    """Download `url` into `part`, continuing from the bytes already in it.

    A server that ignores the Range request (status 200) or answers for a different range makes
    the download restart from byte 0, so the part file never mixes two transfers. Raises
    TransferInterrupted if the connection ends early (the part is kept for the next try).
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Nothing lies beyond `offset`: the part is complete already, or longer than the file.
            _, total = _content_range(e.headers)
            if total == offset:
                return
            logger.warning("%s: server rejected resuming at byte %d; starting over", url, offset)
            part.unlink()
            return fetch_to_part(url, part, timeout=timeout, progress=progress)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None

    with response:
        resumed = offset > 0 and response.status == 206 and _content_range(response.headers)[0] == offset
        if offset and not resumed:
            # A file:// response has no HTTP status (None): it ignores Range and returns the whole file.
            status = "no HTTP status" if response.status is None else f"status {response.status}"
            logger.info("%s: server did not resume at byte %d (%s); downloading from the start", url, offset, status)
            if response.status == 206:
                # A partial body for some other range is useless here: ask again for all of it.
                response.close()
                part.unlink()
                return fetch_to_part(url, part, timeout=timeout, progress=progress)
            offset = 0
        elif resumed:
            logger.info("%s: resuming at byte %d", url, offset)
        expected = _expected_size(response, offset)
        _stream(response, part, offset, expected, url, progress)

    received = part.stat().st_size
    if expected is not None and received < expected:
        raise TransferInterrupted(f"{url}: connection closed after {received} of {expected} bytes; "
                                  f"run again to resume")


def _stream(response: http.client.HTTPResponse, part: Path, offset: int, expected: int | None,
            url: str, progress: bool) -> None:
    """Append the response body to `part` (or overwrite it when `offset` is 0), with a progress bar."""
    received = offset
    with open(part, "ab" if offset else "wb") as out, \
            tqdm(total=expected, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=part.name.removesuffix(".part"), disable=not progress) as bar:
        try:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as e:
            raise TransferInterrupted(f"{url}: connection lost after {received} bytes ({e}); "
                                      f"run again to resume") from None
        finally:
            out.flush()
            os.fsync(out.fileno())


def download_file(name: str, data_dir: Path, base_url: str = DEFAULT_BASE_URL, *, retries: int = 2,
                  retry_wait: float = 2.0, timeout: float = 60.0, progress: bool = True) -> bool:
    """Make `data_dir/name` a verified copy of `base_url/name`; return False if it was already there.

    A valid file already in place is kept without touching the network. A broken transfer is
    resumed up to `retries` times; a file that fails verification is deleted and raises
    VerificationError, and nothing is ever left under the final name unless it passed.
    """
    target = data_dir / name
    for path in (target, part_path(target)):
        if path.exists() and not path.is_file():  # said now, not after the whole transfer
            raise DownloadError(f"{path} exists and is not a file; move it away and download again")
    if target.is_file():
        try:
            check_content(target, name)
            return False
        except VerificationError as e:
            logger.warning("%s; downloading it again", e)
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"{base_url.rstrip('/')}/{name}"
    part = part_path(target)
    for attempt in range(retries + 1):
        try:
            fetch_to_part(url, part, timeout=timeout, progress=progress)
            break
        except TransferInterrupted as e:
            if attempt == retries:
                raise
            logger.warning("%s (retry %d of %d)", e, attempt + 1, retries)
            time.sleep(retry_wait * (attempt + 1))
    try:
        check_content(part, name)
    except VerificationError as e:
        part.unlink()
        raise VerificationError(f"{url}: downloaded file failed verification and was removed: {e}") from None
    os.replace(part, target)
    return True


def parse_file_keys(value: str) -> list[str]:
    """Turn "train,dev" into the list of keys, rejecting unknown ones (for argparse)."""
    keys = [key.strip() for key in value.split(",") if key.strip()]
    unknown = [key for key in keys if key not in FILES]
    if not keys or unknown:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(FILES)} (got {value!r})")
    return keys


def base_url(value: str) -> str:
    """An http(s):// or file:// URL (for argparse): urllib refuses anything else only at the first request."""
    if not value.lower().startswith(("http://", "https://", "file://")):
        raise argparse.ArgumentTypeError(f"expected an http(s):// or file:// URL, got {value!r}")
    return value


def non_negative_int(value: str) -> int:
    """An int >= 0 (for argparse)."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (got {value!r})")
    return int(value)


def positive_seconds(value: str) -> float:
    """A finite number of seconds > 0 (for argparse)."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0 (got {value!r})")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    # cli's parser: a bad flag is one line naming it, as in every other entry point (not argparse's usage block).
    parser = ArgumentParser(prog="download.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="Where the files go (default: data/ beside this script).")
    parser.add_argument("--files", type=parse_file_keys, default=list(FILES),
                        help="Comma-separated subset of: " + ", ".join(FILES) + " (default: all).")
    parser.add_argument("--base_url", type=base_url, default=DEFAULT_BASE_URL,
                        help=f"Where the files are published (default: {DEFAULT_BASE_URL}).")
    parser.add_argument("--retries", type=non_negative_int, default=2,
                        help="Resume attempts after a broken connection (default: 2).")
    parser.add_argument("--timeout", type=positive_seconds, default=60.0,
                        help="Seconds to wait on a silent connection (default: 60).")
    parser.add_argument("--no_progress", action="store_true", help="Hide the progress bars.")
    return parser


def checkpoint_hint() -> str:
    """How to get the pretrained checkpoint, or where it already is."""
    where = os.path.relpath(CHECKPOINT_FILE)
    if CHECKPOINT_FILE.is_file():
        return f"Pretrained checkpoint: found at {where}"
    return (f"Pretrained checkpoint: not fetched by this script (it is on Google Drive). Get it with\n"
            f"  pip install gdown\n"
            f"  gdown {CHECKPOINT_DRIVE_ID} -O {where}\n"
            f"or open https://drive.google.com/open?id={CHECKPOINT_DRIVE_ID} in a browser "
            f"(details in pretrain_ckpt/README.md).")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir.exists() and not args.data_dir.is_dir():
        parser.error(f"--data_dir {args.data_dir} exists and is not a directory")
    try:  # before any download, once (each download_file would fail on its own, not naming the flag); a
        # read-only directory that already holds verified files is fine
        args.data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--data_dir {args.data_dir}: cannot create it ({e.strerror or e})")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    failed = False
    # One file failing does not stop the others: dev alone is enough to evaluate.
    for key in args.files:
        name = FILES[key]
        try:
            downloaded = download_file(name, args.data_dir, args.base_url, retries=args.retries,
                                       timeout=args.timeout, progress=not args.no_progress)
        except OSError as e:  # DownloadError, or the data directory cannot be written (a full disk)
            print(f"download.py: error: {e}", file=sys.stderr)
            failed = True
            continue
        print(f"{args.data_dir / name}: {'downloaded' if downloaded else 'already present'}, verified")
    print(checkpoint_hint())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""prepare.py: downloads (against a real HTTP server on 127.0.0.1 and file:// mirrors), the CLI,
the tokenizer, the packing dataloader and evaluate_bpb. Hermetic: no internet, no GPU.

Functions run in-process with module globals monkeypatched (retry delays, folders, sequence
length); what a user sees (exit status, one-line errors, no tracebacks) is checked by running
`python prepare.py` as a subprocess with AUTORESEARCH_CACHE_DIR / AUTORESEARCH_DATA_URL."""

import collections
import contextlib
import errno
import http.server
import itertools
import json
import math
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import prepare
from conftest import ROOT, make_docs, write_shard

VAL = prepare.VAL_FILENAME


# ---------------------------------------------------------------------------------------------
# Helpers: a shard folder, a real HTTP mirror with scripted faults, subprocess runs


def make_mirror_folder(folder, n_train, docs_per_shard=30):
    """`folder` with shard_00000 .. shard_{n_train-1} and the validation shard; returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        write_shard(str(folder / prepare.shard_filename(i)), make_docs(seed=100 + i, n_docs=docs_per_shard))
    write_shard(str(folder / VAL), make_docs(seed=999, n_docs=docs_per_shard))
    return folder


class Mirror:
    """ThreadingHTTPServer on 127.0.0.1 (port 0) serving the files of `folder` under some path.

    `faults[name]`: a list of actions consumed by successive GETs of that file, then 'serve';
    `always[name]`: the action for every GET of that file. Actions: serve, 404, 500, drop (close
    the connection without a response), cut (Content-Length of the whole file, half the body,
    close), cut_no_length (half the body, no Content-Length, close), garbage (random bytes of the
    right length), stall (half the body, then nothing until `release` is set, then the rest),
    hang (half the body, then nothing until the server closes). `hits` counts GETs per file name."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.faults, self.always = {}, {}
        self.hits = collections.Counter()
        self.lock = threading.Lock()
        self.release, self.closing = threading.Event(), threading.Event()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with mirror.lock:
                    mirror.hits[name] += 1
                    pending = mirror.faults.get(name)
                    action = pending.pop(0) if pending else mirror.always.get(name, "serve")
                mirror.respond(self, name, action)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/datasets/climbmix/resolve/main"

    def respond(self, h, name, action):
        path = self.folder / name
        if action == "drop":
            h.close_connection = True
            return
        if action == "500":
            h.send_error(500)
            return
        if action == "404" or not path.exists():
            h.send_error(404)
            return
        data = path.read_bytes()
        if action == "garbage":
            data = random.Random(len(data)).randbytes(len(data))
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        if action != "cut_no_length":
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if action in ("cut", "cut_no_length", "stall", "hang"):
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            if action in ("stall", "hang") and (self.release if action == "stall" else self.closing).wait(60):
                with contextlib.suppress(OSError):  # the client may be gone
                    h.wfile.write(data[len(data) // 2:])
            return
        h.wfile.write(data)

    def close(self):
        self.release.set()
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror_folder(tmp_path):
    return make_mirror_folder(tmp_path / "a mirror", n_train=3)  # a space: file:// URLs get %20


@pytest.fixture
def dest(tmp_path):
    """An empty download folder."""
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


@pytest.fixture
def mirror(mirror_folder):
    m = Mirror(mirror_folder)
    yield m
    m.close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(prepare, "RETRY_BASE_DELAY", 0.01)


def closed_port_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there any more: connections are refused
    return f"http://127.0.0.1:{port}/mirror"


def leftovers(folder):
    """Temporary or partial files that a download left behind."""
    return [n for n in os.listdir(folder) if ".tmp" in n]


def subprocess_env(cache_dir, data_url):
    return dict(os.environ, AUTORESEARCH_CACHE_DIR=str(cache_dir), AUTORESEARCH_DATA_URL=data_url,
                CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


def assert_clean_failure(p, *needles):
    """Non-zero exit, no traceback, and the cause on exactly one line of stderr naming `needles`."""
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    cause = [line for line in lines if "error" in line.lower()]
    assert len(cause) == 1, p.stderr
    for needle in needles:
        assert needle in cause[0], (needle, p.stderr)
    return cause[0]


def call_with_timeout(fn, timeout=30):
    """Run fn() in a thread: an endless loop fails the test instead of hanging the run."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"no answer within {timeout}s (endless loop?)"
    return out


# ---------------------------------------------------------------------------------------------
# Download, in-process


def test_rerun_skips_good_files_and_replaces_damaged_ones(tmp_path, mirror, mirror_folder, fast_retries, capsys):
    data = tmp_path / "data"  # download_data creates it
    assert prepare.download_data(2, 2, data_dir=str(data), base_url=mirror.url) == []  # nothing missing
    assert sorted(os.listdir(data)) == ["shard_00000.parquet", "shard_00001.parquet", VAL]
    assert sum(mirror.hits.values()) == 3

    mirror.hits.clear()
    assert prepare.download_data(2, 2, data_dir=str(data), base_url=mirror.url) == []
    assert sum(mirror.hits.values()) == 0  # everything on disk was good: nothing fetched

    full = (data / "shard_00000.parquet").read_bytes()
    (data / "shard_00000.parquet").write_bytes(full[: len(full) // 2])  # truncated by a crash
    size = (data / "shard_00001.parquet").stat().st_size
    (data / "shard_00001.parquet").write_bytes(b"\0" * size)  # corrupt, right length
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        with pytest.raises(ValueError):
            prepare.verify_shard(str(data / name))
    capsys.readouterr()
    assert prepare.download_data(2, 2, data_dir=str(data), base_url=mirror.url) == []
    assert mirror.hits == {"shard_00000.parquet": 1, "shard_00001.parquet": 1}  # the val shard was fine
    out = capsys.readouterr().out
    for name in ("shard_00000.parquet", "shard_00001.parquet"):
        assert (data / name).read_bytes() == (mirror_folder / name).read_bytes()
        assert f"{name} in the cache was damaged" in out  # named, and fetched again
    assert leftovers(data) == []


# ---------------------------------------------------------------------------------------------
# Download: faults


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_retries_then_succeeds(dest, mirror, mirror_folder, fast_retries, fault):
    mirror.faults["shard_00000.parquet"] = [fault, fault]
    status, size, damage = prepare.download_shard(0, str(dest), mirror.url)
    assert status == "downloaded" and damage is None
    assert mirror.hits["shard_00000.parquet"] == 3
    assert (dest / "shard_00000.parquet").read_bytes() == (mirror_folder / "shard_00000.parquet").read_bytes()
    assert size == (dest / "shard_00000.parquet").stat().st_size
    assert leftovers(dest) == []


def test_retry_waits_back_off_exponentially(dest, mirror):
    mirror.faults["shard_00000.parquet"] = ["500", "500", "500"]
    sleeps = []
    stop = types.SimpleNamespace(is_set=lambda: False, wait=lambda seconds: sleeps.append(seconds))  # waits on Ctrl-C's event
    assert prepare.download_shard(0, str(dest), mirror.url, stop=stop)[0] == "downloaded"
    base = prepare.RETRY_BASE_DELAY
    assert sleeps == [base, 2 * base, 4 * base]


def test_404_shard_is_reported_missing_without_retries(tmp_path, mirror, fast_retries, capsys):
    mirror.always["shard_00001.parquet"] = "404"
    data = tmp_path / "data"
    assert prepare.download_data(3, 2, data_dir=str(data), base_url=mirror.url) == ["shard_00001.parquet"]
    assert sorted(os.listdir(data)) == ["shard_00000.parquet", "shard_00002.parquet", VAL]
    assert mirror.hits["shard_00001.parquet"] == 1  # a 404 is final: no retries
    out = capsys.readouterr().out
    assert "missing shard_00001.parquet" in out and "404" in out
    assert "2/3 training shards" in out
    assert not (data / "shard_00001.parquet").exists()
    assert leftovers(data) == []


@pytest.mark.parametrize("cut", ["cut", "cut_no_length"])
def test_response_cut_short_is_retried(dest, mirror, mirror_folder, fast_retries, cut):
    name = "shard_00000.parquet"
    seen_on_disk = []
    respond = mirror.respond

    def spy(h, n, action):  # while the server answers, no shard may look complete on disk yet
        seen_on_disk.append(os.path.exists(dest / name))
        respond(h, n, action)

    mirror.respond = spy
    mirror.faults[name] = [cut, cut]
    assert prepare.download_shard(0, str(dest), mirror.url)[0] == "downloaded"
    assert mirror.hits[name] == 3
    assert seen_on_disk == [False, False, False]
    assert (dest / name).read_bytes() == (mirror_folder / name).read_bytes()
    assert leftovers(dest) == []


def test_body_shorter_than_its_content_length_is_an_error(tmp_path, monkeypatch):
    """urllib3 2 raises on a short body itself; older versions return it silently, and fetch's own
    check must catch it."""
    class ShortResponse:
        status_code, headers = 200, {"Content-Length": "100"}
        __enter__ = lambda self: self
        __exit__ = lambda self, *exc: None
        iter_content = lambda self, chunk_size: iter([b"x" * 50])

    monkeypatch.setattr(prepare.requests, "get", lambda url, **kwargs: ShortResponse())
    with pytest.raises(OSError, match="truncated: 50 of 100 bytes"):
        prepare.fetch("http://127.0.0.1:9/shard_00000.parquet", str(tmp_path / "shard.tmp"))


@pytest.mark.parametrize("cut", ["cut", "cut_no_length"])
def test_response_always_cut_short_is_reported_failed(dest, mirror, fast_retries, cut, capsys):
    name = "shard_00000.parquet"
    mirror.always[name] = cut
    with pytest.raises(RuntimeError, match=f"{name}.*after {prepare.DOWNLOAD_ATTEMPTS} attempts"):
        prepare.download_shard(0, str(dest), mirror.url)
    assert mirror.hits[name] == prepare.DOWNLOAD_ATTEMPTS
    assert os.listdir(dest) == []  # never a partial file, under any name

    assert prepare.download_data(2, 2, data_dir=str(dest), base_url=mirror.url) == [name]
    assert f"missing {name}" in capsys.readouterr().out
    assert sorted(os.listdir(dest)) == ["shard_00001.parquet", VAL]


def write_wrong_schema(path):
    pq.write_table(pa.table({"content": ["a document"] * 10}), path)


@pytest.mark.parametrize("bad", ["garbage", "wrong_schema"])
def test_corrupt_parquet_is_rejected(dest, mirror, mirror_folder, fast_retries, bad):
    name = "shard_00000.parquet"
    if bad == "garbage":
        mirror.always[name] = "garbage"  # random bytes, the right length
    else:
        write_wrong_schema(str(mirror_folder / name))  # valid parquet, no 'text' column
    with pytest.raises(RuntimeError, match="parquet|text"):
        prepare.download_shard(0, str(dest), mirror.url)
    assert mirror.hits[name] == prepare.DOWNLOAD_ATTEMPTS
    assert os.listdir(dest) == []


def test_verify_shard_rejects_bad_files(tmp_path, mirror_folder):
    good = mirror_folder / "shard_00000.parquet"
    prepare.verify_shard(str(good))
    full = good.read_bytes()
    cases = {
        "truncated": full[:-100],
        "head_cut": full[100:],
        "zeros": b"\0" * len(full),
        "empty": b"",
    }
    for case, content in cases.items():
        (tmp_path / case).write_bytes(content)
        with pytest.raises(ValueError):
            prepare.verify_shard(str(tmp_path / case))
    write_wrong_schema(str(tmp_path / "schema"))
    with pytest.raises(ValueError, match="text"):
        prepare.verify_shard(str(tmp_path / "schema"))
    pq.write_table(pa.table({"text": [1, 2, 3]}), str(tmp_path / "int_text"))
    with pytest.raises(ValueError, match="text"):
        prepare.verify_shard(str(tmp_path / "int_text"))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "norows"))
    with pytest.raises(ValueError, match="rows"):
        prepare.verify_shard(str(tmp_path / "norows"))
    with pytest.raises(ValueError, match="not a readable parquet file"):
        prepare.verify_shard(str(tmp_path / "does_not_exist"))


def write_shard_damaged_inside(path, how):
    """A shard of 4 row groups whose footer and first and last row groups are intact, and whose
    row group 1 is damaged: 'zeros' (its pages overwritten), 'flipped' (bits of its compressed
    data flipped), 'utf8' (uncompressed, one byte of a document made invalid UTF-8), 'null' (a
    document that is null, in a file that is otherwise fine)."""
    docs = make_docs(seed=7, n_docs=200)
    docs[75] = "MARKER " + docs[75]  # row group 1 holds documents 50..99
    if how == "null":
        docs[75] = None
    compression = "NONE" if how == "utf8" else "snappy"
    pq.write_table(pa.table({"text": pa.array(docs, pa.string())}), path, row_group_size=50,
                   compression=compression, use_dictionary=False)
    data = bytearray(Path(path).read_bytes())
    chunk = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    if how == "zeros":
        data[start:start + chunk.total_compressed_size] = bytes(chunk.total_compressed_size)
    elif how == "flipped":
        for k in range(start + 40, start + chunk.total_compressed_size, 7):
            data[k] ^= 0x5A
    elif how == "utf8":
        k = data.index(b"MARKER")
        data[k] = 0xFF
    Path(path).write_bytes(bytes(data))
    pf = pq.ParquetFile(path)  # the footer still reads, and so do the other row groups
    assert pf.num_row_groups == 4
    for rg in (0, 2, 3):
        pf.read_row_group(rg)


@pytest.mark.parametrize("how", ["zeros", "flipped", "utf8", "null"])
def test_verify_shard_reads_every_row_group(tmp_path, how):
    path = str(tmp_path / "shard.parquet")
    write_shard_damaged_inside(path, how)
    with pytest.raises(ValueError, match="row group 1"):
        prepare.verify_shard(path)


def test_missing_validation_shard_in_process(dest, mirror, fast_retries, capsys):
    mirror.always[VAL] = "404"
    assert prepare.download_data(2, 2, data_dir=str(dest), base_url=mirror.url) == [VAL]
    assert mirror.hits[VAL] == 1
    out = capsys.readouterr().out
    assert f"missing {VAL}" in out and "2/2 training shards and no validation shard ready" in out


def test_every_training_shard_missing(dest, mirror, fast_retries, capsys):
    # (the exit path, one line and status 1, is checked by subprocess in
    # test_missing_validation_shard_exits_nonzero)
    for i in range(3):
        mirror.always[prepare.shard_filename(i)] = "404"
    assert prepare.download_data(3, 2, data_dir=str(dest), base_url=mirror.url) == \
        [prepare.shard_filename(i) for i in range(3)]
    out = capsys.readouterr().out
    for i in range(3):
        assert f"missing shard_{i:05d}.parquet" in out
    assert "0/3 training shards" in out
    assert os.listdir(dest) == [VAL]


def test_unreachable_mirror_gives_up_early(dest, mirror, fast_retries):
    """A mirror that never answers: the shards still queued fail at once once one shard has
    used up its retries, instead of each waiting out the backoff (hours with --num-shards -1)."""
    n_train = 40
    for i in range(n_train):
        mirror.always[prepare.shard_filename(i)] = "drop"
    mirror.always[VAL] = "drop"
    with pytest.raises(prepare.PrepareError, match="AUTORESEARCH_DATA_URL"):
        prepare.download_data(n_train, 2, data_dir=str(dest), base_url=mirror.url)
    attempts = sum(mirror.hits.values())
    assert attempts <= 4 * prepare.DOWNLOAD_ATTEMPTS, attempts  # about the 2 shards in flight


def test_offline_rerun_uses_shards_on_disk(dest, mirror_folder, fast_retries, capsys):
    for name in ("shard_00000.parquet", "shard_00001.parquet", VAL):
        shutil.copyfile(mirror_folder / name, dest / name)
    url = closed_port_url()
    assert prepare.download_data(2, 2, data_dir=str(dest), base_url=url) == []  # nothing to fetch
    capsys.readouterr()
    missing = prepare.download_data(4, 2, data_dir=str(dest), base_url=url)  # 2 more, mirror down
    assert missing == ["shard_00002.parquet", "shard_00003.parquet"]
    out = capsys.readouterr().out
    assert "missing shard_00002.parquet" in out and "missing shard_00003.parquet" in out
    assert "2/4 training shards" in out


# ---------------------------------------------------------------------------------------------
# prepare.main in-process: missing shards, the tokenizer's shards, the data URL, the cache folder


@pytest.fixture
def cli(tmp_path, monkeypatch, capsys, fast_retries):
    """cli(url, *args) runs prepare.main in-process on the cache `cli.cache` (tmp_path / "cache"
    unless changed), with a 300-token vocabulary. Returns (exit code, None if it returned; stdout)."""
    monkeypatch.setattr(prepare, "VOCAB_SIZE", 300)

    def run(url, *args):
        for name, value in (("CACHE_DIR", run.cache), ("DATA_DIR", run.cache / "data"),
                            ("TOKENIZER_DIR", run.cache / "tokenizer"), ("DATA_URL", url)):
            monkeypatch.setattr(prepare, name, str(value))
        capsys.readouterr()
        try:
            prepare.main(list(args))
            code = None
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().out

    run.cache = tmp_path / "cache"
    return run


def one_line_error(code, *needles):
    """The exit of a PrepareError: a one-line message (exit status 1) naming `needles`, and never
    the advice meant for a cache that was simply not prepared yet."""
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    for needle in needles:
        assert needle in code, (needle, code)
    assert "prepare.py` first" not in code
    return code


def trained_from(cache):
    return json.loads((cache / "tokenizer" / "tokenizer.json").read_text())["trained_from"]


def test_missing_shards_fail_the_run_and_hold_back_the_tokenizer(cli, mirror):
    """The mirror loses shard 1: status 1, naming it and AUTORESEARCH_DATA_URL; the good shards
    are kept; no tokenizer trained from less than its shards. With the mirror back, a rerun
    fetches only what was missing and trains the tokenizer from all of its shards."""
    mirror.always["shard_00001.parquet"] = "404"
    code, out = cli(mirror.url, "--num-shards", "3")
    one_line_error(code, "1 of 4 shards still missing", "shard_00001.parquet", "AUTORESEARCH_DATA_URL")
    assert "missing shard_00001.parquet" in out and "HTTP 404" in out
    assert "Tokenizer: not trained: 1 of the 3 shards it trains from are missing" in out
    assert "Done" not in out
    assert sorted(os.listdir(cli.cache / "data")) == ["shard_00000.parquet", "shard_00002.parquet", VAL]
    assert os.listdir(cli.cache / "tokenizer") == []

    del mirror.always["shard_00001.parquet"]
    mirror.hits.clear()
    code, out = cli(mirror.url, "--num-shards", "3")
    assert code is None and "Done" in out, out
    assert mirror.hits == {"shard_00001.parquet": 1}
    assert trained_from(cli.cache)["shards"] == [prepare.shard_filename(i) for i in range(3)]
    assert trained_from(cli.cache)["vocab_size"] == 300


def test_tokenizer_trains_once_its_shards_are_here_even_if_others_are_missing(cli, mirror, monkeypatch):
    monkeypatch.setattr(prepare, "TOKENIZER_SHARDS", 2)
    mirror.always[VAL] = "404"
    code, out = cli(mirror.url, "--num-shards", "3")
    one_line_error(code, VAL, "validation shard", "val_bpb", "AUTORESEARCH_DATA_URL")
    assert "Tokenizer: training from shard_00000.parquet .. shard_00001.parquet (2 shards): there is none yet" in out
    assert trained_from(cli.cache)["shards"] == ["shard_00000.parquet", "shard_00001.parquet"]


def test_many_missing_shards_are_summarised(cli, tmp_path, monkeypatch):
    """`-1` against an empty mirror: a handful of shards named, then a count; not a line each."""
    monkeypatch.setattr(prepare, "MAX_SHARD", 60)
    (tmp_path / "empty mirror").mkdir()
    code, out = cli((tmp_path / "empty mirror").as_uri(), "--num-shards", "-1")
    named = [line for line in out.splitlines() if line.startswith("  missing ")]
    assert [line.split(":")[0] for line in named] == [f"  missing {prepare.shard_filename(i)}" for i in range(5)]
    assert all(line.endswith("does not exist") for line in named)
    assert "  ... and 56 more shards missing" in out
    assert out.count("\n") < 15, out  # not one line a shard
    one_line_error(code, "61 of 61 shards still missing", "shard_00004.parquet and 56 more", VAL, "AUTORESEARCH_DATA_URL")


def test_tokenizer_trains_from_a_fixed_set_of_shards(cli, mirror, monkeypatch):
    """With a set of 2 shards: a tokenizer trained from fewer (a run of --num-shards 1) is trained
    again once the whole set is here, saying why; then more shards, or fewer, keep it. A tokenizer
    of another vocabulary size, or with no record of its data, is trained again."""
    monkeypatch.setattr(prepare, "TOKENIZER_SHARDS", 2)
    path = cli.cache / "tokenizer" / "tokenizer.json"
    code, out = cli(mirror.url, "--num-shards", "1")
    assert code is None and trained_from(cli.cache)["shards"] == ["shard_00000.parquet"]
    assert "Tokenizer: training from shard_00000.parquet: there is none yet" in out
    code, out = cli(mirror.url, "--num-shards", "2")
    assert code is None and trained_from(cli.cache)["shards"] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert "Tokenizer: training from shard_00000.parquet .. shard_00001.parquet (2 shards): " \
           "the one there was trained from shard_00000.parquet" in out
    saved = path.read_bytes()
    for n in ("3", "1"):
        code, out = cli(mirror.url, "--num-shards", n)
        assert code is None and "Tokenizer: already trained" in out, out
        assert path.read_bytes() == saved

    monkeypatch.setattr(prepare, "VOCAB_SIZE", 290)
    code, out = cli(mirror.url, "--num-shards", "2")
    assert code is None and "the one there was trained with vocab_size 300, not 290" in out
    assert trained_from(cli.cache)["vocab_size"] == 290
    meta = json.loads(path.read_text())
    del meta["trained_from"]
    path.write_text(json.dumps(meta))
    code, out = cli(mirror.url, "--num-shards", "2")
    assert code is None and "the one there is from an older prepare.py" in out
    assert trained_from(cli.cache)["shards"] == ["shard_00000.parquet", "shard_00001.parquet"]


def test_tokenizer_problem_reasons(small_tokenizer, tmp_path, monkeypatch):
    _, tokenizer_dir = small_tokenizer  # trained from shards 0 and 1, 300 tokens
    monkeypatch.setattr(prepare, "VOCAB_SIZE", 300)
    two = ["shard_00000.parquet", "shard_00001.parquet"]
    assert prepare.tokenizer_problem(str(tokenizer_dir), two) is None
    assert prepare.tokenizer_problem(str(tokenizer_dir), two[:1]) is None
    assert "trained from shard_00000.parquet .. shard_00001.parquet (2 shards)" in \
        prepare.tokenizer_problem(str(tokenizer_dir), prepare.tokenizer_shards(3))
    assert prepare.tokenizer_problem(str(tmp_path), two) == "there is none yet"
    monkeypatch.setattr(prepare, "TOKENIZER_MAX_CHARS", 10**6)
    assert "max_chars" in prepare.tokenizer_problem(str(tokenizer_dir), two)
    assert prepare.tokenizer_shards(3) == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"]
    assert prepare.tokenizer_shards(prepare.MAX_SHARD) == [prepare.shard_filename(i) for i in range(10)]


def test_cached_shard_damaged_inside_is_named_and_fetched_again(dest, mirror, mirror_folder, capsys):
    assert prepare.download_data(1, 1, data_dir=str(dest), base_url=mirror.url) == []
    write_shard_damaged_inside(str(dest / "shard_00000.parquet"), "flipped")  # footer intact
    mirror.hits.clear()
    capsys.readouterr()
    assert prepare.download_data(1, 1, data_dir=str(dest), base_url=mirror.url) == []
    assert mirror.hits == {"shard_00000.parquet": 1}
    assert "shard_00000.parquet in the cache was damaged (row group 1 of 4 does not read" in capsys.readouterr().out
    assert (dest / "shard_00000.parquet").read_bytes() == (mirror_folder / "shard_00000.parquet").read_bytes()


def test_a_shard_that_goes_bad_later_is_named(tmp_path, toy_cache, tokenizer, monkeypatch):
    """After prepare.py: the loader and the tokenizer's trainer fail naming the file, in one line."""
    data = tmp_path / "data"
    shutil.copytree(Path(toy_cache) / "data", data)
    bad = data / "shard_00000.parquet"
    write_shard_damaged_inside(str(bad), "zeros")
    monkeypatch.setattr(prepare, "DATA_DIR", str(data))
    loader = prepare.make_dataloader(tokenizer, 2, 64, "train", device="cpu", num_workers=2)
    out = call_with_timeout(lambda: [next(loader) for _ in range(1000)], timeout=60)
    loader.close()
    error = out.get("error")
    assert isinstance(error, prepare.PrepareError), out
    assert f"cannot read {bad} (row group 1: " in error.code and "\n" not in error.code
    with pytest.raises(prepare.PrepareError, match="row group 1") as info:
        list(prepare.text_iterator([str(bad)]))
    assert str(bad) in info.value.code


def test_data_url_checked(mirror_folder, tmp_path, monkeypatch):
    assert prepare.check_data_url("http://127.0.0.1:8000/x") == "http://127.0.0.1:8000/x"
    assert prepare.check_data_url("https://mirror.example/x/") == "https://mirror.example/x/"
    assert prepare.check_data_url(mirror_folder.as_uri()) == mirror_folder.as_uri()
    # the path of a folder is taken as that folder, relative paths too
    assert prepare.check_data_url(str(mirror_folder)) == mirror_folder.as_uri()
    monkeypatch.chdir(mirror_folder.parent)
    assert prepare.check_data_url(mirror_folder.name) == mirror_folder.as_uri()
    for bad in ["no/such/folder", "/no/such/folder", "ftp://mirror.example/x", "hf://datasets/x",
                "file:///no/such/folder", "http:///no-host", "huggingface.co/datasets/x"]:
        with pytest.raises(prepare.PrepareError) as info:
            prepare.check_data_url(bad)
        one_line_error(info.value.code, "AUTORESEARCH_DATA_URL", bad)


def test_plain_folder_data_url_downloads(cli, mirror_folder):
    code, out = cli(str(mirror_folder), "--num-shards", "1")
    assert code is None, code
    assert f"from {mirror_folder.as_uri()}" in out
    assert sorted(os.listdir(cli.cache / "data")) == ["shard_00000.parquet", VAL]


def test_bad_data_url_refused_before_any_download(cli):
    t = time.time()
    code, out = cli("mirrors/climbmix", "--num-shards", "40")
    one_line_error(code, "AUTORESEARCH_DATA_URL=mirrors/climbmix", "nor an existing folder")
    assert time.time() - t < 1 and out == ""
    assert not cli.cache.exists()


def test_cache_folder_that_is_a_file(cli, mirror):
    cli.cache.write_text("not a folder")
    code, _ = cli(mirror.url, "--num-shards", "1")
    one_line_error(code, f"{cli.cache} is a file, not a folder", "AUTORESEARCH_CACHE_DIR")
    assert sum(mirror.hits.values()) == 0


def test_read_only_cache_folder(cli, mirror, monkeypatch):
    """(Tests run as root, for whom permissions do not stop writes: a write there fails here as on
    a read-only file system.)"""
    (cli.cache / "data").mkdir(parents=True)
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).startswith(str(cli.cache)) and any(m in mode for m in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(prepare, "open", read_only, raising=False)
    code, _ = cli(mirror.url, "--num-shards", "1")
    one_line_error(code, f"cannot write to the cache folder {cli.cache / 'data'} (Read-only file system)",
                   "AUTORESEARCH_CACHE_DIR")
    assert sum(mirror.hits.values()) == 0


def test_full_disk_while_saving_the_tokenizer(cli, mirror, monkeypatch):
    def half_then_full(obj, f):
        f.write(json.dumps(obj)[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare.json, "dump", half_then_full)
    code, out = cli(mirror.url, "--num-shards", "1")
    one_line_error(code, f"cannot write the tokenizer to {cli.cache / 'tokenizer'} (No space left on device)")
    assert os.listdir(cli.cache / "tokenizer") == []  # no half-written file, under any name


def test_full_disk_while_downloading_stops_at_once(cli, mirror_folder, monkeypatch):
    tried = []

    def full(src, dst):
        tried.append(os.path.basename(src))
        Path(dst).write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prepare.shutil, "copyfile", full)
    code, _ = cli(mirror_folder.as_uri(), "--num-shards", "3", "--download-workers", "1")
    one_line_error(code, f"cannot write to the cache folder {cli.cache / 'data'} (No space left on device)")
    assert tried == [VAL]  # neither retried nor another shard tried: the disk, not the mirror, failed
    assert leftovers(cli.cache / "data") == []


# ---------------------------------------------------------------------------------------------
# Temporary files: names unique per writer, stale ones removed, the tokenizer replaced atomically


def test_temp_names_are_unique_per_writer(tmp_path):
    path = str(tmp_path / "shard_00000.parquet")
    names = [prepare.temp_name(path) for _ in range(50)]
    with ThreadPoolExecutor(4) as pool:
        names += list(pool.map(lambda _: prepare.temp_name(path), range(50)))
    assert len(set(names)) == 100
    for name in names:
        assert name.startswith(f"{path}.tmp.{prepare.HOST}.{os.getpid()}.")


def test_stale_temp_files_are_removed(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host, old = prepare.HOST, time.time() - 2 * prepare.STALE_TEMP_SECONDS
    names = {
        f"shard_00000.parquet.tmp.{host}.{os.getpid()}.1.0a0a0a0a": "kept",  # a live writer's
        f"shard_00001.parquet.tmp.{host}.{gone.pid}.1.0b0b0b0b": "removed",  # a killed writer's
        "shard_00002.parquet.tmp.elsewhere.123.1.0c0c0c0c": "kept",  # another host's, recent
        "shard_00003.parquet.tmp.elsewhere.123.1.0d0d0d0d": "removed",  # another host's, old
        "shard_00004.parquet.tmp.4242.777": "removed",  # an older prepare.py's, old
        "tokenizer.json.tmp": "kept",  # an older prepare.py's, recent
        "shard_00005.parquet": "kept",
    }
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    for name in ("shard_00003.parquet.tmp.elsewhere.123.1.0d0d0d0d", "shard_00004.parquet.tmp.4242.777"):
        os.utime(tmp_path / name, (old, old))
    assert prepare.remove_temp_files(str(tmp_path)) == 3
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, fate in names.items() if fate == "kept")
    assert prepare.remove_temp_files(str(tmp_path), ours=True) == 1  # this process's own, after Ctrl-C
    assert f"shard_00000.parquet.tmp.{host}.{os.getpid()}.1.0a0a0a0a" not in os.listdir(tmp_path)
    assert prepare.remove_temp_files(str(tmp_path / "not there")) == 0


def save_tokenizers(folder, vocab_size, times):
    """In a writer process: save a tokenizer of `vocab_size` tokens `times` times into `folder`."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({i.to_bytes(3, "big"): 256 + i for i in range(vocab_size - len(prepare.SPECIAL_TOKENS) - 256)})
    for _ in range(times):
        prepare.save_tokenizer(ranks, prepare.SPLIT_PATTERN, folder, {"shards": [], "vocab_size": vocab_size})


def test_concurrent_tokenizer_writers_and_a_reader(tmp_path):
    """Two processes save different tokenizers into one folder, over and over, while this one
    loads: every load is whole and consistent (token_bytes of the same tokenizer), no writer
    fails, and no temporary file is left."""
    folder = str(tmp_path / "tokenizer")
    save_tokenizers(folder, 1000, 1)
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=save_tokenizers, args=(folder, vocab_size, 100)) for vocab_size in (1000, 2000)]
    for writer in writers:
        writer.start()
    seen, errors = collections.Counter(), []
    while any(writer.is_alive() for writer in writers):
        try:
            tok = prepare.Tokenizer.from_directory(folder)
            assert len(tok.token_bytes) == tok.get_vocab_size() == tok.trained_from["vocab_size"]
            assert len(prepare.get_token_bytes("cpu", folder)) in (1000, 2000)
            seen[tok.get_vocab_size()] += 1
        except BaseException as e:  # noqa: BLE001 - counted, and shown below
            errors.append(repr(e))
    for writer in writers:
        writer.join()
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert errors == []
    assert set(seen) == {1000, 2000}, seen  # the writers did take turns under the reader
    assert os.listdir(folder) == ["tokenizer.json"]


# ---------------------------------------------------------------------------------------------
# CLI values (two of these cases also run as real subprocesses, below)


CLI_CASES = {
    "num-shards 0": (["--num-shards", "0"], "--num-shards"),
    "num-shards -5": (["--num-shards", "-5"], "--num-shards"),
    "num-shards abc": (["--num-shards", "abc"], "--num-shards"),
    "download-workers 0": (["--download-workers", "0"], "--download-workers"),
    "download-workers x": (["--download-workers", "x"], "--download-workers"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_rejects_bad_value(case, monkeypatch, capsys):
    args, flag = CLI_CASES[case]
    monkeypatch.setattr(prepare, "download_data", lambda *a, **k: pytest.fail("bad value accepted"))
    with pytest.raises(SystemExit) as info:
        prepare.main(args)
    assert info.value.code == 2  # argparse's usage error
    out, err = capsys.readouterr()
    assert out == ""
    cause = [line for line in err.splitlines() if "error" in line]
    assert len(cause) == 1 and flag in cause[0] and args[1] in cause[0], err


def test_all_shards_means_every_training_shard_and_the_validation_shard_once(tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(prepare, "download_shard", lambda index, *a: asked.append(index) or ("present", 1, None))
    assert prepare.download_data(-1, 8, data_dir=str(tmp_path), base_url="http://127.0.0.1:9/") == []
    assert sorted(asked) == list(range(prepare.MAX_SHARD)) + [prepare.VAL_SHARD]


def test_cli_values_parse():
    assert prepare.shard_count("-1") == -1
    assert prepare.shard_count("1") == 1
    assert prepare.shard_count(str(prepare.MAX_SHARD)) == prepare.MAX_SHARD
    for bad in ("0", "-2", str(prepare.MAX_SHARD + 1), "1.5", ""):
        with pytest.raises(Exception, match="must be"):
            prepare.shard_count(bad)
    assert prepare.worker_count("1") == 1
    for bad in ("0", "-1", "257", "x"):
        with pytest.raises(Exception, match="must be"):
            prepare.worker_count(bad)


# ---------------------------------------------------------------------------------------------
# Tokenizer


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    folder = make_mirror_folder(root / "data", n_train=2, docs_per_shard=100)
    tokenizer_dir = root / "tokenizer"
    paths = [str(folder / prepare.shard_filename(i)) for i in range(2)]
    tok = prepare.train_tokenizer(paths, str(tokenizer_dir), vocab_size=300)
    return tok, tokenizer_dir


ROUND_TRIP = [
    "Hello, world! The quick brown fox.",
    "0123456789 3.14159 2026-05-09 1e-3",
    "日本語のテキストと中文",
    "emoji 🚀🎉👩‍👩‍👧 ok",
    "  tabs\tand\nnewlines\r\n  ",
    "café naïve über Ωμέγα",
    "",
]


def test_tokenizer_round_trip(small_tokenizer):
    tok, _ = small_tokenizer
    assert tok.get_vocab_size() == 300
    for text in ROUND_TRIP:
        ids = tok.encode(text)
        assert all(0 <= i < 300 - len(prepare.SPECIAL_TOKENS) for i in ids)
        assert tok.decode(ids) == text
    batch = tok.encode(ROUND_TRIP, prepend=prepare.BOS_TOKEN)
    for text, ids in zip(ROUND_TRIP, batch):
        assert ids[0] == tok.get_bos_token_id() and tok.decode(ids[1:]) == text
    assert tok.encode("abc", prepend=tok.get_bos_token_id())[0] == tok.get_bos_token_id()


def test_tokenizer_token_bytes(small_tokenizer):
    tok, tokenizer_dir = small_tokenizer
    token_bytes = prepare.get_token_bytes("cpu", str(tokenizer_dir))
    assert token_bytes.dtype == torch.int64 and token_bytes.shape == (300,)
    for text in ROUND_TRIP + ["x" * 1000, "🚀" * 7 + "a"]:
        ids = tok.encode(text)
        assert int(token_bytes[ids].sum()) == len(text.encode("utf-8")), text
    for i in range(296):
        assert int(token_bytes[i]) == len(tok.enc.decode_single_token_bytes(i)) > 0


def test_tokenizer_special_tokens(small_tokenizer):
    tok, tokenizer_dir = small_tokenizer
    token_bytes = prepare.get_token_bytes("cpu", str(tokenizer_dir))
    vocab = tok.get_vocab_size()
    for i, special in enumerate(prepare.SPECIAL_TOKENS):
        assert tok.enc.encode_single_token(special) == vocab - 4 + i
        assert int(token_bytes[vocab - 4 + i]) == 0
    assert tok.get_bos_token_id() == vocab - 4
    assert prepare.BOS_TOKEN == "<|reserved_0|>"
    # special-token text in a document is plain text, never a special id: in Tokenizer.encode and in
    # the dataloader's workers
    assert all(i < vocab - 4 for i in tok.encode("<|reserved_0|> hi"))
    prepare._init_worker(tok.enc)
    tokens, lengths = prepare.encode_documents(["<|reserved_0|> hi", "<|reserved_3|>"])
    assert len(lengths) == 2 and (tokens < vocab - 4).all()
    assert tok.decode(tokens[:lengths[0]].tolist()) == "<|reserved_0|> hi"


def test_tokenizer_that_loses_text_is_refused(tmp_path, monkeypatch):
    folder = make_mirror_folder(tmp_path / "data", n_train=1, docs_per_shard=20)
    decode = prepare.Tokenizer.decode
    monkeypatch.setattr(prepare.Tokenizer, "decode", lambda self, ids: decode(self, ids).replace("!", ""))
    with pytest.raises(prepare.PrepareError, match="round trip"):
        prepare.train_tokenizer([str(folder / prepare.shard_filename(0))], str(tmp_path / "tok"), vocab_size=300)


def test_tokenizer_files_are_plain_data(small_tokenizer):
    """One JSON file holds it all, the token_bytes lookup included: it is replaced in one rename,
    so a reader never sees a tokenizer with another tokenizer's token_bytes."""
    tok, tokenizer_dir = small_tokenizer
    assert os.listdir(tokenizer_dir) == ["tokenizer.json"]
    with open(tokenizer_dir / "tokenizer.json") as f:
        meta = json.load(f)
    assert meta["pattern"] == prepare.SPLIT_PATTERN
    assert meta["special_tokens"] == {s: 296 + i for i, s in enumerate(prepare.SPECIAL_TOKENS)}
    assert len(meta["mergeable_ranks"]) == 296
    assert len(meta["token_bytes"]) == 300 and meta["token_bytes"][296:] == [0, 0, 0, 0]
    # what it was trained from: the shards, the vocabulary size and the character caps
    assert meta["trained_from"] == {"shards": ["shard_00000.parquet", "shard_00001.parquet"], "vocab_size": 300,
                                    "max_chars": prepare.TOKENIZER_MAX_CHARS, "doc_chars": prepare.TOKENIZER_DOC_CHARS}
    assert tok.trained_from == meta["trained_from"]


def test_tokenizer_save_that_fails_midway_leaves_the_last_complete_one(tmp_path, small_tokenizer, monkeypatch):
    tok, tokenizer_dir = small_tokenizer
    shutil.copytree(tokenizer_dir, tmp_path / "tok")
    ranks = {bytes([i]): i for i in range(256)}

    def half_then_fail(obj, f):
        f.write(json.dumps(obj)[:100])
        raise OSError("disk full")

    monkeypatch.setattr(prepare.json, "dump", half_then_fail)
    for folder in (tmp_path / "tok", tmp_path / "new"):
        with pytest.raises(OSError, match="disk full"):
            prepare.save_tokenizer(ranks, prepare.SPLIT_PATTERN, str(folder), {})
    assert os.listdir(tmp_path / "new") == []  # not even the temporary file
    assert os.listdir(tmp_path / "tok") == ["tokenizer.json"]
    kept = prepare.Tokenizer.from_directory(str(tmp_path / "tok"))
    assert kept.get_vocab_size() == tok.get_vocab_size() == 300
    assert prepare.get_token_bytes("cpu", str(tmp_path / "tok")).tolist() == \
        prepare.get_token_bytes("cpu", str(tokenizer_dir)).tolist()


def test_text_iterator_caps(tmp_path):
    path = str(tmp_path / "s.parquet")
    write_shard(path, ["a" * 50, "b" * 5, "", "c" * 30])
    assert list(prepare.text_iterator([path], max_chars=10**9, doc_chars=20)) == ["a" * 20, "b" * 5, "c" * 20]
    assert list(prepare.text_iterator([path], max_chars=22, doc_chars=20)) == ["a" * 20, "b" * 2]


def test_tokenizer_missing(tmp_path):
    with pytest.raises(prepare.PrepareError, match=r"uv run prepare\.py") as info:
        prepare.Tokenizer.from_directory(str(tmp_path))
    assert isinstance(info.value, SystemExit)
    with pytest.raises(prepare.PrepareError, match=r"uv run prepare\.py"):
        prepare.get_token_bytes("cpu", str(tmp_path))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "binary", "wrong_shape", "wrong_specials",
                                    "token_bytes_short", "token_bytes_wrong", "token_bytes_missing"])
def test_tokenizer_damaged(tmp_path, small_tokenizer, damage):
    _, tokenizer_dir = small_tokenizer
    bad = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, bad)
    path = bad / "tokenizer.json"
    text = path.read_text()
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_text("this is not json {")
    elif damage == "binary":
        path.write_bytes(bytes(range(128, 256)))
    elif damage == "wrong_shape":
        path.write_text("[1, 2, 3]")
    else:
        meta = json.loads(text)
        if damage == "wrong_specials":
            meta["special_tokens"] = {"<|endoftext|>": 296}
        elif damage == "token_bytes_short":
            meta["token_bytes"] = meta["token_bytes"][:-1]
        elif damage == "token_bytes_wrong":
            meta["token_bytes"][300 // 2] += 1
        else:
            del meta["token_bytes"]
        path.write_text(json.dumps(meta))
    for load in (lambda: prepare.Tokenizer.from_directory(str(bad)), lambda: prepare.get_token_bytes("cpu", str(bad))):
        with pytest.raises(prepare.PrepareError, match=r"damaged.*uv run prepare\.py"):
            load()


@pytest.mark.parametrize("record", ["none", "other_pattern"])
def test_tokenizer_from_other_data_is_refused(tmp_path, small_tokenizer, record):
    """train.py refuses, in one line, a tokenizer that does not say what it was trained from (an
    older prepare.py's) or that splits text with another pattern."""
    _, tokenizer_dir = small_tokenizer
    bad = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, bad)
    meta = json.loads((bad / "tokenizer.json").read_text())
    if record == "none":
        del meta["trained_from"]
    else:
        meta["pattern"] = meta["pattern"].replace(r"\p{N}{1,2}", r"\p{N}{1,3}")
        assert meta["pattern"] != prepare.SPLIT_PATTERN
    (bad / "tokenizer.json").write_text(json.dumps(meta))
    message = "older prepare.py" if record == "none" else "another split pattern"
    with pytest.raises(prepare.PrepareError, match=rf"{message}.*uv run prepare\.py") as info:
        prepare.Tokenizer.from_directory(str(bad))
    assert "\n" not in info.value.code


# ---------------------------------------------------------------------------------------------
# Dataloader


@pytest.mark.parametrize("split,present",
                         [("train", []), ("val", []), ("train", [VAL]), ("val", ["shard_00000.parquet"])])
def test_dataloader_missing_split_fails_at_once(tmp_path, tokenizer, monkeypatch, split, present):
    data = tmp_path / "data"
    data.mkdir()
    for name in present:
        write_shard(str(data / name), make_docs(seed=5, n_docs=5))
    monkeypatch.setattr(prepare, "DATA_DIR", str(data))
    loader = prepare.make_dataloader(tokenizer, 2, 16, split, device="cpu")
    out = call_with_timeout(lambda: next(loader), timeout=20)
    assert isinstance(out.get("error"), prepare.PrepareError), out
    message = str(out["error"].code)
    assert "uv run prepare.py" in message and str(data) in message
    assert ("training" in message) if split == "train" else (VAL in message)


def test_dataloader_folder_does_not_exist(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare, "DATA_DIR", str(tmp_path / "nowhere"))
    for split in ("train", "val"):
        out = call_with_timeout(lambda: next(prepare.make_dataloader(tokenizer, 2, 16, split, device="cpu")), 20)
        assert isinstance(out.get("error"), prepare.PrepareError), out


def encoded_docs(tokenizer, paths):
    docs = []
    for path in paths:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            docs.append(tuple(tokenizer.enc.encode_ordinary(text)))
    return docs


def check_rows(rows, bos, docs):
    """Each row: BOS first; split at BOS, every piece but the last is a whole document, the last
    one a prefix of a document (cropped to fill the row)."""
    whole = set(docs)
    for row in rows.tolist():
        assert row[0] == bos
        starts = [i for i, t in enumerate(row) if t == bos]
        pieces = [tuple(row[a + 1:b]) for a, b in zip(starts, starts[1:] + [len(row)])]
        for piece in pieces[:-1]:
            assert piece in whole
        last = pieces[-1]
        assert any(d[:len(last)] == last for d in docs)


def test_documents_come_in_file_order_across_epochs(toy_cache, tokenizer, monkeypatch):
    monkeypatch.setattr(prepare, "TASK_DOCS", 7)  # row groups of 50 documents, in uneven slices
    expected = encoded_docs(tokenizer, prepare.list_shards("train"))
    assert len(expected) % 50 == 0
    per_epoch = len(expected) // 50 * 8  # each row group: 7 slices of 7 documents, then 1
    stream = prepare.document_batches(tokenizer, "train", num_workers=3)
    got = [next(stream) for _ in range(per_epoch + 9)]
    stream.close()
    assert [len(docs) for docs, _ in got] == ([7] * 7 + [1]) * (len(expected) // 50) + [7] * 7 + [1, 7]
    assert [tuple(doc.tolist()) for docs, _ in got for doc in docs] == expected + expected[:57]
    assert [epoch for _, epoch in got] == [1] * per_epoch + [2] * 9


def test_dataloader_packing_invariants(toy_cache, tokenizer):
    B, T = 4, 128
    vocab, bos = tokenizer.get_vocab_size(), tokenizer.get_bos_token_id()
    train_docs = encoded_docs(tokenizer, prepare.list_shards("train"))
    loader = prepare.make_dataloader(tokenizer, B, T, "train", device="cpu")
    n_docs_seen = 0
    for _ in range(6):
        x, y, epoch = next(loader)
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == torch.int64 and x.device.type == "cpu"
        assert isinstance(epoch, int) and epoch >= 1
        assert torch.equal(x[:, 0], torch.full((B,), bos))
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert int(x.min()) >= 0 and int(x.max()) < vocab and int(y.min()) >= 0 and int(y.max()) < vocab
        rows = torch.cat([x, y[:, -1:]], dim=1)  # the packed (B, T+1) rows
        check_rows(rows, bos, train_docs)
        n_docs_seen += int((x == bos).sum())
    assert n_docs_seen > 6 * B  # several documents per row: the packing was exercised
    loader.close()


def test_val_loader_is_deterministic_and_val_only(toy_cache, tokenizer):
    T = 64
    val_docs = encoded_docs(tokenizer, prepare.list_shards("val"))

    def rows(B, n_batches):
        loader = prepare.make_dataloader(tokenizer, B, T, "val", device="cpu")
        out = [torch.cat([x, y[:, -1:]], dim=1) for x, y, _ in (next(loader) for _ in range(n_batches))]
        loader.close()
        return torch.cat(out)

    a, b = rows(2, 6), rows(3, 4)
    assert a.shape == b.shape == (12, T + 1)
    assert torch.equal(a, b)
    check_rows(a, tokenizer.get_bos_token_id(), val_docs)


@pytest.mark.parametrize("split,workers", [("train", 2), ("val", 16), ("train", 16)])
def test_closing_a_loader_stops_its_thread_and_workers(toy_cache, tokenizer, split, workers):
    threads, children = set(threading.enumerate()), set(multiprocessing.active_children())
    loader = prepare.make_dataloader(tokenizer, 4, 64, split, device="cpu", num_workers=workers)
    for _ in range(3):
        next(loader)
    assert len(set(threading.enumerate()) - threads) >= 1
    assert len(set(multiprocessing.active_children()) - children) == workers
    t = time.time()
    loader.close()  # with tasks in flight: workers still sending results when the pool is stopped
    assert time.time() - t < 3
    assert set(threading.enumerate()) - threads == set()
    assert set(multiprocessing.active_children()) - children == set()


EXIT_CHECK = """
import atexit, multiprocessing.pool, threading
def report():  # registered before prepare's exit handler, so it runs right after it
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    print("running at exit:", others, len(multiprocessing.active_children()), flush=True)
atexit.register(report)
import prepare
loader = prepare.make_dataloader(prepare.Tokenizer.from_directory(), 4, 64, "train", device="cpu", num_workers=2)
next(loader)
print("a batch", flush=True)
"""


def test_exit_stops_a_loader_left_open(toy_cache):
    """train.py never closes its training loader: at exit, its thread and workers are stopped
    before the interpreter shuts down (a thread still reading then can abort the process)."""
    r = subprocess.run([sys.executable, "-c", EXIT_CHECK], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == ["a batch", "running at exit: [] 0"], r.stdout


SHARE_CHECK = """
import json, multiprocessing, os
import prepare
children = set(multiprocessing.active_children())
loader = prepare.make_dataloader(prepare.Tokenizer.from_directory(), 4, 64, "train", device="cpu")
next(loader)
workers = set(multiprocessing.active_children()) - children
cpus = sorted({cpu for w in workers for cpu in os.sched_getaffinity(w.pid)})
print(json.dumps([prepare.cpu_share(), prepare.loader_workers(), prepare.compile_workers(), len(workers), cpus]))
loader.close()
"""


def test_a_run_sizes_its_workers_from_the_cpus_it_may_use(toy_cache, tokenizer):
    mine = sorted(os.sched_getaffinity(0))
    # pinned to one CPU by taskset: one loader worker, started and running on that CPU; one compile worker
    r = subprocess.run(["taskset", "-c", str(mine[-1]), sys.executable, "-c", SHARE_CHECK], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == [1, 1, 1, 1, [mine[-1]]]
    # unpinned: every CPU this process may use, one of them left to the main process
    n, children = len(mine), set(multiprocessing.active_children())
    workers = max(1, min(n - 1, 8))
    assert (prepare.cpu_share(), prepare.loader_workers(), prepare.compile_workers()) == (n, workers, min(n, 16))
    loader = prepare.make_dataloader(tokenizer, 4, 64, "train", device="cpu")
    next(loader)
    assert len(set(multiprocessing.active_children()) - children) == workers
    loader.close()


@pytest.mark.parametrize("cpus,loader,compiler", [(128, 8, 16), (16, 8, 16), (4, 3, 4), (2, 1, 2), (1, 1, 1)])
def test_worker_counts_follow_the_cpu_share_with_caps(monkeypatch, cpus, loader, compiler):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(100, 100 + cpus)))
    monkeypatch.setattr(os, "cpu_count", lambda: 256)  # the host's count: never the share
    assert (prepare.cpu_share(), prepare.loader_workers(), prepare.compile_workers()) == (cpus, loader, compiler)


def test_worker_counts_without_an_affinity_mask_use_the_machines_cpus(monkeypatch):
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert (prepare.cpu_share(), prepare.loader_workers(), prepare.compile_workers()) == (6, 5, 6)
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert (prepare.cpu_share(), prepare.loader_workers(), prepare.compile_workers()) == (1, 1, 1)


def doc_stream(lengths, extra=1000):
    """Batches of one document, whose tokens name it: the k-th (from 1) is [1000k, 1000k+1, ...]."""
    for k, n in enumerate(list(lengths) + [50] * extra):
        yield [np.arange(1000 * (k + 1), 1000 * (k + 1) + n, dtype=np.uint32)], 1


def test_pack_rows_best_fit(monkeypatch):
    monkeypatch.setattr(prepare, "DOC_BUFFER", 3)
    bos = 7
    # buffer holds docs of 2, 5, 3 tokens (3, 6, 4 with BOS); row of 10: the 5-token doc is the
    # largest that fits, taken before the older, smaller ones; then 4 left: the 3-token doc
    rows, epoch = next(prepare.pack_rows(doc_stream([2, 5, 3, 20]), B=1, T=9, bos=bos))
    assert rows.shape == (1, 10) and rows.dtype == np.int64 and epoch == 1
    assert rows[0].tolist() == [bos, 2000, 2001, 2002, 2003, 2004, bos, 3000, 3001, 3002]


def test_pack_rows_crops_the_shortest_when_none_fits(monkeypatch):
    monkeypatch.setattr(prepare, "DOC_BUFFER", 3)
    bos = 7
    rows, _ = next(prepare.pack_rows(doc_stream([20, 30, 15]), B=2, T=9, bos=bos))
    assert rows[0].tolist() == [bos] + list(range(3000, 3009))  # the shortest (15), cropped to 9
    # the cropped remainder is dropped; the next row crops the next shortest (20, not 50)
    assert rows[1].tolist() == [bos] + list(range(1000, 1009))


def test_pack_rows_fills_rows_exactly(monkeypatch):
    monkeypatch.setattr(prepare, "DOC_BUFFER", 4)
    bos = 7
    # 9 tokens + BOS fill a row of 10 exactly; then 5 + 3 tokens + 2 BOS fill the next, no crop
    rows, _ = next(prepare.pack_rows(doc_stream([3, 5, 9, 40], extra=10), B=2, T=9, bos=bos))
    assert rows[0].tolist() == [bos] + list(range(3000, 3009))
    assert rows[1].tolist() == [bos, 2000, 2001, 2002, 2003, 2004, bos, 1000, 1001, 1002]
    # and over many rows of mixed documents, every position is a real token, never filler
    monkeypatch.setattr(prepare, "DOC_BUFFER", 16)
    rng = random.Random(0)
    gen = prepare.pack_rows(doc_stream([rng.randint(0, 40) for _ in range(500)]), B=8, T=31, bos=bos)
    for _ in range(10):
        rows, _ = next(gen)
        assert (rows[:, 0] == bos).all()
        assert ((rows == bos) | (rows >= 1000)).all()
        # within a document tokens are consecutive; a document starts with its first token
        nxt, prev = rows[:, 1:], rows[:, :-1]
        step_ok = (nxt == prev + 1) | (nxt == bos) | ((prev == bos) & (nxt % 1000 == 0))
        assert step_ok.all()


def recipe_rows(batches, B, T, bos, buffer_size):
    """The recipe's packing, written plainly: a list of documents in arrival order, refilled a
    whole batch at a time while it holds fewer than buffer_size; into each row the largest document
    that fits, else the shortest, cropped (the first such in the list, as max and min return)."""
    buffer = []
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    docs, epoch = next(batches)
                    buffer.extend([bos] + doc.tolist() for doc in docs)
                space = T + 1 - len(row)
                fits = [i for i, doc in enumerate(buffer) if len(doc) <= space]
                if fits:
                    row += buffer.pop(max(fits, key=lambda i: len(buffer[i])))
                else:
                    row += buffer.pop(min(range(len(buffer)), key=lambda i: len(buffer[i])))[:space]
            rows.append(row)
        yield np.array(rows), epoch


def test_pack_rows_refills_whole_batches_as_the_recipe(monkeypatch):
    """Batches of 1 to 12 documents, a fifth of them longer than a row: the rows equal the plain
    recipe's, token for token. Refilling one document at a time would differ within a few rows."""
    monkeypatch.setattr(prepare, "DOC_BUFFER", 40)

    def batches(seed):
        rng = np.random.default_rng(seed)
        k = 0
        for epoch in itertools.count(1):
            for _ in range(30):
                docs = []
                for _ in range(rng.integers(1, 13)):
                    k += 1
                    n = int(rng.integers(80, 200)) if rng.random() < 0.2 else int(rng.integers(1, 60))
                    docs.append(np.arange(1000 * k, 1000 * k + n, dtype=np.uint32))
                yield docs, epoch

    ours, plain = prepare.pack_rows(batches(1), B=4, T=63, bos=7), recipe_rows(batches(1), 4, 63, 7, 40)
    epochs = set()
    for _ in range(60):
        (a, epoch_a), (b, epoch_b) = next(ours), next(plain)
        np.testing.assert_array_equal(a, b)
        assert epoch_a == epoch_b
        epochs.add(epoch_a)
    assert max(epochs) >= 3, "the stream should have wrapped around (epochs) more than once"


# ---------------------------------------------------------------------------------------------
# evaluate_bpb


class LogitsModel(torch.nn.Module):
    """Logits (B, T, V) that depend on the input tokens: a fixed random table looked up by token.
    `extra` is added to the training loss only, as an agent's z-loss or label smoothing would be.
    Records the batch shapes it was called with."""

    def __init__(self, vocab_size, extra=None, scale=3.0):
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.table = torch.nn.Parameter(torch.randn(vocab_size, vocab_size, generator=gen) * scale)
        self.extra = extra
        self.shapes = []

    def forward(self, x, targets=None):
        self.shapes.append(tuple(x.shape))
        logits = self.table[x]
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return loss + self.extra(logits) if self.extra is not None else loss


@pytest.fixture
def small_eval(monkeypatch, toy_cache, tokenizer):
    """MAX_SEQ_LEN=64, 21 evaluation rows; returns the first 21 rows' inputs and targets, and token_bytes."""
    T, rows = 64, 21
    monkeypatch.setattr(prepare, "MAX_SEQ_LEN", T)
    monkeypatch.setattr(prepare, "EVAL_TOKENS", T * rows + 17)  # a remainder is not a row
    loader = prepare.make_dataloader(tokenizer, rows, T, "val", device="cpu")
    x, y, _ = next(loader)
    loader.close()
    return x, y, prepare.get_token_bytes()


def expected_bpb(logits, y, token_bytes):
    """By hand, in float64: nats of the targets with bytes over ln 2 x their bytes."""
    nats = -torch.log_softmax(logits.double(), -1).gather(-1, y[..., None]).squeeze(-1)
    b = token_bytes[y]
    return float(torch.where(b > 0, nats, 0.0).sum()) / (math.log(2) * int(b.sum()))


def test_evaluate_bpb_uniform_model(small_eval, tokenizer):
    x, y, token_bytes = small_eval
    V = tokenizer.get_vocab_size()
    b = token_bytes[y]
    scored_tokens, scored_bytes = int((b > 0).sum()), int(b.sum())
    assert 0 < scored_tokens < y.numel()  # BOS targets exist and are not scored
    model = LogitsModel(V, scale=0.0)  # all logits 0: log V nats a token
    bpb = prepare.evaluate_bpb(model, tokenizer, 4)
    assert bpb == pytest.approx(math.log2(V) * scored_tokens / scored_bytes, rel=1e-6)


def test_evaluate_bpb_same_tokens_for_any_batch_size(small_eval, tokenizer):
    x, y, token_bytes = small_eval
    model = LogitsModel(tokenizer.get_vocab_size())
    with torch.no_grad():
        expected = expected_bpb(model(x), y, token_bytes)
    results = {}
    for batch_size in (4, 8, 21, 5, 1, 30):
        model.shapes.clear()
        results[batch_size] = prepare.evaluate_bpb(model, tokenizer, batch_size)
        assert set(model.shapes) == {(batch_size, 64)}
        assert len(model.shapes) == math.ceil(21 / batch_size)
    for batch_size, bpb in results.items():
        assert bpb == pytest.approx(expected, rel=1e-6), batch_size


class WrongOutputModel(LogitsModel):
    def __init__(self, vocab_size, output):
        super().__init__(vocab_size)
        self.output = output

    def forward(self, x, targets=None):
        logits = super().forward(x)
        return {"loss": lambda: logits.mean(), "tuple": lambda: (logits, None),
                "short_vocab": lambda: logits[..., :-1], "flat": lambda: logits.flatten(0, 1)}[self.output]()


@pytest.mark.parametrize("output", ["loss", "tuple", "short_vocab", "flat"])
def test_evaluate_bpb_says_what_model_x_must_return(small_eval, tokenizer, output):
    """An edited forward that returns a loss, a tuple or logits of the wrong shape for model(x)
    stops the evaluation with a one-line cause, not a traceback deep in the cross entropy. A
    vocabulary padded beyond the tokenizer's (the extra ids never targets) is scored as usual."""
    V = tokenizer.get_vocab_size()
    with pytest.raises(prepare.PrepareError) as info:
        prepare.evaluate_bpb(WrongOutputModel(V, output), tokenizer, 8)
    message = str(info.value.code)
    assert message.startswith("error: evaluate_bpb: model(x) must return logits (B, T, V)") and "\n" not in message
    assert f"V >= the vocabulary's {V}" in message and "for x of shape (8, 64)" in message, message
    x, y, token_bytes = small_eval
    padded = LogitsModel(V + 64)
    with torch.no_grad():
        expected = expected_bpb(padded(x), y, token_bytes)
    assert prepare.evaluate_bpb(padded, tokenizer, 8) == pytest.approx(expected, rel=1e-6)


def test_evaluate_bpb_is_the_harness_own_cross_entropy(small_eval, tokenizer):
    """Two models with the same logits and different training losses (plain, with a z-loss, with
    label smoothing) score the same val_bpb: the metric never reads the training loss. Scoring the
    logits a row at a time (as memory may need) gives the same value."""
    x, y, token_bytes = small_eval
    V = tokenizer.get_vocab_size()
    z_loss = lambda logits: 1e-2 * torch.logsumexp(logits, -1).square().mean()  # noqa: E731
    smoothing = lambda logits: 0.1 * -torch.log_softmax(logits, -1).mean()  # noqa: E731
    models = [LogitsModel(V), LogitsModel(V, extra=z_loss), LogitsModel(V, extra=smoothing)]
    with torch.no_grad():
        assert len({float(m(x, y)) for m in models}) == 3, "the training losses should differ"
        expected = expected_bpb(models[0](x), y, token_bytes)
    scores = [prepare.evaluate_bpb(m, tokenizer, 8) for m in models]
    assert scores[0] == scores[1] == scores[2], scores
    assert scores[0] == pytest.approx(expected, rel=1e-6)
    prepare_piece = prepare.EVAL_PIECE
    try:
        prepare.EVAL_PIECE = 1  # one row of logits at a time
        assert prepare.evaluate_bpb(models[0], tokenizer, 8) == pytest.approx(scores[0], rel=1e-6)
    finally:
        prepare.EVAL_PIECE = prepare_piece


# ---------------------------------------------------------------------------------------------
# What a user sees: `python prepare.py` as a subprocess, with AUTORESEARCH_CACHE_DIR and
# AUTORESEARCH_DATA_URL. Each run pays the torch import (3-4 s here, whatever the parallelism),
# so there are few of them: the `runs` fixture starts every scenario up front, two at a time, and
# the tests below check one scenario each.

CLI_SUBPROCESS_CASES = ["num-shards -5", "download-workers x"]

# The unreachable case runs main() with the retry delays shortened, so that the test is fast (the
# real backoff is 1+2+4+8 s for the shards in flight); everything else is `python prepare.py`.
FAST_RETRY_MAIN = ("import sys, prepare; prepare.RETRY_BASE_DELAY = 0.01; sys.argv[0] = 'prepare.py'; "
                   "prepare.main(sys.argv[1:])")

IMPORT_CHECK = """
import socket
def no_network(*a, **k): raise RuntimeError('network used at import')
socket.socket.connect = socket.socket.connect_ex = no_network
socket.getaddrinfo = socket.create_connection = no_network
import prepare, torch
assert not torch.cuda.is_initialized()
print('imported', prepare.VOCAB_SIZE, prepare.MAX_SEQ_LEN)
"""


def timed_run(argv, cache, url):
    t0 = time.time()
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, env=subprocess_env(cache, url),
                       capture_output=True, text=True, timeout=120)
    return {"p": p, "seconds": time.time() - t0, "cache": cache, "url": url}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """scenario name -> dict(p=CompletedProcess, seconds, cache, url, ...)."""
    root = tmp_path_factory.mktemp("runs")
    jobs = {}
    servers = []

    # happy path: a file:// mirror (its folder name has a space), then an http:// one with one more
    # shard, into a relocated cache
    folder = make_mirror_folder(root / "a mirror", n_train=3)
    http = Mirror(folder)
    servers.append(http)

    def happy():
        cache = root / "relocated cache"
        first = timed_run(["prepare.py", "--num-shards", "1", "--download-workers", "2"], cache, folder.as_uri())
        first["hits"] = dict(http.hits)
        first["tokenizer.json"] = (cache / "tokenizer" / "tokenizer.json").read_bytes() \
            if (cache / "tokenizer" / "tokenizer.json").exists() else None
        second = timed_run(["prepare.py", "--num-shards", "2", "--download-workers", "2"], cache, http.url)
        second["hits"] = dict(http.hits)
        return {"first": first, "second": second, "mirror": folder}

    jobs["happy"] = happy

    val_404 = Mirror(make_mirror_folder(root / "mirror", n_train=2))
    val_404.always[VAL] = "404"
    servers.append(val_404)

    def missing_val():
        out = timed_run(["prepare.py", "--num-shards", "2", "--download-workers", "2"], root / "c1", val_404.url)
        out["hits"] = dict(val_404.hits)
        return out

    jobs["missing val"] = missing_val

    jobs["unreachable"] = lambda: timed_run(["-c", FAST_RETRY_MAIN, "--num-shards", "4", "--download-workers", "2"],
                                            root / "c3", closed_port_url())
    jobs["import"] = lambda: timed_run(["-c", IMPORT_CHECK], root / "not created", closed_port_url())

    def cache_is_a_file():
        (root / "cache file").write_text("not a folder")
        return timed_run(["prepare.py"], root / "cache file", closed_port_url())

    jobs["cache is a file"] = cache_is_a_file
    for case in CLI_SUBPROCESS_CASES:
        args = CLI_CASES[case][0]
        jobs[f"cli {case}"] = lambda args=args: timed_run(["prepare.py", *args], root / "cli cache", closed_port_url())

    try:
        with ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(job) for name, job in jobs.items()}
            return {name: fut.result() for name, fut in futures.items()}
    finally:
        for server in servers:
            server.close()


def test_file_then_http_mirror_and_cache_dir_from_env(runs):
    first, second, mirror = runs["happy"]["first"], runs["happy"]["second"], runs["happy"]["mirror"]
    cache = first["cache"]
    data = cache / "data"
    # 1) file:// mirror: shard 0 and the validation shard land in the relocated cache, the
    #    tokenizer is trained (VOCAB_SIZE is the target; toy data runs out of merges sooner)
    p = first["p"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"Cache: {cache}" in p.stdout
    assert "1/1 training shards and the validation shard ready" in p.stdout
    assert first["hits"] == {}  # the HTTP server was not involved
    assert first["tokenizer.json"] is not None
    # 2) http:// mirror, one more shard: only the new shard is fetched; the tokenizer, trained
    #    from shard 0 alone, is trained again from both (it trains from the first 10), saying why
    p = second["p"]
    assert p.returncode == 0, p.stdout + p.stderr
    assert second["url"] in p.stdout
    assert second["hits"] == {"shard_00001.parquet": 1}
    assert "2/2 training shards and the validation shard ready" in p.stdout
    assert json.loads(first["tokenizer.json"])["trained_from"]["shards"] == ["shard_00000.parquet"]
    assert "Tokenizer: training from shard_00000.parquet .. shard_00001.parquet (2 shards): " \
           "the one there was trained from shard_00000.parquet" in p.stdout
    assert json.loads((cache / "tokenizer" / "tokenizer.json").read_text())["trained_from"] == \
        {"shards": ["shard_00000.parquet", "shard_00001.parquet"], "vocab_size": prepare.VOCAB_SIZE,
         "max_chars": prepare.TOKENIZER_MAX_CHARS, "doc_chars": prepare.TOKENIZER_DOC_CHARS}
    names = sorted(os.listdir(data))
    assert names == ["shard_00000.parquet", "shard_00001.parquet", VAL]  # shard 2 was not asked for
    for name in names:
        prepare.verify_shard(str(data / name))
        assert (data / name).read_bytes() == (mirror / name).read_bytes()
    tok = prepare.Tokenizer.from_directory(str(cache / "tokenizer"))
    assert 256 + 4 < tok.get_vocab_size() <= prepare.VOCAB_SIZE
    assert tok.decode(tok.encode("héllo 日本 🚀 42")) == "héllo 日本 🚀 42"


@pytest.mark.parametrize("case", CLI_SUBPROCESS_CASES)
def test_cli_rejects_bad_value_subprocess(runs, case):
    run = runs[f"cli {case}"]
    args, flag = CLI_CASES[case]
    assert_clean_failure(run["p"], flag, args[1])
    assert run["p"].stdout == ""  # rejected before any work
    assert not (run["cache"] / "data").exists()


def test_missing_validation_shard_exits_nonzero(runs):
    run = runs["missing val"]
    assert_clean_failure(run["p"], VAL, "validation", "AUTORESEARCH_DATA_URL")
    assert run["hits"][VAL] == 1  # a 404 is final
    assert f"missing {VAL}" in run["p"].stdout
    assert "Done" not in run["p"].stdout
    # the tokenizer needs only training shards: it was trained from both
    assert json.loads((run["cache"] / "tokenizer" / "tokenizer.json").read_text())["trained_from"]["shards"] == \
        ["shard_00000.parquet", "shard_00001.parquet"]


def test_cache_that_is_a_file_refused_in_one_line(runs):
    run = runs["cache is a file"]
    assert_clean_failure(run["p"], f"{run['cache']} is a file, not a folder", "AUTORESEARCH_CACHE_DIR")
    assert "prepare.py` first" not in run["p"].stdout + run["p"].stderr


def test_unreachable_mirror_one_message(runs):
    run = runs["unreachable"]
    cause = assert_clean_failure(run["p"], "AUTORESEARCH_DATA_URL", run["url"])
    assert "could not reach" in cause
    assert "missing shard" not in run["p"].stdout  # one message, not one per shard
    assert run["seconds"] < 30
    assert os.listdir(run["cache"] / "data") == []


def test_import_needs_no_gpu_network_or_disk(runs):
    run = runs["import"]
    assert run["p"].returncode == 0, run["p"].stderr
    assert run["p"].stdout.strip() == "imported 8192 2048"
    assert run["seconds"] < 30
    assert not run["cache"].exists()  # importing creates no cache folder


# ---------------------------------------------------------------------------------------------
# Signals sent to a real `prepare.py`: one Ctrl-C stops it; the next run cleans up after a kill


def wait_for(condition, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def signalled(tmp_path_factory):
    """Two `prepare.py --num-shards 20 --download-workers 2`, each against its own mirror that
    sends half of each shard and stalls. Once both transfers of each are in flight (the
    validation shard's and shard 0's temporary files on disk), one gets SIGINT, and half a
    second later its mirror sends the rest of the validation shard, but never of shard 0; the
    other gets SIGKILL."""
    root = tmp_path_factory.mktemp("signals")
    folder = make_mirror_folder(root / "mirror", n_train=3)
    mirrors = {how: Mirror(folder) for how in ("int", "kill")}
    procs = {}
    try:
        for how, mirror in mirrors.items():
            mirror.always.update({name: "stall" for name in os.listdir(folder)})
            mirror.always["shard_00000.parquet"] = "hang"
            procs[how] = subprocess.Popen(
                [sys.executable, "prepare.py", "--num-shards", "20", "--download-workers", "2"], cwd=ROOT,
                env=subprocess_env(root / how, mirror.url), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for how in procs:
            data = root / how / "data"
            wait_for(lambda: data.is_dir() and len(leftovers(data)) == 2)
        p, mirror = procs["int"], mirrors["int"]
        hits = sum(mirror.hits.values())
        t0 = time.time()
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        mirror.release.set()  # that transfer could go on now, and new ones start: they must not
        stdout, stderr = p.communicate(timeout=30)
        interrupted = {"returncode": p.returncode, "stdout": stdout, "stderr": stderr, "seconds": time.time() - t0,
                       "hits before": hits, "hits after": sum(mirror.hits.values()), "data": root / "int" / "data"}
        procs["kill"].kill()
        procs["kill"].communicate(timeout=30)
        killed = {"cache": root / "kill", "left": leftovers(root / "kill" / "data"), "mirror": folder}
        return {"int": interrupted, "kill": killed}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
        for mirror in mirrors.values():
            mirror.close()


def test_one_ctrl_c_stops_prepare(signalled):
    run = signalled["int"]
    assert run["returncode"] == 130, run
    assert run["seconds"] < 5, run
    assert "Traceback" not in run["stderr"]
    lines = [line for line in run["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), run["stderr"]
    assert run["hits before"] == run["hits after"] == 2  # the two in flight, and no new request
    assert leftovers(run["data"]) == []  # the one that went on, and the one still stuck in the network
    assert "Done" not in run["stdout"]


def test_next_run_removes_a_killed_runs_temporary_files(signalled, cli):
    run = signalled["kill"]
    assert sorted(name.split(".tmp.")[0] for name in run["left"]) == ["shard_00000.parquet", VAL], run["left"]
    cli.cache = run["cache"]
    code, out = cli(run["mirror"].as_uri(), "--num-shards", "1")
    assert code is None, code
    assert "Cache: removed 2 temporary files left by an interrupted run" in out
    assert sorted(os.listdir(run["cache"] / "data")) == ["shard_00000.parquet", VAL]

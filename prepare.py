"""
prepare.py: the fixed harness of autoresearch. Nobody edits this file, the agent included.

It holds the constants every experiment shares, the one-time data preparation (download the
climbmix shards, train the BPE tokenizer) and the runtime that train.py imports:

    MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS, ...   the fixed constants
    Tokenizer.from_directory()                   the trained tokenizer (checked on load)
    make_dataloader(tokenizer, B, T, split)      packed (inputs, targets, epoch) batches, endless
    evaluate_bpb(model, tokenizer, batch_size)   the metric: bits per byte of the logits model(x)
                                                 returns, with the harness's own cross entropy
    default_device()                             cuda, then mps, then cpu
    setup_attention(device, seq_len, windows)    FA3 (pinned hub revision) or PyTorch attention;
                                                 returns the startup line saying which, and why
    attention(q, k, v, window)                   causal attention over (B, T, H, D), a query
                                                 seeing itself and the `window` tokens before it
    compiled(fn, **kwargs)                       torch.compile on CUDA with the harness's compiler
                                                 settings, fn itself elsewhere; also a decorator
    mfu_percent(flops_per_second, device)        MFU against the GPU's peak bf16 FLOP/s, or None
    peak_memory_mb(device)                       peak memory allocated, 0 where not counted

Importing it also turns on faulthandler, so that a fatal signal prints its name and stack.

Usage:
    uv run prepare.py                        # 10 training shards + the validation shard, tokenizer
    uv run prepare.py --num-shards -1        # every training shard (6542 of them)
    uv run prepare.py --download-workers 16  # more parallel downloads

A shard counts only once every row group of it reads; damaged ones in the cache are fetched
again. When shards are still missing after the retries, it names them and exits with status 1;
the good ones are kept, and a second run fetches the rest. Ctrl-C stops it within seconds
(status 130); temporary files left by a killed run are removed by the next one.

The tokenizer trains from a fixed set: the first 10 training shards (shard_00000 .. shard_00009,
the default download; the first N when --num-shards N is smaller), at most 1e9 characters of
them, and only once all of those are here. Downloading more shards later keeps it. tokenizer.json
records what it was trained from (shards, vocabulary size, character caps) beside its split
pattern; a tokenizer trained from fewer of those shards or otherwise is trained again, with a
line saying why.

Environment:
    AUTORESEARCH_CACHE_DIR  where data/ and tokenizer/ live (default ~/.cache/autoresearch)
    AUTORESEARCH_DATA_URL   base URL of the shards, for mirrors and offline clusters:
                            http(s)://host/path, or a folder holding the shard_XXXXX.parquet
                            files: file:///a/folder or /a/folder
"""

import argparse
import atexit
import base64
import bisect
import contextlib
import ctypes
import errno
import faulthandler
import itertools
import json
import math
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from multiprocessing.pool import ThreadPool
from urllib.parse import quote, unquote, urlparse

import numpy as np
import pyarrow.parquet as pq
import requests
import tiktoken
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

# a fatal signal (SIGSEGV, SIGFPE, SIGABRT, ...) prints its name and the Python stack of the thread
# that got it, the last lines of the log (the other threads' stacks would bury the cause)
faulthandler.enable(all_threads=False)

# ---------------------------------------------------------------------------------------------
# Constants (fixed: their names are part of the interface)

MAX_SEQ_LEN = 2048           # context length of every row the model sees
TIME_BUDGET = 300            # seconds of training per experiment
EVAL_TOKENS = 40 * 524288    # tokens of the validation stream scored by evaluate_bpb
VOCAB_SIZE = 8192            # including the special tokens
SPECIAL_TOKENS = [f"<|reserved_{i}|>" for i in range(4)]
BOS_TOKEN = SPECIAL_TOKENS[0]
# GPT-4's pre-tokenizer, with digits grouped by 1-2 instead of 1-3
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

CACHE_DIR = os.environ.get("AUTORESEARCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
DEFAULT_DATA_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
DATA_URL = os.environ.get("AUTORESEARCH_DATA_URL") or DEFAULT_DATA_URL
MAX_SHARD = 6542             # shards are shard_00000 ... shard_06542
VAL_SHARD = MAX_SHARD        # pinned validation shard, never trained on
VAL_FILENAME = f"shard_{VAL_SHARD:05d}.parquet"

DOWNLOAD_ATTEMPTS = 5        # per shard; waits 1, 2, 4, 8 s between attempts
RETRY_BASE_DELAY = 1.0
MISSING_SHOWN = 5            # missing shards named one by one; beyond, a count
STALE_TEMP_SECONDS = 3600    # a temporary file of another host untouched this long is a killed run's
TOKENIZER_SHARDS = 10        # the tokenizer trains from the first 10 training shards
TOKENIZER_MAX_CHARS = 1_000_000_000
TOKENIZER_DOC_CHARS = 10_000
DOC_BUFFER = 1000            # documents buffered for best-fit packing
TASK_DOCS = 128              # documents per batch: one worker's tokenizing task, one refill of the buffer
LOADER_WORKERS_MAX = 8       # tokenizing processes per dataloader: several times what training consumes
COMPILE_WORKERS_MAX = 16     # inductor's compile processes per run: 8 runs fit a host of 128 cores


class PrepareError(SystemExit):
    """A one-line, user-facing failure: printed without a traceback, exit status 1."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Download

HOST = socket.gethostname().replace(".", "-")  # in temporary file names: whose they are


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def verify_shard(path):
    """Raise ValueError unless `path` is a whole shard: a parquet file with rows and a string
    `text` column, every row group of which decodes, as valid UTF-8 and with no null document."""
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)  # checksums, where the writer wrote them
    except Exception as e:  # pyarrow raises several types for truncated or corrupt files
        raise ValueError(f"not a readable parquet file ({first_line(e)})") from None
    field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
    if field is None or str(field.type) not in ("string", "large_string"):
        raise ValueError("no string column 'text'")
    if pf.metadata.num_rows == 0:
        raise ValueError("no rows")
    for rg in range(pf.num_row_groups):  # all of the data, not just the footer
        try:
            texts = pf.read_row_group(rg, columns=["text"]).column("text")
            texts.validate(full=True)
        except Exception as e:
            raise ValueError(f"row group {rg} of {pf.num_row_groups} does not read ({first_line(e)})") from None
        if texts.null_count:
            raise ValueError(f"row group {rg} has {texts.null_count} null documents")


def row_group_texts(paths):
    """The `text` column of every row group of the shards `paths`, in order; each file is opened
    when its turn comes. A file that no longer reads raises PrepareError naming it."""
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise damaged_shard(path, e) from None
        for rg in range(pf.num_row_groups):
            try:
                texts = pf.read_row_group(rg, columns=["text"]).column("text")
            except Exception as e:
                raise damaged_shard(path, e, rg) from None
            yield texts


def damaged_shard(path, e, rg=None):
    where = "" if rg is None else f"row group {rg}: "
    return PrepareError(f"cannot read {path} ({where}{first_line(e)}): the file is damaged; run "
                        "`uv run prepare.py` again, with the same --num-shards, to fetch it anew")


class Unreachable(Exception):
    """The mirror could not be contacted at all (DNS, refused connection, timeout)."""


def check_data_url(url):
    """The shards' base URL, checked before any download: http(s)://host/..., file:///folder, or
    the path of an existing folder (taken as file://). PrepareError in one line otherwise."""
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https") and parsed.netloc:
        return url
    if parsed.scheme == "file":
        if not os.path.isdir(unquote(parsed.path)):
            raise PrepareError(f"AUTORESEARCH_DATA_URL={url}: there is no folder {unquote(parsed.path)}")
        return url
    if "://" not in url and os.path.isdir(url):
        return "file://" + quote(os.path.abspath(url))
    raise PrepareError(f"AUTORESEARCH_DATA_URL={url} is neither an http://, https:// or file:// URL "
                       "nor an existing folder")


def cache_error(what, e):
    """The one-line PrepareError for a cache that cannot be written (read-only, full, ...)."""
    return PrepareError(f"cannot write {what} ({e.strerror or first_line(e)}): free some space, make it "
                        "writable, or point AUTORESEARCH_CACHE_DIR at another folder")


def check_folder(folder):
    """Create `folder` if needed and check that a file can be written in it."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = temp_name(os.path.join(folder, "probe"))
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as e:
        blocker = folder
        while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
            blocker = os.path.dirname(blocker)
        if os.path.exists(blocker) and not os.path.isdir(blocker):
            raise PrepareError(f"cannot use the cache folder {folder}: {blocker} is a file, not a folder; "
                               "move it, or point AUTORESEARCH_CACHE_DIR at another folder") from None
        raise cache_error(f"to the cache folder {folder}", e) from None


def temp_name(path):
    """A temporary name beside `path`, unique to its writer: host, process, thread and a random
    part. remove_temp_files tells from the host and process whether the writer is gone."""
    return f"{path}.tmp.{HOST}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}"


def process_alive(pid):
    if os.name == "nt":
        return True  # no cheap check there: such files go by their age
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def remove_temp_files(folder, ours=False):
    """Remove the temporary files in `folder` that no writer will finish. With `ours`: this
    process's own (after Ctrl-C). Otherwise those of a process of this host that is gone (killed),
    and any untouched for STALE_TEMP_SECONDS (another host's, or an older prepare.py's).
    Returns how many were removed."""
    removed = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if ".tmp" not in name:
            continue
        path = os.path.join(folder, name)
        fields = name.split(".tmp.", 1)[-1].split(".")
        host, pid = (fields[0], int(fields[1])) if len(fields) == 4 and fields[1].isdigit() else (None, None)
        try:
            if ours:
                stale = (host, pid) == (HOST, os.getpid())
            elif host == HOST:
                stale = not process_alive(pid)
            else:
                stale = time.time() - os.path.getmtime(path) > STALE_TEMP_SECONDS
            if stale:
                os.remove(path)
                removed += 1
        except FileNotFoundError:  # its writer finished or removed it meanwhile
            pass
    return removed


def fetch(url, tmp_path, stop=None):
    """Fetch `url` into `tmp_path`. Raises Unreachable, FileNotFoundError (no retry) or OSError.
    `stop`: an Event; once set, the transfer breaks off at the next chunk."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        src = unquote(parsed.path)
        if not os.path.exists(src):
            raise FileNotFoundError(f"{src} does not exist")
        shutil.copyfile(src, tmp_path)
        return
    try:
        response = requests.get(url, stream=True, timeout=(10, 60))
    except (requests.ConnectionError, requests.Timeout) as e:
        raise Unreachable(str(e).splitlines()[0][:200]) from None
    with response:
        if response.status_code in (401, 403, 404, 410):
            raise FileNotFoundError(f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise OSError(f"HTTP {response.status_code}")
        expected = response.headers.get("Content-Length")
        written = 0
        try:
            with open(tmp_path, "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    if stop is not None and stop.is_set():
                        raise OSError("stopped")
                    f.write(chunk)
                    written += len(chunk)
        except requests.RequestException as e:
            raise OSError(f"download broke off after {written} bytes ({type(e).__name__})") from None
        if expected is not None and written != int(expected):
            raise OSError(f"truncated: {written} of {expected} bytes")


def download_shard(index, data_dir, base_url, give_up=None, stop=None):
    """Make `data_dir/shard_XXXXX.parquet` a verified copy. Returns (status, bytes, damage):
    status 'present' or 'downloaded'; damage, what was wrong with a copy found in the cache and
    fetched again, else None. Raises Unreachable, RuntimeError with the cause, or OSError when the
    cache folder cannot be written. `give_up`: an Event set once the mirror proved unreachable, so
    queued shards fail at once. `stop`: an Event set on Ctrl-C: no new attempt starts, and the
    transfer in flight breaks off."""
    stop = stop or threading.Event()
    path = os.path.join(data_dir, shard_filename(index))
    damage = None
    if os.path.exists(path):
        try:
            verify_shard(path)
            return "present", os.path.getsize(path), None
        except ValueError as e:
            damage = str(e)
            os.remove(path)  # truncated or corrupt: fetch it again
    if give_up is not None and give_up.is_set():
        raise Unreachable("skipped: the mirror was unreachable for another shard")
    url = f"{base_url.rstrip('/')}/{shard_filename(index)}"
    tmp_path = temp_name(path)
    cause = None
    try:
        for attempt in range(DOWNLOAD_ATTEMPTS):
            if stop.is_set() or (attempt and stop.wait(RETRY_BASE_DELAY * 2 ** (attempt - 1))):
                raise RuntimeError(f"{url}: stopped")
            try:
                fetch(url, tmp_path, stop)
                verify_shard(tmp_path)
                os.replace(tmp_path, path)  # atomic: a shard on disk is always complete
                return "downloaded", os.path.getsize(path), damage
            except FileNotFoundError as e:
                raise RuntimeError(f"{url}: {e}") from None
            except Unreachable:
                if attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise
            except OSError as e:
                if e.filename == tmp_path or e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise  # our disk, not the mirror: retrying cannot help
                cause = e
            except ValueError as e:
                cause = e
        raise RuntimeError(f"{url}: {cause} (after {DOWNLOAD_ATTEMPTS} attempts)")
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def download_data(num_shards, workers, data_dir=None, base_url=None):
    """Download `num_shards` training shards (-1 = all) plus the validation shard, in parallel;
    good shards already there are kept. Returns the names of the shards still missing after the
    retries (the first MISSING_SHOWN printed with their cause). Raises PrepareError for an unusable
    URL or cache folder, or a mirror that could not be reached at all. On Ctrl-C no new request
    starts, the transfers in flight break off and their temporary files are removed."""
    data_dir = data_dir or DATA_DIR
    base_url = check_data_url(base_url or DATA_URL)
    check_folder(data_dir)
    n_train = MAX_SHARD if num_shards == -1 else num_shards
    indices = [VAL_SHARD] + list(range(n_train))
    print(f"Data: {n_train} training shards + validation shard {VAL_SHARD} from {base_url}")
    print(f"      into {data_dir} with {workers} workers")
    t0 = time.time()
    done, nbytes, fresh_bytes = 0, 0, 0
    failures = {}
    tty = sys.stdout.isatty()
    last_print = 0.0
    give_up = threading.Event()  # without it, every queued shard would wait out its own retries
    stop = threading.Event()
    todo, results = queue.SimpleQueue(), queue.SimpleQueue()
    for index in indices:
        todo.put(index)

    def work():  # take shards until none is left or the run stops
        while not stop.is_set():
            try:
                index = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.put((index, download_shard(index, data_dir, base_url, give_up, stop)))
            except BaseException as e:  # handed to the main thread
                if isinstance(e, OSError):
                    stop.set()  # the cache folder cannot be written: no other shard can be saved
                results.put((index, e))

    # daemon threads: a transfer stuck in the network cannot hold up the exit after Ctrl-C
    threads = [threading.Thread(target=work, daemon=True) for _ in range(min(workers, len(indices)))]
    for thread in threads:
        thread.start()
    try:
        for _ in indices:
            index, result = results.get()
            if isinstance(result, Unreachable):
                failures[index] = ("unreachable", str(result))
                give_up.set()
            elif isinstance(result, RuntimeError):
                failures[index] = ("failed", str(result))
            elif isinstance(result, OSError):
                raise cache_error(f"to the cache folder {data_dir}", result)
            elif isinstance(result, BaseException):
                raise result
            else:
                status, size, damage = result
                done += 1
                nbytes += size
                fresh_bytes += size if status == "downloaded" else 0
                if damage:
                    note = f"  {shard_filename(index)} in the cache was damaged ({damage}): fetched again"
                    print(("\r" if tty else "") + note)
            now = time.time()
            finished = done + len(failures) == len(indices)
            if tty or finished or now - last_print >= 5:
                rate = fresh_bytes / 1e6 / max(now - t0, 1e-6)
                line = f"  shards {done}/{len(indices)}  {nbytes / 1e6:.1f} MB  {rate:.1f} MB/s"
                line += f"  failed {len(failures)}" if failures else ""
                print(f"\r{line}", end="\n" if finished or not tty else "", flush=True)
                last_print = now
    except BaseException:  # Ctrl-C, or a cache folder that cannot be written: stop every transfer
        stop.set()
        if tty:
            print(flush=True)  # end the progress line
        try:
            deadline = time.time() + 2
            for thread in threads:
                thread.join(max(deadline - time.time(), 0))
        finally:
            remove_temp_files(data_dir, ours=True)  # those of transfers still stuck in the network
        raise
    if failures and all(kind == "unreachable" for kind, _ in failures.values()) and done == 0:
        raise PrepareError(
            f"could not reach {base_url} ({next(iter(failures.values()))[1]}). Check the network, or point "
            "AUTORESEARCH_DATA_URL at a mirror: an http(s):// URL or a file:// folder holding the same "
            "shard_XXXXX.parquet files."
        )
    missing = sorted(failures)
    for index in missing[:MISSING_SHOWN]:
        print(f"  missing {shard_filename(index)}: {failures[index][1]}")
    if len(missing) > MISSING_SHOWN:
        print(f"  ... and {len(missing) - MISSING_SHOWN} more shards missing")
    n_ready = sum(1 for i in range(n_train) if i not in failures)
    val = "no" if VAL_SHARD in failures else "the"
    print(f"Data: {n_ready}/{n_train} training shards and {val} validation shard ready "
          f"({nbytes / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return [shard_filename(i) for i in missing]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def text_iterator(paths, max_chars=TOKENIZER_MAX_CHARS, doc_chars=TOKENIZER_DOC_CHARS):
    """Documents of the training shards, each cut to `doc_chars`, `max_chars` in all."""
    total = 0
    for texts in row_group_texts(paths):
        for text in texts.to_pylist():
            doc = text[:doc_chars]
            if total + len(doc) > max_chars:
                doc = doc[: max_chars - total]
            if doc:
                yield doc
            total += len(doc)
            if total >= max_chars:
                return


def tokenizer_shards(n_train):
    """Names of the shards the tokenizer trains from: the first TOKENIZER_SHARDS training shards,
    or the first `n_train` when fewer are downloaded."""
    return [shard_filename(i) for i in range(min(n_train, TOKENIZER_SHARDS))]


def shard_span(names):
    if len(names) <= 1:
        return names[0] if names else "no shard"
    return f"{names[0]} .. {names[-1]} ({len(names)} shards)"


def train_tokenizer(paths, tokenizer_dir=None, vocab_size=VOCAB_SIZE):
    """Train the byte-level BPE on `paths`, save it as plain data with a record of what it was
    trained from, check a round trip."""
    import rustbpe  # only needed here, never at training time

    tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(text_iterator(paths), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    trained_from = {"shards": [os.path.basename(p) for p in paths], "vocab_size": vocab_size,
                    "max_chars": TOKENIZER_MAX_CHARS, "doc_chars": TOKENIZER_DOC_CHARS}
    try:
        save_tokenizer(ranks, bpe.get_pattern(), tokenizer_dir, trained_from)
    except OSError as e:
        raise cache_error(f"the tokenizer to {tokenizer_dir}", e) from None
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    for sample in ["Hello, world!", "1234567890 3.14159", "日本語のテキスト", "emoji 🚀🎉 ok", "  tabs\tand\nnewlines\r\n"]:
        if tokenizer.decode(tokenizer.encode(sample)) != sample:
            raise PrepareError(f"tokenizer round trip failed on {sample!r}")
    print(f"Tokenizer: {tokenizer.get_vocab_size()} tokens trained in {time.time() - t0:.1f}s, saved to {tokenizer_dir}")
    return tokenizer


def save_tokenizer(ranks, pattern, tokenizer_dir, trained_from):
    """Plain data, no pickle, in one file, tokenizer.json: the pattern, the special tokens, the
    base64 ranks, token_bytes (UTF-8 bytes of each token, 0 for the special tokens) and
    `trained_from` (shard names, vocab_size, the character caps). Written under a name of its own,
    then renamed: a reader sees the previous file or the new one, whole, never a part or a mix."""
    os.makedirs(tokenizer_dir, exist_ok=True)
    n = len(ranks)
    ordered = [tok for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    meta = {
        "pattern": pattern,
        "special_tokens": {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)},
        "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok in ordered],
        "token_bytes": [len(tok) for tok in ordered] + [0] * len(SPECIAL_TOKENS),
        "trained_from": trained_from,
    }
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    tmp_path = temp_name(path)
    try:
        with open(tmp_path, "w") as f:
            json.dump(meta, f)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(tokenizer_dir, "token_bytes.npy"))  # an older prepare.py's second file


def read_tokenizer(tokenizer_dir):
    """(meta, tiktoken.Encoding) from `tokenizer_dir`/tokenizer.json, checked: token_bytes must
    match the ranks, the record of what it was trained from must be there, the pattern must be
    SPLIT_PATTERN. Raises FileNotFoundError, OSError, or ValueError saying what is wrong."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb") as f:
        data = f.read()
    try:
        meta = json.loads(data)
        ranks = {base64.b64decode(tok, validate=True): rank for rank, tok in enumerate(meta["mergeable_ranks"])}
        enc = tiktoken.Encoding("autoresearch", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                special_tokens=meta["special_tokens"])
        special_ids = sorted(meta["special_tokens"][tok] for tok in SPECIAL_TOKENS)
        token_bytes = [int(n) for n in meta["token_bytes"]]
    except Exception as e:
        raise ValueError(f"damaged ({type(e).__name__})") from None
    if sorted(meta["special_tokens"]) != sorted(SPECIAL_TOKENS) or special_ids != list(range(len(ranks), enc.n_vocab)):
        raise ValueError("damaged (its special tokens are not the ids after the ordinary ones)")
    expected = [len(tok) for tok in ranks] + [0] * len(SPECIAL_TOKENS)  # evaluate_bpb's byte counts
    if len(token_bytes) != len(expected):
        raise ValueError(f"damaged (token_bytes has {len(token_bytes)} entries for {len(expected)} tokens)")
    wrong = [i for i, (got, want) in enumerate(zip(token_bytes, expected)) if got != want]
    if wrong:
        raise ValueError(f"damaged (token_bytes disagrees with the vocabulary on {len(wrong)} token(s), "
                         f"the first token {wrong[0]}: {token_bytes[wrong[0]]} bytes, not {expected[wrong[0]]})")
    if not isinstance(meta.get("trained_from"), dict):
        raise ValueError("from an older prepare.py, with no record of what it was trained from")
    if meta["pattern"] != SPLIT_PATTERN:
        raise ValueError("trained with another split pattern")
    return meta, enc


def tokenizer_problem(tokenizer_dir, shards):
    """Why the tokenizer in `tokenizer_dir` must be trained (again) from `shards` (names), or None
    to keep it. It is kept when trained for VOCAB_SIZE with today's character caps from the first
    k of the tokenizer's shards, k >= len(shards): a run with more shards, or fewer, keeps it."""
    try:
        meta, _ = read_tokenizer(tokenizer_dir)
    except FileNotFoundError:
        return "there is none yet"
    except OSError as e:
        return f"the one there cannot be read ({e.strerror})"
    except ValueError as e:
        return f"the one there is {e}"
    got = meta["trained_from"]
    for key, want in (("vocab_size", VOCAB_SIZE), ("max_chars", TOKENIZER_MAX_CHARS), ("doc_chars", TOKENIZER_DOC_CHARS)):
        if got.get(key) != want:
            return f"the one there was trained with {key} {got.get(key)}, not {want}"
    had = got.get("shards") or []
    if had != tokenizer_shards(len(had)) or len(had) < len(shards):
        return f"the one there was trained from {shard_span(had)}"
    return None


class Tokenizer:
    """BPE tokenizer: tiktoken rebuilt from the plain data that prepare.py wrote."""

    def __init__(self, enc, token_bytes, trained_from):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)
        self.token_bytes = token_bytes  # UTF-8 bytes of each token id, 0 for the special tokens
        self.trained_from = trained_from

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
        try:
            meta, enc = read_tokenizer(tokenizer_dir)
        except FileNotFoundError:
            raise PrepareError(f"no tokenizer in {tokenizer_dir} {missing_cache_hint()}") from None
        except OSError as e:
            raise PrepareError(f"cannot read the tokenizer in {tokenizer_dir} ({e.strerror})") from None
        except ValueError as e:
            raise PrepareError(f"the tokenizer in {tokenizer_dir} is {e}: run `uv run prepare.py` to rebuild it") from None
        return cls(enc, meta["token_bytes"], meta["trained_from"])

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def encode(self, text, prepend=None, num_threads=8):
        """str -> list of ids; list of str -> list of lists. `prepend`: an id or special token."""
        if isinstance(prepend, str):
            prepend = self.enc.encode_single_token(prepend)
        head = [] if prepend is None else [prepend]
        if isinstance(text, str):
            return head + self.enc.encode_ordinary(text)
        return [head + ids for ids in self.enc.encode_ordinary_batch(text, num_threads=num_threads)]

    def decode(self, ids):
        return self.enc.decode(ids)


def get_token_bytes(device="cpu", tokenizer_dir=None):
    """(vocab,) int64 tensor: UTF-8 bytes of each token, 0 for special tokens."""
    return torch.tensor(Tokenizer.from_directory(tokenizer_dir).token_bytes, dtype=torch.int64, device=device)


def missing_cache_hint():
    """The end of a message about a missing tokenizer or missing shards: where the folder came from
    and the two fixes (a shell without AUTORESEARCH_CACHE_DIR looks in the default cache)."""
    cache = os.environ.get("AUTORESEARCH_CACHE_DIR")
    origin = f"AUTORESEARCH_CACHE_DIR={cache}" if cache else \
        "AUTORESEARCH_CACHE_DIR is unset, so the default ~/.cache/autoresearch is used"
    return f"({origin}): run `uv run prepare.py`, or set AUTORESEARCH_CACHE_DIR to the cache prepare.py filled"


# ---------------------------------------------------------------------------------------------
# Dataloader


def default_device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def list_shards(split, data_dir=None):
    data_dir = data_dir or DATA_DIR
    names = sorted(n for n in os.listdir(data_dir) if n.startswith("shard_") and n.endswith(".parquet")) \
        if os.path.isdir(data_dir) else []
    names = [n for n in names if n != VAL_FILENAME] if split == "train" else [n for n in names if n == VAL_FILENAME]
    if not names:
        what = "training shards" if split == "train" else f"validation shard {VAL_FILENAME}"
        raise PrepareError(f"no {what} in {data_dir} {missing_cache_hint()}")
    return [os.path.join(data_dir, n) for n in names]


def cpu_share():
    """CPUs this process may run on: its affinity mask (`taskset`, a cgroup's cpuset), else all of
    the machine's. Runs side by side on one host each get their share by being pinned apart."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers():
    """A dataloader's tokenizing processes: the CPU share less one for the main process, at most
    LOADER_WORKERS_MAX, at least one."""
    return max(1, min(cpu_share() - 1, LOADER_WORKERS_MAX))


def compile_workers():
    """inductor's compile processes for a run (`torch._inductor.config.compile_threads`): the whole
    CPU share, at most COMPILE_WORKERS_MAX. They work during the cold start, while the loader's
    workers wait on a full queue."""
    return min(cpu_share(), COMPILE_WORKERS_MAX)


def check_val_shard(data_dir=None):
    """The final evaluation reads the validation shard: fail before training, not after it, when
    the shard is missing or does not read whole."""
    path = list_shards("val", data_dir)[0]
    try:
        verify_shard(path)
    except ValueError as e:
        raise PrepareError(f"the validation shard {path} is unreadable ({e}): run `uv run prepare.py` "
                           "to fetch it again") from None


_worker_encoding = None  # each tokenizer worker's tiktoken.Encoding


def _init_worker(encoding, parent_pid=None):
    """Set up a tokenizer worker (a thread, or a process forked by `parent_pid`). A worker process
    must never print over the cause of a crash: it leaves Ctrl-C to the training process and dies
    with it; in the moment before, a result sent to the dead process kills it quietly (SIGPIPE)
    instead of printing a BrokenPipeError traceback."""
    global _worker_encoding
    _worker_encoding = encoding
    if parent_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        die_with_parent(parent_pid)


def die_with_parent(parent_pid):
    """Linux: have the kernel SIGKILL this process when the thread that forked it ends (the
    dataloader's thread, or the whole training process when it dies), and exit now when the parent
    is already gone."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(0)


def encode_documents(texts):
    """In a worker: tokenize a list of documents. Returns (all tokens, lengths)."""
    docs = [_worker_encoding.encode_to_numpy(t, disallowed_special=()) for t in texts]
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    return (np.concatenate(docs) if docs else np.empty(0, np.uint32)), lengths


def document_batches(tokenizer, split, num_workers):
    """Endless stream of (documents, epoch), in file order: each batch is a list of uint32 token
    arrays, a slice of at most TASK_DOCS documents of one row group. Row groups are read here and
    their slices tokenized by worker processes (forked, on Linux; threads elsewhere), a bounded
    number ahead of the consumer; their results are taken in order. Small slices keep every worker
    busy from the first batch on."""
    paths = list_shards(split)
    forked = sys.platform == "linux"
    make_pool = multiprocessing.get_context("fork").Pool if forked else ThreadPool
    init_args = (tokenizer.enc, os.getpid()) if forked else (tokenizer.enc,)
    with make_pool(num_workers, initializer=_init_worker, initargs=init_args) as pool:
        pending = deque()
        try:
            for epoch in itertools.count(1):
                for texts in row_group_texts(paths):  # each file opened once an epoch, when its turn comes
                    for start in range(0, len(texts), TASK_DOCS):
                        task = texts[start:start + TASK_DOCS].to_pylist()
                        pending.append((pool.apply_async(encode_documents, (task,)), epoch))
                    while len(pending) >= 2 * num_workers:
                        result, ep = pending.popleft()
                        tokens, lengths = result.get()
                        yield np.split(tokens, np.cumsum(lengths)[:-1]), ep
        finally:  # the pool's shutdown deadlocks on a worker still sending a result: let them finish
            deadline = time.time() + 10
            for result, _ in pending:
                result.wait(max(deadline - time.time(), 0))


def pack_rows(batches, B, T, bos):
    """Endless stream of ((B, T+1) int64 arrays, epoch). Every row starts with BOS and is 100%
    real tokens: each document (BOS + its tokens) goes best-fit into the row (the largest buffered
    document that fits what is left); when none fits, the shortest one is cropped to fill the row.
    Whenever fewer than DOC_BUFFER documents wait, a whole batch comes in, as in the original:
    refilled one document at a time, the buffer silts up with documents longer than a row, and
    more text is cropped away (32% instead of 18% where a fifth of the documents exceed a row).
    The buffer is a sorted list of lengths plus a FIFO per length, so each choice is a bisect."""
    row_len = T + 1
    lengths = []  # sorted lengths (BOS included) of the buffered documents
    by_length = {}  # length -> deque of token arrays
    epoch = 1
    while True:
        batch = np.empty((B, row_len), dtype=np.int64)
        for row in batch:
            pos = 0
            while pos < row_len:
                while len(lengths) < DOC_BUFFER:
                    docs, epoch = next(batches)
                    for doc in docs:
                        n = len(doc) + 1
                        bisect.insort(lengths, n)
                        by_length.setdefault(n, deque()).append(doc)
                space = row_len - pos
                i = bisect.bisect_right(lengths, space) - 1
                n = lengths.pop(i if i >= 0 else 0)  # best fit, else the shortest (cropped)
                doc = by_length[n].popleft()
                take = min(n, space)
                row[pos] = bos
                row[pos + 1:pos + take] = doc[:take - 1]
                pos += take
        yield batch, epoch


_PRODUCERS = set()  # (stop event, thread) of each open dataloader's background thread


def stop_producers(producers, timeout=5.0):
    """Stop dataloaders' background threads and wait for them (they stop their workers). A thread
    still at work while the interpreter shuts down can abort the process after the run's summary
    ("terminate called without an active exception")."""
    for stop, _ in producers:
        stop.set()
    for _, thread in producers:
        thread.join(timeout)


atexit.register(lambda: stop_producers(list(_PRODUCERS)))  # runs before multiprocessing's (registered at import)


def make_dataloader(tokenizer, B, T, split, device=None, num_workers=None):
    """Endless iterator of (inputs, targets, epoch); inputs and targets (B, T) int64 on `device`
    (default: cuda, then mps, then cpu), targets = inputs shifted by one. Tokenizing and packing
    run in the background (worker processes and a thread), a few batches ahead of the consumer;
    closing the iterator, or the interpreter's exit, stops them."""
    assert split in ("train", "val"), split
    device = torch.device(device) if device is not None else default_device()
    num_workers = num_workers or loader_workers()
    list_shards(split)  # fail here, with the cause, rather than in the background thread
    if split == "train":  # a training run: also check what its final evaluation will need
        check_val_shard()
    pin = device.type == "cuda"
    ready = queue.Queue(maxsize=4)
    stop = threading.Event()

    def hand_over(item):  # False once the consumer has stopped
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:  # leaving this function closes the generators, and so the worker pool
            batches = document_batches(tokenizer, split, num_workers)
            for rows, epoch in pack_rows(batches, B, T, tokenizer.get_bos_token_id()):
                xy = torch.from_numpy(np.stack([rows[:, :-1], rows[:, 1:]]))  # (2, B, T)
                if not hand_over((xy.pin_memory() if pin else xy, epoch)):
                    return
        except BaseException as e:  # hand the failure to the consumer instead of hanging it
            hand_over((e, None))

    thread = threading.Thread(target=produce, daemon=True)
    producer = (stop, thread)
    _PRODUCERS.add(producer)
    thread.start()
    try:
        while True:
            xy, epoch = ready.get()
            if isinstance(xy, BaseException):
                raise xy
            xy = xy.to(device, non_blocking=pin)
            yield xy[0], xy[1], epoch
    finally:
        _PRODUCERS.discard(producer)
        stop_producers([producer])


# ---------------------------------------------------------------------------------------------
# Runtime: attention kernel, compilation, FLOP/s and memory figures for train.py

# Flash Attention 3 from the kernels hub, at pinned revisions: a hub repository can change under
# its users, and what it holds is native code. To move a pin, pick the repository's new commit on
# the hub (its "Files and versions" history), check it has a build for the pinned torch, and
# replace the hash here.
FA3_HOPPER_REPO = "varunneal/flash-attention-3"  # compute capability 9.0 (H100, H200)
FA3_HOPPER_REVISION = "de87b9b5af06dd9984df595bef90b2eba44b181a"
FA3_REPO = "kernels-community/flash-attn3"      # other CUDA GPUs
FA3_REVISION = "9542c462013476380ce4b395b9ddc0e8118161ee"

_flash_attn = None  # FA3's interface module once loaded and checked; None = PyTorch attention
_block_masks = {}   # (T, window) -> flex_attention BlockMask, for the compiled PyTorch path


def setup_attention(device, seq_len, windows):
    """Load FA3 for `device` from the hub (checked by a tiny call against PyTorch attention), else
    prepare PyTorch attention for these windows. Returns the startup line: which path runs, and why."""
    global _flash_attn
    _flash_attn = None
    _block_masks.clear()
    reason = "no CUDA device"
    if device.type == "cuda":
        hopper = torch.cuda.get_device_capability(device) == (9, 0)
        repo, revision = (FA3_HOPPER_REPO, FA3_HOPPER_REVISION) if hopper else (FA3_REPO, FA3_REVISION)
        try:
            from kernels import get_kernel
            module = get_kernel(repo, revision=revision)
            _flash_attn = getattr(module, "flash_attn_interface", module)
            q = torch.randn(1, 256, 2, 64, device=device, dtype=torch.bfloat16)
            if not torch.allclose(attention(q, q, q, 64).float(), band_attention(q, q, q, 64).float(), atol=2e-2):
                raise RuntimeError("its output differs from PyTorch attention")
            return f"attention: Flash Attention 3 from {repo}@{revision[:12]}"
        except Exception as e:
            _flash_attn = None
            cause = str(e).splitlines()[0][:120] if str(e) else ""
            reason = f"FA3 from {repo}@{revision[:12]} unavailable: {type(e).__name__}: {cause}"
        for w in set(windows):  # sliding windows run as block-sparse flex_attention when compiled
            if w < seq_len - 1:
                _block_masks[(seq_len, w)] = band_block_mask(seq_len, w, device)
    paths = "flex_attention" if _block_masks else "masked SDPA"
    return f"attention: PyTorch SDPA (sliding windows: {paths}); {reason}"


def in_band(q, k, window):
    """Whether query position q sees key position k: itself and the `window` tokens before it."""
    return (q >= k) & (q - k <= window)


def band_block_mask(seq_len, window, device):
    """The band as a flex_attention BlockMask."""
    return create_block_mask(lambda b, h, q, k: in_band(q, k, window), None, None, seq_len, seq_len, device=device)


def band_attention(q, k, v, window):  # (B, T, H, D) -> (B, T, H, D)
    """PyTorch attention with FA3's window_size=(window, 0) semantics; fewer kv heads = GQA."""
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = q.size(1) != k.size(1)
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif torch.compiler.is_compiling() and (T, window) in _block_masks:
        y = flex_attention(q, k, v, block_mask=_block_masks[(T, window)], enable_gqa=gqa)
    else:
        i = torch.arange(T, device=q.device)
        band = in_band(i[:, None], i[None, :], window)  # (T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=gqa)
    return y.transpose(1, 2)


def attention(q, k, v, window):  # (B, T, H, D) -> (B, T, H, D)
    """Causal attention in which a query sees itself and the `window` tokens before it: FA3 when
    setup_attention loaded it, PyTorch attention otherwise."""
    if _flash_attn is not None:
        y = _flash_attn.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    return band_attention(q, k, v, window)


def compiled(fn=None, **kwargs):
    """torch.compile(fn, dynamic=False, **kwargs) on CUDA, with the harness's compiler settings; `fn`
    itself elsewhere (inductor on CPU or MPS costs more compile time than it saves). Also a
    decorator: @compiled or @compiled(fullgraph=True)."""
    if fn is None:
        return lambda f: compiled(f, **kwargs)
    if not torch.cuda.is_available():
        return fn
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor
    inductor.triton.autotune_pointwise = False  # no launch-config benchmarks: 5 s less cold compile
    # cache graphs with a custom autograd.Function (train.py's loss) too: 8 s less warm compile.
    # Safe: the cache key is the traced graph, the Function's backward included
    functorch.autograd_cache_allow_custom_autograd_functions = True
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:  # the run's share of the host, not all of it
        inductor.compile_threads = compile_workers()
    return torch.compile(fn, dynamic=False, **kwargs)


PEAK_BF16_FLOPS = [  # dense bf16 tensor-core FLOP/s by device-name substring; first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H200 NVL", 835e12), ("H200", 989.5e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
]


def peak_flops(device):
    """Peak dense bf16 FLOP/s of this GPU, or 0 when unknown (CPU, MPS, a GPU not in the table)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), 0.0)


def mfu_percent(flops_per_second, device):
    """Model FLOP/s utilisation in percent, or None when the device's peak is unknown."""
    peak = peak_flops(device)
    return 100 * flops_per_second / peak if peak else None


def peak_memory_mb(device):
    """Peak memory allocated on `device` so far, in MiB; 0 where the device keeps no such count."""
    return torch.cuda.max_memory_allocated(device) / 1024 / 1024 if device.type == "cuda" else 0.0


# ---------------------------------------------------------------------------------------------
# Evaluation (the metric: do not change)

EVAL_PIECE = 2**28  # logits scored at a time (1 GiB in fp32): bounds the cross entropy's memory


@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte of the validation stream: exactly EVAL_TOKENS // MAX_SEQ_LEN rows of
    MAX_SEQ_LEN tokens, whatever `batch_size` (it only chunks the work). `model(x)` returns logits
    (B, T, V); the cross entropy in nats is computed here, so no change to the training loss
    changes the metric. Independent of the vocabulary: nats summed over target tokens with bytes,
    over ln 2 x their UTF-8 bytes. Runs under no_grad: a model compiled whole would compile its
    forward once more here (train.py's GPT runs its compiled training graph instead)."""
    device = next(model.parameters()).device
    token_bytes = get_token_bytes(device)
    rows = EVAL_TOKENS // MAX_SEQ_LEN
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    nats, nbytes = [], []
    for start in range(0, rows, batch_size):
        x, y, _ = next(loader)
        keep = min(batch_size, rows - start)  # always the same shape for the model; score `keep` rows
        logits = model(x)
        if not (torch.is_tensor(logits) and logits.dim() == 3 and logits.shape[:2] == x.shape
                and logits.size(-1) >= tokenizer.get_vocab_size()):
            got = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise PrepareError(f"evaluate_bpb: model(x) must return logits (B, T, V) with V >= the vocabulary's "
                               f"{tokenizer.get_vocab_size()}, for x of shape {tuple(x.shape)}; it returned {got}")
        logits, y = logits[:keep], y[:keep]  # (keep, T, V), (keep, T)
        piece = max(1, EVAL_PIECE // (y.size(1) * logits.size(-1)))  # rows at a time
        for i in range(0, keep, piece):
            loss = F.cross_entropy(logits[i:i + piece].flatten(0, 1).float(), y[i:i + piece].flatten(),
                                   reduction="none")  # (piece * T,) nats
            b = token_bytes[y[i:i + piece]].flatten()
            nats.append(torch.where(b > 0, loss, 0.0).sum())
            nbytes.append(b.sum())
        del logits
    loader.close()
    total_nats = torch.stack(nats).cpu().double().sum().item()
    total_bytes = torch.stack(nbytes).cpu().sum().item()
    return total_nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------------------------
# One-time preparation


def shard_count(value):
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if n != -1 and not 1 <= n <= MAX_SHARD:
        raise argparse.ArgumentTypeError(f"must be -1 (all) or between 1 and {MAX_SHARD}, got {n}")
    return n


def worker_count(value):
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {value!r}") from None
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"must be between 1 and 256, got {n}")
    return n


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download the data shards and train the tokenizer (run once).")
    parser.add_argument("--num-shards", type=shard_count, default=10,
                        help=f"training shards to download, -1 for all {MAX_SHARD} (default 10)")
    parser.add_argument("--download-workers", type=worker_count, default=8,
                        help="parallel downloads (default 8)")
    args = parser.parse_args(argv)
    try:
        prepare_cache(args.num_shards, args.download_workers)
    except KeyboardInterrupt:
        print("interrupted: what was complete is kept, temporary files are removed; run `uv run prepare.py` "
              "again to go on", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def prepare_cache(num_shards, workers):
    """Fill the cache: the shards, then the tokenizer once the shards it trains from are here.
    PrepareError, after the tokenizer, while any requested shard is missing."""
    t0 = time.time()
    base_url = check_data_url(DATA_URL)
    print(f"Cache: {CACHE_DIR}")
    for folder in (DATA_DIR, TOKENIZER_DIR):
        check_folder(folder)
    removed = remove_temp_files(DATA_DIR) + remove_temp_files(TOKENIZER_DIR)
    if removed:
        print(f"Cache: removed {removed} temporary files left by an interrupted run")
    missing = download_data(num_shards, workers, DATA_DIR, base_url)
    n_train = MAX_SHARD if num_shards == -1 else num_shards
    shards = tokenizer_shards(n_train)
    absent = [name for name in shards if name in missing]
    if absent:
        print(f"Tokenizer: not trained: {len(absent)} of the {len(shards)} shards it trains from are missing")
    else:
        reason = tokenizer_problem(TOKENIZER_DIR, shards)
        if reason is None:
            print(f"Tokenizer: already trained in {TOKENIZER_DIR}")
        else:
            print(f"Tokenizer: training from {shard_span(shards)}: {reason}")
            train_tokenizer([os.path.join(DATA_DIR, name) for name in shards], TOKENIZER_DIR, VOCAB_SIZE)
    if missing:
        shown = ", ".join(missing[:MISSING_SHOWN])
        shown += f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        val = f"; the validation shard {VAL_FILENAME}, which val_bpb needs, is one" if VAL_FILENAME in missing else ""
        raise PrepareError(f"{len(missing)} of {n_train + 1} shards still missing after the retries: {shown}{val}. "
                           "The good ones are kept: run `uv run prepare.py` again to fetch the rest, or point "
                           "AUTORESEARCH_DATA_URL at a mirror that has them")
    print(f"Done in {time.time() - t0:.1f}s. Data: {DATA_DIR}  Tokenizer: {TOKENIZER_DIR}")
    print("Next: uv run train.py")


if __name__ == "__main__":
    main()

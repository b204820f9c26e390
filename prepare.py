"""
prepare.py: the fixed harness of autoresearch. Nobody edits this file, the agent included.

It holds the constants every experiment shares, the one-time data preparation (download the
climbmix shards, train the BPE tokenizer) and the runtime utilities that train.py imports: the
`Tokenizer`, the packing dataloader `make_dataloader` and the metric `evaluate_bpb`.

Usage:
    uv run prepare.py                        # 10 training shards + the validation shard, tokenizer
    uv run prepare.py --num-shards -1        # every training shard (6542 of them)
    uv run prepare.py --download-workers 16  # more parallel downloads

Environment:
    AUTORESEARCH_CACHE_DIR  where data/ and tokenizer/ live (default ~/.cache/autoresearch)
    AUTORESEARCH_DATA_URL   base URL of the shards, for mirrors and offline clusters:
                            http(s)://host/path or file:///a/folder/with/shard_XXXXX.parquet
"""

import argparse
import atexit
import base64
import bisect
import ctypes
import faulthandler
import itertools
import json
import math
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, as_completed
from multiprocessing.pool import ThreadPool
from urllib.parse import unquote, urlparse

import numpy as np
import pyarrow.parquet as pq
import requests
import tiktoken
import torch

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
TOKENIZER_MAX_CHARS = 1_000_000_000
TOKENIZER_DOC_CHARS = 10_000
DOC_BUFFER = 1000            # documents buffered for best-fit packing
TASK_DOCS = 128              # documents per batch: one worker's tokenizing task, one refill of the buffer


class PrepareError(SystemExit):
    """A one-line, user-facing failure: printed without a traceback, exit status 1."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# Download


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def verify_shard(path):
    """Raise ValueError unless `path` is a readable parquet file with a string `text` column."""
    try:
        pf = pq.ParquetFile(path)
        field = pf.schema_arrow.field("text") if "text" in pf.schema_arrow.names else None
        if field is None or str(field.type) not in ("string", "large_string"):
            raise ValueError("no string column 'text'")
        if pf.metadata.num_rows == 0:
            raise ValueError("no rows")
        pf.read_row_group(pf.num_row_groups - 1, columns=["text"])  # decode real data, not just the footer
    except ValueError:
        raise
    except Exception as e:  # pyarrow raises several types for truncated or corrupt files
        raise ValueError(f"not a readable parquet file ({str(e).splitlines()[0][:120]})") from None


def is_good_shard(path):
    try:
        verify_shard(path)
        return True
    except (ValueError, OSError):
        return False


class Unreachable(Exception):
    """The mirror could not be contacted at all (DNS, refused connection, timeout)."""


def fetch(url, tmp_path):
    """Fetch `url` into `tmp_path`. Raises Unreachable, FileNotFoundError (no retry) or OSError."""
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
                    f.write(chunk)
                    written += len(chunk)
        except requests.RequestException as e:
            raise OSError(f"download broke off after {written} bytes ({type(e).__name__})") from None
        if expected is not None and written != int(expected):
            raise OSError(f"truncated: {written} of {expected} bytes")


def download_shard(index, data_dir, base_url, give_up=None):
    """Make `data_dir/shard_XXXXX.parquet` a verified copy. Returns (status, bytes); status is
    'present', 'downloaded', or raises Unreachable / RuntimeError with the cause. `give_up`: an
    Event set once the mirror proved unreachable, so queued shards fail at once."""
    path = os.path.join(data_dir, shard_filename(index))
    if os.path.exists(path):
        if is_good_shard(path):
            return "present", os.path.getsize(path)
        os.remove(path)  # truncated or corrupt from an earlier run: fetch it again
    if give_up is not None and give_up.is_set():
        raise Unreachable("skipped: the mirror was unreachable for another shard")
    url = f"{base_url.rstrip('/')}/{shard_filename(index)}"
    tmp_path = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    cause = None
    try:
        for attempt in range(DOWNLOAD_ATTEMPTS):
            if attempt:
                time.sleep(RETRY_BASE_DELAY * 2 ** (attempt - 1))
            try:
                fetch(url, tmp_path)
                verify_shard(tmp_path)
                os.replace(tmp_path, path)  # atomic: a shard on disk is always complete
                return "downloaded", os.path.getsize(path)
            except FileNotFoundError as e:
                raise RuntimeError(f"{url}: {e}") from None
            except Unreachable:
                if attempt == DOWNLOAD_ATTEMPTS - 1:
                    raise
            except (OSError, ValueError) as e:
                cause = e
        raise RuntimeError(f"{url}: {cause} (after {DOWNLOAD_ATTEMPTS} attempts)")
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def download_data(num_shards, workers, data_dir=None, base_url=None):
    """Download `num_shards` training shards (-1 = all) plus the validation shard, in parallel.
    Returns the list of training shard paths ready; raises PrepareError when nothing usable."""
    data_dir = data_dir or DATA_DIR
    base_url = base_url or DATA_URL
    os.makedirs(data_dir, exist_ok=True)
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
    with ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(download_shard, i, data_dir, base_url, give_up): i for i in indices}
        for fut in as_completed(futures):
            index = futures[fut]
            try:
                status, size = fut.result()
                done += 1
                nbytes += size
                fresh_bytes += size if status == "downloaded" else 0
            except Unreachable as e:
                failures[index] = ("unreachable", str(e))
                give_up.set()
            except RuntimeError as e:
                failures[index] = ("failed", str(e))
            now = time.time()
            finished = done + len(failures) == len(indices)
            if tty or finished or now - last_print >= 5:
                rate = fresh_bytes / 1e6 / max(now - t0, 1e-6)
                line = f"  shards {done}/{len(indices)}  {nbytes / 1e6:.1f} MB  {rate:.1f} MB/s"
                line += f"  failed {len(failures)}" if failures else ""
                print(f"\r{line}", end="\n" if finished or not tty else "", flush=True)
                last_print = now
    if failures and all(kind == "unreachable" for kind, _ in failures.values()) and done == 0:
        raise PrepareError(
            f"could not reach {base_url} ({next(iter(failures.values()))[1]}). Check the network, or point "
            "AUTORESEARCH_DATA_URL at a mirror: an http(s):// URL or a file:// folder holding the same "
            "shard_XXXXX.parquet files."
        )
    for index, (_, cause) in sorted(failures.items()):
        print(f"  missing {shard_filename(index)}: {cause}")
    if VAL_SHARD in failures:
        raise PrepareError(f"the validation shard {VAL_FILENAME} could not be downloaded (see above); val_bpb needs it")
    train_paths = [os.path.join(data_dir, shard_filename(i)) for i in range(n_train) if i not in failures]
    if not train_paths:
        raise PrepareError("no training shard could be downloaded (see above)")
    print(f"Data: {len(train_paths)}/{n_train} training shards and the validation shard ready "
          f"({nbytes / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
    return train_paths


# ---------------------------------------------------------------------------------------------
# Tokenizer


def text_iterator(paths, max_chars=TOKENIZER_MAX_CHARS, doc_chars=TOKENIZER_DOC_CHARS):
    """Documents of the training shards, each cut to `doc_chars`, `max_chars` in all."""
    total = 0
    for path in paths:
        pf = pq.ParquetFile(path)
        for rg in range(pf.num_row_groups):
            for text in pf.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = text[:doc_chars]
                if total + len(doc) > max_chars:
                    doc = doc[: max_chars - total]
                if doc:
                    yield doc
                total += len(doc)
                if total >= max_chars:
                    return


def train_tokenizer(paths, tokenizer_dir=None, vocab_size=VOCAB_SIZE):
    """Train the byte-level BPE on `paths`, save it as plain data files, check a round trip."""
    import rustbpe  # only needed here, never at training time

    tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
    t0 = time.time()
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(text_iterator(paths), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(tok): rank for tok, rank in bpe.get_mergeable_ranks()}
    save_tokenizer(ranks, bpe.get_pattern(), tokenizer_dir)
    tokenizer = Tokenizer.from_directory(tokenizer_dir)
    for sample in ["Hello, world!", "1234567890 3.14159", "日本語のテキスト", "emoji 🚀🎉 ok", "  tabs\tand\nnewlines\r\n"]:
        if tokenizer.decode(tokenizer.encode(sample)) != sample:
            raise PrepareError(f"tokenizer round trip failed on {sample!r}")
    print(f"Tokenizer: {tokenizer.get_vocab_size()} tokens trained in {time.time() - t0:.1f}s, saved to {tokenizer_dir}")
    return tokenizer


def save_tokenizer(ranks, pattern, tokenizer_dir):
    """Plain data, no pickle: tokenizer.json (pattern, specials, base64 ranks) + token_bytes.npy."""
    os.makedirs(tokenizer_dir, exist_ok=True)
    n = len(ranks)
    specials = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
    token_bytes = np.zeros(n + len(SPECIAL_TOKENS), dtype=np.int32)  # 0 for the special tokens
    for tok, rank in ranks.items():
        token_bytes[rank] = len(tok)
    meta = {
        "pattern": pattern,
        "special_tokens": specials,
        "mergeable_ranks": [base64.b64encode(tok).decode("ascii") for tok, _ in sorted(ranks.items(), key=lambda kv: kv[1])],
    }
    # write both to temporary names, then rename: a half-written tokenizer never looks complete
    np.save(os.path.join(tokenizer_dir, "token_bytes.tmp.npy"), token_bytes, allow_pickle=False)
    with open(os.path.join(tokenizer_dir, "tokenizer.json.tmp"), "w") as f:
        json.dump(meta, f)
    os.replace(os.path.join(tokenizer_dir, "token_bytes.tmp.npy"), os.path.join(tokenizer_dir, "token_bytes.npy"))
    os.replace(os.path.join(tokenizer_dir, "tokenizer.json.tmp"), os.path.join(tokenizer_dir, "tokenizer.json"))


class Tokenizer:
    """BPE tokenizer: tiktoken rebuilt from the plain data files that prepare.py wrote."""

    def __init__(self, enc):
        self.enc = enc
        self.bos_token_id = enc.encode_single_token(BOS_TOKEN)

    @classmethod
    def from_directory(cls, tokenizer_dir=None):
        tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
        path = os.path.join(tokenizer_dir, "tokenizer.json")
        if not os.path.exists(path):
            raise PrepareError(f"no tokenizer in {tokenizer_dir} {missing_cache_hint()}")
        try:
            with open(path) as f:
                meta = json.load(f)
            ranks = {base64.b64decode(tok): rank for rank, tok in enumerate(meta["mergeable_ranks"])}
            enc = tiktoken.Encoding("autoresearch", pat_str=meta["pattern"], mergeable_ranks=ranks,
                                    special_tokens=meta["special_tokens"])
            if sorted(meta["special_tokens"]) != sorted(SPECIAL_TOKENS):
                raise ValueError("unexpected special tokens")
            if sorted([*ranks.values(), *meta["special_tokens"].values()]) != list(range(enc.n_vocab)):
                raise ValueError("token ids are not 0 .. vocab size - 1, each once")
        except Exception as e:
            raise PrepareError(f"the tokenizer in {tokenizer_dir} is damaged ({type(e).__name__}): "
                               "run `uv run prepare.py` to rebuild it") from None
        check_token_bytes(ranks, get_token_bytes("cpu", tokenizer_dir).numpy(), tokenizer_dir)
        return cls(enc)

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
    tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
    path = os.path.join(tokenizer_dir, "token_bytes.npy")
    try:
        token_bytes = np.load(path, allow_pickle=False)
    except Exception as e:
        raise PrepareError(f"cannot read {path} ({type(e).__name__}): run `uv run prepare.py`") from None
    return torch.from_numpy(token_bytes.astype(np.int64)).to(device)


def check_token_bytes(ranks, token_bytes, tokenizer_dir):
    """evaluate_bpb counts the bytes of each target token in token_bytes: it needs one entry per
    token id, the length of the token's bytes for an ordinary token and 0 for a special one. Checked
    when the tokenizer is loaded, so a mismatch stops a run before training, not at evaluation."""
    expected = np.zeros(len(ranks) + len(SPECIAL_TOKENS), dtype=np.int64)  # special tokens: the last ids
    for tok, rank in ranks.items():
        expected[rank] = len(tok)
    fix = "run `uv run prepare.py` to rebuild the tokenizer"
    where = os.path.join(tokenizer_dir, "token_bytes.npy")
    if token_bytes.shape != expected.shape:
        raise PrepareError(f"{where} has shape {token_bytes.shape}, but the tokenizer has {len(expected)} tokens: {fix}")
    wrong = np.flatnonzero(token_bytes != expected)
    if wrong.size:
        i = wrong[0]
        raise PrepareError(f"{where} disagrees with tokenizer.json on {wrong.size} token(s), the first "
                           f"token {i} ({token_bytes[i]} bytes instead of {expected[i]}): {fix}")


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


def check_val_shard(data_dir=None):
    """The final evaluation reads the validation shard: fail before training, not after it, when
    the shard is missing or unreadable (its footer, its last and its first row group)."""
    path = list_shards("val", data_dir)[0]
    try:
        verify_shard(path)
        pq.ParquetFile(path).read_row_group(0, columns=["text"])
    except Exception as e:  # ValueError from verify_shard; pyarrow raises several types
        cause = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise PrepareError(f"the validation shard {path} is unreadable ({cause}): "
                           "delete it and run `uv run prepare.py` to download it again") from None


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
                row_groups = ((pf, rg) for pf in map(pq.ParquetFile, paths) for rg in range(pf.num_row_groups))
                for pf, rg in row_groups:  # each file opened once an epoch, when its turn comes
                    texts = pf.read_row_group(rg, columns=["text"]).column("text")
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
    num_workers = num_workers or os.cpu_count() or 4
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
# Evaluation (the metric: do not change)


@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte of the validation stream: exactly EVAL_TOKENS // MAX_SEQ_LEN rows of
    MAX_SEQ_LEN tokens, whatever `batch_size` (it only chunks the work). Independent of the
    vocabulary: nats summed over target tokens with bytes, over ln 2 x their UTF-8 bytes.
    `model(x, y, reduction='none')` must return per-token cross entropy in nats."""
    device = next(model.parameters()).device
    token_bytes = get_token_bytes(device)
    rows = EVAL_TOKENS // MAX_SEQ_LEN
    loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val", device=device)
    nats, nbytes = [], []
    for start in range(0, rows, batch_size):
        x, y, _ = next(loader)
        keep = min(batch_size, rows - start)  # always the same shape for the model; score `keep` rows
        loss = model(x, y, reduction="none").view(batch_size, -1)[:keep].float()
        b = token_bytes[y[:keep]]
        nats.append(torch.where(b > 0, loss, 0.0).sum())
        nbytes.append(b.sum())
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
    t0 = time.time()
    print(f"Cache: {CACHE_DIR}")
    train_paths = download_data(args.num_shards, args.download_workers)
    try:
        Tokenizer.from_directory()
        get_token_bytes()
        print(f"Tokenizer: already trained in {TOKENIZER_DIR}")
    except PrepareError:
        train_tokenizer(train_paths)
    print(f"Done in {time.time() - t0:.1f}s. Data: {DATA_DIR}  Tokenizer: {TOKENIZER_DIR}")
    print("Next: uv run train.py")


if __name__ == "__main__":
    main()

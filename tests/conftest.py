"""Shared fixtures: a toy cache (parquet shards + a tiny trained tokenizer) in a temp folder.

AUTORESEARCH_CACHE_DIR is set before prepare.py is imported anywhere, so every test and every
subprocess (train.py runs) reads the toy cache, never the user's ~/.cache/autoresearch."""

import atexit
import os
import random
import re
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = tempfile.mkdtemp(prefix="autoresearch-test-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
os.environ["AUTORESEARCH_CACHE_DIR"] = CACHE
os.environ.setdefault("OMP_NUM_THREADS", "1")  # toy models: CPU thread pools only thrash 2 cores
os.environ["AUTORESEARCH_DATA_URL"] = "http://127.0.0.1:9/unused"  # no test may reach the internet
os.environ["TORCH_COMPILE_DISABLE"] = "1"
sys.path.insert(0, ROOT)

import prepare  # noqa: E402

TOY_VOCAB = 320
WORDS = ("the a of and to in is was for on that with as by at from model data token train loss "
         "learning rate batch layer attention window value gate night agent commit result "
         "café naïve über 日本 語 テキスト 🚀 🎉 λ π").split()


def make_docs(seed, n_docs):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        n = rng.choice([3, 8, 20, 60, 150, 400])  # short and long documents, to exercise packing
        words = [rng.choice(WORDS) if rng.random() > 0.1 else str(rng.randint(0, 9999)) for _ in range(n)]
        docs.append(" ".join(words).capitalize() + rng.choice([".", "!", "?\n", ".\n\n"]))
    return docs


def write_shard(path, docs, row_group_size=50):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tmp = path + ".tmp"
    pq.write_table(pa.table({"text": docs}), tmp, row_group_size=row_group_size)
    os.replace(tmp, path)


def build_toy_cache(cache_dir):
    data_dir = os.path.join(cache_dir, "data")
    os.makedirs(data_dir, exist_ok=True)
    train = []
    for i in range(3):
        path = os.path.join(data_dir, prepare.shard_filename(i))
        write_shard(path, make_docs(seed=i, n_docs=200))
        train.append(path)
    write_shard(os.path.join(data_dir, prepare.VAL_FILENAME), make_docs(seed=99, n_docs=200))
    prepare.train_tokenizer(train, os.path.join(cache_dir, "tokenizer"), vocab_size=TOY_VOCAB)
    return train


@pytest.fixture(scope="session")
def toy_cache():
    """The toy cache at AUTORESEARCH_CACHE_DIR: 3 training shards, the validation shard, a
    tokenizer of TOY_VOCAB tokens. Returns the cache folder."""
    if not os.path.exists(os.path.join(CACHE, "tokenizer", "tokenizer.json")):
        build_toy_cache(CACHE)
    return CACHE


@pytest.fixture(scope="session")
def tokenizer(toy_cache):
    return prepare.Tokenizer.from_directory()


# ---------------------------------------------------------------------------------------------
# train.py's definitions, without running it

TRAIN = os.path.join(ROOT, "train.py")
SETUP_BANNER = "\n# Setup\n"
TINY = dict(sequence_len=32, vocab_size=96, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")


@pytest.fixture(scope="session")
def ns():
    """train.py's definitions (everything above its '# Setup' banner: model, optimizer,
    hyperparameters, schedules), executed once into a dict."""
    with open(TRAIN) as f:
        source = f.read()
    assert source.count(SETUP_BANNER) == 1, "train.py's '# Setup' banner moved: update this fixture"
    namespace = {"__name__": "train_under_test"}
    exec(compile(source[: source.index(SETUP_BANNER)], TRAIN, "exec"), namespace)
    return namespace


def tiny_model(ns, seed=0, **overrides):
    import torch
    torch.manual_seed(seed)
    model = ns["GPT"](ns["GPTConfig"](**{**TINY, **overrides}))
    model.init_weights()
    return model


def random_grads(model, seed):
    import torch
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


# Toy-size copies of the repository, for whole train.py runs as subprocesses

VENV = os.path.dirname(os.path.dirname(sys.executable))  # the venv running the tests
REPO_FILES = ["prepare.py", "train.py", "program.md", "README.md", "pyproject.toml", "uv.lock", ".gitignore"]


def set_constant(text, name, value):
    """Rewrite the module-level line `NAME = ...` (keeping its comment). Exactly one such line
    must exist, so a renamed constant fails loudly instead of leaving a full-size run."""
    pattern = re.compile(rf"^{re.escape(name)} = [^#\n]*?(?=[ \t]*(#|$))", re.M)
    text, n = pattern.subn(lambda m: f"{name} = {value}", text)
    assert n == 1, f"constant {name} matched {n} times, expected exactly 1"
    return text


def rewrite_constants(path, values):
    with open(path) as f:
        text = f.read()
    for name, value in values.items():
        text = set_constant(text, name, value)
    with open(path, "w") as f:
        f.write(text)


def edit(path, old, new):
    with open(path) as f:
        text = f.read()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    with open(path, "w") as f:
        f.write(text.replace(old, new))


def make_toy_repo(dst, time_budget=3):
    """Copy what a checkout needs to run into `dst`, sized for a few seconds on a CPU."""
    os.makedirs(dst, exist_ok=True)
    for name in REPO_FILES:
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dst, name))
    rewrite_constants(os.path.join(dst, "prepare.py"), {
        "MAX_SEQ_LEN": "64", "TIME_BUDGET": str(time_budget), "EVAL_TOKENS": "64 * 8"})
    rewrite_constants(os.path.join(dst, "train.py"), {
        "DEPTH": "2", "ASPECT_RATIO": "32", "HEAD_DIM": "32", "DEVICE_BATCH_SIZE": "4", "TOTAL_BATCH_SIZE": "4 * 64"})
    return dst


def toy_env():
    env = dict(os.environ)  # AUTORESEARCH_CACHE_DIR (the toy cache) and TORCH_COMPILE_DISABLE come from above
    env.update({
        "UV_PROJECT_ENVIRONMENT": VENV, "UV_NO_SYNC": "1", "UV_OFFLINE": "1",  # reuse this venv as it is
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
        "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@example.com",
    })
    return env


# train.py's output contract

SUMMARY = [  # train.py's summary block, in order: key, value pattern
    ("val_bpb", r"\d+\.\d{6}"), ("training_seconds", r"\d+\.\d"), ("total_seconds", r"\d+\.\d"),
    ("peak_vram_mb", r"\d+\.\d"), ("mfu_percent", r"\d+\.\d{2}"), ("total_tokens_M", r"\d+\.\d"),
    ("num_steps", r"\d+"), ("num_params_M", r"\d+\.\d"), ("depth", r"\d+"),
]


def check_summary(log, depth=2):
    """train.py's output contract: whole lines (no carriage returns), the summary block last."""
    assert "\r" not in log, "progress must be printed as whole lines when stdout is not a terminal"
    lines = log.rstrip("\n").splitlines()
    assert len(lines) > len(SUMMARY) and lines[-len(SUMMARY) - 1] == "---", lines[-12:]
    for line, (key, value) in zip(lines[-len(SUMMARY):], SUMMARY):
        assert re.fullmatch(rf"{key}:\s+{value}", line) and line.index(line.split()[1]) == 18, \
            f"summary line {line!r} does not have the shape {key + ':':<18}<{value}>"
    assert lines[-1] == f"depth:            {depth}"

"""A crash explains itself in the last lines of run.log, and a run that cannot finish stops before
training.

Toy-size copies of train.py run as subprocesses, their output in run.log as with
`uv run train.py > run.log 2>&1`: three die in mid-training (an exception, SIGFPE, Ctrl-C), three
start on a broken cache. The harness's checks and its worker set-up are also tested in-process."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import prepare
from conftest import ROOT, edit, make_docs, make_toy_repo, rewrite_constants, toy_env, write_shard

CRASHES = {  # name -> what the toy train.py does at step 3 (for "sigint", the test presses Ctrl-C)
    "raise": "raise RuntimeError('boom at step 3')",
    "sigfpe": "os.kill(os.getpid(), signal.SIGFPE)",
    "sigint": "print('at step 3', flush=True)",
}


def crash_at_step_3(repo, code):
    edit(os.path.join(repo, "train.py"), "    step += 1\n",
         f"    step += 1\n    if step == 3:\n        import os, signal\n        {code}\n")


def slow_workers(repo):
    """Tokenizing slower than training (two documents a task, 0.2 s each), so that the dataloader's
    workers are mid-task whenever the training process dies: then they used to print, after the
    cause, a BrokenPipeError traceback each (sending the result to a dead process), or a
    KeyboardInterrupt one (Ctrl-C reaches the whole process group)."""
    path = os.path.join(repo, "prepare.py")
    rewrite_constants(path, {"TASK_DOCS": "2", "DOC_BUFFER": "8"})
    edit(path, "def encode_documents(texts):\n", "def encode_documents(texts):\n    time.sleep(0.2)\n")


def no_cache_variable(cache, env):
    """The agent's shell without AUTORESEARCH_CACHE_DIR: train.py looks in ~/.cache/autoresearch."""
    del env["AUTORESEARCH_CACHE_DIR"]
    env["HOME"] = os.path.join(cache, "home")


def no_val_shard(cache, env):
    os.remove(os.path.join(cache, "data", prepare.VAL_FILENAME))


def short_token_bytes(cache, env):
    rewrite_token_bytes(os.path.join(cache, "tokenizer"), lambda token_bytes: token_bytes[:-1])


BROKEN_CACHES = {f.__name__: f for f in (no_cache_variable, no_val_shard, short_token_bytes)}


def rewrite_token_bytes(folder, change):
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        meta = json.load(f)
    meta["token_bytes"] = change(meta["token_bytes"])
    with open(path, "w") as f:
        json.dump(meta, f)


def group_alive(pgid):
    """Pids of the live (not zombie) processes of process group `pgid`."""
    alive = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (command)": state, ppid, pgrp
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(pid))
    return alive


def foreground_signals():
    """In the child, Ctrl-C as a shell's foreground job has it, even when these tests run in the
    background (`pytest &` ignores SIGINT, and a child inherits that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """train.py in `repo`, in a session of its own (so that its process group is it and its
    dataloader's workers, like the foreground job of a shell), its output in run.log."""

    def __init__(self, repo, env):
        self.log_path = os.path.join(repo, "run.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "train.py"], cwd=repo, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=foreground_signals)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_for(self, text, timeout=180):
        deadline = time.time() + timeout
        while text not in self.log():
            assert self.proc.poll() is None, f"train.py ended before printing {text!r}:\n{self.log()[-3000:]}"
            assert time.time() < deadline, f"no {text!r} within {timeout}s"
            time.sleep(0.1)

    def result(self, timeout=180):
        """(exit status, run.log, seconds any worker outlived train.py), once every process of the
        group has ended: what a worker prints after train.py's death is in the log too."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"train.py ran over {timeout}s:\n{self.log()[-3000:]}")
        t = time.time()
        while group_alive(self.proc.pid) and time.time() - t < 10:
            time.sleep(0.05)
        return rc, self.log(), time.time() - t

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture(scope="module")
def runs(toy_cache, tmp_path_factory):
    base = tmp_path_factory.mktemp("crash_runs")
    started = {}
    try:
        for name, code in CRASHES.items():
            repo = make_toy_repo(str(base / name), time_budget=60)  # the crash comes long before the end
            crash_at_step_3(repo, code)
            slow_workers(repo)
            started[name] = Run(repo, toy_env())
        for name, damage in BROKEN_CACHES.items():
            repo = make_toy_repo(str(base / name))
            env = toy_env()
            env["AUTORESEARCH_CACHE_DIR"] = cache = str(base / name / "cache")
            shutil.copytree(toy_cache, cache)
            damage(cache, env)
            started[name] = Run(repo, env)
        yield started
    finally:
        for run in started.values():
            run.kill()


@pytest.fixture(scope="module", autouse=True)
def start_runs_early(request):
    """Start the runs with the module's first test when a test that needs them is selected, so
    that they overlap with the in-process tests."""
    if any(item.module is request.module and "runs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("runs")


# ---------------------------------------------------------------------------------------------
# A crash explains itself


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_crash_explains_itself_in_the_last_lines(runs, crash):
    run = runs[crash]
    if crash == "sigint":
        run.wait_for("at step 3")
        os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C: the training process and its workers get it
    rc, log, lingered = run.result()
    lines = log.splitlines()
    assert any(line.startswith("step 00002 ") for line in lines), log[-3000:]  # it died in mid-training
    tail = "\n".join(lines[-10:])
    if crash == "raise":
        assert rc == 1, log[-3000:]
        assert lines[-1] == "RuntimeError: boom at step 3", tail
    elif crash == "sigfpe":
        assert rc == -signal.SIGFPE, log[-3000:]
        fatal = lines.index("Fatal Python error: Floating point exception")
        assert fatal >= len(lines) - 10, tail
        assert any("train.py" in line and "in <module>" in line for line in lines[fatal:]), tail  # the Python stack
        assert "Traceback" not in log
    else:
        assert rc == -signal.SIGINT, log[-3000:]
        assert lines[-1] == "KeyboardInterrupt", tail
    assert log.count("Traceback") == (0 if crash == "sigfpe" else 1), log[-5000:]  # the workers printed none
    assert "BrokenPipeError" not in log and "ForkPoolWorker" not in log, log[-5000:]
    assert lingered < 3, f"the dataloader's workers outlived train.py by {lingered:.1f}s"


WORKER = """
import os, signal, sys, time
import prepare

parent = os.getpid()


def forked_worker(then):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        prepare._init_worker(None, parent)
        os.write(ready_w, b"1")
        then()
        os._exit(0)
    os.read(ready_r, 1)  # set up
    return pid


def write_to_closed_pipe():
    r, w = os.pipe()
    os.close(r)
    os.write(w, b"result")


_, status = os.waitpid(forked_worker(write_to_closed_pipe), 0)
print("closed pipe:", os.WIFSIGNALED(status) and signal.Signals(os.WTERMSIG(status)).name, flush=True)
sleeper = forked_worker(lambda: time.sleep(60))
os.kill(sleeper, signal.SIGINT)
time.sleep(0.5)
print("after SIGINT:", "running" if os.waitpid(sleeper, os.WNOHANG) == (0, 0) else "ended", flush=True)
print("sleeper:", sleeper, flush=True)
os.kill(parent, signal.SIGKILL)
"""


def test_a_worker_process_leaves_ctrl_c_to_its_parent_dies_with_it_and_quietly():
    r = subprocess.run([sys.executable, "-c", WORKER], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr
    lines = dict(line.split(": ") for line in r.stdout.splitlines())
    assert lines["closed pipe"] == "SIGPIPE", r.stdout  # killed by SIGPIPE, not a BrokenPipeError traceback
    assert lines["after SIGINT"] == "running", r.stdout
    assert "Traceback" not in r.stderr and "Error" not in r.stderr, r.stderr
    sleeper, t = int(lines["sleeper"]), time.time()
    while os.path.exists(f"/proc/{sleeper}") and time.time() - t < 5:
        with open(f"/proc/{sleeper}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.05)
    assert time.time() - t < 3, "a worker asleep for a minute should die with its parent"


def test_thread_workers_keep_the_signal_handlers(tokenizer):
    """Without fork (not Linux), the workers are threads of the training process: nothing to set."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGPIPE)
    prepare._init_worker(tokenizer.enc)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGPIPE)) == before
    assert prepare._worker_encoding is tokenizer.enc


# ---------------------------------------------------------------------------------------------
# Fail fast: what the final evaluation needs, checked before training


@pytest.mark.parametrize("broken", list(BROKEN_CACHES))
def test_a_broken_cache_stops_the_run_before_training(runs, broken, tmp_path_factory):
    rc, log, _ = runs[broken].result()
    lines = log.splitlines()
    assert rc == 1, log[-3000:]
    assert "Traceback" not in log
    assert not any(line.startswith(("startup:", "step ")) for line in lines), log
    cause = lines[-1]
    assert cause.startswith("error: "), log
    cache = os.path.join(os.path.dirname(runs[broken].log_path), "cache")
    if broken == "no_cache_variable":
        assert lines == [cause]  # the tokenizer is loaded first
        assert cause.startswith(f"error: no tokenizer in {cache}/home/.cache/autoresearch/tokenizer "
                                "(AUTORESEARCH_CACHE_DIR is unset, so the default ~/.cache/autoresearch is used): "), cause
        assert "run `uv run prepare.py`, or set AUTORESEARCH_CACHE_DIR" in cause
    elif broken == "no_val_shard":
        assert cause.startswith(f"error: no validation shard {prepare.VAL_FILENAME} in {cache}/data "
                                f"(AUTORESEARCH_CACHE_DIR={cache}): "), cause
    else:
        assert lines == [cause]
        assert "token_bytes has 319 entries for 320 tokens" in cause, cause
        assert "uv run prepare.py" in cause


def test_no_data_names_the_folder_and_the_cache_variable(tmp_path, monkeypatch):
    folder = str(tmp_path / "data")
    monkeypatch.delenv("AUTORESEARCH_CACHE_DIR")
    for split in ("train", "val"):
        with pytest.raises(prepare.PrepareError) as info:
            prepare.list_shards(split, folder)
        message = str(info.value.code)
        assert f" in {folder} (AUTORESEARCH_CACHE_DIR is unset, so the default ~/.cache/autoresearch is used): " in message
        assert message.endswith("run `uv run prepare.py`, or set AUTORESEARCH_CACHE_DIR to the cache prepare.py filled")
    monkeypatch.setenv("AUTORESEARCH_CACHE_DIR", str(tmp_path))
    with pytest.raises(prepare.PrepareError, match=rf"^error: no training shards in {folder} \(AUTORESEARCH_CACHE_DIR={tmp_path}\): "):
        prepare.list_shards("train", folder)
    with pytest.raises(prepare.PrepareError, match=rf"^error: no tokenizer in {tmp_path} \(AUTORESEARCH_CACHE_DIR={tmp_path}\): "):
        prepare.Tokenizer.from_directory(str(tmp_path))


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


VAL_DAMAGE = {
    "missing": os.remove,
    "truncated": truncate,
    "garbage": lambda path: overwrite(path, 0, b"not parquet" * 1000),
    "no_text_column": lambda path: pq.write_table(pa.table({"body": ["a", "b"]}), path),
    # the start of the first row group's data: the footer and the last row group stay readable
    "first_row_group": lambda path: overwrite(path, 4, bytes(range(256)) * 2),
}


@pytest.mark.parametrize("damage", list(VAL_DAMAGE))
def test_check_val_shard(tmp_path, damage):
    data = tmp_path / "data"
    data.mkdir()
    path = str(data / prepare.VAL_FILENAME)
    write_shard(path, make_docs(seed=7, n_docs=200))  # 4 row groups
    assert prepare.check_val_shard(str(data)) is None
    VAL_DAMAGE[damage](path)
    with pytest.raises(prepare.PrepareError) as info:
        prepare.check_val_shard(str(data))
    message = str(info.value.code)
    assert "\n" not in message and str(data) in message and "uv run prepare.py" in message, message
    assert prepare.VAL_FILENAME in message


def test_the_training_loader_checks_the_val_shard_first(tmp_path, tokenizer, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(str(data / prepare.shard_filename(0)), make_docs(seed=1, n_docs=60))
    monkeypatch.setattr(prepare, "DATA_DIR", str(data))
    with pytest.raises(prepare.PrepareError, match="no validation shard"):
        next(prepare.make_dataloader(tokenizer, 2, 16, "train", device="cpu"))
    loader = prepare.make_dataloader(tokenizer, 2, 16, "val", device="cpu")  # evaluation itself: no such check
    with pytest.raises(prepare.PrepareError, match="no validation shard"):
        next(loader)


TOKEN_BYTES_DAMAGE = {  # name -> change of tokenizer.json's token_bytes (320 tokens: 316 ordinary, then 4 special)
    "one_short": lambda a: a[:-1],
    "one_more": lambda a: a + [0],
    "nested": lambda a: [a],
    "ordinary_token_off_by_one": lambda a: a[:300] + [a[300] + 1] + a[301:],
    "ordinary_token_zero": lambda a: a[:7] + [0] + a[8:],
    "special_token_with_bytes": lambda a: a[:-4] + [1] + a[-3:],
}


@pytest.mark.parametrize("damage", list(TOKEN_BYTES_DAMAGE))
def test_token_bytes_must_agree_with_the_tokenizer(toy_cache, tmp_path, damage):
    folder = str(tmp_path / "tokenizer")
    shutil.copytree(os.path.join(toy_cache, "tokenizer"), folder)
    assert prepare.Tokenizer.from_directory(folder).get_vocab_size() == 320
    rewrite_token_bytes(folder, TOKEN_BYTES_DAMAGE[damage])
    with pytest.raises(prepare.PrepareError) as info:
        prepare.Tokenizer.from_directory(folder)
    message = str(info.value.code)
    assert "\n" not in message and "damaged" in message and "uv run prepare.py" in message, message
    if damage.startswith(("ordinary", "special")):
        token = {"ordinary_token_off_by_one": 300, "ordinary_token_zero": 7, "special_token_with_bytes": 316}[damage]
        assert f"token_bytes disagrees with the vocabulary on 1 token(s), the first token {token}:" in message, message
    elif damage != "nested":
        assert "token_bytes has 3" in message and "entries for 320 tokens" in message, message


def test_token_ids_with_a_gap_are_a_damaged_tokenizer(toy_cache, tmp_path):
    """Special tokens moved one id up: tiktoken accepts it, but id 316 is no token at all, and
    token_bytes (320 entries) would miss the last one."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(os.path.join(toy_cache, "tokenizer"), folder)
    meta = json.loads((folder / "tokenizer.json").read_text())
    meta["special_tokens"] = {tok: i + 1 for tok, i in meta["special_tokens"].items()}
    (folder / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(prepare.PrepareError, match=r"damaged.*uv run prepare\.py"):
        prepare.Tokenizer.from_directory(str(folder))

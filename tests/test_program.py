"""program.md, rehearsed: its commands, taken from its own text, drive the experiment loop in a
temporary git clone, with real train.py runs at toy size on the CPU.

Change a command in program.md and this test runs the new one. A command that no longer works
against train.py's real output fails here."""

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.dirname(os.path.dirname(sys.executable))  # the venv running the tests
REPO_FILES = ["prepare.py", "train.py", "program.md", "README.md", "pyproject.toml", "uv.lock", ".gitignore"]
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
ROW = re.compile(r"^[0-9a-f]{7}\t\d+\.\d{6}\t\d+\.\d\t(keep|discard|crash)\t[^\t]+$")
SUMMARY = [  # train.py's summary block, in order: key, value pattern
    ("val_bpb", r"\d+\.\d{6}"), ("training_seconds", r"\d+\.\d"), ("total_seconds", r"\d+\.\d"),
    ("peak_vram_mb", r"\d+\.\d"), ("mfu_percent", r"\d+\.\d{2}"), ("total_tokens_M", r"\d+\.\d"),
    ("num_steps", r"\d+"), ("num_params_M", r"\d+\.\d"), ("depth", r"\d+"),
]


# ---------------------------------------------------------------------------------------------
# A toy-size copy of the repository


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
    env = dict(os.environ)  # AUTORESEARCH_CACHE_DIR (the toy cache) and TORCH_COMPILE_DISABLE come from conftest
    env.update({
        "UV_PROJECT_ENVIRONMENT": VENV, "UV_NO_SYNC": "1", "UV_OFFLINE": "1",  # reuse this venv as it is
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@example.com",
        "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@example.com",
    })
    return env


# ---------------------------------------------------------------------------------------------
# The commands of program.md


def program_commands(path=os.path.join(ROOT, "program.md")):
    """Every command program.md shows: each line of a ```bash block (backslash continuations
    joined) and each inline `code` span outside blocks."""
    with open(path) as f:
        lines = f.read().splitlines()
    commands, block, pending = [], None, ""
    for line in lines:
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block is None:
            commands += re.findall(r"`([^`\n]+)`", line)
        elif block == "bash":
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
            else:
                if pending:
                    commands.append(pending)
                pending = ""
    return commands


def example_rows(path=os.path.join(ROOT, "program.md")):
    """The lines of program.md's example results.tsv (the block that starts with the header)."""
    with open(path) as f:
        text = f.read()
    for block in re.findall(r"```\w*\n(.*?)```", text, re.S):
        if block.startswith(HEADER + "\n"):
            return block.splitlines()
    raise AssertionError("program.md has no example results.tsv starting with the header")


class Program:
    """The commands the rehearsal needs, each found in program.md by its shape."""

    def __init__(self):
        self.all = program_commands()

    def find(self, pattern):
        found = sorted({c for c in self.all if re.search(pattern, c)})
        assert len(found) == 1, f"program.md: expected one command matching {pattern!r}, found {found}"
        return found[0]

    def find_all(self, pattern):
        found = [c for c in dict.fromkeys(self.all) if re.search(pattern, c)]
        assert found, f"program.md: no command matching {pattern!r}"
        return found


@pytest.fixture(scope="module")
def program():
    p = Program()
    p.run = p.find(r"^timeout \d+ uv run train\.py > run\.log 2>&1$")
    p.grep = p.find(r"^grep .*run\.log$")
    p.tail = p.find(r"^tail -n \d+ run\.log$")
    p.header = p.find(r"(^|[^>])> results\.tsv$")
    p.append = p.find(r">> results\.tsv$")
    p.best = p.find(r"results\.tsv \|")
    p.reset = p.find(r"^git reset --hard")
    p.commit = p.find(r'^git commit -am "[^"]*"$')
    p.amend = p.find(r"^git commit .*--amend")
    p.branches = p.find(r"^git branch --list")
    p.checkout = p.find(r"^git checkout -b autoresearch/")
    p.cache = p.find(r"^ls .*AUTORESEARCH_CACHE_DIR")
    p.worktree = p.find_all(r"^git worktree add ")[0]
    p.gpu_run = p.find(r"^CUDA_VISIBLE_DEVICES=\d+ ")
    return p


def test_program_md_is_consistent(program):
    # one run command everywhere, with the 10-minute limit; the GPU form is the same command, pinned
    assert program.run.startswith("timeout 600 "), program.run
    for c in program.all:
        if "uv run train.py" in c:
            assert c == program.run or re.fullmatch(rf"CUDA_VISIBLE_DEVICES=\d+ {re.escape(program.run)}", c), c
    assert program.append.endswith(' keep "baseline" >> results.tsv'), program.append
    assert program.gpu_run.endswith(program.run)
    assert re.fullmatch(r"git worktree add -b autoresearch/(\S+)-gpu0 \.\./autoresearch-\1-gpu0", program.worktree)
    rows = example_rows()
    assert rows[0] == HEADER
    for row in rows[1:]:
        assert ROW.match(row), f"program.md's example row {row!r} breaks the results.tsv format"
    assert {row.split("\t")[3] for row in rows[1:]} == {"keep", "discard", "crash"}


def check_summary(log):
    """train.py's output contract: whole lines (no carriage returns), the summary block last."""
    assert "\r" not in log, "progress must be printed as whole lines when stdout is not a terminal"
    lines = log.rstrip("\n").splitlines()
    assert len(lines) > len(SUMMARY) and lines[-len(SUMMARY) - 1] == "---", lines[-12:]
    for line, (key, value) in zip(lines[-len(SUMMARY):], SUMMARY):
        assert re.fullmatch(rf"{key}:\s+{value}", line) and line.index(line.split()[1]) == 18, \
            f"summary line {line!r} does not have the shape {key + ':':<18}<{value}>"
    assert lines[-1] == "depth:            2"


# ---------------------------------------------------------------------------------------------
# The rehearsal


def bash(cmd, cwd, env, check=False):
    """Run a command as the agent does: bash, in the checkout."""
    r = subprocess.run(cmd, shell=True, executable="/bin/bash", cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, f"$ {cmd}\nrc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_results_commands_on_numbers_a_toy_run_never_prints(program, tmp_path):
    """The logging and best-so-far commands on a GPU run's figures (memory_gb from peak_vram_mb
    in MiB), and a discarded row with a lower val_bpb than every kept one."""
    env = toy_env()
    bash("git init -q && git commit -q --allow-empty -m baseline", tmp_path, env, check=True)
    (tmp_path / "run.log").write_text("step 00953 (100.0%) | loss: 2.9\n---\nval_bpb:          0.997900\n"
                                      "training_seconds: 300.1\npeak_vram_mb:     45060.2\nmfu_percent:      39.80\n")
    bash(program.header, tmp_path, env, check=True)
    bash(program.append, tmp_path, env, check=True)
    with open(tmp_path / "results.tsv", "a") as f:
        f.write("1a2b3c4\t0.990000\t44.0\tdiscard\tlower, and still discarded\n1a2b3c5\t0.000000\t0.0\tcrash\tboom\n")
    rows = [line.split("\t") for line in (tmp_path / "results.tsv").read_text().splitlines()]
    assert rows[1][1:] == ["0.997900", "44.0", "keep", "baseline"]
    assert bash(program.best, tmp_path, env, check=True).stdout.strip() == "0.997900"


def test_rehearsal(program, toy_cache, tmp_path):
    t_start = time.time()
    repo = make_toy_repo(str(tmp_path / "repo"))
    env = toy_env()

    def sh(cmd, cwd=repo, check=False):
        return bash(cmd, cwd, env, check)

    def git(*args, cwd=repo):
        return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()

    def log_row(status, description, cwd=repo):
        tail = ' keep "baseline" >> results.tsv'
        sh(program.append[: -len(tail)] + f' {status} "{description}" >> results.tsv', cwd=cwd, check=True)
        with open(os.path.join(cwd, "results.tsv")) as f:
            last = f.read().splitlines()[-1]
        assert ROW.match(last), f"logged row {last!r} breaks the results.tsv format"
        assert last.split("\t")[0] == git("rev-parse", "--short=7", "HEAD", cwd=cwd)
        return last.split("\t")

    def edit_train(change):
        path = os.path.join(repo, "train.py")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(change(text))

    def run_ok(command=program.run, cwd=repo):
        """The run command as written, then the grep: a finished run and its summary block."""
        assert sh(command, cwd=cwd).returncode == 0, open(os.path.join(cwd, "run.log")).read()[-3000:]
        with open(os.path.join(cwd, "run.log"), newline="") as f:  # '\r' kept as it is
            log = f.read()
        check_summary(log)
        out = sh(program.grep, cwd=cwd, check=True).stdout.splitlines()
        assert len(out) == 2 and out[0].startswith("val_bpb:") and out[1].startswith("peak_vram_mb:"), out
        return float(out[0].split()[1])

    def run_crash(command=program.run):
        """A failed run: the grep prints nothing; the documented tail shows why."""
        r = sh(command)
        assert r.returncode != 0
        grep = sh(program.grep)
        assert grep.returncode == 1 and grep.stdout == "", grep.stdout
        return r.returncode, sh(program.tail, check=True).stdout

    def best():
        return float(sh(program.best, check=True).stdout.strip())

    # setup: a fresh checkout of main, the branch, the cache, results.tsv with its header
    git("init", "-q", "-b", "main")
    git("config", "commit.gpgsign", "false")
    git("add", "-A")
    git("commit", "-q", "-m", "baseline")
    assert sh(program.branches, check=True).stdout == ""
    sh(program.checkout, check=True)
    tag_branch = program.checkout.split()[-1]
    assert git("branch", "--show-current") == tag_branch
    assert tag_branch in sh(program.branches, check=True).stdout
    assert sh(program.checkout).returncode != 0  # the tag is taken now: the same command must refuse
    assert git("branch", "--show-current") == tag_branch
    listing = sh(program.cache, check=True).stdout
    for name in ("shard_06542.parquet", "shard_00000.parquet", "tokenizer.json"):
        assert name in listing, listing
    sh(program.header, check=True)
    with open(os.path.join(repo, "results.tsv")) as f:
        assert f.read() == HEADER + "\n"

    # the baseline, twice, and the noise floor
    base1 = run_ok()
    log_row("keep", "baseline")
    base2 = run_ok()
    log_row("keep", "baseline (noise check)")
    assert best() == min(base1, base2)
    start = git("rev-parse", "HEAD")

    # experiment 1: a typo first (fixed and amended, not logged), then the change itself: kept.
    # A 3-second toy run cannot be relied on to improve, so this keep is decided by the test;
    # the commands around it are the real ones.
    edit_train(lambda t: set_constant(t, "UNEMBEDDING_LR", "2 * UNEMBEDDING_LRR"))
    sh(program.commit.replace('"short description"', '"unembedding LR x2"'), check=True)
    _, tail = run_crash()
    assert "NameError" in tail and "UNEMBEDDING_LRR" in tail, tail
    edit_train(lambda t: set_constant(t, "UNEMBEDDING_LR", "0.008"))
    sh(program.amend, check=True)
    assert git("rev-parse", "HEAD~1") == start, "the fix must amend the experiment's commit, not add one"
    val = run_ok()
    log_row("keep", "unembedding LR x2")
    kept = git("rev-parse", "HEAD")
    with open(os.path.join(repo, "train.py")) as f:
        kept_train = f.read()
    assert "UNEMBEDDING_LR = 0.008" in kept_train
    assert best() == min(base1, base2, val)

    # experiment 2: no learning at all; honestly worse than the best, so discarded and reset
    edit_train(lambda t: set_constant(set_constant(set_constant(t, "MATRIX_LR", "0.0"), "EMBEDDING_LR", "0.0"),
                                      "UNEMBEDDING_LR", "0.0"))
    sh(program.commit.replace('"short description"', '"all learning rates 0"'), check=True)
    val = run_ok()
    assert val > best(), "a model that cannot learn should not beat the baseline"
    log_row("discard", "all learning rates 0")
    sh(program.reset, check=True)
    assert git("rev-parse", "HEAD") == kept
    with open(os.path.join(repo, "train.py")) as f:
        assert f.read() == kept_train

    # experiment 3: a crash, logged with 0.000000 / 0.0, its traceback found by the tail
    edit_train(lambda t: re.sub(r"^(TOTAL_BATCH_SIZE = .*)$", r'\1\nraise RuntimeError("boom")', t, count=1, flags=re.M))
    sh(program.commit.replace('"short description"', '"boom"'), check=True)
    _, tail = run_crash()
    assert "Traceback (most recent call last)" in tail and "RuntimeError: boom" in tail, tail
    row = log_row("crash", "raise in the middle of train.py")
    assert row[1:3] == ["0.000000", "0.0"]
    sh(program.reset, check=True)
    assert git("rev-parse", "HEAD") == kept

    # experiment 4: a run that never ends is killed by the run command's timeout (600 s, here 5 s)
    pid_file = tmp_path / "sleeper.pid"
    edit_train(lambda t: f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)\n" + t)
    sh(program.commit.replace('"short description"', '"hang"'), check=True)
    rc, _ = run_crash(program.run.replace("timeout 600 ", "timeout 5 "))
    assert rc == 124, f"timeout should have killed the run (rc {rc})"
    pid = int(pid_file.read_text())
    for _ in range(50):  # train.py itself must be gone, not only uv
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        raise AssertionError("the timed-out train.py process survived its uv parent")
    row = log_row("crash", "sleeps forever (killed by timeout)")
    assert row[1:3] == ["0.000000", "0.0"]
    sh(program.reset, check=True)
    assert git("rev-parse", "HEAD") == kept

    # results.tsv: the header and one well-formed row per logged run, never tracked by git
    with open(os.path.join(repo, "results.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == HEADER
    assert [line.split("\t")[3] for line in lines[1:]] == ["keep", "keep", "keep", "discard", "crash", "crash"]
    assert git("status", "--porcelain") == "", "results.tsv and run.log must stay untracked (ignored)"
    assert git("log", "--format=%s") == "unembedding LR x2\nbaseline"

    # several GPUs: a worktree and branch per GPU, its own results.tsv, the pinned run command
    sh(program.worktree, check=True)
    worktree = os.path.join(str(tmp_path), program.worktree.split()[-1].split("/")[-1])
    assert git("branch", "--show-current", cwd=worktree) == program.worktree.split()[4]
    sh(program.header, cwd=worktree, check=True)
    run_ok(program.gpu_run, cwd=worktree)
    log_row("keep", "baseline", cwd=worktree)
    with open(os.path.join(worktree, "results.tsv")) as f:
        assert len(f.read().splitlines()) == 2
    with open(os.path.join(repo, "results.tsv")) as f:
        assert len(f.read().splitlines()) == 7
    assert git("status", "--porcelain", cwd=worktree) == ""
    print(f"rehearsal took {time.time() - t_start:.1f}s")


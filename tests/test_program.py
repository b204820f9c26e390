"""program.md, rehearsed: its commands, taken from its own text, drive the experiment loop in a
temporary git clone, with real train.py runs at toy size on the CPU.

Change a command in program.md and this test runs the new one. A command that no longer works
against train.py's real output fails here."""

import os
import re
import subprocess
import time
from decimal import Decimal

import pytest
from conftest import check_summary, make_toy_repo, set_constant, toy_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "commit\tval_bpb\tmemory_gb\tstatus\tdescription"
ROW = re.compile(r"^[0-9a-f]{7}\t\d+\.\d{6}\t\d+\.\d\t(keep|discard|crash)\t[^\t]+$")


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
    p.run = p.find(r'^timeout \d+ uv run train\.py > run\.log 2>&1; echo "exit status: \$\?" >> run\.log$')
    p.grep = p.find(r"^grep .*val_bpb.*run\.log$")
    p.steps = p.find(r"^grep .*num_steps.*run\.log$")
    p.tail = p.find(r"^tail -n \d+ run\.log$")
    p.header = p.find(r"(^|[^>])> results\.tsv$")
    p.append = p.find(r">> results\.tsv$")
    p.reference = p.find(r"^awk .* results\.tsv results\.tsv$")
    p.floor = p.find(r"^awk .*noise check.* results\.tsv$")
    p.result = p.find(r"^awk .*run\.log.* results\.tsv$")
    p.reset = p.find(r"^git reset --hard")
    p.commit = p.find(r'^git commit -am "[^"]*"$')
    p.amend = p.find(r"^git commit .*--amend")
    p.branches = p.find(r"^git branch .*--list")
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


# ---------------------------------------------------------------------------------------------
# The bookkeeping: reference, noise floor, result and the decision


def bash(cmd, cwd, env, check=False):
    """Run a command as the agent does: bash, in the checkout."""
    r = subprocess.run(cmd, shell=True, executable="/bin/bash", cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, f"$ {cmd}\nrc={r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def reference_of(rows):
    """program.md's reference, from its definition: the mean val_bpb of the runs of the last
    commit logged keep, since that commit's last `baseline` row."""
    best = [r for r in rows if r[3] == "keep"][-1][0]
    runs = []
    for commit, val, _, _, description in rows:
        if commit == best and float(val) > 0:
            runs = [] if description == "baseline" else runs
            runs.append(float(val))
    return sum(runs) / len(runs)


def floor_of(rows):
    """program.md's noise floor: how far apart the last baseline pair landed (the last
    `baseline (noise check)` and the `baseline` before it), at least 0.001."""
    spread, first = 0.0, None
    for _, val, _, status, description in rows:
        if status == "keep" and description == "baseline":
            first = float(val)
        elif status == "keep" and description == "baseline (noise check)":
            spread = abs(first - float(val))
    return max(spread, 0.001)


def decide(gain, floor, first_run, deletes_code):
    """Step 6 of program.md's loop: keep, rerun (within the noise) or discard."""
    if gain > floor:
        return "keep"
    if deletes_code and gain >= -floor:
        return "keep"
    if first_run and gain > 0:
        return "rerun"
    return "discard"


def expected_row(decision, description):
    """The status and description program.md logs for a decision (a rerun's first run: discard)."""
    if decision == "rerun":
        return "discard", description + " (within noise, rerun)"
    return decision, description


def log_row(program, status, description, cwd, env):
    """program.md's logging command, with the status and description put in place of its own."""
    tail = ' keep "baseline" >> results.tsv'
    bash(program.append[: -len(tail)] + f' {status} "{description}" >> results.tsv', cwd, env, check=True)
    with open(os.path.join(cwd, "results.tsv")) as f:
        last = f.read().splitlines()[-1]
    assert ROW.match(last), f"logged row {last!r} breaks the results.tsv format"
    assert last.split("\t")[0] == bash("git rev-parse --short=7 HEAD", cwd, env, check=True).stdout.strip()
    return last.split("\t")


def decide_with_commands(program, cwd, env, deletes_code=False):
    """Step 6 as the agent does it: the reference, floor and result commands, each checked
    against program.md's definition computed here from results.tsv and run.log."""
    with open(os.path.join(cwd, "results.tsv")) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    with open(os.path.join(cwd, "run.log")) as f:
        val = float(re.search(r"^val_bpb:\s+(\S+)$", f.read(), re.M).group(1))
    head = bash("git rev-parse --short=7 HEAD", cwd, env, check=True).stdout.strip()
    earlier = [float(r[1]) for r in rows if r[0] == head and float(r[1]) > 0]
    reference = bash(program.reference, cwd, env, check=True).stdout.strip()
    floor = bash(program.floor, cwd, env, check=True).stdout.strip()
    result = bash(program.result, cwd, env, check=True).stdout.strip()
    assert reference == f"{reference_of(rows):.6f}", (reference, rows)
    assert floor == f"{floor_of(rows):.6f}", (floor, rows)
    assert result == f"{(sum(earlier) + val) / (len(earlier) + 1):.6f}", (result, earlier, val)
    gain = Decimal(reference) - Decimal(result)  # the agent's subtraction of two printed numbers, exact
    return decide(gain, Decimal(floor), not earlier, deletes_code)


def gpu_log(val_bpb, memory_gb):
    """The end of run.log after a finished GPU run (peak_vram_mb in MiB)."""
    return (f"step 00953 (100.0%) | loss: 2.9\n---\nval_bpb:          {val_bpb}\ntraining_seconds: 300.1\n"
            f"total_seconds:    325.9\npeak_vram_mb:     {float(memory_gb) * 1024 + 4:.1f}\nmfu_percent:      39.80\n"
            f"total_tokens_M:   499.6\nnum_steps:        953\nnum_params_M:     50.3\ndepth:            8\n"
            "exit status: 0\n")


def test_bookkeeping_replays_the_example(program, tmp_path):
    """program.md's example results.tsv, replayed run by run with its own commands: each row's
    figures read from a GPU run's log, each experiment's status decided by the rules on what the
    reference, floor and result commands print. The example holds every kind of row: the baseline
    pair, a keep, a discard, a crash, a run within the noise and its kept rerun, a deletion kept
    within the noise and a re-measure."""
    env = toy_env()
    rows = [line.split("\t") for line in example_rows()[1:]]
    bash("git init -q", tmp_path, env, check=True)
    commits = {}  # the example's commit -> a real commit standing in for it
    for row in rows:
        if row[0] not in commits:
            bash(f"git commit -q --allow-empty -m {row[0]}", tmp_path, env, check=True)
            commits[row[0]] = bash("git rev-parse HEAD", tmp_path, env, check=True).stdout.strip()
    bash(program.header, tmp_path, env, check=True)
    decisions = set()
    for commit, val, memory, status, description in rows:
        bash(f"git checkout -q {commits[commit]}", tmp_path, env, check=True)
        if status == "crash":
            log = "Traceback (most recent call last):\ntorch.OutOfMemoryError: CUDA out of memory.\nexit status: 1\n"
        else:
            log = gpu_log(val, memory)
        (tmp_path / "run.log").write_text(log)
        grep = bash(program.grep, tmp_path, env).stdout.splitlines()
        assert grep == re.findall(r"^(?:val_bpb|peak_vram_mb):.*", log, re.M)
        assert len(grep) == (0 if status == "crash" else 2)
        if status != "crash" and not description.startswith("baseline"):
            tried = re.sub(r" \((within noise, )?rerun\)$", "", description)
            decision = decide_with_commands(program, tmp_path, env, deletes_code=tried.startswith("remove "))
            decisions.add(decision)
            rerun = description == tried + " (rerun)"
            expected = (decision, description) if rerun else expected_row(decision, tried)
            assert (status, description) == expected, \
                f"program.md's example logs {status} {description!r}; its rules say {decision}"
        logged = log_row(program, status, description, tmp_path, env)
        assert logged == [commits[commit][:7], val, memory, status, description]
    assert decisions == {"keep", "discard", "rerun"}
    with open(tmp_path / "results.tsv") as f:
        logged_rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    for end in range(2, len(logged_rows) + 1):  # the commands after every row, re-measure included
        with open(tmp_path / "results.tsv", "w") as f:
            f.write("\n".join([HEADER] + ["\t".join(r) for r in logged_rows[:end]]) + "\n")
        assert bash(program.reference, tmp_path, env, check=True).stdout == f"{reference_of(logged_rows[:end]):.6f}\n"
        assert bash(program.floor, tmp_path, env, check=True).stdout == f"{floor_of(logged_rows[:end]):.6f}\n"


def test_taken_tags_include_remote_branches(program, tmp_path):
    """In a clone, a tag taken on the remote shows up in the list, next to local ones."""
    env = toy_env()
    bash("git init -q -b main origin && git -C origin commit -q --allow-empty -m start && "
         "git -C origin branch autoresearch/dec4 && git -C origin branch other && git clone -q origin clone",
         tmp_path, env, check=True)
    clone = tmp_path / "clone"
    assert bash(program.branches, clone, env, check=True).stdout.split() == ["remotes/origin/autoresearch/dec4"]
    bash(program.checkout, clone, env, check=True)
    listed = bash(program.branches, clone, env, check=True).stdout.replace("*", " ").split()
    assert sorted(listed) == sorted([program.checkout.split()[-1], "remotes/origin/autoresearch/dec4"])


# ---------------------------------------------------------------------------------------------
# The rehearsal


def test_rehearsal(program, toy_cache, tmp_path, request):
    """A night in miniature, each step with program.md's commands: the baseline pair, a typo fixed
    and then a discard, a run within the noise and its rerun kept on the mean, a crash, a timeout,
    a kill, and a GPU's worktree beside them. A 3-second toy run cannot be relied on to land where
    a rule needs it, so for the run within the noise and its rerun the test writes the val_bpb of
    run.log's summary after the real run; every command then reads it from there."""
    t_start = time.time()
    repo = make_toy_repo(str(tmp_path / "repo"))
    env = toy_env()

    def sh(cmd, cwd=repo, check=False):
        return bash(cmd, cwd, env, check)

    def git(*args, cwd=repo):
        return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()

    def edit_train(change):
        path = os.path.join(repo, "train.py")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(change(text))

    def commit(message):
        sh(program.commit.replace('"short description"', f'"{message}"'), check=True)

    def run_ok(cwd=repo):
        """The run command as written, then the grep: a finished run, its summary block, its exit status."""
        sh(program.run, cwd=cwd, check=True)
        with open(os.path.join(cwd, "run.log"), newline="") as f:  # '\r' kept as it is
            log = f.read()
        assert log.endswith("\nexit status: 0\n"), log[-3000:]
        check_summary(log.removesuffix("exit status: 0\n"))
        out = sh(program.grep, cwd=cwd, check=True).stdout.splitlines()
        assert len(out) == 2 and out[0].startswith("val_bpb:") and out[1].startswith("peak_vram_mb:"), out
        steps = sh(program.steps, cwd=cwd, check=True).stdout
        assert re.fullmatch(r"num_steps:\s+[1-9]\d*\n", steps), steps
        return float(out[0].split()[1])

    def place(val_bpb):
        """Put `val_bpb` in run.log's summary, in train.py's format."""
        path = os.path.join(repo, "run.log")
        with open(path) as f:
            log = f.read()
        log, n = re.subn(r"^val_bpb:.*$", f"val_bpb:          {val_bpb:.6f}", log, flags=re.M)
        assert n == 1
        with open(path, "w") as f:
            f.write(log)
        return round(val_bpb, 6)

    def run_failed(command=program.run):
        """A failed run: the grep prints nothing; the documented tail shows the cause, then the
        exit status as its last line."""
        sh(command, check=True)
        grep = sh(program.grep)
        assert grep.returncode == 1 and grep.stdout == "", grep.stdout
        tail = sh(program.tail, check=True).stdout.splitlines()
        status = re.fullmatch(r"exit status: (\d+)", tail[-1])
        assert status, tail[-10:]
        return int(status.group(1)), tail[:-1]

    def decision():
        return decide_with_commands(program, repo, env)

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

    # a GPU's worktree, made from the main checkout: its own branch and results.tsv, its baseline
    # run going on in the background while the main checkout runs its night
    sh(program.worktree, check=True)
    worktree = os.path.join(str(tmp_path), program.worktree.split()[-1].split("/")[-1])
    assert git("branch", "--show-current", cwd=worktree) == program.worktree.split()[4]
    sh(program.header, cwd=worktree, check=True)
    gpu = subprocess.Popen(program.gpu_run, shell=True, executable="/bin/bash", cwd=worktree, env=env,
                           start_new_session=True)
    request.addfinalizer(lambda: gpu.poll() is None and os.killpg(gpu.pid, 9))

    # the baseline, twice: the reference is their mean, the floor their distance (at least 0.001)
    base1 = run_ok()
    log_row(program, "keep", "baseline", repo, env)
    base2 = run_ok()
    log_row(program, "keep", "baseline (noise check)", repo, env)
    reference = float(sh(program.reference, check=True).stdout)
    floor = float(sh(program.floor, check=True).stdout)
    assert f"{reference:.6f}" == f"{(base1 + base2) / 2:.6f}" and f"{floor:.6f}" == f"{max(abs(base1 - base2), 0.001):.6f}"
    start = git("rev-parse", "HEAD")

    # experiment 1: a typo first (fixed and amended, no row), then the change itself: no learning
    # at all, really worse than the reference, so discarded and reset
    edit_train(lambda t: set_constant(set_constant(set_constant(t, "MATRIX_LR", "0.0 * MATRIX_LRR"), "EMBEDDING_LR",
                                                   "0.0"), "UNEMBEDDING_LR", "0.0"))
    commit("all learning rates 0")
    rc, tail = run_failed()
    assert rc == 1 and tail[-1].startswith("NameError") and "MATRIX_LRR" in tail[-1], tail
    edit_train(lambda t: set_constant(t, "MATRIX_LR", "0.0"))
    sh(program.amend, check=True)
    assert git("rev-parse", "HEAD~1") == start, "the fix must amend the experiment's commit, not add one"
    run_ok()
    assert decision() == "discard", "a model that cannot learn should not come near the reference"
    log_row(program, "discard", "all learning rates 0", repo, env)
    sh(program.reset, check=True)
    assert git("rev-parse", "HEAD") == start

    # experiment 2: better, but within the noise: logged, rerun without a reset, kept on the mean
    # of both runs, which is then the reference
    edit_train(lambda t: set_constant(t, "WARMDOWN_RATIO", "0.6"))
    commit("warmdown 0.5 -> 0.6")
    run_ok()
    first = place(reference - floor / 2)
    assert decision() == "rerun"
    log_row(program, "discard", "warmdown 0.5 -> 0.6 (within noise, rerun)", repo, env)
    run_ok()
    second = place(reference - 2 * floor)
    assert decision() == "keep"
    log_row(program, "keep", "warmdown 0.5 -> 0.6 (rerun)", repo, env)
    assert sh(program.reference, check=True).stdout == f"{(first + second) / 2:.6f}\n"
    kept = git("rev-parse", "HEAD")
    assert git("log", "--format=%s") == "warmdown 0.5 -> 0.6\nbaseline"

    # experiment 3: a crash, logged with 0.000000 / 0.0, its traceback the last thing above the exit status
    edit_train(lambda t: re.sub(r"^(TOTAL_BATCH_SIZE = .*)$", r'\1\nraise RuntimeError("boom")', t, count=1, flags=re.M))
    commit("boom")
    rc, tail = run_failed()
    assert rc == 1 and tail[-1] == "RuntimeError: boom" and "Traceback (most recent call last):" in tail, tail
    row = log_row(program, "crash", "raise in the middle of train.py", repo, env)
    assert row[1:3] == ["0.000000", "0.0"]
    sh(program.reset, check=True)
    assert git("rev-parse", "HEAD") == kept

    # experiment 4: a run that never ends is stopped by the run command's timeout (600 s, here 5 s): 124
    pid_file = tmp_path / "sleeper.pid"
    edit_train(lambda t: f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)\n" + t)
    commit("hang")
    rc, _ = run_failed(program.run.replace("timeout 600 ", "timeout 5 "))
    assert rc == 124, f"timeout should have stopped the run (exit status {rc})"
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
    row = log_row(program, "crash", "sleeps forever (stopped by timeout)", repo, env)
    assert row[1:3] == ["0.000000", "0.0"]
    sh(program.reset, check=True)

    # experiment 5: killed as the out-of-memory killer does (SIGKILL): the log just stops, 137
    edit_train(lambda t: "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n" + t)
    commit("killed")
    rc, _ = run_failed()
    assert rc == 137, f"a SIGKILL should read as 137 (exit status {rc})"
    log_row(program, "crash", "killed (out of memory)", repo, env)
    sh(program.reset, check=True)
    assert git("rev-parse", "HEAD") == kept

    # results.tsv: the header and one well-formed row per logged run, never tracked by git
    with open(os.path.join(repo, "results.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == HEADER
    assert [line.split("\t")[3] for line in lines[1:]] == ["keep", "keep", "discard", "discard", "keep", "crash",
                                                           "crash", "crash"]
    assert sh(program.reference, check=True).stdout == f"{(first + second) / 2:.6f}\n"
    assert git("status", "--porcelain") == "", "results.tsv and run.log must stay untracked (ignored)"

    # the GPU's worktree: its own finished run, its own results.tsv, nothing tracked
    assert gpu.wait(timeout=120) == 0
    with open(os.path.join(worktree, "run.log")) as f:
        gpu_log = f.read()
    assert gpu_log.endswith("\nexit status: 0\n"), gpu_log[-3000:]
    check_summary(gpu_log.removesuffix("exit status: 0\n"))
    log_row(program, "keep", "baseline", worktree, env)
    with open(os.path.join(worktree, "results.tsv")) as f:
        assert len(f.read().splitlines()) == 2
    assert git("status", "--porcelain", cwd=worktree) == ""
    print(f"rehearsal took {time.time() - t_start:.1f}s")


def test_readme_is_a_users_page():
    """The README stays short enough to read whole (measurements live in docs/performance.md), and
    program.md's reading list keeps the agent out of those notes."""
    with open(os.path.join(ROOT, "README.md")) as f:
        assert len(f.read().splitlines()) <= 200
    with open(os.path.join(ROOT, "program.md")) as f:
        program = f.read()
    reading = program[program.index("**Read the files in scope.**"):program.index("**Check the data.**")]
    assert re.findall(r"^\s+- `([^`]+)`", reading, re.M) == ["README.md", "prepare.py", "train.py"], reading

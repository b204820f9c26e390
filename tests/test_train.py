"""train.py's contract with the harness and its building blocks, tested so that the tests still
pass on a train.py changed the way an agent changes it (another DEPTH, other learning rates or
schedule, another activation, another window pattern, no soft cap): the model returns logits or a
loss, every parameter learns, the optimizer's updates are right, and whole toy-size runs print the
summary block program.md reads. The baseline's values are pinned apart, in test_recipe.py.

The functions are tested without running the training loop: the part of train.py above its
"# Setup" banner is executed into a namespace (conftest's `ns`). The loop itself is tested by
running toy-size copies of train.py as subprocesses."""

import ast
import math
import os
import pty
import re
import subprocess
import sys
import termios
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import SUMMARY, TINY, check_summary, edit, make_toy_repo, random_grads, rewrite_constants, tiny_model, toy_env


# ---------------------------------------------------------------------------------------------
# Muon's orthogonalisation


def well_conditioned(n, rows, cols, cond, gen):
    """Random (n, rows, cols) matrices with singular values spread over [1/cond, 1]."""
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(n, rows, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, cols, k, generator=gen))
    s = torch.logspace(0, -math.log10(cond), k)
    return U @ torch.diag_embed(s.expand(n, k)) @ V.mT



# 5 Polar Express steps in bf16 land every singular value in about [0.855, 1.145] for inputs with
# a condition number up to ~100. Reversed coefficients give values up to 60-300, one step too few
# gives up to 1.58, swapped b/c coefficients or a missing normalisation blow up to inf/nan.
SV_LOW, SV_HIGH = 0.8, 1.2


@pytest.mark.parametrize("shape", [(4, 256, 64), (4, 64, 256), (3, 96, 32), (2, 2, 32), (2, 32, 2)],
                         ids=["tall", "wide", "tall3", "wide-2rows", "tall-2cols"])
def test_orthogonalize_random_rectangular(ns, shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3.7
    X = ns["orthogonalize"](g)
    assert X.shape == g.shape and torch.isfinite(X).all()
    sv = torch.linalg.svdvals(X.float())
    assert SV_LOW <= sv.min() and sv.max() <= SV_HIGH, (sv.min().item(), sv.max().item())



@pytest.mark.parametrize("shape", [(4, 64, 64), (4, 128, 64), (4, 64, 128)], ids=["square", "tall", "wide"])
def test_orthogonalize_condition_100(ns, shape):
    g = well_conditioned(*shape, cond=100, gen=torch.Generator().manual_seed(1)) * 0.01
    X = ns["orthogonalize"](g)
    assert X.shape == g.shape and torch.isfinite(X).all()
    sv = torch.linalg.svdvals(X.float())
    assert SV_LOW <= sv.min() and sv.max() <= SV_HIGH, (sv.min().item(), sv.max().item())



def test_orthogonalize_random_square(ns):
    # random square matrices have a few tiny singular values that 5 steps cannot lift to 1;
    # the bulk lands in the band and nothing overshoots it
    g = torch.randn(4, 128, 128, generator=torch.Generator().manual_seed(2))
    X = ns["orthogonalize"](g)
    assert X.shape == g.shape and torch.isfinite(X).all()
    sv = torch.linalg.svdvals(X.float())
    assert sv.max() <= SV_HIGH
    assert ((sv >= SV_LOW) & (sv <= SV_HIGH)).float().mean() >= 0.9
    # orthogonal-ish: X X^T close to the identity in the bulk
    assert (sv.square() - 1).abs().median() < 0.2



# ---------------------------------------------------------------------------------------------
# The optimizer's updates: the AdamW path against torch.optim.AdamW, the Muon path


def test_adamw_path_matches_torch_adamw(ns):
    model = tiny_model(ns)
    opt = ns["build_optimizer"](model)
    adam_groups = [g for g in opt.param_groups if g["kind"] == "adamw"]
    params = [p for g in adam_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    ref_params = [[p.detach().clone() for p in g["params"]] for g in adam_groups]
    ref = torch.optim.AdamW([dict(params=rp, lr=g["lr"], betas=g["betas"]) for rp, g in zip(ref_params, adam_groups)],
                            eps=1e-10, weight_decay=0.0, foreach=False)
    for step, lr_mult in enumerate([1.0, 0.6, 0.25, 1.3, 0.0, 0.8]):
        random_grads(model, seed=step)
        for g, rg, rp in zip(adam_groups, ref.param_groups, ref_params):
            g["lr"] = rg["lr"] = g["initial_lr"] * lr_mult
            for p, q in zip(g["params"], rp):
                q.grad = p.grad.clone()
        opt.step()
        ref.step()
    ref_flat = [q for rp in ref_params for q in rp]
    for p, q, p0 in zip(params, ref_flat, start):
        moved = (p - p0).abs().max().item()
        assert moved > 1e-4, "the parameter never moved: the comparison would be vacuous"
        # float32 rounding: ~1e-6 of the parameter's or the update's scale, whichever is larger
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-6 * max(p0.abs().max().item(), moved))



def test_adamw_step_decoupled_weight_decay(ns):
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(40, 24, generator=gen)
    p_nowd = p.clone()
    ref_p = p.clone()
    ref = torch.optim.AdamW([ref_p], lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1, foreach=False)
    state = [torch.zeros_like(p), torch.zeros_like(p)]
    state_nowd = [torch.zeros_like(p), torch.zeros_like(p)]
    t = lambda x: torch.tensor(float(x))  # 0-d hyperparameters, as MuonAdamW passes them
    for step, (lr, wd) in enumerate([(0.1, 0.1), (0.05, 0.1), (0.05, 0.5), (0.2, 0.3), (0.01, 0.0)], start=1):
        grad = torch.randn(40, 24, generator=gen)
        ns["adamw_step"](p, grad, *state, t(step), t(lr), t(0.8), t(0.95), t(1e-10), t(wd))
        ns["adamw_step"](p_nowd, grad, *state_nowd, t(step), t(lr), t(0.8), t(0.95), t(1e-10), t(0.0))
        ref.param_groups[0].update(lr=lr, weight_decay=wd)
        ref_p.grad = grad
        ref.step()
    torch.testing.assert_close(p, ref_p, rtol=1e-6, atol=1e-6)
    assert (p - p_nowd).abs().max() > 1e-2, "weight decay had no effect"



def test_muon_step_updates_matrices_with_scaled_lr(ns):
    model = tiny_model(ns)
    opt = ns["build_optimizer"](model)
    muon = [g for g in opt.param_groups if g["kind"] == "muon"]
    for g in muon:
        g["weight_decay"] = 0.0  # isolate the update itself
    random_grads(model, seed=10)
    grads = {id(p): p.grad.clone() for g in muon for p in g["params"]}
    before = {id(p): p.detach().clone() for g in muon for p in g["params"]}
    opt.step()
    shapes = set()
    for g in muon:
        rows, cols = g["params"][0].shape
        shapes.add((rows, cols))
        lr = g["lr"] * math.sqrt(max(1.0, rows / cols))
        assert g["t"]["lr"].item() == pytest.approx(lr, rel=1e-6)
        for p in g["params"]:
            assert torch.isfinite(p).all()
            delta = before[id(p)] - p.detach()
            assert delta.abs().max() > 0, "a matrix did not change"
            # first step: Nesterov momentum from a zero buffer, orthogonalised; NorMuon rescales
            # rows but keeps the update's norm: |delta| = lr x |orthogonalize(nesterov(grad))|
            grad, momentum = grads[id(p)], g["t"]["momentum"]
            nesterov = grad.clone().lerp_(torch.zeros_like(grad).lerp_(grad, 1 - momentum), momentum)
            o = ns["orthogonalize"](nesterov[None]).float()[0]
            assert delta.norm().item() / lr == pytest.approx(o.norm().item(), rel=0.03), (rows, cols)
            if min(rows, cols) >= 8:  # (a 1-row gate's entries all get normalised to one size)
                cos = F.cosine_similarity(delta.flatten(), o.flatten(), dim=0)
                assert cos > 0.9, (rows, cols, cos.item())
    assert any(r > c for r, c in shapes) and any(r < c for r, c in shapes), "tiny model should have tall and wide"



def test_muon_second_moment_is_an_ema_of_the_update_mean_square(ns):
    gen = torch.Generator().manual_seed(5)
    N, rows, cols, momentum, beta2 = 2, 48, 16, 0.9, 0.95
    grads = torch.randn(N, rows, cols, generator=gen)
    params = torch.randn(N, rows, cols, generator=gen)
    momentum_buf = torch.zeros(N, rows, cols)
    second_moment = torch.zeros(N, rows, 1)  # tall: a mean over each row
    nesterov = grads.lerp(grads * (1 - momentum), momentum)  # first step, from a zero buffer
    o = ns["orthogonalize"](nesterov).float()
    ns["muon_step"](grads.clone(), params, momentum_buf, second_moment, torch.tensor(momentum),
                    torch.tensor(0.01), torch.tensor(0.0), torch.tensor(beta2))
    torch.testing.assert_close(second_moment, (1 - beta2) * o.square().mean(dim=-1, keepdim=True), rtol=1e-5, atol=0)



def test_muon_cautious_weight_decay(ns):
    gen = torch.Generator().manual_seed(4)
    N, rows, cols = 3, 48, 16
    grads = torch.randn(N, rows, cols, generator=gen)
    params = torch.randn(N, rows, cols, generator=gen)
    t = lambda x: torch.tensor(float(x))
    out = {}
    for wd in (0.0, 0.5):
        p = params.clone()
        ns["muon_step"](grads.clone(), p, torch.zeros(N, rows, cols), torch.zeros(N, rows, 1),
                        t(0.9), t(0.02), t(wd), t(0.95))
        out[wd] = p
    decay = out[0.0] - out[0.5]  # = lr x wd x params where the update and the parameter agree in sign
    big = params.abs() > 0.05  # where the ratio below is well conditioned
    frac = (decay / (0.02 * 0.5 * params))[big]
    assert torch.allclose(frac, frac.round(), atol=1e-3) and set(frac.round().unique().tolist()) == {0.0, 1.0}
    decayed = frac.round() == 1
    agree = ((params - out[0.0]) * params)[big]  # the update (subtracted) times the parameter
    assert (agree[decayed] >= 0).all() and (agree[~decayed] <= 0).all()
    assert 0.2 < decayed.float().mean() < 0.8, "cautious decay should apply to a part of the entries"



# ---------------------------------------------------------------------------------------------
# The model's side of the contract: logits for the metric, a loss to train on, gradients everywhere


def test_model_returns_logits_or_a_loss(ns):
    """evaluate_bpb calls model(x) for logits (B, T, V); the loop calls model(x, y) for a loss."""
    model = tiny_model(ns)
    gen = torch.Generator().manual_seed(5)
    B, T, V = 3, TINY["sequence_len"], TINY["vocab_size"]
    idx = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    logits = model(idx)
    assert logits.shape == (B, T, V) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with torch.no_grad():  # as evaluate_bpb calls it: the same logits, nothing kept for a backward
        quiet = model(idx)
    assert logits.requires_grad and not quiet.requires_grad
    torch.testing.assert_close(quiet, logits)
    loss = model(idx, targets)
    assert loss.shape == () and torch.isfinite(loss) and loss.requires_grad
    with torch.no_grad():  # shorter sequences than sequence_len work too
        assert model(idx[:, :7]).shape == (B, 7, V)
        assert model(idx[:, :7], targets[:, :7]).shape == ()


@pytest.mark.parametrize("through", ["loss", "logits"])
def test_backward_reaches_every_parameter(ns, through):
    """From the model's loss, and from a loss of one's own on the logits model(x) returns."""
    model = tiny_model(ns)
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["sequence_len"]), generator=torch.Generator().manual_seed(8))
    targets = idx.roll(-1, dims=1)
    if through == "loss":
        model(idx, targets).backward()
    else:
        F.cross_entropy(model(idx).flatten(0, 1), targets.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # zero-initialised output projections stop the gradient into the blocks' input matrices at
    # step 0, but they themselves receive one
    assert model.blocks[0].attn.c_proj.weight.grad.abs().max() > 0



# ---------------------------------------------------------------------------------------------
# Whole runs: toy-size copies of train.py as subprocesses, started together (2 cores), with
# stdout going to a file as with `uv run train.py > run.log 2>&1`.


TRACE = ("    print('trace', repr((step, progress, dt, [(g['kind'], g['lr'], g['initial_lr'], g.get('momentum'),"
         " g.get('weight_decay')) for g in optimizer.param_groups])), flush=True)\n")  # each step, as the loop set it

FAKE_PEAK = "mfu_percent = lambda flops_per_second, device: 100 * flops_per_second / 1e9\n"  # a 1 GFLOP/s peak

VARIANTS = {  # name -> edit of the toy copy's train.py
    "baseline": lambda train: None,
    "huge_lr": lambda train: rewrite_constants(train, {"MATRIX_LR": "1e30", "EMBEDDING_LR": "1e30"}),
    "huge_loss": lambda train: edit(train, "            loss = model(x, y)\n", "            loss = 1e6 * model(x, y)\n"),
    "bad_batch": lambda train: rewrite_constants(train, {"TOTAL_BATCH_SIZE": "6 * 64"}),  # 4 x 64 per pass
    "trace": lambda train: (edit(train, "    dt = time.time() - t0\n", "    dt = time.time() - t0\n" + TRACE),
                            edit(train, "t_start = time.time()\n", "t_start = time.time()\n" + FAKE_PEAK)),  # MFU on a CPU
    "agent": lambda train: (rewrite_constants(train, {"DEPTH": "3", "MATRIX_LR": "0.05", "WARMDOWN_RATIO": "0.3",
                                                      "WINDOW_PATTERN": '"SL"'}),
                            edit(train, "F.relu(self.c_fc(x)).square()", "F.gelu(self.c_fc(x))"),
                            edit(train, "return 15 * torch.tanh(logits / 15)  # soft cap", "return logits")),
}


class TrainRun:
    """train.py in `repo`, its output in run.log: written there directly, or with terminal=True
    shown on a pseudo-terminal (as in an interactive shell) and copied from it by a thread."""

    def __init__(self, repo, env, terminal=False):
        self.repo = repo
        self.log_path = os.path.join(repo, "run.log")
        self.log_file = open(self.log_path, "wb")
        out, self.copier = self.log_file, None
        if terminal:
            screen, out = pty.openpty()
            attrs = termios.tcgetattr(out)
            attrs[1] &= ~termios.OPOST  # the terminal shows '\n' as it is, not as '\r\n'
            termios.tcsetattr(out, termios.TCSANOW, attrs)
            self.copier = threading.Thread(target=self.copy, args=(screen,), daemon=True)
        self.proc = subprocess.Popen([sys.executable, "train.py"], cwd=repo, env=env,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if terminal:
            os.close(out)  # the child holds the terminal now: reading it ends when the child does
            self.copier.start()

    def copy(self, screen):
        try:
            while data := os.read(screen, 65536):
                self.log_file.write(data)
        except OSError:  # EIO: the child has exited and closed the terminal
            pass
        finally:
            os.close(screen)

    def result(self, timeout=240):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"train.py in {self.repo} ran over {timeout}s")
        if self.copier is not None:
            self.copier.join(timeout=10)
        self.log_file.close()
        with open(self.log_path, newline="") as f:  # '\r' kept as it is
            return rc, f.read()


@pytest.fixture(scope="module")
def runs(toy_cache, tmp_path_factory):
    env = toy_env()
    env["OMP_NUM_THREADS"] = "1"
    base = tmp_path_factory.mktemp("train_runs")
    started = {}
    try:
        for name, change in VARIANTS.items():
            repo = make_toy_repo(str(base / name), time_budget=3)
            change(os.path.join(repo, "train.py"))
            started[name] = TrainRun(repo, env)
        started["terminal"] = TrainRun(make_toy_repo(str(base / "terminal"), time_budget=3), env, terminal=True)
        yield started
    finally:
        for run in started.values():
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()
            run.log_file.close()


@pytest.fixture(scope="module", autouse=True)
def start_runs_early(request):
    """Start the toy runs with the module's first test when any test that needs them is
    selected, so that they overlap with the unit tests."""
    if any(item.module is request.module and "runs" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("runs")


PROGRESS = (r"step \d{5} \(\d+\.\d%\) \| loss: \d+\.\d{6} \| lrm: \d\.\d\d \| dt: \d+ms \| "
            r"tok/sec: [\d,]+ \| mfu: n/a \| epoch: \d+ \| remaining: \d+s")


def summary_values(log):
    """The summary block at the end of a log: key -> value as a float, in the block's order."""
    return {k: float(v) for k, v in (line.split(":", 1) for line in log.rstrip("\n").splitlines()[-len(SUMMARY):])}


def test_toy_run_end_to_end(runs):
    rc, log = runs["baseline"].result()
    assert rc == 0, log[-3000:]
    check_summary(log)  # whole lines, no '\r'; the summary block last, every key in order
    lines = log.splitlines()
    values = summary_values(log)
    assert list(values) == [key for key, _ in SUMMARY]
    assert math.isfinite(values["val_bpb"]) and 0 < values["val_bpb"] < 20
    assert values["training_seconds"] >= 3.0 and values["total_seconds"] >= values["training_seconds"]
    assert values["num_steps"] > 2  # more than the uncounted compilation steps
    assert values["total_tokens_M"] == pytest.approx(values["num_steps"] * 4 * 64 / 1e6, abs=0.05)
    assert values["peak_vram_mb"] == 0.0 and values["mfu_percent"] == 0.0  # CPU: no VRAM, MFU n/a
    assert values["depth"] == 2

    # the startup lines, in order, before any progress line
    assert lines[0] == "device: cpu"
    assert re.fullmatch(r"attention: PyTorch .*no CUDA.*", lines[1]), lines[1]
    params = next(line for line in lines if line.startswith("parameters: "))
    counts = {k: int(v.replace(",", "")) for k, v in (part.rsplit(" ", 1) for part in params[12:].split(", "))}
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert values["num_params_M"] == round(counts["total"] / 1e6, 1)
    progress = [i for i, line in enumerate(lines) if line.startswith("step ")]
    assert progress and lines.index(params) < progress[0] < lines.index("---")
    for i in progress:
        assert re.fullmatch(PROGRESS, lines[i]), lines[i]
    # into a file, a line every 5 s and one for the last step: not a line a step
    assert len(progress) <= 2 + values["training_seconds"] // 5 < values["num_steps"] - 1, (len(progress), values)
    assert not any("FAIL" in line or "Traceback" in line for line in lines)


def test_toy_run_on_a_terminal_rewrites_one_progress_line(runs):
    rc, log = runs["terminal"].result()
    assert rc == 0, log[-3000:]
    startup, cr, rest = log.partition("\r")
    assert cr and rest.startswith("step "), f"on a terminal, progress should be one line rewritten after '\\r': {log!r}"
    progress, _, after = rest.partition("\n")
    updates = progress.split("\r")
    for update in updates:
        assert re.fullmatch(PROGRESS + " *", update), repr(update)
    assert "\r" not in startup and "\r" not in after, "startup lines and the summary are whole lines"
    check_summary(after)
    assert len(updates) == summary_values(after)["num_steps"] - 1  # every step after the first, each over the one before


def test_loop_clock_and_schedules(runs, ns):
    """Step by step, as the loop set them: progress on the clock that leaves out the first step,
    every group's lr from lr_multiplier, Muon's momentum and decayed weight decay; then the
    summary's training_seconds and MFU from the same clock."""
    rc, log = runs["trace"].result()
    assert rc == 0, log[-3000:]
    traces = [ast.literal_eval(line[len("trace "):]) for line in log.splitlines() if line.startswith("trace ")]
    summary = summary_values(log)
    budget, counted = 3.0, 0.0  # the toy copy's TIME_BUDGET; the seconds counted so far
    assert [t[0] for t in traces] == list(range(int(summary["num_steps"])))
    for step, progress, dt, groups in traces:
        assert progress == pytest.approx(min(counted / budget, 1.0), abs=1e-12), step
        for kind, lr, initial_lr, momentum, weight_decay in groups:
            assert lr == pytest.approx(initial_lr * ns["lr_multiplier"](progress)), (step, kind)
            if kind == "muon":
                assert momentum == pytest.approx(ns["muon_momentum"](step)), step
                assert weight_decay == pytest.approx(ns["WEIGHT_DECAY"] * (1 - progress)), step
        if step >= ns["UNCOUNTED_STEPS"]:
            counted += dt
    assert {kind for kind, *_ in traces[0][3]} == {"adamw", "muon"}
    assert counted >= budget > counted - traces[-1][2], "training stops at the first step past the budget"
    assert summary["training_seconds"] == pytest.approx(counted, abs=0.051)
    flops = float(re.search(r"^FLOPs per token: (\S+);", log, re.M).group(1))
    tokens = (len(traces) - ns["UNCOUNTED_STEPS"]) * 4 * 64
    assert summary["mfu_percent"] == pytest.approx(100 * flops * tokens / counted / 1e9, rel=1e-4)


def test_a_run_edited_as_an_agent_edits_keeps_the_contract(runs):
    """Another depth, learning rate, schedule, window pattern and activation, and no soft cap:
    the run still ends with the whole summary block, and the harness scores it."""
    rc, log = runs["agent"].result()
    assert rc == 0, log[-3000:]
    check_summary(log, depth=3)
    values = summary_values(log)
    assert values["depth"] == 3 and values["num_steps"] > 2
    assert math.isfinite(values["val_bpb"]) and 0 < values["val_bpb"] < 20
    assert "n_layer=3" in log and "window_pattern='SL'" in log


@pytest.mark.parametrize("variant", ["huge_lr", "huge_loss"])
def test_divergence_fails_fast(runs, variant):
    rc, log = runs[variant].result()
    assert rc != 0, log[-3000:]
    fails = [line for line in log.splitlines() if "FAIL" in line]
    assert len(fails) == 1, log[-3000:]
    step = int(re.search(r"at step (\d+)", fails[0]).group(1))
    assert step <= 5, f"divergence should stop the run within a few steps: {fails[0]}"
    assert log.rstrip("\n").splitlines()[-1] == fails[0], "FAIL should be the last line"
    assert "---" not in log.splitlines() and "val_bpb:" not in log
    assert "Traceback" not in log


def test_batch_size_that_does_not_divide(runs):
    rc, log = runs["bad_batch"].result()
    assert rc != 0
    lines = [line for line in log.splitlines() if line.strip()]
    assert len(lines) == 1, log
    assert "TOTAL_BATCH_SIZE" in lines[0] and "error" in lines[0].lower(), lines[0]
    assert "Traceback" not in log and "val_bpb" not in log

"""train.py, piece by piece and whole.

The functions are tested without running the training loop: the part of train.py above its
"# Setup" banner (platform plumbing, model, optimizer, hyperparameters, schedules) is executed
into a namespace, so every constant is the real one. The loop itself is tested by running toy-size
copies of train.py as subprocesses, edited the way an agent would edit them."""

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

from test_program import SUMMARY, check_summary, make_toy_repo, rewrite_constants, toy_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
SETUP_BANNER = "\n# Setup\n"


@pytest.fixture(scope="module")
def ns():
    """train.py's definitions (everything above '# Setup'), executed once into a dict."""
    with open(TRAIN) as f:
        source = f.read()
    assert source.count(SETUP_BANNER) == 1, "train.py's '# Setup' banner moved: update this fixture"
    namespace = {"__name__": "train_under_test"}
    exec(compile(source[: source.index(SETUP_BANNER)], TRAIN, "exec"), namespace)
    assert namespace["FLASH_ATTN"] is None
    return namespace


TINY = dict(sequence_len=32, vocab_size=96, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")


def tiny_model(ns, seed=0, **overrides):
    torch.manual_seed(seed)
    model = ns["GPT"](ns["GPTConfig"](**{**TINY, **overrides}))
    model.init_weights()
    return model


def random_grads(model, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)


# ---------------------------------------------------------------------------------------------
# Attention: the PyTorch fallback has Flash Attention's window semantics


def reference_attention(q, k, v, window):
    """Naive attention: query i sees keys max(0, i - window) .. i; GQA by repeating kv heads."""
    B, T, H, D = q.shape
    rep = H // k.size(2)
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    band = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        band[i, max(0, i - window): i + 1] = True
    scores = (q @ k.transpose(-2, -1)) * D ** -0.5
    scores = scores.masked_fill(~band, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def check_against_reference(attention_fn, B, T, H, H_kv, window):
    """attention_fn(q, k, v, window) equals the naive reference in float64, outputs and gradients.
    Returns the output and v."""
    gen = torch.Generator().manual_seed(T + H_kv + window)
    D = 16
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, H_kv, D, generator=gen, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, H_kv, D, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)

    y = attention_fn(q, k, v, window)
    y_ref = reference_attention(q, k, v, window)
    assert y.shape == (B, T, H, D)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((y * upstream).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), (q, k, v))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"d/d{name}: {m}")
    return y.detach(), v.detach()


@pytest.mark.parametrize("T, H, H_kv, window", [
    (64, 4, 4, 63),    # full: window = T - 1
    (64, 4, 4, 2048),  # full: window > T (an 'L' layer with a shorter batch)
    (64, 4, 4, 62),    # sliding window one short of full: only query 63 loses key 0
    (64, 4, 4, 16),    # sliding window
    (64, 4, 4, 0),     # the token itself only
    (64, 4, 2, 16),    # GQA, windowed
    (64, 4, 1, 63),    # GQA (multi-query), full
    (64, 4, 2, 0),     # GQA, the token itself only
])
def test_band_attention_matches_naive_reference(ns, T, H, H_kv, window):
    y, v = check_against_reference(ns["band_attention"], 2, T, H, H_kv, window)
    if window == 0:  # each query sees only itself: the output is its own value vector
        torch.testing.assert_close(y, v.repeat_interleave(H // H_kv, dim=2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T, H, H_kv, window", [
    (384, 4, 4, 200),  # three 128-token blocks: full, partial and empty blocks in the mask
    (384, 4, 4, 128),  # the band's edge on a block boundary
    (384, 4, 2, 129),  # GQA
    (384, 2, 2, 0),    # the token itself only
])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_matches_naive_reference(ns, monkeypatch, T, H, H_kv, window):
    """Compiled on CUDA, sliding windows run as flex_attention with band_block_mask. Run eagerly
    here, that path must give the band of Flash Attention's window_size=(window, 0). (Its gradients
    are checked on CPU with the pinned torch 2.9.1; torch 2.11's flex_attention has no CPU backward.)"""
    monkeypatch.setitem(ns["BLOCK_MASKS"], (T, window), ns["band_block_mask"](T, window, "cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    routed = []
    real_flex = ns["flex_attention"]
    monkeypatch.setitem(ns, "flex_attention", lambda *a, **kw: routed.append(1) or real_flex(*a, **kw))
    check_against_reference(ns["band_attention"], 1, T, H, H_kv, window)
    assert routed == [1], "band_attention did not take the flex_attention path"


def test_attention_without_flash_routes_to_band_attention(ns, monkeypatch):
    calls = []
    real = ns["band_attention"]

    def spy(q, k, v, window):
        calls.append(window)
        return real(q, k, v, window)

    monkeypatch.setitem(ns, "band_attention", spy)
    monkeypatch.setitem(ns, "FLASH_ATTN", None)
    q = torch.randn(1, 16, 2, 8)
    y = ns["attention"](q, q, q, 5)
    assert calls == [5]
    torch.testing.assert_close(y, reference_attention(q, q, q, 5))


def test_attention_with_flash_calls_it_with_causal_window(ns, monkeypatch):
    calls = []

    class FakeFlash:
        @staticmethod
        def flash_attn_func(q, k, v, causal, window_size):
            calls.append((causal, window_size))
            return torch.zeros_like(q), None  # FA3's interface may return (out, lse)

    monkeypatch.setitem(ns, "FLASH_ATTN", FakeFlash)
    q = torch.randn(1, 16, 2, 8)
    y = ns["attention"](q, q, q, 7)
    assert calls == [(True, (7, 0))]
    assert torch.equal(y, torch.zeros_like(q))


def test_setup_attention_on_cpu_says_pytorch_and_why(ns):
    line = ns["setup_attention"](torch.device("cpu"), 64, [32, 32, 64])
    assert "\n" not in line and line.startswith("attention:"), line
    assert "PyTorch" in line and "no CUDA" in line, line
    assert ns["FLASH_ATTN"] is None


@pytest.mark.parametrize("capability, repo", [((9, 0), "varunneal/flash-attention-3"),
                                              ((8, 9), "kernels-community/flash-attn3")])
def test_setup_attention_on_cuda_without_fa3_falls_back_with_block_masks(ns, monkeypatch, capability, repo):
    """On CUDA without the kernels package: PyTorch attention, a BlockMask for each sliding window
    (none for full layers), and a line naming the FA3 build it tried and why it failed."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setitem(sys.modules, "kernels", None)  # `from kernels import ...` fails
    made = []
    monkeypatch.setitem(ns, "band_block_mask", lambda seq_len, window, device: made.append((seq_len, window)) or window)
    monkeypatch.setitem(ns, "BLOCK_MASKS", {})
    line = ns["setup_attention"](torch.device("cuda"), 64, [32, 32, 63, 16, 64])
    assert sorted(made) == [(64, 16), (64, 32)]
    assert ns["BLOCK_MASKS"] == {(64, 16): 16, (64, 32): 32} and ns["FLASH_ATTN"] is None
    assert line.startswith("attention: PyTorch SDPA (sliding windows: flex_attention); ") and "\n" not in line, line
    assert f"FA3 from {repo} unavailable: ModuleNotFoundError" in line, line


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


def test_polar_express_coefficients_are_the_spec_ones(ns):
    assert ns["POLAR_EXPRESS_COEFFS"] == [
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ]


# ---------------------------------------------------------------------------------------------
# The optimizer: groups, the AdamW path against torch.optim.AdamW, the Muon path


def test_baseline_hyperparameters_match_spec(ns):
    assert (ns["EMBEDDING_LR"], ns["UNEMBEDDING_LR"], ns["MATRIX_LR"], ns["SCALAR_LR"]) == (0.6, 0.004, 0.04, 0.5)
    assert ns["WEIGHT_DECAY"] == 0.2 and tuple(ns["ADAM_BETAS"]) == (0.8, 0.95)
    assert (ns["WARMUP_RATIO"], ns["WARMDOWN_RATIO"], ns["FINAL_LR_FRAC"]) == (0.0, 0.5, 0.0)
    assert (ns["DEPTH"], ns["ASPECT_RATIO"], ns["HEAD_DIM"], ns["WINDOW_PATTERN"]) == (8, 64, 128, "SSSL")
    assert (ns["TOTAL_BATCH_SIZE"], ns["DEVICE_BATCH_SIZE"]) == (2**19, 128)


def test_optimizer_groups(ns):
    model = tiny_model(ns)
    opt = ns["build_optimizer"](model)
    scale = (TINY["n_embd"] / 768) ** -0.5
    groups = opt.param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in model.parameters()}, "every parameter is optimized, once"
    group_of = {id(p): g for g in groups for p in g["params"]}

    # Muon: every matrix inside the blocks, one group per shape
    muon = [g for g in groups if g["kind"] == "muon"]
    block_params = list(model.blocks.parameters())
    assert all(p.ndim == 2 and group_of[id(p)]["kind"] == "muon" for p in block_params)
    assert sum(len(g["params"]) for g in muon) == len(block_params)
    shapes = [g["params"][0].shape for g in muon]
    assert len(set(shapes)) == len(shapes), "one group per shape"
    assert set(shapes) == {p.shape for p in block_params}
    for g in muon:
        assert all(p.shape == g["params"][0].shape for p in g["params"])
        assert g["lr"] == g["initial_lr"] == ns["MATRIX_LR"] and g["weight_decay"] == ns["WEIGHT_DECAY"]
        assert g["beta2"] == 0.95

    # AdamW: embeddings, unembedding and scalars with the SPEC's learning rates
    expected = [(model.lm_head.weight, ns["UNEMBEDDING_LR"] * scale, ns["ADAM_BETAS"]),
                (model.wte.weight, ns["EMBEDDING_LR"] * scale, ns["ADAM_BETAS"]),
                (model.resid_lambdas, ns["SCALAR_LR"] * 0.01, ns["ADAM_BETAS"]),
                (model.x0_lambdas, ns["SCALAR_LR"], (0.96, 0.95))]
    expected += [(ve.weight, ns["EMBEDDING_LR"] * scale, ns["ADAM_BETAS"]) for ve in model.value_embeds.values()]
    assert len(model.value_embeds) == 2
    for p, lr, betas in expected:
        g = group_of[id(p)]
        assert g["kind"] == "adamw"
        assert g["lr"] == pytest.approx(lr, rel=1e-12) and g["initial_lr"] == g["lr"]
        assert tuple(g["betas"]) == tuple(betas) and g["eps"] == 1e-10 and g["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups if g["kind"] == "adamw") == len(expected)


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
# The model


def test_default_model_size_and_layout(ns):
    n_embd = -(-ns["DEPTH"] * ns["ASPECT_RATIO"] // ns["HEAD_DIM"]) * ns["HEAD_DIM"]
    assert (n_embd, n_embd // ns["HEAD_DIM"]) == (512, 4)
    config = ns["GPTConfig"](sequence_len=2048, vocab_size=8192, n_layer=ns["DEPTH"], n_head=4, n_kv_head=4,
                             n_embd=n_embd, window_pattern=ns["WINDOW_PATTERN"])
    assert config == ns["GPTConfig"]()  # the dataclass defaults are the baseline
    with torch.device("meta"):
        model = ns["GPT"](config)
    assert model.param_counts() == {"wte": 4_194_304, "value_embeds": 16_777_216, "lm_head": 4_194_304,
                                    "transformer_matrices": 25_166_336, "scalars": 16, "total": 50_332_176}
    assert model.windows == [1024, 1024, 1024, 2048, 1024, 1024, 1024, 2048]
    assert sorted(int(k) for k in model.value_embeds) == [1, 3, 5, 7]
    assert [b.attn.ve_gate is not None for b in model.blocks] == [i % 2 == 1 for i in range(8)]
    # MFU's numerator: 6 x the matmul parameters (blocks and lm_head) + attention's 12 x heads x
    # head_dim x keys seen a query, for six windows of 1024 (each query sees 1025 keys) and two full layers
    matmul_params = 25_166_336 + 4_194_304
    assert model.flops_per_token() == 6 * matmul_params + 12 * 4 * 128 * (6 * 1025 + 2 * 2048) == 239_115_264


@pytest.mark.parametrize("n_layer, pattern", [(1, "S"), (3, "S"), (4, "SSSL"), (5, "SSSL"), (6, "LS"), (7, "ssl")])
def test_window_sizes_last_layer_full(ns, n_layer, pattern):
    config = ns["GPTConfig"](sequence_len=256, n_layer=n_layer, window_pattern=pattern)
    windows = ns["GPT"].window_sizes(config)
    expected = [{"S": 128, "L": 256}[c] for c in (pattern.upper() * n_layer)[:n_layer]]
    expected[-1] = 256
    assert windows == expected
    # value embeddings on alternating layers, the last one included
    assert [ns["has_value_embedding"](i, n_layer) for i in range(n_layer)] == \
        [(n_layer - 1 - i) % 2 == 0 for i in range(n_layer)]


def test_init_weights(ns):
    model = tiny_model(ns, vocab_size=512)
    s = 3 ** 0.5 * TINY["n_embd"] ** -0.5
    for block in model.blocks:
        assert (block.attn.c_proj.weight == 0).all() and (block.mlp.c_proj.weight == 0).all()
        for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
            w = lin.weight
            assert w.abs().max() <= s and w.abs().max() > 0.9 * s and w.std().item() == pytest.approx(s / 3 ** 0.5, rel=0.1)
        if block.attn.ve_gate is not None:
            assert (block.attn.ve_gate.weight == 0).all()
    assert model.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    for ve in model.value_embeds.values():
        assert ve.weight.abs().max() <= s and ve.weight.std().item() == pytest.approx(s / 3 ** 0.5, rel=0.1)
    assert (model.resid_lambdas == 1.0).all() and (model.x0_lambdas == 0.1).all()
    assert model.wte.weight.dtype == torch.float32  # bf16 tables only on CUDA
    # rotary tables: position 0 is the identity rotation, base 10000
    assert torch.equal(model.cos[0, 0, 0], torch.ones(16)) and torch.equal(model.sin[0, 0, 0], torch.zeros(16))
    torch.testing.assert_close(model.cos[0, 1, 0, 1], torch.tensor(math.cos(10000 ** (-2 / 32))))


def test_value_embedding_gate_starts_at_one(ns, monkeypatch):
    """At init the gate is 2 * sigmoid(0) = 1: v is c_v(x) plus the value embedding itself."""
    model = tiny_model(ns)
    attn = next(b.attn for b in model.blocks if b.attn.ve_gate is not None)
    B, T, C = 2, 8, TINY["n_embd"]
    x = torch.randn(B, T, C)
    ve = torch.randn(B, T, attn.n_kv_head * attn.head_dim)
    seen = {}

    def capture(q, k, v, window):
        seen["v"] = v
        return torch.zeros_like(q)

    monkeypatch.setitem(ns, "attention", capture)
    attn(x, ve, model.cos[:, :T], model.sin[:, :T])
    expected = (attn.c_v(x) + ve).view(B, T, attn.n_kv_head, attn.head_dim)
    torch.testing.assert_close(seen["v"], expected)


def test_forward_losses(ns):
    model = tiny_model(ns)
    gen = torch.Generator().manual_seed(5)
    B, T = 3, TINY["sequence_len"]
    idx = torch.randint(0, TINY["vocab_size"], (B, T), generator=gen)
    targets = torch.randint(0, TINY["vocab_size"], (B, T), generator=gen)
    with torch.no_grad():
        loss = model(idx, targets)
        per_token = model(idx, targets, reduction="none")
        logits = model(idx)
    assert loss.shape == () and torch.isfinite(loss)
    assert per_token.shape == (B * T,)
    torch.testing.assert_close(per_token.mean(), loss)
    assert logits.shape == (B, T, TINY["vocab_size"]) and logits.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)))
    # at init (zero output projections, lm_head std 0.001) the model predicts nearly uniformly
    assert loss.item() == pytest.approx(math.log(TINY["vocab_size"]), rel=0.01)
    # shorter sequences than sequence_len work too
    with torch.no_grad():
        assert model(idx[:, :7], targets[:, :7].contiguous(), reduction="none").shape == (B * 7,)


def test_qk_norm_then_rotary_equals_rotary_then_norm(ns):
    """The model norms q and k before rotating them; the recipe rotates first. A rotation keeps
    the RMS, so both orders are the same function."""
    gen = torch.Generator().manual_seed(11)
    B, T, H, D = 2, 16, 3, 32
    x = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) * 3
    angles = torch.outer(torch.arange(T, dtype=torch.float64), torch.rand(D // 2, generator=gen, dtype=torch.float64))
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
    norm, rotary = ns["norm"], ns["apply_rotary_emb"]
    torch.testing.assert_close(rotary(norm(x), cos, sin), norm(rotary(x, cos, sin)))
    assert not torch.allclose(rotary(x, cos, sin), x)  # the rotation does something


def test_rotary_rotates_the_two_halves_of_each_head_together(ns):
    """The recipe's rotary, written out: the halves (x1, x2) of a head become
    (x1 cos + x2 sin, x2 cos - x1 sin)."""
    gen = torch.Generator().manual_seed(12)
    B, T, H, D = 2, 8, 3, 16
    x = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    angles = torch.rand(1, T, 1, D // 2, generator=gen, dtype=torch.float64) * 6
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    expected = torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
    torch.testing.assert_close(ns["apply_rotary_emb"](x, cos, sin), expected)


def test_evaluation_reuses_the_compiled_training_graph(ns, monkeypatch):
    """As train.py compiles it on CUDA: `model.losses` compiled once. Training steps, then
    evaluate_bpb (under no_grad, reduction='none') must run that same graph: no recompilation."""
    from torch._dynamo.testing import CompileCounter
    monkeypatch.setattr(torch._dynamo.config, "disable", False)  # the test session sets TORCH_COMPILE_DISABLE
    torch._dynamo.reset()
    model = tiny_model(ns)
    counter = CompileCounter()
    model.losses = torch.compile(model.losses, dynamic=False, backend=counter)
    gen = torch.Generator().manual_seed(12)
    B, T = 2, TINY["sequence_len"]
    idx = torch.randint(0, TINY["vocab_size"], (B, T), generator=gen)
    targets = torch.randint(0, TINY["vocab_size"], (B, T), generator=gen)
    for _ in range(2):
        model(idx, targets).backward()
    assert counter.frame_count == 1
    with torch.compiler.set_stance("fail_on_recompile"), torch.no_grad():
        per_token = model(idx, targets, reduction="none")
        loss = model(idx, targets)
    assert counter.frame_count == 1
    assert per_token.shape == (B * T,) and not per_token.requires_grad and per_token.grad_fn is None
    expected = F.cross_entropy(model.logits(idx).view(-1, TINY["vocab_size"]).detach(), targets.view(-1), reduction="none")
    torch.testing.assert_close(per_token, expected)
    assert loss.grad_fn is None  # under no_grad, nothing keeps the forward's activations alive
    torch.testing.assert_close(loss, expected.mean())
    torch._dynamo.reset()


def test_logits_soft_capped(ns):
    model = tiny_model(ns)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
        idx = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(6))
        raws = []  # lm_head's output: the logits before the cap
        model.lm_head.register_forward_hook(lambda module, inputs, output: raws.append(output))
        logits = model(idx)
    raw = raws[0].float()
    assert torch.isfinite(logits).all() and logits.abs().max() <= 15.0
    assert logits.abs().max() > 14.9, "the test should push logits into the cap"
    assert raw.abs().max() > 100
    torch.testing.assert_close(logits, 15 * torch.tanh(raw / 15))


@pytest.mark.parametrize("lm_head_scale, vocab_size", [(1.0, 96), (1e4, 96), (1.0, 100), (1.0, 97)])
def test_losses_equal_cross_entropy_of_the_capped_logits(ns, lm_head_scale, vocab_size):
    """`losses` takes logsumexp without the max subtraction that the soft cap makes unnecessary, picks
    the target logit with a mask and sums over pieces of the vocabulary (8, 4 and 1 piece for these
    vocabularies): it must still be F.cross_entropy, in value and gradient, also at the cap."""
    gen = torch.Generator().manual_seed(13)
    B, T = 2, TINY["sequence_len"]
    idx = torch.randint(0, vocab_size, (B, T), generator=gen)
    targets = torch.randint(0, vocab_size, (B, T), generator=gen)
    model = tiny_model(ns, vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
        for block in model.blocks:  # nonzero output projections: gradients reach every matrix
            block.attn.c_proj.weight.normal_(0, 0.05, generator=gen)
            block.mlp.c_proj.weight.normal_(0, 0.05, generator=gen)
    grads = lambda: [p.grad.clone() for p in model.parameters()]
    mean, ours = model.losses(idx, targets)
    mean.backward()
    our_grads = grads()
    model.zero_grad()
    theirs = F.cross_entropy(model.logits(idx).flatten(0, 1), targets.view(-1), reduction="none")
    theirs.mean().backward()
    torch.testing.assert_close(ours, theirs.detach())
    for a, b in zip(our_grads, grads()):
        torch.testing.assert_close(a, b)
    if lm_head_scale > 1:
        assert model.logits(idx).abs().max() > 14.9, "the test should push logits into the cap"


def test_backward_reaches_every_parameter(ns):
    model = tiny_model(ns)
    idx = torch.randint(0, TINY["vocab_size"], (2, TINY["sequence_len"]), generator=torch.Generator().manual_seed(8))
    model(idx, idx.roll(-1, dims=1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # zero-initialised output projections stop the gradient into the blocks' input matrices at
    # step 0, but they themselves receive one
    assert model.blocks[0].attn.c_proj.weight.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------
# Schedules and MFU


def test_lr_multiplier(ns):
    lrm = ns["lr_multiplier"]
    for progress in (0.0, 0.1, 0.3, 0.49, 0.4999):
        assert lrm(progress) == 1.0
    assert lrm(0.5) == pytest.approx(1.0)
    assert lrm(0.75) == pytest.approx(0.5)
    assert lrm(0.9) == pytest.approx(0.2)
    assert lrm(1.0) == pytest.approx(0.0, abs=1e-12)
    values = [lrm(i / 100) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "the multiplier never rises"


def test_lr_multiplier_warmup_and_final_fraction(ns, monkeypatch):
    monkeypatch.setitem(ns, "WARMUP_RATIO", 0.1)
    monkeypatch.setitem(ns, "FINAL_LR_FRAC", 0.1)
    lrm = ns["lr_multiplier"]
    assert lrm(0.0) == 0.0 and lrm(0.05) == pytest.approx(0.5) and lrm(0.1) == pytest.approx(1.0)
    assert lrm(0.5) == pytest.approx(1.0) and lrm(0.75) == pytest.approx(0.55) and lrm(1.0) == pytest.approx(0.1)


def test_muon_momentum(ns):
    mom = ns["muon_momentum"]
    assert mom(0) == pytest.approx(0.85)
    assert mom(150) == pytest.approx(0.90)
    assert mom(299) < 0.95
    assert mom(300) == pytest.approx(0.95) and mom(5000) == pytest.approx(0.95)


def test_peak_flops_cpu_is_zero(ns):
    assert ns["peak_flops"](torch.device("cpu")) == 0.0
    assert ns["peak_flops"](torch.device("meta")) == 0.0


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA B200", 2250e12),
    ("Some Future GPU 9000", 0.0),
])
def test_peak_flops_lookup(ns, monkeypatch, name, flops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert ns["peak_flops"](torch.device("cuda")) == flops


def test_peak_flops_table_order(ns, monkeypatch):
    table = ns["PEAK_BF16_FLOPS"]
    keys = [k for k, _ in table]
    for required in ("H100", "H200", "A100", "L40S", "4090", "3090"):
        assert any(required in k for k in keys), required
    assert keys.index("H100 PCIe") < keys.index("H100")
    # no entry is shadowed by an earlier one with a different number (first match wins)
    for key, flops in table:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, key=key: f"NVIDIA {key}")
        assert ns["peak_flops"](torch.device("cuda")) == flops, key


def test_private_compiler_names_train_py_uses_exist_in_this_torch():
    """On CUDA only, train.py sets an inductor option and stops inductor's compile workers after
    the first step: private torch names that no CPU run reaches. Each must exist in the torch that
    uv installs, or a CUDA run would crash where these tests pass."""
    import torch._inductor.async_compile  # noqa: F401 (loaded by torch.compile in train.py)
    import torch._inductor.config  # noqa: F401
    with open(TRAIN) as f:
        names = set(re.findall(r"torch\._inductor(?:\.\w+)+", f.read()))
    assert names, "no torch._inductor names found in train.py"
    for name in names:
        obj = torch
        for part in name.split(".")[1:]:
            assert hasattr(obj, part), f"{name}: torch {torch.__version__} has no {part}"
            obj = getattr(obj, part)


# ---------------------------------------------------------------------------------------------
# Whole runs: toy-size copies of train.py as subprocesses, started together (2 cores), with
# stdout going to a file as with `uv run train.py > run.log 2>&1`.


def edit(path, old, new):
    with open(path) as f:
        text = f.read()
    assert text.count(old) == 1, f"{old!r} not found exactly once in {path}"
    with open(path, "w") as f:
        f.write(text.replace(old, new))


TRACE = ("    print('trace', repr((step, progress, dt, [(g['kind'], g['lr'], g['initial_lr'], g.get('momentum'),"
         " g.get('weight_decay')) for g in optimizer.param_groups])), flush=True)\n")  # each step, as the loop set it

VARIANTS = {  # name -> edit of the toy copy's train.py
    "baseline": lambda train: None,
    "huge_lr": lambda train: rewrite_constants(train, {"MATRIX_LR": "1e30", "EMBEDDING_LR": "1e30"}),
    "huge_loss": lambda train: edit(train, "return losses.mean(), ", "return 1e6 * losses.mean(), "),
    "bad_batch": lambda train: rewrite_constants(train, {"TOTAL_BATCH_SIZE": "6 * 64"}),  # 4 x 64 per pass
    "trace": lambda train: (edit(train, "    dt = time.time() - t0\n", "    dt = time.time() - t0\n" + TRACE),
                            edit(train, "peak = peak_flops(device)\n", "peak = 1e9\n")),  # MFU on a CPU
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

"""Pins of the community baseline recipe: the values train.py starts from (hyperparameters,
parameter counts, initialisation, Polar Express coefficients, schedules, the loss) and the GPUs'
FLOP/s figures. An agent's first kept experiment changes some of these, and then these tests
fail by design: they protect the baseline, not the harness (see test_train.py and the others)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, TRAIN, SETUP_BANNER, tiny_model

import prepare

def test_polar_express_coefficients_are_the_spec_ones(ns):
    assert ns["POLAR_EXPRESS_COEFFS"] == [
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ]


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


@pytest.mark.parametrize("name, flops", [
    ("NVIDIA H100 80GB HBM3", 989.5e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA GeForce RTX 3090", 71e12),
    ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
    ("NVIDIA B200", 2250e12),
    ("Some Future GPU 9000", 0.0),
])
def test_peak_flops_lookup(monkeypatch, name, flops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert prepare.peak_flops(torch.device("cuda")) == flops


def test_peak_flops_table_order(monkeypatch):
    table = prepare.PEAK_BF16_FLOPS
    keys = [k for k, _ in table]
    for required in ("H100", "H200", "A100", "L40S", "4090", "3090"):
        assert any(required in k for k in keys), required
    assert keys.index("H100 PCIe") < keys.index("H100")
    # no entry is shadowed by an earlier one with a different number (first match wins)
    for key, flops in table:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, key=key: f"NVIDIA {key}")
        assert prepare.peak_flops(torch.device("cuda")) == flops, key


# ---------------------------------------------------------------------------------------------
# The loss: CrossEntropy is F.cross_entropy, for any finite logits, with or without a soft cap


@pytest.mark.parametrize("scale, vocab_size", [(1.0, 96), (1e4, 96), (1.0, 100), (1e4, 97), (30.0, 8192)])
def test_cross_entropy_equals_torch_for_any_finite_logits(ns, scale, vocab_size):
    """Value and gradient, for logits up to +-scale; the vocabulary in 8, 4 and 1 pieces."""
    gen = torch.Generator().manual_seed(int(scale) + vocab_size)
    logits = ((torch.rand(3, 5, vocab_size, generator=gen) * 2 - 1) * scale).requires_grad_()
    targets = torch.randint(0, vocab_size, (3, 5), generator=gen)
    ours = ns["CrossEntropy"].apply(logits, targets)
    theirs = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 5)
    assert ours.shape == (3, 5) and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * scale)
    upstream = torch.rand(3, 5, generator=gen)
    ours_grad, = torch.autograd.grad((ours * upstream).sum(), logits)
    theirs_grad, = torch.autograd.grad((theirs * upstream).sum(), logits)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=max(1e-5, 2e-8 * scale))  # fp32 ulps of the logits


def model_with_soft_cap(ns, cap):
    """The tiny model of a train.py whose soft cap line reads `return <cap>`."""
    with open(TRAIN) as f:
        source = f.read()
    line = "        return 15 * torch.tanh(logits / 15)  # soft cap\n"
    assert source.count(line) == 1, "train.py's soft cap line changed: update this test"
    source = source.replace(line, f"        return {cap}\n")
    namespace = {"__name__": "train_under_test"}
    exec(compile(source[: source.index(SETUP_BANNER)], TRAIN, "exec"), namespace)
    return tiny_model(namespace)


@pytest.mark.parametrize("cap", ["15 * torch.tanh(logits / 15)", "100 * torch.tanh(logits / 100)", "logits"])
def test_model_loss_is_the_cross_entropy_of_its_logits_whatever_the_cap(ns, cap):
    """The loss the model trains on is F.cross_entropy of the logits model(idx) returns, in value
    and in every parameter's gradient, also when the cap is raised or removed and raw logits
    reach 1e4 (a written-out log(sum(exp)) without a maximum overflows there)."""
    model = model_with_soft_cap(ns, cap)
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1e3, generator=gen)
        for block in model.blocks:  # nonzero output projections: gradients reach every matrix
            block.attn.c_proj.weight.normal_(0, 0.05, generator=gen)
            block.mlp.c_proj.weight.normal_(0, 0.05, generator=gen)
    B, T, V = 2, TINY["sequence_len"], TINY["vocab_size"]
    idx = torch.randint(0, V, (B, T), generator=gen)
    targets = torch.randint(0, V, (B, T), generator=gen)
    grads = lambda: [p.grad.clone() for p in model.parameters()]
    loss = model(idx, targets)
    loss.backward()
    ours = grads()
    model.zero_grad()
    logits = model(idx)
    theirs = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    theirs.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours, grads()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
    top = {"logits": 5e3, "100 * torch.tanh(logits / 100)": 99.0}.get(cap, 14.9)
    assert logits.abs().max() > top, "the test should push the logits to the cap, or to 1e4 without one"


def test_train_py_holds_the_research_only():
    """The baseline train.py is short and free of platform code (the harness, prepare.py, has it):
    no compiler internals, threads, hub kernels, flex_attention or FLOP/s table, and what is
    compiled is marked where it is defined or built."""
    with open(TRAIN) as f:
        source = f.read()
    lines = source.splitlines()
    assert len(lines) <= 480, len(lines)
    first = next(i for i, line in enumerate(lines, 1) if line.startswith(("def ", "class ", "@")))
    assert first <= 60, first
    for name in ("torch._", "threading", "kernels", "flex_attention", "create_block_mask", "989.5e12", "os.environ"):
        assert name not in source, name
    for compiled_def in ("@compiled(fullgraph=True)\ndef optimizer_steps(", "    @compiled\n    def hidden(",
                         "    @compiled\n    def loss("):
        assert compiled_def in source, compiled_def

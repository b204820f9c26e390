"""prepare.py's runtime utilities, the part of the harness that train.py imports besides the data:
the attention kernel and its PyTorch fallback, compilation, FLOP/s, MFU and memory figures."""

import ast
import re
import sys
import types

import pytest
import torch
from conftest import TRAIN

import prepare

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
def test_band_attention_matches_naive_reference(T, H, H_kv, window):
    y, v = check_against_reference(prepare.band_attention, 2, T, H, H_kv, window)
    if window == 0:  # each query sees only itself: the output is its own value vector
        torch.testing.assert_close(y, v.repeat_interleave(H // H_kv, dim=2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T, H, H_kv, window", [
    (384, 4, 4, 200),  # three 128-token blocks: full, partial and empty blocks in the mask
    (384, 4, 4, 128),  # the band's edge on a block boundary
    (384, 4, 2, 129),  # GQA
    (384, 2, 2, 0),    # the token itself only
])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_path_matches_naive_reference(monkeypatch, T, H, H_kv, window):
    """Compiled on CUDA, sliding windows run as flex_attention with band_block_mask. Run eagerly
    here, that path must give the band of Flash Attention's window_size=(window, 0). (Its gradients
    are checked on CPU with the pinned torch 2.9.1; torch 2.11's flex_attention has no CPU backward.)"""
    monkeypatch.setitem(prepare._block_masks, (T, window), prepare.band_block_mask(T, window, "cpu"))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    routed = []
    real_flex = prepare.flex_attention
    monkeypatch.setattr(prepare, "flex_attention", lambda *a, **kw: routed.append(1) or real_flex(*a, **kw))
    check_against_reference(prepare.band_attention, 1, T, H, H_kv, window)
    assert routed == [1], "band_attention did not take the flex_attention path"


def test_attention_without_flash_routes_to_band_attention(monkeypatch):
    calls = []
    real = prepare.band_attention

    def spy(q, k, v, window):
        calls.append(window)
        return real(q, k, v, window)

    monkeypatch.setattr(prepare, "band_attention", spy)
    monkeypatch.setattr(prepare, "_flash_attn", None)
    q = torch.randn(1, 16, 2, 8)
    y = prepare.attention(q, q, q, 5)
    assert calls == [5]
    torch.testing.assert_close(y, reference_attention(q, q, q, 5))


def test_attention_with_flash_calls_it_with_causal_window(monkeypatch):
    calls = []

    class FakeFlash:
        @staticmethod
        def flash_attn_func(q, k, v, causal, window_size):
            calls.append((causal, window_size))
            return torch.zeros_like(q), None  # FA3's interface may return (out, lse)

    monkeypatch.setattr(prepare, "_flash_attn", FakeFlash)
    q = torch.randn(1, 16, 2, 8)
    y = prepare.attention(q, q, q, 7)
    assert calls == [(True, (7, 0))]
    assert torch.equal(y, torch.zeros_like(q))


def test_setup_attention_on_cpu_says_pytorch_and_why():
    line = prepare.setup_attention(torch.device("cpu"), 64, [32, 32, 64])
    assert "\n" not in line and line.startswith("attention:"), line
    assert "PyTorch" in line and "no CUDA" in line, line
    assert prepare._flash_attn is None


@pytest.mark.parametrize("capability, repo, revision", [
    ((9, 0), "varunneal/flash-attention-3", "de87b9b5af06dd9984df595bef90b2eba44b181a"),
    ((8, 9), "kernels-community/flash-attn3", "9542c462013476380ce4b395b9ddc0e8118161ee")])
def test_setup_attention_on_cuda_without_fa3_falls_back_with_block_masks(monkeypatch, capability, repo, revision):
    """On CUDA without the kernels package: PyTorch attention, a BlockMask for each sliding window
    (none for full layers), and a line naming the FA3 build it tried and why it failed."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setitem(sys.modules, "kernels", None)  # `from kernels import ...` fails
    made = []
    monkeypatch.setattr(prepare, "band_block_mask", lambda seq_len, window, device: made.append((seq_len, window)) or window)
    monkeypatch.setattr(prepare, "_block_masks", {})
    line = prepare.setup_attention(torch.device("cuda"), 64, [32, 32, 63, 16, 64])
    assert sorted(made) == [(64, 16), (64, 32)]
    assert prepare._block_masks == {(64, 16): 16, (64, 32): 32} and prepare._flash_attn is None
    assert line.startswith("attention: PyTorch SDPA (sliding windows: flex_attention); ") and "\n" not in line, line
    assert f"FA3 from {repo}@{revision[:12]} unavailable: ModuleNotFoundError" in line, line


@pytest.mark.parametrize("capability, repo, revision", [
    ((9, 0), "varunneal/flash-attention-3", "de87b9b5af06dd9984df595bef90b2eba44b181a"),
    ((8, 0), "kernels-community/flash-attn3", "9542c462013476380ce4b395b9ddc0e8118161ee")])
def test_fa3_loads_at_the_pinned_revision_and_is_checked(monkeypatch, capability, repo, revision):
    """setup_attention asks the kernels hub for the pinned revision (never a moving branch), checks
    the kernel with a tiny call against PyTorch attention, and names repository and revision."""
    asked = []

    class Interface:  # a correct FA3 on CPU: PyTorch attention in FA3's calling convention
        @staticmethod
        def flash_attn_func(q, k, v, causal, window_size):
            assert causal and window_size[1] == 0
            return prepare.band_attention(q, k, v, window_size[0]), None

    def get_kernel(repo_id, revision=None, version=None):
        asked.append((repo_id, revision, version))
        return types.SimpleNamespace(flash_attn_interface=Interface)

    monkeypatch.setitem(sys.modules, "kernels", types.SimpleNamespace(get_kernel=get_kernel))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, dtype=None: torch.ones(*shape).normal_())
    line = prepare.setup_attention(torch.device("cuda"), 64, [32, 64])
    assert asked == [(repo, revision, None)]
    assert line == f"attention: Flash Attention 3 from {repo}@{revision[:12]}"
    assert prepare._flash_attn is Interface and prepare._block_masks == {}

    class Wrong(Interface):  # a kernel that loads but computes something else is refused
        @staticmethod
        def flash_attn_func(q, k, v, causal, window_size):
            return q * 0, None

    monkeypatch.setattr(Interface, "flash_attn_func", Wrong.flash_attn_func)
    monkeypatch.setattr(prepare, "band_block_mask", lambda seq_len, window, device: window)
    line = prepare.setup_attention(torch.device("cuda"), 64, [32, 64])
    assert prepare._flash_attn is None and prepare._block_masks == {(64, 32): 32}
    assert "differs from PyTorch attention" in line and line.startswith("attention: PyTorch SDPA"), line
    prepare.setup_attention(torch.device("cpu"), 64, [32, 64])  # leave the module as the other tests expect


def test_compiled_is_the_function_itself_without_cuda():
    def f(x):
        return x + 1
    assert prepare.compiled(f) is f
    assert prepare.compiled(fullgraph=True)(f) is f  # as a decorator with options


def test_compiled_on_cuda_compiles_with_static_shapes(monkeypatch):
    import torch._inductor.config as inductor
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: calls.append(kwargs) or ("compiled", fn))

    def f(x):
        return x
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setattr(prepare, "cpu_share", lambda: 3)
    import torch._functorch.config as functorch
    saved = (inductor.triton.autotune_pointwise, inductor.compile_threads,  # config modules: monkeypatch
             functorch.autograd_cache_allow_custom_autograd_functions)      # would delete the options
    try:
        inductor.triton.autotune_pointwise = True
        functorch.autograd_cache_allow_custom_autograd_functions = False
        assert prepare.compiled(f) == ("compiled", f)
        assert prepare.compiled(fullgraph=True)(f) == ("compiled", f)
        assert inductor.triton.autotune_pointwise is False
        assert inductor.compile_threads == 3  # the run's CPU share, not the host's cores
        assert functorch.autograd_cache_allow_custom_autograd_functions is True
    finally:
        (inductor.triton.autotune_pointwise, inductor.compile_threads,
         functorch.autograd_cache_allow_custom_autograd_functions) = saved
    assert calls == [{"dynamic": False}, {"dynamic": False, "fullgraph": True}]


def test_peak_flops_cpu_is_zero():
    assert prepare.peak_flops(torch.device("cpu")) == 0.0
    assert prepare.peak_flops(torch.device("meta")) == 0.0


def test_peak_flops_unknown_gpu_is_zero_and_mfu_is_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU 9000")
    assert prepare.peak_flops(torch.device("cuda")) == 0.0
    assert prepare.mfu_percent(1e15, torch.device("cuda")) is None
    assert prepare.mfu_percent(1e15, torch.device("cpu")) is None


def test_mfu_percent_against_the_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert prepare.mfu_percent(989.5e12 / 4, torch.device("cuda")) == pytest.approx(25.0)


def test_peak_memory_is_zero_where_the_device_keeps_no_count():
    assert prepare.peak_memory_mb(torch.device("cpu")) == 0.0


def test_private_compiler_names_prepare_py_uses_exist_in_this_torch():
    """On CUDA only, prepare.py sets inductor options: private torch names that no CPU run
    reaches. Each must exist in the torch that uv installs, or a CUDA run would crash where these
    tests pass."""
    import torch._inductor.config  # noqa: F401
    with open(prepare.__file__) as f:
        names = set(re.findall(r"\b(?:torch\._inductor|inductor|functorch)(?:\.\w+)+", f.read()))
    names = {"torch._inductor.config." + n[len("inductor."):] if n.startswith("inductor.") else
             "torch._functorch.config." + n[len("functorch."):] if n.startswith("functorch.") else n for n in names}
    assert names, "no inductor names found in prepare.py"
    for name in names:
        obj = torch
        for part in name.split(".")[1:]:
            assert hasattr(obj, part), f"{name}: torch {torch.__version__} has no {part}"
            obj = getattr(obj, part)


def test_prepare_docstring_lists_what_train_py_imports():
    """prepare.py's docstring is the runtime's API: every name train.py imports from it is there."""
    with open(TRAIN) as f:
        tree = ast.parse(f.read())
    names = [a.name for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "prepare"
             for a in node.names]
    assert "evaluate_bpb" in names and "compiled" in names, names
    api = prepare.__doc__[:prepare.__doc__.index("Importing it")]
    for name in names:
        assert re.search(rf"\b{name}\b", api), f"{name} is missing from prepare.py's docstring"

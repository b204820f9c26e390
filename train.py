"""
train.py: the GPT, its optimizer (MuonAdamW) and the 5-minute training loop. The agent edits
this file, and only this file: everything is fair game, from the architecture to the schedule.

Usage:
    uv run train.py > run.log 2>&1    # trains for TIME_BUDGET seconds, evaluates, prints a summary

The hyperparameters are the UPPER_CASE constants below; DEPTH is the one size knob. The run ends
with a `---` block whose `val_bpb:` line (validation bits per byte, lower is better) is the result.
"""

import gc
import math
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, default_device, evaluate_bpb, make_dataloader

t_start = time.time()

# ---------------------------------------------------------------------------------------------
# Platform plumbing: attention kernel and device facts. Rarely worth editing.

FLASH_ATTN = None  # Flash Attention 3's interface module once loaded; None = PyTorch attention
BLOCK_MASKS = {}   # (T, window) -> flex_attention BlockMask, for the compiled PyTorch path


def setup_attention(device, seq_len, windows):
    """Load FA3 from the kernels hub (checked by a tiny call); else PyTorch attention.
    Returns one line saying which path runs and why."""
    global FLASH_ATTN
    reason = "no CUDA device"
    if device.type == "cuda":
        repo = "varunneal/flash-attention-3" if torch.cuda.get_device_capability() == (9, 0) else "kernels-community/flash-attn3"
        try:
            from kernels import get_kernel
            module = get_kernel(repo)
            FLASH_ATTN = getattr(module, "flash_attn_interface", module)
            q = torch.randn(1, 256, 2, 64, device=device, dtype=torch.bfloat16)
            if not torch.allclose(attention(q, q, q, 64).float(), band_attention(q, q, q, 64).float(), atol=2e-2):
                raise RuntimeError("its output differs from PyTorch attention")
            return f"attention: Flash Attention 3 from {repo}"
        except Exception as e:
            FLASH_ATTN = None
            reason = f"FA3 from {repo} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        for w in set(windows):  # sliding windows run as block-sparse flex_attention when compiled
            if w < seq_len - 1:
                BLOCK_MASKS[(seq_len, w)] = band_block_mask(seq_len, w, device)
    return f"attention: PyTorch SDPA (sliding windows: {'flex_attention' if BLOCK_MASKS else 'masked SDPA'}); {reason}"


def in_band(q, k, window):
    """Whether query position q sees key position k: itself and the `window` tokens before it."""
    return (q >= k) & (q - k <= window)


def band_block_mask(seq_len, window, device):
    """The band as a flex_attention BlockMask."""
    return create_block_mask(lambda b, h, q, k: in_band(q, k, window), None, None, seq_len, seq_len, device=device)


def band_attention(q, k, v, window):  # (B, T, H, D) -> (B, T, H, D)
    """PyTorch attention, same semantics as FA3's window_size=(window, 0): a query sees itself and
    the `window` tokens before it."""
    T = q.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    gqa = q.size(1) != k.size(1)
    if window >= T - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif torch.compiler.is_compiling() and (T, window) in BLOCK_MASKS:
        y = flex_attention(q, k, v, block_mask=BLOCK_MASKS[(T, window)], enable_gqa=gqa)
    else:
        i = torch.arange(T, device=q.device)
        band = in_band(i[:, None], i[None, :], window)  # (T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=band, enable_gqa=gqa)
    return y.transpose(1, 2)


def attention(q, k, v, window):  # (B, T, H, D) -> (B, T, H, D)
    if FLASH_ATTN is not None:
        y = FLASH_ATTN.flash_attn_func(q, k, v, causal=True, window_size=(window, 0))
        return y[0] if isinstance(y, tuple) else y
    return band_attention(q, k, v, window)


PEAK_BF16_FLOPS = [  # dense bf16 tensor-core FLOP/s by device-name substring; first match wins
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H200 NVL", 835e12), ("H200", 989.5e12),
    ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX 4090", 165.2e12), ("RTX 3090", 71e12),
]


def peak_flops(device):
    """Peak bf16 FLOP/s of this GPU, or 0 when unknown (then MFU is reported as n/a)."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), 0.0)


# ---------------------------------------------------------------------------------------------
# Model (edit freely)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):  # x (B, T, H, D); cos, sin (1, T, 1, D/2)
    # the halves (x1, x2) of each head become (x1 cos + x2 sin, x2 cos - x1 sin), written as one
    # multiply-add with the halves swapped by a roll: compiled, faster than a torch.cat of the halves
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, the last one included


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        self.window = window
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.ve_gate_channels = 32
        self.ve_gate = nn.Linear(self.ve_gate_channels, self.n_kv_head, bias=False) \
            if has_value_embedding(layer_idx, config.n_layer) else None

    def forward(self, x, ve, cos, sin):  # x (B, T, C); ve (B, T, kv_dim) or None
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # value embedding (ResFormer), mixed in by a gate that starts at 1
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate_channels]))  # (B, T, n_kv_head)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        # QK-norm, then rotary: the same as rotary then norm (a rotation keeps the RMS), but the
        # compiled backward of this order is faster
        q, k = norm(q), norm(k)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        y = attention(q, k, v, self.window)  # (B, T, H, D)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx, window):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx, window)
        self.mlp = MLP(config)

    def forward(self, x, x0, resid_lambda, x0_lambda, ve, cos, sin):
        x = resid_lambda * x + x0_lambda * x0
        x = x + self.attn(norm(x), ve, cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.windows = self.window_sizes(config)
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config, i, w) for i, w in enumerate(self.windows)])
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                           for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)})
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        head_dim = config.n_embd // config.n_head
        self.register_buffer("cos", torch.empty(1, config.sequence_len, 1, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(1, config.sequence_len, 1, head_dim // 2), persistent=False)

    @staticmethod
    def window_sizes(config):
        """Per-layer window: 'L' = full context, 'S' = half of it; the last layer is always 'L'."""
        pattern = (config.window_pattern * config.n_layer)[:config.n_layer - 1] + "L"
        sizes = {"L": config.sequence_len, "S": config.sequence_len // 2}
        return [sizes[c] for c in pattern.upper()]

    @torch.no_grad()
    def init_weights(self):
        n_embd = self.config.n_embd
        s = 3 ** 0.5 * n_embd ** -0.5  # uniform bound with the std of N(0, 1/n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        # rotary embeddings, base 10000: the two halves of each head are rotated together
        head_dim = n_embd // self.config.n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=self.cos.device) / head_dim))
        angles = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=self.cos.device), inv_freq)
        self.cos.copy_(angles.cos()[None, :, None, :])
        self.sin.copy_(angles.sin()[None, :, None, :])
        if self.wte.weight.device.type == "cuda":  # embedding tables in bf16 (autocast runs in bf16)
            self.wte.to(torch.bfloat16)
            self.value_embeds.to(torch.bfloat16)
            self.cos.data, self.sin.data = self.cos.bfloat16(), self.sin.bfloat16()

    def param_counts(self):
        count = lambda params: sum(p.numel() for p in params)
        return {
            "wte": count(self.wte.parameters()),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": count(self.lm_head.parameters()),
            "transformer_matrices": count(self.blocks.parameters()),
            "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
            "total": count(self.parameters()),
        }

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 x matmul params + attention scores."""
        counts = self.param_counts()
        matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w + 1, self.config.sequence_len) for w in self.windows)
        return 6 * matmul_params + attn

    def forward(self, idx, targets=None, reduction="mean"):  # idx (B, T) -> logits (B, T, V), or a loss
        if targets is None:
            return self.logits(idx)
        with torch.enable_grad():  # even under no_grad: evaluation reuses the compiled training graph
            loss, token_losses = self.losses(idx, targets)
        if reduction == "none":
            return token_losses  # (B*T,), without gradient
        return loss if torch.is_grad_enabled() else loss.detach()

    def logits(self, idx):  # idx (B, T) -> soft-capped logits (B, T, V), fp32
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, cos, sin)
        logits = self.lm_head(norm(x)).float()
        return 15 * torch.tanh(logits / 15)  # soft cap

    def losses(self, idx, targets):  # -> mean loss (to train on), per-token losses (B*T,) (to evaluate)
        logits = self.logits(idx)  # (B, T, V); flattened here, the compiled backward would take 4 GB more
        # cross entropy = log(sum(exp(logits))) - logits[target]. The soft cap keeps exp(logits) within
        # [e^-15, e^15], so no max is subtracted first; a mask (not a gather) picks the target, so the
        # backward is elementwise: compiled, one kernel, the gradient written over the logits. Both sums
        # run over 8 pieces of the vocabulary, then over the pieces: compiled, a piece of 1024 fits in
        # registers, and the forward kernel runs faster than one loop over the whole vocabulary
        is_target = torch.arange(logits.size(-1), device=logits.device) == targets[..., None]  # (B, T, V)
        pieces = math.gcd(logits.size(-1), 8)
        vocab_sum = lambda t: t.unflatten(-1, (pieces, -1)).sum(-1).sum(-1)  # (B, T, V) -> (B, T)
        losses = (torch.log(vocab_sum(torch.exp(logits))) - vocab_sum(torch.where(is_target, logits, 0))).view(-1)
        return losses.mean(), losses.detach()


# ---------------------------------------------------------------------------------------------
# Optimizer: AdamW for embeddings and scalars, Muon for the matrices inside the blocks (edit freely)

POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def adamw_step(p, grad, exp_avg, exp_avg_sq, step_t, lr_t, beta1_t, beta2_t, eps_t, wd_t):
    p.mul_(1 - lr_t * wd_t)
    exp_avg.lerp_(grad, 1 - beta1_t)
    exp_avg_sq.lerp_(grad.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t ** step_t
    bias2 = 1 - beta2_t ** step_t
    p.add_(-(lr_t / bias1) * exp_avg / ((exp_avg_sq / bias2).sqrt() + eps_t))


def orthogonalize(g):  # (N, rows, cols): Polar Express iterations toward the nearest orthogonal matrix
    X = g.bfloat16()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide side, so that A = X X^T is the smaller square
        X = X.mT
    for a, b, c in POLAR_EXPRESS_COEFFS:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a, alpha=1)  # a X + B X
    return X.mT if tall else X


def muon_step(grads, params, momentum_buf, second_moment_buf, momentum_t, lr_t, wd_t, beta2_t):
    # Nesterov momentum
    momentum = momentum_t.to(grads.dtype)
    momentum_buf.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buf, momentum)
    g = orthogonalize(g)
    # NorMuon: a second-moment EMA along the longer side, rescaled to keep the update's norm
    red_dim = -1 if g.size(-2) >= g.size(-1) else -2
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    n = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n).sqrt()
    second_moment_buf.lerp_(v_mean.to(second_moment_buf.dtype), 1 - beta2_t)
    step_size = second_moment_buf.clamp_min(1e-10).rsqrt()
    v_norm_new = ((v_mean * n) * step_size.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay (only where update and parameter agree in sign), then the update
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


def optimizer_steps(adamw_updates, muon_updates):  # every update in one call: compiled as one graph
    for args in adamw_updates:
        adamw_step(*args)
    for args in muon_updates:
        muon_step(*args)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two kinds of groups: kind='adamw' (per parameter) and kind='muon' (all
    parameters of a group share a shape and are updated as one stacked tensor)."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        self.num_steps = 0
        for group in self.param_groups:  # hyperparameters as 0-d CPU tensors: changing them never recompiles
            group["t"] = {k: torch.tensor(0.0) for k in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}

    @torch.no_grad()
    def step(self):
        self.num_steps += 1
        adamw, muon, stacks = [], [], []
        for group in self.param_groups:
            t, params = group["t"], group["params"]
            if group["kind"] == "adamw":
                for k, v in dict(step=self.num_steps, lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                                 eps=group["eps"], wd=group["weight_decay"]).items():
                    t[k].fill_(v)
                for p in params:
                    state = self.state[p]
                    if not state:
                        state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    adamw.append((p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                                  t["step"], t["lr"], t["beta1"], t["beta2"], t["eps"], t["wd"]))
            else:
                rows, cols = params[0].shape
                for k, v in dict(momentum=group["momentum"], lr=group["lr"] * max(1.0, rows / cols) ** 0.5,
                                 wd=group["weight_decay"], beta2=group["beta2"]).items():
                    t[k].fill_(v)
                state = self.state[params[0]]
                if not state:
                    state["momentum_buffer"] = torch.zeros(len(params), rows, cols, dtype=params[0].dtype, device=params[0].device)
                    moment_shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
                    state["second_moment_buffer"] = torch.zeros(moment_shape, dtype=torch.float32, device=params[0].device)
                stacked = torch.stack(params)
                stacks.append((params, stacked))
                muon.append((torch.stack([p.grad for p in params]), stacked, state["momentum_buffer"],
                             state["second_moment_buffer"], t["momentum"], t["lr"], t["wd"], t["beta2"]))
        optimizer_steps(adamw, muon)
        for params, stacked in stacks:
            torch._foreach_copy_(params, list(stacked.unbind(0)))


def build_optimizer(model):
    dmodel_scale = (model.config.n_embd / 768) ** -0.5  # AdamW lrs were tuned at width 768
    adamw = dict(kind="adamw", betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0)
    groups = [
        dict(params=list(model.lm_head.parameters()), lr=UNEMBEDDING_LR * dmodel_scale, **adamw),
        dict(params=list(model.wte.parameters()), lr=EMBEDDING_LR * dmodel_scale, **adamw),
        dict(params=list(model.value_embeds.parameters()), lr=EMBEDDING_LR * dmodel_scale, **adamw),
        dict(params=[model.resid_lambdas], lr=SCALAR_LR * 0.01, **adamw),
        dict(params=[model.x0_lambdas], lr=SCALAR_LR, **{**adamw, "betas": (0.96, 0.95)}),
    ]
    matrices = list(model.blocks.parameters())
    for shape in sorted({p.shape for p in matrices}):
        groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=MATRIX_LR,
                           momentum=0.95, beta2=0.95, weight_decay=WEIGHT_DECAY))
    optimizer = MuonAdamW(groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


# ---------------------------------------------------------------------------------------------
# Hyperparameters (edit freely)

DEPTH = 8                  # transformer blocks: the one size knob, the rest is derived
ASPECT_RATIO = 64          # n_embd = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128             # attention head size; n_head = n_embd // HEAD_DIM
WINDOW_PATTERN = "SSSL"    # per layer, repeated: S = half-context sliding window, L = full context
TOTAL_BATCH_SIZE = 2**19   # tokens per optimizer step (gradient accumulation fills the rest)
DEVICE_BATCH_SIZE = 128    # rows of MAX_SEQ_LEN tokens per forward/backward pass
EMBEDDING_LR = 0.6         # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004     # AdamW, lm_head
MATRIX_LR = 0.04           # Muon, every matrix inside the blocks
SCALAR_LR = 0.5            # AdamW, x0_lambdas (resid_lambdas get 1% of it)
WEIGHT_DECAY = 0.2         # Muon's cautious weight decay, decayed linearly to 0
ADAM_BETAS = (0.8, 0.95)   # AdamW betas
WARMUP_RATIO = 0.0         # fraction of the time budget spent warming the lr up
WARMDOWN_RATIO = 0.5       # fraction of the time budget spent decaying the lr to FINAL_LR_FRAC
FINAL_LR_FRAC = 0.0        # lr multiplier at the end of training
UNCOUNTED_STEPS = 1        # first steps (compilation) are not counted against TIME_BUDGET


def lr_multiplier(progress):  # progress = counted training seconds / TIME_BUDGET
    if progress < WARMUP_RATIO:
        return progress / WARMUP_RATIO
    if progress < 1.0 - WARMDOWN_RATIO:
        return 1.0
    return FINAL_LR_FRAC + (1.0 - FINAL_LR_FRAC) * (1.0 - progress) / WARMDOWN_RATIO


def muon_momentum(step):  # warmed from 0.85 to 0.95 over the first 300 steps
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# ---------------------------------------------------------------------------------------------
# Setup

torch.manual_seed(42)
device = default_device()
is_cuda = device.type == "cuda"
if is_cuda:
    torch.cuda.manual_seed(42)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
# bf16 autocast on CUDA only: on CPU it makes backward hundreds of times slower
autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if is_cuda else torch.autocast("cpu", enabled=False)
tokens_per_fwdbwd = DEVICE_BATCH_SIZE * MAX_SEQ_LEN
if TOTAL_BATCH_SIZE % tokens_per_fwdbwd != 0:
    sys.exit(f"error: TOTAL_BATCH_SIZE ({TOTAL_BATCH_SIZE}) must be a multiple of DEVICE_BATCH_SIZE x MAX_SEQ_LEN "
             f"({DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN} = {tokens_per_fwdbwd})")
grad_accum_steps = TOTAL_BATCH_SIZE // tokens_per_fwdbwd

tokenizer = Tokenizer.from_directory()
n_embd = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
config = GPTConfig(sequence_len=MAX_SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=DEPTH,
                   n_head=n_embd // HEAD_DIM, n_kv_head=n_embd // HEAD_DIM, n_embd=n_embd, window_pattern=WINDOW_PATTERN)
with torch.device("meta"):
    model = GPT(config)
model.to_empty(device=device)
model.init_weights()
optimizer = build_optimizer(model)
attention_line = setup_attention(device, MAX_SEQ_LEN, model.windows)
if is_cuda:  # two compiled graphs: the model's losses (forward and backward) and the optimizer step
    torch._inductor.config.triton.autotune_pointwise = False  # no launch-config benchmarks: 5 s less cold compile
    model.losses = torch.compile(model.losses, dynamic=False)
    optimizer_steps = torch.compile(optimizer_steps, dynamic=False, fullgraph=True)

counts = model.param_counts()
flops_per_token = model.flops_per_token()
peak = peak_flops(device)
print(f"device: {device}{' (' + torch.cuda.get_device_name(device) + ')' if is_cuda else ''}")
print(attention_line)
print(f"config: {config}")
print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
print(f"FLOPs per token: {flops_per_token:e}; batch: {TOTAL_BATCH_SIZE:,} tokens = {grad_accum_steps} x "
      f"{DEVICE_BATCH_SIZE} x {MAX_SEQ_LEN}; time budget: {TIME_BUDGET}s", flush=True)

# ---------------------------------------------------------------------------------------------
# Training loop

train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train", device=device)
x, y, epoch = next(train_loader)
t_loop = time.time()
print(f"startup: {t_loop - t_start:.1f}s", flush=True)
interactive = sys.stdout.isatty()
step, training_time, smooth_loss, last_print = 0, 0.0, 0.0, 0.0


def check_loss(loss):
    if not math.isfinite(loss) or loss > 100:
        print(f"\nFAIL: training diverged (loss {loss}) at step {step}")
        sys.exit(1)


while True:
    t0 = time.time()
    for _ in range(grad_accum_steps):
        with autocast:
            loss = model(x, y)
        (loss / grad_accum_steps).backward()
        x, y, epoch = next(train_loader)  # the loader works ahead in background threads
    progress = min(training_time / TIME_BUDGET, 1.0)
    lrm = lr_multiplier(progress)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step)
            group["weight_decay"] = WEIGHT_DECAY * (1 - progress)
    optimizer.step()
    model.zero_grad(set_to_none=True)

    last_loss = loss.item()  # waits for the GPU to finish this step (all of it queued by now)
    check_loss(last_loss)
    smooth_loss = 0.9 * smooth_loss + 0.1 * last_loss
    if step == 0:
        gc.collect()  # everything allocated so far lives for the whole run
        gc.freeze()
        gc.disable()
        if is_cuda:  # compiled: stop the compiler's worker processes (GBs of RAM) now, in the background
            threading.Thread(target=torch._inductor.async_compile.shutdown_compile_workers).start()
    dt = time.time() - t0
    if step >= UNCOUNTED_STEPS:
        training_time += dt
    step += 1
    if step == UNCOUNTED_STEPS:
        print(f"compilation: {time.time() - t_loop:.1f}s (the first {step} step(s), not counted)", flush=True)

    now = time.time()
    if step > 1 and (interactive or now - last_print >= 5 or training_time >= TIME_BUDGET):
        debiased = smooth_loss / (1 - 0.9 ** step)
        tok_per_sec = TOTAL_BATCH_SIZE / dt
        mfu = f"{100 * flops_per_token * tok_per_sec / peak:.1f}%" if peak else "n/a"
        line = (f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | dt: {1000 * dt:.0f}ms"
                f" | tok/sec: {tok_per_sec:,.0f} | mfu: {mfu} | epoch: {epoch} | remaining: {max(TIME_BUDGET - training_time, 0):.0f}s")
        print(f"\r{line}   " if interactive else line, end="" if interactive else "\n", flush=True)
        last_print = now
    if step > UNCOUNTED_STEPS and training_time >= TIME_BUDGET:
        break

if interactive:
    print()

# ---------------------------------------------------------------------------------------------
# Final evaluation and summary

t_eval = time.time()
with torch.compiler.set_stance("eager_on_recompile"), autocast:  # the training graph; never a recompilation
    val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
print(f"evaluation: {time.time() - t_eval:.1f}s")
counted_steps = step - UNCOUNTED_STEPS
tokens = step * TOTAL_BATCH_SIZE
mfu_percent = 100 * flops_per_token * counted_steps * TOTAL_BATCH_SIZE / training_time / peak if peak else 0.0
peak_vram_mb = torch.cuda.max_memory_allocated() / 1024 / 1024 if is_cuda else 0.0
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {training_time:.1f}")
print(f"total_seconds:    {time.time() - t_start:.1f}")
print(f"peak_vram_mb:     {peak_vram_mb:.1f}")
print(f"mfu_percent:      {mfu_percent:.2f}")
print(f"total_tokens_M:   {tokens / 1e6:.1f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {counts['total'] / 1e6:.1f}")
print(f"depth:            {DEPTH}")

"""
train.py: the research. The GPT, its optimizer (MuonAdamW) and the 5-minute training loop. The
agent edits this file, and only this file: everything is fair game, from the architecture to the
schedule. The platform (data, attention kernel, compilation, FLOP/s, the metric) is prepare.py's.

Usage:
    uv run train.py > run.log 2>&1    # trains for TIME_BUDGET seconds, evaluates, prints a summary

The hyperparameters are the UPPER_CASE constants below; DEPTH is the one size knob. The run ends
with a `---` block whose `val_bpb:` line (validation bits per byte, lower is better) is the result.
"""

import functools
import gc
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import (MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, attention, compiled, default_device, evaluate_bpb,
                     make_dataloader, mfu_percent, peak_memory_mb, setup_attention)

t_start = time.time()

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
    # halves (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin), as one multiply-add with a roll (faster than cat)
    cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, -sin], -1)
    return x * cos + x.roll(x.size(-1) // 2, -1) * sin


def has_value_embedding(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2  # alternating layers, the last one included


class CrossEntropy(torch.autograd.Function):
    """F.cross_entropy per token, logits (B, T, V), targets (B, T) -> (B, T), compiled: the forward reads the
    logits once (8 pieces' log-sum-exps, combined elementwise); the backward writes softmax - one_hot over them."""

    @staticmethod
    def forward(ctx, logits, targets):
        pieces = logits.unflatten(-1, (math.gcd(logits.size(-1), 8), -1))  # (B, T, P, V/P)
        piece_max = pieces.amax(-1)  # (B, T, P)
        piece_lse = piece_max + torch.log(torch.exp(pieces - piece_max[..., None]).sum(-1))  # (B, T, P)
        lse = functools.reduce(torch.logaddexp, piece_lse.unbind(-1))  # (B, T); no buffer for a max over P
        ctx.save_for_backward(logits, lse, targets)
        return lse - logits.gather(-1, targets[..., None]).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):  # grad (B, T)
        logits, lse, targets = ctx.saved_tensors
        is_target = torch.arange(logits.size(-1), device=logits.device) == targets[..., None]  # (B, T, V)
        return (torch.exp(logits - lse[..., None]) - is_target.float()) * grad[..., None], None


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
        # QK-norm, then rotary: the same as the reverse (a rotation keeps the RMS); its compiled backward is faster
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
        return [{"L": config.sequence_len, "S": config.sequence_len // 2}[c] for c in pattern.upper()]

    @torch.no_grad()
    def init_weights(self):
        s = 3 ** 0.5 * self.config.n_embd ** -0.5  # uniform bound with the std of N(0, 1/n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            for lin in (block.attn.c_proj, block.mlp.c_proj, block.attn.ve_gate):
                if lin is not None:
                    nn.init.zeros_(lin.weight)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        # rotary embeddings, base 10000: the two halves of each head are rotated together
        head_dim = self.config.n_embd // self.config.n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=self.cos.device) / head_dim))
        angles = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32, device=self.cos.device), inv_freq)
        self.cos.copy_(angles.cos()[None, :, None, :])
        self.sin.copy_(angles.sin()[None, :, None, :])
        if self.wte.weight.device.type == "cuda":  # embedding tables in bf16 (autocast runs in bf16)
            self.wte.to(torch.bfloat16)
            self.value_embeds.to(torch.bfloat16)
            self.cos.data, self.sin.data = self.cos.bfloat16(), self.sin.bfloat16()

    def param_counts(self):
        count = lambda module: sum(p.numel() for p in module.parameters())
        return {"wte": count(self.wte), "value_embeds": count(self.value_embeds), "lm_head": count(self.lm_head),
                "transformer_matrices": count(self.blocks), "scalars": self.resid_lambdas.numel() + self.x0_lambdas.numel(),
                "total": count(self)}

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward): 6 x matmul params + attention scores."""
        counts = self.param_counts()
        matmul_params = counts["total"] - counts["wte"] - counts["value_embeds"] - counts["scalars"]
        head_dim = self.config.n_embd // self.config.n_head
        attn = sum(12 * self.config.n_head * head_dim * min(w + 1, self.config.sequence_len) for w in self.windows)
        return 6 * matmul_params + attn

    def forward(self, idx, targets=None):  # idx (B, T) -> logits (B, T, V), or the mean loss given targets (B, T)
        grad = torch.is_grad_enabled()
        with torch.enable_grad():  # under no_grad (evaluation) too, hidden's compiled training graph: no second compile
            x = self.hidden(idx) if grad else self.hidden(idx).detach()  # detached: its saved activations freed
        return self.logits(x) if targets is None else self.loss(x, targets)

    @compiled
    def hidden(self, idx):  # idx (B, T) -> the last block's output (B, T, C)
        cos, sin = self.cos[:, :idx.size(1)], self.sin[:, :idx.size(1)]
        x = x0 = norm(self.wte(idx))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], ve, cos, sin)
        return x

    def logits(self, x):  # x (B, T, C) -> soft-capped logits (B, T, V), fp32
        logits = self.lm_head(norm(x)).float()
        return 15 * torch.tanh(logits / 15)  # soft cap

    @compiled
    def loss(self, x, targets):  # x (B, T, C), targets (B, T) -> the mean cross entropy
        return CrossEntropy.apply(self.logits(x), targets).mean()


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
    bias1, bias2 = 1 - beta1_t ** step_t, 1 - beta2_t ** step_t
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
    momentum = momentum_t.to(grads.dtype)  # Nesterov momentum
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


@compiled(fullgraph=True)
def optimizer_steps(adamw_updates, muon_updates):  # every update in one call, compiled as one graph
    for args in adamw_updates:
        adamw_step(*args)
    for args in muon_updates:
        muon_step(*args)


class MuonAdamW(torch.optim.Optimizer):
    """Groups of kind='adamw' (per parameter) and kind='muon' (one shape, updated as one stacked tensor)."""

    def __init__(self, param_groups):
        super().__init__(param_groups, defaults={})
        self.num_steps = 0
        for group in self.param_groups:  # hyperparameters as 0-d CPU tensors: changing them never recompiles
            group["t"] = {k: torch.tensor(0.0) for k in ("step", "lr", "beta1", "beta2", "eps", "wd", "momentum")}
            group["initial_lr"] = group["lr"]  # the schedule multiplies this

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
            for p, updated in zip(params, stacked.unbind(0)):
                p.copy_(updated)


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
    return MuonAdamW(groups)


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
    return 0.85 + 0.10 * min(step / 300, 1.0)


# ---------------------------------------------------------------------------------------------
# Setup

torch.manual_seed(42)
device = default_device()
is_cuda = device.type == "cuda"
torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (outside autocast) in TF32 on CUDA
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

counts = model.param_counts()
flops_per_token = model.flops_per_token()
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

while step <= UNCOUNTED_STEPS or training_time < TIME_BUDGET:  # the uncounted steps, then TIME_BUDGET seconds
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
    if not math.isfinite(last_loss) or last_loss > 100:
        print(f"\nFAIL: training diverged (loss {last_loss}) at step {step}")
        sys.exit(1)
    smooth_loss = 0.9 * smooth_loss + 0.1 * last_loss
    if step == 0:
        gc.collect()  # everything allocated so far lives for the whole run
        gc.freeze()
        gc.disable()
    dt = time.time() - t0
    if step >= UNCOUNTED_STEPS:
        training_time += dt
    step += 1
    if step == UNCOUNTED_STEPS:
        print(f"compilation: {time.time() - t_loop:.1f}s (the first {step} step(s), not counted)", flush=True)
    if step > 1 and (interactive or time.time() - last_print >= 5 or training_time >= TIME_BUDGET):
        debiased = smooth_loss / (1 - 0.9 ** step)
        tok_per_sec = TOTAL_BATCH_SIZE / dt
        mfu = mfu_percent(flops_per_token * tok_per_sec, device)
        line = (f"step {step:05d} ({100 * progress:.1f}%) | loss: {debiased:.6f} | lrm: {lrm:.2f} | dt: {1000 * dt:.0f}ms"
                f" | tok/sec: {tok_per_sec:,.0f} | mfu: {'n/a' if mfu is None else f'{mfu:.1f}%'} | epoch: {epoch}"
                f" | remaining: {max(TIME_BUDGET - training_time, 0):.0f}s")
        print(f"\r{line}   " if interactive else line, end="" if interactive else "\n", flush=True)
        last_print = time.time()

if interactive:
    print()

# ---------------------------------------------------------------------------------------------
# Final evaluation and summary

t_eval = time.time()
with autocast:
    val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
print(f"evaluation: {time.time() - t_eval:.1f}s")
mfu = mfu_percent(flops_per_token * (step - UNCOUNTED_STEPS) * TOTAL_BATCH_SIZE / training_time, device) or 0.0
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {training_time:.1f}")
print(f"total_seconds:    {time.time() - t_start:.1f}")
print(f"peak_vram_mb:     {peak_memory_mb(device):.1f}")
print(f"mfu_percent:      {mfu:.2f}")
print(f"total_tokens_M:   {step * TOTAL_BATCH_SIZE / 1e6:.1f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {counts['total'] / 1e6:.1f}")
print(f"depth:            {DEPTH}")

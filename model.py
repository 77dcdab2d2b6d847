"""
The GPT every stage shares: a decoder-only transformer in the GPT-2 layout (Radford et al. 2019),
written out by hand so that a student can read all of it.

- token embeddings, pre-norm blocks of causal self-attention and MLP, a final LayerNorm and an
  output head, with what buys capability per FLOP at this size (each a config field, each measured
  by bench/ablations.py into docs/ABLATIONS.md): rotary positions, QK-norm, a key offset that lets
  one layer copy, ReLU^2, an untied head, zero-initialized residual projections, and the Muon
  optimizer for the matrices (muon.py); with every field off it is GPT-2 (learned positions, GELU,
  tied head);
- attention behind one function, `attention()`, with three named paths: `math` (the readable
  reference that materializes the (T, T) score matrix), `sdpa` (PyTorch's
  `F.scaled_dot_product_attention`) and `flash` (our fused Triton kernel, flash_attention.py);
- batched generation with a KV cache, temperature, top-k and top-p, stopping at an end token,
  returning each sampled token's log-probability (PPO and reranking need them); the tools a chat
  model calls mid-answer are tools.py's, which the engine only hands the rows that called them;
- an optional scalar head on the trunk (`n_scores` outputs per position) for the reward, value
  and rule models, saved in the same checkpoint format as a language model;
- atomic checkpoints that say which stage and which tokenizer made them.
"""
import math
import os
from collections import namedtuple
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from common import atomic_write, print0
from muon import Muon

ATTENTION_PATHS = ("auto", "math", "sdpa", "flash")
QK_GAIN = 2.0  # with QK-norm, the attention logits are scaled by this beyond 1/sqrt(head size)
ROTARY_BASE = 10000.0  # the longest wavelength of the rotary frequencies, in positions (Su et al. 2021)


@dataclass
class GPTConfig:
    block_size: int = 256  # longest sequence (positions in wpe)
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0  # on embeddings and residual branches; RL stages need it at 0
    bias: bool = False  # biases in Linear and LayerNorm: GPT-2 had them, dropping them is a bit faster
    attn: str = "auto"  # one of ATTENTION_PATHS; "auto" takes the fastest available
    n_scores: int = 0  # scalar outputs per position: 0 for a language model, 1 for reward/value, one per rule
    # the modern small GPT (bench/ablations.py measures each; all False is GPT-2)
    rotary: bool = True  # rotary positions on half of each head's channels, no wpe (Su et al. 2021; modded-nanogpt)
    key_offset: bool = True  # the unrotated half of each key is the previous position's: 1-layer induction (modded-nanogpt)
    qk_norm: bool = True  # RMS-normalize each head's q and k (Dehghani et al. 2023; nanochat)
    relu2: bool = True  # ReLU(x)^2 in the MLP instead of GELU (So et al. 2021, Primer)
    untied_head: bool = False  # the head its own matrix (nanochat): measured, it keeps induction from forming here
    zero_init: bool = True  # residual projections (and an untied head) start at zero: blocks start as identity (nanochat)

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                             f"each head gets n_embd / n_head channels")
        if self.attn not in ATTENTION_PATHS:
            raise ValueError(f"attn must be one of {ATTENTION_PATHS}, got {self.attn!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.key_offset and not self.rotary:
            raise ValueError("key_offset shifts the unrotated half of each key: it needs rotary=True")
        if self.rotary and (self.n_embd // self.n_head) % 4:
            raise ValueError(f"rotary needs a head size divisible by 4 (half the channels rotate in pairs), "
                             f"got {self.n_embd // self.n_head}")


# -----------------------------------------------------------------------------
# attention: one function, three paths

_flash_attention = None  # the kernel, imported on first use so CPU users never need Triton
_announced = set()


def _load_flash():
    global _flash_attention
    if _flash_attention is None:
        try:
            from flash_attention import flash_attention
            _flash_attention = flash_attention
        except ImportError as e:  # no triton (macOS, Windows, CPU-only installs): other paths still work
            _flash_attention = e
    return None if isinstance(_flash_attention, ImportError) else _flash_attention


def resolve_attention_path(path, device, head_dim):
    """The path `attention` will take: 'auto' means the fused kernel on CUDA when Triton imports
    and the head size is one it was built for, otherwise SDPA (PyTorch's fastest on CPU too)."""
    if path == "auto":
        fused = device.type == "cuda" and head_dim in (16, 32, 64, 128) and _load_flash() is not None
        return "flash" if fused else "sdpa"
    if path == "flash" and _load_flash() is None:
        raise RuntimeError(f"attn='flash' needs Triton, which did not import: {_flash_attention}. "
                           f"Install it (pip install triton) or use attn='sdpa'/'math'.")
    return path


def causal_mask(T_q, T_k, device, key_start=None):
    """(T_q, T_k) bool, True where query i may see key j. Queries sit at the last T_q positions,
    so the same mask serves training (T_q == T_k), decoding (T_q == 1) and chunked prefill.
    key_start (B,): each row's first real key in a left-padded batch (batched generation); the
    mask is then (B, 1, T_q, T_k), no query sees padding, and a padding query sees only itself,
    so that no row of the softmax is empty (its output is never used)."""
    pos = torch.arange(T_k - T_q, T_k, device=device)[:, None]  # (T_q, 1) each query's position
    keys = torch.arange(T_k, device=device)  # (T_k,)
    if key_start is None:
        return keys <= pos
    first = torch.minimum(key_start.view(-1, 1, 1, 1), pos)  # (B, 1, T_q, 1) first key seen
    return (keys <= pos) & (keys >= first)


def attention(q, k, v, path="auto", key_start=None):
    """Causal scaled dot-product attention, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017).
    q: (B, nh, T_q, hs); k, v: (B, nh, T_k, hs) with T_q <= T_k, queries aligned to the last keys.
    key_start: optional (B,) ints, the first real key of each row of a left-padded batch (batched
    generation); every path hides the padding, the fused kernel too."""
    path = resolve_attention_path(path, q.device, q.size(-1))
    if not torch.compiler.is_compiling() and path not in _announced:  # a print splits a graph
        _announced.add(path)
        print0(f"attention: {path} path on {q.device.type}")  # under torchrun, once, not once per rank
    if path == "flash":
        return _flash_attention(q, k, v, key_start)
    T_q, T_k = q.size(-2), k.size(-2)
    mask = None if key_start is None else causal_mask(T_q, T_k, q.device, key_start)  # (B, 1, T_q, T_k)
    if path == "math":
        # the readable reference: this materializes the (T_q, T_k) matrix of scores, so memory
        # grows as T^2; the fused kernel computes the same thing tile by tile and never stores it
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T_q, T_k)
        allowed = causal_mask(T_q, T_k, q.device) if mask is None else mask
        att = att.masked_fill(~allowed, float("-inf"))
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        return att @ v  # (B, nh, T_q, hs)
    # sdpa: PyTorch's fused kernels (FlashAttention-2, cuDNN, memory-efficient; C++ on CPU)
    if mask is None and T_q == T_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is None and T_q > 1:
        mask = causal_mask(T_q, T_k, q.device)
    # a single query after a cache sees every key: no mask needed
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# -----------------------------------------------------------------------------
# the transformer

class KVCache:
    """Keys and values of every layer for the positions processed so far, preallocated so that
    each decoding step writes one position in place instead of recomputing the prefix. With the
    key offset it also keeps each layer's last unshifted key half: the next position's key needs it."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None
        self.last_key = [None] * n_layer  # (B, nh, 1, hs/2) per layer
        self.pos = 0  # positions filled

    def keep(self, rows):
        """Keep only these batch rows (a bool mask): sequences that ended drop out. Returns which old row
        each remaining slot now holds (n,), an order the caller applies to its own per-row tensors. The
        survivors beyond the first n slots move into the ended rows' slots and the buffers shrink to a
        view of n rows: a copy of one row per ended sequence, where rebuilding the cache from the kept
        rows copied all of it (and faulted in fresh pages) every time a sequence ended."""
        n = int(rows.sum())
        order = torch.arange(n, device=rows.device)
        holes = (~rows[:n]).nonzero().squeeze(1)  # ended rows among the first n slots
        if len(holes):
            movers = n + rows[n:].nonzero().squeeze(1)  # survivors past them, as many as there are holes
            order[holes] = movers
            for buf in (self.k, self.v):
                buf[:, holes, :, :self.pos] = buf[:, movers, :, :self.pos]
        self.k, self.v = self.k[:, :n], self.v[:, :n]
        self.last_key = [None if k is None else k[order] for k in self.last_key]
        return order

    def update(self, layer, k, v):
        B, nh, T, hs = k.shape
        if self.k is None:  # allocate on first use, in whatever dtype autocast produced
            self.k = k.new_zeros(self.n_layer, B, nh, self.max_len, hs)
            self.v = v.new_zeros(self.n_layer, B, nh, self.max_len, hs)
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {T} after {self.pos}")
        self.k[layer, :, :, self.pos:self.pos + T] = k
        self.v[layer, :, :, self.pos:self.pos + T] = v
        end = self.pos + T
        if layer == self.n_layer - 1:  # the last layer has written: the step is done
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, nh, T_past + T, hs)


def rotate(x, cos, sin):
    """Rotary position embedding (Su et al. 2021) on the first half of the channels: each pair
    (x1, x2) turns by position x frequency, so that q.k depends on how far apart two positions are,
    not on where they are. The other half is left alone and carries content only (modded-nanogpt's
    half-truncated rotary), which the key offset uses."""
    d = cos.size(-1)  # rotated pairs
    x1, x2, rest = x[..., :d], x[..., d:2 * d], x[..., 2 * d:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest], dim=-1)


def offset_keys(k, first, kv_cache, layer):
    """The key offset (modded-nanogpt's record of 2025; Olsson et al. 2022's "smeared key" taken all
    the way): the unrotated half of the key at position t is the one computed at t - 1. A query
    matching it finds the position right after an earlier occurrence of the current token, whose
    value is the token to copy: induction in one layer, where it otherwise takes two heads in series,
    the first of which forms slowly. first (B|1, 1, T, 1): a sequence's first position, which has no
    previous key (training and left-padded generation agree on it)."""
    half = k.size(-1) // 2
    own = k[..., half:]  # (B, nh, T, hs/2)
    before = kv_cache.last_key[layer] if kv_cache is not None and kv_cache.pos > 0 else None
    if before is None:
        before = torch.zeros_like(own[..., :1, :])
    if kv_cache is not None:
        kv_cache.last_key[layer] = own[..., -1:, :]
    previous = torch.cat([before, own[..., :-1, :]], dim=2).masked_fill(first, 0.0)  # (B, nh, T, hs/2)
    return torch.cat([k[..., :half], previous], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.config, self.layer = config, layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, key_start=None, kv_cache=None):
        B, T, C = x.size()
        nh = self.config.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, C // nh).transpose(1, 2)  # (B, nh, T, hs)
        if self.config.qk_norm:
            # unit RMS per head: logits stay bounded, so no head saturates early, and the gain lets
            # a head still pick one key out of hundreds (nanochat scales q and k by 1.2 each)
            q, k = F.rms_norm(q, (C // nh,)) * QK_GAIN, F.rms_norm(k, (C // nh,))
        if rope is not None:
            cos, sin, first = rope
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            if self.config.key_offset:
                k = offset_keys(k, first, kv_cache, self.layer)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, k, v)  # (B, nh, T_past + T, hs)
        # the path is read at call time, so a test can flip it on one model instance
        y = attention(q, k, v, self.config.attn, key_start)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        h = F.relu(h).square() if self.config.relu2 else F.gelu(h, approximate="tanh")  # Primer's, or GPT-2's
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, key_start=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rope, key_start, kv_cache)  # pre-norm residual (GPT-2)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if not config.rotary:  # learned absolute positions (GPT-2)
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if not config.untied_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        # reward, value and rule models read scalars off the same trunk (InstructGPT: the SFT
        # model with its unembedding replaced by a projection to a scalar)
        self.score_head = nn.Linear(config.n_embd, config.n_scores) if config.n_scores else None
        # rotary frequencies of the rotated quarter-pairs: hs/4 of them, from 1 down to 1/ROTARY_BASE
        hs = config.n_embd // config.n_head
        self.register_buffer("inv_freq", ROTARY_BASE ** -torch.arange(0, 1, 4 / hs), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or (name == "lm_head.weight" and config.untied_head):
                if config.zero_init:  # every block starts as the identity, the head at uniform (nanochat)
                    nn.init.zeros_(p)
                elif name.endswith("c_proj.weight"):
                    # GPT-2: scale residual projections by 1/sqrt(number of residual layers)
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameters; non_embedding: only those that multiply activations (what FLOPs count), so
        without the position table and, when the head is untied, without the token table (lookups)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= 0 if self.config.rotary else self.transformer.wpe.weight.numel()
            n -= self.transformer.wte.weight.numel() if self.config.untied_head else 0
        return n

    def configure_optimizers(self, lr, weight_decay, betas, device_type, matrix_lr=None):
        """AdamW (Loshchilov & Hutter 2019) with decay on matrices and embeddings only, never on biases
        and LayerNorm gains, which set scales rather than store features (nanoGPT). Given matrix_lr,
        Muon (Jordan et al. 2024) takes the blocks' matrices instead, at that rate, and AdamW keeps the
        embeddings, the heads and the gains at lr (modded-nanogpt, nanochat). Each group keeps its
        base_lr: a schedule sets group["lr"] = base_lr x its factor."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        hidden = [(n, p) for n, p in params if matrix_lr is not None and n.startswith("transformer.h.") and p.dim() == 2]
        adam = [p for n, p in params if not any(p is q for _, q in hidden)]
        groups = [dict(params=[p for p in adam if p.dim() >= 2], weight_decay=weight_decay, lr=lr, base_lr=lr),
                  dict(params=[p for p in adam if p.dim() < 2], weight_decay=0.0, lr=lr, base_lr=lr)]
        if matrix_lr is None:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")
        for fused_qkv in (True, False):  # q, k and v are three matrices, each orthogonalized on its own
            groups.append(dict(params=[p for n, p in hidden if ("c_attn" in n) == fused_qkv], muon=True,
                               split=3 if fused_qkv else 1, lr=matrix_lr, base_lr=matrix_lr, weight_decay=0.0))
        return Muon(groups, lr=lr, betas=betas)

    def flops_per_token(self, T):
        """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's
        scores and weighted sum, 12 * n_layer * n_embd * T (Kaplan et al. 2020; PaLM appendix B).
        Causal attention does half of that work, but the usual convention counts it all."""
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    def trunk(self, idx, positions=None, key_start=None, kv_cache=None):
        """Final hidden states (B, T, n_embd) after ln_f. positions: (B, T) or None for 0..T-1
        after whatever the cache holds."""
        B, T = idx.size()
        if positions is None:  # explicit positions come from generate(), which checks the length
            past = kv_cache.pos if kv_cache is not None else 0
            if past + T > self.config.block_size:
                raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
            positions = torch.arange(past, past + T, device=idx.device)[None]  # (1, T)
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.rotary:  # angles of each rotated pair, shared by every layer and head
            angles = positions[:, None, :, None].float() * self.inv_freq  # (B|1, 1, T, hs/4)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype), positions[:, None, :, None] == 0)
        else:
            x = x + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, key_start, kv_cache)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, positions=None, key_start=None, kv_cache=None, trained_only=False):
        """Logits (B, T, vocab) and, given targets (B, T) with -1 where nothing is predicted, the mean
        cross-entropy over the rest. A model with a scalar head (reward, rule, value) returns its
        scores instead: (B, T, n_scores) in fp32, and no loss. trained_only: send only the positions
        with a target through the output head and return their logits, (N, vocab) in row-major order.
        The head is about 40% of this model's FLOPs and SFT and PPO train on about half the positions
        (the answer), so this saves a fifth of their compute; the shape depends on the data, so
        compiled pretraining, where every position has a target, does not use it."""
        h = self.trunk(idx, positions, key_start, kv_cache)  # (B, T, C)
        if self.score_head is not None:
            return self.score_head(h).float(), None
        if trained_only:
            keep = targets >= 0
            h, targets = h[keep], targets[keep]  # (N, C), (N,)
        logits = self.lm_head(h)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate_stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_id=None, pad_id=0, generator=None, tool_runner=None):
        """The generation engine every stage, evaluation and the chat program use: continue each
        prompt (a list of token-id lists, lengths may differ) by up to max_new_tokens tokens, all in
        one batch with a KV cache, yielding after every step (rows, tokens, logprobs, forced): the
        indices of the prompts that got a token, the tokens (b,), their log-probabilities under
        softmax(logits / temperature) before any top-k/top-p truncation, i.e. under the policy itself
        (plain softmax when greedy, temperature=0), and which tokens were forced rather than sampled.

        Prompts are left-padded so that every sequence's next token sits in the same column; each
        row's first real key (key_start) keeps the padding out of attention on every path, the fused
        kernel too, and positions restart at 0 for each prompt. A sequence
        leaves the batch (and the cache) when it samples eos_id.

        With a tool_runner (tools.ToolRunner: LaMDA's toolset), a row that closes a tool call gets the
        tool's result as its next tokens instead of samples; such a forced token is not the policy's
        action: its log-probability is reported as 0 and `forced` marks it, so that no stage trains on it."""
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        if P + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt of {P} tokens + {max_new_tokens} new tokens exceeds block_size "
                             f"{self.config.block_size}")
        idx = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        padded = any(len(p) < P for p in prompts)
        key_start = torch.tensor([P - len(p) for p in prompts], device=device) if padded else None  # (B,)
        first = key_start[:, None] if padded else torch.zeros(B, 1, dtype=torch.long, device=device)  # (B, 1)
        positions = (torch.arange(P, device=device) - first).clamp(min=0)  # (B, P): each prompt counts from 0
        cache = KVCache(self.config.n_layer, P + max_new_tokens)
        logits = self(idx, positions=positions, key_start=key_start, kv_cache=cache)[0][:, -1]  # (B, vocab)
        next_pos = positions[:, -1] + 1  # (B,)
        rows = torch.arange(B, device=device)  # the prompt index of each sequence still generating
        force = tool_runner.forcing(B) if tool_runner is not None else None
        for t in range(max_new_tokens):
            logits = logits.float() / (temperature if temperature > 0 else 1.0)
            next_tok = sample_next_token(logits, temperature, top_k, top_p, generator)  # (b,)
            logprobs = F.log_softmax(logits, dim=-1).gather(1, next_tok[:, None]).squeeze(1)
            forced = torch.zeros_like(next_tok, dtype=torch.bool)
            if force is not None:  # rows in the middle of a tool's result take its next token instead
                next_tok, logprobs, forced = force(rows, next_tok, logprobs)
            yield rows, next_tok, logprobs, forced
            ended = (next_tok == eos_id) & ~forced if eos_id is not None else torch.zeros_like(forced)
            if bool(ended.all()) or t == max_new_tokens - 1:
                return
            if bool(ended.any()):  # finished sequences leave the batch and the cache: no work on them
                order = cache.keep(~ended)
                rows, next_tok, next_pos = rows[order], next_tok[order], next_pos[order]
                key_start = key_start[order] if padded else None
            logits = self(next_tok[:, None], positions=next_pos[:, None], key_start=key_start, kv_cache=cache)[0][:, -1]
            next_pos += 1

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, pad_id=0,
                 generator=None, tool_runner=None):
        """generate_stream, collected: (tokens, logprobs, lengths, forced): (B, N) new tokens with pad_id
        after the end token, (B, N) their log-probabilities (0 after the end and where forced), (B,)
        how many tokens each response has, end token included, and (B, N) which tokens were forced
        tool results rather than the policy's samples."""
        device = self.lm_head.weight.device
        B = len(prompts)
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        forced = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        for rows, tok, lp, frc in self.generate_stream(prompts, max_new_tokens, temperature, top_k, top_p, eos_id,
                                                       pad_id, generator, tool_runner):
            t = lengths[rows]
            tokens[rows, t], logprobs[rows, t], forced[rows, t] = tok, lp, frc
            lengths[rows] += 1
        return Generation(tokens, logprobs, lengths, forced)


Generation = namedtuple("Generation", "tokens logprobs lengths forced")

INDUCTION_SEEDS = (2022, 2023, 2024, 2025)  # the test's draws; no training or evaluation run uses these seeds


@torch.no_grad()
def induction_test(model, pool, n=32, length=50, seeds=INDUCTION_SEEDS):
    """In-context copying, the skill every tool call needs (the name into the query, the result into
    the answer), by the induction test of Olsson et al. 2022: n sequences of `length` tokens drawn
    from pool (a 1-D tensor of token ids), each followed by itself; the share of the repeat's tokens
    predicted top-1, one per seed. A model with induction heads gets most right; chance is one in
    len(pool)."""
    device, training = model.lm_head.weight.device, model.training
    length = min(length, model.config.block_size // 2)  # a short-context model gets shorter sequences
    model.eval()
    shares = []
    for seed in seeds:
        half = pool[torch.randint(len(pool), (n, length), generator=torch.Generator().manual_seed(seed))].to(device)
        predicted = model(torch.cat([half, half], dim=1))[0][:, length - 1:-1].argmax(-1)  # the repeat's predictions
        shares.append((predicted == half).float().mean().item())
    model.train(training)
    return shares

def last_token_scores(model, sequences, pad_id):
    """A scored model's head at each sequence's last token, (N, n_scores): where a reward model reads
    its verdict on a whole response (InstructGPT: the final token's output). Sequences are token
    lists of any lengths, right-padded here; causal attention keeps the padding out. model is a GPT
    with a scalar head, or the DistributedDataParallel wrapper around one (its forward syncs grads)."""
    device = next(model.parameters()).device
    x = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        x[i, :len(s)] = torch.tensor(s)
    last = torch.tensor([len(s) - 1 for s in sequences], device=device)
    return model(x.to(device))[0][torch.arange(len(sequences), device=device), last]


def sample_next_token(logits, temperature, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab), already divided by the temperature.
    top-k keeps the k most likely tokens; top-p (nucleus, Holtzman et al. 2020) keeps the smallest
    set whose probability reaches p. Both only choose the token; they never change the reported
    log-probability."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # mass before this token already reached p
        drop = torch.zeros_like(drop).scatter(1, order, drop)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    # inverse-CDF sampling: the first token whose cumulative probability passes a uniform draw (a
    # token with probability 0 never does); on a CPU 40x faster than torch.multinomial at (256, 4096)
    cdf = F.softmax(logits, dim=-1).cumsum(dim=-1)  # (B, vocab)
    u = torch.rand(cdf.size(0), 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.size(-1) - 1)


# -----------------------------------------------------------------------------
# checkpoints

class CheckpointError(ValueError):
    pass


def save_checkpoint(path, model, stage, tokenizer, **extra):
    """Write atomically (common.atomic_write), so that a run killed while saving (or a full disk)
    leaves the previous checkpoint intact. Only plain
    types go in (tensors, numbers, strings, lists, dicts), so that loading runs no code. A model
    whose weights are not finite is never saved: the last good checkpoint stays."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"not saving {path}: {len(bad)} weight tensors are not finite (e.g. {bad[0]}); "
                              f"training diverged (learning rate too high?) and the last good checkpoint is kept")
    ckpt = dict(stage=stage, model_args=asdict(model.config), model=model.state_dict(),
                tokenizer=dict(name=tokenizer.name, n_vocab=tokenizer.n_vocab), **extra)
    try:
        with atomic_write(path, "wb") as f:
            torch.save(ckpt, f)
    except OSError as e:  # a full disk, most often: say so (atomic_write leaves no half file behind)
        raise CheckpointError(f"could not write {path} ({e.strerror or e}); the previous checkpoint, if any, "
                              f"is intact") from e


def load_checkpoint(path, stages, tokenizer=None, device="cpu"):
    """The checkpoint dict at path, after checking it was written by one of `stages` and, when
    given, with this tokenizer. Every way this can go wrong says what and where. Loading is
    weights_only: a crafted file cannot run code, it can only fail to load."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path} (run the stage that writes it first)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, corrupt or crafted files fail in many ways inside the unpickler
        why = (str(e).splitlines() or [type(e).__name__])[0]  # an empty file's error has no message
        raise CheckpointError(f"checkpoint {path} cannot be read (cut short, corrupt, or not a checkpoint of "
                              f"plain weights): {why}") from e
    if not isinstance(ckpt, dict) or "stage" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this project")
    if ckpt["stage"] not in stages:
        raise CheckpointError(f"{path} is a '{ckpt['stage']}' checkpoint; this needs one of {tuple(stages)}")
    made_with = (ckpt["tokenizer"]["name"], ckpt["tokenizer"]["n_vocab"])
    if tokenizer is not None and made_with != (tokenizer.name, tokenizer.n_vocab):
        raise CheckpointError(
            f"{path} was trained with tokenizer {ckpt['tokenizer']['name']} ({ckpt['tokenizer']['n_vocab']} tokens), "
            f"but the current tokenizer is {tokenizer.name} ({tokenizer.n_vocab} tokens): another vocabulary")
    return ckpt


def with_score_head(ckpt, n_scores, device="cpu"):
    """A GPT from a policy checkpoint with a scalar head added, zero-initialized so that every
    response starts at score 0: the trunk of a reward, rule or value model (InstructGPT: the SFT
    model with its unembedding replaced by a projection to a scalar)."""
    model = GPT(GPTConfig(**{**ckpt["model_args"], "n_scores": n_scores}))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if sorted(missing) != ["score_head.bias", "score_head.weight"] or unexpected:
        raise CheckpointError(f"expected a language model's weights; missing {missing}, unexpected {unexpected}")
    nn.init.zeros_(model.score_head.weight)
    nn.init.zeros_(model.score_head.bias)
    return model.to(device)


def model_from_checkpoint(ckpt, device="cpu", **overrides):
    """Build the GPT a checkpoint describes and load its weights. overrides change config fields
    that do not touch the weights' shapes (attn, dropout)."""
    config = GPTConfig(**{**ckpt["model_args"], **overrides})
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    return model.to(device)

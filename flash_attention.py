"""Fused causal attention in Triton, forward and backward (FlashAttention-2, Dao 2023).

The math path in model.py writes the (T, T) score matrix to GPU main memory (HBM), softmaxes it
there and reads it back: memory quadratic in T and several HBM passes, the real cost. Here a
program keeps one query tile on chip and streams key/value tiles past it with a running max and
sum ("online softmax"), so the matrix never exists: memory is linear in T, HBM is read once per
tile pass. The backward keeps each row's log-sum-exp (LSE) and recomputes the score tiles. Key
tiles wholly in a query tile's future are skipped: half the work. Comments cite Algorithm 1
(forward) and 2 (backward). Simplification: Algorithm 2 adds into dQ with atomics (line 15); a
second kernel loops over key tiles for dQ instead: one more recompute, but deterministic. Scores
are in base 2 (exp2, the cheaper instruction; scale and log2(e) fold into one multiply-add).
Query i is at T_k - T_q + i: T_q == T_k trains, T_q == 1 decodes after a KV cache, T_q < T_k is
chunked prefill. Left-padded batches (batched generation) give each row's first real key,
`key_start`: no query sees padding but a padding query sees itself, so no softmax row is empty.
torch.compile sees two opaque ops (torch.library.custom_op, forward and backward), not the Triton
launches. Launch configs: a few per head dim, timed on first use; decoding gets a 16-row tile.
"""
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) for 16-bit inputs by head dim. 8 warps
# mostly on 128-row tiles, as the Triton tutorial keeps on Hopper; the backward splits as
# FlashAttention-2 does (narrow query tiles, wide key tiles for dK, dV; the reverse for dQ), with
# deeper pipelines. The compile test fits each in sm_80/sm_90 shared memory, no spills on sm_90.
CONFIGS = {"fwd": {64: [(64, 64, 4, 4), (128, 64, 4, 3), (128, 128, 8, 3)],
                   128: [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)]},
           "dkdv": {64: [(32, 64, 4, 5), (32, 128, 8, 4), (64, 128, 8, 3)],
                    128: [(32, 64, 8, 5), (32, 128, 8, 4), (64, 64, 8, 4)]},
           "dq": {64: [(64, 32, 4, 5), (128, 32, 4, 5), (128, 64, 8, 3)],
                  128: [(64, 32, 4, 5), (128, 32, 8, 4), (128, 64, 8, 3)]}}
DECODE = (16, 32, 4, 3)  # at most 16 queries: the smallest tile tl.dot takes, not 128 rows
EXACT = (32, 32, 4, 1)  # fp32 is the exact path, not the fast one: its 3-pass dots need registers
_best = {}  # (kernel, hs, dtype, T_q and T_k rounded up to powers of 2) -> the fastest config
LENGTHS = ["T_q", "T_k"]  # not compiled anew for each T divisible by 16, or not: the loads mask
LOG2E = math.log2(math.e)


def launch_configs(kernel, head_dim, dtype, T_q):
    """The candidate configs of one launch; where there are several, the first call times them."""
    if dtype == torch.float32 or kernel == "fwd" and T_q <= 16:
        return [EXACT if dtype == torch.float32 else DECODE]
    return CONFIGS[kernel][max(head_dim, 64)][:None if head_dim >= 64 else 1]  # toys: untimed


@triton.jit
def _tile(base, bh, nh, s_b, s_h, s_t, rows, offs_d):
    # pointers to some rows of one (batch, head) of a strided (B, H, T, D) tensor, D dense
    return base + (bh // nh) * s_b + (bh % nh) * s_h + rows[:, None] * s_t + offs_d[None, :]


@triton.jit
def _visible(q_pos, cols, ks):
    # causal, and keys before the row's first real key `ks` are hidden but from their own query
    return (cols <= q_pos) & (cols >= tl.minimum(q_pos, ks))


@triton.jit
def _key_tiles(start_m, off, ks, T_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # the key tiles a query tile visits: [lo, full) and [mid, hi) need the mask, every row sees
    # all of [full, mid); before lo is padding only, from hi on the future (skipped, Alg. 1 line 6)
    q_first, q_last = start_m + off, start_m + BLOCK_M - 1 + off
    mid = (q_first + 1) // BLOCK_N * BLOCK_N
    full = tl.minimum(tl.cdiv(tl.minimum(ks, q_last), BLOCK_N) * BLOCK_N, mid)
    return tl.minimum(ks, q_first) // BLOCK_N * BLOCK_N, full, mid, tl.minimum(q_last + 1, T_k)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, lo, hi, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):  # Alg. 1 line 6
        cols = start_n + offs_n
        k = tl.load(K + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)  # line 7
        v = tl.load(V + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # line 8: S = Q K^T, unscaled
        if MASK:  # finite, not -inf: a row whose first tile is all padding keeps a finite max,
            # and what it sums there is multiplied by alpha = 0 once it meets a visible key
            s = tl.where(_visible(q_pos[:, None], cols[None, :], ks), s, -1.0e6)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # line 9: running row max, base 2,
        p = tl.math.exp2(s * qk_scale - m_new[:, None])  # P~ (scale and shift: one FMA),
        alpha, m_i = tl.math.exp2(m_i - m_new), m_new  # and the rescale of the earlier tiles
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)  # line 10
    return acc, l_i, m_i


@triton.jit(do_not_specialize=LENGTHS)
def _fwd_kernel(Q, K, V, KS, O, LSE, sq_b, sq_h, sq_t, skv_b, skv_h, skv_t, nh, T_q, T_k,
                qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                PREC: tl.constexpr):  # Alg. 1 line 3: a program per query tile and (b, h)
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1).to(tl.int64)
    offs_m, offs_n = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    offs_d, ks = tl.arange(0, HEAD_DIM), tl.load(KS + bh // nh)
    q_pos, in_q = offs_m + (T_k - T_q), offs_m[:, None] < T_q  # queries: the last T_q tokens
    q = tl.load(_tile(Q, bh, nh, sq_b, sq_h, sq_t, offs_m, offs_d), mask=in_q, other=0.0)  # line 4
    kv = _tile(0, bh, nh, skv_b, skv_h, skv_t, offs_n, offs_d)  # k and v share strides
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # line 5
    lo, full, mid, hi = _key_tiles(start_m, T_k - T_q, ks, T_k, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, lo,
                               full, qk_scale, BLOCK_N, True, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, full,
                               mid, qk_scale, BLOCK_N, False, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, mid,
                               hi, qk_scale, BLOCK_N, True, PREC)
    rows = bh * T_q + offs_m  # O and LSE are ours, contiguous; lines 12-15:
    tl.store(LSE + rows, m_i + tl.math.log2(l_i), mask=offs_m < T_q)  # L = m + log(l)
    tl.store(O + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=in_q)  # O = diag(l)^-1 O


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, sq_t, sdo_t, LSE, DELTA, cols, offs_m, off, ks,
                    T_q, lo, hi, qk_scale, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                    PREC: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):  # Alg. 2 line 8, from the diagonal down
        rows = start_m + offs_m
        q = tl.load(q_ptrs + start_m * sq_t, mask=rows[:, None] < T_q, other=0.0)  # line 9
        do = tl.load(do_ptrs + start_m * sdo_t, mask=rows[:, None] < T_q, other=0.0)
        lse = tl.load(LSE + rows, mask=rows < T_q, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < T_q, other=0.0)
        # transposed tiles (keys x queries), so the key tile stays the row dimension
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC)  # line 10: S = Q K^T
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # line 11: P = exp(S - L), recomputed
        if MASK:
            p_t = tl.where(_visible(rows[None, :] + off, cols[:, None], ks), p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)  # line 12: dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # line 13: dP = dO V^T
        ds_t = p_t * (dp_t - delta[None, :])  # line 14: dS = P * (dP - D)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)  # line 16: dK += dS^T Q
    return dk, dv


@triton.jit(do_not_specialize=LENGTHS)
def _bwd_dkdv_kernel(Q, K, V, DO, KS, LSE, DELTA, DK, DV, sq_b, sq_h, sq_t, skv_b, skv_h, skv_t,
                     sdo_b, sdo_h, sdo_t, nh, T_q, T_k, qk_scale, sm_scale, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PREC: tl.constexpr):  # Alg. 2 line 5: a program per key tile and (b, h)
    start_n, bh, off = tl.program_id(0) * BLOCK_N, tl.program_id(1).to(tl.int64), T_k - T_q
    cols, offs_m = start_n + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_M)
    offs_d, in_k, ks = tl.arange(0, HEAD_DIM), cols[:, None] < T_k, tl.load(KS + bh // nh)
    kv = _tile(0, bh, nh, skv_b, skv_h, skv_t, cols, offs_d)
    k, v = tl.load(K + kv, mask=in_k, other=0.0), tl.load(V + kv, mask=in_k, other=0.0)  # line 6
    dk, dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32), tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_ptrs = _tile(Q, bh, nh, sq_b, sq_h, sq_t, offs_m, offs_d)
    do_ptrs = _tile(DO, bh, nh, sdo_b, sdo_h, sdo_t, offs_m, offs_d)
    # query tiles before `lo` precede every key here and are skipped (line 7 zeroed dK, dV above);
    # `lo` to `mid` cross the diagonal; from `mid` on, every query sees every key of the tile,
    # unless the tile holds padding, which only its own query sees: then every tile is masked
    LSE, DELTA = LSE + bh * T_q, DELTA + bh * T_q
    lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M
    mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    mid = tl.where(start_n < ks, T_q, tl.minimum(mid, T_q))
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, sq_t, sdo_t, LSE, DELTA, cols, offs_m,
                             off, ks, T_q, lo, mid, qk_scale, BLOCK_M, True, PREC)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, sq_t, sdo_t, LSE, DELTA, cols, offs_m,
                             off, ks, T_q, mid, T_q, qk_scale, BLOCK_M, False, PREC)
    out = (bh * T_k + cols)[:, None] * HEAD_DIM + offs_d[None, :]  # line 18: write dK, dV
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=in_k)  # chain rule: scale
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, lo, hi,
                  qk_scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)
        v = tl.load(V + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # Alg. 2 line 10
        p = tl.math.exp2(s * qk_scale - lse[:, None])  # line 11
        if MASK:
            p = tl.where(_visible(q_pos[:, None], cols[None, :], ks), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # line 13
        ds = p * (dp - delta[:, None])  # line 14
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)  # line 15, without the atomics
    return dq


@triton.jit(do_not_specialize=LENGTHS)
def _bwd_dq_kernel(Q, K, V, DO, KS, LSE, DELTA, O, DQ, sq_b, sq_h, sq_t, skv_b, skv_h, skv_t,
                   sdo_b, sdo_h, sdo_t, nh, T_q, T_k, qk_scale, sm_scale, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PREC: tl.constexpr):  # a program per query tile and (b, h), as the forward
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1).to(tl.int64)
    offs_m, offs_n = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    offs_d, ks = tl.arange(0, HEAD_DIM), tl.load(KS + bh // nh)
    q_pos, rows, in_q = offs_m + (T_k - T_q), bh * T_q + offs_m, offs_m[:, None] < T_q
    q = tl.load(_tile(Q, bh, nh, sq_b, sq_h, sq_t, offs_m, offs_d), mask=in_q, other=0.0)
    do = tl.load(_tile(DO, bh, nh, sdo_b, sdo_h, sdo_t, offs_m, offs_d), mask=in_q, other=0.0)
    o = tl.load(O + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=in_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # Alg. 2 line 4: D = rowsum(dO * O),
    tl.store(DELTA + rows, delta, mask=offs_m < T_q)  # here, for the dK, dV kernel that follows
    lse = tl.load(LSE + rows, mask=offs_m < T_q)
    kv = _tile(0, bh, nh, skv_b, skv_h, skv_t, offs_n, offs_d)
    lo, full, mid, hi = _key_tiles(start_m, T_k - T_q, ks, T_k, BLOCK_M, BLOCK_N)  # as forward
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, lo, full,
                       qk_scale, BLOCK_N, True, PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, full, mid,
                       qk_scale, BLOCK_N, False, PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, kv, skv_t, q_pos, ks, offs_n, T_k, mid, hi,
                       qk_scale, BLOCK_N, True, PREC)
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_q)


_INTERPRET = not isinstance(_fwd_kernel, triton.runtime.JITFunction)  # jit chose the interpreter


def _launch(name, kernel, args, q, T_k):
    """Run one kernel over its grid with the config measured fastest for this shape class."""
    (B, H, T_q, D), prec = q.shape, "tf32x3" if q.dtype == torch.float32 else "tf32"

    def run(cfg):
        bm, bn, warps, stages = cfg
        programs = triton.cdiv(T_k, bn) if name == "dkdv" else triton.cdiv(T_q, bm)
        kernel[(programs, B * H)](*args, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, PREC=prec,
                                  num_warps=warps, num_stages=stages)
    configs = launch_configs(name, D, q.dtype, T_q)
    if len(configs) == 1 or _INTERPRET:
        return run(configs[0])

    def ms(cfg):  # the kernels overwrite their outputs, never add: reruns are harmless
        try:
            return do_bench(lambda: run(cfg), warmup=5, rep=20)
        except OutOfResources:  # a card with less shared memory than sm_80/90 (compile test)
            return float("inf")
    key = (name, D, q.dtype, triton.next_power_of_2(T_q), triton.next_power_of_2(T_k))
    if key not in _best:
        _best[key] = min(configs, key=ms)
    run(_best[key])


# torch.compile calls these two ops as they are; the fake versions give it shapes and layouts
@torch.library.custom_op("flash_attention::fwd", mutates_args=())
def _attn_fwd(q: Tensor, k: Tensor, v: Tensor, key_start: Tensor) -> tuple[Tensor, Tensor]:
    (B, H, T_q, D), T_k = q.shape, k.shape[2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T_q), dtype=torch.float32, device=q.device)
    _launch("fwd", _fwd_kernel, (q, k, v, key_start, o, lse, *q.stride()[:3], *k.stride()[:3], H,
                                 T_q, T_k, LOG2E / math.sqrt(D)), q, T_k)
    return o, lse


_attn_fwd.register_fake(lambda q, k, v, key_start: (q.new_empty(q.shape),
                                                    q.new_empty(q.shape[:3], dtype=torch.float32)))


@torch.library.custom_op("flash_attention::bwd", mutates_args=())
def _attn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
              key_start: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    (_, H, T_q, D), T_k = q.shape, k.shape[2]
    do = do if do.stride(-1) == 1 else do.contiguous()
    dq, dk, dv, delta = (torch.empty(x.shape, dtype=x.dtype, device=x.device)
                         for x in (q, k, v, lse))
    inputs = (q, k, v, do, key_start, lse, delta)
    sizes = (*q.stride()[:3], *k.stride()[:3], *do.stride()[:3], H, T_q, T_k,
             LOG2E / math.sqrt(D), 1 / math.sqrt(D))
    _launch("dq", _bwd_dq_kernel, (*inputs, o, dq, *sizes), q, T_k)  # writes delta, then
    _launch("dkdv", _bwd_dkdv_kernel, (*inputs, dk, dv, *sizes), q, T_k)
    return dq, dk, dv


_attn_bwd.register_fake(lambda do, q, k, v, *_: (q.new_empty(q.shape), k.new_empty(k.shape),
                                                 v.new_empty(v.shape)))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *output, inputs[3])
    ctx.mark_non_differentiable(output[1])  # the LSE is kept for the backward, not a result


def _backward(ctx, do, _):
    return *_attn_bwd(do, *ctx.saved_tensors), None


_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, key_start=None):
    """Causal softmax(Q K^T / sqrt(hs)) V for q (B, nh, T_q, hs) and k, v (B, nh, T_k, hs) with
    T_q <= T_k, query i at position T_k - T_q + i. key_start: None, or (B,) ints, the first real
    key of each row of a left-padded batch. Differentiable; returns the input dtype."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] + q.shape[3:] != k.shape[:2] + k.shape[3:]:
        raise ValueError(f"flash_attention wants q (B, nh, T_q, hs), k and v (B, nh, T_k, hs); "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"flash_attention supports head dims {HEAD_DIMS}, got {q.shape[3]}")
    if not 1 <= q.shape[2] <= k.shape[2]:
        raise ValueError(f"flash_attention needs 1 <= T_q <= T_k, got {q.shape[2]}, {k.shape[2]}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in DTYPES:
        raise ValueError(f"q, k, v need one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError("flash_attention needs CUDA tensors, or CPU ones under TRITON_INTERPRET=1")
    if key_start is None:
        key_start = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
    elif key_start.shape != q.shape[:1] or key_start.is_floating_point() or key_start.device != q.device:
        raise ValueError(f"key_start must be ({q.shape[0]},) integers on {q.device}, got "
                         f"{tuple(key_start.shape)} {key_start.dtype} on {key_start.device}")
    # rows are addressed through strides, so transposed views need no copy; hs must be dense
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != v.stride():  # the kernels address k and v with one set of strides
        k, v = k.contiguous(), v.contiguous()
    if _INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's bf16 arithmetic is wrong
        return _attn_fwd(q.float(), k.float(), v.float(), key_start.int())[0].to(torch.bfloat16)
    return _attn_fwd(q, k, v, key_start.int())[0]

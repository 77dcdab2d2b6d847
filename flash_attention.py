"""Fused causal attention in Triton, forward and backward (FlashAttention-2, Dao 2023).

The math path in model.py writes the (T, T) score matrix to GPU main memory (HBM), softmaxes it
there and reads it back: memory quadratic in T and several HBM passes, the real cost. Here a
program keeps one query tile on chip and streams key/value tiles past it with a running max and
sum ("online softmax"), so the matrix never exists: memory is linear in T, HBM is read once per
tile pass. The backward keeps each row's log-sum-exp (LSE) and recomputes the score tiles. Key
tiles wholly in a query tile's future are skipped: half the work. Comments cite Algorithm 1
(forward) and 2 (backward). Simplification: Algorithm 2 adds into dQ with atomics (line 15); a
second kernel loops over key tiles for dQ instead: one more recompute, but deterministic. Scores
are in base 2 (exp2, log2(e) folded into the scale), the cheaper instruction. Query i is at
T_k - T_q + i: T_q == T_k trains, T_q == 1 decodes after a KV cache, T_q < T_k is chunked prefill.
"""
import math

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def launch_config(head_dim, dtype):
    """(BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per kernel, walked by the compile
    test: dot dims >= 16, tiles x stages within shared memory, no register spills at 16 bits on
    sm_80/90. fp32 is the exact path, not the fast one: its 3-pass dots need more registers."""
    if dtype == torch.float32:
        return {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}
    if head_dim <= 64:
        return {"fwd": (128, 64, 8, 3), "dkdv": (32, 128, 8, 3), "dq": (128, 32, 4, 3)}
    return {"fwd": (128, 32, 8, 2), "dkdv": (32, 64, 8, 2), "dq": (128, 32, 8, 2)}


@triton.jit
def _tile(base, bh, nh, s_b, s_h, s_t, rows, offs_d):
    # pointers to some rows of one (batch, head) of a strided (B, H, T, D) tensor, D dense
    return base + (bh // nh) * s_b + (bh % nh) * s_h + rows[:, None] * s_t + offs_d[None, :]


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, kv, skv_t, q_pos, offs_n, T_k, lo, hi, qk_scale,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):  # Alg. 1 line 6, stopped at the diagonal
        cols = start_n + offs_n
        k = tl.load(K + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)  # line 7
        v = tl.load(V + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # line 8: S = Q K^T
        if MASK:  # only the tiles that straddle the diagonal pay for the causal mask
            s = tl.where(cols[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # line 9: running row max,
        p = tl.math.exp2(s - m_new[:, None])  # unnormalized probabilities P~,
        alpha, m_i = tl.math.exp2(m_i - m_new), m_new  # and the rescale of the earlier tiles
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)  # line 10
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sq_b, sq_h, sq_t, skv_b, skv_h, skv_t, nh, T_q, T_k, qk_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                PREC: tl.constexpr):  # Alg. 1 line 3: a program per query tile and (b, h)
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1).to(tl.int64)
    offs_m, offs_n = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_pos, in_q = offs_m + (T_k - T_q), offs_m[:, None] < T_q  # queries: the last T_q tokens
    q = tl.load(_tile(Q, bh, nh, sq_b, sq_h, sq_t, offs_m, offs_d), mask=in_q, other=0.0)  # line 4
    kv = _tile(0, bh, nh, skv_b, skv_h, skv_t, offs_n, offs_d)  # k and v share strides
    m_i, l_i = tl.full([BLOCK_M], float("-inf"), tl.float32), tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # line 5
    # key tiles below `mid` are seen by all rows, `mid` to `hi` cross the diagonal, past `hi` is
    # future. Key 0 is first and seen by all, so the max is finite before a row meets a masked tile
    mid = (start_m + T_k - T_q + 1) // BLOCK_N * BLOCK_N
    hi = tl.minimum(start_m + BLOCK_M + T_k - T_q, T_k)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, kv, skv_t, q_pos, offs_n, T_k, 0, mid,
                               qk_scale, BLOCK_N, False, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, kv, skv_t, q_pos, offs_n, T_k, mid, hi,
                               qk_scale, BLOCK_N, True, PREC)
    rows = bh * T_q + offs_m  # O and LSE are ours, contiguous; lines 12-15:
    tl.store(LSE + rows, m_i + tl.math.log2(l_i), mask=offs_m < T_q)  # L = m + log(l)
    tl.store(O + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (acc / l_i[:, None]).to(O.dtype.element_ty), mask=in_q)  # O = diag(l)^-1 O


@triton.jit
def _bwd_preprocess(O, DO, DELTA, sdo_b, sdo_h, sdo_t, nh, T_q, BLOCK_M: tl.constexpr,
                    HEAD_DIM: tl.constexpr):
    bh = tl.program_id(1).to(tl.int64)
    offs_m, offs_d = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM)
    rows, in_q = bh * T_q + offs_m, offs_m[:, None] < T_q
    o = tl.load(O + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=in_q, other=0.0)
    do = tl.load(_tile(DO, bh, nh, sdo_b, sdo_h, sdo_t, offs_m, offs_d), mask=in_q, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # Alg. 2 line 4: D = rowsum(dO * O)
    tl.store(DELTA + rows, delta, mask=offs_m < T_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, sq_t, sdo_t, LSE, DELTA, cols, offs_m, off, T_q,
                    lo, hi, qk_scale, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
                    PREC: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):  # Alg. 2 line 8, from the diagonal down
        rows = start_m + offs_m
        q = tl.load(q_ptrs + start_m * sq_t, mask=rows[:, None] < T_q, other=0.0)  # line 9
        do = tl.load(do_ptrs + start_m * sdo_t, mask=rows[:, None] < T_q, other=0.0)
        lse = tl.load(LSE + rows, mask=rows < T_q, other=0.0)
        delta = tl.load(DELTA + rows, mask=rows < T_q, other=0.0)
        # transposed tiles (keys x queries), so the key tile stays the row dimension
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # line 10: S = Q K^T
        p_t = tl.math.exp2(s_t - lse[None, :])  # line 11: P = exp(S - L), recomputed
        if MASK:
            p_t = tl.where(cols[:, None] <= rows[None, :] + off, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)  # line 12: dV += P^T dO
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)  # line 13: dP = dO V^T
        ds_t = p_t * (dp_t - delta[None, :])  # line 14: dS = P * (dP - D)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)  # line 16: dK += dS^T Q
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sq_b, sq_h, sq_t, skv_b, skv_h, skv_t,
                     sdo_b, sdo_h, sdo_t, nh, T_q, T_k, qk_scale, sm_scale, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     PREC: tl.constexpr):  # Alg. 2 line 5: a program per key tile and (b, h)
    start_n, bh, off = tl.program_id(0) * BLOCK_N, tl.program_id(1).to(tl.int64), T_k - T_q
    cols, offs_m = start_n + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_M)
    offs_d, in_k = tl.arange(0, HEAD_DIM), cols[:, None] < T_k
    kv = _tile(0, bh, nh, skv_b, skv_h, skv_t, cols, offs_d)
    k, v = tl.load(K + kv, mask=in_k, other=0.0), tl.load(V + kv, mask=in_k, other=0.0)  # line 6
    dk, dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32), tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    q_ptrs = _tile(Q, bh, nh, sq_b, sq_h, sq_t, offs_m, offs_d)
    do_ptrs = _tile(DO, bh, nh, sdo_b, sdo_h, sdo_t, offs_m, offs_d)
    # query tiles before `lo` precede every key here and are skipped (line 7 zeroed dK, dV above);
    # `lo` to `mid` cross the diagonal; from `mid` on, every query sees every key of the tile
    LSE, DELTA = LSE + bh * T_q, DELTA + bh * T_q
    lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M
    mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, sq_t, sdo_t, LSE, DELTA, cols, offs_m,
                             off, T_q, lo, tl.minimum(mid, T_q), qk_scale, BLOCK_M, True, PREC)
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, sq_t, sdo_t, LSE, DELTA, cols, offs_m,
                             off, T_q, mid, T_q, qk_scale, BLOCK_M, False, PREC)
    out = (bh * T_k + cols)[:, None] * HEAD_DIM + offs_d[None, :]  # line 18: write dK, dV
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=in_k)  # chain rule: scale
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_k)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, K, V, kv, skv_t, q_pos, offs_n, T_k, lo, hi, qk_scale,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, PREC: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(K + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)
        v = tl.load(V + kv + start_n * skv_t, mask=cols[:, None] < T_k, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # Alg. 2 line 10
        p = tl.math.exp2(s - lse[:, None])  # line 11
        if MASK:
            p = tl.where(cols[None, :] <= q_pos[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # line 13
        ds = p * (dp - delta[:, None])  # line 14
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)  # line 15, without the atomics
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sq_b, sq_h, sq_t, skv_b, skv_h, skv_t,
                   sdo_b, sdo_h, sdo_t, nh, T_q, T_k, qk_scale, sm_scale, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                   PREC: tl.constexpr):  # a program per query tile and (b, h), as the forward
    start_m, bh = tl.program_id(0) * BLOCK_M, tl.program_id(1).to(tl.int64)
    offs_m, offs_n = start_m + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_pos, rows, in_q = offs_m + (T_k - T_q), bh * T_q + offs_m, offs_m[:, None] < T_q
    q = tl.load(_tile(Q, bh, nh, sq_b, sq_h, sq_t, offs_m, offs_d), mask=in_q, other=0.0)
    do = tl.load(_tile(DO, bh, nh, sdo_b, sdo_h, sdo_t, offs_m, offs_d), mask=in_q, other=0.0)
    lse, delta = tl.load(LSE + rows, mask=offs_m < T_q), tl.load(DELTA + rows, mask=offs_m < T_q)
    kv = _tile(0, bh, nh, skv_b, skv_h, skv_t, offs_n, offs_d)
    mid = (start_m + T_k - T_q + 1) // BLOCK_N * BLOCK_N  # the forward's split of key tiles
    hi = tl.minimum(start_m + BLOCK_M + T_k - T_q, T_k)
    dq = _bwd_dq_inner(tl.zeros([BLOCK_M, HEAD_DIM], tl.float32), q, do, lse, delta, K, V, kv,
                       skv_t, q_pos, offs_n, T_k, 0, mid, qk_scale, BLOCK_N, False, PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, K, V, kv, skv_t, q_pos, offs_n, T_k, mid, hi,
                       qk_scale, BLOCK_N, True, PREC)
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=in_q)


_INTERPRET = not isinstance(_fwd_kernel, triton.runtime.JITFunction)  # jit chose the interpreter


class _FlashAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v):
        (B, H, T_q, D), T_k = q.shape, k.shape[2]
        cfg = launch_config(D, q.dtype)
        prec = "tf32x3" if q.dtype == torch.float32 else "tf32"  # 1 tf32 pass keeps ~3 digits
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, T_q), dtype=torch.float32, device=q.device)
        bm, bn, warps, stages = cfg["fwd"]
        _fwd_kernel[(triton.cdiv(T_q, bm), B * H)](
            q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], H, T_q, T_k,
            math.log2(math.e) / math.sqrt(D), BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D, PREC=prec,
            num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.cfg, ctx.prec = cfg, prec
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        (B, H, T_q, D), T_k = q.shape, k.shape[2]
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv, delta = (torch.empty(x.shape, dtype=x.dtype, device=x.device)
                             for x in (q, k, v, lse))
        args = (*q.stride()[:3], *k.stride()[:3], *do.stride()[:3], H, T_q, T_k,
                math.log2(math.e) / math.sqrt(D), 1 / math.sqrt(D))
        bm, bn, warps, stages = ctx.cfg["dq"]
        grid = (triton.cdiv(T_q, bm), B * H)
        _bwd_preprocess[grid](o, do, delta, *do.stride()[:3], H, T_q, BLOCK_M=bm, HEAD_DIM=D)
        _bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, *args, BLOCK_M=bm, BLOCK_N=bn,
                             HEAD_DIM=D, PREC=ctx.prec, num_warps=warps, num_stages=stages)
        bm, bn, warps, stages = ctx.cfg["dkdv"]
        _bwd_dkdv_kernel[(triton.cdiv(T_k, bn), B * H)](
            q, k, v, do, lse, delta, dk, dv, *args, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=D,
            PREC=ctx.prec, num_warps=warps, num_stages=stages)
        return dq, dk, dv


def flash_attention(q, k, v):
    """Causal softmax(Q K^T / sqrt(hs)) V for q (B, nh, T_q, hs) and k, v (B, nh, T_k, hs) with
    T_q <= T_k, query i at position T_k - T_q + i. Differentiable; returns the input dtype."""
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
    # rows are addressed through strides, so transposed views need no copy; hs must be dense
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != v.stride():  # the kernels address k and v with one set of strides
        k, v = k.contiguous(), v.contiguous()
    if _INTERPRET and q.dtype == torch.bfloat16:  # the interpreter's bf16 arithmetic is wrong
        return _FlashAttention.apply(q.float(), k.float(), v.float()).to(torch.bfloat16)
    return _FlashAttention.apply(q, k, v)

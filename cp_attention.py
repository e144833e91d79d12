"""
Context parallelism for attention, by hand (issue "Scale out"; ../shared/design/context_parallel.md).

Stage 3 trains on 36,864-token sequences: one sequence no longer fits one GPU, so it is split along the sequence
over W ranks (the cp group) and attention, the one layer that mixes positions, is computed across them. This file
will hold both schemes the design names: ring attention (K/V blocks passed around the ring, partial results
merged by their log-sum-exp) and Ulysses (all-to-all from sequence shards to head shards and back).

This first part is what both schemes stand on, all testable in one process:
  - the local kernel interface: attention on one (q block, kv block) pair that also returns the log-sum-exp (LSE)
    of each query row, forward and backward (local_attn_fwd / local_attn_bwd), with a pure-PyTorch reference;
  - the LSE merge of partial results (merge_partials), the heart of ring attention's forward;
  - the exactness of the ring backward: each block's gradients computed from the FINAL out and LSE add up to the
    full gradients (tests/test_cp.py checks it);
  - sharding helpers: contiguous and zigzag layouts, their inverse, positions, and a pad helper.
Still to come (same issue): the ring autograd.Function over torch.distributed, Ulysses, and the training loop.

Shapes follow SDPA: q [B, H, Lq, D], k and v [B, Hkv, Lk, D] (GQA: H % Hkv == 0), lse [B, H, Lq] in fp32
(fp64 for fp64 inputs).
"""
import math

import torch

# ---------------------------------------------------------------------------------------------------------
# the local kernel: one (q block, kv block) pair -> (out, lse), and its backward


def _expand_kv(k, h):
    """GQA: repeat each kv head for the h // Hkv query heads that share it (Qwen3: 16 q heads, 8 kv heads)."""
    return k if k.shape[1] == h else k.repeat_interleave(h // k.shape[1], dim=1)


def _sum_kv_grad(dk, hkv):
    """The inverse of _expand_kv for gradients: the copies of a kv head each got a gradient; the head gets the sum."""
    b, h, l, d = dk.shape
    return dk if h == hkv else dk.view(b, hkv, h // hkv, l, d).sum(2)


def _check(q, k, v):
    if q.dim() != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}; want "
                         f"q [B, H, Lq, D] and k = v [B, Hkv, Lk, D]")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"GQA: query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")


def _scores(q, k, causal, scale):
    """S = scale * q k^T [B, H, Lq, Lk], causal positions above the diagonal at -inf (square blocks only: a causal
    block in ring attention is always a rank's own block, where query i may see keys 0..i)."""
    s = torch.matmul(q, _expand_kv(k, q.shape[1]).transpose(-1, -2)) * scale
    if causal:
        lq, lk = s.shape[-2:]
        if lq != lk:
            raise ValueError(f"causal attention on a {lq} x {lk} block: only square (diagonal) blocks are causal")
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def reference_attn_fwd(q, k, v, causal=False, scale=None):
    """Pure PyTorch, explicit scores: the fp64 reference for every test. Returns (out, lse)."""
    _check(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = _scores(q, k, causal, scale)
    lse = torch.logsumexp(s, dim=-1)                                    # [B, H, Lq]
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)                   # a fully masked row: p = 0, out = 0
    out = torch.matmul(p, _expand_kv(v, q.shape[1]))
    return out, lse


def reference_attn_bwd(dout, q, k, v, out, lse, causal=False, scale=None):
    """FlashAttention-2's backward from (out, lse), explicit: P = exp(S - lse) is the softmax, D = rowsum(dO * O),
    dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = scale * dS K, dK = scale * dS^T Q.
    When out and lse are the FINAL ones of the whole row (all kv blocks merged), P here is the true slice of the
    full softmax for this kv block, and D is the full row's, so the per-block dQ add up over blocks and each
    block's dK, dV are its own exact gradients: the ring backward rests on this (tested)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    h, hkv = q.shape[1], k.shape[1]
    s = _scores(q, k, causal, scale)
    p = torch.exp(s - lse[..., None].to(s.dtype)).nan_to_num(0.0)     # [B, H, Lq, Lk]
    d = (dout * out).sum(-1, keepdim=True)                              # [B, H, Lq, 1]
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, _expand_kv(v, h).transpose(-1, -2))
    ds = p * (dp - d)
    dq = torch.matmul(ds, _expand_kv(k, h)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, _sum_kv_grad(dk, hkv), _sum_kv_grad(dv, hkv)


def _cpu_op(q, impl):
    if impl not in ("auto", "reference"):
        raise ValueError(f"impl must be 'auto' or 'reference', got {impl!r}")
    return impl == "auto" and q.device.type == "cpu"


def local_attn_fwd(q, k, v, causal=False, scale=None, impl="auto"):
    """The kernel both CP schemes call on their local blocks: (out [B, H, Lq, D], lse [B, H, Lq]).
    impl 'auto': the CPU flash op (torch's own, which returns the LSE; fp32 LSE for fp32/bf16 inputs) on CPU,
    the reference elsewhere for now (CUDA flash kernels come with the GPU check of this issue); 'reference'."""
    _check(q, k, v)
    if _cpu_op(q, impl):
        h = q.shape[1]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, scale=scale)
    return reference_attn_fwd(q, k, v, causal, scale)


def local_attn_bwd(dout, q, k, v, out, lse, causal=False, scale=None, impl="auto"):
    """(dq, dk, dv) of one block from the given out and lse (the final ones, in ring attention). dk, dv come back
    at the kv-head count: the GQA copies' gradients are summed."""
    if _cpu_op(q, impl):
        h, hkv = q.shape[1], k.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, _expand_kv(k, h), _expand_kv(v, h), out, lse, 0.0, causal, scale=scale)
        return dq, _sum_kv_grad(dk, hkv), _sum_kv_grad(dv, hkv)
    return reference_attn_bwd(dout, q, k, v, out, lse, causal, scale)


def merge_partials(out, lse, out_b, lse_b):
    """Merge attention over two disjoint sets of keys. With lse = log sum exp of each set's scores,
        lse_new = log(e^lse + e^lse_b) = logaddexp(lse, lse_b)
        out_new = (e^lse * out + e^lse_b * out_b) / e^lse_new = out + e^(lse_b - lse_new) * (out_b - out)
    Every exponent is <= 0, so nothing overflows; out and lse are kept in fp32 (or fp64) across the merges (bf16
    partials lose the small terms). A set whose rows are all masked has lse -inf and adds nothing; two such sets give
    0 * (...) instead of nan. out=None starts the accumulation. Returns (out, lse)."""
    acc = torch.float64 if out_b.dtype == torch.float64 else torch.float32
    if out is None:
        return out_b.to(acc), lse_b.to(acc)
    lse_new = torch.logaddexp(lse, lse_b.to(acc))
    w = torch.exp(lse_b.to(acc) - lse_new).nan_to_num(0.0)[..., None]  # [B, H, Lq, 1]
    return out + w * (out_b.to(acc) - out), lse_new


# ---------------------------------------------------------------------------------------------------------
# sharding a sequence over W ranks

def _chunks_of(rank, world, layout):
    """Which of the sequence's equal chunks a rank holds. contiguous: W chunks, rank r holds chunk r. zigzag: 2W
    chunks, rank r holds chunks r and 2W-1-r, so that under a causal mask every rank has the same work (the early
    chunk sees few keys, the late one many: ring-flash-attn's layout, and PyTorch's 'head-tail')."""
    if layout == "contiguous":
        return [rank], world
    if layout == "zigzag":
        return [rank, 2 * world - 1 - rank], 2 * world
    raise ValueError(f"layout must be 'contiguous' or 'zigzag', got {layout!r}")


def _check_len(n, world, layout, parts):
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if n % parts:
        raise ValueError(f"sequence length {n} does not split over {world} ranks in the {layout} layout (it must be "
                         f"a multiple of {parts}); pad it first with cp_attention.pad_to_multiple")


def shard_sequence(x, rank, world, dim=1, layout="zigzag"):
    """This rank's part of x along dim (tokens [B, L], hidden states [B, L, d], or q/k/v [B, H, L, D] with dim=2).
    Tokens, labels (shifted BEFORE sharding, so that a shard's last label is the next shard's first token),
    positions, document ids and loss weights all go through this same function, so they stay aligned."""
    idx, parts = _chunks_of(rank, world, layout)
    _check_len(x.shape[dim], world, layout, parts)
    pieces = x.chunk(parts, dim=dim)
    return torch.cat([pieces[i] for i in idx], dim=dim)


def unshard_sequence(shards, dim=1, layout="zigzag"):
    """The inverse: every rank's shard (in rank order, e.g. from all_gather) -> the whole sequence."""
    world = len(shards)
    parts = [None] * (world if layout == "contiguous" else 2 * world)
    for rank, s in enumerate(shards):
        idx, _ = _chunks_of(rank, world, layout)
        for i, piece in zip(idx, s.chunk(len(idx), dim=dim)):
            parts[i] = piece
    return torch.cat(parts, dim=dim)


def positions_for_shard(seq_len, rank, world, layout="zigzag", device=None):
    """The global positions [L_local] of this rank's tokens: RoPE needs them (a zigzag shard is not 0..L/W-1)."""
    return shard_sequence(torch.arange(seq_len, device=device)[None], rank, world, dim=1, layout=layout)[0]


def pad_to_multiple(x, multiple, dim=1, value=0):
    """Pad x along dim with value up to a multiple of `multiple` (2W for zigzag, W for contiguous). Pad labels with
    the ignore index and loss weights with 0, so the padding is masked out of the loss."""
    n = x.shape[dim]
    extra = (-n) % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)

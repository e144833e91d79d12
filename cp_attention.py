"""
Context parallelism for attention, by hand.

Stage 3 trains on 36,864-token sequences: one sequence no longer fits one GPU, so it is split along the sequence
over W ranks (the cp group) and attention, the one layer that mixes positions, is computed across them. This file
holds both schemes: ring attention (K/V blocks passed around the ring, partial results merged by their
log-sum-exp) and Ulysses (all-to-all from sequence shards to head shards and back).

In order:
  - the local kernel interface: attention on one (q block, kv block) pair that also returns the log-sum-exp (LSE)
    of each query row, forward and backward (local_attn_fwd / local_attn_bwd), with three kernels: torch's CPU
    flash op, FlexAttention (compiled on CUDA: a fused kernel that never holds the Lq x Lk scores, and skips the
    128 x 128 tiles the mask empties), and a pure-PyTorch reference (exact, explicit scores: the tests' yardstick);
  - FlexAttention's masks: build_block_mask (a BlockMask built a slab of query rows at a time, never the whole
    Lq x Lk mask) and the mask_mod of one block at given global positions;
  - the LSE merge of partial results (merge_partials), the heart of ring attention's forward;
  - sharding helpers: contiguous and zigzag layouts, their inverse, positions, and a pad helper;
  - ring attention over torch.distributed (ring_attention: plain ring or zigzag, causal or not, MHA or GQA, any
    mask given whole or as a function of (rows, cols): per-example causal with the causal saving, bidirectional
    vision without it), whose backward rests on one fact: each block's gradients computed from the FINAL out and
    LSE add up to the full gradients (tests/test_cp.py checks it in one process, then the whole ring over 1-4
    gloo processes);
  - Ulysses (ulysses_attention: all-to-all from sequence shards to head shards, full-sequence attention on
    H/W heads, all-to-all back), sharing the local kernels with the ring;
  - ContextParallel / CPAttention: what the model (model.Molmo2.hidden) uses to shard a sequence and attend
    across the cp group in training (train.py under torchrun, cp > 1).

Shapes follow SDPA: q [B, H, Lq, D], k and v [B, Hkv, Lk, D] (GQA: H % Hkv == 0), lse [B, H, Lq] in fp32
(fp64 for fp64 inputs).

Kernels (the impl argument): 'auto' is the CPU flash op on a CPU and FlexAttention elsewhere (CUDA); 'flex' and
'reference' force one. FlexAttention has no backward on a CPU in torch 2.13 (the tests lift that check to run the
same code eagerly, as dense math); 'auto' therefore never picks it there.
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_mask, flex_attention

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


def _scores(q, k, causal, scale, mask=None):
    """S = scale * q k^T [B, H, Lq, Lk], causal positions above the diagonal at -inf (square blocks only: a causal
    block in ring attention is always a rank's own block, where query i may see keys 0..i), and where the bool mask
    [B, 1 or H, Lq, Lk] is False (True = may attend, SDPA's convention; model.attention_mask_4d makes Molmo2's)."""
    s = torch.matmul(q, _expand_kv(k, q.shape[1]).transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if causal:
        lq, lk = s.shape[-2:]
        if lq != lk:
            raise ValueError(f"causal attention on a {lq} x {lk} block: only square (diagonal) blocks are causal")
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def reference_attn_probs(q, k, causal=False, scale=None, mask=None):
    """The softmax of the explicit scores, P [B, H, Lq, Lk], and its lse [B, H, Lq]: what every kernel computes
    without writing it out (eval.attention_maps shows it)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = _scores(q, k, causal, scale, mask)
    lse = torch.logsumexp(s, dim=-1)                                    # [B, H, Lq]
    return torch.exp(s - lse[..., None]).nan_to_num(0.0), lse          # a fully masked row: p = 0, out = 0


def reference_attn_fwd(q, k, v, causal=False, scale=None, mask=None):
    """Pure PyTorch, explicit scores: the fp64 reference for every test. Returns (out, lse)."""
    _check(q, k, v)
    p, lse = reference_attn_probs(q, k, causal, scale, mask)
    return torch.matmul(p, _expand_kv(v, q.shape[1])), lse


def reference_attn_bwd(dout, q, k, v, out, lse, causal=False, scale=None, mask=None):
    """FlashAttention-2's backward from (out, lse), explicit: P = exp(S - lse) is the softmax, D = rowsum(dO * O),
    dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = scale * dS K, dK = scale * dS^T Q.
    When out and lse are the FINAL ones of the whole row (all kv blocks merged), P here is the true slice of the
    full softmax for this kv block, and D is the full row's, so the per-block dQ add up over blocks and each
    block's dK, dV are its own exact gradients: the ring backward rests on this (tested)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    h, hkv = q.shape[1], k.shape[1]
    s = _scores(q, k, causal, scale, mask)
    p = torch.exp(s - lse[..., None].to(s.dtype)).nan_to_num(0.0)     # [B, H, Lq, Lk]
    d = (dout * out).sum(-1, keepdim=True)                              # [B, H, Lq, 1]
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, _expand_kv(v, h).transpose(-1, -2))
    ds = p * (dp - d)
    dq = torch.matmul(ds, _expand_kv(k, h)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    return dq, _sum_kv_grad(dk, hkv), _sum_kv_grad(dv, hkv)


# ---------------------------------------------------------------------------------------------------------
# FlexAttention: the kernel, and its masks built without ever holding an Lq x Lk tensor

_compiled_flex = None
# One compiled FlexAttention serves every call site (model.attend, the ring's blocks, Ulysses), and dynamo compiles
# it once per call signature (shapes, dtype, grad mode, LSE or not, mask function): its cache holds them all. Past
# dynamo's limit (8 by default) the function would run eagerly, which materialises the whole T x T scores (out of
# memory at 36,864 tokens): so the limit is raised to what a run needs and hitting it is an error. A run needs a
# handful: training rows on CUDA have one shape (data.collate fixed=True), seen with gradients (and by eval without),
# the cp kernels' blocks, and one per length of eval's prompt batches, rounded up to whole 128-tiles
# (model.flex_block_mask), so at most (longest prompt) / 128 of those.
FLEX_RECOMPILE_LIMIT = 64


class FlexRecompileLimit(RuntimeError):
    """The compiled FlexAttention met more call signatures than FLEX_RECOMPILE_LIMIT."""


def strict_recompile_limit():
    """dynamo's recompile limit (per compiled function) raised to FLEX_RECOMPILE_LIMIT, and an eager fallback past
    it made an error (fail_on_recompile_limit_hit): process-wide settings, so they hold for every compiled piece,
    FlexAttention and model.compile_blocks' blocks alike. An eager fallback would be silent, slow, and for
    FlexAttention a dense T x T in memory."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = FLEX_RECOMPILE_LIMIT
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, FLEX_RECOMPILE_LIMIT)
    cfg.fail_on_recompile_limit_hit = True


def compile_flex(backend="inductor"):
    """flex_attention under torch.compile (static shapes), with the recompile limit raised and an eager fallback
    past it turned into FlexRecompileLimit (strict_recompile_limit). backend: 'inductor' (the fused kernel); the
    tests use 'eager' on a CPU."""
    strict_recompile_limit()
    cfg = torch._dynamo.config
    compiled = torch.compile(flex_attention, dynamic=False, backend=backend)

    def run(*args, **kw):
        try:
            return compiled(*args, **kw)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            raise FlexRecompileLimit(
                f"FlexAttention was compiled for {cfg.recompile_limit} call signatures (cp_attention."
                f"FLEX_RECOMPILE_LIMIT) and met another; run with TORCH_LOGS=recompiles to see what changes between "
                f"calls (packing=True gives every row one length), or raise the limit") from e
    return run


def flex_attention_fn(cuda):
    """FlexAttention compiled on CUDA (compile_flex: a fused kernel that skips fully masked tiles and keeps no scores
    for the backward: it recomputes them from the LSE); eager elsewhere, where it computes the same masked softmax
    densely (that is how the tests check the masks and the gradients on a CPU; flex_attention warns once that it
    is unfused)."""
    global _compiled_flex
    if not cuda:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = compile_flex()
    return _compiled_flex


FLEX_BLOCK = 128        # FlexAttention's tile (its default): the unit in which masked-out work is skipped
FLEX_MASK_ROWS = 1024   # query rows evaluated per slab in build_block_mask: a [B, 1024, Lk] bool at a time


def _ordered(tiles):
    """A [B, 1, Mq, Mk] 0/1 tile map -> FlexAttention's sparse form: (count [B, 1, Mq], indices [B, 1, Mq, Mk]),
    the kept key tiles of each query tile first (a stable sort keeps them in key order). int32, as the kernel wants."""
    t = tiles.to(torch.int32)
    return t.sum(-1, dtype=torch.int32), torch.argsort(t, dim=-1, descending=True, stable=True).to(torch.int32)


def build_block_mask(mask_mod, batch, q_len, kv_len, device, rows=FLEX_MASK_ROWS):
    """A FlexAttention BlockMask for mask_mod(b, h, q, k) -> bool (True = may attend; the same for every head) over
    q_len queries and kv_len keys: what create_block_mask returns, built a slab of `rows` query rows at a time.
    create_block_mask evaluates the whole [B, 1, q_len, kv_len] mask first (1.4 GB a row at 36,864 tokens); here
    only [B, 1, rows, kv_len] exists at once, and what is kept is the tile map, [B, 1, q_len/128, kv_len/128].
    Each 128 x 128 tile is empty (skipped), full (computed without calling mask_mod) or partial (mask_mod applied
    element by element); the tiles past the ends are padded with False, so the last ones are partial."""
    bs = FLEX_BLOCK
    step = max(bs, rows // bs * bs)                      # slabs of whole tiles
    mk = -(-kv_len // bs)                                # key tiles
    counts = []
    for q0 in range(0, q_len, step):
        n = min(step, q_len - q0)
        # create_mask evaluates mask_mod over every (b, q, k) of the slab (vmap), its queries shifted by q0
        m = create_mask(lambda b, h, q, k: mask_mod(b, h, q + q0, k), batch, 1, n, kv_len, device)  # [B, 1, n, Lk]
        m = F.pad(m, (0, mk * bs - kv_len, 0, -(-n // bs) * bs - n))                          # whole tiles
        counts.append(m.view(batch, 1, -1, bs, mk, bs).sum((3, 5)))                            # [B, 1, n/128, Mk]
    counts = torch.cat(counts, 2)                        # [B, 1, Mq, Mk]: allowed pairs per tile
    full = counts == bs * bs
    partial = (counts > 0) & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len))


def block_mask_is_empty(bm):
    """True when a BlockMask keeps no tile at all: nothing to compute (one host sync)."""
    n = bm.kv_num_blocks.sum() + (bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0)
    return int(n) == 0


def _global_mask_mod(mask):
    """A mask over the whole sequence as FlexAttention's mask_mod(b, h, q, k) at GLOBAL positions q, k.
    A bool tensor [B, 1, L, L] is read element by element (fine where the dense mask exists anyway: tests, shapes
    scale). Anything else must carry its own mask_mod (model.MolmoMask: doc ids and vision flags, O(L) memory);
    a plain function (rows, cols) -> dense block only serves the dense kernels."""
    if isinstance(mask, torch.Tensor):
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"a mask tensor must be bool [B, 1, Lq, Lk], got {mask.dtype} {tuple(mask.shape)}")

        def dense(b, h, q, k):
            return mask[b, 0, q, k]
        return dense
    mod = getattr(mask, "mask_mod", None)
    if mod is None:
        raise ValueError("impl 'flex' needs the mask as a bool tensor or as an object with a mask_mod(b, h, q, k) "
                         "over global positions (model.MolmoMask); a plain function (rows, cols) -> block serves "
                         "the dense kernels only")
    return mod


def flex_mask_mod(mask, rows, cols, causal):
    """The mask_mod of one block: queries at global positions rows [n], keys at cols [m] (long tensors), so block
    index (q, k) is global pair (rows[q], cols[k]); causal adds rows[q] >= cols[k] (the causal triangle of a
    diagonal block, in global positions). None when there is nothing to mask (no mask, not causal).
    The result is a plain closure over tensors: torch.compile traces it without recompiling when only the
    tensors' values change."""
    if mask is None and not causal:
        return None
    glob = None if mask is None else _global_mask_mod(mask)

    def mod(b, h, q, k):
        i, j = rows[q], cols[k]
        if glob is None:
            return i >= j
        ok = glob(b, h, i, j)
        return ok & (i >= j) if causal else ok
    return mod


def flex_block(mask, rows, cols, causal, batch):
    """The BlockMask of one (rows, cols) block of a whole-sequence mask (None: no mask, not causal). batch: q's
    batch size; a BlockMask of batch 1 serves every row when the mask does not depend on the row (only causal, or a
    [1, 1, L, L] tensor)."""
    mod = flex_mask_mod(mask, rows, cols, causal)
    if mod is None:
        return None
    b = 1 if mask is None else mask.shape[0] if isinstance(mask, torch.Tensor) else batch
    return build_block_mask(mod, b, len(rows), len(cols), rows.device)


def _as_block_mask(mask, causal, q, k):
    """The local kernels' mask for FlexAttention: a BlockMask passes through (its causality already in it); a
    dense bool block [B, 1, Lq, Lk] or the causal flag becomes one."""
    if isinstance(mask, BlockMask):
        if causal:
            raise ValueError("a BlockMask carries its own causality: pass causal=False with it")
        return mask
    lq, lk = q.shape[2], k.shape[2]
    if causal and lq != lk:
        raise ValueError(f"causal attention on a {lq} x {lk} block: only square (diagonal) blocks are causal")
    return flex_block(mask, torch.arange(lq, device=q.device), torch.arange(lk, device=q.device), causal, q.shape[0])


def _flex(q, k, v, block_mask, scale):
    """FlexAttention with its LSE: (out [B, H, Lq, D] in q's dtype, lse [B, H, Lq] fp32 (fp64 for fp64 inputs);
    a row that sees no key gets out 0 and lse -inf). GQA through enable_gqa: K/V are never repeated."""
    out, aux = flex_attention_fn(q.is_cuda)(q, k, v, block_mask=block_mask, scale=scale,
                                            enable_gqa=k.shape[1] != q.shape[1], return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_attn_bwd(dout, q, k, v, out, lse, scale=None, block_mask=None):
    """(dq, dk, dv) of one block from the FINAL out and lse of its query rows (all kv blocks merged), through
    FlexAttention's own backward: the block's partial result (out_b, lse_b) is recomputed under autograd, and the
    gradient of the LSE merge is pushed into it. Per query row, the merge of the blocks c is
        lse = log sum_c exp(lse_c),   out = sum_c w_c out_c,   w_c = exp(lse_c - lse),
    and since d lse / d lse_b = w_b, d w_c / d lse_b = w_c (1[c = b] - w_b), so d out / d lse_b = w_b (out_b - out):
        dL/d out_b = w_b * dout                                  [B, H, Lq, D]
        dL/d lse_b = w_b * sum over D of dout * (out_b - out)    [B, H, Lq]
    Autograd through (out_b, lse_b) then gives this block's share of dq and its own dk, dv (GQA: at the kv-head
    count). A row that sees no key of this block has lse_b = -inf and w_b = 0; a row whose final lse is -inf too
    (it sees nothing anywhere) gives exp(-inf + inf) = nan, set to 0: both contribute nothing. The cost is a
    forward of the block on top of its backward (FlashAttention's own backward takes P from the final lse instead;
    FlexAttention's public API takes only its own (out_b, lse_b))."""
    acc = lse.dtype
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out_b, lse_b = _flex(qq, kk, vv, block_mask, scale)
        w = torch.exp(lse_b.detach().to(acc) - lse).nan_to_num(0.0)                  # [B, H, Lq]
        g = dout.to(acc)
        d_out = (w[..., None] * g).to(out_b.dtype)
        d_lse = (w * (g * (out_b.detach().to(acc) - out.to(acc))).sum(-1)).to(lse_b.dtype)
        return torch.autograd.grad((out_b, lse_b), (qq, kk, vv), (d_out, d_lse))


# ---------------------------------------------------------------------------------------------------------
# the local kernels, by name

IMPLS = ("auto", "flex", "reference")


def kernel_for(q, impl):
    """Which kernel runs: 'cpu' (torch's CPU flash op), 'flex' or 'reference'. impl 'auto': 'cpu' on a CPU,
    'flex' elsewhere (CUDA)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be 'auto', 'flex' or 'reference', got {impl!r}")
    if impl == "auto":
        return "cpu" if q.device.type == "cpu" else "flex"
    return impl


def _additive(mask, dtype):
    """The CPU flash op takes the mask as an additive bias in q's dtype: 0 where allowed, -inf where not."""
    return None if mask is None else torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask,
                                                                                                      float("-inf"))


def local_attn_fwd(q, k, v, causal=False, scale=None, impl="auto", mask=None):
    """The kernel both CP schemes call on their local blocks: (out [B, H, Lq, D], lse [B, H, Lq]).
    impl: 'auto' (the CPU flash op on a CPU, FlexAttention elsewhere), 'flex' or 'reference' (kernel_for).
    mask: None, a dense bool block [B, 1, Lq, Lk] (True = may attend), or for 'flex' a BlockMask of the block
    (flex_block; its causality folded in, so causal=False with it)."""
    _check(q, k, v)
    kernel = kernel_for(q, impl)
    if kernel == "flex":
        return _flex(q, k, v, _as_block_mask(mask, causal, q, k), scale)
    if kernel == "cpu":
        h = q.shape[1]
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_kv(k, h), _expand_kv(v, h), 0.0, causal, attn_mask=_additive(mask, q.dtype), scale=scale)
    return reference_attn_fwd(q, k, v, causal, scale, mask)


def local_attn_bwd(dout, q, k, v, out, lse, causal=False, scale=None, impl="auto", mask=None):
    """(dq, dk, dv) of one block from the given out and lse (the final ones, in ring attention). dk, dv come back
    at the kv-head count: the GQA copies' gradients are summed."""
    kernel = kernel_for(q, impl)
    if kernel == "flex":
        return flex_attn_bwd(dout, q, k, v, out, lse, scale, _as_block_mask(mask, causal, q, k))
    if kernel == "cpu":
        h, hkv = q.shape[1], k.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, _expand_kv(k, h), _expand_kv(v, h), out, lse, 0.0, causal, attn_mask=_additive(mask, q.dtype),
            scale=scale)
        return dq, _sum_kv_grad(dk, hkv), _sum_kv_grad(dv, hkv)
    return reference_attn_bwd(dout, q, k, v, out, lse, causal, scale, mask)


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


def shard_sequence(x, rank, world, dim, layout="zigzag"):
    """This rank's part of x along dim (tokens [B, L], hidden states [B, L, d], or q/k/v [B, H, L, D] with dim=2).
    Tokens, labels (shifted BEFORE sharding, so that a shard's last label is the next shard's first token),
    positions, document ids and loss weights all go through this same function, so they stay aligned."""
    idx, parts = _chunks_of(rank, world, layout)
    _check_len(x.shape[dim], world, layout, parts)
    pieces = x.chunk(parts, dim=dim)
    return torch.cat([pieces[i] for i in idx], dim=dim)


def unshard_sequence(shards, dim, layout="zigzag"):
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


# ---------------------------------------------------------------------------------------------------------
# ring attention: each rank keeps its queries; the K/V blocks travel round the ring of W ranks

def _ring_pass(t, group):
    """Start sending t to the next rank of the ring and receiving the previous rank's t: (requests, buffer).
    One packed contiguous buffer per pass (K and V together), so one send and one receive per step."""
    w, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = (dist.get_global_rank(group, (r + i) % w) if group is not None else (r + i) % w for i in (1, -1))
    buf = torch.empty_like(t)
    return dist.batch_isend_irecv([dist.P2POp(dist.isend, t, nxt, group), dist.P2POp(dist.irecv, buf, prv, group)]), buf


def _blocks(step, src, rank, causal, layout, n):
    """The (query rows, key rows, causal) blocks that rank `rank` computes against the K/V of rank `src`, for n local
    tokens. Masked-out blocks are never computed; only the diagonal block (step 0, the rank's own K/V) is causal,
    and it is square, with positions increasing along the local sequence in both layouts.
      contiguous (rank r holds chunk r): src < r: all of it is in the past; src > r: all in the future, skipped.
        Rank W-1 does W blocks of work and rank 0 one: unbalanced.
      zigzag (rank r holds chunks r and 2W-1-r, each n/2 tokens): src < r: every query sees the first half of src's
        K/V (chunk src, in the past) and none of the second (chunk 2W-1-src, in the future of both query chunks);
        src > r: only the second query half (chunk 2W-1-r) sees src's K/V, all of it. Every rank does the same work."""
    every, h = slice(None), n // 2
    if not causal:
        return [(every, every, False)]
    if step == 0:
        return [(every, every, True)]
    if layout == "contiguous":
        return [(every, every, False)] if src < rank else []
    return [(every, slice(0, h), False)] if src < rank else [(slice(h, None), every, False)]


def mask_rows_cols(mask, rows, cols):
    """The mask at global query positions `rows` and key positions `cols`: [B, 1, len(rows), len(cols)] bool.
    mask is a dense [B, 1, L, L] tensor (shapes scale) or a function (rows, cols) -> that block, which builds only
    the block from per-token facts (model.MolmoMask: doc ids and vision flags). At stage 3's 36,864
    tokens the dense mask is 1.4 GB a row; a block is what one kernel call needs."""
    return mask(rows, cols) if callable(mask) else mask[:, :, rows][:, :, :, cols]


def _dense_block(mask, pos_q, pos_k, qs, ks, causal):
    """This block's dense mask (None: no mask): rows at the queries' global positions, columns at the keys'.
    A causal (diagonal) block gets the causal triangle folded in."""
    if mask is None:
        return None
    mb = mask_rows_cols(mask, pos_q[qs], pos_k[ks])
    if causal:
        mb = mb & torch.ones(mb.shape[-2:], dtype=torch.bool, device=mb.device).tril()
    return mb


def _ring_blocks(step, src, rank, causal, layout, n, mask, pos, kernel, batch):
    """The blocks to compute at one ring step, with their masks: (query rows, key rows, causal flag for the kernel,
    block mask or None). Forward and backward walk exactly the same blocks. Blocks the mask empties are dropped.
    Dense kernels: the mask is the block's dense bool slice, with the causal triangle folded into it when there is
    a mask (the kernels take one or the other). FlexAttention: a BlockMask of the block, causality (global
    positions) folded in, so its causal flag is always False; only the BlockMask's tile map is ever held."""
    for qs, ks, c in _blocks(step, src, rank, causal, layout, n):
        if kernel == "flex":
            mb = flex_block(mask, pos[rank][qs], pos[src][ks], c, batch)
            if mb is None or not block_mask_is_empty(mb):
                yield qs, ks, False, mb
            continue
        mb = _dense_block(mask, pos[rank], pos[src], qs, ks, c)
        if mb is None or mb.any():  # e.g. another example's tokens only: nothing to see, nothing to compute
            yield qs, ks, c and mb is None, mb


def _ring_plan(rank, world, causal, layout, n, mask, pos, kernel, batch, cache):
    """blocks_at(step) -> that step's blocks (_ring_blocks). Dense masks are rebuilt at every call, one block at a
    time (cheap to rebuild, costly to keep). BlockMasks are built once for all W steps and kept: by the backward
    (through ctx) and, with a cache (a dict the caller keeps for one forward: CPAttention's), by every layer."""
    if kernel != "flex":
        return lambda step: _ring_blocks(step, (rank - step) % world, rank, causal, layout, n, mask, pos, kernel,
                                         batch)
    key = ("ring", rank, world, causal, layout, n, batch)
    plan = None if cache is None else cache.get(key)
    if plan is None:
        plan = [list(_ring_blocks(step, (rank - step) % world, rank, causal, layout, n, mask, pos, kernel, batch))
                for step in range(world)]
        if cache is not None:
            cache[key] = plan
    return plan.__getitem__


class _RingAttention(torch.autograd.Function):
    """Forward: W steps; at each, attend the local queries to the K/V block in hand while the next block is already
    on its way (isend/irecv started before the compute: the transfer overlaps it), and merge the partial result
    into (out, lse) by the LSE (merge_partials, fp32). Backward: the same W steps again; each block's gradients come
    from the FINAL out and lse (exact: see reference_attn_bwd and flex_attn_bwd); dq stays here, while the block's
    dK/dV accumulator (fp32) travels the ring with the block and reaches its owner after W passes."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, layout, scale, impl, mask, cache):
        w, r = dist.get_world_size(group), dist.get_rank(group)
        n = q.shape[2]
        kernel = kernel_for(q, impl)
        pos = [positions_for_shard(n * w, i, w, layout, q.device) for i in range(w)]  # each rank's global positions
        blocks_at = _ring_plan(r, w, causal, layout, n, mask, pos, kernel, q.shape[0], cache)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        out = torch.zeros(q.shape, dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()                      # [2, B, Hkv, n, D]: one buffer to pass
        for step in range(w):
            reqs, nxt = _ring_pass(kv, group) if step + 1 < w else ([], None)
            for qs, ks, c, mb in blocks_at(step):
                o_b, l_b = local_attn_fwd(q[:, :, qs].contiguous(), kv[0][:, :, ks].contiguous(),
                                          kv[1][:, :, ks].contiguous(), c, scale, impl, mb)
                if isinstance(mb, torch.Tensor):  # a row that sees no key of this block adds nothing (the CPU op
                    l_b = l_b.masked_fill(~mb.any(-1), float("-inf"))  # says lse 0; FlexAttention -inf already)
                out[:, :, qs], lse[:, :, qs] = merge_partials(out[:, :, qs], lse[:, :, qs], o_b, l_b)
            for req in reqs:
                req.wait()
            kv = nxt if nxt is not None else kv
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, scale, impl, blocks_at)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale, impl, blocks_at = ctx.args
        w = dist.get_world_size(group)
        acc = lse.dtype
        dout = dout.contiguous()
        lse_k = lse.float() if q.dtype != torch.float64 else lse  # the CPU flash op wants fp32 (fp64) LSE
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack([k, v]).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=q.device)  # the accumulator of the block in hand
        for step in range(w):
            reqs, nxt = _ring_pass(kv, group) if step + 1 < w else ([], None)
            for qs, ks, c, mb in blocks_at(step):
                dq_b, dk_b, dv_b = local_attn_bwd(dout[:, :, qs].contiguous(), q[:, :, qs].contiguous(),
                                                  kv[0][:, :, ks].contiguous(), kv[1][:, :, ks].contiguous(),
                                                  out[:, :, qs].contiguous(), lse_k[:, :, qs].contiguous(), c,
                                                  scale, impl, mb)
                dq[:, :, qs] += dq_b
                dkv[0][:, :, ks] += dk_b
                dkv[1][:, :, ks] += dv_b
            for req in reqs:
                req.wait()
            kv = nxt if nxt is not None else kv
            if w > 1:  # hand the accumulator on with its block; after W passes each rank holds its own block's
                reqs, dkv_in = _ring_pass(dkv, group)
                for req in reqs:
                    req.wait()
                dkv = dkv_in
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None, None


def check_shards(q, k, group, cache=None, who="attention"):
    """Every rank of the group must hold a shard of the same shape: the collectives that follow exchange buffers
    of this rank's size, and a mismatch would abort the process inside the backend (gloo: SIGABRT "Received data
    size doesn't match") or hang it. One small all_gather of each rank's (B, H, Hkv, n, D), the same size on every
    rank, so it is always safe; every rank then raises the same ValueError, naming the shapes. With a cache (one
    forward's) it runs once per forward, not once per layer."""
    if dist.get_world_size(group) == 1 or (cache is not None and cache.get("shards checked")):
        return
    mine = torch.tensor([q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3]], device=q.device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    shapes = [tuple(t.tolist()) for t in every]
    if len(set(shapes)) > 1:
        raise ValueError(f"{who}: the ranks hold shards of different shapes (B, H, Hkv, local length, D): "
                         + ", ".join(f"rank {r} {s_}" for r, s_ in enumerate(shapes))
                         + "; local lengths " + ", ".join(str(s_[3]) for s_ in shapes)
                         + ": pad the whole sequence (pad_to_multiple) and shard it with shard_sequence on every rank")
    if cache is not None:
        cache["shards checked"] = True


def _need_causal(causal, who):
    if causal not in (True, False):
        raise ValueError(f"{who}: pass causal=True (no query sees a later key: a causal LM, or a per-example causal "
                         f"mask; later blocks are skipped) or causal=False (the mask opens later keys, as Molmo2's "
                         f"bidirectional vision tokens do); got {causal!r}. There is no default: the wrong one is "
                         f"silently wrong")


def ring_attention(q, k, v, group=None, causal=None, layout="zigzag", scale=None, impl="auto", mask=None,
                   cache=None):
    """Attention over a sequence sharded across the ranks of `group` (shard_sequence with the same layout): q
    [B, H, n, D], k and v [B, Hkv, n, D] are this rank's n tokens; returns this rank's output [B, H, n, D], equal
    to the matching shard of full attention (tests/test_cp.py, W = 1..4). K/V travel at the kv-head count (GQA
    sends Hkv heads, not H). Differentiable in q, k and v. impl: the local kernel (kernel_for).
    mask: bool [B, 1, L, L] over the WHOLE sequence (True = may attend; every rank has it: the sequence is built whole,
    then sharded), sliced per block at the global positions. With causal=True it must open no future key (Molmo2's
    per-example causal mask: model.attention_mask_4d(..., bidir=False)), since future blocks are skipped. A mask that
    does (bidirectional vision tokens) needs causal=False: every block is then computed under its slice, exact but
    without the causal saving. Blocks the mask empties are skipped. The mask may also be a function (rows, cols) ->
    block (mask_rows_cols): a dense L x L mask is fine at shapes scale, not at stage 3's 36,864 tokens (1.4 GB a
    row), where the model passes a model.MolmoMask over its doc ids and vision flags instead, which FlexAttention
    also reads element by element (its mask_mod) to build each block's BlockMask.
    cache: a dict kept across calls with the same mask, shapes and group (the layers of one forward), in which the
    BlockMasks of FlexAttention are built once."""
    _need_causal(causal, "ring_attention")
    _chunks_of(0, 1, layout)  # validates the layout name
    if causal and layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"zigzag: the local length {q.shape[2]} must be even (two chunks per rank)")
    check_shards(q, k, group, cache, "ring_attention")
    return _RingAttention.apply(q, k, v, group, causal, layout, scale, impl, mask, cache)


# ---------------------------------------------------------------------------------------------------------
# Ulysses: swap sequence sharding for head sharding, attend over the whole sequence, swap back

ULYSSES_Q_CHUNK = 4096  # query rows per kernel call when the mask is a function: [B, 1, 4096, L] bool at a time


class _LocalAttention(torch.autograd.Function):
    """local_attn_fwd / local_attn_bwd as one differentiable op: the kernels the ring uses, for Ulysses.
    With a mask function the query rows go through in chunks, each with its own [chunk, L] slice of the mask:
    query rows are independent in attention (each row's softmax is over the keys), so no merge is needed."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, impl, mask):
        L = q.shape[2]
        step = ULYSSES_Q_CHUNK if callable(mask) else L
        if causal and step < L:  # a causal chunk would not be square; the mask function carries the causality
            raise ValueError("ulysses_attention: with a mask function pass causal=False (the mask is causal)")
        cols = torch.arange(L, device=q.device)
        outs, lses = [], []
        for i in range(0, L, step):
            m = mask_rows_cols(mask, cols[i:i + step], cols) if mask is not None else None
            o, l = local_attn_fwd(q[:, :, i:i + step].contiguous(), k, v, causal, scale, impl, m)
            outs.append(o)
            lses.append(l)
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, impl, mask, step)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, impl, mask, step = ctx.args
        L, dout = q.shape[2], dout.contiguous()
        cols = torch.arange(L, device=q.device)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k, dtype=lse.dtype), torch.zeros_like(v, dtype=lse.dtype)
        for i in range(0, L, step):
            r = slice(i, i + step)
            m = mask_rows_cols(mask, cols[r], cols) if mask is not None else None
            dq_c, dk_c, dv_c = local_attn_bwd(dout[:, :, r].contiguous(), q[:, :, r].contiguous(), k, v,
                                              out[:, :, r].contiguous(), lse[:, :, r].contiguous(), causal, scale,
                                              impl, m)
            dq[:, :, r] = dq_c
            dk += dk_c
            dv += dv_c
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _seq_to_heads(x, group):
    """[B, H, n, D] (this rank's n tokens, all heads) -> [B, H/W, W*n, D] (all tokens, this rank's H/W heads).
    Head group j is sent to rank j; what comes back from rank i is its n tokens of our heads, and rank order is
    sequence order (the contiguous layout)."""
    w = dist.get_world_size(group)
    b, h, n, d = x.shape
    send = x.reshape(b, w, h // w, n, d).transpose(0, 1).contiguous()   # [W, B, H/W, n, D], block j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)                     # recv[i]: rank i's tokens, our heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // w, w * n, d)


def _heads_to_seq(x, group):
    """The inverse: [B, H/W, W*n, D] -> [B, H, n, D]."""
    w = dist.get_world_size(group)
    b, hw, L, d = x.shape
    send = x.reshape(b, hw, w, L // w, d).permute(2, 0, 1, 3, 4).contiguous()  # [W, B, H/W, n, D], tokens of rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)                     # recv[i]: our tokens, rank i's heads
    return recv.transpose(0, 1).reshape(b, w * hw, L // w, d)


class _AllToAll(torch.autograd.Function):
    """An all-to-all is a permutation of the data across ranks, so its gradient is the inverse permutation."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.args = (group, to_heads)
        return _seq_to_heads(x, group) if to_heads else _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        group, to_heads = ctx.args
        return (_heads_to_seq if to_heads else _seq_to_heads)(g.contiguous(), group), None, None


def ulysses_attention(q, k, v, group=None, causal=None, scale=None, impl="auto", mask=None, cache=None):
    """Attention over a sequence sharded contiguously across `group` (shard_sequence(..., layout='contiguous')):
    q [B, H, n, D], k and v [B, Hkv, n, D] -> this rank's output [B, H, n, D]. One all-to-all there (q, k and v
    together) and one back, each mirrored in the backward: each rank attends with H/W of the heads over the whole
    sequence, so any mask that a single process can apply works unchanged (Molmo2 uses Ulysses for this reason).
    Contiguous layout only: zigzag shards would arrive out of order and break the causal mask. GQA: kv heads are split like the query heads when W divides Hkv; otherwise
    each kv head is first repeated for its query heads (H of them; autograd sums the copies' gradients).
    mask: bool [B, 1, L, L] over the WHOLE sequence (True = may attend), e.g. model.attention_mask_4d of the global
    doc ids and vision flags, which every rank has (the sequence is built whole, then sharded): Molmo2's
    per-example, vision-bidirectional mask, here exactly as on one device. Or a function (rows, cols) -> block
    (mask_rows_cols; model.MolmoMask): the dense kernels then take the query rows ULYSSES_Q_CHUNK at a time
    (pass causal=False; the mask is causal).
    impl (kernel_for): with FlexAttention the whole [L, L] attention is one call under one BlockMask (its tile map
    is [L/128, L/128]: no chunking needed), differentiated by FlexAttention's own backward; cache (a dict kept for
    the layers of one forward) keeps that BlockMask."""
    _need_causal(causal, "ulysses_attention")
    w = dist.get_world_size(group)
    h, hkv = q.shape[1], k.shape[1]
    if h % w:
        raise ValueError(f"Ulysses splits heads over ranks: {h} query heads do not split over {w} ranks")
    check_shards(q, k, group, cache, "ulysses_attention")
    if hkv % w:
        k, v = _expand_kv(k, h), _expand_kv(v, h)
    # q, k and v in one all-to-all: stacked on the head axis so that head group j (the part rank j receives) holds
    # rank j's H/W query heads, then its Hkv/W key heads, then its value heads: [B, (H + 2 Hkv) / W * W, n, D]
    b, _, n, d = q.shape
    hs = [t.shape[1] // w for t in (q, k, v)]
    qkv = torch.cat([t.reshape(b, w, hw, n, d) for t, hw in zip((q, k, v), hs)], 2).reshape(b, -1, n, d)
    q, k, v = _AllToAll.apply(qkv, group, True).split(hs, dim=1)   # [B, H/W, L, D], [B, Hkv/W, L, D] x 2
    if kernel_for(q, impl) == "flex":
        L = q.shape[2]
        key = ("ulysses", L, causal, q.shape[0])
        bm = None if cache is None else cache.get(key)
        if bm is None:
            idx = torch.arange(L, device=q.device)
            bm = flex_block(mask, idx, idx, causal, q.shape[0])
            if cache is not None and bm is not None:
                cache[key] = bm
        out = flex_attention_fn(q.is_cuda)(q, k, v, block_mask=bm, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    else:
        out = _LocalAttention.apply(q, k, v, causal, scale, impl, mask)   # [B, H/W, L, D]
    return _AllToAll.apply(out.contiguous(), group, False)


# the one-tensor all-gather and reduce-scatter: their names since torch 2.13, the older ones before
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherRows(torch.autograd.Function):
    """x (n, ...) on each of the W ranks -> (W * n, ...): every rank's rows, in rank order. Its gradient: each rank
    holds a gradient for all W * n rows (its own tokens' part of it); they are summed over the ranks and each rank
    keeps its own n rows (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        ALL_GATHER(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        out = g.new_empty((g.shape[0] // dist.get_world_size(ctx.group), *g.shape[1:]))
        REDUCE_SCATTER(out, g, group=ctx.group)
        return out, None


# ---------------------------------------------------------------------------------------------------------
# the model's side: what a cp group means for one forward (model.Molmo2.hidden uses it)

class ContextParallel:
    """Context parallelism as the model sees it: a cp group and a scheme. mode 'ring': zigzag ring attention
    (it balances the work of a causal mask; under Molmo2's bidirectional vision mask the ring runs non-causal and
    every block that the mask does not empty is computed, so the balance is then only approximate); 'ulysses', the
    default (cp_mode): all-to-all over heads (contiguous shards; needs n_head % W == 0).
    The model builds the WHOLE sequence on every cp rank (text embeddings and vision features: the ranks of a
    cp group hold the same batch), then keeps its shard of every per-token tensor (shard): embeddings,
    positions, labels (already shifted by collate) and loss weights, all by the same permutation, padded
    first to a length the layout splits (pad: doc id 0, loss weight 0: never attended to, never in the loss).
    impl: the local kernel (kernel_for): 'auto' runs FlexAttention on CUDA (no Lq x Lk scores or masks in memory)
    and the CPU flash op on a CPU."""

    def __init__(self, group, mode="ring", impl="auto"):
        if mode not in ("ring", "ulysses"):
            raise ValueError(f"cp mode must be 'ring' or 'ulysses', got {mode!r}")
        if impl not in IMPLS:
            raise ValueError(f"cp impl must be one of {', '.join(IMPLS)}, got {impl!r}")
        self.group, self.mode, self.impl = group, mode, impl
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.layout = "zigzag" if mode == "ring" else "contiguous"
        self.multiple = 2 * self.world if self.layout == "zigzag" else self.world  # what the layout splits

    def pad(self, x, value=0, dim=1):
        """x padded along dim to a length the layout splits (pad_to_multiple)."""
        return pad_to_multiple(x, self.multiple, dim, value)

    def shard(self, x, value=0, dim=1):
        """Pad x along dim, then keep this rank's tokens."""
        return shard_sequence(self.pad(x, value, dim), self.rank, self.world, dim, self.layout)

    def encode(self, fn, x):
        """fn over the rows of x (the micro-batch's images and frames, (N, 3, H, W)), the work split over the cp
        ranks: each applies fn to its n = ceil(N / W) rows (zero rows pad N to a multiple of W): (n, 3, H, W) -> (n, P,
        C); the outputs are all-gathered in rank order, (W n, P, C), and cut back to N, so every rank gets what fn(x)
        would give, for 1/W of the work (the connector then runs on all N on every rank). The gradient of
        each rank's rows is summed over the ranks (_GatherRows), so the vision encoder's gradients, summed over
        dp x cp as every gradient is, come out as one process's (LongVILA's multi-modal sequence parallelism,
        here for the ViT only: the connector and the token embeddings run on the whole gathered output)."""
        n = -(-len(x) // self.world)
        mine = pad_to_multiple(x, self.world, dim=0)[self.rank * n:(self.rank + 1) * n]
        return _GatherRows.apply(fn(mine), self.group)[:len(x)]

    def attention(self, mask, causal):
        """The attention of every layer of one forward, with the mask of the whole (padded) sequence: a dense
        tensor or a function (rows, cols) -> block (mask_rows_cols). causal: True when the mask opens no future
        key (the ring then skips future blocks); False with bidirectional vision tokens."""
        return CPAttention(self, mask, causal)


class CPAttention:
    """Called by model.attend in place of a mask: q, k, v are this rank's shard, [B, H, n, D] / [B, Hkv, n, D]."""

    def __init__(self, cp, mask, causal):
        self.cp, self.mask, self.causal = cp, mask, causal
        self.cache = {}  # FlexAttention's BlockMasks, built by the first layer and reused by the others (and the
                         # backward, and the recomputation under activation checkpointing)

    def __call__(self, q, k, v):
        cp = self.cp
        if cp.mode == "ring":
            return ring_attention(q, k, v, cp.group, self.causal, cp.layout, impl=cp.impl, mask=self.mask,
                                  cache=self.cache)
        # Ulysses attends to whole rows: the mask carries the causality (a chunked causal flag would misalign)
        return ulysses_attention(q, k, v, cp.group, causal=self.causal and self.mask is None, impl=cp.impl,
                                 mask=self.mask, cache=self.cache)

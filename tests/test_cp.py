"""Context parallelism (cp_attention.py): in one process, the local kernels (CPU flash op, FlexAttention, reference)
against autograd and SDPA, FlexAttention's block masks, the LSE merge, the exactness of the ring backward and the
sharding layouts; then ring attention and Ulysses over W = 1..4 gloo processes against full attention, outputs and
gradients."""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.nn.attention.flex_attention as FA
import torch.nn.functional as F

import cp_attention as cp
from conftest import start_ranks

# FlexAttention runs eagerly here on purpose (a CPU): its warning that it is not compiled is expected
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def lift_flex_cpu_check():
    """FlexAttention refuses a backward on a CPU (torch 2.13: its _validate_device raises when an input requires
    grad), though its eager path is plain differentiable PyTorch (the masked softmax computed densely). With the
    check lifted the same FlexAttention code runs here forward and backward, exactly; on CUDA it is compiled.
    Test code only: the library never lifts it ('auto' picks the CPU flash op on a CPU)."""
    FA._validate_device = lambda q, k, v: None


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """lift_flex_cpu_check for one test (undone after it)."""
    monkeypatch.setattr(FA, "_validate_device", lambda q, k, v: None)


def qkv(b=2, h=4, hkv=2, lq=12, lk=12, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g, dtype=dtype), torch.randn(b, hkv, lk, d, generator=g, dtype=dtype),
            torch.randn(b, hkv, lk, d, generator=g, dtype=dtype))


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])
@pytest.mark.parametrize("impl", ["reference", "auto", "flex"])
def test_local_kernels_match_sdpa_logsumexp_and_autograd(causal, hkv, impl, flex_on_cpu):
    # fp64: all three kernels ('auto' is the CPU flash op here) agree with SDPA to rounding
    q, k, v = qkv(hkv=hkv)
    out, lse = cp.local_attn_fwd(q, k, v, causal, impl=impl)
    assert torch.allclose(out, sdpa(q, k, v, causal), atol=1e-12, rtol=0)
    s = (q @ k.repeat_interleave(4 // hkv, 1).transpose(-1, -2)) / 8 ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf"))
    assert lse.shape == (2, 4, 12) and torch.allclose(lse, s.logsumexp(-1), atol=1e-12, rtol=0)
    # backward from (out, lse) against autograd through SDPA; dk, dv at the kv-head count (GQA copies summed)
    dout = torch.randn_like(out)
    grads = cp.local_attn_bwd(dout, q, k, v, out, lse, causal, impl=impl)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    sdpa(qq, kk, vv, causal).backward(dout)
    for got, want in zip(grads, (qq.grad, kk.grad, vv.grad)):
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-11, rtol=0)



def model_mask(L=48, bidir=True, function=False):
    """Molmo2's mask from model.py: two packed examples and padding in row 0, one example in row 1, causal, with
    vision tokens bidirectional within their example when bidir. function=True: the same mask as the object the
    model hands to context parallelism (model.MolmoMask: called with (rows, cols) it builds that dense block, and
    its mask_mod gives FlexAttention the same rule pair by pair)."""
    from model import MolmoMask, attention_mask_4d
    doc = torch.zeros(2, L, dtype=torch.long)
    doc[0, :20], doc[0, 20:41], doc[1] = 1, 2, 1
    vis = torch.zeros(2, L, dtype=torch.bool)
    vis[0, 3:9], vis[0, 24:30], vis[1, 10:22] = True, True, True
    if function:
        return MolmoMask(doc, vis, bidir)
    return attention_mask_4d(doc, vis, bidir=bidir)


@pytest.mark.parametrize("impl", ["reference", "auto", "flex"])
def test_local_kernels_take_the_models_mask(impl, flex_on_cpu):
    # a dense bool mask: the CPU flash op takes it as a bias, FlexAttention reads it element by element
    q, k, v = qkv(lq=48, lk=48)
    m = model_mask()
    out, lse = cp.local_attn_fwd(q, k, v, impl=impl, mask=m)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    assert torch.allclose(out, want, atol=1e-12, rtol=0)
    dout = torch.randn_like(out)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(qq, kk, vv, attn_mask=m, enable_gqa=True).backward(dout)
    for got, w in zip(cp.local_attn_bwd(dout, q, k, v, out, lse, impl=impl, mask=m), (qq.grad, kk.grad, vv.grad)):
        assert torch.allclose(got, w, atol=1e-11, rtol=0)

def test_causal_block_must_be_square():
    q, k, v = qkv(lq=6, lk=12)
    with pytest.raises(ValueError, match="only square"):
        cp.reference_attn_fwd(q, k, v, causal=True)
    with pytest.raises(ValueError, match="only square"):
        cp.local_attn_fwd(q, k, v, causal=True, impl="flex")
    with pytest.raises(ValueError, match="multiple of kv heads"):
        cp.local_attn_fwd(*qkv(h=4, hkv=3))
    q, k, v = qkv()
    out, lse = cp.local_attn_fwd(q, k, v)
    with pytest.raises(ValueError, match="impl must be 'auto', 'flex' or 'reference', got 'flash'"):
        cp.local_attn_bwd(out, q, k, v, out, lse, impl="flash")
    # 'auto': the CPU flash op on a CPU, FlexAttention anywhere else (CUDA)
    assert cp.kernel_for(q, "auto") == "cpu" and cp.kernel_for(q.to("meta"), "auto") == "flex"
    assert cp.kernel_for(q, "flex") == "flex" and cp.kernel_for(q, "reference") == "reference"
    # FlexAttention needs the mask pair by pair: a tensor, or an object with a mask_mod; not a bare function
    with pytest.raises(ValueError, match="needs the mask as a bool tensor or as an object with a mask_mod"):
        cp.flex_block(lambda rows, cols: None, torch.arange(4), torch.arange(4), False, 1)


def test_build_block_mask_equals_create_block_mask_in_slabs():
    # the BlockMask built 128 query rows at a time (3 slabs, the last one short; keys not a multiple of 128 either)
    # is create_block_mask's, tile for tile: partial and full tiles and their orders, by key and by query tile
    from model import molmo2_mask_mod
    B, L = 2, 300
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[0, :100], doc[0, 100:250], doc[1, :290] = 1, 2, 1
    vis = torch.zeros(B, L, dtype=torch.bool)
    vis[0, 10:40], vis[0, 120:200], vis[1, 50:180] = True, True, True
    mod = molmo2_mask_mod(doc, vis, True)
    want = FA.create_block_mask(mod, B, None, L, L, device="cpu")
    got = cp.build_block_mask(mod, B, L, L, "cpu", rows=128)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.seq_lengths == (L, L) and got.mask_mod is mod
    assert int(got.full_kv_num_blocks.sum()) > 0 and int(got.kv_num_blocks.sum()) > 0  # both kinds occur
    assert not cp.block_mask_is_empty(got)
    # a block of another example's tokens only: no tile kept, the ring skips it
    assert cp.block_mask_is_empty(cp.build_block_mask(lambda b, h, q, k: q < 0, B, 40, 30, "cpu"))


@pytest.mark.parametrize("bidir,causal", [(True, False), (False, True)])
def test_flex_blocks_equal_reference_blocks(bidir, causal, flex_on_cpu):
    # The ring's blocks under Molmo2's mask (packed examples, padding; bidirectional vision (causal=False) or the
    # per-example causal mask with the diagonal block's causal triangle folded in), given as model.MolmoMask: rank 1
    # of W = 2 (zigzag) against its own K/V and against rank 0's. FlexAttention under each block's BlockMask
    # (flex_block, at the blocks' global positions) gives the reference's (out, lse) under the block's dense slice,
    # fp32, 1e-5; rows that see no key of a block have lse -inf in both. Then the backward from the FINAL out and
    # lse (flex_attn_bwd: the LSE merge's gradient pushed into each block) equals the reference's per block, and the
    # blocks' gradients add up to autograd's through full attention.
    mask = model_mask(bidir=bidir, function=True)
    q, k, v = (t.float() for t in qkv(lq=48, lk=48))
    pos = [cp.positions_for_shard(48, r, 2, "zigzag") for r in range(2)]
    rows = pos[1]
    blocks = [(pos[1], causal), (pos[0], False)]  # (key positions, causal)
    dense = [mask(rows, cols) & (rows[:, None] >= cols[None, :]) if c else mask(rows, cols) for cols, c in blocks]
    bms = [cp.flex_block(mask, rows, cols, c, 2) for cols, c in blocks]
    out = lse = None
    for (cols, _), bm, mb in zip(blocks, bms, dense):
        o_f, l_f = cp.local_attn_fwd(q[:, :, rows], k[:, :, cols], v[:, :, cols], impl="flex", mask=bm)
        o_r, l_r = cp.local_attn_fwd(q[:, :, rows], k[:, :, cols], v[:, :, cols], impl="reference", mask=mb)
        assert torch.equal(l_f.isinf(), l_r.isinf()) and not l_f.isinf().all()
        assert l_f.isinf().any() == (cols is pos[0])  # row 0's second example sees nothing of rank 0's keys
        assert torch.allclose(o_f, o_r, atol=1e-5, rtol=0) and torch.allclose(l_f, l_r, atol=1e-5, rtol=0)
        out, lse = cp.merge_partials(out, lse, o_f, l_f)
    # full attention of these queries over every key, autograd
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    want, _ = cp.reference_attn_fwd(qq[:, :, rows], kk, vv, mask=mask(rows, torch.arange(48)))
    dout = torch.randn_like(out)
    want.backward(dout)
    assert torch.allclose(out, want.detach(), atol=1e-5, rtol=0)
    dq, dk, dv = torch.zeros_like(out), torch.zeros_like(k), torch.zeros_like(v)
    for (cols, _), bm, mb in zip(blocks, bms, dense):
        args = (dout, q[:, :, rows], k[:, :, cols], v[:, :, cols], out, lse)
        got = cp.local_attn_bwd(*args, impl="flex", mask=bm)
        for g, r in zip(got, cp.local_attn_bwd(*args, impl="reference", mask=mb)):
            assert torch.allclose(g, r, atol=1e-5, rtol=0)
        dq += got[0]
        dk[:, :, cols] += got[1]
        dv[:, :, cols] += got[2]
    for g, w in zip((dq, dk, dv), (qq.grad[:, :, rows], kk.grad, vv.grad)):
        assert torch.allclose(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_merging_kv_blocks_gives_full_attention(dtype, tol):
    # ring attention's forward: attend to each kv block on its own, merge by LSE; a fully masked block (lse -inf)
    # and huge scores (an exp that would overflow) must not spoil it
    q, k, v = qkv(lk=18, dtype=dtype)
    q = q * 30  # scores near 100: a plain exp() of them overflows fp32; the LSE form never exponentiates > 0
    want, want_lse = cp.reference_attn_fwd(q, k, v)
    out = lse = None
    for kb, vb in zip(k.chunk(3, 2), v.chunk(3, 2)):
        out, lse = cp.merge_partials(out, lse, *cp.local_attn_fwd(q, kb, vb))
    empty_out, empty_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    out, lse = cp.merge_partials(out, lse, empty_out, empty_lse)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(out).all() and torch.allclose(out, want, atol=tol * 10, rtol=tol)
    assert torch.allclose(lse, want_lse, atol=0, rtol=tol)
    both_empty, _ = cp.merge_partials(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(both_empty, empty_out)


@pytest.mark.parametrize("impl", ["auto", "flex"])
def test_ring_backward_from_the_final_out_and_lse_is_exact(impl, flex_on_cpu):
    # the key fact of the ring backward: per-block gradients computed with the FINAL (merged) out and lse add up to
    # the full gradients: dq summed over kv blocks, and each kv block's dk, dv are its own slice (the CPU flash op
    # takes P straight from the final lse; FlexAttention back-propagates the LSE merge into each block's own result)
    q, k, v = qkv(lk=18)
    out, lse = cp.reference_attn_fwd(q, k, v)
    dout = torch.randn_like(out)
    dq_full, dk_full, dv_full = cp.reference_attn_bwd(dout, q, k, v, out, lse)
    dq = torch.zeros_like(q)
    for i, (kb, vb) in enumerate(zip(k.chunk(3, 2), v.chunk(3, 2))):
        dqb, dkb, dvb = cp.local_attn_bwd(dout, q, kb, vb, out, lse, impl=impl)
        dq += dqb
        assert torch.allclose(dkb, dk_full[:, :, 6 * i:6 * i + 6], atol=1e-12, rtol=0)
        assert torch.allclose(dvb, dv_full[:, :, 6 * i:6 * i + 6], atol=1e-12, rtol=0)
    assert torch.allclose(dq, dq_full, atol=1e-12, rtol=0)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip_and_positions(world, layout):
    L = 48
    x = torch.arange(2 * L).view(2, L)
    shards = [cp.shard_sequence(x, r, world, dim=1, layout=layout) for r in range(world)]
    assert all(s.shape == (2, L // world) for s in shards)
    assert torch.equal(cp.unshard_sequence(shards, dim=1, layout=layout), x)
    assert sorted(torch.cat([cp.positions_for_shard(L, r, world, layout) for r in range(world)]).tolist()) == \
        list(range(L))
    c = L // (2 * world)
    if layout == "zigzag":  # rank r holds chunks r and 2W-1-r
        for r in range(world):
            want = list(range(r * c, (r + 1) * c)) + list(range((2 * world - 1 - r) * c, (2 * world - r) * c))
            assert cp.positions_for_shard(L, r, world, layout).tolist() == want
    q = torch.randn(1, 2, L, 4)  # q/k/v shard along dim 2
    assert torch.equal(cp.unshard_sequence([cp.shard_sequence(q, r, world, 2, layout) for r in range(world)], 2,
                                           layout), q)


def test_zigzag_balances_causal_work():
    # under a causal mask, query i attends to i + 1 keys: zigzag gives every rank the same total, contiguous does not
    L, W = 48, 4
    work = {lay: [int((cp.positions_for_shard(L, r, W, lay) + 1).sum()) for r in range(W)]
            for lay in ("contiguous", "zigzag")}
    assert len(set(work["zigzag"])) == 1 and sum(work["zigzag"]) == L * (L + 1) // 2
    assert max(work["contiguous"]) > 3 * min(work["contiguous"])


def test_shard_sequence_takes_its_dim():
    with pytest.raises(TypeError):  # no default: dim 1 of a [B, H, L, D] tensor would shard the heads
        cp.shard_sequence(torch.zeros(1, 4, 8, 2), 0, 2)


def test_bad_lengths_and_padding():
    x = torch.arange(10)[None]
    with pytest.raises(ValueError, match="length 10 does not split over 3 ranks in the zigzag layout.*multiple of 6"):
        cp.shard_sequence(x, 0, 3, 1)
    with pytest.raises(ValueError, match="layout must be"):
        cp.shard_sequence(x, 0, 2, 1, layout="stripe")
    padded = cp.pad_to_multiple(x, 6, dim=1, value=-100)  # labels: pad with the ignore index
    assert padded.shape == (1, 12) and padded[0, 10:].tolist() == [-100, -100]
    assert cp.shard_sequence(padded, 2, 3, 1).tolist() == [[4, 5, 6, 7]]
    assert cp.pad_to_multiple(x, 5) is x


# ---------------------------------------------------------------------------------------------------------
# ring attention over real process groups (gloo, spawned processes)

# fp64 with the reference kernel, fp32 and bf16 with the CPU flash op; bf16's bound (None) is twice the error of
# the same attention in bf16 on one device, plus 1e-3, both against fp64
DTYPES = ((torch.float64, "reference", 1e-10), (torch.float32, "auto", 1e-5), (torch.bfloat16, "auto", None))
# masks: none; Molmo2's per-example causal mask (causal blocks skipped); its full mask with bidirectional vision
# (causal=False: every block computed under its slice)
RING_CASES = [(layout, causal, mask, hkv, dtype, impl, tol)
              for layout in ("contiguous", "zigzag")
              for causal, mask in ((True, None), (False, None), (True, "per-example"), (False, "full"))
              for hkv in (4, 2) for dtype, impl, tol in DTYPES]


def _bounds(tol, q, k, v, g, causal, want, mask=None):
    """The error allowed for (out, dq, dk, dv): tol, or for bf16 (tol None) 2x the single-device bf16 error + 1e-3."""
    if tol is not None:
        return [tol] * 4
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out, lse = cp.local_attn_fwd(qb, kb, vb, causal, mask=mask)
    single = [out, *cp.local_attn_bwd(g.bfloat16(), qb, kb, vb, out, lse, causal, mask=mask)]
    return [2 * (s.double() - w.detach()).abs().max().item() + 1e-3 for s, w in zip(single, want)]


def _compare(rank, world, layout, got, want, bounds, what):
    for name, gt, wt, bound in zip(("out", "dq", "dk", "dv"), got, want, bounds):
        err = (gt.double() - cp.shard_sequence(wt.detach(), rank, world, 2, layout)).abs().max().item()
        assert err <= bound, f"{what} {name}: max |diff| {err:.2e} > {bound:.2e}"


def _ring_worker(rank, world, init_file):
    lift_flex_cpu_check()  # in this spawned process: FlexAttention forward and backward on the CPU (_flex_checks)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for i, (layout, causal, mask_kind, hkv, dtype, impl, tol) in enumerate(RING_CASES):
            if world == 4 and hkv == 4:  # W = 4 checks GQA only (MHA at W = 1-3): the suite's time on two cores
                continue
            mask = None if mask_kind is None else model_mask(bidir=mask_kind == "full")
            q, k, v = qkv(b=2, h=4, hkv=hkv, lq=48, lk=48, d=8, seed=i)  # the same full tensors on every rank
            g = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
            full = [t.clone().requires_grad_() for t in (q, k, v)]
            out, _ = cp.reference_attn_fwd(*full, causal=causal, mask=mask)  # fp64 full attention, autograd
            (out * g).sum().backward()
            local = [cp.shard_sequence(t, rank, world, 2, layout).to(dtype).requires_grad_() for t in (q, k, v)]
            o = cp.ring_attention(*local, causal=causal, layout=layout, impl=impl, mask=mask)
            (o * cp.shard_sequence(g, rank, world, 2, layout).to(dtype)).sum().backward()
            want = [out] + [t.grad for t in full]
            _compare(rank, world, layout, [o] + [t.grad for t in local], want,
                     _bounds(tol, q, k, v, g, causal, want, mask),
                     f"ring W={world} rank {rank} {layout} causal={causal} mask={mask_kind} H/Hkv=4/{hkv} {dtype}")
        _ulysses_checks(rank, world)
        _mask_function_checks(rank, world)
        _flex_checks(rank, world)
        _trap_checks(rank, world)
    finally:
        dist.destroy_process_group()


def _trap_checks(rank, world):
    """The readers' traps raise a clear ValueError before any exchange of data: no default for causal, and shards of
    unequal length (rank 0 one token short); every rank raises, none aborts inside gloo, and the group still works."""
    q, k, v = qkv(b=1, h=4, hkv=2, lq=8, lk=8)
    for fn in (cp.ring_attention, cp.ulysses_attention):
        with pytest.raises(ValueError, match="pass causal=True .* or causal=False"):
            fn(q, k, v, mask=model_mask(L=8 * world))
    if world > 1:
        n = 7 if rank == 0 else 8
        short = [t[:, :, :n].contiguous() for t in (q, k, v)]
        lengths = ", ".join(["7"] + ["8"] * (world - 1))
        for fn, kw in ((cp.ring_attention, dict(layout="contiguous")), (cp.ulysses_attention, {}))[:1 + (4 % world == 0)]:
            with pytest.raises(ValueError, match=f"shards of different shapes.*local lengths {lengths}"):
                fn(*short, causal=False, **kw)
    ok = torch.ones(1)
    dist.all_reduce(ok)  # the group is intact after the errors
    assert ok.item() == world


def _ulysses_checks(rank, world):
    # the all-to-all: placement (rank j gets head group j of the whole sequence) and round trip
    x = torch.randn(2, 4, 48, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    if 4 % world:
        with pytest.raises(ValueError, match=f"4 query heads do not split over {world} ranks"):
            cp.ulysses_attention(*qkv(lq=16, lk=16), causal=False)
        return
    local = cp.shard_sequence(x, rank, world, 2, "contiguous")
    heads = cp._seq_to_heads(local, None)
    hw = 4 // world
    assert torch.equal(heads, x[:, rank * hw:(rank + 1) * hw])
    assert torch.equal(cp._heads_to_seq(heads, None), local)
    for i, (causal, hkv, (dtype, impl, tol)) in enumerate(
            (c, h, d) for c in (True, False, "model") for h in (4, 2, 1) for d in DTYPES):
        if world == 4 and hkv == 4:  # as the ring: GQA only at W = 4
            continue
        # causal="model": Molmo2's own mask (packed examples, padding, bidirectional vision), given whole
        # hkv 1 (and 2 with W=4): fewer kv heads than ranks, so they are repeated first
        q, k, v = qkv(b=2, h=4, hkv=hkv, lq=48, lk=48, d=8, seed=50 + i)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(150 + i), dtype=torch.float64)
        mask = model_mask() if causal == "model" else None
        causal = causal is True
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = cp.reference_attn_fwd(*full, causal=causal, mask=mask)
        (out * g).sum().backward()
        loc = [cp.shard_sequence(t, rank, world, 2, "contiguous").to(dtype).requires_grad_() for t in (q, k, v)]
        o = cp.ulysses_attention(*loc, causal=causal, impl=impl, mask=mask)
        (o * cp.shard_sequence(g, rank, world, 2, "contiguous").to(dtype)).sum().backward()
        want = [out] + [t.grad for t in full]
        _compare(rank, world, "contiguous", [o] + [t.grad for t in loc], want,
                 _bounds(tol, q, k, v, g, causal, want, mask),
                 f"Ulysses W={world} rank {rank} causal={causal} mask={mask is not None} H/Hkv=4/{hkv} {dtype}")


def _mask_function_checks(rank, world):
    """The model's mask as a function (rows, cols) -> block, as training passes it, gives what the dense mask gives:
    ring (zigzag, per-example causal and bidirectional vision) and Ulysses with its query rows in chunks of 16."""
    cases = [("ring", True, False), ("ring", False, True)] + ([("ulysses", False, True)] if 4 % world == 0 else [])
    for i, (mode, causal, bidir) in enumerate(cases):
        q, k, v = qkv(b=2, h=4, hkv=2, lq=48, lk=48, d=8, seed=300 + i)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(400 + i), dtype=torch.float64)
        layout = "zigzag" if mode == "ring" else "contiguous"
        res = []
        for mask in (model_mask(bidir=bidir), model_mask(bidir=bidir, function=True)):
            loc = [cp.shard_sequence(t, rank, world, 2, layout).requires_grad_() for t in (q, k, v)]
            if mode == "ring":
                o = cp.ring_attention(*loc, causal=causal, layout=layout, impl="reference", mask=mask)
            else:
                chunk, cp.ULYSSES_Q_CHUNK = cp.ULYSSES_Q_CHUNK, 16
                try:
                    o = cp.ulysses_attention(*loc, causal=False, impl="reference", mask=mask)
                finally:
                    cp.ULYSSES_Q_CHUNK = chunk
            (o * cp.shard_sequence(g, rank, world, 2, layout)).sum().backward()
            res.append([o] + [t.grad for t in loc])
        for name, a, b in zip(("out", "dq", "dk", "dv"), *res):
            assert (a - b).abs().max().item() <= 1e-12, f"{mode} W={world}: mask function != dense mask ({name})"


# FlexAttention over the ranks: (scheme, layout, causal, bidir (None: no mask), kv heads). Each world size runs a
# share of the cases: every spawned process pays FlexAttention's first-call set-up (seconds), and W = 4 runs four
# processes on what may be two cores. W = 1 runs them all; W = 4 the ring case with the most hops and masks.
# (W = 3 is covered by the other kernels: the flex code paths do not depend on W beyond what 1, 2 and 4 exercise.)
FLEX_CASES = {1: [("ring", "zigzag", True, None, 2), ("ring", "zigzag", True, False, 4),
                  ("ring", "contiguous", False, True, 2), ("ulysses", "contiguous", False, True, 2)],
              2: [("ring", "zigzag", True, None, 2), ("ring", "contiguous", False, True, 2),
                  ("ulysses", "contiguous", False, True, 2)],
              4: [("ring", "zigzag", True, False, 2)]}


def _flex_checks(rank, world):
    """impl='flex' (what 'auto' runs on CUDA) in fp32 against fp64 full attention, 1e-5, outputs and gradients: the
    zigzag ring with only the causal flag (a causal BlockMask on the diagonal blocks) and with Molmo2's per-example
    mask (causal blocks skipped), the plain ring with bidirectional vision (every block under its BlockMask), and
    Ulysses with bidirectional vision (one BlockMask over the whole sequence). Molmo2's masks are model.MolmoMask,
    as the model passes them. The BlockMasks go into the cache, and (W <= 2) a second call with it gives the same
    output. W = 3 runs none (FLEX_CASES)."""
    for i, (mode, layout, causal, bidir, hkv) in enumerate(FLEX_CASES.get(world, [])):
        mask = None if bidir is None else model_mask(bidir=bidir, function=True)
        q, k, v = qkv(b=2, h=4, hkv=hkv, lq=48, lk=48, d=8, seed=500 + i)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(600 + i), dtype=torch.float64)
        full = [t.clone().requires_grad_() for t in (q, k, v)]
        out, _ = cp.reference_attn_fwd(*full, causal=causal, mask=None if bidir is None else model_mask(bidir=bidir))
        (out * g).sum().backward()
        loc = [cp.shard_sequence(t, rank, world, 2, layout).float().requires_grad_() for t in (q, k, v)]
        cache = {}

        def attn(*qkv_local):
            if mode == "ring":
                return cp.ring_attention(*qkv_local, causal=causal, layout=layout, impl="flex", mask=mask,
                                         cache=cache)
            return cp.ulysses_attention(*qkv_local, causal=causal, impl="flex", mask=mask, cache=cache)
        o = attn(*loc)
        (o * cp.shard_sequence(g, rank, world, 2, layout).float()).sum().backward()
        want = [out] + [t.grad for t in full]
        _compare(rank, world, layout, [o] + [t.grad for t in loc], want, [1e-5] * 4,
                 f"flex {mode} W={world} rank {rank} {layout} causal={causal} bidir={bidir} H/Hkv=4/{hkv}")
        assert len([key for key in cache if key != "shards checked"]) == 1  # one BlockMask, built once
        if world <= 2:
            with torch.no_grad():
                assert torch.equal(attn(*loc), o.detach()), f"flex {mode} W={world}: cached BlockMasks differ"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_and_ulysses_attention_equal_full_attention(world, tmp_path):
    # ring (plain and zigzag) and Ulysses, causal and not, MHA and GQA, with and without Molmo2's masks (packed
    # examples, padding, bidirectional vision), fp64 (reference kernel, 1e-10), fp32 (CPU flash op, 1e-5) and bf16
    # (2x the one-device bf16 error + 1e-3): each rank's output and dq/dk/dv equal its shard of full attention's;
    # Ulysses' all-to-all places head groups and round-trips exactly (W = 3: 4 heads do not split, a clear error);
    # FlexAttention (impl='flex', fp32, 1e-5) in both schemes, under Molmo2's masks (_flex_checks).
    # A deadlock fails in 240 s (W = 4 takes about 35 s on two idle cores, and 90 s or more when other jobs share them).
    ctx = start_ranks(_ring_worker, (world, str(tmp_path / "init")), world)
    deadline = time.time() + 240
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"ring attention with {world} ranks did not finish in 240 s (deadlock?)")

"""The Molmo2 model (model.py): losses, gradients, masks, padding, KV-cache decoding, init scale, FLOPs."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

import data
import shapes
from model import (Block, Molmo2, ModelConfig, attend, attention_mask_4d, flex_block_mask, molmo2_mask_mod,
                   resolve_attn_impl, rope, TiledMask)

TW = {"caption": 1.0, "qa": 1.0, "count": 1.5, "point": 2.0, "text": 1.0}


def make_model(cfg, seed=0):
    torch.manual_seed(seed)
    return Molmo2(cfg).float()


def train_batch(tok, cfg, specs=(("point", 1), ("text", 2), ("caption", 3)), left_pad=False):
    encs = [data.encode_example(shapes.make_example(t, s, cfg.image_size), tok, cfg, TW) for t, s in specs]
    return data.collate(encs, tok.pad, 10 ** 6, left_pad=left_pad)


def prompt_batch(tok, cfg, specs):
    """Prompts ending at 'assistant\\n', left padded (as eval.py and sample.py build them)."""
    encs = []
    for t, s in specs:
        ex = shapes.make_example(t, s, cfg.image_size)
        e = data.encode_example(dict(ex, turns=[(ex["turns"][0][0], "")]), tok, cfg, {t: 1.0})
        for k in ("input_ids", "labels", "loss_weights"):
            e[k] = e[k][:-1]
        encs.append(e)
    return data.collate(encs, tok.pad, 10 ** 6, left_pad=True)


@pytest.fixture(scope="module")
def model(cfg):
    return make_model(cfg).eval()


@pytest.fixture(scope="module")
def batch(tok, cfg):
    return train_batch(tok, cfg)


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image_size", [32, 24])  # 24: a 3x3 patch grid, pooling windows with pads
def test_forward_backward_all_grads(tok, make_cfg, image_size):
    cfg = make_cfg(image_size=image_size)
    batch = train_batch(tok, cfg)
    m = make_model(cfg)
    loss_sum, wsum = m(batch)
    assert loss_sum.ndim == 0 and torch.isfinite(loss_sum)
    assert float(wsum) == pytest.approx(float(batch["loss_weights"].sum()))
    loss = loss_sum / wsum
    assert abs(loss.item() - math.log(cfg.base_vocab)) < 1.0  # ~uniform prediction at init
    loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    # the vision tokens' extra rows get gradient, the unused extra rows (video tokens) do not
    g = m.llm.embed_extra.weight.grad
    assert g[tok.im_patch - tok.base_vocab].abs().sum() > 0 and g[tok.im_start - tok.base_vocab].abs().sum() > 0
    assert g[tok.frame_start - tok.base_vocab].abs().sum() == 0


def test_text_only_batch_skips_vision(tok, cfg):
    m = make_model(cfg)
    b = train_batch(tok, cfg, (("text", 0), ("text", 1)))
    loss_sum, wsum = m(b)
    (loss_sum / wsum).backward()
    assert all(p.grad is None for p in m.vit.parameters())
    assert all(p.grad is None for n, p in m.connector.named_parameters())
    assert all(p.grad is not None for p in m.llm.blocks.parameters())


def test_loss_matches_hand_computed_weighted_ce(model, batch):
    with torch.no_grad():
        loss_sum, wsum = model(batch)
        logits = model.logits(batch)
    assert logits.shape == (*batch["input_ids"].shape, model.c.base_vocab) and logits.dtype == torch.float32
    w = batch["loss_weights"]
    total = 0.0
    B, T = w.shape
    for b in range(B):
        for t in range(T):
            if w[b, t] > 0:
                lp = torch.log_softmax(logits[b, t].double(), -1)
                total += float(w[b, t]) * -float(lp[batch["labels"][b, t]])
    assert float(wsum) == pytest.approx(float(w.sum()))
    assert float(loss_sum) == pytest.approx(total, rel=1e-5)
    assert set(w[w > 0].tolist()) == {1.0, 2.0}  # the point example's answer weighs 2x


def reference_loss(model, batch):
    """The loss head as plainly as it can be written: the (N_loss, V) logits in fp32, F.cross_entropy, weighted."""
    h = model.hidden(batch)
    w = batch["loss_weights"]
    sel = w > 0
    logits = model.llm.head(h[sel]).float()
    return (F.cross_entropy(logits, batch["labels"][sel], reduction="none") * w[sel]).sum()


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_head_equals_cross_entropy(tok, make_cfg, batch, monkeypatch, tie):
    """model.LinearCrossEntropy (gradient computed in the forward, chunk rows at a time, the fp32 softmax a block of
    rows at a time) against F.cross_entropy on the whole fp32 logits: loss and every gradient (fp32, 1e-5), with the
    whole N at once (loss_chunk 0) and in chunks of 7 rows with 3-row fp32 blocks (both partial at the end); the
    output embedding tied to the input one or not. Under no_grad it gives the same loss and keeps no gradient."""
    import model as model_module
    cfg = make_cfg(tie_embeddings=tie)
    ref = make_model(cfg)
    (ref_loss := reference_loss(ref, batch)).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}
    n_loss = int((batch["loss_weights"] > 0).sum())
    assert n_loss > 3 * 7 and n_loss % 7 and n_loss % 3  # several chunks and blocks, the last ones partial
    for chunk, block_rows in ((0, None), (7, 3)):
        if block_rows:
            monkeypatch.setattr(model_module, "LOSS_FP32_ELEMENTS", block_rows * cfg.base_vocab)
        m = make_model(cfg)
        m.loss_chunk = chunk
        loss, wsum = m(batch)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6) and wsum.item() == batch["loss_weights"].sum()
        loss.backward()
        for n, p in m.named_parameters():
            assert (p.grad - want[n]).abs().max().item() < 1e-5, (chunk, n)
        with torch.no_grad():
            assert m(batch)[0].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    h, weight = torch.randn(5, cfg.d_model), torch.randn(cfg.base_vocab, cfg.d_model)
    loss, dh, dw = model_module.linear_cross_entropy(h, weight, torch.arange(5), torch.ones(5), 0, False, False)
    assert dh is None and dw is None  # what no_grad runs: the loss alone
    assert loss.item() == pytest.approx(F.cross_entropy(h @ weight.t(), torch.arange(5), reduction="sum").item(),
                                        rel=1e-6)


def test_compiled_blocks_equal_eager(tok, cfg, batch):
    """model.compile_blocks (each ViT block, each decoder block's halves around the attention kernel) against the
    eager model: loss and every gradient (fp32, 1e-5), with and without activation checkpointing (the compiled
    halves then run again in the backward), and on a second batch of another shape (one more compile, dynamic).
    Through backend 'aot_eager': the graphs dynamo captures whole (fullgraph: a graph break is an error) and
    AOTAutograd differentiates, on eager kernels; bench.py's checks run the same through inductor."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from model import compile_blocks
    torch._dynamo.reset()
    other = train_batch(tok, cfg, specs=(("count", 4), ("caption", 5)))  # other rows, tokens and images
    for ckpt, b in ((False, batch), (False, other), (True, batch)):
        runs = []
        for compiled in (False, True):
            m = make_model(cfg)
            m.act_ckpt = m.vit.act_ckpt = ckpt
            if compiled:
                compile_blocks(m, backend="aot_eager")
            ls, ws = m(b)
            (ls / ws).backward()
            runs.append((ls.item(), {n: p.grad for n, p in m.named_parameters()}))
        (l0, g0), (l1, g1) = runs
        assert l1 == pytest.approx(l0, abs=1e-5)
        for n, g in g0.items():
            assert (g1[n] - g).abs().max().item() < 1e-5, (ckpt, n)
    assert counters["stats"]["unique_graphs"] >= 3  # the ViT block and both halves were compiled, not skipped


def unfused_block_forward(blk, x, cos, sin, mask, cache=None):
    """A decoder block with q, k, v, up and gate as five separate matmuls (Qwen3's layout), on the row blocks of
    the fused weights: the reference that the one-matmul projections are checked against."""
    a, (B, T, _) = blk.attn, x.shape
    wq, wk, wv = a.qkv_proj.weight.split([a.h * a.hd, a.kv * a.hd, a.kv * a.hd])
    h = blk.input_layernorm(x)
    q = a.q_norm(F.linear(h, wq).view(B, T, a.h, a.hd)).transpose(1, 2)
    k = a.k_norm(F.linear(h, wk).view(B, T, a.kv, a.hd)).transpose(1, 2)
    v = F.linear(h, wv).view(B, T, a.kv, a.hd).transpose(1, 2)
    y = attend(rope(q, cos, sin), rope(k, cos, sin), v, mask)
    x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, -1))
    wu, wg = blk.up_gate_proj.weight.chunk(2)
    h = blk.post_attention_layernorm(x)
    return x + blk.down_proj(F.silu(F.linear(h, wg)) * F.linear(h, wu))


def test_fused_projections_equal_separate_matmuls(tok, cfg, batch, monkeypatch):
    """The fused q/k/v and up/gate projections give the loss and every gradient of separate matmuls (fp32)."""
    def loss_and_grads(m):
        loss_sum, wsum = m(batch)
        (loss_sum / wsum).backward()
        return loss_sum / wsum, {n: p.grad for n, p in m.named_parameters()}
    got, grads = loss_and_grads(make_model(cfg))
    monkeypatch.setattr(Block, "forward", unfused_block_forward)
    want, ref = loss_and_grads(make_model(cfg))
    assert abs(got.item() - want.item()) < 1e-5
    for n, g in ref.items():
        assert (grads[n] - g).abs().max() < 1e-5, n
    assert ref["llm.blocks.0.up_gate_proj.weight"].abs().max() > 1e-3  # gradients large enough to tell apart


def test_attention_mask_4d_explicit():
    am = torch.tensor([[True, True, True, True, True], [False, True, True, True, True]])
    vis = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    m = attention_mask_4d(am, vis, bidir=True)
    assert m.shape == (2, 1, 5, 5) and m.dtype == torch.bool
    want0 = torch.tensor([[1, 0, 0, 0, 0],
                          [1, 1, 1, 1, 0],   # vision tokens see each other both ways
                          [1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 0],
                          [1, 1, 1, 1, 1]], dtype=torch.bool)
    want1 = torch.tensor([[1, 0, 0, 0, 0],   # pad query: only the diagonal (never an empty row)
                          [0, 1, 0, 0, 0],   # pad key hidden from everyone else
                          [0, 1, 1, 1, 0],
                          [0, 1, 1, 1, 0],
                          [0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m[0, 0], want0) and torch.equal(m[1, 0], want1)
    causal = attention_mask_4d(am, vis, bidir=False)
    assert torch.equal(causal[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())


def test_attend_matches_reference():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k, v = torch.randn(2, 2, 6, 8, generator=g), torch.randn(2, 2, 6, 8, generator=g)
    mask = torch.rand(2, 1, 6, 6, generator=g) > 0.4
    mask |= torch.eye(6, dtype=torch.bool)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # query heads 0,1 share kv head 0
    for msk in (mask, None):
        s = q @ kk.transpose(-1, -2) / math.sqrt(8)
        allowed = torch.ones(6, 6, dtype=torch.bool).tril() if msk is None else msk
        ref = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
        assert torch.allclose(attend(q, k, v, msk), ref, atol=1e-5)


def test_bf16_attention_on_a_cpu_is_the_fp32_attention_of_the_bf16_inputs():
    """Under bf16 autocast on a CPU, attend computes in fp32 (the CPU kernels are faster so) and returns bf16: its
    output is the fp32 reference's of the same bf16 inputs, rounded once, for the dense mask and the tiled one; the
    gradients reach q, k and v in bf16."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 40, 16, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(2, 2, 40, 16, generator=g).bfloat16().requires_grad_() for _ in range(2))
    doc = torch.tensor([[1] * 25 + [2] * 15, [1] * 40])
    vis = torch.zeros(2, 40, dtype=torch.bool)
    vis[:, 3:9] = True
    dense = attention_mask_4d(doc, vis, True)
    ref = attend(q.detach().float(), k.detach().float(), v.detach().float(), dense).bfloat16()
    for msk in (dense, TiledMask(dense, doc, vis, True, 16)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = attend(q, k, v, msk)
        assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
        y.float().sum().backward()
        assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all()
                   for t in (q, k, v))
        q.grad = k.grad = v.grad = None


def _patched_hidden(m, batch, pos=None, delta=None):
    """m.hidden(batch) with `delta` added to the input embedding at (row 0, column pos)."""
    orig = m.embed_inputs

    def embed(*a, **k):
        x = orig(*a, **k)
        if pos is not None:
            x = x.clone()
            x[0, pos] += delta
        return x
    m.embed_inputs = embed
    try:
        with torch.no_grad():
            return m.hidden(batch)
    finally:
        del m.embed_inputs


@pytest.mark.parametrize("bidir", [True, False])
def test_vision_bidirectional_text_causal(tok, make_cfg, bidir):
    c = make_cfg(bidir_vision=bidir)
    m = make_model(c).eval()
    b = train_batch(tok, c, (("point", 4),))
    ids = b["input_ids"][0]
    patches = (ids == tok.im_patch).nonzero()[:, 0].tolist()
    first, last = patches[0], patches[-1]
    base = _patched_hidden(m, b)
    delta = torch.randn(c.d_model, generator=torch.Generator().manual_seed(0))
    # a later <im_patch> slot's embedding (its pooled features) changes
    h = _patched_hidden(m, b, last, delta)
    diff = (h - base).abs().amax(-1)[0]  # (T,)
    assert diff[last] > 1e-3
    assert diff[last + 1:].min() > 1e-6   # everything after sees it
    assert diff[0] < 1e-6                  # BOS is text: causal, never sees the image
    if bidir:
        assert diff[first] > 1e-4          # an EARLIER vision token sees the later one
        assert diff[first:last].min() > 1e-6
    else:
        assert diff[:last].max() < 1e-6    # purely causal: nothing earlier changes
    # a later TEXT token changes: no earlier position changes, at all
    text_pos = len(ids) - 3
    assert ids[text_pos] < tok.base_vocab
    b2 = {k: v.clone() for k, v in b.items()}
    b2["input_ids"][0, text_pos] = (int(ids[text_pos]) + 1) % 256  # another text token
    with torch.no_grad():
        h2 = m.hidden(b2)
    d2 = (h2 - base).abs().amax(-1)[0]
    assert d2[:text_pos].max() < 1e-6
    assert d2[text_pos:].min() > 1e-4


def test_pixels_matter_and_examples_independent(tok, cfg, model):
    b = train_batch(tok, cfg, (("point", 1), ("caption", 2)))
    b2 = {k: v.clone() for k, v in b.items()}
    b2["pixel_values"][1] = -b2["pixel_values"][1]  # a different image for example 1 only
    with torch.no_grad():
        l1, l2 = model.logits(b), model.logits(b2)
    assert torch.equal(l1[0], l2[0]) or torch.allclose(l1[0], l2[0], atol=1e-6, rtol=0)
    ids = b["input_ids"][1]
    first_vis = int((ids >= tok.base_vocab).nonzero()[0])  # <im_start>: sees the image (bidirectional)
    assert first_vis == 1 and ids[1] == tok.im_start
    assert torch.allclose(l1[1, :first_vis], l2[1, :first_vis], atol=1e-6, rtol=0)  # BOS is causal text
    n = int(b["attention_mask"][1].sum())  # pad queries see only themselves: they never change
    assert (l1[1, first_vis:n] - l2[1, first_vis:n]).abs().amax(-1).min() > 1e-4


def test_left_padding_equals_right_padding(tok, cfg, model):
    specs = (("point", 5), ("text", 6), ("qa", 7))
    r, l = train_batch(tok, cfg, specs), train_batch(tok, cfg, specs, left_pad=True)
    assert not torch.equal(r["input_ids"], l["input_ids"])
    with torch.no_grad():
        lr, ll = model.logits(r), model.logits(l)
    for i in range(3):
        assert torch.allclose(lr[i][r["attention_mask"][i]], ll[i][l["attention_mask"][i]], atol=2e-5)
        with torch.no_grad():
            one = model.logits(train_batch(tok, cfg, specs[i:i + 1]))
        assert torch.allclose(one[0], lr[i][r["attention_mask"][i]], atol=2e-5)  # batching changes nothing


def test_slot_feature_mismatch_raises(tok, cfg, model, batch):
    b = dict(batch, pool_idx=batch["pool_idx"][:-1])
    with pytest.raises(ValueError, match="im_patch"):
        model.logits(b)


def test_kv_cache_generation_equals_full_forward(tok, cfg):
    m = make_model(cfg, seed=1).eval()
    with torch.no_grad():  # larger weights than at init: confident, context-dependent, varied predictions
        for p in m.llm.parameters():
            if p.ndim == 2:
                p.mul_(6.0)
    specs = (("point", 11), ("text", 14), ("qa", 13))
    b = prompt_batch(tok, cfg, specs)
    assert len(set(b["attention_mask"].sum(1).tolist())) == 3  # three prompt lengths: padding is exercised
    N = 10
    out = m.generate(b, N, stop_id=-1)
    assert [len(o) for o in out] == [N] * 3
    # the reference grows input_ids and attention_mask; positions and doc ids then follow from the mask
    ref, bb = [[] for _ in range(3)], {k: v for k, v in b.items() if k not in ("doc_ids", "position_ids")}
    with torch.no_grad():
        for _ in range(N):
            nxt = m.logits(bb)[:, -1].argmax(-1)
            for i in range(3):
                ref[i].append(int(nxt[i]))
            bb["input_ids"] = torch.cat([bb["input_ids"], nxt[:, None]], 1)
            bb["attention_mask"] = torch.cat([bb["attention_mask"], torch.ones(3, 1, dtype=torch.bool)], 1)
    assert out == ref
    assert len({t for o in out for t in o}) > 3 and out[0] != out[1]  # not a degenerate constant stream
    # stopping: the stop token is excluded, each row stops on its own
    stop = ref[0][3]
    out2 = m.generate(b, N, stop_id=stop)
    for i in range(3):
        want = ref[i][:ref[i].index(stop)] if stop in ref[i] else ref[i]
        assert out2[i] == want


def test_sampling_temperature(tok, cfg, model):
    b = prompt_batch(tok, cfg, (("qa", 1), ("text", 2)))
    g = lambda s: torch.Generator().manual_seed(s)
    a1 = model.generate(b, 6, stop_id=-1, temperature=1.0, generator=g(0))
    a2 = model.generate(b, 6, stop_id=-1, temperature=1.0, generator=g(0))
    a3 = model.generate(b, 6, stop_id=-1, temperature=1.0, generator=g(1))
    assert a1 == a2 and a1 != a3  # near-uniform logits at init: different seeds differ


@pytest.mark.parametrize("default_dims", [False, True])
def test_image_feature_scale_at_init(tok, make_cfg, default_dims):
    c = ModelConfig(base_vocab=tok.base_vocab, n_extra=tok.n_extra, im_patch_id=tok.im_patch) if default_dims \
        else make_cfg()
    m = make_model(c)
    b = train_batch(tok, c, (("caption", 1), ("point", 2)))
    with torch.no_grad():
        px = data.normalize_pixels(b["pixel_values"][b["image_mask"]])
        feats = m.connector(m.vit(px).flatten(0, 1), b["pool_idx"])
        emb = m.llm.embed_tokens(torch.tensor([tok.im_patch]))[0]
    assert feats.shape == (int((b["input_ids"] == tok.im_patch).sum()), c.d_model)
    # The lower bound is the point (features ~1e-3 of the embedding leave the LLM blind for thousands of steps); with the
    # ViT's LeCun init the features start 7-16x the embedding (init seeds 0-5; RMSNorm rescales the sum), so the
    # upper bound only catches a runaway scale
    ratio = float(feats.norm(dim=-1).mean() / emb.norm())
    assert 0.3 <= ratio <= 30, ratio
    ratio2 = float(feats.norm(dim=-1).mean() / m.llm.embed.weight.detach().norm(dim=-1).mean())
    assert 0.3 <= ratio2 <= 30, ratio2
    assert float(feats.std(0).mean()) > 0.05 * float(feats.norm(dim=-1).mean() / math.sqrt(c.d_model))  # varies


def test_vit_layers_and_patchify(make_cfg):
    c = make_cfg(vit_depth=4, vit_layers=(-1, -3))
    m = make_model(c)
    assert len(m.vit.blocks) == 4
    assert len(make_model(make_cfg(vit_depth=4, vit_layers=(-2, -3))).vit.blocks) == 3  # unused top block skipped
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    p = m.vit.patchify(x)
    assert p.shape == (2, 16, 3 * 64)
    # patch (row 1, col 2) flattened as (py, px, rgb)
    assert torch.equal(p[1, 1 * 4 + 2].view(8, 8, 3), x[1, :, 8:16, 16:24].permute(1, 2, 0))
    with torch.no_grad():
        f = m.vit(x)
        h = m.vit.patch_embed(p) + m.vit.pos_embed
        outs = []
        for blk in m.vit.blocks:
            h = blk(h)
            outs.append(h)
    assert f.shape == (2, 16, 2 * c.vit_width)
    assert torch.allclose(f, torch.cat([outs[3], outs[1]], -1))  # block -1 then block -3, as listed


def test_connector_ignores_padded_slots(cfg, model):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(9, 2 * cfg.vit_width, generator=g)
    idx, _, _ = data.pooling_index(3, 3, 2, 2)
    with torch.no_grad():
        out = model.connector(feats, torch.tensor(idx))
        only = model.connector(feats, torch.tensor([[2, 5]]))       # window [2, -1, 5, -1] without its pads
        single = model.connector(feats, torch.tensor([[8]]))
        feats2 = feats.clone()
        feats2[0] += 10  # patch 0 is what padded slots index (clamped) -- it must not leak into other windows
        out2 = model.connector(feats2, torch.tensor(idx))
    assert torch.allclose(out[1], only[0], atol=1e-5) and torch.allclose(out[3], single[0], atol=1e-5)
    assert torch.allclose(out[1:], out2[1:], atol=1e-6) and not torch.allclose(out[0], out2[0])


def test_param_counts_and_tied_embeddings(make_cfg, model):
    counts = model.param_counts()
    assert set(counts) == {"connector", "vit", "llm"}
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["vit"] == sum(p.numel() for p in model.vit.parameters())
    assert counts["connector"] == sum(p.numel() for p in model.connector.parameters()) + \
        model.llm.embed_extra.weight.numel()
    c = model.c
    tied = Molmo2(make_cfg(tie_embeddings=True))
    assert sum(tied.param_counts().values()) == sum(counts.values()) - c.base_vocab * c.d_model
    h = torch.randn(3, c.d_model)
    assert torch.allclose(tied.llm.head(h), h @ tied.llm.embed.weight.T, atol=1e-6)


def test_flops_scale_with_batch(tok, cfg, model):
    one = train_batch(tok, cfg, (("point", 1),))
    two = train_batch(tok, cfg, (("point", 1), ("point", 1)))
    f1, f2 = model.flops(one), model.flops(two)
    assert f1 > 0 and f2 == 2 * f1
    # at least 6 * (LLM matmul params) per token, the textbook estimate
    llm_mm = sum(p.numel() for n, p in model.llm.blocks.named_parameters() if p.ndim == 2)
    assert f1 >= 6 * llm_mm * one["input_ids"].numel()
    text = train_batch(tok, cfg, (("text", 1),))
    assert model.flops(text) < f1


def test_bf16_autocast_close_to_fp32(model, batch):
    with torch.no_grad():
        ls, ws = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ls16, ws16 = model(batch)
    assert torch.isfinite(ls16) and float(ws16) == float(ws)
    assert float(ls16 / ws16) == pytest.approx(float(ls / ws), rel=0.03)


def test_rope_rotates_pairs_and_is_relative(tok, cfg, model):
    from model import rope
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 3, 8, generator=g)
    ang = torch.randn(1, 1, 3, 4, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * ang)  # pair (i, i + hd/2) rotated by angle i
    assert torch.allclose(rope(x, cos, sin), torch.cat([z.real, z.imag], -1), atol=1e-6)
    b = train_batch(tok, cfg, (("qa", 3), ("text", 4)))
    pos = (b["attention_mask"].long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        h = model.hidden(b)
        shifted = model.hidden(b, positions=pos + 17)   # RoPE: only relative positions matter
        flat = model.hidden(b, positions=torch.zeros_like(pos))
    am = b["attention_mask"]
    assert torch.allclose(h[am], shifted[am], atol=1e-4)
    assert (h[am] - flat[am]).abs().amax() > 1e-2      # ... and they do matter


def test_generate_under_bf16_autocast(tok, cfg, model):
    b = prompt_batch(tok, cfg, (("qa", 1), ("text", 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(b, 5, stop_id=-1)  # the path evaluate_shapes takes when training in bf16
    assert [len(o) for o in out] == [5, 5]  # runs (cache dtypes agree with the autocast compute)
    assert all(0 <= t < cfg.base_vocab for o in out for t in o)


# ---------------------------------------------------------------------------------------------------------
# packing: several examples in one row behave exactly as if each ran alone

PACK_SPECS = (("point", 21), ("text", 22), ("caption", 23), ("count", 24))


def _per_token_ce(logits, batch):
    lab = batch["labels"].clamp(0, logits.shape[-1] - 1)  # unweighted targets (pads, vision ids) give 0 below
    ce = F.cross_entropy(logits.flatten(0, 1), lab.flatten(), reduction="none").view(lab.shape)
    return ce * batch["loss_weights"]


@pytest.mark.parametrize("bidir", [True, False])
def test_packed_row_equals_each_example_alone(tok, make_cfg, bidir):
    cfg = make_cfg(bidir_vision=bidir)
    m = make_model(cfg, seed=3).eval()
    encs = [data.encode_example(shapes.make_example(t, s, cfg.image_size), tok, cfg, TW) for t, s in PACK_SPECS]
    packed = data.collate([encs[:3], encs[3:]], tok.pad, 10 ** 6)  # row 0: point+text+caption, row 1: count
    assert packed["image_mask"].sum() == 3  # three examples with images: the bidirectional blocks are exercised
    with torch.no_grad():
        lp = m.logits(packed)
        wce_p = _per_token_ce(lp, packed)
        loss_p, w_p = m(packed)
        loss_alone = 0.0
        for i, e in enumerate(encs):
            alone = data.collate([e], tok.pad, 10 ** 6)
            la = m.logits(alone)[0]
            row, doc = (0, i + 1) if i < 3 else (1, 1)
            sel = packed["doc_ids"][row] == doc
            assert sel.sum() == la.shape[0]
            assert torch.allclose(lp[row, sel], la, atol=1e-5, rtol=0), (e["task"], (lp[row, sel] - la).abs().max())
            ex_loss = wce_p[row, sel].sum()
            la_sum, la_w = m(alone)
            assert ex_loss.item() == pytest.approx(la_sum.item(), abs=1e-5 * max(1.0, la_sum.item()))
            loss_alone += la_sum.item()
    assert loss_p.item() == pytest.approx(loss_alone, rel=1e-6)
    assert float(w_p) == pytest.approx(sum(sum(e["loss_weights"]) for e in encs))


def test_packing_without_doc_mask_would_leak(tok, cfg):
    """The property the packed test guards (nanoVLM #201): with only a padding mask, the second example
    reads the first. Here the first example changes and the second one's logits must not."""
    m = make_model(cfg, seed=3).eval()
    a, a2, b = (data.encode_example(shapes.make_example(t, s, cfg.image_size), tok, cfg, TW)
                for t, s in (("qa", 1), ("qa", 2), ("text", 5)))
    p1, p2 = data.collate([[a, b]], tok.pad, 10 ** 6), data.collate([[a2, b]], tok.pad, 10 ** 6)
    sel1, sel2 = p1["doc_ids"][0] == 2, p2["doc_ids"][0] == 2
    with torch.no_grad():
        assert torch.allclose(m.logits(p1)[0, sel1], m.logits(p2)[0, sel2], atol=1e-5, rtol=0)
        leaky = {k: v for k, v in p1.items() if k not in ("doc_ids", "position_ids")}  # one long document
        l_leaky = m.logits(leaky)[0, sel1]
    assert (l_leaky - m.logits(p1)[0, sel1]).abs().max() > 1e-3


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """FlexAttention refuses a backward on a CPU (torch 2.13: its _validate_device raises when an input requires
    grad), though its eager path is plain differentiable PyTorch (the masked softmax computed densely). Lifted for
    one test, the same FlexAttention code runs here forward and backward, exactly; on CUDA it is compiled. Test code
    only: the library never lifts it ('auto' picks sdpa on a CPU)."""
    import torch.nn.attention.flex_attention as FA
    monkeypatch.setattr(FA, "_validate_device", lambda q, k, v: None)


def test_resolve_attn_impl():
    assert [resolve_attn_impl("auto", d) for d in ("cuda", "cpu", "mps")] == ["flex", "sdpa", "sdpa"]
    assert resolve_attn_impl("flex", "cpu") == "flex" and resolve_attn_impl("sdpa", "cuda") == "sdpa"
    with pytest.raises(ValueError, match="attn_impl must be one of auto, sdpa, flex, got 'flash'"):
        resolve_attn_impl("flash", "cpu")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose (CPU)
def test_flex_attention_mask_equals_dense(tok, make_cfg, flex_on_cpu):
    """The FlexAttention path (attn_impl 'flex': BlockMask, the CUDA fast path, run eagerly here) equals the dense
    SDPA path (the reference) on Molmo2's mask, fp32: packed rows of images AND video frames, bidirectional vision,
    padding, 169 tokens (a full and a partial 128-tile). Logits, loss, and every parameter's gradient, within 1e-5.
    And the mask itself: FlexAttention's per-pair mask_mod, evaluated at every pair, is the dense mask, both ways."""
    cfg = make_cfg()
    tw = dict(TW, video_qa=1.0, track=1.0)
    specs = (("point", 21), ("video_qa", 22), ("caption", 23), ("count", 24), ("track", 25))
    encs = [data.encode_example(shapes.make_example(t, s, cfg.image_size, video_frames=(2, 3)), tok, cfg, tw)
            for t, s in specs]
    b = data.collate([encs[:3], encs[3:]], tok.pad, 10 ** 6)  # row 0: point, video, caption; row 1: count, track
    ids = b["input_ids"]
    assert (ids == tok.frame_start).sum(1).tolist() == [2, 2] and b["image_mask"].sum() == 7  # 3 images, 4 frames
    is_vision = ids >= cfg.base_vocab
    for bidir in (True, False):
        mod = molmo2_mask_mod(b["doc_ids"], is_vision, bidir)
        assert torch.equal(create_mask(mod, *ids.shape[:1], 1, ids.shape[1], ids.shape[1], "cpu"),
                           attention_mask_4d(b["doc_ids"], is_vision, bidir))
    m = make_model(cfg, seed=4)
    res = {}
    # the reference; FlexAttention; and the CPU fast path for packed rows (TiledMask: 32 query rows per call)
    for impl, tile in (("sdpa", 0), ("flex", 0), ("sdpa", 32)):
        m.attn_impl, m.attn_tile = impl, tile
        m.zero_grad()
        logits = m.logits(b)
        loss, _ = m(b)
        loss.backward()
        res[impl, tile] = logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()
                                                           if p.grad is not None}
    tiled = TiledMask(attention_mask_4d(b["doc_ids"], is_vision, True), b["doc_ids"], is_vision, True, 32)
    assert any(k1 - k0 < ids.shape[1] for _, _, k0, k1 in tiled.tiles)  # keys really are cut somewhere
    real = b["attention_mask"]
    (ld, sd, gd) = res["sdpa", 0]
    for lf, sf, gf in (res["flex", 0], res["sdpa", 32]):
        assert torch.allclose(lf[real], ld[real], atol=1e-5, rtol=0)
        assert abs(sf.item() - sd.item()) <= 1e-5 * max(1.0, abs(sd.item()))
        assert gd.keys() == gf.keys() and len(gd) == len(list(m.parameters()))  # every parameter has a gradient
        for n in gd:
            assert torch.allclose(gf[n], gd[n], atol=1e-5, rtol=0), (n, (gf[n] - gd[n]).abs().max())


def test_flex_block_mask_rounds_lengths_to_tiles():
    """A BlockMask covers whole 128-tiles: batches of 40 and 100 tokens share one length (one compiled kernel),
    129 tokens take two tiles. The padded positions (doc id 0) see only themselves."""
    lens = {}
    for T in (40, 100, 129):
        doc = torch.ones(2, T, dtype=torch.long)
        lens[T] = flex_block_mask(doc, torch.zeros(2, T, dtype=torch.bool), True).seq_lengths
    assert lens == {40: (128, 128), 100: (128, 128), 129: (256, 256)}


def test_flex_recompile_limit_is_an_error(monkeypatch):
    """The compiled FlexAttention (cp_attention.compile_flex) sets dynamo's recompile limit to FLEX_RECOMPILE_LIMIT
    and fails past it rather than running eagerly (the whole T x T scores): here with a limit of 1, on dynamo's
    eager backend (a CPU has no FlexAttention backward to compile)."""
    import torch._dynamo.config as dc
    import cp_attention as cpa
    for k in ("recompile_limit", "accumulated_recompile_limit", "fail_on_recompile_limit_hit"):
        monkeypatch.setattr(dc, k, getattr(dc, k))  # restored after the test
    monkeypatch.setattr(cpa, "FLEX_RECOMPILE_LIMIT", 1)
    f = cpa.compile_flex(backend="eager")
    assert dc.recompile_limit == 1 and dc.fail_on_recompile_limit_hit
    q = torch.randn(1, 2, 16, 8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        assert (f(q, q, q) - flex_attention(q, q, q)).abs().max() < 1e-6
        q = torch.randn(1, 2, 32, 8)  # another length: a second signature
        try:
            with pytest.raises(cpa.FlexRecompileLimit, match="compiled for 1 call signatures"):
                f(q, q, q)
        finally:
            torch._dynamo.reset()


def test_eager_flex_warning_is_not_filtered():
    """Eager FlexAttention's warning (it materialises the scores) is what a fallback would show: nothing in the
    code silences it."""
    import cp_attention  # noqa: F401 (imported: any filter it installed would be in place)
    assert not [f for f in warnings.filters if f[1] is not None and f[1].search("flex_attention called without")]

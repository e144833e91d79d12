"""Molmo2.flops, the numerator of MFU: the FLOPs a training step needs, counted from the batch in O(T). Checked
against a brute-force count over the dense mask (model.may_attend) on packed batches of images and video, against
hand-worked pair counts, and against the matmul FLOPs torch's FlopCounterMode measures in a real forward + backward."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import shapes
from model import Molmo2, attention_pairs, may_attend

TW = {"track": 2.0, "video_qa": 1.0, "point": 2.0, "caption": 1.0, "text": 0.5, "count": 1.5, "qa": 1.0}


def encode(tok, cfg, task, seed):
    return data.encode_example(shapes.make_example(task, seed, cfg.image_size), tok, cfg, TW)


def dense_pairs(batch, cfg):
    """Allowed (query, key) pairs between real tokens, from the whole (B, T, T) mask of may_attend."""
    doc, vis = batch["doc_ids"], batch["input_ids"] >= cfg.base_vocab
    t = torch.arange(doc.shape[1])
    mask = may_attend(doc[:, :, None], doc[:, None, :], vis[:, :, None], vis[:, None, :], t[:, None], t[None, :],
                      cfg.bidir_vision)
    real = doc > 0
    return int((mask & real[:, :, None] & real[:, None, :]).sum())


def mm(*linears):  # forward FLOPs of one row through these linear layers (2 per weight)
    return 2 * sum(m.weight.numel() for m in linears)


def brute_flops(model, batch):
    """Token by token, pair by pair over the dense mask, window slot by slot, from the modules' weights:
    forward + backward, where backward is 2x forward except the patch embedding (no pixel gradient: 1x) and,
    with the ViT frozen, the ViT (no backward) and the connector's wq, wk, wv (weight gradients only: 1x)."""
    c, m = model.c, model
    blocks = m.llm.blocks
    per_token = sum(mm(b.attn.qkv_proj, b.attn.o_proj, b.up_gate_proj, b.down_proj) for b in blocks)
    per_pair = sum(2 * 2 * b.attn.o_proj.weight.shape[1] for b in blocks)  # QK^T and AV over every query head
    head = m.llm.lm_head if m.llm.lm_head is not None else m.llm.embed
    n_real = int((batch["doc_ids"] > 0).sum())
    n_loss = int((batch["loss_weights"] > 0).sum())
    fl = 3 * (n_real * per_token + dense_pairs(batch, c) * per_pair + n_loss * mm(head))
    n_img = int(batch["image_mask"].sum())
    if not n_img:
        return fl
    P = m.vit.pos_embed.shape[0]
    W = m.vit.patch_embed.weight.shape[0]
    vit_fwd = sum(n_img * (P * mm(b.wq, b.wk, b.wv, b.wo, b.fc1, b.fc2) + 2 * 2 * P * P * W) for b in m.vit.blocks)
    patch_fwd = n_img * P * mm(m.vit.patch_embed)
    cn = m.connector
    pool = batch["pool_idx"]
    first, rest = 0, 0
    for window in pool:  # one pooled token: its query from the mean, keys and values from its valid patches
        valid = int((window >= 0).sum())
        first += mm(cn.wq) + valid * mm(cn.wk, cn.wv)
        rest += 2 * 2 * valid * W + mm(cn.wo, cn.w1, cn.w3, cn.w2)
    if any(p.requires_grad for p in m.vit.parameters()):
        return fl + 3 * vit_fwd + 2 * patch_fwd + 3 * first + 3 * rest
    return fl + vit_fwd + patch_fwd + 2 * first + 3 * rest


def test_attention_pairs_hand_worked():
    # row 0: example 1 = text, vision, vision, text; example 2 = vision, text; two pads. Row 1: one text example.
    doc = torch.tensor([[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
    vis = torch.tensor([[0, 1, 1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    # causal: 4*5/2 + 2*3/2 + 3*4/2 = 10 + 3 + 6; bidirectional vision adds example 1's (1 -> 2) pair
    assert attention_pairs(doc, vis, bidir=False) == 19
    assert attention_pairs(doc, vis, bidir=True) == 20


@pytest.mark.parametrize("bidir", [True, False])
@pytest.mark.parametrize("image_size", [32, 24])  # 24: 3x3 patch grid, so the 2x2 image windows hold -1 slots
def test_flops_equal_brute_force_on_packed_batches(tok, make_cfg, bidir, image_size):
    """Packed rows of images, videos and text, ragged (padding), image and frame windows of different widths in one
    pool_idx; the ViT trained and frozen. Packing changes nothing: the sum over the examples alone is the same."""
    cfg = make_cfg(image_size=image_size, bidir_vision=bidir)
    torch.manual_seed(0)
    model = Molmo2(cfg)
    e = [encode(tok, cfg, t, s) for t, s in [("track", 1), ("point", 2), ("text", 3), ("video_qa", 4),
                                               ("caption", 5), ("count", 6)]]
    batch = data.collate([[e[0], e[1], e[2]], [e[3]], [e[4], e[5]]], tok.pad, 10 ** 6)
    assert int(batch["image_mask"].sum()) > 3 and (batch["pool_idx"] < 0).any() and (batch["doc_ids"] == 0).any()
    for frozen in (False, True):
        for p in model.vit.parameters():
            p.requires_grad_(not frozen)
        got = model.flops(batch)
        assert got == brute_flops(model, batch)
        assert got == sum(model.flops(data.collate([x], tok.pad, 10 ** 6)) for x in e)


def measured_matmul_flops(model, batch):
    """What FlopCounterMode counts in one forward + backward: the matmuls (mm, addmm). Attention runs as one fused
    SDPA kernel on the CPU, which it does not count; the test checks that and adds attention from the dense masks."""
    with FlopCounterMode(display=False) as counter:
        loss, wsum = model(batch)
        (loss / wsum).backward()
    ops = {str(k) for k, v in counter.get_flop_counts()["Global"].items() if v}
    assert ops <= {"aten.mm", "aten.addmm"}, ops
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


@pytest.mark.parametrize("task,image_size,frozen", [("point", 32, False), ("point", 32, True), ("track", 24, False)])
def test_flops_equal_what_a_step_computes(tok, make_cfg, task, image_size, frozen):
    """One example alone (no padding; image_size chosen so every pooling window is full): nothing the model computes
    is waste except attention's masked pairs, so FlopCounterMode's matmuls plus the allowed attention pairs (ViT: all
    P x P; connector: every window slot; LLM: the dense may_attend mask) are Molmo2.flops exactly."""
    cfg = make_cfg(image_size=image_size)
    torch.manual_seed(0)
    model = Molmo2(cfg)
    for p in model.vit.parameters():
        p.requires_grad_(not frozen)
    batch = data.collate([encode(tok, cfg, task, 7)], tok.pad, 10 ** 6)
    assert (batch["pool_idx"] >= 0).all() and (batch["doc_ids"] > 0).all()
    n_img, P, W = int(batch["image_mask"].sum()), model.vit.pos_embed.shape[0], cfg.vit_width
    attn = 3 * (cfg.n_layer * dense_pairs(batch, cfg) * 4 * cfg.n_head * cfg.head_dim
                + batch["pool_idx"].numel() * 4 * W)
    attn += (1 if frozen else 3) * cfg.vit_built * n_img * 4 * P * P * W
    assert model.flops(batch) == measured_matmul_flops(model, batch) + attn

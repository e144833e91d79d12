"""
The Molmo2 architecture, whole, in one file (docs/molmo2.md, Architecture):

  pixels (N, 3, H, W) --patchify--> (N, P, 3*p*p) --ViT--> features of two layers, concatenated (N, P, 2*W)
     --attention pooling per window (2x2 images, 3x3 video)--> (N_tok, W) --SwiGLU projector--> (N_tok, d)
     --added to the embeddings of the <im_patch> slots--> Qwen3-style decoder --> next-token logits

Module names follow Molmo2's roles (vit / connector / llm) so a plain name map can load real checkpoints: hf.py
reads and writes Hugging Face Molmo2 checkpoints and starts the LLM from Qwen3 and the ViT from SigLIP.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.nn.attention.flex_attention import BlockMask
from torch.utils.checkpoint import checkpoint

from cp_attention import (FLEX_BLOCK, CPAttention, build_block_mask, flex_attention_fn, pad_to_multiple,
                          strict_recompile_limit)
from data import normalize_pixels

try:  # optional fast path: flash-attn on CUDA (detected, never required)
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


@dataclass
class ModelConfig:
    # vision encoder (SigLIP-style ViT). Molmo2: 378 px, patch 14, width 1152, 27 layers, 16 heads, MLP 4304
    image_size: int = 64
    patch_size: int = 8
    vit_width: int = 128
    vit_depth: int = 4             # nominal depth; blocks deeper than the deepest feature layer are not built
    vit_heads: int = 4
    vit_mlp: int = 512
    vit_layers: tuple = (-1, -3)   # which block outputs feed the connector; Molmo2 uses (-3, -9)
    # connector: attention pooling + SwiGLU projector
    pool_h: int = 2                # 2x2 windows for images
    pool_w: int = 2
    video_pool_h: int = 3          # 3x3 windows for video frames (Molmo2: 27x27 patches -> 9x9 tokens a frame)
    video_pool_w: int = 3
    col_tokens: bool = True        # an <im_col> token after each row of pooled tokens
    frame_tokens: bool = True      # video frames between <frame_start>/<frame_end>; False: <im_start>/<im_end>
                                   # (Molmo2-4B's release: use_frame_special_tokens=False)
    max_crops: int = 0             # 0: one crop of image_size (the seed); n: Molmo2's multi-crop, a global crop and
    crop_margins: tuple = (4, 4)   # up to n overlapping tiles, overlapping by these margins (patches); Molmo2: 8
    proj_ff: int = 0               # the projector's SwiGLU width; 0 = d_ff (Molmo2-8B: 18944 beside an FFN of 12288)
    # LLM (Qwen3-style decoder)
    base_vocab: int = 512          # BPE + chat tokens: rows of the embedding and of the output head
    n_extra: int = 9               # Molmo2's extra vocabulary rows (the vision special tokens)
    im_patch_id: int = 512         # id of <im_patch>, the first extra row
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2             # GQA: each kv head serves n_head / n_kv_head query heads
    head_dim: int = 64
    d_ff: int = 768
    rope_theta: float = 1e6        # Qwen3-8B
    norm_eps: float = 1e-6
    tie_embeddings: bool = False   # Qwen3-4B ties, Qwen3-8B does not
    bidir_vision: bool = True      # vision tokens of one example attend to each other both ways (Molmo2)

    @property
    def vit_built(self):  # blocks actually built: up to the deepest layer used (Molmo2 skip_unused_layers)
        return max(self.vit_depth + l + 1 if l < 0 else l + 1 for l in self.vit_layers)


def compute_dtype(t):
    """The dtype matmuls run in for tensor t: the autocast dtype when autocast is on for its device."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


ATTN_IMPLS = ("auto", "sdpa", "flex")


def resolve_attn_impl(impl, device_type):
    """The attention the model runs, from Molmo2.attn_impl and the device type: 'sdpa' (a dense (B, 1, T, T) bool
    mask: the reference) or 'flex' (FlexAttention under a BlockMask: compiled on CUDA, no T x T scores or mask in
    memory; eager, dense math, elsewhere). 'auto' is 'flex' on CUDA and 'sdpa' on anything else (FlexAttention has no
    backward on a CPU in torch 2.13)."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {', '.join(ATTN_IMPLS)}, got {impl!r}")
    if impl == "auto":
        return "flex" if device_type == "cuda" else "sdpa"
    return impl


def attend(q, k, v, mask):
    """q (B, H, Tq, hd); k, v (B, Hkv, Tk, hd). mask: (B, 1, Tq, Tk) bool (True = may attend), a FlexAttention
    BlockMask (the same mask, evaluated tile by tile), or None = plain causal.
    GQA: kv heads are shared by groups of query heads (enable_gqa avoids materialising the repeat).
    Under context parallelism mask is a cp_attention.CPAttention: attention across the cp group (ring / Ulysses)."""
    if isinstance(mask, CPAttention):
        return mask(q, k, v)
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # Under bf16 autocast on a CPU the attention alone runs in fp32: torch's CPU attention kernels are slower in
        # bf16 than in fp32 (on a Zen 4 the bf16 backward took 24% of the shapes step's CPU time, fp32's 7%), and a
        # decoder step's fwd + bwd ran 6% (best) to 10% (median) faster so (docs/experiments.md). The output goes back
        # to bf16.
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), mask).to(torch.bfloat16)
    gqa = k.shape[1] != q.shape[1]
    if isinstance(mask, TiledMask):  # the dense mask, a tile of query rows at a time against its keys only
        return torch.cat([F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1],
                                                         attn_mask=mask.mask[:, :, q0:q1, k0:k1], enable_gqa=gqa)
                          for q0, q1, k0, k1 in mask.tiles], dim=2)
    if isinstance(mask, BlockMask):  # built for whole 128-tiles (flex_block_mask): q, k, v padded to them, cut after
        T, (Tq, Tk) = q.shape[2], mask.seq_lengths
        if (Tq, Tk) != (T, k.shape[2]):
            pad = (0, 0, 0, Tk - k.shape[2])
            q, k, v = F.pad(q, (0, 0, 0, Tq - T)), F.pad(k, pad), F.pad(v, pad)
        return flex_attention_fn(q.is_cuda)(q, k, v, block_mask=mask, enable_gqa=gqa)[:, :, :T]
    if mask is None and flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)


# ----------------------------------------------------------------------------------------------------------
# Vision: SigLIP-style ViT (pre-LN, LayerNorm with bias, GELU-tanh MLP, no CLS token)

class ViTBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        W = c.vit_width
        self.ln1, self.ln2 = nn.LayerNorm(W, eps=1e-6), nn.LayerNorm(W, eps=1e-6)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(W, W) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(W, c.vit_mlp), nn.Linear(c.vit_mlp, W)
        self.h = c.vit_heads

    def forward(self, x):  # (N, P, W)
        N, P, W = x.shape
        y = self.ln1(x)
        q, k, v = (w(y).view(N, P, self.h, W // self.h).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        y = F.scaled_dot_product_attention(q, k, v)  # full attention over the patches of one crop
        x = x + self.wo(y.transpose(1, 2).reshape(N, P, W))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


def sincos_2d(gh, gw, dim):
    """Fixed 2-D sin-cos table (gh*gw, dim): half the channels encode the row, half the column."""
    def one(n, d):
        omega = 1.0 / 10000 ** (torch.arange(d // 2) / (d // 2))
        ang = torch.arange(n)[:, None] * omega[None]
        return torch.cat([ang.sin(), ang.cos()], 1)  # (n, d)
    row, col = one(gh, dim // 2), one(gw, dim // 2)
    return torch.cat([row[:, None].expand(gh, gw, -1), col[None].expand(gh, gw, -1)], -1).reshape(gh * gw, dim)


def patchify(x, p):
    """(N, 3, H, W) -> (N, (H/p)*(W/p), p*p*3): row-major patches, each flattened as (py, px, rgb) like Molmo2's
    image_preprocessor (and the pixel_values of transformers' Molmo2), so a released patch_embed applies unchanged."""
    N, C, H, W = x.shape
    x = x.reshape(N, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(N, (H // p) * (W // p), p * p * C)


class ViT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        g = c.image_size // c.patch_size
        self.patch_embed = nn.Linear(3 * c.patch_size ** 2, c.vit_width)  # Molmo2: Linear(588 -> 1152)
        # Learned positional embedding (SigLIP), *initialised* from a 2-D sin-cos table so that position is
        # readable from step 0: trained from scratch, a random table leaves "where" unlearnable for a long time
        # (pointing needs it first). Pretrained SigLIP weights simply overwrite it.
        self.pos_embed = nn.Parameter(0.5 * sincos_2d(g, g, c.vit_width))
        self.blocks = nn.ModuleList(ViTBlock(c) for _ in range(c.vit_built))
        self.act_ckpt = False  # activation checkpointing (train.py act_ckpt): each block recomputed in backward

    def patchify(self, x):
        return patchify(x, self.c.patch_size)

    def forward(self, pixels):  # (N, 3, H, W) -> (N, P, len(vit_layers) * W)
        x = self.patch_embed(self.patchify(pixels)) + self.pos_embed
        hidden = []
        for blk in self.blocks:
            # checkpointed: only the block's input is kept (stage 3: 1,536 frames x 256 patches per micro-batch)
            x = checkpoint(blk, x, use_reentrant=False) if self.act_ckpt and torch.is_grad_enabled() else blk(x)
            hidden.append(x)  # hidden[i] = output of block i
        pick = [self.c.vit_depth + l if l < 0 else l for l in self.c.vit_layers]
        return torch.cat([hidden[i] for i in pick], dim=-1)  # concatenated on channels, in the listed order


# ----------------------------------------------------------------------------------------------------------
# Connector: attention pooling with a mean query, then a SwiGLU projector (Molmo2 attention_meanq + mlp)

class Connector(nn.Module):
    def __init__(self, c):
        super().__init__()
        cin, D = len(c.vit_layers) * c.vit_width, c.vit_width
        self.heads = c.vit_heads
        self.wq, self.wk, self.wv = nn.Linear(cin, D), nn.Linear(cin, D), nn.Linear(cin, D)
        self.wo = nn.Linear(D, D)
        hidden = c.proj_ff or c.d_ff  # Molmo2's adapter intermediate_size (by default the LLM's FFN width)
        self.w1, self.w3 = nn.Linear(D, hidden, bias=False), nn.Linear(D, hidden, bias=False)
        self.w2 = nn.Linear(hidden, c.d_model, bias=False)

    def forward(self, feats, pool_idx):
        """feats (N_patch, Cin): every patch of the batch's images, flattened; pool_idx (N_tok, k) long:
        the k patches pooled into each output token, -1 = padded slot. Returns (N_tok, d_model)."""
        valid = pool_idx >= 0                                   # (N_tok, k)
        x = feats[pool_idx.clamp(min=0)] * valid[..., None]     # (N_tok, k, Cin), pads zeroed
        q = x.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)  # query = mean of the window's valid patches
        n, k, _ = x.shape
        h = self.heads
        q = self.wq(q).view(n, 1, h, -1).transpose(1, 2)        # (N_tok, h, 1, hd)
        kk = self.wk(x).view(n, k, h, -1).transpose(1, 2)       # (N_tok, h, k, hd)
        vv = self.wv(x).view(n, k, h, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kk, vv, attn_mask=valid[:, None, None, :])  # pads masked out
        y = self.wo(y.transpose(1, 2).reshape(n, -1))           # (N_tok, D)
        return self.w2(F.silu(self.w1(y)) * self.w3(y))         # SwiGLU -> (N_tok, d_model)


# ----------------------------------------------------------------------------------------------------------
# LLM: Qwen3-style decoder (RMSNorm, RoPE, GQA, per-head QK-norm, SwiGLU)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        dt = x.dtype  # normalise in fp32 even under bf16 autocast, as Qwen3 does
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dt) * self.weight.to(dt)


def rope(x, cos, sin):
    """Rotary embedding, Qwen/Llama "rotate half" layout. x (B, H, T, hd); cos, sin (B, 1, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.h, self.kv, self.hd = c.n_head, c.n_kv_head, c.head_dim
        # q, k and v from one matmul: rows [q; k; v] = (n_head*hd + 2*n_kv_head*hd, d), Molmo2's att_proj layout
        self.qkv_proj = nn.Linear(c.d_model, (c.n_head + 2 * c.n_kv_head) * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)
        self.q_norm, self.k_norm = RMSNorm(c.head_dim, c.norm_eps), RMSNorm(c.head_dim, c.norm_eps)

    def project(self, x, cos, sin):
        """x (B, T, d), normed -> q (B, H, T, hd), k and v (B, Hkv, T, hd): one matmul, QK-norm, RoPE."""
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        q = self.q_norm(q.view(B, T, self.h, self.hd)).transpose(1, 2)   # per-head QK-norm -> (B, H, T, hd)
        k = self.k_norm(k.view(B, T, self.kv, self.hd)).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.kv, self.hd).transpose(1, 2)
        return rope(q, cos, sin), rope(k, cos, sin), v


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.norm_eps)
        # SwiGLU's two input matrices as one matmul: rows [up; gate] = (2*d_ff, d), Molmo2's ff_proj layout
        self.up_gate_proj = nn.Linear(c.d_model, 2 * c.d_ff, bias=False)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):  # x (B, T, d) -> (B, T, d)
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:  # KV cache: append this step's keys/values, attend over everything so far
            k, v = cache.update(k, v)
        return self.out(x, attend(q, k, v, mask))

    # The block's two halves around the attention kernel: everything in them is a matmul or elementwise, and
    # compile_blocks compiles each into a few fused kernels; the kernel between them (flash / FlexAttention, or the
    # collectives of context parallelism) stays as it is.
    def qkv(self, x, cos, sin):  # the input norm, then q, k, v (Attention.project)
        return self.attn.project(self.input_layernorm(x), cos, sin)

    def out(self, x, y):  # y (B, H, T, hd): the attention's output -> output projection, residual, SwiGLU MLP
        B, _, T, _ = y.shape
        x = x + self.attn.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        up, gate = self.up_gate_proj(self.post_attention_layernorm(x)).chunk(2, dim=-1)  # (B, T, d_ff) each
        return x + self.down_proj(F.silu(gate) * up)


# the separate matrices (Qwen3's layout) that checkpoints from before the fusion hold, in the fused tensor's row order
UNFUSED = {"attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"), "up_gate_proj": ("up_proj", "gate_proj")}


def unfused_groups(names):
    """{fused parameter: [the separate ones, in row order]} for each decoder block whose separate q/k/v or up/gate
    matrices (UNFUSED) are all among names, a state dict's parameter names: what checkpoint.fuse_projections joins."""
    names, out = set(names), {}
    for n in names:
        for fused, parts in UNFUSED.items():
            if n.startswith("llm.blocks.") and n.endswith(f".{parts[0]}.weight"):
                prefix = n[:-len(f"{parts[0]}.weight")]  # llm.blocks.{i}.
                group = [f"{prefix}{p}.weight" for p in parts]
                if all(g in names for g in group):
                    out[f"{prefix}{fused}.weight"] = group
    return out


class LayerCache:
    """Pre-allocated keys/values for one layer: (B, Hkv, T_max, hd); `pos` tokens filled so far."""

    def __init__(self, B, c, T_max, device, dtype):
        self.k = torch.zeros(B, c.n_kv_head, T_max, c.head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def update(self, k, v):
        T = k.shape[2]
        self.k[:, :, self.pos:self.pos + T] = k
        self.v[:, :, self.pos:self.pos + T] = v
        self.pos += T
        return self.k[:, :, :self.pos], self.v[:, :, :self.pos]


def rope_inv_freq(c):  # (hd/2,): RoPE's rotation speeds, theta^(-2i/hd)
    return 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)


class LLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.base_vocab, c.d_model)
        self.embed_extra = nn.Embedding(c.n_extra, c.d_model)  # Molmo2's additional_vocab rows
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.d_model, c.base_vocab, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)

    def embed_tokens(self, ids):  # ids < base_vocab use the main table, the rest the extra rows
        extra = ids >= self.c.base_vocab
        x = self.embed(ids.clamp(max=self.c.base_vocab - 1))
        return torch.where(extra[..., None], self.embed_extra((ids - self.c.base_vocab).clamp(min=0)), x)

    def rope_tables(self, positions, dtype):  # positions (B, T) -> cos, sin (B, 1, T, hd)
        ang = positions[..., None].float() * self.inv_freq  # fp32 angles: bf16 would blur far positions
        ang = torch.cat([ang, ang], -1)[:, None]
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def head(self, h):
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)


def compile_blocks(model, backend="inductor"):
    """torch.compile each ViT block whole and each decoder block's two halves (Block.qkv, Block.out), in place. On
    a GPU most of a step that is not matmul is elementwise traffic: RMSNorm in fp32 three times a layer, RoPE, SwiGLU,
    the casts; compiled, each half becomes a few fused kernels. Blocks are compiled one by one, not the whole model,
    so the parts that do not trace well stay eager (the attention kernel between the halves: FlexAttention compiled
    on its own, or context parallelism's collectives; the data-dependent selection of images and loss tokens;
    FSDP2's hooks, which run on each block's call, outside the compiled code). Every block shares one compiled graph
    (its weights are inputs); a new shape compiles once more, with that dimension then dynamic (the ViT's image
    count varies by micro-batch; training rows on CUDA are padded to seq_len: collate fixed=True). The eager
    methods stay the reference: loss and every gradient are compared with them, by tests/test_model.py through
    backend 'aot_eager' (the graphs dynamo captures and AOTAutograd differentiates, run by eager kernels: seconds)
    and by bench.py's checks through inductor (its C++ kernels on a CPU: about 40 s to compile on two cores)."""
    strict_recompile_limit()  # a shape past the limit is an error, not a silent eager fallback
    for blk in model.vit.blocks:
        blk.forward = torch.compile(blk.forward, fullgraph=True, backend=backend)
    for blk in model.llm.blocks:
        blk.qkv = torch.compile(blk.qkv, fullgraph=True, backend=backend)
        blk.out = torch.compile(blk.out, fullgraph=True, backend=backend)
    return model


# ----------------------------------------------------------------------------------------------------------
# The loss head: next-token logits and weighted cross-entropy in one step, its gradient computed in the forward

LOSS_FP32_ELEMENTS = 2 ** 26  # the fp32 softmax works on rows of logits up to this many elements (256 MB) at a time


def linear_cross_entropy(h, weight, labels, w, chunk, need_h, need_w):
    """-> (sum_i w_i * CE(h_i W^T, y_i), dL/dh or None, dL/dW or None): LinearCrossEntropy's work, which the model
    calls directly when no gradient is wanted (evaluation)."""
    loss = torch.zeros((), dtype=torch.float32, device=h.device)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    n = chunk or max(len(h), 1)
    rows = max(1, LOSS_FP32_ELEMENTS // weight.shape[0])
    for i in range(0, len(h), n):
        hc, yc, wc = h[i:i + n], labels[i:i + n], w[i:i + n]
        logits = F.linear(hc, weight)                                 # (n, V), the compute dtype
        for r in range(0, len(hc), rows):
            # z (rows, V) fp32 (the logits' own rows if fp32), made w * (softmax(z) - onehot(y)) in place below
            z = logits[r:r + rows].float()
            y, wr = yc[r:r + rows], wc[r:r + rows]
            lse = torch.logsumexp(z, dim=-1)                          # (rows,)
            loss += ((lse - z.gather(1, y[:, None])[:, 0]) * wr).sum()
            if need_h or need_w:                                      # z becomes w * (softmax(z) - onehot(y))
                z.sub_(lse[:, None]).exp_()
                z[torch.arange(len(y), device=z.device), y] -= 1.0
                z.mul_(wr[:, None])
                if logits.dtype != torch.float32:
                    logits[r:r + rows] = z                            # back into the logits' buffer (bf16)
        if need_h:
            dh[i:i + n] = logits @ weight                             # (n, V) @ (V, d)
        if need_w:
            dw += logits.t() @ hc                                     # (V, n) @ (n, d)
    return loss, dh, dw


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i W^T, y_i), i over the N loss tokens; h (N, d), W (V, d) the output embedding, y (N,), w (N,)
    fp32 loss weights. At Qwen3's vocabulary (V = 151,936) one token's logits are 0.6 MB in fp32, more than all of the
    LLM's checkpointed activations of that token, so the logits are never kept for the backward: chunk rows at a time
    (loss_chunk; 0 = all N at once), the forward computes the logits in the compute dtype (bf16 under autocast), their
    fp32 log-softmax a block of rows at a time (LOSS_FP32_ELEMENTS: fp32 never holds a whole chunk's logits), and at
    once the gradient, dCE/dlogits = w * (softmax - onehot(y)), written over the logits in place; two matmuls turn
    it into dL/dh (N, d) and dL/dW (V, d, accumulated in fp32), and those are all that the backward keeps. One
    chunk's logits in memory, and no recomputation; the price is dL/dW's fp32 (V, d) buffer, held from the forward
    to the backward (0.6 GB at Qwen3-0.6B's 151,936 x 1,024) (Liger-Kernel's fused linear cross-entropy does the same in
    Triton). The reference it is tested against is F.cross_entropy on the whole (N, V) fp32 logits."""

    @staticmethod
    def forward(ctx, h, weight, labels, w, chunk):
        loss, dh, dw = linear_cross_entropy(h, weight, labels, w, chunk, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):  # grad: d(final loss)/d(this sum), a scalar (world size / weight sum: train.accumulate)
        dh, dw = ctx.saved_tensors  # scaled in place: no second (V, d) buffer at the backward's memory peak
        return (None if dh is None else dh.mul_(grad),
                None if dw is None else dw.mul_(grad).to(ctx.weight_dtype), None, None, None)


# ----------------------------------------------------------------------------------------------------------
# The VLM

def may_attend(doc_q, doc_k, vis_q, vis_k, q, k, bidir):
    """Molmo2's attention rule, element by element on broadcastable tensors: may a query at position q (of example
    doc_q, vision token when vis_q) attend to a key at position k? doc ids are 1, 2, ... for the examples packed in
    a row, 0 = padding. A query sees only keys of its own example (Molmo2's subsegment ids; without this, packed
    examples read each other: nanoVLM #201): causally, and when bidir, every vision token of its example both ways
    (Molmo2 bi_directional_attn="image_tokens"); padding keys are never seen. The diagonal stays open so a pad
    query row is never empty (an all-False row would make softmax NaN).
    The one definition of the mask: the dense blocks (attention_mask_block) and FlexAttention's mask_mod
    (molmo2_mask_mod) both evaluate it.
    A vision token is any id at or above base_vocab (the extra rows): the <im_patch> slots and the structure tokens
    around them (<im_start>, <im_col>, <im_end>, <frame_start>, <frame_end>); a frame's time text is ordinary text."""
    ok = q >= k
    if bidir:
        ok = ok | (vis_q & vis_k)
    return ((doc_q == doc_k) & (doc_k > 0) & ok) | (q == k)


def attention_mask_block(doc_ids, is_vision, bidir, rows, cols):
    """Molmo2's mask (may_attend) at query positions `rows` (n,) and key positions `cols` (m,) of a row: (B, 1, n, m)
    bool, True = query may attend to key. doc_ids (B, T); is_vision (B, T): vision-token flags. Context parallelism
    asks for one block at a time (cp_attention.mask_rows_cols): at 36,864 tokens the whole mask is 1.4 GB a row."""
    return may_attend(doc_ids[:, rows][:, :, None], doc_ids[:, cols][:, None, :],                 # (B, n, 1), (B, 1, m)
                      is_vision[:, rows][:, :, None], is_vision[:, cols][:, None, :],
                      rows[:, None], cols[None, :], bidir)[:, None]                               # (B, 1, n, m)


def attention_pairs(doc_ids, is_vision, bidir):
    """The number of (query, key) pairs Molmo2's mask allows between real tokens (may_attend over the non-pad
    queries and keys: the padding's open diagonal is no work the model needs), from doc_ids (B, T) and is_vision
    (B, T) in O(B*T), without the T x T mask: an example of n tokens, v of them vision tokens, has n(n+1)/2 causal
    pairs (the diagonal included) and, with bidir, v(v-1)/2 more (a vision query's later vision keys). Wherever its
    tokens lie in the row: may_attend compares doc ids and positions only."""
    B, T = doc_ids.shape
    real = doc_ids > 0
    example = torch.arange(B, device=doc_ids.device)[:, None] * (T + 1) + doc_ids  # (B, T) an id per example
    n = torch.bincount(example[real], minlength=1)                                   # tokens per example
    pairs = (n * (n + 1) // 2).sum()
    if bidir:
        v = torch.bincount(example[real & is_vision], minlength=1)                 # vision tokens per example
        pairs = pairs + (v * (v - 1) // 2).sum()
    return int(pairs)


class TiledMask:
    """The dense mask (B, 1, T, T) cut for packed rows. A packed row holds several short examples (the shapes
    demo: ~5 of ~100 tokens in 512), and a query sees keys of its own example only: from the example's first token
    to itself (causal), or to the example's last vision token (a vision query, bidirectional). So for a tile of
    `tile` query rows, the keys any of them may see lie in one span [k0, k1), in every row of the batch; the keys
    outside it are masked for all of them. Attention over the span alone is the same softmax (the rest would add
    exp(-inf) = 0) at a fraction of the cost: a third of the full T x T work for the shapes demo's rows at 64.
    tiles: [(q0, q1, k0, k1)] for the query tiles of the row."""

    def __init__(self, mask, doc_ids, is_vision, bidir, tile):
        B, T = doc_ids.shape
        t = torch.arange(T, device=doc_ids.device).expand(B, T)
        new = torch.ones_like(doc_ids, dtype=torch.bool)
        new[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]                 # (B, T) an example (or the padding) starts
        first = torch.where(new, t, 0).cummax(1).values                  # (B, T) its example's first position
        last = t + 1                                                     # (B, T) one past the last key it may see
        if bidir:  # a vision query sees its example's vision tokens, the later ones too
            key = torch.arange(B, device=doc_ids.device)[:, None] * (T + 1) + doc_ids   # (B, T) example id
            end = torch.full((B * (T + 1),), -1, device=doc_ids.device)
            end = end.scatter_reduce(0, key[is_vision], t[is_vision], "amax")          # last vision position
            last = torch.where(is_vision, torch.maximum(last, end[key] + 1), last)
        q0 = list(range(0, T, tile))
        lo = torch.stack([first[:, a:a + tile].min() for a in q0]).tolist()
        hi = torch.stack([last[:, a:a + tile].max() for a in q0]).tolist()
        self.mask, self.tiles = mask, [(a, min(T, a + tile), k0, k1) for a, k0, k1 in zip(q0, lo, hi)]


def attention_mask_4d(doc_ids, is_vision, bidir):
    """The whole mask, (B, 1, T, T): attention_mask_block over every position."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device)
    return attention_mask_block(doc_ids, is_vision, bidir, idx, idx)


def molmo2_mask_mod(doc_ids, is_vision, bidir):
    """The same mask as FlexAttention's mask_mod(b, h, q, k) -> bool: one (row b, query position q, key position k)
    at a time (FlexAttention vmaps it over every pair it needs; torch.compile fuses it into the kernel). A plain
    closure over the two (B, T) tensors: compiled code is reused when only their values change."""
    def mask_mod(b, h, q, k):
        return may_attend(doc_ids[b, q], doc_ids[b, k], is_vision[b, q], is_vision[b, k], q, k, bidir)
    return mask_mod


class MolmoMask:
    """Molmo2's mask over a batch, in O(T) memory (doc ids and vision flags), in the two forms the kernels take:
    called with (rows, cols), the dense (B, 1, n, m) block (attention_mask_block: the dense kernels of context
    parallelism), and .mask_mod, FlexAttention's per-pair form at global positions (molmo2_mask_mod: the BlockMask
    of any block, cp_attention.flex_block)."""

    def __init__(self, doc_ids, is_vision, bidir):
        self.doc_ids, self.is_vision, self.bidir = doc_ids, is_vision, bidir
        self.mask_mod = molmo2_mask_mod(doc_ids, is_vision, bidir)

    def __call__(self, rows, cols):
        return attention_mask_block(self.doc_ids, self.is_vision, self.bidir, rows, cols)


def flex_block_mask(doc_ids, is_vision, bidir):
    """The same mask as attention_mask_4d, as a FlexAttention BlockMask (cp_attention.build_block_mask): which
    128 x 128 tiles are empty (never computed), full, or partial (molmo2_mask_mod applied). With packed rows most
    off-diagonal tiles are empty, which is where the dense mask wastes its work; built a slab of rows at a time,
    it never holds the T x T mask either. Its length is T rounded up to whole tiles (T_pad = 128 * ceil(T / 128);
    the extra positions are padding, doc id 0: no real query sees them), so that batches of nearby lengths share
    one compiled kernel (cp_attention.FLEX_RECOMPILE_LIMIT); attend pads q, k, v to it and cuts the output back."""
    doc_ids, is_vision = pad_to_multiple(doc_ids, FLEX_BLOCK, 1, 0), pad_to_multiple(is_vision, FLEX_BLOCK, 1, False)
    B, T = doc_ids.shape
    return build_block_mask(molmo2_mask_mod(doc_ids, is_vision, bidir), B, T, T, doc_ids.device)


class Molmo2(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c = c
        self.attn_impl = "auto"  # resolve_attn_impl: 'auto' (flex on CUDA, sdpa elsewhere), 'sdpa', 'flex'
                                 # (under context parallelism self.cp.impl chooses the local kernel instead)
        self.cp = None           # a cp_attention.ContextParallel: split each sequence over a cp group (training)
        self.act_ckpt = False    # activation checkpointing: keep each LLM block's input only, recompute in backward
        self.loss_chunk = 0      # loss-head rows per chunk (0 = all at once): one chunk's logits alive at a time
        self.attn_tile = 0       # dense-mask attention (sdpa): query rows per kernel call, keys cut to what they see
                                 # (TiledMask); 0 = the whole T x T at once, the reference
        self.always_vision = False  # run the ViT and connector on every forward, on a blank image when the batch has
                                    # none (train.wrap_model sets it under FSDP2: every rank joins every all-gather)
        self.vit = ViT(c)
        self.connector = Connector(c)
        self.llm = LLM(c)
        self.apply(self._init)
        # GPT-2 style: scale residual-branch outputs by depth so the stream does not grow with layers
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * c.n_layer))
        # The ViT: LeCun-normal (std = fan_in^-0.5, flax's Dense default, which big_vision's SigLIP uses), with the
        # residual branches scaled by depth. GPT-2's fixed 0.02 is ~1/4 of fan-in scale at width 128, and a ViT
        # trained from scratch from it learns shapes far more slowly (docs/experiments.md). Pretrained SigLIP
        # weights simply overwrite all of this.
        for name, m in self.vit.named_modules():
            if isinstance(m, nn.Linear):
                std = m.in_features ** -0.5
                if name.endswith(("wo", "fc2")):
                    std /= math.sqrt(2 * c.vit_built)
                nn.init.normal_(m.weight, std=std)
        # The projector's output is *added* to the <im_patch> embedding. With plain 0.02 init the SwiGLU
        # product of two small terms starts ~1e-3 of the embedding's size, and the LLM learns to ignore the image
        # for thousands of steps. Start them at or above the embedding's scale.
        for lin in (self.connector.wq, self.connector.wk, self.connector.wv, self.connector.wo,
                    self.connector.w1, self.connector.w3):
            nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)  # variance-preserving (fan-in) init
        # features 7-16x the embedding (test)
        nn.init.normal_(self.connector.w2.weight, std=0.25 * (c.proj_ff or c.d_ff) ** -0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # -- parameters by component (optimizer groups, printed counts) --------------------------------------
    def param_groups(self):
        """Molmo2 trains connector, ViT and LLM at different LRs; the new embedding rows (embed_extra) go with
        the connector (get_connector_parameters)."""
        groups = {"connector": [], "vit": [], "llm": []}
        for n, p in self.named_parameters():
            key = "connector" if n.startswith("connector.") or "embed_extra" in n else n.split(".")[0]
            groups[key].append(p)
        return groups

    def param_counts(self):
        return {k: sum(p.numel() for p in v) for k, v in self.param_groups().items()}

    # -- forward -------------------------------------------------------------------------------------------
    def embed_inputs(self, input_ids, pixel_values=None, image_mask=None, pool_idx=None, cp=None):
        """Token embeddings (B, T, d) with pooled vision features added at the <im_patch> slots. pixel_values
        (B, F, 3, H, W): uint8 bytes (the batches data.collate makes), normalised here on the device, or float
        pixels normalised already (data.preprocess_image). cp (a cp_attention.ContextParallel, training): the
        images are split over the cp ranks for the ViT, and its features all-gathered (cp.encode)."""
        x = self.llm.embed_tokens(input_ids)
        if pixel_values is not None and image_mask is not None and image_mask.any():
            imgs = pixel_values[image_mask]                     # (N_img, 3, H, W): only real images run
            if imgs.dtype == torch.uint8:
                imgs = normalize_pixels(imgs)                   # fp32 in [-1, 1], as preprocess_image gives
            imgs = imgs if torch.is_autocast_enabled(x.device.type) else imgs.to(x.dtype)
            feats = self.vit(imgs) if cp is None else cp.encode(self.vit, imgs)  # (N_img, P, Cin)
            tok = self.connector(feats.flatten(0, 1), pool_idx)  # (N_tok, d)
            slots = input_ids == self.c.im_patch_id
            if int(slots.sum()) != tok.shape[0]:
                raise ValueError(f"{int(slots.sum())} <im_patch> slots but {tok.shape[0]} pooled features")
            x = x.clone()
            x[slots] = x[slots] + tok.to(x.dtype)               # Molmo2: x[is_patch] += feats
        elif self.always_vision:
            # No image here, but FSDP2 all-gathers each ViT block's parameters (and reduce-scatters their gradients)
            # with every rank at once, so a rank that skipped the ViT would leave the others waiting. A blank image
            # through the ViT and one pooling window, its output added times 0: x unchanged, gradients zero.
            c = self.c
            feats = self.vit(torch.zeros(1, 3, c.image_size, c.image_size, device=x.device, dtype=x.dtype))
            window = torch.arange(c.pool_h * c.pool_w, device=x.device)[None]     # (1, k): the first k patches
            x = x + 0.0 * self.connector(feats.flatten(0, 1), window).sum()
        return x

    def hidden(self, batch, positions=None, caches=None):
        """Final hidden states (B, T, d); under context parallelism (self.cp, training) this rank's shard of
        them, (B, T_pad / W, d), in the order cp.shard gives every per-token tensor."""
        ids = batch["input_ids"]
        cp = self.cp if caches is None else None
        x = self.embed_inputs(ids, batch.get("pixel_values"), batch.get("image_mask"), batch.get("pool_idx"), cp)
        am = batch["attention_mask"]
        doc = batch["doc_ids"] if "doc_ids" in batch else am.long()  # one example per row unless packed
        if positions is None:  # collate's (restarting per packed example), else count only real tokens
            positions = batch["position_ids"] if "position_ids" in batch else (am.long().cumsum(1) - 1).clamp(min=0)
        is_vision = ids >= self.c.base_vocab
        if cp is not None:
            # Context parallelism (stage 3: one long sequence split across GPUs). The whole sequence was embedded
            # above identically on every rank of the cp group (each rank encoding 1/W of the frames, the features
            # all-gathered: cp.encode); from here each rank keeps its shard (zigzag for the ring, contiguous for
            # Ulysses) of the embeddings and the positions; the mask stays global, as a function of the padded doc
            # ids and vision flags that each attention block evaluates at its own (query, key) positions.
            doc, is_vision = cp.pad(doc, 0), cp.pad(is_vision, False)
            mask = cp.attention(MolmoMask(doc, is_vision, self.c.bidir_vision),
                                causal=not self.c.bidir_vision)  # bidirectional vision opens future keys
            x, positions = cp.shard(x), cp.shard(positions)
        elif resolve_attn_impl(self.attn_impl, x.device.type) == "flex":
            mask = flex_block_mask(doc, is_vision, self.c.bidir_vision)  # one BlockMask for every layer
        else:
            mask = attention_mask_4d(doc, is_vision, self.c.bidir_vision)
            if self.attn_tile and caches is None and mask.shape[-1] > self.attn_tile:
                mask = TiledMask(mask, doc, is_vision, self.c.bidir_vision, self.attn_tile)
        cos, sin = self.llm.rope_tables(positions, compute_dtype(x))
        for i, blk in enumerate(self.llm.blocks):
            if self.act_ckpt and caches is None and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed in the backward (non-reentrant:
                # works with autocast and with the ring's autograd Function, whose messages simply run again)
                x = checkpoint(blk, x, cos, sin, mask, use_reentrant=False)
            else:
                x = blk(x, cos, sin, mask, None if caches is None else caches[i])
        return self.llm.norm(x)

    def forward(self, batch):
        """Returns (loss_sum, weight_sum): sum(w * CE) and sum(w) over this micro-batch (under context
        parallelism: over this rank's shard of it). The caller divides by the weight sum of the *global* batch
        (all micro-batches, all ranks), so the gradient is the same however the batch is split (Molmo2
        BatchDivisor.global_batch). Reads input_ids, attention_mask, labels, loss_weights, pixel_values,
        image_mask, pool_idx and, when packed, doc_ids and position_ids; not the batch's timestamps: a frame's time
        reaches the model only as the text before it ("{t:.1f} " tokens in input_ids, data.visual_tokens)."""
        h = self.hidden(batch)
        w, labels = batch["loss_weights"], batch["labels"]
        if self.cp is not None:  # labels were shifted by collate, so sharding keeps each (token, next token) pair
            w, labels = self.cp.shard(w, 0.0), self.cp.shard(labels, -1)
        sel = w > 0                                  # logits only where there is loss (response_logits_only)
        h, labels, w = h[sel], labels[sel], w[sel]   # (N_loss, d), (N_loss,), (N_loss,)
        # (V, d), read directly: under FSDP2 the embedding and lm_head belong to the root's group, whose parameters
        # are whole (all-gathered) throughout the root's forward
        weight = self.llm.embed.weight if self.llm.lm_head is None else self.llm.lm_head.weight
        if torch.is_grad_enabled():
            return LinearCrossEntropy.apply(h, weight, labels, w, self.loss_chunk), w.sum()
        # no backward coming (evaluation): the loss alone, without the gradient's two matmuls and (V, d) buffer
        return linear_cross_entropy(h, weight, labels, w, self.loss_chunk, False, False)[0], w.sum()

    def logits(self, batch):
        return self.llm.head(self.hidden(batch)).float()  # (B, T, V)

    # -- generation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch, max_new_tokens, stop_id, temperature=0.0, generator=None):
        """Batched decoding with a KV cache. The batch must be LEFT padded (every prompt ends at column T-1)
        so that each step appends one column for everybody. Greedy when temperature == 0.
        Returns a list of generated id lists (stop token excluded)."""
        ids, am = batch["input_ids"], batch["attention_mask"]
        B, T = ids.shape
        dtype = compute_dtype(self.llm.embed.weight)
        caches = [LayerCache(B, self.c, T + max_new_tokens, ids.device, dtype) for _ in self.llm.blocks]
        positions = (am.long().cumsum(1) - 1).clamp(min=0)
        h = self.hidden(batch, positions, caches)             # prefill: the whole prompt at once
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        pos = positions[:, -1:]
        for _ in range(max_new_tokens):
            logits = self.llm.head(h[:, -1]).float()
            if temperature > 0:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            for b in range(B):
                if not done[b] and int(nxt[b]) != stop_id:
                    out[b].append(int(nxt[b]))
            done |= nxt == stop_id
            if done.all():
                break
            am = torch.cat([am, torch.ones(B, 1, dtype=torch.bool, device=ids.device)], 1)
            pos = pos + 1
            x = self.llm.embed_tokens(nxt[:, None])
            cos, sin = self.llm.rope_tables(pos, dtype)
            mask = am[:, None, None, :]                        # the new token sees every real key so far
            for i, blk in enumerate(self.llm.blocks):
                x = blk(x, cos, sin, mask, caches[i])
            h = self.llm.norm(x)
        return out

    # -- FLOPs (for MFU) -----------------------------------------------------------------------------------
    def flops(self, batch):
        """Training FLOPs of one micro-batch (forward + backward) as the model needs them, the numerator of MFU
        (train.py's log line, bench.py): matmuls at 2*m*n*k, counted over what the step must compute, not what the
        kernels run. So the ViT and connector over the images and frames present (image_mask), the connector's keys
        over the valid patches of each pooling window (not the -1 slots of a narrower window), the LLM's matmuls
        over the non-pad tokens, attention over the (query, key) pairs Molmo2's mask allows (attention_pairs: each
        example causal, its vision tokens both ways), the output head over the loss tokens. Elementwise work
        (norms, RoPE, softmax) is not counted, nor act_ckpt's recomputation. Backward = 2x forward (the gradients
        of inputs and of weights), except where autograd computes only one: the patch embedding (pixels need no
        gradient) and, with the ViT frozen (lr_vit_mult=0: no gradients in it), no ViT backward at all and only
        the weight gradients of the connector's first matmuls. O(B*T) time: no T x T mask is built."""
        c = self.c
        ids = batch["input_ids"]
        doc = batch["doc_ids"] if "doc_ids" in batch else batch["attention_mask"].long()  # as hidden() reads them
        # LLM: per non-pad token, q/k/v/o and the SwiGLU MLP of every layer; attention per allowed pair and layer
        # (QK^T and AV, 2 * hd each, per query head); the head's logits at the loss tokens only (forward())
        n_real = int((doc > 0).sum())
        llm_mm = c.n_layer * (c.d_model * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head) + 3 * c.d_model * c.d_ff)
        pairs = attention_pairs(doc, ids >= c.base_vocab, c.bidir_vision)
        llm = 2 * n_real * llm_mm + c.n_layer * pairs * 4 * c.n_head * c.head_dim
        head = int((batch["loss_weights"] > 0).sum()) * 2 * c.d_model * c.base_vocab
        total = 3 * (llm + head)
        mask = batch.get("image_mask")
        n_img = int(mask.sum()) if mask is not None else 0
        if n_img == 0:  # embed_inputs runs the vision path only when there are images
            return total
        # ViT, per image (or crop, or frame) of P patches: patch embedding, then per block q/k/v/o, the MLP and
        # full attention over the P x P patch pairs
        H, W_px = batch["pixel_values"].shape[-2:]
        P = (H // c.patch_size) * (W_px // c.patch_size)
        W, F_ = c.vit_width, c.proj_ff or c.d_ff
        patch = n_img * 2 * P * 3 * c.patch_size ** 2 * W
        blocks = n_img * c.vit_built * (2 * P * (4 * W * W + 2 * W * c.vit_mlp) + 4 * P * P * W)
        # connector, per pooled token: the mean query's wq, then wk and wv and attention over the window's valid
        # patches, wo and the SwiGLU projector (w1, w3: W -> F; w2: F -> d_model)
        pool = batch["pool_idx"]
        n_tok, n_valid = pool.shape[0], int((pool >= 0).sum())
        cin = len(c.vit_layers) * W
        first = 2 * n_tok * cin * W + 2 * n_valid * 2 * cin * W  # wq, wk, wv: inputs are the ViT's features
        rest = n_valid * 4 * W + 2 * n_tok * (W * W + 2 * W * F_ + F_ * c.d_model)
        vit_trained = any(p.requires_grad for p in self.vit.parameters())
        if vit_trained:
            return total + 2 * patch + 3 * blocks + 3 * first + 3 * rest
        return total + patch + blocks + 2 * first + 3 * rest

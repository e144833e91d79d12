"""
Hugging Face checkpoints, in and out: released Molmo2 weights loaded into model.Molmo2 and ours exported for
transformers' Molmo2ForConditionalGeneration (one name map, molmo2_hf_names), a Qwen3 checkpoint into the LLM and a
SigLIP / SigLIP2 one into the ViT (stage 1 starts from both). Safetensors are read and written by hand (the format
is an 8-byte header length, a JSON header, then the raw tensors), so nothing beyond torch is needed.

    python hf.py out/shapes_stage1/ckpt.pt out/hf_shapes   # -> Molmo2ForConditionalGeneration.from_pretrained

docs/real_data.md shows the whole round trip; tests/test_hf.py checks every path against transformers.
"""
import json
import math
import os
import struct

import torch
import torch.nn.functional as F

from model import Molmo2, ModelConfig, rope_inv_freq

# The dtype strings of a safetensors header and the torch dtype of each. A tensor of any other dtype (F8_E4M3, U16,
# ...) is refused by name rather than read as the wrong bytes. Data is little-endian, as on every host torch
# trains on, so the raw bytes are the tensor's memory as it is.
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a .safetensors file: 8 bytes (little-endian u64) N, N bytes of JSON
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian data,
    offsets counted from the end of the header. Each tensor comes back with its header shape and dtype, on the
    CPU, in its own memory (the file is closed when this returns); a bad header, an unknown dtype or a short file
    is a ValueError naming the file and, where there is one, the tensor."""
    out = {}
    with open(path, "rb") as f:
        try:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            a, b = info["data_offsets"]
            f.seek(8 + n + a)  # 8 bytes of length, n of header, then this tensor's [begin, end) in the data
            # a bytearray is writable, so torch.frombuffer shares it without a warning; the tensor keeps it alive
            buf = bytearray(f.read(b - a))
            if len(buf) != b - a:
                raise ValueError(f"{path}: tensor {name!r} is truncated")
            dt = _ST_DTYPES[info["dtype"]]
            # frombuffer refuses an empty buffer, so a tensor with a zero in its shape is made empty directly
            t = torch.frombuffer(buf, dtype=dt) if buf else torch.empty(0, dtype=dt)
            out[name] = t.reshape(info["shape"])
    return out


def write_safetensors(path, tensors):
    """Write {name: tensor} as .safetensors (to a temp file, then renamed: a crash never leaves half a file).
    The header is padded with spaces to 8 bytes so every tensor starts aligned; "format": "pt" is what
    transformers checks for. tensors: {name: tensor} of any device, dtype in _ST_DTYPES, any layout (each is
    copied to the CPU and made contiguous); the order of the dict is the order of the data in the file."""
    names = {v: k for k, v in _ST_DTYPES.items()}  # torch dtype -> its header string
    items = [(k, t.detach().cpu().contiguous().reshape(-1)) for k, t in tensors.items()]
    header, off = {"__metadata__": {"format": "pt"}}, 0
    # the header records the original shape (full.shape); the data is the flattened tensor, offsets running on
    for (k, t), full in zip(items, tensors.values()):
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": names[t.dtype], "shape": list(full.shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _, t in items:  # the raw bytes in header order: a uint8 view of each tensor's memory, no conversion
            f.write(t.view(torch.uint8).numpy().tobytes())
    os.replace(path + ".tmp", path)


def read_hf_checkpoint(path):
    """(config dict, {name: tensor}) of a Hugging Face checkpoint directory: config.json plus model.safetensors,
    or the shards listed by model.safetensors.index.json ({"metadata": ..., "weight_map": {tensor name: shard
    file}}). The tensors of every shard land in one dict, under the names the checkpoint gives them, in the dtype
    stored (usually bf16 or fp32): renaming and splitting them is the caller's (molmo2_hf_names, init_llm_from_qwen3,
    init_vit_from_siglip). A missing file is a FileNotFoundError naming it."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(cfg_file) as f:
        cfg = json.load(f)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:  # many tensors share a shard: each file is read once
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    sd = {}
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{path}: shard {name} (listed in the index) is missing")
        sd.update(read_safetensors(os.path.join(path, name)))
    return cfg, sd


def molmo2_hf_names(c):
    """The one name map: {our parameter: (Molmo2's name, part)}. Molmo2's names are those of the released
    checkpoints (allenai/Molmo2-*), which transformers' Molmo2ForConditionalGeneration also writes. part is
    None, or k for the k-th block of rows of a tensor that Molmo2 stores as one and ours as several (the
    embedding: hf_part_sizes).
    Every matrix is a torch Linear weight (out, in) on both sides, so a tensor moves unchanged: only its name
    changes, and for a fused tensor the rows it takes. The three prefixes are Molmo2's three parts:
        model.vision_backbone.image_vit.   the ViT (SigLIP's layers under Molmo2's own names)
        model.vision_backbone.             the connector: image_pooling_2d (attention pooling), image_projector
        model.transformer.                 the LLM (OLMo-style names: att_proj, ff_proj, attn_norm, ln_f, wte)
    c: our ModelConfig; only the ViT blocks the model builds (vit_built) are listed, the count the export writes."""
    V, P, T = "model.vision_backbone.", "model.vision_backbone.image_vit.", "model.transformer."
    m = {"vit.pos_embed": P + "positional_embedding"}  # (P, W): one learned row per patch of a crop
    for wb in ("weight", "bias"):
        m[f"vit.patch_embed.{wb}"] = f"{P}patch_embedding.{wb}"  # Linear(p*p*3 -> W) on (py, px, rgb) patches
        for i in range(c.vit_built):  # each block: LayerNorms and Linears, all with biases
            for ours, hf in [("ln1", "attention_norm"), ("wq", "attention.wq"), ("wk", "attention.wk"),
                             ("wv", "attention.wv"), ("wo", "attention.wo"), ("ln2", "ffn_norm"),
                             ("fc1", "feed_forward.w1"), ("fc2", "feed_forward.w2")]:
                m[f"vit.blocks.{i}.{ours}.{wb}"] = f"{P}transformer.resblocks.{i}.{hf}.{wb}"
        for x in ("wq", "wk", "wv", "wo"):  # attention pooling (image_pooling_2d): mean-of-window query
            m[f"connector.{x}.{wb}"] = f"{V}image_pooling_2d.{x}.{wb}"
    for x in ("w1", "w2", "w3"):  # projector w2(silu(w1 x) * w3 x), no biases
        m[f"connector.{x}.weight"] = f"{V}image_projector.{x}.weight"
    m["llm.embed.weight"] = (T + "wte", 0)         # wte.embedding: the vocab rows
    m["llm.embed_extra.weight"] = (T + "wte", 1)   # wte.new_embedding: the 128 extra rows
    # The LLM. Ours fuses q/k/v and up/gate as Molmo2 does, in its row order ([q; k; v], [up; gate]): a rename
    for i in range(c.n_layer):
        b = f"{T}blocks.{i}."
        m.update({f"llm.blocks.{i}.input_layernorm.weight": b + "attn_norm.weight",
                  f"llm.blocks.{i}.attn.qkv_proj.weight": b + "self_attn.att_proj.weight",
                  f"llm.blocks.{i}.attn.q_norm.weight": b + "self_attn.q_norm.weight",
                  f"llm.blocks.{i}.attn.k_norm.weight": b + "self_attn.k_norm.weight",
                  f"llm.blocks.{i}.attn.o_proj.weight": b + "self_attn.attn_out.weight",
                  f"llm.blocks.{i}.post_attention_layernorm.weight": b + "ff_norm.weight",
                  f"llm.blocks.{i}.up_gate_proj.weight": b + "mlp.ff_proj.weight",
                  f"llm.blocks.{i}.down_proj.weight": b + "mlp.ff_out.weight"})
    m["llm.norm.weight"] = T + "ln_f.weight"
    if not c.tie_embeddings:
        m["llm.lm_head.weight"] = "lm_head.weight"  # base_vocab rows: the extra tokens are never predicted
    # every entry as (name, part): part None for a tensor stored whole
    return {k: v if isinstance(v, tuple) else (v, None) for k, v in m.items()}


def hf_part_sizes(c, hf_name):
    """Row counts of the blocks a fused Molmo2 tensor is made of, in storage order: tensor.split(sizes)[part]
    is one of ours, torch.cat of ours in this order is Molmo2's. The one such tensor is the embedding,
        wte (base_vocab + n_extra, d_model): the vocabulary rows, then the extra (vision token) rows
    (att_proj and ff_proj are fused in ours too, so they move whole)."""
    return [c.base_vocab, c.n_extra]


def named_tensors(model, sd, names, source):
    """{our parameter: sd[hf name] (or its part)} for each of our parameters listed in names; every listed
    tensor must exist with the right shape, else a ValueError naming it and the checkpoint. names: {our
    parameter: (checkpoint name, part)} as molmo2_hf_names gives it; sd: the checkpoint's tensors; source: the
    path named in errors. The tensors keep the checkpoint's dtype, and a part is a view of the fused tensor."""
    ours, out = model.state_dict(), {}
    for k, (hf, part) in names.items():
        if hf not in sd:
            raise ValueError(f"{source}: tensor {hf!r} (for {k}) is missing")
        t = sd[hf] if part is None else sd[hf].split(hf_part_sizes(model.c, hf))[part]
        if t.shape != ours[k].shape:
            raise ValueError(f"{source}: {hf!r} has shape {tuple(t.shape)}, {k} needs {tuple(ours[k].shape)}")
        out[k] = t
    return out


def join_rows(sd, joined, parts, source):
    """sd[joined] = the tensors named parts, concatenated by rows (and removed): separate checkpoint matrices
    made into one of our fused ones. A missing part is a ValueError naming it and the checkpoint."""
    for p in parts:
        if p not in sd:
            raise ValueError(f"{source}: tensor {p!r} is missing")
    sd[joined] = torch.cat([sd.pop(p) for p in parts])


def load_named(model, sd, names, source):
    """Copy the named tensors (named_tensors) into part of a model that is already built (init_llm, init_vit)."""
    model.load_state_dict(named_tensors(model, sd, names, source), strict=False)


def _get(d, *keys, default=None):
    """d[k] for the first of keys that d holds, else default: a value that transformers' Molmo2Config and the
    released checkpoints' config.json store under different names (image_size / image_default_input_size)."""
    for k in keys:
        if k in d:
            return d[k]
    return default


def _require(source, **facts):
    """Each fact is (value found, value needed): a mismatch is a ValueError naming the config key."""
    for key, (got, want) in facts.items():
        if got != want:
            raise ValueError(f"{source}: {key}={got!r} is not supported (nanoMolmo2 needs {want!r})")


def molmo2_config_from_hf(cfg, source="config.json"):
    """A transformers Molmo2Config dict (or a released checkpoint's config.json, with its legacy key names)
    -> (ModelConfig kwargs, {special token: id}). What this model does not implement is an error, not a guess.
    Where the two spell a key differently both are read (_get), transformers' name first; a missing key takes
    the released Molmo2-8B value (ViT 1152 wide, 16 heads; LLM 4096 wide, 36 layers, 32 query / 8 kv heads)."""
    v, a, t = _get(cfg, "vision_config", "vit_config", default={}), cfg.get("adapter_config", {}), cfg["text_config"]
    size = _get(v, "image_size", "image_default_input_size", default=[378, 378])
    heads, W = v.get("num_attention_heads", 16), v.get("hidden_size", 1152)
    patch = _get(v, "patch_size", "image_patch_size", default=14)
    rope = t.get("rope_parameters") or {"rope_type": "default", "rope_theta": t.get("rope_theta", 1e6)}
    n_layer = t.get("num_hidden_layers", 36)
    # every setting the code below assumes, checked before any tensor is read: found value against the only one
    # the model implements
    _require(source, **{
        "vision_config.image_size (square crops)": (list(size), [size[0], size[0]]),
        "vision_config.head_dim": (v.get("head_dim", W // heads), W // heads),
        "vision_config.num_key_value_heads": (v.get("num_key_value_heads", heads), heads),
        "vision_config.hidden_act": (v.get("hidden_act", "gelu_pytorch_tanh"), "gelu_pytorch_tanh"),
        "vision_config.layer_norm_eps": (v.get("layer_norm_eps", 1e-6), 1e-6),
        "adapter_config.hidden_size": (a.get("hidden_size", 1152), W),
        "adapter_config.num_attention_heads": (a.get("num_attention_heads", 16), heads),
        "adapter_config.num_key_value_heads": (a.get("num_key_value_heads", 16), heads),
        "adapter_config.hidden_act": (a.get("hidden_act", "silu"), "silu"),
        "adapter_config.mlp_bias": (a.get("mlp_bias", False), False),
        "text_config.qk_norm_type": (t.get("qk_norm_type", "qwen3"), "qwen3"),   # per head (Qwen3), not OLMo's
        "text_config.norm_after": (t.get("norm_after", False), False),          # pre-norm, not OLMo3's post-norm
        "text_config.attention_bias": (_get(t, "attention_bias", "qkv_bias", default=False), False),
        "text_config.hidden_act": (t.get("hidden_act", "silu"), "silu"),
        "text_config.rope_parameters.rope_type": (rope.get("rope_type", "default"), "default"),
        "text_config.rope_scaling": (t.get("rope_scaling"), None),
        "text_config.rope_scaling_layers": (t.get("rope_scaling_layers") or list(range(n_layer)),
                                            list(range(n_layer)))})
    # ModelConfig's keys from the config's: ViT, connector (adapter_config), then the LLM (text_config)
    mc = dict(image_size=size[0], patch_size=patch, vit_width=W,
              vit_depth=v.get("num_hidden_layers", 25), vit_heads=heads, vit_mlp=v.get("intermediate_size", 4304),
              vit_layers=tuple(_get(a, "vision_feature_layer", "vit_layers", default=[24, 18])),
              # the image processor's settings (not in config.json): Molmo2's, where its crop has room for them
              max_crops=8 if size[0] // patch > 8 else 0,
              crop_margins=(4, 4), frame_tokens=cfg.get("use_frame_special_tokens", True),
              proj_ff=a.get("intermediate_size", 18944),
              base_vocab=t.get("vocab_size", 151936), n_extra=t.get("additional_vocab_size", 128),
              im_patch_id=cfg.get("image_patch_id", 151938), d_model=t.get("hidden_size", 4096), n_layer=n_layer,
              n_head=t.get("num_attention_heads", 32), n_kv_head=t.get("num_key_value_heads", 8),
              head_dim=t.get("head_dim", 128), d_ff=t.get("intermediate_size", 12288),
              rope_theta=float(rope["rope_theta"]), norm_eps=_get(t, "rms_norm_eps", "layer_norm_eps", default=1e-6),
              tie_embeddings=bool(_get(t, "tie_word_embeddings", default=cfg.get("tie_word_embeddings", False))))
    _require(source, **{"adapter_config.text_hidden_size": (a.get("text_hidden_size", mc["d_model"]), mc["d_model"])})
    ids = {k: cfg[k] for k in HF_TOKEN_KEYS if k in cfg}
    return mc, ids


# Molmo2Config's special-token ids and the data.Tokenizer attribute holding each
HF_TOKEN_KEYS = {"image_start_token_id": "im_start", "low_res_image_start_token_id": "low_res_im_start",
                 "image_end_token_id": "im_end", "image_patch_id": "im_patch", "frame_start_token_id": "frame_start",
                 "frame_end_token_id": "frame_end"}


def check_token_ids(ids, tok, source):
    """A Molmo2 checkpoint's special-token ids (HF_TOKEN_KEYS) against a tokenizer's: the data must put <im_patch>
    etc. where the checkpoint reads them. A mismatch is a ValueError naming both ids."""
    bad = {k: (ids[k], getattr(tok, a)) for k, a in HF_TOKEN_KEYS.items() if k in ids and ids[k] != getattr(tok, a)}
    if bad:
        raise ValueError(f"{source}: its config and the tokenizer {tok.name!r} disagree on {bad} (config id, "
                         f"tokenizer id); use the checkpoint's own tokenizer.json")


def load_hf_molmo2(path):
    """A Hugging Face Molmo2 checkpoint directory -> (Molmo2 model, {special token key: id}). The model is on
    the CPU in fp32 and holds the file's weights, every parameter of it (strict load): its architecture comes
    from config.json (molmo2_config_from_hf), its names from molmo2_hf_names. The ids are for check_token_ids."""
    cfg, sd = read_hf_checkpoint(path)
    mc, ids = molmo2_config_from_hf(cfg, os.path.join(path, "config.json"))
    with torch.device("meta"):  # shapes only: no memory, no init, for weights the file replaces whole
        model = Molmo2(ModelConfig(**mc))
    # the embedding: a released checkpoint stores one wte table; transformers writes wte.embedding (the vocab rows)
    # and wte.new_embedding (the extra rows). Joined here, the name map splits both the same way
    T = "model.transformer.wte."
    if T + "embedding" in sd:  # one table, split where the config says (transformers writes two equal halves)
        sd["model.transformer.wte"] = torch.cat([sd.pop(T + "embedding"), sd.pop(T + "new_embedding")])
    # the file's tensors become the parameters (fp32, as training keeps them): host memory stays about one copy
    state = {k: t.float() for k, t in named_tensors(model, sd, molmo2_hf_names(model.c), path).items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.llm.inv_freq = rope_inv_freq(model.c)  # the one buffer not in the file
    return model, ids


def export_hf_molmo2(model, path, token_ids):
    """Write our model as a Hugging Face Molmo2 checkpoint directory (config.json + model.safetensors) that
    transformers' Molmo2ForConditionalGeneration loads. token_ids: {HF_TOKEN_KEYS key: id} from our tokenizer.
    The image/video processors' settings (crops, pooling, frame rate) are not part of it.
    The inverse of load_hf_molmo2: each of ours goes to its Molmo2 name, the blocks of a fused tensor are
    concatenated in hf_part_sizes' order, and the tensors keep our dtype (fp32 from training)."""
    c = model.c
    os.makedirs(path, exist_ok=True)
    ours, fused = model.state_dict(), {}
    if c.tie_embeddings:  # written untied: transformers' Molmo2 head has the vocab rows only, its embedding 128 more
        fused["lm_head.weight"] = ours["llm.embed.weight"]
    # fused: {Molmo2 name: tensor, or a list of its blocks by part, filled as our parameters come}
    for k, (hf, part) in molmo2_hf_names(c).items():
        if part is None:
            fused[hf] = ours[k]
        else:
            fused.setdefault(hf, [None] * len(hf_part_sizes(c, hf)))[part] = ours[k]
    out = {k: torch.cat(v) if isinstance(v, list) else v for k, v in fused.items()}
    # wte written as transformers names it: the vocab rows and the extra rows as two tensors
    T = "model.transformer.wte"
    out[T + ".embedding"], out[T + ".new_embedding"] = out.pop(T).split([c.base_vocab, c.n_extra])
    write_safetensors(os.path.join(path, "model.safetensors"), out)
    # config.json in transformers' Molmo2Config key names (molmo2_config_from_hf reads it back); the ViT and the
    # pooling attention have no GQA (kv heads = heads)
    heads = c.vit_heads
    cfg = {"architectures": ["Molmo2ForConditionalGeneration"], "model_type": "molmo2",
           "tie_word_embeddings": False, "use_frame_special_tokens": c.frame_tokens, **token_ids,
           "vision_config": {"model_type": "molmo2_vision", "hidden_size": c.vit_width,
                             "intermediate_size": c.vit_mlp, "num_hidden_layers": c.vit_built,
                             "num_attention_heads": heads, "num_key_value_heads": heads,
                             "head_dim": c.vit_width // heads, "image_size": [c.image_size, c.image_size],
                             "patch_size": c.patch_size, "layer_norm_eps": 1e-6},
           # our negative layer indices count from vit_depth, which may exceed the blocks written
           "adapter_config": {"model_type": "molmo2_adapter",
                              "vision_feature_layer": [l + c.vit_depth if l < 0 else l for l in c.vit_layers],
                              "hidden_size": c.vit_width, "num_attention_heads": heads,
                              "num_key_value_heads": heads, "head_dim": c.vit_width // heads,
                              "intermediate_size": c.proj_ff or c.d_ff, "text_hidden_size": c.d_model},
           "text_config": {"model_type": "molmo2_text", "hidden_size": c.d_model, "num_hidden_layers": c.n_layer,
                           "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head,
                           "head_dim": c.head_dim, "intermediate_size": c.d_ff, "vocab_size": c.base_vocab,
                           "additional_vocab_size": c.n_extra, "rms_norm_eps": c.norm_eps,
                           "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
                           "tie_word_embeddings": False}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def init_llm_from_qwen3(model, path):
    """init_llm=PATH (stage 1): a Qwen3 checkpoint directory (Qwen3ForCausalLM) -> the LLM's weights. The extra
    vocabulary rows, the connector and the ViT keep their init. The config must describe the same decoder.
    Qwen3 stores q_proj (n_head*hd, d), k_proj and v_proj (n_kv_head*hd, d) under GQA, and the SwiGLU's gate_proj
    and up_proj (d_ff, d) as separate matrices; ours are fused, so each group is concatenated by rows ([q; k; v],
    [up; gate]: join_rows) and the rest is a rename: o_proj, per-head q_norm / k_norm (hd,), down_proj (d, d_ff).
    Qwen3 has no extra rows: embed_tokens is our vocab table."""
    cfg, sd = read_hf_checkpoint(path)
    c, src = model.c, os.path.join(path, "config.json")
    # newer transformers write rope_parameters, older ones rope_theta at the top level
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta")}
    g = cfg.get
    _require(src, model_type=(g("model_type"), "qwen3"), vocab_size=(g("vocab_size"), c.base_vocab),
             hidden_size=(g("hidden_size"), c.d_model), num_hidden_layers=(g("num_hidden_layers"), c.n_layer),
             num_attention_heads=(g("num_attention_heads"), c.n_head), head_dim=(g("head_dim"), c.head_dim),
             num_key_value_heads=(g("num_key_value_heads"), c.n_kv_head), attention_bias=(g("attention_bias"), False),
             intermediate_size=(g("intermediate_size"), c.d_ff), rope_theta=(float(rope["rope_theta"]), c.rope_theta),
             rope_type=(rope.get("rope_type", "default"), "default"), rope_scaling=(g("rope_scaling"), None),
             use_sliding_window=(g("use_sliding_window", False), False),
             tie_word_embeddings=(g("tie_word_embeddings", False), c.tie_embeddings))
    names = {"llm.embed.weight": "model.embed_tokens.weight", "llm.norm.weight": "model.norm.weight"}
    for i in range(c.n_layer):  # Qwen3's: ours under model.layers.{i}., with self_attn. for attn. and mlp. on the FFN
        L = f"model.layers.{i}."
        join_rows(sd, L + "self_attn.qkv_proj.weight", [L + f"self_attn.{x}_proj.weight" for x in "qkv"], path)
        join_rows(sd, L + "mlp.up_gate_proj.weight", [L + "mlp.up_proj.weight", L + "mlp.gate_proj.weight"], path)
        for ours in ("input_layernorm", "post_attention_layernorm", "attn.qkv_proj", "attn.o_proj", "attn.q_norm",
                     "attn.k_norm", "up_gate_proj", "down_proj"):
            # attn.o_proj -> self_attn.o_proj, down_proj -> mlp.down_proj, the norms as they are
            hf = "self_" + ours if ours.startswith("attn.") else "mlp." + ours if ours.endswith("_proj") else ours
            names[f"llm.blocks.{i}.{ours}.weight"] = f"{L}{hf}.weight"
    if not c.tie_embeddings:
        names["llm.lm_head.weight"] = "lm_head.weight"
    load_named(model, sd, {k: (v, None) for k, v in names.items()}, path)


def init_vit_from_siglip(model, path):
    """init_vit=PATH (stage 1): a SigLIP checkpoint directory (SiglipModel or SiglipVisionModel; the fixed-size
    SigLIP2 releases such as siglip2-so400m-patch14-384, Molmo2's ViT, use this layout) -> the ViT's weights.
    Its Conv2d patch embedding (W, 3, p, p) becomes our Linear over (py, px, rgb) patches; its position table is
    resized bicubically when our crop has a different patch grid (as transformers' interpolate_pos_encoding).
    SigLIP's encoder layer has our block's parts under other names (layer_norm1, self_attn.q_proj, mlp.fc1, ...),
    all Linears (out, in) with biases, q/k/v separate as ours: copied unchanged. Only the first vit_built layers
    are read; SigLIP's post_layernorm and pooling head are not used (Molmo2 reads inner layers' outputs)."""
    cfg, sd = read_hf_checkpoint(path)
    c, src = model.c, os.path.join(path, "config.json")
    v = cfg.get("vision_config", cfg)
    if cfg.get("model_type") not in ("siglip", "siglip_vision_model"):
        raise ValueError(f"{src}: model_type={cfg.get('model_type')!r} is not supported (nanoMolmo2 reads 'siglip' "
                         f"and 'siglip_vision_model' checkpoints; not SigLIP2's variable-size NaFlex ones)")
    _require(src, hidden_size=(v.get("hidden_size"), c.vit_width), patch_size=(v.get("patch_size"), c.patch_size),
             num_attention_heads=(v.get("num_attention_heads"), c.vit_heads),
             intermediate_size=(v.get("intermediate_size"), c.vit_mlp),
             hidden_act=(v.get("hidden_act", "gelu_pytorch_tanh"), "gelu_pytorch_tanh"),
             layer_norm_eps=(v.get("layer_norm_eps", 1e-6), 1e-6))
    if v.get("num_hidden_layers", 0) < c.vit_built:
        raise ValueError(f"{src}: num_hidden_layers={v.get('num_hidden_layers')}, the config needs {c.vit_built}")
    # SiglipModel stores the tower under vision_model. (beside text_model.); SiglipVisionModel may not
    sd = {k.removeprefix("vision_model."): t for k, t in sd.items()}
    E = "embeddings."
    for k in (E + "patch_embedding.weight", E + "position_embedding.weight"):
        if k not in sd:
            raise ValueError(f"{path}: tensor {k!r} is missing")
    # Conv2d (W, 3, p, p) -> (W, p, p, 3) -> (W, p*p*3): its input order becomes (py, px, rgb), model.patchify's
    W, p = c.vit_width, c.patch_size
    sd["patch_embed"] = sd[E + "patch_embedding.weight"].permute(0, 2, 3, 1).reshape(W, p * p * 3)
    pos, g = sd[E + "position_embedding.weight"], c.image_size // p       # (n*n, W) -> (g*g, W)
    n = math.isqrt(pos.shape[0])
    if n != g:  # (n*n, W) as an n x n image of W channels, resampled to g x g, back to rows
        print(f"init_vit: position table resized from {n}x{n} to {g}x{g} patches (bicubic)")
        pos = F.interpolate(pos.float().reshape(1, n, n, W).permute(0, 3, 1, 2), size=(g, g), mode="bicubic",
                            align_corners=False).permute(0, 2, 3, 1).reshape(g * g, W).to(pos.dtype)
    sd["pos"] = pos
    # the two converted tensors under their own keys ("patch_embed", "pos"), the rest under SigLIP's names
    names = {"vit.patch_embed.weight": "patch_embed", "vit.patch_embed.bias": E + "patch_embedding.bias",
             "vit.pos_embed": "pos"}
    for i in range(c.vit_built):
        b = f"encoder.layers.{i}."
        for ours, hf in [("ln1", "layer_norm1"), ("wq", "self_attn.q_proj"), ("wk", "self_attn.k_proj"),
                         ("wv", "self_attn.v_proj"), ("wo", "self_attn.out_proj"), ("ln2", "layer_norm2"),
                         ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")]:
            for wb in ("weight", "bias"):
                names[f"vit.blocks.{i}.{ours}.{wb}"] = f"{b}{hf}.{wb}"
    load_named(model, sd, {k: (v, None) for k, v in names.items()}, path)


def export_checkpoint(ckpt_path, out_dir, trust=False):
    """A nanoMolmo2 ckpt.pt -> a Hugging Face Molmo2 directory, with the special-token ids of its tokenizer.
    The file is read as data only (checkpoint.load_checkpoint) unless trust=True. The checkpoint carries its
    ModelConfig and its tokenizer's settings, so nothing else is needed; returns (model, tokenizer)."""
    import data
    from checkpoint import load_checkpoint
    ckpt = load_checkpoint(ckpt_path, trust=trust)
    model = Molmo2(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    tok = data.Tokenizer(**ckpt["tokenizer"])
    export_hf_molmo2(model, out_dir, {k: getattr(tok, attr) for k, attr in HF_TOKEN_KEYS.items()})
    return model, tok


if __name__ == "__main__":
    # python hf.py out/shapes_stage1/ckpt.pt out/hf_shapes  ->  Molmo2ForConditionalGeneration.from_pretrained
    import argparse
    ap = argparse.ArgumentParser(description="Export a nanoMolmo2 checkpoint as a Hugging Face Molmo2 directory "
                                             "(config.json + model.safetensors) that transformers loads.")
    ap.add_argument("ckpt", help="a ckpt.pt written by train.py")
    ap.add_argument("out_dir", help="the directory to write")
    ap.add_argument("--trust_checkpoint", action="store_true",
                    help="read the file with the full unpickler, which can run code: only for a file you made")
    a = ap.parse_args()
    from checkpoint import CheckpointError
    try:
        export_checkpoint(a.ckpt, a.out_dir, a.trust_checkpoint)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {a.out_dir}/config.json and model.safetensors")

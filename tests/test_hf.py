"""Hugging Face checkpoints (model.py): a Molmo2 checkpoint written by transformers loads into nanoMolmo2 and
gives transformers' logits on image and video inputs; our export loads back into transformers; Qwen3 and
SigLIP checkpoints initialise the LLM and the ViT. transformers is a test-only dependency: it is the reference
implementation these tests compare against, never imported by the code itself."""
import json
import os

import pytest
import safetensors.torch
import torch
import transformers

import hf as H
import tiny_hf  # tiny Qwen3 / SigLIP checkpoints and a tokenizer.json
from bench import randomise  # wide random weights: logits that vary, so a wrong weight shows
import model as M

VOCAB, PATCH, IMG = 100, 7, 28                     # tiny: 28 px crops of 4x4 patches
IDS = dict(image_start_token_id=100, image_end_token_id=101, image_patch_id=102, low_res_image_start_token_id=104,
           frame_start_token_id=107, frame_end_token_id=108)
COL = 103                                          # <im_col>
VISION_IDS = [100, 101, 102, 103, 104, 107, 108]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, image_size=[IMG, IMG], patch_size=PATCH),
        adapter_config=dict(vision_feature_layer=[-1, -3], hidden_size=32, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=8, intermediate_size=48, text_hidden_size=40),
        text_config=dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=VOCAB, additional_vocab_size=12, num_hidden_layers=2, intermediate_size=72,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0)), **IDS)
    torch.manual_seed(0)
    hf = transformers.Molmo2ForConditionalGeneration(cfg)
    randomise(hf, 1)
    d = str(tmp_path_factory.mktemp("hf_molmo2"))
    hf.save_pretrained(d)
    return d


def image_inputs():
    """One image: a global crop (2x2 pooled tokens) and one high-res crop (3 rows x 2 tokens + <im_col>,
    windows with padded slots), between text. pixels (2, 3, 28, 28); pool (10, 4) into the 32 patches."""
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, IMG, IMG, generator=g)
    glob = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    hi = torch.tensor([[16, 17, -1, -1], [18, 19, 20, -1], [21, 22, 25, 26], [23, 27, -1, -1],
                       [28, 29, 30, 31], [24, -1, -1, -1]])
    ids = [5, 17, 33] + [104] + [102] * 4 + [101] + [100] + ([102] * 2 + [COL]) * 3 + [101] + [9, 60, 2, 71]
    return ids, pixels, torch.cat([glob, hi]), torch.tensor([[2, 2, 3, 2]])


def video_inputs():
    """Three frames, 3x3 pooling of each 4x4 patch grid to 2x2 tokens (windows cut by the grid's edge carry -1
    slots), frames wrapped in <frame_start> ... <frame_end> after a timestamp-like text token."""
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, IMG, IMG, generator=g)
    pool = []
    for f in range(3):
        for r0, c0 in [(0, 0), (0, 3), (3, 0), (3, 3)]:
            pool.append([f * 16 + r * 4 + c if r < 4 and c < 4 else -1  # the grid padded to 6x6
                         for r in range(r0, r0 + 3) for c in range(c0, c0 + 3)])
    ids = [7, 3]
    for f in range(3):
        ids += [40 + f, 107] + [102] * 4 + [108]
    ids += [11, 12, 13]
    return ids, pixels, torch.tensor(pool), torch.tensor([[3, 2, 2]])


def ours_logits(model, ids, pixels, pool):
    batch = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.bool),
                 pixel_values=pixels[None], image_mask=torch.ones(1, len(pixels), dtype=torch.bool), pool_idx=pool)
    with torch.no_grad():
        return model.eval().logits(batch)[0]


def hf_logits(hf, ids, pixels, pool, grids, video, vision_ids=VISION_IDS):
    x = torch.tensor([ids])
    patches = patchify(pixels)
    kw = (dict(pixel_values_videos=patches, video_token_pooling=pool, video_grids=grids) if video else
          dict(pixel_values=patches, image_token_pooling=pool, image_grids=grids))
    with torch.no_grad():
        return hf.eval()(input_ids=x, attention_mask=torch.ones_like(x),
                         mm_token_type_ids=torch.isin(x, torch.tensor(vision_ids)).long(), **kw).logits[0]


def patchify(pixels):  # transformers' Molmo2 takes crops already cut into patches, as our ViT cuts them
    return M.patchify(pixels, PATCH)


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_hf_molmo2_loads_and_matches_transformers(hf_dir, video, tmp_path):
    hf = transformers.Molmo2ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    ours, ids_found = H.load_hf_molmo2(hf_dir)
    assert ids_found == IDS  # built on the meta device, every tensor now the file's (or the RoPE table)
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    ids, pixels, pool, grids = video_inputs() if video else image_inputs()
    ref = hf_logits(hf, ids, pixels, pool, grids, video)
    got = ours_logits(ours, ids, pixels, pool)
    assert got.shape == ref.shape == (len(ids), VOCAB)
    assert ref.std() > 0.5  # logits that vary: a wrong weight or mask shows
    assert (got - ref).abs().max() < 1e-4
    ours.c.bidir_vision = False  # the comparison sees the mask: causal-only vision tokens are far off
    assert (ours_logits(ours, ids, pixels, pool) - ref).abs().max() > 0.1
    ours.c.bidir_vision = True
    # export -> transformers: the same logits again
    H.export_hf_molmo2(ours, str(tmp_path), IDS)
    back = transformers.Molmo2ForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert (hf_logits(back, ids, pixels, pool, grids, video) - ref).abs().max() < 1e-4


def tiny_config(**kw):
    base = dict(image_size=IMG, patch_size=PATCH, vit_width=32, vit_depth=3, vit_heads=4, vit_mlp=64,
                vit_layers=(-1, -3), base_vocab=VOCAB, n_extra=12, im_patch_id=102, d_model=40, n_layer=2,
                n_head=4, n_kv_head=2, head_dim=16, d_ff=72, rope_theta=10000.0)
    return M.ModelConfig(**{**base, **kw})


def test_init_llm_from_qwen3_matches_transformers(tmp_path):
    qwen = tiny_hf.qwen3(dict(base_vocab=VOCAB, d_model=40, d_ff=72, n_layer=2, n_head=4, n_kv_head=2, head_dim=16,
                              rope_theta=10000.0))
    randomise(qwen, 4)
    qwen.save_pretrained(str(tmp_path))
    model = M.Molmo2(tiny_config())
    H.init_llm_from_qwen3(model, str(tmp_path))
    ids = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]
    with torch.no_grad():
        ref = qwen.eval()(input_ids=torch.tensor([ids])).logits[0]
    got = ours_logits(model, ids, torch.zeros(0, 3, IMG, IMG), None)
    assert ref.std() > 0.5 and (got - ref).abs().max() < 1e-4
    with pytest.raises(ValueError, match="num_hidden_layers=2 is not supported"):
        H.init_llm_from_qwen3(M.Molmo2(tiny_config(n_layer=3)), str(tmp_path))


@pytest.mark.parametrize("size", [IMG, 42], ids=["same-grid", "resized-grid"])
def test_init_vit_from_siglip_matches_transformers(tmp_path, size):
    siglip = tiny_hf.siglip(dict(vit_width=32, vit_mlp=64, vit_depth=3, vit_heads=4, image_size=IMG, patch_size=PATCH))
    randomise(siglip, 5)
    siglip.save_pretrained(str(tmp_path))
    model = M.Molmo2(tiny_config(image_size=size))
    H.init_vit_from_siglip(model, str(tmp_path))
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hs = siglip.eval()(pixel_values=pixels, output_hidden_states=True, interpolate_pos_encoding=size != IMG)
        ref = torch.cat([hs.hidden_states[-1], hs.hidden_states[-3]], -1)  # vit_layers (-1, -3)
        got = model.vit(pixels)
    assert ref.std() > 0.5 and (got - ref).abs().max() < 1e-4
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"siglip_vision_model"', '"siglip2_vision_model"'))
    with pytest.raises(ValueError, match="model_type='siglip2_vision_model' is not supported .* NaFlex"):
        H.init_vit_from_siglip(model, str(tmp_path))


def test_train_starts_from_hf_checkpoints(tok, tmp_path):
    """train.py: init_llm / init_vit put Qwen3 and SigLIP weights into a model built from scratch (checked in
    the saved checkpoint after a step at lr 0); init_from=<Molmo2 directory> trains from its weights; its
    special-token ids must be the tokenizer's; missing paths fail before anything is built."""
    import train
    from conftest import TINY
    from test_train import run_args
    qwen = tiny_hf.qwen3(dict(TINY, base_vocab=tok.base_vocab), tmp_path / "qwen3")
    siglip = tiny_hf.siglip(TINY, tmp_path / "siglip")
    train.main(run_args(tmp_path / "run", max_steps=1, lr=0.0) +
               [f"--init_llm={tmp_path / 'qwen3'}", f"--init_vit={tmp_path / 'siglip'}"])
    sd = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["model"]
    att = qwen.model.layers[1].self_attn  # joined by rows into our fused q/k/v matrix
    assert torch.equal(sd["llm.blocks.1.attn.qkv_proj.weight"],
                       torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    assert torch.equal(sd["vit.blocks.0.fc2.bias"], siglip.encoder.layers[0].mlp.fc2.bias)
    with pytest.raises(SystemExit, match=r"init_vit='nowhere' \(a SigLIP checkpoint directory\)"):
        train.main(run_args(tmp_path / "x", max_steps=1) + ["--init_vit=nowhere"])
    with pytest.raises(SystemExit, match="init_llm initialises a model built from scratch; init_from='resume'"):
        train.main(run_args(tmp_path / "run", max_steps=2, init_from="resume") + [f"--init_llm={tmp_path / 'qwen3'}"])

    ids = dict(image_start_token_id=tok.im_start, image_end_token_id=tok.im_end, image_patch_id=tok.im_patch,
               low_res_image_start_token_id=tok.low_res_im_start, frame_start_token_id=tok.frame_start,
               frame_end_token_id=tok.frame_end)

    def molmo2(path, **change):
        heads, W = TINY["vit_heads"], TINY["vit_width"]
        cfg = transformers.Molmo2Config(
            vision_config=dict(hidden_size=W, intermediate_size=TINY["vit_mlp"], num_hidden_layers=TINY["vit_depth"],
                               num_attention_heads=heads, num_key_value_heads=heads, head_dim=W // heads,
                               image_size=[TINY["image_size"]] * 2, patch_size=TINY["patch_size"]),
            adapter_config=dict(vision_feature_layer=list(TINY["vit_layers"]), hidden_size=W, num_attention_heads=heads,
                                num_key_value_heads=heads, head_dim=W // heads, intermediate_size=TINY["d_ff"],
                                text_hidden_size=TINY["d_model"]),
            text_config=dict(hidden_size=TINY["d_model"], num_attention_heads=TINY["n_head"],
                             num_key_value_heads=TINY["n_kv_head"], head_dim=TINY["head_dim"],
                             vocab_size=tok.base_vocab, additional_vocab_size=tok.n_extra,
                             num_hidden_layers=TINY["n_layer"], intermediate_size=TINY["d_ff"]), **{**ids, **change})
        transformers.Molmo2ForConditionalGeneration(cfg).save_pretrained(str(path))
        return str(path)
    res = train.main(run_args(tmp_path / "ft", max_steps=2) + [f"--init_from={molmo2(tmp_path / 'm2')}"])
    assert len(res["losses"]) == 2 and all(x == x for x in res["losses"])
    with pytest.raises(ValueError, match=f"init_from=.*bad: its config and the tokenizer 'shapes-bpe' disagree on "
                                         f"{{'image_patch_id': \\({tok.im_patch + 1}, {tok.im_patch}\\)}}"):
        train.main(run_args(tmp_path / "ft2", max_steps=1) +
                   [f"--init_from={molmo2(tmp_path / 'bad', image_patch_id=tok.im_patch + 1)}"])


def test_hf_checkpoint_errors(hf_dir, tmp_path):
    """A directory without config.json or weights, a missing or misshapen tensor, a truncated safetensors
    file, an architecture this model does not implement: each a clear error naming the file, tensor or key."""
    import shutil
    with pytest.raises(FileNotFoundError, match="no config.json"):
        H.load_hf_molmo2(str(tmp_path))
    d = tmp_path / "c"
    shutil.copytree(hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    sd = H.read_safetensors(str(d / "model.safetensors"))
    name = "model.transformer.blocks.1.mlp.ff_out.weight"
    H.write_safetensors(str(d / "model.safetensors"), {k: v for k, v in sd.items() if k != name})
    with pytest.raises(ValueError, match=f"tensor '{name}' .* is missing"):
        H.load_hf_molmo2(str(d))
    H.write_safetensors(str(d / "model.safetensors"), {**sd, name: sd[name][:, :-1]})
    with pytest.raises(ValueError, match=f"'{name}' has shape"):
        H.load_hf_molmo2(str(d))
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="is truncated"):
        H.load_hf_molmo2(str(d))
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        H.load_hf_molmo2(str(d))
    shutil.copy(os.path.join(hf_dir, "model.safetensors"), d)
    (d / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], "qk_norm_type": "olmo"}}))
    with pytest.raises(ValueError, match="qk_norm_type='olmo' is not supported"):
        H.load_hf_molmo2(str(d))


def test_safetensors_round_trip(tmp_path):
    """Our writer and reader agree with each other and with the safetensors package, for every dtype used."""
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
          "c": torch.arange(6).reshape(2, 3), "d": torch.tensor(2.5, dtype=torch.float16), "e": torch.zeros(0, 4)}
    H.write_safetensors(str(tmp_path / "ours.st"), ts)
    for got in (H.read_safetensors(str(tmp_path / "ours.st")), safetensors.torch.load_file(str(tmp_path / "ours.st"))):
        assert set(got) == set(ts) and all(got[k].dtype == ts[k].dtype and torch.equal(got[k], ts[k]) for k in ts)
    safetensors.torch.save_file(ts, str(tmp_path / "theirs.st"))
    got = H.read_safetensors(str(tmp_path / "theirs.st"))
    assert all(torch.equal(got[k], ts[k]) for k in ts)


@pytest.mark.parametrize("max_crops", [0, 4], ids=["one-crop", "multi-crop"])
def test_trained_checkpoint_exports_to_transformers(tok, cfg, tmp_path, max_crops):
    """A train.py checkpoint (shapes tokenizer, our token layout, a padded batch of three examples; images as
    one crop, or as Molmo2's multi-crop of a 50 x 90 image with tied embeddings, as Qwen3-0.6B has) exported
    with `python hf.py CKPT DIR` gives the same logits in transformers at every real position."""
    import dataclasses
    import subprocess
    import sys
    import data
    import shapes
    cfg = dataclasses.replace(cfg, max_crops=max_crops, crop_margins=(1, 1), tie_embeddings=bool(max_crops))
    torch.manual_seed(0)
    ours = M.Molmo2(cfg)
    randomise(ours, 7)
    torch.save(dict(model=ours.state_dict(), model_config=vars(cfg), tokenizer=tok.state()), tmp_path / "ckpt.pt")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "hf.py"), str(tmp_path / "ckpt.pt"), str(tmp_path / "hf")],
                   check=True, capture_output=True)
    exs = [shapes.make_example(t, s, cfg.image_size) for t, s in (("point", 1), ("caption", 2), ("text", 3))]
    if max_crops:
        exs[1]["image"] = exs[1]["image"].resize((90, 50))
    b = data.collate([data.encode_example(ex, tok, cfg, {ex["task"]: 1.0}) for ex in exs], tok.pad, 10 ** 6)
    with torch.no_grad():
        ref = ours.eval().logits(b)
    hf = transformers.Molmo2ForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ids, n_tok = b["input_ids"], len(b["pool_idx"])
    with torch.no_grad():  # image_grids only splits the features per image, and they are joined again: one split
        got = hf.eval()(input_ids=ids, attention_mask=b["attention_mask"].long(),
                        pixel_values=M.patchify(data.normalize_pixels(b["pixel_values"][b["image_mask"]]),
                                                cfg.patch_size),
                        image_token_pooling=b["pool_idx"], image_grids=torch.tensor([[n_tok, 1, 0, 0]]),
                        mm_token_type_ids=(ids >= cfg.base_vocab).long()).logits
    real = b["attention_mask"]
    assert int(b["image_mask"].sum()) == (6 if max_crops else 2) and ref[real].std() > 0.5
    assert (got[real] - ref[real]).abs().max() < 1e-4


def molmo2_processor_code():
    """transformers' Molmo2 image-processing code, run without torchvision: its module imports torchvision (not
    installed here: no wheel for this torch), so its functions and the processor class's two crop methods are
    taken from the source file itself (ast) and compiled against torch. Resizing, the one torchvision call, is
    what torchvision does to a float tensor: F.interpolate, bilinear, no antialias."""
    import ast
    import importlib.util
    import itertools
    import math
    import types
    path = importlib.util.find_spec("transformers.models.molmo2").submodule_search_locations[0]
    tree = ast.parse(open(os.path.join(path, "image_processing_molmo2.py")).read())
    want = {"select_tiling", "compute_crop_geometry", "batch_pixels_to_patches", "arange_for_pooling",
            "resize_and_normalize_image", "build_resized_image", "_build_overlapping_crops",
            "_image_batch_to_patches_and_grids"}
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in want]
    assert {n.name for n in defs} == want  # the reference code is all there
    ns = dict(torch=torch, F=torch.nn.functional, itertools=itertools, math=math, PILImageResampling=object,
              TorchvisionBackend=object, SizeDict=types.SimpleNamespace)
    exec(compile(ast.Module(body=defs, type_ignores=[]), "image_processing_molmo2.py", "exec"), ns)
    backend = types.SimpleNamespace(
        resize=lambda image, size, resample, antialias: torch.nn.functional.interpolate(
            image, size=(size.height, size.width), mode="bilinear", align_corners=False, antialias=antialias),
        rescale_and_normalize=lambda im, rescale, factor, normalize, mean, std:
            (im * factor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    backend._build_overlapping_crops = lambda *a, **k: ns["_build_overlapping_crops"](backend, *a, **k)
    return lambda images: ns["_image_batch_to_patches_and_grids"](
        backend, images, max_crops=8, overlap_margins=[4, 4], crop_size=378, resample=None, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, image_patch_size=14,
        image_pooling_w=2, image_pooling_h=2)


@pytest.mark.parametrize("hw", [(378, 378), (500, 1000), (480, 640), (1000, 500), (112, 300), (60, 900)])
def test_multicrop_pixels_match_the_transformers_processor(hw):
    """data.multicrop_pixels and data.multicrop_tokens against transformers' Molmo2 image processing with
    Molmo2's settings (378 px crops, patch 14, 2x2 pooling, max_crops 8, margins 4): the same crops' pixels,
    the same pooling indices, as many <im_patch> tokens as pooled features."""
    import numpy as np
    from PIL import Image
    import data
    H, W = hw
    rgb = np.random.RandomState(H + W).randint(0, 256, (H, W, 3), dtype=np.uint8)
    crops, pool = data.multicrop_pixels(Image.fromarray(rgb))
    grid, patches, pooling = molmo2_processor_code()(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    assert torch.equal(torch.from_numpy(pool), pooling[0].long())
    assert (M.patchify(data.normalize_pixels(crops), 14) - patches[0]).abs().max() < 1e-6
    import shapes
    tok = shapes.tokenizer()
    ids, _ = data.multicrop_tokens(tok, H, W)
    assert len(pool) == int(grid[0, 0] * grid[0, 1] + grid[0, 2] * grid[0, 3]) == ids.count(tok.im_patch)


def test_released_layout_loads_like_transformers(tmp_path):
    """A checkpoint laid out as the released allenai/Molmo2-4B is: the legacy config.json (vit_config with
    image_default_input_size / image_patch_size / image_num_pos, adapter vit_layers counted from the end of a
    ViT whose file stops at the deepest block read, text_config with a flat rope_theta, qkv_bias, layer_norm_eps,
    rope_scaling null, use_frame_special_tokens false), weights in two shards with an index. Ours and
    transformers read it to the same logits; the frame tokens follow the config."""
    torch.manual_seed(0)
    src = M.Molmo2(M.ModelConfig(**{**vars(tiny_config()), "vit_depth": 7, "vit_layers": (-3, -5)}))
    randomise(src, 8)
    assert len(src.vit.blocks) == 5  # blocks 5 and 6 are never read: the file has no weights for them
    H.export_hf_molmo2(src, str(tmp_path), IDS)
    sd = H.read_safetensors(str(tmp_path / "model.safetensors"))
    os.remove(tmp_path / "model.safetensors")
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in shards.items():
        H.write_safetensors(str(tmp_path / f), {k: sd[k] for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    heads = dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8, hidden_size=32)
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Molmo2ForConditionalGeneration"], "model_type": "molmo2", "tie_word_embeddings": False,
        "use_frame_special_tokens": False, "image_col_id": COL, **IDS,
        "vit_config": {"model_type": "molmo2", **heads, "intermediate_size": 64, "num_hidden_layers": 7,
                       "image_default_input_size": [IMG, IMG], "image_patch_size": PATCH, "image_num_pos": 16,
                       "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6},
        "adapter_config": {"model_type": "molmo2", **heads, "vit_layers": [-3, -5], "hidden_act": "silu",
                           "intermediate_size": 72, "text_hidden_size": 40},
        "text_config": {"model_type": "molmo2_text", "hidden_size": 40, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "additional_vocab_size": 12,
                        "num_hidden_layers": 2, "intermediate_size": 72, "rope_theta": 10000.0, "rope_scaling": None,
                        "rope_scaling_layers": None, "qkv_bias": False, "layer_norm_eps": 1e-6,
                        "qk_norm_type": "qwen3", "norm_after": False, "hidden_act": "silu"}}))
    hf = transformers.Molmo2ForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32)
    ours, ids_found = H.load_hf_molmo2(str(tmp_path))
    assert ids_found == IDS and ours.c.frame_tokens is False and ours.c.vit_depth == 7
    ids, pixels, pool, grids = image_inputs()
    ref = hf_logits(hf, ids, pixels, pool, grids, False)
    assert ref.std() > 0.5 and (ours_logits(ours, ids, pixels, pool) - ref).abs().max() < 1e-4


def test_train_with_a_qwen_tokenizer_json_and_padded_vocab(tmp_path):
    """Qwen3 pads its embedding past its ids (151,936 rows for 151,669 ids): with base_vocab set in the config,
    the tokenizer.json's vision tokens go to the rows after base_vocab, where the model's extra rows are, and a
    short run trains; a base_vocab below the tokenizer's ids is a clear error."""
    import train
    from test_train import run_args
    hf = tiny_hf.qwen_tokenizer(tmp_path / "tokenizer.json")
    base = hf.get_vocab_size() + 12
    args = run_args(tmp_path / "run", max_steps=2, seq_len=1024) + [f"--tokenizer={tmp_path / 'tokenizer.json'}"]
    res = train.main(args + [f"--base_vocab={base}", "--n_extra=16"])
    assert len(res["losses"]) == 2 and all(x == x for x in res["losses"])
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert ckpt["model_config"]["im_patch_id"] == base and ckpt["model"]["llm.embed.weight"].shape[0] == base
    with pytest.raises(ValueError, match="do not fit base_vocab 100"):
        train.main(args + ["--base_vocab=100", "--n_extra=16"])


def test_sample_loads_a_molmo2_directory(tmp_path):
    """sample.py --ckpt DIR: a Molmo2 directory with its tokenizer.json (vision tokens at the ids its
    config.json names, after a padded base vocabulary) answers about an image, and greedy decoding follows
    transformers' argmax at the first answer token; ids that disagree are a clear error."""
    import sample
    from PIL import Image
    hf_tok = tiny_hf.qwen_tokenizer(tmp_path / "t.json")
    base = hf_tok.get_vocab_size() + 4
    vis = {"<im_start>": 0, "<im_end>": 1, "<im_patch>": 2, "<im_col>": 3, "<low_res_im_start>": 4,
           "<frame_start>": 7, "<frame_end>": 8}
    j = json.loads((tmp_path / "t.json").read_text())
    j["added_tokens"] += [dict(id=base + k, content=t, special=True, single_word=False, lstrip=False, rstrip=False,
                               normalized=False) for t, k in vis.items()]
    d = tmp_path / "m2"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(j))
    ids = dict(image_start_token_id=base, image_end_token_id=base + 1, image_patch_id=base + 2,
               low_res_image_start_token_id=base + 4, frame_start_token_id=base + 7, frame_end_token_id=base + 8)
    cfg = transformers.Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=4, head_dim=8, image_size=[IMG, IMG], patch_size=PATCH),
        adapter_config=dict(vision_feature_layer=[-1, -3], hidden_size=32, num_attention_heads=4,
                            num_key_value_heads=4, head_dim=8, intermediate_size=48, text_hidden_size=40),
        text_config=dict(hidden_size=40, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=base,
                         additional_vocab_size=16, num_hidden_layers=2, intermediate_size=72), **ids)
    hf = transformers.Molmo2ForConditionalGeneration(cfg)
    randomise(hf, 9)
    hf.save_pretrained(str(d))
    model, tok, mc = sample.load_model(str(d))
    assert (tok.im_patch, tok.base_vocab, mc.max_crops) == (base + 2, base, 0)  # 4 patches a side: one crop
    img = Image.fromarray((torch.rand(IMG, IMG, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
    assert isinstance(sample.answer(model, tok, mc, img, "What is it?", max_new_tokens=5), str)
    import data
    e = data.encode_example(dict(image=img, task="qa", turns=[("What is it?", "")]), tok, mc, {"qa": 1.0})
    prompt = e["input_ids"][:-1]  # ends at "assistant\n", as sample.answer builds it
    batch = data.collate([dict(e, input_ids=prompt, labels=e["labels"][:-1], loss_weights=e["loss_weights"][:-1])],
                         tok.pad, 10 ** 6, left_pad=True)
    ours = model.generate(batch, 1, stop_id=-1)[0][0]
    with torch.no_grad():
        px = data.normalize_pixels(torch.stack(e["images"]))
        ref = hf_logits(hf.eval(), prompt, px, torch.tensor(e["pool_idx"][0]),
                        torch.tensor([[2, 2, 0, 0]]), False, vision_ids=[base + k for k in vis.values()])[-1]
    assert ours == int(ref.argmax()) and ref.std() > 0.5
    (d / "config.json").write_text((d / "config.json").read_text().replace(f'"image_patch_id": {base + 2}',
                                                                          f'"image_patch_id": {base + 3}'))
    with pytest.raises(ValueError, match=rf"m2: its config and the tokenizer 'tokenizer.json' disagree on "
                                         rf"{{'image_patch_id': \({base + 3}, {base + 2}\)}}"):
        sample.load_model(str(d))

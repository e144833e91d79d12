"""
Ask a trained checkpoint about an image or a video and draw the points (or tracks) it answers with.

    python sample.py --ckpt out/shapes_stage1/ckpt.pt                      # a fresh held-out shapes scene
    python sample.py --ckpt out/shapes_stage1/ckpt.pt --image cat.jpg --prompt "Point to the cat"
    python sample.py ... --out answer.png --temperature 0.7
    python sample.py --ckpt out/shapes_stage2/ckpt.pt --video shapes        # a held-out shapes video, tracked
    python sample.py --ckpt out/shapes_stage2/ckpt.pt --video clip.mp4 --prompt "Track the dog."
    python sample.py --ckpt checkpoints/Molmo2-4B --image cat.jpg --prompt "Point to the cat"   # a released one

Prints the answer, parses Molmo2 html-v2 points from it and saves the image (scaled up) with the points drawn;
for a video, an animated GIF of the sampled frames with each frame's points drawn, one colour per track id.
"""
import argparse
import sys

import torch
from PIL import Image, ImageDraw


def load_model(path, device="cpu", trust=False):
    """Checkpoint -> (model, tokenizer, model config). A ckpt.pt rebuilds its tokenizer from its own ranks; a
    Hugging Face Molmo2 directory (a released allenai/Molmo2-* copied here) uses its tokenizer.json, whose vision
    token ids must be the ones its config.json names. A ckpt.pt is read as data only (checkpoint.load_checkpoint:
    a file that would run code is refused) unless trust=True. model.trained_len: the row length it was trained at
    (None when unknown)."""
    import os
    import data
    from checkpoint import CheckpointError, load_checkpoint
    from model import Molmo2, ModelConfig
    from hf import check_token_ids, load_hf_molmo2
    # a directory: a released Hugging Face Molmo2 (config.json + safetensors), mapped onto this model's names
    if os.path.isdir(path):
        model, ids = load_hf_molmo2(path)
        tok = data.build_tokenizer(os.path.join(path, "tokenizer.json"), base_vocab=model.c.base_vocab)
        check_token_ids(ids, tok, path)
        model.trained_len = None
        return model.to(device).eval(), tok, model.c
    # a train.py checkpoint: the tokenizer's whole state and the model config travel with the weights, so the
    # ids and the architecture are exactly the trained ones
    try:
        ckpt = load_checkpoint(path, trust=trust)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    tok = data.Tokenizer(**ckpt["tokenizer"])
    mc = ModelConfig(**ckpt["model_config"])
    model = Molmo2(mc)
    model.load_state_dict(ckpt["model"])
    model.trained_len = ckpt.get("config", {}).get("seq_len")
    return model.to(device).eval(), tok, mc


def answer(model, tok, mc, visual, prompt, max_new_tokens=128, temperature=0.0, seed=0):
    """visual: a PIL image, or an example dict holding image / images / video (data.encode_example).
    Returns the decoded answer text (without the closing <|im_end|>). temperature 0 answers greedily; above 0
    it samples, from a generator seeded by seed, so a sampled answer can be reproduced.

    The prompt is laid out exactly as in training (data.encode_example with an empty answer), then cut after
    "assistant\n", where the model's answer starts."""
    import data
    visual = visual if isinstance(visual, dict) else dict(image=visual)
    e = data.encode_example(dict(visual, task="qa", turns=[(prompt, "")]), tok, mc, {"qa": 1.0})
    # the three lists are aligned position by position, so they are cut together
    for k in ("input_ids", "labels", "loss_weights"):
        e[k] = e[k][:-1]  # end the prompt at "assistant\n"
    n, trained = len(e["input_ids"]), getattr(model, "trained_len", None)
    if trained and n > trained:  # positions past the trained length: RoPE extrapolates, answers degrade
        print(f"warning: the prompt is {n} tokens (vision tokens included), longer than the {trained}-token rows "
              f"this checkpoint was trained on", file=sys.stderr)
    # a batch of one, in the same batch dict that training uses: input_ids (1, T), pixel_values (1, F, 3, H, W)
    batch = data.collate([e], tok.pad, 10 ** 9, left_pad=True)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(batch, max_new_tokens, stop_id=tok.chat_end, temperature=temperature, generator=g)
    return tok.decode(out[0])


def draw(image, points, text, scale=None):
    """Image scaled up (small shapes scenes become visible), points as red-ringed dots, the answer underneath."""
    # nearest-neighbour upscaling to ~384 px keeps a 64 px scene's pixels crisp; 40 px below for the text
    scale = scale or max(1, 384 // max(image.size))
    W, H = image.size[0] * scale, image.size[1] * scale
    canvas = Image.new("RGB", (W, H + 40), "white")
    canvas.paste(image.resize((W, H), Image.NEAREST), (0, 0))
    d = ImageDraw.Draw(canvas)
    for x, y in points:  # x, y in 0-1000
        px, py = x / 1000 * W, y / 1000 * H
        d.ellipse([px - 6, py - 6, px + 6, py + 6], outline=(255, 0, 0), width=3)
        d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(0, 0, 0))
    # the answer in two lines of up to 110 characters (a long answer is cut: the terminal shows all of it)
    d.text((4, H + 4), text[:110], fill="black")
    d.text((4, H + 20), text[110:220], fill="black")
    return canvas


# one colour per track id (ids past six reuse them): the same object keeps its colour in every frame
TRACK_COLORS = [(255, 0, 0), (0, 90, 255), (0, 170, 0), (255, 140, 0), (170, 0, 200), (0, 0, 0)]


def draw_video(frames, times, parsed, text, path, scale=None):
    """An animated GIF: every sampled frame scaled up, the points answered for that time drawn in their track
    id's colour, the time and the answer underneath (2 fps, like the sampling)."""
    out = []
    # parsed holds (t, id, x, y) with x, y on 0-1000; each frame shows the points whose time is its own
    for f, t in zip(frames, times):
        pts = [(i, x, y) for ft, i, x, y in parsed if abs(ft - t) < 0.26]  # times are printed to 0.1 s
        im = draw(f, [], f"t = {t:.1f} s   " + text, scale)
        d = ImageDraw.Draw(im)
        W = H = im.size[0]
        for i, x, y in pts:
            px, py, c = x / 1000 * W, y / 1000 * H, TRACK_COLORS[(i - 1) % len(TRACK_COLORS)]
            d.ellipse([px - 7, py - 7, px + 7, py + 7], outline=c, width=3)
            d.text((px + 8, py - 8), str(i), fill=c)
        out.append(im)
    out[0].save(path, save_all=True, append_images=out[1:], duration=500, loop=0)


def main(argv=None):
    """The command line (module docstring). Returns (answer text, parsed points): [(x, y)] on 0-1000 for an
    image, [(t, id, x, y)] for a video."""
    import data
    import shapes
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="out/shapes_stage1/ckpt.pt")
    ap.add_argument("--image", default=None, help="image file; default: a held-out shapes scene")
    ap.add_argument("--video", default=None, help="video file (mp4, ...), or 'shapes' for a held-out shapes video")
    ap.add_argument("--max_frames", type=int, default=128, help="video: Molmo2 samples 2 fps up to this many frames")
    ap.add_argument("--prompt", default=None, help="default: the held-out scene's pointing question")
    ap.add_argument("--seed", type=int, default=7, help="which held-out scene (eval seed range)")
    ap.add_argument("--out", default=None, help="default: sample.png, or sample.gif for a video")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="default: 128, or 512 for a video (tracks are long)")
    ap.add_argument("--trust_checkpoint", action="store_true",
                    help="read --ckpt with the full unpickler, which can run code: only for a file you made")
    a = ap.parse_args(argv)
    if a.prompt is not None and not a.prompt.strip():
        ap.error("--prompt is empty: give a question, or leave --prompt out for the default one")
    # mc.image_size: shapes scenes are drawn at the size the checkpoint was trained on
    model, tok, mc = load_model(a.ckpt, trust=a.trust_checkpoint)
    if a.video:
        # a held-out shapes video and its own tracking question, or a file decoded at Molmo2's 2 fps frame times
        if a.video == "shapes":
            ex = shapes.make_example("track", a.seed, mc.image_size)
            frames, times, prompt = ex["video"]["frames"], ex["video"]["times"], a.prompt or ex["turns"][0][0]
        else:
            frames, times = data.load_video(a.video, a.max_frames)
            prompt = a.prompt or shapes.TRACK_PROMPT.format(label="objects")
        n = data.vision_token_counts(mc)["frame"]
        print(f"{len(frames)} frames at {mc.image_size} px: {n} LLM tokens each, + 4-7 for its time text")
        text = answer(model, tok, mc, dict(video=dict(frames=frames, times=times)), prompt, a.max_new_tokens or 512,
                      a.temperature, a.seed)
        # tracks come back as (t, id, x, y): drawn frame by frame, one colour per id
        parsed = data.parse_points(text)
        out = a.out or "sample.gif"
        print(f"prompt: {prompt}\nanswer: {text}\npoints (t, id, x, y on 0-1000): {parsed}")
        draw_video(frames, times, parsed, text, out)
        print(f"saved {out} ({len(frames)} frames)")
        return text, parsed
    # an image file with its question, or a held-out shapes scene (eval seeds, which training never draws)
    if a.image:
        image = data.load_image(a.image)
        prompt = a.prompt or shapes.POINT_PROMPT.format(label="objects")
    else:
        assert a.seed < shapes.TRAIN_SEED_OFFSET, "held-out scenes use seeds below TRAIN_SEED_OFFSET"
        ex = shapes.make_example("point", a.seed, mc.image_size)
        image, prompt = ex["image"], a.prompt or ex["turns"][0][0]
    text = answer(model, tok, mc, image, prompt, a.max_new_tokens or 128, a.temperature, a.seed)
    # a single image's points: drop the frame prefix (always 1) and the point ids
    points = [(x, y) for _, _, x, y in data.parse_points(text)]
    print(f"prompt: {prompt}\nanswer: {text}\npoints (0-1000): {points}")
    draw(image, points, text).save(a.out or "sample.png")
    print(f"saved {a.out or 'sample.png'}")
    return text, points


if __name__ == "__main__":
    main(sys.argv[1:])

"""
Ask a trained checkpoint about an image and draw the points it answers with.

    python sample.py --ckpt out/shapes_stage1/ckpt.pt                      # a fresh held-out shapes scene
    python sample.py --ckpt out/shapes_stage1/ckpt.pt --image cat.jpg --prompt "Point to the cat"
    python sample.py ... --out answer.png --temperature 0.7

Prints the answer, parses Molmo2 html-v2 points from it and saves the image (scaled up) with the points drawn.
"""
import argparse
import sys

import torch
from PIL import Image, ImageDraw


def load_model(path, device="cpu"):
    """Checkpoint -> (model, tokenizer, model config). The tokenizer is rebuilt from the checkpoint's own ranks."""
    import data
    from model import Molmo2, ModelConfig
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise SystemExit(f"checkpoint not found: {path}") from None
    tok = data.Tokenizer(**ckpt["tokenizer"])
    mc = ModelConfig(**ckpt["model_config"])
    model = Molmo2(mc)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tok, mc


def answer(model, tok, mc, image, prompt, max_new_tokens=128, temperature=0.0, seed=0):
    import data
    e = data.encode_example(dict(task="qa", image=image, turns=[(prompt, "")]), tok, mc, {"qa": 1.0})
    for k in ("input_ids", "labels", "loss_weights"):
        e[k] = e[k][:-1]  # end the prompt at "assistant\n"
    batch = data.collate([e], tok.pad, 10 ** 9, left_pad=True)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(batch, max_new_tokens, stop_id=tok.chat_end, temperature=temperature, generator=g)
    return tok.decode(out[0])


def draw(image, points, text, scale=None):
    """Image scaled up (small shapes scenes become visible), points as red-ringed dots, the answer underneath."""
    scale = scale or max(1, 384 // max(image.size))
    W, H = image.size[0] * scale, image.size[1] * scale
    canvas = Image.new("RGB", (W, H + 40), "white")
    canvas.paste(image.resize((W, H), Image.NEAREST), (0, 0))
    d = ImageDraw.Draw(canvas)
    for x, y in points:  # x, y in 0-1000
        px, py = x / 1000 * W, y / 1000 * H
        d.ellipse([px - 6, py - 6, px + 6, py + 6], outline=(255, 0, 0), width=3)
        d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=(0, 0, 0))
    d.text((4, H + 4), text[:110], fill="black")
    d.text((4, H + 20), text[110:220], fill="black")
    return canvas


def main(argv=None):
    import data
    import shapes
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="out/shapes_stage1/ckpt.pt")
    ap.add_argument("--image", default=None, help="image file; default: a held-out shapes scene")
    ap.add_argument("--prompt", default=None, help="default: the held-out scene's pointing question")
    ap.add_argument("--seed", type=int, default=7, help="which held-out scene (eval seed range)")
    ap.add_argument("--out", default="sample.png")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    a = ap.parse_args(argv)
    model, tok, mc = load_model(a.ckpt)
    if a.image:
        image = data.load_image(a.image)
        prompt = a.prompt or shapes.POINT_PROMPT.format(label="objects")
    else:
        assert a.seed < shapes.TRAIN_SEED_OFFSET, "held-out scenes use seeds below TRAIN_SEED_OFFSET"
        ex = shapes.make_example("point", a.seed, mc.image_size)
        image, prompt = ex["image"], a.prompt or ex["turns"][0][0]
    text = answer(model, tok, mc, image, prompt, a.max_new_tokens, a.temperature, a.seed)
    points = [(x, y) for _, _, x, y in data.parse_points(text)]
    print(f"prompt: {prompt}\nanswer: {text}\npoints (0-1000): {points}")
    draw(image, points, text).save(a.out)
    print(f"saved {a.out}")
    return text, points


if __name__ == "__main__":
    main(sys.argv[1:])

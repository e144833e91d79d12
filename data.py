"""
Data: text -> token ids, images -> pixels, examples -> the seed's batch fields.

    tokenizer     tiktoken only. Offline default: a small BPE trained here on shapes text (deterministic,
                  under a second), plus Molmo2's special tokens. A named tiktoken encoding (or a local
                  .tiktoken file) is used only if it is already on disk: nothing is fetched at run time.
    chat format   Qwen3 turns (molmo2_reference.md 1.3); BOS is <|im_end|>; the image goes right after BOS.
    images        Pillow, any mode -> RGB, stretched to image_size, scaled to [-1, 1] (mean = std = 0.5).
    image tokens  <im_start> + rows of (pooled <im_patch> tokens [+ <im_col>]) + <im_end>   (reference 1.6)
    points        Molmo2 html-v2: <points coords="1 1 453 612 2 501 600">dog</points>, ints 0-1000 (3.2)
    batch         input_ids [B,T], attention_mask [B,T], labels [B,T], loss_weights [B,T],
                  pixel_values [B,F,3,H,W], image_mask [B,F], pool_idx [N_tok, k]   (the seed's fields + pooling)
"""
import math
import os
import re
from collections import Counter
from functools import lru_cache

import numpy as np
import tiktoken
import torch
from PIL import Image, UnidentifiedImageError

# ----------------------------------------------------------------------------------------------------------
# Tokenizer

# Chat tokens live in the LLM's base vocabulary (the output head can emit <|im_end|> to stop).
CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Molmo2's image/video structure tokens (olmo/tokenizer.py). They are the "extra vocabulary rows"
# (additional_vocab_size): input embeddings only, never predicted, trained at the connector's LR.
VISION_TOKENS = ["<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<im_end>",
                 "<frame_start>", "<frame_end>", "<|image|>", "<|video|>"]
# Pre-tokenizer: GPT-4 style, but every digit is its own piece, so "453" is always 4|5|3: coordinates are
# predicted digit by digit (hundreds first = coarse position first), and no merge can glue digits together.
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
           r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
_ASCII_PRESPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)|[^\r\n A-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|\s+""")


def train_bpe(texts, n_merges):
    """Byte-level BPE (the GPT-2 recipe): start from the 256 bytes, repeatedly merge the most frequent
    adjacent pair inside pre-split words. Returns tiktoken's mergeable_ranks {bytes: rank}; a token's rank is
    its merge order, which is exactly how tiktoken applies merges (lowest rank first)."""
    words = Counter(w.encode() for t in texts for w in _ASCII_PRESPLIT.findall(t))
    ranks = {bytes([i]): i for i in range(256)}
    splits = {w: [w[i:i + 1] for i in range(len(w))] for w in words}
    for _ in range(n_merges):
        pairs = Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _n = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties broken by bytes: deterministic
        ranks[a + b] = len(ranks)
        for w, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return ranks


def shapes_corpus(n=300):
    """Text the shapes world produces (all tasks), used to train the offline BPE."""
    import shapes
    texts = []
    for task in ["caption", "qa", "point", "count", "text"]:
        for seed in range(n):
            ex = shapes.make_example(task, shapes.TRAIN_SEED_OFFSET + seed)
            texts += [t for turn in ex["turns"] for t in turn]
    return texts


class Tokenizer:
    """A tiktoken.Encoding plus Molmo2's special tokens. Ids: [0, n_ranks) BPE tokens, then the chat tokens
    (together: base_vocab, the rows of the LLM's embedding and output head), then the vision tokens
    (the extra rows). ranks/pat_str are stored in checkpoints so sampling uses the exact same tokenizer."""

    def __init__(self, ranks, pat_str=PAT_STR, name="shapes-bpe"):
        self.ranks, self.pat_str, self.name = ranks, pat_str, name
        n = max(ranks.values()) + 1
        specials = {t: n + i for i, t in enumerate(CHAT_TOKENS + VISION_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.base_vocab = n + len(CHAT_TOKENS)
        self.n_extra = len(VISION_TOKENS)
        names = dict(zip(CHAT_TOKENS + VISION_TOKENS,
                         ["endoftext", "chat_start", "chat_end", "im_patch", "im_col", "im_start",
                          "low_res_im_start", "im_end", "frame_start", "frame_end", "image", "video"]))
        for t, i in specials.items():  # self.im_patch, self.chat_end, ... (<|im_end|> vs <im_end> kept apart)
            setattr(self, names[t], i)
        self.bos = self.chat_end  # Molmo2/Qwen3: <|im_end|> doubles as BOS
        self.pad = self.endoftext
        self.vision_ids = [specials[t] for t in VISION_TOKENS]

    def encode(self, text, allow_special=False):
        return self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def state(self):
        return dict(name=self.name, pat_str=self.pat_str, ranks=self.ranks)


def build_tokenizer(name="shapes-bpe", n_merges=300):
    """'shapes-bpe' (offline default), a path to a .tiktoken file, or a tiktoken encoding name that is
    already in tiktoken's local cache. Nothing is downloaded: a missing encoding is a clear error."""
    if name == "shapes-bpe":
        return Tokenizer(train_bpe(shapes_corpus(), n_merges))
    if name.endswith(".tiktoken"):
        if not os.path.exists(name):
            raise FileNotFoundError(f"tokenizer file {name!r} not found")
        import base64  # read it directly: tiktoken's load_tiktoken_bpe caches by path and would keep
        with open(name, "rb") as f:  # serving a stale copy after the file is edited
            pairs = (line.split() for line in f.read().splitlines() if line)
            ranks = {base64.b64decode(t): int(r) for t, r in pairs}
        return Tokenizer(ranks, name=os.path.basename(name))
    import tiktoken.load

    def offline(path):
        raise FileNotFoundError(
            f"tiktoken encoding {name!r} is not in the local cache and nanoMolmo2 never downloads at run time. "
            f"Copy its .tiktoken file here and pass tokenizer='/path/{name}.tiktoken', or pre-populate "
            f"TIKTOKEN_CACHE_DIR on a machine with network (it wanted {path}).")
    real, tiktoken.load.read_file = tiktoken.load.read_file, offline
    try:
        enc = tiktoken.get_encoding(name)
    except ValueError as e:
        raise ValueError(f"unknown tokenizer {name!r}: use 'shapes-bpe', a .tiktoken path, or one of "
                         f"{tiktoken.list_encoding_names()}") from e
    finally:
        tiktoken.load.read_file = real
    return Tokenizer(enc._mergeable_ranks, pat_str=enc._pat_str, name=name)


# ----------------------------------------------------------------------------------------------------------
# Points: Molmo2 html-v2

def format_points(points, width, height, label, frame="1"):
    """points: [(x_px, y_px)] -> '<points coords="1 1 453 612 2 501 600">label</points>'.
    Coordinates become integers 0-1000 (x/W, y/H), zero-padded to 3 digits, sorted by (x, y); ids from 1.
    A single image's frame prefix is always 1 (molmo2_reference.md 3.2)."""
    scaled = sorted((min(1000, max(0, round(1000 * x / width))), min(1000, max(0, round(1000 * y / height))))
                    for x, y in points)
    coords = " ".join(f"{i} {x:03d} {y:03d}" for i, (x, y) in enumerate(scaled, 1))
    return f'<points coords="{frame} {coords}">{label}</points>'


# Molmo2's parsing regexes (reference 3.2): the tag, then frame groups, then (id, x, y) triples.
_TAG = re.compile(r'<(?:points|tracks).*? coords="([0-9\t:;, .]+)"/?>')
_FRAME = re.compile(r"(?:^|\t|:|,|;)([0-9\.]+) ([0-9\. ]+)")
_POINT = re.compile(r"([0-9]+) ([0-9]{3,4}) ([0-9]{3,4})")


def parse_points(text):
    """Model output -> [(frame, id, x, y)] with x, y on the 0-1000 scale. Never raises: whatever part of a
    malformed answer can be read is returned, the rest is ignored (a model mid-training writes anything)."""
    out = []
    if not isinstance(text, str):
        return out
    for coords in _TAG.findall(text):
        for frame, rest in _FRAME.findall(coords):
            try:
                f = float(frame)
            except ValueError:
                continue
            for pid, x, y in _POINT.findall(rest):
                x, y = int(x), int(y)
                if x <= 1000 and y <= 1000:
                    out.append((f, int(pid), x, y))
    return out


# ----------------------------------------------------------------------------------------------------------
# Images

def _to_rgb(im):
    """PIL's own I;16 -> RGB conversion clips at 255 (a 16-bit image comes out almost all white): rescale
    16-bit grey to 8 bits first."""
    if im.mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint32)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
    return im.convert("RGB")


def load_image(src):
    """A path or a PIL image -> PIL RGB. Any mode (L, P, RGBA, CMYK, I;16...) is converted. A missing or
    unreadable file is an error that names it."""
    if isinstance(src, Image.Image):
        return _to_rgb(src)
    try:
        with Image.open(src) as im:
            return _to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {src}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {src}: {e}") from None


def preprocess_image(img, size):
    """PIL -> float32 tensor (3, size, size) in [-1, 1]. Stretched, no aspect-preserving pad (Molmo2's
    siglip_resize_and_pad resizes to the square); x*2-1 is normalisation with mean = std = 0.5."""
    img = load_image(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x * 2 - 1


@lru_cache(maxsize=None)  # the same few grids every example: computed once, never mutated by callers
def pooling_index(gh, gw, ph, pw):
    """Molmo2's token_pooling for one crop (arange_for_pooling): the (gh, gw) patch grid is padded with -1 to a
    multiple of the window, split evenly (extra row/column at the bottom/right), and cut into (ph, pw)
    windows in row-major order. Returns int64 (n_tokens, ph*pw); -1 marks a padded slot."""
    idx = np.arange(gh * gw).reshape(gh, gw)
    H, W = ph * math.ceil(gh / ph), pw * math.ceil(gw / pw)
    top, left = (H - gh) // 2, (W - gw) // 2
    idx = np.pad(idx, ((top, H - gh - top), (left, W - gw - left)), constant_values=-1)
    idx = idx.reshape(H // ph, ph, W // pw, pw).transpose(0, 2, 1, 3).reshape(-1, ph * pw)
    idx.setflags(write=False)  # cached and shared: read-only
    return idx, H // ph, W // pw


def image_tokens(tok, rows, cols, col_tokens):
    """<im_start> + rows x (cols x <im_patch> [+ <im_col>]) + <im_end>. Each <im_patch> is a slot that the
    model fills with one pooled vision feature (added to the slot's embedding); <im_col> ends a row, which
    tells the LLM where rows break (Molmo2 uses column tokens on its high-res crops)."""
    row = [tok.im_patch] * cols + ([tok.im_col] if col_tokens else [])
    return [tok.im_start] + row * rows + [tok.im_end]


# ----------------------------------------------------------------------------------------------------------
# Examples -> token sequences

def encode_example(ex, tok, cfg, task_weights):
    """ex: dict(task, image (PIL, path or None), turns [(user, assistant), ...]).
    Returns dict(input_ids, labels, loss_weights (aligned with labels), images [(3,H,W)], pool_idx).

    Layout (Qwen3 chat turns, image right after BOS as Molmo2 does with no <|image|> placeholder):
      <|im_end|> [image tokens] <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|> ...
    Loss only on assistant tokens (the answer and its closing <|im_end|>), each weighted by the task's
    multiplier (seed: caption 1.0, QA 1.0, counting 1.5, pointing 2.0, tracking 2.0)."""
    if ex["task"] not in task_weights:
        raise KeyError(f"task {ex['task']!r} has no loss weight; task_weights has {sorted(task_weights)}")
    w = float(task_weights[ex["task"]])
    ids, wts = [tok.bos], [0.0]
    images, pool = [], []
    if ex.get("image") is not None:
        g = cfg.image_size // cfg.patch_size
        idx, rows, cols = pooling_index(g, g, cfg.pool_h, cfg.pool_w)
        images.append(preprocess_image(ex["image"], cfg.image_size))
        pool.append(idx)
        vis = image_tokens(tok, rows, cols, cfg.col_tokens)
        ids += vis
        wts += [0.0] * len(vis)
    for i, (q, a) in enumerate(ex["turns"]):
        prompt = ([tok.encode("\n")] if i else []) + [[tok.chat_start], tok.encode("user\n" + q),
                                                       [tok.chat_end], tok.encode("\n"), [tok.chat_start],
                                                       tok.encode("assistant\n")]
        for p in prompt:
            ids += p
            wts += [0.0] * len(p)
        ans = tok.encode(a) + [tok.chat_end]
        ids += ans
        wts += [w] * len(ans)
    # next-token targets: position t predicts ids[t+1]; weights move with their target token
    labels = ids[1:] + [-1]
    loss_w = wts[1:] + [0.0]
    return dict(input_ids=ids, labels=labels, loss_weights=loss_w, images=images, pool_idx=pool,
                n_patches=[(cfg.image_size // cfg.patch_size) ** 2] * len(images), task=ex["task"])


def collate(encoded, pad_id, seq_len, left_pad=False):
    """List of encode_example outputs -> batch dict of tensors, padded to the longest row: on the right for
    training, on the left for generation (every prompt then ends in the last column).

    pool_idx is global: row j lists the flat patch indices (into all valid images of the batch, P patches
    each, in example order) pooled into the j-th <im_patch> slot of the batch in row-major order."""
    B = len(encoded)
    T = max(len(e["input_ids"]) for e in encoded)
    if T > seq_len:
        bad = max(range(B), key=lambda b: len(encoded[b]["input_ids"]))
        raise ValueError(f"example {bad} ({encoded[bad]['task']}) has {T} tokens > seq_len={seq_len}")
    F = max(len(e["images"]) for e in encoded)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -1, dtype=torch.long)
    loss_w = torch.zeros(B, T)
    attn = torch.zeros(B, T, dtype=torch.bool)
    shape = next(e["images"][0].shape for e in encoded if e["images"]) if F else (3, 1, 1)
    pixel_values = torch.zeros(B, F, *shape)
    image_mask = torch.zeros(B, F, dtype=torch.bool)
    pool, offset = [], 0
    for b, e in enumerate(encoded):
        n = len(e["input_ids"])
        cols = slice(T - n, T) if left_pad else slice(0, n)
        input_ids[b, cols] = torch.tensor(e["input_ids"])
        labels[b, cols] = torch.tensor(e["labels"])
        loss_w[b, cols] = torch.tensor(e["loss_weights"])
        attn[b, cols] = True
        for f, (img, idx, n_patches) in enumerate(zip(e["images"], e["pool_idx"], e["n_patches"])):
            pixel_values[b, f] = img
            image_mask[b, f] = True
            pool.append(np.where(idx >= 0, idx + offset, -1))  # local patch index -> index in the batch
            offset += n_patches
    k = pool[0].shape[1] if pool else 1
    pool_idx = torch.from_numpy(np.concatenate(pool)) if pool else torch.zeros(0, k, dtype=torch.long)
    return dict(input_ids=input_ids, attention_mask=attn, labels=labels, loss_weights=loss_w,
                pixel_values=pixel_values, image_mask=image_mask, pool_idx=pool_idx)

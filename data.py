"""
Data: text -> token ids, images -> pixels, examples -> the batch fields every stage trains on.

    tokenizer     tiktoken only. Offline default: a small BPE trained here on shapes text (deterministic,
                  under a second), plus Molmo2's special tokens. A named tiktoken encoding (or a local
                  .tiktoken file) is used only if it is already on disk: nothing is fetched at run time.
    chat format   Qwen3 turns; BOS is <|im_end|>; the image goes right after BOS (docs/molmo2.md, Architecture).
    images        Pillow, any mode -> RGB, stretched to image_size, kept as uint8 bytes; the model scales them to
                  [-1, 1] (mean = std = 0.5) on its device.
    image tokens  <im_start> + rows of (pooled <im_patch> tokens [+ <im_col>]) + <im_end>; what an image
                  and a frame cost per config: image_block, visual_tokens (docs/molmo2.md, Token layout)
    video         PyAV, Molmo2's frame times (2 fps + last frame, or max_frames uniformly), true timestamps;
                  per frame "{t:.1f} " <frame_start> pooled <im_patch> tokens <frame_end>; then subtitles
    points        Molmo2 html-v2: <points coords="1 1 453 612 2 501 600">dog</points>, ints 0-1000
                  (docs/molmo2.md, Prompts and points)
    packing       several examples per row, best-fit over a small buffer (docs/molmo2.md, Stages); each row
                  keeps its examples apart with doc_ids and restarted position_ids
    batch         input_ids [B,T], attention_mask [B,T], labels [B,T], loss_weights [B,T],
                  pixel_values [B,F,3,H,W] uint8, image_mask [B,F], timestamps [B,F]  (docs/molmo2.md, Stages)
                  + doc_ids [B,T], position_ids [B,T], pool_idx [N_tok, k] (packing, pooling)

The path of one example: encode_example (turns -> ids, labels, loss weights; visual_tokens -> the pixels and
their token layout) -> Packer (whole examples into rows) -> collate (rows -> the padded batch dict of tensors)
-> model.Molmo2. Readers at the end turn local copies of the real datasets into the same example dicts that
shapes.make_example returns, so everything after them is shared by the shapes world and real data.
"""
import bisect
import itertools
import math
import os
import re
import unicodedata
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
# The Tokenizer attribute that holds each special token's id: tok.im_patch, tok.chat_end, ... (<|im_end|>, the chat
# turn's end, and <im_end>, an image's end, kept apart)
TOKEN_ATTRS = dict(zip(CHAT_TOKENS + VISION_TOKENS,
                       ["endoftext", "chat_start", "chat_end", "im_patch", "im_col", "im_start", "low_res_im_start",
                        "im_end", "frame_start", "frame_end", "image", "video"]))
# Pre-tokenizer: GPT-4 style, but every digit is its own piece, so "453" is always 4|5|3: coordinates are
# predicted digit by digit (hundreds first = coarse position first), and no merge can glue digits together.
PAT_STR = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
           r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# The same split for ASCII text in Python's re (no \p{L}), used to train the BPE. It must cut where PAT_STR
# cuts: a word keeps its leading space (" the" is one piece, so one token), else every word costs a second
# token for its space (shapes text would be ~30% longer).
_ASCII_PRESPLIT = re.compile(r"""'(?:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]| ?[^\sA-Za-z0-9]+[\r\n]*|\s+""")


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


class Tokenizer:
    """A tiktoken.Encoding plus Molmo2's special tokens. Ids: [0, n_ranks) BPE tokens, then the chat tokens
    (together: base_vocab, the rows of the LLM's embedding and output head), then the vision tokens
    (the extra rows). A converted tokenizer.json keeps its own special ids (Qwen's <|im_end|> = 151645).
    The whole state is stored in checkpoints so sampling uses the exact same tokenizer."""

    def __init__(self, ranks, pat_str=PAT_STR, name="shapes-bpe", specials=None, base_vocab=None, normalize=None):
        """specials: {token: id} the tokenizer already has (a Qwen tokenizer.json's added tokens: <|im_end|> is
        151645); the chat tokens missing from it are appended after the BPE ids. base_vocab: the LLM's embedding
        rows (Qwen3 pads 151,669 ids to 151,936); Molmo2's vision tokens come right after it. normalize: a
        unicodedata form applied before encoding ('NFC' for Qwen)."""
        self.ranks, self.pat_str, self.name = ranks, pat_str, name
        self.given, self.normalize = dict(specials or {}), normalize
        n = max([*ranks.values(), *(i for t, i in self.given.items() if t not in VISION_TOKENS)]) + 1
        specials = dict(self.given)
        for t in CHAT_TOKENS:
            if t not in specials:
                specials[t], n = n, n + 1
        # Vision tokens that the file already has (Molmo2's tokenizer.json: <im_start> = 151936, <im_patch> =
        # 151938, ...) keep their ids, so a released checkpoint's extra rows line up, and the first of them is
        # where the extra rows begin; the others take the next free extra rows.
        taken = {specials[t] for t in VISION_TOKENS if t in specials}
        self.base_vocab = base_vocab or (min(taken) if taken else n)
        if taken and min(taken) < self.base_vocab or self.base_vocab < n:
            raise ValueError(f"vision token ids {sorted(taken)} and the tokenizer's {n} ids do not fit "
                             f"base_vocab {self.base_vocab}")
        free = (i for i in itertools.count(self.base_vocab) if i not in taken)
        specials.update({t: next(free) for t in VISION_TOKENS if t not in specials})
        self.enc = tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.n_extra = max(specials[t] for t in VISION_TOKENS) + 1 - self.base_vocab
        for t, name in TOKEN_ATTRS.items():  # self.im_patch, self.chat_end, ...
            setattr(self, name, specials[t])
        self.bos = self.chat_end  # Molmo2/Qwen3: <|im_end|> doubles as BOS
        self.pad = self.endoftext
        self.vision_ids = [specials[t] for t in VISION_TOKENS]

    def encode(self, text, allow_special=False):
        """str -> [int]. Special tokens written in the text stay plain text unless allow_special: a caption that
        happens to contain "<im_patch>" must not turn into a vision slot."""
        if self.normalize:
            text = unicodedata.normalize(self.normalize, text)
        return self.enc.encode(text, allowed_special="all") if allow_special else self.enc.encode_ordinary(text)

    def decode(self, ids):
        """[int] or a 1-D tensor -> str (special tokens written out by name)."""
        return self.enc.decode(list(ids))

    def state(self):
        """The constructor's arguments: Tokenizer(**state()) rebuilds the very same ids (checkpoints store it)."""
        return dict(name=self.name, pat_str=self.pat_str, ranks=self.ranks, specials=self.given,
                    base_vocab=self.base_vocab, normalize=self.normalize)


def _byte_level_alphabet():
    """GPT-2's byte-level BPE writes each byte as a printable character (bytes_to_unicode): the printable
    Latin-1 bytes as themselves, the other 68 shifted to U+0100 upwards. Returns {character: byte}."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, shift = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shift)] = b
            shift += 1
    return chars


def tokenizer_from_json(path, base_vocab=None):
    """A Hugging Face tokenizer.json of the Qwen2/Qwen3 kind (byte-level BPE) -> Tokenizer on tiktoken, so
    tiktoken stays the one tokenizer at run time. The vocabulary's ids become tiktoken ranks: tiktoken merges
    the adjacent pair whose merge has the lowest rank, HF applies its merge list in order, and the two agree
    when every merge's result has a larger id than the merges before it, which is checked here (Qwen's vocab
    is built that way). The pre-tokenizer's Split regex becomes pat_str; the added special tokens keep their
    ids; an NFC normalizer is applied before encoding, as HF does."""
    import json
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        j = json.load(f)
    m = j.get("model") or {}
    if m.get("type") != "BPE" or "vocab" not in m:
        raise ValueError(f"{path}: not a BPE tokenizer.json (model.type {m.get('type')!r})")
    alphabet = _byte_level_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in t): i for t, i in m["vocab"].items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocabulary entry with {e} outside the byte-level alphabet "
                         f"(not a byte-level BPE)") from None
    last = -1
    for k, merge in enumerate(m.get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        i = m["vocab"].get(a + b)
        if i is None or i <= last:
            raise ValueError(f"{path}: merge {k} ({a!r} + {b!r}) is out of id order: tiktoken's ranks would "
                             f"merge differently from the merge list")
        last = i
    pats = []

    def walk(p):  # the Split regexes of the pre-tokenizer, in order
        if not p:
            return
        if p.get("type") == "Sequence":
            for q in p["pretokenizers"]:
                walk(q)
        elif p.get("type") == "Split":
            pats.append(p["pattern"].get("Regex") or re.escape(p["pattern"]["String"]))
    walk(j.get("pre_tokenizer"))
    if len(pats) != 1:
        raise ValueError(f"{path}: expected one Split regex in the pre-tokenizer, found {len(pats)}")
    norm = (j.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC"):
        raise ValueError(f"{path}: normalizer {norm!r} is not supported (None or NFC)")
    specials = {t["content"]: t["id"] for t in j.get("added_tokens", [])
                if t.get("special") or t["content"] in VISION_TOKENS}  # Molmo2's file: vision tokens at fixed ids
    return Tokenizer(ranks, pats[0], os.path.basename(path), specials, base_vocab, norm)


def build_tokenizer(name, base_vocab=None):
    """A tokenizer from a local file: a path to a .tiktoken file or a Qwen-style tokenizer.json, or a tiktoken
    encoding name that is already in tiktoken's local cache. Nothing is downloaded: a missing encoding is a clear
    error. base_vocab: the LLM's embedding rows when the config fixes them (Qwen3: 151,936 rows for 151,669
    ids), so the vision tokens land on the extra rows after them; None = right after the tokenizer's ids.
    (The shapes world's own BPE, 'shapes-bpe', is trained from its text: shapes.tokenizer.)"""
    if name.endswith(".json"):  # a Qwen-style tokenizer.json
        return tokenizer_from_json(name, base_vocab)
    if name.endswith(".tiktoken"):
        if not os.path.exists(name):
            raise FileNotFoundError(f"tokenizer file {name!r} not found")
        import base64  # read it directly: tiktoken's load_tiktoken_bpe caches by path and would keep
        with open(name, "rb") as f:  # serving a stale copy after the file is edited
            pairs = (line.split() for line in f.read().splitlines() if line)
            ranks = {base64.b64decode(t): int(r) for t, r in pairs}
        return Tokenizer(ranks, name=os.path.basename(name), base_vocab=base_vocab)
    import tiktoken.load

    # stands in for tiktoken's file reader while the encoding loads: reading from the cache still works, any
    # attempt to fetch the file from the network (path: its URL) becomes this clear error instead
    def offline(path):
        raise FileNotFoundError(
            f"tiktoken encoding {name!r} is not in the local cache and nanoMolmo2 never downloads at run time. "
            f"Copy its .tiktoken file here and pass tokenizer='/path/{name}.tiktoken', or pre-populate "
            f"TIKTOKEN_CACHE_DIR on a machine with network (it wanted {path}).")
    real, tiktoken.load.read_file = tiktoken.load.read_file, offline
    try:
        enc = tiktoken.get_encoding(name)
    except ValueError as e:
        raise ValueError(f"unknown tokenizer {name!r}: use 'shapes-bpe', a .tiktoken or tokenizer.json path, or one of "
                         f"{tiktoken.list_encoding_names()}") from e
    finally:
        tiktoken.load.read_file = real
    return Tokenizer(enc._mergeable_ranks, pat_str=enc._pat_str, name=name, base_vocab=base_vocab)


# ----------------------------------------------------------------------------------------------------------
# Points: Molmo2 html-v2

# Molmo2's prompt templates (GENERAL_PROMPTS_V1; docs/molmo2.md, Prompts and points), for shapes and real data alike
POINT_PROMPT = "Point to the {label}\nPlease say 'There are none.' if it is not in the image."
COUNT_PROMPT = "How many {label} are there?"
NONE_ANSWER = "There are none."
COUNT_ANSWER = "Counting the {points} shows a total of {n}."  # Molmo2 counts by pointing, then says the number
TRACK_PROMPT = "Track the {label}."  # Molmo2 GENERAL_PROMPTS_V1: "Track {label}."

def format_points(points, width, height, label, frame="1"):
    """points: [(x_px, y_px)] -> '<points coords="1 1 453 612 2 501 600">label</points>'.
    A single image's frame prefix is always 1 (docs/molmo2.md, Prompts and points)."""
    return format_groups([(frame, points)], width, height, label)


def format_groups(groups, width, height, label, tag="points"):
    """Molmo2 html-v2 with frame groups: [(prefix, points)] -> '<tag coords="p1 1 x y 2 x y;p2 3 x y">label</tag>'.
    A prefix is "1" for one image, the 1-based image index for multi-image, the time "2.5" for video.
    points are [(x_px, y_px)], numbered 1, 2, ... on across the groups (pointing), or [(id, x_px, y_px)] with
    the given ids (tracking: an object keeps its id in every frame). Coordinates become integers 0-1000
    (x/W, y/H), zero-padded to 3 digits, sorted by (x, y) inside a group."""
    n, parts = 0, []
    for prefix, pts in groups:
        scaled = []
        for p in pts:
            pid, x, y = p if len(p) == 3 else (None, *p)
            scaled.append((min(1000, max(0, round(1000 * x / width))), min(1000, max(0, round(1000 * y / height))),
                           pid))
        items = []
        for x, y, pid in sorted(scaled):
            n += 1
            items.append(f"{n if pid is None else pid} {x:03d} {y:03d}")
        parts.append(f"{prefix} " + " ".join(items))
    return f'<{tag} coords="{";".join(parts)}">{label}</{tag}>'


# Molmo2's parsing regexes (Molmo2 code: olmo/preprocessing/point_formatter.py): the tag, then frame groups,
# then (id, x, y) triples.
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

class MediaError(ValueError):
    """An image or video file that exists but cannot be decoded (truncated, corrupt, not media at all). Training
    skips the example that needs it and counts it (loader.TrainingStream); elsewhere it is an error naming the file."""


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
    if isinstance(src, Image.Image):  # already in memory: an RGB image is used as is (no copy per crop or frame)
        return src if src.mode == "RGB" else _to_rgb(src)
    try:
        with Image.open(src) as im:
            return _to_rgb(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {src}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"cannot read image {src}: {e}") from None


def image_bytes(img, size, width=None):
    """PIL or path -> uint8 tensor (3, size, width or size): the image's RGB bytes at the model's size. Stretched, no
    aspect-preserving pad (Molmo2 resizes to the square); bilinear without antialiasing and rounded back to bytes, as
    transformers' Molmo2 image and video processors resize, so a released checkpoint sees the pixels it was trained
    on. Examples and batches carry pixels as these bytes (a quarter of fp32's memory, in the packer's buffer, between
    loader processes and on the way to the GPU); the model normalises them on its device (normalize_pixels)."""
    x = torch.from_numpy(np.array(load_image(img), dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    if x.shape[1:] != (size, width or size):
        x = torch.nn.functional.interpolate(x[None].float(), size=(size, width or size), mode="bilinear",
                                            align_corners=False, antialias=False).round().clamp(0, 255)[0]
    return x.to(torch.uint8).contiguous()


def normalize_pixels(x):
    """uint8 bytes (..., 3, H, W) -> float32 in [-1, 1]: x / 255, then (x - mean) / std with Molmo2's mean = std = 0.5
    (its image_preprocessor). Runs wherever x is: model.Molmo2 calls it on the device."""
    return (x.float() / 255.0 - 0.5) / 0.5


def preprocess_image(img, size, width=None):
    """PIL or path -> float32 tensor (3, size, width or size) in [-1, 1]: image_bytes, normalised (the ViT's input,
    for code that feeds the ViT directly)."""
    return normalize_pixels(image_bytes(img, size, width))


@lru_cache(maxsize=None)  # the same few grids every example: computed once, never mutated by callers
def pooling_index(gh, gw, ph, pw):
    """Molmo2's token_pooling for one crop: pool_grid over its (gh, gw) patches, numbered row-major."""
    idx, rows, cols = pool_grid(np.arange(gh * gw).reshape(gh, gw), ph, pw)
    idx.setflags(write=False)  # cached and shared: read-only
    return idx, rows, cols


def pool_grid(grid, ph, pw):
    """Molmo2's arange_for_pooling: a (gh, gw) grid of patch indices is padded with -1 to a multiple of the
    window, split evenly (the extra row/column at the bottom/right), and cut into (ph, pw) windows in row-major
    order. Returns int64 (n_tokens, ph*pw) with -1 on padded slots, and the pooled grid's rows and cols."""
    gh, gw = grid.shape
    H, W = ph * math.ceil(gh / ph), pw * math.ceil(gw / pw)
    top, left = (H - gh) // 2, (W - gw) // 2
    idx = np.pad(grid, ((top, H - gh - top), (left, W - gw - left)), constant_values=-1)
    return idx.reshape(H // ph, ph, W // pw, pw).transpose(0, 2, 1, 3).reshape(-1, ph * pw).astype(np.int64), \
        H // ph, W // pw


def image_tokens(tok, rows, cols, col_tokens):
    """<im_start> + rows x (cols x <im_patch> [+ <im_col>]) + <im_end>. Each <im_patch> is a slot that the
    model fills with one pooled vision feature (added to the slot's embedding); <im_col> ends a row, which
    tells the LLM where rows break (Molmo2 uses column tokens on its high-res crops)."""
    row = [tok.im_patch] * cols + ([tok.im_col] if col_tokens else [])
    return [tok.im_start] + row * rows + [tok.im_end]


def select_tiling(h, w, window, max_crops):
    """Molmo2's select_tiling: the (rows, cols) grid of high-res crops (rows * cols <= max_crops) whose windows
    of `window` px cover an h x w image with the least up-scaling, or, when every grid has to shrink the image,
    the least down-scaling. Ties go to fewer crops, then fewer rows."""
    grids = sorted(((r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops),
                   key=lambda g: (g[0] * g[1], g[0]))
    scale = [min(r * window / h if h else math.inf, c * window / w if w else math.inf) for r, c in grids]
    up = [x for x in scale if x >= 1]
    return grids[scale.index(min(up) if up else max(scale))]


def crop_geometry(height, width, crop, patch, max_crops, margins):
    """Molmo2's overlapping tiling of a height x width image: each crop of crop px keeps a window of
    crop/patch - sum(margins) patches (27 - 8 = 19, 266 px), the margins overlapping its neighbours. The tiling
    (select_tiling on the image less the margins) gives (rows, cols), and the image is resized to the canvas
    (266 rows + 112, 266 cols + 112) px that the crops cover exactly. Returns (rows, cols, canvas_h, canvas_w)."""
    m = sum(margins) * patch
    win = crop - m
    r, c = select_tiling(height - m, width - m, win, max_crops)
    return r, c, r * win + m, c * win + m


def multicrop_tokens(tok, height, width, crop=378, patch=14, pool=2, max_crops=8, margins=(4, 4)):
    """Molmo2's multi-crop image tokens (crop_mode overlap-and-resize-c2, docs/molmo2.md, Token layout) for a
    height x width image, with Molmo2's settings as defaults. Returns (token ids, (rows, cols) of the tiling).
      global crop  the whole image at crop px: 27 x 27 patches, padded to 28 and pooled 2x2 to 14 x 14 = 196
                   tokens: <low_res_im_start> + 196 <im_patch> + <im_end> (no column tokens)
      high-res     the canvas (crop_geometry) less the crops' overlaps is a (19 r + 8) x (19 c + 8) patch grid,
                   pooled 2x2 to h x w tokens: <im_start> + h x (w <im_patch> + <im_col>) + <im_end>."""
    r, c, ch, cw = crop_geometry(height, width, crop, patch, max_crops, margins)
    n = math.ceil(crop // patch / pool)    # the global crop's 14 x 14
    glob = [tok.low_res_im_start] + [tok.im_patch] * (n * n) + [tok.im_end]
    return glob + image_tokens(tok, math.ceil(ch // patch / pool), math.ceil(cw // patch / pool), True), (r, c)


def multicrop_pixels(img, crop=378, patch=14, pool=2, max_crops=8, margins=(4, 4)):
    """Molmo2's multi-crop pixels, in the order of multicrop_tokens. Returns crops (1 + r*c, 3, crop, crop) as uint8
    bytes (image_bytes; the global crop, then the tiles row-major) and pool_idx int64 (n_tokens, pool*pool): the crops'
    patches (numbered crop by crop, row-major) pooled into each <im_patch>, -1 on padded slots. High-res windows
    are taken on the stitched canvas grid, so one may span two tiles."""
    if crop // patch <= sum(margins):
        raise ValueError(f"crop_margins {margins} leave no window in a crop of {crop // patch} patches")
    img = load_image(img)
    r, c, ch, cw = crop_geometry(img.height, img.width, crop, patch, max_crops, margins)
    g, (lm, rm) = crop // patch, margins
    step = crop - (lm + rm) * patch  # tiles start every window (266 px)
    tiles = image_bytes(img, ch, cw).unfold(1, crop, step).unfold(2, crop, step)  # (3, r, c, crop, crop)
    crops = torch.cat([image_bytes(img, crop)[None], tiles.permute(1, 2, 0, 3, 4).reshape(r * c, 3, crop, crop)])
    # the canvas's patch grid as indices into the tiles' patches: every tile gives its window, and the tiles on
    # the canvas's edges their outer margins too (Molmo2 drops the overlapping margins, keeps the border ones)
    idx = g * g + np.arange(r * c * g * g).reshape(r, c, g, g)  # after the global crop's g*g patches
    keep_r = [np.arange(lm if i else 0, g - rm if i < r - 1 else g) for i in range(r)]
    keep_c = [np.arange(lm if j else 0, g - rm if j < c - 1 else g) for j in range(c)]
    grid = np.concatenate([np.concatenate([idx[i, j][np.ix_(keep_r[i], keep_c[j])] for j in range(c)], 1)
                           for i in range(r)])
    return crops, np.concatenate([pooling_index(g, g, pool, pool)[0], pool_grid(grid, pool, pool)[0]])


# ----------------------------------------------------------------------------------------------------------
# Video: PyAV decoding at Molmo2's frame times (docs/molmo2.md, Video sampling)

def frame_times(duration, max_frames, fps=2.0):
    """Molmo2's "uniform_last_frame" sampling (video_loader.py TimeSampler): while the video lasts at most
    (max_frames - 1) / fps seconds, frames at fps (t = 0, 0.5, 1.0, ...) plus the last frame (t = duration);
    a longer video gets max_frames times spread uniformly over [0, duration], both ends included."""
    if duration <= (max_frames - 1) / fps:
        t = [i / fps for i in range(int(math.floor(duration * fps + 1e-9)) + 1)]
        if duration - t[-1] > 1e-6:
            t.append(duration)
        return t
    return np.linspace(0.0, duration, max_frames).tolist()


def _open_video(path):
    """(container, its first video stream) through PyAV; a missing file or one with no video stream is a clear
    error naming it. The caller closes the container."""
    import av
    if not os.path.exists(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot read video {path}: {e}") from None
    if not container.streams.video:
        container.close()
        raise MediaError(f"no video stream in {path}")
    return container, container.streams.video[0]


def video_index(path):
    """Demux (no decoding) -> (frame presentation times in s, sorted; key frame times; duration in s; start).
    Times are the stream's own timestamps counted from its first frame (start, in s), so a variable-frame-rate
    file gets its true times."""
    import av
    container, stream = _open_video(path)
    tb = float(stream.time_base)
    times, keys, end = [], [], 0.0
    try:
        for p in container.demux(stream):
            if p.pts is None:  # the flush packet at the end
                continue
            t = p.pts * tb
            times.append(t)
            if p.is_keyframe:
                keys.append(t)
            end = max(end, t + (p.duration or 0) * tb)
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot read video {path}: {e}") from None
    finally:
        container.close()
    if not times:
        raise MediaError(f"no frames in video {path}")
    start = min(times)
    times = sorted(t - start for t in times)
    return times, sorted(k - start for k in keys), max(end - start, times[-1]), start


def load_video(path, max_frames, fps=2.0, mode="seek"):
    """Decode the frames Molmo2 samples: returns (list of PIL RGB frames, their timestamps in s).

    The frame shown at time t is the last one whose presentation time is <= t. Two ways to get them:
      "sequential"  decode from the start, keep the wanted frames;
      "seek"        before each wanted frame, jump to the key frame at or before it whenever that skips
                    frames (a key frame lies beyond the decoder's position), else keep decoding.
    bench.py measures both on a 3-minute file; "seek" is the default because it decodes a subset of what
    "sequential" does (sparse sampling from long files)."""
    import av
    times, keys, duration, start = video_index(path)
    shown = lambda t: times[max(0, bisect.bisect_right(times, t + 1e-6) - 1)]  # the frame on screen at t
    wanted = sorted({shown(t) for t in frame_times(duration, max_frames, fps)})  # a frame shown twice: once
    container, stream = _open_video(path)
    tb = float(stream.time_base)
    out = {}
    try:
        frames, pos = None, -1.0
        for w in wanted:  # seek when a key frame lies in (pos, w]: the frames before it need not be decoded
            jump = frames is None or (mode == "seek" and bisect.bisect_right(keys, w) > bisect.bisect_right(keys, pos))
            if jump:
                container.seek(int(round((w + start) / tb)), stream=stream, backward=True)
                frames = container.decode(stream)
            for f in frames:
                if f.pts is None:
                    continue
                t = f.pts * tb - start
                pos = t
                if abs(t - w) < 1e-6:
                    out[w] = f.to_image()
                    break
                if t > w + 1e-6:  # the seek landed past the frame (should not happen): say so
                    raise MediaError(f"cannot find the frame at {w:.3f} s in {path}")
    except av.error.FFmpegError as e:
        raise MediaError(f"cannot decode video {path}: {e}") from None
    finally:
        container.close()
    if len(out) < len(wanted):
        raise MediaError(f"video {path} is truncated or corrupt: decoded {len(out)} of {len(wanted)} sampled frames")
    return [out[w] for w in wanted], wanted


def write_video(path, frames, fps=30, times=None, codec="libx264", gop=None):
    """Frames (PIL images or uint8 HxWx3 arrays, even sizes) -> an mp4 through PyAV. times (s per frame)
    writes a variable-frame-rate file (millisecond timestamps); otherwise frame i is at i / fps. gop: frames
    between key frames (libx264's default is 250)."""
    import av
    from fractions import Fraction
    with av.open(path, "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))  # PyAV wants an int or a Fraction
        if gop:
            s.codec_context.gop_size = gop
        first = np.asarray(frames[0])
        s.height, s.width = first.shape[:2]
        s.pix_fmt = "yuv420p"
        if times is not None:  # millisecond clock for the encoder and the container, else pts snap to 1/fps
            s.codec_context.time_base = s.time_base = Fraction(1, 1000)
        for i, im in enumerate(frames):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.asarray(im, dtype=np.uint8)), format="rgb24")
            if times is not None:
                f.pts, f.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


# ----------------------------------------------------------------------------------------------------------
# Examples -> token sequences

def parse_subtitles(src):
    """Subtitles from an .srt / .vtt file, or a list of (start_s, end_s, text) -> [(start_s, end_s, text)].
    A malformed cue is an error naming the file and the line."""
    if not isinstance(src, (str, os.PathLike)):
        return [(float(a), float(b), str(t)) for a, b, t in src]
    if not os.path.exists(src):
        raise FileNotFoundError(f"subtitle file not found: {src}")
    clock = re.compile(r"(?:(\d+):)?(\d+):(\d+)[.,](\d+)")
    sec = lambda m: int(m[1] or 0) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 10 ** len(m[4])
    cues, lines = [], open(src, encoding="utf-8-sig").read().splitlines()
    i = 0
    while i < len(lines):
        if "-->" in lines[i]:
            parts = [clock.search(p) for p in lines[i].split("-->")]
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{src}:{i + 1}: cannot read the cue times {lines[i]!r}")
            text = []
            i += 1
            while i < len(lines) and lines[i].strip():
                text.append(re.sub(r"<[^>]+>", "", lines[i].strip()))  # drop <i>, <b>, vtt voice tags
                i += 1
            cues.append((sec(parts[0]), sec(parts[1]), " ".join(text)))
        i += 1
    return cues


def subtitle_text(cues, times, window=1.0):
    """Molmo2's subtitle block (subtitle_mode="frame_1"): keep a cue when its [start, end] overlaps
    [t - 1 s, t + 1 s] of some sampled frame time t; lay the kept cues out after the frames as
    "subtitle\\n" + "{s:.1f} - {e:.1f} {text}\\n" per cue. Empty when no cue is kept."""
    kept = [(a, b, t) for a, b, t in cues if any(a <= ft + window and b >= ft - window for ft in times)]
    return "subtitle\n" + "".join(f"{a:.1f} - {b:.1f} {t}\n" for a, b, t in kept) if kept else ""


def visual_tokens(ex, tok, cfg, max_frames=128, fps=2.0, budget=None):
    """The example's pixels and their token layout (docs/molmo2.md, Token layout). Returns (ids, images, pool_idx,
    timestamps) for, in order of precedence:
      video   a path (decoded with PyAV at Molmo2's frame times) or dict(frames=[PIL], times=[s]):
              per frame "{t:.1f} " + <frame_start> + pooled <im_patch> tokens + <frame_end>, frames after the
              first preceded by a space, pooled video_pool_h x video_pool_w (Molmo2: 3x3), no column tokens;
              then the subtitle block when ex has subtitles. If the tokens exceed budget, fewer frames are
              taken (uniformly over the sampled ones), never part of a frame.
      images  up to 5 images, each after the text "Image {i}" (Molmo2 multi-image)
      image   one image: <im_start> + rows of pooled tokens (+ <im_col>) + <im_end>"""
    g = cfg.image_size // cfg.patch_size
    if ex.get("video") is not None:
        v = ex["video"]
        frames, times = (v["frames"], v["times"]) if isinstance(v, dict) else load_video(v, max_frames, fps)
        idx, rows, cols = pooling_index(g, g, cfg.video_pool_h, cfg.video_pool_w)
        cues = parse_subtitles(ex["subtitles"]) if ex.get("subtitles") is not None else []
        start, end = (tok.frame_start, tok.frame_end) if cfg.frame_tokens else (tok.im_start, tok.im_end)
        # A frame: video_pool_h x video_pool_w pooling (the grid padded with -1 to a multiple of 3), no column
        # tokens, the start/end pair, and its time as text ("0.0 " is 4 tokens, " 2.5 " 5, " 12.5 " 6, " 112.5 " 7: every
        # digit is its own token):
        #   shapes configs (64 px, patch 8): 8 x 8 -> 9 x 9 padded -> 3 x 3 = 9 + 2 = 11, + time = 15-16 tokens
        #   config/stage2.py, stage3.py (224 px, patch 16): 14 x 14 -> 15 x 15 -> 5 x 5 = 25 + 2 = 27,
        #   + time = 31-34 tokens; (Molmo2's 378 px, patch 14: 27 x 27 -> 9 x 9 = 81 + 2 = 83, + time ~ 88)
        # So 128 frames at 224 px take ~4,200 tokens, just over stage 2's 4,096: the budget loop below drops frames.

        def layout(keep):
            """Token ids for the frames at indices keep (sorted), then the subtitle cues near those frames."""
            ids = []
            for j, i in enumerate(keep):
                ids += tok.encode((" " if j else "") + f"{times[i]:.1f} ")
                ids += [start] + [tok.im_patch] * (rows * cols) + [end]
            return ids + (tok.encode(subtitle_text(cues, [times[i] for i in keep])) if cues else [])

        keep = list(range(len(frames)))
        ids = layout(keep)
        while budget is not None and len(ids) > budget and len(keep) > 1:
            n = max(1, len(keep) - max(1, (len(ids) - budget) * len(keep) // len(ids)))  # shrink about to fit
            keep = sorted({int(round(x)) for x in np.linspace(0, len(frames) - 1, n)})
            ids = layout(keep)
        imgs = [image_bytes(frames[i], cfg.image_size) for i in keep]
        return ids, imgs, [idx] * len(keep), [float(times[i]) for i in keep]
    if ex.get("images"):
        if len(ex["images"]) > 5:
            raise ValueError(f"{len(ex['images'])} images in one example; Molmo2 multi-image takes at most 5")
        ids, imgs, pools = [], [], []
        for i, im in enumerate(ex["images"]):
            a, b, c = image_block(im, tok, cfg)
            ids, imgs, pools = ids + tok.encode(f"Image {i + 1}") + a, imgs + b, pools + c
        return ids, imgs, pools, [0.0] * len(imgs)
    if ex.get("image") is not None:
        ids, imgs, pools = image_block(ex["image"], tok, cfg)
        return ids, imgs, pools, [0.0] * len(imgs)
    return [], [], [], []


def vision_token_counts(cfg):
    """{'image': LLM tokens of one single-crop image, 'frame': of one video frame, its time text not counted (4-7
    tokens more)}, for a model.ModelConfig: the counts image_block and visual_tokens lay out (the worked numbers are
    in their comments). train.py prints them at start and sample.py for a video. A multi-crop image (max_crops > 0)
    costs more, by its tiling (multicrop_tokens)."""
    g = cfg.image_size // cfg.patch_size
    _, rows, cols = pooling_index(g, g, cfg.pool_h, cfg.pool_w)
    _, vrows, vcols = pooling_index(g, g, cfg.video_pool_h, cfg.video_pool_w)
    return dict(image=rows * (cols + int(cfg.col_tokens)) + 2, frame=vrows * vcols + 2)


def image_block(img, tok, cfg):
    """One image -> (ids, crops, pool_idx per crop). A single crop of image_size px (the default), or with
    cfg.max_crops Molmo2's multi-crop (multicrop_pixels): the first crop's pool_idx then holds every token of
    the image, indexing the patches of all its crops (collate offsets it by the patches before them), and the
    other crops' are empty."""
    if not cfg.max_crops:
        # One crop: image_size / patch_size patches a side, pooled pool_h x pool_w into rows x cols tokens; with
        # a column token after each row and the start/end pair, an image costs rows * (cols + 1) + 2 LLM tokens:
        #   shapes configs (64 px, patch 8): 8 x 8 patches -> 2x2 pooling -> 4 x 4 = 16 <im_patch>
        #                                    + 4 <im_col> + <im_start>, <im_end> = 22 tokens
        #   config/stage1.py, stage2.py (224 px, patch 16): 14 x 14 -> 7 x 7 = 49 + 7 + 2 = 58 tokens
        #   (Molmo2's 378 px, patch 14: 27 x 27, padded to 28 x 28 -> 14 x 14 = 196 + 14 + 2 = 212)
        g = cfg.image_size // cfg.patch_size
        idx, rows, cols = pooling_index(g, g, cfg.pool_h, cfg.pool_w)
        return image_tokens(tok, rows, cols, cfg.col_tokens), [image_bytes(img, cfg.image_size)], [idx]
    if cfg.pool_h != cfg.pool_w:
        raise ValueError("multi-crop pools square windows: pool_h must equal pool_w")
    img = load_image(img)
    args = (cfg.image_size, cfg.patch_size, cfg.pool_h, cfg.max_crops, cfg.crop_margins)
    crops, pool = multicrop_pixels(img, *args)
    ids, _ = multicrop_tokens(tok, img.height, img.width, *args)
    return ids, list(crops), [pool] + [np.zeros((0, pool.shape[1]), dtype=np.int64)] * (len(crops) - 1)


def encode_example(ex, tok, cfg, task_weights, weighting="task", flat_weights=None, max_frames=128, fps=2.0,
                   seq_len=None, first_token_mult=1.0):
    """ex: dict(task, turns [(user, assistant), ...], and one of image (PIL or path), images [up to 5],
    video (path or dict(frames, times)) with optional subtitles (.srt/.vtt path or [(s, e, text)])).
    Returns dict(input_ids, labels, loss_weights (aligned with labels), images [(3,H,W) uint8], pool_idx,
    timestamps (one per image/frame)).

    Layout (Qwen3 chat turns, visual input right after BOS as Molmo2 does with no <|image|> placeholder):
      <|im_end|> [visual tokens] <|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|> ...
    Loss only on assistant tokens (the answer and its closing <|im_end|>). Their weight:
      weighting="task"  the task's multiplier (caption 1.0, QA 1.0, counting 1.5, pointing 2.0, tracking 2.0:
                        docs/molmo2.md, Loss weighting), on every answer token;
      weighting="root"  Molmo2 SFT's root_subsegments_root_tokens (docs/molmo2.md, Loss weighting):
                        2 / sqrt(answer tokens of the conversation) per token, so a long answer counts
                        ~sqrt(n), not n, times a short one; tasks in flat_weights get that flat weight per
                        token instead (Molmo2: pointing and tracking 0.2).
    first_token_mult: the first token of every answer gets this many times its weight (1.0 = no extra). In a
      pointing or counting answer that one token decides "There are none." against "<points": a yes/no about the
      whole image, outweighed ~20:1 by the coordinate tokens after it.
    seq_len: a video that would not fit is given fewer frames (visual_tokens)."""
    if ex["task"] not in task_weights:
        raise KeyError(f"task {ex['task']!r} has no loss weight; task_weights has {sorted(task_weights)}")
    if weighting not in ("task", "root"):
        raise ValueError(f"loss weighting must be 'task' or 'root', got {weighting!r}")
    # the text first, so the vision budget (what is left of seq_len) is known before the frames are laid out;
    # is_answer flags, token by token, what the loss is taken on
    text, is_answer = [], []
    for i, (q, a) in enumerate(ex["turns"]):
        prompt = ([tok.encode("\n")] if i else []) + [[tok.chat_start], tok.encode("user\n" + q),
                                                       [tok.chat_end], tok.encode("\n"), [tok.chat_start],
                                                       tok.encode("assistant\n")]
        for p in prompt:
            text += p
            is_answer += [False] * len(p)
        ans = tok.encode(a) + [tok.chat_end]
        text += ans
        is_answer += [True] * len(ans)
    budget = None if seq_len is None else seq_len - 1 - len(text)
    vis, images, pool, stamps = visual_tokens(ex, tok, cfg, max_frames, fps, budget)
    # BOS, the visual tokens, then the conversation: ids (T,), is_answer (T,)
    ids = [tok.bos] + vis + text
    is_answer = [False] * (1 + len(vis)) + is_answer
    n_ans = sum(is_answer)
    # one weight per answer token, the same for all of them (only the first-token multiplier differs)
    if weighting == "task":
        w = float(task_weights[ex["task"]])
    elif flat_weights and ex["task"] in flat_weights:
        w = float(flat_weights[ex["task"]])
    else:
        w = 2.0 / math.sqrt(max(1, n_ans))
    # next-token targets: position t predicts ids[t+1]; weights move with their target token
    labels = ids[1:] + [-1]
    # an answer's first token is an answer token after a non-answer one (answers are separated by prompts)
    loss_w = [(w * first_token_mult if not prev else w) if a else 0.0
              for prev, a in zip(is_answer[:-1], is_answer[1:])] + [0.0]
    return dict(input_ids=ids, labels=labels, loss_weights=loss_w, images=images, pool_idx=pool, timestamps=stamps,
                n_patches=[(cfg.image_size // cfg.patch_size) ** 2] * len(images), task=ex["task"])


# ----------------------------------------------------------------------------------------------------------
# Packing: several examples in one row (docs/molmo2.md, Stages)

class Packer:
    """Fills rows of at most seq_len tokens and max_images images with whole examples, best-fit over a small
    buffer (Molmo2 runs a 2-D knapsack over 48 buffered examples; best-fit is its greedy cousin):
    a row starts with the oldest buffered example (so none waits forever), then repeatedly takes the longest
    buffered example that still fits both budgets, until none does.

    source() returns the next key (e.g. a sampler's (dataset, index)); encode(key) makes the example, or None to
    skip the key. The state is the buffered keys, re-encoded on resume, so a resumed run packs exactly the same rows."""

    def __init__(self, source, encode, seq_len, max_images, buffer_size=32):
        """seq_len: tokens a row; max_images: images or frames a row (the ViT's budget); buffer_size: examples
        the best fit chooses from (bigger packs tighter, and holds more encoded pixels in memory)."""
        self.source, self.encode = source, encode
        self.seq_len, self.max_images, self.buffer_size = seq_len, max_images, buffer_size
        self.buf = []  # [(key, encoded)]

    def _fill(self):
        """Top the buffer up to buffer_size encoded examples. An example that can never fit a row is an error
        naming it, raised here rather than as an over-long row later."""
        while len(self.buf) < self.buffer_size:
            key = self.source()
            e = self.encode(key)
            if e is None:  # encode skipped it (media that cannot be decoded): the next key takes its place
                continue
            if len(e["input_ids"]) > self.seq_len or len(e["images"]) > self.max_images:
                raise ValueError(f"example {key} ({e['task']}) has {len(e['input_ids'])} tokens and "
                                 f"{len(e['images'])} images: it can never fit a row of seq_len={self.seq_len}, "
                                 f"max_images={self.max_images}")
            self.buf.append((key, e))

    def row(self):
        """One packed row: a list of encoded examples whose tokens sum to <= seq_len and images to <= max_images."""
        self._fill()
        row = [self.buf.pop(0)[1]]
        room, imgs = self.seq_len - len(row[0]["input_ids"]), self.max_images - len(row[0]["images"])
        while True:
            fits = [i for i, (_, e) in enumerate(self.buf)
                    if len(e["input_ids"]) <= room and len(e["images"]) <= imgs]
            if not fits:
                return row
            i = max(fits, key=lambda i: len(self.buf[i][1]["input_ids"]))
            e = self.buf.pop(i)[1]
            row.append(e)
            room, imgs = room - len(e["input_ids"]), imgs - len(e["images"])

    def rows(self, n):
        """n packed rows: one micro-batch for collate."""
        return [self.row() for _ in range(n)]

    def state(self):
        """The buffered keys, oldest first: small (no pixels), and enough to rebuild the buffer."""
        return [k for k, _ in self.buf]

    def load_state(self, keys):
        """Rebuild the buffer from state(), re-encoding each key, so the next rows are the saved run's."""
        self.buf = [(k, self.encode(k)) for k in keys]


def collate(rows, pad_id, seq_len, left_pad=False, fixed=False):
    """Rows -> batch dict of tensors, padded to the longest row (fixed=True: to seq_len, so every batch has one
    shape: a compiled kernel, such as FlexAttention on CUDA, is then compiled once): on the right for training, on
    the left for generation (every prompt then ends in the last column). A row is one encode_example output or a list of
    them (a packed row: Packer.row()).

    timestamps [B,F] are the frames' times in s (0 for images), a record for readers and tests only: the model
    never reads it. Time reaches the model only as text, the "{t:.1f} " tokens before each frame in input_ids
    (visual_tokens), as in Molmo2. Windows of different sizes (2x2 image, 3x3 frame) share pool_idx, the narrower
    ones padded with -1.
    Packed rows carry what keeps their examples apart (as Molmo2's packing does: docs/molmo2.md, Stages):
      doc_ids [B,T]       1, 2, ... for the examples of a row, 0 on padding: attention never crosses them
      position_ids [B,T]  restart at 0 for every example, so each sees the positions it would see alone
    pool_idx is global: row j lists the flat patch indices (into all valid images of the batch, P patches
    each, in row-major example order) pooled into the j-th <im_patch> slot of the batch in row-major order."""
    rows = [r if isinstance(r, list) else [r] for r in rows]  # an unpacked row is a row of one example
    B = len(rows)
    lens = [sum(len(e["input_ids"]) for e in r) for r in rows]
    T = seq_len if fixed else max(lens)
    if max(lens) > seq_len:
        bad = max(range(B), key=lambda b: lens[b])
        raise ValueError(f"row {bad} ({', '.join(e['task'] for e in rows[bad])}) has {lens[bad]} tokens > "
                         f"seq_len={seq_len}")
    F = max(sum(len(e["images"]) for e in r) for r in rows)  # image slots per row: the row with the most images
    # padding: pad_id tokens, label -1 (no target), weight 0, doc id 0 (no real token attends to it)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -1, dtype=torch.long)
    loss_w = torch.zeros(B, T)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.zeros(B, T, dtype=torch.long)
    first = next((e["images"][0] for r in rows for e in r if len(e["images"])), torch.zeros(3, 1, 1, dtype=torch.uint8))
    pixel_values = torch.zeros(B, F, *first.shape, dtype=first.dtype)  # uint8 bytes: the model normalises them
    image_mask = torch.zeros(B, F, dtype=torch.bool)
    timestamps = torch.zeros(B, F)  # not a model input: the time text in input_ids is what the model sees
    # fill row by row, example by example; pool gathers each image's pooling rows, re-indexed into the batch's
    # flat patch list (offset = patches of the images before it), in the order the <im_patch> slots appear
    pool, offset = [], 0
    for b, r in enumerate(rows):
        t = T - lens[b] if left_pad else 0
        f = 0
        for d, e in enumerate(r):
            n = len(e["input_ids"])
            input_ids[b, t:t + n] = torch.tensor(e["input_ids"])
            labels[b, t:t + n] = torch.tensor(e["labels"])  # an example's last label is -1: no cross-example target
            loss_w[b, t:t + n] = torch.tensor(e["loss_weights"])
            doc_ids[b, t:t + n] = d + 1
            position_ids[b, t:t + n] = torch.arange(n)
            t += n
            for img, idx, n_patches, ts in zip(e["images"], e["pool_idx"], e["n_patches"], e["timestamps"]):
                pixel_values[b, f] = img
                image_mask[b, f] = True
                timestamps[b, f] = ts
                pool.append(np.where(idx >= 0, idx + offset, -1))  # local patch index -> index in the batch
                offset += n_patches
                f += 1
    k = max((p.shape[1] for p in pool), default=1)  # 2x2 image windows and 3x3 frame windows: pad with -1
    pool = [p if p.shape[1] == k else np.pad(p, ((0, 0), (0, k - p.shape[1])), constant_values=-1) for p in pool]
    pool_idx = torch.from_numpy(np.concatenate(pool)) if pool else torch.zeros(0, k, dtype=torch.long)
    return dict(input_ids=input_ids, attention_mask=doc_ids > 0, labels=labels, loss_weights=loss_w,
                doc_ids=doc_ids, position_ids=position_ids, pixel_values=pixel_values, image_mask=image_mask,
                timestamps=timestamps, pool_idx=pool_idx)

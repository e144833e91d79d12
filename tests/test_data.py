"""Tokenizer, points, images, pooling, example encoding and collation (data.py)."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import data
import shapes
from tiny_hf import qwen_tokenizer  # a tiny Qwen-style tokenizer.json


# ---------------------------------------------------------------------------------------------------------
# tokenizer

def test_vocab_layout(tok):
    n = max(tok.ranks.values()) + 1
    assert tok.base_vocab == n + len(data.CHAT_TOKENS)
    assert tok.n_extra == len(data.VISION_TOKENS) == 9
    # chat tokens are in the base vocabulary (the head can predict <|im_end|>), vision tokens are extra rows
    for t in data.CHAT_TOKENS:
        (i,) = tok.encode(t, allow_special=True)
        assert n <= i < tok.base_vocab
    for t in data.VISION_TOKENS:
        (i,) = tok.encode(t, allow_special=True)
        assert tok.base_vocab <= i < tok.base_vocab + tok.n_extra
    assert tok.im_patch == tok.base_vocab  # first extra row
    assert tok.encode("<|im_start|>", allow_special=True) == [tok.chat_start]
    assert tok.encode("<|im_end|>", allow_special=True) == [tok.chat_end]
    assert tok.encode("<im_start>", allow_special=True) == [tok.im_start]
    assert tok.encode("<im_end>", allow_special=True) == [tok.im_end]
    assert tok.encode("<im_col>", allow_special=True) == [tok.im_col]
    assert len({tok.chat_end, tok.im_end, tok.chat_start, tok.im_start, tok.endoftext}) == 5
    assert tok.bos == tok.chat_end and tok.pad == tok.endoftext


def test_special_tokens_not_special_in_plain_text(tok):
    specials = set(range(max(tok.ranks.values()) + 1, tok.base_vocab + tok.n_extra))
    for t in data.CHAT_TOKENS + data.VISION_TOKENS:
        ids = tok.encode("say " + t + " now")
        assert not specials & set(ids), t  # user text can never inject a control token
        assert tok.decode(ids) == "say " + t + " now"


def test_roundtrip_and_digits(tok):
    rng = random.Random(0)
    texts = [shapes.make_example(t, s)["turns"][0][1] for t in ["caption", "point", "count", "text"] for s in range(3)]
    texts += ["héllo wörld ☃ 日本 \n\t  x", "", "   ", "<points coords=\"1 1 453 612\">x</points>"]
    texts += ["".join(chr(rng.randrange(32, 0x2FF)) for _ in range(40)) for _ in range(5)]
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    # every digit is its own token: coordinates are predicted digit by digit
    ids = tok.encode("453 612 1000")
    digit_ids = [i for i in ids if tok.decode([i]).strip().isdigit()]
    assert [tok.decode([i]).strip() for i in digit_ids] == list("4536121000")
    # the BPE learned something: the shapes vocabulary is compressed
    assert len(tok.encode("Describe this image.")) < len("Describe this image.") / 2
    # ... and it was trained on the pieces tiktoken cuts (PAT_STR): a shapes word and its leading space are
    # one token (with the space split off, every word cost two), and so are the chat roles
    assert [tok.decode([i]) for i in tok.encode("Point to the red circles")] == ["Point", " to", " the", " red", " circles"]
    assert [tok.decode([i]) for i in tok.encode("assistant\n")] == ["assistant", "\n"]


def _write_tiktoken(path, ranks):
    import base64
    with open(path, "wb") as f:
        for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(t) + b" " + str(r).encode() + b"\n")


def test_tokenizer_state_roundtrip_and_tiktoken_file(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))  # keep any caching inside tmp_path
    text = shapes.make_example("caption", 3)["turns"][0][1]
    tok2 = data.Tokenizer(**tok.state())  # what checkpoints store
    assert tok2.encode(text) == tok.encode(text)
    assert (tok2.base_vocab, tok2.im_patch, tok2.chat_end) == (tok.base_vocab, tok.im_patch, tok.chat_end)
    path = str(tmp_path / "mine.tiktoken")
    _write_tiktoken(path, tok.ranks)
    tok3 = data.build_tokenizer(path)
    assert tok3.ranks == tok.ranks and tok3.base_vocab == tok.base_vocab
    assert tok3.encode(text) == tok.encode(text)
    # the file is read as it is now, never from a stale cached copy of the same path
    small = {k: v for k, v in tok.ranks.items() if v < 260}
    _write_tiktoken(path, small)
    tok4 = data.build_tokenizer(path)
    assert tok4.ranks == small and tok4.base_vocab == 260 + len(data.CHAT_TOKENS)
    with pytest.raises(FileNotFoundError, match="nope.tiktoken"):
        data.build_tokenizer(str(tmp_path / "nope.tiktoken"))


def test_unknown_tokenizer_name():
    with pytest.raises(ValueError) as e:
        data.build_tokenizer("nonexistent_name")
    msg = str(e.value)
    assert "nonexistent_name" in msg and "shapes-bpe" in msg


def test_named_tiktoken_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache

    def no_network(*a, **k):
        raise AssertionError("build_tokenizer tried to use the network")
    try:
        import requests
        monkeypatch.setattr(requests, "get", no_network)
    except ImportError:
        pass
    import socket
    monkeypatch.setattr(socket.socket, "connect", no_network)
    try:
        data.build_tokenizer("cl100k_base")
    except FileNotFoundError as e:
        assert "cl100k_base" in str(e) and "not in the local cache" in str(e)
    else:
        pytest.skip("cl100k_base is already loaded/cached in this process")


# ---------------------------------------------------------------------------------------------------------
# points

def test_format_points():
    s = data.format_points([(32, 38.4), (29, 39.2)], 64, 64, "dog")
    assert s == '<points coords="1 1 453 612 2 500 600">dog</points>'
    # sorted by x then y; clamped to 0-1000; zero padded
    s = data.format_points([(10, 5), (0, 70), (10, 1)], 100, 64, "a b")
    assert s == '<points coords="1 1 000 1000 2 100 016 3 100 078">a b</points>'
    assert data.parse_points(data.format_points([], 64, 64, "x")) == []


def test_parse_points_roundtrip():
    pts = [(5.0, 60.0), (31.3, 2.2), (63.0, 63.0)]
    s = data.format_points(pts, 64, 64, "red circles")
    got = data.parse_points("Counting the " + s + " shows a total of 3.")
    assert [(f, i) for f, i, _, _ in got] == [(1.0, 1), (1.0, 2), (1.0, 3)]
    assert [(x, y) for _, _, x, y in got] == sorted((round(1000 * x / 64), round(1000 * y / 64)) for x, y in pts)
    assert data.parse_points('<points coords="1 1 453 612 2 501 600">dog</points>') == \
        [(1.0, 1, 453, 612), (1.0, 2, 501, 600)]
    # two tags, and the tracks form with several frames
    two = data.parse_points('<points coords="1 1 100 200">a</points> and <points coords="1 1 300 400">b</points>')
    assert two == [(1.0, 1, 100, 200), (1.0, 1, 300, 400)]
    tr = data.parse_points('<tracks coords="0.5 1 100 200\t1.5 1 110 210">x</tracks>')
    assert tr == [(0.5, 1, 100, 200), (1.5, 1, 110, 210)]


def test_parse_points_never_raises():
    assert data.parse_points(None) == []
    assert data.parse_points("") == []
    assert data.parse_points(123) == []
    assert data.parse_points("There are none.") == []
    assert data.parse_points('<points coords="1 1 45') == []            # truncated mid-tag
    assert data.parse_points('<points coords="1 1 453 612 2 50') == []  # no closing quote: not a tag
    assert data.parse_points('<points coords="1 1 453 612 2 50">x') == [(1.0, 1, 453, 612)]  # partial triple
    assert data.parse_points('<points coords="1 1 1453 612 2 999 1000">x</points>') == [(1.0, 2, 999, 1000)]
    assert data.parse_points('<points coords="1.2.3 1 100 100">x</points>') == []  # bad frame is skipped
    rng = np.random.default_rng(0)
    for _ in range(200):
        junk = bytes(rng.integers(0, 256, rng.integers(0, 80))).decode("utf-8", errors="replace")
        out = data.parse_points('<points coords="' + junk + '">' + junk)
        assert isinstance(out, list)
        assert all(0 <= x <= 1000 and 0 <= y <= 1000 for _, _, x, y in out)


# ---------------------------------------------------------------------------------------------------------
# images

@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "1", "CMYK", "LA", "RGB"])
def test_load_image_modes(mode, tmp_path):
    a = np.zeros((6, 8, 3), np.uint8)
    a[:, :4] = (200, 30, 30)    # left half red
    a[:, 4:] = (250, 250, 250)  # right half near white
    rgb = Image.fromarray(a)
    if mode == "I;16":
        g = np.zeros((6, 8), np.uint16)
        g[:, 4:] = 60000
        g[:, :4] = 12000
        im = Image.fromarray(g)
        assert im.mode == "I;16"
    else:
        im = rgb.convert(mode)
    for src in (im, None):
        if src is None:
            ext = "tif" if mode == "CMYK" else "png"
            src = str(tmp_path / f"x.{ext}")
            im.save(src)
        out = data.load_image(src)
        assert out.mode == "RGB" and out.size == (8, 6)
        o = np.asarray(out).astype(int)
        # content survives the conversion: the left half is darker than the right half
        assert o[:, :4].mean() < o[:, 4:].mean() - 40, (mode, o[0])
        if mode == "I;16":  # 16-bit: 12000/65535 ~ 47/255, 60000/65535 ~ 233/255 (not clipped to white)
            assert abs(o[0, 0, 0] - 47) <= 2 and abs(o[0, 7, 0] - 233) <= 2, o[0]


def test_load_image_errors(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        data.load_image(str(missing))
    bad = tmp_path / "x.png"
    bad.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8)))
    with pytest.raises(ValueError, match="x.png"):
        data.load_image(str(bad))
    # a real PNG, truncated: the header opens, decoding fails
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="trunc.png"):
        data.load_image(str(trunc))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.jpg"):
        data.load_image(str(empty))


def test_preprocess_image():
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, 10:] = 255
    x = data.preprocess_image(Image.fromarray(a), 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert torch.all(x[:, :, :7] == -1) and torch.all(x[:, :, 9:] == 1)  # stretched, left black, right white
    g = data.preprocess_image(Image.new("L", (16, 16), 128), 16)  # gray: exact (128/255*2-1), all channels
    assert torch.allclose(g, torch.full((3, 16, 16), 128 / 255 * 2 - 1), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# pooling

def test_pooling_index_exact_grid():
    idx, rows, cols = data.pooling_index(4, 4, 2, 2)
    assert (rows, cols) == (2, 2) and idx.shape == (4, 4)
    assert idx.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pooling_index_padding_split():
    idx, rows, cols = data.pooling_index(3, 3, 2, 2)  # pad 1: none at top/left, one at bottom/right
    assert (rows, cols) == (2, 2)
    assert idx.tolist() == [[0, 1, 3, 4], [2, -1, 5, -1], [6, 7, -1, -1], [8, -1, -1, -1]]
    idx, rows, cols = data.pooling_index(4, 4, 3, 3)  # pad 2: one on each side
    assert (rows, cols) == (2, 2)
    assert idx[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 4, 5]
    assert idx[3].tolist() == [10, 11, -1, 14, 15, -1, -1, -1, -1]
    idx, rows, cols = data.pooling_index(2, 5, 3, 3)  # pad rows 1 (bottom), cols 1 (right); non-square grid
    assert (rows, cols) == (1, 2)
    assert idx[0].tolist() == [0, 1, 2, 5, 6, 7, -1, -1, -1]
    assert idx[1].tolist() == [3, 4, -1, 8, 9, -1, -1, -1, -1]
    for gh, gw, ph, pw in [(3, 3, 2, 2), (7, 5, 3, 3), (6, 6, 2, 2), (1, 1, 2, 2)]:
        idx, rows, cols = data.pooling_index(gh, gw, ph, pw)
        assert sorted(idx[idx >= 0].tolist()) == list(range(gh * gw))  # every patch pooled exactly once
        assert idx.shape == (rows * cols, ph * pw)


# ---------------------------------------------------------------------------------------------------------
# encode_example / collate

TW = {"caption": 1.0, "qa": 1.0, "count": 1.5, "point": 2.0, "text": 1.0}


def _weighted_text(tok, e):
    return tok.decode([l for l, w in zip(e["labels"], e["loss_weights"]) if w > 0])


def test_encode_example_layout(tok, cfg):
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    ex = dict(task="point", image=img, turns=[("Where?", "Here 1.")])
    e = data.encode_example(ex, tok, cfg, TW)
    g = cfg.image_size // cfg.patch_size  # 4x4 patches, pooled 2x2 -> 2 rows of 2 tokens + <im_col>
    vis = "<im_start>" + ("<im_patch>" * 2 + "<im_col>") * 2 + "<im_end>"
    want = ("<|im_end|>" + vis + "<|im_start|>user\nWhere?<|im_end|>\n<|im_start|>assistant\nHere 1.<|im_end|>")
    assert tok.decode(e["input_ids"]) == want
    assert e["labels"] == e["input_ids"][1:] + [-1]
    assert len(e["loss_weights"]) == len(e["labels"])
    assert len(e["images"]) == 1 and e["images"][0].shape == (3, 32, 32)
    assert e["n_patches"] == [g * g]
    assert e["pool_idx"][0].shape == (e["input_ids"].count(tok.im_patch), cfg.pool_h * cfg.pool_w)
    assert e["task"] == "point"
    assert _weighted_text(tok, e) == "Here 1.<|im_end|>"
    assert set(w for w in e["loss_weights"] if w) == {2.0}


def test_encode_example_multi_turn_weights(tok, cfg):
    ex = dict(task="count", image=None, turns=[("q one", "answer one"), ("q two?", "2")])
    e = data.encode_example(ex, tok, cfg, TW)
    assert e["images"] == [] and e["pool_idx"] == []
    assert tok.decode(e["input_ids"]) == ("<|im_end|><|im_start|>user\nq one<|im_end|>\n<|im_start|>assistant\n"
                                          "answer one<|im_end|>\n<|im_start|>user\nq two?<|im_end|>\n"
                                          "<|im_start|>assistant\n2<|im_end|>")
    w = np.array(e["loss_weights"])
    assert set(w[w > 0].tolist()) == {1.5}
    # nonzero exactly on the answer tokens and each answer's closing <|im_end|>
    a1, a2 = tok.encode("answer one"), tok.encode("2")
    assert (w > 0).sum() == len(a1) + 1 + len(a2) + 1
    assert _weighted_text(tok, e) == "answer one<|im_end|>2<|im_end|>"
    assert w[-1] == 0 and e["labels"][-1] == -1
    # the weighted positions are two contiguous runs ending on <|im_end|> labels
    pos = np.flatnonzero(w > 0)
    runs = np.split(pos, np.flatnonzero(np.diff(pos) > 1) + 1)
    assert [len(r) for r in runs] == [len(a1) + 1, len(a2) + 1]
    assert all(e["labels"][r[-1]] == tok.chat_end for r in runs)
    # every input position before the first answer gets no loss (user turns, template, BOS)
    first = runs[0][0]
    assert tok.decode(e["input_ids"][:first + 1]).endswith("assistant\n")


def test_first_token_mult_weights_each_answers_decision_token(tok, cfg):
    ex = dict(task="point", image=None, turns=[("q one", shapes.NONE_ANSWER), ("q two", "<points coords=\"1 1 5 5\">"
                                                                                        "x</points>")])
    base = np.array(data.encode_example(ex, tok, cfg, TW)["loss_weights"])
    e = data.encode_example(ex, tok, cfg, TW, first_token_mult=10.0)
    w = np.array(e["loss_weights"])
    changed = np.flatnonzero(w != base)
    # exactly the first token of each answer, x10 (pointing's 2.0 -> 20.0); everything else as before
    assert [tok.decode([e["labels"][i]]) for i in changed] == [tok.decode(tok.encode(shapes.NONE_ANSWER)[:1]),
                                                               tok.decode(tok.encode("<points")[:1])]
    assert w[changed].tolist() == [20.0, 20.0] and base[changed].tolist() == [2.0, 2.0]
    assert np.count_nonzero(w) == np.count_nonzero(base)


def test_encode_example_unknown_task(tok, cfg):
    with pytest.raises(KeyError, match="track2"):
        data.encode_example(dict(task="track2", image=None, turns=[("a", "b")]), tok, cfg, TW)


def _enc(tok, cfg, task, seed):
    return data.encode_example(shapes.make_example(task, seed, cfg.image_size), tok, cfg, TW)


def test_collate_right_and_left(tok, cfg):
    encs = [_enc(tok, cfg, "point", 1), _enc(tok, cfg, "text", 2), _enc(tok, cfg, "caption", 3)]
    n = [len(e["input_ids"]) for e in encs]
    T = max(n)
    P = (cfg.image_size // cfg.patch_size) ** 2
    for left in (False, True):
        b = data.collate(encs, tok.pad, 512, left_pad=left)
        assert b["input_ids"].shape == (3, T) and b["attention_mask"].dtype == torch.bool
        assert b["pixel_values"].shape == (3, 1, 3, cfg.image_size, cfg.image_size)
        assert b["image_mask"].tolist() == [[True], [False], [True]]
        assert torch.all(b["pixel_values"][1] == 0)
        assert torch.equal(b["pixel_values"][2, 0], encs[2]["images"][0])
        for i, e in enumerate(encs):
            am = b["attention_mask"][i]
            assert int(am.sum()) == n[i]
            cols = slice(T - n[i], T) if left else slice(0, n[i])
            assert bool(am[cols].all())
            assert b["input_ids"][i, cols].tolist() == e["input_ids"]
            assert b["labels"][i, cols].tolist() == e["labels"]
            assert b["loss_weights"][i, cols].tolist() == e["loss_weights"]
            assert torch.all(b["input_ids"][i][~am] == tok.pad)
            assert torch.all(b["labels"][i][~am] == -1) and torch.all(b["loss_weights"][i][~am] == 0)
        if left:
            assert bool(b["attention_mask"][:, -1].all())
        # global pooling index: one row per <im_patch> slot, the second image's patches offset by P
        assert b["pool_idx"].shape[0] == int((b["input_ids"] == tok.im_patch).sum())
        k = len(encs[0]["pool_idx"][0])
        p0, p2 = encs[0]["pool_idx"][0], encs[2]["pool_idx"][0]
        assert b["pool_idx"][:k].tolist() == p0.tolist()
        assert b["pool_idx"][k:].tolist() == np.where(p2 >= 0, p2 + P, -1).tolist()


def test_collate_keeps_pads_in_global_pool_idx(tok, make_cfg):
    c = make_cfg(image_size=24)  # a 3x3 patch grid: 2x2 windows need -1 pads
    encs = [_enc(tok, c, "point", 1), _enc(tok, c, "text", 2), _enc(tok, c, "qa", 3)]
    b = data.collate(encs, tok.pad, 512)
    p = b["pool_idx"]
    assert p.shape == (8, 4) and int((b["input_ids"] == tok.im_patch).sum()) == 8
    local, _, _ = data.pooling_index(3, 3, 2, 2)
    assert p[:4].tolist() == local.tolist()
    assert p[4:].tolist() == np.where(local >= 0, local + 9, -1).tolist()  # pads stay -1 after the offset
    assert sorted(p[p >= 0].tolist()) == list(range(18))


def test_collate_text_only_and_too_long(tok, cfg):
    encs = [_enc(tok, cfg, "text", 0), _enc(tok, cfg, "text", 1)]
    b = data.collate(encs, tok.pad, 512)
    assert b["image_mask"].shape == (2, 0) and b["pool_idx"].shape[0] == 0
    longest = max(len(e["input_ids"]) for e in encs)
    data.collate(encs, tok.pad, longest)  # exactly seq_len is fine
    with pytest.raises(ValueError, match="seq_len"):
        data.collate(encs, tok.pad, longest - 1)


def test_root_loss_weighting(tok, cfg):
    """Molmo2 SFT root_subsegments_root_tokens: 2/sqrt(answer tokens of the conversation) per token; the
    flat overrides (pointing 0.2 per token) replace it; the seed's task multipliers are the default."""
    ex = dict(task="qa", image=None, turns=[("q one", "answer one"), ("q two?", "2")])
    e = data.encode_example(ex, tok, cfg, TW, weighting="root")
    w = np.array(e["loss_weights"])
    n = int((w > 0).sum())
    assert n == len(tok.encode("answer one")) + 1 + len(tok.encode("2")) + 1
    assert np.allclose(w[w > 0], 2 / np.sqrt(n)) and w[w > 0].sum() == pytest.approx(2 * np.sqrt(n))
    pt = data.encode_example(dict(ex, task="point"), tok, cfg, TW, weighting="root", flat_weights={"point": 0.2})
    assert set(np.array(pt["loss_weights"])[np.array(pt["loss_weights"]) > 0].tolist()) == {0.2}
    assert (np.array(pt["loss_weights"]) > 0).tolist() == (w > 0).tolist()  # same tokens, other weight
    with pytest.raises(ValueError, match="weighting"):
        data.encode_example(ex, tok, cfg, TW, weighting="sqrt")


def _fake(n_tokens, n_images, key):
    return dict(input_ids=[1] * n_tokens, labels=[1] * (n_tokens - 1) + [-1], loss_weights=[1.0] * n_tokens,
                images=[torch.zeros(3, 8, 8)] * n_images, pool_idx=[np.zeros((1, 4), dtype=np.int64)] * n_images,
                n_patches=[1] * n_images, task=f"t{key}")


def test_packer_budgets_order_and_resume():
    rng = np.random.default_rng(0)
    lens = {k: (int(rng.integers(10, 120)), int(rng.integers(0, 3))) for k in range(1000)}

    class Source:  # a stand-in for the sampler: its state is how many keys it gave
        def __init__(self, n=0):
            self.n = n

        def __call__(self):
            self.n += 1
            return self.n - 1

    src = Source()
    make = lambda k: _fake(*lens[k], k)
    p = data.Packer(src, make, seq_len=256, max_images=4, buffer_size=16)
    rows = p.rows(40)
    used = [int(e["task"][1:]) for r in rows for e in r]
    assert len(used) == len(set(used))  # every example at most once
    for r in rows:
        assert sum(len(e["input_ids"]) for e in r) <= 256 and sum(len(e["images"]) for e in r) <= 4
    fill = np.mean([sum(len(e["input_ids"]) for e in r) / 256 for r in rows])
    assert fill > 0.9, fill  # best-fit fills rows (one example per row here would fill ~26%)
    # each row starts with the oldest buffered example, so the k-th example is placed by row k: none starves
    row_of = {int(e["task"][1:]): i for i, r in enumerate(rows) for e in r}
    assert all(row_of[k] <= k for k in row_of) and set(range(len(rows))) <= set(row_of)
    # resume: the source's position plus the buffered keys (re-encoded) give the same next rows
    saved = (src.n, p.state())
    follow = [[e["task"] for e in r] for r in p.rows(5)]
    q = data.Packer(Source(saved[0]), make, seq_len=256, max_images=4, buffer_size=16)
    q.load_state(saved[1])
    assert [[e["task"] for e in r] for r in q.rows(5)] == follow
    big = data.Packer(lambda: 0, lambda k: _fake(300, 0, k), seq_len=256, max_images=4)
    with pytest.raises(ValueError, match="can never fit"):
        big.row()


def test_collate_packed_rows(tok, cfg):
    a = data.encode_example(shapes.make_example("point", 1, cfg.image_size), tok, cfg, TW)
    b = data.encode_example(shapes.make_example("text", 2, cfg.image_size), tok, cfg, TW)
    c = data.encode_example(shapes.make_example("caption", 3, cfg.image_size), tok, cfg, TW)
    batch = data.collate([[a, b, c], [c]], tok.pad, 10 ** 6)
    la, lb, lc = (len(e["input_ids"]) for e in (a, b, c))
    T = la + lb + lc
    assert batch["input_ids"].shape == (2, T)
    assert batch["doc_ids"][0].tolist() == [1] * la + [2] * lb + [3] * lc
    assert batch["doc_ids"][1].tolist() == [1] * lc + [0] * (T - lc)
    assert batch["position_ids"][0].tolist() == list(range(la)) + list(range(lb)) + list(range(lc))
    assert batch["input_ids"][0].tolist() == a["input_ids"] + b["input_ids"] + c["input_ids"]
    assert batch["labels"][0, la - 1] == -1 and batch["labels"][0, la + lb - 1] == -1  # no target across examples
    assert batch["attention_mask"].equal(batch["doc_ids"] > 0)
    assert batch["image_mask"].tolist() == [[True, True], [True, False]]  # a and c have images, b none
    assert batch["pool_idx"].shape[0] == (batch["input_ids"] == tok.im_patch).sum()
    # one example per row is the same as a list of one
    one = data.collate([c], tok.pad, 10 ** 6)
    two = data.collate([[c]], tok.pad, 10 ** 6)
    assert all(torch.equal(one[k], two[k]) for k in one)


# ---------------------------------------------------------------------------------------------------------
# a Hugging Face tokenizer.json (Qwen2/Qwen3 kind) converted to tiktoken

def test_tokenizer_json_converts_to_tiktoken(tmp_path):
    """The same ids through Hugging Face `tokenizers` and through our tiktoken conversion, on ASCII, accents
    (composed and decomposed: NFC), CJK, emoji (a ZWJ sequence too), digits, whitespace runs, special tokens and
    characters the BPE never saw; the special ids are the file's own; the state rebuilds the same tokenizer."""
    import data
    hf = qwen_tokenizer(tmp_path / "tokenizer.json")
    tok = data.build_tokenizer(str(tmp_path / "tokenizer.json"))
    text = ("<|im_start|>user\nCafé déjà vu? Cafe\u0301 東京は 日本 😀🎉 🐈\u200d⬛ 12345 it's   three  spaces\n\n\t"
            "tab<|object_ref_start|> Ωμέγα ñ 漢字 \r\n end  <|im_end|>\n")
    want = hf.encode(text).ids
    assert tok.encode(text, allow_special=True) == want and len(want) > 60
    assert tok.decode(want) == hf.decode(want, skip_special_tokens=False)
    assert (tok.endoftext, tok.chat_start, tok.chat_end) == (0, 1, 2)  # the file's ids, not appended ones
    assert tok.base_vocab == hf.get_vocab_size() and tok.im_patch == tok.base_vocab  # vision rows follow
    again = data.Tokenizer(**tok.state())
    assert again.encode(text, allow_special=True) == want and again.im_patch == tok.im_patch


def test_tokenizer_json_keeps_molmo2_vision_ids(tmp_path):
    """Molmo2's tokenizer.json has its vision tokens at fixed extra rows (<im_start> first, <im_patch> third):
    they keep those ids, the extra rows start at the first of them, and the tokens the file lacks take the
    free rows left. So ids match a released checkpoint's config (hf.HF_TOKEN_KEYS)."""
    import json
    import data
    hf = qwen_tokenizer(tmp_path / "t.json")
    j = json.loads((tmp_path / "t.json").read_text())
    base = hf.get_vocab_size() + 6  # Qwen pads its embedding beyond the last id
    vis = {"<im_start>": base, "<im_end>": base + 1, "<im_patch>": base + 2, "<im_col>": base + 3,
           "<low_res_im_start>": base + 4, "<frame_start>": base + 7, "<frame_end>": base + 8}
    j["added_tokens"] += [dict(id=i, content=t, special=True, single_word=False, lstrip=False, rstrip=False,
                               normalized=False) for t, i in vis.items()]
    (tmp_path / "m.json").write_text(json.dumps(j))
    tok = data.build_tokenizer(str(tmp_path / "m.json"))
    assert tok.base_vocab == base
    assert (tok.im_start, tok.im_end, tok.im_patch, tok.im_col, tok.low_res_im_start, tok.frame_start,
            tok.frame_end) == tuple(vis.values())
    assert {tok.image, tok.video} == {base + 5, base + 6} and tok.n_extra == 9
    assert tok.encode("a<im_patch><frame_end>", allow_special=True)[-2:] == [base + 2, base + 8]
    assert data.Tokenizer(**tok.state()).im_patch == base + 2


def test_tokenizer_json_errors(tmp_path):
    import json
    import data
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.build_tokenizer(str(tmp_path / "nope.json"))
    qwen_tokenizer(tmp_path / "t.json")
    j = json.loads((tmp_path / "t.json").read_text())
    merges = j["model"]["merges"]
    merges[3], merges[4] = merges[4], merges[3]  # a merge list whose order the ids do not follow
    (tmp_path / "bad.json").write_text(json.dumps(j))
    with pytest.raises(ValueError, match="merge 4 .* out of id order"):
        data.tokenizer_from_json(str(tmp_path / "bad.json"))
    j["model"]["type"] = "Unigram"
    (tmp_path / "uni.json").write_text(json.dumps(j))
    with pytest.raises(ValueError, match="not a BPE tokenizer.json"):
        data.tokenizer_from_json(str(tmp_path / "uni.json"))


def test_multicrop_token_counts_match_molmo2(tok):
    """Molmo2's worked examples (its preprocessing code's multi-crop layout, docs/molmo2.md; 378 px crops, patch 14, 2x2 pooling, max_crops 8,
    margins 4): 378 x 378 -> 1 x 1 tiling, 410 tokens (198 + 212); 500 x 1000 (height x width) -> 2 x 4, 1,189
    (198 + 991); 480 x 640 -> 2 x 2, 752 (198 + 554). A tall image tiles the other way round."""
    import data
    for (h, w), grid, total in (((378, 378), (1, 1), 410), ((500, 1000), (2, 4), 1189), ((480, 640), (2, 2), 752),
                                ((1000, 500), (4, 2), 1208)):
        ids, got = data.multicrop_tokens(tok, h, w)
        assert (got, len(ids)) == (grid, total), (h, w)
        assert ids[:1] == [tok.low_res_im_start] and ids.count(tok.im_end) == 2  # global block, then high-res
        hi = ids[198:]
        assert hi[0] == tok.im_start and hi.count(tok.im_col) == -(-(19 * grid[0] + 8) // 2)  # one per token row
    assert data.select_tiling(5000, 5000, 266, 8) == (2, 2)  # every grid shrinks it: the least, fewest crops
    from PIL import Image
    with pytest.raises(ValueError, match=r"crop_margins \(2, 2\) leave no window in a crop of 4 patches"):
        data.multicrop_pixels(Image.new("RGB", (40, 30)), crop=32, patch=8, margins=(2, 2))


# ---------------------------------------------------------------------------------------------------------
# dataset readers (readers.py: local copies of the real datasets; docs/real_data.md)

def _fixture(tmp_path, rows, images):
    """A jsonl file of raw lines and a media folder: images {url: (w, h) or b'bytes'} saved where media_path
    says a download script would put them."""
    import readers
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    for url, what in images.items():
        p = readers.media_path(str(media), url)
        if isinstance(what, bytes):
            open(p, "wb").write(what)
        else:
            Image.new("RGB", what, (200, 30, 30)).save(p)
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(rows) + "\n")
    return str(f), str(media)


def test_pixmo_readers_group_scale_and_skip(tmp_path, tok, cfg):
    """PixMo-Points rows of one image become one conversation, points scaled from pixels to 0-1000 by the image's
    own size; 'counting' rows ask for the count; a malformed row (bad JSON, a missing field, points that are not
    {x, y}) and a row whose image is missing or unreadable are skipped and counted, with the first of each named by
    file:line; the examples encode."""
    import json
    import data
    import readers
    u1, u2, u3 = "http://x/a/image.jpg", "http://y/b/image.jpg", "http://z/c.png"
    rows = [json.dumps(dict(image_url=u1, label="dog", points=[{"x": 50, "y": 25}], collection_method="pointing")),
            json.dumps(dict(image_url=u1, label="cat", points=[], collection_method="pointing")),
            json.dumps(dict(image_url=u2, label="cup", points=[{"x": 10, "y": 10}, {"x": 30, "y": 90}],
                            collection_method="counting")),
            '{"image_url": "http://x/a/image.jpg", "label": "dog", ',              # bad JSON
            json.dumps(dict(image_url=u1, points=[])),                                # no label
            json.dumps(dict(image_url=u1, label="dog", points=[[1, 2]])),            # points not {x, y}
            json.dumps(dict(image_url="http://gone/x.jpg", label="dog", points=[])),  # image not downloaded
            json.dumps(dict(image_url=u3, label="dog", points=[]))]                   # unreadable image file
    path, media = _fixture(tmp_path, rows, {u1: (200, 100), u2: (100, 100), u3: b"not an image"})
    lines = []
    exs, counts = readers.read_dataset("pixmo_points", path, media, log=lines.append)
    assert (counts["rows"], counts["malformed"], counts["missing media"]) == (3, 3, 2)
    assert f"{path}:4: JSONDecodeError" in lines[0] and f"{path}:7: http://gone/x.jpg" in lines[0]
    point, count = exs
    assert point["task"] == "point" and [a for _, a in point["turns"]] == [
        '<points coords="1 1 250 250">dog</points>', "There are none."]  # (50, 25) of 200 x 100
    assert point["turns"][0][0] == data.POINT_PROMPT.format(label="dog")
    assert count["turns"] == [(data.COUNT_PROMPT.format(label="cup"),
                               'Counting the <points coords="1 1 100 100 2 300 900">cup</points> shows a total of 2.')]
    e = data.encode_example(point, tok, cfg, {"point": 2.0})
    assert len(e["images"]) == 1 and sum(w > 0 for w in e["loss_weights"]) > 10
    # the same rows as parquet (the Hugging Face datasets' own format, read with pyarrow): the same
    # examples, and the rows pyarrow can type the same way are skipped and counted the same way
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = [json.loads(r) for r in rows if r.startswith("{") and r.endswith("}") and "[[" not in r]
    pq.write_table(pa.Table.from_pylist(good), str(tmp_path / "points.parquet"))
    pexs, pcounts = readers.read_dataset("pixmo_points", str(tmp_path / "points.parquet"), media, log=lambda s: None)
    assert pexs == exs and (pcounts["rows"], pcounts["malformed"], pcounts["missing media"]) == (3, 1, 2)


def test_caption_count_and_text_readers(tmp_path):
    import json
    import data
    import readers
    u = "http://x/p.jpg"
    cap = [json.dumps(dict(image_url=u, caption="A red square.", transcripts=[])),
           json.dumps(dict(image_url=u, caption=""))]                                 # empty caption
    path, media = _fixture(tmp_path, cap, {u: (64, 64)})
    exs, counts = readers.read_dataset("pixmo_cap", path, media, log=lambda s: None)
    assert exs == [dict(task="caption", image=readers.media_path(media, u),
                        turns=[("Describe this image in detail.", "A red square.")])] and counts["malformed"] == 1
    cnt = [json.dumps(dict(image_url=u, label="dots", count=3)),                         # eval split: no points
           json.dumps(dict(image_url=u, label="dots", count=2, points=[{"x": 1, "y": 1}]))]  # 2 != 1 point
    path, media = _fixture(tmp_path, cnt, {u: (64, 64)})
    exs, counts = readers.read_dataset("pixmo_count", path, media, log=lambda s: None)
    assert exs[0]["turns"] == [(data.COUNT_PROMPT.format(label="dots"), "3")] and counts["malformed"] == 1
    msgs = [json.dumps(dict(messages=[dict(role="system", content="Be brief."), dict(role="user", content="Hi"),
                                      dict(role="assistant", content="Hello.")])),
            json.dumps(dict(messages=[dict(role="assistant", content="out of turn")]))]
    path, _ = _fixture(tmp_path, msgs, {})
    exs, counts = readers.read_dataset("tulu", path, log=lambda s: None)
    assert exs[0]["turns"] == [("Be brief.\nHi", "Hello.")] and counts["malformed"] == 1
    with pytest.raises(ValueError, match="nothing readable"):
        readers.read_dataset("tulu", _fixture(tmp_path, msgs[1:], {})[0], log=lambda s: None)
    with pytest.raises(ValueError, match="no reader for dataset 'pixmo_nope'"):
        readers.read_dataset("pixmo_nope", path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        readers.read_dataset("tulu", str(tmp_path / "missing.jsonl"))
    (tmp_path / "t.parquet").write_bytes(b"PAR1\x15\x04" + bytes(range(200)) + b"PAR1")  # a damaged parquet
    with pytest.raises(ValueError, match=r"cannot read parquet file .*t.parquet"):
        readers.read_dataset("tulu", str(tmp_path / "t.parquet"))


def test_molmo2_video_and_multi_image_readers(tmp_path, tok, cfg):
    """VideoPoint (0-100 points per 2 fps timestamp -> time groups on 0-1000), tracking (pixel trajectories by
    object id, occluded points dropped), SubtitleQA (subtitles kept), Molmo2-Cap (annotation_score < 3 skipped),
    MultiImageQA (2-5 images, question/answer lists); missing videos skipped and counted; a track encodes."""
    import json
    import data
    import readers
    media = tmp_path / "media"
    media.mkdir()
    frames = [Image.new("RGB", (32, 32), (10 * i, 0, 0)) for i in range(4)]
    data.write_video(str(media / "vid1.mp4"), frames, fps=2.0)

    def read(name, rows):
        f = tmp_path / f"{name}.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return readers.read_dataset(name, str(f), str(media), log=lambda s: None)
    exs, c = read("molmo2_videopoint", [
        dict(video_id="vid1", label="dog", count=3, two_fps_timestamps=[0.0, 0.5, 1.0],
             points=[[{"x": 50, "y": 25}], [], [{"x": 10, "y": 90}, {"x": 20, "y": 90}]]),
        dict(video_id="vid1", label="cat", two_fps_timestamps=[0.0], points=[[], []]),   # lengths differ
        dict(video_id="nope", label="dog", two_fps_timestamps=[], points=[])])           # no such video
    assert exs[0]["turns"][0][1] == '<points coords="0.0 1 500 250;1.0 2 100 900 3 200 900">dog</points>'
    assert (c["malformed"], c["missing media"]) == (1, 1)
    exs, c = read("molmo2_track", [
        dict(clip="vid1", expression="the red ball", width=32, height=32, frame_trajectories=[
            dict(frame=0, time=0.0, points=[dict(id=7, point=[16, 8], occluded=False)]),
            dict(frame=1, time=0.5, points=[dict(id=7, point=[20, 8], occluded=True)]),
            dict(frame=2, time=1.0, points=[dict(id=7, point=[24, 8], occluded=False)])]),
        dict(clip="vid1", expression="x", width=0, height=32, frame_trajectories=[])])
    assert exs[0]["turns"] == [(data.TRACK_PROMPT.format(label="the red ball"),
                                '<tracks coords="0.0 7 500 250;1.0 7 750 250">the red ball</tracks>')]
    assert c["malformed"] == 1
    e = data.encode_example(exs[0], tok, cfg, {"track": 2.0})
    assert len(e["images"]) == 4 and e["timestamps"] == [0.0, 0.5, 1.0, 1.5]  # 2 fps frames of the mp4
    exs, c = read("molmo2_subtitleqa", [dict(video_id="vid1", Question="Who speaks?", Answer="Ann",
                                             subtitle=[dict(start=0.0, end=1.0, text="I am Ann")])])
    assert exs[0]["subtitles"] == [(0.0, 1.0, "I am Ann")] and exs[0]["turns"] == [("Who speaks?", "Ann")]
    exs, c = read("molmo2_capqa", [dict(video_id="vid1", Question="What is dark?", Answer="the clip",
                                        NegativeAnswers=["the sky", "a cat"]),
                                   dict(video_id="vid1", Question="?", Answer="x", NegativeAnswers="no list")])
    (q, a), = exs[0]["turns"]  # row 1: the answer at place 1 % 3 = 1, letter B
    assert q == readers.MC_PROMPT.format(question="What is dark?", options="A. the sky\nB. the clip\nC. a cat")
    assert a == "B" and c["malformed"] == 1
    exs, c = read("molmo2_cap", [dict(video_id="vid1", annotation_score=4, merged_caption="A dark clip."),
                                 dict(video_id="vid1", annotation_score=2, merged_caption="Low score.")])
    assert [t for ex in exs for t in ex["turns"]] == [("Describe this video in detail.", "A dark clip.")]
    assert (c["filtered"], c["malformed"]) == (1, 0)
    # stage 2's count bins of VideoPoint: rows outside the bin are left out and counted, not errors
    rows = [dict(video_id="vid1", label="dog", count=n, two_fps_timestamps=[0.0], points=[[{"x": 5, "y": 5}] * n])
            for n in (1, 5, 6, 30)] + [dict(video_id="vid1", label="dog", count="many", two_fps_timestamps=[],
                                            points=[])]
    exs, c = read("videopoint_0_5", rows)
    assert len(exs) == 2 and (c["filtered"], c["malformed"]) == (2, 1)
    assert [len(read(n, rows)[0]) for n in ("videopoint_6_25", "videopoint_26_60")] == [1, 1]
    urls = ["http://a/1.png", "http://a/2.png"]
    for u in urls:
        Image.new("RGB", (16, 16)).save(readers.media_path(str(media), u))
    exs, c = read("molmo2_multiqa", [dict(image_urls=urls, qa_pairs=dict(question=["Same?"], answer=["Yes"])),
                                     dict(image_urls=urls[:1], qa_pairs=dict(question=["?"], answer=["!"]))])
    assert exs[0]["images"] == [readers.media_path(str(media), u) for u in urls] and c["malformed"] == 1

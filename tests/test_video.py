"""Video input (data.py): frame times, PyAV decoding with true timestamps, subtitles, the token layout."""
import re

import numpy as np
import pytest
import torch

import data

TW = {"video_qa": 1.0, "qa": 1.0}


def coded(i):
    """Frame i's colour: far-apart values, so lossy H.264 still tells frames apart."""
    return np.array([(i * 37) % 256, (i * 91) % 256, (i * 53 + 128) % 256], dtype=np.uint8)


def frames_for(n, size=32):
    return [np.tile(coded(i), (size, size, 1)) for i in range(n)]


def which(frame, n):
    """The index of the coded colour nearest to the frame's centre pixel."""
    px = np.asarray(frame)[16, 16].astype(int)
    return int(np.argmin([np.abs(coded(i).astype(int) - px).sum() for i in range(n)]))


def test_frame_times_rule():
    # short videos: 2 fps from 0, plus the last frame when the duration is not on the grid
    assert data.frame_times(3.0, 128) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert data.frame_times(2.2, 128) == [0.0, 0.5, 1.0, 1.5, 2.0, 2.2]
    assert data.frame_times(0.0, 128) == [0.0]
    # the boundary: (128 - 1) / 2 = 63.5 s still samples at 2 fps, 128 frames
    t = data.frame_times(63.5, 128)
    assert len(t) == 128 and t[1] == 0.5 and t[-1] == 63.5
    # longer: max_frames spread uniformly, both ends included
    t = data.frame_times(200.0, 128)
    assert len(t) == 128 and t[0] == 0.0 and t[-1] == 200.0
    assert np.allclose(np.diff(t), 200 / 127)
    assert len(data.frame_times(1000.0, 384)) == 384


@pytest.mark.parametrize("fps", [30, 25])
def test_constant_frame_rate_files(tmp_path, fps):
    path = str(tmp_path / f"v{fps}.mp4")
    n = fps * 4 + fps // 2  # 4.5 s
    data.write_video(path, frames_for(n), fps=fps)
    times, keys, duration, _ = data.video_index(path)
    assert len(times) == n and duration == pytest.approx(n / fps)
    frames, ts = data.load_video(path, max_frames=128, fps=2.0)
    # 2 fps: t = 0, 0.5, ..., 4.5 (= the duration: the last frame). The frame on screen at t is the last one
    # whose presentation time is <= t, and its own time is the timestamp
    want = [int(np.floor(t * fps + 1e-6)) for t in np.arange(0, 4.5, 0.5)] + [n - 1]
    assert ts == pytest.approx([i / fps for i in want])
    assert [which(f, n) for f in frames] == want
    assert frames[0].mode == "RGB" and frames[0].size == (32, 32)


def test_variable_frame_rate_file_gets_true_times(tmp_path):
    times = [0.0, 0.1, 0.35, 0.9, 1.0, 1.7, 2.05, 2.6, 3.0]
    path = str(tmp_path / "vfr.mp4")
    data.write_video(path, frames_for(len(times)), times=times)
    got, _, _, _ = data.video_index(path)
    assert got == pytest.approx(times)
    frames, ts = data.load_video(path, max_frames=128)
    # sampled at 0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0 (+ the last frame): on screen are frames 0, 2, 4, 4, 5, 6, 8;
    # a frame shown twice is kept once
    assert ts == pytest.approx([0.0, 0.35, 1.0, 1.7, 2.05, 3.0])
    assert [which(f, len(times)) for f in frames] == [0, 2, 4, 5, 6, 8]


def test_long_file_uniform_and_seek_equals_sequential(tmp_path):
    path = str(tmp_path / "long.mp4")
    fps, n = 4, 800  # 200 s
    data.write_video(path, frames_for(n), fps=fps)
    frames, ts = data.load_video(path, max_frames=128)
    assert len(frames) == 128 and ts[0] == 0.0 and ts[-1] == pytest.approx((n - 1) / fps)  # first and last
    assert which(frames[0], 256) == 0 and which(frames[-1], 256) == (n - 1) % 256  # colours repeat every 256
    seq_frames, seq_ts = data.load_video(path, max_frames=128, mode="sequential")
    assert seq_ts == ts
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(frames, seq_frames))


def test_bad_video_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        data.load_video(str(tmp_path / "missing.mp4"), 16)
    good = str(tmp_path / "good.mp4")
    data.write_video(good, frames_for(60), fps=30)
    raw = open(good, "rb").read()
    cut = tmp_path / "truncated.mp4"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.mp4"):
        data.load_video(str(cut), 16)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(ValueError, match="junk.mp4"):
        data.load_video(str(junk), 16)
    import av
    wav = str(tmp_path / "sound.wav")
    with av.open(wav, "w") as c:  # a file with an audio stream and no video stream
        s = c.add_stream("pcm_s16le", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        f.sample_rate = 8000
        for p in s.encode(f):
            c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(ValueError, match="no video stream in .*sound.wav"):
        data.load_video(wav, 16)


SRT = """1
00:00:00,500 --> 00:00:01,200
Hello <i>there</i>

2
00:00:04,000 --> 00:00:05,000
far away

3
00:00:09,900 --> 00:00:12,000
two
lines
"""


def test_subtitles_parse_filter_and_layout(tmp_path):
    srt = tmp_path / "a.srt"
    srt.write_text(SRT)
    cues = data.parse_subtitles(str(srt))
    assert cues == [(0.5, 1.2, "Hello there"), (4.0, 5.0, "far away"), (9.9, 12.0, "two lines")]
    vtt = tmp_path / "a.vtt"
    vtt.write_text("WEBVTT\n\n00:00.500 --> 00:01.200\nHello <v Bob>there</v>\n\n01:00:04.000 --> 01:00:05.000\nlate\n")
    assert data.parse_subtitles(str(vtt)) == [(0.5, 1.2, "Hello there"), (3604.0, 3605.0, "late")]
    # the rule: a cue is kept when [start, end] overlaps [t - 1, t + 1] for a sampled frame time t
    # frames at 0, 2.5, 8.0: cue 1 overlaps [-1, 1]; cue 2 [4, 5] vs [1.5, 3.5] and [7, 9]: no; cue 3 [9.9, 12]: no
    assert data.subtitle_text(cues, [0.0, 2.5, 8.0]) == "subtitle\n0.5 - 1.2 Hello there\n"
    # a frame at 3.0 reaches [2, 4]: cue 2 starts at 4.0, touching the window: kept
    assert data.subtitle_text(cues, [3.0, 10.5]) == "subtitle\n4.0 - 5.0 far away\n9.9 - 12.0 two lines\n"
    assert data.subtitle_text(cues, [20.0]) == ""
    bad = tmp_path / "bad.srt"
    bad.write_text("1\n00:00:01 --> soon\nx\n")
    with pytest.raises(ValueError, match="bad.srt:2"):
        data.parse_subtitles(str(bad))
    with pytest.raises(FileNotFoundError, match="none.srt"):
        data.parse_subtitles(str(tmp_path / "none.srt"))


def test_video_token_layout_and_budget(tok, make_cfg):
    cfg = make_cfg(image_size=32, patch_size=8)  # 4x4 patches, 3x3 pooling -> 2x2 = 4 tokens a frame
    frames = [data.Image.fromarray(f) for f in frames_for(5)]
    ex = dict(task="video_qa", video=dict(frames=frames, times=[0.0, 0.5, 1.0, 1.5, 1.9]),
              subtitles=[(0.2, 0.8, "hi"), (9.0, 9.5, "gone")], turns=[("What moves?", "the star")])
    e = data.encode_example(ex, tok, cfg, TW)
    frame = "<frame_start>" + "<im_patch>" * 4 + "<frame_end>"
    vis = ("0.0 " + frame + " 0.5 " + frame + " 1.0 " + frame + " 1.5 " + frame + " 1.9 " + frame +
           "subtitle\n0.2 - 0.8 hi\n")
    assert tok.decode(e["input_ids"]).startswith("<|im_end|>" + vis + "<|im_start|>user\nWhat moves?")
    assert e["timestamps"] == [0.0, 0.5, 1.0, 1.5, 1.9] and len(e["images"]) == 5
    plain = data.encode_example(ex, tok, make_cfg(image_size=32, patch_size=8, frame_tokens=False), TW)
    assert tok.decode(plain["input_ids"]).startswith(  # Molmo2-4B's release: frames as <im_start> ... <im_end>
        "<|im_end|>" + vis.replace("<frame_start>", "<im_start>").replace("<frame_end>", "<im_end>"))
    assert all(p.shape == (4, 9) for p in e["pool_idx"])  # 3x3 windows, padded grid
    # a tight seq_len: fewer frames, chosen uniformly, whole frames only, and it fits
    n_full = len(e["input_ids"])
    short = data.encode_example(ex, tok, cfg, TW, seq_len=n_full - 10)
    assert len(short["input_ids"]) <= n_full - 10
    assert short["timestamps"] == [0.0, 1.0, 1.9] or len(short["timestamps"]) == 4
    assert short["timestamps"][0] == 0.0 and short["timestamps"][-1] == 1.9
    text = tok.decode(short["input_ids"])
    assert text.count("<frame_start>") == text.count("<frame_end>") == len(short["images"])
    assert text.count("<im_patch>") == 4 * len(short["images"])
    # batches carry the frame times, and a video row beside an image row pads the 2x2 windows to 3x3
    img = data.encode_example(dict(task="qa", image=frames[0], turns=[("q", "a")]), tok, cfg, TW)
    b = data.collate([e, img], tok.pad, 10 ** 6)
    assert b["timestamps"].shape == (2, 5) and b["timestamps"][0].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5, 1.9])
    assert b["pool_idx"].shape == (5 * 4 + 4, 9) and (b["pool_idx"][-4:, 4:] == -1).all()


def test_video_file_and_multi_image_examples(tok, make_cfg, tmp_path):
    cfg = make_cfg(image_size=32, patch_size=8)
    path = str(tmp_path / "v.mp4")
    data.write_video(path, frames_for(45), fps=30)  # 1.5 s: frames at 0, 0.5, 1.0 and the last (1.467)
    e = data.encode_example(dict(task="video_qa", video=path, turns=[("q", "a")]), tok, cfg, TW)
    assert e["timestamps"] == pytest.approx([0.0, 0.5, 1.0, 44 / 30])
    assert "1.5 <frame_start>" in tok.decode(e["input_ids"])  # "{t:.1f}" of the last frame's true time
    imgs = [data.Image.fromarray(f) for f in frames_for(3)]
    m = data.encode_example(dict(task="qa", images=imgs, turns=[("Which differs?", "2")]), tok, cfg, TW)
    text = tok.decode(m["input_ids"])
    one = "<im_start>" + ("<im_patch>" * 2 + "<im_col>") * 2 + "<im_end>"
    assert text.startswith("<|im_end|>Image 1" + one + "Image 2" + one + "Image 3" + one + "<|im_start|>")
    with pytest.raises(ValueError, match="at most 5"):
        data.encode_example(dict(task="qa", images=imgs * 2, turns=[("q", "a")]), tok, cfg, TW)


# ---------------------------------------------------------------------------------------------------------
# the shapes world in motion, and the video metrics

import eval as ev  # noqa: E402
import shapes  # noqa: E402


def _px(v):
    return v / 1000 * 64 - 0.5  # 0-1000 -> pixels, pixel centres at integers (eval.score_shapes)


@pytest.mark.parametrize("task", shapes.VIDEO_TASKS + shapes.MULTI_TASKS)
def test_video_examples_deterministic(task):
    a, b = shapes.make_example(task, 77), shapes.make_example(task, 77)
    assert a["turns"] == b["turns"] and a["task"] == task
    if task in shapes.VIDEO_TASKS:
        v = a["video"]
        assert 6 <= len(v["frames"]) <= 11 and v["times"] == [i / 2 for i in range(len(v["frames"]))]
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(v["frames"], b["video"]["frames"]))
    else:
        assert 2 <= len(a["images"]) <= 3


def test_video_length_is_a_parameter():
    """Stage 3's longer videos (config/shapes_stage3.py): the frame count follows video_frames, the track answer
    lists every frame the object is on screen, and a range that is not 2 <= lo <= hi is an error naming it."""
    lens = {len(shapes.make_example("track", s, video_frames=(16, 20))["video"]["frames"]) for s in range(30)}
    assert lens <= set(range(16, 21)) and len(lens) >= 3
    ex = shapes.make_example("track", 5, video_frames=(20, 20))
    assert len(ex["video"]["frames"]) == 20 and ex["turns"][0][1].count(";") >= 5
    for bad in ((1, 5), (9, 8)):
        with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
            shapes.make_example("video_qa", 1, video_frames=bad)


def test_tracks_and_video_points_match_the_masks():
    n_tracks = n_points = 0
    for seed in range(60):
        ex = shapes.make_example("track", seed)
        gt, ans = ex["gt"], ex["turns"][0][1]
        pts = data.parse_points(ans)
        for t, pid, x, y in pts:  # every point lies in its own object's mask at that frame
            f = gt["times"].index(t)
            assert ev.in_mask(gt["masks"][f][gt["objects"][pid - 1]], _px(x), _px(y)), (seed, t, pid)
        assert ev.score_shapes("track", ans, gt, 64) == {"tracking_f1": 1.0, "track_id_f1": 1.0}
        n_tracks += len(pts)
        ex = shapes.make_example("video_point", seed)
        assert ev.score_shapes("video_point", ex["turns"][0][1], ex["gt"], 64) == {"video_pointing_f1": 1.0}
        assert len(data.parse_points(ex["turns"][0][1])) == len(ex["gt"]["objects"])
        n_points += len(ex["gt"]["objects"])
    assert n_tracks > 100 and n_points > 20


def test_tracking_metric_hand_cases():
    m = np.zeros((8, 8), dtype=bool)
    a, b = m.copy(), m.copy()
    a[0:3, 0:3] = True  # object 0 in the top-left corner
    b[5:8, 5:8] = True  # object 1 in the bottom-right corner
    gt = dict(objects=[0, 1], times=[0.0, 0.5, 1.0], masks=[{0: a, 1: b}, {0: a, 1: b}, {0: a}])  # 5 pairs
    good = [(0.0, 1, 1, 1), (0.0, 2, 6, 6), (0.5, 1, 1, 1), (0.5, 2, 6, 6), (1.0, 1, 1, 1)]
    assert ev.track_id_prf(good, gt) == (1.0, 1.0, 1.0)
    swapped = [(t, 3 - i, x, y) for t, i, x, y in good]  # ids are names: any consistent naming is as good
    assert ev.track_id_prf(swapped, gt)[2] == 1.0
    switch = good[:4] + [(1.0, 2, 1, 1)]  # the id jumps to the other object in the last frame
    p, r, f = ev.track_id_prf(switch, gt)
    assert (p, r) == (0.8, 0.8) and f == pytest.approx(0.8)
    assert ev.track_id_prf(good[:2], gt) == pytest.approx((1.0, 0.4, 2 * 0.4 / 1.4))
    assert ev.track_id_prf([], dict(objects=[], times=[0.0], masks=[{}])) == (1.0, 1.0, 1.0)
    assert ev.track_id_prf([(0.0, 1, 1, 1)], dict(objects=[], times=[0.0], masks=[{}]))[2] == 0.0
    # Molmo2's per-frame tracking_prf does not see the jump: every frame's points are on objects
    tracks = {t: {k: (1, 1) if k == 0 else (6, 6) for k in ms} for t, ms in zip(gt["times"], gt["masks"])}
    assert ev.tracking_prf(switch, tracks, masks=dict(zip(gt["times"], gt["masks"]))) == (1.0, 1.0, 1.0)
    # video pointing: right place at another time where the object is visible still counts; wrong place not
    tubes = [{t: ms[k] for t, ms in zip(gt["times"], gt["masks"]) if k in ms} for k in gt["objects"]]
    vp = [(0.0, 1.0, 1.0), (0.0, 6.0, 6.0)]
    assert ev.video_pointing_prf([(0.5, 1, 1), (0.0, 6, 6)], vp, (8, 8), 1.0, tubes)[2] == 1.0
    assert ev.video_pointing_prf([(1.0, 6, 6)], vp, (8, 8), 1.0, tubes)[:2] == (0.0, 0.0)  # object 1 gone at 1.0 s


def test_shapes_video_through_an_mp4_file(tok, make_cfg, tmp_path):
    """The file path of real data: written with PyAV, decoded back at 2 fps, the same frames and times."""
    cfg = make_cfg(image_size=64, patch_size=8)
    mem = shapes.make_video_example("track", 5)
    disk = shapes.make_video_example("track", 5, video_dir=str(tmp_path))
    assert isinstance(disk["video"], str) and disk["video"].endswith(".mp4")
    e_mem = data.encode_example(mem, tok, cfg, {"track": 2.0})
    e_disk = data.encode_example(disk, tok, cfg, {"track": 2.0})
    assert e_disk["input_ids"] == e_mem["input_ids"] and e_disk["timestamps"] == e_mem["timestamps"]
    diff = max(float((data.normalize_pixels(a) - data.normalize_pixels(b)).abs().mean())
               for a, b in zip(e_mem["images"], e_disk["images"]))
    assert diff < 0.05  # lossy H.264, same pictures ([-1, 1] scale)


def test_blind_example_blanks_every_frame():
    ex = shapes.make_example("track", 3)
    bl = ev.blind_example(ex)
    assert len(bl["video"]["frames"]) == len(ex["video"]["frames"]) and bl["video"]["times"] == ex["video"]["times"]
    assert all(len(set(np.asarray(f).reshape(-1, 3).sum(1).tolist())) == 1 for f in bl["video"]["frames"])
    mi = ev.blind_example(shapes.make_example("multi_qa", 3))
    assert all(np.asarray(im).std() == 0 for im in mi["images"])

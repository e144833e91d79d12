"""Readers of the real datasets (readers.py) on rows in their released schemas, as prepare.py copies them (embedded
images written out and named by image_url, image sizes stored in the row), their meta, the column check, and the
real configs' mixtures (config/stage*.py) against READERS and SOURCES."""
import json
import os
import types

import pytest
from PIL import Image

import data
import mixing
import readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_of(tmp_path, name, rows, images=(), videos=(), size=(64, 48)):
    """A jsonl copy of dataset `name` and its media folder: images (URLs) saved as `size` RGB files where media_path
    puts them, videos (ids) as placeholder .mp4 files (readers only check that a video is there). -> (path, media)."""
    media = tmp_path / "media"
    media.mkdir(exist_ok=True)
    for url in images:
        Image.new("RGB", size, (30, 90, 200)).save(readers.media_path(str(media), url))
    for vid in videos:
        (media / f"{vid}.mp4").write_bytes(b"")
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path), str(media)


def read(tmp_path, name, rows, **kw):
    path, media = copy_of(tmp_path, name, rows, **kw)
    return readers.read_dataset(name, path, media, log=lambda s: None)


def hf_url(i, repo="lmms-lab/VQAv2"):
    """An embedded image's name after prepare.py: hf://<repo>/<sha256 of its bytes><ext> (a stand-in hash here)."""
    return f"hf://{repo}/{i:064x}.jpg"


def test_vqa_style_readers_and_their_meta(tmp_path):
    """VQA v2 (all ten answers in meta, trained on multiple_choice_answer, questions of one image grouped into one
    conversation with no meta; the eval split one example per row), DocVQA, TextVQA (the most common answer),
    ChartQA (query, label)."""
    u1, u2 = hf_url(1), hf_url(2)
    ten = [dict(answer=a, answer_confidence="yes", answer_id=k + 1) for k, a in enumerate(["2"] * 7 + ["two"] * 3)]
    rows = [dict(question="How many dogs?", answers=ten, multiple_choice_answer="2", image_url=u1, image_width=64,
                 image_height=48),
            dict(question="What color?", answers=[dict(answer="red", answer_confidence="yes", answer_id=1)] * 10,
                 multiple_choice_answer="red", image_url=u1, image_width=64, image_height=48),
            dict(question="Is it day?", answers=ten[:1], multiple_choice_answer="2", image_url=u2, image_width=64,
                 image_height=48)]
    exs, c = read(tmp_path, "vqa_v2", rows, images=[u1, u2])
    assert c["rows"] == 3 and len(exs) == 2
    assert exs[0]["task"] == "qa" and exs[0]["turns"] == [("How many dogs?", "2"), ("What color?", "red")]
    assert "meta" not in exs[0] and exs[1]["meta"] == {"answers": ["2"]}  # a grouped conversation has no one truth
    exs, _ = read(tmp_path, "vqa_v2_val", rows, images=[u1, u2])  # eval split: one example per row, all answers
    assert len(exs) == 3 and exs[0]["meta"] == {"answers": ["2"] * 7 + ["two"] * 3}
    assert exs[0]["image"] == readers.media_path(str(tmp_path / "media"), u1)
    doc = [dict(questionId="q1", question="What is the date?", answers=["May 5", "5 May"], image_url=u1,
                image_width=64, image_height=48)]
    exs, _ = read(tmp_path, "docvqa_val", doc, images=[u1])
    assert exs[0]["turns"] == [("What is the date?", "May 5")] and exs[0]["meta"] == {"answers": ["May 5", "5 May"]}
    txt = [dict(question="What brand?", answers=["nike", "adidas", "nike"], image_url=u1, image_width=64,
                image_height=48)]
    exs, _ = read(tmp_path, "textvqa", txt, images=[u1])
    assert exs[0]["turns"] == [("What brand?", "nike")] and exs[0]["meta"]["answers"] == ["nike", "adidas", "nike"]
    chart = [dict(query="Peak value?", label=["42"], human_or_machine=0, image_url=u1, image_width=64, image_height=48),
             dict(query="Empty?", label=[], human_or_machine=1, image_url=u1, image_width=64, image_height=48)]
    exs, c = read(tmp_path, "chartqa_test", chart, images=[u1])
    assert exs[0]["turns"] == [("Peak value?", "42")] and exs[0]["meta"] == {"answers": ["42"]} and c["malformed"] == 1


def test_cauldron_multiple_choice_readers(tmp_path):
    """AI2D (options in the user text re-lettered in MC_PROMPT, answered with the letter) and NLVR2 (two images, a
    statement answered True/False asked as options A/B): meta holds the letter; a reply that is no option is
    malformed."""
    u, v = hf_url(3, "HuggingFaceM4/the_cauldron"), hf_url(4, "HuggingFaceM4/the_cauldron")
    user = "Question: Which stage comes first?\nChoices:\nA. egg\nB. larva\nC. adult\nAnswer with the letter."
    rows = [dict(texts=[dict(user=user, assistant="Answer: A", source="AI2D")], image_url=[u], image_sizes=[[64, 48]]),
            dict(texts=[dict(user=user, assistant="Answer: D", source="AI2D")], image_url=[u], image_sizes=[[64, 48]])]
    exs, c = read(tmp_path, "ai2d", rows, images=[u])
    q = readers.MC_PROMPT.format(question="Which stage comes first?", options="A. egg\nB. larva\nC. adult")
    assert exs == [dict(task="qa", image=readers.media_path(str(tmp_path / "media"), u), turns=[(q, "A")],
                        meta={"answer": "A"})] and c["malformed"] == 1
    rows = [dict(texts=[dict(user="The left image has two dogs.", assistant="False", source="NLVR2")],
                 image_url=[u, v], image_sizes=[[64, 48], [64, 48]]),
            dict(texts=[dict(user="Is there a cat?", assistant="Answer: yes", source="NLVR2")],
                 image_url=[u, v], image_sizes=[[64, 48], [64, 48]])]
    exs, _ = read(tmp_path, "nlvr2", rows, images=[u, v])
    assert exs[0]["task"] == "multi_qa" and len(exs[0]["images"]) == 2 and exs[0]["meta"] == {"answer": "B"}
    assert exs[0]["turns"][0][0] == readers.MC_PROMPT.format(question="The left image has two dogs.",
                                                             options="A. True\nB. False")
    assert exs[1]["turns"] == [(readers.MC_PROMPT.format(question="Is there a cat?", options="A. Yes\nB. No"), "A")]


def test_pixmo_eval_readers(tmp_path):
    """PixMo-Count validation: one example per row (the training reader groups by image), meta count; PixMo-Points-
    Eval: 0-100 points to pixels by the masks' shape, masks and size in meta."""
    u = "http://img/count.jpg"
    rows = [dict(image_url=u, label="cats", count=3, image_width=64, image_height=48),
            dict(image_url=u, label="dogs", count=0, image_width=64, image_height=48)]
    exs, _ = read(tmp_path, "pixmo_count_val", rows, images=[u])
    assert [e["meta"] for e in exs] == [{"count": 3}, {"count": 0}]
    assert exs[1]["turns"] == [(data.COUNT_PROMPT.format(label="dogs"), data.NONE_ANSWER)]
    assert len(read(tmp_path, "pixmo_count", rows, images=[u])[0]) == 1  # training: grouped per image
    mask = [[False] * 64 for _ in range(48)]
    mask[24][16] = True
    rows = [dict(image_url=u, label="eye", points=[dict(x=25.0, y=50.0)], masks=[mask], image_width=64,
                 image_height=48)]
    (ex,), _ = read(tmp_path, "pixmo_points_eval", rows, images=[u])
    assert ex["task"] == "point" and ex["meta"]["points"] == [(16.0, 24.0)] and ex["meta"]["size"] == (64, 48)
    assert ex["meta"]["masks"] == [mask] and ex["turns"][0][1] == '<points coords="1 1 250 500">eye</points>'


def test_video_point_count_and_track_readers(tmp_path):
    """Academic points (count by pointing on even rows, point on odd ones, > 60 points left out), VideoPointEval
    (pixel points, counting question, per-point masks by time), VideoCountEval, VideoTrackEval (objects numbered by
    mask_id, every annotated frame in meta, the answer at whole seconds), and the training track reader's meta."""
    pts = [[dict(x=50, y=25)], [dict(x=10, y=90), dict(x=20, y=90)]]
    rows = [dict(video_name="v1", category="Dog", count=3, timestamps=[1.0, 0.5], points=pts, subset="object"),
            dict(video_name="v1", category="Dog", count=3, timestamps=[1.0, 0.5], points=pts, subset="object"),
            dict(video_name="v1", category="Dog", count=61, timestamps=[0.0], points=[[]], subset="object")]
    exs, c = read(tmp_path, "academic_points", rows, videos=["v1"])
    groups = '<points coords="0.5 1 100 900 2 200 900;1.0 3 500 250">dog</points>'
    assert exs[0]["task"] == "video_point" and exs[0]["turns"][0][1] == groups  # row 1: pointing
    assert exs[1]["task"] == "video_count" and exs[1]["turns"] == [
        (data.COUNT_PROMPT.format(label="dog"), data.COUNT_ANSWER.format(points=groups, n=3))]
    assert exs[0]["meta"] == {"points": [(0.5, 10, 90), (0.5, 20, 90), (1.0, 50, 25)], "count": 3, "size": (100, 100)}
    assert c["filtered"] == 1
    rle = {"size": [48, 64], "counts": [5, 2, 3065]}
    rows = [dict(video_id="v1", label="cup", width=64, height=48, two_fps_timestamps=[1.0, 0.5],
                 points=[dict(x=32, y=24), dict(x=16, y=12)], masks=[[dict(frame_id=2, rle=rle)], []],
                 video_source="x", video_duration=3.0)]
    (ex,), _ = read(tmp_path, "videopoint_eval", rows, videos=["v1"])
    assert ex["meta"]["points"] == [(1.0, 32, 24), (0.5, 16, 12)] and ex["meta"]["count"] == 2
    assert ex["meta"]["size"] == (64, 48) and ex["meta"]["masks"] == [{1.0: rle}, {}]
    assert ex["turns"][0] == (data.COUNT_PROMPT.format(label="cup"), data.COUNT_ANSWER.format(
        points='<points coords="0.5 1 250 250;1.0 2 500 500">cup</points>', n=2))
    rows = [dict(video_id="v1", label="cup", count=4, question="How many cups are on the table?", category="object")]
    (ex,), _ = read(tmp_path, "videocount_eval", rows, videos=["v1"])
    assert ex["turns"] == [("How many cups are on the table?", "4")] and ex["meta"]["count"] == 4
    rows = [dict(clip="c1", exp="the runner", w=64, h=48, fps=2, mask_id=["7", "9"], video="full", video_dataset="sav",
                 points=[dict(object_id="9", points=[[32, 24], None, [16, 12]]),
                         dict(object_id="7", points=[None, [64, 0], None])])]
    (ex,), _ = read(tmp_path, "videotrack_eval", rows, videos=["c1"])
    assert ex["meta"] == {"tracks": {0.0: {2: (32.0, 24.0)}, 0.5: {1: (64.0, 0.0)}, 1.0: {2: (16.0, 12.0)}},
                          "size": (64, 48)}
    assert ex["turns"][0] == (data.TRACK_PROMPT.format(label="the runner"),
                              '<tracks coords="0.0 2 500 500;1.0 2 250 250">the runner</tracks>')
    rows = [dict(clip="c1", video="full", expression="the ball", width=32, height=32, frame_trajectories=[
        dict(frame=0, time=0.0, points=[dict(id=3, point=[16, 8], occluded=False)]),
        dict(frame=1, time=0.5, points=[dict(id=3, point=[20, 8], occluded=True)])])]
    (ex,), _ = read(tmp_path, "molmo2_track", rows, videos=["c1"])
    assert ex["video"].endswith("c1.mp4") and ex["meta"] == {"tracks": {0.0: {3: (16, 8)}}, "size": (32, 32)}


def test_wrong_columns_are_one_clear_error(tmp_path):
    """A copy whose rows lack the columns SOURCES names (here a DocVQA copy read as ChartQA, and an embedded-image
    copy without image_url) is one line naming the file, the dataset and the missing columns."""
    rows = [dict(question="What is the date?", answers=["May 5"], image_url=hf_url(1), image_width=64,
                 image_height=48)]
    path, media = copy_of(tmp_path, "chartqa", rows, images=[hf_url(1)])
    with pytest.raises(ValueError) as e:
        readers.read_dataset("chartqa", path, media, log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "chartqa (HuggingFaceM4/ChartQA)" in msg and "['query', 'label']" in msg
    rows = [dict(question="Q?", answers=["a"], image={"bytes": None, "path": "x.jpg"})]
    path, media = copy_of(tmp_path, "docvqa", rows)
    with pytest.raises(ValueError, match=r"docvqa \(lmms-lab/DocVQA\): .*docvqa.jsonl lacks the columns "
                                         r"\['image_url'\]"):
        readers.read_dataset("docvqa", path, media, log=lambda s: None)


def test_stored_image_sizes_open_no_image(tmp_path, monkeypatch):
    """A copy that stores each image's size is read without opening one image (points are scaled by the stored
    size); without the sizes every image's header is read once."""
    urls = [f"http://img/{k}.jpg" for k in range(3)]
    rows = [dict(image_url=u, label="dot", points=[dict(x=32, y=12)], collection_method="pointing", image_width=64,
                 image_height=48) for u in urls]
    path, media = copy_of(tmp_path, "pixmo_points", rows, images=urls)
    opens = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opens.append(a[0]) or real_open(*a, **k))
    readers._image_size.cache_clear()
    exs, _ = readers.read_dataset("pixmo_points", path, media, log=lambda s: None)
    assert opens == [] and exs[0]["turns"][0][1] == '<points coords="1 1 500 250">dot</points>'
    assert exs[0]["meta"] == {"points": [(32, 12)], "masks": None, "size": (64, 48)}
    for r in rows:
        del r["image_width"], r["image_height"]
    path, media = copy_of(tmp_path, "pixmo_points", rows, images=urls)
    readers.read_dataset("pixmo_points", path, media, log=lambda s: None)
    assert len(opens) == 3


def test_meta_leaves_encoding_and_collation_alone(tmp_path, tok, cfg):
    """An example's meta is not read by encode_example: the same ids, labels and weights with and without it, and
    the encoded examples collate."""
    u = hf_url(5)
    rows = [dict(question="How many dogs?", answers=["2"] * 10, image_url=u, image_width=64, image_height=48)]
    (ex,), _ = read(tmp_path, "textvqa_val", rows, images=[u])
    bare = {k: v for k, v in ex.items() if k != "meta"}
    a, b = (data.encode_example(e, tok, cfg, {"qa": 1.0}) for e in (ex, bare))
    assert "meta" in ex and a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert a["loss_weights"] == b["loss_weights"]
    assert data.collate([a, b], tok.pad, 512)["input_ids"].shape[0] == 2


def config_of(name):
    """The globals a config file sets, run as train.py runs it (with __file__, so stage2/3 find stage1/2)."""
    path = os.path.join(ROOT, "config", name)
    g = {"__file__": path}
    exec(open(path).read(), g)
    return {k: v for k, v in g.items() if not k.startswith("__") and not isinstance(v, types.ModuleType)}


@pytest.mark.parametrize("name", ["stage1.py", "stage2.py", "stage3.py"])
def test_real_configs_name_only_datasets_with_readers(name):
    """Every dataset a real config mixes, gives a path or evaluates on has a SOURCES entry whose reader exists; its
    flat groups are groups of its mixture; a packed row holds a whole video of max_frames frames."""
    c = config_of(name)
    names = {n for _, leaves in c["mixture"].values() for n in leaves} | set(c["data_paths"])
    names |= set(c.get("eval_datasets", ())) | set(c.get("eval_data_paths", {}))
    assert names and names <= set(readers.SOURCES), sorted(names - set(readers.SOURCES))
    for n in names:
        assert readers.reader_of(n) is readers.READERS[readers.SOURCES[n].reader or n]
    assert set(c.get("flat_groups", ())) <= set(c["mixture"])
    assert c.get("max_images_per_row", 0) >= c.get("max_frames", 0) or name == "stage1.py"
    for n in readers.SOURCES:  # every entry resolves to a reader, eval entries included
        assert readers.reader_of(n) in readers.READERS.values()


def test_flat_groups_keep_their_rates_with_real_sizes():
    """Stage 2's video_pointing group mixes at 0.4 / 0.3 / 0.1 / 0.2 however big the local copies are (train.py
    replaces dataset_sizes by the copies' sizes); the sqrt rule alone would reweight it by size."""
    import train
    c = config_of("stage2.py")
    sizes = dict(c["dataset_sizes"], videopoint_0_5=400_000, videopoint_6_25=90_000, videopoint_26_60=4_000,
                 academic_points=25_000)  # as the copies would report them
    C = types.SimpleNamespace(**dict(c, dataset_sizes=sizes, dataset="molmo2"))
    w, walk = train.mixture_of(C)
    group, (rate, members) = "video_pointing", c["mixture"]["video_pointing"]
    total = sum(r for r, _ in c["mixture"].values())
    for ds, r in members.items():
        assert w[ds] == pytest.approx(rate / total * r / sum(members.values()), rel=1e-12)
    assert walk == sizes  # the sampler still walks each copy's real size
    sqrt = mixing.mixture_weights(c["mixture"], sizes, c["dataset_caps"])  # without flat_groups: reweighted
    assert sqrt["videopoint_26_60"] < 0.5 * w["videopoint_26_60"]
    with pytest.raises(ValueError, match=r"flat groups \['video'\] are not groups of the mixture"):
        mixing.mixture_weights(c["mixture"], sizes, flat=("video",))


def test_packed_rows_must_hold_a_whole_video():
    """A packed run whose rows cannot hold one video of max_frames frames stops at the config check, not mid-run
    when data.Packer meets its first long video; stage 3 as written passes it."""
    import train
    defaults = {k: getattr(train, k) for k in train.CONFIG_KEYS}
    stage3 = os.path.join(ROOT, "config", "stage3.py")
    C = types.SimpleNamespace(**train.configure([stage3, "--max_images_per_row=128"], defaults))
    with pytest.raises(SystemExit, match=r"max_images_per_row=128 < max_frames=384: a packed row must hold one video"):
        train.check_config(C)
    C = types.SimpleNamespace(**train.configure([stage3, "--dry_run=True"], defaults))
    train.check_config(C)
    assert (C.max_frames, C.max_images_per_row, C.packing) == (384, 384, True)

"""The shapes world (shapes.py) and the dataset mixture (mixing.py)."""
import random
from collections import Counter

import numpy as np
import pytest

import data
import eval as ev
import mixing
import shapes

TASKS = ["caption", "qa", "point", "count", "text"]


@pytest.mark.parametrize("task", TASKS)
def test_make_example_deterministic(task):
    a, b = shapes.make_example(task, 12345), shapes.make_example(task, 12345)
    c = shapes.make_example(task, 12346)
    assert a["task"] == task and a["turns"] == b["turns"]
    if task == "text":
        assert a["image"] is None
    else:
        assert a["image"].mode == "RGB" and a["image"].size == (64, 64)
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
        assert shapes.make_example(task, 5, size=32)["image"].size == (32, 32)
    # eval seeds and training seeds are different scenes
    t = shapes.make_example(task, shapes.TRAIN_SEED_OFFSET + 12345)
    assert t["turns"] != a["turns"] or (task != "text" and
                                        not np.array_equal(np.asarray(t["image"]), np.asarray(a["image"])))


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown"):
        shapes.make_example("tracking", 0)


def test_train_seeds_are_disjoint_from_eval_seeds():
    s = mixing.MixtureSampler({"a": 0.5, "b": 0.5}, seed=0, rank=1, world_size=2)
    idx = [i for _, i in s.take(2000)]
    assert min(idx) >= 0 and len(set(idx)) == len(idx)  # procedural: a new scene every draw
    assert shapes.TRAIN_SEED_OFFSET >= 10 ** 6  # train.py uses TRAIN_SEED_OFFSET + idx, eval uses [0, 1e6)


def test_difficulty_floor():
    n_obj, kinds, colors, radii = Counter(), set(), set(), []
    for seed in range(300):
        sc = shapes.make_scene(random.Random(seed), 64)
        n_obj[len(sc.objects)] += 1
        for o in sc.objects:
            kinds.add(o["shape"])
            colors.add(o["color"])
            radii.append(o["r"])
            assert o["mask"].shape == (64, 64) and o["mask"].sum() > 10
        # (nearly) non-overlapping objects, and the image shows each object's colour on its mask
        masks = np.stack([o["mask"] for o in sc.objects])
        assert (masks.sum(0) > 1).sum() == 0  # disjoint masks (see test_objects_never_overlap)
        img = np.asarray(sc.image)
        for o in sc.objects:
            assert (img[o["mask"]] == shapes.COLORS[o["color"]]).all(1).mean() > 0.95
    assert set(n_obj) == set(range(1, 7))
    assert kinds == set(shapes.SHAPES) and len(kinds) == 4
    assert colors == set(shapes.COLORS) and len(colors) == 5
    assert max(radii) / min(radii) >= 1.8


def test_objects_never_overlap():
    for seed in range(2000):
        sc = shapes.make_scene(random.Random(seed), 64)
        assert np.stack([o["mask"] for o in sc.objects]).sum(0).max() <= 1, seed


def test_pointing_answers_and_masks():
    counts = Counter()
    for seed in range(300):
        task = "point" if seed % 2 else "count"
        ex = shapes.make_example(task, seed)
        gt, (q, a) = ex["gt"], ex["turns"][0]
        counts[gt["count"]] += 1
        assert len(gt["points"]) == len(gt["masks"]) == gt["count"]
        assert gt["label"] in q
        for (x, y), m in zip(gt["points"], gt["masks"]):
            assert m[int(y), int(x)]  # each gt mask contains its gt point
        pts = data.parse_points(a)
        if gt["count"] == 0:
            assert a == shapes.NONE_ANSWER and pts == []
            continue
        assert len(pts) == gt["count"]
        assert f'">{gt["label"]}</points>' in a
        if task == "count":
            assert a.endswith(f"shows a total of {gt['count']}.")
        # the written answer, read back and scaled to pixels (Molmo2's convention: pixel centres at integers, so
        # -0.5 px from shapes' [col, col + 1) pixels; eval.score_shapes), scores perfectly
        px = [(x / 1000 * 64 - 0.5, y / 1000 * 64 - 0.5) for _, _, x, y in pts]
        assert ev.pointing_prf(px, [(x - 0.5, y - 0.5) for x, y in gt["points"]], gt["masks"]) == (1.0, 1.0, 1.0)
    assert set(range(5)) <= set(counts)


def test_absent_rate_sets_the_share_of_none_answers():
    def none_share(rate):
        exs = [shapes.make_example("point", s, absent_rate=rate) for s in range(200)]
        return sum(ex["gt"]["count"] == 0 for ex in exs) / len(exs), exs
    share, default = none_share(shapes.ABSENT_RATE)
    assert 0.1 < share < 0.3  # the eval's share (a failed search for an absent label falls back to a present one)
    assert [e["turns"] for e in default] == [shapes.make_example("point", s)["turns"] for s in range(200)]
    assert none_share(0.0)[0] == 0.0
    assert none_share(1.0)[0] > 0.8


def test_multi_rate_sets_the_share_of_several_object_answers():
    """multi_rate=0 is the stream without the key (the same draws); at 1 every present target whose scene allows it
    picks two or more objects, and each picked object fits the label; the absent share does not move."""
    def exs(**kw):
        return [shapes.make_example("count", s, **kw) for s in range(300)]
    assert [e["turns"] for e in exs(multi_rate=0.0)] == [e["turns"] for e in exs()]

    def shares(es):
        n = [e["gt"]["count"] for e in es]
        return sum(c >= 2 for c in n) / len(n), sum(c == 0 for c in n) / len(n)
    (multi0, none0), (multi1, none1) = shares(exs()), shares(exs(multi_rate=1.0))
    assert multi0 < 0.3 and multi1 > 0.6, (multi0, multi1)  # the scenes' own share, then most of the present ones
    assert abs(none1 - none0) < 0.02  # the absent draws come first and are the same
    for e in exs(multi_rate=1.0):
        words = e["gt"]["label"].split()
        for o in e["objects"]:
            fits = all(w in (o["color"], shapes.plural(o["shape"]), "shapes") for w in words)
            assert fits == any(o["cx"] == x and o["cy"] == y for x, y in e["gt"]["points"]), e["gt"]["label"]


def test_max_objects_caps_the_scene_and_the_default_is_the_floor():
    # eval.py --max_objects: 1 object = the coordinate read-out alone; the default keeps 1..6 (the same draws)
    one = [shapes.make_example("point", s, max_objects=1) for s in range(60)]
    assert all(ex["gt"]["count"] <= 1 for ex in one)
    counts = [int(shapes.make_example("caption", s, max_objects=2)["turns"][0][1].split()[2]) for s in range(60)]
    assert set(counts) == {1, 2}
    with pytest.raises(ValueError, match="max_objects"):
        shapes.make_example("point", 0, max_objects=0)
    assert [shapes.make_example("point", s, max_objects=6)["turns"] for s in range(50)] == \
        [shapes.make_example("point", s)["turns"] for s in range(50)]


def test_qa_and_caption_consistent_with_scene():
    for seed in range(40):
        ex = shapes.make_example("qa", seed)
        q, a = ex["turns"][0]
        assert ex["gt"]["answer"] == a
        if q.startswith("What colour"):
            assert a in shapes.COLORS
        elif q.startswith("What shape"):
            assert a in shapes.SHAPES
        elif q.startswith("Is there"):
            assert a in ("yes", "no")
        else:
            assert a.isdigit() and 1 <= int(a) <= 6
        c = shapes.make_example("caption", seed)["turns"][0][1]
        n = int(c.split()[2])
        assert 1 <= n <= 6 and c.count(" at the ") == n
    t = shapes.make_example("text", 0)
    q, a = t["turns"][0]
    if "plus" in q:
        x, y = [int(w.strip("?")) for w in q.split() if w.strip("?").isdigit()]
        assert int(a) == x + y


def test_multi_turn_examples():
    full = 0
    for seed in range(20):
        for task in ("point", "count", "qa"):
            one, many = shapes.make_example(task, seed), shapes.make_example(task, seed, n_turns=3)
            assert np.array_equal(np.asarray(one["image"]), np.asarray(many["image"]))  # the same scene
            assert many["turns"][0] == one["turns"][0]                               # first turn unchanged
            assert one["gt"].keys() == many["gt"].keys() and \
                all(np.array_equal(np.asarray(one["gt"][k]), np.asarray(many["gt"][k])) for k in one["gt"])
            qs = [q for q, _ in many["turns"]]
            assert 1 <= len(qs) <= 3 and len(set(qs)) == len(qs)  # distinct questions only
            full += len(qs) == 3
    assert full >= 30  # usually all three
    for task in ("caption", "text"):
        assert len(shapes.make_example(task, 1, n_turns=3)["turns"]) == 1


# ---------------------------------------------------------------------------------------------------------
# mixing

def test_mixture_weights_groups():
    w = mixing.mixture_weights({"a": (0.6, {"x": 1, "y": 1}), "b": (0.4, {"z": 1})})
    assert w == pytest.approx({"x": 0.3, "y": 0.3, "z": 0.4})
    w = mixing.mixture_weights({"a": (0.5, {"x": 3, "y": 1}), "b": (0.5, {"z": 2})})
    assert w == pytest.approx({"x": 0.375, "y": 0.125, "z": 0.5})
    w = mixing.mixture_weights({"x": 2, "y": 6})  # flat: normalised
    assert w == pytest.approx({"x": 0.25, "y": 0.75})
    assert sum(mixing.mixture_weights({"a": (0.7, {"x": 1}), "b": (0.7, {"y": 1})}).values()) == pytest.approx(1)
    for bad in ({"x": -1, "y": 2}, {"x": 0}, {"a": (0.5, {"x": 0})}):
        with pytest.raises(ValueError):
            mixing.mixture_weights(bad)


# The seed's example table (SQRT-PROPORTIONAL SAMPLING): 1,000k -> 0.25, 440k -> 0.16, 710k -> 0.21,
# 220k -> 0.12, and "..." for the rest. The rest must carry sqrt-mass ~1,075 for those four figures to hold
# (1000 / 0.25 = 4000 in all, to rounding): here three more sets of 500k, 100k and 2.5k.
SEED_SIZES = {"Molmo2-CapQA": 1_000_000, "VQA-v2": 440_000, "PixMo-Cap": 710_000, "Molmo2-Track": 220_000,
              "other-a": 500_000, "other-b": 100_000, "other-c": 2_500}


def test_sqrt_proportional_reproduces_the_seed_table():
    w = mixing.mixture_weights({ds: 1.0 for ds in SEED_SIZES}, sizes=SEED_SIZES)
    root = sum(n ** 0.5 for n in SEED_SIZES.values())
    for ds, n in SEED_SIZES.items():
        assert w[ds] == pytest.approx(n ** 0.5 / root, rel=1e-12)  # w_i = sqrt(n_i) / sum_j sqrt(n_j)
    seed_table = {"Molmo2-CapQA": 0.25, "VQA-v2": 0.16, "PixMo-Cap": 0.21, "Molmo2-Track": 0.12}
    assert {ds: round(w[ds], 2) for ds in seed_table} == seed_table
    # sqrt flattens: the largest set is 400x the smallest, its weight only 20x
    assert w["Molmo2-CapQA"] / w["other-c"] == pytest.approx(20.0)
    # fixed rule on the same mixture: sizes ignored
    assert mixing.mixture_weights({ds: 1.0 for ds in SEED_SIZES}) == pytest.approx(
        {ds: 1 / 7 for ds in SEED_SIZES})


def test_sqrt_groups_rates_and_caps():
    sizes = {"cap": 710_000, "qa": 90_000, "vqa": 440_000, "doc": 40_000, "big": 4_000_000, "pt": 10_000}
    mix = {"demo": (0.15, {"cap": 1.0, "qa": 1.5}),          # Molmo2: Molmo2-Cap at sampling_rate 1.5
           "academic": (0.25, {"vqa": 1.0, "doc": 1.0, "big": 1.0}),
           "pointing": (0.10, {"pt": 1.0})}
    caps = {"cap": 100_000, "big": 0.01}                      # an int replaces the size, a fraction scales it
    w = mixing.mixture_weights(mix, sizes, caps)
    assert sum(w.values()) == pytest.approx(1.0)
    tot = 0.15 + 0.25 + 0.10
    for g, (rate, members) in mix.items():  # every group keeps its rate, whatever its datasets' sizes
        assert sum(w[d] for d in members) == pytest.approx(rate / tot)
    assert w["qa"] / w["cap"] == pytest.approx(1.5 * 300 / 316.2278, rel=1e-6)  # sqrt(90k)*1.5 vs sqrt(100k cap)
    assert w["big"] / w["vqa"] == pytest.approx(200 / 663.3250, rel=1e-6)       # sqrt(4M * 0.01) = 200
    assert mixing.capped_size(1000, None) == 1000 and mixing.capped_size(1000, 0.5) == 500
    # a group named flat keeps its rates, with or without sizes (Molmo2 root_size_factor=1); any other group
    # missing a size is an error naming it
    w2 = mixing.mixture_weights({"a": (0.5, {"x": 1.0, "y": 3.0}), "b": (0.5, {"vqa": 1.0})}, sizes, flat=("a",))
    assert w2["y"] == pytest.approx(3 * w2["x"])
    w3 = mixing.mixture_weights({"a": (0.5, {"pt": 1.0, "doc": 3.0}), "b": (0.5, {"vqa": 1.0})}, sizes, flat=("a",))
    assert w3["doc"] == pytest.approx(3 * w3["pt"])  # sizes 40k and 10k ignored
    with pytest.raises(ValueError, match="group 'a' has no size for \\['x'\\]"):
        mixing.mixture_weights({"a": (1.0, {"vqa": 1.0, "x": 1.0})}, sizes)
    table = mixing.mixture_table(w, sizes, 1000, caps)
    assert "710,000 (100,000)" in table and "316" in table and "█" in table


def test_sampler_frequencies_and_determinism():
    w = {"x": 0.3, "y": 0.6, "z": 0.1}
    a, b = mixing.MixtureSampler(w, seed=3), mixing.MixtureSampler(w, seed=3)
    assert a.take(500) == b.take(500)
    assert mixing.MixtureSampler(w, seed=4).take(50) != mixing.MixtureSampler(w, seed=3).take(50)
    freq = Counter(d for d, _ in a.take(10000))
    for k, p in w.items():
        assert abs(freq[k] / 10000 - p) < 0.02


def test_sampler_resume_is_exact():
    w = {"x": 0.5, "y": 0.3, "z": 0.2}
    sizes = {"x": 1000, "y": 300}                             # z is procedural
    s = mixing.MixtureSampler(w, sizes, seed=7, rank=1, world_size=4)
    s.take(5000)  # past a chunk boundary and several epochs of x and y
    saved = s.state()
    want = s.take(1000)
    r = mixing.MixtureSampler(w, sizes, seed=7, rank=1, world_size=4)
    r.load_state(saved)
    assert r.take(1000) == want
    with pytest.raises(ValueError, match="rank 1 of 4"):
        mixing.MixtureSampler(w, sizes, seed=7, rank=0, world_size=4).load_state(saved)


def test_sampler_finite_datasets_epochs_and_ranks():
    w, sizes, W = {"x": 0.7, "y": 0.3}, {"x": 5000, "y": 2000}, 4
    ranks = [mixing.MixtureSampler(w, sizes, seed=0, rank=r, world_size=W) for r in range(W)]
    per_step = 32
    seen = {r: set() for r in range(W)}
    for step in range(20):
        draws = [s.take(per_step) for s in ranks]
        flat = [d for ds in draws for d in ds]
        assert len(set(flat)) == len(flat)  # two ranks never draw the same example at the same step
        for r, ds in enumerate(draws):
            seen[r] |= set(ds)
        assert all(0 <= i < sizes[d] for d, i in flat)
    for r in range(W):  # within the first epoch, ranks are disjoint over the whole run
        for q in range(r + 1, W):
            assert not seen[r] & seen[q]
    # one rank alone walks a whole epoch of y before repeating anything
    s = mixing.MixtureSampler({"y": 1.0}, {"y": 2000}, seed=0)
    ep1, ep2 = [i for _, i in s.take(2000)], [i for _, i in s.take(2000)]
    assert sorted(ep1) == list(range(2000)) and sorted(ep2) == list(range(2000)) and ep1 != ep2

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
    idx = [i for step in range(0, 5000, 500) for _, i in s.batch(32, step, micro=3)]
    assert min(idx) >= 0  # train.py uses TRAIN_SEED_OFFSET + idx: always >= 1e6, eval uses [0, 1e6)
    assert shapes.TRAIN_SEED_OFFSET >= 10 ** 6


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
        # the written answer, read back and scaled to pixels, scores perfectly
        px = [(x / 1000 * 64, y / 1000 * 64) for _, _, x, y in pts]
        assert ev.pointing_prf(px, gt["points"], gt["masks"]) == (1.0, 1.0, 1.0)
    assert set(range(5)) <= set(counts)


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
    for bad in ({"x": -1, "y": 2}, {"x": 0}):
        with pytest.raises(ValueError):
            mixing.mixture_weights(bad)


def test_sampler_deterministic_and_frequencies():
    w = {"x": 0.3, "y": 0.6, "z": 0.1}
    s = mixing.MixtureSampler(w, seed=3)
    assert s.batch(50, step=7) == mixing.MixtureSampler(w, seed=3).batch(50, step=7)
    assert s.batch(50, step=7) != s.batch(50, step=8)
    assert s.batch(50, step=7) != mixing.MixtureSampler(w, seed=4).batch(50, step=7)
    assert s.batch(50, step=7, micro=0) != s.batch(50, step=7, micro=1)
    s.step = 7
    assert s.batch(50) == s.batch(50, step=7)  # the default step is the sampler's own
    draws = [d for step in range(20) for d, _ in s.batch(500, step)]
    freq = Counter(draws)
    for k, p in w.items():
        assert abs(freq[k] / len(draws) - p) < 0.02
    s2 = mixing.MixtureSampler(w, seed=0)
    s2.load_state(s.state())
    assert s2.batch(10, 3) == s.batch(10, 3) and s2.step == 7


def test_sampler_ranks_and_indices_unique():
    w = {"x": 0.5, "y": 0.5}
    r0 = mixing.MixtureSampler(w, seed=0, rank=0, world_size=2)
    r1 = mixing.MixtureSampler(w, seed=0, rank=1, world_size=2)
    assert [d for d, _ in r0.batch(64, 0)] != [d for d, _ in r1.batch(64, 0)]
    seen = []
    for step in range(10):
        for micro in range(3):
            for r in (r0, r1):
                seen += [i for _, i in r.batch(16, step, micro)]
    assert len(seen) == len(set(seen))  # never the same example twice, across ranks, steps, micro-batches

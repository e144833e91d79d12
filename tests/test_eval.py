"""Metrics and the held-out shapes evaluation (eval.py)."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch

import data
import eval as ev
import shapes


def brute_force(cost):
    n, m = cost.shape
    if n <= m:
        return min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
    return min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))


def test_hungarian_vs_brute_force():
    rng = np.random.default_rng(0)
    shapes_ = [(1, 1), (1, 4), (4, 1), (3, 3), (2, 5), (5, 2), (4, 4), (3, 6), (6, 3), (5, 5)]
    for trial in range(60):
        n, m = shapes_[trial % len(shapes_)]
        cost = rng.random((n, m)) * 10 if trial % 2 else rng.integers(0, 4, (n, m)).astype(float)  # ties too
        pairs = ev.hungarian(cost)
        assert len(pairs) == min(n, m)
        rows, cols = [r for r, _ in pairs], [c for _, c in pairs]
        assert len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert all(0 <= r < n and 0 <= c < m for r, c in pairs)
        assert sum(cost[r, c] for r, c in pairs) == pytest.approx(brute_force(cost))
        assert pairs == sorted(pairs)
    assert ev.hungarian(np.zeros((0, 3))) == [] and ev.hungarian(np.zeros((3, 0))) == []
    # greedy would take (0,0)=1 then (1,1)=100; optimal is the anti-diagonal 2 + 2
    assert ev.hungarian([[1, 2], [2, 100]]) == [(0, 1), (1, 0)]


def _masks(*boxes, size=20):
    out = []
    for x0, y0, x1, y1 in boxes:
        m = np.zeros((size, size), bool)
        m[y0:y1, x0:x1] = True
        out.append(m)
    return out


def test_pointing_prf_cases():
    assert ev.pointing_prf([], [], []) == (1.0, 1.0, 1.0)
    assert ev.pointing_prf([(3, 3)], [], []) == (0.0, 0.0, 0.0)  # a point where there is nothing: all three 0
    assert ev.pointing_prf([], [(3, 3)], _masks((0, 0, 5, 5))) == (0.0, 0.0, 0.0)
    masks = _masks((0, 0, 6, 3), (10, 10, 15, 15))  # a wide box (x 0-5, y 0-2) and a square
    gt = [(2, 1), (12, 12)]
    assert ev.pointing_prf([(5, 1), (14, 11)], gt, masks) == (1.0, 1.0, 1.0)
    assert ev.pointing_prf([(1, 5), (14, 11)], gt, masks) == pytest.approx((0.5, 0.5, 0.5))  # masks are [y, x]
    # one hit, one miss (the second point lands next to, not inside, the second object)
    assert ev.pointing_prf([(1, 1), (16, 12)], gt, masks) == pytest.approx((0.5, 0.5, 0.5))
    # all predictions outside the masks
    assert ev.pointing_prf([(7, 7), (18, 2)], gt, masks) == (0.0, 0.0, 0.0)
    # more predictions than ground truth: one hit among three
    p, r, f = ev.pointing_prf([(2, 1), (8, 8), (19, 19)], [(2, 1)], masks[:1])
    assert (p, r) == pytest.approx((1 / 3, 1.0)) and f == pytest.approx(0.5)
    # two predictions inside the same object count once
    assert ev.pointing_prf([(2, 1), (3, 1)], gt, masks) == pytest.approx((0.5, 0.5, 0.5))
    # fewer predictions than ground truth
    assert ev.pointing_prf([(12, 12)], gt, masks) == pytest.approx((1.0, 0.5, 2 / 3))
    # matching is by distance (Hungarian), not by order of the lists
    assert ev.pointing_prf([(12, 13), (1, 2)], gt, masks) == (1.0, 1.0, 1.0)
    # out of the image: a miss, not a crash
    assert ev.pointing_prf([(25, 3), (3, 99)], gt, masks) == (0.0, 0.0, 0.0)


def test_normalize_answer():
    assert ev.normalize_answer("Red.") == "red"
    assert ev.normalize_answer("  Yes. ") == "yes"
    assert ev.normalize_answer("STAR") == ev.normalize_answer("star.")
    assert ev.normalize_answer("3") == "3"
    assert ev.normalize_answer("no") != ev.normalize_answer("yes")
    assert ev.normalize_answer("a.b") == "a.b"


class Oracle(torch.nn.Module):
    """Stands in for the model: answers each eval prompt from a list, in the order evaluate_shapes asks."""

    def __init__(self, tok, answers):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.batches = tok, list(answers), []

    def generate(self, batch, max_new_tokens, stop_id):
        assert stop_id == self.tok.chat_end
        self.batches.append(batch)
        B = batch["input_ids"].shape[0]
        out, self.answers = self.answers[:B], self.answers[B:]
        return [self.tok.encode(a) for a in out]


def _gt_answers(tasks, n, size):
    return [shapes.make_example(t, s, size)["turns"][0][1] for t in tasks for s in range(n)]


def test_evaluate_shapes_oracle_scores_one(tok, cfg):
    tasks = ("point", "count", "qa")
    m = Oracle(tok, _gt_answers(tasks, 6, cfg.image_size))
    metrics, records = ev.evaluate_shapes(m, tok, cfg, n_prompts=6, tasks=tasks, batch_size=4)
    assert metrics == {"pointing_f1": 1.0, "count_acc": 1.0, "qa_acc": 1.0}
    assert len(records) == 18 and all(r[-1] == 1.0 for r in records)
    assert m.training and m.answers == []
    b = m.batches[0]
    assert b["input_ids"].shape[0] == 4 and len(m.batches) == 6  # 6 prompts per task in batches of 4
    assert bool(b["attention_mask"][:, -1].all())  # left padded: every prompt ends in the last column
    last = [tok.decode(row[am].tolist()) for row, am in zip(b["input_ids"], b["attention_mask"])]
    assert all(t.endswith("<|im_start|>assistant\n") for t in last)  # the prompt stops before the answer
    assert shapes.POINT_PROMPT.format(label=records[0][1].split("Point to the ")[1].split("\n")[0]) == records[0][1]
    assert float(data.normalize_pixels(b["pixel_values"]).std()) > 0.1  # real scenes
    with pytest.raises(ValueError, match="max_objects"):  # 0 is an error, not the default 1..6
        ev.evaluate_shapes(m, tok, cfg, n_prompts=2, tasks=("point",), max_objects=0)


def test_evaluate_shapes_wrong_answers_and_blind(tok, cfg):
    tasks = ("point", "count", "qa")
    n = 8
    gts = [shapes.make_example(t, s, cfg.image_size)["gt"] for t in tasks for s in range(n)]
    wrong = [shapes.NONE_ANSWER] * (2 * n) + ["maybe"] * n
    m = Oracle(tok, wrong)
    metrics, _ = ev.evaluate_shapes(m, tok, cfg, n_prompts=n, tasks=tasks, batch_size=n, blind=True)
    empty_point = sum(g["count"] == 0 for g in gts[:n]) / n
    empty_count = sum(g["count"] == 0 for g in gts[n:2 * n]) / n
    assert metrics["pointing_f1"] == pytest.approx(empty_point) and metrics["count_acc"] == pytest.approx(empty_count)
    assert metrics["qa_acc"] == 0.0
    for b in m.batches:  # blind: every image is the blank background
        pv = data.normalize_pixels(b["pixel_values"][b["image_mask"]])
        assert pv.shape[0] == n and torch.allclose(pv, torch.full_like(pv, 235 / 255 * 2 - 1))


def test_evaluate_shapes_real_model(tok, cfg):
    from model import Molmo2
    torch.manual_seed(0)
    m = Molmo2(cfg)
    metrics, records = ev.evaluate_shapes(m, tok, cfg, n_prompts=2, batch_size=2, max_new_tokens=4)
    assert set(metrics) == {"pointing_f1", "count_acc", "qa_acc"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert len(records) == 6 and m.training


def test_breakdown_by_question_kind():
    from eval import breakdown
    recs = [("qa", "What colour is the star?", "red", "red", 1.0),
            ("qa", "What colour is the circle?", "blue", "red", 0.0),
            ("qa", "Is there a red star?", "no", "no", 1.0),
            ("point", "Point to the stars", "x", "There are none.", 0.0),
            ("point", "Point to the stars", "x", '<points coords="1 1 100 100 2 200 200">stars</points>', 0.5),
            # video answers carry (t, id, x, y): a track's objects are its distinct ids, not its points
            ("track", "Track the stars.", "x", '<tracks coords="0.0 1 100 100;0.5 1 200 100;0.5 2 500 500">s</tracks>',
             0.4),
            ("track", "Track the stars.", "x", "There are none.", 1.0)]
    assert breakdown(recs) == {"point: 0 objects": (1, 0.0), "point: 2 objects": (1, 0.5),
                               "qa: Is there ...": (1, 1.0), "qa: What colour is": (2, 0.5),
                               "track: 0 objects": (1, 1.0), "track: 2 objects": (1, 0.4)}


def test_eval_cli_rejects_unscorable_tasks_and_missing_checkpoints(capsys, tmp_path):
    import eval as ev
    with pytest.raises(SystemExit):
        ev.main(["--tasks", "track,caption"])
    assert "--tasks 'track,caption': each must be one of point, count, qa" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="checkpoint .*nope.pt not found"):
        ev.main(["--ckpt", str(tmp_path / "nope.pt"), "--tasks", "track"])
    for bad in ("12", "20,12", "a,b", "1,4"):  # not lo,hi with 2 <= lo <= hi
        with pytest.raises(SystemExit):
            ev.main(["--tasks", "track", "--video_frames", bad])
        assert f"--video_frames {bad!r}: give lo,hi" in capsys.readouterr().err
    for extra in (["--blind"], ["--max_objects", "2"], ["--tasks", "qa"], ["--data", "vqa_v2=x.jsonl"]):
        with pytest.raises(SystemExit):  # settings --attention would ignore are refused, before any loading
            ev.main(["--attention", "--ckpt", str(tmp_path / "nope.pt")] + extra)
        assert f"it cannot take {extra[0]}" in capsys.readouterr().err


# ---- Molmo2's metrics, worked by hand (olmo/eval/evaluators.py, object_tracking_utils.py, vqa.py) ----

def test_pixel_rule_is_molmo2_round():
    m = np.zeros((6, 6), bool)
    m[1, 4] = True  # only the pixel at row 1, column 4
    assert ev.in_mask(m, 3.5, 1.0)      # on the border of columns 3 and 4: round(3.5) = 4 (int() would say 3)
    assert ev.in_mask(m, 4.4, 0.6)      # 4.4 -> 4, 0.6 -> 1
    assert not ev.in_mask(m, 4.6, 1.0)  # 4.6 -> 5
    m2 = np.zeros((6, 6), bool)
    m2[0, 2] = True
    assert ev.in_mask(m2, 2.5, 0.0)     # Python's round: half to even, 2.5 -> 2
    assert not ev.in_mask(m2, -0.6, 0.0) and not ev.in_mask(m2, 5.6, 0)  # off the image: a miss, not a wrap
    # the same point scored by pointing_prf: the border point is a hit
    assert ev.pointing_prf([(3.5, 1.0)], [(4, 1)], [m]) == (1.0, 1.0, 1.0)


def test_pointing_without_masks_uses_the_near_radius():
    size = (512, 256)  # 16 px at 256 x 256: within 32 px in x, 16 px in y
    assert ev.pointing_prf([(131, 100)], [(100, 100)], None, size) == (1.0, 1.0, 1.0)
    assert ev.pointing_prf([(133, 100)], [(100, 100)], None, size) == (0.0, 0.0, 0.0)
    assert ev.pointing_prf([(100, 116.5)], [(100, 100)], None, size) == (0.0, 0.0, 0.0)


def _box(x0, y0, x1, y1, size=20):
    m = np.zeros((size, size), bool)
    m[y0:y1, x0:x1] = True
    return m


A, B = _box(0, 0, 5, 5), _box(10, 10, 15, 15)  # two objects; their points (2, 2) and (12, 12)


def test_tracking_ids_ignored_per_frame_and_track_id_f1():
    gt = {0.0: {1: (2, 2), 2: (12, 12)}, 0.5: {1: (2, 2), 2: (12, 12)}}
    masks = {0.0: {1: A, 2: B}, 0.5: {1: A, 2: B}}
    right = [(0.0, 1, 2, 2), (0.0, 2, 12, 12), (0.5, 1, 2, 2), (0.5, 2, 12, 12)]
    swapped = [(0.0, 1, 2, 2), (0.0, 2, 12, 12), (0.5, 2, 2, 2), (0.5, 1, 12, 12)]  # ids swap halfway
    assert ev.tracking_prf(right, gt, masks=masks) == (1.0, 1.0, 1.0)
    assert ev.tracking_prf(swapped, gt, masks=masks) == (1.0, 1.0, 1.0)  # Molmo2: ids are not checked
    # ours keeps each id on one object: 2 of the 4 points stay on the object their id is tied to
    sgt = dict(objects=[1, 2], times=[0.0, 0.5], masks=[{1: A, 2: B}, {1: A, 2: B}])
    assert ev.track_id_prf(right, sgt) == (1.0, 1.0, 1.0)
    assert ev.track_id_prf(swapped, sgt) == pytest.approx((0.5, 0.5, 0.5))
    # without masks: the same, with near() as the hit test
    assert ev.tracking_prf(swapped, gt, size=(20, 20)) == (1.0, 1.0, 1.0)


def test_tracking_one_object_in_one_of_two_frames():
    gt = {0.0: {1: (2, 2)}, 0.5: {1: (2, 2)}}
    masks = {0.0: {1: A}, 0.5: {1: A}}
    # frame 0.0 perfect, frame 0.5 has ground truth and no prediction (0): the mean over frames is 0.5
    assert ev.tracking_prf([(0.0, 1, 2, 2)], gt, masks=masks) == (0.5, 0.5, 0.5)
    sgt = dict(objects=[1], times=[0.0, 0.5], masks=[{1: A}, {1: A}])
    assert ev.track_id_prf([(0.0, 1, 2, 2)], sgt) == pytest.approx((1.0, 0.5, 2 / 3))  # pooled: 1 of 2 pairs
    # a frame with a prediction and no ground truth scores 0 too (1.0 is 00:01, where nothing is annotated)
    assert ev.tracking_prf([(0.0, 1, 2, 2), (0.5, 1, 2, 2), (1.0, 1, 2, 2)], gt, masks=masks) == \
        pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # an id given twice in one frame keeps its first point (Molmo2 extract_tracks); times match to 0.1 s
    assert ev.tracking_prf([(0.0, 1, 2, 2), (0.0, 1, 12, 12), (0.5, 1, 2, 2)], gt, masks=masks) == (1.0, 1.0, 1.0)
    assert ev.tracking_prf([], {}, masks={}) == (1.0, 1.0, 1.0)  # nothing to track, nothing tracked


def test_tracking_object_leaving_the_frame():
    # object 1 is gone at 0.5 s; object 2 stays. Each frame is scored over the objects annotated in it:
    # frame 0.0 (both tracked) 1, frame 0.5 (2 tracked) 1. Molmo2's code scores frame 0.5 with object 1's
    # mask for object 2's point and over both objects (docs/molmo2.md, Evaluation metrics): 0, a mean of 0.5
    gt = {0.0: {1: (2, 2), 2: (12, 12)}, 0.5: {2: (12, 12)}}
    masks = {0.0: {1: A, 2: B}, 0.5: {2: B}}
    pred = [(0.0, 1, 2, 2), (0.0, 2, 12, 12), (0.5, 2, 12, 12)]
    assert ev.tracking_prf(pred, gt, masks=masks) == (1.0, 1.0, 1.0)
    # still pointing at object 1 where it was: that point is extra in frame 0.5 (precision 1/2 there)
    p, r, f = ev.tracking_prf(pred + [(0.5, 1, 2, 2)], gt, masks=masks)
    assert (p, r, f) == pytest.approx((0.75, 1.0, (1 + 2 / 3) / 2))


def test_video_pointing_needs_the_annotated_time():
    size, dur = (20, 20), 1.5
    tube = {0.5: A, 1.0: A}  # the object is annotated at 0.5 s and 1.0 s
    gt = [(0.5, 2, 2)]
    assert ev.video_pointing_prf([(0.5, 2, 2)], gt, size, dur, [tube]) == (1.0, 1.0, 1.0)
    assert ev.video_pointing_prf([(1.0, 3, 3)], gt, size, dur, [tube]) == (1.0, 1.0, 1.0)  # another frame of it
    # 0.7 s is between the frames: not annotated, a miss (the nearest frame, 0.5 s, would have counted it)
    assert ev.video_pointing_prf([(0.7, 2, 2)], gt, size, dur, [tube]) == (0.0, 0.0, 0.0)
    # without masks: the point's own time, near its position
    assert ev.video_pointing_prf([(0.5, 3, 2)], gt, size, dur) == (1.0, 1.0, 1.0)
    assert ev.video_pointing_prf([(1.0, 2, 2)], gt, size, dur) == (0.0, 0.0, 0.0)
    assert ev.video_pointing_prf([], [], size, dur) == (1.0, 1.0, 1.0)
    assert ev.video_pointing_prf([(0.5, 2, 2)], [], size, dur) == (0.0, 0.0, 0.0)


def test_counting_points_for_images_number_stated_for_videos():
    ans = 'Counting the <points coords="1 1 100 100 2 200 200">dogs</points> shows a total of 3.'
    assert ev.count_from_points(ans) == 2          # PointCountEval: the points written
    assert ev.stated_count(ans) == 3               # VixMoPointCountEval: the number said
    assert ev.stated_count(" 7. ") == 7 and ev.stated_count("The total number of cars is: 12") == 12
    assert ev.stated_count("There are none.") == 0 and ev.stated_count("many") is None
    assert ev.count_scores(None, 3) == (0.0, 0.0)
    assert ev.count_scores(4, 3) == (0.0, 1.0) and ev.count_scores(5, 3) == (0.0, 0.0)
    # videos: close within 1 + floor(5% of the count): 2 at 20, 1 at 19
    assert ev.count_scores(22, 20, video=True) == (0.0, 1.0) and ev.count_scores(21, 19, video=True) == (0.0, 0.0)
    assert ev.count_scores(22, 20) == (0.0, 0.0)  # images: within 1 at any count
    assert ev.score_video_count(ans, {"count": 3}) == {"video_count_acc": 1.0, "video_count_close": 1.0}
    assert ev.score_count(ans, {"count": 3}) == {"count_acc": 0.0, "count_close": 1.0}


def test_vqa_scores():
    assert ev.vqa_normalize(" Two  dogs.") == "2 dogs"
    assert ev.vqa_normalize("The cat's toy!") == "cat's toy"
    assert ev.vqa_normalize("yes, it is") == "yes it is" and ev.vqa_normalize("black/white") == "black white"
    assert ev.vqa_normalize("2.5") == "2.5" and ev.vqa_normalize("1,000") == "1000"
    assert ev.vqa_normalize("dont") == "don't" and ev.vqa_normalize("5.") == "5"
    three = ["2"] * 3 + ["3"] * 7
    assert ev.vqa_score(three, "two") == 1.0        # 3 annotators: min(3 / 3, 1)
    assert ev.vqa_accuracy(three, "two") == pytest.approx(0.9)  # 10 choose 9: 3 sets see 2 of them, 7 see 3
    two = ["2"] * 2 + ["3"] * 8
    assert ev.vqa_score(two, "2") == pytest.approx(2 / 3)
    assert ev.vqa_accuracy(two, "2") == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert ev.vqa_score(three, "4") == 0.0 and ev.vqa_accuracy(["3"] * 10, "3") == 1.0
    # what VqaEval scores: the text after "Answer:", else the most frequent line
    assert ev.vqa_prediction("The chart shows it.\nAnswer: 12") == "12"
    assert ev.vqa_prediction("red\nblue\nblue") == "blue" and ev.vqa_prediction("  a   b ") == "a b"


def test_anls_relaxed_and_multiple_choice():
    assert ev.anls(["Hello"], "hellp") == pytest.approx(0.8)  # 1 edit in 5, case ignored
    assert ev.anls(["abc"], "abd") == pytest.approx(2 / 3)
    assert ev.anls(["abcd"], "abxy") == 0.0                   # distance 0.5: not below theta
    assert ev.anls(["xyz", "invoice"], "Invoice") == 1.0      # the best reference
    assert ev.levenshtein("kitten", "sitting") == 3
    assert ev.relaxed_correctness("10", "10.4") and not ev.relaxed_correctness("10", "10.6")  # 5%
    assert ev.relaxed_correctness("0.12", "12%") and ev.relaxed_correctness("Yes", "yes")
    assert not ev.relaxed_correctness("0", "0.0") and ev.relaxed_correctness("0", "0")  # a 0 target: exact text
    assert ev.score_relaxed("Answer: 10.3", {"answers": ["10"]}) == {"relaxed_acc": 1.0}
    assert ev.mc_correct("B", "b. a dog") and ev.mc_correct("B", " B") and not ev.mc_correct("B", "A")
    assert ev.score_mc("C", {"answer": "C"}) == {"mc_acc": 1.0}


def test_video_scorers_read_json_ground_truth():
    # the ground truth as a jsonl row holds it (string keys), the answers as the model writes them (html-v2)
    import json
    track = json.loads(json.dumps({"tracks": {0.0: {1: [10, 20], 2: [300, 40]}, 0.5: {2: [310, 42]}},
                                   "size": [400, 200]}))
    ans = data.format_groups([("0.0", [(1, 10, 20), (2, 300, 40)]), ("0.5", [(1, 310, 42)])], 400, 200, "cars",
                             tag="tracks")
    assert ev.score_track(ans, track) == {"tracking_f1_near": 1.0, "tracking_precision_near": 1.0,
                                          "tracking_recall_near": 1.0}  # ids ignored: id 1 at 0.5 s is fine
    vp = {"points": [[0.5, 10, 20], [1.0, 300, 40]], "count": 2, "size": [400, 200], "duration": 2.0}
    ans = data.format_groups([("0.5", [(10, 20)]), ("1.0", [(300, 40)])], 400, 200, "cars")
    assert ev.score_video_point(ans, vp)["video_pointing_f1_near"] == 1.0
    ans = data.format_groups([("0.5", [(10, 20)]), ("1.5", [(300, 40)])], 400, 200, "cars")  # 1.5 s: not annotated
    assert ev.score_video_point(ans, vp)["video_pointing_f1_near"] == 0.5


def test_evaluate_shapes_video_oracle_scores_one(tok, cfg):
    tasks = ("video_point", "video_count", "track")
    m = Oracle(tok, _gt_answers(tasks, 3, cfg.image_size))
    metrics, records = ev.evaluate_shapes(m, tok, cfg, n_prompts=3, tasks=tasks, batch_size=3)
    assert metrics == {"video_pointing_f1": 1.0, "video_count_acc": 1.0, "tracking_f1": 1.0, "track_id_f1": 1.0}
    assert len(records) == 9


# ---- eval.py --data: real held-out sets, end to end ----

def _jsonl(path, rows):
    import json
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _meta_reader(task):
    """A stand-in reader (rows name their image, question, reference and meta): the READERS interface with the
    ground truth in example["meta"], as the real readers give it."""
    def read(rec, media_root, i):
        import os
        return ("row", i), dict(task=task, image=os.path.join(media_root, rec["image"]),
                                turns=[(rec["q"], rec["ref"])], meta=rec["meta"])
    return read


@pytest.fixture
def eval_sets(tmp_path, monkeypatch):
    """Three tiny held-out sets (VQA, counting, pointing with masks) over one 32 x 32 image, and their readers."""
    import readers
    from PIL import Image
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "im.png")
    pts = '<points coords="1 1 250 250 2 750 750">dots</points>'
    mask = [[(x < 12 and y < 12) or (x > 20 and y > 20) for x in range(32)] for y in range(32)]
    rows = {"vqa_v2": [dict(image="im.png", q="What colour?", ref="red", meta={"answers": ["red"] * 9 + ["pink"]}),
                       dict(image="im.png", q="How many?", ref="two", meta={"answers": ["2"] * 10})],
            "pixmo_count": [dict(image="im.png", q="How many dots are there?",
                                 ref=f"Counting the {pts} shows a total of 2.", meta={"count": 2})],
            "pixmo_points": [dict(image="im.png", q="Point to the dots", ref=pts,
                                  meta={"points": [[8, 8], [24, 24]], "masks": [mask], "size": [32, 32]})]}
    rows["pixmo_points"][0]["meta"]["masks"] = [mask, mask]
    for name, task in (("vqa_v2", "qa"), ("pixmo_count", "count"), ("pixmo_points", "point")):
        monkeypatch.setitem(readers.READERS, name, _meta_reader(task))
        monkeypatch.delitem(readers.SOURCES, name, raising=False)  # the stand-in rows have their own columns
    return {n: _jsonl(tmp_path / f"{n}.jsonl", r) for n, r in rows.items()}, rows, str(tmp_path)


def test_eval_data_end_to_end(tok, cfg, tmp_path, eval_sets, monkeypatch, capsys):
    import sample
    from checkpoint import save_checkpoint
    from model import Molmo2
    paths, rows, root = eval_sets
    torch.manual_seed(0)
    ckpt = str(tmp_path / "ckpt.pt")
    save_checkpoint(ckpt, dict(model=Molmo2(cfg).state_dict(), model_config=dataclasses.asdict(cfg),
                               tokenizer=tok.state(), config={}))
    data = ",".join(f"{n}={p}" for n, p in paths.items())
    # a tiny random model: every set is read, answered and scored, one line each
    metrics, records = ev.main(["--ckpt", ckpt, "--data", data, "--media_root", root, "--dtype", "float32",
                                "--batch_size", "2", "--max_new_tokens", "3"])
    out = capsys.readouterr().out.splitlines()
    assert [l.split(":")[0] for l in out if l.endswith(")")] == ["vqa_v2", "pixmo_count", "pixmo_points"]
    assert any(l.startswith("vqa_v2: vqa_score ") and l.endswith("(n=2)") for l in out)
    assert set(metrics) >= {"vqa_v2/vqa_score", "vqa_v2/vqa_acc", "pixmo_count/count_acc", "pixmo_points/pointing_f1"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values()) and len(records) == 4
    # an oracle in its place (the references as answers) scores 1 everywhere, except VQA's 9-of-10 "red":
    # vqa_score 1, official accuracy 1 (each 9-annotator set holds >= 8 "red")
    model, _, mc = sample.load_model(ckpt)
    refs = [r["ref"] for n in paths for r in rows[n]]
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: (Oracle(tok, refs), tok, mc))
    metrics, _ = ev.main(["--ckpt", ckpt, "--data", data, "--media_root", root, "--batch_size", "3",
                       "--dtype", "float32"])
    assert metrics == {k: 1.0 for k in metrics} and "pixmo_points/pointing_f1" in metrics
    # --max_examples: the first N of each set
    refs[:] = [rows["vqa_v2"][0]["ref"], rows["pixmo_count"][0]["ref"], rows["pixmo_points"][0]["ref"]]
    monkeypatch.setattr(sample, "load_model", lambda *a, **k: (Oracle(tok, list(refs)), tok, mc))
    ev.main(["--ckpt", ckpt, "--data", data, "--media_root", root, "--max_examples", "1",
             "--dtype", "float32"])
    assert "vqa_v2: vqa_score 1.000, vqa_acc 1.000 (n=1)" in capsys.readouterr().out


def test_eval_data_errors(tmp_path, eval_sets, capsys, monkeypatch):
    paths, _, root = eval_sets
    with pytest.raises(SystemExit):
        ev.main(["--data", "nope=" + paths["vqa_v2"]])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "eval data 'nope': no metric for it" in err
    with pytest.raises(SystemExit):
        ev.main(["--data", "vqa_v2=" + str(tmp_path / "gone.jsonl")])
    assert "eval data 'vqa_v2': file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--data", "vqa_v2"])
    assert "give name=path" in capsys.readouterr().err
    # a reader without ground truth: named, before any model work
    import readers
    monkeypatch.setitem(readers.READERS, "vqa_v2",
                        lambda rec, media_root, i: (("r", i), dict(task="qa", image=None, turns=[("q", "a")])))
    with pytest.raises(SystemExit, match="eval data 'vqa_v2'.*no ground truth"):
        ev.load_eval_sets({"vqa_v2": paths["vqa_v2"]}, root, log=lambda *a: None)


def test_train_scores_eval_data_at_each_eval(tmp_path, eval_sets, capsys):
    # eval_data set: the periodic and the final eval (and its image-blind baseline) score the real sets instead
    # of the shapes tasks, first eval_prompts / final_eval_prompts examples of each
    import train
    from conftest import tiny_overrides
    paths, _, root = eval_sets
    sets_paths = {"vqa_v2": paths["vqa_v2"]}  # short answers (32 tokens): a random model's answers are cheap
    args = tiny_overrides() + [f"--out_dir={tmp_path / 'run'}", "--max_steps=2", "--eval_interval=1",
                               "--eval_prompts=1", "--final_eval_prompts=2", "--batch_size=4", "--dtype=float32",
                               "--device=cpu", "--warmup_steps=1", f"--media_root={root}",
                               f"--eval_data={sets_paths!r}"]
    res = train.main(args)
    names = {"vqa_v2/vqa_score", "vqa_v2/vqa_acc"}
    assert set(res["final"]) == names and set(res["blind"]) == names
    out = capsys.readouterr().out
    assert "eval @ 1: vqa_v2/vqa_score" in out and "final eval @ 2" in out
    with pytest.raises(SystemExit, match=r"eval_data: \['nope'\] have no metric"):
        train.main(args + ["--eval_data={'nope': 'x.jsonl'}"])


def test_attention_maps_is_the_models_forward(tok, cfg):
    """eval.attention_maps writes every attention out; its hidden states must be model.hidden's (the probe shows the
    forward the model runs), each row a distribution over the keys the mask allows, and attention_on_target's
    weights come from it."""
    from data import collate, encode_example
    from model import Molmo2
    torch.manual_seed(0)
    m = Molmo2(cfg).eval()
    exs = [shapes.make_example(t, s, cfg.image_size) for t, s in (("point", 3), ("qa", 5))]
    b = collate([encode_example(ex, tok, cfg, {ex["task"]: 1.0}) for ex in exs], tok.pad, 10 ** 9)
    h, probs = ev.attention_maps(m, b)
    with torch.no_grad():
        ref = m.hidden(b)
    assert torch.allclose(h, ref, atol=1e-5), (h - ref).abs().max()
    T = b["input_ids"].shape[1]
    assert len(probs) == cfg.n_layer and probs[0].shape == (2, cfg.n_head, T, T)
    real = b["attention_mask"].bool()  # (B, T)
    text = b["input_ids"] < cfg.base_vocab
    future = torch.ones(T, T, dtype=torch.bool).triu(1)[None, None] & text[:, None, :, None]  # (B, 1, Tq, Tk)
    for p in probs:
        assert torch.allclose(p.sum(-1).transpose(1, 2)[real], torch.ones(()))
        assert (p.masked_select(future) == 0).all()  # a text token never sees a later token
    # the probe's "x's 1st digit" offset: that position predicts the first digit of the answer's x coordinate
    ex = exs[0]
    assert ex["gt"]["count"] > 0, "seed 3 must point at something"
    e = encode_example(ex, tok, cfg, {"point": 1.0})
    first = int((torch.as_tensor(e["loss_weights"]) > 0).nonzero()[0])
    x = data.parse_points(ex["turns"][0][1])[0][2]
    at = first + ev.CHOICE_POSITIONS["point"]["point, x's 1st digit (where?)"]
    assert tok.decode([int(e["input_ids"][at + 1])]) == f"{int(x):03d}"[0]  # written zero-padded (data.format_groups)
    out = ev.attention_on_target(m, tok, cfg, n_prompts=30)
    assert set(out) == {k for v in ev.CHOICE_POSITIONS.values() for k in v}
    n, w = out["point, x's 1st digit (where?)"]
    assert n > 0
    assert w.shape == (cfg.n_layer, cfg.n_head, 2) and (w >= 0).all() and (w <= 1).all() and m.training
    with pytest.raises(ValueError, match="max_crops=2"):  # multi-crop token grids are not what it reads
        ev.attention_on_target(m, tok, dataclasses.replace(cfg, max_crops=2), n_prompts=1)

"""Metrics and the held-out shapes evaluation (eval.py)."""
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
    p, r, f = ev.pointing_prf([(3, 3)], [], [])
    assert p == 0 and f == 0  # a point where there is nothing is wrong
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
    assert float(b["pixel_values"].std()) > 0.1  # real scenes
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
        pv = b["pixel_values"][b["image_mask"]]
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

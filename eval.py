"""
Metrics, as Molmo2 computes them (Molmo2 code: olmo/eval/evaluators.py; docs/molmo2.md, Evaluation), and the
held-out shapes evaluation that train.py runs.

  pointing  predicted points are Hungarian-matched (L2) to ground-truth points; a matched prediction is a hit
            if it lies inside that object's mask; precision = hits/#pred, recall = hits/#gt, F1 per example,
            averaged. No ground truth and no prediction scores 1 (PointingEval).
  counting  the predicted count is the number of points in the answer (PointCountEval); exact-match accuracy.
  QA        exact match after lower-casing and stripping a trailing period.
  video pointing  Hungarian over normalised (t, x, y) (VixMoPointEval); a matched prediction is a hit if it lies
            inside that object's mask in the sampled frame nearest its time.
  tracking  per-frame point-in-mask F1 with the id held across frames: each predicted id is tied to one object
            (Hungarian on the number of frames where its points hit that object), then every (frame, object)
            hit counts once; precision over predicted points, recall over visible (frame, object) pairs.

Points reach these functions in pixels: the model writes 0-1000 (html-v2), evaluate_shapes scales them back by
the image size. Every metric is computed per example and averaged over the prompts of a task.
"""
import math

import numpy as np
import torch


def hungarian(cost):
    """Minimum-cost assignment for a (n, m) cost matrix (Kuhn-Munkres with potentials, O(n^2 m)).
    Returns [(row, col)] with min(n, m) pairs. Pure numpy so the project needs no scipy."""
    cost = np.asarray(cost, dtype=np.float64)
    # the algorithm below wants n <= m (every row gets a column): solve the transpose and swap back at the end
    transposed = cost.shape[0] > cost.shape[1]
    if transposed:
        cost = cost.T
    n, m = cost.shape
    if n == 0:
        return []
    INF = float("inf")
    # potentials u (rows) and v (columns): reduced costs cost[i, j] - u[i] - v[j] stay >= 0, and are 0 on the
    # assigned pairs; index 0 of each array is a sentinel, real rows and columns are 1-based
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=int)      # p[j] = row (1-based) assigned to column j; column 0 is a sentinel
    way = np.zeros(m + 1, dtype=int)    # way[j] = the column before j on the current augmenting path
    # add rows one at a time; each time, grow a shortest path (Dijkstra on reduced costs) from the new row to a
    # free column, then flip the assignments along it: the assignment stays optimal for the rows added so far
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(m + 1, INF)           # minv[j] = the cheapest reduced cost found so far to reach column j
        used = np.zeros(m + 1, dtype=bool)   # columns already on the search tree
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], INF, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            # shift the potentials by delta: the tree's edges stay tight and column j1 joins the tree at cost 0
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:  # a free column: the augmenting path ends here
                break
        # augment: walk back along way[], each column on the path taking the row of the column before it
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    # back to 0-based (row, col) pairs; columns with no row (m > n) are left out
    pairs = [(p[j] - 1, j - 1) for j in range(1, m + 1) if p[j]]
    return sorted((c, r) for r, c in pairs) if transposed else sorted(pairs)


def pointing_prf(pred, gt, masks):
    """pred [(x, y)] and gt [(x, y)] in pixels, masks [(H, W) bool] per gt point -> (precision, recall, f1).
    Molmo2's PointingEval: the matching decides which object a point is FOR (one point per object, the least
    total distance to their centres), the mask decides whether it is ON it. An answer with extra points loses
    precision, one with missing points recall."""
    # nothing to find: saying nothing is perfect, any point is a false positive (recall 1 is vacuous)
    if not gt:
        return (1.0, 1.0, 1.0) if not pred else (0.0, 1.0, 0.0)
    if not pred:
        return 0.0, 0.0, 0.0
    cost = np.array([[math.hypot(px - gx, py - gy) for gx, gy in gt] for px, py in pred])  # (n_pred, n_gt) L2
    hits = 0
    for i, j in hungarian(cost):
        H, W = masks[j].shape
        # a point (x, y) in pixels falls in the pixel at row int(y), column int(x)
        x, y = int(pred[i][0]), int(pred[i][1])
        hits += bool(0 <= x < W and 0 <= y < H and masks[j][y, x])
    p, r = hits / len(pred), hits / len(gt)
    return p, r, (2 * p * r / (p + r) if hits else 0.0)


def _nearest(times, t):
    """Index of the sampled frame time closest to t (a predicted time may fall between frames)."""
    return int(np.argmin([abs(t - s) for s in times]))


def _inside(mask, x, y):
    """Does the pixel point (x, y) lie on mask (H, W) bool? Points outside the image are misses."""
    H, W = mask.shape
    return bool(0 <= int(x) < W and 0 <= int(y) < H and mask[int(y), int(x)])


def video_pointing_prf(pred, gt, size):
    """pred [(t, x_px, y_px)]; gt: points [(t, x, y)] of objects [k], times, masks [frame][k] -> (p, r, f1).
    Molmo2's VixMoPointEval: a point must be at the right object at the right time. The ground truth has one
    point per object (where it is first seen); a prediction is scored against that object's mask in the frame
    nearest the predicted time, so pointing at it in another frame where it is visible also counts."""
    pts, objs, times = gt["points"], gt["objects"], gt["times"]
    if not pts:
        return (1.0, 1.0, 1.0) if not pred else (0.0, 1.0, 0.0)
    if not pred:
        return 0.0, 0.0, 0.0
    # time over the video's length and x, y over the image size: all three in [0, 1], so none dominates the match
    span = max(times[-1], 1e-6)
    cost = np.array([[math.sqrt(((t - gt_) / span) ** 2 + ((x - gx) / size) ** 2 + ((y - gy) / size) ** 2)
                      for gt_, gx, gy in pts] for t, x, y in pred])
    hits = 0
    for i, j in hungarian(cost):
        t, x, y = pred[i]
        m = gt["masks"][_nearest(times, t)].get(objs[j])
        hits += m is not None and _inside(m, x, y)
    p, r = hits / len(pred), hits / len(pts)
    return p, r, (2 * p * r / (p + r) if hits else 0.0)


def tracking_prf(pred, gt):
    """pred [(t, id, x_px, y_px)]; gt: objects [k], times, masks [frame][k] -> (p, r, f1).
    A track must keep one id on one object: an id that jumps to another object scores only for the frames it
    spends on the object it is tied to."""
    objs, times = gt["objects"], gt["times"]
    n_gt = sum(len(m) for m in gt["masks"])  # visible (frame, object) pairs: what recall is counted over
    seen, points = set(), []
    for t, pid, x, y in pred:  # one point per (frame, id): a repeated one is ignored
        f = _nearest(times, t)
        if (f, pid) not in seen:
            seen.add((f, pid))
            points.append((f, pid, x, y))
    if not n_gt:
        return (1.0, 1.0, 1.0) if not points else (0.0, 1.0, 0.0)
    if not points:
        return 0.0, 0.0, 0.0
    # hit[a, b] = frames where predicted id a lands on object b; the id-to-object tie maximises total hits
    ids = sorted({pid for _, pid, _, _ in points})
    hit = np.zeros((len(ids), len(objs)))
    for f, pid, x, y in points:
        for j, k in enumerate(objs):
            m = gt["masks"][f].get(k)
            hit[ids.index(pid), j] += m is not None and _inside(m, x, y)
    tp = sum(hit[i, j] for i, j in hungarian(-hit))
    p, r = tp / len(points), tp / n_gt
    return p, r, (2 * p * r / (p + r) if tp else 0.0)


def normalize_answer(s):
    """Short-answer QA comparison key: " Red." and "red" are the same answer."""
    return s.strip().lower().rstrip(".").strip()


@torch.no_grad()
def evaluate_shapes(model, tok, cfg, n_prompts=500, tasks=("point", "count", "qa"), batch_size=100,
                    blind=False, autocast=None, first_seed=0, max_new_tokens=96, max_objects=None,
                    video_frames=None, full_length=False):
    """Held-out shapes evaluation (seeds [first_seed, first_seed + n) of the eval range, which training never
    uses). blind=True replaces every image by a blank one: the image-blind baseline. max_objects (None: the
    world's 1..6): smaller image scenes, a diagnostic (shapes.make_example). Returns metrics and the raw
    (example, answer) pairs.

    The model answers greedily, a batch of prompts at a time: every prompt is encoded as training encodes it,
    cut at "assistant\n", left-padded so all end in the last column, and generated until <|im_end|>.
    metrics: {metric name (METRIC_NAMES): mean score}; records: [(task, question, answer, reference, score)].
    full_length=True never stops an answer early (no stop token): every answer runs to its token limit, so the
    eval takes as long as it ever can. train.fit_budget times such an eval to bound the real ones' cost."""
    # imported where they are used: the metric functions above need only numpy
    import shapes
    from data import collate, encode_example, parse_points
    max_objects = shapes.MAX_OBJECTS if max_objects is None else max_objects  # 0 is an error, not 'default'
    video_frames = shapes.VIDEO_FRAMES if video_frames is None else video_frames
    model.eval()  # inference mode while scoring
    dev = next(model.parameters()).device
    metrics, records = {}, []
    for task in tasks:
        scores = []
        # the same seeds for every task and every eval: scores of two checkpoints compare scene by scene
        for s0 in range(first_seed, first_seed + n_prompts, batch_size):
            exs = [shapes.make_example(task, s, cfg.image_size, max_objects=max_objects, video_frames=video_frames)
                   for s in range(s0, min(s0 + batch_size, first_seed + n_prompts))]
            encs = []
            for ex in exs:
                q = dict(ex, turns=[(ex["turns"][0][0], "")])  # the prompt only
                if blind:
                    q = blind_example(q)
                e = encode_example(q, tok, cfg, {task: 1.0})
                e["input_ids"] = e["input_ids"][:-1]  # drop the empty answer's <|im_end|>: end at "assistant\n"
                e["labels"], e["loss_weights"] = e["labels"][:-1], e["loss_weights"][:-1]
                encs.append(e)
            # one batch dict (data.collate), no row limit: left padding puts every prompt's last token in the
            # last column, so generation appends to all rows at once
            batch = collate(encs, tok.pad, 10 ** 9, left_pad=True)
            batch = {k: v.to(dev) for k, v in batch.items()}
            with autocast() if autocast else torch.autocast(dev.type, enabled=False):
                # a track lists a point per frame: its budget grows with the longest video (4x at 11 frames)
                n = max_new_tokens * (-(-4 * video_frames[1] // 11) if task == "track" else 1)
                outs = model.generate(batch, n, stop_id=-1 if full_length else tok.chat_end)
            # score each answer with its task's metric (module docstring), points read back from html-v2
            for ex, ids in zip(exs, outs):
                ans = tok.decode(ids)
                gt = ex["gt"]
                px = lambda v: v / 1000 * cfg.image_size  # 0-1000 -> pixels
                if task == "point":
                    pts = [(px(x), px(y)) for _, _, x, y in parse_points(ans)]
                    score = pointing_prf(pts, gt["points"], gt["masks"])[2]
                # Molmo2 counts by pointing: the count is the number of points written, not the number said
                elif task in ("count", "video_count"):
                    score = float(len(parse_points(ans)) == gt["count"])
                elif task == "video_point":
                    score = video_pointing_prf([(t, px(x), px(y)) for t, _, x, y in parse_points(ans)], gt,
                                               cfg.image_size)[2]
                elif task == "track":
                    score = tracking_prf([(t, i, px(x), px(y)) for t, i, x, y in parse_points(ans)], gt)[2]
                # QA of every kind (image, video, subtitle, multi-image): exact match of the short answer
                else:
                    score = float(normalize_answer(ans) == normalize_answer(gt["answer"]))
                scores.append(score)
                records.append((task, ex["turns"][0][0], ans, ex["turns"][0][1], score))
        metrics[METRIC_NAMES.get(task, task + "_acc")] = float(np.mean(scores))
    model.train()  # back to training mode: train.py evaluates mid-run
    return metrics, records


# the tasks evaluate_shapes can score: F1 for points and tracks, exact count, exact answer for short-answer QA
SCORED_TASKS = ("point", "count", "qa", "video_point", "video_count", "track", "video_qa", "subtitle_qa", "multi_qa")
# the name each task's score is reported under; a task not listed is reported as "<task>_acc" (exact match)
METRIC_NAMES = {"point": "pointing_f1", "count": "count_acc", "qa": "qa_acc", "video_point": "video_pointing_f1",
                "track": "tracking_f1", "video_count": "video_count_acc"}


def blank_like(img):
    """A blank image of img's size, in the shapes world's background grey."""
    from PIL import Image
    return Image.new("RGB", img.size, (235, 235, 235))


def blind_example(ex):
    """The same example with every image / frame blank (same sizes, same times): the image-blind baseline.
    Same token layout, no visual content: the score it reaches is what the text alone (question priors, the
    usual positions) earns, and the gap to the real score is what the model reads from the pixels."""
    ex = dict(ex)
    if ex.get("image") is not None:
        ex["image"] = blank_like(ex["image"])
    if ex.get("images"):
        ex["images"] = [blank_like(im) for im in ex["images"]]
    if isinstance(ex.get("video"), dict):
        ex["video"] = dict(ex["video"], frames=[blank_like(f) for f in ex["video"]["frames"]])
    return ex


def question_kind(task, question, reference):
    """A finer key than the task, for breakdowns: QA by question template, pointing/counting/tracking by how many
    objects the reference answer holds (0 = "There are none.": these score 1 for a "none", so an image-blind
    model that always says "none" already scores their share of the prompts, ~0.2)."""
    if task == "qa":
        return "qa: " + (" ".join(question.split()[:3]) if not question.startswith("Is there") else "Is there ...")
    if task in ("point", "count", "video_point", "video_count", "track"):
        from data import parse_points
        pts = parse_points(reference)  # video answers: (t, id, x, y) per point; one id per object
        n = len({p[1] for p in pts}) if task.startswith(("video", "track")) else len(pts)
        return f"{task}: {n if n < 4 else '4+'} objects"
    return task


def breakdown(records):
    """[(task, question, answer, reference, score)] -> {kind: (n, mean score)}, sorted by kind."""
    by = {}  # {kind: [scores]}
    for task, q, _a, ref, s in records:
        by.setdefault(question_kind(task, q, ref), []).append(s)
    return {k: (len(v), float(np.mean(v))) for k, v in sorted(by.items())}


def main(argv=None):
    """python eval.py --ckpt out/shapes_stage1/ckpt.pt [--prompts 500] [--blind] [--tasks point,track,...]:
    held-out metrics of a checkpoint, then the same scores broken down by question kind (what the model can
    and cannot do yet). Returns (metrics, records)."""
    import argparse
    import sample
    import shapes
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="out/shapes_stage1/ckpt.pt")
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--blind", action="store_true", help="blank images: the image-blind baseline")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: bf16 where this CPU runs it faster than fp32 (machine.resolve_dtype)")
    n_max = shapes.MAX_OBJECTS
    ap.add_argument("--max_objects", type=int, default=n_max, choices=range(1, n_max + 1), metavar=f"1..{n_max}",
                    help="image scenes of at most this many objects (1: the read-out alone, no choice to make)")
    ap.add_argument("--tasks", default="point,count,qa", help="comma-separated, of: " + ",".join(SCORED_TASKS))
    ap.add_argument("--video_frames", default="", help="lo,hi: frames per video scene (default: shapes.VIDEO_FRAMES, "
                                                        "6,11; config/shapes_stage3.py trains on 12,20)")
    ap.add_argument("--trust_checkpoint", action="store_true",
                    help="read --ckpt with the full unpickler, which can run code: only for a file you made")
    a = ap.parse_args(argv)
    # check every argument before the (slow) checkpoint load, so a typo fails at once
    try:
        frames = tuple(int(x) for x in a.video_frames.split(",")) if a.video_frames else shapes.VIDEO_FRAMES
        assert len(frames) == 2 and 2 <= frames[0] <= frames[1]
    except (ValueError, AssertionError):
        ap.error(f"--video_frames {a.video_frames!r}: give lo,hi with 2 <= lo <= hi, e.g. 12,20")
    tasks = tuple(t for t in a.tasks.split(",") if t)
    if not tasks or any(t not in SCORED_TASKS for t in tasks):
        ap.error(f"--tasks {a.tasks!r}: each must be one of {', '.join(SCORED_TASKS)}")
    # the checkpoint carries its tokenizer and model config, so the eval needs nothing else from the run
    model, tok, mc = sample.load_model(a.ckpt, trust=a.trust_checkpoint)
    from machine import resolve_dtype
    dt = resolve_dtype(a.dtype, torch.device("cpu"))
    # a factory, not a context: evaluate_shapes enters a fresh autocast for every batch
    ac = (lambda: torch.autocast("cpu", dtype=dt)) if dt != torch.float32 else None
    metrics, records = evaluate_shapes(model, tok, mc, n_prompts=a.prompts, tasks=tasks, blind=a.blind,
                                       autocast=ac, max_objects=a.max_objects, video_frames=frames)
    print(", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    # then per question kind: where the model fails (e.g. pointing at 4+ objects) hides in the task average
    for kind, (n, s) in breakdown(records).items():
        print(f"  {kind:<28} n={n:4d}  score {s:.3f}")
    return metrics, records


if __name__ == "__main__":
    main()

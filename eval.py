"""
Metrics, as Molmo2 computes them (Molmo2 code: olmo/eval/evaluators.py, vqa.py, object_tracking_utils.py;
docs/molmo2.md, Evaluation metrics, lists each one and every remaining difference), the held-out shapes
evaluation that train.py runs, the evaluation of real held-out sets (eval.py --data, train.py eval_data), and a
diagnostic of where the answer looks (eval.py --attention).

  pointing   points Hungarian-matched (L2) to the true points; a match is a hit if it lies on that object's
             mask (the pixel at round(x), round(y)); P = hits / #pred, R = hits / #true, F1 per example.
  counting   images: the number of points written (PointCountEval); videos: the number stated
             (VixMoPointCountEval). Exact, and "close" (within 1; videos 1 + 5%).
  video pointing  Hungarian over normalised (t, x, y); a hit needs an annotated time and the mask there.
  tracking   per frame, Hungarian (L2) between points and objects, ids ignored, averaged over the frames with
             a prediction or a truth (tracking_f1); track_id_f1, this project's, also holds each id to one object.
  short answers   VQA score (and the official 10-choose-9 VQA accuracy), ANLS, relaxed accuracy, the
             multiple-choice letter; the shapes QA tasks by exact match.

Points reach the metric functions in pixels: the model writes 0-1000 (html-v2), the scorers scale them by the
image size. Every metric is computed per example and averaged.
"""
import math
import re
from collections import Counter

import numpy as np
import torch

import readers


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


# ----------------------------------------------------------------------------------------------------------
# Points: where a point falls, and whether it hits

def in_mask(mask, x, y):
    """Does the point (x, y), in pixels, lie on mask (H, W) bool? Molmo2's rule (olmo/eval/evaluators.py
    is_point_in_region): the pixel at row round(y), column round(x), so pixel centres sit at integer coordinates.
    Python's round: an exact .5 goes to the even neighbour (2.5 -> pixel 2, 3.5 -> pixel 4). Off the image: a miss."""
    H, W = mask.shape
    xi, yi = int(round(x)), int(round(y))
    return bool(0 <= xi < W and 0 <= yi < H and mask[yi, xi])


# Without masks (a data set that gives only the annotated points), a matched prediction is a hit when it lies
# within 16 px of its point on the image scaled to 256 x 256: TAP-Vid's loosest threshold, the one Molmo2's point
# tracking eval reports (olmo/eval/point_tracking_utils.py compute_tapvid_metrics). Metrics scored this way carry
# the suffix "_near": they are not Molmo2's mask-based figures.
NEAR = 16 / 256


def near(p, g, size):
    """Is the point p = (x, y) within NEAR of the annotated point g, each axis measured in image sizes (w, h)?"""
    w, h = size
    return math.hypot((p[0] - g[0]) / w, (p[1] - g[1]) / h) < NEAR


def _prf(hits, n_pred, n_gt):
    """(precision, recall, F1) from the hit count (Molmo2 adds 1e-10 to F1's denominator; here F1 is exact)."""
    p, r = hits / n_pred, hits / n_gt
    return p, r, (2 * p * r / (p + r) if hits else 0.0)


def _l2(a, b):
    """(len(a), len(b)) matrix of Euclidean distances between two lists of equal-length tuples."""
    return np.array([[math.dist(p, q) for q in b] for p in a]).reshape(len(a), len(b))


def pointing_prf(pred, gt, masks=None, size=None):
    """Molmo2's PointingEval (olmo/eval/evaluators.py): pred [(x, y)] and gt [(x, y)] in pixels; masks [(H, W)
    bool], one per gt point, or None (then a hit is `near` its point; size (w, h) needed) -> (p, r, f1).
    Predictions are Hungarian-matched to the gt points on L2 distance: the match decides which object a point is
    FOR (one point per object), the mask whether it is ON it. Extra points cost precision, missing ones recall.
    No ground truth: all three are 1 for no prediction and 0 for any."""
    if not gt:
        s = float(not pred)
        return s, s, s
    if not pred:
        return 0.0, 0.0, 0.0
    hits = sum(in_mask(masks[j], *pred[i]) if masks is not None else near(pred[i], gt[j], size)
               for i, j in hungarian(_l2(pred, gt)))
    return _prf(hits, len(pred), len(gt))


def _tkey(t):
    """A frame time as a lookup key: to 0.1 s, as the answers write times (data.format_groups), so "0.5" in an
    answer and 0.5 in the ground truth are one frame and 0.4 is another."""
    return round(float(t), 1)


def video_pointing_prf(pred, gt, size, duration, masks=None):
    """Molmo2's VixMoPointEval (olmo/eval/evaluators.py): pred and gt [(t, x, y)] (seconds, pixels); masks: per
    gt point, {time: (H, W) bool} of its object in every frame where it is visible, or None -> (p, r, f1).
    The match is Hungarian on (t / duration, x / w, y / h), each on 0-100 rounded to 0.1 (olmo/util.py
    normalize_timestamps_and_points); a matched prediction is a hit only at a time where its object is annotated
    (Molmo2 is_point_in_tublet: an exact time, not the nearest frame) and on that frame's mask (without masks:
    at the point's own time and `near` it)."""
    if not gt:
        s = float(not pred)
        return s, s, s
    if not pred:
        return 0.0, 0.0, 0.0
    w, h = size
    d = max(float(duration), 1e-6)
    norm = lambda t, x, y: (round(t / d * 100, 1), round(x / w * 100, 1), round(y / h * 100, 1))
    hits = 0
    for i, j in hungarian(_l2([norm(*p) for p in pred], [norm(*g) for g in gt])):
        t, x, y = pred[i]
        if masks is not None:
            m = {_tkey(s): mk for s, mk in masks[j].items()}.get(_tkey(t))
            hits += m is not None and in_mask(m, x, y)
        else:
            hits += _tkey(t) == _tkey(gt[j][0]) and near((x, y), gt[j][1:], size)
    return _prf(hits, len(pred), len(gt))


def tracking_prf(pred, gt, size=None, masks=None):
    """Molmo2's tracking P/R/F1 (olmo/eval/object_tracking_utils.py evaluate_video_tracks_with_masks): pred
    [(t, id, x, y)] (seconds, pixels); gt {time: {object id: (x, y)}}, the objects annotated in each frame;
    masks {time: {object id: (H, W) bool}} or None (then `near` the point; size (w, h) needed) -> (p, r, f1).
    Frame by frame, the predicted points are Hungarian-matched (L2) to that frame's objects, ids ignored, and
    scored as pointing_prf scores an image; the three figures are averaged over the frames that have a
    prediction or a ground truth (a frame with only one of them scores 0). An id given twice in one frame keeps
    its first point (Molmo2 extract_tracks). Ids are free to swap between frames: track_id_prf checks them."""
    frames_pred = {}
    for t, pid, x, y in pred:
        frames_pred.setdefault(_tkey(t), {}).setdefault(pid, (x, y))
    frames_gt = {_tkey(t): objs for t, objs in gt.items() if objs}
    frames = sorted(set(frames_pred) | set(frames_gt))
    if not frames:  # nothing to track and nothing tracked
        return 1.0, 1.0, 1.0
    masks = None if masks is None else {_tkey(s): m for s, m in masks.items()}
    per_frame = []
    for f in frames:
        P, objs = list(frames_pred.get(f, {}).values()), frames_gt.get(f, {})
        ids = list(objs)
        if not ids or not P:
            per_frame.append((float(not P),) * 3 if not ids else (0.0, 0.0, 0.0))
            continue
        G = [objs[k] for k in ids]
        if masks is not None:
            fm = masks.get(f, {})
            hit = lambda i, j: ids[j] in fm and in_mask(fm[ids[j]], *P[i])
        else:
            hit = lambda i, j: near(P[i], G[j], size)
        per_frame.append(_prf(sum(hit(i, j) for i, j in hungarian(_l2(P, G))), len(P), len(G)))
    return tuple(float(np.mean(c)) for c in zip(*per_frame))


def _nearest(times, t):
    """Index of the sampled frame time closest to t (a predicted time may fall between frames)."""
    return int(np.argmin([abs(t - s) for s in times]))


def track_id_prf(pred, gt):
    """Tracking with ids held (this project's own measure, beside Molmo2's tracking_prf): pred [(t, id, x, y)]
    in pixels; gt: objects [k], times, masks [frame][k] -> (p, r, f1). Each predicted id is tied to one object
    (Hungarian on the number of frames where its points hit that object), then every (frame, object) hit counts
    once: an id that jumps to another object scores only the frames it spends on the object it is tied to.
    Precision is over predicted points, recall over visible (frame, object) pairs, pooled over the video; a
    predicted time goes to the nearest sampled frame."""
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
            hit[ids.index(pid), j] += m is not None and in_mask(m, x, y)
    tp = sum(hit[i, j] for i, j in hungarian(-hit))
    p, r = tp / len(points), tp / n_gt
    return p, r, (2 * p * r / (p + r) if tp else 0.0)


# ----------------------------------------------------------------------------------------------------------
# Counts

def count_from_points(answer):
    """Molmo2's PointCountEval (olmo/eval/evaluators.py): the count of an image answer is the number of points
    it writes, whatever number it states ("Counting the <points .../> shows a total of 3." counts its points)."""
    from data import parse_points
    return len(parse_points(answer))


def stated_count(answer):
    """Molmo2's VixMoPointCountEval (olmo/eval/evaluators.py): the count of a video answer is the number it
    states: the whole answer as an integer, else "a total of N" / "the total number (of ...) is: N", else 0 for
    an answer that says "none"; None when no number can be read (scored wrong)."""
    s = answer.strip().lower().rstrip(".").strip()
    try:
        return int(s)
    except ValueError:
        pass
    m = re.search(r"(?:a total of|the total number(?:\s+of\s+.+?)?\s+is:)\s*(\d+)\.?", s)
    if m:
        return int(m.group(1))
    return 0 if re.match(r".*\bnone\b", s) else None


def count_scores(pred, gt, video=False):
    """{correct, close} of a predicted count (None: unreadable, both 0). close: within 1 (PointCountEval), or
    for a video within 1 + floor(5% of the true count) (VixMoPointCountEval)."""
    if pred is None:
        return 0.0, 0.0
    margin = 1 + math.floor(0.05 * gt) if video else 1
    return float(pred == gt), float(abs(pred - gt) <= margin)


# ----------------------------------------------------------------------------------------------------------
# Short answers: VQA v2, DocVQA, ChartQA, multiple choice (Molmo2 olmo/eval/vqa.py, VqaEval)

def vqa_prediction(text):
    """The answer VqaEval scores: the text after "Answer:" if there is one, else for several lines the most
    frequent line (the first of the most frequent), else the text; runs of spaces made one."""
    pred = text.strip()
    if "Answer:" in pred:
        return pred.split("Answer:")[1].strip()
    if "\n" in pred:
        lines = [" ".join(x.split()) for x in pred.split("\n")]
        counts = Counter(lines)
        return next(x for x in lines if counts[x] == max(counts.values()))
    return " ".join(pred.split())


# The official VQA v2 answer normalisation (Molmo2 olmo/eval/vqa.py preprocess_answer): number words to digits,
# articles dropped, contractions restored ("dont" -> "don't"; the table is the official one, quirks included),
# punctuation removed or made a space, periods dropped unless a digit follows ("2.5" stays).
_NUMBER_WORDS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7",
                     eight="8", nine="9", ten="10")
_ARTICLES = ("a", "an", "the")
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")  # 1,000: its punctuation is removed, not made a space
_PERIOD = re.compile(r"\.(?!\d)")
_CONTRACTIONS = dict(p.split("=") for p in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd "
    "howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've "
    "oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't "
    "shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've "
    "shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've "
    "somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've "
    "someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd "
    "somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd "
    "thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've "
    "they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've "
    "we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've "
    "whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've "
    "wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've "
    "wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll "
    "yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've "
    "youll=you'll youre=you're youve=you've "
).split())


def vqa_normalize(ans):
    """VQA v2's answer normalisation (above): " Two  dogs." -> "2 dogs"."""
    s = ans.replace("\n", " ").replace("\t", " ").lower().strip()
    out = s
    # each mark is deleted where it touches a space (or the text has a 1,000-style number), else made a space:
    # "yes, it is" -> "yes it is", "black/white" -> "black white"; tested on the text before any change
    for p in _PUNCT:
        out = out.replace(p, "" if (p + " " in s or " " + p in s or _COMMA_NUMBER.search(s)) else " ")
    out = _PERIOD.sub("", out, count=32)  # Molmo2 and the official script pass re.UNICODE (32) as the count
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(answers, pred):
    """Molmo2's vqa_score (olmo/eval/vqa.py): min(#annotators who gave the prediction / 3, 1), all answers and
    the prediction normalised (vqa_normalize). answers: the (usually 10) annotators' answers."""
    n = Counter(vqa_normalize(a) for a in answers)[vqa_normalize(pred)]
    return min(n / 3.0, 1.0)


def vqa_accuracy(answers, pred):
    """The official VQA v2 accuracy: vqa_score's min(matches / 3, 1) over each of the 10 choose 9 sets of
    annotators (one left out in turn), averaged. With 3 matching annotators it is 0.9, where vqa_score is 1."""
    p = vqa_normalize(pred)
    same = [vqa_normalize(a) == p for a in answers]
    k = sum(same)
    return float(np.mean([min((k - s) / 3.0, 1.0) for s in same])) if same else 0.0


def levenshtein(a, b):
    """Edit distance (insertions, deletions, substitutions), one row at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(answers, pred, theta=0.5):
    """DocVQA's ANLS as Molmo2 computes it (olmo/eval/vqa.py anls_metric): per reference, 1 - (edit distance
    of the lower-cased strings / the longer length), 0 when that normalised distance is theta or more; the best
    over the references."""
    def one(t):
        n = max(len(t), len(pred))
        if n == 0:  # both empty: equal (Molmo2 divides by zero here)
            return 1.0
        d = levenshtein(t.lower(), pred.lower()) / n
        return 1 - d if d < theta else 0.0
    return max(one(t) for t in answers)


def relaxed_correctness(target, pred, tolerance=0.05):
    """ChartQA's relaxed accuracy as Molmo2 computes it (olmo/eval/vqa.py relaxed_correctness, from pix2struct):
    when both parse as numbers ("12%" is 0.12) and the target is not 0, within 5% of the target; else the
    lower-cased strings must be equal."""
    def num(s):
        try:
            return float(s.rstrip("%")) / 100.0 if s.endswith("%") else float(s)
        except ValueError:
            return None
    p, t = num(pred), num(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= tolerance
    return pred.lower() == target.lower()


def mc_correct(answer, pred):
    """Multiple choice answered with a letter: Molmo2 VqaEval's "em_start": the prediction starts with the
    answer's letter (case ignored; "B. a dog" and "b" are B)."""
    return pred.lower().strip().startswith(answer.lower().strip()[0])


def normalize_answer(s):
    """Short-answer QA comparison key for the shapes world: " Red." and "red" are the same answer."""
    return s.strip().lower().rstrip(".").strip()


def generate_answers(model, tok, cfg, exs, max_new_tokens, autocast=None, stop_id=None, blind=False):
    """Greedy answers to the first question of each example, one batch: every prompt is encoded as training
    encodes it (data.encode_example), cut at "assistant\\n", left-padded so all end in the last column, and
    generated until stop_id (default <|im_end|>; -1: never stop). Returns the decoded answers."""
    from data import collate, encode_example
    dev = next(model.parameters()).device
    encs = []
    for ex in exs:
        q = dict(ex, turns=[(ex["turns"][0][0], "")])  # the prompt only
        if blind:
            q = blind_example(q)
        e = encode_example(q, tok, cfg, {q["task"]: 1.0})
        for k in ("input_ids", "labels", "loss_weights"):  # aligned position by position: cut together
            e[k] = e[k][:-1]  # drop the empty answer's <|im_end|>: end at "assistant\\n"
        encs.append(e)
    # one batch dict (data.collate), no row limit: left padding puts every prompt's last token in the last
    # column, so generation appends to all rows at once
    batch = collate(encs, tok.pad, 10 ** 9, left_pad=True)
    batch = {k: v.to(dev) for k, v in batch.items()}
    with autocast() if autocast else torch.autocast(dev.type, enabled=False):
        outs = model.generate(batch, max_new_tokens, stop_id=tok.chat_end if stop_id is None else stop_id)
    return [tok.decode(ids) for ids in outs]


def score_shapes(task, ans, gt, size):
    """{metric name: score} of one shapes answer (module docstring). Shapes draws pixel (col, row) over
    [col, col + 1): its points (mask centroids, pixel centres at +0.5) and the model's are moved by -0.5 px into
    Molmo2's convention (pixel centres at integers, in_mask), so the round rule reads the pixel they are drawn on."""
    from data import parse_points
    import shapes
    px = lambda v: v / 1000 * size - 0.5  # 0-1000 -> pixels, Molmo2's convention
    if task == "point":
        pts = [(px(x), px(y)) for _, _, x, y in parse_points(ans)]
        return {"pointing_f1": pointing_prf(pts, [(x - 0.5, y - 0.5) for x, y in gt["points"]], gt["masks"])[2]}
    if task == "count":  # PointCountEval: the points written are the count
        return {"count_acc": float(count_from_points(ans) == gt["count"])}
    if task == "video_count":  # VixMoPointCountEval: the number stated is the count
        return {"video_count_acc": float(stated_count(ans) == gt["count"])}
    if task == "video_point":
        times, masks, objs = gt["times"], gt["masks"], gt["objects"]
        pts = [(t, px(x), px(y)) for t, _, x, y in parse_points(ans)]
        tubes = [{times[f]: masks[f][k] for f in range(len(times)) if k in masks[f]} for k in objs]
        ref = [(t, x - 0.5, y - 0.5) for t, x, y in gt["points"]]
        return {"video_pointing_f1": video_pointing_prf(pts, ref, (size, size), times[-1], tubes)[2]}
    if task == "track":
        times, masks, objs = gt["times"], gt["masks"], gt["objects"]
        pts = [(t, i, px(x), px(y)) for t, i, x, y in parse_points(ans)]
        ref = {t: {k: tuple(v - 0.5 for v in shapes._mask_point(m[k])) for k in objs if k in m}
               for t, m in zip(times, masks)}
        return {"tracking_f1": tracking_prf(pts, ref, masks=dict(zip(times, masks)))[2],
                "track_id_f1": track_id_prf(pts, gt)[2]}
    # QA of every kind (image, video, subtitle, multi-image): exact match of the short answer
    return {METRIC_NAMES.get(task, task + "_acc"): float(normalize_answer(ans) == normalize_answer(gt["answer"]))}


@torch.no_grad()
def evaluate_shapes(model, tok, cfg, n_prompts=500, tasks=("point", "count", "qa"), batch_size=100,
                    blind=False, autocast=None, first_seed=0, max_new_tokens=96, max_objects=None,
                    video_frames=None, full_length=False):
    """Held-out shapes evaluation (seeds [first_seed, first_seed + n) of the eval range, which training never
    uses). blind=True replaces every image by a blank one: the image-blind baseline. max_objects (None: the
    world's 1..6): smaller image scenes, a diagnostic (shapes.make_example). Returns metrics and the raw
    (example, answer) pairs.

    The model answers greedily, a batch of prompts at a time (generate_answers).
    metrics: {metric name (METRIC_NAMES; tracking adds track_id_f1): mean score}; records: [(task, question,
    answer, reference, score)], score the task's METRIC_NAMES figure.
    full_length=True never stops an answer early (no stop token): every answer runs to its token limit, so the
    eval takes as long as it ever can. train.fit_budget times such an eval to bound the real ones' cost."""
    import shapes
    max_objects = shapes.MAX_OBJECTS if max_objects is None else max_objects  # 0 is an error, not 'default'
    video_frames = shapes.VIDEO_FRAMES if video_frames is None else video_frames
    model.eval()  # inference mode while scoring
    metrics, records = {}, []
    for task in tasks:
        scores = {}  # {metric name: [score per prompt]}
        # the same seeds for every task and every eval: scores of two checkpoints compare scene by scene
        for s0 in range(first_seed, first_seed + n_prompts, batch_size):
            exs = [shapes.make_example(task, s, cfg.image_size, max_objects=max_objects, video_frames=video_frames)
                   for s in range(s0, min(s0 + batch_size, first_seed + n_prompts))]
            # a track lists a point per frame: its budget grows with the longest video (4x at 11 frames)
            n = max_new_tokens * (-(-4 * video_frames[1] // 11) if task == "track" else 1)
            answers = generate_answers(model, tok, cfg, exs, n, autocast, -1 if full_length else None, blind)
            for ex, ans in zip(exs, answers):
                sc = score_shapes(task, ans, ex["gt"], cfg.image_size)
                for k, v in sc.items():
                    scores.setdefault(k, []).append(v)
                records.append((task, ex["turns"][0][0], ans, ex["turns"][0][1], next(iter(sc.values()))))
        metrics.update({k: float(np.mean(v)) for k, v in scores.items()})
    model.train()  # back to training mode: train.py evaluates mid-run
    return metrics, records


@torch.no_grad()
def attention_maps(model, batch):
    """model.hidden's forward with every attention written out: softmax(q.k / sqrt(hd)) under the model's mask (the
    reference kernel's, cp_attention.reference_attn_probs), each block's own q, k, v (Block.qkv) and output half
    (Block.out), so what it shows is the forward the model runs (tests: its hidden states equal model.hidden's). One
    image per example, no cache. Returns (final hidden states (B, T, d), [per layer: attention probabilities
    (B, H, T, T)])."""
    from cp_attention import reference_attn_probs
    from model import attention_mask_4d
    ids = batch["input_ids"]
    x = model.embed_inputs(ids, batch["pixel_values"], batch["image_mask"], batch["pool_idx"])
    mask = attention_mask_4d(batch["doc_ids"], ids >= model.c.base_vocab, model.c.bidir_vision)  # (B, 1, T, T)
    cos, sin = model.llm.rope_tables(batch["position_ids"], x.dtype)
    probs = []
    for blk in model.llm.blocks:
        q, k, v = blk.qkv(x, cos, sin)  # q (B, H, T, hd); k, v (B, Hkv, T, hd)
        p, _ = reference_attn_probs(q, k, mask=mask)  # (B, H, T, T)
        probs.append(p)
        x = blk.out(x, p @ v.repeat_interleave(q.shape[1] // v.shape[1], 1))  # GQA: a kv head serves a group of q heads
    return model.llm.norm(x), probs


@torch.no_grad()
def attention_on_target(model, tok, cfg, n_prompts=200):
    """Where the answer looks when it must choose an object: a diagnostic (eval.py --attention). For held-out scenes
    of two or more objects whose question picks one (pointing at one present target; "What colour is the <shape>?"),
    the answer is teacher-forced (attention_maps) and, at the positions where a choice is made, every head's
    attention weight on the pooled image token holding the target's centre is set against its mean weight on each
    other object's token (the 2x2 windows of the <im_patch> grid, row-major). The positions (CHOICE_POSITIONS):
    pointing's first answer token ('<points' or 'There are none.': is the object there?), the x coordinate's first
    digit (after '<points coords="1 1 ': where is it?), and QA's answer word. A head that reads the named object
    puts more on the target; one that looks at every object alike puts the same. Returns {position name: (n scenes,
    array (layers, heads, 2))}: the mean (target, other) weights."""
    import shapes
    from data import collate, encode_example
    if cfg.max_crops:  # the window arithmetic below reads one crop's grid of pooled tokens
        raise ValueError(f"attention_on_target reads one crop an image (max_crops=0); this model has max_crops="
                         f"{cfg.max_crops}")
    dev = next(model.parameters()).device
    cell = cfg.patch_size * cfg.pool_h, cfg.patch_size * cfg.pool_w  # pixels a pooled token covers (y, x)
    cols = cfg.image_size // cell[1]
    window = lambda o: int(o["cy"] // cell[0]) * cols + int(o["cx"] // cell[1])  # the pooled token of a centre
    model.eval()
    sums, counts = {}, {}
    for task in ("point", "qa"):
        for seed in range(n_prompts):
            ex = shapes.make_example(task, seed, cfg.image_size)
            q, a = ex["turns"][0]
            objs = ex["objects"]
            if task == "qa" and not q.startswith("What colour is"):
                continue
            if task == "point":
                tgt = [o for o in objs if (o["cx"], o["cy"]) in ex["gt"]["points"]]
            else:  # "What colour is the <shape>?" names a shape that is unique in the scene (shapes._qa)
                tgt = [o for o in objs if o["shape"] == q.split()[-1][:-1]]
            others = {window(o) for o in objs} - {window(t) for t in tgt}
            if len(tgt) != 1 or not others:
                continue
            b = collate([encode_example(dict(ex, turns=[(q, a)]), tok, cfg, {task: 1.0})], tok.pad, 10 ** 9)
            b = {k: v.to(dev) for k, v in b.items()}
            first = int((b["loss_weights"][0] > 0).nonzero()[0])  # the input position predicting the answer's 1st token
            slots = (b["input_ids"][0] == tok.im_patch).nonzero().flatten()  # the pooled image tokens, row-major
            _, probs = attention_maps(model, b)
            for name, offset in CHOICE_POSITIONS[task].items():
                at = [p[0, :, first + offset] for p in probs]  # per layer (H, T): where that position looks
                w = torch.stack([torch.stack([a_[:, slots[window(tgt[0])]],  # (H,) on the target's token
                                              torch.stack([a_[:, slots[k]] for k in others]).mean(0)], -1)
                                 for a_ in at]).float().cpu().numpy()  # (layers, H, 2)
                sums[name], counts[name] = sums.get(name, 0.0) + w, counts.get(name, 0) + 1
    model.train()
    return {name: (counts[name], sums[name] / counts[name]) for name in sums}


# attention_on_target's positions, as offsets from the one predicting the answer's first token: pointing's answer
# tokens are '<points', ' coords', '="', '1', ' ', '1', ' ', then the x coordinate's digits
CHOICE_POSITIONS = {"point": {"point, 1st answer token (there?)": 0, "point, x's 1st digit (where?)": 7},
                    "qa": {"qa 'What colour is the <shape>?', the answer": 0}}


# the tasks evaluate_shapes can score: F1 for points and tracks, exact count, exact answer for short-answer QA
SCORED_TASKS = ("point", "count", "qa", "video_point", "video_count", "track", "video_qa", "subtitle_qa", "multi_qa")
# the name each task's score is reported under; a task not listed is reported as "<task>_acc" (exact match)
METRIC_NAMES = {"point": "pointing_f1", "count": "count_acc", "qa": "qa_acc", "video_point": "video_pointing_f1",
                "track": "tracking_f1", "video_count": "video_count_acc"}


# ----------------------------------------------------------------------------------------------------------
# Real held-out sets (readers.READERS copies, ground truth in example["meta"]; docs/molmo2.md, Evaluation metrics)

def _pixels(ans, size):
    """An answer's points [(t, id, x, y)] with x, y from 0-1000 to pixels of an image of size (w, h)."""
    from data import parse_points
    w, h = size
    return [(t, i, x / 1000 * w, y / 1000 * h) for t, i, x, y in parse_points(ans)]


def _answers(meta):
    """The reference answers of a VQA-style example: meta["answers"], or meta["answer"] as a list of one."""
    a = meta["answers"] if "answers" in meta else meta["answer"]
    return [a] if isinstance(a, str) else list(a)


def score_point(ans, meta):
    """Image pointing (PointingEval); without masks the "_near" figures."""
    pts = [(x, y) for _, _, x, y in _pixels(ans, meta["size"])]
    masks = meta.get("masks")
    masks = None if masks is None else [np.asarray(m, dtype=bool) for m in masks]
    p, r, f = pointing_prf(pts, [tuple(g) for g in meta["points"]], masks, meta["size"])
    sfx = "" if masks is not None else "_near"
    return {f"pointing_f1{sfx}": f, f"pointing_precision{sfx}": p, f"pointing_recall{sfx}": r}


def score_count(ans, meta):
    """Image counting (PointCountEval): the points written are the count."""
    c, close = count_scores(count_from_points(ans), meta["count"])
    return {"count_acc": c, "count_close": close}


def score_video_count(ans, meta):
    """Video counting (VixMoPointCountEval): the number stated is the count."""
    c, close = count_scores(stated_count(ans), meta["count"], video=True)
    return {"video_count_acc": c, "video_count_close": close}


def score_video_point(ans, meta):
    """Video pointing (VixMoPointEval), normalised over meta["duration"] (else the last annotated or predicted
    time); meta["masks"] (per point, {time: mask}) if given, else the "_near" figures."""
    pts = [(t, x, y) for t, _, x, y in _pixels(ans, meta["size"])]
    gt = [tuple(g) for g in meta["points"]]
    duration = meta.get("duration") or max([t for t, _, _ in gt + pts] + [1e-6])
    masks = meta.get("masks")
    masks = None if masks is None else [{t: np.asarray(m, dtype=bool) for t, m in d.items()} for d in masks]
    p, r, f = video_pointing_prf(pts, gt, meta["size"], duration, masks)
    sfx = "" if masks is not None else "_near"
    return {f"video_pointing_f1{sfx}": f, f"video_pointing_precision{sfx}": p, f"video_pointing_recall{sfx}": r}


def score_track(ans, meta):
    """Tracking (Molmo2's per-frame P/R/F1, ids ignored); meta["masks"] ({time: {id: mask}}) if given, else the
    "_near" figures."""
    masks = meta.get("masks")
    masks = None if masks is None else {t: {k: np.asarray(m, dtype=bool) for k, m in d.items()}
                                        for t, d in masks.items()}
    gt = {float(t): {k: tuple(v) for k, v in objs.items()} for t, objs in meta["tracks"].items()}
    p, r, f = tracking_prf(_pixels(ans, meta["size"]), gt, meta["size"], masks)
    sfx = "" if masks is not None else "_near"
    return {f"tracking_f1{sfx}": f, f"tracking_precision{sfx}": p, f"tracking_recall{sfx}": r}


def score_vqa(ans, meta):
    """VQA v2: Molmo2's vqa_score and the official 10-choose-9 accuracy."""
    pred, answers = vqa_prediction(ans), _answers(meta)
    return {"vqa_score": vqa_score(answers, pred), "vqa_acc": vqa_accuracy(answers, pred)}


def score_anls(ans, meta):
    """DocVQA: ANLS, the best over the references."""
    return {"anls": anls(_answers(meta), vqa_prediction(ans))}


def score_relaxed(ans, meta):
    """ChartQA: relaxed accuracy, the best over the references."""
    pred = vqa_prediction(ans)
    return {"relaxed_acc": float(max(relaxed_correctness(a, pred) for a in _answers(meta)))}


def score_mc(ans, meta):
    """Multiple choice answered with a letter (meta["answer"], e.g. "B")."""
    return {"mc_acc": float(mc_correct(meta["answer"], vqa_prediction(ans)))}


# The one table of real evaluations: a readers.READERS name, or an example's task, -> (how an answer is scored,
# the answer's token budget). A data set whose rows mix tasks (PixMo-Points: pointing and counting rows;
# Molmo2-VideoPoint: pointing and counting questions) maps to None: each example is scored by its task's entry.
_POINTS, _VIDEO, _SHORT = 256, 512, 32  # token budgets: up to ~40 points an image, ~80 a video, a short answer
EVAL_METRICS = {
    # data sets
    "pixmo_count": (score_count, _POINTS), "pixmo_points": None, "vqa_v2": (score_vqa, _SHORT),
    "docvqa": (score_anls, _SHORT), "chartqa": (score_relaxed, _SHORT), "molmo2_capqa": (score_mc, _SHORT),
    "molmo2_videopoint": None, "videopoint_0_5": None, "videopoint_6_25": None, "videopoint_26_60": None,
    "molmo2_track": (score_track, 2048), "textvqa": (score_vqa, _SHORT), "ai2d": (score_mc, _SHORT),
    "nlvr2": (score_mc, _SHORT), "pixmo_points_eval": (score_point, _POINTS), "videopoint_eval": None,
    "videocount_eval": (score_video_count, _VIDEO), "videotrack_eval": (score_track, 2048),
    # tasks
    "point": (score_point, _POINTS), "count": (score_count, _POINTS), "video_point": (score_video_point, _VIDEO),
    "video_count": (score_video_count, _VIDEO), "track": (score_track, 2048), "video_qa": (score_mc, _SHORT),
}


def check_eval_data(sets_paths):
    """{data set name: path} -> the one-line error (str) of the first name that cannot be scored or path that
    is missing, else None."""
    import os
    for name, path in sets_paths.items():
        if readers.reader_name(name) not in EVAL_METRICS:
            return f"eval data {name!r}: no metric for it; eval.EVAL_METRICS scores {', '.join(EVAL_METRICS)}"
        if not os.path.exists(path):
            return f"eval data {name!r}: file not found: {path}"
    return None


def load_eval_sets(sets_paths, media_root="", log=print):
    """{data set name: path} -> {name: [example]}: each file read with its reader (readers.read_dataset), an
    example with several questions split into one example per question (example["meta"] a list, one per turn),
    every example's ground truth checked to be there."""
    err = check_eval_data(sets_paths)
    if err:
        raise SystemExit(err)
    sets = {}
    for name, path in sets_paths.items():
        exs, _ = readers.read_dataset(name, path, media_root, log=log)  # eval splits: a row an example
        out = []
        for ex in exs:
            metas = ex.get("meta")
            if metas is None:
                raise SystemExit(f"eval data {name!r} ({path}): its reader gives no ground truth (example['meta'])")
            metas = metas if isinstance(metas, list) else [metas]
            out += [dict(ex, turns=[ex["turns"][i]], meta=m) for i, m in enumerate(metas)]
        sets[name] = out
    return sets


@torch.no_grad()
def evaluate_data(model, tok, cfg, sets, max_examples=None, batch_size=16, autocast=None, blind=False,
                  full_length=False, progress=True, max_new_tokens=None):
    """Score each real held-out set ({name: examples}, load_eval_sets) with its EVAL_METRICS entry: greedy
    answers (generate_answers), the first max_examples examples of each set. Returns (metrics {"name/metric":
    mean}, records [(task, question, answer, reference, score)], counts {name: examples scored}); a record's
    score is its scorer's first figure. max_new_tokens: a cap on every answer's budget (None: EVAL_METRICS')."""
    import sys
    import time
    model.eval()
    metrics, records, counts = {}, [], {}
    for name, exs in sets.items():
        exs = exs[:max_examples] if max_examples else exs
        entry = EVAL_METRICS[readers.reader_name(name)]
        scorers = [entry or EVAL_METRICS.get(ex["task"]) for ex in exs]
        bad = next((ex["task"] for ex, s in zip(exs, scorers) if s is None), None)
        if bad is not None:
            raise SystemExit(f"eval data {name!r}: no metric for its task {bad!r} (eval.EVAL_METRICS)")
        scores, t0 = {}, time.time()
        for b in range(0, len(exs), batch_size):
            chunk, sc = exs[b:b + batch_size], scorers[b:b + batch_size]
            n_new = min(max(s[1] for s in sc), max_new_tokens or 10 ** 9)
            answers = generate_answers(model, tok, cfg, chunk, n_new, autocast, -1 if full_length else None, blind)
            for ex, (fn, _), ans in zip(chunk, sc, answers):
                r = fn(ans, ex["meta"])
                for k, v in r.items():
                    scores.setdefault(k, []).append(float(v))
                records.append((ex["task"], ex["turns"][0][0], ans, ex["turns"][0][1], float(next(iter(r.values())))))
            if progress:  # one line, rewritten: examples done and the time left at this rate
                done, el = b + len(chunk), time.time() - t0
                print(f"\r  {name}: {done}/{len(exs)}, ETA {el / done * (len(exs) - done):.0f} s", end="",
                      file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        metrics.update({f"{name}/{k}": float(np.mean(v)) for k, v in scores.items()})
        counts[name] = len(exs)
    model.train()
    return metrics, records, counts


def blank_like(img):
    """A blank image of img's size, in the shapes world's background grey."""
    from PIL import Image
    return Image.new("RGB", img.size, (235, 235, 235))


def blind_example(ex):
    """The same example with every image / frame blank (same sizes, same times): the image-blind baseline.
    Same token layout, no visual content: the score it reaches is what the text alone (question priors, the
    usual positions) earns, and the gap to the real score is what the model reads from the pixels. Media given
    as paths (real data sets) are read first, to blank them at their own sizes."""
    from data import load_image, load_video
    ex = dict(ex)
    if ex.get("image") is not None:
        ex["image"] = blank_like(load_image(ex["image"]))
    if ex.get("images"):
        ex["images"] = [blank_like(load_image(im)) for im in ex["images"]]
    if isinstance(ex.get("video"), str):
        frames, times = load_video(ex["video"], 128)  # the frames encode_example samples (max_frames 128)
        ex["video"] = dict(frames=frames, times=times)
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
    held-out shapes metrics of a checkpoint, then the same scores broken down by question kind (what the model
    can and cannot do yet). With --data name=path,...: real held-out sets instead, one line per set (its
    metrics and n). With --attention: no scores, but where the answer looks when it must choose an object, per
    layer and head (attention_on_target). Returns (metrics, records)."""
    import argparse
    import sample
    import shapes
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", default="out/shapes_stage1/ckpt.pt")
    ap.add_argument("--prompts", type=int, default=500)
    ap.add_argument("--blind", action="store_true", help="blank images: the image-blind baseline")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                    help="auto: bf16 on CUDA, and where this CPU runs it faster than fp32 (machine.resolve_dtype)")
    ap.add_argument("--device", default="auto", help="auto: cuda when there is a GPU, else cpu")
    n_max = shapes.MAX_OBJECTS
    ap.add_argument("--max_objects", type=int, default=n_max, choices=range(1, n_max + 1), metavar=f"1..{n_max}",
                    help="image scenes of at most this many objects (1: the read-out alone, no choice to make)")
    ap.add_argument("--tasks", default="point,count,qa", help="comma-separated, of: " + ",".join(SCORED_TASKS))
    ap.add_argument("--video_frames", default="", help="lo,hi: frames per video scene (default: shapes.VIDEO_FRAMES, "
                                                        "6,11; config/shapes_stage3.py trains on 12,20)")
    ap.add_argument("--attention", action="store_true",
                    help="instead of scores: where the choosing answer token looks (attention_on_target), per head")
    ap.add_argument("--trust_checkpoint", action="store_true",
                    help="read --ckpt with the full unpickler, which can run code: only for a file you made")
    ap.add_argument("--data", default="", help="real held-out sets, name=path,... (name: a readers.READERS or "
                                               "readers.SOURCES name, e.g. pixmo_count_val=data/pixmo_count_val.jsonl)")
    ap.add_argument("--media_root", default="data/media", help="--data: where the images and videos are")
    ap.add_argument("--max_examples", type=int, default=0, help="--data: score the first N of each set (0: all)")
    ap.add_argument("--batch_size", type=int, default=16, help="--data: prompts answered at once")
    ap.add_argument("--max_new_tokens", type=int, default=0,
                    help="--data: cap every answer at this many tokens (0: each metric's own budget)")
    a = ap.parse_args(argv)
    # check every argument before the (slow) checkpoint load, so a typo fails at once
    sets_paths = {}
    for item in (x for x in a.data.split(",") if x):
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            ap.error(f"--data {item!r}: give name=path, e.g. pixmo_count_val=data/pixmo_count_val.jsonl")
        sets_paths[name] = path
    # --attention probes the shapes prompts of --prompts seeds, nothing else: a setting it would ignore is an error
    ignored = [f for f, on in (("--data", sets_paths), ("--blind", a.blind), ("--tasks", a.tasks != "point,count,qa"),
                               ("--max_objects", a.max_objects != n_max), ("--video_frames", a.video_frames)) if on]
    if a.attention and ignored:
        ap.error(f"--attention probes held-out shapes scenes of 1-{n_max} objects only; "
                 f"it cannot take {', '.join(ignored)}")
    if sets_paths and check_eval_data(sets_paths):
        ap.error(check_eval_data(sets_paths))
    if a.max_examples < 0 or a.max_new_tokens < 0 or a.batch_size < 1:
        ap.error("--max_examples and --max_new_tokens must be >= 0, --batch_size >= 1")
    try:
        frames = tuple(int(x) for x in a.video_frames.split(",")) if a.video_frames else shapes.VIDEO_FRAMES
        assert len(frames) == 2 and 2 <= frames[0] <= frames[1]
    except (ValueError, AssertionError):
        ap.error(f"--video_frames {a.video_frames!r}: give lo,hi with 2 <= lo <= hi, e.g. 12,20")
    tasks = tuple(t for t in a.tasks.split(",") if t)
    if not tasks or any(t not in SCORED_TASKS for t in tasks):
        ap.error(f"--tasks {a.tasks!r}: each must be one of {', '.join(SCORED_TASKS)}")
    # the checkpoint carries its tokenizer and model config, so the eval needs nothing else from the run
    from machine import resolve_device, resolve_dtype
    dev = resolve_device(a.device, "--device")
    model, tok, mc = sample.load_model(a.ckpt, device=dev, trust=a.trust_checkpoint)
    dt = resolve_dtype(a.dtype, dev)
    # a factory, not a context: evaluate_shapes enters a fresh autocast for every batch
    ac = (lambda: torch.autocast(dev.type, dtype=dt)) if dt != torch.float32 else None
    if a.attention:  # per layer, per head: the weight on the named object's token against another object's
        print("attention on the named object's image token / on another object's, per head (mean over scenes)")
        for name, (n, w) in attention_on_target(model, tok, mc, a.prompts).items():
            print(f"{name}, {n} scenes:")
            for layer, heads in enumerate(w):
                print(f"  layer {layer}: " + "  ".join(f"{t:.3f}/{o:.3f}" for t, o in heads))
        return None, None
    if sets_paths:
        sets = load_eval_sets(sets_paths, a.media_root)
        metrics, records, counts = evaluate_data(model, tok, mc, sets, a.max_examples or None, a.batch_size, ac,
                                                 blind=a.blind, max_new_tokens=a.max_new_tokens or None)
        for name, n in counts.items():  # one line per set: its metrics, and how many examples they average
            print(f"{name}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in metrics.items()
                                          if k.startswith(name + "/")) + f" (n={n})")
        return metrics, records
    metrics, records = evaluate_shapes(model, tok, mc, n_prompts=a.prompts, tasks=tasks, blind=a.blind,
                                       autocast=ac, max_objects=a.max_objects, video_frames=frames)
    print(", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    # then per question kind: where the model fails (e.g. pointing at 4+ objects) hides in the task average
    for kind, (n, s) in breakdown(records).items():
        print(f"  {kind:<28} n={n:4d}  score {s:.3f}")
    return metrics, records


if __name__ == "__main__":
    main()

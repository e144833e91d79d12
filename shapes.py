"""
The shapes world: a procedural, infinite, exactly-labelled stand-in for Molmo2's image data.

Every example is a pure function of (task, seed), so a run is reproducible, a data position is just an
integer, and held-out evaluation uses a seed range that training never touches: eval scenes are seeds
[0, TRAIN_SEED_OFFSET), training scenes TRAIN_SEED_OFFSET + the sampler's index.

One scene = 1..6 non-overlapping objects on a plain background. Each object has a shape (4 kinds),
a colour (5 kinds) and a size (radius varies 2x). We keep each object's exact pixel mask, so pointing is
scored the way Molmo2's PointingEval scores it: a predicted point is a hit if it lands inside the mask.

Tasks (the tag picks the per-task loss weight; the targets are caption 1.0, QA 1.0, counting 1.5, pointing and
tracking 2.0, docs/molmo2.md, Loss weighting; config/shapes_stage1.py raises QA's to 6.0 for its one-word answers):
  caption   "Describe this image."            -> dense description from the scene graph
  qa        "What colour is the star?"        -> "red"           (only asked when the answer is unique)
  point     "Point to the red circles ..."    -> Molmo2 html-v2 points, or "There are none."
  count     "How many blue shapes are there?" -> points, then the count (Molmo2 counts by pointing)
  text      "What is 12 plus 7?"              -> "19"            (the text-only share of the mix)
In motion (stage 2 on): the same objects moving in short videos sampled at 2 fps, and sets of 2-3 images:
  video_caption, video_qa, subtitle_qa   what moves where, what comes first, what a subtitle calls an object
  video_point, video_count               each object once, at the time it is first seen ("2.5 1 x y;...")
  track                                  every visible object in every frame, with an id it keeps throughout
  multi_qa, multi_point                  "Which image has ...?", points prefixed by the image's number
Each example is a dict: task, image (PIL) / video / images, turns [(question, answer)], and gt, the ground
truth the evaluator scores against (points in pixels, per-object masks, counts, answers).
"""
import functools
import math
import random

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import (COUNT_ANSWER, COUNT_PROMPT, NONE_ANSWER, POINT_PROMPT, TRACK_PROMPT,  # Molmo2's prompts
                  Tokenizer, format_groups, format_points, preprocess_image, train_bpe)  # html-v2, images, BPE

SHAPES = ["circle", "square", "triangle", "star"]
COLORS = {  # name -> RGB; far apart so that a 2x2-pixel average already tells them apart
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND = (235, 235, 235)
TRAIN_SEED_OFFSET = 1_000_000  # eval scenes use seeds [0, 1e6), training scenes [1e6, ...): never the same

MAX_OBJECTS = 6  # scenes hold 1..MAX_OBJECTS objects (the difficulty floor: 1 to 6)
VIDEO_FRAMES = (6, 11)  # frames per video scene, both ends included, at 2 fps (config/shapes_stage3.py: longer)
ABSENT_RATE = 0.2  # share of pointing/counting queries about something absent; the held-out eval always uses it


def plural(shape):
    """The label's plural, as the prompts use it ("Point to the red circles")."""
    return shape + "es" if shape.endswith("s") else shape + "s"  # only "circles", "squares", ... here


class Scene:
    """objects: list of dicts {shape, color, cx, cy, r, mask (H, W) bool}; image: PIL RGB (H, W)."""

    def __init__(self, objects, image):  # built by make_scene
        self.objects, self.image = objects, image

    def select(self, color=None, shape=None):
        """The objects a label picks: both attributes, one of them, or (both None) all of them."""
        return [o for o in self.objects
                if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape)]


def _polygon(shape, cx, cy, r):
    """The vertices [(x, y)] of a shape centred on (cx, cy) that fits in the disc of radius r."""
    if shape == "square":
        s = r * 0.7  # half side; corners at 0.99 r, so the disc of radius r used for placement bounds it
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":  # equilateral, pointing up; its centroid is (cx, cy)
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":  # 5 points, inner radius 0.45 r
        return [(cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    raise ValueError(shape)


def draw_object(draw, shape, cx, cy, r, fill):
    """Draw one shape with PIL. The same call draws the visible image and the object's mask (fill 255 or an
    object number), so the mask is exactly the pixels the model sees."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def make_scene(rng, size=64, n_min=1, n_max=MAX_OBJECTS, r_min=None, r_max=None):
    """Sample a scene -> Scene (objects with exact masks, the RGB image). Radii in [size/10, size/5] by default:
    2x size variation (the difficulty floor). At 64 px an object spans 13-26 px: about 2-3 patches of 8 px, or
    1-2 pooled tokens (a 2x2 window is 16 px) across."""
    r_min = r_min or size / 10
    r_max = r_max or size / 5
    n = rng.randint(n_min, n_max)
    while True:  # rejection-sample non-overlapping discs; a crowded draw just restarts
        placed = []
        for _ in range(n):
            for _try in range(50):
                r = rng.uniform(r_min, r_max)
                cx, cy = rng.uniform(r + 1, size - r - 1), rng.uniform(r + 1, size - r - 1)
                if all(math.hypot(cx - p[0], cy - p[1]) > r + p[2] + 2 for p in placed):
                    placed.append((cx, cy, r))
                    break
        if len(placed) == n:
            break
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    objects = []
    # attributes drawn independently: a scene may hold two red circles, which is what makes pointing "all of
    # them" and counting non-trivial; the mask of each object is rendered alone, on its own canvas
    for cx, cy, r in placed:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        m = Image.new("L", (size, size), 0)
        draw_object(ImageDraw.Draw(m), shape, cx, cy, r, 255)
        draw_object(draw, shape, cx, cy, r, COLORS[color])
        objects.append(dict(shape=shape, color=color, cx=cx, cy=cy, r=r, mask=np.asarray(m) > 0))
    return Scene(objects, image)


def _where(o, size):
    """The object's place on a 3 x 3 grid of the image, in words: "top left", "bottom", "center"."""
    col = ["left", "", "right"][min(2, int(3 * o["cx"] / size))]
    row = ["top", "", "bottom"][min(2, int(3 * o["cy"] / size))]
    return (f"{row} {col}".strip() or "center")


def caption(scene, size):
    """The dense caption: every object's size, colour, shape and place, in reading order (top row first).
    Like PixMo-Cap's long captions it names everything in the image, so it teaches what and where at once."""
    objs = sorted(scene.objects, key=lambda o: (int(3 * o["cy"] / size), o["cx"]))  # reading order
    mid = 0.15 * size  # half way between the smallest and the largest radius
    parts = [f"a {'large' if o['r'] > mid else 'small'} {o['color']} {o['shape']} at the {_where(o, size)}"
             for o in objs]
    n = len(objs)
    return f"There {'is' if n == 1 else 'are'} {n} shape{'s' if n > 1 else ''}: " + ", ".join(parts) + "."


def _query(rng, scene, absent_rate, multi_rate=0.0):
    """A referring label and the objects it picks. Mixes colour+shape, colour-only and shape-only queries,
    and about absent_rate of them (1 in 5) is absent from the scene, so answers range over 0..6 objects.
    multi_rate: the share of the present targets drawn among the labels that pick two or more objects, where the
    scene has one (0: none drawn so, and the random draws are those of a run without the key)."""
    # kind picks the label's form: colour + shape below 0.6 ("red circles"), colour only up to 0.8 ("red
    # shapes"), shape only above ("circles"); the same split for absent and present targets
    kind = rng.random()
    if rng.random() < absent_rate:  # an absent combination -> "There are none."
        for _ in range(20):
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if kind < 0.6 and not scene.select(c, s):
                return f"{c} {plural(s)}", []
            if 0.6 <= kind < 0.8 and not scene.select(color=c):
                return f"{c} shapes", []
            if kind >= 0.8 and not scene.select(shape=s):
                return plural(s), []
    if multi_rate and rng.random() < multi_rate:  # a target of several objects: what pointing and counting miss
        groups = {}
        for o in scene.objects:
            for label, objs in ((f"{o['color']} {plural(o['shape'])}", scene.select(o["color"], o["shape"])),
                                (f"{o['color']} shapes", scene.select(color=o["color"])),
                                (plural(o["shape"]), scene.select(shape=o["shape"]))):
                if len(objs) >= 2:
                    groups[label] = objs
        if groups:
            label = rng.choice(sorted(groups))
            return label, groups[label]
    o = rng.choice(scene.objects)  # a present target: anchor the query on a real object
    if kind < 0.6:
        return f"{o['color']} {plural(o['shape'])}", scene.select(o["color"], o["shape"])
    if kind < 0.8:
        return f"{o['color']} shapes", scene.select(color=o["color"])
    return plural(o["shape"]), scene.select(shape=o["shape"])


IMAGE_TASKS = ["caption", "qa", "point", "count", "text"]  # stage 1 (text has no image; it keeps the LLM's text)


def make_example(task, seed, size=64, n_turns=1, absent_rate=ABSENT_RATE, max_objects=MAX_OBJECTS,
                 video_frames=VIDEO_FRAMES, multi_rate=0.0):
    """Returns dict(task, image (PIL or None), turns [(user, assistant)], gt (ground truth of the first turn)), and
    for questions about an image, objects (the scene's objects: colour, shape, centre cx, cy, radius r, mask).
    absent_rate: the share of pointing/counting questions whose answer is "There are none." (training may ask
    more of them, train.absent_rate; evaluation keeps the default). multi_rate: the share of the other (present)
    targets asked about two or more objects where the scene allows (_query; train.multi_rate; evaluation: 0, the
    scenes' own share, ~1 in 5 of the questions). A smaller max_objects draws smaller image
    scenes (eval.py --max_objects: with one object pointing needs no choice, so it measures the coordinate
    read-out alone; the acceptance figures keep 1 to 6).

    n_turns > 1 asks several different questions of the same task about the same scene, as one multi-turn
    conversation: the image is encoded once for all of them, the way Molmo2 groups the annotations of one
    image into one sequence (its message trees: docs/molmo2.md, Stages). Captions have one turn.
    video_frames (lo, hi): the frame count range of video scenes (2 fps: (6, 11) is 2.5-5 s)."""
    if task in VIDEO_TASKS:
        return make_video_example(task, seed, size, n_turns, video_frames=video_frames)
    if task in MULTI_TASKS:
        return make_multi_example(task, seed, size, n_turns)
    rng = random.Random(f"{task}:{seed}")  # str seeds hash with sha512: stable across runs and machines
    if task == "text":
        return _text_example(rng)
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be 1..{MAX_OBJECTS} (the most a scene holds), got {max_objects!r}")
    scene = make_scene(rng, size, n_max=max_objects)
    if task == "caption":
        cap = caption(scene, size)
        return dict(task=task, image=scene.image, turns=[("Describe this image.", cap)], gt=dict(answer=cap))
    # draw questions until n_turns distinct ones are found (at most 4 tries each): a scene with one object has
    # few distinct questions, so such an example may hold fewer turns
    turns, gts = [], []
    for _ in range(4 * n_turns):  # distinct questions only
        if task in ("point", "count"):
            label, objs = _query(rng, scene, absent_rate, multi_rate)
            pts = [(o["cx"], o["cy"]) for o in objs]  # pixel centres; the writer scales to 0-1000
            if task == "point":
                q = POINT_PROMPT.format(label=label)
                a = format_points(pts, size, size, label) if objs else NONE_ANSWER
            else:
                q = COUNT_PROMPT.format(label=label)
                a = (COUNT_ANSWER.format(points=format_points(pts, size, size, label), n=len(objs))
                     if objs else NONE_ANSWER)
            gt = dict(points=pts, masks=[o["mask"] for o in objs], count=len(objs), label=label)
        elif task == "qa":
            q, a = _qa(rng, scene)
            gt = dict(answer=a)
        else:
            raise ValueError(f"unknown shapes task {task!r}; known: {', '.join(IMAGE_TASKS + VIDEO_TASKS + MULTI_TASKS)}")
        if all(q != t[0] for t in turns):
            turns.append((q, a))
            gts.append(gt)
        if len(turns) == n_turns:
            break
    # the ground truth scored by eval.py is the first turn's: evaluation asks one question per scene
    # objects: the whole scene (colour, shape, centre, mask of each), for diagnostics (eval.attention_on_target)
    return dict(task=task, image=scene.image, turns=turns, gt=gts[0], objects=scene.objects)


# Labels for the vision pretraining phase (train.py pretrain_vit). Dense, one set per pooled image token, because
# that is what the LLM will read: each token must say what lies under it and where an object's centre is.
ATTRIBUTE_PAIRS = [(c, s) for c in COLORS for s in SHAPES]  # 20 (colour, shape) classes
CENTRE_BINS = 32  # centre coordinates as classes: 32 bins across the image (2 px at 64 px, 31 in 0-1000 units)


def dense_batch(start, n, size=64, patch=8, pools=((2, 2),), offset=TRAIN_SEED_OFFSET):
    """n scenes (seeds "vit:{offset + start + i}") -> (x, labels): x (n, 3, size, size), the images normalised as
    the model's input, and for each pooling window size in `pools` the targets of every pooled token (the
    connector's output for one image, in pooling_index order: T tokens, each a window of pool[0] x pool[1]
    patches), one rendering serving all of them:
      centre (n, T) long         pair index (0..19) of the object whose centre lies in the window, 20 = none
      bins   (n, T, 2) long      that centre's (x, y) bin in 0..CENTRE_BINS-1, -100 (ignored) where none
      cover  (n, T, 20) float    1 where an object of that pair covers at least 3 pixels of the window
    Eval scenes use offset=0, training scenes the training offset, as everywhere in this world."""
    from data import pooling_index
    g = size // patch
    # the "vit:" prefix keeps these scenes apart from every task's scenes of the same seed
    scenes = [make_scene(random.Random(f"vit:{offset + start + i}"), size) for i in range(n)]
    labels = []  # (centre, bins, cover) per window size
    for pool in pools:
        # the same windows the connector pools (data.pooling_index): idx (T, pool_h * pool_w) patch numbers, -1 pads
        idx, _, _ = pooling_index(g, g, *pool)
        boxes = []  # pixel box (y0, y1, x0, x1) of each window: the span of its valid patches
        for row in idx:
            r, c = row[row >= 0] // g, row[row >= 0] % g
            boxes.append((r.min() * patch, (r.max() + 1) * patch, c.min() * patch, (c.max() + 1) * patch))
        T = len(boxes)
        # defaults: no object's centre (class 20), no centre bin (-100, ignored by cross-entropy), nothing covering
        centre = torch.full((n, T), len(ATTRIBUTE_PAIRS), dtype=torch.long)
        bins = torch.full((n, T, 2), -100, dtype=torch.long)
        cover = torch.zeros(n, T, len(ATTRIBUTE_PAIRS))
        for i, scene in enumerate(scenes):
            for o in sorted(scene.objects, key=lambda o: o["r"]):  # larger objects last: they win a shared window
                k = ATTRIBUTE_PAIRS.index((o["color"], o["shape"]))
                for t, (y0, y1, x0, x1) in enumerate(boxes):
                    if o["mask"][y0:y1, x0:x1].sum() >= 3:
                        cover[i, t, k] = 1.0
                    if y0 <= o["cy"] < y1 and x0 <= o["cx"] < x1:
                        centre[i, t] = k
                        bins[i, t, 0] = min(CENTRE_BINS - 1, int(o["cx"] / size * CENTRE_BINS))
                        bins[i, t, 1] = min(CENTRE_BINS - 1, int(o["cy"] / size * CENTRE_BINS))
        labels.append((centre, bins, cover))
    return torch.stack([preprocess_image(s.image, size) for s in scenes]), labels


def _qa(rng, scene):
    """-> (question, answer): three question kinds, each asked only when the answer is unique in the scene."""
    for _ in range(20):
        kind = rng.randrange(3)
        o = rng.choice(scene.objects)
        if kind == 0 and len(scene.select(shape=o["shape"])) == 1:
            return f"What colour is the {o['shape']}?", o["color"]
        if kind == 1 and len(scene.select(color=o["color"])) == 1:
            return f"What shape is the {o['color']} object?", o["shape"]
        if kind == 2:
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            return f"Is there a {c} {s}?", "yes" if scene.select(c, s) else "no"
    return "How many shapes are there?", str(len(scene.objects))  # always unique


def _text_example(rng):
    """The text-only share (stage 1's 10% text, standing in for Tulu): small arithmetic and list tasks, no
    image. It keeps the LLM answering without an image, as the real mixture's text data does."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        q, ans = f"What is {a} plus {b}?", str(a + b)
    elif kind == 1:
        xs = rng.sample(range(10), rng.randint(3, 6))
        q, ans = "Sort these numbers: " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))
    else:
        words = rng.sample(SHAPES + list(COLORS), rng.randint(2, 5))
        q, ans = "How many words are in: " + " ".join(words) + "?", str(len(words))
    return dict(task="text", image=None, turns=[(q, ans)], gt=dict(answer=ans))


# ---------------------------------------------------------------------------------------------------------
# In motion: videos and multi-image sets (stage 2; docs/molmo2.md, Video sampling and Prompts and points)

# the task names of stage 2's shapes mixture (config/shapes_stage2.py), besides stage 1's IMAGE_TASKS
VIDEO_TASKS = ["video_caption", "video_qa", "video_point", "video_count", "track", "subtitle_qa"]
MULTI_TASKS = ["multi_qa", "multi_point"]
VIDEO_FPS = 2.0  # Molmo2 samples 2 fps; shapes videos are rendered on that grid, so the mp4 path gives the same frames
# the four directions of motion, as (sign of vx, sign of vy) -> the word captions and QA use (y grows downwards)
DIRS = {(1, 0): "right", (-1, 0): "left", (0, 1): "down", (0, -1): "up"}


def _bounce(p, v, t, lo, hi):
    """Where a point starting at p with speed v is after t seconds, bouncing between lo and hi (a reflection
    folds the straight path back into the box: period 2 (hi - lo))."""
    span = hi - lo
    u = (p - lo + v * t) % (2 * span)
    return lo + (u if u <= span else 2 * span - u)


class VideoScene:
    """objects: dicts {shape, color, r, x0, y0, vx, vy, t_in, t_out}; visible while t_in <= t <= t_out.
    times: the frame times (0, 0.5, ... on Molmo2's 2 fps grid). Objects may pass over each other: a pixel
    belongs to the object drawn last, and an object with under 4 visible pixels counts as occluded there."""

    def __init__(self, objects, times, size):  # built by make_video_scene; size: the frame's side in px
        self.objects, self.times, self.size = objects, times, size

    def position(self, o, t):
        """Object o's centre (x, y) in pixels at time t s, bouncing off the borders (its disc stays inside)."""
        return (_bounce(o["x0"], o["vx"], t, o["r"], self.size - o["r"]),
                _bounce(o["y0"], o["vy"], t, o["r"], self.size - o["r"]))

    def render(self, t):
        """-> (PIL image, {object index: mask (H, W) bool} for the objects visible at t)."""
        img = Image.new("RGB", (self.size, self.size), BACKGROUND)
        owner = Image.new("L", (self.size, self.size), 0)
        d, do = ImageDraw.Draw(img), ImageDraw.Draw(owner)
        for k, o in enumerate(self.objects):
            if o["t_in"] <= t + 1e-9 and t <= o["t_out"] + 1e-9:
                cx, cy = self.position(o, t)
                draw_object(d, o["shape"], cx, cy, o["r"], COLORS[o["color"]])
                draw_object(do, o["shape"], cx, cy, o["r"], k + 1)
        own = np.asarray(owner)
        masks = {k: own == k + 1 for k in range(len(self.objects))}
        return img, {k: m for k, m in masks.items() if m.sum() >= 4}

    @functools.cached_property
    def frames(self):
        """Every frame: [(t, image, masks)], rendered once per scene (videos are short)."""
        return [(t, *self.render(t)) for t in self.times]

    def select(self, color=None, shape=None):
        """Indices of the objects a label picks (as Scene.select, but indices: videos track objects by index)."""
        return [k for k, o in enumerate(self.objects)
                if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape)]

    def first_seen(self, k):
        """(frame index, t) of the first frame where object k is visible, or None."""
        return next(((i, t) for i, (t, _, m) in enumerate(self.frames) if k in m), None)


def make_video_scene(rng, size=64, n_min=1, n_max=3, frames=VIDEO_FRAMES):
    """1..3 objects, each moving right/left/up/down at constant speed and bouncing off the borders; about a
    third enter after the start and a third leave before the end. frames[0]..frames[1] frames at 2 fps (6..11:
    2.5-5 s)."""
    if not 2 <= frames[0] <= frames[1]:
        raise ValueError(f"video_frames must be (lo, hi) with 2 <= lo <= hi, got {frames!r}")
    # the frames lie on the 2 fps grid Molmo2 samples, so decoding the written mp4 (data.load_video) gives
    # back exactly these times, and the answers' "{t:.1f}" prefixes are the frames' own timestamps
    n_frames = rng.randint(*frames)
    times = [i / VIDEO_FPS for i in range(n_frames)]
    duration = times[-1]
    objects = []
    for _ in range(rng.randint(n_min, n_max)):
        r = rng.uniform(size / 10, size / 6)
        dx, dy = rng.choice(list(DIRS))
        speed = rng.uniform(size / 8, size / 4)  # pixels per second: 1/4 to 1/2 of the frame over 4 s
        # enter in the first half / leave in the second half, so "which appears first" and tracking have
        # objects that are not there in every frame
        t_in = rng.choice(times[1:n_frames // 2]) if rng.random() < 0.3 else 0.0
        t_out = rng.choice(times[n_frames // 2 + 1:]) if rng.random() < 0.3 else duration
        objects.append(dict(shape=rng.choice(SHAPES), color=rng.choice(list(COLORS)), r=r,
                            x0=rng.uniform(r, size - r), y0=rng.uniform(r, size - r),
                            vx=dx * speed, vy=dy * speed, t_in=t_in, t_out=t_out))
    return VideoScene(objects, times, size)


def _video_query(rng, scene):
    """A label and the object indices it picks (about 1 in 5 absent), as _query does for images."""
    if rng.random() < 0.2:
        for _ in range(20):
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if not scene.select(c, s):
                return f"{c} {plural(s)}", []
    o = rng.choice(scene.objects)
    if rng.random() < 0.7:
        return f"{o['color']} {plural(o['shape'])}", scene.select(o["color"], o["shape"])
    return f"{o['color']} shapes", scene.select(color=o["color"])


def _video_answer(task, rng, scene, size):
    """One (question, answer, ground truth) of a video task. frames: [(t, image, {object: mask})] per frame;
    answers with points are html-v2 with the frame's time as each group's prefix (data.format_groups)."""
    frames = scene.frames
    # captions: one sentence per object in order of appearance, its direction and, if not there throughout,
    # when it enters or leaves
    if task == "video_caption":
        order = sorted(range(len(scene.objects)), key=lambda k: scene.objects[k]["t_in"])
        parts = []
        for k in order:
            o = scene.objects[k]
            s = f"A {o['color']} {o['shape']} moves {DIRS[(int(np.sign(o['vx'])), int(np.sign(o['vy'])))]}"
            s += f", from {o['t_in']:.1f} s" if o["t_in"] > 0 else ""
            s += f", until {o['t_out']:.1f} s" if o["t_out"] < scene.times[-1] else ""
            parts.append(s + ".")
        cap = " ".join(parts)
        return "Describe this video.", cap, dict(answer=cap)
    # QA needs the whole video: the first direction (one frame is not enough to tell), which of two objects
    # appears first, or when one appears; asked only of objects whose colour + shape is unique in the scene
    if task == "video_qa":
        for _ in range(20):
            kind = rng.randrange(3)
            k = rng.randrange(len(scene.objects))
            o = scene.objects[k]
            name = f"{o['color']} {o['shape']}"
            if len(scene.select(o["color"], o["shape"])) != 1:
                continue
            if kind == 0:
                a = DIRS[(int(np.sign(o["vx"])), int(np.sign(o["vy"])))]
                return f"Which way does the {name} move at first?", a, dict(answer=a)
            if kind == 1 and len(scene.objects) > 1:
                j = rng.choice([j for j in range(len(scene.objects)) if j != k])
                p = scene.objects[j]
                other = f"{p['color']} {p['shape']}"
                if p["t_in"] != o["t_in"] and len(scene.select(p["color"], p["shape"])) == 1:
                    a = name if o["t_in"] < p["t_in"] else other
                    return f"Which appears first, the {name} or the {other}?", f"the {a}", dict(answer=f"the {a}")
            if kind == 2:
                a = f"{o['t_in']:.1f}"
                return f"When does the {name} first appear? Answer in seconds.", a, dict(answer=a)
        a = str(len(scene.objects))
        return "How many shapes appear in the video?", a, dict(answer=a)
    # subtitles: a one-second cue when the object appears gives it a name; the answer is only in the speech,
    # so the model must read the subtitle block and tie it to the object on screen
    if task == "subtitle_qa":
        k = rng.randrange(len(scene.objects))
        o = scene.objects[k]
        word = rng.choice(["apple", "river", "candle", "pebble", "violin", "garden"])
        q = f"What does the speaker call the {o['color']} {o['shape']}?"
        return q, word, dict(answer=word, subtitles=[(o["t_in"], o["t_in"] + 1.0,
                                                      f"the {o['color']} {o['shape']} is the {word}")])
    label, objs = _video_query(rng, scene)
    # ids by sorted first appearance (Molmo2: persistent object ids assigned by first appearance)
    objs = sorted(objs, key=lambda k: (scene.first_seen(k) or (99, 0))[0])
    objs = [k for k in objs if scene.first_seen(k) is not None]  # an object hidden throughout is not pointable
    # gt for the evaluator: per frame, the masks of the objects the label picks (eval.video_pointing_prf,
    # eval.tracking_prf)
    gt = dict(label=label, objects=objs, times=scene.times,
              masks=[{k: m[k] for k in objs if k in m} for _, _, m in frames])
    center = _mask_point
    if task in ("video_point", "video_count"):
        # each object once, where it is first seen: groups by time, ids counting on across the groups
        firsts = [(scene.first_seen(k), k) for k in objs]
        groups = {}
        for (i, t), k in firsts:
            groups.setdefault(i, []).append(center(frames[i][2][k]))
        text = format_groups([(f"{scene.times[i]:.1f}", pts) for i, pts in sorted(groups.items())], size, size, label)
        gt.update(points=[(scene.times[i], *center(frames[i][2][k])) for (i, t), k in firsts], count=len(objs))
        if task == "video_point":
            return POINT_PROMPT.format(label=label), text if objs else NONE_ANSWER, gt
        q = f"How many {label} appear in the video?"
        return q, (COUNT_ANSWER.format(points=text, n=len(objs)) if objs else NONE_ANSWER), gt
    # tracking: every frame where a picked object is visible, each object under its id (1, 2, ... by first
    # appearance) in every frame: <tracks coords="0.0 1 x y;0.5 1 x y 2 x y">label</tracks>
    if task == "track":
        groups = []
        for t, _, m in frames:
            pts = [(objs.index(k) + 1, *center(m[k])) for k in objs if k in m]
            if pts:
                groups.append((f"{t:.1f}", pts))
        text = format_groups(groups, size, size, label, tag="tracks") if groups else NONE_ANSWER
        return TRACK_PROMPT.format(label=label), text, gt
    raise ValueError(f"unknown shapes task {task!r}")


def _mask_point(m):
    """The answer's point for a mask: its centroid, or (a partly hidden object can be crescent-shaped) the mask
    pixel nearest the centroid, so the point always lies on the object. Pixel centres: (col + 0.5, row + 0.5)."""
    ys, xs = np.nonzero(m)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    if not m[int(cy), int(cx)]:
        i = int(np.argmin((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2))
        cx, cy = xs[i] + 0.5, ys[i] + 0.5
    return float(cx), float(cy)


def make_video_example(task, seed, size=64, n_turns=1, video_dir=None, video_frames=VIDEO_FRAMES):
    """A video example: dict(task, video, turns, gt[, subtitles]). video is dict(frames, times) rendered in
    memory, or, with video_dir, the path of an mp4 written there through PyAV (the file path of real data:
    decoded back by data.load_video at the same 2 fps grid, so the answers hold for both)."""
    import os
    from data import write_video
    rng = random.Random(f"{task}:{seed}")  # one stream for the scene, then its questions: all from (task, seed)
    scene = make_video_scene(rng, size, frames=video_frames)
    turns, gts = [], []
    for _ in range(4 * n_turns):
        q, a, gt = _video_answer(task, rng, scene, size)
        if all(q != t[0] for t in turns):
            turns.append((q, a))
            gts.append(gt)
        if len(turns) == n_turns or task in ("video_caption", "subtitle_qa"):
            break
    # in memory: data.visual_tokens takes dict(frames, times) as an already decoded video; the scene itself
    # (objects, motion, masks) stays in the example for inspection
    frames = [img for _, img, _ in scene.frames]
    video = dict(frames=frames, times=list(scene.times))
    if video_dir is not None:
        video = os.path.join(video_dir, f"{task}_{seed}.mp4")
        if not os.path.exists(video):
            write_video(video, frames, fps=VIDEO_FPS)
    ex = dict(task=task, video=video, turns=turns, gt=gts[0], scene=scene)
    if "subtitles" in gts[0]:
        ex["subtitles"] = gts[0]["subtitles"]
    return ex


def make_multi_example(task, seed, size=64, n_turns=1):
    """2-3 images in one example (Molmo2 multi-image): "Which image ...?" QA, and pointing whose frame prefix
    is the 1-based image index (`1 1 x y;3 2 x y`, ids counting on across images)."""
    rng = random.Random(f"{task}:{seed}")
    # 2-3 images of 1-3 objects each: short sequences, and an object is often in one image only (what
    # "which image" asks)
    scenes = [make_scene(rng, size, n_max=3) for _ in range(rng.randint(2, 3))]
    images = [s.image for s in scenes]
    if task == "multi_qa":
        for _ in range(40):
            o = rng.choice(rng.choice(scenes).objects)
            has = [i for i, s in enumerate(scenes) if s.select(o["color"], o["shape"])]
            if len(has) == 1:
                a = f"Image {has[0] + 1}"
                return dict(task=task, images=images, turns=[(f"Which image has a {o['color']} {o['shape']}?", a)],
                            gt=dict(answer=a))
        # no object unique to one image after 40 tries: fall back to counting across the set
        a = str(sum(len(s.objects) for s in scenes))
        return dict(task=task, images=images, turns=[("How many shapes are there in all the images?", a)],
                    gt=dict(answer=a))
    if task == "multi_point":
        o = rng.choice(rng.choice(scenes).objects)
        label = f"{o['color']} {plural(o['shape'])}"
        groups = [(str(i + 1), [(p["cx"], p["cy"]) for p in s.select(o["color"], o["shape"])])
                  for i, s in enumerate(scenes)]
        groups = [g for g in groups if g[1]]  # images without the object get no group
        a = format_groups(groups, size, size, label)
        return dict(task=task, images=images, turns=[(POINT_PROMPT.format(label=label), a)],
                    gt=dict(label=label, groups=groups))
    raise ValueError(f"unknown shapes task {task!r}")


# ----------------------------------------------------------------------------------------------------------
# The shapes world's tokenizer: a byte-level BPE trained, offline and deterministically, on the world's own text

def shapes_corpus(n=300):
    """Text the shapes world produces (every task: stage 1's images, stage 2's videos and image sets), used to
    train the offline BPE. Stage 2 starts from a stage-1 checkpoint and keeps its tokenizer, so the video words
    must be in it from the start (words such as "moves", "video", "seconds" each get a token of their own)."""
    texts = []
    # training scenes (TRAIN_SEED_OFFSET on): the tokenizer is fitted without reading the held-out scenes
    for task in IMAGE_TASKS + VIDEO_TASKS + MULTI_TASKS:
        # videos are slow to draw and their text is templated: a tenth as many already gives every word its token
        for seed in range(n if task in IMAGE_TASKS else n // 10):
            ex = make_example(task, TRAIN_SEED_OFFSET + seed)
            texts += [t for turn in ex["turns"] for t in turn] + ["user\n", "assistant\n"]  # the chat roles
    return texts


def tokenizer(base_vocab=None, n_merges=400):
    """The 'shapes-bpe' tokenizer (train.py's default): data.train_bpe over shapes_corpus(), ~660 ids with the
    chat and vision tokens. The same every time (no randomness), so checkpoints and tests agree on the ids."""
    return Tokenizer(train_bpe(shapes_corpus(), n_merges), base_vocab=base_vocab)

"""
The shapes world: a procedural, infinite, exactly-labelled stand-in for Molmo2's image data.

Every example is a pure function of (task, seed), so a run is reproducible, a data position is just an
integer, and held-out evaluation uses a seed range that training never touches (DESIGN.md section 4).

One scene = 1..6 non-overlapping objects on a plain background. Each object has a shape (4 kinds),
a colour (5 kinds) and a size (radius varies 2x). We keep each object's exact pixel mask, so pointing is
scored the way Molmo2's PointingEval scores it: a predicted point is a hit if it lands inside the mask.

Tasks (the tag picks the per-task loss weight, seed: caption 1.0, QA 1.0, counting 1.5, pointing 2.0):
  caption   "Describe this image."            -> dense description from the scene graph
  qa        "What colour is the star?"        -> "red"           (only asked when the answer is unique)
  point     "Point to the red circles ..."    -> Molmo2 html-v2 points, or "There are none."
  count     "How many blue shapes are there?" -> points, then the count (Molmo2 counts by pointing)
  text      "What is 12 plus 7?"              -> "19"            (the text-only share of the mix)
"""
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from data import format_points  # the one html-v2 writer; shapes only supplies the pixels

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

# Molmo2's prompt templates (GENERAL_PROMPTS_V1, molmo2_reference.md section 3.2)
POINT_PROMPT = "Point to the {label}\nPlease say 'There are none.' if it is not in the image."
COUNT_PROMPT = "How many {label} are there?"
NONE_ANSWER = "There are none."


def plural(shape):
    return shape + "es" if shape.endswith("s") else shape + "s"  # only "circles", "squares", ... here


class Scene:
    """objects: list of dicts {shape, color, cx, cy, r, mask (H, W) bool}; image: PIL RGB (H, W)."""

    def __init__(self, objects, image):
        self.objects, self.image = objects, image

    def select(self, color=None, shape=None):
        return [o for o in self.objects
                if (color is None or o["color"] == color) and (shape is None or o["shape"] == shape)]


def _polygon(shape, cx, cy, r):
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
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def make_scene(rng, size=64, n_min=1, n_max=6, r_min=None, r_max=None):
    """Sample a scene. Radii in [size/10, size/5] by default: 2x size variation (the difficulty floor)."""
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
    for cx, cy, r in placed:
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        m = Image.new("L", (size, size), 0)
        draw_object(ImageDraw.Draw(m), shape, cx, cy, r, 255)
        draw_object(draw, shape, cx, cy, r, COLORS[color])
        objects.append(dict(shape=shape, color=color, cx=cx, cy=cy, r=r, mask=np.asarray(m) > 0))
    return Scene(objects, image)


def _where(o, size):
    col = ["left", "", "right"][min(2, int(3 * o["cx"] / size))]
    row = ["top", "", "bottom"][min(2, int(3 * o["cy"] / size))]
    return (f"{row} {col}".strip() or "center")


def caption(scene, size):
    objs = sorted(scene.objects, key=lambda o: (int(3 * o["cy"] / size), o["cx"]))  # reading order
    mid = 0.15 * size  # half way between the smallest and the largest radius
    parts = [f"a {'large' if o['r'] > mid else 'small'} {o['color']} {o['shape']} at the {_where(o, size)}"
             for o in objs]
    n = len(objs)
    return f"There {'is' if n == 1 else 'are'} {n} shape{'s' if n > 1 else ''}: " + ", ".join(parts) + "."


def _query(rng, scene):
    """A referring label and the objects it picks. Mixes colour+shape, colour-only and shape-only queries,
    and about 1 in 5 is absent from the scene, so answers range over 0..6 objects."""
    kind = rng.random()
    if rng.random() < 0.2:  # an absent combination -> "There are none."
        for _ in range(20):
            c, s = rng.choice(list(COLORS)), rng.choice(SHAPES)
            if kind < 0.6 and not scene.select(c, s):
                return f"{c} {plural(s)}", []
            if 0.6 <= kind < 0.8 and not scene.select(color=c):
                return f"{c} shapes", []
            if kind >= 0.8 and not scene.select(shape=s):
                return plural(s), []
    o = rng.choice(scene.objects)  # a present target: anchor the query on a real object
    if kind < 0.6:
        return f"{o['color']} {plural(o['shape'])}", scene.select(o["color"], o["shape"])
    if kind < 0.8:
        return f"{o['color']} shapes", scene.select(color=o["color"])
    return plural(o["shape"]), scene.select(shape=o["shape"])


def make_example(task, seed, size=64, n_turns=1):
    """Returns dict(task, image (PIL or None), turns [(user, assistant)], gt (ground truth of the first turn)).

    n_turns > 1 asks several different questions of the same task about the same scene, as one multi-turn
    conversation: the image is encoded once for all of them, the way Molmo2 groups the annotations of one
    image into one sequence (message trees, molmo2_reference.md 4.5). Captions have one turn."""
    rng = random.Random(f"{task}:{seed}")  # str seeds hash with sha512: stable across runs and machines
    if task == "text":
        return _text_example(rng)
    scene = make_scene(rng, size)
    if task == "caption":
        cap = caption(scene, size)
        return dict(task=task, image=scene.image, turns=[("Describe this image.", cap)], gt=dict(answer=cap))
    turns, gts = [], []
    for _ in range(4 * n_turns):  # distinct questions only
        if task in ("point", "count"):
            label, objs = _query(rng, scene)
            pts = [(o["cx"], o["cy"]) for o in objs]  # pixel centres; the writer scales to 0-1000
            if task == "point":
                q = POINT_PROMPT.format(label=label)
                a = format_points(pts, size, size, label) if objs else NONE_ANSWER
            else:
                q = COUNT_PROMPT.format(label=label)
                a = (f"Counting the {format_points(pts, size, size, label)} shows a total of {len(objs)}."
                     if objs else NONE_ANSWER)
            gt = dict(points=pts, masks=[o["mask"] for o in objs], count=len(objs), label=label)
        elif task == "qa":
            q, a = _qa(rng, scene)
            gt = dict(answer=a)
        else:
            raise ValueError(f"unknown shapes task {task!r}; known: caption, qa, point, count, text")
        if all(q != t[0] for t in turns):
            turns.append((q, a))
            gts.append(gt)
        if len(turns) == n_turns:
            break
    return dict(task=task, image=scene.image, turns=turns, gt=gts[0])


def _qa(rng, scene):
    """Three question kinds, each asked only when the answer is unique in the scene."""
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
    """The text-only share (seed: 10% NLP): small arithmetic and list tasks, no image."""
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

"""
Real datasets: readers for local copies of the datasets Molmo2 trains and evaluates on (PixMo, Tulu, Molmo2's video
sets, the image academic sets), each row turned into the example dicts data.encode_example takes, and SOURCES, where
each copy comes from. Nothing is downloaded: the rows come from a jsonl or
parquet copy, the media from media_root. docs/real_data.md shows the layout; train.load_datasets calls read_dataset.
"""
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, UnidentifiedImageError

from data import (COUNT_ANSWER, COUNT_PROMPT, NONE_ANSWER, POINT_PROMPT, TRACK_PROMPT,  # Molmo2's prompt templates
                  format_groups, format_points)  # the html-v2 point writers

# Readers for local copies of the Hugging Face datasets. PixMo stores image URLs, not images: users download the
# media themselves, under media_root, named by media_path; datasets that embed their images (VQA v2, DocVQA, ...)
# have them written out as files by prepare.py, each row then naming its file by a URL of the same kind
# (hf://<repo>/<sha256 of the bytes><ext>). A copy may store each image's size (image_width, image_height; image_sizes
# [[w, h], ...] for several images): a reader then never opens the image. Every example may carry `meta`, the truth
# an evaluator scores against (eval.py), by task:
#   qa (VQA style)        {"answers": [str, ...]}          every annotator's answer (VQA v2: all ten)
#   qa, multi_qa, video_qa (choice) {"answer": "B"}        the right option's letter
#   count                 {"count": int}
#   point                 {"points": [(x, y) pixels], "masks": [mask, ...] or None, "size": (w, h)}
#   video_point, _count   {"points": [(t, x, y)], "count": int, "size": (w, h)}  x, y on the scale of size (0-100
#                         for Molmo2's training sets, pixels for VideoPointEval, which adds "masks": per point
#                         {frame time: COCO RLE}; VideoCountEval has only the count: points and size None)
#   track                 {"tracks": {time: {object id: (x, y)}}, "size": (w, h)}
# A conversation of several questions (rows grouped per image) has no single truth: it carries no meta.

# A reader turns each row into data.py's example dicts (as shapes.make_example returns), grouped per image the way
# Molmo2 groups its annotations into one conversation. Rows that are malformed or whose media is missing are
# skipped and counted; a file with nothing readable is an error. Videos are <media_root>/<video id>.mp4. Copies
# may be jsonl (what prepare.py writes) or parquet (the Hugging Face datasets' own format, read with pyarrow).

class MissingMedia(Exception):
    """A row whose image or video is not under media_root (not downloaded) or cannot be read: skipped, counted."""


class Filtered(Exception):
    """A well-formed row that the dataset's filter leaves out (counted, not an error)."""


def media_path(media_root, url, ext=".jpg"):
    """The local file for an image URL: <media_root>/<sha256 of the URL><the URL's extension, else ext>. Hashing
    the URL (not its basename: thousands of PixMo URLs end in image.jpg) gives one file per URL; a download
    script names its files with this same function."""
    import hashlib
    from urllib.parse import urlparse
    suffix = os.path.splitext(urlparse(url).path)[1].lower() or ext
    return os.path.join(media_root, hashlib.sha256(url.encode()).hexdigest() + suffix)


def _image_urls(rec):
    """A row's image URLs, a list: image_urls (multi-image rows), else image_url (a string, or a list)."""
    urls = rec["image_urls"] if "image_urls" in rec else rec["image_url"]
    urls = [urls] if isinstance(urls, str) else urls
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) and u for u in urls):
        raise ValueError(f"image_url must be a non-empty string or list of them, got {str(urls)[:80]}")
    return urls


def _stored_sizes(rec, n):
    """The n images' [(w, h)] as the copy stores them (image_width / image_height for one image, image_sizes
    [[w, h], ...] for several), or None when it does not."""
    ok = lambda v: isinstance(v, int) and v > 0  # noqa: E731
    sizes = rec.get("image_sizes")
    if sizes is None and n == 1 and ok(rec.get("image_width")) and ok(rec.get("image_height")):
        sizes = [(rec["image_width"], rec["image_height"])]
    if sizes is None:
        return None
    if len(sizes) != n or not all(isinstance(s, (list, tuple)) and len(s) == 2 and ok(s[0]) and ok(s[1])
                                  for s in sizes):
        raise ValueError(f"image_sizes must hold one [width, height] per image ({n}), got {str(sizes)[:80]}")
    return [tuple(s) for s in sizes]


def _images_of(rec, media_root):
    """[(path, width, height)] of a row's images; MissingMedia if one is not there. The sizes come from the row
    when the copy stores them (then no file is opened), else from each image's header."""
    urls = _image_urls(rec)
    sizes = _stored_sizes(rec, len(urls))
    out = []
    for j, url in enumerate(urls):
        path = media_path(media_root, url)
        if not os.path.exists(path):
            raise MissingMedia(f"{url} (expected at {path})")
        out.append((path, *(sizes[j] if sizes else _image_size(path))))
    return out


def _image_of(rec, media_root):
    """(path, width, height) of a row's one image (as _images_of)."""
    imgs = _images_of(rec, media_root)
    if len(imgs) != 1:
        raise ValueError(f"expected one image, got {len(imgs)}")
    return imgs[0]


@lru_cache(maxsize=65536)  # PixMo-Points has several rows per image: its header is read once
def _image_size(path):
    """(width, height) from the image's header, for the pixel -> 0-1000 point scale."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise MissingMedia(f"unreadable image {path}: {e}") from None


def _text(rec, key):
    """A row's non-empty string field; anything else is a malformed row (ValueError naming the field)."""
    v = rec[key]
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{key} must be a non-empty string, got {v!r}")
    return v


def _points_xy(pts):
    """[{x, y}, ...] or {x: [...], y: [...]} (how Hugging Face datasets hands out a sequence of points; pixels,
    or 0-100) -> [(x, y)]; None means no points."""
    pts = pts or []
    if isinstance(pts, dict) and isinstance(pts.get("x"), list) and isinstance(pts.get("y"), list):
        if len(pts["x"]) != len(pts["y"]):
            raise ValueError(f"points x and y differ in length: {len(pts['x'])} and {len(pts['y'])}")
        pts = [dict(x=x, y=y) for x, y in zip(pts["x"], pts["y"])]
    if not isinstance(pts, list) or not all(isinstance(p, dict) and isinstance(p.get("x"), (int, float))
                                            and isinstance(p.get("y"), (int, float)) for p in pts):
        raise ValueError(f"points must be a list of {{x, y}} numbers, got {str(pts)[:80]}")
    return [(p["x"], p["y"]) for p in pts]


def _pixmo_cap(rec, media_root, i):
    """PixMo-Cap: image_url, caption (the long caption) -> one captioning example per row."""
    path, _, _ = _image_of(rec, media_root)
    return ("caption", i), dict(task="caption", image=path, turns=[("Describe this image in detail.",
                                                                     _text(rec, "caption"))])


def _pixmo_points(rec, media_root, i):
    """PixMo-Points: image_url, label, points (pixels), collection_method -> grouped per image: every label
    asked of the image is one turn of its conversation; the 'counting' rows ask for the count."""
    path, w, h = _image_of(rec, media_root)
    label, pts = _text(rec, "label"), _points_xy(rec.get("points"))
    task = "count" if rec.get("collection_method") == "counting" else "point"
    ans = format_points(pts, w, h, label) if pts else NONE_ANSWER
    if task == "count" and pts:
        ans = COUNT_ANSWER.format(points=ans, n=len(pts))
    q = (COUNT_PROMPT if task == "count" else POINT_PROMPT).format(label=label)
    meta = dict(count=len(pts)) if task == "count" else dict(points=pts, masks=None, size=(w, h))
    return (task, rec["image_url"]), dict(task=task, image=path, turns=[(q, ans)], meta=meta)


def _pixmo_points_eval(rec, media_root, i):
    """PixMo-Points-Eval (allenai/pixmo-points-eval): image_url, label, points (0-100 scale), masks (one boolean
    image-sized mask per object) -> a pointing question; meta: the points in pixels, the masks and the image size,
    taken from the masks' shape as Molmo2 takes it (olmo/data/pixmo_datasets.py PixMoPointsEval)."""
    path, w, h = _image_of(rec, media_root)
    label, pts, masks = _text(rec, "label"), _points_xy(rec.get("points")), rec["masks"]
    if not isinstance(masks, list):
        raise ValueError(f"masks must be a list of masks, got {type(masks).__name__}")
    if masks:
        h, w = len(masks[0]), len(masks[0][0])  # each mask is (h, w) rows of booleans
    px = [(x * w / 100, y * h / 100) for x, y in pts]
    ans = format_points(px, w, h, label) if px else NONE_ANSWER
    return ("point", i), dict(task="point", image=path, turns=[(POINT_PROMPT.format(label=label), ans)],
                              meta=dict(points=px, masks=masks, size=(w, h)))


def _pixmo_count(rec, media_root, i):
    """PixMo-Count: image_url, label, count, points (pixels; absent in the eval splits) -> a counting turn,
    answered by pointing when the points are there, else with the number alone."""
    path, w, h = _image_of(rec, media_root)
    label, n, pts = _text(rec, "label"), rec["count"], _points_xy(rec.get("points"))
    if not isinstance(n, int) or n < 0 or (pts and len(pts) != n):
        raise ValueError(f"count must be a non-negative int matching the points, got {n!r} with {len(pts)} points")
    ans = NONE_ANSWER if n == 0 else (COUNT_ANSWER.format(points=format_points(pts, w, h, label), n=n) if pts
                                      else str(n))
    return ("count", rec["image_url"]), dict(task="count", image=path, meta=dict(count=n),
                                             turns=[(COUNT_PROMPT.format(label=label), ans)])


def _vqa(question, answers, answer="", group=False):
    """A reader of VQA-style rows: one image, a question (column `question`) and the annotators' answers (column
    `answers`: strings, or VQA v2's {answer, answer_confidence, answer_id}) -> a short-answer turn, trained on the
    `answer` column when the dataset has one (VQA v2's multiple_choice_answer), else on the most common answer.
    meta: every answer. group: the questions of one image are one conversation (Molmo2's coco_2014_vqa_multi)."""
    def read(rec, media_root, i):  # a reader (rec, media_root, row number) -> (key, example), as READERS hold
        path, _, _ = _image_of(rec, media_root)
        q, ans = _text(rec, question), rec[answers]
        if isinstance(ans, list):
            ans = [a.get("answer") if isinstance(a, dict) else a for a in ans]
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) for a in ans):
            raise ValueError(f"{answers} must be a non-empty list of answers, got {str(rec[answers])[:80]}")
        a = _text(rec, answer) if answer else Counter(ans).most_common(1)[0][0]
        return ("qa", rec["image_url"] if group else i), dict(task="qa", image=path, turns=[(q, a)],
                                                               meta=dict(answers=ans))
    return read


# The Cauldron's multiple-choice rows (HuggingFaceM4/the_cauldron): the options are lines "A. ..." of the user
# text, the reply is "Answer: B" (or the bare letter, or True / False for a statement)
_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s+(.+?)\s*$")
_REPLY = re.compile(r"^\s*(?:answer\s*:\s*)?\(?([A-Za-z]+)\)?\.?\s*$", re.I)
_INSTRUCTION = ("choices", "options", "answer with", "answer:")  # lines of the cauldron's own MC wording


def _cauldron_mc(rec, media_root, i):
    """The Cauldron's multiple-choice sets (AI2D, NLVR2): images (1 or 2), texts [{user, assistant, source}] ->
    per text a question with its options lettered in MC_PROMPT (the same wording as _molmo2_capqa), answered with
    the letter. AI2D lists its options in the user text; NLVR2 states a sentence about two images answered
    true or false (or yes / no), asked here as the options A. True, B. False. meta (one question only): the
    letter."""
    paths = [p for p, _, _ in _images_of(rec, media_root)]
    texts = rec["texts"]
    if not isinstance(texts, list) or not texts:
        raise ValueError(f"texts must be a non-empty list of {{user, assistant}}, got {str(texts)[:80]}")
    turns = []
    for t in texts:
        lines, m = _text(t, "user").strip().splitlines(), _REPLY.match(_text(t, "assistant"))
        opts = [o.groups() for o in map(_OPTION.match, lines) if o]
        said = m.group(1) if m else ""
        if opts and said.upper() in [letter for letter, _ in opts] and len(said) == 1:
            k = [letter for letter, _ in opts].index(said.upper())
            options = [o for _, o in opts]
            lines = [ln for ln in lines if not _OPTION.match(ln) and not ln.strip().lower().startswith(_INSTRUCTION)]
        elif not opts and said.lower() in ("true", "false", "yes", "no"):
            k = int(said.lower() in ("false", "no"))
            options = ["True", "False"] if said.lower() in ("true", "false") else ["Yes", "No"]
        else:
            raise ValueError(f"reply {t['assistant']!r} is neither one of the options' letters nor true/false, yes/no")
        question = "\n".join(lines).strip()
        question = question[len("question:"):].strip() if question.lower().startswith("question:") else question
        turns.append((MC_PROMPT.format(question=question, options="\n".join(f"{chr(65 + j)}. {o}"
                                                                            for j, o in enumerate(options))),
                      chr(65 + k)))
    ex = dict(task="qa", image=paths[0]) if len(paths) == 1 else dict(task="multi_qa", images=paths)
    ex["turns"] = turns
    if len(turns) == 1:
        ex["meta"] = dict(answer=turns[0][1])
    return ("mc", i), ex


def _tulu(rec, media_root, i):
    """Tulu-style messages: [{role, content}], user and assistant alternating (a system message is put before
    the first user message) -> a text-only conversation."""
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in msgs):
        raise ValueError("messages must be a list of {role, content}")
    system = [m["content"] for m in msgs if m.get("role") == "system"]
    rest = [m for m in msgs if m.get("role") != "system"]
    if len(rest) < 2 or len(rest) % 2 or any(m.get("role") != ("user", "assistant")[j % 2] for j, m in enumerate(rest)):
        raise ValueError(f"messages must alternate user, assistant: {[m.get('role') for m in msgs]}")
    turns = [(rest[j]["content"], rest[j + 1]["content"]) for j in range(0, len(rest), 2)]
    if system:
        turns[0] = ("\n".join(system) + "\n" + turns[0][0], turns[0][1])
    return ("text", i), dict(task="text", image=None, turns=turns)


def video_path(media_root, video_id):
    """The local file for a video id: <media_root>/<video id>.mp4 (an id that ends in .mp4 already is kept)."""
    return os.path.join(media_root, video_id if video_id.endswith(".mp4") else video_id + ".mp4")


def _video_of(rec, media_root, key="video_id"):
    """A row's video: <media_root>/<video id>.mp4 (the ids are YouTube ids or source-dataset clip names; users
    fetch and cut the clips themselves). MissingMedia if absent; decoding happens when the example is encoded."""
    vid = rec[key]
    if not isinstance(vid, str) or not vid:
        raise ValueError(f"{key} must be a non-empty string, got {vid!r}")
    path = video_path(media_root, vid)
    if not os.path.exists(path):
        raise MissingMedia(f"video {vid} (expected at {path})")
    return path


def _molmo2_cap(rec, media_root, i):
    """Molmo2-Cap: video_id, annotation_score, and three caption styles -> the longest style present
    (video_frame_merged_caption, else merged_caption, else video_caption). Molmo2 keeps annotation_score >= 3."""
    path = _video_of(rec, media_root)
    score = rec.get("annotation_score", 3)
    if not isinstance(score, (int, float)):
        raise ValueError(f"annotation_score must be a number, got {score!r}")
    if score < 3:
        raise Filtered(f"annotation_score {score} < 3 (Molmo2 keeps >= 3)")
    key = next((k for k in ("video_frame_merged_caption", "merged_caption", "video_caption") if rec.get(k)), None)
    if key is None:
        raise ValueError("no caption field")
    return ("video_caption", i), dict(task="video_caption", video=path,
                                      turns=[("Describe this video in detail.", _text(rec, key))])


def _video_points(path, label, times, pts, count, question=None):
    """The example of a video pointing row: times (one per annotated frame, seconds) and pts ([{x, y}] per time, on
    the 0-100 scale) -> one "t x y ..." group per time with points, on 0-1000. count: asked "How many ..." and
    answered by pointing then the count (task video_count), else asked to point (task video_point)."""
    if not isinstance(times, list) or not isinstance(pts, list) or len(times) != len(pts):
        raise ValueError(f"timestamps and points must be lists of one length, got {str(times)[:40]}, {str(pts)[:40]}")
    groups = [(t, _points_xy(p)) for t, p in zip(times, pts)]
    groups = [(f"{t:.1f}", p) for t, p in sorted(groups, key=lambda g: g[0]) if p]
    n = sum(len(p) for _, p in groups)
    meta = dict(points=[(float(t), x, y) for t, p in groups for x, y in p], count=n, size=(100, 100))
    ans = format_groups(groups, 100, 100, label) if groups else NONE_ANSWER  # 0-100 scale: "pixels" of 100 x 100
    if count:
        ans = COUNT_ANSWER.format(points=ans, n=n) if groups else NONE_ANSWER
        return dict(task="video_count", video=path, turns=[(COUNT_PROMPT.format(label=label), ans)], meta=meta)
    return dict(task="video_point", video=path, turns=[(question or POINT_PROMPT.format(label=label), ans)], meta=meta)


def _molmo2_videopoint(rec, media_root, i):
    """Molmo2-VideoPoint: video_id, label, question, two_fps_timestamps, points (per timestamp, 0-100 scale) ->
    temporal pointing answered with one group per timestamp that has points ("t x y ..." on the 0-1000 scale)."""
    path = _video_of(rec, media_root)
    return ("video_point", i), _video_points(path, _text(rec, "label"), rec["two_fps_timestamps"], rec["points"],
                                             False, rec.get("question"))


def _academic_points(rec, media_root, i):
    """Molmo2's academic video points (allenai/molmo2-academic-video-points; Molmo2's SFT video_pointing group
    samples it as academic_points_clip_63s_2fps): video_name, category (the label), count, timestamps, points
    ([{x, y}] per timestamp, 0-100 scale) -> counting by pointing on even rows and pointing on odd ones (Molmo2
    draws one of the two styles per example: olmo/data/academic_video_datasets.py AcademicVideoPoint); rows of
    more than 60 points are left out, as Molmo2's max_points=60 leaves them."""
    path = _video_of(rec, media_root, "video_name")
    n = rec["count"]
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"count must be a non-negative int, got {n!r}")
    if n > 60:
        raise Filtered(f"count {n} > 60 (Molmo2's max_points)")
    return ("video_point", i), _video_points(path, _text(rec, "category").lower(), rec["timestamps"], rec["points"],
                                             i % 2 == 0)


def _videopoint_eval(rec, media_root, i):
    """Molmo2-VideoPointEval: video_id, label, width, height, two_fps_timestamps and points (one {x, y} in pixels per
    timestamp), masks (per point, [{frame_id, rle}] at 2 fps) -> Molmo2's question for it, "How many ...",
    answered by pointing then the count (olmo/data/molmo2_datasets.py Molmo2VideoPointEval). meta: points
    (t, x, y) in pixels, count, size (width, height), and masks: per point {frame time: COCO RLE}."""
    path = _video_of(rec, media_root)
    label, w, h = _text(rec, "label"), rec["width"], rec["height"]
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
        raise ValueError(f"width and height must be positive numbers, got {w!r}, {h!r}")
    times, pts, masks = rec["two_fps_timestamps"], _points_xy(rec["points"]), rec["masks"]
    if not isinstance(times, list) or len(times) != len(pts) or not isinstance(masks, list) or len(masks) != len(pts):
        raise ValueError(f"two_fps_timestamps, points and masks must be lists of one length, got "
                         f"{len(times) if isinstance(times, list) else times!r}, {len(pts)}, {str(masks)[:40]}")
    points = [(float(t), x, y) for t, (x, y) in zip(times, pts)]
    groups = {}
    for t, x, y in sorted(points):
        groups.setdefault(f"{t:.1f}", []).append((x, y))
    ans = (COUNT_ANSWER.format(points=format_groups(list(groups.items()), w, h, label), n=len(points)) if points
           else NONE_ANSWER)
    meta = dict(points=points, count=len(points), size=(w, h),
                masks=[{m["frame_id"] / 2.0: m["rle"] for m in per_point} for per_point in masks])
    return ("video_point", i), dict(task="video_point", video=path, meta=meta,
                                    turns=[(COUNT_PROMPT.format(label=label), ans)])


def _videocount_eval(rec, media_root, i):
    """Molmo2-VideoCountEval: video_id, label, count, question -> the row's question, answered with the count
    (olmo/data/molmo2_datasets.py Molmo2VideoCountEval). meta: count (no points or size: the set has none)."""
    path = _video_of(rec, media_root)
    n = rec["count"]
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"count must be a non-negative int, got {n!r}")
    q = rec.get("question") or COUNT_PROMPT.format(label=_text(rec, "label"))
    return ("video_count", i), dict(task="video_count", video=path, turns=[(q, str(n))],
                                    meta=dict(points=None, count=n, size=None))


def _videopoint_bin(lo, hi):
    """Molmo2-VideoPoint rows whose count is in [lo, hi]: Molmo2 samples its video pointing by count bins
    (config/stage2.py: videopoint_0_5, videopoint_6_25, videopoint_26_60)."""
    def read(rec, media_root, i):  # a reader (rec, media_root, row number) -> (key, example), as READERS hold
        n = rec["count"]
        if not isinstance(n, int):
            raise ValueError(f"count must be an integer, got {n!r}")
        if not lo <= n <= hi:
            raise Filtered(f"count {n} outside [{lo}, {hi}]")
        return _molmo2_videopoint(rec, media_root, i)
    return read


def _molmo2_track(rec, media_root, i):
    """Molmo2 tracking (molmo2-track-instruction): clip (the video file: Molmo2 reads <clip>.mp4, the source video
    cut to the annotated frames), expression, width, height, frame_trajectories [{time, points [{id, point [x, y] in
    pixels, occluded}]}] -> a track: per frame time, the visible objects by id. meta: the same tracks, and the size."""
    path = _video_of(rec, media_root, "clip")
    expr, w, h = _text(rec, "expression"), rec["width"], rec["height"]
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
        raise ValueError(f"width and height must be positive numbers, got {w!r}, {h!r}")
    groups, tracks = [], {}
    for fr in rec["frame_trajectories"]:
        pts = [(p["id"], *p["point"]) for p in fr["points"] if not p.get("occluded")]
        if pts:
            groups.append((f"{fr['time']:.1f}", pts))
            tracks[float(fr["time"])] = {pid: (x, y) for pid, x, y in pts}
    ans = format_groups(groups, w, h, expr, tag="tracks") if groups else NONE_ANSWER
    return ("track", i), dict(task="track", video=path, turns=[(TRACK_PROMPT.format(label=expr), ans)],
                              meta=dict(tracks=tracks, size=(w, h)))


def _videotrack_eval(rec, media_root, i):
    """Molmo2-VideoTrackEval: clip (the video file), exp (the expression), w, h, fps, mask_id (the objects),
    points [{object_id, points: per frame [x, y] in pixels or null}] -> a tracking question (olmo/data/
    molmo2_video_track_datasets.py Molmo2VideoTrackEval). Objects are numbered 1, 2, ... in mask_id's order;
    meta: tracks {frame time: {object: (x, y)}} over every annotated frame, and the size. The reference answer
    writes the frames at whole seconds (Molmo2 scores tracks sampled at 1 fps)."""
    path = _video_of(rec, media_root, "clip")
    expr, w, h, fps = _text(rec, "exp"), rec["w"], rec["h"], rec["fps"]
    if not all(isinstance(v, (int, float)) and v > 0 for v in (w, h, fps)):
        raise ValueError(f"w, h and fps must be positive numbers, got {w!r}, {h!r}, {fps!r}")
    ids = {oid: j + 1 for j, oid in enumerate(rec["mask_id"])}
    frames = {}  # frame index -> {object: (x, y)}
    for obj in rec["points"]:
        for f, p in enumerate(obj["points"]):
            if p:
                frames.setdefault(f, {})[ids[obj["object_id"]]] = (float(p[0]), float(p[1]))
    tracks = {f / fps: objs for f, objs in sorted(frames.items())}
    step = max(1, round(fps))
    groups = [(f"{f / fps:.1f}", [(k, x, y) for k, (x, y) in sorted(objs.items())])
              for f, objs in sorted(frames.items()) if f % step == 0]
    ans = format_groups(groups, w, h, expr, tag="tracks") if groups else NONE_ANSWER
    return ("track", i), dict(task="track", video=path, turns=[(TRACK_PROMPT.format(label=expr), ans)],
                              meta=dict(tracks=tracks, size=(w, h)))


def _molmo2_subtitleqa(rec, media_root, i):
    """Molmo2-VideoSubtitleQA: video_id, Question, Answer, subtitle [{start, end, text}] -> a question about the
    video and its speech, the subtitles laid out after the frames (visual_tokens)."""
    path = _video_of(rec, media_root)
    subs = [(float(s["start"]), float(s["end"]), str(s["text"])) for s in rec["subtitle"]]
    return ("subtitle_qa", i), dict(task="subtitle_qa", video=path, subtitles=subs,
                                    turns=[(_text(rec, "Question"), _text(rec, "Answer"))])


MC_PROMPT = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."


def _molmo2_capqa(rec, media_root, i):
    """Molmo2-VideoCapQA: video_id, Question, Answer, NegativeAnswers -> a multiple-choice question, the right
    answer among the negatives at a place fixed by the row number, answered with its letter. (Molmo2 renders it
    as multiple choice; its exact wording is not public: this is the common LLaVA-style MC prompt.)"""
    path = _video_of(rec, media_root)
    neg = rec["NegativeAnswers"]
    if not isinstance(neg, list) or not 1 <= len(neg) <= 25:
        raise ValueError(f"NegativeAnswers must list 1 to 25 answers, got {str(neg)[:80]}")
    opts = [str(n) for n in neg]
    k = i % (len(opts) + 1)
    opts.insert(k, _text(rec, "Answer"))
    q = MC_PROMPT.format(question=_text(rec, "Question"), options="\n".join(f"{chr(65 + j)}. {o}"
                                                                          for j, o in enumerate(opts)))
    return ("video_qa", i), dict(task="video_qa", video=path, turns=[(q, chr(65 + k))], meta=dict(answer=chr(65 + k)))


def _molmo2_multiqa(rec, media_root, i):
    """Molmo2-MultiImageQA: image_urls (up to 5), qa_pairs {question: [...], answer: [...]} -> one conversation
    over the images."""
    urls, qa = rec["image_urls"], rec["qa_pairs"]
    if not isinstance(urls, list) or not 2 <= len(urls) <= 5:
        raise ValueError(f"image_urls must list 2 to 5 images, got {str(urls)[:80]}")
    paths = [p for p, _, _ in _images_of(rec, media_root)]
    qs, ans = qa["question"], qa["answer"]
    if not isinstance(qs, list) or len(qs) != len(ans) or not qs:
        raise ValueError("qa_pairs must hold questions and answers of one length")
    return ("multi_qa", i), dict(task="multi_qa", images=paths, turns=[(str(q), str(a)) for q, a in zip(qs, ans)])


# Every reader has one signature: reader(record, media_root, row number) -> (group key, example dict). Rows with the
# same key are one conversation (PixMo-Points: every label of one image; VQA v2: every question of one image; the
# row number for datasets without grouping), so an image is encoded once for all its questions. A reader raises
# MissingMedia (media not under media_root), Filtered (the dataset's own filter drops the row) or ValueError /
# KeyError / TypeError (a malformed row); read_dataset counts each kind and names the first of each. The keys are
# the names config files use in their mixtures and data_paths; the videopoint_* entries are Molmo2-VideoPoint split
# by count, as Molmo2 mixes it.
READERS = {"pixmo_cap": _pixmo_cap, "pixmo_points": _pixmo_points, "pixmo_count": _pixmo_count, "tulu": _tulu,
           "pixmo_points_eval": _pixmo_points_eval,
           "molmo2_cap": _molmo2_cap, "molmo2_videopoint": _molmo2_videopoint, "molmo2_track": _molmo2_track,
           "molmo2_subtitleqa": _molmo2_subtitleqa, "molmo2_multiqa": _molmo2_multiqa, "molmo2_capqa": _molmo2_capqa,
           "videopoint_0_5": _videopoint_bin(0, 5), "videopoint_6_25": _videopoint_bin(6, 25),
           "videopoint_26_60": _videopoint_bin(26, 60), "academic_points": _academic_points,
           "videopoint_eval": _videopoint_eval, "videocount_eval": _videocount_eval,
           "videotrack_eval": _videotrack_eval,
           "vqa_v2": _vqa("question", "answers", "multiple_choice_answer", group=True),
           "docvqa": _vqa("question", "answers"), "textvqa": _vqa("question", "answers"),
           "chartqa": _vqa("query", "label"), "ai2d": _cauldron_mc, "nlvr2": _cauldron_mc}


# Where each dataset comes from: its Hugging Face repo, the split (and config folders) of its released parquet
# files, the columns its reader needs, and which columns hold media. prepare.py reads this table to download and
# convert the rows; read_dataset checks a local copy's columns against it. One entry per local copy: an entry's
# `reader` names its READERS entry when the copy is a split of another dataset (the eval splits). Eval entries
# (eval=True) are never grouped: one example per row, its meta the truth of that row.
@dataclass(frozen=True)
class Source:
    repo: str                        # Hugging Face dataset repo id, e.g. "allenai/pixmo-cap"
    split: str = "train"             # the released split whose parquet files are read
    subsets: tuple = ()              # config folders of a multi-config repo (all read, concatenated); () = none
    columns: tuple = ()              # columns the reader needs: a copy without one is a one-line error
    image_url: str = ""              # column of image URLs to download (a list of URLs for multi-image rows)
    image_sha: str = ""              # column with the SHA-256 of the image bytes, checked after download
    image_bytes: str = ""            # column of embedded images ({bytes, path}, or a list) written out as files;
                                     # the copy names them in image_url (prepare.py), not in this column
    video: str = ""                  # column naming the video id (<media_root>/<id>.mp4; never downloaded)
    reader: str = ""                 # READERS key when it differs from the entry's name
    eval: bool = False               # a held-out split: one example per row, never grouped
    point_scale: int = 0             # the single-image `points` column: 0 = pixels, 100 = a 0-100 scale


_PIXMO_COUNT = dict(columns=("image_url", "label", "count"), image_url="image_url", image_sha="image_sha256")
_VIDEOPOINT = dict(columns=("video_id", "label", "count", "two_fps_timestamps", "points"), video="video_id",
                   subsets=("action_or_event", "animal", "anomaly", "comparative reference", "indirect reference",
                            "object", "referring expression", "spatial reference"))  # Molmo2VideoPoint.HF_CONFIGS
_VQA2 = dict(columns=("question", "answers", "multiple_choice_answer"), image_bytes="image")
_DOCVQA = dict(subsets=("DocVQA",), columns=("question", "answers"), image_bytes="image")
_TEXTVQA = dict(columns=("question", "answers"), image_bytes="image")
_CHARTQA = dict(columns=("query", "label"), image_bytes="image")
SOURCES = {
    "pixmo_cap": Source("allenai/pixmo-cap", columns=("image_url", "caption"), image_url="image_url"),
    "pixmo_points": Source("allenai/pixmo-points", columns=("image_url", "label", "points", "collection_method"),
                           image_url="image_url", image_sha="image_sha256"),
    "pixmo_count": Source("allenai/pixmo-count", **_PIXMO_COUNT),
    "tulu": Source("allenai/tulu-3-sft-mixture", columns=("messages",)),
    "molmo2_cap": Source("allenai/Molmo2-Cap", columns=("video_id",), video="video_id"),
    "molmo2_capqa": Source("allenai/Molmo2-VideoCapQA", columns=("video_id", "Question", "Answer",
                                                                  "NegativeAnswers"), video="video_id"),
    "molmo2_subtitleqa": Source("allenai/Molmo2-VideoSubtitleQA", columns=("video_id", "Question", "Answer",
                                                                           "subtitle"), video="video_id"),
    "molmo2_multiqa": Source("allenai/Molmo2-MultiImageQA", columns=("image_urls", "qa_pairs"),
                             image_url="image_urls"),
    "molmo2_track": Source("allenai/molmo2-track-instruction", subsets=("track",),
                           columns=("clip", "expression", "width", "height", "frame_trajectories"), video="clip"),
    "academic_points": Source("allenai/molmo2-academic-video-points",
                              columns=("video_name", "category", "count", "timestamps", "points"), video="video_name"),
    # image academic sets (Molmo2's SFT image_academic group), from copies that embed their images
    "vqa_v2": Source("lmms-lab/VQAv2", **_VQA2),
    "docvqa": Source("lmms-lab/DocVQA", **_DOCVQA),
    "textvqa": Source("lmms-lab/textvqa", **_TEXTVQA),
    "chartqa": Source("HuggingFaceM4/ChartQA", **_CHARTQA),
    "ai2d": Source("HuggingFaceM4/the_cauldron", subsets=("ai2d",), columns=("texts",), image_bytes="images"),
    "nlvr2": Source("HuggingFaceM4/the_cauldron", subsets=("nlvr2",), columns=("texts",), image_bytes="images"),
    # eval splits
    "pixmo_count_val": Source("allenai/pixmo-count", split="validation", reader="pixmo_count", eval=True,
                              **_PIXMO_COUNT),
    "pixmo_points_eval": Source("allenai/pixmo-points-eval", split="test", eval=True, image_url="image_url", point_scale=100,
                                columns=("image_url", "label", "points", "masks"), image_sha="image_sha256"),
    "vqa_v2_val": Source("lmms-lab/VQAv2", split="validation", reader="vqa_v2", eval=True, **_VQA2),
    "docvqa_val": Source("lmms-lab/DocVQA", split="validation", reader="docvqa", eval=True, **_DOCVQA),
    "textvqa_val": Source("lmms-lab/textvqa", split="validation", reader="textvqa", eval=True, **_TEXTVQA),
    "chartqa_test": Source("HuggingFaceM4/ChartQA", split="test", reader="chartqa", eval=True, **_CHARTQA),
    "videopoint_eval": Source("allenai/Molmo2-VideoPointEval", split="val", eval=True, video="video_id",
                              columns=("video_id", "label", "width", "height", "two_fps_timestamps", "points",
                                       "masks")),
    "videocount_eval": Source("allenai/Molmo2-VideoCountEval", split="val", eval=True, video="video_id",
                              columns=("video_id", "label", "count", "question")),
    "videotrack_eval": Source("allenai/Molmo2-VideoTrackEval", split="test", eval=True, video="clip",
                              columns=("clip", "exp", "w", "h", "fps", "mask_id", "points")),
}
SOURCES.update({name: Source("allenai/Molmo2-VideoPoint", reader=name, **_VIDEOPOINT)
                for name in ("molmo2_videopoint", "videopoint_0_5", "videopoint_6_25", "videopoint_26_60")})


def reader_name(name):
    """The READERS key that reads dataset `name`: its SOURCES entry's reader (the eval splits, e.g. pixmo_count_val
    read by pixmo_count), else the name itself."""
    return SOURCES[name].reader or name if name in SOURCES else name


def reader_of(name):
    """The READERS entry that reads dataset `name` (reader_name)."""
    key = reader_name(name)
    if key not in READERS:
        raise ValueError(f"no reader for dataset {name!r}; datasets: {', '.join(sorted(set(READERS) | set(SOURCES)))}")
    return READERS[key]


def check_columns(name, path, rec):
    """A local copy's first row against SOURCES[name].columns (plus image_url where the images were embedded):
    a copy of another dataset, or of another release, is one clear error naming the file and what is missing."""
    src = SOURCES.get(name)
    if src is None:
        return
    want = list(src.columns) + (["image_url"] if src.image_bytes and "image_urls" not in rec else [])
    missing = [c for c in want if c not in rec]
    if missing:
        raise ValueError(f"dataset {name} ({src.repo}): {path} lacks the columns {missing} (its first row has "
                         f"{sorted(rec)}); is it a copy of another dataset?")


def dataset_rows(name, path):
    """(row number, record) pairs of a dataset file: jsonl (1-based line numbers; a line that is not JSON gives
    its ValueError as the record, to be counted as malformed) or parquet, read with pyarrow."""
    import json
    with open(path, "rb") as f:
        parquet = f.read(4) == b"PAR1"  # parquet's magic bytes
    if parquet:
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's own errors (ArrowInvalid, OSError) for a damaged file
            raise ValueError(f"dataset {name}: cannot read parquet file {path}: {e}") from None
        yield from enumerate(rows, 1)
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except ValueError as e:  # json.JSONDecodeError
                    yield i, e


def read_dataset(name, path, media_root="", log=print):
    """Read a local jsonl or parquet copy of dataset `name` (SOURCES / READERS) -> (examples, counts). Rows grouped
    per image become one multi-turn example (eval splits are never grouped). The first row's columns are checked
    against SOURCES. Malformed rows and missing or unreadable media are skipped and counted, and one summary line
    per dataset is printed with the first problem of each kind (file:row)."""
    read = reader_of(name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {name}: file not found: {path}")
    per_row = name in SOURCES and SOURCES[name].eval
    # groups: key -> the example being built (its turns grow as rows of the same image come); counts: rows read and
    # rows skipped by kind; first: the first problem of each kind, as "file:row: why", for the summary line
    groups, counts, first, checked = {}, Counter(), {}, False
    for i, rec in dataset_rows(name, path):
        if not checked and isinstance(rec, dict):
            check_columns(name, path, rec)
            checked = True
        try:
            if isinstance(rec, Exception):
                raise rec
            if not isinstance(rec, dict):
                raise ValueError("a row must be a JSON object")
            key, ex = read(rec, media_root, i)
        except MissingMedia as e:
            kind, why = "missing media", str(e)
        except Filtered as e:
            kind, why = "filtered", str(e)
        except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            kind, why = "malformed", f"{type(e).__name__}: {e}"
        else:
            counts["rows"] += 1
            key = i if per_row else key
            if key in groups:  # several questions of one image: one conversation, and no single truth for it
                groups[key]["turns"] += ex["turns"]
                groups[key].pop("meta", None)
            else:
                groups[key] = ex
            continue
        counts[kind] += 1
        first.setdefault(kind, f"{path}:{i}: {why}")
    examples = list(groups.values())
    problems = "; ".join(first.values())
    if not examples:
        raise ValueError(f"dataset {name} ({path}): nothing readable ({dict(counts)}); {problems}")
    log(f"dataset {name}: {len(examples):,} examples from {counts['rows']:,} rows; skipped "
        f"{counts['malformed']:,} malformed, {counts['missing media']:,} with missing media"
        + (f", {counts['filtered']:,} left out by the dataset's filter" if counts["filtered"] else "")
        + (f" (first: {problems})" if problems else ""))
    return examples, counts

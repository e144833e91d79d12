"""
Real datasets: readers for local copies of the datasets Molmo2 trains on (PixMo, Tulu, Molmo2's video sets), each
row turned into the example dicts data.encode_example takes. Nothing is downloaded: the rows come from a jsonl or
parquet copy, the media from media_root. docs/real_data.md shows the layout; train.load_datasets calls read_dataset.
"""
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, UnidentifiedImageError

from data import (COUNT_ANSWER, COUNT_PROMPT, NONE_ANSWER, POINT_PROMPT, TRACK_PROMPT,  # Molmo2's prompt templates
                  format_groups, format_points)  # the html-v2 point writers

# Readers for local copies of the Hugging Face datasets. PixMo stores image URLs, not images:
# users download the media themselves, under media_root, named by media_path. A reader turns each jsonl row
# into data.py's example dicts (as shapes.make_example returns), grouped per image the way Molmo2 groups
# its annotations into one conversation. Rows that are malformed or whose media is missing are skipped and
# counted; a file with nothing readable is an error. Videos are <media_root>/<video id>.mp4. Copies may be jsonl
# or parquet (the Hugging Face datasets' own format; read with pyarrow, optional: without it, a clear error).

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


def _image_of(rec, media_root):
    """(path, width, height) of a row's image; MissingMedia if it is not there, ValueError if unreadable."""
    url = rec["image_url"]
    if not isinstance(url, str) or not url:
        raise ValueError(f"image_url must be a non-empty string, got {url!r}")
    path = media_path(media_root, url)
    if not os.path.exists(path):
        raise MissingMedia(f"{url} (expected at {path})")
    return (path, *_image_size(path))


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
    """[{x, y}, ...] (pixels, or 0-100) -> [(x, y)]; None means no points."""
    pts = pts or []
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
    return (task, rec["image_url"]), dict(task=task, image=path, turns=[(q, ans)])


def _pixmo_count(rec, media_root, i):
    """PixMo-Count: image_url, label, count, points (pixels; absent in the eval splits) -> a counting turn,
    answered by pointing when the points are there, else with the number alone."""
    path, w, h = _image_of(rec, media_root)
    label, n, pts = _text(rec, "label"), rec["count"], _points_xy(rec.get("points"))
    if not isinstance(n, int) or n < 0 or (pts and len(pts) != n):
        raise ValueError(f"count must be a non-negative int matching the points, got {n!r} with {len(pts)} points")
    ans = NONE_ANSWER if n == 0 else (COUNT_ANSWER.format(points=format_points(pts, w, h, label), n=n) if pts
                                      else str(n))
    return ("count", rec["image_url"]), dict(task="count", image=path,
                                             turns=[(COUNT_PROMPT.format(label=label), ans)])


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


def _molmo2_videopoint(rec, media_root, i):
    """Molmo2-VideoPoint: video_id, label, question, two_fps_timestamps, points (per timestamp, 0-100 scale) ->
    temporal pointing answered with one group per timestamp that has points ("t x y ..." on the 0-1000 scale)."""
    path = _video_of(rec, media_root)
    label, times, pts = _text(rec, "label"), rec["two_fps_timestamps"], rec["points"]
    if not isinstance(times, list) or not isinstance(pts, list) or len(times) != len(pts):
        raise ValueError(f"two_fps_timestamps and points must be lists of one length, got {len(times)} and {len(pts)}")
    groups = [(f"{t:.1f}", _points_xy(p)) for t, p in zip(times, pts)]
    groups = [g for g in groups if g[1]]
    ans = format_groups(groups, 100, 100, label) if groups else NONE_ANSWER  # 0-100 scale: "pixels" of 100 x 100
    q = rec.get("question") or POINT_PROMPT.format(label=label)
    return ("video_point", i), dict(task="video_point", video=path, turns=[(q, ans)])


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
    """Molmo2 tracking (molmo2-track-instruction): video, expression, width, height, frame_trajectories [{time,
    points [{id, point [x, y] in pixels, occluded}]}] -> a track: per frame time, the visible objects by id."""
    path = _video_of(rec, media_root, "video")
    expr, w, h = _text(rec, "expression"), rec["width"], rec["height"]
    if not (isinstance(w, (int, float)) and isinstance(h, (int, float)) and w > 0 and h > 0):
        raise ValueError(f"width and height must be positive numbers, got {w!r}, {h!r}")
    groups = []
    for fr in rec["frame_trajectories"]:
        pts = [(p["id"], *p["point"]) for p in fr["points"] if not p.get("occluded")]
        if pts:
            groups.append((f"{fr['time']:.1f}", pts))
    ans = format_groups(groups, w, h, expr, tag="tracks") if groups else NONE_ANSWER
    return ("track", i), dict(task="track", video=path, turns=[(TRACK_PROMPT.format(label=expr), ans)])


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
    return ("video_qa", i), dict(task="video_qa", video=path, turns=[(q, chr(65 + k))])


def _molmo2_multiqa(rec, media_root, i):
    """Molmo2-MultiImageQA: image_urls (up to 5), qa_pairs {question: [...], answer: [...]} -> one conversation
    over the images."""
    urls, qa = rec["image_urls"], rec["qa_pairs"]
    if not isinstance(urls, list) or not 2 <= len(urls) <= 5:
        raise ValueError(f"image_urls must list 2 to 5 images, got {str(urls)[:80]}")
    paths = [_image_of(dict(image_url=u), media_root)[0] for u in urls]
    qs, ans = qa["question"], qa["answer"]
    if not isinstance(qs, list) or len(qs) != len(ans) or not qs:
        raise ValueError("qa_pairs must hold questions and answers of one length")
    return ("multi_qa", i), dict(task="multi_qa", images=paths, turns=[(str(q), str(a)) for q, a in zip(qs, ans)])


# Every reader has one signature: reader(record, media_root, row number) -> (group key, example dict). Rows with the
# same key are one conversation (PixMo-Points: every label of one image; the row number for datasets without
# grouping), so an image is encoded once for all its questions. A reader raises MissingMedia (media not under
# media_root), Filtered (the dataset's own filter drops the row) or ValueError / KeyError / TypeError (a malformed
# row); read_dataset counts each kind and names the first of each. The keys are the names config files use in
# their mixtures and data_paths; the videopoint_* entries are Molmo2-VideoPoint split by count, as Molmo2 mixes it.
READERS = {"pixmo_cap": _pixmo_cap, "pixmo_points": _pixmo_points, "pixmo_count": _pixmo_count, "tulu": _tulu,
           "molmo2_cap": _molmo2_cap, "molmo2_videopoint": _molmo2_videopoint, "molmo2_track": _molmo2_track,
           "molmo2_subtitleqa": _molmo2_subtitleqa, "molmo2_multiqa": _molmo2_multiqa, "molmo2_capqa": _molmo2_capqa,
           "videopoint_0_5": _videopoint_bin(0, 5), "videopoint_6_25": _videopoint_bin(6, 25),
           "videopoint_26_60": _videopoint_bin(26, 60)}


# Where each dataset comes from: its Hugging Face repo, the split (and config folder) of its released parquet
# files, the columns its reader needs, and which columns hold media. prepare.py reads this table to download and
# convert the rows; read_dataset checks a local copy's columns against it. One entry per local copy: an entry's
# `reader` names its READERS entry when the copy is a split of another dataset (the eval splits).
@dataclass(frozen=True)
class Source:
    repo: str                        # Hugging Face dataset repo id, e.g. "allenai/pixmo-cap"
    split: str = "train"             # the released split whose parquet files are read
    subsets: tuple = ()              # config folders of a multi-config repo (all read, concatenated); () = none
    columns: tuple = ()              # columns the reader needs: a copy without one is a one-line error
    image_url: str = ""              # column of image URLs to download (a list of URLs for multi-image rows)
    image_sha: str = ""              # column with the SHA-256 of the image bytes, checked after download
    image_bytes: str = ""            # column of embedded images ({bytes, path}) written out as files
    video: str = ""                  # column naming the video id (<media_root>/<id>.mp4; never downloaded)
    reader: str = ""                 # READERS key when it differs from the entry's name


SOURCES = {
    "pixmo_cap": Source("allenai/pixmo-cap", columns=("image_url", "caption"), image_url="image_url"),
    "pixmo_points": Source("allenai/pixmo-points", columns=("image_url", "label", "points", "collection_method"),
                           image_url="image_url", image_sha="image_sha256"),
    "pixmo_count": Source("allenai/pixmo-count", columns=("image_url", "label", "count"),
                          image_url="image_url", image_sha="image_sha256"),
    "tulu": Source("allenai/tulu-3-sft-mixture", columns=("messages",)),
    "molmo2_cap": Source("allenai/Molmo2-Cap", columns=("video_id",), video="video_id"),
    "molmo2_capqa": Source("allenai/Molmo2-VideoCapQA", columns=("video_id", "Question", "Answer",
                                                                  "NegativeAnswers"), video="video_id"),
    "molmo2_subtitleqa": Source("allenai/Molmo2-VideoSubtitleQA", columns=("video_id", "Question", "Answer",
                                                                           "subtitle"), video="video_id"),
    "molmo2_multiqa": Source("allenai/Molmo2-MultiImageQA", columns=("image_urls", "qa_pairs"),
                             image_url="image_urls"),
    "molmo2_track": Source("allenai/molmo2-track-instruction", subsets=("track",),
                           columns=("video", "expression", "width", "height", "frame_trajectories"), video="video"),
}
_VIDEOPOINT = dict(columns=("video_id", "label", "count", "two_fps_timestamps", "points"), video="video_id")
SOURCES.update({name: Source("allenai/Molmo2-VideoPoint", reader=name, **_VIDEOPOINT)
                for name in ("molmo2_videopoint", "videopoint_0_5", "videopoint_6_25", "videopoint_26_60")})


def dataset_rows(name, path):
    """(row number, record) pairs of a dataset file: jsonl (1-based line numbers; a line that is not JSON gives
    its ValueError as the record, to be counted as malformed) or parquet, read with pyarrow when it is installed
    (optional, like flash-attn: never required)."""
    import json
    with open(path, "rb") as f:
        parquet = f.read(4) == b"PAR1"  # parquet's magic bytes
    if parquet:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"dataset {name}: {path} is parquet, which needs pyarrow (optional, not installed): "
                             f"pip install pyarrow, or convert it to jsonl once, e.g. with pandas: "
                             f"pd.read_parquet(path).to_json(out, orient='records', lines=True)") from None
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
    """Read a local jsonl or parquet copy of dataset `name` (READERS) -> (examples, counts). Rows grouped per
    image become one multi-turn example. Malformed rows and missing or unreadable media are skipped and counted,
    and one summary line per dataset is printed with the first problem of each kind (file:row)."""
    if name not in READERS:
        raise ValueError(f"no reader for dataset {name!r}; readers: {', '.join(sorted(READERS))}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"dataset {name}: file not found: {path}")
    # groups: key -> the example being built (its turns grow as rows of the same image come); counts: rows read and
    # rows skipped by kind; first: the first problem of each kind, as "file:row: why", for the summary line
    groups, counts, first = {}, Counter(), {}
    for i, rec in dataset_rows(name, path):
        try:
            if isinstance(rec, Exception):
                raise rec
            if not isinstance(rec, dict):
                raise ValueError("a row must be a JSON object")
            key, ex = READERS[name](rec, media_root, i)
        except MissingMedia as e:
            kind, why = "missing media", str(e)
        except Filtered as e:
            kind, why = "filtered", str(e)
        except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            kind, why = "malformed", f"{type(e).__name__}: {e}"
        else:
            counts["rows"] += 1
            if key in groups:
                groups[key]["turns"] += ex["turns"]
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

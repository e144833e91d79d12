"""A miniature of the released datasets the real configs train on: a few rows of each readers.SOURCES entry, in its
released schema, laid out as `huggingface-cli download REPO --repo-type dataset --local-dir ROOT/REPO` lays the
Hugging Face parquet files out (ROOT/allenai/pixmo-cap/data/train-00000-of-00001.parquet; a multi-config repo's
config folder in place of data/), written with pyarrow. Images are small JPEGs behind a real HTTP server on
127.0.0.1 (their URLs in the rows, their SHA-256 where the release has that column) or embedded bytes where the
release embeds them; videos are tiny mp4s written with PyAV into the media folder, named by their ids (videos are
never downloaded: users fetch them).

The table is driven by readers.SOURCES: an entry names its repo, split, config folders, columns and which
columns hold media, and ROW_MAKERS holds one function per reader kind that writes a row's other columns. So an
entry added later for a reader kind that is here (an eval split of PixMo-Count, say) needs nothing new; a new kind
needs one function. build() checks every row has the columns the entry lists."""
import hashlib
import http.server
import io
import os
import threading
from functools import partial

import numpy as np
from PIL import Image

import readers

ROWS = 6        # rows a dataset: enough for a few packed rows, a packer buffer, and each VideoPoint count bin
VIDEO_SIZE = 32  # video frames are VIDEO_SIZE x VIDEO_SIZE (libx264 wants even sizes), 6 frames at 2 fps


def serve(directory):
    """A threaded HTTP server on 127.0.0.1 (a free port) serving directory, in a daemon thread. Returns (server,
    base URL); server.shutdown() stops it."""
    handler = partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler without a log line per request."""

    def log_message(self, *args):
        pass


class Media:
    """Makes a row's media: images served over HTTP (files under served_dir, URLs under base_url) or embedded,
    videos written into video_dir. Every image and video differs (random colours from one generator), so a
    dataset's examples are not all alike."""

    def __init__(self, served_dir, base_url, video_dir, seed=0):
        self.served_dir, self.base_url, self.video_dir = str(served_dir), base_url, str(video_dir)
        self.rng = np.random.default_rng(seed)
        self.last = None  # the media columns of the last image made (rows that share an image reuse them)
        os.makedirs(self.served_dir, exist_ok=True)
        os.makedirs(self.video_dir, exist_ok=True)

    def picture(self, w=40, h=30):
        """A w x h RGB image: a random background and a random rectangle on it (a PIL image)."""
        a = np.empty((h, w, 3), np.uint8)
        a[:] = self.rng.integers(0, 256, 3)
        y, x = self.rng.integers(0, h // 2), self.rng.integers(0, w // 2)
        a[y:y + h // 2, x:x + w // 2] = self.rng.integers(0, 256, 3)
        return Image.fromarray(a)

    def jpeg(self, w=40, h=30):
        buf = io.BytesIO()
        self.picture(w, h).save(buf, "JPEG", quality=90)
        return buf.getvalue()

    def url(self, name):
        """A new JPEG served at <base_url>/<name>.jpg -> (url, SHA-256 of its bytes)."""
        data = self.jpeg()
        with open(os.path.join(self.served_dir, name + ".jpg"), "wb") as f:
            f.write(data)
        return f"{self.base_url}/{name}.jpg", hashlib.sha256(data).hexdigest()

    def embedded(self, name):
        """A new JPEG as the Hugging Face Image feature stores it in parquet: {bytes, path}."""
        return {"bytes": self.jpeg(), "path": name + ".jpg"}

    def video(self, vid, frames=6, fps=2):
        """<video_dir>/<vid>.mp4: frames of a square moving across a random background, at fps -> (width, height,
        frame times in s)."""
        import data
        s = VIDEO_SIZE
        bg, fg = self.rng.integers(0, 256, 3), self.rng.integers(0, 256, 3)
        pics = []
        for k in range(frames):
            a = np.empty((s, s, 3), np.uint8)
            a[:] = bg
            o = k * (s // 2) // max(1, frames - 1)
            a[o:o + s // 2, o:o + s // 2] = fg
            pics.append(a)
        data.write_video(os.path.join(self.video_dir, vid + ".mp4"), pics, fps=fps)
        return s, s, [k / fps for k in range(frames)]

    def image_columns(self, src, name):
        """The media columns of a one-image row of the entry src: its URL (and SHA-256) or its embedded bytes."""
        if src.image_bytes:
            return {src.image_bytes: self.embedded(name)}
        url, sha = self.url(name)
        return {src.image_url: url, **({src.image_sha: sha} if src.image_sha else {})}


# ---------------------------------------------------------------------------------------------------------
# One row maker per reader kind: (media, source entry, dataset name, row number) -> the row, every column as the
# release types it (strings, ints, floats, lists, structs). Coordinates are in the units the release uses: PixMo's
# points in pixels of the image (40 x 30 here), VideoPoint's on a 0-100 scale, tracks in video pixels.

WORDS = ["red", "round", "ball", "small", "square", "box", "near", "the", "left", "edge", "blue", "sky", "a", "cat"]


def sentence(i, n=6):
    return " ".join(WORDS[(i * 3 + k) % len(WORDS)] for k in range(n)).capitalize() + "."


def _pixmo_cap(m, src, name, i):
    return dict(**m.image_columns(src, f"{name}_{i}"), caption=sentence(i, 12), transcripts=[sentence(i + 1)])


def _pixmo_points(m, src, name, i):
    # two labels asked of each image (rows 2k and 2k+1 share image k: the reader groups them into one conversation);
    # one of every three rows is a counting row, one has no points ("There are none.")
    img = m.image_columns(src, f"{name}_{i // 2}") if i % 2 == 0 else m.last
    m.last = img
    pts = [dict(x=float(4 + 5 * k), y=float(3 + 4 * k)) for k in range(i % 4)]
    return dict(**img, label=WORDS[i % len(WORDS)], points=pts, count=len(pts),
                collection_method="counting" if i % 3 == 0 else "pointing")


def _pixmo_count(m, src, name, i):
    pts = [dict(x=float(3 + 6 * k), y=float(5 + 3 * k)) for k in range(i % 5)]
    return dict(**m.image_columns(src, f"{name}_{i}"), label=WORDS[i % len(WORDS)], count=len(pts), points=pts)


def _tulu(m, src, name, i):
    msgs = ([dict(role="system", content="Answer briefly.")] if i % 3 == 0 else []) + [
        dict(role="user", content=f"What is {i} plus {i}?"), dict(role="assistant", content=f"{2 * i}.")]
    if i % 2:
        msgs += [dict(role="user", content=sentence(i)), dict(role="assistant", content=sentence(i + 2))]
    return dict(id=f"tulu_{i}", messages=msgs, source="miniature")


def _video_id(m, src, name, i):
    vid = f"{name}_{i}"
    return vid, m.video(vid)


def _molmo2_cap(m, src, name, i):
    vid, _ = _video_id(m, src, name, i)
    return {src.video: vid, "annotation_score": 4 if i % 5 else 2,  # the reader keeps scores >= 3
            "video_caption": sentence(i), "merged_caption": sentence(i, 10),
            "video_frame_merged_caption": sentence(i, 14)}


def _molmo2_capqa(m, src, name, i):
    vid, _ = _video_id(m, src, name, i)
    return {src.video: vid, "Question": f"What moves in video {i}?", "Answer": "A square",
            "NegativeAnswers": ["A circle", "Nothing", "A cat"][: 1 + i % 3]}


def _molmo2_subtitleqa(m, src, name, i):
    vid, _ = _video_id(m, src, name, i)
    return {src.video: vid, "Question": "What does the speaker say?", "Answer": sentence(i, 3),
            "subtitle": [dict(start=0.0, end=1.0, text=sentence(i, 3)), dict(start=1.5, end=2.5, text="Thank you.")]}


def _molmo2_videopoint(m, src, name, i):
    # counts chosen to fill every count bin Molmo2 mixes (0-5, 6-25, 26-60): 0, 3, 8, 30, 2, 12, ...
    vid, (_, _, times) = _video_id(m, src, name, i)
    n = [0, 3, 8, 30, 2, 12][i % 6]
    per = [[dict(x=float(10 + (3 * k) % 80), y=float(20 + (7 * k) % 70)) for k in range(j, n, len(times))]
           for j in range(len(times))]
    return {src.video: vid, "label": WORDS[i % len(WORDS)], "count": n, "question": "",
            "two_fps_timestamps": times, "points": per, "annotator_unsure": False, "video_source": "generated"}


def _molmo2_track(m, src, name, i):
    vid, (w, h, times) = _video_id(m, src, name, i)
    traj = [dict(frame=k, time=t, points=[dict(id=j, point=[float(4 + 3 * k + j), float(6 + 2 * k)],
                                               occluded=bool(k == 1 and j == 1)) for j in range(1 + i % 2)])
            for k, t in enumerate(times)]
    return {src.video: vid, "id": f"track_{i}", "expression": f"the {WORDS[i % len(WORDS)]} square", "fps": 2,
            "sampling_fps": 2, "width": w, "height": h, "n_frames": len(times), "task": "track",
            "frame_trajectories": traj}


def _molmo2_multiqa(m, src, name, i):
    urls = [m.url(f"{name}_{i}_{k}")[0] for k in range(2 + i % 2)]
    return {src.image_url: urls, "qa_pairs": dict(question=["Which image is brighter?", "How many images?"],
                                                  answer=["The first.", str(len(urls))])}


def _academic_points(m, src, name, i):
    vid, (_, _, times) = _video_id(m, src, name, i)
    n = [2, 0, 5, 70][i % 4]  # 70: more than Molmo2's max_points=60, left out by the reader
    per = [[dict(x=float(5 + (11 * k) % 90), y=float(15 + (5 * k) % 80)) for k in range(j, n, len(times))]
           for j in range(len(times))]
    return {src.video: vid, "category": WORDS[i % len(WORDS)].capitalize(), "count": n, "timestamps": times,
            "points": per}


def _vqa_v2(m, src, name, i):
    ans = ["red", "red", "blue"] + ["red"] * 7  # VQA v2: ten annotators' answers
    return dict(**m.image_columns(src, f"{name}_{i // 2}"), question=f"What colour is box {i}?", question_id=i,
                image_id=i // 2, question_type="what color", answer_type="other", multiple_choice_answer="red",
                answers=[dict(answer=a, answer_confidence="yes", answer_id=k + 1) for k, a in enumerate(ans)])


def _docvqa(m, src, name, i):
    return dict(**m.image_columns(src, f"{name}_{i}"), questionId=str(i), question=f"What is the date on page {i}?",
                question_types=["form"], docId=i, ucsf_document_id=f"doc{i}", ucsf_document_page_no="1",
                answers=[f"{i} May", f"{i} may"], data_split=src.split)


def _textvqa(m, src, name, i):
    return dict(**m.image_columns(src, f"{name}_{i}"), image_id=str(i), question_id=i,
                question=f"What does sign {i} say?", question_tokens=["what", "does", "sign", "say"],
                image_width=40, image_height=30, answers=["stop"] * 8 + ["halt"] * 2, image_classes=["sign"],
                set_name=src.split, ocr_tokens=["stop"], flickr_original_url="", flickr_300k_url="")


def _chartqa(m, src, name, i):
    return dict(**m.image_columns(src, f"{name}_{i}"), query=f"What is the value of bar {i}?", label=[str(10 + i)],
                human_or_machine=i % 2)


def _cauldron(m, src, name, i):
    # The Cauldron: images, texts [{user, assistant, source}]. ai2d asks with lettered options; nlvr2 states a
    # sentence about two images, answered true or false
    if "nlvr2" in src.subsets:
        images = [m.embedded(f"{name}_{i}_{k}") for k in range(2)]
        texts = [dict(user=f"Question: The left image has more boxes than the right image. True or False?",
                      assistant="Answer: " + ("True" if i % 2 else "False"), source="nlvr2")]
    else:
        images = [m.embedded(f"{name}_{i}")]
        texts = [dict(user=f"Question: Which part is labelled {i}?\nChoices:\nA. Leaf\nB. Root\nC. Stem\n"
                           f"Answer with the letter.", assistant="Answer: " + "ABC"[i % 3], source="ai2d")]
    return {src.image_bytes: images, "texts": texts}


def rle(mask):
    """A boolean (h, w) mask as COCO's uncompressed RLE: {size: [h, w], counts: run lengths, column-major,
    starting with a run of False}."""
    flat, counts, cur, run = np.asarray(mask, bool).T.ravel(), [], False, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return dict(size=list(np.asarray(mask).shape), counts=counts)


def _pixmo_points_eval(m, src, name, i):
    # points on a 0-100 scale, and per object a boolean mask of the image's size (30 x 40) around it
    pts, masks = [], []
    for k in range(i % 3):
        x, y = 20 + 25 * k, 30 + 20 * k
        mk = np.zeros((30, 40), bool)
        cy, cx = int(y * 30 / 100), int(x * 40 / 100)
        mk[max(0, cy - 3):cy + 4, max(0, cx - 3):cx + 4] = True
        pts.append(dict(x=float(x), y=float(y)))
        masks.append(mk.tolist())
    return dict(**m.image_columns(src, f"{name}_{i}"), label=WORDS[i % len(WORDS)], points=pts, masks=masks)


def _videopoint_eval(m, src, name, i):
    # one point (pixels) per annotated time, and per point its mask at that frame (frame_id at 2 fps)
    vid, (w, h, times) = _video_id(m, src, name, i)
    ts = times[: i % 3]
    pts, masks = [], []
    for k, t in enumerate(ts):
        x, y = 8 + 6 * k, 10 + 4 * k
        mk = np.zeros((h, w), bool)
        mk[max(0, y - 3):y + 4, max(0, x - 3):x + 4] = True
        pts.append(dict(x=float(x), y=float(y)))
        masks.append([dict(frame_id=int(round(t * 2)), rle=rle(mk))])
    return {src.video: vid, "label": WORDS[i % len(WORDS)], "width": w, "height": h, "two_fps_timestamps": ts,
            "points": pts, "masks": masks}


def _videocount_eval(m, src, name, i):
    vid, _ = _video_id(m, src, name, i)
    return {src.video: vid, "label": WORDS[i % len(WORDS)], "count": i % 4,
            "question": f"How many {WORDS[i % len(WORDS)]} are there?"}


def _videotrack_eval(m, src, name, i):
    # objects in mask_id's order; per object its point in every frame of the clip (null where it is not seen)
    vid, (w, h, times) = _video_id(m, src, name, i)
    objs = [f"obj{i}_{j}" for j in range(1 + i % 2)]
    points = [dict(object_id=o, points=[None if (f == 2 and j == 1) else [float(4 + 3 * f + j), float(6 + 2 * f)]
                                        for f in range(len(times))]) for j, o in enumerate(objs)]
    return {src.video: vid, "exp": f"the {WORDS[i % len(WORDS)]} square", "w": w, "h": h, "fps": 2,
            "mask_id": objs, "points": points}


ROW_MAKERS = {"pixmo_cap": _pixmo_cap, "pixmo_points": _pixmo_points, "pixmo_count": _pixmo_count, "tulu": _tulu,
              "molmo2_cap": _molmo2_cap, "molmo2_capqa": _molmo2_capqa, "molmo2_subtitleqa": _molmo2_subtitleqa,
              "molmo2_videopoint": _molmo2_videopoint, "videopoint_0_5": _molmo2_videopoint,
              "videopoint_6_25": _molmo2_videopoint, "videopoint_26_60": _molmo2_videopoint,
              "molmo2_track": _molmo2_track, "molmo2_multiqa": _molmo2_multiqa, "academic_points": _academic_points,
              "vqa_v2": _vqa_v2, "docvqa": _docvqa, "textvqa": _textvqa, "chartqa": _chartqa, "ai2d": _cauldron,
              "nlvr2": _cauldron, "pixmo_points_eval": _pixmo_points_eval, "videopoint_eval": _videopoint_eval,
              "videocount_eval": _videocount_eval, "videotrack_eval": _videotrack_eval}


def parquet_path(root, src, subset=None):
    """Where the release's first parquet file of src's split lies under root (one shard: -00000-of-00001)."""
    return os.path.join(str(root), src.repo, subset or "data", f"{src.split}-00000-of-00001.parquet")


def build(root, names, media, rows=ROWS):
    """Write the miniature of each dataset in names (readers.SOURCES keys) under root -> {name: [parquet paths]}.
    Entries that share a release file (VideoPoint's count bins) share one file, written once."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out, written = {}, set()
    for name in names:  # (a multi-config release gets its rows spread over its config folders, row numbers running on)
        if name not in readers.SOURCES:
            raise KeyError(f"dataset {name!r} has no readers.SOURCES entry")
        src = readers.SOURCES[name]
        kind = src.reader or name
        if kind not in ROW_MAKERS:
            raise KeyError(f"no row maker for reader kind {kind!r} (dataset {name}): add one to tests/miniature.py")
        out[name], subsets = [], src.subsets or (None,)
        per = -(-rows // len(subsets))
        for s, subset in enumerate(subsets):
            path = parquet_path(root, src, subset)
            out[name].append(path)
            if path in written:
                continue
            stem = f"{src.repo.split('/')[-1]}_{subset or ''}_{src.split}".replace(" ", "_")
            table = [ROW_MAKERS[kind](media, src, stem, i) for i in range(s * per, (s + 1) * per)]
            want = set(src.columns) | {c for c in (src.image_url, src.image_sha, src.image_bytes, src.video) if c}
            missing = want - set(table[0])
            if missing:
                raise KeyError(f"row maker for {kind} lacks the columns {sorted(missing)} that SOURCES[{name!r}] names")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            pq.write_table(pa.Table.from_pylist(table), path)
            written.add(path)
    return out

"""
Prepare the data: the released Hugging Face datasets -> the local copies a run reads (readers.py), and a check of them.

    python prepare.py --stage 1 --out data           every dataset config/stage1.py mixes (and its eval_data, if any)
    python prepare.py pixmo_cap tulu --out data      the named ones (keys of readers.SOURCES)
    python prepare.py pixmo_cap --max_rows 1000      the first 1,000 rows of each: a quick look before the long run
    python prepare.py --stage 2 --hub_dir /hub       rows from a local mirror of the Hub instead of the Hub itself
    python prepare.py --verify --out data            check every copy in data/ as a run reads it; exit 1 if broken

readers.SOURCES says, per local copy, where it comes from: the Hugging Face repo, the split, the columns its reader
needs and which columns hold media (image URLs, their SHA-256, embedded image bytes, video ids). What a run writes
for a dataset `name` (the paths config/stage*.py read with --out data):

    <out>/<name>.jsonl                one JSON object a row: every released column as it is (the embedded image bytes
                                      excepted), plus the image sizes below. Written to a temp file, then renamed.
    <out>/media/                      images at readers.media_path(media_root, url) (--media_root moves it)
    <out>/<name>.failed.tsv           one line per image that could not be had: url TAB reason TAB detail
    <out>/<name>.missing_videos.txt   the video ids not under media_root (videos are never downloaded)

Conventions the readers rely on:
  - a row whose image is there carries image_width and image_height (ints, from the file), so a run's start opens
    no image header; a row with a list of image URLs (Molmo2-MultiImageQA) carries image_sizes = [[w, h], ...].
  - embedded images (Source.image_bytes: a column of {bytes, path}, as Hugging Face parquet stores an Image feature,
    or a list of them) are written out as files; the row loses that column and gets, in the column Source.image_url
    names (default image_url), the pseudo-URL hf://<repo>/<sha256 of the bytes><.jpg/.png/... from the image's
    format> (or a list of them), so the file is at media_path(media_root, url) like any downloaded image.
  - a row whose image (any of its images) failed is left out of the copy, as Molmo2 drops the rows of failed URLs,
    and the URL is listed in failed.tsv; the summary counts failures by reason.
  - videos are <media_root>/<video id>.mp4 (readers.video_path). They come from the source datasets (YouTube and
    the academic video sets Molmo2's annotations point to), which the user fetches and cuts; missing_videos.txt
    lists the ids still to get.

Where the rows come from: with --hub_dir ROOT, the parquet files `huggingface-cli download REPO --repo-type dataset
--local-dir ROOT/REPO` leaves (ROOT/allenai/pixmo-cap/data/train-00000-of-00003.parquet; a subset's files under
ROOT/REPO/<subset>/); without it, huggingface_hub.snapshot_download fetches only the split's parquet files into its
cache (resumable; a second run reuses them). A split's files are those with the split's name as a word of their
path. A released file that lacks a column of Source.columns is a one-line error naming the file and the columns.

Images by URL (after Molmo2's scripts/download_datasets.py and olmo/data/dataset_builders/download_urls.py): a pool
of --workers threads; each URL fetched once however many rows share it; --tries tries with exponential backoff
(--backoff seconds, doubled each time) on timeouts, dropped connections, HTTP 408, 429 and 5xx, never on another
4xx; bodies over --max_bytes refused; --timeout seconds for each socket wait (10x that for a whole file). Bytes go
to <file>.<pid>.part in the media folder and are checked (their SHA-256 against the row's where it gives one, as
PixMo-Points and PixMo-Count do, else the image must decode with Pillow), fsync'd, then renamed: no file is ever
under its final name before it is whole and checked. A second run fetches only what is missing: a file under its
final name counts as present, and the URLs failed.tsv lists with a lasting reason (a 4xx, wrong bytes) are not
asked again unless --retry_failed; timeouts, 429s, 5xxs and dropped connections are. A run killed with kill -9
leaves only .part files, removed by the next run (those of processes that are no longer alive).

--verify checks each copy as a run reads it: its rows through readers.read_dataset (none malformed), every image
present and decodable at the size its row records, every video present and decodable by PyAV at the frame times a
run samples (data.load_video at --max_frames, 2 fps; its duration from data.video_index), and every image point
inside its image. It names each broken file and exits 1 if anything is broken. PixMo-Points: its dataset card gives
the points in pixels, while Molmo2's loader (olmo/data/pixmo_datasets.py) reads them with point_scale=100; the
readers take pixels. Points on a 0-100 scale read as pixels would still lie inside any image larger than 100 px,
so --verify also reports how many rows have every point in the top-left 100x100 corner of a larger image (near
all of them would mean a 0-100 scale); points in pixels read as 0-100 would fall outside, and are flagged.
"""
import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import os
import random
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from http.client import HTTPException
from urllib.parse import urlparse

import pyarrow.parquet as pq
from huggingface_hub import snapshot_download
from PIL import Image
from tqdm import tqdm

import readers
from data import MediaError, load_video, video_index

# -----------------------------------------------------------------------------------------------------------------
# Defaults, each a command-line flag of the same name in lower case
OUT = "data"             # config/stage*.py read data/<name>.jsonl and media_root data/media
WORKERS = 16             # downloads in flight: a fetch waits on the network (~0.1-1 s), not on a core
TIMEOUT = 60.0           # seconds a socket may wait (Molmo2's httpx timeout); a whole file gets 10x this
TRIES = 3                # Molmo2 tries a URL 3 times
BACKOFF = 2.0            # seconds before the second try, doubled for each later one (Molmo2 waits 2 s, then 4 s)
MAX_BYTES = 64 << 20     # a larger body is refused: PixMo's images are a few MB
MAX_FRAMES = 128         # --verify decodes the frames train.py's default max_frames samples (a --stage config's own)
VIDEO_FPS = 2.0          # --verify: Molmo2's 2 frames a second (train.py video_fps)
BATCH_ROWS = 4096        # parquet rows decoded at a time: memory stays flat on PixMo-Points' 2.3M rows
CHUNK = 1 << 16          # bytes read from a socket at a time
USER_AGENT = "nanoMolmo2-prepare/1.0 (+https://huggingface.co/allenai)"  # some image hosts refuse urllib's default
# the file extension of an embedded image, by the format Pillow reads in its header (others: the format's name)
IMAGE_EXT = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif"}
ADDED = ("image_width", "image_height", "image_sizes")  # columns prepare.py adds to a row


@dataclass(frozen=True)
class Net:
    """How one URL is fetched: seconds a socket may wait, tries, the first backoff (s), the largest body."""
    timeout: float = TIMEOUT
    tries: int = TRIES
    backoff: float = BACKOFF
    max_bytes: int = MAX_BYTES


class Failed(Exception):
    """An image that could not be had: reason (a short category, counted in the summary: 'http 404', 'timeout',
    'connection', 'truncated', 'too large', 'sha256 mismatch', 'not an image', 'bad url'), detail (for failed.tsv),
    retry (whether another try may succeed) and wait (seconds a 429's Retry-After asks for)."""

    def __init__(self, reason, detail="", retry=False, wait=0.0):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.retry, self.wait = reason, detail, retry, wait


def lasting(reason):
    """A failure a second run does not retry (unless --retry_failed): the server said the file is not there (4xx but
    408 and 429) or the bytes were wrong. Timeouts, 408, 429, 5xx and dropped connections are asked again."""
    if reason.startswith("http "):
        code = int(reason.split()[1])
        return 400 <= code < 500 and code not in (408, 429)
    return reason in ("sha256 mismatch", "not an image", "too large", "bad url")


# -----------------------------------------------------------------------------------------------------------------
# One image: fetched, checked, written under its final name only when whole

def _image_size(path_or_file, decode):
    """(width, height) of an image; decode=True decodes every pixel (a truncated or corrupt body fails), else the
    header only. Anything Pillow cannot read is Failed('not an image')."""
    try:
        with Image.open(path_or_file) as im:
            if decode:
                im.load()
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise Failed("too large", str(e)) from None
    except Exception as e:  # Pillow raises many kinds for bad bytes: UnidentifiedImageError, OSError, SyntaxError...
        raise Failed("not an image", f"{type(e).__name__}: {e}") from None
    if not w or not h:
        raise Failed("not an image", f"zero-sized image {w}x{h}")
    return w, h


def _part(dest):
    """The temp file a process writes dest through: in dest's folder (so the rename is atomic), named by the pid
    (so two runs never share one, and a run can tell a dead run's leftovers from a live one's)."""
    return f"{dest}.{os.getpid()}.part"


def _remove(path):
    """Remove a file if it is there (a temp file already renamed is not)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_atomic(dest, data):
    """Write bytes to dest through a temp file: written, fsync'd, renamed; no partial file under dest ever."""
    tmp = _part(dest)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        _remove(tmp)


def _retry_after(headers):
    """Seconds a 429's Retry-After header asks for (0 if absent or a date), at most 60."""
    v = (headers or {}).get("Retry-After", "") or ""
    return min(float(v), 60.0) if v.strip().isdigit() else 0.0


def _download(url, dest, sha, net):
    """One try: the URL's body -> dest, checked -> (width, height, bytes). Raises Failed.
    The body streams to the temp file (memory stays flat with 16 workers), hashed as it comes; only after the
    length, the SHA-256 or the decode check and an fsync is it renamed to dest. Any exit before that (a
    failure, Ctrl-C) removes the temp file; kill -9 leaves it, for the next run's remove_stale_parts."""
    tmp = _part(dest)
    t0 = time.monotonic()
    try:
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(req, timeout=net.timeout) as r, open(tmp, "wb") as f:
            length = r.headers.get("Content-Length", "")
            length = int(length) if length.strip().isdigit() else None
            if length is not None and length > net.max_bytes:
                raise Failed("too large", f"Content-Length {length:,} > max_bytes {net.max_bytes:,}")
            digest, n = hashlib.sha256(), 0
            while chunk := r.read(CHUNK):
                n += len(chunk)
                if n > net.max_bytes:
                    raise Failed("too large", f"body over max_bytes {net.max_bytes:,}")
                if time.monotonic() - t0 > 10 * net.timeout:
                    raise Failed("timeout", f"not done after {10 * net.timeout:g} s ({n:,} bytes)", retry=True)
                digest.update(chunk)
                f.write(chunk)
            # http.client returns what came when the server closes early: the length check is ours to make
            if length is not None and n < length:
                raise Failed("truncated", f"{n:,} of {length:,} bytes", retry=True)
            f.flush()
            os.fsync(f.fileno())
        if sha and digest.hexdigest() != sha.lower():
            raise Failed("sha256 mismatch", f"{digest.hexdigest()} != {sha} (the row's)")
        w, h = _image_size(tmp, decode=not sha)  # a matching SHA-256 already proves the bytes are the released ones
        os.replace(tmp, dest)
        return w, h, n
    except urllib.error.HTTPError as e:  # before URLError, its base class
        raise Failed(f"http {e.code}", str(e.reason), retry=e.code in (408, 429) or e.code >= 500,
                     wait=_retry_after(e.headers) if e.code == 429 else 0.0) from None
    except urllib.error.URLError as e:
        timed_out = isinstance(e.reason, (TimeoutError, socket.timeout))
        raise Failed("timeout" if timed_out else "connection", str(e.reason), retry=True) from None
    except TimeoutError as e:  # socket.timeout is TimeoutError: a read that waited longer than net.timeout
        raise Failed("timeout", str(e) or f"no data for {net.timeout:g} s", retry=True) from None
    except (ConnectionError, HTTPException, ssl.SSLError) as e:  # reset, dropped mid-body, a broken status line
        raise Failed("connection", f"{type(e).__name__}: {e}", retry=True) from None
    finally:
        _remove(tmp)  # gone after a rename; otherwise the partial body is dropped


def fetch(url, dest, sha=None, net=Net()):
    """An image URL -> dest, checked: returns (status, width, height, bytes fetched), status 'fetched' or 'present'
    (dest was already there: its header is read, nothing is fetched). Raises Failed after net.tries tries."""
    if os.path.exists(dest):
        try:
            return ("present", *_image_size(dest, decode=False), 0)
        except Failed:
            _remove(dest)  # damaged after it was written (a file is checked before its rename): fetched again
    if urlparse(url).scheme not in ("http", "https"):
        raise Failed("bad url", f"not http(s): {url[:200]}")
    # tries 1..n: waits of backoff, 2 x backoff, ... between them (a 429's Retry-After when it asks for longer)
    for attempt in range(net.tries):
        try:
            return ("fetched", *_download(url, dest, sha, net))
        except Failed as e:
            if not e.retry or attempt == net.tries - 1:
                raise
            time.sleep(max(net.backoff * 2 ** attempt, e.wait))


def fetch_all(jobs, media_root, net=Net(), workers=WORKERS, progress=True, desc="images"):
    """{url: sha256 or None} -> (sizes {url: (w, h)}, failed {url: (reason, detail)}, counts) through a pool of
    worker threads, at most 4 jobs a worker queued at once (memory stays flat over a million URLs)."""
    sizes, failed, counts = {}, {}, Counter()
    items = sorted(jobs.items())
    random.Random(0).shuffle(items)  # a fixed shuffle, as Molmo2's: hosts spread over time, the same order each run
    bar = tqdm(total=len(items), unit="img", desc=desc, disable=not progress, dynamic_ncols=True)
    pool = cf.ThreadPoolExecutor(max(1, workers))
    # pending: {future: url}, topped up to 4 a worker after every round; each round takes whatever finished first,
    # so one slow host never holds the others back
    pending, todo = {}, iter(items)
    try:
        while True:
            for url, sha in todo:
                pending[pool.submit(fetch, url, readers.media_path(media_root, url), sha, net)] = url
                if len(pending) >= 4 * max(1, workers):
                    break
            if not pending:
                break
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                url = pending.pop(fut)
                try:
                    status, w, h, n = fut.result()  # an error that is not Failed (a full disk) stops the run
                except Failed as e:
                    failed[url] = (e.reason, e.detail)
                    counts["failed"] += 1
                else:
                    sizes[url] = (w, h)
                    counts[status] += 1
                    counts["bytes"] += n
                bar.update()
            bar.set_postfix(failed=counts["failed"], refresh=False)
    except BaseException:  # Ctrl-C or a disk error: queued jobs are dropped, in-flight ones remove their temp files
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown()
    return sizes, failed, counts


def remove_stale_parts(folder, log=print):
    """Remove the .part files that killed runs left in a folder (those whose pid is not a live process here); a
    live run's own are left alone. Returns how many were removed."""
    n = 0
    if not os.path.isdir(folder):
        return 0
    with os.scandir(folder) as it:
        for e in it:
            m = re.fullmatch(r".+\.(\d+)\.part", e.name)
            if m and not _alive(int(m.group(1))):
                _remove(e.path)
                n += 1
    if n:
        log(f"removed {n:,} partial files that a killed run left in {folder}")
    return n


def _alive(pid):
    """Whether a process of this pid is running on this machine (signal 0 tests for it without sending one). A
    .part file on a shared disk written by another machine's live run would look dead here: run one prepare.py
    per media folder at a time."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# -----------------------------------------------------------------------------------------------------------------
# Released parquet files -> rows

def released_files(name, src, hub_dir=None):
    """The parquet files of src's split, in name order: under hub_dir/<repo> (a huggingface-cli download mirror), or
    fetched by huggingface_hub.snapshot_download (only the split's files; cached, resumable)."""
    subsets = src.subsets or ("",)
    if hub_dir:
        root = os.path.join(hub_dir, src.repo)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset {name}: {root} not found (make it with `huggingface-cli download "
                                    f"{src.repo} --repo-type dataset --local-dir {root}`)")
    else:
        # fnmatch's * crosses folders: data/train-00000-of-00003.parquet matches *train*.parquet
        patterns = [f"{s}/*{src.split}*.parquet" if s else f"*{src.split}*.parquet" for s in subsets]
        try:
            root = snapshot_download(src.repo, repo_type="dataset", allow_patterns=patterns)
        except Exception as e:  # huggingface_hub's own errors (offline, no such repo, gated): one line, named
            raise RuntimeError(f"dataset {name}: cannot fetch {src.repo} from the Hugging Face Hub: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    files = []
    for s in subsets:
        top = os.path.join(root, s) if s else root
        found = split_files(top, src.split)
        if not found:
            raise FileNotFoundError(f"dataset {name}: no parquet file of split {src.split!r} under {top}")
        files += found
    return files


def split_files(top, split):
    """Parquet files under top whose path has the split's name as a word: train-00000-of-00003.parquet,
    train/0000.parquet (folders starting with '.', huggingface-cli's .cache, are skipped)."""
    out = []
    for d, dirs, names in os.walk(top):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        for f in names:
            if f.endswith(".parquet"):
                rel = os.path.relpath(os.path.join(d, f), top)[:-len(".parquet")]
                if split in re.split(r"[-./\\]", rel):
                    out.append(os.path.join(d, f))
    return sorted(out)


def _url_column(src):
    """The column of a copy's image URLs: Source.image_url, or image_url for the pseudo-URLs of embedded images."""
    return src.image_url or ("image_url" if src.image_bytes else "")


def check_columns(name, src, files):
    """Every column the reader and the media need must be in every released file: else a one-line error naming the
    file and the columns missing."""
    # the reader's columns and the media columns, less those prepare.py adds (the sizes; for embedded images, the
    # URL column that replaces the bytes): a Source may list image_url among its reader's columns either way
    media = [src.image_sha, src.image_bytes, src.video] + ([] if src.image_bytes else [src.image_url])
    added = set(ADDED) | ({_url_column(src)} if src.image_bytes else set())
    need = [c for c in dict.fromkeys([*src.columns, *media]) if c and c not in added]
    for f in files:
        have = set(pq.read_schema(f).names)
        missing = [c for c in need if c not in have]
        if missing:
            raise ValueError(f"dataset {name}: {f} lacks column(s) {', '.join(missing)} (readers.SOURCES[{name!r}] "
                             f"needs them; the file has {', '.join(sorted(have))})")


def released_rows(files, columns=None, max_rows=None):
    """The rows of the files in order, as dicts (pyarrow's Python values), the first max_rows of them."""
    n = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                if max_rows is not None and n >= max_rows:
                    return
                n += 1
                yield row


def _json_value(v):
    """JSON for the parquet values json cannot write itself (dates, decimals); anything else is an error."""
    if isinstance(v, (datetime, date)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    raise TypeError(f"a {type(v).__name__} value cannot go to JSON")


class _Drop(Exception):
    """A row left out of the copy; the reason is counted in the summary."""


# -----------------------------------------------------------------------------------------------------------------
# One dataset

def _embedded(row, src, media_root, seen, failed, counts):
    """Write a row's embedded image(s) out as files named by pseudo-URL: the bytes column is replaced by the URL
    column (a list for a list of images) and the sizes. seen: {sha256 of bytes: (url, w, h)}, an image met before."""
    v = row.pop(src.image_bytes)
    items = v if isinstance(v, list) else [v]
    urls, sizes = [], []
    for it in items:
        data = it.get("bytes") if isinstance(it, dict) else it
        if not isinstance(data, bytes) or not data:
            raise _Drop("no image bytes")
        digest = hashlib.sha256(data).hexdigest()
        if digest not in seen:
            try:
                with Image.open(io.BytesIO(data)) as im:  # the header: the format names the file's extension
                    fmt = im.format
                url = f"hf://{src.repo}/{digest}{IMAGE_EXT.get(fmt, '.' + (fmt or 'img').lower())}"
                dest = readers.media_path(media_root, url)
                present = os.path.exists(dest)
                seen[digest] = (url, *_image_size(dest if present else io.BytesIO(data), decode=not present))
            except Exception as e:  # Failed, or Pillow's many kinds for bytes that are not an image
                reason, detail = (e.reason, e.detail) if isinstance(e, Failed) else ("not an image", repr(e))
                failed[f"hf://{src.repo}/{digest}"] = (reason, detail)
                seen[digest] = None
                counts["failed"] += 1
            else:
                if present:
                    counts["present"] += 1
                else:  # checked above, then written; a disk error here stops the run
                    write_atomic(dest, data)
                    counts["fetched"] += 1
                    counts["bytes"] += len(data)
        if seen[digest] is None:
            raise _Drop("image failed")
        url, w, h = seen[digest]
        urls.append(url)
        sizes.append([w, h])
    _set_sizes(row, _url_column(src), urls if isinstance(v, list) else urls[0], sizes)


def _set_sizes(row, col, value, sizes):
    """The URL column and the sizes on a row: image_width/height for one image, image_sizes for a list."""
    row[col] = value
    if isinstance(value, list):
        row["image_sizes"] = sizes
    else:
        row["image_width"], row["image_height"] = sizes[0]


def _known_failures(path):
    """{url: (reason, detail)} of failed.tsv's lasting failures (not asked again without --retry_failed)."""
    out = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 2 and lasting(parts[1]):
                    out[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return out


def _fmt_counts(c):
    """'http 404: 12, timeout: 3': counts by reason, the largest first."""
    return ", ".join(f"{k}: {v:,}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def prepare(name, out=OUT, media_root=None, hub_dir=None, max_rows=None, workers=WORKERS, net=Net(),
            retry_failed=False, progress=True, log=print):
    """Make the local copy of dataset `name` (readers.SOURCES): rows to <out>/<name>.jsonl, images to media_root,
    failed.tsv and missing_videos.txt beside it; prints one summary line and returns its counts."""
    src = readers.SOURCES[name]
    media_root = media_root or os.path.join(out, "media")
    t0 = time.time()
    files = released_files(name, src, hub_dir)
    check_columns(name, src, files)
    os.makedirs(media_root, exist_ok=True)
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    total = total if max_rows is None else min(total, max_rows)
    jsonl = os.path.join(out, f"{name}.jsonl")
    failed_tsv = os.path.join(out, f"{name}.failed.tsv")

    # 1. image URLs: read the URL (and SHA-256) columns alone, fetch each distinct URL once. jobs: {url: the
    # SHA-256 its first row gives, or None}; a URL failed.tsv lists with a lasting reason is not asked again.
    # sizes: {url: (w, h)} of the images there; failed: {url: (reason, detail)}
    sizes, failed, counts = {}, {}, Counter()
    url_col = "" if src.image_bytes else src.image_url
    if url_col:
        jobs = {}
        cols = [url_col] + ([src.image_sha] if src.image_sha else [])
        for row in tqdm(released_rows(files, cols, max_rows), total=total, unit="row", desc=f"{name} urls",
                        disable=not progress, dynamic_ncols=True):
            v = row[url_col]
            for u in (v if isinstance(v, list) else [v]):
                if isinstance(u, str) and u and u not in jobs:
                    jobs[u] = None if isinstance(v, list) or not src.image_sha else row[src.image_sha]
        known = {} if retry_failed else _known_failures(failed_tsv)
        for u in [u for u in jobs if u in known and not os.path.exists(readers.media_path(media_root, u))]:
            failed[u] = known.pop(u)
            del jobs[u]
            counts["known"] += 1
        sizes, new_failed, c = fetch_all(jobs, media_root, net, workers, progress, desc=f"{name} images")
        failed.update(new_failed)
        counts.update(c)

    # 2. rows: every column, the sizes added, rows whose image failed left out; written to a temp file, renamed.
    # Embedded images are written out here, row by row (seen: the images met so far, by the SHA-256 of their
    # bytes); videos: the distinct ids, in order, for missing_videos.txt
    os.makedirs(out, exist_ok=True)
    tmp, left, videos, seen, written = _part(jsonl), Counter(), {}, {}, 0
    try:
        with open(tmp, "w", encoding="utf-8") as fo:
            rows = tqdm(released_rows(files, None, max_rows), total=total, unit="row", desc=f"{name} rows",
                        disable=not progress, dynamic_ncols=True)
            for i, row in enumerate(rows, 1):
                try:
                    if src.image_bytes:
                        _embedded(row, src, media_root, seen, failed, counts)
                    elif url_col:
                        v = row[url_col]
                        urls = v if isinstance(v, list) else [v]
                        if not urls or not all(isinstance(u, str) and u for u in urls):
                            raise _Drop("no image url")
                        if any(u not in sizes for u in urls):
                            raise _Drop("image failed")
                        _set_sizes(row, url_col, v, [list(sizes[u]) for u in urls])
                except _Drop as e:
                    left[str(e)] += 1
                    continue
                if src.video and isinstance(row.get(src.video), str) and row[src.video]:
                    videos.setdefault(row[src.video], None)
                try:
                    fo.write(json.dumps(row, ensure_ascii=False, default=_json_value) + "\n")
                except TypeError as e:
                    raise ValueError(f"dataset {name}: row {i} of {', '.join(files)}: {e}") from None
                written += 1
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, jsonl)
    finally:
        _remove(tmp)

    # 3. the lists beside the copy, and the summary line. failed.tsv holds every URL of these rows that failed,
    # this run or (a lasting reason) an earlier one; detail's tabs and newlines become spaces
    reasons = Counter(r for r, _ in failed.values())
    if url_col or src.image_bytes:  # written even when empty: no line means no failure, not a missing file
        lines = "".join(f"{u}\t{r}\t{' '.join(d.split())}\n" for u, (r, d) in sorted(failed.items()))
        write_atomic(failed_tsv, lines.encode())
    msg = (f"{name}: {written:,} rows -> {jsonl}" + (f" ({sum(left.values()):,} left out: {_fmt_counts(left)})"
                                                       if left else ""))
    if url_col or src.image_bytes:
        msg += (f"; images: {counts['fetched']:,} fetched, {counts['present']:,} already present, "
                f"{len(failed):,} failed" + (f" ({_fmt_counts(reasons)}) -> {failed_tsv}" if failed else "")
                + (f", {counts['known']:,} of them not asked again (gone the last time; --retry_failed asks)"
                   if counts["known"] else "")
                + f"; {counts['bytes'] / 1e6:,.1f} MB")
    # videos: listed, never fetched (Molmo2's own are cut from source datasets and YouTube by per-source code)
    missing = []
    if src.video:
        missing = [v for v in videos if not os.path.exists(readers.video_path(media_root, v))]
        path = os.path.join(out, f"{name}.missing_videos.txt")
        write_atomic(path, "".join(v + "\n" for v in missing).encode())
        msg += (f"; videos: {len(videos) - len(missing):,} of {len(videos):,} under {media_root}"
                + (f", {len(missing):,} missing -> {path} (videos are not downloaded: fetch them from their source "
                   f"datasets / YouTube as <video id>.mp4)" if missing else ""))
    log(msg + f"; {timedelta(seconds=round(time.time() - t0))}")
    return dict(rows=written, left_out=dict(left), fetched=counts["fetched"], present=counts["present"],
                failed=dict(reasons), bytes=counts["bytes"], videos=len(videos), missing_videos=len(missing))


# -----------------------------------------------------------------------------------------------------------------
# --verify: each copy as a run reads it

@lru_cache(maxsize=65536)  # PixMo-Points has many rows per image: each header read once
def _header_size(path):
    """(width, height) from an image's header, or None if it cannot be read (the image check names the file)."""
    try:
        return _image_size(path, decode=False)
    except Failed:
        return None


def _check_image(path, want):
    """None if the image is there, decodes and has the size its row records (want, or None), else why not."""
    if not os.path.exists(path):
        return "missing"
    try:
        w, h = _image_size(path, decode=True)
    except Failed as e:
        return str(e)
    if want and (w, h) != tuple(want):
        return f"is {w}x{h}, its row says {want[0]}x{want[1]}"
    return None


def _check_video(path, max_frames, fps):
    """(duration in s, None) if the video decodes at a run's frame times, else (None, why not)."""
    try:
        duration = video_index(path)[2]
        frames, _ = load_video(path, max_frames, fps)
    except FileNotFoundError:
        return None, "missing"
    except MediaError as e:
        return None, str(e)
    except Exception as e:  # PyAV errors that data.py does not wrap
        return None, f"{type(e).__name__}: {e}"
    if duration <= 0 or not frames:
        return None, f"no frames (duration {duration:.3f} s)"
    return duration, None


def _points(v):
    """[(x, y)] of a points cell ([{x, y}, ...]); None if it is not that shape (the reader counts it malformed)."""
    if not isinstance(v, list) or not all(isinstance(p, dict) and isinstance(p.get("x"), (int, float))
                                          and isinstance(p.get("y"), (int, float)) for p in v):
        return None
    return [(p["x"], p["y"]) for p in v]


def verify_dataset(name, out=OUT, media_root=None, workers=WORKERS, max_frames=MAX_FRAMES, fps=VIDEO_FPS,
                   progress=True, log=print):
    """Check one local copy (module docstring, --verify) -> the list of problems, each 'file: why'."""
    src = readers.SOURCES[name]
    media_root = media_root or os.path.join(out, "media")
    path = os.path.join(out, f"{name}.jsonl")
    if not os.path.exists(path):
        return [f"{path}: not found (python prepare.py {name} --out {out})"]
    # 1. the rows exactly as a run reads them: a copy with malformed rows (or none readable) is broken. Missing
    # media is not counted here: the checks below name each missing file.
    problems, lines = [], []
    try:
        _, counts = readers.read_dataset(src.reader or name, path, media_root, log=lines.append)
        if counts["malformed"]:
            problems.append(f"{path}: {counts['malformed']:,} malformed rows ({lines[-1]})")
    except (ValueError, FileNotFoundError) as e:
        problems.append(f"{path}: {e}")
    # 2. every image and video once, with the size its rows record; the points of single-image rows against their
    # image's size (the recorded one, else the header's). corner: rows whose points all lie in the top-left
    # 100 x 100 of an image larger than 200 px, the sign of a 0-100 scale read as pixels
    col, images, videos, rows = _url_column(src), {}, {}, 0
    outside, corner, pointed = [], 0, 0
    for i, rec in readers.dataset_rows(name, path):
        if not isinstance(rec, dict):
            continue  # malformed: counted above
        rows += 1
        v = rec.get(col) if col else None
        if isinstance(v, list):
            wh = rec.get("image_sizes") or [None] * len(v)
            for u, s in zip(v, wh):
                if isinstance(u, str) and u:
                    images.setdefault(readers.media_path(media_root, u), s)
        elif isinstance(v, str) and v:
            img = readers.media_path(media_root, v)
            want = (rec["image_width"], rec["image_height"]) if "image_width" in rec else None
            images.setdefault(img, want)
            pts = _points(rec.get("points"))
            size = want or _header_size(img)
            if pts and size:
                pointed += 1
                w, h = (src.point_scale, src.point_scale) if src.point_scale else size  # SOURCES says the scale
                bad = [(x, y) for x, y in pts if not (0 <= x <= w and 0 <= y <= h)]
                if bad:
                    outside.append(f"{path}:{i}: point {bad[0]} outside its "
                                   + (f"0-{w} scale, image {img}" if src.point_scale else f"{w}x{h} image {img}"))
                elif not src.point_scale and min(w, h) > 200 and all(x <= 100 and y <= 100 for x, y in pts):
                    corner += 1
        if src.video and isinstance(rec.get(src.video), str) and rec[src.video]:
            videos.setdefault(readers.video_path(media_root, rec[src.video]), None)
    # 3. decode them all, in a thread pool (Pillow and PyAV decode outside the GIL)
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        checks = [(p, pool.submit(_check_image, p, s)) for p, s in images.items()]
        for p, fut in tqdm(checks, unit="img", desc=f"{name} images", disable=not progress or not checks):
            if fut.result():
                problems.append(f"{p}: {fut.result()}")
        vchecks = [(p, pool.submit(_check_video, p, max_frames, fps)) for p in videos]
        seconds = 0.0
        for p, fut in tqdm(vchecks, unit="video", desc=f"{name} videos", disable=not progress or not vchecks):
            d, why = fut.result()
            if why:
                problems.append(f"{p}: {why}" + (f" (videos are fetched by hand: {name}.missing_videos.txt lists "
                                                 f"those missing when prepare.py ran)" if why == "missing" else ""))
            else:
                seconds += d
    problems += outside[:20]  # a wrong scale would flag every row: the first 20 are named, the rest counted
    if len(outside) > 20:
        problems.append(f"{path}: {len(outside):,} rows with a point outside its image (the first 20 above)")
    log(f"verify {name}: {rows:,} rows, {len(images):,} images, {len(videos):,} videos"
        + (f" ({timedelta(seconds=round(seconds))} of video)" if videos else "")
        + (f", {pointed:,} rows with points: {len(outside):,} outside their image, {corner:,} with every point in "
           f"the top-left 100x100 of a larger image" if pointed else "")
        + f"; {len(problems):,} problems")
    return problems


# -----------------------------------------------------------------------------------------------------------------
# Command line

def read_config(path):
    """A config file's settings, run as train.py runs it (with __file__ set: configs exec each other)."""
    scope = {"__file__": os.path.abspath(path)}
    exec(open(path).read(), scope)
    return scope


def config_names(scope):
    """The dataset names a config mixes (its mixture's leaves) and evaluates (eval_data's keys, readers.SOURCES
    names such as pixmo_count_val), in order, each once."""
    names = [n for _, leaves in scope.get("mixture", {}).values() for n in leaves]
    names += list(scope.get("eval_data", {}))
    return list(dict.fromkeys(names))


def main(argv=None):
    """The command line (the module docstring); returns the exit status: 0, or 1 if a dataset could not be
    prepared or --verify found a problem. Bad arguments exit 2 with argparse's usage line."""
    p = argparse.ArgumentParser(prog="prepare.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="datasets to prepare or verify (keys of readers.SOURCES)")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="every dataset config/stage<N>.py names")
    p.add_argument("--out", default=OUT, help=f"where the copies go (default {OUT})")
    p.add_argument("--media_root", default=None, help="where the images go (default <out>/media)")
    p.add_argument("--hub_dir", default=None, help="read ROOT/<repo> (huggingface-cli download --local-dir) "
                                                    "instead of the Hub")
    p.add_argument("--max_rows", type=int, default=None, help="the first N rows of each dataset only")
    p.add_argument("--workers", type=int, default=WORKERS, help=f"downloads in flight (default {WORKERS})")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help=f"seconds a socket may wait (default {TIMEOUT:g})")
    p.add_argument("--tries", type=int, default=TRIES, help=f"tries a URL gets (default {TRIES})")
    p.add_argument("--backoff", type=float, default=BACKOFF, help=f"seconds before a 2nd try, doubled after "
                                                                   f"(default {BACKOFF:g})")
    p.add_argument("--max_bytes", type=int, default=MAX_BYTES, help=f"largest image body (default {MAX_BYTES:,})")
    p.add_argument("--retry_failed", action="store_true", help="ask again the URLs failed.tsv lists as gone")
    p.add_argument("--verify", action="store_true", help="check the copies instead of making them")
    p.add_argument("--max_frames", type=int, default=None, help=f"--verify: frames a video is sampled at (default: "
                                                                 f"the --stage config's max_frames, else {MAX_FRAMES})")
    p.add_argument("--no_progress", action="store_true", help="no progress bars (summary lines only)")
    a = p.parse_args(argv)

    # the names: those given, those the stage's config mixes and evaluates, else (--verify) every copy in --out
    names, scope = list(a.names), {}
    if a.stage:
        scope = read_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", f"stage{a.stage}.py"))
        names += config_names(scope)
    if a.verify and not names and os.path.isdir(a.out):
        names = sorted(f[:-6] for f in os.listdir(a.out) if f.endswith(".jsonl") and f[:-6] in readers.SOURCES)
    names = list(dict.fromkeys(names))
    if not names:
        p.error("name the datasets (keys of readers.SOURCES), or give --stage" +
                (f"; {a.out} holds no copy to verify" if a.verify else ""))
    unknown = [n for n in names if n not in readers.SOURCES]
    if unknown:
        p.error(f"no readers.SOURCES entry for {', '.join(unknown)}; entries: {', '.join(sorted(readers.SOURCES))}")
    media_root = a.media_root or os.path.join(a.out, "media")
    progress = not a.no_progress

    # --verify: the frames a run of that stage samples (config/stage3.py: 384), else train.py's default
    if a.verify:
        max_frames = a.max_frames or scope.get("max_frames", MAX_FRAMES)
        problems = []
        for n in names:
            problems += verify_dataset(n, a.out, media_root, a.workers, max_frames, scope.get("video_fps", VIDEO_FPS),
                                       progress)
        for q in problems:
            print(f"BROKEN {q}")
        print(f"verify: {len(names)} datasets, " + (f"{len(problems):,} problems" if problems else "all good"))
        return 1 if problems else 0

    # one dataset after another; one that cannot be made (a missing column, no network) is reported and the
    # others still made, so a long --stage run is not lost to one bad repo
    net = Net(a.timeout, a.tries, a.backoff, a.max_bytes)
    for d in dict.fromkeys([media_root, a.out]):  # images and the jsonl copies' temp files
        remove_stale_parts(d)
    errors = []
    for n in names:
        try:
            prepare(n, a.out, media_root, a.hub_dir, a.max_rows, a.workers, net, a.retry_failed, progress)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            errors.append(n)
    if errors:
        print(f"{len(errors)} of {len(names)} datasets not prepared: {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

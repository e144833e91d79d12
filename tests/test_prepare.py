"""prepare.py: released parquet files -> local copies, images fetched from a local HTTP server on 127.0.0.1 with
scripted faults (nothing here touches the network). Each fault ends as one fetched file or one listed failure, no
partial file is ever under a final name, and a second run asks only for what is missing (the server counts)."""
import fnmatch
import hashlib
import http.server
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import data
import prepare
import readers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = prepare.Net(timeout=5.0, tries=3, backoff=0.001)  # retries without the real backoff's seconds


def image_bytes(fmt="PNG", size=(8, 6), colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


PNG = image_bytes()


class Server:
    """http.server in a thread. script[path] = actions, one per request to that path (the last one repeats):
    ("ok", body) | ("status", code) | ("drop", body): half the body, then a TCP reset | ("short", body): half the
    body, then a clean close, short of Content-Length | ("slow", seconds, body) | ("stall", body): half the body,
    then wait until `release` is set. hits counts the requests per path."""

    def __init__(self):
        self.script, self.hits, self.release = {}, Counter(), threading.Event()
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                srv.hits[self.path] += 1
                actions = srv.script.get(self.path, [("status", 404)])
                act = actions[min(srv.hits[self.path], len(actions)) - 1]
                kind, body = act[0], act[-1]
                if kind == "status":
                    self.send_error(body)
                    return
                if kind == "slow":
                    time.sleep(act[1])
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if kind in ("ok", "slow"):
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                if kind == "stall":
                    srv.release.wait(30)
                if kind == "drop":  # SO_LINGER 0: close sends a reset, not a clean end
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()

            def log_message(self, *a):
                pass

        class Quiet(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, *a):  # a client that timed out and left: nothing to report
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.release.set()
    s.httpd.shutdown()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # 127.0.0.1 directly, whatever proxy the machine sets
    monkeypatch.setenv("NO_PROXY", "*")


def write_hub(hub, repo, rows, name="data/train-00000-of-00001.parquet"):
    """One parquet file laid out as `huggingface-cli download REPO --local-dir hub/REPO` leaves it."""
    path = os.path.join(hub, repo, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def parts(folder):
    return [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".part")]


def failures(out, name):
    with open(os.path.join(out, f"{name}.failed.tsv")) as f:
        return {line.split("\t")[0]: line.split("\t")[1] for line in f}


def quiet(*a):
    pass


# (server script, dataset, the outcome, requests after the first run, after a second, after a --retry_failed run)
FAULTS = {
    "404": ([("status", 404)], "pixmo_cap", "http 404", 1, 1, 2),
    "429_twice": ([("status", 429), ("status", 429), ("ok", PNG)], "pixmo_cap", "fetched", 3, 3, 3),
    "500_once": ([("status", 500), ("ok", PNG)], "pixmo_cap", "fetched", 2, 2, 2),
    "dropped_mid_body": ([("drop", PNG), ("ok", PNG)], "pixmo_cap", "fetched", 2, 2, 2),
    "short_of_length": ([("short", PNG)], "pixmo_cap", "truncated", 3, 6, 9),
    "sha_differs": ([("ok", PNG)], "pixmo_points", "sha256 mismatch", 1, 1, 2),
    "not_an_image": ([("ok", b"<html>gone</html>")], "pixmo_cap", "not an image", 1, 1, 2),
    "slower_than_timeout": ([("slow", 1.5, PNG)], "pixmo_cap", "timeout", 3, 6, 9),
}


def rows_for(name, url, sha):
    if name == "pixmo_cap":
        return [dict(image_url=url, caption="a red square")]
    return [dict(image_url=url, image_sha256=sha, label="square", points=[dict(x=2.0, y=3.0)],
                 collection_method="pointing")]


@pytest.mark.parametrize("fault", list(FAULTS))
def test_download_fault_ends_as_one_file_or_one_failure(server, tmp_path, fault):
    script, name, outcome, *want_hits = FAULTS[fault]
    path, good = f"/{fault}.png", f"/{fault}_control.png"
    server.script.update({path: script, good: [("ok", PNG)]})
    url = server.url(path)
    sha = hashlib.sha256(b"other bytes" if fault == "sha_differs" else PNG).hexdigest()
    hub, out = str(tmp_path / "hub"), str(tmp_path / "data")
    write_hub(hub, readers.SOURCES[name].repo,
              rows_for(name, url, sha) + rows_for(name, server.url(good), hashlib.sha256(PNG).hexdigest()))
    net = prepare.Net(timeout=0.1 if fault == "slower_than_timeout" else 5.0, tries=3, backoff=0.001)
    media = os.path.join(out, "media")
    dest = readers.media_path(media, url)
    for run, retry in enumerate([False, False, True]):
        counts = prepare.prepare(name, out, hub_dir=hub, net=net, workers=4, retry_failed=retry, progress=False,
                                 log=quiet)
        assert server.hits[path] == want_hits[run], (fault, run)
        assert server.hits[good] == 1  # fetched once, present afterwards
        assert not parts(out)
        rows = jsonl(os.path.join(out, f"{name}.jsonl"))
        if outcome == "fetched":
            assert open(dest, "rb").read() == PNG
            assert [(r["image_url"], r["image_width"], r["image_height"]) for r in rows] == \
                   [(url, 8, 6), (server.url(good), 8, 6)]
            assert failures(out, name) == {}
        else:  # the row left out, the URL listed with its reason, nothing under its final name
            assert not os.path.exists(dest)
            assert [r["image_url"] for r in rows] == [server.url(good)]
            assert failures(out, name) == {url: outcome}
            assert counts["failed"] == {outcome: 1} and counts["left_out"] == {"image failed": 1}
        assert (counts["fetched"], counts["present"]) == ((2 if outcome == "fetched" else 1, 0) if run == 0 else
                                                          (0, 2 if outcome == "fetched" else 1))


def test_a_url_many_rows_share_is_fetched_once(server, tmp_path):
    server.script["/shared.png"] = [("ok", PNG)]
    url = server.url("/shared.png")
    hub, out = str(tmp_path / "hub"), str(tmp_path / "data")
    write_hub(hub, "allenai/pixmo-points", [dict(image_url=url, image_sha256=hashlib.sha256(PNG).hexdigest(),
                                                 label=f"thing {i}", points=[dict(x=1.0 * i, y=1.0)],
                                                 collection_method="pointing") for i in range(6)])
    counts = prepare.prepare("pixmo_points", out, hub_dir=hub, net=FAST, progress=False, log=quiet)
    assert server.hits["/shared.png"] == 1 and counts["fetched"] == 1 and counts["rows"] == 6
    rows = jsonl(os.path.join(out, "pixmo_points.jsonl"))
    assert [r["label"] for r in rows] == [f"thing {i}" for i in range(6)]  # every row, in order, columns as released
    assert all((r["image_width"], r["image_height"]) == (8, 6) for r in rows)
    assert rows[3]["points"] == [dict(x=3.0, y=1.0)]
    examples, _ = readers.read_dataset("pixmo_points", os.path.join(out, "pixmo_points.jsonl"),
                                       os.path.join(out, "media"), log=quiet)
    assert len(examples) == 1 and len(examples[0]["turns"]) == 6  # one image: one conversation of six turns


def test_kill_9_mid_download_then_a_second_run_finishes(server, tmp_path, capsys):
    """prepare.py as a process, killed while the server holds a body half sent; the rerun completes the copy."""
    server.script["/stall.png"] = [("stall", PNG), ("ok", PNG)]
    server.script["/beside.png"] = [("ok", PNG)]
    url = server.url("/stall.png")
    hub, out = str(tmp_path / "hub"), str(tmp_path / "data")
    write_hub(hub, "allenai/pixmo-cap", [dict(image_url=url, caption="stalled"),
                                         dict(image_url=server.url("/beside.png"), caption="beside")])
    media = os.path.join(out, "media")
    cmd = [sys.executable, os.path.join(ROOT, "prepare.py"), "pixmo_cap", "--hub_dir", hub, "--out", out,
           "--workers", "2", "--backoff", "0.001", "--no_progress"]
    env = dict(os.environ, no_proxy="*", NO_PROXY="*")
    final = readers.media_path(media, url)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = f"{final}.{proc.pid}.part"  # the half body, written through its temp file
    try:
        deadline = time.time() + 120
        while not os.path.exists(part) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert os.path.exists(part), proc.poll()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(final) and not os.path.exists(os.path.join(out, "pixmo_cap.jsonl"))
    beside_done = os.path.exists(readers.media_path(media, server.url("/beside.png")))  # the other worker's file
    server.release.set()  # the stalled handler may finish; its client is gone
    assert prepare.main(cmd[2:]) == 0  # the second run, in this process (a second interpreter start is slow)
    assert "partial files that a killed run left" in capsys.readouterr().out and not os.path.exists(part)
    assert open(final, "rb").read() == PNG and not parts(out)
    assert server.hits["/stall.png"] == 2 and server.hits["/beside.png"] == (1 if beside_done else 2)
    assert [r["caption"] for r in jsonl(os.path.join(out, "pixmo_cap.jsonl"))] == ["stalled", "beside"]


def test_embedded_images_are_written_out(tmp_path, monkeypatch):
    src = readers.Source("test/tiny-vqa", columns=("question", "image_url"), image_bytes="image")
    monkeypatch.setitem(readers.SOURCES, "tiny_vqa", src)
    jpg = image_bytes("JPEG", (10, 4))
    hub, out = str(tmp_path / "hub"), str(tmp_path / "data")
    write_hub(hub, "test/tiny-vqa", [dict(question="q1", image=dict(bytes=PNG, path="a.png")),
                                     dict(question="q2", image=dict(bytes=PNG, path="a.png")),
                                     dict(question="q3", image=dict(bytes=jpg, path=None)),
                                     dict(question="q4", image=dict(bytes=b"not an image", path="b.png"))],
              name="data/validation-00000-of-00001.parquet")
    monkeypatch.setitem(readers.SOURCES, "tiny_vqa", readers.Source(src.repo, split="validation",
                                                                    columns=src.columns, image_bytes="image"))
    counts = prepare.prepare("tiny_vqa", out, hub_dir=hub, progress=False, log=quiet)
    rows = jsonl(os.path.join(out, "tiny_vqa.jsonl"))
    png_url = f"hf://test/tiny-vqa/{hashlib.sha256(PNG).hexdigest()}.png"
    jpg_url = f"hf://test/tiny-vqa/{hashlib.sha256(jpg).hexdigest()}.jpg"
    assert rows == [dict(question="q1", image_url=png_url, image_width=8, image_height=6),
                    dict(question="q2", image_url=png_url, image_width=8, image_height=6),
                    dict(question="q3", image_url=jpg_url, image_width=10, image_height=4)]
    media = os.path.join(out, "media")
    assert open(readers.media_path(media, png_url), "rb").read() == PNG
    assert open(readers.media_path(media, jpg_url), "rb").read() == jpg
    assert sorted(os.listdir(media)) == sorted(os.path.basename(readers.media_path(media, u))
                                               for u in (png_url, jpg_url))
    assert counts["fetched"] == 2 and counts["failed"] == {"not an image": 1}
    assert list(failures(out, "tiny_vqa").values()) == ["not an image"]
    again = prepare.prepare("tiny_vqa", out, hub_dir=hub, progress=False, log=quiet)
    assert (again["fetched"], again["present"]) == (0, 2) and jsonl(os.path.join(out, "tiny_vqa.jsonl")) == rows


def test_a_missing_column_is_a_one_line_error_naming_the_file(tmp_path):
    hub = str(tmp_path / "hub")
    path = write_hub(hub, "allenai/pixmo-cap", [dict(image_url="http://127.0.0.1:9/x.png", transcripts=["t"])])
    with pytest.raises(ValueError) as e:
        prepare.prepare("pixmo_cap", str(tmp_path / "data"), hub_dir=hub, progress=False, log=quiet)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "lacks column(s) caption " in msg


def test_without_hub_dir_rows_come_through_snapshot_download(server, tmp_path, monkeypatch):
    server.script["/snap.png"] = [("ok", PNG)]
    hub = str(tmp_path / "hub")
    write_hub(hub, "allenai/pixmo-cap", [dict(image_url=server.url("/snap.png"), caption="c")])
    write_hub(hub, "allenai/pixmo-cap", [dict(image_url="http://127.0.0.1:9/no.png", caption="other split")],
              name="data/test-00000-of-00001.parquet")
    calls = []

    def snapshot(repo_id, repo_type=None, allow_patterns=None):
        calls.append((repo_id, repo_type, allow_patterns))
        return os.path.join(hub, repo_id)
    monkeypatch.setattr(prepare, "snapshot_download", snapshot)
    out = str(tmp_path / "data")
    assert prepare.prepare("pixmo_cap", out, net=FAST, progress=False, log=quiet)["rows"] == 1
    (repo, kind, patterns), = calls
    assert (repo, kind) == ("allenai/pixmo-cap", "dataset")
    assert any(fnmatch.fnmatch("data/train-00000-of-00001.parquet", p) for p in patterns)
    assert [r["caption"] for r in jsonl(os.path.join(out, "pixmo_cap.jsonl"))] == ["c"]  # the train split only


def test_stage_reads_the_config_mixture(server, tmp_path, capsys):
    assert prepare.config_names(prepare.read_config(os.path.join(ROOT, "config", "stage1.py"))) == \
           ["pixmo_cap", "pixmo_points", "tulu", "pixmo_count_val", "pixmo_points_eval"]
    # a config that execs another, as config/stage2.py does, and names eval splits
    (tmp_path / "base.py").write_text('mixture = {"captions": (1.0, {"pixmo_cap": 1.0})}\n')
    (tmp_path / "top.py").write_text('import os\n'
                                     'exec(open(os.path.join(os.path.dirname(__file__), "base.py")).read())\n'
                                     'eval_data = {"pixmo_count_val": "data/pixmo_count_val.jsonl"}\n')
    assert prepare.config_names(prepare.read_config(str(tmp_path / "top.py"))) == ["pixmo_cap", "pixmo_count_val"]
    # --stage 1 end to end on a tiny mirror, the first 2 rows of each dataset
    hub, out = str(tmp_path / "hub"), str(tmp_path / "data")
    sha = hashlib.sha256(PNG).hexdigest()
    for i in range(3):
        server.script[f"/stage{i}.png"] = [("ok", PNG)]
    urls = [server.url(f"/stage{i}.png") for i in range(3)]
    write_hub(hub, "allenai/pixmo-cap", [dict(image_url=u, caption="c") for u in urls])
    write_hub(hub, "allenai/pixmo-points", [dict(image_url=urls[0], image_sha256=sha, label="l", points=[],
                                                 collection_method="pointing")])
    write_hub(hub, "allenai/tulu-3-sft-mixture", [dict(messages=[dict(role="user", content="hi"),
                                                                 dict(role="assistant", content="hello")])] * 3)
    write_hub(hub, "allenai/pixmo-count", [dict(image_url=urls[1], image_sha256=sha, label="l", count=2)],
              name="data/validation-00000-of-00001.parquet")
    write_hub(hub, "allenai/pixmo-points-eval", [dict(image_url=urls[1], image_sha256=sha, label="l",
                                                      points=[dict(x=1.0, y=1.0)], masks=[[[True]]])],
              name="data/test-00000-of-00001.parquet")
    assert prepare.main(["--stage", "1", "--hub_dir", hub, "--out", out, "--max_rows", "2", "--backoff", "0.001",
                         "--no_progress"]) == 0
    assert {n: len(jsonl(os.path.join(out, f"{n}.jsonl"))) for n in ("pixmo_cap", "pixmo_points", "tulu")} == \
           dict(pixmo_cap=2, pixmo_points=1, tulu=2)
    assert server.hits["/stage2.png"] == 0  # beyond --max_rows: never asked for
    summary = capsys.readouterr().out
    assert "pixmo_cap: 2 rows" in summary and "images: 2 fetched, 0 already present, 0 failed" in summary
    assert prepare.main(["--verify", "--stage", "1", "--out", out, "--no_progress"]) == 0


def test_verify_names_broken_images_videos_and_points(server, tmp_path, capsys):
    server.script.update({"/v_a.png": [("ok", PNG)], "/v_b.png": [("ok", image_bytes(colour=(0, 0, 255)))]})
    a, b = server.url("/v_a.png"), server.url("/v_b.png")
    hub, out = str(tmp_path / "hub"), str(tmp_path / "data")
    media = os.path.join(out, "media")
    pts = lambda x, y: dict(label="dot", points=[dict(x=x, y=y)], collection_method="pointing")
    write_hub(hub, "allenai/pixmo-points", [dict(image_url=a, image_sha256=None, **pts(2.0, 3.0)),
                                            dict(image_url=b, image_sha256=None, **pts(2.0, 3.0)),
                                            dict(image_url=a, image_sha256=None, **pts(50.0, 3.0))])  # 8 x 6 image
    write_hub(hub, "allenai/pixmo-cap", [dict(image_url=a, caption="fine")])
    write_hub(hub, "allenai/Molmo2-Cap", [dict(video_id=v, annotation_score=4, video_caption="a clip")
                                          for v in ("v_ok", "v_bad", "v_missing")])
    for name in ("pixmo_points", "pixmo_cap", "molmo2_cap"):
        prepare.prepare(name, out, hub_dir=hub, net=FAST, progress=False, log=quiet)
    assert open(os.path.join(out, "molmo2_cap.missing_videos.txt")).read().split() == ["v_ok", "v_bad", "v_missing"]
    data.write_video(os.path.join(media, "v_ok.mp4"), [np.full((32, 32, 3), 60 * i, np.uint8) for i in range(3)],
                     fps=2)
    with open(os.path.join(media, "v_bad.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypmp42" + b"\x07" * 200)  # an mp4 header, then nothing decodable
    bad_image = readers.media_path(media, b)
    with open(bad_image, "r+b") as f:
        f.truncate(40)  # a PNG cut short
    capsys.readouterr()
    assert prepare.main(["--verify", "pixmo_cap", "--out", out, "--no_progress"]) == 0  # a sound copy passes
    assert prepare.main(["--verify", "--out", out, "--no_progress"]) == 1  # every copy in out
    broken = [line for line in capsys.readouterr().out.splitlines() if line.startswith("BROKEN ")]
    named = " ".join(broken)
    assert f"BROKEN {bad_image}:" in named
    assert os.path.join(media, "v_bad.mp4") in named and os.path.join(media, "v_missing.mp4") in named
    assert os.path.join(media, "v_ok.mp4") not in named and f"BROKEN {readers.media_path(media, a)}:" not in named
    assert f"{os.path.join(out, 'pixmo_points.jsonl')}:3: point (50.0, 3.0) outside its 8x6 image" in named


def test_help_exits_0_and_shows_usage(capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: prepare.py" in text and "--stage" in text and "python prepare.py --verify --out data" in text

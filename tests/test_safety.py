"""Nothing lost, nothing run: checkpoints that never run code and survive kill -9 and failed writes, output
directories checked before training, overrides that never go silently unused, sample.py's prompt checks."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import checkpoint
import model as M
import hf
import sample
import train
from test_train import run_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step tiny run: its out_dir (ckpt.pt inside) and its losses."""
    out = tmp_path_factory.mktemp("run")
    return out, train.main(run_args(out, max_steps=4))["losses"]


def evil_checkpoint(tmp_path, ckpt):
    """A copy of a real checkpoint with an object whose unpickling would create `marker`: proof that code ran."""
    marker = tmp_path / "PAYLOAD_RAN"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    bad = dict(ckpt, config=dict(ckpt["config"], extra=Evil()))
    path = tmp_path / "evil.pt"
    torch.save(bad, path)
    return path, marker


def test_a_code_carrying_checkpoint_is_refused_everywhere(trained, tmp_path):
    out, _ = trained
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))  # our own checkpoints load as plain data
    path, marker = evil_checkpoint(tmp_path, ckpt)
    with pytest.raises(SystemExit, match=r"evil.pt holds .*system.*refused"):
        train.main(run_args(tmp_path / "t", max_steps=1, init_from=str(path)))
    with pytest.raises(SystemExit, match=r"evil.pt .*refused"):
        sample.main(["--ckpt", str(path), "--out", str(tmp_path / "s.png")])
    with pytest.raises(checkpoint.CheckpointError, match=r"evil.pt .*refused"):
        hf.export_checkpoint(str(path), str(tmp_path / "hf"))
    assert not marker.exists()  # the payload never ran


def test_corrupt_checkpoints_are_one_line_naming_the_file(trained, tmp_path):
    out, _ = trained
    data = (out / "ckpt.pt").read_bytes()
    for name, content in (("truncated.pt", data[: len(data) // 2]), ("random.pt", np.random.default_rng(0).bytes(5000)),
                          ("empty.pt", b"")):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(SystemExit) as e:
            train.main(run_args(tmp_path / "t", max_steps=1, init_from=str(p)))
        msg = str(e.value)
        assert name in msg and "\n" not in msg and ("truncated" in msg or "corrupt" in msg), msg


def test_an_old_pickled_checkpoint_needs_trust(trained, tmp_path):
    """Checkpoints written before the rng states were plain data hold numpy's tuple: refused by default, loaded
    with trust_checkpoint=True (the flag says what it means)."""
    out, _ = trained
    ckpt = checkpoint.load_checkpoint(str(out / "ckpt.pt"))
    old = dict(ckpt, rng=dict(ckpt["rng"], numpy=np.random.get_state()))
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    torch.save(old, old_dir / "ckpt.pt")
    with pytest.raises(SystemExit, match=r"trust_checkpoint"):
        train.main(run_args(old_dir, max_steps=5, init_from="resume"))
    res = train.main(run_args(old_dir, max_steps=5, init_from="resume", trust_checkpoint=True))
    assert len(res["losses"]) == 5


def test_kill_9_mid_step_and_mid_checkpoint_write_then_resume_is_exact(tmp_path):
    """A training subprocess is killed (SIGKILL) once during a checkpoint write made slow by this test (the write
    sleeps half-way through its bytes) and once at a random step; each time the resumed run's losses equal the
    uninterrupted run's bit for bit (fp32) and no .tmp file is left."""
    args = run_args(tmp_path / "x", max_steps=12, eval_interval=4, eval_prompts=2)
    ref = train.main([a.replace(str(tmp_path / "x"), str(tmp_path / "ref")) for a in args])["losses"]
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
        torch.set_num_threads(1)
        import checkpoint, train
        real_save = torch.save
        def slow_save(obj, f):  # writes the first bytes, then sleeps: the kill lands inside the write
            real_save(obj, f)
            f.flush()
            print("WRITING", flush=True)
            time.sleep(30)
        if sys.argv[1] == "slow":
            checkpoint.torch.save = slow_save
        train.main(sys.argv[2:])
    """)
    runner = tmp_path / "runner.py"
    runner.write_text(script)
    ck = tmp_path / "x" / "ckpt.pt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # 1: killed while its first checkpoint (step 4) is being written: no checkpoint at all, a .tmp left
    p = subprocess.Popen([sys.executable, str(runner), "slow"] + args, stdout=subprocess.PIPE, text=True, env=env)
    for line in p.stdout:
        if line.startswith("WRITING"):
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(str(ck) + ".tmp") and not ck.exists()
    # 2: a plain run from scratch (the .tmp is cleaned), killed at a random step after its step-8 checkpoint
    p = subprocess.Popen([sys.executable, str(runner), "plain"] + args + ["--log_interval=1"],
                         stdout=subprocess.PIPE, text=True, env=env)
    kill_at = np.random.default_rng().integers(9, 12)
    for line in p.stdout:
        if line.startswith(f"step {kill_at:5d}/"):
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not os.path.exists(str(ck) + ".tmp") and checkpoint.load_checkpoint(str(ck))["step"] == 8
    got = train.main(args + ["--init_from=resume"])["losses"]
    assert got == ref and not os.path.exists(str(ck) + ".tmp")


def test_unwritable_out_dir_fails_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    steps = []
    monkeypatch.setattr(train, "accumulate", lambda *a, **k: steps.append(1))
    with pytest.raises(SystemExit, match=rf"out_dir='{blocker}/run' is not writable"):
        train.main(run_args(blocker / "run", max_steps=2))
    assert not steps  # nothing was trained


def test_a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one(trained, tmp_path, monkeypatch):
    out, _ = trained
    before = (out / "ckpt.pt").read_bytes()

    def fails(obj, f):  # half a file, then the disk is full
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint.torch, "save", fails)
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt.pt: \[Errno 28\] No space left"):
        checkpoint.save_checkpoint(str(out / "ckpt.pt"), {"x": 1})
    monkeypatch.undo()
    assert (out / "ckpt.pt").read_bytes() == before and not (out / "ckpt.pt.tmp").exists()
    assert checkpoint.load_checkpoint(str(out / "ckpt.pt"))["step"] == 4


def test_architecture_overrides_against_a_checkpoint_are_errors(trained, tmp_path):
    out, _ = trained
    with pytest.raises(SystemExit, match=r"d_model=32 \(checkpoint: 64\), n_layer=3 \(checkpoint: 2\)"):
        train.main(run_args(tmp_path / "t", max_steps=1, init_from=str(out / "ckpt.pt")) + ["--n_layer=3",
                                                                                          "--d_model=32"])


def test_resume_applies_a_changed_lr_with_a_note(tmp_path, capsys, monkeypatch):
    train.main(run_args(tmp_path, max_steps=6, stop_at=3, warmup_steps=1))
    lrs = []
    real = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step",
                        lambda self, *a, **k: (lrs.append(self.param_groups[-1]["peak"]), real(self, *a, **k))[1])
    train.main(run_args(tmp_path, max_steps=6, init_from="resume", warmup_steps=1, lr=0.5))
    assert "resume: lr = 0.5 (the checkpoint's run had 0.003): takes effect from here" in capsys.readouterr().out
    assert lrs and all(lr == 0.5 for lr in lrs)  # the LLM group's peak is the new lr
    saved = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))["config"]
    assert saved["lr"] == 0.5 and saved["n_layer"] == 2  # the configuration that ran


def test_sample_refuses_an_empty_prompt_and_warns_on_a_long_one(trained, tmp_path, capsys):
    out, _ = trained
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "  ", "--out", str(tmp_path / "a.png")])
    assert "--prompt is empty" in capsys.readouterr().err
    sample.main(["--ckpt", str(out / "ckpt.pt"), "--prompt", "red " * 300, "--out", str(tmp_path / "b.png"),
                 "--max_new_tokens", "2"])
    assert "longer than the" in capsys.readouterr().err


def broken_media_copies(tmp_path, n_good=12):
    """Local copies in the real formats: PixMo-Cap rows whose images are good, one a PNG cut in half (its header
    intact, so the reader passes it) and one a zero-byte JPEG; Molmo2-Cap rows with good videos and one text file
    named .mp4. Returns (data_paths, media_root)."""
    import json
    from PIL import Image
    import data
    import readers
    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(n_good):
        url = f"http://img/{i}.png"
        Image.new("RGB", (40, 30), (20 * i, 90, 30)).save(readers.media_path(str(media), url))
        rows.append(dict(image_url=url, caption=f"A picture of shade {i}."))
    Image.effect_noise((64, 64), 50).convert("RGB").save(readers.media_path(str(media), "http://img/cut.png"))
    whole = open(readers.media_path(str(media), "http://img/cut.png"), "rb").read()
    open(readers.media_path(str(media), "http://img/cut.png"), "wb").write(whole[: len(whole) // 2])
    open(readers.media_path(str(media), "http://img/empty.jpg"), "wb").close()
    rows += [dict(image_url="http://img/cut.png", caption="Cut."), dict(image_url="http://img/empty.jpg", caption="0.")]
    frames = [np.full((32, 32, 3), 40 * k, dtype=np.uint8) for k in range(4)]
    vids = []
    for i in range(4):
        data.write_video(str(media / f"v{i}.mp4"), frames, fps=2)
        vids.append(dict(video_id=f"v{i}", video_caption=f"Clip {i}.", annotation_score=4))
    (media / "text.mp4").write_text("this is not a video")
    vids.append(dict(video_id="text", video_caption="Not a clip.", annotation_score=4))
    paths = {}
    for name, rs in (("pixmo_cap", rows), ("molmo2_cap", vids)):
        paths[name] = str(tmp_path / f"{name}.jsonl")
        open(paths[name], "w").write("\n".join(json.dumps(r) for r in rs) + "\n")
    return paths, str(media)


def test_broken_media_are_skipped_counted_and_bounded(tmp_path, capsys):
    paths, media = broken_media_copies(tmp_path, n_good=3)  # few examples: every one is drawn
    mix = {"images": (0.5, {"pixmo_cap": 1.0}), "videos": (0.5, {"molmo2_cap": 1.0})}
    args = run_args(tmp_path / "run", max_steps=4, dataset="molmo2", mixture=mix, media_root=media, batch_size=6,
                    max_frames=4, log_interval=2) + [f"--data_paths={paths!r}"]
    res = train.main(args)
    out = capsys.readouterr().out
    assert len(res["losses"]) == 4 and all(np.isfinite(res["losses"]))
    assert "dataset pixmo_cap: 4 examples from 4 rows; skipped 0 malformed, 1 with missing media" in out  # empty JPEG
    summary = next(l for l in out.splitlines() if l.startswith("examples skipped for media"))
    assert "molmo2_cap " in summary and "pixmo_cap " in summary  # the cut PNG and the text .mp4: at encoding
    assert "cut.png" not in summary and "skipped an example of pixmo_cap: cannot read image" in out
    assert "| skipped " in out  # the step lines count them too
    with pytest.raises(SystemExit, match=r"dataset (molmo2|pixmo)_cap: \d+ of \d+ examples skipped \(the latest has media that "
                                         r"cannot be decoded: .*\), "
                                         r"more than max_broken_frac=0.01"):
        train.main(args + ["--max_broken_frac=0.01", "--max_steps=30"])


def test_resume_with_skipped_media_is_exact(tmp_path):
    paths, media = broken_media_copies(tmp_path, n_good=3)
    mix = {"images": (0.5, {"pixmo_cap": 1.0}), "videos": (0.5, {"molmo2_cap": 1.0})}

    def run(out, **kw):
        return train.main(run_args(tmp_path / out, max_steps=4, dataset="molmo2", mixture=mix, media_root=media,
                                   batch_size=6, max_frames=4, packing=True, seq_len=256, max_broken_frac=0.5, **kw)
                          + [f"--data_paths={paths!r}"])["losses"]
    a = run("a")
    run("b", stop_at=2)
    assert run("b", init_from="resume") == a

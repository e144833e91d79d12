"""metrics.py and train.py's records: metrics.jsonl (every log line and eval, resume without duplicates), the
optional Weights & Biases mirror, and the learning curve drawn from the file."""
import json
import os
import shutil
import sys
import types

import pytest
import torch
from PIL import Image

import metrics
import train
from test_train import run_args

TRAIN_FIELDS = ("step", "total", "loss", "loss_avg", "gnorm", "lr")  # the fields a rerun repeats exactly


def records(out_dir):
    return metrics.read_metrics(os.path.join(out_dir, "metrics.jsonl"))


def test_metrics_jsonl_holds_every_log_line_and_eval_and_the_curve_is_drawn_from_it(tmp_path, monkeypatch):
    """Every log step and every eval is a line; the figures are the run's own (its losses, its checkpoint's evals);
    the curve is drawn from exactly those lines. wandb is off by default and then never imported (an import
    here would fail: the module is blocked). A finished run resumed does not double its final eval."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    drawn = []
    monkeypatch.setattr(train, "plot_curve", lambda recs, path, **kw: drawn.append((recs, path)))
    out = tmp_path / "run"
    kw = dict(max_steps=8, log_interval=2, eval_interval=4, eval_prompts=2, final_eval_prompts=2, eval_tasks=("qa",))
    res = train.main(run_args(out, **kw))
    recs = records(out)
    tr = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in tr] == [2, 4, 6, 8]
    for r in tr:  # the step's loss as logged, and the mean of the log interval's losses
        assert r["loss"] == res["losses"][r["step"] - 1]
        assert r["loss_avg"] == pytest.approx(sum(res["losses"][r["step"] - 2:r["step"]]) / 2)
        assert r["total"] == 8 and r["gnorm"] > 0 and r["lr"] > 0 and r["tok_s"] > 0 and 0 < r["non_pad"] <= 1
        assert r["mfu"] > 0 and r["elapsed_s"] >= 0 and r["eta_s"] >= 0
    ev = [r for r in recs if r["kind"] == "eval"]
    assert [(r["step"], r.get("final", False), r.get("blind", False)) for r in ev] == \
        [(4, False, False), (8, True, False), (8, True, True)]
    hist = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["history"]["evals"]
    assert [{"qa_acc": r["qa_acc"]} for r in ev] == [{"qa_acc": hist[0]["qa_acc"]}, res["final"], res["blind"]]
    assert ev[0]["prompts"] == ev[1]["prompts"] == 2
    (got, path), = drawn
    assert got == recs and path == os.path.join(str(out), "curve.png")
    # Resumed when finished, the run has no step left and evaluates its last step again: that final eval and its
    # blind baseline replace the old ones instead of doubling them; every other line stays as it was.
    train.main(run_args(out, init_from="resume", **kw))
    again = records(out)
    assert again[:-2] == recs[:-2] and [(r["step"], r.get("final"), r.get("blind")) for r in again[-2:]] == \
        [(8, True, None), (8, True, True)] and again[-2]["time"] > recs[-1]["time"]


def test_a_resumed_run_rewrites_the_steps_after_its_checkpoint_once(tmp_path):
    """A run stopped at step 8 (checkpoint), resumed to step 12 and then cut back to the step-8 checkpoint, as a
    crash after step 12 would leave it, has lines past its checkpoint. Resumed to 16, its file holds each step
    once, with the figures of a run never interrupted."""
    kw = dict(max_steps=16, log_interval=1, warmup_steps=4)
    train.main(run_args(tmp_path / "A", **kw))
    whole = records(tmp_path / "A")
    d = tmp_path / "B"
    train.main(run_args(d, stop_at=8, **kw))
    shutil.copy(d / "ckpt.pt", tmp_path / "ckpt8.pt")
    train.main(run_args(d, stop_at=12, init_from="resume", **kw))
    assert [r["step"] for r in records(d)] == list(range(1, 13))
    shutil.copy(tmp_path / "ckpt8.pt", d / "ckpt.pt")  # the last checkpoint is step 8's: 9-12 were logged after it
    train.main(run_args(d, init_from="resume", **kw))
    got = records(d)
    assert [r["step"] for r in got] == list(range(1, 17))
    assert [{k: r[k] for k in TRAIN_FIELDS} for r in got] == [{k: r[k] for k in TRAIN_FIELDS} for r in whole]


def test_wandb_mirrors_the_records_when_on_and_is_a_clear_error_when_missing(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw))
    fake.log = lambda data, step: calls.append(("log", step, data))
    fake.finish = lambda: calls.append(("finish",))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    res = train.main(run_args(tmp_path / "w", max_steps=4, log_interval=2, wandb_log=True, wandb_project="proj",
                              wandb_run_name="try1"))
    (_, init), logs, end = calls[0], calls[1:-1], calls[-1]
    assert calls[0][0] == "init" and (init["project"], init["name"]) == ("proj", "try1")
    assert init["config"]["max_steps"] == 4 and end == ("finish",)
    assert [(c[1], c[2]["train/loss"]) for c in logs] == [(2, res["losses"][1]), (4, res["losses"][3])]
    assert "train/mfu" in logs[0][2] and not any(k.endswith(("/kind", "/step", "/time")) for k in logs[0][2])
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: `import wandb` fails
    with pytest.raises(SystemExit, match=r"^wandb_log=True but the wandb package is not installed: pip install"):
        train.main(run_args(tmp_path / "x", max_steps=2, wandb_log=True))
    assert not (tmp_path / "x").exists()  # said at configuration, before anything was built or written


def test_plot_curve_writes_a_png_with_the_loss_and_every_metric(tmp_path):
    recs = [dict(kind="train", step=s, loss=5.0 / s, loss_avg=5.5 / s) for s in range(10, 210, 10)]
    recs += [dict(kind="eval", step=s, pointing_f1=s / 400, count_acc=0.3, prompts=5) for s in (100, 200)]
    recs += [dict(kind="eval", step=200, final=True, pointing_f1=0.6, count_acc=0.4),
             dict(kind="eval", step=200, final=True, blind=True, pointing_f1=0.1, count_acc=0.2)]
    src, png = tmp_path / "metrics.jsonl", tmp_path / "curve.png"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert metrics.read_metrics(src) == recs
    assert metrics.plot_curve(metrics.read_metrics(src), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    im = Image.open(png).convert("RGB")
    assert im.width > 600 and im.height > 300
    colours = {c for _, c in im.getcolors(maxcolors=1 << 24)}
    # the loss line (tab:blue), the pointing F1 (tab:red) and counting (tab:green) series are all drawn
    assert {(31, 119, 180), (214, 39, 40), (44, 160, 44)} <= colours
    assert not metrics.plot_curve(recs[:1], tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_read_metrics_names_the_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "step": 2, "loss"\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        metrics.read_metrics(p)
    p.write_text('{"kind": "train", "loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: a record needs 'kind' and an integer 'step'"):
        metrics.read_metrics(p)

"""The headline use, end to end, on miniatures: the three real configs (config/stage1.py, stage2.py, stage3.py) run
AS WRITTEN, from released-layout files, each as the command a user types. Only sizes (widths, depths, the
vocabulary, rows, row lengths), step counts, the precision, the device and the log interval are overridden
(--key=value); every path is the config's own, relative to the run's directory, laid out as a user's would be:

    hub/allenai/pixmo-cap/data/train-00000-of-00001.parquet, ...   the released parquet files (tests/miniature.py)
    checkpoints/Qwen3-0.6B/ (+ tokenizer.json), checkpoints/siglip2-base-patch16-224/   tiny, by transformers
    data/<dataset>.jsonl, data/media/                                the local copies, made from hub/
    out/stage1/ckpt.pt -> out/stage2/ckpt.pt -> out/stage3/ckpt.pt   each stage from the one before

Stage 1 starts from the tiny Qwen3 and SigLIP2, stage 2 from stage 1's checkpoint, stage 3 from stage 2's under
torchrun with 4 processes (dp 2 x cp 2, Ulysses, FSDP2, activation checkpointing, as config/stage3.py sets them);
the last checkpoint is exported with hf.py and loaded in transformers, whose logits must equal ours. Images come
from an HTTP server on 127.0.0.1 that the test starts. Each stage's first and last loss is printed (pytest -s)."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import miniature
import readers
import tiny_hf
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = {n: os.path.join(ROOT, "config", f"stage{n}.py") for n in (1, 2, 3)}
TIMEOUT = 300  # seconds a stage may take before the test fails (a deadlocked torchrun, say)

# The smallest model that still exercises every part the real one has: SigLIP2-B/16's patch size at 48 px (3 x 3
# patches: images 2 x 2 pooled tokens + column tokens, video frames one 3x3-pooled token), the ViT deep enough for
# vit_layers=(-3, -9) as written, a Qwen3-shaped decoder (GQA, QK-norm, tied embeddings as written) with 4 heads
# for Ulysses to split over cp = 2, and Qwen3's padded vocabulary (512 rows for the tokenizer's 500 ids).
MODEL = dict(image_size=48, vit_width=16, vit_depth=9, vit_heads=2, vit_mlp=32, base_vocab=512, d_model=32,
             n_layer=2, n_head=4, n_kv_head=2, head_dim=8, d_ff=64)
# Per stage: rows, steps (warmup 1, so the few steps run at the configured LR) and row lengths (stage 3's rows
# longer than stage 2's, as 36,864 is to 4,096; a video of the miniature is ~60 tokens, the answer of a 26-60
# point VideoPoint row up to ~470, and an example longer than a row is skipped, which the test forbids). The precision is the fp32
# reference (dtype auto would time bf16 against fp32 in every process first); the device is the CPU, also where
# a GPU is present.
RUN = dict(batch_size=2, grad_accum=2, max_steps=3, warmup_steps=1, dtype="float32", device="cpu", log_interval=1,
           final_eval_prompts=0, blind_baseline=False)  # no final eval but stage 3's (its eval_data holds all)
LENGTHS = {1: dict(seq_len=256), 2: dict(seq_len=640), 3: dict(seq_len=768)}

def config(n):
    """The configuration config/stage<n>.py sets (train.configure, as train.py reads it)."""
    return train.configure([CONFIG[n]], {k: getattr(train, k) for k in train.CONFIG_KEYS})


def datasets(c, evals=True):
    """The dataset names a configuration's mixture names, then (evals) those of its eval_data (readers.SOURCES
    names, as prepare.py reads them)."""
    names = [name for _, leaves in c["mixture"].values() for name in leaves]
    if evals:
        names += list(c.get("eval_data", {}))
    return list(dict.fromkeys(names))


def stage_overrides(n):
    """--key=value overrides of stage n: sizes, steps, lengths, precision, device."""
    kv = dict(MODEL, **RUN, **LENGTHS[n])
    kv["final_eval_prompts"] = int(n == 3)  # stage 3's final eval: each eval set's first example
    return [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in kv.items()]


def run(cmd, cwd, log):
    """Run a command (a stage, the export) in cwd; its output is appended to log and to <cwd>/rehearsal.log; a
    failure shows the output's end. Past TIMEOUT the command's whole process group is killed (torchrun's workers
    with it) and the test fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t = time.time()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd[:4])}... did not finish in {TIMEOUT} s:\n{out[-4000:]}")
    log.append(out)
    with open(os.path.join(cwd, "rehearsal.log"), "a") as f:
        f.write(f"$ {' '.join(cmd)}\n{out}\n")
    assert p.returncode == 0, f"{' '.join(cmd[:4])}... failed ({p.returncode}):\n{out[-4000:]}"
    return time.time() - t


def losses(run_dir, n):
    """The losses of stage n's run, from its checkpoint's history (read as data only, as train.py reads it)."""
    from checkpoint import load_checkpoint
    ck = load_checkpoint(os.path.join(run_dir, "out", f"stage{n}", "ckpt.pt"))
    return ck["history"]["loss"], ck


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    """The run directory of a user: the released parquet files under hub/ (images behind a local HTTP server), the
    tiny checkpoints where the configs look for them, and data/ made from hub/."""
    d = tmp_path_factory.mktemp("rehearsal")
    server, base = miniature.serve(d / "www")
    try:
        media = miniature.Media(d / "www", base, d / "data" / "media")  # videos go straight to media_root
        names = sorted({name for n in (1, 2, 3) for name in datasets(config(n))})
        miniature.build(d / "hub", names, media)
        c1 = config(1)
        os.makedirs(d / c1["init_llm"])
        tiny_hf.qwen_tokenizer(d / c1["tokenizer"])  # checkpoints/Qwen3-0.6B/tokenizer.json, as config/stage1.py
        dims = dict(c1, **MODEL)
        torch.manual_seed(0)  # the same checkpoints every run: the same losses
        tiny_hf.qwen3(dims, d / c1["init_llm"])
        tiny_hf.siglip(dims, d / c1["init_vit"], whole=True)
        for n in (1, 2):  # the copies, as a user makes them (stage 3 reads stage 2's data)
            copies(str(d), [f"--stage={n}"])
    finally:
        server.shutdown()
    return d


def copies(d, args):
    """`python prepare.py ARGS --out data --hub_dir hub` in d: the local copies data/<name>.jsonl and data/media
    made from the released files under hub/."""
    run([sys.executable, os.path.join(ROOT, "prepare.py"), *args, "--out", "data", "--hub_dir", "hub",
         "--no_progress"], d, [])


def test_every_source_has_a_miniature(tmp_path):
    """Every readers.SOURCES entry gets a miniature in its released schema (tests/miniature.py) that prepare.py
    copies and its reader reads back whole: no row malformed or missing its media. An entry whose reader kind has
    no row maker yet fails here, naming tests/miniature.py."""
    names = sorted(readers.SOURCES)
    server, base = miniature.serve(tmp_path / "www")
    try:
        miniature.build(tmp_path / "hub", names, miniature.Media(tmp_path / "www", base, tmp_path / "data" / "media"))
        copies(str(tmp_path), names)
    finally:
        server.shutdown()
    data = tmp_path / "data"
    for name in names:
        exs, counts = readers.read_dataset(name, str(data / f"{name}.jsonl"), str(data / "media"), log=lambda *a: None)
        assert exs and counts["malformed"] == counts["missing media"] == 0, (name, counts)
    # prepare.py --verify on these copies: all good; then one image cut short and one video that is not a video
    # are each named by their file, and the exit status says so
    import prepare
    assert prepare.main(["--verify", "--out", str(data), "--no_progress"]) == 0
    cap = next(json.loads(l) for l in open(data / "pixmo_cap.jsonl"))
    image = readers.media_path(str(data / "media"), cap["image_url"])
    video = readers.video_path(str(data / "media"), next(json.loads(l) for l in open(data / "molmo2_cap.jsonl"))["video_id"])
    with open(image, "r+b") as f:
        f.truncate(os.path.getsize(image) // 2)
    with open(video, "wb") as f:
        f.write(b"not an mp4")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert prepare.main(["--verify", "--out", str(data), "--no_progress"]) == 1
    broken = [l for l in out.getvalue().splitlines() if l.startswith("BROKEN ")]
    assert any(image in l for l in broken) and any(video in l for l in broken), broken


def test_real_configs_run_end_to_end_on_miniatures(layout, capsys):
    """stage 1 -> 2 -> 3 (torchrun, dp 2 x cp 2, FSDP2) -> hf.py -> transformers: every stage reads every dataset
    of its mixture (no row malformed or missing its media), decodes every image and video it draws, starts from
    where its config says, ends with finite losses (and, with eval_data, scores on its eval sets); the export's
    logits equal ours on an example of the miniature."""
    d, log, report = str(layout), [], []
    train_py = os.path.join(ROOT, "train.py")
    for n in (1, 2, 3):
        launch = [sys.executable, train_py] if n < 3 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", train_py]
        secs = run(launch + [CONFIG[n]] + stage_overrides(n), d, log)
        out = log[-1]
        # every dataset of the mixture read, with no row malformed or missing its media
        for name in set(datasets(config(n), evals=False)):
            assert re.search(rf"dataset {name}: [1-9][0-9]* examples from [0-9]+ rows; skipped 0 malformed, 0 with "
                             rf"missing media", out), (name, out[-3000:])
        assert "skipped an example" not in out, out[-3000:]  # every image and video drawn was decoded
        # each stage starts where the config says: stage 1 from the Qwen3 and SigLIP2 checkpoints, the others from
        # the stage before
        starts = (["LLM initialised from checkpoints/Qwen3-0.6B", "ViT initialised from checkpoints/siglip2-base"]
                  if n == 1 else [f"initialised weights from out/stage{n - 1}/ckpt.pt"])
        assert all(x in out for x in starts), (starts, out[-3000:])
        # the run's own final eval scores the config's eval_data (each set's first example)
        if n == 3:
            assert re.search(r"final eval @ 3 \(1 prompts/task\): pixmo_count_val/count_acc", out), out[-3000:]
            assert "torchrun: 4 processes = dp 2 x cp 2 (ulysses attention), FSDP2, gloo" in out, out[-3000:]
        ls, ck = losses(d, n)
        assert len(ls) == RUN["max_steps"] and all(torch.isfinite(torch.tensor(ls))), ls
        if n == 3:  # the layout config/stage3.py sets, as the run saved it
            c = ck["config"]
            assert (c["cp"], c["cp_mode"], c["fsdp"], c["act_ckpt"]) == (2, "ulysses", True, True), c
        report.append(f"stage {n}: loss {ls[0]:.4f} -> {ls[-1]:.4f} ({len(ls)} steps, {secs:.1f} s)"
                      + (evaluate(d, n) if n == 3 else ""))  # eval.py --data on the last stage's checkpoint
    # the last checkpoint exported as a Hugging Face Molmo2 directory, loaded in transformers: the same logits
    ckpt, hf_dir = os.path.join(d, "out", "stage3", "ckpt.pt"), os.path.join(d, "out", "hf")
    run([sys.executable, os.path.join(ROOT, "hf.py"), ckpt, hf_dir], d, log)
    check_export(ckpt, hf_dir, d)
    with capsys.disabled():
        print("\nrehearsal: " + "; ".join(report))


def evaluate(d, n):
    """Stage n's checkpoint scored on the eval sets its config names (eval_data), as `python eval.py --ckpt CKPT
    --data name=path,...` scores them (in this process: the modules are loaded already): every set gets finite
    metrics in [0, 1]. Returns them as text for the report."""
    import eval as E
    spec = config(n)["eval_data"]
    assert spec, f"config/stage{n}.py names no eval_data"
    metrics, _ = E.main(["--ckpt", os.path.join(d, "out", f"stage{n}", "ckpt.pt"), "--dtype", "float32",
                         "--data", ",".join(f"{k}={os.path.join(d, v)}" for k, v in spec.items()),
                         "--media_root", os.path.join(d, "data", "media"), "--max_examples", "2"])
    for name in spec:
        got = {k: v for k, v in metrics.items() if k.startswith(name + "/")}
        assert got and all(0.0 <= v <= 1.0 for v in got.values()), (name, metrics)
    return "; eval " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items())


def check_export(ckpt, hf_dir, d):
    """transformers' Molmo2 loads the exported directory and gives our logits (within 1e-4, fp32) on a captioning
    example of the miniature (an image and its caption)."""
    import transformers
    import data
    import sample
    model, tok, mc = sample.load_model(ckpt)
    ex = readers.read_dataset("pixmo_cap", os.path.join(d, "data", "pixmo_cap.jsonl"), os.path.join(d, "data", "media"),
                              log=lambda *a: None)[0][0]
    b = data.collate([data.encode_example(ex, tok, mc, {ex["task"]: 1.0})], tok.pad, 10 ** 6)
    with torch.no_grad():
        ref = model.eval().logits(b)[0]
    hf = transformers.Molmo2ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
    ids, n_tok = b["input_ids"], len(b["pool_idx"])
    import model as M
    with torch.no_grad():
        got = hf.eval()(input_ids=ids, attention_mask=b["attention_mask"].long(),
                        pixel_values=M.patchify(data.normalize_pixels(b["pixel_values"][b["image_mask"]]),
                                                mc.patch_size),
                        image_token_pooling=b["pool_idx"], image_grids=torch.tensor([[n_tok, 1, 0, 0]]),
                        mm_token_type_ids=(ids >= mc.base_vocab).long()).logits[0]
    assert ref.shape == got.shape and ref.std() > 0 and (got - ref).abs().max() < 1e-4

"""bench.py: its command line (--help, one-line errors for unknown flags), the synthetic batches of --real (the
structure training's collate gives packed rows: <im_patch> slots for every pooled token, doc ids and positions
restarting per example, labels and loss weights per example), --real end to end on a tiny width, and
--vs_transformers on a tiny shape (its fp32 loss check passes on the same weights and fails on different ones).
Timing figures are printed by bench.py, never asserted here."""
import os
import re
import subprocess
import sys

import pytest
import torch

import bench
import train
from conftest import ROOT, tiny_overrides

# stage configs at tiny widths: the config's structure (tied embeddings, loss_chunk, packing, mixture), small tensors
TINY_REAL = tiny_overrides() + ["--base_vocab=1000", "--n_extra=16"]


def stage_cfg(path, *extra):
    return train.configure([os.path.join(ROOT, path), *TINY_REAL, *extra],
                           {k: getattr(train, k) for k in train.CONFIG_KEYS})


def test_help_prints_usage_and_exits_0():
    r = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Benchmarks and fast-path checks")
    for mode in ("--real", "--vs_transformers", "--plan", "--losses", "--video"):
        assert f"python bench.py {mode}" in r.stdout


@pytest.mark.parametrize("argv, says", [
    (["--real", "config/stage1.py", "--bogus=1"], "bench.py --real: unknown flag --bogus"),
    (["--vs_transformers", "--dtype=float32"], "bench.py --vs_transformers: unknown flag --dtype"),
    (["--vs_transformers", "--precision=fp16"], "--vs_transformers: --precision must be both, fp32 or bf16"),
    (["--steps"], "bench.py: flag '--steps' must look like --key=value"),
    (["--video", "--steps=3"], "bench.py --video: unknown flag --steps; it takes no flags"),
    (["--real", "--vs_transformers"], "one mode at a time"),
    (["--losses", "--steps=2"], "bench.py --losses: unknown flag --steps"),
])
def test_unknown_flags_are_one_line_errors(argv, says):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    msg = str(e.value)
    assert says in msg and "\n" not in msg


def test_stage_configs_pick_images_or_video():
    assert not bench.is_video_stage(stage_cfg("config/stage1.py"))
    assert not bench.is_video_stage(stage_cfg("config/shapes_stage1.py"))
    assert bench.is_video_stage(stage_cfg("config/stage2.py"))
    assert bench.is_video_stage(stage_cfg("config/stage3.py"))


@pytest.mark.parametrize("path, video", [("config/stage1.py", False), ("config/stage2.py", True)],
                         ids=["images", "video"])
def test_synthetic_batch_is_well_formed(path, video):
    """Every <im_patch> slot has one pooled token and every patch of every image is pooled exactly once; rows are
    full and packed (several examples), doc ids count 1, 2, ... along a row, positions restart at 0 per example,
    labels are the next token inside an example (-1 at its end), loss only on text targets; images per row within
    max_images_per_row and one <im_start>/<frame_start> per image or frame; and the model accepts the batch."""
    from model import Molmo2
    max_images = 6
    cfg = stage_cfg(path, f"--max_images_per_row={max_images}")
    mconf = bench.real_model_config(cfg)
    B, T = 3, 384
    b = bench.synthetic_batch(mconf, B, T, max_images, video, cfg["loss_weighting"], key=1)
    ids, V = b["input_ids"], mconf.base_vocab
    assert ids.shape == (B, T) and bool(b["attention_mask"].all())  # packed full
    n_img = int(b["image_mask"].sum())
    P = (mconf.image_size // mconf.patch_size) ** 2
    pool = b["pool_idx"]
    assert pool.shape[1] == (9 if video else 4)  # 3x3 frame windows, 2x2 image windows
    assert int((ids == mconf.im_patch_id).sum()) == pool.shape[0] > 0
    assert torch.equal(pool[pool >= 0].sort().values, torch.arange(n_img * P))
    vid = bench.vision_ids(V)
    opener = vid.frame_start if video else vid.im_start
    n_examples = 0
    for r in range(B):
        n_imgs = int(b["image_mask"][r].sum())
        assert 0 < n_imgs <= max_images and int((ids[r] == opener).sum()) == n_imgs
        doc, pos, lab, w = b["doc_ids"][r], b["position_ids"][r], b["labels"][r], b["loss_weights"][r]
        n_docs = int(doc.max())
        n_examples += n_docs
        assert doc[0] == 1 and bool((doc.diff() >= 0).all()) and bool((doc.diff() <= 1).all())
        for d in range(1, n_docs + 1):
            at = (doc == d).nonzero()[:, 0]
            assert torch.equal(pos[at], torch.arange(len(at)))  # positions restart per example
            assert torch.equal(lab[at[:-1]], ids[r, at[1:]]) and lab[at[-1]] == -1  # next token, none across
            assert bool((w[at] > 0).any())  # every example has answer tokens
        assert bool((lab[w > 0] < V).all()) and bool((lab[w > 0] >= 0).all())  # loss on text targets only
    if video:  # one video a row, then text-only examples
        assert n_img == B * max_images
    assert b["n_examples"] == n_examples > B  # several examples a row
    torch.manual_seed(0)
    ls, ws = Molmo2(mconf)(b)  # the model's own check: as many pooled features as <im_patch> slots
    assert torch.isfinite(ls) and torch.isclose(ws, b["loss_weights"].sum())


@pytest.mark.parametrize("path, extra", [("config/stage1.py", ["--dtype=float32"]),
                                         ("config/stage2.py", ["--act_ckpt=True", "--loss_chunk=16"])],
                         ids=["stage1", "stage2-ckpt-chunked"])
def test_real_runs_and_prints_the_breakdown(capsys, path, extra):
    argv = [os.path.join(ROOT, path), *TINY_REAL, "--batch_size=1", "--seq_len=128", "--max_images_per_row=4", *extra]
    res = bench.real(argv, steps=1)
    out = capsys.readouterr().out
    for line in ("ViT + connector (fwd + bwd)", "embed + LLM blocks (fwd + bwd)", "loss head (fwd + bwd)",
                 "optimizer (clip + AdamW)", "sum of parts", "tok/s", "MFU", "peak memory"):
        assert line in out
    assert ("3x3 pooling" in out) == (path.endswith("stage2.py"))
    assert res["tokens"] == 128 and res["flops"] > 0 and res["mem_bytes"] > 0
    assert len(res["parts_s"]) == 4 and all(v > 0 for v in res["parts_s"].values()) and res["step_s"] > 0
    if path.endswith("stage2.py"):  # the command line reaches the same code; --media overrides the config's
        bench.main(["--real", *argv, "--steps=1", "--media=image"])
        assert "2x2 pooling" in capsys.readouterr().out


TINY_VS = ["--image_size=28", "--patch_size=7", "--vit_width=32", "--vit_depth=3", "--vit_heads=4", "--vit_mlp=64",
           "--d_model=40", "--n_layer=2", "--n_head=4", "--n_kv_head=2", "--head_dim=16", "--d_ff=72",
           "--base_vocab=100", "--batch_size=2", "--seq_len=48", "--steps=1", "--warmup=0"]


def test_vs_transformers_same_weights_same_loss(capsys, monkeypatch):
    res = bench.vs_transformers(TINY_VS)
    out = capsys.readouterr().out
    assert set(res) == {"fp32", "bf16 autocast"} and all(t > 0 for pair in res.values() for t in pair)
    assert "ours vs transformers" in out and "loss fp32" in out
    # the check is not vacuous: one exported weight changed and the fp32 losses no longer agree
    import hf as H
    export = H.export_hf_molmo2

    def altered(model, path, ids):
        with torch.no_grad():
            model.llm.blocks[0].up_gate_proj.weight.mul_(1.5)
        export(model, path, ids)
        with torch.no_grad():
            model.llm.blocks[0].up_gate_proj.weight.div_(1.5)
    monkeypatch.setattr(H, "export_hf_molmo2", altered)
    with pytest.raises(SystemExit, match="the fp32 losses differ"):
        bench.vs_transformers(TINY_VS)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on purpose (CPU)
def test_gpu_checks_cp_kernels_against_the_reference_on_a_cpu(monkeypatch, capsys):
    """bench.py --gpu's kernel part, run here on the CPU (FlexAttention eager, its CPU backward check lifted as
    tests/test_cp.py does): the flex blocks and their gradients equal the fp64 reference, fp32 within 1e-5, bf16
    within its rule; a tolerance too tight for fp32's rounding turns the verdict into a printed FAIL."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda q, k, v: None)
    res = bench.cp_kernels_vs_reference(torch.device("cpu"), L=256, heads=4, kv_heads=2, hd=16)
    assert res[torch.float32][0] < 1e-5 and res[torch.float32][1] and res[torch.bfloat16][1]
    out = capsys.readouterr().out
    assert "PASS cp kernels, flex vs fp64 reference, float32" in out and "PASS cp kernels" in out.split("float32")[-1]
    monkeypatch.setattr(bench, "FP32_TOL", 1e-12)
    res = bench.cp_kernels_vs_reference(torch.device("cpu"), L=256, heads=4, kv_heads=2, hd=16,
                                        dtypes=(torch.float32,))  # the same shapes: nothing new to trace
    assert not res[torch.float32][1] and "FAIL cp kernels, flex vs fp64 reference, float32" in capsys.readouterr().out
    if not torch.cuda.is_available():  # the whole check is for a GPU: on a CPU, one clear line
        with pytest.raises(SystemExit, match="needs a CUDA device"):
            bench.gpu_check()


def test_gpu_plan_only_fits_every_section_on_an_h100(capsys):
    """--gpu --plan_only --card=h100, on this CPU: every section has a predicted peak under 80 GB and under the
    run's limit (GPU_FILL of the card); stage 1 runs its 32 rows with activation checkpointing, because without
    it the planner's figure is over the limit; the exit code is 0 only because all fit."""
    bench.main(["--gpu", "--plan_only", "--card=h100"])
    out = capsys.readouterr().out
    limit = bench.GPU_FILL * bench.CARDS["h100"] / 1e9
    sections = re.findall(r"^== section (\d+)/(\d+): ", out, re.M)
    peaks = [float(x) for x in re.findall(r"^  predicted peak ([\d.]+) GB .*: fits", out, re.M)]
    assert len(sections) == int(sections[0][1]) == len(peaks) == 3
    assert all(0 < p < min(80, limit) for p in peaks), out
    assert "--batch_size=32 --act_ckpt=True" in out
    rejected = re.findall(r"^  does not fit: --batch_size=32 --act_ckpt=False: ([\d.]+) GB", out, re.M)
    assert len(rejected) == 1 and float(rejected[0]) > limit
    assert out.rstrip().endswith("3 of 3 sections fit")


def test_gpu_guard_turns_a_failed_section_into_a_printed_failure(capsys, monkeypatch, tmp_path):
    """Each --gpu section runs under its own guard: an out-of-memory error in one is printed with the section
    and the memory, the next section still runs, a failed check or a section that does not fit counts too, and
    the exit code says not all passed. The whole output is also in docs/gpu_runs/<date>-<device>.txt (here
    under tmp_path, the device faked so gpu_check runs on this CPU)."""
    ran = []

    def oom(settings, figure):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def ok(settings, figure):
        ran.append(settings)
        return [bench.verdict(True, "a check", "measured 0.0")]
    fits = lambda budget: ("ok", 1e9, [])  # noqa: E731
    sections = [bench.Section("raises", fits, oom), bench.Section("after it", fits, ok),
                bench.Section("too big", lambda budget: (None, 2 * budget, ["rows 2: 9 GB"]), ok),
                bench.Section("a failed check", fits, lambda settings, figure: [bench.verdict(False, "x", "y")])]
    assert not bench.run_sections(sections, 80e9)
    out = capsys.readouterr().out
    assert "FAIL section 1/4: raises: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB" in out
    assert "peak process memory" in out.split("section 2/4")[0]  # the memory when it failed
    assert "== PASS section 2/4: after it" in out and ran == ["ok"]
    assert "does not fit: rows 2: 9 GB" in out and "== FAIL section 3/4: too big" in out
    assert "== FAIL section 4/4" in out and out.rstrip().endswith("1 of 4 sections passed; not passed: section 1, 3, 4")
    assert bench.run_sections(sections[1:2], 80e9)

    # the command line: the output teed into the run's file, exit code 1
    fake = {"is_available": lambda: True, "get_device_name": lambda *a: "NVIDIA H100 80GB HBM3",
            "get_device_properties": lambda *a: type("P", (), {"total_memory": 85e9}),
            "reset_peak_memory_stats": lambda *a: None, "empty_cache": lambda: None,
            "max_memory_allocated": lambda *a: 0, "memory_allocated": lambda *a: 0, "memory_reserved": lambda *a: 0,
            "memory_summary": lambda **k: "|  (summary)  |"}
    for k, v in fake.items():
        monkeypatch.setattr(torch.cuda, k, v)
    monkeypatch.setattr(bench, "ROOT", str(tmp_path))
    monkeypatch.setattr(bench, "gpu_sections", lambda L: sections[:2])
    with pytest.raises(SystemExit) as e:
        bench.main(["--gpu"])
    assert e.value.code == 1
    out = capsys.readouterr().out
    files = os.listdir(tmp_path / "docs" / "gpu_runs")
    assert len(files) == 1 and re.fullmatch(r"\d{4}-\d\d-\d\d-NVIDIA_H100_80GB_HBM3\.txt", files[0])
    logged = (tmp_path / "docs" / "gpu_runs" / files[0]).read_text()
    assert "FAIL section 1/2: raises" in logged and "(summary)" in logged and "1 of 2 sections passed" in logged
    assert logged in out  # everything printed is in the file


def test_activation_rates_traced_equal_measured():
    """The planner's activation rates come from forwards under FakeTensorMode (shapes and dtypes, no
    arithmetic): the same bytes as real forwards, here at a tiny width."""
    from model import ModelConfig
    from conftest import TINY
    c = ModelConfig(**TINY, base_vocab=64, n_extra=16, im_patch_id=64)
    fake, real = bench.activation_rates(c), bench.activation_rates(c, fake=False)
    assert fake == real and fake[0] > 0 and fake[1] > 0 and fake[2][4] > 0


def test_losses_names_a_missing_or_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"--losses: checkpoint .*bad.pt is (truncated|corrupt)"):
        bench.losses([str(bad), str(bad)])
    with pytest.raises(SystemExit, match=r"--losses: checkpoint .*none.pt not found"):
        bench.losses([str(tmp_path / "none.pt"), str(bad)])


def test_step_mode_times_both_attentions_and_profiles(capsys):
    """--step on a tiny model: both attention variants timed with an MFU, a profiler line for each, then whole
    training steps in parts (data, forward, backward, optimizer) whose shares add up to the step."""
    bench.main(["--step", "--steps=1", "--batch_size=2", "--seq_len=128", "--attn_tile=32", "--dtype=float32",
                "--vit_pretrain_steps=0"] + tiny_overrides())
    out = capsys.readouterr().out
    assert "attn_tile=0 " in out and "attn_tile=32 " in out and out.count("MFU") == 3  # 2 variants, whole steps
    assert out.count("top operators by self CPU time") == 2
    shares = dict(re.findall(r"(data|forward|backward|optimizer) \d+ ms \((\d+)%\)", out))  # the parts tile the step
    assert set(shares) == {"data", "forward", "backward", "optimizer"}
    assert abs(sum(map(int, shares.values())) - 100) <= 2


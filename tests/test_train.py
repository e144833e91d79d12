"""train.py (configuration, short runs, exact resume, dry run) and sample.py, all in-process on the CPU."""
import math
import os
import re

import pytest
import torch
from PIL import Image

import mixing
import sample
import train
from conftest import TINY, tiny_overrides

DEFAULTS = {k: getattr(train, k) for k in train.CONFIG_KEYS}


def run_args(out_dir, **kw):
    args = dict(batch_size=8, final_eval_prompts=0, eval_interval=100000, dtype="float32", log_interval=1000,
                warmup_steps=5, lr=3e-3, device="cpu")
    args.update(kw)
    return tiny_overrides() + [f"--out_dir={out_dir}"] + [f"--{k}={v}" for k, v in args.items()]


# ---------------------------------------------------------------------------------------------------------
# configuration

def test_configure_overrides_and_types(tmp_path):
    c = train.configure(["--batch_size=3", "--lr=1", "--out_dir=out/x y", "--vit_layers=[-1, -2]",
                         "--dry_run=True", "--mixture={'a': 1.0}"], DEFAULTS)
    assert c["batch_size"] == 3 and c["lr"] == 1.0 and type(c["lr"]) is float  # an int may stand for a float
    assert c["out_dir"] == "out/x y" and c["vit_layers"] == (-1, -2) and c["dry_run"] is True
    assert c["mixture"] == {"a": 1.0}
    assert c["max_steps"] == DEFAULTS["max_steps"]  # untouched keys keep their defaults
    assert DEFAULTS["batch_size"] != 3  # the defaults dict is not modified
    f = tmp_path / "cfg.py"
    f.write_text("batch_size = 5\nlr = 2e-4\n_private = 1\n")
    c = train.configure([str(f), "--lr=0.5"], DEFAULTS)
    assert (c["batch_size"], c["lr"]) == (5, 0.5)  # file first, then the command line


@pytest.mark.parametrize("bad", ["--batch_size=abc", "--lr='x'", "--batch_size=2.5", "--dry_run=1",
                                 "--batch_size=True", "--vit_layers=3"])
def test_configure_type_errors(bad):
    with pytest.raises(SystemExit) as e:
        train.configure([bad], DEFAULTS)
    assert bad.split("=")[0][2:] in str(e.value) and "must be" in str(e.value)


def test_configure_unknown_keys(tmp_path):
    with pytest.raises(SystemExit) as e:
        train.configure(["--batch_sise=4"], DEFAULTS)
    msg = str(e.value)
    assert "batch_sise" in msg and "Valid keys" in msg and "batch_size" in msg and "max_steps" in msg
    f = tmp_path / "bad.py"
    f.write_text("lr = 1e-3\nlearning_rate = 1e-3\n")
    with pytest.raises(SystemExit) as e:
        train.configure([str(f)], DEFAULTS)
    msg = str(e.value)
    assert "learning_rate" in msg and "bad.py" in msg and "Valid keys" in msg and "warmup_steps" in msg
    with pytest.raises(SystemExit, match="key=value"):
        train.configure(["--lr"], DEFAULTS)
    with pytest.raises(SystemExit, match="not found"):
        train.configure([str(tmp_path / "missing.py")], DEFAULTS)


def test_config_files_parse():
    import glob
    files = glob.glob(os.path.join(os.path.dirname(train.__file__), "config", "*.py"))
    assert files  # train.py's docstring runs config/shapes_stage1.py
    for f in files:  # every shipped config uses known keys with the right types
        c = train.configure([f], DEFAULTS)
        assert c["out_dir"].startswith("out/")
        weights, _ = train.mixture_of(type("C", (), c))  # the config's rule, sizes and caps
        assert sum(weights.values()) == pytest.approx(1)


def test_config_keys():
    keys = set(train.CONFIG_KEYS)
    assert {"lr", "batch_size", "max_steps", "stop_at", "mixture", "vit_layers", "dtype"} <= keys
    assert not keys & {"os", "np", "torch", "ast", "math", "nullcontext", "main", "configure"}
    assert set(train.MODEL_KEYS) <= keys


def test_lr_schedule():
    lrs = [train.lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))               # then cosine down
    assert lrs[10] == pytest.approx(1.0) and lrs[55] == pytest.approx(0.55)
    assert train.lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert train.lr_at(500, 1.0, 10, 100, 0.1) == pytest.approx(0.1)     # never below min_lr_frac


def test_dry_run_param_counts():
    out = train.main(["--dry_run=True", "--base_vocab=300", "--n_extra=9", "--device=cpu"] + tiny_overrides())
    counts, m = out["counts"], out["model"]
    assert set(counts) == {"vit", "connector", "llm"} and all(v > 0 for v in counts.values())
    assert sum(counts.values()) == sum(p.numel() for p in m.parameters())
    assert counts["vit"] == sum(p.numel() for p in m.vit.parameters())
    assert m.c.d_model == TINY["d_model"] and m.c.base_vocab == 300 and m.c.im_patch_id == 300
    assert m.llm.embed.weight.shape == (300, TINY["d_model"])
    # LLM: embeddings + head + blocks, by hand
    d, L, f, hd = TINY["d_model"], TINY["n_layer"], TINY["d_ff"], TINY["head_dim"]
    attn = d * hd * (2 * TINY["n_head"] + 2 * TINY["n_kv_head"]) + 2 * hd
    assert counts["llm"] == 2 * 300 * d + L * (attn + 3 * d * f + 2 * d) + d


# ---------------------------------------------------------------------------------------------------------
# short runs

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    res = train.main(run_args(out, max_steps=40))
    return res, str(out)


def test_short_training_lowers_loss(trained):
    res, out = trained
    losses = res["losses"]
    assert len(losses) == 40 and res["steps"] == list(range(1, 41))
    assert all(l == l and l < 1e4 for l in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    assert ck["step"] == 40 and ck["history"]["loss"] == losses
    assert ck["model_config"]["d_model"] == TINY["d_model"] and ck["config"]["max_steps"] == 40
    assert "final" not in res  # final_eval_prompts=0: no final eval


def test_optimizer_groups_and_schedule(trained):
    _, out = trained
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    from model import Molmo2, ModelConfig
    m = Molmo2(ModelConfig(**ck["model_config"]))
    groups = {g["name"]: g for g in ck["optimizer"]["param_groups"]}
    lr, mults = ck["config"]["lr"], {"llm": 1.0, "connector": train.lr_connector_mult, "vit": train.lr_vit_mult}
    assert set(groups) == set(mults) == set(m.param_groups())
    for name, g in groups.items():
        assert g["peak"] == pytest.approx(lr * mults[name])  # Molmo2: connector 10x, ViT 0.3x the LLM's LR
        assert g["lr"] == pytest.approx(train.lr_at(39, g["peak"], 5, 40, 0.1))  # the last step's LR
        assert len(g["params"]) == len(m.param_groups()[name])
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.9, 0.95), 1e-6, 0.0)


def test_eval_cli_on_a_checkpoint(trained, capsys):
    # eval.py on video tasks: their metrics, and the breakdown by how many objects the reference holds
    import eval as ev
    _, out = trained
    metrics, records = ev.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--prompts", "3", "--tasks", "track,point",
                                "--dtype", "float32"])
    assert set(metrics) == {"tracking_f1", "track_id_f1", "pointing_f1"} and len(records) == 6
    kinds = {ev.question_kind(t, q, ref) for t, q, _, ref, _ in records}
    assert all(k.startswith(("track: ", "point: ")) and k.endswith(" objects") for k in kinds)
    assert "tracking_f1" in capsys.readouterr().out


def test_lr_vit_mult_zero_freezes_the_vit(trained, tmp_path):
    # lr_vit_mult=0: no gradients are computed for the ViT (its backward is a third of a stage-2 step), so its
    # weights are the initial ones bit for bit and Adam holds no state for them; the rest trains
    _, src = trained
    init = os.path.join(src, "ckpt.pt")
    train.main(run_args(tmp_path, max_steps=3, lr_vit_mult=0.0, init_from=init))
    before = torch.load(init, map_location="cpu", weights_only=False)
    after = torch.load(os.path.join(tmp_path, "ckpt.pt"), map_location="cpu", weights_only=False)
    vit = [k for k in before["model"] if k.startswith("vit.")]
    assert vit and all(torch.equal(before["model"][k], after["model"][k]) for k in vit)
    assert not torch.equal(before["model"]["llm.embed.weight"], after["model"]["llm.embed.weight"])
    groups = {g["name"]: g["params"] for g in after["optimizer"]["param_groups"]}
    assert groups["vit"] and not any(i in after["optimizer"]["state"] for i in groups["vit"])
    assert all(i in after["optimizer"]["state"] for i in groups["llm"])


def test_sample_from_checkpoint(trained, tmp_path, capsys):
    _, out = trained
    png = tmp_path / "s.png"
    text, points = sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--out", str(png), "--max_new_tokens", "12"])
    assert isinstance(text, str) and isinstance(points, list)
    im = Image.open(png)
    im.load()
    assert im.mode == "RGB" and im.size[0] >= 32 * 10 and im.size[1] > im.size[0]  # scaled up, text below
    assert "answer:" in capsys.readouterr().out
    # an image file and a custom prompt work too
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "red.png")
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--out", str(tmp_path / "t.png"), "--image",
                 str(tmp_path / "red.png"), "--prompt", "What colour?", "--max_new_tokens", "4"])
    assert Image.open(tmp_path / "t.png").size[0] > 0
    with pytest.raises(SystemExit, match="not found"):
        sample.main(["--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "u.png")])


def test_sample_video_writes_an_animation(trained, tmp_path, capsys):
    import numpy as np
    import data
    _, out = trained
    gif = tmp_path / "v.gif"
    text, parsed = sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--video", "shapes", "--out", str(gif),
                                "--max_new_tokens", "8"])
    im = Image.open(gif)
    assert im.is_animated and 6 <= im.n_frames <= 11  # one picture per sampled frame of the held-out video
    assert "saved" in capsys.readouterr().out
    mp4 = str(tmp_path / "c.mp4")
    data.write_video(mp4, [np.full((32, 32, 3), 5 * i, np.uint8) for i in range(45)], fps=30)  # 1.5 s
    sample.main(["--ckpt", os.path.join(out, "ckpt.pt"), "--video", mp4, "--out", str(tmp_path / "c.gif"),
                 "--prompt", "Track the squares.", "--max_new_tokens", "4"])
    assert Image.open(tmp_path / "c.gif").n_frames == 4  # 0, 0.5, 1.0 and the last frame


def test_resume_is_exact(tmp_path):
    # with the shapes configs' optimizer (Muon + AdamW): its momentum travels in the checkpoint as Adam's m and v do
    # (plain AdamW's resume: test_packed_training_resume_is_exact, test_safety, test_loader)
    pre = dict(vit_pretrain_steps=3, vit_pretrain_batch=4, optimizer="muon")  # the ViT phase runs once, before step 1
    a = train.main(run_args(tmp_path / "A", max_steps=12, **pre))["losses"]
    assert len(a) == 12
    b1 = train.main(run_args(tmp_path / "B", max_steps=12, stop_at=6, **pre))
    assert b1["losses"] == a[:6]  # stop_at keeps the 12-step schedule
    ck = torch.load(tmp_path / "B" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 6
    b = train.main(run_args(tmp_path / "B", max_steps=12, init_from="resume", **pre))["losses"]
    assert b == a  # bit-exact in fp32: weights (pretrained ViT included), optimizer, schedule, data order
    ca = torch.load(tmp_path / "A" / "ckpt.pt", map_location="cpu", weights_only=False)
    cb = torch.load(tmp_path / "B" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ca["step"] == cb["step"] == 12
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    with pytest.raises(SystemExit, match="optimizer='muon'; the config sets 'adamw'"):  # its state fits Muon only
        train.main(run_args(tmp_path / "B", max_steps=14, init_from="resume", **dict(pre, optimizer="adamw")))


def test_orthogonalize_is_the_polar_factor():
    # Newton-Schulz's five steps: U S' V^T of g = U S V^T, every S' near 1 (Jordan's quintic: ~[0.7, 1.2]); a tall
    # matrix runs transposed
    from muon import orthogonalize
    torch.manual_seed(0)
    # singular values over two decades: five steps lift the smallest ~480x (a^5), enough from 1e-2 of the largest
    g = torch.randn(48, 160) * torch.logspace(-2, 0, 48)[:, None]
    o = orthogonalize(g)
    U, S, Vh = torch.linalg.svd(g, full_matrices=False)
    s = torch.linalg.svdvals(o)
    assert 0.6 < s.min() and s.max() < 1.25, s
    polar = U @ Vh
    assert torch.nn.functional.cosine_similarity(o.flatten(), polar.flatten(), dim=0) > 0.95
    assert torch.allclose(orthogonalize(g.T), o.T, atol=1e-5)
    assert S[0] / S[-1] > 30 and s.max() / s.min() < 2  # an ill-conditioned g, a near-orthogonal step


def test_muon_groups_and_update(make_cfg):
    # optimizer='muon': the LLM's block matrices take Muon's step (RMS ~0.2 lr, whatever the gradient's size);
    # every other parameter the step plain torch.optim.AdamW gives it, bit for bit
    from model import Molmo2
    torch.manual_seed(0)
    model = Molmo2(make_cfg())
    C = type("C", (), dict(DEFAULTS, optimizer="muon", lr=1e-2, weight_decay=0.1))
    opt, _ = train.make_optimizer(model, C, torch.device("cpu"))
    muon_ps = [p for g in opt.param_groups if g["muon"] for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in muon_ps) == sorted(
        n for n, p in model.named_parameters() if n.startswith("llm.blocks.") and p.ndim == 2)
    assert {g["name"] for g in opt.param_groups} == {"llm", "connector", "vit"}
    ref_model = Molmo2(make_cfg())
    ref_model.load_state_dict(model.state_dict())
    ref, _ = train.make_optimizer(ref_model, type("C", (), dict(vars(C), optimizer="adamw")), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p, q in zip(model.parameters(), ref_model.parameters()):
        p.grad = torch.randn_like(p) * 1e-3
        q.grad = p.grad.clone()
    opt.step()
    ref.step()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if any(p is m for m in muon_ps):
            step = (p - before[n] * (1 - 1e-2 * 0.1)).detach()  # minus the decoupled weight decay
            rms = step.pow(2).mean().sqrt().item()
            assert 0.1 * 1e-2 < rms < 0.3 * 1e-2, (n, rms)  # AdamW's first step would be lr = 1e-2 per entry
        else:
            assert torch.equal(p, q), n
    with pytest.raises(SystemExit, match="fsdp"):
        train.check_config(type("C", (), dict(DEFAULTS, optimizer="muon", fsdp=True)))


def test_vision_pretraining_learns_what_and_where(make_cfg):
    """The vision phase must read the image: on held-out scenes, the pair whose centre lies in a token's window
    is named far above chance (1 in 20), and the centre's position beats the best image-blind guess (the
    median bin, which knows only where centres usually are)."""
    import shapes
    from model import Molmo2
    torch.manual_seed(0)
    model = Molmo2(make_cfg(image_size=64))
    C = type("C", (), dict(DEFAULTS, vit_pretrain_steps=200, vit_pretrain_batch=32, vit_pretrain_lr=3e-3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses, stats = train.pretrain_vit(model, C, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    _, [(centre, bins, _)] = shapes.dense_batch(0, 256, 64, model.c.patch_size, [(model.c.pool_h, model.c.pool_w)],
                                                offset=0)  # the held-out scenes pretrain_vit scores on
    b = bins[centre < len(shapes.ATTRIBUTE_PAIRS)].float()  # (n_centres, 2): windows holding a centre
    blind = ((b - b.median(0).values).abs() * 64 / shapes.CENTRE_BINS).mean().item()
    assert stats["centre_acc"] > 0.15, stats  # 3x chance (measured: 0.30; the real config reaches 0.93)
    assert stats["centre_err_px"] < 0.5 * blind, (stats, blind)  # measured: 3.8 px against 12.8
    assert stats["video_centre_acc"] > 0.15, stats  # a video frame's 3x3 windows are taught too (measured: 0.27)
    assert sum(losses[-10:]) < sum(losses[:10])
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"vit", "connector"}, changed  # the LLM is left to stage 1


def test_resume_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        train.main(run_args(tmp_path / "empty", max_steps=2, init_from="resume"))


def _separate(name):
    """The separate matrices that a fused one replaces, in the modules' old order, each with its rows [a, b) of the
    fused tensor (None for any other parameter)."""
    q, kv, f = TINY["n_head"] * TINY["head_dim"], TINY["n_kv_head"] * TINY["head_dim"], TINY["d_ff"]
    if name.endswith("attn.qkv_proj.weight"):
        rows = (("q", 0, q), ("k", q, q + kv), ("v", q + kv, q + 2 * kv))
        return [(name.replace("qkv", x), a, b) for x, a, b in rows]
    if name.endswith("up_gate_proj.weight"):
        return [(name.replace("up_gate", "gate"), f, 2 * f), (name.replace("up_gate", "up"), 0, f)]
    return None


def unfuse_checkpoint(ck):
    """A checkpoint as written before q/k/v and up/gate were fused: those weights and their Adam moments as separate
    tensors, and the optimizer's parameter lists naming them."""
    state = ck["optimizer"]["state"]
    for k in [k for k in ck["model"] if _separate(k)]:
        w, s = ck["model"].pop(k), state.pop(k)
        for n, a, b in _separate(k):
            ck["model"][n] = w[a:b].clone()
            state[n] = dict(s, exp_avg=s["exp_avg"][a:b].clone(), exp_avg_sq=s["exp_avg_sq"][a:b].clone())
    for g in ck["optimizer"]["param_groups"]:
        g["params"] = [n for k in g["params"] for n, _, _ in _separate(k) or [(k, 0, 0)]]
    return ck


def test_unfused_checkpoint_resumes_exactly(tmp_path):
    """A ckpt.pt with separate q/k/v and up/gate matrices (weights and Adam's state) is joined as it is read
    (checkpoint.fuse_projections): resumed, it gives the uninterrupted run's losses and weights, bit for bit."""
    a = train.main(run_args(tmp_path / "A", max_steps=3))["losses"]
    train.main(run_args(tmp_path / "B", max_steps=3, stop_at=2))
    path = tmp_path / "B" / "ckpt.pt"
    torch.save(unfuse_checkpoint(torch.load(path, map_location="cpu", weights_only=False)), path)
    old = torch.load(path, map_location="cpu", weights_only=False)
    assert "llm.blocks.1.attn.v_proj.weight" in old["model"] and "llm.blocks.1.gate_proj.weight" in old["model"]
    assert "llm.blocks.1.up_proj.weight" in old["optimizer"]["state"]
    b = train.main(run_args(tmp_path / "B", max_steps=3, init_from="resume"))["losses"]
    assert b == a
    ca, cb = (torch.load(tmp_path / x / "ckpt.pt", map_location="cpu", weights_only=False)["model"] for x in "AB")
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


def test_adamw_kernels_agree(make_cfg):
    """train.adamw_kernel: fused on CUDA, foreach on a CPU. torch has the fused kernel for fp32 on a CPU too, so
    its update is checked here against foreach's (the reference) over three steps of the tiny model's parameters."""
    from model import Molmo2
    assert train.adamw_kernel(torch.device("cuda")) == dict(fused=True, foreach=False)
    assert train.adamw_kernel(torch.device("cpu")) == dict(fused=False, foreach=True)
    torch.manual_seed(0)
    ps = [p.detach() for p in Molmo2(make_cfg()).parameters()]
    grads = [[torch.randn_like(p) for p in ps] for _ in range(3)]
    out = []
    for fused in (True, False):
        mine = [p.clone().requires_grad_() for p in ps]
        opt = torch.optim.AdamW(mine, lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, fused=fused,
                                foreach=not fused)
        for gs in grads:
            for p, g in zip(mine, gs):
                p.grad = g
            opt.step()
        out.append(mine)
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(*out))
    assert max((a - p).abs().max() for a, p in zip(out[0], ps)) > 1e-2  # the steps moved the weights


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose backward poisons every gradient."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def poison(monkeypatch, bad_calls):
    """Molmo2.forward with a NaN gradient on the calls in bad_calls (1-based); records the first weight per call."""
    from model import Molmo2
    real, seen = Molmo2.forward, []

    def poisoned(self, batch):
        seen.append(self.llm.embed.weight.detach().clone())
        loss_sum, wsum = real(self, batch)
        return (_NanGrad.apply(loss_sum) if len(seen) in bad_calls else loss_sum), wsum
    monkeypatch.setattr(Molmo2, "forward", poisoned)
    return seen


def test_a_nan_gradient_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    seen = poison(monkeypatch, {3})
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    res = train.main(run_args(tmp_path, max_steps=5))
    assert "step 3: loss" in capsys.readouterr().out and len(res["losses"]) == 5 and len(steps) == 5
    assert all(math.isfinite(l) for l in res["losses"])
    assert torch.equal(seen[2], seen[3])  # the skipped step changed no weight (call 3 bad, call 4 retries step 3)


def test_nan_steps_in_a_row_stop_the_run_at_a_finite_checkpoint(tmp_path, monkeypatch):
    """max_bad_steps non-finite steps in a row stop the run; the message names the checkpoint that exists (written
    at step 2), which loads safely and is finite; Adam stepped only for the good steps."""
    seen = poison(monkeypatch, set(range(3, 100)))
    with pytest.raises(SystemExit, match=r"3 steps in a row .*ckpt.pt \(step 2\)"):
        train.main(run_args(tmp_path, max_steps=10, eval_interval=2, eval_prompts=2, max_bad_steps=3))
    assert all(torch.equal(seen[2], w) for w in seen[3:])  # no bad step was applied
    from checkpoint import load_checkpoint, non_finite
    ck = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert ck["step"] == 2 and not non_finite(ck["model"]) and len(ck["history"]["loss"]) == 2


# ---------------------------------------------------------------------------------------------------------
# the loss does not depend on how the batch is split

def test_gradient_is_invariant_to_micro_batching(tok, cfg):
    """One optimizer step's gradient for 8 examples of different lengths and task weights is the same as 1x8,
    2x4 and 8x1 micro-batches (train.accumulate divides by the global weight sum, not per micro-batch)."""
    import data
    import shapes
    from model import Molmo2
    tw = {"caption": 1.0, "qa": 1.0, "count": 1.5, "point": 2.0, "text": 0.5}
    specs = [("point", 1), ("text", 2), ("caption", 3), ("count", 4), ("qa", 5), ("text", 6), ("point", 7),
             ("caption", 8)]
    encs = [data.encode_example(shapes.make_example(t, s, cfg.image_size, 1 + s % 3), tok, cfg, tw)
            for t, s in specs]
    assert len({len(e["input_ids"]) for e in encs}) >= 7 and len({max(e["loss_weights"]) for e in encs}) == 4
    torch.manual_seed(0)
    model = Molmo2(cfg).float()
    grads = {}
    for n_micro in (1, 2, 8):
        model.zero_grad(set_to_none=True)
        k = 8 // n_micro
        batches = [data.collate(encs[i:i + k], tok.pad, 10 ** 6) for i in range(0, 8, k)]
        loss = train.accumulate(model, batches)
        grads[n_micro] = (loss, torch.cat([p.grad.flatten() for p in model.parameters()]))
    ref_loss, ref = grads[1]
    for n_micro in (2, 8):
        loss, g = grads[n_micro]
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert ((g - ref).norm() / ref.norm()).item() < 1e-6, n_micro
    # the per-micro-batch mean / grad_accum rule (nanoVLM, nanochat) is NOT split-invariant here
    model.zero_grad(set_to_none=True)
    for i in range(0, 8, 1):
        ls, ws = model(data.collate(encs[i:i + 1], tok.pad, 10 ** 6))
        (ls / ws / 8).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert ((naive - ref).norm() / ref.norm()).item() > 1e-2


def test_packed_training_resume_is_exact(tmp_path):
    kw = dict(max_steps=8, packing=True, seq_len=200, batch_size=3, max_images_per_row=3, pack_buffer=8)
    a = train.main(run_args(tmp_path / "A", **kw))["losses"]
    train.main(run_args(tmp_path / "B", stop_at=4, **kw))
    b = train.main(run_args(tmp_path / "B", init_from="resume", **kw))["losses"]
    assert b == a  # the packer's buffer and the sampler's counters travel in the checkpoint
    ck = torch.load(tmp_path / "B" / "ckpt.pt", map_location="cpu", weights_only=False)
    assert ck["streams"][0]["sampler"]["drawn"] > 8 * 3 and 0 < len(ck["streams"][0]["packer"]) <= 8  # more examples than rows


@pytest.mark.parametrize("key,bad", [("mixing_rule", "sqrtt"), ("loss_weighting", "rooot"), ("attn_impl", "flash"),
                                     ("dtype", "bf16"), ("compile_blocks", 2), ("optimizer", "sgd")])
def test_choice_keys_fail_early_naming_the_key(tmp_path, key, bad):
    with pytest.raises(SystemExit, match=rf"'{key}' must be one of .*{bad}"):
        train.main(run_args(tmp_path, max_steps=1, **{key: bad}))
    assert not os.path.exists(tmp_path / "ckpt.pt")  # stopped before any work


@pytest.mark.parametrize("key,bad", [("vit_pretrain_steps", -1), ("vit_pretrain_batch", 0), ("lr_vit_mult", -0.5),
                                     ("lr_connector_mult", -1.0), ("max_minutes", -1.0), ("max_bad_steps", 0),
                                     ("max_broken_frac", -0.1), ("attn_tile", -1)])
def test_bounded_numeric_keys_are_checked(tmp_path, key, bad):
    with pytest.raises(SystemExit, match=rf"'{key}' must be >= .*{bad}"):
        train.main(run_args(tmp_path, max_steps=1, **{key: bad}))


@pytest.mark.parametrize("key", ["absent_rate", "multi_rate"])
def test_shares_are_shares(tmp_path, key):
    with pytest.raises(SystemExit, match=rf"'{key}' must be in \[0, 1\], got 1.5"):
        train.main(run_args(tmp_path, max_steps=1, **{key: 1.5}))


@pytest.mark.parametrize("bad", [{"pointing": 10.0}, {"point": -1.0}, {"point": "10"}])
def test_first_token_mults_name_a_task_and_a_positive_number(tmp_path, bad):
    with pytest.raises(SystemExit, match=r"first_token_mults\[.*keys must be tasks of task_weights"):
        train.main(run_args(tmp_path, max_steps=1, first_token_mults=bad))


def test_sqrt_mixture_with_missing_sizes_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="mixture: .*group 'a'"):
        train.main(run_args(tmp_path, max_steps=1, mixing_rule="sqrt", mixture={"a": (1.0, {"x": 1.0, "y": 1.0})},
                            dataset_sizes={"x": 100}))


def test_eval_tasks_must_be_scorable(tmp_path):
    # caught before training, not at the first eval minutes later
    with pytest.raises(SystemExit, match=r"eval_tasks: \['caption'\] cannot be scored; scored tasks are point"):
        train.main(run_args(tmp_path, max_steps=1, eval_tasks=("track", "caption")))


def test_training_on_local_dataset_copies(tmp_path, capsys):
    """dataset != 'shapes': the mixture's datasets come from local jsonl copies (readers.read_dataset) and train; the
    sqrt rule takes their sizes from the copies; an example longer than a row is skipped and counted, not the end of
    the run; a dataset without a path is a clear error, naming it."""
    import json
    from PIL import Image
    import readers
    media = tmp_path / "media"
    media.mkdir()
    urls = [f"http://img/{i}.jpg" for i in range(4)]
    for i, u in enumerate(urls):
        Image.new("RGB", (40, 30), (60 * i, 90, 30)).save(readers.media_path(str(media), u))
    files = {"pixmo_cap": [dict(image_url=u, caption=f"A picture of shade {i}.") for i, u in enumerate(urls)],
             "pixmo_points": [dict(image_url=u, label="dot", points=[{"x": 4 * i, "y": 5}], collection_method="pointing")
                              for i, u in enumerate(urls)],
             "tulu": [dict(messages=[dict(role="user", content="Hi?"), dict(role="assistant", content="Hello.")])] * 3
             + [dict(messages=[dict(role="user", content="Hi? " * 2000), dict(role="assistant", content="Hello.")])] * 3}
    paths = {}
    for name, rows in files.items():
        paths[name] = str(tmp_path / f"{name}.jsonl")
        open(paths[name], "w").write("\n".join(json.dumps(r) for r in rows) + "\n")
    mix = {"captions": (0.6, {"pixmo_cap": 1.0}), "pointing": (0.3, {"pixmo_points": 1.0}), "text": (0.1, {"tulu": 1.0})}
    args = run_args(tmp_path / "run", max_steps=3, dataset="molmo2", mixture=mix, media_root=str(media),
                    mixing_rule="sqrt", eval_interval=2)
    res = train.main(args + [f"--data_paths={paths!r}", "--max_broken_frac=0.5", "--batch_size=8"])
    assert len(res["losses"]) == 3 and all(x == x and x < 20 for x in res["losses"]) and "final" not in res
    assert re.search(r"skipped an example of tulu: text example of \d+ tokens and 0 images does not fit a row",
                     capsys.readouterr().out)
    with pytest.raises(SystemExit, match=r"data_paths has no local copy for \['tulu'\]"):
        train.main(args + [f"--data_paths={ {k: v for k, v in paths.items() if k != 'tulu'}!r}"])


def test_real_configs_name_their_paths_and_fail_early():
    """config/stage1.py names its Qwen3 and SigLIP2 checkpoints, the tokenizer and the datasets by path; the
    ones missing here are listed together, before the model is built; stage 2 starts from stage 1's checkpoint
    and does not initialise again."""
    with pytest.raises(SystemExit) as e:
        train.main(["config/stage1.py", "--max_steps=1"])
    msg = str(e.value)
    for line in ("init_llm='checkpoints/Qwen3-0.6B'", "init_vit='checkpoints/siglip2-base-patch16-224'",
                 "tokenizer='checkpoints/Qwen3-0.6B/tokenizer.json'", "data_paths['pixmo_cap']='data/pixmo_cap.jsonl'",
                 "data_paths['tulu']", "media_root='data/media'"):
        assert line in msg
    with pytest.raises(SystemExit) as e:
        train.main(["config/stage2.py", "--max_steps=1"])
    assert "init_from='out/stage1/ckpt.pt'" in str(e.value) and "init_llm" not in str(e.value)

"""
Benchmarks and fast-path checks. Timing targets live here, never in tests.

    python bench.py                    # check fast paths against the fp32 CPU reference, then time training
    python bench.py --steps=50 --batch_size=64 --dtype=float32
    python bench.py config/shapes_stage1.py   # any train.py config / overrides pick the model
    python bench.py --video                   # the video frame sampler vs decoding every frame (3-minute mp4)

Checks: the same weights and batch on (cpu fp32 sdpa, the reference) vs cpu bf16 autocast, cpu fp32 FlexAttention
(eager), cuda fp32, cuda bf16, cuda bf16 FlexAttention (compiled): loss, logits and gradients, as max abs
differences. Timing: optimizer steps/s, tokens/s, MFU, peak memory,
and the share of the step spent making data.
"""
import sys
import time

import torch

import train


def build(argv):
    import data
    from model import Molmo2, ModelConfig
    cfg = train.configure([a for a in argv if not a.startswith(("--steps=",))],
                          {k: getattr(train, k) for k in train.CONFIG_KEYS})
    tok = data.build_tokenizer(cfg["tokenizer"])
    mc = {k: cfg[k] for k in train.MODEL_KEYS}
    mc.update(base_vocab=tok.base_vocab, n_extra=tok.n_extra, im_patch_id=tok.im_patch)
    mconf = ModelConfig(**mc)
    return cfg, tok, mconf, Molmo2(mconf)


def batch_stream(cfg, tok, mconf):
    """The training loop's own stream (train.batch_source): packed or not, exactly what train.py would see."""
    import mixing
    C = type("Config", (), cfg)
    sampler = mixing.MixtureSampler(*train.mixture_of(C), seed=cfg["seed"])
    return train.batch_source(C, tok, mconf, sampler, torch.device("cpu"))[0]


def run_once(model, batch, dev, dt, attn_impl="sdpa"):
    model.zero_grad(set_to_none=True)
    model.attn_impl = attn_impl
    b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    backward = not (attn_impl == "flex" and dev.type == "cpu")  # FlexAttention has no CPU backward (torch 2.13)
    with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32), torch.set_grad_enabled(backward):
        ls, ws = model(b)
        logits = model.logits(b)
    if not backward:
        return (ls / ws).item(), logits.float().cpu(), None
    (ls / ws).backward()
    grads = torch.cat([p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None])
    return (ls / ws).item(), logits.float().cpu(), grads


def check(cfg, tok, mconf, model):
    """Every fast path against the fp32 CPU reference, on identical weights and data."""
    import copy
    batch = batch_stream(cfg, tok, mconf)()
    ref = run_once(model, batch, torch.device("cpu"), torch.float32)
    paths = [("cpu", torch.bfloat16, "sdpa"), ("cpu", torch.float32, "flex")]
    if torch.cuda.is_available():
        paths += [("cuda", torch.float32, "sdpa"), ("cuda", torch.bfloat16, "sdpa"), ("cuda", torch.bfloat16, "flex")]
    print(f"{'path':<22}{'loss diff':>12}{'logits max|d|':>16}{'grad max|d|':>14}{'grad rel':>10}")
    out = {}
    for d, dt, impl in paths:
        m = copy.deepcopy(model).to(d)
        if d == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
        loss, logits, grads = run_once(m, batch, torch.device(d), dt, impl)
        gmax = (grads - ref[2]).abs().max().item() if grads is not None else float("nan")
        rel = ((grads - ref[2]).norm() / ref[2].norm()).item() if grads is not None else float("nan")
        out[(d, str(dt), impl)] = (abs(loss - ref[0]), (logits - ref[1]).abs().max().item(), rel)
        name = f"{d} {str(dt).split('.')[-1]} {impl}"
        print(f"{name:<22}{abs(loss - ref[0]):>12.2e}{(logits - ref[1]).abs().max().item():>16.2e}"
              f"{gmax:>14.2e}{rel:>10.2e}")
    return out


def speed(cfg, tok, mconf, model, steps):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg["dtype"]]
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    peak = train.peak_flops(dev, dt)
    t_data = t_all = 0.0
    tokens = flops = cells = examples = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    get_batch = batch_stream(cfg, tok, mconf)
    for i in range(steps + 3):
        t0 = time.perf_counter()
        b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in get_batch().items()}
        t1 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            ls, ws = model(b)
        (ls / ws).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        if i >= 3:  # warm-up steps excluded
            t_data += t1 - t0
            t_all += t2 - t0
            tokens += int(b["attention_mask"].sum())
            cells += b["attention_mask"].numel()
            examples += b["n_examples"]
            flops += model.flops(b)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if dev.type == "cuda" else ""
    print(f"{name}, {cfg['dtype']}, batch {cfg['batch_size']}: {steps / t_all:.2f} steps/s, "
          f"{tokens / t_all:,.0f} tok/s ({100 * tokens / cells:.0f}% non-pad), {examples / t_all:.1f} examples/s, "
          f"MFU {100 * flops / t_all / peak:.1f}% of {peak / 1e12:.2f} TFLOP/s, "
          f"data {100 * t_data / t_all:.0f}% of step time{mem}")


def video(seconds=180, fps=30, size=(320, 240)):
    """Molmo2's frame sampler on a 3-minute 30 fps mp4 against decoding every frame, for two key-frame spacings
    (libx264's default 250 frames, and 30 = one a second, common in camera and web video)."""
    import os
    import tempfile
    import numpy as np
    import data
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    frames = [np.roll(base, 4 * i, axis=1) for i in range(seconds * fps)]  # a scrolling picture: real motion
    import platform
    print(f"video sampling, {seconds} s at {fps} fps, {size[0]}x{size[1]}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); "
          f"the sampler converts its frames to RGB, the baseline does not")
    with tempfile.TemporaryDirectory() as tmp:
        for gop in (250, 30):
            path = os.path.join(tmp, f"v{gop}.mp4")
            data.write_video(path, frames, fps=fps, gop=gop)
            t = time.perf_counter()
            import av
            with av.open(path) as c:
                n_all = sum(1 for _ in c.decode(c.streams.video[0]))
            t_all = time.perf_counter() - t
            print(f"  key frame every {gop} frames: decoding every frame (no RGB conversion): {n_all} frames in "
                  f"{t_all:.2f} s ({n_all / t_all:,.0f} frames/s)")
            for max_frames in (384, 128):
                for mode in ("sequential", "seek"):
                    t = time.perf_counter()
                    got, _ = data.load_video(path, max_frames, mode=mode)
                    dt = time.perf_counter() - t
                    print(f"    max_frames {max_frames:3d}, {mode:<10}: {len(got)} frames in {dt:.2f} s "
                          f"({len(got) / dt:,.0f} sampled frames/s; "
                          f"{dt / t_all:.2f}x the time of decoding every frame)")


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--video" in argv:
        video()
        sys.exit(0)
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("--steps=")), 20)
    cfg, tok, mconf, model = build(argv)
    torch.manual_seed(0)
    check(cfg, tok, mconf, model)
    speed(cfg, tok, mconf, model, steps)

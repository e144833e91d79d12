"""
Benchmarks and fast-path checks. Timing targets live here, never in tests.

    python bench.py                    # check fast paths against the fp32 CPU reference, then time training
    python bench.py --steps=50 --batch_size=64 --dtype=float32
    python bench.py config/shapes_stage1.py   # any train.py config / overrides pick the model

Checks: the same weights and batch on (cpu fp32) vs (cpu bf16 autocast) vs (cuda fp32) vs (cuda bf16):
loss, logits and gradients, as max abs differences. Timing: optimizer steps/s, tokens/s, MFU, peak memory,
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


def batch_for(cfg, tok, mconf, step=0):
    import data
    import mixing
    import shapes
    sampler = mixing.MixtureSampler(mixing.mixture_weights(cfg["mixture"]), seed=cfg["seed"])
    encs = [data.encode_example(shapes.make_example(t, shapes.TRAIN_SEED_OFFSET + i, mconf.image_size,
                                                    cfg["turns_per_image"]), tok, mconf,
                                cfg["task_weights"]) for t, i in sampler.batch(cfg["batch_size"], step)]
    return data.collate(encs, tok.pad, cfg["seq_len"])


def run_once(model, batch, dev, dt):
    model.zero_grad(set_to_none=True)
    b = {k: v.to(dev) for k, v in batch.items()}
    with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
        ls, ws = model(b)
        logits = model.logits(b)
    (ls / ws).backward()
    grads = torch.cat([p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None])
    return (ls / ws).item(), logits.float().cpu(), grads


def check(cfg, tok, mconf, model):
    """Every fast path against the fp32 CPU reference, on identical weights and data."""
    import copy
    batch = batch_for(cfg, tok, mconf)
    ref = run_once(model, batch, torch.device("cpu"), torch.float32)
    paths = [("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        paths += [("cuda", torch.float32), ("cuda", torch.bfloat16)]
    print(f"{'path':<16}{'loss diff':>12}{'logits max|d|':>16}{'grad max|d|':>14}{'grad rel':>10}")
    out = {}
    for d, dt in paths:
        m = copy.deepcopy(model).to(d)
        if d == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
        loss, logits, grads = run_once(m, batch, torch.device(d), dt)
        rel = ((grads - ref[2]).norm() / ref[2].norm()).item()
        out[(d, str(dt))] = (abs(loss - ref[0]), (logits - ref[1]).abs().max().item(), rel)
        print(f"{d + ' ' + str(dt).split('.')[-1]:<16}{abs(loss - ref[0]):>12.2e}{(logits - ref[1]).abs().max().item():>16.2e}"
              f"{(grads - ref[2]).abs().max().item():>14.2e}{rel:>10.2e}")
    return out


def speed(cfg, tok, mconf, model, steps):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg["dtype"]]
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    peak = train.peak_flops(dev, dt)
    t_data = t_all = 0.0
    tokens = flops = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        t0 = time.perf_counter()
        b = {k: v.to(dev) for k, v in batch_for(cfg, tok, mconf, i).items()}
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
            flops += model.flops(b)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if dev.type == "cuda" else ""
    print(f"{name}, {cfg['dtype']}, batch {cfg['batch_size']}: {steps / t_all:.2f} steps/s, "
          f"{tokens / t_all:,.0f} tok/s, MFU {100 * flops / t_all / peak:.1f}% of {peak / 1e12:.2f} TFLOP/s, "
          f"data {100 * t_data / t_all:.0f}% of step time{mem}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("--steps=")), 20)
    cfg, tok, mconf, model = build(argv)
    torch.manual_seed(0)
    check(cfg, tok, mconf, model)
    speed(cfg, tok, mconf, model, steps)

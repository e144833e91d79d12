"""
Benchmarks and fast-path checks. Timing targets live here, never in tests.

    python bench.py                    # check fast paths against the fp32 CPU reference, then time training
    python bench.py --steps=50 --batch_size=64 --dtype=float32
    python bench.py config/shapes_stage1.py   # any train.py config / overrides pick the model
    python bench.py --video                   # the video frame sampler vs decoding every frame (3-minute mp4)
    python bench.py --plan                    # per-GPU memory of stages 1-3 (real configs) over GPU layouts
    python bench.py --plan config/stage3.py --dp=2 --cp=4 --fsdp=True --act_ckpt=True   # one layout
    python bench.py --losses out/a/ckpt.pt out/b/ckpt.pt [--n=10]   # two runs' first losses, side by side

Checks: the same weights and batch on (cpu fp32 sdpa, the reference) vs cpu bf16 autocast, cpu fp32 FlexAttention
(eager), cuda fp32, cuda bf16, cuda bf16 FlexAttention (compiled): loss, logits and gradients, as max abs
differences. Timing: optimizer steps/s, tokens/s, MFU, peak memory,
and the share of the step spent making data.
"""
import os
import sys
import time

import torch

import train


def build(argv):
    import data
    from model import Molmo2, ModelConfig
    cfg = train.configure([a for a in argv if not a.startswith(("--steps=",))],
                          {k: getattr(train, k) for k in train.CONFIG_KEYS})
    tok = data.build_tokenizer(cfg["tokenizer"], base_vocab=cfg["base_vocab"] or None)  # as train.py builds it
    mc = {k: cfg[k] for k in train.MODEL_KEYS}
    mc.update(base_vocab=tok.base_vocab, n_extra=max(cfg["n_extra"], tok.n_extra), im_patch_id=tok.im_patch)
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


# ---------------------------------------------------------------------------------------------------------
# memory planner: the seed's per-GPU memory table, from our model's real counts

def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for the backward while fn runs (each storage counted once): the
    activation memory of that forward, measured rather than guessed."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        st = t.untyped_storage()
        if st.data_ptr() not in seen:  # views of one tensor share its storage
            seen.add(st.data_ptr())
            total += st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def activation_rates(mconf):
    """Measured on this CPU at the config's real widths, bf16 autocast as in training, by saved_tensors_hooks:
    bytes per token per LLM block (a causal block, whose kernel keeps no T x T matrix, like flash-attn on GPU and
    the CP kernels), bytes per image through the ViT, and per pooled token through the connector. Each is the
    slope between two sizes, so the weights' bf16 copies (constant in size) drop out."""
    from model import Block, Connector, ViT
    torch.manual_seed(0)
    c = mconf
    blk, vit, conn = Block(c), ViT(c), Connector(c)
    g = c.image_size // c.patch_size
    cin = len(c.vit_layers) * c.vit_width

    def llm(t):
        x = torch.randn(1, t, c.d_model, requires_grad=True)
        pos = torch.arange(t)[None]
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2) / c.head_dim))
        ang = torch.cat([pos[..., None] * inv] * 2, -1)[:, None]
        return lambda: blk(x, ang.cos(), ang.sin(), None)

    def img(n):
        px = torch.randn(n, 3, c.image_size, c.image_size)
        return lambda: vit(px)

    def pooled(n, k):
        feats = torch.randn(n * g * g, cin, requires_grad=True)
        idx = torch.randint(0, n * g * g, (n * 64, k))
        return lambda: conn(feats, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_tok = (_saved_bytes(llm(256)) - _saved_bytes(llm(128))) / 128
        per_img = _saved_bytes(img(2)) - _saved_bytes(img(1))
        per_pool = {k: (_saved_bytes(pooled(2, k)) - _saved_bytes(pooled(1, k))) / 64 for k in (4, 9)}
    return per_tok, per_img, per_pool


# The seed's table (shared/seed, "Per-GPU Memory Usage"), in GB: params, optimizer, grads, activations, visual, total
SEED_MEMORY = {1: (2.4, 7.2, 2.4, 15, 8, 35), 2: (2.4, 7.2, 2.4, 12, 20, 44), 3: (2.4, 7.2, 2.4, 25, 45, 84)}


def plan(argv):
    """python bench.py --plan [config] [--dp= --cp= --fsdp= --act_ckpt= --loss_frac=]: per-GPU memory (GB) of a
    stage: parameters (fp32 master weights), AdamW state (fp32 m and v), gradients (fp32), LLM activations,
    visual (pixels, ViT and connector activations), and the logits of the loss tokens. FSDP2 divides the first
    three by every rank (dp x cp); context parallelism divides the LLM's tokens by cp; activation checkpointing
    keeps one block's input per layer (fp32, 4 bytes x d_model a token) plus one block's activations, recomputed,
    in the LLM and in the ViT (a frozen ViT keeps only its output features).
    Every cp rank encodes all the micro-batch's images (model.py: the ViT is not split over the cp group), so the
    visual share does not shrink with cp. Without a config: the three real configs over a few 8-GPU layouts."""
    from model import Molmo2, ModelConfig
    import ast
    kinds = {"dp": int, "cp": int, "fsdp": bool, "act_ckpt": bool, "loss_frac": float}  # the planner's own flags
    opts, rest = {"dp": None, "cp": None, "fsdp": None, "act_ckpt": None, "loss_frac": 0.25}, []
    for a in argv:
        key, _, val = a[2:].partition("=") if a.startswith("--") else (None, "", "")
        if key not in kinds:
            rest.append(a)  # a config file or a train.py --key=value
            continue
        try:
            v = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            v = None
        if not isinstance(v, kinds[key]) and not (kinds[key] is float and type(v) is int):
            raise SystemExit(f"--plan: --{key} must be {kinds[key].__name__}, got {val!r}")
        opts[key] = v
    configs = [a for a in rest if not a.startswith("--")] or ["config/stage1.py", "config/stage2.py",
                                                               "config/stage3.py"]
    flags = [a for a in rest if a.startswith("--")]
    for path in configs:
        cfg = train.configure([path, *flags, "--init_from=scratch"], {k: getattr(train, k) for k in train.CONFIG_KEYS})
        mc = {k: cfg[k] for k in train.MODEL_KEYS}
        mc["im_patch_id"] = mc["base_vocab"]
        c = ModelConfig(**mc)
        with torch.device("meta"):
            counts = Molmo2(c).param_counts()
        n_all = sum(counts.values())
        n_train = n_all - (counts["vit"] if cfg["lr_vit_mult"] == 0 else 0)
        per_tok, per_img, per_pool = activation_rates(c)
        stage = int(os.path.basename(path).replace("stage", "")[0]) if "stage" in os.path.basename(path) else 0
        video = stage >= 2
        imgs = cfg["batch_size"] * (cfg["max_images_per_row"] if cfg["packing"] else 1)  # worst case per micro-batch
        g = c.image_size // c.patch_size
        ph, pw = (c.video_pool_h, c.video_pool_w) if video else (c.pool_h, c.pool_w)
        pooled = imgs * (-(-g // ph)) * (-(-g // pw))
        tokens = cfg["batch_size"] * cfg["seq_len"]
        print(f"\n{path}: {n_all / 1e9:.3f}B parameters ({n_train / 1e9:.3f}B trained), micro-batch {cfg['batch_size']} "
              f"x {tokens // cfg['batch_size']:,} tokens, {imgs:,} {'frames' if video else 'images'} at "
              f"{c.image_size} px (worst case); measured: {per_tok / 1e3:.1f} kB per token per LLM block, "
              f"{per_img / 1e6:.1f} MB per image in the ViT, {per_pool[ph * pw] / 1e3:.1f} kB per pooled token; "
              f"logits kept for {opts['loss_frac']:.0%} of the tokens (--loss_frac)"
              + (f", {cfg['loss_chunk']:,} at a time (loss_chunk)" if cfg["loss_chunk"] else ""))
        layouts = [(opts["dp"] or 8 // (opts["cp"] or 1), opts["cp"] or 1, bool(opts["fsdp"]), bool(opts["act_ckpt"]))] \
            if any(opts[k] is not None for k in ("dp", "cp", "fsdp", "act_ckpt")) else \
            [(8, 1, False, False), (8, 1, True, False), (8, 1, True, True), (4, 2, True, True), (2, 4, True, True),
             (1, 8, True, True)]
        print(f"  {'dp x cp':>8} {'FSDP':>5} {'ckpt':>5} | {'params':>7} {'Adam':>7} {'grads':>7} {'LLM act':>8} "
              f"{'visual':>7} {'logits':>7} | {'total GB':>8}")
        for dp, cp, fsdp, ckpt in layouts:
            shard = dp * cp if fsdp else 1
            params, adam, grads = 4 * n_all / shard, 8 * n_train / shard, 4 * n_train / shard
            t = tokens / cp
            act = (c.n_layer * 4 * c.d_model + per_tok) * t if ckpt else c.n_layer * per_tok * t
            if cfg["lr_vit_mult"] == 0:  # frozen: no graph, only the output features (bf16) stay
                vit_act = imgs * g * g * len(c.vit_layers) * c.vit_width * 2
            elif ckpt:  # each block's input (fp32), and one block's activations at a time, recomputed
                vit_act = imgs * (g * g * c.vit_width * 4 * c.vit_built + per_img / c.vit_built)
            else:
                vit_act = per_img * imgs
            visual = imgs * 3 * c.image_size ** 2 * 4 + vit_act + per_pool[ph * pw] * pooled
            n_logits = opts["loss_frac"] * t if not cfg["loss_chunk"] else min(opts["loss_frac"] * t, cfg["loss_chunk"])
            logits = n_logits * (c.base_vocab + c.n_extra) * (2 + 4 + 4)  # bf16, fp32, its grad (one chunk's)
            row = [params, adam, grads, act, visual, logits]
            print(f"  {dp:>3} x {cp:<2} {str(fsdp):>5} {str(ckpt):>5} | " + " ".join(f"{v / 1e9:7.1f}" for v in row[:3])
                  + f" {row[3] / 1e9:8.1f} " + " ".join(f"{v / 1e9:7.1f}" for v in row[4:]) + f" | {sum(row) / 1e9:8.1f}")
        if stage in SEED_MEMORY:
            print(f"  the seed's table (stage {stage}), GB: params {SEED_MEMORY[stage][0]}, optimizer "
                  f"{SEED_MEMORY[stage][1]}, grads {SEED_MEMORY[stage][2]}, activations {SEED_MEMORY[stage][3]}, "
                  f"visual {SEED_MEMORY[stage][4]}, total {SEED_MEMORY[stage][5]}")


def losses(argv):
    """The first n training losses of two checkpoints' runs and their largest difference: a torchrun run against
    the one-process run of the same batches (README "Stage 3 and scale-out")."""
    n = next((int(a.split("=")[1]) for a in argv if a.startswith("--n=")), 10)
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 2:
        raise SystemExit("--losses needs two checkpoint paths")
    runs = []
    for p in paths:
        if not os.path.exists(p):
            raise SystemExit(f"--losses: checkpoint {p} not found")
        runs.append(torch.load(p, map_location="cpu", weights_only=False)["history"]["loss"][:n])
    if min(len(r) for r in runs) < n:
        raise SystemExit(f"--losses: the runs have {[len(r) for r in runs]} steps, fewer than --n={n}")
    for i, (a, b) in enumerate(zip(*runs)):
        print(f"step {i + 1:3d}: {a:.7f} {b:.7f}  |diff| {abs(a - b):.1e}")
    print(f"max |diff| over the first {n} losses: {max(abs(a - b) for a, b in zip(*runs)):.1e}")


if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--losses" in argv:
        losses([a for a in argv if a != "--losses"])
        sys.exit(0)
    if "--video" in argv:
        video()
        sys.exit(0)
    if "--plan" in argv:
        plan([a for a in argv if a != "--plan"])
        sys.exit(0)
    steps = next((int(a.split("=")[1]) for a in argv if a.startswith("--steps=")), 20)
    cfg, tok, mconf, model = build(argv)
    torch.manual_seed(0)
    check(cfg, tok, mconf, model)
    speed(cfg, tok, mconf, model, steps)

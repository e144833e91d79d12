"""
Benchmarks and fast-path checks. Timing targets live here, never in tests.

    python bench.py                    # check fast paths against the fp32 CPU reference, then time training
    python bench.py --steps=50 --batch_size=64 --dtype=float32
    python bench.py config/shapes_stage1.py   # any train.py config / overrides pick the model
    python bench.py --real config/stage1.py [--steps=N --media=image|video --batch_size=B --seq_len=T ...]
                                              # a stage's real-width model on synthetic batches of its shape:
                                              # step time, tok/s, MFU, peak memory, and the step's parts
    python bench.py --real config/stage1.py --steps=1 --batch_size=1 --seq_len=512   # reduced, for a CPU
    python bench.py --vs_transformers [--steps=3 --warmup=1 --batch_size=8 --seq_len=512 --d_model=384 ...
                                       --precision=both|fp32|bf16]
                                              # the same weights and batch through transformers' Molmo2 and ours:
                                              # equal losses, then training steps timed side by side
    python bench.py --step config/shapes_stage1.py [--steps=6 --with_compile=True --dtype=float32]
                                              # a CPU step: the full T x T attention against attn_tile's, (and
                                              # compiled), interleaved, MFU, and the profiler's top operators;
                                              # then whole training steps in parts: data, forward, backward,
                                              # optimizer
    python bench.py --video                   # the video frame sampler vs decoding every frame (3-minute mp4)
    python bench.py --plan                    # per-GPU memory of stages 1-3 (real configs) over GPU layouts
    python bench.py --plan config/stage3.py --dp=2 --cp=4 --fsdp=True --act_ckpt=True   # one layout
    python bench.py --losses out/a/ckpt.pt out/b/ckpt.pt [--n=10 --trust_checkpoint=True]   # two runs' losses
    python bench.py --gpu                     # the prepared check for a lent GPU (under 8 minutes): stage 1's real
                                              # shape in bf16, one stage-3 row (36,864 tokens, 384 frames) on one
                                              # GPU, the CUDA FlexAttention cp kernels against the reference; each
                                              # section sized by the planner and run under its own guard; the
                                              # output also in docs/gpu_runs/<date>-<device>.txt; exit code 1 if
                                              # any section failed
    python bench.py --gpu --plan_only [--card=h100|h200]   # on any machine: each section's sizes and predicted
                                              # peak memory for that card, nothing run
    python bench.py --help                    # this text

Flags are --key=value: each mode's own (above) or, where a config is read (the default mode, --real, --plan),
any train.py config key. Anything else is an error.

Checks: the same weights and batch on (cpu fp32 sdpa, the reference) vs cpu bf16 autocast, cpu fp32 FlexAttention
(eager), cuda fp32, cuda bf16, cuda bf16 FlexAttention (compiled): loss, logits and gradients, as max abs
differences. Timing: optimizer steps/s, tokens/s, MFU, peak memory,
and the share of the step spent making data. dtype and attn_impl 'auto' resolve as in training
(machine.resolve_dtype, model.resolve_attn_impl); MFU is against machine.peak_flops in the dtype the step runs in.

--real: random weights, random pixels and token ids, packed rows of the config's seq_len (several examples a
row, doc ids, positions restarting per example, one image per example with its <im_patch> slots, or for a
video stage one video of max_images_per_row frames a row, 3x3-pooled), so no tokenizer, checkpoint or dataset
is read. The breakdown times ViT + connector, embeddings + LLM blocks, loss head and optimizer each alone.
"""
import os
import sys
import time

import torch

import loader
import machine
import train
from data import normalize_pixels


def build(argv):
    """The default mode's model: argv (a config file and/or --key=value, as train.py takes them) -> (cfg dict,
    tokenizer, ModelConfig, Molmo2 on the CPU with its fresh init). The vocabulary comes from the tokenizer, as
    train.py sizes it, so the batches of batch_stream fit the embedding."""
    from model import Molmo2, ModelConfig
    cfg = train.configure(argv, {k: getattr(train, k) for k in train.CONFIG_KEYS})
    tok = train.make_tokenizer(cfg["tokenizer"], base_vocab=cfg["base_vocab"] or None)  # as train.py builds it
    mc = {k: cfg[k] for k in train.MODEL_KEYS}
    mc.update(base_vocab=tok.base_vocab, n_extra=max(cfg["n_extra"], tok.n_extra), im_patch_id=tok.im_patch)
    mconf = ModelConfig(**mc)
    return cfg, tok, mconf, Molmo2(mconf)


def batch_stream(cfg, tok, mconf):
    """The training loop's own stream (loader.TrainingStream): packed or not, exactly what train.py would see."""
    import mixing
    C = type("Config", (), cfg)
    sampler = mixing.MixtureSampler(*train.mixture_of(C), seed=cfg["seed"])
    return loader.TrainingStream(C, tok, mconf, sampler, torch.device("cpu")).get_batch


def run_once(model, batch, dev, dt, attn_impl="sdpa"):
    """One forward (+ backward) of batch on dev under autocast dt with attention attn_impl -> (loss, logits,
    grads): the weighted mean loss (float), every position's logits (B, T, V) as fp32 on the CPU, and every
    gradient flattened into one fp32 vector in parameters() order (None where no backward runs), so
    two paths compare element by element."""
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
    """Every fast path against the fp32 CPU reference, on identical weights and data. Each path runs a deep copy
    of the model, so all start from the same weights; the figures are the |loss| difference, the largest logit
    difference, the largest gradient difference and the gradient's relative error (norm of the difference over
    the reference's norm). A bf16 path differs by bf16's rounding (8 bits of mantissa), an fp32 path only by the
    order its kernels sum in, so the two kinds of row are read against different scales.
    Returns {(device, dtype, attn_impl[, "compiled"]): (loss diff, logits max diff, grad rel)}."""
    import copy
    batch = batch_stream(cfg, tok, mconf)()
    ref = run_once(model, batch, torch.device("cpu"), torch.float32)
    from model import compile_blocks
    # (device, dtype, attention, compiled: model.compile_blocks through inductor, as training runs it on CUDA)
    paths = [("cpu", torch.bfloat16, "sdpa", False), ("cpu", torch.float32, "flex", False),
             ("cpu", torch.float32, "sdpa", True)]
    if torch.cuda.is_available():
        paths += [("cuda", torch.float32, "sdpa", False), ("cuda", torch.bfloat16, "sdpa", False),
                  ("cuda", torch.bfloat16, "flex", False), ("cuda", torch.bfloat16, "flex", True)]
    print(f"{'path':<31}{'loss diff':>12}{'logits max|d|':>16}{'grad max|d|':>14}{'grad rel':>10}")
    out = {}
    for d, dt, impl, compiled in paths:
        m = copy.deepcopy(model).to(d)
        if compiled:
            compile_blocks(m)
        if d == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
        loss, logits, grads = run_once(m, batch, torch.device(d), dt, impl)
        gmax = (grads - ref[2]).abs().max().item() if grads is not None else float("nan")
        rel = ((grads - ref[2]).norm() / ref[2].norm()).item() if grads is not None else float("nan")
        out[(d, str(dt), impl) + (("compiled",) if compiled else ())] = (
            abs(loss - ref[0]), (logits - ref[1]).abs().max().item(), rel)
        name = f"{d} {str(dt).split('.')[-1]} {impl}" + (" compile_blocks" if compiled else "")
        print(f"{name:<31}{abs(loss - ref[0]):>12.2e}{(logits - ref[1]).abs().max().item():>16.2e}"
              f"{gmax:>14.2e}{rel:>10.2e}")
    return out


def resolve_attn(name, dev):
    """The attention a training step runs: model.resolve_attn_impl ('auto' = flex on CUDA, sdpa on a CPU), with
    'flex' refused on a CPU, where FlexAttention has no backward (torch 2.13). A bad name: a one-line SystemExit."""
    from model import resolve_attn_impl
    try:
        impl = resolve_attn_impl(name, dev.type)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if impl == "flex" and dev.type == "cpu":
        raise SystemExit("attn_impl='flex' cannot train on a CPU (FlexAttention has no CPU backward): use sdpa or auto")
    return impl


def train_dtype(cfg, dev):
    """The autocast dtype of config key dtype on dev, as train.py resolves it (machine.resolve_dtype: 'auto' = bf16 on
    CUDA, on a CPU the faster of bf16 and fp32 here, printed); an unknown name is a one-line SystemExit."""
    try:
        return machine.resolve_dtype(cfg["dtype"], dev)
    except ValueError as e:
        raise SystemExit(f"config key 'dtype': {e}") from None


def sync(dev):
    """Wait for the device's queued kernels, so a wall-clock interval covers the work it names."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def speed(cfg, tok, mconf, model, steps):
    """The default mode's timing: `steps` optimizer steps (after 3 warm-up steps, not counted) on the training
    loop's own stream (batch_stream), the run's optimizer (train.make_optimizer), each step = fetch + move the batch,
    forward, backward, step.
    Unlike --real (best of n), the figures are totals over all the timed steps, so data time is included and
    shown as its share: tok/s counts real (non-pad) tokens, MFU = model.flops of every timed batch over the
    timed seconds, divided by machine.peak_flops in the step's dtype. Prints one line, then the step's parts (data,
    forward, backward, optimizer: each timed to its end, the GPU synchronised between them)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = train_dtype(cfg, dev)  # 'auto' (the default): bf16 on CUDA, the faster of bf16 and fp32 on a CPU
    model = model.to(dev)
    model.attn_impl = resolve_attn(cfg["attn_impl"], dev)
    model.act_ckpt = model.vit.act_ckpt = cfg["act_ckpt"]
    model.loss_chunk = cfg["loss_chunk"]
    model.attn_tile = cfg["attn_tile"]
    C = type("Config", (), cfg)
    train.freeze_vit(model, C)  # the step as it trains: a frozen ViT has no backward
    opt, _ = train.make_optimizer(model, C, dev)  # the run's optimizer (AdamW or Muon)
    peak = machine.peak_flops(dev, dt)  # the peak of the dtype the matmuls run in: MFU is against what it can do
    t_all = 0.0
    parts = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)  # seconds, summed over the timed steps
    tokens = flops = cells = examples = 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    get_batch = batch_stream(cfg, tok, mconf)
    for i in range(steps + 3):  # the first 3: allocator, kernel choice, compilation where FlexAttention runs
        t = [time.perf_counter()]  # the step's part boundaries; each waits for its kernels (sync) on a GPU
        b = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in get_batch().items()}
        t.append(time.perf_counter())
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            ls, ws = model(b)
        sync(dev)
        t.append(time.perf_counter())
        (ls / ws).backward()
        sync(dev)
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(dev)
        t.append(time.perf_counter())
        if i >= 3:  # warm-up steps excluded
            for k, a, z in zip(parts, t, t[1:]):
                parts[k] += z - a
            t_all += t[-1] - t[0]
            tokens += int(b["attention_mask"].sum())
            cells += b["attention_mask"].numel()
            examples += b["n_examples"]
            flops += model.flops(b)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    mem = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if dev.type == "cuda" else ""
    dname = str(dt).split(".")[-1]
    print(f"{name}, {dname}{' (auto)' if cfg['dtype'] == 'auto' else ''}, {model.attn_impl}, "
          f"batch {cfg['batch_size']}: {steps / t_all:.2f} steps/s, "
          f"{tokens / t_all:,.0f} tok/s ({100 * tokens / cells:.0f}% non-pad), {examples / t_all:.1f} examples/s, "
          f"MFU {100 * flops / t_all / peak:.1f}% of {peak / 1e12:.2f} TFLOP/s ({dname}), "
          f"data {100 * parts['data'] / t_all:.0f}% of step time{mem}")
    print("  the step's parts, mean of the timed steps: " + ", ".join(
        f"{k} {1e3 * v / steps:.0f} ms ({100 * v / t_all:.0f}%)" for k, v in parts.items()))


def cpu_step(cfg, tok, mconf, model, steps, with_compile=False):
    """--step: where a training step's time goes on this CPU, and what the fast paths buy. Forward + backward of the
    training stream's batches, with the whole T x T attention (attn_tile=0) against the config's attn_tile
    (model.TiledMask), and with with_compile also compiled (model.compile_blocks; its compilation timed apart),
    interleaved step by step (a shared machine slows every variant alike), best and median of `steps`; MFU =
    model.flops over the measured matmul rate of the dtype. Then torch.profiler's top operators over two steps of
    each attention."""
    from torch.profiler import ProfilerActivity, profile
    dev = torch.device("cpu")
    dt = train_dtype(cfg, dev)
    get_batch = batch_stream(cfg, tok, mconf)
    batches = [get_batch() for _ in range(4)]
    fl = sum(model.flops(b) for b in batches) / len(batches)  # forward + backward, as the model needs them
    variants = {"attn_tile=0": (model, 0), f"attn_tile={cfg['attn_tile']}": (model, cfg["attn_tile"])}

    def step(m, tile, b):
        m.attn_tile = tile
        with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
            ls, ws = m(b)
        (ls / ws).backward()
        m.zero_grad(set_to_none=True)
    if with_compile:  # model.compile_blocks on a copy (the same weights): train.py's compile_blocks=1
        import copy
        from model import compile_blocks
        compiled, t = compile_blocks(copy.deepcopy(model)), time.perf_counter()
        for b in batches[:3]:  # rows and image counts vary: a few shapes to compile for
            step(compiled, cfg["attn_tile"], b)
        print(f"compile_blocks: {time.perf_counter() - t:.0f} s for its first three steps")
        variants[f"attn_tile={cfg['attn_tile']}, compiled"] = (compiled, cfg["attn_tile"])
    times = {k: [] for k in variants}
    for m, tile in variants.values():
        step(m, tile, batches[0])  # warm-up
    for i in range(steps):
        for k, (m, tile) in variants.items():
            t = time.perf_counter()
            step(m, tile, batches[i % len(batches)])
            times[k].append(time.perf_counter() - t)
    peak = machine.matmul_rate(dt)
    print(f"{cpu_name()}, {str(dt).split('.')[-1]}: a {cfg['batch_size']} x {cfg['seq_len']} step, forward + backward, "
          f"{fl / 1e9:.1f} GFLOP; matmul peak {peak / 1e9:.0f} GFLOP/s; best and median of {steps}, interleaved")
    for k, v in times.items():
        best, med = min(v), sorted(v)[len(v) // 2]
        print(f"  {k:<26} best {1e3 * best:6.0f} ms  median {1e3 * med:6.0f} ms  MFU {100 * fl / best / peak:5.1f}%")
    for tile in (0, cfg["attn_tile"]):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for b in batches[1:3]:
                step(model, tile, b)
        ops = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        print(f"  attn_tile={tile}, top operators by self CPU time (two steps): " + ", ".join(
            f"{e.key.replace('aten::', '')} {100 * e.self_cpu_time_total / total:.0f}%" for e in ops[:7]))


def video(seconds=180, fps=30, size=(320, 240)):
    """Molmo2's frame sampler on a 3-minute 30 fps mp4 against decoding every frame, for two key-frame spacings
    (libx264's default 250 frames, and 30 = one a second, common in camera and web video). The video is written
    here (random noise scrolling sideways, so the encoder has real motion to code) and timed three ways: PyAV
    decoding every frame (the floor any reader pays to see all frames), and data.load_video taking max_frames
    frames by decoding in order ('sequential') or by jumping to the key frame at or before a wanted frame where
    that skips frames ('seek'). Seeking pays when key frames are close together and few frames are wanted; each
    line gives its time relative to the floor."""
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
# memory planner: the per-GPU memory of each stage, from our model's real parameter counts and activation
# sizes measured at its real widths, set beside the planning figures of docs/molmo2.md, Stages ("Memory")

def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for the backward while fn runs (each storage counted once): the
    activation memory of that forward, measured rather than guessed. A storage is known by its StorageImpl
    (`_cdata`), which views share, and which fake tensors (activation_rates) have too, where data_ptr is 0."""
    seen, total = set(), 0

    def pack(t):  # called for each tensor autograd saves; the tensor is kept as it is (unpack: identity)
        nonlocal total
        st = t.untyped_storage()
        if st._cdata not in seen:  # views of one tensor share its storage
            seen.add(st._cdata)
            total += st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def activation_rates(mconf, fake=True):
    """Measured at the config's real widths on the CPU, bf16 autocast as in training, by saved_tensors_hooks:
    bytes per token per LLM block (a causal block, whose kernel keeps no T x T matrix, like flash-attn on GPU and
    the CP kernels), bytes per image through the ViT, and per pooled token through the connector. Each is the
    slope between two sizes, so the weights' bf16 copies (constant in size) drop out. fake (the default): the
    forwards run under FakeTensorMode, which runs every op's shape and dtype logic (autocast, the CPU attention
    kernel's choice) without the arithmetic, so autograd saves the same tensors in ~2 s instead of a minute of
    real-width compute (tests/test_bench.py checks the two agree)."""
    import contextlib
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() if fake else contextlib.nullcontext():
        return _activation_rates(mconf)


def _activation_rates(mconf):
    """activation_rates' measurement, in whatever tensor mode the caller set."""
    from model import Block, Connector, ViT
    torch.manual_seed(0)
    c = mconf
    blk, vit, conn = Block(c), ViT(c), Connector(c)
    g = c.image_size // c.patch_size
    cin = len(c.vit_layers) * c.vit_width

    # each maker returns a closure running one forward at a size, so _saved_bytes times only that forward
    def llm(t):  # one LLM block on t tokens, with RoPE's cos / sin built as model.LLM.rope_tables builds them
        x = torch.randn(1, t, c.d_model, requires_grad=True)
        pos = torch.arange(t)[None]
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2) / c.head_dim))
        ang = torch.cat([pos[..., None] * inv] * 2, -1)[:, None]
        return lambda: blk(x, ang.cos(), ang.sin(), None)

    def img(n):
        px = torch.randn(n, 3, c.image_size, c.image_size)
        return lambda: vit(px)

    def pooled(n, k):  # the connector on n images' patch features, 64 pooled tokens an image, k patches each
        feats = torch.randn(n * g * g, cin, requires_grad=True)
        idx = torch.randint(0, n * g * g, (n * 64, k))
        return lambda: conn(feats, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per_tok = (_saved_bytes(llm(256)) - _saved_bytes(llm(128))) / 128
        per_img = _saved_bytes(img(2)) - _saved_bytes(img(1))
        # k = 4: an image's 2x2 pooling windows; k = 9: a video frame's 3x3
        per_pool = {k: (_saved_bytes(pooled(2, k)) - _saved_bytes(pooled(1, k))) / 64 for k in (4, 9)}
    return per_tok, per_img, per_pool


# The planning figures of docs/molmo2.md, Stages ("Memory": per GPU, stage 1 ~35 GB, stage 2 ~44 GB, stage 3
# ~84 GB), by stage, in GB: params, optimizer, grads, activations, visual, total. The last is the total that
# section gives; the first five are the parts those totals were planned from, printed beside the planner's own
# rows so each part can be compared, not only the sum.
SEED_MEMORY = {1: (2.4, 7.2, 2.4, 15, 8, 35), 2: (2.4, 7.2, 2.4, 12, 20, 44), 3: (2.4, 7.2, 2.4, 25, 45, 84)}


def plan(argv):
    """python bench.py --plan [config] [--dp= --cp= --fsdp= --act_ckpt= --loss_frac=]: per-GPU memory (GB) of a
    stage: parameters (fp32 master weights), AdamW state (fp32 m and v), gradients (fp32), LLM activations,
    visual (pixels, ViT and connector activations), and the logits of the loss tokens. FSDP2 divides the first
    three by every rank (dp x cp); context parallelism divides the LLM's tokens by cp; activation checkpointing
    keeps one block's input per layer (fp32, 4 bytes x d_model a token) plus one block's activations, recomputed,
    in the LLM and in the ViT (a frozen ViT keeps only its output features).
    Each cp rank encodes 1/cp of the micro-batch's images (ContextParallel.encode) and holds the features of all of
    them, gathered; the connector runs on every pooled token on every cp rank. Without a config: the three real configs over a few 8-GPU layouts.
    Parameter counts come from the model built on the meta device (no memory); the activation rates from
    activation_rates, measured here on the CPU. Images per micro-batch are the worst case a config allows
    (max_images_per_row per row when packing). Nothing allocator-specific (fragmentation, NCCL buffers, the CUDA
    context) is counted, so a real run's peak sits above these rows."""
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
        s = plan_inputs(path, flags)
        cfg, c = s.cfg, s.c
        print(f"\n{path}: {s.n_all / 1e9:.3f}B parameters ({s.n_train / 1e9:.3f}B trained), micro-batch "
              f"{cfg['batch_size']} x {cfg['seq_len']:,} tokens, {s.imgs:,} {'frames' if s.video else 'images'} at "
              f"{c.image_size} px (worst case); measured: {s.per_tok / 1e3:.1f} kB per token per LLM block, "
              f"{s.per_img / 1e6:.1f} MB per image in the ViT, {s.per_pool[s.k] / 1e3:.1f} kB per pooled token; "
              f"logits kept for {opts['loss_frac']:.0%} of the tokens (--loss_frac)"
              + (f", {cfg['loss_chunk']:,} at a time (loss_chunk)" if cfg["loss_chunk"] else ""))
        # the layouts: the one the flags name (dp by default fills 8 GPUs over cp), or six 8-GPU ones, from plain
        # data parallelism to the whole sequence split over 8 GPUs
        layouts = [(opts["dp"] or 8 // (opts["cp"] or 1), opts["cp"] or 1, bool(opts["fsdp"]), bool(opts["act_ckpt"]))] \
            if any(opts[k] is not None for k in ("dp", "cp", "fsdp", "act_ckpt")) else \
            [(8, 1, False, False), (8, 1, True, False), (8, 1, True, True), (4, 2, True, True), (2, 4, True, True),
             (1, 8, True, True)]
        print(f"  {'dp x cp':>8} {'FSDP':>5} {'ckpt':>5} | {'params':>7} {'Adam':>7} {'grads':>7} {'LLM act':>8} "
              f"{'visual':>7} {'logits':>7} | {'total GB':>8}")
        for dp, cp, fsdp, ckpt in layouts:
            row = plan_parts(s, dp, cp, fsdp, ckpt, opts["loss_frac"])
            print(f"  {dp:>3} x {cp:<2} {str(fsdp):>5} {str(ckpt):>5} | " + " ".join(f"{v / 1e9:7.1f}" for v in row[:3])
                  + f" {row[3] / 1e9:8.1f} " + " ".join(f"{v / 1e9:7.1f}" for v in row[4:]) + f" | {sum(row) / 1e9:8.1f}")
        if s.stage in SEED_MEMORY:  # the planning figures, for comparison with the rows above
            t = SEED_MEMORY[s.stage]
            print(f"  the target table (docs/molmo2.md, stage {s.stage}), GB: params {t[0]}, optimizer {t[1]}, grads "
                  f"{t[2]}, activations {t[3]}, visual {t[4]}, total {t[5]}")


_MEASURED = {}  # (param_counts, activation_rates) by ModelConfig (its repr): --gpu tries several sizes of one model


def plan_inputs(path, flags):
    """What the planner needs of one config (path plus train.py --key=value flags): the config dict (cfg), its
    ModelConfig (c), parameter counts (n_all; n_train, without a frozen ViT) from the model built on the meta
    device, the measured activation rates (per_tok, per_img, per_pool: activation_rates), and the micro-batch's
    shape: stage (from the file name: config/stage2.py -> 2, 0 for other configs), video, imgs (the worst case:
    max_images_per_row a row when packing, else one), pooled (the <im_patch> tokens they make), k (the pooling
    window's size: 2x2 images, 3x3 frames) and tokens (batch_size x seq_len)."""
    import types
    from model import Molmo2, ModelConfig
    cfg = train.configure([path, *flags, "--init_from=scratch"], {k: getattr(train, k) for k in train.CONFIG_KEYS})
    mc = {k: cfg[k] for k in train.MODEL_KEYS}
    mc["im_patch_id"] = mc["base_vocab"]
    c = ModelConfig(**mc)
    if repr(c) not in _MEASURED:
        with torch.device("meta"):
            counts = Molmo2(c).param_counts()
        _MEASURED[repr(c)] = counts, activation_rates(c)
    counts, (per_tok, per_img, per_pool) = _MEASURED[repr(c)]
    n_all = sum(counts.values())
    name = os.path.basename(path)
    stage = int(name.replace("stage", "")[0]) if name.startswith("stage") else 0
    video = stage >= 2
    imgs = cfg["batch_size"] * (cfg["max_images_per_row"] if cfg["packing"] else 1)  # worst case per micro-batch
    g = c.image_size // c.patch_size
    ph, pw = (c.video_pool_h, c.video_pool_w) if video else (c.pool_h, c.pool_w)
    return types.SimpleNamespace(
        cfg=cfg, c=c, n_all=n_all, n_train=n_all - (counts["vit"] if cfg["lr_vit_mult"] == 0 else 0),
        per_tok=per_tok, per_img=per_img, per_pool=per_pool, stage=stage, video=video, imgs=imgs,
        pooled=imgs * (-(-g // ph)) * (-(-g // pw)), k=ph * pw, tokens=cfg["batch_size"] * cfg["seq_len"])


def plan_parts(s, dp, cp, fsdp, ckpt, loss_frac=0.25):
    """One GPU's memory for the config s (plan_inputs) in one layout, in bytes: [params, Adam, grads, LLM
    activations, visual, logits] (plan's docstring says what each holds). Their sum is the planner's figure."""
    c, cfg, imgs = s.c, s.cfg, s.imgs
    g = c.image_size // c.patch_size
    # weights, AdamW's m and v and the gradients are fp32 (4, 8, 4 bytes a parameter; a frozen ViT has no
    # optimizer state or gradients); FSDP2 shards them over every rank
    shard = dp * cp if fsdp else 1
    params, adam, grads = 4 * s.n_all / shard, 8 * s.n_train / shard, 4 * s.n_train / shard
    t = s.tokens / cp  # this rank's share of the micro-batch's tokens
    # LLM activations: every block's saved tensors, or under checkpointing each block's fp32 input plus one
    # block's saved tensors while it is recomputed
    act = (c.n_layer * 4 * c.d_model + s.per_tok) * t if ckpt else c.n_layer * s.per_tok * t
    mine = -(-imgs // cp)  # the images this rank encodes (ContextParallel.encode splits them over the cp ranks)
    feats = imgs * g * g * len(c.vit_layers) * c.vit_width * 2  # the gathered output features (bf16), all images
    if cfg["lr_vit_mult"] == 0:  # frozen: no graph, only the output features stay
        vit_act = feats
    elif ckpt:  # each block's input (fp32), and one block's activations at a time, recomputed
        vit_act = mine * (g * g * c.vit_width * 4 * c.vit_built + s.per_img / c.vit_built) + (cp > 1) * feats
    else:
        vit_act = s.per_img * mine + (cp > 1) * feats
    # the fp32 pixels, the ViT's activations, the connector's per pooled token
    visual = imgs * 3 * c.image_size ** 2 * 4 + vit_act + s.per_pool[s.k] * s.pooled
    # the head (model.LinearCrossEntropy) computes logits for the loss tokens only (loss_frac of them), one
    # loss_chunk at a time if set, in bf16, with their fp32 softmax a block of rows at a time; it keeps the gradient
    # of the hidden states (bf16) and of the output embedding (fp32) from the forward to the backward
    import model as model_module
    n_loss = loss_frac * t
    n_logits = n_loss if not cfg["loss_chunk"] else min(n_loss, cfg["loss_chunk"])
    fp32_rows = min(n_logits, max(1, model_module.LOSS_FP32_ELEMENTS // c.base_vocab))
    logits = n_logits * c.base_vocab * 2 + fp32_rows * c.base_vocab * 4 * 2 + n_loss * c.d_model * 2 \
        + c.base_vocab * c.d_model * 4
    return [params, adam, grads, act, visual, logits]


def losses(argv):
    """The first n training losses of two checkpoints' runs and their largest difference: a torchrun run against
    the one-process run of the same batches, or a run before a change against the same run after it. argv: two
    ckpt.pt paths, an optional --n=N and --trust_checkpoint=True; the losses are the per-step ones train.py keeps
    in the checkpoint's history. The files are read as data only (checkpoint.load_checkpoint), unless
    --trust_checkpoint=True (a checkpoint of yours written before its random states were plain data)."""
    from checkpoint import CheckpointError, load_checkpoint
    n = next((int(a.split("=")[1]) for a in argv if a.startswith("--n=")), 10)
    trust = "--trust_checkpoint=True" in argv
    paths = [a for a in argv if not a.startswith("--")]
    if len(paths) != 2:
        raise SystemExit("--losses needs two checkpoint paths")
    runs = []
    for p in paths:
        if not os.path.exists(p):
            raise SystemExit(f"--losses: checkpoint {p} not found")
        try:
            runs.append(load_checkpoint(p, trust=trust)["history"]["loss"][:n])
        except CheckpointError as e:
            raise SystemExit(f"--losses: {e}") from None
    if min(len(r) for r in runs) < n:
        raise SystemExit(f"--losses: the runs have {[len(r) for r in runs]} steps, fewer than --n={n}")
    for i, (a, b) in enumerate(zip(*runs)):
        print(f"step {i + 1:3d}: {a:.7f} {b:.7f}  |diff| {abs(a - b):.1e}")
    print(f"max |diff| over the first {n} losses: {max(abs(a - b) for a, b in zip(*runs)):.1e}")


# ---------------------------------------------------------------------------------------------------------
# synthetic batches of a stage's real shape: data.collate's tensors, without a tokenizer, media or datasets

MIN_TEXT = 16  # the fewest text tokens (prompt + answer) an example carries


# the batches --real and --vs_transformers time: a stage's shapes (rows, images or frames, pooling, loss tokens)
# with random content, so a run needs no tokenizer, media or dataset, and the same key gives the same batch

def vision_ids(base_vocab):
    """Ids of Molmo2's vision tokens on the extra rows, in data.VISION_TOKENS order as a tokenizer without its own
    vision ids assigns them: <im_patch> = base_vocab, <im_col> = base_vocab + 1, ... (attribute names as
    data.Tokenizer's: im_patch, im_col, im_start, low_res_im_start, im_end, frame_start, frame_end)."""
    import types
    import data
    return types.SimpleNamespace(**{data.TOKEN_ATTRS[t]: base_vocab + i for i, t in enumerate(data.VISION_TOKENS)})


def vision_unit(mconf, ids, video):
    """One image (single crop) or one video frame as the model reads it: (token layout, pool_idx, patches).
    Image: data.image_tokens, <im_start> + rows x (cols <im_patch> [+ <im_col>]) + <im_end>, pool_h x pool_w
    windows. Frame: <frame_start> + rows*cols <im_patch> + <frame_end> (or <im_start>/<im_end> without
    frame_tokens), video_pool_h x video_pool_w windows; its timestamp text is added per frame by the caller.
    pool_idx (rows*cols, k) int64: the patches of this crop (0 .. g*g-1) pooled into each <im_patch>, -1 = pad."""
    import data
    g = mconf.image_size // mconf.patch_size
    if video:
        idx, rows, cols = data.pooling_index(g, g, mconf.video_pool_h, mconf.video_pool_w)
        start, end = (ids.frame_start, ids.frame_end) if mconf.frame_tokens else (ids.im_start, ids.im_end)
        return [start] + [ids.im_patch] * (rows * cols) + [end], idx, g * g
    idx, rows, cols = data.pooling_index(g, g, mconf.pool_h, mconf.pool_w)
    return data.image_tokens(ids, rows, cols, mconf.col_tokens), idx, g * g


TIMESTAMP_TOKENS = 4  # a frame's "{t:.1f} " text before it: digit by digit, e.g. " 1 2 . 5 " -> ~4 tokens


def synthetic_example(mconf, ids, n_vision, video, n_text, weighting, rng, gen):
    """One example in data.encode_example's layout and output keys:
        <bos> [n_vision images or frames] prompt (n_text // 4 tokens) answer (the rest, >= 1 token)
    Token ids are random text ids (< base_vocab) outside the vision layout; pixels are uniform uint8 bytes, as
    encoded images are. labels[t] = input_ids[t + 1] (the last -1); loss_weights[t] > 0 where the target
    input_ids[t + 1] is an answer token: 1.0 each ('task' weighting) or 2/sqrt(answer tokens) ('root')."""
    layout, idx, patches = vision_unit(mconf, ids, video)
    V, H = mconf.base_vocab, mconf.image_size
    vis = []
    for f in range(n_vision):
        if video:  # the frame's timestamp, as text
            vis += torch.randint(0, V, (TIMESTAMP_TOKENS,), generator=gen).tolist()
        vis += layout
    n_prompt = n_text // 4
    n_ans = n_text - n_prompt
    text = torch.randint(0, V, (1 + n_text,), generator=gen).tolist()  # <bos>, prompt, answer
    input_ids = text[:1] + vis + text[1:]
    is_answer = [False] * (1 + len(vis) + n_prompt) + [True] * n_ans
    w = 1.0 if weighting == "task" else 2.0 / n_ans ** 0.5
    labels = input_ids[1:] + [-1]
    loss_w = [w if a else 0.0 for a in is_answer[1:]] + [0.0]
    images = [torch.randint(0, 256, (3, H, H), generator=gen, dtype=torch.uint8) for _ in range(n_vision)]  # bytes
    return dict(input_ids=input_ids, labels=labels, loss_weights=loss_w, images=images, pool_idx=[idx] * n_vision,
                timestamps=[0.5 * f for f in range(n_vision)] if video else [0.0] * n_vision,
                n_patches=[patches] * n_vision, task="synthetic")


def synthetic_row(mconf, seq_len, max_images, video, weighting, rng, gen):
    """One packed row of exactly seq_len tokens, as data.Packer fills one (a list of examples).
    Images: examples of one image and 16 .. seq_len/4 (at most 480) text tokens, while the row's image budget
    (max_images) lasts, then text-only examples. Video: one video of max_images frames (fewer where they would
    not fit), then text-only examples. An example that would leave less room than the smallest one (<bos> and
    MIN_TEXT tokens) takes that room too, so the room left is always 0 or enough for one more example."""
    if seq_len < 2:
        raise SystemExit(f"seq_len={seq_len}: a row needs at least 2 tokens (<bos> and one answer token)")
    ids = vision_ids(mconf.base_vocab)
    layout, _, _ = vision_unit(mconf, ids, video)
    unit = len(layout) + (TIMESTAMP_TOKENS if video else 0)  # tokens of one image / frame
    text_hi = max(MIN_TEXT, min(480, seq_len // 4))
    row, room, left = [], seq_len, max_images
    while room > 0:
        if video:  # the row's one video first, as many frames as fit beside <bos> and MIN_TEXT text tokens
            n_vis = min(left, max(0, (room - 1 - MIN_TEXT) // unit)) if not row else 0
        else:
            n_vis = 1 if left > 0 and room >= 1 + unit + MIN_TEXT else 0
        length = min(room, 1 + n_vis * unit + rng.randint(MIN_TEXT, text_hi))
        if room - length < 1 + MIN_TEXT:  # no room for another example: this one fills the row
            length = room
        n_text = length - 1 - n_vis * unit  # >= MIN_TEXT beside images or frames, >= 1 alone
        row.append(synthetic_example(mconf, ids, n_vis, video, n_text, weighting, rng, gen))
        room, left = room - length, left - n_vis
    return row


def synthetic_batch(mconf, batch_size, seq_len, max_images, video, weighting="task", key=0):
    """batch_size packed rows (synthetic_row), collated by data.collate exactly as training collates them:
    input_ids, labels, loss_weights, attention_mask, doc_ids, position_ids (B, T); pixel_values (B, F, 3, H, W),
    image_mask, timestamps (B, F); pool_idx (N_tok, k) into the batch's patches; plus n_examples."""
    import random
    import data
    rng, gen = random.Random(key), torch.Generator().manual_seed(key)  # key: the same batch every time
    rows = [synthetic_row(mconf, seq_len, max_images, video, weighting, rng, gen) for _ in range(batch_size)]
    b = data.collate(rows, 0, seq_len)
    b["n_examples"] = sum(len(r) for r in rows)
    return b


VIDEO_TASKS = ("video", "track", "subtitle", "molmo2_", "videopoint", "academic_points")


def is_video_stage(cfg):
    """Whether a config trains on video: its mixture names a video dataset or task (shapes' video_* / track /
    subtitle_qa, Molmo2's molmo2_* / videopoint_*)."""
    return any(n.startswith(VIDEO_TASKS) for _, leaves in cfg["mixture"].values() for n in leaves)


def real_model_config(cfg):
    """ModelConfig of a config at its real widths, without its tokenizer: base_vocab from the config (a config
    with base_vocab 0 takes its tokenizer's, which must then be buildable here, as the shapes BPE is), the vision
    tokens on the extra rows (vision_ids), at least as many extra rows as there are vision tokens."""
    import data
    from model import ModelConfig
    mc = {k: cfg[k] for k in train.MODEL_KEYS}
    if not mc["base_vocab"]:
        mc["base_vocab"] = train.make_tokenizer(cfg["tokenizer"]).base_vocab
    mc["n_extra"] = max(mc["n_extra"], len(data.VISION_TOKENS))
    mc["im_patch_id"] = mc["base_vocab"]
    return ModelConfig(**mc)


def timed(fn, n, dev):
    """Wall seconds of fn(): the best of n runs after one warm-up run (allocator, kernel choice, compilation). The
    best, not the mean: another process sharing the machine only ever makes a run slower (on a 2-core machine
    shared with other jobs, runs of one step vary 2x), so the best is the closest to what the code costs. Each run
    is bracketed by sync(dev), so a CUDA run's time is its kernels' time, not the time to queue them."""
    fn()
    best = float("inf")
    for _ in range(n):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def real(argv, steps=3, media="auto"):
    """--real: the stage config's real-width model on synthetic batches of its shape (synthetic_batch), one
    process. Prints step time, tokens/s, MFU (model.flops over machine.peak_flops in the run's dtype), peak memory,
    and the step's parts, each run and timed alone after a warm-up:
      ViT + connector   forward + backward of the vision path on the batch's images, a random output gradient
      embed + LLM       the token embeddings, every block and the final norm (mask and RoPE included), forward +
                        backward with a random gradient on the hidden states (the vision features not added)
      loss head         Molmo2.forward's head on detached hidden states: logits of the loss tokens, weighted CE
                        (chunked as loss_chunk says), backward
      optimizer         gradient clipping + AdamW step (train.adamw_kernel: fused on CUDA)
    Their sum beside the whole step shows what the split leaves out (the vision features' scatter into the
    embeddings, gradient accumulation across parts). Returns a dict of the figures (seconds, FLOP/s, bytes)."""
    import resource
    from model import Molmo2
    cfg = train.configure(argv, {k: getattr(train, k) for k in train.CONFIG_KEYS})
    dev = machine.resolve_device(cfg["device"])
    if cfg["threads"]:  # as train.py: CPU threads for torch
        torch.set_num_threads(cfg["threads"])
    dt = train_dtype(cfg, dev)
    impl = resolve_attn(cfg["attn_impl"], dev)
    if cfg["max_crops"]:
        raise SystemExit("--real builds single-crop images: max_crops must be 0")
    if media not in ("auto", "image", "video"):
        raise SystemExit(f"--media must be image, video or auto; got {media!r}")
    video = is_video_stage(cfg) if media == "auto" else media == "video"
    mconf = real_model_config(cfg)
    torch.manual_seed(cfg["seed"])
    with torch.device(dev):  # initialised where it runs: 0.7B parameters take seconds on a GPU, longer on a CPU
        model = Molmo2(mconf)
    C = type("Config", (), cfg)
    train.freeze_vit(model, C)  # a frozen ViT, as train.py freezes it: no gradients through it
    model.attn_impl = impl
    model.act_ckpt = model.vit.act_ckpt = cfg["act_ckpt"]
    model.loss_chunk = cfg["loss_chunk"]
    opt, _ = train.make_optimizer(model, C, dev)  # train.py's groups, each at its peak LR
    B, T = cfg["batch_size"], cfg["seq_len"]
    b = synthetic_batch(mconf, B, T, cfg["max_images_per_row"], video, cfg["loss_weighting"], cfg["seed"])
    n_examples = b.pop("n_examples")
    b = {k: v.to(dev) for k, v in b.items()}
    # the images (or frames) the ViT encodes, the <im_patch> tokens their pooled features fill, the loss tokens
    n_img, n_tok = int(b["image_mask"].sum()), b["pool_idx"].shape[0]
    n_loss = int((b["loss_weights"] > 0).sum())
    params = sum(p.numel() for p in model.parameters())
    autocast = lambda: torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32)  # noqa: E731
    dname = str(dt).split(".")[-1]
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        f"{cpu_name()}, {torch.get_num_threads()} threads"
    # three header lines: the model and its parameters, the batch's shape, the device and the step's settings
    counts = model.param_counts()
    print(f"{' '.join(a for a in argv if not a.startswith('--')) or 'train.py defaults'} at real width, synthetic "
          f"batches: {params / 1e6:,.1f}M parameters (" + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in counts.items())
          + f"), vocabulary {mconf.base_vocab:,} + {mconf.n_extra}")
    unit = "frames" if video else "images"
    pool = (mconf.video_pool_h, mconf.video_pool_w) if video else (mconf.pool_h, mconf.pool_w)
    print(f"batch {B} x {T:,} tokens, packed: {n_examples} examples, {n_img} {unit} at {mconf.image_size} px "
          f"({pool[0]}x{pool[1]} pooling: {n_tok // max(1, n_img)} <im_patch> each, {n_tok} in all), "
          f"{n_loss:,} loss tokens" + ("" if cfg["packing"] else " (the config does not pack; rows packed here so "
                                        "every token is real)"))
    print(f"{dev_name}: {dname}{' (auto)' if cfg['dtype'] == 'auto' else ''}, attention {impl}, act_ckpt "
          f"{cfg['act_ckpt']}, loss_chunk {cfg['loss_chunk']}, AdamW {'fused' if dev.type == 'cuda' else 'foreach'}"
          + (f"; one process (cp={cfg['cp']}, fsdp={cfg['fsdp']} not used)" if cfg["cp"] > 1 or cfg["fsdp"] else ""))

    def step():  # one training step, as train.py takes it (one micro-batch)
        opt.zero_grad(set_to_none=True)
        with autocast():
            ls, ws = model(b)
        (ls / ws).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()

    # the whole step, best of `steps` after a warm-up; the peak memory is over all of these runs, the warm-up's
    # first AdamW step (which allocates m and v) included
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t_step = timed(step, steps, dev)
    if dev.type == "cuda":
        mem = f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB (max_memory_allocated)"
        mem_bytes = torch.cuda.max_memory_allocated(dev)
    else:  # Linux reports ru_maxrss in KiB
        mem_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem = f"peak memory {mem_bytes / 2 ** 30:.2f} GiB (process max RSS, model build included)"
    # MFU = model FLOPs per second over peak FLOP/s. Numerator: model.flops / step time, the work the step needs
    # (forward + backward: matmuls at 2*m*n*k over the non-pad tokens, attention over the pairs Molmo2's mask
    # allows, the ViT over the images present), not what runs: neither act_ckpt's recomputation nor attention's
    # masked-out pairs are in it. Denominator: machine.peak_flops, the datasheet's dense figure for the dtype on a
    # GPU, the measured matmul rate on a CPU.
    peak = machine.peak_flops(dev, dt)
    flops = model.flops(b)
    tokens = int(b["attention_mask"].sum())  # real tokens: every one, as the synthetic rows are full
    print(f"step {t_step * 1e3:,.0f} ms (best of {steps} after 1 warm-up) | {tokens / t_step:,.0f} tok/s | MFU "
          f"{100 * flops / t_step / peak:.1f}% ({flops / 1e12:.2f} TFLOP a step over {peak / 1e12:.2f} TFLOP/s "
          f"{dname} peak) | {mem}")

    # -- the parts, each alone --------------------------------------------------------------------------------
    # Each part is run and timed by itself (timed: best of `steps` after a warm-up), its inputs and output
    # gradients made up where the step would pass them from another part. So the sum need not equal the step:
    # what joins the parts (the vision features' scatter into the embeddings, the backward from the LLM into the
    # vision path, gradient accumulation) is in no part, each part's best run is picked on its own, and a part
    # alone meets a different allocator and cache state than inside the step.
    def optimizer():  # first, while the last step's gradients are there (the parts below reset them)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
    t_opt = timed(optimizer, steps, dev)

    g = torch.Generator(device=dev).manual_seed(0)
    imgs = normalize_pixels(b["pixel_values"][b["image_mask"]])  # (N_img, 3, H, W): the real images and frames only
    g_tok = torch.randn(n_tok, mconf.d_model, device=dev, generator=g)  # dL/d(pooled features) (N_tok, d_model)

    def vision():  # Molmo2.embed_inputs' vision half: pixels -> ViT features -> pooled, projected tokens
        opt.zero_grad(set_to_none=True)
        with autocast():
            feats = model.vit(imgs)                                     # (N_img, P, len(vit_layers) * vit_width)
            tok = model.connector(feats.flatten(0, 1), b["pool_idx"])  # (N_tok, d_model)
        tok.backward(g_tok.to(tok.dtype))
    t_vis = timed(vision, steps, dev) if n_img else 0.0

    held = {}

    def llm():  # h (B, T, d_model): forward, then backward from a random gradient of that shape
        opt.zero_grad(set_to_none=True)
        # Molmo2.hidden as training runs it (mask, RoPE, blocks under act_ckpt, norm), its embeddings the token
        # table's alone: embed_inputs replaced on this instance for the call
        model.embed_inputs = lambda ids, *a: model.llm.embed_tokens(ids)
        try:
            with autocast():
                h = model.hidden(b)                        # (B, T, d_model)
        finally:
            del model.embed_inputs
        held["h"] = h.detach()
        h.backward(torch.randn(h.shape, device=dev, generator=g, dtype=h.dtype))
    t_llm = timed(llm, steps, dev)

    # the head's input: the last llm() run's hidden states, a leaf, so its backward stops there
    h0 = held.pop("h").requires_grad_()

    def head():
        opt.zero_grad(set_to_none=True)
        h0.grad = None
        model.hidden = lambda batch: h0  # Molmo2.forward from its hidden states on: the loss tokens' head and CE
        try:
            with autocast():
                ls, ws = model(b)
        finally:
            del model.hidden
        (ls / ws).backward()
    t_head = timed(head, steps, dev)
    parts = {"ViT + connector (fwd + bwd)": t_vis, "embed + LLM blocks (fwd + bwd)": t_llm,
             "loss head (fwd + bwd)": t_head, "optimizer (clip + AdamW)": t_opt}
    print(f"breakdown, each part alone (best of {steps} after 1 warm-up):")
    for k, v in parts.items():
        print(f"  {k:<32}{v * 1e3:>10,.0f} ms {100 * v / t_step:>5.0f}% of the step")
    total = sum(parts.values())
    print(f"  {'sum of parts':<32}{total * 1e3:>10,.0f} ms {100 * total / t_step:>5.0f}%   "
          f"whole step {t_step * 1e3:,.0f} ms")
    return dict(step_s=t_step, parts_s=parts, tokens=tokens, flops=flops, peak=peak, mem_bytes=mem_bytes)


def cpu_name():
    """The CPU's model name (/proc/cpuinfo), the vector ISA torch's CPU kernels use, and the machine's load when
    measured: on a shared machine other processes take cores from the run, and wall-clock times grow with them."""
    name = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    return (f"{name} ({torch.backends.cpu.get_cpu_capability()}; load average {os.getloadavg()[0]:.1f} on "
            f"{os.cpu_count()} CPUs)")


# ---------------------------------------------------------------------------------------------------------
# the same model through transformers' Molmo2ForConditionalGeneration and ours

# --vs_transformers' shape: a small Molmo2 (6-layer ViT and LLM, GQA 6 q / 2 kv heads) small enough for a CPU,
# and the batch and timing settings; every key is a --key=value
VS_DEFAULTS = dict(image_size=224, patch_size=14, vit_width=192, vit_depth=6, vit_heads=3, vit_mlp=768,
                   d_model=384, n_layer=6, n_head=6, n_kv_head=2, head_dim=64, d_ff=1024,
                   base_vocab=0,  # 0 = the shapes tokenizer's
                   n_extra=16, batch_size=8, seq_len=512, steps=3, warmup=1, lr=1e-4,
                   precision="both")  # 'both', 'fp32' or 'bf16': an AVX2-only CPU runs bf16 at ~1 GFLOP/s


def randomise(model, key=1):
    """Wide random weights (matrices at std fan_in^-0.5, norm scales near 1, biases small): logits that vary, so
    a wrong weight or mask changes the loss, where the 0.02 init gives near-constant ones any two models match."""
    g = torch.Generator().manual_seed(key)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
            elif "norm" in name or name.endswith(("ln1.weight", "ln2.weight")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def weighted_ce(logits, labels, w):
    """sum(w * CE) / sum(w) over the tokens with w > 0, from full logits (B, T, V) in fp32: the training loss."""
    sel = w > 0
    ce = torch.nn.functional.cross_entropy(logits[sel].float(), labels[sel], reduction="none")
    return (ce * w[sel]).sum() / w[sel].sum()


def vs_transformers(argv):
    """--vs_transformers: one model shape (VS_DEFAULTS, each a --key=value) through transformers'
    Molmo2ForConditionalGeneration and ours with the same weights (ours exported by hf.export_hf_molmo2,
    loaded by from_pretrained) on the same batch: rows of seq_len tokens, one image each, one example a row.
    1. The weighted CE of each model's logits (and ours from Molmo2.forward, the training path) must agree in
       fp32; the differences in fp32 and bf16 autocast are printed.
    2. Training steps interleaved (transformers, ours, transformers, ...): forward, loss, backward, AdamW step
       (torch's AdamW, same settings, on each model's own parameters), in fp32 and in bf16 autocast.
    transformers computes every position's logits (B, T, V) and the loss from them; ours computes the head on
    the loss tokens only (Molmo2.forward), as training does. Each figure is the best step of `steps` (as timed()
    says why); on a CPU the table also gives the best step's process CPU time (all threads), which other processes
    on the machine lengthen less than the wall time. Returns {precision: (theirs s/step, ours s/step)}, wall.""" 
    import tempfile
    import transformers
    import data
    import hf as H
    import model as M
    transformers.utils.logging.disable_progress_bar()  # from_pretrained's loading bar
    cfg = train.configure(argv, VS_DEFAULTS)
    if cfg["precision"] not in ("both", "fp32", "bf16"):
        raise SystemExit(f"--vs_transformers: --precision must be both, fp32 or bf16, got {cfg['precision']!r}")
    base = cfg["base_vocab"] or train.make_tokenizer("shapes-bpe").base_vocab
    mconf = M.ModelConfig(image_size=cfg["image_size"], patch_size=cfg["patch_size"], vit_width=cfg["vit_width"],
                          vit_depth=cfg["vit_depth"], vit_heads=cfg["vit_heads"], vit_mlp=cfg["vit_mlp"],
                          vit_layers=(-1, -3), base_vocab=base, n_extra=max(cfg["n_extra"], len(data.VISION_TOKENS)),
                          im_patch_id=base, d_model=cfg["d_model"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                          n_kv_head=cfg["n_kv_head"], head_dim=cfg["head_dim"], d_ff=cfg["d_ff"])
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    ours = M.Molmo2(mconf)
    randomise(ours)
    ids = vision_ids(base)
    with tempfile.TemporaryDirectory() as d:
        H.export_hf_molmo2(ours, d, {k: getattr(ids, a) for k, a in H.HF_TOKEN_KEYS.items()})
        hf = transformers.Molmo2ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    ours, hf = ours.to(dev), hf.to(dev)
    ours.attn_impl = "sdpa"  # the dense bool mask, as transformers' sdpa path builds one
    ours.attn_tile = train.attn_tile  # as train.py runs it: the dense mask a tile of queries at a time (TiledMask)

    # the batch: one example a row (one image, then text) filling seq_len, so both models see the same positions
    # (0 .. T-1) and the same mask (causal, vision tokens both ways); collated as training collates
    import random
    B, T = cfg["batch_size"], cfg["seq_len"]
    layout, _, _ = vision_unit(mconf, ids, False)
    if T < 2 + len(layout):
        raise SystemExit(f"--vs_transformers: seq_len={T} cannot hold an image ({len(layout)} tokens) and text")
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    # each row one example: <bos>, one image's tokens, then T - 1 - len(layout) text tokens
    rows = [[synthetic_example(mconf, ids, 1, False, T - 1 - len(layout), "task", rng, gen)] for _ in range(B)]
    b = data.collate(rows, 0, T)
    b.pop("n_examples", None)
    b = {k: v.to(dev) for k, v in b.items()}
    g = mconf.image_size // mconf.patch_size
    _, rows_, cols_ = data.pooling_index(g, g, mconf.pool_h, mconf.pool_w)
    n_img = int(b["image_mask"].sum())
    # transformers' inputs for the same batch: its pixel_values are already patchified (N_img, P, 3*p*p) in the
    # (py, px, rgb) order, image_token_pooling is our pool_idx (N_tok, k), and image_grids gives each image's
    # pooled grid (rows, cols; zeros for the crops it does not have), by which the features are split per image
    hf_in = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(),
                 mm_token_type_ids=(b["input_ids"] >= base).long(),  # vision tokens: bidirectional among themselves
                 # (N, P, 3 p p), the bytes normalised as the model normalises them
                 pixel_values=M.patchify(normalize_pixels(b["pixel_values"][b["image_mask"]]), mconf.patch_size),
                 image_token_pooling=b["pool_idx"],
                 image_grids=torch.tensor([[rows_, cols_, 0, 0]] * n_img, device=dev))  # a single crop each
    labels, w = b["labels"], b["loss_weights"]

    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    print(f"{dev_name}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
          f"{transformers.__version__} (attention: {hf.config._attn_implementation}; ours sdpa, dense mask, "
          f"attn_tile {ours.attn_tile})")
    params = sum(p.numel() for p in ours.parameters())
    print(f"model: ViT {mconf.vit_width} x {mconf.vit_built} at {mconf.image_size} px / patch {mconf.patch_size}, "
          f"LLM d {mconf.d_model} x {mconf.n_layer} ({mconf.n_head} q / {mconf.n_kv_head} kv heads of "
          f"{mconf.head_dim}, FFN {mconf.d_ff}), vocabulary {base} + {mconf.n_extra}: {params / 1e6:.1f}M parameters "
          f"(transformers {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M); batch {B} x {T} tokens, one image "
          f"a row ({rows_ * cols_} pooled tokens), {int((w > 0).sum())} loss tokens")

    precisions = [(n, dt) for n, dt, key in (("fp32", torch.float32, "fp32"), ("bf16 autocast", torch.bfloat16, "bf16"))
                  if cfg["precision"] in ("both", key)]
    ac = lambda dt: torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32)  # noqa: E731
    # 1. the losses, in eval mode and without gradients: the same function must give the same number
    ours.eval()
    hf.eval()
    for name, dt in precisions:
        with torch.no_grad(), ac(dt):
            l_hf = weighted_ce(hf(**hf_in).logits, labels, w).item()
            l_ours = weighted_ce(ours.logits(b), labels, w).item()
            ls, ws = ours(b)
            l_train = (ls / ws).item()
        print(f"loss {name:<14} transformers {l_hf:.6f}, ours {l_ours:.6f} (training path {l_train:.6f}): "
              f"|diff| {abs(l_hf - l_ours):.2e} ({abs(l_hf - l_train):.2e})")
        if dt == torch.float32 and max(abs(l_hf - l_ours), abs(l_hf - l_train)) > 1e-4 * max(1.0, abs(l_hf)):
            raise SystemExit("--vs_transformers: the fp32 losses differ: the two models are not the same function")
    ours.train()
    hf.train()

    # 2. timed training steps: one AdamW per model, the same settings (train.py's betas and eps)
    opts = {m: torch.optim.AdamW(m.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-6, weight_decay=0.0)
            for m in (hf, ours)}

    def step(m, dt):  # -> (wall seconds, process CPU seconds)
        opts[m].zero_grad(set_to_none=True)
        sync(dev)
        t, c = time.perf_counter(), time.process_time()
        with ac(dt):
            if m is hf:
                loss = weighted_ce(hf(**hf_in).logits, labels, w)
            else:
                ls, ws = ours(b)
                loss = ls / ws
        loss.backward()
        opts[m].step()
        sync(dev)
        return time.perf_counter() - t, time.process_time() - c

    n, warm = cfg["steps"], cfg["warmup"]
    res = {}
    print(f"training steps (forward + loss + backward + AdamW step), interleaved, best of {n} after {warm} warm-up:")
    cpu = dev.type == "cpu"
    print(f"  {'precision':<14} | {'transformers ms/step (tok/s)':>28} | {'ours ms/step (tok/s)':>26} | "
          f"ours vs transformers" + (" | CPU s/step: transformers, ours (ratio)" if cpu else ""))
    for name, dt in precisions:
        times = {hf: [], ours: []}
        # interleaved, so a slow spell on a shared machine hits both models' steps alike
        for i in range(warm + n):
            for m in (hf, ours):
                t = step(m, dt)
                if i >= warm:
                    times[m].append(t)
        (th, ch), (to, co) = ([min(x) for x in zip(*times[m])] for m in (hf, ours))  # best wall, best CPU
        res[name] = (th, to)
        print(f"  {name:<14} | {th * 1e3:>10,.0f} ({B * T / th:>8,.0f} tok/s) | {to * 1e3:>10,.0f} "
              f"({B * T / to:>8,.0f} tok/s) | {th / to:>8.2f}x the speed"
              + (f"  | {ch:6.2f}, {co:6.2f} ({ch / co:.2f}x)" if cpu else ""))
    return res


# ---------------------------------------------------------------------------------------------------------
# --gpu: the prepared check for a lent GPU, in sections sized by the memory planner, each under its own guard

# The usable bytes of the cards `--gpu --plan_only --card=` plans for: what torch reports as total_memory on an
# H100 80GB HBM3 (79.1 GiB of its 80 GB) and about that of an H200 (of its 141 GB). On a GPU, --gpu takes the
# device's own total_memory instead, unless --card names one.
CARDS = {"h100": 79.1 * 2 ** 30, "h200": 139.8 * 2 ** 30}
GPU_FILL = 0.8   # a section runs only where the planner's figure is at most 80% of the card: the planner's parts
                 # are estimates (they need not peak at once) and it leaves temporaries out (autocast's bf16
                 # weight copies, the loss head's backward beyond one chunk's logits, kernels' workspaces, the
                 # CUDA context, the allocator's fragmentation)
PLAN_TOL = 0.2   # a section's measured peak (max_memory_allocated) within 20% of the planner's figure
FP32_TOL = 1e-5  # the cp kernels in fp32 against the fp64 reference, every tensor
ROOT = os.path.dirname(os.path.abspath(__file__))


class Section:
    """One section of --gpu. plan(budget bytes) -> (settings, figure, tried): the settings the section runs with,
    fitted to the card by the planner (None where nothing fits), the predicted peak in bytes, and the
    alternatives rejected first ("what: N GB" lines). run(settings, figure) -> [bool]: runs it on the GPU and
    returns its checks' verdicts (each printed as PASS/FAIL with its measured error)."""

    def __init__(self, title, plan, run):
        self.title, self.plan, self.run = title, plan, run


def verdict(ok, what, detail):
    """One check's line, PASS or FAIL, with what was measured against what; returns ok."""
    print(f"  {'PASS' if ok else 'FAIL'} {what}: {detail}")
    return ok


def fit_stage(path, fixed, candidates, budget):
    """A stage section's sizes: the first of candidates (lists of train.py --key=value flags, each added to fixed)
    whose planner figure on one GPU (dp 1, cp 1, no FSDP, act_ckpt as the flags say: plan_parts) is at most
    GPU_FILL x budget. Returns (real()'s argv or None where none fits, that figure or the last one tried, the
    rejected candidates as "flags: N GB")."""
    tried = []
    for flags in candidates:
        s = plan_inputs(path, fixed + flags)
        figure = sum(plan_parts(s, 1, 1, False, s.cfg["act_ckpt"]))
        if figure <= GPU_FILL * budget:
            return [path, *fixed, *flags], figure, tried
        tried.append(f"{' '.join(flags)}: {figure / 1e9:.1f} GB")
    return None, figure, tried


def stage_section(title, path, fixed, candidates, steps):
    """A stage's real-width model on synthetic batches (real()), sized by fit_stage: step time, tok/s, the MFU
    of Molmo2.flops over the GPU's bf16 peak, and the step's peak memory checked against the planner's figure."""
    def run(argv, figure):
        res = real(argv, steps=steps)
        print(f"  MFU {100 * res['flops'] / res['step_s'] / res['peak']:.1f}% ({res['flops'] / 1e12:.1f} TFLOP a "
              f"step by Molmo2.flops, {res['step_s'] * 1e3:,.0f} ms, {res['peak'] / 1e12:.0f} TFLOP/s peak)")
        ratio = res["mem_bytes"] / figure
        return [verdict(abs(ratio - 1) <= PLAN_TOL, "peak memory against the planner",
                        f"measured {res['mem_bytes'] / 1e9:.1f} GB (max_memory_allocated over the step), planner "
                        f"{figure / 1e9:.1f} GB: {ratio:.2f}x (target within {PLAN_TOL:.0%})")]
    return Section(title, lambda budget: fit_stage(path, fixed, candidates, budget), run)


def cp_kernels_peak(L, heads):
    """cp_kernels_vs_reference's peak, by hand: the fp64 reference's explicit scores of one (L/2) x (L/2) block,
    [1, heads, L/2, L/2] at 8 bytes, about six of them alive in its backward (S, P, dP, dS and temporaries); the
    flex kernels and the inputs are small beside them."""
    return 6 * heads * (L // 2) ** 2 * 8


def gpu_sections(L=4096, heads=8):
    """The sections of --gpu, in order: (1) stage 1's real shape in bf16 (config/stage1.py: 0.68B parameters,
    4,096-token packed rows), its rows per GPU (32) kept with activation checkpointing or halved until the planner
    says they fit; (2) one stage-3 row (36,864 tokens, 384 frames) on one GPU, cp = 1, activation checkpointing,
    the chunked loss head (halved if it must); (3) the CUDA FlexAttention cp kernels against the reference."""
    s1 = os.path.relpath(os.path.join(ROOT, "config", "stage1.py"))
    s3 = os.path.relpath(os.path.join(ROOT, "config", "stage3.py"))
    cfg1 = train.configure([s1], {k: getattr(train, k) for k in train.CONFIG_KEYS})
    cfg3 = train.configure([s3], {k: getattr(train, k) for k in train.CONFIG_KEYS})
    rows, chunk = cfg1["batch_size"], cfg3["loss_chunk"]
    # stage 1: packed rows as real() builds them (max_images_per_row images a row), so the planner counts them too
    stage1 = [[f"--batch_size={r}", f"--act_ckpt={ck}"] for r in (rows >> i for i in range(rows.bit_length()))
              for ck in (False, True)]
    stage3 = [[f"--loss_chunk={c}"] for c in dict.fromkeys(chunk >> i for i in range(3))]  # 0 (unchunked): once

    def cp_plan(budget):
        figure = cp_kernels_peak(L, heads)
        return (L if figure <= GPU_FILL * budget else None), figure, []

    def cp_run(L, figure):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
        return [ok for _, ok in cp_kernels_vs_reference(torch.device("cuda"), L, heads=heads).values()]
    return [
        stage_section(f"stage 1, real shape ({s1}, bf16, {cfg1['seq_len']:,}-token packed rows)", s1,
                      ["--dtype=bfloat16", "--packing=True"], stage1, steps=3),
        stage_section(f"stage 3, one row of {cfg3['seq_len']:,} tokens and {cfg3['max_images_per_row']} frames, "
                      f"cp = 1, activation checkpointing ({s3}, bf16)", s3,
                      ["--dtype=bfloat16", "--cp=1", "--fsdp=False", "--batch_size=1", "--act_ckpt=True"], stage3,
                      steps=1),
        Section(f"the cp kernels on CUDA: FlexAttention against the fp64 reference ({L:,}-token row)", cp_plan,
                cp_run)]


def memory_report():
    """What memory looked like when a section failed: on CUDA the peak and current allocation and
    torch.cuda.memory_summary(abbreviated=True); on a CPU the process's peak RSS."""
    if torch.cuda.is_available():
        return (f"  max_memory_allocated {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB, memory_allocated "
                f"{torch.cuda.memory_allocated() / 2 ** 30:.2f} GiB, memory_reserved "
                f"{torch.cuda.memory_reserved() / 2 ** 30:.2f} GiB\n" + torch.cuda.memory_summary(abbreviated=True))
    import resource
    return f"  peak process memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (max RSS)"


def guarded(i, n, section, budget, plan_only):
    """Section i of n: sized (section.plan), its predicted peak printed against the card's limit, then run
    (section.run) unless plan_only or it does not fit. Any exception (out of memory, a compile error, a bad config:
    SystemExit too) is caught here: the section, the error and the memory (memory_report) are printed, and the
    section counts as failed. Returns whether it passed (plan_only: whether it fits)."""
    import traceback
    title = f"section {i}/{n}: {section.title}"
    print(f"== {title}")
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # each section's own peak
        settings, figure, tried = section.plan(budget)
        for t in tried:
            print(f"  does not fit: {t}")
        limit = GPU_FILL * budget
        fits = settings is not None
        what = " ".join(a for a in settings if a.startswith("--")) if isinstance(settings, list) else ""
        print(f"  predicted peak {figure / 1e9:.1f} GB ({figure / 2 ** 30:.1f} GiB), limit {limit / 1e9:.1f} GB "
              f"({GPU_FILL:.0%} of {budget / 1e9:.1f} GB): " + (f"fits{', runs with ' + what if what else ''}"
                                                               if fits else "does not fit, not run"))
        if plan_only:
            return fits
        ok = fits and all(section.run(settings, figure))
    except (Exception, SystemExit) as e:  # KeyboardInterrupt still stops the whole check
        msg = str(e).strip().splitlines()
        print(f"  FAIL {title}: {type(e).__name__}: {msg[0] if msg else ''}")
        print("  " + "  ".join(traceback.format_exception(e)[-3:]).rstrip())
        try:
            print(memory_report())
        except Exception as m:  # a CUDA error that also breaks the allocator's statistics
            print(f"  no memory report: {type(m).__name__}: {m}")
        ok = False
    print(f"== {'PASS' if ok else 'FAIL'} {title}")
    return ok


def run_sections(sections, budget, plan_only=False):
    """Every section under its own guard (guarded), its memory handed back before the next one; prints which
    passed. Returns True when all passed (plan_only: all fit)."""
    import gc
    passed = []
    for i, s in enumerate(sections, 1):
        passed.append(guarded(i, len(sections), s, budget, plan_only))
        gc.collect()  # what a failed section's traceback held
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    failed = [f"{i}" for i, ok in enumerate(passed, 1) if not ok]
    word = "fit" if plan_only else "passed"
    print(f"== {len(passed) - len(failed)} of {len(passed)} sections {word}"
          + (f"; not {word}: section {', '.join(failed)}" if failed else ""))
    return not failed


class Tee:
    """A text stream writing to several (the terminal and the run's log file), flushed at every write so a run
    cut short still leaves its output."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the terminal's
        return getattr(self.streams[0], name)


def gpu_check(L=4096, plan_only=False, card=None, sections=None):
    """--gpu: the prepared check for a lent GPU, in one call (gpu_sections; under 8 minutes on an H100). Each
    section is sized to the card by the planner and runs under its own guard (run_sections); the whole output
    also goes to docs/gpu_runs/<date>-<device>.txt. plan_only: print each section's sizes and predicted peak for
    the card named (CARDS, default h100) and run nothing, on any machine. Returns True when every section passed."""
    import contextlib
    import re
    if card is not None and card not in CARDS:
        raise SystemExit(f"bench.py --gpu: --card must be one of {', '.join(CARDS)}, got {card!r}")
    if plan_only:
        card = card or "h100"
        print(f"== bench.py --gpu --plan_only: the sections' sizes for an {card.upper()} "
              f"({CARDS[card] / 2 ** 30:.1f} GiB usable)")
        return run_sections(sections or gpu_sections(L), CARDS[card], plan_only=True)
    if not torch.cuda.is_available():
        raise SystemExit("bench.py --gpu needs a CUDA device (on a CPU: bench.py --gpu --plan_only, or bench.py "
                         "--real with reduced sizes)")
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    budget = CARDS[card] if card else torch.cuda.get_device_properties(dev).total_memory
    date = time.strftime("%Y-%m-%d")
    out = os.path.join(ROOT, "docs", "gpu_runs", f"{date}-{re.sub(r'[^A-Za-z0-9.-]+', '_', name).strip('_')}.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f, contextlib.redirect_stdout(Tee(sys.stdout, f)), \
            contextlib.redirect_stderr(Tee(sys.stderr, f)):
        print(f"== bench.py --gpu, {date}: {name} ({budget / 2 ** 30:.1f} GiB"
              f"{', sized as an ' + card.upper() if card else ''}), torch {torch.__version__}")
        ok = run_sections(sections or gpu_sections(L), budget)
        print(f"== written to {os.path.relpath(out)}")
    return ok


def cp_kernels_vs_reference(dev, L=4096, heads=8, kv_heads=4, hd=128, dtypes=(torch.float32, torch.bfloat16)):
    """The cp local kernels through FlexAttention (what 'auto' runs on CUDA) against the pure-PyTorch reference on
    the blocks a 2-rank zigzag ring computes for one row of L tokens under Molmo2's mask (three packed examples, a
    run of vision tokens in each, bidirectional): each block's (out, lse) forward, and the ring's gradients from the
    final out and LSE. fp32 and bf16 inputs; the reference always in fp64. Tolerance, for every tensor (out, lse,
    dq, dk, dv) of every block: fp32 FP32_TOL; bf16 twice the error of the reference kernel itself run on the same
    bf16 inputs in bf16, + 1e-3 (tests/test_cp.py's bf16 rule). Prints PASS/FAIL per dtype with the largest error;
    returns {dtype: (max |diff| over every tensor, passed)}. Then times one flex call against plain causal SDPA
    (flash) at the same length (on CUDA)."""
    import cp_attention as cp
    from model import MolmoMask
    g = torch.Generator(device="cpu").manual_seed(0)
    doc = torch.zeros(1, L, dtype=torch.long)
    bounds = [0, L // 3, 2 * L // 3, L - 16]                  # three examples, then 16 padding tokens
    vis = torch.zeros(1, L, dtype=torch.bool)
    for i in range(3):
        doc[0, bounds[i]:bounds[i + 1]] = i + 1
        vis[0, bounds[i] + 1:bounds[i] + 1 + L // 12] = True   # each example opens with its vision tokens
    mask = MolmoMask(doc.to(dev), vis.to(dev), True)
    rows = torch.arange(L, device=dev)
    pos = [cp.positions_for_shard(L, r, 2, "zigzag", dev) for r in range(2)]
    out = {}
    for dt in dtypes:
        worst, share = 0.0, 0.0  # the largest error, and the largest error / tolerance
        for qr, kr in ((0, 0), (1, 0), (0, 1)):               # a diagonal block and the two off-diagonal ones
            q, k, v = (torch.randn(1, h, L // 2, hd, generator=g).to(dev) for h in (heads, kv_heads, kv_heads))
            dense = cp.mask_rows_cols(mask, pos[qr], pos[kr])
            seen = dense.any(-1)[:, 0][:, None].expand(1, heads, L // 2)  # rows that see a key of this block

            def err(a, ref, rows_only=False):  # max |a - ref|, over the rows that see a key where asked
                d = (a.double() - ref).abs()
                return (d[seen] if rows_only else d).max().item()
            ref = cp.reference_attn_fwd(q.double(), k.double(), v.double(), mask=dense)
            bm = cp.flex_block(mask, pos[qr], pos[kr], False, 1)
            got = cp.local_attn_fwd(q.to(dt), k.to(dt), v.to(dt), impl="flex", mask=bm)
            do = torch.randn(ref[0].shape, generator=g).to(dev)
            ref_g = cp.reference_attn_bwd(do.double(), q.double(), k.double(), v.double(), *ref, mask=dense)
            got_g = cp.local_attn_bwd(do.to(dt), q.to(dt), k.to(dt), v.to(dt), ref[0].to(dt), ref[1].float(),
                                      impl="flex", mask=bm)
            errs = [err(a, r, True) for a, r in zip(got, ref)] + [err(a, r) for a, r in zip(got_g, ref_g)]
            if dt == torch.float32:
                tols = [FP32_TOL] * 5
            else:  # the same blocks through the reference kernel in dt: what plain math in that precision gives
                base = cp.reference_attn_fwd(q.to(dt), k.to(dt), v.to(dt), mask=dense)
                base_g = cp.reference_attn_bwd(do.to(dt), q.to(dt), k.to(dt), v.to(dt), ref[0].to(dt),
                                               ref[1].float(), mask=dense)
                tols = [2 * err(a, r, True) + 1e-3 for a, r in zip(base, ref)] + \
                    [2 * err(a, r) + 1e-3 for a, r in zip(base_g, ref_g)]
            worst = max([worst] + errs)
            share = max([share] + [e / t for e, t in zip(errs, tols)])
        name = str(dt).split(".")[-1]
        rule = f"tolerance {FP32_TOL:.0e}" if dt == torch.float32 else \
            "tolerance 2x the bf16 reference kernel's error + 1e-3"
        out[dt] = (worst, share <= 1)
        verdict(share <= 1, f"cp kernels, flex vs fp64 reference, {name}",
                f"max |diff| {worst:.2e} over out, lse, dq, dk, dv; the worst tensor at {share:.2f} of its {rule} "
                f"(blocks of {L // 2} x {L // 2}, {heads}/{kv_heads} heads of {hd})")
    if dev.type == "cuda":
        q, k, v = (torch.randn(1, heads, L, hd, device=dev, dtype=torch.bfloat16) for _ in range(3))
        bm = cp.flex_block(mask, rows, rows, False, 1)
        f = cp.flex_attention_fn(True)
        t_flex = timed(lambda: f(q, k, v, block_mask=bm), 5, dev)
        t_sdpa = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), 5, dev)
        print(f"  one {L}-token row, bf16, forward: flex under Molmo2's mask {1e3 * t_flex:.2f} ms, plain causal "
              f"SDPA {1e3 * t_sdpa:.2f} ms")
    return out


# ---------------------------------------------------------------------------------------------------------
# the command line

# each mode's own flags (read by bench.py), and the keys it hands to a configure (train.py's config keys where a
# config is read; --vs_transformers' shape keys, VS_DEFAULTS, type-checked by the same configure)
MODES = {None: ["steps"], "--real": ["steps", "media"], "--plan": ["dp", "cp", "fsdp", "act_ckpt", "loss_frac"],
         "--losses": ["n", "trust_checkpoint"], "--step": ["steps", "with_compile"], "--video": [],
         "--vs_transformers": [], "--gpu": ["L", "plan_only", "card"]}
CONFIG_FLAGS = {None: train.CONFIG_KEYS, "--real": train.CONFIG_KEYS, "--plan": train.CONFIG_KEYS,
                "--step": train.CONFIG_KEYS,
                "--vs_transformers": list(VS_DEFAULTS)}


def split_flags(argv, mode):
    """Checks every flag of the mode: a --key=value whose key is the mode's own (returned in own {key: value
    string}) or a key its configure reads (kept in rest, with the positional arguments). Anything else is a
    one-line SystemExit naming what the mode takes."""
    own, rest = {}, []
    where = f"bench.py {mode}" if mode else "bench.py"
    config_keys = CONFIG_FLAGS.get(mode, [])
    for a in argv:
        if not a.startswith("-"):
            rest.append(a)
            continue
        key, eq, val = a.lstrip("-").partition("=")
        if not eq:
            raise SystemExit(f"{where}: flag {a!r} must look like --key=value (bench.py --help lists the modes)")
        if key in MODES[mode]:
            own[key] = val
        elif key in config_keys:
            rest.append(a)
        else:
            takes = [f"--{k}" for k in MODES[mode]] + (
                ["a train.py config key"] if config_keys is train.CONFIG_KEYS else [f"--{k}" for k in config_keys])
            raise SystemExit(f"{where}: unknown flag --{key}; it takes {', '.join(takes) or 'no flags'} "
                             f"(bench.py --help)")
    return own, rest


def int_flag(own, key, default):
    """own[key] (a --key=value string) as an int, default when the flag is absent; not an integer: a SystemExit."""
    try:
        return int(own.get(key, default))
    except ValueError:
        raise SystemExit(f"bench.py: --{key} must be an integer, got {own[key]!r}") from None


def main(argv):
    """bench.py's command line: at most one mode flag (MODES) picks the function; its flags are checked by
    split_flags before anything runs. No mode: the fast-path checks (check), then the timing (speed)."""
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip("\n"))
        return
    modes = [a for a in argv if a in MODES]
    if len(modes) > 1:
        raise SystemExit(f"bench.py: one mode at a time, got {' '.join(modes)}")
    mode = modes[0] if modes else None
    if not torch.cuda.is_available():
        machine.keep_freed_memory()  # as train.py's CPU runs: the step timed here allocates as the step trained does
    argv = [a for a in argv if a != mode]
    if mode == "--gpu":  # its one switch may stand alone
        argv = ["--plan_only=True" if a == "--plan_only" else a for a in argv]
    own, rest = split_flags(argv, mode)
    if mode == "--losses":
        losses(argv)
    elif mode == "--video":
        if rest:
            raise SystemExit(f"bench.py --video takes no arguments, got {' '.join(rest)}")
        video()
    elif mode == "--plan":
        plan(argv)
    elif mode == "--real":
        real(rest, steps=int_flag(own, "steps", 3), media=own.get("media", "auto"))
    elif mode == "--step":
        cfg, tok, mconf, model = build(rest)
        cpu_step(cfg, tok, mconf, model, int_flag(own, "steps", 6), own.get("with_compile") == "True")
        speed(cfg, tok, mconf, model, int_flag(own, "steps", 6))  # then the whole step, data to optimizer, in parts
    elif mode == "--gpu":
        if rest:
            raise SystemExit(f"bench.py --gpu takes --L= --plan_only --card= only, got {' '.join(rest)}")
        if own.get("plan_only", "True") not in ("True", "False"):
            raise SystemExit(f"bench.py --gpu: --plan_only must be True or False, got {own['plan_only']!r}")
        if not gpu_check(int_flag(own, "L", 4096), own.get("plan_only") == "True", own.get("card")):
            raise SystemExit(1)  # the exit code says a section failed (or, with --plan_only, does not fit)
    elif mode == "--vs_transformers":
        if [a for a in rest if not a.startswith("-")]:
            raise SystemExit(f"bench.py --vs_transformers takes flags only, got {' '.join(rest)}")
        vs_transformers(rest)
    else:
        steps = int_flag(own, "steps", 20)
        cfg, tok, mconf, model = build(rest)
        torch.manual_seed(0)
        check(cfg, tok, mconf, model)
        speed(cfg, tok, mconf, model, steps)


if __name__ == "__main__":
    main(sys.argv[1:])

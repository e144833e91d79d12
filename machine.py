"""
The machine a run is on: which precision it trains in, and what "100% utilisation" means there (MFU's peak).

A CPU's bf16 speed is not a given. CPUs with bf16 matrix instructions (Intel AMX, AMD Zen 4/5's AVX-512 BF16) run a
bf16 matmul several times faster than an fp32 one; CPUs without them (AVX2 only: most laptops, many cloud VMs) run
bf16 autocast through a conversion path tens of times SLOWER than fp32. So the default precision, dtype='auto', is
decided by measuring both here, once, at start; MFU's CPU peak is the same measurement in the dtype the run uses.
(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 in the environment makes a bf16-capable CPU behave like an
AVX2-only one: a way to see the other kind of machine without having it.)
"""
import functools
import os
import time

import torch

GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12,
                 "B200": 2250e12}  # datasheet dense bf16 FLOP/s (as nanochat's table)


@functools.lru_cache(maxsize=None)
def matmul_rate(dt, n=1024, runs=5, slow_s=0.25):
    """FLOP/s of one n x n x n CPU matmul in dtype dt: the best of `runs` warm runs. The best, not the mean: another
    process sharing the core only ever makes a run slower, so the best is the closest to what this CPU can do, and a
    step's MFU measured against it stays under 100%. A first run slower than slow_s (a slow emulated path, ~2 s for
    bf16 without bf16 instructions) is answer enough. Cached: the dtype choice and the MFU share one measurement."""
    g = torch.Generator().manual_seed(0)  # its own generator: measuring never moves the run's random stream
    a, b = torch.randn(n, n, generator=g).to(dt), torch.randn(n, n, generator=g).to(dt)
    t = time.perf_counter()
    a @ b  # warm-up: the first call picks the kernel
    best = time.perf_counter() - t
    if best < slow_s:
        for _ in range(runs):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def keep_freed_memory():
    """Linux (glibc) only: keep the memory a CPU step frees inside the process for the next step. By default glibc
    hands large freed blocks back to the kernel (munmap, or trimming the heap's top), and the next step's activations
    fault every page in again (the kernel zeroes each 4 KB page): on a 2-core Zen 3 VM a stage-1 demo took 20 million
    page faults and 4% of its CPU time in the kernel. Blocks up to 32 MB (glibc's largest mmap threshold) now come from
    the heap, and the heap is not trimmed below 1 GB free: 10x fewer faults (docs/experiments.md). The resident size
    stays near the step's peak, as it would be between steps anyway. Returns whether the settings took."""
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers (<malloc.h>)
    return all(libc.mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30),
                                                    (M_TOP_PAD, 64 << 20)))


def usable_cpus():
    """The CPUs this process may run on (its affinity mask where the OS has one, e.g. under taskset or a container's
    cpuset), else all the OS reports."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def eval_threads(threads, local_ranks):
    """Threads for rank 0's eval under torchrun, while the node's other local_ranks - 1 ranks wait: their threads too
    (each rank has `threads`), but no more than the usable CPUs. More OpenMP threads than cores wait on each other at
    every parallel region: 4 ranks on 2 cores made a 1-prompt eval take 7 s (docs/experiments.md)."""
    return max(threads, min(usable_cpus(), threads * local_ranks))


def resolve_device(name, what="device"):
    """Config key / flag `device`: 'auto' = cuda when torch sees a GPU, else cpu; or a torch device name ('cpu',
    'cuda', 'cuda:1'). A name torch does not know, or a GPU this torch cannot reach, is a one-line SystemExit naming
    the key, not a traceback at the first tensor moved."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"{what}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{what}={name!r}: this torch sees no CUDA device (torch {torch.__version__}); use cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"{what}={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s), 0-based")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"{what}={name!r}: this code trains on cpu or cuda only")
    return dev


def peak_flops(dev, dt):
    """Peak FLOP/s in dtype dt, the denominator of MFU. GPUs: the datasheet's dense bf16 figure (fp32 without TF32 is
    ~1/16 of it); an unknown GPU gives inf (MFU 0, not a guess). CPU: measured here (matmul_rate), in the dtype the
    step runs in, so MFU says how close the model runs to what this CPU does in that precision."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for key, f in GPU_PEAK_BF16.items():
            if key in name:
                return f if dt != torch.float32 else f / 16
        return float("inf")
    return matmul_rate(dt)


def fastest(candidates, run, rounds=3):
    """The candidate whose run(candidate) takes least time: each run `rounds` times, interleaved (a shared machine
    slows every candidate alike), the first round untimed (allocation, kernel choice); the best time of each
    counts, for the reason matmul_rate gives. Returns (the fastest, {candidate: best seconds})."""
    best = {c: float("inf") for c in candidates}
    for r in range(rounds):
        for c in candidates:
            t = time.perf_counter()
            run(c)
            if r:
                best[c] = min(best[c], time.perf_counter() - t)
    return min(candidates, key=best.get), best


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BF16_MIN_SPEEDUP = 1.25  # 'auto' on a CPU takes bf16 only when its matmuls beat fp32's by this much (noise margin)


def resolve_dtype(name, dev, print=print):
    """The training dtype for config key `dtype`: a name, or 'auto'. 'auto' = bf16 autocast on CUDA; on a CPU, bf16
    only where bf16 matmuls run faster than fp32 ones on this very CPU, else fp32. CPUs with bf16 matrix units
    (Intel AMX, AMD Zen 4/5's AVX-512 BF16) run bf16 several times faster than fp32; without them (AVX2 only, most
    laptops and many cloud CPUs) bf16 autocast falls back to a conversion path 10-100x slower than fp32. Both rates
    are measured at start (matmul_rate) and printed with the choice. Where bf16 wins here, the training step itself
    then decides between the two (train.Trainer.choose_step): a large matmul's rate is not the step's."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]
    if dev.type == "cuda":
        print("dtype auto -> bfloat16 (CUDA)")
        return torch.bfloat16
    f32, b16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    pick = torch.bfloat16 if b16 >= BF16_MIN_SPEEDUP * f32 else torch.float32
    isa = torch.backends.cpu.get_cpu_capability()
    print(f"dtype auto -> {str(pick).split('.')[-1]}: this CPU ({isa}) multiplies 1024^3 matrices at "
          f"{f32 / 1e9:,.0f} GFLOP/s in fp32 and {b16 / 1e9:,.0f} GFLOP/s in bf16 (bf16 is taken at >= "
          f"{BF16_MIN_SPEEDUP}x fp32)")
    return pick

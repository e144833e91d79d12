"""
The one training loop, for every stage. nanoGPT-shaped: the defaults below are plain globals; a config file
(config/*.py) overrides some of them, then --key=value overrides with a type check. Unknown keys are errors.

    python train.py config/shapes_stage1.py                  # the CPU demo: stage 1 on the shapes world
    python train.py config/shapes_stage1.py --max_steps=100  # any global can be overridden
    python train.py config/stage1.py --dry_run=True          # build the real-scale model, print, stop
    torchrun --nproc_per_node=2 train.py config/shapes_stage3.py  # stage 3: each sequence split over 2 ranks

Under torchrun the ranks form a (dp x cp) device mesh: dp groups see different examples, the cp ranks of a dp
group split the same sequences (context parallelism, cp_attention.py). Gradients are reduced over all dp x cp
ranks by DDP, or FSDP2 (fsdp=True) shards parameters, gradients and Adam state over them.

What one optimizer step does, end to end (the shapes stage-1 config's numbers in brackets):
  1. the sampler (mixing.py) draws (dataset, index) keys by the mixture's weights; each key becomes an encoded
     example (data.encode_example: token ids, labels shifted by one, per-token loss weights, its images'
     pixels and pooling indices) [~43 scenes a step, 3 questions each], in data_workers processes ahead of the
     training thread (loader.py);
  2. the packer (data.Packer) fits whole examples into rows of seq_len tokens, and collate pads them into one
     batch dict: input_ids (B, T), doc_ids (B, T) (which example of the row a token belongs to), position_ids
     restarting at 0 for every example, loss_weights (B, T), pixel_values (B, F, 3, H, W) [B=8, T=512];
  3. the model (model.Molmo2) encodes every image (ViT -> connector: pooled tokens (N_tok, d)), adds them at
     the <im_patch> slots, runs the decoder under Molmo2's mask and returns sum(w * CE) and sum(w);
  4. accumulate divides by the weight sum of the WHOLE optimizer batch and back-propagates, micro-batch after
     micro-batch; the gradients are clipped to norm 1 and AdamW steps (LR: linear warmup, then cosine to 10%).
Everything a long run needs around that lives here too: resume (the checkpoint holds the sampler and packer
state, so a resumed run sees the very same batches), skipped non-finite steps, a wall-clock budget
(max_minutes), periodic held-out evals, and the learning curve.
"""
import ast
import builtins
import dataclasses
import math
import os
import random
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from checkpoint import (CheckpointError, load_checkpoint, non_finite, remove_stale_tmp, rng_state,
                        save_checkpoint, set_rng_state)
from loader import TrainingStream
from machine import DTYPES, eval_threads, fastest, keep_freed_memory, peak_flops, resolve_device, resolve_dtype
from metrics import MetricsLog, plot_curve, read_metrics, wandb_required

# ---------------------------------------------------------------------------------------------------------
# The configuration. Every global below is a key: a config file (config/*.py, plain Python assignments) or a
# --key=value on the command line overrides it, with its type checked against the default's (configure).
# The groups: I/O (where a run starts from and writes to, how often it evaluates), data (what a batch holds and
# how the datasets are mixed), model (model.ModelConfig: the architecture), optimizer (AdamW and the schedule),
# system (device, precision, attention kernel) and scale-out (torchrun layouts). The defaults train a small model
# on the shapes world; config/shapes_stage*.py set up the three CPU demos, config/stage*.py the real stages.
# defaults: a small model on the shapes world (config/*.py set up each stage); every one can be overridden
# by a config file or --key=value
# I/O
out_dir = "out/shapes_stage1"   # checkpoints, metrics.jsonl (every log line and eval, for tools), curve.png
init_from = "scratch"           # 'scratch' | 'resume' (from out_dir) | a ckpt.pt (weights only) | a Hugging Face
                                # Molmo2 directory (config.json + safetensors: its architecture, its weights)
init_llm = ""                   # from scratch: a Qwen3 checkpoint directory for the LLM's weights (stage 1)
init_vit = ""                   # from scratch: a SigLIP / SigLIP2 checkpoint directory for the ViT's weights
trust_checkpoint = False        # load checkpoints with the full unpickler (it can run code): only files you made
eval_interval = 500             # steps between held-out evaluations (and checkpoints)
eval_prompts = 100              # prompts per task in periodic evals (the final eval uses final_eval_prompts)
eval_tasks = ("point", "count", "qa")  # held-out shapes tasks scored (eval.py METRIC_NAMES)
eval_data = {}                  # real held-out sets scored at each periodic and the final eval instead of the
                                # shapes tasks: reader name -> local copy (eval.EVAL_METRICS picks each one's metric)
final_eval_prompts = 500        # the acceptance figure needs at least 500 per task
log_interval = 10               # steps between log lines
dry_run = False                 # build model + mixture, print them, stop before the first step
stop_at = 0                     # stop (checkpointed) after this step, schedule unchanged; 0 = run to max_steps
max_minutes = 0.0               # wall-clock budget of the whole run (0 = off): after BUDGET_PROBE_STEPS the run fixes
                                # its step count to fit (max_steps the upper bound) and lays the schedule over it;
                                # re-fitted should the step time drift (StepBudget)
blind_baseline = True           # after the final eval, evaluate again with blank images (what the image adds)
# logging: out_dir/metrics.jsonl always holds every log line and eval (metrics.py); Weights & Biases is optional
wandb_log = False               # also send them to Weights & Biases (off: wandb is never imported; pip install wandb)
wandb_project = "nanomolmo2"    # the W&B project the runs are grouped under
wandb_run_name = ""             # the W&B run's name ('' lets W&B choose one)
# data
dataset = "shapes"              # 'shapes': the built-in world; anything else: local copies (data_paths, readers.READERS)
data_paths = {}                 # real data: mixture dataset name -> its local jsonl copy (readers.read_dataset)
media_root = ""                 # real data: the images (readers.media_path of each URL) and videos (<video id>.mp4)
mixture = {"captions": (0.6, {"caption": 1.0, "qa": 1.0}),   # stage 1 (docs/molmo2.md): captions 60% (QA on the
           "pointing": (0.3, {"point": 1.0, "count": 1.0}),  # same scenes, PixMo-CapQA style), pointing 30%
           "text": (0.1, {"text": 1.0})}                     # (points and point-then-count), text 10%
mixing_rule = "fixed"           # 'fixed': the mixture's ratios (stage 1) | 'sqrt': rate * sqrt(size) (stages 2-3)
dataset_sizes = {}              # examples per dataset (sqrt rule, mixture table); shapes tasks are procedural
dataset_caps = {}               # sqrt rule: an int replaces a dataset's size, a fraction < 1 scales it (Molmo2)
flat_groups = ()                # mixture groups whose datasets mix at their given rates, sizes ignored (Molmo2's
                                # root_size_factor=1: its SFT video_pointing group)
task_weights = {"caption": 1.0, "qa": 1.0, "count": 1.5, "point": 2.0, "track": 2.0, "text": 1.0,  # targets
                "video_caption": 1.0, "video_qa": 1.0, "subtitle_qa": 1.0, "video_count": 1.5,
                "video_point": 2.0, "multi_qa": 1.0, "multi_point": 2.0}
loss_weighting = "task"         # 'task': task_weights per answer token | 'root': Molmo2 SFT's 2/sqrt(n)
root_flat_weights = {"point": 0.2, "count": 0.2, "track": 0.2}  # 'root': flat per-token weights (Molmo2)
first_token_mults = {}          # task -> x weight on its answers' first token (pointing: "There are none." or points)
tokenizer = "shapes-bpe"        # 'shapes-bpe' (trained offline, here), a .tiktoken or tokenizer.json path, or a
                                # cached tiktoken name
absent_rate = 0.2               # shapes: share of training point/count questions about absent objects (eval: 0.2)
multi_rate = 0.0                # shapes: share of the present targets asked about 2+ objects where a scene has them
turns_per_image = 1             # questions per image in one sequence (>1: the image is encoded once for all)
video_frames = (6, 11)          # shapes videos: frames per video, lo..hi at 2 fps (stage 3 shapes: longer)
max_frames = 128                # video: Molmo2 samples 2 fps up to this many frames (128 in stage 2, 384 in stage 3)
video_fps = 2.0                 # video: Molmo2's sampling rate, 2 frames a second
seq_len = 256                   # max tokens per row (4,096 in stage 1 at real scale)
batch_size = 32                 # rows per micro-batch (one example per row, or several when packing)
packing = False                 # pack several examples per row (doc ids + restarted positions keep them apart)
max_images_per_row = 8          # packing: vision budget per row (Molmo2: max crops per sequence)
pack_buffer = 32                # packing: examples the best-fit packer chooses from
grad_accum = 1                  # micro-batches per optimizer step
data_workers = -1               # processes encoding examples ahead of training (loader.py); 0 = on the training
                                # thread; -1 = 4 on CUDA, 0 on a CPU (a worker there takes cores from the matmuls)
prefetch = 64                   # examples encoded ahead by the workers: about two shapes stage-2 micro-batches
vit_pretrain_steps = 0          # shapes only: pretrain ViT + connector first (stand-in for SigLIP2; 0 = none)
vit_pretrain_batch = 64         # images per ViT pretraining step
vit_pretrain_lr = 1e-3          # its peak LR (warmup, then cosine to 10%)
# model (see model.ModelConfig for what each means)
image_size = 64
patch_size = 8
vit_width = 128
vit_depth = 4
vit_heads = 4
vit_mlp = 512
vit_layers = (-1, -3)           # Molmo2: (-3, -9) of 27
pool_h = 2
pool_w = 2
video_pool_h = 3
video_pool_w = 3
col_tokens = True
frame_tokens = True             # <frame_start>/<frame_end> around each video frame (False: <im_start>/<im_end>)
max_crops = 0                   # images: 0 = one crop of image_size; n = Molmo2's multi-crop, up to n tiles
crop_margins = (4, 4)           # multi-crop: the tiles' overlap, in patches a side (Molmo2: 4 + 4 of 27)
proj_ff = 0                     # the projector's SwiGLU width; 0 = d_ff (Molmo2-8B: 18944)
base_vocab = 0                  # 0 = from the tokenizer; else the embedding's rows (Qwen3 pads to 151,936; dry runs)
n_extra = 0                     # 0 = from the tokenizer (Molmo2 pads the extra rows to 128)
d_model = 256
n_layer = 4
n_head = 4
n_kv_head = 2
head_dim = 64
d_ff = 768
rope_theta = 1e6
tie_embeddings = False
bidir_vision = True
# optimizer: AdamW as Molmo2 (betas 0.9/0.95, eps 1e-6, no weight decay, clip 1.0)
optimizer = "adamw"             # 'adamw' (Molmo2's) | 'muon': Muon on the LLM's hidden matrices, AdamW on the rest
                                # (muon.py), for an LLM that starts random (the shapes configs: docs/experiments.md)
lr = 1e-3                       # the LLM's peak LR; the other two groups are multiples of it
lr_connector_mult = 10.0        # Molmo2 pretraining: connector 2e-4 / LLM 2e-5 = 10x
lr_vit_mult = 0.3               # Molmo2 pretraining: ViT 6e-6 / LLM 2e-5 = 0.3x; 0 freezes the ViT (no grads)
warmup_steps = 100
max_steps = 2000
min_lr_frac = 0.1               # cosine decays to 10% of peak (Molmo2 alpha_f = 0.1)
beta1 = 0.9
beta2 = 0.95
adam_eps = 1e-6
weight_decay = 0.0
grad_clip = 1.0
max_broken_frac = 0.05          # real data: stop when more than this share of a dataset's media cannot be decoded
max_bad_steps = 5               # steps in a row whose gradient norm is not finite (each skipped) before the run stops
# system
device = "auto"                 # 'auto' = cuda if present, else cpu
dtype = "auto"                  # autocast dtype: 'auto' = bf16 on CUDA, on a CPU whichever is faster here
                                # (machine.resolve_dtype); 'float32' turns autocast off (the reference path)
compile_blocks = -1             # torch.compile each ViT and decoder block (model.compile_blocks): fused norms, RoPE,
                                # SwiGLU; -1 = on CUDA, off on a CPU (~45 s of compiling for 6-8%: docs/experiments.md)
attn_impl = "auto"              # 'auto': flex on CUDA, sdpa on CPU | 'sdpa': dense bool mask (the reference) |
                                # 'flex': FlexAttention BlockMask (compiled on CUDA: no T x T scores in memory)
attn_tile = 64                  # sdpa on packed rows: query rows per call, keys cut to the span they may see
                                # (model.TiledMask: the same softmax, ~1/3 of the work); 0 = all T x T at once
threads = 0                     # CPU threads for torch; 0 = torch's default
seed = 1337
# scale-out, under torchrun (README "Running on GPUs"): world = dp x cp ranks
cp = 1                          # context-parallel degree: ranks that split one sequence (stage 3); dp = world / cp
cp_mode = "ulysses"             # 'ulysses': all-to-all over heads (Molmo2's choice) | 'ring': zigzag ring
fsdp = False                    # FSDP2: shard params, grads and Adam state over all ranks (else DDP replicates them)
act_ckpt = False                # activation checkpointing of the LLM blocks: recompute in backward, save memory
loss_chunk = 0                  # loss-head tokens per chunk (0 = all at once): only one chunk's logits in memory
# ---------------------------------------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in list(globals().items())
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, dict, tuple, list))]
MODEL_KEYS = ["image_size", "patch_size", "vit_width", "vit_depth", "vit_heads", "vit_mlp", "vit_layers",
              "pool_h", "pool_w", "video_pool_h", "video_pool_w", "col_tokens", "frame_tokens", "max_crops",
              "crop_margins", "proj_ff", "base_vocab", "n_extra", "d_model", "n_layer", "n_head", "n_kv_head",
              "head_dim", "d_ff", "rope_theta", "tie_embeddings", "bidir_vision"]


CHOICES = {"mixing_rule": ("fixed", "sqrt"), "loss_weighting": ("task", "root"),
           "attn_impl": ("auto", "sdpa", "flex"), "dtype": ("auto", "bfloat16", "float16", "float32"),
           "cp_mode": ("ring", "ulysses"), "compile_blocks": (-1, 0, 1), "optimizer": ("adamw", "muon")}


def configure(argv, defaults, given=None):
    """nanoGPT's poor man's configurator, with checks: argv items are config files (executed, and every
    name they set must be a known key) or --key=value (parsed as a Python literal, else a string; the type
    must match the default's, an int may stand for a float). Returns the updated dict; `given`, a set, receives
    the keys a config file or the command line set (checked against a checkpoint's: check_against_checkpoint)."""
    cfg = dict(defaults)
    given = set() if given is None else given

    # One check for both sources: the key must exist (a typo is an error listing the valid keys, never a new
    # global nobody reads) and the value must have the default's type, so `--lr=1e-3` is a float, `--dry_run=1` is
    # refused (an int is not a bool), and a tuple key given as a list is taken as the tuple it means.
    def check(key, val, where):
        if key not in defaults:
            raise SystemExit(f"unknown config key {key!r} ({where}). Valid keys:\n  " + ", ".join(sorted(defaults)))
        want = type(defaults[key])
        if want is float and type(val) is int:
            val = float(val)
        if want is tuple and type(val) is list:
            val = tuple(val)
        if type(val) is not want:
            raise SystemExit(f"config key {key!r} ({where}) must be {want.__name__}, got {type(val).__name__}: {val!r}")
        cfg[key] = val
        given.add(key)

    # Left to right: a later file or --key=value wins over an earlier one, as in nanoGPT.
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg:
                raise SystemExit(f"override {arg!r} must look like --key=value")
            key, val = arg[2:].split("=", 1)
            try:
                val = ast.literal_eval(val)
            except (ValueError, SyntaxError):
                pass  # a bare string, e.g. --out_dir=out/x
            check(key, val, "command line")
        else:
            if not os.path.exists(arg):
                raise SystemExit(f"config file {arg!r} not found")
            scope = {"__file__": os.path.abspath(arg)}  # a config may build on another (config/stage3.py)
            exec(open(arg).read(), scope)  # one namespace: a config may compute from its own earlier values
            for key, val in scope.items():
                if not key.startswith("_") and not callable(val) and type(val).__name__ != "module":
                    check(key, val, arg)
    return cfg


# ---------------------------------------------------------------------------------------------------------

def lr_at(step, peak, warmup, total, min_frac):
    """Linear warmup from 0, then cosine to min_frac * peak (Molmo2 CosWithWarmup)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))


BUDGET_PROBE_STEPS = 10  # max_minutes: steps timed before the step count is fixed (the first 2 are warm-up)
BUDGET_MARGIN = 0.95     # plan for 95% of the budget: step times drift a little over a run
REFIT_BAND = 0.05        # re-fit the count when the run heads for an end off that plan by more than 5% of the budget
REFIT_WINDOW = 100       # steps the re-fit's step time is the mean of: 10-step log lines vary 2,700-4,200 tok/s in
                         # one run, and 50-step means by +-10%, enough to re-fit both ways (docs/experiments.md)


def run_cost(n, spent_s, done, step_s, eval_s, final_s, eval_interval):
    """Seconds a run of n steps takes in all: spent_s have gone by with `done` steps made; each further step costs
    step_s, every periodic eval eval_s (at each multiple of eval_interval below n, the ones after `done`), the end
    final_s (final eval, baseline, checkpoint)."""
    evals = (n - 1) // eval_interval - done // eval_interval if n > done else 0
    return spent_s + max(0, n - done) * step_s + max(0, evals) * eval_s + final_s


def steps_in_budget(budget_s, spent_s, done, step_s, eval_s, final_s, eval_interval, max_steps):
    """The largest total step count N <= max_steps whose run fits budget_s seconds (run_cost; "Cramming", Geiping
    and Goldstein 2022: train for a fixed time, not a fixed number of steps). At least `done` (stop now)."""
    lo, hi = done, max(max_steps, done)  # run_cost grows with n: the last n that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if run_cost(mid, spent_s, done, step_s, eval_s, final_s, eval_interval) <= budget_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def accumulate(fwd, batches, autocast=nullcontext, D=None, no_sync=None, dev=None):
    """Forward + backward over the micro-batches of one optimizer step; returns the step's loss (this rank's part
    of it under torchrun: the parts add up to the loss over all ranks).
    The loss is sum(w * CE) / sum(w) over the whole optimizer batch (Molmo2 BatchDivisor.global_batch):
    every micro-batch's sum(w * CE) is divided by the GLOBAL weight sum (known before any forward: weights are
    data), never by its own; under torchrun that sum is all-reduced over the dp group (the cp ranks of a dp group
    hold the same whole batch, so the cp group must not add it again), and every rank's loss is its tokens' part.
    Dividing each micro-batch's mean by grad_accum instead (nanoVLM, nanochat) makes the gradient depend on
    how the batch was split; here 1x8, 2x4 and 8x1 give the same step (tests/test_train.py), and so do 1 rank
    and 2 (tests/test_dist.py).
    D: the distributed layout (setup_distributed). DDP and FSDP2 AVERAGE gradients over the world's ranks, while
    the global loss is the SUM of the ranks' parts: each part is scaled by the world size, so the average is the
    sum. no_sync: the context that skips the gradient reduction (no_sync_of: DDP's or FSDP2's), for every
    micro-batch but the last. dev: the run's device (where the divisor's all-reduce runs; default: the batches')."""
    # The weights are known before any forward (they come with the data), so the global divisor is fixed first.
    wsum = sum(b["loss_weights"].sum() for b in batches).float()
    if D is not None and D.world > 1:
        wsum = all_reduce_scalar(wsum, D, dev or wsum.device, group=D.dp_group)
    if wsum <= 0:
        raise ValueError("optimizer batch has no loss tokens (every loss weight is 0)")
    scale = D.world if D is not None else 1
    total = 0.0
    for i, b in enumerate(batches):
        with (no_sync() if no_sync and i + 1 < len(batches) else nullcontext()), autocast():
            loss_sum, _ = fwd(b)
            loss = loss_sum / wsum  # a non-finite loss still goes backward: every rank then sees a non-finite
            (loss * scale).backward()  # gradient norm and skips the step together (a raise here would hang DDP)
        total += loss.item()
    return total


# ---------------------------------------------------------------------------------------------------------
# Scale-out. A process per GPU (torchrun). The world of W processes is a 2-D mesh dp x cp: the dp dimension
# splits the batch (each dp group draws its own examples), the cp dimension splits each sequence (stage 3's
# 36,864-token rows: cp_attention.py). Parameters are replicated (DDP) or sharded (FSDP2) over the whole world,
# and gradients are reduced over all of it: a cp rank's gradient is its tokens' part of the same examples', a dp
# rank's is its examples' part, and the sum over both is the whole batch's (accumulate explains the scaling).

class Dist:
    """The layout of the run: rank, world = dp x cp, this rank's place in the mesh and its process groups.
    One process (plain python): world 1, no groups."""
    rank, world, local_rank, dp, cp, dp_rank, cp_rank, dp_group, cp_group = 0, 1, 0, 1, 1, 0, 0, None, None


def all_reduce_scalar(x, D, dev, group=None):
    """The sum of the number x (a float or a 0-d tensor) over the ranks of group (None: every rank), as a Python
    float on every rank; x itself in one process. Every scalar train.py reduces goes through here: the tensor is made
    on the run's device dev (cuda:LOCAL_RANK under torchrun on GPUs), since NCCL takes CUDA tensors only, and in
    float64, so a loss summed over ranks is not rounded to fp32 on the way."""
    if D.world == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.all_reduce(t, group=group)
    return t.item()


def broadcast_scalar(x, D, dev, src=0):
    """Rank src's number x on every rank (a Python float), the same way as all_reduce_scalar: a float64 tensor on the
    run's device. Exact for integers below 2^53 (a step count)."""
    if D.world == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=dev)
    dist.broadcast(t, src=src)
    return t.item()


def setup_distributed(C, dev_type):
    """Under torchrun (RANK in the environment): the process group (NCCL on CUDA, gloo on CPU) and a 2-D device
    mesh (dp, cp), cp the inner dimension so a cp group sits on neighbouring ranks (one node, the fast links,
    for the ring's and the all-to-all's traffic every layer). Returns a Dist."""
    # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's environment;
    # plain `python train.py` sets none of them and runs as one process with no process group at all.
    D = Dist()
    if "RANK" not in os.environ:
        if C.cp != 1 and not C.dry_run:  # (a dry run only builds the model)
            raise SystemExit(f"cp={C.cp} splits each sequence over {C.cp} processes: launch with torchrun "
                             f"--nproc_per_node={C.cp} (or a multiple of it)")
        return D
    from torch.distributed.device_mesh import init_device_mesh
    if not dist.is_initialized():  # (a test may have set it up already)
        dist.init_process_group("nccl" if dev_type == "cuda" else "gloo", timeout=timedelta(minutes=60))
    D.rank, D.world, D.local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if C.cp < 1 or D.world % C.cp:
        raise SystemExit(f"cp={C.cp} must divide the number of processes ({D.world})")
    D.cp, D.dp = C.cp, D.world // C.cp
    mesh = init_device_mesh(dev_type, (D.dp, D.cp), mesh_dim_names=("dp", "cp"))
    D.dp_rank, D.cp_rank = mesh.get_local_rank("dp"), mesh.get_local_rank("cp")
    D.dp_group, D.cp_group = mesh["dp"].get_group(), mesh["cp"].get_group()
    return D


def wrap_model(model, C, D, dev, dtype=torch.float32):
    """The module the training loop calls. One process: the model. torchrun: DDP (parameters replicated,
    gradients all-reduced over every rank, dp x cp: the cp ranks hold different tokens' gradients too), or
    FSDP2 (fsdp=True: fully_shard on each ViT block, each LLM block, then the rest, over all ranks; a block's
    parameters are all-gathered just before its forward and backward, gradients reduce-scattered after).
    Under FSDP2 every rank runs every module on every micro-batch (model.always_vision: a rank without an image
    runs the ViT on a blank one), and with dtype bf16 the parameters are all-gathered and computed in bf16 while
    the gradients are reduced, and the sharded weights and Adam state kept, in fp32 (MixedPrecisionPolicy)."""
    if D.world == 1:
        return model
    if C.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = init_device_mesh(dev.type, (D.world,))
        low = dtype if dtype != torch.float32 else None
        mp = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
        for blk in list(model.vit.blocks) + list(model.llm.blocks):
            fully_shard(blk, mesh=mesh, mp_policy=mp)
        # the root's forward input is the batch: left as it is (loss weights stay fp32; autocast casts the pixels)
        fully_shard(model, mesh=mesh, mp_policy=dataclasses.replace(mp, cast_forward_inputs=False))
        model.always_vision = True
        return model
    # find_unused_parameters: a micro-batch of text only leaves the ViT and connector out of the graph
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                     find_unused_parameters=True)


def no_sync_of(wrapped):
    """The context accumulate enters for every micro-batch but the last, so that gradients are reduced across ranks
    once a step: DDP's no_sync; under FSDP2 set_requires_gradient_sync(False) (each rank then accumulates its
    unsharded gradients, in fp32, until the last micro-batch's reduce-scatter: a full gradient's memory held for the
    step in exchange for one reduce-scatter instead of grad_accum); None for one process."""
    if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
        return wrapped.no_sync
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(wrapped, FSDPModule):
        return None

    @contextmanager
    def no_sync():
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    return no_sync


def freeze_vit(model, C):
    """lr_vit_mult = 0: a frozen ViT, no gradients through it at all, not just a zero LR (stage 2: its backward
    would be a third of the step, ~150 frames a batch). bench.py times the step as it trains through this too."""
    if C.lr_vit_mult == 0:
        for p in model.vit.parameters():
            p.requires_grad_(False)


def make_optimizer(model, C, dev):
    """(optimizer, LR multiple per component): AdamW with one group per component at its multiple of lr (Molmo2:
    connector 10x, ViT 0.3x in pretraining), each group's `peak` the LR its schedule climbs to (lr_at). With
    optimizer='muon' the LLM's hidden matrices leave the llm group for a Muon group at the LLM's lr (muon.py). A
    frozen ViT's parameters stay in their group: they have no gradients, so nothing updates them."""
    groups = model.param_groups()
    mults = {"llm": 1.0, "connector": C.lr_connector_mult, "vit": C.lr_vit_mult}
    pgroups = [dict(params=groups[k], name=k, peak=C.lr * mults[k], lr=C.lr * mults[k]) for k in groups]
    adamw = dict(lr=C.lr, betas=(C.beta1, C.beta2), eps=C.adam_eps, weight_decay=C.weight_decay, **adamw_kernel(dev))
    if C.optimizer == "adamw":
        return torch.optim.AdamW(pgroups, **adamw), mults
    from muon import MuonAdamW, muon_matrices
    hidden = muon_matrices(model)
    ids = {id(p) for p in hidden}
    pgroups = [dict(g, params=[p for p in g["params"] if id(p) not in ids]) for g in pgroups]
    pgroups.append(dict(params=hidden, name="llm", peak=C.lr, lr=C.lr, muon=True))
    return MuonAdamW(pgroups, **adamw), mults


def adamw_kernel(dev):
    """AdamW's implementation on dev, as torch.optim.AdamW keyword arguments: fused on CUDA (one kernel updates
    every parameter of a group: no per-tensor launches), foreach on a CPU (the fp32 reference path: the plain
    AdamW ops, batched over tensors). Both take FSDP2's DTensors."""
    return dict(fused=True, foreach=False) if dev.type == "cuda" else dict(fused=False, foreach=True)


def full_state(model, opt, D):
    """(model state, optimizer state) whole, as one process would have them, on rank 0 (CPU): the same
    checkpoint from 1 process, DDP or FSDP2 (torch.distributed.checkpoint gathers the shards). A collective
    under FSDP2: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    o = StateDictOptions(full_state_dict=True, cpu_offload=D.world > 1)
    return get_model_state_dict(model, options=o), get_optimizer_state_dict(model, opt, options=o)


def load_optimizer(model, opt, state):
    """Load a full (gathered) optimizer state into opt, on one process, DDP or FSDP2 alike (the inverse of
    full_state's second half: under FSDP2 each rank keeps its own shard of Adam's m and v)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def make_tokenizer(name, base_vocab=None):
    """Config key `tokenizer`: 'shapes-bpe' is the shapes world's own BPE (shapes.tokenizer); anything else a local
    file or a cached tiktoken name (data.build_tokenizer)."""
    if name == "shapes-bpe":
        import shapes
        return shapes.tokenizer(base_vocab)
    import data
    return data.build_tokenizer(name, base_vocab)


def check_out_dir(out_dir):
    """Create out_dir and prove it writable with a probe file, before anything is built or trained."""
    probe = os.path.join(out_dir, f".write_probe_{os.getpid()}")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"out_dir={out_dir!r} is not writable ({e.strerror or e}): checkpoints go there") from None


SESSION_KEYS = ("init_from", "stop_at", "dry_run", "trust_checkpoint", "threads", "out_dir", "device")


def check_against_checkpoint(cfg, given, mc, saved_cfg, source, print=print, fixed_steps=None):
    """A run started from a checkpoint (init_from = a ckpt.pt, a Molmo2 directory, or 'resume') takes its
    architecture from it. The rule, one for every key:
      - an architecture key (MODEL_KEYS) set in a config file or on the command line to another value than the
        checkpoint's is an error naming the keys (it would be ignored otherwise);
      - on resume, every other key that differs from the checkpoint's run takes effect from the resumed step, and
        is printed as a note (lr, schedule, batch...; the session keys of SESSION_KEYS are not compared), except
        max_minutes and max_steps once a budget fixed the step count (fixed_steps): that count stands, and the note
        says so; and `optimizer`, whose saved state fits only the optimizer that wrote it, is an error.
    cfg is updated to the architecture that runs, so the checkpoint saves the configuration that ran."""
    def same(a, b):
        return (tuple(a) if isinstance(a, (list, tuple)) else a) == (tuple(b) if isinstance(b, (list, tuple)) else b)
    clash = [f"{k}={cfg[k]!r} (checkpoint: {mc[k]!r})" for k in MODEL_KEYS
             if k in given and k in mc and not same(cfg[k], mc[k]) and not (k in ("base_vocab", "n_extra") and cfg[k] == 0)]
    if clash:
        raise SystemExit(f"{source}: the checkpoint fixes the architecture, but the config sets " + ", ".join(clash)
                         + ": remove these keys, or start from scratch")
    for k in MODEL_KEYS:
        cfg[k] = mc[k]
    if saved_cfg is None:
        return
    was = saved_cfg.get("optimizer", "adamw")  # its state (Adam's moments, Muon's momentum) fits that optimizer only
    if cfg["optimizer"] != was:
        raise SystemExit(f"{source}: resume continues the optimizer that saved its state, optimizer={was!r}; the "
                         f"config sets {cfg['optimizer']!r}")
    for k, v in cfg.items():
        if k not in MODEL_KEYS and k not in SESSION_KEYS and k in saved_cfg and not same(saved_cfg[k], v):
            effect = ("no effect: the step count the budget fixed, " + f"{fixed_steps:,}, stands"
                      if fixed_steps and k in ("max_minutes", "max_steps") else "takes effect from here")
            print(f"resume: {k} = {v!r} (the checkpoint's run had {saved_cfg[k]!r}): {effect}")


def mixture_of(C):
    """(weights, sizes) from the config: the weights by the fixed or the sqrt-proportional rule (mixing.py); the
    sizes the sampler walks (shuffled epochs of each finite dataset): the local copies' sizes for real data
    whatever the rule, the configured sizes under the sqrt rule, else None (shapes tasks are procedural: an index
    is a scene seed)."""
    import mixing
    sizes = C.dataset_sizes if C.mixing_rule == "sqrt" else None
    walk = C.dataset_sizes if C.dataset != "shapes" else sizes
    try:
        return mixing.mixture_weights(C.mixture, sizes, C.dataset_caps, C.flat_groups), walk
    except ValueError as e:
        raise SystemExit(f"mixture: {e}") from None


def missing_paths(C):
    """The local files and directories the config names that do not exist, as 'key=path (what)' lines."""
    want = [("init_llm", C.init_llm, os.path.isdir, "a Qwen3 checkpoint directory"),
            ("init_vit", C.init_vit, os.path.isdir, "a SigLIP checkpoint directory")]
    if C.init_from not in ("scratch", "resume"):
        want.append(("init_from", C.init_from, os.path.exists, "a ckpt.pt or a Molmo2 checkpoint directory"))
    if C.tokenizer.endswith((".json", ".tiktoken")):
        want.append(("tokenizer", C.tokenizer, os.path.isfile, "a tokenizer file"))
    if C.dataset != "shapes":
        want += [(f"data_paths[{n!r}]", p, os.path.isfile, "a dataset's local copy") for n, p in C.data_paths.items()]
        want.append(("media_root", C.media_root, os.path.isdir, "the datasets' images and videos"))
    want += [(f"eval_data[{n!r}]", p, os.path.isfile, "a held-out set's local copy") for n, p in C.eval_data.items()]
    return [f"{key}={path!r} ({what})" for key, path, exists, what in want if path and not exists(path)]


def load_datasets(C, log):
    """Real data: every dataset the mixture names, read from its local copy (readers.read_dataset: grouped per image,
    malformed rows and missing media skipped and counted, one summary line each). Returns {name: examples}."""
    import readers
    names = [n for _, leaves in C.mixture.values() for n in leaves]
    missing = [n for n in names if n not in C.data_paths]
    if missing:
        raise SystemExit(f"data_paths has no local copy for {missing} (the mixture names them): set data_paths = "
                         f"{{name: 'path/to/rows.jsonl'}}; readers exist for {', '.join(sorted(readers.READERS))}")
    try:
        return {n: readers.read_dataset(n, C.data_paths[n], C.media_root, log)[0] for n in names}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


def pretrain_vit(model, C, dev, autocast, print=print):
    """Pretrain the ViT and the connector before stage 1: the shapes world's stand-in for the SigLIP2 checkpoint
    Molmo2 starts from. Returns the per-step losses and the held-out figures of the image windows: centre_acc (the
    share of windows holding an object's centre whose pair is named right) and centre_err_px (that centre's mean
    error); and video_centre_acc, video_centre_err_px, the same for a video frame's windows.

    Trained from scratch *through* the LLM, the ViT learns shapes far too slowly for a CPU budget: its only
    teacher is a decoder that is itself random and reads the image through a few attention weights. Here a
    temporary linear head reads every pooled token the LLM will later see, (N, T, d_model) from vit + connector,
    and predicts, per token: which (colour, shape) pair has its centre in the token's window (21-way, "none"
    included), that centre's x and y as 32 bins each, and which pairs cover the window (a sigmoid per pair,
    SigLIP-style). Dense labels give each image T x 23 targets instead of 20 image-level bits, and they ask for
    exactly what pointing reads from a token: what is here, and where its centre is. The head is dropped afterwards.
    Both window sizes the LLM will see are taught, from the same ViT features: an image's 2x2 windows and a video
    frame's 3x3 (pool_h/w, video_pool_h/w), the loss their mean. Stage 1 shows only images, so without the 3x3 half
    the connector would first pool a frame in stage 2, untaught (docs/experiments.md)."""
    import shapes
    from data import pooling_index
    c = model.c
    n_pairs, nb = len(shapes.ATTRIBUTE_PAIRS), shapes.CENTRE_BINS
    # The temporary head: one linear layer from each pooled token (d_model) to three groups of logits, the 21-way
    # "which pair is centred here" (20 pairs + none), the centre's x and y as nb bins each, and 20 cover bits.
    head = torch.nn.Linear(c.d_model, (n_pairs + 1) + 2 * nb + n_pairs).to(dev)
    params = list(model.vit.parameters()) + list(model.connector.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=C.vit_pretrain_lr, betas=(C.beta1, C.beta2), eps=C.adam_eps, weight_decay=0.0,
                            **adamw_kernel(dev))
    size, n, bs = c.image_size, C.vit_pretrain_steps, C.vit_pretrain_batch
    pools = ((c.pool_h, c.pool_w), (c.video_pool_h, c.video_pool_w))  # an image's windows, a video frame's
    g = size // c.patch_size
    idxs = [torch.tensor(pooling_index(g, g, *p)[0], device=dev) for p in pools]  # (T, k) patch ids, -1 = pad

    def predict(x):  # (N, 3, H, W) -> per window size, logits: centre (N, T, 21), bins (N, T, 2, nb), cover (N, T, 20)
        N, outs = x.shape[0], []
        with autocast():
            f = model.vit(x.to(dev)).flatten(0, 1)                                # (N * P, Cin), once for both
        for idx in idxs:
            pidx = torch.where(idx >= 0, idx + g * g * torch.arange(N, device=dev)[:, None, None], -1)
            with autocast():
                tok = model.connector(f, pidx.flatten(0, 1)).view(N, idx.shape[0], -1)
            pc, pb, pv = head(tok.float()).split([n_pairs + 1, 2 * nb, n_pairs], -1)  # (N, T, 21 + 2 nb + 20)
            outs.append((pc, pb.unflatten(-1, (2, nb)), pv))
        return outs

    xv, lv = shapes.dense_batch(0, 256, size, c.patch_size, pools, offset=0)  # held-out (eval seed space)

    def held_out():  # per window size, on the windows that hold a centre: share with the right pair, mean error (px)
        with torch.no_grad():
            out = predict(xv)
        figs = []
        for (pc, pb, _), (cv, bv, _) in zip(out, lv):
            cv, bv = cv.to(dev), bv.to(dev)
            has = cv < n_pairs
            figs += [(pc.argmax(-1) == cv)[has].float().mean().item(),
                     ((pb.argmax(-1) - bv).abs().float() * size / nb)[has].mean().item()]
        return figs  # [image acc, image err, video acc, video err]

    F = torch.nn.functional

    def show(acc, err, vacc, verr):
        return (f"held-out centre pair {acc:.3f} (chance 0.05), centre error {err:.1f} px; "
                f"video frame windows {vacc:.3f}, {verr:.1f} px")

    t0, losses = time.time(), []
    print(f"vision pretraining (stand-in for SigLIP2): {n} steps of {bs} shapes images; {show(*held_out())}")
    for s in range(n):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(s, C.vit_pretrain_lr, max(1, n // 10), n, C.min_lr_frac)
        # a fresh batch of bs training scenes with its dense labels, per window size: centre (N, T) class ids
        # (n_pairs = none), bins (N, T, 2) x/y bin ids (-100 where no centre), cover (N, T, n_pairs) 0/1
        x, labels = shapes.dense_batch(s * bs, bs, size, c.patch_size, pools)
        loss = 0.0
        for (pc, pb, pv), (centre, bins, cover) in zip(predict(x), labels):
            loss = loss + (F.cross_entropy(pc.flatten(0, 1), centre.to(dev).flatten())
                           + F.cross_entropy(pb.flatten(0, 2), bins.to(dev).flatten())  # -100 (no centre) ignored
                           + F.binary_cross_entropy_with_logits(pv, cover.to(dev)) * n_pairs) / len(pools)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, C.grad_clip)
        opt.step()
        losses.append(loss.item())
        recent = sum(losses[-50:]) / len(losses[-50:])
        if (s + 1) % 50 == 0 or s + 1 == n:
            el = time.time() - t0
            print(f"vision step {s + 1:4d}/{n} | loss {recent:.4f} | elapsed {fmt_time(el)} | "
                  f"ETA {fmt_time(el / (s + 1) * (n - s - 1))}", flush=True)
    figs = held_out()
    print(f"vision pretraining done in {fmt_time(time.time() - t0)}: loss {losses[0]:.3f} -> {recent:.3f}, "
          f"{show(*figs)}")
    return losses, dict(zip(("centre_acc", "centre_err_px", "video_centre_acc", "video_centre_err_px"), figs))


def fit_budget(C, step, step_s, t_start, evals, run_eval, print=print):
    """max_minutes: the run's total step count, decided at `step` from the measured step time step_s and the time
    spent since t_start. The evals' cost is measured too: one periodic eval now, every answer generated to its
    token limit (full_length: a trained model's answers stop earlier, an untrained one's may stop at once, so this is
    the most an eval can cost; its figures are not kept), scaled to the final eval's prompts, twice with the blind
    baseline: a price that errs early, until the first periodic eval's real cost replaces it
    (StepBudget.measured_eval). Every rank calls it (run_eval is collective) and gets the same answer (rank 0's
    figures are broadcast). Returns (steps, eval_s, final_s): the re-fits reuse the costs."""
    eval_s = final_s = 0.0
    if evals and C.eval_prompts:
        t = time.time()
        run_eval(C.eval_prompts, full_length=True)
        eval_s = time.time() - t
        final_s = eval_s * C.final_eval_prompts / C.eval_prompts * (2 if C.blind_baseline else 1)
    budget = 60 * C.max_minutes * BUDGET_MARGIN
    spent = time.time() - t_start
    n = steps_in_budget(budget, spent, step, step_s, eval_s, final_s, C.eval_interval, C.max_steps)
    print(f"max_minutes={C.max_minutes:g}: {fmt_time(spent)} spent by step {step}; {step_s:.2f} s a step, "
          f"{eval_s:.1f} s a periodic eval, {final_s:.1f} s for the final one -> {n:,} steps fit "
          f"{BUDGET_MARGIN:.0%} of the budget (max_steps {C.max_steps:,}); warmup {C.warmup_steps}, cosine to step {n:,}",
          flush=True)
    return n, eval_s, final_s


class StepBudget:
    """How many steps a run makes, and under max_minutes when that is decided. The lifecycle, in order:
      1. without max_minutes the count is max_steps, and nothing is decided;
      2. a max_minutes run with no count yet (a fresh run, or one resumed from a checkpoint written before the
         decision) lays its schedule over max_steps for now, and times its steps start+3 .. start+10 (start: the
         step it began at; the first two steps, memory allocation and kernel choice, are not timed);
      3. at step start+10 (decide_at, BUDGET_PROBE_STEPS after start; `due` says when) Trainer.fix_budget decides
         the count (fit_budget: the measured step and eval times against what is left of the budget, at most
         max_steps) and `fix` records it with the eval costs. The probe ends inside the warmup, whose LR does not
         depend on the count;
      4. from then on, at every log or eval point, Trainer.refit_budget checks the end the run heads for at its
         recent step time (`observe`: the mean over the last REFIT_WINDOW steps, evals excluded) and the cost of
         its latest periodic eval (`measured_eval`, scaled to the final one): off the plan by
         more than REFIT_BAND of the budget (a step time that drifted), or off it at all at the first check after a
         periodic eval re-priced the evals (`repriced`), the count is fitted again to what is left
         of the budget (at least the next step, at most max_steps) and `fix` records it; the cosine is laid over
         the new count from there (the LR steps down, or up if the count grew, by the change of its position);
      5. the count is saved in every checkpoint (budget_steps), so a resumed run keeps it and neither probes nor
         fits again (its clock is not the budget's: a changed max_minutes or max_steps then has no effect, and is
         noted as such: check_against_checkpoint)."""

    def __init__(self, max_minutes, max_steps, fixed, start):
        """fixed: the checkpoint's count (budget_steps), or None; start: the step the run begins at."""
        self.total = fixed or max_steps  # what the schedule is laid over now
        self.decide_at = start + BUDGET_PROBE_STEPS if max_minutes and not fixed else None  # None: nothing to decide
        self.t_probe = None
        self.refits = False           # True once this run fixed the count: it re-fits from then on
        self.eval_s = self.final_s = 0.0  # a periodic eval's cost and the end's, measured at the decision
        self.repriced = False         # True from a periodic eval's new price until the re-fit check that acts on it
        self.marks = []               # [(step, training seconds)] at the re-fit checks of the last REFIT_WINDOW steps

    def due(self, step):
        """Called after every applied step: starts the probe's clock once its two untimed steps are done; True at
        the step where the count is decided."""
        if self.decide_at is None:
            return False
        if step == self.decide_at - BUDGET_PROBE_STEPS + 2:
            self.t_probe = time.time()
        return step == self.decide_at

    def probe_step_s(self):
        """The mean time of the probe's timed steps, in seconds."""
        return (time.time() - self.t_probe) / (BUDGET_PROBE_STEPS - 2)

    def fix(self, total, eval_s=None, final_s=None):
        """The decision or a re-fit: total steps from now on, the eval costs when measured. Returns total."""
        self.total, self.decide_at, self.refits = total, None, True
        if eval_s is not None:
            self.eval_s, self.final_s = eval_s, final_s
        return total

    def measured_eval(self, seconds, eval_seconds, C):
        """A periodic eval ran: its real cost (seconds with its checkpoint; eval_seconds the eval alone) replaces the
        decision's worst case in the re-fits that follow, and the final eval's is scaled from it as fit_budget
        scales. The worst case (every answer to its token limit) is right before any training, but a trained
        model's answers stop early: on a Zen 3 it put stage 1's end at 87 s (measured: 31 s) and stage 2's at
        253 s (133 s), a run ending 1-2 minutes early (docs/experiments.md). The scaling is by prompts, which holds
        when the periodic eval fills its generation batches (the shapes eval answers 100 prompts a batch):
        a half batch costs more than half a full one (stage 2 at 50 prompts priced its end at 240 s; it took 156)."""
        if self.refits:
            self.eval_s = seconds
            self.final_s = eval_seconds * C.final_eval_prompts / C.eval_prompts * (2 if C.blind_baseline else 1)
            self.repriced = True

    def observe(self, step, seconds):
        """A re-fit check at `step`, `seconds` of training so far (evals excluded): the mean step time since the
        oldest check of the last REFIT_WINDOW steps, or None until REFIT_WINDOW steps have been measured."""
        self.marks = [m for m in self.marks if m[0] >= step - REFIT_WINDOW] + [(step, seconds)]
        (s0, t0), (s1, t1) = self.marks[0], self.marks[-1]
        return (t1 - t0) / (s1 - s0) if s1 - s0 >= REFIT_WINDOW else None  # fewer steps: too noisy to act on


def fmt_time(s):
    """Seconds -> 'h:mm:ss' for the log lines."""
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def throughput_drift(marks, n=100):
    """marks: [(step, tokens, training seconds)], the run's totals at its start and at each log line -> a line
    comparing the tok/s of the first n steps with that of the last n (None for a run under 2n steps). A step that
    slows as the run goes on (memory growth, a leak, denormals, a busier host) shows here as a fall."""
    if marks[-1][0] - marks[0][0] < 2 * n:
        return None
    first = next(m for m in marks if m[0] >= marks[0][0] + n)
    last = next(m for m in reversed(marks) if m[0] <= marks[-1][0] - n)
    a = first[1] / first[2]
    z = (marks[-1][1] - last[1]) / (marks[-1][2] - last[2])
    return (f"tok/s of the first {first[0] - marks[0][0]} steps {a:,.0f}, of the last {marks[-1][0] - last[0]} "
            f"{z:,.0f} ({100 * (z / a - 1):+.0f}%)")



# ---------------------------------------------------------------------------------------------------------
# The run, top to bottom: main() reads as its steps; each step is a function or a method of Trainer below.

def main(argv=()):
    """One training run. Returns dict(losses, steps) and, after a final eval, final (and blind) metrics."""
    t_start = time.time()                           # max_minutes counts from here
    given = set()                                   # the keys a config file or the command line set
    C = types.SimpleNamespace(**configure(argv, {k: globals()[k] for k in CONFIG_KEYS}, given))
    check_config(C)                                 # 1. configure: every key checked before anything is built
    env = setup_run(C)                              # 2. device, processes, seeds, dtype
    start = load_start(C, env.print)                # 3. what the run starts from: scratch, a checkpoint, a Molmo2 dir
    tok, mconf = build_model_config(C, given, start, env.print)
    data_src = build_mixture(C, env.print)          # 4. the data: the mixture and (real data) the local copies
    model = build_model(C, mconf, start, env.print)
    if C.dry_run:
        env.print("dry_run: stopping before the first step")
        return dict(model=model, counts=model.param_counts())
    run = Trainer(C, env, tok, mconf, model, data_src, start, t_start)  # 5. initialise or resume
    run.train()                                     # 6. the loop
    return run.finish()                             # 7. final checkpoint, eval, baseline, curve


def check_config(C):
    """Keys that take one of a few words, lower bounds, and the keys that name tasks: a typo stops here, named."""
    for key, allowed in CHOICES.items():
        if getattr(C, key) not in allowed:
            raise SystemExit(f"config key {key!r} must be one of {allowed}, got {getattr(C, key)!r}")
    for key, least in (("vit_pretrain_steps", 0), ("vit_pretrain_batch", 1), ("lr_vit_mult", 0),
                       ("lr_connector_mult", 0), ("max_minutes", 0), ("max_bad_steps", 1), ("max_broken_frac", 0),
                       ("attn_tile", 0), ("data_workers", -1), ("prefetch", 1)):
        if getattr(C, key) < least:
            raise SystemExit(f"config key {key!r} must be >= {least}, got {getattr(C, key)!r}")
    for key in ("absent_rate", "multi_rate"):
        if not 0.0 <= getattr(C, key) <= 1.0:
            raise SystemExit(f"config key {key!r} must be in [0, 1], got {getattr(C, key)!r}")
    for task, m in C.first_token_mults.items():  # a misspelt task would silently weight nothing
        if task not in C.task_weights or not isinstance(m, (int, float)) or m <= 0:
            raise SystemExit(f"first_token_mults[{task!r}] = {m!r}: keys must be tasks of task_weights "
                             f"({', '.join(sorted(C.task_weights))}) and values positive numbers")
    import readers
    from eval import EVAL_METRICS, SCORED_TASKS
    bad = [t for t in C.eval_tasks if t not in SCORED_TASKS]  # found now, not at the first eval minutes later
    if bad:
        raise SystemExit(f"eval_tasks: {bad} cannot be scored; scored tasks are {', '.join(SCORED_TASKS)}")
    bad = [n for n in C.eval_data if readers.reader_name(n) not in EVAL_METRICS]
    if bad:
        raise SystemExit(f"eval_data: {bad} have no metric; eval.EVAL_METRICS scores {', '.join(EVAL_METRICS)}")
    for key in ("init_llm", "init_vit"):
        if getattr(C, key) and C.init_from != "scratch":
            raise SystemExit(f"{key} initialises a model built from scratch; init_from={C.init_from!r} loads one")
    if C.optimizer == "muon" and C.fsdp:  # Newton-Schulz needs each matrix whole; FSDP2 holds a shard per rank
        raise SystemExit("optimizer='muon' orthogonalises whole matrices: it runs under DDP or one process, not "
                         "fsdp=True")
    if C.packing and C.dataset != "shapes":  # an example that can never fit a packed row stops the run mid-way
        names = [n for spec in C.mixture.values() for n in (spec[1] if isinstance(spec, tuple) else ())]
        videos = any(n in readers.SOURCES and readers.SOURCES[n].video for n in names)
        if videos and C.max_images_per_row < C.max_frames:
            raise SystemExit(f"max_images_per_row={C.max_images_per_row} < max_frames={C.max_frames}: a packed row "
                             f"must hold one video of max_frames frames (the mixture has videos)")
    wandb_required(C.wandb_log)  # wandb_log=True without the package: said now, not after the vision pretraining
    missing = missing_paths(C)  # every path the config names, checked before anything is built
    if missing and not C.dry_run:
        raise SystemExit("missing paths (nothing is downloaded; copy them here or override the keys):\n  "
                         + "\n  ".join(missing))


def autocast_for(dev, dtype):
    """The context every forward of the run enters: autocast to dtype on dev, or nothing for fp32 (the reference)."""
    return (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype != torch.float32 else nullcontext


def setup_run(C):
    """The device (one GPU per process under torchrun), the process layout (Dist), seeds, the training dtype and
    its autocast, and `print`: rank 0 speaks for the run. Checks out_dir is writable before anything is built."""
    dev = resolve_device(C.device)
    D = setup_distributed(C, dev.type)
    if dev.type == "cuda" and D.world > 1:
        dev = torch.device("cuda", D.local_rank)
        torch.cuda.set_device(dev)
    say = builtins.print if D.rank == 0 else (lambda *a, **k: None)
    if C.threads:
        torch.set_num_threads(C.threads)
    if dev.type == "cpu":
        keep_freed_memory()  # the step's activations reuse freed pages instead of faulting in fresh ones
    torch.manual_seed(C.seed)
    random.seed(C.seed)
    np.random.seed(C.seed)
    dtype = resolve_dtype(C.dtype, dev, say)
    if D.world > 1 and C.dtype == "auto":  # each rank measured its own CPU: they must compute alike, rank 0 decides
        dtypes = list(DTYPES.values())
        dtype = dtypes[int(broadcast_scalar(dtypes.index(dtype), D, dev))]
    autocast = autocast_for(dev, dtype)
    if not C.dry_run:
        check_out_dir(C.out_dir)  # now, not at the first checkpoint after hours of training
        if remove_stale_tmp(os.path.join(C.out_dir, "ckpt.pt")):
            say(f"removed {os.path.join(C.out_dir, 'ckpt.pt.tmp')}, a checkpoint write that never finished")
    return types.SimpleNamespace(dev=dev, D=D, print=say, dtype=dtype, autocast=autocast)


def load_start(C, print=print):
    """init_from: 'scratch' (nothing), 'resume' (out_dir/ckpt.pt, the whole state), a ckpt.pt (its weights) or a
    Hugging Face Molmo2 directory (its architecture and weights). Returns a namespace: path, ckpt (the loaded dict
    or None), hf_model and hf_ids (a Molmo2 directory's model and special-token ids, or None)."""
    start = types.SimpleNamespace(path=None, ckpt=None, hf_model=None, hf_ids=None)
    if C.init_from == "scratch":
        return start
    if C.dry_run:
        print(f"dry_run: init_from={C.init_from!r} not loaded; the model is built from the config")
        return start
    start.path = os.path.join(C.out_dir, "ckpt.pt") if C.init_from == "resume" else C.init_from
    if not os.path.exists(start.path):
        raise SystemExit(f"init_from={C.init_from!r}: checkpoint {start.path} not found")
    if os.path.isdir(start.path):
        from hf import load_hf_molmo2
        start.hf_model, start.hf_ids = load_hf_molmo2(start.path)
        return start
    try:
        start.ckpt = load_checkpoint(start.path, trust=C.trust_checkpoint)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    return start


def build_model_config(C, given, start, print=print):
    """(tokenizer, model.ModelConfig). A checkpoint brings its tokenizer and fixes the architecture
    (check_against_checkpoint); from scratch, base_vocab / n_extra of 0 take the tokenizer's counts, its vision
    tokens landing on the extra embedding rows. A dry run with base_vocab set builds no tokenizer (real vocab)."""
    import data
    from model import ModelConfig
    from hf import check_token_ids
    tok = None
    if not (C.dry_run and C.base_vocab):
        tok = data.Tokenizer(**start.ckpt["tokenizer"]) if start.ckpt else make_tokenizer(C.tokenizer,
                                                                                         C.base_vocab or None)
    mc = {k: getattr(C, k) for k in MODEL_KEYS}
    if start.ckpt:
        mc.update(start.ckpt["model_config"])
    if start.hf_model is not None:
        mc = dataclasses.asdict(start.hf_model.c)
        check_token_ids(start.hf_ids, tok, f"init_from={start.path}")
    if start.ckpt or start.hf_model is not None:
        resume = start.ckpt is not None and C.init_from == "resume"
        check_against_checkpoint(vars(C), given, mc, start.ckpt["config"] if resume else None, start.path, print,
                                 start.ckpt.get("budget_steps") if resume else None)
    elif tok:
        mc["base_vocab"], mc["n_extra"] = mc["base_vocab"] or tok.base_vocab, mc["n_extra"] or tok.n_extra
        if tok.base_vocab != mc["base_vocab"] or tok.n_extra > mc["n_extra"]:
            raise SystemExit(f"tokenizer {C.tokenizer!r}: base_vocab {tok.base_vocab} and {tok.n_extra} vision rows "
                             f"do not fit the model's base_vocab={mc['base_vocab']}, n_extra={mc['n_extra']}")
        mc["im_patch_id"] = tok.im_patch
    else:
        mc["im_patch_id"] = mc["base_vocab"]
    return tok, ModelConfig(**mc)


def build_mixture(C, print=print):
    """The data side: (weights, sizes, real). real: {dataset: examples} read from the local copies (None for the
    shapes world); their sizes replace dataset_sizes for the sqrt rule. Prints the mixture table."""
    import mixing
    real = None
    if C.dataset != "shapes" and not C.dry_run:
        real = load_datasets(C, print)
        C.dataset_sizes = {n: len(v) for n, v in real.items()}
    weights, sizes = mixture_of(C)
    print(f"mixture ({C.mixing_rule} rule; examples drawn i.i.d. per example):")
    n_run = None if C.packing else C.max_steps * C.batch_size * C.grad_accum  # packed rows hold a varying number
    rated = [n for g in C.flat_groups for n in C.mixture[g][1]] if C.mixing_rule == "sqrt" else []
    print(mixing.mixture_table(weights, C.dataset_sizes, n_run, C.dataset_caps, rated=rated))
    return types.SimpleNamespace(weights=weights, sizes=sizes, real=real)


def build_model(C, mconf, start, print=print):
    """The model: a Molmo2 directory's, or a new one (its LLM from Qwen3, its ViT from SigLIP when the config
    names them). A ckpt.pt's weights are loaded later (Trainer), on the device."""
    from model import Molmo2
    from hf import init_llm_from_qwen3, init_vit_from_siglip
    model = start.hf_model if start.hf_model is not None else Molmo2(mconf)
    if start.hf_model is not None:
        print(f"initialised from {C.init_from}: a Hugging Face Molmo2 checkpoint (its architecture and weights)")
    if C.init_llm and not C.dry_run:
        init_llm_from_qwen3(model, C.init_llm)
        print(f"LLM initialised from {C.init_llm}")
    if C.init_vit and not C.dry_run:
        init_vit_from_siglip(model, C.init_vit)
        print(f"ViT initialised from {C.init_vit}")
    counts = model.param_counts()
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()) +
          f", total {sum(counts.values()) / 1e6:.2f}M")
    import data
    n = data.vision_token_counts(mconf)
    print(f"vision tokens: an image is {n['image']} LLM tokens" + (" a crop (multi-crop: more)" if mconf.max_crops else "")
          + f", a video frame {n['frame']} + 4-7 for its time text ({mconf.image_size} px, patch {mconf.patch_size}, "
          f"{mconf.pool_h}x{mconf.pool_w} / {mconf.video_pool_h}x{mconf.video_pool_w} pooling)")
    return model


class Trainer:
    """The training state of one run and what is done with it: initialise or resume (__init__), the loop (train),
    checkpoints, evals, the end (finish). Attributes: C (the configuration), env (device, processes, dtype),
    model and wrapped (DDP / FSDP2 around it), opt, sampler and packer (the data stream), step, history."""

    def __init__(self, C, env, tok, mconf, model, data_src, start, t_start):
        """Initialise (or resume) a run. The order matters: the weights are loaded before the model is wrapped
        (DDP broadcasts rank 0's weights at wrapping, FSDP2 shards whatever it finds), the ViT is pretrained or
        frozen before the optimizer sees its parameters, and the optimizer is built after wrapping (FSDP2
        replaces the parameters by sharded DTensors). A resume then overwrites the fresh state: optimizer,
        step, random generators and the data stream's position."""
        import mixing
        self.C, self.env, self.tok, self.mconf, self.model, self.t_start = C, env, tok, mconf, model, t_start
        D, dev, print = env.D, env.dev, env.print
        model.to(dev)
        if D.world > 1:
            print(f"torchrun: {D.world} processes = dp {D.dp} x cp {D.cp}"
                  + (f" ({C.cp_mode} attention)" if D.cp > 1 else "") + f", {'FSDP2' if C.fsdp else 'DDP'}, "
                  f"{dist.get_backend()}; global batch {D.dp * C.batch_size * C.grad_accum} rows")
        self.sampler = mixing.MixtureSampler(data_src.weights, data_src.sizes, seed=C.seed, rank=D.dp_rank,
                                             world_size=D.dp)
        self.step, self.history, self.budget_steps = 0, dict(step=[], loss=[], evals=[]), None
        ckpt, resume = start.ckpt, C.init_from == "resume"
        # weights: before wrapping (DDP broadcasts them, FSDP2 shards them)
        if ckpt:
            model.load_state_dict(ckpt["model"])
            if not resume:
                print(f"initialised weights from {C.init_from}")
        model.attn_impl = C.attn_impl
        model.act_ckpt = model.vit.act_ckpt = C.act_ckpt  # the LLM's blocks and the ViT's
        model.loss_chunk = C.loss_chunk
        model.attn_tile = C.attn_tile
        self.step_choice = self.choose_step(data_src, ckpt.get("step_choice") if ckpt and resume else None)
        if C.vit_pretrain_steps and C.init_from == "scratch" and not C.init_vit:  # other runs have a ViT already
            pretrain_vit(model, C, dev, env.autocast, print)
        freeze_vit(model, C)
        if D.cp > 1:
            from cp_attention import ContextParallel
            if C.cp_mode == "ulysses" and mconf.n_head % D.cp:
                raise SystemExit(f"cp_mode='ulysses' splits the {mconf.n_head} heads over cp={D.cp} ranks: it must "
                                 f"divide")
            model.cp = ContextParallel(D.cp_group, C.cp_mode)
        self.wrapped = wrap_model(model, C, D, dev, env.dtype)  # FSDP2 swaps in sharded parameters: the optimizer
        self.no_sync = no_sync_of(self.wrapped)                   # comes after
        self.opt, self.mults = make_optimizer(model, C, dev)
        hidden = [p for g in self.opt.param_groups if g.get("muon") for p in g["params"]]
        if hidden:
            env.print(f"optimizer: Muon on the LLM's {len(hidden)} hidden matrices ({sum(p.numel() for p in hidden) / 1e6:.2f}M "
                      f"parameters; muon.py), AdamW on the rest")
        if C.compile_blocks == 1 or (C.compile_blocks == -1 and dev.type == "cuda"):
            from model import compile_blocks
            compile_blocks(model)  # in place, block by block: the FSDP2 / DDP wrapping above is unchanged
        # the data stream (loader.py): keys drawn here, examples encoded ahead in worker processes, packed here
        self.stream = TrainingStream(C, tok, mconf, self.sampler, dev, data_src.real, D)
        self.get_batch, self.packer, self.media = self.stream.get_batch, self.stream.packer, self.stream.media
        self.evals = data_src.real is None or bool(C.eval_data)  # shapes tasks, or the real held-out sets
        if resume:
            self.resume(ckpt)
        self.saved_at = self.step if resume else None  # the step of the checkpoint now in out_dir, if any
        # out_dir/metrics.jsonl, rank 0's: a resume first drops the lines logged after its checkpoint (MetricsLog)
        self.metrics = MetricsLog(os.path.join(C.out_dir, "metrics.jsonl"), on=D.rank == 0,
                                  resume_step=self.step if resume else None,
                                  wandb=dict(project=C.wandb_project, name=C.wandb_run_name, config=vars(C))
                                  if C.wandb_log else None)

    def choose_step(self, data_src, saved):
        """dtype 'auto' on a CPU whose bf16 matmuls beat fp32's (machine.resolve_dtype chose bf16): the precision and
        attn_tile this run trains with, by timing the training step itself, forward + backward on two batches of
        its own mixture (a stream of its own: the run's is not touched), for bf16 and fp32 each with the config's
        attn_tile and with 0 (machine.fastest). A large matmul's rate does not decide it: on an AMX Xeon bf16
        multiplies 4.5x faster than fp32 while its step was only 4-21% faster, and attn_tile=64 was slower than 0 in
        bf16 and faster in fp32. Elsewhere (CUDA, fp32-only CPUs, a set dtype, torchrun) nothing is timed. The choice
        is kept in the checkpoint and a resumed run takes it from there (saved), so that it computes as the run it
        continues, unless this CPU has no fast bf16 (resumed elsewhere: fp32, said). Returns {"dtype",
        "attn_tile"}, or None when nothing was chosen."""
        C, env, model = self.C, self.env, self.model
        if env.dev.type != "cpu" or C.dtype != "auto" or env.D.world > 1:
            return None
        if saved is not None and saved["dtype"] == "bfloat16" and env.dtype != torch.bfloat16:
            env.print("step probe: the checkpoint's run chose bfloat16, which this CPU runs slowly: float32 (the "
                      "resumed steps compute in another precision than the run's first part)")
            return None
        if saved is None and env.dtype != torch.bfloat16:
            return None
        if saved is not None:
            env.print(f"step probe: the checkpoint's choice, dtype {saved['dtype']}, attn_tile={saved['attn_tile']}")
        else:
            import mixing
            stream = TrainingStream(C, self.tok, self.mconf, mixing.MixtureSampler(
                data_src.weights, data_src.sizes, seed=C.seed + 1), env.dev, data_src.real)
            batches = [stream.get_batch() for _ in range(2)]
            stream.close()
            runs = []

            def run(c):  # round r gives every candidate batches[r % 2]: each is timed on the same batches
                model.attn_tile, dt = c[1], DTYPES[c[0]]
                with autocast_for(env.dev, dt)():
                    ls, ws = model(batches[len(runs) // len(candidates) % 2])
                (ls / ws).backward()
                model.zero_grad(set_to_none=True)
                runs.append(c)
            candidates = list(dict.fromkeys((d, t) for d in ("bfloat16", "float32") for t in (C.attn_tile, 0)))
            vit = [p for p in model.vit.parameters() if p.requires_grad and C.lr_vit_mult == 0]
            for p in vit:  # timed as it will train: a frozen ViT has no backward (frozen for good further on)
                p.requires_grad_(False)
            (dtype, tile), times = fastest(candidates, run)
            for p in vit:
                p.requires_grad_(True)
            env.print("step probe (forward + backward, best of 2 rounds, every candidate on the same 2 batches): " + ", ".join(
                f"{d} attn_tile={t} {1e3 * s:.0f} ms" for (d, t), s in times.items())
                + f" -> dtype {dtype}, attn_tile={tile}")
            saved = dict(dtype=dtype, attn_tile=tile)
        model.attn_tile = saved["attn_tile"]
        env.dtype = DTYPES[saved["dtype"]]
        env.autocast = autocast_for(env.dev, env.dtype)
        return saved

    def resume(self, ckpt):
        """The whole state of the run that wrote ckpt: optimizer (this run's hyperparameters), step, the budget's
        step count, the curve, the random generators, and each rank's sampler and packer buffer."""
        C, D = self.C, self.env.D
        load_optimizer(self.model, self.opt, ckpt["optimizer"])
        for g in self.opt.param_groups:  # the loaded state carries the old run's hyperparameters: this config rules
            g.update(peak=C.lr * self.mults[g["name"]], betas=(C.beta1, C.beta2), eps=C.adam_eps,
                     weight_decay=C.weight_decay, **adamw_kernel(self.env.dev))
        self.step, self.history = ckpt["step"], ckpt["history"]
        self.budget_steps = ckpt.get("budget_steps")  # a max_minutes run's fixed step count
        set_rng_state(ckpt["rng"])
        # One stream state per rank: each dp rank draws its own share of the global sample stream; the other
        # cp ranks of a dp group receive its batches (their entry is None). Resuming on another process count
        # would change who draws what.
        states = ckpt["streams"]
        if len(states) != D.world:
            raise SystemExit(f"resume: the checkpoint was written by {len(states)} process(es), this run has "
                             f"{D.world}; resume with the same number (or start a new run with init_from=PATH)")
        self.stream.load_state(states[D.rank])  # the sampler's counters; the packer's keys, re-encoded first
        self.env.print(f"resumed from {C.out_dir} at step {self.step}")

    def last_checkpoint_note(self):
        path = os.path.join(self.C.out_dir, "ckpt.pt")
        if self.saved_at is not None:
            return f"the last checkpoint is {path} (step {self.saved_at})"
        return "no checkpoint of this run was written" + (f" (an older one is at {path})" if os.path.exists(path)
                                                          else "")

    def checkpoint(self):
        """Every rank takes part (FSDP2 gathers the shards, each rank's stream state is collected); rank 0 writes.
        Weights that are not finite are never written over a good checkpoint."""
        C, D = self.C, self.env.D
        msd, osd = full_state(self.model, self.opt, D)
        streams = [self.stream.state()]  # this rank's, as consumed (not as prefetched); None on a cp rank > 0
        if D.world > 1:
            mine, streams = streams[0], [None] * D.world
            dist.all_gather_object(streams, mine)
        if D.rank == 0:
            bad = non_finite(msd)
            if bad:
                raise SystemExit(f"step {self.step}: weights {bad[:3]} are not finite; not saved. "
                                 + self.last_checkpoint_note())
            try:
                save_checkpoint(os.path.join(C.out_dir, "ckpt.pt"), dict(
                    model=msd, optimizer=osd, step=self.step, config=vars(C),
                    model_config=dataclasses.asdict(self.mconf), tokenizer=self.tok.state(), streams=streams,
                    history=self.history, budget_steps=self.budget_steps, step_choice=self.step_choice,
                    rng=rng_state()))
            except CheckpointError as e:
                raise SystemExit(str(e)) from None
        self.saved_at = self.step

    def run_eval(self, n, blind=False, full_length=False):
        """Held-out eval -> (metrics, records [(task, question, answer, reference, score)]): the shapes tasks, n
        prompts each, or with eval_data the real held-out sets, their first n examples each. Rank 0 evaluates the
        whole model, single-process (no cp), with every CPU thread of the node's ranks; the others wait. Under
        FSDP2 the full weights are gathered into a plain copy first."""
        from eval import evaluate_data, evaluate_shapes, load_eval_sets
        from model import Molmo2
        C, env = self.C, self.env
        D, res, ev = env.D, None, self.model
        if C.fsdp and D.world > 1:
            msd, _ = full_state(self.model, self.opt, D)
            if D.rank == 0:
                ev = Molmo2(self.mconf).to(env.dev)
                ev.load_state_dict(msd)
        if D.rank == 0:
            cp, threads = ev.cp, torch.get_num_threads()
            ev.cp = None  # one process: whole sequences
            torch.set_num_threads(eval_threads(threads, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
            try:
                ac = env.autocast if env.dtype != torch.float32 else None
                if C.eval_data:  # read once, at the first eval, kept for the next ones
                    self.eval_sets = getattr(self, "eval_sets", None) or load_eval_sets(C.eval_data, C.media_root)
                    res = evaluate_data(ev, self.tok, self.mconf, self.eval_sets, max_examples=n, autocast=ac,
                                        blind=blind, full_length=full_length)[:2]
                else:
                    res = evaluate_shapes(ev, self.tok, self.mconf, n_prompts=n, tasks=C.eval_tasks, blind=blind,
                                          autocast=ac, video_frames=C.video_frames, full_length=full_length)
            finally:
                ev.cp = cp
                torch.set_num_threads(threads)
        if D.world > 1:
            box = [res]
            # every rank gets the figures (and waits for them); pickled into a tensor on dev (NCCL: CUDA only)
            dist.broadcast_object_list(box, src=0, device=env.dev)
            res = box[0]
        return res

    def train_step(self):
        """One optimizer step: grad_accum micro-batches forward and backward, clip, AdamW. Returns (loss, gradient
        norm, the batches). A step whose loss or gradient is not finite is not applied and returns loss None."""
        C, env, opt = self.C, self.env, self.opt
        for g in opt.param_groups:
            g["lr"] = lr_at(self.step, g["peak"], C.warmup_steps, self.total, C.min_lr_frac)
        batches = [self.get_batch() for _ in range(C.grad_accum)]
        loss = accumulate(self.wrapped, batches, env.autocast, env.D, self.no_sync, env.dev)
        # the ranks' parts -> the global batch loss (the gradients are reduced already)
        loss = all_reduce_scalar(loss, env.D, env.dev)
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), C.grad_clip)  # over DTensors too (FSDP2)
        if not (math.isfinite(loss) and torch.isfinite(gnorm)):
            # A NaN / inf loss or gradient: not applied (weights, Adam state and schedule unchanged), the batch is
            # dropped. Every rank sees the same reduced values, so all skip it together.
            opt.zero_grad(set_to_none=True)
            self.bad_in_a_row, self.bad_total = self.bad_in_a_row + 1, self.bad_total + 1
            env.print(f"step {self.step + 1}: loss {loss:.4g}, gradient norm {float(gnorm):.4g}: not finite, step "
                      f"skipped ({self.bad_in_a_row} in a row, {self.bad_total} in this run)", flush=True)
            if self.bad_in_a_row >= C.max_bad_steps:
                raise SystemExit(f"stopped at step {self.step}: {self.bad_in_a_row} steps in a row had a non-finite "
                                 f"loss or gradient (max_bad_steps={C.max_bad_steps}); lower lr? "
                                 + self.last_checkpoint_note())
            return None, gnorm, batches
        self.bad_in_a_row = 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.step += 1
        self.history["step"].append(self.step)
        self.history["loss"].append(loss)
        return loss, gnorm, batches

    def train(self):
        """The loop: steps until the total (max_steps, or what the max_minutes budget fixes) or stop_at; a log line
        every log_interval steps, a checkpoint and a held-out eval every eval_interval."""
        C, env = self.C, self.env
        D, print = env.D, env.print
        peak = peak_flops(env.dev, env.dtype)
        self.t0, self.start_step = time.time(), self.step
        # running totals; a log line reports the change since the previous one, the last line the whole run
        self.tot = tot = dict(tokens=0, cells=0, examples=0, flops=0, seconds=0.0, data_wait=0.0)
        mark, eval_seconds = dict(tot), 0.0
        self.tp_marks = [(self.step, 0, 0.0)]  # (step, tokens, seconds) at each log line: finish's first / last 100
        self.bad_in_a_row = self.bad_total = 0
        # the step count the schedule is laid over, and under max_minutes when it is decided (StepBudget)
        self.budget = StepBudget(C.max_minutes, C.max_steps, self.budget_steps, self.step)
        self.total = self.budget.total
        if self.budget.decide_at is not None and self.budget.decide_at >= C.warmup_steps:
            print(f"max_minutes: note, the step count is fixed at step {self.budget.decide_at}, after warmup_steps="
                  f"{C.warmup_steps}: the LR of the steps before it assumed max_steps={C.max_steps}")
        # The loop. A skipped (non-finite) step leaves self.step where it was, so the same step is tried again
        # on the next batch; stop_at ends a run early (checkpointed) with the schedule of the full run intact.
        while self.step < self.total and not (C.stop_at and self.step >= C.stop_at):
            loss, gnorm, batches = self.train_step()
            if loss is None:
                continue
            step = self.step
            for b in batches:  # whole-run figures: this dp rank's batch x dp (the dp ranks' batches are alike)
                tot["tokens"] += D.dp * int(b["attention_mask"].sum())
                tot["cells"] += D.dp * b["attention_mask"].numel()
                tot["examples"] += D.dp * b["n_examples"]
                tot["flops"] += D.dp * self.model.flops(b)
            tot["seconds"] = time.time() - self.t0 - eval_seconds
            tot["data_wait"] = self.stream.wait_s  # the seconds get_batch blocked the training thread
            if self.budget.due(step):
                t_fix = time.time()
                self.total = self.fix_budget(self.budget.probe_step_s())
                eval_seconds += time.time() - t_fix  # its eval probe is no training time
            if step % C.log_interval == 0 or step == self.total:
                d = {k: tot[k] - mark[k] for k in tot}  # since the previous log line
                el = time.time() - self.t0
                eta = el / (step - self.start_step) * (self.total - step)
                print(f"step {step:5d}/{self.total} | loss {loss:.4f} | gnorm {float(gnorm):.2f} | "
                      f"lr {self.opt.param_groups[-1]['lr']:.2e} | {d['tokens'] / d['seconds']:,.0f} tok/s | "
                      f"non-pad {100 * d['tokens'] / d['cells']:.0f}% | {d['examples'] / d['seconds']:.1f} ex/s | "
                      f"MFU {100 * d['flops'] / d['seconds'] / (peak * D.world):.1f}% | "
                      f"data wait {100 * d['data_wait'] / d['seconds']:.0f}% | elapsed {fmt_time(el)} | "
                      f"ETA {fmt_time(eta)}"
                      + (f" | skipped {sum(self.media.skipped.values())} broken" if self.media.skipped else "")
                      + (f" | {self.bad_total} non-finite steps skipped" if self.bad_total else ""), flush=True)
                mark = dict(tot)
                self.tp_marks.append((step, tot["tokens"], tot["seconds"]))
                n = step - (step - 1) // C.log_interval * C.log_interval  # the steps since the previous log step
                self.metrics.log(dict(kind="train", step=step, total=self.total, loss=loss,
                                      loss_avg=sum(self.history["loss"][-n:]) / len(self.history["loss"][-n:]),
                                      gnorm=float(gnorm), lr=self.opt.param_groups[-1]["lr"],
                                      tok_s=d["tokens"] / d["seconds"], ex_s=d["examples"] / d["seconds"],
                                      non_pad=d["tokens"] / d["cells"],
                                      mfu=d["flops"] / d["seconds"] / (peak * D.world),
                                      data_wait=d["data_wait"] / d["seconds"], elapsed_s=el, eta_s=eta))
            if step % C.eval_interval == 0 and step < self.total:
                t_eval = time.time()
                self.checkpoint()  # saved before the eval, so an eval crash never loses the work (nanochat #446)
                if self.evals:
                    t_run = time.time()
                    m = self.run_eval(C.eval_prompts)[0]
                    self.budget.measured_eval(time.time() - t_eval, time.time() - t_run, C)
                    self.history["evals"].append(dict(step=step, **m))
                    self.metrics.log(dict(kind="eval", step=step, prompts=C.eval_prompts, **m))
                    print(f"eval @ {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
                eval_seconds += time.time() - t_eval
            if self.budget.refits and (step % C.log_interval == 0 or step % C.eval_interval == 0) and step < self.total:
                self.total = self.refit_budget(step, tot["seconds"])

    def fix_budget(self, step_s):
        """max_minutes: the total step count from the measured step time (fit_budget), the same on every rank
        (rank 0's: their clocks differ a little, their loops must not), kept in the checkpoint."""
        total, eval_s, final_s = fit_budget(self.C, self.step, step_s, self.t_start, self.evals, self.run_eval,
                                            self.env.print)
        total = int(broadcast_scalar(total, self.env.D, self.env.dev))
        self.budget_steps = self.budget.fix(total, eval_s, final_s)
        return total

    def refit_budget(self, step, seconds):
        """max_minutes, after the decision (StepBudget, 4.): the end this run heads for, at the step time of the last
        REFIT_WINDOW steps; off the plan (BUDGET_MARGIN of the budget) by more than REFIT_BAND of the budget (by any
        amount at the first check after a new eval price), the count is fitted again to what is left of it (at least
        step + 1). Rank 0's count on every rank (a collective at every check, so the ranks never disagree on whether
        to call it). Returns the count."""
        C, b = self.C, self.budget
        step_s, total = b.observe(step, seconds), self.total
        if step_s is not None:
            budget, spent = 60 * C.max_minutes, time.time() - self.t_start
            end = run_cost(total, spent, step, step_s, b.eval_s, b.final_s, C.eval_interval)
            # a new eval price is a measured change, not step-time noise: the check after it re-fits at any offset
            # (stage 2's first eval moved its end by 53 s, inside the band, and the run ended 1.5 minutes early)
            band, b.repriced = (0.0 if b.repriced else REFIT_BAND), False
            if abs(end - BUDGET_MARGIN * budget) > band * budget:
                total = max(step + 1, steps_in_budget(BUDGET_MARGIN * budget, spent, step, step_s, b.eval_s,
                                                      b.final_s, C.eval_interval, C.max_steps))
        total = int(broadcast_scalar(total, self.env.D, self.env.dev))
        if total != self.total:
            self.env.print(f"max_minutes={C.max_minutes:g}: re-fit at step {step}: {step_s:.2f} s a step over the "
                           f"last {step - b.marks[0][0]} steps heads for {fmt_time(end)} of {fmt_time(budget)} -> "
                           f"{self.total:,} -> {total:,} steps (max_steps {C.max_steps:,}), cosine to step {total:,}",
                           flush=True)
            self.budget_steps = b.fix(total)
        return total

    def finish(self):
        """The throughput summary, the final checkpoint, and after a complete run the final eval (500 prompts a
        task), its breakdown by question kind, the image-blind baseline and the learning curve."""
        C, print, tot, step = self.C, self.env.print, self.tot, self.step
        self.stream.close()  # the data workers are done
        result = dict(losses=self.history["loss"], steps=self.history["step"])
        if tot["seconds"] > 0:
            print(f"training throughput over {step - self.start_step} steps (evals excluded): "
                  f"{tot['tokens'] / tot['seconds']:,.0f} tok/s, {tot['examples'] / tot['seconds']:.1f} examples/s, "
                  f"non-pad {100 * tot['tokens'] / tot['cells']:.1f}% of the rows, "
                  f"{tot['examples'] / max(1, step - self.start_step) / C.grad_accum:.1f} examples per micro-batch, "
                  f"data wait {100 * tot['data_wait'] / tot['seconds']:.0f}% of the step time")
            drift = throughput_drift(self.tp_marks)
            if drift:
                print(drift)
        if self.media.skipped:
            print(f"examples skipped for media that cannot be decoded (this rank): {self.media.summary()}")
        # The last state is always saved (a run stopped by stop_at resumes from exactly here), then the final eval
        # runs on that checkpoint's weights: a crash in the eval loses nothing, and eval.py can repeat it.
        if step > self.start_step or C.init_from == "resume":
            self.checkpoint()
        if C.final_eval_prompts and step >= self.total and self.evals:
            from eval import breakdown
            m, records = self.run_eval(C.final_eval_prompts)
            self.history["evals"].append(dict(step=step, final=True, **m))
            self.metrics.log(dict(kind="eval", step=step, final=True, prompts=C.final_eval_prompts, **m))
            print(f"final eval @ {step} ({C.final_eval_prompts} prompts/task): " +
                  ", ".join(f"{k} {v:.3f}" for k, v in m.items()), flush=True)
            # the same scores by question kind (eval.breakdown): what the model can and cannot do yet
            print("  by kind: " + ", ".join(f"{k} {s:.2f} (n={n})" for k, (n, s) in breakdown(records).items()))
            result["final"] = m
            if C.blind_baseline:
                mb = self.run_eval(C.final_eval_prompts, blind=True)[0]
                self.history["evals"][-1]["blind"] = mb
                self.metrics.log(dict(kind="eval", step=step, final=True, blind=True, prompts=C.final_eval_prompts,
                                      **mb))
                print("image-blind baseline (same checkpoint, blank images): " +
                      ", ".join(f"{k} {v:.3f}" for k, v in mb.items()), flush=True)
                result["blind"] = mb
            self.checkpoint()
            if self.env.D.rank == 0:  # the curve from the run's own records: `python metrics.py` redraws it
                try:
                    plot_curve(read_metrics(self.metrics.path), os.path.join(C.out_dir, "curve.png"),
                               title=f"{C.out_dir}: {step:,} steps")
                except ImportError:  # the run's work is saved already: a missing plotting package only costs the PNG
                    print(f"no curve.png: matplotlib is not installed (pip install matplotlib; then python metrics.py "
                          f"{self.metrics.path})")
        self.metrics.close()
        print(f"done in {fmt_time(time.time() - self.t_start)}; checkpoint {os.path.join(C.out_dir, 'ckpt.pt')}")
        if self.env.D.world > 1:
            dist.destroy_process_group()
        return result


if __name__ == "__main__":
    main(sys.argv[1:])

"""Training under torchrun, checked against one process: a context-parallel step (ring and Ulysses) and a DDP step
give the one-process loss and gradients; whole runs (cp = 2 with DDP and FSDP2, dp = 2) give the one-process
losses; a resumed FSDP2 + cp run equals the uninterrupted one. Ranks are spawned processes on gloo (the CPU
backend), each run bounded by a timeout so a deadlock fails fast."""
import os
import socket
import time
import types
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist

import train
from conftest import TINY, start_ranks

TIMEOUT = 120


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_rank(rank, world, port):
    """The environment torchrun gives each process (train.setup_distributed reads it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)


def _spawn(fn, world, *args):
    """fn(rank, world, port, *args) in `world` processes (conftest.start_ranks); a deadlock fails the test after
    TIMEOUT seconds."""
    ctx = start_ranks(fn, (world, _free_port(), *args), world)
    deadline = time.time() + TIMEOUT
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail(f"{world} ranks did not finish in {TIMEOUT} s (deadlock?)")


# ---------------------------------------------------------------------------------------------------------
# one training step: loss and gradients

def _model_and_batches(rank=0, world=1):
    """A tiny model and two packed micro-batches (video, images, text; padding), the same in every process.
    world > 1: each micro-batch keeps its rows rank, rank + world, ... (data parallelism)."""
    import data
    import shapes
    from model import Molmo2, ModelConfig
    tok = shapes.tokenizer()
    cfg = ModelConfig(**dict(TINY, base_vocab=tok.base_vocab, n_extra=tok.n_extra, im_patch_id=tok.im_patch))
    tw = {"track": 2.0, "video_qa": 1.0, "point": 2.0, "caption": 1.0, "text": 0.5}
    specs = [("track", 1), ("point", 2), ("text", 3), ("video_qa", 4), ("caption", 5), ("track", 6)]
    encs = [data.encode_example(shapes.make_example(t, s, cfg.image_size), tok, cfg, tw) for t, s in specs]
    micro = [[[encs[0], encs[1]], [encs[2]]], [[encs[3], encs[4]], [encs[5]]]]  # ragged rows: padding
    batches = [data.collate(rows[rank::world], tok.pad, 10 ** 6) for rows in micro]
    torch.manual_seed(0)
    return Molmo2(cfg).float(), batches


def _one_process_step():
    model, batches = _model_and_batches()
    loss = train.accumulate(model, batches)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def _step_worker(rank, world, port, mode, out):
    _as_rank(rank, world, port)
    cp = mode in ("ring", "ulysses")
    C = types.SimpleNamespace(cp=world if cp else 1, fsdp=mode == "fsdp", dry_run=False)
    D = train.setup_distributed(C, "cpu")
    try:
        if cp:  # every rank holds the whole batch; the model keeps this rank's shard of each sequence
            from cp_attention import ContextParallel
            model, batches = _model_and_batches()
            model.cp = ContextParallel(D.cp_group, mode)
        else:  # data parallel: each rank its own rows; rank 1's first micro-batch is text only
            model, batches = _model_and_batches(rank, world)
            assert bool(batches[0]["image_mask"].any()) == (rank == 0)
        wrapped = train.wrap_model(model, C, D, torch.device("cpu"))
        rs, reductions = dist.reduce_scatter_single, []  # FSDP2's gradient reduce-scatters, counted
        dist.reduce_scatter_single = lambda *a, **kw: (reductions.append(1), rs(*a, **kw))[1]
        try:
            loss = torch.tensor(train.accumulate(wrapped, batches, nullcontext, D, train.no_sync_of(wrapped)),
                                dtype=torch.float64)
        finally:
            dist.reduce_scatter_single = rs
        dist.all_reduce(loss)  # the ranks' parts -> the global loss
        from torch.distributed.tensor import DTensor  # FSDP2's gradients are shards: gathered whole (every rank)
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                 for n, p in model.named_parameters()}
        res = dict(loss=loss.item(), grads=grads, reductions=len(reductions),
                   groups=len(model.vit.blocks) + len(model.llm.blocks) + 1)  # fully_shard units: blocks + the rest
        if mode == "fsdp":  # the same step again, bf16: parameters all-gathered in bf16, gradients reduced in fp32
            model, batches = _model_and_batches(rank, world)
            seen = []  # the dtype of the weights that a block's forward uses
            model.llm.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(m.attn.qkv_proj.weight.dtype))
            model.vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(m.fc1.weight.dtype))
            wrapped = train.wrap_model(model, C, D, torch.device("cpu"), torch.bfloat16)
            bf16 = train.accumulate(wrapped, batches, lambda: torch.autocast("cpu", dtype=torch.bfloat16), D,
                                    train.no_sync_of(wrapped))
            bf16 = torch.tensor(bf16, dtype=torch.float64)
            dist.all_reduce(bf16)
            res.update(bf16_loss=bf16.item(), bf16_seen=set(seen), bf16_grads={
                n: p.grad.full_tensor() for n, p in model.named_parameters()},
                bf16_kept={p.dtype for p in model.parameters()} | {p.grad.dtype for p in model.parameters()})
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["ring", "ulysses", None, "fsdp"])
def test_two_rank_step_equals_one_process(mode, tmp_path):
    """cp = 2 (ring: zigzag shards, the mask given as a function, bidirectional vision so every block is computed
    under its slice; Ulysses: heads split) and dp = 2 (mode None: DDP; "fsdp": FSDP2; each rank half the rows, and
    rank 1's first micro-batch has no image: under FSDP2 it runs the ViT on a blank one, or the ranks would wait on
    each other's all-gathers until the timeout; the gradients are reduced on the last micro-batch only): the global
    loss and every parameter's gradient equal one process's on the whole batch (fp32: 1e-5); FSDP2 reduce-scatters
    once a step (counted). FSDP2 in bf16 too: the blocks compute with bf16 weights, the weights and gradients stay
    fp32, and the step is close to fp32's."""
    want_loss, want = _one_process_step()
    out = tmp_path / "res.pt"
    _spawn(_step_worker, 2, mode, str(out))
    got = torch.load(out)
    assert got["loss"] == pytest.approx(want_loss, abs=1e-5)
    for n, g in want.items():
        err = (got["grads"][n] - g).abs().max().item()
        assert err <= 1e-5, f"{mode}: gradient of {n} differs by {err:.2e}"
    if mode == "fsdp":
        assert got["reductions"] == got["groups"]  # one reduce-scatter a unit: on the last of the 2 micro-batches only
        # bf16 (MixedPrecisionPolicy): computed with bf16 weights; weights and gradients kept in fp32
        assert got["bf16_seen"] == {torch.bfloat16} and got["bf16_kept"] == {torch.float32}
        ref, bf16 = (torch.cat([gs[n].flatten() for n in want]) for gs in (want, got["bf16_grads"]))
        rel = ((bf16 - ref).norm() / ref.norm()).item()
        print(f"bf16 FSDP2 step: loss {got['bf16_loss']:.6f} against fp32 {want_loss:.6f}, gradient error {rel:.2e}")
        assert abs(got["bf16_loss"] - want_loss) < 1e-2 and rel < 5e-2


# ---------------------------------------------------------------------------------------------------------
# whole runs of train.main

MIX = {"image": (0.5, {"caption": 1.0, "point": 1.0}), "video": (0.5, {"track": 1.0, "video_qa": 1.0})}


def _args(out_dir, **kw):
    a = dict(TINY, batch_size=4, final_eval_prompts=0, eval_interval=100000, dtype="float32", log_interval=1000,
             warmup_steps=2, lr=3e-3, device="cpu", max_steps=3, packing=True, seq_len=512, max_images_per_row=32,
             mixture=MIX, threads=1, out_dir=str(out_dir))
    a.update(kw)
    return [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in a.items()]


def _main_worker(rank, world, port, argv, out):
    _as_rank(rank, world, port)
    try:
        res = train.main(argv)
    except SystemExit as e:  # a config error: hand its message to the test (every rank: the first to exit has
        open(f"{out}.err{rank}", "w").write(str(e))  # written its own before the others are stopped)
        raise
    if rank == 0:
        torch.save(res["losses"], out)


def _run2(argv, tmp_path):
    """train.main(argv) on 2 ranks -> rank 0's losses; a SystemExit in a rank is raised here with its message."""
    out = tmp_path / f"losses{time.time_ns()}.pt"
    try:
        _spawn(_main_worker, 2, argv, str(out))
    except Exception:
        for err in (f"{out}.err0", f"{out}.err1"):
            if os.path.exists(err):
                raise SystemExit(open(err).read()) from None
        raise
    return torch.load(out)


def test_torchrun_runs_equal_one_process(tmp_path):
    """train.main on 2 ranks: cp = 2 under DDP (ring; rank 0 evaluating after every step) and under FSDP2 (Ulysses, activation checkpointing) give the
    one-process losses of the same packed batches, step by step; dp = 2 with 4 rows each gives the one-process
    losses at 8 rows (the ranks take alternate examples of the one stream)."""
    ev = dict(eval_interval=1, eval_prompts=1, eval_tasks=("track",))  # rank 0 evaluates mid-run, then cp resumes
    want = train.main(_args(tmp_path / "one", **ev))["losses"]
    ring = _run2(_args(tmp_path / "ring", cp=2, cp_mode="ring", **ev), tmp_path)
    fsdp = _run2(_args(tmp_path / "fsdp", cp=2, cp_mode="ulysses", fsdp=True, act_ckpt=True), tmp_path)
    assert len(want) == len(ring) == len(fsdp) == 3
    for got in (ring, fsdp):
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-5, (got, want)
    want8 = train.main(_args(tmp_path / "one8", packing=False, batch_size=8))["losses"]
    dp = _run2(_args(tmp_path / "dp", packing=False, batch_size=4), tmp_path)
    assert max(abs(a - b) for a, b in zip(dp, want8)) < 1e-5, (dp, want8)


def test_fsdp_cp_resume_is_exact(tmp_path):
    """FSDP2 + cp = 2: stop after step 2 (checkpoint gathered whole on rank 0), resume on 2 ranks: the losses of the
    uninterrupted run (one process: equal to 2 ranks, test above); the checkpoint is a plain one-process one (its
    weights load into a bare model)."""
    kw = dict(cp=2, fsdp=True, max_steps=4)
    a = train.main(_args(tmp_path / "A", **dict(kw, cp=1, fsdp=False)))["losses"]
    _run2(_args(tmp_path / "B", stop_at=2, **kw), tmp_path)
    b = _run2(_args(tmp_path / "B", init_from="resume", **kw), tmp_path)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    ck = torch.load(tmp_path / "B" / "ckpt.pt", weights_only=False)
    from model import Molmo2, ModelConfig
    Molmo2(ModelConfig(**ck["model_config"])).load_state_dict(ck["model"])  # full, unsharded tensors
    assert len(ck["streams"]) == 2 and ck["step"] == 4


def test_cp_needs_torchrun(tmp_path):
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node=2"):
        train.main(_args(tmp_path, cp=2))


def test_resume_needs_the_same_number_of_processes(tmp_path):
    """A checkpoint written by 2 processes (one sampler and packer state per rank) cannot resume in 1: a clear
    error."""
    train.main(_args(tmp_path, max_steps=2, stop_at=1))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    ck["streams"] = ck["streams"] * 2
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit, match="written by 2 process.es., this run has 1"):
        train.main(_args(tmp_path, max_steps=2, init_from="resume"))


def test_cp_layout_errors(tmp_path):
    """cp must divide the processes; Ulysses must split the heads over the cp ranks."""
    with pytest.raises(SystemExit, match=r"cp=3 must divide the number of processes \(2\)"):
        _run2(_args(tmp_path, cp=3), tmp_path)
    with pytest.raises(SystemExit, match="splits the 3 heads over cp=2 ranks"):
        _run2(_args(tmp_path, cp=2, cp_mode="ulysses", n_head=3, n_kv_head=1), tmp_path)

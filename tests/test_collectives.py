"""Every collective of a training step and of the budget's broadcast gets its tensors on the run's device: NCCL, the
CUDA backend, takes CUDA tensors only, so a CPU tensor there stops a multi-GPU run at its first step.

The Trainer is built in-process as train.main builds it, then told it is one rank of two (its collectives run on a
real one-process gloo group), and every torch.distributed collective is wrapped to check the device of what it is
given. The run's device is the test's parameter: "cpu"; "lazy", torch's lazy-tensor device, a device other than the
CPU that runs on any CPU, standing in for "cuda" (the model stays on the CPU, only env.dev says "lazy", so a tensor
made on the CPU instead of env.dev is caught); and "cuda" where there is one."""
import importlib
import time
import types

import pytest
import torch
import torch.distributed as dist

import train
from conftest import tiny_overrides

# the collectives of torch.distributed that take tensors (or, *_object*, pickle objects into tensors on a device)
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_gather_single", "reduce_scatter_single", "all_to_all_single", "all_to_all", "batch_isend_irecv", "send", "recv", "isend", "irecv",
               "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


def tensors_in(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from tensors_in(y)
    elif isinstance(x, dist.P2POp):
        yield x.tensor


def same_device(a, b):
    """cuda and cuda:0 are one device (an index left out is device 0 here); lazy likewise."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def check_collectives(monkeypatch, dev):
    """Wrap every collective: each tensor it is given must be on dev, an *_object* call must name dev (or, on CUDA,
    dev must be the current device, which those calls use). On the stand-in device the real call runs on CPU
    copies (gloo), written back. Returns the names of the calls made, in order."""
    calls = []

    def wrap(name, real):
        def checked(*args, **kwargs):
            calls.append(name)
            if name.endswith(("_object", "_object_list")):
                where = kwargs.get("device")
                if where is None and dev.type == "cuda":
                    where = torch.device("cuda", torch.cuda.current_device())
                assert where is not None and same_device(torch.device(where), dev), \
                    f"dist.{name} pickles onto {where}, the run's device is {dev}"
                if dev.type == "lazy":
                    kwargs["device"] = torch.device("cpu")
                return real(*args, **kwargs)
            ts = list(tensors_in(list(args) + list(kwargs.values())))
            assert ts, f"dist.{name} was given no tensor"
            for t in ts:
                assert same_device(t.device, dev), f"dist.{name} got a tensor on {t.device}, the run's device is {dev}"
            if dev.type != "lazy":
                return real(*args, **kwargs)
            assert name in ("all_reduce", "broadcast"), name  # what train_step and fix_budget call
            cpu = args[0].cpu()
            out = real(cpu, *args[1:], **kwargs)
            args[0].copy_(cpu)
            return out
        return checked
    for name in COLLECTIVES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, wrap(name, getattr(dist, name)))
    return calls


def build_trainer(out_dir, device):
    """train.main's steps 1-5 for a tiny run on the shapes world: the Trainer, before its loop."""
    argv = tiny_overrides() + [f"--out_dir={out_dir}", f"--device={device}", "--dtype=float32", "--batch_size=2",
                               "--grad_accum=2", "--max_minutes=20", "--eval_prompts=1", "--log_interval=1000",
                               "--eval_tasks=('count',)"]
    given = set()
    C = types.SimpleNamespace(**train.configure(argv, {k: getattr(train, k) for k in train.CONFIG_KEYS}, given))
    train.check_config(C)
    env = train.setup_run(C)
    start = train.load_start(C, env.print)
    tok, mconf = train.build_model_config(C, given, start, env.print)
    data_src = train.build_mixture(C, env.print)
    model = train.build_model(C, mconf, start, env.print)
    return train.Trainer(C, env, tok, mconf, model, data_src, start, time.time())


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", "lazy", "cuda"])
def test_step_and_budget_collectives_run_on_the_runs_device(device, tmp_path, monkeypatch, one_rank_group):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    run = build_trainer(tmp_path / "out", "cpu" if device == "lazy" else device)
    if device == "lazy":
        importlib.import_module("torch._lazy.ts_backend").init()  # the lazy device's TorchScript backend
        run.env.dev = torch.device("lazy", 0)  # the run's device as the collectives see it; the model stays put
    dev = run.env.dev
    # one rank of two: the collectives run (on the one-process group, each sums or sends to itself)
    run.env.D.world, run.env.D.dp = 2, 2
    calls = check_collectives(monkeypatch, dev)
    run.total, run.bad_in_a_row, run.bad_total = 100, 0, 0
    run.budget = train.StepBudget(run.C.max_minutes, run.C.max_steps, None, run.step)  # as Trainer.train makes it
    loss, gnorm, batches = run.train_step()
    # the divisor (the global loss weight) and the loss; the one-process group's sum is the rank's own value
    assert calls == ["all_reduce", "all_reduce"]
    assert loss == run.history["loss"][-1] and 0 < loss < 20 and len(batches) == 2
    total = run.fix_budget(1.0)
    # the periodic eval's figures go to every rank, then rank 0's step count
    assert calls[2:] == ["broadcast_object_list", "broadcast"]
    assert total == run.budget_steps and 1 <= total <= run.C.max_steps

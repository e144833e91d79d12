"""Shared fixtures: the repo root on sys.path, one tokenizer per session, tiny model configs."""
import multiprocessing
import os
import sys

import pytest
import torch

# The models here are tiny: one thread is as fast as two, and on a small shared machine (another job training
# beside the tests) two OpenMP threads per process oversubscribe the cores and run 10-30x slower.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Multi-process tests start their ranks from a fork server that has imported torch and the project's modules once
# (start_ranks): a rank then starts in a fraction of a second, not in the ~3 s each fresh interpreter spends
# importing them (two at a time on two cores). The server forks before any torch op runs in it: no threads to copy.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.attention.flex_attention", "train",
                                        "model", "data", "shapes", "cp_attention", "eval", "loader", "checkpoint"])


def start_ranks(fn, args, nprocs):
    """torch.multiprocessing.start_processes(fn, args, nprocs, join=False) from the fork server above: fn(rank,
    *args) in nprocs fresh processes (they share nothing with this one but the imported modules)."""
    return torch.multiprocessing.start_processes(fn, args=args, nprocs=nprocs, join=False,
                                                 start_method="forkserver")


# Tiny dims used everywhere (model tests and the in-process training runs)
TINY = dict(image_size=32, patch_size=8, vit_width=32, vit_depth=2, vit_heads=2, vit_mlp=64, vit_layers=(-1, -2),
            d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_ff=128)


def tiny_overrides():
    """TINY as train.py --key=value overrides."""
    return [f"--{k}={v!r}" if isinstance(v, tuple) else f"--{k}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="session")
def tok():
    import shapes
    return shapes.tokenizer()


@pytest.fixture(scope="session")
def make_cfg(tok):
    from model import ModelConfig

    def make(**kw):
        c = dict(TINY, base_vocab=tok.base_vocab, n_extra=tok.n_extra, im_patch_id=tok.im_patch)
        c.update(kw)
        return ModelConfig(**c)
    return make


@pytest.fixture(scope="session")
def cfg(make_cfg):
    return make_cfg()

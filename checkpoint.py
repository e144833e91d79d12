"""
Checkpoints on disk: written so that a crash never loses the last good one, read so that loading one never runs
code, and checked so that they never hold NaN weights.

A checkpoint (train.py writes it) is a plain dict of tensors, numbers, strings, bytes, lists, tuples and dicts:
    model, optimizer     state dicts (fp32 weights; Adam's m and v)
    step, config         the step reached; the configuration that ran (train.py's keys)
    model_config         model.ModelConfig's fields; tokenizer: data.Tokenizer's state (its ranks as bytes -> int)
    streams              per rank: the mixture sampler's and the packer's states (resume replays the same stream)
    history              the loss curve and the evals so far
    budget_steps         the step count a max_minutes run fixed (None otherwise)
    rng                  the torch, Python and numpy random states, as tensors and lists (rng_state)
Every one of those types loads under torch.load(weights_only=True), PyTorch's restricted unpickler, which builds
only such data and refuses anything else (a pickled object's __reduce__ can call any function: os.system too).
A checkpoint whose decoder holds separate q/k/v and up/gate matrices is converted to the fused layout as it is read
(fuse_projections), so every reader (train.py, sample.py, hf.py) gets the one layout.
"""
import os
import pickle
import random
import re

import numpy as np
import torch

from model import unfused_groups


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written, with a message that names the file."""


def rng_state():
    """The three random generators' states as weights_only-loadable data. numpy's legacy state is the tuple
    ('MT19937', keys uint32[624], pos, has_gauss, cached_gaussian): the keys travel as an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), cached=float(cached)))


def set_rng_state(state):
    """The inverse of rng_state; also takes the numpy tuple that older checkpoints hold."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    np.random.set_state(n)


def save_checkpoint(path, obj):
    """Write obj to path so that the file at path is always a whole checkpoint: write a temporary file beside it,
    flush it to the disk (fsync), rename it over path (atomic on POSIX), then fsync the directory so the rename
    itself survives a power cut. On failure (disk full, permissions) the previous checkpoint is untouched, the
    temporary file is removed, and the error names the path."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise CheckpointError(f"could not write checkpoint {path}: {e} (the previous checkpoint, if any, is "
                              f"intact)") from None


def remove_stale_tmp(path):
    """A ckpt.pt.tmp left by a run killed mid-write is never a checkpoint: remove it (returns whether there was one)."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
        return True
    return False


def load_checkpoint(path, trust=False):
    """The checkpoint at path, read with weights_only=True: a file holding anything but data (a pickled object
    whose loading would run code) is refused with a one-line error, and so is a truncated or corrupt file.
    trust=True (train.py --trust_checkpoint=True, sample.py --trust_checkpoint) reads with the full unpickler
    instead: only for a file you made yourself, such as a checkpoint written before rng states were plain data."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", msg)
        if m:  # well-formed, but it names a function or class to call on loading: refused
            raise CheckpointError(f"checkpoint {path} holds {m.group(1)}, which only the full unpickler builds, and "
                                  f"it can run code: refused. If you made this file yourself (e.g. an older "
                                  f"checkpoint of this codebase), pass --trust_checkpoint=True") from None
        raise CheckpointError(f"checkpoint {path} is corrupt or not a checkpoint (the data-only unpickler cannot "
                              f"read it)") from None
    except Exception as e:  # garbage makes the reader fail in many ways (RuntimeError, EOFError, BadZipFile, ...)
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or not a checkpoint ({first})") from None
    return fuse_projections(ckpt)


def fuse_projections(ckpt):
    """A checkpoint whose decoder blocks hold separate q/k/v and up/gate matrices (model.UNFUSED: written before
    they were fused), converted in place to the fused layout, so that it loads, and resumes, like a new one: each
    group of weights, and of Adam's moments (exp_avg, exp_avg_sq), concatenated by rows in the fused order, the
    group's step count kept, and the optimizer's parameter lists renamed, the fused name where the group's first
    stood. Any other checkpoint is returned as it is."""
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    groups = unfused_groups(model) if isinstance(model, dict) else {}
    if not groups:
        return ckpt
    for fused, parts in groups.items():
        model[fused] = torch.cat([model.pop(p) for p in parts])
    opt = ckpt.get("optimizer")
    if isinstance(opt, dict):  # train.full_state's form: state and param_groups by parameter name
        state, owner = opt["state"], {p: f for f, parts in groups.items() for p in parts}
        for fused, parts in groups.items():
            if all(p in state for p in parts):
                s = [state.pop(p) for p in parts]
                state[fused] = {k: torch.cat([x[k] for x in s]) if k.startswith("exp_avg") else v
                                for k, v in s[0].items()}
        for g in opt["param_groups"]:
            names = [owner.get(n, n) for n in g["params"]]
            g["params"] = list(dict.fromkeys(names))  # each fused name once, where its group's first stood
    return ckpt


def non_finite(state_dict):
    """Names of the floating-point tensors of a state dict that hold NaN or inf (empty: all finite)."""
    return [k for k, v in state_dict.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]

"""
The training stream: the mixture's keys -> encoded examples -> packed rows -> one micro-batch on the device, built
off the training thread's critical path and resumable exactly.

    main process         the sampler (mixing.MixtureSampler) draws (dataset, index) keys, in order
    data_workers         torch.utils.data.DataLoader worker processes map each key to its encoded example
                         (ExampleMaker: decode the image or video with Pillow / PyAV, resize, tokenize:
                         data.encode_example), `prefetch` keys ahead of the training thread, handed back in key
                         order (the DataLoader keeps it), so the stream is the same for any number of workers
    main process         the packer (data.Packer, best-fit over its buffer) fills rows from the examples in key
                         order, collate pads them into the batch dict, pixels as uint8 bytes, on CUDA in pinned
                         memory; with workers this runs one batch ahead on a thread of its own (the training thread
                         only takes the batch); the copy to the GPU is non-blocking, and the model normalises the
                         bytes on the device (data.normalize_pixels)
    cp > 1               the cp ranks of a dp group train on the same batch: only cp rank 0 of each group builds it
                         (each video decoded once per group) and broadcasts it to the group (broadcast_batch)

Exact resume: the checkpoint holds the stream as CONSUMED by training, not as prefetched. Each key in flight keeps
the sampler's state from before it was drawn, and each batch built ahead the stream's state from before it was
built; the state saved (TrainingStream.state) is the oldest one not consumed. data_workers = 0 is the DataLoader's
in-process mode with no thread: the same code, each example encoded on the training thread when the packer asks.
"""
import queue
import threading
import time
from collections import Counter, deque

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, get_worker_info

import data
import shapes


class Skipped:
    """What a worker returns for a key whose media cannot be decoded: the error's text (the main process counts
    it: BrokenMedia)."""

    def __init__(self, err):
        self.err = err


class ExampleMaker:
    """A map-style dataset over keys: dataset[(dataset, index)] -> (key, encoded example) or (key, Skipped). Runs in
    the DataLoader's worker processes (forked: the tokenizer and real data's example lists are shared, not copied).
    For the shapes world the dataset is a task name and the index a scene seed (offset into the training seed range,
    so held-out scenes are never trained on); for real data the index wraps around the local copy's examples (the
    sampler's indices run past its size once a dataset is repeated)."""

    def __init__(self, C, tok, mconf, real=None):
        self.C, self.tok, self.mconf, self.real = C, tok, mconf, real

    def __getitem__(self, key):
        C, (name, idx) = self.C, key
        try:
            if self.real is not None:  # a local copy: its examples carry their task
                ex = self.real[name][idx % len(self.real[name])]
            else:
                ex = shapes.make_example(name, shapes.TRAIN_SEED_OFFSET + idx, self.mconf.image_size,
                                         C.turns_per_image, C.absent_rate, video_frames=C.video_frames,
                                         multi_rate=C.multi_rate)
            e = data.encode_example(ex, self.tok, self.mconf, C.task_weights, C.loss_weighting, C.root_flat_weights,
                                    C.max_frames, C.video_fps, C.seq_len, C.first_token_mults.get(ex["task"], 1.0))
        except (data.MediaError, FileNotFoundError) as err:
            return key, Skipped(str(err))
        # in a worker process, the frames as one uint8 array (F, 3, H, W), pickled through the worker's pipe:
        # measured faster than a shared-memory tensor each (a file descriptor passed per tensor), and no descriptors
        # to run out of
        if e["images"] and get_worker_info() is not None:
            e["images"] = torch.stack(e["images"]).numpy()
        return key, e


def _as_is(item):
    """The DataLoader's collate_fn: items pass unchanged (collating happens after packing, in the main process)."""
    return item


class _Keys:
    """The DataLoader's sampler: iterated in the main process, it yields the stream's keys (TrainingStream._keys)."""

    def __init__(self, stream):
        self.stream = stream

    def __iter__(self):
        return self.stream._keys()


class TrainingStream:
    """One rank's micro-batches: get_batch() -> the batch dict on the device (data.collate's fields and n_examples).
    C.batch_size rows, each one example, or (C.packing) as many whole examples as fit seq_len and max_images_per_row.
    Under torchrun the sampler is the dp rank's share of the one global stream; the cp ranks of a dp group receive
    their cp rank 0's batch. Attributes: packer, media (BrokenMedia), wait_s (seconds get_batch has blocked)."""

    def __init__(self, C, tok, mconf, sampler, dev, real=None, D=None, print=print):
        self.C, self.tok, self.sampler, self.dev = C, tok, sampler, dev
        self.cp_rank, self.cp, self.cp_group = (D.cp_rank, D.cp, D.cp_group) if D is not None else (0, 1, None)
        self.media = BrokenMedia(C.max_broken_frac, print)
        self.packer = data.Packer(self._source, self._taken, C.seq_len, C.max_images_per_row, C.pack_buffer)
        self.inflight = deque()  # [(key, the sampler's state before it was drawn, or None for a replayed key)]
        self.replay = deque()    # a resumed packer's buffered keys, re-encoded (by the workers) before any new draw
        self.wait_s, self._it, self._got = 0.0, None, None
        workers = data_workers(C.data_workers, dev)
        # with workers, batches are built one ahead on a thread (_ahead): its queue, the stream's state before each
        # batch not consumed yet (oldest first), and the lock that keeps those states whole
        self.thread, self._q, self._pending, self._lock = None, queue.Queue(maxsize=1), deque(), threading.Lock()
        self._stop, self._ahead_on = False, workers > 0
        # prefetch is counted in examples; the DataLoader counts it per worker (prefetch_factor). Its own generator:
        # starting an iterator draws the workers' base seed, which must not move the training's global RNG
        self.loader = DataLoader(ExampleMaker(C, tok, mconf, real), batch_size=None, sampler=_Keys(self),
                                 num_workers=workers, collate_fn=_as_is,
                                 generator=torch.Generator().manual_seed(C.seed),
                                 prefetch_factor=-(-C.prefetch // workers) if workers else None,
                                 multiprocessing_context="fork" if workers else None)

    # -- the key stream, in order ----------------------------------------------------------------------------
    def _keys(self):
        """The keys in the order training consumes them, each noted in flight with what the checkpoint must save
        should it not be consumed yet: the replayed keys first, then the sampler's draws."""
        while True:
            if self.replay:
                key, before = self.replay.popleft(), None
            else:
                before = self.sampler.state()
                key = self.sampler.draw()
            self.inflight.append((key, before))
            yield key

    def _next(self):
        """The next key in order and its encoded example, or None where the example is skipped (its media cannot be
        decoded, or it can never fit a row: counted in media)."""
        if self._it is None:  # started at the first batch, after a resume has set the state
            self._it = iter(self.loader)
        key, e = next(self._it)
        want, _ = self.inflight.popleft()
        assert key == want, (key, want)  # the DataLoader hands results back in key order
        C = self.C
        if isinstance(e, Skipped):
            self.media.skip(key[0], e.err)
            return key, None
        if isinstance(e["images"], np.ndarray):  # from a worker: (3, H, W) views of one tensor
            e["images"] = list(torch.from_numpy(e["images"]))
        # text alone longer than seq_len (a long Tulu conversation, a grouped image with many questions), or more
        # frames than a packed row's vision budget: no row can hold it, so it is skipped like a broken file
        if len(e["input_ids"]) > C.seq_len or (C.packing and len(e["images"]) > C.max_images_per_row):
            self.media.skip(key[0], f"{e['task']} example of {len(e['input_ids'])} tokens and {len(e['images'])} "
                                    f"images does not fit a row (seq_len={C.seq_len}, max_images_per_row="
                                    f"{C.max_images_per_row})", what="more tokens or images than a row holds")
            return key, None
        self.media.seen[key[0]] += 1
        return key, e

    # the packer's two callbacks: source() gives the next key, encode(key) its example (None: skipped)
    def _source(self):
        key, self._got = self._next()
        return key

    def _taken(self, key):
        e, self._got = self._got, None
        return e

    def _example(self):
        """The next example that encodes (unpacked rows)."""
        while True:
            e = self._next()[1]
            if e is not None:
                return e

    # -- batches -------------------------------------------------------------------------------------------
    def _build(self):
        """One micro-batch on the host: B rows. Packed, a row is a list of whole examples chosen best-fit from a
        buffer of pack_buffer encoded examples (their doc ids keep them apart in attention); unpacked, a row is one
        example. collate pads to the longest row (seq_len at most) and stacks: input_ids (B, T), labels (B, T),
        loss_weights (B, T), pixel_values (B, F, 3, H, W) uint8, ..."""
        C = self.C
        rows = self.packer.rows(C.batch_size) if C.packing else [self._example() for _ in range(C.batch_size)]
        b = data.collate(rows, self.tok.pad, C.seq_len, fixed=self.dev.type == "cuda")  # CUDA: one shape, one compile
        if self.dev.type == "cuda":  # page-locked: the copy to the GPU can then run asynchronously
            b = {k: v.pin_memory() for k, v in b.items()}
        b["n_examples"] = sum(len(r) if isinstance(r, list) else 1 for r in rows)
        return b

    def _ahead(self):
        """The batch-ahead thread: note the stream's state, build a batch, queue it (the queue holds one: the next is
        built while the training thread uses it); an error is queued in its place and raised by get_batch."""
        while not self._stop:
            with self._lock:
                self._pending.append(self._live_state())
            try:
                item = self._build()
            except BaseException as e:  # noqa: B036 (SystemExit from BrokenMedia too: the training thread raises it)
                item = e
            while not self._stop:
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    pass
            if isinstance(item, BaseException):
                return

    def _host_batch(self):
        """The next batch on the host: built here (no workers) or taken from the batch-ahead thread."""
        if not self._ahead_on:
            return self._build()
        if self.thread is None:  # started at the first batch, after a resume has set the state
            self.thread = threading.Thread(target=self._ahead, name="batch-ahead", daemon=True)
            self.thread.start()
        item = self._q.get()
        with self._lock:
            self._pending.popleft()  # consumed: the state saved from now on is the next batch's
        if isinstance(item, BaseException):
            raise item
        return item

    def get_batch(self):
        """The next micro-batch on the device; the time it blocks the training thread is added to wait_s."""
        t = time.perf_counter()
        b = to_device(self._host_batch(), self.dev) if self.cp_rank == 0 else None
        if self.cp > 1:
            b = broadcast_batch(b, self.cp_group, self.dev)
        self.wait_s += time.perf_counter() - t
        return b

    # -- checkpoint state ----------------------------------------------------------------------------------
    def state(self):
        """The stream as consumed: the sampler's state before its oldest key in flight (or now, when none is), and
        the packer's buffered keys followed by the replayed keys not consumed yet. None on a cp rank > 0 (it
        receives its batches)."""
        if self.cp_rank:
            return None
        with self._lock:  # a batch built ahead and not consumed: the state before it; else the stream's now
            return self._pending[0] if self._pending else self._live_state()

    def _live_state(self):
        """The stream's state now, for the next batch to be built (state())."""
        before = next((s for _, s in self.inflight if s is not None), None)
        return dict(sampler=before or self.sampler.state(),
                    packer=self.packer.state() + [k for k, s in self.inflight if s is None] + list(self.replay))

    def load_state(self, s):
        """Continue from state(): the sampler's counters, and the packer's buffered keys re-encoded first, in their
        order, so the next rows are the saved run's."""
        if s is None:
            return
        assert self._it is None and self.thread is None, "load_state before the first batch"
        self.sampler.load_state(s["sampler"])
        self.packer.buf, self.replay = [], deque(s["packer"])

    def close(self):
        """Stop the batch-ahead thread and the worker processes (the iterator's end)."""
        self._stop = True
        if self.thread is not None:
            self.thread.join(timeout=60)
        self._it = None


def data_workers(n, dev):
    """Config key data_workers: -1 = 4 on CUDA (the GPU waits on decoding otherwise), 0 on a CPU (measured on
    config/shapes_stage2.py: the data are 4% of a step, and workers take cores from the matmuls, 1.9 s a step against
    1.55: docs/experiments.md, The training stream); else n."""
    return n if n >= 0 else (4 if dev.type == "cuda" else 0)


def to_device(b, dev):
    """The batch's tensors on dev. On CUDA they come from pinned (page-locked) memory (TrainingStream._build) and the
    copies are non-blocking: they run while the training thread goes on, in stream order before any kernel that
    reads them."""
    return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}


def broadcast_batch(b, group, dev):
    """cp rank 0's batch on every rank of its cp group (group): one broadcast of the layout (names, shapes, dtypes
    and the plain values), then one of every tensor's bytes packed into a single uint8 buffer on dev (NCCL moves CUDA
    tensors only). b: the batch on cp rank 0, None on the others."""
    src = dist.get_global_rank(group, 0)
    box = [None if b is None else ({k: (tuple(v.shape), v.dtype) for k, v in b.items() if torch.is_tensor(v)},
                                   {k: v for k, v in b.items() if not torch.is_tensor(v)})]
    dist.broadcast_object_list(box, src=src, group=group, device=dev)
    layout, plain = box[0]
    # each tensor's bytes, padded to 8 so every piece starts aligned for its dtype view
    sizes = [int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in layout.values()]
    starts = np.cumsum([0] + [-(-n // 8) * 8 for n in sizes])
    if b is not None:
        flat = torch.zeros(int(starts[-1]), dtype=torch.uint8, device=dev)
        for k, at, n in zip(layout, starts, sizes):
            flat[at:at + n] = b[k].contiguous().reshape(-1).view(torch.uint8)
    else:
        flat = torch.empty(int(starts[-1]), dtype=torch.uint8, device=dev)
    dist.broadcast(flat, src=src, group=group)
    if b is not None:
        return b
    out = dict(plain)
    for (k, (shape, dtype)), at, n in zip(layout.items(), starts, sizes):
        out[k] = flat[at:at + n].view(dtype).reshape(shape)
    return out


class BrokenMedia:
    """Examples skipped because their image or video cannot be decoded (a truncated PNG, an empty JPEG, a text file
    named .mp4: at PixMo scale some files always are), counted per dataset. The skip is deterministic (the same
    key fails again), so a resumed run replays the same stream. Too many is a data problem, not bad luck: past
    max_frac of a dataset's examples (once MIN_JUDGED of them were tried) the run stops, naming an example."""
    MIN_JUDGED = 20

    def __init__(self, max_frac, print=print):
        self.max_frac, self.print = max_frac, print
        self.skipped, self.seen, self.last = Counter(), Counter(), {}

    def skip(self, name, err, what="media that cannot be decoded"):
        self.skipped[name] += 1
        self.last[name] = str(err)
        if self.skipped[name] <= 3:  # the first few by name; then only the counts (log lines, summary)
            self.print(f"skipped an example of {name}: {err}")
        tried = self.skipped[name] + self.seen[name]
        if tried >= self.MIN_JUDGED and self.skipped[name] > self.max_frac * tried:
            raise SystemExit(f"dataset {name}: {self.skipped[name]} of {tried} examples skipped (the latest has "
                             f"{what}: {err}), more than max_broken_frac={self.max_frac:g}")

    def summary(self):
        """'name k of n, ...' for the datasets with skips (empty when none)."""
        return ", ".join(f"{n} {k} of {k + self.seen[n]}" for n, k in sorted(self.skipped.items()))

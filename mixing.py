"""
Mixing: which dataset each training example comes from.

Two rules, both Molmo2's (Molmo2 code: olmo/data/data_loader.py _build_mixture; docs/molmo2.md, Mixing):
  fixed   stage 1: fixed ratios (dense captions 60% / pointing 30% / text 10%: docs/molmo2.md, Stages).
  sqrt    stages 2 and 3: sqrt-proportional, w_i ~ rate_i * sqrt(n_i) (within its group, below), so a 1M-example
          set gets 10x, not 100x, the draws of a 10k one: big sets still lead, small ones are not drowned out.
A mixture is written as groups, Molmo2's shape: {group: (group_rate, {dataset: rate})}. Inside a group a
dataset's share is rate (fixed rule) or rate * sqrt(size) (sqrt rule), normalised within the group and then
multiplied by the group rate, so the groups keep their rates whatever their sizes. Flat {dataset: rate}
entries form one group. A group named in `flat` mixes its datasets at their given rates under either rule, sizes
ignored (Molmo2's root_size_factor=1 on every dataset of its SFT video_pointing group: sqrt(1) for all).
Size caps: an int cap replaces the size (Molmo2 ("dv_qa", 10000) means sqrt(10000)), a fraction f < 1 scales
it (n * f).

The sampler draws examples i.i.d. from the weights (Molmo2 IterableDatasetMixture), and walks each finite
dataset in a shuffled order, one epoch after another, strided over data-parallel ranks (rank r takes places
r, r + W, r + 2W, ... of the order), so ranks never draw the same example in an epoch. Its state is two
counters: resume restores them and the stream continues exactly.
"""
import zlib

import numpy as np


def capped_size(n, cap=None):
    """The size the sqrt rule uses: n * cap when the cap is below 1 (a fraction), else the cap itself (Molmo2's
    int caps; note a cap of 1 or 1.0 means a size of 1, not "uncapped": leave a dataset out of caps for that)."""
    if cap is None:
        return n
    return n * cap if cap < 1 else cap


def mixture_weights(mixture, sizes=None, caps=None, flat=()):
    """{group: (rate, {dataset: rate})} or {dataset: rate} -> {dataset: probability}, summing to 1.
    sizes=None: fixed ratios. sizes={dataset: n}: the sqrt-proportional rule, every dataset needing a size except
    in the groups named in flat, whose datasets mix at their given rates."""
    caps = caps or {}
    # split the spec: (rate, {dataset: rate}) tuples are groups, plain numbers are loose datasets
    groups = {name: spec for name, spec in mixture.items() if isinstance(spec, (tuple, list))}
    loose = {name: float(spec) for name, spec in mixture.items() if not isinstance(spec, (tuple, list))}
    if loose:  # flat entries form one group whose rate is their sum (a flat mixture is a single group)
        groups[""] = (sum(loose.values()), loose)
    unknown = sorted(set(flat) - set(groups))
    if unknown:
        raise ValueError(f"flat groups {unknown} are not groups of the mixture ({', '.join(sorted(groups))})")
    flat_w = {}  # {dataset: probability before the final normalisation}
    for gname, (grate, members) in groups.items():
        if any(r < 0 for r in members.values()) or grate < 0:
            raise ValueError(f"mixture rates must be >= 0, got group {gname!r}: {grate}, {members}")
        share = dict(members)  # fixed rule, or a flat group: the rates themselves
        if sizes is not None and gname not in flat:
            missing = sorted(ds for ds in members if ds not in sizes)
            if missing:
                raise ValueError(f"sqrt mixing: group {gname!r} has no size for {missing}; give every dataset of a "
                                 f"group a size, or name the group in flat_groups (its datasets at their rates)")
            # sqrt rule: rate x sqrt(size), the size capped as Molmo2 caps it
            share = {ds: r * capped_size(sizes[ds], caps.get(ds)) ** 0.5 for ds, r in members.items()}
        tot = sum(share.values())
        if tot <= 0:
            raise ValueError(f"mixture group {gname!r} has no positive weight: {members}")
        # normalise inside the group, then scale by the group's rate: a group keeps its rate whatever its sizes
        for ds, s in share.items():
            flat_w[ds] = flat_w.get(ds, 0.0) + grate * s / tot
    total = sum(flat_w.values())
    if total <= 0:
        raise ValueError(f"mixture weights must have a positive sum, got {flat_w}")
    return {k: v / total for k, v in flat_w.items()}


class MixtureSampler:
    """A rank's stream of (dataset, example_index) draws.

    There is one global stream, the one a single process draws; rank r of W takes its draws r, r + W, r + 2W, ...
    So W ranks together see exactly the examples one process would (tests/test_dist.py: dp = 2 trains like one
    process on twice the rows), never the same example twice at once, and every rank can compute the whole
    stream cheaply (a draw is a dataset name and an index, nothing is loaded).
    Which dataset: global draw k comes from a generator seeded by (seed, k // CHUNK), so the stream is
    deterministic from the seed and position k.
    Which example: a finite dataset of size n is read in a shuffled order, a new permutation (seeded by
    seed, dataset, epoch) each epoch, the c-th global draw from it at place c of the endless sequence of epochs.
    A procedural dataset (no size, e.g. the shapes tasks) gets the draw's global number k: a new scene every draw.
    State = (global draws so far, per-dataset global counts): state() / load_state() make resume exact."""
    CHUNK = 4096

    def __init__(self, weights, sizes=None, seed=0, rank=0, world_size=1):
        """weights: {dataset: probability} (mixture_weights); sizes: {dataset: examples} for the finite ones
        (the rest are procedural); rank, world_size: this process's place among the data-parallel ranks."""
        self.names = list(weights)
        self.p = np.array([weights[n] for n in self.names])
        self.sizes = {n: int(sizes[n]) for n in self.names if sizes and sizes.get(n)}
        self.seed, self.rank, self.world = seed, rank, world_size
        self.drawn, self.counts = 0, {n: 0 for n in self.names}
        self._chunk = (None, None)
        self._perm = {}

    def _choice(self, k):
        """The dataset of global draw k. Draws come CHUNK at a time from one generator per chunk, so a resumed
        run (or a rank far along the stream) regenerates only the chunk it is in, never the stream before it."""
        c = k // self.CHUNK
        if self._chunk[0] != c:
            # key (seed, 0, chunk): the 0 keeps the dataset-choice stream apart from the per-dataset orders
            # (_order's keys are (seed, crc32 of the name, epoch))
            rng = np.random.default_rng([self.seed, 0, c])
            self._chunk = (c, rng.choice(len(self.names), size=self.CHUNK, p=self.p))
        return self.names[self._chunk[1][k % self.CHUNK]]

    def _order(self, name, epoch):
        """The shuffled order of a finite dataset in one epoch: a permutation of range(size), the same on every
        rank. Draws interleave datasets, so a few (dataset, epoch) orders are cached; past 8 the cache is cleared
        and an order is recomputed when next needed."""
        key = (name, epoch)
        if key not in self._perm:
            if len(self._perm) > 8:
                self._perm.clear()
            rng = np.random.default_rng([self.seed, zlib.crc32(name.encode()), epoch])
            self._perm[key] = rng.permutation(self.sizes[name])
        return self._perm[key]

    def _next_global(self):
        """Advance the global stream by one draw -> (dataset, example index). A finite dataset's c-th draw is
        place c mod size of epoch c // size; a procedural one gets the draw's global number."""
        name = self._choice(self.drawn)
        if name in self.sizes:
            epoch, j = divmod(self.counts[name], self.sizes[name])
            idx = int(self._order(name, epoch)[j])
        else:
            idx = self.drawn
        self.drawn += 1
        self.counts[name] += 1
        return name, idx

    def draw(self):
        """The next (dataset, index) of this rank: its place among the next W draws of the global stream."""
        mine = [self._next_global() for _ in range(self.world)]
        return mine[self.rank]

    def take(self, n):
        """The next n draws of this rank, [(dataset, index)]."""
        return [self.draw() for _ in range(n)]

    def state(self):
        """Everything the stream depends on, small and picklable: stored in checkpoints for an exact resume."""
        return dict(seed=self.seed, rank=self.rank, world=self.world, drawn=self.drawn, counts=dict(self.counts))

    def load_state(self, s):
        """Continue from state(): the next draw is the one the saved run would have made. The layout must match
        (a rank of W strides the global stream by W, so another layout would draw another sequence)."""
        if (s["rank"], s["world"]) != (self.rank, self.world):
            raise ValueError(f"sampler state is for rank {s['rank']} of {s['world']}, "
                             f"this sampler is rank {self.rank} of {self.world}")
        self.seed, self.drawn = s["seed"], s["drawn"]
        self.counts = {n: s["counts"].get(n, 0) for n in self.names}


def mixture_table(weights, sizes=None, total_examples=None, caps=None, width=30, rated=()):
    """The printed table: dataset, size (capped size in brackets), sqrt(size) ("rate" for the datasets of flat
    groups, `rated`, whose weight ignores it), weight, a bar, and the expected number of examples over the run."""
    sizes, caps = sizes or {}, caps or {}
    lines = [f"{'dataset':<26}{'size (capped)':>20}{'sqrt':>8}{'weight':>8}  {'':<{width}}{'expected':>12}"]
    for name, w in sorted(weights.items(), key=lambda kv: -kv[1]):
        n = sizes.get(name)
        if n:
            used = capped_size(n, caps.get(name))
            sz = f"{n:,}" + (f" ({used:,.0f})" if used != n else "")
            sq = "rate" if name in rated else f"{used ** 0.5:.0f}"
        else:
            sz, sq = "-", "-"  # procedural (shapes), or a flat group's dataset given no size
        exp = f"{w * total_examples:,.0f}" if total_examples else "-"
        lines.append(f"{name:<26}{sz:>20}{sq:>8}{w:>8.3f}  {'█' * round(w * width):<{width}}{exp:>12}")
    return "\n".join(lines)

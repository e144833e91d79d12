"""
Mixing: which dataset each training example comes from.

Stage 1 uses fixed ratios (seed: dense captions 60% / pointing 30% / text 10%). A mixture is written as
groups, Molmo2's shape (olmo/data/data_loader.py _build_mixture): {group: (group_rate, {dataset: ratio})};
a dataset's probability is group_rate * ratio / sum(ratios in its group). A flat {dataset: ratio} is one
group per dataset.

The sampler is a pure function of (seed, rank, step): nothing to replay on resume, and each data-parallel rank
draws a different stream. Examples are drawn i.i.d. per example, as Molmo2's IterableDatasetMixture does.
"""
import numpy as np


def mixture_weights(mixture):
    """{group: (rate, {dataset: ratio})} or {dataset: ratio} -> {dataset: probability}, summing to 1."""
    flat = {}
    for name, spec in mixture.items():
        if isinstance(spec, (tuple, list)):
            rate, members = spec
            tot = sum(members.values())
            for ds, r in members.items():
                flat[ds] = flat.get(ds, 0.0) + rate * r / tot
        else:
            flat[name] = flat.get(name, 0.0) + float(spec)
    total = sum(flat.values())
    if total <= 0 or any(v < 0 for v in flat.values()):
        raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {flat}")
    return {k: v / total for k, v in flat.items()}


class MixtureSampler:
    """Draws (dataset, example_index) pairs. Example indices count up per (rank, step, slot) so two ranks
    never draw the same example; state() / load_state() make resumption exact."""

    def __init__(self, weights, seed=0, rank=0, world_size=1):
        self.names = list(weights)
        self.p = np.array([weights[n] for n in self.names])
        self.seed, self.rank, self.world = seed, rank, world_size
        self.step = 0

    def batch(self, n, step=None, micro=0):
        """n draws for this rank at `step` (micro-batch `micro`). Returns [(dataset, index)]."""
        step = self.step if step is None else step
        rng = np.random.default_rng([self.seed, self.rank, step, micro])
        picks = rng.choice(len(self.names), size=n, p=self.p)
        base = ((step * 1024 + micro) * self.world + self.rank) * n  # unique per (step, micro, rank, slot)
        return [(self.names[k], base + i) for i, k in enumerate(picks)]

    def state(self):
        return dict(seed=self.seed, step=self.step)

    def load_state(self, s):
        self.seed, self.step = s["seed"], s["step"]


def mixture_table(weights, sizes=None, total_examples=None, width=30):
    """The printed table: dataset, size, sqrt(size), weight, a bar, and expected examples over the run."""
    sizes = sizes or {}
    lines = [f"{'dataset':<22}{'size':>10}{'sqrt':>8}{'weight':>8}  {'':<{width}}{'expected':>12}"]
    for name, w in sorted(weights.items(), key=lambda kv: -kv[1]):
        n = sizes.get(name)
        sz = f"{n:,}" if n else "procedural"
        sq = f"{n ** 0.5:.0f}" if n else "-"
        exp = f"{w * total_examples:,.0f}" if total_examples else "-"
        lines.append(f"{name:<22}{sz:>10}{sq:>8}{w:>8.3f}  {'█' * round(w * width):<{width}}{exp:>12}")
    return "\n".join(lines)

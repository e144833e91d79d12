"""
The run's records, for tools and for the eye: every log line and every eval of a training run, one JSON object a
line in <out_dir>/metrics.jsonl (and in Weights & Biases when wandb_log is on), and the learning curve drawn from
that file.

    python metrics.py out/shapes_stage1/metrics.jsonl                 # draws out/shapes_stage1/curve.png
    python metrics.py out/shapes_stage1/metrics.jsonl docs/curve.png  # ... or to a path of your choice

A line is one of (train.py writes them, rank 0 only; numbers as printed in the log, unrounded):
    {"kind": "train", "step": 10, "total": 1221, "loss": 2.31, "loss_avg": 2.45, "gnorm": 0.72, "lr": 3e-4,
     "tok_s": 5292.0, "ex_s": 56.1, "non_pad": 0.99, "mfu": 0.87, "elapsed_s": 65.2, "eta_s": 900.1, "time": ...}
        loss is the step's own (the log line's), loss_avg the mean over the steps since the previous line;
        elapsed_s counts from the start of the training loop, time is the Unix time of the line
    {"kind": "eval", "step": 250, "pointing_f1": 0.06, "count_acc": 0.31, "qa_acc": 0.52, "prompts": 100, "time": ...}
        a held-out eval; the one at the end carries "final": true, its image-blind baseline "blind": true too
Every line is written and flushed at once, so a tool may follow the file while the run is going. A resumed run
appends to the file, first dropping the lines past its checkpoint's step (MetricsLog): the steps after the last
checkpoint of a stopped run are trained again, and their lines are written again, so each step is in the file once.
"""
import itertools
import json
import math
import os
import sys
import time

# Weights & Biases keys: a record's kind names its section (train/loss, eval/pointing_f1, final/..., blind/...)
WANDB_SKIP = ("kind", "step", "final", "blind", "time")


def wandb_required(on):
    """wandb_log=True needs the wandb package; checked when the run is configured, before anything is built.
    Nothing imports wandb when it is off."""
    if not on:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise SystemExit("wandb_log=True but the wandb package is not installed: pip install wandb, or set "
                         "wandb_log=False (the run's metrics.jsonl is written either way)") from None


class MetricsLog:
    """metrics.jsonl (and Weights & Biases) for one run, on rank 0; on the other ranks (on=False) it does nothing.
    resume_step: a resumed run's checkpoint step. The lines after it were logged by the stopped run after its last
    checkpoint; the resumed run trains those steps again and logs them anew, so they are dropped first, and so is a
    final eval at that very step (a finished run resumed evaluates its last step again). The file is rewritten to a
    temporary name and renamed over the old one: a crash here leaves the old file whole. A fresh run (resume_step
    None) starts the file anew, as it starts the checkpoint anew.
    wandb: None, or dict(project=..., name=..., config=...) to mirror every record to a Weights & Biases run."""

    def __init__(self, path, on=True, resume_step=None, wandb=None):
        self.path, self.on, self.wandb = path, on, None
        if not on:
            return
        if resume_step is not None and os.path.exists(path):
            keep = [r for r in read_metrics(path)
                    if r["step"] < resume_step or r["step"] == resume_step and not r.get("final")]
            with open(path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(path + ".tmp", path)
        elif os.path.exists(path):
            os.remove(path)  # a fresh run in an old out_dir: the records there are not this run's
        if wandb is not None:
            import wandb as wandb_module  # only here: the package is needed only when wandb_log is on
            self.wandb = wandb_module
            self.wandb.init(project=wandb["project"], name=wandb["name"] or None, config=wandb["config"])

    def log(self, rec):
        """Append one record (a dict with kind and step) and flush it; mirrored to Weights & Biases when on."""
        if not self.on:
            return
        rec = dict(rec, time=time.time())
        with open(self.path, "a") as f:  # opened per line: a line is on disk as soon as it is logged
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            section = "blind" if rec.get("blind") else "final" if rec.get("final") else rec["kind"]
            self.wandb.log({f"{section}/{k}": v for k, v in rec.items() if k not in WANDB_SKIP
                            and isinstance(v, (int, float))}, step=rec["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path):
    """The records of a metrics.jsonl, in file order. A line that is not a JSON object with a kind and a step is an
    error naming the file and the line."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON line ({e.msg})") from None
            if not isinstance(rec, dict) or "kind" not in rec or not isinstance(rec.get("step"), int):
                raise ValueError(f"{path}:{i}: a record needs 'kind' and an integer 'step', got {line.strip()[:80]}")
            out.append(rec)
    return out


# the held-out metrics a curve draws, each in its own colour (the same metric the same colour in every figure);
# any other metric of an eval record gets a colour of matplotlib's cycle
METRIC_COLOURS = {"pointing_f1": "tab:red", "count_acc": "tab:green", "qa_acc": "tab:purple",
                  "tracking_f1": "tab:orange", "video_pointing_f1": "tab:cyan", "video_count_acc": "tab:olive"}


def plot_curve(records, path, title=""):
    """The learning curve of one run as a PNG at path, from its records (read_metrics): the training loss against
    the step on the left axis, each logged step's loss faint and the mean over each log interval bold (on a log
    scale once the loss spans more than a factor of 3, so the long flat tail stays readable); every held-out metric
    against the step on the right axis (0 to 1): the evals as dots joined by a line, the final eval a star, its
    image-blind baseline a hollow diamond, their figures in the legend.
    Returns False (and writes nothing) when there are fewer than two training records."""
    import matplotlib
    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    train = [r for r in records if r["kind"] == "train" and math.isfinite(r.get("loss", math.nan))]
    evals = [r for r in records if r["kind"] == "eval"]
    if len(train) < 2:
        return False
    steps = [r["step"] for r in train]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, [r["loss"] for r in train], color="tab:blue", alpha=0.3, lw=0.8, label="train loss (the step's)")
    if all("loss_avg" in r for r in train):
        ax.plot(steps, [r["loss_avg"] for r in train], color="tab:blue", lw=1.8,
                label="train loss (mean over each log interval)")
    losses = [r["loss"] for r in train]
    log = min(losses) > 0 and max(losses) > 3 * min(losses)
    if log:  # ticks at 1, 2, 5 x 10^k (within one decade: 1, 2, ..., 9 x 10^k), written as plain numbers
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if max(losses) > 10 * min(losses) else range(1, 10)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss" + (" (log scale)" if log else ""))
    ax.set_xlim(0, 1.02 * max(steps + [r["step"] for r in evals]))  # room for the final markers
    ax.grid(True, alpha=0.3)
    h, labels = ax.get_legend_handles_labels()
    if evals:
        # every metric any eval record holds (not its step, time, prompt count or flags), in first-seen order
        names = list(dict.fromkeys(k for r in evals for k, v in r.items() if k not in ("step", "time", "prompts")
                                   and isinstance(v, float)))
        ax2 = ax.twinx()
        cycle = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"][5:])  # real eval sets: many metrics
        for name in names:
            col = METRIC_COLOURS.get(name) or next(cycle)
            seen = [r for r in evals if name in r and not r.get("blind")]  # periodic evals, then the final one
            fin = [r for r in seen if r.get("final")]
            blind = [r for r in evals if name in r and r.get("blind")]
            figures = ([f"final {fin[-1][name]:.3f}"] if fin else []) + ([f"blind {blind[-1][name]:.3f}"] if blind
                                                                         else [])
            line, = ax2.plot([r["step"] for r in seen], [r[name] for r in seen], "o-", color=col, ms=4, lw=1.2)
            h.append(line)
            labels.append(f"held-out {name}" + (f" ({', '.join(figures)})" if figures else ""))
            ax2.plot([r["step"] for r in fin], [r[name] for r in fin], "*", color=col, ms=13, clip_on=False)
            ax2.plot([r["step"] for r in blind], [r[name] for r in blind], "D", color=col, mfc="none", ms=7,
                     clip_on=False)
        if any(r.get("final") for r in evals):  # what the two markers mean, once for every metric
            h += [Line2D([], [], ls="", marker="*", ms=11, color="0.3"),
                  Line2D([], [], ls="", marker="D", ms=6, mfc="none", color="0.3")]
            labels += ["final eval", "image-blind baseline (blank images)"]
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("held-out metric (0 to 1)")
    ax.legend(h, labels, loc="upper left", bbox_to_anchor=(1.1, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or f"learning curve: {len(train)} log lines, steps {steps[0]}-{steps[-1]}")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return True

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python metrics.py RUN/metrics.jsonl [OUT.png]  (default: curve.png beside it)")
    src = sys.argv[1]
    dst = sys.argv[2] if len(sys.argv) == 3 else os.path.join(os.path.dirname(src) or ".", "curve.png")
    try:
        recs = read_metrics(src)
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    if not plot_curve(recs, dst, title=os.path.basename(os.path.dirname(os.path.abspath(src)))):
        raise SystemExit(f"{src}: fewer than two training records, no curve drawn")
    print(f"wrote {dst} ({len(recs)} records)")

"""loader.py, the training stream: worker processes give the in-thread stream's batches, a resumed run with workers
repeats the uninterrupted one exactly (the checkpoint holds the stream as consumed, not as prefetched), pixels
travel as bytes and the model's normalisation equals the fp32 reference, and a cp group's batch is broadcast."""
import types

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import loader
import mixing
import train
from test_dist import _as_rank, _spawn
from test_train import DEFAULTS, run_args


def stream(tok, cfg, workers, **kw):
    C = types.SimpleNamespace(**dict(DEFAULTS, packing=True, seq_len=320, batch_size=3, max_images_per_row=24,
                                     pack_buffer=8, data_workers=workers, prefetch=8, **kw))
    C.mixture = {"image": (0.5, {"point": 1.0, "caption": 1.0}), "video": (0.5, {"track": 1.0, "video_qa": 1.0})}
    sampler = mixing.MixtureSampler(*train.mixture_of(C), seed=3)
    return loader.TrainingStream(C, tok, cfg, sampler, torch.device("cpu"))


def same_batch(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_workers_give_the_in_thread_batches_and_save_what_was_consumed(tok, cfg):
    """2 workers prefetching 8 examples ahead: the same batches as data_workers=0 (the training thread encoding each
    example when the packer asks), and after each batch the same state, though the workers' sampler is ahead: the
    state is the consumed stream's. A stream resumed from that state continues with the same batches."""
    s0, s2 = stream(tok, cfg, 0), stream(tok, cfg, 2)
    for _ in range(3):
        b0, b2 = s0.get_batch(), s2.get_batch()
        assert same_batch(b0, b2) and b2["pixel_values"].dtype == torch.uint8
        assert s2.state() == s0.state()
    assert s2.sampler.drawn > s0.sampler.drawn  # prefetched beyond what was consumed
    saved = s2.state()
    s2.close()
    r = stream(tok, cfg, 2)
    r.load_state(saved)
    assert r.state() == saved  # before any batch: the replayed keys still count as the packer's
    for _ in range(2):
        assert same_batch(r.get_batch(), s0.get_batch())
        assert r.state() == s0.state()
    r.close()


def test_resumed_run_with_workers_repeats_the_uninterrupted_losses(tmp_path, capsys):
    """data_workers=2, packed rows: stopped at step 2 and resumed, the losses equal the uninterrupted run's bit for
    bit (fp32), and the step lines say how much of the step waited for data."""
    kw = dict(max_steps=4, packing=True, seq_len=200, batch_size=3, max_images_per_row=3, pack_buffer=8,
              data_workers=2, prefetch=8, log_interval=2)
    a = train.main(run_args(tmp_path / "A", **kw))["losses"]
    train.main(run_args(tmp_path / "B", stop_at=2, **kw))
    b = train.main(run_args(tmp_path / "B", init_from="resume", **kw))["losses"]
    assert len(a) == 4 and b == a
    waits = [float(line.split("data wait ")[1].split("%")[0]) for line in capsys.readouterr().out.splitlines()
             if line.startswith("step ")]
    assert len(waits) == 4 and all(0 <= w <= 100 for w in waits)


def test_pixels_as_bytes_normalise_to_the_fp32_reference(cfg, tok):
    """Examples and batches carry uint8 bytes; data.normalize_pixels ((x/255 - 0.5) / 0.5, Molmo2's mean = std = 0.5)
    gives exactly the fp32 pixels of x / 255 * 2 - 1 for every byte value, resized or not, and the model's loss on a
    uint8 batch equals its loss on the same batch normalised beforehand."""
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(data.normalize_pixels(x), x.float() / 255.0 * 2 - 1)
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))  # 40 rows, 50 columns
    raw = torch.from_numpy(np.array(im, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, 3, 40, 50)
    for hw in ((40, 50), (32, 32)):  # as is, and resized (bilinear, rounded to bytes)
        ref = raw if hw == (40, 50) else torch.nn.functional.interpolate(
            raw, size=hw, mode="bilinear", align_corners=False, antialias=False).round().clamp(0, 255)
        ref = ref[0] / 255.0 * 2 - 1  # the fp32 reference: (3, h, w) in [-1, 1]
        b = data.image_bytes(im, *hw)
        assert b.dtype == torch.uint8 and torch.equal(data.normalize_pixels(b), ref)
        assert torch.equal(data.preprocess_image(im, *hw), ref)
    import shapes
    from model import Molmo2
    e = data.encode_example(shapes.make_example("track", 5, cfg.image_size), tok, cfg, {"track": 2.0})
    batch = data.collate([e], tok.pad, 10 ** 6)
    assert batch["pixel_values"].dtype == torch.uint8
    torch.manual_seed(0)
    model = Molmo2(cfg).float()
    with torch.no_grad():
        got = model(batch)[0]
        want = model(dict(batch, pixel_values=data.normalize_pixels(batch["pixel_values"])))[0]
    assert torch.equal(got, want)


def _broadcast_worker(rank, world, port, out):
    _as_rank(rank, world, port)
    dist.init_process_group("gloo")
    try:
        group = dist.new_group([0, 1])
        torch.manual_seed(0)  # the same batch on both ranks: rank 1 keeps its own to compare
        b = dict(input_ids=torch.arange(12).view(2, 6), attention_mask=torch.rand(2, 6) > 0.3,
                 loss_weights=torch.rand(2, 6), pixel_values=torch.randint(0, 256, (2, 3, 3, 4, 4), dtype=torch.uint8),
                 pool_idx=torch.zeros(0, 9, dtype=torch.long), n_examples=5)
        got = loader.broadcast_batch(b if rank == 0 else None, group, torch.device("cpu"))
        if rank == 1:
            torch.save(dict(want=b, got={k: v.clone() if torch.is_tensor(v) else v for k, v in got.items()}), out)
    finally:
        dist.destroy_process_group()


def test_a_cp_group_gets_its_first_rank_batch(tmp_path):
    """Two gloo processes: cp rank 0's batch (int64, bool, float, uint8 and empty tensors, a plain number) arrives
    whole on cp rank 1, which builds none (each video decoded once per dp group)."""
    out = tmp_path / "b.pt"
    _spawn(_broadcast_worker, 2, str(out))
    r = torch.load(out)
    want, got = r["want"], r["got"]
    assert got.keys() == want.keys() and got["n_examples"] == 5
    for k, v in want.items():
        if torch.is_tensor(v):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k

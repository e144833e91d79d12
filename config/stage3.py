# Stage 3 at real scale: long-context SFT, with the target numbers of docs/molmo2.md, Stages.
#   torchrun --nproc_per_node=8 train.py config/stage3.py          (one node: dp 4 x cp 2)
#   python train.py config/stage3.py --dry_run=True                 (build the model, print, stop)
#   python bench.py --plan config/stage3.py                         (per-GPU memory over layouts)
# The data is stage 2's (Molmo2's long-context stage keeps the SFT mixture and lengthens the rows), so this
# file runs config/stage2.py first and overrides what changes.
import os  # (modules in a config are not config keys)
exec(open(os.path.join(os.path.dirname(__file__), "stage2.py")).read())
out_dir = "out/stage3"
init_from = "out/stage2/ckpt.pt"  # stage 3 continues from stage 2's weights
seq_len = 36_864           # docs/molmo2.md, Stages: 36,864 tokens a row
max_frames = 384           # 2 fps, at most 384 frames a video (Molmo2's long-context stage)
max_images_per_row = 384   # one video of max_frames frames a row, 3x stage 2 (must be >= max_frames: check_config)
batch_size = 4             # rows per micro-batch (per dp group, below)
grad_accum = 16            # micro-batches per optimizer step
max_steps = 2000           # docs/molmo2.md, stage 3: ~2,000 steps (Molmo2's too)
lr = 3e-5                  # the LLM's peak, below stage 2's 5e-5
warmup_steps = 100         # linear warmup, then cosine to 10%
eval_interval = 500
# Context parallelism: a 36,864-token row does not fit one GPU's memory (the planning figure is ~84 GB a GPU
# without CP; docs/molmo2.md, Stages). `python bench.py --plan config/stage3.py` measures this model: dp 4 x
# cp 2 with FSDP2 and activation checkpointing needs ~46 GB a GPU (8 x 1 ~61 GB, 2 x 4 ~39 GB), with 4 rows
# of 384 frames per micro-batch.
cp = 2                     # each 36,864-token row split over 2 GPUs (18,432 each); cp ranks hold the same rows
cp_mode = "ulysses"        # Molmo2's choice: its masks (bidirectional frames, packed examples) apply unchanged;
                           # 'ring' is exact too (cp_attention.py), without the causal saving under these masks
fsdp = True                # params, grads and Adam state sharded over all 8 GPUs (2.7 + 2.7 + 5.4 GB -> 1.4 GB)
act_ckpt = True            # recompute each block in backward: LLM activations 343 GB -> 29 GB at cp 1
# The target batch is 4 rows per GPU on 8 GPUs (4 x 8 x 16 = 512 rows a step); with cp = 2 two GPUs share 4 rows,
# so one node makes 4 (dp) x 4 x 16 = 256 rows a step: grad_accum = 32 or two nodes give the target 512.

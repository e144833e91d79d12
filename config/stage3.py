# Stage 3 at real scale: long-context SFT, the seed's numbers (shared/seed: "Stage 3: Long-Context SFT").
#   torchrun --nproc_per_node=8 train.py config/stage3.py          (one node: dp 4 x cp 2)
#   python train.py config/stage3.py --dry_run=True                 (build the model, print, stop)
#   python bench.py --plan config/stage3.py                         (per-GPU memory over layouts)
# The data is stage 2's (seed: "INPUT DATA (Same as Stage 2)"; Molmo2: "the same mixture with seq_len=36864"),
# so this file runs config/stage2.py first and overrides what changes.
import os  # (modules in a config are not config keys)
exec(open(os.path.join(os.path.dirname(__file__), "stage2.py")).read())
out_dir = "out/stage3"
init_from = "out/stage2/ckpt.pt"  # seed: "Stage2 checkpoint -> feeds into Stage 3"
seq_len = 36_864           # seed: "attention_mask: [4, 36864]"
max_images_per_row = 384   # seed: "Max 384 frames (3x more than Stage 2!)"
batch_size = 4             # seed: "Stage 3 (Video 384 frames, batch=4, seq=36864)"
grad_accum = 16            # seed: "Gradient accumulation: 16 steps"
max_steps = 2000           # seed: "Steps: ~2,000"; Molmo2 README --max_duration=2000
lr = 3e-5                  # seed: "Learning rate: 3e-5 with warmup (100 steps)"
warmup_steps = 100         # (same line)
eval_interval = 500
# seed: "Requires Context Parallelism (CP): Split long sequence across multiple GPUs" (its table: ~84 GB a GPU
# without). `python bench.py --plan config/stage3.py` measures this model: 4 x 2 with FSDP2 and activation
# checkpointing needs ~76 GB a GPU (8 x 1 ~118 GB, 2 x 4 ~54 GB), with 4 rows of 384 frames per micro-batch.
cp = 2                     # each 36,864-token row split over 2 GPUs (18,432 each); cp ranks hold the same rows
cp_mode = "ulysses"        # Molmo2's choice: its masks (bidirectional frames, packed examples) apply unchanged;
                           # 'ring' is exact too (cp_attention.py), without the causal saving under these masks
fsdp = True                # params, grads and Adam state sharded over all 8 GPUs (2.7 + 2.7 + 5.4 GB -> 1.4 GB)
act_ckpt = True            # recompute each block in backward: LLM activations 343 GB -> 29 GB at cp 1
# The seed's batch 4 is per GPU with 8 GPUs (4 x 8 x 16 = 512 rows a step); with cp = 2 two GPUs share 4 rows,
# so one node makes 4 (dp) x 4 x 16 = 256 rows a step: grad_accum = 32 or two nodes give the seed's 512.

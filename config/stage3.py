# Stage 3 at real scale: long-context SFT, the seed's numbers (shared/seed: "Stage 3: Long-Context SFT").
#   python train.py config/stage3.py --dry_run=True
# Context parallelism (Ulysses / ring, cp_attention.py) and torchrun arrive with the scale-out issue.
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

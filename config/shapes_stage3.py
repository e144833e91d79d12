# Stage 3 (long-context SFT) on the built-in shapes world: each sequence split over 2 processes on a CPU.
#   torchrun --nproc_per_node=2 train.py config/shapes_stage3.py
# Starts from the stage-2 shapes checkpoint, on the same mixture (Molmo2's stage 3 keeps stage 2's data) with
# videos twice as long, 12-20 frames (6-10 s at 2 fps) instead of 6-11, in rows twice as long; context
# parallelism (cp = 2, zigzag ring attention) splits every row over the 2 ranks.
import os  # (modules in a config are not config keys)
exec(open(os.path.join(os.path.dirname(__file__), "shapes_stage2.py")).read())
out_dir = "out/shapes_stage3"
init_from = "out/shapes_stage2/ckpt.pt"   # stage 3 continues from stage 2's weights
cp = 2                     # context parallelism, as the real stage 3: each row split over 2 ranks
cp_mode = "ring"           # zigzag ring, the scheme written for this codebase (the default and config/stage3.py
                           # use Molmo2's Ulysses; --cp_mode=ulysses works here too: 4 heads over 2 ranks)
video_frames = (12, 20)    # longer videos (stage 2: 6-11 frames); a 20-frame track answer: 230 tokens on average
seq_len = 1024             # 2x stage 2's rows (the real stages: 4,096 -> 36,864)
max_images_per_row = 64    # 2x stage 2's vision budget (the real stages: 128 -> 384 frames)
batch_size = 4             # rows per micro-batch, the same 4,096-token micro-batch as stage 2 (8 x 512)
max_minutes = 20.0         # the step count that fits 20 minutes here (train.fit_budget), at most max_steps
max_steps = 500            # fewer steps at a higher LR cost image pointing (docs/experiments.md)
warmup_steps = 20
lr = 1.5e-4                # half stage 2's 3e-4 (the real stages: 5e-5 -> 3e-5)
# optimizer: AdamW, the default, as its figures were measured; stages 1 and 2 of the demo run Muon (muon.py)
threads = 1                # one thread per rank: 2 ranks on 2 cores
eval_tasks = ("track", "video_point", "video_count", "point")
eval_interval = 250
eval_prompts = 50
final_eval_prompts = 300

# Stage 1 (image pretraining) on the built-in shapes world, on a laptop-class CPU.
#   python train.py config/shapes_stage1.py
# A ~5M-parameter Molmo2-architecture model trained from scratch. The mix is the seed's stage-1 60/30/10
# (captions group: captions + QA on the same scenes; pointing group: points + point-then-count; text).
out_dir = "out/shapes_stage1"
turns_per_image = 3        # 3 questions per scene in one sequence: the image is encoded once for all three
seq_len = 640              # room for 3 turns (the longest seen ~320 tokens)
batch_size = 32
max_steps = 800            # sized so that training + evals fit in 20 minutes on 2 cores (README)
warmup_steps = 50
lr = 1e-3
# From scratch the ViT and connector must learn as fast as the LLM: Molmo2's 10x / 0.3x ratios assume a
# pretrained ViT and LLM (measured on the GPU sweep in README: equal LRs learned to look, ratios did not)
lr_connector_mult = 1.0
lr_vit_mult = 1.0
eval_interval = 200
eval_prompts = 100
final_eval_prompts = 500
log_interval = 10

# Stage 2 at real scale: multimodal SFT with video, with the target numbers of docs/molmo2.md, Stages.
#   python train.py config/stage2.py --dry_run=True          (build the model, print the mixture, stop)
# The datasets are read from local jsonl copies (data_paths; their sizes replace dataset_sizes below; readers.py
# SOURCES says where each comes from).
# The model is stage 1's (its checkpoint overrides the architecture anyway when init_from loads it): this file
# runs config/stage1.py first and overrides the data and the schedule.
import os  # (modules in a config are not config keys)
exec(open(os.path.join(os.path.dirname(__file__), "stage1.py")).read())
out_dir = "out/stage2"
init_from = "out/stage1/ckpt.pt"  # weights of stage 1 (stage 2 continues from it), or a
#                                   released Molmo2 directory (its tokenizer.json as tokenizer) to fine-tune it
init_llm = init_vit = ""           # stage 1's initialisation is already in its checkpoint
# Sqrt-proportional mixing, w_i = sqrt(n_i) / sum_j sqrt(n_j), inside Molmo2's SFT groups, whose rates are
# kept whatever the sizes (docs/molmo2.md, Mixing; Molmo2 code: launch_scripts/sft.py get_training_mixture).
mixing_rule = "sqrt"
mixture = {
    "demo": (0.15, {"pixmo_cap": 1.0, "molmo2_cap": 1.5}),            # Molmo2-Cap at sampling_rate 1.5
    "video_academic": (0.20, {"molmo2_capqa": 1.0, "molmo2_subtitleqa": 1.0}),
    # Molmo2's IMAGE_ACADEMIC_DATASETS, each at rate 1 (sqrt of its size decides): these six of its 30-odd
    "image_academic": (0.25, {"vqa_v2": 1.0, "docvqa": 1.0, "textvqa": 1.0, "chartqa": 1.0, "ai2d": 1.0,
                              "nlvr2": 1.0}),
    "tracking": (0.15, {"molmo2_track": 1.0}),
    # Molmo2-VideoPoint binned by count, and the academic point sets, at their rates whatever their sizes
    "video_pointing": (0.15, {"videopoint_0_5": 0.4, "videopoint_6_25": 0.3, "videopoint_26_60": 0.1,
                              "academic_points": 0.2}),
    "image_pointing": (0.10, {"pixmo_points": 1.0}),
    "nlp": (0.0995, {"tulu": 1.0}),
}
flat_groups = ("video_pointing",)  # Molmo2 root_size_factor=1 for each: their rates, not their sizes
# The target example counts (Molmo2-CapQA 1,000k, PixMo-Cap 710k, Molmo2-Track 220k; as in stage 1, PixMo-Points
# ~1M, Tulu ~980k; the train splits of VQA v2, 443,757 questions grouped on its 82,783 images as Molmo2's
# coco_2014_vqa_multi groups them, DocVQA 39,463, TextVQA 34,602, ChartQA 28,299, and The Cauldron's AI2D ~2.4k
# and NLVR2 ~50.4k rows). Molmo2-Cap and SubtitleQA have no target count: 100k is a placeholder until the readers
# count the local copies. The video_pointing group needs none (flat_groups).
dataset_sizes = {"molmo2_capqa": 1_000_000, "vqa_v2": 82_783, "pixmo_cap": 710_000, "molmo2_track": 220_000,
                 "pixmo_points": 1_000_000, "tulu": 980_000, "molmo2_cap": 100_000, "molmo2_subtitleqa": 100_000,
                 "docvqa": 39_463, "textvqa": 34_602, "chartqa": 28_299, "ai2d": 2_400, "nlvr2": 50_400}
data_paths = {name: f"data/{name}.jsonl" for _, leaves in mixture.values() for name in leaves}  # as stage 1
# stage 1's held-out sets, plus VQA v2 (VQA score), DocVQA (ANLS), ChartQA (relaxed accuracy) and the video
# sets: Molmo2's video pointing, counting and tracking evals (eval.EVAL_METRICS)
eval_data = dict(eval_data, vqa_v2_val="data/vqa_v2_val.jsonl", docvqa_val="data/docvqa_val.jsonl",
                 chartqa_test="data/chartqa_test.jsonl", videopoint_eval="data/videopoint_eval.jsonl",
                 videocount_eval="data/videocount_eval.jsonl", videotrack_eval="data/videotrack_eval.jsonl")
dataset_caps = {"pixmo_cap": 100_000}  # Molmo2 caps PixMo-Cap at 100k in SFT so captions do not dominate
loss_weighting = "root"    # Molmo2 SFT: root_subsegments_root_tokens (2/sqrt(n)), pointing/tracking flat 0.2
packing = True             # Molmo2 packs SFT sequences (docs/molmo2.md, Stages)
max_frames = 128           # 2 fps, at most 128 frames a video (docs/molmo2.md, Video sampling)
max_images_per_row = 128   # the vision budget of a row: one video of max_frames frames (check_config holds it)
seq_len = 4096             # docs/molmo2.md, Stages (a 128-frame video just overflows it: Token layout)
batch_size = 16            # rows per GPU
grad_accum = 4             # 16 rows x 8 GPUs x 4 = 512 rows a step (fsdp and act_ckpt as stage 1)
max_steps = 50_000         # docs/molmo2.md, stage 2: ~50,000 steps
lr = 5e-5                  # the LLM's peak, below stage 1's 1e-4
warmup_steps = 1000        # linear warmup, then cosine to 10%
lr_connector_mult = 1.0    # the connector at the LLM's LR (Molmo2 SFT: connector and ViT 5e-6, LLM 1e-5,
lr_vit_mult = 0.5          # i.e. 0.5x each; the ViT follows it)
eval_interval = 2000

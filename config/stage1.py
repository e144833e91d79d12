# Stage 1 at real scale: image pretraining, with the target numbers of docs/molmo2.md, Stages.
#   torchrun --nproc_per_node=4 train.py config/stage1.py           (the paths below must exist: checkpoints, data)
#   python train.py config/stage1.py --dry_run=True                  (build the model, print, stop)
out_dir = "out/stage1"
dataset = "molmo2"
# dense captions 60% / pointing 30% / text 10%, fixed ratios (docs/molmo2.md, Stages and Mixing)
mixture = {"captions": (0.6, {"pixmo_cap": 1.0}),
           "pointing": (0.3, {"pixmo_points": 1.0}),
           "text": (0.1, {"tulu": 1.0})}
dataset_sizes = {"pixmo_cap": 710_000, "pixmo_points": 1_000_000, "tulu": 980_000}  # target example counts
# Local copies (readers.read_dataset; a missing file stops the run before the model is built). When read, their
# own sizes replace dataset_sizes. Override: --data_paths="{'pixmo_cap': '/data/pixmo_cap.jsonl', ...}" --media_root=...
data_paths = {name: f"data/{name}.jsonl" for _, leaves in mixture.values() for name in leaves}
# Real held-out sets scored at each eval instead of the shapes tasks (eval.EVAL_METRICS: counting accuracy,
# pointing F1 as Molmo2 computes them): eval split (readers.SOURCES name) -> its local copy
eval_data = {"pixmo_count_val": "data/pixmo_count_val.jsonl", "pixmo_points_eval": "data/pixmo_points_eval.jsonl"}
media_root = "data/media"  # images at readers.media_path(media_root, url), videos at <media_root>/<video id>.mp4
seq_len = 4096             # docs/molmo2.md, Stages: 4,096 tokens a row
packing = True             # several examples a row (Molmo2 packs its pretraining sequences: docs/molmo2.md, Stages)
max_images_per_row = 16    # the ViT's budget a row: 16 crops, Molmo2's pretraining budget a sequence (a caption
                           # example is ~300 tokens with its 58-token image, so ~13 fill a 4,096-token row)
batch_size = 32            # rows per GPU
grad_accum = 2             # 32 rows x 8 GPUs x 2 = 512 rows a step (on 4 GPUs: --grad_accum=4)
fsdp = True                # FSDP2: weights, gradients and Adam state sharded over the GPUs (bench.py --plan)
act_ckpt = True            # recompute each block in backward: 32 packed rows of 4,096 need ~355 GB a GPU without
max_steps = 100_000        # docs/molmo2.md, stage 1: ~100,000 steps
lr = 1e-4                  # the LLM's peak; connector 10x, ViT 0.3x (Molmo2's ratios, the train.py defaults)
warmup_steps = 2000        # linear warmup, then cosine to 10%
eval_interval = 2000
loss_chunk = 4096          # the loss head 4,096 tokens at a time: 6 GB of logits, not 25-56 (bench.py --plan)
# ViT: SigLIP2-B/16 at the target 224 px (google/siglip2-base-patch16-224; Molmo2's own is SigLIP2 so400m/14
# at 378 px, 411M parameters to this one's 85M): 14x14 patches -> 7x7 pooled tokens an image, 5x5 a video
# frame (the LLM tokens each costs: data.image_block, data.visual_tokens; docs/molmo2.md, Token layout)
image_size = 224
patch_size = 16
vit_width = 768
vit_depth = 12
vit_heads = 12
vit_mlp = 3072
vit_layers = (-3, -9)      # Molmo2's choice; blocks past -3 are not built
col_tokens = True
# Pretrained weights and tokenizer, local Hugging Face directories (nothing is downloaded); a missing one stops
# the run before anything is built. --init_llm= --init_vit= (empty) trains those parts from scratch.
init_llm = "checkpoints/Qwen3-0.6B"                     # Qwen/Qwen3-0.6B: model.safetensors + config.json
init_vit = "checkpoints/siglip2-base-patch16-224"      # google/siglip2-base-patch16-224
tokenizer = "checkpoints/Qwen3-0.6B/tokenizer.json"     # converted to tiktoken at start (data.tokenizer_from_json)
# LLM: Qwen3-0.6B (d 1024, 28 layers, 16 q / 8 kv heads of 128, FFN 3072, tied embeddings, RoPE 1e6)
base_vocab = 151_936       # Qwen3's embedding rows
n_extra = 128              # Molmo2's additional_vocab_size
d_model = 1024
n_layer = 28
n_head = 16
n_kv_head = 8
head_dim = 128
d_ff = 3072
rope_theta = 1e6
tie_embeddings = True

"""Tiny Hugging Face files written by `transformers` and `tokenizers` themselves, laid out as the released ones are:
a Qwen3 checkpoint (Qwen3ForCausalLM), a SigLIP one (SiglipVisionModel, or the whole SiglipModel with its text tower,
as the fixed-size SigLIP2 releases such as google/siglip2-base-patch16-224 ship) and a Qwen-style byte-level BPE
tokenizer.json. The sizes are given as train.py's config keys (d_model, vit_width, ...), so a test builds the
checkpoint that fits the model it configures. Used by test_hf.py, test_data.py and test_rehearsal.py."""

QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")  # Qwen2/Qwen3's pre-tokenizer regex (their tokenizer.json)


def qwen_tokenizer(path):
    """A tiny byte-level BPE built like Qwen's (NFC, the Qwen split regex, byte-level, its special tokens), saved as
    a tokenizer.json at path. Returns the `tokenizers.Tokenizer` (500 ids)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    corpus = ["The quick brown fox jumps over the lazy dog. ", "Café déjà vu, naïve résumé.",
              "東京は日本の首都です。", "emoji 😀🎉👍 and numbers 12345 67890", "    indented\n\n\ttabs  and   runs",
              "it's we'll they're"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tk.save(str(path))
    return tk


def qwen3(c, path=None):
    """A Qwen3ForCausalLM of the decoder that config keys c describe (base_vocab, d_model, n_layer, n_head,
    n_kv_head, head_dim, d_ff; rope_theta and tie_embeddings optional), saved to path when given."""
    import transformers
    cfg = transformers.Qwen3Config(
        vocab_size=c["base_vocab"], hidden_size=c["d_model"], intermediate_size=c["d_ff"],
        num_hidden_layers=c["n_layer"], num_attention_heads=c["n_head"], num_key_value_heads=c["n_kv_head"],
        head_dim=c["head_dim"], tie_word_embeddings=c.get("tie_embeddings", False),
        rope_parameters=dict(rope_type="default", rope_theta=float(c.get("rope_theta", 1e6))))
    model = transformers.Qwen3ForCausalLM(cfg)
    if path is not None:
        model.save_pretrained(str(path))
    return model


def siglip(c, path=None, whole=False):
    """A SigLIP vision tower of the ViT that config keys c describe (vit_width, vit_depth, vit_heads, vit_mlp,
    image_size, patch_size), saved to path when given. whole=True: a SiglipModel (a tiny text tower beside the
    vision one, its weights under vision_model.), the layout of the released SigLIP2 checkpoints."""
    import transformers
    vision = dict(hidden_size=c["vit_width"], intermediate_size=c["vit_mlp"], num_hidden_layers=c["vit_depth"],
                  num_attention_heads=c["vit_heads"], image_size=c["image_size"], patch_size=c["patch_size"])
    if whole:
        text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vision))
    if path is not None:
        model.save_pretrained(str(path))
    return model

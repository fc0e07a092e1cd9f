#!/usr/bin/env python3
"""A tiny random CLIP in Hugging Face's layout (config.json + model.safetensors), with OpenAI
CLIP's real vocabulary size so the real tokenizer's ids fit: the model of `sd2 parity`'s test
fixture (tests/fixtures/parity_tiny/clip).

    python scripts/reference/make_tiny_clip.py OUT_DIR
"""
import sys

import torch
from transformers import CLIPConfig, CLIPModel


def main():
    out = sys.argv[1]
    torch.manual_seed(20261202)
    cfg = CLIPConfig(
        projection_dim=16,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                           image_size=28, patch_size=14),
        text_config=dict(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_hidden_layers=2,
                         vocab_size=49408, max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406,
                         pad_token_id=49407),
    )
    m = CLIPModel(cfg).eval()
    # HF's init leaves LayerNorms at (1, 0) and biases at 0: perturb them so a mistake in either
    # shows in the comparison.
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(out, safe_serialization=True)
    print(out)


if __name__ == "__main__":
    main()

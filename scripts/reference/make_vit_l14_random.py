#!/usr/bin/env python3
"""Saves a randomly initialised, full-size openai/clip-vit-large-patch14 (transformers layout:
config.json + model.safetensors, ~1.7 GB) and expected.safetensors (f32 image/text embeddings
and logits for two fixture images and three texts), for the ignored-by-default test
tests/clip_vit_l14.rs.

    .venv-ref/bin/python scripts/reference/make_vit_l14_random.py [DIR]   (default target/clip-vit-l14-random)
    SD2_CLIP_L14_DIR=DIR cargo test --release --test clip_vit_l14 -- --ignored
"""
import os
import sys

import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "clip-vit-l14-random")
    torch.manual_seed(0)
    # The shape of openai/clip-vit-large-patch14's config.json.
    cfg = CLIPConfig(
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                           image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
        text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768,
                         bos_token_id=0, eos_token_id=2, pad_token_id=1),
        projection_dim=768,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    imgs = [Image.open(os.path.join(ROOT, "tests", "fixtures", "clip_images", f"{n}.png")).convert("RGB")
            for n in ("square_224", "landscape_300x200")]
    pv = CLIPImageProcessorPil()(images=imgs, return_tensors="pt")["pixel_values"].float()
    texts = ["a photo of a real face", "a photo of a Face Swapping forgery", "indoor, warm light, plain wall"]
    ids = open_clip.tokenize(texts)
    with torch.no_grad():
        ie = model.visual_projection(model.vision_model(pixel_values=pv).pooler_output)
        te = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        logits = model(input_ids=ids, pixel_values=pv).logits_per_image
    save_file({"pixel_values": pv.contiguous(), "input_ids": ids.long().contiguous(), "image_embeds": ie.contiguous(),
               "text_embeds": te.contiguous(), "logits_per_image": logits.contiguous()},
              os.path.join(out, "expected.safetensors"))
    print("wrote", out)


if __name__ == "__main__":
    main()

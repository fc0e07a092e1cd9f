#!/usr/bin/env python3
"""Proves sd2's peft export loads in peft: reads an export (adapter_config.json,
adapter_model.safetensors, sd2_check.safetensors) written by tests/sd2_detector.rs, loads the
adapters into transformers' CLIPModel with PeftModel.from_pretrained, and compares the image and
text embeddings with the ones sd2 computed.

    SD2_PEFT_EXPORT_DIR=target/peft-export cargo test --release --test sd2_detector peft_export
    .venv-ref/bin/python scripts/reference/peft_check.py target/peft-export
"""
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPModel

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    export = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "peft-export")
    base = CLIPModel.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "clip_tiny_a")).eval()
    model = PeftModel.from_pretrained(base, export).eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    check = load_file(os.path.join(export, "sd2_check.safetensors"))
    with torch.no_grad():
        clip = model.base_model.model
        ie = clip.visual_projection(clip.vision_model(pixel_values=check["pixel_values"]).pooler_output)
        te = clip.text_projection(clip.text_model(input_ids=check["input_ids"]).pooler_output)
    worst = 0.0
    for name, got, want in [("image_embeds", ie, check["image_embeds"]), ("text_embeds", te, check["text_embeds"])]:
        rel = ((got - want).abs().max() / want.abs().max()).item()
        worst = max(worst, rel)
        print(f"{name}: peft vs sd2 max relative error {rel:.2e}")
    print(f"{n_lora} LoRA tensors loaded by peft from {export}")
    assert n_lora > 0 and worst < 1e-5, "peft export check failed"
    print("peft export check: OK")


if __name__ == "__main__":
    main()

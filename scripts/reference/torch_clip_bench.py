#!/usr/bin/env python3
"""PyTorch CPU baseline of benches/clip_forward.rs: transformers CLIPModel with random weights,
ViT-B/16- and ViT-L/14-sized, batch 8, image and text features (no_grad, f32, default SDPA).

    python3 scripts/reference/torch_clip_bench.py --save target/torch_clip_1.json
    python3 scripts/reference/torch_clip_bench.py --ours a.json b.json --torch target/torch_clip_*.json
"""
import argparse

import open_clip
import torch
from transformers import CLIPConfig, CLIPModel

from benchlib import load_runs, report, save, timeit

CONFIGS = {
    "vit-b16": dict(vision=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                patch_size=16, image_size=224),
                    text=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_hidden_layers=12),
                    projection_dim=512),
    "vit-l14": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                                patch_size=14, image_size=224),
                    text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
                    projection_dim=768),
}


def tower_gflop(layers, d, inter, tokens):
    return layers * (2 * (4 * d * d + 2 * d * inter) + 4 * tokens * d) * tokens / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", nargs="*", default=[])
    ap.add_argument("--torch", nargs="*", default=[])
    ap.add_argument("--save")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    title = f"PyTorch {torch.__version__} CPU (transformers CLIPModel), {args.threads} threads, f32"
    if args.torch:
        report(title, load_runs(args.torch), args.ours, len(args.torch), unit="GF/s")
        return
    batch, rows = 8, []
    for name, c in CONFIGS.items():
        if args.only and args.only != name:
            continue
        torch.manual_seed(0)
        cfg = CLIPConfig(vision_config=dict(c["vision"], hidden_act="quick_gelu"),
                         text_config=dict(c["text"], hidden_act="quick_gelu"), projection_dim=c["projection_dim"])
        model = CLIPModel(cfg).eval()
        px = torch.randn(batch, 3, 224, 224)
        ids = open_clip.tokenize([f"a photo of a face, number {i}, with some description of the scene" for i in range(batch)])
        v, t = c["vision"], c["text"]
        npos = (224 // v["patch_size"]) ** 2 + 1
        with torch.no_grad():
            secs = timeit(lambda: model.get_image_features(pixel_values=px), args.reps, warmup=1)
            rows.append((f"{name} vision b={batch}", batch * tower_gflop(v["num_hidden_layers"], v["hidden_size"], v["intermediate_size"], npos), secs))
            secs = timeit(lambda: model.get_text_features(input_ids=ids), args.reps, warmup=1)
            rows.append((f"{name} text b={batch}", batch * tower_gflop(t["num_hidden_layers"], t["hidden_size"], t["intermediate_size"], 77), secs))
    if args.save:
        save(rows, args.save)
    report(title, rows, args.ours, 1)


if __name__ == "__main__":
    main()

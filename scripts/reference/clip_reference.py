#!/usr/bin/env python3
"""Golden CLIP fixtures for the Rust parity tests (tests/clip_parity.rs, tests/clip_preprocess.rs).

* Two tiny CLIP configs (different head counts, a vision width that is not a power of two, image
  sizes that are not 224) with randomly perturbed weights, saved by transformers in the
  HuggingFace layout (config.json + model.safetensors), and expected.safetensors with the
  inputs, every layer's hidden states, pooled outputs, projected embeddings and
  logits_per_image — computed in float64 so the reference itself carries no f32 rounding.
* Generated PNG images and HF CLIPImageProcessor outputs (PIL backend, and the default
  torchvision backend when torchvision is installed), stored as the uint8 images both backends
  produce before rescaling (plus the first float rows, to check rescale/normalize).

    scripts/reference/setup_venv.sh && .venv-ref/bin/python scripts/reference/clip_reference.py
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "fixtures"))

CONFIGS = {
    "clip_tiny_a": dict(
        vision=dict(hidden_size=60, intermediate_size=100, num_attention_heads=3, num_hidden_layers=3,
                    image_size=30, patch_size=6),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=16, vocab_size=300),
        projection_dim=24, batch=2, text_batch=3, seq=12),
    "clip_tiny_b": dict(
        vision=dict(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_hidden_layers=2,
                    image_size=36, patch_size=9),
        text=dict(hidden_size=40, intermediate_size=72, num_attention_heads=5, num_hidden_layers=3,
                  max_position_embeddings=20, vocab_size=200),
        projection_dim=28, batch=3, text_batch=2, seq=20),
}


def tiny_model(name, spec, seed):
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        vision_config=dict(spec["vision"], hidden_act="quick_gelu", layer_norm_eps=1e-5),
        text_config=dict(spec["text"], hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=2,
                         bos_token_id=0, pad_token_id=1),
        projection_dim=spec["projection_dim"],
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("logit_scale"):
                p.fill_(float(np.log(20.0)))
            elif "layer_norm" in n or "layrnorm" in n or "layernorm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.08 if p.dim() > 1 else 0.05)
    return model


def main():
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        model = tiny_model(name, spec, seed + 1)
        out_dir = os.path.join(FIX, name)
        os.makedirs(out_dir, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        m = model.double()
        v, t = spec["vision"], spec["text"]
        g = torch.Generator().manual_seed(100 + seed)
        # Rounded to f32 first: the fixture stores f32 inputs and the reference must see those.
        pixels = torch.randn(spec["batch"], 3, v["image_size"], v["image_size"], generator=g).double()
        eos = t["vocab_size"] - 1
        ids = torch.randint(1, eos, (spec["text_batch"], spec["seq"]), generator=g)
        for r in range(spec["text_batch"]):
            e = [spec["seq"] - 1, 3, 6][r % 3]
            ids[r, e] = eos
            ids[r, e + 1:] = 0
        with torch.no_grad():
            vo = m.vision_model(pixel_values=pixels, output_hidden_states=True)
            to = m.text_model(input_ids=ids, output_hidden_states=True)
            image_embeds = m.visual_projection(vo.pooler_output)
            text_embeds = m.text_projection(to.pooler_output)
            full = m(input_ids=ids, pixel_values=pixels)
        exp = {
            "pixel_values": pixels.float(),
            "input_ids": ids.long(),
            "vision.pooled": vo.pooler_output,
            "image_embeds": image_embeds,
            "text.last_hidden_state": to.last_hidden_state,
            "text.pooled": to.pooler_output,
            "text_embeds": text_embeds,
            "logits_per_image": full.logits_per_image,
        }
        for i, h in enumerate(vo.hidden_states):
            exp[f"vision.hidden_states.{i}"] = h
        for i, h in enumerate(to.hidden_states):
            exp[f"text.hidden_states.{i}"] = h
        exp = {k: v.contiguous() for k, v in exp.items()}
        save_file(exp, os.path.join(out_dir, "expected.safetensors"),
                  metadata={"source": "transformers CLIPModel in float64, inputs rounded to f32"})
        print(name, "ok")
    images()


def images():
    rng = np.random.default_rng(7)
    out = os.path.join(FIX, "clip_images")
    os.makedirs(out, exist_ok=True)
    specs = [("landscape_300x200", 300, 200), ("portrait_200x333", 200, 333), ("square_224", 224, 224),
             ("small_97x150", 97, 150), ("wide_517x230", 517, 230)]
    files = []
    for name, w, h in specs:
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.zeros((h, w, 3), np.float64)
        img[..., 0] = 128 + 100 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
        img[..., 1] = 255 * xx / w
        img[..., 2] = 255 * ((xx // 16 + yy // 16) % 2)
        img += rng.normal(0, 4, img.shape)
        path = os.path.join(out, name + ".png")
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, optimize=True)
        files.append(path)
    pil_imgs = [Image.open(p).convert("RGB") for p in files]
    res = {}
    mean = np.array([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
    std = np.array([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)

    def as_u8(pv):
        # Both backends resize and crop in uint8, then rescale and normalize: invert that to
        # store 1 byte per value (checked exact), and keep a little of the float output too.
        u = np.rint((pv.double().numpy() * std + mean) * 255.0)
        assert np.abs((pv.double().numpy() * std + mean) * 255.0 - u).max() < 1e-3
        return torch.from_numpy(u.astype(np.uint8)).contiguous()

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    for size in (224, 64):
        proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        pv = proc(images=pil_imgs, return_tensors="pt")["pixel_values"]
        res[f"pil.{size}.u8"] = as_u8(pv)
        res[f"pil.{size}.first_rows"] = pv[:, :, :2, :].float().contiguous()
    try:
        from transformers import CLIPImageProcessor
        proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        res["torchvision.224.u8"] = as_u8(proc(images=pil_imgs, return_tensors="pt")["pixel_values"])
    except Exception as e:  # torchvision missing
        print("torchvision backend skipped:", e)
    save_file(res, os.path.join(out, "expected.safetensors"),
              metadata={"images": json.dumps([os.path.basename(p) for p in files])})
    print("images ok:", {k: tuple(v.shape) for k, v in res.items()})


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The SD2 training step and inference in PyTorch, timed: the baseline of `sd2 bench train|infer`.

HF `CLIPModel` with random weights (ViT-L/14 or the tiny preset), peft LoRA (rank 8, alpha 32,
dropout 0.1) on q/k/v/out of both towers, CLAM + adapter + the three SD2 losses written here in
torch (as scripts/reference/sd2_reference.py, device-aware), the way a PyTorch user would run it
on a big GPU: frozen CLIP weights in bf16, LoRA/CLAM/adapter in f32 (peft's default), bf16
autocast, SDPA attention, fused AdamW; losses in f32. Timed eager and with `torch.compile`
(compile time excluded), median of `--steps` after `--warmup`; prints images/s and peak memory.
Needs only torch, transformers and peft (present on the device machine).

    python3 scripts/reference/sd2_torch_bench.py --preset vit-l14 --batch 128 --json out.json
    python3 scripts/reference/sd2_torch_bench.py --preset tiny --device cpu --batch 8   # smoke
"""
import argparse
import json
import os
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import CLIPConfig, CLIPModel

PRESETS = {
    "vit-l14": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                    patch_size=14, image_size=224),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  max_position_embeddings=77),
        projection_dim=768, clam_heads=8),
    # src/demo.rs tiny_clip_config
    "tiny": dict(
        vision=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4,
                    patch_size=8, image_size=64),
        text=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=32),
        projection_dim=64, clam_heads=4),
}
W_C, W_S, W_D = 2.0, 1.0, 1.0


class Clam(nn.Module):
    def __init__(self, layers, d, heads):
        super().__init__()
        self.layer_embedding = nn.Parameter(torch.randn(layers, d) * 0.02)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, cls_tokens, post_ln):
        x = post_ln(torch.stack(cls_tokens, 1)) + self.layer_embedding
        b, n, d = x.shape
        h = self.heads
        split = lambda t: t.view(b, n, h, d // h).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(a.transpose(1, 2).reshape(b, n, d)).mean(1)


class Adapter(nn.Module):
    def __init__(self, d, p):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d + p, p), nn.Linear(p, p)
        nn.init.zeros_(self.w2.weight)

    def forward(self, f_sat, f_final):
        h = self.w1(torch.cat([f_sat, f_final], 1))
        return f_final + self.w2(h * torch.sigmoid(1.702 * h))


def sigmoid_loss(f, d, t, b):
    z = 2 * torch.eye(f.shape[0], dtype=f.dtype, device=f.device) - 1
    return -F.logsigmoid(z * (t * f @ d.T + b)).sum() / f.shape[0]


class Sd2(nn.Module):
    def __init__(self, preset):
        super().__init__()
        p = PRESETS[preset]
        cfg = CLIPConfig(text_config=p["text"], vision_config=p["vision"], projection_dim=p["projection_dim"])
        cfg._attn_implementation = "sdpa"
        clip = CLIPModel(cfg).to(torch.bfloat16)
        clip.requires_grad_(False)
        lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
                          bias="none")
        self.peft = get_peft_model(clip, lora)  # adapters in f32 (peft's autocast_adapter_dtype)
        self.clip = clip
        vc = cfg.vision_config
        self.clam = Clam(vc.num_hidden_layers, vc.hidden_size, p["clam_heads"])
        self.adapter = Adapter(vc.hidden_size, cfg.projection_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.t_log = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))

    def image_features(self, px):
        vo = self.clip.vision_model(pixel_values=px, output_hidden_states=True)
        f_final = self.clip.visual_projection(vo.pooler_output)
        cls = [h[:, 0] for h in vo.hidden_states[1:]]
        return self.adapter(self.clam(cls, self.clip.vision_model.post_layernorm), f_final)

    def text_features(self, ids):
        return self.clip.text_projection(self.clip.text_model(input_ids=ids).pooler_output)

    def losses(self, px, labels, type_ids, face_ids, env_ids):
        b = px.shape[0]
        with torch.autocast(px.device.type, dtype=torch.bfloat16):
            f = self.image_features(px)
            allt = self.text_features(torch.cat([type_ids, face_ids, env_ids]))
        f, allt = F.normalize(f.float(), dim=-1), F.normalize(allt.float(), dim=-1)
        u, df, de = allt[:5], allt[5:5 + b], allt[5 + b:]
        l_c = F.cross_entropy(self.logit_scale.exp() * f @ u.T, labels)
        l_s = ((u @ u.T - torch.eye(5, device=u.device)) ** 2).sum() / 25
        t = self.t_log.exp()
        l_d = sigmoid_loss(f, df, t, self.bias) + sigmoid_loss(f, de, t, self.bias)
        return W_C * l_c + W_S * l_s + W_D * l_d

    def predict(self, px, u):
        with torch.autocast(px.device.type, dtype=torch.bfloat16):
            f = self.image_features(px)
        return torch.softmax(self.logit_scale.exp() * F.normalize(f.float(), dim=-1) @ u.T, -1)


def inputs(model, preset, batch, text_len, device):
    p = PRESETS[preset]
    vocab = model.clip.config.text_config.vocab_size
    g = torch.Generator().manual_seed(0)
    size = p["vision"]["image_size"]
    px = torch.randn(batch, 3, size, size, generator=g).to(device, torch.bfloat16)

    def ids(rows):
        x = torch.randint(1, vocab - 1, (rows, text_len), generator=g)
        x[:, -1] = vocab - 1  # EOT: the largest id (HF pools at argmax for legacy configs)
        return x.to(device)

    labels = (torch.arange(batch) % 5).to(device)
    return px, labels, ids(5), ids(batch), ids(batch)


def timed(fn, steps, warmup, device):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return statistics.median(times), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="vit-l14", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=128, help="training micro-batch")
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--mode", default="both", choices=["train", "infer", "both"])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = Sd2(args.preset).to(args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = args.device.startswith("cuda")
    opt = torch.optim.AdamW(trainable, lr=5e-7, weight_decay=0.01, fused=fused)
    rows = []
    device_name = torch.cuda.get_device_name() if fused else "cpu"
    print(f"torch {torch.__version__} on {device_name}; preset {args.preset}; "
          f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trainable parameters")

    def record(what, batch, ms, peak):
        r = {"what": what, "batch": batch, "ms": ms, "images_per_s": batch / (ms / 1e3),
             "peak_bytes": peak}
        rows.append(r)
        mem = f", peak {peak / 2**30:.2f} GiB" if peak else ""
        print(f"{what:<22} batch {batch:>4}: {ms:9.2f} ms = {r['images_per_s']:9.1f} images/s{mem}", flush=True)
        save()  # after every row: a run cut short by a time limit still leaves its numbers

    def save():
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"device": device_name, "torch": torch.__version__, "preset": args.preset, "rows": rows},
                          f, indent=2)
            os.replace(tmp, args.json)

    # Eager rows first, then torch.compile (its compile time is the least predictable): a run
    # cut short by a time limit keeps the eager numbers of both modes.
    jobs = []
    if args.mode in ("train", "both"):
        data = inputs(model, args.preset, args.batch, args.text_len, args.device)

        def step(loss_fn):
            def run():
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(*data)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
            return run

        def train(compiled):
            model.train()
            fn = torch.compile(model.losses) if compiled else model.losses
            record("train torch.compile" if compiled else "train eager", args.batch,
                   *timed(step(fn), args.steps, args.warmup, args.device))
        jobs.append(train)
    if args.mode in ("infer", "both"):
        px, _, type_ids, _, _ = inputs(model, args.preset, args.infer_batch, args.text_len, args.device)

        def infer(compiled):
            model.eval()
            with torch.no_grad():
                with torch.autocast(px.device.type, dtype=torch.bfloat16):
                    u = F.normalize(model.text_features(type_ids).float(), dim=-1)
            fn = torch.compile(model.predict) if compiled else model.predict
            with torch.inference_mode():
                record("infer torch.compile" if compiled else "infer eager", args.infer_batch,
                       *timed(lambda: fn(px, u), args.steps, args.warmup, args.device))
        jobs.append(infer)
    for compiled in ([False] if args.no_compile else [False, True]):
        for job in jobs:
            job(compiled)
    save()


if __name__ == "__main__":
    main()

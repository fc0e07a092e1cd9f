#!/usr/bin/env python3
"""An independent PyTorch SD2 for the Rust parity test (tests/sd2_parity.rs).

HF CLIPModel (the tiny fixture tests/fixtures/clip_tiny_a) + peft LoRA on q/k/v/out of both
towers + CLAM, adapter and the three losses written here in torch, in float64, dropout off.
Writes tests/fixtures/sd2_tiny/: sd2_config.json (the Rust Sd2Config) and reference.safetensors
with the inputs, every trainable tensor's initial value (perturbed so that no gradient is
trivially zero), each loss term and the total, the gradient of every trainable tensor, and every
trainable tensor after 3 AdamW steps (gradient clipping at 1.0) on the same batch.

    .venv-ref/bin/python scripts/reference/sd2_reference.py
"""
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import CLIPModel

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.normpath(os.path.join(HERE, "..", "..", "tests", "fixtures"))

CFG = {
    "lora": {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["q_proj", "k_proj", "v_proj", "out_proj"],
             "vision": True, "text": True},
    "clam": True, "clam_heads": 4, "loss_separation": True, "loss_dual": "face_env",
    "w_c": 2.0, "w_s": 1.0, "w_d": 1.0, "t_init": math.log(10.0), "b_init": -10.0,
}
LR, WD, CLIP_NORM, STEPS = 1e-3, 0.01, 1.0, 3


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
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1) @ v
        return self.out_proj(a.transpose(1, 2).reshape(b, n, d)).mean(1)


class Adapter(nn.Module):
    def __init__(self, d, p):
        super().__init__()
        self.w1, self.w2 = nn.Linear(d + p, p), nn.Linear(p, p)

    def forward(self, f_sat, f_final):
        h = self.w1(torch.cat([f_sat, f_final], 1))
        return f_final + self.w2(h * torch.sigmoid(1.702 * h))


def sigmoid_loss(f, d, t, b):
    z = 2 * torch.eye(f.shape[0], dtype=f.dtype) - 1
    return -F.logsigmoid(z * (t * f @ d.T + b)).sum() / f.shape[0]


def main():
    torch.manual_seed(1234)
    clip = CLIPModel.from_pretrained(os.path.join(FIX, "clip_tiny_a")).double().eval()
    vc = clip.config.vision_config
    lcfg = CFG["lora"]
    peft_model = get_peft_model(clip, LoraConfig(r=lcfg["rank"], lora_alpha=lcfg["alpha"], lora_dropout=0.0,
                                                 target_modules=lcfg["targets"], bias="none"))
    clam = Clam(vc.num_hidden_layers, vc.hidden_size, CFG["clam_heads"]).double()
    adapter = Adapter(vc.hidden_size, clip.config.projection_dim).double()
    t_log = nn.Parameter(torch.tensor(CFG["t_init"], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor(CFG["b_init"], dtype=torch.float64))
    clip.logit_scale.requires_grad_(True)

    named = {}
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            named[n.replace(".default", "")] = p
    named["logit_scale"] = clip.logit_scale
    for n, p in clam.named_parameters():
        named[f"clam.{n}"] = p
    for n, p in adapter.named_parameters():
        named[f"adapter.{n}"] = p
    named["loss_dual.t_log"] = t_log
    named["loss_dual.bias"] = bias
    # Perturb every trainable tensor (B and W2 start at zero otherwise, hiding gradients).
    with torch.no_grad():
        for n, p in named.items():
            if "lora_" in n or n.startswith("adapter.") or (n.startswith("clam.") and n.endswith("bias")):
                p.copy_(torch.randn_like(p) * 0.1)
    init = {k: v.detach().clone() for k, v in named.items()}

    g = torch.Generator().manual_seed(7)
    bsz, seq, vocab = 4, 10, clip.config.text_config.vocab_size
    pixels = torch.randn(bsz, 3, vc.image_size, vc.image_size, generator=g)
    labels = torch.tensor([0, 1, 2, 4])

    def ids(rows):
        x = torch.randint(1, vocab - 1, (rows, seq), generator=g)
        for r in range(rows):
            e = 3 + (r * 5) % (seq - 3)
            x[r, e] = vocab - 1
            x[r, e + 1:] = 0
        return x

    type_ids, face_ids, env_ids = ids(5), ids(bsz), ids(bsz)
    px = pixels.double()

    def losses():
        vo = clip.vision_model(pixel_values=px, output_hidden_states=True)
        f_final = clip.visual_projection(vo.pooler_output)
        cls = [h[:, 0] for h in vo.hidden_states[1:]]
        f = adapter(clam(cls, clip.vision_model.post_layernorm), f_final)
        f = F.normalize(f, dim=-1)
        allt = clip.text_projection(clip.text_model(input_ids=torch.cat([type_ids, face_ids, env_ids])).pooler_output)
        allt = F.normalize(allt, dim=-1)
        u, df, de = allt[:5], allt[5:5 + bsz], allt[5 + bsz:]
        l_c = F.cross_entropy(clip.logit_scale.exp() * f @ u.T, labels)
        l_s = ((u @ u.T - torch.eye(5, dtype=u.dtype)) ** 2).sum() / 25
        t = t_log.exp()
        l_d = sigmoid_loss(f, df, t, bias) + sigmoid_loss(f, de, t, bias)
        total = CFG["w_c"] * l_c + CFG["w_s"] * l_s + CFG["w_d"] * l_d
        return l_c, l_s, l_d, total

    out = {"pixel_values": pixels, "labels": labels, "type_ids": type_ids, "face_ids": face_ids, "env_ids": env_ids}
    l_c, l_s, l_d, total = losses()
    for k, v in [("l_c", l_c), ("l_s", l_s), ("l_d", l_d), ("total", total)]:
        out[f"loss.{k}"] = v.detach().reshape(())
    total.backward()
    for k, p in named.items():
        out[f"init.{k}"] = init[k]
        out[f"grad.{k}"] = p.grad.detach().clone()

    decay = [p for k, p in named.items() if ("lora_" in k or k.endswith(".weight")) and not k.startswith("loss_dual")]
    nodecay = [p for k, p in named.items() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WD}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.999), eps=1e-8)
    for step in range(STEPS):
        if step > 0:
            opt.zero_grad()
            losses()[3].backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), CLIP_NORM)
        opt.step()
    for k, p in named.items():
        out[f"step{STEPS}.{k}"] = p.detach().clone()

    d = os.path.join(FIX, "sd2_tiny")
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "reference.safetensors"),
              metadata={"lr": str(LR), "weight_decay": str(WD), "clip_norm": str(CLIP_NORM), "steps": str(STEPS)})
    with open(os.path.join(d, "sd2_config.json"), "w") as f:
        json.dump(CFG, f, indent=2)
    print("losses", {k: float(v) for k, v in out.items() if k.startswith("loss.")}, "params", len(named))


if __name__ == "__main__":
    main()

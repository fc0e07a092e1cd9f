#!/usr/bin/env python3
"""Reference intermediates for `sd2 parity`, computed by transformers (+ peft) in PyTorch.

    python scripts/reference/dump_reference.py --model CLIP_DIR [--checkpoint SD2_CHECKPOINT]
        [--images A.jpg B.png ...] [--dtype float32|bfloat16] --out reference.safetensors

CLIP_DIR is a Hugging Face CLIP folder (config.json + model.safetensors, e.g.
openai/clip-vit-large-patch14). SD2_CHECKPOINT is a checkpoint folder `sd2 train` wrote
(state.json + trainable.safetensors): its LoRA factors are loaded into a peft LoRA of the CLIP
model, and its CLAM, adapter and logit scale into the small torch modules below. Without it
the dump is of plain CLIP.

Every tensor is saved in float32 (ids in int64) under the names `sd2 parity` matches:

    inputs.pixel_values   [N, 3, S, S]  CLIPImageProcessor's output (PIL backend) for --images (or
                                        --random-pixels N normal values)
    inputs.input_ids      [5, L]        the five SD2 class phrases (sd2's type_texts.json),
                                        tokenized by the model's tokenizer, padded to the longest
    vision.hidden_states.I              HF hidden_states[I] (I = 0: after pre_layrnorm)
    vision.pooled                       pooler_output (post_layernorm of the CLS token)
    vision.image_embeds                 visual_projection(pooled)
    text.hidden_states.I, text.last_hidden_state (after final_layer_norm), text.pooled,
    text.text_embeds
  with --checkpoint:
    sd2.clam [N, D]                     CLAM's pooled output (f_sat)
    sd2.image_features [N, P]           the adapter's output f (image_embeds without CLAM)
    sd2.class_embeddings [5, P]         the class phrases' text embeddings, L2-normalized
    sd2.logits [N, 5]                   exp(logit_scale) * normalize(f) @ class_embeddings.T
    sd2.probs [N, 5]                    softmax of the logits

Metadata: format `sd2-parity/1`, dtype, images (JSON list of the paths as given), model,
checkpoint, and the torch/transformers/peft versions. In bfloat16 the CLIP model, its LoRA,
CLAM and the adapter run in bfloat16; features are cast to float32 before they are
normalized, and the logits are float32 (as sd2 does with `--dtype bf16`).
"""
import argparse
import gzip
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))
EOT = 49407


# CLAM and the adapter as the training reference defines them (the script beside this one).
sys.path.insert(0, HERE)
from sd2_reference import Adapter, Clam  # noqa: E402


def class_phrases():
    with open(os.path.join(REPO, "src", "sd2", "type_texts.json")) as f:
        t = json.load(f)
    return [t["test"][c] for c in t["classes"]]


def tokenizer_for(model_dir):
    from transformers import CLIPTokenizerFast

    if any(os.path.exists(os.path.join(model_dir, f)) for f in ("tokenizer.json", "vocab.json")):
        return CLIPTokenizerFast.from_pretrained(model_dir)
    # A folder without tokenizer files (a test model): OpenAI CLIP's tokenizer, shipped in the repo.
    with gzip.open(os.path.join(REPO, "tests", "fixtures", "clip_tokenizer_hf.json.gz"), "rb") as f:
        data = f.read()
    tmp = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
    tmp.write(data)
    tmp.close()
    return CLIPTokenizerFast(tokenizer_file=tmp.name, bos_token="<|startoftext|>",
                             eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


def pixel_values(model, images, random_n, seed):
    from PIL import Image

    try:
        # transformers 5: the PIL backend, which resizes as OpenAI's CLIP does (and sd2 does,
        # to the byte); the default backend is torchvision's, off by a level here and there.
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc

    size = model.config.vision_config.image_size
    if images:
        proc = Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        pics = [Image.open(p).convert("RGB") for p in images]
        return proc(images=pics, return_tensors="pt")["pixel_values"].float()
    g = torch.Generator().manual_seed(seed)
    return torch.randn(random_n, 3, size, size, generator=g)


def apply_checkpoint(clip, ckpt):
    """The SD2 checkpoint's weights on `clip` (peft LoRA), and its CLAM/adapter modules."""
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    if state.get("format") != 1:
        sys.exit(f"{ckpt}/state.json: unknown checkpoint format {state.get('format')}")
    sd2 = state["sd2"]
    w = load_file(os.path.join(ckpt, "trainable.safetensors"))
    used = set()
    if sd2.get("train_base"):
        base = {k[len("clip."):]: v for k, v in w.items() if k.startswith("clip.")}
        missing, unexpected = clip.load_state_dict(base, strict=False)
        missing = [m for m in missing if m not in ("logit_scale",) and "position_ids" not in m]
        if missing or unexpected:
            sys.exit(f"{ckpt}: CLIP weights missing {missing[:5]}, unexpected {unexpected[:5]}")
        used |= {k for k in w if k.startswith("clip.")}
    model = clip
    lora = sd2["lora"]
    lora_keys = [k for k in w if ".lora_" in k]
    if lora_keys:
        from peft import LoraConfig, get_peft_model

        if lora["vision"] and lora["text"]:
            targets = lora["targets"]
        else:
            tower = "vision_model" if lora["vision"] else "text_model"
            targets = rf".*{tower}\.encoder\.layers\.\d+\..*\.({'|'.join(lora['targets'])})"
        model = get_peft_model(clip, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                                target_modules=targets, bias="none"))
        params = dict(model.named_parameters())
        for k in lora_keys:
            name = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            if name not in params or params[name].shape != w[k].shape:
                sys.exit(f"{ckpt}: LoRA tensor {k} {tuple(w[k].shape)} has no match in the peft model")
            with torch.no_grad():
                params[name].copy_(w[k])
            used.add(k)
        n_lora = sum(1 for n in params if ".lora_" in n)
        if n_lora != len(lora_keys):
            sys.exit(f"{ckpt}: {len(lora_keys)} LoRA tensors for {n_lora} peft LoRA parameters")
    with torch.no_grad():
        clip.logit_scale.copy_(w["logit_scale"].reshape(()))
    used.add("logit_scale")
    vc = clip.config.vision_config
    clam = adapter = None
    if sd2.get("clam"):
        clam = Clam(vc.num_hidden_layers, vc.hidden_size, sd2["clam_heads"])
        adapter = Adapter(vc.hidden_size, clip.config.projection_dim)
        for prefix, mod in (("clam.", clam), ("adapter.", adapter)):
            sd = {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)}
            mod.load_state_dict(sd, strict=True)
            used |= {prefix + k for k in sd}
    left = [k for k in w if k not in used and not k.startswith("loss_dual.")]
    if left:
        sys.exit(f"{ckpt}: tensors this script does not know: {left[:5]}")
    return model, clam, adapter


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face CLIP folder")
    ap.add_argument("--checkpoint", help="SD2 checkpoint folder (state.json + trainable.safetensors)")
    ap.add_argument("--images", nargs="*", default=[], help="images to run (CLIPImageProcessor)")
    ap.add_argument("--random-pixels", type=int, default=2, help="without --images: N random inputs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    from transformers import CLIPModel
    import transformers

    torch.manual_seed(a.seed)
    dt = getattr(torch, a.dtype)
    clip = CLIPModel.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    model, clam, adapter = (clip, None, None)
    if a.checkpoint:
        model, clam, adapter = apply_checkpoint(clip, a.checkpoint)
    model = model.to(dt).eval()
    if clam is not None:
        clam, adapter = clam.to(dt).eval(), adapter.to(dt).eval()

    px = pixel_values(clip, a.images, a.random_pixels, a.seed)
    tok = tokenizer_for(a.model)
    ids = tok(class_phrases(), padding="longest", return_tensors="pt")["input_ids"].long()

    out = {"inputs.pixel_values": px, "inputs.input_ids": ids}
    with torch.no_grad():
        vo = clip.vision_model(pixel_values=px.to(dt), output_hidden_states=True)
        for i, h in enumerate(vo.hidden_states):
            out[f"vision.hidden_states.{i}"] = h
        out["vision.pooled"] = vo.pooler_output
        f_final = clip.visual_projection(vo.pooler_output)
        out["vision.image_embeds"] = f_final
        to = clip.text_model(input_ids=ids, output_hidden_states=True)
        for i, h in enumerate(to.hidden_states):
            out[f"text.hidden_states.{i}"] = h
        out["text.last_hidden_state"] = to.last_hidden_state
        out["text.pooled"] = to.pooler_output
        text_embeds = clip.text_projection(to.pooler_output)
        out["text.text_embeds"] = text_embeds
        if a.checkpoint:
            f = f_final
            if clam is not None:
                f_sat = clam([h[:, 0] for h in vo.hidden_states[1:]], clip.vision_model.post_layernorm)
                out["sd2.clam"] = f_sat
                f = adapter(f_sat, f_final)
            out["sd2.image_features"] = f
            u = F.normalize(text_embeds.float(), dim=-1)
            out["sd2.class_embeddings"] = u
            logits = clip.logit_scale.float().exp() * F.normalize(f.float(), dim=-1) @ u.T
            out["sd2.logits"] = logits
            out["sd2.probs"] = torch.softmax(logits, dim=-1)

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = "none"
    tensors = {k: (v if v.dtype == torch.int64 else v.float()).contiguous() for k, v in out.items()}
    meta = {
        "format": "sd2-parity/1",
        "dtype": a.dtype,
        "images": json.dumps(a.images),
        "model": a.model,
        "checkpoint": a.checkpoint or "",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
    }
    save_file(tensors, a.out, metadata=meta)
    print(f"{a.out}: {len(tensors)} tensors ({a.dtype})")


if __name__ == "__main__":
    main()

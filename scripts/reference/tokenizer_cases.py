#!/usr/bin/env python3
"""Writes tests/fixtures/clip_tokenizer_cases.json: >= 200 varied sentences and their ids from
open_clip.tokenize (context 77), and tests/fixtures/clip_tokenizer_hf.json.gz: the HuggingFace
CLIPTokenizerFast tokenizer.json built from the same merges file, with its ids (no special
tokens) for the same sentences in clip_tokenizer_hf_cases.json (HF does not run ftfy/html
cleaning, so a few differ from open_clip: those are marked).

    .venv-ref/bin/python scripts/reference/tokenizer_cases.py
"""
import gzip
import json
import os
import random
import tempfile

import open_clip
from open_clip.tokenizer import bytes_to_unicode, default_bpe

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "..", "tests", "fixtures")

BASE = [
    "a photo of a real face",
    "an authentic, unmanipulated face photo",
    "a photo of a Face Swapping forgery",
    "A face-reenactment deepfake (FR) of a young woman.",
    "Entire face synthesis: GAN-generated portrait!!!",
    "face editing -- hair colour changed to BLUE",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nmixed",
    "don't won't can't I'm you're we've they'll he'd it's",
    "DON'T SHOUT'S",
    "numbers 0 1 12 123 1234567890 3.14159 -42 1e10 2,000,000",
    "dates 2026-11-26 and times 12:34:56",
    "emails someone@example.com and urls https://example.com/a?b=c&d=e",
    "symbols !@#$%^&*()_+-=[]{}|;':\",./<>?`~",
    "repeated!!!!!!!! ??? ... --- ***",
    "café naïve résumé coöperate façade",
    "Ünïcödé ÀÉÎÕÜ àéîõü ñ ç ß",
    "Grüße aus München, ça va? ¿Qué tal? ¡Hola!",
    "Ελληνικά γράμματα και ΣΊΣΥΦΟΣ",
    "русский текст, Москва",
    "日本語のテキストと漢字",
    "中文文本测试，标点符号。",
    "한국어 텍스트",
    "العربية نص",
    "עברית טקסט",
    "हिन्दी पाठ",
    "emoji 😀🎉👍🏽 and ❤️ hearts",
    "math ∑ ∫ √ ∞ ≠ ≤ ≥ ± × ÷",
    "arrows → ← ↑ ↓ ⇒",
    "“curly double” and ‘curly single’ quotes",
    "ﬁne ﬂow ﬀ ligatures",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３",
    "html &amp; entities &lt;b&gt; &quot;quoted&quot; &#169; &#x263A;",
    "double escaped &amp;amp; ok",
    "nbsp\u00a0here and\u2009thin space",
    "zero\u200bwidth",
    "e\u0301 combining accent",
    "under_score and camelCase and kebab-case",
    "hashtag #deepfake @mention",
    "C++ and C# and F# programming",
    "x" * 100,
    "word " * 90,
    "a very long description " * 12,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "A1B2C3 d4e5 6f7g",
    "ALL CAPS SENTENCE WITH PUNCTUATION.",
    "mIxEd CaSe WoRdS",
    "indoor, warm light, plain wall",
    "outdoor, overcast, trees and a red car in the background",
    "a middle-aged man with grey hair, glasses and a beard, frowning",
    "a young woman with brown hair, smiling",
    "<start_of_text> literal special tokens <end_of_text>",
    "back\\slash and /forward/slash",
    "quote's at 'start' and end'",
    "'s 't 're 've 'm 'll 'd",
    "tab\t\t\ttab",
    "line\u2028separator\u2029paragraph",
]

WORDS = ("face real fake forgery swap reenactment synthesis editing photo portrait woman man child "
         "smiling frowning glasses beard hair blonde brown black red light dark indoor outdoor studio "
         "lamp window wall tree sky camera blur noise jpeg compression artifact seam blend warp").split()
PUNCT = [",", ".", "!", "?", ";", ":", "-", "(", ")", "'", "\"", "...", "--", "/"]
UNI = ["é", "ü", "ß", "ø", "ł", "ğ", "ş", "ž", "č", "ñ", "ã", "Ω", "π", "Ж", "ж", "語", "字", "😀", "★", "€", "£", "°"]


def generated(n, seed=0):
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rnd.randint(1, 30)):
            r = rnd.random()
            if r < 0.6:
                w = rnd.choice(WORDS)
                parts.append(w.upper() if rnd.random() < 0.1 else w.capitalize() if rnd.random() < 0.2 else w)
            elif r < 0.75:
                parts.append(str(rnd.randint(0, 10 ** rnd.randint(1, 6))))
            elif r < 0.9:
                parts.append(rnd.choice(PUNCT))
            else:
                parts.append(rnd.choice(WORDS) + rnd.choice(UNI))
        sep = rnd.choice([" ", " ", " ", "  ", ""])
        out.append(sep.join(parts))
    return out


def main():
    sentences = BASE + generated(180)
    ids = open_clip.tokenize(sentences, context_length=77).tolist()
    cases = [{"text": s, "ids": i} for s, i in zip(sentences, ids)]
    with open(os.path.join(FIX, "clip_tokenizer_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"source": f"open_clip {open_clip.__version__} tokenize(context_length=77)", "cases": cases}, f,
                  ensure_ascii=False, indent=0)
    print(f"{len(cases)} tokenizer cases")

    # The HuggingFace fast tokenizer from the same merges (vocab.json + merges.txt as on the hub).
    from transformers import CLIPTokenizerFast
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({v: i for i, v in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizerFast(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
        tok.save_pretrained(os.path.join(d, "hf"))
        with open(os.path.join(d, "hf", "tokenizer.json"), "rb") as f:
            raw = f.read()
    with gzip.open(os.path.join(FIX, "clip_tokenizer_hf.json.gz"), "wb", compresslevel=9) as f:
        f.write(raw)
    hf = []
    for s, i in zip(sentences, ids):
        h = tok(s, add_special_tokens=False)["input_ids"]
        ours = [x for x in i if x not in (0, 49406, 49407)]
        hf.append({"text": s, "ids": h, "same_as_open_clip": h == ours})
    with open(os.path.join(FIX, "clip_tokenizer_hf_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"source": "transformers CLIPTokenizerFast", "cases": hf}, f, ensure_ascii=False, indent=0)
    print(f"HF agrees with open_clip on {sum(c['same_as_open_clip'] for c in hf)} of {len(hf)}")


if __name__ == "__main__":
    main()

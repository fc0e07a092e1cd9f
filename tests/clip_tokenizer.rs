//! The CLIP tokenizer is id-identical to open_clip (240 varied sentences: punctuation, digits,
//! unicode, > 77 tokens) and to HuggingFace's tokenizer.json; `sd2 tokenize` prints them.
use std::io::Read;

use sd2::clip::ClipTokenizer;
use serde_json::Value;

fn cases(file: &str) -> Vec<(String, Vec<u32>)> {
    let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

#[test]
fn ids_match_open_clip() {
    let tk = ClipTokenizer::openai().unwrap();
    let cases = cases("clip_tokenizer_cases.json");
    assert!(cases.len() >= 200);
    let mut bad = vec![];
    for (text, want) in &cases {
        let got = tk.tokenize(text, 77).unwrap();
        if &got != want {
            bad.push(format!("{text:?}\n  ours {got:?}\n  open_clip {want:?}"));
        }
    }
    println!(
        "{} of {} sentences id-identical to open_clip",
        cases.len() - bad.len(),
        cases.len()
    );
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
    // Truncation keeps EOT last.
    let long = tk.tokenize(&"word ".repeat(100), 77).unwrap();
    assert_eq!(long.len(), 77);
    assert_eq!((long[0], long[76]), (49406, 49407));
    assert_eq!(tk.tokenize("", 5).unwrap(), vec![49406, 49407, 0, 0, 0]);
}

#[test]
fn hf_tokenizer_json_is_accepted() {
    let gz = std::fs::read(format!(
        "{}/tests/fixtures/clip_tokenizer_hf.json.gz",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut json)
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sd2-tk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json).unwrap();
    let tk = ClipTokenizer::from_file(&path).unwrap();
    assert_eq!((tk.sot(), tk.eot()), (49406, 49407));
    let cases = cases("clip_tokenizer_hf_cases.json");
    let mut bad = 0;
    for (text, want) in &cases {
        let got = tk.encode(text).unwrap();
        if &got != want {
            bad += 1;
            println!("{text:?}: ours {got:?} HF {want:?}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(
        bad,
        0,
        "{bad} of {} differ from HF CLIPTokenizerFast",
        cases.len()
    );
}

#[test]
fn cli_prints_one_array_per_line() {
    let dir = std::env::temp_dir().join(format!("sd2-tkcli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("texts.txt");
    std::fs::write(&f, "a photo of a real face\n\nhello world\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args([
            "tokenize",
            "--texts-file",
            f.to_str().unwrap(),
            "--context",
            "8",
        ])
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Vec<u32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![
            vec![49406, 320, 1125, 539, 320, 1532, 1710, 49407],
            vec![49406, 49407, 0, 0, 0, 0, 0, 0],
            vec![49406, 3306, 1002, 49407, 0, 0, 0, 0],
        ]
    );
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args(["tokenize", "--texts-file", "/nonexistent/t.txt"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/t.txt"));
}

/// Trimming a batch to its longest text leaves every text embedding unchanged (causal mask,
/// pooling at EOT), and the width is the longest text's, not the context.
#[test]
fn longest_padding_gives_the_same_embeddings() {
    use sd2::{DType, Device};
    let cfg = sd2::presets::tiny_clip_config();
    let clip = sd2::clip::ClipModel::random(&cfg, DType::F32, Device::Cpu, 7).unwrap();
    let tk = ClipTokenizer::openai().unwrap();
    let texts = [
        "a photo",
        "an older person with long grey hair, smiling",
        "x",
    ];
    let ctx = cfg.text_config.max_position_embeddings;
    let full = tk.tokenize_batch(&texts, ctx, Device::Cpu).unwrap();
    let short = tk.tokenize_batch_longest(&texts, ctx, Device::Cpu).unwrap();
    let longest = texts
        .iter()
        .map(|t| tk.encode(t).unwrap().len() + 2)
        .max()
        .unwrap();
    assert_eq!(short.dims(), &[3, longest]);
    assert!(longest < ctx);
    let a = clip.text_embeds(&full).unwrap().to_vec::<f32>().unwrap();
    let b = clip.text_embeds(&short).unwrap().to_vec::<f32>().unwrap();
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    println!("text_embeds full vs longest: worst abs diff {worst:e} (tol 1e-6)");
    assert!(worst <= 1e-6, "worst {worst}");
}

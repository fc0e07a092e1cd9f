//! Golden parity with HuggingFace transformers' CLIPModel on two tiny configs (fixtures from
//! scripts/reference/clip_reference.py): every hidden state, pooled outputs, projected
//! embeddings and logits, in f32 (≤ 1e-5 relative) and f64; plus loading f16/bf16 and sharded
//! checkpoints, and errors that name the tensor.
#[path = "common/clip.rs"]
mod clip_common;
mod common;

use clip_common::{compare, fixture, load_map};
use sd2::clip::{ClipModel, Fwd, TowerOptions};
use sd2::{DType, Device, Tensor};

type Edit<'a> = &'a dyn Fn(&mut Vec<(String, Tensor)>);

const MODELS: [&str; 2] = ["clip_tiny_a", "clip_tiny_b"];

fn check_model(name: &str, dtype: DType, tol: f64) {
    let dir = fixture(name);
    let exp = load_map(&dir.join("expected.safetensors"));
    let model = ClipModel::load(&dir, dtype, Device::Cpu).unwrap();
    let pixels = exp["pixel_values"].to_dtype(dtype).unwrap();
    let ids = &exp["input_ids"];
    let opts = TowerOptions {
        hidden_states: true,
        layer_cls: true,
    };
    let vo = model.vision.forward(&pixels, opts, Fwd::default()).unwrap();
    let to = model.text.forward(ids, opts, Fwd::default()).unwrap();
    let tag = |s: &str| format!("{name}/{dtype}/{s}");
    for (i, h) in vo.hidden_states.iter().enumerate() {
        compare(
            &tag(&format!("vision.hidden_states.{i}")),
            h,
            &exp[&format!("vision.hidden_states.{i}")],
            tol,
        );
    }
    for (i, h) in to.hidden_states.iter().enumerate() {
        compare(
            &tag(&format!("text.hidden_states.{i}")),
            h,
            &exp[&format!("text.hidden_states.{i}")],
            tol,
        );
    }
    assert_eq!(
        vo.hidden_states.len(),
        model.config.vision_config.num_hidden_layers + 1
    );
    compare(
        &tag("vision.pooled"),
        &vo.pooled,
        &exp["vision.pooled"],
        tol,
    );
    compare(
        &tag("text.last_hidden_state"),
        to.last_hidden_state.as_ref().unwrap(),
        &exp["text.last_hidden_state"],
        tol,
    );
    compare(&tag("text.pooled"), &to.pooled, &exp["text.pooled"], tol);
    // The embedding entry points (no hidden states kept) agree with the full forward.
    let ie = model.image_embeds(&pixels).unwrap();
    let te = model.text_embeds(ids).unwrap();
    compare(&tag("image_embeds"), &ie, &exp["image_embeds"], tol);
    compare(&tag("text_embeds"), &te, &exp["text_embeds"], tol);
    compare(
        &tag("logits_per_image"),
        &model.logits_per_image(&ie, &te).unwrap(),
        &exp["logits_per_image"],
        tol,
    );
    // Per-layer CLS tokens are row 0 of each block's output.
    for (i, c) in vo.layer_cls.iter().enumerate() {
        let b = pixels.dims()[0];
        let want = vo.hidden_states[i + 1]
            .select_rows_per_batch(&vec![0; b])
            .unwrap();
        assert_eq!(
            c.to_vec_f64().unwrap(),
            want.to_vec_f64().unwrap(),
            "layer_cls {i}"
        );
    }
}

#[test]
fn tiny_models_match_transformers_f32() {
    for m in MODELS {
        check_model(m, DType::F32, 1e-5);
    }
}

#[test]
fn tiny_models_match_transformers_f64() {
    for m in MODELS {
        check_model(m, DType::F64, 1e-10);
    }
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sd2-{tag}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn embeds(dir: &std::path::Path) -> (Tensor, Tensor) {
    let exp = load_map(&fixture("clip_tiny_a").join("expected.safetensors"));
    let m = ClipModel::load(dir, DType::F32, Device::Cpu).unwrap();
    (
        m.image_embeds(&exp["pixel_values"]).unwrap(),
        m.text_embeds(&exp["input_ids"]).unwrap(),
    )
}

#[test]
fn half_precision_and_sharded_checkpoints_load() {
    let src = fixture("clip_tiny_a");
    let tensors = load_map(&src.join("model.safetensors"));
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (i32e, t32e) = embeds(&src);

    // f16 and bf16 on disk: same model up to the rounding of the weights.
    for (tag, dt) in [("f16", None), ("bf16", Some(DType::BF16))] {
        let d = tmpdir(tag);
        std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
        let list: Vec<(&str, Tensor)> = names
            .iter()
            .map(|n| (n.as_str(), tensors[*n].clone()))
            .collect();
        match dt {
            None => {
                let refs: Vec<(&str, &Tensor)> = list.iter().map(|(n, t)| (*n, t)).collect();
                sd2::io::save_f16(&d.join("model.safetensors"), &refs).unwrap();
            }
            Some(dt) => {
                let conv: Vec<(&str, Tensor)> = list
                    .iter()
                    .map(|(n, t)| (*n, t.to_dtype(dt).unwrap()))
                    .collect();
                let refs: Vec<(&str, &Tensor)> = conv.iter().map(|(n, t)| (*n, t)).collect();
                sd2::io::save(&d.join("model.safetensors"), &refs, None).unwrap();
            }
        }
        let (i, t) = embeds(&d);
        compare(&format!("{tag} checkpoint image_embeds"), &i, &i32e, 5e-2);
        compare(&format!("{tag} checkpoint text_embeds"), &t, &t32e, 5e-2);
        std::fs::remove_dir_all(&d).ok();
    }

    // Two shards and an index: bit-identical to the single file.
    let d = tmpdir("sharded");
    std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
    let half = names.len() / 2;
    let mut map = serde_json::Map::new();
    for (k, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let refs: Vec<(&str, &Tensor)> = part.iter().map(|n| (n.as_str(), &tensors[*n])).collect();
        sd2::io::save(&d.join(&file), &refs, None).unwrap();
        for n in part.iter() {
            map.insert(n.to_string(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (i, t) = embeds(&d);
    assert_eq!(i.to_vec_f64().unwrap(), i32e.to_vec_f64().unwrap());
    assert_eq!(t.to_vec_f64().unwrap(), t32e.to_vec_f64().unwrap());
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn bad_checkpoints_name_the_tensor() {
    let src = fixture("clip_tiny_a");
    let tensors = load_map(&src.join("model.safetensors"));
    let write = |tag: &str, edit: Edit| -> String {
        let d = tmpdir(tag);
        std::fs::copy(src.join("config.json"), d.join("config.json")).unwrap();
        let mut list: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        edit(&mut list);
        let refs: Vec<(&str, &Tensor)> = list.iter().map(|(n, t)| (n.as_str(), t)).collect();
        sd2::io::save(&d.join("model.safetensors"), &refs, None).unwrap();
        let e = ClipModel::load(&d, DType::F32, Device::Cpu)
            .expect_err("load must fail")
            .to_string();
        std::fs::remove_dir_all(&d).ok();
        e
    };
    let name = "vision_model.encoder.layers.1.self_attn.k_proj.weight";
    let e = write("missing", &|l| l.retain(|(n, _)| n != name));
    assert!(e.contains("missing tensor") && e.contains(name), "{e}");
    let e = write("shape", &|l| {
        for (n, t) in l.iter_mut() {
            if n == name {
                *t = t.narrow(0, 0, 10).unwrap();
            }
        }
    });
    assert!(
        e.contains(name) && e.contains("[10, 60]") && e.contains("[60, 60]"),
        "{e}"
    );
    let e = write("extra", &|l| {
        l.push((
            "vision_model.surprise.weight".into(),
            Tensor::zeros(3, DType::F32, Device::Cpu).unwrap(),
        ))
    });
    assert!(
        e.contains("unexpected") && e.contains("vision_model.surprise.weight"),
        "{e}"
    );
    let e = write("dtype", &|l| {
        for (n, t) in l.iter_mut() {
            if n == name {
                *t = Tensor::zeros(t.dims().to_vec(), DType::I64, Device::Cpu).unwrap();
            }
        }
    });
    assert!(
        e.contains(name) && e.contains("I64") && e.contains("float"),
        "{e}"
    );
    // A config that does not match the weights.
    let d = tmpdir("config");
    std::fs::copy(src.join("model.safetensors"), d.join("model.safetensors")).unwrap();
    let cfg = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"hidden_size\": 60", "\"hidden_size\": 66");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    let e = ClipModel::load(&d, DType::F32, Device::Cpu)
        .expect_err("mismatched config must fail")
        .to_string();
    assert!(
        e.contains("vision_model.") && e.contains("expected [66, 66]"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).ok();
}

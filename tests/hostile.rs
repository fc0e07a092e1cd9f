//! Hostile but realistic input, each case a clear error (naming the key, step, file, line or
//! tensor), a non-zero exit or a per-item error, and nothing half-written:
//! - config values out of range; a run that diverges (stopped naming the step, no model saved);
//!   a batch that poisons the gradients (the update skipped, on the CPU and on the simulator's
//!   fused AdamW); a checkpoint holding a NaN weight (refused on load);
//! - `kill -9` at 20 random points of a training run, each resumed, ending bit-identical to an
//!   uninterrupted run; dangling `last` and stale temporaries recovered; a full disk;
//! - checkpoints whose state.json claims sizes its weights do not have;
//! - lying headers, truncated files, decompression bombs and oversized files in `predict`,
//!   `eval` and training, with the peak memory of the real processes measured.
use sd2::clip::{ClipConfig, ClipModel, ClipTokenizer};
use sd2::sd2::train::{MicroBatch, OnNonFinite, TrainConfig, Trainer};
use sd2::sd2::{Sd2Config, Sd2Model, TypeTexts};
use sd2::{DType, Device, Error, Tensor};

mod common;
use common::{file_bytes, sd2_cli as sd2, tiny_run_args};

#[test]
fn out_of_range_config_values_are_refused_naming_the_key() {
    for (set, key) in [
        ("train.lr=-1", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.beta1=1", "train.beta1"),
        ("train.beta2=1.5", "train.beta2"),
        ("train.eps=0", "train.eps"),
        ("train.weight_decay=1e9", "train.weight_decay"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.clip_norm=0", "train.clip_norm"),
        ("train.warmup_frac=2", "train.warmup_frac"),
        ("train.effective_batch=0", "train.effective_batch"),
        ("sd2.w_c=nan", "sd2.w_c"),
        ("sd2.w_d=-1", "sd2.w_d"),
        ("sd2.lora.dropout=1", "sd2.lora.dropout"),
        ("sd2.lora.alpha=0", "sd2.lora.alpha"),
        ("sd2.t_init=inf", "sd2.t_init"),
        ("augment.flip_p=7", "augment.flip_p"),
        ("augment.jpeg_quality=[0, 100]", "augment.jpeg_quality"),
        ("augment.scale=[1.2, 0.8]", "augment.scale"),
        ("augment.blur_sigma=[0.1, 1e6]", "augment.blur_sigma"),
        ("epochs=0", "epochs"),
        ("device=tpu:0", "device"),
    ] {
        let sets = ["manifest=m.tsv".to_string(), set.to_string()];
        match sd2::run::load_config(None, Some("tiny"), &sets) {
            Err(Error::Config { key: k, msg }) => {
                println!("--set {set}: config `{k}`: {msg}");
                assert_eq!(k, key, "--set {set}");
            }
            other => panic!("--set {set}: expected a config error naming {key}, got {other:?}"),
        }
    }
    // The defaults and the presets pass.
    for preset in ["tiny", "vit-l14"] {
        sd2::run::load_config(None, Some(preset), &["manifest=m.tsv".into()]).unwrap();
    }
    // Through the CLI: a non-zero exit naming the key, before any data is read.
    let r = sd2(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        "manifest=/nonexistent.tsv",
        "--set",
        "augment.flip_p=7",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("augment.flip_p"),
        "{err}"
    );
    let r = sd2(&[
        "synth",
        "--out",
        "/nonexistent/x",
        "--n",
        "4",
        "--shortcut",
        "5",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("shortcut"), "{err}");
    let r = sd2(&[
        "bench",
        "loader",
        "--manifest",
        "/nonexistent.jsonl",
        "--size",
        "0",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("size 0"), "{err}");
}

/// `--set train.lr=1e10` (no weight decay, so the config is in range): the run diverges, stops
/// at the first non-finite step with a non-zero exit naming it, and writes no checkpoint.
#[test]
fn a_diverging_run_stops_naming_the_step_and_saves_nothing() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-lr-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = sd2::data::synth::generate(&d.join("data"), 48, 64, 3).unwrap();
    let out = d.join("run");
    let r = sd2(&[
        "train",
        "--preset",
        "tiny",
        "--set",
        &format!("manifest={}", m.path.display()),
        "--set",
        &format!("out={}", out.display()),
        "--set",
        "epochs=2",
        "--set",
        "train.lr=1e10",
        "--set",
        "train.weight_decay=0",
        "--set",
        "train.micro_batch=8",
        "--set",
        "train.effective_batch=8",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("{err}");
    assert!(!r.status.success(), "a diverged run exited 0");
    assert!(
        err.contains("training step") && err.contains("not finite"),
        "{err}"
    );
    for c in ["best", "last"] {
        assert!(
            !out.join("checkpoints").join(c).exists(),
            "a diverged run left checkpoints/{c}"
        );
    }
    std::fs::remove_dir_all(&d).ok();
}

fn tiny_trainer(device: Device, policy: OnNonFinite) -> Trainer {
    tiny_trainer_with(device, policy, false)
}

fn tiny_clip(device: Device) -> ClipModel {
    let cfg = ClipConfig::from_json(
        r#"{"projection_dim": 16,
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1, "image_size": 28, "patch_size": 14},
            "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}}"#,
    )
    .unwrap();
    ClipModel::random(&cfg, DType::F32, device, 11).unwrap()
}

fn tiny_trainer_with(device: Device, policy: OnNonFinite, train_base: bool) -> Trainer {
    let clip = tiny_clip(device);
    let mut c = Sd2Config::default();
    c.lora.rank = 4;
    c.clam_heads = 4;
    c.train_base = train_base;
    let model = Sd2Model::new(clip, c, 3).unwrap();
    let tcfg = TrainConfig {
        lr: 1e-3,
        total_steps: 10,
        micro_batch: 4,
        effective_batch: 4,
        seed: 5,
        on_nonfinite: policy,
        ..Default::default()
    };
    Trainer::new(
        model,
        tcfg,
        ClipTokenizer::openai().unwrap(),
        TypeTexts::shipped().unwrap(),
    )
}

fn batch(device: Device, poison: bool) -> Vec<MicroBatch> {
    let n = 4;
    let mut r = sd2::rng::Rng::new(7);
    let mut px: Vec<f64> = (0..n * 3 * 28 * 28).map(|_| 0.5 * r.normal()).collect();
    if poison {
        px[100] = f64::NAN;
    }
    vec![MicroBatch {
        pixel_values: Tensor::from_f64(&px, (n, 3, 28, 28), DType::F32, device).unwrap(),
        labels: vec![0, 1, 2, 0],
        face: vec!["a man with a beard".into(); n],
        env: vec!["indoor, plain wall".into(); n],
    }]
}

fn weights(t: &Trainer) -> Vec<Vec<u32>> {
    t.model
        .params()
        .iter()
        .map(|p| {
            let v: Vec<f32> = p.tensor.to_vec().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        })
        .collect()
}

/// One NaN pixel makes every loss term and the gradient norm NaN: under "skip" the update is
/// skipped (every weight bit-identical), the step counted and training goes on; under "stop"
/// the step fails with `Error::NonFinite` naming it — on the CPU and on `cuda:sim`, where the
/// fused AdamW finds the norm on the device without a host read.
#[test]
fn a_poisoned_batch_skips_the_update_or_stops_naming_the_step() {
    for device in [Device::Cpu, Device::CudaSim] {
        let mut t = tiny_trainer(device, OnNonFinite::Skip);
        let first = t.step(&batch(device, false)).unwrap();
        assert!(!first.skipped && first.total.is_finite());
        let before = weights(&t);
        let log = t.step(&batch(device, true)).unwrap();
        println!("[{device}] poisoned step under skip: {}", log.to_json());
        assert!(log.skipped && !log.grad_norm.is_finite());
        assert_eq!(t.skipped_steps(), 1);
        assert!(
            weights(&t) == before,
            "[{device}] a skipped step changed weights"
        );
        // Training goes on, and moves the weights again.
        let next = t.step(&batch(device, false)).unwrap();
        assert!(!next.skipped && next.total.is_finite());
        assert!(
            weights(&t) != before,
            "[{device}] the step after a skip did nothing"
        );

        // Skips in a row stop the run at train.max_skips_in_a_row.
        t.cfg.max_skips_in_a_row = 2;
        assert!(t.step(&batch(device, true)).unwrap().skipped);
        match t.step(&batch(device, true)) {
            Err(e @ Error::NonFinite { .. }) => {
                assert!(e.to_string().contains("2 steps in a row"), "{e}")
            }
            other => panic!(
                "[{device}] a second skip in a row went on: {:?}",
                other.map(|l| l.to_json())
            ),
        }

        let mut t = tiny_trainer(device, OnNonFinite::Stop);
        t.step(&batch(device, false)).unwrap();
        let before = weights(&t);
        match t.step(&batch(device, true)) {
            Err(e @ Error::NonFinite { .. }) => {
                let msg = e.to_string();
                println!("[{device}] poisoned step under stop: {msg}");
                assert!(
                    msg.contains("training step 1") && msg.contains("L_C"),
                    "{msg}"
                );
            }
            other => panic!(
                "[{device}] expected Error::NonFinite, got {:?}",
                other.map(|l| l.to_json())
            ),
        }
        assert!(
            weights(&t) == before,
            "[{device}] a stopped step changed weights"
        );
    }
}

/// A checkpoint holding a NaN weight is refused when saved and when loaded, naming the tensor.
#[test]
fn a_non_finite_model_is_neither_saved_nor_loaded() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-nan-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let t = tiny_trainer(Device::Cpu, OnNonFinite::Stop);
    t.save(&d.join("good"), None).unwrap();
    // Poison one trainable tensor in place, as a diverged run would.
    let p = t.model.params()[0].clone();
    let mut v: Vec<f32> = p.tensor.to_vec().unwrap();
    v[0] = f32::NAN;
    let poisoned = Tensor::from_vec(v, p.tensor.dims().to_vec(), Device::Cpu).unwrap();
    t.model
        .set_params(&[(p.name.clone(), poisoned.clone())])
        .unwrap();
    match t.save(&d.join("bad"), None) {
        Err(e @ Error::NonFinite { .. }) => {
            let msg = e.to_string();
            println!("save: {msg}");
            assert!(msg.contains(&p.name), "{msg}");
        }
        other => panic!("saved a NaN model: {other:?}"),
    }
    assert!(!d.join("bad").exists(), "a refused save left a folder");
    // The same tensor written into a good checkpoint's file: refused on load.
    let mut named: Vec<(String, Tensor)> = t
        .model
        .params()
        .iter()
        .map(|q| (q.name.clone(), q.tensor.clone()))
        .collect();
    named[0].1 = poisoned;
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(&d.join("good/trainable.safetensors"), &refs, None).unwrap();
    let fresh = tiny_trainer(Device::Cpu, OnNonFinite::Stop);
    match sd2::sd2::train::load_trainable(&fresh.model, &d.join("good/trainable.safetensors")) {
        Err(e @ Error::NonFinite { .. }) => {
            let msg = e.to_string();
            println!("load: {msg}");
            assert!(
                msg.contains(&p.name) && msg.contains("trainable.safetensors"),
                "{msg}"
            );
        }
        other => panic!("loaded a NaN model: {other:?}"),
    }
    std::fs::remove_dir_all(&d).ok();
}

/// `kill -9` of a training process at 20 random points (in steps, in checkpoint saves, in the
/// epoch-end evaluation), each followed by `sd2 train --resume`: the run ends with the same
/// weights and optimizer moments, bit for bit, as an uninterrupted one. Then: a fresh run into
/// a folder that holds one is refused, `--resume DIR` takes the folder's own config, and a
/// finished run resumes to nothing.
#[test]
fn kill_9_anywhere_then_resume_ends_bit_identical() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-kill-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = sd2::data::synth::generate(&d.join("data"), 64, 64, 4).unwrap();
    let (reference, killed) = (d.join("ref"), d.join("killed"));
    let t0 = std::time::Instant::now();
    let args = tiny_run_args(&m.path, &reference);
    let r = sd2(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let full = t0.elapsed();
    println!("uninterrupted run: {full:?}");
    let args = tiny_run_args(&m.path, &killed);
    let resume_args = || -> Vec<&str> {
        let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
        a.push("--resume");
        a
    };
    let step = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice::<serde_json::Value>(&file_bytes(
            &p.join("checkpoints/last/state.json"),
        ))
        .unwrap()["step"]
            .clone()
    };
    // The end of a run that was killed and resumed: the reference's weights and moments.
    let same_as_reference = || {
        for f in ["trainable.safetensors", "optimizer.safetensors"] {
            let (want, got) = (
                file_bytes(&reference.join("checkpoints/last").join(f)),
                file_bytes(&killed.join("checkpoints/last").join(f)),
            );
            assert!(want == got, "{f} differs after kills and resumes");
        }
        assert_eq!(step(&reference), step(&killed));
    };
    // Kills at random points; a run that gets to its end is compared and started over.
    let mut rng = sd2::rng::Rng::new(2026);
    let (mut kills, mut runs) = (0, 0);
    while kills < 20 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
            .args(resume_args())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(0.05 + 0.6 * rng.uniform()));
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "a resumed run failed: {status}");
                same_as_reference();
                runs += 1;
                std::fs::remove_dir_all(&killed).unwrap();
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    let r = sd2(&resume_args());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    same_as_reference();
    println!(
        "{kills} kills; {} runs ended bit-identical to the uninterrupted one",
        runs + 1
    );
    // The log has one line per step, in order, whatever was killed mid-write.
    let steps: Vec<u64> = std::fs::read_to_string(killed.join("train_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (0..steps.len() as u64).collect::<Vec<_>>());
    // Nothing temporary left, only the folders the pointers name.
    let left: Vec<String> = std::fs::read_dir(killed.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    println!("checkpoints/: {left:?}");
    assert!(left.iter().all(|n| !n.contains(".tmp-")), "{left:?}");
    assert!(left.len() <= 4, "{left:?}");

    // A fresh run into a folder that holds one is refused, naming the way out.
    let args = tiny_run_args(&m.path, &reference);
    let r = sd2(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    // `--resume DIR` alone: the folder's config; a finished run has nothing left to do.
    let r = sd2(&["train", "--resume", reference.to_str().unwrap()]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(step(&reference), step(&killed));
    std::fs::remove_dir_all(&d).ok();
}

/// The checkpoint folder's own recovery: a dangling `last` falls back to the newest complete
/// step folder, a killed save's temporary folder is removed by the next save, and a folder of
/// the earlier layout (`last/` as a plain folder) is adopted.
#[test]
fn checkpoints_recover_from_a_dangling_last_and_stale_temporaries() {
    use sd2::sd2::checkpoint::Checkpoints;
    let d = std::env::temp_dir().join(format!("sd2-hostile-ckpt-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let ck = Checkpoints::new(d.join("checkpoints"));
    assert!(ck.last().is_none());
    let mut t = tiny_trainer(Device::Cpu, OnNonFinite::Stop);
    // The earlier layout: a plain `last/` folder.
    t.save(&d.join("checkpoints/last"), None).unwrap();
    let first = ck
        .save(&t, None, &[("run.json", b"{}".to_vec())], true)
        .unwrap();
    assert!(std::fs::symlink_metadata(d.join("checkpoints/last"))
        .unwrap()
        .file_type()
        .is_symlink());
    std::fs::create_dir_all(d.join("checkpoints/step-00000009.tmp-999")).unwrap();
    t.step(&batch(Device::Cpu, false)).unwrap();
    let second = ck
        .save(&t, None, &[("run.json", b"{}".to_vec())], false)
        .unwrap();
    let names = |p: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    println!("after two saves: {:?}", names(&d.join("checkpoints")));
    assert_eq!(
        names(&d.join("checkpoints")),
        ["best", "last", "step-00000000", "step-00000001"],
        "the stale temporary and the legacy folder are gone; best and last kept"
    );
    assert_eq!(
        std::fs::canonicalize(ck.last().unwrap()).unwrap(),
        std::fs::canonicalize(&second).unwrap()
    );
    assert_eq!(
        std::fs::canonicalize(ck.best().unwrap()).unwrap(),
        std::fs::canonicalize(&first).unwrap()
    );
    assert!(names(&second).contains(&"run.json".to_string()));
    // `last`'s folder gone (a hand-deleted folder): the newest complete one is used.
    std::fs::remove_dir_all(&second).unwrap();
    assert_eq!(
        std::fs::canonicalize(ck.last().unwrap()).unwrap(),
        std::fs::canonicalize(&first).unwrap()
    );
    std::fs::remove_dir_all(&d).ok();
}

/// A checkpoint whose state.json claims absurd sizes (a 10¹² vocabulary, 10⁹ layers, a config
/// of 10¹⁰ parameters) is refused before anything is allocated, naming the field.
#[test]
fn absurd_sizes_in_a_checkpoint_are_refused_before_allocating() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-sizes-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let t = tiny_trainer_with(Device::Cpu, OnNonFinite::Stop, true);
    t.save(&d.join("ck"), None).unwrap();
    sd2::sd2::detector::Detector::load(&d.join("ck"), None, Device::Cpu).unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("ck/state.json")).unwrap()).unwrap();
    // (the field, its new value, what the error must name): sizes over the limits are refused
    // from state.json alone; plausible sizes that disagree with the weights, by the header of
    // trainable.safetensors, before a tensor is allocated.
    let cases: [(&str, f64, &[&str]); 7] = [
        (
            "/clip/text_config/vocab_size",
            1e12,
            &["vocab_size", "state.json"],
        ),
        (
            "/clip/vision_config/num_hidden_layers",
            1e9,
            &["num_hidden_layers", "state.json"],
        ),
        (
            "/clip/text_config/intermediate_size",
            60000.0,
            &["parameters", "state.json"],
        ),
        ("/sd2/lora/rank", 1e9, &["sd2.lora.rank", "state.json"]),
        (
            "/sd2/lora/rank",
            8.0,
            &["trainable.safetensors", "lora_A", "sd2.lora.rank = 8"],
        ),
        (
            "/clip/text_config/vocab_size",
            49000.0,
            &["trainable.safetensors", "token_embedding", "49000"],
        ),
        (
            "/clip/vision_config/intermediate_size",
            128.0,
            &["trainable.safetensors", "fc1", "128"],
        ),
    ];
    for (field, value, named) in cases {
        let mut s = state.clone();
        *s.pointer_mut(field).unwrap() = serde_json::json!(value as u64);
        if named.contains(&"parameters") {
            let tower = &mut s["clip"]["text_config"];
            tower["hidden_size"] = serde_json::json!(8192);
            tower["num_hidden_layers"] = serde_json::json!(200);
            tower["num_attention_heads"] = serde_json::json!(64);
        }
        std::fs::write(d.join("ck/state.json"), serde_json::to_vec(&s).unwrap()).unwrap();
        match sd2::sd2::detector::Detector::load(&d.join("ck"), None, Device::Cpu) {
            Err(e) => {
                let msg = e.to_string();
                println!("{field} = {value:e}: {msg}");
                for n in named {
                    assert!(msg.contains(n), "{field}: `{n}` not in: {msg}");
                }
            }
            Ok(_) => panic!("{field} = {value:e} was loaded"),
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

/// A step skipped for a non-finite norm does not advance AdamW's bias correction, and that
/// survives a checkpoint: trained on, saved and resumed around a skip, the weights equal an
/// uninterrupted run's bit for bit.
#[test]
fn a_skipped_step_survives_a_resume() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-skipresume-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let mut straight = tiny_trainer(Device::Cpu, OnNonFinite::Skip);
    let mut interrupted = tiny_trainer(Device::Cpu, OnNonFinite::Skip);
    for t in [&mut straight, &mut interrupted] {
        t.step(&batch(Device::Cpu, false)).unwrap();
        assert!(t.step(&batch(Device::Cpu, true)).unwrap().skipped);
    }
    interrupted.save(&d.join("ck"), None).unwrap();
    let clip = tiny_clip(Device::Cpu);
    let mut resumed = Trainer::resume(
        &d.join("ck"),
        clip,
        ClipTokenizer::openai().unwrap(),
        TypeTexts::shipped().unwrap(),
    )
    .unwrap();
    assert_eq!(resumed.skipped_steps(), 1);
    straight.step(&batch(Device::Cpu, false)).unwrap();
    resumed.step(&batch(Device::Cpu, false)).unwrap();
    assert!(
        weights(&straight) == weights(&resumed),
        "a resume around a skipped step diverged"
    );
    std::fs::remove_dir_all(&d).ok();
}

fn encode(img: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, format).unwrap();
    buf.into_inner()
}

fn noise_image(w: u32, h: u32) -> image::RgbImage {
    let mut r = sd2::rng::Rng::new(5);
    image::RgbImage::from_fn(w, h, |_, _| {
        image::Rgb([r.below(256) as u8, r.below(256) as u8, r.below(256) as u8])
    })
}

/// Hostile image files: a 951-byte JPEG whose header claims 16000×16000 or 9000×9000 (over the
/// pixel budget) or 20000×20000 (over the side limit) is refused from its header, before a
/// pixel is decoded; a truncated JPEG (which the decoder would grey-fill silently) and a truncated PNG
/// are refused naming the file; a JPEG with bytes after its end marker still decodes.
#[test]
fn hostile_images_are_refused_before_decoding() {
    use sd2::clip::preprocess::decode_image_bytes;
    let jpeg = encode(&noise_image(16, 16), image::ImageFormat::Jpeg);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG has an SOF0 marker");
    for (side, why) in [(16000u16, "Mpx"), (9000, "Mpx"), (20000, "side")] {
        let mut lying = jpeg.clone();
        lying[sof + 5..sof + 7].copy_from_slice(&side.to_be_bytes());
        lying[sof + 7..sof + 9].copy_from_slice(&side.to_be_bytes());
        let t = std::time::Instant::now();
        let e = decode_image_bytes(&lying, "lying.jpg")
            .unwrap_err()
            .to_string();
        println!(
            "{} bytes claiming {side}x{side}: {e} ({:?})",
            lying.len(),
            t.elapsed()
        );
        assert!(e.contains("lying.jpg") && e.contains(why), "{e}");
        assert!(
            t.elapsed().as_secs_f64() < 1.0,
            "the refusal decoded the image"
        );
    }
    let big = encode(&noise_image(96, 64), image::ImageFormat::Jpeg);
    decode_image_bytes(&big, "whole.jpg").unwrap();
    let e = decode_image_bytes(&big[..big.len() * 6 / 10], "cut.jpg")
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
    let mut trailing = big.clone();
    trailing.extend_from_slice(b"camera maker's appended data");
    decode_image_bytes(&trailing, "trailing.jpg").unwrap();
    let png = encode(&noise_image(96, 64), image::ImageFormat::Png);
    decode_image_bytes(&png, "whole.png").unwrap();
    let e = decode_image_bytes(&png[..png.len() * 6 / 10], "cut.png")
        .unwrap_err()
        .to_string();
    println!("{e}");
    assert!(e.contains("cut.png"), "{e}");
}

/// `sd2 predict --dir` over a folder with good, truncated and lying images: one JSON line per
/// file in order — a bad file's line holds its error — every good file scored, and a non-zero
/// exit saying how many failed.
#[test]
fn predict_reports_each_bad_image_and_scores_the_rest() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-predict-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let t = tiny_trainer_with(Device::Cpu, OnNonFinite::Stop, true);
    t.save(&d.join("ck"), None).unwrap();
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let png = encode(&noise_image(40, 30), image::ImageFormat::Png);
    let jpg = encode(&noise_image(40, 30), image::ImageFormat::Jpeg);
    std::fs::write(imgs.join("a_good.png"), &png).unwrap();
    std::fs::write(imgs.join("b_cut.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(imgs.join("c_good.jpg"), &jpg).unwrap();
    std::fs::write(imgs.join("d_cut.jpg"), &jpg[..jpg.len() * 7 / 10]).unwrap();
    std::fs::write(imgs.join("e_empty.png"), b"").unwrap();
    std::fs::write(imgs.join("f_good.png"), &png).unwrap();
    let r = sd2(&[
        "predict",
        "--checkpoint",
        d.join("ck").to_str().unwrap(),
        "--no-face-crop",
        "--dir",
        imgs.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&r.stdout);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("{out}{err}");
    assert!(!r.status.success(), "bad inputs, exit 0");
    assert!(err.contains("3 of 6"), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6);
    for (l, good) in lines.iter().zip([true, false, true, false, false, true]) {
        let path = l["path"].as_str().unwrap();
        if good {
            assert!(l["fake_score"].as_f64().is_some_and(f64::is_finite), "{l}");
        } else {
            let e = l["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error on {l}"));
            assert!(e.contains(path), "{l}");
        }
    }
    std::fs::remove_dir_all(&d).ok();
}

/// `sd2 eval` over a split holding truncated images: each one gets its own error line, the
/// others are scored (metrics.json counts them and lists the bad ones), and the exit status
/// says some failed.
#[test]
fn eval_reports_each_bad_image_and_scores_the_rest() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-eval-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = sd2::data::synth::generate(&d.join("data"), 48, 64, 5).unwrap();
    let t = tiny_trainer_with(Device::Cpu, OnNonFinite::Stop, true);
    t.save(&d.join("ck"), None).unwrap();
    let of = |s| m.items.iter().filter(move |i| i.split == s);
    let tests: Vec<_> = of(sd2::data::Split::Test).collect();
    let mut victims: Vec<_> = tests.iter().take(2).copied().collect();
    victims.extend(of(sd2::data::Split::Val).take(1));
    for v in &victims {
        let bytes = std::fs::read(&v.path).unwrap();
        std::fs::write(&v.path, &bytes[..bytes.len() / 2]).unwrap();
    }
    let r = sd2(&[
        "eval",
        "--checkpoint",
        d.join("ck").to_str().unwrap(),
        "--manifest",
        m.path.to_str().unwrap(),
        "--out",
        d.join("out").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("{}{err}", String::from_utf8_lossy(&r.stdout));
    assert!(!r.status.success(), "bad inputs, exit 0");
    assert!(err.contains("3 images could not be read"), "{err}");
    for v in &victims {
        let name = format!("manifest line {}: ", v.line);
        let line = err
            .lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("no line for {}", v.rel_path));
        assert!(line.contains(&v.rel_path), "{line}");
    }
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("out/metrics.json")).unwrap()).unwrap();
    assert_eq!(
        metrics["overall"]["n"].as_u64(),
        Some(tests.len() as u64 - 2),
        "{metrics}"
    );
    let listed: Vec<&str> = metrics["unreadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["path"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = victims.iter().map(|v| v.rel_path.as_str()).collect();
    assert_eq!(listed, want);
    let preds = std::fs::read_to_string(d.join("out/predictions.jsonl")).unwrap();
    assert_eq!(preds.lines().count(), tests.len() - 2);
    std::fs::remove_dir_all(&d).ok();
}

/// A truncated PNG in the training set (its header reads fine, so the up-front check passes):
/// without `skip_bad` the run stops naming its manifest line; with it the image is left out,
/// counted, and the run ends (a truncated validation image likewise); `verify_images` finds it
/// before training.
#[test]
fn a_truncated_training_image_is_skipped_or_named() {
    let d = std::env::temp_dir().join(format!("sd2-hostile-trunc-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = sd2::data::synth::generate(&d.join("data"), 48, 64, 3).unwrap();
    let victim = m
        .items
        .iter()
        .find(|i| i.split == sd2::data::Split::Train)
        .unwrap();
    let val_victim = m
        .items
        .iter()
        .find(|i| i.split == sd2::data::Split::Val)
        .unwrap();
    for v in [victim, val_victim] {
        let bytes = std::fs::read(&v.path).unwrap();
        std::fs::write(&v.path, &bytes[..bytes.len() / 2]).unwrap();
    }
    let run = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "train".to_string(),
            "--preset".into(),
            "tiny".into(),
            "--set".into(),
            format!("manifest={}", m.path.display()),
            "--set".into(),
            format!("out={}", d.join(out).display()),
            "--set".into(),
            "epochs=1".into(),
            "--set".into(),
            "train.micro_batch=8".into(),
            "--set".into(),
            "train.effective_batch=8".into(),
        ];
        for e in extra {
            a.push("--set".into());
            a.push(e.to_string());
        }
        sd2(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let r = run("strict", &[]);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("strict: {err}");
    assert!(
        !r.status.success() && err.contains(&format!("manifest line {}", victim.line)),
        "{err}"
    );
    let r = run("verify", &["verify_images=true"]);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("verify_images: {err}");
    assert!(
        !r.status.success() && err.contains(&victim.rel_path),
        "{err}"
    );
    let r = run("lenient", &["skip_bad=true"]);
    let out = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(
        out.contains(&format!("skipped {}", victim.rel_path))
            && out.contains("1 bad images were left out of training"),
        "{out}"
    );
    assert!(
        out.contains(&format!("skipped {} in validation", val_victim.rel_path))
            && out.contains("1 bad images were left out of validation"),
        "{out}"
    );
    std::fs::remove_dir_all(&d).ok();
}

/// Decodes share one memory budget: eight threads decoding 3000×3000 images at once (8 × 144 MB
/// of decode share, over the 1 GiB budget) wait their turn, and every one decodes correctly.
#[test]
fn concurrent_decodes_share_the_budget_without_deadlock() {
    use sd2::clip::preprocess::decode_image_bytes;
    let png = encode(&noise_image(3000, 3000), image::ImageFormat::Png);
    let want = decode_image_bytes(&png, "big.png").unwrap();
    let t = std::time::Instant::now();
    let png = &png;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| s.spawn(move || decode_image_bytes(png, &format!("big{i}.png")).unwrap()))
            .collect();
        for h in handles {
            assert!(h.join().unwrap() == want);
        }
    });
    println!("8 concurrent 3000x3000 decodes: {:?}", t.elapsed());
}

/// Runs the sd2 binary with `args` and returns (whether it exited 0, its stdout, its stderr,
/// its peak resident memory in bytes, as it logs it at exit under `SD2_LOG=info`: the
/// kernel's VmHWM of the sd2 process itself, so neither this process nor other tests count).
fn sd2_peak(args: &[&str]) -> (bool, String, String, u64) {
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
        .args(args)
        .env("SD2_LOG", "info")
        .output()
        .expect("run the sd2 binary");
    let (out, err) = (
        String::from_utf8_lossy(&r.stdout).into_owned(),
        String::from_utf8_lossy(&r.stderr).into_owned(),
    );
    let mib: f64 = err
        .lines()
        .find_map(|l| l.strip_prefix("sd2: info: peak resident memory "))
        .and_then(|l| l.strip_suffix(" MiB"))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory line in: {err}"));
    let err = err
        .lines()
        .filter(|l| !l.starts_with("sd2: info: peak resident memory"))
        .collect::<Vec<_>>()
        .join("\n");
    (
        r.status.success(),
        out,
        err,
        (mib * (1 << 20) as f64) as u64,
    )
}

/// Peak memory on hostile images, measured on real child processes: each image alone costs at
/// most 1 GiB — the largest image the limits allow (8192², 16-bit RGBA, 537 MB decoded), a
/// truncated one, a header claiming 16000², a file over the size limit — and folders of them
/// cost about the worst one alone and do not grow with their size, in `predict` (sequential,
/// faces searched) and in `eval` (the parallel loader, whose threads share the decode budget).
#[test]
fn peak_memory_is_bounded_and_flat_on_hostile_images() {
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    let d = std::env::temp_dir().join(format!("sd2-hostile-peak-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let t = tiny_trainer_with(Device::Cpu, OnNonFinite::Stop, true);
    t.save(&d.join("ck"), None).unwrap();
    let ck = d.join("ck");
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    let made = std::time::Instant::now();
    let write_png = |name: &str, img: image::DynamicImage| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(imgs.join(name)).unwrap());
        let enc = image::codecs::png::PngEncoder::new_with_quality(
            &mut f,
            image::codecs::png::CompressionType::Fast,
            image::codecs::png::FilterType::Sub,
        );
        img.write_with_encoder(enc).unwrap();
    };
    write_png(
        "small.png",
        image::DynamicImage::ImageRgb8(noise_image(64, 48)),
    );
    write_png(
        "bomb_rgb8.png",
        image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
            8192,
            8192,
            image::Rgb([120, 80, 200]),
        )),
    );
    write_png(
        "bomb_rgba16.png",
        image::DynamicImage::ImageRgba16(image::ImageBuffer::from_pixel(
            8192,
            8192,
            image::Rgba([30000u16, 2000, 60000, 65535]),
        )),
    );
    let bomb = std::fs::read(imgs.join("bomb_rgb8.png")).unwrap();
    std::fs::write(imgs.join("cut_bomb.png"), &bomb[..bomb.len() / 2]).unwrap();
    let jpeg = encode(&noise_image(16, 16), image::ImageFormat::Jpeg);
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let mut lying = jpeg.clone();
    lying[sof + 5..sof + 9].copy_from_slice(&[0x3E, 0x80, 0x3E, 0x80]); // 16000 × 16000
    std::fs::write(imgs.join("lying.jpg"), &lying).unwrap();
    // Sparse: 300 MB on paper, nothing on disk.
    std::fs::File::create(imgs.join("huge.png"))
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    println!(
        "made the images in {:.1}s ({} and {} bytes of PNG bombs)",
        made.elapsed().as_secs_f64(),
        bomb.len(),
        std::fs::metadata(imgs.join("bomb_rgba16.png"))
            .unwrap()
            .len()
    );
    let hostile = [
        "bomb_rgb8.png",
        "bomb_rgba16.png",
        "cut_bomb.png",
        "lying.jpg",
        "huge.png",
    ];
    let predict = |files: Vec<String>| {
        let mut a = vec!["predict", "--checkpoint", ck.to_str().unwrap()];
        a.extend(files.iter().map(String::as_str));
        sd2_peak(&a)
    };
    let path = |n: &str| imgs.join(n).display().to_string();
    let (ok, out, err, base) = predict(vec![path("small.png")]);
    assert!(ok, "{out}{err}");
    println!("predict small.png: peak {} MiB", base / MIB);
    let mut worst = base;
    for n in hostile {
        let (ok, out, err, peak) = predict(vec![path(n)]);
        println!(
            "predict {n}: peak {} MiB, exit 0: {ok}: {}{}",
            peak / MIB,
            out.trim(),
            err.trim()
        );
        let decodes = n.starts_with("bomb");
        assert_eq!(ok, decodes, "{n}: {out}{err}");
        assert!(peak <= GIB, "{n}: peak {} MiB is over 1 GiB", peak / MIB);
        worst = worst.max(peak);
    }
    // Folders of one and of three of each (hard links), between good small images: the
    // larger costs no more than the smaller (flat), which costs about the worst one alone.
    let folder_of = |copies: usize| {
        let mut folder = vec![];
        for copy in 0..copies {
            for n in hostile {
                let link = imgs.join(format!("{copy}_{n}"));
                if !link.exists() {
                    std::fs::hard_link(imgs.join(n), &link).unwrap();
                }
                folder.push(link.display().to_string());
                folder.push(path("small.png"));
            }
        }
        folder
    };
    let mut peaks = vec![];
    for copies in [1, 3] {
        let folder = folder_of(copies);
        let (ok, out, err, peak) = predict(folder.clone());
        println!(
            "predict over {} files: peak {} MiB (worst alone {} MiB); {}",
            folder.len(),
            peak / MIB,
            worst / MIB,
            err.trim()
        );
        assert!(!ok && out.lines().count() == folder.len(), "{out}{err}");
        assert!(
            err.contains(&format!("{} of {}", 3 * copies, folder.len())),
            "{err}"
        );
        assert!(
            peak <= GIB,
            "a folder of hostile images costs {} MiB",
            peak / MIB
        );
        peaks.push(peak);
    }
    // Allocator slack (freed blocks kept for reuse) is the difference to the single image.
    assert!(
        peaks[0] <= worst + 64 * MIB,
        "10 hostile files cost {} MiB, the worst alone {} MiB",
        peaks[0] / MIB,
        worst / MIB
    );
    // (Measured: 30 copies of one bomb cost exactly what 5 do; mixing sizes adds ~30 MiB of
    // slack once, not per file.)
    assert!(
        peaks[1] <= peaks[0] + 48 * MIB,
        "memory grows with the folder: 10 files {} MiB, 30 files {} MiB",
        peaks[0] / MIB,
        peaks[1] / MIB
    );
    let folder = folder_of(3);
    // eval: the same files through a manifest and the parallel loader. The oversized file
    // fails the manifest's up-front check, so --skip-bad leaves its lines out.
    let manifest = |files: &[String], name: &str| {
        let mut text = String::new();
        for (i, f) in files.iter().enumerate() {
            let label = ["real", "fs"][i % 2];
            let r = serde_json::json!({"path": f, "label": label, "source": "hostile",
                "split": "test"});
            text.push_str(&format!("{r}\n"));
        }
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let eval = |m: &std::path::Path, report: &str| {
        let out = d.join(report);
        sd2_peak(&[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--manifest",
            m.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--skip-bad",
        ])
    };
    let small = manifest(&vec![path("small.png"); 4], "small.jsonl");
    let (ok, out, err, eval_base) = eval(&small, "eval-base");
    assert!(ok, "{out}{err}");
    let (ok, out, err, eval_peak) = eval(&manifest(&folder, "folder.jsonl"), "eval-folder");
    println!(
        "eval over {} files: peak {} MiB (over its base {} MiB: {} MiB; predict's worst over its \
         base: {} MiB)",
        folder.len(),
        eval_peak / MIB,
        eval_base / MIB,
        (eval_peak.saturating_sub(eval_base)) / MIB,
        (worst - base) / MIB
    );
    assert!(
        !ok && err.contains("images could not be read"),
        "{out}{err}"
    );
    assert!(
        eval_peak <= GIB,
        "eval: peak {} MiB is over 1 GiB",
        eval_peak / MIB
    );
    assert!(
        eval_peak.saturating_sub(eval_base) <= worst - base + 64 * MIB,
        "eval over a folder of hostile images grows by {} MiB, one image alone by {} MiB",
        eval_peak.saturating_sub(eval_base) / MIB,
        (worst - base) / MIB
    );
    std::fs::remove_dir_all(&d).ok();
}

/// Runs `sd2 args…` under a file-size limit of `kib` KiB (`ulimit -f`, with SIGXFSZ ignored),
/// so a write that would pass it fails (EFBIG) as one on a full disk fails (ENOSPC): the same
/// error path, without a full file system.
fn sd2_limited(kib: u64, args: &[String]) -> std::process::Output {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_sd2"))
        .args(args);
    cmd.output().expect("run bash")
}

/// Names in `dir` (recursively) that look like a write left half-done: temporaries of
/// `write_atomic` (`.tmp`) and of checkpoint folders (`.tmp-PID`).
fn leftovers(dir: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.contains(".tmp") {
            out.push(e.path().display().to_string());
        }
        if e.file_type().unwrap().is_dir() {
            out.extend(leftovers(&e.path()));
        }
    }
    out
}

/// A disk that fills up (simulated by a file-size limit): a run whose first checkpoint cannot
/// be written exits non-zero naming the file, leaving no temporary and no `last`; a resumed
/// run that fails at its next save leaves `last` the complete checkpoint it resumed from, byte
/// for byte, and resumes from it once there is room.
#[test]
fn a_full_disk_is_a_clear_error_with_nothing_half_written() {
    // A real ENOSPC (Linux's /dev/full) is the matchable kind, naming the file.
    let full = std::path::Path::new("/dev/full");
    if full.exists() {
        match sd2::fs::write_synced(full, b"weights") {
            Err(Error::Write { path, source }) => {
                println!("{}: {source}", path.display());
                assert_eq!(path, full);
                assert_eq!(source.kind(), std::io::ErrorKind::StorageFull);
            }
            other => panic!("writing /dev/full: {other:?}"),
        }
    } else {
        println!("/dev/full: skipped (not on this system)");
    }
    let d = std::env::temp_dir().join(format!("sd2-hostile-full-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = sd2::data::synth::generate(&d.join("data"), 32, 64, 6).unwrap();
    let mut args = tiny_run_args(&m.path, &d.join("fresh"));
    args.extend(["--set".to_string(), "epochs=1".to_string()]);
    let r = sd2_limited(512, &args);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("fresh run, disk full: {err}");
    assert!(!r.status.success(), "exit 0 on a full disk");
    let named = d.join("fresh/checkpoints/step-00000001/trainable.safetensors");
    assert!(
        err.contains(&format!(
            "{}: cannot write: File too large",
            named.display()
        )),
        "the error does not name the file: {err}"
    );
    assert_eq!(leftovers(&d.join("fresh")), Vec::<String>::new());
    assert!(!d.join("fresh/checkpoints/last").exists());
    // One epoch with room, then a resume into a second epoch without.
    let mut args = tiny_run_args(&m.path, &d.join("run"));
    args.extend(["--set".to_string(), "epochs=1".to_string()]);
    let r = sd2(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let last = d.join("run/checkpoints/last");
    let before = std::fs::canonicalize(&last).unwrap();
    let files = [
        "trainable.safetensors",
        "optimizer.safetensors",
        "state.json",
    ];
    let bytes: Vec<Vec<u8>> = files.iter().map(|f| file_bytes(&last.join(f))).collect();
    let resume: Vec<String> = [
        "train",
        "--resume",
        d.join("run").to_str().unwrap(),
        "--set",
        "epochs=2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let r = sd2_limited(512, &resume);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("resumed run, disk full: {err}");
    assert!(!r.status.success(), "exit 0 on a full disk");
    assert!(err.contains("trainable.safetensors: cannot write"), "{err}");
    assert_eq!(leftovers(&d.join("run")), Vec::<String>::new());
    assert_eq!(std::fs::canonicalize(&last).unwrap(), before);
    for (f, b) in files.iter().zip(&bytes) {
        assert!(file_bytes(&last.join(f)) == *b, "{f} changed");
    }
    let r = sd2(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_ne!(std::fs::canonicalize(&last).unwrap(), before);
    std::fs::remove_dir_all(&d).ok();
}

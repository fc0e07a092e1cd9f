//! Training a tiny SD2 on the CPU: the loss goes down with a fixed seed, a resumed run is
//! bit-identical to a straight one, and bad checkpoints are clear errors.
use sd2::clip::{ClipConfig, ClipModel, ClipTokenizer};
use sd2::rng::Rng;
use sd2::sd2::train::{MicroBatch, TrainConfig, Trainer};
use sd2::sd2::{Sd2Config, Sd2Model, TypeTexts};
use sd2::{DType, Device, Tensor};

fn tiny_clip() -> ClipModel {
    let cfg = ClipConfig::from_json(
        r#"{"projection_dim": 16,
            "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 28, "patch_size": 14},
            "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2}}"#,
    )
    .unwrap();
    ClipModel::random(&cfg, DType::F32, Device::Cpu, 11).unwrap()
}

fn sd2_cfg() -> Sd2Config {
    let mut c = Sd2Config::default();
    c.lora.rank = 4;
    c.clam_heads = 4;
    c
}

fn train_cfg(total: usize) -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        total_steps: total,
        micro_batch: 6,
        effective_batch: 12,
        seed: 5,
        ..Default::default()
    }
}

/// Images whose class shows as a coloured stripe; descriptions that vary with the sample.
fn micro_batches(rng: &mut Rng, n_micro: usize, per: usize) -> Vec<MicroBatch> {
    const FACES: [&str; 4] = [
        "a young woman with brown hair, smiling",
        "an old man with glasses",
        "a child with curly hair",
        "a man with a beard, frowning",
    ];
    const ENVS: [&str; 3] = [
        "indoor, warm light, plain wall",
        "outdoor, trees, overcast",
        "studio, white background",
    ];
    (0..n_micro)
        .map(|_| {
            let mut px = vec![0.0; per * 3 * 28 * 28];
            let mut labels = vec![];
            for i in 0..per {
                let c = rng.below(5);
                labels.push(c);
                for ch in 0..3 {
                    for y in 0..28 {
                        for x in 0..28 {
                            let stripe = if c > 0 && (y / 7) == c - 1 && ch == (c % 3) {
                                1.5
                            } else {
                                0.0
                            };
                            px[((i * 3 + ch) * 28 + y) * 28 + x] = 0.3 * rng.normal() + stripe;
                        }
                    }
                }
            }
            MicroBatch {
                pixel_values: Tensor::from_f64(&px, (per, 3, 28, 28), DType::F32, Device::Cpu)
                    .unwrap(),
                face: labels
                    .iter()
                    .map(|_| FACES[rng.below(4)].to_string())
                    .collect(),
                env: labels
                    .iter()
                    .map(|_| ENVS[rng.below(3)].to_string())
                    .collect(),
                labels,
            }
        })
        .collect()
}

fn trainer(total: usize) -> Trainer {
    let model = Sd2Model::new(tiny_clip(), sd2_cfg(), 3).unwrap();
    Trainer::new(
        model,
        train_cfg(total),
        ClipTokenizer::openai().unwrap(),
        TypeTexts::shipped().unwrap(),
    )
}

#[test]
fn tiny_sd2_loss_goes_down() {
    let mut t = trainer(40);
    let mut data = Rng::new(1);
    let mut totals = vec![];
    for _ in 0..40 {
        let log = t.step(&micro_batches(&mut data, 2, 6)).unwrap();
        assert!(log.total.is_finite() && log.grad_norm.is_finite());
        totals.push(log.total);
        if log.step.is_multiple_of(10) {
            println!("{}", log.to_json());
        }
    }
    let first: f64 = totals[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = totals[35..].iter().sum::<f64>() / 5.0;
    println!("mean total loss: first 5 steps {first:.4}, last 5 steps {last:.4}");
    assert!(last < 0.8 * first, "loss did not go down: {first} → {last}");
}

fn params_bits(t: &Trainer) -> Vec<(String, Vec<u32>)> {
    t.model
        .params()
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                p.tensor
                    .to_vec::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn resume_is_bit_identical() {
    let dir = std::env::temp_dir().join(format!("sd2-resume-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let batches: Vec<Vec<MicroBatch>> = {
        let mut r = Rng::new(2);
        (0..6).map(|_| micro_batches(&mut r, 2, 4)).collect()
    };
    let mut straight = trainer(6);
    let logs_a: Vec<_> = batches.iter().map(|b| straight.step(b).unwrap()).collect();

    let mut first = trainer(6);
    for b in &batches[..3] {
        first.step(b).unwrap();
    }
    first.save(&dir.join("ckpt"), None).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(
        &dir.join("ckpt"),
        tiny_clip(),
        ClipTokenizer::openai().unwrap(),
        TypeTexts::shipped().unwrap(),
    )
    .unwrap();
    assert_eq!(resumed.steps(), 3);
    let logs_b: Vec<_> = batches[3..]
        .iter()
        .map(|b| resumed.step(b).unwrap())
        .collect();
    for (a, b) in logs_a[3..].iter().zip(&logs_b) {
        assert_eq!(
            a.total.to_bits(),
            b.total.to_bits(),
            "step {}: loss differs after resume",
            a.step
        );
        assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
    }
    assert_eq!(
        params_bits(&straight),
        params_bits(&resumed),
        "parameters differ after resume"
    );

    // best keeps the best metric, last the latest.
    let ck = sd2::sd2::checkpoint::Checkpoints::new(dir.join("run"));
    let metric = |p: Option<std::path::PathBuf>| {
        let s: serde_json::Value =
            serde_json::from_slice(&std::fs::read(p.unwrap().join("state.json")).unwrap()).unwrap();
        s["metric"].as_f64()
    };
    for (m, better, best) in [(0.7, true, 0.7), (0.6, false, 0.7), (0.9, true, 0.9)] {
        assert_eq!(ck.save_keeping_best(&resumed, m).unwrap(), better, "{m}");
        assert_eq!(metric(ck.best()), Some(best));
        assert_eq!(metric(ck.last()), Some(m));
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_checkpoints_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("sd2-badckpt-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let t = trainer(2);
    let ck = dir.join("ckpt");
    t.save(&ck, None).unwrap();
    let resume = |clip: ClipModel| {
        Trainer::resume(
            &ck,
            clip,
            ClipTokenizer::openai().unwrap(),
            TypeTexts::shipped().unwrap(),
        )
        .err()
        .map(|e| e.to_string())
    };

    // A CLIP folder with another config.
    let mut other = tiny_clip();
    other.config.projection_dim = 8;
    let e = resume(other).expect("config mismatch must fail");
    assert!(e.contains("different config"), "{e}");

    // A renamed tensor.
    let file = ck.join("trainable.safetensors");
    let original = std::fs::read(&file).unwrap();
    let tensors = sd2::io::load(&file, Device::Cpu).unwrap();
    let renamed: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.replace("clam.q_proj.weight", "clam.query.weight"),
                t.clone(),
            )
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = renamed.iter().map(|(n, t)| (n.as_str(), t)).collect();
    sd2::io::save(&file, &refs, None).unwrap();
    let e = resume(tiny_clip()).expect("renamed tensor must fail");
    assert!(
        e.contains("missing trainable tensor `clam.q_proj.weight`"),
        "{e}"
    );

    // A truncated file.
    std::fs::write(&file, &original[..original.len() / 2]).unwrap();
    let e = resume(tiny_clip()).expect("truncated file must fail");
    assert!(e.contains("trainable.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ablation_switches_change_what_is_computed() {
    use sd2::clip::Fwd;
    use sd2::sd2::{DualContrast, Sd2Batch};
    let tk = ClipTokenizer::openai().unwrap();
    let mut r = Rng::new(4);
    let mb = micro_batches(&mut r, 1, 3).remove(0);
    let ids = |v: &[String]| {
        let refs: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        tk.tokenize_batch(&refs, 77, Device::Cpu).unwrap()
    };
    let texts = TypeTexts::shipped().unwrap();
    let batch = Sd2Batch {
        pixel_values: mb.pixel_values.clone(),
        labels: Tensor::from_vec(
            mb.labels.iter().map(|l| *l as i64).collect::<Vec<_>>(),
            3,
            Device::Cpu,
        )
        .unwrap(),
        type_ids: tk
            .tokenize_batch(&texts.test_phrases(), 77, Device::Cpu)
            .unwrap(),
        face_ids: Some(ids(&mb.face)),
        env_ids: Some(ids(&mb.env)),
        host_ids: None,
    };
    let run = |edit: &dyn Fn(&mut Sd2Config)| {
        let mut c = sd2_cfg();
        edit(&mut c);
        let m = Sd2Model::new(tiny_clip(), c.clone(), 3).unwrap();
        let l = m.losses(&batch, Fwd::default()).unwrap();
        let parts = c.w_c * l.l_c.to_scalar().unwrap()
            + l.l_s
                .as_ref()
                .map_or(0.0, |t| c.w_s * t.to_scalar().unwrap())
            + l.l_d
                .as_ref()
                .map_or(0.0, |t| c.w_d * t.to_scalar().unwrap());
        assert!(
            (parts - l.total.to_scalar().unwrap()).abs() < 1e-4,
            "total is the weighted sum of the terms"
        );
        (m, l)
    };
    let (full, l) = run(&|_| {});
    assert!(l.l_s.is_some() && l.l_d.is_some() && full.clam.is_some());
    let (_, l) = run(&|c| c.loss_separation = false);
    assert!(l.l_s.is_none());
    let (_, off) = run(&|c| c.loss_dual = DualContrast::Off);
    assert!(off.l_d.is_none());
    let (_, face) = run(&|c| c.loss_dual = DualContrast::Face);
    let (_, both) = run(&|_| {});
    assert!(
        face.l_d.unwrap().to_scalar().unwrap() < both.l_d.unwrap().to_scalar().unwrap(),
        "face+env adds a second term"
    );
    let (no_clam, _) = run(&|c| c.clam = false);
    assert!(no_clam.clam.is_none() && no_clam.adapter.is_none());
    assert!(no_clam
        .params()
        .iter()
        .all(|p| !p.name.starts_with("clam.") && !p.name.starts_with("adapter.")));
    assert!(no_clam.params().len() < full.params().len());
    // At initialisation (B = 0, W2 = 0), SD2's image feature is CLIP's own.
    let clip = tiny_clip();
    let f0 = clip
        .image_embeds(&batch.pixel_values)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let f1 = full
        .image_features(&batch.pixel_values, Fwd::default())
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert!(
        f0.iter().zip(&f1).all(|(a, b)| (a - b).abs() < 1e-6),
        "fresh SD2 must start at CLIP"
    );
}

#[test]
fn mismatched_descriptions_are_clear_errors() {
    let mut t = trainer(2);
    let mut rng = Rng::new(5);
    let mut mb = micro_batches(&mut rng, 1, 3);
    mb[0].env.pop();
    let e = t
        .step(&mb)
        .expect_err("2 env descriptions for 3 images")
        .to_string();
    assert!(e.contains("2 env descriptions for 3 images"), "{e}");
    assert_eq!(t.steps(), 0, "a failed step changes nothing");
}

/// `recompute = true` (activation recomputation per encoder block) trains like the recorded
/// model on the CPU: the same ops run again in backward with the same dropout masks (LoRA
/// dropout on), so only the order in which a block input's gradient contributions are summed
/// differs (the block's own two are added first) — float rounding, nothing more.
#[test]
fn recomputation_trains_the_same() {
    let run = |recompute: bool| {
        let mut t = trainer(3);
        t.cfg.recompute = recompute;
        let mut data = Rng::new(8);
        let logs: Vec<f64> = (0..3)
            .flat_map(|_| {
                let l = t.step(&micro_batches(&mut data, 2, 3)).unwrap();
                [l.total, l.grad_norm]
            })
            .collect();
        let params: Vec<f64> = t
            .model
            .params()
            .iter()
            .flat_map(|p| p.tensor.to_vec_f64().unwrap())
            .collect();
        (logs, params)
    };
    assert!(
        sd2_cfg().lora.dropout > 0.0,
        "the test needs LoRA dropout on"
    );
    let (plain, recomputed) = (run(false), run(true));
    let worst = |a: &[f64], b: &[f64]| {
        let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / scale)
            .fold(0f64, f64::max)
    };
    let (wl, wp) = (
        worst(&recomputed.0, &plain.0),
        worst(&recomputed.1, &plain.1),
    );
    println!("recomputed vs recorded: losses/norms worst rel {wl:.2e}, params worst rel {wp:.2e}");
    assert!(wl < 1e-6 && wp < 1e-6, "{wl:e} {wp:e}");
}

/// The trainer encodes the five class phrases once per optimizer step and backpropagates the
/// summed gradient of û through the text tower once; that is the same gradient as running
/// every micro-batch's full loss (phrases included) and accumulating — checked through the
/// step's gradient norm, with LoRA dropout off so both see the same masks.
#[test]
fn class_texts_once_per_step_give_the_accumulated_gradient() {
    use sd2::clip::Fwd;
    use sd2::sd2::Sd2Batch;
    let mut cfg = sd2_cfg();
    cfg.lora.dropout = 0.0;
    let tcfg = TrainConfig {
        sample_type_texts: false,
        ..train_cfg(1)
    };
    let mut data = Rng::new(21);
    let mbs = micro_batches(&mut data, 3, 2);
    let texts = TypeTexts::shipped().unwrap();
    let mut t = Trainer::new(
        Sd2Model::new(tiny_clip(), cfg.clone(), 3).unwrap(),
        tcfg,
        ClipTokenizer::openai().unwrap(),
        texts.clone(),
    );
    let norm_trainer = t.step(&mbs).unwrap().grad_norm;

    let m = Sd2Model::new(tiny_clip(), cfg, 3).unwrap();
    let tk = ClipTokenizer::openai().unwrap();
    let ids = |v: &[&str]| tk.tokenize_batch_longest(v, 77, Device::Cpu).unwrap();
    let mut grads = sd2::GradStore::new();
    for mb in &mbs {
        let batch = Sd2Batch {
            pixel_values: mb.pixel_values.clone(),
            labels: Tensor::from_vec(
                mb.labels.iter().map(|l| *l as i64).collect::<Vec<_>>(),
                mb.labels.len(),
                Device::Cpu,
            )
            .unwrap(),
            type_ids: ids(&texts.test_phrases()),
            face_ids: Some(ids(&mb.face.iter().map(|x| x.as_str()).collect::<Vec<_>>())),
            env_ids: Some(ids(&mb.env.iter().map(|x| x.as_str()).collect::<Vec<_>>())),
            host_ids: None,
        };
        let l = m.losses(&batch, Fwd::default()).unwrap();
        l.total
            .scale(1.0 / mbs.len() as f64)
            .unwrap()
            .backward_into(&mut grads)
            .unwrap();
    }
    let norm_full = sd2::optim::grad_norm(m.params(), &grads).unwrap();
    println!("grad norm: trainer {norm_trainer}, per-micro-batch full losses {norm_full}");
    assert!(
        (norm_trainer - norm_full).abs() <= 1e-6 * norm_full,
        "{norm_trainer} vs {norm_full}"
    );
}

/// Rank 0 of a pretend world of two whose other rank computes exactly what this one does:
/// every sum is twice the value. Records the size of each started (bucketed) sum.
/// Every started sum's element count, and the timed host reads of the sums.
struct Twin(std::sync::Mutex<Vec<usize>>, std::sync::atomic::AtomicUsize);

impl sd2::dist::Comm for Twin {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        2
    }
    fn backend(&self) -> &'static str {
        "twin"
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> sd2::Result<()> {
        values.iter_mut().for_each(|v| *v *= 2.0);
        Ok(())
    }
    fn all_reduce_sum_start(&self, t: &Tensor) -> sd2::Result<sd2::dist::Pending> {
        self.0.lock().unwrap().push(t.elem_count());
        self.all_reduce_sum(t).map(sd2::dist::Pending::ready)
    }
    fn timed_read(
        &self,
        _: &'static str,
        read: &mut dyn FnMut() -> sd2::Result<()>,
    ) -> sd2::Result<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        read()
    }
    fn broadcast_bytes(&self, _: &mut Vec<u8>, _: usize) -> sd2::Result<()> {
        Ok(())
    }
    fn barrier(&self) -> sd2::Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

#[test]
fn bucketed_gradient_sums_start_inside_backward_and_change_no_bit() {
    let run_with = |twin: Option<f64>, recompute: bool| {
        let mut cfg = sd2_cfg();
        cfg.lora.dropout = 0.0; // rank 0 of two takes other dropout seeds than one process
        let model = Sd2Model::new(tiny_clip(), cfg, 3).unwrap();
        let mut tc = train_cfg(3);
        tc.recompute = recompute;
        let comm = std::sync::Arc::new(Twin(Default::default(), Default::default()));
        if let Some(mb) = twin {
            tc.grad_bucket_mb = mb;
        }
        let mut t = Trainer::new(
            model,
            tc,
            ClipTokenizer::openai().unwrap(),
            TypeTexts::shipped().unwrap(),
        );
        if twin.is_some() {
            t.set_comm(comm.clone());
        }
        let mut data = Rng::new(4);
        let mut stats = vec![];
        for _ in 0..3 {
            t.step(&micro_batches(&mut data, 2, 6)).unwrap();
            stats.push(t.last_grad_sync());
        }
        let sizes = comm.0.lock().unwrap().clone();
        // The host read that waits for the sums is timed, once a step (a device engine's
        // watchdog sees a rank stuck there).
        let reads = comm.1.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(reads, if twin.is_some() { 3 } else { 0 }, "timed reads");
        (params_bits(&t), stats, sizes)
    };
    let run = |twin| run_with(twin, false);
    let (one, stats, _) = run(None);
    assert!(
        stats.iter().all(Option::is_none),
        "one process sums nothing"
    );
    // 0.002 MB: buckets of about 500 f32 — many, for this tiny model.
    let (bucketed, stats, sizes) = run(Some(0.002));
    let (single_bucket, stats1, sizes1) = run(Some(0.0));
    let s = stats[0].unwrap();
    println!(
        "bucketed: {s:?}, bucket sizes of the first step (with counts) {:?}",
        &sizes[..s.buckets]
    );
    println!("one bucket: {:?}, {:?}", stats1[0].unwrap(), &sizes1[..1]);
    assert!(s.buckets >= 4, "{s:?}");
    assert!(
        s.started_in_backward >= s.buckets / 2,
        "most buckets should start inside backward: {s:?}"
    );
    assert!(
        stats.iter().all(|x| *x == Some(s)),
        "the same buckets every step"
    );
    assert_eq!(sizes.len(), 3 * s.buckets);
    let s1 = stats1[0].unwrap();
    assert_eq!((s1.buckets, s1.started_in_backward), (1, 0));
    assert_eq!(
        sizes.iter().sum::<usize>(),
        sizes1.iter().sum::<usize>(),
        "every gradient once (one presence count per parameter per bucket) in both"
    );
    for ((name, a), ((_, b), (_, c))) in one.iter().zip(bucketed.iter().zip(&single_bucket)) {
        assert!(a == b, "{name}: bucketed sums differ from one process");
        assert!(
            b == c,
            "{name}: bucketed sums differ from one sum after backward"
        );
    }
    println!(
        "{} tensors bit-identical: one process, buckets, one bucket",
        one.len()
    );
    // Recomputed blocks: a checkpoint's parameters are its node's inputs, final when it is.
    let (one_r, _, _) = run_with(None, true);
    let (bucketed_r, stats_r, _) = run_with(Some(0.002), true);
    let sr = stats_r[0].unwrap();
    println!("recomputed: {sr:?}");
    assert!(sr.started_in_backward >= sr.buckets / 2, "{sr:?}");
    for ((name, a), (_, b)) in one_r.iter().zip(&bucketed_r) {
        assert!(
            a == b,
            "{name}: bucketed sums differ from one process (recomputed)"
        );
    }
}

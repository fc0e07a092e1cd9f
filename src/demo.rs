//! `sd2 demo` while SD2 itself is being built: an end-to-end run of the engine on synthetic
//! data. A tiny pre-LN transformer (a frozen input projection with a LoRA adapter, a learned
//! CLS token, one attention + MLP block) learns to tell "real" noise sequences from four kinds
//! of planted "forgery traces", trained with AdamW and evaluated on a held-out split.
//! The SD2 model, data and metrics replace this when they land (issues 3–5).
use std::time::Instant;

use crate::ops::{self, Lora};
use crate::optim::{grad_norm, AdamW, AdamWConfig, Param};
use crate::rng::Rng;
use crate::{DType, Device, Result, Tensor};

pub const CLASSES: [&str; 5] = ["real", "fs", "fr", "efs", "fe"];

#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub steps: usize,
    pub batch: usize,
    pub seq: usize,
    pub dim: usize,
    pub lr: f64,
    pub seed: u64,
    pub test_size: usize,
    pub device: Device,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            steps: 400,
            batch: 32,
            seq: 12,
            dim: 32,
            lr: 3e-3,
            seed: 0,
            test_size: 500,
            device: Device::Cpu,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DemoReport {
    pub first_loss: f64,
    pub final_loss: f64,
    pub test_accuracy: f64,
    pub confusion: [[usize; 5]; 5],
    pub seconds: f64,
}

/// Synthetic sequences: Gaussian noise; class c > 0 adds its trace vector at 3 random positions.
struct Data {
    traces: Vec<Vec<f64>>,
    seq: usize,
    dim: usize,
}

impl Data {
    fn new(seq: usize, dim: usize, seed: u64) -> Data {
        let mut r = Rng::new(seed ^ 0x7472_6163);
        let traces = (0..CLASSES.len())
            .map(|_| {
                let v: Vec<f64> = (0..dim).map(|_| r.normal()).collect();
                let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                v.iter().map(|x| 1.2 * x / n).collect()
            })
            .collect();
        Data { traces, seq, dim }
    }

    fn batch(
        &self,
        n: usize,
        rng: &mut Rng,
        device: Device,
    ) -> Result<(Tensor, Tensor, Vec<usize>)> {
        let mut x = vec![0.0; n * self.seq * self.dim];
        let mut labels = vec![];
        for i in 0..n {
            let c = rng.below(CLASSES.len());
            labels.push(c);
            let s = &mut x[i * self.seq * self.dim..(i + 1) * self.seq * self.dim];
            s.iter_mut().for_each(|v| *v = 0.5 * rng.normal());
            if c > 0 {
                for _ in 0..3 {
                    let p = rng.below(self.seq);
                    for d in 0..self.dim {
                        s[p * self.dim + d] += self.traces[c][d];
                    }
                }
            }
        }
        let ids: Vec<i64> = labels.iter().map(|c| *c as i64).collect();
        Ok((
            Tensor::from_f64(&x, (n, self.seq, self.dim), DType::F32, device)?,
            Tensor::from_vec(ids, n, device)?,
            labels,
        ))
    }
}

struct Model {
    w_in: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    cls: Tensor,
    pos: Tensor,
    ln1: (Tensor, Tensor),
    qkv: Vec<(Tensor, Tensor)>,
    out: (Tensor, Tensor),
    ln2: (Tensor, Tensor),
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
    ln_f: (Tensor, Tensor),
    head: Tensor,
    params: Vec<Param>,
}

impl Model {
    fn new(seq: usize, d: usize, seed: u64, dev: Device) -> Result<Model> {
        let mut s = seed;
        let mut next = || {
            s += 1;
            s
        };
        let f = DType::F32;
        let rnd = |shape: &[usize], std: f64, seed: u64| Tensor::randn(shape, std, f, dev, seed);
        let std = 1.0 / (d as f64).sqrt();
        let mut params = vec![];
        let mut p = |name: &str, t: Tensor, decay: bool| -> Tensor {
            let t = t.into_trainable();
            params.push(Param::new(name, t.clone(), decay));
            t
        };
        let ln = |p: &mut dyn FnMut(&str, Tensor, bool) -> Tensor,
                  name: &str|
         -> Result<(Tensor, Tensor)> {
            Ok((
                p(&format!("{name}.weight"), Tensor::ones(d, f, dev)?, false),
                p(&format!("{name}.bias"), Tensor::zeros(d, f, dev)?, false),
            ))
        };
        let w_in = rnd(&[d, d], std, next())?; // frozen: the "pretrained backbone"
        let lora_a = p("lora_A", rnd(&[4, d], std, next())?, true);
        let lora_b = p("lora_B", Tensor::zeros((d, 4), f, dev)?, true);
        let cls = p("cls", rnd(&[1, 1, d], 0.02, next())?, false);
        let pos = p("pos", rnd(&[seq + 1, d], 0.02, next())?, false);
        let ln1 = ln(&mut p, "ln1")?;
        let mut qkv = vec![];
        for n in ["q", "k", "v"] {
            qkv.push((
                p(&format!("{n}.weight"), rnd(&[d, d], std, next())?, true),
                p(&format!("{n}.bias"), Tensor::zeros(d, f, dev)?, false),
            ));
        }
        let out = (
            p("out.weight", rnd(&[d, d], std, next())?, true),
            p("out.bias", Tensor::zeros(d, f, dev)?, false),
        );
        let ln2 = ln(&mut p, "ln2")?;
        let fc1 = (
            p("fc1.weight", rnd(&[2 * d, d], std, next())?, true),
            p("fc1.bias", Tensor::zeros(2 * d, f, dev)?, false),
        );
        let fc2 = (
            p(
                "fc2.weight",
                rnd(&[d, 2 * d], std / 2f64.sqrt(), next())?,
                true,
            ),
            p("fc2.bias", Tensor::zeros(d, f, dev)?, false),
        );
        let ln_f = ln(&mut p, "ln_f")?;
        let head = p("head", rnd(&[CLASSES.len(), d], std, next())?, true);
        Ok(Model {
            w_in,
            lora_a,
            lora_b,
            cls,
            pos,
            ln1,
            qkv,
            out,
            ln2,
            fc1,
            fc2,
            ln_f,
            head,
            params,
        })
    }

    fn logits(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let (b, d) = (x.dims()[0], x.dims()[2]);
        let lora = Lora {
            a: &self.lora_a,
            b: &self.lora_b,
            scale: 2.0,
            dropout: if dropout_seed.is_some() { 0.1 } else { 0.0 },
            seed: dropout_seed.unwrap_or(0),
        };
        let h = ops::lora_linear(x, &self.w_in, None, Some(lora))?;
        let cls = self.cls.broadcast_as(&crate::Shape::from([b, 1, d]))?;
        let h = Tensor::cat(&[&cls, &h], 1)?.add(&self.pos)?;
        let a = h.layer_norm(&self.ln1.0, &self.ln1.1, 1e-5)?;
        let qkv: Vec<Tensor> = self
            .qkv
            .iter()
            .map(|(w, bb)| a.linear(w, Some(bb)))
            .collect::<Result<_>>()?;
        let att = ops::attention(&qkv[0], &qkv[1], &qkv[2], 4, false)?;
        let h = h.add(&att.linear(&self.out.0, Some(&self.out.1))?)?;
        let m = h.layer_norm(&self.ln2.0, &self.ln2.1, 1e-5)?;
        let m = m
            .linear(&self.fc1.0, Some(&self.fc1.1))?
            .quick_gelu()?
            .linear(&self.fc2.0, Some(&self.fc2.1))?;
        let h = h.add(&m)?;
        let cls =
            h.select_rows_per_batch(&vec![0; b])?
                .layer_norm(&self.ln_f.0, &self.ln_f.1, 1e-5)?;
        cls.linear(&self.head, None)
    }
}

/// Trains and evaluates; `log` receives one line per logged step.
pub fn run(cfg: &DemoConfig, mut log: impl FnMut(&str)) -> Result<DemoReport> {
    let t0 = Instant::now();
    let data = Data::new(cfg.seq, cfg.dim, cfg.seed);
    let model = Model::new(cfg.seq, cfg.dim, cfg.seed.wrapping_mul(1000), cfg.device)?;
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut rng = Rng::new(cfg.seed ^ 0x5452_4149);
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    for step in 0..cfg.steps {
        let (x, y, _) = data.batch(cfg.batch, &mut rng, cfg.device)?;
        let loss =
            ops::cross_entropy(&model.logits(&x, Some(cfg.seed ^ (step as u64) << 20))?, &y)?;
        let l = loss.to_scalar()?;
        let grads = loss.backward()?;
        let norm = grad_norm(&model.params, &grads)?;
        let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        // Linear warmup over the first 10% of steps, then cosine decay.
        let warm = (cfg.steps / 10).max(1);
        let lr = if step < warm {
            cfg.lr * (step + 1) as f64 / warm as f64
        } else {
            let p = (step - warm) as f64 / (cfg.steps - warm).max(1) as f64;
            cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        };
        opt.step(&model.params, &grads, lr, clip)?;
        if step == 0 {
            first = l;
        }
        last = l;
        if step % 20 == 0 || step + 1 == cfg.steps {
            log(&format!("{{\"step\": {step}, \"loss\": {l:.5}, \"lr\": {lr:.3e}, \"grad_norm\": {norm:.4}}}"));
        }
    }
    let _g = crate::no_grad();
    let mut test_rng = Rng::new(cfg.seed ^ 0x7465_7374);
    let mut confusion = [[0usize; 5]; 5];
    let mut left = cfg.test_size;
    while left > 0 {
        let n = left.min(256);
        let (x, _, labels) = data.batch(n, &mut test_rng, cfg.device)?;
        let z = model.logits(&x, None)?.to_vec_f64()?;
        for (i, c) in labels.iter().enumerate() {
            let row = &z[i * 5..(i + 1) * 5];
            let pred = (0..5).fold(0, |best, j| if row[j] > row[best] { j } else { best });
            confusion[*c][pred] += 1;
        }
        left -= n;
    }
    let correct: usize = (0..5).map(|c| confusion[c][c]).sum();
    Ok(DemoReport {
        first_loss: first,
        final_loss: last,
        test_accuracy: correct as f64 / cfg.test_size.max(1) as f64,
        confusion,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

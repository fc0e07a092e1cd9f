//! The paper's GenImage protocol (`sd2 probe`): a logistic-regression linear probe on frozen,
//! L2-normalized SD2 image features of a binary real/fake manifest, fitted on the train split
//! and scored as accuracy per source on the test split.
//!
//! The fit minimises sklearn's `LogisticRegression(C)` objective,
//! `C·Σᵢ log(1 + exp(−yᵢ(w·xᵢ + b))) + ½‖w‖²` (intercept not penalized), by Newton's method
//! in f64 — exact to the tolerance for the feature sizes here (≤ 1024).
use std::collections::BTreeMap;

use serde::Serialize;

use crate::{Error, Result};

/// A fitted probe: `p(fake | x) = σ(w·x + b)`.
#[derive(Clone, Debug, Serialize)]
pub struct LogReg {
    /// Weights, one per feature dimension.
    pub w: Vec<f64>,
    /// Intercept (not regularized).
    pub b: f64,
    /// Newton iterations the fit took (at most 100).
    pub iterations: usize,
}

impl LogReg {
    /// The logit `w·x + b` of feature row `x`: > 0 predicts fake. `x` must have `w`'s length
    /// (extra or missing values are not checked; the dot product stops at the shorter).
    pub fn decision(&self, x: &[f64]) -> f64 {
        self.w.iter().zip(x).map(|(a, b)| a * b).sum::<f64>() + self.b
    }
}

/// Solves the dense symmetric positive-definite system `a·x = r` (Cholesky), in place of `r`.
fn cholesky_solve(a: &mut [f64], n: usize, r: &mut [f64]) -> Result<()> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return Err(Error::Msg("probe: Hessian not positive definite".into()));
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for k in 0..j {
                v -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = v / d;
        }
    }
    for i in 0..n {
        let mut v = r[i];
        for k in 0..i {
            v -= a[i * n + k] * r[k];
        }
        r[i] = v / a[i * n + i];
    }
    for i in (0..n).rev() {
        let mut v = r[i];
        for k in i + 1..n {
            v -= a[k * n + i] * r[k];
        }
        r[i] = v / a[i * n + i];
    }
    Ok(())
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

fn objective(theta: &[f64], x: &[Vec<f64>], y: &[bool], c: f64) -> f64 {
    let dim = theta.len() - 1;
    let reg = 0.5 * theta[..dim].iter().map(|v| v * v).sum::<f64>();
    let loss: f64 = x
        .iter()
        .zip(y)
        .map(|(xi, &yi)| {
            let z = xi.iter().zip(theta).map(|(a, b)| a * b).sum::<f64>() + theta[dim];
            softplus(if yi { -z } else { z })
        })
        .sum();
    c * loss + reg
}

/// Fits the probe on rows `x` (each of length `dim`) with labels `y` (true = fake).
pub fn fit(x: &[Vec<f64>], y: &[bool], c: f64) -> Result<LogReg> {
    let dim = x.first().map_or(0, |r| r.len());
    if x.is_empty() || x.len() != y.len() || x.iter().any(|r| r.len() != dim) {
        return Err(Error::invalid(
            "probe",
            format!(
                "{} feature rows of unequal length for {} labels",
                x.len(),
                y.len()
            ),
        ));
    }
    if y.iter().all(|v| *v) || y.iter().all(|v| !*v) {
        return Err(Error::invalid(
            "probe",
            "the train split needs both real and fake images",
        ));
    }
    if !(c > 0.0 && c.is_finite()) {
        return Err(Error::invalid("probe", format!("C = {c} must be > 0")));
    }
    // Parameters θ = (w, b); n = dim + 1.
    let n = dim + 1;
    let mut theta = vec![0.0; n];
    let mut iterations = 0;
    for it in 0..100 {
        iterations = it + 1;
        let mut grad = vec![0.0; n];
        let mut hess = vec![0.0; n * n];
        for (xi, &yi) in x.iter().zip(y) {
            let z: f64 = xi.iter().zip(&theta).map(|(a, b)| a * b).sum::<f64>() + theta[dim];
            let p = sigmoid(z);
            let g = c * (p - yi as u8 as f64);
            let h = c * p * (1.0 - p);
            for j in 0..dim {
                grad[j] += g * xi[j];
                let hj = h * xi[j];
                for k in 0..=j {
                    hess[j * n + k] += hj * xi[k];
                }
                hess[dim * n + j] += hj;
            }
            grad[dim] += g;
            hess[dim * n + dim] += h;
        }
        for j in 0..dim {
            grad[j] += theta[j];
            hess[j * n + j] += 1.0;
        }
        // Tiny ridge on the intercept keeps separable data solvable.
        hess[dim * n + dim] += 1e-12;
        for j in 0..n {
            for k in j + 1..n {
                hess[j * n + k] = hess[k * n + j];
            }
        }
        let gnorm = grad.iter().map(|v| v * v).sum::<f64>().sqrt();
        if gnorm < 1e-12 * (1.0 + c * x.len() as f64) {
            break;
        }
        let mut step = grad.clone();
        cholesky_solve(&mut hess, n, &mut step)?;
        // Damped Newton: halve the step until the objective decreases.
        let before = objective(&theta, x, y, c);
        let mut t = 1.0;
        loop {
            let cand: Vec<f64> = theta.iter().zip(&step).map(|(a, s)| a - t * s).collect();
            if objective(&cand, x, y, c) <= before || t < 1e-8 {
                theta = cand;
                break;
            }
            t *= 0.5;
        }
        // Converged to rounding: the step no longer moves θ.
        let scale = theta.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        if step.iter().all(|s| (t * s).abs() <= 1e-15 * scale) {
            break;
        }
    }
    Ok(LogReg {
        b: theta[dim],
        w: theta[..dim].to_vec(),
        iterations,
    })
}

/// The objective's gradient at `m` (for tests: ≈ 0 at the optimum).
pub fn objective_grad(m: &LogReg, x: &[Vec<f64>], y: &[bool], c: f64) -> Vec<f64> {
    let mut g = m.w.clone();
    g.push(0.0);
    let dim = m.w.len();
    for (xi, &yi) in x.iter().zip(y) {
        let r = c * (sigmoid(m.decision(xi)) - yi as u8 as f64);
        for j in 0..dim {
            g[j] += r * xi[j];
        }
        g[dim] += r;
    }
    g
}

/// Probe accuracy on the test items of one source, at decision 0 (p = 0.5). Each
/// accuracy is a fraction in [0, 1], NaN when the source has no items of that kind.
#[derive(Clone, Debug, Serialize)]
pub struct SourceAcc {
    /// Test items of the source.
    pub n: usize,
    /// Fraction of all its items classified right.
    pub acc: f64,
    /// Fraction of its real items classified real.
    pub real_acc: f64,
    /// Fraction of its fake items classified fake.
    pub fake_acc: f64,
}

/// The probe's result (`probe.json`): per-source test accuracy and their mean.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    /// The regularization parameter C the probe was fitted with.
    pub c: f64,
    /// Train images the probe was fitted on.
    pub train_n: usize,
    /// Accuracy of the fitted probe on its own train split, in [0, 1].
    pub train_acc: f64,
    /// Test accuracy per source, sorted by source name.
    pub per_source: BTreeMap<String, SourceAcc>,
    /// Mean of the per-source accuracies (the paper's mACC).
    pub macc: f64,
}

/// Accuracy at decision 0 (p = 0.5) per source, for test rows (source, features, is-fake).
pub fn score(
    m: &LogReg,
    c: f64,
    train_n: usize,
    train_acc: f64,
    test: &[(String, Vec<f64>, bool)],
) -> ProbeReport {
    let mut per: BTreeMap<String, [usize; 4]> = BTreeMap::new();
    for (src, x, fake) in test {
        let pred = m.decision(x) > 0.0;
        let e = per.entry(src.clone()).or_default();
        // [real seen, real right, fake seen, fake right]
        let k = if *fake { 2 } else { 0 };
        e[k] += 1;
        e[k + 1] += (pred == *fake) as usize;
    }
    let ratio = |a: usize, b: usize| {
        if b == 0 {
            f64::NAN
        } else {
            a as f64 / b as f64
        }
    };
    let per_source: BTreeMap<String, SourceAcc> = per
        .into_iter()
        .map(|(s, e)| {
            (
                s,
                SourceAcc {
                    n: e[0] + e[2],
                    acc: ratio(e[1] + e[3], e[0] + e[2]),
                    real_acc: ratio(e[1], e[0]),
                    fake_acc: ratio(e[3], e[2]),
                },
            )
        })
        .collect();
    let macc = if per_source.is_empty() {
        f64::NAN
    } else {
        per_source.values().map(|s| s.acc).sum::<f64>() / per_source.len() as f64
    };
    ProbeReport {
        c,
        train_n,
        train_acc,
        per_source,
        macc,
    }
}

impl ProbeReport {
    /// A console table: one row per source (n, accuracy, real and fake accuracy), then mACC
    /// with the fit's train size, train accuracy and C.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:>6} {:>8} {:>8} {:>8}\n",
            "source", "n", "ACC", "real", "fake"
        );
        for (s, a) in &self.per_source {
            out.push_str(&format!(
                "{:<16} {:>6} {:>8.4} {:>8.4} {:>8.4}\n",
                s, a.n, a.acc, a.real_acc, a.fake_acc
            ));
        }
        out.push_str(&format!(
            "mACC {:.4} (probe fitted on {} train images, train accuracy {:.4}, C = {})\n",
            self.macc, self.train_n, self.train_acc, self.c
        ));
        out
    }
}

/// What `run` probes: a checkpoint's features on a binary manifest with train and test items.
#[derive(Clone, Debug)]
pub struct ProbeRequest {
    /// The SD2 checkpoint folder whose image features are probed.
    pub checkpoint: std::path::PathBuf,
    /// The manifest: its train split fits the probe, its test split is scored (labels
    /// count only as real or fake).
    pub manifest: std::path::PathBuf,
    /// The directory `probe.json` goes to.
    pub out: std::path::PathBuf,
    /// sklearn's inverse regularization strength.
    pub c: f64,
    /// The CLIP directory, when the checkpoint does not carry the towers.
    pub clip: Option<std::path::PathBuf>,
    /// Skip (and log) bad manifest lines instead of failing. An image that passes the
    /// manifest checks but fails to decode still fails the run.
    pub skip_bad: bool,
    /// Where the features are computed.
    pub device: crate::Device,
}

/// The outcome of `run`.
#[derive(Clone, Debug)]
pub struct ProbeRun {
    /// The report, as written to `probe.json`.
    pub report: ProbeReport,
    /// Where the report was written.
    pub path: std::path::PathBuf,
    /// Wall-clock seconds of feature extraction, fit and scoring (loading the checkpoint and
    /// manifest not included).
    pub seconds: f64,
    /// Newton iterations of the fit.
    pub iterations: usize,
}

/// `sd2 probe`: features of the train split, the fit, the test split scored, `probe.json`
/// written atomically.
pub fn run(r: &ProbeRequest) -> Result<ProbeRun> {
    use crate::data::{LoadOptions, Manifest, Split};
    use crate::eval::predict::features_items;
    r.device.check_available()?;
    let m = Manifest::load(
        &r.manifest,
        LoadOptions {
            skip_bad: r.skip_bad,
            check_images: true,
            require_descriptions: false,
            verify_images: false,
        },
    )?;
    let (train, test) = (m.split(Split::Train), m.split(Split::Test));
    if train.is_empty() || test.is_empty() {
        return Err(Error::invalid(
            r.manifest.display().to_string(),
            format!(
                "the probe needs train and test items ({} and {})",
                train.len(),
                test.len()
            ),
        ));
    }
    let det = crate::sd2::detector::Detector::load(&r.checkpoint, r.clip.as_deref(), r.device)?;
    let t0 = std::time::Instant::now();
    let xtr = features_items(&det.model, &train, 64)?;
    let ytr: Vec<bool> = train.iter().map(|i| i.label != 0).collect();
    let model = fit(&xtr, &ytr, r.c)?;
    let train_acc = xtr
        .iter()
        .zip(&ytr)
        .filter(|(x, y)| (model.decision(x) > 0.0) == **y)
        .count() as f64
        / xtr.len() as f64;
    let xte = features_items(&det.model, &test, 64)?;
    let rows: Vec<(String, Vec<f64>, bool)> = test
        .iter()
        .zip(xte)
        .map(|(i, x)| (i.source.clone(), x, i.label != 0))
        .collect();
    let report = score(&model, r.c, xtr.len(), train_acc, &rows);
    std::fs::create_dir_all(&r.out).map_err(|e| Error::Msg(format!("{}: {e}", r.out.display())))?;
    let path = r.out.join("probe.json");
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Msg(e.to_string()))?;
    crate::fs::write_atomic(&path, json)?;
    Ok(ProbeRun {
        report,
        path,
        seconds: t0.elapsed().as_secs_f64(),
        iterations: model.iterations,
    })
}

//! `sd2 ablation`: the four rows of the paper's ablation (SD2-SPEC §8) on the synthetic
//! benchmark — L_C+L_S, +CLAM, +L_D (face), +L_D (face & environment) — each trained from the
//! same seed on the same data with the demo's settings and scored by out-of-domain mAUC.
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::demo::{synthesize, train_eval, DemoConfig};
use crate::run::Progress;
use crate::sd2::DualContrast;
use crate::{Error, Result};

/// The paper's cross-domain mAUC for the same rows (SD2-SPEC §8), in percent.
pub const PAPER: [f64; 4] = [80.24, 81.84, 84.34, 87.79];

/// One row of the ablation: what was switched on, its test scores and the paper's number.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// The row's label as the paper writes it (`L_C+L_S`, `+CLAM`, `+L_D face`, `+L_D face&env`).
    pub name: &'static str,
    /// Whether CLAM (cross-layer CLS attention and its adapter) was on.
    pub clam: bool,
    /// Which descriptions the dual contrast loss L_D used (`Off`: no L_D).
    pub loss_dual: DualContrast,
    /// Out-of-domain mAUC on the test split, a fraction in [0, 1] (not percent).
    pub mauc: f64,
    /// Overall ROC AUC on the test split, a fraction in [0, 1].
    pub auc: f64,
    /// The paper's mAUC for the row, in percent (from [`PAPER`]).
    pub paper_mauc: f64,
    /// Wall-clock seconds to train and evaluate the row.
    pub seconds: f64,
}

/// The result of `sd2 ablation`, also written to `ablation.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Ablation {
    /// The four rows, in the paper's order.
    pub rows: Vec<Row>,
    /// Whether mAUC rises row by row as in the paper.
    pub paper_order_reproduced: bool,
}

/// Runs the ablation. Synthesizes the demo's benchmark once (`cfg.out/data`), then trains
/// and evaluates each row in `cfg.out/rowK` (K = 1…4, overwritten) with the demo's
/// settings, L_S on and the row's CLAM and L_D switches. Writes `cfg.out/ablation.json`
/// and returns the same result. Any row's failure ends the run.
pub fn run(cfg: &DemoConfig, progress: &mut dyn Progress) -> Result<Ablation> {
    let manifest = synthesize(cfg, progress)?;
    let specs: [(&'static str, bool, DualContrast); 4] = [
        ("L_C+L_S", false, DualContrast::Off),
        ("+CLAM", true, DualContrast::Off),
        ("+L_D face", true, DualContrast::Face),
        ("+L_D face&env", true, DualContrast::FaceEnv),
    ];
    let mut rows = vec![];
    for (k, (name, clam, dual)) in specs.into_iter().enumerate() {
        let t0 = Instant::now();
        progress.line(&format!("ablation row {}/4: {name}", k + 1));
        let out: PathBuf = cfg.out.join(format!("row{}", k + 1));
        let (rep, _) = train_eval(
            cfg,
            &manifest,
            &out,
            |rc| {
                rc.sd2.clam = clam;
                rc.sd2.loss_separation = true;
                rc.sd2.loss_dual = dual;
            },
            progress,
        )?;
        rows.push(Row {
            name,
            clam,
            loss_dual: dual,
            mauc: rep.mauc,
            auc: rep.overall.auc,
            paper_mauc: PAPER[k],
            seconds: t0.elapsed().as_secs_f64(),
        });
    }
    let paper_order_reproduced = rows.windows(2).all(|w| w[1].mauc > w[0].mauc);
    let ab = Ablation {
        rows,
        paper_order_reproduced,
    };
    let json = serde_json::to_string_pretty(&ab).map_err(|e| Error::Msg(e.to_string()))?;
    crate::fs::write_atomic(&cfg.out.join("ablation.json"), json)?;
    Ok(ab)
}

impl Ablation {
    /// A console table: per row its mAUC, AUC, the paper's mAUC and time, then whether the
    /// paper's ordering was reproduced.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:>8} {:>8} {:>13} {:>8}\n",
            "row", "mAUC", "AUC", "paper mAUC", "time"
        );
        for r in &self.rows {
            out.push_str(&format!(
                "{:<16} {:>8.4} {:>8.4} {:>12.2}% {:>7.0}s\n",
                r.name, r.mauc, r.auc, r.paper_mauc, r.seconds
            ));
        }
        out.push_str(&format!(
            "the paper's ordering (each row above the last) {}\n",
            if self.paper_order_reproduced {
                "reproduces"
            } else {
                "does not reproduce"
            }
        ));
        out
    }
}

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

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: &'static str,
    pub clam: bool,
    pub loss_dual: DualContrast,
    pub mauc: f64,
    pub auc: f64,
    pub paper_mauc: f64,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Ablation {
    pub rows: Vec<Row>,
    /// Whether mAUC rises row by row as in the paper.
    pub paper_order_reproduced: bool,
}

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

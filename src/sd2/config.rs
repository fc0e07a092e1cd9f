//! SD2's configuration (SD2-SPEC §3–4). Every default is the spec's; the ablation switches are
//! `clam`, `loss_separation` and `loss_dual`.
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where LoRA adapters go and how large they are (SD2-SPEC §3). The default: rank 8, alpha 32
/// (scale 4), dropout 0.1, on `q_proj`, `k_proj`, `v_proj` and `out_proj` of every block of both
/// towers. Unknown keys are an error.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r of every adapter: A is [r, in], B [out, r]. At least 1 and at most the narrower
    /// tower's width.
    pub rank: usize,
    /// LoRA's alpha: the adapter's output is scaled by `alpha / rank` ([`LoraConfig::scale`]).
    /// Finite and > 0.
    pub alpha: f64,
    /// Dropout on the LoRA input during training.
    pub dropout: f32,
    /// Which linear layers of each block get an adapter (HF names).
    pub targets: Vec<String>,
    /// Put adapters on the vision tower's blocks.
    pub vision: bool,
    /// Put adapters on the text tower's blocks.
    pub text: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 32.0,
            dropout: 0.1,
            targets: ["q_proj", "k_proj", "v_proj", "out_proj"]
                .map(String::from)
                .to_vec(),
            vision: true,
            text: true,
        }
    }
}

impl LoraConfig {
    /// alpha / rank (4 by default).
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
}

/// Which description sets the dual vision-language contrast L_D uses.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DualContrast {
    /// No L_D; descriptions are not needed.
    Off,
    /// L_D against the face descriptions only.
    Face,
    /// L_D against face and environment descriptions: the sum of two sigmoid losses (the default).
    FaceEnv,
}

/// The model side of an SD2 run: LoRA, CLAM, which losses are on and their weights, and the sigmoid
/// contrast's starting point. Saved in every checkpoint's `state.json`; unknown keys are an error.
/// [`Sd2Config::validate_values`] and [`Sd2Config::validate`] check it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Sd2Config {
    /// Where the LoRA adapters go and their size.
    pub lora: LoraConfig,
    /// Cross-layer CLS attention + adapter on/off (off: the image feature is CLIP's own).
    pub clam: bool,
    /// Attention heads of CLAM (8); must divide the vision width.
    pub clam_heads: usize,
    /// Add L_S, which pushes the five normalized class embeddings U towards orthogonality:
    /// `‖U Uᵀ − I‖²_F / 25`.
    pub loss_separation: bool,
    /// Which descriptions the dual contrast L_D compares the image feature with.
    pub loss_dual: DualContrast,
    /// Weight of L_C, the type-text cross-entropy, in the total loss (2); finite and ≥ 0.
    pub w_c: f64,
    /// Weight of L_S in the total loss (1); finite and ≥ 0.
    pub w_s: f64,
    /// Weight of L_D in the total loss (1); finite and ≥ 0.
    pub w_d: f64,
    /// Initial t' of the sigmoid contrast, whose temperature is t = exp t' (ln 10, so t starts
    /// at 10).
    pub t_init: f64,
    /// Initial bias b of the sigmoid contrast (−10). t' and b are trained, and shared by the face
    /// and environment terms.
    pub b_init: f64,
    /// Also train every CLIP weight (named `clip.<HF name>`). For a CLIP trained from scratch —
    /// the `tiny` preset, since no pretrained CLIP can be downloaded — where LoRA alone on a
    /// random base has nothing to adapt. Off for real runs (SD2-SPEC: base weights frozen).
    pub train_base: bool,
}

impl Default for Sd2Config {
    fn default() -> Self {
        Sd2Config {
            lora: LoraConfig::default(),
            clam: true,
            clam_heads: 8,
            loss_separation: true,
            loss_dual: DualContrast::FaceEnv,
            w_c: 2.0,
            w_s: 1.0,
            w_d: 1.0,
            t_init: 10f64.ln(),
            b_init: -10.0,
            train_base: false,
        }
    }
}

impl Sd2Config {
    /// The values that need no model to check, each in its range; the first that is not is
    /// named by its key (`sd2.w_c`).
    pub fn validate_values(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::Config {
                key: format!("sd2.{key}"),
                msg,
            })
        };
        if self.lora.rank == 0 {
            return bad("lora.rank", "must be > 0".into());
        }
        if !(self.lora.alpha.is_finite() && self.lora.alpha > 0.0) {
            return bad(
                "lora.alpha",
                format!("{} must be finite and > 0", self.lora.alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora.dropout) {
            return bad(
                "lora.dropout",
                format!("{} must be in [0, 1)", self.lora.dropout),
            );
        }
        for (key, w) in [("w_c", self.w_c), ("w_s", self.w_s), ("w_d", self.w_d)] {
            if !(w.is_finite() && w >= 0.0) {
                return bad(key, format!("{w} must be finite and ≥ 0"));
            }
        }
        for (key, v) in [("t_init", self.t_init), ("b_init", self.b_init)] {
            if !v.is_finite() {
                return bad(key, format!("{v} must be finite"));
            }
        }
        Ok(())
    }

    /// `validate_values`, then what depends on the CLIP it is built on: known LoRA targets, a
    /// rank no larger than the narrower tower (a checkpoint's rank sizes allocations), CLAM
    /// heads dividing the vision width.
    pub fn validate(&self, clip: &crate::clip::ClipConfig) -> Result<()> {
        self.validate_values()?;
        let vision_width = clip.vision_config.hidden_size;
        let widest_rank = vision_width.min(clip.text_config.hidden_size);
        if self.lora.rank > widest_rank {
            return Err(Error::Config {
                key: "sd2.lora.rank".into(),
                msg: format!(
                    "{} is over the towers' width {widest_rank} (a LoRA is low-rank)",
                    self.lora.rank
                ),
            });
        }
        let bad = |m: String| Err(Error::invalid("SD2 config", m));
        const KNOWN: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];
        if let Some(t) = self
            .lora
            .targets
            .iter()
            .find(|t| !KNOWN.contains(&t.as_str()))
        {
            return bad(format!(
                "unknown LoRA target {t:?} (known: {})",
                KNOWN.join(", ")
            ));
        }
        if self.clam && (self.clam_heads == 0 || !vision_width.is_multiple_of(self.clam_heads)) {
            return bad(format!(
                "CLAM width {vision_width} is not divisible by {} heads",
                self.clam_heads
            ));
        }
        Ok(())
    }
}

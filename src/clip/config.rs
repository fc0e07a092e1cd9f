//! CLIP configuration, parsed from a HuggingFace `config.json` (`vision_config`, `text_config`,
//! `projection_dim`). Missing keys default to OpenAI's ViT-L/14.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

fn eps() -> f64 {
    1e-5
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}

/// The vision tower's shape (HF `vision_config`). Every missing key defaults to OpenAI's ViT-L/14
/// at 224 px: width 1024, 24 blocks of 16 heads, MLP width 4096, 14 px patches.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VisionConfig {
    /// Width D of the residual stream (1024); must be a multiple of `num_attention_heads`.
    #[serde(default = "VisionConfig::d_hidden")]
    pub hidden_size: usize,
    /// Hidden width of each block's MLP, the output of `fc1` (4096).
    #[serde(default = "VisionConfig::d_inter")]
    pub intermediate_size: usize,
    /// Attention heads per block (16); each head is `hidden_size / num_attention_heads` wide.
    #[serde(default = "VisionConfig::d_heads")]
    pub num_attention_heads: usize,
    /// Encoder blocks in the tower (24). CLAM reads the CLS token of each one.
    #[serde(default = "VisionConfig::d_layers")]
    pub num_hidden_layers: usize,
    /// Side of the square input in pixels (224): `pixel_values` are [B, C, image_size, image_size].
    #[serde(default = "VisionConfig::d_image")]
    pub image_size: usize,
    /// Side of one square patch in pixels (14). The tower sees `(image_size / patch_size)²` patches
    /// (see [`VisionConfig::grid`]).
    #[serde(default = "VisionConfig::d_patch")]
    pub patch_size: usize,
    /// Input channels (3, RGB).
    #[serde(default = "VisionConfig::d_channels")]
    pub num_channels: usize,
    /// Epsilon of every LayerNorm in the tower, added to the variance (1e-5).
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Name of the MLP activation. Only `quick_gelu` is supported; [`ClipConfig::validate`] refuses
    /// anything else.
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
}

impl VisionConfig {
    fn d_hidden() -> usize {
        1024
    }
    fn d_inter() -> usize {
        4096
    }
    fn d_heads() -> usize {
        16
    }
    fn d_layers() -> usize {
        24
    }
    fn d_image() -> usize {
        224
    }
    fn d_patch() -> usize {
        14
    }
    fn d_channels() -> usize {
        3
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: patches + CLS.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

impl Default for VisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// The text tower's shape (HF `text_config`). Every missing key defaults to the text tower of
/// OpenAI's ViT-L/14: width 768, 12 causal blocks of 12 heads, MLP width 3072, 77 positions, a
/// vocabulary of 49408 tokens.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TextConfig {
    /// Width of the residual stream (768); must be a multiple of `num_attention_heads`.
    #[serde(default = "TextConfig::d_hidden")]
    pub hidden_size: usize,
    /// Hidden width of each block's MLP, the output of `fc1` (3072).
    #[serde(default = "TextConfig::d_inter")]
    pub intermediate_size: usize,
    /// Attention heads per block (12).
    #[serde(default = "TextConfig::d_heads")]
    pub num_attention_heads: usize,
    /// Encoder blocks in the tower (12). All of them use a causal mask.
    #[serde(default = "TextConfig::d_layers")]
    pub num_hidden_layers: usize,
    /// Most tokens per text (77, the tokenizer's context). Input ids are [M, S] with 0 < S ≤ this.
    #[serde(default = "TextConfig::d_pos")]
    pub max_position_embeddings: usize,
    /// Rows of the token embedding (49408: the BPE vocabulary and the start and end tokens). Every
    /// token id must be below it.
    #[serde(default = "TextConfig::d_vocab")]
    pub vocab_size: usize,
    /// Epsilon of every LayerNorm in the tower, added to the variance (1e-5).
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Name of the MLP activation. Only `quick_gelu` is supported.
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
}

impl TextConfig {
    fn d_hidden() -> usize {
        768
    }
    fn d_inter() -> usize {
        3072
    }
    fn d_heads() -> usize {
        12
    }
    fn d_layers() -> usize {
        12
    }
    fn d_pos() -> usize {
        77
    }
    fn d_vocab() -> usize {
        49408
    }
}

impl Default for TextConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// The configuration of a whole CLIP model: both towers and the width of the shared embedding
/// space, as in a HuggingFace `config.json` (unknown keys are ignored, missing ones default).
/// `Default` is OpenAI's ViT-L/14 ([`ClipConfig::vit_l14`]). Read one with
/// [`ClipConfig::from_file`] or [`ClipConfig::from_json`], which also run [`ClipConfig::validate`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClipConfig {
    /// The vision tower (key `vision_config`, or the older `vision_config_dict`).
    #[serde(default, alias = "vision_config_dict")]
    pub vision_config: VisionConfig,
    /// The text tower (key `text_config`, or the older `text_config_dict`).
    #[serde(default, alias = "text_config_dict")]
    pub text_config: TextConfig,
    /// Width P of the shared embedding space both towers are projected into (768). Image and text
    /// embeddings are [N, P].
    #[serde(default = "ClipConfig::d_proj")]
    pub projection_dim: usize,
    /// ln(1/0.07), HF's init of `logit_scale`.
    #[serde(default = "ClipConfig::d_scale")]
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    fn d_proj() -> usize {
        768
    }
    fn d_scale() -> f64 {
        2.6592
    }

    /// OpenAI's ViT-L/14.
    pub fn vit_l14() -> ClipConfig {
        ClipConfig::default()
    }

    /// A ViT-B/16-sized vision tower with the base text tower (for benchmarks).
    pub fn vit_b16() -> ClipConfig {
        let mut c = ClipConfig::default();
        c.vision_config.hidden_size = 768;
        c.vision_config.intermediate_size = 3072;
        c.vision_config.num_attention_heads = 12;
        c.vision_config.num_hidden_layers = 12;
        c.vision_config.patch_size = 16;
        c.text_config.hidden_size = 512;
        c.text_config.intermediate_size = 2048;
        c.text_config.num_attention_heads = 8;
        c.projection_dim = 512;
        c
    }

    /// Parses the text of a HuggingFace `config.json` and validates it ([`ClipConfig::validate`]).
    /// Missing keys take the ViT-L/14 defaults. A JSON error is an `Error::Parse` and a failed
    /// check an `Error::InvalidInput`, both starting with `CLIP config:`.
    pub fn from_json(text: &str) -> Result<ClipConfig> {
        let c: ClipConfig =
            serde_json::from_str(text).map_err(|e| Error::parse("CLIP config", e))?;
        c.validate()?;
        Ok(c)
    }

    /// [`ClipConfig::from_json`] on the file at `path` (a CLIP folder's `config.json`). Read and
    /// parse errors are prefixed with the path.
    pub fn from_file(path: &Path) -> Result<ClipConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
        Self::from_json(&text).map_err(|e| Error::checkpoint(path, e))
    }

    /// Checks that a model can be built from this config, and that building it cannot take
    /// unbounded memory. Both towers must use `quick_gelu`; each tower's width must divide by its
    /// head count; the image must hold at least one patch; channels, vocabulary and positions must
    /// be non-zero; every size must be under a fixed limit (8192 for widths, 256 for layers and
    /// heads, 4096 px for the image, 2²⁰ tokens for the vocabulary); and the estimated parameter
    /// count must be at most 4·10⁹.
    ///
    /// The limits exist because sizes come from files (a `config.json`, a checkpoint's
    /// `state.json`) and are checked before anything is allocated from them. The first failed check
    /// is returned as an `Error::InvalidInput` starting with `CLIP config:`.
    pub fn validate(&self) -> Result<()> {
        let v = &self.vision_config;
        let t = &self.text_config;
        let bad = |m: String| Err(Error::invalid("CLIP config", m));
        for (tower, act) in [("vision", &v.hidden_act), ("text", &t.hidden_act)] {
            if act != "quick_gelu" {
                return bad(format!(
                    "{tower} hidden_act {act:?} is not supported (CLIP uses quick_gelu)"
                ));
            }
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return bad(format!(
                "vision hidden_size {} is not divisible by {} heads",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return bad(format!(
                "text hidden_size {} is not divisible by {} heads",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if v.patch_size == 0 || v.image_size < v.patch_size {
            return bad(format!(
                "image_size {} and patch_size {} make no patches",
                v.image_size, v.patch_size
            ));
        }
        // Sizes come from files (a checkpoint's state.json, a config.json): bounded before
        // anything is allocated from them.
        for (name, value, max) in [
            ("vision hidden_size", v.hidden_size, 8192),
            ("vision intermediate_size", v.intermediate_size, 65536),
            ("vision num_hidden_layers", v.num_hidden_layers, 256),
            ("vision num_attention_heads", v.num_attention_heads, 256),
            ("vision image_size", v.image_size, 4096),
            ("vision num_channels", v.num_channels, 4),
            ("text hidden_size", t.hidden_size, 8192),
            ("text intermediate_size", t.intermediate_size, 65536),
            ("text num_hidden_layers", t.num_hidden_layers, 256),
            ("text num_attention_heads", t.num_attention_heads, 256),
            (
                "text max_position_embeddings",
                t.max_position_embeddings,
                8192,
            ),
            ("text vocab_size", t.vocab_size, 1 << 20),
            ("projection_dim", self.projection_dim, 8192),
        ] {
            if value > max {
                return bad(format!("{name} {value} is over the limit of {max}"));
            }
        }
        if v.num_channels == 0 || t.vocab_size == 0 || t.max_position_embeddings == 0 {
            return bad("num_channels, vocab_size and max_position_embeddings must be > 0".into());
        }
        let tower =
            |h: usize, i: usize, l: usize| l as f64 * (4.0 * (h * h) as f64 + 2.0 * (h * i) as f64);
        let params = tower(v.hidden_size, v.intermediate_size, v.num_hidden_layers)
            + tower(t.hidden_size, t.intermediate_size, t.num_hidden_layers)
            + (t.vocab_size + t.max_position_embeddings) as f64 * t.hidden_size as f64
            + ((v.image_size / v.patch_size).pow(2) + v.num_channels * v.patch_size.pow(2)) as f64
                * v.hidden_size as f64;
        if params > 4e9 {
            return bad(format!(
                "{params:.3e} parameters is over the limit of 4e9 (ViT-bigG has 2.5e9)"
            ));
        }
        Ok(())
    }
}

impl Default for ClipConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

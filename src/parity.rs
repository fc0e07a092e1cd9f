//! `sd2 parity`: sd2's forward against a reference dump of the same model made by PyTorch
//! (`scripts/reference/dump_reference.py`: transformers' CLIPModel, peft's LoRA, and SD2's CLAM
//! and adapter as torch modules). sd2 runs the dump's own inputs (`inputs.pixel_values`,
//! `inputs.input_ids`), and every reference tensor is matched by name with the tensor sd2
//! computes at the same point:
//!
//! | name | what |
//! |---|---|
//! | `vision.hidden_states.I` | HF `hidden_states[I]` (0: after `pre_layrnorm`) |
//! | `vision.pooled`, `vision.image_embeds` | `pooler_output`, `visual_projection` of it |
//! | `text.hidden_states.I`, `text.last_hidden_state` | the text tower's states |
//! | `text.pooled`, `text.text_embeds` | the EOT state, its projection |
//! | `sd2.clam`, `sd2.image_features` | CLAM's f_sat, the adapter's f (with a checkpoint) |
//! | `sd2.class_embeddings`, `sd2.logits`, `sd2.probs` | normalized class phrases, logits, softmax |
//!
//! Each tensor passes when every element satisfies `|Δ| ≤ atol·rms(ref) + rtol·|ref|` — the
//! absolute part scaled by the reference's RMS, because CLIP's hidden states carry outlier
//! channels hundreds of times the typical value. The default [`Tolerance`] depends on the
//! dtype (the looser of the run's and the dump's). Besides the tensors, the class phrases'
//! tokens (up to and including EOT) must equal sd2's tokenizer's exactly, and when the dump
//! names its image files and they are found, sd2's own preprocessing of them is compared with
//! `inputs.pixel_values` (within 2 levels of 8 bits: JPEG decoders differ by one here and
//! there).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::clip::{preprocess, ClipModel, ClipTokenizer, Fwd, TowerOptions};
use crate::sd2::detector::Detector;
use crate::sd2::type_texts::TypeTexts;
use crate::{DType, Device, Error, Result, Tensor};

/// The dump format this module reads (`format` in the safetensors metadata).
pub const FORMAT: &str = "sd2-parity/1";

/// Per-element bound `|Δ| ≤ atol·rms(ref) + rtol·|ref|`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Tolerance {
    /// Absolute part, in units of the reference tensor's RMS.
    pub atol: f64,
    /// Relative part, in units of the reference element.
    pub rtol: f64,
}

impl Tolerance {
    /// The default for a comparison at `dtype`: f32 (and f64 against an f32 dump) 1e-4 / 1e-4,
    /// two different f32 summation orders over a ViT-L's 24 blocks; bf16 5e-2 / 5e-2, two
    /// bf16 implementations that round at different points (8 mantissa bits: 4e-3 per
    /// rounding, compounded over the blocks).
    pub fn for_dtype(dtype: DType) -> Tolerance {
        match dtype {
            DType::BF16 => Tolerance {
                atol: 5e-2,
                rtol: 5e-2,
            },
            _ => Tolerance {
                atol: 1e-4,
                rtol: 1e-4,
            },
        }
    }
}

/// What to compare.
#[derive(Clone, Debug)]
pub struct ParityRequest {
    /// The Hugging Face CLIP folder the dump was made from.
    pub model: PathBuf,
    /// An SD2 checkpoint folder (`sd2 train`'s), when the dump was made with one.
    pub checkpoint: Option<PathBuf>,
    /// The dump (`dump_reference.py --out`).
    pub reference: PathBuf,
    /// Where sd2 runs.
    pub device: Device,
    /// sd2's compute dtype; None: the dump's (`float32` → f32, `bfloat16` → bf16).
    pub dtype: Option<DType>,
    /// None: [`Tolerance::for_dtype`].
    pub tolerance: Option<Tolerance>,
}

/// One tensor's comparison.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    /// The name both sides share.
    pub name: String,
    /// The reference's shape.
    pub shape: Vec<usize>,
    /// The largest |sd2 − reference| (∞ for a non-finite sd2 value).
    pub max_abs: f64,
    /// Where it is (row-major multi-index).
    pub index: Vec<usize>,
    /// The reference value there.
    pub reference: f64,
    /// sd2's value there.
    pub value: f64,
    /// The reference tensor's RMS.
    pub rms: f64,
    /// `max_abs / rms`.
    pub rel: f64,
    /// The largest ratio of an element's error to its bound (≤ 1 passes).
    pub worst_ratio: f64,
    /// Whether every element is within the bound.
    pub pass: bool,
    /// Why it failed without a number (a shape mismatch), if so.
    pub note: Option<String>,
}

/// The whole comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ParityReport {
    /// The dump compared against.
    pub reference: PathBuf,
    /// The dtype the dump was made in (its metadata).
    pub reference_dtype: String,
    /// The dtype sd2 ran in.
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    /// The bound applied.
    pub tolerance: Tolerance,
    /// One entry per compared tensor, in the dump's order (inputs first, when checked).
    pub tensors: Vec<TensorReport>,
    /// Reference tensors sd2 has no counterpart for (each a failure).
    pub unmatched: Vec<String>,
    /// What was not checked, and why (image files not found, say).
    pub notes: Vec<String>,
}

impl ParityReport {
    /// True when every tensor passed and every reference tensor was matched.
    pub fn passed(&self) -> bool {
        self.unmatched.is_empty() && self.tensors.iter().all(|t| t.pass)
    }

    /// The number of failed comparisons (tensors out of bounds plus unmatched names).
    pub fn failures(&self) -> usize {
        self.unmatched.len() + self.tensors.iter().filter(|t| !t.pass).count()
    }
}

impl TensorReport {
    /// A passing report with no error yet.
    fn new(name: &str, shape: Vec<usize>) -> TensorReport {
        TensorReport {
            name: name.to_string(),
            shape,
            max_abs: 0.0,
            index: vec![],
            reference: 0.0,
            value: 0.0,
            rms: 0.0,
            rel: 0.0,
            worst_ratio: 0.0,
            pass: true,
            note: None,
        }
    }
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&d.to_string())
}

fn dtype_of_dump(name: &str, path: &Path) -> Result<DType> {
    match name {
        "float32" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        "float64" => Ok(DType::F64),
        other => Err(Error::parse(
            path.display(),
            format!("metadata dtype `{other}`: expected float32 or bfloat16"),
        )),
    }
}

/// Compares `got` with `want` element by element under `tol`.
pub fn compare(name: &str, got: &Tensor, want: &Tensor, tol: Tolerance) -> Result<TensorReport> {
    let shape = want.dims().to_vec();
    let mut r = TensorReport::new(name, shape.clone());
    if got.dims() != want.dims() {
        r.pass = false;
        r.note = Some(format!("sd2's shape {:?}", got.dims()));
        r.max_abs = f64::INFINITY;
        r.worst_ratio = f64::INFINITY;
        return Ok(r);
    }
    let g = got.to_vec_f64()?;
    let w = want.to_vec_f64()?;
    let n = w.len().max(1) as f64;
    r.rms = (w.iter().map(|x| x * x).sum::<f64>() / n).sqrt();
    let mut worst = 0usize;
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let d = if a.is_finite() && b.is_finite() {
            (a - b).abs()
        } else {
            f64::INFINITY
        };
        let bound = tol.atol * r.rms + tol.rtol * b.abs();
        let ratio = if d == 0.0 {
            0.0
        } else if bound > 0.0 {
            d / bound
        } else {
            f64::INFINITY
        };
        r.worst_ratio = r.worst_ratio.max(ratio);
        if d > r.max_abs || (d.is_nan() && !r.max_abs.is_nan()) {
            r.max_abs = d;
            worst = i;
        }
    }
    if !w.is_empty() {
        r.index = unravel(worst, &shape);
        r.reference = w[worst];
        r.value = g[worst];
    }
    r.rel = if r.rms > 0.0 {
        r.max_abs / r.rms
    } else if r.max_abs == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    r.pass = r.worst_ratio <= 1.0;
    Ok(r)
}

fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            idx[k] = i % d;
            i /= d;
        }
    }
    idx
}

/// The class phrases' tokens in the dump against sd2's tokenizer: each row up to and including
/// its first EOT must be equal.
fn check_tokens(ids: &Tensor, path: &Path) -> Result<TensorReport> {
    let tok = ClipTokenizer::openai()?;
    let texts = TypeTexts::shipped()?;
    let phrases = texts.test_phrases();
    let dims = ids.dims().to_vec();
    let mut r = TensorReport::new("inputs.input_ids", dims.clone());
    if dims.len() != 2 || dims[0] != phrases.len() {
        r.pass = false;
        r.note = Some(format!(
            "expected [{}, L] (one row per class phrase)",
            phrases.len()
        ));
        return Ok(r);
    }
    let want = ids.to_vec_f64()?;
    let eot = f64::from(tok.eot());
    for (row, phrase) in phrases.iter().enumerate() {
        let mut ours = tok.tokenize(phrase, 77)?;
        ours.truncate(
            ours.iter()
                .position(|&t| t == tok.eot())
                .map_or(ours.len(), |p| p + 1),
        );
        let theirs = &want[row * dims[1]..(row + 1) * dims[1]];
        let end = theirs
            .iter()
            .position(|&t| t == eot)
            .map(|p| p + 1)
            .unwrap_or(theirs.len());
        let theirs = &theirs[..end];
        let first_diff = (0..theirs.len().max(ours.len()))
            .find(|&j| theirs.get(j).copied() != ours.get(j).map(|&t| f64::from(t)));
        if let Some(j) = first_diff {
            r.pass = false;
            r.max_abs = f64::INFINITY;
            r.worst_ratio = f64::INFINITY;
            r.index = vec![row, j];
            r.reference = theirs.get(j).copied().unwrap_or(f64::NAN);
            r.value = ours.get(j).map(|&t| f64::from(t)).unwrap_or(f64::NAN);
            r.note = Some(format!(
                "{}: class phrase {row} ({phrase:?}) tokenizes differently from token {j} on",
                path.display()
            ));
            break;
        }
    }
    Ok(r)
}

/// Runs sd2 on the dump's inputs and compares every tensor the dump has.
pub fn run(r: &ParityRequest) -> Result<ParityReport> {
    r.device.check_available()?;
    let meta = crate::io::metadata(&r.reference)?;
    match meta.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        other => {
            return Err(Error::parse(
                r.reference.display(),
                format!(
                    "metadata format {other:?}: expected {FORMAT:?} (a dump from \
                     scripts/reference/dump_reference.py)"
                ),
            ))
        }
    }
    let ref_dtype_name = meta
        .get("dtype")
        .cloned()
        .unwrap_or_else(|| "float32".into());
    let ref_dtype = dtype_of_dump(&ref_dtype_name, &r.reference)?;
    let dtype = r.dtype.unwrap_or(ref_dtype);
    // The looser of the two: an f64 run against an f32 dump is held to f32's bound.
    let tolerance = r.tolerance.unwrap_or_else(|| {
        let a = Tolerance::for_dtype(dtype);
        let b = Tolerance::for_dtype(ref_dtype);
        if a.atol >= b.atol {
            a
        } else {
            b
        }
    });
    let dump = crate::io::load(&r.reference, Device::Cpu)?;
    let find = |name: &str| -> Result<&Tensor> {
        dump.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::checkpoint(&r.reference, format!("no tensor `{name}`")))
    };
    let pixels = find("inputs.pixel_values")?;
    let ids = find("inputs.input_ids")?;
    if pixels.rank() != 4 || ids.rank() != 2 {
        return Err(Error::checkpoint(
            &r.reference,
            format!(
                "inputs.pixel_values {:?} / inputs.input_ids {:?}: expected [N, 3, S, S] / [5, L]",
                pixels.dims(),
                ids.dims()
            ),
        ));
    }
    let mut report = ParityReport {
        reference: r.reference.clone(),
        reference_dtype: ref_dtype_name,
        dtype,
        tolerance,
        tensors: vec![],
        unmatched: vec![],
        notes: vec![],
    };
    report.tensors.push(check_tokens(ids, &r.reference)?);
    check_preprocessing(&meta, pixels, &r.reference, &mut report)?;

    let detector = match &r.checkpoint {
        Some(c) => Some(
            Detector::builder(c)
                .clip(&r.model)
                .device(r.device)
                .dtype(dtype)
                .build()?,
        ),
        None => None,
    };
    let owned;
    let clip: &ClipModel = match &detector {
        Some(d) => &d.model.clip,
        None => {
            owned = ClipModel::load(&r.model, dtype, r.device)?;
            &owned
        }
    };
    let ours = forward(
        clip,
        detector.as_ref().map(|d| &d.model),
        pixels,
        ids,
        dtype,
        r.device,
    )?;
    for (name, want) in &dump {
        if name.starts_with("inputs.") {
            continue;
        }
        match ours.get(name.as_str()) {
            Some(got) => report.tensors.push(compare(name, got, want, tolerance)?),
            None => report.unmatched.push(name.clone()),
        }
    }
    if r.checkpoint.is_none() && report.unmatched.iter().any(|n| n.starts_with("sd2.")) {
        report
            .notes
            .push("the dump has sd2.* tensors: give the checkpoint it was made with".into());
    }
    Ok(report)
}

/// sd2's tensors under the dump's names.
fn forward(
    clip: &ClipModel,
    model: Option<&crate::Sd2Model>,
    pixels: &Tensor,
    ids: &Tensor,
    dtype: DType,
    device: Device,
) -> Result<BTreeMap<String, Tensor>> {
    let _g = crate::no_grad();
    let fwd = Fwd::default();
    let mut out = BTreeMap::new();
    let px = pixels.to_dtype(dtype)?.to_device(device)?;
    let ids = ids.to_device(device)?;
    let vo = clip.vision.forward(
        &px,
        TowerOptions {
            hidden_states: true,
            layer_cls: model.is_some_and(|m| m.clam.is_some()),
        },
        fwd,
    )?;
    let f_final = clip.visual_projection.forward(&vo.pooled, fwd)?;
    for (i, h) in vo.hidden_states.iter().enumerate() {
        out.insert(format!("vision.hidden_states.{i}"), h.clone());
    }
    out.insert("vision.pooled".into(), vo.pooled.clone());
    out.insert("vision.image_embeds".into(), f_final.clone());
    let to = clip.text.forward(
        &ids,
        TowerOptions {
            hidden_states: true,
            layer_cls: false,
        },
        fwd,
    )?;
    for (i, h) in to.hidden_states.iter().enumerate() {
        out.insert(format!("text.hidden_states.{i}"), h.clone());
    }
    if let Some(h) = &to.last_hidden_state {
        out.insert("text.last_hidden_state".into(), h.clone());
    }
    let text_embeds = clip.text_projection.forward(&to.pooled, fwd)?;
    out.insert("text.pooled".into(), to.pooled.clone());
    out.insert("text.text_embeds".into(), text_embeds.clone());
    if let Some(m) = model {
        let f = match (&m.clam, &m.adapter) {
            (Some(c), Some(a)) => {
                let f_sat = c.forward(&vo.layer_cls, &clip.vision.post_layernorm)?;
                let f = a.forward(&f_sat, &f_final)?;
                out.insert("sd2.clam".into(), f_sat);
                f
            }
            _ => f_final,
        };
        let master = m.master_dtype();
        let u = text_embeds.to_dtype(master)?.l2_normalize()?;
        let logits = m.logits(&f.to_dtype(master)?.l2_normalize()?, &u)?;
        out.insert("sd2.image_features".into(), f);
        out.insert("sd2.class_embeddings".into(), u);
        out.insert("sd2.probs".into(), logits.softmax_last()?);
        out.insert("sd2.logits".into(), logits);
    }
    Ok(out)
}

/// sd2's preprocessing of the dump's image files (metadata `images`, a JSON list of paths as
/// given to the script) against `inputs.pixel_values`; a note when they cannot be found.
fn check_preprocessing(
    meta: &std::collections::HashMap<String, String>,
    pixels: &Tensor,
    path: &Path,
    report: &mut ParityReport,
) -> Result<()> {
    let images: Vec<String> = match meta.get("images") {
        None => return Ok(()),
        Some(s) => serde_json::from_str(s)
            .map_err(|e| Error::parse(path.display(), format!("metadata images: {e}")))?,
    };
    if images.is_empty() {
        return Ok(());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut found = vec![];
    for im in &images {
        let p = Path::new(im);
        let cands = [p.to_path_buf(), base.join(p)];
        match cands.into_iter().find(|c| c.is_file()) {
            Some(c) => found.push(c),
            None => {
                report.notes.push(format!(
                    "preprocessing not checked: {im} not found (from here or beside the dump)"
                ));
                return Ok(());
            }
        }
    }
    let size = pixels.dims()[2];
    if found.len() != pixels.dims()[0] || pixels.dims()[3] != size {
        report.notes.push(format!(
            "preprocessing not checked: {} images for pixel_values {:?}",
            found.len(),
            pixels.dims()
        ));
        return Ok(());
    }
    let mut all = Vec::with_capacity(pixels.elem_count());
    for p in &found {
        all.extend(preprocess::decode_image_then(p, |img| {
            Ok(preprocess::preprocess(&img, size))
        })?);
    }
    let ours = Tensor::from_vec(all, pixels.dims().to_vec(), Device::Cpu)?;
    // Both sides resize in 8 bits, but JPEG decoders differ by a level here and there (PIL's
    // libjpeg against zune-jpeg): the bound is 2 levels, in normalized units at the smallest
    // channel std (CLIP's 0.2613).
    let want = pixels.to_vec_f64()?;
    let rms = (want.iter().map(|x| x * x).sum::<f64>() / want.len().max(1) as f64).sqrt();
    let bound = PIXEL_LEVELS / 255.0 / 0.261_302_58;
    let mut t = compare(
        "inputs.pixel_values",
        &ours,
        pixels,
        Tolerance {
            atol: if rms > 0.0 { bound / rms } else { bound },
            rtol: 0.0,
        },
    )?;
    if t.note.is_none() {
        t.note = Some(format!(
            "bound {PIXEL_LEVELS} levels of 8 bits; worst {:.2}",
            t.max_abs * 255.0 * 0.261_302_58
        ));
    }
    report.tensors.push(t);
    Ok(())
}

/// The preprocessing bound, in 8-bit levels.
const PIXEL_LEVELS: f64 = 2.0;

/// The report as the text table `sd2 parity` prints.
pub fn format_report(r: &ParityReport) -> String {
    let mut s = format!(
        "{} ({} dump) vs sd2 in {}: pass when |Δ| ≤ {:e}·rms(ref) + {:e}·|ref|\n",
        r.reference.display(),
        r.reference_dtype,
        r.dtype,
        r.tolerance.atol,
        r.tolerance.rtol
    );
    s.push_str(&format!(
        "{:<28} {:>16} {:>10} {:>10} {:>7} {:>18} {:>12} {:>12}  result\n",
        "tensor", "shape", "max |Δ|", "/rms", "ratio", "at", "ref", "sd2"
    ));
    for t in &r.tensors {
        let shape = format!("{:?}", t.shape);
        let at = format!("{:?}", t.index);
        s.push_str(&format!(
            "{:<28} {:>16} {:>10.3e} {:>10.3e} {:>7.3} {:>18} {:>12.5e} {:>12.5e}  {}{}\n",
            t.name,
            shape,
            t.max_abs,
            t.rel,
            t.worst_ratio,
            at,
            t.reference,
            t.value,
            if t.pass { "ok" } else { "FAIL" },
            t.note
                .as_ref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        ));
    }
    for n in &r.unmatched {
        s.push_str(&format!("{n:<28} no sd2 counterpart  FAIL\n"));
    }
    for n in &r.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s.push_str(&format!(
        "{}: {} compared, {} failed\n",
        if r.passed() { "PASS" } else { "FAIL" },
        r.tensors.len() + r.unmatched.len(),
        r.failures()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_finds_the_worst_element_and_applies_the_bound() {
        let want = Tensor::from_vec(vec![1.0f32, -2.0, 3.0, 100.0], (2, 2), Device::Cpu).unwrap();
        let got = Tensor::from_vec(vec![1.0f32, -2.0, 3.5, 100.0], (2, 2), Device::Cpu).unwrap();
        let rms = ((1.0 + 4.0 + 9.0 + 10000.0) / 4.0f64).sqrt();
        let r = compare(
            "t",
            &got,
            &want,
            Tolerance {
                atol: 1e-2,
                rtol: 0.0,
            },
        )
        .unwrap();
        assert_eq!(r.index, vec![1, 0]);
        assert!((r.max_abs - 0.5).abs() < 1e-12 && (r.rms - rms).abs() < 1e-9);
        assert!((r.worst_ratio - 0.5 / (1e-2 * rms)).abs() < 1e-9);
        assert!(r.pass, "0.5 ≤ 0.01·{rms}");
        let tight = Tolerance {
            atol: 1e-3,
            rtol: 1e-3,
        };
        let r = compare("t", &got, &want, tight).unwrap();
        assert!(!r.pass && r.worst_ratio > 1.0);
        // A non-finite sd2 value fails whatever the bound.
        let nan =
            Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0, 100.0], (2, 2), Device::Cpu).unwrap();
        let r = compare(
            "t",
            &nan,
            &want,
            Tolerance {
                atol: 1e9,
                rtol: 1e9,
            },
        )
        .unwrap();
        assert!(!r.pass && r.index == vec![0, 1], "{r:?}");
        // A shape mismatch is a failure with a note, not an error.
        let flat = want.reshape(4).unwrap();
        let r = compare("t", &flat, &want, tight).unwrap();
        assert!(!r.pass && r.note.is_some());
    }

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(0, &[2, 3, 4]), vec![0, 0, 0]);
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        assert_eq!(unravel(5, &[2, 3, 4]), vec![0, 1, 1]);
    }
}

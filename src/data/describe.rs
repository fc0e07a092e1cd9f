//! `sd2 describe`: face and environment descriptions for images that have none, by zero-shot
//! CLIP attribute selection. This is **our substitute for the paper's VLM**, whose
//! descriptions we cannot reproduce: for each attribute of a fixed, documented vocabulary
//! (`VOCABULARY`: age, gender presentation, hair, expression, glasses, pose; setting,
//! lighting, background), each option becomes a prompt, CLIP scores the image against the
//! prompts (softmax of `exp(logit_scale)·cos`), and the best option is kept with its
//! probability. The chosen options are then composed into two sentences in the style of the
//! paper's descriptions ("a young adult man with short dark hair, smiling, wearing glasses,
//! facing the camera"; "indoors, in soft indoor light, in front of a plain wall").
//!
//! What it can and cannot say is bounded by the vocabulary: it never hallucinates beyond it,
//! and it says nothing it was not asked. Gender presentation is CLIP's guess from appearance,
//! not anyone's identity. On face crops (most deepfake datasets) the environment attributes
//! see little background, and their scores say so.
use std::path::Path;

use serde::Serialize;

use crate::clip::{preprocess, ClipModel, ClipTokenizer};
use crate::{DType, Device, Error, Result, Tensor};

/// Which description an attribute goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// The face sentence (age, gender presentation, hair, expression, glasses, pose).
    Face,
    /// The environment sentence (setting, lighting, background).
    Env,
}

/// One attribute: a prompt template (`{}` is an option's prompt phrase) and its options as
/// (prompt phrase, phrase used in the sentence).
#[derive(Clone, Copy, Debug)]
pub struct Attribute {
    /// Attribute key (`age`, `hair`, …), by which [`compose`] looks the choice up.
    pub name: &'static str,
    /// Which of the two descriptions the choice goes into.
    pub part: Part,
    /// Prompt template; `{}` is replaced by each option's prompt phrase.
    pub template: &'static str,
    /// (prompt phrase, sentence phrase) per option. The sentence phrase may be shorter, or
    /// empty (`no glasses`), and then the sentence leaves the attribute out.
    pub options: &'static [(&'static str, &'static str)],
}

impl Attribute {
    /// One prompt per option: the template filled with its prompt phrase.
    pub fn prompts(&self) -> Vec<String> {
        self.options
            .iter()
            .map(|o| self.template.replace("{}", o.0))
            .collect()
    }
}

/// The attribute vocabularies, in the order the sentences use them.
pub const VOCABULARY: &[Attribute] = &[
    Attribute {
        name: "age",
        part: Part::Face,
        template: "a photo of the face of {}.",
        options: &[
            ("a child", "a child"),
            ("a teenager", "a teenager"),
            ("a young adult", "a young adult"),
            ("a middle-aged adult", "a middle-aged adult"),
            ("an elderly person", "an elderly person"),
        ],
    },
    Attribute {
        name: "gender_presentation",
        part: Part::Face,
        template: "a photo of the face of a {}.",
        options: &[("man", "man"), ("woman", "woman")],
    },
    Attribute {
        name: "hair",
        part: Part::Face,
        template: "a photo of a person with {}.",
        options: &[
            ("short dark hair", "short dark hair"),
            ("long dark hair", "long dark hair"),
            ("short blond hair", "short blond hair"),
            ("long blond hair", "long blond hair"),
            ("red hair", "red hair"),
            ("gray hair", "gray hair"),
            ("a bald head", "a bald head"),
        ],
    },
    Attribute {
        name: "expression",
        part: Part::Face,
        template: "a photo of a person with {}.",
        options: &[
            ("a neutral expression", "a neutral expression"),
            ("a smile", "smiling"),
            ("an open mouth, talking", "talking"),
            ("a serious frown", "frowning"),
            ("a surprised expression", "looking surprised"),
        ],
    },
    Attribute {
        name: "glasses",
        part: Part::Face,
        template: "a photo of a person wearing {}.",
        options: &[
            ("no glasses", ""),
            ("eyeglasses", "wearing glasses"),
            ("sunglasses", "wearing sunglasses"),
        ],
    },
    Attribute {
        name: "pose",
        part: Part::Face,
        template: "a photo of a face {}.",
        options: &[
            ("looking straight at the camera", "facing the camera"),
            ("turned slightly to the side", "turned slightly to the side"),
            ("in profile", "in profile"),
        ],
    },
    Attribute {
        name: "setting",
        part: Part::Env,
        template: "a photo taken {}.",
        options: &[("indoors", "indoors"), ("outdoors", "outdoors")],
    },
    Attribute {
        name: "lighting",
        part: Part::Env,
        template: "a photo taken in {}.",
        options: &[
            ("bright daylight", "bright daylight"),
            ("soft indoor light", "soft indoor light"),
            ("dim light", "dim light"),
            ("studio lighting", "studio lighting"),
            ("harsh direct light", "harsh direct light"),
        ],
    },
    Attribute {
        name: "background",
        part: Part::Env,
        template: "a photo of a person in front of {}.",
        options: &[
            ("a plain wall", "a plain wall"),
            ("a room interior", "a room interior"),
            ("a television studio set", "a studio set"),
            ("a city street", "a city street"),
            ("trees and nature", "trees and nature"),
            ("a crowd of people", "a crowd"),
            ("a blurred background", "a blurred background"),
        ],
    },
];

/// One attribute's choice: the option kept and its probability among the attribute's options.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Chosen {
    /// The attribute's [`Attribute::name`].
    pub attribute: &'static str,
    /// The chosen option's prompt phrase (the first element of its `options` pair).
    pub value: &'static str,
    /// Softmax probability of that option among the attribute's options, in [0, 1].
    pub score: f32,
}

/// An image's two descriptions and the choices they were made from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Description {
    /// Face sentence, e.g. "a young adult man with short dark hair, smiling".
    pub face: String,
    /// Environment sentence, e.g. "indoors, in soft indoor light, in front of a plain wall".
    pub env: String,
    /// One choice per attribute of [`VOCABULARY`], in its order.
    pub attributes: Vec<Chosen>,
}

/// The option of `options` (rows of unit vectors) closest to unit vector `image`, and its
/// softmax probability at `scale` (CLIP's `exp(logit_scale)`).
pub fn choose(image: &[f32], options: &[Vec<f32>], scale: f32) -> (usize, f32) {
    let logits: Vec<f32> = options
        .iter()
        .map(|o| scale * o.iter().zip(image).map(|(a, b)| a * b).sum::<f32>())
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    let (best, l) =
        logits.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, l)| if *l > b.1 { (i, *l) } else { b },
        );
    (best, (l - max).exp() / z)
}

/// The two sentences from one choice per attribute of `VOCABULARY` (in its order).
pub fn compose(chosen: &[Chosen]) -> (String, String) {
    let pick = |name: &str| {
        VOCABULARY
            .iter()
            .find(|a| a.name == name)
            .and_then(|a| {
                let c = chosen.iter().find(|c| c.attribute == name)?;
                a.options.iter().find(|o| o.0 == c.value).map(|o| o.1)
            })
            .unwrap_or("")
    };
    let mut face = format!("{} {}", pick("age"), pick("gender_presentation"));
    // "a child man" reads wrong: the age phrase names the person, the gender qualifies it.
    if ["a child", "a teenager", "an elderly person"].contains(&pick("age")) {
        face = format!(
            "{} ({})",
            pick("age"),
            if pick("gender_presentation") == "man" {
                "male-presenting"
            } else {
                "female-presenting"
            }
        );
    }
    face.push_str(&format!(" with {}", pick("hair")));
    for part in [pick("expression"), pick("glasses"), pick("pose")] {
        if !part.is_empty() {
            face.push_str(", ");
            face.push_str(part);
        }
    }
    let env = format!(
        "{}, in {}, in front of {}",
        pick("setting"),
        pick("lighting"),
        pick("background")
    );
    (face, env)
}

fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter().map(|x| x / n).collect()
}

/// A CLIP model with the vocabulary's prompts embedded once.
pub struct Describer {
    clip: ClipModel,
    /// Per attribute, its options' unit text embeddings.
    prompts: Vec<Vec<Vec<f32>>>,
    scale: f32,
}

impl Describer {
    /// Embeds every prompt of `VOCABULARY` with `clip`.
    pub fn new(clip: ClipModel) -> Result<Describer> {
        let _g = crate::no_grad();
        let tk = ClipTokenizer::openai()?;
        let ctx = clip.config.text_config.max_position_embeddings;
        let device = clip.logit_scale.device();
        let mut prompts = vec![];
        for a in VOCABULARY {
            let texts = a.prompts();
            let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
            let e = clip.text_embeds(&tk.tokenize_batch_longest(&refs, ctx, device)?)?;
            let dim = e.dims()[1];
            let v: Vec<f32> = e.to_dtype(DType::F32)?.to_vec()?;
            prompts.push(v.chunks(dim).map(unit).collect());
        }
        let scale = clip.logit_scale.to_dtype(DType::F32)?.to_vec::<f32>()?[0].exp();
        Ok(Describer {
            clip,
            prompts,
            scale,
        })
    }

    /// The model input side.
    pub fn image_size(&self) -> usize {
        self.clip.config.vision_config.image_size
    }

    /// Descriptions of preprocessed images `pixels` [N, 3, S, S].
    pub fn describe(&self, pixels: &Tensor) -> Result<Vec<Description>> {
        let _g = crate::no_grad();
        let e = self.clip.image_embeds(pixels)?;
        let dim = e.dims()[1];
        let v: Vec<f32> = e.to_dtype(DType::F32)?.to_vec()?;
        Ok(v.chunks(dim)
            .map(|img| {
                let img = unit(img);
                let attributes: Vec<Chosen> = VOCABULARY
                    .iter()
                    .zip(&self.prompts)
                    .map(|(a, p)| {
                        let (i, score) = choose(&img, p, self.scale);
                        Chosen {
                            attribute: a.name,
                            value: a.options[i].0,
                            score,
                        }
                    })
                    .collect();
                let (face, env) = compose(&attributes);
                Description {
                    face,
                    env,
                    attributes,
                }
            })
            .collect())
    }
}

/// A manifest line as it will be written back.
enum Line {
    Record(serde_json::Map<String, serde_json::Value>),
    Raw(String),
}

/// What `describe_manifest` did.
#[derive(Clone, Debug, Default)]
pub struct Described {
    /// Lines given new descriptions.
    pub described: usize,
    /// Lines that had both descriptions and were kept as they were.
    pub kept: usize,
    /// Lines whose image could not be read (`skip_bad`), with why; written unchanged.
    pub bad: Vec<(usize, String)>,
}

/// Writes `out`: `manifest` with `face`/`env` filled in for every line that lacks either (all
/// lines with `all`), each described line also carrying `describe` (per attribute, the option
/// chosen and its probability). Other fields are kept; paths are rewritten absolute when
/// `out` is in another folder. An unreadable image fails the call naming its line, unless
/// `skip_bad`.
pub fn describe_manifest(
    d: &Describer,
    manifest: &Path,
    out: &Path,
    device: Device,
    batch: usize,
    all: bool,
    skip_bad: bool,
) -> Result<Described> {
    let text = std::fs::read_to_string(manifest).map_err(|e| Error::read(manifest, e))?;
    let dir = manifest.parent().unwrap_or(Path::new("."));
    let same_dir = out.parent().unwrap_or(Path::new(".")) == dir
        || (out.parent().is_some_and(|p| p.as_os_str().is_empty()) && dir.as_os_str().is_empty());
    // Blank lines stay (manifest line numbers seed augmentations and name errors); a line
    // that is not a record fails the call, or with `skip_bad` is written back as it was.
    let mut lines: Vec<Line> = vec![];
    let mut todo: Vec<usize> = vec![];
    let mut report = Described::default();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            lines.push(Line::Raw(raw.to_string()));
            continue;
        }
        let parsed = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| match v.get("path") {
                Some(serde_json::Value::String(p)) => Ok((p.clone(), v)),
                Some(_) => Err("field `path` must be a string".into()),
                None => Err("missing field `path`".into()),
            });
        let (path, mut v) = match parsed {
            Ok(x) => x,
            Err(why) if skip_bad => {
                report.bad.push((i + 1, why));
                lines.push(Line::Raw(raw.to_string()));
                continue;
            }
            Err(why) => {
                return Err(Error::parse(
                    format!("{}:{}", manifest.display(), i + 1),
                    why,
                ))
            }
        };
        if !same_dir {
            let abs = std::path::absolute(dir.join(&path)).unwrap_or_else(|_| dir.join(&path));
            v.insert("path".into(), abs.display().to_string().into());
        }
        let has = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .is_some_and(|s| !s.trim().is_empty())
        };
        if all || !has("face") || !has("env") {
            todo.push(i);
        } else {
            report.kept += 1;
        }
        lines.push(Line::Record(v));
    }
    let size = d.image_size();
    for chunk in todo.chunks(batch.max(1)) {
        let mut px = Vec::with_capacity(chunk.len() * 3 * size * size);
        let mut ok = vec![];
        for &i in chunk {
            let rel = match &lines[i] {
                Line::Record(v) => v.get("path").and_then(|p| p.as_str()).unwrap_or_default(),
                Line::Raw(_) => "",
            }
            .to_string();
            let path = dir.join(&rel);
            match preprocess::decode_image_then(&path, |img| Ok(preprocess::preprocess(&img, size)))
            {
                Ok(p) => {
                    px.extend(p);
                    ok.push(i);
                }
                Err(e) if skip_bad => report.bad.push((i + 1, e.to_string())),
                Err(e) => return Err(Error::Msg(format!("{}:{}: {e}", manifest.display(), i + 1))),
            }
        }
        if ok.is_empty() {
            continue;
        }
        let t = Tensor::from_vec(px, (ok.len(), 3, size, size), Device::Cpu)?
            .to_dtype(d.clip.logit_scale.dtype())?
            .to_device(device)?;
        for (&i, desc) in ok.iter().zip(d.describe(&t)?) {
            if let Line::Record(v) = &mut lines[i] {
                v.insert("face".into(), desc.face.into());
                v.insert("env".into(), desc.env.into());
                let attrs: serde_json::Map<String, serde_json::Value> = desc
                    .attributes
                    .iter()
                    .map(|c| {
                        (
                            c.attribute.to_string(),
                            serde_json::json!({"value": c.value, "score": c.score}),
                        )
                    })
                    .collect();
                v.insert("describe".into(), serde_json::Value::Object(attrs));
            }
            report.described += 1;
        }
    }
    let mut body = String::new();
    for l in lines {
        match l {
            Line::Record(v) => body.push_str(&serde_json::Value::Object(v).to_string()),
            Line::Raw(r) => body.push_str(&r),
        }
        body.push('\n');
    }
    crate::fs::write_atomic(out, body)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_takes_the_closest_option_with_its_probability() {
        let opts = vec![vec![1.0, 0.0], vec![0.0, 1.0], unit(&[1.0, 1.0])];
        let (i, p) = choose(&unit(&[0.2, 1.0]), &opts, 100.0);
        assert_eq!(i, 1);
        // By hand: logits 100·cos with each option, softmax.
        let img = unit(&[0.2, 1.0]);
        let l: Vec<f32> = opts
            .iter()
            .map(|o| 100.0 * (o[0] * img[0] + o[1] * img[1]))
            .collect();
        let want = 1.0 / l.iter().map(|x| (x - l[1]).exp()).sum::<f32>();
        assert!((p - want).abs() < 1e-5, "{p} vs {want}");
        // Far-apart logits: the best option is certain.
        assert_eq!(choose(&[1.0, 0.0], &opts[..2], 100.0), (0, 1.0));
    }

    #[test]
    fn sentences_are_composed_from_every_attribute() {
        let pick = |a: &'static str, v: &'static str| Chosen {
            attribute: a,
            value: v,
            score: 0.5,
        };
        let c = vec![
            pick("age", "a young adult"),
            pick("gender_presentation", "woman"),
            pick("hair", "long blond hair"),
            pick("expression", "a smile"),
            pick("glasses", "no glasses"),
            pick("pose", "in profile"),
            pick("setting", "outdoors"),
            pick("lighting", "bright daylight"),
            pick("background", "a city street"),
        ];
        let (f, e) = compose(&c);
        assert_eq!(
            f,
            "a young adult woman with long blond hair, smiling, in profile"
        );
        assert_eq!(e, "outdoors, in bright daylight, in front of a city street");
        let mut c2 = c.clone();
        c2[0] = pick("age", "a child");
        c2[4] = pick("glasses", "eyeglasses");
        assert_eq!(
            compose(&c2).0,
            "a child (female-presenting) with long blond hair, smiling, wearing glasses, in profile"
        );
        // Every option of every attribute is reachable and named once.
        for a in VOCABULARY {
            let mut seen = std::collections::BTreeSet::new();
            for o in a.options {
                assert!(seen.insert(o.0), "{}: {} twice", a.name, o.0);
                assert!(a.template.contains("{}"));
            }
        }
    }
}

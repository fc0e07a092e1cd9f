//! Type texts (SD2-SPEC §3): a pool of phrasings per class (shipped in `type_texts.json`), one
//! sampled per class each training step; a fixed simple phrase per class at test time.
use serde::Deserialize;

use crate::rng::Rng;
use crate::{Error, Result};

/// The five classes, in label order.
pub const CLASSES: [&str; 5] = ["real", "fs", "fr", "efs", "fe"];

const SHIPPED: &str = include_str!("type_texts.json");

#[derive(Clone, Debug, Deserialize)]
struct Raw {
    classes: Vec<String>,
    test: std::collections::HashMap<String, String>,
    train: std::collections::HashMap<String, Vec<String>>,
}

/// The class phrasings SD2 uses as text prototypes: for each of the five classes (in [`CLASSES`]
/// order) a pool of training phrasings and one test phrase. [`TypeTexts::shipped`] gives the
/// crate's own.
#[derive(Clone, Debug)]
pub struct TypeTexts {
    /// Per class (label order): its training phrasings.
    pub train: Vec<Vec<String>>,
    /// Per class: the evaluation phrase.
    pub test: Vec<String>,
}

impl TypeTexts {
    /// The pools shipped with sd2.
    pub fn shipped() -> Result<TypeTexts> {
        Self::from_json(SHIPPED)
    }

    /// Parses a type-texts JSON object: `classes` (exactly [`CLASSES`], in order), `train` (class →
    /// non-empty list of phrasings) and `test` (class → one phrase). Errors are `Error::Parse` naming
    /// what is missing or wrong.
    pub fn from_json(text: &str) -> Result<TypeTexts> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| Error::parse("type texts", e))?;
        if raw.classes != CLASSES {
            return Err(Error::parse(
                "type texts",
                format!("classes {:?}, expected {:?}", raw.classes, CLASSES),
            ));
        }
        let mut train = vec![];
        let mut test = vec![];
        for c in CLASSES {
            let pool = raw.train.get(c).cloned().unwrap_or_default();
            if pool.is_empty() {
                return Err(Error::parse(
                    "type texts",
                    format!("no training phrasings for class {c}"),
                ));
            }
            train.push(pool);
            test.push(raw.test.get(c).cloned().ok_or_else(|| {
                Error::parse("type texts", format!("no test phrase for class {c}"))
            })?);
        }
        Ok(TypeTexts { train, test })
    }

    /// One phrasing per class, drawn from `rng`.
    pub fn sample(&self, rng: &mut Rng) -> Vec<&str> {
        self.train
            .iter()
            .map(|pool| pool[rng.below(pool.len())].as_str())
            .collect()
    }

    /// The test phrase of each class, in label order: what the detector classifies against, and
    /// what training uses when `sample_type_texts` is off.
    pub fn test_phrases(&self) -> Vec<&str> {
        self.test.iter().map(|s| s.as_str()).collect()
    }
}

/// Label id of a class name.
pub fn class_id(name: &str) -> Option<usize> {
    CLASSES.iter().position(|c| *c == name)
}

//! OpenAI CLIP's byte-level BPE (`bpe_simple_vocab_16e6`), through the `tokenizers` crate.
//! Ids are identical to open_clip's `tokenize()`: text cleaned as `_clean_lower`, split by
//! CLIP's regex, bytes mapped to unicode, BPE with `</w>` word ends, then
//! `<|startoftext|>` (49406) … `<|endoftext|>` (49407), truncated keeping EOT last, padded
//! with 0. A HuggingFace `tokenizer.json` is accepted as well.
use std::io::Read;
use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::text_clean::clean_lower;
use crate::{Device, Error, Result, Tensor};

/// The merges file shipped with the crate (MIT, OpenAI; also inside `open_clip_torch`).
pub const BPE_VOCAB_GZ: &[u8] = include_bytes!("bpe_simple_vocab_16e6.txt.gz");
/// Id of the start token in OpenAI's vocabulary (`<|startoftext|>` in HuggingFace's files), put
/// first in every tokenized text.
pub const SOT: u32 = 49406;
/// Id of the end token (`<|endoftext|>`), put last. It is the largest id, so the text tower finds
/// the pooling position as the first argmax of a row (`eos_positions`).
pub const EOT: u32 = 49407;
/// CLIP's text context in tokens, OpenAI's `max_position_embeddings`: the usual `context` for
/// `tokenize`.
pub const CONTEXT: usize = 77;

/// CLIP's pre-tokenizer pattern (open_clip's, with its two special tokens first).
const PATTERN: &str =
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's text tokenizer: text to BPE ids between a start and an end token, truncated and padded to
/// a context. [`ClipTokenizer::openai`] builds OpenAI's from the merges shipped in the crate (ids
/// identical to open_clip's); [`ClipTokenizer::from_file`] reads a HuggingFace `tokenizer.json`.
pub struct ClipTokenizer {
    inner: Tokenizer,
    sot: u32,
    eot: u32,
    /// Whether input text gets open_clip's cleaning here (a tokenizer.json brings its own
    /// normalizer instead).
    clean: bool,
}

/// GPT-2's reversible byte → printable-unicode map, in open_clip's vocabulary order (the
/// printable bytes first, then the rest shifted past U+0100).
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter().filter_map(char::from_u32).collect()
}

fn tk_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("tokenizer: {what}: {e}"))
}

impl ClipTokenizer {
    /// OpenAI's CLIP tokenizer, built from the merges file shipped in the crate.
    pub fn openai() -> Result<ClipTokenizer> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BPE_VOCAB_GZ)
            .read_to_string(&mut text)
            .map_err(|e| tk_err("reading the shipped BPE merges", e))?;
        Self::from_merges_text(&text)
    }

    /// Builds the tokenizer from the text of `bpe_simple_vocab_16e6.txt` (as open_clip does).
    pub fn from_merges_text(text: &str) -> Result<ClipTokenizer> {
        let lines: Vec<&str> = text.split('\n').collect();
        let n_merges = 49152 - 256 - 2;
        if lines.len() < n_merges + 1 {
            return Err(Error::parse(
                "tokenizer",
                format!(
                    "merges file has {} lines, expected ≥ {}",
                    lines.len(),
                    n_merges + 1
                ),
            ));
        }
        let mut merges = Vec::with_capacity(n_merges);
        for (i, l) in lines[1..=n_merges].iter().enumerate() {
            let mut it = l.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(Error::parse(
                        "tokenizer",
                        format!("merges line {} is not a pair: {l:?}", i + 2),
                    ))
                }
            }
        }
        let bu = bytes_to_unicode();
        let mut vocab: Vec<String> = bu.iter().map(|c| c.to_string()).collect();
        vocab.extend(bu.iter().map(|c| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        let map: tokenizers::models::bpe::Vocab = vocab
            .into_iter()
            .enumerate()
            .map(|(i, v)| (v, i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(map, merges)
            .end_of_word_suffix("</w>".into())
            .build()
            .map_err(|e| tk_err("building BPE", e))?;
        let mut tk = Tokenizer::new(bpe);
        let split = Split::new(
            SplitPattern::Regex(PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tk_err("compiling the pre-tokenizer regex", e))?;
        tk.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
        ])));
        tk.add_special_tokens(&[
            AddedToken::from("<start_of_text>", true),
            AddedToken::from("<end_of_text>", true),
        ]);
        Ok(ClipTokenizer {
            inner: tk,
            sot: SOT,
            eot: EOT,
            clean: true,
        })
    }

    /// A HuggingFace `tokenizer.json` (its own normalizer applies; no open_clip cleaning).
    pub fn from_file(path: &Path) -> Result<ClipTokenizer> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::parse("tokenizer", format!("{}: {e}", path.display())))?;
        let id = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let sot = id(&["<|startoftext|>", "<start_of_text>"]).ok_or_else(|| {
            Error::invalid(
                "tokenizer",
                format!("{} has no <|startoftext|> token", path.display()),
            )
        })?;
        let eot = id(&["<|endoftext|>", "<end_of_text>"]).ok_or_else(|| {
            Error::invalid(
                "tokenizer",
                format!("{} has no <|endoftext|> token", path.display()),
            )
        })?;
        Ok(ClipTokenizer {
            inner,
            sot,
            eot,
            clean: false,
        })
    }

    /// Id of the start token this tokenizer puts first ([`SOT`] for OpenAI's vocabulary).
    pub fn sot(&self) -> u32 {
        self.sot
    }

    /// Id of the end token it puts last ([`EOT`] for OpenAI's vocabulary). `tokenize_batch_longest`
    /// trims a batch to its longest row up to and including this token.
    pub fn eot(&self) -> u32 {
        self.eot
    }

    /// BPE ids of `text`, without start/end tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let t = if self.clean {
            clean_lower(text)
        } else {
            text.to_string()
        };
        let enc = self
            .inner
            .encode(t.as_str(), false)
            .map_err(|e| tk_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[SOT] + ids + [EOT]`, truncated to `context` keeping EOT last, padded with 0.
    pub fn tokenize(&self, text: &str, context: usize) -> Result<Vec<u32>> {
        if context < 2 {
            return Err(Error::invalid(
                "tokenizer",
                format!("context {context} cannot hold start and end tokens"),
            ));
        }
        let mut ids = Vec::with_capacity(context);
        ids.push(self.sot);
        ids.extend(self.encode(text)?);
        ids.push(self.eot);
        if ids.len() > context {
            ids.truncate(context);
            ids[context - 1] = self.eot;
        }
        ids.resize(context, 0);
        Ok(ids)
    }

    /// Each line's `tokenize` ids as a bracketed list, one line per text (`sd2 tokenize`, for
    /// comparing with open_clip's tokenizer).
    pub fn ids_lines(&self, lines: &[String], context: usize) -> Result<String> {
        let mut out = String::new();
        for line in lines {
            let ids = self.tokenize(line, context)?;
            let body: Vec<String> = ids.iter().map(|v| v.to_string()).collect();
            out.push('[');
            out.push_str(&body.join(", "));
            out.push_str("]\n");
        }
        Ok(out)
    }

    /// A batch as an i64 tensor [N, context].
    pub fn tokenize_batch(&self, texts: &[&str], context: usize, device: Device) -> Result<Tensor> {
        let mut all = Vec::with_capacity(texts.len() * context);
        for t in texts {
            all.extend(self.tokenize(t, context)?.into_iter().map(|v| v as i64));
        }
        Tensor::from_vec(all, (texts.len(), context), device)
    }

    /// Like `tokenize_batch`, but only as wide as the longest text (≤ `context`). The text tower
    /// is causal and pools at the EOT token, so the padding after the last EOT cannot change an
    /// embedding; dropping it saves most of the text tower's work on short descriptions.
    pub fn tokenize_batch_longest(
        &self,
        texts: &[&str],
        context: usize,
        device: Device,
    ) -> Result<Tensor> {
        let (all, width) = self.tokenize_batch_longest_host(texts, context)?;
        Tensor::from_vec(all, (texts.len(), width), device)
    }

    /// `tokenize_batch_longest` on the host: the ids row-major and the common width.
    pub fn tokenize_batch_longest_host(
        &self,
        texts: &[&str],
        context: usize,
    ) -> Result<(Vec<i64>, usize)> {
        let rows: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.tokenize(t, context))
            .collect::<Result<_>>()?;
        let width = rows
            .iter()
            .map(|r| {
                r.iter()
                    .position(|&v| v == self.eot)
                    .map_or(context, |p| p + 1)
            })
            .max()
            .unwrap_or(2);
        let all: Vec<i64> = rows
            .iter()
            .flat_map(|r| r[..width].iter().map(|&v| v as i64))
            .collect();
        Ok((all, width))
    }
}

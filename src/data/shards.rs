//! WebDataset shards: a dataset packed into `.tar` files that are read front to back, as
//! open_clip and img2dataset read theirs.
//!
//! `pack` writes, per split, `train-000000.tar`, `train-000001.tar`, …: each sample is two
//! consecutive tar entries sharing a key, `KEY.jpg` (or `.png`, `.webp`) and `KEY.json` (label,
//! source, split, video, descriptions, compression, and the manifest line it came from), the
//! key being that line number. Images can be face-cropped and resized while packing, so
//! training decodes small images. `shards.json` beside them lists the shards with their
//! sample counts and is written last: a folder without it is an unfinished pack.
//!
//! `ShardStream` reads one epoch: the split's shards in an order shuffled per epoch, split
//! between `world` parts (processes, GPUs) by shard, each read sequentially, samples mixed
//! across shard boundaries in a shuffle buffer. Every choice comes from (seed, epoch) and the
//! index alone, so the stream can start again mid-epoch (`skip`): the buffer's state at that
//! point is recomputed from the sample counts, its samples re-read by seeking, and the stream
//! goes on exactly as an uninterrupted one.
use std::collections::BTreeMap;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::manifest::{Item, Manifest, Split};
use crate::rng::Rng;
use crate::sd2::type_texts::{class_id, CLASSES};
use crate::{Error, Result};

/// The index's file name in a pack folder.
pub const INDEX: &str = "shards.json";
/// The index format this build writes and reads.
pub const FORMAT: &str = "sd2-shards/1";
/// Largest tar entry read (an image or its JSON): over it, the shard is refused.
pub const MAX_ENTRY_BYTES: u64 = 64 << 20;
/// Most bytes a shuffle buffer holds before the stream stops with an error (bounded memory
/// whatever a shard holds).
pub const MAX_BUFFER_BYTES: u64 = 4 << 30;

/// One shard in the index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// File name inside the pack folder.
    pub file: String,
    /// The split of every sample in the shard (a shard holds one split).
    pub split: Split,
    /// Number of samples (image + JSON entry pairs) in the shard.
    pub samples: usize,
    /// Size of the tar file in bytes; [`ShardIndex::load`] checks it against the file on
    /// disk.
    pub bytes: u64,
}

/// `shards.json`: what a pack holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    /// Format tag; [`ShardIndex::load`] reads only [`FORMAT`].
    pub format: String,
    /// Side of the stored images when they were resized (`None`: as in the source).
    pub size: Option<usize>,
    /// Whether the images are face crops.
    pub face_crop: bool,
    /// Whether every sample has both a face and an environment description (what
    /// `sd2.loss_dual` needs).
    pub described: bool,
    /// Every shard of every split, in the order they were written.
    pub shards: Vec<ShardInfo>,
    /// The pack folder (not stored: where the index was read from).
    #[serde(skip)]
    pub dir: PathBuf,
}

impl ShardIndex {
    /// Reads `path` (a pack folder or its `shards.json`), checking every entry: a known
    /// format, plain file names inside the folder that exist, sample counts their sizes can
    /// hold. Errors name the index and the shard.
    pub fn load(path: &Path) -> Result<ShardIndex> {
        let file = if path.is_dir() {
            path.join(INDEX)
        } else {
            path.to_path_buf()
        };
        let bad = |msg: String| Error::checkpoint(&file, msg);
        let len = std::fs::metadata(&file)
            .map_err(|e| {
                bad(format!(
                    "{e} (a pack folder holds {INDEX}, written by `sd2 pack`)"
                ))
            })?
            .len();
        if len > 64 << 20 {
            return Err(bad(format!("{len} bytes is too large for an index")));
        }
        let text = std::fs::read_to_string(&file).map_err(|e| Error::read(&file, e))?;
        let mut ix: ShardIndex =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a shard index: {e}")))?;
        if ix.format != FORMAT {
            return Err(bad(format!(
                "format `{}`; this build reads `{FORMAT}`",
                ix.format
            )));
        }
        ix.dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut names = std::collections::HashSet::new();
        for s in &ix.shards {
            if !names.insert(s.file.as_str()) {
                return Err(bad(format!("shard `{}` is listed twice", s.file)));
            }
            let at = |msg: String| bad(format!("shard `{}`: {msg}", s.file));
            if s.file.is_empty()
                || s.file.contains(['/', '\\'])
                || s.file.starts_with('.')
                || !s.file.ends_with(".tar")
            {
                return Err(at("the name must be a plain `.tar` file name".into()));
            }
            let on_disk = std::fs::metadata(ix.dir.join(&s.file))
                .map_err(|e| at(e.to_string()))?
                .len();
            if on_disk != s.bytes {
                return Err(at(format!(
                    "{on_disk} bytes on disk, the index says {}",
                    s.bytes
                )));
            }
            // Each sample is at least two entries of a header and a data block.
            if s.samples as u64 > s.bytes / 2048 {
                return Err(at(format!(
                    "{} samples cannot fit in {} bytes",
                    s.samples, s.bytes
                )));
            }
        }
        Ok(ix)
    }

    /// Samples in `split`.
    pub fn count(&self, split: Split) -> usize {
        self.shards
            .iter()
            .filter(|s| s.split == split)
            .map(|s| s.samples)
            .sum()
    }

    /// Total bytes of `split`'s shards.
    pub fn bytes(&self, split: Split) -> u64 {
        self.shards
            .iter()
            .filter(|s| s.split == split)
            .map(|s| s.bytes)
            .sum()
    }

    /// A digest of what the index lists (files, splits, counts, sizes): two packs with the
    /// same digest give the same streams.
    pub fn digest(&self) -> String {
        let mut x: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: &[u8]| {
            for c in b {
                x = (x ^ *c as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for s in &self.shards {
            eat(s.file.as_bytes());
            eat(format!(":{:?}:{}:{};", s.split, s.samples, s.bytes).as_bytes());
        }
        format!("{x:016x}")
    }

    /// Whether `path` names a pack (a folder with an index, or the index itself).
    pub fn is_pack(path: &Path) -> bool {
        path.join(INDEX).is_file() || path.file_name().is_some_and(|n| n == INDEX)
    }
}

// ---- tar, the parts WebDataset uses: regular files in ustar (long names via GNU or pax). --

fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// A ustar header for a regular file `name` (≤ 100 bytes) of `size` bytes.
fn header(name: &str, size: u64) -> Result<[u8; 512]> {
    if name.len() > 100 {
        return Err(Error::invalid(
            "tar",
            format!("entry name `{name}` over 100 bytes"),
        ));
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let mut put = |at: usize, len: usize, v: u64| {
        let s = format!("{v:0w$o}\0", w = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    put(100, 8, 0o644);
    put(108, 8, 0);
    put(116, 8, 0);
    put(124, 12, size);
    put(136, 12, 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|b| *b as u64).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// Appends one regular-file entry.
fn write_entry(w: &mut impl Write, name: &str, data: &[u8]) -> Result<u64> {
    let io = |e: std::io::Error| Error::Msg(format!("tar: {name}: {e}"));
    w.write_all(&header(name, data.len() as u64)?).map_err(io)?;
    w.write_all(data).map_err(io)?;
    let pad = (512 - data.len() % 512) % 512;
    w.write_all(&[0u8; 512][..pad]).map_err(io)?;
    Ok(512 + (data.len() + pad) as u64)
}

/// A tar read front to back, entry by entry; errors name the shard and the offset.
struct TarReader {
    r: BufReader<std::fs::File>,
    path: PathBuf,
    pos: u64,
}

/// One regular-file entry: its name and its data's length.
struct Entry {
    name: String,
    size: u64,
}

impl TarReader {
    fn open(path: &Path) -> Result<TarReader> {
        let f = std::fs::File::open(path).map_err(|e| Error::read(path, e))?;
        Ok(TarReader {
            r: BufReader::with_capacity(1 << 20, f),
            path: path.to_path_buf(),
            pos: 0,
        })
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::Media(format!(
            "{} at byte {}: {msg}",
            self.path.display(),
            self.pos
        ))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err("truncated (the file ends inside an entry)")
            } else {
                self.err(e)
            }
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        self.r.seek_relative(n as i64).map_err(|e| self.err(e))?;
        self.pos += n;
        Ok(())
    }

    /// Data blocks of an entry of `size` bytes, padded to 512.
    fn padded(size: u64) -> u64 {
        size.div_ceil(512) * 512
    }

    /// The next regular file's header (data not read), or None at the end of the archive.
    fn next_entry(&mut self) -> Result<Option<Entry>> {
        let mut long_name: Option<String> = None;
        loop {
            let mut h = [0u8; 512];
            match self.r.read(&mut h[..1]) {
                Ok(0) => return Ok(None), // no end blocks: tolerated, as tarfile does
                Ok(_) => {}
                Err(e) => return Err(self.err(e)),
            }
            self.r
                .read_exact(&mut h[1..])
                .map_err(|_| self.err("truncated header"))?;
            let start = self.pos;
            self.pos += 512;
            if h.iter().all(|b| *b == 0) {
                return Ok(None);
            }
            let stored: u64 =
                octal(&h[148..156]).ok_or_else(|| self.err("bad header checksum field"))?;
            let sum: u64 = h[..148]
                .iter()
                .chain(&[b' '; 8])
                .chain(&h[156..])
                .map(|b| *b as u64)
                .sum();
            if sum != stored {
                return Err(Error::Media(format!(
                    "{} at byte {start}: not a tar header (checksum {stored} ≠ {sum})",
                    self.path.display()
                )));
            }
            let size = octal(&h[124..136]).ok_or_else(|| self.err("bad size field"))?;
            if size > MAX_ENTRY_BYTES {
                return Err(self.err(format!(
                    "an entry of {size} bytes is over the {MAX_ENTRY_BYTES}-byte limit"
                )));
            }
            let cstr = |b: &[u8]| {
                let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
                String::from_utf8_lossy(&b[..end]).into_owned()
            };
            match h[156] {
                // GNU long name: the next entry's name is this entry's data.
                b'L' | b'x' => {
                    let mut data = vec![0u8; size as usize];
                    self.read_exact(&mut data)?;
                    self.skip(Self::padded(size) - size)?;
                    if h[156] == b'L' {
                        long_name = Some(cstr(&data));
                    } else {
                        // pax: "LEN path=VALUE\n" records.
                        let text = String::from_utf8_lossy(&data);
                        for rec in text.split('\n') {
                            if let Some((_, kv)) = rec.split_once(' ') {
                                if let Some(p) = kv.strip_prefix("path=") {
                                    long_name = Some(p.to_string());
                                }
                            }
                        }
                    }
                }
                b'0' | 0 => {
                    let name = long_name.take().unwrap_or_else(|| {
                        let prefix = cstr(&h[345..500]);
                        let base = cstr(&h[..100]);
                        if &h[257..262] == b"ustar" && !prefix.is_empty() {
                            format!("{prefix}/{base}")
                        } else {
                            base
                        }
                    });
                    return Ok(Some(Entry { name, size }));
                }
                // Folders, links, global pax headers: nothing a sample needs.
                _ => self.skip(Self::padded(size))?,
            }
        }
    }

    /// The data of `e` (just returned by `next_entry`).
    fn data(&mut self, e: &Entry) -> Result<Vec<u8>> {
        let mut data = vec![0u8; e.size as usize];
        self.read_exact(&mut data)?;
        self.skip(Self::padded(e.size) - e.size)?;
        Ok(data)
    }

    fn skip_data(&mut self, e: &Entry) -> Result<()> {
        self.skip(Self::padded(e.size))
    }
}

/// WebDataset's split of an entry name: the key is the path up to the first dot of its last
/// component, the extension the rest (`a/b.c.jpg` → `a/b`, `c.jpg`).
fn split_name(name: &str) -> (&str, &str) {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    match name[base..].find('.') {
        Some(d) => (&name[..base + d], &name[base + d + 1..]),
        None => (name, ""),
    }
}

/// One sample read from a shard.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Its key, and the shard it came from (for error messages).
    pub key: String,
    /// File name of that shard inside the pack folder.
    pub shard: String,
    /// The image's bytes and their extension (`jpg`, `png`, `webp`).
    pub image: Vec<u8>,
    /// The image entry's extension, lowercase: `jpg`, `png` or `webp`.
    pub ext: String,
    /// The sample's JSON, as an item (`rel_path` is `SHARD:KEY`, followed by the source
    /// image's path in parentheses when the pack recorded one; `path` is the shard file).
    pub item: Item,
}

/// The metadata `pack` stores beside each image.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SampleJson {
    label: String,
    source: String,
    split: String,
    #[serde(default)]
    face: String,
    #[serde(default)]
    env: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    video: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    compression: Option<String>,
    /// The manifest line (its augmentations are seeded by it, as from loose files).
    #[serde(default)]
    line: usize,
    /// The source file, relative to its manifest.
    #[serde(default)]
    path: String,
}

const IMAGE_EXTS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// A sample's entries: (extension, entry), data not read.
type Group = Vec<(String, Entry)>;

/// An image as stored: (extension, encoded bytes).
type Stored = (&'static str, Vec<u8>);

/// Reads samples (an image entry and a `json` entry with the same key, consecutive) from
/// one shard.
struct SampleReader {
    tar: TarReader,
    shard: String,
    /// An entry already read whose key starts the next sample.
    pending: Option<Entry>,
}

impl SampleReader {
    fn open(dir: &Path, shard: &str) -> Result<SampleReader> {
        Ok(SampleReader {
            tar: TarReader::open(&dir.join(shard))?,
            shard: shard.to_string(),
            pending: None,
        })
    }

    /// The first entry of the next sample (its key and extension), data not read.
    fn next_group(&mut self) -> Result<Option<(String, Group)>> {
        let first = match self.pending.take() {
            Some(e) => e,
            None => match self.tar.next_entry()? {
                Some(e) => e,
                None => return Ok(None),
            },
        };
        let (key, ext) = split_name(&first.name);
        let (key, ext) = (key.to_string(), ext.to_ascii_lowercase());
        Ok(Some((key, vec![(ext, first)])))
    }

    /// The next sample, its data read (`read`) or skipped.
    fn next(&mut self, read: bool) -> Result<Option<Option<Sample>>> {
        let Some((key, mut group)) = self.next_group()? else {
            return Ok(None);
        };
        let (mut image, mut ext, mut json) = (None, String::new(), None);
        loop {
            let (x, e) = group.pop().ok_or_else(|| self.tar.err("empty sample"))?;
            if read && (IMAGE_EXTS.contains(&x.as_str()) || x == "json") {
                let data = self.tar.data(&e)?;
                if x == "json" {
                    json = Some(data);
                } else {
                    image = Some(data);
                    ext = x;
                }
            } else {
                if IMAGE_EXTS.contains(&x.as_str()) {
                    ext = x.clone();
                }
                if x == "json" {
                    json = Some(vec![]);
                }
                self.tar.skip_data(&e)?;
            }
            match self.tar.next_entry()? {
                Some(n) if split_name(&n.name).0 == key => {
                    let x = split_name(&n.name).1.to_ascii_lowercase();
                    group.push((x, n));
                }
                other => {
                    self.pending = other;
                    break;
                }
            }
        }
        let what = format!("{}: sample `{key}`", self.shard);
        if ext.is_empty() {
            return Err(Error::Media(format!(
                "{what}: no image entry (.jpg, .png or .webp)"
            )));
        }
        let Some(json) = json else {
            return Err(Error::Media(format!("{what}: no .json entry")));
        };
        if !read {
            return Ok(Some(None));
        }
        let meta: SampleJson = serde_json::from_slice(&json)
            .map_err(|e| Error::Media(format!("{what}: {key}.json: {e}")))?;
        let label = class_id(&meta.label).ok_or_else(|| {
            Error::Media(format!(
                "{what}: label `{}` (expected {})",
                meta.label,
                CLASSES.join("|")
            ))
        })?;
        let split = Split::parse(&meta.split)
            .ok_or_else(|| Error::Media(format!("{what}: split `{}`", meta.split)))?;
        let rel = format!("{}:{key}", self.shard);
        Ok(Some(Some(Sample {
            key: key.clone(),
            shard: self.shard.clone(),
            image: image.unwrap_or_default(),
            ext,
            item: Item {
                path: self.tar.path.clone(),
                rel_path: if meta.path.is_empty() {
                    rel
                } else {
                    format!("{rel} ({})", meta.path)
                },
                label,
                source: meta.source,
                split,
                face: meta.face,
                env: meta.env,
                video: meta.video,
                compression: meta.compression,
                line: meta.line,
            },
        })))
    }
}

// ---- the epoch stream ----

/// The shuffle buffer: one algorithm for samples and for their positions alone, so a resume
/// replays the exact choices of an uninterrupted stream without reading any data. A sample
/// comes out only once the buffer is full (then a random one is swapped for the newcomer);
/// at the end the rest come out in random order. A capacity of 1 keeps the read order.
struct ShuffleBuffer<T> {
    buf: Vec<T>,
    cap: usize,
    rng: Rng,
}

impl<T> ShuffleBuffer<T> {
    fn push(&mut self, t: T) -> Option<T> {
        if self.buf.len() < self.cap {
            self.buf.push(t);
            return None;
        }
        let j = self.rng.below(self.cap);
        Some(std::mem::replace(&mut self.buf[j], t))
    }

    fn drain_one(&mut self) -> Option<T> {
        if self.buf.is_empty() {
            return None;
        }
        let j = self.rng.below(self.buf.len());
        Some(self.buf.swap_remove(j))
    }
}

/// Which samples one epoch's stream yields, and in what order.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// The split whose shards are read.
    pub split: Split,
    /// Seed of the shard order and of the shuffle buffer (`sd2 train` passes `train.seed`).
    pub seed: u64,
    /// Epoch index (0-based in `sd2 train`): each epoch has its own shard order and mix.
    pub epoch: u64,
    /// Shuffle-buffer capacity in samples (1: shards and samples in their stored order).
    pub buffer: usize,
    /// This part (`rank` of `world`): shards are dealt to parts round-robin after the
    /// epoch's shuffle, so parts read disjoint shards.
    pub rank: usize,
    /// Number of parts the split is dealt to (1: one reader gets everything); the split needs
    /// at least this many shards.
    pub world: usize,
    /// Samples of this part's stream already consumed (a mid-epoch resume).
    pub skip: usize,
}

impl StreamOptions {
    /// The whole split in stored order, one part, nothing skipped (evaluation).
    pub fn sequential(split: Split) -> StreamOptions {
        StreamOptions {
            split,
            seed: 0,
            epoch: 0,
            buffer: 1,
            rank: 0,
            world: 1,
            skip: 0,
        }
    }
}

/// This part's shards for the epoch, in reading order: (file, samples).
pub fn epoch_shards(ix: &ShardIndex, o: &StreamOptions) -> Result<Vec<(String, usize)>> {
    let mut shards: Vec<&ShardInfo> = ix.shards.iter().filter(|s| s.split == o.split).collect();
    if o.world == 0 || o.rank >= o.world {
        return Err(Error::invalid(
            "shard stream",
            format!("part {} of {} does not exist", o.rank, o.world),
        ));
    }
    if shards.len() < o.world && !shards.is_empty() {
        return Err(Error::invalid(
            ix.dir.display().to_string(),
            format!(
                "{} {:?} shards cannot be dealt to {} parts; pack with a smaller --shard-size",
                shards.len(),
                o.split,
                o.world
            ),
        ));
    }
    if o.buffer > 1 {
        let mut r = Rng::new(crate::rng::mix64(o.seed ^ 0x5a4d) ^ crate::rng::mix64(o.epoch));
        for i in (1..shards.len()).rev() {
            shards.swap(i, r.below(i + 1));
        }
    }
    Ok(shards
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % o.world == o.rank)
        .map(|(_, s)| (s.file.clone(), s.samples))
        .collect())
}

fn buffer_rng(o: &StreamOptions) -> Rng {
    Rng::new(
        crate::rng::mix64(o.seed ^ 0xb0ff)
            ^ crate::rng::mix64(o.epoch.wrapping_add((o.rank as u64).wrapping_mul(7919))),
    )
}

/// One epoch of one part's samples (see the module's notes). Iterating yields each sample
/// once; an error (a damaged shard, a count that differs from the index) ends the stream.
pub struct ShardStream {
    dir: PathBuf,
    shards: Vec<(String, usize)>,
    next_shard: usize,
    reader: Option<(SampleReader, usize, usize)>,
    buf: ShuffleBuffer<Sample>,
    buf_bytes: u64,
    reading: bool,
    failed: bool,
    remaining: usize,
}

impl ShardStream {
    /// The stream of `o`, positioned after `o.skip` samples.
    pub fn open(ix: &ShardIndex, o: &StreamOptions) -> Result<ShardStream> {
        let shards = epoch_shards(ix, o)?;
        let total: usize = shards.iter().map(|s| s.1).sum();
        if o.skip > total {
            return Err(Error::invalid(
                ix.dir.display().to_string(),
                format!("cannot skip {} of {total} samples", o.skip),
            ));
        }
        // Replay the buffer on positions (shard, sample) up to the resume point.
        let mut pos = ShuffleBuffer {
            buf: Vec::new(),
            cap: o.buffer.max(1),
            rng: buffer_rng(o),
        };
        let (mut emitted, mut read) = (0usize, 0usize);
        let (mut sh, mut k) = (0usize, 0usize);
        while emitted < o.skip {
            if read < total {
                while k == shards[sh].1 {
                    (sh, k) = (sh + 1, 0);
                }
                emitted += pos.push((sh, k)).is_some() as usize;
                (read, k) = (read + 1, k + 1);
            } else {
                pos.drain_one();
                emitted += 1;
            }
        }
        // Load the samples the buffer holds at that point, by seeking through their shards.
        let mut want: BTreeMap<usize, Vec<(usize, usize)>> = BTreeMap::new();
        for (slot, (s, k)) in pos.buf.iter().enumerate() {
            want.entry(*s).or_default().push((*k, slot));
        }
        let mut slots: Vec<Option<Sample>> = (0..pos.buf.len()).map(|_| None).collect();
        let mut buf_bytes = 0u64;
        for (s, mut ks) in want {
            ks.sort_unstable();
            let mut r = SampleReader::open(&ix.dir, &shards[s].0)?;
            let mut at = 0usize;
            for (k, slot) in ks {
                while at < k {
                    r.next(false)?;
                    at += 1;
                }
                let got = r.next(true)?.flatten().ok_or_else(|| {
                    Error::Media(format!(
                        "{}: fewer samples than the index's {}",
                        shards[s].0, shards[s].1
                    ))
                })?;
                at += 1;
                buf_bytes += got.image.len() as u64;
                if buf_bytes > MAX_BUFFER_BYTES {
                    return Err(Error::invalid(
                        ix.dir.display().to_string(),
                        format!(
                            "the shuffle buffer holds over {MAX_BUFFER_BYTES} bytes; give a \
                             smaller buffer or pack smaller images"
                        ),
                    ));
                }
                slots[slot] = Some(got);
            }
        }
        let buffered: Vec<Sample> = slots.into_iter().flatten().collect();
        // The sequential reader, at the first sample not yet read.
        let mut reader = None;
        let next_shard;
        if read < total {
            while k == shards[sh].1 {
                (sh, k) = (sh + 1, 0);
            }
            let mut r = SampleReader::open(&ix.dir, &shards[sh].0)?;
            for _ in 0..k {
                r.next(false)?;
            }
            reader = Some((r, sh, k));
            next_shard = sh + 1;
        } else {
            next_shard = shards.len();
        }
        Ok(ShardStream {
            dir: ix.dir.clone(),
            shards,
            next_shard,
            reader,
            buf: ShuffleBuffer {
                buf: buffered,
                cap: pos.cap,
                rng: pos.rng,
            },
            buf_bytes,
            reading: read < total,
            failed: false,
            remaining: total - o.skip,
        })
    }

    /// Samples still to come.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// The next sample in file order, or None after the last shard.
    fn read_one(&mut self) -> Result<Option<Sample>> {
        loop {
            if self.reader.is_none() {
                if self.next_shard >= self.shards.len() {
                    return Ok(None);
                }
                let s = self.next_shard;
                self.reader = Some((SampleReader::open(&self.dir, &self.shards[s].0)?, s, 0));
                self.next_shard += 1;
            }
            let Some((r, s, n)) = self.reader.as_mut() else {
                continue;
            };
            match r.next(true)? {
                Some(Some(sample)) => {
                    *n += 1;
                    if *n > self.shards[*s].1 {
                        break;
                    }
                    return Ok(Some(sample));
                }
                Some(None) => {}
                None if *n == self.shards[*s].1 => self.reader = None,
                None => break,
            }
        }
        let (s, n) = self.reader.as_ref().map_or((0, 0), |(_, s, n)| (*s, *n));
        let want = self.shards[s].1;
        Err(Error::Media(format!(
            "{}: {}, the index says {want} (repack it)",
            self.dir.join(&self.shards[s].0).display(),
            if n > want {
                format!("holds more than {want} samples")
            } else {
                format!("holds {n} samples")
            }
        )))
    }

    fn step(&mut self) -> Result<Option<Sample>> {
        while self.reading {
            match self.read_one()? {
                Some(s) => {
                    self.buf_bytes += s.image.len() as u64;
                    if self.buf_bytes > MAX_BUFFER_BYTES {
                        return Err(Error::invalid(
                            self.dir.display().to_string(),
                            format!(
                                "the shuffle buffer's {} samples hold over {MAX_BUFFER_BYTES} \
                                 bytes; give a smaller buffer or pack smaller images",
                                self.buf.buf.len()
                            ),
                        ));
                    }
                    if let Some(out) = self.buf.push(s) {
                        self.buf_bytes -= out.image.len() as u64;
                        return Ok(Some(out));
                    }
                }
                None => self.reading = false,
            }
        }
        let out = self.buf.drain_one();
        if let Some(o) = &out {
            self.buf_bytes -= o.image.len() as u64;
        }
        Ok(out)
    }
}

impl Iterator for ShardStream {
    type Item = Result<Sample>;
    fn next(&mut self) -> Option<Result<Sample>> {
        if self.failed {
            return None;
        }
        match self.step() {
            Ok(Some(s)) => {
                self.remaining = self.remaining.saturating_sub(1);
                Some(Ok(s))
            }
            Ok(None) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

// ---- packing ----

/// How the images are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackFormat {
    /// The source file's bytes when nothing is changed (JPEG, PNG, WebP), else JPEG.
    Keep,
    /// Every image decoded and re-encoded as JPEG at `PackOptions::quality` (4:2:0 chroma).
    Jpeg,
    /// Every image decoded and stored as lossless PNG (`quality` is unused).
    Png,
}

/// How to pack.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// A shard is closed before a sample would take it past this many bytes.
    pub shard_bytes: u64,
    /// Resize: the short side (or, for face crops, the side) to this many pixels.
    pub size: Option<usize>,
    /// Store the largest face's crop instead of the whole image (images without a face are
    /// left out and counted).
    pub faces: Option<crate::faces::FaceConfig>,
    /// How the images are encoded in the tar (see [`PackFormat`]).
    pub format: PackFormat,
    /// JPEG quality when images are re-encoded.
    pub quality: u8,
    /// Leave undecodable images out (listed) instead of failing.
    pub skip_bad: bool,
    /// Write each split's samples in an order shuffled with this seed (None: manifest order).
    pub shuffle: Option<u64>,
}

impl Default for PackOptions {
    fn default() -> PackOptions {
        PackOptions {
            shard_bytes: 1_000_000_000,
            size: None,
            faces: None,
            format: PackFormat::Keep,
            quality: 95,
            skip_bad: false,
            shuffle: Some(0),
        }
    }
}

/// What `pack` did.
#[derive(Clone, Debug)]
pub struct Packed {
    /// The index written as `shards.json`, its `dir` the pack folder.
    pub index: ShardIndex,
    /// Manifest lines left out (`skip_bad`), with why.
    pub skipped: Vec<(usize, String)>,
    /// Manifest lines left out because no face was found (`faces`).
    pub no_face: Vec<usize>,
    /// Image bytes stored.
    pub image_bytes: u64,
}

/// `1GB`, `500MB`, `64MiB`, `4096` (bytes): a size as webdataset's `maxsize` takes it.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1_000,
        "mb" | "m" => 1_000_000,
        "gb" | "g" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        u => {
            return Err(Error::Config {
                key: "shard-size".into(),
                msg: format!("`{s}`: unknown unit `{u}` (B, KB, MB, GB, KiB, MiB, GiB)"),
            })
        }
    };
    let v: f64 = num.parse().map_err(|_| Error::Config {
        key: "shard-size".into(),
        msg: format!("`{s}` is not a size (e.g. 1GB, 256MiB)"),
    })?;
    let bytes = v * mult as f64;
    if !(64.0 * 1024.0..=1e13).contains(&bytes) {
        return Err(Error::Config {
            key: "shard-size".into(),
            msg: format!("`{s}` must be between 64KiB and 10TB"),
        });
    }
    Ok(bytes as u64)
}

/// The extension of encoded image `bytes` by their first bytes.
fn sniff(bytes: &[u8]) -> Option<&'static str> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpg")
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some("webp")
    } else {
        None
    }
}

fn encode(
    img: &crate::clip::preprocess::RgbImage,
    format: PackFormat,
    q: u8,
) -> Result<(&'static str, Vec<u8>)> {
    let mut buf = Vec::new();
    if format == PackFormat::Png {
        use image::ImageEncoder;
        image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(
                &img.data,
                img.width as u32,
                img.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| Error::Msg(format!("png: {e}")))?;
        return Ok(("png", buf));
    }
    let (Ok(w), Ok(h)) = (u16::try_from(img.width), u16::try_from(img.height)) else {
        return Err(Error::Media(format!(
            "{}x{} is over JPEG's 65535 px side",
            img.width, img.height
        )));
    };
    let mut enc = jpeg_encoder::Encoder::new(&mut buf, q.clamp(1, 100));
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::R_4_2_0);
    enc.encode(&img.data, w, h, jpeg_encoder::ColorType::Rgb)
        .map_err(|e| Error::Msg(format!("jpeg: {e}")))?;
    Ok(("jpg", buf))
}

/// One item's stored image: (extension, bytes), or None when it has no face (`faces`).
fn prepare(
    it: &Item,
    o: &PackOptions,
    det: &mut Option<crate::faces::FaceDetector>,
) -> Result<Option<Stored>> {
    use crate::clip::preprocess::{
        decode_image, image_bytes_size, resize_bicubic, short_side_size,
    };
    let what = it.path.display().to_string();
    if o.size.is_none() && o.faces.is_none() && o.format == PackFormat::Keep {
        let len = crate::clip::preprocess::image_file_len(&it.path)?;
        if len > MAX_ENTRY_BYTES {
            return Err(Error::Media(format!(
                "{what}: {len} bytes is over a shard entry's {MAX_ENTRY_BYTES}-byte limit \
                 (pack it resized: --size)"
            )));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::fs::File::open(&it.path)
            .and_then(|f| f.take(MAX_ENTRY_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|e| Error::read(&it.path, e))?;
        if bytes.len() as u64 > MAX_ENTRY_BYTES {
            return Err(Error::Media(format!(
                "{what}: grew past {MAX_ENTRY_BYTES} bytes"
            )));
        }
        let ext = sniff(&bytes)
            .ok_or_else(|| Error::Media(format!("{what}: not a JPEG, PNG or WebP file")))?;
        image_bytes_size(&bytes, &what)?;
        if ext == "jpg" && !crate::clip::preprocess::jpeg_is_complete(&bytes) {
            return Err(Error::Media(format!("{what}: truncated JPEG")));
        }
        return Ok(Some((ext, bytes)));
    }
    let mut img = decode_image(&it.path)?;
    if let Some(cfg) = &o.faces {
        if det.is_none() {
            *det = Some(crate::faces::FaceDetector::new(cfg.clone())?);
        }
        let Some(d) = det.as_mut() else {
            return Ok(None);
        };
        match d.largest_crop(&img)? {
            Some(c) => img = c,
            None => return Ok(None),
        }
    }
    if let Some(s) = o.size {
        let (w, h) = short_side_size(img.width, img.height, s);
        let max = crate::clip::preprocess::MAX_SIDE as usize;
        if w.max(h) > max {
            return Err(Error::Media(format!(
                "{what}: {}x{} resized to a short side of {s} would be {w}x{h}, over {max} px",
                img.width, img.height
            )));
        }
        if (w, h) != (img.width, img.height) {
            img = resize_bicubic(&img, w, h);
        }
    }
    let fmt = if o.format == PackFormat::Keep {
        PackFormat::Jpeg
    } else {
        o.format
    };
    encode(&img, fmt, o.quality).map(Some)
}

/// An open shard being written as `NAME.partial`, renamed when closed.
struct ShardWriter {
    w: std::io::BufWriter<std::fs::File>,
    name: String,
    tmp: PathBuf,
    samples: usize,
    bytes: u64,
}

/// Packs `manifest`'s items into shards under `out` (a new or empty folder), split by split
/// in manifest order, and writes the index last. On an error, every file written is removed.
pub fn pack(manifest: &Manifest, out: &Path, o: &PackOptions) -> Result<Packed> {
    use rayon::prelude::*;
    if let Ok(mut rd) = std::fs::read_dir(out) {
        if rd.next().is_some() {
            return Err(Error::invalid(
                out.display().to_string(),
                "not empty; pack into a new folder",
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::Msg(format!("{}: {e}", out.display())))?;
    let mut written: Vec<PathBuf> = vec![];
    let r = pack_into(manifest, out, o, &mut written);
    if r.is_err() {
        for p in &written {
            std::fs::remove_file(p).ok();
        }
    }
    return r;

    fn pack_into(
        manifest: &Manifest,
        out: &Path,
        o: &PackOptions,
        written: &mut Vec<PathBuf>,
    ) -> Result<Packed> {
        let mut shards: Vec<ShardInfo> = vec![];
        let (mut skipped, mut no_face, mut image_bytes) = (vec![], vec![], 0u64);
        let mut described = true;
        for split in [Split::Train, Split::Val, Split::Test] {
            let mut items = manifest.split(split);
            // Written shuffled (WebDataset's convention): a manifest in dataset/method/video
            // order would make every shard one class and a few videos, and a shuffle buffer
            // cannot mix across a 1 GB shard.
            if let Some(seed) = o.shuffle {
                let mut r = Rng::new(crate::rng::mix64(seed ^ 0x9ac4));
                for i in (1..items.len()).rev() {
                    items.swap(i, r.below(i + 1));
                }
            }
            let name = format!("{split:?}").to_ascii_lowercase();
            let mut cur: Option<ShardWriter> = None;
            for chunk in items.chunks(256) {
                let prepared: Vec<Result<Option<Stored>>> = chunk
                    .par_iter()
                    .map_init(|| None, |det, it| prepare(it, o, det))
                    .collect();
                for (it, p) in chunk.iter().zip(prepared) {
                    let (ext, bytes) = match p {
                        Ok(Some(x)) => x,
                        Ok(None) => {
                            no_face.push(it.line);
                            continue;
                        }
                        Err(e) if o.skip_bad => {
                            skipped.push((it.line, e.to_string()));
                            continue;
                        }
                        Err(e) => {
                            return Err(Error::Msg(format!(
                                "{} line {}: {e}",
                                manifest.path.display(),
                                it.line
                            )))
                        }
                    };
                    let key = format!("{:09}", it.line);
                    let meta = SampleJson {
                        label: CLASSES[it.label].to_string(),
                        source: it.source.clone(),
                        split: name.clone(),
                        face: it.face.clone(),
                        env: it.env.clone(),
                        video: it.video.clone(),
                        compression: it.compression.clone(),
                        line: it.line,
                        path: it.rel_path.clone(),
                    };
                    let json = serde_json::to_vec(&meta).map_err(|e| Error::Msg(e.to_string()))?;
                    if bytes.len() as u64 > MAX_ENTRY_BYTES || json.len() as u64 > MAX_ENTRY_BYTES {
                        let e = format!(
                            "line {}: {} bytes is over a shard entry's {MAX_ENTRY_BYTES}-byte limit",
                            it.line,
                            bytes.len().max(json.len())
                        );
                        if o.skip_bad {
                            skipped.push((it.line, e));
                            continue;
                        }
                        return Err(Error::Media(format!("{}: {e}", manifest.path.display())));
                    }
                    described &= !it.face.trim().is_empty() && !it.env.trim().is_empty();
                    let padded = |n: usize| (n as u64).div_ceil(512) * 512;
                    let need = 1024 + padded(bytes.len()) + padded(json.len()) + 1024;
                    if cur
                        .as_ref()
                        .is_some_and(|c| c.samples > 0 && c.bytes + need > o.shard_bytes)
                    {
                        if let Some(c) = cur.take() {
                            shards.push(close(c, split, out)?);
                        }
                    }
                    if cur.is_none() {
                        let file = format!(
                            "{name}-{:06}.tar",
                            shards.iter().filter(|s| s.split == split).count()
                        );
                        let tmp = out.join(format!("{file}.partial"));
                        written.push(tmp.clone());
                        written.push(out.join(&file));
                        let f = std::fs::File::create(&tmp)
                            .map_err(|e| Error::Msg(format!("{}: {e}", tmp.display())))?;
                        cur = Some(ShardWriter {
                            w: std::io::BufWriter::with_capacity(1 << 20, f),
                            name: file,
                            tmp,
                            samples: 0,
                            bytes: 0,
                        });
                    }
                    if let Some(c) = cur.as_mut() {
                        c.bytes += write_entry(&mut c.w, &format!("{key}.{ext}"), &bytes)?;
                        c.bytes += write_entry(&mut c.w, &format!("{key}.json"), &json)?;
                        c.samples += 1;
                        image_bytes += bytes.len() as u64;
                    }
                }
            }
            if let Some(c) = cur.take() {
                shards.push(close(c, split, out)?);
            }
        }
        let mut index = ShardIndex {
            format: FORMAT.into(),
            size: o.size,
            face_crop: o.faces.is_some(),
            described: described && !shards.is_empty(),
            shards,
            dir: out.to_path_buf(),
        };
        let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Msg(e.to_string()))?;
        let ix = out.join(INDEX);
        written.push(ix.clone());
        crate::fs::write_atomic(&ix, text)?;
        crate::fs::fsync(out)?;
        index.dir = out.to_path_buf();
        Ok(Packed {
            index,
            skipped,
            no_face,
            image_bytes,
        })
    }

    /// Ends the archive (two zero blocks), flushes it to disk and gives it its name.
    fn close(mut c: ShardWriter, split: Split, out: &Path) -> Result<ShardInfo> {
        let io = |e: std::io::Error| Error::Msg(format!("{}: {e}", c.tmp.display()));
        c.w.write_all(&[0u8; 1024]).map_err(io)?;
        c.bytes += 1024;
        let f =
            c.w.into_inner()
                .map_err(|e| Error::Msg(format!("{}: {e}", c.tmp.display())))?;
        f.sync_all()
            .map_err(|e| Error::Msg(format!("{}: {e}", c.tmp.display())))?;
        let dst = out.join(&c.name);
        std::fs::rename(&c.tmp, &dst).map_err(|e| Error::Msg(format!("{}: {e}", dst.display())))?;
        Ok(ShardInfo {
            file: c.name,
            split,
            samples: c.samples,
            bytes: c.bytes,
        })
    }
}

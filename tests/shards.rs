//! WebDataset shards (`sd2 pack`, `ShardStream`): what is packed is what the manifest holds;
//! the shard loader gives the loose-file loader's pixels bit for bit (augmentations included);
//! the epoch stream is a per-epoch permutation, split disjointly between parts, and resumes
//! mid-epoch exactly; damaged shards and lying indexes are named errors.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use sd2::data::augment::AugmentConfig;
use sd2::data::loader::{load_host, Prefetcher, Transform};
use sd2::data::shards::{
    pack, PackFormat, PackOptions, ShardIndex, ShardStream, StreamOptions, INDEX,
};
use sd2::data::{Manifest, Split};

mod common;
use common::{file_bytes, sd2_cli as sd2, tiny_run_args};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd2-shards-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

/// A small synthetic benchmark (PNG, 32 px) and its manifest.
fn data(dir: &Path, n: usize) -> Manifest {
    sd2::data::synth::generate(dir, n, 32, 3).unwrap()
}

fn small() -> PackOptions {
    PackOptions {
        shard_bytes: 64 << 10,
        ..Default::default()
    }
}

fn keys(ix: &ShardIndex, o: &StreamOptions) -> Vec<usize> {
    ShardStream::open(ix, o)
        .unwrap()
        .map(|s| s.unwrap().item.line)
        .collect()
}

#[test]
fn packed_shards_hold_the_manifest_and_load_as_the_loose_files_do() {
    let d = tmp("pack");
    let m = data(&d.join("src"), 90);
    let out = d.join("pack");
    let in_order = PackOptions {
        shuffle: None,
        ..small()
    };
    let p = pack(&m, &out, &in_order).unwrap();
    let ix = ShardIndex::load(&out).unwrap();
    assert_eq!(ix.shards, p.index.shards);
    assert!(ix.described, "synth's lines all have descriptions");
    // By default each split is written shuffled (same seed, same order), every line once.
    let shuffled = d.join("shuffled");
    pack(&m, &shuffled, &small()).unwrap();
    let six = ShardIndex::load(&shuffled).unwrap();
    let order = keys(&six, &StreamOptions::sequential(Split::Train));
    let want: Vec<usize> = m.split(Split::Train).iter().map(|i| i.line).collect();
    assert_ne!(order, want);
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, want);
    for split in [Split::Train, Split::Val, Split::Test] {
        let want = m.split(split).len();
        let shards = ix.shards.iter().filter(|s| s.split == split).count();
        println!("{split:?}: {} samples in {shards} shards", ix.count(split));
        assert_eq!(ix.count(split), want);
    }
    assert!(ix.shards.len() > 3, "64 KiB shards: several per split");
    // Only whole shards and the index: no partial files.
    for e in std::fs::read_dir(&out).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(n == INDEX || n.ends_with(".tar"), "{n}");
    }
    // Stored order: the manifest's items, every field kept.
    let train: Vec<_> = m.split(Split::Train).into_iter().cloned().collect();
    let got: Vec<_> = ShardStream::open(&ix, &StreamOptions::sequential(Split::Train))
        .unwrap()
        .map(|s| s.unwrap())
        .collect();
    assert_eq!(got.len(), train.len());
    for (s, it) in got.iter().zip(&train) {
        assert_eq!(
            (
                s.item.line,
                s.item.label,
                &s.item.source,
                &s.item.face,
                &s.item.env,
                &s.item.video
            ),
            (it.line, it.label, &it.source, &it.face, &it.env, &it.video)
        );
        assert_eq!(s.image, std::fs::read(&it.path).unwrap(), "bytes kept");
        assert_eq!(s.ext, "png");
    }
    // The shard loader's pixels are the loose loader's, bit for bit, augmented too (both seed
    // an image's augmentations by its manifest line).
    for t in [
        Transform::None,
        Transform::Augment {
            cfg: AugmentConfig::default(),
            seed: 5,
            epoch: 2,
        },
    ] {
        let want = load_host(&train, 32, &t).unwrap();
        let stream = ShardStream::open(&ix, &StreamOptions::sequential(Split::Train)).unwrap();
        let mut px = vec![];
        for b in Prefetcher::shards(stream, 16, 32, t.clone(), 2, false) {
            px.extend(b.unwrap().pixels);
        }
        assert_eq!(px.len(), want.len());
        let worst = px
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("shard vs loose pixels ({t:?}): worst |err| {worst} (tol 0)");
        assert_eq!(worst, 0.0);
    }
    // Into a folder that is not empty: refused.
    let e = pack(&m, &out, &small()).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn the_epoch_stream_shuffles_splits_between_parts_and_resumes_exactly() {
    let d = tmp("stream");
    let m = data(&d.join("src"), 160);
    let out = d.join("pack");
    pack(&m, &out, &small()).unwrap();
    let ix = ShardIndex::load(&out).unwrap();
    let all: BTreeSet<usize> = m.split(Split::Train).iter().map(|i| i.line).collect();
    let n_shards = ix.shards.iter().filter(|s| s.split == Split::Train).count();
    assert!(n_shards >= 4, "{n_shards} train shards");
    let o = |epoch: u64, buffer: usize| StreamOptions {
        seed: 9,
        epoch,
        buffer,
        ..StreamOptions::sequential(Split::Train)
    };
    let e0 = keys(&ix, &o(0, 20));
    assert_eq!(
        e0.iter().copied().collect::<BTreeSet<_>>(),
        all,
        "each sample once"
    );
    assert_eq!(e0.len(), all.len());
    let stored: Vec<usize> = all.iter().copied().collect();
    assert_ne!(e0, stored, "shuffled");
    assert_eq!(keys(&ix, &o(0, 20)), e0, "same seed and epoch, same order");
    assert_ne!(keys(&ix, &o(1, 20)), e0, "another epoch, another order");
    // Parts read disjoint shards; together, every sample once.
    let mut union = BTreeSet::new();
    let mut total = 0;
    for rank in 0..2 {
        let k = keys(
            &ix,
            &StreamOptions {
                rank,
                world: 2,
                ..o(0, 20)
            },
        );
        total += k.len();
        union.extend(k);
    }
    assert_eq!((total, union), (all.len(), all.clone()));
    let too_many = StreamOptions {
        world: n_shards + 1,
        ..o(0, 20)
    };
    let e = ShardStream::open(&ix, &too_many).err().unwrap().to_string();
    assert!(e.contains("cannot be dealt"), "{e}");
    // A resume after `skip` samples yields exactly the rest of the uninterrupted stream:
    // before the buffer fills, at its edge, mid-stream, while draining, at the end.
    let n = e0.len();
    for skip in [0, 1, 19, 20, 21, 57, n - 20, n - 3, n] {
        let rest = keys(&ix, &StreamOptions { skip, ..o(0, 20) });
        assert_eq!(rest, e0[skip..], "resume at {skip}");
    }
    let e = ShardStream::open(
        &ix,
        &StreamOptions {
            skip: n + 1,
            ..o(0, 20)
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("cannot skip"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn damaged_shards_and_lying_indexes_are_named_errors() {
    let d = tmp("hostile");
    let m = data(&d.join("src"), 40);
    let out = d.join("pack");
    pack(&m, &out, &small()).unwrap();
    let ix_path = out.join(INDEX);
    let ix_text = std::fs::read_to_string(&ix_path).unwrap();
    let first = ShardIndex::load(&out).unwrap().shards[0].clone();
    let shard = out.join(&first.file);
    let bytes = std::fs::read(&shard).unwrap();
    let read_all = |dir: &Path| -> Result<usize, String> {
        let ix = ShardIndex::load(dir).map_err(|e| e.to_string())?;
        let mut n = 0;
        for s in ShardStream::open(&ix, &StreamOptions::sequential(first.split))
            .map_err(|e| e.to_string())?
        {
            s.map_err(|e| e.to_string())?;
            n += 1;
        }
        Ok(n)
    };
    assert!(read_all(&out).is_ok());
    let case = |name: &str, edit: &dyn Fn(), says: &[&str]| {
        edit();
        let e = read_all(&out).unwrap_err();
        println!("{name}: {e}");
        for s in says {
            assert!(e.contains(s), "{name}: {e}");
        }
        std::fs::write(&shard, &bytes).unwrap();
        std::fs::write(&ix_path, &ix_text).unwrap();
    };
    // Truncated: the index's size no longer matches.
    case(
        "truncated",
        &|| std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap(),
        &[&first.file, "bytes on disk"],
    );
    // Truncated, and the index edited to match: the reader finds the cut.
    case(
        "truncated, index agrees",
        &|| {
            let cut = bytes.len() / 2 + 100;
            std::fs::write(&shard, &bytes[..cut]).unwrap();
            let t = ix_text.replace(
                &format!("\"bytes\": {}", first.bytes),
                &format!("\"bytes\": {cut}"),
            );
            std::fs::write(&ix_path, t).unwrap();
        },
        &[&first.file, "at byte"],
    );
    // A header whose bytes are garbage (checksum fails).
    case(
        "bad header",
        &|| {
            let mut b = bytes.clone();
            b[0..8].copy_from_slice(b"garbage!");
            std::fs::write(&shard, b).unwrap();
        },
        &[&first.file, "at byte 0", "not a tar header"],
    );
    // An entry claiming an absurd size (checksum fixed up, so only the size is a lie).
    case(
        "absurd size",
        &|| {
            let mut b = bytes.clone();
            b[124..136].copy_from_slice(b"77777777777\0");
            b[148..156].fill(b' ');
            let sum: u64 = b[..512].iter().map(|x| *x as u64).sum();
            b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            std::fs::write(&shard, b).unwrap();
        },
        &[&first.file, "over the", "limit"],
    );
    // The index claims more samples than the shard holds.
    case(
        "count",
        &|| {
            let t = ix_text.replacen(
                &format!("\"samples\": {}", first.samples),
                &format!("\"samples\": {}", first.samples + 1),
                1,
            );
            std::fs::write(&ix_path, t).unwrap();
        },
        &[&first.file, "the index says"],
    );
    // Names that leave the folder, and absurd counts.
    case(
        "escape",
        &|| {
            let t = ix_text.replacen(&first.file, "../../etc/passwd.tar", 1);
            std::fs::write(&ix_path, t).unwrap();
        },
        &["plain `.tar` file name"],
    );
    case(
        "absurd count",
        &|| {
            let t = ix_text.replacen(
                &format!("\"samples\": {}", first.samples),
                "\"samples\": 999999999999",
                1,
            );
            std::fs::write(&ix_path, t).unwrap();
        },
        &["cannot fit"],
    );
    case(
        "listed twice",
        &|| {
            let v: serde_json::Value = serde_json::from_str(&ix_text).unwrap();
            let mut v2 = v.clone();
            let first = v["shards"][0].clone();
            v2["shards"].as_array_mut().unwrap().push(first);
            std::fs::write(&ix_path, v2.to_string()).unwrap();
        },
        &["listed twice"],
    );
    case(
        "not an index",
        &|| std::fs::write(&ix_path, "{\"format\": \"other\"}").unwrap(),
        &[INDEX, "not a shard index"],
    );
    // A bad image in the manifest: the pack fails naming its line, and leaves nothing.
    let bad_line = m.items[7].line;
    std::fs::write(&m.items[7].path, b"not an image").unwrap();
    let out2 = d.join("pack2");
    let e = pack(&m, &out2, &small()).unwrap_err().to_string();
    println!("bad image: {e}");
    assert!(e.contains(&format!("line {bad_line}")), "{e}");
    let left: Vec<_> = std::fs::read_dir(&out2).unwrap().collect();
    assert!(left.is_empty(), "nothing half-written: {left:?}");
    // With skip_bad: left out and listed.
    let p = pack(
        &m,
        &d.join("pack3"),
        &PackOptions {
            skip_bad: true,
            ..small()
        },
    )
    .unwrap();
    assert_eq!(p.skipped.len(), 1);
    assert_eq!(p.skipped[0].0, bad_line);
    std::fs::remove_dir_all(&d).ok();
}

/// `sd2 pack` from the command line: resized and re-encoded, face crops (a photo without a
/// face left out and counted), and its argument errors.
#[test]
fn pack_command_resizes_and_crops_faces() {
    let d = tmp("cli");
    let m = data(&d.join("src"), 24);
    let out = d.join("small");
    let r = sd2(&[
        "pack",
        "--manifest",
        m.path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--size",
        "16",
        "--format",
        "png",
    ]);
    println!("{}", String::from_utf8_lossy(&r.stdout));
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let ix = ShardIndex::load(&out).unwrap();
    assert_eq!(ix.size, Some(16));
    for s in ShardStream::open(&ix, &StreamOptions::sequential(Split::Train)).unwrap() {
        let s = s.unwrap();
        let img = sd2::clip::preprocess::decode_image_bytes(&s.image, "x").unwrap();
        assert_eq!((s.ext.as_str(), img.width, img.height), ("png", 16, 16));
    }
    // Faces: two photos with one face each, and a cat.
    let faces = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/faces");
    let fm = d.join("faces.jsonl");
    let rec = |f: &str, label: &str| {
        format!(
            "{{\"path\":\"{}\",\"label\":\"{label}\",\"source\":\"photos\",\"split\":\"train\"}}\n",
            faces.join(f).display()
        )
    };
    std::fs::write(
        &fm,
        rec("astronaut.jpg", "real") + &rec("chelsea.jpg", "real") + &rec("grace_hopper.jpg", "fs"),
    )
    .unwrap();
    let fout = d.join("faces");
    let r = sd2(&[
        "pack",
        "--manifest",
        fm.to_str().unwrap(),
        "--out",
        fout.to_str().unwrap(),
        "--face-crop",
        "--size",
        "64",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    println!("{}{err}", String::from_utf8_lossy(&r.stdout));
    assert!(r.status.success(), "{err}");
    assert!(
        err.contains("1 images without a face left out (lines 2)"),
        "{err}"
    );
    let ix = ShardIndex::load(&fout).unwrap();
    assert!(ix.face_crop);
    let got: Vec<_> = ShardStream::open(&ix, &StreamOptions::sequential(Split::Train))
        .unwrap()
        .map(|s| s.unwrap())
        .collect();
    let mut lines: Vec<usize> = got.iter().map(|s| s.item.line).collect();
    lines.sort_unstable();
    assert_eq!(lines, [1, 3]);
    for s in &got {
        let img = sd2::clip::preprocess::decode_image_bytes(&s.image, "x").unwrap();
        assert_eq!((s.ext.as_str(), img.width, img.height), ("jpg", 64, 64));
    }
    for (args, says) in [
        (vec!["--shard-size", "1 parsec"], "unknown unit"),
        (vec!["--shard-size", "10"], "between 64KiB"),
        (vec!["--format", "gif"], "give keep, jpg or png"),
    ] {
        let o = d.join("x");
        let mut a = vec![
            "pack",
            "--manifest",
            m.path.to_str().unwrap(),
            "--out",
            o.to_str().unwrap(),
        ];
        a.extend(args);
        let r = sd2(&a);
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && e.contains(says), "{e}");
    }
    let _ = PackFormat::Keep;
    std::fs::remove_dir_all(&d).ok();
}

/// `sd2 train` on a pack: it trains (validation from the pack's val shards), and `kill -9`
/// at random points, each followed by `--resume`, ends with the weights and optimizer moments
/// of an uninterrupted run bit for bit — the stream resumes mid-epoch exactly.
#[test]
fn training_on_a_pack_resumes_mid_epoch_bit_identical() {
    let d = tmp("train");
    let m = sd2::data::synth::generate(&d.join("data"), 64, 64, 4).unwrap();
    let packed = d.join("pack");
    pack(&m, &packed, &small()).unwrap();
    let (reference, killed) = (d.join("ref"), d.join("killed"));
    let with_buffer = |out: &Path| {
        let mut a = tiny_run_args(&packed, out);
        a.extend(["--set".to_string(), "shuffle_buffer=12".to_string()]);
        a
    };
    let t0 = std::time::Instant::now();
    let args = with_buffer(&reference);
    let r = sd2(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&r.stdout),
        String::from_utf8_lossy(&r.stderr)
    );
    println!("{out}");
    assert!(r.status.success(), "{out}");
    assert!(out.contains("epoch 2: validation AUC"), "{out}");
    let full = t0.elapsed();
    let args = with_buffer(&killed);
    let mut resume: Vec<&str> = args.iter().map(String::as_str).collect();
    resume.push("--resume");
    let mut rng = sd2::rng::Rng::new(7);
    let mut kills = 0;
    while kills < 4 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sd2"))
            .args(&resume)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(full.mul_f64(0.2 + 0.5 * rng.uniform()));
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success());
                break;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
    }
    let r = sd2(&resume);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    for f in ["trainable.safetensors", "optimizer.safetensors"] {
        let want = file_bytes(&reference.join("checkpoints/last").join(f));
        let got = file_bytes(&killed.join("checkpoints/last").join(f));
        assert!(want == got, "{f} differs after {kills} kills and resumes");
    }
    println!("{kills} kills; the resumed run ends bit-identical ({full:?} uninterrupted)");
    // A resume must stream the same way.
    let mut other: Vec<String> = with_buffer(&killed);
    other.extend([
        "--set".to_string(),
        "shuffle_buffer=13".to_string(),
        "--resume".to_string(),
    ]);
    let r = sd2(&other.iter().map(String::as_str).collect::<Vec<_>>());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && e.contains("shuffle_buffer"), "{e}");
    // A pack without descriptions, with the dual contrast on: refused before training.
    let mut bare = m.clone();
    bare.items.iter_mut().for_each(|i| i.env.clear());
    let bare_pack = d.join("bare");
    let p = pack(&bare, &bare_pack, &small()).unwrap();
    assert!(!p.index.described);
    let args = tiny_run_args(&bare_pack, &d.join("bare-run"));
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--set", "sd2.loss_dual=\"face_env\""]);
    let r = sd2(&a);
    let e = String::from_utf8_lossy(&r.stderr);
    println!("{e}");
    assert!(
        !r.status.success() && e.contains("no face/env description"),
        "{e}"
    );
    std::fs::remove_dir_all(&d).ok();
}

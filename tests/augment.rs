//! Train augmentations (SD2-SPEC §5), the `--perturb` degradations and the prefetching loader.
use sd2::clip::preprocess::RgbImage;
use sd2::data::augment::{self, AugmentConfig, Perturb};

fn noise_image(w: usize, h: usize, seed: u64) -> RgbImage {
    let mut r = sd2::rng::Rng::new(seed);
    let data = (0..w * h * 3).map(|_| r.below(256) as u8).collect();
    RgbImage::new(w, h, data).unwrap()
}

fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.data.len() as f64
}

#[test]
fn deterministic_per_seed_epoch_index() {
    let base = noise_image(40, 40, 1);
    let cfg = AugmentConfig::default();
    let run = |seed, epoch, index| {
        let mut img = base.clone();
        augment::augment(&mut img, &cfg, &mut augment::rng_for(seed, epoch, index)).unwrap();
        img.data
    };
    assert_eq!(run(3, 1, 7), run(3, 1, 7));
    let variants = [run(3, 2, 7), run(3, 1, 8), run(4, 1, 7)];
    for v in &variants {
        assert_ne!(*v, run(3, 1, 7));
    }
}

#[test]
fn switched_off_is_identity_and_geometry_is_exact() {
    let base = noise_image(33, 21, 2);
    let off = AugmentConfig {
        flip_p: 0.0,
        rotate_p: 0.0,
        scale: (1.0, 1.0),
        color_p: 0.0,
        blur_p: 0.0,
        jpeg_p: 0.0,
        ..Default::default()
    };
    let mut img = base.clone();
    augment::augment(&mut img, &off, &mut augment::rng_for(0, 0, 0)).unwrap();
    assert_eq!(img.data, base.data);
    // Flip twice is the identity; once, pixel (x, y) moves to (w-1-x, y).
    let mut f = base.clone();
    augment::hflip(&mut f);
    assert_eq!(f.data[0..3], base.data[(32) * 3..(32) * 3 + 3]);
    augment::hflip(&mut f);
    assert_eq!(f.data, base.data);
    // The affine warp at angle 0, scale 1 is exact; a 90° rotation of a square image permutes
    // pixels exactly: out(x, y) = in(y, w-1-x).
    assert_eq!(augment::affine(&base, 0.0, 1.0, 0.0, 0.0).data, base.data);
    let sq = noise_image(16, 16, 3);
    let rot = augment::affine(&sq, std::f64::consts::FRAC_PI_2, 1.0, 0.0, 0.0);
    for y in 0..16 {
        for x in 0..16 {
            let (sx, sy) = (y, 15 - x);
            assert_eq!(
                rot.data[(y * 16 + x) * 3..(y * 16 + x) * 3 + 3],
                sq.data[(sy * 16 + sx) * 3..(sy * 16 + sx) * 3 + 3],
                "({x}, {y})"
            );
        }
    }
    // Zooming in by 2 about the centre: the centre pixel pair averages to the output centre.
    let z = augment::affine(&sq, 0.0, 2.0, 0.0, 0.0);
    assert_eq!(z.width, 16);
    assert_ne!(z.data, sq.data);
}

#[test]
fn blur_and_jpeg_degrade_as_expected() {
    let base = noise_image(48, 48, 4);
    // A constant image is unchanged by blur; noise loses most of its variance.
    let mut flat = RgbImage::new(10, 10, vec![77; 300]).unwrap();
    augment::gaussian_blur(&mut flat, 1.5);
    assert!(flat.data.iter().all(|v| *v == 77));
    let var = |img: &RgbImage| {
        let m = img.data.iter().map(|v| *v as f64).sum::<f64>() / img.data.len() as f64;
        img.data
            .iter()
            .map(|v| (*v as f64 - m).powi(2))
            .sum::<f64>()
            / img.data.len() as f64
    };
    let (mut b1, mut b2) = (base.clone(), base.clone());
    augment::gaussian_blur(&mut b1, 0.5);
    augment::gaussian_blur(&mut b2, 2.0);
    println!(
        "variance: {} → σ 0.5: {} → σ 2: {}",
        var(&base),
        var(&b1),
        var(&b2)
    );
    assert!(var(&b2) < var(&b1) && var(&b1) < var(&base));
    assert!(var(&b2) < 0.1 * var(&base));
    let (mut q95, mut q20) = (base.clone(), base.clone());
    augment::jpeg(&mut q95, 95).unwrap();
    augment::jpeg(&mut q20, 20).unwrap();
    let (d95, d20) = (mean_abs_diff(&q95, &base), mean_abs_diff(&q20, &base));
    println!("JPEG mean |diff|: q95 {d95:.2}, q20 {d20:.2}");
    assert!(d95 < d20 && d95 > 0.0);
    assert_eq!(
        (q20.width, q20.height, q20.data.len()),
        (48, 48, 48 * 48 * 3)
    );
}

#[test]
fn perturb_specs_parse_and_fail_clearly() {
    assert_eq!(
        Perturb::parse_list("jpeg:90,70,50,30").unwrap(),
        vec![
            Perturb::Jpeg(90),
            Perturb::Jpeg(70),
            Perturb::Jpeg(50),
            Perturb::Jpeg(30)
        ]
    );
    let b = Perturb::parse_list("blur:1,2.5").unwrap();
    assert_eq!(b, vec![Perturb::Blur(1.0), Perturb::Blur(2.5)]);
    assert_eq!(b[1].name(), "blur:2.5");
    for bad in [
        "jpeg:0", "jpeg:101", "jpeg:x", "blur:-1", "blur:", "noise:3", "jpeg90",
    ] {
        let e = Perturb::parse_list(bad).unwrap_err().to_string();
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn prefetcher_keeps_order_and_names_bad_lines() {
    use sd2::data::loader::{Prefetcher, Transform};
    use sd2::data::{synth, Item};
    let d = std::env::temp_dir().join(format!("sd2-prefetch-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = synth::generate(&d, 40, 32, 5).unwrap();
    let batches: Vec<Vec<Item>> = m.items.chunks(6).map(|c| c.to_vec()).collect();
    let mut seen = vec![];
    for b in Prefetcher::new(batches.clone(), 32, Transform::None, 2) {
        let b = b.unwrap();
        assert_eq!(b.pixels.len(), b.items.len() * 3 * 32 * 32);
        seen.extend(b.items.iter().map(|i| i.line));
    }
    assert_eq!(seen, (1..=40).collect::<Vec<_>>());
    // Pixels equal the direct (non-prefetched) load.
    let direct = sd2::data::loader::load_host(&batches[1], 32, &Transform::None).unwrap();
    let pre = Prefetcher::new(batches.clone(), 32, Transform::None, 1)
        .nth(1)
        .unwrap()
        .unwrap();
    assert_eq!(pre.pixels, direct);
    // Dropping a prefetcher early does not hang.
    let mut p = Prefetcher::new(batches.clone(), 32, Transform::None, 1);
    p.next().unwrap().unwrap();
    drop(p);
    // A file that stops decoding mid-run: the error names the manifest line.
    std::fs::write(&batches[2][1].path, b"not a png").unwrap();
    let err = Prefetcher::new(batches, 32, Transform::None, 2)
        .find_map(|b| b.err())
        .unwrap()
        .to_string();
    assert!(err.contains("manifest line 14"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

/// `DeviceBatches` (the staged uploads of `sd2 train` / predict): batches in order, paired
/// with their pixels, and a bad file's error in its own batch's place — after every batch
/// before it, even with several batches staged ahead. Run on the CPU and on `cuda:sim`.
#[test]
fn device_batches_keep_order_and_report_errors_in_place() {
    use sd2::data::loader::{load_host, DeviceBatches, Prefetcher, Transform};
    use sd2::data::{synth, Item};
    use sd2::{DType, Device};
    let d = std::env::temp_dir().join(format!("sd2-devbatches-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    let m = synth::generate(&d, 30, 32, 7).unwrap();
    let batches: Vec<Vec<Item>> = m.items.chunks(4).map(|c| c.to_vec()).collect();
    let mut devices = vec![Device::Cpu];
    if cfg!(feature = "cuda-sim") {
        devices.push(Device::CUDA_SIM);
    }
    for dev in devices {
        let staged = |ahead| {
            DeviceBatches::new(
                Prefetcher::new(batches.clone(), 32, Transform::None, 2),
                ahead,
                32,
                DType::F32,
                dev,
            )
        };
        let (mut lines, mut n) = (vec![], 0);
        for (k, b) in staged(3).enumerate() {
            let (items, px) = b.unwrap();
            assert_eq!(px.device(), dev);
            assert_eq!(px.dims(), &[items.len(), 3, 32, 32]);
            let want = load_host(&batches[k], 32, &Transform::None).unwrap();
            let got: Vec<f32> = px.to_vec().unwrap();
            assert_eq!(got, want, "{dev}: batch {k} pixels");
            lines.extend(items.iter().map(|i| i.line));
            n += 1;
        }
        assert_eq!((n, lines), (8, (1..=30).collect::<Vec<_>>()), "{dev}");
    }
    // Batch 5 (lines 21–24) breaks; with 3 staged ahead its error still comes 6th.
    std::fs::write(&batches[5][2].path, b"not a png").unwrap();
    let got: Vec<Result<usize, String>> = DeviceBatches::new(
        Prefetcher::new(batches.clone(), 32, Transform::None, 2),
        3,
        32,
        DType::F32,
        Device::Cpu,
    )
    .map(|b| b.map(|(items, _)| items[0].line).map_err(|e| e.to_string()))
    .collect();
    assert_eq!(got.len(), 6, "{got:?}");
    assert_eq!(
        got[..5]
            .iter()
            .map(|r| r.clone().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 5, 9, 13, 17]
    );
    let e = got[5].clone().unwrap_err();
    assert!(e.contains("manifest line 23"), "{e}");
    std::fs::remove_dir_all(&d).ok();
}

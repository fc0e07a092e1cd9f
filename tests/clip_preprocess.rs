//! Image preprocessing against HuggingFace's CLIPImageProcessor on generated PNGs (fixtures
//! from scripts/reference/clip_reference.py): the resized-and-cropped 8-bit image must equal the
//! PIL backend's exactly; the torchvision backend (transformers' default) is reported.
#[path = "common/clip.rs"]
mod clip_common;

use clip_common::{fixture, load_map};
use sd2::clip::preprocess::{
    center_crop, decode_image, preprocess, resize_bicubic, short_side_size,
};

const IMAGES: [&str; 5] = [
    "landscape_300x200",
    "portrait_200x333",
    "square_224",
    "small_97x150",
    "wide_517x230",
];

/// Our resized + cropped image, CHW bytes.
fn ours_u8(name: &str, size: usize) -> Vec<f64> {
    let img = decode_image(&fixture("clip_images").join(format!("{name}.png"))).unwrap();
    let (w, h) = short_side_size(img.width, img.height, size);
    let c = center_crop(&resize_bicubic(&img, w, h), size);
    let mut out = vec![0.0; 3 * size * size];
    for ch in 0..3 {
        for i in 0..size * size {
            out[ch * size * size + i] = c.data[i * 3 + ch] as f64;
        }
    }
    out
}

fn max_diff(key: &str, size: usize) -> (f64, f64) {
    let exp = load_map(&fixture("clip_images").join("expected.safetensors"));
    let want = exp[key].to_vec_f64().unwrap();
    let n = 3 * size * size;
    let (mut worst, mut sum) = (0f64, 0f64);
    for (k, name) in IMAGES.iter().enumerate() {
        let ours = ours_u8(name, size);
        let w = &want[k * n..(k + 1) * n];
        let d = ours
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        let mean = ours.iter().zip(w).map(|(a, b)| (a - b).abs()).sum::<f64>() / n as f64;
        println!("{key} {name}: max |diff| {d} pixel units, mean {mean:.4}");
        worst = worst.max(d);
        sum += mean;
    }
    (worst, sum / IMAGES.len() as f64)
}

#[test]
fn matches_the_pil_backend_exactly() {
    for size in [224, 64] {
        let (worst, _) = max_diff(&format!("pil.{size}.u8"), size);
        assert_eq!(
            worst, 0.0,
            "size {size}: PIL-backend images differ by up to {worst} pixel units"
        );
    }
}

#[test]
fn torchvision_backend_is_within_a_few_pixel_units() {
    let (worst, mean) = max_diff("torchvision.224.u8", 224);
    println!("torchvision backend: max {worst} pixel units, mean {mean:.4}");
    assert!(
        worst <= 3.0 && mean < 0.2,
        "torchvision backend differs by {worst} (mean {mean})"
    );
}

#[test]
fn rescale_and_normalize_match() {
    let exp = load_map(&fixture("clip_images").join("expected.safetensors"));
    for size in [224, 64] {
        let want = exp[&format!("pil.{size}.first_rows")].to_vec_f64().unwrap();
        let mut worst = 0f64;
        for (k, name) in IMAGES.iter().enumerate() {
            let img = decode_image(&fixture("clip_images").join(format!("{name}.png"))).unwrap();
            let pv = preprocess(&img, size);
            for c in 0..3 {
                for r in 0..2 {
                    for x in 0..size {
                        let got = pv[c * size * size + r * size + x] as f64;
                        let w = want[((k * 3 + c) * 2 + r) * size + x];
                        worst = worst.max((got - w).abs());
                    }
                }
            }
        }
        println!("size {size}: normalized values differ by at most {worst:.2e}");
        assert!(worst <= 1e-6, "normalized values differ by {worst}");
    }
}

#[test]
fn undecodable_and_oversized_images_are_errors() {
    let dir = std::env::temp_dir().join(format!("sd2-img-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("not_an_image.png");
    std::fs::write(&bad, b"definitely not a png").unwrap();
    let e = decode_image(&bad).unwrap_err().to_string();
    assert!(e.contains("not_an_image.png"), "{e}");
    // A PNG header claiming 100000 x 100000 pixels is refused before allocating.
    let mut png = vec![
        0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a, 0, 0, 0, 13, b'I', b'H', b'D', b'R',
    ];
    png.extend(100_000u32.to_be_bytes());
    png.extend(100_000u32.to_be_bytes());
    png.extend([8, 2, 0, 0, 0, 0, 0, 0, 0]);
    let big = dir.join("bomb.png");
    std::fs::write(&big, png).unwrap();
    let e = decode_image(&big).unwrap_err().to_string();
    assert!(e.contains("bomb.png"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

//! Aligned face crops, DeepfakeBench's protocol: five landmarks (an eye each, the nose tip,
//! the mouth's corners) mapped by a similarity transform (rotation, uniform scale, shift;
//! least squares, Umeyama's method, as scikit-image's `SimilarityTransform.estimate`) onto
//! ArcFace's 112-px template scaled to the output with a 1.3× margin, then the image warped
//! (bilinear, black outside, as OpenCV's `warpAffine`). The landmarks come from dlib's 68-point
//! predictor (feature `dlib`, `faces::dlib`); this part is plain arithmetic and always built.
use crate::clip::preprocess::RgbImage;
use crate::{Error, Result};

/// ArcFace's five points on a 112 × 112 face (left eye, right eye, nose tip, left and right
/// mouth corner), shifted 8 px right as DeepfakeBench does for a square output.
pub const TEMPLATE_112: [[f64; 2]; 5] = [
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
];

/// The side DeepfakeBench's aligned crops have.
pub const ALIGNED_SIZE: usize = 256;

/// Which of dlib's 68 landmarks are the five (DeepfakeBench's choice: points 37 and 44 on the
/// eyes' upper lids, 30 the nose tip, 49 and 55 by the mouth's corners).
pub const FIVE_OF_68: [usize; 5] = [37, 44, 30, 49, 55];

/// The five points of 68 dlib landmarks.
pub fn five_points(landmarks: &[[f32; 2]; 68]) -> [[f32; 2]; 5] {
    FIVE_OF_68.map(|i| landmarks[i])
}

/// The template's points in an `out`-px crop with `margin` (1.3: the face fills 1/1.3 of it).
pub fn template(out: usize, margin: f64) -> [[f64; 2]; 5] {
    let s = out as f64;
    let pad = s * (margin - 1.0) / 2.0;
    TEMPLATE_112.map(|[x, y]| {
        let (x, y) = (x * s / 112.0 + pad, y * s / 112.0 + pad);
        [x * s / (s + 2.0 * pad), y * s / (s + 2.0 * pad)]
    })
}

/// The similarity transform taking `src` closest to `dst` in least squares: a 2 × 3 matrix
/// [[a, −b, tx], [b, a, ty]] (x' = a·x − b·y + tx, y' = b·x + a·y + ty).
pub fn similarity(src: &[[f64; 2]], dst: &[[f64; 2]]) -> Result<[[f64; 3]; 2]> {
    let n = src.len();
    if n < 2 || n != dst.len() {
        return Err(Error::invalid(
            "similarity",
            format!("{n} source and {} target points", dst.len()),
        ));
    }
    let mean = |p: &[[f64; 2]]| {
        let (sx, sy) = p.iter().fold((0.0, 0.0), |a, q| (a.0 + q[0], a.1 + q[1]));
        [sx / n as f64, sy / n as f64]
    };
    let (ms, md) = (mean(src), mean(dst));
    // Umeyama in 2-D: with centred points, the best rotation+scale is a + ib =
    // Σ conj(s)·d / Σ |s|² over the points as complex numbers.
    let (mut re, mut im, mut var) = (0.0, 0.0, 0.0);
    for (s, d) in src.iter().zip(dst) {
        let (sx, sy) = (s[0] - ms[0], s[1] - ms[1]);
        let (dx, dy) = (d[0] - md[0], d[1] - md[1]);
        re += sx * dx + sy * dy;
        im += sx * dy - sy * dx;
        var += sx * sx + sy * sy;
    }
    if !(var.is_finite() && var > 1e-12) {
        return Err(Error::invalid(
            "similarity",
            "the source points coincide (no face to align)",
        ));
    }
    let (a, b) = (re / var, im / var);
    let tx = md[0] - (a * ms[0] - b * ms[1]);
    let ty = md[1] - (b * ms[0] + a * ms[1]);
    Ok([[a, -b, tx], [b, a, ty]])
}

/// `img` warped by the 2 × 3 `m` (input → output pixels) into an `out × out` image: each
/// output pixel samples the input bilinearly at m⁻¹ of its position; black outside.
pub fn warp_affine(img: &RgbImage, m: &[[f64; 3]; 2], out: usize) -> Result<RgbImage> {
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    if !(det.is_finite() && det.abs() > 1e-12) {
        return Err(Error::invalid("warp_affine", "the transform is singular"));
    }
    // The inverse map, output → input.
    let (ia, ib, ic, id) = (m[1][1] / det, -m[0][1] / det, -m[1][0] / det, m[0][0] / det);
    let (tx, ty) = (m[0][2], m[1][2]);
    let (w, h) = (img.width as isize, img.height as isize);
    let px = |x: isize, y: isize, c: usize| -> f64 {
        if x < 0 || y < 0 || x >= w || y >= h {
            0.0
        } else {
            img.data[((y * w + x) * 3) as usize + c] as f64
        }
    };
    let mut data = vec![0u8; out * out * 3];
    for oy in 0..out {
        for ox in 0..out {
            let (dx, dy) = (ox as f64 - tx, oy as f64 - ty);
            let sx = ia * dx + ib * dy;
            let sy = ic * dx + id * dy;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as isize, y0 as isize);
            for c in 0..3 {
                let v = (1.0 - fy) * ((1.0 - fx) * px(x0, y0, c) + fx * px(x0 + 1, y0, c))
                    + fy * ((1.0 - fx) * px(x0, y0 + 1, c) + fx * px(x0 + 1, y0 + 1, c));
                data[(oy * out + ox) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::new(out, out, data)
}

/// The aligned `out`-px crop of the face whose five points are `five` (`five_points`), with
/// `margin` around the template (DeepfakeBench: 256 px, 1.3).
pub fn align_crop(
    img: &RgbImage,
    five: &[[f32; 2]; 5],
    out: usize,
    margin: f64,
) -> Result<RgbImage> {
    let src = five.map(|[x, y]| [x as f64, y as f64]);
    let m = similarity(&src, &template(out, margin))?;
    warp_affine(img, &m, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transform_is_recovered_and_the_template_placed() {
        // Points rotated by 30°, scaled 1.7 and shifted: recovered exactly.
        let (c, s) = (
            30f64.to_radians().cos() * 1.7,
            30f64.to_radians().sin() * 1.7,
        );
        let src = [
            [10.0, 20.0],
            [40.0, 22.0],
            [25.0, 40.0],
            [12.0, 60.0],
            [38.0, 61.0],
        ];
        let dst = src.map(|[x, y]| [c * x - s * y + 5.0, s * x + c * y - 3.0]);
        let m = similarity(&src, &dst).unwrap();
        let want = [[c, -s, 5.0], [s, c, -3.0]];
        for (r, w) in m.iter().zip(&want) {
            for (a, b) in r.iter().zip(w) {
                assert!((a - b).abs() < 1e-9, "{m:?} vs {want:?}");
            }
        }
        // Margin 1 at 112 px is the template itself; 1.3 pulls it toward the centre.
        assert_eq!(template(112, 1.0), TEMPLATE_112);
        let t = template(256, 1.3);
        let centre = 128.0;
        for (p, q) in t.iter().zip(template(256, 1.0)) {
            assert!((p[0] - centre).abs() < (q[0] - centre).abs() + 1e-9);
        }
        assert!(similarity(&[[1.0, 1.0]; 5], &dst).is_err());
    }

    #[test]
    fn warping_by_a_shift_moves_pixels_and_fills_black() {
        let mut data = vec![0u8; 8 * 8 * 3];
        data[(2 * 8 + 3) * 3] = 200; // red at (3, 2)
        let img = RgbImage::new(8, 8, data).unwrap();
        let out = warp_affine(&img, &[[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], 8).unwrap();
        assert_eq!(out.data[(3 * 8 + 5) * 3], 200, "moved to (5, 3)");
        assert_eq!(out.data[0], 0, "outside the input: black");
        assert!(warp_affine(&img, &[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], 8).is_err());
    }
}

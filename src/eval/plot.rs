//! The report's figures as PNG: ROC and precision–recall curves (overall and per source) and the
//! 5-class confusion matrix. Drawn with plotters into a pixel buffer and written atomically;
//! the font (DejaVu Sans Mono, see `fonts/DejaVu-LICENSE.txt`) is built in so the output is the
//! same on every machine.
use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use super::metrics::{pr_curve, roc_curve};
use super::predict::Pred;
use crate::sd2::type_texts::CLASSES;
use crate::{Error, Result};

const FONT: &[u8] = include_bytes!("fonts/DejaVuSansMono.ttf");
const W: u32 = 640;
const H: u32 = 560;
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 0, 0),
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

fn font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::Msg("plot: the built-in font did not load".into()))
    }
}

fn perr(path: &Path, e: impl std::fmt::Debug) -> Error {
    Error::Msg(format!("{}: plot: {e:?}", path.display()))
}

/// Encodes an RGB buffer as PNG and writes it atomically.
fn save_png(path: &Path, buf: &[u8]) -> Result<()> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(buf, W, H, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Msg(format!("{}: png: {e}", path.display())))?;
    crate::fs::write_atomic(path, png)
}

/// Groups `preds` as (name, scores, is-fake): "overall" first, then each source.
fn groups(preds: &[Pred]) -> Vec<(String, Vec<f64>, Vec<bool>)> {
    let mut sources: Vec<&str> = preds.iter().map(|p| p.source.as_str()).collect();
    sources.sort();
    sources.dedup();
    let pick = |f: &dyn Fn(&Pred) -> bool| -> (Vec<f64>, Vec<bool>) {
        preds
            .iter()
            .filter(|p| f(p))
            .map(|p| (p.fake_score, p.label != 0))
            .unzip()
    };
    let mut out = vec![];
    let (s, f) = pick(&|_| true);
    out.push(("overall".to_string(), s, f));
    if sources.len() > 1 {
        for src in sources.into_iter().take(PALETTE.len() - 1) {
            let (s, f) = pick(&|p| p.source == src);
            out.push((src.to_string(), s, f));
        }
    }
    out
}

/// A line chart on [0, 1]² with one series per (name, points).
fn curves(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
    legend_low: bool,
) -> Result<()> {
    font()?;
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..1f64, 0f64..1.0f64)
            .map_err(|e| perr(path, e))?;
        chart
            .configure_mesh()
            .x_desc(xlabel)
            .y_desc(ylabel)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| perr(path, e))?;
        for (k, (name, pts)) in series.iter().enumerate() {
            let color = PALETTE[k % PALETTE.len()];
            let width = if k == 0 { 3 } else { 2 };
            chart
                .draw_series(LineSeries::new(
                    pts.iter().copied(),
                    color.stroke_width(width),
                ))
                .map_err(|e| perr(path, e))?
                .label(name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width))
                });
        }
        chart
            .configure_series_labels()
            .position(if legend_low {
                SeriesLabelPosition::LowerRight
            } else {
                SeriesLabelPosition::LowerLeft
            })
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| perr(path, e))?;
        root.present().map_err(|e| perr(path, e))?;
    }
    save_png(path, &buf)
}

/// `roc.png`: ROC curves with their AUC in the legend.
pub fn roc_png(path: &Path, preds: &[Pred]) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = groups(preds)
        .into_iter()
        .filter_map(|(name, s, f)| {
            let auc = super::metrics::roc_auc(&s, &f);
            if auc.is_nan() {
                return None;
            }
            let (fpr, tpr, _) = roc_curve(&s, &f);
            Some((
                format!("{name} (AUC {auc:.3})"),
                fpr.into_iter().zip(tpr).collect(),
            ))
        })
        .collect();
    curves(
        path,
        "ROC (fake = positive)",
        "false positive rate",
        "true positive rate",
        &series,
        true,
    )
}

/// `pr.png`: precision–recall curves with their AP in the legend.
pub fn pr_png(path: &Path, preds: &[Pred]) -> Result<()> {
    let series: Vec<(String, Vec<(f64, f64)>)> = groups(preds)
        .into_iter()
        .filter_map(|(name, s, f)| {
            let (p, r) = pr_curve(&s, &f);
            if p.is_empty() {
                return None;
            }
            let ap = super::metrics::average_precision(&s, &f);
            Some((
                format!("{name} (AP {ap:.3})"),
                r.into_iter().zip(p).collect(),
            ))
        })
        .collect();
    curves(
        path,
        "Precision-recall (fake = positive)",
        "recall",
        "precision",
        &series,
        false,
    )
}

/// `confusion.png`: the 5-class confusion matrix, rows = truth, columns = prediction, each cell
/// shaded by its share of the row and labelled with its count.
pub fn confusion_png(path: &Path, m: &[Vec<usize>]) -> Result<()> {
    font()?;
    let mut buf = vec![0u8; (W * H * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| perr(path, e))?;
        let (x0, y0, cell) = (130i32, 90i32, 90i32);
        let style = |size: i32, color: &'static RGBColor| {
            TextStyle::from(("sans-serif", size).into_font())
                .color(color)
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                ))
        };
        root.draw(&Text::new(
            "Confusion matrix (rows: truth, columns: predicted)",
            (W as i32 / 2, 30),
            style(17, &BLACK),
        ))
        .map_err(|e| perr(path, e))?;
        for (j, name) in CLASSES.iter().enumerate() {
            let c = x0 + j as i32 * cell + cell / 2;
            root.draw(&Text::new(
                name.to_uppercase(),
                (c, y0 - 18),
                style(15, &BLACK),
            ))
            .map_err(|e| perr(path, e))?;
            root.draw(&Text::new(
                name.to_uppercase(),
                (x0 - 50, y0 + j as i32 * cell + cell / 2),
                style(15, &BLACK),
            ))
            .map_err(|e| perr(path, e))?;
        }
        for (i, row) in m.iter().enumerate().take(CLASSES.len()) {
            let total: usize = row.iter().sum();
            for (j, &v) in row.iter().enumerate().take(CLASSES.len()) {
                let share = if total > 0 {
                    v as f64 / total as f64
                } else {
                    0.0
                };
                let shade = (255.0 * (1.0 - 0.8 * share)) as u8;
                let (cx, cy) = (x0 + j as i32 * cell, y0 + i as i32 * cell);
                root.draw(&Rectangle::new(
                    [(cx, cy), (cx + cell, cy + cell)],
                    RGBColor(shade, shade, 255).filled(),
                ))
                .map_err(|e| perr(path, e))?;
                root.draw(&Rectangle::new(
                    [(cx, cy), (cx + cell, cy + cell)],
                    BLACK.stroke_width(1),
                ))
                .map_err(|e| perr(path, e))?;
                let ink: &'static RGBColor = if share > 0.6 { &WHITE } else { &BLACK };
                root.draw(&Text::new(
                    v.to_string(),
                    (cx + cell / 2, cy + cell / 2),
                    style(16, ink),
                ))
                .map_err(|e| perr(path, e))?;
            }
        }
        root.present().map_err(|e| perr(path, e))?;
    }
    save_png(path, &buf)
}

/// `img` with each face's box drawn — red when its `fake_score` is ≥ 0.5, green otherwise —
/// and labelled with its score and, unless real, its class (`fake 0.93 fs`, `real 0.10`),
/// for `sd2 predict --annotate`.
pub fn annotate_faces(
    img: &crate::clip::preprocess::RgbImage,
    faces: &[crate::sd2::detector::FaceScore],
) -> Result<crate::clip::preprocess::RgbImage> {
    font()?;
    let (w, h) = (img.width as u32, img.height as u32);
    let mut buf = img.data.clone();
    let fail = |e: &dyn std::fmt::Debug| Error::Msg(format!("annotate: {e:?}"));
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let size = (w.max(h) / 50).clamp(12, 48) as i32;
        for f in faces {
            let color = if f.fake_score >= 0.5 {
                RGBColor(230, 30, 30)
            } else {
                RGBColor(30, 200, 60)
            };
            let b = f.face.bbox.map(|v| v.round() as i32);
            let stroke = ((b[2] - b[0]) / 60).clamp(2, 8) as u32;
            root.draw(&Rectangle::new(
                [(b[0], b[1]), (b[2], b[3])],
                color.stroke_width(stroke),
            ))
            .map_err(|e| fail(&e))?;
            let label = match (f.fake_score >= 0.5, f.class) {
                (false, crate::sd2::detector::Class::Real) => format!("real {:.2}", f.fake_score),
                (fake, class) => format!(
                    "{} {:.2} {class}",
                    if fake { "fake" } else { "real" },
                    f.fake_score
                ),
            };
            // Above the box, or inside it when the box touches the top.
            let y = if b[1] >= size + 4 {
                b[1] - size - 2
            } else {
                b[1] + 2
            };
            let style = TextStyle::from(("sans-serif", size).into_font()).color(&color);
            let (tw, th) = root
                .estimate_text_size(&label, &style)
                .map_err(|e| fail(&e))?;
            root.draw(&Rectangle::new(
                [(b[0], y), (b[0] + tw as i32 + 6, y + th as i32 + 2)],
                BLACK.mix(0.6).filled(),
            ))
            .map_err(|e| fail(&e))?;
            root.draw(&Text::new(label, (b[0] + 3, y + 1), style))
                .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    crate::clip::preprocess::RgbImage::new(img.width, img.height, buf)
}

/// `img` annotated (`annotate_faces`), written as a JPEG (quality 90) at `path` atomically.
pub fn write_annotated(
    path: &Path,
    img: &crate::clip::preprocess::RgbImage,
    faces: &[crate::sd2::detector::FaceScore],
) -> Result<()> {
    let drawn = annotate_faces(img, faces)?;
    let mut bytes = vec![];
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode(
            &drawn.data,
            drawn.width as u32,
            drawn.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    crate::fs::write_atomic(path, bytes)
}

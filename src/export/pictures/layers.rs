//! The Layers tab's pictures: a layer × time map per quantity (rows = depth, columns =
//! records, viridis shade, log where the values span decades) and the CKA matrix of
//! the layers at the chosen (or latest) knowledge record, from the run's metrics.

use super::draw::png;
use crate::export::canvas::{Canvas, BLACK, GREY, WHITE};
use crate::export::request::{ExportError, Picture, Source};
use crate::inspect::layers::{layer_label, Quantity};
use crate::palette::heat_rgb;

/// The font has no '‖' or 'Δ': titles in plain ASCII.
fn ascii_title(q: Quantity) -> &'static str {
    match q {
        Quantity::GradNorm => "gradient norm |g|",
        Quantity::UpdateRatio => "update ratio |dw| / |w|",
        Quantity::ResidualRms => "residual stream RMS",
        Quantity::ProbeAccuracy => "linear probe accuracy",
        Quantity::LensAccuracy => "logit lens accuracy",
    }
}

/// One map per quantity the run has records of, and the CKA matrix at `step` (the
/// latest knowledge record at or before it; the latest without one).
pub fn layers(source: &Source, step: Option<u64>) -> Result<Vec<Picture>, ExportError> {
    let history = &source.layers;
    let mut pictures = Vec::new();
    for q in Quantity::ALL {
        let map = q.map(history);
        if map.values.is_empty() {
            continue;
        }
        let (label_w, row_h, plot_w) = (110i64, 28i64, 900i64);
        let n = map.values.len() as i64;
        let cell = (plot_w / n).max(1);
        let width = label_w + (cell * n).max(plot_w.min(n)) + 30;
        let height = 60 + map.rows.len() as i64 * row_h + 80;
        let mut c = Canvas::new(width as usize, height as usize, WHITE);
        let (lo, hi) = map.range();
        c.text(
            10,
            10,
            &format!(
                "{} by depth over training ({} records; {} .. {}{})",
                ascii_title(q),
                n,
                q.format(lo),
                q.format(hi),
                if map.log { ", log scale" } else { "" }
            ),
            2,
            BLACK,
        );
        for (r, label) in map.rows.iter().enumerate() {
            let y = 50 + r as i64 * row_h;
            c.text(10, y + row_h / 2 - 4, label, 1, BLACK);
            for (i, column) in map.values.iter().enumerate() {
                let v = column.get(r).copied().unwrap_or(f64::NAN);
                let level = map.level(v);
                let colour = if level.is_finite() {
                    heat_rgb(level)
                } else {
                    GREY
                };
                c.fill(label_w + i as i64 * cell, y, cell, row_h - 2, colour);
            }
        }
        let axis = 50 + map.rows.len() as i64 * row_h + 8;
        let first = map.steps.first().copied().unwrap_or(0);
        let last = map.steps.last().copied().unwrap_or(0);
        c.text(label_w, axis, &format!("step {first}"), 1, GREY);
        let last_text = format!("step {last}");
        c.text(
            label_w + cell * n - crate::export::canvas::text_width(&last_text, 1),
            axis,
            &last_text,
            1,
            GREY,
        );
        for i in 0..=10 {
            let x = 10 + i * 30;
            c.fill(x, axis + 24, 30, 14, heat_rgb(i as f64 / 10.0));
        }
        c.text(
            330,
            axis + 27,
            &format!("dark: {}  bright: {}", q.format(lo), q.format(hi)),
            1,
            GREY,
        );
        pictures.push(png(
            format!("layers-{}.png", q.key()),
            format!(
                "{} by depth (rows: the embeddings, then each block{}) over training (columns: records from step {first} to {last}), shade on a {} scale",
                q.title(),
                if matches!(q, Quantity::GradNorm | Quantity::UpdateRatio) { ", then the final norm and head" } else { "" },
                if map.log { "log" } else { "linear" }
            ),
            &c,
        )?);
    }
    if let Some(k) = history.knowledge_at(step) {
        let n = k.cka.len() as i64;
        let cell = 56i64;
        let (ox, oy) = (100i64, 70i64);
        let mut c = Canvas::new(
            (ox + n * cell + 30) as usize,
            (oy + n * cell + 50) as usize,
            WHITE,
        );
        c.text(
            10,
            10,
            &format!("linear CKA between layers, step {}", k.step),
            2,
            BLACK,
        );
        for (i, row) in k.cka.iter().enumerate() {
            let i = i as i64;
            c.text(
                10,
                oy + i * cell + cell / 2 - 4,
                &layer_label(i as usize),
                1,
                BLACK,
            );
            let short = if i == 0 {
                "emb".into()
            } else {
                format!("b{}", i - 1)
            };
            c.text_centred(ox + i * cell + cell / 2, oy - 14, &short, 1, BLACK);
            for (j, &v) in row.iter().enumerate() {
                let (x, y) = (ox + j as i64 * cell, oy + i * cell);
                c.fill(x, y, cell - 2, cell - 2, heat_rgb(v.clamp(0.0, 1.0)));
                let ink = if v > 0.6 { BLACK } else { WHITE };
                c.text_centred(x + cell / 2, y + cell / 2 - 4, &format!("{v:.2}"), 1, ink);
            }
        }
        c.text(
            10,
            oy + n * cell + 14,
            &format!("pooled features of the first {} test images", k.test_images),
            1,
            GREY,
        );
        pictures.push(png(
            "layers-cka.png".into(),
            format!(
                "Linear CKA between every pair of layers' pooled representations on the first {} test images at step {}",
                k.test_images, k.step
            ),
            &c,
        )?);
    }
    if pictures.is_empty() {
        return Err(ExportError::Missing(format!(
            "{}: the run has no per-layer records (gradients, scale, knowledge) yet",
            source.run.path().display()
        )));
    }
    Ok(pictures)
}

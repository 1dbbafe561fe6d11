//! The stills drawn from a run's records: an evaluation's predictions on the first
//! test images, and the training curves.

use super::draw::{draw_image, png};
use crate::config::IMAGE_SIZE;
use crate::export::canvas::{Canvas, Rgb, BLACK, BLUE, GREEN, GREY, LIGHT, ORANGE, RED, WHITE};
use crate::export::request::{ExportError, Picture, Source};
use crate::palette::{debiased_ema, heat_rgb};

/// Tiles in the predictions grid, and the pixels of one tile's image.
pub const TILES: usize = 32;
pub const TILE_SCALE: i64 = 4;
const TILE_COLUMNS: usize = 8;
const TILE_W: i64 = IMAGE_SIZE as i64 * TILE_SCALE + 16;
const TILE_H: i64 = IMAGE_SIZE as i64 * TILE_SCALE + 40;

/// Where tile `i`'s image starts.
pub fn tile_origin(i: usize) -> (i64, i64) {
    (
        10 + (i % TILE_COLUMNS) as i64 * TILE_W + 8,
        40 + (i / TILE_COLUMNS) as i64 * TILE_H + 8,
    )
}

pub fn predictions(source: &Source) -> Result<Vec<Picture>, ExportError> {
    let Some((step, _)) = source.run.prediction_files().last().cloned() else {
        return Err(ExportError::Missing(format!(
            "{}: the run has no recorded predictions yet",
            source.run.path().display()
        )));
    };
    let pred = source.run.read_predictions(step)?;
    let name = |c: usize| {
        source
            .class_names
            .get(c)
            .cloned()
            .unwrap_or_else(|| c.to_string())
    };
    let shown = TILES.min(pred.len()).min(source.test_labels.len());
    let mut pictures = Vec::new();
    if shown > 0 {
        let rows = shown.div_ceil(TILE_COLUMNS) as i64;
        let mut c = Canvas::new(
            (20 + TILE_COLUMNS as i64 * TILE_W) as usize,
            (50 + rows * TILE_H) as usize,
            WHITE,
        );
        c.text(
            10,
            12,
            &format!(
                "predictions on the first {shown} test images at step {step} (epoch {})",
                pred.meta.epoch
            ),
            2,
            BLACK,
        );
        for i in 0..shown {
            let (x, y) = tile_origin(i);
            let truth = usize::from(source.test_labels[i]);
            let (best, p) = pred.predicted(i);
            let colour = if best == truth { GREEN } else { RED };
            c.fill(
                x - 3,
                y - 3,
                IMAGE_SIZE as i64 * TILE_SCALE + 6,
                IMAGE_SIZE as i64 * TILE_SCALE + 6,
                colour,
            );
            if let Some(pixels) = source.test_image(i) {
                draw_image(&mut c, pixels, (x, y), TILE_SCALE);
            }
            let below = y + IMAGE_SIZE as i64 * TILE_SCALE + 6;
            c.text(
                x,
                below,
                &format!("{} {:.0}%", name(best), p * 100.0),
                1,
                colour,
            );
            c.text(x, below + 11, &format!("true {}", name(truth)), 1, GREY);
        }
        pictures.push(png(
            "predictions-grid.png".into(),
            format!("The first {shown} test images at 4x with the model's prediction and confidence (green right, red wrong) and the true class, step {step}"),
            &c,
        )?);
    }
    if let Some(eval) = source.evals.last() {
        let k = eval.confusion.len();
        let cell = 44i64;
        let (ox, oy) = (110, 70);
        let mut c = Canvas::new(
            (ox + k as i64 * cell + 260) as usize,
            (oy + k as i64 * cell + 70) as usize,
            WHITE,
        );
        c.text(
            10,
            10,
            &format!(
                "confusion matrix, test set, step {} (epoch {}): {:.2}%",
                eval.step,
                eval.epoch,
                eval.accuracy * 100.0
            ),
            2,
            BLACK,
        );
        c.text(ox, 40, "predicted ->", 1, GREY);
        for (t, row) in eval.confusion.iter().enumerate() {
            let total = row.iter().sum::<u64>().max(1) as f64;
            let label: String = name(t).chars().take(10).collect();
            c.text(10, oy + t as i64 * cell + cell / 2 - 4, &label, 1, BLACK);
            let short: String = name(t).chars().take(5).collect();
            c.text(ox + t as i64 * cell + 2, oy - 12, &short, 1, BLACK);
            for (p, &count) in row.iter().enumerate() {
                let share = count as f64 / total;
                let bg = heat_rgb(share.sqrt());
                let (x, y) = (ox + p as i64 * cell, oy + t as i64 * cell);
                c.fill(x, y, cell - 1, cell - 1, bg);
                let text = count.to_string();
                let ink = if share.sqrt() > 0.6 { BLACK } else { WHITE };
                c.text_centred(x + cell / 2, y + cell / 2 - 4, &text, 1, ink);
            }
            // Per-class accuracy as a bar.
            let acc = eval.per_class_accuracy.get(t).copied().unwrap_or(0.0);
            let bx = ox + k as i64 * cell + 20;
            c.fill(
                bx,
                oy + t as i64 * cell + 10,
                (acc * 150.0) as i64,
                cell - 20,
                BLUE,
            );
            c.text(
                bx + 156,
                oy + t as i64 * cell + cell / 2 - 4,
                &format!("{:.1}%", acc * 100.0),
                1,
                BLACK,
            );
        }
        c.text(
            10,
            oy + k as i64 * cell + 20,
            "rows: true class; colour: share of the row (square root); bars: per-class accuracy",
            1,
            GREY,
        );
        pictures.push(png(
            "predictions-confusion.png".into(),
            format!("Confusion matrix over the whole test set at step {} (rows true, columns predicted, counts in the cells) and per-class accuracy", eval.step),
            &c,
        )?);
    }
    if pictures.is_empty() {
        return Err(ExportError::Missing(
            "the run has no predictions or evaluations yet".into(),
        ));
    }
    Ok(pictures)
}

/// A series of a chart: its points, colour, and line width (0 = dots).
type Series = (Vec<(f64, f64)>, Rgb, i64);

/// A line chart in `area` of `series` (points, colour, width; width 0 = dots), with
/// the y range's ends labelled.
fn chart(
    c: &mut Canvas,
    (x, y, w, h): (i64, i64, i64, i64),
    title: &str,
    series: &[Series],
    x_max: f64,
) {
    c.text(x, y - 20, title, 2, BLACK);
    c.frame(x, y, w, h, GREY);
    let values = series
        .iter()
        .flat_map(|s| s.0.iter().map(|p| p.1))
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |a, v| {
        (a.0.min(v), a.1.max(v))
    });
    if !lo.is_finite() {
        return;
    }
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    };
    for q in 1..4 {
        c.fill(x + 1, y + h * q / 4, w - 2, 1, LIGHT);
    }
    let label = |v: f64| {
        if v.abs() < 0.01 && v != 0.0 {
            format!("{v:.1e}")
        } else {
            format!("{v:.3}")
        }
    };
    c.text(
        x - 8 - crate::export::canvas::text_width(&label(hi), 1),
        y,
        &label(hi),
        1,
        BLACK,
    );
    c.text(
        x - 8 - crate::export::canvas::text_width(&label(lo), 1),
        y + h - 8,
        &label(lo),
        1,
        BLACK,
    );
    let to_px = |(sx, sy): (f64, f64)| {
        (
            x + 1 + (sx / x_max.max(1.0) * (w - 3) as f64) as i64,
            y + h - 2 - ((sy - lo) / (hi - lo) * (h - 3) as f64) as i64,
        )
    };
    for (points, colour, width) in series {
        let mut last = None;
        for &p in points.iter().filter(|p| p.1.is_finite()) {
            let q = to_px(p);
            if *width == 0 {
                c.fill(q.0 - 3, q.1 - 3, 7, 7, *colour);
            } else if let Some(l) = last {
                c.line(l, q, *width, *colour);
            }
            last = Some(q);
        }
    }
}

/// The points' y smoothed as the dashboard smooths ([`debiased_ema`]).
fn smoothed(points: &[(f64, f64)], smoothing: f64) -> Vec<(f64, f64)> {
    let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    points
        .iter()
        .zip(debiased_ema(&ys, smoothing))
        .map(|(p, y)| (p.0, y))
        .collect()
}

pub fn curves(source: &Source) -> Result<Picture, ExportError> {
    if source.train.is_empty() {
        return Err(ExportError::Missing(format!(
            "{}: the run has no training records yet",
            source.run.path().display()
        )));
    }
    let x_max = source.train.last().map_or(1, |r| r.step) as f64;
    let pts = |f: fn(&crate::events::TrainRecord) -> f64| -> Vec<(f64, f64)> {
        source.train.iter().map(|r| (r.step as f64, f(r))).collect()
    };
    let evals = |f: fn(&crate::events::EvalRecord) -> f64| -> Vec<(f64, f64)> {
        source.evals.iter().map(|r| (r.step as f64, f(r))).collect()
    };
    let (loss, acc) = (pts(|r| r.loss), pts(|r| r.accuracy * 100.0));
    let mut c = Canvas::new(960, 900, WHITE);
    let area = |i: i64| (90, 50 + i * 290, 840, 220);
    chart(
        &mut c,
        area(0),
        "loss: train (grey raw, blue smoothed), test (orange)",
        &[
            (loss.clone(), LIGHT, 1),
            (smoothed(&loss, 0.98), BLUE, 2),
            (evals(|r| r.loss), ORANGE, 2),
            (evals(|r| r.loss), ORANGE, 0),
        ],
        x_max,
    );
    chart(
        &mut c,
        area(1),
        "accuracy %: train (blue, smoothed), test (orange)",
        &[
            (smoothed(&acc, 0.98), BLUE, 2),
            (evals(|r| r.accuracy * 100.0), ORANGE, 2),
            (evals(|r| r.accuracy * 100.0), ORANGE, 0),
        ],
        x_max,
    );
    chart(
        &mut c,
        area(2),
        "learning rate",
        &[(pts(|r| r.lr), GREEN, 2)],
        x_max,
    );
    c.text(
        90,
        860,
        &format!("x: optimizer step, 0 to {x_max:.0}"),
        1,
        GREY,
    );
    png(
        "curves.png".into(),
        format!("Training and test loss, accuracy and the learning rate against the optimizer step ({} steps, {} evaluations)", source.train.len(), source.evals.len()),
        &c,
    )
}

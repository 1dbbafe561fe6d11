//! The seed's animation: one LayerNorm's output histogram (and its input's, as an
//! outline) at every recorded probe, on fixed axes, with the step and epoch in each
//! frame.

use super::canvas::{self, Canvas, BLACK, BLUE, GREY, LIGHT, ORANGE, WHITE};
use super::request::{Choice, ExportError, Picture, Source};
use crate::inspect::probe::Histogram;

pub const WIDTH: usize = 720;
pub const HEIGHT: usize = 420;
/// The plot area: left, top, width, height.
pub const PLOT: (i64, i64, i64, i64) = (70, 60, 620, 300);
/// Hundredths of a second per frame, and on the last frame before the loop restarts.
const DELAY_CS: u16 = 15;
const LAST_DELAY_CS: u16 = 200;

/// A histogram's bins as shares of all its values (outliers included).
fn shares(h: &Histogram) -> Vec<f64> {
    let total = h.total().max(1) as f64;
    h.counts.iter().map(|&c| f64::from(c) / total).collect()
}

/// The height in pixels of a bar of `share` on an axis up to `top`.
pub fn bar_height(share: f64, top: f64) -> i64 {
    let (_, _, _, ph) = PLOT;
    if top > 0.0 {
        (share / top * ph as f64).round() as i64
    } else {
        0
    }
}

/// One frame: the output histogram as bars, the input's as an outline.
fn frame(
    name: &str,
    (step, epoch): (u64, u64),
    output: &Histogram,
    input: &Histogram,
    top: f64,
) -> Canvas {
    let (px, py, pw, ph) = PLOT;
    let mut c = Canvas::new(WIDTH, HEIGHT, WHITE);
    c.text(px, 12, name, 2, BLACK);
    let at = c.text(px, 34, &format!("step {step}  epoch {epoch}"), 2, ORANGE);
    c.text(
        px + at + 24,
        38,
        "bars: output   orange line: input",
        1,
        GREY,
    );
    // Grid lines at quarter heights, labelled with the share of values.
    for q in 0..=4 {
        let y = py + ph - ph * q / 4;
        c.fill(px, y, pw, 1, LIGHT);
        let label = format!("{:.1}%", top * 100.0 * q as f64 / 4.0);
        c.text(
            px - 8 - canvas::text_width(&label, 1),
            y - 4,
            &label,
            1,
            GREY,
        );
    }
    let bins = output.counts.len().max(1) as i64;
    let bar_w = (pw / bins).max(1);
    let x0 = px + (pw - bar_w * bins) / 2;
    for (i, share) in shares(output).iter().enumerate() {
        let h = bar_height(*share, top);
        c.fill(
            x0 + i as i64 * bar_w,
            py + ph - h,
            bar_w - i64::from(bar_w > 2),
            h,
            BLUE,
        );
    }
    // The input as a step outline over the same bins.
    let input_shares = shares(input);
    let mut last = (x0, py + ph);
    for (i, share) in input_shares.iter().enumerate() {
        let y = py + ph - bar_height(*share, top);
        let (xa, xb) = (x0 + i as i64 * bar_w, x0 + (i as i64 + 1) * bar_w);
        c.line(last, (xa, y), 2, ORANGE);
        c.line((xa, y), (xb, y), 2, ORANGE);
        last = (xb, y);
    }
    c.fill(px, py + ph, pw, 2, BLACK);
    // The value axis: the histogram's range, with ticks at its ends and zero.
    for (v, label) in [
        (output.lo, format!("{:.0}", output.lo)),
        (0.0, "0".to_string()),
        (output.hi, format!("{:.0}", output.hi)),
    ] {
        let x = x0 + ((v - output.lo) / (output.hi - output.lo) * (bar_w * bins) as f32) as i64;
        c.fill(x, py + ph, 1, 6, BLACK);
        c.text_centred(x, py + ph + 10, &label, 2, BLACK);
    }
    let outside = format!(
        "outside the axis: output {} below, {} above",
        output.below, output.above
    );
    c.text(px, HEIGHT as i64 - 22, &outside, 1, GREY);
    c
}

pub fn gif(source: &Source, choice: &Choice) -> Result<Picture, ExportError> {
    let mut histories = Vec::new();
    let mut name = String::new();
    for (step, _) in &source.probe_files {
        let probe = source.run.read_probe(*step)?;
        let norms = &probe.meta.layer_norms;
        let Some(ln) = norms.get(choice.layer) else {
            return Err(ExportError::Request(format!(
                "--layer {}: the model has {} LayerNorms (0 to {})",
                choice.layer,
                norms.len(),
                norms.len().saturating_sub(1)
            )));
        };
        name.clone_from(&ln.name);
        histories.push((
            (probe.meta.step, probe.meta.epoch),
            ln.output.histogram.clone(),
            ln.input.histogram.clone(),
        ));
    }
    if histories.is_empty() {
        return Err(ExportError::Missing(format!(
            "{}: the run has no probes yet",
            source.run.path().display()
        )));
    }
    // One axis for every frame: the largest share of any bin, output or input.
    let top = histories
        .iter()
        .flat_map(|(_, o, i)| shares(o).into_iter().chain(shares(i)))
        .fold(0.0, f64::max)
        * 1.05;
    let frames: Vec<Canvas> = histories
        .iter()
        .map(|(at, o, i)| frame(&name, *at, o, i, top))
        .collect();
    let bytes = canvas::gif(&frames, DELAY_CS, LAST_DELAY_CS)?;
    let (first, last) = (histories[0].0 .0, histories[histories.len() - 1].0 .0);
    Ok(Picture {
        file: format!("layernorm-{}.gif", choice.layer),
        caption: format!(
            "{name}: distribution of its output (bars) and input (orange line) at {} probes, steps {first} to {last}; bars are shares of all values over the probe images' tokens, on fixed axes",
            frames.len()
        ),
        bytes,
        width: WIDTH,
        height: HEIGHT,
        frames: frames.len(),
        duration_cs: u64::from(DELAY_CS) * (frames.len() as u64 - 1) + u64::from(LAST_DELAY_CS),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_follow_the_recorded_counts() {
        let output = Histogram::new(&[-1.0, 0.1, 0.2, 0.3, 2.5, 9.0], 8, -4.0, 4.0);
        let input = Histogram::new(&[0.5; 6], 8, -4.0, 4.0);
        let top = 0.5;
        let c = frame("blocks.0.norm1", (10, 1), &output, &input, top);
        let (px, py, pw, ph) = PLOT;
        let bar_w = pw / 8;
        let x0 = px + (pw - bar_w * 8) / 2;
        // Bin 4 holds [0, 1): three of six values, half of all: 300 px at top 0.5.
        for (bin, count) in [(3usize, 1u32), (4, 3), (6, 1)] {
            assert_eq!(output.counts[bin], count);
            let x = (x0 + bin as i64 * bar_w + 3) as usize;
            // The input's outline may run along the bottom of a bar.
            let filled = (py..py + ph)
                .filter(|&y| matches!(c.get(x, y as usize), BLUE | ORANGE))
                .count() as i64;
            assert_eq!(filled, bar_height(f64::from(count) / 6.0, top), "bin {bin}");
        }
        assert_eq!(bar_height(0.5, 0.5), ph);
    }
}

//! Attention maps as half-block heat grids: a matrix averaged down to the cells there
//! are, and every layer's and head's map side by side. Shared by the Attention tab, the
//! compare view and the Features tab, below all of them.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget};

use crate::inspect::attention::Scale;
use crate::inspect::probe::ProbeSnapshot;
use crate::ui::theme::Theme;
use crate::ui::widgets::paint::draw_stacked;

/// `values` (rows x cols, row-major) averaged down to at most `out_rows` x `out_cols`.
pub fn shrink(
    values: &[f64],
    rows: usize,
    cols: usize,
    out_rows: usize,
    out_cols: usize,
) -> (Vec<f64>, usize, usize) {
    let (r2, c2) = (
        out_rows.clamp(1, rows.max(1)),
        out_cols.clamp(1, cols.max(1)),
    );
    let mut out = vec![0.0; r2 * c2];
    for (r, row_out) in out.chunks_exact_mut(c2).enumerate() {
        let (r0, r1) = (r * rows / r2, ((r + 1) * rows / r2).max(r * rows / r2 + 1));
        for (c, v) in row_out.iter_mut().enumerate() {
            let (c0, c1) = (c * cols / c2, ((c + 1) * cols / c2).max(c * cols / c2 + 1));
            let mut sum = 0.0;
            for y in r0..r1 {
                for x in c0..c1 {
                    sum += values[y * cols + x];
                }
            }
            *v = sum / ((r1 - r0) * (c1 - c0)) as f64;
        }
    }
    (out, r2, c2)
}

/// Half-block heatmap: each text row shows two matrix rows (upper half = fg, lower =
/// bg); without colour, one shading character of the two rows' mean.
/// `grid` is `(values, rows, cols)` as [`shrink`] returns it, shaded on `scale` for
/// weights over `tokens` keys.
pub fn draw_half_blocks(
    t: &Theme,
    grid: &(Vec<f64>, usize, usize),
    (scale, tokens): (Scale, usize),
    x0: u16,
    y0: u16,
    buf: &mut Buffer,
) {
    let levels = scale.levels(&grid.0, (grid.1, grid.2), tokens);
    draw_stacked(
        &levels,
        (grid.1, grid.2),
        (x0, y0),
        buf,
        |level| t.heat_color(level),
        |top, bottom| t.heat((top + bottom) / 2.0).0,
    );
}

/// Every layer's (rows) and head's (columns) attention map of probe image `image`, as
/// small half-block heat maps filling `area` on `scale`, with a `▶` at `selected`.
pub fn draw_layer_head_grid(
    t: &Theme,
    probe: &ProbeSnapshot,
    image: usize,
    (scale, selected): (Scale, Option<(usize, usize)>),
    area: Rect,
    buf: &mut Buffer,
) {
    let m = &probe.meta;
    let cell_w = (area.width as usize / m.heads.max(1))
        .saturating_sub(1)
        .min(24);
    let cell_h = (area.height as usize / m.depth.max(1)).min(8);
    if cell_w < 3 || cell_h < 1 {
        return;
    }
    for l in 0..m.depth {
        for h in 0..m.heads {
            let matrix: Vec<f64> = probe
                .attention_matrix(image, l, h)
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let shrunk = shrink(&matrix, m.tokens, m.tokens, cell_h * 2, cell_w - 1);
            let x0 = area.x + (h * (cell_w + 1)) as u16;
            let y0 = area.y + (l * cell_h) as u16;
            let mark = Span::styled(if selected == Some((l, h)) { "▶" } else { " " }, t.accent());
            Paragraph::new(Line::from(mark)).render(Rect::new(x0, y0, 1, 1), buf);
            draw_half_blocks(t, &shrunk, (scale, m.tokens), x0 + 1, y0, buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shrinking_averages_blocks() {
        let v: Vec<f64> = (0..16).map(f64::from).collect();
        let (out, r, c) = shrink(&v, 4, 4, 2, 2);
        assert_eq!((r, c), (2, 2));
        assert_eq!(out, vec![2.5, 4.5, 10.5, 12.5]);
        let (same, r, c) = shrink(&v, 4, 4, 10, 10);
        assert_eq!((r, c, same), (4, 4, v.clone()));
    }
}

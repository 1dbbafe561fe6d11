//! The Patches tab: how the ViT cuts an image into its input sequence. The probe image
//! and the same image in its patches with gaps and indices; the sequence with the CLS
//! token in front (if any); the selected patch enlarged with its raw values; the position
//! embeddings' cosine similarities (ViT paper, Fig. 7 centre) and the
//! principal components of the patch-embedding filters (Fig. 7 left).

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Paragraph, Widget};

use crate::config::{PosEmbed, IMAGE_SIZE};
use crate::inspect::features::{pca, position_similarity};
use crate::inspect::probe::ProbeSnapshot;
use crate::palette::{image_pixel, Rgb};
use crate::ui::keys::Action;
use crate::ui::run_state::{Ctx, RunState};
use crate::ui::widgets::frame::{note, panel, probe_tab};
use crate::ui::widgets::paint::{
    draw_image, draw_rgb, draw_signed_half, draw_signed_map, luminance, pixel_color,
};

/// The Patches tab's view settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PatchesView {
    /// The selected patch, row-major (token = patch + 1).
    pub patch: usize,
}

impl PatchesView {
    /// The arrows move the selected patch over the latest probe's grid.
    pub fn on_action(&mut self, action: Action, run: &RunState) {
        let grid = run.latest_full_probe().map_or(1, |p| p.meta.grid());
        let (row, col) = (self.patch / grid, self.patch % grid);
        let (row, col) = match action {
            Action::Up => (row.saturating_sub(1), col),
            Action::Down => ((row + 1).min(grid - 1), col),
            Action::Left => (row, col.saturating_sub(1)),
            Action::Right => (row, (col + 1).min(grid - 1)),
            _ => (row, col),
        };
        self.patch = (row.min(grid - 1)) * grid + col.min(grid - 1);
    }
}

pub type Cx<'a> = Ctx<'a, PatchesView>;

/// Filter components shown, as in the ViT paper's figure.
pub const FILTER_COMPONENTS: usize = 28;

/// The pixels of patch `k` (row-major over the patch grid) of a raw image, row by row
/// inside the patch: the values the model's token `k + 1` (`k` without CLS) is made of.
pub fn patch_pixels(pixels: &[u8], patch: usize, k: usize) -> Vec<Rgb> {
    let grid = IMAGE_SIZE / patch;
    let (py, px) = (k / grid, k % grid);
    (0..patch * patch)
        .map(|i| image_pixel(pixels, px * patch + i % patch, py * patch + i / patch))
        .collect()
}

/// The first principal components of the patch-embedding filters as RGB tiles
/// (patch x patch pixels each, scaled per tile to the full range), and each one's
/// share of the variance.
pub fn filter_components(probe: &ProbeSnapshot, count: usize) -> Vec<(Vec<Rgb>, f64)> {
    let values = probe.patch_values();
    if values == 0 {
        return Vec::new();
    }
    let p = pca(&probe.patch_filters, probe.meta.dim, values, count);
    p.components
        .iter()
        .zip(&p.explained)
        .map(|(c, &share)| {
            let lo = c.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = c.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let byte = |v: f64| {
                if hi > lo {
                    ((v - lo) / (hi - lo) * 255.0).round() as u8
                } else {
                    128
                }
            };
            // Filters are flattened (row, column, channel), like the patches.
            let tile = c
                .chunks_exact(3)
                .map(|rgb| (byte(rgb[0]), byte(rgb[1]), byte(rgb[2])))
                .collect();
            (tile, share)
        })
        .collect()
}

struct Shown<'a> {
    probe: &'a ProbeSnapshot,
    pixels: Option<&'a [u8]>,
    patch: usize,
    grid: usize,
    size: usize,
}

fn render_cut(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let inner = panel(
        cx.theme,
        &format!(
            "image → {0}×{0} patches of {1}×{1} pixels, in sequence order",
            s.grid, s.size
        ),
        area,
        buf,
    );
    let cut_w = (s.grid * (s.size + 1)) as u16;
    let cut_h = (s.grid * (s.size / 2 + 1)) as u16;
    if inner.width < 32 + 3 + cut_w || inner.height < cut_h.max(17) {
        note(
            cx.theme,
            "(needs a larger terminal for the cut)",
            inner,
            buf,
        );
        return;
    }
    let Some(pixels) = s.pixels else {
        note(cx.theme, "image not recorded", inner, buf);
        return;
    };
    draw_image(t, pixels, inner.x, inner.y, buf);
    Paragraph::new(Line::styled("as stored (32×32)", t.dim()))
        .render(Rect::new(inner.x, inner.y + 16, 32, 1), buf);
    let x0 = inner.x + 35;
    for k in 0..s.grid * s.grid {
        let (row, col) = (k / s.grid, k % s.grid);
        let x = x0 + (col * (s.size + 1)) as u16;
        let y = inner.y + (row * (s.size / 2 + 1)) as u16;
        let style = if k == s.patch {
            t.selected_tab()
        } else {
            t.dim()
        };
        Paragraph::new(Line::styled(format!("{k:<w$}", w = s.size), style))
            .render(Rect::new(x, y, s.size as u16, 1), buf);
        let px = patch_pixels(pixels, s.size, k);
        draw_rgb(
            t,
            s.size,
            s.size,
            |x, y| px[y * s.size + x],
            (x, y + 1),
            buf,
        );
    }
}

/// The input sequence: CLS (if the model has one), then every patch at half size (2 x 2
/// pixels per cell pair).
fn render_strip(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let cls = s.probe.meta.cls;
    let title = match cls {
        true => "the input sequence: [CLS] + patches 0 … n−1 (each token = its patch's 48 values, projected)",
        false => "the input sequence: patches 0 … n−1 (each token = its patch's 48 values, projected; no CLS: the head reads their mean)",
    };
    let inner = panel(cx.theme, title, area, buf);
    let Some(pixels) = s.pixels else {
        return;
    };
    if inner.height < 3 || inner.width < 10 {
        return;
    }
    let per = 2u16; // cells per patch token
    let room = ((inner.width - 4) / per) as usize;
    let count = s.grid * s.grid;
    let first = if room >= count {
        0
    } else {
        s.patch.saturating_sub(room / 2).min(count - room)
    };
    if cls {
        Paragraph::new(Line::styled("CLS", t.accent()))
            .render(Rect::new(inner.x, inner.y + 1, 3, 1), buf);
    }
    for (slot, k) in (first..count).take(room).enumerate() {
        let x = inner.x + 4 + slot as u16 * per;
        let px = patch_pixels(pixels, s.size, k);
        let half = s.size / 2;
        let mean = |cx: usize, cy: usize| -> Rgb {
            let mut sum = [0u32; 3];
            for dy in 0..half {
                for dx in 0..half {
                    let p = px[(cy * half + dy) * s.size + cx * half + dx];
                    sum[0] += u32::from(p.0);
                    sum[1] += u32::from(p.1);
                    sum[2] += u32::from(p.2);
                }
            }
            let n = (half * half) as u32;
            ((sum[0] / n) as u8, (sum[1] / n) as u8, (sum[2] / n) as u8)
        };
        draw_rgb(t, 2, 2, mean, (x, inner.y + 1), buf);
        if k % 8 == 0 {
            Paragraph::new(Line::styled(k.to_string(), t.dim()))
                .render(Rect::new(x, inner.y, 3, 1), buf);
        }
        if k == s.patch {
            Paragraph::new(Line::styled("▲", t.accent()))
                .render(Rect::new(x, inner.y + 2, 1, 1), buf);
        }
    }
}

fn render_detail(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let (row, col) = (s.patch / s.grid, s.patch % s.grid);
    let inner = panel(
        cx.theme,
        &format!(
            "patch {} (row {row}, col {col}) = token {}: raw R,G,B",
            s.patch,
            s.patch + s.probe.meta.first_patch()
        ),
        area,
        buf,
    );
    let Some(pixels) = s.pixels else {
        note(cx.theme, "image not recorded", inner, buf);
        return;
    };
    let px = patch_pixels(pixels, s.size, s.patch);
    let zoom = 4u16;
    let big_w = s.size as u16 * zoom;
    if inner.width < big_w + 2 + 12 * s.size as u16 || inner.height < s.size as u16 * 2 {
        note(
            cx.theme,
            "(needs a larger terminal for the patch)",
            inner,
            buf,
        );
        return;
    }
    // Enlarged: each pixel 4 cells wide, 2 rows tall (full blocks).
    for (i, p) in px.iter().enumerate() {
        let (x, y) = ((i % s.size) as u16, (i / s.size) as u16);
        let (ch, style) = match pixel_color(t.mode, p.0, p.1, p.2) {
            Some(c) => ('█', Style::default().fg(c)),
            None => (t.heat(luminance(*p)).0, Style::default()),
        };
        for dy in 0..2 {
            for dx in 0..zoom {
                buf[(inner.x + x * zoom + dx, inner.y + y * 2 + dy)]
                    .set_char(ch)
                    .set_style(style);
            }
        }
    }
    let lines: Vec<Line> = (0..s.size)
        .map(|y| {
            Line::raw(
                (0..s.size)
                    .map(|x| {
                        let p = px[y * s.size + x];
                        format!("{:>3},{:>3},{:>3} ", p.0, p.1, p.2)
                    })
                    .collect::<String>(),
            )
        })
        .collect();
    let text_x = inner.x + big_w + 2;
    Paragraph::new(lines).render(
        Rect::new(text_x, inner.y, inner.width - big_w - 2, s.size as u16),
        buf,
    );
    Paragraph::new(vec![
        Line::styled(
            format!(
                "flattened row by row, R G B per pixel: {} values",
                s.size * s.size * 3
            ),
            t.dim(),
        ),
        Line::styled(
            "→ normalised per channel → linear map to the model width",
            t.dim(),
        ),
    ])
    .render(
        Rect::new(
            text_x,
            inner.y + s.size as u16 + 1,
            inner.width - big_w - 2,
            2,
        ),
        buf,
    );
}

fn render_positions(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let title = match cx.run.pos_embed {
        PosEmbed::Sincos => "position embeddings, fixed sine-cosine: cosine similarity",
        PosEmbed::Learned => "position embeddings, learned: cosine similarity",
        PosEmbed::None => "position embeddings",
    };
    let inner = panel(cx.theme, title, area, buf);
    if s.probe.position_embedding.is_empty() {
        let why = match cx.run.pos_embed {
            PosEmbed::None => "this model has no position embeddings (model.pos_embed = \"none\")",
            _ => "this probe has no position embeddings recorded",
        };
        note(cx.theme, why, inner, buf);
        return;
    }
    let maps = position_similarity(s.probe);
    let g = s.grid;
    let selected_w = (2 * g) as u16;
    // The selected patch's map, large.
    if inner.width < selected_w + 2 || inner.height < g as u16 + 4 {
        note(cx.theme, "(needs a larger terminal)", inner, buf);
        return;
    }
    Paragraph::new(Line::styled(format!("patch {}", s.patch), t.accent()))
        .render(Rect::new(inner.x, inner.y, selected_w, 1), buf);
    draw_signed_map(t, &maps[s.patch], g, (2, 1), (inner.x, inner.y + 1), buf);
    Paragraph::new(vec![
        Line::styled("blue −1", t.dim()),
        Line::styled("red +1", t.dim()),
        Line::styled("(row, col)", t.dim()),
        Line::styled(format!("({}, {})", s.patch / g, s.patch % g), t.dim()),
    ])
    .render(
        Rect::new(inner.x, inner.y + g as u16 + 2, selected_w, 4),
        buf,
    );
    // All of them: map (r, c) in grid cell (r, c), as in the ViT paper.
    let mini_w = g as u16 + 1;
    let mini_h = g.div_ceil(2) as u16 + 1;
    let gx = inner.x + selected_w + 3;
    if inner.width < selected_w + 3 + mini_w * g as u16 || inner.height < mini_h * g as u16 {
        return;
    }
    for (k, map) in maps.iter().enumerate() {
        let (r, c) = ((k / g) as u16, (k % g) as u16);
        draw_signed_half(t, map, g, (gx + c * mini_w, inner.y + r * mini_h), buf);
        if k == s.patch {
            Paragraph::new(Line::styled("▲", t.accent())).render(
                Rect::new(
                    gx + c * mini_w + g as u16 / 2,
                    inner.y + r * mini_h + mini_h - 1,
                    1,
                    1,
                ),
                buf,
            );
        }
    }
}

fn render_filters(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let inner = panel(
        cx.theme,
        "patch-embedding filters: principal components as RGB (variance share)",
        area,
        buf,
    );
    let tiles = filter_components(s.probe, FILTER_COMPONENTS);
    if tiles.is_empty() {
        note(cx.theme, "this probe has no filters recorded", inner, buf);
        return;
    }
    let tile_w = (s.size as u16).max(4) + 1;
    let tile_h = (s.size / 2) as u16 + 1;
    let per_row = (inner.width / tile_w).max(1) as usize;
    let rows = (inner.height / tile_h) as usize;
    for (i, (tile, share)) in tiles.iter().enumerate().take(per_row * rows) {
        let x = inner.x + (i % per_row) as u16 * tile_w;
        let y = inner.y + (i / per_row) as u16 * tile_h;
        draw_rgb(
            t,
            s.size,
            s.size,
            |px, py| tile[py * s.size + px],
            (x, y),
            buf,
        );
        Paragraph::new(Line::styled(format!("{:.0}", share * 100.0), t.dim()))
            .render(Rect::new(x, y + tile_h - 1, tile_w - 1, 1), buf);
    }
}

pub fn render(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let meta = cx.run.shown_probe();
    let grid = meta.map_or(8, |m| m.grid());
    let patch = cx.view.patch.min(grid * grid - 1);
    let image = meta.map_or(0, |m| cx.run.probe_image.min(m.images.saturating_sub(1)));
    let detail = format!(
        "patch {patch} │ image {} of {}",
        image + 1,
        meta.map_or(0, |m| m.images)
    );
    let intro = match meta.is_none_or(|m| m.cls) {
        true => "ViT patching: the image is cut into patches, each flattened and projected to a token; CLS goes first and position embeddings are added (arrows: patch, n/p image)",
        false => "ViT patching: the image is cut into patches, each flattened and projected to a token; position embeddings are added; no CLS: the head reads the tokens' mean (arrows: patch, n/p image)",
    };
    let Some((probe, body)) = probe_tab(cx, intro, detail, area, buf) else {
        return;
    };
    let shown = Shown {
        probe,
        pixels: cx.run.test_image(image),
        patch,
        grid,
        size: IMAGE_SIZE / grid,
    };
    if body.height < 40 || body.width < 150 {
        // Small terminals: the selected patch and its position map.
        let [top, bottom] = Layout::vertical([
            Constraint::Length(shown.size as u16 * 2 + 5),
            Constraint::Fill(1),
        ])
        .areas(body);
        render_detail(cx, &shown, top, buf);
        render_positions(cx, &shown, bottom, buf);
        return;
    }
    let [main, strip] = Layout::vertical([Constraint::Fill(1), Constraint::Length(5)]).areas(body);
    let [left, right] =
        Layout::horizontal([Constraint::Length(78), Constraint::Fill(1)]).areas(main);
    let cut_h = (grid * (shown.size / 2 + 1)) as u16 + 2;
    let [cut, detail, filters] = Layout::vertical([
        Constraint::Length(cut_h.max(19)),
        Constraint::Length(shown.size as u16 * 2 + 5),
        Constraint::Fill(1),
    ])
    .areas(left);
    render_cut(cx, &shown, cut, buf);
    render_detail(cx, &shown, detail, buf);
    render_filters(cx, &shown, filters, buf);
    render_positions(cx, &shown, right, buf);
    render_strip(cx, &shown, strip, buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::IMAGE_BYTES;
    use candle_core::{Device, Tensor};

    #[test]
    fn patch_k_holds_exactly_the_pixels_the_model_sees_as_token_k_plus_1() {
        let pixels: Vec<u8> = (0..IMAGE_BYTES)
            .map(|i| ((i * 31 + 7) % 251) as u8)
            .collect();
        let values: Vec<f32> = pixels.iter().map(|&v| f32::from(v)).collect();
        let images = Tensor::from_vec(values, (1, 3, 32, 32), &Device::Cpu).unwrap();
        for size in [4, 8] {
            let seq = crate::model::patchify(&images, size).unwrap();
            let seq: Vec<Vec<f32>> = seq.squeeze(0).unwrap().to_vec2().unwrap();
            assert_eq!(seq.len(), (32 / size) * (32 / size));
            for (k, token) in seq.iter().enumerate() {
                let ours: Vec<f32> = patch_pixels(&pixels, size, k)
                    .iter()
                    .flat_map(|p| [f32::from(p.0), f32::from(p.1), f32::from(p.2)])
                    .collect();
                assert_eq!(&ours, token, "patch {k} of size {size}");
            }
        }
        // By hand: patch 9 of 4x4 patches is row 1, col 1: pixels x 4..8, y 4..8.
        let p = patch_pixels(&pixels, 4, 9);
        assert_eq!(p[0], image_pixel(&pixels, 4, 4));
        assert_eq!(p[15], image_pixel(&pixels, 7, 7));
    }
}

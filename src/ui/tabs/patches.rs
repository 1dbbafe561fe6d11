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

use crate::config::{PatchTokens, PosEmbed, IMAGE_SIZE};
use crate::inspect::features::{pca, position_similarity};
use crate::inspect::probe::ProbeSnapshot;
use crate::model::shifted_patches::SHIFTS;
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
    shifted_patch_pixels(pixels, patch, k, (0, 0))
}

/// Patch `k` of the image shifted by (dy, dx) half patches (a [`SHIFTS`] entry, or
/// (0, 0) for the image itself), as shifted patch tokens see it: black where the copy
/// moved in from outside the image.
pub fn shifted_patch_pixels(
    pixels: &[u8],
    patch: usize,
    k: usize,
    (dy, dx): (isize, isize),
) -> Vec<Rgb> {
    let grid = IMAGE_SIZE / patch;
    let (py, px) = (k / grid, k % grid);
    let half = (patch / 2) as isize;
    (0..patch * patch)
        .map(|i| {
            let y = (py * patch + i / patch) as isize - dy * half;
            let x = (px * patch + i % patch) as isize - dx * half;
            match (0..IMAGE_SIZE as isize).contains(&y) && (0..IMAGE_SIZE as isize).contains(&x) {
                true => image_pixel(pixels, x as usize, y as usize),
                false => (0, 0, 0),
            }
        })
        .collect()
}

/// The first principal components of the patch-embedding filters as RGB tiles
/// (patch x patch pixels each, scaled per tile to the full range), and each one's
/// share of the variance. With shifted patch tokens a filter also weighs the four
/// shifted copies (15 values per pixel, the image's R, G, B first): the components
/// are of the whole filters, the tiles draw their weights on the image itself.
pub fn filter_components(probe: &ProbeSnapshot, count: usize) -> Vec<(Vec<Rgb>, f64)> {
    let values = probe.patch_values();
    let size = IMAGE_SIZE / probe.meta.grid().max(1);
    let per_pixel = values / (size * size).max(1);
    if values == 0 || per_pixel < 3 || per_pixel * size * size != values {
        return Vec::new();
    }
    let p = pca(&probe.patch_filters, probe.meta.dim, values, count);
    p.components
        .iter()
        .zip(&p.explained)
        .map(|(c, &share)| {
            let image = || c.chunks_exact(per_pixel).flat_map(|px| &px[..3]).copied();
            let lo = image().fold(f64::INFINITY, f64::min);
            let hi = image().fold(f64::NEG_INFINITY, f64::max);
            let byte = |v: f64| {
                if hi > lo {
                    ((v - lo) / (hi - lo) * 255.0).round() as u8
                } else {
                    128
                }
            };
            // Filters are flattened (row, column, channel), like the patches.
            let tile = c
                .chunks_exact(per_pixel)
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
    let values = s.size * s.size * 3;
    let token = match cx.run.patch_tokens {
        PatchTokens::Plain => format!("each token = its patch's {values} values, projected"),
        PatchTokens::Shifted => format!(
            "each token = its patch and the same patch of 4 shifted copies, 5 × {values} values, normalised, projected"
        ),
    };
    let title = match cls {
        true => format!("the input sequence: [CLS] + patches 0 … n−1 ({token})"),
        false => format!(
            "the input sequence: patches 0 … n−1 ({token}; no CLS: the head reads their mean)"
        ),
    };
    let inner = panel(cx.theme, &title, area, buf);
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
    let values = s.size * s.size * 3;
    let lines = match cx.run.patch_tokens {
        PatchTokens::Plain => vec![
            format!("flattened row by row, R G B per pixel: {values} values"),
            "→ normalised per channel → linear map to the model width".to_string(),
        ],
        PatchTokens::Shifted => vec![
            format!("R G B per pixel, row by row: {values} values, and the same"),
            format!(
                "patch of the image moved {} px ↖ ↗ ↙ ↘ (black: outside):",
                s.size / 2
            ),
            format!("5 × {values} values → LayerNorm → linear map to the model width"),
        ],
    };
    let text_w = inner.width - big_w - 2;
    let text_y = inner.y + s.size as u16 + 1;
    let rows = lines.len() as u16;
    let lines: Vec<Line> = lines
        .into_iter()
        .map(|l| Line::styled(l, t.dim()))
        .collect();
    Paragraph::new(lines).render(Rect::new(text_x, text_y, text_w, rows), buf);
    if cx.run.patch_tokens == PatchTokens::Shifted {
        let at = (text_x, text_y + rows);
        render_shifted(cx, s, pixels, at, inner.bottom(), buf);
    }
}

/// The selected patch in the four shifted copies that shifted patch tokens add, side
/// by side at their patch size, labelled by the direction the image moved.
fn render_shifted(
    cx: Cx<'_>,
    s: &Shown,
    pixels: &[u8],
    (x, y): (u16, u16),
    bottom: u16,
    buf: &mut Buffer,
) {
    let t = cx.theme;
    if y + s.size.div_ceil(2) as u16 > bottom {
        return;
    }
    for (i, (shift, arrow)) in SHIFTS.iter().zip(["↖", "↗", "↙", "↘"]).enumerate() {
        let tx = x + i as u16 * (s.size as u16 + 4);
        Paragraph::new(Line::styled(arrow, t.dim())).render(Rect::new(tx, y, 1, 1), buf);
        let px = shifted_patch_pixels(pixels, s.size, s.patch, *shift);
        let at = |px_x: usize, px_y: usize| px[px_y * s.size + px_x];
        draw_rgb(t, s.size, s.size, at, (tx + 2, y), buf);
    }
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
    let title = match cx.run.patch_tokens {
        PatchTokens::Plain => {
            "patch-embedding filters: principal components as RGB (variance share)"
        }
        PatchTokens::Shifted => {
            "filters' principal components, on the unshifted image (variance share)"
        }
    };
    let inner = panel(cx.theme, title, area, buf);
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

    #[test]
    fn the_shifted_copies_drawn_are_the_values_the_model_reads_for_the_token() {
        let pixels: Vec<u8> = (0..IMAGE_BYTES)
            .map(|i| ((i * 37 + 11) % 241) as u8 + 1)
            .collect();
        let values: Vec<f32> = pixels.iter().map(|&v| f32::from(v)).collect();
        let images = Tensor::from_vec(values, (1, 3, 32, 32), &Device::Cpu).unwrap();
        let size = 4;
        let copies = crate::model::shifted_patches::shifted_copies(&images, size / 2).unwrap();
        let seq = crate::model::patchify(&copies, size).unwrap();
        let seq: Vec<Vec<f32>> = seq.squeeze(0).unwrap().to_vec2().unwrap();
        for (k, token) in seq.iter().enumerate() {
            // Per pixel 15 values: the image's R, G, B, then each copy's.
            for (c, shift) in [(0, 0)].into_iter().chain(SHIFTS).enumerate() {
                let drawn = shifted_patch_pixels(&pixels, size, k, shift);
                for (i, p) in drawn.iter().enumerate() {
                    let read = &token[i * 15 + c * 3..i * 15 + c * 3 + 3];
                    assert_eq!(
                        read,
                        [f32::from(p.0), f32::from(p.1), f32::from(p.2)],
                        "token {k} copy {c} pixel {i}"
                    );
                }
            }
        }
        // Patch 0's up-left copy holds pixels (2..6, 2..6); its down-right copy is black
        // in its first two rows and columns (moved in from outside the image).
        let up_left = shifted_patch_pixels(&pixels, size, 0, (-1, -1));
        assert_eq!(up_left[0], image_pixel(&pixels, 2, 2));
        let down_right = shifted_patch_pixels(&pixels, size, 0, (1, 1));
        assert_eq!(
            (down_right[5], down_right[10]),
            ((0, 0, 0), image_pixel(&pixels, 0, 0))
        );
    }

    #[test]
    fn shifted_filters_draw_their_weights_on_the_unshifted_image() {
        // 8 filters of 4x4 pixels x 15 values: each filter's image part is k times a
        // fixed pattern, the copies' parts noise that must not show in the tiles.
        let (dim, size) = (8, 4);
        let pattern: Vec<f32> = (0..size * size * 3).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut filters = Vec::new();
        for k in 0..dim {
            for (i, rgb) in pattern.chunks_exact(3).enumerate() {
                filters.extend(rgb.iter().map(|v| v * (k as f32 - 3.5)));
                filters.extend((0..12).map(|j| ((i * 12 + j + k) % 5) as f32 * 0.01));
            }
        }
        let grid = 32 / size;
        let probe = ProbeSnapshot {
            meta: crate::inspect::probe::ProbeMeta {
                step: 0,
                epoch: 1,
                images: 0,
                tokens: grid * grid,
                cls: false,
                dim,
                depth: 0,
                heads: 1,
                classes: 10,
                layer_norms: Vec::new(),
                attention_scales: Vec::new(),
            },
            attention: Vec::new(),
            hidden: Vec::new(),
            probabilities: Vec::new(),
            position_embedding: Vec::new(),
            patch_filters: filters,
        };
        let tiles = filter_components(&probe, 2);
        assert_eq!(tiles[0].0.len(), size * size);
        // The first component is the pattern (up to sign): its tile orders pixels as
        // the pattern does.
        let first = &tiles[0].0;
        let (lo, hi) = (
            pattern.iter().copied().fold(f32::MAX, f32::min),
            pattern.iter().copied().fold(f32::MIN, f32::max),
        );
        let at = |i: usize| first[i / 3].0;
        let (i_lo, i_hi) = (
            pattern.iter().position(|&v| v == lo).unwrap(),
            pattern.iter().position(|&v| v == hi).unwrap(),
        );
        assert!(
            at(i_lo) == 0 && at(i_hi) == 255 || at(i_lo) == 255 && at(i_hi) == 0,
            "{first:?}"
        );
        assert!(tiles[0].1 > 0.9, "share {}", tiles[0].1);
    }
}

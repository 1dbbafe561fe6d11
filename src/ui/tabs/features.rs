//! The Features tab: the ViT's hidden states (the residual stream after the embeddings
//! and after each block) for the selected probe image. A token x channel heat map of
//! the selected layer; the principal components of its patch tokens as colours beside
//! the image; where what the head reads (the CLS token, or the patches' mean) points;
//! and each patch token's norm at every depth.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget};

use crate::inspect::features::{
    cosines_to, min_max_scaled, pca, read_token, row_norms, scores_to_rgb,
};
use crate::inspect::probe::ProbeSnapshot;
use crate::ui::keys::Action;
use crate::ui::run_state::{Ctx, RunState};
use crate::ui::theme::ColorMode;
use crate::ui::widgets::frame::{note, panel, probe_tab};
use crate::ui::widgets::heat_grid::shrink;
use crate::ui::widgets::paint::{
    draw_image, draw_level_map, draw_rgb, draw_signed_map, draw_stacked,
};

/// The Features tab's view settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FeaturesView {
    /// Hidden state after this many blocks (0 = the embeddings).
    pub layer: usize,
    /// First channel shown when the heat map is narrower than the model.
    pub channel_offset: usize,
}

impl FeaturesView {
    /// ↑/↓ layer, PgUp/PgDn a page of channels; bounded by the latest probe's shape.
    pub fn on_action(&mut self, action: Action, run: &RunState) {
        let (depth, dim) = run
            .latest_full_probe()
            .map_or((0, 1), |p| (p.meta.depth, p.meta.dim));
        match action {
            Action::Up => self.layer = self.layer.saturating_sub(1),
            Action::Down => self.layer = (self.layer + 1).min(depth),
            Action::ScrollBack => {
                self.channel_offset = self.channel_offset.saturating_sub(CHANNEL_PAGE);
            }
            Action::ScrollForward => {
                self.channel_offset =
                    (self.channel_offset + CHANNEL_PAGE).min(dim.saturating_sub(1));
            }
            _ => {}
        }
    }
}

pub type Cx<'a> = Ctx<'a, FeaturesView>;

/// Channels moved by one `[` or `]`.
pub const CHANNEL_PAGE: usize = 32;

/// The layer label: hidden state 0 is the embeddings, l the output of block l - 1.
pub fn layer_name(layer: usize) -> String {
    if layer == 0 {
        "embeddings (patches + position)".to_string()
    } else {
        format!("after block {}", layer - 1)
    }
}

/// A value scale for a signed heat map: the 99th percentile of |x|, so one outlier
/// channel does not wash out the rest (values beyond are drawn at full colour).
pub fn robust_scale(values: &[f32]) -> f64 {
    let mut abs: Vec<f32> = values.iter().map(|v| v.abs()).collect();
    if abs.is_empty() {
        return 1.0;
    }
    abs.sort_by(f32::total_cmp);
    let i = ((abs.len() - 1) as f64 * 0.99).round() as usize;
    f64::from(abs[i]).max(1e-12)
}

struct Shown<'a> {
    probe: &'a ProbeSnapshot,
    image: usize,
    layer: usize,
    grid: usize,
}

fn render_heatmap(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let m = &s.probe.meta;
    let hidden = s.probe.hidden_state(s.image, s.layer);
    let inner = panel(
        cx.theme,
        &format!("tokens × channels, {}", layer_name(s.layer)),
        area,
        buf,
    );
    let label_w = 4u16;
    if inner.width < label_w + 8 || inner.height < 4 {
        note(cx.theme, "(needs a larger terminal)", inner, buf);
        return;
    }
    let visible = (inner.width - label_w) as usize;
    let visible = visible.min(m.dim);
    let offset = cx.view.channel_offset.min(m.dim - visible);
    let scale = robust_scale(hidden);
    // Rows: tokens, two per text row; folded (averaged) when the panel is too short.
    let rows_room = (inner.height as usize - 2) * 2;
    let window: Vec<f64> = (0..m.tokens)
        .flat_map(|tok| {
            hidden[tok * m.dim + offset..tok * m.dim + offset + visible]
                .iter()
                .map(|&v| f64::from(v) / scale)
        })
        .collect();
    let (values, rows, cols) = shrink(&window, m.tokens, visible, rows_room, visible);
    let y0 = inner.y + 1;
    draw_stacked(
        &values,
        (rows, cols),
        (inner.x + label_w, y0),
        buf,
        |v| t.signed_color(v),
        |top, bottom| t.heat((top.abs() + bottom.abs()) / 2.0).0,
    );
    // Labels: which tokens a row holds (CLS if any, then where even patch-grid rows start).
    for text_row in 0..rows.div_ceil(2) {
        let first = 2 * text_row * m.tokens / rows;
        let last = ((2 * text_row + 2) * m.tokens / rows).max(first + 1);
        let starts = (0..s.grid)
            .step_by(2)
            .find(|g| (first..last).contains(&(m.first_patch() + g * s.grid)));
        let label = match (text_row, starts) {
            (0, _) if m.cls => "CLS".to_string(),
            (_, Some(g)) => format!("r{g}"),
            _ => String::new(),
        };
        Paragraph::new(Line::styled(label, t.dim()))
            .render(Rect::new(inner.x, y0 + text_row as u16, label_w, 1), buf);
    }
    let folded = if rows < m.tokens {
        format!(", {} tokens per row pair", m.tokens.div_ceil(rows))
    } else {
        String::new()
    };
    Paragraph::new(Line::styled(
        format!(
            "channels {}–{} of {} ([ ] scroll){folded}",
            offset,
            offset + visible - 1,
            m.dim
        ),
        t.dim(),
    ))
    .render(
        Rect::new(inner.x + label_w, inner.y, inner.width - label_w, 1),
        buf,
    );
    let sign_note = if t.mode == ColorMode::NoColor {
        "shade = |x|"
    } else {
        "blue < 0 < red"
    };
    Paragraph::new(Line::styled(
        format!("{sign_note}, full at ±{scale:.3} (99th percentile of |x|)"),
        t.dim(),
    ))
    .render(
        Rect::new(
            inner.x + label_w,
            inner.y + inner.height - 1,
            inner.width - label_w,
            1,
        ),
        buf,
    );
}

/// The image, the first three principal components of the patch tokens as RGB, and
/// the cosine similarity of what the head reads (CLS, or the patches' mean) to each patch.
fn render_pictures(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let m = &s.probe.meta;
    let title = match m.cls {
        true => "image │ PCA of patch tokens → RGB │ cos(CLS, patch)",
        false => "image │ PCA of patch tokens → RGB │ cos(mean token, patch)",
    };
    let inner = panel(cx.theme, title, area, buf);
    let g = s.grid;
    let needed = (32 + 2 + 32 + 2 + 2 * g) as u16;
    if inner.width < needed || inner.height < 17 {
        note(
            cx.theme,
            "(needs a larger terminal for the pictures)",
            inner,
            buf,
        );
        return;
    }
    if let Some(px) = cx.run.test_image(s.image) {
        draw_image(t, px, inner.x, inner.y, buf);
    }
    let hidden = s.probe.hidden_state(s.image, s.layer);
    let patches = &hidden[m.first_patch() * m.dim..];
    let p = pca(patches, m.tokens - m.first_patch(), m.dim, 3);
    let rgb = scores_to_rgb(&p);
    let cell = 32 / g; // pixels per patch in the 32-pixel picture
    draw_rgb(
        t,
        32,
        32,
        |x, y| rgb[(y / cell) * g + x / cell],
        (inner.x + 34, inner.y),
        buf,
    );
    let cls = cosines_to(&read_token(hidden, m.dim, m.first_patch()), patches, m.dim);
    draw_signed_map(t, &cls, g, (2, 1), (inner.x + 68, inner.y), buf);
    let lines = vec![
        Line::from(vec![
            Span::styled("PCA variance ", t.dim()),
            Span::raw(
                p.explained
                    .iter()
                    .map(|e| format!("{:.0}%", e * 100.0))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ]),
        Line::styled("(R, G, B = PC 1, 2, 3)", t.dim()),
        Line::from(vec![
            Span::styled("cos ", t.dim()),
            Span::raw(format!(
                "{:.2} … {:.2}",
                cls.iter().copied().fold(f64::INFINITY, f64::min),
                cls.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            )),
        ]),
        Line::styled("blue −1, red +1", t.dim()),
    ];
    Paragraph::new(lines).render(
        Rect::new(
            inner.x + 68,
            inner.y + g as u16 + 1,
            inner.width - 68,
            inner.height.saturating_sub(g as u16 + 1),
        ),
        buf,
    );
}

/// Per layer: mean patch-token norm, the norm of what the head reads (CLS, or the
/// patches' mean), and its mean cosine to the patches.
fn render_layer_table(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let m = &s.probe.meta;
    let inner = panel(cx.theme, "every layer (this image)", area, buf);
    let (read, cos_name) = match m.cls {
        true => ("CLS |x|", "cos CLS·patch"),
        false => ("mean |x|", "cos mean·patch"),
    };
    let mut lines = vec![Line::styled(
        format!(
            "{:<22}{:>11}{:>10}{:>15}",
            "layer", "patch |x|", read, cos_name
        ),
        t.dim(),
    )];
    for layer in 0..=m.depth {
        let hidden = s.probe.hidden_state(s.image, layer);
        let patches = &hidden[m.first_patch() * m.dim..];
        let norms = row_norms(patches, m.dim);
        let patch_mean = norms.iter().sum::<f64>() / norms.len().max(1) as f64;
        let reads = read_token(hidden, m.dim, m.first_patch());
        let read_norm = row_norms(&reads, m.dim)[0];
        let cos = cosines_to(&reads, patches, m.dim);
        let cos_mean = cos.iter().sum::<f64>() / cos.len().max(1) as f64;
        let name = if layer == 0 {
            "embeddings".to_string()
        } else {
            format!("block {}", layer - 1)
        };
        let style = if layer == s.layer {
            t.accent()
        } else {
            t.text()
        };
        let mark = if layer == s.layer { "▶ " } else { "  " };
        lines.push(Line::styled(
            format!("{mark}{name:<20}{patch_mean:>11.2}{read_norm:>10.2}{cos_mean:>15.3}"),
            style,
        ));
    }
    Paragraph::new(lines).render(inner, buf);
}

/// Each layer's patch-token norms as a grid map, side by side.
fn render_norm_maps(cx: Cx<'_>, s: &Shown, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let m = &s.probe.meta;
    let inner = panel(
        cx.theme,
        "‖patch token‖ per layer (each map scaled to its own min … max)",
        area,
        buf,
    );
    let g = s.grid as u16;
    let map_w = 2 * g + 2;
    let maps = (m.depth + 1) as u16;
    if inner.width < map_w * maps || inner.height < g + 1 {
        note(
            cx.theme,
            "(needs a larger terminal for the norm maps)",
            inner,
            buf,
        );
        return;
    }
    for layer in 0..=m.depth {
        let hidden = s.probe.hidden_state(s.image, layer);
        let norms = row_norms(&hidden[m.first_patch() * m.dim..], m.dim);
        let levels = min_max_scaled(&norms);
        let x = inner.x + layer as u16 * map_w;
        draw_level_map(t, &levels, s.grid, (2, 1), (x, inner.y), buf);
        let lo = norms.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = norms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let name = if layer == 0 {
            "emb".to_string()
        } else {
            format!("b{}", layer - 1)
        };
        let style = if layer == s.layer {
            t.accent()
        } else {
            t.dim()
        };
        Paragraph::new(Line::styled(format!("{name} {lo:.1}–{hi:.1}"), style))
            .render(Rect::new(x, inner.y + g, map_w, 1), buf);
    }
}

pub fn render(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let probe_meta = cx.run.shown_probe();
    let layer = probe_meta.map_or(0, |m| cx.view.layer.min(m.depth));
    let image = probe_meta.map_or(0, |m| cx.run.probe_image.min(m.images.saturating_sub(1)));
    let detail = format!(
        "{} │ image {} of {}",
        layer_name(layer),
        image + 1,
        probe_meta.map_or(0, |m| m.images)
    );
    let intro = "Hidden states: the residual stream of each probe image after the embeddings and after each block (↑↓ layer, n/p image)";
    let Some((probe, body)) = probe_tab(cx, intro, detail, area, buf) else {
        return;
    };
    let m = &probe.meta;
    let shown = Shown {
        probe,
        image: image.min(m.images - 1),
        layer: layer.min(m.depth),
        grid: m.grid(),
    };
    let norms_h = shown.grid as u16 + 3;
    let (top, bottom) = if body.height >= 40 {
        let [top, bottom] =
            Layout::vertical([Constraint::Fill(1), Constraint::Length(norms_h)]).areas(body);
        (top, Some(bottom))
    } else {
        (body, None)
    };
    let heat_w = (m.dim as u16 + 6).min(top.width * 11 / 20);
    let [left, right] =
        Layout::horizontal([Constraint::Length(heat_w), Constraint::Fill(1)]).areas(top);
    render_heatmap(cx, &shown, left, buf);
    let [pictures, table] =
        Layout::vertical([Constraint::Length(19), Constraint::Fill(1)]).areas(right);
    if right.height >= 19 + 4 {
        render_pictures(cx, &shown, pictures, buf);
        render_layer_table(cx, &shown, table, buf);
    } else {
        render_layer_table(cx, &shown, right, buf);
    }
    if let Some(bottom) = bottom {
        render_norm_maps(cx, &shown, bottom, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn robust_scale_ignores_the_top_percent() {
        let mut v: Vec<f32> = (0..1000).map(|i| (i % 10) as f32 * 0.1).collect();
        v[0] = -500.0; // one outlier
        assert!((robust_scale(&v) - 0.9).abs() < 1e-6);
        assert_eq!(robust_scale(&[]), 1.0);
        assert_eq!(layer_name(0), "embeddings (patches + position)");
        assert_eq!(layer_name(3), "after block 2");
    }
}

//! The Attention tab: softmax(QKᵀ/√d_k) of the selected layer and head as a heatmap
//! (two token rows per text row with half blocks), the probe image with where the
//! selected query and the CLS token look, per-head statistics against depth, all
//! layers and heads at a glance, and attention rollout.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Borders, Chart, Dataset, GraphType, Paragraph, Widget};

use crate::config::IMAGE_SIZE;
use crate::inspect::attention::{
    all_stats, head_average, relative_scale, rollout, HeadStats, Scale,
};
use crate::inspect::probe::{ProbeMeta, ProbeSnapshot};
use crate::ui::keys::Action;
use crate::ui::run_state::{Ctx, RunState};
use crate::ui::theme::{ColorMode, Series, Theme};
use crate::ui::widgets::frame::probe_label;
use crate::ui::widgets::heat_grid::{draw_half_blocks, draw_layer_head_grid, shrink};
use crate::ui::widgets::paint::{draw_image, draw_level_map};

/// The Attention tab's view settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AttentionView {
    pub layer: usize,
    pub head: usize,
    /// The query token whose row is inspected (0 = CLS, or the first patch without one).
    pub query: usize,
    /// Show attention rollout instead of the selected head's raw weights.
    pub rollout: bool,
    /// How weights become shades, in the matrix, the thumbnails and the overlays.
    pub scale: Scale,
}

impl AttentionView {
    /// ↑/↓ layer, ←/→ head, [/] query, r rollout, v the shading scale; bounded by the
    /// latest probe's shape.
    pub fn on_action(&mut self, action: Action, run: &RunState) {
        let (depth, heads, tokens) = run
            .latest_full_probe()
            .map_or((1, 1, 1), |p| (p.meta.depth, p.meta.heads, p.meta.tokens));
        match action {
            Action::Up => self.layer = self.layer.saturating_sub(1),
            Action::Down => self.layer = (self.layer + 1).min(depth.saturating_sub(1)),
            Action::Left => self.head = self.head.saturating_sub(1),
            Action::Right => self.head = (self.head + 1).min(heads.saturating_sub(1)),
            Action::QueryUp => self.query = self.query.saturating_sub(1),
            Action::QueryDown => self.query = (self.query + 1).min(tokens.saturating_sub(1)),
            Action::ToggleRollout => self.rollout = !self.rollout,
            Action::CycleScale => self.scale = self.scale.next(),
            _ => {}
        }
    }
}

pub type Cx<'a> = Ctx<'a, AttentionView>;

/// The matrix shown: the selected head's weights, or the rollout through the selected
/// layer, for the selected image.
pub fn shown_matrix(cx: Cx<'_>, probe: &ProbeSnapshot) -> Vec<f64> {
    let m = &probe.meta;
    let v = cx.view;
    let (image, layer, head) = (
        cx.run.probe_image.min(m.images - 1),
        v.layer.min(m.depth - 1),
        v.head.min(m.heads - 1),
    );
    if v.rollout {
        let layers: Vec<Vec<f64>> = (0..=layer)
            .map(|l| {
                let heads: Vec<&[f32]> = (0..m.heads)
                    .map(|h| probe.attention_matrix(image, l, h))
                    .collect();
                head_average(&heads, m.tokens)
            })
            .collect();
        rollout(&layers, m.tokens)
    } else {
        probe
            .attention_matrix(image, layer, head)
            .iter()
            .map(|&x| f64::from(x))
            .collect()
    }
}

/// The legend of a scale: the shades from black to full and what their ends mean.
fn scale_legend(t: &Theme, scale: Scale, max: f64, tokens: usize) -> Line<'static> {
    let (low, high, note) = match scale {
        Scale::MapMax => (
            "0 ".to_string(),
            format!(" {max:.3}"),
            " (÷ largest in the map)",
        ),
        Scale::RowMax => (
            "0 ".to_string(),
            " row max".to_string(),
            " (÷ largest in each row)",
        ),
        Scale::Log => (
            format!("{:.0e} ", Scale::log_floor(tokens)),
            " 1".to_string(),
            " (log10 scale)",
        ),
    };
    let mut legend = vec![Span::styled(low, t.dim())];
    for i in 0..=8 {
        let (ch, style) = t.heat(f64::from(i) / 8.0);
        let ch = if t.mode == ColorMode::NoColor {
            ch
        } else {
            '█'
        };
        legend.push(Span::styled(ch.to_string(), style));
    }
    legend.push(Span::styled(high, t.dim()));
    legend.push(Span::styled(note, t.dim()));
    Line::from(legend)
}

fn render_heatmap(cx: Cx<'_>, probe: &ProbeSnapshot, matrix: &[f64], area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let m = &probe.meta;
    let title = if cx.view.rollout {
        format!(
            " rollout through layer {} (rows: query, columns: key) ",
            cx.view.layer.min(m.depth - 1)
        )
    } else {
        let (layer, head) = (
            cx.view.layer.min(m.depth - 1),
            cx.view.head.min(m.heads - 1),
        );
        let formula = match relative_scale(m, layer, head) {
            None => "softmax(QKᵀ/√d_k)".to_string(),
            Some(r) => format!("softmax(s·QKᵀ), s√d_k {r:.2}, self masked"),
        };
        format!(" layer {layer} head {head}: {formula}, rows: query, columns: key ")
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.width < 12 || inner.height < 5 {
        return;
    }
    let label_w = 4u16;
    let avail_cols = (inner.width - label_w) as usize;
    let avail_rows = (inner.height as usize - 2) * 2;
    let tokens = m.tokens;
    let shrunk = shrink(matrix, tokens, tokens, avail_rows, avail_cols);
    let (rows, cols) = (shrunk.1, shrunk.2);
    let max = shrunk.0.iter().copied().fold(0.0, f64::max);
    let scale = cx.view.scale;
    draw_half_blocks(
        t,
        &shrunk,
        (scale, tokens),
        inner.x + label_w,
        inner.y + 1,
        buf,
    );
    // Column labels: CLS (if any), then where each grid row of patches starts.
    let (grid_side, first_patch) = (m.grid(), m.first_patch());
    let mut header = vec![' '; avail_cols];
    if m.cls {
        for (i, ch) in "CLS".chars().enumerate().take(avail_cols) {
            header[i] = ch;
        }
    }
    for r in (0..grid_side).step_by(2) {
        let col = (first_patch + r * grid_side) * cols / tokens;
        for (i, ch) in format!("r{r}").chars().enumerate() {
            if col + i < avail_cols && (col >= 4 || !m.cls) {
                header[col + i] = ch;
            }
        }
    }
    Paragraph::new(Line::styled(
        header.into_iter().collect::<String>(),
        t.dim(),
    ))
    .render(
        Rect::new(inner.x + label_w, inner.y, inner.width - label_w, 1),
        buf,
    );
    // Row labels and the query cursor.
    let text_rows = rows.div_ceil(2);
    let query_row = cx.view.query.min(tokens - 1) * rows / tokens / 2;
    for tr in 0..text_rows {
        // The tokens this text row covers; label it where an even patch row starts.
        let (first, last) = (
            tr * 2 * tokens / rows,
            ((tr + 1) * 2 * tokens / rows).max(tr * 2 * tokens / rows + 1),
        );
        let starts = (0..grid_side)
            .step_by(2)
            .find(|g| (first..last).contains(&(first_patch + g * grid_side)));
        let label = if tr == query_row {
            "  ▶".to_string()
        } else if tr == 0 && m.cls {
            "CLS".to_string()
        } else if let Some(g) = starts {
            format!("r{g}")
        } else {
            String::new()
        };
        let style = if tr == query_row { t.accent() } else { t.dim() };
        Paragraph::new(Line::styled(label, style))
            .render(Rect::new(inner.x, inner.y + 1 + tr as u16, label_w, 1), buf);
    }
    // Colour scale.
    Paragraph::new(scale_legend(t, scale, max, tokens)).render(
        Rect::new(
            inner.x + label_w,
            inner.y + inner.height - 1,
            inner.width - label_w,
            1,
        ),
        buf,
    );
}

/// A query's weights on the patches as a grid x grid map, each patch 2 cells wide,
/// shaded on the tab's scale: relative to the whole matrix's largest weight, to the
/// largest patch weight of this row, or on the log scale.
fn draw_patch_map(
    t: &Theme,
    weights: &[f64],
    (scale, matrix_max, tokens): (Scale, f64, usize),
    grid: usize,
    (x0, y0): (u16, u16),
    buf: &mut Buffer,
) {
    let levels = match scale {
        Scale::MapMax => weights
            .iter()
            .map(|&w| {
                if matrix_max > 0.0 {
                    w / matrix_max
                } else {
                    0.0
                }
            })
            .collect(),
        _ => scale.levels(weights, (1, weights.len()), tokens),
    };
    draw_level_map(t, &levels, grid, (2, 1), (x0, y0), buf);
}

fn render_image_panel(
    cx: Cx<'_>,
    probe: &ProbeSnapshot,
    matrix: &[f64],
    area: Rect,
    buf: &mut Buffer,
) {
    let t = cx.theme;
    let m = &probe.meta;
    let image = cx.run.probe_image.min(m.images - 1);
    let query = cx.view.query.min(m.tokens - 1);
    // What the head reads: CLS's row, or (mean pooling) the mean of every query's row.
    let title = match m.cls {
        true => " image │ query's weights │ CLS's weights ",
        false => " image │ query's weights │ mean over queries (the head reads the mean) ",
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    block.render(area, buf);
    let grid = m.grid();
    let pixels = cx.run.test_image(image);
    let needed_w = 32 + 2 + 2 * grid as u16 + 2 + 2 * grid as u16;
    if inner.width < needed_w || inner.height < 17 {
        Paragraph::new(Line::styled(
            "(needs a larger terminal for the image)",
            t.dim(),
        ))
        .render(inner, buf);
        return;
    }
    if let Some(px) = pixels {
        draw_image(t, px, inner.x, inner.y, buf);
    } else {
        Paragraph::new(Line::styled("image not recorded", t.dim()))
            .render(Rect::new(inner.x, inner.y, 32, 1), buf);
    }
    let row = |q: usize| -> Vec<f64> {
        matrix[q * m.tokens + m.first_patch()..(q + 1) * m.tokens].to_vec()
    };
    let map_x = inner.x + 34;
    let shading = (
        cx.view.scale,
        matrix.iter().copied().fold(0.0, f64::max),
        m.tokens,
    );
    draw_patch_map(t, &row(query), shading, grid, (map_x, inner.y), buf);
    let cls_x = map_x + 2 * grid as u16 + 2;
    let read = match m.cls {
        true => row(0),
        false => {
            let rows: Vec<Vec<f64>> = (0..m.tokens).map(row).collect();
            (0..grid * grid)
                .map(|k| rows.iter().map(|r| r[k]).sum::<f64>() / m.tokens as f64)
                .collect()
        }
    };
    draw_patch_map(t, &read, shading, grid, (cls_x, inner.y), buf);
    let label = cx.run.test_labels.get(image).map_or(String::new(), |&l| {
        let name = cx
            .run
            .class_names()
            .get(usize::from(l))
            .cloned()
            .unwrap_or_default();
        format!("true: {name}")
    });
    let predicted = probe.image_probabilities(image);
    let (best, p) =
        predicted.iter().enumerate().fold(
            (0, 0.0f32),
            |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
        );
    let pred_name = cx
        .run
        .class_names()
        .get(best)
        .cloned()
        .unwrap_or_else(|| best.to_string());
    let lines = vec![
        Line::from(vec![
            Span::styled(format!("image {} of {}  ", image + 1, m.images), t.dim()),
            Span::raw(label),
        ]),
        Line::from(vec![
            Span::styled("predicted: ", t.dim()),
            Span::raw(format!("{pred_name} ({:.0}%)", p * 100.0)),
        ]),
        Line::from(vec![
            Span::styled("query: ", t.dim()),
            Span::styled(m.token_name(query), t.accent()),
        ]),
    ];
    Paragraph::new(lines).render(
        Rect::new(map_x, inner.y + grid as u16 + 1, inner.width - 34, 3),
        buf,
    );
    // The query row's strongest keys, exact.
    let mut weights: Vec<(usize, f64)> = matrix[query * m.tokens..(query + 1) * m.tokens]
        .iter()
        .copied()
        .enumerate()
        .collect();
    weights.sort_by(|a, b| b.1.total_cmp(&a.1));
    let top: Vec<Span> = weights
        .iter()
        .take(5)
        .map(|(k, w)| {
            Span::raw(format!(
                "{} {:.3}  ",
                if m.cls && *k == 0 {
                    "CLS".to_string()
                } else {
                    format!("p{}", k - m.first_patch())
                },
                w
            ))
        })
        .collect();
    let mut line = vec![Span::styled("top keys: ", t.dim())];
    line.extend(top);
    Paragraph::new(Line::from(line)).render(Rect::new(inner.x, inner.y + 16, inner.width, 1), buf);
}

fn render_stats(
    cx: Cx<'_>,
    stats: &[Vec<HeadStats>],
    meta: &ProbeMeta,
    area: Rect,
    buf: &mut Buffer,
) {
    let t = cx.theme;
    let cls = match stats.first().and_then(|l| l.first()).and_then(|s| s.cls) {
        Some(_) => " · CLS",
        None => "",
    };
    // With locality self-attention each head's learned scale, as s√d_k (1 = 1/√d_k).
    let title = match meta.attention_scales.is_empty() {
        true => format!(" per head: entropy (nats) · distance (px) · self{cls} · pattern "),
        false => format!(" per head: entropy (nats) · px · self{cls} · s√d_k · pattern "),
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(title, t.title()));
    let inner = block.inner(area);
    block.render(area, buf);
    let rows: Vec<(usize, usize)> = stats
        .iter()
        .enumerate()
        .flat_map(|(l, hs)| (0..hs.len()).map(move |h| (l, h)))
        .collect();
    let selected = rows
        .iter()
        .position(|&(l, h)| l == cx.view.layer && h == cx.view.head)
        .unwrap_or(0);
    let room = inner.height as usize;
    let start = selected
        .saturating_sub(room.saturating_sub(1))
        .min(rows.len().saturating_sub(room));
    let lines: Vec<Line> = rows
        .iter()
        .skip(start)
        .take(room)
        .map(|&(l, h)| {
            let s = stats[l][h];
            let style = if (l, h) == (cx.view.layer, cx.view.head) {
                t.selected_tab()
            } else {
                t.text()
            };
            Line::styled(
                format!(
                    "L{l} H{h} {:>5.2} {:>5.1} {:>4.1}%{}{} {}",
                    s.entropy,
                    s.mean_distance,
                    s.diagonal * 100.0,
                    s.cls
                        .map_or(String::new(), |c| format!(" {:>4.1}%", c * 100.0)),
                    relative_scale(meta, l, h).map_or(String::new(), |r| format!(" ×{r:.2}")),
                    s.pattern_reason()
                ),
                style,
            )
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}

fn render_distance_chart(cx: Cx<'_>, stats: &[Vec<HeadStats>], area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let heads = stats.first().map_or(0, Vec::len);
    let series: Vec<Vec<(f64, f64)>> = (0..heads)
        .map(|h| {
            stats
                .iter()
                .enumerate()
                .map(|(l, hs)| (l as f64, hs[h].mean_distance))
                .collect()
        })
        .collect();
    let top = stats
        .iter()
        .flatten()
        .map(|s| s.mean_distance)
        .fold(1.0, f64::max);
    let datasets: Vec<Dataset> = series
        .iter()
        .map(|points| {
            Dataset::default()
                .marker(t.marker(Series::Eval))
                .graph_type(GraphType::Scatter)
                .style(t.series(Series::Eval))
                .data(points)
        })
        .collect();
    let depth = stats.len().max(2) as f64;
    Chart::new(datasets)
        .block(Block::default().borders(Borders::ALL).title(Span::styled(
            " mean distance (px) by layer, a mark per head ",
            t.title(),
        )))
        .x_axis(
            Axis::default().bounds([-0.5, depth - 0.5]).labels(
                [
                    "0".to_string(),
                    format!("{}", stats.len().saturating_sub(1)),
                ]
                .map(|s| Span::styled(s, t.dim())),
            ),
        )
        .y_axis(Axis::default().bounds([0.0, top * 1.1]).labels(
            ["0".to_string(), format!("{:.0}", top * 1.1)].map(|s| Span::styled(s, t.dim())),
        ))
        .render(area, buf);
}

/// All layers x heads as small heatmaps; the selected one is marked.
fn render_thumbnails(cx: Cx<'_>, probe: &ProbeSnapshot, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let m = &probe.meta;
    let block = Block::default().borders(Borders::ALL).title(Span::styled(
        " all layers (rows) × heads (columns) ",
        t.title(),
    ));
    let inner = block.inner(area);
    block.render(area, buf);
    let image = cx.run.probe_image.min(m.images - 1);
    let selected = (cx.view.layer, cx.view.head);
    draw_layer_head_grid(t, probe, image, (cx.view.scale, Some(selected)), inner, buf);
}

pub fn render(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let Some(meta) = cx.run.shown_probe() else {
        Paragraph::new(vec![
            Line::styled("Attention weights = softmax(QKᵀ/√d_k): row i is where token i (the query) puts its weight over all tokens (the keys).", t.title()),
            Line::raw(""),
            Line::styled("Waiting for the first probe (one is taken before training starts) …", t.dim()),
        ])
        .block(Block::default().borders(Borders::ALL))
        .render(area, buf);
        return;
    };
    let [header, body] = Layout::vertical([Constraint::Length(2), Constraint::Fill(1)]).areas(area);
    let position = probe_label(cx.run.probe_position(), ", .");
    let formula = match meta.attention_scales.is_empty() {
        true => "softmax(QKᵀ/√d_k)",
        false => "locality self-attention softmax(s·QKᵀ), each query's own token masked, s learned per head",
    };
    let tokens = match meta.cls {
        true => "CLS is token 0, patches follow row by row",
        false => "tokens are the patches row by row (no CLS: the head reads their mean)",
    };
    Paragraph::new(vec![
        Line::styled(
            format!("{formula}: row i = where query token i looks; {tokens}"),
            t.dim(),
        ),
        Line::from(vec![
            Span::styled(
                if cx.view.rollout {
                    "rollout "
                } else {
                    "raw weights "
                },
                t.accent(),
            ),
            Span::raw(format!(
                "│ shade: {} │ step {} (epoch {}) │ {position}",
                cx.view.scale.name(),
                meta.step,
                meta.epoch
            )),
        ]),
    ])
    .render(header, buf);
    let Some(probe) = cx.run.shown_full_probe() else {
        Paragraph::new(Line::styled(
            "this probe's attention is no longer in memory (the newest 32 are kept); `vitscope view` the run to see any step",
            t.dim(),
        ))
        .render(body, buf);
        return;
    };
    if probe.attention.is_empty() || probe.meta.images == 0 {
        Paragraph::new(Line::styled(
            "this probe has no attention recorded",
            t.dim(),
        ))
        .render(body, buf);
        return;
    }
    let matrix = shown_matrix(cx, probe);
    let patch = IMAGE_SIZE / probe.meta.grid();
    let stats = all_stats(probe, cx.run.probe_image.min(probe.meta.images - 1), patch);
    let heat_w = (probe.meta.tokens as u16 + 6).min(body.width / 2);
    let [left, right] =
        Layout::horizontal([Constraint::Length(heat_w), Constraint::Fill(1)]).areas(body);
    let heat_h = (probe.meta.tokens as u16).div_ceil(2) + 4;
    let [heat, stats_area] = Layout::vertical([
        Constraint::Length(heat_h.min(left.height)),
        Constraint::Fill(1),
    ])
    .areas(left);
    render_heatmap(cx, probe, &matrix, heat, buf);
    render_stats(cx, &stats, &probe.meta, stats_area, buf);
    let [image, below] =
        Layout::vertical([Constraint::Length(19), Constraint::Fill(1)]).areas(right);
    render_image_panel(cx, probe, &matrix, image, buf);
    let [thumbs, chart] =
        Layout::horizontal([Constraint::Percentage(55), Constraint::Fill(1)]).areas(below);
    render_thumbnails(cx, probe, thumbs, buf);
    render_distance_chart(cx, &stats, chart, buf);
}

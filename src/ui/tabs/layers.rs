//! The Layers tab: training dynamics by depth. Layer × time maps (one row per depth,
//! one column per record, shade = value, log scale where it spans decades) of the
//! gradient norm, the update ratio, the residual stream's RMS and what each layer
//! knows (linear probe and logit lens accuracy), with a cursor on a record; the
//! cursor's values per layer as a table with bars, the gradients by part of each
//! block, and the CKA similarity of the layers. At 80×24: one map and the table.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget, Wrap};

use crate::events::{KnowledgeRecord, LayerHistory};
use crate::inspect::layers::{
    by_depth, depth_rows, group_value, layer_label, LayerMap, Quantity, BLOCK_PARTS,
};
use crate::ui::keys::Action;
use crate::ui::run_state::Ctx;
use crate::ui::theme::ColorMode;
use crate::ui::widgets::frame::{bar, note, panel};

/// The Layers tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LayersView {
    /// The map in front (at 80×24 the only one).
    pub quantity: Quantity,
    /// The record the table and the CKA matrix show, as a step; `None` follows the latest.
    pub cursor: Option<u64>,
}

impl LayersView {
    /// ↑/↓ pick the quantity, ←/→ move the cursor over its records, End follows the latest.
    pub fn on_action(&mut self, action: Action, history: &LayerHistory) {
        let steps = self.quantity.map(history).steps;
        let at = |cursor: Option<u64>| match cursor {
            Some(step) => steps.iter().rposition(|&s| s <= step).unwrap_or(0),
            None => steps.len().saturating_sub(1),
        };
        match action {
            Action::Up => self.quantity = self.quantity.previous(),
            Action::Down => self.quantity = self.quantity.next(),
            Action::Left if !steps.is_empty() => {
                self.cursor = Some(steps[at(self.cursor).saturating_sub(1)]);
            }
            Action::Right if !steps.is_empty() => {
                let i = at(self.cursor) + 1;
                self.cursor = (i + 1 < steps.len()).then(|| steps[i]);
            }
            Action::Latest => self.cursor = None,
            _ => {}
        }
    }
}

impl Default for LayersView {
    fn default() -> Self {
        Self {
            quantity: Quantity::GradNorm,
            cursor: None,
        }
    }
}

pub type Cx<'a> = Ctx<'a, LayersView>;

/// Columns of a map's row labels.
const LABEL_W: u16 = 10;
/// Below this size, one map and the table only.
const FULL_WIDTH: u16 = 140;
const FULL_HEIGHT: u16 = 40;

/// The step the cursor is on: the chosen one, or the selected quantity's latest record.
pub fn cursor_step(cx: Cx<'_>) -> Option<u64> {
    cx.view
        .cursor
        .or_else(|| cx.view.quantity.map(&cx.run.layers).steps.last().copied())
}

pub fn render(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let history = &cx.run.layers;
    if history.is_empty() {
        Paragraph::new(vec![
            Line::styled("Layers: training dynamics by depth", t.title()),
            Line::raw(""),
            Line::styled(
                "Waiting for the first per-layer records: gradient norms and update ratios every \
                 probe.grad_every_steps steps, the residual stream's RMS at every probe, and what \
                 each layer knows (linear probe, logit lens, CKA) at evaluations. Runs recorded \
                 before vitscope had them show nothing here.",
                t.dim(),
            ),
        ])
        .wrap(Wrap { trim: true })
        .render(area, buf);
        return;
    }
    let full = area.width >= FULL_WIDTH && area.height >= FULL_HEIGHT;
    let view = cx.view;
    let cursor = cursor_step(cx);
    // Every quantity's map, built once per frame, in `Quantity::ALL`'s order.
    let maps: Vec<LayerMap> = Quantity::ALL.iter().map(|q| q.map(history)).collect();
    let selected = &maps[Quantity::ALL
        .iter()
        .position(|q| *q == view.quantity)
        .unwrap_or(0)];
    let position = match (view.cursor, selected.steps.len()) {
        (_, 0) => "no records of it yet".to_string(),
        (None, n) => format!("record {n}/{n}, latest"),
        (Some(step), n) => format!(
            "record {}/{n} (←/→ to move, End for latest)",
            selected.column_at(step).map_or(0, |i| i + 1)
        ),
    };
    let head = Line::from(vec![
        Span::styled(view.quantity.title(), t.accent()),
        Span::raw(format!(
            " │ cursor at step {} │ {position} │ ↑/↓ quantity",
            cursor.map_or("-".into(), |s| s.to_string())
        )),
    ]);
    if !full {
        let [header, map_area, table_area] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(selected.rows.len() as u16 + 2),
            Constraint::Fill(1),
        ])
        .areas(area);
        head.render(header, buf);
        render_map(cx, selected, cursor, true, map_area, buf);
        render_table(cx, &maps, cursor, table_area, buf);
        return;
    }
    let [header, body] = Layout::vertical([Constraint::Length(2), Constraint::Fill(1)]).areas(area);
    Paragraph::new(vec![
        Line::styled(
            "Depth down, training time across: shade = value (log where it spans decades). \
             ‖g‖: gradient of the batch loss; ‖Δw‖/‖w‖: what the optimizer did to the weights.",
            t.dim(),
        ),
        head,
    ])
    .render(header, buf);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(58), Constraint::Fill(1)]).areas(body);
    // Every map that fits, the selected one always.
    let mut y = left.y;
    for map in &maps {
        let h = map.rows.len().max(1) as u16 + 3;
        let fits = y + h <= left.bottom();
        if !fits && map.quantity != view.quantity {
            continue;
        }
        let h = h.min(left.bottom().saturating_sub(y));
        if h < 3 {
            break;
        }
        let rect = Rect::new(left.x, y, left.width, h);
        let marker = if map.quantity == view.quantity {
            "▶ "
        } else {
            ""
        };
        let title = format!("{marker}{}{}", map.quantity.title(), scale_note(map));
        let inner = panel(cx.theme, &title, rect, buf);
        render_map(cx, map, cursor, false, inner, buf);
        y += h;
    }
    let depth_rows = depth_rows(&maps).len() as u16;
    let [table, parts, cka, notes] = Layout::vertical([
        Constraint::Length(depth_rows + 3),
        Constraint::Length(depth_rows + 1),
        Constraint::Length(depth_rows + 2),
        Constraint::Fill(1),
    ])
    .areas(right);
    let inner = panel(
        cx.theme,
        &format!(
            "per layer at step {}",
            cursor.map_or("-".into(), |s| s.to_string())
        ),
        table,
        buf,
    );
    render_table(cx, &maps, cursor, inner, buf);
    let inner = panel(cx.theme, "gradients by part of each block", parts, buf);
    render_parts(cx, cursor, inner, buf);
    let record = history.knowledge_at(cursor);
    let title = match record {
        Some(k) => format!(
            "layer similarity (linear CKA, {} test images) at step {}",
            k.test_images, k.step
        ),
        None => "layer similarity (linear CKA)".into(),
    };
    let inner = panel(cx.theme, &title, cka, buf);
    render_cka(cx, record, inner, buf);
    let about = match record {
        Some(k) => format!(
            "Linear probe: ridge (λ = {}) on the pooled residual stream of the first {} \
             training images, scored on the first {} test images. Logit lens: the model's own \
             final norm and head applied to each layer. Every number comes from the run's \
             metrics.jsonl; `e` exports these maps as PNG.",
            k.lambda, k.train_images, k.test_images
        ),
        None => "What each layer knows is measured at evaluations.".into(),
    };
    note(cx.theme, &about, notes, buf);
}

fn scale_note(map: &LayerMap) -> String {
    let (lo, hi) = map.range();
    if map.values.is_empty() {
        return " (no records yet)".into();
    }
    let q = map.quantity;
    format!(
        " · {} … {}{}",
        q.format(lo),
        q.format(hi),
        if map.log { ", log" } else { "" }
    )
}

/// The steps every map spans: from 0 to the latest record of any kind, so that the
/// maps' columns (and the cursor) line up across quantities.
fn span(history: &LayerHistory) -> u64 {
    let last = |steps: Option<u64>| steps.unwrap_or(0);
    last(history.grads.last().map(|r| r.step))
        .max(last(history.scale.last().map(|r| r.step)))
        .max(last(history.knowledge.last().map(|r| r.step)))
        .max(1)
}

/// A map into `area`: (with `titled`) a title line, one line per depth, then an axis
/// line with the cursor's mark. Column x stands for the steps up to its share of
/// [`span`] and shows the latest record by then (blank before the first).
fn render_map(
    cx: Cx<'_>,
    map: &LayerMap,
    cursor: Option<u64>,
    titled: bool,
    area: Rect,
    buf: &mut Buffer,
) {
    let t = cx.theme;
    let mut y = area.y;
    if titled {
        Line::from(vec![
            Span::styled(map.quantity.title(), t.title()),
            Span::styled(scale_note(map), t.dim()),
        ])
        .render(Rect::new(area.x, y, area.width, 1), buf);
        y += 1;
    }
    if map.values.is_empty() {
        note(
            cx.theme,
            "no records of this quantity yet",
            Rect::new(area.x, y, area.width, area.bottom().saturating_sub(y)),
            buf,
        );
        return;
    }
    let width = area.width.saturating_sub(LABEL_W + 1) as usize;
    if width < 8 {
        return;
    }
    let last = span(&cx.run.layers);
    let step_at = |x: usize| last * (x as u64 + 1) / width as u64;
    let record_at: Vec<Option<usize>> = (0..width).map(|x| map.column_at(step_at(x))).collect();
    for (r, label) in map.rows.iter().enumerate() {
        if y >= area.bottom() {
            return;
        }
        buf.set_string(area.x, y, format!("{label:>9}"), t.dim());
        for (x, record) in record_at.iter().enumerate() {
            let v = record
                .and_then(|i| map.values[i].get(r).copied())
                .unwrap_or(f64::NAN);
            let level = map.level(v);
            let (ch, style) = match (record.is_some(), level.is_nan()) {
                (false, _) => (' ', t.dim()),
                (true, true) => ('·', t.dim()),
                (true, false) => {
                    let (ch, style) = t.heat(level);
                    let ch = if t.mode == ColorMode::NoColor {
                        ch
                    } else {
                        '█'
                    };
                    (ch, style)
                }
            };
            buf[(area.x + LABEL_W + x as u16, y)]
                .set_char(ch)
                .set_style(style);
        }
        y += 1;
    }
    if y >= area.bottom() {
        return;
    }
    let axis_x = area.x + LABEL_W;
    buf.set_string(area.x, y, format!("{:>9}", "step"), t.dim());
    buf.set_string(axis_x, y, "0", t.dim());
    // The end label leaves the last column to the cursor's mark.
    let last_text = last.to_string();
    let end = axis_x + width as u16 - 1;
    buf.set_string(end - last_text.len() as u16, y, &last_text, t.dim());
    if let Some(step) = cursor {
        let x = (0..width)
            .find(|&x| step_at(x) >= step)
            .unwrap_or(width - 1);
        buf.set_string(axis_x + x as u16, y, "▲", t.accent());
    }
}

/// Per layer at the cursor: every quantity's value (each from its own record at or
/// before the cursor), with bars for the selected one.
fn render_table(cx: Cx<'_>, maps: &[LayerMap], cursor: Option<u64>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let col_w = 10usize;
    let selected = cx.view.quantity;
    let mut header = vec![Span::styled(format!("{:>9} ", "layer"), t.dim())];
    for map in maps {
        let q = map.quantity;
        let style = if q == selected { t.accent() } else { t.dim() };
        header.push(Span::styled(format!("{:>col_w$}", q.short()), style));
    }
    let bar_w = (area.width as usize).saturating_sub(10 + col_w * maps.len() + 2);
    let mut lines = vec![Line::from(header)];
    for label in &depth_rows(maps) {
        let mut spans = vec![Span::styled(format!("{label:>9} "), t.dim())];
        let mut level = None;
        for map in maps {
            let v = map.value_at(cursor, label);
            let style = if map.quantity == selected {
                t.text()
            } else {
                t.dim()
            };
            let text = v.map_or("·".into(), |v| map.quantity.format(v));
            spans.push(Span::styled(format!("{text:>col_w$}"), style));
            if map.quantity == selected {
                level = v.map(|v| map.level(v));
            }
        }
        if bar_w >= 4 {
            let level = level.filter(|l| l.is_finite());
            let style = level
                .and_then(|l| t.heat_color(l))
                .map_or(t.text(), |c| Style::default().fg(c));
            spans.push(Span::raw("  "));
            spans.push(Span::styled(bar(level.unwrap_or(0.0), bar_w), style));
        }
        lines.push(Line::from(spans));
    }
    Paragraph::new(lines).render(area, buf);
}

/// The gradient figure (norm, or update ratio when that is selected) of each part of
/// each block at the cursor's gradient record.
fn render_parts(cx: Cx<'_>, cursor: Option<u64>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let Some(record) = cx.run.layers.grads_at(cursor) else {
        note(cx.theme, "no gradient records yet", area, buf);
        return;
    };
    let quantity = match cx.view.quantity {
        Quantity::UpdateRatio => Quantity::UpdateRatio,
        _ => Quantity::GradNorm,
    };
    let mut header = vec![Span::styled(format!("{:>9} ", quantity.key()), t.dim())];
    for (_, short) in BLOCK_PARTS {
        header.push(Span::styled(format!("{short:>10}"), t.dim()));
    }
    let mut lines = vec![Line::from(header)];
    for d in by_depth(record) {
        let crate::inspect::layers::Depth::Block(i) = d.depth else {
            continue;
        };
        let mut spans = vec![Span::styled(format!("{:>9} ", d.depth.label()), t.dim())];
        for (part, _) in BLOCK_PARTS {
            let v = group_value(record, &format!("blocks.{i}.{part}"), quantity);
            let text = v.map_or("·".into(), |v| quantity.format(v));
            spans.push(Span::raw(format!("{text:>10}")));
        }
        lines.push(Line::from(spans));
    }
    Paragraph::new(lines).render(area, buf);
}

/// The CKA matrix of a knowledge record: a shade and the value per pair of layers.
fn render_cka(cx: Cx<'_>, record: Option<&KnowledgeRecord>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let Some(k) = record else {
        note(
            cx.theme,
            "measured at evaluations (probe.layers_every_evals)",
            area,
            buf,
        );
        return;
    };
    let n = k.cka.len();
    let mut lines = vec![];
    let mut header = vec![Span::raw(format!("{:>9} ", ""))];
    for j in 0..n {
        header.push(Span::styled(
            format!(
                "{:>6}",
                if j == 0 {
                    "emb".into()
                } else {
                    format!("b{}", j - 1)
                }
            ),
            t.dim(),
        ));
    }
    lines.push(Line::from(header));
    for (i, row) in k.cka.iter().enumerate() {
        let mut spans = vec![Span::styled(format!("{:>9} ", layer_label(i)), t.dim())];
        for &v in row {
            let (_, style) = t.heat(v);
            spans.push(Span::styled(format!("{v:>6.2}"), style));
        }
        lines.push(Line::from(spans));
    }
    Paragraph::new(lines).render(area, buf);
}

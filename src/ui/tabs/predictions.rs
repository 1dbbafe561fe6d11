//! The Predictions tab: the latest evaluation's predictions on the first test images
//! as a pageable grid (true label, prediction, confidence, right or wrong), the
//! selected image's top-5, the confusion matrix and per-class accuracy of the whole
//! test set, and what flipped since the previous evaluation.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Widget, Wrap};

use crate::events::EvalRecord;
use crate::inspect::predictions::{Flip, Predictions};
use crate::ui::theme::ColorMode;
use crate::ui::widgets::frame::{bar, note, panel};
use crate::ui::widgets::paint::{draw_image, draw_image_half};
use std::sync::Arc;

use crate::ui::keys::Action;
use crate::ui::run_state::{Ctx, RunState};

/// Which test images the Predictions tab lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionFilter {
    All,
    Mistakes,
    /// Right, least confident first.
    UnsureRight,
    /// Right or wrong changed since the previous evaluation.
    Flipped,
}

impl PredictionFilter {
    pub fn label(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Mistakes => "mistakes",
            Self::UnsureRight => "right, least confident first",
            Self::Flipped => "flipped since the previous evaluation",
        }
    }
}

/// The Predictions tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PredictionsView {
    /// Position of the selected image in the filtered list.
    pub selected: usize,
    pub filter: PredictionFilter,
    /// Only images of this true class.
    pub class: Option<usize>,
    /// The evaluation shown, as an index into `RunState::predictions`; `None` follows
    /// the latest.
    pub scrub: Option<usize>,
}

impl PredictionsView {
    /// The evaluation shown and the one before it.
    pub fn shown<'a>(
        &self,
        run: &'a RunState,
    ) -> (Option<&'a Arc<Predictions>>, Option<&'a Arc<Predictions>>) {
        let n = run.predictions.len();
        if n == 0 {
            return (None, None);
        }
        let i = self.scrub.unwrap_or(n - 1).min(n - 1);
        (
            run.predictions.get(i),
            i.checked_sub(1).and_then(|j| run.predictions.get(j)),
        )
    }

    /// The arrows and pages move over the grid (as `screen` lays it out), f and c
    /// filter, ←/→ with Shift (the scrub keys) pick the evaluation.
    pub fn on_action(&mut self, action: Action, run: &RunState, screen: (u16, u16)) {
        let count = listed(run, self).len();
        let (per_row, rows) = grid_shape(screen);
        let per_page = per_row * rows;
        let last = count.saturating_sub(1);
        match action {
            Action::Left => self.selected = self.selected.saturating_sub(1),
            Action::Right => self.selected = (self.selected + 1).min(last),
            Action::Up => self.selected = self.selected.saturating_sub(per_row),
            Action::Down => self.selected = (self.selected + per_row).min(last),
            Action::PageUp => self.selected = self.selected.saturating_sub(per_page),
            Action::PageDown => self.selected = (self.selected + per_page).min(last),
            Action::CycleFilter => {
                self.filter = match self.filter {
                    PredictionFilter::All => PredictionFilter::Mistakes,
                    PredictionFilter::Mistakes => PredictionFilter::UnsureRight,
                    PredictionFilter::UnsureRight => PredictionFilter::Flipped,
                    PredictionFilter::Flipped => PredictionFilter::All,
                };
                self.selected = 0;
            }
            Action::CycleClass => {
                let classes = run.class_names().len();
                self.class = match self.class {
                    None if classes > 0 => Some(0),
                    Some(k) if k + 1 < classes => Some(k + 1),
                    _ => None,
                };
                self.selected = 0;
            }
            Action::ScrubBack => {
                let n = run.predictions.len();
                if n > 0 {
                    self.scrub = Some(self.scrub.unwrap_or(n - 1).saturating_sub(1));
                }
            }
            Action::ScrubForward => {
                self.scrub = match self.scrub {
                    Some(i) if i + 2 < run.predictions.len() => Some(i + 1),
                    _ => None,
                };
            }
            Action::Latest => self.scrub = None,
            _ => {}
        }
    }
}

impl Default for PredictionsView {
    fn default() -> Self {
        Self {
            selected: 0,
            filter: PredictionFilter::All,
            class: None,
            scrub: None,
        }
    }
}

pub type Cx<'a> = Ctx<'a, PredictionsView>;

const TILE_W: u16 = 17;
const TILE_H: u16 = 10;
/// Below this width the confusion matrix and class bars are left out.
const WIDE: u16 = 140;
const SIDE_WIDE: u16 = 62;
const SIDE_NARROW: u16 = 36;

/// Rows above and below the body (tabs, status, footer) and the tab's header.
const CHROME_ROWS: u16 = 3 + 2;

/// (columns, rows) of the image grid for a terminal of `screen` size; key handling
/// pages by it, so it must match the layout below.
pub fn grid_shape(screen: (u16, u16)) -> (usize, usize) {
    let (w, h) = screen;
    let side = if w >= WIDE { SIDE_WIDE } else { SIDE_NARROW };
    let grid_w = w.saturating_sub(side + 2);
    let grid_h = h.saturating_sub(CHROME_ROWS + 2);
    (
        usize::from(grid_w / TILE_W).max(1),
        usize::from(grid_h / TILE_H).max(1),
    )
}

/// The test images listed under the current filter and class, in display order.
pub fn listed(run: &RunState, view: &PredictionsView) -> Vec<usize> {
    let (Some(now), previous) = view.shown(run) else {
        return Vec::new();
    };
    let labels = &run.test_labels;
    let count = now.len().min(labels.len());
    let label = |i: usize| usize::from(labels[i]);
    let mut images: Vec<usize> = (0..count)
        .filter(|&i| view.class.is_none_or(|k| label(i) == k))
        .filter(|&i| {
            let right = now.predicted(i).0 == label(i);
            match view.filter {
                PredictionFilter::All => true,
                PredictionFilter::Mistakes => !right,
                PredictionFilter::UnsureRight => right,
                PredictionFilter::Flipped => {
                    previous.is_some_and(|p| now.flip(p, i, label(i)).is_some())
                }
            }
        })
        .collect();
    if view.filter == PredictionFilter::UnsureRight {
        images.sort_by(|&a, &b| now.predicted(a).1.total_cmp(&now.predicted(b).1));
    }
    images
}

fn class_name(cx: Cx<'_>, k: usize) -> String {
    cx.run
        .class_names()
        .get(k)
        .cloned()
        .unwrap_or_else(|| format!("class {k}"))
}

fn render_grid(
    cx: Cx<'_>,
    now: &Predictions,
    previous: Option<&Predictions>,
    list: &[usize],
    area: Rect,
    buf: &mut Buffer,
) {
    let t = cx.theme;
    let (cols, rows) = grid_shape(cx.screen);
    let per_page = cols * rows;
    let selected = cx.view.selected.min(list.len().saturating_sub(1));
    let page = selected / per_page.max(1);
    let pages = list.len().div_ceil(per_page.max(1)).max(1);
    let title = format!(
        "test images {} … {} of {} listed │ page {}/{pages} (PgUp/PgDn)",
        (page * per_page + 1).min(list.len()),
        ((page + 1) * per_page).min(list.len()),
        list.len(),
        page + 1
    );
    let inner = panel(cx.theme, &title, area, buf);
    if list.is_empty() {
        note(cx.theme, "no image matches this filter", inner, buf);
        return;
    }
    for (slot, &image) in list.iter().enumerate().skip(page * per_page).take(per_page) {
        let pos = slot - page * per_page;
        let x = inner.x + (pos % cols) as u16 * TILE_W;
        let y = inner.y + (pos / cols) as u16 * TILE_H;
        if x + TILE_W > inner.right() + 1 || y + TILE_H > inner.bottom() + 1 {
            continue;
        }
        if let Some(px) = cx.run.test_image(image) {
            draw_image_half(t, px, x, y, buf);
        }
        let label = usize::from(cx.run.test_labels[image]);
        let (guess, p) = now.predicted(image);
        let right = guess == label;
        let flip = previous.and_then(|prev| now.flip(prev, image, label));
        let mark = match flip {
            Some(Flip::ToRight) => "↑",
            Some(Flip::ToWrong) => "↓",
            None => " ",
        };
        let mut verdict = if right { t.good() } else { t.bad() };
        let mut truth = t.dim();
        if slot == selected {
            verdict = verdict.add_modifier(Modifier::REVERSED);
            truth = truth.add_modifier(Modifier::REVERSED);
        }
        let name = class_name(cx, guess);
        let first = format!(
            "{}{mark}{:.9} {:>3.0}%",
            if right { "✓" } else { "✗" },
            name,
            p * 100.0
        );
        Paragraph::new(Line::styled(first, verdict))
            .render(Rect::new(x, y + 8, TILE_W - 1, 1), buf);
        Paragraph::new(Line::styled(
            format!("#{image:<4} {:.9}", class_name(cx, label)),
            truth,
        ))
        .render(Rect::new(x, y + 9, TILE_W - 1, 1), buf);
    }
}

fn render_selected(cx: Cx<'_>, now: &Predictions, image: usize, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let label = usize::from(cx.run.test_labels[image]);
    let inner = panel(
        cx.theme,
        &format!("test image #{image}: true {}", class_name(cx, label)),
        area,
        buf,
    );
    let image_w = if inner.width >= 32 + 22 && inner.height >= 16 {
        if let Some(px) = cx.run.test_image(image) {
            draw_image(t, px, inner.x, inner.y, buf);
        }
        34
    } else {
        0
    };
    let bar_w = (inner.width.saturating_sub(image_w + 19) as usize).clamp(4, 20);
    let lines: Vec<Line> = std::iter::once(Line::styled("top 5", t.dim()))
        .chain(now.top(image, 5).into_iter().map(|(k, p)| {
            let style = if k == label { t.good() } else { t.text() };
            Line::from(vec![
                Span::styled(format!("{:<11.10}", class_name(cx, k)), style),
                Span::styled(bar(f64::from(p), bar_w), t.gauge()),
                Span::raw(format!(" {:>5.1}%", p * 100.0)),
            ])
        }))
        .collect();
    Paragraph::new(lines).render(
        Rect::new(
            inner.x + image_w,
            inner.y,
            inner.width.saturating_sub(image_w),
            inner.height,
        ),
        buf,
    );
}

/// Row-normalised heat behind each count; the counts carry it without colour.
fn render_confusion(cx: Cx<'_>, eval: &EvalRecord, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let inner = panel(
        cx.theme,
        &format!(
            "confusion on all {} test images, step {} (rows: true, cols: predicted)",
            eval.confusion.iter().flatten().sum::<u64>(),
            eval.step
        ),
        area,
        buf,
    );
    let k = eval.confusion.len();
    let mut header = vec![Span::raw(format!("{:<9}", ""))];
    for c in 0..k {
        header.push(Span::styled(format!("{:>5.4}", class_name(cx, c)), t.dim()));
    }
    let mut lines = vec![Line::from(header)];
    for (r, row) in eval.confusion.iter().enumerate() {
        let total = row.iter().sum::<u64>().max(1) as f64;
        let mut spans = vec![Span::styled(format!("{:<9.9}", class_name(cx, r)), t.dim())];
        for (c, &count) in row.iter().enumerate() {
            let share = count as f64 / total;
            let style = match t.heat_color(share.sqrt()) {
                Some(bg) if t.mode != ColorMode::NoColor => {
                    let fg = if share.sqrt() > 0.6 {
                        Color::Black
                    } else {
                        Color::White
                    };
                    Style::default().bg(bg).fg(fg)
                }
                _ if r == c => Style::default().add_modifier(Modifier::BOLD),
                _ => Style::default(),
            };
            spans.push(Span::styled(format!("{count:>5}"), style));
        }
        lines.push(Line::from(spans));
    }
    Paragraph::new(lines).render(inner, buf);
}

fn render_class_accuracy(cx: Cx<'_>, eval: &EvalRecord, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let inner = panel(
        cx.theme,
        &format!("per-class accuracy (overall {:.2}%)", eval.accuracy * 100.0),
        area,
        buf,
    );
    let bar_w = (inner.width as usize).saturating_sub(19).max(4);
    let lines: Vec<Line> = eval
        .per_class_accuracy
        .iter()
        .enumerate()
        .map(|(k, &a)| {
            Line::from(vec![
                Span::styled(format!("{:<11.10}", class_name(cx, k)), t.dim()),
                Span::styled(bar(a, bar_w), t.gauge()),
                Span::raw(format!(" {:>5.1}%", a * 100.0)),
            ])
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}

fn render_flips(
    cx: Cx<'_>,
    now: &Predictions,
    previous: Option<&Predictions>,
    area: Rect,
    buf: &mut Buffer,
) {
    let t = cx.theme;
    let inner = panel(cx.theme, "since the previous evaluation", area, buf);
    let Some(prev) = previous else {
        note(
            cx.theme,
            "first evaluation: nothing to compare yet",
            inner,
            buf,
        );
        return;
    };
    let n = now.len().min(cx.run.test_labels.len());
    let (mut up, mut down) = (0, 0);
    for i in 0..n {
        match now.flip(prev, i, usize::from(cx.run.test_labels[i])) {
            Some(Flip::ToRight) => up += 1,
            Some(Flip::ToWrong) => down += 1,
            None => {}
        }
    }
    Paragraph::new(vec![
        Line::from(vec![
            Span::styled(format!("↑ {up} became right"), t.good()),
            Span::raw("   "),
            Span::styled(format!("↓ {down} became wrong"), t.bad()),
        ]),
        Line::styled(
            format!(
                "of {n} images, step {} → {} (f: list them)",
                prev.meta.step, now.meta.step
            ),
            t.dim(),
        ),
    ])
    .wrap(Wrap { trim: true })
    .render(inner, buf);
}

pub fn render(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let (Some(now), previous) = cx.view.shown(cx.run) else {
        Paragraph::new(vec![
            Line::styled(
                "Predictions of the model on test images, from each evaluation (at every epoch's end).",
                t.title(),
            ),
            Line::raw(""),
            Line::styled("Waiting for the first evaluation …", t.dim()),
        ])
        .wrap(Wrap { trim: true })
        .block(Block::default().borders(Borders::ALL))
        .render(area, buf);
        return;
    };
    let previous = previous.map(AsRef::as_ref);
    let view = cx.view;
    let list = listed(cx.run, cx.view);
    let n = cx.run.predictions.len();
    let position = match view.scrub {
        Some(i) if i + 1 < n => format!("evaluation {}/{n} (, . to move, End for latest)", i + 1),
        _ => format!("evaluation {n}/{n}, latest"),
    };
    let class = view.class.map_or("all classes".to_string(), |k| {
        format!("true class {}", class_name(cx, k))
    });
    let [header, body] = Layout::vertical([Constraint::Length(2), Constraint::Fill(1)]).areas(area);
    Paragraph::new(vec![
        Line::styled(
            format!(
                "The model's predictions on the first {} test images (✓ right, ✗ wrong; ↑↓ flipped since the previous evaluation)",
                now.len()
            ),
            t.dim(),
        ),
        Line::from(vec![
            Span::styled(format!("filter: {} │ {class}", view.filter.label()), t.accent()),
            Span::raw(format!(
                " │ step {} (epoch {}) │ {position}",
                now.meta.step, now.meta.epoch
            )),
        ]),
    ])
    .render(header, buf);
    let side_w = if area.width >= WIDE {
        SIDE_WIDE
    } else {
        SIDE_NARROW
    };
    let [grid, side] =
        Layout::horizontal([Constraint::Fill(1), Constraint::Length(side_w)]).areas(body);
    render_grid(cx, now, previous, &list, grid, buf);
    let selected = list
        .get(view.selected.min(list.len().saturating_sub(1)))
        .copied();
    let eval = cx
        .run
        .evals
        .iter()
        .find(|e| e.step == now.meta.step)
        .or(cx.run.evals.last());
    let detail_h = if side_w == SIDE_WIDE { 18 } else { 8 };
    let [detail, rest] =
        Layout::vertical([Constraint::Length(detail_h), Constraint::Fill(1)]).areas(side);
    if let Some(image) = selected {
        render_selected(cx, now, image, detail, buf);
    } else {
        panel(cx.theme, "selected image", detail, buf);
    }
    if side_w == SIDE_WIDE {
        let [confusion, classes, flips] = Layout::vertical([
            Constraint::Length(eval.map_or(3, |e| e.confusion.len() as u16 + 3)),
            Constraint::Length(eval.map_or(3, |e| e.per_class_accuracy.len() as u16 + 2)),
            Constraint::Fill(1),
        ])
        .areas(rest);
        if let Some(eval) = eval {
            render_confusion(cx, eval, confusion, buf);
            render_class_accuracy(cx, eval, classes, buf);
        }
        render_flips(cx, now, previous, flips, buf);
    } else {
        let [flips, more] =
            Layout::vertical([Constraint::Length(5), Constraint::Fill(1)]).areas(rest);
        render_flips(cx, now, previous, flips, buf);
        note(
            cx.theme,
            &format!("the confusion matrix and class accuracies need {WIDE} columns"),
            more,
            buf,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_shape_follows_the_terminal() {
        assert_eq!(grid_shape((200, 60)), (8, 5));
        assert_eq!(grid_shape((80, 24)), (2, 1));
        assert_eq!(grid_shape((10, 5)), (1, 1));
    }
}

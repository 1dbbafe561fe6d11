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
use crate::ui::state::{App, PredictionFilter};
use crate::ui::theme::ColorMode;
use crate::ui::widgets::frame::{bar, note, panel};
use crate::ui::widgets::paint::{draw_image, draw_image_half};

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
pub fn listed(app: &App) -> Vec<usize> {
    let (Some(now), previous) = app.shown_predictions() else {
        return Vec::new();
    };
    let labels = &app.test_labels;
    let view = &app.predictions_view;
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

fn class_name(app: &App, k: usize) -> String {
    app.class_names()
        .get(k)
        .cloned()
        .unwrap_or_else(|| format!("class {k}"))
}

fn render_grid(
    app: &App,
    now: &Predictions,
    previous: Option<&Predictions>,
    list: &[usize],
    area: Rect,
    buf: &mut Buffer,
) {
    let t = &app.theme;
    let (cols, rows) = grid_shape(app.screen);
    let per_page = cols * rows;
    let selected = app
        .predictions_view
        .selected
        .min(list.len().saturating_sub(1));
    let page = selected / per_page.max(1);
    let pages = list.len().div_ceil(per_page.max(1)).max(1);
    let title = format!(
        "test images {} … {} of {} listed │ page {}/{pages} (PgUp/PgDn)",
        (page * per_page + 1).min(list.len()),
        ((page + 1) * per_page).min(list.len()),
        list.len(),
        page + 1
    );
    let inner = panel(app, &title, area, buf);
    if list.is_empty() {
        note(app, "no image matches this filter", inner, buf);
        return;
    }
    for (slot, &image) in list.iter().enumerate().skip(page * per_page).take(per_page) {
        let pos = slot - page * per_page;
        let x = inner.x + (pos % cols) as u16 * TILE_W;
        let y = inner.y + (pos / cols) as u16 * TILE_H;
        if x + TILE_W > inner.right() + 1 || y + TILE_H > inner.bottom() + 1 {
            continue;
        }
        if let Some(px) = app.test_image(image) {
            draw_image_half(t, px, x, y, buf);
        }
        let label = usize::from(app.test_labels[image]);
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
        let name = class_name(app, guess);
        let first = format!(
            "{}{mark}{:.9} {:>3.0}%",
            if right { "✓" } else { "✗" },
            name,
            p * 100.0
        );
        Paragraph::new(Line::styled(first, verdict))
            .render(Rect::new(x, y + 8, TILE_W - 1, 1), buf);
        Paragraph::new(Line::styled(
            format!("#{image:<4} {:.9}", class_name(app, label)),
            truth,
        ))
        .render(Rect::new(x, y + 9, TILE_W - 1, 1), buf);
    }
}

fn render_selected(app: &App, now: &Predictions, image: usize, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let label = usize::from(app.test_labels[image]);
    let inner = panel(
        app,
        &format!("test image #{image}: true {}", class_name(app, label)),
        area,
        buf,
    );
    let image_w = if inner.width >= 32 + 22 && inner.height >= 16 {
        if let Some(px) = app.test_image(image) {
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
                Span::styled(format!("{:<11.10}", class_name(app, k)), style),
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
fn render_confusion(app: &App, eval: &EvalRecord, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = panel(
        app,
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
        header.push(Span::styled(
            format!("{:>5.4}", class_name(app, c)),
            t.dim(),
        ));
    }
    let mut lines = vec![Line::from(header)];
    for (r, row) in eval.confusion.iter().enumerate() {
        let total = row.iter().sum::<u64>().max(1) as f64;
        let mut spans = vec![Span::styled(
            format!("{:<9.9}", class_name(app, r)),
            t.dim(),
        )];
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

fn render_class_accuracy(app: &App, eval: &EvalRecord, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let inner = panel(
        app,
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
                Span::styled(format!("{:<11.10}", class_name(app, k)), t.dim()),
                Span::styled(bar(a, bar_w), t.gauge()),
                Span::raw(format!(" {:>5.1}%", a * 100.0)),
            ])
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}

fn render_flips(
    app: &App,
    now: &Predictions,
    previous: Option<&Predictions>,
    area: Rect,
    buf: &mut Buffer,
) {
    let t = &app.theme;
    let inner = panel(app, "since the previous evaluation", area, buf);
    let Some(prev) = previous else {
        note(app, "first evaluation: nothing to compare yet", inner, buf);
        return;
    };
    let n = now.len().min(app.test_labels.len());
    let (mut up, mut down) = (0, 0);
    for i in 0..n {
        match now.flip(prev, i, usize::from(app.test_labels[i])) {
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

pub fn render(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let (Some(now), previous) = app.shown_predictions() else {
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
    let view = &app.predictions_view;
    let list = listed(app);
    let n = app.predictions.len();
    let position = match view.scrub {
        Some(i) if i + 1 < n => format!("evaluation {}/{n} (, . to move, End for latest)", i + 1),
        _ => format!("evaluation {n}/{n}, latest"),
    };
    let class = view.class.map_or("all classes".to_string(), |k| {
        format!("true class {}", class_name(app, k))
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
    render_grid(app, now, previous, &list, grid, buf);
    let selected = list
        .get(view.selected.min(list.len().saturating_sub(1)))
        .copied();
    let eval = app
        .evals
        .iter()
        .find(|e| e.step == now.meta.step)
        .or(app.evals.last());
    let detail_h = if side_w == SIDE_WIDE { 18 } else { 8 };
    let [detail, rest] =
        Layout::vertical([Constraint::Length(detail_h), Constraint::Fill(1)]).areas(side);
    if let Some(image) = selected {
        render_selected(app, now, image, detail, buf);
    } else {
        panel(app, "selected image", detail, buf);
    }
    if side_w == SIDE_WIDE {
        let [confusion, classes, flips] = Layout::vertical([
            Constraint::Length(eval.map_or(3, |e| e.confusion.len() as u16 + 3)),
            Constraint::Length(eval.map_or(3, |e| e.per_class_accuracy.len() as u16 + 2)),
            Constraint::Fill(1),
        ])
        .areas(rest);
        if let Some(eval) = eval {
            render_confusion(app, eval, confusion, buf);
            render_class_accuracy(app, eval, classes, buf);
        }
        render_flips(app, now, previous, flips, buf);
    } else {
        let [flips, more] =
            Layout::vertical([Constraint::Length(5), Constraint::Fill(1)]).areas(rest);
        render_flips(app, now, previous, flips, buf);
        note(
            app,
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

//! The frame pieces every tab draws with: a titled panel, a dim note where data or
//! room is missing, a text progress bar, and the probe tabs' common head (which probe,
//! which image) — below both the shell and the tabs, so neither imports the other.

use std::sync::Arc;

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Widget, Wrap};

use crate::inspect::probe::ProbeSnapshot;
use crate::ui::run_state::Ctx;
use crate::ui::theme::Theme;

/// The frame of a probe tab: two header lines (what the tab shows, then step, probe
/// position and `detail`), and the shown probe in full with the area left below; or a
/// note saying why there is nothing to draw yet.
pub fn probe_tab<'a, V>(
    cx: Ctx<'a, V>,
    intro: &str,
    detail: String,
    area: Rect,
    buf: &mut Buffer,
) -> Option<(&'a Arc<ProbeSnapshot>, Rect)> {
    let t = cx.theme;
    let Some(meta) = cx.run.shown_probe() else {
        Paragraph::new(vec![
            Line::styled(intro.to_string(), t.title()),
            Line::raw(""),
            Line::styled(
                "Waiting for the first probe (one is taken before training starts) …",
                t.dim(),
            ),
        ])
        .wrap(Wrap { trim: true })
        .block(Block::default().borders(Borders::ALL))
        .render(area, buf);
        return None;
    };
    let [header, body] = Layout::vertical([Constraint::Length(2), Constraint::Fill(1)]).areas(area);
    let position = probe_label(cx.run.probe_position(), ", .");
    Paragraph::new(vec![
        Line::styled(intro.to_string(), t.dim()),
        Line::from(vec![
            Span::styled(detail, t.accent()),
            Span::raw(format!(
                " │ step {} (epoch {}) │ {position}",
                meta.step, meta.epoch
            )),
        ]),
    ])
    .render(header, buf);
    let say = |text: &str, buf: &mut Buffer| {
        Paragraph::new(Line::styled(text.to_string(), t.dim()))
            .wrap(Wrap { trim: true })
            .render(body, buf);
    };
    let Some(probe) = cx.run.shown_full_probe() else {
        say(
            "this probe's arrays are no longer in memory (the newest 32 are kept); `vitscope view` the run to see any step",
            buf,
        );
        return None;
    };
    if probe.meta.images == 0 || probe.hidden.is_empty() {
        say("this probe recorded no images", buf);
        return None;
    }
    Some((probe, body))
}

/// Which probe is shown, of how many (`position` from `RunState::probe_position`), with
/// the keys that move between them; empty before the first probe.
pub fn probe_label(position: Option<(usize, usize)>, keys: &str) -> String {
    match position {
        Some((i, n)) if i + 1 < n => {
            format!("probe {}/{n} ({keys} to move, End for latest)", i + 1)
        }
        Some((_, n)) => format!("probe {n}/{n}, latest"),
        None => String::new(),
    }
}

/// A bordered panel with a title; returns the inside.
pub fn panel(t: &Theme, title: &str, area: Rect, buf: &mut Buffer) -> Rect {
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(format!(" {title} "), t.title()));
    let inner = block.inner(area);
    block.render(area, buf);
    inner
}

/// A dim note in `area` (used where a panel lacks room or data).
pub fn note(t: &Theme, text: &str, area: Rect, buf: &mut Buffer) {
    Paragraph::new(Line::styled(text.to_string(), t.dim()))
        .wrap(Wrap { trim: true })
        .render(area, buf);
}

/// A text progress bar that reads without colour: filled and empty block characters.
pub fn bar(ratio: f64, width: usize) -> String {
    let ratio = if ratio.is_finite() {
        ratio.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let filled = (ratio * width as f64).round() as usize;
    format!("{}{}", "█".repeat(filled), "░".repeat(width - filled))
}

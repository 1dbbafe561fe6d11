//! Drawing the whole screen: tab bar, status line, the current tab, footer, popups.
//! `impl Widget for &App`: drawing reads the state and cannot change it.

use ratatui::buffer::Buffer;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Widget, Wrap};

use super::keys::{footer_fitting, Scope, KEYS};
use super::state::{App, Mode, Popup, Tab};
use super::tabs::{attention, features, layernorm, layers, patches, predictions, training};
use super::widgets::frame::bar;
use crate::data::LoadProgress;
use crate::events::Phase;

/// Below this the dashboard says so instead of drawing.
pub const MIN_WIDTH: u16 = 60;
pub const MIN_HEIGHT: u16 = 18;

impl Widget for &App {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
            render_too_small(area, buf);
            return;
        }
        let [header, status, body, foot] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Fill(1),
            Constraint::Length(1),
        ])
        .areas(area);
        render_tabs(self, header, buf);
        render_status(self, status, buf);
        if self.run.info.is_none() && self.run.failure.is_none() {
            render_loading(self, body, buf);
        } else {
            match self.tab {
                Tab::Training => training::render(self.ctx(&self.training), body, buf),
                Tab::LayerNorm => layernorm::render(self.ctx(&self.layernorm), body, buf),
                Tab::Attention => attention::render(self.ctx(&self.attention), body, buf),
                Tab::Features => features::render(self.ctx(&self.features), body, buf),
                Tab::Patches => patches::render(self.ctx(&self.patches), body, buf),
                Tab::Predictions => predictions::render(self.ctx(&self.predictions), body, buf),
                Tab::Layers => layers::render(self.ctx(&self.layers), body, buf),
            }
        }
        render_footer(self, foot, buf);
        if let Some(message) = &self.run.failure {
            render_failure(self, message, body, buf);
        }
        match self.popup {
            Some(Popup::Help) => render_help(self, area, buf),
            Some(Popup::Log) => render_log(self, area, buf),
            Some(Popup::ConfirmQuit) => render_confirm(self, area, buf),
            None => {}
        }
    }
}

fn render_too_small(area: Rect, buf: &mut Buffer) {
    if area.is_empty() {
        return;
    }
    let text = format!("terminal too small (needs {MIN_WIDTH}x{MIN_HEIGHT})");
    let y = area.y + area.height / 2;
    Paragraph::new(text)
        .alignment(Alignment::Center)
        .wrap(Wrap { trim: true })
        .render(
            Rect::new(area.x, y, area.width, area.height - (y - area.y)),
            buf,
        );
}

fn render_tabs(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let mut spans = vec![Span::styled(" vitscope ", t.title()), Span::raw(" ")];
    let full: usize = 11
        + Tab::ALL
            .iter()
            .map(|t| t.title().chars().count() + 4)
            .sum::<usize>();
    let fits = full <= area.width as usize;
    for (i, tab) in Tab::ALL.iter().enumerate() {
        let style = if *tab == app.tab {
            t.selected_tab()
        } else {
            t.text()
        };
        let title = if fits { tab.title() } else { tab.short() };
        spans.push(Span::styled(format!(" {} {title} ", i + 1), style));
        spans.push(Span::raw(" "));
    }
    Line::from(spans).render(area, buf);
}

fn phase_label(app: &App) -> (String, Style) {
    let t = &app.theme;
    if app.stopping && !app.engine_done {
        return ("stopping (writing checkpoint)".into(), t.accent());
    }
    let style = match app.run.phase {
        Phase::Failed => t.bad(),
        Phase::Finished => t.good(),
        Phase::Paused | Phase::Evaluating | Phase::Stalled => t.accent(),
        Phase::Loading | Phase::Training => t.text().add_modifier(Modifier::BOLD),
    };
    let mut label = app.run.phase.label().to_string();
    if app.mode == Mode::View {
        label = format!("{label} (viewing)");
    }
    (label, style)
}

fn render_status(app: &App, area: Rect, buf: &mut Buffer) {
    // Most important first, so a narrow terminal cuts the least useful part.
    let t = &app.theme;
    let sep = Span::styled(" │ ", t.dim());
    let (label, style) = phase_label(app);
    let mut spans = vec![Span::styled(format!("● {label}"), style)];
    if let Some(notice) = &app.notice {
        spans.push(sep.clone());
        spans.push(Span::styled(notice.clone(), t.accent()));
    }
    // A halt comes first; a spike after the position (the log has the whole line).
    let alert = app.run.alert.as_ref().map(|a| {
        let text = a.message.split(';').next().unwrap_or(&a.message);
        match a.fatal {
            true => (true, Span::styled(format!("⚠ halted: {text}"), t.bad())),
            false => (false, Span::styled(format!("⚠ {text}"), t.accent())),
        }
    });
    if let Some((true, span)) = &alert {
        spans.push(sep.clone());
        spans.push(span.clone());
    }
    if let Some(info) = &app.run.info {
        let step = app.run.train.last().map_or(info.start_step, |r| r.step);
        let epoch = app.run.train.last().map_or(1, |r| r.epoch);
        spans.push(sep.clone());
        spans.push(Span::raw(format!("epoch {epoch}/{}", info.epochs)));
        spans.push(sep.clone());
        spans.push(Span::raw(format!("step {step}/{}", info.final_step)));
    }
    if let Some((false, span)) = alert {
        spans.push(sep.clone());
        spans.push(span);
    }
    spans.push(sep.clone());
    spans.push(Span::raw(app.run.dataset.clone()));
    if let Some(info) = &app.run.info {
        spans.push(sep.clone());
        spans.push(Span::raw(info.device.clone()));
        if info.weights != "raw weights" {
            spans.push(sep.clone());
            spans.push(Span::styled(info.weights.clone(), t.accent()));
        }
    }
    spans.push(sep);
    spans.push(Span::styled(app.run.run_name.clone(), t.dim()));
    Line::from(spans).render(area, buf);
}

fn render_footer(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let mut spans = Vec::new();
    for (key, what) in footer_fitting(&app.scopes(), area.width as usize) {
        spans.push(Span::styled(format!(" {key}"), t.key()));
        spans.push(Span::styled(format!(" {what} "), t.dim()));
    }
    Line::from(spans).render(area, buf);
}

fn render_loading(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let mut lines = vec![
        Line::styled(format!("Loading {} …", app.run.dataset), t.title()),
        Line::raw(""),
    ];
    match &app.run.loading {
        Some(LoadProgress::Downloading { done, total }) => {
            let ratio = if *total > 0 {
                *done as f64 / *total as f64
            } else {
                0.0
            };
            lines.push(Line::raw(format!(
                "downloading CIFAR-10: {:.1} / {:.1} MB",
                *done as f64 / 1e6,
                *total as f64 / 1e6
            )));
            lines.push(Line::styled(bar(ratio, 40), t.gauge()));
        }
        Some(LoadProgress::Unpacking) => lines.push(Line::raw("unpacking the archive …")),
        Some(LoadProgress::Reading { file }) => lines.push(Line::raw(format!("reading {file}"))),
        Some(LoadProgress::Message(m)) => lines.push(Line::raw(m.clone())),
        None => lines.push(Line::styled("starting the trainer …", t.dim())),
    }
    lines.push(Line::raw(""));
    for m in app.run.log.iter().rev().take(4).rev() {
        lines.push(Line::styled(m.clone(), t.dim()));
    }
    let block = Block::default().borders(Borders::ALL).title(" Loading ");
    Paragraph::new(lines)
        .wrap(Wrap { trim: true })
        .block(block)
        .render(area, buf);
}

/// A rectangle of at most `w` x `h` centred in `area`.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn render_failure(app: &App, message: &str, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let rect = centered(area, 70, 9);
    Clear.render(rect, buf);
    let lines = vec![
        Line::styled(message.to_string(), t.bad()),
        Line::raw(""),
        Line::styled("The run directory keeps what was done; q quits.", t.dim()),
    ];
    Paragraph::new(lines)
        .wrap(Wrap { trim: true })
        .block(
            Block::default()
                .borders(Borders::ALL)
                .border_style(t.bad())
                .title(" Training failed "),
        )
        .render(rect, buf);
}

fn render_help(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    // The keys that apply here: everywhere, while training, and on this tab.
    let scopes = app.scopes();
    let keys: Vec<_> = KEYS
        .iter()
        .filter(|b| scopes.contains(&b.scope) || b.scope == Scope::Popup)
        .collect();
    let rect = centered(area, 64, keys.len() as u16 + 6);
    Clear.render(rect, buf);
    // The colour mode first: on a small screen the end of the list is cut off.
    let why = if app.color_note.is_empty() {
        String::new()
    } else {
        format!(" ({})", app.color_note)
    };
    let mut lines = vec![
        Line::from(vec![
            Span::styled(" colours  ", t.dim()),
            Span::raw(format!("{}{why}; ", t.mode.label())),
            Span::styled("--color truecolor|256|none or ui.color changes it", t.dim()),
        ]),
        Line::raw(""),
    ];
    lines.extend(keys.iter().map(|b| {
        Line::from(vec![
            Span::styled(format!(" {:<9}", b.label), t.key()),
            Span::raw(b.description),
        ])
    }));
    lines.push(Line::styled(" Esc closes this help", t.dim()));
    Paragraph::new(lines)
        .wrap(Wrap { trim: false })
        .block(Block::default().borders(Borders::ALL).title(" Keys "))
        .render(rect, buf);
}

fn render_log(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let rect = centered(
        area,
        area.width.saturating_sub(8),
        area.height.saturating_sub(4),
    );
    Clear.render(rect, buf);
    let room = rect.height.saturating_sub(2) as usize;
    let lines: Vec<Line> = app
        .run
        .log
        .iter()
        .skip(app.run.log.len().saturating_sub(room))
        .map(|l| Line::raw(l.clone()))
        .collect();
    let title = format!(" Log ({} messages, also in run.log) ", app.run.log.len());
    Paragraph::new(lines)
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(title)
                .title_bottom(Line::styled(" Esc closes ", t.dim())),
        )
        .render(rect, buf);
}

fn render_confirm(app: &App, area: Rect, buf: &mut Buffer) {
    let t = &app.theme;
    let rect = centered(area, 52, 5);
    Clear.render(rect, buf);
    let lines = vec![
        Line::raw("Stop training and quit? A checkpoint is written."),
        Line::from(vec![
            Span::styled("y", t.key()),
            Span::raw(" / Enter: stop and quit    "),
            Span::styled("Esc", t.key()),
            Span::raw(": keep training"),
        ]),
    ];
    Paragraph::new(lines)
        .alignment(Alignment::Center)
        .block(Block::default().borders(Borders::ALL).title(" Quit "))
        .render(rect, buf);
}

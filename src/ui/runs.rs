//! The runs screen of `vitscope view RUN… | FOLDER`: the runs' training loss and test
//! accuracy overlaid, one colour (and, without colour, one marker) per run, a table
//! of the runs (what differs, state, step, best accuracy and when), and keys to pick,
//! hide and open a run. Drawing reads the comparison and the view; keys change only
//! the view.

use std::time::{Duration, Instant};

use crossterm::event::{Event as TermEvent, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Borders, Chart, Dataset, GraphType, Paragraph, Widget};

use super::chart::{compact, debiased_ema, downsample, stable_bounds, x_bounds, y_bounds};
use super::keys::{action_for, footer_fitting, Action, Scope};
use super::theme::Theme;
use crate::compare::{Comparison, RunSeries};
use crate::ui::training::duration;

/// What the x axis of the runs' curves counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsAxis {
    Step,
    Epoch,
    Time,
}

impl RunsAxis {
    fn next(self) -> Self {
        match self {
            Self::Step => Self::Epoch,
            Self::Epoch => Self::Time,
            Self::Time => Self::Step,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Step => "step",
            Self::Epoch => "epoch",
            Self::Time => "training time (s)",
        }
    }
}

/// The runs screen's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RunsView {
    pub selected: usize,
    pub hidden: Vec<bool>,
    pub x_axis: RunsAxis,
    pub theme: Theme,
}

impl RunsView {
    pub fn new(theme: Theme) -> Self {
        Self {
            selected: 0,
            hidden: Vec::new(),
            x_axis: RunsAxis::Step,
            theme,
        }
    }

    fn is_hidden(&self, i: usize) -> bool {
        self.hidden.get(i).copied().unwrap_or(false)
    }

    /// Applies an action; `Some(true)` to open the selected run, `Some(false)` to quit.
    pub fn on_action(&mut self, action: Action, runs: usize) -> Option<bool> {
        match action {
            Action::Up => self.selected = self.selected.saturating_sub(1),
            Action::Down => self.selected = (self.selected + 1).min(runs.saturating_sub(1)),
            Action::ToggleRun => {
                self.hidden.resize(runs, false);
                if let Some(h) = self.hidden.get_mut(self.selected) {
                    *h = !*h;
                }
            }
            Action::ToggleXAxis => self.x_axis = self.x_axis.next(),
            Action::OpenRun => return Some(true),
            Action::Quit | Action::Interrupt => return Some(false),
            _ => {}
        }
        None
    }
}

/// Steps per epoch of a run, from its records (the last step of epoch 1).
fn steps_per_epoch(run: &RunSeries) -> Option<f64> {
    let first_epoch_end = run
        .train
        .iter()
        .filter(|p| p.epoch == 1)
        .map(|p| p.step)
        .max()?;
    run.train
        .iter()
        .any(|p| p.epoch > 1)
        .then_some(first_epoch_end as f64)
}

/// The x of a record at `step` (epoch `epoch`, `wall` seconds in).
fn x_of(axis: RunsAxis, run: &RunSeries, step: u64, epoch: u64, wall: f64) -> f64 {
    match axis {
        RunsAxis::Step => step as f64,
        RunsAxis::Epoch => match steps_per_epoch(run) {
            Some(spe) => step as f64 / spe,
            None => epoch as f64,
        },
        RunsAxis::Time => wall,
    }
}

/// Each visible run's (index, points) for one curve.
type Curves = Vec<(usize, Vec<(f64, f64)>)>;

fn loss_curves(c: &Comparison, v: &RunsView, width: usize) -> Curves {
    c.runs
        .iter()
        .enumerate()
        .filter(|(i, _)| !v.is_hidden(*i))
        .map(|(i, r)| {
            let smooth = debiased_ema(&r.train.iter().map(|p| p.loss).collect::<Vec<_>>(), 0.9);
            let points: Vec<(f64, f64)> = r
                .train
                .iter()
                .zip(smooth)
                .map(|(p, s)| (x_of(v.x_axis, r, p.step, p.epoch, p.wall_secs), s))
                .collect();
            (i, downsample(&points, width * 2))
        })
        .collect()
}

fn accuracy_curves(c: &Comparison, v: &RunsView) -> Curves {
    c.runs
        .iter()
        .enumerate()
        .filter(|(i, _)| !v.is_hidden(*i))
        .map(|(i, r)| {
            let points = r
                .evals
                .iter()
                .map(|e| {
                    (
                        x_of(v.x_axis, r, e.step, e.epoch, e.wall_secs),
                        e.accuracy * 100.0,
                    )
                })
                .collect();
            (i, points)
        })
        .collect()
}

fn render_chart(v: &RunsView, title: &str, curves: &Curves, area: Rect, buf: &mut Buffer) {
    let t = &v.theme;
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(format!(" {title} "), t.title()));
    let series = || curves.iter().map(|(_, p)| p.as_slice());
    let (Some(xb), Some(yb)) = (x_bounds(series()), y_bounds(series())) else {
        Paragraph::new(Line::styled("no records yet", t.dim()))
            .block(block)
            .render(area, buf);
        return;
    };
    let yb = stable_bounds(yb);
    let datasets: Vec<Dataset> = curves
        .iter()
        .map(|(i, points)| {
            Dataset::default()
                .marker(t.run_marker(*i).0)
                .graph_type(if points.len() > 1 {
                    GraphType::Line
                } else {
                    GraphType::Scatter
                })
                .style(t.run_style(*i))
                .data(points)
        })
        .collect();
    let labels = |[lo, hi]: [f64; 2]| {
        [compact(lo), compact((lo + hi) / 2.0), compact(hi)].map(|s| Span::styled(s, t.dim()))
    };
    Chart::new(datasets)
        .block(block)
        .hidden_legend_constraints((Constraint::Length(0), Constraint::Length(0)))
        .x_axis(
            Axis::default()
                .bounds(xb)
                .labels(labels(xb))
                .title(Span::styled(v.x_axis.label(), t.dim())),
        )
        .y_axis(Axis::default().bounds(yb).labels(labels(yb)))
        .render(area, buf);
}

fn render_table(c: &Comparison, v: &RunsView, area: Rect, buf: &mut Buffer) {
    let t = &v.theme;
    let labels = c.labels();
    let width = labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(4)
        .clamp(4, 40);
    let mut lines = vec![Line::styled(
        format!(
            "  {:<width$}  {:<8} {:>8}  {}",
            "run", "state", "step", "best test accuracy"
        ),
        t.dim(),
    )];
    for (i, (run, label)) in c.runs.iter().zip(&labels).enumerate() {
        let best = run.best().map_or("-".to_string(), |e| {
            format!(
                "{:.2}% (epoch {}, at {})",
                e.accuracy * 100.0,
                e.epoch,
                duration(e.wall_secs)
            )
        });
        let (style, mark) = if v.is_hidden(i) {
            (t.dim(), " ")
        } else {
            (t.run_style(i), t.run_marker(i).1)
        };
        let row_style = if i == v.selected {
            t.selected_tab()
        } else {
            t.text()
        };
        let label: String = label.chars().take(width).collect();
        lines.push(Line::from(vec![
            Span::styled(format!("{mark} "), style),
            Span::styled(
                format!(
                    "{label:<width$}  {:<8} {:>8}  {best}{}",
                    run.state.label(),
                    run.last_step(),
                    if v.is_hidden(i) { "  (hidden)" } else { "" }
                ),
                row_style,
            ),
        ]));
    }
    let room = area.height.saturating_sub(2) as usize;
    let skip = (v.selected + 2).saturating_sub(room);
    let mut rows = lines.into_iter();
    let shown: Vec<Line> = rows.next().into_iter().chain(rows.skip(skip)).collect();
    Paragraph::new(shown)
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(Span::styled(format!(" {} runs ", c.runs.len()), t.title())),
        )
        .render(area, buf);
}

/// The whole runs screen.
pub fn render(c: &Comparison, v: &RunsView, area: Rect, buf: &mut Buffer) {
    let t = &v.theme;
    let rows = (c.runs.len() as u16 + 3).min(area.height / 3).max(4);
    let [header, charts, table, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Fill(1),
        Constraint::Length(rows),
        Constraint::Length(1),
    ])
    .areas(area);
    let differing = c.differing();
    Paragraph::new(Line::from(vec![
        Span::styled(" vitscope runs ", t.accent()),
        Span::styled("│ ", t.dim()),
        Span::raw(if differing.is_empty() {
            "same settings".to_string()
        } else {
            format!("differ in {}", differing.join(", "))
        }),
    ]))
    .render(header, buf);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    render_chart(
        v,
        "train loss (smoothed)",
        &loss_curves(c, v, left.width as usize),
        left,
        buf,
    );
    render_chart(v, "test accuracy %", &accuracy_curves(c, v), right, buf);
    render_table(c, v, table, buf);
    let mut spans = Vec::new();
    for (key, what) in footer_fitting(&[Scope::Runs], footer.width as usize) {
        spans.push(Span::styled(format!(" {key}"), t.key()));
        spans.push(Span::styled(format!(" {what} "), t.dim()));
    }
    Line::from(spans).render(footer, buf);
}

/// Shows the runs until the user quits (`None`) or opens one (its index). Follows the
/// runs each second; redraws after a key or new records. The terminal is restored on
/// every way out.
pub fn run_screen(
    c: &mut Comparison,
    v: &mut RunsView,
    stats: &mut super::DashboardStats,
) -> std::io::Result<Option<usize>> {
    let started = Instant::now();
    let mut terminal = ratatui::init();
    let result = (|| {
        let mut dirty = true;
        let mut last_poll = Instant::now();
        loop {
            if dirty {
                let t = Instant::now();
                terminal.draw(|f| render(c, v, f.area(), f.buffer_mut()))?;
                stats.render_ms.push(t.elapsed().as_secs_f64() * 1e3);
                stats.frames += 1;
                dirty = false;
            }
            if crossterm::event::poll(Duration::from_millis(250))? {
                match crossterm::event::read()? {
                    TermEvent::Key(key) if key.kind != KeyEventKind::Release => {
                        let ctrl_c = key.code == KeyCode::Char('c')
                            && key.modifiers.contains(KeyModifiers::CONTROL);
                        let action = if ctrl_c {
                            Some(Action::Interrupt)
                        } else {
                            action_for(key, &[Scope::Runs])
                        };
                        if let Some(action) = action {
                            match v.on_action(action, c.runs.len()) {
                                Some(true) => return Ok(Some(v.selected)),
                                Some(false) => return Ok(None),
                                None => dirty = true,
                            }
                        }
                    }
                    TermEvent::Resize(_, _) => dirty = true,
                    _ => {}
                }
            }
            if last_poll.elapsed() >= Duration::from_secs(1) {
                dirty |= c.poll();
                last_poll = Instant::now();
            }
        }
    })();
    ratatui::restore();
    stats.wall_secs += started.elapsed().as_secs_f64();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_select_hide_switch_the_axis_open_and_quit() {
        let mut v = RunsView::new(Theme::new(
            super::super::theme::ColorMode::NoColor,
            "braille",
        ));
        assert_eq!(v.on_action(Action::Down, 3), None);
        assert_eq!(v.on_action(Action::Down, 3), None);
        assert_eq!(v.on_action(Action::Down, 3), None);
        assert_eq!(v.selected, 2);
        v.on_action(Action::ToggleRun, 3);
        assert!(v.is_hidden(2) && !v.is_hidden(0));
        v.on_action(Action::ToggleRun, 3);
        assert!(!v.is_hidden(2));
        v.on_action(Action::ToggleXAxis, 3);
        assert_eq!(v.x_axis, RunsAxis::Epoch);
        assert_eq!(v.on_action(Action::OpenRun, 3), Some(true));
        assert_eq!(v.on_action(Action::Quit, 3), Some(false));
    }
}

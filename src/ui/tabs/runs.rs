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

use super::attention::draw_layer_head_grid;
use super::layernorm::{bar_rows, resample, short_name};
use crate::inspect::attention::Scale;
use crate::inspect::probe::ProbeSnapshot;
use crate::palette::debiased_ema;
use crate::run::compare::{Comparison, RunSeries};
use crate::run::RunDir;
use crate::ui::keys::{action_for, footer_fitting, Action, Scope};
use crate::ui::tabs::training::duration;
use crate::ui::theme::Theme;
use crate::ui::widgets::chart::{compact, downsample, stable_bounds, x_bounds, y_bounds};

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
    /// Side by side: the selected run and the next one at a common probe step.
    pub compare: bool,
}

impl RunsView {
    pub fn new(theme: Theme) -> Self {
        Self {
            selected: 0,
            hidden: Vec::new(),
            x_axis: RunsAxis::Step,
            theme,
            compare: false,
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
            Action::ToggleCompare => self.compare = !self.compare,
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

fn render_table(c: &Comparison, labels: &[String], v: &RunsView, area: Rect, buf: &mut Buffer) {
    let t = &v.theme;
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
    for (i, (run, label)) in c.runs.iter().zip(labels).enumerate() {
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

/// Two runs' probes at the same step, for the compare mode.
pub struct Pair {
    pub runs: [usize; 2],
    /// The step shown, and whether both runs have a probe there.
    pub step: u64,
    pub common: bool,
    pub probes: [Option<ProbeSnapshot>; 2],
}

/// The selected run and the next one (wrapping), at the latest probe step both have
/// (or each one's latest when they share none).
pub fn load_pair(c: &Comparison, selected: usize) -> Option<Pair> {
    let n = c.runs.len();
    if n < 2 {
        return None;
    }
    let runs = [selected.min(n - 1), (selected + 1) % n];
    let files = runs.map(|i| {
        RunDir::open(&c.runs[i].dir)
            .map(|r| {
                r.probe_files()
                    .into_iter()
                    .map(|(s, _)| s)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    });
    let common = files[0]
        .iter()
        .rev()
        .find(|s| files[1].contains(s))
        .copied();
    let steps = match common {
        Some(s) => [Some(s), Some(s)],
        None => [files[0].last().copied(), files[1].last().copied()],
    };
    let probes = [0, 1].map(|k| {
        let step = steps[k]?;
        RunDir::open(&c.runs[runs[k]].dir)
            .ok()?
            .read_probe(step)
            .ok()
    });
    Some(Pair {
        runs,
        step: steps[0].or(steps[1]).unwrap_or(0),
        common: common.is_some(),
        probes,
    })
}

/// A histogram's middle half as one row of eighth blocks, `width` wide (the
/// LayerNorm tab's overview draws the whole axis the same way).
fn sparkline(counts: &[u32], width: usize) -> String {
    let (lo, hi) = (counts.len() / 4, counts.len() - counts.len() / 4);
    let middle: Vec<f64> = counts[lo..hi.max(lo)]
        .iter()
        .map(|&c| f64::from(c))
        .collect();
    bar_rows(&resample(&middle, width), 1)
        .pop()
        .unwrap_or_default()
}

fn render_side(
    labels: &[String],
    v: &RunsView,
    pair: &Pair,
    k: usize,
    area: Rect,
    buf: &mut Buffer,
) {
    let t = &v.theme;
    let run = pair.runs[k];
    let label = labels.get(run).cloned().unwrap_or_default();
    let block = Block::default().borders(Borders::ALL).title(Span::styled(
        format!(" {} {label} ", t.run_marker(run).1),
        t.run_style(run),
    ));
    let inner = block.inner(area);
    block.render(area, buf);
    let Some(probe) = &pair.probes[k] else {
        Paragraph::new(Line::styled("no probe recorded yet", t.dim())).render(inner, buf);
        return;
    };
    let m = &probe.meta;
    let places = m.layer_norms.len() as u16;
    let [ln_area, attn_area] =
        Layout::vertical([Constraint::Length(places + 2), Constraint::Fill(1)]).areas(inner);
    // Name (11) and the two σ (22) first: the sparkline takes what is left.
    let spark_w = (ln_area.width as usize).saturating_sub(33).clamp(4, 48);
    let mut lines = vec![Line::styled(
        format!(
            "step {} (epoch {}), norm outputs (middle half of the axis)",
            m.step, m.epoch
        ),
        t.dim(),
    )];
    for ln in &m.layer_norms {
        lines.push(Line::from(vec![
            Span::styled(format!("{:<10} ", short_name(&ln.name)), t.dim()),
            Span::styled(sparkline(&ln.output.histogram.counts, spark_w), t.gauge()),
            Span::raw(format!(
                "  in σ {:>4.2} out σ {:>4.2}",
                ln.input.stats.std, ln.output.stats.std
            )),
        ]));
    }
    Paragraph::new(lines).render(ln_area, buf);
    if probe.attention.is_empty() || m.images == 0 || attn_area.height < 3 {
        return;
    }
    Paragraph::new(Line::styled(
        "attention, image 0: layers (rows) x heads (columns)",
        t.dim(),
    ))
    .render(attn_area, buf);
    let grid = Rect::new(
        attn_area.x,
        attn_area.y + 1,
        attn_area.width,
        attn_area.height - 1,
    );
    draw_layer_head_grid(t, probe, 0, (Scale::MapMax, None), grid, buf);
}

fn render_pair(labels: &[String], v: &RunsView, pair: Option<&Pair>, area: Rect, buf: &mut Buffer) {
    let t = &v.theme;
    let Some(pair) = pair else {
        Paragraph::new(Line::styled("compare needs two runs", t.dim()))
            .block(Block::default().borders(Borders::ALL))
            .render(area, buf);
        return;
    };
    let [note, sides] = Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(area);
    let text = if pair.common {
        format!(
            " side by side at step {} (the latest probe both have); c: back to the curves",
            pair.step
        )
    } else {
        " no probe step in common: each run's latest; c: back to the curves".to_string()
    };
    Paragraph::new(Line::styled(text, t.accent())).render(note, buf);
    let [left, right] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(sides);
    render_side(labels, v, pair, 0, left, buf);
    render_side(labels, v, pair, 1, right, buf);
}

/// The whole runs screen; in compare mode, `pair` side by side in place of the curves.
pub fn render(c: &Comparison, v: &RunsView, pair: Option<&Pair>, area: Rect, buf: &mut Buffer) {
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
    let labels = c.labels();
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
    if v.compare {
        render_pair(&labels, v, pair, charts, buf);
    } else {
        let [left, right] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(charts);
        render_chart(
            v,
            "train loss (smoothed)",
            &loss_curves(c, v, left.width as usize),
            left,
            buf,
        );
        render_chart(v, "test accuracy %", &accuracy_curves(c, v), right, buf);
    }
    render_table(c, &labels, v, table, buf);
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
    stats: &mut crate::ui::stats::DashboardStats,
) -> std::io::Result<Option<usize>> {
    let started = Instant::now();
    let mut terminal = ratatui::init();
    let result = (|| {
        let mut dirty = true;
        let mut last_poll = Instant::now();
        let mut pair: Option<Pair> = None;
        loop {
            // Probes are read when the pair changes, never while drawing.
            if v.compare && pair.as_ref().is_none_or(|p| p.runs[0] != v.selected) {
                pair = load_pair(c, v.selected);
            }
            if dirty {
                let t = Instant::now();
                terminal.draw(|f| render(c, v, pair.as_ref(), f.area(), f.buffer_mut()))?;
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
            crate::ui::theme::ColorMode::NoColor,
            crate::config::Markers::Braille,
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

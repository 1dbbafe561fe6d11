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

use super::compare::render_pair;
pub use super::compare::{load_pair, Pair};
use crate::palette::debiased_ema;
use crate::run::compare::{Comparison, RunSeries};
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

/// The runs table's column the rows are ordered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortBy {
    /// As the runs were opened.
    Listed,
    Run,
    State,
    Step,
    Best,
    /// Training time to the best evaluation.
    Time,
}

impl SortBy {
    fn next(self) -> Self {
        match self {
            Self::Listed => Self::Run,
            Self::Run => Self::State,
            Self::State => Self::Step,
            Self::Step => Self::Best,
            Self::Best => Self::Time,
            Self::Time => Self::Listed,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Listed => "as listed",
            Self::Run => "run",
            Self::State => "state",
            Self::Step => "step",
            Self::Best => "best test accuracy",
            Self::Time => "time to best",
        }
    }
}

/// The runs screen's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RunsView {
    /// Index into the comparison's runs.
    pub selected: usize,
    pub hidden: Vec<bool>,
    pub x_axis: RunsAxis,
    pub theme: Theme,
    /// Side by side: the selected run and the next one at a common probe step.
    pub compare: bool,
    pub sort: SortBy,
    pub descending: bool,
    /// Only runs matching this are listed and drawn ([`Comparison::matches`]).
    pub filter: String,
    /// The filter being typed after `/`, until Enter or Esc.
    pub typing: Option<String>,
}

impl RunsView {
    pub fn new(theme: Theme) -> Self {
        Self {
            selected: 0,
            hidden: Vec::new(),
            x_axis: RunsAxis::Step,
            theme,
            compare: false,
            sort: SortBy::Listed,
            descending: false,
            filter: String::new(),
            typing: None,
        }
    }

    fn is_hidden(&self, i: usize) -> bool {
        self.hidden.get(i).copied().unwrap_or(false)
    }

    /// The runs listed, in table order: those passing the filter, sorted.
    pub fn order(&self, c: &Comparison) -> Vec<usize> {
        let labels = c.labels();
        let mut order: Vec<usize> = (0..c.runs.len())
            .filter(|&i| c.matches(i, &self.filter))
            .collect();
        let best = |i: usize| c.runs[i].best().map_or(f64::NEG_INFINITY, |e| e.accuracy);
        let time = |i: usize| c.runs[i].best().map_or(f64::INFINITY, |e| e.wall_secs);
        order.sort_by(|&a, &b| {
            let by = match self.sort {
                SortBy::Listed => a.cmp(&b),
                SortBy::Run => labels[a].cmp(&labels[b]),
                SortBy::State => c.runs[a].state.label().cmp(c.runs[b].state.label()),
                SortBy::Step => c.runs[a].last_step().cmp(&c.runs[b].last_step()),
                SortBy::Best => best(a).total_cmp(&best(b)),
                SortBy::Time => time(a).total_cmp(&time(b)),
            };
            if self.descending {
                by.reverse()
            } else {
                by
            }
        });
        order
    }

    /// A key while the filter is typed: Enter applies it, Esc leaves it as it was.
    pub fn on_typing(&mut self, code: KeyCode, c: &Comparison) {
        let Some(text) = self.typing.as_mut() else {
            return;
        };
        match code {
            KeyCode::Enter => {
                self.filter = self.typing.take().unwrap_or_default().trim().to_string();
                // Keep a listed run selected.
                if let Some(&first) = self.order(c).first() {
                    if !self.order(c).contains(&self.selected) {
                        self.selected = first;
                    }
                }
            }
            KeyCode::Esc => self.typing = None,
            KeyCode::Backspace => {
                text.pop();
            }
            KeyCode::Char(ch) => text.push(ch),
            _ => {}
        }
    }

    /// Applies an action; `Some(true)` to open the selected run, `Some(false)` to quit.
    pub fn on_action(&mut self, action: Action, c: &Comparison) -> Option<bool> {
        let order = self.order(c);
        let at = order.iter().position(|&i| i == self.selected);
        let runs = c.runs.len();
        match action {
            Action::Up => {
                if let Some(&i) = at
                    .and_then(|p| order.get(p.saturating_sub(1)))
                    .or(order.first())
                {
                    self.selected = i;
                }
            }
            Action::Down => {
                let next = at.map_or(0, |p| (p + 1).min(order.len().saturating_sub(1)));
                if let Some(&i) = order.get(next) {
                    self.selected = i;
                }
            }
            Action::CycleSort => self.sort = self.sort.next(),
            Action::ReverseSort => self.descending = !self.descending,
            Action::Filter => self.typing = Some(self.filter.clone()),
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
        .filter(|(i, _)| !v.is_hidden(*i) && c.matches(*i, &v.filter))
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
        .filter(|(i, _)| !v.is_hidden(*i) && c.matches(*i, &v.filter))
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
    let mark = |by: SortBy| match (v.sort == by, v.descending) {
        (true, false) => "▲",
        (true, true) => "▼",
        _ => "",
    };
    let (run, state, step) = (
        format!("run{}", mark(SortBy::Run)),
        format!("state{}", mark(SortBy::State)),
        format!("step{}", mark(SortBy::Step)),
    );
    let (best, time) = (mark(SortBy::Best), mark(SortBy::Time));
    let mut lines = vec![Line::styled(
        format!(
            "  {run:<width$}  {state:<8} {step:>8}  best test accuracy{best} (epoch, at{time})"
        ),
        t.dim(),
    )];
    let order = v.order(c);
    for &i in &order {
        let (run, label) = (&c.runs[i], &labels[i]);
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
    let position = order.iter().position(|&i| i == v.selected).unwrap_or(0);
    let skip = (position + 2).saturating_sub(room);
    let mut rows = lines.into_iter();
    let shown: Vec<Line> = rows.next().into_iter().chain(rows.skip(skip)).collect();
    let title = match (&v.typing, v.filter.is_empty()) {
        (Some(text), _) => format!(" filter: {text}▏ (Enter to apply, Esc to leave) "),
        (None, true) => format!(" {} runs, sorted by {} ", c.runs.len(), v.sort.label()),
        (None, false) => format!(
            " {} of {} runs match `{}`, sorted by {} ",
            order.len(),
            c.runs.len(),
            v.filter,
            v.sort.label()
        ),
    };
    Paragraph::new(shown)
        .block(
            Block::default()
                .borders(Borders::ALL)
                .title(Span::styled(title, t.title())),
        )
        .render(area, buf);
}

impl RunsView {
    /// The selected run and the next one listed (wrapping), for the compare mode.
    pub fn pair_runs(&self, c: &Comparison) -> Option<[usize; 2]> {
        let order = self.order(c);
        let at = order.iter().position(|&i| i == self.selected)?;
        (order.len() >= 2).then(|| [order[at], order[(at + 1) % order.len()]])
    }
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
        render_pair(c, &labels, &v.theme, pair, charts, buf);
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
            let wanted = v.pair_runs(c);
            if v.compare && pair.as_ref().map(|p| p.runs) != wanted {
                pair = wanted.and_then(|runs| load_pair(c, runs));
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
                        if v.typing.is_some() && !ctrl_c {
                            v.on_typing(key.code, c);
                            dirty = true;
                            continue;
                        }
                        let action = if ctrl_c {
                            Some(Action::Interrupt)
                        } else {
                            action_for(key, &[Scope::Runs])
                        };
                        if let Some(action) = action {
                            match v.on_action(action, c) {
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

    /// Three runs (norm pre, none, post) whose best accuracies are 50%, 70%, 60%.
    fn three_runs(tmp: &std::path::Path) -> Comparison {
        for (name, norm, acc) in [("a", "pre", 0.5), ("b", "none", 0.7), ("c", "post", 0.6)] {
            let dir = tmp.join(name);
            let config =
                crate::config::Config::from_sources(None, &[format!("model.norm={norm}")]).unwrap();
            let run = crate::run::RunDir::create(tmp, Some(&dir), &config).unwrap();
            let mut eval = crate::run::milestones::test_eval(1, acc, 10.0 / acc);
            eval.step = 10;
            let line = serde_json::to_string(&crate::events::MetricRecord::Eval(eval)).unwrap();
            std::fs::write(run.file(crate::run::METRICS_FILE), format!("{line}\n")).unwrap();
        }
        Comparison::open(&[tmp.to_path_buf()]).unwrap()
    }

    #[test]
    fn keys_select_hide_switch_the_axis_open_and_quit() {
        let tmp = tempfile::tempdir().unwrap();
        let c = three_runs(tmp.path());
        let mut v = RunsView::new(Theme::new(
            crate::ui::theme::ColorMode::NoColor,
            crate::config::Markers::Braille,
        ));
        assert_eq!(v.on_action(Action::Down, &c), None);
        assert_eq!(v.on_action(Action::Down, &c), None);
        assert_eq!(v.on_action(Action::Down, &c), None);
        assert_eq!(v.selected, 2);
        v.on_action(Action::ToggleRun, &c);
        assert!(v.is_hidden(2) && !v.is_hidden(0));
        v.on_action(Action::ToggleRun, &c);
        assert!(!v.is_hidden(2));
        v.on_action(Action::ToggleXAxis, &c);
        assert_eq!(v.x_axis, RunsAxis::Epoch);
        assert_eq!(v.on_action(Action::OpenRun, &c), Some(true));
        assert_eq!(v.on_action(Action::Quit, &c), Some(false));
    }

    #[test]
    fn the_table_sorts_by_any_column_and_filters_by_a_setting() {
        let tmp = tempfile::tempdir().unwrap();
        let c = three_runs(tmp.path());
        let mut v = RunsView::new(Theme::new(
            crate::ui::theme::ColorMode::NoColor,
            crate::config::Markers::Braille,
        ));
        assert_eq!(v.order(&c), [0, 1, 2]);
        // run (by label: norm=none, norm=post, norm=pre), state, step, best.
        v.on_action(Action::CycleSort, &c);
        assert_eq!(v.order(&c), [1, 2, 0]);
        for _ in 0..3 {
            v.on_action(Action::CycleSort, &c);
        }
        assert_eq!(v.sort, SortBy::Best);
        assert_eq!(v.order(&c), [0, 2, 1]);
        v.on_action(Action::ReverseSort, &c);
        assert_eq!(v.order(&c), [1, 2, 0]);
        // Time to best: 10 / accuracy seconds, fastest first when ascending.
        v.on_action(Action::CycleSort, &c);
        v.on_action(Action::ReverseSort, &c);
        assert_eq!(v.order(&c), [1, 2, 0]);
        // `/norm=none` Enter: one run left, and it is selected.
        v.on_action(Action::Filter, &c);
        for ch in "norm=none".chars() {
            v.on_typing(KeyCode::Char(ch), &c);
        }
        v.on_typing(KeyCode::Enter, &c);
        assert_eq!(
            (v.filter.as_str(), v.order(&c), v.selected),
            ("norm=none", vec![1], 1)
        );
        let mut buf = Buffer::empty(Rect::new(0, 0, 120, 30));
        render(&c, &v, None, buf.area, &mut buf);
        let text: String = (0..30)
            .map(|y| (0..120).map(|x| buf[(x, y)].symbol()).collect::<String>() + "\n")
            .collect();
        assert!(text.contains("1 of 3 runs match `norm=none`"), "{text}");
        assert!(!text.contains("norm=pre "), "{text}");
        // Esc while typing keeps the filter; an empty one shows all again.
        v.on_action(Action::Filter, &c);
        v.on_typing(KeyCode::Char('x'), &c);
        v.on_typing(KeyCode::Esc, &c);
        assert_eq!(v.filter, "norm=none");
        v.on_action(Action::Filter, &c);
        for _ in 0..9 {
            v.on_typing(KeyCode::Backspace, &c);
        }
        v.on_typing(KeyCode::Enter, &c);
        assert_eq!(v.order(&c), [1, 2, 0], "all three, still by time to best");
    }
}

//! The Training tab: loss and accuracy curves (raw, smoothed, evaluation), learning
//! rate, throughput, the latest numbers, and progress with ETA.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Borders, Chart, Dataset, GraphType, Paragraph, Widget};

use crate::events::{Phase, TrainRecord};
use crate::palette::debiased_ema;
use crate::ui::keys::Action;
use crate::ui::run_state::Ctx;
use crate::ui::theme::Series;
use crate::ui::widgets::chart::{
    compact, downsample, log10_or_nan, stable_bounds, x_bounds, y_bounds,
};
use crate::ui::widgets::frame::bar;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Step,
    Time,
}

/// The Training tab's view settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingView {
    pub smoothing: f64,
    pub log_y: bool,
    pub x_axis: XAxis,
    /// Show only the last `recent_steps` steps.
    pub zoomed: bool,
    pub recent_steps: usize,
}

impl TrainingView {
    pub fn new(ui: &crate::config::UiConfig) -> Self {
        Self {
            smoothing: ui.smoothing,
            log_y: false,
            x_axis: XAxis::Step,
            zoomed: false,
            recent_steps: ui.recent_steps,
        }
    }

    /// l log scale, x the axis, z the recent window, ←/→ its width, ↑/↓ or +/- smoothing.
    pub fn on_action(&mut self, action: Action) {
        match action {
            Action::ToggleLogScale => self.log_y = !self.log_y,
            Action::ToggleXAxis => {
                self.x_axis = match self.x_axis {
                    XAxis::Step => XAxis::Time,
                    XAxis::Time => XAxis::Step,
                }
            }
            Action::ToggleZoom => self.zoomed = !self.zoomed,
            Action::Left => {
                self.zoomed = true;
                self.recent_steps = (self.recent_steps / 2).max(10);
            }
            Action::Right => {
                self.zoomed = true;
                self.recent_steps = (self.recent_steps * 2).min(1 << 24);
            }
            Action::Up | Action::SmoothMore => {
                self.smoothing = (self.smoothing + 0.05).min(0.99);
            }
            Action::Down | Action::SmoothLess => {
                self.smoothing = (self.smoothing - 0.05).max(0.0);
            }
            _ => {}
        }
    }
}

pub type Cx<'a> = Ctx<'a, TrainingView>;

/// One curve to draw.
struct Curve {
    name: String,
    series: Series,
    points: Vec<(f64, f64)>,
}

fn x_of(cx: Cx<'_>, step: u64, wall_secs: f64) -> f64 {
    match cx.view.x_axis {
        XAxis::Step => step as f64,
        XAxis::Time => wall_secs / 60.0,
    }
}

/// The training records in view (all, or the recent window).
fn visible(cx: Cx<'_>) -> (usize, &[TrainRecord]) {
    let records = &cx.run.train[..];
    if !cx.view.zoomed {
        return (0, records);
    }
    let last = records.last().map_or(0, |r| r.step);
    let from = last.saturating_sub(cx.view.recent_steps as u64);
    let start = records.partition_point(|r| r.step <= from);
    (start, &records[start..])
}

fn first_visible_step(cx: Cx<'_>) -> u64 {
    let (_, records) = visible(cx);
    records.first().map_or(0, |r| r.step)
}

/// Raw and smoothed training curves of `value`, plus evaluation points of `eval_value`.
fn curves(
    cx: Cx<'_>,
    value: impl Fn(&TrainRecord) -> f64,
    eval_value: impl Fn(&crate::events::EvalRecord) -> f64,
    max_points: usize,
) -> Vec<Curve> {
    let (start, records) = visible(cx);
    let all: Vec<f64> = cx.run.train.iter().map(&value).collect();
    let smooth = debiased_ema(&all, cx.view.smoothing);
    let y = |v: f64| {
        if cx.view.log_y {
            log10_or_nan(v)
        } else {
            v
        }
    };
    let raw: Vec<(f64, f64)> = records
        .iter()
        .map(|r| (x_of(cx, r.step, r.wall_secs), y(value(r))))
        .collect();
    let smoothed: Vec<(f64, f64)> = records
        .iter()
        .zip(&smooth[start..])
        .map(|(r, s)| (x_of(cx, r.step, r.wall_secs), y(*s)))
        .collect();
    let from = first_visible_step(cx);
    let evals: Vec<(f64, f64)> = cx
        .run
        .evals
        .iter()
        .filter(|e| e.step >= from)
        .map(|e| (x_of(cx, e.step, e.wall_secs), y(eval_value(e))))
        .collect();
    let t = cx.theme;
    vec![
        Curve {
            name: format!("{} train", t.legend_symbol(Series::TrainRaw)),
            series: Series::TrainRaw,
            points: downsample(&raw, max_points),
        },
        Curve {
            name: format!(
                "{} smoothed {:.2}",
                t.legend_symbol(Series::TrainSmooth),
                cx.view.smoothing
            ),
            series: Series::TrainSmooth,
            points: downsample(&smoothed, max_points),
        },
        Curve {
            name: format!("{} test", t.legend_symbol(Series::Eval)),
            series: Series::Eval,
            points: evals,
        },
    ]
}

fn x_title(cx: Cx<'_>) -> &'static str {
    match cx.view.x_axis {
        XAxis::Step => "step",
        XAxis::Time => "training time (min)",
    }
}

/// The x range of the charts: the whole run's steps when showing everything (curves
/// then grow to the right without rescaling), else the data's range, rounded.
fn x_range(cx: Cx<'_>, data: [f64; 2]) -> [f64; 2] {
    match (cx.view.x_axis, cx.view.zoomed, &cx.run.info) {
        (XAxis::Step, false, Some(info)) if (info.final_step as f64) > data[0] => {
            [data[0].min(1.0), info.final_step as f64]
        }
        _ => stable_bounds(data),
    }
}

fn draw_chart(
    cx: Cx<'_>,
    title: &str,
    curves: &[Curve],
    log_y: bool,
    area: Rect,
    buf: &mut Buffer,
) {
    let t = cx.theme;
    // The legend lives in the title: it costs no plot area and survives small sizes.
    let scale = if log_y { " (log y)" } else { "" };
    let mut title_spans = vec![Span::styled(format!(" {title}{scale} "), t.title())];
    if curves.len() > 1 {
        for c in curves {
            title_spans.push(Span::styled(format!("{} ", c.name), t.series(c.series)));
        }
    }
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Line::from(title_spans));
    let slices: Vec<&[(f64, f64)]> = curves.iter().map(|c| c.points.as_slice()).collect();
    let (Some(xb), Some(mut yb)) = (
        x_bounds(slices.iter().copied()),
        y_bounds(slices.iter().copied()),
    ) else {
        Paragraph::new(Line::styled("waiting for the first step …", t.dim()))
            .block(block)
            .render(area, buf);
        return;
    };
    let xb = x_range(cx, xb);
    yb = stable_bounds(yb);
    let non_negative = slices
        .iter()
        .all(|s| s.iter().all(|p| p.1 >= 0.0 || p.1.is_nan()));
    if !log_y && non_negative {
        yb[0] = yb[0].max(0.0);
    }
    let datasets: Vec<Dataset> = curves
        .iter()
        .filter(|c| !c.points.is_empty())
        .map(|c| {
            Dataset::default()
                .marker(t.marker(c.series))
                .graph_type(if c.series == Series::Eval {
                    GraphType::Scatter
                } else {
                    GraphType::Line
                })
                .style(t.series(c.series))
                .data(&c.points)
        })
        .collect();
    let y_label = |v: f64| {
        if log_y {
            compact(10f64.powf(v))
        } else {
            compact(v)
        }
    };
    let x_label = |v: f64| match cx.view.x_axis {
        XAxis::Step => format!("{v:.0}"),
        XAxis::Time => compact(v),
    };
    let x_labels = [xb[0], (xb[0] + xb[1]) / 2.0, xb[1]].map(|v| Span::styled(x_label(v), t.dim()));
    let y_labels: Vec<Span> = if area.height >= 10 {
        vec![yb[0], (yb[0] + yb[1]) / 2.0, yb[1]]
    } else {
        vec![yb[0], yb[1]]
    }
    .into_iter()
    .map(|v| Span::styled(y_label(v), t.dim()))
    .collect();
    Chart::new(datasets)
        .block(block)
        .x_axis(
            Axis::default()
                .title(Span::styled(x_title(cx), t.dim()))
                .bounds(xb)
                .labels(x_labels),
        )
        .y_axis(
            Axis::default()
                .title(Span::styled(scale, t.dim()))
                .bounds(yb)
                .labels(y_labels),
        )
        .render(area, buf);
}

fn single_curve(
    cx: Cx<'_>,
    name: &str,
    value: impl Fn(&TrainRecord) -> f64,
    smooth: bool,
    max_points: usize,
) -> Vec<Curve> {
    let (start, records) = visible(cx);
    let values: Vec<f64> = cx.run.train.iter().map(&value).collect();
    let values = if smooth {
        debiased_ema(&values, 0.9)
    } else {
        values
    };
    let points: Vec<(f64, f64)> = records
        .iter()
        .zip(&values[start..])
        .map(|(r, v)| (x_of(cx, r.step, r.wall_secs), *v))
        .collect();
    vec![Curve {
        name: name.to_string(),
        series: Series::Single,
        points: downsample(&points, max_points),
    }]
}

/// Mean seconds per step over the last few steps: the pace for ETAs, right after a
/// resume too (it never looks at time before this process started).
pub fn seconds_per_step(cx: Cx<'_>) -> Option<f64> {
    let recent: Vec<f64> = cx
        .run
        .train
        .iter()
        .rev()
        .take(20)
        .map(|r| r.step_ms / 1e3)
        .collect();
    (!recent.is_empty()).then(|| recent.iter().sum::<f64>() / recent.len() as f64)
}

/// (seconds left in this epoch, seconds left in the run), evaluations included.
pub fn eta(cx: Cx<'_>) -> Option<(f64, f64)> {
    let info = cx.run.info.as_ref()?;
    let per_step = seconds_per_step(cx)?;
    let step = cx.run.train.last().map_or(info.start_step, |r| r.step);
    let spe = info.steps_per_epoch.max(1);
    let epoch_end = step.div_ceil(spe).max(1) * spe;
    let epoch_end = if step.is_multiple_of(spe) {
        step + spe
    } else {
        epoch_end
    };
    let eval_secs = cx.run.evals.last().map_or(0.0, |e| {
        info.test_images as f64 / e.images_per_sec.max(1e-9)
    });
    let evals_left = info.final_step.div_ceil(spe).saturating_sub(step / spe);
    let run =
        info.final_step.saturating_sub(step) as f64 * per_step + evals_left as f64 * eval_secs;
    let epoch = epoch_end.min(info.final_step).saturating_sub(step) as f64 * per_step + eval_secs;
    Some((epoch, run))
}

pub fn duration(secs: f64) -> String {
    if !secs.is_finite() {
        return "-".into();
    }
    let s = secs.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn render_numbers(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let block = Block::default()
        .borders(Borders::ALL)
        .title(Span::styled(" Latest ", t.title()));
    let Some(last) = cx.run.train.last() else {
        Paragraph::new(Line::styled("waiting for the first step …", t.dim()))
            .block(block)
            .render(area, buf);
        return;
    };
    let smooth_loss = debiased_ema(
        &cx.run.train.iter().map(|r| r.loss).collect::<Vec<_>>(),
        cx.view.smoothing,
    );
    let pair = |k1: &str, v1: String, k2: &str, v2: String| {
        Line::from(vec![
            Span::styled(format!("{k1:<10}"), t.dim()),
            // At least one space before the second key, however wide the value
            // ("1045  cpu 194%" fills the column).
            Span::raw(format!("{:<14}", format!("{v1} "))),
            Span::styled(format!("{k2:<10}"), t.dim()),
            Span::raw(v2),
        ])
    };
    let test = cx.run.evals.last().map_or("-".to_string(), |e| {
        format!("{:.2}% e{}", e.accuracy * 100.0, e.epoch)
    });
    let best = cx.run.best_eval().map_or("-".to_string(), |e| {
        format!("{:.2}% e{}", e.accuracy * 100.0, e.epoch)
    });
    let eval_loss = cx
        .run
        .evals
        .last()
        .map_or("-".to_string(), |e| format!("{:.4}", e.loss));
    let cpu = cx
        .run
        .process
        .cpu_percent
        .map_or("-".to_string(), |c| format!("{c:.0}%"));
    // The peak, which is what the estimate made before training promised.
    let mb = |b: Option<u64>| b.map_or("-".to_string(), |b| format!("{:.0}", b as f64 / 1e6));
    let mem = format!(
        "{}/{} MB",
        mb(cx.run.process.peak_rss_bytes),
        mb(cx.run.process.estimate_bytes)
    );
    let lines = vec![
        pair(
            "loss",
            format!("{:.4}", last.loss),
            "smoothed",
            format!("{:.4}", smooth_loss.last().copied().unwrap_or(f64::NAN)),
        ),
        pair(
            "train acc",
            format!("{:.1}%", last.accuracy * 100.0),
            "test loss",
            eval_loss,
        ),
        pair("test acc", test, "best", best),
        pair(
            "lr",
            format!("{:.2e}", last.lr),
            "step",
            format!("{:.0} ms", last.step_ms),
        ),
        pair(
            "images/s",
            format!("{:.0}  cpu {cpu}", last.images_per_sec),
            "peak/est",
            mem,
        ),
        Line::from(vec![
            Span::styled(format!("{:<10}", "reached"), t.dim()),
            Span::raw(crate::run::milestones::summary(&cx.run.evals)),
        ]),
    ];
    let mut lines = lines;
    // Too short for every row (80x24): the learning rate has its own chart, so its row
    // gives way to when the run reached each accuracy.
    if (block.inner(area).height as usize) < lines.len() {
        lines.remove(3);
    }
    Paragraph::new(lines).block(block).render(area, buf);
}

fn render_progress(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let t = cx.theme;
    let Some(info) = &cx.run.info else { return };
    let step = cx.run.train.last().map_or(info.start_step, |r| r.step);
    let spe = info.steps_per_epoch.max(1);
    let in_epoch = if step > 0 && step.is_multiple_of(spe) {
        spe
    } else {
        step % spe
    };
    let epoch = cx.run.train.last().map_or(1, |r| r.epoch);
    let eta = eta(cx);
    let eta_text = |secs: Option<f64>| match cx.run.phase {
        Phase::Finished => "done".to_string(),
        Phase::Paused => "paused".to_string(),
        Phase::Failed | Phase::Stalled => "-".to_string(),
        _ => secs.map_or("ETA -".to_string(), |s| format!("ETA {}", duration(s))),
    };
    let row = |label: String, ratio: f64, tail: String, width: usize| {
        Line::from(vec![
            Span::styled(format!("{label:<14}"), t.dim()),
            Span::styled(bar(ratio, width), t.gauge()),
            Span::raw(format!(" {:>5.1}%  {tail}", ratio * 100.0)),
        ])
    };
    // A budgeted run: where the projected end falls against the budget.
    let budget = info.budget_secs.map_or(String::new(), |b| {
        let spent = cx
            .run
            .train
            .last()
            .map_or(info.start_wall_secs, |r| r.wall_secs);
        let projected = match (cx.run.phase, eta.map(|e| e.1)) {
            (Phase::Finished, _) => spent,
            (_, Some(left)) => spent + left,
            _ => f64::NAN,
        };
        format!(
            "  budget {} · projected {}",
            duration(b),
            duration(projected)
        )
    });
    let tails = [
        eta_text(eta.map(|e| e.0)),
        eta_text(eta.map(|e| e.1)) + &budget,
    ];
    // The bars give way to the text: label 14, percentage 9, then the longer tail.
    let longest = tails.iter().map(|t| t.chars().count()).max().unwrap_or(0);
    let width = (area.width as usize)
        .saturating_sub(14 + 9 + longest)
        .clamp(4, 120);
    let [epoch_tail, run_tail] = tails;
    let lines = vec![
        row(
            format!("epoch {epoch}/{}", info.epochs),
            in_epoch as f64 / spe as f64,
            epoch_tail,
            width,
        ),
        row(
            format!("run {step}/{}", info.final_step),
            step as f64 / info.final_step.max(1) as f64,
            run_tail,
            width,
        ),
    ];
    Paragraph::new(lines).render(area, buf);
}

pub fn render(cx: Cx<'_>, area: Rect, buf: &mut Buffer) {
    let [charts, middle, progress] = Layout::vertical([
        Constraint::Percentage(58),
        Constraint::Fill(1),
        Constraint::Length(2),
    ])
    .areas(area);
    let [loss_area, acc_area] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(charts);
    // Narrow terminals drop the throughput chart: its latest value is in the numbers.
    let wide = area.width >= 120;
    let [lr_area, ips_area, numbers_area] = Layout::horizontal([
        Constraint::Percentage(if wide { 24 } else { 35 }),
        Constraint::Percentage(if wide { 24 } else { 0 }),
        Constraint::Fill(1),
    ])
    .areas(middle);
    let max_points = (area.width as usize * 4).max(16);
    let log_y = cx.view.log_y;
    draw_chart(
        cx,
        "Loss",
        &curves(cx, |r| r.loss, |e| e.loss, max_points),
        log_y,
        loss_area,
        buf,
    );
    draw_chart(
        cx,
        "Accuracy",
        &curves(cx, |r| r.accuracy, |e| e.accuracy, max_points),
        false,
        acc_area,
        buf,
    );
    draw_chart(
        cx,
        "Learning rate",
        &single_curve(cx, "lr", |r| r.lr, false, max_points),
        false,
        lr_area,
        buf,
    );
    if wide {
        draw_chart(
            cx,
            "Images/s",
            &single_curve(
                cx,
                "img/s (smoothed)",
                |r| r.images_per_sec,
                true,
                max_points,
            ),
            false,
            ips_area,
            buf,
        );
    }
    render_numbers(cx, numbers_area, buf);
    render_progress(cx, progress, buf);
}

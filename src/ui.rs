//! The dashboard: a ratatui app fed by the trainer's events (or a run directory's),
//! key input and a one-second tick, redrawn only when something changed and at a
//! capped rate, so that one left open in tmux over SSH costs little.

pub mod app;
pub mod keys;
pub mod run_state;
pub mod shell;
pub mod state;
pub mod stats;
pub mod tab;
pub mod tabs;
pub mod theme;
pub mod widgets;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossterm::event::{Event as TermEvent, KeyEventKind};
use ratatui::DefaultTerminal;
use tokio::sync::mpsc::{unbounded_channel, Receiver, UnboundedReceiver};

use crate::config::UiConfig;
use crate::events::{Control, Event};
use crate::sys::CpuMeter;
use app::App;
pub use stats::DashboardStats;

/// Reads terminal input on a thread of its own (crossterm's read blocks) until `stop`.
fn spawn_input(stop: Arc<AtomicBool>) -> UnboundedReceiver<TermEvent> {
    let (tx, rx) = unbounded_channel();
    std::thread::Builder::new()
        .name("vitscope-input".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match crossterm::event::poll(Duration::from_millis(100)) {
                    Ok(true) => match crossterm::event::read() {
                        Ok(ev) => {
                            if tx.send(ev).is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    },
                    Ok(false) => {}
                    Err(_) => return,
                }
            }
        })
        .expect("spawn the input thread");
    rx
}

/// Runs the dashboard until the user quits (and, while training, until the trainer has
/// stopped). Restores the terminal on every way out; a panic is restored by ratatui's hook.
pub fn run(
    app: App,
    engine: Receiver<Event>,
    control: Option<std::sync::mpsc::Sender<Control>>,
    ui: &UiConfig,
) -> std::io::Result<(App, DashboardStats)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut terminal = ratatui::init();
    let result = runtime.block_on(event_loop(&mut terminal, app, engine, control, ui));
    ratatui::restore();
    result
}

async fn event_loop(
    terminal: &mut DefaultTerminal,
    mut app: App,
    mut engine: Receiver<Event>,
    control: Option<std::sync::mpsc::Sender<Control>>,
    ui: &UiConfig,
) -> std::io::Result<(App, DashboardStats)> {
    let started = Instant::now();
    let cpu_start = crate::sys::cpu_seconds(true).unwrap_or(0.0);
    let stop_input = Arc::new(AtomicBool::new(false));
    let mut input = spawn_input(Arc::clone(&stop_input));
    let frame_gap = Duration::from_secs_f64(1.0 / ui.max_fps);
    let data_gap = Duration::from_secs_f64(ui.data_refresh_secs).max(frame_gap);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut cpu = CpuMeter::default();
    let mut stats = DashboardStats::default();
    let mut signals = crate::sys::StopSignals::listen();

    // Input and state changes redraw after `frame_gap`; data alone after `data_gap`.
    let mut input_dirty = true;
    let mut data_dirty = false;
    let mut last_draw: Option<Instant> = None;
    let mut engine_open = true;
    // Exports run on their own thread and report here.
    let (export_tx, mut export_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let send = |c: Control| {
        if let Some(tx) = &control {
            let _ = tx.send(c);
        }
    };
    loop {
        let due = match (input_dirty, data_dirty, last_draw) {
            (_, _, None) => Some(Instant::now()),
            (true, _, Some(t)) => Some(t + frame_gap),
            (false, true, Some(t)) => Some(t + data_gap),
            (false, false, _) => None,
        };
        if due.is_some_and(|d| d <= Instant::now()) {
            let t = Instant::now();
            let size = terminal.size()?;
            app.screen = (size.width, size.height);
            terminal.draw(|frame| frame.render_widget(&app, frame.area()))?;
            stats.render_ms.push(t.elapsed().as_secs_f64() * 1e3);
            stats.frames += 1;
            last_draw = Some(Instant::now());
            input_dirty = false;
            data_dirty = false;
        }
        if app.should_quit() {
            break;
        }
        let sleep_until = due.map_or_else(
            || Instant::now() + Duration::from_secs(3600),
            |d| d.max(Instant::now()),
        );
        tokio::select! {
            event = engine.recv(), if engine_open => match event {
                Some(event) => {
                    let changes_state = matches!(event, Event::Phase(_) | Event::Started(_) | Event::Failed(_) | Event::Finished { .. });
                    if app.on_event(event) {
                        if changes_state { input_dirty = true } else { data_dirty = true }
                    }
                }
                None => {
                    engine_open = false;
                    app.engine_done = true;
                    input_dirty = true;
                }
            },
            Some(message) = export_rx.recv() => {
                app.run.push_log(message.clone());
                app.notice = Some(message);
                input_dirty = true;
            },
            Some(term) = input.recv() => match term {
                TermEvent::Key(key) if key.kind != KeyEventKind::Release => {
                    if let Some(c) = app.on_key(key) {
                        send(c);
                    }
                    if let Some(request) = app.export_request.take() {
                        app.notice = Some(format!("exporting {} …", request.what.name()));
                        let tx = export_tx.clone();
                        std::thread::spawn(move || {
                            let result = crate::export::export(&request.run_dir, &request.out, &[request.what], &request.choice);
                            let _ = tx.send(match result {
                                Ok(files) => format!(
                                    "exported {} file{} to {}",
                                    files.len(),
                                    if files.len() == 1 { "" } else { "s" },
                                    request.out.display()
                                ),
                                Err(e) => format!("export failed: {e}"),
                            });
                        });
                    }
                    input_dirty = true;
                }
                TermEvent::Resize(_, _) => input_dirty = true,
                _ => {}
            },
            _ = tick.tick(), if app.mode == app::Mode::Live => {
                // The process's own CPU and memory: meaningful only where it trains.
                let before = app.run.process;
                app.run.process.cpu_percent = cpu.sample().map(|p| p.round());
                app.run.process.rss_bytes = crate::sys::rss_bytes().map(|b| b / 1_000_000 * 1_000_000);
                app.run.process.peak_rss_bytes =
                    crate::sys::peak_rss_bytes().map(|b| b / 1_000_000 * 1_000_000);
                if app.run.process != before && !app.engine_done {
                    data_dirty = true;
                }
            },
            () = signals.recv() => {
                // A closed SSH session or a kill: stop training cleanly and leave.
                app.quit_requested = true;
                if !app.stopping && !app.engine_done {
                    app.stopping = true;
                    send(Control::Stop);
                }
                input_dirty = true;
            },
            () = tokio::time::sleep_until(sleep_until.into()) => {},
        }
    }
    stop_input.store(true, Ordering::Relaxed);
    stats.ui_thread_cpu_secs = crate::sys::cpu_seconds(true).unwrap_or(0.0) - cpu_start;
    stats.wall_secs = started.elapsed().as_secs_f64();
    Ok((app, stats))
}

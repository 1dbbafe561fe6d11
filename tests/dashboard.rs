//! The whole dashboard on ratatui's TestBackend: snapshots of each state at 80x24 and
//! 200x60, the too-small screen, and a session driven by engine and key events.

mod common;

use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::Terminal;
use std::sync::Arc;
use vitscope::config::Config;
use vitscope::data::LoadProgress;
use vitscope::events::{Control, EvalRecord, Event, Phase, RunInfo, TrainRecord};
use vitscope::probe::{Distribution, LayerNormProbe, ProbeMeta, ProbeSnapshot, Stats};
use vitscope::ui::app::{App, Mode, ProcessStats, Tab};
use vitscope::ui::theme::{ColorMode, Theme};

fn screen(app: &App, w: u16, h: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| f.render_widget(app, f.area())).unwrap();
    let buf = terminal.backend().buffer().clone();
    let mut out = String::new();
    for y in 0..buf.area.height {
        for x in 0..buf.area.width {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out
}

fn info() -> RunInfo {
    RunInfo {
        run_dir: PathBuf::from("runs/2026-11-28T12-00-00"),
        dataset: "cifar10".into(),
        data_source: "target/cifar-10-batches-bin".into(),
        class_names: vec![],
        train_images: 50_000,
        test_images: 10_000,
        steps_per_epoch: 390,
        epochs: 10,
        final_step: 3900,
        start_step: 0,
        start_wall_secs: 0.0,
        parameters: 460_906,
        device: "cpu (2 threads)".into(),
        probe_pixels: vec![],
        probe_labels: vec![],
    }
}

/// A deterministic loss curve: falling, with noise.
fn train_record(step: u64) -> TrainRecord {
    let s = step as f64;
    let noise = ((s * 12.9898).sin() * 43758.5453).fract() * 0.2;
    TrainRecord {
        step,
        epoch: (step - 1) / 390 + 1,
        loss: 2.3 * (-s / 600.0).exp() + 0.8 + noise,
        accuracy: (0.1 + 0.6 * (1.0 - (-s / 500.0).exp()) + noise / 2.0).min(1.0),
        lr: 1e-3 * (s / 200.0).min(1.0),
        images_per_sec: 120.0 + noise * 10.0,
        step_ms: 1000.0,
        wall_secs: s,
    }
}

fn eval_record(epoch: u64) -> EvalRecord {
    let acc = 0.35 + 0.05 * epoch as f64;
    EvalRecord {
        step: epoch * 390,
        epoch,
        loss: 1.9 - 0.1 * epoch as f64,
        accuracy: acc,
        per_class_accuracy: vec![acc; 10],
        confusion: vec![vec![100; 10]; 10],
        images_per_sec: 760.0,
        wall_secs: epoch as f64 * 390.0,
        best_accuracy: acc,
        best_epoch: epoch,
    }
}

fn app(mode: ColorMode) -> App {
    App::new(
        Mode::Live,
        Theme::new(mode, "braille"),
        "2026-11-28T12-00-00".into(),
        &Config::default(),
    )
}

fn training_app(steps: u64, mode: ColorMode) -> App {
    let mut a = app(mode);
    a.on_event(Event::Started(info()));
    a.on_event(Event::Phase(Phase::Training));
    for step in 1..=steps {
        a.on_event(Event::Train(train_record(step)));
        if step % 390 == 0 {
            a.on_event(Event::Eval(eval_record(step / 390)));
        }
    }
    a.process = ProcessStats {
        cpu_percent: Some(198.0),
        rss_bytes: Some(612_000_000),
    };
    a
}

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

#[test]
fn snapshots_of_each_state_at_both_sizes() {
    let mut loading = app(ColorMode::Ansi256);
    loading.on_event(Event::Loading(LoadProgress::Downloading {
        done: 85_000_000,
        total: 170_052_171,
    }));
    let training = training_app(900, ColorMode::Ansi256);
    let mut paused = training_app(900, ColorMode::Ansi256);
    paused.on_event(Event::Phase(Phase::Paused));
    let mut evaluating = training_app(780, ColorMode::Ansi256);
    evaluating.on_event(Event::Phase(Phase::Evaluating));
    let mut finished = training_app(3900, ColorMode::Ansi256);
    finished.on_event(Event::Finished {
        step: 3900,
        reason: "all 10 epochs done".into(),
    });
    finished.engine_done = true;
    let mut failed = training_app(120, ColorMode::Ansi256);
    failed.on_event(Event::Failed("the loss became NaN at step 121: training stopped; the last good checkpoint (step 100) is kept in runs/x/checkpoint.safetensors".into()));
    let no_colour = training_app(900, ColorMode::NoColor);
    for (name, state) in [
        ("loading", &loading),
        ("training", &training),
        ("paused", &paused),
        ("evaluating", &evaluating),
        ("finished", &finished),
        ("failed", &failed),
        ("no_colour", &no_colour),
    ] {
        for (w, h) in [(80, 24), (200, 60)] {
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen(state, w, h));
        }
    }
}

#[test]
fn too_small_and_zero_sizes_never_panic() {
    let a = training_app(50, ColorMode::Ansi256);
    insta::assert_snapshot!("too_small_40x10", screen(&a, 40, 10));
    for (w, h) in [(0, 0), (1, 1), (59, 30), (200, 17), (60, 18), (300, 100)] {
        let s = screen(&a, w, h);
        assert_eq!(s.lines().count(), h as usize);
        if w >= 60 && h >= 18 {
            assert!(!s.contains("terminal too small"), "{w}x{h}");
        }
    }
    let empty = app(ColorMode::NoColor);
    let mut started = app(ColorMode::NoColor);
    started.on_event(Event::Started(info()));
    for s in [&empty, &started] {
        for (w, h) in [(60, 18), (80, 24), (200, 60)] {
            screen(s, w, h);
        }
    }
    assert!(screen(&started, 80, 24).contains("waiting for the first step"));
}

#[test]
fn a_session_driven_by_engine_and_key_events() {
    let mut a = app(ColorMode::Ansi256);
    assert!(screen(&a, 80, 24).contains("Loading cifar10"));
    a.on_event(Event::Loading(LoadProgress::Reading {
        file: "data_batch_3.bin".into(),
    }));
    assert!(screen(&a, 80, 24).contains("reading data_batch_3.bin"));
    a.on_event(Event::Started(info()));
    a.on_event(Event::Phase(Phase::Training));
    for step in 1..=400 {
        a.on_event(Event::Train(train_record(step)));
    }
    a.on_event(Event::Eval(eval_record(1)));
    let s = screen(&a, 200, 60);
    assert!(s.contains("step 400/3900"), "{s}");
    assert!(s.contains("epoch 2/10"));
    assert!(s.contains("40.00% e1"), "test accuracy shown: {s}");
    assert!(s.contains("ETA"));

    assert_eq!(a.on_key(key(KeyCode::Char(' '))), Some(Control::Pause));
    a.on_event(Event::Phase(Phase::Paused));
    assert!(screen(&a, 80, 24).contains("paused"));
    assert_eq!(a.on_key(key(KeyCode::Char(' '))), Some(Control::Resume));
    a.on_event(Event::Phase(Phase::Training));

    a.on_key(key(KeyCode::Char('?')));
    assert!(screen(&a, 80, 24).contains("pause / resume training"));
    a.on_key(key(KeyCode::Esc));
    a.on_event(Event::Log("checkpoint saved at step 400".into()));
    a.on_key(key(KeyCode::Char('L')));
    assert!(screen(&a, 80, 24).contains("checkpoint saved at step 400"));
    a.on_key(key(KeyCode::Esc));

    a.on_key(key(KeyCode::Char('y')));
    assert!(screen(&a, 200, 60).contains("Loss (log y)"));
    a.on_key(key(KeyCode::Char('x')));
    assert!(screen(&a, 200, 60).contains("training time (min)"));

    a.on_key(key(KeyCode::Char('q')));
    assert!(screen(&a, 80, 24).contains("Stop training and quit?"));
    assert_eq!(a.on_key(key(KeyCode::Enter)), Some(Control::Stop));
    assert!(screen(&a, 80, 24).contains("stopping"));
    a.on_event(Event::Finished {
        step: 400,
        reason: "stopped on request".into(),
    });
    a.engine_done = true;
    assert!(a.should_quit());
}

/// A probe with made-up but deterministic LayerNorm statistics: inputs widen with
/// depth and with training, outputs stay standardised.
fn probe(step: u64) -> Event {
    let base: Vec<f32> = (0..4000)
        .map(|i| {
            let x = i as f32;
            (x * 0.7).sin() * 1.3
                + (x * 0.13).cos() * 0.6
                + ((x * 12.9898).sin() * 43758.547).fract()
                - 0.5
        })
        .collect();
    let names: Vec<String> = (0..6)
        .flat_map(|b| {
            [
                format!("block {b} norm1 (before attention)"),
                format!("block {b} norm2 (before MLP)"),
            ]
        })
        .chain(["final norm (before head)".to_string()])
        .collect();
    let growth = 1.0 + step as f32 / 1000.0;
    let layer_norms = names
        .into_iter()
        .enumerate()
        .map(|(k, name)| {
            let scale = (1.0 + k as f32 * 0.4) * growth;
            let input: Vec<f32> = base.iter().map(|v| v * scale + 0.1 * k as f32).collect();
            let s = Stats::of(&base);
            let output: Vec<f32> = base
                .iter()
                .map(|v| (v - s.mean) / s.std * (1.0 + 0.05 * k as f32))
                .collect();
            LayerNormProbe {
                name,
                input: Distribution::of(&input, 64, 8.0),
                output: Distribution::of(&output, 64, 8.0),
                gamma: Stats {
                    mean: 1.0 + 0.01 * k as f32,
                    std: 0.05,
                    min: 0.8,
                    max: 1.2,
                },
                beta: Stats {
                    mean: 0.0,
                    std: 0.02 * growth,
                    min: -0.1,
                    max: 0.1,
                },
            }
        })
        .collect();
    Event::Probe(Arc::new(ProbeSnapshot {
        meta: ProbeMeta {
            step,
            epoch: step / 390 + 1,
            images: 0,
            tokens: 65,
            dim: 96,
            depth: 6,
            heads: 3,
            classes: 10,
            layer_norms,
        },
        attention: vec![],
        hidden: vec![],
        probabilities: vec![],
    }))
}

fn layernorm_app(mode: ColorMode, probes: u64) -> App {
    let mut a = training_app(probes * 250, mode);
    for i in 0..probes {
        a.on_event(probe(i * 250));
    }
    a.tab = Tab::LayerNorm;
    a
}

#[test]
fn layernorm_tab_snapshots() {
    let waiting = layernorm_app(ColorMode::Ansi256, 0);
    let live = layernorm_app(ColorMode::Ansi256, 8);
    let no_colour = layernorm_app(ColorMode::NoColor, 8);
    let mut scrubbed = layernorm_app(ColorMode::Ansi256, 8);
    for c in [
        KeyCode::Char('j'),
        KeyCode::Char('j'),
        KeyCode::Char('h'),
        KeyCode::Char('h'),
        KeyCode::Char('t'),
    ] {
        scrubbed.on_key(key(c));
    }
    for (name, state) in [
        ("ln_waiting", &waiting),
        ("ln_live", &live),
        ("ln_no_colour", &no_colour),
        ("ln_scrubbed_input", &scrubbed),
    ] {
        for (w, h) in [(80, 24), (200, 60)] {
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen(state, w, h));
        }
    }
    for (w, h) in [(0, 0), (60, 18), (61, 19), (300, 100)] {
        screen(&live, w, h);
        screen(&waiting, w, h);
    }
}

#[test]
fn layernorm_keys_select_scrub_and_switch_what_is_shown() {
    let mut a = layernorm_app(ColorMode::Ansi256, 5);
    let s = screen(&a, 200, 60);
    assert!(s.contains("block 0 norm1 (before attention)"), "{s}");
    assert!(s.contains("probe 5/5, latest"), "{s}");
    assert!(s.contains("step 1000"), "{s}");
    a.on_key(key(KeyCode::Char('j')));
    let s = screen(&a, 200, 60);
    assert!(s.contains("block 0 norm2 (before MLP)"), "{s}");
    a.on_key(key(KeyCode::Left));
    a.on_key(key(KeyCode::Left));
    let s = screen(&a, 200, 60);
    assert!(s.contains("probe 3/5") && s.contains("step 500"), "{s}");
    a.on_key(key(KeyCode::Right));
    assert!(screen(&a, 200, 60).contains("probe 4/5"));
    a.on_key(key(KeyCode::End));
    assert!(screen(&a, 200, 60).contains("probe 5/5, latest"));
    a.on_key(key(KeyCode::Char('t')));
    assert!(screen(&a, 200, 60).contains("showing input"));
    a.on_key(key(KeyCode::Char('t')));
    let s = screen(&a, 200, 60);
    assert!(s.contains("gamma min / mean / max over training"), "{s}");
    // A new probe arrives while scrubbed back: the view stays where the user put it.
    a.on_key(key(KeyCode::Left));
    a.on_event(probe(1250));
    assert!(screen(&a, 200, 60).contains("probe 4/6"));
    for _ in 0..20 {
        a.on_key(key(KeyCode::Char('j')));
    }
    assert!(screen(&a, 200, 60).contains("final norm (before head)"));
}

/// A probe with attention that is local in early layers and broader later, stronger on
/// CLS in head 0, for two images.
fn attention_probe(step: u64) -> Event {
    let Event::Probe(base) = probe(step) else {
        unreachable!()
    };
    let (images, depth, heads, tokens, dim) = (2usize, 6usize, 3usize, 65usize, 96usize);
    let mut attention = Vec::with_capacity(images * depth * heads * tokens * tokens);
    for image in 0..images {
        for l in 0..depth {
            for h in 0..heads {
                let width = 1.0 + l as f64 + h as f64 * 0.5 + image as f64;
                for q in 0..tokens {
                    let row: Vec<f64> = (0..tokens)
                        .map(|k| {
                            let d = if q == 0 || k == 0 {
                                3.0
                            } else {
                                let (a, b) = (q - 1, k - 1);
                                (((a / 8) as f64 - (b / 8) as f64).powi(2)
                                    + ((a % 8) as f64 - (b % 8) as f64).powi(2))
                                .sqrt()
                            };
                            (-d / width).exp() + if k == 0 && h == 0 { 0.5 } else { 0.0 }
                        })
                        .collect();
                    let z: f64 = row.iter().sum();
                    attention.extend(row.iter().map(|v| (v / z) as f32));
                }
            }
        }
    }
    let mut meta = base.meta.clone();
    meta.images = images;
    Event::Probe(Arc::new(ProbeSnapshot {
        meta,
        attention,
        hidden: vec![0.0; images * (depth + 1) * tokens * dim],
        probabilities: (0..images * 10)
            .map(|i| if i % 10 == 3 { 0.55 } else { 0.05 })
            .collect(),
    }))
}

fn attention_app(mode: ColorMode) -> App {
    let mut a = app(mode);
    let mut run = info();
    run.class_names = vitscope::data::CIFAR10_CLASSES
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    run.probe_pixels = (0..2 * 3072).map(|i| ((i * 7) % 256) as u8).collect();
    run.probe_labels = vec![3, 8];
    a.on_event(Event::Started(run));
    a.on_event(Event::Phase(Phase::Training));
    for step in 1..=600 {
        a.on_event(Event::Train(train_record(step)));
    }
    for i in 0..3 {
        a.on_event(attention_probe(i * 250));
    }
    a.tab = Tab::Attention;
    a
}

#[test]
fn attention_tab_snapshots() {
    let mut waiting = app(ColorMode::Ansi256);
    waiting.on_event(Event::Started(info()));
    waiting.tab = Tab::Attention;
    let live = attention_app(ColorMode::Ansi256);
    let no_colour = attention_app(ColorMode::NoColor);
    let mut rollout = attention_app(ColorMode::NoColor);
    for c in [
        KeyCode::Char('j'),
        KeyCode::Char('j'),
        KeyCode::Char('r'),
        KeyCode::Char(']'),
        KeyCode::Char('n'),
    ] {
        rollout.on_key(key(c));
    }
    for (name, state) in [
        ("attn_waiting", &waiting),
        ("attn_live", &live),
        ("attn_no_colour", &no_colour),
        ("attn_rollout", &rollout),
    ] {
        for (w, h) in [(80, 24), (200, 60)] {
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen(state, w, h));
        }
    }
    for (w, h) in [(0, 0), (60, 18), (61, 19), (100, 30), (300, 100)] {
        screen(&live, w, h);
        screen(&rollout, w, h);
    }
}

#[test]
fn attention_keys_choose_layer_head_image_query_and_probe() {
    let mut a = attention_app(ColorMode::Ansi256);
    let s = screen(&a, 200, 60);
    assert!(s.contains("layer 0 head 0: softmax"), "{s}");
    assert!(s.contains("probe 3/3, latest"), "{s}");
    assert!(
        s.contains("true: cat") && s.contains("predicted: cat (55%)"),
        "{s}"
    );
    a.on_key(key(KeyCode::Down));
    a.on_key(key(KeyCode::Right));
    a.on_key(key(KeyCode::Right));
    assert!(screen(&a, 200, 60).contains("layer 1 head 2: softmax"));
    a.on_key(key(KeyCode::Right));
    assert!(
        screen(&a, 200, 60).contains("layer 1 head 2"),
        "the head stays within the model"
    );
    a.on_key(key(KeyCode::Char('n')));
    assert!(screen(&a, 200, 60).contains("true: ship"));
    for _ in 0..12 {
        a.on_key(key(KeyCode::Char(']')));
    }
    assert!(screen(&a, 200, 60).contains("query: patch 11 (row 1, col 3)"));
    a.on_key(key(KeyCode::Char('r')));
    assert!(screen(&a, 200, 60).contains("rollout through layer 1"));
    a.on_key(key(KeyCode::Char(',')));
    assert!(screen(&a, 200, 60).contains("probe 2/3"));
    a.on_key(key(KeyCode::Char('.')));
    assert!(screen(&a, 200, 60).contains("probe 3/3, latest"));
    // The statistics table lists every head with its measures.
    let s = screen(&a, 200, 60);
    assert!(s.contains("L5 H2") || s.contains("L1 H2  entropy"), "{s}");
}

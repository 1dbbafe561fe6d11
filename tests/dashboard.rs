//! The whole dashboard on ratatui's TestBackend: snapshots of each state at 80x24 and
//! 200x60, the too-small screen, and a session driven by engine and key events.

mod common;

use std::path::PathBuf;

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::backend::TestBackend;
use ratatui::style::Color;
use ratatui::Terminal;
use std::sync::Arc;
use vitscope::config::Config;
use vitscope::data::LoadProgress;
use vitscope::events::{Control, EvalRecord, Event, Phase, RunInfo, TrainRecord};
use vitscope::inspect::predictions::{Predictions, PredictionsMeta};
use vitscope::inspect::probe::{Distribution, LayerNormProbe, ProbeMeta, ProbeSnapshot, Stats};
use vitscope::ui::app::{App, Mode, ProcessStats, Tab};
use vitscope::ui::theme::{ColorMode, Theme};

use common::{screen, text_of};

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
        budget_secs: None,
        start_step: 0,
        start_wall_secs: 0.0,
        parameters: 460_906,
        device: "cpu (2 threads)".into(),
        weights: "raw weights".into(),
        test_pixels: vec![],
        test_labels: vec![],
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
        Theme::new(mode, vitscope::config::Markers::Braille),
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
    a.run.process = ProcessStats {
        cpu_percent: Some(198.0),
        rss_bytes: Some(612_000_000),
        peak_rss_bytes: Some(640_000_000),
        estimate_bytes: Some(700_000_000),
    };
    a
}

#[test]
fn a_budgeted_run_shows_budget_projection_and_milestones_at_80x24() {
    let mut a = app(ColorMode::Ansi256);
    let mut run = info();
    run.budget_secs = Some(3600.0);
    a.on_event(Event::Started(run));
    a.on_event(Event::Phase(Phase::Training));
    for step in 1..=800 {
        a.on_event(Event::Train(train_record(step)));
        if step % 390 == 0 {
            a.on_event(Event::Eval(eval_record(step / 390)));
        }
    }
    let s = screen(&a, 80, 24);
    let run_row = s.lines().find(|l| l.starts_with("run 800/")).unwrap();
    assert!(
        run_row.contains("budget 1h") && run_row.contains("projected"),
        "{s}"
    );
    assert!(s.contains("reached "), "{s}");
}

#[test]
fn a_four_digit_rate_and_the_cpu_stay_apart_from_the_memory_label() {
    // A CPU with a bf16 instruction trains the default at 1,000 images/s and more, at
    // 100-200% CPU: the Latest panel's widest value.
    for (w, h) in [(80, 24), (200, 60)] {
        let mut a = training_app(400, ColorMode::Ansi256);
        let mut last = train_record(401);
        last.images_per_sec = 1045.0;
        a.on_event(Event::Train(last));
        a.run.process.cpu_percent = Some(194.0);
        let s = screen(&a, w, h);
        assert!(s.contains("1045  cpu 194% peak/est"), "{w}x{h}:\n{s}");
    }
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
            cls: true,
            dim: 96,
            depth: 6,
            heads: 3,
            classes: 10,
            layer_norms,
            attention_scales: Vec::new(),
        },
        attention: vec![],
        hidden: vec![],
        probabilities: vec![],
        position_embedding: vec![],
        patch_filters: vec![],
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
fn the_layernorm_tab_says_what_sits_at_each_place_in_the_variants() {
    let renamed = |rename: fn(&str) -> String| {
        let mut a = training_app(250, ColorMode::Ansi256);
        let Event::Probe(p) = probe(250) else {
            unreachable!()
        };
        let mut p = (*p).clone();
        for ln in &mut p.meta.layer_norms {
            ln.name = rename(&ln.name);
        }
        a.on_event(Event::Probe(Arc::new(p)));
        a.tab = Tab::LayerNorm;
        screen(&a, 200, 60)
    };
    let s = renamed(|n| {
        n.replace(
            "norm1 (before attention)",
            "norm1 place: no norm, residual stream before attention",
        )
    });
    assert!(
        s.contains("this model has no norm here") && s.contains("no norm here: nothing learned"),
        "{s}"
    );
    let s = renamed(|n| n.replace("norm", "rmsnorm"));
    assert!(
        s.contains("RMSNorm(x) = γ·x/√(mean(x²) + ε)") && s.contains("(RMSNorm has none)"),
        "{s}"
    );
    let s = renamed(|n| n.to_string());
    assert!(s.contains("LayerNorm(x) = γ·(x − μ)/σ + β"), "{s}");
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
        position_embedding: vec![],
        patch_filters: vec![],
    }))
}

fn attention_app(mode: ColorMode) -> App {
    let mut a = app(mode);
    let mut run = info();
    run.class_names = vitscope::data::CIFAR10_CLASSES
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    run.test_pixels = (0..2 * 3072).map(|i| ((i * 7) % 256) as u8).collect();
    run.test_labels = vec![3, 8];
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
    assert!(
        s.contains("per head: entropy (nats)") && s.contains("L1 H2 "),
        "{s}"
    );
    // Each with the pattern its numbers earn.
    assert!(
        ["broad (", "query-independent (", "local (", "mixed ("]
            .iter()
            .any(|p| s.contains(p)),
        "{s}"
    );
}

#[test]
fn the_export_key_asks_for_what_the_tab_shows() {
    use vitscope::export::What;
    let mut empty = app(ColorMode::Ansi256);
    empty.on_key(key(KeyCode::Char('e')));
    assert!(empty.export_request.is_none());
    assert!(screen(&empty, 200, 60).contains("nothing to export yet"));
    let mut a = attention_app(ColorMode::Ansi256);
    for c in ['j', 'l', 'n', ',', 'e'] {
        a.on_key(key(KeyCode::Char(c)));
    }
    let r = a.export_request.take().unwrap();
    assert_eq!(r.what, What::Attention);
    assert_eq!(
        (r.choice.layer, r.choice.head, r.choice.image, r.choice.step),
        (1, 1, 1, Some(250))
    );
    assert_eq!(r.out, PathBuf::from("2026-11-28T12-00-00-export"));
    a.on_key(key(KeyCode::Char('1')));
    a.on_key(key(KeyCode::Char('e')));
    assert_eq!(a.export_request.take().unwrap().what, What::Curves);
    // The notice shows in the status line until the next key.
    a.notice = Some("exported 3 files to x-export".into());
    assert!(screen(&a, 200, 60).contains("exported 3 files to x-export"));
    a.on_key(key(KeyCode::Char('2')));
    assert!(!screen(&a, 200, 60).contains("exported 3 files"));
}

/// The colours (foreground and background) of the cells in `area` of the screen.
fn colours(app: &App, (w, h): (u16, u16), area: ratatui::layout::Rect) -> Vec<Vec<Color>> {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal.draw(|f| f.render_widget(app, f.area())).unwrap();
    let buf = terminal.backend().buffer();
    (area.y..area.bottom())
        .map(|y| {
            (area.x..area.right())
                .flat_map(|x| [buf[(x, y)].fg, buf[(x, y)].bg])
                .collect()
        })
        .collect()
}

#[test]
fn attention_shades_follow_the_chosen_scale() {
    use std::collections::HashSet;
    // The 65 x 65 matrix: 65 columns from x = 5, 33 text rows from y = 6 at 200x60.
    let heat = ratatui::layout::Rect::new(5, 6, 65, 33);
    let full = Color::Rgb(253, 231, 37);
    let mut a = attention_app(ColorMode::TrueColor);
    let distinct = |a: &App| {
        colours(a, (200, 60), heat)
            .concat()
            .into_iter()
            .collect::<HashSet<_>>()
            .len()
    };
    let map_max = distinct(&a);
    assert!(map_max >= 32, "{map_max} colours in truecolor");
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("shade: map max") && s.contains("(÷ largest in the map)"),
        "{s}"
    );
    // Relative to the map's largest weight, one cell is full; not in every row.
    let rows = colours(&a, (200, 60), heat);
    let fulls = rows.concat().iter().filter(|&&c| c == full).count();
    assert!((1..rows.len()).contains(&fulls), "{fulls}");
    a.on_key(key(KeyCode::Char('v')));
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("shade: row max") && s.contains("(÷ largest in each row)"),
        "{s}"
    );
    // Each query's row has its own full cell: every text row holds two matrix rows
    // (the last only one), so at least one full colour per row, and two in most.
    let rows = colours(&a, (200, 60), heat);
    assert!(rows.iter().all(|r| r.contains(&full)));
    let fulls = rows.concat().iter().filter(|&&c| c == full).count();
    assert!(fulls >= 65, "{fulls}");
    a.on_key(key(KeyCode::Char('v')));
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("shade: log") && s.contains("2e-4") && s.contains("(log10 scale)"),
        "{s}"
    );
    let log = distinct(&a);
    assert!(log > map_max, "log {log} vs map max {map_max} colours");
    a.on_key(key(KeyCode::Char('v')));
    assert!(screen(&a, 200, 60).contains("shade: map max"));
    // In 256 colours, at least 16 steps show where the weights spread over the scale.
    let mut c = attention_app(ColorMode::Ansi256);
    c.on_key(key(KeyCode::Char('v')));
    c.on_key(key(KeyCode::Char('v')));
    let steps = colours(&c, (200, 60), heat)
        .concat()
        .into_iter()
        .collect::<HashSet<_>>()
        .len();
    assert!(steps >= 16, "{steps} colours in 256-colour mode");
}

/// A probe with hidden states that grow and sharpen with depth (one outlier channel),
/// 2-D position embeddings (nearby patches similar) and smooth patch filters.
fn inner_probe(step: u64) -> Event {
    let Event::Probe(base) = attention_probe(step) else {
        unreachable!()
    };
    let (images, depth, tokens, dim) = (2usize, 6usize, 65usize, 96usize);
    let mut hidden = Vec::with_capacity(images * (depth + 1) * tokens * dim);
    for image in 0..images {
        for layer in 0..=depth {
            for tok in 0..tokens {
                let (r, c) = if tok == 0 {
                    (3.5, 3.5)
                } else {
                    (((tok - 1) / 8) as f32, ((tok - 1) % 8) as f32)
                };
                for ch in 0..dim {
                    let wave =
                        (ch as f32 * 0.37 + r * 0.5 + c * 0.3 * (layer + 1) as f32 + image as f32)
                            .sin();
                    let outlier = if ch == 5 { 6.0 } else { 0.0 };
                    hidden.push(wave * (1.0 + layer as f32 * 0.3) + outlier);
                }
            }
        }
    }
    let position_embedding: Vec<f32> = (0..tokens)
        .flat_map(|tok| {
            (0..dim).map(move |ch| {
                if tok == 0 {
                    return 0.1;
                }
                let (r, c) = (((tok - 1) / 8) as f32, ((tok - 1) % 8) as f32);
                let f = 0.2 + (ch / 4) as f32 * 0.05;
                match ch % 4 {
                    0 => (r * f).sin(),
                    1 => (r * f).cos(),
                    2 => (c * f).sin(),
                    _ => (c * f).cos(),
                }
            })
        })
        .collect();
    let patch_filters: Vec<f32> = (0..dim)
        .flat_map(|d| {
            (0..48).map(move |v| ((d * 7 + v * 3) as f32 * 0.21).sin() * (1.0 + (v % 3) as f32))
        })
        .collect();
    Event::Probe(Arc::new(ProbeSnapshot {
        hidden,
        position_embedding,
        patch_filters,
        ..(*base).clone()
    }))
}

fn cifar_info(images: usize) -> RunInfo {
    let mut run = info();
    run.class_names = vitscope::data::CIFAR10_CLASSES
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    run.test_pixels = (0..images * 3072)
        .map(|i| (((i % 3072) * 7 + (i / 3072) * 40) % 256) as u8)
        .collect();
    run.test_labels = (0..images).map(|i| (i % 10) as u8).collect();
    run
}

fn inner_app(mode: ColorMode, tab: Tab) -> App {
    let mut a = app(mode);
    a.on_event(Event::Started(cifar_info(2)));
    a.on_event(Event::Phase(Phase::Training));
    for i in 0..3 {
        a.on_event(inner_probe(i * 250));
    }
    a.tab = tab;
    a
}

#[test]
fn features_tab_snapshots_and_keys() {
    let mut waiting = app(ColorMode::Ansi256);
    waiting.on_event(Event::Started(info()));
    waiting.tab = Tab::Features;
    let live = inner_app(ColorMode::Ansi256, Tab::Features);
    let no_colour = inner_app(ColorMode::NoColor, Tab::Features);
    for (name, state) in [
        ("features_waiting", &waiting),
        ("features_live", &live),
        ("features_no_colour", &no_colour),
    ] {
        for (w, h) in [(80, 24), (200, 60)] {
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen(state, w, h));
        }
    }
    for (w, h) in [(0, 0), (60, 18), (61, 19), (100, 30), (300, 100)] {
        screen(&live, w, h);
        screen(&waiting, w, h);
    }
    let mut a = inner_app(ColorMode::Ansi256, Tab::Features);
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("embeddings (patches + position) │ image 1 of 2"),
        "{s}"
    );
    assert!(s.contains("channels 0–95 of 96"), "{s}");
    a.on_key(key(KeyCode::Down));
    a.on_key(key(KeyCode::Char('n')));
    let s = screen(&a, 200, 60);
    assert!(s.contains("after block 0 │ image 2 of 2"), "{s}");
    assert!(s.contains("▶ block 0"), "{s}");
    for _ in 0..10 {
        a.on_key(key(KeyCode::Down));
    }
    assert!(
        screen(&a, 200, 60).contains("after block 5"),
        "the layer stays in the model"
    );
    // A narrow terminal scrolls the channels.
    let s = screen(&a, 80, 24);
    assert!(s.contains("channels 0–"), "{s}");
    a.on_key(key(KeyCode::Char(']')));
    assert!(screen(&a, 80, 24).contains("channels 32–"));
    a.on_key(key(KeyCode::Char(',')));
    assert!(screen(&a, 200, 60).contains("probe 2/3"));
}

#[test]
fn patches_tab_snapshots_and_keys() {
    let live = inner_app(ColorMode::Ansi256, Tab::Patches);
    let no_colour = inner_app(ColorMode::NoColor, Tab::Patches);
    let mut old = inner_app(ColorMode::Ansi256, Tab::Patches);
    // A probe recorded before position embeddings and filters were.
    let Event::Probe(p) = inner_probe(1000) else {
        unreachable!()
    };
    old.on_event(Event::Probe(Arc::new(ProbeSnapshot {
        position_embedding: vec![],
        patch_filters: vec![],
        ..(*p).clone()
    })));
    for (name, state) in [
        ("patches_live", &live),
        ("patches_no_colour", &no_colour),
        ("patches_old_probe", &old),
    ] {
        for (w, h) in [(80, 24), (200, 60)] {
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen(state, w, h));
        }
    }
    for (w, h) in [(0, 0), (60, 18), (61, 19), (100, 30), (300, 100)] {
        screen(&live, w, h);
    }
    let mut a = inner_app(ColorMode::Ansi256, Tab::Patches);
    a.on_key(key(KeyCode::Down));
    a.on_key(key(KeyCode::Right));
    let s = screen(&a, 200, 60);
    assert!(s.contains("patch 9 (row 1, col 1) = token 10"), "{s}");
    for _ in 0..10 {
        a.on_key(key(KeyCode::Right));
        a.on_key(key(KeyCode::Down));
    }
    assert!(screen(&a, 200, 60).contains("patch 63 (row 7, col 7)"));
    // The raw values are the image's bytes: pixel (28, 28) of image 1 is the first
    // value of patch 63.
    let px = |channel: usize| ((channel * 1024 + 28 * 32 + 28) * 7 % 256) as u8;
    let first = format!("{:>3},{:>3},{:>3}", px(0), px(1), px(2));
    assert!(screen(&a, 200, 60).contains(&first), "{first}");
}

/// Predictions of two evaluations on `images` test images (labels i % 10): the first
/// right on every third image, the second on every other one; confidence rises with i.
fn predictions(step: u64, images: usize) -> Event {
    let right = |i: usize| {
        if step < 700 {
            i.is_multiple_of(3)
        } else {
            i.is_multiple_of(2)
        }
    };
    let probabilities = (0..images)
        .flat_map(|i| {
            let label = i % 10;
            let guess = if right(i) { label } else { (label + 1) % 10 };
            let top = 0.3 + 0.6 * i as f32 / images as f32;
            (0..10).map(move |k| if k == guess { top } else { (1.0 - top) / 9.0 })
        })
        .collect();
    Event::Predictions(Arc::new(Predictions {
        meta: PredictionsMeta {
            step,
            epoch: step / 390,
            images,
            classes: 10,
        },
        probabilities,
    }))
}

fn predictions_app(mode: ColorMode) -> App {
    let mut a = app(mode);
    a.on_event(Event::Started(cifar_info(60)));
    a.on_event(Event::Phase(Phase::Training));
    for epoch in 1..=2 {
        a.on_event(Event::Eval(eval_record(epoch)));
        a.on_event(predictions(epoch * 390, 60));
    }
    a.tab = Tab::Predictions;
    a
}

#[test]
fn predictions_tab_snapshots_and_filters() {
    let mut waiting = app(ColorMode::Ansi256);
    waiting.on_event(Event::Started(info()));
    waiting.tab = Tab::Predictions;
    let live = predictions_app(ColorMode::Ansi256);
    let no_colour = predictions_app(ColorMode::NoColor);
    for (name, state) in [
        ("predictions_waiting", &waiting),
        ("predictions_live", &live),
        ("predictions_no_colour", &no_colour),
    ] {
        for (w, h) in [(80, 24), (200, 60)] {
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), screen(state, w, h));
        }
    }
    for (w, h) in [(0, 0), (60, 18), (61, 19), (100, 30), (300, 100)] {
        screen(&live, w, h);
    }
    let mut a = predictions_app(ColorMode::Ansi256);
    a.screen = (200, 60);
    let s = screen(&a, 200, 60);
    // Flips by hand: right before = i % 3 == 0, now = i % 2 == 0, over 60 images.
    let up = (0..60usize)
        .filter(|i| !i.is_multiple_of(3) && i.is_multiple_of(2))
        .count();
    let down = (0..60usize)
        .filter(|i| i.is_multiple_of(3) && !i.is_multiple_of(2))
        .count();
    assert!(
        s.contains(&format!("↑ {up} became right"))
            && s.contains(&format!("↓ {down} became wrong")),
        "{s}"
    );
    assert!(
        s.contains("test images 1 … 40 of 60 listed │ page 1/2"),
        "{s}"
    );
    assert!(s.contains("test image #0: true airplane"), "{s}");
    a.on_key(key(KeyCode::PageDown));
    assert!(screen(&a, 200, 60).contains("page 2/2"));
    a.on_key(key(KeyCode::Char('f'))); // mistakes
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("filter: mistakes") && s.contains("of 30 listed"),
        "{s}"
    );
    // Only mistakes are listed: the one ✓ left is the legend's.
    assert_eq!(s.matches('✓').count(), 1, "{s}");
    a.on_key(key(KeyCode::Char('f'))); // right, least confident first
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("of 30 listed") && s.contains("test image #0:"),
        "{s}"
    );
    a.on_key(key(KeyCode::Char('f'))); // flipped
    assert!(screen(&a, 200, 60).contains(&format!("of {} listed", up + down)));
    a.on_key(key(KeyCode::Char('f'))); // all
    a.on_key(key(KeyCode::Char('c'))); // airplanes only
    a.on_key(key(KeyCode::Char('c'))); // automobiles only
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("true class automobile") && s.contains("of 6 listed"),
        "{s}"
    );
    a.on_key(key(KeyCode::Right));
    assert!(screen(&a, 200, 60).contains("test image #11: true automobile"));
    // The previous evaluation: nothing to compare it with.
    a.on_key(key(KeyCode::Char(',')));
    let s = screen(&a, 200, 60);
    assert!(
        s.contains("evaluation 1/2") && s.contains("first evaluation"),
        "{s}"
    );
}

/// Three runs that differ in model.norm, with training and evaluation records.
fn norm_runs(root: &std::path::Path) -> vitscope::run::compare::Comparison {
    for (n, norm) in ["pre", "post", "none"].iter().enumerate() {
        let dir = root.join(format!("norm={norm}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = Config::from_sources(None, &[format!("model.norm={norm}")]).unwrap();
        std::fs::write(dir.join("config.toml"), config.to_toml()).unwrap();
        let mut lines = String::new();
        for step in 1..=400u64 {
            let r = TrainRecord {
                loss: 2.3 * (-(step as f64) / (150.0 + 50.0 * n as f64)).exp() + 0.4,
                ..train_record(step)
            };
            lines.push_str(
                &serde_json::to_string(&vitscope::events::MetricRecord::Train(r)).unwrap(),
            );
            lines.push('\n');
            if step % 100 == 0 {
                let mut e = eval_record(step / 100);
                e.step = step;
                e.accuracy = 0.3 + step as f64 / 1000.0 - 0.05 * n as f64;
                lines.push_str(
                    &serde_json::to_string(&vitscope::events::MetricRecord::Eval(e)).unwrap(),
                );
                lines.push('\n');
            }
        }
        std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
        let log = if n == 2 {
            "t error: loss is NaN\n"
        } else {
            "t finished at step 400: all 4 epochs done\n"
        };
        std::fs::write(dir.join("run.log"), log).unwrap();
    }
    vitscope::run::compare::Comparison::open(&[root.to_path_buf()]).unwrap()
}

fn runs_screen(
    c: &vitscope::run::compare::Comparison,
    v: &vitscope::ui::tabs::runs::RunsView,
    w: u16,
    h: u16,
) -> String {
    let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
    terminal
        .draw(|f| vitscope::ui::tabs::runs::render(c, v, None, f.area(), f.buffer_mut()))
        .unwrap();
    text_of(terminal.backend().buffer())
}

#[test]
fn the_runs_screen_overlays_runs_named_by_what_differs() {
    use vitscope::ui::tabs::runs::RunsView;
    let tmp = tempfile::tempdir().unwrap();
    let c = norm_runs(tmp.path());
    assert_eq!(c.labels(), vec!["norm=none", "norm=post", "norm=pre"]);
    let colour = RunsView::new(Theme::new(
        ColorMode::Ansi256,
        vitscope::config::Markers::Braille,
    ));
    let plain = RunsView::new(Theme::new(
        ColorMode::NoColor,
        vitscope::config::Markers::Braille,
    ));
    for (name, v) in [("runs", &colour), ("runs_no_colour", &plain)] {
        for (w, h) in [(80, 24), (200, 60)] {
            let s = runs_screen(&c, v, w, h);
            for label in ["norm=pre", "norm=post", "norm=none"] {
                assert!(s.contains(label), "{name} {w}x{h}: {label}\n{s}");
            }
            insta::assert_snapshot!(format!("{name}_{w}x{h}"), s);
        }
    }
    let s = runs_screen(&c, &colour, 200, 60);
    assert!(s.contains("differ in model.norm"), "{s}");
    assert!(s.contains("failed") && s.contains("finished"), "{s}");
    // Without colour each run has its own marker, shown in the table.
    let theme = Theme::new(ColorMode::NoColor, vitscope::config::Markers::Braille);
    let marks: std::collections::HashSet<_> = (0..3).map(|i| theme.run_marker(i).1).collect();
    assert_eq!(marks.len(), 3);
    // A hidden run leaves the charts but stays in the table, marked.
    let mut hidden = RunsView::new(Theme::new(
        ColorMode::Ansi256,
        vitscope::config::Markers::Braille,
    ));
    hidden.on_action(vitscope::ui::keys::Action::ToggleRun, &c);
    let s = runs_screen(&c, &hidden, 200, 60);
    assert!(s.contains("(hidden)"), "{s}");
    for (w, h) in [(0, 0), (20, 5), (61, 19)] {
        runs_screen(&c, &colour, w, h);
    }
}

/// Per-layer records shaped like a 6-block run's (a test fixture: gradient norms that
/// fall with training and grow towards the input, residual RMS that grows with depth,
/// probe accuracy that rises with depth and time).
fn layer_events(records: u64) -> Vec<Event> {
    use vitscope::events::{GradRecord, KnowledgeRecord, MetricRecord, ScaleRecord};
    let mut groups = vec!["patch_embed".to_string()];
    for b in 0..6 {
        for part in [
            "norm1",
            "attn.qkv",
            "attn.proj",
            "norm2",
            "mlp.fc1",
            "mlp.fc2",
        ] {
            groups.push(format!("blocks.{b}.{part}"));
        }
    }
    groups.extend(["norm".to_string(), "head".to_string()]);
    let depth_of = |g: &str| {
        g.split('.')
            .nth(1)
            .and_then(|d| d.parse::<f64>().ok())
            .unwrap_or(6.0)
    };
    let mut events = Vec::new();
    for i in 1..=records {
        let step = i * 50;
        let t = i as f64 / records as f64;
        events.push(Event::Layers(MetricRecord::Grads(GradRecord {
            step,
            epoch: 1 + step / 390,
            grad_norm: groups
                .iter()
                .map(|g| (2.0 - t) * (1.0 + 0.2 * (6.0 - depth_of(g))))
                .collect(),
            weight_norm: groups.iter().map(|_| 5.0).collect(),
            update_ratio: groups.iter().map(|_| 1e-3 * (1.5 - t)).collect(),
            groups: groups.clone(),
        })));
        if i % 5 == 0 {
            events.push(Event::Layers(MetricRecord::Scale(ScaleRecord {
                step,
                epoch: 1 + step / 390,
                residual_rms: (0..7).map(|l| 0.5 + l as f64 * (0.5 + t)).collect(),
                norm_rms: vec![1.0; 13],
            })));
        }
        if i % 8 == 0 {
            let probe: Vec<f64> = (0..7).map(|l| 0.3 + 0.05 * l as f64 + 0.2 * t).collect();
            events.push(Event::Layers(MetricRecord::Knowledge(KnowledgeRecord {
                step,
                epoch: 1 + step / 390,
                train_images: 5000,
                test_images: 1000,
                lambda: 0.01,
                lens_accuracy: probe
                    .iter()
                    .enumerate()
                    .map(|(l, p)| p * l as f64 / 6.0)
                    .collect(),
                probe_accuracy: probe,
                cka: (0..7)
                    .map(|a: i32| {
                        (0..7)
                            .map(|b: i32| 1.0 - 0.1 * f64::from((a - b).abs()))
                            .collect()
                    })
                    .collect(),
                secs: 2.5,
            })));
        }
    }
    events
}

#[test]
fn the_layers_tab_at_both_sizes_and_its_keys() {
    let mut empty = training_app(400, ColorMode::Ansi256);
    empty.tab = Tab::Layers;
    assert!(screen(&empty, 80, 24).contains("Waiting for the first per-layer records"));
    let mut a = training_app(2000, ColorMode::Ansi256);
    for e in layer_events(40) {
        a.on_event(e);
    }
    a.on_key(key(KeyCode::Char('7')));
    assert_eq!(a.tab, Tab::Layers);
    for (w, h) in [(80, 24), (200, 60)] {
        insta::assert_snapshot!(format!("layers_{w}x{h}"), screen(&a, w, h));
    }
    let full = screen(&a, 200, 60);
    for part in [
        "gradient norm ‖g‖",
        "update ratio",
        "residual stream RMS",
        "linear probe accuracy",
        "logit lens accuracy",
        "layer similarity (linear CKA",
        "gradients by part of each block",
    ] {
        assert!(full.contains(part), "{part} missing:\n{full}");
    }
    // ↓ picks the next quantity, ← moves the cursor back a record, End returns.
    a.on_key(key(KeyCode::Down));
    assert_eq!(
        a.layers.quantity,
        vitscope::inspect::layers::Quantity::UpdateRatio
    );
    a.on_key(key(KeyCode::Left));
    assert_eq!(a.layers.cursor, Some(1950));
    assert!(screen(&a, 80, 24).contains("cursor at step 1950"));
    a.on_key(key(KeyCode::Right));
    assert_eq!(a.layers.cursor, None);
    a.on_key(key(KeyCode::Left));
    a.on_key(key(KeyCode::End));
    assert_eq!(a.layers.cursor, None);
    // `e` exports the maps.
    a.on_key(key(KeyCode::Char('e')));
    assert_eq!(
        a.export_request.take().map(|r| r.what),
        Some(vitscope::export::What::Layers)
    );
    // An alert reaches the status line and the log.
    a.on_event(Event::Alert(vitscope::events::Alert {
        step: 2001,
        fatal: false,
        message: "gradient norm 40.0 at step 2001 is 20x the median of the last 100 steps (2.0); largest in head (39.0)".into(),
    }));
    let s = screen(&a, 200, 60);
    assert!(
        s.lines()
            .nth(1)
            .unwrap()
            .contains("⚠ gradient norm 40.0 at step 2001"),
        "{s}"
    );
    assert!(a
        .run
        .log
        .back()
        .unwrap()
        .starts_with("alert: gradient norm"));
}

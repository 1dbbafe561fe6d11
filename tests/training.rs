//! The engine end to end on the synthetic data: it learns, resumes exactly, stops on
//! request, and stops cleanly on a non-finite loss.

mod common;

use std::sync::mpsc::channel;

use common::tiny_config;
use vitscope::events::{Control, Event, LayerHistory, MetricRecord, Phase};
use vitscope::run::RunDir;
use vitscope::train::{spawn, train, TrainError};

fn run_to_end(config: &vitscope::config::Config, run: &RunDir, resume: bool) -> Vec<Event> {
    let mut events = Vec::new();
    let (_tx, rx) = channel();
    train(config, run, resume, &mut events, &rx).unwrap();
    events
}

fn train_losses(run: &RunDir) -> Vec<(u64, f64)> {
    run.read_metrics()
        .into_iter()
        .filter_map(|m| match m {
            MetricRecord::Train(r) => Some((r.step, r.loss)),
            _ => None,
        })
        .collect()
}

fn eval_records(run: &RunDir) -> Vec<vitscope::events::EvalRecord> {
    run.read_metrics()
        .into_iter()
        .filter_map(|m| match m {
            MetricRecord::Eval(e) => Some(e),
            _ => None,
        })
        .collect()
}

#[test]
fn learns_the_synthetic_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(&["train.epochs=15", "train.lr=2e-3"]);
    let run = RunDir::create(tmp.path(), None, &config).unwrap();
    let events = run_to_end(&config, &run, false);

    let losses = train_losses(&run);
    assert_eq!(losses.len(), 15 * 20);
    let mean = |s: &[(u64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..20]), mean(&losses[losses.len() - 20..]));
    assert!(last < 0.5 * first, "loss did not fall: {first} -> {last}");

    let evals = eval_records(&run);
    assert_eq!(evals.len(), 15);
    let final_eval = evals.last().unwrap();
    assert!(
        final_eval.accuracy > 0.9,
        "test accuracy {}",
        final_eval.accuracy
    );
    assert!(final_eval.accuracy > evals[0].accuracy);
    let counted: u64 = final_eval.confusion.iter().flatten().sum();
    assert_eq!(counted, 200);

    assert!(run.checkpoint_path().exists());
    assert!(matches!(
        events.last(),
        Some(Event::Finished { step: 300, .. })
    ));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Phase(Phase::Evaluating))));
    // A probe before training and every 10 steps.
    let probes = run.probe_files();
    assert_eq!(probes.first().map(|p| p.0), Some(0));
    assert_eq!(probes.len(), 31);
    let snapshot = run.read_probe(300).unwrap();
    assert_eq!(snapshot.meta.layer_norms.len(), 5);
    // The default mean pooling: the 16 patches are the tokens, with the fixed
    // sine-cosine position embedding recorded for each.
    assert_eq!((snapshot.meta.tokens, snapshot.meta.cls), (16, false));
    assert_eq!(snapshot.patch_values(), 8 * 8 * 3);
    assert_eq!(snapshot.position_embedding.len(), 16 * 32);

    // Every evaluation recorded its predictions on the first test images (all 200 here):
    // they give the same confusion matrix as the evaluation itself.
    let predictions = run.prediction_files();
    assert_eq!(predictions.len(), 15);
    let (_, labels) = run.read_test_images().unwrap();
    assert_eq!(labels.len(), 200);
    let last = run.read_predictions(300).unwrap();
    assert_eq!(last.len(), 200);
    assert_eq!(last.confusion(&labels), final_eval.confusion);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Predictions(p) if p.meta.step == 300)));
}

/// Trains 50 steps straight through and 30 + 20 with a resume between (inside the
/// second epoch: 20 steps per epoch), with `extra` settings; asserts the same losses
/// and final weights, and returns the losses.
fn assert_resume_is_exact(extra: &[&str]) -> Vec<(u64, f64)> {
    let tmp = tempfile::tempdir().unwrap();
    let sets = |more: &[&'static str]| -> Vec<String> {
        let mut v: Vec<&str> = extra.to_vec();
        v.extend(more);
        v.into_iter().map(String::from).collect()
    };
    let config = |more: &[&'static str]| {
        tiny_config(&sets(more).iter().map(String::as_str).collect::<Vec<_>>())
    };
    let straight_cfg = config(&["train.epochs=3", "train.max_steps=50"]);
    let straight = RunDir::create(
        tmp.path(),
        Some(&tmp.path().join("straight")),
        &straight_cfg,
    )
    .unwrap();
    run_to_end(&straight_cfg, &straight, false);

    let first_cfg = config(&["train.epochs=3", "train.max_steps=30"]);
    let split = RunDir::create(tmp.path(), Some(&tmp.path().join("split")), &first_cfg).unwrap();
    run_to_end(&first_cfg, &split, false);
    assert_eq!(train_losses(&split).len(), 30);
    let events = run_to_end(&straight_cfg, &split, true);
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Started(info) if info.start_step == 30)));

    let a = train_losses(&straight);
    let b = train_losses(&split);
    assert_eq!(a.len(), 50);
    assert_eq!(a, b, "losses differ after the resume ({extra:?})");
    let ckpt_a = std::fs::read(straight.checkpoint_path()).unwrap();
    let ckpt_b = std::fs::read(split.checkpoint_path()).unwrap();
    let weights = |bytes: &[u8]| {
        let t = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let mut names: Vec<String> = t.names().into_iter().map(String::from).collect();
        names.sort();
        names
            .into_iter()
            .map(|n| t.tensor(&n).unwrap().data().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        weights(&ckpt_a),
        weights(&ckpt_b),
        "final weights differ ({extra:?})"
    );
    a
}

#[test]
fn resuming_gives_the_same_losses_as_training_straight_through() {
    let plain = assert_resume_is_exact(&[]);
    // Stochastic depth draws its masks from (seed, step): a resumed run drops what the
    // straight one dropped. With mean pooling and the weights' moving average too.
    let dropping = assert_resume_is_exact(&["train.drop_path=0.3"]);
    assert_ne!(
        plain[1..],
        dropping[1..],
        "stochastic depth changed nothing"
    );
    assert_resume_is_exact(&[
        "train.drop_path=0.3",
        "model.pool=mean",
        "train.ema_decay=0.9",
    ]);
}

/// run.log names the products each process trained with; a resume with other products
/// (another kind of CPU, or here a forced `model.matmul`) says so in one line, and one
/// on the same kind says nothing.
#[test]
fn a_resume_with_other_products_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tiny_config(&["train.max_steps=2", "model.matmul=f32"]);
    let run = RunDir::create(tmp.path(), Some(&tmp.path().join("run")), &first).unwrap();
    run_to_end(&first, &run, false);
    let warnings = |events: &[Event]| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Log(m) if m.contains("no longer bit-identical") => Some(m.clone()),
                _ => None,
            })
            .collect()
    };
    let same = tiny_config(&["train.max_steps=3", "model.matmul=f32"]);
    assert_eq!(
        warnings(&run_to_end(&same, &run, true)),
        Vec::<String>::new()
    );
    let other = tiny_config(&["train.max_steps=4", "model.matmul=bf16"]);
    let said = warnings(&run_to_end(&other, &run, true));
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("products f32") && said[0].contains("bf16"),
        "{said:?}"
    );
    let log = std::fs::read_to_string(run.file("run.log")).unwrap();
    assert_eq!(log.matches("no longer bit-identical").count(), 1, "{log}");
    // One `products:` line per process (the warning itself may name "dot products: ").
    let products_lines = log
        .lines()
        .filter(|l| {
            l.split_once(' ')
                .is_some_and(|(_, m)| m.starts_with("products: "))
        })
        .count();
    assert_eq!(products_lines, 3, "{log}");
}

#[test]
fn a_run_killed_after_its_checkpoint_resumes_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(&[
        "train.epochs=2",
        "train.max_steps=25",
        "train.checkpoint_every_steps=5",
    ]);
    let run = RunDir::create(tmp.path(), None, &config).unwrap();
    run_to_end(&config, &run, false);
    // Simulate a kill at step 37: lines and probes past the checkpoint (step 25) exist,
    // plus a torn line.
    let mut text = std::fs::read_to_string(run.file("metrics.jsonl")).unwrap();
    for step in 26..=37 {
        text.push_str(&format!("{{\"kind\":\"train\",\"step\":{step},\"epoch\":2,\"loss\":9.0,\"accuracy\":0.0,\"lr\":0.0,\"images_per_sec\":1.0,\"step_ms\":1.0,\"wall_secs\":1.0}}\n"));
    }
    text.push_str("{\"kind\":\"tr");
    std::fs::write(run.file("metrics.jsonl"), text).unwrap();
    let more = tiny_config(&["train.epochs=2", "train.max_steps=30"]);
    run_to_end(&more, &run, true);
    let steps: Vec<u64> = train_losses(&run).iter().map(|x| x.0).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());
    assert!(train_losses(&run).iter().all(|x| x.1 < 9.0));
}

#[test]
fn stop_and_save_controls_are_obeyed_between_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(&["train.epochs=1000"]);
    let run = RunDir::create(tmp.path(), None, &config).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(4096);
    let (handle, control) = spawn(
        config,
        run.clone(),
        false,
        Box::new(tx),
        vitscope::train::Halt::Stop,
    );
    control.send(Control::Pause).unwrap();
    control.send(Control::SaveNow).unwrap();
    control.send(Control::Resume).unwrap();
    control.send(Control::Stop).unwrap();
    let outcome = handle.join().unwrap().unwrap();
    assert_eq!(outcome.reason, "stopped on request");
    assert!(outcome.step < 1000 * 20);
    let events: Vec<Event> = rx.try_iter().collect();
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Phase(Phase::Paused))));
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Checkpoint { .. }))
            .count()
            >= 2
    );
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
    assert!(run.checkpoint_path().exists());
}

#[test]
fn a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(&[
        "train.lr=1e30",
        "train.warmup_steps=1",
        "train.checkpoint_every_steps=1",
        "train.epochs=5",
    ]);
    let run = RunDir::create(tmp.path(), None, &config).unwrap();
    let mut events = Vec::new();
    let (_tx, rx) = channel();
    let err = train(&config, &run, false, &mut events, &rx).unwrap_err();
    let TrainError::NonFinite { step, .. } = &err else {
        panic!("expected a non-finite loss, got {err}");
    };
    let text = err.to_string();
    assert!(text.contains(&format!("at step {step}")), "{text}");
    assert!(
        text.contains(&format!("the last good checkpoint (step {})", step - 1)),
        "{text}"
    );
    assert!(matches!(events.last(), Some(Event::Failed(_))));
    assert!(run.checkpoint_path().exists());
    assert!(std::fs::read_to_string(run.file("run.log"))
        .unwrap()
        .contains("error: the loss became"));
}

#[test]
fn a_budget_sizes_the_run_records_it_and_the_record_replays_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Warm-up outlasts the measurement, so the steps before sizing do not depend on
    // the schedule's horizon and a fresh run from the recorded config replays it.
    let config = tiny_config(&["train.budget=\"6s\"", "train.warmup_steps=150"]);
    let run = RunDir::create(tmp.path(), Some(&tmp.path().join("budget")), &config).unwrap();
    let events = run_to_end(&config, &run, false);
    let plans: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sized(s) => Some(*s),
            _ => None,
        })
        .collect();
    let (sized, last) = (plans[0], *plans.last().expect("the run sized itself"));
    // More than the 100 steps of settling and measuring fit in 6 s.
    assert!(sized.final_step > 100, "{sized:?}");
    assert!(
        matches!(events.last(), Some(Event::Finished { step, .. }) if *step == last.final_step)
    );
    // The sizing fixed the schedule's horizon; a (shared, noisy) machine far off its
    // pace later re-plans the end, each re-plan recorded.
    let recorded = run.read_config().unwrap();
    assert_eq!(recorded.train.max_steps as u64, last.final_step);
    assert_eq!(recorded.train.schedule_steps as u64, sized.final_step);
    assert_eq!(recorded.train.epochs as u64, last.final_step.div_ceil(20));
    assert_eq!(recorded.train.replans.len(), plans.len() - 1);
    // Each epoch ends in an evaluation, or, when the machine fell behind the plan, in a
    // logged skip: never the last one, never more than four in a row.
    let evals = eval_records(&run);
    let log = std::fs::read_to_string(run.file("run.log")).unwrap();
    let epochs = last.final_step.div_ceil(20);
    let mut in_row = 0;
    for epoch in 1..=epochs {
        let evaluated = evals.iter().any(|e| e.epoch == epoch);
        let skipped = log.contains(&format!("skipped the evaluation after epoch {epoch}:"));
        assert!(evaluated != skipped, "epoch {epoch}:\n{log}");
        in_row = if skipped { in_row + 1 } else { 0 };
        assert!(in_row <= 4, "{log}");
    }
    assert_eq!(evals.last().unwrap().step, last.final_step);
    let spent = evals.last().unwrap().wall_secs;
    assert!(
        spent <= 6.0 * 1.5,
        "training and evaluations took {spent} s of a 6 s budget"
    );

    let replay = RunDir::create(tmp.path(), Some(&tmp.path().join("replay")), &recorded).unwrap();
    run_to_end(&recorded, &replay, false);
    let replay_log = std::fs::read_to_string(replay.file("run.log")).unwrap();
    assert!(
        !replay_log.contains("budget 6s:"),
        "sized only once:\n{replay_log}"
    );
    // The replay follows the recorded re-plans; one of its own (its machine drifting
    // too) may move its end, but the steps before it are the recorded run's.
    let own = replay.read_config().unwrap().train.replans;
    let upto = own
        .get(recorded.train.replans.len())
        .map_or(u64::MAX, |r| r.at as u64);
    let before = |l: Vec<(u64, f64)>| -> Vec<(u64, f64)> {
        l.into_iter().filter(|(s, _)| *s <= upto).collect()
    };
    let replayed = before(train_losses(&replay));
    assert!(replayed.len() > 100, "{upto}");
    assert_eq!(replayed, before(train_losses(&run)));
}

#[test]
fn the_run_records_gradients_scale_and_knowledge_by_depth() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(&[
        "train.epochs=2",
        // The lens sees each image as it is; a flip-averaged evaluation would not be
        // the same number.
        "train.eval_flip=false",
        "probe.grad_every_steps=5",
        "probe.layers_every_evals=1",
        "probe.layers_train_images=640",
        "probe.layers_test_images=200",
    ]);
    let run = RunDir::create(tmp.path(), None, &config).unwrap();
    let events = run_to_end(&config, &run, false);
    let history = LayerHistory::from_records(&run.read_metrics());
    // 2 epochs of 20 steps, a gradient record every 5.
    let steps: Vec<u64> = history.grads.iter().map(|g| g.step).collect();
    assert_eq!(steps, (1..=8).map(|i| i * 5).collect::<Vec<u64>>());
    let first = &history.grads[0];
    assert_eq!(
        first.groups.first().map(String::as_str),
        Some("patch_embed")
    );
    assert_eq!(first.groups.last().map(String::as_str), Some("head"));
    assert_eq!(first.groups.len(), 1 + 2 * 6 + 2);
    for g in &history.grads {
        assert!(
            g.grad_norm.iter().all(|v| v.is_finite() && *v > 0.0),
            "{g:?}"
        );
        // The optimizer moves every group, by far less than its size.
        assert!(g.update_ratio.iter().all(|r| *r > 0.0 && *r < 0.5), "{g:?}");
    }
    // A scale record at every probe: before training, every 10 steps, at the end.
    let probes: Vec<u64> = run.probe_files().iter().map(|(s, _)| *s).collect();
    let scaled: Vec<u64> = history.scale.iter().map(|s| s.step).collect();
    let mut distinct = scaled.clone();
    distinct.dedup();
    assert_eq!(distinct, probes);
    assert!(history.scale.iter().all(|s| s.residual_rms.len() == 3));
    // What each layer knows, at every evaluation; the lens at the last layer is the
    // model itself, scored on the whole test set here.
    let evals = eval_records(&run);
    assert_eq!(history.knowledge.len(), evals.len());
    for (k, e) in history.knowledge.iter().zip(&evals) {
        assert_eq!(k.step, e.step);
        assert_eq!((k.train_images, k.test_images), (640, 200));
        assert_eq!(k.lens_accuracy.len(), 3);
        assert_eq!(
            k.lens_accuracy[2], e.accuracy,
            "lens {k:?} vs eval {}",
            e.accuracy
        );
        assert!((k.cka[1][1] - 1.0).abs() < 1e-9);
    }
    let last = history.knowledge.last().unwrap();
    assert!(last.probe_accuracy[2] > 0.5, "{last:?}");
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Layers(MetricRecord::Knowledge(_)))));
}

#[test]
fn each_optimizer_learns_and_resumes_exactly() {
    // Muon is the default; AdamW stays a choice.
    for optimizer in ["muon", "adamw"] {
        let set = format!("train.optimizer=\"{optimizer}\"");
        let losses = assert_resume_is_exact(&[set.as_str()]);
        let mean = |s: &[(u64, f64)]| s.iter().map(|x| x.1).sum::<f64>() / s.len() as f64;
        let (first, last) = (mean(&losses[..10]), mean(&losses[losses.len() - 10..]));
        assert!(
            last < first,
            "loss did not fall with {optimizer}: {first} -> {last}"
        );
    }
}

/// The per-layer records read the step; they never change it: the same run with every
/// record on and with all of them off trains the same losses, bit for bit.
#[test]
fn the_layer_records_change_no_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let losses = |name: &str, sets: &[&str]| {
        let config = tiny_config(sets);
        let run = RunDir::create(tmp.path(), Some(&tmp.path().join(name)), &config).unwrap();
        run_to_end(&config, &run, false);
        train_losses(&run)
    };
    let with = losses(
        "with",
        &[
            "train.epochs=2",
            "probe.grad_every_steps=3",
            "probe.layers_every_evals=1",
            "probe.layers_train_images=640",
            "probe.layers_test_images=200",
        ],
    );
    let without = losses(
        "without",
        &[
            "train.epochs=2",
            "probe.grad_every_steps=0",
            "probe.layers_every_evals=0",
        ],
    );
    assert_eq!(with.len(), 40);
    assert_eq!(with, without);
}

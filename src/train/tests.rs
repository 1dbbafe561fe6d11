//! The trainer's halt on a non-finite step, with a fault injected into a real run's
//! gradients: the step is not applied, the last good checkpoint stays as it was, the
//! alert names the group, and the dashboard's halt waits for the user first. And a
//! budgeted run on a machine made slow on purpose: it re-plans, and its record replays.

use std::sync::mpsc::channel;

use super::*;
use crate::config::Config;
use crate::events::{ALERT_PREFIX, HALTED};

fn tiny() -> Config {
    let sets: Vec<String> = [
        "data.dataset=synthetic",
        "data.synthetic_train_size=320",
        "data.synthetic_test_size=100",
        "model.patch_size=8",
        "model.dim=32",
        "model.depth=2",
        "model.heads=2",
        "model.mlp_dim=64",
        "train.batch_size=32",
        "train.epochs=2",
        "train.budget=\"\"",
        "train.checkpoint_every_steps=5",
        "train.eval_batch_size=100",
        "probe.every_steps=0",
        "probe.images=2",
        "probe.layers_train_images=100",
        "probe.layers_test_images=50",
    ]
    .map(String::from)
    .to_vec();
    Config::from_sources(None, &sets).unwrap()
}

fn weights(trainer: &Trainer) -> Vec<Vec<f32>> {
    trainer
        .vars
        .iter()
        .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn an_injected_non_finite_gradient_is_not_applied_and_leaves_the_checkpoint_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny();
    // The same run, stopped cleanly after step 7.
    let mut clean_config = config.clone();
    clean_config.train.max_steps = 7;
    let clean_run = RunDir::create(tmp.path(), Some(&tmp.path().join("clean")), &config).unwrap();
    let (mut events, (_tx, rx)) = (Vec::new(), channel());
    let mut clean =
        Trainer::prepare(&clean_config, &clean_run, false, &mut events, Halt::Stop).unwrap();
    clean.run(&mut events, &rx).unwrap();

    let run = RunDir::create(tmp.path(), Some(&tmp.path().join("faulty")), &config).unwrap();
    let mut events = Vec::new();
    let mut trainer = Trainer::prepare(&config, &run, false, &mut events, Halt::Stop).unwrap();
    trainer.inject_non_finite = Some(8);
    let err = trainer.run(&mut events, &rx).unwrap_err();
    let text = err.to_string();
    // The last variable in name order is patch_embed.weight.
    assert!(
        text.contains("the gradient of patch_embed became non-finite")
            && text.contains("at step 8"),
        "{text}"
    );
    assert!(text.contains("the last good checkpoint (step 5)"), "{text}");
    // Not applied: the weights are those after step 7, bit for bit.
    assert_eq!(weights(&trainer), weights(&clean));
    // The checkpoint is step 5's, whole, and nothing after step 7 was recorded.
    let reloaded = ModelState::new(&config.model, 0, DType::F32).unwrap();
    let mut optimizer = AdamW::new(reloaded.named_vars(), &config.train).unwrap();
    let state = checkpoint::load(&run.checkpoint_path(), &reloaded, &mut optimizer, None).unwrap();
    assert_eq!(state.step, 5);
    assert!(run.read_metrics().iter().all(|r| r.step() <= 7));
    let alert = events.iter().find_map(|e| match e {
        Event::Alert(a) => Some(a.clone()),
        _ => None,
    });
    let alert = alert.expect("an alert event");
    assert!(alert.fatal && alert.step == 8 && alert.message.contains("patch_embed"));
    let log = std::fs::read_to_string(run.file(LOG_FILE)).unwrap();
    assert!(
        log.contains(&format!(
            "{ALERT_PREFIX}{HALTED}the gradient of patch_embed"
        )),
        "{log}"
    );
}

#[test]
fn the_dashboards_halt_pauses_until_told_then_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny();
    let run = RunDir::create(tmp.path(), None, &config).unwrap();
    let (events_tx, events_rx) = std::sync::mpsc::sync_channel::<Event>(10_000);
    let (control_tx, control_rx) = channel();
    let worker = std::thread::spawn(move || {
        let mut sink = events_tx;
        let mut trainer = Trainer::prepare(&config, &run, false, &mut sink, Halt::Pause).unwrap();
        trainer.inject_non_finite = Some(3);
        trainer.run(&mut sink, &control_rx)
    });
    let mut seen_alert = false;
    while let Ok(event) = events_rx.recv() {
        match event {
            Event::Alert(a) if a.fatal => seen_alert = true,
            Event::Phase(Phase::Paused) if seen_alert => break,
            _ => {}
        }
    }
    assert!(seen_alert);
    // Paused, it waits: nothing more comes until the user answers.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(events_rx.try_recv().is_err());
    assert!(!worker.is_finished());
    control_tx.send(Control::Resume).unwrap();
    let err = worker.join().unwrap().unwrap_err();
    assert!(
        matches!(err, TrainError::NonFinite { step: 3, .. }),
        "{err}"
    );
}

#[test]
fn a_run_that_falls_behind_its_budget_ends_sooner_and_its_record_replays_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = tiny();
    config.train.budget = "1h".into();
    config.train.warmup_steps = 100;
    let run = RunDir::create(tmp.path(), Some(&tmp.path().join("slow")), &config).unwrap();
    let (mut events, (_tx, rx)) = (Vec::new(), channel());
    let mut trainer = Trainer::prepare(&config, &run, false, &mut events, Halt::Stop).unwrap();
    // Sized at step 100 for an hour of this tiny model's real pace (hundreds of
    // thousands of steps); then the machine "takes" 100 s a step. At step 110, the
    // next epoch's end, about 1,000 s are spent: only two more epochs fit in 93% of the
    // hour, even skipping evaluations; after that the plan holds (at step 120 a sizing
    // would give no more epochs either).
    trainer.slow_after_sizing = Some(100.0);
    let outcome = trainer.run(&mut events, &rx).unwrap();
    assert_eq!(outcome.step, 130, "{}", outcome.reason);
    assert!(
        outcome.reason.contains("re-planned once"),
        "{}",
        outcome.reason
    );
    assert_eq!(outcome.last_eval.as_ref().map(|e| e.step), Some(130));
    let recorded = run.read_config().unwrap();
    assert_eq!(
        recorded.train.replans,
        vec![crate::config::Replan {
            at: 110,
            final_step: 130
        }]
    );
    assert_eq!(recorded.train.max_steps, 130);
    let sized: Vec<u64> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sized(s) => Some(s.final_step),
            _ => None,
        })
        .collect();
    assert!(
        sized.len() == 2 && sized[0] > 10_000 && sized[1] == 130,
        "{sized:?}"
    );
    let log = std::fs::read_to_string(run.file(LOG_FILE)).unwrap();
    assert!(log.contains("re-planned at step 110:"), "{log}");
    // The rate goes on from where it was and reaches min_lr at the new end.
    let lrs: Vec<f64> = run
        .read_metrics()
        .iter()
        .filter_map(|r| match r {
            MetricRecord::Train(t) => Some(t.lr),
            _ => None,
        })
        .collect();
    assert_eq!(lrs.len(), 130);
    assert!(
        lrs[110] < lrs[109] && lrs[110] > 0.99 * lrs[109],
        "{:?}",
        &lrs[108..112]
    );
    assert!(
        (lrs[129] - config.train.min_lr).abs() < 1e-15,
        "{}",
        lrs[129]
    );

    // The recorded config alone (the budget off, so nothing is measured or re-planned
    // again) trains the same run, bit for bit.
    let mut replay_config = recorded.clone();
    replay_config.train.budget = String::new();
    let replay =
        RunDir::create(tmp.path(), Some(&tmp.path().join("replay")), &replay_config).unwrap();
    let mut replayed =
        Trainer::prepare(&replay_config, &replay, false, &mut events, Halt::Stop).unwrap();
    assert_eq!(replayed.run(&mut events, &rx).unwrap().step, 130);
    let losses = |r: &RunDir| -> Vec<(u64, f64, f64)> {
        r.read_metrics()
            .iter()
            .filter_map(|m| match m {
                MetricRecord::Train(t) => Some((t.step, t.loss, t.lr)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(losses(&replay), losses(&run));
}

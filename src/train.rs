//! The trainer: loads the data, trains the ViT with AdamW, evaluates at each epoch's
//! end, probes the model, writes the run directory, and reports everything as
//! [`Event`]s to a [`Sink`]. It runs on a thread of its own ([`spawn`]) and takes
//! [`Control`] messages between batches.

pub mod budget;
pub mod checkpoint;
pub mod ema;
pub mod evaluate;
pub mod grad_stats;
pub mod memory;
pub mod optim;
pub mod state_error;
pub mod step;

use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::{DType, Var};

use crate::config::Config;
use crate::data::batch::{BatchPlan, Normalizer};
use crate::data::{DataError, Dataset, NUM_CLASSES};
use crate::events::{
    Alert, Control, EvalRecord, Event, KnowledgeRecord, MetricRecord, Phase, RunInfo, Sink,
    TrainRecord,
};
use crate::inspect::knowledge::KnowledgeSet;
use crate::inspect::predictions::{Predictions, PredictionsMeta};
use crate::inspect::probe::ProbeSet;
use crate::model::{DropPath, ModelState, VisionTransformer};
use crate::run::{LineAppender, RunDir, RunError, LOG_FILE, METRICS_FILE};
use checkpoint::TrainState;
use ema::Ema;
use grad_stats::{GradGroups, SpikeWatch};
use optim::{learning_rate, AdamW};
use step::{forward_backward, Workers};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("model error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("{what} at step {step}: the step was not applied and training stopped; {kept}")]
    NonFinite {
        step: u64,
        what: String,
        kept: String,
    },
}

/// How a run that did not fail ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub step: u64,
    pub reason: String,
    pub last_eval: Option<EvalRecord>,
}

/// What training does when a step's loss or gradient is not finite (the step is never
/// applied, and the last good checkpoint stays as it is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Halt {
    /// Stop at once (headless).
    Stop,
    /// Pause with the alert on screen until told to go on or stop, then stop (the
    /// dashboard: the user can look at the last good state first).
    Pause,
}

/// Starts training on its own thread. Returns the thread and the control channel.
pub fn spawn(
    config: Config,
    run: RunDir,
    resume: bool,
    mut sink: Box<dyn Sink>,
    halt: Halt,
) -> (JoinHandle<Result<Outcome, TrainError>>, Sender<Control>) {
    let (control_tx, control_rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("vitscope-trainer".into())
        .spawn(move || train_with(&config, &run, resume, sink.as_mut(), &control_rx, halt))
        .expect("spawn the trainer thread");
    (handle, control_tx)
}

/// Trains in the calling thread; reports failure as an [`Event::Failed`] too.
pub fn train(
    config: &Config,
    run: &RunDir,
    resume: bool,
    sink: &mut dyn Sink,
    control: &Receiver<Control>,
) -> Result<Outcome, TrainError> {
    train_with(config, run, resume, sink, control, Halt::Stop)
}

/// [`train`], halting on a non-finite step as `halt` says.
pub fn train_with(
    config: &Config,
    run: &RunDir,
    resume: bool,
    sink: &mut dyn Sink,
    control: &Receiver<Control>,
    halt: Halt,
) -> Result<Outcome, TrainError> {
    // A run refused while preparing (bad data, a checkpoint that does not fit) is left
    // exactly as it was; errors once training has begun are logged in the run too.
    let result = match Trainer::prepare(config, run, resume, sink, halt) {
        Ok(mut trainer) => trainer.run(sink, control).inspect_err(|e| {
            if let Ok(mut log) = run.appender(LOG_FILE) {
                let _ = log.append(&format!("{} error: {e}", timestamp()));
            }
        }),
        Err(e) => Err(e),
    };
    match &result {
        Ok(outcome) => sink.send(Event::Finished {
            step: outcome.step,
            reason: outcome.reason.clone(),
        }),
        Err(e) => {
            sink.send(Event::Phase(Phase::Failed));
            sink.send(Event::Failed(e.to_string()));
        }
    }
    result
}

/// How run.log names the products a process trains with (`model.matmul` resolved on
/// this CPU): a resume on another kind of CPU compares against it.
pub const PRODUCTS_LABEL: &str = "products: ";

fn timestamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

struct Trainer {
    config: Config,
    run: RunDir,
    data: Arc<Dataset>,
    norm: Normalizer,
    plan: BatchPlan,
    probes: ProbeSet,
    state: ModelState,
    vars: Vec<Var>,
    optimizer: AdamW,
    /// The weights' moving average, when `train.ema_decay` > 0.
    ema: Option<Ema>,
    progress: TrainState,
    info: RunInfo,
    metrics: LineAppender,
    log: LineAppender,
    last_checkpoint: Option<u64>,
    /// How long the latest evaluation took (or the budget's timing of one).
    eval_secs: Option<f64>,
    /// Evaluations a budgeted run skipped since its last one.
    skipped_evals: u32,
    /// Evaluations done so far in the run (for `probe.layers_every_evals`).
    evaluations: usize,
    groups: GradGroups,
    spikes: SpikeWatch,
    knowledge: KnowledgeSet,
    halt: Halt,
    /// A test's fault: at this step, one gradient is made NaN before the check.
    #[cfg(test)]
    inject_non_finite: Option<u64>,
    /// A test's machine that slows down once the run is sized: every step from then
    /// on takes this many seconds on the run's clock.
    #[cfg(test)]
    slow_after_sizing: Option<f64>,
}

impl Trainer {
    fn prepare(
        config: &Config,
        run: &RunDir,
        resume: bool,
        sink: &mut dyn Sink,
        halt: Halt,
    ) -> Result<Self, TrainError> {
        sink.send(Event::Phase(Phase::Loading));
        let mut log = run.appender(LOG_FILE)?;
        let data = Dataset::load(config, &mut |p| sink.send(Event::Loading(p)))?;
        let train_len = data.train.len();
        if config.train.batch_size > train_len {
            return Err(TrainError::Invalid(format!(
                "`train.batch_size` = {} is larger than the training set ({train_len} images)",
                config.train.batch_size
            )));
        }
        let norm = Normalizer::from_split(&data.train);
        let plan = BatchPlan::from_config(config, train_len);
        let probes = ProbeSet::new(&data.test, config.probe.images, &norm);
        let state = ModelState::new(&config.model, config.train.seed, DType::F32)?;
        let mut optimizer =
            AdamW::new(state.named_vars(), &config.train)?.with_bf16_products(config.model.bf16());
        let ema = match config.train.ema_decay {
            d if d > 0.0 => Some(Ema::new(&config.model, d, &state)?),
            _ => None,
        };
        let mut progress = TrainState {
            step: 0,
            seed: config.train.seed,
            wall_secs: 0.0,
            best_accuracy: 0.0,
            best_epoch: 0,
        };
        let checkpoint_path = run.checkpoint_path();
        let mut last_checkpoint = None;
        if resume && checkpoint_path.exists() {
            progress = checkpoint::load(&checkpoint_path, &state, &mut optimizer, ema.as_ref())?;
            last_checkpoint = Some(progress.step);
            let msg = format!(
                "resumed from {} at step {}",
                checkpoint_path.display(),
                progress.step
            );
            log.append(&format!("{} {msg}", timestamp()))?;
            sink.send(Event::Log(msg));
        } else if resume {
            sink.send(Event::Log("no checkpoint yet: starting from step 0".into()));
        }
        if resume {
            // Only now that the checkpoint fits the model: `--set` changes become the run's.
            run.write_config(config)?;
        }
        let products = crate::ops::matmul_kind(config.model.bf16());
        if let Some(before) = run.last_logged(PRODUCTS_LABEL).filter(|b| *b != products) {
            let msg = format!(
                "this run trained with products {before}; it goes on with {products}: \
                 the sums' order differs, so its losses are no longer bit-identical"
            );
            log.append(&format!("{} {msg}", timestamp()))?;
            sink.send(Event::Log(msg));
        }
        log.append(&format!("{} {PRODUCTS_LABEL}{products}", timestamp()))?;
        // Lines and probes past the checkpoint belong to work that is about to be redone.
        run.truncate_after(progress.step)?;
        // The first test images: the probe images, then more for the Predictions tab.
        let shown = config
            .probe
            .images
            .max(config.probe.predictions)
            .min(data.test.len());
        let test_pixels: Vec<u8> = (0..shown)
            .flat_map(|i| data.test.image(i).iter().copied())
            .collect();
        let test_labels = data.test.labels[..shown].to_vec();
        run.write_test_images(&test_pixels, &test_labels)?;

        let steps_per_epoch = plan.steps_per_epoch();
        let epochs = config.train.epochs as u64;
        let final_step = config.train.final_step(steps_per_epoch);
        let budget_secs = config
            .train
            .budget_secs()
            .map_err(|e| TrainError::Invalid(format!("`train.budget`: {e}")))?;
        let info = RunInfo {
            run_dir: run.path().to_path_buf(),
            dataset: config.data.dataset.name().to_string(),
            data_source: data.source.clone(),
            class_names: data.class_names.clone(),
            train_images: train_len,
            test_images: data.test.len(),
            steps_per_epoch,
            epochs,
            final_step,
            budget_secs,
            start_step: progress.step,
            start_wall_secs: progress.wall_secs,
            parameters: state.parameter_count(),
            device: format!(
                "cpu ({} threads, {})",
                candle_core::utils::get_num_threads(),
                crate::ops::matmul_short(config.model.bf16())
            ),
            weights: crate::events::weights_label(&config.train),
            test_pixels,
            test_labels,
        };
        let names: Vec<String> = state.named_vars().into_iter().map(|(n, _)| n).collect();
        let knowledge = KnowledgeSet::new(
            &data.train,
            &data.test,
            config.probe.layers_train_images,
            config.probe.layers_test_images,
        );
        let evaluations = run
            .read_metrics()
            .iter()
            .filter(|r| matches!(r, MetricRecord::Eval(_)))
            .count();
        Ok(Self {
            evaluations,
            groups: GradGroups::new(&names),
            spikes: SpikeWatch::default(),
            knowledge,
            halt,
            #[cfg(test)]
            inject_non_finite: None,
            #[cfg(test)]
            slow_after_sizing: None,
            config: config.clone(),
            run: run.clone(),
            metrics: run.appender(METRICS_FILE)?,
            log,
            data: Arc::new(data),
            norm,
            plan,
            probes,
            vars: state.named_vars().into_iter().map(|(_, v)| v).collect(),
            state,
            optimizer,
            ema,
            progress,
            info,
            last_checkpoint,
            eval_secs: None,
            skipped_evals: 0,
        })
    }

    /// A budgeted run not yet sized (a resumed one already sized keeps its plan).
    fn needs_sizing(&self) -> bool {
        self.info.budget_secs.is_some() && self.config.train.schedule_steps == 0
    }

    /// Fixes the step count from the measured speed: checkpoint first, then the config,
    /// so that a run killed in between resumes from a state that agrees with its config.
    fn apply_budget(&mut self, sink: &mut dyn Sink, secs_per_step: f64) -> Result<(), TrainError> {
        let Some(budget) = self.info.budget_secs else {
            return Ok(());
        };
        let eval_secs = self.time_evaluation()?;
        self.eval_secs = Some(eval_secs);
        let sizing = budget::size(
            budget,
            self.progress.step,
            self.progress.wall_secs,
            secs_per_step,
            eval_secs,
            self.info.steps_per_epoch,
        );
        let t = &mut self.config.train;
        // The schedule spans the budget; a max_steps the user set still stops it sooner.
        t.schedule_steps = sizing.final_step.max(1) as usize;
        t.epochs = sizing.epochs.max(1) as usize;
        if t.max_steps == 0 || t.max_steps as u64 > sizing.final_step {
            t.max_steps = sizing.final_step as usize;
        }
        self.info.final_step = t.final_step(self.info.steps_per_epoch);
        self.info.epochs = sizing.epochs.max(1);
        self.save_checkpoint(sink)?;
        self.run.write_config(&self.config)?;
        self.message(
            sink,
            format!(
                "budget {}: {:.3} s a step, {:.1} s an evaluation: {} steps ({} epochs), planned {}",
                humantime::format_duration(std::time::Duration::from_secs(budget as u64)),
                secs_per_step,
                eval_secs,
                sizing.final_step,
                sizing.epochs,
                crate::run::milestones::clock(sizing.planned_secs),
            ),
        )?;
        sink.send(Event::Sized(sizing));
        Ok(())
    }

    /// Moves a budgeted run's end when its machine's pace drifted far from the plan (see
    /// [`budget::replan`]): sooner when even skipping evaluations would not bring it
    /// home, later when it would end well inside the budget. At an epoch's end, `pace`
    /// being that epoch's seconds a step. The re-plan goes into the run's config before
    /// the checkpoint that follows it, so a resume from any checkpoint, or a fresh run
    /// of the recorded config, replays it exactly.
    fn replan(&mut self, sink: &mut dyn Sink, pace: f64) -> Result<(), TrainError> {
        let (Some(budget), Some(eval)) = (self.info.budget_secs, self.eval_secs) else {
            return Ok(());
        };
        let at = self.progress.step;
        let t = &self.config.train;
        // A replayed run keeps the re-plans it was given; only later ones are its own.
        if self.needs_sizing() || t.replans.last().is_some_and(|r| r.at as u64 >= at) {
            return Ok(());
        }
        // The budget set max_steps (to its own end); a smaller one of the user's binds.
        let may_extend = t.max_steps == t.planned_end();
        let spe = self.info.steps_per_epoch;
        let before = self.info.final_step;
        let Some(sizing) = budget::replan(
            budget,
            (at, self.progress.wall_secs),
            (pace, eval),
            spe,
            before,
            may_extend,
        ) else {
            return Ok(());
        };
        let end = sizing.final_step;
        let t = &mut self.config.train;
        t.replans.push(crate::config::Replan {
            at: at as usize,
            final_step: end as usize,
        });
        t.max_steps = end as usize;
        t.epochs = sizing.epochs.max(1) as usize;
        self.info.final_step = t.final_step(spe);
        self.info.epochs = sizing.epochs.max(1);
        self.run.write_config(&self.config)?;
        let (drift, schedule) = match end < before {
            true => ("end past its budget", "compressed into"),
            false => ("end well inside its budget", "stretched over"),
        };
        self.message(
            sink,
            format!(
                "re-planned at step {at}: at {pace:.3} s a step lately the run would {drift}; it ends at step {end} (epoch {}) instead of {before}, the rest of the schedule {schedule} the steps left, planned {}",
                sizing.epochs,
                crate::run::milestones::clock(sizing.planned_secs),
            ),
        )?;
        sink.send(Event::Sized(sizing));
        Ok(())
    }

    /// Seconds one evaluation of the whole test set takes, timed on its first images.
    fn time_evaluation(&self) -> Result<f64, TrainError> {
        let test = &self.data.test;
        let sample: Vec<usize> = (0..test.len().min(1000)).collect();
        if sample.is_empty() {
            return Ok(0.0);
        }
        let model = self.shown_model();
        let start = Instant::now();
        let batch = self.config.train.eval_batch_size;
        let scoring = evaluate::Scoring {
            smoothing: 0.0,
            flip: self.config.train.eval_flip,
        };
        evaluate::test_pass(&model, test, &self.norm, &sample, batch, 0, scoring)?;
        // What each layer knows runs about as fast per image, on its own images.
        let p = &self.config.probe;
        let knowledge = match p.layers_every_evals {
            0 => 0.0,
            k => (self.knowledge.train.len() + self.knowledge.test.len()) as f64 / k as f64,
        };
        let images = test.len() as f64 + knowledge;
        Ok(start.elapsed().as_secs_f64() * images / sample.len() as f64)
    }

    fn epoch_of(&self, completed_steps: u64) -> u64 {
        // The epoch a step belongs to; step s (1-based) of epoch e satisfies (e-1)*spe < s <= e*spe.
        completed_steps.saturating_sub(1) / self.info.steps_per_epoch + 1
    }

    fn message(&mut self, sink: &mut dyn Sink, msg: String) -> Result<(), TrainError> {
        self.log.append(&format!("{} {msg}", timestamp()))?;
        sink.send(Event::Log(msg));
        Ok(())
    }

    /// Writes the checkpoint; its time counts toward the run's clock (`wall_secs`), as
    /// the probes' do, so that a budget holds for the whole run, not only its steps.
    fn save_checkpoint(&mut self, sink: &mut dyn Sink) -> Result<(), TrainError> {
        let start = Instant::now();
        let path = self.run.checkpoint_path();
        checkpoint::save(
            &path,
            &self.state,
            &self.optimizer,
            self.ema.as_ref(),
            &self.progress,
        )?;
        self.last_checkpoint = Some(self.progress.step);
        self.progress.wall_secs += start.elapsed().as_secs_f64();
        sink.send(Event::Checkpoint {
            step: self.progress.step,
            path,
        });
        Ok(())
    }

    /// The weights evaluations, probes and predictions use: the average when there is one.
    fn shown_model(&self) -> VisionTransformer {
        self.ema
            .as_ref()
            .map_or(&self.state, |e| &e.state)
            .model
            .detached()
    }

    fn probe(&mut self, sink: &mut dyn Sink) -> Result<(), TrainError> {
        let start = Instant::now();
        let model = self.shown_model();
        let step = self.progress.step;
        let snapshot =
            self.probes
                .probe(&model, &self.config.probe, step, self.epoch_of(step.max(1)))?;
        self.run.write_probe(&snapshot)?;
        let scale = crate::inspect::scale::of_probe(&snapshot);
        sink.send(Event::Probe(Arc::new(snapshot)));
        self.progress.wall_secs += start.elapsed().as_secs_f64();
        self.write_layers(sink, MetricRecord::Scale(scale))
    }

    fn evaluate(&mut self, sink: &mut dyn Sink) -> Result<EvalRecord, TrainError> {
        sink.send(Event::Phase(Phase::Evaluating));
        let start = Instant::now();
        let model = self.shown_model();
        let test = &self.data.test;
        let recorded = self.config.probe.predictions.min(test.len());
        let all: Vec<usize> = (0..test.len()).collect();
        let evaluate::TestPass {
            loss_sum,
            confusion,
            probabilities,
        } = evaluate::test_pass(
            &model,
            test,
            &self.norm,
            &all,
            self.config.train.eval_batch_size,
            recorded,
            evaluate::Scoring {
                smoothing: self.config.train.label_smoothing,
                flip: self.config.train.eval_flip,
            },
        )?;
        let secs = start.elapsed().as_secs_f64();
        self.progress.wall_secs += secs;
        self.eval_secs = Some(secs);
        let correct: u64 = (0..NUM_CLASSES).map(|k| confusion[k][k]).sum();
        let n = test.len() as f64;
        let per_class_accuracy = evaluate::per_class_accuracy(&confusion);
        let step = self.progress.step;
        let epoch = self.epoch_of(step.max(1));
        let accuracy = correct as f64 / n;
        if accuracy > self.progress.best_accuracy || self.progress.best_epoch == 0 {
            self.progress.best_accuracy = accuracy;
            self.progress.best_epoch = epoch;
        }
        let record = EvalRecord {
            step,
            epoch,
            loss: loss_sum / n,
            accuracy,
            per_class_accuracy,
            confusion,
            images_per_sec: n / secs.max(1e-9),
            wall_secs: self.progress.wall_secs,
            best_accuracy: self.progress.best_accuracy,
            best_epoch: self.progress.best_epoch,
        };
        self.metrics.append(
            &serde_json::to_string(&MetricRecord::Eval(record.clone())).expect("record serialises"),
        )?;
        sink.send(Event::Eval(record.clone()));
        let predictions = Predictions {
            meta: PredictionsMeta {
                step,
                epoch,
                images: recorded,
                classes: NUM_CLASSES,
            },
            probabilities,
        };
        self.run.write_predictions(&predictions)?;
        sink.send(Event::Predictions(Arc::new(predictions)));
        self.evaluations += 1;
        let every = self.config.probe.layers_every_evals;
        // Every k-th evaluation, and always the last one.
        let last = step >= self.info.final_step;
        if every > 0 && (self.evaluations.is_multiple_of(every) || last) {
            let knowledge = self.measure_knowledge(&model, (step, epoch))?;
            self.progress.wall_secs += knowledge.secs;
            self.eval_secs = Some(secs + knowledge.secs);
            self.write_layers(sink, MetricRecord::Knowledge(knowledge))?;
        }
        Ok(record)
    }

    /// What each layer of `model` knows ([`crate::inspect::knowledge`]).
    fn measure_knowledge(
        &self,
        model: &VisionTransformer,
        (step, epoch): (u64, u64),
    ) -> Result<KnowledgeRecord, TrainError> {
        let start = Instant::now();
        let set = &self.knowledge;
        let lambda = self.config.probe.ridge_lambda;
        let k = evaluate::layer_knowledge(
            model,
            (&self.data.train, &self.data.test),
            set,
            &self.norm,
            self.config.train.eval_batch_size,
            lambda,
        )?;
        // Four decimals are plenty for a similarity, and keep metrics.jsonl small.
        let round = |v: f64| (v * 1e4).round() / 1e4;
        Ok(KnowledgeRecord {
            step,
            epoch,
            train_images: set.train.len(),
            test_images: set.test.len(),
            lambda,
            probe_accuracy: k.probe_accuracy,
            lens_accuracy: k.lens_accuracy,
            cka: k
                .cka
                .iter()
                .map(|r| r.iter().map(|&v| round(v)).collect())
                .collect(),
            secs: start.elapsed().as_secs_f64(),
        })
    }

    /// Appends a per-layer record to the metrics and sends it.
    fn write_layers(
        &mut self,
        sink: &mut dyn Sink,
        record: MetricRecord,
    ) -> Result<(), TrainError> {
        self.metrics
            .append(&serde_json::to_string(&record).expect("record serialises"))?;
        sink.send(Event::Layers(record));
        Ok(())
    }

    /// An alert: in the log and to the sink, as it happens.
    fn alert(
        &mut self,
        sink: &mut dyn Sink,
        fatal: bool,
        message: String,
    ) -> Result<(), TrainError> {
        let halted = if fatal { crate::events::HALTED } else { "" };
        self.log.append(&format!(
            "{} {}{halted}{message}",
            timestamp(),
            crate::events::ALERT_PREFIX
        ))?;
        sink.send(Event::Alert(Alert {
            step: self.progress.step + 1,
            fatal,
            message,
        }));
        Ok(())
    }

    /// A non-finite step (not applied): the alert, a pause if the dashboard wants one,
    /// and the error that ends the run with its last good checkpoint as it was.
    fn halt_non_finite(
        &mut self,
        sink: &mut dyn Sink,
        control: &Receiver<Control>,
        what: String,
    ) -> Result<TrainError, TrainError> {
        let kept = match self.last_checkpoint {
            Some(s) => format!(
                "the last good checkpoint (step {s}) is kept in {}",
                self.run.checkpoint_path().display()
            ),
            None => "no checkpoint had been written yet".to_string(),
        };
        let step = self.progress.step + 1;
        self.alert(
            sink,
            true,
            format!("{what} at step {step}: not applied; {kept}"),
        )?;
        if self.halt == Halt::Pause {
            sink.send(Event::Phase(Phase::Paused));
            // Waits for the user: going on or stopping both end the run (the same
            // batch on the same weights would give the same result).
            while let Ok(c) = control.recv() {
                if matches!(c, Control::Resume | Control::Stop) {
                    break;
                }
            }
        }
        Ok(TrainError::NonFinite { step, what, kept })
    }

    /// Whether a budgeted run evaluates at this epoch's end, at `secs_per_step` (this
    /// process's pace so far; see [`budget::evaluation_due`]); unbudgeted runs always do.
    fn evaluation_due(&self, secs_per_step: Option<f64>) -> bool {
        match (self.info.budget_secs, self.eval_secs, secs_per_step) {
            (Some(budget), Some(eval), Some(pace)) if !self.needs_sizing() => {
                budget::evaluation_due(
                    budget,
                    self.progress.wall_secs,
                    self.info.final_step.saturating_sub(self.progress.step),
                    pace,
                    eval,
                    self.skipped_evals,
                )
            }
            _ => true,
        }
    }

    /// Waits out a pause; returns true if a stop was asked for.
    fn handle_controls(
        &mut self,
        sink: &mut dyn Sink,
        control: &Receiver<Control>,
    ) -> Result<bool, TrainError> {
        let mut paused = false;
        loop {
            let next = if paused {
                control.recv().ok()
            } else {
                control.try_recv().ok()
            };
            match next {
                None if paused => return Ok(true), // the controller went away
                None => return Ok(false),
                Some(Control::Pause) => {
                    if !paused {
                        paused = true;
                        sink.send(Event::Phase(Phase::Paused));
                        self.message(sink, format!("paused at step {}", self.progress.step))?;
                    }
                }
                Some(Control::Resume) => {
                    if paused {
                        sink.send(Event::Phase(Phase::Training));
                        self.message(sink, format!("resumed at step {}", self.progress.step))?;
                    }
                    return Ok(false);
                }
                Some(Control::SaveNow) => {
                    self.save_checkpoint(sink)?;
                    self.message(
                        sink,
                        format!("checkpoint saved at step {}", self.progress.step),
                    )?;
                }
                Some(Control::Stop) => return Ok(true),
            }
        }
    }

    fn run(
        &mut self,
        sink: &mut dyn Sink,
        control: &Receiver<Control>,
    ) -> Result<Outcome, TrainError> {
        sink.send(Event::Started(self.info.clone()));
        let start = self.progress.step;
        if start > 0 {
            // `prepare` cut the metrics back to the checkpoint: all of it is history now.
            sink.send(Event::History(Arc::new(self.run.read_metrics())));
        }
        self.message(
            sink,
            format!(
                "{} on {} ({} train / {} test images), {} parameters, steps {start}..{}{}",
                self.info.run_dir.display(),
                self.info.data_source,
                self.info.train_images,
                self.info.test_images,
                self.info.parameters,
                self.info.final_step,
                match self.info.budget_secs {
                    // A max_steps inside the measured steps ends the run before any sizing.
                    Some(_)
                        if self.needs_sizing()
                            && self.info.final_step
                                > start + budget::SETTLE_STEPS + budget::MEASURE_STEPS =>
                    {
                        " until the budget is measured"
                    }
                    _ => "",
                }
            ),
        )?;
        sink.send(Event::Phase(Phase::Training));
        if start == 0 {
            self.probe(sink)?;
        }
        // Open-ended: a budget may move the end; dropping the receiver stops the thread.
        let batches = self
            .plan
            .prefetch(Arc::clone(&self.data), self.norm, start, u64::MAX);
        let cfg = self.config.train.clone();
        let workers = Workers::for_batches(cfg.batch_size, cfg.micro_batch_size);
        let spe = self.info.steps_per_epoch;
        let mut last_eval = None;
        let mut stopped = false;
        // This process's pace after its first SETTLE steps: over the next MEASURE steps it
        // sizes a budgeted run, and from then on it decides which evaluations still fit.
        let (mut paced_secs, mut paced_steps) = (0.0, 0u64);
        // The same over the latest epoch alone, for re-planning at its end.
        let (mut epoch_secs, mut epoch_steps) = (0.0, 0u64);
        let (measure_from, measure_to) = (
            start + budget::SETTLE_STEPS,
            start + budget::SETTLE_STEPS + budget::MEASURE_STEPS,
        );
        if self.needs_sizing() && self.config.train.max_steps == 0 {
            // Until measured, a budgeted run's length is open; epochs do not bound it.
            self.info.final_step = self.info.final_step.max(measure_to);
        }
        while self.progress.step < self.info.final_step {
            if self.handle_controls(sink, control)? {
                stopped = true;
                break;
            }
            let started = Instant::now();
            let batch = batches
                .recv()
                .map_err(|_| TrainError::Invalid("the data thread stopped unexpectedly".into()))?;
            let step_result = forward_backward(
                &self.state.model,
                &self.vars,
                (&batch.pixels, &batch.labels),
                (
                    cfg.label_smoothing,
                    DropPath::for_step(cfg.drop_path, cfg.seed, self.progress.step + 1).as_ref(),
                ),
                cfg.micro_batch_size,
                &workers,
            )?;
            let loss_value = step_result.loss;
            #[cfg(test)]
            let mut step_result = step_result;
            #[cfg(test)]
            if self.inject_non_finite == Some(self.progress.step + 1) {
                let last = step_result.grads.len() - 1;
                step_result.grads[last] = step_result.grads[last]
                    .as_ref()
                    .map(|g| g.affine(f64::NAN, 0.0))
                    .transpose()?;
            }
            let grad_sums = self.groups.sum_squares(&step_result.grads)?;
            if let Some(what) = self.groups.non_finite(loss_value, &grad_sums) {
                return Err(self.halt_non_finite(sink, control, what)?);
            }
            let grad_norm = grad_sums.iter().sum::<f64>().sqrt();
            let correct = step_result.correct;
            let horizon = self.config.train.schedule_steps(spe);
            // The live config: a re-plan changes the schedule mid-run.
            let lr = learning_rate(&self.config.train, self.progress.step, horizon);
            let every = self.config.probe.grad_every_steps as u64;
            let recorded = every > 0 && (self.progress.step + 1).is_multiple_of(every);
            let before = match recorded {
                true => Some(GradGroups::before(&self.vars)?),
                false => None,
            };
            self.optimizer.step(&step_result.grads, lr)?;
            if let Some(before) = before {
                let step = self.progress.step + 1;
                let record = self.groups.record(
                    (step, self.epoch_of(step)),
                    &grad_sums,
                    &before,
                    &self.vars,
                )?;
                self.write_layers(sink, MetricRecord::Grads(record))?;
            }
            if let Some(median) = self.spikes.check(grad_norm) {
                let message = self
                    .groups
                    .spike((self.progress.step + 1, median), &grad_sums);
                self.alert(sink, false, message)?;
            }
            if let Some(ema) = &self.ema {
                ema.update(&self.state, self.progress.step + 1)?;
            }
            drop(step_result);
            let secs = started.elapsed().as_secs_f64();
            #[cfg(test)]
            let secs = match self.slow_after_sizing {
                Some(slow) if self.progress.step >= measure_to && !self.needs_sizing() => slow,
                _ => secs,
            };
            self.progress.step += 1;
            self.progress.wall_secs += secs;
            let step = self.progress.step;
            if step > measure_from {
                paced_secs += secs;
                paced_steps += 1;
                epoch_secs += secs;
                epoch_steps += 1;
            }
            if self.needs_sizing() && step == measure_to {
                self.apply_budget(sink, paced_secs / paced_steps as f64)?;
            }
            let record = TrainRecord {
                step,
                epoch: self.epoch_of(step),
                loss: loss_value,
                accuracy: correct as f64 / batch.labels.len() as f64,
                lr,
                images_per_sec: batch.labels.len() as f64 / secs.max(1e-9),
                step_ms: secs * 1e3,
                wall_secs: self.progress.wall_secs,
            };
            self.metrics.append(
                &serde_json::to_string(&MetricRecord::Train(record.clone()))
                    .expect("record serialises"),
            )?;
            sink.send(Event::Train(record));

            let epoch_end = step.is_multiple_of(spe);
            let probe_due = self.config.probe.every_steps > 0
                && step.is_multiple_of(self.config.probe.every_steps as u64);
            if epoch_end {
                // Not at the sizing's own step: that plan is a moment old.
                if epoch_steps > 0 && step < self.info.final_step && step != measure_to {
                    self.replan(sink, epoch_secs / epoch_steps as f64)?;
                }
                (epoch_secs, epoch_steps) = (0.0, 0);
                let pace = (paced_steps > 0).then(|| paced_secs / paced_steps as f64);
                if step >= self.info.final_step || self.evaluation_due(pace) {
                    last_eval = Some(self.evaluate(sink)?);
                    self.skipped_evals = 0;
                } else {
                    self.skipped_evals += 1;
                    self.message(
                        sink,
                        format!(
                            "skipped the evaluation after epoch {}: at {:.3} s a step, the run would end past its budget (at most {} are skipped in a row)",
                            self.epoch_of(step),
                            pace.unwrap_or(0.0),
                            budget::MAX_SKIPPED_IN_ROW
                        ),
                    )?;
                }
                self.probe(sink)?;
                self.save_checkpoint(sink)?;
                sink.send(Event::Phase(Phase::Training));
            } else {
                if probe_due {
                    self.probe(sink)?;
                }
                if cfg.checkpoint_every_steps > 0
                    && step.is_multiple_of(cfg.checkpoint_every_steps as u64)
                {
                    self.save_checkpoint(sink)?;
                }
            }
        }
        let step = self.progress.step;
        let reason = if stopped {
            "stopped on request".to_string()
        } else if let (Some(budget), true) = (
            self.info.budget_secs,
            step as usize == self.config.train.planned_end(),
        ) {
            format!(
                "the {} budget's {step} steps done{}",
                humantime::format_duration(std::time::Duration::from_secs(budget as u64)),
                match self.config.train.replans.len() {
                    0 => String::new(),
                    1 => " (re-planned once)".to_string(),
                    n => format!(" (re-planned {n} times)"),
                }
            )
        } else if step >= self.info.epochs * spe {
            format!("all {} epochs done", self.info.epochs)
        } else {
            format!("reached train.max_steps = {}", self.config.train.max_steps)
        };
        if !stopped && last_eval.as_ref().is_none_or(|e| e.step != step) && step > start {
            // Ended inside an epoch (max_steps): evaluate where it stands.
            last_eval = Some(self.evaluate(sink)?);
            self.probe(sink)?;
        }
        if self.last_checkpoint != Some(step) {
            self.save_checkpoint(sink)?;
        }
        self.message(sink, format!("finished at step {step}: {reason}"))?;
        sink.send(Event::Phase(Phase::Finished));
        Ok(Outcome {
            step,
            reason,
            last_eval,
        })
    }
}

#[cfg(test)]
mod tests;

//! `vitscope bench`: measured training and evaluation throughput of the configured
//! model on this machine, against the machine's own matrix-product speed at the
//! model's shapes, with the time of a training step broken down.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::config::Config;
use crate::data::batch::{BatchPlan, Normalizer};
use crate::data::synthetic;
use crate::inspect::knowledge::KnowledgeSet;
use crate::inspect::probe::ProbeSet;
use crate::model::{forward_flops_per_image, DropPath, ModelState};
use crate::train::grad_stats::GradGroups;
use crate::train::optim::AdamW;
use crate::train::step::{forward_backward, micro_batch_len, Workers};

use super::args::BenchArgs;
use super::train::fits_in_memory;
use crate::train::memory::Workload;
use std::process::ExitCode;

#[derive(Debug, Clone, Serialize)]
pub struct StepBreakdown {
    /// Building one batch (augmentation included) on the data thread.
    pub data_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub model: String,
    /// The data thread's augmentations, in words.
    pub augmentation: String,
    pub parameters: usize,
    pub threads: usize,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub eval_batch_size: usize,
    pub warmup_steps: usize,
    pub timed_steps: usize,
    /// Matrix-product FLOPs of one image's forward pass, in GFLOP.
    pub forward_gflop_per_image: f64,
    /// f32 matrix products at the model's linear-layer shapes as training runs them
    /// (a tile of rows, one single-threaded product per core, all cores at once), in
    /// GFLOP/s: the machine's limit for this model.
    pub matmul_gflops: f64,
    /// What the products run on: "f32", "bf16 on AMX tiles", ...
    pub matmul_kind: String,
    /// Rows of each of those products.
    pub matmul_rows: usize,
    /// The products' instruction at its own rate on every lane at once (registers
    /// only), in GFLOP/s; 0 where none is measured.
    pub instruction_peak_gflops: f64,
    /// Which instruction, and how its peak was measured.
    pub instruction_peak: String,
    pub train_images_per_sec: f64,
    /// Training counts 3x the forward FLOPs (forward, and twice that for backward).
    pub train_gflops: f64,
    pub train_percent_of_matmul: f64,
    pub eval_images_per_sec: f64,
    pub eval_gflops: f64,
    pub eval_percent_of_matmul: f64,
    /// Mean time per training step by phase.
    pub step: StepBreakdown,
    /// One probe (forward on the probe images, summaries, serialisation), in ms.
    pub probe_ms: f64,
    /// Probe bytes written to the run directory per probe.
    pub probe_bytes: usize,
    /// Share of training time spent on probes at `probe.every_steps`, in percent.
    pub probe_overhead_percent: f64,
    /// Probe bytes per hour of training at that interval, in MB.
    pub probe_mb_per_hour: f64,
    pub probe_every_steps: usize,
    /// The per-step gradient check (Σg² per group, for non-finite and spike alerts), in ms.
    pub grad_check_ms: f64,
    /// One gradient record (the weights copied before the update, norms after), in ms.
    pub grad_record_ms: f64,
    pub grad_every_steps: usize,
    /// Share of training time both take at `probe.grad_every_steps`, in percent.
    pub grad_overhead_percent: f64,
    /// What each layer knows, measured once on `layers_train_images` +
    /// `layers_test_images` (synthetic) images, in seconds.
    pub knowledge_secs: f64,
    /// Its share of training time at one evaluation per 50,000-image epoch, every
    /// `probe.layers_every_evals`-th evaluation, in percent.
    pub knowledge_overhead_percent: f64,
    /// What `crate::train::memory::estimate` expected the benchmark to need, in MB.
    pub memory_estimate_mb: f64,
    /// The benchmark's measured peak resident memory, in MB (Linux; 0 elsewhere).
    pub peak_rss_mb: f64,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The machine's own matrix-product speed (f32, or bf16 with `model.matmul`) at the shapes of the model's linear
/// layers, run as training runs them: one tile of rows, a single-threaded product on
/// every lane (one per core) at once. The best of three trials per shape (the machine
/// is shared); about 1 GFLOP per lane and trial.
/// Returns (GFLOP/s, rows per product).
fn matmul_gflops(config: &Config, workers: &Workers) -> candle_core::Result<(f64, usize)> {
    let m = &config.model;
    let micro = micro_batch_len(config.train.batch_size, config.train.micro_batch_size);
    let rows = crate::ops::TILE_IMAGES.min(micro) * m.tokens();
    let shapes = [
        (m.dim, 3 * m.dim),
        (m.dim, m.dim),
        (m.dim, m.mlp_dim),
        (m.mlp_dim, m.dim),
    ];
    let lanes: Vec<usize> = (0..workers.lanes()).collect();
    let (mut flops, mut secs) = (0.0, 0.0);
    for (k, n) in shapes {
        let per_product = (2 * rows * k * n) as f64;
        let reps = (1e9 / per_product).ceil() as usize;
        let bf16 = m.bf16();
        crate::ops::time_products(rows, k, n, 1, bf16); // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            workers.map(&lanes, |_| {
                Ok(crate::ops::time_products(rows, k, n, reps, bf16))
            })?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        secs += best;
        flops += per_product * (reps * lanes.len()) as f64;
    }
    Ok((flops / secs / 1e9, rows))
}

/// Times `steps` training steps after `warmup`; `memory_estimate` (bytes) is reported
/// beside the measured peak.
pub fn run(
    config: &Config,
    warmup: usize,
    steps: usize,
    memory_estimate: f64,
) -> candle_core::Result<BenchReport> {
    let m = &config.model;
    let batch = config.train.batch_size;
    let state = ModelState::new(m, config.train.seed, DType::F32)?;
    let mut optimizer =
        AdamW::new(state.named_vars(), &config.train)?.with_bf16_products(config.model.bf16());
    let vars: Vec<candle_core::Var> = state.named_vars().into_iter().map(|(_, v)| v).collect();
    let data = synthetic::generate(config.train.seed, batch * 2, 1);
    let norm = Normalizer::from_split(&data.train);
    let plan = BatchPlan::from_config(config, data.train.len());
    let order = plan.epoch_order(0);
    let table = norm.table();
    let mut totals = [0.0f64; 4];
    let mut timed_ms = 0.0;
    let names: Vec<String> = state.named_vars().into_iter().map(|(n, _)| n).collect();
    let groups = GradGroups::new(&names);
    let (mut check_ms, mut record_ms) = (0.0, 0.0);
    let workers = Workers::for_batches(config.train.batch_size, config.train.micro_batch_size);
    for step in 0..warmup + steps {
        let t0 = Instant::now();
        let b = plan.build(&data.train, &table, &order, step as u64);
        let data_ms = ms_since(t0);
        let result = forward_backward(
            &state.model,
            &vars,
            (&b.pixels, &b.labels),
            (
                config.train.label_smoothing,
                DropPath::for_step(config.train.drop_path, config.train.seed, step as u64 + 1)
                    .as_ref(),
            ),
            config.train.micro_batch_size,
            &workers,
        )?;
        let (forward_ms, backward_ms) = (result.forward_secs * 1e3, result.backward_secs * 1e3);
        let grads = result.grads;
        let t2 = Instant::now();
        let sums = groups.sum_squares(&grads)?;
        let check = ms_since(t2);
        // The record's extra work (not part of every step): timed apart.
        let t2 = Instant::now();
        let before = GradGroups::before(&vars)?;
        let copy = ms_since(t2);
        let t3 = Instant::now();
        optimizer.step(&grads, 1e-4)?;
        let optimizer_ms = ms_since(t3);
        let t4 = Instant::now();
        groups.record((step as u64, 1), &sums, &before, &vars)?;
        let record = copy + ms_since(t4);
        if step >= warmup {
            check_ms += check;
            record_ms += record;
        }
        if step >= warmup {
            for (total, v) in
                totals
                    .iter_mut()
                    .zip([data_ms, forward_ms, backward_ms, optimizer_ms])
            {
                *total += v;
            }
            timed_ms += ms_since(t0) - record;
        }
    }
    let train_images_per_sec = (batch * steps) as f64 / (timed_ms / 1e3);

    let eval_batch = config.train.eval_batch_size;
    let model = state.model.detached();
    let images = Tensor::randn(0f32, 1.0, (eval_batch, 3, 32, 32), &Device::Cpu)?;
    // A warm-up, then as the trainer evaluates: batches shared out over the lanes, one
    // per core. At least 2,000 images, so a short run still times many batches.
    model.forward(&images)?;
    let eval_workers = Workers::per_thread();
    let batches: Vec<usize> =
        (0..2000usize.div_ceil(eval_batch).max(2 * eval_workers.lanes())).collect();
    let t = Instant::now();
    eval_workers.map(&batches, |_| {
        model.forward(&images)?.to_vec2::<f32>().map(drop)
    })?;
    let eval_images_per_sec = (eval_batch * batches.len()) as f64 / t.elapsed().as_secs_f64();

    let probes = ProbeSet::new(&data.train, config.probe.images, &norm);
    let detached = state.model.detached();
    let mut probe_ms = f64::INFINITY;
    let mut probe_bytes = 0;
    for step in 0..3 {
        let t = Instant::now();
        let snapshot = probes.probe(&detached, &config.probe, step, 1)?;
        probe_bytes = snapshot.to_bytes().len();
        probe_ms = probe_ms.min(ms_since(t));
    }
    let step_ms = timed_ms / steps.max(1) as f64;
    let probe_every_ms = config.probe.every_steps.max(1) as f64 * step_ms;
    let probe_overhead_percent = if config.probe.every_steps == 0 {
        0.0
    } else {
        100.0 * probe_ms / probe_every_ms
    };
    let probe_mb_per_hour = if config.probe.every_steps == 0 {
        0.0
    } else {
        probe_bytes as f64 / 1e6 * 3.6e6 / probe_every_ms
    };

    let p = &config.probe;
    let (check_ms, record_ms) = (
        check_ms / steps.max(1) as f64,
        record_ms / steps.max(1) as f64,
    );
    let grad_overhead_percent = match p.grad_every_steps {
        0 => 100.0 * check_ms / step_ms,
        every => 100.0 * (check_ms + record_ms / every as f64) / step_ms,
    };
    let knowledge_data = synthetic::generate(
        config.train.seed,
        p.layers_train_images.max(2),
        p.layers_test_images.max(2),
    );
    let set = KnowledgeSet::new(
        &knowledge_data.train,
        &knowledge_data.test,
        p.layers_train_images,
        p.layers_test_images,
    );
    let t = Instant::now();
    crate::train::evaluate::layer_knowledge(
        &detached,
        (&knowledge_data.train, &knowledge_data.test),
        &set,
        &norm,
        eval_batch,
        p.ridge_lambda,
    )?;
    let knowledge_secs = t.elapsed().as_secs_f64();
    let epoch_secs = 50_000.0 / batch as f64 * step_ms / 1e3;
    let knowledge_overhead_percent = match p.layers_every_evals {
        0 => 0.0,
        k => 100.0 * knowledge_secs / (epoch_secs * k as f64),
    };
    let (peak, matmul_rows) = matmul_gflops(config, &eval_workers)?;
    let lanes: Vec<usize> = (0..eval_workers.lanes()).collect();
    let peaks = eval_workers.map(&lanes, |_| Ok(crate::ops::peak::measure(m.bf16())))?;
    let instruction_peak_gflops: f64 = peaks.iter().flatten().map(|p| p.gflops).sum();
    let instruction_peak = match peaks.first().and_then(Option::as_ref) {
        Some(p) => format!("{}, {} lanes at once", p.how, lanes.len()),
        None => "not measured on this CPU".to_string(),
    };
    let fwd = forward_flops_per_image(m);
    let train_gflops = train_images_per_sec * 3.0 * fwd / 1e9;
    let eval_gflops = eval_images_per_sec * fwd / 1e9;
    let n = steps.max(1) as f64;
    Ok(BenchReport {
        model: format!(
            "ViT patch {}{} dim {} depth {} heads {} mlp {}{} ({} tokens; {}-norm {}, {} position embedding, {} pooling{}; products: {})",
            m.patch_size,
            match m.patch_tokens {
                crate::config::PatchTokens::Plain => "",
                crate::config::PatchTokens::Shifted => " (shifted patch tokens)",
            },
            m.dim,
            m.depth,
            m.heads,
            m.mlp_dim,
            match m.attention {
                crate::config::AttentionKind::Standard => "",
                crate::config::AttentionKind::Locality => " locality self-attention",
            },
            m.tokens(),
            m.norm,
            m.norm_kind,
            m.pos_embed,
            m.pool,
            if m.is_fused() { ", fused blocks" } else { ", layer by layer" },
            crate::ops::matmul_kind(m.bf16()),
        ),
        parameters: state.parameter_count(),
        threads: candle_core::utils::get_num_threads(),
        batch_size: batch,
        micro_batch_size: config.train.micro_batch_size,
        eval_batch_size: eval_batch,
        warmup_steps: warmup,
        timed_steps: steps,
        forward_gflop_per_image: fwd / 1e9,
        matmul_gflops: peak,
        matmul_kind: crate::ops::matmul_kind(m.bf16()).to_string(),
        matmul_rows,
        instruction_peak_gflops,
        instruction_peak,
        train_images_per_sec,
        train_gflops,
        train_percent_of_matmul: 100.0 * train_gflops / peak,
        eval_images_per_sec,
        eval_gflops,
        eval_percent_of_matmul: 100.0 * eval_gflops / peak,
        step: StepBreakdown {
            data_ms: totals[0] / n,
            forward_ms: totals[1] / n,
            backward_ms: totals[2] / n,
            optimizer_ms: totals[3] / n,
        },
        probe_ms,
        probe_bytes,
        probe_overhead_percent,
        probe_mb_per_hour,
        probe_every_steps: config.probe.every_steps,
        grad_check_ms: check_ms,
        grad_record_ms: record_ms,
        grad_every_steps: p.grad_every_steps,
        grad_overhead_percent,
        knowledge_secs,
        knowledge_overhead_percent,
        augmentation: augmentation_words(&config.data),
        memory_estimate_mb: memory_estimate / 1e6,
        peak_rss_mb: crate::sys::peak_rss_bytes().map_or(0.0, |b| b as f64 / 1e6),
    })
}

fn augmentation_words(d: &crate::config::DataConfig) -> String {
    let mut parts = Vec::new();
    if d.augment {
        parts.push(format!("crop (pad {}) + flip", d.crop_padding));
    }
    if d.trivial_augment {
        parts.push("TrivialAugment".into());
    }
    if d.random_erasing > 0.0 {
        parts.push(format!("erasing p={}", d.random_erasing));
    }
    if parts.is_empty() {
        "no augmentation".into()
    } else {
        parts.join(" + ")
    }
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        let s = &self.step;
        let total = s.data_ms + s.forward_ms + s.backward_ms + s.optimizer_ms;
        let pct = |v: f64| 100.0 * v / total.max(1e-9);
        format!(
            "model        {}\n\
             parameters   {}\n\
             threads      {}\n\
             matmul       {:.1} GFLOP/s ({}, the model's linear-layer shapes, {} rows per product, one per core at once)\n\
             peak         {:.1} GFLOP/s: the products reach {:.0}% of it ({})\n\
             train        {:.1} images/s  {:.1} GFLOP/s  {:.1}% of matmul  (batch {} in micro-batches of {}, {} timed steps after {} warm-up)\n\
             eval         {:.1} images/s  {:.1} GFLOP/s  {:.1}% of matmul  (batch {})\n\
             step         {:.1} ms: data {:.1} ms ({:.0}%), forward {:.1} ms ({:.0}%), backward {:.1} ms ({:.0}%), optimizer {:.1} ms ({:.0}%)\n\
             data thread  {:.0} images/s alone ({}; it runs beside training, {:.1}x ahead)\n\
             forward cost {:.4} GFLOP per image (matrix products)\n\
             probes       {:.1} ms and {:.2} MB each; every {} steps: {:.3}% of training time, {:.1} MB per hour\n\
             gradients    check {:.2} ms every step, record {:.2} ms every {} steps: {:.2}% of training time\n\
             layers       {:.2} s per measure of what each layer knows: {:.2}% of training time at one per 50,000-image epoch\n\
             memory       {:.0} MB peak resident, {:.0} MB estimated before the run",
            self.model,
            self.parameters,
            self.threads,
            self.matmul_gflops,
            self.matmul_kind,
            self.matmul_rows,
            self.instruction_peak_gflops,
            100.0 * self.matmul_gflops / self.instruction_peak_gflops.max(1e-9),
            self.instruction_peak,
            self.train_images_per_sec,
            self.train_gflops,
            self.train_percent_of_matmul,
            self.batch_size,
            self.micro_batch_size,
            self.timed_steps,
            self.warmup_steps,
            self.eval_images_per_sec,
            self.eval_gflops,
            self.eval_percent_of_matmul,
            self.eval_batch_size,
            total,
            s.data_ms,
            pct(s.data_ms),
            s.forward_ms,
            pct(s.forward_ms),
            s.backward_ms,
            pct(s.backward_ms),
            s.optimizer_ms,
            pct(s.optimizer_ms),
            self.batch_size as f64 / (s.data_ms / 1e3).max(1e-9),
            self.augmentation,
            (total - s.data_ms) / s.data_ms.max(1e-9),
            self.forward_gflop_per_image,
            self.probe_ms,
            self.probe_bytes as f64 / 1e6,
            self.probe_every_steps,
            self.probe_overhead_percent,
            self.probe_mb_per_hour,
            self.grad_check_ms,
            self.grad_record_ms,
            self.grad_every_steps,
            self.grad_overhead_percent,
            self.knowledge_secs,
            self.knowledge_overhead_percent,
            self.peak_rss_mb,
            self.memory_estimate_mb,
        )
    }
}

/// `vitscope bench`: the configuration resolved, checked to fit, measured, printed.
pub fn command(args: &BenchArgs) -> color_eyre::eyre::Result<ExitCode> {
    let mut sets = args.config.set.clone();
    if let Some(n) = args.threads {
        sets.insert(0, format!("train.threads={n}"));
    }
    let config = Config::load(args.config.config.as_deref(), &sets)?;
    crate::sys::set_threads(config.train.threads)?;
    if args.steps == 0 {
        color_eyre::eyre::bail!("--steps must be at least 1");
    }
    let estimate = fits_in_memory(&config, Workload::Bench)?;
    let report = run(&config, args.warmup, args.steps, estimate.total())
        .map_err(|e| color_eyre::eyre::eyre!("benchmark failed: {e}"))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        println!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}

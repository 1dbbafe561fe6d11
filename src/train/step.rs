//! One optimisation step's forward and backward passes: the batch cut into
//! micro-batches that run side by side on single-threaded lanes ([`Workers`]), their
//! gradients summed in batch order so the result does not depend on which lane
//! finished first.

use candle_core::{DType, Result, Tensor, Var};

use crate::model::{
    correct_predictions, images_tensor, smoothed_cross_entropy, DropPath, VisionTransformer,
};

/// What the forward and backward passes of one optimisation step produced.
pub struct StepResult {
    /// Mean loss over the batch.
    pub loss: f64,
    pub correct: usize,
    /// Gradients of the mean loss, one per variable (in the order given), detached.
    pub grads: Vec<Option<Tensor>>,
    pub forward_secs: f64,
    pub backward_secs: f64,
}

/// Thread pools that run micro-batches side by side, one lane per core (the default
/// batch of 128 in micro-batches of 32 is two rounds of two on 2 cores). Each lane is
/// single-threaded, with no synchronisation inside: at these sizes candle's per-op
/// parallel regions (a wake-up and a join per product and kernel) cost more than they
/// save, so two single-threaded micro-batches at once beat one two-threaded after the
/// other.
pub struct Workers {
    pools: Vec<rayon::ThreadPool>,
}

impl Workers {
    /// `threads` split over `lanes` pools of at least one thread each.
    pub fn new(threads: usize, lanes: usize) -> Self {
        let lanes = lanes.clamp(1, threads.max(1));
        let pools = (0..lanes)
            .map(|lane| {
                let share = threads / lanes + usize::from(lane < threads % lanes);
                rayon::ThreadPoolBuilder::new()
                    .num_threads(share.max(1))
                    .thread_name(move |i| format!("vitscope-lane{lane}-{i}"))
                    .build()
                    .expect("a thread pool")
            })
            .collect();
        Self { pools }
    }

    /// One single-threaded lane per tensor thread: for work items that are many and
    /// alike, such as evaluation batches.
    pub fn per_thread() -> Self {
        let threads = candle_core::utils::get_num_threads();
        Self::new(threads, threads)
    }

    /// As many lanes as a batch has micro-batches, up to the tensor threads.
    pub fn for_batches(batch_size: usize, micro_batch_size: usize) -> Self {
        let micro = micro_batch_len(batch_size, micro_batch_size);
        let threads = candle_core::utils::get_num_threads();
        Self::new(threads, batch_size.div_ceil(micro))
    }

    pub fn lanes(&self) -> usize {
        self.pools.len()
    }

    /// `f` of each of `items`, on all lanes at once: each lane takes the next item not
    /// yet taken until none is left, so a lane that finishes early does not wait for
    /// the others until the very end. The results come back in the items' order; the
    /// first error (in item order) is returned, and the lanes stop taking items.
    pub fn map<I: Sync, T: Send>(
        &self,
        items: &[I],
        f: impl Fn(&I) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
        let (f, next, failed) = (&f, &next, &failed);
        let lane = move || {
            let mut done = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let result = f(item);
                failed.fetch_or(result.is_err(), Ordering::Relaxed);
                done.push((i, result));
            }
            done
        };
        let per_lane = std::thread::scope(|scope| {
            let handles: Vec<_> = (self.pools.iter().take(items.len()))
                .map(|pool| scope.spawn(move || pool.install(lane)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| candle_core::Error::Msg("a worker thread panicked".into()))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut slots: Vec<Option<Result<T>>> = items.iter().map(|_| None).collect();
        for (i, result) in per_lane.into_iter().flatten() {
            slots[i] = Some(result);
        }
        // In order: the first error, or all results (an item is only left undone
        // after an error).
        slots
            .into_iter()
            .map_while(|slot| slot)
            .collect::<Result<Vec<T>>>()
            .and_then(|done| match done.len() == items.len() {
                true => Ok(done),
                false => Err(candle_core::Error::Msg("a work item was not run".into())),
            })
    }
}

/// Images per micro-batch for `train.micro_batch_size` = `micro` (0: the whole batch),
/// at least 1.
pub fn micro_batch_len(batch: usize, micro: usize) -> usize {
    match micro {
        0 => batch,
        n => n.min(batch),
    }
    .max(1)
}

/// Micro-batches handed to the lanes at once, per lane.
const MICRO_BATCHES_PER_LANE: usize = 8;

/// One micro-batch's share of a step.
struct MicroResult {
    loss: f64,
    correct: usize,
    grads: Vec<Option<Tensor>>,
    forward_secs: f64,
    backward_secs: f64,
}

/// Forward and backward of images `range` of the batch; loss and gradients are
/// scaled by the micro-batch's share of the batch.
fn micro_step(
    model: &VisionTransformer,
    vars: &[Var],
    (pixels, labels): (&[f32], &[u32]),
    range: std::ops::Range<usize>,
    (smoothing, drop): (f64, Option<&DropPath>),
) -> Result<MicroResult> {
    let batch = labels.len();
    let per_image = pixels.len() / batch.max(1);
    let n = range.len();
    let t = std::time::Instant::now();
    let images = images_tensor(
        pixels[range.start * per_image..range.end * per_image].to_vec(),
        n,
        model.patch_embed.weight.dtype(),
    )?;
    let part = &labels[range.clone()];
    let logits = model.forward_train(&images, drop, range)?;
    let loss = smoothed_cross_entropy(&logits, part, smoothing)?;
    let share = n as f64 / batch as f64;
    let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * share;
    let correct = correct_predictions(&logits, part)?;
    let forward_secs = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let grads = loss.affine(share, 0.0)?.backward()?;
    std::mem::drop((logits, loss));
    // Detached: a gradient computed from activations would otherwise keep this
    // micro-batch's whole autograd graph alive through its own graph links.
    let grads = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).map(Tensor::detach))
        .collect();
    Ok(MicroResult {
        loss: loss_value,
        correct,
        grads,
        forward_secs,
        backward_secs: t.elapsed().as_secs_f64(),
    })
}

/// Forward and backward over a batch of normalised images (B, 3, 32, 32) in
/// micro-batches of at most `micro` images, summing gradients. The loss is a mean, so
/// this is the whole batch's gradient, for a fraction of the activation memory (the
/// default model keeps about 2 MB per image for its backward pass). Micro-batches run
/// side by side on the `workers`' lanes, each lane taking the next one as it
/// finishes; the sums are taken in batch order, so the result does not depend on
/// which finished first. The reported times are a lane's mean time per phase.
/// `drop`: this step's stochastic depth, if any.
pub fn forward_backward(
    model: &VisionTransformer,
    vars: &[Var],
    (pixels, labels): (&[f32], &[u32]),
    (smoothing, drop): (f64, Option<&DropPath>),
    micro: usize,
    workers: &Workers,
) -> Result<StepResult> {
    let batch = labels.len();
    let micro = micro_batch_len(batch, micro);
    let ranges: Vec<std::ops::Range<usize>> = (0..batch)
        .step_by(micro)
        .map(|start| start..(start + micro).min(batch))
        .collect();
    let mut total: Vec<Option<Tensor>> = vec![None; vars.len()];
    let (mut loss_sum, mut correct) = (0.0, 0);
    let (mut forward_secs, mut backward_secs) = (0.0, 0.0);
    let lanes = workers.lanes().min(ranges.len()).max(1);
    // A few micro-batches per lane at a time, so that tiny micro-batches do not hold
    // every gradient at once.
    for part in ranges.chunks(MICRO_BATCHES_PER_LANE * lanes) {
        let results = workers.map(part, |range| {
            micro_step(
                model,
                vars,
                (pixels, labels),
                range.clone(),
                (smoothing, drop),
            )
        })?;
        let mut grads = Vec::with_capacity(results.len());
        for result in results {
            loss_sum += result.loss;
            correct += result.correct;
            forward_secs += result.forward_secs / lanes as f64;
            backward_secs += result.backward_secs / lanes as f64;
            grads.push(result.grads);
        }
        total = sum_in_order(total, &grads)?;
    }
    Ok(StepResult {
        loss: loss_sum,
        correct,
        grads: total,
        forward_secs,
        backward_secs,
    })
}

/// Each variable's gradient: `total`'s plus those of `grads` (one list per micro-batch,
/// in batch order), added in that order. The variables are summed side by side on
/// rayon's pool (the tensor threads), each in the same order as one thread would, so
/// the sums do not depend on the threads: with many lanes a serial sum over every
/// variable of every micro-batch would hold the step up.
fn sum_in_order(
    total: Vec<Option<Tensor>>,
    grads: &[Vec<Option<Tensor>>],
) -> Result<Vec<Option<Tensor>>> {
    use rayon::prelude::*;
    total
        .into_par_iter()
        .enumerate()
        .map(|(v, mut slot)| {
            for g in grads.iter().filter_map(|micro| micro[v].as_ref()) {
                slot = Some(match slot {
                    Some(a) => a.add(g)?,
                    None => g.clone(),
                });
            }
            Ok(slot)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{random_images, tiny_config, values};
    use crate::model::ModelState;

    #[test]
    fn workers_run_every_item_once_in_order_on_all_lanes_and_report_the_first_error() {
        let workers = Workers::new(2, 2);
        let items: Vec<usize> = (0..25).collect();
        let squares = workers.map(&items, |&i| Ok(i * i)).unwrap();
        assert_eq!(squares, items.iter().map(|i| i * i).collect::<Vec<_>>());
        // Slow items: both lanes take some.
        let lanes = workers
            .map(&items, |_| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                Ok(std::thread::current().name().unwrap_or("").to_string())
            })
            .unwrap();
        let distinct: std::collections::BTreeSet<_> = lanes.iter().collect();
        assert_eq!(distinct.len(), 2, "{distinct:?}");
        let failing = workers.map(&items, |&i| match i {
            7 | 19 => Err(candle_core::Error::Msg(format!("item {i} failed"))),
            i => Ok(i),
        });
        assert!(failing.unwrap_err().to_string().contains("item 7 failed"));
        assert!(workers.map(&items[..0], |&i| Ok(i)).unwrap().is_empty());
    }

    #[test]
    fn gradients_are_summed_in_batch_order_whatever_the_threads() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let dev = candle_core::Device::Cpu;
        // Seven micro-batches' gradients of three variables, one of them missing in
        // some: values whose sums depend on their order in f32.
        let grads: Vec<Vec<Option<Tensor>>> = (0..7)
            .map(|m| {
                (0..3)
                    .map(|v| {
                        (v != 2 || m % 3 == 0).then(|| {
                            let x: Vec<f32> = (0..1000)
                                .map(|_| rng.random_range(-1.0f32..1.0) * 10f32.powi(m % 4 * 3))
                                .collect();
                            Tensor::from_vec(x, 1000, &dev).unwrap()
                        })
                    })
                    .collect()
            })
            .collect();
        let serial: Vec<Vec<f32>> = (0..3)
            .map(|v| {
                let mut acc: Option<Tensor> = None;
                for micro in &grads {
                    if let Some(g) = &micro[v] {
                        acc = Some(match acc {
                            Some(a) => (a + g).unwrap(),
                            None => g.clone(),
                        });
                    }
                }
                acc.unwrap().to_vec1().unwrap()
            })
            .collect();
        for threads in [1, 2, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // In two rounds, as a step with more micro-batches than a round takes.
            let summed = pool.install(|| {
                let first = sum_in_order(vec![None; 3], &grads[..4]).unwrap();
                sum_in_order(first, &grads[4..]).unwrap()
            });
            for (v, s) in summed.iter().enumerate() {
                let got: Vec<f32> = s.as_ref().unwrap().to_vec1().unwrap();
                assert_eq!(got, serial[v], "{threads} threads, variable {v}");
            }
        }
    }

    #[test]
    fn micro_batches_give_the_whole_batch_gradient_with_and_without_stochastic_depth() {
        let cfg = tiny_config();
        let state = ModelState::new(&cfg, 9, DType::F64).unwrap();
        let vars: Vec<Var> = state.named_vars().into_iter().map(|(_, v)| v).collect();
        let images = random_images(5, 9, DType::F64);
        let pixels: Vec<f32> = images
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let labels = [0u32, 3, 3, 9, 1];
        let one = Workers::new(1, 1);
        let dropping = DropPath::for_step(0.5, 3, 1);
        let plain = forward_backward(
            &state.model,
            &vars,
            (&pixels, &labels),
            (0.1, None),
            0,
            &one,
        );
        for drop in [None, dropping.as_ref()] {
            let whole = forward_backward(
                &state.model,
                &vars,
                (&pixels, &labels),
                (0.1, drop),
                0,
                &one,
            )
            .unwrap();
            // Three micro-batches (2 + 2 + 1) over two lanes: side by side, then alone.
            let split = forward_backward(
                &state.model,
                &vars,
                (&pixels, &labels),
                (0.1, drop),
                2,
                &Workers::new(2, 2),
            )
            .unwrap();
            assert!(
                (whole.loss - split.loss).abs() < 1e-12,
                "{} vs {}",
                whole.loss,
                split.loss
            );
            assert_eq!(whole.correct, split.correct);
            // Stochastic depth changes the step (at rate 0.5 some branch of the last
            // block is dropped for some of the 5 images).
            let same_as_plain = (whole.loss - plain.as_ref().unwrap().loss).abs() < 1e-12;
            assert_eq!(same_as_plain, drop.is_none(), "{drop:?}");
            for (i, (name, _)) in state.named_vars().into_iter().enumerate() {
                let a = values(whole.grads[i].as_ref().unwrap());
                let b = values(split.grads[i].as_ref().unwrap());
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-12, "{name}: {x} vs {y}");
                }
            }
        }
    }
}

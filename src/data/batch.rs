//! From bytes to training batches: a seeded order per epoch, seeded augmentation per
//! step (random crop of the zero-padded image, horizontal flip, then optionally
//! TrivialAugment and random erasing from [`super::augment`]), normalisation by the
//! training set's channel statistics, all done one batch at a time on a prefetch thread.
//!
//! Every random choice is a function of (seed, epoch) or (seed, step), so any step's
//! batch can be rebuilt exactly after a resume.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::augment::{self, Image};
use super::dataset::{mix_seed, Dataset, Split, IMAGE_BYTES};
use crate::config::{CHANNELS, IMAGE_SIZE};

const ORDER_STREAM: u64 = 0x0DE2;
const AUGMENT_STREAM: u64 = 0xA06E;

/// Per-channel mean and standard deviation of the training images, in [0, 1] units.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizer {
    pub mean: [f32; CHANNELS],
    pub std: [f32; CHANNELS],
}

impl Normalizer {
    pub fn from_split(split: &Split) -> Self {
        let plane = IMAGE_SIZE * IMAGE_SIZE;
        let mut sum = [0f64; CHANNELS];
        let mut sum_sq = [0f64; CHANNELS];
        for image in split.images.chunks_exact(IMAGE_BYTES) {
            for c in 0..CHANNELS {
                let (mut s, mut q) = (0u64, 0u64);
                for &b in &image[c * plane..(c + 1) * plane] {
                    s += u64::from(b);
                    q += u64::from(b) * u64::from(b);
                }
                sum[c] += s as f64;
                sum_sq[c] += q as f64;
            }
        }
        let n = (split.len().max(1) * plane) as f64;
        let mut mean = [0f32; CHANNELS];
        let mut std = [1f32; CHANNELS];
        for c in 0..CHANNELS {
            let m = sum[c] / n / 255.0;
            let var = (sum_sq[c] / n / (255.0 * 255.0) - m * m).max(0.0);
            mean[c] = m as f32;
            // A constant channel would divide by zero: leave it unscaled.
            std[c] = if var > 1e-12 { var.sqrt() as f32 } else { 1.0 };
        }
        Self { mean, std }
    }

    /// A lookup table byte -> normalised value, per channel.
    pub fn table(&self) -> [[f32; 256]; CHANNELS] {
        let mut table = [[0f32; 256]; CHANNELS];
        for (c, row) in table.iter_mut().enumerate() {
            for (b, v) in row.iter_mut().enumerate() {
                *v = (b as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        table
    }
}

/// Normalised f32 images (N, 3, 32, 32) of `indices` without augmentation.
pub fn images_f32(split: &Split, indices: &[usize], norm: &Normalizer) -> Vec<f32> {
    let table = norm.table();
    let plane = IMAGE_SIZE * IMAGE_SIZE;
    let mut out = Vec::with_capacity(indices.len() * IMAGE_BYTES);
    for &i in indices {
        let image = split.image(i);
        for c in 0..CHANNELS {
            out.extend(
                image[c * plane..(c + 1) * plane]
                    .iter()
                    .map(|&b| table[c][usize::from(b)]),
            );
        }
    }
    out
}

/// Crop with offset (dx, dy) from the image zero-padded by the crop padding, then
/// optionally flip left-right, then normalise.
#[cfg(test)]
fn augment_into(
    src: &[u8],
    dx: isize,
    dy: isize,
    flip: bool,
    table: &[[f32; 256]; CHANNELS],
    out: &mut [f32],
) {
    let mut img: Image = [0; IMAGE_BYTES];
    crop_flip_bytes(src, dx, dy, flip, &mut img);
    normalise_into(&img, table, out);
}

fn normalise_into(img: &Image, table: &[[f32; 256]; CHANNELS], out: &mut [f32]) {
    let plane = IMAGE_SIZE * IMAGE_SIZE;
    for (c, (o, i)) in out
        .chunks_exact_mut(plane)
        .zip(img.chunks_exact(plane))
        .enumerate()
    {
        o.iter_mut()
            .zip(i)
            .for_each(|(o, &b)| *o = table[c][usize::from(b)]);
    }
}

/// The cropped, flipped image as bytes (padding is black).
fn crop_flip_bytes(src: &[u8], dx: isize, dy: isize, flip: bool, out: &mut [u8]) {
    let n = IMAGE_SIZE as isize;
    for c in 0..CHANNELS {
        for y in 0..n {
            let sy = y + dy;
            for x in 0..n {
                let sx = if flip { n - 1 - x } else { x } + dx;
                out[(c * IMAGE_SIZE) * IMAGE_SIZE + (y * n + x) as usize] =
                    if (0..n).contains(&sy) && (0..n).contains(&sx) {
                        src[(c * IMAGE_SIZE) * IMAGE_SIZE + (sy * n + sx) as usize]
                    } else {
                        0
                    };
            }
        }
    }
}

/// A training batch: normalised images (len, 3, 32, 32) and labels.
#[derive(Debug, Clone)]
pub struct Batch {
    pub step: u64,
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Which images make up which step, and how they are augmented.
#[derive(Debug, Clone, Copy)]
pub struct BatchPlan {
    pub seed: u64,
    pub batch_size: usize,
    pub train_len: usize,
    pub augment: bool,
    pub crop_padding: usize,
    /// TrivialAugment (wide) on each image after crop and flip.
    pub trivial_augment: bool,
    /// Probability of erasing a random rectangle (to the mean colour) of each image.
    pub random_erasing: f64,
}

impl BatchPlan {
    /// The plan a configuration asks for over a training set of `train_len` images.
    pub fn from_config(config: &crate::config::Config, train_len: usize) -> Self {
        Self {
            seed: config.train.seed,
            batch_size: config.train.batch_size,
            train_len,
            augment: config.data.augment,
            crop_padding: config.data.crop_padding,
            trivial_augment: config.data.trivial_augment,
            random_erasing: config.data.random_erasing,
        }
    }

    /// Full batches per epoch (the last partial batch is dropped so every step is the same size).
    pub fn steps_per_epoch(&self) -> u64 {
        (self.train_len / self.batch_size) as u64
    }

    /// The shuffled order of the training set in `epoch`.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.train_len as u32).collect();
        order.shuffle(&mut StdRng::seed_from_u64(mix_seed(
            self.seed,
            ORDER_STREAM,
            epoch,
        )));
        order
    }

    /// The batch of global step `step` (0-based), given its epoch's order.
    pub fn build(
        &self,
        split: &Split,
        table: &[[f32; 256]; CHANNELS],
        order: &[u32],
        step: u64,
    ) -> Batch {
        let within = (step % self.steps_per_epoch()) as usize;
        let indices = &order[within * self.batch_size..(within + 1) * self.batch_size];
        let mut rng = StdRng::seed_from_u64(mix_seed(self.seed, AUGMENT_STREAM, step));
        let pad = self.crop_padding as i64;
        let mut pixels = vec![0f32; indices.len() * IMAGE_BYTES];
        for (&index, out) in indices.iter().zip(pixels.chunks_exact_mut(IMAGE_BYTES)) {
            let (dx, dy, flip) = if self.augment {
                let dx = rng.random_range(-pad..=pad) as isize;
                let dy = rng.random_range(-pad..=pad) as isize;
                (dx, dy, rng.random_bool(0.5))
            } else {
                (0, 0, false)
            };
            let mut img: Image = [0; IMAGE_BYTES];
            crop_flip_bytes(split.image(index as usize), dx, dy, flip, &mut img);
            // Draws for these come after crop and flip, so runs without them keep their stream.
            if self.trivial_augment {
                augment::trivial_augment(&mut img, &mut rng);
            }
            normalise_into(&img, table, out);
            if self.random_erasing > 0.0 && rng.random_bool(self.random_erasing.min(1.0)) {
                if let Some((top, left, h, w)) = augment::erasing_box(&mut rng) {
                    // Zero after normalisation is the training set's mean colour.
                    for plane in out.chunks_exact_mut(IMAGE_SIZE * IMAGE_SIZE) {
                        for row in top..top + h {
                            plane[row * IMAGE_SIZE + left..row * IMAGE_SIZE + left + w].fill(0.0);
                        }
                    }
                }
            }
        }
        Batch {
            step,
            pixels,
            labels: indices
                .iter()
                .map(|&i| u32::from(split.labels[i as usize]))
                .collect(),
        }
    }

    /// Builds the batches of steps `start..end` on a thread of their own, two ahead of
    /// the consumer, so the data never stalls a training step. Dropping the receiver
    /// stops the thread.
    pub fn prefetch(
        self,
        data: Arc<Dataset>,
        norm: Normalizer,
        start: u64,
        end: u64,
    ) -> Receiver<Batch> {
        let (tx, rx) = sync_channel(2);
        std::thread::Builder::new()
            .name("vitscope-data".into())
            .spawn(move || {
                let table = norm.table();
                let spe = self.steps_per_epoch();
                let mut order: Option<(u64, Vec<u32>)> = None;
                for step in start..end {
                    let epoch = step / spe;
                    if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                        order = Some((epoch, self.epoch_order(epoch)));
                    }
                    let (_, ord) = order.as_ref().expect("order was just set");
                    if tx.send(self.build(&data.train, &table, ord, step)).is_err() {
                        return;
                    }
                }
            })
            .expect("spawn the data thread");
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;

    fn plan(augment: bool) -> BatchPlan {
        BatchPlan {
            seed: 9,
            batch_size: 8,
            train_len: 40,
            augment,
            crop_padding: 4,
            trivial_augment: false,
            random_erasing: 0.0,
        }
    }

    #[test]
    fn normalizer_gives_zero_mean_unit_std_per_channel() {
        let set = synthetic::generate(1, 200, 10);
        let norm = Normalizer::from_split(&set.train);
        let all: Vec<usize> = (0..200).collect();
        let pixels = images_f32(&set.train, &all, &norm);
        let plane = IMAGE_SIZE * IMAGE_SIZE;
        for c in 0..CHANNELS {
            let values: Vec<f64> = pixels
                .chunks_exact(IMAGE_BYTES)
                .flat_map(|img| {
                    img[c * plane..(c + 1) * plane]
                        .iter()
                        .map(|&v| f64::from(v))
                })
                .collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
            assert!(mean.abs() < 1e-3, "channel {c} mean {mean}");
            assert!((var - 1.0).abs() < 1e-3, "channel {c} var {var}");
        }
    }

    #[test]
    fn crop_and_flip_move_pixels_as_expected() {
        let src: Vec<u8> = (0..IMAGE_BYTES).map(|i| (i % 251) as u8 + 1).collect();
        let norm = Normalizer {
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
        };
        let table = norm.table(); // identity: byte b -> b
        let at = |img: &[f32], c: usize, y: usize, x: usize| img[(c * 32 + y) * 32 + x].round();
        let mut out = vec![0f32; IMAGE_BYTES];
        augment_into(&src, 2, -3, false, &table, &mut out);
        // out(y, x) = src(y - 3, x + 2); rows above 3 and the last two columns are padding.
        assert_eq!(at(&out, 1, 10, 5), f32::from(src[(32 + 7) * 32 + 7]));
        assert_eq!(at(&out, 0, 2, 5), 0.0);
        assert_eq!(at(&out, 0, 10, 30), 0.0);
        augment_into(&src, 0, 0, true, &table, &mut out);
        assert_eq!(at(&out, 2, 4, 0), f32::from(src[(64 + 4) * 32 + 31]));
        assert_eq!(at(&out, 2, 4, 31), f32::from(src[(64 + 4) * 32]));
    }

    #[test]
    fn batches_are_reproducible_and_cover_each_epoch_once() {
        let set = synthetic::generate(2, 40, 4);
        let norm = Normalizer::from_split(&set.train);
        let table = norm.table();
        let p = plan(true);
        assert_eq!(p.steps_per_epoch(), 5);
        let order = p.epoch_order(0);
        let a = p.build(&set.train, &table, &order, 3);
        let b = p.build(&set.train, &table, &p.epoch_order(0), 3);
        assert_eq!(a.pixels, b.pixels);
        assert_eq!(a.labels, b.labels);
        let mut seen: Vec<u32> = order.clone();
        seen.sort_unstable();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
        assert_ne!(p.epoch_order(0), p.epoch_order(1));
        // Augmentation differs between steps that show the same images (epochs 0 and 1).
        let same_images = p.build(&set.train, &table, &order, 8);
        assert_ne!(
            p.build(&set.train, &table, &order, 3).pixels,
            same_images.pixels,
        );
        let plain = plan(false).build(&set.train, &table, &order, 3);
        let first = order[3 * 8] as usize;
        assert_eq!(
            plain.pixels[..IMAGE_BYTES],
            images_f32(&set.train, &[first], &norm)[..]
        );
    }

    #[test]
    fn trivial_augment_and_erasing_are_seeded_per_step_and_keep_the_plain_stream() {
        let set = Arc::new(synthetic::generate(3, 40, 4));
        let norm = Normalizer::from_split(&set.train);
        let table = norm.table();
        let plain = plan(true);
        let strong = BatchPlan {
            trivial_augment: true,
            random_erasing: 1.0,
            ..plain
        };
        let order = plain.epoch_order(0);
        let a = strong.build(&set.train, &table, &order, 2);
        assert_eq!(a.pixels, strong.build(&set.train, &table, &order, 2).pixels);
        assert_ne!(a.pixels, plain.build(&set.train, &table, &order, 2).pixels);
        // Erasing always fires at p = 1: every image has a rectangle at the mean (0.0).
        for image in a.pixels.chunks_exact(IMAGE_BYTES) {
            assert!(image.iter().filter(|&&v| v == 0.0).count() >= 3 * 6);
        }
        // A run resumed at step 5 gets the same augmented batches as one that ran through.
        let through: Vec<Batch> = strong.prefetch(set.clone(), norm, 0, 10).iter().collect();
        let resumed: Vec<Batch> = strong.prefetch(set.clone(), norm, 5, 10).iter().collect();
        for (r, t) in resumed.iter().zip(&through[5..]) {
            assert_eq!(
                (r.step, &r.pixels, &r.labels),
                (t.step, &t.pixels, &t.labels)
            );
        }
    }

    #[test]
    fn prefetch_yields_the_same_batches_in_order() {
        let set = Arc::new(synthetic::generate(2, 40, 4));
        let norm = Normalizer::from_split(&set.train);
        let p = plan(true);
        let got: Vec<Batch> = p.prefetch(set.clone(), norm, 3, 12).iter().collect();
        assert_eq!(
            got.iter().map(|b| b.step).collect::<Vec<_>>(),
            (3..12).collect::<Vec<_>>()
        );
        let table = norm.table();
        let direct = p.build(&set.train, &table, &p.epoch_order(1), 7);
        assert_eq!(got[4].pixels, direct.pixels);
    }
}

//! A built-in 10-class image set generated from the seed: each class is its own shape
//! in its own colour, placed, sized and tinted at random on a noisy background, so the
//! program can be tried and tested without CIFAR-10.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::dataset::{mix_seed, Dataset, Split, IMAGE_BYTES, NUM_CLASSES};
use crate::config::{DatasetKind, IMAGE_SIZE};

pub const CLASS_NAMES: [&str; NUM_CLASSES] = [
    "red disc",
    "orange square",
    "yellow triangle",
    "green cross",
    "cyan ring",
    "blue h-stripes",
    "purple v-stripes",
    "pink x",
    "white checker",
    "grey diamond",
];

const COLOURS: [[u8; 3]; NUM_CLASSES] = [
    [220, 40, 40],
    [240, 140, 20],
    [230, 220, 40],
    [40, 200, 60],
    [40, 210, 220],
    [40, 70, 230],
    [150, 50, 210],
    [240, 110, 190],
    [240, 240, 240],
    [140, 140, 140],
];

/// Is the point (u, v), in shape coordinates where the shape spans [-1, 1], inside
/// the shape of `class`?
fn inside(class: usize, u: f32, v: f32) -> bool {
    let (au, av) = (u.abs(), v.abs());
    if au > 1.0 || av > 1.0 {
        return false;
    }
    match class {
        0 => u * u + v * v <= 1.0,
        1 => au <= 0.8 && av <= 0.8,
        2 => v >= -0.9 && au <= (v + 0.9) * 0.55,
        3 => au <= 0.3 || av <= 0.3,
        4 => (0.45..=1.0).contains(&(u * u + v * v).sqrt()),
        5 => ((v + 1.0) * 2.5).floor() as i32 % 2 == 0,
        6 => ((u + 1.0) * 2.5).floor() as i32 % 2 == 0,
        7 => (au - av).abs() <= 0.25,
        8 => (((u + 1.0) * 2.0).floor() as i32 + ((v + 1.0) * 2.0).floor() as i32) % 2 == 0,
        _ => au + av <= 1.0,
    }
}

fn render(class: usize, rng: &mut StdRng, out: &mut Vec<u8>) {
    let size = IMAGE_SIZE as f32;
    let radius = rng.random_range(0.28..0.45) * size;
    let cx = size / 2.0 + rng.random_range(-4.0..4.0);
    let cy = size / 2.0 + rng.random_range(-4.0..4.0);
    let fg: Vec<f32> = COLOURS[class]
        .iter()
        .map(|&c| (f32::from(c) + rng.random_range(-25.0..25.0)).clamp(0.0, 255.0))
        .collect();
    let bg: Vec<f32> = (0..3).map(|_| rng.random_range(0.0..70.0)).collect();
    let mut pixels = vec![0u8; IMAGE_BYTES];
    for y in 0..IMAGE_SIZE {
        for x in 0..IMAGE_SIZE {
            let u = (x as f32 + 0.5 - cx) / radius;
            let v = (y as f32 + 0.5 - cy) / radius;
            let colour = if inside(class, u, v) { &fg } else { &bg };
            for c in 0..3 {
                let noise = rng.random_range(-12.0..12.0);
                pixels[(c * IMAGE_SIZE + y) * IMAGE_SIZE + x] =
                    (colour[c] + noise).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out.extend_from_slice(&pixels);
}

fn split(seed: u64, stream: u64, len: usize) -> Split {
    let mut split = Split {
        images: Vec::with_capacity(len * IMAGE_BYTES),
        labels: Vec::with_capacity(len),
    };
    for index in 0..len {
        let class = index % NUM_CLASSES;
        let mut rng = StdRng::seed_from_u64(mix_seed(seed, stream, index as u64));
        render(class, &mut rng, &mut split.images);
        split.labels.push(class as u8);
    }
    split
}

/// Generates `train_len` training and `test_len` test images, classes in turn.
pub fn generate(seed: u64, train_len: usize, test_len: usize) -> Dataset {
    Dataset {
        kind: DatasetKind::Synthetic,
        source: format!("synthetic shapes, seed {seed}"),
        class_names: CLASS_NAMES.iter().map(|s| (*s).to_string()).collect(),
        train: split(seed, 0x5EED_7AA1, train_len),
        test: split(seed, 0x5EED_7E57, test_len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_for_a_seed_and_differs_across_seeds() {
        let a = generate(1, 50, 20);
        let b = generate(1, 50, 20);
        let c = generate(2, 50, 20);
        assert_eq!(a.train.images, b.train.images);
        assert_eq!(a.test.labels, b.test.labels);
        assert_ne!(a.train.images, c.train.images);
        assert_ne!(a.train.images[..IMAGE_BYTES], a.test.images[..IMAGE_BYTES]);
        assert_eq!(a.train.len(), 50);
        assert_eq!(a.train.images.len(), 50 * IMAGE_BYTES);
    }

    #[test]
    fn every_class_appears_and_shapes_differ() {
        let set = generate(3, 100, 10);
        for class in 0..NUM_CLASSES as u8 {
            assert_eq!(set.train.labels.iter().filter(|&&l| l == class).count(), 10);
        }
        // The shapes cover distinct sets of points of the unit square.
        let grid: Vec<Vec<bool>> = (0..NUM_CLASSES)
            .map(|k| {
                (0..400)
                    .map(|i| {
                        inside(
                            k,
                            (i % 20) as f32 / 10.0 - 0.95,
                            (i / 20) as f32 / 10.0 - 0.95,
                        )
                    })
                    .collect()
            })
            .collect();
        for a in 0..NUM_CLASSES {
            for b in a + 1..NUM_CLASSES {
                assert_ne!(grid[a], grid[b], "classes {a} and {b} draw the same shape");
            }
        }
    }
}

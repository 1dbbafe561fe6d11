//! The augmentation pipeline's image operations on u8 images (3 x 32 x 32, channel-major):
//! TrivialAugment (wide) and random erasing, as torchvision defines them
//! (`TrivialAugmentWide`, 31 magnitude bins, nearest-neighbour sampling, black fill;
//! `RandomErasing` with scale (0.02, 0.33) and ratio (0.3, 3.3)).
//!
//! Every choice is drawn from the caller's RNG, which the batch plan seeds from
//! (seed, step): a resumed run rebuilds exactly the same augmented batches.

use rand::rngs::StdRng;
use rand::Rng;

use crate::config::{CHANNELS, IMAGE_SIZE};

const N: usize = IMAGE_SIZE;
const PLANE: usize = N * N;
/// One image: three planes of N x N bytes.
pub type Image = [u8; CHANNELS * PLANE];

/// torchvision's `num_magnitude_bins` for TrivialAugmentWide.
pub const MAGNITUDE_BINS: usize = 31;

/// The operations TrivialAugment picks from, uniformly, one per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

impl Op {
    pub const ALL: [Op; 14] = [
        Op::Identity,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateX,
        Op::TranslateY,
        Op::Rotate,
        Op::Brightness,
        Op::Color,
        Op::Contrast,
        Op::Sharpness,
        Op::Posterize,
        Op::Solarize,
        Op::AutoContrast,
        Op::Equalize,
    ];

    /// The magnitude of bin `bin` (0..31) in the wide space, and whether its sign is random.
    pub fn magnitude(self, bin: usize) -> (f64, bool) {
        let t = bin as f64 / (MAGNITUDE_BINS - 1) as f64;
        match self {
            Op::Identity | Op::AutoContrast | Op::Equalize => (0.0, false),
            Op::ShearX | Op::ShearY => (0.99 * t, true),
            Op::TranslateX | Op::TranslateY => (32.0 * t, true),
            Op::Rotate => (135.0 * t, true),
            Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => (0.99 * t, true),
            // 8 - round(bin / 5): 8 bits down to 2.
            Op::Posterize => (8.0 - (bin as f64 / 5.0).round(), false),
            Op::Solarize => (255.0 * (1.0 - t), false),
        }
    }
}

/// Draws one operation and magnitude as TrivialAugmentWide does and applies it.
pub fn trivial_augment(img: &mut Image, rng: &mut StdRng) {
    let op = Op::ALL[rng.random_range(0..Op::ALL.len())];
    let bin = rng.random_range(0..MAGNITUDE_BINS);
    let (mut magnitude, signed) = op.magnitude(bin);
    if signed && rng.random_bool(0.5) {
        magnitude = -magnitude;
    }
    apply(op, magnitude, img);
}

/// Applies `op` with `magnitude` (signed where the op is) in place.
pub fn apply(op: Op, magnitude: f64, img: &mut Image) {
    match op {
        Op::Identity => {}
        // Shears about the top-left corner, as torchvision (center = [0, 0]) and PIL do.
        Op::ShearX => warp(img, |x, y| (x + magnitude * y, y), 0.0),
        Op::ShearY => warp(img, |x, y| (x, y + magnitude * x), 0.0),
        Op::TranslateX => {
            let t = magnitude.trunc();
            warp(img, |x, y| (x - t, y), 0.0)
        }
        Op::TranslateY => {
            let t = magnitude.trunc();
            warp(img, |x, y| (x, y - t), 0.0)
        }
        Op::Rotate => {
            // About the image centre, coordinates at pixel centres.
            let (s, c) = magnitude.to_radians().sin_cos();
            let mid = (N as f64 - 1.0) / 2.0;
            warp(
                img,
                |x, y| {
                    let (u, v) = (x - mid, y - mid);
                    (c * u + s * v + mid, -s * u + c * v + mid)
                },
                0.0,
            )
        }
        Op::Brightness => {
            let black = [0u8; CHANNELS * PLANE];
            blend(img, &black, 1.0 + magnitude)
        }
        Op::Color => {
            let gray = grayscale(img);
            let mut other = [0u8; CHANNELS * PLANE];
            for c in 0..CHANNELS {
                other[c * PLANE..(c + 1) * PLANE].copy_from_slice(&gray);
            }
            blend(img, &other, 1.0 + magnitude)
        }
        Op::Contrast => {
            let gray = grayscale(img);
            let mean = gray.iter().map(|&g| f64::from(g)).sum::<f64>() / PLANE as f64;
            let factor = 1.0 + magnitude;
            for v in img.iter_mut() {
                *v = to_u8(factor * f64::from(*v) + (1.0 - factor) * mean);
            }
        }
        Op::Sharpness => {
            let blurred = smooth(img);
            blend(img, &blurred, 1.0 + magnitude)
        }
        Op::Posterize => {
            let bits = magnitude.clamp(0.0, 8.0) as u32;
            let mask = if bits == 0 {
                0
            } else {
                (0xFFu32 << (8 - bits)) as u8
            };
            img.iter_mut().for_each(|v| *v &= mask);
        }
        Op::Solarize => {
            let threshold = magnitude;
            img.iter_mut().for_each(|v| {
                if f64::from(*v) >= threshold {
                    *v = 255 - *v
                }
            });
        }
        Op::AutoContrast => {
            for plane in img.chunks_exact_mut(PLANE) {
                let lo = *plane.iter().min().expect("plane is not empty");
                let hi = *plane.iter().max().expect("plane is not empty");
                if hi > lo {
                    // Multiply first, so the maximum maps to exactly 255.
                    let range = f64::from(hi - lo);
                    plane
                        .iter_mut()
                        .for_each(|v| *v = to_u8(f64::from(*v - lo) * 255.0 / range));
                }
            }
        }
        Op::Equalize => img.chunks_exact_mut(PLANE).for_each(equalize),
    }
}

/// A float result clamped to [0, 255] and truncated, as torchvision converts back to u8.
fn to_u8(v: f64) -> u8 {
    v.clamp(0.0, 255.0) as u8
}

/// Each output pixel (x, y) takes the input pixel nearest to `source(x, y)`, or
/// `fill` outside the image.
fn warp(img: &mut Image, source: impl Fn(f64, f64) -> (f64, f64), fill: f64) {
    let src = *img;
    let fill = to_u8(fill);
    for y in 0..N {
        for x in 0..N {
            let (sx, sy) = source(x as f64, y as f64);
            let (sx, sy) = (sx.round(), sy.round());
            let inside = (0.0..N as f64).contains(&sx) && (0.0..N as f64).contains(&sy);
            for c in 0..CHANNELS {
                img[c * PLANE + y * N + x] = if inside {
                    src[c * PLANE + sy as usize * N + sx as usize]
                } else {
                    fill
                };
            }
        }
    }
}

/// ratio * img + (1 - ratio) * other, clamped and truncated.
fn blend(img: &mut Image, other: &Image, ratio: f64) {
    for (v, &o) in img.iter_mut().zip(other.iter()) {
        *v = to_u8(ratio * f64::from(*v) + (1.0 - ratio) * f64::from(o));
    }
}

/// ITU-R 601-2 luma, truncated to u8 as torchvision does.
fn grayscale(img: &Image) -> [u8; PLANE] {
    let mut gray = [0u8; PLANE];
    for (i, g) in gray.iter_mut().enumerate() {
        let (r, gr, b) = (img[i], img[PLANE + i], img[2 * PLANE + i]);
        *g = to_u8(0.2989 * f64::from(r) + 0.587 * f64::from(gr) + 0.114 * f64::from(b));
    }
    gray
}

/// PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the border pixels kept.
fn smooth(img: &Image) -> Image {
    let mut out = *img;
    for c in 0..CHANNELS {
        let p = &img[c * PLANE..(c + 1) * PLANE];
        for y in 1..N - 1 {
            for x in 1..N - 1 {
                let mut sum = 4 * u32::from(p[y * N + x]);
                for dy in 0..3 {
                    for dx in 0..3 {
                        sum += u32::from(p[(y + dy - 1) * N + x + dx - 1]);
                    }
                }
                out[c * PLANE + y * N + x] = ((f64::from(sum) / 13.0).round()) as u8;
            }
        }
    }
    out
}

/// PIL's histogram equalisation of one channel.
fn equalize(plane: &mut [u8]) {
    let mut hist = [0usize; 256];
    for &v in plane.iter() {
        hist[usize::from(v)] += 1;
    }
    let last = hist.iter().rposition(|&h| h > 0).unwrap_or(0);
    let step = (plane.len() - hist[last]) / 255;
    if step == 0 {
        return;
    }
    let mut lut = [0u8; 256];
    let mut n = step / 2;
    for (i, slot) in lut.iter_mut().enumerate() {
        *slot = (n / step).min(255) as u8;
        n += hist[i];
    }
    plane.iter_mut().for_each(|v| *v = lut[usize::from(*v)]);
}

/// A rectangle (top, left, height, width) to erase, drawn as torchvision's
/// RandomErasing does (up to 10 tries), or None when no try fits.
pub fn erasing_box(rng: &mut StdRng) -> Option<(usize, usize, usize, usize)> {
    let area = PLANE as f64;
    let (log_lo, log_hi) = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(0.02..0.33);
        let aspect = rng.random_range(log_lo..log_hi).exp();
        let h = (target * aspect).sqrt().round() as usize;
        let w = (target / aspect).sqrt().round() as usize;
        if h < N && w < N && h > 0 && w > 0 {
            let top = rng.random_range(0..=N - h);
            let left = rng.random_range(0..=N - w);
            return Some((top, left, h, w));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A test image whose value encodes channel, row and column.
    fn ramp() -> Image {
        let mut img = [0u8; CHANNELS * PLANE];
        for c in 0..CHANNELS {
            for y in 0..N {
                for x in 0..N {
                    img[c * PLANE + y * N + x] = (c * 80 + y * 2 + x) as u8;
                }
            }
        }
        img
    }

    fn at(img: &Image, c: usize, y: usize, x: usize) -> u8 {
        img[c * PLANE + y * N + x]
    }

    fn constant(values: [u8; 3]) -> Image {
        let mut img = [0u8; CHANNELS * PLANE];
        for c in 0..CHANNELS {
            img[c * PLANE..(c + 1) * PLANE].fill(values[c]);
        }
        img
    }

    #[test]
    fn magnitudes_span_the_wide_space() {
        assert_eq!(Op::ShearX.magnitude(30), (0.99, true));
        assert_eq!(Op::TranslateY.magnitude(15), (16.0, true));
        assert_eq!(Op::Rotate.magnitude(30), (135.0, true));
        assert_eq!(Op::Posterize.magnitude(0).0, 8.0);
        assert_eq!(Op::Posterize.magnitude(30).0, 2.0);
        assert_eq!(Op::Solarize.magnitude(0).0, 255.0);
        assert_eq!(Op::Solarize.magnitude(30).0, 0.0);
        assert_eq!(Op::Equalize.magnitude(7), (0.0, false));
    }

    #[test]
    fn identity_and_zero_magnitudes_leave_the_image() {
        let src = ramp();
        for op in Op::ALL {
            if matches!(op, Op::AutoContrast | Op::Equalize | Op::Solarize) {
                continue;
            }
            let mut img = src;
            let zero = if op == Op::Posterize { 8.0 } else { 0.0 };
            apply(op, zero, &mut img);
            assert_eq!(img, src, "{op:?} at magnitude {zero}");
        }
    }

    #[test]
    fn translations_move_pixels_and_fill_black() {
        let src = ramp();
        let mut img = src;
        apply(Op::TranslateX, 3.7, &mut img); // truncated to 3 pixels right
        assert_eq!(at(&img, 1, 5, 10), at(&src, 1, 5, 7));
        assert_eq!(at(&img, 1, 5, 2), 0);
        let mut img = src;
        apply(Op::TranslateY, -2.0, &mut img); // 2 pixels up
        assert_eq!(at(&img, 2, 4, 9), at(&src, 2, 6, 9));
        assert_eq!(at(&img, 2, 31, 9), 0);
    }

    #[test]
    fn shears_are_about_the_top_left_corner() {
        let src = ramp();
        let mut img = src;
        apply(Op::ShearX, 0.5, &mut img);
        // Row 0 stays; row 10 samples 5 pixels to the right.
        assert_eq!(at(&img, 0, 0, 7), at(&src, 0, 0, 7));
        assert_eq!(at(&img, 0, 10, 7), at(&src, 0, 10, 12));
        assert_eq!(at(&img, 0, 10, 30), 0);
        let mut img = src;
        apply(Op::ShearY, 0.5, &mut img);
        assert_eq!(at(&img, 1, 7, 10), at(&src, 1, 12, 10));
    }

    #[test]
    fn rotation_by_90_degrees_turns_the_image() {
        let src = ramp();
        let mut img = src;
        apply(Op::Rotate, 90.0, &mut img);
        // Output (x, y) samples (y, 31 - x): a quarter turn, nothing lost.
        for y in 0..N {
            for x in 0..N {
                assert_eq!(at(&img, 0, y, x), at(&src, 0, N - 1 - x, y), "({x}, {y})");
            }
        }
        let mut img = src;
        apply(Op::Rotate, 45.0, &mut img);
        assert_eq!(at(&img, 0, 0, 0), 0, "corners leave the image");
        assert_eq!(
            at(&img, 0, 16, 16),
            at(&src, 0, 16, 16),
            "near the centre it stays"
        );
    }

    #[test]
    fn colour_ops_follow_their_formulas() {
        let mut img = constant([100, 200, 50]);
        apply(Op::Brightness, 0.5, &mut img);
        assert_eq!(
            (at(&img, 0, 3, 3), at(&img, 1, 3, 3), at(&img, 2, 3, 3)),
            (150, 255, 75)
        );
        let mut img = constant([100, 200, 50]);
        apply(Op::Color, -1.0, &mut img); // fully grey: 0.2989*100 + 0.587*200 + 0.114*50 = 152.99
        assert_eq!(
            (at(&img, 0, 0, 0), at(&img, 1, 0, 0), at(&img, 2, 0, 0)),
            (152, 152, 152)
        );
        // Contrast blends towards the mean grey level of the whole image.
        let mut img = constant([100, 200, 50]);
        apply(Op::Contrast, -0.5, &mut img); // 0.5 * v + 0.5 * 152
        assert_eq!(
            (at(&img, 0, 0, 0), at(&img, 1, 0, 0), at(&img, 2, 0, 0)),
            (126, 176, 101)
        );
        let mut img = constant([0b1011_0111, 0b0000_1111, 255]);
        apply(Op::Posterize, 2.0, &mut img);
        assert_eq!(
            (at(&img, 0, 0, 0), at(&img, 1, 0, 0), at(&img, 2, 0, 0)),
            (0b1000_0000, 0, 0b1100_0000)
        );
        let mut img = constant([10, 128, 200]);
        apply(Op::Solarize, 128.0, &mut img);
        assert_eq!(
            (at(&img, 0, 0, 0), at(&img, 1, 0, 0), at(&img, 2, 0, 0)),
            (10, 127, 55)
        );
    }

    #[test]
    fn sharpness_changes_only_the_inside_around_edges() {
        let mut src = constant([50, 50, 50]);
        src[16 * N + 16] = 250; // one bright dot in red
        let mut img = src;
        apply(Op::Sharpness, -1.0, &mut img); // fully smoothed
                                              // The dot: (5*250 + 8*50) / 13 = 126.9; its neighbour (250 + 12*50) / 13 = 65.4.
        assert_eq!(at(&img, 0, 16, 16), 127);
        assert_eq!(at(&img, 0, 16, 17), 65);
        assert_eq!(at(&img, 1, 16, 16), 50);
        let mut img = src;
        apply(Op::Sharpness, 0.5, &mut img); // 1.5 * v - 0.5 * smoothed, clamped
        assert_eq!(at(&img, 0, 16, 16), 255);
        assert_eq!(at(&img, 0, 16, 17), 42);
        let mut edge = src;
        edge[0] = 250;
        apply(Op::Sharpness, -1.0, &mut edge);
        assert_eq!(edge[0], 250, "border pixels are kept");
    }

    #[test]
    fn autocontrast_and_equalize_stretch_each_channel() {
        let mut img = ramp();
        // Red spans 0..=93: stretched to 0..=255.
        apply(Op::AutoContrast, 0.0, &mut img);
        assert_eq!(at(&img, 0, 0, 0), 0);
        assert_eq!(at(&img, 0, 31, 31), 255);
        assert_eq!(at(&img, 0, 0, 31), (31.0 * 255.0 / 93.0) as u8);
        let flat = constant([7, 7, 7]);
        let mut img = flat;
        apply(Op::AutoContrast, 0.0, &mut img);
        assert_eq!(img, flat, "a constant channel is kept");

        // Half the pixels 10, half 20: PIL's step is (1024 - 512) / 255 = 2, so 10 -> 1 / 2 = 0
        // and 20 -> (1 + 512) / 2, clipped to 255.
        let mut plane = [10u8; PLANE];
        plane[PLANE / 2..].fill(20);
        plane[PLANE - 1] = 15;
        equalize(&mut plane);
        assert_eq!(
            (plane[0], plane[PLANE - 1], plane[PLANE - 2]),
            (0, 255, 255)
        );
        let mut img = flat;
        apply(Op::Equalize, 0.0, &mut img);
        assert_eq!(img, flat, "a constant channel is kept");
    }

    #[test]
    fn draws_are_reproducible_from_the_seed() {
        let src = ramp();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..20)
                .map(|_| {
                    let mut img = src;
                    trivial_augment(&mut img, &mut rng);
                    (img, erasing_box(&mut rng))
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        // Over many draws every op changes some image and erasing boxes stay inside.
        let mut rng = StdRng::seed_from_u64(1);
        let mut changed = 0;
        for _ in 0..200 {
            let mut img = src;
            trivial_augment(&mut img, &mut rng);
            changed += usize::from(img != src);
            if let Some((top, left, h, w)) = erasing_box(&mut rng) {
                assert!(top + h <= N && left + w <= N);
                let share = (h * w) as f64 / PLANE as f64;
                assert!((0.01..0.4).contains(&share), "area share {share}");
            }
        }
        assert!(changed > 150, "only {changed} of 200 images changed");
    }
}

//! Colour and smoothing below both the dashboard and the exporter: the heat and signed
//! ramps (and their 256-colour steps, chosen in OKLab), a raw CIFAR image's pixels and
//! TensorBoard's smoothing. `ui/` and `export/` both draw with these, so a PNG shows
//! the colours and curves the screen does, and neither folder imports the other.

use crate::config::IMAGE_SIZE;

/// One sRGB colour.
pub type Rgb = (u8, u8, u8);

/// TensorBoard's smoothing: an exponential moving average, debiased for its start
/// (so the first values are not pulled towards zero). Non-finite values are skipped
/// (the previous smoothed value is repeated).
pub fn debiased_ema(values: &[f64], smoothing: f64) -> Vec<f64> {
    let w = smoothing.clamp(0.0, 0.999_999);
    let mut last = 0.0;
    let mut count = 0i32;
    let mut out = Vec::with_capacity(values.len());
    for &v in values {
        if v.is_finite() {
            last = last * w + (1.0 - w) * v;
            count += 1;
        }
        let debias = 1.0 - w.powi(count);
        out.push(if count == 0 { f64::NAN } else { last / debias });
    }
    out
}

/// The RGB pixel (x, y) of a raw CIFAR image (3 planes of 32 x 32 bytes).
pub fn image_pixel(pixels: &[u8], x: usize, y: usize) -> Rgb {
    let plane = IMAGE_SIZE * IMAGE_SIZE;
    let i = y * IMAGE_SIZE + x;
    (pixels[i], pixels[plane + i], pixels[2 * plane + i])
}

/// The heat ramp at `level` in [0, 1].
pub fn heat_rgb(level: f64) -> Rgb {
    colorous::VIRIDIS.eval_continuous(level).as_tuple()
}

/// The signed ramp at `level` in [0, 1] (value -1 at 0, 0 at 0.5, +1 at 1): from a dark
/// grey at the middle towards blue below and red above, linear in OKLab so that equal
/// steps look equal.
pub fn signed_rgb(level: f64) -> Rgb {
    const MIDDLE: Rgb = (30, 30, 30);
    const BLUE: Rgb = (60, 130, 255);
    const RED: Rgb = (255, 80, 60);
    let v = level * 2.0 - 1.0;
    let end = if v < 0.0 { BLUE } else { RED };
    let (a, b) = (oklab(MIDDLE), oklab(end));
    let w = v.abs();
    from_oklab([0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * w))
}

/// Steps of a ramp in 256 colours. The nearest fixed colour to each point of viridis
/// gives only 12 different ones (the 6x6x6 cube is coarse in the dark blues and
/// greens), so each step takes the nearest colour (in OKLab) not used yet that is
/// lighter than the step before: every step distinct, and lightness still rising.
/// More steps than 18 start to wander off the ramp's hue.
pub const PALETTE_STEPS: usize = 18;

/// A ramp's steps in 256 colours, from level 0 to level 1.
pub fn palette_steps(ramp: fn(f64) -> Rgb, steps: usize) -> Vec<u8> {
    // 16..=255: the 6x6x6 cube and the grey ramp; 0..=15 are left out because
    // terminals theme them.
    let mut palette: Vec<(u8, [f64; 3])> = (16..=255u8).map(|i| (i, oklab(xterm_rgb(i)))).collect();
    let mut chosen = Vec::with_capacity(steps);
    let mut last_lightness = f64::NEG_INFINITY;
    for i in 0..steps {
        let target = oklab(ramp(i as f64 / (steps - 1).max(1) as f64));
        let distance = |c: &[f64; 3]| (0..3).map(|k| (c[k] - target[k]).powi(2)).sum::<f64>();
        let best = palette
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| c[0] > last_lightness)
            .min_by(|a, b| distance(&a.1 .1).total_cmp(&distance(&b.1 .1)))
            .map(|(at, _)| at);
        let Some(at) = best else { break };
        let (index, colour) = palette.swap_remove(at);
        last_lightness = colour[0];
        chosen.push(index);
    }
    chosen
}

/// The step of `level` in [0, 1] among `steps`.
pub fn step_of(level: f64, steps: &[u8]) -> u8 {
    let i = ((level * steps.len() as f64) as usize).min(steps.len().saturating_sub(1));
    steps.get(i).copied().unwrap_or(16)
}

/// The signed ramp in 256 colours: steps outward from the middle each way, so that
/// lightness rises with |value| on both sides.
pub fn signed_steps() -> (Vec<u8>, Vec<u8>) {
    let half = PALETTE_STEPS / 2;
    let negative = palette_steps(|t| signed_rgb(0.5 - t / 2.0), half);
    let positive = palette_steps(|t| signed_rgb(0.5 + t / 2.0), half);
    (negative, positive)
}

/// The RGB value of xterm colour `index` (16..=255).
pub fn xterm_rgb(index: u8) -> Rgb {
    const CUBE: [u8; 6] = [0, 95, 135, 175, 215, 255];
    if index >= 232 {
        let v = 8 + 10 * (index - 232);
        (v, v, v)
    } else {
        let i = usize::from(index.saturating_sub(16));
        (CUBE[i / 36], CUBE[i / 6 % 6], CUBE[i % 6])
    }
}

/// sRGB to OKLab (Björn Ottosson's).
pub fn oklab((r, g, b): Rgb) -> [f64; 3] {
    let linear = |c: u8| {
        let c = f64::from(c) / 255.0;
        if c <= 0.04045 {
            c / 12.92
        } else {
            ((c + 0.055) / 1.055).powf(2.4)
        }
    };
    let (r, g, b) = (linear(r), linear(g), linear(b));
    let l = (0.412_221_470_8 * r + 0.536_332_536_3 * g + 0.051_445_992_9 * b).cbrt();
    let m = (0.211_903_498_2 * r + 0.680_699_545_1 * g + 0.107_396_956_6 * b).cbrt();
    let s = (0.088_302_461_9 * r + 0.281_718_837_6 * g + 0.629_978_700_5 * b).cbrt();
    [
        0.210_454_255_3 * l + 0.793_617_785 * m - 0.004_072_046_8 * s,
        1.977_998_495_1 * l - 2.428_592_205 * m + 0.450_593_709_9 * s,
        0.025_904_037_1 * l + 0.782_771_766_2 * m - 0.808_675_766 * s,
    ]
}

/// OKLab to sRGB, clamped to the gamut.
pub fn from_oklab([l, a, b]: [f64; 3]) -> Rgb {
    let l_ = (l + 0.396_337_777_4 * a + 0.215_803_757_3 * b).powi(3);
    let m_ = (l - 0.105_561_345_8 * a - 0.063_854_172_8 * b).powi(3);
    let s_ = (l - 0.089_484_177_5 * a - 1.291_485_548 * b).powi(3);
    let to_srgb = |c: f64| {
        let c = c.clamp(0.0, 1.0);
        let v = if c <= 0.003_130_8 {
            12.92 * c
        } else {
            1.055 * c.powf(1.0 / 2.4) - 0.055
        };
        (v * 255.0).round().clamp(0.0, 255.0) as u8
    };
    (
        to_srgb(4.076_741_662_1 * l_ - 3.307_711_591_3 * m_ + 0.230_969_929_2 * s_),
        to_srgb(-1.268_438_004_6 * l_ + 2.609_757_401_1 * m_ - 0.341_319_396_5 * s_),
        to_srgb(-0.004_196_086_3 * l_ - 0.703_418_614_7 * m_ + 1.707_614_701 * s_),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oklab_round_trips_and_the_palette_is_xterms() {
        for c in [(0, 0, 0), (255, 255, 255), (30, 30, 30), (200, 10, 90)] {
            assert_eq!(from_oklab(oklab(c)), c);
        }
        assert_eq!(xterm_rgb(16), (0, 0, 0));
        assert_eq!(xterm_rgb(196), (255, 0, 0));
        assert_eq!(xterm_rgb(231), (255, 255, 255));
        assert_eq!(xterm_rgb(232), (8, 8, 8));
        assert_eq!(xterm_rgb(255), (238, 238, 238));
    }

    #[test]
    fn ema_is_debiased_and_skips_nan() {
        assert!(debiased_ema(&[], 0.6).is_empty());
        // The first smoothed value is the first value itself, not 0.4 of it.
        let s = debiased_ema(&[2.0, 4.0], 0.5);
        assert!((s[0] - 2.0).abs() < 1e-12);
        // (0.5 * (0.5 * 2) + 0.5 * 4) / (1 - 0.25) = (0.5 + 2) / 0.75
        assert!((s[1] - 2.5 / 0.75).abs() < 1e-12);
        let s = debiased_ema(&[f64::NAN, 1.0, f64::INFINITY, 3.0], 0.0);
        assert!(s[0].is_nan());
        assert_eq!(&s[1..], &[1.0, 1.0, 3.0]);
        assert!(debiased_ema(&[5.0; 4], 0.9)
            .iter()
            .all(|v| (v - 5.0).abs() < 1e-12));
    }
}

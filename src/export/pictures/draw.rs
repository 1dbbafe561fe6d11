//! What every still shares: the signed colour scale, a canvas as a PNG picture, a raw
//! image drawn at a scale, colour bars, and the checks and labels of a chosen image
//! and token.

use crate::config::IMAGE_SIZE;
use crate::export::canvas::{Canvas, Rgb, BLACK, GREY};
use crate::export::request::{Choice, ExportError, Picture};
use crate::inspect::probe::{ProbeMeta, ProbeSnapshot};
use crate::palette::{image_pixel, signed_rgb};

/// A value in [-1, 1] on the signed scale (blue, dark grey, red).
pub(super) fn signed(v: f64) -> Rgb {
    signed_rgb((v.clamp(-1.0, 1.0) + 1.0) / 2.0)
}

pub(super) fn png(file: String, caption: String, c: &Canvas) -> Result<Picture, ExportError> {
    Ok(Picture {
        file,
        caption,
        bytes: c.png()?,
        width: c.width,
        height: c.height,
        frames: 1,
        duration_cs: 0,
    })
}

/// A raw image with each pixel a `scale` x `scale` square.
pub fn draw_image(c: &mut Canvas, image: &[u8], (x0, y0): (i64, i64), scale: i64) {
    for y in 0..IMAGE_SIZE {
        for x in 0..IMAGE_SIZE {
            let p = image_pixel(image, x, y);
            c.fill(
                x0 + x as i64 * scale,
                y0 + y as i64 * scale,
                scale,
                scale,
                p,
            );
        }
    }
}

/// A vertical colour bar from `ramp(0)` (bottom) to `ramp(1)` (top) with end labels.
pub(super) fn colour_bar(
    c: &mut Canvas,
    (x, y, w, h): (i64, i64, i64, i64),
    ramp: impl Fn(f64) -> Rgb,
    (lo, hi): (&str, &str),
) {
    for i in 0..h {
        c.fill(x, y + i, w, 1, ramp(1.0 - i as f64 / (h - 1).max(1) as f64));
    }
    c.frame(x - 1, y - 1, w + 2, h + 2, GREY);
    c.text(x + w + 6, y, hi, 1, BLACK);
    c.text(x + w + 6, y + h - 8, lo, 1, BLACK);
}

pub(super) fn check_image(probe: &ProbeSnapshot, choice: &Choice) -> Result<usize, ExportError> {
    let images = probe.meta.images;
    if choice.image >= images {
        return Err(ExportError::Request(format!(
            "--image {}: the probes hold {images} images (0 to {})",
            choice.image,
            images.saturating_sub(1)
        )));
    }
    Ok(choice.image)
}

pub(super) fn token_label(m: &ProbeMeta, token: usize) -> String {
    if m.cls && token == 0 {
        "CLS".into()
    } else {
        format!("p{}", token - m.first_patch())
    }
}

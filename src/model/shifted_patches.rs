//! Shifted patch tokenisation (Lee et al. 2021, "Vision Transformer for Small-Size
//! Datasets"), `model.patch_tokens = "shifted"`: a token is made of its patch and the
//! same patch of four copies of the image shifted by half a patch toward each
//! diagonal, so that each token already holds a border of its neighbours' pixels when
//! attention first mixes tokens (a plain ViT token knows nothing outside its patch); a
//! LayerNorm over those values comes before the linear embedding. Composed from candle
//! ops, so autograd differentiates it; the images need no gradient.

use candle_core::{Result, Tensor};

/// The four diagonal shifts (rows, columns) in units of the shift, in the order the
/// copies follow the image: up-left, up-right, down-left, down-right. Copy (dy, dx)
/// holds at (y, x) the image's pixel (y − dy·s, x − dx·s): "up" moves the content up.
pub const SHIFTS: [(isize, isize); 4] = [(-1, -1), (-1, 1), (1, -1), (1, 1)];

/// The image and its four shifted copies along the channels: (B, C, H, W) to
/// (B, 5C, H, W), the image first, then the copies in [`SHIFTS`]' order; pixels that
/// a copy moved in from outside the image are zero.
pub fn shifted_copies(images: &Tensor, shift: usize) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    let padded = images
        .pad_with_zeros(2, shift, shift)?
        .pad_with_zeros(3, shift, shift)?;
    // Padded (y + s − dy·s, x + s − dx·s) is the image's (y − dy·s, x − dx·s).
    let start = |d: isize| (shift as isize - d * shift as isize) as usize;
    let mut copies = vec![images.clone()];
    for (dy, dx) in SHIFTS {
        copies.push(padded.narrow(2, start(dy), h)?.narrow(3, start(dx), w)?);
    }
    Tensor::cat(&copies, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn each_copy_holds_the_image_moved_diagonally_with_zeros_moved_in() {
        let (c, h, w, s) = (2usize, 5usize, 6usize, 2usize);
        let values: Vec<f32> = (0..c * h * w).map(|i| i as f32 + 1.0).collect();
        let images = Tensor::from_vec(values.clone(), (1, c, h, w), &Device::Cpu).unwrap();
        let out = shifted_copies(&images, s).unwrap();
        assert_eq!(out.dims(), [1, 5 * c, h, w]);
        let out: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        let at =
            |copy: usize, ch: usize, y: usize, x: usize| out[((copy * c + ch) * h + y) * w + x];
        let image = |ch: usize, y: isize, x: isize| -> f32 {
            match (0..h as isize).contains(&y) && (0..w as isize).contains(&x) {
                true => values[(ch * h + y as usize) * w + x as usize],
                false => 0.0,
            }
        };
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    assert_eq!(at(0, ch, y, x), image(ch, y as isize, x as isize));
                    for (k, (dy, dx)) in SHIFTS.iter().enumerate() {
                        let (sy, sx) = (y as isize - dy * s as isize, x as isize - dx * s as isize);
                        assert_eq!(
                            at(k + 1, ch, y, x),
                            image(ch, sy, sx),
                            "copy {k} at {y},{x}"
                        );
                    }
                }
            }
        }
        // Up-left: the content moved up and left, so the last rows and columns are zero.
        assert_eq!(at(1, 0, h - 1, 0), 0.0);
        assert_eq!(at(1, 0, 0, 0), image(0, 2, 2));
    }
}

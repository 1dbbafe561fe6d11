//! Stochastic depth (Huang et al. 2016; "drop path" in timm and DeiT): while training,
//! each image skips each residual branch (attention, MLP) of a block with that block's
//! rate, and a kept branch is scaled by 1/(1 - rate) so that the expected output is
//! unchanged. The rate grows linearly from 0 at the first block to `train.drop_path` at
//! the last. Evaluation and probes use every branch.
//!
//! The masks are a function of (seed, step, block, branch, image index in the batch)
//! only, so a step is the same however its batch is cut into micro-batches or spread
//! over the lanes, and a resumed run drops what the uninterrupted one dropped.

use candle_core::{DType, Device, Result, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::data::mix_seed;

/// Stream tag of the drop-path masks in [`mix_seed`].
const DROP_PATH_STREAM: u64 = 0xD809;

/// One training step's stochastic depth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropPath {
    /// The last block's rate (`train.drop_path`).
    pub rate: f64,
    /// Seeds this step's masks: the run's seed mixed with the step.
    pub seed: u64,
}

/// Which residual branch of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    Attention = 0,
    Mlp = 1,
}

impl DropPath {
    /// The drop path of step `step` (1-based) of a run seeded with `seed`; none at rate 0.
    pub fn for_step(rate: f64, seed: u64, step: u64) -> Option<Self> {
        (rate > 0.0).then(|| Self {
            rate,
            seed: mix_seed(seed, DROP_PATH_STREAM, step),
        })
    }

    /// Block `block`'s rate of `depth`: 0 for the first, `rate` for the last, linear
    /// between (timm's `linspace(0, rate, depth)`).
    pub fn block_rate(&self, block: usize, depth: usize) -> f64 {
        match depth {
            0 | 1 => self.rate,
            _ => self.rate * block as f64 / (depth - 1) as f64,
        }
    }

    /// Per image of `images` (indices into the step's batch): 0 where the branch is
    /// dropped, 1 / (1 - p) where it is kept, at block rate `p`.
    pub fn scales(
        &self,
        block: usize,
        branch: Branch,
        p: f64,
        images: std::ops::Range<usize>,
    ) -> Vec<f64> {
        images
            .map(|i| {
                let stream = (block as u64) << 1 | branch as u64;
                let mut rng = StdRng::seed_from_u64(mix_seed(self.seed, stream, i as u64));
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    1.0 / (1.0 - p)
                }
            })
            .collect()
    }

    /// [`DropPath::scales`] as a (images, 1, 1) tensor to multiply a branch's output by.
    pub fn mask(
        &self,
        (block, branch, p): (usize, Branch, f64),
        images: std::ops::Range<usize>,
        dtype: DType,
    ) -> Result<Tensor> {
        let n = images.len();
        Tensor::from_vec(
            self.scales(block, branch, p, images),
            (n, 1, 1),
            &Device::Cpu,
        )?
        .to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_grow_linearly_to_the_last_block() {
        let d = DropPath::for_step(0.2, 1, 1).unwrap();
        let rates: Vec<f64> = (0..5).map(|b| d.block_rate(b, 5)).collect();
        for (got, want) in rates.iter().zip([0.0, 0.05, 0.1, 0.15, 0.2]) {
            assert!((got - want).abs() < 1e-12, "{rates:?}");
        }
        assert_eq!(DropPath::for_step(0.0, 1, 1), None);
    }

    #[test]
    fn masks_drop_at_the_rate_scale_the_rest_and_do_not_depend_on_the_split() {
        let d = DropPath::for_step(0.3, 42, 7).unwrap();
        let all = d.scales(2, Branch::Mlp, 0.3, 0..20_000);
        let dropped = all.iter().filter(|&&s| s == 0.0).count() as f64 / all.len() as f64;
        assert!((dropped - 0.3).abs() < 0.015, "{dropped}");
        assert!(all
            .iter()
            .all(|&s| s == 0.0 || (s - 1.0 / 0.7).abs() < 1e-12));
        // The mean scale is 1: the expected branch output is unchanged.
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
        // Image i's mask is the same in any micro-batch that holds it.
        assert_eq!(
            d.scales(2, Branch::Mlp, 0.3, 100..132),
            all[100..132].to_vec()
        );
        // Branches, blocks and steps draw differently; the same step draws the same.
        assert_ne!(
            d.scales(2, Branch::Attention, 0.3, 0..64),
            all[..64].to_vec()
        );
        assert_ne!(d.scales(3, Branch::Mlp, 0.3, 0..64), all[..64].to_vec());
        let next = DropPath::for_step(0.3, 42, 8).unwrap();
        assert_ne!(next.scales(2, Branch::Mlp, 0.3, 0..64), all[..64].to_vec());
        let again = DropPath::for_step(0.3, 42, 7).unwrap();
        assert_eq!(again.scales(2, Branch::Mlp, 0.3, 0..64), all[..64].to_vec());
    }
}

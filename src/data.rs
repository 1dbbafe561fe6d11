//! Data sets held as bytes (u8, 3 x 32 x 32, channel-major), turned into normalised
//! f32 batches one batch at a time, with seeded augmentation.
//!
//! Here the map and the one entry point ([`Dataset::load`]): what a data set is lives
//! in `dataset.rs`, the loaders in `cifar.rs`, `download.rs` and `synthetic.rs`, the
//! batches and their augmentation in `batch.rs` and `augment.rs`.

pub mod augment;
pub mod batch;
pub mod cifar;
mod dataset;
pub mod download;
pub mod synthetic;

pub use dataset::{
    mix_seed, DataError, Dataset, LoadProgress, Split, CIFAR10_CLASSES, IMAGE_BYTES, NUM_CLASSES,
};

use crate::config::{Config, DatasetKind};

impl Dataset {
    /// Loads the configured data set, downloading CIFAR-10 if allowed and needed.
    pub fn load(
        config: &Config,
        progress: &mut dyn FnMut(LoadProgress),
    ) -> Result<Self, DataError> {
        match config.data.dataset {
            DatasetKind::Synthetic => Ok(synthetic::generate(
                config.train.seed,
                config.data.synthetic_train_size,
                config.data.synthetic_test_size,
            )),
            DatasetKind::Cifar10 => {
                let dir = download::locate_or_download(&config.data, progress)?;
                cifar::load_dir(&dir, progress)
            }
        }
    }
}

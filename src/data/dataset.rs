//! What a data set is, in memory: splits of raw image bytes with their labels, the
//! class names, the errors and progress of loading, and the seeded hash every random
//! stream of the data pipeline derives from. Kept apart from the loaders so they share
//! it without importing the folder's map.

use std::path::PathBuf;

use crate::config::{DatasetKind, CHANNELS, IMAGE_SIZE};

/// Bytes of one image: 3 channels of 32 x 32, red plane first, rows top to bottom.
pub const IMAGE_BYTES: usize = CHANNELS * IMAGE_SIZE * IMAGE_SIZE;
/// Classes of both data sets.
pub const NUM_CLASSES: usize = 10;

pub const CIFAR10_CLASSES: [&str; NUM_CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("download of {url} failed: {reason}. Point --data-dir at a folder holding cifar-10-batches-bin/ (or set data.dir), or try --dataset synthetic")]
    Download { url: String, reason: String },
    #[error("no CIFAR-10 data in {dir} and data.download = false. Point --data-dir at a folder holding cifar-10-batches-bin/, or try --dataset synthetic")]
    NotFound { dir: PathBuf },
    #[error("{0}")]
    Other(String),
}

impl DataError {
    pub fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::File {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// One split: `labels[i]` belongs to `images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]`.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image(&self, index: usize) -> &[u8] {
        &self.images[index * IMAGE_BYTES..(index + 1) * IMAGE_BYTES]
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub kind: DatasetKind,
    /// Where the data came from, for the user.
    pub source: String,
    pub class_names: Vec<String>,
    pub train: Split,
    pub test: Split,
}

/// What data loading reports while it works (a download can take minutes).
#[derive(Debug, Clone, PartialEq)]
pub enum LoadProgress {
    Downloading { done: u64, total: u64 },
    Unpacking,
    Reading { file: String },
    Message(String),
}

/// A well-mixed 64-bit hash of a seed and counters, so that every epoch's order and
/// every step's augmentation has its own reproducible random stream (SplitMix64).
pub fn mix_seed(seed: u64, stream: u64, counter: u64) -> u64 {
    let mut z = seed
        .wrapping_add(stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(counter.wrapping_mul(0xD1B5_4A32_D192_ED03));
    for _ in 0..2 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    z
}

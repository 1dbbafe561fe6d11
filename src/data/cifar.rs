//! CIFAR-10 in its official binary layout (`cifar-10-batches-bin/`).
//!
//! candle-datasets' `vision::cifar::load_dir` reads the same layout but keeps the whole
//! set as f32 (737 MB) and reports a short file as a bare I/O error; this reader keeps
//! bytes (184 MB) and names the file and what was expected. The tests check that both
//! readers see the same pixels and labels.

use std::path::{Path, PathBuf};

use super::dataset::{
    DataError, Dataset, LoadProgress, Split, CIFAR10_CLASSES, IMAGE_BYTES, NUM_CLASSES,
};
use crate::config::DatasetKind;

/// Folder name inside the official archive.
pub const LAYOUT_DIR: &str = "cifar-10-batches-bin";
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";
pub const RECORDS_PER_FILE: usize = 10_000;
/// One label byte, then the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
pub const FILE_BYTES: usize = RECORDS_PER_FILE * RECORD_BYTES;

/// The user cache folder: `$XDG_CACHE_HOME/vitscope` or `~/.cache/vitscope`.
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("vitscope")
}

/// The folder holding the `.bin` files under `dir`: `dir/cifar-10-batches-bin` or `dir` itself.
pub fn find_layout(dir: &Path) -> Option<PathBuf> {
    let nested = dir.join(LAYOUT_DIR);
    [nested, dir.to_path_buf()]
        .into_iter()
        .find(|d| d.join(TEST_FILE).exists() || d.join(TRAIN_FILES[0]).exists())
}

/// Reads one batch file: checks its size and every label byte.
pub fn read_batch_file(path: &Path) -> Result<Split, DataError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        DataError::file(
            path,
            format!(
                "cannot open ({e}); expected a CIFAR-10 binary batch file of {FILE_BYTES} bytes"
            ),
        )
    })?;
    if meta.len() != FILE_BYTES as u64 {
        return Err(DataError::file(
            path,
            format!(
                "size {} bytes, expected {FILE_BYTES} ({RECORDS_PER_FILE} records of 1 label byte \
                 + {IMAGE_BYTES} pixel bytes); the file is truncated or not CIFAR-10 binary",
                meta.len()
            ),
        ));
    }
    let raw =
        std::fs::read(path).map_err(|e| DataError::file(path, format!("cannot read: {e}")))?;
    if raw.len() != FILE_BYTES {
        return Err(DataError::file(
            path,
            format!("read {} bytes, expected {FILE_BYTES}", raw.len()),
        ));
    }
    let mut split = Split {
        images: Vec::with_capacity(RECORDS_PER_FILE * IMAGE_BYTES),
        labels: Vec::with_capacity(RECORDS_PER_FILE),
    };
    for (index, record) in raw.chunks_exact(RECORD_BYTES).enumerate() {
        let label = record[0];
        if usize::from(label) >= NUM_CLASSES {
            return Err(DataError::file(
                path,
                format!(
                    "record {index} (byte offset {}) has label byte {label}, expected 0..=9",
                    index * RECORD_BYTES
                ),
            ));
        }
        split.labels.push(label);
        split.images.extend_from_slice(&record[1..]);
    }
    Ok(split)
}

fn class_names(dir: &Path) -> Vec<String> {
    let from_meta: Vec<String> = std::fs::read_to_string(dir.join("batches.meta.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if from_meta.len() == NUM_CLASSES {
        from_meta
    } else {
        CIFAR10_CLASSES.iter().map(|s| (*s).to_string()).collect()
    }
}

/// Loads the five training files and the test file from `dir`.
pub fn load_dir(dir: &Path, progress: &mut dyn FnMut(LoadProgress)) -> Result<Dataset, DataError> {
    let mut train = Split {
        images: Vec::with_capacity(TRAIN_FILES.len() * RECORDS_PER_FILE * IMAGE_BYTES),
        labels: Vec::with_capacity(TRAIN_FILES.len() * RECORDS_PER_FILE),
    };
    for name in TRAIN_FILES {
        progress(LoadProgress::Reading { file: name.into() });
        let part = read_batch_file(&dir.join(name))?;
        train.images.extend_from_slice(&part.images);
        train.labels.extend_from_slice(&part.labels);
    }
    progress(LoadProgress::Reading {
        file: TEST_FILE.into(),
    });
    let test = read_batch_file(&dir.join(TEST_FILE))?;
    Ok(Dataset {
        kind: DatasetKind::Cifar10,
        source: dir.display().to_string(),
        class_names: class_names(dir),
        train,
        test,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a full-size layout whose image i of file f has pixels derived from (f, i).
    pub(crate) fn write_layout(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        for (f, name) in TRAIN_FILES.iter().chain([&TEST_FILE]).enumerate() {
            let mut bytes = Vec::with_capacity(FILE_BYTES);
            for i in 0..RECORDS_PER_FILE {
                bytes.push(((i + f) % NUM_CLASSES) as u8);
                bytes.extend((0..IMAGE_BYTES).map(|p| ((p * 7 + i * 13 + f) % 256) as u8));
            }
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    #[test]
    fn reads_the_layout_like_candle_datasets_does() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(LAYOUT_DIR);
        write_layout(&dir);
        let ours = load_dir(&dir, &mut |_| {}).unwrap();
        assert_eq!(ours.train.len(), 50_000);
        assert_eq!(ours.test.len(), 10_000);
        assert_eq!(ours.class_names[3], "cat");

        let reference = candle_datasets::vision::cifar::load_dir(&dir).unwrap();
        let ref_labels = reference.train_labels.to_vec1::<u8>().unwrap();
        assert_eq!(ref_labels, ours.train.labels);
        assert_eq!(
            reference.test_labels.to_vec1::<u8>().unwrap(),
            ours.test.labels
        );
        // candle-datasets holds x / 255 as f32 in (N, C, H, W): compare a few whole images.
        for index in [0usize, 12_345, 49_999] {
            let theirs: Vec<f32> = reference
                .train_images
                .get(index)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mine: Vec<f32> = ours
                .train
                .image(index)
                .iter()
                .map(|&b| f32::from(b) / 255.0)
                .collect();
            assert_eq!(theirs.len(), mine.len());
            let worst = theirs
                .iter()
                .zip(&mine)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "image {index} differs by {worst}");
        }
        assert_eq!(find_layout(tmp.path()), Some(dir.clone()));
        assert_eq!(find_layout(&dir), Some(dir));
    }

    #[test]
    fn truncated_and_malformed_files_name_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data_batch_1.bin");
        std::fs::write(&path, vec![0u8; FILE_BYTES - 100]).unwrap();
        let err = read_batch_file(&path).unwrap_err().to_string();
        assert!(err.starts_with(&path.display().to_string()), "{err}");
        assert!(
            err.contains("size 30729900 bytes, expected 30730000"),
            "{err}"
        );
        assert!(!err.contains('\n'));

        let mut bytes = vec![0u8; FILE_BYTES];
        bytes[5 * RECORD_BYTES] = 11;
        std::fs::write(&path, bytes).unwrap();
        let err = read_batch_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("record 5 (byte offset 15365) has label byte 11, expected 0..=9"),
            "{err}"
        );

        let missing = tmp.path().join("nope").join(TEST_FILE);
        let err = read_batch_file(&missing).unwrap_err().to_string();
        assert!(err.starts_with(&missing.display().to_string()), "{err}");
        assert!(err.contains("cannot open"), "{err}");
    }
}

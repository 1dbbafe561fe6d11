//! Download of the official CIFAR-10 binary archive into the cache folder.
//!
//! The archive is written to `*.part`, checked for size and MD5, and only then renamed;
//! it is unpacked into a temporary folder that is renamed into place. So a partial or
//! corrupt download is never mistaken for data.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use super::cifar::{cache_dir, find_layout, LAYOUT_DIR, TEST_FILE, TRAIN_FILES};
use super::dataset::{DataError, LoadProgress};
use crate::config::DataConfig;

pub const ARCHIVE_NAME: &str = "cifar-10-binary.tar.gz";
/// Finds the data as configured; with no folder configured, looks in the cache and
/// downloads there when allowed.
pub fn locate_or_download(
    data: &DataConfig,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<PathBuf, DataError> {
    if !data.dir.is_empty() {
        let dir = PathBuf::from(&data.dir);
        return find_layout(&dir).ok_or_else(|| {
            DataError::file(
                &dir,
                format!(
                    "no CIFAR-10 binary files here (expected {LAYOUT_DIR}/{} ... {TEST_FILE}, \
                     as in the official cifar-10-binary.tar.gz); fix --data-dir / data.dir, \
                     or leave it empty to download into {}",
                    TRAIN_FILES[0],
                    cache_dir().display()
                ),
            )
        });
    }
    let cache = cache_dir();
    if let Some(found) = find_layout(&cache) {
        return Ok(found);
    }
    if !data.download {
        return Err(DataError::NotFound { dir: cache });
    }
    fetch_cifar(data, &cache, progress)
}

/// Report download progress about this often (bytes).
const PROGRESS_EVERY: u64 = 1 << 20;

/// Downloads, verifies and unpacks CIFAR-10 into `cache`; returns the data folder.
pub fn fetch_cifar(
    data: &DataConfig,
    cache: &Path,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<PathBuf, DataError> {
    let url = &data.download_url;
    let download_error = |reason: String| DataError::Download {
        url: url.clone(),
        reason,
    };
    std::fs::create_dir_all(cache)
        .map_err(|e| download_error(format!("cannot create {}: {e}", cache.display())))?;
    let archive = cache.join(ARCHIVE_NAME);
    if !archive.exists() {
        progress(LoadProgress::Message(format!(
            "CIFAR-10 not found: downloading {url} into {}",
            cache.display()
        )));
        download_verified(
            url,
            &archive,
            data.download_size,
            &data.download_md5,
            progress,
        )?;
    }
    progress(LoadProgress::Unpacking);
    unpack(&archive, cache).map_err(|reason| {
        DataError::file(
            &archive,
            format!("cannot unpack: {reason}; delete it to download again"),
        )
    })?;
    // The data now lives unpacked; the archive would only take another 170 MB.
    let _ = std::fs::remove_file(&archive);
    let dir = find_layout(cache).ok_or_else(|| {
        DataError::file(cache, format!("the archive held no {LAYOUT_DIR}/ folder"))
    })?;
    progress(LoadProgress::Message(format!(
        "CIFAR-10 downloaded and unpacked into {}",
        dir.display()
    )));
    Ok(dir)
}

/// Opens `url` (http, https or file) for reading; returns the reader and the announced length.
fn open_url(url: &str) -> Result<(Box<dyn Read>, Option<u64>), String> {
    if let Some(path) = url.strip_prefix("file://") {
        let file = File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
        let len = file.metadata().ok().map(|m| m.len());
        return Ok((Box::new(file), len));
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_body(Some(Duration::from_secs(60)))
        .build()
        .into();
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let len = response.body().content_length();
    Ok((Box::new(response.into_body().into_reader()), len))
}

/// Streams `url` to `dest` through `dest.part`, checking size and MD5 before the rename.
pub fn download_verified(
    url: &str,
    dest: &Path,
    expected_size: u64,
    expected_md5: &str,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<(), DataError> {
    let fail = |reason: String| DataError::Download {
        url: url.to_string(),
        reason,
    };
    let part = PathBuf::from(format!("{}.part", dest.display()));
    let result = (|| {
        let (mut reader, announced) = open_url(url)?;
        let total = announced.unwrap_or(expected_size);
        let mut file =
            File::create(&part).map_err(|e| format!("cannot write {}: {e}", part.display()))?;
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; 1 << 16];
        let (mut done, mut reported) = (0u64, 0u64);
        progress(LoadProgress::Downloading { done, total });
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| format!("connection failed after {done} bytes: {e}"))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            file.write_all(&buf[..n])
                .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
            done += n as u64;
            if done - reported >= PROGRESS_EVERY {
                reported = done;
                progress(LoadProgress::Downloading { done, total });
            }
        }
        progress(LoadProgress::Downloading { done, total });
        file.sync_all()
            .map_err(|e| format!("cannot write {}: {e}", part.display()))?;
        if done != expected_size {
            return Err(format!(
                "received {done} bytes, expected {expected_size}: the download is incomplete"
            ));
        }
        let got = format!("{:x}", hasher.finalize());
        if !got.eq_ignore_ascii_case(expected_md5) {
            return Err(format!(
                "checksum mismatch: MD5 {got}, expected {expected_md5}"
            ));
        }
        std::fs::rename(&part, dest).map_err(|e| format!("cannot rename {}: {e}", part.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result.map_err(fail)
}

/// Unpacks the archive's `cifar-10-batches-bin/` into `cache` via a temporary folder.
fn unpack(archive: &Path, cache: &Path) -> Result<(), String> {
    let tmp = cache.join(format!("unpack.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let file = File::open(archive).map_err(|e| e.to_string())?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    tar.unpack(&tmp).map_err(|e| e.to_string())?;
    let unpacked = tmp.join(LAYOUT_DIR);
    if !unpacked.is_dir() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(format!("no {LAYOUT_DIR}/ folder inside"));
    }
    let target = cache.join(LAYOUT_DIR);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&unpacked, &target).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::cifar::{load_dir, tests::write_layout};
    use std::io::BufRead;
    use std::net::TcpListener;

    /// Serves `body` once per connection for `connections` connections on 127.0.0.1,
    /// announcing `announced` bytes (a larger number than sent simulates a cut).
    fn serve(body: Vec<u8>, announced: usize, connections: usize) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(connections) {
                let mut stream = stream.unwrap();
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).unwrap() > 2 {
                    line.clear();
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {announced}\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            }
        });
        format!("http://{addr}/cifar-10-binary.tar.gz")
    }

    fn archive_of_layout() -> Vec<u8> {
        let src = tempfile::tempdir().unwrap();
        write_layout(&src.path().join(LAYOUT_DIR));
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        tar.append_dir_all(LAYOUT_DIR, src.path().join(LAYOUT_DIR))
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap()
    }

    fn md5_hex(bytes: &[u8]) -> String {
        format!("{:x}", Md5::digest(bytes))
    }

    fn data_config(url: String, size: usize, md5: String) -> DataConfig {
        let mut data = crate::config::Config::default().data;
        data.download_url = url;
        data.download_size = size as u64;
        data.download_md5 = md5;
        data
    }

    #[test]
    fn downloads_verifies_unpacks_and_loads_from_a_local_server() {
        let archive = archive_of_layout();
        let url = serve(archive.clone(), archive.len(), 1);
        let cache = tempfile::tempdir().unwrap();
        let data = data_config(url, archive.len(), md5_hex(&archive));
        let mut events = Vec::new();
        let dir = fetch_cifar(&data, cache.path(), &mut |p| events.push(p)).unwrap();
        assert_eq!(dir, cache.path().join(LAYOUT_DIR));
        assert!(events.contains(&LoadProgress::Downloading {
            done: archive.len() as u64,
            total: archive.len() as u64
        }));
        assert!(events.contains(&LoadProgress::Unpacking));
        let set = load_dir(&dir, &mut |_| {}).unwrap();
        assert_eq!((set.train.len(), set.test.len()), (50_000, 10_000));
        // Nothing but the data is left behind.
        let left: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from(LAYOUT_DIR)]);
    }

    #[test]
    fn a_bad_checksum_leaves_nothing_that_looks_like_data() {
        let body = b"not really an archive".to_vec();
        let url = serve(body.clone(), body.len(), 1);
        let cache = tempfile::tempdir().unwrap();
        let data = data_config(url.clone(), body.len(), "0".repeat(32));
        let err = fetch_cifar(&data, cache.path(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "download of {url} failed: checksum mismatch: MD5 {}",
                md5_hex(&body)
            )),
            "{err}"
        );
        assert!(
            err.contains("--data-dir") && err.contains("--dataset synthetic"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_cut_connection_is_an_incomplete_download() {
        let body = vec![7u8; 1000];
        let url = serve(body.clone(), 5000, 1);
        let cache = tempfile::tempdir().unwrap();
        let data = data_config(url, 5000, md5_hex(&body));
        let err = fetch_cifar(&data, cache.path(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("failed"), "{err}");
        assert!(err.contains("--dataset synthetic"), "{err}");
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn no_server_is_a_clear_error_and_file_urls_work() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cache = tempfile::tempdir().unwrap();
        let data = data_config(
            format!("http://127.0.0.1:{port}/x.tar.gz"),
            10,
            "0".repeat(32),
        );
        let err = fetch_cifar(&data, cache.path(), &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "download of http://127.0.0.1:{port}/x.tar.gz failed:"
            )),
            "{err}"
        );

        let src = tempfile::tempdir().unwrap();
        let file = src.path().join("a.bin");
        std::fs::write(&file, b"hello").unwrap();
        let dest = cache.path().join("a.out");
        download_verified(
            &format!("file://{}", file.display()),
            &dest,
            5,
            &md5_hex(b"hello"),
            &mut |_| {},
        )
        .unwrap();
        assert_eq!(std::fs::read(dest).unwrap(), b"hello");
    }

    #[test]
    fn a_configured_folder_without_data_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut data = crate::config::Config::default().data;
        data.dir = tmp.path().display().to_string();
        let err = locate_or_download(&data, &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(&tmp.path().display().to_string()), "{err}");
        assert!(err.contains("no CIFAR-10 binary files here"), "{err}");
    }
}

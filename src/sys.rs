//! Process-level settings and measurements.

/// Keeps freed memory in the heap instead of returning every large tensor to the
/// kernel: with glibc's defaults each tensor above 128 KiB is a fresh mmap, page-faulted
/// and zeroed, which costs about half of a training step here.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Resident memory of this process now, in bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

/// Peak resident memory of this process so far, in bytes (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_readings_are_plausible_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = super::rss_bytes().unwrap();
            let peak = super::peak_rss_bytes().unwrap();
            assert!(rss > 1 << 20 && peak >= rss, "rss {rss} peak {peak}");
        }
    }
}

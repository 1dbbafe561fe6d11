//! Process-level settings and measurements.

/// Keeps freed memory in the heap instead of returning every large tensor to the
/// kernel: with glibc's defaults each tensor above 128 KiB is a fresh mmap, page-faulted
/// and zeroed, which costs about half of a training step here. One arena: the trainer
/// runs on its own thread, and glibc's per-thread arenas are 64 MiB heaps that are
/// mapped and unmapped as a step's memory comes and goes (page faults and TLB
/// shootdowns were ~19% of a step's CPU time).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// More tensor threads asked for than this process may use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`train.threads` = {asked} is more than the {cpus} CPUs this process may use (oversubscribing only slows training); use at most {cpus}, or 0 for the default")]
pub struct TooManyThreads {
    pub asked: usize,
    pub cpus: usize,
}

/// Chooses the threads for tensor work; must run before any (the pools read these
/// variables once, on first use). One pool: the matrix products (gemm) and the fused
/// kernels in [`crate::ops`] run on rayon's pool of `threads` (0 = candle's default,
/// the physical cores, or the user's RAYON_NUM_THREADS); candle's own element-wise
/// ops run on the calling thread (CANDLE_NUM_THREADS=1 unless the user set it), since
/// a second pool of spinning workers only competed with the first for the cores.
pub fn set_threads(threads: usize) -> Result<(), TooManyThreads> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if threads > cpus {
        return Err(TooManyThreads {
            asked: threads,
            cpus,
        });
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    Ok(())
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

/// SIGTERM and SIGHUP, the signals that end a process left in tmux or over SSH (a
/// `kill`, a closed terminal): the headless loop and the dashboard both stop cleanly,
/// with a checkpoint, on either. Ctrl-C is the caller's (a key in the dashboard).
pub struct StopSignals {
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Listens from now on; must be called inside a tokio runtime.
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                terminate: signal(SignalKind::terminate()).ok(),
                hangup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for the next one (forever where none could be registered).
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            let Self { terminate, hangup } = self;
            tokio::select! {
                Some(()) = async { terminate.as_mut()?.recv().await } => {},
                Some(()) = async { hangup.as_mut()?.recv().await } => {},
                else => std::future::pending::<()>().await,
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_readings_are_plausible_on_linux() {
        if cfg!(target_os = "linux") {
            let rss = super::rss_bytes().unwrap();
            let peak = super::peak_rss_bytes().unwrap();
            assert!(rss > 1 << 20 && peak >= rss, "rss {rss} peak {peak}");
            let start = super::cpu_seconds(true).unwrap();
            let mut meter = super::CpuMeter::default();
            assert_eq!(meter.sample(), None);
            // Spin until the thread's CPU clock (10 ms ticks) moves.
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while super::cpu_seconds(true).unwrap() <= start {
                for i in 0..1_000_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                }
                assert!(t.elapsed().as_secs() < 10, "the CPU clock did not move");
            }
            assert!(meter.sample().unwrap() > 0.0);
        }
    }
}

/// CPU time (user + system) of this process, or of the calling thread, in seconds (Linux).
pub fn cpu_seconds(thread_only: bool) -> Option<f64> {
    let path = if thread_only {
        "/proc/thread-self/stat"
    } else {
        "/proc/self/stat"
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) / ticks as f64)
}

/// CPU use of the process between calls, in percent of one core.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: Option<(std::time::Instant, f64)>,
}

impl CpuMeter {
    pub fn sample(&mut self) -> Option<f64> {
        let now = std::time::Instant::now();
        let cpu = cpu_seconds(false)?;
        let percent = self.last.and_then(|(t, c)| {
            let wall = now.duration_since(t).as_secs_f64();
            (wall > 0.0).then(|| 100.0 * (cpu - c) / wall)
        });
        self.last = Some((now, cpu));
        percent
    }
}

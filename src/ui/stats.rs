//! What the dashboard measures about itself (frames, render times, its own CPU), so a
//! user who leaves it open for hours can see what it costs; printed on exit.

/// What the dashboard measured about itself, for the user (printed on exit).
#[derive(Debug, Default, Clone)]
pub struct DashboardStats {
    pub frames: usize,
    pub render_ms: Vec<f64>,
    pub ui_thread_cpu_secs: f64,
    pub wall_secs: f64,
}

impl DashboardStats {
    /// The median and the worst frame's render time, in ms (0 before any frame).
    pub fn render_median_worst_ms(&self) -> (f64, f64) {
        let mut sorted = self.render_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
        (median, sorted.last().copied().unwrap_or(0.0))
    }

    pub fn summary(&self) -> String {
        let (median, worst) = self.render_median_worst_ms();
        format!(
            "dashboard: {} frames, render median {median:.2} ms, worst {worst:.2} ms; UI thread CPU {:.2} s in {:.0} s ({:.2}%)",
            self.frames,
            self.ui_thread_cpu_secs,
            self.wall_secs,
            100.0 * self.ui_thread_cpu_secs / self.wall_secs.max(1e-9)
        )
    }
}

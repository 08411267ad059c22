//! Progress for long work: a bar on a terminal, a line every few seconds in logs (CI, pipes).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Reports `done / total` with rate and ETA.
pub struct Progress {
    bar: Option<ProgressBar>,
    msg: String,
    start: Instant,
    last_line: Instant,
    total: u64,
    enabled: bool,
}

impl Progress {
    /// A reporter for `msg`; silent when `enabled` is false.
    pub fn new(msg: &str, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec}, ETA {eta})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message(msg.to_string());
            pb
        });
        let now = Instant::now();
        Progress {
            bar,
            msg: msg.to_string(),
            start: now,
            last_line: now,
            total: 0,
            enabled,
        }
    }

    /// Records progress.
    pub fn set(&mut self, done: usize, total: usize) {
        self.total = total as u64;
        if let Some(b) = &self.bar {
            b.set_length(total as u64);
            b.set_position(done as u64);
        } else if self.enabled && self.last_line.elapsed() > Duration::from_secs(10) && done < total
        {
            self.last_line = Instant::now();
            let secs = self.start.elapsed().as_secs_f64();
            let rate = done as f64 / secs.max(1e-9);
            let eta = if rate > 0.0 {
                (total - done) as f64 / rate
            } else {
                f64::NAN
            };
            eprintln!("{}: {done}/{total} ({rate:.1}/s, ETA {eta:.0}s)", self.msg);
        }
    }

    /// Ends the report with the elapsed time.
    pub fn finish(self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.enabled && self.start.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "{}: {} done in {:.1}s",
                self.msg,
                self.total,
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Resident memory of this process (VmRSS, bytes).
pub fn resident_bytes() -> u64 {
    status_bytes("VmRSS:")
}

/// A size field of `/proc/self/status` (`VmRSS:` now, `VmHWM:` the peak), bytes; 0 elsewhere.
pub fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

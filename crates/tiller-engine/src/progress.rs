//! A progress line with rate and ETA on stderr: redrawn in place on a terminal, printed every
//! few seconds otherwise (logs, CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    total: u64,
    start_step: u64,
    started: Instant,
    last_print: Option<Instant>,
    tty: bool,
    label: String,
}

impl Progress {
    /// Progress from `start_step` to `total` steps.
    pub fn new(label: &str, start_step: u64, total: u64) -> Self {
        Self {
            total,
            start_step,
            started: Instant::now(),
            last_print: None,
            tty: std::io::stderr().is_terminal(),
            label: label.to_string(),
        }
    }

    /// Updates to `step` (1-based count of completed steps) with a short status text.
    pub fn update(&mut self, step: u64, status: &str) {
        let now = Instant::now();
        let every = if self.tty {
            Duration::from_millis(200)
        } else {
            Duration::from_secs(10)
        };
        let last = step >= self.total;
        if !last && self.last_print.is_some_and(|t| now - t < every) {
            return;
        }
        self.last_print = Some(now);
        let done = step.saturating_sub(self.start_step);
        let elapsed = self.started.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        };
        let eta = if rate > 0.0 {
            (self.total.saturating_sub(step)) as f64 / rate
        } else {
            0.0
        };
        let frac = step as f64 / self.total.max(1) as f64;
        let width = 24;
        let filled = ((frac * width as f64) as usize).min(width);
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(width - filled));
        let line = format!(
            "{} [{bar}] {step}/{} {:.2} it/s eta {} {status}",
            self.label,
            self.total,
            rate,
            fmt_secs(eta)
        );
        let mut err = std::io::stderr();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K{line}");
            if last {
                let _ = writeln!(err);
            }
        } else {
            let _ = writeln!(err, "{line}");
        }
    }
}

/// `1h02m`, `3m05s`, `12s`.
pub fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

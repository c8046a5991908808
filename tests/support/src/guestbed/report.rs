//! Output that must be seen: skips and timelines go straight to stderr, which the test harness
//! does not capture (it captures only the print macros), so they show in a passing run too.

use std::io::Write;
use std::time::{Duration, Instant};

/// Why the guest tests cannot run on this host.
#[derive(Debug, Clone)]
pub struct Skip(pub String);

pub fn show(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
    let _ = err.flush();
}

/// Prints `SKIPPED <test>: <reason>`. With `VIRTDISK_GUEST_REQUIRED=1` (CI hosts that have
/// libvirt and apt) a skip is a failure instead.
pub fn skipped(test: &str, skip: &Skip) {
    if std::env::var("VIRTDISK_GUEST_REQUIRED").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: VIRTDISK_GUEST_REQUIRED=1 but the guest test bed is unavailable: {}",
            skip.0
        );
    }
    show(&format!("SKIPPED {test}: {}", skip.0));
}

/// Milliseconds since a start ("at") and per step ("took": since the previous mark, or the
/// duration a `span` measured).
#[derive(Debug)]
pub struct Timeline {
    title: String,
    start: Instant,
    last: Duration,
    rows: Vec<String>,
}

impl Timeline {
    pub fn new(title: impl Into<String>) -> Timeline {
        Timeline {
            title: title.into(),
            start: Instant::now(),
            last: Duration::ZERO,
            rows: Vec::new(),
        }
    }

    /// Records that `what` happened now; returns the time since the previous mark.
    pub fn mark(&mut self, what: impl AsRef<str>) -> Duration {
        let at = self.start.elapsed();
        let step = at.saturating_sub(self.last);
        self.last = at;
        self.rows.push(format!(
            "{:>8} ms  {:>7} ms  {}",
            at.as_millis(),
            step.as_millis(),
            what.as_ref()
        ));
        step
    }

    /// Records a duration measured elsewhere (e.g. attach → visible).
    pub fn span(&mut self, what: impl AsRef<str>, took: Duration) {
        self.rows.push(format!(
            "{:>8} ms  {:>7} ms  {}",
            self.start.elapsed().as_millis(),
            took.as_millis(),
            what.as_ref()
        ));
    }

    pub fn render(&self) -> String {
        let mut out = format!("timeline: {}\n  {:>11}  {:>10}\n", self.title, "at", "took");
        for row in &self.rows {
            out.push_str("  ");
            out.push_str(row);
            out.push('\n');
        }
        out
    }

    pub fn print(&self) {
        show(self.render().trim_end());
    }
}

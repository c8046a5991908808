//! Latency samples, percentiles, targets and the rows of the report.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The latencies of one kind of call, its errors by gRPC code, and the wall time of the run.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub ok: Vec<Duration>,
    pub errors: BTreeMap<String, usize>,
    /// First error message per code, to say why.
    pub first_error: BTreeMap<String, String>,
    pub wall: Duration,
}

impl Samples {
    pub fn record<T>(&mut self, took: Duration, r: &Result<T, tonic::Status>) {
        match r {
            Ok(_) => self.ok.push(took),
            Err(e) => {
                let code = format!("{:?}", e.code());
                *self.errors.entry(code.clone()).or_default() += 1;
                self.first_error
                    .entry(code)
                    .or_insert_with(|| e.message().chars().take(300).collect());
            }
        }
    }

    pub fn push(&mut self, took: Duration) {
        self.ok.push(took);
    }

    pub fn merge(&mut self, other: Samples) {
        self.ok.extend(other.ok);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.first_error {
            self.first_error.entry(k).or_insert(v);
        }
        self.wall += other.wall;
    }

    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    /// Nearest-rank percentile of the successful calls (q in 0..=100).
    pub fn pct(&self, q: f64) -> Option<Duration> {
        if self.ok.is_empty() {
            return None;
        }
        let mut v = self.ok.clone();
        v.sort();
        let rank = ((q / 100.0) * v.len() as f64).ceil() as usize;
        Some(v[rank.clamp(1, v.len()) - 1])
    }

    pub fn p50(&self) -> Option<Duration> {
        self.pct(50.0)
    }

    pub fn total(&self) -> Duration {
        self.ok.iter().sum()
    }

    /// Successful calls per second of wall time (the sum of latencies when no wall time was
    /// recorded: calls made one after the other).
    pub fn throughput(&self) -> Option<f64> {
        let wall = if self.wall.is_zero() {
            self.total()
        } else {
            self.wall
        };
        (!self.ok.is_empty() && !wall.is_zero()).then(|| self.ok.len() as f64 / wall.as_secs_f64())
    }

    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Times `f` into `s`, returning its result.
pub async fn timed<T>(
    s: &mut Samples,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let t = Instant::now();
    let r = f.await;
    s.record(t.elapsed(), &r);
    r
}

/// Which statistic a target bounds.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    P50AtMost(Duration),
}

impl Target {
    pub fn describe(&self) -> String {
        match self {
            Target::P50AtMost(d) => format!("p50 ≤ {}", ms(*d)),
        }
    }
}

/// A latency row: one RPC (or one bare operation for the floor).
#[derive(Debug, Clone)]
pub struct LatencyRow {
    pub figure: String,
    pub samples: Samples,
    pub target: Option<Target>,
    /// The same work done bare (the machine's floor), for the ratio.
    pub floor: Option<(String, Samples)>,
}

impl LatencyRow {
    pub fn new(figure: impl Into<String>, samples: Samples) -> Self {
        LatencyRow {
            figure: figure.into(),
            samples,
            target: None,
            floor: None,
        }
    }

    pub fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self
    }

    pub fn floor(mut self, what: impl Into<String>, s: &Samples) -> Self {
        self.floor = Some((what.into(), s.clone()));
        self
    }

    /// Whether the target is met (None: no target, or nothing measured).
    pub fn met(&self) -> Option<bool> {
        let s = &self.samples;
        match self.target? {
            Target::P50AtMost(d) => s.p50().map(|p| p <= d && s.error_count() == 0),
        }
    }
}

/// A single-valued figure (start-up time, memory, a total).
#[derive(Debug, Clone)]
pub struct ValueRow {
    pub figure: String,
    pub value: String,
    pub target: Option<String>,
    pub met: Option<bool>,
    pub note: String,
}

impl ValueRow {
    pub fn new(figure: impl Into<String>, value: impl Into<String>) -> Self {
        ValueRow {
            figure: figure.into(),
            value: value.into(),
            target: None,
            met: None,
            note: String::new(),
        }
    }

    pub fn target(mut self, describe: impl Into<String>, met: bool) -> Self {
        self.target = Some(describe.into());
        self.met = Some(met);
        self
    }

    pub fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }
}

/// One figure measured on the plugin and on the reference driver in the same run: `row` holds
/// the figure, the plugin's value, the target and the note.
#[derive(Debug, Clone)]
pub struct PeerRow {
    pub row: ValueRow,
    pub theirs: String,
    /// hostpath's figure over ours: above 1, the plugin is faster.
    pub ratio: Option<f64>,
}

impl PeerRow {
    pub fn new(
        figure: impl Into<String>,
        ours: impl Into<String>,
        theirs: impl Into<String>,
    ) -> Self {
        PeerRow {
            row: ValueRow::new(figure, ours),
            theirs: theirs.into(),
            ratio: None,
        }
    }

    pub fn ratio(mut self, r: Option<f64>) -> Self {
        self.ratio = r;
        self
    }

    pub fn target(self, describe: impl Into<String>, met: bool) -> Self {
        PeerRow {
            row: self.row.target(describe, met),
            ..self
        }
    }

    pub fn note(self, n: impl Into<String>) -> Self {
        PeerRow {
            row: self.row.note(n),
            ..self
        }
    }
}

/// One concurrency level of the parallel-clients run.
#[derive(Debug, Clone)]
pub struct ConcurrencyRow {
    pub clients: usize,
    pub domains: usize,
    pub volumes: usize,
    /// Create + publish of one volume, end to end per client.
    pub create: Samples,
    pub publish: Samples,
    pub unpublish: Samples,
    pub delete: Samples,
    /// Wall time of the create+publish phase.
    pub wall: Duration,
    pub teardown_wall: Duration,
}

pub fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else if v >= 10.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.2} ms")
    }
}

pub fn opt_ms(d: Option<Duration>) -> String {
    d.map(ms).unwrap_or_else(|| "–".into())
}

pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

/// A fast check of the arithmetic, run by `cargo test --all-targets` (which runs bench mains
/// without `--bench`).
pub fn self_check() {
    let mut s = Samples::default();
    for i in 1..=100 {
        s.push(Duration::from_millis(i));
    }
    assert_eq!(s.p50(), Some(Duration::from_millis(50)));
    assert_eq!(s.pct(90.0), Some(Duration::from_millis(90)));
    assert_eq!(s.pct(99.0), Some(Duration::from_millis(99)));
    let one = Samples {
        ok: vec![Duration::from_millis(7)],
        ..Default::default()
    };
    assert_eq!(one.pct(99.0), Some(Duration::from_millis(7)));
    assert_eq!(Samples::default().p50(), None);
    let row = LatencyRow::new("x", s).target(Target::P50AtMost(Duration::from_millis(50)));
    assert_eq!(row.met(), Some(true));
}

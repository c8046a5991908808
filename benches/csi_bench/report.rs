//! The results as Markdown: the targets, the latency table, concurrency, scale and footprint,
//! and the machine. `--update FILE` replaces the part of FILE between the markers.

use super::stats::{ms, opt_ms, ConcurrencyRow, LatencyRow, PeerRow, Samples, ValueRow};
use std::fmt::Write;

pub const BEGIN: &str = "<!-- bench:results:begin -->";
pub const END: &str = "<!-- bench:results:end -->";

#[derive(Default)]
pub struct Report {
    pub header: Vec<String>,
    pub machine: Vec<String>,
    pub latency: Vec<LatencyRow>,
    pub concurrency: Vec<ConcurrencyRow>,
    pub values: Vec<ValueRow>,
    /// Side by side with the reference driver.
    pub peer: Vec<PeerRow>,
    /// Create and delete by pool file system.
    pub filesystems: Vec<super::pool_fs::FsRow>,
}

fn met(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "**NO**",
        None => "–",
    }
}

fn per_sec(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "–".into())
}

/// A table's header row and its separator row.
fn head(o: &mut String, columns: &[&str]) {
    let _ = writeln!(o, "| {} |", columns.join(" | "));
    let _ = writeln!(o, "|{}", "---|".repeat(columns.len()));
}

fn p50_p99(s: &Samples) -> String {
    format!("{} / {}", opt_ms(s.p50()), opt_ms(s.pct(99.0)))
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        for h in &self.header {
            let _ = writeln!(o, "{h}");
        }
        if !self.peer.is_empty() {
            let _ = writeln!(
                o,
                "\n### Side by side with the reference driver (hostpathplugin)\n\n\
                 The same RPCs from the same client, the two drivers taking turns, in this run; \
                 neither attaches anything. hostpath / ours above 1: the plugin is \
                 faster.\n"
            );
            let _ = writeln!(
                o,
                "| figure | virtdisk-csi | hostpath | hostpath / ours | target | met? | how |"
            );
            let _ = writeln!(o, "|---|---|---|---|---|---|---|");
            for p in &self.peer {
                let r = &p.row;
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.figure,
                    r.value,
                    p.theirs,
                    p.ratio.map_or("–".into(), |x| format!("{x:.2}")),
                    r.target.as_deref().unwrap_or("–"),
                    met(r.met),
                    r.note
                );
            }
        }
        if !self.filesystems.is_empty() {
            let _ = writeln!(
                o,
                "\n### CreateVolume and DeleteVolume by pool file system\n\n\
                 The side-by-side create and delete, p50 of the same number of calls, with both \
                 drivers' state and the floor (one durable record write: write, fsync, rename, \
                 fsync dir) on each file system. Targets: CreateVolume ≤ hostpath × 2 and ≤ 1.5 × \
                 floor; DeleteVolume ≤ hostpath × 2. hostpath never fsyncs; the plugin commits \
                 each change durably, so the floor moves it and not hostpath. A loop device \
                 flushes by fsyncing its backing file on the temp dir's file system: its floors \
                 are higher than a disk of its own would give.\n"
            );
            head(
                &mut o,
                &[
                    "pool file system",
                    "CreateVolume ours / hostpath",
                    "× hostpath (≤ 2?)",
                    "× floor (≤ 1.5?)",
                    "DeleteVolume ours / hostpath",
                    "× hostpath (≤ 2?)",
                    "floor",
                ],
            );
            for f in &self.filesystems {
                let _ = writeln!(o, "{}", f.markdown());
            }
        }
        let _ = writeln!(o, "\n### Targets\n");
        head(&mut o, &["figure", "measured", "target", "met?"]);
        for r in self.latency.iter().filter(|r| r.target.is_some()) {
            let measured = format!("p50 {}", opt_ms(r.samples.p50()));
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                r.figure,
                measured,
                r.target.unwrap().describe(),
                met(r.met())
            );
        }
        for r in self.values.iter().filter(|r| r.target.is_some()) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                r.figure,
                r.value,
                r.target.as_deref().unwrap_or(""),
                met(r.met)
            );
        }
        for r in self
            .peer
            .iter()
            .map(|p| &p.row)
            .filter(|r| r.target.is_some())
        {
            let _ = writeln!(
                o,
                "| {} (side by side) | {} | {} | {} |",
                r.figure,
                r.value,
                r.target.as_deref().unwrap_or(""),
                met(r.met)
            );
        }
        for r in &self.concurrency {
            let errors = r.create.error_count()
                + r.publish.error_count()
                + r.unpublish.error_count()
                + r.delete.error_count();
            let _ = writeln!(
                o,
                "| {} parallel clients: errors | {errors} | 0 errors | {} |",
                r.clients,
                met(Some(errors == 0))
            );
        }

        let _ = writeln!(
            o,
            "\n### Latency: one client, one call at a time\n\n\
             Floor: the same work done bare by the tool the plugin drives (no plugin, no gRPC), \
             measured in the same run; ratio = p50 / floor p50.\n"
        );
        head(
            &mut o,
            &[
                "call",
                "n",
                "p50",
                "p90",
                "p99",
                "calls/s",
                "errors",
                "floor (bare)",
                "floor p50",
                "ratio",
            ],
        );
        for r in &self.latency {
            let s = &r.samples;
            let (fname, fp50, ratio) = match &r.floor {
                Some((what, f)) => (
                    what.clone(),
                    opt_ms(f.p50()),
                    match (s.p50(), f.p50()) {
                        (Some(a), Some(b)) if !b.is_zero() => {
                            format!("{:.1}×", a.as_secs_f64() / b.as_secs_f64())
                        }
                        _ => "–".into(),
                    },
                ),
                None => ("–".into(), "–".into(), "–".into()),
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.figure,
                s.ok.len(),
                opt_ms(s.p50()),
                opt_ms(s.pct(90.0)),
                opt_ms(s.pct(99.0)),
                per_sec(s.throughput()),
                s.errors_text(),
                fname,
                fp50,
                ratio
            );
        }

        if !self.concurrency.is_empty() {
            let _ = writeln!(
                o,
                "\n### Concurrency: N clients creating and publishing, then unpublishing and \
                 deleting\n\nEach client has its own connection and takes the next volume \
                 (1 GiB) from a shared counter; volume i goes to domain i mod {}. \
                 Latencies are p50 / p99.\n",
                self.concurrency[0].domains
            );
            head(
                &mut o,
                &[
                    "clients",
                    "volumes",
                    "create + publish",
                    "volumes/s",
                    "CreateVolume",
                    "ControllerPublish",
                    "errors",
                    "unpublish + delete",
                    "volumes/s",
                    "ControllerUnpublish",
                    "DeleteVolume",
                    "errors",
                ],
            );
            for r in &self.concurrency {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {:.1} | {} | {} | {} | {} | {:.1} | {} | {} | {} |",
                    r.clients,
                    r.volumes,
                    ms(r.wall),
                    r.publish.ok.len() as f64 / r.wall.as_secs_f64().max(1e-9),
                    p50_p99(&r.create),
                    p50_p99(&r.publish),
                    errors(&[&r.create, &r.publish]),
                    ms(r.teardown_wall),
                    r.delete.ok.len() as f64 / r.teardown_wall.as_secs_f64().max(1e-9),
                    p50_p99(&r.unpublish),
                    p50_p99(&r.delete),
                    errors(&[&r.unpublish, &r.delete]),
                );
            }
        }

        if !self.values.is_empty() {
            let _ = writeln!(o, "\n### Scale and footprint\n");
            head(&mut o, &["figure", "value", "target", "met?", "how"]);
            for r in &self.values {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} |",
                    r.figure,
                    r.value,
                    r.target.as_deref().unwrap_or("–"),
                    met(r.met),
                    r.note
                );
            }
        }

        let _ = writeln!(o, "\n### Machine\n");
        for m in &self.machine {
            let _ = writeln!(o, "- {m}");
        }
        o
    }
}

fn errors(all: &[&Samples]) -> String {
    let mut merged = Samples::default();
    for s in all {
        merged.merge((*s).clone());
    }
    merged.errors_text()
}

/// Replaces the text between the markers of `file` with `body`.
pub fn splice(file: &std::path::Path, body: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        return Err(format!(
            "{} has no {BEGIN} … {END} markers to put the results between",
            file.display()
        ));
    };
    let out = format!("{}{BEGIN}\n{body}\n{}", &text[..b], &text[e..]);
    std::fs::write(file, out).map_err(|e| format!("{}: {e}", file.display()))
}

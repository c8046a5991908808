//! `virtdisk-csi doctor`: checks that this host has what the chosen mode needs and prints each
//! check as OK / WARN / FAIL with a fix. Read-only: it creates nothing but a temp file in each
//! pool to prove it is writable (removed at once). Exits non-zero when a check FAILs.

mod host;
mod libvirt;
mod pools;
mod tools;

use crate::config::{Config, Mode, Overrides};
use serde::Serialize;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub(crate) struct DoctorArgs {
    /// What this host runs: controller (hypervisor side), node (inside a VM) or both.
    #[arg(long, value_enum, default_value = "monolith")]
    pub mode: Mode,
    /// The TOML configuration the plugin is started with.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// libvirt URI to check (default: the config's, else qemu:///system).
    #[arg(long)]
    pub libvirt_uri: Option<String>,
    /// table (for people) or json (for programs).
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: crate::client::OutputFormat,
    /// How long each group of checks (tools, pools, libvirt, host) may take; one that takes
    /// longer (a libvirtd that never answers, a hung mount) is a FAIL.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub check_timeout: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub(crate) enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn warn(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub(crate) fn fail(
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            name: name.into(),
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// FAIL when `required`, else WARN.
    pub(crate) fn missing(
        required: bool,
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        if required {
            Check::fail(name, detail, fix)
        } else {
            Check::warn(name, detail, fix)
        }
    }
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub mode: String,
    pub checks: Vec<Check>,
}

impl Report {
    pub(crate) fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    pub(crate) fn passed(&self) -> bool {
        self.count(Status::Fail) == 0
    }
}

const TOOLS_FIX: &str =
    "find the program that hangs (run each with --version) and fix or replace it";
const POOLS_FIX: &str = "check the filesystem of the directory (a hung network mount?): \
                         `stat` it, `df` it";
const LIBVIRT_FIX: &str = "check that libvirtd answers: virsh -c URI version (a libvirtd that \
                           accepts connections and never answers hangs here)";
const HOST_FIX: &str = "check /sys, /proc/self/mountinfo and /dev on this host: one of them \
                        does not answer";

type Checks = Pin<Box<dyn Future<Output = Vec<Check>> + Send>>;

/// Runs one group of checks on its own task for at most `limit`. A group stuck in a call that
/// never returns becomes one FAIL named after it, and the doctor goes on; what is stuck on the
/// blocking pool is left behind at exit (`cli::main` does not wait for it).
async fn bounded(group: &str, fix: &str, limit: Duration, checks: Checks) -> Vec<Check> {
    let task = tokio::spawn(checks);
    let abort = task.abort_handle();
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(checks)) => checks,
        Ok(Err(e)) => vec![Check::fail(
            group,
            format!("the checks failed: {e}"),
            "report this as a bug",
        )],
        Err(_) => {
            abort.abort();
            vec![Check::fail(
                group,
                format!(
                    "the {group} checks did not finish within {} s (--check-timeout)",
                    limit.as_secs()
                ),
                fix,
            )]
        }
    }
}

/// Runs every check that applies to `args.mode`, each group bounded by `args.check_timeout`.
pub(crate) async fn diagnose(args: &DoctorArgs) -> Report {
    let mode = args.mode;
    let mut checks = Vec::new();
    let config = Config::load(
        mode,
        args.config.as_deref(),
        Overrides {
            data_dir: args.data_dir.clone(),
            libvirt_uri: args.libvirt_uri.clone(),
            ..Default::default()
        },
    );
    let config = match config {
        Ok(c) => {
            let source = match &args.config {
                Some(p) => format!("{} is valid", p.display()),
                None => "no file: built-in defaults".to_string(),
            };
            let hosts = if c.hosts_configured {
                format!(
                    "; {} host(s): {}",
                    c.hosts.len(),
                    c.hosts
                        .iter()
                        .map(|h| format!("{} ({})", h.name, h.pools.join(", ")))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            } else {
                String::new()
            };
            checks.push(Check::ok(
                "config",
                format!(
                    "{source}; {} pool(s){hosts}, data dir {}",
                    c.pools.len(),
                    c.data_dir.display()
                ),
            ));
            Some(c)
        }
        Err(e) => {
            checks.push(Check::fail(
                "config",
                e.to_string(),
                "fix the file (see deploy/config.example.toml)",
            ));
            None
        }
    };
    let limit = Duration::from_secs(args.check_timeout);
    let group = |name, fix, checks: Checks| bounded(name, fix, limit, checks);
    if mode.runs_controller() {
        checks.extend(group("tools", TOOLS_FIX, Box::pin(tools::controller_tools(mode))).await);
        if let Some(c) = &config {
            let cfg = c.clone();
            let pools = async move { pools::check_pools(&cfg).await };
            checks.extend(group("pools", POOLS_FIX, Box::pin(pools)).await);
            let (hosts, named) = (c.hosts.clone(), c.hosts_configured);
            let libvirt = async move { libvirt::check(mode, &hosts, named).await };
            checks.extend(group("libvirt", LIBVIRT_FIX, Box::pin(libvirt)).await);
        }
    }
    if mode.runs_node() {
        checks.extend(group("host", HOST_FIX, Box::pin(host::node_checks(mode))).await);
        checks.extend(group("node tools", TOOLS_FIX, Box::pin(tools::node_tools(mode))).await);
    }
    if let Some(c) = &config {
        let dir = c.data_dir.clone();
        let data_dir = async move { vec![pools::check_data_dir(&dir).await] };
        checks.extend(group("data dir", POOLS_FIX, Box::pin(data_dir)).await);
    }
    Report {
        mode: format!("{mode:?}").to_lowercase(),
        checks,
    }
}

pub(crate) fn render(report: &Report, format: crate::client::OutputFormat) -> String {
    use crate::client::OutputFormat;
    if format == OutputFormat::Json {
        let mut s = serde_json::to_string_pretty(&serde_json::json!({
            "mode": report.mode,
            "checks": report.checks,
            "summary": {
                "ok": report.count(Status::Ok),
                "warn": report.count(Status::Warn),
                "fail": report.count(Status::Fail),
            },
            "passed": report.passed(),
        }))
        .expect("JSON values serialize");
        s.push('\n');
        return s;
    }
    let width = report
        .checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!("virtdisk-csi doctor (mode {})\n\n", report.mode);
    for c in &report.checks {
        let status = match c.status {
            Status::Ok => "OK",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("{status:<5} {:<width$}  {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<5} {:<width$}  fix: {fix}\n", "", ""));
        }
    }
    out.push_str(&format!(
        "\n{} checks: {} OK, {} WARN, {} FAIL\n",
        report.checks.len(),
        report.count(Status::Ok),
        report.count(Status::Warn),
        report.count(Status::Fail)
    ));
    out
}

/// Prints the report; true when nothing FAILed.
pub(crate) async fn run(args: DoctorArgs) -> bool {
    let report = diagnose(&args).await;
    print!("{}", render(&report, args.output));
    report.passed()
}

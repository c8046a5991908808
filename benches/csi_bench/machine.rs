//! What the figures were measured on.

use std::process::Command;

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|| "?".into())
}

/// What follows `prefix` on the first line of `file` that starts with it.
fn line_after(file: &str, prefix: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::to_string)
}

fn cpu_model() -> String {
    line_after("/proc/cpuinfo", "model name")
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "?".into())
}

fn mem_total() -> String {
    line_after("/proc/meminfo", "MemTotal:")
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1u64 << 20) as f64))
        .unwrap_or_else(|| "?".into())
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `df -T` of the temp dir: where pools, images and mounts of the bench live.
fn temp_filesystem() -> String {
    filesystem_of(&std::env::temp_dir())
}

/// `dir (device fstype)`, from df.
pub fn filesystem_of(dir: &std::path::Path) -> String {
    let out = Command::new("df")
        .args(["--output=source,fstype"])
        .arg(dir)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let line = out
        .lines()
        .nth(1)
        .unwrap_or("?")
        .split_whitespace()
        .collect::<Vec<_>>();
    format!("{} ({})", dir.display(), line.join(" "))
}

/// Markdown bullet lines.
pub fn describe() -> Vec<String> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    vec![
        format!("CPU: {cores} × {}", cpu_model()),
        format!("RAM: {}", mem_total()),
        format!("kernel: {}", first_line("uname", &["-sr"])),
        format!("OS: {}", os_release()),
        format!("qemu: {}", first_line("qemu-system-x86_64", &["--version"])),
        format!("qemu-img: {}", first_line("qemu-img", &["--version"])),
        format!("libvirt: {}", first_line("libvirtd", &["--version"])),
        format!(
            "mkfs: {}, {}",
            first_line("mkfs.ext4", &["-V"]),
            first_line("mkfs.xfs", &["-V"])
        ),
        format!("filesystem of the pools: {}", temp_filesystem()),
    ]
}

fn os_release() -> String {
    line_after("/etc/os-release", "PRETTY_NAME=")
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "?".into())
}

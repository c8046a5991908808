//! The plugin's Prometheus endpoint (`--metrics-addr 127.0.0.1:0`): the address it bound, read
//! from its log, plain HTTP/1.1 GETs, and single samples of the text format.
//!
//! ```ignore
//! let p = Plugin::start("controller", &["--metrics-addr", "127.0.0.1:0"]).await;
//! let addr = metrics_addr(&p).await;
//! let (status, body) = http_get(&addr, "/metrics");
//! assert_eq!(sample(&body, "virtdisk_csi_pool_up{pool=\"default\"}"), Some(1.0));
//! ```

use crate::plugin::Plugin;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

const SERVING: &str = "serving metrics on /metrics";

/// The address the plugin bound, from the last "serving metrics" line of its log (20 s at
/// most). A JSON line must carry it as `fields.address`; a text line as `127.0.0.1:<port>`.
pub async fn metrics_addr(p: &Plugin) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = p.log();
        if let Some(line) = log.lines().rev().find(|l| l.contains(SERVING)) {
            return address_in(line);
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in the log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn address_in(line: &str) -> String {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("bad JSON log line ({e}): {line}"));
        assert_eq!(v["fields"]["message"], SERVING, "{line}");
        return v["fields"]["address"]
            .as_str()
            .expect("address")
            .to_string();
    }
    let at = line.find("127.0.0.1:").expect("an address in the line");
    line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect()
}

/// `GET path` over plain HTTP/1.1: the whole response, head and body.
pub fn http_get_raw(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    raw
}

/// `GET path` over plain HTTP/1.1: (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    let raw = http_get_raw(addr, path);
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample whose line starts with `series` exactly.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

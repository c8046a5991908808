//! Issue 12 §1: gRPC clients that send the socket path as HTTP/2 `:authority` get answers
//! (src/server/authority.rs): a real Python grpcio client, and a raw HTTP/2 client written
//! here, which sends exactly the header encodings such clients use.

use prost::Message;
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use virtdisk_csi::csi::proto as csi;
use virtdisk_test_support::Plugin;

/// The authorities the plugin's JSON log says it replaced (the first one of each connection).
fn replaced_authorities(p: &Plugin) -> Vec<String> {
    p.log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("the server sees localhost"))
        })
        .filter_map(|v| v["fields"]["authority"].as_str().map(str::to_string))
        .collect()
}

const PYTHON_CLIENT: &str = r#"
import json, sys
import grpc
import csi_pb2, csi_pb2_grpc

sock = sys.argv[1]
channels = {
    "default": [],
    "socket-path authority": [("grpc.default_authority", sock)],
}
for label, options in channels.items():
    with grpc.insecure_channel("unix://" + sock, options=options) as channel:
        identity = csi_pb2_grpc.IdentityStub(channel)
        info = identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=20)
        probe = identity.Probe(csi_pb2.ProbeRequest(), timeout=20)
        print(json.dumps({
            "channel": label,
            "grpcio": grpc.__version__,
            "name": info.name,
            "vendor_version": info.vendor_version,
            "ready": probe.ready.value,
        }), flush=True)
"#;

/// Runs `python3 args…` in `dir`; panics with its output when it fails.
fn python(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("python3")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("python3 (scripts/setup-host.sh installs grpcio and grpcio-tools)");
    assert!(
        out.status.success(),
        "python3 {args:?} failed (scripts/setup-host.sh installs grpcio and grpcio-tools):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_default_and_socket_path_authority_channels_get_answers() {
    let p = Plugin::start("monolith", &["--log-format", "json"]).await;
    let dir = tempfile::tempdir().unwrap();
    // Stubs generated from the plugin's own proto, as a Python user would.
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
    python(
        dir.path(),
        &[
            "-m",
            "grpc_tools.protoc",
            &format!("-I{}", proto_dir.display()),
            "--python_out=.",
            "--grpc_python_out=.",
            "csi.proto",
        ],
    );
    std::fs::write(dir.path().join("client.py"), PYTHON_CLIENT).unwrap();
    let socket = p.socket.to_str().unwrap();
    let out = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        let socket = socket.to_string();
        move || python(&dir, &["client.py", &socket])
    })
    .await
    .unwrap();
    let results: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    println!("python grpcio results: {results:?}");
    assert_eq!(results.len(), 2, "{out}");
    for r in &results {
        assert_eq!(r["name"], "virtdisk.csi.io", "{r}");
        assert_eq!(r["vendor_version"], env!("CARGO_PKG_VERSION"), "{r}");
        assert_eq!(r["ready"], true, "{r}");
    }
    // Both channels really sent an authority the HTTP/2 server would have refused: grpcio's
    // default (≥ 1.57) is the percent-encoded path, the other the path itself.
    let replaced = replaced_authorities(&p);
    assert!(
        replaced.iter().any(|a| a.contains("%2F")),
        "default channel: {replaced:?}"
    );
    assert!(
        replaced.iter().any(|a| a == socket),
        "socket-path channel: {replaced:?}"
    );
}

// ---- A raw HTTP/2 client ----
// The h2 crate's client cannot send an invalid authority, so this one frames and
// HPACK-encodes its requests itself (httlib-hpack), the way grpc-go 1.27 and grpc-core do.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// What the server answered on one stream.
#[derive(Default, Debug)]
struct Answer {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        (self.headers.iter().chain(&self.trailers))
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads frames until every stream in `streams` has ended; answers SETTINGS and PING.
async fn read_answers(conn: &mut UnixStream, streams: &[u32]) -> HashMap<u32, Answer> {
    let mut decoder = loona_hpack::Decoder::new();
    let mut answers: HashMap<u32, Answer> = HashMap::new();
    let mut ended = 0;
    let mut block = Vec::new();
    while ended < streams.len() {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).await.expect("server closed");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0; len];
        conn.read_exact(&mut payload).await.unwrap();
        match kind {
            SETTINGS if flags & ACK == 0 => {
                conn.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap()
            }
            PING if flags & ACK == 0 => conn
                .write_all(&frame(PING, ACK, 0, &payload))
                .await
                .unwrap(),
            RST_STREAM => panic!("stream {stream} reset, error code {payload:?}"),
            GOAWAY => panic!("GOAWAY {payload:?}"),
            DATA => answers.entry(stream).or_default().body.extend(payload),
            HEADERS | CONTINUATION => {
                block.extend_from_slice(&payload);
                if flags & END_HEADERS != 0 {
                    let fields: Vec<(String, String)> = decoder
                        .decode(&block)
                        .unwrap()
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect();
                    block.clear();
                    let answer = answers.entry(stream).or_default();
                    if answer.headers.is_empty() {
                        answer.headers = fields;
                    } else {
                        answer.trailers = fields;
                    }
                }
            }
            _ => {}
        }
        if flags & END_STREAM != 0 && (kind == DATA || kind == HEADERS) {
            ended += 1;
        }
    }
    answers
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_http2_client_with_socket_path_authority_gets_plugin_info() {
    use httlib_hpack::Encoder;
    let p = Plugin::start("monolith", &["--log-format", "json"]).await;
    let socket = p.socket.to_str().unwrap();
    let mut conn = UnixStream::connect(&p.socket).await.unwrap();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let mut encoder = Encoder::default();
    // Stream 1: the path as a Huffman-coded literal, added to the dynamic table (what
    // grpc-go 1.27 sends); stream 3: the same fields as dynamic-table indexes; stream 5: the
    // plain path without indexing.
    let variants = [
        (1u32, Encoder::HUFFMAN_VALUE | Encoder::WITH_INDEXING),
        (3, Encoder::BEST_FORMAT),
        (5, 0),
    ];
    for (stream, flags) in variants {
        let mut block = Vec::new();
        for (name, value, flags) in [
            (":method", "POST", Encoder::BEST_FORMAT),
            (":scheme", "http", Encoder::BEST_FORMAT),
            (":path", "/csi.v1.Identity/GetPluginInfo", flags),
            (":authority", socket, flags),
            ("content-type", "application/grpc", flags),
            ("te", "trailers", flags),
        ] {
            let field = (name.as_bytes().to_vec(), value.as_bytes().to_vec(), flags);
            encoder.encode(field, &mut block).unwrap();
        }
        out.extend(frame(HEADERS, END_HEADERS, stream, &block));
        // One gRPC message: not compressed, length 0 (an empty GetPluginInfoRequest).
        out.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]));
    }
    conn.write_all(&out).await.unwrap();
    let streams = [1, 3, 5];
    let answers = tokio::time::timeout(Duration::from_secs(30), read_answers(&mut conn, &streams))
        .await
        .expect("answers within 30 s");
    for stream in streams {
        let answer = &answers[&stream];
        assert_eq!(answer.header(":status"), Some("200"), "{answer:?}");
        assert_eq!(answer.header("grpc-status"), Some("0"), "{answer:?}");
        let (flag, message) = answer.body.split_at(5);
        assert_eq!(flag[0], 0, "uncompressed");
        let info = csi::GetPluginInfoResponse::decode(message).unwrap();
        assert_eq!(info.name, "virtdisk.csi.io");
    }
    assert_eq!(replaced_authorities(&p), [socket]);
}

//! Lets gRPC clients that send the socket path as HTTP/2 `:authority` reach the server.
//!
//! # Why this exists
//!
//! A gRPC client dialing a unix socket has no host name to put in the `:authority`
//! pseudo-header of its requests, and clients disagree on what to send instead: tonic and
//! grpc-go dialing a `unix://` target send `localhost`, while Python grpcio ≥ 1.57 (the
//! percent-encoded path), grpc-java, grpcurl and grpc-go 1.27 (used by Nomad 1.0–1.2 to dial
//! CSI plugins) send the socket path. A path is not a valid URI authority, and the HTTP/2
//! server under tonic (the `h2` crate) resets every such stream with `PROTOCOL_ERROR` while
//! decoding its headers, before tonic or any tower layer sees the request; it has no option to
//! relax that check.
//! Upstream: <https://github.com/hyperium/h2/pull/487> (the fix, open and unmerged),
//! <https://github.com/hyperium/h2/issues/442>, <https://github.com/hyperium/tonic/issues/243>.
//!
//! # What it does
//!
//! [`AuthorityFix`] wraps each accepted connection. The server→client direction passes through
//! untouched. In the client→server direction it follows the HTTP/2 framing (RFC 9113 §3.4, §4):
//! the 24-byte connection preface, then frames. Every frame other than a header block passes
//! through unchanged, streamed, without being buffered. A header block (a HEADERS frame and its
//! CONTINUATION frames, with PADDED and PRIORITY handled) is collected, decoded with an HPACK
//! decoder that keeps the client's dynamic table (RFC 7541; table limit 4096 octets, the
//! HTTP/2 default of SETTINGS_HEADER_TABLE_SIZE, which tonic does not change), and
//! re-encoded field by field as literals without indexing, so the server's own HPACK table
//! stays empty and always agrees with what it is sent. An `:authority` that the server would
//! reject (exactly: `http::uri::Authority` does not parse it, the check `h2` makes) becomes
//! `localhost`, what grpc-go sends over a unix socket. The block is then framed again as
//! HEADERS + CONTINUATION frames of at most 16 384 octets (the smallest SETTINGS_MAX_FRAME_SIZE
//! a peer may announce), keeping END_STREAM and the priority fields; padding is dropped.
//!
//! The first header block of a connection decides: a gRPC channel sends the same authority
//! on every call, so when the first block needs no fix (tonic and grpc-go clients), it is
//! forwarded as the client encoded it and the rest of the connection passes through untouched
//! (the server's HPACK table then follows the client's). The shim thus costs such clients one
//! decode per connection; a client that sends a valid authority first and an invalid one on a
//! later call of the same connection (a per-call authority override) is refused as before.
//!
//! A connection that does not start with the HTTP/2 preface passes through untouched. A header
//! block larger than [`MAX_HEADER_BLOCK`] octets, encoded or decoded, or one that breaks the
//! framing or HPACK rules, closes the connection (an `InvalidData` read error): the server
//! would have refused it too, and nothing is buffered without bound.
//!
//! The HPACK decoder is `loona-hpack`, the fork of `hpack` kept by the loona HTTP/2 server:
//! `hpack` itself is unmaintained and panics on malformed input (RUSTSEC-2023-0085), the
//! decoder of `httlib-hpack` panics on a truncated integer, and `h2` keeps its codec private
//! (even with its `unstable` feature). `loona-hpack` returns errors instead, enforces the table
//! size limit, and hands indexed fields out without copying; its Huffman decoding is slow
//! (about 20 µs per string in a release build), which the first-block rule above keeps off the
//! connections that need no fix.
//!
//! Cost, on connections that need the fix: one HPACK decode and a plain re-encode per header
//! block, and the request bodies are copied once more in memory (figures in the README,
//! Conformance section).

use bytes::{Buf, BytesMut};
use std::borrow::Cow;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Stream dependency (4 octets) and weight (1 octet) of a HEADERS frame with PRIORITY.
const PRIORITY_LEN: usize = 5;
/// Frames we write carry at most this much payload: the HTTP/2 minimum of
/// SETTINGS_MAX_FRAME_SIZE, which every server accepts.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The HPACK dynamic table limit the client encodes against: SETTINGS_HEADER_TABLE_SIZE of the
/// server, which tonic leaves at the HTTP/2 default.
const HEADER_TABLE_SIZE: usize = 4096;
/// Largest header block accepted, in octets, both as received (all its frames' fragments) and
/// decoded (RFC 9113 §6.5.2 accounting: name + value + 32 per field). The server itself refuses
/// header lists over 16 KiB (hyper's SETTINGS_MAX_HEADER_LIST_SIZE, stream by stream); past
/// this far larger bound the whole connection is closed.
pub(crate) const MAX_HEADER_BLOCK: usize = 1 << 20;
/// What an unusable `:authority` becomes.
const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";
/// How much to ask the socket for at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why a connection was closed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RewriteError {
    #[error("HTTP/2 header block on stream {stream} exceeds {MAX_HEADER_BLOCK} octets")]
    TooLarge { stream: u32 },
    #[error(
        "HTTP/2 frame of type {kind:#x} on stream {got} where CONTINUATION of stream {expected} \
         was due"
    )]
    ExpectedContinuation { expected: u32, kind: u8, got: u32 },
    #[error("malformed HTTP/2 HEADERS frame on stream {stream}: {what}")]
    MalformedHeaders { stream: u32, what: &'static str },
    #[error("HPACK decoding failed on stream {stream}: {cause:?}")]
    Hpack {
        stream: u32,
        cause: loona_hpack::decoder::DecoderError,
    },
}

/// A frame header (RFC 9113 §4.1).
#[derive(Debug, Clone, Copy)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> FrameHead {
        FrameHead {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    fn write(self, out: &mut BytesMut) {
        let len = (self.len as u32).to_be_bytes();
        out.extend_from_slice(&len[1..]);
        out.extend_from_slice(&[self.kind, self.flags]);
        out.extend_from_slice(&self.stream.to_be_bytes());
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Waiting for the 24-octet connection preface.
    Preface,
    /// Waiting for the next 9-octet frame header.
    FrameHead,
    /// Passing this many more octets of a frame's payload through.
    Forward(usize),
    /// Waiting for the whole payload of a HEADERS or CONTINUATION frame.
    HeaderPayload(FrameHead),
    /// Not HTTP/2: everything passes through.
    Passthrough,
}

/// A header block being collected from HEADERS + CONTINUATION frames.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
}

/// What happens to a connection's header blocks, decided by its first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not decided yet: no header block has ended.
    Undecided,
    /// The first block had nothing to fix: it and everything after it pass as the client sent
    /// them, so the server's HPACK table keeps following the client's.
    Untouched,
    /// The first block needed a fix: every block is decoded and re-encoded without indexing.
    Rewrite,
}

/// The client→server byte-stream rewriter, without I/O: bytes go in, bytes come out.
pub(crate) struct Rewriter {
    state: State,
    mode: Mode,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    /// `:authority` values replaced so far on this connection.
    replaced: u64,
}

impl Default for Rewriter {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        decoder.set_max_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            state: State::Preface,
            mode: Mode::Undecided,
            block: None,
            decoder,
            replaced: 0,
        }
    }
}

impl Rewriter {
    /// Consumes what it can of `input` (bytes from the client) and appends what the server is
    /// to read to `out`. Incomplete frames stay in `input` until more bytes arrive; at most one
    /// frame payload plus one header block is held.
    pub(crate) fn process(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), RewriteError> {
        loop {
            match self.state {
                State::Preface => {
                    let n = input.len().min(PREFACE.len());
                    if input[..n] != PREFACE[..n] {
                        self.state = State::Passthrough;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    out.extend_from_slice(&input[..n]);
                    input.advance(n);
                    self.state = State::FrameHead;
                }
                State::Passthrough => {
                    out.extend_from_slice(input);
                    input.clear();
                    return Ok(());
                }
                State::FrameHead => {
                    if input.len() < FRAME_HEADER_LEN {
                        return Ok(());
                    }
                    let head = FrameHead::parse(&input[..FRAME_HEADER_LEN]);
                    if let Some(block) = &self.block {
                        if head.kind != CONTINUATION || head.stream != block.stream {
                            return Err(RewriteError::ExpectedContinuation {
                                expected: block.stream,
                                kind: head.kind,
                                got: head.stream,
                            });
                        }
                        if block.fragment.len() + head.len > MAX_HEADER_BLOCK {
                            return Err(RewriteError::TooLarge {
                                stream: head.stream,
                            });
                        }
                    } else if head.kind == HEADERS && head.len > MAX_HEADER_BLOCK {
                        return Err(RewriteError::TooLarge {
                            stream: head.stream,
                        });
                    }
                    if head.kind == HEADERS || self.block.is_some() {
                        input.advance(FRAME_HEADER_LEN);
                        self.state = State::HeaderPayload(head);
                    } else {
                        // Any other frame, including a stray CONTINUATION (the server
                        // answers that with PROTOCOL_ERROR): untouched.
                        out.extend_from_slice(&input[..FRAME_HEADER_LEN]);
                        input.advance(FRAME_HEADER_LEN);
                        self.state = State::Forward(head.len);
                    }
                }
                State::Forward(remaining) => {
                    let n = remaining.min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input.advance(n);
                    if n < remaining {
                        self.state = State::Forward(remaining - n);
                        return Ok(());
                    }
                    self.state = State::FrameHead;
                }
                State::HeaderPayload(head) => {
                    if input.len() < head.len {
                        input.reserve(head.len - input.len());
                        return Ok(());
                    }
                    self.add_fragment(head, &input[..head.len])?;
                    input.advance(head.len);
                    self.state = State::FrameHead;
                    if head.flags & END_HEADERS != 0 {
                        let block = self.block.take().expect("a block was just added to");
                        if self.emit(block, out)? == Mode::Untouched {
                            self.state = State::Passthrough;
                        }
                    }
                }
            }
        }
    }

    /// Adds a HEADERS or CONTINUATION payload to the block being collected.
    fn add_fragment(&mut self, head: FrameHead, payload: &[u8]) -> Result<(), RewriteError> {
        if let Some(block) = &mut self.block {
            block.fragment.extend_from_slice(payload);
            return Ok(());
        }
        let malformed = |what| RewriteError::MalformedHeaders {
            stream: head.stream,
            what,
        };
        let mut rest = payload;
        let mut pad = 0;
        if head.flags & PADDED != 0 {
            let (&len, tail) = rest
                .split_first()
                .ok_or_else(|| malformed("no pad length"))?;
            pad = usize::from(len);
            rest = tail;
        }
        let mut priority = None;
        if head.flags & PRIORITY != 0 {
            if rest.len() < PRIORITY_LEN {
                return Err(malformed("priority fields cut short"));
            }
            let (fields, tail) = rest.split_at(PRIORITY_LEN);
            priority = Some(fields.try_into().expect("five octets"));
            rest = tail;
        }
        if pad > rest.len() {
            return Err(malformed("padding longer than the payload"));
        }
        self.block = Some(Block {
            stream: head.stream,
            end_stream: head.flags & END_STREAM != 0,
            priority,
            fragment: rest[..rest.len() - pad].to_vec(),
        });
        Ok(())
    }

    /// Decodes a complete header block, fixes its `:authority`, and writes it re-encoded and
    /// re-framed to `out`, or as it was if this is the first block and it needs no fix.
    /// Returns the connection's mode from now on.
    fn emit(&mut self, block: Block, out: &mut BytesMut) -> Result<Mode, RewriteError> {
        let stream = block.stream;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut decoded_size = 0usize;
        let mut replaced = None;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded_size += name.len() + value.len() + 32;
                if decoded_size > MAX_HEADER_BLOCK {
                    return;
                }
                let value = if &name[..] == b":authority"
                    && http::uri::Authority::try_from(&value[..]).is_err()
                {
                    replaced = Some(value.into_owned());
                    Cow::Borrowed(REPLACEMENT_AUTHORITY)
                } else {
                    value
                };
                write_literal(&mut encoded, &name, &value);
            })
            .map_err(|cause| RewriteError::Hpack { stream, cause })?;
        if decoded_size > MAX_HEADER_BLOCK {
            return Err(RewriteError::TooLarge { stream });
        }
        if self.mode == Mode::Undecided && replaced.is_none() {
            self.mode = Mode::Untouched;
            write_frames(&block, &block.fragment, out);
            return Ok(self.mode);
        }
        self.mode = Mode::Rewrite;
        if let Some(original) = replaced {
            if self.replaced == 0 {
                tracing::debug!(
                    stream,
                    authority = %String::from_utf8_lossy(&original),
                    "HTTP/2 :authority is not a host name (a socket path?); the server sees localhost"
                );
            }
            self.replaced += 1;
        }
        write_frames(&block, &encoded, out);
        Ok(self.mode)
    }

    /// Whether everything from now on passes through untouched.
    fn passes_through(&self) -> bool {
        matches!(self.state, State::Passthrough)
    }

    /// How many `:authority` values were replaced on this connection.
    #[cfg(test)]
    pub(crate) fn replaced(&self) -> u64 {
        self.replaced
    }
}

/// HPACK "literal header field without indexing — new name" (RFC 7541 §6.2.2), no Huffman.
fn write_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    for s in [name, value] {
        loona_hpack::encoder::encode_integer_into(s.len(), 7, 0x00, out)
            .expect("writing to a Vec cannot fail");
        out.extend_from_slice(s);
    }
}

/// Frames `encoded` as one HEADERS frame plus as many CONTINUATION frames as needed.
fn write_frames(block: &Block, encoded: &[u8], out: &mut BytesMut) {
    let priority_len = block.priority.map_or(0, |p| p.len());
    let (first, mut rest) = encoded.split_at(encoded.len().min(MAX_FRAME_PAYLOAD - priority_len));
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    out.reserve(encoded.len() + FRAME_HEADER_LEN * (2 + encoded.len() / MAX_FRAME_PAYLOAD));
    FrameHead {
        len: priority_len + first.len(),
        kind: HEADERS,
        flags,
        stream: block.stream,
    }
    .write(out);
    if let Some(priority) = &block.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        rest = tail;
        FrameHead {
            len: chunk.len(),
            kind: CONTINUATION,
            flags: if rest.is_empty() { END_HEADERS } else { 0 },
            stream: block.stream,
        }
        .write(out);
        out.extend_from_slice(chunk);
    }
}

/// A connection whose client→server bytes go through a [`Rewriter`]; see the module doc.
pub(crate) struct AuthorityFix<S> {
    io: S,
    rewriter: Rewriter,
    /// Bytes read from the client, not yet rewritten.
    input: BytesMut,
    /// Rewritten bytes the server has not read yet.
    output: BytesMut,
}

impl<S> AuthorityFix<S> {
    pub(crate) fn new(io: S) -> Self {
        AuthorityFix {
            io,
            rewriter: Rewriter::default(),
            input: BytesMut::new(),
            output: BytesMut::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output[..n]);
                this.output.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.input.is_empty() && this.rewriter.passes_through() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            this.input.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut this.io),
                cx,
                &mut this.input
            ))?;
            if n == 0 {
                // End of stream; an incomplete frame left in `input` is dropped, as the
                // server would drop it.
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.rewriter.process(&mut this.input, &mut this.output) {
                tracing::warn!(error = %e, "closing the gRPC connection");
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<S>
{
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use httlib_hpack::Encoder;

    const SOCKET: &str = "/run/virtdisk/csi.sock";
    const HUFFMAN: u8 = Encoder::HUFFMAN_NAME | Encoder::HUFFMAN_VALUE;
    const INDEX: u8 = Encoder::WITH_INDEXING;
    /// Use the static or dynamic table where the field is there.
    const BEST: u8 = Encoder::BEST_FORMAT;

    type Fields = Vec<(String, String)>;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        FrameHead {
            len: payload.len(),
            kind,
            flags,
            stream,
        }
        .write(&mut out);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    /// HPACK-encodes `fields` as a client would, with `flags` per field.
    fn encode(encoder: &mut Encoder, fields: &[(&str, &str, u8)]) -> Vec<u8> {
        let mut block = Vec::new();
        for (name, value, flags) in fields {
            let field = (name.as_bytes().to_vec(), value.as_bytes().to_vec(), *flags);
            encoder.encode(field, &mut block).unwrap();
        }
        block
    }

    fn request(authority: &str, flags: u8) -> Vec<(&str, &str, u8)> {
        vec![
            (":method", "POST", BEST),
            (":scheme", "http", BEST),
            (":path", "/csi.v1.Identity/GetPluginInfo", flags),
            (":authority", authority, flags),
            ("content-type", "application/grpc", flags),
            ("te", "trailers", flags),
        ]
    }

    fn expected(authority: &str) -> Fields {
        request(authority, 0)
            .into_iter()
            .map(|(n, v, _)| (n.to_string(), v.to_string()))
            .collect()
    }

    fn rewrite(input: &[u8]) -> (Vec<u8>, Rewriter) {
        let mut rewriter = Rewriter::default();
        let mut input = BytesMut::from(input);
        let mut out = BytesMut::new();
        rewriter.process(&mut input, &mut out).unwrap();
        assert!(input.is_empty(), "{} octets left unprocessed", input.len());
        (out.to_vec(), rewriter)
    }

    fn frames(mut bytes: &[u8]) -> Vec<(FrameHead, Vec<u8>)> {
        assert_eq!(&bytes[..PREFACE.len()], PREFACE);
        bytes = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let head = FrameHead::parse(&bytes[..FRAME_HEADER_LEN]);
            let end = FRAME_HEADER_LEN + head.len;
            frames.push((head, bytes[FRAME_HEADER_LEN..end].to_vec()));
            bytes = &bytes[end..];
        }
        frames
    }

    /// Decodes the header blocks of the rewritten stream as the server would, with a decoder
    /// whose dynamic table holds nothing: a block that relied on it would fail to decode.
    fn server_view(bytes: &[u8]) -> Vec<Fields> {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_table_size(0);
        let mut lists = Vec::new();
        let mut block = Vec::new();
        for (head, payload) in frames(bytes) {
            assert!(head.len <= MAX_FRAME_PAYLOAD);
            match head.kind {
                HEADERS => {
                    assert!(block.is_empty());
                    assert_eq!(head.flags & PADDED, 0);
                    let skip = if head.flags & PRIORITY != 0 { 5 } else { 0 };
                    block.extend_from_slice(&payload[skip..]);
                }
                CONTINUATION => block.extend_from_slice(&payload),
                _ => continue,
            }
            if head.flags & END_HEADERS != 0 {
                let fields = decoder.decode(&block).unwrap();
                lists.push(
                    fields
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
                block.clear();
            }
        }
        lists
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        for f in frames {
            bytes.extend_from_slice(f);
        }
        bytes
    }

    #[test]
    fn socket_path_authority_becomes_localhost_on_every_request_of_a_connection() {
        let mut client = Encoder::default();
        // 1: Huffman-coded literals, inserted into the client's dynamic table.
        let first = encode(&mut client, &request(SOCKET, HUFFMAN | INDEX));
        // 2: the same request, every field now an index into the dynamic table.
        let second = encode(&mut client, &request(SOCKET, BEST));
        assert!(second.len() < 8, "second request should be all indexes");
        // 3: Python grpcio's percent-encoded path, literal without indexing.
        let third = encode(&mut client, &request("%2Frun%2Fvirtdisk%2Fcsi.sock", 0));
        // 4: a valid authority stays as it is.
        let fourth = encode(&mut client, &request("localhost:50051", HUFFMAN));
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, END_STREAM, 1, &[0, 0, 0, 0, 0]);
        let input = connection(&[
            settings.clone(),
            frame(HEADERS, END_HEADERS, 1, &first),
            data.clone(),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
            frame(HEADERS, END_HEADERS | END_STREAM, 5, &third),
            frame(HEADERS, END_HEADERS | END_STREAM, 7, &fourth),
        ]);
        let (out, rewriter) = rewrite(&input);
        assert_eq!(
            server_view(&out),
            vec![
                expected("localhost"),
                expected("localhost"),
                expected("localhost"),
                expected("localhost:50051")
            ]
        );
        assert_eq!(rewriter.replaced(), 3);
        // Other frames pass through byte for byte, flags and stream ids are kept.
        let frames = frames(&out);
        assert_eq!(frame(frames[0].0.kind, 0, 0, &frames[0].1), settings);
        assert_eq!(frame(0, frames[2].0.flags, 1, &frames[2].1), data);
        let heads: Vec<(u8, u8, u32)> = frames
            .iter()
            .map(|(h, _)| (h.kind, h.flags, h.stream))
            .collect();
        assert_eq!(
            heads,
            [
                (0x4, 0, 0),
                (HEADERS, END_HEADERS, 1),
                (0x0, END_STREAM, 1),
                (HEADERS, END_HEADERS | END_STREAM, 3),
                (HEADERS, END_HEADERS | END_STREAM, 5),
                (HEADERS, END_HEADERS | END_STREAM, 7),
            ]
        );
    }

    #[test]
    fn a_connection_whose_first_request_needs_no_fix_passes_through_untouched() {
        let mut client = Encoder::default();
        let first = encode(&mut client, &request("localhost", HUFFMAN | INDEX));
        let second = encode(&mut client, &request("localhost", BEST));
        // A per-call override to a path later on the same connection is not fixed: the
        // server refuses that call, as it did without the shim.
        let third = encode(&mut client, &request(SOCKET, BEST));
        let input = connection(&[
            frame(0x4, 0, 0, &[]),
            frame(HEADERS, END_STREAM, 1, &first[..4]),
            frame(CONTINUATION, END_HEADERS, 1, &first[4..]),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
            frame(HEADERS, END_HEADERS | END_STREAM, 5, &third),
        ]);
        let (out, rewriter) = rewrite(&input);
        assert!(rewriter.passes_through());
        assert_eq!(rewriter.replaced(), 0);
        // The first block is re-framed (here: into one frame), its HPACK octets unchanged.
        let mut want = connection(&[
            frame(0x4, 0, 0, &[]),
            frame(HEADERS, END_STREAM | END_HEADERS, 1, &first),
        ]);
        want.extend_from_slice(&input[want.len() + FRAME_HEADER_LEN..]);
        assert_eq!(out, want);
    }

    #[test]
    fn continuation_padding_and_priority_are_handled() {
        let mut client = Encoder::default();
        let block = encode(&mut client, &request(SOCKET, HUFFMAN | INDEX));
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(7);
        let priority = [0x80, 0, 0, 3, 200];
        let mut payload = vec![4u8];
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0; 4]);
        let input = connection(&[
            frame(HEADERS, PADDED | PRIORITY | END_STREAM, 9, &payload),
            frame(CONTINUATION, 0, 9, b),
            frame(CONTINUATION, END_HEADERS, 9, c),
        ]);
        let (out, _) = rewrite(&input);
        assert_eq!(server_view(&out), vec![expected("localhost")]);
        let frames = frames(&out);
        assert_eq!(frames.len(), 1);
        let (head, payload) = &frames[0];
        assert_eq!(head.flags, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(payload[..5], priority);
    }

    #[test]
    fn a_large_block_is_reframed_within_the_frame_size_limit() {
        let big = "x".repeat(40_000);
        let mut fields = request(SOCKET, 0);
        fields.push(("x-big", &big, 0));
        let block = encode(&mut Encoder::default(), &fields);
        // The client may send frames up to the server's SETTINGS_MAX_FRAME_SIZE.
        let input = connection(&[frame(HEADERS, END_HEADERS, 1, &block)]);
        let (out, _) = rewrite(&input);
        let mut want = expected("localhost");
        want.push(("x-big".to_string(), big));
        assert_eq!(server_view(&out), vec![want]);
        let kinds: Vec<(u8, u8)> = frames(&out)
            .iter()
            .map(|(h, _)| (h.kind, h.flags))
            .collect();
        assert_eq!(
            kinds,
            [(HEADERS, 0), (CONTINUATION, 0), (CONTINUATION, END_HEADERS)]
        );
    }

    #[test]
    fn input_arriving_one_octet_at_a_time_gives_the_same_output() {
        let mut client = Encoder::default();
        let first = encode(&mut client, &request(SOCKET, HUFFMAN | INDEX));
        let second = encode(&mut client, &request(SOCKET, BEST));
        let input = connection(&[
            frame(0x4, 0, 0, &[]),
            frame(HEADERS, END_STREAM, 1, &first[..5]),
            frame(CONTINUATION, END_HEADERS, 1, &first[5..]),
            frame(0x0, END_STREAM, 1, b"hello"),
            frame(HEADERS, END_HEADERS, 3, &second),
        ]);
        let (whole, _) = rewrite(&input);
        let mut rewriter = Rewriter::default();
        let mut pending = BytesMut::new();
        let mut out = BytesMut::new();
        for octet in &input {
            pending.extend_from_slice(&[*octet]);
            rewriter.process(&mut pending, &mut out).unwrap();
        }
        assert_eq!(out.to_vec(), whole);
    }

    #[test]
    fn a_connection_without_the_http2_preface_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: /run/x.sock\r\n\r\n";
        assert_eq!(rewrite(input).0, input);
    }

    #[test]
    fn bad_header_blocks_close_the_connection() {
        let err = |frames: &[Vec<u8>]| {
            let mut input = BytesMut::from(&connection(frames)[..]);
            Rewriter::default()
                .process(&mut input, &mut BytesMut::new())
                .unwrap_err()
        };
        let block = encode(&mut Encoder::default(), &request(SOCKET, 0));
        let oversized = vec![0u8; MAX_HEADER_BLOCK + 1];
        assert!(matches!(
            err(&[frame(HEADERS, END_HEADERS, 1, &oversized)]),
            RewriteError::TooLarge { stream: 1 }
        ));
        // Many CONTINUATION frames, none ending the block.
        let mut flood = vec![frame(HEADERS, 0, 1, &block)];
        flood.extend(std::iter::repeat_n(
            frame(CONTINUATION, 0, 1, &[0; 16_384]),
            65,
        ));
        assert!(matches!(err(&flood), RewriteError::TooLarge { stream: 1 }));
        // Another frame in the middle of a header block.
        assert!(matches!(
            err(&[frame(HEADERS, 0, 1, &block), frame(0x0, 0, 1, b"x")]),
            RewriteError::ExpectedContinuation {
                expected: 1,
                kind: 0x0,
                got: 1
            }
        ));
        assert!(matches!(
            err(&[frame(HEADERS, PADDED | END_HEADERS, 1, &[200, 0x82])]),
            RewriteError::MalformedHeaders { .. }
        ));
        assert!(matches!(
            err(&[frame(HEADERS, PRIORITY | END_HEADERS, 1, &[0, 0])]),
            RewriteError::MalformedHeaders { .. }
        ));
        // An index past the end of both tables; a truncated size update.
        for garbage in [&[0xff, 0x7f][..], &[0x3f][..]] {
            assert!(matches!(
                err(&[frame(HEADERS, END_HEADERS, 1, garbage)]),
                RewriteError::Hpack { stream: 1, .. }
            ));
        }
        // A small block that decodes to far more than the limit: one large entry in the
        // dynamic table, then thousands of one-octet references to it.
        let mut client = Encoder::default();
        let mut amplified = encode(&mut client, &[("x-a", &"a".repeat(4000), INDEX)]);
        amplified.extend(std::iter::repeat_n(0x80 | 62, 300));
        assert!(matches!(
            err(&[frame(HEADERS, END_HEADERS, 1, &amplified)]),
            RewriteError::TooLarge { stream: 1 }
        ));
    }

    #[tokio::test]
    async fn the_connection_wrapper_rewrites_reads_and_passes_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = AuthorityFix::new(server);
        let block = encode(&mut Encoder::default(), &request(SOCKET, HUFFMAN | INDEX));
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &block),
            frame(0x0, END_STREAM, 1, &[7; 300]),
        ]);
        let (expected_out, _) = rewrite(&input);
        let writer = tokio::spawn(async move {
            client.write_all(&input).await.unwrap();
            let mut reply = [0; 5];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply, b"reply");
        });
        let mut got = vec![0; expected_out.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected_out);
        server.write_all(b"reply").await.unwrap();
        writer.await.unwrap();
    }
}

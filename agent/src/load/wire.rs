//! HTTP/1.1 on one kept-alive connection for the load engine: each request
//! is written once as bytes before the run, each response read into one
//! reused buffer and parsed with `httparse` (no per-request allocation on the
//! common path, one write and usually one read per request, like wrk).

use std::ops::Range;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request, serialised once.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub bytes: Vec<u8>,
    /// A HEAD request: its response has no body whatever its headers say.
    pub head: bool,
}

/// Writes a request as it goes on the wire. `host` is the `Host` header
/// (`127.0.0.1:8000`); headers were checked by `cases::check_headers`.
pub fn prepare(method: &str, host: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> Prepared {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n").as_bytes());
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS") {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    Prepared { bytes: out, head: method == "HEAD" }
}

/// Why an exchange failed, as the error kinds a load result counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// The server closed the connection or it was reset.
    Closed,
    /// Closed before any byte of the answer came: on a kept-alive
    /// connection, the server had closed it while it sat idle (the request
    /// may go again on a new one).
    ClosedIdle,
    /// Not an HTTP/1.1 response this engine can read.
    Malformed,
    /// A body past [`MAX_BODY`].
    TooLarge,
}

/// A response read off the connection.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Where the body lies in [`Conn::body`].
    body: Range<usize>,
    /// The server will close the connection after this response.
    pub close: bool,
}

/// One connection and its read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// A chunked body, decoded (the common, content-length body stays in `buf`).
    chunked: Vec<u8>,
    chunked_body: bool,
}

const MAX_HEADERS: usize = 64;
/// A response head larger than this is malformed for a load test.
const MAX_HEAD: usize = 64 * 1024;
/// The largest body one response may have (bounded memory: up to 1024
/// connections hold one each).
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// A buffer grown past this by a large answer is given back afterwards.
const KEEP_BUFFER: usize = 256 * 1024;

impl Conn {
    /// Connects to the first of `addrs` that answers (`localhost` may be
    /// `::1` and 127.0.0.1).
    pub async fn open(addrs: &[std::net::SocketAddr]) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addrs).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: Vec::with_capacity(8192), chunked: Vec::new(), chunked_body: false })
    }

    /// The body of the last response read.
    pub fn body(&self, r: &Response) -> &[u8] {
        if self.chunked_body { &self.chunked } else { &self.buf[r.body.clone()] }
    }

    /// Sends a request and reads its whole response.
    pub async fn exchange(&mut self, request: &Prepared) -> Result<Response, Broken> {
        if self.buf.capacity() > KEEP_BUFFER {
            self.buf = Vec::with_capacity(8192);
            self.chunked = Vec::new();
        }
        self.stream.write_all(&request.bytes).await.map_err(|_| Broken::ClosedIdle)?;
        self.buf.clear();
        self.chunked_body = false;
        let (status, head_len, framing, close) = self.final_head().await?;
        let bodiless = request.head || status == 204 || status == 304;
        let body = match framing {
            _ if bodiless => head_len..head_len,
            Framing::Length(n) if n > MAX_BODY => return Err(Broken::TooLarge),
            Framing::Length(n) => {
                while self.buf.len() < head_len + n {
                    self.fill().await?;
                }
                head_len..head_len + n
            }
            Framing::Chunked => {
                self.read_chunked(head_len).await?;
                0..0
            }
            Framing::UntilClose => {
                while self.fill().await.is_ok() {
                    if self.buf.len() - head_len > MAX_BODY {
                        return Err(Broken::TooLarge);
                    }
                }
                head_len..self.buf.len()
            }
        };
        let close = close || matches!(framing, Framing::UntilClose) && !bodiless;
        Ok(Response { status, body, close })
    }

    /// Reads up to the final response's head, past interim 1xx answers
    /// (`100 Continue`, `103 Early Hints`): their bytes are dropped.
    async fn final_head(&mut self) -> Result<Head, Broken> {
        loop {
            match parse_head(&self.buf)? {
                Some((status, len, ..)) if (100..200).contains(&status) && status != 101 => {
                    self.buf.drain(..len);
                }
                Some(head) => return Ok(head),
                None if self.buf.len() > MAX_HEAD => return Err(Broken::Malformed),
                None if self.buf.is_empty() => self.fill().await.map_err(|_| Broken::ClosedIdle)?,
                None => self.fill().await?,
            }
        }
    }

    /// Reads more bytes; the end of the stream is `Closed`.
    async fn fill(&mut self) -> Result<(), Broken> {
        self.buf.reserve(8192);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(0) | Err(_) => Err(Broken::Closed),
            Ok(_) => Ok(()),
        }
    }

    /// Decodes a chunked body starting at `at` into `self.chunked`.
    async fn read_chunked(&mut self, mut at: usize) -> Result<(), Broken> {
        self.chunked.clear();
        self.chunked_body = true;
        loop {
            match next_chunk(&self.buf[at..])? {
                Chunk::Need => self.fill().await?,
                Chunk::Data { start, len, next } => {
                    if self.chunked.len() + len > MAX_BODY {
                        return Err(Broken::TooLarge);
                    }
                    let from = at + start;
                    self.chunked.extend_from_slice(&self.buf[from..from + len]);
                    at += next;
                }
                Chunk::End => return Ok(()),
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

type Head = (u16, usize, Framing, bool);

/// Parses a response head: `None` while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Broken> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(Broken::Malformed),
    };
    let status = response.code.ok_or(Broken::Malformed)?;
    let (mut length, mut chunked) = (None, false);
    let mut close = response.version == Some(0);
    let tokens = |v: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(v).split(',').map(|t| t.trim().to_ascii_lowercase()).collect()
    };
    for h in response.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse().ok()).ok_or(Broken::Malformed)?;
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // `gzip, chunked`: the last coding frames the body.
            chunked = tokens(h.value).last().is_some_and(|t| t == "chunked");
        } else if h.name.eq_ignore_ascii_case("connection") {
            let t = tokens(h.value);
            close = t.iter().any(|t| t == "close") || (close && !t.iter().any(|t| t == "keep-alive"));
        }
    }
    // Chunked wins over a Content-Length (RFC 9112, 6.3).
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::UntilClose,
    };
    Ok(Some((status, len, framing, close)))
}

#[derive(Debug, PartialEq, Eq)]
enum Chunk {
    /// More bytes are needed.
    Need,
    /// Data at `start..start + len`; the next chunk starts at `next`.
    Data { start: usize, len: usize, next: usize },
    /// The last chunk and its trailer were read.
    End,
}

/// The next chunk of a chunked body in `buf`.
fn next_chunk(buf: &[u8]) -> Result<Chunk, Broken> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > 1024 { Err(Broken::Malformed) } else { Ok(Chunk::Need) };
    };
    let size_text = std::str::from_utf8(&buf[..eol]).map_err(|_| Broken::Malformed)?;
    let size_text = size_text.split(';').next().unwrap_or_default().trim();
    let len = usize::from_str_radix(size_text, 16).map_err(|_| Broken::Malformed)?;
    let start = eol + 2;
    if len == 0 {
        // The trailer ends with an empty line.
        let rest = &buf[start..];
        if rest.starts_with(b"\r\n") || rest.windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(Chunk::End);
        }
        return Ok(Chunk::Need);
    }
    let next = start.checked_add(len).and_then(|n| n.checked_add(2)).ok_or(Broken::Malformed)?;
    if buf.len() < next {
        return Ok(Chunk::Need);
    }
    if &buf[next - 2..next] != b"\r\n" {
        return Err(Broken::Malformed);
    }
    Ok(Chunk::Data { start, len, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_written_once_with_host_and_length() {
        let p = prepare(
            "POST",
            "127.0.0.1:8000",
            "/translate",
            &[("content-type".into(), "application/json".into())],
            b"{}",
        );
        assert_eq!(
            String::from_utf8(p.bytes).unwrap(),
            "POST /translate HTTP/1.1\r\nHost: 127.0.0.1:8000\r\ncontent-type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
        let g = prepare("GET", "h:1", "/health", &[], b"");
        assert_eq!(String::from_utf8(g.bytes).unwrap(), "GET /health HTTP/1.1\r\nHost: h:1\r\n\r\n");
        assert!(prepare("HEAD", "h:1", "/", &[], b"").head);
    }

    #[test]
    fn response_heads_are_read_with_their_framing() {
        // (bytes, expected: None = incomplete, Err = malformed, Some(status, framing, close))
        type Read = Result<Option<(u16, Framing, bool)>, Broken>;
        let table: [(&[u8], Read); 11] = [
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                Ok(Some((200, Framing::Chunked, false))),
            ),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n", Ok(Some((200, Framing::Chunked, false)))),
            (
                b"HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 0\r\n\r\n",
                Ok(Some((200, Framing::Length(0), true))),
            ),
            (
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
                Ok(Some((200, Framing::Length(0), false))),
            ),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", Ok(Some((200, Framing::Length(5), false)))),
            (b"HTTP/1.1 200 OK\r\ncontent-le", Ok(None)),
            (b"HTTP/1.1 503 X\r\ntransfer-encoding: chunked\r\n\r\n", Ok(Some((503, Framing::Chunked, false)))),
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", Ok(Some((200, Framing::UntilClose, true)))),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", Ok(Some((200, Framing::Length(0), true)))),
            (b"SSH-2.0-OpenSSH\r\n\r\n", Err(Broken::Malformed)),
            (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", Err(Broken::Malformed)),
        ];
        for (bytes, want) in table {
            let got = parse_head(bytes).map(|h| h.map(|(s, _, f, c)| (s, f, c)));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn chunks_are_found_or_asked_for() {
        // (bytes, expected)
        let table: [(&[u8], Result<Chunk, Broken>); 7] = [
            (b"5\r\nhelloXX0\r\n\r\n", Err(Broken::Malformed)),
            (b"5\r\nhello\r\n0\r\n\r\n", Ok(Chunk::Data { start: 3, len: 5, next: 10 })),
            (b"5\r\nhel", Ok(Chunk::Need)),
            (b"a;ext=1\r\n0123456789\r\n", Ok(Chunk::Data { start: 9, len: 10, next: 21 })),
            (b"0\r\n\r\n", Ok(Chunk::End)),
            (b"0\r\n", Ok(Chunk::Need)),
            (b"zz\r\n", Err(Broken::Malformed)),
        ];
        for (bytes, want) in table {
            assert_eq!(next_chunk(bytes), want, "{:?}", String::from_utf8_lossy(bytes));
        }
    }
}

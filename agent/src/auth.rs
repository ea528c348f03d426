//! Who may call the agent. The transport (mutual TLS against a lab CA,
//! bearer tokens, or plaintext only on loopback or when told `insecure`),
//! the caller's identity and role, and the one tower layer that checks
//! every call before any handler runs: `UNAUTHENTICATED` for no identity,
//! `PERMISSION_DENIED` for a role that may not call the method, both logged
//! with the peer.
//!
//! Roles: `controller` (everything) and `observer` (`GetInfo`, `Watch`;
//! methods are matched on the last segment of `/proctor.agent.v1.Agent/Watch`).
//! With mTLS the certificate says who and which role — its subject's common
//! name and organisational unit (`proctor certs issue controller NAME`
//! writes `CN=NAME, OU=controller`); with tokens, the token file does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Controller,
    Observer,
}

impl Role {
    pub fn parse(word: &str) -> Option<Role> {
        match word {
            "controller" => Some(Role::Controller),
            "observer" => Some(Role::Observer),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Observer => "observer",
        }
    }
}

/// Who is calling, as the layer established it; handlers read it from the
/// request's extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The methods an observer may call; a controller may call all.
const OBSERVER_METHODS: [&str; 2] = ["GetInfo", "Watch"];

/// Whether `role` may call the gRPC method at `path` (`/proctor.v1.Agent/Watch`).
pub fn allowed(role: Role, path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or_default();
    role == Role::Controller || OBSERVER_METHODS.contains(&method)
}

/// How callers prove who they are (`[auth] mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Client certificates signed by the lab CA.
    Mtls,
    /// `authorization: Bearer …` checked against the token file.
    Token,
    /// Nobody is asked: every caller is a controller. Loopback only, or
    /// with `insecure = true`.
    #[default]
    None,
}

/// The `[auth]` section, paths resolved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthConfig {
    pub mode: Mode,
    /// The lab CA whose certificates clients must present (mTLS).
    pub ca: Option<PathBuf>,
    /// The agent's own certificate and key: TLS (mTLS, or tokens over TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Token mode: lines `ROLE NAME TOKEN`.
    pub tokens: Option<PathBuf>,
    /// Allow plaintext (or tokens without TLS) off loopback.
    pub insecure: bool,
}

/// How the agent will listen, decided before it binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transport {
    pub tls: bool,
    /// Said loudly at start (plaintext off loopback).
    pub warning: Option<String>,
}

/// Pure: whether `auth` is acceptable for an agent listening on `listen`,
/// and how it will listen. Plaintext only on loopback or with `insecure`.
pub fn transport(listen: SocketAddr, auth: &AuthConfig) -> Result<Transport, String> {
    let tls = auth.cert.is_some();
    match auth.mode {
        Mode::Mtls if auth.ca.is_none() || !tls => {
            return Err("[auth] mode = \"mtls\" needs `ca`, `cert` and `key` (see `proctor certs`)".into());
        }
        Mode::Token if auth.tokens.is_none() => return Err("[auth] mode = \"token\" needs `tokens` (a file)".into()),
        _ => {}
    }
    if tls && auth.key.is_none() {
        return Err("[auth] `cert` needs `key`".into());
    }
    let open = auth.mode == Mode::None;
    // Who could drive the agent by reaching its port: anyone without
    // authentication; with tokens in plaintext, anyone who can read them.
    let exposed = match auth.mode {
        Mode::Mtls => false,
        Mode::Token => !tls,
        Mode::None => true,
    };
    if listen.ip().is_loopback() || !exposed {
        return Ok(Transport { tls, warning: None });
    }
    if !auth.insecure {
        let what = if open { "without authentication" } else { "with tokens over plaintext" };
        return Err(format!(
            "the agent would listen on {listen} {what}: anyone who reaches the port could drive it. Set \
             [auth] mode = \"mtls\" with certificates from `proctor certs` (docs/security.md), give the \
             token mode a `cert` and `key`, listen on 127.0.0.1, or — on a network you trust — set \
             [auth] insecure = true"
        ));
    }
    Ok(Transport {
        tls,
        warning: Some(format!(
            "INSECURE: listening on {listen} in plaintext {}; anyone on this network can read or drive it",
            if open { "with no authentication" } else { "(bearer tokens travel in the clear)" }
        )),
    })
}

/// How callers are checked, in words, for the start-up line.
pub fn describe(auth: &AuthConfig, listen: SocketAddr) -> &'static str {
    match (auth.mode, auth.cert.is_some()) {
        (Mode::Mtls, _) => "mutual TLS",
        (Mode::Token, true) => "bearer tokens over TLS",
        (Mode::Token, false) => "bearer tokens in plaintext",
        (Mode::None, _) if listen.ip().is_loopback() => "no authentication: loopback only",
        (Mode::None, _) => "INSECURE: no authentication",
    }
}

/// Pure: what to say about a certificate valid from `not_before` to
/// `not_after` (unix seconds) at `now`: nothing, soon expiring, expired.
pub fn validity_warning(not_before: i64, not_after: i64, now: i64) -> Option<String> {
    const SOON: i64 = 30 * 86400;
    if now < not_before {
        Some("is not valid yet (check this host's clock)".into())
    } else if now > not_after {
        Some(format!(
            "expired {} days ago: clients will refuse it; issue a new one with `proctor certs issue agent`",
            (now - not_after) / 86400
        ))
    } else if not_after - now < SOON {
        Some(format!(
            "expires in {} days: issue a new one with `proctor certs issue agent` and restart the agent",
            (not_after - now) / 86400
        ))
    } else {
        None
    }
}

/// Warns at start when the agent's own certificate is expired or about to.
fn warn_on_validity(pem: &str, path: &std::path::Path) {
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(pem.as_bytes()) else { return };
    let Ok(cert) = pem.parse_x509() else { return };
    let v = cert.validity();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if let Some(what) = validity_warning(v.not_before.timestamp(), v.not_after.timestamp(), now) {
        tracing::warn!(certificate = %path.display(), "the agent's certificate {what}");
    }
}

/// The token file: `ROLE NAME TOKEN` per line, `#` comments.
#[derive(Clone, Default)]
pub struct Tokens {
    entries: Vec<(Caller, Vec<u8>)>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} entries)", self.entries.len())
    }
}

/// Tokens shorter than this are refused: guessable.
const MIN_TOKEN_BYTES: usize = 16;

impl Tokens {
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [role, name, token] = fields[..] else {
                return Err(format!("line {}: expected `ROLE NAME TOKEN`", i + 1));
            };
            let role = Role::parse(role)
                .ok_or_else(|| format!("line {}: role {role:?} is not `controller` or `observer`", i + 1))?;
            if token.len() < MIN_TOKEN_BYTES {
                return Err(format!(
                    "line {}: the token of {name} is shorter than {MIN_TOKEN_BYTES} characters; make one with \
                     `openssl rand -hex 32`",
                    i + 1
                ));
            }
            entries.push((Caller { name: name.to_owned(), role }, token.as_bytes().to_vec()));
        }
        Ok(Tokens { entries })
    }

    /// The caller whose token this is. Every entry is compared, each in
    /// constant time, so timing tells nothing about which bytes matched.
    pub fn find(&self, presented: &[u8]) -> Option<Caller> {
        let mut found = None;
        for (caller, token) in &self.entries {
            if constant_time_eq(token, presented) && found.is_none() {
                found = Some(caller.clone());
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The caller a (CA-verified) client certificate names: `CN` and `OU`.
pub fn caller_from_certificate(der: &[u8]) -> Result<Caller, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let text = |a: &AttributeTypeAndValue| a.as_str().ok().map(str::to_owned);
    let name = subject.iter_common_name().next().and_then(text).ok_or("the certificate has no common name (CN)")?;
    let unit = subject
        .iter_organizational_unit()
        .next()
        .and_then(text)
        .ok_or_else(|| format!("certificate {name} carries no role (OU = controller or observer)"))?;
    let role = Role::parse(&unit)
        .ok_or_else(|| format!("certificate {name} has role {unit:?}, not `controller` or `observer`"))?;
    Ok(Caller { name, role })
}

/// What the layer checks against.
#[derive(Debug)]
pub struct Gate {
    pub mode: Mode,
    pub tokens: Tokens,
}

impl Gate {
    /// The gate `[auth]` describes, its token file read.
    pub fn load(auth: &AuthConfig) -> Result<Gate, String> {
        let tokens = match (&auth.tokens, auth.mode) {
            (Some(path), Mode::Token) => {
                let text = read(path, "token file")?;
                Tokens::parse(&text).map_err(|e| format!("token file {}: {e}", path.display()))?
            }
            _ => Tokens::default(),
        };
        Ok(Gate { mode: auth.mode, tokens })
    }

    /// Who is calling, from the request's certificate or token.
    fn identify<B>(&self, request: &http::Request<B>) -> Result<Caller, Status> {
        match self.mode {
            Mode::None => Ok(Caller { name: "anyone".into(), role: Role::Controller }),
            Mode::Mtls => {
                let certs = peer_certs(request).ok_or_else(|| Status::unauthenticated("no client certificate"))?;
                let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
                caller_from_certificate(leaf).map_err(Status::permission_denied)
            }
            Mode::Token => {
                let header = request.headers().get("authorization").and_then(|v| v.to_str().ok());
                let token = header
                    .and_then(|h| h.strip_prefix("Bearer "))
                    .ok_or_else(|| Status::unauthenticated("no bearer token (authorization: Bearer …)"))?;
                self.tokens.find(token.trim().as_bytes()).ok_or_else(|| Status::unauthenticated("unknown token"))
            }
        }
    }

    /// The decision for one request: its caller, or the refusal.
    pub fn check<B>(&self, request: &http::Request<B>) -> Result<Caller, Status> {
        let caller = self.identify(request)?;
        if allowed(caller.role, request.uri().path()) {
            return Ok(caller);
        }
        Err(Status::permission_denied(format!(
            "{} {} may not call {}; it needs a controller certificate or token",
            caller.role.as_str(),
            caller.name,
            request.uri().path()
        )))
    }
}

fn read(path: &std::path::Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| {
        format!("cannot read the {what} {}: {e} ([auth] in the agent config; see docs/security.md)", path.display())
    })
}

/// Says at start when the agent's own certificate is expired or about to be.
pub fn check_certificate(auth: &AuthConfig) {
    if let Some(cert) = &auth.cert
        && let Ok(pem) = read(cert, "agent certificate")
    {
        warn_on_validity(&pem, cert);
    }
}

fn peer_certs<B>(request: &http::Request<B>) -> Option<Vec<Vec<u8>>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    Some(certs.iter().map(|c| c.as_ref().to_vec()).collect())
}

fn peer_addr<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let ext = request.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|i| i.remote_addr()))
}

/// tonic answers a message over the decode limit with OUT_OF_RANGE; a
/// client should read it as what it is — a limit — and learn the limit.
fn oversized_is_resource_exhausted(headers: &mut http::HeaderMap) {
    let out_of_range = headers.get("grpc-status").is_some_and(|v| v == "11");
    // grpc-message is percent-encoded; tonic writes spaces as %20.
    let raw = headers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let message = raw.replace("%20", " ").replace("%3A", ":");
    if !out_of_range || !message.contains("message length too large") {
        return;
    }
    let told = format!(
        "message too large for this agent (limit {} MiB; send fewer or smaller cases per call): {message}",
        proto::MAX_MESSAGE_BYTES / (1024 * 1024)
    );
    if let Ok(value) = http::HeaderValue::from_str(&told) {
        headers.insert("grpc-message", value);
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
}

/// A response body whose trailers say OUT_OF_RANGE for an oversized
/// message get RESOURCE_EXHAUSTED instead (see above).
struct Limits(tonic::body::Body);

impl http_body::Body for Limits {
    type Data = bytes::Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, Status>>> {
        let polled = std::pin::Pin::new(&mut self.0).poll_frame(cx);
        if let Poll::Ready(Some(Ok(mut frame))) = polled {
            if let Some(trailers) = frame.trailers_mut() {
                oversized_is_resource_exhausted(trailers);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// The tower layer in front of every handler.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    gate: Arc<Gate>,
}

impl AuthLayer {
    pub fn new(gate: Gate) -> AuthLayer {
        AuthLayer { gate: Arc::new(gate) }
    }
}

impl<S> tower_layer::Layer<S> for AuthLayer {
    type Service = Guarded<S>;

    fn layer(&self, inner: S) -> Guarded<S> {
        Guarded { gate: self.gate.clone(), inner }
    }
}

/// A service behind the gate.
#[derive(Clone, Debug)]
pub struct Guarded<S> {
    gate: Arc<Gate>,
    inner: S,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower_service::Service<http::Request<B>> for Guarded<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        match self.gate.check(&request) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let mut response = answer.await?;
                    oversized_is_resource_exhausted(response.headers_mut());
                    Ok(response.map(|body| tonic::body::Body::new(Limits(body))))
                })
            }
            Err(status) => {
                let peer = peer_addr(&request).map_or("unknown".to_owned(), |a| a.to_string());
                tracing::warn!(%peer, method = request.uri().path(), code = ?status.code(), reason = status.message(), "call refused");
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests;

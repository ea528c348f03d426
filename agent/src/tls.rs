//! The agent's TLS listener: it accepts connections itself (rather than
//! leaving it to tonic) so that every refused handshake — no client
//! certificate, another CA's, an expired one, plaintext — is logged with
//! the peer and the reason, as a refused call is. Each handshake runs on its
//! own task under a deadline, so a slow or silent client holds nothing up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthConfig, Mode};

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait to be accepted.
const HANDSHAKES_AT_ONCE: usize = 64;

fn read(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!("cannot read the {what} {}: {e} ([auth] in the agent config; see docs/security.md)", path.display())
    })
}

/// The acceptor `[auth]` describes: the agent's certificate, and with mTLS a
/// client certificate required and verified against the lab CA. `None`
/// without a certificate (plaintext).
pub fn acceptor(auth: &AuthConfig) -> Result<Option<TlsAcceptor>, String> {
    let (Some(cert), Some(key)) = (&auth.cert, &auth.key) else { return Ok(None) };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&read(cert, "agent certificate")?)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("agent certificate {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(key, "agent key")?)
        .map_err(|e| format!("agent key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match (auth.mode, &auth.ca) {
        (Mode::Mtls, Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca, "lab CA certificate")?) {
                let c = c.map_err(|e| format!("lab CA {}: {e}", ca.display()))?;
                roots.add(c).map_err(|e| format!("lab CA {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("lab CA {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| format!("agent certificate and key: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// Accepts on `listener` and hands over each connection whose handshake
/// succeeded; logs each that failed, with the peer. Ends at `cancel`.
pub fn incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    cancel: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(HANDSHAKES_AT_ONCE);
    let gate = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_AT_ONCE));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((tcp, peer)) = accepted else { continue };
            // Small gRPC frames go out at once (tonic sets this only on
            // listeners it makes itself): Nagle cost every call ~20 ms.
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = gate.clone().acquire_owned().await else { return };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(tls) = handshake(&acceptor, tcp, peer).await {
                    let _ = tx.send(Ok(tls)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn handshake(acceptor: &TlsAcceptor, tcp: TcpStream, peer: SocketAddr) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            // A plaintext client shows up as a "corrupt message": say so.
            let hint = if error.to_string().contains("InvalidContentType") {
                " (the client spoke plaintext: it needs the lab CA, e.g. `--ca`)"
            } else {
                ""
            };
            tracing::warn!(%peer, reason = %format!("{error}{hint}"), "TLS handshake refused");
            None
        }
        Err(_) => {
            tracing::warn!(%peer, deadline = ?HANDSHAKE_DEADLINE, "TLS handshake refused: not finished in time");
            None
        }
    }
}

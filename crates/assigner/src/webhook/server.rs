//! The HTTPS server that answers `POST /mutate`, with a certificate swapped in place when
//! the Secret changes (no restart, no dropped connection).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::metrics::WebhookMetrics;
use super::tls::Material;

/// Largest AdmissionReview accepted (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 6 * 1024 * 1024;

/// The certificate currently served; empty until the Secret was read.
#[derive(Debug)]
pub struct CertSlot {
    provider: Arc<CryptoProvider>,
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertSlot {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            current: RwLock::new(None),
        })
    }

    /// Serves `material` from the next handshake on.
    pub fn load(&self, material: &Material) -> anyhow::Result<()> {
        let certs = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes())?;
        let key = self.provider.key_provider.load_private_key(key)?;
        let certified = Arc::new(CertifiedKey::new(certs, key));
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(certified);
        Ok(())
    }
}

impl ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Answers one request body; called on the connection's task, must not block.
pub type Handler = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// How long a client may take at each step of a connection, and how many connections are
/// served at once. Whoever can reach the port can open connections (the NetworkPolicy is
/// optional), so none may hold a task and a socket for long without sending.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The TLS handshake, from the accepted connection.
    pub handshake: Duration,
    /// A request's headers, from the end of the handshake or of the previous response:
    /// hyper re-arms this timer while a kept-alive connection is idle, so it is also the
    /// idle limit between requests.
    pub headers: Duration,
    /// A request's body, from the end of its headers.
    pub body: Duration,
    /// Connections served at once; further ones wait in the kernel's accept backlog.
    pub connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            // hyper's own default: long enough that the API server, which keeps its
            // connection to the webhook alive between calls, seldom sees it closed idle.
            headers: Duration::from_secs(30),
            body: Duration::from_secs(10),
            connections: 256,
        }
    }
}

/// The first pause after a failed accept; it doubles up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(100);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one warning about failed accepts this often.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(30);

/// Pacing of failed accepts. An accept that fails for lack of file descriptors (EMFILE)
/// fails again at once, so without a pause the loop would spin and log on every turn.
#[derive(Debug)]
struct AcceptErrors {
    pause: Duration,
    /// Failures since the last warning.
    unreported: u64,
    last_warning: Option<Instant>,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        Self {
            pause: ACCEPT_PAUSE_MIN,
            unreported: 0,
            last_warning: None,
        }
    }
}

impl AcceptErrors {
    /// Records a failure at `now`: the pause before the next accept, and the number of
    /// failures to warn about now (the first failure, then at most one warning per
    /// [`ACCEPT_WARN_EVERY`]), if any.
    fn failed(&mut self, now: Instant) -> (Duration, Option<u64>) {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(ACCEPT_PAUSE_MAX);
        self.unreported += 1;
        let warn = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= ACCEPT_WARN_EVERY);
        if !warn {
            return (pause, None);
        }
        self.last_warning = Some(now);
        (pause, Some(std::mem::take(&mut self.unreported)))
    }

    /// An accept succeeded: the next failure pauses briefly again. The warning schedule is
    /// kept, so alternating failures and successes are still reported at most once per
    /// [`ACCEPT_WARN_EVERY`].
    fn succeeded(&mut self) {
        self.pause = ACCEPT_PAUSE_MIN;
    }
}

/// What every connection's task shares.
#[derive(Clone)]
struct Shared {
    acceptor: TlsAcceptor,
    handler: Handler,
    metrics: WebhookMetrics,
    limits: Limits,
    stop: CancellationToken,
}

/// Binds `addr` (port 0: any free port) and returns the bound address and the accept loop,
/// which runs until `stop`.
pub async fn serve(
    addr: SocketAddr,
    slot: Arc<CertSlot>,
    handler: Handler,
    metrics: WebhookMetrics,
    limits: Limits,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, impl Future<Output = ()> + Send + 'static)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(slot);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let shared = Shared {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        handler,
        metrics,
        limits,
        stop,
    };
    Ok((local, accept_loop(listener, shared)))
}

/// Accepts connections until `stop`, each served on a task of its own while it holds one
/// of [`Limits::connections`] permits.
async fn accept_loop(listener: TcpListener, shared: Shared) {
    let permits = Arc::new(Semaphore::new(shared.limits.connections));
    let mut errors = AcceptErrors::default();
    loop {
        // Taken before accepting, so that connections beyond the limit stay in the
        // kernel's backlog instead of holding a task each.
        let permit = tokio::select! {
            () = shared.stop.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let accepted = tokio::select! {
            () = shared.stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                let (pause, warn) = errors.failed(Instant::now());
                if let Some(failures) = warn {
                    tracing::warn!(%err, failures, "webhook: accepting a connection failed");
                } else {
                    tracing::debug!(%err, "webhook: accepting a connection failed");
                }
                tokio::select! {
                    () = shared.stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        errors.succeeded();
        let shared = shared.clone();
        tokio::spawn(async move {
            serve_connection(stream, &shared).await;
            drop(permit);
        });
    }
}

/// Serves one connection: the TLS handshake, then HTTP/1.1 requests until the client
/// closes, a limit runs out, or `stop`.
async fn serve_connection(stream: TcpStream, shared: &Shared) {
    let tls =
        match tokio::time::timeout(shared.limits.handshake, shared.acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(err)) => {
                tracing::debug!(%err, "webhook: TLS handshake failed");
                return;
            }
            Err(_elapsed) => {
                tracing::debug!("webhook: TLS handshake timed out");
                return;
            }
        };
    let service = {
        let (handler, metrics, body) = (
            shared.handler.clone(),
            shared.metrics.clone(),
            shared.limits.body,
        );
        service_fn(move |req| {
            let handler = handler.clone();
            let metrics = metrics.clone();
            async move { Ok::<_, std::convert::Infallible>(route(req, &handler, &metrics, body).await) }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(shared.limits.headers)
        .serve_connection(TokioIo::new(tls), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%err, "webhook connection ended with an error");
            }
        }
        () = shared.stop.cancelled() => conn.as_mut().graceful_shutdown(),
    }
}

async fn route(
    req: Request<Incoming>,
    handler: &Handler,
    metrics: &WebhookMetrics,
    body_limit: Duration,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != "/mutate" {
        return respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
    }
    let started = std::time::Instant::now();
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let body = match tokio::time::timeout(body_limit, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(err)) => {
            tracing::debug!(%err, "webhook: reading the request failed");
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                b"bad request\n".to_vec(),
            );
        }
        Err(_elapsed) => {
            tracing::debug!("webhook: reading the request timed out");
            return respond(
                StatusCode::REQUEST_TIMEOUT,
                "text/plain",
                b"request timeout\n".to_vec(),
            );
        }
    };
    let answer = handler(&body);
    metrics.seconds.observe(started.elapsed().as_secs_f64());
    respond(StatusCode::OK, "application/json", answer)
}

fn respond(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::client::TlsStream;

    use super::super::tls::{self, Lifetimes, Renewal};
    use super::*;

    const SHORT: Duration = Duration::from_millis(200);
    /// Far longer than any limit a test sets: a read still open then was never closed.
    const PATIENCE: Duration = Duration::from_secs(2);
    const DAY: Duration = Duration::from_secs(86_400);

    struct Server {
        addr: SocketAddr,
        ca_pem: String,
        stop: CancellationToken,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.cancel();
        }
    }

    async fn start(limits: Limits) -> Server {
        let sans = tls::subject_alt_names("webhook", "ns");
        let lifetimes = Lifetimes {
            ca: 365 * DAY,
            serving: 90 * DAY,
        };
        let material = tls::renew(
            Renewal::Create,
            None,
            &sans,
            lifetimes,
            jiff::Timestamp::now(),
        )
        .unwrap()
        .unwrap();
        let slot = CertSlot::new();
        slot.load(&material).unwrap();
        let handler: Handler = Arc::new(|_| b"{}".to_vec());
        let metrics =
            WebhookMetrics::register(&mut prometheus_client::registry::Registry::default());
        let stop = CancellationToken::new();
        let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
        let (addr, run) = serve(localhost, slot, handler, metrics, limits, stop.clone())
            .await
            .unwrap();
        tokio::spawn(run);
        Server {
            addr,
            ca_pem: material.ca_pem,
            stop,
        }
    }

    async fn connect_tls(server: &Server) -> std::io::Result<TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(server.ca_pem.as_bytes()) {
            roots.add(ca.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = TcpStream::connect(server.addr).await?;
        let name = ServerName::try_from("localhost").unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    /// Reads until the server closes the connection; `None` if it is still open after
    /// [`PATIENCE`].
    async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
        let mut read = Vec::new();
        // An error (a reset, a TLS close without close_notify) closes it as well.
        let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut read))
            .await
            .ok()?;
        Some(read)
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_at_the_handshake_timeout() {
        let server = start(Limits {
            handshake: SHORT,
            ..Limits::default()
        })
        .await;
        let mut silent = TcpStream::connect(server.addr).await.unwrap();
        let started = Instant::now();
        assert!(read_until_closed(&mut silent).await.is_some());
        assert!(started.elapsed() >= SHORT);
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_request_is_closed_at_the_header_timeout() {
        let server = start(Limits {
            headers: SHORT,
            ..Limits::default()
        })
        .await;
        let mut silent = connect_tls(&server).await.unwrap();
        assert!(read_until_closed(&mut silent).await.is_some());
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_when_idle_for_the_header_timeout() {
        let server = start(Limits {
            headers: SHORT,
            ..Limits::default()
        })
        .await;
        let mut client = connect_tls(&server).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await
            .unwrap();
        let read = read_until_closed(&mut client).await.unwrap();
        assert!(read.starts_with(b"HTTP/1.1 404"), "answered, then closed");
    }

    #[tokio::test]
    async fn a_request_whose_body_does_not_come_is_answered_and_closed_at_the_body_timeout() {
        let server = start(Limits {
            body: SHORT,
            ..Limits::default()
        })
        .await;
        let mut client = connect_tls(&server).await.unwrap();
        client
            .write_all(b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-length: 10\r\n\r\n")
            .await
            .unwrap();
        let read = read_until_closed(&mut client).await.unwrap();
        assert!(read.starts_with(b"HTTP/1.1 408"));
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_until_one_ends() {
        let server = start(Limits {
            connections: 1,
            ..Limits::default()
        })
        .await;
        let first = TcpStream::connect(server.addr).await.unwrap();
        let waiting = tokio::time::timeout(SHORT, connect_tls(&server)).await;
        assert!(
            waiting.is_err(),
            "not served while the first holds the slot"
        );
        drop(first);
        let served = tokio::time::timeout(PATIENCE, connect_tls(&server)).await;
        assert!(matches!(served, Ok(Ok(_))));
    }

    #[test]
    fn failed_accepts_pause_longer_each_time_until_one_succeeds() {
        let mut errors = AcceptErrors::default();
        let now = Instant::now();
        let pauses: Vec<Duration> = (0..6).map(|_| errors.failed(now).0).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            pauses,
            [ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]
        );
        errors.succeeded();
        assert_eq!(errors.failed(now).0, ms(100));
    }

    #[test]
    fn failed_accepts_are_warned_about_once_then_at_most_every_thirty_seconds_with_a_count() {
        let mut errors = AcceptErrors::default();
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        assert_eq!(errors.failed(at(0)).1, Some(1), "the first failure");
        assert_eq!(errors.failed(at(1)).1, None);
        errors.succeeded();
        assert_eq!(
            errors.failed(at(10)).1,
            None,
            "a success does not re-open the warning"
        );
        assert_eq!(errors.failed(at(29)).1, None);
        assert_eq!(
            errors.failed(at(30)).1,
            Some(4),
            "every failure since the last warning"
        );
        assert_eq!(errors.failed(at(31)).1, None);
    }
}

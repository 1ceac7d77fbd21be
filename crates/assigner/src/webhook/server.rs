//! The HTTPS server that answers `POST /mutate`, with a certificate swapped in place when
//! the Secret changes (no restart, no dropped connection).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
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

/// Binds `addr` (port 0: any free port) and returns the bound address and the accept loop,
/// which runs until `stop`.
pub async fn serve(
    addr: SocketAddr,
    slot: Arc<CertSlot>,
    handler: Handler,
    metrics: WebhookMetrics,
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
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let run = async move {
        loop {
            let stream = tokio::select! {
                () = stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(%err, "webhook: accepting a connection failed");
                        continue;
                    }
                },
            };
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            let metrics = metrics.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let tls = match acceptor.accept(stream).await {
                    Ok(tls) => tls,
                    Err(err) => {
                        tracing::debug!(%err, "webhook: TLS handshake failed");
                        return;
                    }
                };
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    let metrics = metrics.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(route(req, &handler, &metrics).await)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(err) = result {
                            tracing::debug!(%err, "webhook connection ended with an error");
                        }
                    }
                    () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
                }
            });
        }
    };
    Ok((local, run))
}

async fn route(
    req: Request<Incoming>,
    handler: &Handler,
    metrics: &WebhookMetrics,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != "/mutate" {
        return respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
    }
    let started = std::time::Instant::now();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => {
            tracing::debug!(%err, "webhook: reading the request failed");
            return respond(
                StatusCode::BAD_REQUEST,
                "text/plain",
                b"bad request\n".to_vec(),
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

//! The plain HTTP endpoint beside the CSI socket: `GET /metrics` (OpenMetrics text) and
//! `GET /healthz` (200 when ready, 503 with the reasons when not).
//!
//! It is meant for a node-local scraper, but it still defends itself: HTTP/1.1 only, request
//! heads bounded in size and in the time they may take to arrive, a lifetime per connection,
//! a cap on concurrent connections, and nothing but GET and HEAD on two paths.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics};
use crate::health::Health;

/// Longest time a client may take to send a request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection (keep-alive included); a scrape takes milliseconds.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Largest request head accepted (hyper's minimum buffer).
const MAX_REQUEST_HEAD: usize = 8192;
/// Connections served at once; further ones are closed at once.
const MAX_CONNECTIONS: usize = 32;

/// What the endpoint serves.
pub struct MetricsApp {
    pub metrics: Metrics,
    pub health: Health,
}

/// Binds the metrics address (port 0 picks a free port; the bound address is returned).
pub async fn bind(address: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(address).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves connections until the task is aborted.
pub async fn serve(listener: TcpListener, app: Arc<MetricsApp>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint: too many connections; closing");
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(respond(app, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_REQUEST_HEAD)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics endpoint: connection"),
                Err(_) => tracing::debug!(%peer, "metrics endpoint: connection lifetime over"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

async fn respond(app: Arc<MetricsApp>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let mut response = match request.uri().path() {
        "/metrics" => metrics(app).await,
        "/healthz" => {
            let report = app.health.check().await;
            if report.ready() {
                text(StatusCode::OK, "ok\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready:\n- {}\n", report.problems.join("\n- ")),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics or /healthz\n",
        ),
    };
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if head {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

async fn metrics(app: Arc<MetricsApp>) -> Response<Full<Bytes>> {
    // Encoding 10,000 volumes is milliseconds of CPU: keep it off the async threads anyway.
    let encoded = tokio::task::spawn_blocking(move || app.metrics.encode()).await;
    match encoded {
        Ok(Ok(body)) => {
            let mut response = text(StatusCode::OK, body);
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        _ => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        ),
    }
}

//! Two small loopback HTTP servers used by `kinsight demo` and the tests: one serves the
//! sample photos, the other receives webhooks and verifies their Standard Webhooks
//! signatures before passing them on.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use standardwebhooks::Webhook;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Serves the files of one folder (no subfolders) at `/{name}` on 127.0.0.1.
pub async fn serve_folder(
    folder: PathBuf,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_folder_on(folder, std::net::Ipv4Addr::LOCALHOST.into()).await
}

/// [`serve_folder`] on another address of this machine (e.g. a pod network's gateway).
pub async fn serve_folder_on(
    folder: PathBuf,
    address: std::net::IpAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let app = Router::new()
        .route("/{name}", get(file))
        .with_state(Arc::new(folder));
    serve(app, address).await
}

async fn file(
    State(folder): State<Arc<PathBuf>>,
    Path(name): Path<String>,
) -> Result<Vec<u8>, StatusCode> {
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(StatusCode::NOT_FOUND);
    }
    tokio::fs::read(folder.join(name))
        .await
        .map_err(|_| StatusCode::NOT_FOUND)
}

/// One webhook request as received, after its signature checked out.
#[derive(Clone, Debug)]
pub struct ReceivedWebhook {
    pub id: String,
    pub timestamp: String,
    pub payload: serde_json::Value,
    /// Every request header, names in lowercase.
    pub headers: Vec<(String, String)>,
}

/// A webhook receiver on 127.0.0.1 at `/hook`: requests whose signature does not verify
/// with `secret` are answered 401 and not passed on.
pub async fn webhook_receiver(
    secret: &str,
) -> Result<
    (
        SocketAddr,
        mpsc::UnboundedReceiver<ReceivedWebhook>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    webhook_receiver_on(secret, std::net::Ipv4Addr::LOCALHOST.into()).await
}

/// [`webhook_receiver`] on another address of this machine (e.g. a pod network's gateway).
pub async fn webhook_receiver_on(
    secret: &str,
    address: std::net::IpAddr,
) -> Result<
    (
        SocketAddr,
        mpsc::UnboundedReceiver<ReceivedWebhook>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let verifier = Webhook::new(secret).map_err(|e| format!("webhook secret: {e}"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::new((verifier, tx)));
    let (addr, handle) = serve(app, address).await.map_err(|e| e.to_string())?;
    Ok((addr, rx, handle))
}

type ReceiverState = Arc<(Webhook, mpsc::UnboundedSender<ReceivedWebhook>)>;

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let (verifier, tx) = &*state;
    if verifier.verify(&body, &headers).is_err() {
        return StatusCode::UNAUTHORIZED;
    }
    let Ok(payload) = serde_json::from_slice(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let all_headers = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let _ = tx.send(ReceivedWebhook {
        headers: all_headers,
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        payload,
    });
    StatusCode::NO_CONTENT
}

async fn serve(
    app: Router,
    address: std::net::IpAddr,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind((address, 0)).await?;
    let addr = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "local http server stopped");
        }
    });
    Ok((addr, handle))
}

//! The server's admin socket, `<state-dir>/admin.sock`: how the operator CLI reads the store
//! while the server holds it.
//!
//! redb lets one process open a database for writing and excludes every other process from it
//! meanwhile (sharing it would cost the server two flushes per commit). So while the server
//! runs, `k8scsi volumes|snapshots|usage|doctor` ask it instead: they connect, send `dump`, and
//! read one JSON [`StateDump`] taken in one read transaction. The socket only reads; it lives in
//! the state directory, and is made accessible to root alone.
//!
//! Defences: one request line of at most [`MAX_REQUEST`] bytes within [`REQUEST_TIMEOUT`], a
//! bounded time to write the answer, and at most [`MAX_CONNECTIONS`] at once.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use crate::store::{StateDump, Store};

/// The socket's file name inside the state directory.
pub const SOCKET: &str = "admin.sock";
const MAX_REQUEST: usize = 64;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_CONNECTIONS: usize = 8;

/// Where the admin socket of the server using `state_dir` lives.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// What a request gets when it fails.
#[derive(serde::Serialize, serde::Deserialize)]
struct Failure {
    error: String,
}

/// Binds the socket (replacing a stale one: the store's lock already guarantees that no other
/// server uses this state directory) and makes it root-only.
pub fn bind(state_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Answers requests until the task is aborted.
pub async fn serve(listener: UnixListener, store: Store) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: close this one
        };
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, store).await {
                tracing::debug!(error = %e, "admin socket: request failed");
            }
            drop(slot);
        });
    }
}

async fn answer(mut stream: tokio::net::UnixStream, store: Store) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(MAX_REQUEST);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut byte = [0u8; 1];
        while request.len() < MAX_REQUEST {
            if stream.read(&mut byte).await? == 0 || byte[0] == b'\n' {
                break;
            }
            request.push(byte[0]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    let body = match read {
        Err(_) => return Ok(()), // too slow: hang up
        Ok(Err(e)) => return Err(e),
        Ok(Ok(())) if request == b"dump" => {
            match tokio::task::spawn_blocking(move || store.dump()).await {
                Ok(Ok(dump)) => serde_json::to_vec(&dump),
                Ok(Err(e)) => serde_json::to_vec(&Failure {
                    error: e.to_string(),
                }),
                Err(e) => serde_json::to_vec(&Failure {
                    error: e.to_string(),
                }),
            }
        }
        Ok(Ok(())) => serde_json::to_vec(&Failure {
            error: format!(
                "unknown request {:?}; the only request is \"dump\"",
                String::from_utf8_lossy(&request)
            ),
        }),
    }
    .map_err(std::io::Error::other)?;
    tokio::time::timeout(RESPONSE_TIMEOUT, stream.write_all(&body))
        .await
        .map_err(|_| std::io::Error::other("client too slow"))??;
    stream.shutdown().await
}

/// Asks the server using `state_dir` for a dump.
pub fn fetch(state_dir: &Path) -> Result<StateDump, String> {
    let path = socket_path(state_dir);
    let fail = |e: &dyn std::fmt::Display| {
        format!(
            "the state store is held by a running server, and its admin socket {} did not \
             answer: {e}",
            path.display()
        )
    };
    let mut stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| fail(&e))?;
    stream
        .set_read_timeout(Some(RESPONSE_TIMEOUT))
        .map_err(|e| fail(&e))?;
    stream.write_all(b"dump\n").map_err(|e| fail(&e))?;
    let mut body = Vec::new();
    stream.read_to_end(&mut body).map_err(|e| fail(&e))?;
    match serde_json::from_slice::<StateDump>(&body) {
        Ok(dump) => Ok(dump),
        Err(parse) => match serde_json::from_slice::<Failure>(&body) {
            Ok(failure) => Err(format!(
                "the server could not read its store: {}",
                failure.error
            )),
            Err(_) => Err(fail(&parse)),
        },
    }
}

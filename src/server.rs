//! `k8scsi serve`: wires the store, backend, mounter and engine together and serves the CSI
//! services on a unix socket (or TCP, for debugging).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use crate::backend::Backend;
use crate::backend::dir::DirBackend;
use crate::csi::proto::controller_server::ControllerServer;
use crate::csi::proto::group_controller_server::GroupControllerServer;
use crate::csi::proto::identity_server::IdentityServer;
use crate::csi::proto::node_server::NodeServer;
use crate::csi::{ControllerService, GroupControllerService, IdentityService, NodeService};
use crate::engine::{Engine, EngineConfig};
use crate::health::Health;
use crate::metrics::sampler::{Sampled, Sampler};
use crate::mount::linux::LinuxMounter;
use crate::store::Store;

/// Which CSI services this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity, Controller and Node.
    All,
    /// Identity and Controller.
    Controller,
    /// Identity and Node.
    Node,
}

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path`, `unix:/path` or `tcp://host:port`.
    pub fn parse(raw: &str) -> Result<Endpoint, String> {
        if let Some(rest) = raw
            .strip_prefix("unix://")
            .or_else(|| raw.strip_prefix("unix:"))
        {
            if !rest.starts_with('/') {
                return Err(format!(
                    "endpoint {raw:?}: the socket path must be absolute"
                ));
            }
            return Ok(Endpoint::Unix(PathBuf::from(rest)));
        }
        if let Some(rest) = raw.strip_prefix("tcp://") {
            return Ok(Endpoint::Tcp(rest.to_string()));
        }
        if raw.starts_with('/') {
            return Ok(Endpoint::Unix(PathBuf::from(raw)));
        }
        Err(format!(
            "endpoint {raw:?}: expected unix:///path/to/csi.sock or tcp://host:port"
        ))
    }
}

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub endpoint: Endpoint,
    pub node_id: String,
    pub driver_name: String,
    pub state_dir: PathBuf,
    pub data_dir: PathBuf,
    pub mode: Mode,
    pub max_volumes_per_node: u64,
    pub kubelet_dir: PathBuf,
    pub topology_key: String,
    /// Where to serve `/metrics` and `/healthz` (`host:port`; port 0 picks one and logs it).
    pub metrics_address: Option<String>,
    /// How often volume usage is walked for the metrics.
    pub usage_interval: std::time::Duration,
    /// How often reconciliation re-runs for the metrics (zero: only at start).
    pub reconcile_interval: std::time::Duration,
    /// Mount/unmount timeout for shares.
    pub share_timeout: std::time::Duration,
    /// The program that mounts shares.
    pub mount_program: String,
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
    #[error(transparent)]
    Engine(#[from] crate::engine::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let context = context.into();
    move |source| ServeError::Io { context, source }
}

/// Checks a driver name as CSI requires: at most 63 characters, alphanumerics, `-`, `_` and
/// `.`, beginning and ending with an alphanumeric.
pub fn check_driver_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "driver name {name:?} must be 1-63 characters of [A-Za-z0-9-_.], starting and \
             ending with a letter or digit"
        ))
    }
}

/// Creates `dir` if needed and returns its canonical path, so later prefix checks compare
/// real paths (the operator may point us at a symlinked location).
fn prepare_dir(dir: &Path, what: &str) -> Result<PathBuf, ServeError> {
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {what} {}", dir.display())))?;
    dir.canonicalize()
        .map_err(io_err(format!("resolving {what} {}", dir.display())))
}

/// Removes a stale socket file; refuses when a server still answers on it.
fn claim_socket(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(format!("checking {}", path.display()))(e)),
        Ok(meta) if !meta.file_type().is_socket() => Err(ServeError::Config(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ))),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(ServeError::Config(format!(
                "another server is listening on {}",
                path.display()
            ))),
            Err(_) => {
                tracing::info!(socket = %path.display(), "replacing stale socket");
                std::fs::remove_file(path)
                    .map_err(io_err(format!("removing stale socket {}", path.display())))
            }
        },
    }
}

/// Device and inode of the file at `path` (not following a symlink), if any.
fn socket_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Builds the engine for a configuration (also used by tests and the bench). The data
/// directory's lock is held until the process exits.
pub fn build_engine(config: &ServeConfig) -> Result<Arc<Engine>, ServeError> {
    let (engine, _, lock) = build_parts(config)?;
    std::mem::forget(lock);
    Ok(engine)
}

/// Name of the lock file in the data directory.
const DATA_DIR_LOCK: &str = ".k8scsi.lock";

/// An exclusive `flock` on `<data-dir>/.k8scsi.lock`, held while the server runs: start-up
/// recovery removes leftovers (partial copies, unrecorded snapshot storage, share mounts) in
/// the data directory, which must never happen under another server still using it (one
/// started with another `--state-dir`, or still draining its connections).
struct DataDirLock {
    _file: std::fs::File,
}

fn lock_data_dir(data_dir: &std::path::Path) -> Result<DataDirLock, ServeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(DATA_DIR_LOCK);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(DataDirLock { _file: file }),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ServeError::Config(format!(
            "another k8scsi server is using the data directory {} (it holds {}); one data \
             directory serves one server",
            data_dir.display(),
            path.display()
        ))),
        Err(e) => Err(ServeError::Config(format!(
            "locking {}: {}",
            path.display(),
            std::io::Error::from(e)
        ))),
    }
}

/// The backends a server serves, in the engine's order.
type Backends = Vec<Arc<dyn Backend>>;

/// Builds the engine and returns it with its backends (which the usage sampler walks).
fn build_parts(config: &ServeConfig) -> Result<(Arc<Engine>, Backends, DataDirLock), ServeError> {
    if config.node_id.is_empty() || config.node_id.len() > 256 {
        return Err(ServeError::Config(
            "--node-id must be 1-256 bytes".to_string(),
        ));
    }
    check_driver_name(&config.driver_name).map_err(ServeError::Config)?;
    if config.topology_key.is_empty() || config.topology_key.contains(['\0', ' ']) {
        return Err(ServeError::Config(
            "--topology-key must be a label key".to_string(),
        ));
    }
    if config.share_timeout < std::time::Duration::from_millis(100) {
        // It bounds every look at a volume and every unmount, not only shares: at zero each
        // of them "times out" at once.
        return Err(ServeError::Config(
            "--share-timeout must be at least 100ms".to_string(),
        ));
    }
    let state_dir = prepare_dir(&config.state_dir, "state directory")?;
    let data_dir = prepare_dir(&config.data_dir, "data directory")?;
    let lock = lock_data_dir(&data_dir)?;
    warn_about_durability(&state_dir, &data_dir);
    let kubelet_dir = prepare_dir(&config.kubelet_dir, "kubelet directory")?;
    let store = Store::open(&state_dir)?;
    let backends: Backends = vec![
        Arc::new(DirBackend::new(&data_dir)?),
        Arc::new(crate::backend::loopvol::LoopBackend::new(&data_dir)?),
        Arc::new(crate::backend::shared::SharedBackend::new(
            &data_dir,
            config.share_timeout,
            &config.mount_program,
        )?),
    ];
    let engine = Arc::new(Engine::new(
        EngineConfig {
            node_id: config.node_id.clone(),
            topology_key: config.topology_key.clone(),
            max_volumes_per_node: config.max_volumes_per_node,
            kubelet_dir,
            serves_node: config.mode != Mode::Controller,
            mount_timeout: config.share_timeout,
        },
        store,
        backends.clone(),
        Arc::new(LinuxMounter),
    ));
    Ok((engine, backends, lock))
}

/// Logs what a power loss or a reboot could take from the data or state directory (see
/// [`crate::mount::durability`]); nothing is refused.
fn warn_about_durability(state_dir: &Path, data_dir: &Path) {
    use crate::mount::durability;
    if let Some(weakness) = durability::assess(data_dir).and_then(|d| d.weakness) {
        tracing::warn!(data_dir = %data_dir.display(), %weakness,
            "volumes in the data directory may not survive a power loss or reboot");
    }
    if let Some(weakness) = durability::state_store_weakness(state_dir) {
        tracing::warn!(state_dir = %state_dir.display(), %weakness,
            "the state store may not survive a reboot");
    }
}

/// How long in-flight calls get to finish after SIGTERM. A connection that never completes its
/// HTTP/2 handshake, or a frozen client, would otherwise hold graceful shutdown open forever.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs a server future built around `shutdown`, but gives up waiting for connections to drain
/// [`DRAIN_DEADLINE`] after `shutdown` fired.
async fn with_drain_deadline<F>(
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    serve: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F,
) -> Result<(), tonic::transport::Error>
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    let (fired, mut on_fire) = tokio::sync::oneshot::channel::<()>();
    let server = serve(Box::pin(async move {
        shutdown.await;
        let _ = fired.send(());
    }));
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => result,
        Ok(()) = &mut on_fire => {
            match tokio::time::timeout(DRAIN_DEADLINE, server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(
                        deadline_s = DRAIN_DEADLINE.as_secs(),
                        "connections did not drain in time; stopping anyway"
                    );
                    Ok(())
                }
            }
        }
    }
}

/// A task that stops when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Background work that lives as long as the server when `--metrics-address` is set: the
/// metrics sampler and the HTTP endpoint. Dropping it stops both.
struct Observers {
    _sampler: Option<crate::metrics::sampler::SamplerTasks>,
    _http: Option<AbortOnDrop>,
}

async fn start_observers(
    config: &ServeConfig,
    engine: &Arc<Engine>,
    backends: Backends,
    health: &Health,
    sampled: Arc<Sampled>,
) -> Result<Observers, ServeError> {
    if config.usage_interval.is_zero() {
        return Err(ServeError::Config(
            "--usage-interval must be more than zero".to_string(),
        ));
    }
    let sampler = Sampler {
        engine: engine.clone(),
        backends: backends.clone(),
        health: health.clone(),
        data_dir: config.data_dir.clone(),
        sampled: sampled.clone(),
        usage_interval: config.usage_interval,
        reconcile_interval: config.reconcile_interval,
    };
    let Some(address) = &config.metrics_address else {
        return Ok(Observers {
            _sampler: None,
            _http: None,
        });
    };
    let (listener, bound) = crate::metrics::http::bind(address)
        .await
        .map_err(io_err(format!("binding the metrics address {address}")))?;
    tracing::info!(address = %bound, "serving /metrics and /healthz");
    let app = Arc::new(crate::metrics::http::MetricsApp {
        metrics: crate::metrics::Metrics::new(
            engine.store().clone(),
            sampled,
            &backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
        ),
        health: health.clone(),
    });
    Ok(Observers {
        _sampler: Some(sampler.spawn()),
        _http: Some(AbortOnDrop(tokio::spawn(crate::metrics::http::serve(
            listener, app,
        )))),
    })
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (engine, backends, _data_dir_lock) = build_parts(&config)?;
    let sampled = Arc::new(Sampled::default());
    {
        let engine = engine.clone();
        let report = tokio::task::spawn_blocking(move || {
            engine.recover_snapshots()?;
            engine.reconcile()
        })
        .await
        .map_err(|e| ServeError::Config(format!("reconcile task: {e}")))??;
        sampled.set_reconcile(report);
    }
    let health = Health::new(
        engine.clone(),
        config.data_dir.clone(),
        config.state_dir.clone(),
    );
    let _observers = start_observers(&config, &engine, backends, &health, sampled).await?;
    let admin_listener = crate::admin::bind(&config.state_dir).map_err(io_err(format!(
        "binding the admin socket in {}",
        config.state_dir.display()
    )))?;
    let _admin = AbortOnDrop(tokio::spawn(crate::admin::serve(
        admin_listener,
        engine.store().clone(),
    )));
    let serves_controller = config.mode != Mode::Node;
    let serves_node = config.mode != Mode::Controller;
    let router = Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(
            health.clone(),
            config.driver_name.clone(),
            serves_controller,
        )))
        .add_optional_service(
            serves_controller
                .then(|| ControllerServer::new(ControllerService::new(engine.clone()))),
        )
        .add_optional_service(
            serves_controller
                .then(|| GroupControllerServer::new(GroupControllerService::new(engine.clone()))),
        )
        .add_optional_service(
            serves_node.then(|| NodeServer::new(NodeService::new(engine.clone()))),
        );
    // Logged once the endpoint is bound, with the address it got (`tcp://host:0` picks a port).
    let serving = |endpoint: &str| {
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            driver = %config.driver_name,
            node_id = %config.node_id,
            mode = ?config.mode,
            endpoint,
            "k8scsi serving"
        )
    };
    // Background snapshot copies stop as soon as shutdown starts, not after the connections
    // have drained: they keep their snapshots, and the next start copies them again.
    let shutdown = {
        let engine = engine.clone();
        async move {
            shutdown.await;
            engine.stop_background_copies();
        }
    };
    match &config.endpoint {
        Endpoint::Unix(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(io_err(format!("creating {}", parent.display())))?;
            }
            claim_socket(path)?;
            let listener =
                UnixListener::bind(path).map_err(io_err(format!("binding {}", path.display())))?;
            let bound = socket_identity(path);
            serving(&format!("unix://{}", path.display()));
            let result = with_drain_deadline(shutdown, |shutdown| {
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
            })
            .await;
            // Only our own socket: while we drained, a new server may have taken the path.
            if bound.is_some() && socket_identity(path) == bound {
                let _ = std::fs::remove_file(path);
            }
            result?;
        }
        Endpoint::Tcp(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(io_err(format!("binding {addr}")))?;
            match listener.local_addr() {
                Ok(local) => serving(&format!("tcp://{local}")),
                Err(_) => serving(&format!("tcp://{addr}")),
            }
            with_drain_deadline(shutdown, |shutdown| {
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            })
            .await?;
        }
    }
    let _ = std::fs::remove_file(crate::admin::socket_path(&config.state_dir));
    // Close the database file cleanly so the next start (and the operator commands) need no
    // repair.
    engine.store().close().await;
    let stats = engine.store().commit_stats();
    tracing::info!(
        transactions = stats.transactions,
        mutations = stats.mutations,
        mean_batch = stats.mutations as f64 / stats.transactions.max(1) as f64,
        mean_commit_us = stats.total_commit_time.as_micros() as u64 / stats.transactions.max(1),
        "k8scsi stopped; state store group-commit statistics"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("unix:///run/csi/csi.sock").unwrap(),
            Endpoint::Unix("/run/csi/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:/csi.sock").unwrap(),
            Endpoint::Unix("/csi.sock".into())
        );
        assert_eq!(
            Endpoint::parse("tcp://127.0.0.1:10000").unwrap(),
            Endpoint::Tcp("127.0.0.1:10000".into())
        );
        assert!(Endpoint::parse("unix://relative.sock").is_err());
        assert!(Endpoint::parse("http://x").is_err());
    }

    #[test]
    fn checks_driver_names() {
        assert!(check_driver_name("k8scsi").is_ok());
        assert!(check_driver_name("k8scsi.example.com").is_ok());
        assert!(check_driver_name("-bad").is_err());
        assert!(check_driver_name(&"a".repeat(64)).is_err());
        assert!(check_driver_name("a/b").is_err());
    }
}

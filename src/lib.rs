//! k8scsi: a Kubernetes CSI storage driver.
//!
//! The library holds the domain and its edges:
//! - [`engine`]: the volume engine (names, IDs, idempotency, locks, capability checks);
//! - [`backend`]: where volume data lives (node-local directories today);
//! - [`mount`]: confined path resolution and mount syscalls behind the [`mount::Mounter`] trait;
//! - [`store`]: durable metadata in redb with group commit;
//! - [`csi`]: the thin gRPC adapters that translate CSI requests to engine calls;
//! - [`server`], [`client`] and [`bench`]: what the `k8scsi` binary runs;
//! - [`metrics`] and [`health`]: Prometheus metrics, `/healthz` and readiness of a server;
//! - [`ops`]: the operator's commands (`volumes`, `snapshots`, `usage`, `doctor`);
//! - [`fuzzing`]: invariant checks over request validation for the fuzz targets and their
//!   regression corpus.
//!
//! Only [`csi`], [`server`], [`client`] and [`bench`] know about gRPC.

/// `println!` that ends the process quietly when stdout is closed (`k8scsi usage | head`,
/// `k8scsi client list | head`) instead of panicking: Rust ignores SIGPIPE, so a plain
/// `println!` to a closed pipe panics with "Broken pipe".
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::ops::emit(format_args!($($arg)*))
    };
}

pub mod admin;
pub mod backend;
pub mod bench;
pub mod client;
pub mod csi;
pub mod engine;
pub mod fuzzing;
pub mod health;
pub mod metrics;
pub mod mount;
pub mod ops;
pub mod server;
pub mod store;
pub mod units;

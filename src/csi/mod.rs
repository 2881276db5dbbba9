//! The gRPC edge: CSI Identity, Controller, GroupController and Node services over tonic.
//!
//! Each handler converts the request into engine types (checking required fields), calls the
//! engine, and converts the answer back. Engine errors become `tonic::Status` in exactly one
//! place, [`status`], and every call is logged once by [`handle`].

pub mod codec;
mod controller;
mod convert;
mod group_controller;
mod identity;
mod node;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use tonic::{Code, Response, Status};

use crate::backend::BackendError;
use crate::engine::Error;
use crate::mount::MountError;

pub use controller::ControllerService;
pub use group_controller::GroupControllerService;
pub use identity::IdentityService;
pub use node::NodeService;

/// The code generated from `proto/csi.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}

/// Maps an engine error to its CSI status code.
pub fn status(error: Error) -> Status {
    let code = match &error {
        Error::Missing(_)
        | Error::Invalid { .. }
        | Error::UnknownParameter(_)
        | Error::Unsupported(_) => Code::InvalidArgument,
        Error::VolumeNotFound(_) | Error::SnapshotNotFound(_) | Error::NotFound(_) => {
            Code::NotFound
        }
        Error::AlreadyExists { .. }
        | Error::SnapshotExists { .. }
        | Error::PublishedDifferently(_) => Code::AlreadyExists,
        Error::InProgress(_) | Error::BadToken(_) => Code::Aborted,
        Error::CapacityOutOfRange(_) => Code::OutOfRange,
        Error::Exhausted(_) => Code::ResourceExhausted,
        Error::Precondition(_) => Code::FailedPrecondition,
        Error::Backend(e) if e.is_out_of_space() => Code::ResourceExhausted,
        Error::Backend(BackendError::Unenforceable(_) | BackendError::Conflict(_)) => {
            Code::FailedPrecondition
        }
        Error::Backend(BackendError::Unsupported(_)) => Code::InvalidArgument,
        Error::Backend(BackendError::Io { .. } | BackendError::Command { .. }) => Code::Internal,
        Error::Backend(BackendError::Mount(
            MountError::Symlink { .. } | MountError::NotADirectory { .. },
        )) => Code::InvalidArgument,
        Error::Backend(BackendError::Mount(MountError::ParentMissing { .. })) => Code::NotFound,
        Error::Backend(BackendError::Mount(_)) => Code::Internal,
        Error::Mount(MountError::Symlink { .. } | MountError::NotADirectory { .. }) => {
            Code::InvalidArgument
        }
        Error::Mount(MountError::ParentMissing { .. }) => Code::NotFound,
        Error::Mount(MountError::NotEmpty { .. }) => Code::FailedPrecondition,
        // The kubelet retries UNAVAILABLE; the filesystem may come back.
        Error::Mount(MountError::TimedOut { .. } | MountError::StillHung { .. }) => {
            Code::Unavailable
        }
        Error::Mount(MountError::Io { .. }) | Error::Store(_) | Error::Internal(_) => {
            Code::Internal
        }
    };
    Status::new(code, error.to_string())
}

static NEXT_REQUEST: AtomicU64 = AtomicU64::new(1);

/// Runs one CSI call: logs method, IDs, duration and code on one line, and maps the error.
pub(crate) async fn handle<T>(
    method: &'static str,
    ids: &str,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<Response<T>, Status> {
    let request_id = NEXT_REQUEST.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let result = call.await.map_err(status);
    let elapsed = started.elapsed();
    let code = result.as_ref().err().map_or(Code::Ok, Status::code);
    crate::metrics::record_call(method, code, elapsed);
    let micros = elapsed.as_micros() as u64;
    match &result {
        Ok(_) => tracing::info!(request_id, method, ids, duration_us = micros, code = "OK"),
        Err(s) if s.code() == Code::Internal => tracing::error!(
            request_id, method, ids, duration_us = micros, code = ?s.code(), error = s.message()
        ),
        Err(s) => tracing::warn!(
            request_id, method, ids, duration_us = micros, code = ?s.code(), error = s.message()
        ),
    }
    result.map(Response::new)
}

//! The engine's error type. Each variant says what went wrong in domain words; the gRPC adapter
//! maps every variant to exactly one CSI status code (see `csi::status`).

use crate::backend::BackendError;
use crate::mount::MountError;
use crate::store::StoreError;

/// Everything an engine operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required request field is absent or empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A request field has a value we refuse.
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A StorageClass parameter we do not know.
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    /// A capability or option this backend cannot honour.
    #[error("{0}")]
    Unsupported(String),
    /// No volume with this ID exists.
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    /// No snapshot with this ID exists.
    #[error("snapshot {0} does not exist")]
    SnapshotNotFound(String),
    /// A snapshot with this name exists but differs from what was asked.
    #[error("snapshot {name:?} already exists with a different {what}")]
    SnapshotExists { name: String, what: String },
    /// Something else named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A volume with this name exists but differs from what was asked.
    #[error("volume {name:?} already exists with a different {what}")]
    AlreadyExists { name: String, what: String },
    /// A publication at this path exists with different options.
    #[error("{0}")]
    PublishedDifferently(String),
    /// Another operation on the same volume or name is under way.
    #[error("an operation on {0} is already in progress")]
    InProgress(String),
    /// The requested capacity can never be satisfied.
    #[error("{0}")]
    CapacityOutOfRange(String),
    /// Not enough space (or topology) to satisfy the request now.
    #[error("{0}")]
    Exhausted(String),
    /// The volume's state forbids the operation (e.g. still published).
    #[error("{0}")]
    Precondition(String),
    /// A ListVolumes starting token that we did not issue.
    #[error("starting_token {0:?} is not valid")]
    BadToken(String),
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The mount layer failed.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// A worker task died.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

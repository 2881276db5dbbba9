//! Durable metadata: volumes and node publications in one redb file under `--state-dir`.
//!
//! Writes go through a single writer thread that practises group commit: every mutation that
//! arrives while a commit is being fsynced joins the next transaction, so concurrent requests
//! share one fsync instead of paying one each. A caller's `commit` future resolves only after the
//! transaction holding its mutations is durable, which is what lets CreateVolume and DeleteVolume
//! promise durability before they reply.
//!
//! Reads use redb read transactions directly from the caller's thread: they never wait for the
//! writer and always see the last durable commit.

mod reader;
mod records;
mod schema;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use tokio::sync::oneshot;

pub use reader::{ReadSource, StateDump, read_file};
pub use records::{PublicationRecord, SnapshotRecord, VolumeRecord};
pub use schema::Migration;
use schema::{MIGRATIONS, has_records, migration_path};

/// Volume ID → JSON [`VolumeRecord`].
const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes");
/// Volume name (the CO's idempotency key) → volume ID.
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");
/// Creation sequence number → volume ID; ListVolumes pages walk this table, so a token (the next
/// sequence number) stays valid while volumes are added (they sort last) or removed.
const ORDER: TableDefinition<u64, &str> = TableDefinition::new("order");
/// (volume ID, target or staging path) → JSON [`PublicationRecord`].
const PUBLICATIONS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("publications");
/// Snapshot ID → JSON [`SnapshotRecord`]. ListSnapshots pages walk this table in ID order; a
/// token is the ID to continue from, which stays valid when snapshots come and go.
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Snapshot name (CreateSnapshot's idempotency key) → snapshot ID.
const SNAPSHOT_NAMES: TableDefinition<&str, &str> = TableDefinition::new("snapshot_names");
/// Counters and the schema version.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const NEXT_SEQ: &str = "next_seq";
const SCHEMA_VERSION_KEY: &str = "schema_version";
/// Bumped whenever a table's layout changes incompatibly; a store from an unknown version is
/// refused at start rather than misread.
pub const SCHEMA_VERSION: u64 = 1;

/// Name of the database file inside the state directory.
pub const STORE_FILE: &str = "k8scsi.redb";

/// Page cache of the database. redb's default (1 GiB) is sized for servers that own the
/// machine; a node plugin shares the node with workloads, and 10,000 volume records fit in a
/// few MiB.
const CACHE_BYTES: usize = 16 << 20;

/// How long the writer waits for commits that callers announced (see [`Store::intent`]) before
/// it commits what it has. Shorter than one fsync: folding a follower into the current
/// transaction saves it a whole commit of its own.
const GATHER_WINDOW: Duration = Duration::from_micros(250);

/// How many queued mutations one transaction takes at most; bounds the latency a caller can be
/// made to wait behind others.
const MAX_BATCH: usize = 512;

/// Failures of the metadata store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb reported an error (I/O, corruption, lock held by another process).
    #[error("state store: {0}")]
    Database(#[from] redb::Error),
    /// The database file could not be opened (a lock held by another process, corruption).
    #[error(
        "opening state store {path}: {source} (is another k8scsi process using this state directory?)"
    )]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    /// A stored record could not be decoded.
    #[error("state store record {key}: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The state directory could not be prepared or a directory could not be synced.
    #[error("state store {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The store was written by a version of k8scsi with another layout.
    #[error(
        "state store schema version {found} is not supported (this build reads {SCHEMA_VERSION})"
    )]
    Schema { found: u64 },
    /// The store was written by an older k8scsi whose layout this build cannot migrate.
    #[error(
        "state store schema version {found} is older than this build's schema version \
         {SCHEMA_VERSION}, and this build has no migration from schema version {stuck_at}; the \
         file was left unchanged. Start the k8scsi release that wrote it, or upgrade through a \
         release that migrates schema version {stuck_at}, or move the file away to start with \
         an empty store (its volumes are then unknown to the driver)"
    )]
    Outdated { found: u64, stuck_at: u64 },
    /// The file holds records but no schema version: not a store this driver initialised.
    #[error(
        "state store holds records but no schema version (this build writes schema version \
         {SCHEMA_VERSION}); refusing to guess its layout. The file was left unchanged: move it \
         away if it does not belong to k8scsi"
    )]
    Unversioned,
    /// The writer thread has stopped (it only does so when the store is dropped or failed).
    #[error("state store writer has stopped")]
    WriterGone,
    /// The store was closed (the server is shutting down).
    #[error("state store is closed")]
    Closed,
}

impl StoreError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

macro_rules! db_err {
    ($e:expr) => {
        $e.map_err(|e| StoreError::Database(e.into()))
    };
}

/// One change to the store; a commit applies a list of them atomically.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Insert or replace a volume. A new volume gets the next sequence number.
    PutVolume(VolumeRecord),
    /// Remove a volume, its name mapping and its ordering entry.
    DeleteVolume { id: String },
    /// Insert or replace a publication.
    PutPublication(PublicationRecord),
    /// Remove a publication.
    DeletePublication { volume_id: String, path: String },
    /// Insert or replace a snapshot.
    PutSnapshot(SnapshotRecord),
    /// Remove a snapshot and its name mapping.
    DeleteSnapshot { id: String },
}

struct CommitRequest {
    /// Asks the writer to stop after the batch it is building (see [`Store::close`]).
    close: bool,
    mutations: Vec<Mutation>,
    sync_dirs: Vec<PathBuf>,
    reply: oneshot::Sender<Result<(), String>>,
}

/// Statistics of the group-commit writer, for benchmarks and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct CommitStats {
    pub transactions: u64,
    pub mutations: u64,
    pub total_commit_time: Duration,
}

/// The metadata store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    /// `None` once [`Store::close`] has closed the file cleanly.
    db: Arc<RwLock<Option<Database>>>,
    writer: mpsc::Sender<CommitRequest>,
    stats: Arc<std::sync::Mutex<CommitStats>>,
    /// Commits announced by callers that are still preparing them.
    announced: Arc<AtomicUsize>,
}

/// A caller's announcement that it will commit shortly. While any are outstanding the writer
/// holds a batch open for up to [`GATHER_WINDOW`], so concurrent operations share one fsync.
/// Dropping it without committing withdraws the announcement.
pub struct CommitIntent {
    store: Store,
    active: bool,
}

impl CommitIntent {
    fn withdraw(&mut self) {
        if std::mem::take(&mut self.active) {
            self.store.announced.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Commits as [`Store::commit`] does, withdrawing the announcement as the request is
    /// queued.
    pub async fn commit(
        mut self,
        mutations: Vec<Mutation>,
        sync_dirs: Vec<PathBuf>,
    ) -> Result<(), StoreError> {
        let store = self.store.clone();
        store
            .commit_then(mutations, sync_dirs, || self.withdraw())
            .await
    }
}

impl Drop for CommitIntent {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// Refuses a store file that this build will not open (a newer or unmigratable older schema
/// version, records without a version) before anything opens it for writing: redb updates the
/// file's header on a writable open, and a refused file must stay exactly as it was. A file that
/// cannot be opened read-only (missing, empty, or left unclean by a crash and needing redb's
/// repair) is left to the writable open and its check.
fn refuse_other_schema(path: &Path) -> Result<(), StoreError> {
    let Ok(db) = redb::ReadOnlyDatabase::open(path) else {
        return Ok(());
    };
    let Ok(txn) = db.begin_read() else {
        return Ok(());
    };
    let found = txn
        .open_table(META)
        .ok()
        .and_then(|meta| meta.get(SCHEMA_VERSION_KEY).ok()?.map(|v| v.value()));
    let records = found.is_none() && has_records(&txn);
    drop(txn);
    drop(db);
    migration_path(found, records, SCHEMA_VERSION, MIGRATIONS).map(|_| ())
}

impl Store {
    /// Opens (or creates) the store in `state_dir` and starts its writer thread.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| StoreError::io(format!("creating {}", state_dir.display()), e))?;
        let path = state_dir.join(STORE_FILE);
        refuse_other_schema(&path)?;
        // An operator command reading the file (see `reader`) holds it for a few milliseconds;
        // wait that out rather than fail start-up, but not a server that keeps it open.
        let deadline = Instant::now() + Duration::from_secs(2);
        let db = loop {
            match Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(&path)
            {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(StoreError::Open {
                        path: path.clone(),
                        source,
                    });
                }
            }
        };
        let records = {
            let txn = db_err!(db.begin_read())?;
            has_records(&txn)
        };
        let txn = db_err!(db.begin_write())?;
        {
            let mut meta = db_err!(txn.open_table(META))?;
            let found = db_err!(meta.get(SCHEMA_VERSION_KEY))?.map(|v| v.value());
            let records = records && found.is_none();
            for step in migration_path(found, records, SCHEMA_VERSION, MIGRATIONS)? {
                tracing::info!(
                    from = step.from,
                    to = step.from + 1,
                    what = step.what,
                    "migrating the state store"
                );
                (step.run)(&txn)?;
            }
            if found != Some(SCHEMA_VERSION) {
                db_err!(meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION))?;
            }
            // Create every table so read transactions never meet a missing one.
            db_err!(txn.open_table(VOLUMES))?;
            db_err!(txn.open_table(NAMES))?;
            db_err!(txn.open_table(ORDER))?;
            db_err!(txn.open_table(PUBLICATIONS))?;
            // Added with snapshots; older stores simply gain the (empty) tables.
            db_err!(txn.open_table(SNAPSHOTS))?;
            db_err!(txn.open_table(SNAPSHOT_NAMES))?;
        }
        db_err!(txn.commit())?;
        // The new file's directory entry must be durable too.
        sync_dir(state_dir)?;

        let db = Arc::new(RwLock::new(Some(db)));
        let stats = Arc::new(std::sync::Mutex::new(CommitStats::default()));
        let (writer, queue) = mpsc::channel();
        let announced = Arc::new(AtomicUsize::new(0));
        let thread_db = db.clone();
        let thread_stats = stats.clone();
        let thread_announced = announced.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || run_writer(thread_db, queue, thread_stats, thread_announced))
            .map_err(|e| StoreError::io("starting writer thread", e))?;
        Ok(Store {
            db,
            writer,
            stats,
            announced,
        })
    }

    /// Applies `mutations` atomically and durably. Each directory in `sync_dirs` is fsynced
    /// before the transaction commits, so directory entries a caller created (or removed) are
    /// on disk no later than the record that describes them; the writer deduplicates them
    /// across a batch.
    pub async fn commit(
        &self,
        mutations: Vec<Mutation>,
        sync_dirs: Vec<PathBuf>,
    ) -> Result<(), StoreError> {
        self.commit_then(mutations, sync_dirs, || {}).await
    }

    /// Announces a commit this caller will make shortly (see [`CommitIntent`]).
    pub fn intent(&self) -> CommitIntent {
        self.announced.fetch_add(1, Ordering::AcqRel);
        CommitIntent {
            store: self.clone(),
            active: true,
        }
    }

    async fn commit_then(
        &self,
        mutations: Vec<Mutation>,
        sync_dirs: Vec<PathBuf>,
        queued: impl FnOnce(),
    ) -> Result<(), StoreError> {
        let (reply, done) = oneshot::channel();
        // Withdraw before queueing: a writer that saw the announcement and then our request
        // would otherwise wait out its gather window for a commit that has already arrived.
        queued();
        self.writer
            .send(CommitRequest {
                close: false,
                mutations,
                sync_dirs,
                reply,
            })
            .map_err(|_| StoreError::WriterGone)?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(message)) => Err(StoreError::io("commit", std::io::Error::other(message))),
            Err(_) => Err(StoreError::WriterGone),
        }
    }

    /// Commits what is queued, stops the writer and closes the database file cleanly, so the
    /// next start needs no repair. Later calls fail with [`StoreError::Closed`].
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        let request = CommitRequest {
            close: true,
            mutations: vec![],
            sync_dirs: vec![],
            reply,
        };
        if self.writer.send(request).is_ok() {
            let _ = done.await;
        }
        // The writer has let go of the database; dropping it writes the clean-shutdown state.
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        db.take();
    }

    /// Runs `read` on the open database.
    pub(crate) fn with_db<T>(
        &self,
        read: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        read(guard.as_ref().ok_or(StoreError::Closed)?)
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction, StoreError> {
        self.with_db(|db| db_err!(db.begin_read()))
    }

    /// Group-commit counters since start.
    pub fn commit_stats(&self) -> CommitStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The volume with this ID, if recorded.
    pub fn volume(&self, id: &str) -> Result<Option<VolumeRecord>, StoreError> {
        let txn = self.read_txn()?;
        let table = db_err!(txn.open_table(VOLUMES))?;
        match db_err!(table.get(id))? {
            Some(bytes) => Ok(Some(decode(id, bytes.value())?)),
            None => Ok(None),
        }
    }

    /// The ID recorded for a volume name, if any.
    pub fn volume_id_for_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        let txn = self.read_txn()?;
        let table = db_err!(txn.open_table(NAMES))?;
        Ok(db_err!(table.get(name))?.map(|v| v.value().to_string()))
    }

    /// Up to `max` volumes in creation order starting at sequence number `from`, and the
    /// sequence number to continue from when more remain.
    pub fn list_volumes(
        &self,
        from: u64,
        max: usize,
    ) -> Result<(Vec<VolumeRecord>, Option<u64>), StoreError> {
        let txn = self.read_txn()?;
        let order = db_err!(txn.open_table(ORDER))?;
        let volumes = db_err!(txn.open_table(VOLUMES))?;
        let mut out = Vec::new();
        for entry in db_err!(order.range(from..))? {
            let (seq, id) = db_err!(entry)?;
            if out.len() == max {
                return Ok((out, Some(seq.value())));
            }
            if let Some(bytes) = db_err!(volumes.get(id.value()))? {
                out.push(decode(id.value(), bytes.value())?);
            }
        }
        Ok((out, None))
    }

    /// Every recorded volume (for reconciliation and operator tools).
    pub fn all_volumes(&self) -> Result<Vec<VolumeRecord>, StoreError> {
        Ok(self.list_volumes(0, usize::MAX)?.0)
    }

    /// The sequence number the next new volume will get; a ListVolumes token must be below it.
    pub fn next_sequence(&self) -> Result<u64, StoreError> {
        let txn = self.read_txn()?;
        let meta = db_err!(txn.open_table(META))?;
        Ok(db_err!(meta.get(NEXT_SEQ))?.map(|v| v.value()).unwrap_or(1))
    }

    /// Publications of one volume, keyed by path.
    pub fn publications(
        &self,
        volume_id: &str,
    ) -> Result<BTreeMap<String, PublicationRecord>, StoreError> {
        let txn = self.read_txn()?;
        let table = db_err!(txn.open_table(PUBLICATIONS))?;
        let mut out = BTreeMap::new();
        // Tuple keys sort by volume ID first, so one volume's publications are contiguous.
        for entry in db_err!(table.range((volume_id, "")..))? {
            let (key, value) = db_err!(entry)?;
            let (vid, path) = key.value();
            if vid != volume_id {
                break;
            }
            out.insert(path.to_string(), decode(path, value.value())?);
        }
        Ok(out)
    }

    /// The snapshot with this ID, if recorded.
    pub fn snapshot(&self, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        let txn = self.read_txn()?;
        let table = db_err!(txn.open_table(SNAPSHOTS))?;
        match db_err!(table.get(id))? {
            Some(bytes) => Ok(Some(decode(id, bytes.value())?)),
            None => Ok(None),
        }
    }

    /// The ID recorded for a snapshot name, if any.
    pub fn snapshot_id_for_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        let txn = self.read_txn()?;
        let table = db_err!(txn.open_table(SNAPSHOT_NAMES))?;
        Ok(db_err!(table.get(name))?.map(|v| v.value().to_string()))
    }

    /// Up to `max` snapshots accepted by `keep`, in ID order from `from` (inclusive), and the
    /// ID to continue from when more remain.
    pub fn list_snapshots(
        &self,
        from: &str,
        max: usize,
        keep: impl Fn(&SnapshotRecord) -> bool,
    ) -> Result<(Vec<SnapshotRecord>, Option<String>), StoreError> {
        let txn = self.read_txn()?;
        let table = db_err!(txn.open_table(SNAPSHOTS))?;
        let mut out = Vec::new();
        for entry in db_err!(table.range(from..))? {
            let (id, bytes) = db_err!(entry)?;
            let record: SnapshotRecord = decode(id.value(), bytes.value())?;
            if !keep(&record) {
                continue;
            }
            if out.len() == max {
                return Ok((out, Some(record.id)));
            }
            out.push(record);
        }
        Ok((out, None))
    }

    /// Every recorded snapshot.
    pub fn all_snapshots(&self) -> Result<Vec<SnapshotRecord>, StoreError> {
        Ok(self.list_snapshots("", usize::MAX, |_| true)?.0)
    }

    /// Every recorded publication.
    pub fn all_publications(&self) -> Result<Vec<PublicationRecord>, StoreError> {
        let txn = self.read_txn()?;
        let table = db_err!(txn.open_table(PUBLICATIONS))?;
        let mut out = Vec::new();
        for entry in db_err!(table.iter())? {
            let (key, value) = db_err!(entry)?;
            out.push(decode(key.value().1, value.value())?);
        }
        Ok(out)
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Records are plain structs of strings and integers: serialisation cannot fail.
    serde_json::to_vec(value).expect("records serialise")
}

/// fsyncs a directory so entries created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(format!("syncing {}", dir.display()), e))
}

fn run_writer(
    db: Arc<RwLock<Option<Database>>>,
    queue: mpsc::Receiver<CommitRequest>,
    stats: Arc<std::sync::Mutex<CommitStats>>,
    announced: Arc<AtomicUsize>,
) {
    let syncer = DirSyncer::start();
    let mut closing = None;
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        batch.extend(queue.try_iter().take(MAX_BATCH - 1));
        // Hold the batch open briefly while other callers have announced commits: joining
        // this transaction costs them less than waiting for the next one.
        let deadline = Instant::now() + GATHER_WINDOW;
        while batch.len() < MAX_BATCH && announced.load(Ordering::Acquire) > 0 {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match queue.recv_timeout(left) {
                Ok(next) => {
                    batch.push(next);
                    let room = MAX_BATCH - batch.len();
                    batch.extend(queue.try_iter().take(room));
                }
                Err(_) => break,
            }
        }
        // A close request ends the loop once the batch it arrived with is committed.
        if let Some(at) = batch.iter().position(|r| r.close) {
            closing = Some(batch.remove(at));
        }
        let started = Instant::now();
        let result = {
            let guard = db.read().unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(db) => apply_batch(db, &batch, syncer.as_ref()),
                None => Err(StoreError::Closed),
            }
        };
        let elapsed = started.elapsed();
        {
            let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
            s.transactions += 1;
            s.mutations += batch.iter().map(|r| r.mutations.len() as u64).sum::<u64>();
            s.total_commit_time += elapsed;
        }
        let outcome = result.map_err(|e| e.to_string());
        if let Err(message) = &outcome {
            tracing::error!(error = %message, requests = batch.len(), "state store commit failed");
        }
        for request in batch {
            let _ = request.reply.send(outcome.clone());
        }
        if let Some(close) = closing.take() {
            let _ = close.reply.send(Ok(()));
            return;
        }
    }
}

/// A thread that fsyncs directories while the writer commits the transaction, so a batch
/// waits for the slower of the two flushes instead of their sum (on a journaling filesystem
/// the two often share one journal commit).
///
/// Either flush may reach the disk first if the machine dies in between; both orders recover,
/// because the reply waits for both: an unrecorded volume directory is adopted by the retried
/// CreateVolume (IDs derive from names) or removed by the retried DeleteVolume, and a record
/// whose directory is missing is reported by reconciliation and recreated on retry.
struct DirSyncer {
    requests: std::sync::mpsc::Sender<Vec<PathBuf>>,
    results: std::sync::mpsc::Receiver<Result<(), StoreError>>,
}

impl DirSyncer {
    /// Starts the thread; `None` (sync inline) if the thread cannot be spawned.
    fn start() -> Option<DirSyncer> {
        let (requests, work) = std::sync::mpsc::channel::<Vec<PathBuf>>();
        let (done, results) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("store-dirsync".into())
            .spawn(move || {
                for dirs in work {
                    if done.send(sync_dirs(&dirs)).is_err() {
                        break;
                    }
                }
            })
            .ok()?;
        Some(DirSyncer { requests, results })
    }
}

fn sync_dirs(dirs: &[PathBuf]) -> Result<(), StoreError> {
    dirs.iter().try_for_each(|d| sync_dir(d))
}

fn apply_batch(
    db: &Database,
    batch: &[CommitRequest],
    syncer: Option<&DirSyncer>,
) -> Result<(), StoreError> {
    let mut dirs: Vec<PathBuf> = batch
        .iter()
        .flat_map(|r| r.sync_dirs.iter().cloned())
        .collect();
    dirs.sort();
    dirs.dedup();
    let pending_sync = match syncer {
        Some(syncer) if !dirs.is_empty() => syncer.requests.send(dirs).is_ok().then_some(syncer),
        _ => {
            sync_dirs(&dirs)?;
            None
        }
    };
    let committed = commit_mutations(db, batch);
    if let Some(syncer) = pending_sync {
        syncer
            .results
            .recv()
            .map_err(|_| StoreError::WriterGone)??;
    }
    committed
}

fn commit_mutations(db: &Database, batch: &[CommitRequest]) -> Result<(), StoreError> {
    let txn = db_err!(db.begin_write())?;
    {
        let mut volumes = db_err!(txn.open_table(VOLUMES))?;
        let mut names = db_err!(txn.open_table(NAMES))?;
        let mut order = db_err!(txn.open_table(ORDER))?;
        let mut publications = db_err!(txn.open_table(PUBLICATIONS))?;
        let mut snapshots = db_err!(txn.open_table(SNAPSHOTS))?;
        let mut snapshot_names = db_err!(txn.open_table(SNAPSHOT_NAMES))?;
        let mut meta = db_err!(txn.open_table(META))?;
        let mut next_seq = db_err!(meta.get(NEXT_SEQ))?.map(|v| v.value()).unwrap_or(1);
        for mutation in batch.iter().flat_map(|r| r.mutations.iter()) {
            match mutation {
                Mutation::PutVolume(record) => {
                    let mut record = record.clone();
                    let previous = db_err!(volumes.get(record.id.as_str()))?
                        .map(|v| decode::<VolumeRecord>(&record.id, v.value()))
                        .transpose()?;
                    record.seq = match previous {
                        Some(prev) => prev.seq,
                        None => {
                            next_seq += 1;
                            next_seq - 1
                        }
                    };
                    db_err!(volumes.insert(record.id.as_str(), encode(&record).as_slice()))?;
                    db_err!(names.insert(record.name.as_str(), record.id.as_str()))?;
                    db_err!(order.insert(record.seq, record.id.as_str()))?;
                }
                Mutation::DeleteVolume { id } => {
                    let previous = db_err!(volumes.remove(id.as_str()))?
                        .map(|v| decode::<VolumeRecord>(id, v.value()))
                        .transpose()?;
                    if let Some(prev) = previous {
                        db_err!(names.remove(prev.name.as_str()))?;
                        db_err!(order.remove(prev.seq))?;
                    }
                }
                Mutation::PutPublication(record) => {
                    db_err!(publications.insert(
                        (record.volume_id.as_str(), record.path.as_str()),
                        encode(record).as_slice()
                    ))?;
                }
                Mutation::DeletePublication { volume_id, path } => {
                    db_err!(publications.remove((volume_id.as_str(), path.as_str())))?;
                }
                Mutation::PutSnapshot(record) => {
                    db_err!(snapshots.insert(record.id.as_str(), encode(record).as_slice()))?;
                    db_err!(snapshot_names.insert(record.name.as_str(), record.id.as_str()))?;
                }
                Mutation::DeleteSnapshot { id } => {
                    let previous = db_err!(snapshots.remove(id.as_str()))?
                        .map(|v| decode::<SnapshotRecord>(id, v.value()))
                        .transpose()?;
                    if let Some(prev) = previous {
                        db_err!(snapshot_names.remove(prev.name.as_str()))?;
                    }
                }
            }
        }
        db_err!(meta.insert(NEXT_SEQ, next_seq))?;
    }
    db_err!(txn.commit())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(id: &str, name: &str) -> VolumeRecord {
        VolumeRecord {
            id: id.into(),
            name: name.into(),
            seq: 0,
            backend: "dir".into(),
            capacity_bytes: 1024,
            parameters: BTreeMap::new(),
            access_modes: vec![],
            accessible_node: "node-a".into(),
            created_unix: 0,
            enforcement: String::new(),
            metadata: BTreeMap::new(),
            source_snapshot_id: String::new(),
            source_volume_id: String::new(),
            populated_by: String::new(),
        }
    }

    fn snapshot(id: &str, name: &str, source: &str) -> SnapshotRecord {
        SnapshotRecord {
            id: id.into(),
            name: name.into(),
            source_volume_id: source.into(),
            backend: "dir".into(),
            size_bytes: 1,
            created_unix: 1,
            created_nanos: 0,
            ready_to_use: true,
            mechanism: "copy".into(),
            group_snapshot_id: String::new(),
            metadata: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn snapshots_page_by_id_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let puts = ["s1", "s2", "s3", "s4"]
            .iter()
            .enumerate()
            .map(|(i, id)| {
                Mutation::PutSnapshot(snapshot(id, &format!("n{id}"), ["a", "b"][i % 2]))
            })
            .collect();
        store.commit(puts, vec![]).await.unwrap();
        let (page, next) = store.list_snapshots("", 2, |_| true).unwrap();
        assert_eq!(
            page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["s1", "s2"]
        );
        assert_eq!(next.as_deref(), Some("s3"));
        let (rest, end) = store.list_snapshots("s3", 2, |_| true).unwrap();
        assert_eq!(rest.len(), 2);
        assert!(end.is_none());
        let (of_b, _) = store
            .list_snapshots("", 10, |s| s.source_volume_id == "b")
            .unwrap();
        assert_eq!(
            of_b.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["s2", "s4"]
        );
        store
            .commit(vec![Mutation::DeleteSnapshot { id: "s2".into() }], vec![])
            .await
            .unwrap();
        assert!(store.snapshot("s2").unwrap().is_none());
        assert!(store.snapshot_id_for_name("ns2").unwrap().is_none());
        assert_eq!(
            store.snapshot_id_for_name("ns3").unwrap().as_deref(),
            Some("s3")
        );
        assert_eq!(store.all_snapshots().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn put_list_delete_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0..5 {
                store
                    .commit(
                        vec![Mutation::PutVolume(volume(
                            &format!("id{i}"),
                            &format!("n{i}"),
                        ))],
                        vec![],
                    )
                    .await
                    .unwrap();
            }
            store
                .commit(vec![Mutation::DeleteVolume { id: "id1".into() }], vec![])
                .await
                .unwrap();
        }
        // The writer thread holds an Arc of the database; wait for it to notice the drop.
        let store = loop {
            match Store::open(dir.path()) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let (page, next) = store.list_volumes(0, 2).unwrap();
        assert_eq!(
            page.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
            ["id0", "id2"]
        );
        let (rest, end) = store.list_volumes(next.unwrap(), 10).unwrap();
        assert_eq!(
            rest.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
            ["id3", "id4"]
        );
        assert!(end.is_none());
        assert_eq!(
            store.volume_id_for_name("n3").unwrap().as_deref(),
            Some("id3")
        );
        assert!(store.volume_id_for_name("n1").unwrap().is_none());
    }

    #[tokio::test]
    async fn concurrent_commits_share_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .commit(
                        vec![Mutation::PutVolume(volume(
                            &format!("v{i}"),
                            &format!("n{i}"),
                        ))],
                        vec![],
                    )
                    .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let stats = store.commit_stats();
        assert_eq!(stats.mutations, 200);
        assert!(stats.transactions <= 200);
        assert_eq!(store.all_volumes().unwrap().len(), 200);
        // Sequence numbers are unique.
        let mut seqs: Vec<u64> = store.all_volumes().unwrap().iter().map(|v| v.seq).collect();
        seqs.dedup();
        assert_eq!(seqs.len(), 200);
    }

    #[tokio::test]
    async fn intents_are_withdrawn_on_commit_and_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.intent();
        let b = store.intent();
        assert_eq!(store.announced.load(Ordering::Acquire), 2);
        drop(a);
        assert_eq!(store.announced.load(Ordering::Acquire), 1);
        b.commit(
            vec![Mutation::PutVolume(volume("v", "n"))],
            vec![dir.path().to_path_buf()],
        )
        .await
        .unwrap();
        assert_eq!(store.announced.load(Ordering::Acquire), 0);
        assert!(store.volume("v").unwrap().is_some());
    }

    #[tokio::test]
    async fn close_commits_queued_work_and_releases_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .commit(vec![Mutation::PutVolume(volume("v", "n"))], vec![])
            .await
            .unwrap();
        store.close().await;
        assert!(matches!(store.volume("v"), Err(StoreError::Closed)));
        // The file is free at once (no writer thread holding it) and reads back cleanly.
        let reopened = Store::open(dir.path()).unwrap();
        assert!(reopened.volume("v").unwrap().is_some());
    }

    #[tokio::test]
    async fn publications_are_scoped_to_their_volume() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let publication = |vid: &str, path: &str| PublicationRecord {
            volume_id: vid.into(),
            path: path.into(),
            node_id: "n".into(),
            readonly: false,
            access_mode: "SINGLE_NODE_WRITER".into(),
            mount_flags: vec![],
            staging: false,
        };
        store
            .commit(
                vec![
                    Mutation::PutPublication(publication("a", "/k/1")),
                    Mutation::PutPublication(publication("ab", "/k/2")),
                    Mutation::PutPublication(publication("a", "/k/3")),
                ],
                vec![],
            )
            .await
            .unwrap();
        let pubs = store.publications("a").unwrap();
        assert_eq!(pubs.keys().collect::<Vec<_>>(), ["/k/1", "/k/3"]);
        store
            .commit(
                vec![Mutation::DeletePublication {
                    volume_id: "a".into(),
                    path: "/k/1".into(),
                }],
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(store.publications("a").unwrap().len(), 1);
        assert_eq!(store.all_publications().unwrap().len(), 2);
    }
}

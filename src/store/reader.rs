//! Whole-store reads for the operator CLI: a [`StateDump`] of every record, taken either from
//! the database file (when no server holds it) or by the running server itself (see
//! `crate::admin`), so the CLI never needs the writer's lock and never writes the file.
//!
//! The file is opened read-only, which redb allows only while no writer has it open, and is let
//! go as soon as the dump is read. A store left unclean by a crash (no server running) cannot
//! be opened read-only, because redb repairs on open; the reader then repairs a private copy in
//! the temporary directory instead, and the original stays the server's to repair.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{
    Database, DatabaseError, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use super::{
    CACHE_BYTES, META, NEXT_SEQ, ORDER, PUBLICATIONS, PublicationRecord, SCHEMA_VERSION,
    SCHEMA_VERSION_KEY, STORE_FILE, Store, StoreError, VOLUMES, VolumeRecord, decode,
};

/// Every record of a store at one moment (one read transaction).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateDump {
    /// `None` for a store that never finished its first open.
    pub schema_version: Option<u64>,
    pub next_sequence: u64,
    /// In creation order.
    pub volumes: Vec<VolumeRecord>,
    pub publications: Vec<PublicationRecord>,
    /// Records of the `snapshots` table decoded generically, by snapshot ID; `None` when the
    /// store has no such table (a server that does not take snapshots).
    pub snapshots: Option<Vec<(String, serde_json::Value)>>,
}

impl StateDump {
    /// Publications grouped by volume ID.
    pub fn publications_by_volume(&self) -> BTreeMap<String, Vec<PublicationRecord>> {
        let mut out: BTreeMap<String, Vec<PublicationRecord>> = BTreeMap::new();
        for p in &self.publications {
            out.entry(p.volume_id.clone()).or_default().push(p.clone());
        }
        out
    }

    /// The volume with this ID, else the one with this name.
    pub fn find_volume(&self, id_or_name: &str) -> Option<&VolumeRecord> {
        self.volumes
            .iter()
            .find(|v| v.id == id_or_name)
            .or_else(|| self.volumes.iter().find(|v| v.name == id_or_name))
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Database(e.into())
}

/// Opens a table that may not exist yet.
fn optional_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &ReadTransaction,
    definition: TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(definition) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(db_err(e)),
    }
}

/// Reads every record in one read transaction.
fn dump(db: &impl ReadableDatabase) -> Result<StateDump, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let mut out = StateDump {
        next_sequence: 1,
        ..Default::default()
    };
    if let Some(meta) = optional_table(&txn, META)? {
        out.schema_version = meta
            .get(SCHEMA_VERSION_KEY)
            .map_err(db_err)?
            .map(|v| v.value());
        if let Some(next) = meta.get(NEXT_SEQ).map_err(db_err)? {
            out.next_sequence = next.value();
        }
    }
    if let Some(found) = out.schema_version
        && found != SCHEMA_VERSION
    {
        return Err(StoreError::Schema { found });
    }
    if let (Some(order), Some(volumes)) =
        (optional_table(&txn, ORDER)?, optional_table(&txn, VOLUMES)?)
    {
        for entry in order.iter().map_err(db_err)? {
            let (_, id) = entry.map_err(db_err)?;
            if let Some(bytes) = volumes.get(id.value()).map_err(db_err)? {
                out.volumes.push(decode(id.value(), bytes.value())?);
            }
        }
    }
    if let Some(publications) = optional_table(&txn, PUBLICATIONS)? {
        for entry in publications.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            out.publications.push(decode(key.value().1, value.value())?);
        }
    }
    let snapshots: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
    if let Some(table) = optional_table(&txn, snapshots)? {
        let mut rows = Vec::new();
        for entry in table.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            rows.push((key.value().to_string(), decode(key.value(), value.value())?));
        }
        out.snapshots = Some(rows);
    }
    Ok(out)
}

impl Store {
    /// Every record, as the operator CLI shows them (served on the admin socket).
    pub fn dump(&self) -> Result<StateDump, StoreError> {
        self.with_db(dump)
    }
}

/// Where a [`StateDump`] read from the file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSource {
    /// The store file itself (closed cleanly; no server has it open).
    File,
    /// A repaired private copy: the file was not closed cleanly and no server has it open.
    RecoveredCopy,
}

/// Reads every record from the store file in `state_dir`, without creating or changing it.
/// `Ok(None)`: a process (the server) has the store open, so ask it instead.
pub fn read_file(state_dir: &Path) -> Result<Option<(StateDump, ReadSource)>, StoreError> {
    let path = state_dir.join(STORE_FILE);
    if !path.is_file() {
        return Err(failure(
            &path,
            "no state store here (has `k8scsi serve` run with this --state-dir?)".to_string(),
        ));
    }
    let opened = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .open_read_only(&path);
    // Each handle is dropped (and its lock released) as soon as the dump is read.
    match opened {
        Ok(db) => Ok(Some((read_and_close(db)?, ReadSource::File))),
        Err(DatabaseError::DatabaseAlreadyOpen) => Ok(None),
        Err(DatabaseError::RepairAborted) => {
            let copy = open_repaired_copy(&path)?;
            Ok(Some((dump(&copy)?, ReadSource::RecoveredCopy)))
        }
        Err(e) => Err(failure(&path, e.to_string())),
    }
}

fn read_and_close(db: ReadOnlyDatabase) -> Result<StateDump, StoreError> {
    let result = dump(&db);
    drop(db);
    result
}

fn failure(path: &Path, message: String) -> StoreError {
    StoreError::io(
        format!("reading {}", path.display()),
        std::io::Error::other(message),
    )
}

/// Copies the store to the temporary directory and opens (so repairs) the copy. The copy is
/// unlinked as soon as it is open; the original is only read.
fn open_repaired_copy(path: &Path) -> Result<Database, StoreError> {
    let copy: PathBuf = std::env::temp_dir().join(format!(
        "k8scsi-store-copy-{}-{}.redb",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    std::fs::copy(path, &copy).map_err(|e| {
        StoreError::io(
            format!("copying {} to {}", path.display(), copy.display()),
            e,
        )
    })?;
    let opened = redb::Builder::new().set_cache_size(CACHE_BYTES).open(&copy);
    let _ = std::fs::remove_file(&copy);
    opened.map_err(|e| {
        failure(
            path,
            format!("the store was not closed cleanly and repairing a copy failed: {e}"),
        )
    })
}

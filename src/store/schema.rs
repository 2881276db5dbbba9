//! Schema versions of the state store: what opening a file of a given version takes (nothing,
//! migrations, or a refusal that leaves the file alone) and the list of migrations this build
//! can run. Kept apart from the writer so the version rules are unit-tested on their own.

use redb::{ReadableTableMetadata, TableDefinition};

use super::{META, NAMES, ORDER, PUBLICATIONS, SNAPSHOT_NAMES, SNAPSHOTS, StoreError, VOLUMES};

/// A rewrite of a store of schema version `from` into version `from + 1`, run inside the
/// transaction that opens the store (so a crash mid-migration leaves the old version intact).
#[derive(Debug)]
pub struct Migration {
    pub from: u64,
    /// What changes, for the log.
    pub what: &'static str,
    pub run: fn(&redb::WriteTransaction) -> Result<(), StoreError>,
}

/// Every migration this build can run, oldest first. Schema 1 is the first layout, so there are
/// none yet. A change that bumps [`SCHEMA_VERSION`] to 2 adds `Migration { from: 1, .. }` here
/// (and a test that opens a version-1 file); older stores with no path to the current version
/// are refused untouched with [`StoreError::Outdated`].
pub(super) const MIGRATIONS: &[Migration] = &[];

/// What opening a store that says schema `found` takes: nothing to do (`None` with no records,
/// a fresh file or one whose very first initialisation did not commit; or the current
/// version), the migrations from `found` to `current` in order, or a refusal.
pub(super) fn migration_path(
    found: Option<u64>,
    has_records: bool,
    current: u64,
    migrations: &[Migration],
) -> Result<Vec<&Migration>, StoreError> {
    let Some(found) = found else {
        return if has_records {
            Err(StoreError::Unversioned)
        } else {
            Ok(vec![])
        };
    };
    if found > current {
        return Err(StoreError::Schema { found });
    }
    let mut path = Vec::new();
    let mut at = found;
    while at < current {
        let Some(step) = migrations.iter().find(|m| m.from == at) else {
            return Err(StoreError::Outdated {
                found,
                stuck_at: at,
            });
        };
        path.push(step);
        at += 1;
    }
    Ok(path)
}

/// Whether any of the store's tables holds a row (the schema key itself aside).
pub(super) fn has_records(txn: &redb::ReadTransaction) -> bool {
    fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
        txn: &redb::ReadTransaction,
        table: TableDefinition<K, V>,
    ) -> bool {
        txn.open_table(table)
            .ok()
            .and_then(|t| t.len().ok())
            .is_some_and(|n| n > 0)
    }
    let meta_rows = txn
        .open_table(META)
        .ok()
        .and_then(|t| t.len().ok())
        .unwrap_or(0);
    meta_rows > 0
        || rows(txn, VOLUMES)
        || rows(txn, NAMES)
        || rows(txn, ORDER)
        || rows(txn, PUBLICATIONS)
        || rows(txn, SNAPSHOTS)
        || rows(txn, SNAPSHOT_NAMES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noop(_: &redb::WriteTransaction) -> Result<(), StoreError> {
        Ok(())
    }

    const CHAIN: &[Migration] = &[
        Migration {
            from: 1,
            what: "one to two",
            run: noop,
        },
        Migration {
            from: 2,
            what: "two to three",
            run: noop,
        },
    ];

    fn steps(path: Vec<&Migration>) -> Vec<u64> {
        path.into_iter().map(|m| m.from).collect()
    }

    #[test]
    fn fresh_and_current_stores_need_nothing() {
        assert!(migration_path(None, false, 1, &[]).unwrap().is_empty());
        assert!(migration_path(Some(1), true, 1, &[]).unwrap().is_empty());
        assert!(migration_path(Some(3), true, 3, CHAIN).unwrap().is_empty());
    }

    #[test]
    fn records_without_a_version_are_refused() {
        assert!(matches!(
            migration_path(None, true, 1, CHAIN),
            Err(StoreError::Unversioned)
        ));
    }

    #[test]
    fn newer_stores_are_refused() {
        assert!(matches!(
            migration_path(Some(2), true, 1, &[]),
            Err(StoreError::Schema { found: 2 })
        ));
    }

    #[test]
    fn older_stores_migrate_step_by_step_or_are_refused_naming_both_versions() {
        assert_eq!(
            steps(migration_path(Some(1), true, 3, CHAIN).unwrap()),
            [1, 2]
        );
        assert_eq!(steps(migration_path(Some(2), true, 3, CHAIN).unwrap()), [2]);
        let refused = migration_path(Some(0), true, 3, CHAIN).unwrap_err();
        assert!(matches!(
            refused,
            StoreError::Outdated {
                found: 0,
                stuck_at: 0
            }
        ));
        // A gap in the chain stops at the gap.
        let gap = migration_path(Some(1), true, 4, CHAIN).unwrap_err();
        assert!(matches!(
            gap,
            StoreError::Outdated {
                found: 1,
                stuck_at: 3
            }
        ));
        // This build: schema 1 is the first, so version 0 has nowhere to go.
        let message = migration_path(Some(0), true, super::super::SCHEMA_VERSION, MIGRATIONS)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("schema version 0") && message.contains("schema version 1"),
            "{message}"
        );
    }
}

//! Crash test: SIGKILL the server in the middle of a stream of concurrent CreateVolume and
//! DeleteVolume calls, restart it, and check that
//! - every acknowledged create exists (listed by ListVolumes, directory on disk),
//! - every acknowledged delete is gone (not listed, no directory),
//! - no volume is listed twice and nothing unexplained is on disk,
//! - retries of the interrupted calls succeed and converge to exactly one volume per name, with
//!   the directories on disk matching the listed volumes exactly.
//!
//! This is repeated at many random kill points on one server whose state accumulates across
//! rounds. The seed is printed; `K8SCSI_CRASH_SEED` replays its choices of operations and kill
//! delays (timing still varies), `K8SCSI_CRASH_ROUNDS` and `K8SCSI_CRASH_WORKERS` change the
//! amount of work.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::fault::{Rng, env_u64};
use common::{Driver, create_request};
use k8scsi::csi::proto::controller_client::ControllerClient;
use k8scsi::csi::proto::{DeleteVolumeRequest, ListVolumesRequest};
use k8scsi::engine::ids::VolumeId;
use tonic::Code;
use tonic::transport::Channel;

const DEFAULT_ROUNDS: u64 = 50;
const DEFAULT_WORKERS: usize = 8;
const VOLUME_BYTES: i64 = 1 << 20;
/// Live volumes a worker aims to stay around.
const LIVE_PER_WORKER: usize = 24;
/// Page size for ListVolumes, small so that paging is exercised.
const PAGE: i32 = 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Delete,
}

/// The last acknowledged outcome for a name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Acked {
    Created(String),
    Deleted,
}

/// What the client knows about one name.
#[derive(Debug, Clone, Default)]
struct NameState {
    acked: Option<Acked>,
    /// A call sent without an answer (the server died under it, or it was sent to a dead one).
    in_flight: Option<Op>,
}

/// The names one worker owns (only that worker ever sends calls for them).
type Names = BTreeMap<String, NameState>;

#[derive(Debug, Default)]
struct Stats {
    acked_creates: u64,
    acked_deletes: u64,
    retried_creates: u64,
    retried_deletes: u64,
    /// In-flight creates whose volume was already recorded before the retry.
    in_flight_creates_landed: u64,
    /// In-flight deletes whose volume was already gone before the retry.
    in_flight_deletes_landed: u64,
    /// Directories without a record seen after a crash (interrupted creates), adopted on retry.
    orphans_before_retry: u64,
    /// Records whose directory was already removed (interrupted deletes), finished on retry.
    half_deleted_before_retry: u64,
    error_codes: BTreeMap<String, u64>,
}

fn id_for(name: &str) -> String {
    VolumeId::for_name("dir", name).to_string()
}

/// Whether a failed call's error is what a dying server produces (the outcome is unknown).
fn is_transport_error(code: Code) -> bool {
    matches!(code, Code::Unavailable | Code::Unknown | Code::Cancelled)
}

struct WorkerResult {
    names: Names,
    acked_creates: u64,
    acked_deletes: u64,
    error_code: Option<String>,
}

/// Sends calls for this worker's names one after another until the server is killed; records
/// each acknowledged outcome and leaves the unanswered call marked in flight.
async fn worker(
    mut client: ControllerClient<Channel>,
    mut names: Names,
    mut rng: Rng,
    round: u64,
    index: usize,
    killed: Arc<AtomicBool>,
) -> WorkerResult {
    let mut result = WorkerResult {
        names: Names::new(),
        acked_creates: 0,
        acked_deletes: 0,
        error_code: None,
    };
    let mut fresh = 0u64;
    while !killed.load(Ordering::SeqCst) {
        let live: Vec<String> = names
            .iter()
            .filter(|(_, s)| matches!(s.acked, Some(Acked::Created(_))))
            .map(|(n, _)| n.clone())
            .collect();
        let deleted: Vec<String> = names
            .iter()
            .filter(|(_, s)| s.acked == Some(Acked::Deleted))
            .map(|(n, _)| n.clone())
            .collect();
        let new_name = |fresh: &mut u64| {
            *fresh += 1;
            format!("crash-r{round}-w{index}-{}", *fresh - 1)
        };
        // Mostly new volumes, until a worker owns many; then mostly deletes, so the number of
        // volumes (and the time each round's checks take) stays bounded over long runs.
        let crowded = live.len() >= LIVE_PER_WORKER;
        let (name, op) = match rng.below(10) {
            0..=4 if !crowded => (new_name(&mut fresh), Op::Create),
            0..=7 => match rng.pick(&live) {
                Some(n) => (n.clone(), Op::Delete),
                None => (new_name(&mut fresh), Op::Create),
            },
            // A repeated create of a live volume must answer with the same volume.
            8 => match rng.pick(&live) {
                Some(n) => (n.clone(), Op::Create),
                None => (new_name(&mut fresh), Op::Create),
            },
            // Creating a deleted name again.
            _ => match rng.pick(&deleted) {
                Some(n) => (n.clone(), Op::Create),
                None => (new_name(&mut fresh), Op::Create),
            },
        };
        let state = names.entry(name.clone()).or_default();
        assert!(state.in_flight.is_none(), "{name}: two calls in flight");
        state.in_flight = Some(op);
        let outcome = match op {
            Op::Create => client
                .create_volume(create_request(&name, VOLUME_BYTES))
                .await
                .map(|r| {
                    Acked::Created(
                        r.into_inner()
                            .volume
                            .expect("CreateVolume answered without a volume")
                            .volume_id,
                    )
                }),
            Op::Delete => {
                let Some(Acked::Created(id)) = &state.acked else {
                    unreachable!("only live volumes are deleted")
                };
                client
                    .delete_volume(DeleteVolumeRequest {
                        volume_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| Acked::Deleted)
            }
        };
        match outcome {
            Ok(acked) => {
                if let Acked::Created(id) = &acked {
                    assert_eq!(
                        *id,
                        id_for(&name),
                        "{name}: CreateVolume returned another ID"
                    );
                    if let Some(Acked::Created(before)) = &state.acked {
                        assert_eq!(id, before, "{name}: repeated create changed the ID");
                    }
                    result.acked_creates += 1;
                } else {
                    result.acked_deletes += 1;
                }
                state.acked = Some(acked);
                state.in_flight = None;
            }
            Err(status) => {
                // Only a dying server may fail these calls, and only with transport errors.
                let dying = killed.load(Ordering::SeqCst);
                assert!(
                    dying && is_transport_error(status.code()),
                    "{name}: {op:?} failed {} the kill: {status:?}",
                    if dying { "after" } else { "before" }
                );
                result.error_code = Some(format!("{:?}", status.code()));
                break;
            }
        }
    }
    result.names = names;
    result
}

/// Every volume ID ListVolumes reports, paging through all of them.
async fn list_all(client: &mut ControllerClient<Channel>) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    for _ in 0..100_000 {
        let page = client
            .list_volumes(ListVolumesRequest {
                max_entries: PAGE,
                starting_token: token.clone(),
            })
            .await
            .expect("ListVolumes")
            .into_inner();
        assert!(
            page.entries.len() <= PAGE as usize,
            "page larger than asked"
        );
        ids.extend(
            page.entries
                .into_iter()
                .map(|e| e.volume.expect("entry without volume").volume_id),
        );
        if page.next_token.is_empty() {
            return ids;
        }
        token = page.next_token;
    }
    panic!("ListVolumes paging does not end");
}

/// Volume directories on disk.
fn dirs_on_disk(driver: &Driver) -> BTreeSet<String> {
    let volumes = driver.data_dir().join("volumes");
    std::fs::read_dir(&volumes)
        .unwrap_or_else(|e| panic!("reading {}: {e}", volumes.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Lists the volumes and checks that no ID is listed twice.
async fn listed_set(client: &mut ControllerClient<Channel>, context: &str) -> BTreeSet<String> {
    let listed = list_all(client).await;
    let set: BTreeSet<String> = listed.iter().cloned().collect();
    if set.len() != listed.len() {
        let mut seen = BTreeSet::new();
        let dups: Vec<&String> = listed.iter().filter(|id| !seen.insert(*id)).collect();
        panic!("{context}: ListVolumes lists volumes twice: {dups:?}");
    }
    set
}

/// The checks right after a restart, before any retry.
fn check_after_crash(
    context: &str,
    names: &Names,
    listed: &BTreeSet<String>,
    on_disk: &BTreeSet<String>,
    stats: &mut Stats,
) {
    let by_id: BTreeMap<String, &String> = names.keys().map(|n| (id_for(n), n)).collect();
    for id in listed {
        assert!(
            by_id.contains_key(id),
            "{context}: listed volume {id} belongs to no name we ever created"
        );
    }
    for (name, state) in names {
        let id = id_for(name);
        let is_listed = listed.contains(&id);
        let has_dir = on_disk.contains(&id);
        let what = format!("{context}: {name} ({id}) last acked {state:?}");
        match (state.in_flight, &state.acked) {
            (None, Some(Acked::Created(_))) => {
                assert!(is_listed, "{what}: acknowledged create is not listed");
                assert!(has_dir, "{what}: acknowledged create has no directory");
            }
            (None, Some(Acked::Deleted)) => {
                assert!(!is_listed, "{what}: acknowledged delete is still listed");
                assert!(!has_dir, "{what}: acknowledged delete left its directory");
            }
            (None, None) => panic!("{what}: name without any call"),
            (Some(Op::Create), acked) => {
                if matches!(acked, Some(Acked::Created(_))) {
                    assert!(is_listed, "{what}: a repeated create lost the volume");
                }
                if is_listed {
                    assert!(
                        has_dir,
                        "{what}: recorded by an interrupted create without a directory"
                    );
                    stats.in_flight_creates_landed += 1;
                } else if has_dir {
                    stats.orphans_before_retry += 1;
                }
            }
            (Some(Op::Delete), _) => {
                if !is_listed {
                    assert!(
                        !has_dir,
                        "{what}: interrupted delete removed the record, not the directory"
                    );
                    stats.in_flight_deletes_landed += 1;
                } else if !has_dir {
                    stats.half_deleted_before_retry += 1;
                }
            }
        }
    }
    for id in on_disk {
        let explained = listed.contains(id)
            || by_id
                .get(id)
                .is_some_and(|n| names[*n].in_flight == Some(Op::Create));
        assert!(
            explained,
            "{context}: directory {id} has no record and no interrupted create explains it"
        );
    }
}

/// Retries every interrupted call; each must succeed and agree with earlier answers.
async fn retry_in_flight(
    context: &str,
    client: &mut ControllerClient<Channel>,
    names: &mut Names,
    stats: &mut Stats,
) {
    for (name, state) in names.iter_mut() {
        let id = id_for(name);
        match state.in_flight.take() {
            None => {}
            Some(Op::Create) => {
                let volume = client
                    .create_volume(create_request(name, VOLUME_BYTES))
                    .await
                    .unwrap_or_else(|e| panic!("{context}: retried create of {name}: {e:?}"))
                    .into_inner()
                    .volume
                    .expect("CreateVolume answered without a volume");
                assert_eq!(volume.volume_id, id, "{context}: retried create of {name}");
                if let Some(Acked::Created(before)) = &state.acked {
                    assert_eq!(
                        &volume.volume_id, before,
                        "{context}: retried create of {name}"
                    );
                }
                state.acked = Some(Acked::Created(volume.volume_id));
                stats.retried_creates += 1;
            }
            Some(Op::Delete) => {
                client
                    .delete_volume(DeleteVolumeRequest {
                        volume_id: id.clone(),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("{context}: retried delete of {name}: {e:?}"));
                state.acked = Some(Acked::Deleted);
                stats.retried_deletes += 1;
            }
        }
    }
}

/// After the retries: the listed volumes are exactly the live names, once each, and the
/// directories on disk are exactly the listed volumes.
fn check_converged(
    context: &str,
    names: &Names,
    listed: &BTreeSet<String>,
    on_disk: &BTreeSet<String>,
) {
    let expected: BTreeSet<String> = names
        .iter()
        .filter_map(|(name, state)| match &state.acked {
            Some(Acked::Created(id)) => {
                assert_eq!(*id, id_for(name));
                Some(id.clone())
            }
            _ => None,
        })
        .collect();
    let missing: Vec<&String> = expected.difference(listed).collect();
    let extra: Vec<&String> = listed.difference(&expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: after retries, volumes missing from ListVolumes: {missing:?}; listed but \
         deleted or never created: {extra:?}"
    );
    let orphans: Vec<&String> = on_disk.difference(listed).collect();
    let no_dir: Vec<&String> = listed.difference(on_disk).collect();
    assert!(
        orphans.is_empty() && no_dir.is_empty(),
        "{context}: after retries, directories without a volume: {orphans:?}; volumes without \
         a directory: {no_dir:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_concurrent_create_delete_loses_nothing() {
    let seed = env_u64("K8SCSI_CRASH_SEED").unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        // One mixing step so that runs started close together get unrelated-looking seeds.
        Rng(nanos ^ (u64::from(std::process::id()) << 32)).next()
    });
    let rounds = env_u64("K8SCSI_CRASH_ROUNDS").unwrap_or(DEFAULT_ROUNDS);
    let workers = env_u64("K8SCSI_CRASH_WORKERS").map_or(DEFAULT_WORKERS, |w| w as usize);
    assert!(workers > 0);
    eprintln!(
        "crash test: seed {seed:#x} (replay with K8SCSI_CRASH_SEED={seed:#x}), {rounds} rounds, \
         {workers} workers"
    );
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut driver = tokio::task::block_in_place(Driver::start);
    let mut owned: Vec<Names> = vec![Names::new(); workers];
    let mut stats = Stats::default();

    for round in 0..rounds {
        let killed = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (index, names) in owned.iter_mut().enumerate() {
            let client = driver.controller().await;
            tasks.push(tokio::spawn(worker(
                client,
                std::mem::take(names),
                Rng(rng.next()),
                round,
                index,
                killed.clone(),
            )));
        }
        let delay = Duration::from_micros(1_000 + rng.below(59_000));
        tokio::time::sleep(delay).await;
        killed.store(true, Ordering::SeqCst);
        tokio::task::block_in_place(|| driver.kill());

        let mut round_creates = 0;
        let mut round_deletes = 0;
        for (index, task) in tasks.into_iter().enumerate() {
            let result = tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .unwrap_or_else(|_| panic!("round {round}: worker {index} hangs after the kill"))
                .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
            round_creates += result.acked_creates;
            round_deletes += result.acked_deletes;
            if let Some(code) = result.error_code {
                *stats.error_codes.entry(code).or_default() += 1;
            }
            owned[index] = result.names;
        }
        stats.acked_creates += round_creates;
        stats.acked_deletes += round_deletes;

        tokio::task::block_in_place(|| driver.restart());
        let context = format!("seed {seed:#x} round {round} (kill after {delay:?})");
        let mut client = driver.controller().await;
        let mut all: Names = owned
            .iter()
            .flatten()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        let in_flight = all.values().filter(|s| s.in_flight.is_some()).count();

        let listed = listed_set(&mut client, &context).await;
        check_after_crash(&context, &all, &listed, &dirs_on_disk(&driver), &mut stats);

        retry_in_flight(&context, &mut client, &mut all, &mut stats).await;
        let listed = listed_set(&mut client, &context).await;
        check_converged(&context, &all, &listed, &dirs_on_disk(&driver));

        for names in &mut owned {
            for (name, state) in names.iter_mut() {
                *state = all[name].clone();
            }
        }
        eprintln!(
            "round {round}: kill after {delay:?}, acked {round_creates} creates and \
             {round_deletes} deletes, {in_flight} in flight retried, {} volumes live",
            listed.len()
        );
    }

    let live = owned
        .iter()
        .flatten()
        .filter(|(_, s)| matches!(s.acked, Some(Acked::Created(_))))
        .count();
    eprintln!(
        "crash test summary: seed {seed:#x}, {rounds} rounds in {:.1?}: {} acked creates, {} acked \
         deletes, {} in-flight creates and {} in-flight deletes retried ({} creates and {} deletes \
         had landed before the crash; {} orphan directories and {} half-deleted volumes seen \
         before retry), {live} volumes live at the end; unanswered calls failed with {:?}",
        started.elapsed(),
        stats.acked_creates,
        stats.acked_deletes,
        stats.retried_creates,
        stats.retried_deletes,
        stats.in_flight_creates_landed,
        stats.in_flight_deletes_landed,
        stats.orphans_before_retry,
        stats.half_deleted_before_retry,
        stats.error_codes,
    );
    assert!(
        stats.acked_creates > 0,
        "no create was ever acknowledged: the kill points are too early to test anything"
    );
}

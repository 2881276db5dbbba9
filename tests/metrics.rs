//! `/metrics` and `/healthz` of the real binary, scraped over real HTTP and parsed with a strict
//! OpenMetrics parser: per-volume numbers against what was written through a real bind mount,
//! call histograms moving with calls, readiness following a read-only data filesystem, the
//! endpoint's defences, reconcile findings, and the scrape time of a 10,000-volume store.

mod common;
#[path = "common/openmetrics.rs"]
mod openmetrics;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Driver, create_request, publish_request};
use k8scsi::csi::proto;
use openmetrics::Exposition;

/// Starts a driver serving metrics on a free port, sampling usage every 200 ms.
fn start() -> (Driver, String) {
    start_with(&[])
}

fn start_with(extra: &[&str]) -> (Driver, String) {
    let mut args = vec![
        "--metrics-address",
        "127.0.0.1:0",
        "--usage-interval",
        "200ms",
    ];
    args.extend_from_slice(extra);
    let driver = Driver::start_with(&args);
    let address = metrics_address(&driver);
    (driver, address)
}

/// The bound metrics address, from the server's log line.
fn metrics_address(driver: &Driver) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = driver.log();
        if let Some(line) = log
            .lines()
            .rev()
            .find(|l| l.contains("serving /metrics and /healthz"))
        {
            let at = line.find("address=").expect("address field") + "address=".len();
            return line[at..].split_whitespace().next().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics address in log: {log}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A minimal HTTP/1.1 exchange: status, headers (lower-case names) and body.
struct HttpResponse {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

fn http(address: &str, request: &str) -> HttpResponse {
    let mut stream = TcpStream::connect(address).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("response head");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_string()))
        .collect::<BTreeMap<_, _>>();
    if let Some(length) = headers.get("content-length") {
        assert_eq!(
            length.parse::<usize>().unwrap(),
            body.len(),
            "content-length"
        );
    }
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

fn get(address: &str, path: &str) -> HttpResponse {
    http(
        address,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

/// Scrapes and parses `/metrics`.
fn scrape(address: &str) -> Exposition {
    let response = get(address, "/metrics");
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(
        response.headers["content-type"].starts_with("application/openmetrics-text"),
        "{:?}",
        response.headers
    );
    openmetrics::parse(&response.body).unwrap_or_else(|e| panic!("{e}\n{}", response.body))
}

/// Scrapes until `done` holds (the sampler runs every 200 ms), or panics after 20 s.
fn scrape_until(address: &str, what: &str, done: impl Fn(&Exposition) -> bool) -> Exposition {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = scrape(address);
        if done(&metrics) {
            return metrics;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes and inodes under `root` counted the way `du` does (st_blocks, hard links once), the
/// independent measurement the exported numbers must equal.
fn du(root: &Path) -> (u64, u64) {
    let meta = std::fs::symlink_metadata(root).unwrap();
    let (mut bytes, mut inodes) = (meta.blocks() * 512, 1);
    if meta.is_dir() {
        for entry in std::fs::read_dir(root).unwrap() {
            let (b, i) = du(&entry.unwrap().path());
            bytes += b;
            inodes += i;
        }
    }
    (bytes, inodes)
}

fn count(metrics: &Exposition, method: &str, code: &str) -> f64 {
    metrics
        .value(
            "k8scsi_csi_operation_duration_seconds_count",
            &[("method", method), ("code", code)],
        )
        .unwrap_or(0.0)
}

#[tokio::test]
async fn volume_usage_matches_what_was_written_through_the_mount() {
    require_root!();
    let (driver, address) = start();
    let mut request = create_request("pvc-metrics", 1 << 30);
    request.parameters.extend(
        [
            ("csi.storage.k8s.io/pv/name", "pv-metrics"),
            ("csi.storage.k8s.io/pvc/name", "data-web-0"),
            ("csi.storage.k8s.io/pvc/namespace", "shop"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let volume = driver
        .controller()
        .await
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = volume.volume_id;
    let other = driver
        .controller()
        .await
        .create_volume(create_request("pvc-plain", 5 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let target = driver.target("pod-metrics");
    driver
        .node()
        .await
        .node_publish_volume(publish_request(&id, &target, false))
        .await
        .unwrap();
    // 3 MiB and 20 small files, written by "the pod" through the bind mount.
    let target = Path::new(&target);
    let mut file = std::fs::File::create(target.join("big")).unwrap();
    file.write_all(&vec![0xa5u8; 3 << 20]).unwrap();
    file.sync_all().unwrap();
    std::fs::create_dir(target.join("small")).unwrap();
    for i in 0..20 {
        std::fs::write(target.join(format!("small/{i}")), format!("file {i}\n")).unwrap();
    }
    let storage = driver.data_dir().join("volumes").join(&id);
    let (bytes, inodes) = du(&storage);
    assert!(bytes >= 3 << 20 && inodes == 23, "{bytes} {inodes}");

    let labels = [
        ("volume_id", id.as_str()),
        ("persistentvolume", "pv-metrics"),
        ("persistentvolumeclaim", "data-web-0"),
        ("namespace", "shop"),
    ];
    let metrics = scrape_until(&address, "the written bytes to be sampled", |m| {
        m.value("k8scsi_volume_used_bytes", &labels) == Some(bytes as f64)
    });
    assert_eq!(
        metrics.value("k8scsi_volume_used_inodes", &labels),
        Some(inodes as f64)
    );
    assert_eq!(
        metrics.value("k8scsi_volume_capacity_bytes", &labels),
        Some((1u64 << 30) as f64)
    );
    // The volume without provisioner metadata has only its ID as label.
    let plain = metrics.find("k8scsi_volume_capacity_bytes", &[("volume_id", &other)]);
    assert_eq!(plain.len(), 1);
    assert_eq!(plain[0].value, (5u64 << 20) as f64);
    assert_eq!(plain[0].labels.len(), 1, "{:?}", plain[0].labels);
    assert_eq!(
        metrics.value("k8scsi_volume_used_bytes", &[("volume_id", &other)]),
        Some(du(&driver.data_dir().join("volumes").join(&other)).0 as f64)
    );
    assert_eq!(metrics.value("k8scsi_volumes", &[]), Some(2.0));
    assert_eq!(metrics.value("k8scsi_publications", &[]), Some(1.0));
    assert_eq!(metrics.value("k8scsi_usage_sample_errors", &[]), Some(0.0));
    assert_eq!(metrics.value("k8scsi_trash_entries", &[]), Some(0.0));
    assert_eq!(metrics.value("k8scsi_trash_stuck_entries", &[]), Some(0.0));
    assert_eq!(
        metrics.value("k8scsi_build_info", &[("backends", "dir,loop,shared")]),
        Some(1.0)
    );
    assert_eq!(
        metrics
            .family("k8scsi_volume_used_bytes")
            .unwrap()
            .unit
            .as_deref(),
        Some("bytes")
    );

    // Deleting a file shows up in the next samples; the exported number follows the disk.
    std::fs::remove_file(target.join("big")).unwrap();
    let (bytes, _) = du(&storage);
    scrape_until(&address, "the deletion to be sampled", |m| {
        m.value("k8scsi_volume_used_bytes", &labels) == Some(bytes as f64)
    });
}

#[tokio::test]
async fn call_histograms_move_with_calls() {
    let (driver, address) = start();
    let before = scrape(&address);
    let mut controller = driver.controller().await;
    for i in 0..3 {
        controller
            .create_volume(create_request(&format!("pvc-h{i}"), 1 << 20))
            .await
            .unwrap();
    }
    let refused = controller
        .create_volume(create_request("", 1 << 20))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    let ready = driver
        .identity()
        .await
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert_eq!(ready, Some(true));
    let after = scrape(&address);

    assert_eq!(
        count(&after, "CreateVolume", "OK") - count(&before, "CreateVolume", "OK"),
        3.0
    );
    assert_eq!(
        count(&after, "CreateVolume", "InvalidArgument")
            - count(&before, "CreateVolume", "InvalidArgument"),
        1.0
    );
    assert!(count(&after, "Probe", "OK") >= 1.0);
    // The counter agrees with the histogram, the sum grew, and every observation is in a bucket.
    let labels = [("method", "CreateVolume"), ("code", "OK")];
    assert_eq!(
        after.value("k8scsi_csi_operations_total", &labels),
        Some(count(&after, "CreateVolume", "OK"))
    );
    let sum = |m: &Exposition| {
        m.value("k8scsi_csi_operation_duration_seconds_sum", &labels)
            .unwrap_or(0.0)
    };
    assert!(sum(&after) > sum(&before));
    let inf = after
        .value(
            "k8scsi_csi_operation_duration_seconds_bucket",
            &[("method", "CreateVolume"), ("code", "OK"), ("le", "+Inf")],
        )
        .unwrap();
    assert_eq!(inf, count(&after, "CreateVolume", "OK"));
    // Each CreateVolume committed to the store.
    let commits = |m: &Exposition| m.value("k8scsi_store_commits_total", &[]).unwrap();
    assert!(commits(&after) >= commits(&before) + 1.0);
    assert!(
        after
            .value("k8scsi_store_commit_duration_seconds_total", &[])
            .unwrap()
            > 0.0
    );
}

#[tokio::test]
async fn healthz_and_probe_follow_a_read_only_data_filesystem() {
    let (driver, address) = start();
    let ok = get(&address, "/healthz");
    assert_eq!((ok.status, ok.body.as_str()), (200, "ok\n"));
    scrape_until(&address, "readiness", |m| {
        m.value("k8scsi_ready", &[]) == Some(1.0)
            && m.value("k8scsi_backend_up", &[("backend", "dir")]) == Some(1.0)
    });
    require_root!();

    // Remount the data directory read-only, as ext4's errors=remount-ro would.
    let data = driver.data_dir();
    let data_str = data.to_str().unwrap();
    let run = |args: &[&str]| {
        let status = std::process::Command::new("mount")
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "mount {args:?}");
    };
    run(&["--bind", data_str, data_str]);
    run(&["-o", "remount,bind,ro", data_str]);
    let sick = get(&address, "/healthz");
    assert_eq!(sick.status, 503, "{}", sick.body);
    assert!(sick.body.contains("read-only"), "{}", sick.body);
    let ready = driver
        .identity()
        .await
        .probe(proto::ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert_eq!(
        ready,
        Some(false),
        "Probe must report what /healthz reports"
    );
    scrape_until(&address, "not ready", |m| {
        m.value("k8scsi_ready", &[]) == Some(0.0)
            && m.value("k8scsi_backend_up", &[("backend", "dir")]) == Some(0.0)
    });

    rustix::mount::unmount(&data, rustix::mount::UnmountFlags::empty()).unwrap();
    assert_eq!(get(&address, "/healthz").status, 200);
    scrape_until(&address, "ready again", |m| {
        m.value("k8scsi_ready", &[]) == Some(1.0)
    });
}

#[test]
fn http_endpoint_refuses_what_it_does_not_serve() {
    let (_driver, address) = start();
    let missing = get(&address, "/");
    assert_eq!(missing.status, 404);
    let post = http(
        &address,
        "POST /metrics HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(post.status, 405);
    assert_eq!(post.headers["allow"], "GET, HEAD");
    let head = http(
        &address,
        "HEAD /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(head.status, 200);

    // An oversized request head is refused, not buffered.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: t\r\nX-Junk: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut stream = TcpStream::connect(&address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(huge.as_bytes());
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply}"
    );

    // A client that never finishes its request head is dropped (header timeout: 5 s).
    let started = Instant::now();
    let mut silent = TcpStream::connect(&address).unwrap();
    silent.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = Vec::new();
    let _ = silent.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(20),
        "closed after {waited:?}"
    );
    // And the endpoint still answers.
    assert_eq!(get(&address, "/healthz").status, 200);
}

#[tokio::test]
async fn reconcile_findings_are_exported() {
    let (mut driver, _) = start();
    // Plant storage no record explains, then restart: the start-up reconciliation finds it.
    let orphan = k8scsi::engine::ids::VolumeId::for_name("dir", "nobody-made-me");
    std::fs::create_dir(driver.data_dir().join("volumes").join(orphan.as_str())).unwrap();
    driver.restart();
    let address = metrics_address(&driver);
    let metrics = scrape(&address);
    let finding = |kind| metrics.value("k8scsi_reconcile_findings", &[("kind", kind)]);
    assert_eq!(finding("orphaned_storage"), Some(1.0));
    assert_eq!(finding("missing_storage"), Some(0.0));
    assert_eq!(finding("leftover_mounts"), Some(0.0));
    assert!(
        metrics
            .value("k8scsi_reconcile_timestamp_seconds", &[])
            .unwrap()
            > 0.0
    );
}

/// Seeds `n` volume records and their directories straight into a store (much faster than
/// CreateVolume), then waits until the store file is closed so a server can open it.
async fn seed_store(driver_dir: &Path, n: usize) {
    use k8scsi::store::{Mutation, Store, VolumeRecord};
    let state = driver_dir.join("state");
    let volumes = driver_dir.join("data/volumes");
    std::fs::create_dir_all(&volumes).unwrap();
    {
        let store = Store::open(&state).unwrap();
        let mut mutations = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("pvc-{i:05}");
            let id = k8scsi::engine::ids::VolumeId::for_name("dir", &name);
            std::fs::create_dir(volumes.join(id.as_str())).unwrap();
            // Built from JSON so fields added to the record later take their defaults.
            let record: VolumeRecord = serde_json::from_value(serde_json::json!({
                "id": id.to_string(),
                "name": name,
                "backend": "dir",
                "capacity_bytes": 1u64 << 30,
                "access_modes": ["SINGLE_NODE_WRITER"],
                "accessible_node": "node-1",
                "created_unix": 1_795_000_000u64,
                "metadata": {
                    "csi.storage.k8s.io/pvc/name": name,
                    "csi.storage.k8s.io/pvc/namespace": format!("team-{}", i % 50),
                    "csi.storage.k8s.io/pv/name": format!("pv-{i:05}"),
                },
            }))
            .unwrap();
            mutations.push(Mutation::PutVolume(record));
        }
        for chunk in mutations.chunks(1000) {
            store.commit(chunk.to_vec(), vec![]).await.unwrap();
        }
    }
    // The store's writer thread drops its handle when it notices; an open of our own that
    // succeeds (and is dropped at once) proves the file is free.
    let file = state.join(k8scsi::store::STORE_FILE);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = redb::Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::SingleWriter)
            .open(&file);
        if open.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "store still held: {open:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The scrape of a 10,000-volume store stays bounded: it reads the last sample from memory and
/// never walks a volume. `cargo test --release --test metrics scrape_of_10000 -- --nocapture`
/// prints the numbers recorded in BENCHMARKS.md.
#[tokio::test]
async fn scrape_of_10000_volumes_is_bounded() {
    const VOLUMES: usize = 10_000;
    // Start a driver for its directories and command line, then seed its store offline.
    let mut driver =
        Driver::start_with(&["--metrics-address", "127.0.0.1:0", "--usage-interval", "2s"]);
    driver.kill();
    std::fs::remove_dir_all(driver.state_dir()).unwrap();
    std::fs::remove_dir_all(driver.data_dir()).unwrap();
    let seeding = Instant::now();
    seed_store(driver.dir.path(), VOLUMES).await;
    let seeded = seeding.elapsed();
    driver.restart();
    let address = metrics_address(&driver);

    let first = scrape_until(&address, "the first full usage sample", |m| {
        m.find("k8scsi_volume_used_bytes", &[]).len() == VOLUMES
    });
    let sample_seconds = first
        .value("k8scsi_usage_sample_duration_seconds", &[])
        .unwrap();
    assert_eq!(first.value("k8scsi_volumes", &[]), Some(VOLUMES as f64));
    assert_eq!(
        first
            .find("k8scsi_volume_capacity_bytes", &[("namespace", "team-7")])
            .len(),
        VOLUMES / 50
    );

    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..5 {
        let started = Instant::now();
        let response = get(&address, "/metrics");
        times.push(started.elapsed());
        assert_eq!(response.status, 200);
        bytes = response.body.len();
    }
    let parsed = openmetrics::parse(&get(&address, "/metrics").body).unwrap();
    assert_eq!(parsed.find("k8scsi_volume_used_inodes", &[]).len(), VOLUMES);
    times.sort();
    let median = times[times.len() / 2];
    println!(
        "10000 volumes: seeded in {seeded:.2?}; usage sample (walk) {sample_seconds:.3}s; \
         scrape {} KiB, median {median:.2?}, max {:.2?}",
        bytes / 1024,
        times.last().unwrap()
    );
    // Generous for a debug build on a loaded 2-core CI machine; release is ~10x faster.
    assert!(
        median < Duration::from_secs(3),
        "scraping 10,000 volumes took {median:?}"
    );
}

/// Every metric the Grafana dashboard queries is one the server exports.
#[tokio::test]
async fn dashboard_queries_only_exported_metrics() {
    let (driver, address) = start();
    driver
        .controller()
        .await
        .create_volume(create_request("pvc-dash", 1 << 20))
        .await
        .unwrap();
    let metrics = scrape_until(&address, "a usage sample", |m| {
        m.value("k8scsi_volumes", &[]) == Some(1.0)
    });
    let exported: std::collections::BTreeSet<&str> = metrics
        .families
        .values()
        .flat_map(|f| f.samples.iter().map(|s| s.name.as_str()))
        .collect();
    let dashboard = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/k8scsi-dashboard.json"),
    )
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert_eq!(json["title"], "k8scsi");
    let mut used = std::collections::BTreeSet::new();
    for (at, _) in dashboard.match_indices("k8scsi_") {
        let name: String = dashboard[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name != "k8scsi_" {
            used.insert(name);
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
}

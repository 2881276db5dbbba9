//! The operator CLI (`k8scsi volumes|snapshots|usage|doctor`) against real stores: with the
//! server running (answered over its admin socket), stopped cleanly (read from the file) and
//! killed (read from a repaired copy, the original untouched), and `doctor` on this machine.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{BINARY, Driver, create_request, is_root, mount_image, publish_request};

/// The result of one CLI run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `k8scsi ARGS --state-dir .. --data-dir .. --kubelet-dir ..` for this driver.
fn cli(driver: &Driver, args: &[&str]) -> Run {
    let output = driver.ops_command(args).output().expect("run k8scsi");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn ok(driver: &Driver, args: &[&str]) -> Run {
    let run = cli(driver, args);
    assert_eq!(
        run.code, 0,
        "k8scsi {args:?}: {}\n{}",
        run.stdout, run.stderr
    );
    run
}

/// Bytes under `root` as `du` counts them (st_blocks; what the CLI must report).
fn du_bytes(root: &Path) -> u64 {
    let meta = std::fs::symlink_metadata(root).unwrap();
    let mut bytes = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in std::fs::read_dir(root).unwrap() {
            bytes += du_bytes(&entry.unwrap().path());
        }
    }
    bytes
}

async fn create(driver: &Driver, name: &str, bytes: i64, pvc: Option<(&str, &str)>) -> String {
    let mut request = create_request(name, bytes);
    if let Some((namespace, claim)) = pvc {
        request.parameters.extend([
            (
                "csi.storage.k8s.io/pvc/namespace".to_string(),
                namespace.to_string(),
            ),
            ("csi.storage.k8s.io/pvc/name".to_string(), claim.to_string()),
            (
                "csi.storage.k8s.io/pv/name".to_string(),
                format!("pv-{name}"),
            ),
        ]);
    }
    driver
        .controller()
        .await
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

#[tokio::test]
async fn volumes_and_usage_read_the_store_while_the_server_runs() {
    let driver = Driver::start();
    let big = create(&driver, "pvc-big", 1 << 30, Some(("shop", "data-web-0"))).await;
    let small = create(&driver, "pvc-small", 10 << 20, None).await;
    let storage = driver.data_dir().join("volumes").join(&big);
    if is_root() {
        let target = driver.target("pod-cli");
        driver
            .node()
            .await
            .node_publish_volume(publish_request(&big, &target, false))
            .await
            .unwrap();
        std::fs::write(Path::new(&target).join("data"), vec![1u8; 2 << 20]).unwrap();
    } else {
        std::fs::write(storage.join("data"), vec![1u8; 2 << 20]).unwrap();
    }

    let list = ok(&driver, &["volumes", "list"]);
    assert!(list.stderr.is_empty(), "{}", list.stderr);
    let lines: Vec<&str> = list.stdout.lines().collect();
    assert!(lines[0].starts_with("VOLUME ID"), "{}", list.stdout);
    let big_line = lines.iter().find(|l| l.starts_with(&big)).unwrap();
    assert!(big_line.contains("pvc-big"), "{big_line}");
    assert!(big_line.contains("1.0Gi"), "{big_line}");
    assert!(big_line.contains("shop/data-web-0"), "{big_line}");
    let published = if is_root() { 1 } else { 0 };
    assert!(
        list.stdout
            .ends_with(&format!("2 volumes, {published} published\n")),
        "{}",
        list.stdout
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&driver, &["volumes", "list", "-o", "json"]).stdout).unwrap();
    let entries = json.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["id"], big.as_str());
    assert_eq!(
        entries[0]["publications"].as_array().unwrap().len(),
        published
    );
    assert_eq!(entries[1]["capacity_bytes"], 10 << 20);

    // `show` by name: the record, the storage, its usage and its publication.
    let show = ok(&driver, &["volumes", "show", "pvc-big"]);
    assert!(
        show.stdout.contains(&format!("ID:          {big}")),
        "{}",
        show.stdout
    );
    assert!(show.stdout.contains("PVC:         shop/data-web-0"));
    assert!(show.stdout.contains("(present)"), "{}", show.stdout);
    let used = du_bytes(&storage);
    assert!(
        show.stdout.contains(&format!("({used} bytes), 2 inodes")),
        "{}",
        show.stdout
    );
    if is_root() {
        assert!(
            show.stdout
                .contains("pod-cli/mount (rw, SINGLE_NODE_WRITER) mounted"),
            "{}",
            show.stdout
        );
    }
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&driver, &["volumes", "show", &small, "-o", "json"]).stdout)
            .unwrap();
    assert_eq!(shown["name"], "pvc-small");
    assert_eq!(shown["storage_present"], true);

    // `usage`: largest first, with the numbers du gives.
    let usage = ok(&driver, &["usage"]);
    let rows: Vec<&str> = usage.stdout.lines().collect();
    assert!(rows[0].starts_with("VOLUME ID"), "{}", usage.stdout);
    assert!(rows[1].starts_with(&big), "{}", usage.stdout);
    assert!(rows[2].starts_with(&small), "{}", usage.stdout);
    assert!(rows[3].starts_with("2 volumes: "), "{}", usage.stdout);
    let usage_json: serde_json::Value =
        serde_json::from_str(&ok(&driver, &["usage", "-o", "json", "--sort", "name"]).stdout)
            .unwrap();
    assert_eq!(usage_json[0]["name"], "pvc-big");
    assert_eq!(usage_json[0]["used_bytes"], used);
    assert_eq!(
        usage_json[1]["used_bytes"],
        du_bytes(&driver.data_dir().join("volumes").join(&small))
    );

    // The server was never disturbed: it still provisions, and the CLI sees the new volume.
    create(&driver, "pvc-after", 1 << 20, None).await;
    assert!(
        ok(&driver, &["volumes", "list"])
            .stdout
            .ends_with(&format!("3 volumes, {published} published\n"))
    );
}

fn store_bytes(driver: &Driver) -> Vec<u8> {
    std::fs::read(driver.state_dir().join(k8scsi::store::STORE_FILE)).unwrap()
}

#[tokio::test]
async fn volumes_are_read_from_the_file_when_the_server_is_stopped_or_killed() {
    let mut driver = Driver::start();
    let first = create(&driver, "pvc-one", 1 << 20, None).await;
    assert!(driver.stop().success());
    // (Today the server exits without closing its database, so even this read may go through
    // a repaired copy; either way the listing is complete.)
    let list = ok(&driver, &["volumes", "list"]);
    assert!(list.stdout.contains(&first), "{}", list.stdout);

    // After a crash the file needs the repair a server does at start; the CLI repairs a copy
    // and leaves the file exactly as the crash left it.
    driver.restart();
    let second = create(&driver, "pvc-two", 1 << 20, None).await;
    driver.kill();
    let before = store_bytes(&driver);
    let list = ok(&driver, &["volumes", "list"]);
    assert!(list.stdout.contains(&first) && list.stdout.contains(&second));
    assert!(
        list.stderr.contains("not closed cleanly"),
        "expected the repaired-copy note: {}",
        list.stderr
    );
    assert!(
        store_bytes(&driver) == before,
        "the CLI changed the store file"
    );

    // And the server still starts on it and repairs it itself.
    driver.restart();
    create(&driver, "pvc-three", 1 << 20, None).await;
    assert!(
        ok(&driver, &["volumes", "list"])
            .stdout
            .ends_with("3 volumes, 0 published\n")
    );
}

#[test]
fn snapshots_list_and_errors() {
    let driver = Driver::start();
    let none = ok(&driver, &["snapshots", "list"]);
    assert!(none.stdout.starts_with("0 snapshots"), "{}", none.stdout);
    assert_eq!(
        ok(&driver, &["snapshots", "list", "-o", "json"])
            .stdout
            .trim(),
        "{}"
    );

    let unknown = cli(&driver, &["volumes", "show", "pvc-nope"]);
    assert_eq!(unknown.code, 1);
    assert!(
        unknown
            .stderr
            .contains("no volume with ID or name \"pvc-nope\""),
        "{}",
        unknown.stderr
    );
    let empty = tempfile::tempdir().unwrap();
    let missing = Command::new(BINARY)
        .args(["volumes", "list", "--state-dir"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no state store here"));
}

/// Runs doctor for this driver (its socket as the endpoint).
fn doctor(driver: &Driver, extra: &[&str]) -> Run {
    let endpoint = format!("unix://{}", driver.socket().display());
    let mut args = vec!["doctor", "--endpoint", endpoint.as_str()];
    args.extend_from_slice(extra);
    cli(driver, &args)
}

/// Doctor's lines for `check` (`WARN  crash safety ...`).
fn check_lines<'a>(run: &'a Run, check: &str) -> Vec<&'a str> {
    run.stdout
        .lines()
        .filter(|l| l.get(6..).is_some_and(|rest| rest.starts_with(check)))
        .collect()
}

/// The verdict word of doctor's line for `check`.
fn verdict<'a>(run: &'a Run, check: &str) -> Vec<&'a str> {
    check_lines(run, check)
        .into_iter()
        .map(|l| &l[..4])
        .collect()
}

/// An independent probe with the standard tools: can ext4 be mounted with project quotas here?
fn ext4_project_quota_mounts() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("q.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sh = format!(
        "mkfs.ext4 -q -F -O quota,project {img} && dev=$(losetup --find --show {img}) && \
         mkdir -p {d}/m && (mount -o prjquota $dev {d}/m && umount {d}/m; r=$?; \
         losetup -d $dev; exit $r)",
        img = image.display(),
        d = dir.path().display()
    );
    Command::new("sh")
        .arg("-c")
        .arg(sh)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[tokio::test]
async fn doctor_reports_this_node() {
    let driver = Driver::start();
    create(&driver, "pvc-doc", 1 << 20, None).await;
    let run = doctor(&driver, &[]);
    println!("{}", run.stdout);
    let summary = run.stdout.lines().last().unwrap();
    assert!(summary.starts_with("summary: "), "{}", run.stdout);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    for check in [
        "kernel",
        "state store",
        "data directory",
        "kubelet directory",
        "server",
        "orphans",
        "leftover mounts",
    ] {
        assert_eq!(verdict(&run, check), ["PASS"], "{check}: {}", run.stdout);
    }
    assert!(run.stdout.contains("1 volume, 0 publications"));
    assert!(run.stdout.contains("admin socket"), "{}", run.stdout);
    assert!(run.stdout.contains("answers at unix://"), "{}", run.stdout);
    assert_eq!(verdict(&run, "mount propagation").len(), 1);
    // This machine's temporary directory may or may not be crash-safe; it is reported either way.
    let crash_safety = verdict(&run, "crash safety");
    assert!(
        crash_safety == ["PASS"] || crash_safety == ["WARN"],
        "{}",
        run.stdout
    );
    // Present or not, the NFS client is reported; requiring it fails only where it is missing.
    let nfs = verdict(&run, "nfs client");
    assert!(nfs == ["PASS"] || nfs == ["WARN"], "{}", run.stdout);
    let strict_nfs = doctor(&driver, &["--no-probes", "--require", "nfs"]);
    assert_eq!(
        verdict(&strict_nfs, "nfs client"),
        [if nfs == ["PASS"] { "PASS" } else { "FAIL" }]
    );
    assert_eq!(strict_nfs.code, if nfs == ["PASS"] { 0 } else { 1 });
    if !is_root() {
        eprintln!("SKIPPED: the filesystem probes need root");
        return;
    }
    // Whatever this machine supports, doctor must say what the standard tools find.
    let expected = if ext4_project_quota_mounts() {
        "PASS"
    } else {
        "WARN"
    };
    assert_eq!(
        verdict(&run, "ext4 project quota"),
        [expected],
        "{}",
        run.stdout
    );
    for check in ["loop devices", "btrfs", "xfs reflink", "xfs project quota"] {
        assert_eq!(verdict(&run, check).len(), 1, "{check}: {}", run.stdout);
    }
    // Requiring a capability turns its absence into a failure and the exit code into 1.
    let strict = doctor(&driver, &["--require", "project-quota"]);
    let quotas_everywhere = verdict(&strict, "ext4 project quota") == ["PASS"]
        && verdict(&strict, "xfs project quota") == ["PASS"];
    assert_eq!(
        strict.code,
        if quotas_everywhere { 0 } else { 1 },
        "{}",
        strict.stdout
    );
}

#[tokio::test]
async fn doctor_finds_orphans_leftover_mounts_and_bad_directories() {
    let driver = Driver::start();
    let id = create(&driver, "pvc-leftover", 1 << 20, None).await;
    let orphan = k8scsi::engine::ids::VolumeId::for_name("dir", "nobody-recorded-me");
    std::fs::create_dir(driver.data_dir().join("volumes").join(orphan.as_str())).unwrap();
    let mounted = is_root() && {
        // A bind mount of a volume that no publication record explains.
        let target = driver.target("pod-stray");
        std::fs::create_dir_all(&target).unwrap();
        Command::new("mount")
            .arg("--bind")
            .arg(driver.data_dir().join("volumes").join(&id))
            .arg(&target)
            .status()
            .unwrap()
            .success()
    };
    let run = doctor(&driver, &["--no-probes"]);
    assert_eq!(run.code, 0, "{}", run.stdout);
    let orphans = run
        .stdout
        .lines()
        .find(|l| l.starts_with("WARN  orphans"))
        .unwrap_or_else(|| panic!("{}", run.stdout));
    assert!(orphans.contains(orphan.as_str()), "{orphans}");
    if mounted {
        let leftover = run
            .stdout
            .lines()
            .find(|l| l.starts_with("WARN  leftover mounts"))
            .unwrap_or_else(|| panic!("{}", run.stdout));
        assert!(leftover.contains("pod-stray/mount"), "{leftover}");
    }

    // A kubelet directory that does not exist fails, and so does the exit code.
    let output = Command::new(BINARY)
        .args([
            "doctor",
            "--no-probes",
            "--kubelet-dir",
            "/nonexistent/kubelet",
        ])
        .arg("--state-dir")
        .arg(driver.state_dir())
        .arg("--data-dir")
        .arg(driver.data_dir())
        .arg("--endpoint")
        .arg(format!("unix://{}", driver.socket().display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("FAIL  kubelet directory") && l.contains("/nonexistent")),
        "{stdout}"
    );
}

/// A data directory whose volumes would not survive a power loss (ext4 made without a journal)
/// or a reboot (tmpfs), and a state store in memory, are each named in a warning at server start
/// and by a `WARN  crash safety` line of doctor; journaled ext4 under both gets neither.
#[tokio::test]
async fn directories_that_can_lose_volumes_are_warned_about() {
    if !is_root() {
        eprintln!("SKIPPED: mounting test filesystems needs root");
        return;
    }
    if Command::new("mkfs.ext4").arg("-V").output().is_err() {
        eprintln!("SKIPPED: mkfs.ext4 is not installed");
        return;
    }
    fn tmpfs_at(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64m", "k8scsi-test"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success());
    }
    fn journaled_ext4_at(data: &Path) {
        mount_image(data, 64, &["mkfs.ext4", "-q"]);
    }
    /// The state directory of a test driver whose data directory is `data`.
    fn state_of(data: &Path) -> std::path::PathBuf {
        data.parent().unwrap().join("state")
    }
    /// Mounts the filesystems under test before the driver starts (the state directory is
    /// always on the same filesystem as the data directory unless a case mounts one there).
    type Prepare = fn(&Path);
    let cases: [(&str, Prepare, Option<&str>); 4] = [
        (
            "data on ext4 without a journal",
            |data| mount_image(data, 64, &["mkfs.ext4", "-q", "-O", "^has_journal"]),
            Some("ext4 without a journal"),
        ),
        (
            "data on tmpfs",
            tmpfs_at,
            Some("tmpfs keeps volumes in memory"),
        ),
        (
            "state on tmpfs",
            |data| {
                journaled_ext4_at(data);
                tmpfs_at(&state_of(data));
            },
            Some("the state store is on tmpfs"),
        ),
        ("journaled ext4", journaled_ext4_at, None),
    ];
    for (label, prepare, expected) in cases {
        let driver = Driver::start_on(prepare);
        create(&driver, "pvc-durability", 1 << 20, None).await;
        let logged: Vec<String> = driver
            .log()
            .lines()
            .filter(|l| l.contains("may not survive"))
            .map(str::to_string)
            .collect();
        let run = doctor(&driver, &["--no-probes"]);
        let lines = check_lines(&run, "crash safety");
        let warned: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with("WARN"))
            .collect();
        println!("{label}: {lines:#?}");
        match expected {
            Some(weakness) => {
                assert!(
                    logged.len() == 1 && logged[0].contains(weakness),
                    "{label}: {logged:#?}"
                );
                assert!(
                    warned.len() == 1 && warned[0].contains(weakness),
                    "{label}: {lines:#?}"
                );
            }
            None => {
                assert_eq!(logged, Vec::<String>::new(), "{label}");
                assert_eq!(warned, Vec::<&str>::new(), "{label}");
                assert!(
                    lines[0].starts_with("PASS  crash safety         ext4"),
                    "{label}: {lines:#?}"
                );
            }
        }
        assert_eq!(
            run.code, 0,
            "{label}: a warning is not a failure\n{}",
            run.stdout
        );
    }
}

/// `k8scsi client ... | head` ends quietly: no "Broken pipe" panic when the reader goes away.
#[test]
fn client_output_into_a_closed_pipe_ends_quietly() {
    let driver = Driver::start();
    let mut child = Command::new(BINARY)
        .args(["client", "--endpoint"])
        .arg(format!("unix://{}", driver.socket().display()))
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run k8scsi client");
    // Close the read end before the client has printed anything.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
}

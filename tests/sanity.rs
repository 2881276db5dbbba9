//! Runs csi-sanity, the official CSI conformance suite (kubernetes-csi/csi-test), against the
//! real binary over its socket. `scripts/install-test-tools.sh` installs the pinned csi-sanity
//! into a cache outside the work tree; without it the test skips with a printed reason, unless
//! `K8SCSI_REQUIRE_TOOLS=1` (set by CI) turns the absence into a failure.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::Driver;

/// Specs csi-sanity v5.6.0 runs for the capabilities k8scsi advertises today (77 with snapshots,
/// clones and group snapshots; 49 before them); fewer means a capability silently stopped being
/// exercised.
const MIN_PASSED: u32 = 77;
/// The same for `type: shared` volumes.
const MIN_PASSED_SHARED: u32 = 77;

fn csi_sanity() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("K8SCSI_CSI_SANITY") {
        return Some(PathBuf::from(path));
    }
    let tools = std::env::var("K8SCSI_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/k8scsi-tools")
        });
    let path = tools.join("bin/csi-sanity");
    path.exists().then_some(path)
}

/// Parses "SUCCESS! -- 37 Passed | 0 Failed | 1 Pending | 65 Skipped" into (passed, failed).
fn summary(output: &str) -> Option<(u32, u32)> {
    let line = output
        .lines()
        .rev()
        .find(|l| l.contains(" Passed | ") && l.contains(" Failed"))?;
    let number_before = |word: &str| -> Option<u32> {
        let end = line.find(word)?;
        line[..end].split_whitespace().last()?.parse().ok()
    };
    Some((number_before(" Passed")?, number_before(" Failed")?))
}

/// Runs csi-sanity against `driver` with the StorageClass parameters in `parameters` (a YAML
/// file) and returns how many specs passed; fails the test on any failure.
fn run_sanity(sanity: &std::path::Path, driver: &Driver, parameters: &std::path::Path) -> u32 {
    let work = driver.kubelet_dir();
    let output = Command::new(sanity)
        .arg(format!("--csi.endpoint={}", driver.socket().display()))
        .arg(format!(
            "--csi.mountdir={}",
            work.join("sanity-mnt").display()
        ))
        .arg(format!(
            "--csi.stagingdir={}",
            work.join("sanity-stg").display()
        ))
        .arg(format!("--csi.testvolumesize={}", 64 << 20))
        .arg(format!(
            "--csi.testvolumeparameters={}",
            parameters.display()
        ))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.timeout=10m")
        .output()
        .expect("run csi-sanity");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let failures: Vec<&str> = text.lines().filter(|l| l.contains("[FAIL]")).collect();
    let (passed, failed) =
        summary(&text).unwrap_or_else(|| panic!("no csi-sanity summary:\n{text}"));
    println!("csi-sanity: {passed} passed, {failed} failed");
    assert!(
        output.status.success() && failed == 0,
        "csi-sanity failed:\n{}\n--- server log ---\n{}",
        failures.join("\n"),
        driver.log()
    );
    passed
}

fn sanity_or_skip() -> Option<PathBuf> {
    let sanity = csi_sanity();
    if sanity.is_none() {
        assert!(
            std::env::var("K8SCSI_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "csi-sanity is required (K8SCSI_REQUIRE_TOOLS=1) but not installed: run scripts/install-test-tools.sh"
        );
        eprintln!("SKIPPED: csi-sanity not installed (run scripts/install-test-tools.sh)");
    }
    sanity
}

#[test]
fn csi_sanity_passes() {
    require_root!();
    let Some(sanity) = sanity_or_skip() else {
        return;
    };
    let driver = Driver::start();
    // The temp dir is rarely btrfs: provision unenforced directories (tests/capacity.rs
    // covers enforcement).
    let parameters = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sanity-parameters.yaml");
    let passed = run_sanity(&sanity, &driver, &parameters);
    assert!(
        passed >= MIN_PASSED,
        "csi-sanity ran only {passed} specs (expected at least {MIN_PASSED})"
    );
}

/// The same suite against `type: shared` volumes on a real ext4 share (tests/common/share.rs).
#[test]
fn csi_sanity_passes_on_shared_volumes() {
    require_root!();
    skip_unless_ready!(common::share::skip_reason());
    let Some(sanity) = sanity_or_skip() else {
        return;
    };
    let share = common::share::Share::new();
    let driver = Driver::start();
    let parameters = driver.dir.path().join("shared-parameters.yaml");
    std::fs::write(
        &parameters,
        format!(
            "type: shared\nsource: \"{}\"\nfsType: ext4\nonDelete: delete\n",
            share.device
        ),
    )
    .unwrap();
    let passed = run_sanity(&sanity, &driver, &parameters);
    assert!(
        passed >= MIN_PASSED_SHARED,
        "csi-sanity ran only {passed} specs on shared volumes (expected at least {MIN_PASSED_SHARED})"
    );
    // Every volume csi-sanity created was deleted, directory and marker.
    assert_eq!(
        share.root_entries(),
        [".k8scsi"],
        "left on the share: {:?}",
        share.root_entries()
    );
    assert!(
        std::fs::read_dir(share.view().join(".k8scsi/volumes"))
            .unwrap()
            .next()
            .is_none()
    );
}

#[test]
fn parses_sanity_summary() {
    assert_eq!(
        summary("Ran 37 of 103\nSUCCESS! -- 37 Passed | 0 Failed | 1 Pending | 65 Skipped\n"),
        Some((37, 0))
    );
    assert_eq!(
        summary("FAIL! -- 30 Passed | 7 Failed | 1 Pending | 65 Skipped"),
        Some((30, 7))
    );
    assert_eq!(summary("nothing"), None);
}

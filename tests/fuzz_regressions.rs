//! Replays the kept fuzz corpus (tests/fuzz_corpus/<target>/, seeds plus what cargo-fuzz found
//! and minimised) through the same invariant checks the fuzz targets run, so every case stays
//! covered by an ordinary `cargo test`. See FAILURE-MODES.md for how to fuzz further.

use std::path::Path;

#[test]
fn fuzz_corpus_cases_keep_their_invariants() {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    for (target, check) in k8scsi::fuzzing::TARGETS {
        let dir = base.join(target);
        let mut cases = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| check(&data));
            assert!(
                outcome.is_ok(),
                "{target}: corpus case {} ({:?}) breaks an invariant",
                path.display(),
                String::from_utf8_lossy(&data)
            );
            cases += 1;
        }
        assert!(cases > 0, "{target}: empty corpus in {}", dir.display());
        eprintln!("{target}: {cases} corpus cases");
    }
}

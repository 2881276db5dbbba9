//! Fuzz target: `k8scsi::fuzzing::check_snapshot_id` on arbitrary bytes (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| k8scsi::fuzzing::check_snapshot_id(data));

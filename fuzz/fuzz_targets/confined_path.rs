//! Fuzz target: `k8scsi::fuzzing::check_confined_path` on arbitrary bytes (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| k8scsi::fuzzing::check_confined_path(data));

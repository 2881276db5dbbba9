//! Fuzz target: `k8scsi::fuzzing::check_shared_parameters` on arbitrary bytes (see src/fuzzing.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| k8scsi::fuzzing::check_shared_parameters(data));

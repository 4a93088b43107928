//! Fuzz target `probe`: a file's bytes → the scan probe (sniffing, truncation checks, lofty).
//! Panics inside lofty are caught by the probe (reported, not crashes); any other is a crash.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: corald::fuzz_entry::tolerate_caught_panics_in(&["lofty"]),
    |data: &[u8]| {
        if let Err(v) = corald::fuzz_entry::probe_bytes(data) {
            panic!("contract broken: {v}");
        }
    }
);

//! Fuzz target `probe`: a file's bytes → the scan probe (sniffing, truncation checks, lofty).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(v) = corald::fuzz_entry::probe_bytes(data) {
        panic!("contract broken: {v}");
    }
});

//! Fuzz target `embed_decode`: a file's bytes → the embedding decode (symphonia) and resample
//! stages. Panics inside those libraries are caught by the daemon (reported, not crashes); a panic
//! in corald's own code is a crash.
#![no_main]

libfuzzer_sys::fuzz_target!(
    init: corald::fuzz_entry::tolerate_caught_panics_in(&["lofty", "symphonia", "rubato", "realfft", "rustfft"]),
    |data: &[u8]| {
        if let Err(v) = corald::fuzz_entry::embed_decode_bytes(data) {
            panic!("contract broken: {v}");
        }
    }
);

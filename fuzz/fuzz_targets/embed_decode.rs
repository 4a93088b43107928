//! Fuzz target `embed_decode`: a file's bytes → the embedding decode (symphonia) and resample stages.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(v) = corald::fuzz_entry::embed_decode_bytes(data) {
        panic!("contract broken: {v}");
    }
});

//! Fuzz target `config`: configuration file text → Config::from_toml (errors name file, line, key).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(v) = corald::fuzz_entry::config_text(data) {
        panic!("contract broken: {v}");
    }
});

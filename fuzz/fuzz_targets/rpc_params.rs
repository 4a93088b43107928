//! Fuzz target `rpc_params`: one JSON-RPC call (method line + params) → the server's decoding and parameter checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Err(v) = corald::fuzz_entry::rpc_request(data) {
        panic!("contract broken: {v}");
    }
});

//! The safetensors header reader (8-byte length + JSON) on arbitrary bytes: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match patchbay::import::safetensors::parse_header(data) {
        Err(e) => {
            let _ = format!("{e:#}");
        }
        Ok((data_start, entries)) => {
            assert!(data_start >= 8 && data_start <= data.len(), "data section starts at {data_start}");
            let _ = format!("{entries:?}");
        }
    }
});

//! The GGUF header reader on arbitrary bytes: it must return an error, never panic, hang or
//! allocate more than the input justifies; and what it accepts must describe data inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match patchbay::import::gguf::parse(data) {
        Err(e) => {
            // The messages are part of the contract (they name offsets and keys): build them.
            let _ = format!("{e:#}");
        }
        Ok(layout) => {
            let len = data.len() as u64;
            assert!(layout.alignment.is_power_of_two(), "alignment {}", layout.alignment);
            assert_eq!(layout.data_offset % layout.alignment, 0, "data offset not aligned");
            for (_, value) in &layout.metadata {
                let _ = value.describe();
            }
            for t in &layout.tensors {
                assert!(t.offset <= len, "tensor {} starts at {} past the {len}-byte file", t.name, t.offset);
                if let Some(n) = t.n_bytes {
                    assert!(t.offset + n <= len, "tensor {} ends at {} past the {len}-byte file", t.name, t.offset + n);
                }
            }
        }
    }
});

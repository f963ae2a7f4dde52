//! Arbitrary bytes through format probing, then opened as whatever the probe says.
#![no_main]

use corefour_disk::storage::MemStorage;
use corefour_disk::{fuzzing::exercise, probe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = MemStorage::new(data.to_vec());
    if let Ok(fmt) = probe(&s, std::path::Path::new("fuzz-input")) {
        exercise(fmt, data, false);
    }
});

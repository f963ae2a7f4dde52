//! Arbitrary bytes as a qcow2 image: open, map, read, write and check.
#![no_main]

use corefour_disk::{fuzzing::exercise, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    exercise(Format::Qcow2, data, true);
});

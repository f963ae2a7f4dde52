//! Arbitrary bytes as a vhd image: open, map, read.
#![no_main]

use corefour_disk::{fuzzing::exercise, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    exercise(Format::Vpc, data, false);
});

//! A sampling profile of the software CPU, for finding where a boot spends its time:
//! `COREFOUR_EMU_PROFILE=FILE` makes every vCPU count instructions, blocks decoded, TLB fills,
//! time halted and device exits, and sample the guest RIP at every timer/interrupt poll (every
//! 8192 instructions at most); the counts and the samples go to FILE.N (N = the vCPU) when the
//! vCPU is dropped.

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Profile {
    pub path: Option<String>,
    pub started: Option<Instant>,
    pub halted: Duration,
    pub halts: u64,
    pub decoded_blocks: u64,
    pub decoded_insns: u64,
    pub tlb_fills: u64,
    /// First-level TLB misses served by the second level (no page walk).
    pub tlb_refills: u64,
    pub pio: u64,
    pub mmio: u64,
    pub interrupts: u64,
    pub exceptions: u64,
    /// Blocks translated to host code, instructions retired in it, and runs of translated
    /// code that left before the end of what it covers (a TLB miss, MMIO, a fault to come).
    pub jit_blocks: u64,
    pub jit_insns: u64,
    pub jit_side_exits: u64,
    /// Entries into translated code from the dispatch loop, and block lookups that missed
    /// the previous block's links.
    pub jit_runs: u64,
    pub slow_lookups: u64,
    /// Blocks dispatched (interpreted or entered in translated code).
    pub dispatches: u64,
    /// Slow lookups that missed the direct-mapped array, and blocks decoded without being
    /// kept (fetched from MMIO or straddling a page).
    pub fast_misses: u64,
    pub uncached: u64,
    /// How translated code came back: through a chain slot not linked yet, through a guarded
    /// record that named another target, and with the rest of its block left to the
    /// interpreter (an instruction the JIT does not cover).
    pub exit_unchained: u64,
    pub exit_guarded: u64,
    pub exit_stop: u64,
    /// Pages that became code pages, decode-cache clears, and full / non-global TLB flushes.
    pub code_pages: u64,
    pub cache_clears: u64,
    pub tlb_flushes: u64,
    pub tlb_flushes_nonglobal: u64,
    /// Translated blocks whose code stops before an instruction the JIT does not cover, by
    /// that instruction's mnemonic.
    pub jit_stops: HashMap<String, u64>,
    pub samples: HashMap<u64, u64>,
    /// Every sample in order: milliseconds since start, RIP, and the first kernel-text-looking
    /// words on the stack (return-address candidates, for callers of a hot function).
    pub seq: Vec<(u32, u64, [u64; 4])>,
}

impl Profile {
    pub fn from_env(id: u32) -> Self {
        let path = std::env::var("COREFOUR_EMU_PROFILE")
            .ok()
            .filter(|p| !p.is_empty())
            .map(|p| format!("{p}.{id}"));
        Profile {
            started: path.as_ref().map(|_| Instant::now()),
            path,
            ..Profile::default()
        }
    }

    #[inline]
    pub fn on(&self) -> bool {
        self.path.is_some()
    }

    pub fn write(&self, icount: u64) {
        let Some(path) = &self.path else { return };
        let wall = self.started.map_or(Duration::ZERO, |s| s.elapsed());
        let mut s: Vec<(u64, u64)> = self.samples.iter().map(|(&k, &v)| (k, v)).collect();
        s.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
        let mut out = String::new();
        out += &format!(
            "wall_s {:.3}\ninstructions {icount}\nhalted_s {:.3}\nhalts {}\ndecoded_blocks {}\n\
             decoded_insns {}\ntlb_fills {}\ntlb_refills {}\npio {}\nmmio {}\ninterrupts {}\nexceptions {}\n\
             jit_blocks {}\njit_insns {}\njit_side_exits {}\njit_runs {}\nslow_lookups {}\n\
             dispatches {}\nfast_misses {}\nuncached {}\nexit_unchained {}\nexit_guarded {}\nexit_stop {}\ncode_pages {}\n\
             cache_clears {}\ntlb_flushes {}\ntlb_flushes_nonglobal {}\n",
            wall.as_secs_f64(),
            self.halted.as_secs_f64(),
            self.halts,
            self.decoded_blocks,
            self.decoded_insns,
            self.tlb_fills,
            self.tlb_refills,
            self.pio,
            self.mmio,
            self.interrupts,
            self.exceptions,
            self.jit_blocks,
            self.jit_insns,
            self.jit_side_exits,
            self.jit_runs,
            self.slow_lookups,
            self.dispatches,
            self.fast_misses,
            self.uncached,
            self.exit_unchained,
            self.exit_guarded,
            self.exit_stop,
            self.code_pages,
            self.cache_clears,
            self.tlb_flushes,
            self.tlb_flushes_nonglobal,
        );
        let mut stops: Vec<(&String, &u64)> = self.jit_stops.iter().collect();
        stops.sort_by_key(|&(_, n)| std::cmp::Reverse(*n));
        for (m, n) in stops {
            out += &format!("jit_stop {m} {n}\n");
        }
        for (rip, n) in s {
            out += &format!("sample {rip:#x} {n}\n");
        }
        for (ms, rip, st) in &self.seq {
            out += &format!(
                "seq {ms} {rip:#x} {:#x} {:#x} {:#x} {:#x}\n",
                st[0], st[1], st[2], st[3]
            );
        }
        if let Ok(mut f) = std::fs::File::create(path) {
            let _ = f.write_all(out.as_bytes());
        }
    }
}

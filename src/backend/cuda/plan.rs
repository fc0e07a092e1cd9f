//! The launch-plan recorder behind `cuda:plan`: a kernel backend that runs nothing. Memory is
//! virtual (addresses from a counter, sizes in a map, live and peak bytes counted), reads
//! return zeros, and every launch goes to the profiler with its FLOPs (what the launcher
//! declares through `profile::set_work`) and bytes (declared, or else the sizes of the
//! allocations its pointer arguments point into: one read or write of each, the minimum a
//! kernel moves). A training step on `cuda:plan` thus lists the launches, bytes and FLOPs a GPU
//! would see for the same kernel choices — in seconds, on any machine — but never how long
//! they take.
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use super::abi::Arg;

/// The name a device-to-device copy is recorded under (a copy, not a kernel launch).
pub const MEMCPY: &str = "memcpy (device to device)";

/// Where virtual addresses start (far from null; 256-byte aligned like cudaMalloc's).
const BASE: u64 = 1 << 40;

static NEXT: AtomicU64 = AtomicU64::new(BASE);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static SIZES: Mutex<BTreeMap<u64, usize>> = Mutex::new(BTreeMap::new());

fn sizes() -> std::sync::MutexGuard<'static, BTreeMap<u64, usize>> {
    SIZES.lock().unwrap_or_else(|p| p.into_inner())
}

/// A virtual allocation: an address range nothing backs. Freed (uncounted) on drop.
#[derive(Debug)]
pub struct VirtualBuffer {
    addr: u64,
    bytes: usize,
}

impl VirtualBuffer {
    /// `bytes` of virtual memory.
    pub fn new(bytes: usize) -> VirtualBuffer {
        let span = (bytes.max(1) as u64).div_ceil(256) * 256;
        let addr = NEXT.fetch_add(span, Ordering::Relaxed);
        sizes().insert(addr, bytes);
        let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
        PEAK.fetch_max(live, Ordering::Relaxed);
        VirtualBuffer { addr, bytes }
    }

    /// The address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The size.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for VirtualBuffer {
    fn drop(&mut self) {
        sizes().remove(&self.addr);
        LIVE.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Bytes in virtual allocations now, and the most at any time since `reset_peak`.
pub fn memory() -> (usize, usize) {
    (LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed))
}

/// Starts a new peak from what is live now.
pub fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Bytes a launch with `args` moves at the least: each distinct live allocation its pointers
/// (and tensor maps) point into, once. `sig` (the kernel's signature, `sim::kernel_signature`)
/// tells pointers from 64-bit integers such as a dropout seed; without it every 64-bit value
/// that falls in a live allocation counts.
pub fn bytes_touched(args: &[Arg], sig: Option<&str>) -> f64 {
    let sizes = sizes();
    let mut seen = std::collections::BTreeSet::new();
    let mut total = 0usize;
    for (i, a) in args.iter().enumerate() {
        let is_ptr = sig
            .and_then(|s| s.as_bytes().get(i))
            .is_none_or(|c| matches!(c, b'p' | b'T'));
        let addr = match a {
            Arg::Ptr(p) => *p as u64,
            Arg::U64(u) if is_ptr => *u,
            Arg::Map(m) => m.0[0],
            Arg::U64(_) | Arg::I32(_) | Arg::F32(_) => continue,
        };
        if addr < BASE {
            continue;
        }
        if let Some((start, len)) = sizes.range(..=addr).next_back() {
            if addr < start + (*len).max(1) as u64 && seen.insert(*start) {
                total += *len;
            }
        }
    }
    total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_memory_is_counted_and_launch_bytes_are_the_allocations_touched() {
        let before = memory().0;
        let (a, b) = (VirtualBuffer::new(1000), VirtualBuffer::new(24));
        assert!(memory().0 >= before + 1024);
        let args = [
            Arg::U64(a.addr()),
            Arg::U64(a.addr() + 400), // an offset into the same buffer: counted once
            Arg::U64(b.addr()),
            Arg::I32(7),
            Arg::null(),
        ];
        assert_eq!(bytes_touched(&args, None), 1024.0);
        // With a signature, a 64-bit integer parameter is not an address (a seed).
        assert_eq!(bytes_touched(&args, Some("pqqip")), 1000.0);
        drop(a);
        assert_eq!(
            bytes_touched(&args[..1], None),
            0.0,
            "a freed buffer is not counted"
        );
    }
}

//! The caching device allocator: freed blocks go to size-bucketed free lists and are reused
//! instead of returned to the driver, so a training step allocates from the driver only in its
//! first iteration. Generic over the raw allocator (`RawAlloc`: `cuMemAllocAsync`/`cuMemFreeAsync`
//! on the GPU, a counting mock in tests), so the bookkeeping is tested without a GPU.
use std::collections::BTreeMap;

use crate::{Error, Result};

/// What the allocator gets memory from.
pub trait RawAlloc {
    /// A device address for `bytes` bytes, or an error (out of memory, …).
    fn alloc(&mut self, bytes: usize) -> Result<u64>;
    /// Gives back block `ptr` that `alloc` returned for `bytes` bytes. Cannot fail: a driver
    /// error here is dropped.
    fn free(&mut self, ptr: u64, bytes: usize);
    /// (free, total) device memory, for out-of-memory messages.
    fn mem_info(&self) -> (usize, usize);
}

/// Bytes in use and cached, the peak in use, and the driver calls made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Bytes in blocks handed out and not yet freed, by size class (so at least the bytes
    /// asked for).
    pub in_use: usize,
    /// The highest `in_use` since the allocator was made or `reset_peak` last ran.
    pub peak_in_use: usize,
    /// Bytes in freed blocks kept on the free lists for reuse (not given back to the driver).
    pub cached: usize,
    /// Blocks obtained from the driver (successful `RawAlloc::alloc` calls).
    pub driver_allocs: usize,
    /// Blocks given back to the driver (by `empty_cache`, also run before the retry after an
    /// out-of-memory error).
    pub driver_frees: usize,
}

/// Size classes: multiples of 512 B up to 1 MiB, then of 2 MiB (large tensors round less).
pub fn size_class(bytes: usize) -> usize {
    const SMALL: usize = 512;
    const LARGE: usize = 2 << 20;
    let b = bytes.max(1);
    if b <= 1 << 20 {
        b.div_ceil(SMALL) * SMALL
    } else {
        b.div_ceil(LARGE) * LARGE
    }
}

/// Device memory from raw allocator `R`, cached: each request is rounded up to its
/// [`size_class`], and a freed block goes onto its class's free list, to serve the next request
/// of that class without a driver call. Blocks are never split or merged, so memory cached in
/// one class serves no other until `empty_cache`. Not synchronized itself: the GPU runtime keeps
/// it behind a mutex.
pub struct CachingAllocator<R: RawAlloc> {
    raw: R,
    free: BTreeMap<usize, Vec<u64>>,
    live: BTreeMap<u64, usize>,
    stats: AllocStats,
}

impl<R: RawAlloc> CachingAllocator<R> {
    /// An allocator over `raw` with nothing cached and every counter at zero.
    pub fn new(raw: R) -> Self {
        CachingAllocator {
            raw,
            free: BTreeMap::new(),
            live: BTreeMap::new(),
            stats: AllocStats::default(),
        }
    }

    /// A copy of the counters now.
    pub fn stats(&self) -> AllocStats {
        self.stats
    }

    /// Starts a new peak measurement from what is in use now.
    pub fn reset_peak(&mut self) {
        self.stats.peak_in_use = self.stats.in_use;
    }

    /// A block of at least `bytes`: a cached block of the same class if there is one, else from
    /// the driver; on out-of-memory the cache is released and the driver asked once more.
    pub fn alloc(&mut self, bytes: usize) -> Result<u64> {
        let class = size_class(bytes);
        let ptr = match self.free.get_mut(&class).and_then(|v| v.pop()) {
            Some(p) => {
                self.stats.cached -= class;
                p
            }
            None => match self.raw.alloc(class) {
                Ok(p) => {
                    self.stats.driver_allocs += 1;
                    p
                }
                Err(_) => {
                    self.empty_cache();
                    let p = self.raw.alloc(class).map_err(|e| {
                        let (free, total) = self.raw.mem_info();
                        Error::Cuda(format!(
                            "out of device memory: asked for {} ({} in use by sd2, {} free of {}); \
                             try a smaller micro-batch ({e})",
                            human(class),
                            human(self.stats.in_use),
                            human(free),
                            human(total)
                        ))
                    })?;
                    self.stats.driver_allocs += 1;
                    p
                }
            },
        };
        self.live.insert(ptr, class);
        self.stats.in_use += class;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Ok(ptr)
    }

    /// Returns a block to its free list. Freeing an address this allocator did not hand out is
    /// an error (a double free), not a silent corruption.
    pub fn free(&mut self, ptr: u64) -> Result<()> {
        let class = self
            .live
            .remove(&ptr)
            .ok_or_else(|| Error::Cuda(format!("free of unknown device address {ptr:#x}")))?;
        self.stats.in_use -= class;
        self.stats.cached += class;
        self.free.entry(class).or_default().push(ptr);
        Ok(())
    }

    /// Gives every cached block back to the driver.
    pub fn empty_cache(&mut self) {
        for (class, ptrs) in std::mem::take(&mut self.free) {
            for p in ptrs {
                self.raw.free(p, class);
                self.stats.driver_frees += 1;
                self.stats.cached -= class;
            }
        }
    }
}

fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

/// The driver side on a real GPU: stream-ordered `cuMemAllocAsync`/`cuMemFreeAsync` on one
/// stream (unverified on hardware so far: no GPU was lent to the sessions that wrote it).
#[cfg(feature = "cuda")]
pub struct StreamAlloc {
    /// The GPU's context, bound to the calling thread before each allocation.
    pub ctx: std::sync::Arc<cudarc::driver::CudaContext>,
    /// The stream allocations and frees are ordered on: the GPU's compute stream, so a block
    /// freed there is reused only by work queued after its last reader.
    pub stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

#[cfg(feature = "cuda")]
impl RawAlloc for StreamAlloc {
    fn alloc(&mut self, bytes: usize) -> Result<u64> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Cuda(format!("bind context: {e}")))?;
        // SAFETY: the stream belongs to the bound context; the block is freed through `free`.
        unsafe { cudarc::driver::result::malloc_async(self.stream.cu_stream(), bytes) }
            .map_err(|e| Error::Cuda(format!("cuMemAllocAsync({bytes}): {e}")))
    }

    fn free(&mut self, ptr: u64, _bytes: usize) {
        // SAFETY: `ptr` came from `alloc` on this stream and is no longer referenced.
        let _ = unsafe { cudarc::driver::result::free_async(ptr, self.stream.cu_stream()) };
    }

    fn mem_info(&self) -> (usize, usize) {
        cudarc::driver::result::mem_get_info().unwrap_or((0, 0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake device with `cap` bytes.
    struct Mock {
        next: u64,
        used: usize,
        cap: usize,
    }

    impl RawAlloc for Mock {
        fn alloc(&mut self, bytes: usize) -> Result<u64> {
            if self.used + bytes > self.cap {
                return Err(Error::Cuda("CUDA_ERROR_OUT_OF_MEMORY".into()));
            }
            self.used += bytes;
            self.next += bytes as u64;
            Ok(self.next)
        }
        fn free(&mut self, _ptr: u64, bytes: usize) {
            self.used -= bytes;
        }
        fn mem_info(&self) -> (usize, usize) {
            (self.cap - self.used, self.cap)
        }
    }

    fn mock(cap: usize) -> CachingAllocator<Mock> {
        CachingAllocator::new(Mock {
            next: 0x1000,
            used: 0,
            cap,
        })
    }

    #[test]
    fn size_classes_round_up() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(1), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class((1 << 20) + 1), 2 << 20);
        assert_eq!(size_class(5 << 20), 6 << 20);
    }

    #[test]
    fn a_repeated_step_reuses_blocks() {
        let mut a = mock(1 << 30);
        for _ in 0..3 {
            let ps: Vec<u64> = [1000, 5000, 3 << 20, 1000]
                .iter()
                .map(|b| a.alloc(*b).unwrap())
                .collect();
            for p in ps {
                a.free(p).unwrap();
            }
        }
        let s = a.stats();
        // Only the first step went to the driver.
        assert_eq!(s.driver_allocs, 4);
        assert_eq!(s.in_use, 0);
        assert_eq!(s.peak_in_use, 1024 + 5120 + (4 << 20) + 1024);
        assert_eq!(s.cached, s.peak_in_use);
        a.empty_cache();
        assert_eq!((a.stats().cached, a.stats().driver_frees), (0, 4));
    }

    #[test]
    fn out_of_memory_releases_the_cache_then_explains() {
        let mut a = mock(8 << 20);
        let p = a.alloc(6 << 20).unwrap();
        a.free(p).unwrap();
        // 4 MiB does not fit beside the cached 6 MiB: the cache is emptied and the retry fits.
        let q = a.alloc(4 << 20).unwrap();
        assert_eq!(a.stats().driver_frees, 1);
        let e = a.alloc(6 << 20).unwrap_err().to_string();
        assert!(
            e.contains("out of device memory") && e.contains("smaller micro-batch"),
            "{e}"
        );
        assert!(e.contains("6.0 MiB") && e.contains("4.0 MiB in use"), "{e}");
        a.free(q).unwrap();
        let e = a.free(q).unwrap_err().to_string();
        assert!(e.contains("unknown device address"), "{e}");
    }
}

//! The kernel profiler: every launch (kernels and cuBLAS GEMMs) between `start` and `stop`
//! timed on the device (a CUDA event before and after each; wall clock in the simulator, which
//! runs launches synchronously), named ranges (`range("vision layer 3")`, NVTX-style, nested)
//! around model phases, and what a launcher says about its work (`set_work`: FLOPs and bytes)
//! for a per-kernel efficiency column. `Profile::table` aggregates by kernel name;
//! `Profile::chrome_trace` writes the Chrome/Perfetto trace format (`chrome://tracing`,
//! ui.perfetto.dev). Off by default: one relaxed atomic load per launch.
//!
//! Backend-neutral: a device plugs its clock in (`DeviceClock`; the CUDA runtime's events), and
//! without one launches and ranges are timed by the host's wall clock (the simulator).
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

use crate::{Error, Result};

static ON: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<Option<State>> = Mutex::new(None);

thread_local! {
    static WORK: Cell<Option<(f64, f64)>> = const { Cell::new(None) };
}

/// A device's clock as the profiler reads it: marks queued in the device's order.
pub trait DeviceClock: Send + Sync {
    /// A mark recorded now in the device's queue.
    fn mark(&self) -> Result<Box<dyn DeviceMark>>;
    /// Waits for everything queued, so every mark can be read.
    fn synchronize(&self) -> Result<()>;
    /// The device's name, for the report.
    fn device_name(&self) -> String;
}

/// A mark of a `DeviceClock`.
pub trait DeviceMark: Send {
    /// Milliseconds from `earlier` (a mark of the same clock) to this one.
    fn ms_since(&self, earlier: &dyn DeviceMark) -> Result<f64>;
    /// For the clock's own downcast in `ms_since`.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A point in device time.
pub enum Mark {
    /// The host's clock (the simulator, which runs launches synchronously).
    Host(Instant),
    /// A device clock's mark.
    Device(Box<dyn DeviceMark>),
}

struct Rec {
    name: String,
    start: Mark,
    end: Option<Mark>,
    depth: usize,
    work: Option<(f64, f64)>,
}

struct State {
    clock: Option<std::sync::Arc<dyn DeviceClock>>,
    t0: Mark,
    kernels: Vec<Rec>,
    ranges: Vec<Rec>,
    open: Vec<usize>,
}

fn lock() -> std::sync::MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether launches are being recorded.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// A mark now on the profiled device.
fn mark(st: &State) -> Result<Mark> {
    match &st.clock {
        Some(c) => Ok(Mark::Device(c.mark()?)),
        None => Ok(Mark::Host(Instant::now())),
    }
}

/// Starts recording launches (clearing any earlier recording), timed by `clock` — a device's
/// (`Runner::clock` in the CUDA runtime) or, with `None`, the host's wall clock.
pub fn start(clock: Option<std::sync::Arc<dyn DeviceClock>>) -> Result<()> {
    let mut g = lock();
    let mut st = State {
        clock,
        t0: Mark::Host(Instant::now()),
        kernels: vec![],
        ranges: vec![],
        open: vec![],
    };
    st.t0 = mark(&st)?;
    *g = Some(st);
    ON.store(true, Ordering::Relaxed);
    Ok(())
}

/// Attaches (FLOPs, bytes moved) to the next launch this thread records.
pub fn set_work(flops: f64, bytes: f64) {
    if enabled() {
        WORK.with(|w| w.set(Some((flops, bytes))));
    }
}

/// `set_work`, unless the launch already has work attached (a plan recorder's fallback).
pub fn set_default_work(flops: f64, bytes: f64) {
    if enabled() {
        WORK.with(|w| {
            if w.get().is_none() {
                w.set(Some((flops, bytes)))
            }
        });
    }
}

/// Records one launch: `f` runs between two marks (the GPU runtime and the simulator call it).
pub fn launch<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    let start = {
        let g = lock();
        match g.as_ref() {
            Some(st) => Some(mark(st)?),
            None => None,
        }
    };
    let out = f()?;
    let mut g = lock();
    if let (Some(st), Some(start)) = (g.as_mut(), start) {
        let end = mark(st)?;
        let work = WORK.with(|w| w.take());
        let depth = st.open.len();
        st.kernels.push(Rec {
            name: name.to_string(),
            start,
            end: Some(end),
            depth,
            work,
        });
    }
    Ok(out)
}

/// A named range, closed when dropped (nested ranges nest in the trace).
pub struct Range {
    index: Option<usize>,
}

/// Opens a range (a no-op when the profiler is off).
pub fn range(name: impl Into<String>) -> Range {
    range_with(|| name.into())
}

/// Opens a range whose name is only built when the profiler is on (per-layer names in hot
/// loops cost nothing otherwise).
pub fn range_with(name: impl FnOnce() -> String) -> Range {
    if !enabled() {
        return Range { index: None };
    }
    let mut g = lock();
    let Some(st) = g.as_mut() else {
        return Range { index: None };
    };
    let Ok(start) = mark(st) else {
        return Range { index: None };
    };
    let depth = st.open.len();
    st.ranges.push(Rec {
        name: name(),
        start,
        end: None,
        depth,
        work: None,
    });
    let i = st.ranges.len() - 1;
    st.open.push(i);
    Range { index: Some(i) }
}

impl Drop for Range {
    fn drop(&mut self) {
        let Some(i) = self.index else { return };
        let mut g = lock();
        if let Some(st) = g.as_mut() {
            if let Ok(end) = mark(st) {
                if let Some(r) = st.ranges.get_mut(i) {
                    r.end = Some(end);
                }
            }
            st.open.retain(|&j| j != i);
        }
    }
}

/// One timed span, in milliseconds from the start of the recording.
#[derive(Clone, Debug, Serialize)]
pub struct Span {
    /// The kernel's entry-point name or the range's name.
    pub name: String,
    /// Start, in ms after `start` was called.
    pub start_ms: f64,
    /// Duration in ms (never negative).
    pub dur_ms: f64,
    /// How many ranges were open when the span began (0 = top level); kernels inside a range
    /// have that range's depth + 1.
    pub depth: usize,
    /// Floating-point operations the launcher declared with `set_work` (None if it declared none;
    /// always None for ranges).
    pub flops: Option<f64>,
    /// Bytes moved that the launcher declared with `set_work` (None if it declared none).
    pub bytes: Option<f64>,
}

/// Per-kernel totals.
#[derive(Clone, Debug, Serialize)]
pub struct KernelStat {
    /// The kernel's entry-point name.
    pub name: String,
    /// Number of launches recorded.
    pub calls: usize,
    /// Summed duration of those launches, in ms.
    pub total_ms: f64,
    /// Share of the recording's summed kernel time.
    pub share: f64,
    /// Achieved TFLOP/s over all calls (declared FLOPs / total time); None unless every call
    /// declared its work and the FLOPs are nonzero.
    pub tflops: Option<f64>,
    /// Achieved GB/s (10⁹ bytes per second) over all calls; None unless every call declared its
    /// work and the bytes are nonzero.
    pub gbps: Option<f64>,
}

/// What `stop` returns.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    /// What timed the recording: the device clock's name, or a note that the host's wall clock did.
    pub device: String,
    /// Every recorded launch, in launch order.
    pub kernels: Vec<Span>,
    /// Every named range closed before `stop`, in the order they were opened (a range still open
    /// at `stop` is left out).
    pub ranges: Vec<Span>,
}

/// Stops recording; waits for the device and resolves every mark.
pub fn stop() -> Result<Profile> {
    ON.store(false, Ordering::Relaxed);
    let st = lock()
        .take()
        .ok_or_else(|| Error::Msg("profiler: stop without start".into()))?;
    if let Some(c) = &st.clock {
        c.synchronize()?;
    }
    let at = |m: &Mark| -> Result<f64> {
        Ok(match (&st.t0, m) {
            (Mark::Host(a), Mark::Host(b)) => b.duration_since(*a).as_secs_f64() * 1e3,
            (Mark::Device(a), Mark::Device(b)) => b.ms_since(a.as_ref())?,
            _ => return Err(Error::Msg("profiler: marks from two clocks".into())),
        })
    };
    let spans = |v: &[Rec]| -> Result<Vec<Span>> {
        v.iter()
            .filter_map(|r| r.end.as_ref().map(|e| (r, e)))
            .map(|(r, e)| {
                let s = at(&r.start)?;
                Ok(Span {
                    name: r.name.clone(),
                    start_ms: s,
                    dur_ms: (at(e)? - s).max(0.0),
                    depth: r.depth,
                    flops: r.work.map(|w| w.0),
                    bytes: r.work.map(|w| w.1),
                })
            })
            .collect()
    };
    let device = st.clock.as_ref().map_or(
        "host wall clock (the simulator runs launches synchronously)".to_string(),
        |c| c.device_name(),
    );
    Ok(Profile {
        device,
        kernels: spans(&st.kernels)?,
        ranges: spans(&st.ranges)?,
    })
}

impl Profile {
    /// Summed kernel time (ms).
    pub fn kernel_ms(&self) -> f64 {
        self.kernels.iter().map(|k| k.dur_ms).sum()
    }

    /// Per kernel name: calls, total, share of all kernel time, TFLOP/s and GB/s where the
    /// launcher said its work; largest total first.
    pub fn by_kernel(&self) -> Vec<KernelStat> {
        let mut m: std::collections::BTreeMap<&str, (usize, f64, f64, f64, bool)> =
            Default::default();
        for k in &self.kernels {
            let e = m.entry(&k.name).or_insert((0, 0.0, 0.0, 0.0, true));
            e.0 += 1;
            e.1 += k.dur_ms;
            match (k.flops, k.bytes) {
                (Some(f), Some(b)) => {
                    e.2 += f;
                    e.3 += b;
                }
                _ => e.4 = false,
            }
        }
        let total = self.kernel_ms().max(1e-12);
        let mut v: Vec<KernelStat> = m
            .into_iter()
            .map(|(name, (calls, ms, fl, by, known))| KernelStat {
                name: name.to_string(),
                calls,
                total_ms: ms,
                share: ms / total,
                tflops: (known && fl > 0.0 && ms > 0.0).then(|| fl / (ms * 1e9)),
                gbps: (known && by > 0.0 && ms > 0.0).then(|| by / (ms * 1e6)),
            })
            .collect();
        v.sort_by(|a, b| b.total_ms.total_cmp(&a.total_ms));
        v
    }

    /// The per-kernel table (the `top` largest; 0 = all).
    pub fn table(&self, top: usize) -> String {
        use std::fmt::Write;
        let stats = self.by_kernel();
        let n = if top == 0 { stats.len() } else { top };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<34} {:>6} {:>10} {:>7} {:>8} {:>8}",
            "kernel", "calls", "total ms", "%", "TFLOP/s", "GB/s"
        );
        let o = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        for k in stats.iter().take(n) {
            let _ = writeln!(
                s,
                "{:<34} {:>6} {:>10.3} {:>6.1}% {:>8} {:>8}",
                k.name,
                k.calls,
                k.total_ms,
                100.0 * k.share,
                o(k.tflops),
                o(k.gbps)
            );
        }
        let _ = writeln!(
            s,
            "{} launches, {:.3} ms of kernel time on {}",
            self.kernels.len(),
            self.kernel_ms(),
            self.device
        );
        s
    }

    /// The Chrome trace-event format: ranges on track 0 (nested by time), kernels on track 1.
    pub fn chrome_trace(&self) -> serde_json::Value {
        let ev = |s: &Span, cat: &str, tid: u32| {
            let mut args = serde_json::Map::new();
            if let Some(f) = s.flops {
                args.insert("flops".into(), f.into());
            }
            if let Some(b) = s.bytes {
                args.insert("bytes".into(), b.into());
            }
            serde_json::json!({
                "name": s.name, "cat": cat, "ph": "X", "pid": 0, "tid": tid,
                "ts": s.start_ms * 1e3, "dur": s.dur_ms * 1e3, "args": args,
            })
        };
        let mut events: Vec<serde_json::Value> = vec![
            serde_json::json!({"name": "thread_name", "ph": "M", "pid": 0, "tid": 0,
                "args": {"name": "ranges"}}),
            serde_json::json!({"name": "thread_name", "ph": "M", "pid": 0, "tid": 1,
                "args": {"name": format!("kernels ({})", self.device)}}),
        ];
        events.extend(self.ranges.iter().map(|r| ev(r, "range", 0)));
        events.extend(self.kernels.iter().map(|k| ev(k, "kernel", 1)));
        serde_json::json!({ "traceEvents": events, "displayTimeUnit": "ms" })
    }

    /// Writes the Chrome trace to `path` (temp file, then rename).
    pub fn write_trace(&self, path: &std::path::Path) -> Result<()> {
        let body = serde_json::to_vec(&self.chrome_trace())
            .map_err(|e| Error::Msg(format!("trace json: {e}")))?;
        crate::fs::write_atomic(path, body)
    }
}

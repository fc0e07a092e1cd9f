//! The server's counters, written as Prometheus text (exposition format 0.0.4) for `/metrics`.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::BatchStats;

/// Upper bounds of the request latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Counts since the server started.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Answers by (route, HTTP status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// `/v1/detect` answers by error kind (`bad_request`, `too_large`, `unsupported_media`,
    /// `bad_media`, `busy`, `timeout`, `internal`).
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// `/v1/detect` latency: counts per `LATENCY_BUCKETS` bucket (the last: above them all).
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_us: AtomicU64,
    /// Images and videos judged, and faces scored in them.
    pub(crate) images: AtomicU64,
    pub(crate) videos: AtomicU64,
    pub(crate) faces: AtomicU64,
    /// `/v1/detect` requests admitted and not yet answered.
    pub(crate) in_flight: AtomicU64,
}

impl Metrics {
    /// Records one answer.
    pub fn record(&self, route: &'static str, status: u16, error: Option<&'static str>) {
        let mut r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *r.entry((route, status)).or_default() += 1;
        drop(r);
        if let Some(kind) = error {
            let mut e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            *e.entry(kind).or_default() += 1;
        }
    }

    /// Records one `/v1/detect` latency.
    pub fn observe(&self, took: Duration) {
        let s = took.as_secs_f64();
        let b = LATENCY_BUCKETS
            .iter()
            .position(|&u| s <= u)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[b].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    /// Answers so far with this route and status.
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        let r = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        r.iter()
            .filter(|((rt, st), _)| *rt == route && *st == status)
            .map(|(_, n)| n)
            .sum()
    }

    /// Errors so far of this kind.
    pub fn errors(&self, kind: &str) -> u64 {
        let e = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        e.iter().filter(|(k, _)| **k == kind).map(|(_, n)| n).sum()
    }

    /// Everything as Prometheus text, the batcher's counters included.
    pub fn render(&self, batch: &BatchStats, resident_bytes: Option<u64>) -> String {
        let mut o = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        o.push_str("# HELP sd2_requests_total HTTP answers by route and status code.\n");
        o.push_str("# TYPE sd2_requests_total counter\n");
        for ((route, code), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                o,
                "sd2_requests_total{{route=\"{route}\",code=\"{code}\"}} {n}"
            );
        }
        o.push_str(
            "# HELP sd2_errors_total /v1/detect requests answered with an error, by kind.\n",
        );
        o.push_str("# TYPE sd2_errors_total counter\n");
        for (kind, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(o, "sd2_errors_total{{kind=\"{kind}\"}} {n}");
        }
        o.push_str(
            "# HELP sd2_request_duration_seconds /v1/detect latency, body read to answer.\n",
        );
        o.push_str("# TYPE sd2_request_duration_seconds histogram\n");
        let mut cum = 0;
        for (i, c) in self.latency.iter().enumerate() {
            cum += get(c);
            let le = LATENCY_BUCKETS
                .get(i)
                .map(|u| u.to_string())
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(
                o,
                "sd2_request_duration_seconds_bucket{{le=\"{le}\"}} {cum}"
            );
        }
        let _ = writeln!(
            o,
            "sd2_request_duration_seconds_sum {}",
            get(&self.latency_sum_us) as f64 / 1e6
        );
        let _ = writeln!(o, "sd2_request_duration_seconds_count {cum}");
        o.push_str("# HELP sd2_batch_size Crops per model call.\n");
        o.push_str("# TYPE sd2_batch_size histogram\n");
        let mut cum = 0;
        for (i, c) in batch.batch_sizes.iter().enumerate() {
            cum += get(c);
            let le = BatchStats::BUCKETS
                .get(i)
                .map(|u| u.to_string())
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(o, "sd2_batch_size_bucket{{le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(o, "sd2_batch_size_sum {}", get(&batch.crops));
        let _ = writeln!(o, "sd2_batch_size_count {}", get(&batch.batches));
        for (name, help, v) in [
            ("sd2_images_total", "Images judged.", get(&self.images)),
            ("sd2_videos_total", "Videos judged.", get(&self.videos)),
            ("sd2_faces_total", "Faces scored.", get(&self.faces)),
        ] {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            o,
            "# HELP sd2_in_flight_requests /v1/detect requests admitted, not yet answered.\n\
             # TYPE sd2_in_flight_requests gauge\nsd2_in_flight_requests {}",
            get(&self.in_flight)
        );
        if let Some(b) = resident_bytes {
            let _ = writeln!(
                o,
                "# HELP process_resident_memory_bytes Resident memory.\n\
                 # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {b}"
            );
        }
        o
    }
}

/// This process's resident memory now (Linux: /proc/self/statm), or None elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counted() {
        let m = Metrics::default();
        m.observe(Duration::from_micros(500));
        m.observe(Duration::from_millis(20));
        m.observe(Duration::from_secs(100));
        m.record("/v1/detect", 200, None);
        m.record("/v1/detect", 422, Some("bad_media"));
        let b = BatchStats::default();
        b.batch_sizes[2].store(3, Ordering::Relaxed);
        b.batches.store(3, Ordering::Relaxed);
        b.crops.store(10, Ordering::Relaxed);
        let t = m.render(&b, Some(4096));
        for line in [
            "sd2_request_duration_seconds_bucket{le=\"0.001\"} 1",
            "sd2_request_duration_seconds_bucket{le=\"0.025\"} 2",
            "sd2_request_duration_seconds_bucket{le=\"30\"} 2",
            "sd2_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "sd2_request_duration_seconds_count 3",
            "sd2_requests_total{route=\"/v1/detect\",code=\"422\"} 1",
            "sd2_errors_total{kind=\"bad_media\"} 1",
            "sd2_batch_size_bucket{le=\"2\"} 0",
            "sd2_batch_size_bucket{le=\"4\"} 3",
            "sd2_batch_size_bucket{le=\"+Inf\"} 3",
            "sd2_batch_size_sum 10",
            "process_resident_memory_bytes 4096",
        ] {
            assert!(t.lines().any(|l| l == line), "missing `{line}` in\n{t}");
        }
        assert_eq!(m.requests("/v1/detect", 200), 1);
        assert_eq!(m.errors("bad_media"), 1);
    }
}

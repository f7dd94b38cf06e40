//! The live summary line of `keel run`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_dataflows::periscope::StreamRow;
use keel_sinks::live::LiveTables;

use keel_api::metrics::EngineStats;

/// What the summary shows at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Events decoded so far.
    pub events: u64,
    /// Records refused so far.
    pub errors: u64,
    /// Sessions open now, over all streams.
    pub open_sessions: u64,
    /// Streams known.
    pub streams: u64,
    /// Of which live.
    pub live_streams: u64,
    /// Nodes known.
    pub nodes: u64,
    /// Resident memory of the process, MiB (where `/proc/self/status` says): every session and
    /// window is kept, so it grows with the input, and the line shows by how much.
    pub resident_mib: Option<u64>,
}

impl Snapshot {
    /// Reads the counters and the live tables.
    pub fn take(stats: &EngineStats, tables: &LiveTables) -> Self {
        let streams = tables.table::<StreamRow>("streams").rows();
        Snapshot {
            events: stats.events.load(Ordering::Relaxed),
            errors: stats.errors.load(Ordering::Relaxed),
            open_sessions: streams.iter().map(|s| s.current_viewers).sum(),
            streams: streams.len() as u64,
            live_streams: streams
                .iter()
                .filter(|s| s.status.as_str() == "live")
                .count() as u64,
            nodes: tables.len("nodes").unwrap_or(0) as u64,
            resident_mib: keel_api::metrics::process_status_kib("VmRSS:").map(|kib| kib / 1024),
        }
    }

    /// The totals, without a rate.
    pub fn totals(&self) -> String {
        let mut totals = format!(
            "{} events | {} open sessions | {} streams ({} live) | {} nodes | {} errors",
            group(self.events),
            group(self.open_sessions),
            group(self.streams),
            group(self.live_streams),
            group(self.nodes),
            group(self.errors),
        );
        if let Some(mib) = self.resident_mib {
            totals.push_str(&format!(" | {} MiB resident", group(mib)));
        }
        totals
    }

    /// One line: rates since `previous`, which was taken `interval` ago.
    pub fn line(&self, previous: &Snapshot, elapsed: Duration, interval: Duration) -> String {
        let rate = (self.events - previous.events) as f64 / interval.as_secs_f64().max(1e-9);
        format!(
            "[{:>5}s] {:>9} events/s | {}",
            elapsed.as_secs(),
            group(rate as u64),
            self.totals()
        )
    }
}

/// `1234567` as `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_rate_totals_and_memory() {
        let before = Snapshot {
            events: 1_000,
            ..Snapshot::default()
        };
        let now = Snapshot {
            events: 3_500,
            errors: 2,
            open_sessions: 1_204,
            streams: 7,
            live_streams: 5,
            nodes: 3,
            resident_mib: Some(1_536),
        };
        let second = Duration::from_secs(1);
        assert_eq!(
            now.line(&before, Duration::from_secs(12), 2 * second),
            "[   12s]     1,250 events/s | 3,500 events | 1,204 open sessions | 7 streams (5 live) \
             | 3 nodes | 2 errors | 1,536 MiB resident"
        );
        let unknown = Snapshot {
            resident_mib: None,
            ..now
        };
        assert!(
            unknown
                .line(&before, second, second)
                .ends_with("| 2 errors")
        );
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_234_567), "1,234,567");
    }
}

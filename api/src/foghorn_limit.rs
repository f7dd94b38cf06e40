//! How many routing decisions one client may have recorded.
//!
//! Every decision Foghorn records is a pending viewer on its node for 30 s and a row of
//! `routing_hourly`, so one client asking in a loop could move every node's score and fill the
//! engine's input. [`ClientLimit`] keeps a token bucket per client address: a client may have
//! `per_second` decisions recorded, with bursts of five seconds' worth; past that it is still
//! answered (a viewer behind a busy NAT must still play), but its decisions are not recorded.
//!
//! - IPv6 clients are counted per /64, the block one subscriber line gets; each address of it
//!   would otherwise be a fresh bucket.
//! - Loopback clients are not limited: a proxy on the same host speaks for everyone behind it,
//!   and the host's own checks are no flood.
//! - At most [`MAX_CLIENTS`] buckets are kept. When they are all taken, those that have
//!   refilled (clients idle for five seconds) are dropped, at most once a second; a new client
//!   that still finds no room is not recorded until there is.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Client buckets kept at once (some 40 bytes each).
pub const MAX_CLIENTS: usize = 100_000;

/// Seconds of the rate a client may use at once.
const BURST_SECONDS: f64 = 5.0;

/// Token buckets of recorded decisions per client address.
#[derive(Debug)]
pub struct ClientLimit {
    per_second: f64,
    burst: f64,
    most: usize,
    state: Mutex<Buckets>,
}

#[derive(Debug)]
struct Buckets {
    /// Tokens left and when they were counted, per client.
    by_client: HashMap<IpAddr, (f64, Instant)>,
    /// When full buckets were last dropped to make room.
    swept: Option<Instant>,
}

impl ClientLimit {
    /// A limit of `per_second` recorded decisions per client (more than 0).
    pub fn new(per_second: f64) -> ClientLimit {
        ClientLimit::with_room(per_second, MAX_CLIENTS)
    }

    /// [`ClientLimit::new`] keeping at most `most` clients' buckets.
    pub fn with_room(per_second: f64, most: usize) -> ClientLimit {
        ClientLimit {
            per_second,
            burst: (per_second * BURST_SECONDS).max(1.0),
            most,
            state: Mutex::new(Buckets {
                by_client: HashMap::new(),
                swept: None,
            }),
        }
    }

    /// Decisions per second a client may have recorded.
    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    /// Takes one decision from `client`'s bucket at `now`; false when it has none left.
    pub fn admit(&self, client: IpAddr, now: Instant) -> bool {
        let client = client.to_canonical();
        if client.is_loopback() {
            return true;
        }
        let key = match client {
            IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            v4 => v4,
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.by_client.len() >= self.most && !state.by_client.contains_key(&key) {
            let due = state
                .swept
                .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
            if !due {
                return false;
            }
            state.swept = Some(now);
            let (per_second, burst) = (self.per_second, self.burst);
            state
                .by_client
                .retain(|_, (tokens, at)| refill(*tokens, *at, now, per_second, burst) < burst);
            if state.by_client.len() >= self.most {
                return false;
            }
        }
        let (tokens, at) = state.by_client.entry(key).or_insert((self.burst, now));
        let left = refill(*tokens, *at, now, self.per_second, self.burst);
        *at = now.max(*at);
        if left >= 1.0 {
            *tokens = left - 1.0;
            true
        } else {
            *tokens = left;
            false
        }
    }

    /// Clients with a bucket now.
    pub fn clients(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_client
            .len()
    }
}

/// `tokens` counted at `at`, refilled at `per_second` until `now`, at most `burst`.
fn refill(tokens: f64, at: Instant, now: Instant, per_second: f64, burst: f64) -> f64 {
    (tokens + now.saturating_duration_since(at).as_secs_f64() * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([203, 0, 113, last])
    }

    #[test]
    fn a_burst_then_the_rate() {
        let limit = ClientLimit::new(2.0);
        let start = Instant::now();
        let admitted = (0..20).filter(|_| limit.admit(v4(1), start)).count();
        assert_eq!(admitted, 10, "five seconds' worth at once");
        assert!(
            limit.admit(v4(2), start),
            "another client has its own bucket"
        );
        let later = start + Duration::from_millis(1500);
        let admitted = (0..20).filter(|_| limit.admit(v4(1), later)).count();
        assert_eq!(admitted, 3, "two a second since");
    }

    #[test]
    fn loopback_is_not_limited_and_ipv6_counts_per_64() {
        let limit = ClientLimit::new(1.0);
        let now = Instant::now();
        for client in ["127.0.0.1", "::1", "::ffff:127.0.0.2"] {
            let client: IpAddr = client.parse().unwrap();
            assert!((0..100).all(|_| limit.admit(client, now)), "{client}");
        }
        assert_eq!(limit.clients(), 0);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let admitted = (0..10)
            .filter(|i| limit.admit(if i % 2 == 0 { a } else { b }, now))
            .count();
        assert_eq!(admitted, 5, "one /64, one bucket");
        assert!(limit.admit(other, now));
        // An IPv4 client written as IPv6 is the same client.
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(
            (0..10).filter(|_| limit.admit(mapped, now)).count()
                + (0..10).filter(|_| limit.admit(v4(7), now)).count(),
            5
        );
    }

    #[test]
    fn buckets_are_bounded_and_idle_ones_make_room() {
        let limit = ClientLimit::with_room(1.0, 4);
        let start = Instant::now();
        for last in 0..4 {
            assert!(limit.admit(v4(last), start));
        }
        assert!(
            !limit.admit(v4(9), start),
            "no room while every bucket is in use"
        );
        assert!(
            !limit.admit(v4(9), start + Duration::from_millis(500)),
            "nothing refilled yet"
        );
        // Five seconds on, the four have refilled: they make room, once a second at most.
        let later = start + Duration::from_secs(6);
        assert!(limit.admit(v4(9), later));
        assert_eq!(limit.clients(), 1);
    }

    proptest! {
        /// Over any run of requests, a client has at most its burst plus the rate times the
        /// time elapsed recorded, and, when it asks no faster than the rate, everything.
        #[test]
        fn never_more_than_the_bucket_allows(
            gaps_ms in prop::collection::vec(0u64..2_000, 1..200),
            per_second in 0.5f64..50.0,
        ) {
            let limit = ClientLimit::new(per_second);
            let start = Instant::now();
            let mut now = start;
            let mut admitted = 0u64;
            for gap in &gaps_ms {
                now += Duration::from_millis(*gap);
                admitted += u64::from(limit.admit(v4(1), now));
                let elapsed = now.duration_since(start).as_secs_f64();
                let most = (per_second * BURST_SECONDS).max(1.0) + per_second * elapsed;
                prop_assert!(admitted as f64 <= most + 1e-9, "{admitted} > {most}");
            }
            let slow = ClientLimit::new(per_second);
            let step = Duration::from_secs_f64(1.0 / per_second);
            let mut at = start;
            for _ in 0..gaps_ms.len() {
                prop_assert!(slow.admit(v4(2), at));
                at += step;
            }
        }
    }
}

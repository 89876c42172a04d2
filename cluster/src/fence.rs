//! When a head must stop serving under a lease it could not renew.
//!
//! A keep-alive sent at `asked` (this head's monotonic clock) and answered with a TTL makes etcd
//! expire the lease no earlier than `asked + ttl`: etcd received the request after it was sent,
//! and counts the TTL from then (a new etcd leader even extends leases). Another head can take a
//! group only once the lease has expired and its key is gone. So a head that stops reporting
//! Optimized before `asked + ttl` never overlaps with the next owner, provided the margin
//! covers what can make "before" late here:
//! - the fence timer firing late (the runtime busy, the process descheduled): tens of
//!   milliseconds on a loaded machine, seconds only under severe overload;
//! - the rates of this clock and etcd's leader's differing: parts per million (a few ms);
//! - commands already accepted finishing at the storage after the fence: milliseconds.
//!
//! A quarter of the TTL (1.25 s of the default 5 s), at least half a second, covers them with
//! room; renewals every third of the TTL give two tries before it falls.

use std::time::Duration;

use tokio::time::Instant;

/// The margin kept before the earliest moment etcd may expire a lease of `ttl`.
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(500))
}

/// When a head must be fenced after a keep-alive (or grant) sent at `asked` was answered with
/// `ttl`: before etcd may expire the lease, by [`margin`].
pub fn fence_at(asked: Instant, ttl: Duration) -> Instant {
    asked + ttl.saturating_sub(margin(ttl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_falls_a_margin_before_the_earliest_expiry() {
        let t0 = Instant::now();
        assert_eq!(fence_at(t0, Duration::from_secs(5)), t0 + Duration::from_millis(3750));
        assert_eq!(fence_at(t0, Duration::from_secs(2)), t0 + Duration::from_millis(1500));
        assert_eq!(fence_at(t0, Duration::from_secs(60)), t0 + Duration::from_secs(45));
        // An expired lease (TTL 0) fences at once.
        assert_eq!(fence_at(t0, Duration::ZERO), t0);
        for s in 2..=60 {
            let ttl = Duration::from_secs(s);
            // Two renewals (every third of the TTL) fit before the fence.
            assert!(ttl - margin(ttl) > 2 * ttl / 3, "{s} s");
        }
    }
}

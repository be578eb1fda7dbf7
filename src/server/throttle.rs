//! Abuse controls in front of authentication and the API: a token bucket per client and per
//! source address, and an exponential back-off after repeated authentication failures.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures tolerated inside [`FAILURE_WINDOW`] before a key is blocked.
const FAILURES_BEFORE_BLOCK: u32 = 5;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
const FIRST_BLOCK: Duration = Duration::from_secs(1);
const LONGEST_BLOCK: Duration = Duration::from_secs(300);
/// Entries kept before stale ones are swept.
const SWEEP_ABOVE: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct FailureRecord {
    window_started: Instant,
    failures: u32,
    blocks: u32,
    blocked_until: Option<Instant>,
}

/// Back-off after authentication failures, keyed by client id and by source address.
#[derive(Debug, Default)]
pub struct FailureBackoff {
    records: Mutex<HashMap<String, FailureRecord>>,
}

impl FailureBackoff {
    /// How long `key` must still wait, if it is blocked.
    pub fn blocked_for(&self, key: &str) -> Option<Duration> {
        let records = self
            .records
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let until = records.get(key)?.blocked_until?;
        until.checked_duration_since(Instant::now())
    }

    /// Counts one failure; past the threshold the key is blocked for 1 s, 2 s, 4 s, … (≤ 5 min).
    pub fn record_failure(&self, key: &str) {
        let now = Instant::now();
        let mut records = self
            .records
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if records.len() > SWEEP_ABOVE {
            records.retain(|_, record| {
                now.duration_since(record.window_started) < FAILURE_WINDOW
                    || record.blocked_until.is_some_and(|until| until > now)
            });
        }
        let record = records.entry(key.to_owned()).or_insert(FailureRecord {
            window_started: now,
            failures: 0,
            blocks: 0,
            blocked_until: None,
        });
        if now.duration_since(record.window_started) > FAILURE_WINDOW {
            // A quiet window forgives: failures restart, and so does the block length once the
            // last block is long over.
            let quiet_since_block = record
                .blocked_until
                .is_none_or(|until| now.saturating_duration_since(until) > FAILURE_WINDOW);
            if quiet_since_block {
                record.blocks = 0;
            }
            record.window_started = now;
            record.failures = 0;
        }
        record.failures += 1;
        if record.failures >= FAILURES_BEFORE_BLOCK {
            let block = FIRST_BLOCK
                .saturating_mul(1u32 << record.blocks.min(16))
                .min(LONGEST_BLOCK);
            record.blocked_until = Some(now + block);
            record.blocks += 1;
            record.failures = 0;
            record.window_started = now;
        }
    }

    /// Forgets the failures of `key` after a success.
    pub fn record_success(&self, key: &str) {
        let mut records = self
            .records
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        records.remove(key);
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// Token buckets: `rate` requests per second with bursts of twice that, per key.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate_per_second: u32) -> Self {
        Self {
            rate: f64::from(rate_per_second.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key`; `Err(wait)` when the bucket is empty.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let capacity = self.rate * 2.0;
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if buckets.len() > SWEEP_ABOVE {
            buckets
                .retain(|_, bucket| now.duration_since(bucket.refilled) < Duration::from_secs(60));
        }
        let bucket = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: capacity,
            refilled: now,
        });
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(capacity);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn five_failures_block_and_success_clears() {
        let backoff = FailureBackoff::default();
        for _ in 0..4 {
            backoff.record_failure("client:a");
        }
        assert!(backoff.blocked_for("client:a").is_none());
        backoff.record_failure("client:a");
        assert!(backoff.blocked_for("client:a").is_some());
        assert!(backoff.blocked_for("client:b").is_none());
        backoff.record_success("client:a");
        assert!(backoff.blocked_for("client:a").is_none());
    }

    #[test]
    fn block_lengths_grow_while_failures_continue() {
        let backoff = FailureBackoff::default();
        for _ in 0..10 {
            backoff.record_failure("address:x");
        }
        let second_block = backoff.blocked_for("address:x").unwrap();
        assert!(
            second_block > Duration::from_millis(1500),
            "{second_block:?}"
        );
    }

    #[test]
    fn buckets_allow_bursts_then_refuse() {
        let limiter = RateLimiter::new(5);
        for _ in 0..10 {
            assert!(limiter.take("k").is_ok());
        }
        assert!(limiter.take("k").is_err());
        assert!(limiter.take("other").is_ok());
    }
}

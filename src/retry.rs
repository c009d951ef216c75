//! How long to wait before trying again after a failure: one rule for every caller (Marketo
//! calls, notifications and Marketo writes that failed, the initial sync's reads).

use std::time::Duration;

/// Exponential backoff with equal jitter: a random delay between half of and all of
/// `base * 2^attempt`, capped at `max`. The certain half keeps retries from coming straight
/// back; the random half spreads records (and replicas) that failed together.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base.saturating_mul(1 << attempt.min(20)).min(max);
    if ceiling.is_zero() {
        return Duration::ZERO;
    }
    rand::random_range(ceiling / 2..=ceiling)
}

/// [`backoff`] in the store's clock unit (milliseconds).
pub fn backoff_ms(attempt: u32, base_ms: i64, max_ms: i64) -> i64 {
    let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
    let wait = backoff(attempt, ms(base_ms), ms(max_ms));
    i64::try_from(wait.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_per_attempt_within_equal_jitter_and_stops_at_the_cap() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for _ in 0..200 {
            for (attempt, ceiling_ms) in [(0, 100), (1, 200), (3, 800), (5, 3_200), (6, 5_000), (40, 5_000)] {
                let wait = backoff(attempt, base, max);
                let ceiling = Duration::from_millis(ceiling_ms);
                assert!(
                    wait >= ceiling / 2 && wait <= ceiling,
                    "attempt {attempt}: {wait:?}"
                );
            }
        }
    }

    #[test]
    fn no_base_means_no_wait() {
        assert_eq!(backoff(3, Duration::ZERO, Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(backoff_ms(3, 0, 1_000), 0);
    }
}

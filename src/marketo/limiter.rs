//! Client-side pacing so Marketo never has to say 606, 615 or 607 because of us (spec §6).
//!
//! - Rate: a sliding log of calls. A call occupies the window from the moment it is sent
//!   until `window` after its answer arrived; the server saw it somewhere in between, so the
//!   server's window can never hold more than `calls` of ours.
//! - Concurrency: a semaphore held until the answer is read.
//! - Daily quota: a counter that resets at 00:00 CST. Marketo says "CST"; we use a fixed
//!   UTC−6 offset and do not follow daylight saving (spec §13 leaves it open), which at worst
//!   resets an hour late in summer.
//!
//! - Throttling: the instance is shared (CRM sync, enrichment tools, forms spend the same
//!   100 calls / 20 s), so Marketo may still say 606/615 when *others* fill it. Then no call
//!   starts until a backoff has passed (a rate window for 606, growing while the answers keep
//!   coming, jittered), and the pace drops to half the calls per window; each window without
//!   throttling gives a tenth of the full pace back (additive increase, multiplicative
//!   decrease, at most once a window).
//!
//! Waiting here is not an error and not an attempt; waits are counted for the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::MarketoError;

struct Slot {
    id: u64,
    /// When the answer arrived; `None` while the call is in flight.
    ended: Option<Instant>,
}

struct Log {
    slots: Vec<Slot>,
    next_id: u64,
}

/// One quota day's use, as kept in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuotaDay {
    /// Days since the epoch, on Marketo's quota clock (UTC−6).
    pub day: i64,
    pub used: u32,
    pub exhausted: bool,
}

struct Daily {
    day: i64,
    used: u32,
    /// Marketo said 607 today: refuse until the reset without asking again.
    exhausted: bool,
}

/// How hard the instance pushed back lately.
struct Pace {
    /// Calls per window allowed now (`1..=calls`).
    calls: usize,
    /// No call starts before this.
    paused_until: Option<Instant>,
    /// Throttle answers in a row (reset by a call that went through).
    consecutive: u32,
    /// When the pace was last lowered or raised.
    changed_at: Instant,
    /// When the pace was last lowered: at most once a window, so the answers of one burst
    /// (several calls, each retried) halve it once, not once each.
    lowered_at: Option<Instant>,
}

pub(crate) struct Limiter {
    calls: usize,
    /// Backoff bounds after a throttle answer (the client's retry delays).
    backoff_base: Duration,
    backoff_max: Duration,
    pace: Mutex<Pace>,
    window: Duration,
    quota: u32,
    concurrency: Arc<Semaphore>,
    log: Mutex<Log>,
    daily: Mutex<Daily>,
    waits: AtomicU64,
    wait_micros: AtomicU64,
}

/// Permission for one call. Dropping it (answer read, or call abandoned) closes its slot.
pub(crate) struct Permit {
    limiter: Arc<Limiter>,
    id: u64,
    _concurrency: OwnedSemaphorePermit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut log = self.limiter.log();
        if let Some(s) = log.slots.iter_mut().find(|s| s.id == self.id) {
            s.ended = Some(now);
        }
    }
}

fn cst_day() -> i64 {
    cst_day_of(time::OffsetDateTime::now_utc())
}

/// Milliseconds in a quota day.
pub const QUOTA_DAY_MS: i64 = 86_400_000;

/// Epoch milliseconds on Marketo's quota clock: a fixed UTC−6 offset (see the module comment).
fn quota_clock_ms(now_ms: i64) -> i64 {
    now_ms - 6 * 3_600_000
}

/// Marketo's quota day (days since the epoch on its clock).
pub(crate) fn cst_day_of(now: time::OffsetDateTime) -> i64 {
    quota_clock_ms(now.unix_timestamp() * 1000).div_euclid(QUOTA_DAY_MS)
}

/// Milliseconds of Marketo's quota day gone at `now_ms` (epoch milliseconds).
pub fn quota_day_elapsed_ms(now_ms: i64) -> i64 {
    quota_clock_ms(now_ms).rem_euclid(QUOTA_DAY_MS)
}

impl Limiter {
    pub fn new(calls: u32, window: Duration, max_concurrent: u32, quota: u32) -> Self {
        Limiter {
            calls: calls.max(1) as usize,
            backoff_base: Duration::from_millis(1000),
            backoff_max: Duration::from_secs(60),
            pace: Mutex::new(Pace {
                calls: calls.max(1) as usize,
                paused_until: None,
                consecutive: 0,
                changed_at: Instant::now(),
                lowered_at: None,
            }),
            window,
            quota,
            concurrency: Arc::new(Semaphore::new(max_concurrent.max(1) as usize)),
            log: Mutex::new(Log {
                slots: Vec::new(),
                next_id: 0,
            }),
            daily: Mutex::new(Daily {
                day: cst_day(),
                used: 0,
                exhausted: false,
            }),
            waits: AtomicU64::new(0),
            wait_micros: AtomicU64::new(0),
        }
    }

    /// Bounds of the backoff after a throttle answer.
    pub fn with_backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max.max(base);
        self
    }

    fn pace(&self) -> MutexGuard<'_, Pace> {
        let mut p = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        // A quiet window gives one call of the pace back.
        let now = Instant::now();
        if p.calls < self.calls && p.consecutive == 0 && now.duration_since(p.changed_at) >= self.window {
            let windows = (now.duration_since(p.changed_at).as_secs_f64()
                / self.window.as_secs_f64().max(1e-6)) as usize;
            // A tenth of the full pace back per quiet window: from half to full in five.
            let step = (self.calls / 10).max(1);
            p.calls = (p.calls + windows.max(1) * step).min(self.calls);
            p.changed_at = now;
            metrics::gauge!("oppsync_marketo_pace_calls").set(p.calls as f64);
        }
        if p.paused_until.is_some_and(|u| u <= now) {
            p.paused_until = None;
        }
        p
    }

    /// Marketo answered a throttle code (606, 615, 604, 608, HTTP 429): pause every caller for
    /// a backoff and halve the pace. Returns the pause.
    pub fn throttled(&self, code: &str) -> Duration {
        let mut p = self.pace();
        let now = Instant::now();
        // 606 means the window is full: wait at least one window. Others start smaller.
        let base = if code == "606" {
            self.window.min(self.backoff_max).max(self.backoff_base)
        } else {
            self.backoff_base
        };
        let ceiling = base
            .saturating_mul(1u32 << p.consecutive.min(10))
            .min(self.backoff_max.max(base));
        let pause = ceiling.mul_f64(rand::random_range(0.5..=1.0));
        // Concurrent calls answered during one pause are one push-back, not several.
        let already_paused = p.paused_until.is_some_and(|u| u > now);
        if !already_paused {
            p.consecutive = p.consecutive.saturating_add(1);
            let lowered_lately = p.lowered_at.is_some_and(|t| now.duration_since(t) < self.window);
            if (code == "606" || code == "615" || code == "http_429") && !lowered_lately {
                p.calls = (p.calls / 2).max(1);
                p.changed_at = now;
                p.lowered_at = Some(now);
            }
        }
        let until = now + pause;
        p.paused_until = Some(p.paused_until.map_or(until, |u| u.max(until)));
        metrics::counter!("oppsync_marketo_throttled_total", "code" => code.to_owned()).increment(1);
        metrics::gauge!("oppsync_marketo_pace_calls").set(p.calls as f64);
        pause
    }

    /// A call went through: the throttle streak is over (the pace recovers window by window).
    pub fn calm(&self) {
        let mut p = self.pace();
        if p.consecutive > 0 {
            p.consecutive = 0;
            p.changed_at = Instant::now();
        }
    }

    /// Calls allowed per window now, and until when every caller waits.
    fn pace_now(&self) -> (usize, Option<Instant>) {
        let p = self.pace();
        (p.calls, p.paused_until)
    }

    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn daily(&self) -> MutexGuard<'_, Daily> {
        let mut d = self.daily.lock().unwrap_or_else(|e| e.into_inner());
        let today = cst_day();
        if d.day != today {
            *d = Daily {
                day: today,
                used: 0,
                exhausted: false,
            };
        }
        d
    }

    fn quota_check(&self) -> Result<(), MarketoError> {
        let exhausted = {
            let d = self.daily();
            d.exhausted || d.used >= self.quota
        };
        if exhausted {
            Err(self.quota_error())
        } else {
            Ok(())
        }
    }

    fn quota_error(&self) -> MarketoError {
        let used = self.daily().used;
        MarketoError::QuotaExhausted {
            message: format!(
                "{used} of {} calls used today; the quota resets at 00:00 CST",
                self.quota
            ),
        }
    }

    /// Waits until a call may be sent. Fails only when today's quota is gone.
    pub async fn acquire(self: &Arc<Self>) -> Result<Permit, MarketoError> {
        self.quota_check()?;
        let started = Instant::now();
        let mut waited = false;
        let concurrency = match self.concurrency.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                waited = true;
                self.concurrency.clone().acquire_owned().await.map_err(|_| {
                    MarketoError::retryable("client_closed", "the Marketo client is shutting down")
                })?
            }
        };
        let id = loop {
            let (pace, paused_until) = self.pace_now();
            let wake_at = {
                let now = Instant::now();
                let mut log = self.log();
                let window = self.window;
                log.slots
                    .retain(|s| s.ended.is_none_or(|e| now.duration_since(e) < window));
                if let Some(until) = paused_until.filter(|u| *u > now) {
                    until
                } else if log.slots.len() < pace {
                    let id = log.next_id;
                    log.next_id += 1;
                    log.slots.push(Slot { id, ended: None });
                    break id;
                } else {
                    // The earliest finished call to leave the window; if every counted call is
                    // still in flight, look again shortly.
                    log.slots
                        .iter()
                        .filter_map(|s| s.ended.map(|e| e + window))
                        .min()
                        .unwrap_or(now + window / 20)
                }
            };
            waited = true;
            tokio::time::sleep_until(tokio::time::Instant::from_std(wake_at)).await;
        };
        let permit = Permit {
            limiter: self.clone(),
            id,
            _concurrency: concurrency,
        };
        let over_quota = {
            let mut d = self.daily();
            let over = d.exhausted || d.used >= self.quota;
            if !over {
                d.used += 1;
                metrics::gauge!("oppsync_marketo_quota_used").set(f64::from(d.used));
            }
            over
        };
        if over_quota {
            drop(permit);
            return Err(self.quota_error());
        }
        if waited {
            let waited_for = started.elapsed();
            self.waits.fetch_add(1, Ordering::Relaxed);
            self.wait_micros
                .fetch_add(waited_for.as_micros() as u64, Ordering::Relaxed);
            metrics::counter!("oppsync_marketo_limiter_waits_total").increment(1);
            // Counters are integers in `metrics`; a gauge that only grows keeps the fractions.
            metrics::gauge!("oppsync_marketo_limiter_wait_seconds_total").increment(waited_for.as_secs_f64());
        }
        Ok(permit)
    }

    /// Calls that could start right now without waiting: a free place in the rate window and a
    /// free concurrency permit. The pusher binds records to a call only when one can go, so
    /// records that would wait for a slot wait in the store instead, where more can join them.
    ///
    /// Places that free up within `ahead` count as free: a caller that needs `ahead` to prepare
    /// its call (read and batch its records) can start preparing before the place frees, and
    /// its call then waits here for the moment it may go.
    pub fn free_calls(&self, ahead: Duration) -> usize {
        let at = Instant::now() + ahead;
        let (pace, paused_until) = self.pace_now();
        if paused_until.is_some_and(|u| u > at) {
            return 0;
        }
        let log = self.log();
        let counted = log
            .slots
            .iter()
            .filter(|s| s.ended.is_none_or(|e| e + self.window > at))
            .count();
        pace.saturating_sub(counted)
            .min(self.concurrency.available_permits())
    }

    /// When the next place in the rate window frees up, if every place is taken by a finished
    /// call (None while one is free, or while only calls in flight hold them).
    pub fn next_free_at(&self) -> Option<Instant> {
        let now = Instant::now();
        let (pace, paused_until) = self.pace_now();
        if let Some(until) = paused_until.filter(|u| *u > now) {
            return Some(until);
        }
        let log = self.log();
        let counted = log
            .slots
            .iter()
            .filter(|s| s.ended.is_none_or(|e| now.duration_since(e) < self.window))
            .count();
        if counted < pace {
            return None;
        }
        log.slots
            .iter()
            .filter_map(|s| s.ended.map(|e| e + self.window))
            .filter(|at| *at > now)
            .min()
    }

    /// Marketo answered 607: stop calling until the reset.
    pub fn mark_exhausted(&self) {
        self.daily().exhausted = true;
    }

    pub fn used_today(&self) -> u32 {
        self.daily().used
    }

    /// Today's quota day, calls used and whether Marketo said 607: what is kept in the store so
    /// that a restart does not start the day's count again from zero.
    pub fn quota_day(&self) -> QuotaDay {
        let d = self.daily();
        QuotaDay {
            day: d.day,
            used: d.used,
            exhausted: d.exhausted,
        }
    }

    /// Takes back a count kept by an earlier process (or replica): the larger count wins, and
    /// only on the same quota day (a new day starts from zero).
    pub fn restore_quota_day(&self, kept: QuotaDay) {
        let mut d = self.daily();
        if kept.day == d.day {
            d.used = d.used.max(kept.used);
            d.exhausted |= kept.exhausted;
            metrics::gauge!("oppsync_marketo_quota_used").set(f64::from(d.used));
        }
    }

    pub fn quota(&self) -> u32 {
        self.quota
    }

    pub fn quota_left(&self) -> u32 {
        let d = self.daily();
        if d.exhausted {
            0
        } else {
            self.quota.saturating_sub(d.used)
        }
    }

    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    pub fn wait_seconds(&self) -> f64 {
        self.wait_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn a_throttle_answer_pauses_every_call_and_halves_the_pace_once_a_window() {
        let window = Duration::from_millis(300);
        let limiter = Arc::new(
            Limiter::new(10, window, 10, 1000)
                .with_backoff(Duration::from_millis(100), Duration::from_millis(200)),
        );
        assert_eq!(limiter.free_calls(Duration::ZERO), 10);
        let pause = limiter.throttled("606");
        assert!(
            pause >= Duration::from_millis(50) && pause <= Duration::from_millis(300),
            "{pause:?}"
        );
        assert_eq!(limiter.free_calls(Duration::ZERO), 0, "paused: nothing may start");
        assert!(limiter.next_free_at().is_some());
        // More answers of the same burst: the pace is halved once, not once each.
        limiter.throttled("606");
        limiter.throttled("615");
        assert_eq!(limiter.pace_now().0, 5);
        // The next call waits out the pause.
        let t = Instant::now();
        drop(limiter.acquire().await.unwrap());
        assert!(
            t.elapsed() >= pause.saturating_sub(Duration::from_millis(20)),
            "{:?}",
            t.elapsed()
        );
        limiter.calm();
        // A quiet window gives a tenth of the full pace back.
        tokio::time::sleep(window + Duration::from_millis(20)).await;
        assert!(limiter.pace_now().0 >= 6, "{}", limiter.pace_now().0);
    }

    #[tokio::test]
    async fn free_calls_count_the_places_that_free_up_in_time() {
        let window = Duration::from_millis(400);
        let limiter = Arc::new(Limiter::new(2, window, 5, 1000));
        assert_eq!(limiter.free_calls(Duration::ZERO), 2);
        assert_eq!(limiter.next_free_at(), None);
        let a = limiter.acquire().await.unwrap();
        let b = limiter.acquire().await.unwrap();
        // In flight: their places are taken until an answer plus a window, whatever `ahead`.
        assert_eq!(limiter.free_calls(window * 10), 0);
        assert_eq!(limiter.next_free_at(), None);
        drop((a, b));
        let answered = Instant::now();
        assert_eq!(limiter.free_calls(Duration::ZERO), 0);
        assert_eq!(
            limiter.free_calls(window * 2),
            2,
            "both free up within two windows"
        );
        let next = limiter.next_free_at().unwrap();
        assert!(next > answered && next <= answered + window, "{next:?}");
        // A call prepared ahead of time waits here for its place.
        let c = limiter.acquire().await.unwrap();
        assert!(answered.elapsed() >= window - Duration::from_millis(5));
        drop(c);
    }
}

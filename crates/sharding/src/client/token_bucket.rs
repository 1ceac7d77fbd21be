//! A token bucket with reservations: `qps` tokens per second refill a bucket of `burst`
//! tokens; each request takes one.
//!
//! Why not `tower::limit::RateLimit`: it is a fixed window (`n` requests per period, then
//! wait for the next period), so it has no notion of burst and lets a full window through
//! at once at every period boundary. Why not `governor`: it is a fine GCRA implementation,
//! but we need about forty lines of behaviour (client-go's `flowcontrol` semantics: wait,
//! never reject) and one more dependency tree for every binary is not worth it.
//!
//! Waiters *reserve* a token (the balance may go negative) and then sleep until the instant
//! their token exists, like Go's `rate.Limiter.Wait`. That makes the limiter fair (first
//! come, first served) without a queue, and cheap: one short mutex section per request.
//!
//! A reservation that is never used (its waiter was cancelled: the Lease fencing the
//! request was lost, a controller was stopped) gives its token back, like Go's
//! `Reservation.Cancel`; otherwise every abandoned waiter would leave the bucket in debt and
//! delay the requests that come after it for nothing.
//!
//! An *adaptive* bucket ([`TokenBucket::adaptive`]) moves its rate between a floor and a
//! ceiling by AIMD, from what the API server's answers say: every answer to a request
//! that had to wait for its token (the client's limit, not the server, was what bound) and
//! that came back neither throttled nor slow adds [`INCREASE_PER_ANSWER`] tokens per
//! second; a `429` or a slow write halves the rate, at most once per
//! [`DECREASE_INTERVAL`] (one overload shows in many answers at once), never below the
//! floor. So the budget follows what the API server absorbs instead of a fixed figure,
//! and never drops below what a fixed bucket would have allowed.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Tokens per second an adaptive bucket adds per answer that shows room to grow.
pub const INCREASE_PER_ANSWER: f64 = 0.25;
/// An adaptive bucket's rate is multiplied by this on a sign of overload.
pub const DECREASE_FACTOR: f64 = 0.5;
/// At most one decrease per this interval.
pub const DECREASE_INTERVAL: Duration = Duration::from_secs(1);

/// What the API server's answer to one request says about its load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answered in time, after the request had waited for its token: room to grow.
    FastAfterWait,
    /// Answered in time without waiting: the limit did not bind, nothing to learn.
    Fast,
    /// Throttled (`429`) or slow: the server is overloaded.
    Overloaded,
}

/// The bounds of an adaptive rate and when it last decreased.
#[derive(Debug)]
struct Adaptation {
    floor: f64,
    ceiling: f64,
    last_decrease: Option<Instant>,
}

/// A shared, clonable token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    inner: Arc<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens per second; `f64::INFINITY` disables limiting.
    rate: f64,
    burst: f64,
    /// Tokens available at `last`; negative when reserved ahead.
    tokens: f64,
    last: Instant,
    /// Set for an adaptive bucket.
    adaptation: Option<Adaptation>,
}

impl Bucket {
    /// Takes one token and returns how long the caller must wait until it exists.
    fn reserve(&mut self, now: Instant) -> Duration {
        if !self.rate.is_finite() {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Gives back a reserved token that was not used.
    fn refund(&mut self) {
        if self.rate.is_finite() {
            self.tokens = (self.tokens + 1.0).min(self.burst);
        }
    }

    /// Adapts the rate to `answer` (adaptive buckets only). The tokens accrued so far are
    /// settled at the old rate first.
    fn adapt(&mut self, answer: Answer, now: Instant) {
        let Some(adaptation) = &mut self.adaptation else {
            return;
        };
        let rate = match answer {
            Answer::Fast => return,
            Answer::FastAfterWait => (self.rate + INCREASE_PER_ANSWER).min(adaptation.ceiling),
            Answer::Overloaded => {
                if adaptation
                    .last_decrease
                    .is_some_and(|at| now.saturating_duration_since(at) < DECREASE_INTERVAL)
                {
                    return;
                }
                adaptation.last_decrease = Some(now);
                (self.rate * DECREASE_FACTOR).max(adaptation.floor)
            }
        };
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        self.rate = rate;
    }
}

impl TokenBucket {
    /// A bucket refilled with `qps` tokens per second, holding at most `burst` (at least 1).
    /// A non-positive or non-finite `qps` disables limiting.
    pub fn new(qps: f32, burst: u32) -> Self {
        let rate = if qps.is_finite() && qps > 0.0 {
            f64::from(qps)
        } else {
            f64::INFINITY
        };
        let burst = f64::from(burst.max(1));
        Self {
            inner: Arc::new(Mutex::new(Bucket {
                rate,
                burst,
                tokens: burst,
                last: Instant::now(),
                adaptation: None,
            })),
        }
    }

    /// A bucket that starts at `qps` tokens per second and adapts its rate between `qps`
    /// and `max_qps` to the API server's answers (see the module docs). A `max_qps` not
    /// above a positive, finite `qps` gives a fixed bucket, like [`new`](Self::new).
    pub fn adaptive(qps: f32, max_qps: f32, burst: u32) -> Self {
        let bucket = Self::new(qps, burst);
        if qps.is_finite() && qps > 0.0 && max_qps.is_finite() && max_qps > qps {
            bucket.lock().adaptation = Some(Adaptation {
                floor: f64::from(qps),
                ceiling: f64::from(max_qps),
                last_decrease: None,
            });
        }
        bucket
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // A poisoned lock only means another thread panicked mid-update of a few floats;
        // the state is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current rate (tokens per second; infinite without a limit).
    pub fn rate(&self) -> f64 {
        self.lock().rate
    }

    /// Tells an adaptive bucket what an answer said about the server's load (a fixed bucket
    /// ignores it).
    pub fn observe(&self, answer: Answer) {
        self.lock().adapt(answer, Instant::now());
    }

    /// Reserves one token and returns the wait until it may be used.
    pub fn reserve(&self) -> Duration {
        self.lock().reserve(Instant::now())
    }

    /// Waits until a token is available and takes it.
    pub async fn acquire(&self) {
        self.reservation().ready().await.consume();
    }

    /// Reserves one token. Wait for it with [`Reservation::ready`], then either
    /// [`Reservation::consume`] it (the request is sent) or drop it (the token is refunded).
    pub fn reservation(&self) -> Reservation {
        let wait = self.reserve();
        Reservation {
            bucket: self.clone(),
            at: Instant::now() + wait,
            waits: !wait.is_zero(),
            used: false,
        }
    }

    fn refund(&self) {
        self.lock().refund();
    }
}

/// One reserved token. Dropped unused (also while waiting), it goes back to the bucket.
#[derive(Debug)]
#[must_use = "a reservation dropped unused is refunded at once"]
pub struct Reservation {
    bucket: TokenBucket,
    at: Instant,
    /// Whether the token did not exist yet when it was reserved.
    waits: bool,
    used: bool,
}

impl Reservation {
    /// Whether the request had to wait for its token: the limit was binding.
    pub fn waited(&self) -> bool {
        self.waits
    }

    /// Waits until the reserved token exists.
    pub async fn ready(self) -> Self {
        tokio::time::sleep_until(self.at).await;
        self
    }

    /// Uses the token: it is not refunded.
    pub fn consume(mut self) {
        self.used = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.used {
            self.bucket.refund();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_steady_rate() {
        let bucket = TokenBucket::new(10.0, 5);
        for _ in 0..5 {
            assert_eq!(bucket.reserve(), Duration::ZERO, "the burst is free");
        }
        // The next tokens are reserved 100 ms apart.
        let waits: Vec<u128> = (0..3).map(|_| bucket.reserve().as_millis()).collect();
        assert_eq!(waits, [100, 200, 300]);
        tokio::time::advance(Duration::from_secs(10)).await;
        // After a long pause the bucket is full again, but never more than `burst`.
        for _ in 0..5 {
            assert_eq!(bucket.reserve(), Duration::ZERO);
        }
        assert_eq!(bucket.reserve().as_millis(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_paces_requests() {
        let bucket = TokenBucket::new(50.0, 1);
        let start = Instant::now();
        for _ in 0..11 {
            bucket.acquire().await;
        }
        // One free token, then ten at 20 ms each.
        assert_eq!(start.elapsed().as_millis(), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_gives_its_token_back() {
        let bucket = TokenBucket::new(1.0, 1);
        bucket.acquire().await;
        // Ten waiters queue up behind an empty bucket and are cancelled (a stop, a lost
        // Lease) before their tokens exist.
        for _ in 0..10 {
            let waiter = bucket.acquire();
            let cancelled = tokio::time::timeout(Duration::from_millis(10), waiter).await;
            assert!(cancelled.is_err());
        }
        // 100 ms later the next request waits for the rest of one token, not for eleven.
        assert_eq!(bucket.reserve(), Duration::from_millis(900));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_dropped_after_its_wait_is_refunded_too() {
        let bucket = TokenBucket::new(1.0, 2);
        let unused = bucket.reservation().ready().await;
        drop(unused);
        bucket.reservation().ready().await.consume();
        assert_eq!(
            bucket.reserve(),
            Duration::ZERO,
            "one token of the burst left"
        );
        assert_eq!(bucket.reserve(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_adaptive_rate_grows_while_the_limit_binds_and_halves_on_overload() {
        let bucket = TokenBucket::adaptive(100.0, 200.0, 1);
        bucket.observe(Answer::Fast);
        assert_eq!(bucket.rate(), 100.0, "no wait: nothing learnt");
        for _ in 0..200 {
            bucket.observe(Answer::FastAfterWait);
        }
        assert_eq!(bucket.rate(), 150.0);
        for _ in 0..1000 {
            bucket.observe(Answer::FastAfterWait);
        }
        assert_eq!(bucket.rate(), 200.0, "never above the ceiling");
        bucket.observe(Answer::Overloaded);
        assert_eq!(bucket.rate(), 100.0);
        bucket.observe(Answer::FastAfterWait);
        bucket.observe(Answer::Overloaded);
        assert_eq!(bucket.rate(), 100.25, "one decrease per interval");
        tokio::time::advance(DECREASE_INTERVAL).await;
        bucket.observe(Answer::Overloaded);
        assert_eq!(bucket.rate(), 100.0, "never below the floor");
    }

    #[tokio::test(start_paused = true)]
    async fn a_raised_rate_paces_the_next_tokens() {
        let bucket = TokenBucket::adaptive(10.0, 40.0, 1);
        let burst = bucket.reservation();
        assert!(!burst.waited(), "the burst");
        burst.consume();
        let waiting = bucket.reservation();
        assert!(waiting.waited());
        waiting.consume();
        for _ in 0..120 {
            bucket.observe(Answer::FastAfterWait);
        }
        assert_eq!(bucket.rate(), 40.0);
        // Two tokens in debt now: 50 ms at the new rate (200 ms at the old one).
        assert_eq!(bucket.reserve(), Duration::from_millis(50));
    }

    #[test]
    fn a_fixed_bucket_ignores_answers() {
        for bucket in [
            TokenBucket::new(10.0, 1),
            TokenBucket::adaptive(10.0, 10.0, 1),
            TokenBucket::adaptive(0.0, 100.0, 1),
        ] {
            let before = bucket.rate();
            bucket.observe(Answer::FastAfterWait);
            bucket.observe(Answer::Overloaded);
            assert_eq!(bucket.rate(), before);
        }
    }

    #[test]
    fn zero_qps_disables_limiting() {
        let bucket = TokenBucket::new(0.0, 1);
        for _ in 0..1000 {
            assert_eq!(bucket.reserve(), Duration::ZERO);
        }
    }
}

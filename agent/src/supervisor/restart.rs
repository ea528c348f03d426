//! Restart policy: whether a service that exited on its own starts again, and
//! after how long. Pure, so the series can be checked exactly.

use std::time::Duration;

use proto::ExitKind;

use crate::config::{RestartMode, RestartPolicy};

/// Whether an exit the agent did not ask for calls for a restart.
pub fn should_restart(mode: RestartMode, exit: ExitKind) -> bool {
    match mode {
        RestartMode::Never => false,
        RestartMode::Always => true,
        RestartMode::OnFailure => exit != ExitKind::Clean,
    }
}

/// Delay before restart number `attempt` (1-based) of a run of consecutive
/// failures: `backoff * 2^(attempt-1)`, capped at `backoff_max`, then up to
/// 20 % shorter by `jitter` in [0, 1) so restarts across hosts spread out
/// without ever exceeding the cap.
pub fn delay(policy: &RestartPolicy, attempt: u32, jitter: f64) -> Duration {
    let doubling = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
    let base = policy.backoff.saturating_mul(doubling).min(policy.backoff_max);
    base.mul_f64(1.0 - 0.2 * jitter.clamp(0.0, 1.0))
}

/// The count of consecutive failed runs after a run that lasted `ran` and
/// did (or did not) get a model to READY: a healthy run starts a new count,
/// so a long load that finally crashes is a first failure, not a crash loop.
pub fn failures_after(previous: u32, reached_ready: bool, ran: Duration, stable_after: Duration) -> u32 {
    if reached_ready || ran >= stable_after { 1 } else { previous.saturating_add(1) }
}

/// A fresh random number in [0, 1) without a random-number crate.
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            backoff: Duration::from_millis(200),
            backoff_max: Duration::from_millis(1000),
            stable_after: Duration::from_secs(60),
        }
    }

    #[test]
    fn the_series_doubles_and_is_capped() {
        let ms = |attempt, j| delay(&policy(), attempt, j).as_millis();
        let without_jitter: Vec<u128> = (1..=7).map(|a| ms(a, 0.0)).collect();
        assert_eq!(without_jitter, [200, 400, 800, 1000, 1000, 1000, 1000]);
        // Jitter only ever shortens, by at most a fifth.
        assert_eq!(ms(1, 0.999_999), 160);
        assert_eq!(ms(9, 0.5), 900);
        assert_eq!(ms(u32::MAX, 0.0), 1000);
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[test]
    fn a_stable_run_resets_the_count() {
        let s = Duration::from_secs;
        let stable = s(60);
        assert_eq!(failures_after(0, false, s(1), stable), 1);
        assert_eq!(failures_after(3, false, s(1), stable), 4, "quick crashes count up");
        assert_eq!(failures_after(3, false, s(3600), stable), 1, "an hour-long load is not a crash loop");
        assert_eq!(failures_after(3, true, s(5), stable), 1, "a run that served is not a crash loop");
    }

    #[test]
    fn which_exits_restart() {
        use ExitKind::*;
        let table = [
            (RestartMode::Never, Crashed, false),
            (RestartMode::OnFailure, Crashed, true),
            (RestartMode::OnFailure, OomKilled, true),
            (RestartMode::OnFailure, Clean, false),
            (RestartMode::Always, Clean, true),
        ];
        for (mode, exit, want) in table {
            assert_eq!(should_restart(mode, exit), want, "{mode:?} {exit:?}");
        }
    }
}

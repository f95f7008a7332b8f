//! Outbound webhooks: Standard Webhooks signing, the event payloads, one HTTP attempt,
//! and the retry schedule. What to send and when lives in the controller, whose status
//! records every attempt.

mod circuit;
mod circuits;
mod payload;
mod sender;
mod signing;

pub use circuit::{Admission, Circuit, CircuitConfig, Transition};
pub use circuits::{Blocked, CircuitCounts, Circuits, MEMORY_ONLY, Permit};
pub use payload::{EventPayload, group_event, image_event};
pub use sender::{AttemptOutcome, EndpointOptions, Sender, SenderConfig};
pub use signing::{SigningError, generate_secret, sign};

use std::time::Duration;

/// Waits before each retry: the first attempt is immediate, then the schedule in order.
/// Default: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetrySchedule(pub Vec<Duration>);

impl Default for RetrySchedule {
    fn default() -> Self {
        let s = Duration::from_secs;
        Self(vec![
            s(5),
            s(300),
            s(1800),
            s(7200),
            s(18000),
            s(36000),
            s(36000),
        ])
    }
}

impl RetrySchedule {
    /// Parses a comma-separated list of durations like `1s,5s,1m,2h`.
    pub fn parse(text: &str) -> Result<Self, String> {
        text.split(',')
            .map(|part| parse_duration(part.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    /// The wait after `attempts` failed attempts, or None when retries are exhausted.
    /// A jitter of up to ±20% spreads retries of many events to one endpoint.
    pub fn next_delay(&self, attempts: u32) -> Option<Duration> {
        let index = usize::try_from(attempts).ok()?.checked_sub(1)?;
        let base = *self.0.get(index)?;
        let jitter: f64 = rand::random_range(0.8..1.2);
        Some(base.mul_f64(jitter))
    }
}

/// `250ms`, `5s`, `5m`, `2h`, `1d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}"))?;
    let unit_secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "invalid duration unit in {text:?} (use ms, s, m, h or d)"
            ));
        }
    };
    n.checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_parses_and_ends() {
        let s = RetrySchedule::parse("1s, 2m,3h").expect("valid schedule");
        assert_eq!(
            s.0,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(120),
                Duration::from_secs(10800)
            ]
        );
        let first = s.next_delay(1).expect("a retry is left");
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
        assert!(s.next_delay(4).is_none());
        assert!(s.next_delay(0).is_none());
        assert!(RetrySchedule::parse("5x").is_err());
        assert!(RetrySchedule::parse("").is_err());
    }

    #[test]
    fn durations_too_long_to_count_are_errors_not_wraps() {
        // 400000000000000000 minutes overflow u64 seconds: an error, not a panic or a
        // wrapped (short) wait.
        let error = parse_duration("400000000000000000m").expect_err("too long");
        assert!(error.contains("too long"), "{error}");
        assert!(RetrySchedule::parse("5s,400000000000000000d").is_err());
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
    }
}

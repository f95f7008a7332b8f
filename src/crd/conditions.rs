//! Kubernetes-style status conditions (`type/status/reason/message/lastTransitionTime/
//! observedGeneration`). `lastTransitionTime` moves only when the status flips, so
//! clients can tell how long something has been true.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// Sets (or adds) the condition `type_`; returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: jiff::Timestamp,
) -> bool {
    let message = message.into();
    let status = status.as_str();
    if let Some(existing) = conditions.iter_mut().find(|c| c.type_ == type_) {
        let changed = existing.status != status
            || existing.reason != reason
            || existing.message != message
            || existing.observed_generation != generation;
        if existing.status != status {
            existing.last_transition_time = Time(now);
        }
        existing.status = status.to_owned();
        existing.reason = reason.to_owned();
        existing.message = message;
        existing.observed_generation = generation;
        return changed;
    }
    conditions.push(Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time: Time(now),
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(secs).expect("valid timestamp")
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            "Completed",
            ConditionStatus::False,
            "Running",
            "1/2",
            Some(1),
            at(10)
        ));
        assert!(set_condition(
            &mut conds,
            "Completed",
            ConditionStatus::False,
            "Running",
            "2/2",
            Some(1),
            at(20)
        ));
        assert_eq!(conds[0].last_transition_time, Time(at(10)));
        assert!(set_condition(
            &mut conds,
            "Completed",
            ConditionStatus::True,
            "Done",
            "ok",
            Some(1),
            at(30)
        ));
        assert_eq!(conds[0].last_transition_time, Time(at(30)));
        assert_eq!(conds[0].status, "True");
        assert!(!set_condition(
            &mut conds,
            "Completed",
            ConditionStatus::True,
            "Done",
            "ok",
            Some(1),
            at(40)
        ));
        assert_eq!(conds.len(), 1);
    }
}

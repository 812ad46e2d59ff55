//! Which step a failed run failed at: the basis of its incident (see `docs/architecture.md`, run lifecycle).

use std::sync::Arc;

use runguard_contract::{Signature, StepCall, StepError};

/// Follows a run's step calls and remembers the failing step: the latest `post` that reported an error,
/// else the latest step. `pre` and `post` fields of one index are merged (the `post` wins).
/// Shared (`Arc`): every live run carries one, a host copies it with the run at every step
/// ([`Run::after`](crate::Run::after)), and most runs never see a failing step.
#[derive(Clone, Debug, Default)]
pub(crate) struct FailureTracker {
    current: Option<Arc<StepFields>>,
    failing: Option<Arc<(StepFields, StepError)>>,
}

#[derive(Clone, Debug, Default)]
struct StepFields {
    index: u64,
    skill: Option<String>,
    api_endpoint: Option<String>,
    input_keys: Vec<String>,
}

fn has_no_fields(call: &StepCall) -> bool {
    call.skill.is_none() && call.api_endpoint.is_none() && call.input_keys.is_empty()
}

/// What the tracker keeps of one step call (its texts are not needed); cheap to copy.
#[derive(Clone, Debug)]
pub(crate) struct Observation {
    fields: Arc<StepFields>,
    error: Option<StepError>,
}

impl Observation {
    pub(crate) fn of(call: &StepCall) -> Self {
        Self {
            fields: Arc::new(StepFields {
                index: call.index,
                skill: call.skill.clone(),
                api_endpoint: call.api_endpoint.clone(),
                input_keys: call.input_keys.clone(),
            }),
            error: call.error.clone(),
        }
    }
}

impl FailureTracker {
    /// What recording `call` will need. A call that repeats the tracked step's fields, or has none (a
    /// `post` after its `pre`, usually), shares them rather than copying its strings on the hot path.
    pub(crate) fn observation(&self, call: &StepCall) -> Observation {
        let fields = match &self.current {
            Some(current)
                if current.index == call.index
                    && (has_no_fields(call)
                        || (current.skill == call.skill
                            && current.api_endpoint == call.api_endpoint
                            && current.input_keys == call.input_keys)) =>
            {
                Arc::clone(current)
            }
            _ => return Observation::of(call),
        };
        Observation { fields, error: call.error.clone() }
    }

    /// Observes an accepted step call.
    #[cfg(test)]
    pub(crate) fn observe(&mut self, call: &StepCall) {
        self.record(Observation::of(call));
    }

    /// Records an accepted step call.
    pub(crate) fn record(&mut self, observation: Observation) {
        let Observation { fields: call, error } = observation;
        let fields = match self.current.take() {
            Some(current) if Arc::ptr_eq(&current, &call) => current,
            Some(current) if current.index == call.index => {
                if call.skill.is_none() && call.api_endpoint.is_none() && call.input_keys.is_empty() {
                    current
                } else {
                    let mut merged = StepFields::clone(&current);
                    if call.skill.is_some() {
                        merged.skill.clone_from(&call.skill);
                    }
                    if call.api_endpoint.is_some() {
                        merged.api_endpoint.clone_from(&call.api_endpoint);
                    }
                    if !call.input_keys.is_empty() {
                        merged.input_keys.clone_from(&call.input_keys);
                    }
                    Arc::new(merged)
                }
            }
            _ => call,
        };
        if let Some(error) = error {
            self.failing = Some(Arc::new((StepFields::clone(&fields), error)));
        }
        self.current = Some(fields);
    }

    /// The signature and error of the failing step; `end_error` (from the run-end call) fills in when no
    /// step reported one.
    pub(crate) fn incident_basis(&self, end_error: Option<&StepError>) -> (Signature, StepError) {
        let current = self.current.as_deref();
        let (fields, error) = match (self.failing.as_deref(), end_error) {
            (Some((fields, error)), _) => (Some(fields), error.clone()),
            (None, Some(error)) => (current, error.clone()),
            (None, None) => (current, StepError { error_type: Some("unknown".into()), ..StepError::default() }),
        };
        let signature = match fields {
            Some(f) => Signature::normalize(f.skill.as_deref(), f.api_endpoint.as_deref(), &f.input_keys),
            None => Signature::normalize(None, None, &[]),
        };
        (signature, error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::Phase;

    #[test]
    fn the_latest_erroring_post_is_the_failing_step() {
        let mut tracker = FailureTracker::default();
        tracker.observe(&StepCall {
            skill: Some("fetch".into()),
            api_endpoint: Some("/a/1".into()),
            ..StepCall::new(0, Phase::Pre)
        });
        tracker.observe(&StepCall {
            error: Some(StepError { error_type: Some("Timeout".into()), ..StepError::default() }),
            ..StepCall::new(0, Phase::Post)
        });
        tracker.observe(&StepCall { skill: Some("write".into()), ..StepCall::new(1, Phase::Post) });
        let (signature, error) = tracker.incident_basis(None);
        assert_eq!((signature.skill.as_str(), signature.api_endpoint.as_str()), ("fetch", "/a/{id}"));
        assert_eq!(error.error_type.as_deref(), Some("Timeout"));
    }

    #[test]
    fn a_post_repeating_its_pre_shares_the_tracked_fields() {
        let pre = StepCall {
            skill: Some("fetch".into()),
            api_endpoint: Some("/a/1".into()),
            input_keys: vec!["id".into()],
            ..StepCall::new(0, Phase::Pre)
        };
        let mut tracker = FailureTracker::default();
        tracker.record(tracker.observation(&pre));
        let error = StepError { error_type: Some("Timeout".into()), ..StepError::default() };
        for post in [
            StepCall { error: Some(error.clone()), ..StepCall::new(0, Phase::Post) },
            StepCall { error: Some(error.clone()), index: 0, phase: Phase::Post, ..pre.clone() },
        ] {
            let mut shared = tracker.clone();
            let observation = shared.observation(&post);
            assert!(shared.current.as_ref().is_some_and(|current| Arc::ptr_eq(current, &observation.fields)));
            shared.record(observation);
            let mut copied = tracker.clone();
            copied.observe(&post);
            assert_eq!(format!("{:?}", shared.incident_basis(None)), format!("{:?}", copied.incident_basis(None)));
        }
        let next = StepCall { index: 1, ..pre };
        assert!(!Arc::ptr_eq(tracker.current.as_ref().unwrap(), &tracker.observation(&next).fields));
    }

    #[test]
    fn without_an_erroring_step_the_last_step_and_end_error_are_used() {
        let mut tracker = FailureTracker::default();
        tracker.observe(&StepCall { skill: Some("write".into()), ..StepCall::new(0, Phase::Post) });
        let end = StepError { error_type: Some("crash".into()), ..StepError::default() };
        let (signature, error) = tracker.incident_basis(Some(&end));
        assert_eq!((signature.skill.as_str(), error.error_type.as_deref()), ("write", Some("crash")));
        assert_eq!(FailureTracker::default().incident_basis(None).1.error_type.as_deref(), Some("unknown"));
    }
}

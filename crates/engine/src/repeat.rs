//! Loop detection (`docs/evaluation.md`, "Repeat rules"): the call and error keys of a run's latest steps, and the repeat check.
//!
//! A run keeps only the keys of the steps its widest repeat rule can still look at (a ring of at most
//! `window + 1` steps) and only as 32-byte digests, never texts. The keys are computed from the step
//! calls themselves, so [`Run::rehydrate`](crate::Run::rehydrate) rebuilds the ring from the ledger's
//! calls exactly as the live run built it.

use std::collections::VecDeque;

use runguard_contract::{ErrorClass, Signature, StepCall, StepError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The SHA-256 of a key's parts.
pub(crate) type KeyHash = [u8; 32];

/// The keys of one step: its call key (from its first accepted call), its normalised skill (for the error
/// key of a `post` that names none) and, once its `post` reported an error, its error key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StepKeys {
    /// The step index.
    pub(crate) index: u64,
    /// The call key.
    pub(crate) call: KeyHash,
    /// The normalised skill of the step's first call.
    pub(crate) skill: String,
    /// The error key of its `post`, if that reported an error.
    pub(crate) error: Option<KeyHash>,
}

/// Hashes one optional field: a tag, whether it is present, and its length before its bytes, so that
/// distinct values cannot collide by shifting bytes between fields.
pub(crate) fn field(hasher: &mut Sha256, tag: u8, bytes: Option<&[u8]>) {
    match bytes {
        None => hasher.update([tag, 0]),
        Some(bytes) => {
            hasher.update([tag, 1]);
            hasher.update(u64::try_from(bytes.len()).unwrap_or(u64::MAX).to_be_bytes());
            hasher.update(bytes);
        }
    }
}

/// The call key: (normalised skill, normalised endpoint, sorted distinct input keys, SHA-256 of the input
/// text or null), normalised as the request signature is. Fields are tagged and length-prefixed, so no
/// two distinct keys feed the same bytes.
fn call_key(signature: &Signature, input_text: Option<&str>) -> KeyHash {
    let mut h = Sha256::new();
    h.update(b"runguard/repeat-call-key/v1\0");
    field(&mut h, 1, Some(signature.skill.as_bytes()));
    field(&mut h, 2, Some(signature.api_endpoint.as_bytes()));
    h.update(u64::try_from(signature.input_keys.len()).unwrap_or(u64::MAX).to_be_bytes());
    for key in &signature.input_keys {
        field(&mut h, 3, Some(key.as_bytes()));
    }
    let text_hash: Option<KeyHash> = input_text.map(|text| Sha256::digest(text.as_bytes()).into());
    field(&mut h, 4, text_hash.as_ref().map(|h| h.as_slice()));
    h.finalize().into()
}

/// The error key: (normalised skill, lower-cased error type, upper-cased error code).
fn error_key(skill: &str, error: &StepError) -> KeyHash {
    let class = ErrorClass::of(error);
    let mut h = Sha256::new();
    h.update(b"runguard/repeat-error-key/v1\0");
    field(&mut h, 1, Some(skill.as_bytes()));
    field(&mut h, 2, Some(class.error_type.as_bytes()));
    field(&mut h, 3, class.code.as_deref().map(str::as_bytes));
    h.finalize().into()
}

/// The keys of a run's latest steps, oldest first, at most `window + 1` of them (the widest rule of the
/// run's snapshot looks back `window` steps from the current one). Empty, and never touched, for a run
/// whose snapshot has no repeat rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RepeatHistory {
    steps: VecDeque<StepKeys>,
}

impl RepeatHistory {
    pub(crate) fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The keys `call` gives its step, read against the history before the call is recorded. A call of a
    /// step already in the history (a `post` after its `pre`) keeps that step's call key and skill: the
    /// call key is taken from a step's first call.
    pub(crate) fn keys_of(&self, call: &StepCall) -> StepKeys {
        let (call_key, skill) = match self.steps.back().filter(|s| s.index == call.index) {
            Some(known) => (known.call, known.skill.clone()),
            None => {
                let signature =
                    Signature::normalize(call.skill.as_deref(), call.api_endpoint.as_deref(), &call.input_keys);
                (call_key(&signature, call.input_text.as_deref()), signature.skill)
            }
        };
        let error = call.error.as_ref().map(|error| {
            // The post's own skill when it names one, else the step's.
            let own = call.skill.as_deref().map(|s| s.trim().to_lowercase());
            error_key(own.as_deref().unwrap_or(&skill), error)
        });
        StepKeys { index: call.index, call: call_key, skill, error }
    }

    /// Records an accepted call's keys, dropping the steps no rule of width `window` can look at again.
    pub(crate) fn record(&mut self, keys: StepKeys, window: u64) {
        match self.steps.back_mut() {
            Some(last) if last.index == keys.index => {
                if keys.error.is_some() {
                    last.error = keys.error;
                }
            }
            _ => self.steps.push_back(keys),
        }
        let newest = self.steps.back().map_or(0, |s| s.index);
        while self.steps.front().is_some_and(|s| s.index.saturating_add(window) < newest) {
            self.steps.pop_front();
        }
    }

    /// The earlier steps (indexes `index − window … index − 1`) whose call key is `key`.
    pub(crate) fn earlier_calls(&self, index: u64, window: u64, key: &KeyHash) -> Vec<u64> {
        self.earlier(index, window, |s| &s.call == key)
    }

    /// The earlier steps (indexes `index − window … index − 1`) whose error key is `key`.
    pub(crate) fn earlier_errors(&self, index: u64, window: u64, key: &KeyHash) -> Vec<u64> {
        self.earlier(index, window, |s| s.error.as_ref() == Some(key))
    }

    fn earlier(&self, index: u64, window: u64, matches: impl Fn(&StepKeys) -> bool) -> Vec<u64> {
        let first = index.saturating_sub(window);
        self.steps.iter().filter(|s| s.index >= first && s.index < index && matches(s)).map(|s| s.index).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runguard_contract::Phase;

    fn call(index: u64, phase: Phase, skill: &str, text: Option<&str>) -> StepCall {
        StepCall {
            skill: Some(skill.into()),
            api_endpoint: Some("/v1/users/42?x=1".into()),
            input_keys: vec!["b".into(), "a".into()],
            input_text: text.map(str::to_owned),
            ..StepCall::new(index, phase)
        }
    }

    #[test]
    fn call_keys_normalise_like_signatures_and_hash_the_text() {
        let history = RepeatHistory::default();
        let a = history.keys_of(&call(0, Phase::Pre, " Search ", Some("q")));
        let mut same = call(0, Phase::Pre, "search", Some("q"));
        same.api_endpoint = Some("/v1/users/7/".into());
        same.input_keys = vec!["a".into(), "b".into(), "a".into()];
        assert_eq!(a.call, history.keys_of(&same).call);
        assert_ne!(a.call, history.keys_of(&call(0, Phase::Pre, "search", Some("other"))).call);
        assert_ne!(a.call, history.keys_of(&call(0, Phase::Pre, "search", None)).call);
        assert_ne!(
            history.keys_of(&call(0, Phase::Pre, "search", None)).call,
            history.keys_of(&call(0, Phase::Pre, "search", Some(""))).call,
            "no text and an empty text differ (null versus the hash of nothing)"
        );
    }

    #[test]
    fn a_post_keeps_its_pres_call_key_and_skill_for_its_error_key() {
        let mut history = RepeatHistory::default();
        let pre = history.keys_of(&call(0, Phase::Pre, "fetch", Some("q")));
        history.record(pre.clone(), 5);
        let error = StepError { error_type: Some("TimeOut".into()), code: Some("e1".into()), ..StepError::default() };
        let post = StepCall { error: Some(error.clone()), ..StepCall::new(0, Phase::Post) };
        let keys = history.keys_of(&post);
        assert_eq!((keys.call, keys.skill.as_str()), (pre.call, "fetch"));
        let upper = StepError { error_type: Some("timeout".into()), code: Some("E1".into()), ..error.clone() };
        let same = StepCall { skill: Some("FETCH".into()), error: Some(upper), ..StepCall::new(0, Phase::Post) };
        assert_eq!(keys.error, history.keys_of(&same).error, "case of skill, type and code is normalised");
        let other = StepCall { skill: Some("write".into()), error: Some(error), ..StepCall::new(0, Phase::Post) };
        assert_ne!(keys.error, history.keys_of(&other).error);
    }

    #[test]
    fn the_history_keeps_the_window_and_the_current_step() {
        let mut history = RepeatHistory::default();
        for i in 0..10 {
            let keys = history.keys_of(&call(i, Phase::Pre, "s", None));
            history.record(keys, 3);
        }
        let kept: Vec<u64> = history.steps.iter().map(|s| s.index).collect();
        assert_eq!(kept, [6, 7, 8, 9]);
        let key = history.keys_of(&call(10, Phase::Pre, "s", None)).call;
        assert_eq!(history.earlier_calls(10, 3, &key), [7, 8, 9]);
        assert_eq!(history.earlier_calls(10, 1, &key), [9]);
        assert!(history.earlier_errors(10, 3, &key).is_empty());
    }
}

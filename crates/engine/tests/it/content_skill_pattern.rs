//! Content (with redaction), skill and pattern rules.

use runguard_contract::*;
use runguard_engine::{CompiledSnapshot, RunLimits, TenantRates};

use crate::support::*;

#[test]
fn content_evidence_is_redacted_and_the_raw_text_never_appears() {
    let rule = policy(
        r#"{"id":"pol_pii","name":"pii","rule":{"kind":"content","target":"output","detectors":["email","credit_card","ssn"],"keywords":["hunter2"]}}"#,
    );
    let secrets = ["jane.doe@example.com", "4111 1111 1111 1111", "123-45-6789", "hunter2"];
    let text = format!("send {} card {} ssn {} pw {}", secrets[0], secrets[1], secrets[2], secrets[3]);
    let mut run = Driver::new(&[rule]);
    let call = StepCall { output_text: Some(text), ..post(0, 1) };
    let e = run.send(&call, at(1));
    assert_eq!(e.decision.action, Action::Block);
    let evidence = e.decision.violations[0].evidence.as_ref().unwrap();
    assert_eq!(evidence.text.as_deref(), Some("output_text"));
    let kinds: Vec<&str> = evidence.matches.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(kinds, ["email", "credit_card", "ssn", "keywords[0]"]);
    let wire = serde_json::to_string(&e.decision).unwrap();
    let record = serde_json::to_string(&e.record).unwrap();
    for secret in secrets {
        assert!(!wire.contains(secret), "{secret} leaked into the decision: {wire}");
        assert!(!record.contains(secret), "{secret} leaked into the record");
    }
}

#[test]
fn content_targets_choose_the_text_and_phase() {
    let input_rule = policy(
        r#"{"id":"pol_in","name":"in","rule":{"kind":"content","target":"input","keywords":["drop table"],"case_insensitive":true}}"#,
    );
    let mut run = Driver::new(&[input_rule]);
    let ok = StepCall { output_text: Some("DROP TABLE users".into()), ..post(0, 0) };
    assert_eq!(run.send(&ok, at(1)).decision.action, Action::Allow, "input rules bind at pre");
    let bad = StepCall { input_text: Some("please DROP TABLE users".into()), ..pre(1) };
    assert_eq!(run.send(&bad, at(2)).decision.action, Action::Block);
}

#[test]
fn skill_allow_and_deny_lists() {
    let allow = policy(r#"{"id":"pol_allow","name":"allow","rule":{"kind":"skill","allow":["search","fetch"]}}"#);
    let run = Driver::new(std::slice::from_ref(&allow));
    let call = |skill: &str| StepCall { skill: Some(skill.into()), ..pre(0) };
    assert_eq!(run.peek(&call(" Search "), at(1)).decision.action, Action::Allow, "trimmed, case-insensitive");
    let e = run.peek(&call("shell"), at(1));
    assert_eq!((e.decision.action, types(&e)), (Action::Block, vec![ViolationType::SkillPolicy]));
    assert_eq!(run.peek(&pre(0), at(1)).decision.action, Action::Allow, "a step without a skill is not checked");

    let deny = policy(r#"{"id":"pol_deny","name":"deny","rule":{"kind":"skill","deny":["shell"]}}"#);
    let run = Driver::new(&[deny]);
    assert_eq!(run.peek(&call("SHELL"), at(1)).decision.action, Action::Block);
    assert_eq!(run.peek(&call("search"), at(1)).decision.action, Action::Allow);
}

fn pattern_policy(tenant: &TenantId, endpoint: Option<&str>, mode: &str) -> Policy {
    let signature = Signature::normalize(Some("fetch"), Some("/v1/users/7"), &["id".into()]);
    let endpoint = endpoint.map(|e| format!(r#","api_endpoint":"{e}""#)).unwrap_or_default();
    policy_of(
        tenant,
        &format!(
            r#"{{"id":"pol_pat","name":"pattern","mode":"{mode}","rule":{{"kind":"pattern","pattern_id":"pat_1","signature_hash":"{}"{endpoint}}}}}"#,
            signature.hash()
        ),
    )
}

fn matching_call(endpoint: &str) -> StepCall {
    StepCall {
        skill: Some("Fetch".into()),
        api_endpoint: Some(endpoint.into()),
        input_keys: vec!["id".into()],
        ..pre(0)
    }
}

#[test]
fn pattern_policies_match_the_normalised_signature_before_the_step_runs() {
    let run = Driver::new(&[pattern_policy(&tenant(), None, "active")]);
    let e = run.peek(&matching_call("/v1/users/9999?x=1"), at(1));
    assert_eq!((e.decision.action, types(&e)), (Action::Block, vec![ViolationType::PatternMatch]));
    let record = e.record.unwrap();
    assert_eq!(record.pattern_id.unwrap().as_str(), "pat_1");
    assert!(record.signature_hash.is_some());
    assert_eq!(run.peek(&matching_call("/v1/orders/1"), at(1)).decision.action, Action::Allow, "other signature");
}

#[test]
fn pattern_endpoint_condition_and_shadow_mode() {
    let run = Driver::new(&[pattern_policy(&tenant(), Some("/v1/users/{id}"), "active")]);
    assert_eq!(run.peek(&matching_call("/v1/users/5/"), at(1)).decision.action, Action::Block);

    let shadow = Driver::new(&[pattern_policy(&tenant(), None, "shadow")]);
    let e = shadow.peek(&matching_call("/v1/users/5"), at(1));
    assert_eq!(e.decision.action, Action::Allow);
    assert_eq!(e.decision.shadow.len(), 1);
    assert_eq!(e.decision.shadow[0].would_action, Action::Block);
    assert!(e.record.is_none(), "a shadow would-block is not prevention");
}

#[test]
fn pattern_policies_never_fire_for_another_tenant() {
    // Even if a foreign pattern policy were somehow in a snapshot, the contract predicate refuses it.
    let other = TenantId::new("globex").unwrap();
    let foreign = pattern_policy(&other, None, "active");
    let mut snapshot = Snapshot::capture(&other, [&foreign]);
    snapshot.policies[0].tenant_id = Some(other);
    let compiled = CompiledSnapshot::compile(&snapshot, &PolicyLimits::default()).unwrap();
    let run = start(std::sync::Arc::new(compiled), "r", Default::default());
    let call = matching_call("/v1/users/1");
    let e = run.step(&call, &RunLimits::default(), &mut TenantRates::default(), at(1)).unwrap();
    assert_eq!(e.decision.action, Action::Allow);
    assert!(e.record.is_none());
}

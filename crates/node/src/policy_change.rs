//! Policy changes, in one place: every change of a policy is a new version written together with its
//! audit entry, and a new policy's id must not name a policy of the other scope that a tenant sees. The
//! HTTP handlers (create, update, mode) and the learning loop (proposal, confirmation, demotion by
//! regret) all change policies through here (`docs/policies.md` has the lifecycle).

use runguard_contract::{ApprovalPath, AuditEntry, Mode, Policy, PolicyDocument, PolicyId, TenantId, Timestamp};
use runguard_store::{Store, StoreError, WriteBatch};

use crate::node_error::NodeError;

/// Who changes a policy, how it was approved, and why.
#[derive(Clone, Debug)]
pub struct Approval {
    /// The caller's token name (or `system`).
    pub caller: String,
    /// How the change was approved.
    pub path: ApprovalPath,
    /// The reason recorded in the audit, if any.
    pub reason: Option<String>,
}

impl Approval {
    /// A change an operator made by hand.
    pub fn manual(caller: impl Into<String>, reason: Option<String>) -> Self {
        Self { caller: caller.into(), path: ApprovalPath::Manual, reason }
    }
}

/// A policy's next version and the audit entry that goes with it (none for an update that keeps the
/// mode: the audit records mode changes).
#[derive(Clone, Debug)]
#[must_use = "a change is made only when it is written into a batch"]
pub struct PolicyChange {
    policy: Policy,
    audit: Option<AuditEntry>,
}

impl PolicyChange {
    /// Version 1 of a new policy of `owner` (`None`: global), audited as a change from no mode.
    pub fn create(
        doc: PolicyDocument,
        id: PolicyId,
        owner: Option<TenantId>,
        approval: Approval,
        at: Timestamp,
    ) -> Self {
        let policy = Policy::create(doc, id, owner, at);
        let audit = entry(&policy, None, approval);
        Self { policy, audit: Some(audit) }
    }

    /// The next version of `existing` with `doc`; audited only when the mode changes.
    pub fn update(existing: &Policy, doc: PolicyDocument, approval: Approval, at: Timestamp) -> Self {
        let policy = existing.updated(doc, at);
        let audit = (policy.mode != existing.mode).then(|| entry(&policy, Some(existing.mode), approval));
        Self { policy, audit }
    }

    /// The next version of `existing` in `mode`.
    pub fn mode(existing: &Policy, mode: Mode, approval: Approval, at: Timestamp) -> Self {
        let policy = existing.with_mode(mode, at);
        let audit = entry(&policy, Some(existing.mode), approval);
        Self { policy, audit: Some(audit) }
    }

    /// The new version.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Adds the version and its audit entry to `batch`; answers the version.
    pub fn write(self, batch: &mut WriteBatch) -> Policy {
        batch.put_policy_version(self.policy.clone());
        if let Some(audit) = self.audit {
            batch.append_audit(self.policy.tenant_id.clone(), audit);
        }
        self.policy
    }
}

/// Audits a confirmation of `policy` (no new version: the mode does not change until enough callers
/// confirmed).
pub fn write_confirmation(batch: &mut WriteBatch, policy: &Policy, caller: &str, reason: String, at: Timestamp) {
    let audit = AuditEntry {
        policy_id: policy.id.clone(),
        from: Some(policy.mode),
        to: policy.mode,
        at,
        caller: caller.to_owned(),
        reason: Some(reason),
        approval_path: ApprovalPath::Confirmations,
    };
    batch.append_audit(policy.tenant_id.clone(), audit);
}

fn entry(policy: &Policy, from: Option<Mode>, approval: Approval) -> AuditEntry {
    AuditEntry {
        policy_id: policy.id.clone(),
        from,
        to: policy.mode,
        at: policy.updated_at,
        caller: approval.caller,
        reason: approval.reason,
        approval_path: approval.path,
    }
}

/// Whether a new policy of `owner` with `id` would share its id with a policy of the other scope that
/// a tenant sees: a global one for a tenant policy, any tenant's for a global one (policy ids are unique
/// across the scopes, so that a tenant's view never holds two policies with one id).
pub fn id_taken(store: &Store, owner: Option<&TenantId>, id: &PolicyId) -> Result<bool, StoreError> {
    match owner {
        Some(_) => Ok(store.get_policy(None, id, None)?.is_some()),
        None => store.tenant_policy_id_exists(id),
    }
}

/// The refusal of a new policy whose id [`id_taken`] found taken.
pub fn id_taken_error(id: &PolicyId) -> NodeError {
    NodeError::conflict(
        "policy_id_taken",
        format!("policy id `{id}` is taken: a global policy and a tenant's policy may not share an id"),
    )
}

#[cfg(test)]
mod tests {
    use runguard_store::{PageRequest, StoreOptions};

    use super::*;

    fn doc(mode: &str) -> PolicyDocument {
        let value = serde_json::json!({ "name": "deny rm", "mode": mode, "rule": { "kind": "skill", "deny": ["rm"] } });
        PolicyDocument::from_value(value, &Default::default()).unwrap()
    }

    #[test]
    fn every_version_is_written_with_its_audit_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &StoreOptions { fsync: false, ..StoreOptions::default() }).unwrap();
        let (tenant, id) = (TenantId::new("acme").unwrap(), PolicyId::new("pol_1").unwrap());
        let at = Timestamp::from_unix_millis(1_000);
        let mut batch = WriteBatch::new();
        let created =
            PolicyChange::create(doc("shadow"), id.clone(), Some(tenant.clone()), Approval::manual("op", None), at)
                .write(&mut batch);
        store.commit(batch).unwrap();
        assert_eq!(created.version, 1);
        // An update that keeps the mode is a version without an audit entry; a mode change has one.
        let mut batch = WriteBatch::new();
        let updated = PolicyChange::update(&created, doc("shadow"), Approval::manual("op", None), at).write(&mut batch);
        let reason = Some("ready".to_owned());
        let active = PolicyChange::mode(&updated, Mode::Active, Approval::manual("op", reason), at).write(&mut batch);
        store.commit(batch).unwrap();
        assert_eq!((updated.version, active.version, active.activated_at), (2, 3, Some(at)));
        let audit = store.policy_audit(Some(&tenant), &id, &PageRequest::first(10)).unwrap().items;
        let modes: Vec<(Option<Mode>, Mode)> = audit.iter().map(|entry| (entry.from, entry.to)).collect();
        assert_eq!(modes, [(None, Mode::Shadow), (Some(Mode::Shadow), Mode::Active)]);
        assert_eq!(audit[1].reason.as_deref(), Some("ready"));
        // The id is now taken for a global policy, and free for another tenant's.
        assert!(id_taken(&store, None, &id).unwrap());
        assert!(!id_taken(&store, Some(&TenantId::new("globex").unwrap()), &id).unwrap());
        assert!(matches!(id_taken_error(&id), NodeError::Conflict { code: "policy_id_taken", .. }));
    }
}

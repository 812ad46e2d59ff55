//! Immutable, content-addressed policy snapshots (`docs/architecture.md`, hashing).

use serde::{Deserialize, Serialize};

use crate::canonical::{CanonicalError, SNAPSHOT_DOMAIN, hash_canonical};
use crate::ids::{SnapshotHash, SnapshotId, TenantId};
use crate::policy::{Policy, Scope};

/// The format version written into every snapshot; part of what is hashed.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 1;

/// Every policy in scope for a tenant, in `active` or `shadow` mode, at its current version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// [`SNAPSHOT_FORMAT_VERSION`] when captured.
    pub format_version: u32,
    /// The policies, ordered by (owner, id) so the encoding is canonical.
    pub policies: Vec<Policy>,
}

/// A snapshot with its identity, as the API shows it in runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SnapshotRef {
    /// `snp_` and the first 32 hex digits of the hash.
    pub id: SnapshotId,
    /// SHA-256 of the canonical encoding.
    pub hash: SnapshotHash,
    /// How many policies it holds.
    pub policy_count: u64,
}

impl Snapshot {
    /// Captures the policies in scope for `tenant`: its own and the global ones, in `active` or `shadow`
    /// mode. Policies of other tenants, and pending or disabled ones, are left out.
    pub fn capture<'a>(tenant: &TenantId, candidates: impl IntoIterator<Item = &'a Policy>) -> Self {
        let mut policies: Vec<Policy> = candidates
            .into_iter()
            .filter(|p| p.mode.in_snapshots())
            .filter(|p| match p.scope {
                Scope::Global => true,
                Scope::Tenant => p.tenant_id.as_ref() == Some(tenant),
            })
            .cloned()
            .collect();
        policies.sort_by(|a, b| (&a.tenant_id, &a.id).cmp(&(&b.tenant_id, &b.id)));
        Self { format_version: SNAPSHOT_FORMAT_VERSION, policies }
    }

    /// SHA-256 over the domain-separated RFC 8785 encoding.
    pub fn hash(&self) -> Result<SnapshotHash, CanonicalError> {
        Ok(SnapshotHash::from_bytes(&hash_canonical(SNAPSHOT_DOMAIN, self)?))
    }

    /// The identity of this snapshot.
    pub fn reference(&self) -> Result<SnapshotRef, CanonicalError> {
        let hash = self.hash()?;
        Ok(SnapshotRef {
            id: SnapshotId::for_hash(&hash),
            hash,
            policy_count: u64::try_from(self.policies.len()).unwrap_or(u64::MAX),
        })
    }

    /// Whether the snapshot still hashes to `expected`. Any failure to encode counts as a mismatch.
    pub fn verify(&self, expected: &SnapshotHash) -> bool {
        self.format_version == SNAPSHOT_FORMAT_VERSION && self.hash().is_ok_and(|h| &h == expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::PolicyId;
    use crate::policy::{ExprRule, Mode, PolicyDocument, Rule};
    use crate::timestamp::Timestamp;

    fn policy(id: &str, tenant: Option<&str>, mode: Mode) -> Policy {
        let doc = PolicyDocument {
            id: None,
            name: id.into(),
            scope: if tenant.is_some() { Scope::Tenant } else { Scope::Global },
            mode,
            action: Default::default(),
            precedence: 100,
            on_error: Default::default(),
            bind_at: None,
            rule: Rule::Expr(ExprRule { cel: "false".into() }),
        };
        Policy::create(
            doc,
            PolicyId::new(id).unwrap(),
            tenant.map(|t| TenantId::new(t).unwrap()),
            Timestamp::from_unix_millis(0),
        )
    }

    #[test]
    fn capture_keeps_own_and_global_active_or_shadow_policies_in_order() {
        let acme = TenantId::new("acme").unwrap();
        let all = [
            policy("z", Some("acme"), Mode::Active),
            policy("a", Some("acme"), Mode::Shadow),
            policy("p", Some("acme"), Mode::Pending),
            policy("d", Some("acme"), Mode::Disabled),
            policy("o", Some("other"), Mode::Active),
            policy("g", None, Mode::Active),
        ];
        let snap = Snapshot::capture(&acme, &all);
        let ids: Vec<&str> = snap.policies.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["g", "a", "z"]);
    }

    #[test]
    fn equal_sets_hash_equal_and_any_change_breaks_verification() {
        let acme = TenantId::new("acme").unwrap();
        let a = [policy("x", Some("acme"), Mode::Active), policy("y", Some("acme"), Mode::Active)];
        let b = [a[1].clone(), a[0].clone()];
        let one = Snapshot::capture(&acme, &a);
        let two = Snapshot::capture(&acme, &b);
        let hash = one.hash().unwrap();
        assert_eq!(hash, two.hash().unwrap());
        assert!(one.verify(&hash));
        let mut tampered = one.clone();
        tampered.policies[0].precedence = 1;
        assert!(!tampered.verify(&hash));
    }
}

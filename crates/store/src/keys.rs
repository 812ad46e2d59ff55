//! Hand-built keys: ids as their bytes followed by a 0x00 terminator, numbers big-endian.
//!
//! Contract ids use only `[A-Za-z0-9._:-]`, so 0x00 never occurs inside one: a terminated id never is
//! a prefix of another, and keys sort by id, then by the fixed-width big-endian numbers that follow.
//! The owner of a policy is its tenant, or the empty string for a global policy (sorting first).

use runguard_contract::{PolicyId, RecordId, RunId, SignatureHash, TenantId, Timestamp};

/// Builds a key piece by piece.
#[derive(Debug, Default, Clone)]
pub(crate) struct Key(Vec<u8>);

impl Key {
    pub(crate) fn new() -> Self {
        Self(Vec::with_capacity(64))
    }

    /// A terminated string segment.
    pub(crate) fn seg(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }

    /// An unterminated string (only as the last piece).
    pub(crate) fn tail(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }

    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A timestamp as a big-endian u64 that sorts like the signed millisecond value.
    pub(crate) fn time(self, t: Timestamp) -> Self {
        self.u64(time_bits(t))
    }

    pub(crate) fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

/// The sortable form of a timestamp.
pub(crate) fn time_bits(t: Timestamp) -> u64 {
    u64::from_be_bytes(t.unix_millis().to_be_bytes()) ^ (1u64 << 63)
}

/// The owner segment of a policy: its tenant, or empty for global.
pub(crate) fn owner(tenant: Option<&TenantId>) -> &str {
    tenant.map_or("", TenantId::as_str)
}

/// The last 8 bytes of a key as a big-endian u64.
pub(crate) fn trailing_u64(key: &[u8]) -> Option<u64> {
    let start = key.len().checked_sub(8)?;
    let bytes: [u8; 8] = key.get(start..)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

// ---- policies -------------------------------------------------------------------------------------

/// `policies`, `policy_heads`, `shadow_stats`: `owner\0 id\0`.
pub(crate) fn policy_prefix(tenant: Option<&TenantId>, id: &PolicyId) -> Vec<u8> {
    Key::new().seg(owner(tenant)).seg(id.as_str()).into_vec()
}

/// `policies`: `owner\0 id\0 version`.
pub(crate) fn policy_version(tenant: Option<&TenantId>, id: &PolicyId, version: u32) -> Vec<u8> {
    Key::new().seg(owner(tenant)).seg(id.as_str()).u32(version).into_vec()
}

/// `policy_heads` of one owner: `owner\0`.
pub(crate) fn owner_prefix(tenant: Option<&TenantId>) -> Vec<u8> {
    Key::new().seg(owner(tenant)).into_vec()
}

/// `shadow_stats`: a tenant policy's `owner\0 id\0`; a global policy's `\0 id\0 tenant\0`, one entry per
/// tenant whose runs evaluated it, so that no tenant sees another's counts.
pub(crate) fn shadow_stats(owner: Option<&TenantId>, id: &PolicyId, run_tenant: &TenantId) -> Vec<u8> {
    match owner {
        Some(tenant) => policy_prefix(Some(tenant), id),
        None => Key::new().seg("").seg(id.as_str()).seg(run_tenant.as_str()).into_vec(),
    }
}

/// `tenant_usage`: `tenant\0 policy\0 period start` (periods before 1970 share the key of 1970).
pub(crate) fn tenant_usage(
    tenant: &TenantId,
    policy: &PolicyId,
    period_start: runguard_contract::Timestamp,
) -> Vec<u8> {
    let start = u64::try_from(period_start.unix_millis()).unwrap_or(0);
    Key::new().seg(tenant.as_str()).seg(policy.as_str()).u64(start).into_vec()
}

/// `audit`: `owner\0 id\0 n`.
pub(crate) fn audit(tenant: Option<&TenantId>, id: &PolicyId, n: u64) -> Vec<u8> {
    Key::new().seg(owner(tenant)).seg(id.as_str()).u64(n).into_vec()
}

// ---- runs and ledger ------------------------------------------------------------------------------

/// `runs`, `runs_live`, and the ledger prefix of a run: `tenant\0 run\0`.
pub(crate) fn run(tenant: &TenantId, run: &RunId) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).seg(run.as_str()).into_vec()
}

/// `snapshot_bindings`: `tenant\0` and the 16 bytes of hash a snapshot id names.
pub(crate) fn snapshot_binding(tenant: &TenantId, digest: &[u8]) -> Vec<u8> {
    let mut key = Key::new().seg(tenant.as_str()).into_vec();
    key.extend_from_slice(digest);
    key
}

/// `ledger`: `tenant\0 run\0 position`.
pub(crate) fn ledger(tenant: &TenantId, run: &RunId, position: u64) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).seg(run.as_str()).u64(position).into_vec()
}

/// Any tenant-scoped tree: `tenant\0`.
pub(crate) fn tenant(tenant: &TenantId) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).into_vec()
}

// ---- records --------------------------------------------------------------------------------------

/// `records`: the sequence number.
pub(crate) fn record(seq: u64) -> Vec<u8> {
    seq.to_be_bytes().to_vec()
}

/// `rec_by_id`: `record_id\0 seq`.
pub(crate) fn record_by_id(id: &RecordId, seq: u64) -> Vec<u8> {
    Key::new().seg(id.as_str()).u64(seq).into_vec()
}

/// `rec_by_id` prefix.
pub(crate) fn record_id_prefix(id: &RecordId) -> Vec<u8> {
    Key::new().seg(id.as_str()).into_vec()
}

/// `rec_by_tenant` prefix: `tenant\0 simulated`.
pub(crate) fn records_of_tenant(tenant: &TenantId, simulated: bool) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).u8(u8::from(simulated)).into_vec()
}

/// `rec_by_policy` prefix: `tenant\0 simulated policy\0`.
pub(crate) fn records_of_policy(tenant: &TenantId, simulated: bool, policy: &PolicyId) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).u8(u8::from(simulated)).seg(policy.as_str()).into_vec()
}

/// `rec_by_run` prefix: `tenant\0 simulated run\0`.
pub(crate) fn records_of_run(tenant: &TenantId, simulated: bool, run: &RunId) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).u8(u8::from(simulated)).seg(run.as_str()).into_vec()
}

// ---- learning loop --------------------------------------------------------------------------------

/// `incidents`, `patterns`: `tenant\0 id\0`.
pub(crate) fn tenant_item(tenant: &TenantId, id: &str) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).seg(id).into_vec()
}

/// `incidents_by_time`: `tenant\0 time id`.
pub(crate) fn incident_by_time(tenant: &TenantId, at: Timestamp, id: &str) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).time(at).tail(id).into_vec()
}

/// `incidents_by_time` from `since` on: `tenant\0 time`.
pub(crate) fn incidents_from(tenant: &TenantId, since: Timestamp) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).time(since).into_vec()
}

/// `patterns_by_sig`: `tenant\0 signature_hash\0 error_type`.
pub(crate) fn pattern_by_signature(tenant: &TenantId, signature: &SignatureHash, error_type: &str) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).seg(signature.as_str()).tail(error_type).into_vec()
}

/// `regrets`: `record_id\0`.
pub(crate) fn regret(record: &RecordId) -> Vec<u8> {
    Key::new().seg(record.as_str()).into_vec()
}

/// `regrets_by_policy`: `tenant\0 policy\0 time record_id`.
pub(crate) fn regret_by_policy(tenant: &TenantId, policy: &PolicyId, at: Timestamp, record: &RecordId) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).seg(policy.as_str()).time(at).tail(record.as_str()).into_vec()
}

/// `graduation_history`: `tenant\0 n`.
pub(crate) fn graduation_history(tenant: &TenantId, n: u64) -> Vec<u8> {
    Key::new().seg(tenant.as_str()).u64(n).into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminated_ids_do_not_prefix_each_other_and_sort_by_id() {
        let a = run(&TenantId::new("acme").unwrap(), &RunId::new("r1").unwrap());
        let b = run(&TenantId::new("acme").unwrap(), &RunId::new("r10").unwrap());
        assert!(!b.starts_with(&a));
        assert!(a < b);
        let global = owner_prefix(None);
        let tenant = owner_prefix(Some(&TenantId::new("a").unwrap()));
        assert!(global < tenant, "global policies list first");
    }

    #[test]
    fn times_sort_like_signed_milliseconds() {
        let ts = [-5_000i64, -1, 0, 1, 1_700_000_000_000];
        let bits: Vec<u64> = ts.iter().map(|&t| time_bits(Timestamp::from_unix_millis(t))).collect();
        assert!(bits.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(trailing_u64(&record(42)), Some(42));
        assert_eq!(policy_version(None, &PolicyId::new("p").unwrap(), 7).last(), Some(&7));
    }

    #[test]
    fn a_global_policys_shadow_statistics_are_kept_per_tenant() {
        let (acme, beta) = (TenantId::new("acme").unwrap(), TenantId::new("beta").unwrap());
        let id = PolicyId::new("pol_g").unwrap();
        assert_ne!(shadow_stats(None, &id, &acme), shadow_stats(None, &id, &beta));
        assert_eq!(shadow_stats(Some(&acme), &id, &acme), policy_prefix(Some(&acme), &id));
        // Never the key of the tenant's own policy with the same id, nor the old all-tenant key.
        assert_ne!(shadow_stats(None, &id, &acme), policy_prefix(Some(&acme), &id));
        assert_ne!(shadow_stats(None, &id, &acme), policy_prefix(None, &id));
    }
}

-- Tenant-period budget totals (`per: "tenant"`): one row per (tenant, policy, period), incremented in the
-- same transaction as the ledger entry of the call that used it. Every node of a cluster reads and
-- increments the same row, serialised by the commit's lock on the chain head.
CREATE TABLE tenant_usage (
    tenant_id text NOT NULL,
    policy_id text NOT NULL,
    period_start_ms bigint NOT NULL,
    used bigint NOT NULL CHECK (used >= 0),
    PRIMARY KEY (tenant_id, policy_id, period_start_ms)
);

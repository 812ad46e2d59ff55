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

-- Tenant-scope rate windows shared by the nodes of a cluster: each admitted call's event, inserted with
-- its ledger entry only while every admitting rule still holds on these rows; rows older than the longest
-- window are deleted by the writers that pass them.
CREATE TABLE tenant_rate_events (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    at_ms bigint NOT NULL,
    steps bigint NOT NULL,
    tokens bigint NOT NULL,
    cost_micros bigint NOT NULL
);
CREATE INDEX tenant_rate_events_by_time ON tenant_rate_events (tenant_id, at_ms);

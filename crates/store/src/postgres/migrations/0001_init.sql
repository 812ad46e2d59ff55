-- runguard store, PostgreSQL schema version 1.
--
-- Ids are compared byte-wise (COLLATE "C") so that lists sort exactly as on sled whatever the
-- database's locale. Times are Unix milliseconds (bigint), as the contract keeps them. Every contract
-- object is kept whole as JSON in `body`; the columns beside it repeat what queries filter and order by.
-- A global policy's owner is the empty string.

-- The head of the prevention-record chain and the commit counter: one row, locked (FOR UPDATE) by every
-- commit, which serialises writers, also across nodes sharing the database.
CREATE TABLE runguard_chain (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    head_seq bigint NOT NULL,
    head_hash text NOT NULL,
    commits bigint NOT NULL
);

CREATE TABLE policies (
    owner text COLLATE "C" NOT NULL,
    policy_id text COLLATE "C" NOT NULL,
    version integer NOT NULL,
    mode text NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (owner, policy_id, version)
);

CREATE TABLE policy_heads (
    owner text COLLATE "C" NOT NULL,
    policy_id text COLLATE "C" NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (owner, policy_id)
);
CREATE INDEX policy_heads_by_id ON policy_heads (policy_id);

CREATE TABLE policy_audit (
    owner text COLLATE "C" NOT NULL,
    policy_id text COLLATE "C" NOT NULL,
    n bigint NOT NULL,
    at_ms bigint NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (owner, policy_id, n)
);

-- Snapshots keep their exact RFC 8785 bytes: the stored text is the hashed text.
CREATE TABLE snapshots (
    hash text COLLATE "C" PRIMARY KEY,
    snapshot_id text COLLATE "C" NOT NULL,
    canonical text NOT NULL
);
CREATE INDEX snapshots_by_id ON snapshots (snapshot_id);

CREATE TABLE runs (
    tenant_id text COLLATE "C" NOT NULL,
    run_id text COLLATE "C" NOT NULL,
    snapshot_hash text COLLATE "C" NOT NULL,
    snapshot_id text COLLATE "C" NOT NULL,
    status text NOT NULL,
    created_at_ms bigint NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (tenant_id, run_id)
);
CREATE INDEX runs_by_snapshot ON runs (tenant_id, snapshot_id);
CREATE INDEX runs_running ON runs (tenant_id, run_id) WHERE status = 'running';

CREATE TABLE ledger (
    tenant_id text COLLATE "C" NOT NULL,
    run_id text COLLATE "C" NOT NULL,
    position bigint NOT NULL,
    decision_id text COLLATE "C" NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (tenant_id, run_id, position)
);

CREATE TABLE records (
    seq bigint PRIMARY KEY CHECK (seq > 0),
    record_id text COLLATE "C" NOT NULL UNIQUE,
    tenant_id text COLLATE "C" NOT NULL,
    run_id text COLLATE "C" NOT NULL,
    policy_id text COLLATE "C" NOT NULL,
    is_simulated boolean NOT NULL,
    prevented_at_ms bigint NOT NULL,
    hash text NOT NULL,
    body jsonb NOT NULL
);
CREATE INDEX records_by_tenant ON records (tenant_id, is_simulated, prevented_at_ms, seq);
CREATE INDEX records_by_policy ON records (tenant_id, is_simulated, policy_id, prevented_at_ms, seq);
CREATE INDEX records_by_run ON records (tenant_id, is_simulated, run_id, seq);

-- A tenant policy's statistics have run_tenant = owner; a global policy's are kept per tenant.
CREATE TABLE shadow_stats (
    owner text COLLATE "C" NOT NULL,
    policy_id text COLLATE "C" NOT NULL,
    run_tenant text COLLATE "C" NOT NULL,
    evaluations bigint NOT NULL,
    would_block bigint NOT NULL,
    would_warn bigint NOT NULL,
    would_throttle bigint NOT NULL,
    PRIMARY KEY (owner, policy_id, run_tenant)
);

CREATE TABLE incidents (
    tenant_id text COLLATE "C" NOT NULL,
    incident_id text COLLATE "C" NOT NULL,
    created_at_ms bigint NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (tenant_id, incident_id)
);
CREATE INDEX incidents_by_time ON incidents (tenant_id, created_at_ms, incident_id);

CREATE TABLE patterns (
    tenant_id text COLLATE "C" NOT NULL,
    pattern_id text COLLATE "C" NOT NULL,
    signature_hash text COLLATE "C" NOT NULL,
    error_type text COLLATE "C" NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (tenant_id, pattern_id),
    UNIQUE (tenant_id, signature_hash, error_type)
);

CREATE TABLE regrets (
    record_id text COLLATE "C" PRIMARY KEY,
    tenant_id text COLLATE "C" NOT NULL,
    policy_id text COLLATE "C" NOT NULL,
    at_ms bigint NOT NULL,
    body jsonb NOT NULL
);
CREATE INDEX regrets_by_policy ON regrets (tenant_id, policy_id, at_ms, record_id);

CREATE TABLE graduation (
    tenant_id text COLLATE "C" PRIMARY KEY,
    body jsonb NOT NULL
);

CREATE TABLE graduation_history (
    tenant_id text COLLATE "C" NOT NULL,
    n bigint NOT NULL,
    body jsonb NOT NULL,
    PRIMARY KEY (tenant_id, n)
);

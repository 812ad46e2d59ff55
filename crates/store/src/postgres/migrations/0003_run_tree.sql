-- runguard store, PostgreSQL schema version 3: parent and child runs (SPEC §13.2).
--
-- A run's parent, ancestors and the ancestor that stopped it live in its JSON body (`runs.body`); what its
-- descendants add to it lives here, apart from the run's row, so that a descendant's call increments it in
-- the same transaction as its own ledger entry without rewriting the run.
CREATE TABLE run_rollups (
    tenant_id text COLLATE "C" NOT NULL,
    run_id text COLLATE "C" NOT NULL,
    tokens bigint NOT NULL DEFAULT 0,
    cost_micros bigint NOT NULL DEFAULT 0,
    steps bigint NOT NULL DEFAULT 0,
    duration_ms bigint NOT NULL DEFAULT 0,
    children bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, run_id)
);

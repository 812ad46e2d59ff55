-- runguard store, PostgreSQL schema version 2: what several nodes on one database share.
--
-- The policy generation: bumped in every commit that writes a policy version, in the same transaction,
-- and read by a node before it binds a new run to a snapshot, so that a policy change acknowledged by
-- any node binds the runs every node creates after it.
ALTER TABLE runguard_chain ADD COLUMN policy_generation bigint NOT NULL DEFAULT 0;

-- The change log is pruned on the primary. An edge that has not yet seen
-- rows up to `pruned_through` can no longer tell what changed: it must drop
-- its whole cache. The horizon moves in the same transaction as the delete.
CREATE TABLE change_log_horizon (
    id             boolean PRIMARY KEY DEFAULT true CHECK (id),
    pruned_through bigint NOT NULL DEFAULT 0
);
INSERT INTO change_log_horizon DEFAULT VALUES;
CREATE INDEX change_log_at_idx ON change_log (at);

-- The change feed's ordering guarantee (docs/architecture.md, "Change log").
-- `seq` is taken when a row is inserted, not when its transaction commits, so
-- "every row after the last seq I saw" can skip a row whose transaction was
-- still open. Each row now records the top-level transaction id that wrote
-- it; the edge's tail tracks transactions (not positions): every id that may
-- still commit stays on its watch list until PostgreSQL reports it finished,
-- and a finished transaction's rows are read in a snapshot taken after that
-- report. Stored as bigint (xid8 is epoch-extended: no wraparound).
ALTER TABLE change_log ADD COLUMN xid bigint NOT NULL DEFAULT 0;
ALTER TABLE change_log ALTER COLUMN xid SET DEFAULT (pg_current_xact_id()::text::bigint);
CREATE INDEX change_log_xid_idx ON change_log (xid);

-- The newest transaction id among pruned rows: an edge still watching an id
-- at or below it may have lost rows to pruning and must drop its cache.
ALTER TABLE change_log_horizon ADD COLUMN pruned_xid bigint NOT NULL DEFAULT 0;

-- Pruning is by transaction, not by row age: a row may be deleted only when
-- its transaction finished at least the retention ago, so an edge that polls
-- at all never loses a row it is still waiting for. Each prune run notes the
-- primary's xmin; rows below the xmin noted a retention ago are deletable.
CREATE TABLE change_log_prune_marks (
    at   timestamptz NOT NULL DEFAULT now(),
    oldest_xid bigint NOT NULL
);
CREATE INDEX change_log_prune_marks_at_idx ON change_log_prune_marks (at);

-- Custom-domain ownership. A seller's domain is a *claim* (store, hostname)
-- with a per-claim verification token; it is served (a row in `domains`, which
-- edges read and the ACME gate checks) only while the claim is `active`, i.e.
-- after the origin found `_edgefront.<hostname> TXT "edgefront-verify=<token>"`
-- through real DNS. Several stores may hold pending claims for one name (a
-- squatter's pending claim cannot block the owner's); at most one is active.
CREATE TABLE domain_claims (
    store_id       bigint NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    hostname       text NOT NULL
                   CHECK (hostname = lower(hostname) AND length(hostname) <= 253),
    token          text NOT NULL CHECK (token ~ '^[0-9a-f]{32,64}$'),
    state          text NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'active', 'suspended')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    verified_at    timestamptz,
    checked_at     timestamptz,
    check_result   text,
    -- When an active claim's proof was first seen missing (grace starts).
    failing_since  timestamptz,
    -- Consecutive checks without the proof (pending backoff).
    failures       integer NOT NULL DEFAULT 0,
    next_check_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store_id, hostname)
);
CREATE INDEX domain_claims_due_idx ON domain_claims (next_check_at);
CREATE INDEX domain_claims_host_idx ON domain_claims (hostname);
CREATE UNIQUE INDEX domain_claims_one_active ON domain_claims (hostname) WHERE state = 'active';

-- Domains attached before proofs existed stay served, as active claims with a
-- fresh token: their owners must publish it before the first re-check's
-- grace period ends, or they are suspended like any lapsed proof.
INSERT INTO domain_claims (store_id, hostname, token, state, verified_at, checked_at,
                           check_result, next_check_at)
SELECT store_id, hostname, replace(gen_random_uuid()::text, '-', ''), 'active', created_at,
       now(), 'attached before ownership proofs; publish the record to keep it', now()
FROM domains;

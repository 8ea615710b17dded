-- Every ACME order, successful or failed, counted against budgets kept here
-- on the primary (docs/tls.md "ACME budgets"): per account (with a share
-- reserved for renewals), per hostname (failed validations, then backoff),
-- per registered domain and per store. A row is written in the transaction
-- that grants the issuance lease, so no order reaches the CA uncounted; the
-- issuer reports how it ended. A row left `pending` by a crashed issuer
-- counts as failed once it is 10 minutes old.
CREATE TABLE acme_orders (
    id                bigserial PRIMARY KEY,
    hostname          text NOT NULL,
    store_id          bigint REFERENCES stores (id) ON DELETE SET NULL,
    registered_domain text NOT NULL,
    renewal           boolean NOT NULL,
    holder            text NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz,
    outcome           text NOT NULL DEFAULT 'pending'
                      CHECK (outcome IN ('pending', 'valid', 'failed')),
    error             text,
    -- After a failure: no new order for this hostname before this time.
    next_allowed_at   timestamptz
);
CREATE INDEX acme_orders_started_idx ON acme_orders (started_at);
CREATE INDEX acme_orders_host_idx ON acme_orders (hostname, started_at);
CREATE INDEX acme_orders_store_idx ON acme_orders (store_id, started_at);
CREATE INDEX acme_orders_regdom_idx ON acme_orders (registered_domain, started_at);

-- Stores whose domains keep failing validation: no orders until the pause ends.
CREATE TABLE acme_store_pauses (
    store_id      bigint PRIMARY KEY REFERENCES stores (id) ON DELETE CASCADE,
    paused_until  timestamptz NOT NULL,
    reason        text NOT NULL
);

-- A second ACME directory (docs/tls.md "A second issuer"): each order names
-- the directory it went to, so each directory's account has its own budget;
-- each certificate names the directory that issued it (NULL: uploaded).
-- An order that failed on the platform's side (the CA down, rate-limiting or
-- erring; the origin unreachable) is `platform_error`: it spent the account's
-- budget but is not held against the name or its store.
ALTER TABLE acme_orders ADD COLUMN directory text NOT NULL DEFAULT '';
CREATE INDEX acme_orders_directory_idx ON acme_orders (directory, started_at);
ALTER TABLE acme_orders DROP CONSTRAINT acme_orders_outcome_check;
ALTER TABLE acme_orders ADD CONSTRAINT acme_orders_outcome_check
    CHECK (outcome IN ('pending', 'valid', 'failed', 'platform_error'));
ALTER TABLE certificates ADD COLUMN issuer text
    CHECK (issuer IS NULL OR length(issuer) BETWEEN 1 AND 64);

-- ACME state shared by every region through the primary.
-- Pending HTTP-01 challenges: any region's :80 answers any of them, because the
-- CA's validation request can land on any region through anycast.
CREATE TABLE acme_challenges (
    token             text PRIMARY KEY CHECK (token ~ '^[A-Za-z0-9_-]+$' AND length(token) <= 256),
    hostname          text NOT NULL,
    key_authorization text NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

-- The ACME account per directory, created once; credentials sealed like keys.
CREATE TABLE acme_accounts (
    directory   text PRIMARY KEY,
    nonce       bytea NOT NULL,
    ciphertext  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One issuer per hostname at a time, network-wide: a lease with an expiry so a
-- crashed issuer does not block the name forever.
CREATE TABLE cert_leases (
    hostname    text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- TLS certificates for custom domains (and the platform wildcard). The private
-- key is sealed (AES-256-GCM, hostname as associated data) before it is stored;
-- the master key never reaches the database. Replicated like everything else,
-- so every region can serve every certificate from its own replica.
CREATE TABLE certificates (
    hostname       text PRIMARY KEY
                   CHECK (hostname = lower(hostname) AND length(hostname) <= 253),
    chain_pem      text NOT NULL,
    key_nonce      bytea NOT NULL,
    key_ciphertext bytea NOT NULL,
    not_after      timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION log_certificate_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO change_log (hostname, kind) SELECT hostname, 'certificate' FROM old_rows;
    ELSE
        INSERT INTO change_log (hostname, kind) SELECT hostname, 'certificate' FROM new_rows;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER certificates_log_ins AFTER INSERT ON certificates
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION log_certificate_change();
CREATE TRIGGER certificates_log_upd AFTER UPDATE ON certificates
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION log_certificate_change();
CREATE TRIGGER certificates_log_del AFTER DELETE ON certificates
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION log_certificate_change();

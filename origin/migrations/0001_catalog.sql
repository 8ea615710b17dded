-- The primary's schema. Every region's replica carries it unchanged through WAL.

CREATE TABLE stores (
    id          bigserial PRIMARY KEY,
    slug        text NOT NULL UNIQUE
                CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    tagline     text NOT NULL DEFAULT '' CHECK (length(tagline) <= 500),
    currency    text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- SHA-256 of the store's API token; the token itself is never stored.
    token_hash  bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Custom domains: hostname (normalised: lower case, punycode, no trailing dot) → store.
CREATE TABLE domains (
    hostname    text PRIMARY KEY
                CHECK (hostname = lower(hostname) AND length(hostname) <= 253),
    store_id    bigint NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX domains_store_idx ON domains (store_id);

CREATE TABLE categories (
    id          bigserial PRIMARY KEY,
    store_id    bigint NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    slug        text NOT NULL CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,78}[a-z0-9])?$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    position    integer NOT NULL DEFAULT 0,
    UNIQUE (store_id, slug),
    UNIQUE (store_id, id)
);

CREATE TABLE products (
    id          bigserial PRIMARY KEY,
    store_id    bigint NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    category_id bigint,
    slug        text NOT NULL CHECK (slug ~ '^[a-z0-9]([a-z0-9-]{0,78}[a-z0-9])?$'),
    name        text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description text NOT NULL DEFAULT '' CHECK (length(description) <= 5000),
    price_cents bigint NOT NULL CHECK (price_cents BETWEEN 0 AND 100000000000),
    available   boolean NOT NULL DEFAULT true,
    position    integer NOT NULL DEFAULT 0,
    UNIQUE (store_id, slug),
    -- A product's category must belong to the same store; deleting the
    -- category leaves the product uncategorised.
    FOREIGN KEY (store_id, category_id) REFERENCES categories (store_id, id)
        ON DELETE SET NULL (category_id)
);
CREATE INDEX products_store_category_idx ON products (store_id, category_id, position, id);

CREATE TABLE carts (
    id          uuid PRIMARY KEY,
    store_id    bigint NOT NULL REFERENCES stores (id) ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cart_items (
    cart_id     uuid NOT NULL REFERENCES carts (id) ON DELETE CASCADE,
    product_id  bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    quantity    integer NOT NULL CHECK (quantity BETWEEN 1 AND 999),
    PRIMARY KEY (cart_id, product_id)
);

-- Orders outlive products and are never deleted with their store.
CREATE TABLE orders (
    id              bigserial PRIMARY KEY,
    store_id        bigint NOT NULL REFERENCES stores (id) ON DELETE RESTRICT,
    idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 255),
    -- SHA-256 of the canonical request, so a reused key with another body is refused.
    request_hash    bytea NOT NULL,
    email           text NOT NULL,
    currency        text NOT NULL,
    total_cents     bigint NOT NULL CHECK (total_cents >= 0),
    status          text NOT NULL DEFAULT 'placed',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (store_id, idempotency_key)
);

CREATE TABLE order_items (
    order_id         bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id       bigint NOT NULL,
    name             text NOT NULL,
    unit_price_cents bigint NOT NULL,
    quantity         integer NOT NULL CHECK (quantity BETWEEN 1 AND 999),
    PRIMARY KEY (order_id, product_id)
);

-- The change log: one row per (statement, store) that can change a rendered
-- page, written by triggers in the same transaction as the change, so it
-- travels through the same WAL. Edges tail it on their replica.
CREATE TABLE change_log (
    seq         bigserial PRIMARY KEY,
    store_id    bigint,
    hostname    text,
    kind        text NOT NULL
                CHECK (kind IN ('store', 'domain', 'category', 'product', 'certificate')),
    at          timestamptz NOT NULL DEFAULT now()
);

-- Catalog tables (store_id column); TG_ARGV[0] is the kind.
CREATE FUNCTION log_catalog_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO change_log (store_id, kind)
            SELECT DISTINCT store_id, TG_ARGV[0] FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO change_log (store_id, kind)
            SELECT DISTINCT store_id, TG_ARGV[0] FROM old_rows;
    ELSE
        INSERT INTO change_log (store_id, kind)
            SELECT DISTINCT store_id, TG_ARGV[0]
            FROM (SELECT store_id FROM new_rows UNION SELECT store_id FROM old_rows) s;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION log_store_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO change_log (store_id, kind) SELECT id, 'store' FROM old_rows;
    ELSE
        INSERT INTO change_log (store_id, kind) SELECT id, 'store' FROM new_rows;
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION log_domain_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO change_log (store_id, hostname, kind)
            SELECT store_id, hostname, 'domain' FROM new_rows;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO change_log (store_id, hostname, kind)
            SELECT store_id, hostname, 'domain' FROM old_rows;
    ELSE
        INSERT INTO change_log (store_id, hostname, kind)
            SELECT store_id, hostname, 'domain' FROM new_rows
            UNION SELECT store_id, hostname, 'domain' FROM old_rows;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER stores_log_ins AFTER INSERT ON stores
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION log_store_change();
CREATE TRIGGER stores_log_upd AFTER UPDATE ON stores
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION log_store_change();
CREATE TRIGGER stores_log_del AFTER DELETE ON stores
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION log_store_change();

CREATE TRIGGER domains_log_ins AFTER INSERT ON domains
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION log_domain_change();
CREATE TRIGGER domains_log_upd AFTER UPDATE ON domains
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION log_domain_change();
CREATE TRIGGER domains_log_del AFTER DELETE ON domains
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION log_domain_change();

CREATE TRIGGER categories_log_ins AFTER INSERT ON categories
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION log_catalog_change('category');
CREATE TRIGGER categories_log_upd AFTER UPDATE ON categories
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION log_catalog_change('category');
CREATE TRIGGER categories_log_del AFTER DELETE ON categories
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION log_catalog_change('category');

CREATE TRIGGER products_log_ins AFTER INSERT ON products
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION log_catalog_change('product');
CREATE TRIGGER products_log_upd AFTER UPDATE ON products
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION log_catalog_change('product');
CREATE TRIGGER products_log_del AFTER DELETE ON products
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION log_catalog_change('product');

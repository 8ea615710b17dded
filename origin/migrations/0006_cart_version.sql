-- Checkout is atomic with the cart (see origin/src/shop.rs).
-- Every change to a cart's lines bumps its version under the cart row's lock,
-- so a version names exactly one cart content; checkout locks the row
-- (SELECT ... FOR UPDATE), orders that content and bumps the version once.
ALTER TABLE carts ADD COLUMN version bigint NOT NULL DEFAULT 0;

-- Which cart (and which version of it) an order was checked out from; NULL
-- for orders placed through the JSON order API. Lets a second checkout of the
-- same cart say "already checked out as order N", and lets a replayed key be
-- matched against the cart it was first used with.
ALTER TABLE orders ADD COLUMN cart_id uuid;
ALTER TABLE orders ADD COLUMN cart_version bigint;
CREATE INDEX orders_cart_idx ON orders (cart_id, cart_version) WHERE cart_id IS NOT NULL;

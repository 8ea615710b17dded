//! Shopper writes: the cart, checkout and the order API.
//!
//! The store is chosen by the `Host` header the edge forwards. Orders carry an
//! idempotency key unique per store: a replayed key returns the original order
//! (never a second one), and a key reused with a different request is refused.
//! Placing an order is one transaction: the order, its lines and the removal
//! of the ordered cart lines commit together or not at all.
//!
//! **Checkout is atomic with the cart.** The cart row is the cart's lock and
//! carries a version. Every change to a cart's lines (`POST /cart`) first bumps
//! the version with an `UPDATE` (taking the row lock); checkout reads the cart
//! with `SELECT … FOR UPDATE` inside the order transaction, orders exactly the
//! lines it read, deletes exactly those lines and bumps the version once. So a
//! checkout and an add-to-cart are serialized on the cart row: an item added
//! while a checkout runs waits for it and lands in the emptied cart, or went
//! first and is in the order; it is never silently deleted. (Deleting only the
//! ordered `(product, quantity)` lines, rather than the whole cart, keeps that
//! true even for a writer that forgot the lock.)
//!
//! The checkout form carries the `cart_version` it was rendered for. A checkout
//! pinned to a version that is no longer the cart's gets a 409: either the cart
//! was already checked out (naming the order) or it changed since it was shown
//! (review it and order again). Without a pinned version, checkout orders what
//! the cart holds when it takes the lock, and an emptied, already checked-out
//! cart gets the same 409. Hence two concurrent checkouts of one cart with
//! different keys make one order and one 409.
//!
//! The idempotency key of `/checkout` covers the cart: its request hash is over
//! (email, cart id, cart version ordered), and a version names exactly one cart
//! content. A replay with the same cart returns the same order — pinned, it
//! names the same version; unpinned, the cart must be the one that order
//! emptied, untouched since. The same key with another cart, another content
//! or another email is a 422 naming `Idempotency-Key`, as with `POST /orders`.

use askama::Template;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use edgefront_schema::{StoreId, format_money};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::db::{commit_lsn, store_for_host, with_lsn};
use crate::error::ApiError;
use crate::input::Body;
use crate::state::AppState;

/// Cookie holding the shopper's cart id.
pub const CART_COOKIE: &str = "ef_cart";
/// Header carrying an order's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on a response that replays an earlier order.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OrderRow {
    pub id: i64,
    pub idempotency_key: String,
    pub email: String,
    pub currency: String,
    pub total_cents: i64,
    pub status: String,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct OrderItemRow {
    pub product_id: i64,
    pub name: String,
    pub unit_price_cents: i64,
    pub quantity: i32,
}

/// A line of an order request.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub product_id: i64,
    pub quantity: i32,
}

/// `POST /orders` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrderRequest {
    pub email: String,
    pub items: Vec<Line>,
}

/// `POST /cart` body (the storefront's add-to-cart form).
#[derive(Debug, Deserialize)]
pub struct AddToCart {
    pub product_id: i64,
    #[serde(default = "one")]
    pub quantity: i32,
}

fn one() -> i32 {
    1
}

/// `POST /checkout` body (the cart page's form).
#[derive(Debug, Deserialize)]
pub struct CheckoutForm {
    pub email: String,
    pub idempotency_key: Option<String>,
    /// The cart version the form was rendered for: the checkout orders that
    /// content or nothing (409). Without it, the cart as it is when locked.
    #[serde(default)]
    pub cart_version: Option<i64>,
}

/// The outcome of placing an order.
#[derive(Debug)]
pub struct Placed {
    pub order: OrderRow,
    pub items: Vec<OrderItemRow>,
    /// True when the key had already been used and the original order is returned.
    pub replayed: bool,
}

fn check_email(v: &str) -> Result<(), ApiError> {
    let v = v.trim();
    let ok = v.len() <= 254
        && !v.chars().any(char::is_whitespace)
        && v.split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.contains('@'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid("email", "is not an email address"))
    }
}

fn check_key(v: &str) -> Result<(), ApiError> {
    if v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(())
}

fn request_hash(email: &str, lines: &[Line]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(email.trim().to_ascii_lowercase().as_bytes());
    for l in lines {
        h.update(format!("|{}x{}", l.product_id, l.quantity).as_bytes());
    }
    h.finalize().to_vec()
}

/// The request hash of a checkout: the email and the cart (id and version,
/// which together name one content). Distinct from any [`request_hash`]: a key
/// first used on `/orders` never matches a checkout, and the reverse.
fn checkout_hash(email: &str, cart: Option<Uuid>, version: Option<i64>) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"checkout|");
    h.update(email.trim().to_ascii_lowercase().as_bytes());
    h.update(format!("|{}|{}", cart.unwrap_or_default(), version.unwrap_or(-1)).as_bytes());
    h.finalize().to_vec()
}

/// An order already placed under a key, with what its request must match.
#[derive(sqlx::FromRow)]
struct Existing {
    #[sqlx(flatten)]
    order: OrderRow,
    request_hash: Vec<u8>,
    cart_id: Option<Uuid>,
    cart_version: Option<i64>,
}

async fn existing(
    db: impl sqlx::PgExecutor<'_>,
    store: StoreId,
    key: &str,
) -> Result<Option<Existing>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT id, idempotency_key, email, currency, total_cents, status, request_hash,
                cart_id, cart_version
         FROM orders WHERE store_id = $1 AND idempotency_key = $2",
    )
    .bind(store.0)
    .bind(key)
    .fetch_optional(db)
    .await?)
}

async fn items_of(pool: &PgPool, order: i64) -> Result<Vec<OrderItemRow>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT product_id, name, unit_price_cents, quantity FROM order_items
         WHERE order_id = $1 ORDER BY product_id",
    )
    .bind(order)
    .fetch_all(pool)
    .await?)
}

async fn replay(
    pool: &PgPool,
    order: OrderRow,
    stored: &[u8],
    hash: &[u8],
) -> Result<Placed, ApiError> {
    if stored != hash {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            "this key was already used for a different order request",
        ));
    }
    let items = items_of(pool, order.id).await?;
    Ok(Placed {
        order,
        items,
        replayed: true,
    })
}

/// Checks the lines of an order and merges repeated products.
fn merge_lines(lines: &[Line]) -> Result<Vec<Line>, ApiError> {
    if lines.is_empty() {
        return Err(ApiError::invalid(
            "items",
            "an order needs at least one item",
        ));
    }
    if lines.len() > 100 {
        return Err(ApiError::invalid("items", "at most 100 lines per order"));
    }
    let mut merged: Vec<Line> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !(1..=999).contains(&l.quantity) {
            return Err(ApiError::invalid(
                format!("items[{i}].quantity"),
                "must be between 1 and 999",
            ));
        }
        match merged.iter_mut().find(|m| m.product_id == l.product_id) {
            Some(m) => m.quantity = (m.quantity + l.quantity).min(999),
            None => merged.push(l.clone()),
        }
    }
    Ok(merged)
}

/// An order priced inside its transaction.
struct Priced {
    currency: String,
    items: Vec<OrderItemRow>,
    total: i64,
}

/// Prices `merged` at the store's current prices; unknown or unavailable
/// products are refused, naming the line.
async fn price(
    tx: &mut sqlx::PgConnection,
    store: StoreId,
    merged: &[Line],
) -> Result<Priced, ApiError> {
    #[derive(sqlx::FromRow)]
    struct P {
        id: i64,
        name: String,
        price_cents: i64,
        available: bool,
    }
    let ids: Vec<i64> = merged.iter().map(|l| l.product_id).collect();
    let products: Vec<P> = sqlx::query_as(
        "SELECT id, name, price_cents, available FROM products WHERE store_id = $1 AND id = ANY($2)",
    )
    .bind(store.0)
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    let currency: String = sqlx::query_scalar("SELECT currency FROM stores WHERE id = $1")
        .bind(store.0)
        .fetch_one(&mut *tx)
        .await?;
    let mut items = Vec::with_capacity(merged.len());
    let mut total: i64 = 0;
    for (i, l) in merged.iter().enumerate() {
        let field = format!("items[{i}].product_id");
        let p = products
            .iter()
            .find(|p| p.id == l.product_id)
            .ok_or_else(|| ApiError::invalid(field.clone(), "no such product in this store"))?;
        if !p.available {
            return Err(ApiError::invalid(
                field,
                format!("{} is not available", p.name),
            ));
        }
        total = total
            .checked_add(p.price_cents.saturating_mul(i64::from(l.quantity)))
            .ok_or_else(|| ApiError::invalid("items", "order total is too large"))?;
        items.push(OrderItemRow {
            product_id: p.id,
            name: p.name.clone(),
            unit_price_cents: p.price_cents,
            quantity: l.quantity,
        });
    }
    Ok(Priced {
        currency,
        items,
        total,
    })
}

/// Inserts the order and its lines. `None` when a concurrent request took
/// the key first (this one waited on the unique index, then inserted nothing).
async fn insert_order(
    tx: &mut sqlx::PgConnection,
    store: StoreId,
    key: &str,
    hash: &[u8],
    email: &str,
    priced: &Priced,
    cart: Option<(Uuid, i64)>,
) -> Result<Option<OrderRow>, ApiError> {
    let order: Option<OrderRow> = sqlx::query_as(
        "INSERT INTO orders (store_id, idempotency_key, request_hash, email, currency, total_cents,
                             cart_id, cart_version)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (store_id, idempotency_key) DO NOTHING
         RETURNING id, idempotency_key, email, currency, total_cents, status",
    )
    .bind(store.0)
    .bind(key)
    .bind(hash)
    .bind(email.trim())
    .bind(&priced.currency)
    .bind(priced.total)
    .bind(cart.map(|c| c.0))
    .bind(cart.map(|c| c.1))
    .fetch_optional(&mut *tx)
    .await?;
    let Some(order) = order else {
        return Ok(None);
    };
    let items = &priced.items;
    sqlx::query(
        "INSERT INTO order_items (order_id, product_id, name, unit_price_cents, quantity)
         SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::bigint[], $5::int[])",
    )
    .bind(order.id)
    .bind(items.iter().map(|i| i.product_id).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.name.clone()).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.unit_price_cents).collect::<Vec<_>>())
    .bind(items.iter().map(|i| i.quantity).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(Some(order))
}

/// Places an order for `lines` once per `(store, key)` (the JSON order API);
/// `hash` decides what a replay must match.
pub async fn place(
    pool: &PgPool,
    store: StoreId,
    key: &str,
    email: &str,
    lines: Vec<Line>,
    hash: Vec<u8>,
) -> Result<Placed, ApiError> {
    check_key(key)?;
    check_email(email)?;
    if let Some(e) = existing(pool, store, key).await? {
        return replay(pool, e.order, &e.request_hash, &hash).await;
    }
    let merged = merge_lines(&lines)?;
    let mut tx = pool.begin().await?;
    let priced = price(&mut tx, store, &merged).await?;
    // A concurrent request with the same key waits on the unique index here
    // and then inserts nothing; it replays the winner's order below.
    let Some(order) = insert_order(&mut tx, store, key, &hash, email, &priced, None).await? else {
        tx.rollback().await?;
        let e = existing(pool, store, key)
            .await?
            .ok_or(ApiError::Internal)?;
        return replay(pool, e.order, &e.request_hash, &hash).await;
    };
    tx.commit().await?;
    Ok(Placed {
        order,
        items: priced.items,
        replayed: false,
    })
}

/// The newest checkout of `cart`: (order id, cart version it ordered).
async fn last_checkout(
    db: impl sqlx::PgExecutor<'_>,
    store: StoreId,
    cart: Uuid,
) -> Result<Option<(i64, i64)>, ApiError> {
    Ok(sqlx::query_as(
        "SELECT id, cart_version FROM orders
         WHERE store_id = $1 AND cart_id = $2 AND cart_version IS NOT NULL
         ORDER BY cart_version DESC LIMIT 1",
    )
    .bind(store.0)
    .bind(cart)
    .fetch_optional(db)
    .await?)
}

fn already_checked_out(order: i64) -> ApiError {
    ApiError::conflict(
        "cart",
        format!("this cart was already checked out as order #{order}; nothing was ordered twice"),
    )
}

/// Turns the shopper's cart into an order, once per `(store, key)`, atomically
/// with the cart (see the module doc). `pinned` is the cart version the
/// shopper saw, if the request names one.
pub async fn checkout_cart(
    pool: &PgPool,
    store: StoreId,
    key: &str,
    email: &str,
    cart: Option<Uuid>,
    pinned: Option<i64>,
) -> Result<Placed, ApiError> {
    check_key(key)?;
    check_email(email)?;
    let mut tx = pool.begin().await?;
    // The cart's lock: adds to this cart wait for this transaction, and this
    // transaction waits for adds (and other checkouts) already running.
    let version: Option<i64> = match cart {
        Some(c) => {
            sqlx::query_scalar(
                "SELECT version FROM carts WHERE id = $1 AND store_id = $2 FOR UPDATE",
            )
            .bind(c)
            .bind(store.0)
            .fetch_optional(&mut *tx)
            .await?
        }
        None => None,
    };
    // A cookie naming another store's cart (or none) is an empty cart.
    let cart = cart.filter(|_| version.is_some());

    // Read after the lock: a checkout of this cart that held it has committed.
    if let Some(e) = existing(&mut *tx, store, key).await? {
        tx.rollback().await?;
        // Which cart content this request stands for: the pinned version; or,
        // unpinned, the content that order took if the cart is the one it
        // emptied and nothing changed since; else the cart as it is now.
        let unchanged_since =
            e.cart_id.is_some() && e.cart_id == cart && e.cart_version.map(|v| v + 1) == version;
        let claimed = pinned.or(if unchanged_since {
            e.cart_version
        } else {
            version
        });
        let hash = checkout_hash(email, cart, claimed);
        if e.request_hash != hash {
            return Err(ApiError::invalid(
                "Idempotency-Key",
                "this key was already used to check out a different cart (or with another email)",
            ));
        }
        return replay(pool, e.order, &e.request_hash, &hash).await;
    }

    let (Some(cart_id), Some(version)) = (cart, version) else {
        return Err(ApiError::invalid("cart", "your cart is empty"));
    };
    if let Some(p) = pinned
        && p != version
    {
        let last = last_checkout(&mut *tx, store, cart_id).await?;
        tx.rollback().await?;
        return Err(match last {
            Some((order, ordered)) if ordered >= p => already_checked_out(order),
            _ => ApiError::conflict(
                "cart_version",
                "the cart changed since this checkout form was shown; review the cart and place the order again",
            ),
        });
    }
    let lines: Vec<Line> = sqlx::query_as::<_, (i64, i32)>(
        "SELECT product_id, quantity FROM cart_items WHERE cart_id = $1 ORDER BY product_id",
    )
    .bind(cart_id)
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|(product_id, quantity)| Line {
        product_id,
        quantity,
    })
    .collect();
    if lines.is_empty() {
        let last = last_checkout(&mut *tx, store, cart_id).await?;
        tx.rollback().await?;
        return Err(match last {
            // Emptied by a checkout and untouched since: that was this cart's order.
            Some((order, ordered)) if ordered + 1 == version => already_checked_out(order),
            _ => ApiError::invalid("cart", "your cart is empty"),
        });
    }
    let merged = merge_lines(&lines)?;
    let priced = price(&mut tx, store, &merged).await?;
    let hash = checkout_hash(email, Some(cart_id), Some(version));
    let Some(order) = insert_order(
        &mut tx,
        store,
        key,
        &hash,
        email,
        &priced,
        Some((cart_id, version)),
    )
    .await?
    else {
        // The key was taken meanwhile by a checkout of another cart (a
        // checkout of this cart would have waited for the lock above).
        tx.rollback().await?;
        let e = existing(pool, store, key)
            .await?
            .ok_or(ApiError::Internal)?;
        return replay(pool, e.order, &e.request_hash, &hash).await;
    };
    // Only the lines that were ordered leave the cart.
    sqlx::query(
        "DELETE FROM cart_items WHERE cart_id = $1
           AND (product_id, quantity) IN (SELECT * FROM UNNEST($2::bigint[], $3::int[]))",
    )
    .bind(cart_id)
    .bind(merged.iter().map(|l| l.product_id).collect::<Vec<_>>())
    .bind(merged.iter().map(|l| l.quantity).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE carts SET version = version + 1 WHERE id = $1")
        .bind(cart_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Placed {
        order,
        items: priced.items,
        replayed: false,
    })
}

fn host_of(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn cart_cookie(headers: &HeaderMap) -> Option<Uuid> {
    edgefront_schema::cookie(headers, CART_COOKIE).and_then(|v| Uuid::parse_str(v).ok())
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"))
}

/// `POST /orders`: the JSON order API; requires an `Idempotency-Key` header.
pub async fn place_order(
    State(st): State<AppState>,
    headers: HeaderMap,
    Body(req): Body<OrderRequest>,
) -> Result<Response, ApiError> {
    let store = store_for_host(&st, host_of(&headers)).await?;
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::invalid("Idempotency-Key", "header is required"))?
        .to_owned();
    let hash = request_hash(&req.email, &req.items);
    let placed = place(&st.pool, store, &key, &req.email, req.items, hash).await?;
    let status = if placed.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let body = json!({ "order": placed.order, "items": placed.items });
    let mut resp = (status, Json(body)).into_response();
    if placed.replayed {
        resp.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        Ok(resp)
    } else {
        Ok(with_lsn(resp, commit_lsn(&st.pool).await))
    }
}

/// `POST /cart`: adds a product to the shopper's cart (creating the cart).
pub async fn add_to_cart(
    State(st): State<AppState>,
    headers: HeaderMap,
    Body(req): Body<AddToCart>,
) -> Result<Response, ApiError> {
    let store = store_for_host(&st, host_of(&headers)).await?;
    if !(1..=999).contains(&req.quantity) {
        return Err(ApiError::invalid("quantity", "must be between 1 and 999"));
    }
    let mut tx = st.pool.begin().await?;
    let available: Option<bool> =
        sqlx::query_scalar("SELECT available FROM products WHERE id = $1 AND store_id = $2")
            .bind(req.product_id)
            .bind(store.0)
            .fetch_optional(&mut *tx)
            .await?;
    match available {
        None => {
            return Err(ApiError::invalid(
                "product_id",
                "no such product in this store",
            ));
        }
        Some(false) => return Err(ApiError::invalid("product_id", "product is not available")),
        Some(true) => {}
    }
    // A cookie naming another store's cart (or none) starts a new cart.
    let mut cart = cart_cookie(&headers).unwrap_or_else(Uuid::new_v4);
    let owner: Option<i64> = sqlx::query_scalar("SELECT store_id FROM carts WHERE id = $1")
        .bind(cart)
        .fetch_optional(&mut *tx)
        .await?;
    if owner.is_some_and(|o| o != store.0) {
        cart = Uuid::new_v4();
    }
    sqlx::query("INSERT INTO carts (id, store_id) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")
        .bind(cart)
        .bind(store.0)
        .execute(&mut *tx)
        .await?;
    // The cart's lock (see the module doc): waits for a checkout of this cart
    // in progress, so the line below lands in the cart it leaves behind.
    sqlx::query("UPDATE carts SET version = version + 1 WHERE id = $1")
        .bind(cart)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO cart_items (cart_id, product_id, quantity) VALUES ($1, $2, $3)
         ON CONFLICT (cart_id, product_id)
         DO UPDATE SET quantity = LEAST(999, cart_items.quantity + EXCLUDED.quantity)",
    )
    .bind(cart)
    .bind(req.product_id)
    .bind(req.quantity)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let lsn = commit_lsn(&st.pool).await;
    let cookie = format!("{CART_COOKIE}={cart}; Path=/; HttpOnly; SameSite=Lax; Max-Age=2592000");
    let mut resp = if wants_json(&headers) {
        let (version, lines) = cart_snapshot(&st.pool, store, cart).await?;
        Json(json!({ "cart": cart, "version": version, "items": lines })).into_response()
    } else {
        Redirect::to("/cart").into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(with_lsn(resp, lsn))
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct CartLine {
    pub product_id: i64,
    pub name: String,
    pub price_cents: i64,
    pub quantity: i32,
}

struct ShownLine {
    name: String,
    quantity: i32,
    price: String,
    subtotal: String,
}

#[derive(Template)]
#[template(path = "cart.html")]
struct CartPage {
    store_name: String,
    lines: Vec<ShownLine>,
    total: String,
    idempotency_key: String,
    cart_version: i64,
}

#[derive(Template)]
#[template(path = "order.html")]
struct OrderPage {
    store_name: String,
    order_id: i64,
    email: String,
    lines: Vec<ShownLine>,
    total: String,
    replayed: bool,
}

async fn store_name_currency(pool: &PgPool, store: StoreId) -> Result<(String, String), ApiError> {
    Ok(
        sqlx::query_as("SELECT name, currency FROM stores WHERE id = $1")
            .bind(store.0)
            .fetch_one(pool)
            .await?,
    )
}

fn render(t: impl Template) -> Result<Response, ApiError> {
    let html = t.render().map_err(|e| {
        tracing::error!(error = %e, "template render failed");
        ApiError::Internal
    })?;
    Ok(Html(html).into_response())
}

/// The cart's version and lines, read in one snapshot (so the version names
/// exactly the lines shown). A cart of another store reads as empty.
async fn cart_snapshot(
    pool: &PgPool,
    store: StoreId,
    cart: Uuid,
) -> Result<(Option<i64>, Vec<CartLine>), ApiError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM carts WHERE id = $1 AND store_id = $2")
            .bind(cart)
            .bind(store.0)
            .fetch_optional(&mut *tx)
            .await?;
    let lines = match version {
        Some(_) => {
            sqlx::query_as(
                "SELECT p.id AS product_id, p.name, p.price_cents, ci.quantity
                 FROM cart_items ci JOIN products p ON p.id = ci.product_id
                 WHERE ci.cart_id = $1 ORDER BY p.name",
            )
            .bind(cart)
            .fetch_all(&mut *tx)
            .await?
        }
        None => Vec::new(),
    };
    tx.commit().await?;
    Ok((version, lines))
}

/// `GET /cart`: the shopper's cart with a checkout form.
pub async fn view_cart(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let store = store_for_host(&st, host_of(&headers)).await?;
    let (store_name, currency) = store_name_currency(&st.pool, store).await?;
    let (version, lines) = match cart_cookie(&headers) {
        Some(c) => cart_snapshot(&st.pool, store, c).await?,
        None => (None, Vec::new()),
    };
    if wants_json(&headers) {
        return Ok(Json(json!({ "version": version, "items": lines })).into_response());
    }
    let total: i64 = lines
        .iter()
        .map(|l| l.price_cents * i64::from(l.quantity))
        .sum();
    let page = CartPage {
        store_name,
        lines: lines
            .iter()
            .map(|l| ShownLine {
                name: l.name.clone(),
                quantity: l.quantity,
                price: format_money(l.price_cents, &currency),
                subtotal: format_money(l.price_cents * i64::from(l.quantity), &currency),
            })
            .collect(),
        total: format_money(total, &currency),
        idempotency_key: Uuid::new_v4().to_string(),
        cart_version: version.unwrap_or_default(),
    };
    let mut resp = render(page)?;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// Whether the request is the storefront's HTML form (errors become a page).
fn is_form_post(headers: &HeaderMap) -> bool {
    !wants_json(headers)
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            })
}

#[derive(Template)]
#[template(path = "checkout_problem.html")]
struct CheckoutProblem {
    store_name: String,
    message: String,
}

/// A refused checkout as an HTML page with the same status as the JSON
/// error (409 or 422); other errors stay JSON.
async fn problem_page(pool: &PgPool, store: StoreId, e: ApiError) -> Result<Response, ApiError> {
    let (status, message) = match &e {
        ApiError::Conflict { message, .. } => (StatusCode::CONFLICT, message.clone()),
        ApiError::Invalid { message, field } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field}: {message}"),
        ),
        _ => return Err(e),
    };
    let (store_name, _) = store_name_currency(pool, store).await?;
    let mut resp = render(CheckoutProblem {
        store_name,
        message,
    })?;
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// `POST /checkout`: turns the cart into an order, once per idempotency key,
/// atomically with the cart. HTML for the storefront's form (errors too),
/// JSON for `Accept: application/json` (201 new, 200 replayed, 409 when the
/// cart was already checked out or changed since the pinned `cart_version`).
pub async fn checkout(
    State(st): State<AppState>,
    headers: HeaderMap,
    Body(form): Body<CheckoutForm>,
) -> Result<Response, ApiError> {
    let store = store_for_host(&st, host_of(&headers)).await?;
    let key = headers
        .get(IDEMPOTENCY_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(form.idempotency_key)
        .ok_or_else(|| ApiError::invalid("idempotency_key", "is required"))?;
    let cart = cart_cookie(&headers);
    let placed =
        match checkout_cart(&st.pool, store, &key, &form.email, cart, form.cart_version).await {
            Ok(p) => p,
            Err(e) if is_form_post(&headers) => return problem_page(&st.pool, store, e).await,
            Err(e) => return Err(e),
        };
    let lsn = if placed.replayed {
        None
    } else {
        commit_lsn(&st.pool).await
    };
    let mut resp = if wants_json(&headers) {
        let status = if placed.replayed {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        (
            status,
            Json(json!({ "order": placed.order, "items": placed.items })),
        )
            .into_response()
    } else {
        let (store_name, currency) = store_name_currency(&st.pool, store).await?;
        let o = &placed.order;
        render(OrderPage {
            store_name,
            order_id: o.id,
            email: o.email.clone(),
            lines: placed
                .items
                .iter()
                .map(|l| ShownLine {
                    name: l.name.clone(),
                    quantity: l.quantity,
                    price: format_money(l.unit_price_cents, &currency),
                    subtotal: format_money(l.unit_price_cents * i64::from(l.quantity), &currency),
                })
                .collect(),
            total: format_money(o.total_cents, &o.currency),
            replayed: placed.replayed,
        })?
    };
    if placed.replayed {
        resp.headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    Ok(with_lsn(resp, lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_and_key_validation() {
        assert!(check_email("a@b.example").is_ok());
        assert!(check_email("a b@c.example").is_err());
        assert!(check_email("nobody").is_err());
        assert!(check_email("a@b@c.example").is_err());
        assert!(check_key("k-1").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("has space").is_err());
    }

    #[test]
    fn request_hash_depends_on_lines_and_email_case_insensitively() {
        let l = |p, q| Line {
            product_id: p,
            quantity: q,
        };
        let a = request_hash("A@x.example", &[l(1, 2)]);
        assert_eq!(a, request_hash("a@x.example", &[l(1, 2)]));
        assert_ne!(a, request_hash("a@x.example", &[l(1, 3)]));
    }

    #[test]
    fn checkout_hash_covers_email_cart_and_version() {
        let c = Some(Uuid::new_v4());
        let a = checkout_hash("A@x.example", c, Some(3));
        assert_eq!(a, checkout_hash("a@x.example", c, Some(3)));
        assert_ne!(a, checkout_hash("a@x.example", c, Some(4)));
        assert_ne!(
            a,
            checkout_hash("a@x.example", Some(Uuid::new_v4()), Some(3))
        );
        assert_ne!(a, checkout_hash("b@x.example", c, Some(3)));
        assert_ne!(a, checkout_hash("a@x.example", None, Some(3)));
        assert_ne!(a, request_hash("a@x.example", &[]));
    }

    #[test]
    fn cart_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        let id = Uuid::new_v4();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("x=1; {CART_COOKIE}={id}; y=2")).expect("hv"),
        );
        assert_eq!(cart_cookie(&h), Some(id));
    }
}

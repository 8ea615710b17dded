//! The seller API: stores, categories, products and custom domains.
//!
//! Every handler but store creation is authenticated by [`Seller`], and every
//! query is scoped by the authenticated store id, so one store's token can
//! never read or change another store's rows (they answer 404, which also
//! hides their existence). Each write is a single statement or transaction;
//! validation happens before it, so nothing is half-written.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use edgefront_schema::{Hostname, HostnameError, StoreId};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::json;
use sqlx::PgPool;

use crate::auth::{Seller, new_token};
use crate::db::{commit_lsn, with_lsn};
use crate::error::{ApiError, constraint};
use crate::input::Body;
use crate::ownership;
use crate::state::AppState;

/// Currencies the storefront can format.
pub const CURRENCIES: &[&str] = &[
    "USD", "EUR", "GBP", "INR", "JPY", "SGD", "AUD", "BRL", "CHF",
];

/// A new store.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewStore {
    pub name: String,
    pub slug: String,
    pub currency: String,
    #[serde(default)]
    pub tagline: String,
}

/// Changes to a store; absent fields stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorePatch {
    pub name: Option<String>,
    pub tagline: Option<String>,
    pub currency: Option<String>,
}

/// A new category; the slug is derived from the name when absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCategory {
    pub name: String,
    pub slug: Option<String>,
    #[serde(default)]
    pub position: i32,
}

/// Changes to a category.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryPatch {
    pub name: Option<String>,
    pub slug: Option<String>,
    pub position: Option<i32>,
}

/// A new product; the slug is derived from the name when absent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    pub name: String,
    pub slug: Option<String>,
    #[serde(default)]
    pub description: String,
    pub price_cents: i64,
    pub category_id: Option<i64>,
    #[serde(default = "yes")]
    pub available: bool,
    #[serde(default)]
    pub position: i32,
}

fn yes() -> bool {
    true
}

/// Changes to a product. `category_id: null` uncategorises; absent keeps it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductPatch {
    pub name: Option<String>,
    pub slug: Option<String>,
    pub description: Option<String>,
    pub price_cents: Option<i64>,
    #[serde(default, deserialize_with = "present")]
    pub category_id: Option<Option<i64>>,
    pub available: Option<bool>,
    pub position: Option<i32>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<i64>>, D::Error> {
    Option::<i64>::deserialize(d).map(Some)
}

/// A domain to attach.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDomain {
    pub hostname: String,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct StoreRow {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub tagline: String,
    pub currency: String,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct CategoryRow {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub position: i32,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct ProductRow {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub category_id: Option<i64>,
    pub available: bool,
    pub position: i32,
}

/// Lower-case ASCII slug from a display name: `Café Crème` → `cafe-creme`.
/// Characters without an ASCII letter or digit become separators; a name with
/// none at all (emoji only) yields `None`.
pub fn slugify(name: &str) -> Option<String> {
    let mut out = String::new();
    for c in name.chars() {
        let c = fold_accent(c);
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= 72 {
            break;
        }
    }
    let s = out.trim_matches('-').to_owned();
    (!s.is_empty()).then_some(s)
}

fn fold_accent(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'À' | 'Á' | 'Â' | 'Ã' | 'Ä' | 'Å' => 'a',
        'ç' | 'Ç' => 'c',
        'è' | 'é' | 'ê' | 'ë' | 'È' | 'É' | 'Ê' | 'Ë' => 'e',
        'ì' | 'í' | 'î' | 'ï' | 'Ì' | 'Í' | 'Î' | 'Ï' => 'i',
        'ñ' | 'Ñ' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'Ò' | 'Ó' | 'Ô' | 'Õ' | 'Ö' | 'Ø' => 'o',
        'ù' | 'ú' | 'û' | 'ü' | 'Ù' | 'Ú' | 'Û' | 'Ü' => 'u',
        'ý' | 'ÿ' | 'Ý' => 'y',
        'ß' => 's',
        other => other,
    }
}

fn check_text(field: &str, v: &str, min: usize, max: usize) -> Result<(), ApiError> {
    let n = v.chars().count();
    if v.trim().len() < min {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if n > max {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_slug(field: &str, v: &str, max: usize) -> Result<(), ApiError> {
    let ok = !v.is_empty()
        && v.len() <= max
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("must be 1 to {max} lower-case letters, digits or inner hyphens"),
        ))
    }
}

fn check_currency(v: &str) -> Result<(), ApiError> {
    if CURRENCIES.contains(&v) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "currency",
            format!("must be one of {}", CURRENCIES.join(", ")),
        ))
    }
}

fn check_price(field: &str, v: i64) -> Result<(), ApiError> {
    if (0..=100_000_000_000).contains(&v) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "must be between 0 and 100000000000 (minor units)",
        ))
    }
}

fn slug_or_derived(slug: Option<String>, name: &str) -> Result<String, ApiError> {
    match slug {
        Some(s) => {
            check_slug("slug", &s, 80)?;
            Ok(s)
        }
        None => slugify(name).ok_or_else(|| {
            ApiError::invalid(
                "slug",
                "cannot derive a slug from this name; give one explicitly",
            )
        }),
    }
}

fn created(body: serde_json::Value, lsn: Option<edgefront_schema::Lsn>) -> Response {
    with_lsn((StatusCode::CREATED, Json(body)).into_response(), lsn)
}

fn ok(body: serde_json::Value, lsn: Option<edgefront_schema::Lsn>) -> Response {
    with_lsn(Json(body).into_response(), lsn)
}

/// Inserts a store and returns it with its token (shown only now).
pub async fn insert_store(pool: &PgPool, s: NewStore) -> Result<(StoreRow, String), ApiError> {
    check_text("name", &s.name, 1, 200)?;
    check_slug("slug", &s.slug, 63)?;
    check_currency(&s.currency)?;
    check_text("tagline", &s.tagline, 0, 500)?;
    let (token, hash) = new_token();
    let row: StoreRow = sqlx::query_as(
        "INSERT INTO stores (slug, name, tagline, currency, token_hash) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, slug, name, tagline, currency",
    )
    .bind(&s.slug)
    .bind(s.name.trim())
    .bind(s.tagline.trim())
    .bind(&s.currency)
    .bind(hash)
    .fetch_one(pool)
    .await
    .map_err(|e| match constraint(&e).as_deref() {
        Some("stores_slug_key") => ApiError::conflict("slug", "slug is taken"),
        _ => e.into(),
    })?;
    Ok((row, token))
}

/// `POST /api/stores`: open sign-up; returns the store and its API token.
pub async fn create_store(
    State(st): State<AppState>,
    Body(s): Body<NewStore>,
) -> Result<Response, ApiError> {
    let (row, token) = insert_store(&st.pool, s).await?;
    let url = format!("http://{}.{}/", row.slug, st.platform_domain);
    let lsn = commit_lsn(&st.pool).await;
    Ok(created(
        json!({ "store": row, "token": token, "url": url }),
        lsn,
    ))
}

/// `GET /api/store`: the authenticated store and its domains.
pub async fn get_store(
    State(st): State<AppState>,
    Seller(id): Seller,
) -> Result<Response, ApiError> {
    let row: StoreRow =
        sqlx::query_as("SELECT id, slug, name, tagline, currency FROM stores WHERE id = $1")
            .bind(id.0)
            .fetch_one(&st.pool)
            .await?;
    let domains: Vec<String> =
        sqlx::query_scalar("SELECT hostname FROM domains WHERE store_id = $1 ORDER BY hostname")
            .bind(id.0)
            .fetch_all(&st.pool)
            .await?;
    Ok(ok(json!({ "store": row, "domains": domains }), None))
}

/// `PATCH /api/store`.
pub async fn update_store(
    State(st): State<AppState>,
    Seller(id): Seller,
    Body(p): Body<StorePatch>,
) -> Result<Response, ApiError> {
    if let Some(v) = &p.name {
        check_text("name", v, 1, 200)?;
    }
    if let Some(v) = &p.tagline {
        check_text("tagline", v, 0, 500)?;
    }
    if let Some(v) = &p.currency {
        check_currency(v)?;
    }
    let row: StoreRow = sqlx::query_as(
        "UPDATE stores SET name = COALESCE($2, name), tagline = COALESCE($3, tagline),
                currency = COALESCE($4, currency), updated_at = now()
         WHERE id = $1 RETURNING id, slug, name, tagline, currency",
    )
    .bind(id.0)
    .bind(p.name.as_deref().map(str::trim))
    .bind(p.tagline.as_deref().map(str::trim))
    .bind(p.currency)
    .fetch_one(&st.pool)
    .await?;
    let lsn = commit_lsn(&st.pool).await;
    Ok(ok(json!({ "store": row }), lsn))
}

/// Inserts a category into `store`.
pub async fn insert_category(
    pool: &PgPool,
    store: StoreId,
    c: NewCategory,
) -> Result<CategoryRow, ApiError> {
    check_text("name", &c.name, 1, 200)?;
    let slug = slug_or_derived(c.slug, &c.name)?;
    sqlx::query_as(
        "INSERT INTO categories (store_id, slug, name, position) VALUES ($1, $2, $3, $4)
         RETURNING id, slug, name, position",
    )
    .bind(store.0)
    .bind(&slug)
    .bind(c.name.trim())
    .bind(c.position)
    .fetch_one(pool)
    .await
    .map_err(|e| match constraint(&e).as_deref() {
        Some("categories_store_id_slug_key") => ApiError::conflict(
            "slug",
            format!("category slug {slug:?} is taken in this store"),
        ),
        _ => e.into(),
    })
}

/// `GET /api/categories`.
pub async fn list_categories(
    State(st): State<AppState>,
    Seller(id): Seller,
) -> Result<Response, ApiError> {
    let rows: Vec<CategoryRow> = sqlx::query_as(
        "SELECT id, slug, name, position FROM categories WHERE store_id = $1 ORDER BY position, id",
    )
    .bind(id.0)
    .fetch_all(&st.pool)
    .await?;
    Ok(ok(json!({ "categories": rows }), None))
}

/// `POST /api/categories`.
pub async fn create_category(
    State(st): State<AppState>,
    Seller(id): Seller,
    Body(c): Body<NewCategory>,
) -> Result<Response, ApiError> {
    let row = insert_category(&st.pool, id, c).await?;
    let lsn = commit_lsn(&st.pool).await;
    Ok(created(json!({ "category": row }), lsn))
}

/// `PATCH /api/categories/{id}`.
pub async fn update_category(
    State(st): State<AppState>,
    Seller(store): Seller,
    Path(cat): Path<i64>,
    Body(p): Body<CategoryPatch>,
) -> Result<Response, ApiError> {
    if let Some(v) = &p.name {
        check_text("name", v, 1, 200)?;
    }
    if let Some(v) = &p.slug {
        check_slug("slug", v, 80)?;
    }
    let row: Option<CategoryRow> = sqlx::query_as(
        "UPDATE categories SET name = COALESCE($3, name), slug = COALESCE($4, slug),
                position = COALESCE($5, position)
         WHERE id = $1 AND store_id = $2 RETURNING id, slug, name, position",
    )
    .bind(cat)
    .bind(store.0)
    .bind(p.name.as_deref().map(str::trim))
    .bind(&p.slug)
    .bind(p.position)
    .fetch_optional(&st.pool)
    .await
    .map_err(|e| match constraint(&e).as_deref() {
        Some("categories_store_id_slug_key") => {
            ApiError::conflict("slug", "category slug is taken")
        }
        _ => e.into(),
    })?;
    let row = row.ok_or(ApiError::NotFound("category"))?;
    let lsn = commit_lsn(&st.pool).await;
    Ok(ok(json!({ "category": row }), lsn))
}

/// `DELETE /api/categories/{id}`: its products stay, uncategorised.
pub async fn delete_category(
    State(st): State<AppState>,
    Seller(store): Seller,
    Path(cat): Path<i64>,
) -> Result<Response, ApiError> {
    let n = sqlx::query("DELETE FROM categories WHERE id = $1 AND store_id = $2")
        .bind(cat)
        .bind(store.0)
        .execute(&st.pool)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::NotFound("category"));
    }
    let lsn = commit_lsn(&st.pool).await;
    Ok(ok(json!({ "deleted": cat }), lsn))
}

fn product_constraint(e: sqlx::Error) -> ApiError {
    match constraint(&e).as_deref() {
        Some("products_store_id_slug_key") => {
            ApiError::conflict("slug", "product slug is taken in this store")
        }
        Some("products_store_id_category_id_fkey") => {
            ApiError::invalid("category_id", "no such category in this store")
        }
        _ => e.into(),
    }
}

/// Inserts a product into `store`.
pub async fn insert_product(
    pool: &PgPool,
    store: StoreId,
    p: NewProduct,
) -> Result<ProductRow, ApiError> {
    check_text("name", &p.name, 1, 200)?;
    check_text("description", &p.description, 0, 5000)?;
    check_price("price_cents", p.price_cents)?;
    let slug = slug_or_derived(p.slug, &p.name)?;
    sqlx::query_as(
        "INSERT INTO products (store_id, slug, name, description, price_cents, category_id, available, position)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         RETURNING id, slug, name, description, price_cents, category_id, available, position",
    )
    .bind(store.0)
    .bind(&slug)
    .bind(p.name.trim())
    .bind(p.description.trim())
    .bind(p.price_cents)
    .bind(p.category_id)
    .bind(p.available)
    .bind(p.position)
    .fetch_one(pool)
    .await
    .map_err(product_constraint)
}

/// `GET /api/products`.
pub async fn list_products(
    State(st): State<AppState>,
    Seller(id): Seller,
) -> Result<Response, ApiError> {
    let rows: Vec<ProductRow> = sqlx::query_as(
        "SELECT id, slug, name, description, price_cents, category_id, available, position
         FROM products WHERE store_id = $1 ORDER BY position, id",
    )
    .bind(id.0)
    .fetch_all(&st.pool)
    .await?;
    Ok(ok(json!({ "products": rows }), None))
}

/// `POST /api/products`.
pub async fn create_product(
    State(st): State<AppState>,
    Seller(id): Seller,
    Body(p): Body<NewProduct>,
) -> Result<Response, ApiError> {
    let row = insert_product(&st.pool, id, p).await?;
    let lsn = commit_lsn(&st.pool).await;
    Ok(created(json!({ "product": row }), lsn))
}

/// `PATCH /api/products/{id}`.
pub async fn update_product(
    State(st): State<AppState>,
    Seller(store): Seller,
    Path(pid): Path<i64>,
    Body(p): Body<ProductPatch>,
) -> Result<Response, ApiError> {
    if let Some(v) = &p.name {
        check_text("name", v, 1, 200)?;
    }
    if let Some(v) = &p.description {
        check_text("description", v, 0, 5000)?;
    }
    if let Some(v) = p.price_cents {
        check_price("price_cents", v)?;
    }
    if let Some(v) = &p.slug {
        check_slug("slug", v, 80)?;
    }
    let row: Option<ProductRow> = sqlx::query_as(
        "UPDATE products SET name = COALESCE($3, name), slug = COALESCE($4, slug),
                description = COALESCE($5, description), price_cents = COALESCE($6, price_cents),
                category_id = CASE WHEN $7 THEN $8 ELSE category_id END,
                available = COALESCE($9, available), position = COALESCE($10, position)
         WHERE id = $1 AND store_id = $2
         RETURNING id, slug, name, description, price_cents, category_id, available, position",
    )
    .bind(pid)
    .bind(store.0)
    .bind(p.name.as_deref().map(str::trim))
    .bind(&p.slug)
    .bind(p.description.as_deref().map(str::trim))
    .bind(p.price_cents)
    .bind(p.category_id.is_some())
    .bind(p.category_id.flatten())
    .bind(p.available)
    .bind(p.position)
    .fetch_optional(&st.pool)
    .await
    .map_err(product_constraint)?;
    let row = row.ok_or(ApiError::NotFound("product"))?;
    let lsn = commit_lsn(&st.pool).await;
    Ok(ok(json!({ "product": row }), lsn))
}

/// `DELETE /api/products/{id}`.
pub async fn delete_product(
    State(st): State<AppState>,
    Seller(store): Seller,
    Path(pid): Path<i64>,
) -> Result<Response, ApiError> {
    let n = sqlx::query("DELETE FROM products WHERE id = $1 AND store_id = $2")
        .bind(pid)
        .bind(store.0)
        .execute(&st.pool)
        .await?
        .rows_affected();
    if n == 0 {
        return Err(ApiError::NotFound("product"));
    }
    let lsn = commit_lsn(&st.pool).await;
    Ok(ok(json!({ "deleted": pid }), lsn))
}

/// Validates a custom domain for `store`: normalised, not an IP literal, not
/// under the platform domain (those are assigned by slug).
pub fn validate_domain(raw: &str, platform_domain: &str) -> Result<Hostname, ApiError> {
    if raw.trim_start().starts_with('*') {
        return Err(ApiError::invalid(
            "hostname",
            "wildcard names cannot be claimed; claim each hostname",
        ));
    }
    let host: Hostname = raw
        .parse()
        .map_err(|e: HostnameError| ApiError::invalid("hostname", e.to_string()))?;
    // `_edgefront.<hostname>` must itself be a valid DNS name (≤ 253).
    if host.as_str().len() > 242 {
        return Err(ApiError::invalid(
            "hostname",
            "longer than 242 characters (the proof record _edgefront.<hostname> must fit in DNS)",
        ));
    }
    if host.is_within(platform_domain) {
        return Err(ApiError::invalid(
            "hostname",
            format!("names under {platform_domain} are assigned by store slug"),
        ));
    }
    Ok(host)
}

/// Attaches a custom domain to `store` as already proven: the operator's
/// path (demo data, migrations of existing sellers), never the seller API's.
/// The claim is active and re-checked like any other, so it is suspended
/// after the grace period if its record is never published.
pub async fn attach_verified_domain(
    pool: &PgPool,
    platform_domain: &str,
    store: StoreId,
    raw: &str,
) -> Result<Hostname, ApiError> {
    let host = validate_domain(raw, platform_domain)?;
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO domains (hostname, store_id) VALUES ($1, $2)")
        .bind(host.as_str())
        .bind(store.0)
        .execute(&mut *tx)
        .await
        .map_err(|e| match constraint(&e).as_deref() {
            Some("domains_pkey") => {
                ApiError::conflict("hostname", "hostname is active on another store")
            }
            _ => e.into(),
        })?;
    sqlx::query(
        "INSERT INTO domain_claims (store_id, hostname, token, state, verified_at, checked_at,
                                    check_result, next_check_at)
         VALUES ($1, $2, $3, 'active', now(), now(), 'attached by the operator', now())
         ON CONFLICT (store_id, hostname) DO UPDATE
             SET state = 'active', verified_at = now(), checked_at = now(),
                 check_result = EXCLUDED.check_result, failing_since = NULL, failures = 0",
    )
    .bind(store.0)
    .bind(host.as_str())
    .bind(ownership::new_token())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(host)
}

/// Parses a hostname from the path.
fn path_host(raw: &str) -> Result<Hostname, ApiError> {
    raw.parse()
        .map_err(|e: HostnameError| ApiError::invalid("hostname", e.to_string()))
}

/// `{"domain": claim}` of `store`'s claim of `host`, or 404.
async fn claim_response(
    st: &AppState,
    store: StoreId,
    host: &Hostname,
    lsn: Option<edgefront_schema::Lsn>,
) -> Result<Response, ApiError> {
    let c = ownership::claim(&st.pool, store.0, host.as_str())
        .await?
        .ok_or(ApiError::NotFound("domain"))?;
    Ok(ok(json!({ "domain": c }), lsn))
}

/// `POST /api/domains`: claims a custom domain. The claim is `pending` until
/// the TXT record in its `record` is found (see [`crate::ownership`]); it is
/// never served or given a certificate before. 201 with the new claim; 200
/// with the existing one if this store already claimed the name.
pub async fn add_domain(
    State(st): State<AppState>,
    Seller(store): Seller,
    Body(d): Body<NewDomain>,
) -> Result<Response, ApiError> {
    let host = validate_domain(&d.hostname, &st.platform_domain)?;
    if ownership::claim(&st.pool, store.0, host.as_str())
        .await?
        .is_some()
    {
        return claim_response(&st, store, &host, None).await;
    }
    let mut tx = st.pool.begin().await?;
    // One claim at a time per store: the pending count below is then exact.
    sqlx::query("SELECT 1 FROM stores WHERE id = $1 FOR UPDATE")
        .bind(store.0)
        .execute(&mut *tx)
        .await?;
    let elsewhere: Option<i64> =
        sqlx::query_scalar("SELECT store_id FROM domains WHERE hostname = $1")
            .bind(host.as_str())
            .fetch_optional(&mut *tx)
            .await?;
    if elsewhere.is_some_and(|s| s != store.0) {
        return Err(ApiError::conflict(
            "hostname",
            "hostname is active on another store; it must be removed there (or its proof lapse) first",
        ));
    }
    let pending: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM domain_claims WHERE store_id = $1 AND state = 'pending'",
    )
    .bind(store.0)
    .fetch_one(&mut *tx)
    .await?;
    if pending >= st.verifier.settings.max_pending_per_store {
        return Err(ApiError::invalid(
            "hostname",
            format!("this store already has {pending} pending domains; prove or remove some first"),
        ));
    }
    let inserted = sqlx::query(
        "INSERT INTO domain_claims (store_id, hostname, token) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(store.0)
    .bind(host.as_str())
    .bind(ownership::new_token())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    let mut resp = claim_response(&st, store, &host, None).await?;
    if inserted == 1 {
        *resp.status_mut() = StatusCode::CREATED;
    }
    Ok(resp)
}

/// `GET /api/domains`: the store's claims with state, token, the record to
/// create and the last check's result.
pub async fn list_domains(
    State(st): State<AppState>,
    Seller(store): Seller,
) -> Result<Response, ApiError> {
    let all = ownership::claims(&st.pool, store.0).await?;
    // Certificate orders of this store's domains, when paused by the budgets.
    let acme = crate::budget::pause(&st.pool, store.0)
        .await?
        .map(|(until, reason)| json!({ "paused_until": until, "reason": reason }));
    Ok(ok(json!({ "domains": all, "acme_paused": acme }), None))
}

/// `GET /api/domains/{hostname}`.
pub async fn get_domain(
    State(st): State<AppState>,
    Seller(store): Seller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let host = path_host(&raw)?;
    claim_response(&st, store, &host, None).await
}

/// `POST /api/domains/{hostname}/verify`: looks the proof up now (instead
/// of waiting for the next scheduled check) and returns the claim.
pub async fn verify_domain(
    State(st): State<AppState>,
    Seller(store): Seller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let host = path_host(&raw)?;
    let outcome = ownership::check(&st.pool, &st.verifier, store.0, host.as_str()).await?;
    crate::metrics::domain_checked(outcome.label());
    let lsn = match outcome {
        ownership::Outcome::Activated | ownership::Outcome::Suspended => commit_lsn(&st.pool).await,
        _ => None,
    };
    claim_response(&st, store, &host, lsn).await
}

/// `DELETE /api/domains/{hostname}`: removes the claim and stops serving
/// the name. Claiming it again (by any store) needs a fresh proof.
pub async fn remove_domain(
    State(st): State<AppState>,
    Seller(store): Seller,
    Path(raw): Path<String>,
) -> Result<Response, ApiError> {
    let host = path_host(&raw)?;
    let mut tx = st.pool.begin().await?;
    let n = sqlx::query("DELETE FROM domain_claims WHERE hostname = $1 AND store_id = $2")
        .bind(host.as_str())
        .bind(store.0)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query("DELETE FROM domains WHERE hostname = $1 AND store_id = $2")
        .bind(host.as_str())
        .bind(store.0)
        .execute(&mut *tx)
        .await?;
    if n == 0 {
        return Err(ApiError::NotFound("domain"));
    }
    tx.commit().await?;
    let lsn = commit_lsn(&st.pool).await;
    Ok(ok(json!({ "deleted": host }), lsn))
}

/// `GET /api/orders`: the store's most recent orders.
pub async fn list_orders(
    State(st): State<AppState>,
    Seller(store): Seller,
) -> Result<Response, ApiError> {
    let rows: Vec<crate::shop::OrderRow> = sqlx::query_as(
        "SELECT id, idempotency_key, email, currency, total_cents, status FROM orders
         WHERE store_id = $1 ORDER BY id DESC LIMIT 100",
    )
    .bind(store.0)
    .fetch_all(&st.pool)
    .await?;
    Ok(ok(json!({ "orders": rows }), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugify_folds_accents_and_drops_symbols() {
        assert_eq!(
            slugify("Café Crème Brûlée").as_deref(),
            Some("cafe-creme-brulee")
        );
        assert_eq!(
            slugify("  <script>alert(1)</script> ").as_deref(),
            Some("script-alert-1-script")
        );
        assert_eq!(slugify("🌶️🔥"), None);
        assert_eq!(slugify("Paneer 🔥 Tikka").as_deref(), Some("paneer-tikka"));
    }

    #[test]
    fn validate_domain_rejects_platform_names_and_ips() {
        assert!(validate_domain("a.shops.edgefront.test", "shops.edgefront.test").is_err());
        assert!(validate_domain("198.51.100.7", "shops.edgefront.test").is_err());
        assert!(validate_domain("shops.edgefront.test", "shops.edgefront.test").is_err());
        assert!(validate_domain("*.example.com", "shops.edgefront.test").is_err());
        let h = validate_domain("Bücher.Example.", "shops.edgefront.test").expect("valid");
        assert_eq!(h.as_str(), "xn--bcher-kva.example");
    }

    #[test]
    fn check_text_counts_characters_not_bytes() {
        assert!(check_text("name", &"é".repeat(200), 1, 200).is_ok());
        assert!(check_text("name", &"é".repeat(201), 1, 200).is_err());
        assert!(check_text("name", "   ", 1, 200).is_err());
        assert!(check_text("name", "a\u{0}b", 1, 200).is_err());
    }
}

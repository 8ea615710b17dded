//! Demo data: realistic stores for the lab, benchmarks and manual testing.
//!
//! One large menu-style store (22 categories, 176 products), several small
//! ones in different currencies, names with accents, emoji, an IDN domain and a
//! store whose seller typed hostile HTML everywhere (the storefront must show it
//! as text). Written through the same functions as the seller API, so the
//! demo exercises validation and the change-log triggers too.

use edgefront_schema::StoreId;
use serde::Serialize;
use sqlx::PgPool;

use crate::catalog::{
    NewCategory, NewProduct, NewStore, attach_verified_domain, insert_category, insert_product,
    insert_store,
};
use crate::error::ApiError;

/// One demo store as created.
#[derive(Debug, Clone, Serialize)]
pub struct DemoStore {
    pub id: i64,
    pub slug: String,
    pub name: String,
    /// The API token; `None` when the store already existed.
    pub token: Option<String>,
    pub domains: Vec<String>,
    pub products: usize,
}

/// A product line of a spec: name, description, price in minor units.
type Item = (String, String, i64);

struct Spec {
    slug: &'static str,
    name: &'static str,
    tagline: &'static str,
    currency: &'static str,
    domains: &'static [&'static str],
    /// (category, [(product, description, price in minor units)])
    catalog: Vec<(String, Vec<Item>)>,
}

const MENU: &[(&str, &[&str])] = &[
    (
        "Starters",
        &["Samosa", "Onion Bhaji", "Aloo Tikki", "Hara Bhara Kebab"],
    ),
    (
        "Tandoor",
        &[
            "Paneer Tikka 🔥",
            "Tandoori Chicken",
            "Malai Broccoli",
            "Tandoori Prawns",
        ],
    ),
    (
        "Curries",
        &[
            "Butter Chicken",
            "Palak Paneer",
            "Rogan Josh",
            "Chana Masala",
        ],
    ),
    (
        "Biryani",
        &[
            "Hyderabadi Biryani",
            "Lucknowi Biryani",
            "Vegetable Biryani",
            "Egg Biryani",
        ],
    ),
    (
        "Breads",
        &["Butter Naan", "Garlic Naan", "Laccha Paratha", "Missi Roti"],
    ),
    (
        "Rice",
        &["Jeera Rice", "Lemon Rice", "Curd Rice", "Ghee Rice"],
    ),
    ("Dals", &["Dal Makhani", "Dal Tadka", "Sambar", "Rasam"]),
    (
        "Thalis",
        &[
            "Gujarati Thali",
            "Rajasthani Thali",
            "Punjabi Thali",
            "Kerala Sadya",
        ],
    ),
    (
        "Dosas",
        &["Masala Dosa", "Rava Dosa", "Mysore Dosa", "Set Dosa"],
    ),
    (
        "Chaat",
        &["Pani Puri", "Bhel Puri", "Papdi Chaat", "Dahi Puri"],
    ),
    (
        "Idli & Vada",
        &["Idli", "Medu Vada", "Rava Idli", "Sambar Vada"],
    ),
    (
        "Indo-Chinese",
        &[
            "Gobi Manchurian",
            "Hakka Noodles",
            "Chilli Paneer",
            "Schezwan Rice",
        ],
    ),
    (
        "Kebabs",
        &[
            "Seekh Kebab",
            "Galouti Kebab",
            "Shami Kebab",
            "Reshmi Kebab",
        ],
    ),
    (
        "Seafood",
        &[
            "Goan Fish Curry",
            "Prawn Balchão",
            "Fish Amritsari",
            "Crab Xacuti",
        ],
    ),
    ("Salads", &["Kachumber", "Sprout Salad", "Raita", "Papad"]),
    (
        "Soups",
        &[
            "Tomato Shorba",
            "Mulligatawny",
            "Sweet Corn Soup",
            "Manchow Soup",
        ],
    ),
    (
        "Desserts",
        &[
            "Gulab Jamun",
            "Rasmalai",
            "Crème Brûlée à la Cardamome",
            "Gajar Halwa",
        ],
    ),
    (
        "Kulfi & Ice Cream",
        &["Malai Kulfi", "Pista Kulfi", "Mango Sorbet 🥭", "Falooda"],
    ),
    (
        "Lassi & Shakes",
        &[
            "Sweet Lassi",
            "Mango Lassi 🥭",
            "Rose Lassi",
            "Chikoo Shake",
        ],
    ),
    (
        "Chai & Coffee",
        &[
            "Masala Chai ☕",
            "Filter Coffee",
            "Kashmiri Kahwa",
            "Irani Chai",
        ],
    ),
    (
        "Mocktails",
        &["Jaljeera", "Nimbu Pani", "Kokum Sherbet", "Aam Panna"],
    ),
    (
        "Combos",
        &[
            "Family Feast",
            "Lunch Box",
            "Date Night",
            "Party Platter 🎉",
        ],
    ),
];

fn spice_route() -> Spec {
    let mut catalog = Vec::new();
    for (ci, (cat, dishes)) in MENU.iter().enumerate() {
        let mut items = Vec::new();
        for (di, dish) in dishes.iter().enumerate() {
            let base = 9_900 + (ci as i64 * 1_700 + di as i64 * 2_300) % 30_000;
            items.push((
                dish.to_string(),
                format!("{dish}, cooked to our house recipe. Serves one."),
                base,
            ));
            items.push((
                format!("{dish} — Chef’s Special"),
                format!(
                    "A richer {dish} with seasonal spices and a garnish of the day. Serves two."
                ),
                base * 2 - 1_100,
            ));
        }
        catalog.push((cat.to_string(), items));
    }
    Spec {
        slug: "spice-route",
        name: "Spice Route Kitchen",
        tagline: "Mumbai street food and regional classics, delivered hot.",
        currency: "INR",
        domains: &["spiceroute.example"],
        catalog,
    }
}

fn small(
    slug: &'static str,
    name: &'static str,
    tagline: &'static str,
    currency: &'static str,
    domains: &'static [&'static str],
    cats: &[(&str, &[(&str, i64)])],
) -> Spec {
    Spec {
        slug,
        name,
        tagline,
        currency,
        domains,
        catalog: cats
            .iter()
            .map(|(c, ps)| {
                (
                    c.to_string(),
                    ps.iter()
                        .map(|(p, price)| (p.to_string(), format!("{p} — from {name}."), *price))
                        .collect(),
                )
            })
            .collect(),
    }
}

fn specs() -> Vec<Spec> {
    vec![
        spice_route(),
        small(
            "cafe-lumiere",
            "Café Lumière",
            "Pâtisserie et café, depuis 1952.",
            "EUR",
            &["cafe-lumiere.example"],
            &[
                (
                    "Viennoiseries",
                    &[
                        ("Croissant au beurre", 180),
                        ("Pain au chocolat", 210),
                        ("Brioche tressée", 350),
                    ],
                ),
                (
                    "Pâtisseries",
                    &[
                        ("Tarte Tatin", 550),
                        ("Éclair au café", 420),
                        ("Mille-feuille", 480),
                        ("Crème brûlée", 650),
                    ],
                ),
                (
                    "Boissons",
                    &[("Café crème", 320), ("Chocolat chaud à l’ancienne", 450)],
                ),
            ],
        ),
        small(
            "tokyo-tea",
            "Tokyo Tea House 🍵",
            "Single-origin matcha and sencha from Uji and Shizuoka.",
            "JPY",
            &["matcha.example"],
            &[
                (
                    "Matcha",
                    &[
                        ("Uji Ceremonial Matcha 抹茶", 3_800),
                        ("Everyday Matcha", 2_200),
                    ],
                ),
                (
                    "Sencha",
                    &[("Shizuoka Sencha 煎茶", 1_600), ("Gyokuro 玉露", 4_500)],
                ),
                (
                    "Teaware",
                    &[("Chasen bamboo whisk", 2_900), ("Kyusu teapot", 6_800)],
                ),
            ],
        ),
        small(
            "buecherwurm",
            "Bücherwurm",
            "Antiquariat für Leserinnen und Leser.",
            "EUR",
            &["bücher.example"],
            &[
                ("Romane", &[("Der Zauberberg", 1_450), ("Effi Briest", 890)]),
                ("Lyrik", &[("Gedichte – Rilke", 1_200)]),
            ],
        ),
        small(
            "hostile",
            "<script>alert('store')</script> Goods & \"Co\"",
            "<img src=x onerror=alert('tagline')> We sell </title> things",
            "USD",
            &["hostile.example"],
            &[(
                "<b>Bold</b> & <i>Brash</i>",
                &[
                    ("<script>alert(\"xss\")</script> Mug", 1_500),
                    ("\"><img src=x onerror=alert(1)> Tee", 2_500),
                    ("Bobby'); DROP TABLE products;-- Socks", 900),
                ],
            )],
        ),
        small(
            "brooklyn-bikes",
            "Brooklyn Bikes",
            "Steel frames, built to last.",
            "USD",
            &[],
            &[
                (
                    "Bikes",
                    &[("Flatbush Fixie", 64_900), ("Prospect Tourer", 119_900)],
                ),
                (
                    "Parts",
                    &[
                        ("Brooks saddle", 14_500),
                        ("Inner tube 700c", 899),
                        ("LED light set 💡", 3_999),
                    ],
                ),
            ],
        ),
    ]
}

async fn existing(pool: &PgPool, slug: &str) -> Result<Option<(i64, String)>, ApiError> {
    Ok(
        sqlx::query_as("SELECT id, name FROM stores WHERE slug = $1")
            .bind(slug)
            .fetch_optional(pool)
            .await?,
    )
}

/// Creates the demo stores that do not exist yet; existing ones are left as
/// they are (so running it twice changes nothing).
pub async fn seed(pool: &PgPool, platform_domain: &str) -> Result<Vec<DemoStore>, ApiError> {
    let mut out = Vec::new();
    for spec in specs() {
        if let Some((id, name)) = existing(pool, spec.slug).await? {
            let domains: Vec<String> = sqlx::query_scalar(
                "SELECT hostname FROM domains WHERE store_id = $1 ORDER BY hostname",
            )
            .bind(id)
            .fetch_all(pool)
            .await?;
            let products: i64 =
                sqlx::query_scalar("SELECT count(*) FROM products WHERE store_id = $1")
                    .bind(id)
                    .fetch_one(pool)
                    .await?;
            out.push(DemoStore {
                id,
                slug: spec.slug.into(),
                name,
                token: None,
                domains,
                products: products as usize,
            });
            continue;
        }
        let (row, token) = insert_store(
            pool,
            NewStore {
                name: spec.name.into(),
                slug: spec.slug.into(),
                currency: spec.currency.into(),
                tagline: spec.tagline.into(),
            },
        )
        .await?;
        let store = StoreId(row.id);
        let mut n = 0;
        for (ci, (cat, items)) in spec.catalog.iter().enumerate() {
            let c = insert_category(
                pool,
                store,
                NewCategory {
                    name: cat.clone(),
                    slug: None,
                    position: ci as i32,
                },
            )
            .await?;
            for (pi, (name, description, price)) in items.iter().enumerate() {
                let slug = crate::catalog::slugify(name).map(|s| format!("{s}-{ci}-{pi}"));
                insert_product(
                    pool,
                    store,
                    NewProduct {
                        name: name.clone(),
                        slug,
                        description: description.clone(),
                        price_cents: *price,
                        category_id: Some(c.id),
                        available: !(ci == 2 && pi == 3),
                        position: pi as i32,
                    },
                )
                .await?;
                n += 1;
            }
        }
        let mut domains = Vec::new();
        for d in spec.domains {
            domains.push(
                attach_verified_domain(pool, platform_domain, store, d)
                    .await?
                    .to_string(),
            );
        }
        out.push(DemoStore {
            id: row.id,
            slug: row.slug,
            name: row.name,
            token: Some(token),
            domains,
            products: n,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_store_has_150_products_in_20_categories() {
        let s = spice_route();
        assert!(s.catalog.len() >= 20);
        assert!(s.catalog.iter().map(|(_, p)| p.len()).sum::<usize>() >= 150);
    }

    #[test]
    fn demo_names_include_accents_emoji_and_script() {
        let all: String = specs()
            .iter()
            .flat_map(|s| {
                s.catalog
                    .iter()
                    .flat_map(|(_, p)| p.iter().map(|(n, _, _)| n.clone()))
            })
            .collect();
        assert!(all.contains('é') && all.contains('🔥') && all.contains("<script>"));
    }
}

//! Storefront rendering: page data → HTML through compiled askama templates.
//!
//! Templates are checked at compile time and escape every interpolated value
//! (sellers' names and descriptions are untrusted HTML). Rendering is pure: no
//! I/O, so it is unit-tested on plain data.

use askama::Template;
use edgefront_schema::format_money;

use crate::replica::{Category, PageData, Product};
use crate::route::Page;

/// A category link in the navigation bar.
pub struct NavItem {
    pub name: String,
    pub slug: String,
    pub active: bool,
}

/// A product as shown on a card.
pub struct Card {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub summary: String,
    pub price: String,
    pub available: bool,
}

/// One category's products on the home page.
pub struct Section {
    pub name: String,
    pub slug: String,
    pub products: Vec<Card>,
}

#[derive(Template)]
#[template(path = "home.html")]
struct HomeTpl<'a> {
    store_name: &'a str,
    store_tagline: &'a str,
    region: &'a str,
    nav: Vec<NavItem>,
    sections: Vec<Section>,
    pager: Pager,
}

#[derive(Template)]
#[template(path = "category.html")]
struct CategoryTpl<'a> {
    store_name: &'a str,
    store_tagline: &'a str,
    region: &'a str,
    nav: Vec<NavItem>,
    heading: &'a str,
    products: Vec<Card>,
    pager: Pager,
}

#[derive(Template)]
#[template(path = "product.html")]
struct ProductTpl<'a> {
    store_name: &'a str,
    store_tagline: &'a str,
    region: &'a str,
    nav: Vec<NavItem>,
    p: Card,
    description: &'a str,
    category: Option<&'a Category>,
}

#[derive(Template)]
#[template(path = "notfound.html")]
struct NotFoundTpl<'a> {
    store_name: &'a str,
    store_tagline: &'a str,
    region: &'a str,
    nav: Vec<NavItem>,
    message: &'a str,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorTpl<'a> {
    title: &'a str,
    message: &'a str,
    region: &'a str,
    status: u16,
}

fn summary(s: &str) -> String {
    const MAX: usize = 140;
    if s.chars().count() <= MAX {
        return s.to_owned();
    }
    let cut: String = s.chars().take(MAX).collect();
    format!("{}…", cut.trim_end())
}

fn card(p: &Product, currency: &str) -> Card {
    Card {
        id: p.id,
        slug: p.slug.clone(),
        name: p.name.clone(),
        summary: summary(&p.description),
        price: format_money(p.price_cents, currency),
        available: p.available,
    }
}

fn nav(categories: &[Category], active: Option<i64>) -> Vec<NavItem> {
    categories
        .iter()
        .map(|c| NavItem {
            name: c.name.clone(),
            slug: c.slug.clone(),
            active: Some(c.id) == active,
        })
        .collect()
}

/// Links to a listing's neighbouring pages (`href`s; the first page has no
/// query).
pub struct Pager {
    pub number: u32,
    pub prev: Option<String>,
    pub next: Option<String>,
}

impl Pager {
    /// Page `number` of the listing at `base` (`/` or `/c/{slug}`).
    fn new(base: &str, number: u32, more: bool) -> Pager {
        let at = |n: u32| {
            if n == 1 {
                base.to_owned()
            } else {
                format!("{base}?page={n}")
            }
        };
        Pager {
            number,
            prev: (number > 1).then(|| at(number - 1)),
            next: more.then(|| at(number + 1)),
        }
    }
}

/// A rendered page: status 200, or 404 for a category or product the store
/// does not have, or a page number past a listing's end.
pub struct Rendered {
    pub status: u16,
    pub html: String,
}

/// Renders `page` from its data.
pub fn page(data: &PageData, page: &Page, region: &str) -> Result<Rendered, askama::Error> {
    let s = &data.store;
    let cur = s.currency.as_str();
    if !data.found {
        let message = match page {
            // The listing is there, its page is not (the store's directory
            // keeps this 404 apart from the unknown category's).
            Page::Home(_) => "This page does not exist (any more).",
            Page::Category(..) if data.category.is_some() => "This page does not exist (any more).",
            Page::Category(..) => "This category does not exist (any more).",
            _ => "This product does not exist (any more).",
        };
        let html = NotFoundTpl {
            store_name: &s.name,
            store_tagline: &s.tagline,
            region,
            nav: nav(&data.categories, None),
            message,
        }
        .render()?;
        return Ok(Rendered { status: 404, html });
    }
    let html = match page {
        Page::Home(n) => {
            let mut sections: Vec<Section> = data
                .categories
                .iter()
                .map(|c| Section {
                    name: c.name.clone(),
                    slug: c.slug.clone(),
                    products: Vec::new(),
                })
                .collect();
            let mut uncategorised = Vec::new();
            for p in &data.products {
                match p
                    .category_id
                    .and_then(|id| data.categories.iter().position(|c| c.id == id))
                {
                    Some(i) => sections[i].products.push(card(p, cur)),
                    None => uncategorised.push(card(p, cur)),
                }
            }
            sections.retain(|s| !s.products.is_empty());
            if !uncategorised.is_empty() {
                sections.push(Section {
                    name: "More".into(),
                    slug: String::new(),
                    products: uncategorised,
                });
            }
            HomeTpl {
                store_name: &s.name,
                store_tagline: &s.tagline,
                region,
                nav: nav(&data.categories, None),
                sections,
                pager: Pager::new("/", *n, data.more),
            }
            .render()?
        }
        Page::Category(slug, n) => {
            let heading = data.category.as_ref().map_or("", |c| c.name.as_str());
            CategoryTpl {
                store_name: &s.name,
                store_tagline: &s.tagline,
                region,
                nav: nav(&data.categories, data.category.as_ref().map(|c| c.id)),
                heading,
                products: data.products.iter().map(|p| card(p, cur)).collect(),
                pager: Pager::new(&format!("/c/{slug}"), *n, data.more),
            }
            .render()?
        }
        Page::Product(_) => {
            // Invariant: `found` means the product row is present.
            let Some(p) = data.products.first() else {
                return Ok(Rendered {
                    status: 404,
                    html: String::new(),
                });
            };
            ProductTpl {
                store_name: &s.name,
                store_tagline: &s.tagline,
                region,
                nav: nav(&data.categories, data.category.as_ref().map(|c| c.id)),
                p: card(p, cur),
                description: &p.description,
                category: data.category.as_ref(),
            }
            .render()?
        }
    };
    Ok(Rendered { status: 200, html })
}

/// A page for errors outside any store (unknown host, replica down, origin down).
pub fn error_page(status: u16, title: &str, message: &str, region: &str) -> String {
    ErrorTpl {
        title,
        message,
        region,
        status,
    }
    .render()
    .unwrap_or_else(|_| format!("{status} {title}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::Store;

    fn data() -> PageData {
        PageData {
            store: Store {
                id: 1,
                slug: "s".into(),
                name: "<script>alert('store')</script> Café".into(),
                tagline: "\"><img src=x>".into(),
                currency: "INR".into(),
            },
            categories: vec![Category {
                id: 10,
                slug: "curries".into(),
                name: "Curries 🔥".into(),
            }],
            products: vec![Product {
                id: 5,
                slug: "butter-chicken".into(),
                name: "<b>Butter</b> Chicken".into(),
                description: "Rich & creamy".into(),
                price_cents: 129_900,
                category_id: Some(10),
                available: true,
            }],
            found: true,
            category: None,
            more: false,
        }
    }

    #[test]
    fn home_renders_prices_forms_and_escapes_hostile_names() {
        let r = page(&data(), &Page::Home(1), "bom1").expect("render");
        assert_eq!(r.status, 200);
        assert!(r.html.contains("₹1,299.00"));
        assert!(r.html.contains(r#"action="/cart""#));
        assert!(r.html.contains(r#"name="product_id" value="5""#));
        assert!(r.html.contains("Curries 🔥"));
        assert!(
            !r.html.contains("<script>alert"),
            "store name must be escaped"
        );
        assert!(
            !r.html.contains("<b>Butter"),
            "product name must be escaped"
        );
        assert!(
            !r.html.contains("\"><img"),
            "tagline must be escaped in attributes too"
        );
        assert!(
            r.html.contains("&lt;script&gt;") || r.html.contains("&#60;script&#62;"),
            "escaped text is shown"
        );
        assert!(r.html.contains("served by edgefront region bom1"));
    }

    #[test]
    fn missing_product_renders_store_404() {
        let mut d = data();
        d.found = false;
        d.products.clear();
        let r = page(&d, &Page::Product("nope".into()), "bom1").expect("render");
        assert_eq!(r.status, 404);
        assert!(r.html.contains("does not exist"));
    }

    #[test]
    fn summary_truncates_long_descriptions_by_characters() {
        let long = "é".repeat(300);
        let s = summary(&long);
        assert_eq!(s.chars().count(), 141);
        assert!(s.ends_with('…'));
    }
}

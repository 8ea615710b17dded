//! The regional edge: a Pingora server that renders storefront pages from
//! its region's replica and proxies every write to the origin.
//!
//! Module map: [`route`] classifies requests, [`replica`] owns every query,
//! [`render`] turns page data into HTML, [`cache`] holds rendered pages,
//! [`pages`] decides what a storefront request gets, [`proxy`] sequences
//! Pingora's phases, [`respond`] writes what the edge answers itself,
//! [`https`] holds the TLS rules before routing, [`admin`] serves health
//! and metrics.
//! TLS, change-log invalidation and BGP health are separate concerns that
//! grow beside these modules.

pub mod admin;
pub mod cache;
pub mod config;
pub mod conn;
pub mod generation;
pub mod headers;
pub mod https;
pub mod limits;
pub mod metrics;
pub mod pages;
pub mod proxy;
pub mod reload;
pub mod render;
pub mod replica;
pub mod respond;
pub mod route;
pub mod ryw;
pub mod server;
pub mod tail;
pub mod tls;
pub mod traffic;

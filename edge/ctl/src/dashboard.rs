//! `edge-ctl dashboard`: a live network map for drills. One page (no
//! external resources: the map, styles and script are inline), its state as
//! JSON (`/state`) and as server-sent events every half second (`/events`):
//! every region's route, health, lag and traffic from its health hook, and
//! in the lab, where each shopper city lands (its metro router's best path
//! for the anycast prefix, read over BIRD's control socket).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use tokio::sync::watch;

use crate::client::Client;
use crate::lab::LabState;

const PAGE: &str = include_str!("../assets/dashboard.html");

#[derive(Debug, Clone, Serialize, Default)]
pub struct RegionView {
    pub code: String,
    pub city: String,
    pub lat: f64,
    pub lon: f64,
    pub announced: bool,
    pub healthy: bool,
    pub drain_phase: Option<String>,
    pub reasons: Vec<String>,
    pub lag: Option<f64>,
    pub rps: f64,
    pub hit: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CityView {
    pub code: String,
    pub city: String,
    pub lat: f64,
    pub lon: f64,
    /// The region the city's shoppers land on now.
    pub lands: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    pub a: String,
    pub b: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct MapState {
    pub generated_ms: u64,
    pub regions: Vec<RegionView>,
    pub cities: Vec<CityView>,
    pub links: Vec<LinkView>,
}

/// What the dashboard watches.
pub struct Source {
    pub client: Client,
    /// (code, city, health URL).
    pub regions: Vec<(String, String, String)>,
    pub geo: edgefront_regions::Regions,
    pub lab: Option<LabState>,
}

async fn gather(
    src: &Source,
    birds: &mut BTreeMap<String, edgefront_health::bird::Bird>,
) -> MapState {
    let coord = |code: &str| {
        src.geo
            .get(code)
            .map(|r| (r.coord.latitude, r.coord.longitude))
            .unwrap_or_default()
    };
    let calls: Vec<_> = src
        .regions
        .iter()
        .map(|(code, city, url)| {
            let (c, code, city, url) =
                (src.client.clone(), code.clone(), city.clone(), url.clone());
            tokio::spawn(async move { (code, city, c.status(&url).await) })
        })
        .collect();
    let mut regions = Vec::new();
    for h in calls {
        let Ok((code, city, r)) = h.await else {
            continue;
        };
        let (lat, lon) = coord(&code);
        regions.push(match r {
            Ok(s) => RegionView {
                code,
                city,
                lat,
                lon,
                announced: s.announced,
                healthy: s.healthy,
                drain_phase: s.drain_phase.map(|p| format!("{p:?}").to_lowercase()),
                reasons: s.reasons,
                lag: s.replica_lag_seconds,
                rps: s.requests_per_second,
                hit: s.cache_hit_ratio,
                error: None,
            },
            Err(e) => RegionView {
                code,
                city,
                lat,
                lon,
                error: Some(format!("{e:#}")),
                ..RegionView::default()
            },
        });
    }
    let mut cities = Vec::new();
    if let Some(lab) = &src.lab {
        let prefix = format!("{}/32", lab.anycast);
        for r in &lab.regions {
            if !birds.contains_key(&r.code)
                && let Ok(b) = edgefront_health::bird::Bird::connect(
                    &r.metro_bird_socket,
                    Duration::from_millis(300),
                )
                .await
            {
                birds.insert(r.code.clone(), b);
            }
            let lands = match birds.get_mut(&r.code) {
                Some(b) => match b.best_as_path(&prefix).await {
                    Ok(path) => path.and_then(|p| crate::drill::region_of_path(lab, &r.code, &p)),
                    Err(_) => {
                        birds.remove(&r.code);
                        None
                    }
                },
                None => None,
            };
            let (lat, lon) = coord(&r.code);
            cities.push(CityView {
                code: r.code.clone(),
                city: r.city.clone(),
                lat,
                lon,
                lands,
            });
        }
    }
    let present = |c: &str| src.regions.iter().any(|(code, _, _)| code == c);
    let links = src
        .geo
        .backbone()
        .iter()
        .filter(|l| present(l.a.id.as_str()) && present(l.b.id.as_str()))
        .map(|l| LinkView {
            a: l.a.id.as_str().to_owned(),
            b: l.b.id.as_str().to_owned(),
        })
        .collect();
    MapState {
        generated_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        regions,
        cities,
        links,
    }
}

/// Serves the dashboard on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, src: Source) -> anyhow::Result<()> {
    let (tx, rx) = watch::channel(Arc::new(MapState::default()));
    tokio::spawn(async move {
        let mut birds = BTreeMap::new();
        loop {
            let s = gather(&src, &mut birds).await;
            if tx.send(Arc::new(s)).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let app = Router::new()
        .route("/", get(page))
        .route("/state", get(state))
        .route("/events", get(events))
        .with_state(rx);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn page(State(rx): State<watch::Receiver<Arc<MapState>>>) -> Response {
    let s = first_state(rx).await;
    let json = serde_json::to_string(&*s).unwrap_or_else(|_| "null".into());
    (
        [
            (header::CONTENT_SECURITY_POLICY, "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Html(PAGE.replacen("__STATE__", &script_safe(&json), 1)),
    )
        .into_response()
}

/// The gathered state, waiting (bounded) for the first gather to finish.
async fn first_state(mut rx: watch::Receiver<Arc<MapState>>) -> Arc<MapState> {
    if rx.borrow().generated_ms == 0 {
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.changed()).await;
    }
    rx.borrow().clone()
}

/// JSON that cannot end the `<script>` element it is embedded in.
fn script_safe(json: &str) -> String {
    json.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

async fn state(State(rx): State<watch::Receiver<Arc<MapState>>>) -> Response {
    let s = first_state(rx).await;
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json((*s).clone()),
    )
        .into_response()
}

async fn events(State(rx): State<watch::Receiver<Arc<MapState>>>) -> impl IntoResponse {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let s = rx.borrow_and_update().clone();
        let data = serde_json::to_string(&*s).unwrap_or_default();
        Some((
            Ok::<_, std::convert::Infallible>(Event::default().data(data)),
            rx,
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_state_cannot_close_its_script_element() {
        let json = serde_json::to_string(
            &serde_json::json!({"why": "</script><script>alert(1)</script>&"}),
        )
        .expect("json");
        let safe = script_safe(&json);
        assert!(
            !safe.contains('<') && !safe.contains('>') && !safe.contains('&'),
            "{safe}"
        );
        let back: serde_json::Value = serde_json::from_str(&safe).expect("still JSON");
        assert_eq!(back["why"], "</script><script>alert(1)</script>&");
    }

    #[test]
    fn page_has_one_state_placeholder() {
        assert_eq!(PAGE.matches("__STATE__").count(), 1);
    }
}

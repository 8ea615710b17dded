//! OpenTelemetry: one request produces one connected trace with edge and
//! origin spans (W3C traceparent from edge to origin), exported over OTLP to
//! a real receiver; a page read has the route, cache, replica query and
//! render spans; the access log carries the trace id.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Result;
use edgefront_tests::otlp::{OtlpReceiver, Span};
use edgefront_tests::{Edge, Origin, Postgres, client, eventually};

fn by_name<'a>(spans: &'a [Span], trace: &str, name: &str) -> Option<&'a Span> {
    spans.iter().find(|s| s.trace_id == trace && s.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_edge_and_origin() -> Result<()> {
    let otlp = OtlpReceiver::start()?;
    let ep = otlp.endpoint();
    let primary = Postgres::primary()?;
    let replica = primary.replica("bom1")?;
    let platform = "shops.edgefront.test";
    let origin = Origin::start_with(
        &primary.url(),
        platform,
        std::net::SocketAddr::from(([127, 0, 0, 1], edgefront_tests::free_port())),
        &["--otlp-endpoint", &ep],
    )?;
    Origin::seed_demo(&primary.url(), platform)?;
    let edge = Edge::builder("bom1", &replica.url(), origin.addr)
        .arg("--otlp-endpoint")
        .arg(&ep)
        .log_filter("warn,access=info")
        .run()?;

    // A write: edge → origin, continuing the shopper's own trace.
    let shopper_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = client()
        .post(format!("{}/api/stores", edge.url()))
        .header(
            "traceparent",
            format!("00-{shopper_trace}-00f067aa0ba902b7-01"),
        )
        .json(&serde_json::json!({"name": "Traced", "slug": "traced", "currency": "EUR"}))
        .send()
        .await?;
    assert_eq!(r.status(), 201);
    let spans = eventually(Duration::from_secs(15), "edge and origin spans", || async {
        let s = otlp.spans();
        let origin_span = by_name(&s, shopper_trace, "origin request")?;
        by_name(&s, shopper_trace, "edge request")?;
        by_name(&s, shopper_trace, "upstream to origin")?;
        let _ = origin_span;
        Some(s)
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; received: {:#?}", otlp.spans()))?;
    let edge_req = by_name(&spans, shopper_trace, "edge request").unwrap();
    let upstream = by_name(&spans, shopper_trace, "upstream to origin").unwrap();
    let origin_req = by_name(&spans, shopper_trace, "origin request").unwrap();
    assert_eq!(
        edge_req.parent_span_id, "00f067aa0ba902b7",
        "continues the caller's trace"
    );
    assert_eq!(upstream.parent_span_id, edge_req.span_id);
    assert_eq!(
        origin_req.parent_span_id, upstream.span_id,
        "origin span is the edge's child"
    );
    assert_eq!(edge_req.service, "edgefront-edge");
    assert_eq!(
        edge_req.region.as_deref(),
        Some("bom1"),
        "region as a resource attribute"
    );
    assert_eq!(origin_req.service, "edgefront-origin");

    // A page read (cold cache): route, cache lookup, replica query, render.
    let r = client()
        .get(format!("{}/", edge.url()))
        .header("host", "spiceroute.example")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let (trace, spans) = eventually(Duration::from_secs(15), "page spans", || async {
        let s = otlp.spans();
        let render = s.iter().find(|x| x.name == "render")?;
        let t = render.trace_id.clone();
        by_name(&s, &t, "replica query")?;
        Some((t, s))
    })
    .await?;
    let root = by_name(&spans, &trace, "edge request").unwrap();
    let route = by_name(&spans, &trace, "route (host → store)").unwrap();
    let cache = by_name(&spans, &trace, "cache lookup").unwrap();
    let query = by_name(&spans, &trace, "replica query").unwrap();
    let render = by_name(&spans, &trace, "render").unwrap();
    assert!(
        root.parent_span_id.is_empty(),
        "a new trace without traceparent"
    );
    assert_eq!(route.parent_span_id, root.span_id);
    assert_eq!(cache.parent_span_id, root.span_id);
    assert_eq!(query.parent_span_id, cache.span_id);
    assert_eq!(render.parent_span_id, cache.span_id);
    assert!(
        spans
            .iter()
            .filter(|s| s.trace_id == trace)
            .all(|s| s.service == "edgefront-edge")
    );

    // The origin's own metrics saw the write (route pattern, status).
    let m = client()
        .get(format!("{}/metrics", origin.url()))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        m.contains(r#"edgefront_origin_requests_total{route="/api/stores",status="201"} 1"#),
        "{m}"
    );
    assert!(
        m.contains("edgefront_origin_request_duration_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("edgefront_origin_changelog_head_seq"), "{m}");

    // The access log line carries the trace id.
    let log = eventually(Duration::from_secs(5), "access log line", || async {
        let l = edge.proc.log();
        l.contains(&trace).then_some(l)
    })
    .await;
    assert!(
        log.is_ok(),
        "edge log has no trace_id {trace}:\n{}",
        edge.proc.log()
    );
    Ok(())
}

//! A small OTLP/HTTP trace receiver for tests, built on the OpenTelemetry
//! protocol types: it accepts `POST /v1/traces` (protobuf), decodes every
//! span and keeps them for assertions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One received span.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    /// Resource attribute `edgefront.region`, if set.
    pub region: Option<String>,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
}

/// The receiver; stops with the test process.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

fn string_attr(
    attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

impl OtlpReceiver {
    /// Starts on a free loopback port, on its own thread.
    pub fn start() -> Result<OtlpReceiver> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let store = spans.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: axum::body::Bytes| {
                        let store = store.clone();
                        async move {
                            let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                                return axum::http::StatusCode::BAD_REQUEST;
                            };
                            let mut out = store.lock().unwrap_or_else(|p| p.into_inner());
                            for rs in req.resource_spans {
                                let attrs = rs.resource.map(|r| r.attributes).unwrap_or_default();
                                let service =
                                    string_attr(&attrs, "service.name").unwrap_or_default();
                                let region = string_attr(&attrs, "edgefront.region");
                                for ss in rs.scope_spans {
                                    for s in ss.spans {
                                        out.push(Span {
                                            service: service.clone(),
                                            region: region.clone(),
                                            trace_id: hex::encode(&s.trace_id),
                                            span_id: hex::encode(&s.span_id),
                                            parent_span_id: hex::encode(&s.parent_span_id),
                                            name: s.name,
                                        });
                                    }
                                }
                            }
                            axum::http::StatusCode::OK
                        }
                    }),
                );
                let _ = axum::serve(listener, app).await;
            });
        });
        Ok(OtlpReceiver { addr, spans })
    }

    /// The endpoint to configure: `http://127.0.0.1:PORT/v1/traces`.
    pub fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

//! One run, one trace: OpenTelemetry spans for the run, its suites, leases,
//! model loads (with one span per stage, at the times the agent reported,
//! corrected for the clock offset to that agent) and cases — exported over
//! OTLP when configured, and always written as an OTLP JSON file.
//!
//! Spans are built with the OpenTelemetry API directly rather than through
//! `tracing` spans: stage and case spans carry explicit start and end times
//! taken from the agent, and are created after the fact. A case's span id is
//! chosen before the case is sent, so its `traceparent` can travel with it and
//! the service's own spans join the trace (`ChosenIds`).

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceId, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracer, SdkTracerProvider, SpanData, SpanExporter};

/// How long the final export may take before the run gives up on it.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(5);

/// Where spans go besides the trace file.
#[derive(Clone, Debug, Default)]
pub struct OtelConfig {
    /// `--otlp-endpoint`; else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`. No endpoint: no OTLP export.
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf` (`--otlp-protocol`; else
    /// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL`;
    /// default `http/protobuf`, as the OTLP spec says).
    pub protocol: Option<String>,
}

fn env(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

thread_local! {
    /// The span id the next span created on this thread must take.
    static NEXT_SPAN_ID: Cell<Option<SpanId>> = const { Cell::new(None) };
    /// The trace id the next root span created on this thread must take.
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, except that a span id chosen beforehand can be imposed on the
/// next span built on the same thread (span creation is synchronous).
#[derive(Debug, Default)]
struct ChosenIds(RandomIdGenerator);

impl IdGenerator for ChosenIds {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID.with(|n| n.take()).unwrap_or_else(|| self.0.new_trace_id())
    }

    fn new_span_id(&self) -> SpanId {
        NEXT_SPAN_ID.with(|n| n.take()).unwrap_or_else(|| self.0.new_span_id())
    }
}

/// Keeps every finished span for the trace file.
#[derive(Debug, Clone, Default)]
struct Keep(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for Keep {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        self.0.lock().expect("span store").extend(batch);
        Ok(())
    }
}

/// The tracer provider of one `proctor run`.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    kept: Keep,
    resource: Resource,
    /// Where OTLP goes, for messages ("" = nowhere).
    pub exporting_to: String,
    /// Problems worth telling the user; the terminal reporter prints them.
    warnings: Vec<String>,
}

impl Telemetry {
    /// Builds the provider. Must run inside the tokio runtime (the gRPC
    /// exporter needs it). An OTLP exporter that cannot even be built is a
    /// warning, never a failed run.
    pub fn init(config: &OtelConfig) -> Telemetry {
        use opentelemetry_otlp::WithExportConfig;
        let mut resource = Resource::builder();
        if env(&["OTEL_SERVICE_NAME"]).is_none() {
            resource = resource.with_service_name("proctor");
        }
        let resource = resource.build();
        let kept = Keep::default();
        let mut builder = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_id_generator(ChosenIds::default())
            .with_simple_exporter(kept.clone());
        let endpoint = config
            .endpoint
            .clone()
            .or_else(|| env(&["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]));
        let mut exporting_to = String::new();
        let mut warnings = Vec::new();
        if let Some(endpoint) = endpoint {
            let protocol = config
                .protocol
                .clone()
                .or_else(|| env(&["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"]))
                .unwrap_or_else(|| "http/protobuf".into());
            let explicit = config.endpoint.is_some();
            let built = match protocol.as_str() {
                "grpc" => {
                    let b = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_timeout(FLUSH_DEADLINE);
                    if explicit { b.with_endpoint(endpoint.clone()).build() } else { b.build() }
                }
                "http/protobuf" => {
                    let b = opentelemetry_otlp::SpanExporter::builder()
                        .with_http()
                        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                        .with_timeout(FLUSH_DEADLINE);
                    // An explicit endpoint is the full traces URL, like OTEL_EXPORTER_OTLP_TRACES_ENDPOINT.
                    if explicit { b.with_endpoint(traces_url(&endpoint)).build() } else { b.build() }
                }
                other => {
                    warnings.push(format!(
                        "OTLP protocol {other:?} is not supported (use grpc or http/protobuf); not exporting"
                    ));
                    Err(opentelemetry_otlp::ExporterBuildError::InternalFailure("unsupported protocol".into()))
                }
            };
            match built {
                Ok(exporter) => {
                    builder = builder.with_batch_exporter(exporter);
                    exporting_to = format!("{endpoint} ({protocol})");
                }
                Err(e) => {
                    warnings.push(format!("cannot export traces to {endpoint}: {e}; the trace file is still written"))
                }
            }
        }
        let provider = builder.build();
        let tracer = provider.tracer("proctor");
        Telemetry { provider, tracer, kept, resource, exporting_to, warnings }
    }

    pub fn tracer(&self) -> &SdkTracer {
        &self.tracer
    }

    /// Flushes and shuts the exporters down within `FLUSH_DEADLINE`, then
    /// writes every span to `file` as OTLP JSON. An unreachable collector is
    /// one warning; warnings are returned for the terminal to print.
    pub async fn finish(self, file: &Path) -> (std::io::Result<()>, Vec<String>) {
        let mut warnings = self.warnings.clone();
        let written = self.flush_and_write(file, &mut warnings).await;
        (written, warnings)
    }

    async fn flush_and_write(self, file: &Path, warnings: &mut Vec<String>) -> std::io::Result<()> {
        let provider = self.provider.clone();
        let exporting = !self.exporting_to.is_empty();
        let flushed = tokio::time::timeout(
            FLUSH_DEADLINE + Duration::from_secs(1),
            tokio::task::spawn_blocking(move || {
                let flushed = provider.force_flush();
                let _ = provider.shutdown_with_timeout(FLUSH_DEADLINE);
                flushed
            }),
        )
        .await;
        if exporting {
            match flushed {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) if e.to_string().contains("Timeout") => warnings.push(format!(
                    "trace export to {} did not finish within {}s (is the collector reachable?); \
                     the trace file has every span",
                    self.exporting_to,
                    FLUSH_DEADLINE.as_secs()
                )),
                Ok(Ok(Err(e))) => warnings
                    .push(format!("trace export to {} failed: {e}; the trace file has every span", self.exporting_to)),
                _ => warnings.push(format!(
                    "trace export to {} did not finish within {}s; gave up",
                    self.exporting_to,
                    FLUSH_DEADLINE.as_secs()
                )),
            }
        }
        let spans = std::mem::take(&mut *self.kept.0.lock().expect("span store"));
        let request = to_otlp(spans, &self.resource);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut out = std::io::BufWriter::new(std::fs::File::create(file)?);
        write_compact(&mut out, request)?;
        std::io::Write::flush(&mut out)
    }
}

/// Writes the request as OTLP JSON on one line — a 10,000-case run's trace
/// stays a few MB, and every OTLP JSON reader (jq, collectors, Jaeger's
/// import) takes it as it is — without protobuf defaults, one span at a
/// time: the whole document never sits in memory as a JSON tree.
fn write_compact(
    out: &mut impl std::io::Write,
    request: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
) -> std::io::Result<()> {
    out.write_all(b"{\"resourceSpans\":[")?;
    for (i, mut resource) in request.resource_spans.into_iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        let scopes = std::mem::take(&mut resource.scope_spans);
        open_object(out, &resource, "scopeSpans")?;
        for (j, mut scope) in scopes.into_iter().enumerate() {
            if j > 0 {
                out.write_all(b",")?;
            }
            let spans = std::mem::take(&mut scope.spans);
            open_object(out, &scope, "spans")?;
            for (k, span) in spans.iter().enumerate() {
                if k > 0 {
                    out.write_all(b",")?;
                }
                let mut value = serde_json::to_value(span).map_err(std::io::Error::other)?;
                without_defaults(&mut value);
                serde_json::to_writer(&mut *out, &value).map_err(std::io::Error::other)?;
            }
            out.write_all(b"]}")?;
        }
        out.write_all(b"]}")?;
    }
    out.write_all(b"]}\n")
}

/// Writes `item`'s fields (defaults left out, `list` among them skipped)
/// and opens its `list` array: `{"a":1,"list":[`.
fn open_object(out: &mut impl std::io::Write, item: &impl serde::Serialize, list: &str) -> std::io::Result<()> {
    let mut value = serde_json::to_value(item).map_err(std::io::Error::other)?;
    without_defaults(&mut value);
    out.write_all(b"{")?;
    if let serde_json::Value::Object(fields) = value {
        for (name, field) in fields.iter().filter(|(name, _)| name.as_str() != list) {
            serde_json::to_writer(&mut *out, name).map_err(std::io::Error::other)?;
            out.write_all(b":")?;
            serde_json::to_writer(&mut *out, field).map_err(std::io::Error::other)?;
            out.write_all(b",")?;
        }
    }
    serde_json::to_writer(&mut *out, list).map_err(std::io::Error::other)?;
    out.write_all(b":[")
}

/// Span fields whose value is the protobuf default say nothing (OTLP JSON
/// readers fill them back): empty trace states, zero dropped counts, no
/// events or links, an unset status, an empty schema URL. Attribute values
/// are kept whatever they hold.
fn without_defaults(value: &mut serde_json::Value) {
    use serde_json::Value;
    const DEFAULTS: [&str; 8] = [
        "traceState",
        "droppedAttributesCount",
        "droppedEventsCount",
        "droppedLinksCount",
        "events",
        "links",
        "schemaUrl",
        "status",
    ];
    let is_default = |v: &Value| match v {
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_u64() == Some(0),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => {
            o.get("code").and_then(Value::as_u64) == Some(0)
                && o.get("message").and_then(Value::as_str).is_none_or(str::is_empty)
        }
        _ => false,
    };
    match value {
        Value::Object(map) => {
            map.retain(|k, v| !(DEFAULTS.contains(&k.as_str()) && is_default(v)));
            for (k, v) in map.iter_mut() {
                if k != "value" {
                    without_defaults(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(without_defaults),
        _ => {}
    }
}

fn traces_url(endpoint: &str) -> String {
    let e = endpoint.trim_end_matches('/');
    if e.ends_with("/v1/traces") { e.to_owned() } else { format!("{e}/v1/traces") }
}

/// Spans as the OTLP `ExportTraceServiceRequest` a collector would receive.
pub fn to_otlp(
    spans: Vec<SpanData>,
    resource: &Resource,
) -> opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    let resource: ResourceAttributesWithSchema = resource.into();
    opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
        resource_spans: group_spans_by_resource_and_scope(spans, &resource),
    }
}

/// W3C `traceparent` for a span.
pub fn traceparent(sc: &SpanContext) -> String {
    format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8())
}

pub fn unix_ms_to_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// Removes `user:password@` from a URL before it becomes an attribute.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let userinfo = if authority.contains('@') { "REDACTED@" } else { "" };
            if path.is_empty() {
                format!("{scheme}://{userinfo}{host}")
            } else {
                format!("{scheme}://{userinfo}{host}/{path}")
            }
        }
        None => url.to_owned(),
    }
}

/// A span being recorded, with its context for children.
#[derive(Clone, Debug)]
pub struct Scope {
    pub cx: Context,
}

impl Scope {
    pub fn span_context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    pub fn set(&self, attributes: Vec<KeyValue>) {
        let span = self.cx.span();
        for a in attributes {
            span.set_attribute(a);
        }
    }

    pub fn fail(&self, message: &str) {
        self.cx.span().set_status(Status::error(message.to_owned()));
    }

    pub fn end(&self) {
        self.cx.span().end();
    }

    pub fn end_at(&self, at: SystemTime) {
        self.cx.span().end_with_timestamp(at);
    }
}

/// Starts a span now (or at `start`) under `parent` (`None`: a new trace).
pub fn start(
    tracer: &SdkTracer,
    name: impl Into<String>,
    parent: Option<&Scope>,
    start: Option<SystemTime>,
    attributes: Vec<KeyValue>,
    links: Vec<Link>,
) -> Scope {
    let mut builder =
        tracer.span_builder(name.into()).with_kind(SpanKind::Internal).with_attributes(attributes).with_links(links);
    if let Some(t) = start {
        builder = builder.with_start_time(t);
    }
    let parent_cx = parent.map_or_else(Context::new, |p| p.cx.clone());
    let span = tracer.build_with_context(builder, &parent_cx);
    Scope { cx: parent_cx.with_span(span) }
}

/// Like `start`, but the span takes the id chosen beforehand (for a
/// `traceparent` already sent).
pub fn start_with_id(
    tracer: &SdkTracer,
    id: SpanId,
    name: impl Into<String>,
    parent: &Scope,
    start_at: SystemTime,
    attributes: Vec<KeyValue>,
    links: Vec<Link>,
) -> Scope {
    NEXT_SPAN_ID.with(|n| n.set(Some(id)));
    let scope = start(tracer, name, Some(parent), Some(start_at), attributes, links);
    NEXT_SPAN_ID.with(|n| n.set(None));
    scope
}

/// The root span of a trace whose id was chosen beforehand (the runner
/// sends `traceparent`s before the trace reporter sees the spans).
pub fn start_trace(tracer: &SdkTracer, trace_id: TraceId, name: impl Into<String>, attributes: Vec<KeyValue>) -> Scope {
    NEXT_TRACE_ID.with(|n| n.set(Some(trace_id)));
    let scope = start(tracer, name, None, None, attributes, vec![]);
    NEXT_TRACE_ID.with(|n| n.set(None));
    scope
}

/// A fresh trace id, to be used later with `start_trace`.
pub fn new_trace_id() -> TraceId {
    RandomIdGenerator::default().new_trace_id()
}

/// A fresh span id, to be used later with `start_with_id`.
pub fn new_span_id() -> SpanId {
    RandomIdGenerator::default().new_span_id()
}

/// The trace file's path next to the reports.
pub fn trace_file(out_dir: &Path) -> PathBuf {
    out_dir.join("trace.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("http://user:secret@10.0.0.5:8000/translate"), "http://REDACTED@10.0.0.5:8000/translate");
        assert_eq!(redact_url("http://127.0.0.1:8000/translate"), "http://127.0.0.1:8000/translate");
        assert_eq!(redact_url("http://127.0.0.1:8000"), "http://127.0.0.1:8000");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_chosen_span_id_is_taken_and_the_file_parses_back() {
        let telemetry = Telemetry::init(&OtelConfig::default());
        let root = start(telemetry.tracer(), "run", None, None, vec![], vec![]);
        let id = new_span_id();
        let tp_parent = root.span_context();
        let case = start_with_id(telemetry.tracer(), id, "case", &root, SystemTime::now(), vec![], vec![]);
        assert_eq!(case.span_context().span_id(), id);
        assert_eq!(case.span_context().trace_id(), tp_parent.trace_id());
        assert!(traceparent(&case.span_context()).starts_with(&format!("00-{}-{id}-", tp_parent.trace_id())));
        case.end();
        root.end();
        let file = std::env::temp_dir().join(format!("proctor-otel-{}.json", std::process::id()));
        telemetry.finish(&file).await.0.unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let back: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest =
            serde_json::from_str(&text).unwrap();
        let spans = &back.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        std::fs::remove_file(&file).ok();
    }

    /// The file written span by span is the same document as the whole
    /// request turned into JSON with its defaults left out.
    #[test]
    fn the_trace_written_span_by_span_is_the_whole_document_without_defaults() {
        use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
        use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
        let attr = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: Some(AnyValue { value: Some(any_value::Value::StringValue(v.into())) }),
            ..Default::default()
        };
        let span = |name: &str| Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: name.into(),
            start_time_unix_nano: 5,
            end_time_unix_nano: 9,
            attributes: vec![attr("proctor.case.name", name), attr("empty", "")],
            ..Default::default()
        };
        let scope = |n: usize| ScopeSpans {
            scope: Some(InstrumentationScope { name: "proctor".into(), ..Default::default() }),
            spans: (0..n).map(|i| span(&format!("case {i}"))).collect(),
            schema_url: String::new(),
        };
        let request = opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    resource: Some(opentelemetry_proto::tonic::resource::v1::Resource {
                        attributes: vec![attr("service.name", "proctor")],
                        ..Default::default()
                    }),
                    scope_spans: vec![scope(3), scope(0)],
                    schema_url: "x".into(),
                },
                ResourceSpans::default(),
            ],
        };
        let mut whole = serde_json::to_value(&request).unwrap();
        without_defaults(&mut whole);
        let mut written = Vec::new();
        write_compact(&mut written, request).unwrap();
        assert!(written.ends_with(b"}\n") && !written[..written.len() - 1].contains(&b'\n'), "one line");
        let read: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(read, whole);
        assert!(!String::from_utf8(written).unwrap().contains("droppedAttributesCount"), "defaults left out");
    }
}

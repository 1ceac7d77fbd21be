//! Logging and tracing set-up: `tracing` events as JSON or text on stderr, filtered by
//! `RUST_LOG` (default `info`), and OpenTelemetry trace export over OTLP when the standard
//! environment asks for it.
//!
//! Every span gets an OpenTelemetry trace id even when nothing is exported (the tracer
//! provider simply has no exporter then), so JSON log lines written inside a span always
//! carry `trace_id` and `span_id`, and a log line can be matched with the trace when export
//! is switched on later.

use std::sync::OnceLock;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{EnvFilter, Layer};

/// Log line format.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, with `trace_id`/`span_id` inside spans.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// Why telemetry could not be initialised.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is not a valid filter.
    #[error("invalid RUST_LOG filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::FromEnvError),
    /// The OTLP exporter could not be built from the environment.
    #[error("building the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    /// A global subscriber was already installed.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing::dispatcher::SetGlobalDefaultError),
}

/// Flushes buffered spans when dropped (or on [`TelemetryGuard::shutdown`]).
#[must_use = "dropping the guard flushes and stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl TelemetryGuard {
    /// Flushes and stops trace export. Idempotent.
    pub fn shutdown(&mut self) {
        // Bounded: an unreachable collector must not hold up a pod's termination.
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5))
        {
            // The subscriber may already be gone; stderr is the only place left.
            eprintln!("flushing traces failed: {err}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Whether the standard OpenTelemetry environment asks for OTLP trace export.
pub fn otlp_requested() -> bool {
    let set = |key: &str| std::env::var(key).is_ok_and(|v| !v.trim().is_empty());
    let exporter = std::env::var("OTEL_TRACES_EXPORTER").unwrap_or_default();
    if exporter.trim() == "none" {
        return false;
    }
    exporter.trim() == "otlp"
        || set("OTEL_EXPORTER_OTLP_ENDPOINT")
        || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
}

/// kube's HTTP trace layer logs `ERROR failed with error ...` for every request that gets no
/// response, on every retry, without the API server's address; the reachability tracker
/// ([`crate::reachability`]) logs an outage once, with the address and the cause. So that
/// target is off unless `RUST_LOG` names `kube_client` itself.
const KUBE_CLIENT_TRACE_TARGET: &str = "kube_client::client::builder";

fn quiet_kube_client(filter: EnvFilter, rust_log: &str) -> EnvFilter {
    if rust_log.contains("kube_client") {
        return filter;
    }
    match format!("{KUBE_CLIENT_TRACE_TARGET}=off").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// kube-lease-manager (the assigner's leader election) logs `ERROR LeaseManager watcher
/// error` at every one of its retries (0.1 s doubling to 10 s); while the reachability
/// tracker reports an outage those lines repeat it, so they are dropped until the API
/// server answers again. Its other failures (a forbidden Lease, say) still show.
fn repeats_a_reported_outage(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target().starts_with("kube_lease_manager") && crate::reachability::outage_reported()
}

/// Installs the global subscriber. `service_name` is used when `OTEL_SERVICE_NAME` is not
/// set; all other `OTEL_*` variables (endpoint, protocol, headers, resource attributes,
/// sampler) are read by the OpenTelemetry SDK itself.
pub fn init(format: LogFormat, service_name: &str) -> Result<TelemetryGuard, TelemetryError> {
    let filter = quiet_kube_client(
        EnvFilter::builder()
            .with_default_directive(tracing::level_filters::LevelFilter::INFO.into())
            .from_env()?,
        &std::env::var("RUST_LOG").unwrap_or_default(),
    );

    let mut builder = SdkTracerProvider::builder();
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_owned());
    }
    builder = builder.with_resource(resource.build());
    if otlp_requested() {
        builder = builder.with_batch_exporter(opentelemetry_otlp::SpanExporter::builder().build()?);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service_name.to_owned());
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    let otel = tracing_opentelemetry::layer().with_tracer(tracer);
    let dispatch_slot: &'static OnceLock<WeakDispatch> = Box::leak(Box::default());
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .event_format(JsonWithTraceIds {
                inner: tracing_subscriber::fmt::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false),
                dispatch: dispatch_slot,
            })
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let fmt = fmt.with_filter(tracing_subscriber::filter::dynamic_filter_fn(
        |metadata, _| !repeats_a_reported_outage(metadata),
    ));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt);
    let dispatch = Dispatch::new(subscriber);
    // The formatter needs the dispatcher to ask the OpenTelemetry layer for a span's
    // context; it cannot use `dispatcher::get_default` while an event is being dispatched.
    let _ = dispatch_slot.set(dispatch.downgrade());
    tracing::dispatcher::set_global_default(dispatch)?;
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}

/// tracing-subscriber's JSON format plus `trace_id` and `span_id` of the current span.
struct JsonWithTraceIds {
    inner: Format<Json>,
    dispatch: &'static OnceLock<WeakDispatch>,
}

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    Format<Json>: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        // Looked up first, while no span extensions are borrowed (the OpenTelemetry layer
        // takes their lock).
        let ids = ctx
            .lookup_current()
            .map(|span| span.id())
            .zip(self.dispatch.get().and_then(WeakDispatch::upgrade))
            .and_then(|(id, dispatch)| tracing_opentelemetry::get_otel_context(&id, &dispatch))
            .map(|cx| cx.span().span_context().clone())
            .filter(|sc| sc.is_valid());
        let Some(span_context) = ids else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        // The JSON format writes exactly one object followed by a newline.
        let trimmed = line.trim_end();
        match trimmed.strip_suffix('}') {
            Some(body) => writeln!(
                writer,
                "{body},\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                span_context.trace_id(),
                span_context.span_id()
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn otlp_is_off_without_environment() {
        // The test environment sets no OTEL_* variables.
        if std::env::vars().all(|(k, _)| !k.starts_with("OTEL_")) {
            assert!(!otlp_requested());
        }
    }
}

//! Log output: text (no ANSI colours when stderr is not a terminal, e.g. under journald) or
//! JSON. The filter can be replaced at run time (SIGHUP reload).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn parse(filter: &str) -> anyhow::Result<EnvFilter> {
    EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("invalid log level `{filter}`: {e}"))
}

/// Install the global subscriber. `filter` is an `EnvFilter` directive such as `info`.
pub fn init(format: LogFormat, filter: &str) -> anyhow::Result<()> {
    let (filter, handle) = reload::Layer::new(parse(filter)?);
    let registry = tracing_subscriber::registry().with(filter);
    let r = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    r.map_err(|e| anyhow::anyhow!("install the log subscriber: {e}"))?;
    let _ = FILTER.set(handle);
    Ok(())
}

/// Replace the filter of the subscriber installed by [`init`].
pub fn set_filter(filter: &str) -> anyhow::Result<()> {
    let f = parse(filter)?;
    match FILTER.get() {
        Some(h) => h.reload(f).map_err(|e| anyhow::anyhow!("reload the log filter: {e}")),
        None => anyhow::bail!("logging was not initialised"),
    }
}

//! Log output: text (no ANSI colours when stderr is not a terminal, e.g. under journald) or
//! JSON. The filter can be replaced at run time (SIGHUP reload).
//!
//! Under systemd, when stderr is the journal (`$JOURNAL_STREAM` names it), each text line
//! starts with its syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug and
//! trace), which journald strips and records (`SyslogLevelPrefix=`, on by default), so
//! `journalctl -p err -u rdaxd` shows the errors.

use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

fn parse(filter: &str) -> anyhow::Result<EnvFilter> {
    // rustls warns about what peers send that it ignores, such as the IP address GnuTLS clients
    // (libnbd, qemu) put in SNI when they connect by address: noise for the journal, so only its
    // errors are shown unless the filter names rustls itself.
    let full = if filter.contains("rustls") { filter.to_string() } else { format!("{filter},rustls::msgs=error") };
    EnvFilter::try_new(&full).map_err(|e| anyhow::anyhow!("invalid log level `{filter}`: {e}"))
}

/// The syslog priority of a level.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Whether stderr is the journal stream systemd connected (`$JOURNAL_STREAM` = `dev:inode`).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.split_once(':') else { return false };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else { return false };
    dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
}

/// A text format with the syslog priority in front when `prefix` is set.
struct Prioritized<F> {
    inner: F,
    prefix: bool,
}

impl<S, N, F> FormatEvent<S, N> for Prioritized<F>
where
    F: FormatEvent<S, N>,
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        if self.prefix {
            write!(writer, "<{}>", priority(event.metadata().level()))?;
        }
        self.inner.format_event(ctx, writer, event)
    }
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
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                    .event_format(Prioritized {
                        inner: tracing_subscriber::fmt::format(),
                        prefix: stderr_is_journal(),
                    }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!([&Level::ERROR, &Level::WARN, &Level::INFO, &Level::DEBUG].map(priority), [3, 4, 6, 7]);
    }
}

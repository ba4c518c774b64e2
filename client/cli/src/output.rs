//! Failures, exit codes and printing.

use std::process::ExitCode;

use rdax_client::ErrorKind;

/// A command failure with its exit status.
#[derive(Debug)]
pub(crate) struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// A local error (files, arguments): exit 2.
    pub fn local(error: anyhow::Error) -> Self {
        Self { code: 2, error }
    }

    /// An invalid argument found locally: exit 5.
    pub fn invalid(error: anyhow::Error) -> Self {
        Self { code: 5, error }
    }

    /// A service (etcd) did not answer: exit 7, as for an unreachable daemon.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub fn unavailable(error: anyhow::Error) -> Self {
        Self { code: 7, error }
    }

    /// The state does not allow it (as `FAILED_PRECONDITION` from a daemon): exit 10.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub fn precondition(error: anyhow::Error) -> Self {
        Self { code: 10, error }
    }

    /// `fsck` found damage: exit 1 (the report is already printed).
    pub fn damaged() -> Self {
        Self { code: 1, error: anyhow::anyhow!("the pool is damaged") }
    }

    /// Print and turn into an exit status.
    pub fn report(self, json: bool) -> ExitCode {
        if self.code != 1 {
            if json {
                println!("{}", serde_json::json!({ "error": chain_text(&self.error), "exit": self.code }));
            } else {
                eprintln!("rdaxctl: {}", chain_text(&self.error));
            }
        }
        ExitCode::from(self.code)
    }
}

/// An error and its causes, `: `-separated, leaving out a cause whose text the one before it
/// already ends with (SDK errors carry their source's text in their own message).
fn chain_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.is_empty() && last.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

impl From<rdax_client::Error> for Failure {
    fn from(e: rdax_client::Error) -> Self {
        let code = match e.kind() {
            ErrorKind::NotFound => 3,
            ErrorKind::AlreadyExists => 4,
            ErrorKind::InvalidArgument | ErrorKind::OutOfRange => 5,
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => 6,
            ErrorKind::Unavailable | ErrorKind::Connect | ErrorKind::DeadlineExceeded | ErrorKind::Unsupported => 7,
            ErrorKind::ResourceExhausted => 8,
            ErrorKind::FailedPrecondition => 10,
            ErrorKind::Io => 2,
            _ => 9,
        };
        Self { code, error: e.into() }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::local(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Self::local(e.into())
    }
}

/// Print `v` as JSON, or `text` otherwise.
pub(crate) fn emit<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
    } else {
        println!("{}", text());
    }
}

/// Bytes for people: 1536 → "1.5 KiB".
pub(crate) fn human(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::chain_text;

    #[test]
    fn a_cause_repeated_in_the_message_is_printed_once() {
        let sdk: rdax_client::Error = rdax_proto::model::validate_namespace("demo/").unwrap_err().into();
        let e = anyhow::Error::from(sdk);
        let text = chain_text(&e);
        assert_eq!(text.matches("invalid namespace").count(), 1, "{text}");
    }

    #[test]
    fn distinct_causes_are_all_printed() {
        let e = anyhow::anyhow!("disk full").context("writing the pool").context("rdaxctl put");
        assert_eq!(chain_text(&e), "rdaxctl put: writing the pool: disk full");
    }
}

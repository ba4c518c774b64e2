//! Credentials in the configuration: the bearer token (inline, `RDAX_TOKEN` or a token file)
//! and the principals file, and the redacting [`Secret`] that carries a token.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{Args, ConfigError, ConfigFile};

/// A secret string: usable as `&str`, never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: String) -> Self {
        Secret(s)
    }
}

impl std::ops::Deref for Secret {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The principals file's principals, and the single token as `admin`.
pub(super) fn principals_of(file: Option<&Path>, token: Option<&str>) -> Result<crate::auth::Principals, ConfigError> {
    let mut p = match file {
        Some(f) => crate::auth::Principals::load(f).map_err(|e| ConfigError::Invalid(e.to_string()))?,
        None => crate::auth::Principals::default(),
    };
    if let Some(t) = token {
        p.merge(crate::auth::Principals::single("admin", t)).map_err(|e| {
            ConfigError::Invalid(format!("{e}: the token file is the principal `admin`; rename the file's"))
        })?;
    }
    Ok(p)
}

pub(super) fn resolve_token(args: &Args, file: &ConfigFile) -> Result<Option<Secret>, ConfigError> {
    let inline = std::env::var("RDAX_TOKEN").ok().filter(|t| !t.is_empty()).or(file.auth.token.clone());
    let token_file = args.token_file.clone().or(file.auth.token_file.clone());
    match (inline, token_file) {
        (Some(_), Some(_)) => Err(ConfigError::Invalid(
            "set either auth.token (or RDAX_TOKEN) or auth.token_file (or --token-file), not both".into(),
        )),
        (Some(t), None) => Ok(Some(Secret(check_token(t)?))),
        (None, Some(p)) => Ok(Some(Secret(read_token_file(&p)?))),
        (None, None) => Ok(None),
    }
}

/// Read a token file, refusing one that other users can read.
pub fn read_token_file(p: &Path) -> Result<String, ConfigError> {
    check_token(read_private(p, "token file")?.trim().to_string())
}

/// Read a file that holds a secret (`what` names it in errors), refusing one that other users
/// can read.
pub fn read_private(p: &Path, what: &str) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(p).map_err(|source| ConfigError::Read { path: p.into(), source })?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(ConfigError::Invalid(format!(
            "{what} {} is world-readable; run `chmod o-rwx {}`",
            p.display(),
            p.display()
        )));
    }
    std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.into(), source })
}

fn check_token(t: String) -> Result<String, ConfigError> {
    if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Invalid("token must be at least 16 printable ASCII characters without spaces".into()));
    }
    Ok(t)
}

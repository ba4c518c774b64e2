//! The principals file (`auth.principals_file`, TOML) and token lookup.
//!
//! ```toml
//! [[principal]]
//! name = "alice"
//! tokens = ["sha256:<64 hex digits>"]   # `rdaxctl token create` prints these
//! cert_common_names = ["alice"]          # TLS client certificates with this subject CN
//! scopes = ["a/:write", "shared/:read"]
//!
//! [metrics]
//! tokens = ["sha256:<64 hex digits>"]   # optional: a token for /metrics alone
//! ```
//!
//! Only hashes are stored, so the file reveals no credential. Tokens are high-entropy (128
//! bits or more), so a plain SHA-256 is the right hash: there is nothing to brute-force. A
//! presented token is hashed and looked up; the lookup compares hashes, never the token.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rdax_proto::credential::parse_hash;
pub use rdax_proto::credential::{hash_text, hash_token};
use serde::Deserialize;

use super::{Principal, Scope};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    principal: Vec<Entry>,
    #[serde(default)]
    metrics: Option<Metrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    cert_common_names: Vec<String>,
    scopes: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metrics {
    tokens: Vec<String>,
}

/// Why the principals file was refused.
#[derive(Debug, thiserror::Error)]
pub enum PrincipalsError {
    /// Unreadable.
    #[error("cannot read the principals file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Invalid.
    #[error("principals file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Every principal, by token hash.
#[derive(Default, Clone)]
pub struct Principals {
    by_hash: HashMap<[u8; 32], Arc<Principal>>,
    by_cn: HashMap<String, Arc<Principal>>,
    metrics: HashSet<[u8; 32]>,
    names: Vec<Arc<str>>,
    by_name: HashMap<Arc<str>, Arc<Principal>>,
}

impl std::fmt::Debug for Principals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: not even the hashes.
        f.debug_struct("Principals").field("names", &self.names).field("metrics_tokens", &self.metrics.len()).finish()
    }
}

impl Principals {
    /// One principal with every right, for the single `auth.token_file`.
    pub fn single(name: &str, token: &str) -> Principals {
        let p = Arc::new(Principal::admin(name));
        Principals {
            by_hash: HashMap::from([(hash_token(token), p.clone())]),
            by_cn: HashMap::new(),
            metrics: HashSet::new(),
            names: vec![p.name.clone()],
            by_name: HashMap::from([(p.name.clone(), p.clone())]),
        }
    }

    /// Read and check a principals file.
    pub fn load(path: &Path) -> Result<Principals, PrincipalsError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path)
            .map_err(|source| PrincipalsError::Read { path: path.display().to_string(), source })?;
        // It holds only hashes, but whoever can write it can add a principal.
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(PrincipalsError::Invalid {
                path: path.display().to_string(),
                message: format!("writable by group or others; run `chmod go-w {}`", path.display()),
            });
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| PrincipalsError::Read { path: path.display().to_string(), source })?;
        Self::parse(&text).map_err(|message| PrincipalsError::Invalid { path: path.display().to_string(), message })
    }

    /// Parse the file's text.
    pub fn parse(text: &str) -> Result<Principals, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut out = Principals::default();
        let mut seen = HashSet::new();
        for e in f.principal {
            if e.name.is_empty() || e.name.len() > 128 || !e.name.bytes().all(|c| c.is_ascii_graphic()) {
                return Err(format!("principal name `{}`: 1 to 128 printable characters, no spaces", e.name));
            }
            if !seen.insert(e.name.clone()) {
                return Err(format!("principal `{}` is named twice", e.name));
            }
            if e.scopes.is_empty() {
                return Err(format!("principal `{}` has no scopes", e.name));
            }
            let scopes = e
                .scopes
                .iter()
                .map(|s| Scope::parse(s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|m| format!("principal `{}`: {m}", e.name))?;
            let p = Arc::new(Principal { name: e.name.as_str().into(), scopes });
            for t in &e.tokens {
                let h = parse_hash(t).ok_or_else(|| {
                    format!(
                        "principal `{}`: a token must be `sha256:` and 64 hex digits (rdaxctl token create)",
                        e.name
                    )
                })?;
                if out.by_hash.insert(h, p.clone()).is_some() {
                    return Err(format!("principal `{}`: a token hash is listed twice", e.name));
                }
            }
            for cn in &e.cert_common_names {
                if cn.is_empty() || out.by_cn.insert(cn.clone(), p.clone()).is_some() {
                    return Err(format!(
                        "principal `{}`: certificate common name `{cn}` is empty or listed twice",
                        e.name
                    ));
                }
            }
            out.names.push(p.name.clone());
            out.by_name.insert(p.name.clone(), p);
        }
        for t in f.metrics.map(|m| m.tokens).unwrap_or_default() {
            let h = parse_hash(&t).ok_or("[metrics] tokens must be `sha256:` and 64 hex digits")?;
            out.metrics.insert(h);
        }
        Ok(out)
    }

    /// Add every principal of `other` (the single token file beside a principals file).
    pub fn merge(&mut self, other: Principals) -> Result<(), String> {
        for n in &other.names {
            if self.names.contains(n) {
                return Err(format!("principal `{n}` is defined twice"));
            }
        }
        self.by_hash.extend(other.by_hash);
        self.by_cn.extend(other.by_cn);
        self.metrics.extend(other.metrics);
        self.names.extend(other.names);
        self.by_name.extend(other.by_name);
        Ok(())
    }

    /// The principal a bearer token belongs to.
    pub fn by_token(&self, token: &str) -> Option<Arc<Principal>> {
        self.by_hash.get(&hash_token(token)).cloned()
    }

    /// The principal called `name` (the NBD listener acts as one).
    pub fn by_name(&self, name: &str) -> Option<Arc<Principal>> {
        self.by_name.get(name).cloned()
    }

    /// The principal a verified TLS client certificate's Common Name belongs to.
    pub fn by_common_name(&self, cn: &str) -> Option<Arc<Principal>> {
        self.by_cn.get(cn).cloned()
    }

    /// Whether `token` may scrape metrics (a metrics token, or any principal's).
    pub fn metrics_allowed(&self, token: &str) -> bool {
        let h = hash_token(token);
        self.metrics.contains(&h) || self.by_hash.contains_key(&h)
    }

    /// Whether metrics need a token (the file has a `[metrics]` section).
    pub fn metrics_protected(&self) -> bool {
        !self.metrics.is_empty()
    }

    /// Whether a token hash still belongs to a principal.
    pub fn knows(&self, hash: &[u8; 32]) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Whether any credential is configured.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty() && self.by_cn.is_empty()
    }

    /// Principal names.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// Token hashes of each principal (to tell which sessions a reload orphans).
    pub fn hashes(&self) -> impl Iterator<Item = (&[u8; 32], &Arc<Principal>)> {
        self.by_hash.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_maps_tokens_to_principals() {
        let text = format!(
            "[[principal]]\nname = \"alice\"\ntokens = [\"{}\"]\nscopes = [\"a/:write\"]\n\n[metrics]\ntokens = [\"{}\"]\n",
            hash_text("alice-token-0123456789"),
            hash_text("scraper-token-0123456789")
        );
        let p = Principals::parse(&text).unwrap();
        let alice = p.by_token("alice-token-0123456789").unwrap();
        assert_eq!(&*alice.name, "alice");
        assert!(alice.allows(super::super::Rights::WRITE, "a", "x"));
        assert!(p.by_token("alice-token-012345678").is_none());
        assert!(p.metrics_allowed("scraper-token-0123456789") && p.metrics_allowed("alice-token-0123456789"));
        assert!(!p.metrics_allowed("nobody"));
        assert!(p.by_token("scraper-token-0123456789").is_none(), "a metrics token is no principal");
    }

    #[test]
    fn a_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("principals.toml");
        std::fs::write(&f, "[[principal]]\nname = \"a\"\nscopes = [\":read\"]\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(Principals::load(&f).unwrap_err().to_string().contains("chmod go-w"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(Principals::load(&f).unwrap().names().len(), 1);
    }

    #[test]
    fn mistakes_are_named() {
        let h = hash_text("x-token-0123456789");
        for (text, needle) in [
            ("[[principal]]\nname = \"a\"\nscopes = []\n".to_string(), "no scopes"),
            ("[[principal]]\nname = \"a\"\ntokens = [\"plain\"]\nscopes = [\":read\"]\n".into(), "sha256:"),
            ("[[principal]]\nname = \"a\"\nscopes = [\"x\"]\n".into(), "PREFIX:RIGHTS"),
            (
                format!(
                    "[[principal]]\nname = \"a\"\ntokens = [\"{h}\"]\nscopes = [\":read\"]\n[[principal]]\nname = \"a\"\nscopes = [\":read\"]\n"
                ),
                "twice",
            ),
            (
                format!(
                    "[[principal]]\nname = \"a\"\ntokens = [\"{h}\"]\nscopes = [\":read\"]\n[[principal]]\nname = \"b\"\ntokens = [\"{h}\"]\nscopes = [\":read\"]\n"
                ),
                "listed twice",
            ),
            ("[[principal]]\nname = \"a\"\nscopes = [\":read\"]\nsecret = 1\n".into(), "unknown field"),
        ] {
            let e = Principals::parse(&text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}

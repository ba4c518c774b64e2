//! Who may do what (DESIGN.md, "Trust model").
//!
//! A *principal* has a name, credentials (bearer tokens, stored as SHA-256 hashes) and
//! *scopes*. A scope is an object-key prefix — matched against `namespace/name`, so `a/` is
//! every object of namespace `a`, `a/logs-` some of them, and the empty prefix everything —
//! with rights: `read` (stat, list, read, read leases), `write` (create, resize, punch, delete,
//! write, flush, read-write leases; implies `read`) and `admin` (sessions, evictions, revokes;
//! implies both). Every RPC's need is declared once, in [`table`].
//!
//! Sessions belong to the principal that opened them; see [`crate::session`].

pub mod local;
pub mod principals;
pub mod table;

use std::sync::Arc;

pub use principals::{Principals, PrincipalsError};
pub use rdax_proto::credential::{Rights, Scope, hash_text, hash_token};

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its name (shown in listings and logs; not a secret).
    pub name: Arc<str>,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("principal `{principal}` has no `{need}` right on `{target}`")]
pub struct Denied {
    /// Who asked.
    pub principal: Arc<str>,
    /// The right it lacks.
    pub need: &'static str,
    /// What it asked about.
    pub target: String,
}

impl Principal {
    /// A principal with every right (the single `auth.token_file`, or a local user on the
    /// admin socket).
    pub fn admin(name: &str) -> Principal {
        Principal { name: name.into(), scopes: vec![Scope { prefix: String::new(), rights: Rights::ADMIN }] }
    }

    /// Whether the principal has `right` on the object `namespace/name`.
    pub fn allows(&self, right: Rights, namespace: &str, name: &str) -> bool {
        self.scopes.iter().any(|s| s.rights.contains(right) && covers(&s.prefix, namespace, name))
    }

    /// Whether the principal has `right` on at least part of `namespace` (what listing needs;
    /// the listing then shows only what [`Principal::allows`]).
    pub fn allows_some_of(&self, right: Rights, namespace: &str) -> bool {
        self.scopes.iter().any(|s| {
            s.rights.contains(right) && {
                let ns = format!("{namespace}/");
                ns.starts_with(&s.prefix) || s.prefix.starts_with(&ns)
            }
        })
    }

    /// Whether the principal has `right` anywhere at all.
    pub fn has_any(&self, right: Rights) -> bool {
        self.scopes.iter().any(|s| s.rights.contains(right))
    }

    /// Whether the principal has `right` over everything (the empty prefix).
    pub fn has_everywhere(&self, right: Rights) -> bool {
        self.scopes.iter().any(|s| s.rights.contains(right) && s.prefix.is_empty())
    }

    /// [`Principal::allows`], as a `Result`.
    pub fn require(&self, right: Rights, namespace: &str, name: &str) -> Result<(), Denied> {
        if self.allows(right, namespace, name) {
            return Ok(());
        }
        Err(Denied { principal: self.name.clone(), need: right.as_str(), target: format!("{namespace}/{name}") })
    }
}

fn covers(prefix: &str, namespace: &str, name: &str) -> bool {
    // `namespace/name` starts with `prefix`, without building the string.
    let p = prefix.as_bytes();
    let (ns, n) = (namespace.as_bytes(), name.as_bytes());
    if p.len() <= ns.len() {
        return ns.starts_with(p);
    }
    if &p[..ns.len()] != ns || p[ns.len()] != b'/' {
        return false;
    }
    n.starts_with(&p[ns.len() + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(scopes: &[&str]) -> Principal {
        Principal { name: "t".into(), scopes: scopes.iter().map(|s| Scope::parse(s).unwrap()).collect() }
    }

    #[test]
    fn prefixes_cover_namespace_slash_name() {
        let a = p(&["a/:write", "shared/logs-:read"]);
        assert!(a.allows(Rights::WRITE, "a", "x"));
        assert!(a.allows(Rights::READ, "a", "x"), "write implies read");
        assert!(!a.allows(Rights::READ, "ab", "x"), "`a/` is namespace a, not ab");
        assert!(!a.allows(Rights::READ, "b", "x"));
        assert!(a.allows(Rights::READ, "shared", "logs-1"));
        assert!(!a.allows(Rights::WRITE, "shared", "logs-1"));
        assert!(!a.allows(Rights::READ, "shared", "other"));
        assert!(!a.allows(Rights::ADMIN, "a", "x"));
        assert!(a.allows_some_of(Rights::READ, "shared") && a.allows_some_of(Rights::READ, "a"));
        assert!(!a.allows_some_of(Rights::READ, "b") && !a.allows_some_of(Rights::WRITE, "shared"));
        let pre = p(&["a:read"]);
        assert!(pre.allows(Rights::READ, "a", "x") && pre.allows(Rights::READ, "ab", "x"));
        let all = Principal::admin("root");
        assert!(all.allows(Rights::ADMIN, "any", "thing") && all.has_everywhere(Rights::ADMIN));
        assert!(!a.has_everywhere(Rights::READ) && a.has_any(Rights::WRITE) && !a.has_any(Rights::ADMIN));
        let e = a.require(Rights::WRITE, "b", "x").unwrap_err();
        assert_eq!(e.to_string(), "principal `t` has no `write` right on `b/x`");
    }
}

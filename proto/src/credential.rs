//! Credentials and scopes, shared by the daemon and the tools that make them
//! (`rdaxctl token create`): rights, scopes (`PREFIX:RIGHTS`) and the SHA-256 hashes under
//! which principals files store bearer tokens.

use std::fmt;

use sha2::{Digest, Sha256};

/// SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token hash as a principals file stores it: `sha256:` and 64 hex digits.
pub fn hash_text(token: &str) -> String {
    let h: String = hash_token(token).iter().map(|x| format!("{x:02x}")).collect();
    format!("sha256:{h}")
}

/// Parse what [`hash_text`] wrote.
pub fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let h = s.strip_prefix("sha256:")?;
    if h.len() != 64 || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// A set of rights.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Rights(u8);

impl Rights {
    /// Read.
    pub const READ: Rights = Rights(1);
    /// Write (includes read).
    pub const WRITE: Rights = Rights(1 | 2);
    /// Admin (includes write and read).
    pub const ADMIN: Rights = Rights(1 | 2 | 4);

    /// Whether every right in `other` is in `self`.
    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// Parse `read`, `write`, `admin` or a comma-separated list of them.
    pub fn parse(s: &str) -> Result<Rights, String> {
        let mut r = Rights::default();
        for w in s.split(',').map(str::trim) {
            r.0 |= match w {
                "read" => Rights::READ.0,
                "write" => Rights::WRITE.0,
                "admin" => Rights::ADMIN.0,
                other => return Err(format!("unknown right `{other}` (read, write or admin)")),
            };
        }
        Ok(r)
    }

    /// The strongest right held, as a word.
    pub fn as_str(self) -> &'static str {
        if self.contains(Rights::ADMIN) {
            "admin"
        } else if self.contains(Rights::WRITE) {
            "write"
        } else if self.contains(Rights::READ) {
            "read"
        } else {
            "none"
        }
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A prefix of `namespace/name` and the rights over what it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The prefix.
    pub prefix: String,
    /// The rights.
    pub rights: Rights,
}

impl Scope {
    /// Parse `PREFIX:RIGHTS` (the prefix may be empty: `:admin`).
    pub fn parse(s: &str) -> Result<Scope, String> {
        let (prefix, rights) =
            s.rsplit_once(':').ok_or_else(|| format!("scope `{s}`: expected PREFIX:RIGHTS, e.g. `a/:read,write`"))?;
        Ok(Scope {
            prefix: prefix.to_string(),
            rights: Rights::parse(rights).map_err(|e| format!("scope `{s}`: {e}"))?,
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.prefix, self.rights.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_rights_parse_strictly() {
        assert_eq!(Scope::parse("a/:read,write").unwrap().rights, Rights::WRITE);
        assert_eq!(Scope::parse(":admin").unwrap().prefix, "");
        assert!(Scope::parse("a/").is_err());
        assert!(Scope::parse("a/:root").unwrap_err().contains("unknown right"));
        assert_eq!(Scope::parse("a/:read").unwrap().to_string(), "a/:read");
        assert!(Rights::ADMIN.contains(Rights::WRITE) && !Rights::READ.contains(Rights::WRITE));
    }

    #[test]
    fn hashes_round_trip() {
        let t = hash_text("some-token-0123456789");
        assert_eq!(parse_hash(&t), Some(hash_token("some-token-0123456789")));
        assert_eq!(parse_hash("sha256:zz"), None);
        assert_eq!(parse_hash(&t[1..]), None);
    }
}

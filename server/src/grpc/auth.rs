//! Authentication and the first authorization step, run by the request layer
//! ([`super::layer`]) in front of every rdax service.
//!
//! For every `/rdax.*` request the layer looks the path up in [`crate::auth::table`] (a path
//! with no line is refused), finds the principal the bearer token belongs to
//! (`authorization: Bearer <token>`, the scheme case-insensitive), checks what can be checked
//! before the handler runs, and hands the principal to the handler as a [`Caller`] extension.
//! Health and reflection pass untouched. Missing or unknown credential: `UNAUTHENTICATED`;
//! a principal without the right: `PERMISSION_DENIED`.
//!
//! With no credential configured at all (the embedded default on loopback), every caller is
//! the principal `anonymous` with every right.

use std::sync::{Arc, RwLock};

use super::status::ApiError;
use crate::auth::table::{self, Need};
use crate::auth::{Principal, Principals};

/// The credential check, shared by every service and reloadable (SIGHUP).
#[derive(Clone, Debug, Default)]
pub struct Auth {
    principals: Arc<RwLock<Arc<Principals>>>,
}

/// Who sent a request, for handlers.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The principal.
    pub principal: Arc<Principal>,
    /// SHA-256 of the token it presented (`None` with no credentials configured).
    pub credential: Option<[u8; 32]>,
}

impl Caller {
    /// As the owner of a session it opens.
    pub fn owner(&self) -> crate::session::Owner {
        crate::session::Owner { principal: self.principal.name.clone(), credential: self.credential }
    }

    /// The principal's name.
    pub fn name(&self) -> &str {
        &self.principal.name
    }
}

/// Who sent a handler's request.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, ApiError> {
    req.extensions().get::<Caller>().cloned().ok_or(ApiError::Internal("request reached a handler unauthenticated"))
}

impl Auth {
    /// Check requests against `principals` (empty: everyone is `anonymous`, with every right).
    pub fn new(principals: Principals) -> Self {
        Self { principals: Arc::new(RwLock::new(Arc::new(principals))) }
    }

    /// Replace the principals (reload).
    pub fn set(&self, principals: Principals) {
        *self.principals.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(principals);
    }

    /// The principals now in force.
    pub fn principals(&self) -> Arc<Principals> {
        self.principals.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Who sent `headers`, on a connection whose verified client certificate (if any) has
    /// Common Name `cn`. A bearer token, when sent, decides; else the certificate.
    pub fn authenticate(&self, headers: &http::HeaderMap, cn: Option<&str>) -> Result<Caller, ApiError> {
        let p = self.principals();
        if p.is_empty() {
            return Ok(Caller { principal: anonymous(), credential: None });
        }
        match bearer(headers) {
            Some(t) => p
                .by_token(t)
                .map(|principal| Caller { principal, credential: Some(crate::auth::hash_token(t)) })
                .ok_or(ApiError::Unauthenticated("invalid bearer token")),
            None if cn.is_some() => cn
                .and_then(|cn| p.by_common_name(cn))
                .map(|principal| Caller { principal, credential: None })
                .ok_or(ApiError::Unauthenticated("the client certificate's common name names no principal")),
            None => Err(ApiError::Unauthenticated(
                "missing bearer token: send the metadata `authorization: Bearer <token>`",
            )),
        }
    }

    /// Authenticate, then check what the table says can be checked before the handler.
    pub fn admit(&self, path: &str, headers: &http::HeaderMap, cn: Option<&str>) -> Result<Caller, ApiError> {
        let Some(need) = table::need(path) else {
            return Err(ApiError::PermissionDenied(format!("{path} is not in the authorization table")));
        };
        let c = self.authenticate(headers, cn)?;
        table::precheck(&c.principal, need).map_err(|right| {
            let place = if need == Need::Admin { "" } else { " on any namespace" };
            ApiError::PermissionDenied(format!("principal `{}` has no `{right}` right{place}", c.name()))
        })?;
        Ok(c)
    }
}

fn anonymous() -> Arc<Principal> {
    static ANON: std::sync::OnceLock<Arc<Principal>> = std::sync::OnceLock::new();
    ANON.get_or_init(|| Arc::new(Principal::admin("anonymous"))).clone()
}

/// The token of `authorization: Bearer <token>`.
pub fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let (scheme, t) = v.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !t.is_empty()).then_some(t.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::principals::hash_text;

    fn headers(auth: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(a) = auth {
            h.insert(http::header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_are_checked_and_the_table_applied() {
        let a = Auth::new(Principals::single("admin", "0123456789abcdef"));
        let path = "/rdax.v1.Pool/Info";
        assert!(a.admit(path, &headers(Some("Bearer 0123456789abcdef")), None).is_ok());
        assert!(
            a.admit(path, &headers(Some("bearer 0123456789abcdef")), None).is_ok(),
            "the scheme is case-insensitive"
        );
        for bad in [None, Some("Bearer 0123456789abcdeF"), Some("Bearer "), Some("0123456789abcdef"), Some("Basic x")] {
            let e = tonic::Status::from(a.admit(path, &headers(bad), None).unwrap_err());
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        let e = tonic::Status::from(
            a.admit("/rdax.v1.Pool/Secret", &headers(Some("Bearer 0123456789abcdef")), None).unwrap_err(),
        );
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "a path with no line is refused");
        // Nothing configured: everyone is anonymous, with every right.
        assert_eq!(Auth::new(Principals::default()).admit(path, &headers(None), None).unwrap().name(), "anonymous");
        // A reload replaces the principals for every clone.
        let clone = a.clone();
        a.set(Principals::single("admin", "fedcba9876543210"));
        assert!(clone.admit(path, &headers(Some("Bearer 0123456789abcdef")), None).is_err());
        assert!(clone.admit(path, &headers(Some("Bearer fedcba9876543210")), None).is_ok());
    }

    #[test]
    fn a_reader_is_turned_away_from_admin_and_write_before_any_handler() {
        let text = format!(
            "[[principal]]\nname = \"r\"\ntokens = [\"{}\"]\nscopes = [\"a/:read\"]\n",
            hash_text("reader-token-0123456789")
        );
        let a = Auth::new(Principals::parse(&text).unwrap());
        let h = headers(Some("Bearer reader-token-0123456789"));
        assert!(a.admit("/rdax.v1.Objects/Stat", &h, None).is_ok());
        for path in ["/rdax.v1.Objects/Create", "/rdax.v1.Admin/ListSessions"] {
            let e = tonic::Status::from(a.admit(path, &h, None).unwrap_err());
            assert_eq!(e.code(), tonic::Code::PermissionDenied, "{path}");
            assert!(e.message().contains("principal `r`"), "{}", e.message());
        }
    }
}

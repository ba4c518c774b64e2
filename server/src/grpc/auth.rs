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
//! A connection on the admin Unix socket carries the local user it admitted
//! ([`crate::auth::local`]): without a bearer token, that user's principal `local:<user>`
//! (every right) is the caller. Over TCP there is no anonymous access: with no credential
//! configured at all (the embedded default), every TCP request is `UNAUTHENTICATED`, and local
//! administrators use the socket.

use std::sync::{Arc, RwLock};

use super::status::ApiError;
use crate::auth::table::{self, Need};
use crate::auth::{Principal, Principals};
use crate::net::ConnInfo;

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
    /// SHA-256 of the token it presented (`None` for a certificate or the admin socket).
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
    /// Check requests against `principals` (empty: only the admin socket's users get in).
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

    /// Who sent `headers` on `conn`. A bearer token, when sent, decides; else the admin
    /// socket's local user, else the verified client certificate's Common Name.
    pub fn authenticate(&self, headers: &http::HeaderMap, conn: Option<&ConnInfo>) -> Result<Caller, ApiError> {
        let p = self.principals();
        let local = conn.and_then(|c| c.local.as_ref());
        let cn = conn.and_then(|c| c.client_cn.as_deref());
        if let Some(t) = bearer(headers) {
            return p
                .by_token(t)
                .map(|principal| Caller { principal, credential: Some(crate::auth::hash_token(t)) })
                .ok_or(ApiError::Unauthenticated("invalid bearer token"));
        }
        if let Some(l) = local {
            return Ok(Caller { principal: l.principal.clone(), credential: None });
        }
        if let Some(cn) = cn {
            return p
                .by_common_name(cn)
                .map(|principal| Caller { principal, credential: None })
                .ok_or(ApiError::Unauthenticated("the client certificate's common name names no principal"));
        }
        if p.is_empty() {
            return Err(ApiError::Unauthenticated(
                "this daemon has no credentials configured, so TCP clients have no access: administer it \
                 through its admin socket (admin.socket; rdaxctl uses it by default), or configure \
                 auth.principals_file or auth.token_file",
            ));
        }
        Err(ApiError::Unauthenticated("missing bearer token: send the metadata `authorization: Bearer <token>`"))
    }

    /// Authenticate, then check what the table says can be checked before the handler.
    pub fn admit(&self, path: &str, headers: &http::HeaderMap, conn: Option<&ConnInfo>) -> Result<Caller, ApiError> {
        let Some(need) = table::need(path) else {
            return Err(ApiError::PermissionDenied(format!("{path} is not in the authorization table")));
        };
        let c = self.authenticate(headers, conn)?;
        table::precheck(&c.principal, need).map_err(|right| {
            let place = if need == Need::Admin { "" } else { " on any namespace" };
            ApiError::PermissionDenied(format!("principal `{}` has no `{right}` right{place}", c.name()))
        })?;
        Ok(c)
    }
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
        // Nothing configured: TCP callers get nothing, and are told where to go.
        let e = tonic::Status::from(Auth::new(Principals::default()).admit(path, &headers(None), None).unwrap_err());
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("admin socket"), "{}", e.message());
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

    #[test]
    fn the_admin_socket_makes_its_user_the_caller_unless_a_token_says_otherwise() {
        use crate::auth::local::{PeerCredentials, admitted};
        let creds = PeerCredentials { uid: 1000, gid: 1000, groups: vec![], pid: None };
        let conn = ConnInfo {
            tcp: None,
            local: Some(Arc::new(admitted(&creds, "alice"))),
            state: Arc::default(),
            client_cn: None,
        };
        for principals in [Principals::default(), Principals::single("admin", "0123456789abcdef")] {
            let a = Auth::new(principals);
            let c = a.admit("/rdax.v1.Admin/ListSessions", &headers(None), Some(&conn)).unwrap();
            assert_eq!(c.name(), "local:alice");
            assert_eq!(c.credential, None);
        }
        let a = Auth::new(Principals::single("admin", "0123456789abcdef"));
        let c = a.admit("/rdax.v1.Pool/Info", &headers(Some("Bearer 0123456789abcdef")), Some(&conn)).unwrap();
        assert_eq!(c.name(), "admin", "a token sent on the socket decides");
        let e = a.admit("/rdax.v1.Pool/Info", &headers(Some("Bearer wrong-token-000000")), Some(&conn)).unwrap_err();
        assert_eq!(tonic::Status::from(e).code(), tonic::Code::Unauthenticated, "a bad token is not excused");
    }
}

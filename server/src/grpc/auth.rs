//! Bearer-token authentication, checked by an interceptor on every rdax service.

use std::sync::{Arc, RwLock};

use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::status::ApiError;

/// Checks `authorization: Bearer <token>` when a token is configured. Clones share the token,
/// so [`Auth::set`] (SIGHUP reload) takes effect for every service at once.
#[derive(Clone, Debug, Default)]
pub struct Auth {
    token: Arc<RwLock<Option<Arc<str>>>>,
}

impl Auth {
    /// `None` lets every request through (loopback development setups).
    pub fn new(token: Option<&str>) -> Self {
        Self { token: Arc::new(RwLock::new(token.map(Arc::from))) }
    }

    /// Replace the token.
    pub fn set(&self, token: Option<&str>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token.map(Arc::from);
    }
}

/// Compare without an early exit, so the time taken does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for Auth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = self.token.read().unwrap_or_else(|e| e.into_inner()).clone() else { return Ok(req) };
        let got = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
        // The scheme name is case-insensitive (RFC 9110 §11.1).
        let token = got.and_then(|v| v.split_once(' ')).filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"));
        match token.map(|(_, t)| t) {
            Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => Err(ApiError::Unauthenticated("invalid bearer token").into()),
            None => Err(ApiError::Unauthenticated(
                "missing bearer token: send the metadata `authorization: Bearer <token>`",
            )
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert("authorization", a.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_are_checked() {
        let mut a = Auth::new(Some("0123456789abcdef"));
        assert!(a.call(req(Some("Bearer 0123456789abcdef"))).is_ok());
        assert!(a.call(req(Some("bearer 0123456789abcdef"))).is_ok(), "the scheme is case-insensitive");
        for bad in [None, Some("Bearer 0123456789abcdeF"), Some("Bearer "), Some("0123456789abcdef"), Some("Basic x")] {
            assert_eq!(a.call(req(bad)).unwrap_err().code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(Auth::new(None).call(req(None)).is_ok());
        // A reload replaces the token for every clone.
        let mut clone = a.clone();
        a.set(Some("fedcba9876543210"));
        assert!(clone.call(req(Some("Bearer 0123456789abcdef"))).is_err());
        assert!(clone.call(req(Some("Bearer fedcba9876543210"))).is_ok());
    }
}

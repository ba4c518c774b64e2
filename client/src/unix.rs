//! `unix:` endpoints: gRPC over a daemon's admin Unix socket.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// The socket path of a `unix:PATH` or `unix:///PATH` endpoint.
pub(crate) fn socket_path(endpoint: &str) -> Option<PathBuf> {
    let rest = endpoint.strip_prefix("unix:")?;
    // `unix:///abs` (URI form) and `unix:/abs` or `unix:rel` (gRPC's name form).
    let path = rest.strip_prefix("//").unwrap_or(rest);
    Some(PathBuf::from(path))
}

/// Connects every channel to one socket path.
#[derive(Clone, Debug)]
pub(crate) struct Connector(pub(crate) PathBuf);

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move { Ok(TokioIo::new(UnixStream::connect(path).await?)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_name_the_path() {
        assert_eq!(socket_path("unix:///run/rdax/rdaxd.sock"), Some(PathBuf::from("/run/rdax/rdaxd.sock")));
        assert_eq!(socket_path("unix:/run/rdax/rdaxd.sock"), Some(PathBuf::from("/run/rdax/rdaxd.sock")));
        assert_eq!(socket_path("unix:rdaxd.sock"), Some(PathBuf::from("rdaxd.sock")));
        assert_eq!(socket_path("http://127.0.0.1:7400"), None);
    }
}

//! `[admin]`: the admin Unix socket.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Args, ConfigError};

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `[admin]` as written.
#[derive(Deserialize, Debug, Default, Clone)]
#[serde(default)]
pub struct AdminSection {
    /// Path of the socket, or "off".
    pub socket: Option<String>,
}

/// The admin socket's path from flags over the file (default `<state dir>/rdaxd.sock`), or
/// `None` when it is "off".
pub(super) fn resolve(args: &Args, file: &AdminSection, state_dir: &Path) -> Result<Option<PathBuf>, ConfigError> {
    let path = match args.admin_socket.clone().or(file.socket.clone()) {
        Some(s) if s == "off" => return Ok(None),
        Some(s) if s.is_empty() => return Err(ConfigError::Invalid("admin.socket is empty: a path or \"off\"".into())),
        Some(s) => PathBuf::from(s),
        None => state_dir.join(rdax_proto::paths::ADMIN_SOCKET_NAME),
    };
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ConfigError::Invalid(format!(
            "admin.socket {} is {len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}: \
             set a shorter admin.socket (--admin-socket)",
            path.display()
        )));
    }
    Ok(Some(path))
}

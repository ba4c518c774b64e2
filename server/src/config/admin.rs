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

/// The admin socket: its path from flags over the file (default `<state dir>/rdaxd.sock`), or
/// `None` when it is "off", plus a warning when the default had to be dropped.
pub(super) fn resolve(
    args: &Args,
    file: &AdminSection,
    state_dir: &Path,
) -> Result<(Option<PathBuf>, Option<String>), ConfigError> {
    let (path, explicit) = match args.admin_socket.clone().or(file.socket.clone()) {
        Some(s) if s == "off" => return Ok((None, None)),
        Some(s) if s.is_empty() => return Err(ConfigError::Invalid("admin.socket is empty: a path or \"off\"".into())),
        Some(s) => (PathBuf::from(s), true),
        None => (state_dir.join(rdax_proto::paths::ADMIN_SOCKET_NAME), false),
    };
    let len = path.as_os_str().len();
    if len <= MAX_SOCKET_PATH {
        return Ok((Some(path), None));
    }
    let why = format!(
        "admin.socket {} is {len} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}",
        path.display()
    );
    if explicit {
        return Err(ConfigError::Invalid(format!("{why}: set a shorter admin.socket (--admin-socket)")));
    }
    // A deep state directory must not stop a daemon that never asked for the socket.
    Ok((None, Some(format!("{why}: running without an admin socket (set admin.socket to a shorter path)"))))
}

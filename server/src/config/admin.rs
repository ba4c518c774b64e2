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
    /// A group (name or number) whose members may administer through the socket, besides
    /// root and rdaxd's own user.
    pub group: Option<String>,
}

/// `[admin] group` (flag over file), as written.
pub(super) fn group_name(args: &Args, file: &AdminSection) -> Option<String> {
    args.admin_group.clone().or(file.group.clone()).filter(|g| !g.is_empty())
}

/// The group `name` as a gid, checked to be one rdaxd can give the socket to (its own group,
/// one of its groups, or any when it runs as root). Looked up when the daemon starts, not by
/// `check-config`: the group may exist only where the daemon runs (systemd-sysusers).
pub fn group_gid(name: &str) -> Result<u32, ConfigError> {
    let gid = match name.parse::<u32>() {
        Ok(g) => g,
        Err(_) => crate::auth::local::group_id(name)
            .ok_or_else(|| ConfigError::Invalid(format!("admin.group `{name}`: no such group")))?,
    };
    let me = crate::auth::local::Me::current();
    let mine = rustix::process::getgroups().map(|g| g.iter().any(|g| g.as_raw() == gid)).unwrap_or(false);
    if me.uid != 0 && gid != rustix::process::getegid().as_raw() && !mine {
        return Err(ConfigError::Invalid(format!(
            "admin.group `{name}`: rdaxd is not a member of it, so it cannot give the socket to it"
        )));
    }
    Ok(gid)
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

//! Where rdaxd keeps its state by default, shared by the daemon and `rdaxctl` so that both
//! find the same admin socket.

use std::path::PathBuf;

/// The admin socket's file name inside the state directory.
pub const ADMIN_SOCKET_NAME: &str = "rdaxd.sock";

/// The system-wide state directory (systemd's `StateDirectory=rdax`, or root).
pub const SYSTEM_STATE_DIR: &str = "/var/lib/rdax";

/// The state directory a daemon started without `--state-dir` uses:
/// `$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/rdax`, else `/var/lib/rdax` as
/// root, else `~/.local/state/rdax`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STATE_DIRECTORY").filter(|d| !d.is_empty()) {
        // systemd's StateDirectory= may list several, colon-separated; the first is ours.
        let first = d.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(x).join("rdax");
    }
    // SAFETY: geteuid(2) cannot fail and touches no memory of ours.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from(SYSTEM_STATE_DIR);
    }
    std::env::var_os("HOME").map_or_else(|| PathBuf::from(".rdax"), |h| PathBuf::from(h).join(".local/state/rdax"))
}

/// Where a client looks for a local daemon's admin socket, in order: the state directory it
/// would use itself, then the system one.
pub fn admin_socket_candidates() -> Vec<PathBuf> {
    let mut v = vec![default_state_dir().join(ADMIN_SOCKET_NAME)];
    let system = PathBuf::from(SYSTEM_STATE_DIR).join(ADMIN_SOCKET_NAME);
    if !v.contains(&system) {
        v.push(system);
    }
    v
}

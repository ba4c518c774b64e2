//! Local administration: who may use the admin Unix socket.
//!
//! The socket file belongs to rdaxd's user: mode 0600, or 0660 with the group `admin.group`
//! when one is configured (the unit's `rdax`), so the kernel lets only root, that user and the
//! group's members connect. The daemon checks again on every connection, from the peer's
//! credentials as the kernel recorded them at `connect` (`SO_PEERCRED` for the user and
//! primary group, `SO_PEERGROUPS` for the supplementary groups): a peer that is root, rdaxd's
//! own user, or in the configured group becomes the principal `local:<user>` with every right.
//! (No group by default: a personal daemon's primary group may be one many users share.) Anyone else is refused before a byte of gRPC is read, so
//! a socket made world-writable by mistake (a `chmod`, a bind mount) still admits nobody
//! else. Nothing here reads the password or group databases for the decision; the user name
//! is looked up only to name the principal.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use super::Principal;

/// A peer admitted on the admin socket.
#[derive(Debug)]
pub struct LocalPeer {
    /// Its user id.
    pub uid: u32,
    /// Its process id at connect time (for logs).
    pub pid: Option<i32>,
    /// The principal it acts as: `local:<user>`, every right.
    pub principal: Arc<Principal>,
}

/// The credentials a peer connected with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCredentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (empty where the kernel cannot say).
    pub groups: Vec<u32>,
    /// Process id.
    pub pid: Option<i32>,
}

/// Who may administer besides root.
#[derive(Debug, Clone, Copy)]
pub struct Me {
    /// rdaxd's effective user id.
    pub uid: u32,
    /// The group whose members may administer too (`admin.group`), if any.
    pub group: Option<u32>,
}

impl Me {
    /// The running process, with no group.
    pub fn current() -> Me {
        Me { uid: rustix::process::geteuid().as_raw(), group: None }
    }
}

/// Whether `peer` may administer this daemon.
pub fn may_administer(me: Me, peer: &PeerCredentials) -> bool {
    peer.uid == 0 || peer.uid == me.uid || me.group.is_some_and(|g| peer.gid == g || peer.groups.contains(&g))
}

/// The gid of the group `name` (`None` if there is none, or the lookup failed).
pub fn group_id(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    // SAFETY: all-zero is a valid `group` (null pointers, gid 0) for getgrnam_r to fill.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the size passed; getgrnam_r writes the
    // strings into `buf` and points `gr`'s fields there, and sets `out` to `&gr` or null.
    let r = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut out) };
    (r == 0 && !out.is_null()).then_some(gr.gr_gid)
}

/// The credentials of the peer of a connected Unix socket.
pub fn peer_credentials(fd: BorrowedFd<'_>) -> std::io::Result<PeerCredentials> {
    let c = rustix::net::sockopt::socket_peercred(fd)?;
    Ok(PeerCredentials {
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
        groups: peer_groups(fd).unwrap_or_default(),
        pid: Some(c.pid.as_raw_nonzero().get()),
    })
}

/// `SO_PEERGROUPS` (Linux 4.13): the supplementary groups the peer had at `connect`.
/// The option's number is the generic one (asm-generic/socket.h), shared by x86 and arm.
#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "x86")))]
fn peer_groups(fd: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    const SO_PEERGROUPS: libc::c_int = 59;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is a live buffer of `len` bytes that getsockopt writes at most
        // `len` bytes into; `fd` is a valid open socket for the duration of the call.
        let r = unsafe {
            libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len)
        };
        if r == 0 {
            groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        // ERANGE: the buffer was too small, and `len` says how big it must be.
        if e.raw_os_error() == Some(libc::ERANGE) && (len as usize) > groups.len() * 4 && groups.len() < 1 << 16 {
            groups.resize(len as usize / std::mem::size_of::<libc::gid_t>() + 1, 0);
            continue;
        }
        return Err(e);
    }
}

#[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "x86"))))]
fn peer_groups(_fd: BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    Ok(Vec::new())
}

/// The login name of `uid`, or the number if it has none (or the lookup fails).
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids) for getpwuid_r to fill.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live memory of the size passed; getpwuid_r writes the
    // strings into `buf` and points `pw`'s fields there, and sets `out` to `&pw` or null.
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r != 0 || out.is_null() || pw.pw_name.is_null() {
        return uid.to_string();
    }
    // SAFETY: on success `pw_name` points to a NUL-terminated string inside `buf`, alive here.
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    name.to_str().map(str::to_string).unwrap_or_else(|_| uid.to_string())
}

/// The admitted peer for `creds`, named `local:<name>`.
pub fn admitted(creds: &PeerCredentials, name: &str) -> LocalPeer {
    LocalPeer { uid: creds.uid, pid: creds.pid, principal: Arc::new(Principal::admin(&format!("local:{name}"))) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn creds(uid: u32, gid: u32, groups: &[u32]) -> PeerCredentials {
        PeerCredentials { uid, gid, groups: groups.to_vec(), pid: None }
    }

    #[test]
    fn root_the_daemon_user_and_the_configured_group_may_administer_and_nobody_else() {
        let me = Me { uid: 990, group: Some(990) };
        assert!(may_administer(me, &creds(0, 0, &[])), "root");
        assert!(may_administer(me, &creds(990, 100, &[])), "rdaxd's own user");
        assert!(may_administer(me, &creds(1000, 990, &[])), "primary group");
        assert!(may_administer(me, &creds(1000, 1000, &[27, 990])), "supplementary group");
        assert!(!may_administer(me, &creds(1000, 1000, &[27, 100])), "another user");
        assert!(!may_administer(me, &creds(65534, 65534, &[])), "nobody");
        // No group configured: sharing a group with rdaxd is not enough.
        let alone = Me { uid: 990, group: None };
        assert!(may_administer(alone, &creds(0, 0, &[])));
        assert!(may_administer(alone, &creds(990, 990, &[])));
        assert!(!may_administer(alone, &creds(1000, 990, &[990])), "a member of rdaxd's group");
    }

    #[test]
    fn groups_are_looked_up_by_name() {
        assert_eq!(group_id("root"), Some(0));
        assert_eq!(group_id("no-such-group-for-rdax"), None);
    }

    #[test]
    fn the_kernel_reports_our_own_credentials_on_a_socket_pair() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let c = peer_credentials(a.as_fd()).unwrap();
        let me = Me::current();
        assert_eq!(c.uid, me.uid);
        assert_eq!(c.gid, rustix::process::getegid().as_raw());
        assert_eq!(c.pid, Some(std::process::id() as i32));
        // The supplementary groups are this process's own.
        let mut mine = rustix::process::getgroups().unwrap().iter().map(|g| g.as_raw()).collect::<Vec<_>>();
        let mut got = c.groups.clone();
        mine.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, mine);
        assert!(may_administer(me, &c));
    }

    #[test]
    fn user_names_come_from_the_password_database_or_fall_back_to_the_number() {
        assert_eq!(user_name(0), "root");
        assert_eq!(user_name(3_999_999_999), "3999999999");
    }
}

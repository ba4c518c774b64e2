//! The admin Unix socket against a real rdaxd: with no credential configured, TCP clients get
//! nothing, while local administrators get every right on the socket (the SDK's `unix:`
//! endpoints and `rdaxctl`'s default); anyone else is refused by the socket's mode and, past
//! that, by the peer check; members of `admin.group` are admitted when it is set, and only
//! then; the socket survives an unclean stop and goes away with a clean one.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::Daemon;
use rdax_client::{Client, ConnectOptions, ErrorKind, LeaseMode};

const MIB: u64 = 1 << 20;

fn unix(d: &Daemon) -> String {
    format!("unix:{}", d.admin_socket.as_ref().expect("the ports file names the admin socket").display())
}

#[tokio::test(flavor = "multi_thread")]
async fn local_admin_over_the_socket_and_nothing_over_tcp_without_a_credential() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_bare(dir.path(), &[]);
    let sock = d.admin_socket.clone().unwrap();
    assert_eq!(sock, dir.path().join("rdaxd.sock"), "the default is <state dir>/rdaxd.sock");
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "no admin.group: owner only");

    // TCP: no anonymous access, and the refusal says where to go.
    let tcp = Client::connect(&d.endpoint, ConnectOptions::default()).await.unwrap();
    let e = tcp.info().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated);
    assert!(e.to_string().contains("admin socket"), "{e}");
    assert_eq!(tcp.object("a", "x").unwrap().create(MIB).await.unwrap_err().kind(), ErrorKind::Unauthenticated);
    let e = tcp.open_session("tcp").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");

    // The socket: every right, for objects, sessions and leases (data over TCP by secret).
    let c = Client::connect(unix(&d), ConnectOptions::default()).await.unwrap();
    c.info().await.unwrap();
    let o = c.object("a", "x").unwrap();
    o.create(MIB).await.unwrap();
    o.write(0, vec![0x5A; 4096], true).await.unwrap();
    let s = c.open_session("local-tool").await.unwrap();
    let l = s.acquire("a", "x", 0, MIB, LeaseMode::ReadWrite).await.unwrap();
    l.write(4096, &[0xA5; 4096]).await.unwrap();
    assert_eq!(l.read(0, 8192).await.unwrap(), [vec![0x5A; 4096], vec![0xA5; 4096]].concat());
    let me = rdaxd::auth::local::user_name(rustix::process::geteuid().as_raw());
    let listed = c.sessions().await.unwrap();
    let mine = listed.iter().find(|x| x.session_id == s.id()).expect("listed");
    assert_eq!(mine.principal, format!("local:{me}"));
    let uid = rustix::process::geteuid().as_raw();
    assert!(mine.peer.starts_with(&format!("unix:uid={uid},pid=")), "the peer is the local user: {}", mine.peer);
    // Admin rights: revoke and evict.
    c.revoke_lease(l.id(), true).await.unwrap();
    c.evict_session(s.id(), "test").await.unwrap();
    // A bad token on the socket is not excused by the socket.
    let bad =
        Client::connect(unix(&d), ConnectOptions { token: Some("not-a-real-token-0000".into()), ..Default::default() })
            .await
            .unwrap();
    assert_eq!(bad.info().await.unwrap_err().kind(), ErrorKind::Unauthenticated);

    // rdaxctl finds the socket by itself, from the state directory a daemon would use.
    let out = common::rdaxctl()
        .env_remove("RDAX_ENDPOINT")
        .env("STATE_DIRECTORY", dir.path())
        .args(["--json", "stat", "a/x"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size"], MIB);
    // And TCP from rdaxctl is refused, with the exit status for it.
    let out = common::rdaxctl().args(["--endpoint", &d.endpoint, "info"]).output().unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn other_users_are_refused_by_the_mode_and_then_by_the_peer_check() {
    if !rustix::process::geteuid().is_root() {
        // Acting as another user needs root; the peer rule itself is unit-tested in
        // auth::local. CI runs as root.
        println!("skipped: not root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_bare(dir.path(), &[]);
    d.allow("admin socket: refused a peer");
    let sock = d.admin_socket.clone().unwrap();
    // A copy of rdaxctl that `nobody` can run, and a state directory it can traverse.
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(bin.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ctl = bin.path().join("rdaxctl");
    std::fs::copy(common::rdaxd_bin().with_file_name("rdaxctl"), &ctl).unwrap();
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Exec can fail with ETXTBSY for a moment: a process another test forked while the copy's
    // write descriptor was open holds it until that child execs. Retry that, bounded.
    let as_user = |uid: u32, gid: u32, sock: &std::path::Path, args: &[&str]| {
        common::poll(Duration::from_secs(10), "rdaxctl's copy to be executable", || {
            match std::process::Command::new(&ctl)
                .uid(uid)
                .gid(gid)
                .env("HOME", "/nonexistent")
                .arg("--endpoint")
                .arg(format!("unix:{}", sock.display()))
                .args(args)
                .output()
            {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => None,
                r => Some(r.unwrap()),
            }
        })
    };
    let as_nobody = |args: &[&str]| as_user(65534, 65534, &sock, args);
    // The socket's mode keeps nobody out (connect: EACCES).
    let out = as_nobody(&["create", "a/nobody", "--size", "1M"]);
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
    // Made world-writable by mistake: the peer check still refuses, before any request.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&["create", "a/nobody", "--size", "1M"]);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    common::poll(Duration::from_secs(10), "the refusal in the log", || {
        d.log().lines().any(|l| l.contains("admin socket: refused a peer") && l.contains("uid=65534")).then_some(())
    });
    // Sharing rdaxd's group (root's, here) is not enough without admin.group.
    let out = as_user(65534, 0, &sock, &["create", "a/nobody", "--size", "1M"]);
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let c = Client::connect(unix(&d), ConnectOptions::default()).await.unwrap();
    assert_eq!(c.object("a", "nobody").unwrap().stat().await.unwrap_err().kind(), ErrorKind::NotFound);
    drop(c);
    drop(d);

    // With admin.group, its members are admin: the socket is 0660 and theirs.
    let dir2 = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir2.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start_bare(dir2.path(), &["--admin-group", "root"]);
    let sock = d.admin_socket.clone().unwrap();
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!((meta.permissions().mode() & 0o777, std::os::unix::fs::MetadataExt::gid(&meta)), (0o660, 0));
    let out = as_user(65534, 0, &sock, &["create", "a/member", "--size", "1M"]);
    assert!(out.status.success(), "a member of admin.group: {}", String::from_utf8_lossy(&out.stderr));
    let out = as_user(65534, 65534, &sock, &["create", "a/outsider", "--size", "1M"]);
    assert_eq!(out.status.code(), Some(7), "not a member: kept out by the mode");
    let c = Client::connect(unix(&d), ConnectOptions::default()).await.unwrap();
    let listed = c.list_all("a").await.unwrap();
    assert_eq!(listed.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["member"]);
}

#[test]
fn the_socket_outlives_a_crash_and_goes_away_with_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start_bare(dir.path(), &[]);
    let sock = d.admin_socket.clone().unwrap();
    let st = d.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    assert!(!st.success());
    assert!(sock.exists(), "SIGKILL leaves the socket file behind");
    let mut d = Daemon::start_bare(dir.path(), &[]);
    assert!(d.log().contains("removed a stale admin socket"), "{}", d.log());
    let out = common::rdaxctl().args(["--endpoint", &unix(&d), "info"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(st.success(), "{}", d.log());
    assert!(!sock.exists(), "a clean stop removes the socket");
    // A socket that is off is not created; a path that is not a socket is left alone.
    let plain = dir.path().join("not-a-socket");
    std::fs::write(&plain, b"keep").unwrap();
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--state-dir", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "off", "--rdma-listen", "off", "--admin-socket", plain.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&plain).unwrap(), b"keep");
    let d = Daemon::start_bare(dir.path(), &["--admin-socket", "off"]);
    assert!(d.admin_socket.is_none());
    assert!(!sock.exists());
    drop(d);
    // An admin.group that does not exist is a configuration error at start (exit 78).
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--state-dir", dir.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "off", "--rdma-listen", "off", "--admin-group", "no-such-group-for-rdax"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such group"), "{}", String::from_utf8_lossy(&out.stderr));
}

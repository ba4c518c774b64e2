//! gRPC over TLS against the real daemon, with certificates the test makes (rcgen): what is
//! served, what is refused (an unknown CA, an expired certificate, no client certificate where
//! one is required, plaintext to the TLS port), a client certificate as a principal, and a
//! certificate swap on SIGHUP; and the TCP data plane over TLS (`--data-tls`).

mod common;

use std::time::Duration;

use common::Daemon;
use common::certs::{Ca, ca, leaf, mtls_flags, write};
use rdax_client::{Client, ConnectOptions, ErrorKind, TlsOptions};

fn https(d: &Daemon) -> String {
    d.endpoint.replace("http://", "https://")
}

async fn connect(
    ep: &str,
    ca: &Ca,
    identity: Option<&(String, String)>,
    token: Option<&str>,
) -> rdax_client::Result<Client> {
    let tls = TlsOptions {
        ca_pem: ca.cert.pem().into_bytes(),
        identity: identity.map(|(c, k)| (c.clone().into_bytes(), k.clone().into_bytes())),
        domain: None,
    };
    let opts = ConnectOptions { token: token.map(str::to_string), tls: Some(tls), ..Default::default() };
    let c = Client::connect(ep, opts).await?;
    c.info().await?;
    Ok(c)
}

const ROOT: &str = "root-token-tls-0a1b2c3d4e5f6071";

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_serves_certificates_it_trusts_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (ca("rdax test CA"), ca("another CA"));
    let pf = write(
        dir.path(),
        "principals.toml",
        &format!(
            "[[principal]]\nname = \"alice\"\ncert_common_names = [\"alice\"]\nscopes = [\"a/:write\"]\n\n\
             [[principal]]\nname = \"root\"\ntokens = [\"{}\"]\nscopes = [\":admin\"]\n",
            rdaxd::auth::hash_text(ROOT)
        ),
    );
    let mut flags = mtls_flags(dir.path(), &ca1);
    flags.extend(["--principals-file".to_string(), pf.display().to_string()]);
    let d = Daemon::start(dir.path(), &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let ep = https(&d);
    let alice = leaf(&ca1, "alice", false, false);
    // A client certificate names its principal: alice may write a/, not b/.
    let c = connect(&ep, &ca1, Some(&alice), None).await.unwrap();
    c.object("a", "x").unwrap().create(4096).await.unwrap();
    let e = c.object("b", "x").unwrap().create(4096).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    // A token, sent with a trusted certificate, decides who the caller is.
    let mallory = leaf(&ca1, "mallory", false, false);
    let root = connect(&ep, &ca1, Some(&mallory), Some(ROOT)).await.unwrap();
    root.object("b", "x").unwrap().create(4096).await.unwrap();
    // A trusted certificate whose name is no principal, and no token: unauthenticated.
    let Err(e) = connect(&ep, &ca1, Some(&mallory), None).await else {
        panic!("a certificate naming no principal was admitted")
    };
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    // Refused at the handshake: no client certificate, one from another CA, a server
    // certificate from a CA the client does not trust, and plaintext.
    assert!(connect(&ep, &ca1, None, Some(ROOT)).await.is_err(), "no client certificate");
    assert!(connect(&ep, &ca1, Some(&leaf(&ca2, "alice", false, false)), None).await.is_err(), "client CA");
    assert!(connect(&ep, &ca2, Some(&alice), None).await.is_err(), "unknown server CA");
    let plain = Client::connect(&d.endpoint, ConnectOptions { token: Some(ROOT.into()), ..Default::default() }).await;
    assert!(plain.is_err() || plain.unwrap().info().await.is_err(), "plaintext to the TLS port");
    assert!(d.log().contains("TLS handshake failed"), "{}", d.log());
    // rdaxctl speaks it too.
    let (cp, kp) = (write(dir.path(), "alice.pem", &alice.0), write(dir.path(), "alice.key", &alice.1));
    let capem = write(dir.path(), "ca.pem", &ca1.cert.pem());
    let out = common::rdaxctl()
        .args(["--endpoint", &ep, "--ca", capem.to_str().unwrap(), "--cert", cp.to_str().unwrap()])
        .args(["--key", kp.to_str().unwrap(), "stat", "a/x"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_is_refused_until_a_reload_swaps_in_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("rdax test CA");
    let (old, old_key) = leaf(&ca1, "rdaxd", true, true);
    let (cert, key) = (write(dir.path(), "server.pem", &old), write(dir.path(), "server.key", &old_key));
    let d = Daemon::start(dir.path(), &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    let ep = https(&d);
    assert!(connect(&ep, &ca1, None, None).await.is_err(), "an expired server certificate");
    // Renewed in place (same paths), then SIGHUP: new connections get the new certificate.
    let (new, new_key) = leaf(&ca1, "rdaxd", true, false);
    std::fs::write(&cert, new).unwrap();
    std::fs::write(&key, new_key).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.pid(), libc::SIGHUP) };
    common::poll(Duration::from_secs(10), "the certificates to be reloaded", || {
        d.log().contains("TLS certificates reloaded").then_some(())
    });
    let c = connect(&ep, &ca1, None, d.token.as_deref()).await.unwrap();
    assert!(!c.info().await.unwrap().uuid.is_empty());
    // A broken file on reload keeps the running certificate.
    std::fs::write(&key, "not a key").unwrap();
    d.allow("TLS certificates not reloaded");
    // SAFETY: as above.
    unsafe { libc::kill(d.pid(), libc::SIGHUP) };
    common::poll(Duration::from_secs(10), "the failed reload to be logged", || {
        d.log().contains("TLS certificates not reloaded").then_some(())
    });
    connect(&ep, &ca1, None, d.token.as_deref()).await.expect("still served with the running certificate");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_data_plane_over_tls_moves_bytes_and_refuses_plaintext() {
    use rdax_client::LeaseMode;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca1 = ca("rdax test CA");
    let (cert, key) = leaf(&ca1, "rdaxd", true, false);
    let (cp, kp) = (write(dir.path(), "server.pem", &cert), write(dir.path(), "server.key", &key));
    let d = Daemon::start(
        dir.path(),
        &["--tls-cert", cp.to_str().unwrap(), "--tls-key", kp.to_str().unwrap(), "--data-tls"],
    );
    assert!(d.log().contains("serving the TCP data plane over TLS"), "{}", d.log());
    let c = connect(&https(&d), &ca1, None, d.token.as_deref()).await.unwrap();
    let o = c.object("tls", "x").unwrap();
    o.create(8 << 20).await.unwrap();
    // 3 MiB + 5 bytes: several data-plane operations and bounce-buffer rounds, one unaligned.
    let data: Vec<u8> = (0..(3 << 20) + 5u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let s = c.open_session("tls-data").await.unwrap();
    let l = s.acquire("tls", "x", 0, 8 << 20, LeaseMode::ReadWrite).await.unwrap();
    l.write(7, &data).await.unwrap();
    l.write_persist(4 << 20, &data[..4096]).await.unwrap();
    l.flush(0, 8 << 20).await.unwrap();
    assert!(l.read(7, data.len() as u64).await.unwrap() == data, "lease read over TLS");
    assert!(o.read(7, data.len() as u64).await.unwrap() == data, "the bytes are in the object (gRPC read)");
    assert_eq!(o.read(4 << 20, 4096).await.unwrap(), data[..4096]);

    // The admin socket with the CA given: gRPC over the socket, the data plane over TLS.
    let unix = format!("unix:{}", d.admin_socket.as_ref().unwrap().display());
    let tls = TlsOptions { ca_pem: ca1.cert.pem().into_bytes(), ..Default::default() };
    let local = Client::connect(&unix, ConnectOptions { tls: Some(tls), ..Default::default() }).await.unwrap();
    let ls = local.open_session("local-tls").await.unwrap();
    let ll = ls.acquire("tls", "x", 0, 4096, LeaseMode::Read).await.unwrap();
    assert_eq!(ll.read(7, 16).await.unwrap(), data[..16]);
    // Without a CA the SDK says why it cannot use the data plane, instead of sending plaintext.
    let bare = Client::connect(&unix, ConnectOptions::default()).await.unwrap();
    let bs = bare.open_session("no-ca").await.unwrap();
    let e = bs.acquire("tls", "x", 0, 4096, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.to_string().contains("speaks TLS"), "{e}");

    // Plaintext HELLO, even with the session's real secret, gets no answer but a closed
    // connection: the handshake fails first.
    let mut raw = tokio::net::TcpStream::connect(&d.data).await.unwrap();
    let secret = s.secret();
    let hello = rdax_proto::dataplane::Request {
        op: rdax_proto::dataplane::Op::Hello,
        flags: 0,
        id: 1,
        key: secret.0,
        generation: rdax_proto::dataplane::VERSION,
        offset: 0,
        len: 0,
    };
    raw.write_all(&hello.encode()).await.unwrap();
    let mut b = [0u8; rdax_proto::dataplane::RESP_LEN];
    let got = tokio::time::timeout(Duration::from_secs(15), raw.read(&mut b)).await.expect("closed, not left hanging");
    assert!(!matches!(got, Ok(n) if n >= rdax_proto::dataplane::RESP_LEN), "plaintext got a data-plane reply");
    common::poll(Duration::from_secs(10), "the refused handshake in the log", || {
        d.log().contains("data-plane TLS handshake failed").then_some(())
    });
    l.release().await.unwrap();
}

#[test]
fn the_data_plane_needs_the_certificate_for_tls() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::rdaxd_bin())
        .args(["--state-dir", dir.path().to_str().unwrap(), "--data-tls", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dataplane.tls"), "{}", String::from_utf8_lossy(&out.stderr));
}

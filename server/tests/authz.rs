//! The trust model against the real daemon: every RPC of the authorization table × every kind
//! of caller; sessions that belong to their principal; the session secret as the only
//! data-plane credential; token rotation; and no secret in any log or listing.

mod common;

use std::time::Duration;

use bytes::{Buf, BufMut};
use common::{Daemon, Raw};
use prost::Message;
use rdax_client::{ConnectOptions, ErrorKind, LeaseMode};
use rdax_proto::dataplane::{Op, Status};
use rdax_proto::pb;
use rdaxd::auth::principals::hash_text;
use rdaxd::auth::table::{Need, TABLE};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

const ALICE: &str = "alice-token-5f0c1e9a7b3d4c2e8f61";
const READER: &str = "reader-token-91ab0c7d2e4f6a8b3c5d";
const ROOT: &str = "root-token-0a1b2c3d4e5f60718293";

fn principals(with_alice: bool) -> String {
    let mut s = String::new();
    if with_alice {
        s += &format!(
            "[[principal]]\nname = \"alice\"\ntokens = [\"{}\"]\nscopes = [\"a/:write\"]\n\n",
            hash_text(ALICE)
        );
    }
    s += &format!("[[principal]]\nname = \"reader\"\ntokens = [\"{}\"]\nscopes = [\"a/:read\"]\n\n", hash_text(READER));
    s += &format!("[[principal]]\nname = \"root\"\ntokens = [\"{}\"]\nscopes = [\":admin\"]\n", hash_text(ROOT));
    s
}

/// Bytes in, bytes out: the matrix sends each RPC's request already encoded.
#[derive(Default, Clone)]
struct Raw8;

impl Codec for Raw8 {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw8;
    type Decoder = Raw8;
    fn encoder(&mut self) -> Raw8 {
        Raw8
    }
    fn decoder(&mut self) -> Raw8 {
        Raw8
    }
}

impl Encoder for Raw8 {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw8 {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let v = src.chunk().to_vec();
        src.advance(v.len());
        Ok(Some(v))
    }
}

/// Call `path` with one request message and the given token; the status of the first reply
/// (`Ok` when a message came back).
async fn call(endpoint: &str, path: &'static str, body: Vec<u8>, token: Option<&str>) -> Code {
    let ch = tonic::transport::Endpoint::from_shared(endpoint.to_string()).unwrap().connect().await.unwrap();
    let mut g = tonic::client::Grpc::new(ch);
    g.ready().await.unwrap();
    let mut req = tonic::Request::new(tokio_stream::once(body));
    if let Some(t) = token {
        req.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req.set_timeout(Duration::from_secs(5));
    match g.streaming(req, http::uri::PathAndQuery::from_static(path), Raw8).await {
        Err(s) => s.code(),
        Ok(r) => match r.into_inner().message().await {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        },
    }
}

fn obj(ns: &str) -> Option<pb::ObjectRef> {
    Some(pb::ObjectRef { namespace: ns.into(), name: "x".into() })
}

/// The request for `path`, about namespace `ns` and session `sid`.
fn body(path: &str, ns: &str, sid: &str) -> Vec<u8> {
    let o = obj(ns);
    match path {
        "/rdax.v1.Pool/Info" => pb::InfoRequest {}.encode_to_vec(),
        "/rdax.v1.Pool/Stats" => pb::StatsRequest {}.encode_to_vec(),
        "/rdax.v1.Objects/Create" => pb::CreateRequest { object: o, size: 4096, ..Default::default() }.encode_to_vec(),
        "/rdax.v1.Objects/Stat" => pb::StatRequest { object: o }.encode_to_vec(),
        "/rdax.v1.Objects/List" => pb::ListRequest { namespace: ns.into(), ..Default::default() }.encode_to_vec(),
        "/rdax.v1.Objects/ListPg" => pb::ListPgRequest { pg: 0, pgs: 1, ..Default::default() }.encode_to_vec(),
        "/rdax.v1.Objects/Resize" => pb::ResizeRequest { object: o, size: 8192, grow_only: false }.encode_to_vec(),
        "/rdax.v1.Objects/PunchHole" => pb::PunchHoleRequest { object: o, offset: 0, length: 4096 }.encode_to_vec(),
        "/rdax.v1.Objects/Delete" => pb::DeleteRequest {
            object: Some(pb::ObjectRef { namespace: ns.into(), name: "gone".into() }),
            force: false,
        }
        .encode_to_vec(),
        "/rdax.v1.Objects/Read" => pb::ReadRequest { object: o, ..Default::default() }.encode_to_vec(),
        "/rdax.v1.Objects/Write" => pb::WriteChunk {
            header: Some(pb::WriteHeader { object: o, offset: 0, ..Default::default() }),
            data: vec![1; 16],
        }
        .encode_to_vec(),
        "/rdax.v1.Objects/Flush" => pb::FlushRequest { object: o, ..Default::default() }.encode_to_vec(),
        "/rdax.v1.Sessions/Open" => pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Open(pb::OpenSession {
                client_name: "matrix".into(),
                resume_session_id: sid.into(),
            })),
        }
        .encode_to_vec(),
        "/rdax.v1.Leases/Acquire" => pb::AcquireRequest {
            session_id: sid.into(),
            object: o,
            offset: 0,
            length: 4096,
            mode: pb::LeaseMode::Read as i32,
            ..Default::default()
        }
        .encode_to_vec(),
        "/rdax.v1.Leases/AcquireBatch" => pb::AcquireBatchRequest {
            requests: vec![pb::AcquireRequest {
                session_id: sid.into(),
                object: o,
                offset: 0,
                length: 4096,
                mode: pb::LeaseMode::Read as i32,
                ..Default::default()
            }],
        }
        .encode_to_vec(),
        "/rdax.v1.Leases/ReleaseBatch" => {
            pb::ReleaseBatchRequest { session_id: sid.into(), lease_ids: vec![999, 998] }.encode_to_vec()
        }
        "/rdax.v1.Leases/Renew" => pb::RenewRequest { session_id: sid.into(), lease_id: 999 }.encode_to_vec(),
        "/rdax.v1.Leases/Release" => pb::ReleaseRequest { session_id: sid.into(), lease_id: 999 }.encode_to_vec(),
        "/rdax.v1.Leases/List" => pb::ListLeasesRequest { session_id: sid.into() }.encode_to_vec(),
        "/rdax.v1.Admin/ListSessions" => pb::ListSessionsRequest {}.encode_to_vec(),
        "/rdax.v1.Admin/EvictSession" => {
            pb::EvictSessionRequest { session_id: "0".repeat(32), reason: "matrix".into() }.encode_to_vec()
        }
        "/rdax.v1.Admin/RevokeLease" => pb::RevokeLeaseRequest { lease_id: 999, immediate: true }.encode_to_vec(),
        // The Testing service (with the `testing` feature): empty requests.
        p if p.starts_with("/rdax.testing.") => Vec::new(),
        p => panic!("{p} is in the authorization table but has no probe here: add one"),
    }
}

fn denied(c: Code) -> bool {
    matches!(c, Code::Unauthenticated | Code::PermissionDenied)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_by_every_kind_of_caller() {
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("principals.toml");
    std::fs::write(&pf, principals(true)).unwrap();
    let d = Daemon::start(dir.path(), &["--principals-file", pf.to_str().unwrap()]);
    let connect = async |t: &str| {
        rdax_client::Client::connect(&d.endpoint, ConnectOptions { token: Some(t.into()), ..Default::default() })
            .await
            .unwrap()
    };
    let (alice, root) = (connect(ALICE).await, connect(ROOT).await);
    for ns in ["a", "b"] {
        root.object(ns, "x").unwrap().create(4096).await.unwrap();
    }
    let mine = alice.open_session("alice's").await.unwrap();
    let theirs = root.open_session("root's").await.unwrap();
    let mut rows = 0;
    for &(path, need) in TABLE {
        if path.starts_with("/rdax.testing.") && !cfg!(feature = "testing") {
            continue;
        }
        // Recreate what a previous row may have deleted or resized away.
        for ns in ["a", "b"] {
            let _ = root.object(ns, "gone").unwrap().create(4096).await;
        }
        let e = &d.endpoint;
        let in_scope = body(path, "a", mine.id());
        // No credential, a wrong one: UNAUTHENTICATED, whatever the RPC.
        assert_eq!(call(e, path, in_scope.clone(), None).await, Code::Unauthenticated, "{path}: no token");
        assert_eq!(
            call(e, path, in_scope.clone(), Some("wrong-token-000000000000")).await,
            Code::Unauthenticated,
            "{path}: wrong token"
        );
        // Out of scope: another namespace, another principal's session, or no admin right.
        let (out, expect_out) = match need {
            Need::Principal => (in_scope.clone(), false),
            Need::Object(_) | Need::Namespace(_) => (body(path, "b", mine.id()), true),
            Need::OwnSession => (body(path, "a", theirs.id()), true),
            Need::Lease => (body(path, "b", mine.id()), true),
            Need::Admin => (in_scope.clone(), true),
        };
        let got = call(e, path, out, Some(ALICE)).await;
        assert_eq!(got == Code::PermissionDenied, expect_out, "{path}: out of scope gave {got:?}");
        // In scope, and an administrator: never refused for want of a credential or right.
        let got = call(e, path, in_scope.clone(), Some(if need == Need::Admin { ROOT } else { ALICE })).await;
        assert!(!denied(got), "{path}: in scope gave {got:?}");
        let admin_body =
            if matches!(need, Need::OwnSession | Need::Lease) { body(path, "a", theirs.id()) } else { in_scope };
        let got = call(e, path, admin_body, Some(ROOT)).await;
        assert!(!denied(got), "{path}: admin gave {got:?}");
        // A read-only principal: reads pass, writes and admin do not.
        let reader = call(e, path, body(path, "a", ""), Some(READER)).await;
        let writes = matches!(need, Need::Object(r) if r == rdaxd::auth::Rights::WRITE) || need == Need::Admin;
        if writes {
            assert_eq!(reader, Code::PermissionDenied, "{path}: read-only principal");
        }
        rows += 1;
    }
    assert!(rows >= 19, "only {rows} rows");

    // An exclusive lease takes the range from everyone: a reader may not ask for one.
    let reader = connect(READER).await;
    let rs = reader.open_session("reader's").await.unwrap();
    rs.acquire("a", "x", 0, 4096, LeaseMode::Read).await.unwrap().release().await.unwrap();
    let e = rs.acquire_exclusive("a", "x", 0, 4096, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    rs.close().await.unwrap();
    // A lease on b/ cannot be had, and its keys cannot be used, by a principal scoped to a/.
    let e = mine.acquire("b", "x", 0, 4096, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    // Nor in a batch: one range out of scope refuses the whole batch, and nothing is granted.
    let before = alice.leases(Some(mine.id())).await.unwrap().len();
    let r = |ns| rdax_client::LeaseRange { namespace: ns, name: "x", offset: 0, len: 4096, mode: LeaseMode::Read };
    let e = mine.acquire_batch(&[r("a"), r("b"), r("a")]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert_eq!(alice.leases(Some(mine.id())).await.unwrap().len(), before, "a refused batch granted something");
    // A batch item for another principal's session is refused the same way.
    let theirs_item = pb::AcquireRequest {
        session_id: theirs.id().into(),
        object: obj("a"),
        offset: 0,
        length: 4096,
        mode: pb::LeaseMode::Read as i32,
        ..Default::default()
    };
    let body = pb::AcquireBatchRequest { requests: vec![theirs_item] }.encode_to_vec();
    assert_eq!(call(&d.endpoint, "/rdax.v1.Leases/AcquireBatch", body, Some(ALICE)).await, Code::PermissionDenied);
    let on_b = theirs.acquire("b", "x", 0, 4096, LeaseMode::ReadWrite).await.unwrap();
    let (pool, key) = on_b.segments()[0].target.unwrap();
    // Listing leases without a session: an administrator sees this one, alice does not.
    assert!(root.leases(None).await.unwrap().iter().any(|l| l.lease_id == on_b.id()));
    assert!(!alice.leases(None).await.unwrap().iter().any(|l| l.lease_id == on_b.id()), "another principal's lease");
    let (mut raw, st) = Raw::connect(&d.data, mine.secret().0).await;
    assert_eq!(st, Status::Ok);
    assert_eq!(raw.op(Op::Write, key, on_b.generation(), pool, &[9; 8], 8).await, Status::WrongSession);
    // The listed session id is no data-plane credential.
    let (_, st) = Raw::connect(&d.data, theirs.id().parse::<rdax_proto::model::SessionId>().unwrap().0).await;
    assert_eq!(st, Status::BadSession, "HELLO with a listed session id");
    // Others cannot resume, renew or release a session's leases; the SDK's error is typed.
    let e = alice.release_lease(theirs.id(), on_b.id()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");

    // Listings name principals and show no secret.
    let listed = root.sessions().await.unwrap();
    let alice_row = listed.iter().find(|s| s.session_id == mine.id()).unwrap();
    assert_eq!(alice_row.principal, "alice");
    let out = d.ctl(&["--token-file", write(dir.path(), "root.tok", ROOT).to_str().unwrap(), "--json", "sessions"]);
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listing.contains("\"principal\""), "{listing}");
    let secrets = [mine.secret().expose_hex(), theirs.secret().expose_hex()];
    for text in [&d.log(), &listing] {
        for s in secrets.iter().map(String::as_str).chain([ALICE, READER, ROOT]) {
            assert!(!text.contains(s), "a secret leaked: {s}");
        }
    }

    // Rotation: a reload that removes alice's token ends her sessions and refuses the token.
    std::fs::write(&pf, principals(false)).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(d.pid(), libc::SIGHUP) };
    common::poll(Duration::from_secs(10), "alice's session to end with her token", || {
        d.log().contains("the credential it was opened with was removed").then_some(())
    });
    let e = alice.info().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unauthenticated, "{e}");
    assert!(root.sessions().await.unwrap().iter().any(|s| s.session_id == theirs.id()), "root's session lives on");
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_made_by_rdaxctl_token_create_works_as_printed() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::rdaxctl().args(["--json", "token", "create", "carol", "--scope", "c/:write"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    assert!(token.len() >= 64, "{token}");
    let pf = dir.path().join("principals.toml");
    std::fs::write(&pf, v["principals_file_entry"].as_str().unwrap()).unwrap();
    assert!(!std::fs::read_to_string(&pf).unwrap().contains(&token), "the file holds only the hash");
    let d = Daemon::start(dir.path(), &["--principals-file", pf.to_str().unwrap()]);
    let c = rdax_client::Client::connect(&d.endpoint, ConnectOptions { token: Some(token), ..Default::default() })
        .await
        .unwrap();
    c.object("c", "mine").unwrap().create(4096).await.unwrap();
    let e = c.object("d", "theirs").unwrap().create(4096).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    assert!(e.to_string().contains("carol"), "{e}");
    let e = c.sessions().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "listing sessions needs admin: {e}");
}

#[tokio::test(flavor = "multi_thread")]
async fn caps_per_principal_hold_across_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("principals.toml");
    std::fs::write(&pf, principals(true)).unwrap();
    let cfg = dir.path().join("rdaxd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[auth]\nprincipals_file = \"{}\"\n[limits]\nmax_sessions_per_principal = 2\nmax_leases_per_principal = 3\n",
            pf.display()
        ),
    )
    .unwrap();
    let d = Daemon::start(dir.path(), &["--config", cfg.to_str().unwrap()]);
    let connect = async |t: &str| {
        rdax_client::Client::connect(&d.endpoint, ConnectOptions { token: Some(t.into()), ..Default::default() })
            .await
            .unwrap()
    };
    let (alice, root) = (connect(ALICE).await, connect(ROOT).await);
    alice.object("a", "x").unwrap().create(1 << 20).await.unwrap();
    let (s1, s2) = (alice.open_session("one").await.unwrap(), alice.open_session("two").await.unwrap());
    let e = alice.open_session("three").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("limits.max_sessions_per_principal"), "{e}");
    let mut held = Vec::new();
    for (i, s) in [&s1, &s2, &s1].into_iter().enumerate() {
        held.push(s.acquire("a", "x", i as u64 * 4096, 4096, LeaseMode::Read).await.unwrap());
    }
    let e = s2.acquire("a", "x", 0, 4096, LeaseMode::Read).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ResourceExhausted, "{e}");
    assert!(e.to_string().contains("limits.max_leases_per_principal"), "{e}");
    // Another principal is not held back by alice's use.
    let r = root.open_session("root").await.unwrap();
    r.acquire("a", "x", 0, 4096, LeaseMode::Read).await.unwrap();
    // A returned lease frees its place.
    held.pop().unwrap().release().await.unwrap();
    s2.acquire("a", "x", 0, 4096, LeaseMode::Read).await.unwrap();
}

/// `GET /metrics` with an optional bearer token; the status line.
fn scrape(addr: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n{auth}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines().next().unwrap_or_default().to_string()
}

#[test]
fn metrics_can_have_a_token_of_their_own() {
    const SCRAPER: &str = "scraper-token-77aa66bb55cc44dd";
    let dir = tempfile::tempdir().unwrap();
    let pf = dir.path().join("principals.toml");
    std::fs::write(&pf, format!("{}\n[metrics]\ntokens = [\"{}\"]\n", principals(true), hash_text(SCRAPER))).unwrap();
    let d = Daemon::start(dir.path(), &["--principals-file", pf.to_str().unwrap()]);
    assert!(scrape(&d.metrics, None).contains("401"), "no token");
    assert!(scrape(&d.metrics, Some("wrong-token-0000000000")).contains("401"), "a wrong token");
    assert!(scrape(&d.metrics, Some(SCRAPER)).contains("200"), "the metrics token");
    assert!(scrape(&d.metrics, Some(ALICE)).contains("200"), "a principal's token");
    // The metrics token is no principal: gRPC refuses it.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = rdax_client::Client::connect(
            &d.endpoint,
            ConnectOptions { token: Some(SCRAPER.into()), ..Default::default() },
        )
        .await
        .unwrap();
        assert_eq!(c.info().await.unwrap_err().kind(), ErrorKind::Unauthenticated);
    });
}

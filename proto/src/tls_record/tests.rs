//! [`TlsConn`] against a stock rustls client (tokio-rustls) over real loopback sockets: if
//! either side framed, sealed or sequenced a record wrongly, the other would refuse it.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

struct Pki {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

fn pki() -> Pki {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap().self_signed(&key).unwrap();
    let der = CertificateDer::from(cert.der().to_vec());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], PrivateKeyDer::try_from(key.serialize_der()).unwrap())
        .unwrap();
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Pki { server: Arc::new(server), client: Arc::new(client) }
}

type Client = tokio_rustls::client::TlsStream<TcpStream>;

/// A connected pair: our server end and a rustls client end.
async fn pair(p: &Pki) -> (TlsConn, Client) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let connector = tokio_rustls::TlsConnector::from(p.client.clone());
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.unwrap()
    });
    let (tcp, _) = l.accept().await.unwrap();
    let server = accept(p.server.clone(), tcp).await.unwrap();
    (server, client.await.unwrap())
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed as u32).to_be_bytes()[0]).collect()
}

#[tokio::test]
async fn bytes_cross_both_ways_through_payload_paths_and_stream_io() {
    let p = pki();
    let (mut s, mut c) = pair(&p).await;
    let up = pattern((3 << 20) + 5, 1);
    // The client writes at once, in odd sizes, so some records may reach the server while it
    // is still finishing the handshake: they must arrive, in order, before the rest.
    let writer = {
        let up = up.clone();
        tokio::spawn(async move {
            let mut at = 0;
            let mut step = 1;
            while at < up.len() {
                let n = step.min(up.len() - at);
                c.write_all(&up[at..at + n]).await.unwrap();
                at += n;
                step = step * 3 % 100_003 + 1;
            }
            c.flush().await.unwrap();
            c
        })
    };
    let mut got = vec![0u8; up.len()];
    let (head, tail) = got.split_at_mut(7);
    s.read_exact(head).await.unwrap();
    s.recv_with(tail.len(), |at, b| tail[at..at + b.len()].copy_from_slice(b)).await.unwrap();
    assert!(got == up, "upload differs");
    let mut c = writer.await.unwrap();

    let down = pattern((2 << 20) + 3, 2);
    let reader = tokio::spawn(async move {
        let mut got = vec![0u8; (2 << 20) + 3 + 4];
        c.read_exact(&mut got).await.unwrap();
        (c, got)
    });
    s.write_all(b"head").await.unwrap();
    s.send_with(down.len(), |at, b| b.copy_from_slice(&down[at..at + b.len()])).await.unwrap();
    s.flush().await.unwrap();
    let (mut c, got) = reader.await.unwrap();
    assert_eq!(&got[..4], b"head");
    assert!(got[4..] == down[..], "download differs");

    // close_notify from the client ends the server's stream cleanly.
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0);
    // And ours ends the client's.
    s.shutdown().await.unwrap();
    assert_eq!(c.read_to_end(&mut rest).await.unwrap(), 0);
}

#[tokio::test]
async fn key_updates_both_ways_keep_the_stream_going() {
    let p = pki();
    let (mut s, mut c) = pair(&p).await;
    // The client moves to its next key and asks for ours (rustls requests an update).
    c.write_all(b"before").await.unwrap();
    c.get_mut().1.refresh_traffic_keys().unwrap();
    c.write_all(b"after").await.unwrap();
    c.flush().await.unwrap();
    let mut got = [0u8; 11];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"beforeafter");
    let rx_seq = s.rx_keys.seq();
    assert!(rx_seq <= 2, "the receive sequence restarts at a key update (is {rx_seq})");
    assert!(s.owe_key_update, "rustls asks for our update");
    // Our update goes out ahead of the next record, and the client follows it.
    s.write_all(b"one").await.unwrap();
    assert!(!s.owe_key_update && s.tx_keys.seq() == 1, "the next record went under the new key");
    // Then one of our own, from the limit (set low here), in the middle of a payload.
    s.rekey_after(5);
    let big = pattern(20 * MAX_PLAIN + 9, 3);
    s.send_with(big.len(), |at, b| b.copy_from_slice(&big[at..at + b.len()])).await.unwrap();
    s.flush().await.unwrap();
    assert!(s.tx_keys.seq() < 20, "the sending key was updated mid-payload (seq {})", s.tx_keys.seq());
    let mut one = [0u8; 3];
    c.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"one");
    let mut got = vec![0u8; big.len()];
    c.read_exact(&mut got).await.unwrap();
    assert!(got == big);
}

#[tokio::test]
async fn a_forged_record_ends_the_stream_with_an_error() {
    let p = pki();
    let (mut s, mut c) = pair(&p).await;
    c.write_all(b"ok").await.unwrap();
    c.flush().await.unwrap();
    // A well-formed header and 40 bytes no key sealed, on the raw socket under the client.
    let mut forged = vec![APPLICATION_DATA, 3, 3, 0, 40];
    forged.extend(pattern(40, 9));
    c.get_mut().0.write_all(&forged).await.unwrap();
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await.unwrap();
    let e = s.read_exact(&mut two).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("decryption failed"), "{e}");
}

#[tokio::test]
async fn a_peer_that_vanishes_without_close_notify_is_an_error_not_an_end() {
    let p = pki();
    let (mut s, c) = pair(&p).await;
    let (tcp, _) = c.into_inner();
    drop(tcp);
    let mut b = [0u8; 1];
    let e = s.read_exact(&mut b).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("close_notify"), "{e}");
}

#[tokio::test]
async fn a_tls12_only_client_is_refused() {
    let p = pki();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // No roots needed: the versions do not meet, before any certificate is looked at.
    let roots = rustls::RootCertStore::empty();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.is_err()
    });
    let (tcp, _) = l.accept().await.unwrap();
    assert!(accept(p.server.clone(), tcp).await.is_err());
    assert!(client.await.unwrap(), "the client saw the refusal");
}

/// The client config with secret extraction, as the SDK builds it.
fn extracting(p: &Pki) -> Arc<rustls::ClientConfig> {
    let mut c = (*p.client).clone();
    c.enable_secret_extraction = true;
    Arc::new(c)
}

#[tokio::test]
async fn our_client_against_a_stock_rustls_server_including_its_key_update() {
    let p = pki();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(p.server.clone());
    let server = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = acceptor.accept(tcp).await.unwrap();
        let mut got = vec![0u8; (1 << 20) + 1];
        s.read_exact(&mut got).await.unwrap();
        // Echo it back under a fresh key (asking for the client's too).
        s.get_mut().1.refresh_traffic_keys().unwrap();
        s.write_all(&got).await.unwrap();
        s.flush().await.unwrap();
        let mut more = [0u8; 4];
        s.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"done");
        s.shutdown().await.unwrap();
    });
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut c = connect(extracting(&p), ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
    let up = pattern((1 << 20) + 1, 4);
    c.send_with(up.len(), |at, b| b.copy_from_slice(&up[at..at + b.len()])).await.unwrap();
    c.flush().await.unwrap();
    let mut back = vec![0u8; up.len()];
    c.recv_with(back.len(), |at, b| back[at..at + b.len()].copy_from_slice(b)).await.unwrap();
    assert!(back == up);
    assert!(c.owe_key_update, "the server asked for the client's update");
    c.write_all(b"done").await.unwrap();
    c.flush().await.unwrap();
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).await.unwrap(), 0, "close_notify, then the end");
    server.await.unwrap();
}

#[tokio::test]
async fn both_ends_ours() {
    let p = pki();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = extracting(&p);
    let client = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut c = connect(cfg, ServerName::try_from("localhost").unwrap(), tcp).await.unwrap();
        c.rekey_after(3);
        let up = pattern(10 * MAX_PLAIN, 5);
        c.write_all(&up).await.unwrap();
        c.flush().await.unwrap();
        c
    });
    let (tcp, _) = l.accept().await.unwrap();
    let mut s = accept(p.server.clone(), tcp).await.unwrap();
    let mut got = vec![0u8; 10 * MAX_PLAIN];
    s.read_exact(&mut got).await.unwrap();
    assert!(got == pattern(10 * MAX_PLAIN, 5));
    let c = client.await.unwrap();
    assert!(c.tx_keys.seq() < 10, "the client moved to a new key mid-stream");
}

#[test]
fn records_that_arrive_with_the_clients_finished_are_not_lost() {
    // A blocking rustls client that queues application data behind its Finished and sends
    // both in one write, so they reach the server in the same read as the end of the
    // handshake: rustls opens that data, and `accept` must hand it on.
    let p = pki();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let l = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = p.client.clone();
    let client = std::thread::spawn(move || {
        use std::io::Write;
        let mut conn = rustls::ClientConnection::new(cfg, ServerName::try_from("localhost").unwrap()).unwrap();
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        while conn.is_handshaking() {
            while conn.wants_write() && conn.is_handshaking() {
                conn.write_tls(&mut sock).unwrap();
            }
            if conn.is_handshaking() {
                conn.read_tls(&mut sock).unwrap();
                conn.process_new_packets().unwrap();
            }
        }
        conn.writer().write_all(b"first bytes").unwrap();
        let mut all = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut all).unwrap();
        }
        sock.write_all(&all).unwrap();
        sock
    });
    rt.block_on(async {
        let (tcp, _) = l.accept().await.unwrap();
        let mut s = accept(p.server.clone(), tcp).await.unwrap();
        assert_eq!(s.early, b"first bytes", "rustls opened them during the handshake");
        let mut got = [0u8; 11];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"first bytes");
        assert!(s.early.is_empty());
    });
    drop(client.join().unwrap());
}

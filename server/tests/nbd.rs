//! The NBD server against real NBD clients (libnbd's `nbdcopy` and `nbdinfo`, `qemu-img`,
//! `qemu-io`; `scripts/install-deps.sh` installs them) and against a raw client of our own
//! for what no polite client sends.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use rdax_client::{LeaseMode, SessionNotice};

fn tool(name: &str) -> Command {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(name).exists());
    assert!(found, "{name} is not installed: scripts/install-deps.sh installs libnbd-bin and qemu-utils");
    Command::new(name)
}

fn start(dir: &std::path::Path, pool: &str) -> Daemon {
    start_with(dir, pool, &[])
}

/// An NBD server acting as the harness's `admin`, with `extra` flags.
fn start_with(dir: &std::path::Path, pool: &str, extra: &[&str]) -> Daemon {
    let mut args = vec!["--pool-size", pool, "--nbd-listen", "127.0.0.1:0", "--nbd-principal", "admin"];
    args.extend_from_slice(extra);
    Daemon::start(dir, &args)
}

fn uri(d: &Daemon, vol: &str) -> String {
    format!("nbd://{}/{vol}", d.nbd)
}

fn ok(out: std::process::Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `len` bytes of a seeded stream (xorshift), so nothing large sits on disk.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// `nbdcopy - URI` fed from memory, with `connections` connections.
fn copy_in(d: &Daemon, vol: &str, data: &[u8], connections: u32) {
    let mut c = tool("nbdcopy")
        .args(["-C", &connections.to_string(), "-", &uri(d, vol)])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(data).unwrap();
    ok(c.wait_with_output().unwrap(), "nbdcopy in");
}

fn copy_out(d: &Daemon, vol: &str) -> Vec<u8> {
    let out = tool("nbdcopy").args([&uri(d, vol), "-"]).output().unwrap();
    assert!(out.status.success(), "nbdcopy out: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `nbdinfo --map` as `(offset, length, type)` rows.
fn map(d: &Daemon, vol: &str) -> Vec<(u64, u64, String)> {
    let text = ok(tool("nbdinfo").args(["--map", &uri(d, vol)]).output().unwrap(), "nbdinfo --map");
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), f[3..].join(" "))
        })
        .collect()
}

fn qemu_io(d: &Daemon, vol: &str, cmds: &[&str]) -> std::process::Output {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri(d, vol)).output().unwrap()
}

fn stat(d: &Daemon, vol: &str) -> serde_json::Value {
    serde_json::from_str(&ok(d.ctl(&["--json", "stat", vol]), "rdaxctl stat")).unwrap()
}

#[test]
fn nbdcopy_round_trips_a_random_image_over_several_connections_and_qemu_img_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "320M");
    ok(d.ctl(&["volume", "create", "a/big", "--size", "256M", "--sparse"]), "volume create");
    ok(d.ctl(&["volume", "create", "a/small", "--size", "16M"]), "volume create");
    let ls = ok(d.ctl(&["--json", "volume", "ls", "a"]), "volume ls");
    let ls: serde_json::Value = serde_json::from_str(&ls).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2, "{ls}");

    // 256 MiB in over four connections (multi-conn), back out over one, compared.
    let data = pattern(0x5eed, 256 << 20);
    copy_in(&d, "a/big", &data, 4);
    let back = copy_out(&d, "a/big");
    assert!(back == data, "the image read back differs from the one written ({} bytes back)", back.len());
    assert!(d.metric("rdax_nbd_bytes_total{cmd=\"write\"}") >= (256 << 20) as f64, "NBD write bytes counted");
    assert!(d.metric("rdax_nbd_bytes_total{cmd=\"read\"}") >= (256 << 20) as f64, "NBD read bytes counted");

    // qemu-img compares an image file with the export, and tells a one-byte difference.
    let small = pattern(7, 16 << 20);
    let img = dir.path().join("small.img");
    std::fs::write(&img, &small).unwrap();
    copy_in(&d, "a/small", &small, 1);
    let same = tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(uri(&d, "a/small")).output();
    ok(same.unwrap(), "qemu-img compare");
    let mut changed = small.clone();
    changed[12345] ^= 0xff;
    std::fs::write(&img, &changed).unwrap();
    let diff = tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&img).arg(uri(&d, "a/small")).output();
    assert_eq!(diff.unwrap().status.code(), Some(1), "qemu-img compare must see the changed byte");
}

#[test]
fn trim_and_write_zeroes_punch_holes_that_block_status_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "64M");
    ok(d.ctl(&["volume", "create", "a/v", "--size", "16M"]), "volume create");
    assert_eq!(map(&d, "a/v"), vec![(0, 16 << 20, "data".into())], "an allocated volume is all data");
    assert_eq!(stat(&d, "a/v")["allocated_bytes"], 16 << 20);
    ok(qemu_io(&d, "a/v", &["write -P 0x61 0 16M"]), "qemu-io write");
    // TRIM 4 MiB at 4 MiB; WRITE_ZEROES that may punch, at 12 MiB; WRITE_ZEROES with
    // NO_HOLE (allocated zeroes) at 10 MiB.
    ok(qemu_io(&d, "a/v", &["discard 4M 4M", "write -z -u 12M 1M", "write -z 10M 1M"]), "qemu-io discard/zero");
    let m = map(&d, "a/v");
    let hole = |off: u64, len: u64| m.iter().any(|r| r.0 == off && r.1 == len && r.2.contains("hole"));
    assert!(hole(4 << 20, 4 << 20), "no hole after TRIM: {m:?}");
    assert!(hole(12 << 20, 1 << 20), "no hole after WRITE_ZEROES: {m:?}");
    assert!(m.iter().any(|r| r.0 <= 10 << 20 && r.0 + r.1 >= 11 << 20 && r.2 == "data"), "NO_HOLE punched: {m:?}");
    assert_eq!(stat(&d, "a/v")["allocated_bytes"], 11 << 20, "TRIM gave the blocks back to the pool");
    // What was trimmed or zeroed reads zero; the rest kept its bytes.
    let out = ok(
        qemu_io(
            &d,
            "a/v",
            &["read -P 0 4M 4M", "read -P 0 10M 1M", "read -P 0 12M 1M", "read -P 0x61 0 4M", "read -P 0x61 13M 3M"],
        ),
        "qemu-io read",
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A write into the hole fills it again.
    ok(qemu_io(&d, "a/v", &["write -P 0x62 5M 64k", "read -P 0x62 5M 64k"]), "qemu-io refill");
    assert!(!map(&d, "a/v").iter().any(|r| r.0 <= 5 << 20 && r.0 + r.1 > 5 << 20 && r.2.contains("hole")));
}

#[test]
fn flushed_writes_survive_a_kill_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = start(dir.path(), "64M");
    ok(d.ctl(&["volume", "create", "a/v", "--size", "8M", "--sparse"]), "volume create");
    // qemu-io flushes before it exits; FUA on the second write.
    let out = ok(qemu_io(&d, "a/v", &["write -P 0x33 0 2M", "write -f -P 0x44 6M 1M", "flush"]), "qemu-io");
    assert!(out.contains("wrote 2097152/2097152"), "{out}");
    d.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    let d = start(dir.path(), "64M");
    let out = ok(qemu_io(&d, "a/v", &["read -P 0x33 0 2M", "read -P 0x44 6M 1M", "read -P 0 2M 4M"]), "qemu-io read");
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[test]
fn concurrent_writers_on_separate_connections_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "64M");
    ok(d.ctl(&["volume", "create", "a/v", "--size", "16M", "--sparse"]), "volume create");
    let writers: Vec<_> = (0..4u8)
        .map(|i| {
            let cmd = format!("write -P {} {}M 4M", 0x10 + i, i as u64 * 4);
            tool("qemu-io").args(["-f", "raw", "-c", &cmd, &uri(&d, "a/v")]).stdout(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for w in writers {
        ok(w.wait_with_output().unwrap(), "concurrent qemu-io");
    }
    for i in 0..4u8 {
        let cmd = format!("read -P {} {}M 4M", 0x10 + i, i as u64 * 4);
        let out = ok(qemu_io(&d, "a/v", &[&cmd]), "qemu-io read");
        assert!(!out.contains("Pattern verification failed"), "writer {i}: {out}");
    }
}

/// A bare NBD client: fixed newstyle, structured replies, `NBD_OPT_GO`.
struct Raw(TcpStream);

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

impl Raw {
    fn connect(d: &Daemon) -> Raw {
        let s = TcpStream::connect(&d.nbd).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = Raw(s);
        let mut g = [0u8; 18];
        r.0.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        r.0.write_all(&1u32.to_be_bytes()).unwrap();
        r
    }

    fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.0.write_all(&b).unwrap();
    }

    /// Option replies up to the final one: `(type, data)`.
    fn replies(&mut self) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            self.0.read_exact(&mut d).unwrap();
            let last = kind == 1 || kind & 0x8000_0000 != 0;
            out.push((kind, d));
            if last {
                return out;
            }
        }
    }

    fn opt(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_opt(option, data);
        self.replies()
    }

    /// Structured replies, then GO: the export's size.
    fn go(&mut self, vol: &str) -> Result<u64, (u32, String)> {
        assert_eq!(self.opt(8, &[]), vec![(1, vec![])]);
        let mut d = (vol.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(vol.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        let r = self.opt(7, &d);
        let (kind, data) = r.last().unwrap().clone();
        if kind != 1 {
            return Err((kind, String::from_utf8_lossy(&data).into_owned()));
        }
        let export = r.iter().find(|(k, d)| *k == 3 && d[..2] == [0, 0]).expect("NBD_INFO_EXPORT");
        Ok(u64::from_be_bytes(export.1[2..10].try_into().unwrap()))
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.0.write_all(&b).unwrap();
    }

    /// One structured chunk: `(flags, type, cookie, payload)`; `None` at EOF.
    fn chunk(&mut self) -> Option<(u16, u16, u64, Vec<u8>)> {
        let mut h = [0u8; 20];
        if self.0.read_exact(&mut h).is_err() {
            return None;
        }
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e_33ef, "structured reply magic");
        let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        self.0.read_exact(&mut d).unwrap();
        Some((
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
            d,
        ))
    }

    /// The NBD error of a final error chunk (0 for success).
    fn error_of(c: &(u16, u16, u64, Vec<u8>)) -> u32 {
        if c.1 & 0x8000 == 0 { 0 } else { u32::from_be_bytes(c.3[..4].try_into().unwrap()) }
    }

    fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0))
    }
}

#[test]
fn bad_negotiation_and_bad_requests_get_error_replies_and_the_daemon_stays_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "64M");
    ok(d.ctl(&["volume", "create", "a/v", "--size", "1M"]), "volume create");
    ok(d.ctl(&["create", "a/plain", "--size", "4096"]), "create");
    let mut r = Raw::connect(&d);
    // An unknown option: ERR_UNSUP, and haggling goes on.
    assert_eq!(r.opt(0x4242, b"junk")[0].0, 0x8000_0001);
    // An option over the maximum (skipped): ERR_TOO_BIG.
    assert_eq!(r.opt(7, &vec![0u8; 100_000])[0].0, 0x8000_0009);
    // Malformed GO data: ERR_INVALID.
    assert_eq!(r.opt(7, &[0, 0, 0, 50, b'x'])[0].0, 0x8000_0003);
    // An oversized export name, a name that is no volume, an object that is no volume.
    let long = "a/".to_string() + &"x".repeat(5000);
    assert_eq!(r.go(&long).unwrap_err().0, 0x8000_0006);
    assert_eq!(r.go("nope/none").unwrap_err().0, 0x8000_0006);
    let (kind, msg) = r.go("a/plain").unwrap_err();
    assert_eq!(kind, 0x8000_0006);
    assert!(msg.contains("not a volume"), "{msg}");
    // LIST shows the volume only.
    let list = r.opt(3, &[]);
    let names: Vec<String> =
        list.iter().filter(|(k, _)| *k == 2).map(|(_, d)| String::from_utf8_lossy(&d[4..]).into()).collect();
    assert_eq!(names, vec!["a/v".to_string()]);
    let size = r.go("a/v").unwrap();
    assert_eq!(size, 1 << 20);
    // A read past the end, a read over the maximum payload, an unknown command: EINVAL each,
    // and the connection goes on.
    r.request(0, 1, size - 512, 4096, &[]);
    let c = r.chunk().unwrap();
    assert_eq!((c.2, Raw::error_of(&c)), (1, 22), "past the end");
    r.request(0, 2, 0, 64 << 20, &[]);
    let c = r.chunk().unwrap();
    assert_eq!((c.2, Raw::error_of(&c)), (2, 22), "over the maximum");
    r.request(99, 3, 0, 0, &[]);
    let c = r.chunk().unwrap();
    assert_eq!((c.2, Raw::error_of(&c)), (3, 22), "unknown command");
    // A write past the end: its payload is consumed, EINVAL, and the stream stays in step.
    r.request(1, 4, size - 100, 200, &[7u8; 200]);
    let c = r.chunk().unwrap();
    assert_eq!((c.2, Raw::error_of(&c)), (4, 22), "write past the end");
    r.request(1, 5, 0, 4, b"rdax");
    let c = r.chunk().unwrap();
    assert_eq!((c.2, Raw::error_of(&c)), (5, 0), "a good write after the bad ones");
    r.request(0, 6, 0, 4, &[]);
    let c = r.chunk().unwrap();
    assert_eq!((c.2, &c.3[8..]), (6, &b"rdax"[..]), "read back (OFFSET_DATA: offset, then data)");
    // A write over the maximum payload cannot be skipped safely: EOVERFLOW, then the
    // connection closes.
    r.request(1, 7, 0, 64 << 20, &[]);
    let c = r.chunk().unwrap();
    assert_eq!((c.2, Raw::error_of(&c)), (7, 75));
    assert!(r.at_eof(), "the connection closes after an oversized write");
    // A request with a bad magic closes the connection.
    let mut r = Raw::connect(&d);
    r.go("a/v").unwrap();
    r.0.write_all(&[0xde; 28]).unwrap();
    assert!(r.at_eof());
    // Unknown client flags close the connection at once.
    let mut s = TcpStream::connect(&d.nbd).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(matches!(s.read(&mut g), Ok(0)));
    // The daemon is still there, for NBD and for gRPC.
    ok(tool("nbdinfo").arg(uri(&d, "a/v")).output().unwrap(), "nbdinfo after the abuse");
    ok(d.ctl(&["info"]), "rdaxctl info after the abuse");
}

#[test]
fn resize_while_connected_and_rm_needs_force_while_exported() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "64M");
    ok(d.ctl(&["volume", "create", "a/v", "--size", "4M", "--sparse"]), "volume create");
    let mut r = Raw::connect(&d);
    assert_eq!(r.go("a/v").unwrap(), 4 << 20);
    r.request(1, 1, 0, 5, b"hello");
    assert_eq!(Raw::error_of(&r.chunk().unwrap()), 0);
    assert_eq!(stat(&d, "a/v")["nbd_clients"], 1);
    // Grow: the export's lease is recalled and taken again; the connection goes on, and a
    // new client sees the new size.
    ok(d.ctl(&["volume", "resize", "a/v", "8M"]), "volume resize");
    r.request(0, 2, 0, 5, &[]);
    let c = r.chunk().unwrap();
    assert_eq!(&c.3[8..], b"hello", "read after the resize");
    let info = ok(tool("nbdinfo").arg(uri(&d, "a/v")).output().unwrap(), "nbdinfo");
    assert!(info.contains("export-size: 8388608"), "{info}");
    // Shrink under the connection: past the new end is an error reply, not a crash.
    ok(d.ctl(&["volume", "resize", "a/v", "1M"]), "volume shrink");
    r.request(0, 3, 2 << 20, 4096, &[]);
    let c = r.chunk().unwrap();
    assert_eq!((c.2, Raw::error_of(&c)), (3, 5), "a read past the shrunk end");
    // rm is refused while a client is connected (exit 10), --force disconnects it.
    let out = d.ctl(&["volume", "rm", "a/v"]);
    assert_eq!(out.status.code(), Some(10), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NBD client"), "{}", String::from_utf8_lossy(&out.stderr));
    ok(d.ctl(&["volume", "rm", "--force", "a/v"]), "volume rm --force");
    assert!(r.at_eof(), "the client was disconnected");
    assert_eq!(d.ctl(&["stat", "a/v"]).status.code(), Some(3), "the volume is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_volume_is_exclusive_against_sdk_writers() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(dir.path(), "64M");
    ok(d.ctl(&["volume", "create", "a/v", "--size", "4M"]), "volume create");
    let c = client(&d).await;
    // An SDK writer holds a lease; an NBD client connecting recalls it (the SDK returns it).
    let mut s = c.open_session("sdk-writer").await.unwrap();
    let lease = s.acquire("a", "v", 0, 4096, LeaseMode::ReadWrite).await.unwrap();
    let nbd = tokio::task::spawn_blocking({
        let addr = d.nbd.clone();
        move || {
            let mut r = Raw(TcpStream::connect(addr).unwrap());
            r.0.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut g = [0u8; 18];
            r.0.read_exact(&mut g).unwrap();
            r.0.write_all(&1u32.to_be_bytes()).unwrap();
            r.go("a/v").unwrap();
            // A request that needs the (exclusive) lease.
            r.request(0, 1, 0, 4096, &[]);
            assert_eq!(Raw::error_of(&r.chunk().unwrap()), 0);
            r
        }
    });
    let notice = tokio::time::timeout(Duration::from_secs(20), s.next_notice()).await.expect("a notice");
    assert!(
        matches!(notice, Some(SessionNotice::LeaseRecalled { lease_id, .. }) if lease_id == lease.id()),
        "the SDK lease was not recalled for the NBD export: {notice:?}"
    );
    let mut r = nbd.await.unwrap();
    // While the export holds it, an SDK writer is refused, and so is a gRPC write.
    let e = s.acquire("a", "v", 0, 4096, LeaseMode::ReadWrite).await.unwrap_err();
    assert_eq!(e.kind(), rdax_client::ErrorKind::FailedPrecondition, "{e}");
    let f = dir.path().join("junk");
    std::fs::write(&f, b"junk").unwrap();
    let put = d.ctl(&["put", "a/v", f.to_str().unwrap(), "--offset", "0"]);
    assert_eq!(put.status.code(), Some(10), "{}", String::from_utf8_lossy(&put.stderr));
    // Once the NBD client leaves, the SDK gets its lease again.
    r.request(2, 9, 0, 0, &[]);
    assert!(r.at_eof());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match s.acquire("a", "v", 0, 4096, LeaseMode::ReadWrite).await {
            Ok(l) => {
                l.release().await.unwrap();
                break;
            }
            Err(e) if e.kind() == rdax_client::ErrorKind::FailedPrecondition => {
                assert!(std::time::Instant::now() < deadline, "the export never let go: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_principal_with_only_read_gets_a_read_only_export_and_nothing_outside_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let principals = dir.path().join("principals.toml");
    std::fs::write(&principals, "[[principal]]\nname = \"ro\"\nscopes = [\"a/:read\"]\n").unwrap();
    std::fs::set_permissions(&principals, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let p = principals.display().to_string();
    let d = Daemon::start(
        dir.path(),
        &["--pool-size", "64M", "--principals-file", &p, "--nbd-listen", "127.0.0.1:0", "--nbd-principal", "ro"],
    );
    // Administered through the admin socket (this daemon has no admin token).
    let admin = format!("unix:{}", d.admin_socket.as_ref().unwrap().display());
    let ctl = |args: &[&str]| rdaxctl().arg("--endpoint").arg(&admin).args(args).output().unwrap();
    ok(ctl(&["volume", "create", "a/v", "--size", "1M"]), "volume create a/v");
    ok(ctl(&["volume", "create", "b/secret", "--size", "1M"]), "volume create b/secret");
    let info = ok(tool("nbdinfo").arg(uri(&d, "a/v")).output().unwrap(), "nbdinfo");
    assert!(info.contains("is_read_only: true") && info.contains("can_trim: false"), "{info}");
    let w = qemu_io(&d, "a/v", &["write -P 1 0 4k"]);
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(text.contains("write failed") || !w.status.success(), "a write to a read-only export: {text}");
    let r = tool("qemu-io").args(["-r", "-f", "raw", "-c", "read -P 0 0 4k", &uri(&d, "a/v")]).output().unwrap();
    let r = ok(r, "qemu-io -r read");
    assert!(!r.contains("Pattern verification failed"), "{r}");
    // Outside the scope: not listed, and GO is refused by policy.
    let list = ok(tool("nbdinfo").args(["--list", &format!("nbd://{}", d.nbd)]).output().unwrap(), "nbdinfo --list");
    assert!(list.contains("a/v") && !list.contains("b/secret"), "{list}");
    // A client that writes anyway gets EPERM from the server (its payload consumed).
    let mut r = Raw::connect(&d);
    r.go("a/v").unwrap();
    r.request(1, 1, 0, 4, b"evil");
    assert_eq!(Raw::error_of(&r.chunk().unwrap()), 1, "EPERM");
    r.request(4, 2, 0, 4096, &[]);
    assert_eq!(Raw::error_of(&r.chunk().unwrap()), 1, "TRIM on a read-only export: EPERM");
    let mut r = Raw::connect(&d);
    let (kind, msg) = r.go("b/secret").unwrap_err();
    assert_eq!(kind, 0x8000_0002, "{msg}");
    assert!(d.metric("rdax_nbd_errors_total") >= 2.0, "the EPERM replies were counted");
    assert!(msg.contains("no `read` right"), "{msg}");
}

#[test]
fn nbd_over_tls_requires_starttls_and_client_certificates_name_the_principal() {
    use common::certs::{ca, leaf, mtls_flags, write};
    let dir = tempfile::tempdir().unwrap();
    let (ca1, other) = (ca("rdax test CA"), ca("another CA"));
    // libnbd reads a directory: ca-cert.pem, client-cert.pem, client-key.pem.
    let client_dir = |name: &str, by: &common::certs::Ca, cn: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let (c, k) = leaf(by, cn, false, false);
        write(&d, "ca-cert.pem", &ca1.cert.pem());
        write(&d, "client-cert.pem", &c);
        write(&d, "client-key.pem", &k);
        d
    };
    let reader = client_dir("reader", &ca1, "reader");
    let writer = client_dir("writer", &ca1, "writer");
    let stranger = client_dir("stranger", &other, "writer");
    let principals = write(
        dir.path(),
        "principals.toml",
        "[[principal]]\nname = \"reader\"\ncert_common_names = [\"reader\"]\nscopes = [\"a/:read\"]\n\n\
         [[principal]]\nname = \"writer\"\ncert_common_names = [\"writer\"]\nscopes = [\"a/:write\"]\n",
    );
    std::fs::set_permissions(&principals, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut flags = mtls_flags(dir.path(), &ca1);
    flags.extend(["--pool-size", "64M", "--nbd-listen", "127.0.0.1:0", "--nbd-tls"].map(String::from));
    flags.extend(["--principals-file".to_string(), principals.display().to_string()]);
    let d = Daemon::start(dir.path(), &flags.iter().map(String::as_str).collect::<Vec<_>>());
    let admin = format!("unix:{}", d.admin_socket.as_ref().unwrap().display());
    ok(
        rdaxctl().arg("--endpoint").arg(&admin).args(["volume", "create", "a/v", "--size", "1M"]).output().unwrap(),
        "create",
    );
    let tls_uri = |certs: &std::path::Path| format!("nbds://{}/a/v?tls-certificates={}", d.nbd, certs.display());
    // The writer's certificate: a writable export, and bytes round-trip over TLS.
    let info = ok(tool("nbdinfo").arg(tls_uri(&writer)).output().unwrap(), "nbdinfo over TLS");
    assert!(info.contains("with TLS") && info.contains("is_read_only: false"), "{info}");
    let data = pattern(11, 1 << 20);
    let mut c = tool("nbdcopy").args(["-", &tls_uri(&writer)]).stdin(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(&data).unwrap();
    assert!(c.wait().unwrap().success(), "nbdcopy over TLS");
    let back = tool("nbdcopy").args([&tls_uri(&writer), "-"]).output().unwrap();
    assert!(back.status.success() && back.stdout == data, "the bytes did not round-trip over TLS");
    // The reader's: read-only.
    let info = ok(tool("nbdinfo").arg(tls_uri(&reader)).output().unwrap(), "nbdinfo as reader");
    assert!(info.contains("is_read_only: true"), "{info}");
    // A certificate from another CA fails the handshake; plaintext gets "TLS first".
    assert!(!tool("nbdinfo").arg(tls_uri(&stranger)).output().unwrap().status.success(), "unknown CA accepted");
    assert!(!tool("nbdinfo").arg(uri(&d, "a/v")).output().unwrap().status.success(), "plaintext accepted");
    let mut r = Raw::connect(&d);
    assert_eq!(r.opt(3, &[])[0].0, 0x8000_0005, "LIST before STARTTLS: ERR_TLS_REQD");
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"a/v\0\0");
    assert_eq!(r.opt(7, &go)[0].0, 0x8000_0005, "GO before STARTTLS: ERR_TLS_REQD");
    assert_eq!(r.opt(5, b"x")[0].0, 0x8000_0003, "STARTTLS with data: ERR_INVALID");
}

#[test]
fn an_idle_export_outlives_the_session_and_lease_ttls() {
    let dir = tempfile::tempdir().unwrap();
    let d = start_with(dir.path(), "64M", &["--session-ttl-ms", "200", "--lease-ttl-ms", "3000"]);
    ok(d.ctl(&["volume", "create", "a/v", "--size", "1M"]), "volume create");
    let mut r = Raw::connect(&d);
    r.go("a/v").unwrap();
    r.request(1, 1, 0, 4, b"live");
    assert_eq!(Raw::error_of(&r.chunk().unwrap()), 0);
    // Several session TTLs pass with no request: the export keeps its session and lease itself.
    std::thread::sleep(Duration::from_millis(1500));
    r.request(0, 2, 0, 4, &[]);
    let c = r.chunk().unwrap();
    assert_eq!((Raw::error_of(&c), &c.3[8..]), (0, &b"live"[..]), "the export died while idle");
    assert!(!d.log().contains("the export's session was ended"), "{}", d.log());
}

#[test]
fn sigterm_with_nbd_clients_attached_shuts_down_cleanly_and_keeps_flushed_data() {
    let dir = tempfile::tempdir().unwrap();
    // A stalled payload is cut off after the op timeout, well inside the shutdown timeout.
    let mut d = start_with(dir.path(), "64M", &["--data-op-timeout-ms", "1000"]);
    ok(d.ctl(&["volume", "create", "a/v", "--size", "4M", "--sparse"]), "volume create");
    // One client idle after a flushed write, one in the middle of a write's payload.
    let mut idle = Raw::connect(&d);
    idle.go("a/v").unwrap();
    idle.request(1, 1, 0, 5, b"kept!");
    assert_eq!(Raw::error_of(&idle.chunk().unwrap()), 0);
    idle.request(3, 2, 0, 0, &[]);
    assert_eq!(Raw::error_of(&idle.chunk().unwrap()), 0, "FLUSH");
    let mut busy = Raw::connect(&d);
    busy.go("a/v").unwrap();
    let mut hdr = 0x2560_9513u32.to_be_bytes().to_vec();
    hdr.extend_from_slice(&0u16.to_be_bytes());
    hdr.extend_from_slice(&1u16.to_be_bytes());
    hdr.extend_from_slice(&3u64.to_be_bytes());
    hdr.extend_from_slice(&(1u64 << 20).to_be_bytes());
    hdr.extend_from_slice(&65536u32.to_be_bytes());
    busy.0.write_all(&hdr).unwrap();
    busy.0.write_all(&[9u8; 1000]).unwrap(); // the rest never comes
    let st = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(60));
    assert!(st.success(), "rdaxd exit status {st}\n{}", d.log());
    assert!(d.log().contains("shutdown finished"), "{}", d.log());
    assert!(idle.at_eof(), "the idle client's connection was closed");
    // The stalled write was cut off by the op timeout or the shutdown, never half-answered.
    let mut rest = Vec::new();
    let _ = busy.0.read_to_end(&mut rest);
    assert!(rest.is_empty() || rest.len() >= 20, "a torn reply: {rest:?}");
    let d = start(dir.path(), "64M");
    let out = ok(qemu_io(&d, "a/v", &["read -P 0x6b 0 1", "read -v 0 5"]), "qemu-io read after the restart");
    assert!(out.contains("6b 65 70 74 21"), "{out}");
}

/// Sequential writes then reads of 4 KiB on one connection (the next request sent as soon as
/// the reply is in, as at queue depth 1), each read checked, in rounds of 64 pairs until
/// `until` (asked between rounds only, so that asking does not slow the requests); returns
/// how many pairs ran.
fn sequential(r: &mut Raw, until: impl Fn() -> bool, deadline: Duration) -> u64 {
    let end = std::time::Instant::now() + deadline;
    let mut n = 0u64;
    loop {
        assert!(std::time::Instant::now() < end, "timed out after {deadline:?} of sequential requests ({n} sent)");
        for _ in 0..64 {
            let off = (n % 256) * 4096;
            let data = pattern(n, 4096);
            r.request(1, 2 * n, off, 4096, &data);
            let c = r.chunk().expect("a write reply");
            assert_eq!((c.2, Raw::error_of(&c)), (2 * n, 0), "write {n}");
            r.request(0, 2 * n + 1, off, 4096, &[]);
            let c = r.chunk().expect("a read reply");
            assert_eq!(c.2, 2 * n + 1);
            assert_eq!(c.1, 1, "OFFSET_DATA");
            assert_eq!(&c.3[8..], &data[..], "read {n} returns what write {n} wrote");
            n += 1;
        }
        if until() {
            return n;
        }
    }
}

/// A daemon with `nbd.busy_poll_us = us` and a 1 MiB volume `a/v`, and a raw client attached.
fn polling(us: u64) -> (tempfile::TempDir, Daemon, Raw) {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("rdaxd.toml");
    std::fs::write(&conf, format!("[nbd]\nbusy_poll_us = {us}\n")).unwrap();
    let d = start_with(dir.path(), "64M", &["--config", conf.to_str().unwrap()]);
    ok(d.ctl(&["volume", "create", "a/v", "--size", "1M"]), "volume create");
    let mut r = Raw::connect(&d);
    r.go("a/v").unwrap();
    (dir, d, r)
}

#[test]
fn a_connection_whose_requests_follow_its_replies_busy_polls_and_one_with_polling_off_never_does() {
    let polls = |d: &Daemon, r: &str| d.metric(&format!("rdax_nbd_busy_polls_total{{result=\"{r}\"}}"));
    // A window of 1 ms: a client on the same host that answers each reply at once is hot.
    let (_dir, d, mut r) = polling(1000);
    // Polls find requests (bounded: on a loaded machine some gaps exceed the window).
    let n = sequential(&mut r, || polls(&d, "request") >= 20.0, Duration::from_secs(60));
    assert!(n > 0);
    // A pause longer than the window after a round: the poll after its last reply times out
    // and the connection parks (repeated, bounded, until a round ended hot).
    poll(Duration::from_secs(60), "a poll to time out", || {
        sequential(&mut r, || true, Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20)); // idle on purpose, 20 windows
        (polls(&d, "timeout") > 0.0).then_some(())
    });
    let before = polls(&d, "request") + polls(&d, "timeout");
    std::thread::sleep(Duration::from_millis(50)); // idle on purpose: the connection is cold now
    assert_eq!(polls(&d, "request") + polls(&d, "timeout"), before, "a cold connection does not poll");
    r.request(0, 9_999, 0, 4096, &[]);
    assert_eq!(r.chunk().expect("a read after the pause").2, 9_999);
    r.request(2, 10_000, 0, 0, &[]); // DISC
    assert!(r.at_eof());

    // busy_poll_us = 0: never a poll, whatever the client does.
    let (_dir, d, mut r) = polling(0);
    let rounds = std::cell::Cell::new(0);
    let n = sequential(
        &mut r,
        || {
            rounds.set(rounds.get() + 1);
            rounds.get() >= 8
        },
        Duration::from_secs(60),
    );
    assert_eq!(n, 8 * 64);
    assert_eq!(polls(&d, "request") + polls(&d, "timeout"), 0.0, "no polls with busy_poll_us = 0");
}

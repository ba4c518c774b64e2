//! `rdaxctl mkpool` and `rdaxctl fsck` as a user runs them: the real binary on real files.

use std::path::Path;
use std::process::{Command, Output};

use rdaxd::pool::layout::{BLOCK, ExtSlot, Geometry, OBJ_SLOT};
use rdaxd::pool::{OpenOptions, Pool};

fn rdaxctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rdaxctl")).args(args).output().expect("run rdaxctl")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn mkpool(path: &Path) {
    let o = rdaxctl(&["mkpool", path.to_str().unwrap(), "--size", "32M"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A pool with two objects holding data; returns its geometry.
fn populated(path: &Path) -> Geometry {
    mkpool(path);
    let pool = Pool::open(path, OpenOptions::default()).unwrap();
    for name in ["one", "two"] {
        pool.create_object("ns", name, 3 * BLOCK).unwrap();
        pool.write("ns", name, 0, &[1u8; 3 * BLOCK as usize], true).unwrap();
    }
    *pool.geometry()
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let mut all = std::fs::read(path).unwrap();
    all[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, all).unwrap();
}

#[test]
fn mkpool_then_fsck_is_clean_and_mkpool_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.pool");
    let ps = p.to_str().unwrap();
    let o = rdaxctl(&["mkpool", ps, "--size", "64MiB"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("mode          file (persistence: msync)"), "{}", text(&o));
    let o = rdaxctl(&["fsck", ps]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("clean"));
    let o = rdaxctl(&["mkpool", ps, "--size", "64MiB"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("--force"), "{}", text(&o));
    let o = rdaxctl(&["mkpool", ps, "--size", "32MiB", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 32 << 20);
}

#[test]
fn fsck_json_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("j.pool");
    populated(&p);
    let o = rdaxctl(&["--json", "fsck", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["clean"], true);
    assert_eq!(v["objects"], 2);
    assert_eq!(v["extents"], 2);
}

#[test]
fn fsck_reports_a_flipped_bit() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.pool");
    let geo = populated(&p);
    let mut b = std::fs::read(&p).unwrap()[geo.exttab_off as usize + 20];
    b ^= 0x10;
    patch(&p, geo.exttab_off + 20, &[b]);
    let o = rdaxctl(&["fsck", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("extent slot 0: checksum mismatch"), "{}", text(&o));
    assert!(text(&o).contains("DAMAGED"));
}

#[test]
fn fsck_reports_leaked_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.pool");
    let geo = populated(&p);
    // Wipe object "two" (slot 1) but leave its extent: its blocks have no owner.
    patch(&p, geo.objtab_off + OBJ_SLOT, &[0u8; OBJ_SLOT as usize]);
    let o = rdaxctl(&["fsck", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("does not exist: 3 blocks leaked"), "{}", text(&o));
}

#[test]
fn fsck_reports_blocks_owned_twice() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.pool");
    let geo = populated(&p);
    // Point object two's extent (slot 1, owner id 2) at object one's blocks.
    let all = std::fs::read(&p).unwrap();
    let one_block = u64::from_le_bytes(all[geo.exttab_off as usize + 16..][..8].try_into().unwrap());
    let forged = ExtSlot { owner: 2, file_block: 0, pool_block: one_block + 1, nblocks: 3 }.encode(1);
    patch(&p, geo.exttab_off + 32, &forged);
    let o = rdaxctl(&["fsck", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("blocks owned twice"), "{}", text(&o));
    // Opening the damaged pool is refused, and nothing is modified by fsck.
    let before = std::fs::read(&p).unwrap();
    assert!(Pool::open(&p, OpenOptions::default()).is_err());
    rdaxctl(&["fsck", p.to_str().unwrap()]);
    assert!(std::fs::read(&p).unwrap() == before, "fsck must not write to the pool");
}

#[test]
fn fsck_on_something_that_is_not_a_pool_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let o = rdaxctl(&["fsck", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not an rdax pool"), "{}", text(&o));
    let o = rdaxctl(&["fsck", dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).contains("No such file"), "{}", text(&o));
}

#[test]
fn cluster_status_says_what_it_needs() {
    let o = rdaxctl(&["cluster", "status"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("--cluster etcd://"), "{}", text(&o));
    let o = rdaxctl(&["--cluster", "http://127.0.0.1:2379", "cluster", "status"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("expected etcd://"), "{}", text(&o));
    // Nothing listens on port 1: unreachable (7), or, in a build without the feature, a local
    // refusal that says how to get it (2).
    let o = rdaxctl(&["--cluster", "etcd://127.0.0.1:1", "cluster", "status"]);
    if cfg!(feature = "cluster") {
        assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    } else {
        assert_eq!(o.status.code(), Some(2), "{}", text(&o));
        assert!(text(&o).contains("--features cluster"), "{}", text(&o));
    }
}

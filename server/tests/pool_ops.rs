//! Object operations on a real pool file (mmap, msync), end to end through the library API.

use std::sync::{Arc, Mutex};

use rdaxd::pool::layout::{BLOCK, FormatOptions};
use rdaxd::pool::media::PoolMode;
use rdaxd::pool::{CreateOptions, ObjError, OpenError, OpenOptions, Pool, ReleasedBlocks};

fn new_pool(size: u64) -> (tempfile::TempDir, std::path::PathBuf, Pool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("test.pool");
    let pool = Pool::create(&path, size, CreateOptions::default()).unwrap();
    (dir, path, pool)
}

fn assert_clean(pool: &Pool) {
    let r = pool.check();
    assert!(r.clean, "check found problems: {:?}", r.problems);
}

#[test]
fn create_stat_list_and_delete() {
    let (_d, _p, pool) = new_pool(64 << 20);
    assert_eq!(pool.info().mode, PoolMode::File);
    for i in 0..25 {
        pool.create_object("ns", &format!("obj{i:02}"), i * 1000).unwrap();
    }
    pool.create_object("other", "x", 1).unwrap();
    let st = pool.stat("ns", "obj07").unwrap();
    assert_eq!((st.size, st.allocated_bytes, st.extents), (7000, 0, 0));
    // Paginate: 10 + 10 + 5, ordered, only this namespace.
    let mut names = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = pool.list("ns", after.as_deref(), 10).unwrap();
        names.extend(page.objects.iter().map(|o| o.name.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let expect: Vec<String> = (0..25).map(|i| format!("obj{i:02}")).collect();
    assert_eq!(names, expect);
    assert_eq!(pool.list("other", None, 100).unwrap().objects.len(), 1);
    assert!(pool.list("empty", None, 10).unwrap().objects.is_empty());
    pool.delete("ns", "obj07").unwrap();
    assert!(matches!(pool.stat("ns", "obj07"), Err(ObjError::NotFound { .. })));
    assert!(matches!(pool.delete("ns", "obj07"), Err(ObjError::NotFound { .. })));
    assert!(matches!(pool.create_object("ns", "obj08", 0), Err(ObjError::AlreadyExists { .. })));
    assert_clean(&pool);
}

#[test]
fn write_read_holes_and_persist_survive_reopen() {
    let (_d, path, pool) = new_pool(64 << 20);
    pool.create_object("ns", "a", 10 * BLOCK + 123).unwrap();
    let data: Vec<u8> = (0..3 * BLOCK as usize).map(|i| (i % 251) as u8).collect();
    pool.write("ns", "a", BLOCK + 7, &data, true).unwrap();
    let st = pool.stat("ns", "a").unwrap();
    assert_eq!(st.allocated_bytes, 4 * BLOCK, "blocks 1..=4 allocated");
    let mut buf = vec![0xEEu8; (10 * BLOCK + 500) as usize];
    let n = pool.read("ns", "a", 0, &mut buf).unwrap();
    assert_eq!(n as u64, 10 * BLOCK + 123, "short read at the end");
    assert!(buf[..BLOCK as usize + 7].iter().all(|&b| b == 0), "hole and unwritten prefix read zero");
    assert_eq!(&buf[BLOCK as usize + 7..BLOCK as usize + 7 + data.len()], &data[..]);
    assert!(buf[BLOCK as usize + 7 + data.len()..n].iter().all(|&b| b == 0));
    drop(pool);
    let pool = Pool::open(&path, OpenOptions::default()).unwrap();
    let mut again = vec![0u8; data.len()];
    pool.read("ns", "a", BLOCK + 7, &mut again).unwrap();
    assert_eq!(again, data);
    assert_clean(&pool);
}

#[test]
fn shrink_zeroes_the_tail_and_grow_exposes_only_zeros() {
    let (_d, _p, pool) = new_pool(64 << 20);
    pool.create_object("ns", "t", 3 * BLOCK).unwrap();
    pool.write("ns", "t", 0, &vec![0xAB; 3 * BLOCK as usize], true).unwrap();
    pool.resize("ns", "t", BLOCK + 10).unwrap();
    let st = pool.stat("ns", "t").unwrap();
    assert_eq!(st.allocated_bytes, 2 * BLOCK);
    pool.resize("ns", "t", 3 * BLOCK).unwrap();
    let mut buf = vec![0u8; 3 * BLOCK as usize];
    pool.read("ns", "t", 0, &mut buf).unwrap();
    assert!(buf[..BLOCK as usize + 10].iter().all(|&b| b == 0xAB));
    assert!(buf[BLOCK as usize + 10..].iter().all(|&b| b == 0), "bytes past the old end must read zero");
    assert_clean(&pool);
}

#[test]
fn grow_only_grows_and_concurrent_grows_end_at_the_largest() {
    let (_d, _p, pool) = new_pool(64 << 20);
    pool.create_object("ns", "g", 100).unwrap();
    pool.write("ns", "g", 0, &[7; 100], true).unwrap();
    assert_eq!(pool.grow("ns", "g", 5000).unwrap().size, 5000);
    assert_eq!(pool.grow("ns", "g", 50).unwrap().size, 5000, "a shorter size leaves it as it is");
    let mut head = [0u8; 100];
    pool.read("ns", "g", 0, &mut head).unwrap();
    assert_eq!(head, [7; 100]);
    assert!(matches!(pool.grow("ns", "none", 1), Err(ObjError::NotFound { .. })));
    // Eight threads growing to their own sizes at once: the largest wins, whatever the order.
    let pool = Arc::new(pool);
    let threads: Vec<_> = (1..=8u64)
        .map(|i| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for j in 0..50u64 {
                    pool.grow("ns", "g", 5000 + ((i * 7919 + j * 104_729) % 100_000)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let want = (1..=8u64).flat_map(|i| (0..50u64).map(move |j| 5000 + ((i * 7919 + j * 104_729) % 100_000))).max();
    assert_eq!(Some(pool.stat("ns", "g").unwrap().size), want);
    assert_clean(&pool);
}

#[test]
fn punch_hole_frees_whole_blocks_and_zeroes_edges() {
    let (_d, _p, pool) = new_pool(64 << 20);
    pool.create_object("ns", "p", 8 * BLOCK).unwrap();
    pool.write("ns", "p", 0, &vec![0x11; 8 * BLOCK as usize], false).unwrap();
    let before = pool.stats().free.free_blocks;
    pool.punch_hole("ns", "p", BLOCK + 100, 3 * BLOCK).unwrap();
    let st = pool.stat("ns", "p").unwrap();
    assert_eq!(st.size, 8 * BLOCK);
    assert_eq!(st.allocated_bytes, 6 * BLOCK, "blocks 2 and 3 freed");
    assert_eq!(st.extents, 2, "one extent split in two");
    assert_eq!(pool.stats().free.free_blocks, before + 2);
    let mut buf = vec![0u8; 8 * BLOCK as usize];
    pool.read("ns", "p", 0, &mut buf).unwrap();
    let (lo, hi) = ((BLOCK + 100) as usize, (4 * BLOCK + 100) as usize);
    assert!(buf[..lo].iter().all(|&b| b == 0x11));
    assert!(buf[lo..hi].iter().all(|&b| b == 0));
    assert!(buf[hi..].iter().all(|&b| b == 0x11));
    // Within one block, and clipped at the end.
    pool.punch_hole("ns", "p", 6 * BLOCK + 1, 2).unwrap();
    pool.punch_hole("ns", "p", 7 * BLOCK, u64::MAX - 7 * BLOCK).unwrap();
    pool.read("ns", "p", 0, &mut buf).unwrap();
    assert_eq!(&buf[6 * BLOCK as usize..6 * BLOCK as usize + 4], &[0x11, 0, 0, 0x11]);
    assert!(buf[7 * BLOCK as usize..].iter().all(|&b| b == 0));
    assert_clean(&pool);
}

#[test]
fn freed_blocks_never_leak_old_bytes_into_a_new_object() {
    let (_d, _p, pool) = new_pool(32 << 20);
    let free = pool.stats().free.free_blocks;
    pool.create_object("ns", "secret", free * BLOCK).unwrap();
    pool.write("ns", "secret", 0, &vec![0x5A; (free * BLOCK) as usize], true).unwrap();
    assert!(matches!(
        pool.create_object("ns", "x", BLOCK).and_then(|_| pool.allocate("ns", "x", 0, BLOCK).map(drop)),
        Err(ObjError::NoSpace { .. })
    ));
    pool.delete("ns", "secret").unwrap();
    pool.resize("ns", "x", free * BLOCK).unwrap();
    pool.allocate("ns", "x", 0, free * BLOCK).unwrap();
    let mut buf = vec![1u8; (free * BLOCK) as usize];
    pool.read("ns", "x", 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "reused blocks must read zero");
    assert_clean(&pool);
}

#[test]
fn large_allocations_are_2mib_aligned_and_segments_describe_them() {
    let (_d, _p, pool) = new_pool(64 << 20);
    pool.create_object("ns", "small", BLOCK).unwrap();
    pool.allocate("ns", "small", 0, BLOCK).unwrap(); // knocks the allocator off alignment
    pool.create_object("ns", "big", 6 << 20).unwrap();
    pool.allocate("ns", "big", 0, 6 << 20).unwrap();
    let segs = pool.segments("ns", "big", 0, 6 << 20).unwrap();
    assert!(!segs.is_empty());
    for s in &segs {
        let p = s.pool_offset.expect("allocated");
        assert_eq!(p % (2 << 20), 0, "{segs:?}");
        assert_eq!(s.len % (2 << 20), 0, "{segs:?}");
    }
    // A sub-range maps to byte-precise pool offsets.
    let sub = pool.segments("ns", "big", 5, 10).unwrap();
    assert_eq!(sub.len(), 1);
    assert_eq!(sub[0].pool_offset, segs[0].pool_offset.map(|p| p + 5));
    pool.create_object("ns", "sparse", 3 * BLOCK).unwrap();
    let holes = pool.segments("ns", "sparse", 0, 3 * BLOCK).unwrap();
    assert_eq!(holes.len(), 1);
    assert_eq!(holes[0].pool_offset, None);
}

#[test]
fn bad_arguments_get_typed_errors_and_change_nothing() {
    let (_d, _p, pool) = new_pool(64 << 20);
    pool.create_object("ns", "o", 100).unwrap();
    let before = pool.stats();
    let long = "n".repeat(129);
    let cases: Vec<(&str, Result<(), ObjError>)> = vec![
        ("empty name", pool.create_object("ns", "", 1).map(drop)),
        ("empty ns", pool.create_object("", "x", 1).map(drop)),
        ("long name", pool.create_object("ns", &long, 1).map(drop)),
        ("bad ns", pool.create_object("a/b", "x", 1).map(drop)),
        ("huge size", pool.create_object("ns", "x", u64::MAX).map(drop)),
        ("write past end", pool.write("ns", "o", 90, &[0; 20], false)),
        ("write overflow", pool.write("ns", "o", u64::MAX, &[0; 2], false)),
        ("read past end", pool.read("ns", "o", 101, &mut [0; 1]).map(drop)),
        ("punch zero", pool.punch_hole("ns", "o", 0, 0)),
        ("punch overflow", pool.punch_hole("ns", "o", 5, u64::MAX)),
        ("punch past end", pool.punch_hole("ns", "o", 200, 1)),
        ("persist past end", pool.persist("ns", "o", 0, 101)),
        ("allocate past end", pool.allocate("ns", "o", 0, 101).map(drop)),
        ("segments overflow", pool.segments("ns", "o", u64::MAX, 1).map(drop)),
        ("resize huge", pool.resize("ns", "o", u64::MAX).map(drop)),
        ("list limit 0", pool.list("ns", None, 0).map(drop)),
        ("missing", pool.write("ns", "nope", 0, &[1], false)),
    ];
    for (what, r) in cases {
        let e = r.expect_err(what);
        assert!(!e.to_string().is_empty(), "{what}");
    }
    let after = pool.stats();
    assert_eq!((before.objects, before.free.free_blocks), (after.objects, after.free.free_blocks));
    assert_eq!(pool.stat("ns", "o").unwrap().size, 100);
    assert_clean(&pool);
}

#[test]
fn object_table_capacity_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.pool");
    let opts =
        CreateOptions { format: FormatOptions { max_objects: Some(3), max_extents: None }, ..Default::default() };
    let pool = Pool::create(&path, 16 << 20, opts).unwrap();
    for i in 0..3 {
        pool.create_object("ns", &i.to_string(), 0).unwrap();
    }
    assert_eq!(pool.create_object("ns", "3", 0), Err(ObjError::TooManyObjects { max: 3 }));
    pool.delete("ns", "1").unwrap();
    pool.create_object("ns", "3", 0).unwrap();
    assert_clean(&pool);
}

#[test]
fn the_release_hook_holds_blocks_until_it_lets_go() {
    let (_d, _p, pool) = new_pool(32 << 20);
    let held: Arc<Mutex<Vec<ReleasedBlocks>>> = Arc::default();
    let h = held.clone();
    pool.set_release_hook(Arc::new(move |b| h.lock().unwrap().push(b)));
    let free0 = pool.stats().free.free_blocks;
    pool.create_object("ns", "o", 64 * BLOCK).unwrap();
    pool.allocate("ns", "o", 0, 64 * BLOCK).unwrap();
    pool.delete("ns", "o").unwrap();
    let st = pool.stats();
    assert_eq!(st.held_blocks, 64);
    assert_eq!(st.free.free_blocks, free0 - 64, "held blocks are not free");
    assert_clean(&pool);
    // Allocation cannot reach held blocks: fill the rest of the pool.
    pool.create_object("ns", "fill", (free0 - 64) * BLOCK).unwrap();
    pool.allocate("ns", "fill", 0, (free0 - 64) * BLOCK).unwrap();
    assert!(matches!(
        pool.create_object("ns", "more", BLOCK).and_then(|_| pool.allocate("ns", "more", 0, BLOCK).map(drop)),
        Err(ObjError::NoSpace { .. })
    ));
    held.lock().unwrap().drain(..).for_each(ReleasedBlocks::free);
    assert_eq!(pool.stats().held_blocks, 0);
    pool.allocate("ns", "more", 0, BLOCK).unwrap();
    assert_clean(&pool);
}

#[test]
fn opening_refuses_what_cannot_be_made_safe() {
    let dir = tempfile::tempdir().unwrap();
    // Not a pool.
    let junk = dir.path().join("junk");
    std::fs::write(&junk, vec![7u8; 32 << 20]).unwrap();
    let e = Pool::open(&junk, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::NotAPool { .. }), "{e}");
    assert!(e.to_string().contains("rdaxctl mkpool"), "{e}");
    // Too small.
    let e = Pool::create(&dir.path().join("tiny"), 1 << 20, CreateOptions::default()).unwrap_err();
    assert!(e.to_string().contains("minimum"), "{e}");
    // Exists without overwrite; with overwrite, it is replaced.
    let e = Pool::create(&junk, 32 << 20, CreateOptions::default()).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    Pool::create(&junk, 32 << 20, CreateOptions { overwrite: true, ..Default::default() }).unwrap();
    // Newer format version.
    let path = dir.path().join("newer.pool");
    drop(Pool::create(&path, 16 << 20, CreateOptions::default()).unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = Pool::open(&path, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::NewerVersion { found: 99, .. }), "{e}");
}

#[test]
fn damaged_metadata_is_refused_at_open() {
    let (_d, path, pool) = new_pool(16 << 20);
    pool.create_object("ns", "o", BLOCK).unwrap();
    pool.allocate("ns", "o", 0, BLOCK).unwrap();
    let geo = *pool.geometry();
    drop(pool);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[geo.exttab_off as usize + 17] ^= 0x01; // flip a bit in extent slot 0
    std::fs::write(&path, &bytes).unwrap();
    let e = Pool::open(&path, OpenOptions::default()).unwrap_err();
    assert!(matches!(e, OpenError::Damaged { .. }), "{e}");
    assert!(e.to_string().contains("rdaxctl fsck"), "{e}");
}

#[test]
fn clean_close_is_remembered_and_a_drop_is_not() {
    let (_d, path, pool) = new_pool(16 << 20);
    assert!(pool.info().previous_shutdown_clean, "a new pool starts clean");
    pool.create_object("ns", "o", 10).unwrap();
    drop(pool); // like a crash: never closed
    let pool = Pool::open(&path, OpenOptions::default()).unwrap();
    assert!(!pool.info().previous_shutdown_clean);
    pool.close();
    let pool = Pool::open(&path, OpenOptions::default()).unwrap();
    assert!(pool.info().previous_shutdown_clean);
    assert_eq!(pool.stat("ns", "o").unwrap().size, 10);
}

#[test]
fn a_large_allocation_zeroes_reused_blocks_outside_the_lock() {
    let (_d, _p, pool) = new_pool(96 << 20);
    // Leave an earlier owner's bytes in 40 MiB of blocks.
    pool.create_object("ns", "old", 40 << 20).unwrap();
    pool.write("ns", "old", 0, &vec![0xAB; 40 << 20], true).unwrap();
    pool.delete("ns", "old").unwrap();
    // A large allocation (zeroed with no lock held) reuses them and reads zero.
    pool.create_object("ns", "new", 40 << 20).unwrap();
    let pool = std::sync::Arc::new(pool);
    let p2 = pool.clone();
    // Meanwhile other requests go on (they would wait for the whole zeroing otherwise).
    let other = std::thread::spawn(move || {
        for i in 0..50 {
            p2.create_object("ns", &format!("side{i}"), 4096).unwrap();
        }
    });
    let (id, _) = pool.allocate("ns", "new", 0, 40 << 20).unwrap();
    other.join().unwrap();
    assert_eq!(pool.stat("ns", "new").unwrap().id, id);
    assert_eq!(pool.stat("ns", "new").unwrap().allocated_bytes, 40 << 20);
    let mut buf = vec![1u8; 40 << 20];
    pool.read("ns", "new", 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "an earlier owner's bytes showed through");
    assert_clean(&pool);
    // An object that changes while its blocks are zeroed gets them installed only if its holes
    // are still the same; either way the pool stays consistent.
    pool.create_object("ns", "racy", 32 << 20).unwrap();
    let p3 = pool.clone();
    let t = std::thread::spawn(move || p3.allocate("ns", "racy", 0, 32 << 20).map(drop));
    let _ = pool.allocate("ns", "racy", 0, 32 << 20);
    t.join().unwrap().unwrap();
    assert_eq!(pool.stat("ns", "racy").unwrap().allocated_bytes, 32 << 20);
    assert_clean(&pool);
}

/// While a large allocation zeroes its blocks, the metadata lock is free: a create completes
/// with the zeroing paused (failpoint), which would deadlock if the lock were held.
#[cfg(feature = "testing")]
#[test]
fn other_requests_proceed_while_a_large_allocation_zeroes() {
    let (_d, _p, pool) = new_pool(96 << 20);
    pool.create_object("ns", "big", 48 << 20).unwrap();
    let pool = std::sync::Arc::new(pool);
    rdaxd::failpoint::set("pool.zero_unlocked", "1*pause").unwrap();
    let p2 = pool.clone();
    let alloc = std::thread::spawn(move || p2.allocate("ns", "big", 0, 48 << 20).map(drop));
    let paused = || rdaxd::failpoint::list().iter().any(|f| f.name == "pool.zero_unlocked" && f.paused > 0);
    let t0 = std::time::Instant::now();
    while !paused() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the allocation never reached its zeroing");
        std::thread::yield_now();
    }
    // The lock is free: this returns while the allocation is paused mid-way.
    pool.create_object("ns", "meanwhile", 4096).unwrap();
    pool.stat("ns", "big").unwrap();
    rdaxd::failpoint::set("pool.zero_unlocked", "off").unwrap();
    alloc.join().unwrap().unwrap();
    assert_eq!(pool.stat("ns", "big").unwrap().allocated_bytes, 48 << 20);
    assert_clean(&pool);
}

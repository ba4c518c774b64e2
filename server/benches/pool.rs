//! Pool engine benchmarks. Prints figures; asserts nothing about time.
//!
//! ```text
//! cargo bench -p rdaxd --bench pool            # everything (about 2-4 minutes, ~1 GB of disk writes)
//! cargo bench -p rdaxd --bench pool -- quick   # smaller sizes, for a smoke run
//! cargo bench -p rdaxd --bench pool -- open    # only one section: dram | open | ops | persist
//! ```
//!
//! "DAX-style" runs put the pool on tmpfs (`/dev/shm`) and force the CPU cache write-back
//! path (CLWB + SFENCE) that a real DAX mapping uses; it measures that code path on a machine
//! without pmem. "msync" runs use an ordinary file on the disk, as a development pool does.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use rdaxd::pool::layout::{BLOCK, FormatOptions};
use rdaxd::pool::{CreateOptions, OpenOptions, Pool};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

static SMOKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Scale a quick-run size down further in a smoke run.
fn smoke_div(n: u64, div: u64) -> u64 {
    if SMOKE.load(Ordering::Relaxed) { n / div } else { n }
}

struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn scratch(dir: &Path, name: &str) -> Scratch {
    let p = dir.join(format!("rdax-bench-{}-{name}.pool", std::process::id()));
    let _ = std::fs::remove_file(&p);
    Scratch(p)
}

fn shm() -> PathBuf {
    if Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() }
}

/// Cache-line persistence on an ordinary file, and sparse: the DRAM and open-time figures
/// need pools far larger than the scratch disk (nothing here fills the disk).
fn dax_style() -> CreateOptions {
    CreateOptions { force_cache_flush: true, sparse: true, ..Default::default() }
}

fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: then run a smoke
    // pass at tiny sizes so the bench code is exercised by the test suite.
    let smoke = !all.iter().any(|a| a == "--bench");
    let args: Vec<String> = all.into_iter().filter(|a| !a.starts_with("--")).collect();
    let quick = smoke || args.iter().any(|a| a == "quick");
    SMOKE.store(smoke, Ordering::Relaxed);
    let only = |s: &str| args.iter().all(|a| a == "quick") || args.iter().any(|a| a == s);
    let mode = if smoke {
        " (smoke run under `cargo test`: tiny sizes, unoptimised; figures mean nothing)"
    } else if quick {
        " (quick)"
    } else {
        ""
    };
    println!("rdax pool bench{mode} — figures, not pass/fail");
    if only("dram") {
        dram(quick);
    }
    if only("open") {
        open_time(quick);
    }
    if only("ops") {
        create_delete(quick);
    }
    if only("persist") {
        persist_bw(quick);
    }
}

/// DRAM held by an open pool, per pool byte.
fn dram(quick: bool) {
    let disk = std::env::temp_dir();
    // 1 TiB sparse pool filled with 2 MiB objects, each one 2 MiB-aligned extent.
    let size: u64 = if quick { smoke_div(16 << 30, 64) } else { 1 << 40 };
    let f = scratch(&disk, "dram-huge");
    let pool = Pool::create(&f.0, size, dax_style()).unwrap();
    let data = pool.stats().data_blocks;
    let n = data / 512;
    let t = Instant::now();
    for i in 0..n {
        let name = format!("o{i}");
        pool.create_object("fill", &name, 2 << 20).unwrap();
        pool.allocate("fill", &name, 0, 2 << 20).unwrap();
    }
    let fill_s = t.elapsed().as_secs_f64();
    drop(pool);
    let before = live();
    let pool = Pool::open(&f.0, OpenOptions { force_cache_flush: true, ..Default::default() }).unwrap();
    let bytes = live() - before;
    let st = pool.stats();
    println!(
        "dram/2MiB-extents: pool {} GiB, {} objects x 2 MiB ({} extents), DRAM {} bytes = {:.5} % of the pool ({:.1} B/object) [target <= 0.01 %] (fill {:.1} s)",
        size >> 30,
        st.objects,
        st.extents,
        bytes,
        bytes as f64 * 100.0 / size as f64,
        bytes as f64 / st.objects as f64,
        fill_s
    );
    drop(pool);
    drop(f);
    // Fragmented: 64 objects written block by block in turn, so every extent is one 4 KiB block.
    let region: u64 = if quick { smoke_div(256 << 20, 16) } else { 4 << 30 };
    let f = scratch(&disk, "dram-frag");
    let opts = CreateOptions {
        format: FormatOptions { max_objects: None, max_extents: Some(region / BLOCK + 4096) },
        ..dax_style()
    };
    let pool = Pool::create(&f.0, size, opts).unwrap();
    let objs = 64u64;
    let per = region / BLOCK / objs;
    for o in 0..objs {
        pool.create_object("frag", &format!("o{o}"), per * BLOCK).unwrap();
    }
    for b in 0..per {
        for o in 0..objs {
            pool.allocate("frag", &format!("o{o}"), b * BLOCK, BLOCK).unwrap();
        }
    }
    drop(pool);
    let before = live();
    let pool = Pool::open(&f.0, OpenOptions { force_cache_flush: true, ..Default::default() }).unwrap();
    let bytes = live() - before;
    let st = pool.stats();
    let used = st.used_blocks * BLOCK;
    println!(
        "dram/4KiB-extents: {} extents over {} MiB of a {} GiB pool: DRAM {} bytes = {:.3} % of the bytes they cover ({:.1} B/extent); a pool filled this way would need {:.2} GiB per TiB",
        st.extents,
        used >> 20,
        size >> 30,
        bytes,
        bytes as f64 * 100.0 / used as f64,
        bytes as f64 / st.extents as f64,
        bytes as f64 / used as f64 * 1024.0
    );
}

/// Time to open (recover) a pool holding 10^5 and 10^6 objects.
fn open_time(quick: bool) {
    let counts: &[u64] = if quick { &[10_000, 100_000] } else { &[100_000, 1_000_000] };
    for &n in counts {
        let n = smoke_div(n, 100);
        let f = scratch(&std::env::temp_dir(), "open");
        let opts =
            CreateOptions { format: FormatOptions { max_objects: Some(n + 1024), max_extents: None }, ..dax_style() };
        let pool = Pool::create(&f.0, 64 << 30, opts).unwrap();
        for i in 0..n {
            pool.create_object("ns", &format!("object-{i:08}"), 4096).unwrap();
        }
        drop(pool);
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            let pool = Pool::open(&f.0, OpenOptions::default()).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
            assert_eq!(pool.stats().objects, n);
        }
        println!("open: {n} objects in {best:.3} s (best of 3, warm page cache) [target <= 2 s at 10^6]");
    }
}

/// create+delete pairs per second, single thread.
fn create_delete(quick: bool) {
    let n: u64 = smoke_div(if quick { 20_000 } else { 200_000 }, 10);
    for (label, dir, opts, count) in [
        ("dax-style (tmpfs, clwb+sfence)", shm(), dax_style(), n),
        ("msync (disk file)", std::env::temp_dir(), CreateOptions::default(), n / 100),
    ] {
        let f = scratch(&dir, "ops");
        let pool = Pool::create(&f.0, 256 << 20, opts).unwrap();
        let t = Instant::now();
        for i in 0..count {
            let name = format!("o{}", i % 64);
            pool.create_object("ns", &name, 4096).unwrap();
            pool.delete("ns", &name).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "ops/{label}: {:.0} create+delete pairs/s ({count} pairs in {s:.2} s, 1 thread) [target >= 50,000 on dax-style]",
            count as f64 / s
        );
        drop(pool);
        // Concurrent callers (as a daemon's clients are): their transactions share group
        // commits, so a commit's persist barriers are paid once per group.
        for threads in [4u64, 16, 64] {
            let pool = Pool::create(&f.0, 256 << 20, CreateOptions { overwrite: true, ..opts }).unwrap();
            let per = (count / threads).max(20);
            let t = Instant::now();
            std::thread::scope(|sc| {
                for th in 0..threads {
                    let pool = &pool;
                    sc.spawn(move || {
                        for i in 0..per {
                            let name = format!("t{th}-{}", i % 8);
                            pool.create_object("ns", &name, 4096).unwrap();
                            pool.delete("ns", &name).unwrap();
                        }
                    });
                }
            });
            let s = t.elapsed().as_secs_f64();
            let st = pool.stats();
            println!(
                "ops/{label}: {:.0} create+delete pairs/s ({} pairs in {s:.2} s, {threads} threads; {:.1} transactions per journal commit)",
                (per * threads) as f64 / s,
                per * threads,
                st.journal_transactions as f64 / st.journal_commits.max(1) as f64
            );
        }
    }
}

/// write+persist bandwidth next to plain stores into the same mapping, 1 MiB writes.
fn persist_bw(quick: bool) {
    let f = scratch(&shm(), "bw");
    let span: u64 = smoke_div(if quick { 64 << 20 } else { 512 << 20 }, 4);
    let pool = Pool::create(&f.0, span + (64 << 20), dax_style()).unwrap();
    pool.create_object("ns", "bw", span).unwrap();
    pool.allocate("ns", "bw", 0, span).unwrap();
    let chunk = vec![0xA5u8; 1 << 20];
    let rounds = if quick { 2 } else { 4 };
    let total = (span * rounds) as f64;
    let run = |persist: bool| {
        let t = Instant::now();
        for r in 0..rounds {
            for off in (0..span).step_by(1 << 20) {
                pool.write("ns", "bw", off, &chunk[..], persist).unwrap();
            }
            let _ = r;
        }
        total / t.elapsed().as_secs_f64() / 1e6
    };
    run(false); // warm up: fault every page in
    let plain = run(false);
    let persisted = run(true);
    let plain2 = run(false);
    let plain = plain.max(plain2);
    println!(
        "persist: 1 MiB writes over {} MiB: plain stores {plain:.0} MB/s, write+persist (streaming stores + sfence) {persisted:.0} MB/s = {:.0} % [target >= 70 %]",
        span >> 20,
        persisted / plain * 100.0
    );
}

//! Seeded mutation fuzzing on stable Rust (no nightly here, so no cargo-fuzz): every decoder
//! that reads untrusted bytes gets mutated inputs, and must return an error — never panic,
//! abort or allocate without bound.
//!
//! Targets:
//! * the TCP data-plane frame decoder and the RDMA message decoder (raw bytes);
//! * the proto `TryFrom` conversions (messages with random field values);
//! * the pool's superblock, meta header, object and extent tables and journal — mutated
//!   *structurally*: fields are changed and the record re-encoded, so its checksum is right
//!   and the mutation reaches the checks behind it. Then `Pool::open_media` and `check_media`
//!   run on the image.
//!
//! `RDAX_FUZZ_EXECS` sets the executions per decoder target (default 20,000; pool images get
//! a tenth, as each one is a 16 MiB image); `RDAX_FUZZ_SEED` the seed. The opt-in test runs
//! 10,000,000 decoder executions. Each run prints execs, execs/s and findings; any input that
//! found a bug is pinned as a named test below.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use rdaxd::pool::Pool;
use rdaxd::pool::check::check_media;
use rdaxd::pool::layout::{self, BLOCK, ExtSlot, FormatOptions, MetaHeader, ObjSlot, SlotState, Superblock};
use rdaxd::pool::media::Media;
use rdaxd::pool::media::sim::SimMedia;
use rdaxd::pool::rng::SplitMix64;

/// Values at the edges, where arithmetic breaks.
const EDGES: [u64; 12] =
    [0, 1, 2, 4095, 4096, 1 << 20, u32::MAX as u64, 1 << 32, 1 << 60, (1 << 60) + 1, u64::MAX - 1, u64::MAX];

fn edge_or_random(rng: &mut SplitMix64, around: u64) -> u64 {
    match rng.below(4) {
        0 => EDGES[rng.below(EDGES.len() as u64) as usize],
        1 => around.wrapping_add(rng.below(16)).wrapping_sub(8),
        2 => around ^ (1 << rng.below(64)),
        _ => rng.next_u64(),
    }
}

fn mutate_bytes(rng: &mut SplitMix64, b: &mut [u8]) {
    for _ in 0..1 + rng.below(4) {
        let i = rng.below(b.len() as u64) as usize;
        match rng.below(4) {
            0 => b[i] ^= 1 << rng.below(8),
            1 => b[i] = [0, 0xFF, 0x7F, 0x80][rng.below(4) as usize],
            2 => {
                let at = i.min(b.len() - 8);
                b[at..at + 8].copy_from_slice(&EDGES[rng.below(EDGES.len() as u64) as usize].to_le_bytes());
            }
            _ => b[i] = rng.next_u64() as u8,
        }
    }
}

struct Report {
    name: &'static str,
    execs: u64,
    findings: Vec<String>,
    t0: Instant,
}

impl Report {
    fn new(name: &'static str) -> Self {
        Report { name, execs: 0, findings: Vec::new(), t0: Instant::now() }
    }

    fn run(&mut self, what: impl FnOnce() -> String, f: impl FnOnce()) {
        self.execs += 1;
        if catch_unwind(AssertUnwindSafe(f)).is_err() {
            self.findings.push(what());
        }
    }

    fn finish(self) -> Vec<String> {
        let secs = self.t0.elapsed().as_secs_f64();
        println!(
            "fuzz {}: {} execs in {:.1} s ({:.0} execs/s), {} findings",
            self.name,
            self.execs,
            secs,
            self.execs as f64 / secs.max(1e-9),
            self.findings.len()
        );
        self.findings
    }
}

fn frames(seed: u64, execs: u64) -> Vec<String> {
    use rdax_proto::dataplane::{Op, Request};
    use rdax_proto::rdma::{self, Msg};
    let mut rng = SplitMix64::new(seed);
    let mut rep = Report::new("frames (TCP request, RDMA message)");
    let valid_req =
        Request { op: Op::Write, flags: 1, id: 7, key: [3; 16], generation: 9, offset: 4096, len: 512 }.encode();
    let valid_msg = Msg::request(rdma::Op::Flush, 3).encode();
    for _ in 0..execs {
        let mut b = valid_req;
        mutate_bytes(&mut rng, &mut b);
        rep.run(
            || format!("tcp frame {b:?}"),
            || {
                let _ = Request::decode(&b);
            },
        );
        let mut m = valid_msg;
        mutate_bytes(&mut rng, &mut m);
        rep.run(
            || format!("rdma frame {m:?}"),
            || {
                let _ = Msg::decode(&m);
            },
        );
    }
    rep.finish()
}

fn protos(seed: u64, execs: u64) -> Vec<String> {
    use rdax_proto::model::*;
    use rdax_proto::pb;
    let mut rng = SplitMix64::new(seed);
    let mut rep = Report::new("proto conversions");
    let names = ["", "a", ".", "..", "ns-1", "x\u{0}y", "ünï", "a/b", &"n".repeat(65), &"m".repeat(200)];
    for _ in 0..execs {
        let pick = |rng: &mut SplitMix64| names[rng.below(names.len() as u64) as usize].to_string();
        let obj = if rng.below(8) == 0 {
            None
        } else {
            Some(pb::ObjectRef { namespace: pick(&mut rng), name: pick(&mut rng) })
        };
        let (a, b) = (edge_or_random(&mut rng, 4096), edge_or_random(&mut rng, 1 << 20));
        let sid = if rng.below(2) == 0 { "0".repeat(32) } else { pick(&mut rng) };
        let acquire = pb::AcquireRequest {
            session_id: sid.clone(),
            object: obj.clone(),
            offset: a,
            length: b,
            mode: rng.below(5) as i32 - 1,
            transport: rng.below(5) as i32 - 1,
            exclusive: rng.below(2) == 0,
        };
        rep.run(|| format!("{acquire:?}"), || drop(AcquireLease::try_from(acquire.clone())));
        let punch = pb::PunchHoleRequest { object: obj.clone(), offset: a, length: b };
        rep.run(|| format!("{punch:?}"), || drop(PunchHole::try_from(punch.clone())));
        let read = pb::ReadRequest { object: obj.clone(), offset: a, length: b, chunk_size: rng.next_u64() as u32 };
        rep.run(|| format!("{read:?}"), || drop(ReadObject::try_from(read.clone())));
        let list = pb::ListRequest { namespace: pick(&mut rng), after: pick(&mut rng), limit: rng.next_u64() as u32 };
        rep.run(|| format!("{list:?}"), || drop(ListObjects::try_from(list.clone())));
        let create = pb::CreateRequest { object: obj.clone(), size: a, ..Default::default() };
        rep.run(|| format!("{create:?}"), || drop(CreateObject::try_from(create.clone())));
        let resize = pb::ResizeRequest { object: obj.clone(), size: b, grow_only: false };
        rep.run(|| format!("{resize:?}"), || drop(ResizeObject::try_from(resize.clone())));
        let open =
            pb::OpenSession { client_name: pick(&mut rng).repeat(rng.below(40) as usize), resume_session_id: sid };
        rep.run(|| format!("{open:?}"), || drop(OpenSession::try_from(open.clone())));
    }
    rep.finish()
}

const POOL: u64 = 16 << 20;

/// A small pool with a few objects and extents, and one committed-but-unapplied journal
/// transaction is not needed: recovery of valid images is the crash test's job.
fn base_image() -> Vec<u8> {
    let media = std::sync::Arc::new(SimMedia::new(POOL));
    let pool = Pool::format_media(media.clone(), true, FormatOptions::default(), None).unwrap();
    for (i, n) in ["a", "b", "c", "d"].iter().enumerate() {
        pool.create_object("ns", n, (i as u64 + 1) * 3 * BLOCK + 100).unwrap();
        pool.write("ns", n, 0, &vec![i as u8 + 1; (i + 1) * 3 * BLOCK as usize + 100], true).unwrap();
    }
    pool.punch_hole("ns", "d", BLOCK, BLOCK).unwrap();
    drop(pool);
    media.durable_image()
}

fn put(img: &mut [u8], off: u64, b: &[u8]) {
    img[off as usize..off as usize + b.len()].copy_from_slice(b);
}

/// Change one structure of the image in a way its checksum does not catch.
fn mutate_pool(rng: &mut SplitMix64, img: &mut [u8]) -> String {
    let sb = Superblock::decode(img[..Superblock::LEN].try_into().unwrap(), POOL).expect("valid base");
    let geo = sb.geo;
    match rng.below(5) {
        0 => {
            let mut s = sb.clone();
            let g = &mut s.geo;
            let v = edge_or_random(rng, 0);
            let field = rng.below(11);
            let f = [
                &mut g.pool_size,
                &mut g.meta_off,
                &mut g.journal_off,
                &mut g.journal_len,
                &mut g.objtab_off,
                &mut g.objtab_slots,
                &mut g.exttab_off,
                &mut g.exttab_slots,
                &mut g.data_start,
                &mut g.data_blocks,
                &mut g.max_extents_per_object,
            ];
            let old = *f[field as usize];
            *f[field as usize] = edge_or_random(rng, old).wrapping_add(v & 1);
            put(img, 0, &s.encode());
            format!("superblock field {field} = {:?}", s.geo)
        }
        1 => {
            let off = geo.meta_off;
            let mut h =
                MetaHeader::decode(img[off as usize..off as usize + MetaHeader::LEN].try_into().unwrap()).unwrap();
            match rng.below(4) {
                0 => h.next_object_id = edge_or_random(rng, h.next_object_id),
                1 => h.obj_hwm = edge_or_random(rng, h.obj_hwm),
                2 => h.ext_hwm = edge_or_random(rng, h.ext_hwm),
                _ => h.data_hwm = edge_or_random(rng, h.data_hwm),
            }
            put(img, off, &h.encode());
            format!("meta header {h:?}")
        }
        2 => {
            let i = rng.below(6);
            let off = geo.obj_slot_off(i);
            let raw: [u8; layout::OBJ_SLOT as usize] =
                img[off as usize..(off + layout::OBJ_SLOT) as usize].try_into().unwrap();
            let mut o = match ObjSlot::decode(&raw, i) {
                SlotState::Live(o) => o,
                _ => ObjSlot { id: 1, size: 0, created_ns: 0, flags: 0, ns: b"ns".to_vec(), name: b"z".to_vec() },
            };
            match rng.below(3) {
                0 => o.size = edge_or_random(rng, o.size),
                1 => o.id = edge_or_random(rng, o.id),
                _ => o.name = vec![b'q'; rng.below(129) as usize],
            }
            put(img, off, &o.encode(i));
            format!("object slot {i}: {o:?}")
        }
        3 => {
            let i = rng.below(8);
            let off = geo.ext_slot_off(i);
            let raw: [u8; layout::EXT_SLOT as usize] =
                img[off as usize..(off + layout::EXT_SLOT) as usize].try_into().unwrap();
            let mut e = match ExtSlot::decode(&raw, i) {
                SlotState::Live(e) => e,
                _ => ExtSlot { owner: 1, file_block: 0, pool_block: geo.data_start, nblocks: 1 },
            };
            match rng.below(4) {
                0 => e.owner = edge_or_random(rng, e.owner),
                1 => e.file_block = edge_or_random(rng, e.file_block),
                2 => e.pool_block = edge_or_random(rng, e.pool_block),
                _ => e.nblocks = edge_or_random(rng, e.nblocks as u64) as u32,
            }
            put(img, off, &e.encode(i));
            format!("extent slot {i}: {e:?}")
        }
        _ => {
            // The journal: raw bytes (its own checksum guards the body; the header fields and
            // the commit word are what recovery reads first).
            let j = geo.journal_off as usize;
            let span = 256.min(geo.journal_len as usize);
            mutate_bytes(rng, &mut img[j..j + span]);
            "journal header bytes".to_string()
        }
    }
}

fn pools(seed: u64, execs: u64) -> Vec<String> {
    let base = base_image();
    let mut rng = SplitMix64::new(seed);
    let mut rep = Report::new("pool images (superblock, meta header, tables, journal)");
    for _ in 0..execs {
        let mut img = base.clone();
        let what = mutate_pool(&mut rng, &mut img);
        let img2 = img.clone();
        rep.run(
            || what.clone(),
            move || {
                let m = SimMedia::from_image(img);
                let _ = check_media(&m, None);
            },
        );
        rep.run(
            || what.clone(),
            move || {
                let m = std::sync::Arc::new(SimMedia::from_image(img2));
                if let Ok(p) = Pool::open_media(m, None) {
                    let _ = p.check();
                    let _ = p.list("ns", None, 100);
                }
            },
        );
    }
    rep.finish()
}

fn env(k: &str, d: u64) -> u64 {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn all(decoder_execs: u64, pool_execs: u64) {
    let seed = env("RDAX_FUZZ_SEED", 0xF022);
    // The panics are the findings: keep the default hook from printing each one.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut findings = frames(seed, decoder_execs);
    findings.extend(protos(seed + 1, decoder_execs / 10));
    findings.extend(pools(seed + 2, pool_execs));
    std::panic::set_hook(hook);
    assert!(findings.is_empty(), "{} findings (seed {seed}); first: {}", findings.len(), findings[0]);
}

#[test]
fn fuzz_small() {
    let n = env("RDAX_FUZZ_EXECS", 20_000);
    all(n, n / 100);
}

#[test]
#[ignore = "opt-in: 10^7 decoder executions (cargo test --release -p rdax-tests --test fuzz -- --ignored --nocapture)"]
fn fuzz_ten_million() {
    all(10_000_000, 20_000);
}

#[test]
fn media_is_what_the_pool_engine_reads() {
    // The harness mutates the same bytes `open_media` reads: a sanity check that it works on
    // the real format (an unmutated image opens clean).
    let img = base_image();
    let m = std::sync::Arc::new(SimMedia::from_image(img));
    assert_eq!(m.len(), POOL);
    let p = Pool::open_media(m, None).unwrap();
    assert!(p.check().clean);
    assert_eq!(p.list("ns", None, 10).unwrap().objects.len(), 4);
}

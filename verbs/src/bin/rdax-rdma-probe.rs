//! `rdax-rdma-probe`: what this host's RDMA can do for rdax, checked by doing it.
//!
//! ```text
//! rdax-rdma-probe                       list devices and their capabilities
//! rdax-rdma-probe --reg PATH            try ibv_reg_mr over a MAP_SYNC (else MAP_SHARED) mapping of PATH
//! rdax-rdma-probe --pair SERVER CLIENT  connect two QPs (SERVER and CLIENT are local IPs on
//!                                       RDMA netdevs), bind a type-2 window on the server QP,
//!                                       RDMA WRITE/READ through it, invalidate it, and show
//!                                       that a WRITE with the old key fails and changes nothing
//! ```
//! Exit status 0 when every requested check behaved as rdax expects.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rdax_verbs::{Access, Conn, EventChannel, Pd, RegBuf, Wr, event};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let ok = rt.block_on(run(args));
    std::process::exit(if ok { 0 } else { 1 });
}

async fn run(args: Vec<String>) -> bool {
    match rdax_verbs::devices() {
        Ok(devs) => {
            for d in devs {
                println!(
                    "device {}: max_mw {} type-2 windows {} ODP (RC read+write) {}",
                    d.name, d.max_mw, d.mw_type2, d.odp_rc
                );
            }
        }
        Err(e) => {
            println!("no RDMA: {e}");
            return args.is_empty();
        }
    }
    match args.first().map(String::as_str) {
        None => true,
        Some("--reg") if args.len() == 3 => reg(&args[1], args[2].parse().expect("IP")).await,
        Some("--pair") if args.len() == 3 => {
            match pair(args[1].parse().expect("IP"), args[2].parse().expect("IP")).await {
                Ok(()) => true,
                Err(e) => {
                    println!("pair: FAILED: {e}");
                    false
                }
            }
        }
        _ => {
            eprintln!("usage: rdax-rdma-probe [--reg PATH LOCAL_IP | --pair SERVER_IP CLIENT_IP]");
            false
        }
    }
}

async fn pd_for(ip: IpAddr) -> rdax_verbs::Result<(Arc<EventChannel>, rdax_verbs::CmId, Arc<Pd>)> {
    let ch = EventChannel::new()?;
    let id = ch.create_id()?;
    id.bind(SocketAddr::new(ip, 0))?;
    if id.context().is_null() {
        return Err(rdax_verbs::Error::Cm(format!("{ip} is not the address of an RDMA netdev")));
    }
    // SAFETY: rdma_cm keeps device contexts open for the process lifetime.
    let pd = unsafe { Pd::alloc(id.context()) }?;
    Ok((ch, id, pd))
}

async fn reg(path: &str, ip: IpAddr) -> bool {
    let (_ch, _id, pd) = match pd_for(ip).await {
        Ok(x) => x,
        Err(e) => {
            println!("reg: {e}");
            return false;
        }
    };
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).expect("open");
    let len = 2 << 20;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let mut how = "MAP_SHARED_VALIDATE|MAP_SYNC";
    // SAFETY: mapping a file we opened read-write; unmapped at exit.
    let mut p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        how = "MAP_SHARED";
        // SAFETY: as above.
        p = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0)
        };
    }
    assert!(p != libc::MAP_FAILED, "mmap {path}: {}", std::io::Error::last_os_error());
    for (name, access) in [
        ("ordinary", Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ | Access::MW_BIND),
        ("on-demand (ODP)", Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ | Access::ON_DEMAND),
    ] {
        // SAFETY: the mapping outlives the region, which is dropped at once.
        match unsafe { pd.register(p.cast(), len, access) } {
            Ok(mr) => println!("reg {path} ({how}): {name} ibv_reg_mr OK (rkey {:#x})", mr.rkey()),
            Err(e) => println!("reg {path} ({how}): {name} ibv_reg_mr FAILED: {e}"),
        }
    }
    true
}

async fn connect(
    sch: &Arc<EventChannel>,
    spd: &Arc<Pd>,
    server: SocketAddr,
    client: IpAddr,
) -> rdax_verbs::Result<(Arc<Conn>, Arc<Conn>, Arc<Pd>)> {
    let t = Duration::from_secs(10);
    let cch = EventChannel::new()?;
    let cid = cch.create_id()?;
    cid.resolve_addr(Some(SocketAddr::new(client, 0)), server, 2000)?;
    drop(cch.expect(event::ADDR_RESOLVED, t, "address resolution").await?);
    cid.resolve_route(2000)?;
    drop(cch.expect(event::ROUTE_RESOLVED, t, "route resolution").await?);
    // SAFETY: the resolved id's context lives for the process.
    let cpd = unsafe { Pd::alloc(cid.context()) }?;
    let (cconn, _cin) = Conn::create(cid, cpd.clone())?;
    tokio::spawn(cconn.clone().drive());
    cconn.connect()?;
    let req = sch.expect(event::CONNECT_REQUEST, t, "connect request").await?;
    let sid = req.take_request(sch);
    drop(req);
    let (sconn, _sin) = Conn::create(sid, spd.clone())?;
    tokio::spawn(sconn.clone().drive());
    sconn.accept()?;
    // The client's librdmacm completes the handshake (RTU) while it reads its event: wait for both.
    let (s, c) = tokio::join!(
        sch.expect(event::ESTABLISHED, t, "server established"),
        cch.expect(event::ESTABLISHED, t, "client established")
    );
    drop((s?, c?));
    // Keep the client's channel alive as long as its connection.
    std::mem::forget(cch);
    Ok((sconn, cconn, cpd))
}

async fn pair(server: IpAddr, client: IpAddr) -> rdax_verbs::Result<()> {
    let (sch, listener, spd) = pd_for(server).await?;
    listener.listen(4)?;
    let saddr = SocketAddr::new(server, listener.port());
    let (sconn, cconn, cpd) = connect(&sch, &spd, saddr, client).await?;
    println!("pair: connected {client} -> {saddr} (server QP {}, client QP {})", sconn.qp_num(), cconn.qp_num());

    // The "pool": 1 MiB. A lease over [off, off+len) gets its own region (local rights and
    // MW_BIND only: its own rkey opens nothing) and a type-2 window over it bound on the
    // client's QP. rxe checks an access against the window's *region* bounds, so the region
    // is what bounds the lease; the window ties it to one QP and can be invalidated.
    let pool = vec![0u8; 1 << 20];
    let base = pool.as_ptr() as u64;
    let (off, len) = (4096u64, 8192u64);
    // SAFETY: `pool` outlives the region (dropped at the end of this function, after it).
    let mr = unsafe { spd.register((base + off) as *mut u8, len as usize, Access::LOCAL_WRITE | Access::MW_BIND) }?;
    let mut mw = spd.alloc_mw()?;
    let rkey = sconn.bind_mw(&mut mw, &mr, base + off, len, Access::REMOTE_READ | Access::REMOTE_WRITE).await?;
    println!("pair: type-2 window bound on the server QP: rkey {rkey:#x} over [{off}, {})", off + len);
    let byte = |i: u64| {
        // SAFETY: a volatile read of memory the device may have written.
        unsafe { std::ptr::read_volatile((base + i) as *const u8) }
    };

    let cbuf = Arc::new(RegBuf::new(&cpd, len as usize)?);
    // SAFETY: no WR uses the buffer yet.
    unsafe { std::ptr::write_bytes(cbuf.ptr(0), 0xAB, len as usize) };
    let w = Wr::Write { laddr: cbuf.addr(), lkey: cbuf.lkey(), len: len as u32, raddr: base + off, rkey };
    cconn.exec(w, Some(cbuf.clone())).await?;
    println!("pair: RDMA WRITE through the window: pool byte = {:#x}", byte(off));
    if byte(off) != 0xAB || byte(off + len - 1) != 0xAB {
        return Err(rdax_verbs::Error::Cm("the write did not land".into()));
    }
    let rbuf = Arc::new(RegBuf::new(&cpd, len as usize)?);
    let r = Wr::Read { laddr: rbuf.addr(), lkey: rbuf.lkey(), len: len as u32, raddr: base + off, rkey };
    cconn.exec(r, Some(rbuf.clone())).await?;
    // SAFETY: the READ completed.
    let back = unsafe { *rbuf.ptr(len as usize - 1) };
    println!("pair: RDMA READ through the window: last byte {back:#x}");

    // Small-read latency of this layer alone (what the SDK adds comes on top).
    let mut lat = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let t = std::time::Instant::now();
        let r = Wr::Read { laddr: rbuf.addr(), lkey: rbuf.lkey(), len: 2, raddr: base + off, rkey };
        cconn.exec(r, None).await?;
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    println!(
        "pair: 2-byte RDMA READ latency over 2000: min {:.1} us, p50 {:.1} us, p99 {:.1} us",
        lat[0] as f64 / 1e3,
        lat[1000] as f64 / 1e3,
        lat[1980] as f64 / 1e3
    );

    let out = Wr::Write { laddr: cbuf.addr(), lkey: cbuf.lkey(), len: 16, raddr: base + off + len, rkey };
    match cconn.exec(out, Some(cbuf.clone())).await {
        Err(e) if e.is_remote_access() => {
            println!("pair: WRITE past the lease's end: refused ({e}); pool byte there {:#x}", byte(off + len))
        }
        other => return Err(rdax_verbs::Error::Cm(format!("a write past the lease was not refused: {other:?}"))),
    }
    println!("pair: after the access error the client QP is closed: {}", cconn.is_closed());

    // A fresh client connection gets a window on its own QP; the server invalidates it; the
    // client's next WRITE must fail and change nothing.
    let (sconn, cconn, cpd) = connect(&sch, &spd, saddr, client).await?;
    let mut mw2 = spd.alloc_mw()?;
    let rkey2 = sconn.bind_mw(&mut mw2, &mr, base + off, len, Access::REMOTE_READ | Access::REMOTE_WRITE).await?;
    let _ = rkey2;
    let cbuf2 = Arc::new(RegBuf::new(&cpd, len as usize)?);
    // The window bound for the *first* client's QP (rkey), used from this one.
    let other = Wr::Write { laddr: cbuf2.addr(), lkey: cbuf2.lkey(), len: 16, raddr: base + off, rkey };
    match cconn.exec(other, Some(cbuf2.clone())).await {
        Err(e) if e.is_remote_access() => {
            println!("pair: the first QP's window key used from another QP: refused ({e})")
        }
        r => return Err(rdax_verbs::Error::Cm(format!("a window key worked from another QP: {r:?}"))),
    }
    let (sconn, cconn, cpd) = connect(&sch, &spd, saddr, client).await?;
    drop(mw2);
    let mut mw3 = spd.alloc_mw()?;
    let rkey3 = sconn.bind_mw(&mut mw3, &mr, base + off, len, Access::REMOTE_READ | Access::REMOTE_WRITE).await?;
    let cbuf3 = Arc::new(RegBuf::new(&cpd, len as usize)?);
    // SAFETY: no WR uses the buffer yet.
    unsafe { std::ptr::write_bytes(cbuf3.ptr(0), 0xCD, len as usize) };
    let w3 = Wr::Write { laddr: cbuf3.addr(), lkey: cbuf3.lkey(), len: 16, raddr: base + off, rkey: rkey3 };
    cconn.exec(w3, Some(cbuf3.clone())).await?;
    println!("pair: third QP wrote through its window: pool byte = {:#x}", byte(off));
    let t0 = std::time::Instant::now();
    sconn.local_inv(rkey3).await?;
    println!("pair: LOCAL_INV of {rkey3:#x} completed in {:?}", t0.elapsed());
    // SAFETY: no WR uses the buffer now.
    unsafe { std::ptr::write_bytes(cbuf3.ptr(0), 0xEE, len as usize) };
    let w4 = Wr::Write { laddr: cbuf3.addr(), lkey: cbuf3.lkey(), len: len as u32, raddr: base + off, rkey: rkey3 };
    match cconn.exec(w4, Some(cbuf3.clone())).await {
        Err(e) if e.is_remote_access() => println!("pair: WRITE with the invalidated key: refused ({e})"),
        r => return Err(rdax_verbs::Error::Cm(format!("a write with an invalidated key was not refused: {r:?}"))),
    }
    let untouched = (off..off + len).all(|i| byte(i) != 0xEE);
    println!("pair: pool bytes unchanged by the refused write: {untouched}");
    drop((mw, mw3, mr));
    drop(pool);
    if untouched { Ok(()) } else { Err(rdax_verbs::Error::Cm("a refused write changed the pool".into())) }
}

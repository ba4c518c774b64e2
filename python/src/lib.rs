//! `rdax._native`: the Rust SDK under the `rdax` Python package.
//!
//! Every call blocks the calling Python thread on one shared tokio runtime, with the GIL
//! released, so other Python threads run meanwhile and bytes move through the SDK's own TCP
//! (and, with the `rdma` feature, RDMA) data plane. Lease reads and writes use the caller's
//! buffer in place: no copy in Python, no per-chunk Python code. While a call waits, pending
//! signals are checked about every 100 ms, so Ctrl-C interrupts a long transfer (the
//! operation's future is dropped; the SDK and daemon are cancel-safe).

mod buffer;
mod client;
mod errors;
mod lease;
mod session;

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;

/// The runtime every call runs on (threads are created on first use), and the process that
/// started it.
fn runtime(py: Python<'_>) -> PyResult<&'static tokio::runtime::Runtime> {
    static RT: OnceLock<Result<(tokio::runtime::Runtime, u32), String>> = OnceLock::new();
    let (rt, pid) = RT
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("rdax-python")
                .build()
                .map(|rt| (rt, std::process::id()))
                .map_err(|e| format!("cannot start the rdax runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| pyo3::exceptions::PyRuntimeError::new_err(e.clone()))?;
    // A forked child has the runtime's memory but none of its threads: a call would wait
    // forever. Refuse it instead.
    if *pid != std::process::id() {
        return Err(errors::new(
            py,
            "Error",
            "rdax cannot be used in a process forked after rdax started (its runtime threads do not \
             survive fork); with multiprocessing, use the \"spawn\" or \"forkserver\" start method"
                .into(),
        ));
    }
    Ok(rt)
}

/// Run `fut` to completion with the GIL released; SDK errors become `rdax` exceptions, and a
/// signal handler's exception (KeyboardInterrupt) ends the wait and drops the future.
///
/// The future is polled once on the calling thread, so the request's first bytes go out
/// without waiting for a worker thread to wake. If it is not done then, it runs on as a task
/// on the runtime's workers, where its sockets' readiness events are handled without waking
/// this thread for each one (driving it from this thread with `block_on` alone cost over half
/// the throughput of a 1 MiB lease write). The calling thread waits for the task and is woken
/// once, when it ends.
pub(crate) fn block<F, T>(py: Python<'_>, fut: F) -> PyResult<T>
where
    F: Future<Output = rdax_client::Result<T>> + Send,
    T: Send + 'static,
{
    type Task<'a, T> = Pin<Box<dyn Future<Output = rdax_client::Result<T>> + Send + 'a>>;
    let rt = runtime(py)?;
    let task: Task<'_, T> = Box::pin(fut);
    // SAFETY: the future may borrow from the caller (a Python buffer, `&self`), so it is not
    // 'static; the task is made to look so for `spawn`. This function does not return, by
    // value or by unwinding, until the task has finished or was aborted and dropped: the
    // loop below only leaves on the task's result, and after `abort` it awaits the
    // JoinHandle, which resolves only once the runtime has dropped the future. A panic inside
    // the task is caught by the runtime and comes back as a JoinError; a panic in the first
    // poll, on this thread, drops the future as it unwinds out of this frame, while what it
    // borrows is still alive in the caller's. The static runtime is never shut down, so the
    // task cannot outlive a wait by being leaked at shutdown.
    let mut task: Task<'static, T> = unsafe { std::mem::transmute::<Task<'_, T>, Task<'static, T>>(task) };
    let out = py.detach(move || {
        // The first poll, here: inside the runtime's context (its sockets register with the
        // runtime's driver), outside any task. A future left pending moves, boxed, into the
        // task, whose first poll replaces the wakers this one registered; readiness that
        // arrives between the two is kept by the driver, not lost.
        let first = rt.block_on(std::future::poll_fn(|cx| std::task::Poll::Ready(task.as_mut().poll(cx))));
        if let std::task::Poll::Ready(r) = first {
            return Ok(Ok(r));
        }
        rt.block_on(async move {
            let mut handle = rt.spawn(task);
            // Signals are checked every 100 ms. No tick at the start: even an immediate
            // first tick goes through the timer driver, which cost ~1 ms per call.
            let every = Duration::from_millis(100);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    r = &mut handle => return Ok(r),
                    _ = tick.tick() => {
                        if let Err(e) = Python::attach(|py| py.check_signals()) {
                            handle.abort();
                            // Wait for the future to be dropped: it may borrow the caller's buffers.
                            let _ = (&mut handle).await;
                            return Err(e);
                        }
                    }
                }
            }
        })
    })?;
    match out {
        Ok(r) => r.map_err(|e| Python::attach(|py| errors::to_py(py, &e))),
        Err(e) => Err(pyo3::exceptions::PyRuntimeError::new_err(format!("rdax: the operation's task failed: {e}"))),
    }
}

/// The endpoint `rdaxctl` would pick: the first local admin socket that exists, else
/// `http://127.0.0.1:7400`.
#[pyfunction]
fn default_endpoint() -> String {
    use std::os::unix::fs::FileTypeExt;
    let found = rdax_proto::paths::admin_socket_candidates()
        .into_iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()));
    match found {
        Some(p) => format!("unix:{}", p.display()),
        None => "http://127.0.0.1:7400".into(),
    }
}

/// The native half of the `rdax` package; import `rdax`, not this.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<client::Client>()?;
    m.add_class::<client::ObjectStat>()?;
    m.add_class::<client::LeaseInfo>()?;
    m.add_class::<client::SessionInfo>()?;
    m.add_class::<session::Session>()?;
    m.add_class::<session::Notice>()?;
    m.add_class::<lease::Lease>()?;
    m.add_function(wrap_pyfunction!(default_endpoint, m)?)?;
    m.add("RDMA", cfg!(feature = "rdma"))?;
    Ok(())
}

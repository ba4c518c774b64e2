//! Failpoints: named places where a test makes the daemon pause, sleep, fail or exit.
//!
//! Compiled only with the `testing` cargo feature. Without it, [`failpoint!`] and
//! [`failpoint_blocking!`] expand to `false` and nothing here is built, so a release binary
//! carries no test knob and reads no test variable.
//!
//! Why not the `fail` crate: its `pause` and `sleep` block the calling thread. Most rdax
//! failpoints sit in async code (recall, drain, the data-plane copy), where a blocked tokio
//! worker would stall unrelated work and could not be cancelled. Here the async form waits on
//! the runtime and is dropped with its future (a client deadline cancels it like any other
//! await); the blocking form, for pool code on blocking threads, uses a condition variable.
//!
//! An action is `off`, `pause` (until the failpoint is set again), `sleep(MS)`,
//! `return` (the site fails with its own error), `panic` or `exit(CODE)`, optionally prefixed
//! `N*` to fire N times and then turn off. Set them with [`set`] (the test-only `Testing` gRPC
//! service does), or at startup from `RDAX_FAILPOINTS="name=action;name=action"` (read only
//! by `testing` builds).

use std::collections::HashMap;
use std::sync::{Condvar, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// What a failpoint does when reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Off,
    /// Wait until the failpoint is set again (to anything).
    Pause,
    /// Wait this long.
    Sleep(Duration),
    /// Make the site fail.
    Return,
    /// Panic (a crash: the daemon aborts on panic).
    Panic,
    /// Exit the process with this code, at once.
    Exit(i32),
}

/// An action that fires `count` times (or forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// The action.
    pub action: Action,
    /// Firings left; `None` for unlimited.
    pub count: Option<u64>,
}

/// A malformed action string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad failpoint action {0:?}: expected [N*]off|pause|sleep(MS)|return|panic|exit(CODE)")]
pub struct BadSpec(pub String);

impl std::str::FromStr for Spec {
    type Err = BadSpec;

    fn from_str(s: &str) -> Result<Spec, BadSpec> {
        let bad = || BadSpec(s.to_string());
        let t = s.trim();
        let (count, act) = match t.split_once('*') {
            Some((n, a)) => (Some(n.trim().parse::<u64>().map_err(|_| bad())?), a.trim()),
            None => (None, t),
        };
        let arg = |prefix: &str| act.strip_prefix(prefix).and_then(|r| r.strip_suffix(')'));
        let action = match act {
            "off" => Action::Off,
            "pause" => Action::Pause,
            "return" => Action::Return,
            "panic" => Action::Panic,
            _ => {
                if let Some(ms) = arg("sleep(") {
                    Action::Sleep(Duration::from_millis(ms.parse().map_err(|_| bad())?))
                } else if let Some(code) = arg("exit(") {
                    Action::Exit(code.parse().map_err(|_| bad())?)
                } else {
                    return Err(bad());
                }
            }
        };
        Ok(Spec { action, count })
    }
}

impl std::fmt::Display for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(n) = self.count {
            write!(f, "{n}*")?;
        }
        match self.action {
            Action::Off => write!(f, "off"),
            Action::Pause => write!(f, "pause"),
            Action::Sleep(d) => write!(f, "sleep({})", d.as_millis()),
            Action::Return => write!(f, "return"),
            Action::Panic => write!(f, "panic"),
            Action::Exit(c) => write!(f, "exit({c})"),
        }
    }
}

#[derive(Default)]
struct Entry {
    spec: Option<Spec>,
    /// Times reached (whatever the action).
    hits: u64,
    /// Callers waiting in `pause` right now.
    paused: u64,
    /// Bumped by every `set` (and `reset`): a pause lasts until the failpoint is set again,
    /// also when its firing count has run out meanwhile.
    generation: u64,
}

#[derive(Default)]
struct Registry {
    points: Mutex<HashMap<String, Entry>>,
    changed: Notify,
    changed_sync: Condvar,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);

fn points() -> std::sync::MutexGuard<'static, HashMap<String, Entry>> {
    REGISTRY.points.lock().unwrap_or_else(|e| e.into_inner())
}

/// One failpoint, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Name.
    pub name: String,
    /// Configured action (`off` when none).
    pub action: String,
    /// Times reached.
    pub hits: u64,
    /// Callers paused there now.
    pub paused: u64,
}

/// Configure `name`. `off` keeps its hit count.
pub fn set(name: &str, spec: &str) -> Result<(), BadSpec> {
    let spec: Spec = spec.parse()?;
    let mut p = points();
    let e = p.entry(name.to_string()).or_default();
    e.spec = (spec.action != Action::Off).then_some(spec);
    e.generation += 1;
    drop(p);
    REGISTRY.changed.notify_waiters();
    REGISTRY.changed_sync.notify_all();
    Ok(())
}

/// Configure from `name=action;name=action` (the `RDAX_FAILPOINTS` form).
pub fn set_all(list: &str) -> Result<(), BadSpec> {
    for item in list.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, spec) = item.split_once('=').ok_or_else(|| BadSpec(item.to_string()))?;
        set(name.trim(), spec)?;
    }
    Ok(())
}

/// Every failpoint that was configured or reached.
pub fn list() -> Vec<Status> {
    let mut v: Vec<Status> = points()
        .iter()
        .map(|(n, e)| Status {
            name: n.clone(),
            action: e.spec.map_or_else(|| "off".to_string(), |s| s.to_string()),
            hits: e.hits,
            paused: e.paused,
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Turn every failpoint off and forget the hit counts (callers paused now are released).
pub fn reset() {
    points().retain(|_, e| {
        e.spec = None;
        e.hits = 0;
        e.generation += 1;
        e.paused > 0
    });
    REGISTRY.changed.notify_waiters();
    REGISTRY.changed_sync.notify_all();
}

/// Count a hit and take the action to run now (consuming one firing), with the generation a
/// pause waits to change.
fn take(name: &str) -> (Action, u64) {
    let mut p = points();
    let e = p.entry(name.to_string()).or_default();
    e.hits += 1;
    let Some(spec) = e.spec.as_mut() else { return (Action::Off, 0) };
    let action = spec.action;
    if let Some(n) = spec.count.as_mut() {
        *n -= 1;
        if *n == 0 {
            e.spec = None;
        }
    }
    if action == Action::Pause {
        e.paused += 1;
    }
    (action, e.generation)
}

fn still_paused(name: &str, generation: u64) -> bool {
    points().get(name).is_some_and(|e| e.generation == generation)
}

fn unpause(name: &str) {
    if let Some(e) = points().get_mut(name) {
        e.paused = e.paused.saturating_sub(1);
    }
}

struct Unpause<'a>(&'a str);

impl Drop for Unpause<'_> {
    fn drop(&mut self) {
        unpause(self.0);
    }
}

fn terminal(name: &str, action: Action) {
    match action {
        Action::Panic => panic!("failpoint {name}: panic"),
        Action::Exit(code) => {
            eprintln!("failpoint {name}: exit({code})");
            std::process::exit(code)
        }
        _ => {}
    }
}

/// Reach failpoint `name` from async code. Returns whether the site must fail. A pause or
/// sleep is an ordinary await: dropping the future ends it.
pub async fn hit(name: &str) -> bool {
    let (action, generation) = take(name);
    match action {
        Action::Off => false,
        Action::Return => true,
        Action::Sleep(d) => {
            tokio::time::sleep(d).await;
            false
        }
        Action::Pause => {
            let _unpause = Unpause(name);
            loop {
                let n = REGISTRY.changed.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if !still_paused(name, generation) {
                    return false;
                }
                n.await;
            }
        }
        Action::Panic | Action::Exit(_) => {
            terminal(name, action);
            false
        }
    }
}

/// Reach failpoint `name` from blocking code (pool work on a blocking thread).
pub fn hit_blocking(name: &str) -> bool {
    let (action, generation) = take(name);
    match action {
        Action::Off => false,
        Action::Return => true,
        Action::Sleep(d) => {
            std::thread::sleep(d);
            false
        }
        Action::Pause => {
            let _unpause = Unpause(name);
            let mut p = points();
            while p.get(name).is_some_and(|e| e.generation == generation) {
                p = REGISTRY.changed_sync.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            false
        }
        Action::Panic | Action::Exit(_) => {
            terminal(name, action);
            false
        }
    }
}

/// Tests of one process share the registry: a test that configures failpoints takes this
/// for writing, a test that merely passes through failpoints takes it for reading.
#[cfg(test)]
pub(crate) static TEST_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        for s in ["off", "pause", "sleep(15)", "return", "panic", "exit(3)", "2*return", "1*pause"] {
            assert_eq!(s.parse::<Spec>().unwrap().to_string(), s);
        }
        for s in ["", "sleep", "sleep(x)", "x*return", "exit()", "stop"] {
            assert!(s.parse::<Spec>().is_err(), "{s:?}");
        }
    }

    #[tokio::test]
    async fn pause_waits_until_changed_and_counts_fire_out() {
        let _g = TEST_LOCK.write().await;
        reset();
        set("t.pause", "pause").unwrap();
        let waiter = tokio::spawn(hit("t.pause"));
        let paused = || list().iter().any(|s| s.name == "t.pause" && s.paused == 1);
        for _ in 0..1000 {
            if paused() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(paused(), "the caller waits at the failpoint");
        assert!(!waiter.is_finished());
        set("t.pause", "off").unwrap();
        assert!(!waiter.await.unwrap(), "a pause does not make the site fail");
        // A counted pause still holds its caller until the failpoint is set again.
        set("t.once", "1*pause").unwrap();
        let once = tokio::spawn(hit("t.once"));
        for _ in 0..1000 {
            tokio::task::yield_now().await;
        }
        assert!(!once.is_finished(), "1*pause holds its caller");
        assert!(!hit("t.once").await, "and fires only once");
        set("t.once", "off").unwrap();
        assert!(!once.await.unwrap());
        set("t.ret", "2*return").unwrap();
        assert!(hit("t.ret").await);
        assert!(hit_blocking("t.ret"));
        assert!(!hit("t.ret").await, "two firings, then off");
        let st = list().into_iter().find(|s| s.name == "t.ret").unwrap();
        assert_eq!((st.hits, st.action.as_str()), (3, "off"));
        reset();
    }

    #[tokio::test]
    async fn a_dropped_pause_is_no_longer_counted() {
        let _g = TEST_LOCK.write().await;
        reset();
        set("t.drop", "pause").unwrap();
        let r = tokio::time::timeout(Duration::from_millis(20), hit("t.drop")).await;
        assert!(r.is_err(), "still paused at the deadline");
        assert_eq!(list().iter().find(|s| s.name == "t.drop").unwrap().paused, 0);
        set_all("a=sleep(1); b=off").unwrap();
        assert!(set_all("a").is_err());
        reset();
    }

    #[test]
    fn blocking_pause_is_released_from_another_thread() {
        let _g = TEST_LOCK.blocking_write();
        reset();
        set("t.block", "pause").unwrap();
        let t = std::thread::spawn(|| hit_blocking("t.block"));
        while !list().iter().any(|s| s.name == "t.block" && s.paused == 1) {
            std::thread::yield_now();
        }
        set("t.block", "off").unwrap();
        assert!(!t.join().unwrap());
        reset();
    }
}

//! Talking to systemd (`Type=notify`): READY, STATUS, WATCHDOG, RELOADING, STOPPING.
//!
//! Without `NOTIFY_SOCKET` every call is a no-op, so the daemon behaves the same outside
//! systemd. The watchdog ping comes from a task that first proves the daemon can still do
//! its work — a pool call on a blocking thread, within half the watchdog period — rather than
//! from a bare timer that would keep pinging while the pool is wedged.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::lease::LeaseManager;
use crate::pool::Pool;
use crate::session::SessionManager;

/// Send `states`; failures are logged, never fatal.
pub fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!(error = %e, "sd_notify failed");
    }
}

/// A one-line status for `systemctl status`.
pub fn status_line(pool: &Pool, sessions: &SessionManager, leases: &LeaseManager) -> String {
    let s = pool.stats();
    let used = s.used_blocks * 100 / s.data_blocks.max(1);
    format!(
        "pool {} ({}): {} objects, {used}% used; {} sessions; {} leases",
        pool.info().path.map(|p| p.display().to_string()).unwrap_or_default(),
        pool.info().mode,
        s.objects,
        sessions.len(),
        leases.list(None).len()
    )
}

/// Ping the watchdog at half its period while the daemon proves alive; post STATUS as well.
pub async fn watchdog_and_status(
    pool: Arc<Pool>,
    sessions: Arc<SessionManager>,
    leases: Arc<LeaseManager>,
    cancel: CancellationToken,
) {
    let watchdog = sd_notify::watchdog_enabled();
    let period = watchdog.map_or(Duration::from_secs(5), |w| w / 2);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (p, s, l) = (pool.clone(), sessions.clone(), leases.clone());
        // Proof of life: the runtime schedules us, a blocking thread is free, the pool's
        // metadata lock can be taken.
        let probe = tokio::task::spawn_blocking(move || status_line(&p, &s, &l));
        match tokio::time::timeout(period, probe).await {
            Ok(Ok(status)) => {
                let mut states = vec![NotifyState::Status(&status)];
                if watchdog.is_some() {
                    states.push(NotifyState::Watchdog);
                }
                notify(&states);
                debug!(status = %status, "watchdog ping");
            }
            _ => warn!(period = ?period, "liveness probe did not complete in time; withholding the watchdog ping"),
        }
    }
}

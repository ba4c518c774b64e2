//! rdaxd: parse arguments, set up logging, bind, and hand over to [`rdaxd::run`].

use clap::Parser;
use rdaxd::config::{Args, Command, Config};

/// Exit status for a configuration that can never work (sysexits' `EX_CONFIG`): the unit's
/// `RestartPreventExitStatus=78` keeps systemd from restarting it forever.
const EXIT_CONFIG: u8 = 78;

/// A configuration error, told apart from a failure to start.
#[derive(Debug)]
struct ConfigFailure(String);

impl std::fmt::Display for ConfigFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigFailure {}

fn main() -> std::process::ExitCode {
    // A panic is a crash: abort at once so that restart runs recovery.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let args = Args::parse();
    match start(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rdaxd: failed to {e:#}");
            if e.downcast_ref::<ConfigFailure>().is_some() {
                std::process::ExitCode::from(EXIT_CONFIG)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn start(args: Args) -> anyhow::Result<()> {
    let mut cfg = Config::resolve(&args).map_err(|e| ConfigFailure(format!("load the configuration: {e}")))?;
    if let Some(Command::CheckConfig { quiet }) = args.command {
        if !cfg.unknown_keys.is_empty() {
            let keys = cfg.unknown_keys.join(", ");
            return Err(ConfigFailure(format!("validate the configuration: unknown keys: {keys}")).into());
        }
        if !quiet {
            print!("{}", cfg.report());
        }
        // Not an error here: the group may exist only where the daemon runs (sysusers), but
        // rdaxd refuses to start where it does not.
        if let Some(problem) = cfg.admin_group_problem() {
            eprintln!("rdaxd: warning: {problem} (rdaxd refuses to start on a host where this is so)");
        }
        return Ok(());
    }
    cfg.resolve_admin_group().map_err(|e| ConfigFailure(format!("load the configuration: {e}")))?;
    rdaxd::logging::init(cfg.log_format, &cfg.log_level)?;
    for k in &cfg.unknown_keys {
        tracing::warn!(key = %k, "unknown config key ignored (`rdaxd check-config` rejects it)");
    }
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let (reload_tx, reloads) = tokio::sync::mpsc::channel(4);
        let shutdown = rdaxd::lifecycle::shutdown_signal(move || match Config::resolve(&args) {
            Ok(new) => {
                let _ = reload_tx.try_send(new);
            }
            Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
        })?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| anyhow::anyhow!("listen on {}: {e}", cfg.listen))?;
        rdaxd::lifecycle::run_with_reload(cfg, listener, shutdown, reloads).await
    })
}

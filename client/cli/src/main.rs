//! `rdaxctl` — the rdax command-line tool.
//!
//! Exit status: 0 success; 1 the pool has damage (`fsck`); 2 the command could not run
//! (bad arguments, no pool, I/O error).

mod size;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rdaxd::pool::check::{CheckReport, check_path};
use rdaxd::pool::layout::FormatOptions;
use rdaxd::pool::{CreateOptions, Pool};

#[derive(Parser, Debug)]
#[command(name = "rdaxctl", version, about = "Manage rdax pmem pools and objects")]
struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a pool (offline): a new file of --size bytes, or a whole device-DAX device.
    Mkpool {
        /// Pool file or /dev/daxX.Y.
        path: PathBuf,
        /// Size for a new file, e.g. 1G, 512MiB, 68719476736 (ignored for device-DAX).
        #[arg(long, value_parser = size::parse, default_value = "1G")]
        size: u64,
        /// Overwrite an existing pool file or device contents (destroys them).
        #[arg(long)]
        force: bool,
        /// Object slots (default: one per 256 KiB of pool, at least 1024).
        #[arg(long)]
        max_objects: Option<u64>,
        /// Extent slots (default: one per 8 blocks, at least 4096).
        #[arg(long)]
        max_extents: Option<u64>,
    },
    /// Check a pool (offline, read-only): exit 0 if clean, 1 if damaged.
    Fsck {
        /// Pool file or /dev/daxX.Y.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            if cli.json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            } else {
                eprintln!("rdaxctl: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.cmd {
        Cmd::Mkpool { path, size, force, max_objects, max_extents } => {
            let opts = CreateOptions {
                overwrite: *force,
                format: FormatOptions { max_objects: *max_objects, max_extents: *max_extents },
                force_cache_flush: false,
            };
            let pool = Pool::create(path, *size, opts)?;
            let info = pool.info();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                let g = info.geometry;
                println!("created pool {} ({})", path.display(), info.uuid);
                println!("  mode          {} (persistence: {})", info.mode, info.persistence);
                println!("  size          {} bytes, {} data blocks of 4 KiB", g.pool_size, g.data_blocks);
                println!("  capacity      {} objects, {} extents", g.objtab_slots, g.exttab_slots);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fsck { path } => {
            let report = check_path(path)?;
            print_report(&report, cli.json)?;
            Ok(if report.clean { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

fn print_report(r: &CheckReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let name = r.path.as_ref().map_or_else(|| "<memory>".into(), |p| p.display().to_string());
    for n in &r.notes {
        println!("{name}: {n}");
    }
    println!(
        "{name}: {} objects, {} extents, {} of {} data blocks free",
        r.objects, r.extents, r.free_blocks, r.data_blocks
    );
    if r.clean {
        println!("{name}: clean");
    } else {
        for p in &r.problems {
            println!("{name}: PROBLEM: {p}");
        }
        println!("{name}: DAMAGED ({} problems)", r.problems.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}

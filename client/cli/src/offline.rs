//! Offline tools: `mkpool`, `fsck` and `token create`.

use std::path::Path;

use rdaxd::pool::check::{CheckReport, check_path};
use rdaxd::pool::layout::FormatOptions;
use rdaxd::pool::{CreateOptions, Pool};

use crate::Failure;
use crate::output::human;

pub(crate) fn mkpool(
    path: &Path,
    size: u64,
    force: bool,
    max_objects: Option<u64>,
    max_extents: Option<u64>,
    json: bool,
) -> Result<(), Failure> {
    let opts = CreateOptions {
        overwrite: force,
        format: FormatOptions { max_objects, max_extents },
        force_cache_flush: false,
        // Allocated in full: a sparse pool would fault its mapping when the filesystem fills.
        sparse: false,
    };
    let pool = Pool::create(path, size, opts).map_err(|e| Failure::local(e.into()))?;
    let info = pool.info();
    pool.close();
    crate::output::emit(json, &info, || {
        let g = info.geometry;
        format!(
            "created pool {} ({})\n  mode          {} (persistence: {})\n  size          {} ({} data blocks of 4 KiB)\n  capacity      {} objects, {} extents",
            path.display(),
            info.uuid,
            info.mode,
            info.persistence,
            human(g.pool_size),
            g.data_blocks,
            g.objtab_slots,
            g.exttab_slots
        )
    });
    Ok(())
}

pub(crate) fn fsck(path: &Path, json: bool) -> Result<(), Failure> {
    let report = check_path(path).map_err(|e| Failure::local(e.into()))?;
    print_report(&report, json);
    if report.clean { Ok(()) } else { Err(Failure::damaged()) }
}

fn print_report(r: &CheckReport, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(r).expect("serialisable"));
        return;
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
}

/// `rdaxctl token create`: a new 256-bit token and the principals-file lines for it.
pub(crate) fn token_create(name: &str, scopes: &[String], json: bool) -> Result<(), Failure> {
    use rdaxd::auth::{Scope, hash_text};
    if name.is_empty() || name.len() > 128 || !name.bytes().all(|c| c.is_ascii_graphic() && c != b'"') {
        return Err(Failure::local(anyhow::anyhow!(
            "principal name `{name}`: 1 to 128 printable characters, no spaces or quotes"
        )));
    }
    let parsed = scopes
        .iter()
        .map(|s| Scope::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::local(anyhow::anyhow!(e)))?;
    let bits: String =
        [rdaxd::session::random_id(), rdaxd::session::random_id()].iter().map(|r| r.to_string()).collect();
    let token = format!("rdax-{bits}");
    let hash = hash_text(&token);
    let scope_list = parsed.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let toml = format!("[[principal]]\nname = \"{name}\"\ntokens = [\"{hash}\"]\nscopes = [{scope_list}]\n");
    let v = serde_json::json!({
        "principal": name,
        "token": token,
        "token_hash": hash,
        "scopes": parsed.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "principals_file_entry": toml,
    });
    crate::output::emit(json, &v, || {
        format!(
            "token for `{name}` (shown once: store it in a file of mode 0600 for --token-file):\n{token}\n\n\
             add to the principals file (auth.principals_file), then reload rdaxd (SIGHUP):\n{toml}"
        )
    });
    Ok(())
}

//! The repository-lifecycle commands: `forget` (retention), `prune` (garbage collection),
//! `check` (consistency), `protect`/`unprotect`, and `repair`. Kept apart from `cli/mod.rs`:
//! each command parses its flags, calls one `native` function and renders its report.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use clap::{Args, ValueEnum};

use crate::error::{EngineError, ErrorKind};
use crate::native::lifecycle::{self, GroupBy};
use crate::native::repo::Repository;
use crate::native::retention::{Keep, Policy, Within};
use crate::native::{check, maintain, repack};

use super::events::{self, Done, Start};
use super::output::Output;
use super::{Cli, Command, config, store_args};

/// `ferry forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// Keep the N newest backups of each group (N or `unlimited`).
    #[arg(long, value_name = "N", value_parser = Keep::parse, default_value = "0")]
    pub keep_last: Keep,
    /// Keep the newest backup of each of the N most recent hours (UTC) that have one.
    #[arg(long, value_name = "N", value_parser = Keep::parse, default_value = "0")]
    pub keep_hourly: Keep,
    /// Keep the newest backup of each of the N most recent days (UTC) that have one.
    #[arg(long, value_name = "N", value_parser = Keep::parse, default_value = "0")]
    pub keep_daily: Keep,
    /// Keep the newest backup of each of the N most recent ISO weeks (UTC) that have one.
    #[arg(long, value_name = "N", value_parser = Keep::parse, default_value = "0")]
    pub keep_weekly: Keep,
    /// Keep the newest backup of each of the N most recent months (UTC) that have one.
    #[arg(long, value_name = "N", value_parser = Keep::parse, default_value = "0")]
    pub keep_monthly: Keep,
    /// Keep the newest backup of each of the N most recent years (UTC) that have one.
    #[arg(long, value_name = "N", value_parser = Keep::parse, default_value = "0")]
    pub keep_yearly: Keep,
    /// Keep every backup taken within DURATION before the group's newest (e.g. 7d, 36h, 2w,
    /// 6m, 1y2m).
    #[arg(long, value_name = "DURATION", value_parser = Within::parse)]
    pub keep_within: Option<Within>,
    /// Judge backups per source (default), or all together.
    #[arg(long, value_enum, default_value = "source")]
    pub group_by: GroupByArg,
    /// Report what would be removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `--group-by` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupByArg {
    /// One group per source volume.
    Source,
    /// One group for the whole repository.
    None,
}

/// `ferry prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Report what would be condemned and deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Repack packs at least PERCENT of whose bytes no backup uses: their used records are
    /// copied into new packs and the old packs are condemned (0-100; 100 never repacks).
    #[arg(long, value_name = "PERCENT", default_value_t = repack::WASTE_PERCENT_DEFAULT,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub repack_waste: u8,
}

/// `ferry protect` and `ferry unprotect`.
#[derive(Debug, Args)]
pub struct ProtectArgs {
    /// The backups.
    #[arg(required = true)]
    pub backup_ids: Vec<String>,
}

/// The command name of a lifecycle command, `None` for others.
pub fn name(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Forget(_) => "forget",
        Command::Prune(_) => "prune",
        Command::Check => "check",
        Command::Protect(_) => "protect",
        Command::Unprotect(_) => "unprotect",
        Command::Repair => "repair",
        Command::Key(_) => "key",
        _ => return None,
    })
}

/// Runs a lifecycle command; `None` when `cli` holds another command.
pub fn dispatch(
    cli: &Cli,
    output: &Output,
    _cancel: &Arc<AtomicBool>,
) -> Option<Result<(), EngineError>> {
    let _ = name(&cli.command)?;
    Some(run(cli, output))
}

fn run(cli: &Cli, output: &Output) -> Result<(), EngineError> {
    let key = super::keys::key_source(cli.key_file.as_deref(), output)?;
    let repo = Repository::open_with(config::open_store(&store_args(cli))?, &key)?;
    output.start(Start::Repository { repository: repo.store.describe() });
    match &cli.command {
        Command::Forget(args) => forget(&repo, args, output),
        Command::Prune(args) => prune(&repo, args, output),
        Command::Check => check(&repo, output),
        Command::Protect(args) => protect(&repo, &args.backup_ids, true, output),
        Command::Unprotect(args) => protect(&repo, &args.backup_ids, false, output),
        Command::Repair => repair(&repo, output),
        Command::Key(args) => super::keys::run(&repo, args, output),
        _ => unreachable!("dispatch checks the command"),
    }
}

fn forget(repo: &Repository, args: &ForgetArgs, output: &Output) -> Result<(), EngineError> {
    let warn = |message: String| output.warning(&message);
    let policy = Policy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
        within: args.keep_within,
    };
    let group_by = match args.group_by {
        GroupByArg::Source => GroupBy::Source,
        GroupByArg::None => GroupBy::Nothing,
    };
    let report = lifecycle::forget(repo, &policy, group_by, args.dry_run, &warn)?;
    let mut lines = Vec::new();
    for group in &report.groups {
        lines.push(format!("{}:", group.source.as_deref().unwrap_or("all backups")));
        for kept in &group.kept {
            let reasons: Vec<String> = kept.reasons.iter().map(ToString::to_string).collect();
            lines.push(format!(
                "  keep   {}  {}  ({})",
                kept.backup_id,
                kept.time,
                reasons.join(", ")
            ));
        }
        for removed in &group.removed {
            lines.push(format!("  remove {}  {}", removed.backup_id, removed.time));
        }
    }
    lines.push(format!(
        "{} kept, {} {}",
        report.kept_count,
        report.removed_count,
        if report.dry_run { "would be removed (dry run)" } else { "removed" }
    ));
    output.result(Done::Forget { forget: report }, &lines.join("\n"));
    Ok(())
}

fn prune(repo: &Repository, args: &PruneArgs, output: &Output) -> Result<(), EngineError> {
    let warn = |message: String| output.warning(&message);
    let options =
        lifecycle::PruneOptions { dry_run: args.dry_run, repack_waste_percent: args.repack_waste };
    let report = lifecycle::prune(repo, &options, &warn)?;
    let deleted: u64 = report.swept.iter().map(|s| s.deleted_bytes).sum();
    let deleted_packs: usize = report.swept.iter().map(|s| s.deleted_packs).sum();
    let recovered: usize = report.swept.iter().map(|s| s.recovered_packs.len()).sum();
    let mut summary = format!(
        "{}{} pack(s) deleted ({deleted} bytes) from {} mark(s), {recovered} recovered; {} \
         mark(s) waiting; ",
        if report.dry_run { "dry run: " } else { "" },
        deleted_packs,
        report.swept.len(),
        report.waiting.len(),
    );
    if !report.repack.sources.is_empty() {
        summary.push_str(&format!(
            "{} pack(s) ({} bytes) repacked into {} ({} bytes copied); ",
            report.repack.sources.len(),
            report.repack.source_bytes,
            report.repack.written.len(),
            report.repack.copied_bytes,
        ));
    }
    match &report.marked {
        Some(mark) => summary.push_str(&format!(
            "{} pack(s) ({} bytes) condemned, deleted by a prune at least {} s from now",
            mark.packs,
            mark.bytes,
            repo.config.gc().grace_secs
        )),
        None => summary.push_str("nothing new to condemn"),
    }
    for waiting in &report.waiting {
        summary.push_str(&format!(
            "\n  {} ({} packs): {}",
            waiting.mark, waiting.packs, waiting.reason
        ));
    }
    output.result(Done::Prune { prune: report }, &summary);
    Ok(())
}

fn check(repo: &Repository, output: &Output) -> Result<(), EngineError> {
    let report = check::run(repo)?;
    let mut lines = vec![format!(
        "{} backups, {} packs ({} bytes), {} indexes, {} marks; {} unreferenced pack(s) \
         ({} bytes), {} without an index, {} referenced pack(s) condemned",
        report.backups,
        report.packs,
        report.pack_bytes,
        report.indexes,
        report.marks,
        report.unreferenced_packs,
        report.unreferenced_bytes,
        report.unindexed_packs.len(),
        report.marked_referenced.len()
    )];
    for problem in &report.problems {
        lines.push(format!("  {}: {}", problem.object, problem.detail));
    }
    if report.problems.is_empty() {
        output.result(Done::Check { check: report }, &lines.join("\n"));
        return Ok(());
    }
    if !output.is_json() {
        eprintln!("{}", lines.join("\n"));
    }
    let message = format!(
        "{} problem(s) found: {}",
        report.problems.len(),
        report
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.object, p.detail))
            .collect::<Vec<_>>()
            .join("; ")
    );
    Err(EngineError::new(ErrorKind::Integrity, message)
        .with_details(events::details(&Done::Check { check: report })))
}

fn protect(
    repo: &Repository,
    backup_ids: &[String],
    protect: bool,
    output: &Output,
) -> Result<(), EngineError> {
    for id in backup_ids {
        repo.set_protected(id, protect)?;
    }
    let verb = if protect { "protected" } else { "unprotected" };
    output.result(
        Done::Protection { backup_ids: backup_ids.to_vec(), protected: protect },
        &format!("{verb} {}", backup_ids.join(", ")),
    );
    Ok(())
}

fn repair(repo: &Repository, output: &Output) -> Result<(), EngineError> {
    let warn = |message: String| output.warning(&message);
    let report = maintain::repair(repo, &warn)?;
    let summary = format!(
        "aborted {} abandoned upload(s), removed {} dead lease(s), rebuilt {} lost \
         index(es); {} pack(s) without an index left (young or condemned); {} damaged \
         pack(s); {} missing pack(s) still referenced",
        report.aborted_uploads.len(),
        report.removed_leases,
        report.rebuilt_indexes.len(),
        report.unindexed_packs_left.len(),
        report.damaged_packs.len(),
        report.missing_referenced_packs.len(),
    );
    for (pack, damage) in &report.damaged_packs {
        warn(format!("pack {pack} is damaged: {damage}"));
    }
    for (backup, pack) in &report.missing_referenced_packs {
        warn(format!("backup {backup} references missing pack {pack}"));
    }
    output.result(Done::Repair { repair: report }, &summary);
    Ok(())
}

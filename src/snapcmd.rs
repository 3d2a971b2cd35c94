//! `snapctl`'s operations, one entry point for both places they run: the
//! mounted daemon (through the control socket) and a store opened directly.
//! Also the retention policy: its rules, which snapshots it keeps, and the
//! daemon's timer that takes and prunes snapshots.
//!
//! Calls `fs::volume`; the `snapctl` binary and the daemon call this.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::{Datelike, Local, TimeZone, Timelike};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::fs::volume::{SnapInfo, Volume, validate_name};

/// Control socket command name.
pub const CTL_COMMAND: &str = "snap";
/// Settings key of the retention policy.
const POLICY_KEY: &str = "policy";

/// The retention policy (`snapctl policy set`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Take a snapshot this often (seconds); None: no timer.
    #[serde(default)]
    pub every_secs: Option<u64>,
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
}

impl Policy {
    fn keeps_anything(&self) -> bool {
        self.keep_last
            + self.keep_hourly
            + self.keep_daily
            + self.keep_weekly
            + self.keep_monthly
            + self.keep_yearly
            > 0
    }
}

/// A snapshot as the policy sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub created: i64,
    pub auto: bool,
}

/// The snapshots a policy would delete: of the candidates (automatic ones,
/// or all with `include_manual`), those no rule keeps. Each rule keeps the
/// newest snapshot of each of its last N periods (hours, days, ISO weeks,
/// months, years, in local time), the way restic and borg count. A policy
/// with no keep rule keeps everything.
pub fn select_prune(snaps: &[Candidate], policy: &Policy, include_manual: bool) -> Vec<String> {
    if !policy.keeps_anything() {
        return Vec::new();
    }
    let mut cands: Vec<&Candidate> = snaps.iter().filter(|s| s.auto || include_manual).collect();
    cands.sort_by(|a, b| b.created.cmp(&a.created).then(b.name.cmp(&a.name)));
    let local = |t: i64| Local.timestamp_opt(t, 0).single();
    type Bucket = fn(&chrono::DateTime<Local>) -> (i32, u32, u32, u32);
    let rules: [(u32, Bucket); 5] = [
        (policy.keep_hourly, |t| {
            (t.year(), t.month(), t.day(), t.hour())
        }),
        (policy.keep_daily, |t| (t.year(), t.month(), t.day(), 0)),
        (policy.keep_weekly, |t| {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }),
        (policy.keep_monthly, |t| (t.year(), t.month(), 0, 0)),
        (policy.keep_yearly, |t| (t.year(), 0, 0, 0)),
    ];
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    for c in cands.iter().take(policy.keep_last as usize) {
        keep.insert(&c.name);
    }
    for (n, bucket) in rules {
        let mut seen = BTreeSet::new();
        for c in &cands {
            if seen.len() >= n as usize {
                break;
            }
            let Some(t) = local(c.created) else { continue };
            if seen.insert(bucket(&t)) {
                keep.insert(&c.name);
            }
        }
    }
    let mut out: Vec<String> = cands
        .iter()
        .filter(|c| !keep.contains(c.name.as_str()))
        .map(|c| c.name.clone())
        .collect();
    out.reverse();
    out
}

/// Parses "90s", "15m", "1h", "2d", "1w" (or plain seconds).
pub fn parse_interval(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("interval {s:?} is not a number with a unit (s, m, h, d, w)"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("interval {s:?} has an unknown unit {unit:?}")),
    };
    if n == 0 {
        return Err(format!("interval {s:?} must be above zero"));
    }
    n.checked_mul(mult)
        .ok_or_else(|| format!("interval {s:?} is too long"))
}

pub fn load_policy(vol: &Volume) -> Result<Policy, String> {
    match vol.setting(POLICY_KEY).map_err(|e| e.to_string())? {
        None => Ok(Policy::default()),
        Some(b) => serde_json::from_slice(&b).map_err(|e| format!("stored policy: {e}")),
    }
}

fn str_arg<'a>(args: &'a Value, key: &str) -> Result<&'a str, String> {
    args.get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("missing argument '{key}'"))
}

fn bytes_arg(args: &Value, key: &str) -> Result<Vec<u8>, String> {
    // Paths travel as arrays of bytes (they need not be UTF-8).
    match args.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|b| b.as_u64().filter(|x| *x < 256).map(|x| x as u8))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| format!("argument '{key}' is not a byte array")),
        Some(Value::String(s)) => Ok(s.as_bytes().to_vec()),
        _ => Err(format!("missing argument '{key}'")),
    }
}

/// A name for a snapshot taken without one: the local time, made unique.
fn default_name(vol: &Volume, prefix: &str) -> Result<String, String> {
    let base = format!("{prefix}{}", Local::now().format("%Y-%m-%d_%H-%M-%S"));
    let taken: BTreeSet<String> = vol
        .snap_list(false)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}.{n}");
        n += 1;
    }
    Ok(name)
}

fn to_json<T: Serialize>(v: T) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

/// Runs one snapctl operation (`args.op`) on a volume.
/// Runs a read-only operation on an unmounted store without starting a
/// volume (no ingest threads, no replay of staged data): `list`, `show`,
/// and `diff` between two snapshots, read through `crate::snap`. None for
/// every other operation, which needs the volume (`diff` against the live
/// tree included: it must see what a crash left staged, replayed).
pub fn handle_offline(repo: &crate::repo::Repo, args: &Value) -> Option<Result<Value, String>> {
    let op = args.get("op").and_then(|v| v.as_str())?;
    let b = args.get("b").and_then(|v| v.as_str());
    if !(op == "list" || op == "show" || (op == "diff" && b.is_some())) {
        return None;
    }
    let run = || -> Result<Value, String> {
        let err = |e: crate::snap::Error| e.to_string();
        let rt = repo.meta().begin_read().map_err(|e| e.to_string())?;
        match op {
            "list" | "show" => {
                let space =
                    op == "show" || args.get("space").and_then(|v| v.as_bool()) != Some(false);
                let (all, _) = crate::snap::list(&rt, repo.store(), space).map_err(err)?;
                if op == "list" {
                    return to_json(all);
                }
                let name = str_arg(args, "name")?;
                match all.into_iter().find(|s| s.name == name) {
                    Some(s) => to_json(s),
                    None => Err(format!("snapshot {name} does not exist")),
                }
            }
            _ => to_json(crate::snap::diff(&rt, str_arg(args, "a")?, b).map_err(err)?),
        }
    };
    Some(run())
}

pub fn handle(vol: &Volume, args: &Value) -> Result<Value, String> {
    let op = str_arg(args, "op")?;
    let err = |e: crate::fs::Error| e.to_string();
    match op {
        "create" => {
            let name = match args.get("name").and_then(|v| v.as_str()) {
                Some(n) => n.to_string(),
                None => default_name(vol, "")?,
            };
            let labels: BTreeMap<String, String> = match args.get("labels") {
                Some(l) => serde_json::from_value(l.clone()).map_err(|e| e.to_string())?,
                None => BTreeMap::new(),
            };
            to_json(vol.snap_create(&name, labels, false).map_err(err)?)
        }
        "list" => {
            let space = args.get("space").and_then(|v| v.as_bool()).unwrap_or(true);
            to_json(vol.snap_list(space).map_err(err)?)
        }
        "show" => to_json(vol.snap_show(str_arg(args, "name")?).map_err(err)?),
        "delete" => {
            let names: Vec<String> =
                serde_json::from_value(args.get("names").cloned().unwrap_or(Value::Null))
                    .map_err(|_| "missing argument 'names'".to_string())?;
            let mut done = Vec::new();
            for n in &names {
                match vol.snap_delete(n) {
                    Ok(r) => done.push(r),
                    Err(e) => {
                        let ok: Vec<&str> = done.iter().map(|d| d.name.as_str()).collect();
                        return Err(if ok.is_empty() {
                            e.to_string()
                        } else {
                            format!("{e} (deleted before it: {})", ok.join(", "))
                        });
                    }
                }
            }
            to_json(done)
        }
        "diff" => {
            let a = str_arg(args, "a")?;
            let b = args.get("b").and_then(|v| v.as_str());
            to_json(vol.snap_diff(a, b).map_err(err)?)
        }
        "restore" => {
            let snap = str_arg(args, "snap")?;
            let path = bytes_arg(args, "path")?;
            let to = match args.get("to") {
                Some(Value::Null) | None => None,
                Some(_) => Some(bytes_arg(args, "to")?),
            };
            to_json(vol.snap_restore(snap, &path, to.as_deref()).map_err(err)?)
        }
        "rollback" => {
            let snap = str_arg(args, "snap")?;
            let force = args.get("force").and_then(|v| v.as_bool()).unwrap_or(false);
            to_json(vol.snap_rollback(snap, force).map_err(err)?)
        }
        "policy_show" => to_json(load_policy(vol)?),
        "policy_set" => {
            let p: Policy =
                serde_json::from_value(args.get("policy").cloned().unwrap_or(Value::Null))
                    .map_err(|e| format!("policy: {e}"))?;
            let bytes = serde_json::to_vec(&p).map_err(|e| e.to_string())?;
            vol.set_setting(POLICY_KEY, &bytes).map_err(err)?;
            to_json(p)
        }
        "prune" => {
            let dry = args
                .get("dry_run")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            let manual = args
                .get("include_manual")
                .and_then(|v| v.as_bool())
                .unwrap_or(false);
            prune(vol, dry, manual)
        }
        other => Err(format!("unknown snapctl operation '{other}'")),
    }
}

/// Applies the policy: deletes (or with `dry_run` names) what it does not
/// keep.
pub fn prune(vol: &Volume, dry_run: bool, include_manual: bool) -> Result<Value, String> {
    let policy = load_policy(vol)?;
    let snaps: Vec<SnapInfo> = vol.snap_list(false).map_err(|e| e.to_string())?;
    let cands: Vec<Candidate> = snaps
        .iter()
        .map(|s| Candidate {
            name: s.name.clone(),
            created: s.created_unix,
            auto: s.auto,
        })
        .collect();
    let doomed = select_prune(&cands, &policy, include_manual);
    let mut deleted = Vec::new();
    if !dry_run {
        for n in &doomed {
            vol.snap_delete(n).map_err(|e| e.to_string())?;
            deleted.push(n.clone());
        }
    }
    let kept: Vec<&str> = snaps
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !doomed.iter().any(|d| d == n))
        .collect();
    Ok(json!({
        "dry_run": dry_run,
        "would_delete": if dry_run { doomed.clone() } else { Vec::new() },
        "deleted": deleted,
        "kept": kept,
    }))
}

/// The daemon's policy timer: takes a snapshot named `auto-<time>` each
/// `every` and prunes after it. Runs until the volume shuts down.
pub fn start_policy_timer(vol: &Arc<Volume>) -> std::io::Result<std::thread::JoinHandle<()>> {
    let weak: Weak<Volume> = Arc::downgrade(vol);
    std::thread::Builder::new()
        .name("snap-policy".into())
        .spawn(move || policy_loop(weak))
}

fn policy_loop(weak: Weak<Volume>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(vol) = weak.upgrade() else { return };
        if !vol.is_running() {
            return;
        }
        if vol.read_only {
            continue;
        }
        if let Err(e) = policy_tick(&vol) {
            log::error!("snapshot policy: {e}");
            // Do not retry every second.
            std::thread::sleep(Duration::from_secs(30));
        }
    }
}

fn policy_tick(vol: &Volume) -> Result<(), String> {
    let policy = load_policy(vol)?;
    let Some(every) = policy.every_secs else {
        return Ok(());
    };
    let snaps = vol.snap_list(false).map_err(|e| e.to_string())?;
    let last = snaps
        .iter()
        .filter(|s| s.auto)
        .map(|s| s.created_unix)
        .max();
    let now = Local::now().timestamp();
    if last.is_some_and(|t| now.saturating_sub(t) < every as i64) {
        return Ok(());
    }
    let name = default_name(vol, "auto-")?;
    validate_name(&name).map_err(|e| e.to_string())?;
    let mut labels = BTreeMap::new();
    labels.insert("policy".to_string(), "auto".to_string());
    vol.snap_create(&name, labels, true)
        .map_err(|e| e.to_string())?;
    let r = prune(vol, false, false)?;
    log::info!("policy snapshot {name} taken; pruned {}", r["deleted"]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, mo: u32, d: u32, h: u32) -> i64 {
        Local
            .with_ymd_and_hms(y, mo, d, h, 0, 0)
            .single()
            .map(|t| t.timestamp())
            .unwrap_or(0)
    }

    fn cand(name: &str, t: i64, auto: bool) -> Candidate {
        Candidate {
            name: name.into(),
            created: t,
            auto,
        }
    }

    #[test]
    fn hourly_and_daily_rules_keep_the_newest_per_period() {
        // Four snapshots an hour apart on one day, two on the day before.
        let s = vec![
            cand("d1-10", at(2026, 3, 1, 10), true),
            cand("d1-11", at(2026, 3, 1, 11), true),
            cand("d2-09", at(2026, 3, 2, 9), true),
            cand("d2-10", at(2026, 3, 2, 10), true),
            cand("d2-11", at(2026, 3, 2, 11), true),
            cand("d2-12", at(2026, 3, 2, 12), true),
            cand("mine", at(2026, 1, 1, 0), false),
        ];
        let p = Policy {
            keep_hourly: 2,
            keep_daily: 2,
            ..Default::default()
        };
        // Hourly keeps d2-12, d2-11; daily keeps d2-12 and d1-11.
        let gone = select_prune(&s, &p, false);
        assert_eq!(gone, vec!["d1-10", "d2-09", "d2-10"]);
        // Manual snapshots only go when asked.
        assert!(select_prune(&s, &p, true).contains(&"mine".to_string()));
        // No keep rule: nothing is pruned.
        assert!(select_prune(&s, &Policy::default(), true).is_empty());
    }

    #[test]
    fn weekly_monthly_yearly_and_last() {
        let s = vec![
            cand("2024", at(2024, 6, 1, 0), true),
            cand("2025a", at(2025, 2, 1, 0), true),
            cand("2025b", at(2025, 2, 20, 0), true),
            cand("2026", at(2026, 2, 1, 0), true),
        ];
        let y = Policy {
            keep_yearly: 2,
            ..Default::default()
        };
        assert_eq!(select_prune(&s, &y, false), vec!["2024", "2025a"]);
        let m = Policy {
            keep_monthly: 10,
            ..Default::default()
        };
        assert_eq!(select_prune(&s, &m, false), vec!["2025a"]);
        let l = Policy {
            keep_last: 1,
            ..Default::default()
        };
        assert_eq!(select_prune(&s, &l, false).len(), 3);
    }

    #[test]
    fn intervals_parse_with_units() {
        assert_eq!(parse_interval("1h"), Ok(3600));
        assert_eq!(parse_interval("90"), Ok(90));
        assert_eq!(parse_interval("2d"), Ok(172800));
        assert!(parse_interval("0s").is_err());
        assert!(parse_interval("1y").is_err());
        assert!(parse_interval("h").is_err());
    }
}

//! Observability (issue 14): `dedupfs status` on a mount and on the store
//! behind it, and the metrics page from the control socket and over HTTP.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;

use serde_json::{Value, json};

use crate::harness::*;

const SNAPCTL: &str = env!("CARGO_BIN_EXE_snapctl");

fn status_json(target: &std::path::Path) -> Value {
    let out = Command::new(BIN)
        .arg("status")
        .arg(target)
        .arg("--json")
        .output()
        .expect("running dedupfs status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status json")
}

fn http_get(port: u16, path: &str) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the metrics port");
    write!(c, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// The value of the sample `name` with label op=`op`.
fn by_op(samples: &[dedupfs::metrics::Sample], name: &str, op: &str) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l.iter().any(|(k, v)| k == "op" && v == op))
        .map(|s| s.2)
        .unwrap_or(0.0)
}

fn check_page(text: &str, from: &str) {
    let s = dedupfs::metrics::parse(text).unwrap_or_else(|e| panic!("{from}: {e}\n{text}"));
    for op in ["lookup", "write"] {
        let n = by_op(&s, "dedupfs_requests_total", op);
        assert!(n > 0.0, "{from}: no {op} requests counted\n{text}");
        // Every request lands in exactly one bucket.
        assert_eq!(
            by_op(&s, "dedupfs_request_duration_seconds_count", op),
            n,
            "{from}: {op}"
        );
    }
    let one = |name: &str| {
        s.iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("{from}: no {name}\n{text}"))
            .2
    };
    assert!(one("dedupfs_ingest_commits_total") >= 1.0, "{from}\n{text}");
    assert!(one("dedupfs_logical_bytes") >= 300_000.0, "{from}\n{text}");
    assert_eq!(one("dedupfs_snapshots"), 1.0, "{from}\n{text}");
    assert_eq!(one("dedupfs_ingest_queue_files"), 0.0, "{from}\n{text}");
}

#[test]
fn status_and_metrics_report_a_mount() {
    with_fs(|t| {
        // A free port, released for the daemon to take.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // nopassthrough: writes go through the daemon, so it counts them.
        t.options = vec!["nopassthrough".into(), format!("metrics=127.0.0.1:{port}")];
        t.mount();
        write_file(&t.p("a"), &vec![1u8; 200_000]);
        fs::create_dir(t.p("d")).unwrap();
        write_file(&t.p("d/b"), &vec![2u8; 100_000]);
        assert_eq!(read_file(&t.p("d/b")).len(), 100_000);
        assert!(fs::metadata(t.p("missing")).is_err());
        dedupfs::ctl::call(&t.store, "sync", json!({"all": true})).expect("sync");
        let snap = Command::new(SNAPCTL)
            .args(["-m", t.mnt.to_str().unwrap(), "create", "first"])
            .output()
            .unwrap();
        assert!(snap.status.success(), "{snap:?}");

        let s = status_json(&t.mnt);
        let canon = |p: &std::path::Path| fs::canonicalize(p).unwrap().display().to_string();
        assert_eq!(s["version"], 1, "{s}");
        assert_eq!(s["mounted"], true, "{s}");
        assert_eq!(s["store"], canon(&t.store), "{s}");
        assert_eq!(s["mountpoint"], canon(&t.mnt), "{s}");
        assert_eq!(s["transport"]["device"], "/dev/fuse", "{s}");
        assert_eq!(s["transport"]["passthrough"], false, "{s}");
        assert_eq!(s["ingest"]["queued_files"], 0, "{s}");
        assert_eq!(s["ingest"]["staged_files"], 0, "{s}");
        assert!(s["ingest"]["commits"].as_u64().unwrap() >= 1, "{s}");
        assert!(s["ingest"]["last_commit_unix"].as_i64().unwrap() > 0, "{s}");
        assert!(
            s["space"]["logical_bytes"].as_u64().unwrap() >= 300_000,
            "{s}"
        );
        assert!(s["space"]["stored_bytes"].as_u64().unwrap() > 0, "{s}");
        assert!(s["space"]["metadata_bytes"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["snapshots"]["count"], 1, "{s}");
        assert_eq!(s["snapshots"]["newest"]["name"], "first", "{s}");
        let r = &s["requests"];
        assert!(
            r["by_op"]["lookup"]["requests"].as_u64().unwrap() > 0,
            "{s}"
        );
        assert!(r["by_op"]["write"]["requests"].as_u64().unwrap() > 0, "{s}");
        assert!(
            r["total"].as_u64().unwrap() >= r["errors"].as_u64().unwrap(),
            "{s}"
        );
        // Through the store path too, and as text.
        assert_eq!(status_json(&t.store)["mountpoint"], canon(&t.mnt));
        let text = Command::new(BIN)
            .arg("status")
            .arg(&t.mnt)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("passthrough off"), "{text}");

        let page = dedupfs::ctl::call(&t.store, "metrics", Value::Null).expect("ctl metrics");
        check_page(page.as_str().expect("metrics text"), "ctl");
        let resp = http_get(port, "/metrics");
        let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        check_page(body, "http");
        assert!(t.log().contains(&format!(
            "serving metrics on http://127.0.0.1:{port}/metrics"
        )));

        t.umount();
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "metrics still served after the unmount"
        );
        let off = status_json(&t.store);
        assert_eq!(off["mounted"], false, "{off}");
        assert_eq!(off["store"], s["store"], "{off}");
        assert!(off["requests"].is_null(), "{off}");
        assert_eq!(off["snapshots"]["count"], 1, "{off}");
        assert_eq!(off["space"]["logical_bytes"], s["space"]["logical_bytes"]);
    });
}

#[test]
fn metrics_refuses_a_remote_address_without_metrics_remote() {
    with_fs(|t| {
        let out = Command::new(BIN)
            .arg("mount")
            .arg(&t.store)
            .arg(&t.mnt)
            .args(["-o", "metrics=0.0.0.0:0"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "mounted with metrics on 0.0.0.0");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("metrics_remote"), "{err}");
        assert!(!is_mounted(&t.mnt));
    });
}

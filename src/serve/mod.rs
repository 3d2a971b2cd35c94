//! `dedupfs serve`: the mirror target that many hosts share and none can
//! read (issue 15, docs/protocol.md, docs/security.md). Its own process,
//! its own directory: `DIR/target.redb` (clients, owner lists, pending
//! uploads, sealed roots) and `DIR/blobs/` (sealed blobs by name).
//! Client administration goes through `DIR/ctl.sock` while it runs and to
//! the database directly when it does not.
//!
//! Calls `seal`, `ctl`, `guard`; never `fs` or a local store.

pub mod blobs;
pub mod http;
pub mod target;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};

use target::Target;

/// Opens the target in `dir` with its directory blob store.
pub fn open(dir: &Path) -> Result<Target, String> {
    let blobs = blobs::DirStore::open(dir.join("blobs"))
        .map_err(|e| format!("{}: {e}", dir.join("blobs").display()))?;
    Target::open(dir, Box::new(blobs))
}

/// Serves `dir` on `listen` until SIGINT or SIGTERM.
pub fn run(dir: &Path, listen: SocketAddr) -> Result<(), String> {
    if !listen.ip().is_loopback() {
        return Err(format!(
            "{listen}: plain HTTP is served on loopback only, and TLS is not built yet; \
             listen on 127.0.0.1 or [::1] (and put a TLS proxy in front for now)"
        ));
    }
    let state = Arc::new(http::State {
        target: open(dir)?,
        counters: http::Counters::default(),
    });
    let admin_state = state.clone();
    let _ctl = crate::ctl::Server::start(
        dir,
        Arc::new(move |cmd: &str, args: &Value| admin(&admin_state.target, cmd, args)),
    )
    .map_err(|e| format!("control socket in {}: {e}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("serve")
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| format!("listening on {listen}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        log::info!("serving {} on http://{bound}", dir.display());
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(async {
                let term = async {
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(mut s) => {
                            s.recv().await;
                        }
                        Err(_) => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term => {},
                }
                log::info!("stopping");
            })
            .await
            .map_err(|e| e.to_string())
    })
}

/// One administration command (`client add|list|remove`), run in the
/// serving process or directly.
pub fn admin(t: &Target, cmd: &str, args: &Value) -> Result<Value, String> {
    let s = |k: &str| {
        args.get(k)
            .and_then(|v| v.as_str())
            .ok_or_else(|| format!("missing '{k}'"))
    };
    match cmd {
        "client_add" => {
            let quota = args.get("quota").and_then(|v| v.as_u64());
            t.client_add(s("name")?, s("key")?, quota)?;
            Ok(json!({"added": s("name")?}))
        }
        "client_list" => serde_json::to_value(t.client_list()?).map_err(|e| e.to_string()),
        "client_remove" => {
            let freed = t.client_remove(s("name")?)?;
            Ok(json!({"removed": s("name")?, "blobs_freed": freed}))
        }
        other => Err(format!("unknown command '{other}'")),
    }
}

/// Runs an administration command: through the serving process when one
/// holds `dir`, else on the database directly.
pub fn admin_call(dir: &Path, cmd: &str, args: Value) -> Result<Value, String> {
    if crate::ctl::socket_path(dir).exists() {
        match crate::ctl::call(dir, cmd, args.clone()) {
            Ok(v) => return Ok(v),
            // A socket nobody answers: a server that died; go direct.
            Err(e) if e.contains("connect") || e.contains("refused") => {}
            Err(e) => return Err(e),
        }
    }
    let t = open(dir)?;
    admin(&t, cmd, &args)
}

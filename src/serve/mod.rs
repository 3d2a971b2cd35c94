//! `dedupfs serve`: the mirror target that many hosts share and none can
//! read (issue 15, docs/protocol.md, docs/security.md). Its own process,
//! its own directory: `DIR/target.redb` (clients, owner lists, pending
//! uploads, sealed roots) and `DIR/blobs/` (sealed blobs by name).
//! Client administration goes through `DIR/ctl.sock` while it runs and to
//! the database directly when it does not.
//!
//! Calls `seal`, `ctl`, `guard`, `tlsconf`; never `fs` or a local store.

pub mod blobs;
pub mod http;
pub mod target;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Value, json};

use target::Target;

/// Opens the target in `dir` with its directory blob store.
pub fn open(dir: &Path) -> Result<Target, String> {
    let blobs = blobs::DirStore::open(dir.join("blobs"))
        .map_err(|e| format!("{}: {e}", dir.join("blobs").display()))?;
    Target::open(dir, Box::new(blobs))
}

/// The certificate chain and private key (PEM files) to serve HTTPS with.
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Serves `dir` on `listen` until SIGINT or SIGTERM: HTTPS with `tls`,
/// plain HTTP without, and then only on a loopback address.
pub fn run(dir: &Path, listen: SocketAddr, tls: Option<TlsFiles>) -> Result<(), String> {
    if tls.is_none() && !listen.ip().is_loopback() {
        return Err(format!(
            "{listen}: plain HTTP is served on loopback only; give --tls-cert FILE \
             --tls-key FILE to serve HTTPS there, or listen on 127.0.0.1 or [::1]"
        ));
    }
    // Bad certificate files are found before anything is opened or bound.
    let tls_config = match &tls {
        Some(f) => Some(crate::tlsconf::server_config(&f.cert, &f.key)?),
        None => None,
    };
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
        let router = http::router(state);
        let served = match tls_config {
            Some(config) => {
                let listener = tls::TlsListener::start(listener, config)
                    .map_err(|e| format!("listening on {listen}: {e}"))?;
                log::info!("serving {} on https://{bound}", dir.display());
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop_signal())
                    .await
            }
            None => {
                log::info!("serving {} on http://{bound}", dir.display());
                axum::serve(listener, router)
                    .with_graceful_shutdown(stop_signal())
                    .await
            }
        };
        served.map_err(|e| e.to_string())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
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

//! The target's HTTP face (docs/protocol.md): one handler that reads the
//! body within its limit, checks the signature and routes, running the
//! target's (blocking) work on tokio's blocking pool. Async stays inside
//! `serve`, its own process.
//!
//! Calls `serve::target`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::{Body, Bytes, HttpBody as _};
use axum::http::{HeaderMap, Method, Request, Response, StatusCode};

use super::target::{self, Commit, Refusal, Target};

/// Requests answered, by status class, for /metrics.
#[derive(Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub refused: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

pub struct State {
    pub target: Target,
    pub counters: Counters,
}

pub fn router(state: Arc<State>) -> axum::Router {
    axum::Router::new().fallback(move |req: Request<Body>| {
        let state = state.clone();
        async move { handle(state, req).await }
    })
}

fn reply(status: u16, ctype: &str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert("content-type", v);
    }
    r
}

fn json(status: u16, v: &serde_json::Value) -> Response<Body> {
    reply(status, "application/json", v.to_string().into_bytes())
}

fn refusal(r: &Refusal) -> Response<Body> {
    let mut v = serde_json::json!({"error": r.code, "message": r.message});
    if let (Some(o), Some(extra)) = (v.as_object_mut(), r.extra.as_object()) {
        for (k, x) in extra {
            o.insert(k.clone(), x.clone());
        }
    }
    json(r.status, &v)
}

async fn handle(state: Arc<State>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_string(), |p| p.as_str().to_string());
    let limit = if parts.method == Method::PUT {
        target::BLOB_MAX
    } else {
        target::JSON_MAX
    };
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return refusal(&Refusal::new(
                413,
                "too_large",
                format!("the body is over {limit} bytes"),
            ));
        }
    };
    state
        .counters
        .bytes_in
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let st = state.clone();
    let method = parts.method.clone();
    let headers = parts.headers.clone();
    let res = tokio::task::spawn_blocking(move || {
        crate::guard::catch(|| route(&st, &method, &path, &headers, &body))
            .unwrap_or_else(|_| Err(Refusal::new(500, "internal", "internal error")))
    })
    .await
    .unwrap_or_else(|_| Err(Refusal::new(500, "internal", "internal error")));
    match res {
        Ok(r) => {
            state.counters.ok.fetch_add(1, Ordering::Relaxed);
            let n = r.body().size_hint().exact().unwrap_or(0);
            state.counters.bytes_out.fetch_add(n, Ordering::Relaxed);
            r
        }
        Err(r) => {
            state.counters.refused.fetch_add(1, Ordering::Relaxed);
            refusal(&r)
        }
    }
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn route(
    st: &State,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response<Body>, Refusal> {
    let t = &st.target;
    let bare = path.split('?').next().unwrap_or(path);
    if method == Method::GET && bare == "/v1/info" {
        return Ok(json(
            200,
            &serde_json::json!({
                "server": concat!("dedupfs ", env!("CARGO_PKG_VERSION")),
                "protocols": [1],
                "limits": {"blob_max": target::BLOB_MAX, "json_max": target::JSON_MAX,
                           "have_max": target::HAVE_MAX, "skew_secs": target::SKEW_SECS},
                "private_have": false,
            }),
        ));
    }
    if method == Method::GET && bare == "/metrics" {
        return metrics(st);
    }
    if !bare.starts_with("/v1/") {
        return Err(Refusal::new(
            404,
            "not_found",
            format!("no such path {bare:.100}"),
        ));
    }
    let signed = target::Signed {
        client: header(headers, "dedupfs-client"),
        time: header(headers, "dedupfs-time"),
        nonce: header(headers, "dedupfs-nonce"),
        signature: header(headers, "dedupfs-signature"),
    };
    let client = t.authenticate(&signed, method.as_str(), path, body)?;
    t.seen(&client);
    let parse = |what: &str| -> Result<serde_json::Value, Refusal> {
        serde_json::from_slice(body)
            .map_err(|e| Refusal::new(400, "bad_request", format!("{what}: {e}")))
    };
    let segs: Vec<&str> = bare.trim_start_matches("/v1/").split('/').collect();
    match (method.as_str(), segs.as_slice()) {
        ("POST", ["have"]) => {
            let v = parse("have")?;
            let names: Vec<String> = serde_json::from_value(v["names"].clone())
                .map_err(|e| Refusal::new(400, "bad_request", format!("names: {e}")))?;
            let missing = t.have(&names)?;
            Ok(json(200, &serde_json::json!({"missing": missing})))
        }
        ("PUT", ["blobs", name]) => {
            let new = t.put(&client, name, body)?;
            Ok(json(if new { 201 } else { 200 }, &serde_json::json!({})))
        }
        ("GET", ["blobs", name]) => Ok(reply(
            200,
            "application/octet-stream",
            t.get(&client, name)?,
        )),
        ("POST", ["commit"]) => {
            let c: Commit = serde_json::from_slice(body)
                .map_err(|e| Refusal::new(400, "bad_request", format!("commit: {e}")))?;
            let r = t.commit(&client, &c)?;
            Ok(json(
                200,
                &serde_json::json!({"seq": r.seq, "referenced_bytes": r.referenced_bytes}),
            ))
        }
        ("GET", ["roots"]) => {
            let roots: Vec<serde_json::Value> = t
                .roots(&client)?
                .into_iter()
                .map(|(id, size, seq)| serde_json::json!({"id": id, "size": size, "seq": seq}))
                .collect();
            Ok(json(200, &serde_json::json!({"roots": roots})))
        }
        ("GET", ["roots", id]) => Ok(reply(200, "application/octet-stream", t.root(&client, id)?)),
        ("GET", ["client"]) => {
            let r = t.account(&client)?;
            Ok(json(
                200,
                &serde_json::json!({"name": client, "seq": r.seq,
                    "referenced_bytes": r.referenced_bytes, "pending_bytes": r.pending_bytes,
                    "quota": r.quota, "last_seen": r.last_seen}),
            ))
        }
        _ => Err(Refusal::new(
            404,
            "not_found",
            format!("no request {method} {bare:.100}"),
        )),
    }
}

fn metrics(st: &State) -> Result<Response<Body>, Refusal> {
    let (blobs, bytes, clients) = st.target.totals()?;
    let c = &st.counters;
    let mut out = String::new();
    for (name, kind, help, v) in [
        (
            "dedupfs_serve_requests_ok_total",
            "counter",
            "Requests answered with success.",
            c.ok.load(Ordering::Relaxed),
        ),
        (
            "dedupfs_serve_requests_refused_total",
            "counter",
            "Requests refused.",
            c.refused.load(Ordering::Relaxed),
        ),
        (
            "dedupfs_serve_bytes_in_total",
            "counter",
            "Request body bytes received.",
            c.bytes_in.load(Ordering::Relaxed),
        ),
        (
            "dedupfs_serve_bytes_out_total",
            "counter",
            "Response body bytes sent.",
            c.bytes_out.load(Ordering::Relaxed),
        ),
        ("dedupfs_serve_blobs", "gauge", "Blobs stored.", blobs),
        (
            "dedupfs_serve_blob_bytes",
            "gauge",
            "Bytes of stored blobs.",
            bytes,
        ),
        (
            "dedupfs_serve_clients",
            "gauge",
            "Registered clients.",
            clients,
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    }
    Ok(reply(200, "text/plain; version=0.0.4", out.into_bytes()))
}

//! The mirror's side of docs/protocol.md: signed requests to a target,
//! refusals as typed errors, and retries of what the protocol says to
//! retry (429, 500, 503, transport errors) with exponential backoff.
//! Blocking (ureq); several uploads run at once on scoped threads.
//!
//! Calls `seal` (signatures) and `mirror::wire` (names); never `fs`.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::wire::{Name, hex, parse_hex};

/// Why a request to a target failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target refused it (docs/protocol.md, "Errors").
    #[error("{url}: {status} {code}: {message}")]
    Refused {
        url: String,
        status: u16,
        code: String,
        message: String,
        extra: Value,
    },
    /// The target could not be reached, or broke off.
    #[error("{url}: {why}")]
    Transport { url: String, why: String },
    /// The target answered something the protocol does not allow.
    #[error("{url}: bad reply: {why}")]
    BadReply { url: String, why: String },
}

impl Error {
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    fn retryable(&self) -> bool {
        match self {
            Error::Refused { status, .. } => matches!(status, 429 | 500 | 503),
            Error::Transport { .. } => true,
            Error::BadReply { .. } => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The account a target keeps for this host (`GET /v1/client`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Account {
    pub name: String,
    pub seq: u64,
    pub referenced_bytes: u64,
    pub pending_bytes: u64,
    pub quota: Option<u64>,
    pub last_seen: i64,
}

/// One commit's body (docs/protocol.md, `POST /v1/commit`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CommitBody {
    pub seq: u64,
    pub add: Vec<(String, u64)>,
    pub drop: Vec<(String, u64)>,
    pub roots_put: Vec<RootPut>,
    pub roots_drop: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RootPut {
    pub id: String,
    pub sealed: String,
}

/// A target as one host sees it.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    name: String,
    key: SigningKey,
    /// Attempts per request for retryable failures (the first included).
    pub attempts: u32,
    /// Bytes of request bodies sent, and of reply bodies read.
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

const REPLY_MAX: u64 = 32 << 20;

fn nonce() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: a nonce unique to this process and moment
        // still never repeats for this client.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = (t ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Client {
    /// `base` is the target's URL ("https://host:port"); `name` the name
    /// the target registered this host under.
    pub fn new(agent: ureq::Agent, base: &str, name: &str, key: SigningKey) -> Client {
        Client {
            agent,
            base: base.trim_end_matches('/').to_string(),
            name: name.to_string(),
            key,
            attempts: 5,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    /// A request with retries of what may succeed later: 1 s, doubling.
    fn call(&self, method: &str, path: &str, body: &[u8], signed: bool) -> Result<(u16, Vec<u8>)> {
        let mut wait = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            match self.once(method, path, body, signed) {
                Err(e) if e.retryable() && attempt < self.attempts => {
                    log::info!("{e}; retrying in {} s", wait.as_secs());
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(Duration::from_secs(300));
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn once(&self, method: &str, path: &str, body: &[u8], signed: bool) -> Result<(u16, Vec<u8>)> {
        let url = format!("{}{path}", self.base);
        let transport = |e: ureq::Error| Error::Transport {
            url: url.clone(),
            why: e.to_string(),
        };
        let mut headers: Vec<(&str, String)> = Vec::new();
        if signed {
            let time = unix_now();
            let nonce = nonce();
            let msg = crate::seal::request_message(method, path, time, &nonce, body);
            let sig = crate::seal::sign_request(&self.key, &msg);
            headers.push(("dedupfs-client", self.name.clone()));
            headers.push(("dedupfs-time", time.to_string()));
            headers.push(("dedupfs-nonce", nonce));
            headers.push((
                "dedupfs-signature",
                base64::engine::general_purpose::STANDARD.encode(sig),
            ));
        }
        let res = if method == "GET" {
            let mut r = self.agent.get(&url);
            for (k, v) in &headers {
                r = r.header(*k, v);
            }
            r.call()
        } else {
            let mut r = if method == "PUT" {
                self.agent.put(&url)
            } else {
                self.agent.post(&url)
            };
            for (k, v) in &headers {
                r = r.header(*k, v);
            }
            let ctype = if path.starts_with("/v1/blobs/") {
                "application/octet-stream"
            } else {
                "application/json"
            };
            r.header("content-type", ctype).send(body)
        };
        let mut res = res.map_err(transport)?;
        self.sent.fetch_add(body.len() as u64, Ordering::Relaxed);
        let mut out = Vec::new();
        res.body_mut()
            .with_config()
            .limit(REPLY_MAX)
            .reader()
            .read_to_end(&mut out)
            .map_err(|e| Error::Transport {
                url: url.clone(),
                why: e.to_string(),
            })?;
        self.received.fetch_add(out.len() as u64, Ordering::Relaxed);
        let status = res.status().as_u16();
        if status >= 400 {
            let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
            let code = v["error"].as_str().unwrap_or("unknown").to_string();
            let message = v["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&out).chars().take(200).collect());
            return Err(Error::Refused {
                url,
                status,
                code,
                message,
                extra: v,
            });
        }
        Ok((status, out))
    }

    fn json(&self, method: &str, path: &str, body: &Value) -> Result<Value> {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let (_, out) = self.call(
            method,
            path,
            if method == "GET" { b"" } else { &bytes },
            true,
        )?;
        serde_json::from_slice(&out).map_err(|e| self.bad(path, e))
    }

    fn bad(&self, path: &str, why: impl std::fmt::Display) -> Error {
        Error::BadReply {
            url: format!("{}{path}", self.base),
            why: why.to_string(),
        }
    }

    /// `GET /v1/info` (unsigned): the protocols the target speaks.
    pub fn info(&self) -> Result<Value> {
        let (_, out) = self.call("GET", "/v1/info", b"", false)?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| self.bad("/v1/info", e))?;
        let speaks_v1 = v["protocols"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p.as_u64() == Some(1)));
        if !speaks_v1 {
            return Err(self.bad("/v1/info", "the target does not speak protocol v1"));
        }
        Ok(v)
    }

    pub fn account(&self) -> Result<Account> {
        let v = self.json("GET", "/v1/client", &Value::Null)?;
        serde_json::from_value(v).map_err(|e| self.bad("/v1/client", e))
    }

    /// Which of `names` the target says it lacks (a hint).
    pub fn have(&self, names: &[Name]) -> Result<Vec<Name>> {
        let list: Vec<String> = names.iter().map(hex).collect();
        let v = self.json("POST", "/v1/have", &serde_json::json!({ "names": list }))?;
        let missing = v["missing"]
            .as_array()
            .ok_or_else(|| self.bad("/v1/have", "no 'missing' list"))?;
        missing
            .iter()
            .map(|m| {
                m.as_str()
                    .and_then(parse_hex)
                    .ok_or_else(|| self.bad("/v1/have", "a malformed name"))
            })
            .collect()
    }

    /// Uploads a sealed blob; true when the target did not hold it yet.
    pub fn put(&self, name: &Name, sealed: &[u8]) -> Result<bool> {
        let (status, _) = self.call("PUT", &format!("/v1/blobs/{}", hex(name)), sealed, true)?;
        Ok(status == 201)
    }

    /// Fetches a blob and checks it against its name.
    pub fn get(&self, name: &Name) -> Result<Vec<u8>> {
        let path = format!("/v1/blobs/{}", hex(name));
        let (_, out) = self.call("GET", &path, b"", true)?;
        if crate::seal::blob_name(&out) != *name {
            return Err(self.bad(&path, "the blob's bytes do not match its name"));
        }
        Ok(out)
    }

    /// Sends a commit; the reply's referenced bytes.
    pub fn commit(&self, c: &CommitBody) -> Result<u64> {
        let body = serde_json::to_value(c).map_err(|e| self.bad("/v1/commit", e))?;
        let v = self.json("POST", "/v1/commit", &body)?;
        Ok(v["referenced_bytes"].as_u64().unwrap_or(0))
    }

    /// This host's roots: (id, size, seq).
    pub fn roots(&self) -> Result<Vec<(Name, u64, u64)>> {
        let v = self.json("GET", "/v1/roots", &Value::Null)?;
        let list = v["roots"]
            .as_array()
            .ok_or_else(|| self.bad("/v1/roots", "no 'roots' list"))?;
        list.iter()
            .map(|r| {
                let id = r["id"].as_str().and_then(parse_hex);
                match (id, r["size"].as_u64(), r["seq"].as_u64()) {
                    (Some(id), Some(size), Some(seq)) => Ok((id, size, seq)),
                    _ => Err(self.bad("/v1/roots", "a malformed root")),
                }
            })
            .collect()
    }

    pub fn root(&self, id: &Name) -> Result<Vec<u8>> {
        Ok(self
            .call("GET", &format!("/v1/roots/{}", hex(id)), b"", true)?
            .1)
    }
}

//! `dedupfs serve` over real HTTP on loopback: a client registered while
//! the target runs, signed requests answered, and every refusal of
//! docs/protocol.md's list with its code and nothing changed.

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use dedupfs::format::{BlobHeader, ChunkId, Compression, Sealing};
use dedupfs::seal::{HostKeys, KdfParams};

const BIN: &str = env!("CARGO_BIN_EXE_dedupfs");

/// The server, killed and reaped when dropped (a failing test included).
struct Server {
    child: Child,
    base: String,
    port: u16,
    agent: ureq::Agent,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `dedupfs serve` on a free loopback port with `extra` arguments
/// and waits until it accepts connections.
fn spawn(dir: &Path, extra: &[&std::ffi::OsStr], scheme: &str, agent: ureq::Agent) -> Server {
    let port = free_port();
    let child = Command::new(BIN)
        .args(["serve", "--store"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut s = Server {
        child,
        base: format!("{scheme}://127.0.0.1:{port}"),
        port,
        agent,
    };
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            s.child.try_wait().unwrap().is_none(),
            "serve exited before listening"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "serve did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s
}

fn start(dir: &Path) -> Server {
    spawn(dir, &[], "http", dedupfs::tlsconf::agent(None).unwrap())
}

/// A certificate for 127.0.0.1 and localhost, self-signed, written as
/// `cert.pem` and `key.pem` in `dir`; returns the certificate's PEM.
fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key, ck.cert.pem())
}

/// Starts the server on HTTPS with the certificate in `cert` and `key`,
/// its agent trusting `ca`.
fn start_tls(dir: &Path, cert: &Path, key: &Path, ca: &str) -> Server {
    spawn(
        dir,
        &[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
        "https",
        dedupfs::tlsconf::agent(Some(ca.as_bytes())).unwrap(),
    )
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn keys(host: &str) -> HostKeys {
    let cheap = KdfParams {
        mem_kib: 64,
        passes: 1,
        lanes: 1,
    };
    HostKeys::derive(b"pass", host, cheap).unwrap()
}

struct Reply {
    status: u16,
    body: Vec<u8>,
}

impl Reply {
    fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        v["error"].as_str().unwrap_or("").to_string()
    }
}

/// Sends a request signed by `k` as `who`, with this nonce (random when
/// None) and time offset.
fn send(
    s: &Server,
    k: Option<(&str, &HostKeys)>,
    method: &str,
    path: &str,
    body: &[u8],
    nonce: Option<&str>,
) -> Reply {
    let a = s.agent.clone();
    let url = format!("{}{path}", s.base);
    let mut headers: Vec<(String, String)> = Vec::new();
    if let Some((who, k)) = k {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let nonce = nonce.map(str::to_string).unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            format!("{:032x}", t ^ (std::process::id() as u128) << 64)
        });
        let msg = dedupfs::seal::request_message(method, path, time, &nonce, body);
        let sig = dedupfs::seal::sign_request(&k.signing, &msg);
        headers.push(("dedupfs-client".into(), who.into()));
        headers.push(("dedupfs-time".into(), time.to_string()));
        headers.push(("dedupfs-nonce".into(), nonce));
        headers.push((
            "dedupfs-signature".into(),
            base64::engine::general_purpose::STANDARD.encode(sig),
        ));
    }
    let res = match method {
        "GET" => {
            let mut r = a.get(&url);
            for (k, v) in &headers {
                r = r.header(k, v);
            }
            r.call()
        }
        "PUT" | "POST" => {
            let mut r = if method == "PUT" {
                a.put(&url)
            } else {
                a.post(&url)
            };
            for (k, v) in &headers {
                r = r.header(k, v);
            }
            r.send(body)
        }
        _ => unreachable!(),
    };
    let mut res = res.unwrap();
    let mut out = Vec::new();
    res.body_mut()
        .with_config()
        .limit(64 << 20)
        .reader()
        .read_to_end(&mut out)
        .unwrap();
    Reply {
        status: res.status().as_u16(),
        body: out,
    }
}

fn sealed(data: &[u8]) -> (String, Vec<u8>) {
    let h = BlobHeader {
        compression: Compression::None,
        sealing: Sealing::None,
        raw_len: data.len() as u32,
    };
    let mut b = h.encode().to_vec();
    b.extend_from_slice(data);
    let s = dedupfs::seal::seal_chunk(&b, &ChunkId::of(data), b"").unwrap();
    (hex(&dedupfs::seal::blob_name(&s)), s)
}

fn admin(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["serve", "--store"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn the_target_answers_signed_requests_and_refuses_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("target");
    let s = start(&dir);
    let a = keys("a");
    let b = keys("b");
    // Registered while the target runs (through its control socket).
    for (name, k) in [("a", &a), ("b", &b)] {
        let out = admin(
            &dir,
            &["client", "add", name, "--key", &hex(k.public().as_bytes())],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let info = send(&s, None, "GET", "/v1/info", b"", None);
    assert_eq!(info.status, 200);
    assert!(String::from_utf8_lossy(&info.body).contains("\"protocols\":[1]"));

    let (name, blob) = sealed(&[5u8; 5000]);
    let path = format!("/v1/blobs/{name}");
    // Refused, each with its code: unsigned, wrong key, body changed.
    let r = send(&s, None, "PUT", &path, &blob, None);
    assert_eq!((r.status, r.code().as_str()), (401, "unsigned"));
    let r = send(&s, Some(("a", &b)), "PUT", &path, &blob, None);
    assert_eq!((r.status, r.code().as_str()), (401, "bad_signature"));
    let mut other = blob.clone();
    other[20] ^= 1;
    let r = send(&s, Some(("a", &a)), "PUT", &path, &other, None);
    assert_eq!((r.status, r.code().as_str()), (422, "name_mismatch"));
    let have = serde_json::json!({"names": [name]}).to_string();
    let r = send(
        &s,
        Some(("a", &a)),
        "POST",
        "/v1/have",
        have.as_bytes(),
        None,
    );
    assert!(
        String::from_utf8_lossy(&r.body).contains(&name),
        "nothing stored yet"
    );
    // Stored, then a replay of the same request is refused.
    let nonce = "00112233445566778899aabbccddeeff";
    let r = send(&s, Some(("a", &a)), "PUT", &path, &blob, Some(nonce));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = send(&s, Some(("a", &a)), "PUT", &path, &blob, Some(nonce));
    assert_eq!((r.status, r.code().as_str()), (401, "replayed"));
    // An oversized body.
    let big = vec![0u8; (16 << 20) + 1];
    let r = send(&s, Some(("a", &a)), "PUT", &path, &big, None);
    assert_eq!((r.status, r.code().as_str()), (413, "too_large"));
    // b cannot read a's pending blob, nor drop references it lacks.
    let r = send(&s, Some(("b", &b)), "GET", &path, b"", None);
    assert_eq!((r.status, r.code().as_str()), (404, "no_such_blob"));
    let drop = serde_json::json!({"seq": 1, "drop": [[name, 1]]}).to_string();
    let r = send(
        &s,
        Some(("b", &b)),
        "POST",
        "/v1/commit",
        drop.as_bytes(),
        None,
    );
    assert_eq!((r.status, r.code().as_str()), (403, "not_owner"));
    // a commits its reference with a root; b references the same blob
    // without sending it, and reads it back.
    let root = base64::engine::general_purpose::STANDARD.encode(b"sealed root");
    let commit = serde_json::json!({"seq": 1, "add": [[name, 1]],
        "roots_put": [{"id": hex(&[3u8; 32]), "sealed": root}]})
    .to_string();
    let r = send(
        &s,
        Some(("a", &a)),
        "POST",
        "/v1/commit",
        commit.as_bytes(),
        None,
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let add = serde_json::json!({"seq": 1, "add": [[name, 1]]}).to_string();
    let r = send(
        &s,
        Some(("b", &b)),
        "POST",
        "/v1/commit",
        add.as_bytes(),
        None,
    );
    assert_eq!(r.status, 200);
    let r = send(&s, Some(("b", &b)), "GET", &path, b"", None);
    assert_eq!((r.status, r.body == blob), (200, true));
    // Roots are private to their client.
    let r = send(&s, Some(("b", &b)), "GET", "/v1/roots", b"", None);
    assert_eq!(r.status, 200);
    assert!(!String::from_utf8_lossy(&r.body).contains(&hex(&[3u8; 32])));
    let r = send(
        &s,
        Some(("a", &a)),
        "GET",
        &format!("/v1/roots/{}", hex(&[3u8; 32])),
        b"",
        None,
    );
    assert_eq!((r.status, r.body.as_slice()), (200, &b"sealed root"[..]));
    let r = send(&s, Some(("a", &a)), "GET", "/v1/client", b"", None);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["seq"], 1);
    assert_eq!(v["referenced_bytes"], blob.len() as u64);
    // Metrics, unsigned.
    let r = send(&s, None, "GET", "/metrics", b"", None);
    let text = String::from_utf8_lossy(&r.body);
    assert!(text.contains("dedupfs_serve_blobs 1"), "{text}");
    assert!(text.contains("dedupfs_serve_clients 2"), "{text}");
    // Listed while running, with --json.
    let out = admin(&dir, &["client", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    drop_server(s);
    // Stopped: administration works on the database directly.
    let out = admin(&dir, &["client", "remove", "a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin(&dir, &["client", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
}

fn drop_server(s: Server) {
    drop(s);
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--store"])
        .arg(d.path())
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("loopback") && err.contains("--tls-cert"),
        "{err}"
    );
}

/// The rustls error behind a failed request, if a TLS failure it was.
fn tls_error(e: &ureq::Error) -> Option<&tokio_rustls::rustls::Error> {
    match e {
        ureq::Error::Rustls(r) => Some(r),
        ureq::Error::Io(io) => io.get_ref()?.downcast_ref(),
        _ => None,
    }
}

#[test]
fn https_answers_a_client_that_trusts_its_certificate_and_no_other() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("target");
    let (cert, key, ca) = self_signed(d.path());
    let s = start_tls(&dir, &cert, &key, &ca);
    let info = send(&s, None, "GET", "/v1/info", b"", None);
    assert_eq!(info.status, 200);
    assert!(String::from_utf8_lossy(&info.body).contains("\"protocols\":[1]"));
    // A signed request, from a client registered while it runs.
    let a = keys("a");
    let out = admin(
        &dir,
        &["client", "add", "a", "--key", &hex(a.public().as_bytes())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = send(&s, Some(("a", &a)), "GET", "/v1/client", b"", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["name"], "a");

    // Not trusted: the built-in roots, or another self-signed certificate.
    let url = format!("{}/v1/info", s.base);
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let other_ca = self_signed(&other).2;
    for agent in [
        dedupfs::tlsconf::agent(None).unwrap(),
        dedupfs::tlsconf::agent(Some(other_ca.as_bytes())).unwrap(),
    ] {
        let e = agent.get(&url).call().unwrap_err();
        assert!(
            matches!(
                tls_error(&e),
                Some(tokio_rustls::rustls::Error::InvalidCertificate(_))
            ),
            "{e:?}"
        );
    }
    // Plain HTTP to the TLS port gets no answer.
    let plain = format!("http://127.0.0.1:{}/v1/info", s.port);
    assert!(s.agent.get(&plain).call().is_err());
}

#[test]
fn https_is_tls_1_3_and_offers_h2_then_http_1_1() {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let d = tempfile::tempdir().unwrap();
    let (cert, key, ca) = self_signed(d.path());
    let s = start_tls(&d.path().join("target"), &cert, &key, &ca);
    for (offer, chosen) in [
        (vec![b"h2".to_vec(), b"http/1.1".to_vec()], &b"h2"[..]),
        (vec![b"http/1.1".to_vec()], &b"http/1.1"[..]),
    ] {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(dedupfs::tlsconf::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = offer;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", s.port)).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).unwrap();
        }
        assert_eq!(conn.alpn_protocol(), Some(chosen));
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
    }
}

fn serve_fails(dir: &Path, extra: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--store"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tls_needs_both_files_and_names_a_bad_one() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("target");
    let (cert, key, _) = self_signed(d.path());
    let err = serve_fails(&dir, &["--tls-cert".as_ref(), cert.as_os_str()]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = serve_fails(&dir, &["--tls-key".as_ref(), key.as_os_str()]);
    assert!(err.contains("--tls-cert"), "{err}");
    // The key where the certificate should be, and the other way round.
    let err = serve_fails(
        &dir,
        &[
            "--tls-cert".as_ref(),
            key.as_os_str(),
            "--tls-key".as_ref(),
            key.as_os_str(),
        ],
    );
    assert!(
        err.contains("key.pem") && err.contains("no certificate"),
        "{err}"
    );
    let err = serve_fails(
        &dir,
        &[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            cert.as_os_str(),
        ],
    );
    assert!(
        err.contains("cert.pem") && err.contains("no private key"),
        "{err}"
    );
    // A key that is not the certificate's.
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, other_key, _) = self_signed(&other);
    let err = serve_fails(
        &dir,
        &[
            "--tls-cert".as_ref(),
            cert.as_os_str(),
            "--tls-key".as_ref(),
            other_key.as_os_str(),
        ],
    );
    assert!(err.contains("--tls-key"), "{err}");
}

//! Keys and sealing for untrusted remotes (design decision 8,
//! docs/security.md): the host's keys derived from a passphrase and its
//! name, convergent sealing of chunk blobs (the same chunk seals to the
//! same bytes on every host), deterministic sealing of metadata with the
//! host's key, blob names (BLAKE3 of the sealed bytes) and the signatures
//! of requests (docs/protocol.md, "Authentication").
//!
//! Pure functions over bytes: calls `format` only.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

use crate::format::{BLOB_HEADER_LEN, BlobHeader, ChunkId, Sealing};

/// Why sealing or a check failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key derivation: {0}")]
    Kdf(String),
    #[error("blob: {0}")]
    Blob(String),
    /// The bytes were not sealed under this key, or were changed.
    #[error("sealed bytes do not open under this key (damaged or not ours)")]
    Open,
    #[error("bad signature")]
    Signature,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Argon2id's cost. Fixed per protocol version: recovery has nothing but
/// the passphrase and the host name to go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KdfParams {
    pub mem_kib: u32,
    pub passes: u32,
    pub lanes: u32,
}

impl KdfParams {
    /// Protocol v1: 256 MiB, 3 passes, 1 lane.
    pub const V1: KdfParams = KdfParams {
        mem_kib: 256 * 1024,
        passes: 3,
        lanes: 1,
    };
}

/// What a host derives from its passphrase and name.
pub struct HostKeys {
    pub signing: SigningKey,
    /// Seals trees and roots (deterministically, per host).
    pub meta_key: [u8; 32],
}

impl HostKeys {
    pub fn derive(passphrase: &[u8], host: &str, p: KdfParams) -> Result<HostKeys> {
        let params = argon2::Params::new(p.mem_kib, p.passes, p.lanes, Some(32))
            .map_err(|e| Error::Kdf(e.to_string()))?;
        let kdf = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = format!("dedupfs/v1/host/{host}");
        let mut master = [0u8; 32];
        kdf.hash_password_into(passphrase, salt.as_bytes(), &mut master)
            .map_err(|e| Error::Kdf(e.to_string()))?;
        let seed = blake3::derive_key("dedupfs v1 signing", &master);
        let meta_key = blake3::derive_key("dedupfs v1 metadata", &master);
        Ok(HostKeys {
            signing: SigningKey::from_bytes(&seed),
            meta_key,
        })
    }

    pub fn public(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }
}

/// A blob's public name: BLAKE3 of its sealed bytes, so the target checks
/// every blob against its name without a key.
pub fn blob_name(sealed: &[u8]) -> [u8; 32] {
    *blake3::hash(sealed).as_bytes()
}

/// The key of a chunk: anyone holding the chunk (and the convergence
/// secret, empty by default) derives it; nobody else can.
pub fn chunk_key(secret: &[u8], id: &ChunkId) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dedupfs v1 chunk");
    // The secret's length first, so (secret, id) pairs never run together.
    h.update(&(secret.len() as u64).to_le_bytes());
    h.update(secret);
    h.update(&id.0);
    *h.finalize().as_bytes()
}

fn cipher(key: &[u8; 32]) -> Aes256GcmSiv {
    Aes256GcmSiv::new(key.into())
}

/// Seals a stored blob (header + payload, unsealed) of chunk `id` for an
/// untrusted remote: the same header marked sealed, then the payload
/// under the chunk's key. Deterministic: one key seals one plaintext, so
/// the fixed nonce never meets a second message.
pub fn seal_chunk(blob: &[u8], id: &ChunkId, secret: &[u8]) -> Result<Vec<u8>> {
    let mut h = BlobHeader::decode(blob).map_err(|e| Error::Blob(e.to_string()))?;
    if h.sealing != Sealing::None {
        return Err(Error::Blob("already sealed".into()));
    }
    h.sealing = Sealing::Convergent;
    let head = h.encode();
    let ct = cipher(&chunk_key(secret, id))
        .encrypt(
            &Nonce::from([0u8; 12]),
            Payload {
                msg: &blob[BLOB_HEADER_LEN..],
                aad: &head,
            },
        )
        .map_err(|_| Error::Blob("sealing failed".into()))?;
    let mut out = Vec::with_capacity(BLOB_HEADER_LEN + ct.len());
    out.extend_from_slice(&head);
    out.extend_from_slice(&ct);
    Ok(out)
}

/// Opens a sealed chunk blob back into the stored blob it was sealed from
/// (the caller decodes it and checks the chunk's SHA-1).
pub fn open_chunk(sealed: &[u8], id: &ChunkId, secret: &[u8]) -> Result<Vec<u8>> {
    let mut h = BlobHeader::decode(sealed).map_err(|e| Error::Blob(e.to_string()))?;
    if h.sealing != Sealing::Convergent {
        return Err(Error::Blob("not a sealed blob".into()));
    }
    let pt = cipher(&chunk_key(secret, id))
        .decrypt(
            &Nonce::from([0u8; 12]),
            Payload {
                msg: &sealed[BLOB_HEADER_LEN..],
                aad: &sealed[..BLOB_HEADER_LEN],
            },
        )
        .map_err(|_| Error::Open)?;
    h.sealing = Sealing::None;
    let mut out = Vec::with_capacity(BLOB_HEADER_LEN + pt.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&pt);
    Ok(out)
}

/// Seals metadata (a tree, a root) with the host's key. The nonce is
/// derived from the plaintext (synthetic), so equal trees seal equal and
/// an unchanged subtree keeps its name; different hosts never match.
pub fn seal_meta(meta_key: &[u8; 32], plaintext: &[u8]) -> Result<Vec<u8>> {
    let mut h = blake3::Hasher::new_keyed(&blake3::derive_key("dedupfs v1 meta nonce", meta_key));
    h.update(plaintext);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&h.finalize().as_bytes()[..12]);
    let ct = cipher(meta_key)
        .encrypt(&Nonce::from(nonce), plaintext)
        .map_err(|_| Error::Blob("sealing failed".into()))?;
    let mut out = Vec::with_capacity(12 + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    Ok(out)
}

pub fn open_meta(meta_key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>> {
    if sealed.len() < 12 {
        return Err(Error::Open);
    }
    let (nonce, ct) = sealed.split_at(12);
    let mut n = [0u8; 12];
    n.copy_from_slice(nonce);
    cipher(meta_key)
        .decrypt(&Nonce::from(n), ct)
        .map_err(|_| Error::Open)
}

/// The bytes a request's signature covers (docs/protocol.md).
pub fn request_message(method: &str, path: &str, time: i64, nonce: &str, body: &[u8]) -> Vec<u8> {
    format!(
        "dedupfs-v1\n{method}\n{path}\n{time}\n{nonce}\n{}\n",
        blake3::hash(body).to_hex()
    )
    .into_bytes()
}

pub fn sign_request(key: &SigningKey, msg: &[u8]) -> [u8; 64] {
    key.sign(msg).to_bytes()
}

pub fn verify_request(key: &VerifyingKey, msg: &[u8], sig: &[u8]) -> Result<()> {
    let sig = Signature::from_slice(sig).map_err(|_| Error::Signature)?;
    key.verify(msg, &sig).map_err(|_| Error::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Compression;

    const CHEAP: KdfParams = KdfParams {
        mem_kib: 64,
        passes: 1,
        lanes: 1,
    };

    fn stored(data: &[u8]) -> (ChunkId, Vec<u8>) {
        let h = BlobHeader {
            compression: Compression::None,
            sealing: Sealing::None,
            raw_len: data.len() as u32,
        };
        let mut b = h.encode().to_vec();
        b.extend_from_slice(data);
        (ChunkId::of(data), b)
    }

    #[test]
    fn keys_follow_from_passphrase_and_host_alone() {
        let a = HostKeys::derive(b"pass", "alpha", CHEAP).unwrap();
        let again = HostKeys::derive(b"pass", "alpha", CHEAP).unwrap();
        let other_host = HostKeys::derive(b"pass", "beta", CHEAP).unwrap();
        let other_pass = HostKeys::derive(b"pasS", "alpha", CHEAP).unwrap();
        assert_eq!(a.public(), again.public());
        assert_eq!(a.meta_key, again.meta_key);
        assert_ne!(a.public(), other_host.public());
        assert_ne!(a.meta_key, other_host.meta_key);
        assert_ne!(a.public(), other_pass.public());
        assert_ne!(a.meta_key, a.signing.to_bytes());
    }

    #[test]
    fn a_chunk_seals_alike_everywhere_and_opens_only_with_its_id() {
        let (id, blob) = stored(b"the same chunk on two hosts");
        let s1 = seal_chunk(&blob, &id, b"").unwrap();
        let s2 = seal_chunk(&blob, &id, b"").unwrap();
        assert_eq!(s1, s2);
        assert_eq!(blob_name(&s1), blob_name(&s2));
        assert!(!s1.windows(5).any(|w| w == b"chunk"));
        assert_eq!(open_chunk(&s1, &id, b"").unwrap(), blob);
        // Another id, another secret, a flipped byte: refused.
        let (other, _) = stored(b"another");
        assert!(open_chunk(&s1, &other, b"").is_err());
        assert!(open_chunk(&s1, &id, b"secret").is_err());
        for i in 0..s1.len() {
            let mut bad = s1.clone();
            bad[i] ^= 1;
            assert!(open_chunk(&bad, &id, b"").is_err(), "byte {i}");
        }
        // A convergence secret gives other sealed bytes.
        assert_ne!(seal_chunk(&blob, &id, b"group").unwrap(), s1);
        assert!(seal_chunk(&s1, &id, b"").is_err(), "sealing twice");
    }

    #[test]
    fn metadata_seals_per_host_and_deterministically() {
        let a = HostKeys::derive(b"p", "a", CHEAP).unwrap();
        let b = HostKeys::derive(b"p", "b", CHEAP).unwrap();
        let tree = b"dir listing";
        let s = seal_meta(&a.meta_key, tree).unwrap();
        assert_eq!(s, seal_meta(&a.meta_key, tree).unwrap());
        assert_ne!(s, seal_meta(&b.meta_key, tree).unwrap());
        assert_ne!(s, seal_meta(&a.meta_key, b"dir listinG").unwrap());
        assert_eq!(open_meta(&a.meta_key, &s).unwrap(), tree);
        assert!(open_meta(&b.meta_key, &s).is_err());
        assert!(open_meta(&a.meta_key, &s[..5]).is_err());
    }

    #[test]
    fn signatures_cover_method_path_time_nonce_and_body() {
        let k = HostKeys::derive(b"p", "a", CHEAP).unwrap();
        let msg = request_message("PUT", "/v1/blobs/ab", 100, "n1", b"body");
        let sig = sign_request(&k.signing, &msg);
        verify_request(&k.public(), &msg, &sig).unwrap();
        for other in [
            request_message("GET", "/v1/blobs/ab", 100, "n1", b"body"),
            request_message("PUT", "/v1/blobs/ac", 100, "n1", b"body"),
            request_message("PUT", "/v1/blobs/ab", 101, "n1", b"body"),
            request_message("PUT", "/v1/blobs/ab", 100, "n2", b"body"),
            request_message("PUT", "/v1/blobs/ab", 100, "n1", b"bodY"),
        ] {
            assert!(verify_request(&k.public(), &other, &sig).is_err());
        }
        let other = HostKeys::derive(b"q", "a", CHEAP).unwrap();
        assert!(verify_request(&other.public(), &msg, &sig).is_err());
        assert!(verify_request(&k.public(), &msg, &sig[..10]).is_err());
    }
}

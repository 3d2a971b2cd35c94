//! The chunkstore under bad input and faults, through the library and the
//! `dedupfs` binary.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use dedupfs::NoProgress;
use dedupfs::format::{ChunkId, ChunkerParams, OwnerId};
use dedupfs::repo::Repo;
use dedupfs::store::{Error, InitOptions, pack};
use proptest::prelude::*;

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn new_repo(dir: &Path) -> Repo {
    Repo::init(dir, &InitOptions::default()).unwrap();
    Repo::open(dir).unwrap()
}

fn get(repo: &Repo, name: &str) -> Result<Vec<u8>, Error> {
    let mut v = Vec::new();
    repo.get_object(OwnerId::LOCAL, name, &mut v)?;
    Ok(v)
}

fn packs_of(dir: &Path) -> Vec<PathBuf> {
    pack::list_pack_files(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dedupfs"))
}

#[test]
fn round_trip_dedup_and_stats() {
    let t = tempfile::tempdir().unwrap();
    let repo = new_repo(&t.path().join("s"));
    let data = random_bytes(3 << 20, 1);
    repo.put_object(OwnerId::LOCAL, "a", &data[..]).unwrap();
    repo.put_object(OwnerId::LOCAL, "b", &data[..]).unwrap();
    assert_eq!(get(&repo, "a").unwrap(), data);
    assert_eq!(get(&repo, "b").unwrap(), data);
    let s = repo.stats().unwrap();
    assert_eq!(s.logical_bytes, 2 * data.len() as u64);
    assert_eq!(s.unique_bytes, data.len() as u64);
    assert!((s.dedup_ratio - 2.0).abs() < 1e-9);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    // Replacing an object drops the old version's references.
    repo.put_object(OwnerId::LOCAL, "a", &b"short"[..]).unwrap();
    let s = repo.stats().unwrap();
    assert_eq!(s.logical_bytes, data.len() as u64 + 5);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

#[test]
fn flipped_byte_names_the_chunk_and_spares_the_rest() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = new_repo(&dir);
    let data = random_bytes(2 << 20, 2);
    repo.put_object(OwnerId::LOCAL, "f", &data[..]).unwrap();
    let other = random_bytes(1 << 20, 3);
    repo.put_object(OwnerId::LOCAL, "g", &other[..]).unwrap();
    drop(repo);

    // Flip one payload byte of a record in the middle of the first pack.
    let p = &packs_of(&dir)[0];
    let (_, scan) = pack::scan_pack(p, true).unwrap();
    let victim = &scan.records[scan.records.len() / 2];
    let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let at = victim.offset + 32 + 8 + 100;
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    drop(f);

    let repo = Repo::open(&dir).unwrap();
    let err = repo.store().read_chunk(&victim.header.id).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&victim.header.id.to_hex()), "{msg}");
    assert!(msg.contains("pack"), "{msg}");
    assert!(matches!(err, Error::Corrupt { .. }));
    assert_eq!(err.errno(), libc::EIO);
    // Every other chunk still reads.
    for r in scan
        .records
        .iter()
        .filter(|r| r.header.id != victim.header.id)
    {
        repo.store().read_chunk(&r.header.id).unwrap();
    }
    assert_eq!(get(&repo, "g").unwrap(), other);
    let report = repo.fsck(&NoProgress).unwrap();
    assert!(!report.clean);
    let bad: Vec<_> = report
        .store
        .corrupt
        .iter()
        .map(|b| b.chunk.clone())
        .collect();
    assert_eq!(bad, vec![victim.header.id.to_hex()]);
    assert_eq!(report.damaged_objects, vec!["f".to_string()]);
}

#[test]
fn torn_tail_from_a_crashed_append_is_cut_at_open() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = new_repo(&dir);
    let data = random_bytes(1 << 20, 4);
    repo.put_object(OwnerId::LOCAL, "f", &data[..]).unwrap();
    drop(repo);
    let p = packs_of(&dir)[0].clone();
    let committed = fs::metadata(&p).unwrap().len();
    // Half a record, as a crash in the middle of an append leaves it.
    let mut f = OpenOptions::new().append(true).open(&p).unwrap();
    f.write_all(b"DBR1").unwrap();
    f.write_all(&random_bytes(5000, 5)).unwrap();
    drop(f);
    // A pack that no commit ever named.
    let stray = p.with_file_name("0000000000ff.pack");
    fs::write(&stray, b"DDFSPACK").unwrap();

    let repo = Repo::open(&dir).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), committed);
    assert!(!stray.exists());
    assert_eq!(get(&repo, "f").unwrap(), data);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

#[test]
fn pack_cut_short_inside_committed_data_leaves_no_dangling_index_entries() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = new_repo(&dir);
    let data = random_bytes(1 << 20, 6);
    repo.put_object(OwnerId::LOCAL, "f", &data[..]).unwrap();
    drop(repo);
    let p = packs_of(&dir)[0].clone();
    let len = fs::metadata(&p).unwrap().len();
    let cut = len - 3000; // mid-blob of the last record
    let (_, scan) = pack::scan_pack(&p, true).unwrap();
    let lost = scan
        .records
        .iter()
        .filter(|r| r.offset + r.header.record_len() > cut)
        .count();
    assert!(lost >= 1);
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(cut).unwrap();
    drop(f);

    let repo = Repo::open(&dir).unwrap();
    let report = repo.fsck(&NoProgress).unwrap();
    // The lost chunk is reported missing, nothing points past the end.
    assert_eq!(report.store.missing.len(), lost);
    assert!(
        report.store.corrupt.is_empty(),
        "{:?}",
        report.store.corrupt
    );
    assert_eq!(report.damaged_objects, vec!["f".to_string()]);
    assert!(get(&repo, "f").is_err());
}

fn damage_index(dir: &Path, how: &str) {
    let idx = dir.join("index.redb");
    match how {
        "truncate" => {
            let len = fs::metadata(&idx).unwrap().len();
            OpenOptions::new()
                .write(true)
                .open(&idx)
                .unwrap()
                .set_len(len / 3)
                .unwrap();
        }
        "junk" => fs::write(&idx, random_bytes(64 << 10, 9)).unwrap(),
        "delete" => fs::remove_file(&idx).unwrap(),
        _ => unreachable!(),
    }
}

#[test]
fn damaged_index_fails_clearly_writes_nothing_and_repair_rebuilds_it() {
    for how in ["truncate", "junk", "delete"] {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("s");
        let repo = new_repo(&dir);
        let a = random_bytes(2 << 20, 10);
        let b = random_bytes(300 << 10, 11);
        repo.put_object(OwnerId::LOCAL, "a", &a[..]).unwrap();
        repo.put_object(OwnerId::LOCAL, "b", &b[..]).unwrap();
        repo.put_object(OwnerId::LOCAL, "a2", &a[..]).unwrap();
        repo.remove_objects(OwnerId::LOCAL, &["b".into()]).unwrap();
        let before = repo.stats().unwrap();
        drop(repo);
        damage_index(&dir, how);
        let snapshot = fs::read(dir.join("index.redb")).ok();

        let err = Repo::open(&dir).err().expect("open must fail");
        assert!(matches!(err, Error::IndexDamaged { .. }), "{how}: {err}");
        assert!(err.to_string().contains("fsck --repair"), "{err}");
        for args in [&["stats"][..], &["fsck"], &["object", "ls"], &["gc"]] {
            let out = bin().args(args).arg(&dir).output().unwrap();
            // fsck reports the damage as its finding (exit 1, on stdout);
            // the other commands fail to run (exit 2, on stderr).
            let fsck = args == ["fsck"];
            assert_eq!(
                out.status.code(),
                Some(if fsck { 1 } else { 2 }),
                "{how} {args:?}"
            );
            let stderr = String::from_utf8_lossy(if fsck { &out.stdout } else { &out.stderr });
            assert_eq!(stderr.trim().lines().count(), 1, "{how} {args:?}: {stderr}");
            assert!(stderr.contains("index"), "{stderr}");
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
        assert_eq!(
            fs::read(dir.join("index.redb")).ok(),
            snapshot,
            "{how}: file changed"
        );

        let out = bin().args(["fsck", "--repair"]).arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "{how}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let repo = Repo::open(&dir).unwrap();
        assert_eq!(get(&repo, "a").unwrap(), a);
        assert_eq!(get(&repo, "a2").unwrap(), a);
        assert!(repo.fsck(&NoProgress).unwrap().clean);
        let after = repo.stats().unwrap();
        assert_eq!(after.logical_bytes, before.logical_bytes, "{how}");
        assert_eq!(after.unique_bytes, before.unique_bytes, "{how}");
    }
}

#[test]
fn not_a_store_and_unknown_version_are_one_line_errors() {
    let t = tempfile::tempdir().unwrap();
    let out = bin().arg("stats").arg(t.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("not a dedupfs store"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1);

    let dir = t.path().join("s");
    drop(new_repo(&dir));
    let cfg = fs::read_to_string(dir.join("config.json")).unwrap();
    fs::write(
        dir.join("config.json"),
        cfg.replace("\"version\": 1", "\"version\": 42"),
    )
    .unwrap();
    let out = bin().arg("stats").arg(&dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("version 42"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

#[test]
fn a_second_opener_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let _repo = new_repo(&dir);
    assert!(matches!(Repo::open(&dir), Err(Error::Locked(_))));
}

#[test]
fn many_small_files_share_commits() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut files = Vec::new();
    for i in 0..2000u64 {
        let p = src.join(format!("f{i}"));
        fs::write(&p, random_bytes(100 + (i as usize % 4000), i)).unwrap();
        files.push((format!("f{i}"), p));
    }
    let repo = new_repo(&t.path().join("s"));
    let before = repo.stats().unwrap().commits;
    repo.put_files(OwnerId::LOCAL, files, 1, &NoProgress)
        .unwrap();
    let s = repo.stats().unwrap();
    assert_eq!(s.objects, 2000);
    assert!(
        s.commits - before <= 2,
        "{} commits for 2000 files",
        s.commits - before
    );
    assert_eq!(get(&repo, "f1234").unwrap(), random_bytes(1334, 1234));
}

#[test]
fn gc_returns_space_to_within_ten_percent_of_live_data() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = new_repo(&dir);
    let mut names = Vec::new();
    for i in 0..40u64 {
        let name = format!("o{i}");
        repo.put_object(OwnerId::LOCAL, &name, &random_bytes(1 << 20, 100 + i)[..])
            .unwrap();
        names.push(name);
    }
    let doomed: Vec<String> = names
        .iter()
        .filter(|n| {
            n.as_str() != "o7" && n.as_str() != "o30" && n.as_str() != "o11" && n.as_str() != "o25"
        })
        .cloned()
        .collect();
    repo.remove_objects(OwnerId::LOCAL, &doomed).unwrap();
    let r = repo.gc(0.2, &NoProgress).unwrap();
    assert!(r.packs_compacted > 0);
    let s = repo.stats().unwrap();
    let packs: u64 = packs_of(&dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        (packs as f64) < s.unique_bytes as f64 * 1.10,
        "packs {packs} vs live {}",
        s.unique_bytes
    );
    for n in ["o7", "o11", "o25", "o30"] {
        let i: u64 = n[1..].parse().unwrap();
        assert_eq!(get(&repo, n).unwrap(), random_bytes(1 << 20, 100 + i));
    }
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    drop(repo);
    let repo = Repo::open(&dir).unwrap();
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

#[test]
fn concurrent_writers_and_gc_keep_counts_exact() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = new_repo(&dir);
    // Shared blocks so writers dedup against each other's fresh chunks.
    let blocks: Vec<Vec<u8>> = (0..12).map(|i| random_bytes(64 << 10, 500 + i)).collect();
    let content = |w: u64, i: u64| -> Vec<u8> {
        let mut v = Vec::new();
        for k in 0..6 {
            v.extend_from_slice(&blocks[((w + i * 3 + k * 5) % 12) as usize]);
        }
        v
    };
    std::thread::scope(|s| {
        for w in 0..3u64 {
            let repo = &repo;
            s.spawn(move || {
                for i in 0..15u64 {
                    let name = format!("w{w}-{}", i % 5);
                    repo.put_object(OwnerId::LOCAL, &name, &content(w, i)[..])
                        .unwrap();
                    if i % 4 == 3 {
                        repo.remove_objects(OwnerId::LOCAL, &[name]).unwrap();
                    }
                }
            });
        }
        s.spawn(|| {
            for _ in 0..10 {
                repo.gc(0.0, &NoProgress).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
    });
    let report = repo.fsck(&NoProgress).unwrap();
    assert!(report.clean, "{:?}", report.store);
    for o in repo.list_objects().unwrap() {
        get(&repo, &o.name).unwrap();
    }
}

#[test]
fn disk_full_fails_with_enospc_and_recovers() {
    if !nix_root() {
        eprintln!("skipped: needs root to mount a tmpfs");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mnt = t.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
    let dir = mnt.join("s");
    let filler = mnt.join("filler");
    fs::write(&filler, vec![0u8; 16 << 20]).unwrap();
    let repo = new_repo(&dir);
    let kept = random_bytes(4 << 20, 77);
    repo.put_object(OwnerId::LOCAL, "kept", &kept[..]).unwrap();

    let big = random_bytes(40 << 20, 78);
    let err = repo
        .put_object(OwnerId::LOCAL, "big", &big[..])
        .unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    assert_eq!(get(&repo, "kept").unwrap(), kept);
    drop(repo);
    let repo = Repo::open(&dir).unwrap();
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    assert_eq!(get(&repo, "kept").unwrap(), kept);

    fs::remove_file(&filler).unwrap();
    let medium = random_bytes(20 << 20, 79);
    repo.put_object(OwnerId::LOCAL, "medium", &medium[..])
        .unwrap();
    assert_eq!(get(&repo, "medium").unwrap(), medium);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

/// A repo whose chunks are small, so a few MB make thousands of them.
fn small_chunk_repo(dir: &Path) -> Repo {
    let opts = InitOptions {
        chunker: ChunkerParams {
            min: 64,
            avg: 256,
            max: 1024,
        },
        ..InitOptions::default()
    };
    Repo::init(dir, &opts).unwrap();
    Repo::open(dir).unwrap()
}

#[test]
fn an_undo_record_of_many_segments_is_reversed_after_a_failed_meta_commit() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = small_chunk_repo(&dir);
    repo.put_object(OwnerId::LOCAL, "kept", &random_bytes(64 << 10, 1)[..])
        .unwrap();
    let before = repo.store().stats().unwrap().counters;
    let mut b = repo.store().batch().unwrap();
    let refs = b.ingest(&random_bytes(2 << 20, 2)[..]).unwrap();
    assert!(
        refs.len() > 5000,
        "{} chunks: want several undo segments",
        refs.len()
    );
    b.add_refs(OwnerId::LOCAL, refs.iter().map(|c| c.id));
    let err = b
        .commit(|_| Err(Error::Invalid("meta refused".into())))
        .unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let after = repo.store().stats().unwrap().counters;
    assert_eq!(after.logical_bytes, before.logical_bytes);
    assert_eq!(after.live_chunks, before.live_chunks);
    drop(repo);
    let repo = Repo::open(&dir).unwrap();
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

#[test]
fn an_index_commit_whose_meta_commit_never_landed_is_undone_at_open() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = small_chunk_repo(&dir);
    let kept = random_bytes(64 << 10, 3);
    repo.put_object(OwnerId::LOCAL, "kept", &kept[..]).unwrap();
    let before = repo.store().stats().unwrap().counters;
    let mut b = repo.store().batch().unwrap();
    let refs = b.ingest(&random_bytes(2 << 20, 4)[..]).unwrap();
    b.add_refs(OwnerId::LOCAL, refs.iter().map(|c| c.id));
    // The index commits; the meta commit that should follow never happens,
    // as after a crash between the two.
    b.commit(|_| Ok(())).unwrap();
    drop(repo);
    let repo = Repo::open(&dir).unwrap();
    let after = repo.store().stats().unwrap().counters;
    assert_eq!(after.logical_bytes, before.logical_bytes);
    assert_eq!(after.live_chunks, before.live_chunks);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    assert_eq!(get(&repo, "kept").unwrap(), kept);
}

fn nix_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[test]
fn kill_9_during_ingest_loses_nothing_committed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    drop(new_repo(&dir));
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    // Mixed sizes: small files share group commits, large ones span several.
    let mut expected: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..60u64 {
        let len = if i % 10 == 0 {
            6 << 20
        } else {
            1000 + (i as usize * 7919) % 200_000
        };
        let data = random_bytes(len, 1000 + i);
        let p = src.join(format!("f{i:03}"));
        fs::write(&p, &data).unwrap();
        expected.insert(p.to_string_lossy().into_owned(), data);
    }
    let mut seed = 12345u64;
    for round in 0..20 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay_ms = 20 + (seed >> 33) % 400;
        let mut child = bin()
            .args(["object", "put"])
            .arg(&dir)
            .arg(&src)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();

        let repo = Repo::open(&dir).unwrap_or_else(|e| panic!("round {round}: {e}"));
        let report = repo.fsck(&NoProgress).unwrap();
        assert!(report.clean, "round {round}: {:?}", report.store);
        // Every object that committed reads back exactly.
        for o in repo.list_objects().unwrap() {
            assert_eq!(
                &get(&repo, &o.name).unwrap(),
                &expected[&o.name],
                "round {round}: {}",
                o.name
            );
        }
        // Every chunk the index names is readable.
        let rt = redb::ReadableDatabase::begin_read(repo.store().db()).unwrap();
        let chunks = rt.open_table(dedupfs::store::CHUNKS).unwrap();
        for row in redb::ReadableTable::iter(&chunks).unwrap() {
            let (k, _) = row.unwrap();
            repo.store().read_chunk(&ChunkId(*k.value())).unwrap();
        }
    }
}

/// A model of the objects, checked against the store after random puts,
/// removes, and gcs.
#[derive(Debug, Clone)]
enum Op {
    Put(u8, Vec<u8>),
    Remove(u8),
    Gc,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..6, proptest::collection::vec(0u8..8, 1..6)).prop_map(|(n, b)| Op::Put(n, b)),
        2 => (0u8..6).prop_map(Op::Remove),
        1 => Just(Op::Gc),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn refcounts_match_a_model(ops in proptest::collection::vec(op(), 1..25)) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("s");
        let mut repo = Some(new_repo(&dir));
        // Objects built from a small pool of 20 KiB blocks: lots of sharing.
        let block = |b: u8| random_bytes(20 << 10, 9000 + b as u64);
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for op in ops {
            let r = repo.as_ref().unwrap();
            match op {
                Op::Put(n, blocks) => {
                    let data: Vec<u8> = blocks.iter().flat_map(|b| block(*b)).collect();
                    r.put_object(OwnerId::LOCAL, &format!("o{n}"), &data[..]).unwrap();
                    model.insert(format!("o{n}"), data);
                }
                Op::Remove(n) => {
                    let name = format!("o{n}");
                    let res = r.remove_objects(OwnerId::LOCAL, std::slice::from_ref(&name));
                    prop_assert_eq!(res.is_ok(), model.remove(&name).is_some());
                }
                Op::Gc => {
                    r.gc(0.0, &NoProgress).unwrap();
                }
                Op::Reopen => {
                    drop(repo.take());
                    repo = Some(Repo::open(&dir).unwrap());
                }
            }
            let r = repo.as_ref().unwrap();
            let report = r.fsck(&NoProgress).unwrap();
            prop_assert!(report.clean, "{:?}", report.store);
            let s = r.stats().unwrap();
            prop_assert_eq!(s.logical_bytes, model.values().map(|v| v.len() as u64).sum::<u64>());
            for (name, data) in &model {
                prop_assert_eq!(&get(r, name).unwrap(), data);
            }
        }
    }
}

/// Rows of a meta.redb table.
fn rows<K: redb::Key + 'static, V: redb::Value + 'static>(
    db: &redb::Database,
    t: redb::TableDefinition<K, V>,
) -> u64 {
    use redb::{ReadableDatabase, ReadableTableMetadata};
    db.begin_read()
        .unwrap()
        .open_table(t)
        .unwrap()
        .len()
        .unwrap()
}

/// Small chunks make a few MB hold tens of thousands: several segments
/// (4096 chunks each) and several mid-object commits (every 16384).
#[test]
fn a_multi_segment_object_reads_back_is_replaced_and_removal_frees_everything() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = small_chunk_repo(&dir);
    // The second half repeats the first: chunks found in parts already
    // committed, and chunks listed twice (two references each).
    let mut data = random_bytes(6 << 20, 21);
    data.extend_from_within(..(6 << 20));
    let commits = repo.stats().unwrap().commits;
    let info = repo.put_object(OwnerId::LOCAL, "big", &data[..]).unwrap();
    assert!(info.chunks > 2 * 16384, "{} chunks", info.chunks);
    assert!(
        repo.stats().unwrap().commits - commits >= 3,
        "committed in parts"
    );
    assert_eq!(get(&repo, "big").unwrap(), data);
    let segs = rows(&repo.meta(), dedupfs::meta::OBJECT_SEGMENTS);
    // Parts of 16384 chunks (four whole segments each), then the rest.
    let want = (info.chunks / 16384) * 4 + (info.chunks % 16384).div_ceil(4096);
    assert_eq!(segs, want as u64);
    assert_eq!(rows(&repo.meta(), dedupfs::meta::PENDING_OBJECTS), 0);
    let s = repo.stats().unwrap();
    assert_eq!(s.logical_bytes, data.len() as u64);
    // Only the chunks around the seam are new in the second half.
    assert!(s.unique_bytes < (6 << 20) + 4096, "{}", s.unique_bytes);
    assert!(repo.fsck(&NoProgress).unwrap().clean);

    // Replacing it releases the old segments and references.
    let other = random_bytes(6 << 20, 22);
    repo.put_object(OwnerId::LOCAL, "big", &other[..]).unwrap();
    assert_eq!(get(&repo, "big").unwrap(), other);
    assert_eq!(repo.stats().unwrap().logical_bytes, other.len() as u64);
    assert_eq!(rows(&repo.meta(), dedupfs::meta::PENDING_OBJECTS), 0);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    repo.put_object(OwnerId::LOCAL, "small", &b"kept"[..])
        .unwrap();

    repo.remove_objects(OwnerId::LOCAL, &["big".into(), "big".into()])
        .unwrap();
    assert!(get(&repo, "big").is_err());
    let s = repo.stats().unwrap();
    assert_eq!(s.logical_bytes, 4);
    assert_eq!(s.live_chunks, 1);
    assert_eq!(s.objects, 1);
    assert_eq!(rows(&repo.meta(), dedupfs::meta::OBJECT_SEGMENTS), 1);
    assert_eq!(rows(&repo.meta(), dedupfs::meta::PENDING_OBJECTS), 0);
    repo.gc(0.0, &NoProgress).unwrap();
    let packs: u64 = packs_of(&dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        packs < 4096,
        "{packs} pack bytes left for one 4-byte object"
    );
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    drop(repo);
    let repo = Repo::open(&dir).unwrap();
    assert_eq!(get(&repo, "small").unwrap(), b"kept");
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

/// A reader that fails after `left` bytes.
struct FailAfter<'a> {
    data: &'a [u8],
    left: usize,
}

impl std::io::Read for FailAfter<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other("the source went away"));
        }
        let n = buf.len().min(self.left).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.left -= n;
        Ok(n)
    }
}

#[test]
fn a_failed_put_releases_the_parts_it_committed() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = small_chunk_repo(&dir);
    let old = random_bytes(100 << 10, 23);
    repo.put_object(OwnerId::LOCAL, "x", &old[..]).unwrap();
    let before = repo.stats().unwrap();
    let data = random_bytes(12 << 20, 24);
    let err = repo
        .put_object(
            OwnerId::LOCAL,
            "x",
            FailAfter {
                data: &data,
                left: 10 << 20,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("went away"), "{err}");
    assert!(
        repo.stats().unwrap().commits > before.commits,
        "parts committed"
    );
    assert_eq!(rows(&repo.meta(), dedupfs::meta::PENDING_OBJECTS), 0);
    assert_eq!(get(&repo, "x").unwrap(), old);
    let after = repo.stats().unwrap();
    assert_eq!(after.logical_bytes, before.logical_bytes);
    assert_eq!(after.live_chunks, before.live_chunks);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

#[test]
fn kill_9_between_part_commits_leaves_a_pending_object_that_open_releases() {
    use std::io::BufRead;
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = small_chunk_repo(&dir);
    let old = random_bytes(200 << 10, 25);
    repo.put_object(OwnerId::LOCAL, "big", &old[..]).unwrap();
    let before = repo.stats().unwrap();
    drop(repo);

    // Replace "big" from a pipe that delivers 12 MiB and then stalls, so
    // the process sits between two part commits when it is killed.
    let mut child = bin()
        .args(["object", "put"])
        .arg(&dir)
        .args(["-", "--name", "big"])
        .env("RUST_LOG", "dedupfs=debug")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&random_bytes(12 << 20, 26)).unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut parts = 0;
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.contains("segments committed, pending") {
            parts += 1;
            if parts == 2 {
                break;
            }
        }
    }
    assert_eq!(parts, 2, "the put committed two parts before stalling");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(stdin);

    // What the crash left: a pending object holding segments.
    let db = redb::Database::open(dir.join(dedupfs::meta::META_FILE)).unwrap();
    assert_eq!(rows(&db, dedupfs::meta::PENDING_OBJECTS), 1);
    assert!(rows(&db, dedupfs::meta::OBJECT_SEGMENTS) > 8);
    drop(db);

    let repo = Repo::open(&dir).unwrap();
    assert_eq!(rows(&repo.meta(), dedupfs::meta::PENDING_OBJECTS), 0);
    let segs = rows(&repo.meta(), dedupfs::meta::OBJECT_SEGMENTS);
    assert_eq!(segs, 1, "only the old object's segment is left");
    assert_eq!(get(&repo, "big").unwrap(), old);
    let after = repo.stats().unwrap();
    assert_eq!(after.logical_bytes, before.logical_bytes);
    assert_eq!(after.live_chunks, before.live_chunks);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

/// `tests/fixtures/meta-v1-store.tar.gz` was written by the build before
/// meta format 2 (61e5011):
/// `dedupfs init fx --chunk-min 64 --chunk-avg 256 --chunk-max 1024`, then
/// `dedupfs object put fx fxin` with `fxin/lines` and `fxin/lines-again`
/// (`seq 1 20000`), `fxin/hello` ("hello\n") and an empty `fxin/empty`, then
/// an object put and removed (dead chunks).
#[test]
fn a_meta_format_1_store_is_migrated_at_open() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    fs::create_dir(&dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/meta-v1-store.tar.gz");
    let ok = Command::new("tar")
        .arg("-xzf")
        .arg(&fixture)
        .arg("-C")
        .arg(&dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "unpacking {}", fixture.display());
    let lines: Vec<u8> = (1..=20000)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();

    let repo = Repo::open(&dir).unwrap();
    let mut names: Vec<(String, u64)> = repo
        .list_objects()
        .unwrap()
        .into_iter()
        .map(|o| (o.name, o.size))
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            ("fxin/empty".to_string(), 0),
            ("fxin/hello".to_string(), 6),
            ("fxin/lines".to_string(), lines.len() as u64),
            ("fxin/lines-again".to_string(), lines.len() as u64),
        ]
    );
    assert_eq!(get(&repo, "fxin/lines").unwrap(), lines);
    assert_eq!(get(&repo, "fxin/lines-again").unwrap(), lines);
    assert_eq!(get(&repo, "fxin/hello").unwrap(), b"hello\n");
    assert_eq!(get(&repo, "fxin/empty").unwrap(), b"");
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    assert_eq!(
        repo.stats().unwrap().logical_bytes,
        2 * lines.len() as u64 + 6
    );
    // It is a format 2 store now: writes and removals keep it clean.
    repo.put_object(OwnerId::LOCAL, "new", &random_bytes(2 << 20, 27)[..])
        .unwrap();
    repo.remove_objects(OwnerId::LOCAL, &["fxin/lines".into()])
        .unwrap();
    assert!(repo.fsck(&NoProgress).unwrap().clean);
    drop(repo);
    let repo = Repo::open(&dir).unwrap();
    assert_eq!(get(&repo, "fxin/lines-again").unwrap(), lines);
    assert!(repo.fsck(&NoProgress).unwrap().clean);
}

#[test]
fn an_unknown_meta_format_is_a_one_line_error() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    drop(new_repo(&dir));
    let db = redb::Database::open(dir.join(dedupfs::meta::META_FILE)).unwrap();
    let tx = db.begin_write().unwrap();
    tx.open_table(dedupfs::meta::STATE)
        .unwrap()
        .insert("meta_format", 4)
        .unwrap();
    tx.commit().unwrap();
    drop(db);
    let out = bin().args(["object", "ls"]).arg(&dir).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("metadata has format version 4; this build understands 3"),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// The case `refcounts_match_a_model` shrank to when pack windows read
/// short were waited on again: puts into packs that grow between reads,
/// every object read back after each put.
#[test]
fn objects_read_back_while_their_packs_grow() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let r = new_repo(&dir);
    let block = |b: u8| random_bytes(20 << 10, 9000 + b as u64);
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let puts: [(u8, &[u8]); 5] = [
        (0, &[3, 4]),
        (4, &[7, 7]),
        (5, &[3]),
        (3, &[1, 0, 4, 0]),
        (5, &[6, 6, 7]),
    ];
    for (n, blocks) in puts {
        let data: Vec<u8> = blocks.iter().flat_map(|b| block(*b)).collect();
        r.put_object(OwnerId::LOCAL, &format!("o{n}"), &data[..])
            .unwrap();
        model.insert(format!("o{n}"), data);
        for (name, data) in &model {
            assert_eq!(&get(&r, name).unwrap(), data, "{name}");
        }
    }
}

/// Why a store that only ever received copies showed a dead fraction
/// (issues 12 and 13): two batches running at once that met the same chunk
/// both appended it, and the one that committed second kept its copy as
/// dead weight (`commit_inner`, "Another batch stored it first"). The
/// daemon's two ingest workers did this whenever files sharing chunks were
/// ingested together. Now a chunk in flight is claimed, and a second batch
/// borrows it and waits for its commit (`Batch::settle`).
///
/// The threads interleave: each ingests the same data in a different
/// order of parts, so each borrows from the other, and both must settle
/// without waiting for each other forever.
#[test]
fn concurrent_batches_do_not_store_a_shared_chunk_twice() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = small_chunk_repo(&dir);
    let parts: Vec<Vec<u8>> = (0..8).map(|i| random_bytes(256 << 10, 40 + i)).collect();
    for round in 0..4 {
        let go = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for worker in 0..2usize {
                let (repo, parts, go) = (&repo, &parts, &go);
                s.spawn(move || {
                    let mut b = repo.store().batch().unwrap();
                    go.wait();
                    for k in 0..parts.len() {
                        // One forwards, one backwards: they meet halfway.
                        let i = if worker == 0 { k } else { parts.len() - 1 - k };
                        let refs = b.ingest(&parts[i][..]).unwrap();
                        b.add_refs(OwnerId::LOCAL, refs.iter().map(|c| c.id));
                    }
                    b.commit(|_| Ok(())).unwrap();
                });
            }
        });
        let s = repo.stats().unwrap();
        assert_eq!(s.dead_fraction, 0.0, "round {round}: {s:?}");
    }
    // Every chunk either thread referenced is in the index and reads back.
    for p in &parts {
        let mut b = repo.store().batch().unwrap();
        for c in b.ingest(&p[..]).unwrap() {
            let e = repo.store().lookup(&c.id).unwrap().expect("indexed");
            assert!(e.is_live());
            assert_eq!(
                repo.store().read_chunk(&c.id).unwrap().len(),
                c.len as usize
            );
        }
        assert!(b.is_empty(), "nothing left to store");
    }
}

/// A batch that borrowed a chunk from another that then failed (dropped
/// without committing) must fail its own commit, not name a chunk the
/// index never got; the next try stores it.
#[test]
fn a_batch_whose_lender_gives_up_fails_cleanly_and_the_retry_stores_it() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    let repo = small_chunk_repo(&dir);
    let data = random_bytes(64 << 10, 77);
    let (claimed_tx, claimed_rx) = std::sync::mpsc::channel();
    let (borrowed_tx, borrowed_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let (repo, data) = (&repo, &data);
        s.spawn(move || {
            let mut b = repo.store().batch().unwrap();
            b.ingest(&data[..]).unwrap();
            claimed_tx.send(()).unwrap();
            borrowed_rx.recv().unwrap();
            drop(b); // gives its claims up uncommitted
        });
        claimed_rx.recv().unwrap();
        let mut b = repo.store().batch().unwrap();
        let refs = b.ingest(&data[..]).unwrap();
        b.add_refs(OwnerId::LOCAL, refs.iter().map(|c| c.id));
        borrowed_tx.send(()).unwrap();
        let err = b.commit(|_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("try again"), "{err}");
    });
    repo.put_object(OwnerId::LOCAL, "again", &data[..]).unwrap();
    assert_eq!(get(&repo, "again").unwrap(), data);
    let report = repo.fsck(&NoProgress).unwrap();
    assert!(report.clean, "{report:?}");
}

/// `dedupfs umount` waits for the store's lock, then opens the store to
/// compact it. The lock must outlive both databases: when the store gave
/// its lock up before meta.redb was closed, the next opener found meta.redb
/// "already open" and reported it damaged.
#[test]
fn whoever_takes_the_lock_next_can_open_the_store() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("s");
    drop(new_repo(&dir));
    for round in 0..40 {
        let repo = Repo::open(&dir).unwrap();
        // A non-durable commit, as the filesystem makes: closing the
        // database then has to make it durable, which takes a while.
        let tx = {
            let mut tx = repo.meta().begin_write().unwrap();
            tx.set_durability(redb::Durability::None).unwrap();
            tx
        };
        {
            let def: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("test_pad");
            let mut t = tx.open_table(def).unwrap();
            for i in 0..2000u64 {
                t.insert(i, [round as u8; 1000].as_slice()).unwrap();
            }
        }
        tx.commit().unwrap();
        let d = dir.clone();
        let waiter = std::thread::spawn(move || {
            let lock = loop {
                if let Ok(l) = dedupfs::store::Store::lock(&d) {
                    break l;
                }
                std::hint::spin_loop();
            };
            drop(lock);
            Repo::open(&d).map(drop)
        });
        std::thread::sleep(std::time::Duration::from_millis(2));
        drop(repo);
        let r = waiter.join().unwrap();
        assert!(r.is_ok(), "round {round}: {:?}", r.err());
    }
}

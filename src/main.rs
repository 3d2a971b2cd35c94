//! `dedupfs`: a thin command-line shell over the library.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use dedupfs::Progress;
use dedupfs::format::{ChunkerParams, Compression, OwnerId};
use dedupfs::repo::Repo;
use dedupfs::store::InitOptions;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `println!` that ends the process quietly on a closed pipe (see
/// `dedupfs::cli`).
macro_rules! outln {
    ($($arg:tt)*) => { dedupfs::outln!("dedupfs"; $($arg)*) };
}

use dedupfs::cli::is_broken_pipe;

#[derive(Parser)]
#[command(
    name = "dedupfs",
    version,
    about = "A deduplicating filesystem and chunkstore",
    long_about = "A deduplicating filesystem and chunkstore.\n\n\
Files are split by content (FastCDC), each chunk is named by its SHA-1 and \
stored once, compressed, in append-only pack files. A store is a directory; \
`dedupfs mount` serves it as a filesystem with snapshots (see snapctl(1)), \
and `dedupfs object` uses it without the filesystem.",
    after_long_help = MOUNT_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a store.
    ///
    /// Makes an empty store directory: pack files, the chunk index and the
    /// metadata database. The chunker sizes and the compression are fixed
    /// for the store's life. `dedupfs mount` creates a store with the
    /// defaults on its own when STORE is missing or empty.
    #[command(after_help = "Example:\n  dedupfs init ~/store --compression lz4 --chunk-avg 32768")]
    Init {
        /// Directory to create the store in (missing or empty).
        store: PathBuf,
        /// Smallest chunk, in bytes.
        #[arg(long, default_value_t = ChunkerParams::default().min)]
        chunk_min: u32,
        /// Average chunk the content-defined chunker aims at, in bytes.
        #[arg(long, default_value_t = ChunkerParams::default().avg)]
        chunk_avg: u32,
        /// Largest chunk, in bytes.
        #[arg(long, default_value_t = ChunkerParams::default().max)]
        chunk_max: u32,
        /// zstd, lz4 or none.
        #[arg(long, default_value = "zstd")]
        compression: Compression,
        /// zstd level, 1 (fastest) to 22 (smallest).
        #[arg(long, default_value_t = dedupfs::format::DEFAULT_ZSTD_LEVEL,
              value_parser = clap::value_parser!(i32).range(1..=22))]
        zstd_level: i32,
    },
    /// Space used, dedup and compression ratios.
    ///
    /// Logical bytes are the apparent size of the live tree (what `du -sb
    /// --apparent-size` says) plus named objects; unique bytes are the
    /// chunks they need once each; stored bytes are those chunks
    /// compressed; the dead fraction is pack space no chunk uses (gc
    /// reclaims it). Works on a mounted store too (asks the daemon).
    #[command(
        after_help = "Example:\n  dedupfs stats ~/store\n  dedupfs stats ~/store --json | jq .dedup_ratio"
    )]
    Stats {
        /// The store directory.
        store: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verify every blob, reference count and pack.
    ///
    /// Reads every chunk back and checks it against its SHA-1, recomputes
    /// every reference count from the metadata and compares, and checks the
    /// packs. Exits 1 when something is wrong. --repair first rebuilds the
    /// chunk index from the packs alone (the store must not be mounted).
    #[command(after_help = "Example:\n  dedupfs fsck ~/store\n  dedupfs fsck ~/store --repair")]
    Fsck {
        /// The store directory.
        store: PathBuf,
        /// Rebuild the chunk index from the packs first.
        #[arg(long)]
        repair: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Compact packs whose dead fraction is at least the threshold.
    ///
    /// Copies the live chunks of mostly dead packs into new packs and
    /// deletes the old ones, giving back the space of deleted files and
    /// snapshots, then gives the databases' free pages back. On a mounted
    /// store the daemon does it (index.redb is compacted at the unmount).
    #[command(after_help = "Example:\n  dedupfs gc ~/store --threshold 0.1")]
    Gc {
        /// The store directory.
        store: PathBuf,
        /// Compact a pack when at least this fraction of it is dead (0-1).
        #[arg(long, default_value_t = 0.2)]
        threshold: f64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Mount a store (created with defaults if the path is empty).
    ///
    /// Starts the daemon that serves the store at MOUNTPOINT and returns
    /// once the mount is up (-f stays in the foreground). The daemon logs
    /// to STORE/dedupfs.log. SIGTERM commits pending writes, makes them
    /// durable and detaches the mount even while files are open.
    #[command(
        after_help = "Examples:\n  dedupfs mount ~/store ~/dedupfs\n  dedupfs mount ~/store ~/dedupfs -o allow_other,snapdir=visible\n  mount -t fuse.dedupfs ~/store ~/dedupfs"
    )]
    Mount {
        /// The store directory (created when missing or empty).
        store: PathBuf,
        /// An existing directory to mount on.
        mountpoint: PathBuf,
        /// Stay in the foreground and log to stderr too.
        #[arg(short = 'f', long)]
        foreground: bool,
        /// Mount options: allow_other, allow_root, ro, rw, noatime, nodev,
        /// nosuid, noexec, snapdir=visible|hidden, nopassthrough,
        /// metrics=ADDR:PORT (serve GET /metrics; loopback unless
        /// metrics_remote is given too).
        #[arg(short = 'o', value_delimiter = ',')]
        options: Vec<String>,
        /// FUSE request threads.
        #[arg(long, default_value_t = 4)]
        threads: usize,
    },
    /// A store at a glance: mount, pending ingest, space, snapshots.
    ///
    /// TARGET is a mountpoint or a store. On a mounted store the daemon
    /// answers, adding the transport, the ingest backlog, the last commit
    /// and request totals; its counters in Prometheus format are served by
    /// the control socket's "metrics" command and `-o metrics=ADDR`.
    #[command(after_help = "Example:\n  dedupfs status ~/dedupfs\n  dedupfs status ~/store --json")]
    Status {
        /// A mountpoint of dedupfs, or a store directory.
        target: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Serve a mirror target that many hosts share and none can read.
    ///
    /// Runs in the foreground (for systemd) and keeps, in DIR, the sealed
    /// blobs of every registered client and their owner counts
    /// (docs/protocol.md, docs/security.md). HTTPS (TLS 1.3, HTTP/2 or
    /// HTTP/1.1) with --tls-cert and --tls-key; plain HTTP without them, and
    /// then on a loopback address only. `client add|list|remove` manage who
    /// may use it, while it runs or not. GET /metrics gives its figures.
    #[command(
        after_help = "Examples:\n  dedupfs serve --store /srv/dedupfs --listen 0.0.0.0:8417 --tls-cert /etc/dedupfs/cert.pem --tls-key /etc/dedupfs/key.pem\n  dedupfs serve --store /srv/dedupfs --listen 127.0.0.1:8417\n  dedupfs serve --store /srv/dedupfs client add laptop --key HEX --quota 100000000000\n  dedupfs serve --store /srv/dedupfs client list --json"
    )]
    Serve {
        /// The target's directory (created if missing).
        #[arg(long, global = true)]
        store: Option<PathBuf>,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8417")]
        listen: std::net::SocketAddr,
        /// Serve HTTPS with this certificate chain (PEM, the server's
        /// certificate first, then any intermediates). Needs --tls-key.
        /// Without both, plain HTTP is served on a loopback address only.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        #[command(subcommand)]
        cmd: Option<ServeCmd>,
    },
    /// Unmount a mounted store (pending ingest finishes first).
    ///
    /// Unmounts MOUNTPOINT and waits until the daemon has committed what
    /// was pending and released the store. Fails while files in the mount
    /// are open (then close them, or send the daemon SIGTERM).
    #[command(after_help = "Example:\n  dedupfs umount ~/dedupfs")]
    Umount {
        /// Where the store is mounted.
        mountpoint: PathBuf,
    },
    /// Rebuild a store from a remote, on an empty machine.
    ///
    /// With the passphrase and the host name the snapshots were mirrored
    /// under, fetches every snapshot of that host from the target, writes
    /// each into a new store (only what changed from the one before) and
    /// snapshots it under its old name and labels. The remote stays
    /// configured in the new store, so mounting it shows the snapshots and
    /// the mirror continues from the newest.
    #[command(after_help = "Example:
  dedupfs recover --remote https://backup.example:8443 --host laptop ~/.local/share/dedupfs/store")]
    Recover {
        /// The target's URL.
        #[arg(long, value_name = "URL")]
        remote: String,
        /// The host name the snapshots were mirrored under.
        #[arg(long)]
        host: String,
        /// The new store's directory (missing or empty).
        store: PathBuf,
        /// Read the passphrase from this file (mode 600) instead of
        /// DEDUPFS_PASSPHRASE or a prompt.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// The convergence secret the host used, if any (mode 600).
        #[arg(long, value_name = "FILE")]
        convergence_secret_file: Option<PathBuf>,
        /// Trust this CA certificate (PEM) for the target's TLS.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// The remote's name in the new store.
        #[arg(long, default_value = "origin")]
        name: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Named objects: byte streams kept as chunk lists (tools, tests, bench).
    ///
    /// The chunk store without the filesystem: put files or stdin under a
    /// name, get them back, list and remove them. The store must not be
    /// mounted.
    #[command(
        subcommand,
        after_help = "Example:\n  dedupfs object put ~/store ~/Downloads\n  dedupfs object ls ~/store"
    )]
    Object(ObjectCmd),
    /// Internal measurements used by scripts/bench.
    #[command(subcommand, hide = true)]
    Debug(DebugCmd),
    /// Write the manual pages and shell completions into DIR (man/man1,
    /// bash-completion, zsh, fish), for scripts/mount and scripts/package.
    #[command(hide = true)]
    Generate {
        /// Directory to write into, laid out as /usr/local/share.
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ObjectCmd {
    /// Store files (directories are walked) or stdin ("-", needs --name).
    ///
    /// Each file becomes an object named by its path as given (a directory
    /// adds each file's path under it); an object of the same name is
    /// replaced.
    #[command(
        after_help = "Examples:\n  dedupfs object put ~/store ~/Downloads/x.iso\n  tar c src | dedupfs object put ~/store - --name src.tar"
    )]
    Put {
        /// The store directory.
        store: PathBuf,
        /// Files or directories to store, or "-" for stdin.
        paths: Vec<PathBuf>,
        /// Object name for a single file or stdin.
        #[arg(long)]
        name: Option<String>,
        /// Files chunked at once.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write an object's bytes to stdout or a file.
    #[command(
        after_help = "Example:\n  dedupfs object get ~/store ~/Downloads/x.iso -o /tmp/x.iso"
    )]
    Get {
        /// The store directory.
        store: PathBuf,
        /// The object's name (as `object ls` prints it).
        name: String,
        /// Write here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Remove objects.
    ///
    /// Drops the objects' references; chunks nothing else holds become
    /// dead and `dedupfs gc` reclaims their space.
    #[command(after_help = "Example:\n  dedupfs object rm ~/store ~/Downloads/x.iso")]
    Rm {
        /// The store directory.
        store: PathBuf,
        /// Names of the objects to remove.
        names: Vec<String>,
    },
    /// List objects: size in bytes, chunk count and name.
    #[command(after_help = "Example:\n  dedupfs object ls ~/store | sort -n | tail")]
    Ls {
        /// The store directory.
        store: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Chunk, hash and compress files in memory, storing nothing.
    Pipeline {
        files: Vec<PathBuf>,
        #[arg(long, default_value = "zstd")]
        compression: Compression,
        #[arg(long, default_value_t = 3)]
        zstd_level: i32,
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
}

/// How mount(8) and /etc/fstab reach the daemon, for `dedupfs --help` and
/// the manual page (see `args()` for the argument handling it relies on).
const MOUNT_HELP: &str = "\
Mounting with mount(8) and /etc/fstab:
For the type fuse.dedupfs, mount(8) runs the FUSE helper mount.fuse3, which
runs `dedupfs STORE MOUNTPOINT -o OPTIONS` from the PATH; a first argument
that is not a subcommand means `dedupfs mount`. So, with dedupfs on the PATH:

    mount -t fuse.dedupfs /home/me/.dedupfs /home/me/dedupfs -o allow_other

or in /etc/fstab:

    /home/me/.dedupfs  /home/me/dedupfs  fuse.dedupfs  defaults,allow_other,nofail  0 0

The options are those of `dedupfs mount -o` (see dedupfs-mount(1)); others
that reach dedupfs are logged and ignored. Unmount with
`dedupfs umount MOUNTPOINT` or umount(8).

Files:
  STORE/dedupfs.log   the daemon's log (RUST_LOG=debug for more)
  STORE/ctl.sock      how stats, fsck, gc and snapctl reach a mounted store

Examples:
  dedupfs init ~/store
  dedupfs mount ~/store ~/dedupfs
  dedupfs stats ~/store
  dedupfs umount ~/dedupfs";

/// An indicatif bar on a terminal; nothing otherwise.
struct Bar(ProgressBar);

impl Bar {
    fn new(msg: &'static str) -> Bar {
        let pb = if io::stderr().is_terminal() {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(msg);
        Bar(pb)
    }
}

impl Progress for Bar {
    fn set_len(&self, len: u64) {
        self.0.set_length(len);
    }
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

#[derive(Subcommand)]
enum ServeCmd {
    /// Manage the clients allowed to use this target.
    #[command(subcommand)]
    Client(ClientCmd),
}

#[derive(Subcommand)]
enum ClientCmd {
    /// Register a client by its Ed25519 public key.
    Add {
        name: String,
        /// The client's public key, 64 hex digits.
        #[arg(long)]
        key: String,
        /// Bytes the client may keep referenced and pending.
        #[arg(long)]
        quota: Option<u64>,
    },
    /// List clients: bytes referenced, pending, quota, last seen.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a client with its references and roots; blobs nobody else
    /// holds are deleted.
    Remove { name: String },
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn count(n: u64, what: &str) -> String {
    dedupfs::cli::count(n, what)
}

fn human(n: u64) -> String {
    dedupfs::cli::human(n, 2)
}

/// Files under `path` with object names: the path as given, and for
/// directories, the path joined with each file's relative path.
fn walk(path: &Path, out: &mut Vec<(String, PathBuf)>) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            walk(&e.path(), out)?;
        }
    } else if meta.is_file() {
        out.push((path.to_string_lossy().into_owned(), path.to_path_buf()));
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Init {
            store,
            chunk_min,
            chunk_avg,
            chunk_max,
            compression,
            zstd_level,
        } => {
            let opts = InitOptions {
                chunker: ChunkerParams {
                    min: chunk_min,
                    avg: chunk_avg,
                    max: chunk_max,
                },
                compression,
                zstd_level,
            };
            Repo::init(&store, &opts)?;
            log::info!("created store {}", store.display());
        }
        Cmd::Stats { store, json } => {
            let s: dedupfs::repo::Stats = match Repo::open(&store) {
                Ok(repo) => repo.stats()?,
                Err(dedupfs::store::Error::Locked(_)) => via_daemon(&store, "stats")?,
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&s)?;
            } else {
                outln!(
                    "logical bytes:  {} ({})",
                    s.logical_bytes,
                    human(s.logical_bytes)
                );
                outln!(
                    "referenced:     {} ({})",
                    s.referenced_bytes,
                    human(s.referenced_bytes)
                );
                outln!(
                    "unique bytes:   {} ({})",
                    s.unique_bytes,
                    human(s.unique_bytes)
                );
                outln!(
                    "stored bytes:   {} ({})",
                    s.stored_bytes,
                    human(s.stored_bytes)
                );
                outln!("pack bytes:     {} ({})", s.pack_bytes, human(s.pack_bytes));
                outln!("chunks:         {} ({} live)", s.chunks, s.live_chunks);
                outln!("dedup ratio:    {:.3}", s.dedup_ratio);
                outln!("compression:    {:.3}", s.compression_ratio);
                outln!("packs:          {}", s.pack_count);
                outln!("dead fraction:  {:.3}", s.dead_fraction);
                outln!("waiting for gc: {} ({})", s.dead_bytes, human(s.dead_bytes));
                outln!("files:          {}", s.files);
                outln!("objects:        {}", s.objects);
                for (name, d) in [("index", &s.index), ("metadata", &s.meta)] {
                    outln!(
                        "{:<15} {} ({}), {} free",
                        format!("{name} db:"),
                        d.file_bytes,
                        human(d.file_bytes),
                        human(d.free_bytes)
                    );
                }
            }
        }
        Cmd::Fsck {
            store,
            repair,
            json,
        } => {
            if repair {
                let r = Repo::repair(&store, &Bar::new("rebuilding"))?;
                if !json {
                    outln!(
                        "rebuilt index: {}, {}, {}, {} missing",
                        count(r.packs_scanned, "pack"),
                        count(r.chunks_found, "chunk"),
                        count(r.damaged_records, "damaged record"),
                        count(r.missing.len() as u64, "referenced chunk")
                    );
                }
            }
            let r: dedupfs::repo::FsckReport = match Repo::open(&store).and_then(|repo| {
                let mut r = repo.fsck(&Bar::new("checking"))?;
                // What a crash left staged must replay to what it recorded.
                r.staging = dedupfs::fs::staging::check_layouts(&store, &repo.meta())?;
                r.clean &= r.staging.is_empty();
                Ok(r)
            }) {
                Ok(r) => r,
                Err(dedupfs::store::Error::Locked(_)) if !repair => via_daemon(&store, "fsck")?,
                // Damage found is fsck's finding, not a failure to run.
                Err(
                    e @ (dedupfs::store::Error::IndexDamaged { .. }
                    | dedupfs::store::Error::MetaDamaged { .. }),
                ) => {
                    if json {
                        print_json(&serde_json::json!({"clean": false, "damaged": e.to_string()}))?;
                    } else {
                        println!("{e}");
                    }
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&r)?;
            } else {
                outln!(
                    "checked {} ({}) in {}",
                    count(r.store.chunks_checked, "chunk"),
                    human(r.store.bytes_checked),
                    count(r.objects_checked, "object")
                );
                for b in &r.store.corrupt {
                    outln!(
                        "corrupt chunk {} in pack {:012x} at offset {}: {}",
                        b.chunk,
                        b.pack,
                        b.offset,
                        b.why
                    );
                }
                for m in &r.store.missing {
                    outln!("missing chunk {m}");
                }
                for m in &r.store.refcount_mismatches {
                    outln!(
                        "reference count of chunk {}: index has {:?}, metadata holds {:?}",
                        m.chunk,
                        m.found,
                        m.expected
                    );
                }
                for p in &r.store.problems {
                    outln!("problem: {p}");
                }
                for p in &r.staging {
                    outln!("{p}");
                }
                for o in &r.damaged_objects {
                    outln!("damaged object: {o}");
                }
                outln!("{}", if r.clean { "clean" } else { "NOT clean" });
            }
            if !r.clean {
                return Ok(ExitCode::from(1));
            }
        }
        Cmd::Gc {
            store,
            threshold,
            json,
        } => {
            let r = match Repo::open(&store) {
                Ok(mut repo) => {
                    let mut r = repo.gc(threshold, &Bar::new("compacting"))?;
                    r.db_bytes_freed = repo.compact_dbs()?;
                    r
                }
                Err(dedupfs::store::Error::Locked(_)) => {
                    let args = serde_json::json!({ "threshold": threshold });
                    let v = dedupfs::ctl::call(&store, "gc", args).map_err(|e| {
                        anyhow::anyhow!("store {} is mounted, and {e}", store.display())
                    })?;
                    serde_json::from_value(v)?
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&r)?;
            } else {
                outln!(
                    "compacted {}: {} -> {}, {} moved, {} dropped",
                    count(r.packs_compacted, "pack"),
                    human(r.bytes_before),
                    human(r.bytes_after),
                    count(r.chunks_moved, "chunk"),
                    r.chunks_dropped
                );
                if r.db_bytes_freed > 0 {
                    outln!("databases gave back {}", human(r.db_bytes_freed));
                }
            }
        }
        Cmd::Object(cmd) => return object(cmd),
        Cmd::Mount {
            store,
            mountpoint,
            foreground,
            options,
            threads,
        } => return mount(&store, &mountpoint, foreground, &options, threads),
        Cmd::Serve {
            store,
            listen,
            tls_cert,
            tls_key,
            cmd,
        } => {
            let dir = store.ok_or_else(|| anyhow::anyhow!("--store DIR is required"))?;
            let admin = |c: &str, args: serde_json::Value| {
                dedupfs::serve::admin_call(&dir, c, args).map_err(|e| anyhow::anyhow!(e))
            };
            match cmd {
                None => {
                    let tls = match (tls_cert, tls_key) {
                        (Some(cert), Some(key)) => Some(dedupfs::serve::TlsFiles { cert, key }),
                        // clap makes each flag require the other.
                        _ => None,
                    };
                    dedupfs::serve::run(&dir, listen, tls).map_err(|e| anyhow::anyhow!(e))?
                }
                Some(ServeCmd::Client(ClientCmd::Add { name, key, quota })) => {
                    admin(
                        "client_add",
                        serde_json::json!({"name": name, "key": key, "quota": quota}),
                    )?;
                    outln!("added client {name}");
                }
                Some(ServeCmd::Client(ClientCmd::List { json })) => {
                    let v = admin("client_list", serde_json::Value::Null)?;
                    if json {
                        print_json(&v)?;
                    } else {
                        outln!(
                            "{:<20} {:>14} {:>14} {:>14} LAST SEEN",
                            "NAME",
                            "REFERENCED",
                            "PENDING",
                            "QUOTA"
                        );
                        for c in v.as_array().into_iter().flatten() {
                            let seen = c["last_seen"].as_i64().unwrap_or(0);
                            outln!(
                                "{:<20} {:>14} {:>14} {:>14} {}",
                                c["name"].as_str().unwrap_or(""),
                                c["referenced_bytes"],
                                c["pending_bytes"],
                                c["quota"].as_u64().map_or("-".into(), |q| q.to_string()),
                                if seen == 0 {
                                    "never".to_string()
                                } else {
                                    chrono::DateTime::from_timestamp(seen, 0)
                                        .map_or(seen.to_string(), |t| t.to_rfc3339())
                                }
                            );
                        }
                    }
                }
                Some(ServeCmd::Client(ClientCmd::Remove { name })) => {
                    let v = admin("client_remove", serde_json::json!({"name": name}))?;
                    outln!("removed client {name} ({} blobs freed)", v["blobs_freed"]);
                }
            }
        }
        Cmd::Status { target, json } => {
            let store = if target.join(dedupfs::meta::META_FILE).exists() {
                target.clone()
            } else {
                dedupfs::ctl::store_of_mount(&target).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{} is neither a store nor a dedupfs mount",
                        target.display()
                    )
                })?
            };
            let s: dedupfs::status::Status = match Repo::open(&store) {
                Ok(repo) => dedupfs::status::offline(&store, &repo)?,
                Err(dedupfs::store::Error::Locked(_)) => {
                    via_daemon(&store, dedupfs::status::CTL_STATUS)?
                }
                Err(e) => return Err(e.into()),
            };
            if json {
                print_json(&s)?;
            } else {
                outln!("{}", dedupfs::status::render_text(&s).trim_end());
            }
        }
        Cmd::Recover {
            remote,
            host,
            store,
            passphrase_file,
            convergence_secret_file,
            ca_file,
            name,
            json,
        } => {
            use dedupfs::mirror;
            let err = |e: String| anyhow::anyhow!(e);
            let pass = mirror::passphrase(passphrase_file.as_deref(), false).map_err(err)?;
            let secret = match &convergence_secret_file {
                Some(f) => mirror::read_secret_file(f).map_err(err)?,
                None => Vec::new(),
            };
            let ca_file = match ca_file {
                Some(f) => Some(std::path::absolute(f)?),
                None => None,
            };
            let spin = dedupfs::cli::spinner("deriving keys (Argon2id, 256 MiB)");
            let keys = mirror::derive(&pass, &host, secret).map_err(err)?;
            spin.set_message(format!("recovering from {remote}"));
            let cfg = mirror::Config {
                url: remote.trim_end_matches('/').to_string(),
                host,
                ca_file,
                added: mirror::unix_now(),
            };
            let store = std::path::absolute(&store)?;
            let rep = mirror::recover::recover(&store, &name, cfg, keys).map_err(err)?;
            drop(spin);
            if json {
                outln!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                outln!(
                    "recovered {} snapshot(s) into {} ({} blobs, {} fetched); remote {} set up",
                    rep.snapshots.len(),
                    rep.store.display(),
                    rep.blobs_fetched,
                    dedupfs::cli::human(rep.bytes_fetched, 1),
                    rep.remote
                );
            }
        }
        Cmd::Umount { mountpoint } => {
            let store = dedupfs::ctl::store_of_mount(&mountpoint);
            let ok = std::process::Command::new("fusermount3")
                .arg("-u")
                .arg(&mountpoint)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
                || std::process::Command::new("umount")
                    .arg(&mountpoint)
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
            if !ok {
                anyhow::bail!(
                    "could not unmount {0} (if files in it are open, close them, or stop \
                     the daemon with SIGTERM, which detaches it lazily)",
                    mountpoint.display()
                );
            }
            // The daemon finishes pending ingest after the kernel lets go;
            // wait until it has released the store.
            if let Some(store) = store {
                let start = Instant::now();
                while dedupfs::store::Store::lock(&store).is_err() {
                    if start.elapsed() > std::time::Duration::from_secs(600) {
                        anyhow::bail!("daemon of {} did not exit", store.display());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                // The store is ours for a moment: give the databases'
                // free pages back (the daemon cannot while it serves).
                match Repo::open(&store).and_then(|mut r| r.compact_dbs()) {
                    Ok(_) | Err(dedupfs::store::Error::Locked(_)) => {}
                    Err(e) => log::warn!("compacting the databases of {}: {e}", store.display()),
                }
            }
        }
        Cmd::Generate { dir } => {
            use clap::CommandFactory;
            for path in dedupfs::cli::write_docs(Cli::command(), &dir)? {
                outln!("{}", path.display());
            }
        }
        Cmd::Debug(DebugCmd::Pipeline {
            files,
            compression,
            zstd_level,
            threads,
        }) => {
            let start = Instant::now();
            let queue = parking_lot::Mutex::new(files.into_iter());
            let total = std::sync::atomic::AtomicU64::new(0);
            std::thread::scope(|s| -> anyhow::Result<()> {
                let mut hs = Vec::new();
                for _ in 0..threads.max(1) {
                    hs.push(s.spawn(|| -> anyhow::Result<()> {
                        while let Some(f) = queue.lock().next() {
                            let (n, _) = dedupfs::repo::raw_pipeline(
                                ChunkerParams::default(),
                                compression,
                                zstd_level,
                                std::fs::File::open(&f)?,
                            )?;
                            total.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(())
                    }));
                }
                for h in hs {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("pipeline thread panicked"))??;
                }
                Ok(())
            })?;
            let secs = start.elapsed().as_secs_f64();
            let bytes = total.into_inner();
            print_json(&serde_json::json!({
                "bytes": bytes, "seconds": secs, "bytes_per_sec": bytes as f64 / secs
            }))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn object(cmd: ObjectCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ObjectCmd::Put {
            store,
            paths,
            name,
            threads,
            json,
        } => {
            let repo = Repo::open(&store)?;
            let start = Instant::now();
            let infos = if paths.len() == 1 && paths[0] == Path::new("-") {
                let name = name.ok_or_else(|| anyhow::anyhow!("stdin needs --name"))?;
                vec![repo.put_object(OwnerId::LOCAL, &name, io::stdin().lock())?]
            } else {
                let mut files = Vec::new();
                for p in &paths {
                    walk(p, &mut files)?;
                }
                if let Some(n) = name {
                    if files.len() != 1 {
                        anyhow::bail!("--name needs exactly one file");
                    }
                    files[0].0 = n;
                }
                repo.put_files(OwnerId::LOCAL, files, threads, &Bar::new("ingesting"))?
            };
            let bytes: u64 = infos.iter().map(|i| i.size).sum();
            let secs = start.elapsed().as_secs_f64();
            if json {
                print_json(&serde_json::json!({
                    "objects": infos.len(), "bytes": bytes, "seconds": secs,
                    "bytes_per_sec": bytes as f64 / secs
                }))?;
            } else {
                outln!(
                    "stored {}, {} in {secs:.2}s",
                    count(infos.len() as u64, "object"),
                    human(bytes)
                );
            }
        }
        ObjectCmd::Get {
            store,
            name,
            output,
        } => {
            let repo = Repo::open(&store)?;
            match output {
                Some(p) => {
                    let mut f = io::BufWriter::new(std::fs::File::create(&p)?);
                    repo.get_object(OwnerId::LOCAL, &name, &mut f)?;
                    f.flush()?;
                }
                None => {
                    let mut out = io::BufWriter::new(io::stdout().lock());
                    repo.get_object(OwnerId::LOCAL, &name, &mut out)?;
                    out.flush()?;
                }
            }
        }
        ObjectCmd::Rm { store, names } => {
            Repo::open(&store)?.remove_objects(OwnerId::LOCAL, &names)?;
        }
        ObjectCmd::Ls { store, json } => {
            let list = Repo::open(&store)?.list_objects()?;
            if json {
                print_json(&list)?;
            } else {
                outln!("{:>14} {:>8} NAME", "SIZE", "CHUNKS");
                for o in list {
                    outln!("{:>14} {:>8} {}", o.size, o.chunks, o.name);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether `mountpoint` is in the mount table.
fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(target) = std::fs::canonicalize(mountpoint) else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let want = target.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// Asks the daemon that holds `store` to run `cmd`.
fn via_daemon<T: serde::de::DeserializeOwned>(store: &Path, cmd: &str) -> anyhow::Result<T> {
    let v = dedupfs::ctl::call(store, cmd, serde_json::Value::Null)
        .map_err(|e| anyhow::anyhow!("store {} is mounted, and {e}", store.display()))?;
    Ok(serde_json::from_value(v)?)
}

/// Log lines go to the store's log file, and to stderr in the foreground.
struct Tee {
    file: Option<std::fs::File>,
    stderr: bool,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(f) = self.file.as_mut() {
            f.write_all(buf)?;
        }
        if self.stderr {
            io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn mount(
    store: &Path,
    mountpoint: &Path,
    foreground: bool,
    options: &[String],
    threads: usize,
) -> anyhow::Result<ExitCode> {
    use fuser::{Config, MountOption, SessionACL};
    if !mountpoint.is_dir() {
        anyhow::bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    if is_mounted(mountpoint) {
        // The wait below would take the existing mount for ours.
        anyhow::bail!("{} is already mounted", mountpoint.display());
    }
    if !foreground {
        // Daemonize by running ourselves in the foreground, detached, and
        // returning once the mount is up (or the child has failed).
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("mount").arg(store).arg(mountpoint).arg("-f");
        cmd.arg("--threads").arg(threads.to_string());
        if !options.is_empty() {
            cmd.arg("-o").arg(options.join(","));
        }
        cmd.env("DEDUPFS_DAEMON", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn()?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = io::Read::read_to_string(&mut e, &mut err);
                }
                let why = err
                    .trim()
                    .lines()
                    .last()
                    .unwrap_or("see the store's dedupfs.log");
                // The child's error already carries our "dedupfs: ".
                let why = why.strip_prefix("dedupfs: ").unwrap_or(why);
                anyhow::bail!("mount failed ({status}): {why}");
            }
            if is_mounted(mountpoint) {
                return Ok(ExitCode::SUCCESS);
            }
            if start.elapsed() > std::time::Duration::from_secs(60) {
                anyhow::bail!("mount did not come up within 60 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let mut repo = Repo::open_or_init(store, dedupfs::meta::DAEMON_CACHE_BYTES)?;
    let daemon = std::env::var_os("DEDUPFS_DAEMON").is_some();
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(store.join("dedupfs.log"))
        .ok();
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
            .target(env_logger::Target::Pipe(Box::new(Tee {
                file: log_file,
                stderr: !daemon,
            })))
            .build();
    let level = logger.filter();
    if log::set_boxed_logger(Box::new(DaemonLog(logger))).is_ok() {
        log::set_max_level(level);
    }
    // Free pages a crash or an unmount by fusermount3 left: given back
    // before serving, while nothing else holds the databases.
    if let Err(e) = repo.compact_dbs() {
        log::warn!("compacting the databases: {e}");
    }
    let mut config = Config::default();
    let mut read_only = false;
    let mut show_snapdir = false;
    let mut passthrough = true;
    config.mount_options.push(MountOption::FSName(
        std::fs::canonicalize(store)?.to_string_lossy().into_owned(),
    ));
    config
        .mount_options
        .push(MountOption::Subtype("dedupfs".into()));
    config.mount_options.push(MountOption::DefaultPermissions);
    let (metrics_at, options) = dedupfs::status::metrics_options(options)?;
    for o in &options {
        match o.as_str() {
            "allow_other" => config.acl = SessionACL::All,
            "allow_root" => config.acl = SessionACL::RootAndOwner,
            "ro" => {
                read_only = true;
                config.mount_options.push(MountOption::RO);
            }
            "rw" | "default_permissions" | "" => {}
            "dev" => config.mount_options.push(MountOption::Dev),
            "nodev" => config.mount_options.push(MountOption::NoDev),
            "suid" => config.mount_options.push(MountOption::Suid),
            "nosuid" => config.mount_options.push(MountOption::NoSuid),
            "exec" => config.mount_options.push(MountOption::Exec),
            "noexec" => config.mount_options.push(MountOption::NoExec),
            "noatime" => config.mount_options.push(MountOption::NoAtime),
            "snapdir=visible" => show_snapdir = true,
            "snapdir=hidden" => show_snapdir = false,
            "passthrough" => passthrough = true,
            "nopassthrough" => passthrough = false,
            other => log::warn!("ignoring mount option '{other}'"),
        }
    }
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    let vol = dedupfs::fs::volume::Volume::start(repo, read_only, 2)?;
    vol.show_snapdir(show_snapdir);
    let shutdown = dedupfs::fs::Shutdown::new(vol.clone());
    // fuser unmounts again when the session ends; after `fusermount3 -u`
    // (or our lazy detach) that failed with EINVAL and a warning on every
    // clean unmount. The handle is taken here at the session's end instead.
    let mount_handle: Arc<parking_lot::Mutex<Option<fuser::SessionUnmounter>>> =
        Arc::new(parking_lot::Mutex::new(None));
    let taken = mount_handle.clone();
    let fs = dedupfs::fs::DedupFs::new(vol.clone())
        .with_passthrough(passthrough)
        .with_shutdown(shutdown.clone())
        .at_destroy(Box::new(move || {
            if let Some(mut m) = taken.lock().take()
                && let Err(e) = m.unmount()
            {
                log::debug!("the mount was already gone: {e}");
            }
        }));
    // Before the mount: resolving the path afterwards would ask the
    // daemon, which is not serving yet.
    let canonical = std::fs::canonicalize(mountpoint)?;
    let status = dedupfs::status::Daemon::new(vol.clone(), store, mountpoint);
    let metrics_http = match metrics_at {
        Some((addr, remote)) => {
            let s = status.clone();
            Some(dedupfs::status::HttpServer::start(
                addr,
                remote,
                Arc::new(move || s.metrics_text()),
            )?)
        }
        None => None,
    };
    let mut session = fuser::Session::new(fs, mountpoint, &config)?;
    dedupfs::fs::readahead::raise_readahead(&canonical, dedupfs::fs::readahead::READAHEAD_KIB);
    let notifier = session.notifier();
    vol.set_invalidator(Box::new(move |what| {
        use dedupfs::fs::volume::Invalidate;
        use std::os::unix::ffi::OsStrExt;
        let r = match what {
            Invalidate::Inode(ino) => notifier.inval_inode(fuser::INodeNo(ino), 0, 0),
            Invalidate::Entry(parent, name) => {
                notifier.inval_entry(fuser::INodeNo(parent), std::ffi::OsStr::from_bytes(&name))
            }
        };
        // ENOENT: the kernel had nothing cached; nothing to do.
        if let Err(e) = r
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            log::debug!("cache invalidation: {e}");
        }
    }));
    let mirror = {
        let weak = Arc::downgrade(&vol);
        Arc::new(dedupfs::mirror::worker::Worker::start(
            store.to_path_buf(),
            Box::new(
                move |f: &mut dyn FnMut(&dedupfs::repo::Repo)| match weak.upgrade() {
                    Some(v) if v.is_running() => {
                        f(v.repo());
                        true
                    }
                    _ => false,
                },
            ),
        )?)
    };
    let handler_mirror = mirror.clone();
    let handler_store = store.to_path_buf();
    let handler_vol = vol.clone();
    let handler: std::sync::Arc<dedupfs::ctl::Handler> =
        std::sync::Arc::new(move |cmd: &str, args: &serde_json::Value| match cmd {
            "stats" => handler_vol
                .repo()
                .stats()
                .map_err(|e| e.to_string())
                .and_then(|s| serde_json::to_value(s).map_err(|e| e.to_string())),
            "fsck" => handler_vol
                .quiesced(|repo| repo.fsck(&dedupfs::NoProgress))
                .map_err(|e| e.to_string())
                .and_then(|r| serde_json::to_value(r).map_err(|e| e.to_string())),
            "gc" => {
                let threshold = args
                    .get("threshold")
                    .and_then(|t| t.as_f64())
                    .ok_or("gc: missing threshold")?;
                handler_vol
                    .gc(threshold)
                    .map_err(|e| e.to_string())
                    .and_then(|r| serde_json::to_value(r).map_err(|e| e.to_string()))
            }
            "sync" => {
                // Pending ingest committed and metadata durable (benches
                // and scripts wait on this).
                // {"all": true}: until nothing is staged at all (no writer
                // left open), up to 60 s.
                if args.get("all").and_then(|a| a.as_bool()) == Some(true) {
                    if !handler_vol.wait_all_committed(std::time::Duration::from_secs(60)) {
                        return Err("files are still open for writing".into());
                    }
                } else {
                    handler_vol.wait_ingest_idle();
                }
                handler_vol
                    .sync_meta()
                    .map(|_| serde_json::Value::Null)
                    .map_err(|e| e.to_string())
            }
            dedupfs::snapcmd::CTL_COMMAND => {
                let r = dedupfs::snapcmd::handle(&handler_vol, args);
                if r.is_ok() && args.get("op").and_then(|o| o.as_str()) == Some("create") {
                    handler_mirror.wake();
                }
                r
            }
            dedupfs::mirror::cmd::CTL_COMMAND => dedupfs::mirror::cmd::handle(
                handler_vol.repo(),
                &handler_store,
                args,
                Some(&handler_mirror),
            ),
            dedupfs::status::CTL_STATUS | dedupfs::status::CTL_METRICS => status.handle(cmd),
            other => Err(format!("unknown command '{other}'")),
        });
    let _ctl = dedupfs::ctl::Server::start(store, handler)?;
    let _timer = dedupfs::snapcmd::start_policy_timer(&vol)?;
    *mount_handle.lock() = Some(session.unmount_callable());
    let ended = Arc::new(Ended::default());
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])?;
    let handle = signals.handle();
    {
        let (vol, shutdown, ended) = (vol.clone(), shutdown.clone(), ended.clone());
        std::thread::spawn(move || {
            let mut stopping = false;
            for sig in signals.forever() {
                if stopping {
                    log::info!("signal {sig}: already stopping");
                    continue;
                }
                stopping = true;
                log::info!("signal {sig}: stopping");
                let (vol, shutdown, ended) = (vol.clone(), shutdown.clone(), ended.clone());
                let mnt = canonical.clone();
                let _ = std::thread::Builder::new()
                    .name("stop".into())
                    .spawn(move || stop_daemon(&vol, &shutdown, &mnt, &ended));
            }
        });
    }
    log::info!("mounted {} on {}", store.display(), mountpoint.display());
    let res = session.run();
    drop(metrics_http);
    handle.close();
    shutdown.run();
    ended.set();
    log::info!("unmounted {}", mountpoint.display());
    res?;
    Ok(ExitCode::SUCCESS)
}

/// Set once the session has ended and the volume is shut down.
#[derive(Default)]
struct Ended {
    done: parking_lot::Mutex<bool>,
    cv: parking_lot::Condvar,
}

impl Ended {
    fn set(&self) {
        *self.done.lock() = true;
        self.cv.notify_all();
    }

    /// Whether it ended within `limit`.
    fn wait(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut d = self.done.lock();
        while !*d {
            if self.cv.wait_until(&mut d, deadline).timed_out() {
                return *d;
            }
        }
        true
    }
}

/// A stop on SIGTERM (or INT, HUP) that ends in bounded time whatever is
/// open: a plain unmount fails with EBUSY while any file in the mount is
/// open, and systemd then waited for SIGKILL. Commits what is pending,
/// detaches the mount lazily (the kernel sends no DESTROY while files stay
/// open), then ends the connection through fusectl, or failing that shuts
/// the volume down and exits (the kernel aborts the connection when the
/// process goes; open handles then get ENOTCONN).
fn stop_daemon(
    vol: &dedupfs::fs::volume::Volume,
    shutdown: &dedupfs::fs::Shutdown,
    mnt: &Path,
    ended: &Ended,
) {
    vol.wait_ingest_idle();
    if let Err(e) = vol.sync_meta() {
        log::error!("stopping: metadata sync failed: {e}");
    }
    log::info!("stopping: pending ingest committed and metadata durable");
    let conn = fuse_connection_of(mnt);
    let detached = ["fusermount3 -u -z", "umount -l"].iter().any(|cmd| {
        let mut parts = cmd.split(' ');
        let Some(prog) = parts.next() else {
            return false;
        };
        std::process::Command::new(prog)
            .args(parts)
            .arg(mnt)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if detached {
        log::info!("stopping: detached {} (lazy unmount)", mnt.display());
    } else {
        log::error!("stopping: could not detach {}", mnt.display());
    }
    if ended.wait(Duration::from_secs(2)) {
        return;
    }
    if let Some(conn) = conn {
        let abort = format!("/sys/fs/fuse/connections/{conn}/abort");
        if std::fs::write(&abort, "1").is_ok() {
            log::info!("stopping: files are still open; ended FUSE connection {conn}");
            if ended.wait(Duration::from_secs(10)) {
                return;
            }
        }
    }
    log::info!("stopping: files are still open; closing them and exiting");
    shutdown.run();
    log::info!("unmounted {}", mnt.display());
    std::process::exit(0);
}

/// The FUSE connection number of the mount at `mnt` (the minor of its
/// device), from /proc/self/mountinfo: a stat of the mountpoint would ask
/// the daemon.
fn fuse_connection_of(mnt: &Path) -> Option<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_string_lossy().replace(' ', "\\040");
    info.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let dev = f.nth(2)?;
        let point = f.nth(1)?;
        if point != want {
            return None;
        }
        dev.split_once(':')?.1.parse().ok()
    })
}

/// The daemon's logger: env_logger, less one message of fuser's that is
/// not an error. fuser logs every failed reply at error level; ENOENT from
/// /dev/fuse means the kernel had already given the request up (the caller
/// was interrupted by a signal, as fsstress does), so nothing was lost.
/// Those go to debug; any other failed reply stays an error.
struct DaemonLog(env_logger::Logger);

impl log::Log for DaemonLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        self.0.enabled(m)
    }

    fn log(&self, r: &log::Record) {
        if r.level() == log::Level::Error
            && r.target().starts_with("fuser::reply")
            && r.args().to_string().ends_with("(os error 2)")
        {
            log::debug!("reply to an interrupted request dropped: {}", r.args());
            return;
        }
        self.0.log(r)
    }

    fn flush(&self) {
        self.0.flush()
    }
}

/// `mount -t fuse.dedupfs STORE MNT -o OPTS` runs `dedupfs STORE MNT -o OPTS`:
/// treat a first argument that is not a subcommand as `mount`.
fn args() -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = std::env::args_os().collect();
    const SUBCOMMANDS: [&str; 15] = [
        "init", "stats", "fsck", "gc", "object", "debug", "generate", "mount", "umount", "status",
        "recover", "serve", "help", "-h", "--help",
    ];
    if let Some(first) = a.get(1).and_then(|s| s.to_str())
        && !SUBCOMMANDS.contains(&first)
        && !first.starts_with('-')
        && a.len() >= 3
    {
        a.insert(1, "mount".into());
    }
    a
}

fn main() -> ExitCode {
    let is_mount = args().get(1).is_some_and(|s| s == "mount");
    if !is_mount {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    }
    dedupfs::guard::install_hook(if is_mount {
        log::Level::Error
    } else {
        log::Level::Debug
    });
    let argv = args();
    let cli = Cli::parse_from(argv.clone());
    match dedupfs::guard::catch(|| run(cli)) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("dedupfs: {e:#}");
            ExitCode::from(2)
        }
        Err(p) => {
            // Most likely a database damaged outside redb: say which, and
            // what repairs it, in one line.
            let store = argv
                .iter()
                .skip(1)
                .map(PathBuf::from)
                .find(|p| p.join(dedupfs::meta::META_FILE).is_file());
            match store.and_then(|s| Repo::diagnose(&s)) {
                Some(e) => eprintln!("dedupfs: {e}"),
                None => eprintln!("dedupfs: {p}"),
            }
            ExitCode::from(2)
        }
    }
}

//! `dedupfs`: a thin command-line shell over the library.

use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use dedupfs::Progress;
use dedupfs::format::{ChunkerParams, Compression, OwnerId};
use dedupfs::repo::Repo;
use dedupfs::store::InitOptions;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "dedupfs",
    version,
    about = "A deduplicating filesystem and chunkstore"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a store.
    Init {
        store: PathBuf,
        #[arg(long, default_value_t = ChunkerParams::default().min)]
        chunk_min: u32,
        #[arg(long, default_value_t = ChunkerParams::default().avg)]
        chunk_avg: u32,
        #[arg(long, default_value_t = ChunkerParams::default().max)]
        chunk_max: u32,
        /// zstd, lz4 or none.
        #[arg(long, default_value = "zstd")]
        compression: Compression,
    },
    /// Space used, dedup and compression ratios.
    Stats {
        store: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Verify every blob, reference count and pack; --repair rebuilds the index.
    Fsck {
        store: PathBuf,
        #[arg(long)]
        repair: bool,
        #[arg(long)]
        json: bool,
    },
    /// Compact packs whose dead fraction is at least the threshold.
    Gc {
        store: PathBuf,
        #[arg(long, default_value_t = 0.2)]
        threshold: f64,
        #[arg(long)]
        json: bool,
    },
    /// Named objects: byte streams kept as chunk lists (tools, tests, bench).
    #[command(subcommand)]
    Object(ObjectCmd),
    /// Internal measurements used by scripts/bench.
    #[command(subcommand, hide = true)]
    Debug(DebugCmd),
}

#[derive(Subcommand)]
enum ObjectCmd {
    /// Store files (directories are walked) or stdin ("-", needs --name).
    Put {
        store: PathBuf,
        paths: Vec<PathBuf>,
        /// Object name for a single file or stdin.
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Write an object's bytes to stdout or a file.
    Get {
        store: PathBuf,
        name: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Remove objects.
    Rm { store: PathBuf, names: Vec<String> },
    /// List objects.
    Ls {
        store: PathBuf,
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

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
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
        } => {
            let opts = InitOptions {
                chunker: ChunkerParams {
                    min: chunk_min,
                    avg: chunk_avg,
                    max: chunk_max,
                },
                compression,
            };
            Repo::init(&store, &opts)?;
            log::info!("created store {}", store.display());
        }
        Cmd::Stats { store, json } => {
            let s = Repo::open(&store)?.stats()?;
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "logical bytes:  {} ({})",
                    s.logical_bytes,
                    human(s.logical_bytes)
                );
                println!(
                    "unique bytes:   {} ({})",
                    s.unique_bytes,
                    human(s.unique_bytes)
                );
                println!(
                    "stored bytes:   {} ({})",
                    s.stored_bytes,
                    human(s.stored_bytes)
                );
                println!("pack bytes:     {} ({})", s.pack_bytes, human(s.pack_bytes));
                println!("chunks:         {} ({} live)", s.chunks, s.live_chunks);
                println!("dedup ratio:    {:.3}", s.dedup_ratio);
                println!("compression:    {:.3}", s.compression_ratio);
                println!("packs:          {}", s.pack_count);
                println!("dead fraction:  {:.3}", s.dead_fraction);
                println!("objects:        {}", s.objects);
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
                    println!(
                        "rebuilt index: {} packs, {} chunks, {} damaged records, {} referenced chunks missing",
                        r.packs_scanned,
                        r.chunks_found,
                        r.damaged_records,
                        r.missing.len()
                    );
                }
            }
            let repo = Repo::open(&store)?;
            let r = repo.fsck(&Bar::new("checking"))?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "checked {} chunks ({}) in {} objects",
                    r.store.chunks_checked,
                    human(r.store.bytes_checked),
                    r.objects_checked
                );
                for b in &r.store.corrupt {
                    println!(
                        "corrupt chunk {} in pack {:012x} at offset {}: {}",
                        b.chunk, b.pack, b.offset, b.why
                    );
                }
                for m in &r.store.missing {
                    println!("missing chunk {m}");
                }
                for m in &r.store.refcount_mismatches {
                    println!(
                        "reference count of chunk {}: index has {:?}, metadata holds {:?}",
                        m.chunk, m.found, m.expected
                    );
                }
                for p in &r.store.problems {
                    println!("problem: {p}");
                }
                for o in &r.damaged_objects {
                    println!("damaged object: {o}");
                }
                println!("{}", if r.clean { "clean" } else { "NOT clean" });
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
            let repo = Repo::open(&store)?;
            let r = repo.gc(threshold, &Bar::new("compacting"))?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "compacted {} packs: {} -> {}, {} chunks moved, {} dropped",
                    r.packs_compacted,
                    human(r.bytes_before),
                    human(r.bytes_after),
                    r.chunks_moved,
                    r.chunks_dropped
                );
            }
        }
        Cmd::Object(cmd) => return object(cmd),
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
                println!(
                    "stored {} objects, {} in {secs:.2}s",
                    infos.len(),
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
                for o in list {
                    println!("{:>14} {:>8} {}", o.size, o.chunks, o.name);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dedupfs: {e:#}");
            ExitCode::from(2)
        }
    }
}

//! What the two command-line shells (`dedupfs`, `snapctl`) share about
//! their output: a reader that stops reading (`| head`) ends a command
//! quietly instead of panicking in `println!`; and their manual pages and
//! shell completions, generated from the clap definitions. Only the binaries
//! use it; the library itself never prints. Calls nothing of the crate.

use std::path::PathBuf;

/// `println!` that ends the process quietly when stdout is a closed pipe,
/// where `println!` panics. `$prog` names the command for other errors.
#[macro_export]
macro_rules! outln {
    ($prog:literal; $($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::cli::output_failed($prog, &e)
        }
    }};
}

/// Stdout is gone: a closed pipe ends the command quietly (what a reader
/// that stopped reading wants); anything else is an error.
pub fn output_failed(prog: &str, e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("{prog}: writing output: {e}");
    std::process::exit(2);
}

/// Whether an error is a write to a closed pipe.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let kind = match c.downcast_ref::<std::io::Error>() {
            Some(io) => Some(io.kind()),
            None => c
                .downcast_ref::<serde_json::Error>()
                .and_then(|j| j.io_error_kind()),
        };
        kind == Some(std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes the manual pages of `cmd` and of each visible subcommand
/// (`dedupfs.1`, `dedupfs-mount.1`, `dedupfs-object-put.1`, ...) and its
/// completions for bash, zsh and fish under `dir`, laid out as under
/// `/usr/local/share` so that installing them is a copy:
/// `man/man1/`, `bash-completion/completions/`, `zsh/site-functions/`,
/// `fish/vendor_completions.d/`. Returns the files written.
///
/// Generated from the clap definitions at build or install time, so the
/// pages never drift from `--help`.
pub fn write_docs(cmd: clap::Command, dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    use clap_complete::Shell;

    // No `help` subcommand page: it only repeats the others.
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let name = cmd.get_name().to_owned();
    let source = format!("{name} {}", cmd.get_version().unwrap_or_default());
    let mut written = Vec::new();

    let man_dir = dir.join("man/man1");
    std::fs::create_dir_all(&man_dir)?;
    write_man_pages(&cmd, &source, &man_dir, &mut written)?;

    for (shell, sub, file) in [
        (Shell::Bash, "bash-completion/completions", name.clone()),
        (Shell::Zsh, "zsh/site-functions", format!("_{name}")),
        (
            Shell::Fish,
            "fish/vendor_completions.d",
            format!("{name}.fish"),
        ),
    ] {
        let path = dir.join(sub).join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        clap_complete::generate(shell, &mut visible(&cmd), &name, &mut out);
        std::io::Write::flush(&mut out)?;
        written.push(path);
    }
    Ok(written)
}

/// `cmd` without its hidden subcommands and arguments, for completions:
/// clap_complete offers hidden subcommands (`debug`, `generate`) unless
/// they are gone from the command it is given.
fn visible(cmd: &clap::Command) -> clap::Command {
    let mut out = clap::Command::new(cmd.get_name().to_owned())
        .disable_help_subcommand(true)
        .args(
            cmd.get_arguments()
                .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
                .cloned(),
        )
        .subcommands(
            cmd.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(visible),
        );
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out
}

/// One page for `cmd`, then one for each subcommand that is not hidden,
/// depth first. Every page names the same source (`dedupfs 0.1.0`), where
/// clap_mangen would leave the subcommands' without a version.
fn write_man_pages(
    cmd: &clap::Command,
    source: &str,
    dir: &std::path::Path,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let extra = cmd
        .get_after_long_help()
        .or_else(|| cmd.get_after_help())
        .map(|s| s.to_string());
    // The sections after --help's text go before VERSION, which is written
    // here last for that.
    let version = cmd.get_version().map(str::to_owned);
    let bare = cmd
        .clone()
        .after_help(None::<&str>)
        .after_long_help(None::<&str>)
        .version(None::<&str>);
    let man = clap_mangen::Man::new(bare)
        .source(source)
        .manual("dedupfs manual");
    let mut page = Vec::new();
    man.render(&mut page)?;
    let mut roff = roff::Roff::new();
    if let Some(extra) = extra {
        after_help_sections(&extra, &mut roff);
    }
    if let Some(parent) = cmd.get_display_name().and_then(|n| n.rsplit_once('-')) {
        roff.control("SH", ["SEE ALSO"]);
        roff.text([roff::bold(parent.0), roff::roman("(1)")]);
    }
    if let Some(v) = version {
        roff.control("SH", ["VERSION"]);
        roff.text([roff::roman(format!("v{v}"))]);
    }
    roff.to_writer(&mut page)?;
    let path = dir.join(man.get_filename());
    std::fs::write(&path, page)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, source, dir, written)?;
    }
    Ok(())
}

/// The text after `--help` as manual sections, where clap_mangen would pour
/// it into one filled EXTRA section: a paragraph's first line that starts
/// with a capital and ends in ':' starts a section ("Examples:" becomes
/// EXAMPLES), other unindented lines are filled text, a blank line a new
/// paragraph, and indented lines (commands, fstab lines, file lists) are
/// kept as they are.
fn after_help_sections(text: &str, roff: &mut roff::Roff) {
    let mut literal = false;
    let mut paragraph_start = true;
    for line in text.lines() {
        let starts_paragraph = std::mem::replace(&mut paragraph_start, line.trim().is_empty());
        let indented = line.starts_with(' ');
        if indented != literal {
            if indented {
                roff.control("RS", ["4"]).control("nf", []);
            } else {
                roff.control("fi", []).control("RE", []);
            }
            literal = indented;
        }
        if indented {
            roff.text([roff::roman(line.trim_start())]);
        } else if line.trim().is_empty() {
            roff.control("PP", []);
        } else if let Some(heading) = line.strip_suffix(':')
            && starts_paragraph
            && heading.starts_with(|c: char| c.is_ascii_uppercase())
        {
            roff.control("SH", [heading.to_uppercase().as_str()]);
        } else {
            roff.text([roff::roman(line)]);
        }
    }
    if literal {
        roff.control("fi", []).control("RE", []);
    }
}

/// "1 chunk", "2 chunks".
pub fn count(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Bytes in binary units with `places` decimals ("512 B", "1.50 MiB").
pub fn human(n: u64, places: usize) -> String {
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
        format!("{v:.places$} {}", U[i])
    }
}

/// A spinner naming a long operation, on stderr when it is a terminal;
/// hidden otherwise. Drop it to clear it.
pub fn spinner(msg: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {elapsed}") {
        pb.set_style(style);
    }
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_have_a_page_per_visible_subcommand_and_sections_from_after_help() {
        let cmd = clap::Command::new("tool")
            .version("1.2.3")
            .after_long_help("Examples:\n  tool run x\n\nMore text: not a heading.")
            .subcommand(clap::Command::new("run").after_help("Example:\n  tool run y"))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        let written = write_docs(cmd, dir.path()).unwrap();
        let man = dir.path().join("man/man1");
        assert!(man.join("tool.1").is_file());
        assert!(man.join("tool-run.1").is_file());
        assert!(!man.join("tool-secret.1").exists());
        assert!(!man.join("tool-help.1").exists());
        for f in [
            "bash-completion/completions/tool",
            "zsh/site-functions/_tool",
            "fish/vendor_completions.d/tool.fish",
        ] {
            assert!(written.contains(&dir.path().join(f)), "{f} not written");
            let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(text.contains("run"), "{f}");
            assert!(!text.contains("secret"), "{f} offers a hidden subcommand");
        }
        let top = std::fs::read_to_string(man.join("tool.1")).unwrap();
        assert!(top.contains(".SH EXAMPLES\n.RS 4\n.nf\ntool run x\n.fi\n.RE\n"));
        assert!(!top.contains(".SH MORE TEXT"));
        assert!(!top.contains("EXTRA"));
        let run = std::fs::read_to_string(man.join("tool-run.1")).unwrap();
        assert!(run.contains(".SH EXAMPLE\n"));
        assert!(run.contains(".SH \"SEE ALSO\"") || run.contains(".SH SEE ALSO"));
        assert!(run.contains("tool 1.2.3"), "every page names the version");
    }

    #[test]
    fn sizes_and_counts_read_as_text() {
        assert_eq!(human(512, 2), "512 B");
        assert_eq!(human(1536, 2), "1.50 KiB");
        assert_eq!(human(1536, 1), "1.5 KiB");
        assert_eq!(human(3 << 30, 1), "3.0 GiB");
        assert_eq!(count(1, "chunk"), "1 chunk");
        assert_eq!(count(2, "chunk"), "2 chunks");
    }
}

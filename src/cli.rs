//! What the two command-line shells (`dedupfs`, `snapctl`) share about
//! their output: a reader that stops reading (`| head`) ends a command
//! quietly instead of panicking in `println!`. Only the binaries use it;
//! the library itself never prints. Calls nothing of the crate.

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

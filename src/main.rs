//! The `s3crypt` command (also installed as `mount.s3crypt`, the mount(8) helper). All logic lives in the library.
use clap::Parser;
use s3crypt::cli::{self, Cli, Command, MountOptions};
use std::process::ExitCode;

/// mimalloc reuses the large block buffers of the read and write paths instead of mapping and zeroing fresh
/// pages for each, which glibc's allocator does for allocations of this size.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc commits its arenas eagerly where the kernel overcommits; with transparent huge pages that makes
/// memory resident that no buffer uses, and the daemon's peak RSS followed the arenas, not the buffers. Its purge
/// delay stays at mimalloc's default (10 ms): a freed part or GET buffer is handed to the next one instead of
/// going back to the kernel and coming back as fresh pages that the kernel must zero. With the delay at 0 that
/// zeroing led the profile (over the in-memory store a 1 GiB read ran at 1.3 GB/s, 1.5-1.8 with the delay; a
/// 1 GiB write to S3 at 220 MB/s, 260 with it).
///
/// Transparent huge pages are off for the process (mimalloc's `allow_thp`, which also sets
/// `PR_SET_THP_DISABLE`). The daemon's large buffers live for milliseconds; a fresh 2 MiB page is zeroed whole
/// on its first touch, and on the machine of docs/BENCHMARKS.md that zeroing was two thirds of the daemon's CPU
/// in a write over the in-memory store (whose parts are all fresh memory). Without huge pages that write went
/// from 350-420 to 540-550 MB/s, and a cold 1 GiB read from S3 peaked at 70-85 MiB RSS instead of 115-120, at the
/// same speed.
///
/// Set before any thread starts; `MIMALLOC_ARENA_EAGER_COMMIT` and `MIMALLOC_ALLOW_THP` in the environment still
/// win.
fn tune_allocator() {
    /// Indexes in mimalloc.h's `mi_option_t` (v3, the version libmimalloc-sys builds); the Rust bindings do not
    /// name them.
    const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
        // SAFETY: sets a process-wide allocator option; no other thread exists yet.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: as above. prctl(PR_SET_THP_DISABLE) takes no pointers; it covers mappings made before it too
        // (mimalloc only sets it itself when the option is read at its start-up).
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_ALLOW_THP, 0);
            libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // Before any thread starts: takes the readiness pipe of a background start out of the environment.
    s3crypt::notify::Readiness::init();
    let mut args: Vec<String> = std::env::args().collect();
    if args.first().is_some_and(|a| cli::is_mount_helper(a)) {
        match cli::mount_helper_args(&args[1..]) {
            // mount -f: the options were checked and nothing is to be mounted.
            Ok(a) if a.is_empty() => return ExitCode::SUCCESS,
            Ok(a) => args = std::iter::once("s3crypt".to_string()).chain(a).collect(),
            Err(e) => {
                eprintln!("mount.s3crypt: {e}");
                // mount(8) convention: 32 is "mount failure".
                return ExitCode::from(32);
            }
        }
    }
    let cli = Cli::parse_from(&args);
    init_logging(&cli);
    match run(cli, &args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("s3crypt: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The log filter: `RUST_LOG` if set, else the `log_level=` mount option, else `-v`/`-vv`, else info. Colour only
/// on a terminal; under systemd (journald adds its own timestamp) no timestamp.
fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    let words = match &cli.command {
        Command::Mount { options, .. }
        | Command::Cat { options, .. }
        | Command::Put { options, .. }
        | Command::Verify { options, .. }
        | Command::Rekey { options, .. } => options.clone(),
        Command::Keygen { .. } => Vec::new(),
    };
    // A bad option is reported (after this) by the command; here it only means no level from the options.
    let from_option = MountOptions::parse(&words).ok().and_then(|o| o.log_level);
    let default = match (from_option, cli.verbose) {
        (Some(level), _) => level.replace(';', ","),
        (None, 0) => "info".to_string(),
        (None, 1) => "debug".to_string(),
        (None, _) => "trace".to_string(),
    };
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default));
    if !std::io::stderr().is_terminal() {
        b.write_style(env_logger::WriteStyle::Never);
    }
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.format_timestamp(None);
    }
    b.init();
}

/// `s3crypt verify`: 0 all good, 1 a bad object, 2 the check could not run, 130 interrupted.
fn verify(source: &str, words: &[String], json: bool) -> ExitCode {
    let report = match options(words).and_then(|opts| s3crypt::verify::run(source, opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("s3crypt verify: {e:#}");
            return ExitCode::from(2);
        }
    };
    let bad = report.bad.len();
    if json {
        let (bucket, prefix) = cli::parse_volume_url(source).unwrap_or_default();
        println!("{}", report.to_json(&bucket, &prefix));
    }
    eprintln!(
        "s3crypt verify: {} objects, {} bytes checked: {} good, {bad} bad{}",
        report.objects,
        report.bytes,
        report.objects - bad as u64,
        if report.interrupted {
            " (interrupted: not every object was checked)"
        } else {
            ""
        }
    );
    ExitCode::from(s3crypt::verify::exit_code(&report))
}

/// `s3crypt rekey`: 0 done, 1 an object failed, 2 could not start, 130 interrupted.
fn rekey(source: &str, words: &[String], to: &[String], dry_run: bool, json: bool) -> ExitCode {
    let new_words: Vec<String> = words.iter().chain(to).cloned().collect();
    let run = options(words)
        .and_then(|old| Ok((old, options(&new_words)?)))
        .and_then(|(old, new)| s3crypt::rekey::run(source, old, new, dry_run));
    let report = match run {
        Ok(r) => r,
        Err(e) => {
            eprintln!("s3crypt rekey: {e:#}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{}", report.to_json());
    }
    eprintln!(
        "s3crypt rekey: {} objects: {} {}, {} already under the new key, {} failed; {} bytes copied inside S3, {} \
         KMS calls; volume descriptor {}{}",
        report.objects,
        report.rekeyed,
        if report.dry_run { "would be rekeyed" } else { "rekeyed" },
        report.already,
        report.failed.len(),
        report.bytes_copied,
        report.kms_calls,
        if report.descriptor_resealed {
            "re-sealed"
        } else {
            "unchanged"
        },
        if report.interrupted {
            " (interrupted: run rekey again to finish)"
        } else {
            ""
        }
    );
    ExitCode::from(report.exit_code())
}

fn options(words: &[String]) -> anyhow::Result<MountOptions> {
    let opts = MountOptions::parse(words)?;
    opts.validate()?;
    Ok(opts)
}

/// Runs a command: its exit status (verify has several), or the error to print (status 1).
fn run(cli: Cli, args: &[String]) -> anyhow::Result<ExitCode> {
    let ok = |()| ExitCode::SUCCESS;
    match cli.command {
        Command::Mount {
            source,
            mountpoint,
            foreground,
            options: words,
        } => {
            let opts = options(&words)?;
            if !foreground {
                return s3crypt::daemon::spawn_background(&args[1..])
                    .map(ok)
                    .map_err(anyhow::Error::msg);
            }
            s3crypt::run::mount(&source, &mountpoint, opts).map(ok)
        }
        Command::Cat { source, options: words } => s3crypt::run::cat(&source, options(&words)?).map(ok),
        Command::Put {
            file,
            dest,
            options: words,
        } => s3crypt::run::put(&file, &dest, options(&words)?).map(ok),
        Command::Verify {
            source,
            options: words,
            json,
        } => Ok(verify(&source, &words, json)),
        Command::Rekey {
            source,
            options: words,
            to,
            dry_run,
            json,
        } => Ok(rekey(&source, &words, &to, dry_run, json)),
        Command::Keygen { file } => {
            s3crypt::keys::keygen(&file)?;
            eprintln!(
                "wrote a new 32-byte master key to {} (mode 0600); keep a copy: without it the data cannot be read",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! Background start: `s3crypt mount` without `-f`, which is also how the mount(8) helper runs.
//!
//! mount(8) expects its helper to return once the file system is mounted, with exit status 0, or to fail with a
//! message. A FUSE daemon has to keep running, so the command re-executes itself with `--foreground` as a new
//! session leader (no controlling terminal, out of the caller's process group) and waits on a pipe until the
//! daemon reports, through [`crate::notify::Readiness`], that the mount answers (`READY`) or why it failed
//! (`FAILED message`). If the daemon dies before reporting, the pipe reaches end-of-file and the caller gets the
//! exit status and the log file to read.
//!
//! Why re-exec rather than fork: the parent may already have threads (the tokio runtime, the logger), and only
//! exec gives the daemon a clean process. Why a pipe rather than polling the mount point: the daemon knows *why*
//! it failed (wrong key, no such bucket) and the user should see that message, not a timeout.
//!
//! The daemon's standard output and error go to a log file, appended:
//! - `$S3CRYPT_LOG_FILE` if set;
//! - as root, `/run/s3crypt/<mount point, systemd-escaped>.log`, e.g. `/run/s3crypt/mnt-data.log`;
//! - otherwise the same name in `$XDG_RUNTIME_DIR/s3crypt/`, or in `/tmp/s3crypt-<uid>/`.
//!
//! Standard input is `/dev/null`.
use crate::cli::{Cli, Command as CliCommand};
use crate::notify::{Report, READY_FD_ENV};
use clap::Parser;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `s3crypt` again with `args` (the arguments after the program name, e.g. `["mount", SOURCE, DIR, "-o",
/// OPTS]`) plus `--foreground`, in the background, and waits until it reports. `Ok(())` once the mount answers;
/// otherwise the daemon's message, or its exit status and log file, for the caller to print before exiting
/// non-zero.
pub fn spawn_background(args: &[String]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the s3crypt executable: {e}"))?;
    let log = log_path(args)?;
    let mut cmd = Command::new(exe);
    cmd.arg0("s3crypt").args(foreground_args(args));
    spawn_and_wait(cmd, &log)
}

/// `args` with `--foreground` added, before a `--` separator if there is one (after it, it would be positional).
fn foreground_args(args: &[String]) -> Vec<String> {
    let mut out = args.to_vec();
    let at = out.iter().position(|a| a == "--").unwrap_or(out.len());
    out.insert(at, "--foreground".to_string());
    out
}

/// Runs `cmd` as a new session with the readiness pipe and the log file, and waits for its report.
fn spawn_and_wait(mut cmd: Command, log: &Path) -> Result<(), String> {
    let (reader, writer) = pipe().map_err(|e| format!("pipe: {e}"))?;
    let out = open_log(log)?;
    let err = out
        .try_clone()
        .map_err(|e| format!("log file {}: {e}", log.display()))?;
    let wfd = writer.as_raw_fd();
    cmd.env(READY_FD_ENV, wfd.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    // SAFETY: setsid and fcntl are async-signal-safe, as code between fork and exec must be. Clearing
    // close-on-exec here, in the child only, lets the daemon inherit the write end while no other process that
    // this one starts meanwhile can.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::fcntl(wfd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the s3crypt daemon: {e}"))?;
    drop(writer); // else the read below never sees end-of-file
    let mut line = String::new();
    let read = BufReader::new(reader).read_line(&mut line);
    match (read, Report::decode(line.trim_end_matches('\n'))) {
        (Ok(_), Some(Report::Ready)) => Ok(()),
        (Ok(_), Some(Report::Failed(msg))) => Err(msg),
        (Ok(_), None) | (Err(_), _) => {
            let status = wait_briefly(&mut child);
            Err(format!(
                "the s3crypt daemon {status} without reporting; see {}",
                log.display()
            ))
        }
    }
}

/// How the child ended, waiting up to two seconds: it closed the pipe, so it is usually exiting.
fn wait_briefly(child: &mut std::process::Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return format!("ended ({status})"),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => return format!("(pid {}) closed its readiness pipe", child.id()),
            Err(e) => return format!("could not be waited for ({e})"),
        }
    }
}

/// A pipe, both ends close-on-exec: (read end, write end).
fn pipe() -> std::io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2(2) writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just created both descriptors; nothing else owns them.
    unsafe { Ok((File::from(OwnedFd::from_raw_fd(fds[0])), OwnedFd::from_raw_fd(fds[1]))) }
}

/// Opens the log for appending, mode 0600.
fn open_log(log: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| format!("cannot open the log file {}: {e}", log.display()))
}

/// Where the daemon's output goes (see the module documentation); creates the directory if needed.
fn log_path(args: &[String]) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("S3CRYPT_LOG_FILE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = match (uid, std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty())) {
        (0, _) => PathBuf::from("/run/s3crypt"),
        (_, Some(d)) => PathBuf::from(d).join("s3crypt"),
        (_, None) => PathBuf::from(format!("/tmp/s3crypt-{uid}")),
    };
    private_dir(&dir, uid)?;
    Ok(dir.join(format!("{}.log", log_name(args))))
}

/// Creates `dir` (mode 0700) or checks that an existing one is a real directory owned by `uid`, so that in a
/// shared directory such as /tmp another user cannot plant it or a symlink to read or redirect the log.
fn private_dir(dir: &Path, uid: u32) -> Result<(), String> {
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) => return Err(format!("cannot create the log directory {}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid {
        return Err(format!(
            "log directory {} is not a directory owned by uid {uid}; set S3CRYPT_LOG_FILE",
            dir.display()
        ));
    }
    Ok(())
}

/// The log's name: the mount point escaped as systemd does for unit names, `/mnt/data` → `mnt-data`; "s3crypt"
/// if `args` are not a `mount` command.
fn log_name(args: &[String]) -> String {
    let cli = Cli::try_parse_from(std::iter::once("s3crypt").chain(args.iter().map(String::as_str)));
    let mountpoint = match cli {
        Ok(Cli {
            command: CliCommand::Mount { mountpoint, .. },
            ..
        }) => mountpoint,
        _ => PathBuf::new(),
    };
    let escaped: String = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .chars()
        .map(|c| match c {
            '/' => '-',
            c if c.is_ascii_alphanumeric() || matches!(c, '_' | '.') => c,
            _ => '_',
        })
        .collect();
    match escaped.is_empty() {
        true => "s3crypt".to_string(),
        false => escaped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shell child. Scripts write the report to `/proc/self/fd/$S3CRYPT_READY_FD` because dash's `>&N` only
    /// takes one digit, and with tests running in parallel the descriptor is often above 9.
    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        cmd
    }

    fn run(script: &str) -> (Result<(), String>, String) {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("daemon.log");
        let result = spawn_and_wait(sh(script), &log);
        (result, std::fs::read_to_string(&log).unwrap_or_default())
    }

    #[test]
    fn ready_report_returns_ok_while_the_daemon_keeps_running() {
        // The child reports and then stays alive, as a mounted daemon does; the wait must not depend on its exit.
        let (result, _) = run("printf 'READY\\n' >/proc/self/fd/$S3CRYPT_READY_FD; exec sleep 2");
        assert_eq!(result, Ok(()));
    }

    #[test]
    fn failed_report_returns_the_daemon_message() {
        let (result, log) =
            run("printf 'FAILED no such bucket: b\\\\nsecond line\\n' >/proc/self/fd/$S3CRYPT_READY_FD; exit 1");
        assert_eq!(result, Err("no such bucket: b\nsecond line".to_string()), "{log}");
    }

    #[test]
    fn exit_without_report_names_the_status_and_the_log() {
        let (result, log) = run("echo 'panic: boom' >&2; exit 3");
        let err = result.unwrap_err();
        assert!(err.contains("exit status: 3"), "{err}");
        assert!(err.contains("daemon.log"), "{err}");
        assert_eq!(log, "panic: boom\n", "stderr goes to the log");
    }

    #[test]
    fn the_daemon_runs_in_a_new_session_with_no_stdin() {
        // Field 6 of /proc/PID/stat is the session id; `cat` returns at once only if stdin is at end-of-file.
        let script =
            "echo $$ $(cut -d' ' -f6 /proc/$$/stat) >&2; cat; printf 'READY\\n' >/proc/self/fd/$S3CRYPT_READY_FD";
        let (result, log) = run(script);
        assert_eq!(result, Ok(()));
        let words: Vec<&str> = log.split_whitespace().collect();
        assert_eq!(words.len(), 2, "{log}");
        assert_eq!(words[0], words[1], "the daemon leads its own session: {log}");
    }

    #[test]
    fn foreground_goes_before_a_separator() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            foreground_args(&args(&["mount", "s3://b", "/m"])),
            args(&["mount", "s3://b", "/m", "--foreground"])
        );
        assert_eq!(
            foreground_args(&args(&["mount", "--", "s3://b", "-m"])),
            args(&["mount", "--foreground", "--", "s3://b", "-m"])
        );
    }

    #[test]
    fn log_name_follows_the_mount_point() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            log_name(&args(&["mount", "s3://b/p", "/mnt/data/", "-o", "ro"])),
            "mnt-data"
        );
        assert_eq!(
            log_name(&args(&["-v", "mount", "-o", "ro", "s3://b", "/srv/my vol"])),
            "srv-my_vol"
        );
        assert_eq!(log_name(&args(&["mount"])), "s3crypt");
    }
}

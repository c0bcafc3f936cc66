//! Readiness: telling whoever started s3crypt that the mount answers, or why it never will.
//!
//! Two starters care, and [`Readiness`] tells both with one call:
//! - systemd, for a `Type=notify` service: `READY=1` and `STOPPING=1` go as datagrams to `$NOTIFY_SOCKET`, the
//!   sd_notify(3) protocol, implemented here directly so that s3crypt needs no libsystemd.
//! - the foreground half of `s3crypt mount` without `-f` (and so the mount(8) helper), which waits in
//!   [`crate::daemon::spawn_background`] on a pipe whose write end the daemon inherits as the file descriptor named
//!   in `$S3CRYPT_READY_FD`. The daemon writes one line, `READY` or `FAILED <message>`, and closes it.
//!
//! Both are optional: run by hand with `-f`, neither variable is set and the calls do nothing.
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::Mutex;

/// Environment variable that names the inherited readiness pipe's write end.
pub const READY_FD_ENV: &str = "S3CRYPT_READY_FD";

/// Sends `state` (such as `READY=1`) to the socket in `$NOTIFY_SOCKET`. `Ok(false)` if the variable is unset, as
/// when not started by systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(socket) if !socket.is_empty() => notify_to(&socket, state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the notification socket `socket`: a path, or `@name` for an abstract socket.
pub fn notify_to(socket: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = socket.as_encoded_bytes();
    let sent = match bytes.first() {
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            sock.send_to_addr(state.as_bytes(), &addr)?
        }
        Some(b'/') => sock.send_to(state.as_bytes(), Path::new(socket))?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "NOTIFY_SOCKET is neither a path nor @name",
            ))
        }
    };
    match sent == state.len() {
        true => Ok(()),
        false => Err(io::Error::new(io::ErrorKind::WriteZero, "short write to NOTIFY_SOCKET")),
    }
}

/// `READY=1`: the mount answers.
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// `STOPPING=1`: unmounting has begun.
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// `STATUS=msg`: a one-line status shown by `systemctl status`.
pub fn status(msg: &str) -> io::Result<bool> {
    notify(&format!("STATUS={}", msg.replace('\n', " ")))
}

/// The outcome the daemon reports through the pipe.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Report {
    Ready,
    Failed(String),
}

impl Report {
    /// One line: `READY` or `FAILED <message>`, the message's backslashes and newlines escaped.
    pub(crate) fn encode(&self) -> String {
        match self {
            Report::Ready => "READY\n".to_string(),
            Report::Failed(msg) => format!("FAILED {}\n", msg.replace('\\', "\\\\").replace('\n', "\\n")),
        }
    }

    /// The inverse of [`encode`](Self::encode), for a line without its newline; `None` if it is neither form.
    pub(crate) fn decode(line: &str) -> Option<Report> {
        if line == "READY" {
            return Some(Report::Ready);
        }
        let msg = line.strip_prefix("FAILED ")?;
        let mut out = String::with_capacity(msg.len());
        let mut chars = msg.chars();
        while let Some(c) = chars.next() {
            match (c, c == '\\') {
                (_, true) => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(other) => out.push(other),
                    None => out.push('\\'),
                },
                (c, false) => out.push(c),
            }
        }
        Some(Report::Failed(out))
    }
}

/// What [`Readiness`] knows: whether the environment was read, the pipe (until used) and whether a report went out.
struct State {
    initialized: bool,
    pipe: Option<File>,
    reported: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    initialized: false,
    pipe: None,
    reported: false,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reports the mount's outcome, exactly once, to systemd and to a waiting `s3crypt mount`.
///
/// Call [`Readiness::ready`] once the mount answers requests, or [`Readiness::failed`] if it never will; only the
/// first call counts, later ones are logged and dropped. [`Readiness::init`] early in `main` is recommended (it
/// marks the pipe close-on-exec so helpers such as fusermount3 do not inherit it, and clears the variable), but
/// `ready`/`failed` call it too.
pub struct Readiness;

impl Readiness {
    /// Takes the pipe named by `$S3CRYPT_READY_FD`, if any. Idempotent. Call it before starting threads: it
    /// removes the variable from the environment.
    pub fn init() {
        let mut st = state();
        if !st.initialized {
            st.initialized = true;
            st.pipe = take_env_fd();
            std::env::remove_var(READY_FD_ENV);
        }
    }

    /// The mount answers: `READY=1` to systemd and `READY` down the pipe, which is then closed.
    pub fn ready() {
        Self::report(Report::Ready);
    }

    /// The mount failed: `STATUS=` to systemd and `FAILED msg` down the pipe; the waiting command prints `msg`.
    pub fn failed(msg: &str) {
        Self::report(Report::Failed(msg.to_string()));
    }

    fn report(report: Report) {
        Self::init();
        let pipe = {
            let mut st = state();
            if st.reported {
                log::warn!("readiness already reported; dropping {report:?}");
                return;
            }
            st.reported = true;
            st.pipe.take()
        };
        let sd = match &report {
            Report::Ready => ready(),
            Report::Failed(msg) => status(&format!("mount failed: {msg}")),
        };
        if let Err(e) = sd {
            log::warn!("sd_notify: {e}");
        }
        if let Some(mut file) = pipe {
            if let Err(e) = file.write_all(report.encode().as_bytes()) {
                log::warn!("readiness pipe: {e}");
            }
        }
    }
}

/// The pipe named in `$S3CRYPT_READY_FD`, owned and marked close-on-exec; `None` if unset or not an open pipe.
fn take_env_fd() -> Option<File> {
    let fd: RawFd = std::env::var(READY_FD_ENV).ok()?.parse().ok()?;
    if fd < 3 {
        return None;
    }
    // SAFETY: fcntl on an arbitrary number is harmless; it fails with EBADF if the descriptor is not open.
    let ok = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;
    if !ok {
        log::warn!("{READY_FD_ENV}={fd} is not an open file descriptor");
        return None;
    }
    // SAFETY: the parent passed this descriptor to us alone; nothing else in this process owns it.
    Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn notify_to_a_path_socket_delivers_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        notify_to(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn notify_to_an_abstract_socket_delivers_the_state() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("s3crypt-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        notify_to(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn notify_to_rejects_a_relative_socket() {
        let err = notify_to(OsStr::new("relative/socket"), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn reports_round_trip_through_one_line() {
        for report in [
            Report::Ready,
            Report::Failed("line one\nline two \\n literal".into()),
            Report::Failed("".into()),
        ] {
            let line = report.encode();
            assert_eq!(line.matches('\n').count(), 1, "{line:?}");
            assert_eq!(Report::decode(line.trim_end_matches('\n')), Some(report));
        }
        assert_eq!(Report::decode("garbage"), None);
    }

    /// The only test that touches the process environment and the global pipe, so it needs no lock.
    #[test]
    fn readiness_reports_once_to_systemd_and_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe2(2) writes. Close-on-exec keeps children that other
        // tests spawn meanwhile from holding the write end open; Readiness sets it anyway.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe(2) just created fds[0]; nothing else owns it.
        let mut reader = File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var(READY_FD_ENV, fds[1].to_string());

        Readiness::ready();
        Readiness::failed("too late: only the first report counts");
        std::env::remove_var("NOTIFY_SOCKET");
        server.set_nonblocking(true).unwrap();

        let mut line = String::new();
        io::Read::read_to_string(&mut reader, &mut line).unwrap();
        assert_eq!(line, "READY\n", "the pipe is closed after the first report");
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(
            server.recv(&mut buf).is_err(),
            "the late failure sent nothing to systemd"
        );
        assert!(std::env::var_os(READY_FD_ENV).is_none());
    }
}

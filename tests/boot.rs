//! Boot integration through the real binary: util-linux `mount -t s3crypt` and `mount -T fstab` via the
//! `mount.s3crypt` helper, systemd readiness over `NOTIFY_SOCKET`, and SIGTERM with a written, still-open file.
mod common;

use common::mount::{TestMount, Volume};
use s3crypt::keys::KeyMode;
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_s3crypt");

/// Tests that install the mount(8) helper take turns.
static HELPER: Mutex<()> = Mutex::new(());

fn is_mounted(mnt: &Path) -> bool {
    let parent = mnt.parent().unwrap();
    match (fs::metadata(mnt), fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.dev() != p.dev(),
        _ => false,
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/sbin/mount.s3crypt` pointing at the binary under test, restored to what it was when dropped.
struct HelperLink {
    path: PathBuf,
    previous: Option<PathBuf>,
}

impl HelperLink {
    fn install() -> HelperLink {
        let path = PathBuf::from("/sbin/mount.s3crypt");
        let previous = fs::read_link(&path).ok();
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(BIN, &path).expect("install /sbin/mount.s3crypt (tests run as root)");
        HelperLink { path, previous }
    }
}

impl Drop for HelperLink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(p) = &self.previous {
            let _ = std::os::unix::fs::symlink(p, &self.path);
        }
    }
}

fn umount(mnt: &Path) {
    let st = Command::new("umount").arg(mnt).status().expect("umount");
    assert!(st.success(), "umount {}", mnt.display());
    wait_for("the mount to go", Duration::from_secs(20), || !is_mounted(mnt));
}

#[test]
fn mount_t_s3crypt_and_fstab() {
    let _guard = HELPER.lock().unwrap_or_else(|p| p.into_inner());
    let vol = Volume::new(KeyMode::CseLocal);
    let _link = HelperLink::install();
    let opts = vol.options.join(",");
    let log = vol.dir.path().join("daemon.log");

    // mount -t s3crypt: returns once the mount is live, and the daemon keeps serving in the background.
    let mnt = tempfile::Builder::new().prefix("s3crypt-test").tempdir().unwrap();
    let out = Command::new("mount")
        .args(["-t", "s3crypt", &format!("s3://{}/via-t", vol.bucket)])
        .arg(mnt.path())
        .args(["-o", &format!("_netdev,nofail,{opts}")])
        .env("S3CRYPT_LOG_FILE", &log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t s3crypt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(mnt.path()), "live when mount(8) returns");
    fs::write(mnt.path().join("hello"), b"via mount -t").unwrap();
    assert_eq!(fs::read(mnt.path().join("hello")).unwrap(), b"via mount -t");
    umount(mnt.path());

    // mount -T FSTAB MOUNTPOINT, with a line as a user would write it.
    let mnt2 = tempfile::Builder::new().prefix("s3crypt-test").tempdir().unwrap();
    let fstab = vol.dir.path().join("fstab");
    let line = format!(
        "s3://{}/via-t {} s3crypt _netdev,nofail,{opts} 0 0\n",
        vol.bucket,
        mnt2.path().display()
    );
    fs::write(&fstab, line).unwrap();
    let out = Command::new("mount")
        .arg("-T")
        .arg(&fstab)
        .arg(mnt2.path())
        .env("S3CRYPT_LOG_FILE", &log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -T: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        fs::read(mnt2.path().join("hello")).unwrap(),
        b"via mount -t",
        "the first mount's file"
    );
    fs::write(mnt2.path().join("second"), b"via fstab").unwrap();
    umount(mnt2.path());

    let m = TestMount::mount(&vol);
    assert_eq!(fs::read(m.path("via-t/second")).unwrap(), b"via fstab");
}

#[test]
fn mount_helper_failure_is_reported_on_stderr() {
    let _guard = HELPER.lock().unwrap_or_else(|p| p.into_inner());
    let vol = Volume::new(KeyMode::CseLocal);
    let _link = HelperLink::install();
    let mnt = tempfile::tempdir().unwrap();
    let opts = vol
        .options
        .join(",")
        .replace("key_mode=cse-local", "key_mode=cse-local,block_size=3K");
    let out = Command::new("mount")
        .args(["-t", "s3crypt", &format!("s3://{}", vol.bucket)])
        .arg(mnt.path())
        .args(["-o", &opts])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("block_size"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(mnt.path()));
}

fn spawn_foreground(vol: &Volume, mnt: &Path, notify: Option<&Path>) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["mount", &format!("s3://{}", vol.bucket)])
        .arg(mnt)
        .args(["-f", "-o", &vol.options.join(",")]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    if let Some(sock) = notify {
        cmd.env("NOTIFY_SOCKET", sock);
    }
    cmd.spawn().expect("spawn s3crypt mount -f")
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("the daemon did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
}

#[test]
fn notify_socket_gets_ready_only_once_the_mount_answers() {
    let vol = Volume::new(KeyMode::CseKms);
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mnt = tempfile::Builder::new().prefix("s3crypt-test").tempdir().unwrap();
    let mut child = spawn_foreground(&vol, mnt.path(), Some(&sock_path));
    let mut buf = [0u8; 4096];
    let mut ready = false;
    while !ready {
        let n = sock.recv(&mut buf).expect("a notification before the timeout");
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        if msg.lines().any(|l| l == "READY=1") {
            assert!(is_mounted(mnt.path()), "READY=1 came before the mount answered");
            assert!(fs::read_dir(mnt.path()).is_ok(), "the mount answers a listing");
            ready = true;
        }
    }
    sigterm(&child);
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let st = wait_exit(&mut child, Duration::from_secs(60));
    assert!(st.success(), "clean exit after SIGTERM: {st}");
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn sigterm_saves_a_written_still_open_file() {
    let vol = Volume::new(KeyMode::CseLocal);
    let mnt = tempfile::Builder::new().prefix("s3crypt-test").tempdir().unwrap();
    let mut child = spawn_foreground(&vol, mnt.path(), None);
    wait_for("the mount", Duration::from_secs(60), || is_mounted(mnt.path()));
    let data = common::mount::pattern(300_000, 11);
    let mut f = fs::File::create(mnt.path().join("open-at-sigterm")).unwrap();
    f.write_all(&data).unwrap();
    sigterm(&child);
    let st = wait_exit(&mut child, Duration::from_secs(60));
    assert!(st.success(), "clean exit after SIGTERM with an open file: {st}");
    drop(f);
    assert!(!is_mounted(mnt.path()), "unmounted (lazily, since a file was open)");
    let m = TestMount::mount(&vol);
    assert!(
        fs::read(m.path("open-at-sigterm")).unwrap() == data,
        "the open file's data is in S3"
    );
}

/// Lazily detaches a test's mount point if the test left it mounted, so a failure does not strand a mount.
struct DetachOnDrop<'a>(&'a Path);

impl Drop for DetachOnDrop<'_> {
    fn drop(&mut self) {
        if is_mounted(self.0) {
            let _ = Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
}

fn mount_fstab(fstab: &Path, mnt: &Path, log: &Path) {
    let out = Command::new("mount")
        .arg("-T")
        .arg(fstab)
        .arg(mnt)
        .env("S3CRYPT_LOG_FILE", log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -T: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `umount MNT; mount MNT` (what `systemctl restart` of a mount unit does): the old daemon is still exiting when
/// the new one mounts, and its exit must not take the new mount down with it.
#[test]
fn remount_right_after_umount_stays_mounted() {
    let _guard = HELPER.lock().unwrap_or_else(|p| p.into_inner());
    let vol = Volume::new(KeyMode::CseLocal);
    let _link = HelperLink::install();
    let log = vol.dir.path().join("daemon.log");
    let mnt = tempfile::Builder::new().prefix("s3crypt-test").tempdir().unwrap();
    let _detach = DetachOnDrop(mnt.path());
    let fstab = vol.dir.path().join("fstab");
    let line = format!(
        "s3://{}/restart {} s3crypt _netdev,nofail,{} 0 0\n",
        vol.bucket,
        mnt.path().display(),
        vol.options.join(",")
    );
    fs::write(&fstab, line).unwrap();
    mount_fstab(&fstab, mnt.path(), &log);
    const ROUNDS: usize = 20;
    for i in 0..ROUNDS {
        let st = Command::new("umount").arg(mnt.path()).status().unwrap();
        assert!(st.success(), "umount before round {i}");
        mount_fstab(&fstab, mnt.path(), &log);
        assert!(is_mounted(mnt.path()), "mounted after round {i}");
        let file = mnt.path().join(format!("round-{i}"));
        fs::write(&file, format!("round {i}")).unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), format!("round {i}"));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(is_mounted(mnt.path()), "still mounted once the old daemons have exited");
    umount(mnt.path());

    // Written through the mount, not into the bare directory underneath a detached one.
    let m = TestMount::mount(&vol);
    for i in 0..ROUNDS {
        assert_eq!(
            fs::read_to_string(m.path(&format!("restart/round-{i}"))).unwrap(),
            format!("round {i}")
        );
    }
}

//! The command line: subcommands, `-o` mount options, `s3://` URLs and the mount(8) helper convention.
//!
//! Everything here is pure: it turns words into typed values and reports bad words, nothing else. Files are not
//! opened, keys are not read and nothing touches the network, so every rule can be unit-tested.
//!
//! Mount options follow the FUSE tradition: `-o` takes a comma-separated list of `name` or `name=value` words
//! and may be repeated; a later word overrides an earlier one. [`OPTIONS`] is the single list of what s3crypt
//! understands: the parser's error message, `--help` and the tests are all driven by it, so they cannot drift
//! apart. Words that mount(8) or systemd add for their own use (`_netdev`, `nofail`, `x-systemd.*`, ...) are
//! accepted and collected in [`MountOptions::ignored`], so one option string works in `/etc/fstab`, in a
//! `.mount` unit and on the command line.
//!
//! Key material never appears on the command line: key options name *files* (or `cred:NAME`, a systemd
//! credential), so keys do not leak through `/proc/PID/cmdline`, shell history or `ps`.
use crate::format::BlockSize;
use crate::keys::KeyMode;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// s3crypt: mounts an S3 bucket or prefix as a directory, with all data encrypted.
#[derive(Parser, Debug)]
#[command(name = "s3crypt", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output: -v for debug, -vv for trace (RUST_LOG, if set, takes precedence).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mounts s3://BUCKET[/PREFIX] on MOUNTPOINT (in the background unless -f is given).
    #[command(long_about = mount_long_help())]
    Mount {
        /// The volume: s3://BUCKET or s3://BUCKET/PREFIX.
        source: String,
        /// An existing directory to mount the volume on.
        mountpoint: PathBuf,
        /// Stay in the foreground (for systemd Type=notify services and debugging); without it the command
        /// returns once the mount answers, or fails with the daemon's error.
        #[arg(short, long)]
        foreground: bool,
        /// Mount options, comma-separated, repeatable; later words win. See `s3crypt mount --help`.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Decrypts one object to standard output, with the same key options as `mount` (no mount needed).
    Cat {
        /// The object: s3://BUCKET/KEY.
        source: String,
        /// Key and connection options, as for `mount`.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Encrypts FILE and uploads it as one object, with the same key options as `mount`.
    Put {
        /// The local file to upload.
        file: PathBuf,
        /// The destination object: s3://BUCKET/KEY.
        dest: String,
        /// Key and connection options, as for `mount`.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Checks every object of a volume: in the client-side modes authenticates every block (nothing is
    /// written, plaintext is never stored); in the SSE modes checks each object's server-side encryption.
    /// Prints `BAD s3://BUCKET/KEY: reason` for each bad object; exits 0 if all are good, 1 if not, 2 if the
    /// check could not run.
    Verify {
        /// The volume: s3://BUCKET or s3://BUCKET/PREFIX.
        source: String,
        /// Key and connection options, as for `mount`.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Print the summary as one JSON object on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Moves every file of a volume to a new key without moving data: in cse-local and cse-kms each data key is
    /// re-wrapped (cse-kms: KMS ReEncrypt) and stored by a metadata-only copy in place, the volume descriptor
    /// last; in the SSE modes S3 copies each object onto itself under the new settings (another SSE-C key,
    /// another KMS key, or between sse-s3 and sse-kms). A mount may keep running with the new key and the old
    /// one for reading (old_master_key_file=, old_kms_key_id=, or the old SSE-C key on a second line of the key
    /// file). Resumable: a rerun skips what is done. Prints `FAILED s3://BUCKET/KEY: reason` for each failure; exits 0
    /// when all is done, 1 if an object failed, 2 if it could not start, 130 after Ctrl-C.
    Rekey {
        /// The volume: s3://BUCKET or s3://BUCKET/PREFIX.
        source: String,
        /// The current (old) key and connection options, as for `mount`.
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// The new key options, applied over the old ones (e.g. master_key_file=NEW, kms_key_id=NEW,
        /// sse_c_key_file=NEW, key_mode=sse-kms,kms_key_id=K).
        #[arg(long = "to", value_name = "OPTIONS", required = true)]
        to: Vec<String>,
        /// Count what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the summary as one JSON object on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Writes a new random 32-byte master key to FILE (mode 0600) for key_mode=cse-local; never overwrites.
    Keygen {
        /// Where to create the key file; it must not exist yet.
        file: PathBuf,
    },
}

/// An invalid option, URL or helper invocation. The message names the offending word and says what is valid.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OptionError(pub String);

/// Which object store backs the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// Amazon S3 or an S3-compatible server (the default).
    S3,
    /// An in-memory store for benchmarks: nothing reaches S3 and all data is lost at unmount.
    Memory,
}

/// One mount option as documented: its name, the form of its value ("" for a flag), default and meaning.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    pub name: &'static str,
    pub value: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

const fn opt(name: &'static str, value: &'static str, default: &'static str, help: &'static str) -> OptionSpec {
    OptionSpec {
        name,
        value,
        default,
        help,
    }
}

/// Every option s3crypt understands, in the order `--help` shows them.
#[rustfmt::skip]
pub const OPTIONS: &[OptionSpec] = &[
    opt("key_mode", "MODE", "sse-s3", "sse-s3 | sse-kms | sse-c | cse-kms | cse-local; encryption is always on"),
    opt("kms_key_id", "ID", "none", "KMS key id, ARN or alias; cse-kms needs it, sse-kms defaults to the bucket key"),
    opt(
        "sse_c_key_file",
        "FILE",
        "none",
        "customer key for sse-c (FILE or cred:NAME); further lines: older keys, accepted for reading",
    ),
    opt("master_key_file", "FILE", "none", "32-byte master key for cse-local (FILE or cred:NAME); see `keygen`"),
    opt(
        "old_kms_key_id",
        "ID",
        "none",
        "cse-kms: the KMS key before a rotation, still accepted for reading while `s3crypt rekey` runs; `any`: \
         any KMS key the credentials may decrypt with",
    ),
    opt(
        "old_master_key_file",
        "FILE",
        "none",
        "cse-local: the master key before a rotation, still accepted for reading while `s3crypt rekey` runs",
    ),
    opt("block_size", "SIZE", "64K", "cse-* new volumes only: power of two from 4K to 1M (65536, 64K, 64KiB, 1M)"),
    opt("endpoint", "URL", "AWS, or $AWS_ENDPOINT_URL", "S3 endpoint URL, for S3-compatible servers"),
    opt("region", "REGION", "from the AWS configuration", "S3 region"),
    opt("path_style", "", "off", "path-style requests (http://host/bucket/key), for most non-AWS servers"),
    opt("ro", "", "off", "mount read-only"),
    opt("rw", "", "on", "mount read-write (undoes an earlier ro)"),
    opt("allow_other", "", "off", "let other users access the mount (non-root users need user_allow_other)"),
    opt("allow_root", "", "off", "let root access the mount too; excludes allow_other"),
    opt("uid", "N", "mounting user", "owner of every file and directory"),
    opt("gid", "N", "mounting group", "group of every file and directory"),
    opt("umask", "OCTAL", "022", "permission bits to clear (e.g. 022, 0077)"),
    opt("block_cache_mib", "N", "64", "memory for decrypted blocks, MiB (0: no cache)"),
    opt("read_ahead_kib", "N", "32768", "sequential read-ahead window, KiB (0: none)"),
    opt("key_cache_size", "N", "1024", "unwrapped data keys kept (cse-* modes)"),
    opt("key_cache_ttl", "DURATION", "600s", "how long an unwrapped data key is kept (600, 600s, 10m, 1h)"),
    opt("metadata_ttl", "DURATION", "1s", "how long attributes and listings are cached (0: always ask S3)"),
    opt("staging_dir", "DIR", "STATE/staging", "write-back journal: unsaved data, sealed, until S3 has it (must persist)"),
    opt("recovery_dir", "DIR", "STATE/recovery", "where a file's data is saved (mode 0600) when another writer changed it first"),
    opt("upload_timeout", "DURATION", "10s", "how long close/fsync wait for S3 to make progress (a part going up) before EIO; the upload goes on in the background"),
    opt("allow_plaintext", "", "off", "cse-* modes: read objects that have no s3crypt metadata as plain files"),
    opt("store", "s3|memory", "s3", "memory is for BENCHMARKS ONLY: nothing is stored, all data is lost at unmount"),
    opt("fuse_threads", "N", "4", "threads serving FUSE requests (>= 1; up to half of them seal writes into the journal themselves)"),
    opt("max_write_mib", "N", "16", "plaintext of freshly written blocks kept in memory, all files together, MiB"),
    opt("write_behind", "", "on", "upload the parts of a file written sequentially while it is written (=no: at close)"),
    opt("nonempty", "", "off", "allow mounting over a non-empty directory"),
    opt("fsname", "NAME", "SOURCE", "the name shown by mount(8) and df"),
    opt("stats_file", "FILE", "none", "on SIGUSR1, write request, byte and KMS counters as JSON to FILE"),
    opt("metrics_addr", "HOST:PORT", "off", "serve Prometheus /metrics and /health over HTTP here (e.g. 127.0.0.1:9464)"),
    opt("log_level", "LEVEL", "info", "error|warn|info|debug|trace, or TARGET=LEVEL;... (e.g. s3crypt=debug;aws=warn); RUST_LOG wins"),
];

/// Standard mount(8)/systemd option words that s3crypt accepts and passes over.
#[rustfmt::skip]
const STANDARD_IGNORED: &[&str] = &[
    "defaults", "auto", "noauto", "nofail", "user", "users", "nouser", "owner", "group", "exec", "noexec", "suid",
    "nosuid", "dev", "nodev", "async", "sync", "dirsync", "atime", "noatime", "relatime", "norelatime", "strictatime",
    "nostrictatime", "lazytime", "nolazytime", "diratime", "nodiratime", "iversion", "noiversion", "mand", "nomand",
    "silent", "loud", "comment",
];

/// True if `name` (the part before `=`) is a standard mount(8)/systemd word that s3crypt passes over:
/// [`STANDARD_IGNORED`], anything starting with `_` (such as `_netdev`) and anything starting with `x-` (such as
/// `x-systemd.automount`).
fn is_standard_ignored(name: &str) -> bool {
    STANDARD_IGNORED.contains(&name) || name.starts_with('_') || name.starts_with("x-")
}

/// The long help of `s3crypt mount`, generated from [`OPTIONS`].
fn mount_long_help() -> String {
    let mut s = String::from(
        "Mounts s3://BUCKET[/PREFIX] on MOUNTPOINT.\n\n\
         Without -f the command starts the file system in the background and returns once the mount answers \
         (exit 0), or prints the daemon's error and exits non-zero. The same binary installed as \
         /sbin/mount.s3crypt makes `mount -t s3crypt` and /etc/fstab work.\n\n\
         Options (-o NAME[=VALUE][,...], repeatable; later words win):\n",
    );
    for o in OPTIONS {
        let word = if o.value.is_empty() {
            o.name.to_string()
        } else {
            format!("{}={}", o.name, o.value)
        };
        s.push_str(&format!("  {word:<26} {} [default: {}]\n", o.help, o.default));
    }
    s.push_str(
        "\nSTATE is $STATE_DIRECTORY (systemd StateDirectory=), else /var/lib/s3crypt as root, else \
         $XDG_STATE_HOME/s3crypt (~/.local/state/s3crypt).\n\
         Key options name files, never keys: `cred:NAME` reads $CREDENTIALS_DIRECTORY/NAME (systemd \
         LoadCredential=).\n\
         Passed over, for fstab and systemd: defaults, auto, noauto, nofail, user, users, nouser, owner, group, \
         exec, noexec, suid, nosuid, dev, nodev, async, sync, dirsync, atime, noatime, relatime, strictatime, \
         lazytime, diratime, nodiratime, iversion, mand, silent, loud, comment=*, _* (e.g. _netdev), x-* \
         (e.g. x-systemd.automount).\n\n\
         WARNING: store=memory keeps everything in RAM and loses it at unmount; it exists for benchmarks only.",
    );
    s
}

/// The list of valid option names for error messages.
fn valid_options_list() -> String {
    let names: Vec<&str> = OPTIONS.iter().map(|o| o.name).collect();
    format!(
        "valid options: {}; standard mount options (defaults, nofail, _netdev, x-*, ...) are passed over",
        names.join(", ")
    )
}

/// The mount options of a volume, after parsing. [`MountOptions::default`] is what an empty `-o` gives.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Default [`KeyMode::SseS3`]: encryption at rest is never opt-in.
    pub key_mode: KeyMode,
    pub kms_key_id: Option<String>,
    /// A file path, or `cred:NAME` for `$CREDENTIALS_DIRECTORY/NAME`.
    pub sse_c_key_file: Option<String>,
    /// A file path, or `cred:NAME` for `$CREDENTIALS_DIRECTORY/NAME`.
    pub master_key_file: Option<String>,
    pub old_master_key_file: Option<String>,
    pub old_kms_key_id: Option<String>,
    /// Only used when a new volume is created; an existing volume keeps its own.
    pub block_size: Option<BlockSize>,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub read_only: bool,
    pub allow_other: bool,
    pub allow_root: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Permission bits cleared from every mode; `None` means 022.
    pub umask: Option<u32>,
    /// Decrypted block cache, MiB.
    pub block_cache_mib: u64,
    /// Sequential read-ahead window, KiB.
    pub read_ahead_kib: u64,
    /// Number of unwrapped data keys kept.
    pub key_cache_size: usize,
    pub key_cache_ttl: Duration,
    pub metadata_ttl: Duration,
    pub staging_dir: Option<PathBuf>,
    pub recovery_dir: Option<PathBuf>,
    /// How long close and fsync wait for an upload before EIO.
    pub upload_timeout: Duration,
    /// Client-side modes: read objects without s3crypt metadata as plaintext files.
    pub allow_plaintext: bool,
    pub store: StoreKind,
    pub fuse_threads: usize,
    /// Plaintext of freshly written blocks kept in memory per file, MiB.
    pub max_write_mib: u64,
    /// Upload parts of sequentially written files while they are written.
    pub write_behind: bool,
    pub nonempty: bool,
    pub fsname: Option<String>,
    /// Where SIGUSR1 writes the counters.
    pub stats_file: Option<PathBuf>,
    /// Where the Prometheus `/metrics` and `/health` endpoint listens; `None`: no endpoint.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The log filter (`info`, `debug`, `s3crypt=debug;aws=warn`, ...; `;` separates directives, as `,`
    /// separates options); `RUST_LOG` wins over it.
    pub log_level: Option<String>,
    /// Standard mount(8)/systemd words that were accepted and passed over, as given.
    pub ignored: Vec<String>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            key_mode: KeyMode::SseS3,
            kms_key_id: None,
            sse_c_key_file: None,
            master_key_file: None,
            old_master_key_file: None,
            old_kms_key_id: None,
            block_size: None,
            endpoint: None,
            region: None,
            path_style: false,
            read_only: false,
            allow_other: false,
            allow_root: false,
            uid: None,
            gid: None,
            umask: None,
            block_cache_mib: 64,
            read_ahead_kib: 32768,
            key_cache_size: 1024,
            key_cache_ttl: Duration::from_secs(600),
            metadata_ttl: Duration::from_secs(1),
            staging_dir: None,
            recovery_dir: None,
            upload_timeout: Duration::from_secs(10),
            allow_plaintext: false,
            store: StoreKind::S3,
            fuse_threads: 4,
            max_write_mib: 16,
            write_behind: true,
            nonempty: false,
            fsname: None,
            stats_file: None,
            metrics_addr: None,
            log_level: None,
            ignored: Vec::new(),
        }
    }
}

impl MountOptions {
    /// Parses option words as given to `-o` (each may itself be comma-separated; later words win). An unknown or
    /// malformed word is an error whose message names the word and lists the valid options.
    pub fn parse<S: AsRef<str>>(words: &[S]) -> Result<MountOptions, OptionError> {
        let mut opts = MountOptions::default();
        for word in words
            .iter()
            .flat_map(|w| w.as_ref().split(','))
            .filter(|w| !w.is_empty())
        {
            opts.apply(word)?;
        }
        Ok(opts)
    }

    /// Applies one `name` or `name=value` word.
    fn apply(&mut self, word: &str) -> Result<(), OptionError> {
        let (name, value) = match word.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (word, None),
        };
        let w = Word { word, value };
        match name {
            "key_mode" => self.key_mode = w.text()?.parse().map_err(|e: String| w.err(&e))?,
            "kms_key_id" => self.kms_key_id = Some(w.text()?.to_string()),
            "sse_c_key_file" => self.sse_c_key_file = Some(w.file_spec()?),
            "master_key_file" => self.master_key_file = Some(w.file_spec()?),
            "old_master_key_file" => self.old_master_key_file = Some(w.file_spec()?),
            "old_kms_key_id" => self.old_kms_key_id = Some(w.text()?.to_string()),
            "block_size" => self.block_size = Some(w.block_size()?),
            "endpoint" => self.endpoint = Some(w.text()?.to_string()),
            "region" => self.region = Some(w.text()?.to_string()),
            "path_style" => self.path_style = w.flag()?,
            "ro" => self.read_only = w.flag()?,
            "rw" => self.read_only = !w.flag()?,
            "allow_other" => self.allow_other = w.flag()?,
            "allow_root" => self.allow_root = w.flag()?,
            "uid" => self.uid = Some(w.number()?),
            "gid" => self.gid = Some(w.number()?),
            "umask" => self.umask = Some(w.umask()?),
            "block_cache_mib" => self.block_cache_mib = w.number()?,
            "read_ahead_kib" => self.read_ahead_kib = w.number()?,
            "key_cache_size" => self.key_cache_size = w.number()?,
            "key_cache_ttl" => self.key_cache_ttl = w.duration()?,
            "metadata_ttl" => self.metadata_ttl = w.duration()?,
            "staging_dir" => self.staging_dir = Some(PathBuf::from(w.text()?)),
            "recovery_dir" => self.recovery_dir = Some(PathBuf::from(w.text()?)),
            "upload_timeout" => self.upload_timeout = w.duration()?,
            "allow_plaintext" => self.allow_plaintext = w.flag()?,
            "store" => self.store = w.store()?,
            "fuse_threads" => self.fuse_threads = w.positive()?,
            "max_write_mib" => self.max_write_mib = w.number()?,
            "write_behind" => self.write_behind = w.flag()?,
            "nonempty" => self.nonempty = w.flag()?,
            "fsname" => self.fsname = Some(w.text()?.to_string()),
            "stats_file" => self.stats_file = Some(PathBuf::from(w.text()?)),
            "metrics_addr" => self.metrics_addr = Some(w.socket_addr()?),
            "log_level" => self.log_level = Some(w.log_level()?),
            "remount" => return Err(w.err("remounting is not supported; unmount and mount again")),
            n if is_standard_ignored(n) => self.ignored.push(word.to_string()),
            _ => {
                return Err(OptionError(format!(
                    "unknown mount option '{word}'; {}",
                    valid_options_list()
                )))
            }
        }
        Ok(())
    }

    /// True if `word` (one option, no commas) is one s3crypt knows, whether or not its value is valid. Used by the
    /// sloppy (`-s`) mount helper mode to drop what it does not know.
    fn is_known(word: &str) -> bool {
        let name = word.split_once('=').map_or(word, |(n, _)| n);
        name == "remount" || OPTIONS.iter().any(|o| o.name == name) || is_standard_ignored(name)
    }

    /// Checks the combination for the key mode: each mode's required option is present and no option that does
    /// not apply to the mode is set. The error names the option.
    pub fn validate(&self) -> Result<(), OptionError> {
        let mode = self.key_mode;
        let need = |present: bool, name: &str| -> Result<(), OptionError> {
            match present {
                true => Ok(()),
                false => Err(OptionError(format!("key_mode={mode} needs the option {name}"))),
            }
        };
        let forbid = |present: bool, name: &str, applies_to: &str| -> Result<(), OptionError> {
            match present {
                true => Err(OptionError(format!(
                    "option {name} does not apply to key_mode={mode} ({applies_to} only)"
                ))),
                false => Ok(()),
            }
        };
        match mode {
            KeyMode::CseKms => need(self.kms_key_id.is_some(), "kms_key_id=ID")?,
            KeyMode::SseC => need(self.sse_c_key_file.is_some(), "sse_c_key_file=FILE")?,
            KeyMode::CseLocal => need(self.master_key_file.is_some(), "master_key_file=FILE")?,
            KeyMode::SseS3 | KeyMode::SseKms => {}
        }
        let kms = matches!(mode, KeyMode::SseKms | KeyMode::CseKms);
        forbid(self.kms_key_id.is_some() && !kms, "kms_key_id", "sse-kms and cse-kms")?;
        forbid(
            self.sse_c_key_file.is_some() && mode != KeyMode::SseC,
            "sse_c_key_file",
            "sse-c",
        )?;
        forbid(
            self.old_kms_key_id.is_some() && mode != KeyMode::CseKms,
            "old_kms_key_id",
            "cse-kms",
        )?;
        forbid(
            self.old_master_key_file.is_some() && mode != KeyMode::CseLocal,
            "old_master_key_file",
            "cse-local",
        )?;
        forbid(
            self.master_key_file.is_some() && mode != KeyMode::CseLocal,
            "master_key_file",
            "cse-local",
        )?;
        let cse = mode.is_client_side();
        forbid(self.block_size.is_some() && !cse, "block_size", "cse-kms and cse-local")?;
        forbid(self.allow_plaintext && !cse, "allow_plaintext", "cse-kms and cse-local")?;
        if self.allow_other && self.allow_root {
            return Err(OptionError(
                "options allow_other and allow_root exclude each other; give one".into(),
            ));
        }
        Ok(())
    }
}

/// One option word being parsed, for value conversion and messages that name it.
struct Word<'a> {
    word: &'a str,
    value: Option<&'a str>,
}

impl Word<'_> {
    fn err(&self, why: &str) -> OptionError {
        OptionError(format!("mount option '{}': {why}", self.word))
    }

    /// The value, which must be present and non-empty.
    fn text(&self) -> Result<&str, OptionError> {
        match self.value {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(self.err("needs a value (NAME=VALUE)")),
        }
    }

    /// A flag: bare, or `=1|0|true|false|yes|no|on|off`.
    fn flag(&self) -> Result<bool, OptionError> {
        match self.value {
            None => Ok(true),
            Some("1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(_) => Err(self.err("is a flag: give it bare, or =yes / =no")),
        }
    }

    fn number<T: std::str::FromStr>(&self) -> Result<T, OptionError> {
        let v = self.text()?;
        v.parse()
            .map_err(|_| self.err(&format!("'{v}' is not a non-negative whole number in range")))
    }

    fn positive(&self) -> Result<usize, OptionError> {
        match self.number()? {
            0 => Err(self.err("must be at least 1")),
            n => Ok(n),
        }
    }

    /// A key file: a path, or `cred:NAME` with a NAME that is a plain file name.
    fn file_spec(&self) -> Result<String, OptionError> {
        let v = self.text()?;
        if let Some(name) = v.strip_prefix("cred:") {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(self.err("cred:NAME needs a credential name without '/'"));
            }
        }
        Ok(v.to_string())
    }

    fn block_size(&self) -> Result<BlockSize, OptionError> {
        let v = self.text()?;
        let bytes = parse_size(v).ok_or_else(|| self.err(&format!("'{v}' is not a size (e.g. 65536, 64K, 1M)")))?;
        u32::try_from(bytes)
            .ok()
            .and_then(BlockSize::new)
            .ok_or_else(|| self.err(&format!("{bytes} bytes is not a power of two between 4K and 1M")))
    }

    fn umask(&self) -> Result<u32, OptionError> {
        let v = self.text()?;
        let digits = v.strip_prefix("0o").unwrap_or(v);
        match u32::from_str_radix(digits, 8) {
            Ok(m) if m <= 0o777 && !digits.starts_with('+') => Ok(m),
            _ => Err(self.err(&format!("'{v}' is not an octal permission mask (e.g. 022, 0077)"))),
        }
    }

    fn duration(&self) -> Result<Duration, OptionError> {
        let v = self.text()?;
        parse_duration(v).ok_or_else(|| self.err(&format!("'{v}' is not a duration (e.g. 600, 600s, 10m, 1h, 500ms)")))
    }

    /// `HOST:PORT` with a literal IP address (`127.0.0.1:9464`, `[::1]:9464`): no name lookup at parse time.
    fn socket_addr(&self) -> Result<std::net::SocketAddr, OptionError> {
        let v = self.text()?;
        v.parse().map_err(|_| {
            self.err(&format!(
                "'{v}' is not HOST:PORT with an IP address, e.g. 127.0.0.1:9464"
            ))
        })
    }

    /// A level name, or an env_logger filter made of `target=level` directives.
    fn log_level(&self) -> Result<String, OptionError> {
        let v = self.text()?;
        const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
        let ok = v.split(';').all(|d| {
            let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
            LEVELS.contains(&level.to_ascii_lowercase().as_str())
        });
        if !ok {
            return Err(self.err(&format!("'{v}' is not a log level; valid: {}", LEVELS.join(", "))));
        }
        Ok(v.to_string())
    }

    fn store(&self) -> Result<StoreKind, OptionError> {
        match self.text()? {
            "s3" => Ok(StoreKind::S3),
            "memory" => Ok(StoreKind::Memory),
            v => Err(self.err(&format!("unknown store '{v}'; valid: s3, memory"))),
        }
    }
}

/// Splits "64KiB" into (64, "KiB"); `None` if there are no leading digits.
fn split_number(s: &str) -> Option<(u64, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// A byte size: plain bytes, or with K/k/KiB (1024) or M/m/MiB (1024²).
fn parse_size(s: &str) -> Option<u64> {
    let (n, unit) = split_number(s)?;
    let mult = match unit {
        "" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "m" | "MiB" => 1 << 20,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// A duration: plain seconds, or with ms, s, m, h or d.
fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = split_number(s)?;
    let secs = |mult: u64| n.checked_mul(mult).map(Duration::from_secs);
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => None,
    }
}

/// Splits `s3://BUCKET[/PATH]` into the bucket and the path without leading or trailing slashes.
fn split_url(s: &str) -> Result<(String, String), OptionError> {
    let rest = s
        .strip_prefix("s3://")
        .ok_or_else(|| OptionError(format!("'{s}' is not an S3 URL; expected s3://BUCKET[/PREFIX]")))?;
    let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = !bucket.is_empty()
        && bucket.len() <= 255
        && bucket
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !bucket_ok {
        return Err(OptionError(format!(
            "'{s}': bad bucket name '{bucket}' (letters, digits, '.', '-' and '_' only)"
        )));
    }
    let path = path.trim_end_matches('/');
    if !path.is_empty() && path.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..") {
        return Err(OptionError(format!(
            "'{s}': the path has an empty, '.' or '..' component"
        )));
    }
    Ok((bucket.to_string(), path.to_string()))
}

/// `s3://BUCKET[/PREFIX]` → (bucket, prefix), the prefix normalized to "" or "a/b/" (one trailing slash).
pub fn parse_volume_url(s: &str) -> Result<(String, String), OptionError> {
    let (bucket, path) = split_url(s)?;
    let prefix = if path.is_empty() { path } else { path + "/" };
    Ok((bucket, prefix))
}

/// `s3://BUCKET/KEY` → (bucket, key), for `cat` and `put`. The key must name an object, not a prefix.
pub fn parse_object_url(s: &str) -> Result<(String, String), OptionError> {
    if s.ends_with('/') {
        return Err(OptionError(format!(
            "'{s}' ends with '/'; expected an object, s3://BUCKET/KEY"
        )));
    }
    let (bucket, key) = split_url(s)?;
    if key.is_empty() {
        return Err(OptionError(format!("'{s}' names no object; expected s3://BUCKET/KEY")));
    }
    Ok((bucket, key))
}

/// True if a program invoked as `argv0` is the mount(8) helper (`mount.s3crypt`, `mount.fuse.s3crypt`, any
/// directory).
pub fn is_mount_helper(argv0: &str) -> bool {
    let name = std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    name == "mount.s3crypt" || name == "mount.fuse.s3crypt"
}

/// What the mount(8) helper was asked for, before translation.
#[derive(Default)]
struct HelperArgs {
    positional: Vec<String>,
    options: Vec<String>,
    fake: bool,
    sloppy: bool,
    verbose: bool,
}

/// Reads `SOURCE DIR [-sfnv] [-o OPTS] [-t TYPE]` in any order, short flags bundled or not.
fn read_helper_args(args: &[String]) -> Result<HelperArgs, OptionError> {
    let mut h = HelperArgs::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let Some(flags) = arg.strip_prefix('-').filter(|f| !f.is_empty()) else {
            h.positional.push(arg.clone());
            continue;
        };
        for (i, c) in flags.char_indices() {
            match c {
                'f' => h.fake = true,
                'n' => {}
                's' => h.sloppy = true,
                'v' => h.verbose = true,
                'o' | 't' | 'N' => {
                    let attached = &flags[i + 1..];
                    let value = match attached.is_empty() {
                        false => attached.to_string(),
                        true => it
                            .next()
                            .cloned()
                            .ok_or_else(|| OptionError(format!("mount.s3crypt: -{c} needs a value")))?,
                    };
                    match c {
                        'o' => h.options.push(value),
                        't' => check_type(&value)?,
                        _ => {
                            return Err(OptionError(
                                "mount.s3crypt: -N (mount namespaces) is not supported".into(),
                            ))
                        }
                    }
                    break;
                }
                _ => {
                    return Err(OptionError(format!(
                        "mount.s3crypt: unknown flag -{c}; usage: {HELPER_USAGE}"
                    )))
                }
            }
        }
    }
    Ok(h)
}

const HELPER_USAGE: &str = "mount.s3crypt s3://BUCKET[/PREFIX] DIR [-sfnv] [-o OPTIONS] [-t s3crypt]";

fn check_type(t: &str) -> Result<(), OptionError> {
    match t {
        "s3crypt" | "fuse.s3crypt" => Ok(()),
        _ => Err(OptionError(format!(
            "mount.s3crypt: file system type '{t}' is not s3crypt"
        ))),
    }
}

/// Translates a mount(8) helper invocation `mount.s3crypt SOURCE DIR [-sfnv] [-o OPTS] [-t s3crypt]` (the
/// arguments after `argv[0]`) into the arguments of `s3crypt` after the program name: `["mount", SOURCE, DIR, "-o",
/// OPTS]`, plus `-v` if verbose.
///
/// The mount(8) flags: `-o` may be repeated and is merged into one list; `-n` (do not write mtab) needs nothing;
/// `-v` turns on verbose logging; `-s` (sloppy) drops option words s3crypt does not know instead of failing;
/// `-f` (fake) checks everything but mounts nothing, which the result shows as an **empty vector**: the caller
/// then exits 0. The options are parsed and validated here too, so a bad fstab line fails before anything starts.
/// `-f` is not `s3crypt mount -f` (foreground): the helper always starts the daemon in the background.
pub fn mount_helper_args(argv0_stripped_args: &[String]) -> Result<Vec<String>, OptionError> {
    let h = read_helper_args(argv0_stripped_args)?;
    let [source, dir] = h.positional.as_slice() else {
        return Err(OptionError(format!(
            "mount.s3crypt: expected a source and a directory; usage: {HELPER_USAGE}"
        )));
    };
    parse_volume_url(source)?;
    let words = h.options.iter().flat_map(|o| o.split(',')).filter(|w| !w.is_empty());
    let kept: Vec<&str> = words.filter(|w| !h.sloppy || MountOptions::is_known(w)).collect();
    MountOptions::parse(&kept)?.validate()?;
    if h.fake {
        return Ok(Vec::new());
    }
    let mut out = vec!["mount".to_string(), source.clone(), dir.clone()];
    if !kept.is_empty() {
        out.extend(["-o".to_string(), kept.join(",")]);
    }
    if h.verbose {
        out.push("-v".to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(s: &str) -> MountOptions {
        MountOptions::parse(&[s]).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn parse_err(s: &str) -> String {
        match MountOptions::parse(&[s]) {
            Ok(o) => panic!("{s} parsed: {o:?}"),
            Err(e) => e.0,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn metrics_addr_is_off_by_default_and_takes_an_ip_and_port() {
        assert_eq!(parse("").metrics_addr, None);
        let a = parse("metrics_addr=127.0.0.1:9464").metrics_addr.unwrap();
        assert_eq!(a.to_string(), "127.0.0.1:9464");
        assert_eq!(parse("metrics_addr=[::1]:9").metrics_addr.unwrap().port(), 9);
        for bad in [
            "metrics_addr",
            "metrics_addr=",
            "metrics_addr=localhost:9464",
            "metrics_addr=127.0.0.1",
        ] {
            let e = MountOptions::parse(&[bad]).unwrap_err().0;
            assert!(e.contains("metrics_addr"), "{bad}: {e}");
        }
    }

    #[test]
    fn log_level_takes_a_level_or_directives() {
        assert_eq!(parse("").log_level, None);
        assert_eq!(parse("log_level=debug").log_level.as_deref(), Some("debug"));
        assert_eq!(
            parse("log_level=s3crypt=debug;aws_smithy=WARN").log_level.as_deref(),
            Some("s3crypt=debug;aws_smithy=WARN")
        );
        for bad in ["log_level", "log_level=loud", "log_level=s3crypt=verbose"] {
            let e = MountOptions::parse(&[bad]).unwrap_err().0;
            assert!(e.contains("log_level"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults() {
        let o = MountOptions::parse::<&str>(&[]).unwrap();
        assert_eq!(o.key_mode, KeyMode::SseS3);
        assert_eq!(
            (o.block_cache_mib, o.read_ahead_kib, o.key_cache_size),
            (64, 32768, 1024)
        );
        assert_eq!(
            (o.key_cache_ttl, o.metadata_ttl),
            (Duration::from_secs(600), Duration::from_secs(1))
        );
        assert_eq!((o.fuse_threads, o.max_write_mib, o.store), (4, 16, StoreKind::S3));
        assert!(!o.read_only && !o.allow_other && !o.allow_root && !o.path_style && !o.allow_plaintext && !o.nonempty);
        assert!(o.write_behind);
        let none = (
            &o.kms_key_id,
            &o.sse_c_key_file,
            &o.master_key_file,
            &o.endpoint,
            &o.region,
            &o.fsname,
        );
        assert_eq!(none, (&None, &None, &None, &None, &None, &None));
        assert_eq!((o.block_size, o.uid, o.gid, o.umask), (None, None, None, None));
        assert_eq!((&o.staging_dir, &o.recovery_dir), (&None, &None));
        assert!(o.ignored.is_empty());
        o.validate().unwrap();
    }

    #[test]
    fn every_option_parses() {
        let o = parse(
            "key_mode=cse-kms,kms_key_id=alias/s3,endpoint=http://127.0.0.1:4566,region=eu-west-1,path_style,ro,\
             allow_root,uid=1000,gid=100,umask=0027,block_cache_mib=256,read_ahead_kib=1024,key_cache_size=10,\
             key_cache_ttl=10m,metadata_ttl=0,staging_dir=/var/tmp/s,recovery_dir=/var/lib/r,allow_plaintext,\
             store=memory,fuse_threads=8,max_write_mib=32,nonempty,fsname=vol,block_size=1M,write_behind=no",
        );
        assert!(!o.write_behind);
        assert_eq!(o.key_mode, KeyMode::CseKms);
        assert_eq!(o.kms_key_id.as_deref(), Some("alias/s3"));
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:4566"));
        assert_eq!(o.region.as_deref(), Some("eu-west-1"));
        assert!(o.path_style && o.read_only && o.allow_root && !o.allow_other && o.allow_plaintext && o.nonempty);
        assert_eq!((o.uid, o.gid, o.umask), (Some(1000), Some(100), Some(0o027)));
        assert_eq!((o.block_cache_mib, o.read_ahead_kib, o.key_cache_size), (256, 1024, 10));
        assert_eq!(
            (o.key_cache_ttl, o.metadata_ttl),
            (Duration::from_secs(600), Duration::ZERO)
        );
        assert_eq!(o.staging_dir, Some(PathBuf::from("/var/tmp/s")));
        assert_eq!(o.recovery_dir, Some(PathBuf::from("/var/lib/r")));
        assert_eq!((o.store, o.fuse_threads, o.max_write_mib), (StoreKind::Memory, 8, 32));
        assert_eq!(o.fsname.as_deref(), Some("vol"));
        assert_eq!(o.block_size, BlockSize::new(1 << 20));
        o.validate().unwrap();

        let o = parse("key_mode=sse-c,sse_c_key_file=/etc/s3crypt/c.key,allow_other");
        assert_eq!(o.sse_c_key_file.as_deref(), Some("/etc/s3crypt/c.key"));
        assert!(o.allow_other);
        o.validate().unwrap();
        let o = parse("key_mode=cse-local,master_key_file=cred:master-key");
        assert_eq!(o.master_key_file.as_deref(), Some("cred:master-key"));
        o.validate().unwrap();
        assert_eq!(parse("key_mode=sse-kms").key_mode, KeyMode::SseKms);
        assert_eq!(parse("key_mode=sse-s3").key_mode, KeyMode::SseS3);
    }

    #[test]
    fn block_size_spellings() {
        for s in ["65536", "64K", "64k", "64KiB"] {
            assert_eq!(
                parse(&format!("block_size={s}")).block_size,
                BlockSize::new(65536),
                "{s}"
            );
        }
        for s in ["1M", "1m", "1MiB", "1048576"] {
            assert_eq!(
                parse(&format!("block_size={s}")).block_size,
                BlockSize::new(1 << 20),
                "{s}"
            );
        }
        assert_eq!(parse("block_size=4K").block_size, BlockSize::new(4096));
        for bad in ["3000", "2K", "2M", "48K", "64KB", "K", "-4K", "0"] {
            let e = parse_err(&format!("block_size={bad}"));
            assert!(e.contains(&format!("block_size={bad}")), "{e}");
        }
        assert!(parse_err("block_size=3000").contains("power of two"));
    }

    #[test]
    fn durations_and_umasks() {
        for (s, secs) in [("600", 600), ("600s", 600), ("10m", 600), ("1h", 3600), ("1d", 86400)] {
            assert_eq!(
                parse(&format!("key_cache_ttl={s}")).key_cache_ttl,
                Duration::from_secs(secs),
                "{s}"
            );
        }
        assert_eq!(parse("metadata_ttl=250ms").metadata_ttl, Duration::from_millis(250));
        for (s, m) in [("022", 0o22), ("0022", 0o22), ("0", 0), ("777", 0o777), ("0o077", 0o77)] {
            assert_eq!(parse(&format!("umask={s}")).umask, Some(m), "{s}");
        }
        for bad in [
            "key_cache_ttl=10x",
            "key_cache_ttl=m",
            "metadata_ttl=",
            "metadata_ttl=1.5s",
        ] {
            assert!(parse_err(bad).contains(bad), "{bad}");
        }
    }

    #[test]
    fn malformed_values_name_the_option() {
        for bad in [
            "umask=9",
            "umask=1000",
            "umask=+22",
            "uid=x",
            "gid=-1",
            "uid=4294967296",
            "fuse_threads=0",
            "block_cache_mib=lots",
            "store=disk",
            "key_mode=aes",
            "ro=maybe",
            "kms_key_id",
            "endpoint=",
            "master_key_file=cred:",
            "sse_c_key_file=cred:a/b",
            "fsname",
        ] {
            let e = parse_err(bad);
            assert!(e.contains(&format!("'{bad}'")), "{bad}: {e}");
        }
        assert!(parse_err("key_mode=aes").contains("cse-local"), "lists the modes");
    }

    #[test]
    fn unknown_option_lists_the_valid_ones() {
        let e = parse_err("ro,colour=blue");
        assert!(e.contains("'colour=blue'"), "{e}");
        for o in OPTIONS {
            assert!(e.contains(o.name), "{} missing from: {e}", o.name);
        }
        assert!(parse_err("remount,ro").contains("not supported"));
    }

    #[test]
    fn later_words_win_across_and_within_words() {
        let o = MountOptions::parse(&["ro,uid=1", "uid=2", "rw,block_cache_mib=1,block_cache_mib=7"]).unwrap();
        assert_eq!((o.read_only, o.uid, o.block_cache_mib), (false, Some(2), 7));
        assert!(parse("rw,ro").read_only);
        assert!(!parse("path_style,path_style=no").path_style);
        assert_eq!(parse("store=memory,store=s3").store, StoreKind::S3);
        assert!(parse(",,ro,,").read_only, "empty words are skipped");
    }

    #[test]
    fn standard_mount_options_are_passed_over() {
        let words = "_netdev,nofail,noauto,auto,user,users,nouser,defaults,exec,noexec,suid,nosuid,dev,nodev,\
                     async,sync,atime,noatime,relatime,x-systemd.automount,x-systemd.requires=network-online.target,\
                     x-gvfs-hide,comment=systemd.automount,_mystery,user=alice";
        let o = parse(words);
        assert_eq!(o.ignored, words.split(',').collect::<Vec<_>>());
        assert!(!o.read_only);
    }

    #[test]
    fn validate_requires_each_mode_s_key_option() {
        for (words, needed) in [
            ("key_mode=cse-kms", "kms_key_id"),
            ("key_mode=sse-c", "sse_c_key_file"),
            ("key_mode=cse-local", "master_key_file"),
        ] {
            let e = parse(words).validate().unwrap_err().0;
            assert!(e.contains(needed), "{words}: {e}");
        }
        parse("key_mode=sse-kms").validate().unwrap();
        parse("key_mode=sse-kms,kms_key_id=k").validate().unwrap();
    }

    #[test]
    fn validate_rejects_options_that_do_not_apply() {
        for (words, named) in [
            ("kms_key_id=k", "kms_key_id"),
            ("key_mode=cse-local,master_key_file=f,kms_key_id=k", "kms_key_id"),
            ("key_mode=sse-kms,sse_c_key_file=f", "sse_c_key_file"),
            ("key_mode=cse-kms,kms_key_id=k,master_key_file=f", "master_key_file"),
            ("key_mode=sse-c,sse_c_key_file=f,block_size=64K", "block_size"),
            ("allow_plaintext", "allow_plaintext"),
            ("allow_other,allow_root", "allow_root"),
        ] {
            let e = parse(words).validate().unwrap_err().0;
            assert!(e.contains(named), "{words}: {e}");
        }
    }

    #[test]
    fn volume_urls() {
        let ok = |s: &str| parse_volume_url(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("s3://bucket"), ("bucket".into(), "".into()));
        assert_eq!(ok("s3://bucket/"), ("bucket".into(), "".into()));
        assert_eq!(ok("s3://bucket/a"), ("bucket".into(), "a/".into()));
        assert_eq!(ok("s3://my.bucket-1/a/b//"), ("my.bucket-1".into(), "a/b/".into()));
        for bad in [
            "bucket/a",
            "http://bucket",
            "s3://",
            "s3:///a",
            "s3://bu cket",
            "s3://b/a//b",
            "s3://b//a",
            "s3://b/./a",
            "s3://b/../a",
        ] {
            let e = parse_volume_url(bad).unwrap_err().0;
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn object_urls() {
        assert_eq!(parse_object_url("s3://b/k").unwrap(), ("b".into(), "k".into()));
        assert_eq!(
            parse_object_url("s3://b/dir/file.txt").unwrap(),
            ("b".into(), "dir/file.txt".into())
        );
        for bad in ["s3://b", "s3://b/", "s3://b/dir/", "b/k", "s3://b/a//k"] {
            assert!(parse_object_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_helper_translates_to_a_mount_command() {
        let got = mount_helper_args(&strings(&["s3://b/p", "/mnt/data", "-o", "rw,_netdev"])).unwrap();
        assert_eq!(got, strings(&["mount", "s3://b/p", "/mnt/data", "-o", "rw,_netdev"]));
        let got = mount_helper_args(&strings(&["s3://b", "/m"])).unwrap();
        assert_eq!(got, strings(&["mount", "s3://b", "/m"]));
        let cli = Cli::try_parse_from(std::iter::once("s3crypt".to_string()).chain(got)).unwrap();
        assert!(
            matches!(cli.command, Command::Mount { foreground: false, .. }),
            "the helper runs in the background"
        );
    }

    #[test]
    fn mount_helper_merges_options_and_takes_flags_anywhere() {
        let args = strings(&["-n", "s3://b", "-oro", "/m", "-v", "-t", "s3crypt", "-o", "uid=1,gid=2"]);
        let got = mount_helper_args(&args).unwrap();
        assert_eq!(got, strings(&["mount", "s3://b", "/m", "-o", "ro,uid=1,gid=2", "-v"]));
        let cli = Cli::try_parse_from(std::iter::once("s3crypt".to_string()).chain(got)).unwrap();
        assert_eq!(cli.verbose, 1);
        let Command::Mount { options, .. } = cli.command else {
            panic!("not a mount")
        };
        assert!(MountOptions::parse(&options).unwrap().read_only);
        let got = mount_helper_args(&strings(&["s3://b", "/m", "-nvtfuse.s3crypt"])).unwrap();
        assert_eq!(got, strings(&["mount", "s3://b", "/m", "-v"]));
    }

    #[test]
    fn mount_helper_fake_checks_but_mounts_nothing() {
        assert_eq!(
            mount_helper_args(&strings(&["s3://b", "/m", "-f", "-o", "ro"])).unwrap(),
            Vec::<String>::new()
        );
        assert!(mount_helper_args(&strings(&["s3://b", "/m", "-f", "-o", "bogus"])).is_err());
        assert!(mount_helper_args(&strings(&["s3://b", "/m", "-fs", "-o", "key_mode=cse-kms"])).is_err());
    }

    #[test]
    fn mount_helper_sloppy_drops_unknown_words_only() {
        let args = strings(&["s3://b", "/m", "-s", "-o", "ro,bogus,other=1,_netdev"]);
        assert_eq!(
            mount_helper_args(&args).unwrap(),
            strings(&["mount", "s3://b", "/m", "-o", "ro,_netdev"])
        );
        let e = mount_helper_args(&strings(&["s3://b", "/m", "-o", "ro,bogus"]))
            .unwrap_err()
            .0;
        assert!(e.contains("'bogus'"), "{e}");
        let e = mount_helper_args(&strings(&["s3://b", "/m", "-s", "-o", "uid=x"]))
            .unwrap_err()
            .0;
        assert!(
            e.contains("'uid=x'"),
            "sloppy still rejects bad values of known options: {e}"
        );
    }

    #[test]
    fn mount_helper_rejects_bad_invocations() {
        for args in [
            &["s3://b"][..],
            &["s3://b", "/m", "/extra"],
            &["/dev/sda1", "/m"],
            &["s3://b", "/m", "-t", "ext4"],
            &["s3://b", "/m", "-o"],
            &["s3://b", "/m", "-x"],
            &["s3://b", "/m", "-N", "/proc/1/ns/mnt"],
        ] {
            assert!(mount_helper_args(&strings(args)).is_err(), "{args:?}");
        }
    }

    #[test]
    fn helper_names() {
        assert!(is_mount_helper("/sbin/mount.s3crypt"));
        assert!(is_mount_helper("mount.s3crypt"));
        assert!(is_mount_helper("/usr/sbin/mount.fuse.s3crypt"));
        assert!(!is_mount_helper("/usr/local/bin/s3crypt"));
    }

    #[test]
    fn mount_help_documents_every_option_with_its_default() {
        let help = Cli::command()
            .find_subcommand_mut("mount")
            .unwrap()
            .render_long_help()
            .to_string();
        for o in OPTIONS {
            let line = help
                .lines()
                .find(|l| l.trim_start().starts_with(o.name))
                .unwrap_or_else(|| panic!("{}", o.name));
            assert!(line.contains(&format!("[default: {}]", o.default)), "{line}");
        }
        assert!(help.contains("BENCHMARKS ONLY"));
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_parse() {
        let p = |v: &[&str]| Cli::try_parse_from(v).map(|c| c.command);
        let m = p(&["s3crypt", "mount", "s3://b", "/m", "-f", "-o", "ro", "-o", "uid=1"]).unwrap();
        let Command::Mount {
            source,
            mountpoint,
            foreground,
            options,
        } = m
        else {
            panic!("mount")
        };
        assert_eq!(
            (source.as_str(), mountpoint, foreground),
            ("s3://b", PathBuf::from("/m"), true)
        );
        assert_eq!(options, strings(&["ro", "uid=1"]));
        assert!(matches!(
            p(&["s3crypt", "cat", "s3://b/k", "-o", "key_mode=sse-kms"]).unwrap(),
            Command::Cat { .. }
        ));
        let put = p(&["s3crypt", "put", "f", "s3://b/k"]).unwrap();
        assert!(matches!(put, Command::Put { file, dest, .. } if file.as_os_str() == "f" && dest == "s3://b/k"));
        assert!(matches!(p(&["s3crypt", "keygen", "k"]).unwrap(), Command::Keygen { file } if file.as_os_str() == "k"));
        assert!(p(&["s3crypt", "mount", "s3://b"]).is_err());
    }
}

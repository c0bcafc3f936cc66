//! The `metrics_addr=` endpoint: a real Prometheus server scrapes a mount, the text format is strict and carries
//! no names, and `/health` follows the store.
mod common;

use common::mount::{write_file, TestMount, Volume};
use common::proxy::{FaultProxy, Mode};
use s3crypt::keys::KeyMode;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One HTTP GET over a fresh connection: (status code, body).
fn http_get(addr: SocketAddr, target: &str) -> (u16, String) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(c, "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).expect("read response");
    let text = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

fn metrics_addr(m: &TestMount) -> SocketAddr {
    m.metrics_server
        .as_ref()
        .expect("metrics_addr starts the endpoint")
        .addr()
}

/// A Prometheus server of its own (the Debian package's binary), scraping one target every second.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: s3crypt\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("run prometheus (Debian package `prometheus`; scripts/test installs it)");
        let p = Prometheus { child, addr, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if TcpStream::connect(addr).is_ok() && http_get(addr, "/-/ready").0 == 200 {
                return p;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("prometheus did not become ready: {}", p.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of an instant PromQL query whose result is one sample (`None` if the result is empty).
    fn query(&self, promql: &str) -> Option<f64> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", percent_encode(promql)));
        assert_eq!(status, 200, "{promql}: {body}");
        assert!(body.contains("\"status\":\"success\""), "{promql}: {body}");
        let rest = body.split_once("\"value\":[")?.1;
        let value = rest.split_once(",\"")?.1.split('"').next()?;
        Some(
            value
                .parse()
                .unwrap_or_else(|_| panic!("{promql}: value {value} in {body}")),
        )
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Writes `n` new files and reads each back.
fn write_and_read(root: &Path, n: usize) -> Vec<String> {
    let names: Vec<String> = (0..n).map(|i| format!("confidential-report-{i}.txt")).collect();
    for (i, name) in names.iter().enumerate() {
        write_file(&root.join(name), &common::mount::pattern(10_000 + i, i as u64)).unwrap();
    }
    for (i, name) in names.iter().enumerate() {
        assert_eq!(
            std::fs::read(root.join(name)).unwrap(),
            common::mount::pattern(10_000 + i, i as u64)
        );
    }
    names
}

#[test]
fn prometheus_scrapes_kms_calls_and_s3_requests_of_a_cse_kms_mount() {
    let vol = Volume::new(KeyMode::CseKms);
    // The first mount creates the volume descriptor (its own KMS call); the measured mount only opens it.
    TestMount::mount(&vol).unmount();
    let m = TestMount::mount_with(&vol, &["metrics_addr=127.0.0.1:0"]);
    let prom = Prometheus::start(metrics_addr(&m));
    let generated_before = m.key_stats.snapshot().kms_generate;
    assert_eq!(generated_before, 0, "opening a volume generates no data key");
    write_and_read(m.mnt.path(), 5);
    let expected = m.counter.stats();
    assert_eq!(m.key_stats.snapshot().kms_generate, 5, "one data key per new file");
    let sel = format!("volume=\"{}\"", vol.bucket);
    let gdk = format!("sum(s3crypt_kms_requests_total{{{sel},operation=\"GenerateDataKey\",outcome=\"ok\"}})");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut got = BTreeMap::new();
        got.insert("GenerateDataKey".to_string(), prom.query(&gdk).unwrap_or(0.0));
        for op in s3crypt::store::failing::OpKind::ALL {
            let q = format!(
                "sum(s3crypt_s3_requests_total{{{sel},operation=\"{}\"}})",
                op.api_name()
            );
            got.insert(op.api_name().to_string(), prom.query(&q).unwrap_or(0.0));
        }
        let mut want = BTreeMap::new();
        want.insert("GenerateDataKey".to_string(), 5.0);
        for op in s3crypt::store::failing::OpKind::ALL {
            want.insert(op.api_name().to_string(), expected.count(op) as f64);
        }
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the expected counts:\n got {got:?}\nwant {want:?}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        expected.count(s3crypt::store::failing::OpKind::Put),
        5,
        "one PutObject per small file"
    );
    let put_ok = format!("sum(s3crypt_s3_requests_total{{{sel},operation=\"PutObject\",outcome=\"ok\"}})");
    assert_eq!(prom.query(&put_ok), Some(5.0));
    let sent = format!("sum(s3crypt_s3_sent_bytes_total{{{sel},operation=\"PutObject\"}})");
    assert_eq!(
        prom.query(&sent),
        Some(expected.bytes_up(s3crypt::store::failing::OpKind::Put) as f64)
    );
    let fuse_creates = format!("sum(s3crypt_fuse_requests_total{{{sel},operation=\"create\"}})");
    assert_eq!(prom.query(&fuse_creates), Some(5.0), "one FUSE create per new file");
}

/// One sample line of the text format: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    is_metric_name(s) && !s.contains(':')
}

/// Parses one sample line strictly: `name{l="v",...} value`, escapes `\\`, `\"` and `\n` only.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let lname = &rest[..eq];
            if !is_label_name(lname) {
                return Err(format!("bad label name {lname:?}"));
            }
            let mut chars = rest[eq + 1..]
                .strip_prefix('"')
                .ok_or("unquoted label value")?
                .char_indices();
            let mut value = String::new();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, c) => value.push(c),
                }
            };
            labels.push((lname.to_string(), value));
            rest = &rest[eq + 1 + 1 + end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    Ok((name.to_string(), labels, value))
}

/// Parses the whole exposition strictly; returns the families (name → type) and the samples.
fn parse_exposition(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut help = BTreeSet::new();
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    let mut series = BTreeSet::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("HELP without text: {line}"));
            assert!(is_metric_name(name) && !h.trim().is_empty(), "bad HELP: {line}");
            assert!(help.insert(name.to_string()), "second HELP for {name}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest
                .split_once(' ')
                .unwrap_or_else(|| panic!("TYPE without type: {line}"));
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                "bad TYPE: {line}"
            );
            assert!(help.contains(name), "TYPE before HELP for {name}");
            assert!(
                types.insert(name.to_string(), t.to_string()).is_none(),
                "second TYPE for {name}"
            );
        } else if line.starts_with('#') || line.is_empty() {
            panic!("unexpected line {line:?}");
        } else {
            let s = parse_sample(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suf| {
                    s.0.strip_suffix(suf)
                        .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(&s.0);
            assert!(types.contains_key(family), "sample of {} has no TYPE (and HELP)", s.0);
            let mut key: Vec<_> = s.1.clone();
            key.sort();
            assert!(series.insert((s.0.clone(), key)), "duplicate series: {line}");
            samples.push(s);
        }
    }
    (types, samples)
}

/// The FUSE requests of one operation the mount has answered so far.
fn fuse_requests(addr: SocketAddr, operation: &str) -> u64 {
    let (status, text) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let label = format!("operation=\"{operation}\"");
    text.lines()
        .find(|l| l.starts_with("s3crypt_fuse_request_duration_seconds_count{") && l.contains(&label))
        .map(|l| l.rsplit(' ').next().and_then(|n| n.parse().ok()).expect("a count"))
        .unwrap_or(0)
}

/// The mount clears set-user-ID bits on write itself (`FUSE_HANDLE_KILLPRIV_V2`; posix.rs checks that it does),
/// so the kernel does not ask for the file's `security.capability` before each write to find out whether it
/// must: 256 writes of 4 KiB cost a query or two, not one each.
#[test]
fn small_writes_do_not_each_ask_for_the_files_capabilities() {
    let vol = Volume::new(KeyMode::CseLocal);
    let m = TestMount::mount_with(&vol, &["metrics_addr=127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    let mut f = std::fs::File::create(m.path("f")).unwrap();
    let before = fuse_requests(addr, "getxattr");
    let writes = fuse_requests(addr, "write");
    for i in 0..256u32 {
        f.write_all(&[i as u8; 4096]).unwrap();
    }
    let asked = fuse_requests(addr, "getxattr") - before;
    assert_eq!(fuse_requests(addr, "write") - writes, 256, "one request per write");
    common::mount::close_checked(f).unwrap();
    assert!(asked <= 2, "{asked} capability queries for 256 writes");
    let back = std::fs::read(m.path("f")).unwrap();
    assert_eq!(back.len(), 256 * 4096);
    assert!(back
        .chunks(4096)
        .enumerate()
        .all(|(i, c)| c.iter().all(|b| *b == i as u8)));
}

#[test]
fn metrics_text_is_strict_with_help_and_type_and_no_names_in_labels() {
    let vol = Volume::new(KeyMode::CseKms);
    let m = TestMount::mount_with(&vol, &["metrics_addr=127.0.0.1:0"]);
    std::fs::create_dir(m.path("private-projects")).unwrap();
    let names = write_and_read(&m.path("private-projects"), 3);
    let (status, text) = http_get(metrics_addr(&m), "/metrics");
    assert_eq!(status, 200, "{text}");
    let (types, samples) = parse_exposition(&text);
    for family in [
        "s3crypt_s3_requests_total",
        "s3crypt_s3_request_duration_seconds",
        "s3crypt_s3_sent_bytes_total",
        "s3crypt_s3_received_bytes_total",
        "s3crypt_s3_retries_total",
        "s3crypt_kms_requests_total",
        "s3crypt_data_key_cache_hits_total",
        "s3crypt_data_key_cache_misses_total",
        "s3crypt_block_cache_hits_total",
        "s3crypt_block_cache_misses_total",
        "s3crypt_block_cache_bytes",
        "s3crypt_authentication_failures_total",
        "s3crypt_conflicts_total",
        "s3crypt_recovery_files_total",
        "s3crypt_uploads_pending",
        "s3crypt_journal_bytes",
        "s3crypt_open_files",
        "s3crypt_fuse_requests_total",
        "s3crypt_fuse_request_duration_seconds",
    ] {
        assert!(types.contains_key(family), "{family} missing from:\n{text}");
    }
    let forbidden: Vec<String> = names
        .iter()
        .cloned()
        .chain(["private-projects".to_string(), "confidential".to_string()])
        .collect();
    for (name, labels, _) in &samples {
        assert!(
            labels.iter().any(|(k, v)| k == "volume" && *v == vol.bucket),
            "{name} has no volume label"
        );
        for (k, v) in labels {
            for f in &forbidden {
                assert!(
                    !v.contains(f.as_str()),
                    "{name}: label {k}={v:?} carries a file name or key"
                );
            }
            assert!(
                !v.contains('/') || k == "volume",
                "{name}: label {k}={v:?} looks like a path"
            );
        }
    }
    assert!(
        samples
            .iter()
            .any(|(n, l, v)| n == "s3crypt_s3_requests_total" && *v > 0.0 && l.iter().any(|(k, _)| k == "outcome")),
        "S3 requests are counted by outcome"
    );
}

#[test]
fn strict_parser_rejects_what_it_must() {
    for bad in [
        "# HELP a x\n# TYPE a counter\na{b=\"c} 1\n",
        "# HELP a x\n# TYPE a counter\na 1 2 3x\n",
        "a 1\n",
        "# TYPE a counter\na 1\n",
        "# HELP a x\n# TYPE a counter\na{b=\"\\q\"} 1\n",
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_exposition(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
    let (types, samples) = parse_exposition("# HELP a x\n# TYPE a counter\na{b=\"c\\\"d\",e=\"f\"} 1\n");
    assert_eq!(types["a"], "counter");
    assert_eq!(samples[0].1[0].1, "c\"d");
}

fn wait_for_health(addr: SocketAddr, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(addr, "/health");
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/health stayed {status} ({body}), wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn health_is_503_while_the_store_is_unreachable_and_200_again_after() {
    let vol = Volume::new(KeyMode::SseS3);
    let proxy = FaultProxy::start(common::endpoint());
    let endpoint = format!("endpoint={}", proxy.endpoint());
    let m = TestMount::mount_with(&vol, &[endpoint.as_str(), "metrics_addr=127.0.0.1:0"]);
    let addr = metrics_addr(&m);
    assert_eq!(http_get(addr, "/health"), (200, "ok\n".to_string()));
    proxy.set_mode(Mode::Reset);
    let reason = wait_for_health(addr, 503);
    assert!(reason.contains("S3"), "the reason names the store: {reason}");
    proxy.set_mode(Mode::Pass);
    assert_eq!(wait_for_health(addr, 200), "ok\n");
    assert_eq!(http_get(addr, "/nothing").0, 404);
}

//! Progress of a volume-wide command (`verify`, `rekey`) on standard error: on a terminal one status line
//! rewritten four times a second; otherwise (a log, a pipe, journald) a plain line every five seconds. Objects and
//! bytes done of the total, the rate, and an estimate of the time left.
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Progress {
    what: &'static str,
    objects: AtomicU64,
    bytes: AtomicU64,
    total_objects: u64,
    total_bytes: u64,
    started: Instant,
}

impl Progress {
    /// Progress over `objects` (key and size), named `what` in the lines.
    pub fn new(what: &'static str, objects: &[(String, u64)]) -> Arc<Self> {
        Arc::new(Progress {
            what,
            objects: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            total_objects: objects.len() as u64,
            total_bytes: objects.iter().map(|(_, s)| s).sum(),
            started: Instant::now(),
        })
    }

    /// One object of `bytes` is done.
    pub fn done(&self, bytes: u64) {
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    fn line(&self) -> String {
        let (o, b) = (self.objects.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed));
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = b as f64 / secs;
        let eta = if rate > 0.0 && self.total_bytes >= b {
            format!("{:.0} s", (self.total_bytes - b) as f64 / rate)
        } else {
            "?".into()
        };
        format!(
            "{}: {o}/{} objects, {:.1}/{:.1} MB, {:.1} MB/s, ETA {eta}",
            self.what,
            self.total_objects,
            b as f64 / 1e6,
            self.total_bytes as f64 / 1e6,
            rate / 1e6
        )
    }

    /// Starts printing; the lines stop when the returned reporter is finished or dropped.
    pub fn start(self: &Arc<Self>) -> Reporter {
        let tty = std::io::stderr().is_terminal();
        let p = self.clone();
        let task = tokio::spawn(async move {
            let every = if tty {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            };
            loop {
                tokio::time::sleep(every).await;
                if tty {
                    eprint!("\r\x1b[2K{}", p.line());
                } else {
                    eprintln!("{}", p.line());
                }
            }
        });
        Reporter { task, tty }
    }
}

pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
    tty: bool,
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
        if self.tty {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_counts_objects_and_bytes_and_estimates_the_rest() {
        let objects = vec![("a".to_string(), 3_000_000), ("b".to_string(), 1_000_000)];
        let p = Progress::new("rekey", &objects);
        assert!(p.line().starts_with("rekey: 0/2 objects, 0.0/4.0 MB"), "{}", p.line());
        assert!(p.line().ends_with("ETA ?"), "nothing done yet: {}", p.line());
        std::thread::sleep(Duration::from_millis(20));
        p.done(3_000_000);
        let line = p.line();
        assert!(line.starts_with("rekey: 1/2 objects, 3.0/4.0 MB, "), "{line}");
        let eta: f64 = line
            .rsplit_once("ETA ")
            .unwrap()
            .1
            .trim_end_matches(" s")
            .parse()
            .unwrap();
        assert!(eta >= 0.0, "{line}");
    }
}

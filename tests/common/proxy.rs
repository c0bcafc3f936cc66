//! A fault-injecting HTTP/1.1 proxy for integration tests: it sits between an S3 client (the s3crypt mount, or a
//! raw aws-sdk-s3 client) and the local S3 server, and can reset, swallow, delay or lose what passes through.
//!
//! # Why a proxy, and why one that parses HTTP
//! The in-process `FailingStore` wrapper injects errors above the SDK; it cannot show what the SDK, its connection
//! pool and s3crypt together make of a connection reset by the peer, a server that never answers, or — the case
//! that matters most for correctness — a request the server *applied* whose response never arrived. A conditional
//! PUT (`If-None-Match: *`, `If-Match`) or a `CompleteMultipartUpload` that succeeded on the server but looks failed
//! to the client is retried, and the retry then meets its own success (412, `NoSuchUpload`). Only something on the
//! wire can stage that, and only if it knows where one request and its response end, so the proxy parses HTTP/1.1
//! framing rather than copying bytes blindly: request line and headers, then a body framed by `Content-Length` or
//! `Transfer-Encoding: chunked`; status line and headers, then a body framed the same way, or absent (HEAD, 1xx,
//! 204, 304), or running to the end of the connection. There is one code path for every mode: each request is
//! read, judged, and forwarded (or not), so "pass" exercises the same parser the faults rely on.
//!
//! The bytes themselves are forwarded unchanged, head and body alike: SigV4 signs headers and, for streaming
//! uploads, every chunk, so the proxy must not normalise anything. What aws-sdk-s3 (1.157) sends over plain HTTP:
//! an in-memory body (`Bytes`, which is what `S3Store` sends for PutObject and UploadPart) goes out with a plain
//! `Content-Length`, its SHA-256 signed in `x-amz-content-sha256` and its CRC32 in `x-amz-checksum-crc32`; a
//! streamed body (`ByteStream::from_path`) goes out as `Content-Encoding: aws-chunked` with signed chunks, still
//! framed on the wire by `Content-Length` (the encoded length; `x-amz-decoded-content-length` holds the payload's).
//! Neither uses `Transfer-Encoding: chunked` or `Expect: 100-continue`; both are handled all the same, for other
//! clients and for responses.
//!
//! # Threads and sockets
//! Plain `std` threads, no async: one acceptor, and one thread per client connection that owns the client socket and
//! at most one upstream connection, opened on the first forwarded request and kept alive with the client's. Requests
//! on one connection are handled strictly in order, which also makes pipelining work. Before reusing an idle
//! upstream connection the thread peeks at it: a server that closed it meanwhile (idle keep-alive timeout) gets a
//! fresh connection instead of a reset that the test did not ask for.
//!
//! A reset is a real TCP RST: `SO_LINGER` with a zero timeout, then close. The client sees `ECONNRESET` (or
//! `EPIPE` if it was still writing), which the SDK reports as a dispatch failure — the same thing a network fault
//! gives. For the close to send the RST it must close the socket's *last* descriptor, so the clone of each socket
//! kept in the registry (for [`FaultProxy`]'s `Drop`, which shuts every socket down to unblock the threads and then
//! joins them) is removed before the thread's own descriptor is closed; [`Tracked`] does that in its `Drop`.
//!
//! # Modes and the one-shot drop
//! [`Mode`] is read afresh for each request, so a change applies to connections already open as well as to new
//! ones. A blackholed request is never answered, and its connection stays a black hole until the client gives up
//! and closes it: answering a later request on it would hand the client a response to the wrong request.
//! [`FaultProxy::drop_response_once`] arms a matcher; the first forwarded request it matches is sent to the server
//! in full, the server's response is read in full (so the server has finished applying it), and then the client
//! connection is reset instead of answered. The matcher is consumed by the request it matches, before that request
//! is forwarded, so two concurrent matching requests never both lose their response.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest request or response head (start line plus headers) accepted, and longest chunk-size line: a peer that
/// sends more is broken, and the connection is reset rather than buffered without bound.
const MAX_HEAD_BYTES: usize = 1024 * 1024;

/// Seed of the draws behind [`Mode::ResetFraction`]: fixed, so that the n-th request through a proxy meets the same
/// fate in every run.
const RESET_FRACTION_SEED: u64 = 0x5333_c0de_5eed_0001;

/// How often a stalled request checks whether the proxy is being dropped.
const STALL_SLICE: Duration = Duration::from_millis(20);

/// What the proxy does with each request it reads. Read afresh for every request, on every connection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Forward the request and its response unchanged.
    Pass,
    /// Read the request, then reset the client connection (TCP RST) without forwarding it.
    Reset,
    /// Read the request and discard it and everything after it on that connection; never answer.
    Blackhole,
    /// Wait this long before forwarding each request, then forward it as in `Pass`.
    Stall(Duration),
    /// Reset this fraction (0.0..=1.0) of requests, chosen by a seeded generator, and pass the rest.
    ResetFraction(f64),
}

/// The head of one request as the client sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// The request target: path and query, e.g. `/bucket/key?uploadId=...`.
    pub target: String,
    /// Header names and values in the order sent, names as sent (not lower-cased), values trimmed.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The value of the first header called `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

type Matcher = Box<dyn Fn(&RequestHead) -> bool + Send + Sync>;

/// A running proxy on `127.0.0.1:<ephemeral port>`. Dropping it closes the listener and every connection and joins
/// all of its threads.
pub struct FaultProxy {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

/// State shared by the handle, the acceptor and the connection threads.
struct Shared {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    drop_next: Mutex<Option<Matcher>>,
    /// Requests this accepts are blackholed, whatever the mode.
    hold: Mutex<Option<Matcher>>,
    dropped: AtomicUsize,
    log: Mutex<Vec<RequestHead>>,
    /// Number of [`Mode::ResetFraction`] draws so far: the input of the next draw.
    draws: AtomicU64,
    stopping: AtomicBool,
    next_key: AtomicU64,
    /// A clone of every open socket, so that `Drop` can shut them all down.
    sockets: Mutex<HashMap<u64, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl FaultProxy {
    /// Starts a proxy in [`Mode::Pass`] in front of `upstream` (`127.0.0.1:PORT` or `http://127.0.0.1:PORT`).
    /// Panics if `upstream` does not resolve or no local port can be had: this is a test helper.
    pub fn start(upstream: &str) -> FaultProxy {
        let authority = upstream.trim_start_matches("http://").trim_end_matches('/');
        let upstream = authority
            .to_socket_addrs()
            .unwrap_or_else(|e| panic!("proxy upstream {upstream:?}: {e}"))
            .next()
            .unwrap_or_else(|| panic!("proxy upstream {upstream:?} resolves to nothing"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy's port");
        let addr = listener.local_addr().expect("the proxy's address");
        let shared = Arc::new(Shared {
            upstream,
            mode: Mutex::new(Mode::Pass),
            drop_next: Mutex::new(None),
            hold: Mutex::new(None),
            dropped: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            draws: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            next_key: AtomicU64::new(0),
            sockets: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn the proxy's acceptor")
        };
        FaultProxy {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// The URL to give a client as its endpoint: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the mode for every request read from now on, on new and already open connections.
    pub fn set_mode(&self, mode: Mode) {
        if let Mode::ResetFraction(f) = mode {
            assert!((0.0..=1.0).contains(&f), "reset fraction {f} is outside 0..=1");
        }
        *lock(&self.shared.mode) = mode;
    }

    /// Arms a one-shot fault: the next forwarded request that `matcher` accepts reaches the server and is answered
    /// there, but its client connection is reset instead of receiving the response. Replaces a matcher that has not
    /// fired yet. Requests reset or blackholed by the [`Mode`] never reach the matcher.
    pub fn drop_response_once(&self, matcher: impl Fn(&RequestHead) -> bool + Send + Sync + 'static) {
        *lock(&self.shared.drop_next) = Some(Box::new(matcher));
    }

    /// Blackholes every request `matcher` accepts from now on (on new and open connections), until
    /// [`release_held`](Self::release_held); other requests follow the [`Mode`]. Replaces an earlier matcher.
    pub fn blackhole_matching(&self, matcher: impl Fn(&RequestHead) -> bool + Send + Sync + 'static) {
        *lock(&self.shared.hold) = Some(Box::new(matcher));
    }

    /// Ends [`blackhole_matching`](Self::blackhole_matching) for requests read from now on.
    pub fn release_held(&self) {
        *lock(&self.shared.hold) = None;
    }

    /// How many responses [`drop_response_once`](Self::drop_response_once) has swallowed so far.
    pub fn dropped(&self) -> usize {
        self.shared.dropped.load(Ordering::SeqCst)
    }

    /// The head of every request read so far, in the order read, whatever the mode did with it.
    pub fn requests(&self) -> Vec<RequestHead> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the acceptor out of `accept`; it sees `stopping` and returns, closing the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // No socket is registered after this sweep: `Tracked::new` checks `stopping` under the same lock.
        for socket in lock(&self.shared.sockets).values() {
            let _ = socket.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

impl Shared {
    /// What to do with the request just read, per the current mode.
    fn action(&self) -> Action {
        match *lock(&self.mode) {
            Mode::Pass => Action::Forward(Duration::ZERO),
            Mode::Stall(delay) => Action::Forward(delay),
            Mode::Reset => Action::Reset,
            Mode::Blackhole => Action::Blackhole,
            Mode::ResetFraction(fraction) => {
                let n = self.draws.fetch_add(1, Ordering::SeqCst);
                if unit_draw(RESET_FRACTION_SEED.wrapping_add(n)) < fraction {
                    Action::Reset
                } else {
                    Action::Forward(Duration::ZERO)
                }
            }
        }
    }

    /// Takes the armed drop matcher if it accepts `head`.
    fn claim_drop(&self, head: &RequestHead) -> bool {
        let mut armed = lock(&self.drop_next);
        if armed.as_ref().is_some_and(|m| m(head)) {
            *armed = None;
            return true;
        }
        false
    }

    /// Sleeps `delay`, or less if the proxy is being dropped (then an error, to end the connection).
    fn stall(&self, delay: Duration) -> io::Result<()> {
        let until = Instant::now() + delay;
        while Instant::now() < until {
            if self.stopping.load(Ordering::SeqCst) {
                return Err(stopping());
            }
            std::thread::sleep(STALL_SLICE.min(until - Instant::now()));
        }
        Ok(())
    }
}

/// The fate of one request.
enum Action {
    /// Forward it after this delay.
    Forward(Duration),
    Reset,
    Blackhole,
}

/// How a connection goes on after an exchange.
enum Next {
    KeepAlive,
    /// Close gracefully (FIN), e.g. after `Connection: close` or at the client's end of stream.
    Close,
    /// Reset (RST).
    Reset,
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(client) = Tracked::new(stream, &shared) else {
            return;
        };
        let conn = Conn {
            shared: shared.clone(),
            client,
            upstream: None,
        };
        let worker = std::thread::Builder::new()
            .name("proxy-conn".into())
            .spawn(move || conn.serve())
            .expect("spawn a proxy connection thread");
        let mut workers = lock(&shared.workers);
        workers.retain(|w| !w.is_finished());
        workers.push(worker);
    }
}

/// A socket whose clone sits in the proxy's registry. Dropping it removes the clone first, so that the close of
/// `io` is the close of the socket's last descriptor (which is what sends a RST after `SO_LINGER` 0).
struct Tracked {
    io: BufReader<TcpStream>,
    key: u64,
    shared: Arc<Shared>,
}

impl Tracked {
    fn new(stream: TcpStream, shared: &Arc<Shared>) -> io::Result<Tracked> {
        stream.set_nodelay(true)?;
        let clone = stream.try_clone()?;
        let key = shared.next_key.fetch_add(1, Ordering::SeqCst);
        let mut sockets = lock(&shared.sockets);
        if shared.stopping.load(Ordering::SeqCst) {
            return Err(stopping());
        }
        sockets.insert(key, clone);
        Ok(Tracked {
            io: BufReader::new(stream),
            key,
            shared: shared.clone(),
        })
    }

    /// Closes the connection with a RST.
    fn reset(self) {
        let off = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the descriptor is open (owned by `self.io`), and the pointer and length describe `off`, which
        // outlives the call.
        unsafe {
            libc::setsockopt(
                self.io.get_ref().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&off as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
        }
    }

    /// Closes the connection with a FIN, after what was written has gone out.
    fn close(self) {
        let _ = self.io.get_ref().shutdown(Shutdown::Write);
    }

    /// Whether an idle connection is still usable: nothing buffered or pending, and not closed by the peer.
    fn is_idle_and_open(&self) -> bool {
        if !self.io.buffer().is_empty() {
            return false;
        }
        let socket = self.io.get_ref();
        if socket.set_nonblocking(true).is_err() {
            return false;
        }
        let open = matches!(socket.peek(&mut [0u8]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        socket.set_nonblocking(false).is_ok() && open
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        lock(&self.shared.sockets).remove(&self.key);
    }
}

/// One client connection and its upstream connection, if open.
struct Conn {
    shared: Arc<Shared>,
    client: Tracked,
    upstream: Option<Tracked>,
}

impl Conn {
    fn serve(mut self) {
        let next = loop {
            match self.exchange() {
                Ok(Next::KeepAlive) => continue,
                Ok(next) => break next,
                // Whichever side failed, the client must not mistake the rest of the stream for an answer.
                Err(_) => break Next::Reset,
            }
        };
        drop(self.upstream.take());
        match next {
            Next::Reset => self.client.reset(),
            Next::Close | Next::KeepAlive => self.client.close(),
        }
    }

    /// Reads one request from the client and deals with it as the mode says.
    fn exchange(&mut self) -> io::Result<Next> {
        let Some(raw_head) = read_head(&mut self.client.io)? else {
            return Ok(Next::Close);
        };
        let head = parse_request(&raw_head)?;
        lock(&self.shared.log).push(head.clone());
        let body = request_body(&head.headers)?;
        let held = lock(&self.shared.hold).as_ref().is_some_and(|m| m(&head));
        let action = if held { Action::Blackhole } else { self.shared.action() };
        match action {
            Action::Reset => {
                copy_body(&mut self.client.io, body, &mut io::sink())?;
                Ok(Next::Reset)
            }
            Action::Blackhole => {
                io::copy(&mut self.client.io, &mut io::sink())?;
                Ok(Next::Close)
            }
            Action::Forward(delay) => {
                self.shared.stall(delay)?;
                self.forward(&head, &raw_head, body)
            }
        }
    }

    /// Sends the request upstream and its response to the client (or nowhere, if it is the one to drop).
    fn forward(&mut self, head: &RequestHead, raw_head: &[u8], body: Body) -> io::Result<Next> {
        let drop_response = self.shared.claim_drop(head);
        let upstream = open_upstream(&mut self.upstream, &self.shared)?;
        let mut to_server = BufWriter::new(upstream.io.get_ref());
        to_server.write_all(raw_head)?;
        copy_body(&mut self.client.io, body, &mut to_server)?;
        to_server.flush()?;
        drop(to_server);

        let response = read_final_response_head(&mut upstream.io)?;
        let response_body = response_body(&head.method, response.status, &response.headers)?;
        let mut to_client: Box<dyn Write + '_> = if drop_response {
            Box::new(io::sink())
        } else {
            Box::new(BufWriter::new(self.client.io.get_ref()))
        };
        to_client.write_all(&response.raw)?;
        copy_body(&mut upstream.io, response_body, &mut to_client)?;
        to_client.flush()?;
        drop(to_client);

        if drop_response {
            self.shared.dropped.fetch_add(1, Ordering::SeqCst);
            return Ok(Next::Reset);
        }
        let closing = matches!(response_body, Body::UntilClose)
            || wants_close(&response.raw, &response.headers)
            || wants_close(raw_head, &head.headers);
        if closing {
            self.upstream = None;
            return Ok(Next::Close);
        }
        Ok(Next::KeepAlive)
    }
}

/// The upstream connection in `slot`, opened (again) unless the one kept there is idle and open.
fn open_upstream<'a>(slot: &'a mut Option<Tracked>, shared: &Arc<Shared>) -> io::Result<&'a mut Tracked> {
    if !slot.as_ref().is_some_and(Tracked::is_idle_and_open) {
        *slot = None;
        let stream = TcpStream::connect(shared.upstream)?;
        *slot = Some(Tracked::new(stream, shared)?);
    }
    Ok(slot.as_mut().expect("opened above"))
}

/// How a message body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    /// Runs until the sender closes the connection (a response with neither length nor chunking).
    UntilClose,
}

/// Reads one message head, start line to the empty line, as raw bytes. `None` at a clean end of stream before it.
/// Empty lines before the start line are skipped (RFC 9112 §2.2).
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let start = head.len();
        let n = r.by_ref().take(MAX_HEAD_BYTES as u64).read_until(b'\n', &mut head)?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(invalid("end of stream inside a message head"))
            };
        }
        if head.len() >= MAX_HEAD_BYTES {
            return Err(invalid("message head too long"));
        }
        let line = &head[start..];
        if line == b"\r\n" || line == b"\n" {
            if start == 0 {
                head.clear();
                continue;
            }
            return Ok(Some(head));
        }
    }
}

/// Splits a raw head into its start line and headers.
fn parse_head(raw: &[u8]) -> io::Result<(String, Vec<(String, String)>)> {
    let text = std::str::from_utf8(raw).map_err(|_| invalid("message head is not UTF-8"))?;
    let mut lines = text.lines();
    let start = lines.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid("header line without a colon"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok((start, headers))
}

fn parse_request(raw: &[u8]) -> io::Result<RequestHead> {
    let (start, headers) = parse_head(raw)?;
    let mut words = start.split_whitespace();
    let (Some(method), Some(target), Some(_version)) = (words.next(), words.next(), words.next()) else {
        return Err(invalid("malformed request line"));
    };
    Ok(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        headers,
    })
}

/// A final response's head, as read and as parsed.
struct ResponseHead {
    status: u16,
    /// Status line and headers as received, forwarded unchanged.
    raw: Vec<u8>,
    headers: Vec<(String, String)>,
}

/// Reads response heads until a final (non-1xx) one: interim responses such as `100 Continue` are dropped, since
/// the proxy has already sent the whole request body.
fn read_final_response_head(r: &mut impl BufRead) -> io::Result<ResponseHead> {
    loop {
        let raw = read_head(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no response"))?;
        let (start, headers) = parse_head(&raw)?;
        let status = start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| invalid("malformed status line"))?;
        if !(100..200).contains(&status) {
            return Ok(ResponseHead { status, raw, headers });
        }
    }
}

/// The framing of a request body: chunked, by length, or none (RFC 9112 §6.3: a request without either has none).
fn request_body(headers: &[(String, String)]) -> io::Result<Body> {
    if is_chunked(headers) {
        return Ok(Body::Chunked);
    }
    match header(headers, "content-length") {
        Some(n) => Ok(Body::Length(n.parse().map_err(|_| invalid("bad Content-Length"))?)),
        None => Ok(Body::None),
    }
}

/// The framing of a response body (RFC 9112 §6.3): none after HEAD and for 1xx, 204 and 304; else chunked, by
/// length, or to the end of the connection.
fn response_body(method: &str, status: u16, headers: &[(String, String)]) -> io::Result<Body> {
    if method.eq_ignore_ascii_case("HEAD") || status < 200 || status == 204 || status == 304 {
        return Ok(Body::None);
    }
    if is_chunked(headers) {
        return Ok(Body::Chunked);
    }
    match header(headers, "content-length") {
        Some(n) => Ok(Body::Length(n.parse().map_err(|_| invalid("bad Content-Length"))?)),
        None => Ok(Body::UntilClose),
    }
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
        .flat_map(|(_, v)| v.split(','))
        .any(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
}

/// Whether a message asks to close the connection after it: `Connection: close`, or HTTP/1.0 without keep-alive.
fn wants_close(raw_head: &[u8], headers: &[(String, String)]) -> bool {
    let tokens = || {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
    };
    let http10 = raw_head
        .split(|&b| b == b'\n')
        .next()
        .is_some_and(|line| line.windows(8).any(|w| w == b"HTTP/1.0"));
    tokens().any(|t| t.eq_ignore_ascii_case("close"))
        || (http10 && !tokens().any(|t| t.eq_ignore_ascii_case("keep-alive")))
}

/// Copies one body, framing included, from `r` to `w`, reading exactly as far as the body goes.
fn copy_body(r: &mut impl BufRead, body: Body, w: &mut dyn Write) -> io::Result<()> {
    match body {
        Body::None => Ok(()),
        Body::Length(n) => copy_exact(r, n, w),
        Body::UntilClose => io::copy(r, w).map(drop),
        Body::Chunked => copy_chunked(r, w),
    }
}

fn copy_exact(r: &mut impl BufRead, n: u64, w: &mut dyn Write) -> io::Result<()> {
    let copied = io::copy(&mut r.by_ref().take(n), w)?;
    if copied < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "end of stream inside a body",
        ));
    }
    Ok(())
}

/// Copies a chunked body: size lines (with any extensions), chunks and their CRLFs, the last chunk and trailers.
fn copy_chunked(r: &mut impl BufRead, w: &mut dyn Write) -> io::Result<()> {
    loop {
        let line = read_line(r)?;
        w.write_all(&line)?;
        let size = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| u64::from_str_radix(l.split(';').next().unwrap_or_default().trim(), 16).ok())
            .ok_or_else(|| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailer fields, then the empty line that ends the body.
            loop {
                let line = read_line(r)?;
                w.write_all(&line)?;
                if line == b"\r\n" || line == b"\n" {
                    return Ok(());
                }
            }
        }
        copy_exact(r, size, w)?;
        let crlf = read_line(r)?;
        if crlf != b"\r\n" && crlf != b"\n" {
            return Err(invalid("chunk not followed by CRLF"));
        }
        w.write_all(&crlf)?;
    }
}

/// One line, terminator included; an error at end of stream or past [`MAX_HEAD_BYTES`].
fn read_line(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    r.by_ref().take(MAX_HEAD_BYTES as u64).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(invalid("unterminated line"));
    }
    Ok(line)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A uniform draw in [0, 1) from `x` (SplitMix64's output function).
fn unit_draw(x: u64) -> f64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

fn stopping() -> io::Error {
    io::Error::other("the proxy is stopping")
}

/// Locks a mutex even if a panicking test thread poisoned it: the proxy's state stays meaningful.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

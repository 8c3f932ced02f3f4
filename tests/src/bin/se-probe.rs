//! A tiny TCP probe for the network-namespace labs.
//!
//! `serve` answers every connection with the peer's address, so a client learns which source
//! address its traffic left the cluster with; `ask` and `loop` are the clients (`loop` prints
//! each answer after the milliseconds since it started). `echo` and `rr` measure
//! request/response latency over one persistent connection (`cargo xtask bench`); `stream`
//! keeps one connection to an echo server busy and says whether it survived and its longest
//! silence. `arp` broadcasts an ARP request every interval until killed, so that a capture can
//! count who answers.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage:
  se-probe serve --listen ADDR:PORT [--log FILE]
  se-probe ask ADDR:PORT [--timeout-ms N]
  se-probe loop ADDR:PORT --interval-ms N --count N [--timeout-ms N]
  se-probe stream ADDR:PORT --interval-ms N --seconds N [--timeout-ms N] [--source-port N]
  se-probe echo --listen ADDR:PORT
  se-probe rr ADDR:PORT --count N [--size BYTES] [--warmup N] [--timeout-ms N]
  se-probe arp INTERFACE SENDER_IP TARGET_IP --interval-ms N";

/// `rr` refuses messages larger than this: the point is small transactions, and the echo server
/// reads into a buffer of this size.
const MAX_RR_SIZE: u64 = 65_536;

const DEFAULT_TIMEOUT_MS: u64 = 2000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("se-probe: {msg}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(msg)) => {
            eprintln!("se-probe: {msg}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Usage(String),
    Runtime(String),
}

fn run(args: &[String]) -> Result<ExitCode, Failure> {
    let Some((command, rest)) = args.split_first() else {
        return Err(Failure::Usage("missing command".into()));
    };
    let parsed = Args::parse(rest)?;
    match command.as_str() {
        "serve" => {
            parsed.only(&["listen", "log"], 0)?;
            let listen = parse_addr(parsed.required("listen")?)?;
            serve(listen, parsed.flags.get("log").map(String::as_str))?;
            Ok(ExitCode::SUCCESS)
        }
        "arp" => {
            parsed.only(&["interval-ms"], 3)?;
            let [interface, sender, target] = &parsed.positional[..] else {
                return Err(Failure::Usage(
                    "arp needs INTERFACE SENDER_IP TARGET_IP".into(),
                ));
            };
            let ip = |s: &str| {
                s.parse::<std::net::Ipv4Addr>()
                    .map_err(|e| Failure::Usage(format!("{s}: {e}")))
            };
            let interval = parsed.millis("interval-ms", 50)?;
            arp_requests(interface, ip(sender)?, ip(target)?, interval)
                .map_err(Failure::Runtime)?;
            Ok(ExitCode::SUCCESS)
        }
        "ask" => {
            parsed.only(&["timeout-ms"], 1)?;
            let addr = parse_addr(&parsed.positional[0])?;
            let timeout = parsed.millis("timeout-ms", DEFAULT_TIMEOUT_MS)?;
            let answer = ask(addr, timeout).map_err(Failure::Runtime)?;
            println!("{answer}");
            Ok(ExitCode::SUCCESS)
        }
        "loop" => {
            parsed.only(&["interval-ms", "count", "timeout-ms"], 1)?;
            let addr = parse_addr(&parsed.positional[0])?;
            let interval = parsed.millis("interval-ms", 100)?;
            let count = parsed.number("count", None)?;
            let timeout = parsed.millis("timeout-ms", DEFAULT_TIMEOUT_MS)?;
            let mut all_ok = true;
            let started = Instant::now();
            for i in 0..count {
                if i > 0 {
                    // Pacing between connections is the point of this command, not a wait for
                    // some condition.
                    std::thread::sleep(interval);
                }
                let at = started.elapsed().as_millis();
                match ask(addr, timeout) {
                    Ok(answer) => println!("{at} {answer}"),
                    Err(e) => {
                        all_ok = false;
                        println!("{at} error: {e}");
                    }
                }
            }
            Ok(if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        "stream" => {
            parsed.only(&["interval-ms", "seconds", "timeout-ms", "source-port"], 1)?;
            let addr = parse_addr(&parsed.positional[0])?;
            let interval = parsed.millis("interval-ms", 10)?;
            let seconds = parsed.number("seconds", None)?;
            let timeout = parsed.millis("timeout-ms", 10_000)?;
            let source_port = u16::try_from(parsed.number("source-port", Some(0))?)
                .map_err(|_| Failure::Usage("--source-port must be 0..=65535".into()))?;
            let outcome = stream(
                addr,
                source_port,
                interval,
                Duration::from_secs(seconds),
                timeout,
            );
            println!("{outcome}");
            Ok(if outcome.starts_with("survived") {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        "echo" => {
            parsed.only(&["listen"], 0)?;
            let listen = parse_addr(parsed.required("listen")?)?;
            echo_serve(listen)?;
            Ok(ExitCode::SUCCESS)
        }
        "rr" => {
            parsed.only(&["count", "size", "warmup", "timeout-ms"], 1)?;
            let addr = parse_addr(&parsed.positional[0])?;
            let count = parsed.number("count", None)?;
            let size = parsed.number("size", Some(64))?;
            if size == 0 || size > MAX_RR_SIZE {
                return Err(Failure::Usage(format!(
                    "--size must be 1..={MAX_RR_SIZE} bytes"
                )));
            }
            let warmup = parsed.number("warmup", Some(100))?;
            let timeout = parsed.millis("timeout-ms", DEFAULT_TIMEOUT_MS)?;
            let mut rtts =
                round_trips(addr, count, size, warmup, timeout).map_err(Failure::Runtime)?;
            println!("{}", summarize(&mut rtts));
            Ok(ExitCode::SUCCESS)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(Failure::Usage(format!("unknown command {other:?}"))),
    }
}

struct Args {
    positional: Vec<String>,
    flags: HashMap<String, String>,
}

impl Args {
    fn parse(args: &[String]) -> Result<Self, Failure> {
        let mut positional = Vec::new();
        let mut flags = HashMap::new();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            if let Some(name) = arg.strip_prefix("--") {
                let (name, value) = match name.split_once('=') {
                    Some((n, v)) => (n.to_owned(), v.to_owned()),
                    None => {
                        let value = it
                            .next()
                            .ok_or_else(|| Failure::Usage(format!("--{name} needs a value")))?;
                        (name.to_owned(), value.clone())
                    }
                };
                flags.insert(name, value);
            } else {
                positional.push(arg.clone());
            }
        }
        Ok(Self { positional, flags })
    }

    fn only(&self, allowed: &[&str], positional: usize) -> Result<(), Failure> {
        if let Some(unknown) = self.flags.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(Failure::Usage(format!("unknown option --{unknown}")));
        }
        if self.positional.len() != positional {
            return Err(Failure::Usage(format!(
                "expected {positional} address argument(s), got {}",
                self.positional.len()
            )));
        }
        Ok(())
    }

    fn required(&self, name: &str) -> Result<&str, Failure> {
        self.flags
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| Failure::Usage(format!("--{name} is required")))
    }

    fn number(&self, name: &str, default: Option<u64>) -> Result<u64, Failure> {
        match (self.flags.get(name), default) {
            (Some(v), _) => v
                .parse()
                .map_err(|_| Failure::Usage(format!("--{name}: {v:?} is not a number"))),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(Failure::Usage(format!("--{name} is required"))),
        }
    }

    fn millis(&self, name: &str, default: u64) -> Result<Duration, Failure> {
        self.number(name, Some(default)).map(Duration::from_millis)
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, Failure> {
    s.parse()
        .map_err(|_| Failure::Usage(format!("{s:?} is not an ADDR:PORT socket address")))
}

fn serve(listen: SocketAddr, log: Option<&str>) -> Result<(), Failure> {
    let listener = TcpListener::bind(listen)
        .map_err(|e| Failure::Runtime(format!("cannot listen on {listen}: {e}")))?;
    let mut log = log
        .map(|path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Failure::Runtime(format!("cannot open log {path}: {e}")))
        })
        .transpose()?;
    println!("ready");
    io::stdout()
        .flush()
        .map_err(|e| Failure::Runtime(format!("cannot write to stdout: {e}")))?;
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => answer(stream, log.as_mut()),
            Err(e) => eprintln!("se-probe: accept failed: {e}"),
        }
    }
    Ok(())
}

fn answer(mut stream: TcpStream, log: Option<&mut File>) {
    let peer = match stream.peer_addr() {
        Ok(peer) => peer.ip(),
        Err(e) => {
            eprintln!("se-probe: peer went away before it could be answered: {e}");
            return;
        }
    };
    let line = format!("{peer}\n");
    // Logged before answering so that once a client has its answer, the log already holds it.
    // One write per line keeps concurrent readers from ever seeing half a line.
    if let Some(log) = log
        && let Err(e) = log.write_all(line.as_bytes())
    {
        eprintln!("se-probe: cannot append to log: {e}");
    }
    if let Err(e) = stream.write_all(line.as_bytes()) {
        eprintln!("se-probe: cannot answer {peer}: {e}");
    }
}

fn ask(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| match e.kind() {
        ErrorKind::TimedOut | ErrorKind::WouldBlock => {
            format!(
                "cannot connect to {addr}: no answer within {} ms",
                timeout.as_millis()
            )
        }
        _ => format!("cannot connect to {addr}: {e}"),
    })?;
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(1));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| format!("cannot set a read timeout: {e}"))?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .map_err(|e| match e.kind() {
            ErrorKind::TimedOut | ErrorKind::WouldBlock => {
                format!(
                    "connected to {addr} but got no reply within {} ms",
                    timeout.as_millis()
                )
            }
            _ => format!("connected to {addr} but reading the reply failed: {e}"),
        })?;
    let reply = reply.trim();
    if reply.is_empty() {
        return Err(format!("{addr} closed the connection without a reply"));
    }
    Ok(reply.to_owned())
}

/// One connection kept busy for `duration`: a numbered message every `interval`, each echoed
/// back. Says `survived <echoes> <longest silence ms>` or `broken <echoes> <longest silence
/// ms> <why>`; the silence is the longest time between two echoes (or from the start). From
/// `source_port` when it is not 0 (two pods' connections from one port: SNAT remaps one).
fn stream(
    addr: SocketAddr,
    source_port: u16,
    interval: Duration,
    duration: Duration,
    timeout: Duration,
) -> String {
    let mut echoes = 0_u64;
    let mut longest = Duration::ZERO;
    let broken = |echoes: u64, longest: Duration, why: String| {
        format!("broken {echoes} {} {why}", longest.as_millis())
    };
    let mut conn = match connect_from(addr, source_port, timeout) {
        Ok(conn) => conn,
        Err(e) => return broken(0, longest, format!("cannot connect: {e}")),
    };
    if let Err(e) = conn
        .set_read_timeout(Some(timeout))
        .and_then(|()| conn.set_nodelay(true))
    {
        return broken(0, longest, format!("cannot set up the connection: {e}"));
    }
    let started = Instant::now();
    let mut last = started;
    while started.elapsed() < duration {
        let message = echoes.to_be_bytes();
        let mut back = [0_u8; 8];
        if let Err(e) = conn
            .write_all(&message)
            .and_then(|()| conn.read_exact(&mut back))
        {
            longest = longest.max(last.elapsed());
            return broken(echoes, longest, e.to_string());
        }
        if back != message {
            return broken(echoes, longest, "the echo does not match".into());
        }
        echoes += 1;
        longest = longest.max(last.elapsed());
        last = Instant::now();
        // Pacing is the point of this command.
        std::thread::sleep(interval);
    }
    format!("survived {echoes} {}", longest.as_millis())
}

/// A connection to `addr` from `source_port` (any when 0).
fn connect_from(addr: SocketAddr, source_port: u16, timeout: Duration) -> io::Result<TcpStream> {
    if source_port == 0 {
        return TcpStream::connect_timeout(&addr, timeout);
    }
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    let any: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, source_port).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, source_port).into(),
    };
    socket.bind(&any.into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

fn echo_serve(listen: SocketAddr) -> Result<(), Failure> {
    let listener = TcpListener::bind(listen)
        .map_err(|e| Failure::Runtime(format!("cannot listen on {listen}: {e}")))?;
    println!("ready");
    io::stdout()
        .flush()
        .map_err(|e| Failure::Runtime(format!("cannot write to stdout: {e}")))?;
    for conn in listener.incoming() {
        match conn {
            // A thread per connection: clients are few (one per measurement) and each blocks.
            Ok(stream) => {
                std::thread::spawn(move || echo(stream));
            }
            Err(e) => eprintln!("se-probe: accept failed: {e}"),
        }
    }
    Ok(())
}

/// Sends back whatever arrives until the peer closes.
fn echo(mut stream: TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        eprintln!("se-probe: cannot disable Nagle: {e}");
    }
    let mut buf = vec![0_u8; usize::try_from(MAX_RR_SIZE).unwrap_or(65_536)];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if let Err(e) = stream.write_all(&buf[..n]) {
                    eprintln!("se-probe: echo write failed: {e}");
                    return;
                }
            }
            Err(e) => {
                eprintln!("se-probe: echo read failed: {e}");
                return;
            }
        }
    }
}

/// `warmup` unmeasured then `count` measured round trips of `size` bytes on one connection;
/// returns each measured round trip's duration.
fn round_trips(
    addr: SocketAddr,
    count: u64,
    size: u64,
    warmup: u64,
    timeout: Duration,
) -> Result<Vec<Duration>, String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream
        .set_nodelay(true)
        .and_then(|()| stream.set_read_timeout(Some(timeout)))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("cannot set socket options: {e}"))?;
    let size = usize::try_from(size).map_err(|e| e.to_string())?;
    let request = vec![0x5a_u8; size];
    let mut reply = vec![0_u8; size];
    let mut rtts = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for i in 0..warmup.saturating_add(count) {
        let started = Instant::now();
        stream
            .write_all(&request)
            .and_then(|()| stream.read_exact(&mut reply))
            .map_err(|e| format!("round trip {i} to {addr} failed: {e}"))?;
        if i >= warmup {
            rtts.push(started.elapsed());
        }
    }
    Ok(rtts)
}

/// `n=.. p50_us=.. p99_us=.. mean_us=..`, the line `cargo xtask bench` parses.
fn summarize(rtts: &mut [Duration]) -> String {
    rtts.sort_unstable();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    let at = |q: f64| {
        let last = rtts.len().saturating_sub(1);
        // Nearest rank: truncation to an index is the intent.
        let index = ((last as f64) * q).round() as usize;
        rtts.get(index).copied().map_or(0.0, micros)
    };
    let total: f64 = rtts.iter().copied().map(micros).sum();
    let mean = if rtts.is_empty() {
        0.0
    } else {
        total / rtts.len() as f64
    };
    format!(
        "n={} p50_us={:.1} p99_us={:.1} mean_us={:.1}",
        rtts.len(),
        at(0.50),
        at(0.99),
        mean
    )
}

/// Broadcasts "who has `target`, tell `sender`" on `interface` every `interval`, forever.
fn arp_requests(
    interface: &str,
    sender: std::net::Ipv4Addr,
    target: std::net::Ipv4Addr,
    interval: Duration,
) -> Result<(), String> {
    const ETH_P_ARP: u16 = 0x0806;
    let mac_text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))
        .map_err(|e| format!("reading {interface}'s address: {e}"))?;
    let mac: Vec<u8> = mac_text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{interface}'s address {mac_text:?}: {e}"))?;
    let name = std::ffi::CString::new(interface).map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(format!("no interface {interface}"));
    }
    // SAFETY: plain syscall; the descriptor is closed when the process ends.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        return Err(format!("packet socket: {}", io::Error::last_os_error()));
    }
    // Ethernet, IPv4, 6- and 4-byte addresses, a request.
    let mut request = vec![0, 1, 8, 0, 6, 4, 0, 1];
    request.extend_from_slice(&mac);
    request.extend_from_slice(&sender.octets());
    request.extend_from_slice(&[0; 6]);
    request.extend_from_slice(&target.octets());
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = i32::try_from(ifindex).map_err(|e| e.to_string())?;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    loop {
        // SAFETY: the buffer and address outlive the call and their lengths are given.
        let sent = unsafe {
            libc::sendto(
                fd,
                request.as_ptr().cast(),
                request.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(u32::MAX),
            )
        };
        if sent < 0 {
            return Err(format!(
                "sending an ARP request: {}",
                io::Error::last_os_error()
            ));
        }
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn flags_take_a_value_with_or_without_equals() {
        let Ok(parsed) = Args::parse(&args(&["1.2.3.4:5", "--count", "3", "--interval-ms=10"]))
        else {
            panic!("parses");
        };
        assert_eq!(parsed.positional, ["1.2.3.4:5"]);
        assert!(matches!(parsed.number("count", None), Ok(3)));
        assert!(
            matches!(parsed.millis("interval-ms", 100), Ok(d) if d == Duration::from_millis(10))
        );
        assert!(matches!(parsed.millis("timeout-ms", 7), Ok(d) if d == Duration::from_millis(7)));
        assert!(parsed.only(&["count", "interval-ms"], 1).is_ok());
        assert!(parsed.only(&["count"], 1).is_err());
        assert!(parsed.only(&["count", "interval-ms"], 0).is_err());
    }

    #[test]
    fn usage_errors_are_reported_as_such() {
        for bad in [
            &["ask"][..],
            &["ask", "not-an-address"],
            &["ask", "1.2.3.4:5", "--timeout-ms"],
            &["loop", "1.2.3.4:5"],
            &["serve"],
            &["fly"],
        ] {
            assert!(matches!(run(&args(bad)), Err(Failure::Usage(_))), "{bad:?}");
        }
    }

    #[test]
    fn answers_with_the_peer_address_and_logs_it_first() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binds on loopback");
        let addr = listener.local_addr().expect("has an address");
        let log_path =
            std::env::temp_dir().join(format!("se-probe-test-{}.log", std::process::id()));
        let mut log = File::create(&log_path).expect("creates log");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accepts");
            answer(stream, Some(&mut log));
        });
        let reply = ask(addr, Duration::from_secs(5)).expect("answered");
        server.join().expect("server thread");
        assert_eq!(reply, "127.0.0.1");
        let logged = std::fs::read_to_string(&log_path).expect("reads log");
        std::fs::remove_file(&log_path).expect("removes log");
        assert_eq!(logged, "127.0.0.1\n");
    }

    #[test]
    fn round_trips_come_back_and_are_summarized() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binds on loopback");
        let addr = listener.local_addr().expect("has an address");
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accepts");
            echo(stream);
        });
        let mut rtts = round_trips(addr, 50, 100, 5, Duration::from_secs(5)).expect("echoed");
        server.join().expect("server thread");
        assert_eq!(rtts.len(), 50);
        let line = summarize(&mut rtts);
        assert!(line.starts_with("n=50 p50_us="), "{line}");
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut rtts: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(
            summarize(&mut rtts),
            "n=100 p50_us=51.0 p99_us=99.0 mean_us=50.5"
        );
    }

    #[test]
    fn refused_connections_fail_with_a_message() {
        // Bind then drop to get a loopback port with nobody listening.
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let err = ask(addr, Duration::from_secs(2)).expect_err("nobody listens");
        assert!(err.contains("cannot connect"), "{err}");
    }
}

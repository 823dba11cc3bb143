//! The start-up exchange: rank 0 listens on `MASTER_ADDR:MASTER_PORT` until the other
//! `world - 1` ranks have joined, then answers each with the job's 128-byte payload (the NCCL
//! unique id) and stops listening. Every other rank connects (retrying until the deadline: rank
//! 0 may start later), says who it is and waits for the answer.
//!
//! A joining rank sends one fixed frame: magic `MLVPTRDV`, protocol version (u32), world size
//! (u32), rank (u32), job token (u64; [`job_token`], from the run's settings, so a rank of
//! another job is refused), all little-endian. Rank 0 answers magic, version, a status (u32,
//! [`Status`]) and the payload. A connection that sends anything else (garbage, another magic or
//! version, a rank out of range or already joined, another job's token or world size), or
//! nothing within [`HELLO_TIMEOUT`], is refused and logged on stderr; it does not end the job.
//! The connections that joined stay open afterwards as the job's control links
//! ([`super::control`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub const MAGIC: [u8; 8] = *b"MLVPTRDV";
pub const VERSION: u32 = 1;
/// Bytes of the payload rank 0 hands out (an `ncclUniqueId`).
pub const PAYLOAD: usize = 128;
const HELLO_LEN: usize = 8 + 4 + 4 + 4 + 8;
const REPLY_LEN: usize = 8 + 4 + 4 + PAYLOAD;
/// How long rank 0 waits for a new connection's frame before refusing it.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// Rank 0's answer to a well-formed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    /// The frame's token differs: another job (other settings) is using this address.
    OtherJob = 1,
    /// The frame's world size differs from rank 0's.
    OtherWorld = 2,
    /// Another connection already joined as this rank.
    Duplicate = 3,
    /// Rank 0 or a rank not below the world size.
    BadRank = 4,
}

impl Status {
    fn from_u32(v: u32) -> Option<Self> {
        [Status::Ok, Status::OtherJob, Status::OtherWorld, Status::Duplicate, Status::BadRank]
            .into_iter()
            .find(|s| *s as u32 == v)
    }
    fn why(self) -> &'static str {
        match self {
            Status::Ok => "accepted",
            Status::OtherJob => "its job token differs (another job, or other settings, on this address)",
            Status::OtherWorld => "its world size differs from rank 0's",
            Status::Duplicate => "another process already joined with this rank",
            Status::BadRank => "its rank is out of range",
        }
    }
}

/// A job token from anything both sides compute alike (the run's settings as text).
pub fn job_token(text: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

/// A joining rank's frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub world: u32,
    pub rank: u32,
    pub token: u64,
}

impl Hello {
    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.world.to_le_bytes());
        b[16..20].copy_from_slice(&self.rank.to_le_bytes());
        b[20..28].copy_from_slice(&self.token.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HELLO_LEN]) -> Result<Self, String> {
        if b[..8] != MAGIC {
            return Err("not an mlvpt rendezvous frame (wrong magic)".into());
        }
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if u(8) != VERSION {
            return Err(format!("protocol version {} (this mlvpt speaks {VERSION})", u(8)));
        }
        Ok(Hello {
            world: u(12),
            rank: u(16),
            token: u64::from_le_bytes(b[20..28].try_into().expect("8 bytes")),
        })
    }
}

fn reply(s: &mut TcpStream, status: Status, payload: &[u8; PAYLOAD]) -> std::io::Result<()> {
    let mut b = [0u8; REPLY_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(status as u32).to_le_bytes());
    b[16..].copy_from_slice(payload);
    s.write_all(&b)
}

/// Binds rank 0's listening socket.
pub fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .with_context(|| format!("rank 0 cannot listen on {addr} (MASTER_ADDR:MASTER_PORT must name this host and a free port)"))
}

/// Rank 0: accepts ranks `1..world` on `listener` until all joined or `deadline`, then answers
/// each with `payload` and closes the listener. Returns the joined connections by rank
/// (index 0 is empty). `log` receives a line per refused connection.
pub fn host(
    listener: TcpListener,
    world: usize,
    token: u64,
    payload: &[u8; PAYLOAD],
    deadline: Instant,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<Vec<Option<TcpStream>>> {
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    listener
        .set_nonblocking(true)
        .context("rendezvous: setting the listener non-blocking")?;
    let mut joined: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
    let mut missing = world - 1;
    while missing > 0 {
        let (mut s, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let absent: Vec<String> = (1..world).filter(|&r| joined[r].is_none()).map(|r| r.to_string()).collect();
                    bail!(
                        "rendezvous: rank 0 on {addr} stopped waiting (--dist-timeout) and rank(s) {} never joined \
                         (check that every rank started with the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE={world})",
                        absent.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                log(&format!("rendezvous: accept failed: {e}"));
                continue;
            }
        };
        match read_hello(&mut s) {
            Err(why) => log(&format!("rendezvous: refused a connection from {peer}: {why}")),
            Ok(h) => {
                let status = if h.token != token {
                    Status::OtherJob
                } else if h.world as usize != world {
                    Status::OtherWorld
                } else if h.rank == 0 || h.rank as usize >= world {
                    Status::BadRank
                } else if joined[h.rank as usize].is_some() {
                    Status::Duplicate
                } else {
                    Status::Ok
                };
                if status == Status::Ok {
                    joined[h.rank as usize] = Some(s);
                    missing -= 1;
                } else {
                    log(&format!(
                        "rendezvous: refused rank {} (world {}) from {peer}: {}",
                        h.rank,
                        h.world,
                        status.why()
                    ));
                    let _ = reply(&mut s, status, &[0; PAYLOAD]);
                }
            }
        }
    }
    drop(listener);
    for (r, s) in joined.iter_mut().enumerate() {
        if let Some(s) = s {
            reply(s, Status::Ok, payload).with_context(|| format!("rendezvous: answering rank {r}"))?;
        }
    }
    Ok(joined)
}

fn read_hello(s: &mut TcpStream) -> Result<Hello, String> {
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(HELLO_TIMEOUT)).map_err(|e| e.to_string())?;
    let mut b = [0u8; HELLO_LEN];
    s.read_exact(&mut b).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!("no frame within {} s", HELLO_TIMEOUT.as_secs()),
        std::io::ErrorKind::UnexpectedEof => "closed before a whole frame".into(),
        _ => e.to_string(),
    })?;
    s.set_read_timeout(None).map_err(|e| e.to_string())?;
    Hello::decode(&b)
}

/// Rank `rank > 0`: connects to rank 0 at `addr` (retrying until `deadline`), joins and
/// returns the payload and the connection.
pub fn join(addr: &str, rank: usize, world: usize, token: u64, deadline: Instant) -> anyhow::Result<([u8; PAYLOAD], TcpStream)> {
    let mut last = String::from("no attempt");
    let mut s = loop {
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "rendezvous: rank {rank} cannot reach rank 0 at {addr} (MASTER_ADDR:MASTER_PORT) before the deadline \
                 (--dist-timeout): {last}"
            );
        }
        match resolve(addr) {
            Ok(sa) => match TcpStream::connect_timeout(&sa, (deadline - now).min(Duration::from_secs(2))) {
                Ok(s) => break s,
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let hello = Hello {
        world: world as u32,
        rank: rank as u32,
        token,
    };
    s.set_nodelay(true).ok();
    s.write_all(&hello.encode())
        .with_context(|| format!("rendezvous: rank {rank} sending its frame to {addr}"))?;
    let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    s.set_read_timeout(Some(wait)).ok();
    let mut b = [0u8; REPLY_LEN];
    s.read_exact(&mut b).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                "rank 0 did not answer before the deadline (--dist-timeout): not every rank joined".to_string()
            }
            std::io::ErrorKind::UnexpectedEof => "rank 0 closed the connection".to_string(),
            _ => e.to_string(),
        };
        anyhow::anyhow!("rendezvous: rank {rank} joining {addr}: {why}")
    })?;
    s.set_read_timeout(None).ok();
    if b[..8] != MAGIC || b[8..12] != VERSION.to_le_bytes() {
        bail!("rendezvous: rank {rank}: {addr} answered with something other than an mlvpt rank 0 of this version");
    }
    let status = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
    match Status::from_u32(status) {
        Some(Status::Ok) => {}
        Some(s) => bail!("rendezvous: rank 0 at {addr} refused rank {rank}: {}", s.why()),
        None => bail!("rendezvous: rank 0 at {addr} refused rank {rank} (status {status})"),
    }
    let mut payload = [0u8; PAYLOAD];
    payload.copy_from_slice(&b[16..]);
    Ok((payload, s))
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap().to_string();
        (l, a)
    }

    fn soon(s: u64) -> Instant {
        Instant::now() + Duration::from_secs(s)
    }

    /// Rank 0 in a thread: the joined ranks and its log.
    #[allow(clippy::type_complexity)]
    fn host_thread(
        l: TcpListener,
        world: usize,
        deadline: Instant,
    ) -> (std::thread::JoinHandle<anyhow::Result<Vec<bool>>>, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let lg = log.clone();
        let h = std::thread::spawn(move || {
            let mut payload = [0u8; PAYLOAD];
            payload[0] = 42;
            payload[127] = 7;
            let j = host(l, world, 99, &payload, deadline, &mut |m| lg.lock().unwrap().push(m.to_string()))?;
            Ok(j.iter().map(|s| s.is_some()).collect())
        });
        (h, log)
    }

    #[test]
    fn ranks_join_and_get_the_payload_with_strays_refused() {
        let (l, addr) = listener();
        let (h, log) = host_thread(l, 3, soon(20));
        // Strays first: garbage, a wrong magic, another job, a bad rank, a silent connection.
        let mut g = TcpStream::connect(&addr).unwrap();
        g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut wrong = Hello {
            world: 3,
            rank: 1,
            token: 99,
        }
        .encode();
        wrong[0] = b'X';
        TcpStream::connect(&addr).unwrap().write_all(&wrong).unwrap();
        let other_job = join(&addr, 1, 3, 98, soon(10)).unwrap_err().to_string();
        assert!(other_job.contains("job token differs"), "{other_job}");
        let bad_world = join(&addr, 1, 4, 99, soon(10)).unwrap_err().to_string();
        assert!(bad_world.contains("world size differs"), "{bad_world}");
        let bad_rank = join(&addr, 5, 3, 99, soon(10)).unwrap_err().to_string();
        assert!(bad_rank.contains("out of range"), "{bad_rank}");
        let _silent = TcpStream::connect(&addr).unwrap();
        // Then the real ranks, and a duplicate of rank 1 once it joined.
        let a2 = addr.clone();
        let r1 = std::thread::spawn(move || join(&a2, 1, 3, 99, soon(20)));
        std::thread::sleep(Duration::from_millis(2500));
        let a3 = addr.clone();
        let dup = std::thread::spawn(move || join(&a3, 1, 3, 99, soon(20)));
        let dup = dup.join().unwrap().unwrap_err().to_string();
        assert!(dup.contains("already joined"), "{dup}");
        let (p2, _s2) = join(&addr, 2, 3, 99, soon(20)).unwrap();
        let (p1, _s1) = r1.join().unwrap().unwrap();
        assert_eq!((p1[0], p1[127], p2[0], p2[127]), (42, 7, 42, 7));
        assert_eq!(h.join().unwrap().unwrap(), vec![false, true, true]);
        let log = log.lock().unwrap().join("\n");
        for want in [
            "wrong magic",
            "job token",
            "world size",
            "out of range",
            "no frame within",
            "already joined",
        ] {
            assert!(log.contains(want), "{want} not in log:\n{log}");
        }
        // Rank 0 no longer listens.
        assert!(TcpStream::connect(&addr).is_err());
    }

    #[test]
    fn rank_0_gives_up_at_its_deadline_naming_the_absent() {
        let (l, addr) = listener();
        let (h, _) = host_thread(l, 3, Instant::now() + Duration::from_millis(600));
        // Rank 2 joins, then rank 0 gives up and closes its connection unanswered.
        let e2 = join(&addr, 2, 3, 99, soon(5)).unwrap_err().to_string();
        assert!(e2.contains("closed the connection"), "{e2}");
        let e = h.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank(s) 1 never joined"), "{e}");
    }

    #[test]
    fn an_unreachable_master_is_an_error_at_the_deadline() {
        let (l, addr) = listener();
        drop(l);
        let t = Instant::now();
        let e = join(&addr, 1, 2, 1, Instant::now() + Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot reach rank 0"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn frames_round_trip_and_tokens_differ() {
        let h = Hello {
            world: 4,
            rank: 3,
            token: job_token("a"),
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        assert_ne!(job_token("a"), job_token("b"));
        let mut v = h.encode();
        v[8] = 9;
        assert!(Hello::decode(&v).unwrap_err().contains("version 9"));
    }
}

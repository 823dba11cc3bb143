//! The job's control links: the connections of the start-up exchange, kept open for the whole
//! run (rank 0 holds one to every other rank, each other rank one to rank 0). They carry small
//! host-side collectives (evaluation scores, checks, and on the CPU backend the gradients) and
//! watch the peers: a thread per link reads it, so a peer that dies (its socket closes) or
//! fails (it sends an abort frame) is noticed at once, whatever the main thread is doing.
//! Rank 0 passes such a failure on to every other rank. With `exit_after` set, a process whose
//! main thread has not stopped by itself that long after a failure (stuck in a collective that
//! will never complete) prints the error and exits with status 1: a job never hangs on a dead
//! peer.
//!
//! Frames: kind (u8: `D` data, `F` finished, `A` abort with a UTF-8 message), length (u32
//! little-endian), payload.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const DATA: u8 = b'D';
const FINISHED: u8 = b'F';
const ABORT: u8 = b'A';
/// The largest frame accepted (a corrupt length must not allocate without bound).
const MAX_FRAME: usize = 1 << 31;

struct Shared {
    rank: usize,
    failure: Mutex<Option<String>>,
    /// Every link's writing half, by peer rank.
    writers: Vec<(usize, Arc<Mutex<TcpStream>>)>,
    exit_after: Option<Duration>,
}

impl Shared {
    /// Records the first failure; rank 0 passes it on; arms the exit timer.
    fn fail(&self, msg: String, from: Option<usize>) {
        {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_some() {
                return;
            }
            *f = Some(msg.clone());
        }
        if self.rank == 0 {
            for (peer, w) in &self.writers {
                if Some(*peer) != from {
                    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = write_frame(&mut w, ABORT, msg.as_bytes());
                }
            }
        }
        if let Some(grace) = self.exit_after {
            let rank = self.rank;
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                eprintln!(
                    "error: {msg} (rank {rank} ends its process: it did not stop by itself within {} s)",
                    grace.as_secs()
                );
                std::process::exit(1);
            });
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn write_frame(w: &mut TcpStream, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

struct Peer {
    rank: usize,
    writer: Arc<Mutex<TcpStream>>,
    /// In a mutex so that the links can be shared between threads (`Control` is `Sync`).
    rx: Mutex<Receiver<Vec<u8>>>,
}

/// One rank's end of the control links.
pub struct Control {
    rank: usize,
    world: usize,
    /// Rank 0: ranks 1..world in order; another rank: rank 0.
    peers: Vec<Peer>,
    shared: Arc<Shared>,
    timeout: Duration,
    finished: AtomicBool,
}

impl Control {
    /// The links of rank `rank` over `streams` (rank 0: one per rank, index 0 empty, as
    /// [`super::rendezvous::host`] returns them; another rank: its connection to rank 0 alone).
    /// `timeout`: the longest a collective waits for a peer; `exit_after`: see the module docs
    /// (`None` in tests that run ranks as threads).
    pub fn new(
        rank: usize,
        world: usize,
        streams: Vec<(usize, TcpStream)>,
        timeout: Duration,
        exit_after: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for (peer, s) in streams {
            s.set_nodelay(true).ok();
            s.set_read_timeout(None).ok();
            let r = s.try_clone().context("control link: cloning a socket")?;
            writers.push((peer, Arc::new(Mutex::new(s))));
            readers.push((peer, r));
        }
        let shared = Arc::new(Shared {
            rank,
            failure: Mutex::new(None),
            writers: writers.clone(),
            exit_after,
        });
        let mut peers = Vec::new();
        for ((peer, r), (_, w)) in readers.into_iter().zip(writers) {
            let (tx, rx) = mpsc::channel();
            let sh = shared.clone();
            std::thread::Builder::new()
                .name(format!("mlvpt-link-{peer}"))
                .spawn(move || read_link(peer, r, tx, sh))
                .context("control link: starting its reader")?;
            peers.push(Peer {
                rank: peer,
                writer: w,
                rx: Mutex::new(rx),
            });
        }
        Ok(Self {
            rank,
            world,
            peers,
            shared,
            timeout,
            finished: AtomicBool::new(false),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }

    /// The failure a peer reported or caused, if any.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure()
    }

    /// An error if a peer failed.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.failure() {
            Some(f) => bail!("{f}"),
            None => Ok(()),
        }
    }

    fn send(&self, peer: &Peer, payload: &[u8]) -> anyhow::Result<()> {
        self.check()?;
        let mut w = peer.writer.lock().unwrap_or_else(|p| p.into_inner());
        write_frame(&mut w, DATA, payload).map_err(|e| {
            let msg = format!("rank {} ended or its connection broke ({e})", peer.rank);
            self.shared.fail(msg.clone(), Some(peer.rank));
            anyhow::anyhow!(msg)
        })
    }

    fn recv(&self, peer: &Peer) -> anyhow::Result<Vec<u8>> {
        let start = Instant::now();
        let rx = peer.rx.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(v) => return Ok(v),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!(
                        "{}",
                        self.failure().unwrap_or_else(|| format!("rank {} closed its link", peer.rank))
                    )
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.check()?;
                    if start.elapsed() >= self.timeout {
                        let msg = format!(
                            "rank {} sent nothing for {} s during a collective (--dist-timeout): it hangs or is far behind",
                            peer.rank,
                            self.timeout.as_secs()
                        );
                        self.shared.fail(msg.clone(), None);
                        bail!("{msg}");
                    }
                }
            }
        }
    }

    /// Every rank's `mine`, in rank order (through rank 0).
    pub fn all_gather(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        if self.rank == 0 {
            let mut all = vec![mine.to_vec()];
            for p in &self.peers {
                all.push(self.recv(p)?);
            }
            let packed = pack(&all);
            for p in &self.peers {
                self.send(p, &packed)?;
            }
            Ok(all)
        } else {
            let p = &self.peers[0];
            self.send(p, mine)?;
            unpack(&self.recv(p)?, self.world)
        }
    }

    /// `sum_r weight_r * values_r / sum_r weight_r` over the ranks (each rank's `weight` and
    /// `values`, of one length; 0 where every weight is 0), summed on rank 0 in f64 in rank
    /// order, so every rank gets the same bits; and `sum_r weight_r`.
    pub fn weighted_mean(&self, values: &[f32], weight: f64) -> anyhow::Result<(Vec<f32>, f64)> {
        let mut mine = Vec::with_capacity(8 + 4 * values.len());
        mine.extend_from_slice(&weight.to_le_bytes());
        mine.extend_from_slice(bytemuck::cast_slice(values));
        let decode = |b: &[u8]| -> (f64, Vec<f32>) {
            let w = f64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
            (
                w,
                b[8..]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                    .collect(),
            )
        };
        if self.rank == 0 {
            let (mut acc, mut total) = (vec![0f64; values.len()], 0f64);
            let mut add = |b: &[u8], r: usize| -> anyhow::Result<()> {
                if b.len() != mine.len() {
                    bail!(
                        "rank {r} sent {} values where rank 0 has {}",
                        (b.len().max(8) - 8) / 4,
                        values.len()
                    );
                }
                let (w, v) = decode(b);
                total += w;
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += w * x as f64;
                }
                Ok(())
            };
            add(&mine, 0)?;
            for p in &self.peers {
                let b = self.recv(p)?;
                add(&b, p.rank)?;
            }
            let out: Vec<f32> = acc.iter().map(|&a| if total > 0.0 { (a / total) as f32 } else { 0.0 }).collect();
            let mut reply = total.to_le_bytes().to_vec();
            reply.extend_from_slice(bytemuck::cast_slice(&out));
            for p in &self.peers {
                self.send(p, &reply)?;
            }
            Ok((out, total))
        } else {
            let p = &self.peers[0];
            self.send(p, &mine)?;
            let b = self.recv(p)?;
            if b.len() != 8 + 4 * values.len() {
                bail!("rank 0 sent {} bytes for {} values", b.len(), values.len());
            }
            let (total, out) = decode(&b);
            Ok((out, total))
        }
    }

    /// Tells the peers this rank is done: their links then close quietly.
    pub fn finish(&self) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        for p in &self.peers {
            let mut w = p.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = write_frame(&mut w, FINISHED, &[]);
        }
    }

    /// Tells the peers this rank failed with `msg` (they stop with it).
    pub fn abort(&self, msg: &str) {
        if self.finished.swap(true, Ordering::SeqCst) {
            return;
        }
        let msg = format!("rank {} failed: {msg}", self.rank);
        for p in &self.peers {
            let mut w = p.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = write_frame(&mut w, ABORT, msg.as_bytes());
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.abort("it stopped before the end of the job");
    }
}

fn pack(parts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

fn unpack(mut b: &[u8], n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if b.len() < 8 {
            bail!("control link: a truncated gather from rank 0");
        }
        let len = u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as usize;
        if b.len() < 8 + len {
            bail!("control link: a truncated gather from rank 0");
        }
        out.push(b[8..8 + len].to_vec());
        b = &b[8 + len..];
    }
    Ok(out)
}

fn read_link(peer: usize, mut r: TcpStream, tx: Sender<Vec<u8>>, shared: Arc<Shared>) {
    let mut head = [0u8; 5];
    loop {
        if let Err(e) = r.read_exact(&mut head) {
            if shared.failure().is_none() {
                use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
                let why = match e.kind() {
                    UnexpectedEof => "its process ended or closed the link".to_string(),
                    ConnectionReset | ConnectionAborted | BrokenPipe => format!("its process ended or closed the link: {e}"),
                    _ => e.to_string(),
                };
                shared.fail(format!("rank {peer} is gone ({why})"), Some(peer));
            }
            return;
        }
        let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME {
            shared.fail(format!("rank {peer} sent a malformed frame"), Some(peer));
            return;
        }
        let mut payload = vec![0u8; len];
        if let Err(e) = r.read_exact(&mut payload) {
            shared.fail(format!("rank {peer} is gone mid-frame ({e})"), Some(peer));
            return;
        }
        match head[0] {
            DATA => {
                if tx.send(payload).is_err() {
                    return;
                }
            }
            FINISHED => return,
            ABORT => {
                shared.fail(String::from_utf8_lossy(&payload).into_owned(), Some(peer));
                return;
            }
            k => {
                shared.fail(format!("rank {peer} sent a frame of unknown kind {k}"), Some(peer));
                return;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::rendezvous;
    use super::*;
    use std::net::TcpListener;

    /// `world` ranks' control links over 127.0.0.1, made through the rendezvous.
    pub(crate) fn group(world: usize, timeout: Duration) -> Vec<Control> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        let joins: Vec<_> = (1..world)
            .map(|r| {
                let a = addr.clone();
                std::thread::spawn(move || rendezvous::join(&a, r, world, 5, deadline).unwrap().1)
            })
            .collect();
        let host = rendezvous::host(l, world, 5, &[0; rendezvous::PAYLOAD], deadline, &mut |m| panic!("{m}")).unwrap();
        let streams0: Vec<(usize, TcpStream)> = host.into_iter().enumerate().filter_map(|(r, s)| s.map(|s| (r, s))).collect();
        let mut out = vec![Control::new(0, world, streams0, timeout, None).unwrap()];
        for (i, j) in joins.into_iter().enumerate() {
            out.push(Control::new(i + 1, world, vec![(0, j.join().unwrap())], timeout, None).unwrap());
        }
        out
    }

    fn on_threads<T: Send + 'static>(cs: Vec<Control>, f: impl Fn(Control) -> T + Send + Sync + 'static) -> Vec<T> {
        let f = Arc::new(f);
        let hs: Vec<_> = cs
            .into_iter()
            .map(|c| {
                let f = f.clone();
                std::thread::spawn(move || f(c))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn gather_and_weighted_sum_agree_on_every_rank() {
        let out = on_threads(group(3, Duration::from_secs(10)), |c| {
            let r = c.rank();
            let g = c.all_gather(&vec![r as u8; r + 1]).unwrap();
            let s = c.weighted_mean(&[1.0, r as f32], 0.5 * (r + 1) as f64).unwrap();
            c.finish();
            (g, s)
        });
        for (g, s) in &out {
            assert_eq!(g, &vec![vec![0u8], vec![1, 1], vec![2, 2, 2]]);
            // weights 0.5, 1, 1.5 (sum 3): means 1 and (0*0.5 + 1*1 + 2*1.5) / 3 = 4/3
            assert_eq!(s, &(vec![1.0, (4.0f64 / 3.0) as f32], 3.0));
        }
    }

    #[test]
    fn a_rank_that_dies_ends_the_others_collectives() {
        let mut cs = group(3, Duration::from_secs(30));
        let dead = cs.pop().unwrap();
        // Rank 2 vanishes without a word (its sockets close, as when the process is killed).
        for p in &dead.peers {
            p.writer.lock().unwrap().shutdown(Shutdown::Both).unwrap();
        }
        std::mem::forget(dead);
        let t = Instant::now();
        let out = on_threads(cs, |c| c.weighted_mean(&[1.0], 1.0).map(|_| ()).unwrap_err().to_string());
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        for e in out {
            assert!(e.contains("rank 2 is gone"), "{e}");
        }
    }

    #[test]
    fn a_failing_rank_tells_the_others_why() {
        let mut cs = group(2, Duration::from_secs(30));
        let one = cs.pop().unwrap();
        one.abort("disk full");
        let e = cs.pop().unwrap().all_gather(&[1]).unwrap_err().to_string();
        assert!(e.contains("rank 1 failed: disk full"), "{e}");
    }

    #[test]
    fn a_silent_rank_times_out() {
        let mut cs = group(2, Duration::from_millis(500));
        let _quiet = cs.pop().unwrap();
        let e = cs.pop().unwrap().all_gather(&[1]).unwrap_err().to_string();
        assert!(e.contains("rank 1 sent nothing"), "{e}");
    }
}

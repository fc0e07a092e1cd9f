//! The TCP rendezvous of a job whose collectives do not bring their own (NCCL): rank 0 listens
//! on `MASTER_ADDR:port`, every other rank connects, rank 0 sends each the bytes the engine
//! needs (NCCL's unique id). The links then stay open as the job's liveness: a rank that dies
//! closes its link without the goodbye byte, its peer notices at once and stops — rank 0 by
//! closing every link, which stops the rest — so no rank waits forever in a collective whose
//! partner is gone. [`Watchdog`] adds a timeout on collectives that never return.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Launch;
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"sd2r";
const VERSION: u32 = 1;
/// Sent before a link is closed on a clean exit.
const BYE: u8 = b'B';
/// The most bytes rank 0 may send (NCCL's id is 128).
const MAX_PAYLOAD: u32 = 1 << 20;

/// What a lost link or a timed-out collective does: given the message, it should end the
/// process (the default: log it and exit 1).
pub type OnLost = Arc<dyn Fn(&str) + Send + Sync>;

/// The default [`OnLost`]: `log::error!` and exit 1.
pub fn exit_on_lost() -> OnLost {
    Arc::new(|msg: &str| {
        log::error!("{msg}");
        std::process::exit(1)
    })
}

/// The open links of a job (rank 0: one per other rank; the others: one to rank 0).
pub struct Rendezvous {
    rank: usize,
    world: usize,
    links: Vec<(usize, TcpStream)>,
    clean: Arc<AtomicBool>,
}

fn dist(rank: usize, msg: impl Into<String>) -> Error {
    Error::Dist {
        rank,
        msg: msg.into(),
    }
}

impl Rendezvous {
    /// Forms the job: rank 0 binds `launch.port` and waits for the other ranks, which retry
    /// connecting until they reach it; all within `timeout`. Rank 0's `payload` reaches every
    /// rank (returned; ignored elsewhere).
    pub fn connect(
        launch: &Launch,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<(Rendezvous, Vec<u8>)> {
        let (rank, world) = (launch.rank, launch.world);
        let deadline = Instant::now() + timeout;
        let addr = launch.master_addr.clone().ok_or_else(|| {
            dist(
                rank,
                "the job spans machines but no MASTER_ADDR says where rank 0 is: set it \
                 (and MASTER_PORT or SD2_RDZV_PORT)",
            )
        })?;
        let clean = Arc::new(AtomicBool::new(false));
        if rank == 0 {
            let bind = ("0.0.0.0", launch.port);
            let listener = TcpListener::bind(bind).map_err(|e| {
                dist(
                    rank,
                    format!(
                        "cannot listen on port {} for the rendezvous: {e}",
                        launch.port
                    ),
                )
            })?;
            listener.set_nonblocking(true)?;
            let mut links: Vec<(usize, TcpStream)> = vec![];
            while links.len() + 1 < world {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(remaining(deadline)))?;
                        let peer = hello_read(&mut s, world).map_err(|e| dist(0, e))?;
                        if peer == 0 || links.iter().any(|(r, _)| *r == peer) {
                            return Err(dist(0, format!("rank {peer} joined twice")));
                        }
                        s.write_all(&(payload.len() as u32).to_le_bytes())?;
                        s.write_all(payload)?;
                        s.set_read_timeout(None)?;
                        links.push((peer, s));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            let mut missing: Vec<usize> = (1..world)
                                .filter(|r| !links.iter().any(|(p, _)| p == r))
                                .collect();
                            missing.truncate(8);
                            return Err(dist(
                                0,
                                format!(
                                    "ranks {missing:?} did not join the rendezvous on port {} within {:?}",
                                    launch.port, timeout
                                ),
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(dist(0, format!("rendezvous accept: {e}"))),
                }
            }
            Ok((
                Rendezvous {
                    rank,
                    world,
                    links,
                    clean,
                },
                payload.to_vec(),
            ))
        } else {
            let target = format!("{addr}:{}", launch.port);
            let mut s = loop {
                let tried = target
                    .to_socket_addrs()
                    .map_err(|e| dist(rank, format!("rendezvous address {target}: {e}")))?
                    .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).ok());
                if let Some(s) = tried {
                    break s;
                }
                if Instant::now() >= deadline {
                    return Err(dist(
                        rank,
                        format!(
                            "rank 0 did not open the rendezvous at {target} within {timeout:?}"
                        ),
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            s.set_read_timeout(Some(remaining(deadline)))?;
            s.write_all(MAGIC)?;
            s.write_all(&VERSION.to_le_bytes())?;
            s.write_all(&(rank as u32).to_le_bytes())?;
            s.write_all(&(world as u32).to_le_bytes())?;
            let mut len = [0u8; 4];
            s.read_exact(&mut len)
                .map_err(|e| dist(rank, format!("rendezvous with rank 0 at {target}: {e}")))?;
            let len = u32::from_le_bytes(len);
            if len > MAX_PAYLOAD {
                return Err(dist(rank, format!("rank 0 announced {len} bytes")));
            }
            let mut got = vec![0u8; len as usize];
            s.read_exact(&mut got)
                .map_err(|e| dist(rank, format!("rendezvous with rank 0 at {target}: {e}")))?;
            s.set_read_timeout(None)?;
            Ok((
                Rendezvous {
                    rank,
                    world,
                    links: vec![(0, s)],
                    clean,
                },
                got,
            ))
        }
    }

    /// Watches every link on background threads: one that closes without the goodbye (its
    /// process died or stopped on an error) calls `on_lost` with a message naming the rank.
    /// Returns a handle whose [`Links::close`] says goodbye on a clean exit.
    pub fn watch(self, on_lost: OnLost) -> Result<Links> {
        let mut writers = vec![];
        for (peer, s) in self.links {
            let mut r = s.try_clone()?;
            writers.push(s);
            let (me, world, clean, lost) =
                (self.rank, self.world, self.clean.clone(), on_lost.clone());
            std::thread::Builder::new()
                .name(format!("sd2-link-{peer}"))
                .spawn(move || {
                    let mut b = [0u8; 1];
                    let why = match r.read(&mut b) {
                        Ok(1) if b[0] == BYE => return,
                        Ok(0) => "closed its link".to_string(),
                        Ok(_) => "sent an unknown byte".to_string(),
                        Err(e) => format!("link error: {e}"),
                    };
                    if clean.load(Ordering::SeqCst) {
                        return;
                    }
                    lost(&format!(
                        "rank {me} of {world}: rank {peer} stopped ({why}) — stopping this rank too"
                    ));
                })?;
        }
        Ok(Links {
            writers: Mutex::new(writers),
            clean: self.clean,
        })
    }
}

/// The open links after [`Rendezvous::watch`].
pub struct Links {
    writers: Mutex<Vec<TcpStream>>,
    clean: Arc<AtomicBool>,
}

impl Links {
    /// A clean exit: says goodbye on every link and closes them (a peer then stops watching).
    pub fn close(&self) {
        self.clean.store(true, Ordering::SeqCst);
        let mut w = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        for s in w.iter_mut() {
            s.write_all(&[BYE]).ok();
            s.shutdown(std::net::Shutdown::Both).ok();
        }
        w.clear();
    }

    /// Closes every link without a goodbye: the peers stop (a failing rank's last act). This
    /// rank's own watchers stay quiet: its failure is reported by whoever called this.
    pub fn sever(&self) {
        self.clean.store(true, Ordering::SeqCst);
        let mut w = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        for s in w.iter_mut() {
            s.shutdown(std::net::Shutdown::Both).ok();
        }
        w.clear();
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

fn hello_read(s: &mut TcpStream, world: usize) -> std::result::Result<usize, String> {
    let mut h = [0u8; 16];
    s.read_exact(&mut h)
        .map_err(|e| format!("rendezvous hello: {e}"))?;
    if &h[..4] != MAGIC {
        return Err("a connection on the rendezvous port that is not an sd2 rank".into());
    }
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if word(4) != VERSION {
        return Err(format!(
            "a rank of rendezvous version {} (this is {VERSION})",
            word(4)
        ));
    }
    let (peer, w) = (word(8) as usize, word(12) as usize);
    if w != world || peer >= world {
        return Err(format!(
            "a rank {peer} of a world of {w} joined a world of {world}"
        ));
    }
    Ok(peer)
}

/// Stops a rank whose collective has not returned within its timeout (a peer that hangs but
/// stays alive): a background thread checks once a second.
pub struct Watchdog {
    since: Arc<Mutex<Option<(Instant, &'static str)>>>,
}

impl Watchdog {
    /// A watchdog calling `on_lost` when one collective takes longer than `timeout`.
    pub fn new(rank: usize, timeout: Duration, on_lost: OnLost) -> Result<Watchdog> {
        let since: Arc<Mutex<Option<(Instant, &'static str)>>> = Arc::default();
        let s = since.clone();
        std::thread::Builder::new()
            .name("sd2-collective-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(250));
                if Arc::strong_count(&s) == 1 {
                    return; // the watchdog was dropped
                }
                let started = *s.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((t, what)) = started {
                    if t.elapsed() > timeout {
                        on_lost(&format!(
                            "rank {rank}: {what} did not complete within {timeout:?} \
                             (SD2_COLLECTIVE_TIMEOUT_S); a rank is stuck — stopping"
                        ));
                        return;
                    }
                }
            })?;
        Ok(Watchdog { since })
    }

    /// Runs the collective `f`, timed.
    pub fn time<R>(&self, what: &'static str, f: impl FnOnce() -> R) -> R {
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), what));
        let r = f();
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = None;
        r
    }
}

/// The collective timeout: `SD2_COLLECTIVE_TIMEOUT_S` seconds (default 600, as long as a
/// validation pass or a checkpoint on rank 0 may keep the others waiting).
pub fn collective_timeout() -> Duration {
    let s = std::env::var("SD2_COLLECTIVE_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(600.0);
    Duration::from_secs_f64(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::Launcher;

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch {
            launcher: Launcher::Torchrun,
            rank,
            world,
            local_rank: rank,
            local_world: Some(world),
            master_addr: Some("127.0.0.1".into()),
            port,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn rank_zeros_bytes_reach_every_rank_and_a_dead_rank_is_noticed() {
        let port = free_port();
        let world = 3;
        let lost: Arc<Mutex<Vec<String>>> = Arc::default();
        let handles: Vec<_> = (1..world)
            .map(|r| {
                std::thread::spawn(move || {
                    Rendezvous::connect(&launch(r, world, port), b"", Duration::from_secs(20))
                        .unwrap()
                })
            })
            .collect();
        let (r0, got0) =
            Rendezvous::connect(&launch(0, world, port), b"nccl-id", Duration::from_secs(20))
                .unwrap();
        assert_eq!(got0, b"nccl-id");
        let l = lost.clone();
        let links0 = r0
            .watch(Arc::new(move |m: &str| {
                l.lock().unwrap().push(m.to_string())
            }))
            .unwrap();
        let mut peers = vec![];
        for h in handles {
            let (r, got) = h.join().unwrap();
            assert_eq!(got, b"nccl-id");
            peers.push(r);
        }
        // Rank 1 exits cleanly: nothing is lost. Rank 2 dies: rank 0 notices.
        let l1: Arc<Mutex<Vec<String>>> = Arc::default();
        let c = l1.clone();
        let mut it = peers.into_iter();
        let links1 = it
            .next()
            .unwrap()
            .watch(Arc::new(move |m: &str| {
                c.lock().unwrap().push(m.to_string())
            }))
            .unwrap();
        links1.close();
        let dead = it.next().unwrap();
        drop(dead); // its stream closes without a goodbye
        let t = Instant::now();
        while lost.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let lost = lost.lock().unwrap().clone();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("rank 2 stopped"), "{}", lost[0]);
        assert!(l1.lock().unwrap().is_empty());
        links0.close();
    }

    #[test]
    fn a_severed_link_stops_the_peer_and_not_the_rank_that_severed() {
        let port = free_port();
        let h = std::thread::spawn(move || {
            Rendezvous::connect(&launch(1, 2, port), b"", Duration::from_secs(20)).unwrap()
        });
        let (r0, _) =
            Rendezvous::connect(&launch(0, 2, port), b"id", Duration::from_secs(20)).unwrap();
        let (r1, _) = h.join().unwrap();
        let record = |v: &Arc<Mutex<Vec<String>>>| -> OnLost {
            let v = v.clone();
            Arc::new(move |m: &str| v.lock().unwrap().push(m.to_string()))
        };
        let lost0: Arc<Mutex<Vec<String>>> = Arc::default();
        let lost1: Arc<Mutex<Vec<String>>> = Arc::default();
        let links0 = r0.watch(record(&lost0)).unwrap();
        let links1 = r1.watch(record(&lost1)).unwrap();
        links1.sever();
        let t = Instant::now();
        while lost0.lock().unwrap().is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Rank 1's own watcher has seen its link shut too by now, and kept quiet.
        std::thread::sleep(Duration::from_millis(200));
        let lost0 = lost0.lock().unwrap().clone();
        assert_eq!(lost0.len(), 1, "{lost0:?}");
        assert!(lost0[0].contains("rank 1 stopped"), "{}", lost0[0]);
        assert!(
            lost1.lock().unwrap().is_empty(),
            "{:?}",
            lost1.lock().unwrap()
        );
        links0.close();
    }

    #[test]
    fn missing_ranks_time_out_with_their_numbers() {
        let port = free_port();
        let e = Rendezvous::connect(&launch(0, 3, port), b"x", Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(e.to_string().contains("ranks [1, 2] did not join"), "{e}");
        let e = Rendezvous::connect(&launch(1, 3, free_port()), b"", Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(e.to_string().contains("rank 0 did not open"), "{e}");
    }

    #[test]
    fn a_stuck_collective_times_out() {
        let lost: Arc<Mutex<Vec<String>>> = Arc::default();
        let l = lost.clone();
        let w = Watchdog::new(
            1,
            Duration::from_millis(300),
            Arc::new(move |m: &str| l.lock().unwrap().push(m.to_string())),
        )
        .unwrap();
        w.time("quick", || ());
        w.time("all_reduce", || {
            std::thread::sleep(Duration::from_millis(900))
        });
        let lost = lost.lock().unwrap().clone();
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(
            lost[0].contains("all_reduce did not complete"),
            "{}",
            lost[0]
        );
    }
}

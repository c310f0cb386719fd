//! NAT persistence: the snapshot file (format and checks in `podrouter_core::nat_snapshot`).
//!
//! * [`load`] reads the file (at most the size a full table can have) and restores it into the
//!   table before the workers start. A missing file is no error; a refused one is reported in
//!   [`PersistStats`] and otherwise ignored (the table starts empty).
//! * [`Writer`] is one background thread: every [`INTERVAL`] it compares the table's change
//!   generation with that of its last write and, if it moved, copies the live entries out under
//!   the NAT lock (the lock the packet path already takes; the packet path itself takes no extra
//!   lock and does no extra work beyond bumping a counter it holds the lock for anyway), releases
//!   it, encodes and writes `<path>.tmp` (mode 0600) and renames it over `<path>`: a reader
//!   never sees a half-written file, and a crash leaves the previous complete snapshot.
//!   [`Writer::finish`] writes once more (the workers are stopped by then, so the final
//!   snapshot is exact).
//!
//! No `fsync`: the snapshot must survive the process (SIGKILL, OOM kill), not the machine. After
//! a reboot the connections it describes are gone anyway; the page cache survives a process.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use podrouter_core::nat::{NatRecord, NatTable, NatTable6};
use podrouter_core::nat_snapshot::{self, LoadReport};
use podrouter_core::Cidr;
use std::net::Ipv6Addr;

/// Time between two writes of a changing table.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// Seconds of the wall clock (Unix time).
pub fn wall_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the snapshot machinery did (`podrouter status`, metrics).
#[derive(Debug, Clone, Default)]
pub struct PersistStats {
    /// The snapshot file.
    pub path: PathBuf,
    /// The load at start: `None` before it ran or when there was no file.
    pub loaded: Option<LoadReport>,
    /// Why the file was refused as a whole (or could not be read).
    pub load_error: Option<String>,
    pub writes: u64,
    pub write_errors: u64,
    pub last_write_error: Option<String>,
    /// Entries and bytes of the last write, and how long it took (copy under the lock, encode,
    /// write, rename) and how long the NAT lock was held for the copy, in microseconds.
    pub last_entries: usize,
    pub last_bytes: usize,
    pub last_write_us: u64,
    pub last_lock_us: u64,
}

/// Reads and restores the snapshot at `path` into `nat` and (IPv6 entries) `nat6` (the tables'
/// clock reads `now`). Updates `stats` (`loaded` / `load_error`); never fails.
pub fn load(
    path: &Path,
    pod_cidrs: &[Cidr],
    nat: &Mutex<NatTable>,
    nat6: &Mutex<NatTable6>,
    now: u64,
    stats: &Mutex<PersistStats>,
) {
    let mut t = nat.lock().unwrap_or_else(|p| p.into_inner());
    let mut t6 = nat6.lock().unwrap_or_else(|p| p.into_inner());
    let cap = nat_snapshot::file_len(t.config().max_entries + t6.config().max_entries);
    let res = read_capped(path, cap).map_err(|e| format!("cannot read {}: {e}", path.display()));
    let outcome = match res {
        Ok(None) => Ok(None),
        Ok(Some(bytes)) => {
            nat_snapshot::load_both(&bytes, pod_cidrs, &mut t, Some(&mut t6), now, wall_secs())
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) => Err(e),
    };
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        Ok(r) => s.loaded = r,
        Err(e) => s.load_error = Some(e),
    }
}

/// The file's bytes, `None` if it does not exist; an error for a file larger than `cap` (read
/// at most `cap + 1` bytes, so a huge file costs nothing) or not a regular file.
fn read_capped(path: &Path, cap: usize) -> io::Result<Option<Vec<u8>>> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mut b = Vec::new();
    f.take(cap as u64 + 1).read_to_end(&mut b)?;
    if b.len() > cap {
        return Err(io::Error::other(format!(
            "larger than a full table's snapshot ({cap} bytes)"
        )));
    }
    Ok(Some(b))
}

/// One snapshot write: copy under the lock, then encode + write + rename outside it. Returns
/// the new generation on success.
/// The generations of both tables (a write is due when either moved).
type Gen = (u64, u64);

/// Reused export buffers of both tables and the encoded file.
type Scratch = (Vec<NatRecord>, Vec<NatRecord<Ipv6Addr>>, Vec<u8>);

fn write_once(
    path: &Path,
    (nat, nat6): (&Mutex<NatTable>, &Mutex<NatTable6>),
    epoch: Instant,
    last_gen: Option<Gen>,
    (records, records6, buf): &mut Scratch,
    stats: &Mutex<PersistStats>,
) -> Option<Gen> {
    let t0 = Instant::now();
    let now = epoch.elapsed().as_secs();
    // One table's lock at a time: the packet path never holds both either.
    let g4 = nat.lock().unwrap_or_else(|p| p.into_inner()).generation();
    let g6 = nat6.lock().unwrap_or_else(|p| p.into_inner()).generation();
    if last_gen == Some((g4, g6)) {
        return last_gen;
    }
    let gen4 = {
        let t = nat.lock().unwrap_or_else(|p| p.into_inner());
        t.export_into(now, records);
        t.generation()
    };
    let lock_us = t0.elapsed().as_micros() as u64;
    let gen6 = {
        let t = nat6.lock().unwrap_or_else(|p| p.into_inner());
        t.export_into(now, records6);
        t.generation()
    };
    nat_snapshot::encode_both_into(records, records6, wall_secs(), buf);
    let res = write_atomic(path, buf);
    let mut s = stats.lock().unwrap_or_else(|p| p.into_inner());
    match res {
        Ok(()) => {
            s.writes += 1;
            s.last_entries = records.len() + records6.len();
            s.last_bytes = buf.len();
            s.last_write_us = t0.elapsed().as_micros() as u64;
            s.last_lock_us = lock_us;
            Some((gen4, gen6))
        }
        Err(e) => {
            s.write_errors += 1;
            s.last_write_error = Some(format!("{}: {e}", path.display()));
            last_gen
        }
    }
}

/// `<path>.tmp`, written whole (0600), then renamed over `path`.
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    drop(f);
    fs::rename(&tmp, path)
}

/// The background writer (see the module docs).
pub struct Writer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread. The first write happens one [`INTERVAL`] later, and only if the table
    /// changed since `start` (a table just restored from the file need not be written back).
    pub fn start(
        path: PathBuf,
        nat: Arc<Mutex<NatTable>>,
        nat6: Arc<Mutex<NatTable6>>,
        epoch: Instant,
        stats: Arc<Mutex<PersistStats>>,
    ) -> io::Result<Writer> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stop2 = Arc::clone(&stop);
        let mut gen = Some((
            nat.lock().unwrap_or_else(|p| p.into_inner()).generation(),
            nat6.lock().unwrap_or_else(|p| p.into_inner()).generation(),
        ));
        let thread = std::thread::Builder::new()
            .name("podr-natsnap".into())
            .spawn(move || {
                let mut scratch: Scratch = (Vec::new(), Vec::new(), Vec::new());
                let tables = (&*nat, &*nat6);
                let (lock, cv) = &*stop2;
                loop {
                    let stopped = {
                        let g = lock.lock().unwrap_or_else(|p| p.into_inner());
                        let (g, _) = cv
                            .wait_timeout_while(g, INTERVAL, |s| !*s)
                            .unwrap_or_else(|p| p.into_inner());
                        *g
                    };
                    if stopped {
                        // The final write: always, so that the file matches the table at stop.
                        write_once(&path, tables, epoch, None, &mut scratch, &stats);
                        return;
                    }
                    gen = write_once(&path, tables, epoch, gen, &mut scratch, &stats);
                }
            })?;
        Ok(Writer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread after one last write.
    pub fn finish(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podrouter_core::nat::{FlowKey, NatConfig, NatProto};
    use std::net::Ipv4Addr;

    fn key(i: u16) -> FlowKey {
        FlowKey {
            proto: NatProto::Udp,
            pod_ip: Ipv4Addr::new(10, 0, 0, 2),
            pod_port: 1000 + i,
            remote_ip: Ipv4Addr::new(192, 0, 2, 1),
            remote_port: 53,
        }
    }

    fn key6(i: u16) -> FlowKey<std::net::Ipv6Addr> {
        FlowKey {
            proto: NatProto::Udp,
            pod_ip: "fd00::2".parse().unwrap(),
            pod_port: 1000 + i,
            remote_ip: "2001:db8::1".parse().unwrap(),
            remote_port: 53,
        }
    }

    #[test]
    fn writer_then_load_in_another_table() {
        let dir = std::env::temp_dir().join(format!("podr-natsnap-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("n.nat");
        let _ = fs::remove_file(&path);
        let nat = Arc::new(Mutex::new(NatTable::new(NatConfig::default())));
        let nat6 = Arc::new(Mutex::new(NatTable::new_v6(NatConfig::default())));
        let stats = Arc::new(Mutex::new(PersistStats::default()));
        let epoch = Instant::now();
        let w = Writer::start(
            path.clone(),
            Arc::clone(&nat),
            Arc::clone(&nat6),
            epoch,
            Arc::clone(&stats),
        )
        .unwrap();
        let mut ports = Vec::new();
        let mut ports6 = Vec::new();
        for i in 0..100 {
            ports.push(nat.lock().unwrap().egress(&key(i), 0, 0).unwrap());
        }
        for i in 0..10 {
            ports6.push(nat6.lock().unwrap().egress(&key6(i), 0, 0).unwrap());
        }
        // Written by the periodic write, before any stop.
        let t0 = Instant::now();
        while stats.lock().unwrap().writes == 0 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let seen = stats.lock().unwrap().clone();
        assert_eq!(seen.last_entries, 110, "{seen:?}");
        w.finish();
        assert_eq!(stats.lock().unwrap().writes, 2);
        let meta = fs::metadata(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);

        let other = Mutex::new(NatTable::new(NatConfig {
            seed: 99,
            ..NatConfig::default()
        }));
        let other6 = Mutex::new(NatTable::new_v6(NatConfig::default()));
        let st2 = Mutex::new(PersistStats::default());
        let cidrs = [
            Cidr::new("10.0.0.0".parse().unwrap(), 24).unwrap(),
            Cidr::new("fd00::".parse().unwrap(), 64).unwrap(),
        ];
        load(&path, &cidrs, &other, &other6, 0, &st2);
        assert_eq!(st2.lock().unwrap().loaded.as_ref().unwrap().restored, 110);
        for (i, p) in ports.iter().enumerate() {
            assert_eq!(other.lock().unwrap().lookup(&key(i as u16), 0), Some(*p));
        }
        for (i, p) in ports6.iter().enumerate() {
            assert_eq!(other6.lock().unwrap().lookup(&key6(i as u16), 0), Some(*p));
        }

        // A corrupt file: reported, the table stays empty.
        let mut b = fs::read(&path).unwrap();
        b[60] ^= 1;
        fs::write(&path, &b).unwrap();
        let empty = Mutex::new(NatTable::new(NatConfig::default()));
        let empty6 = Mutex::new(NatTable::new_v6(NatConfig::default()));
        let st3 = Mutex::new(PersistStats::default());
        load(&path, &cidrs, &empty, &empty6, 0, &st3);
        assert!(st3
            .lock()
            .unwrap()
            .load_error
            .as_ref()
            .unwrap()
            .contains("checksum"));
        assert!(empty.lock().unwrap().is_empty());
        // A missing file: nothing to report.
        fs::remove_file(&path).unwrap();
        let st4 = Mutex::new(PersistStats::default());
        load(&path, &cidrs, &empty, &empty6, 0, &st4);
        assert!(st4.lock().unwrap().loaded.is_none() && st4.lock().unwrap().load_error.is_none());
        let _ = fs::remove_dir_all(&dir);
    }
}

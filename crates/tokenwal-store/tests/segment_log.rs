//! The segment log (`tokenwal_store::segment`) against real processes: a writer killed with
//! SIGKILL at random moments, and a writer whose file size limit (`RLIMIT_FSIZE`, SIGXFSZ ignored)
//! makes a write fail with EFBIG.
//!
//! The test binary re-executes itself as the child: with `TOKENWAL_SEGLOG_CHILD_DIR` set,
//! `seglog_child` opens the log there and appends and syncs groups, printing `ack <index>` (the last
//! index of the group) after each sync returns. A process kill cannot reveal a missing fsync (the
//! page cache survives); it checks that a kill at any moment leaves a log that opens with every
//! acknowledged frame intact and nothing unreadable after it.

use rand::Rng;
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokenwal_store::segment::{LogOptions, SegmentLog};
use tokenwal_store::StoreError;

const CHILD_ENV: &str = "TOKENWAL_SEGLOG_CHILD_DIR";
const MODE_ENV: &str = "TOKENWAL_SEGLOG_CHILD_MODE";

fn opts() -> LogOptions {
    LogOptions { max_segment_bytes: 16 << 10, max_frame_bytes: 4096 }
}

/// The payload of frame `i`: 8 to 2,000 bytes, starting with `i`, the rest derived from `i`.
fn payload(i: u64) -> Vec<u8> {
    let len = 8 + (i.wrapping_mul(2_654_435_761) % 1993) as usize;
    let mut v = i.to_be_bytes().to_vec();
    v.extend((0..len - 8).map(|k| (i as u8) ^ (k as u8).wrapping_mul(13)));
    v
}

/// Every frame of the log at `dir`, checked to be frames 0, 1, 2, … with their payloads.
fn check_log(log: &SegmentLog) -> u64 {
    let mut n = 0u64;
    log.scan(|loc, p| {
        assert_eq!(p, payload(n).as_slice(), "frame {n} at {loc:?}");
        n += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    n
}

fn ack(i: u64) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "ack {i}").unwrap();
    out.flush().unwrap();
}

/// The child's body; a no-op in a normal test run.
#[test]
fn seglog_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let mode = std::env::var(MODE_ENV).unwrap_or_default();
    if mode == "efbig" {
        return efbig_child(Path::new(&dir));
    }
    let (mut log, _) = SegmentLog::open(Path::new(&dir), opts()).unwrap();
    let mut next = check_log(&log);
    // Bounded: the parent kills it long before.
    for g in 0..200_000u64 {
        let ps: Vec<Vec<u8>> = (next..next + 1 + g % 6).map(payload).collect();
        let refs: Vec<&[u8]> = ps.iter().map(|p| p.as_slice()).collect();
        log.append(&refs).unwrap();
        log.sync().unwrap();
        next += ps.len() as u64;
        ack(next - 1);
    }
}

/// Appends and syncs 993-byte frames until a write fails (the parent set a file size limit), then
/// checks that the log is poisoned.
fn efbig_child(dir: &Path) {
    let (mut log, _) = SegmentLog::open(dir, LogOptions { max_segment_bytes: 1 << 20, max_frame_bytes: 4096 }).unwrap();
    let p = vec![0xabu8; 993];
    let mut first = None;
    for i in 0..10_000u64 {
        match log.append(&[&p]).and_then(|locs| log.sync().map(|()| locs)) {
            Ok(locs) => {
                first.get_or_insert(locs[0]);
                ack(i);
            }
            Err(e) => {
                let StoreError::Io { op, source } = &e else { panic!("expected Io, got {e:?}") };
                println!("error {op} {:?}", source.raw_os_error());
                break;
            }
        }
    }
    assert!(log.is_poisoned());
    assert!(matches!(log.append(&[b"x"]), Err(StoreError::Poisoned)));
    assert!(matches!(log.sync(), Err(StoreError::Poisoned)));
    assert!(matches!(log.read(first.unwrap()), Err(StoreError::Poisoned)));
    println!("poisoned ok");
}

fn child(dir: &Path, mode: &str, wrap: Option<&str>) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match wrap {
        Some(script) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(script).arg(exe);
            c
        }
        None => Command::new(exe),
    };
    cmd.args(["--exact", "seglog_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(MODE_ENV, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// Forwards the child's stdout lines to a channel (closed at its end).
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    rx
}

/// The index of an `ack` line (libtest may have printed `test seglog_child ... ` before it).
fn ack_of(line: &str) -> Option<u64> {
    line.find("ack ").map(|at| line[at + 4..].parse().unwrap())
}

#[test]
fn a_writer_killed_at_random_moments_loses_no_acknowledged_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut rng = rand::thread_rng();
    let mut acked: Option<u64> = None;
    let mut torn = 0;
    for round in 0..12 {
        let mut c = child(&path, "kill", None);
        let rx = lines(&mut c);
        // Wait for the child's first acknowledgement of this round, then kill it a little later.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("child acks");
            if let Some(i) = ack_of(&line) {
                acked = acked.max(Some(i));
                break;
            }
        }
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..60_000)));
        c.kill().unwrap();
        c.wait().unwrap();
        for line in rx.iter() {
            if let Some(i) = ack_of(&line) {
                acked = acked.max(Some(i));
            }
        }
        let (mut log, report) = SegmentLog::open(&path, opts()).unwrap();
        torn += usize::from(report.torn_tail.is_some());
        let n = check_log(&log);
        let acked = acked.unwrap();
        assert!(n > acked, "round {round}: {n} frames, frame {acked} acknowledged");
        assert_eq!(n, log.segments().iter().map(|s| s.frames).sum::<u64>());
        // The log takes appends after a kill.
        let p = payload(n);
        log.append(&[&p]).unwrap();
        log.sync().unwrap();
        assert_eq!(check_log(&log), n + 1);
    }
    let (log, _) = SegmentLog::open(&path, opts()).unwrap();
    eprintln!("12 kills; {} frames in {} segments; {torn} torn tails", check_log(&log), log.segments().len());
    assert!(log.segments().len() > 2, "the test rotates segments");
}

#[test]
fn a_write_failing_with_efbig_poisons_the_log_and_loses_no_synced_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    // SIGXFSZ ignored (an ignored signal stays ignored across exec), then a 64-block file size
    // limit: a write past it fails with EFBIG after writing what fits.
    let mut c = child(&path, "efbig", Some(r#"trap '' XFSZ; ulimit -f 64 && exec "$0" "$@""#));
    let rx = lines(&mut c);
    let status = c.wait().unwrap();
    let out: Vec<String> = rx.iter().collect();
    assert!(status.success(), "child failed: {out:?}");
    let acks: Vec<u64> = out.iter().filter_map(|l| ack_of(l)).collect();
    assert!(acks.len() >= 10, "{out:?}");
    assert!(out.iter().any(|l| l.ends_with("error segment write Some(27)")), "EFBIG expected: {out:?}");
    assert!(out.iter().any(|l| l.ends_with("poisoned ok")), "{out:?}");

    let (log, report) =
        SegmentLog::open(&path, LogOptions { max_segment_bytes: 1 << 20, max_frame_bytes: 4096 }).unwrap();
    let torn = report.torn_tail.expect("the failed write left a partial frame");
    assert!(torn.dropped > 0 && torn.dropped < 1001, "{torn:?}");
    let mut n = 0;
    log.scan(|_, p| {
        assert_eq!(p, &[0xab; 993][..]);
        n += 1;
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(n, acks.len());
    // Truncated on disk to the last whole frame.
    let seg = path.join(tokenwal_store::segment::segment_file_name(1));
    assert_eq!(std::fs::metadata(seg).unwrap().len(), 16 + 1001 * n as u64);
}

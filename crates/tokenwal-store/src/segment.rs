//! The append-only segment log of the planned store format 3 (docs/journal.md, "Format 3
//! (planned): the segment log"). **Not yet used by the store.**
//!
//! docs/format3.md (design B) builds a log-structured store on it: the store's one committer thread
//! appends all of a group's frames — grant states and records — ([`SegmentLog::append`], one
//! `write`), makes them durable ([`SegmentLog::sync`], or a [`SyncPoint`] synced on another thread
//! while the next group is appended), and only then answers the group's writers. Payloads are
//! opaque bytes here.
//!
//! ## Files
//!
//! A directory of segments named `{seq:016x}.seg` (`seq` from 1, contiguous; lowercase hex). Other
//! files are reported by [`SegmentLog::open`] and never touched. Each segment is:
//!
//! ```text
//! header, 16 bytes:  "TWSL" | format version, u32 BE (1) | seq, u64 BE
//! frames:            length n, u32 BE | crc32 (IEEE) of the 4 length bytes and the payload, u32 BE | payload, n bytes
//! ```
//!
//! The checksum covers the length too, so a zero-filled region never reads as a frame.
//!
//! ## Durability
//!
//! * A new segment is created with `O_EXCL`; its header is written and `fsync`ed and the directory
//!   is `fsync`ed before any frame is written to it.
//! * Nothing appended is durable, or visible to [`read`](LogReader::read) and
//!   [`scan`](LogReader::scan), before [`SegmentLog::sync`] returns `Ok` (it `fdatasync`s the
//!   active segment and every segment rotated away since the last sync).
//! * Any I/O error of the writer (create, write, sync, remove, directory sync; `ENOSPC` and `EFBIG`
//!   included) is returned once as [`StoreError::Io`] naming the operation and poisons the log:
//!   every later call (reads included) returns [`StoreError::Poisoned`]. Reopen to recover.
//! * Opening validates every frame. A torn tail of the **last** segment (a partial frame, or a bad
//!   frame after which no valid frame starts at any later byte offset; or a partial header of a
//!   fresh last segment) is truncated away, `fsync`ed and reported in [`OpenReport::torn_tail`]. A
//!   bad frame anywhere else, a bad header, a frame longer than [`LogOptions::max_frame_bytes`], or
//!   a missing segment is [`StoreError::Corrupt`] naming the segment and offset; nothing is
//!   truncated or deleted then. Opening `fsync`s every segment and the directory, so what it shows
//!   is durable.
//!
//! ## Concurrency
//!
//! One writer: [`SegmentLog`] (`&mut self` for appends, syncs and removals). A [`SyncPoint`]
//! ([`SegmentLog::sync_point`]) carries the `fdatasync` of everything appended so far to another
//! thread, so that the writer appends the next group while the previous one syncs. Readers on other
//! threads use a [`LogReader`] ([`SegmentLog::reader`]: cheap to clone, `Send + Sync`), which
//! `pread`s shared file handles. The log also holds an exclusive `flock` on the directory, so a
//! second [`SegmentLog::open`] of the same directory (any process) fails with
//! [`StoreError::Locked`].

use crate::error::{io_err, StoreError};
use crate::lock::{read_lock, write_lock};
use fs2::FileExt as _;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::ControlFlow;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokenwal_core::CodecError;

/// The magic at the start of every segment.
pub const MAGIC: [u8; 4] = *b"TWSL";
/// The segment format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of a segment header (magic, version, seq).
pub const HEADER_BYTES: u64 = 16;
/// Bytes of a frame before its payload (length, crc32).
pub const FRAME_OVERHEAD: u64 = 8;

/// Bytes read at a time when validating or scanning a segment.
const CHUNK: usize = 1 << 20;

/// Limits of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// A group is appended to a new segment when it would make the active one larger than this
    /// (unless the active segment holds no frame yet). Default 64 MiB.
    pub max_segment_bytes: u64,
    /// The largest payload [`SegmentLog::append`] accepts; a stored frame claiming a longer one is
    /// corrupt (no allocation is ever sized by an unchecked length). Default 1 MiB; at most
    /// `u32::MAX`.
    pub max_frame_bytes: u32,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { max_segment_bytes: 64 << 20, max_frame_bytes: 1 << 20 }
    }
}

/// Where a frame is: its segment, the offset of its frame header in that segment, and its payload
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Loc {
    /// The segment's sequence number.
    pub seq: u64,
    /// Byte offset of the frame (its length field) in the segment file.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

/// One segment, as [`SegmentLog::segments`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Sequence number (the file is `{seq:016x}.seg`).
    pub seq: u64,
    /// Bytes written to it, header included (appended frames count before they are synced).
    pub bytes: u64,
    /// Frames written to it.
    pub frames: u64,
}

/// A torn tail that [`SegmentLog::open`] truncated away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TornTail {
    /// The (last) segment it was in.
    pub seq: u64,
    /// Where the segment now ends (the end of its last whole frame, or of its header).
    pub offset: u64,
    /// Bytes dropped.
    pub dropped: u64,
    /// Whether the header itself was torn (a segment created just before a crash; it held no
    /// frame and was re-initialised with a fresh header).
    pub header: bool,
}

/// What [`SegmentLog::open`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Segments held.
    pub segments: usize,
    /// Frames held (all checked).
    pub frames: u64,
    /// The torn tail truncated away, if there was one.
    pub torn_tail: Option<TornTail>,
    /// Entries of the directory that are not segments (left untouched).
    pub ignored: Vec<PathBuf>,
}

/// One segment file, shared by the writer and the readers.
#[derive(Debug)]
struct Seg {
    seq: u64,
    file: File,
    /// Bytes written (writer only).
    written: AtomicU64,
    /// Frames written (writer only).
    frames: AtomicU64,
    /// Bytes made durable by a sync (or found at open): what readers may see.
    synced: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    max_frame_bytes: u32,
    segs: RwLock<BTreeMap<u64, Arc<Seg>>>,
    /// Segments below this seq were removed (a [`Loc`] in them reads as `None`).
    floor: AtomicU64,
    poisoned: AtomicBool,
}

impl Shared {
    /// `Poisoned` once an earlier I/O error of the writer or a sync point poisoned the log.
    fn check_poison(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(StoreError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Passes `r` on, poisoning the log if it is an I/O error (it may have written anything).
    fn poison_on_io<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Io { .. }) = &r {
            self.poisoned.store(true, Ordering::SeqCst);
        }
        r
    }
}

/// The writer of a segment log. See the [module documentation](self).
#[derive(Debug)]
pub struct SegmentLog {
    shared: Arc<Shared>,
    opts: LogOptions,
    /// The directory, open: its `flock` is the writer's, and it is what a directory `fsync` syncs.
    dir_handle: File,
    /// The segment appended to (`None` until the first append into an empty log).
    active: Option<Arc<Seg>>,
    /// Segments rotated away since the last sync (not yet `fdatasync`ed).
    unsynced: Vec<Arc<Seg>>,
    next_seq: u64,
}

/// What a writer had appended at one moment ([`SegmentLog::sync_point`]), to be made durable and
/// visible to readers by [`SyncPoint::sync`], on any thread.
#[derive(Debug)]
#[must_use = "nothing is durable until the sync point is synced"]
pub struct SyncPoint {
    shared: Arc<Shared>,
    /// Each segment with bytes not yet synced, and how far this point covers it, oldest first.
    todo: Vec<(Arc<Seg>, u64)>,
}

impl SyncPoint {
    /// `fdatasync`s every segment this point covers, oldest first, and lets readers see what it
    /// covers. Sync points may run at once on several threads: a segment's synced mark only ever
    /// grows. An I/O error poisons the log (the writer's next call answers
    /// [`StoreError::Poisoned`]) and nothing this point covers may be taken as durable.
    pub fn sync(self) -> Result<(), StoreError> {
        self.shared.check_poison()?;
        for (seg, upto) in &self.todo {
            if seg.synced.load(Ordering::SeqCst) >= *upto {
                continue;
            }
            self.shared.poison_on_io(seg.file.sync_data().map_err(io_err("segment sync")))?;
            seg.synced.fetch_max(*upto, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// A reader of a segment log: cheap to clone, usable from any thread while the writer appends.
/// It sees only synced frames.
#[derive(Debug, Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

/// The file name of segment `seq`.
pub fn segment_file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn header(seq: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&FORMAT_VERSION.to_be_bytes());
    h[8..].copy_from_slice(&seq.to_be_bytes());
    h
}

fn frame_crc(len_bytes: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len_bytes);
    h.update(payload);
    h.finalize()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A window over a file for sequential validation: holds `[start, start + buf.len())`.
struct Window<'a> {
    file: &'a File,
    end: u64,
    start: u64,
    buf: Vec<u8>,
}

impl<'a> Window<'a> {
    fn new(file: &'a File, end: u64) -> Self {
        Window { file, end, start: 0, buf: Vec::new() }
    }

    /// The bytes `[off, off + n)`; the caller guarantees `off + n <= end`.
    fn get(&mut self, off: u64, n: usize) -> io::Result<&[u8]> {
        debug_assert!(off + n as u64 <= self.end);
        let have = off >= self.start && off + n as u64 <= self.start + self.buf.len() as u64;
        if !have {
            let want = (n.max(CHUNK) as u64).min(self.end - off) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, off)?;
            self.start = off;
        }
        let at = (off - self.start) as usize;
        Ok(&self.buf[at..at + n])
    }
}

/// What is at an offset of a segment.
#[derive(Debug, PartialEq, Eq)]
enum FrameCheck {
    /// A whole frame with a matching checksum.
    Valid { len: u32 },
    /// The file ends inside the frame (its length field, or its payload).
    Partial { declared: Option<u32>, present: u64 },
    /// The length is over the limit.
    TooLong { len: u32 },
    /// The checksum does not match.
    BadCrc { stored: u32, computed: u32 },
}

fn check_frame(w: &mut Window<'_>, off: u64, max_frame_bytes: u32) -> io::Result<FrameCheck> {
    let present = w.end - off;
    if present < FRAME_OVERHEAD {
        return Ok(FrameCheck::Partial { declared: None, present });
    }
    let head = w.get(off, FRAME_OVERHEAD as usize)?;
    let len_bytes: [u8; 4] = head[..4].try_into().expect("4 bytes");
    let stored = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(len_bytes);
    if len > max_frame_bytes {
        return Ok(FrameCheck::TooLong { len });
    }
    if FRAME_OVERHEAD + u64::from(len) > present {
        return Ok(FrameCheck::Partial { declared: Some(len), present });
    }
    let payload = w.get(off + FRAME_OVERHEAD, len as usize)?;
    let computed = frame_crc(len_bytes, payload);
    if computed != stored {
        return Ok(FrameCheck::BadCrc { stored, computed });
    }
    Ok(FrameCheck::Valid { len })
}

fn corrupt(dir: &Path, seq: u64, offset: u64, detail: &str, source: CodecError) -> StoreError {
    let path = dir.join(segment_file_name(seq));
    StoreError::Corrupt { what: format!("segment log {} at offset {offset}{detail}", path.display()), source }
}

fn bad_frame_error(dir: &Path, seq: u64, off: u64, check: &FrameCheck, detail: &str) -> StoreError {
    let source = match *check {
        FrameCheck::TooLong { len } => CodecError::TooLarge(len as usize),
        FrameCheck::BadCrc { stored, computed } => CodecError::Checksum { stored, computed },
        FrameCheck::Partial { declared: Some(len), present } => CodecError::LengthMismatch {
            declared: len as usize,
            actual: present.saturating_sub(FRAME_OVERHEAD) as usize,
        },
        FrameCheck::Partial { declared: None, present } => CodecError::Truncated { len: present as usize },
        FrameCheck::Valid { .. } => unreachable!("a valid frame is not an error"),
    };
    corrupt(dir, seq, off, detail, source)
}

/// The first offset after `from` at which a valid frame starts, if any (a resynchronisation search
/// over every byte offset: a torn tail has none).
fn valid_frame_after(w: &mut Window<'_>, from: u64, max_frame_bytes: u32) -> io::Result<Option<u64>> {
    let mut p = from;
    while p + FRAME_OVERHEAD <= w.end {
        if let FrameCheck::Valid { .. } = check_frame(w, p, max_frame_bytes)? {
            return Ok(Some(p));
        }
        p += 1;
    }
    Ok(None)
}

/// Result of validating one segment.
struct Validated {
    /// Where its valid content ends.
    end: u64,
    frames: u64,
    torn: Option<TornTail>,
}

/// Validates segment `seq` (open in `file`, `len` bytes long). `last`: whether it is the newest
/// (only its tail may be torn). Truncates a torn tail.
fn validate(dir: &Path, seq: u64, file: &File, len: u64, last: bool, max: u32) -> Result<Validated, StoreError> {
    let expected = header(seq);
    let mut w = Window::new(file, len);
    let head_len = len.min(HEADER_BYTES) as usize;
    let head = w.get(0, head_len).map_err(io_err("segment read"))?.to_vec();
    // A segment is created, then its header written and synced, before any frame: a last segment
    // holding a prefix of its header, or only zeros in its place, held no frame.
    let torn_header = last
        && len <= HEADER_BYTES
        && ((len < HEADER_BYTES && head[..] == expected[..head_len]) || head.iter().all(|&b| b == 0));
    if torn_header {
        return Ok(Validated {
            end: 0,
            frames: 0,
            torn: Some(TornTail { seq, offset: 0, dropped: len, header: true }),
        });
    }
    if len < HEADER_BYTES {
        return Err(corrupt(dir, seq, 0, " (header)", CodecError::Truncated { len: len as usize }));
    }
    if head[..4] != MAGIC {
        let detail = format!(" (header): bad magic {:02x?}, expected {:02x?}", &head[..4], MAGIC);
        return Err(corrupt(dir, seq, 0, &detail, CodecError::Payload("not a segment header".into())));
    }
    let version = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(StoreError::UnsupportedFormat {
            found: format!("segment log version {version} in {}", dir.join(segment_file_name(seq)).display()),
            expected: "segment log version 1",
        });
    }
    let found_seq = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
    if found_seq != seq {
        let detail = format!(" (header): names segment {found_seq:#x}, not {seq:#x}");
        return Err(corrupt(dir, seq, 8, &detail, CodecError::Payload("segment header names another segment".into())));
    }
    let mut off = HEADER_BYTES;
    let mut frames = 0u64;
    while off < len {
        let check = check_frame(&mut w, off, max).map_err(io_err("segment read"))?;
        let FrameCheck::Valid { len: n } = check else {
            if !last {
                return Err(bad_frame_error(dir, seq, off, &check, " (in an older segment)"));
            }
            if matches!(check, FrameCheck::TooLong { .. }) {
                return Err(bad_frame_error(dir, seq, off, &check, ""));
            }
            if let Some(p) = valid_frame_after(&mut w, off + 1, max).map_err(io_err("segment read"))? {
                let detail = format!(" (a valid frame follows at offset {p})");
                return Err(bad_frame_error(dir, seq, off, &check, &detail));
            }
            return Ok(Validated {
                end: off,
                frames,
                torn: Some(TornTail { seq, offset: off, dropped: len - off, header: false }),
            });
        };
        off += FRAME_OVERHEAD + u64::from(n);
        frames += 1;
    }
    Ok(Validated { end: off, frames, torn: None })
}

impl SegmentLog {
    /// Opens (creating it if missing) the log in `dir`, validating every frame; see the
    /// [module documentation](self) for the torn-tail rule and what is corrupt.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<(SegmentLog, OpenReport), StoreError> {
        if opts.max_segment_bytes <= HEADER_BYTES {
            return Err(StoreError::Backend(format!(
                "segment log: max_segment_bytes {} must exceed the {HEADER_BYTES}-byte header",
                opts.max_segment_bytes
            )));
        }
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(io_err("segment dir create"))?;
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            sync_dir(parent).map_err(io_err("segment dir sync"))?;
        }
        let dir_handle = File::open(dir).map_err(io_err("segment dir open"))?;
        if dir_handle.try_lock_exclusive().is_err() {
            return Err(StoreError::Locked { path: dir.to_path_buf() });
        }
        let mut report = OpenReport::default();
        let mut seqs = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("segment dir list"))? {
            let entry = entry.map_err(io_err("segment dir list"))?;
            let is_file = entry.file_type().map_err(io_err("segment dir list"))?.is_file();
            match entry.file_name().to_str().and_then(parse_segment_name) {
                Some(seq) if is_file => seqs.push(seq),
                _ => report.ignored.push(entry.path()),
            }
        }
        seqs.sort_unstable();
        report.ignored.sort();
        for pair in seqs.windows(2) {
            if pair[1] != pair[0] + 1 {
                return Err(corrupt(
                    dir,
                    pair[0] + 1,
                    0,
                    &format!(" (missing: segments {:#x} and {:#x} exist)", pair[0], pair[1]),
                    CodecError::Truncated { len: 0 },
                ));
            }
        }
        let mut segs = BTreeMap::new();
        for (i, &seq) in seqs.iter().enumerate() {
            let last = i + 1 == seqs.len();
            let path = dir.join(segment_file_name(seq));
            let file = OpenOptions::new().read(true).write(last).open(&path).map_err(io_err("segment open"))?;
            let len = file.metadata().map_err(io_err("segment open"))?.len();
            let v = validate(dir, seq, &file, len, last, opts.max_frame_bytes)?;
            let mut end = v.end;
            if let Some(torn) = v.torn {
                file.set_len(v.end).map_err(io_err("segment truncate"))?;
                if torn.header {
                    file.write_all_at(&header(seq), 0).map_err(io_err("segment header write"))?;
                    end = HEADER_BYTES;
                }
                report.torn_tail = Some(torn);
            }
            file.sync_all().map_err(io_err("segment sync"))?;
            report.frames += v.frames;
            let seg = Seg {
                seq,
                file,
                written: AtomicU64::new(end),
                frames: AtomicU64::new(v.frames),
                synced: AtomicU64::new(end),
            };
            segs.insert(seq, Arc::new(seg));
        }
        dir_handle.sync_all().map_err(io_err("segment dir sync"))?;
        report.segments = segs.len();
        let active = segs.values().next_back().cloned();
        let floor = seqs.first().copied().unwrap_or(1);
        let next_seq = seqs.last().map_or(1, |s| s + 1);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            max_frame_bytes: opts.max_frame_bytes,
            segs: RwLock::new(segs),
            floor: AtomicU64::new(floor),
            poisoned: AtomicBool::new(false),
        });
        Ok((SegmentLog { shared, opts, dir_handle, active, unsynced: Vec::new(), next_seq }, report))
    }

    /// A reader handle for other threads.
    pub fn reader(&self) -> LogReader {
        LogReader { shared: Arc::clone(&self.shared) }
    }

    /// The options the log was opened with.
    pub fn options(&self) -> LogOptions {
        self.opts
    }

    /// Runs a writer step; an I/O error poisons the log.
    fn poisoning<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.shared.check_poison()?;
        let r = f(self);
        self.shared.poison_on_io(r)
    }

    /// Creates segment `next_seq` (header written and synced, directory synced) and makes it active.
    fn rotate(&mut self) -> Result<(), StoreError> {
        let seq = self.next_seq;
        let path = self.shared.dir.join(segment_file_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("segment create"))?;
        file.write_all_at(&header(seq), 0).map_err(io_err("segment header write"))?;
        file.sync_all().map_err(io_err("segment header sync"))?;
        self.dir_handle.sync_all().map_err(io_err("segment dir sync"))?;
        let seg = Arc::new(Seg {
            seq,
            file,
            written: AtomicU64::new(HEADER_BYTES),
            frames: AtomicU64::new(0),
            synced: AtomicU64::new(HEADER_BYTES),
        });
        write_lock(&self.shared.segs).insert(seq, Arc::clone(&seg));
        if let Some(old) = self.active.replace(seg) {
            if old.synced.load(Ordering::SeqCst) < old.written.load(Ordering::SeqCst) {
                self.unsynced.push(old);
            }
        }
        self.next_seq = seq + 1;
        Ok(())
    }

    /// Appends one group's payloads as frames with one write (to a new segment first if the active
    /// one would grow past [`LogOptions::max_segment_bytes`]), returning where each is. Nothing is
    /// durable or readable before [`sync`](Self::sync). A payload over
    /// [`LogOptions::max_frame_bytes`] is refused ([`StoreError::Codec`]) before anything is
    /// written; an I/O error poisons the log.
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<Vec<Loc>, StoreError> {
        self.shared.check_poison()?;
        for p in payloads {
            if p.len() > self.opts.max_frame_bytes as usize {
                return Err(StoreError::Codec(CodecError::TooLarge(p.len())));
            }
        }
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        self.poisoning(|log| {
            let group: u64 = payloads.iter().map(|p| FRAME_OVERHEAD + p.len() as u64).sum();
            let rotate = match &log.active {
                None => true,
                Some(a) => {
                    let written = a.written.load(Ordering::SeqCst);
                    written > HEADER_BYTES && written + group > log.opts.max_segment_bytes
                }
            };
            if rotate {
                log.rotate()?;
            }
            let active = Arc::clone(log.active.as_ref().expect("an active segment after rotation"));
            let start = active.written.load(Ordering::SeqCst);
            let mut buf = Vec::with_capacity(group as usize);
            let mut locs = Vec::with_capacity(payloads.len());
            for p in payloads {
                let len_bytes = (p.len() as u32).to_be_bytes();
                locs.push(Loc { seq: active.seq, offset: start + buf.len() as u64, len: p.len() as u32 });
                buf.extend_from_slice(&len_bytes);
                buf.extend_from_slice(&frame_crc(len_bytes, p).to_be_bytes());
                buf.extend_from_slice(p);
            }
            active.file.write_all_at(&buf, start).map_err(io_err("segment write"))?;
            active.written.store(start + group, Ordering::SeqCst);
            active.frames.fetch_add(payloads.len() as u64, Ordering::SeqCst);
            Ok(locs)
        })
    }

    /// Makes everything appended so far durable (`fdatasync` of every segment rotated away since
    /// the last sync, then of the active one) and visible to readers. An I/O error poisons the log.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.sync_point()?.sync()
    }

    /// Everything appended so far, to be made durable by [`SyncPoint::sync`] on any thread while
    /// this writer goes on appending (the pipelined sync of docs/format3.md). Frames appended after
    /// this call are not covered by it. A sync point dropped without syncing loses nothing: the next
    /// one covers what it would have.
    pub fn sync_point(&mut self) -> Result<SyncPoint, StoreError> {
        self.shared.check_poison()?;
        let behind = |seg: &Arc<Seg>| seg.synced.load(Ordering::SeqCst) < seg.written.load(Ordering::SeqCst);
        self.unsynced.retain(behind);
        let todo = self
            .unsynced
            .iter()
            .chain(self.active.iter())
            .filter(|seg| behind(seg))
            .map(|seg| (Arc::clone(seg), seg.written.load(Ordering::SeqCst)))
            .collect();
        Ok(SyncPoint { shared: Arc::clone(&self.shared), todo })
    }

    /// Deletes every whole segment older than `seq` (never the active one), oldest first, then
    /// `fsync`s the directory; returns how many. A [`Loc`] in a removed segment reads as `None`.
    /// An I/O error poisons the log.
    pub fn remove_segments_below(&mut self, seq: u64) -> Result<usize, StoreError> {
        self.poisoning(|log| {
            let active = log.active.as_ref().map(|a| a.seq);
            let doomed: Vec<u64> =
                read_lock(&log.shared.segs).keys().copied().filter(|&s| s < seq && Some(s) != active).collect();
            for &s in &doomed {
                write_lock(&log.shared.segs).remove(&s);
                log.unsynced.retain(|u| u.seq != s);
                log.shared.floor.store(s + 1, Ordering::SeqCst);
                fs::remove_file(log.shared.dir.join(segment_file_name(s))).map_err(io_err("segment remove"))?;
            }
            if !doomed.is_empty() {
                log.dir_handle.sync_all().map_err(io_err("segment dir sync"))?;
            }
            Ok(doomed.len())
        })
    }

    /// The segments held, oldest first.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        read_lock(&self.shared.segs)
            .values()
            .map(|s| SegmentInfo {
                seq: s.seq,
                bytes: s.written.load(Ordering::SeqCst),
                frames: s.frames.load(Ordering::SeqCst),
            })
            .collect()
    }

    /// Whether an earlier I/O error poisoned the log.
    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::SeqCst)
    }

    /// [`LogReader::read`] through the writer.
    pub fn read(&self, loc: Loc) -> Result<Option<Vec<u8>>, StoreError> {
        self.reader().read(loc)
    }

    /// [`LogReader::scan`] through the writer.
    pub fn scan(&self, f: impl FnMut(Loc, &[u8]) -> ControlFlow<()>) -> Result<(), StoreError> {
        self.reader().scan(f)
    }
}

impl LogReader {
    /// Reads the synced frame at `loc` (`pread`), checking its length and checksum again.
    /// `Ok(None)`: its segment was removed ([`SegmentLog::remove_segments_below`]). A `loc` that
    /// is not a synced frame of a held segment is [`StoreError::Corrupt`]. Read errors do not
    /// poison the log.
    pub fn read(&self, loc: Loc) -> Result<Option<Vec<u8>>, StoreError> {
        self.shared.check_poison()?;
        let dir = &self.shared.dir;
        if loc.seq < self.shared.floor.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let seg = read_lock(&self.shared.segs).get(&loc.seq).cloned();
        let Some(seg) = seg else {
            // Removed between the floor check and now, or never written.
            if loc.seq < self.shared.floor.load(Ordering::SeqCst) {
                return Ok(None);
            }
            return Err(corrupt(dir, loc.seq, loc.offset, " (no such segment)", CodecError::Truncated { len: 0 }));
        };
        let synced = seg.synced.load(Ordering::SeqCst);
        let end = loc.offset.checked_add(FRAME_OVERHEAD + u64::from(loc.len));
        if loc.offset < HEADER_BYTES || loc.len > self.shared.max_frame_bytes || end.is_none_or(|e| e > synced) {
            let present = synced.saturating_sub(loc.offset.saturating_add(FRAME_OVERHEAD)) as usize;
            return Err(corrupt(
                dir,
                loc.seq,
                loc.offset,
                " (no synced frame of that length there)",
                CodecError::LengthMismatch { declared: loc.len as usize, actual: present },
            ));
        }
        let mut buf = vec![0u8; (FRAME_OVERHEAD + u64::from(loc.len)) as usize];
        seg.file.read_exact_at(&mut buf, loc.offset).map_err(io_err("segment read"))?;
        let len_bytes: [u8; 4] = buf[..4].try_into().expect("4 bytes");
        let stored_len = u32::from_be_bytes(len_bytes);
        let stored = u32::from_be_bytes(buf[4..8].try_into().expect("4 bytes"));
        if stored_len != loc.len {
            return Err(corrupt(
                dir,
                loc.seq,
                loc.offset,
                "",
                CodecError::LengthMismatch { declared: stored_len as usize, actual: loc.len as usize },
            ));
        }
        let computed = frame_crc(len_bytes, &buf[8..]);
        if computed != stored {
            return Err(corrupt(dir, loc.seq, loc.offset, "", CodecError::Checksum { stored, computed }));
        }
        buf.drain(..FRAME_OVERHEAD as usize);
        Ok(Some(buf))
    }

    /// Calls `f` with every synced frame in (seq, offset) order, checking each checksum again,
    /// until `f` breaks. A frame that fails its checks now is [`StoreError::Corrupt`].
    pub fn scan(&self, mut f: impl FnMut(Loc, &[u8]) -> ControlFlow<()>) -> Result<(), StoreError> {
        self.shared.check_poison()?;
        let segs: Vec<Arc<Seg>> = read_lock(&self.shared.segs).values().cloned().collect();
        let max = self.shared.max_frame_bytes;
        for seg in segs {
            let end = seg.synced.load(Ordering::SeqCst);
            let mut w = Window::new(&seg.file, end);
            let mut off = HEADER_BYTES;
            while off < end {
                let check = check_frame(&mut w, off, max).map_err(io_err("segment read"))?;
                let FrameCheck::Valid { len } = check else {
                    return Err(bad_frame_error(&self.shared.dir, seg.seq, off, &check, " (changed since open)"));
                };
                let payload = w.get(off + FRAME_OVERHEAD, len as usize).map_err(io_err("segment read"))?;
                if f(Loc { seq: seg.seq, offset: off, len }, payload).is_break() {
                    return Ok(());
                }
                off += FRAME_OVERHEAD + u64::from(len);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

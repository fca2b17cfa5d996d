//! Unit tests of the segment log (the process tests are in `tests/segment_log.rs`).

use super::*;
use std::io::ErrorKind;

/// A deterministic payload for index `i`: 1 to 300 bytes, starting with `i`.
fn payload(i: u64) -> Vec<u8> {
    let len = 8 + (i.wrapping_mul(7919) % 293) as usize;
    let mut v = i.to_be_bytes().to_vec();
    v.extend((0..len - 8).map(|k| (i as u8).wrapping_mul(31).wrapping_add(k as u8)));
    v
}

fn opts(max_segment_bytes: u64) -> LogOptions {
    LogOptions { max_segment_bytes, max_frame_bytes: 4096 }
}

/// Appends `groups` groups of `per` payloads starting at index `from`, syncing after each.
fn fill(log: &mut SegmentLog, from: u64, groups: u64, per: u64) -> Vec<(Loc, Vec<u8>)> {
    let mut out = Vec::new();
    for g in 0..groups {
        let ps: Vec<Vec<u8>> = (0..per).map(|k| payload(from + g * per + k)).collect();
        let refs: Vec<&[u8]> = ps.iter().map(|p| p.as_slice()).collect();
        let locs = log.append(&refs).unwrap();
        log.sync().unwrap();
        out.extend(locs.into_iter().zip(ps));
    }
    out
}

fn scan_all(log: &SegmentLog) -> Vec<(Loc, Vec<u8>)> {
    let mut v = Vec::new();
    log.scan(|loc, p| {
        v.push((loc, p.to_vec()));
        ControlFlow::Continue(())
    })
    .unwrap();
    v
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(segment_file_name(seq))
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).unwrap().len()
}

/// Every file of `dir` with its bytes (to check that nothing was truncated or deleted).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), fs::read(&p).unwrap())).collect()
}

fn flip(p: &Path, at: u64) {
    let mut b = fs::read(p).unwrap();
    b[at as usize] ^= 0x40;
    fs::write(p, b).unwrap();
}

fn corrupt_what(e: StoreError) -> (String, CodecError) {
    match e {
        StoreError::Corrupt { what, source } => (what, source),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn round_trip_across_reopen_reads_every_loc_in_scan_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let (mut log, report) = SegmentLog::open(&path, opts(4096)).unwrap();
    assert_eq!(report, OpenReport::default());
    assert!(log.segments().is_empty());
    let written = fill(&mut log, 0, 40, 3);
    assert!(log.segments().len() > 3, "rotated: {:?}", log.segments());
    for (loc, p) in &written {
        assert_eq!(log.read(*loc).unwrap().as_deref(), Some(p.as_slice()));
    }
    assert_eq!(scan_all(&log), written);
    let infos = log.segments();
    drop(log);

    let (mut log, report) = SegmentLog::open(&path, opts(4096)).unwrap();
    assert_eq!(report.segments, infos.len());
    assert_eq!(report.frames, 120);
    assert_eq!(report.torn_tail, None);
    assert!(report.ignored.is_empty());
    assert_eq!(log.segments(), infos);
    assert_eq!(scan_all(&log), written);
    let reader = log.reader();
    let handle = {
        let reader = reader.clone();
        let written = written.clone();
        std::thread::spawn(move || {
            for (loc, p) in &written {
                assert_eq!(reader.read(*loc).unwrap().as_deref(), Some(p.as_slice()));
            }
        })
    };
    let more = fill(&mut log, 120, 5, 2);
    handle.join().unwrap();
    for (loc, p) in written.iter().chain(&more) {
        assert_eq!(reader.read(*loc).unwrap().as_deref(), Some(p.as_slice()));
    }
    // Scan order is (seq, offset) order, and `break` stops it.
    let all = scan_all(&log);
    assert!(all.windows(2).all(|w| (w[0].0.seq, w[0].0.offset) < (w[1].0.seq, w[1].0.offset)));
    let mut n = 0;
    log.scan(|_, _| {
        n += 1;
        if n == 7 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .unwrap();
    assert_eq!(n, 7);
}

#[test]
fn appended_frames_are_invisible_to_readers_until_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    let first = fill(&mut log, 0, 1, 2);
    let p = payload(9);
    let locs = log.append(&[&p]).unwrap();
    assert_eq!(scan_all(&log), first);
    assert!(matches!(log.read(locs[0]), Err(StoreError::Corrupt { .. })));
    log.sync().unwrap();
    assert_eq!(log.read(locs[0]).unwrap(), Some(p));
    assert_eq!(scan_all(&log).len(), 3);
}

#[test]
fn rotation_happens_exactly_at_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let a = vec![1u8; 100];
    // Header 16 + two frames of 108 = 232: exactly the limit, so both fit in segment 1.
    let (mut log, _) = SegmentLog::open(dir.path(), opts(232)).unwrap();
    let l1 = log.append(&[&a]).unwrap();
    let l2 = log.append(&[&a]).unwrap();
    assert_eq!((l1[0].seq, l2[0].seq), (1, 1));
    assert_eq!(l2[0].offset, 16 + 108);
    // One more byte would exceed it: a new segment.
    let l3 = log.append(&[&[7u8]]).unwrap();
    assert_eq!(l3[0], Loc { seq: 2, offset: 16, len: 1 });
    // A group larger than the limit goes whole into a segment only if that segment is empty.
    let big: Vec<&[u8]> = vec![&a, &a, &a];
    let l4 = log.append(&big).unwrap();
    assert!(l4.iter().all(|l| l.seq == 3));
    let l5 = log.append(&[&a]).unwrap();
    assert_eq!(l5[0].seq, 4);
    log.sync().unwrap();
    let infos = log.segments();
    assert_eq!(
        infos.iter().map(|s| (s.seq, s.bytes, s.frames)).collect::<Vec<_>>(),
        vec![(1, 232, 2), (2, 16 + 9, 1), (3, 16 + 3 * 108, 3), (4, 16 + 108, 1)]
    );
    for s in &infos {
        assert_eq!(file_len(&seg_path(dir.path(), s.seq)), s.bytes);
    }
    // The rotated-away segments were synced by the one `sync` (readers see them all).
    assert_eq!(scan_all(&log).len(), 7);
}

#[test]
fn a_payload_over_the_limit_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    fill(&mut log, 0, 1, 1);
    let before = snapshot(dir.path());
    let big = vec![0u8; 4097];
    let ok = vec![0u8; 4096];
    let err = log.append(&[&ok, &big]).unwrap_err();
    assert!(matches!(err, StoreError::Codec(CodecError::TooLarge(4097))), "{err:?}");
    assert!(!log.is_poisoned());
    assert_eq!(snapshot(dir.path()), before);
    assert_eq!(log.append(&[&ok]).unwrap()[0].len, 4096);
    assert!(log.append(&[]).unwrap().is_empty());
}

#[test]
fn remove_segments_below_deletes_whole_older_segments_never_the_active_one() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(600)).unwrap();
    let written = fill(&mut log, 0, 30, 2);
    let last = log.segments().last().unwrap().seq;
    assert!(last >= 5);
    assert_eq!(log.remove_segments_below(3).unwrap(), 2);
    assert!(!seg_path(dir.path(), 1).exists() && !seg_path(dir.path(), 2).exists());
    assert!(seg_path(dir.path(), 3).exists());
    for (loc, p) in &written {
        let got = log.read(*loc).unwrap();
        if loc.seq < 3 {
            assert_eq!(got, None);
        } else {
            assert_eq!(got.as_deref(), Some(p.as_slice()));
        }
    }
    let kept: Vec<_> = written.iter().filter(|(l, _)| l.seq >= 3).cloned().collect();
    assert_eq!(scan_all(&log), kept);
    // Asking for everything removes all but the active segment.
    assert_eq!(log.remove_segments_below(u64::MAX).unwrap() as u64, last - 3);
    assert_eq!(log.segments().iter().map(|s| s.seq).collect::<Vec<_>>(), vec![last]);
    assert_eq!(log.remove_segments_below(u64::MAX).unwrap(), 0);
    drop(log);
    let (log, report) = SegmentLog::open(dir.path(), opts(600)).unwrap();
    assert_eq!(report.segments, 1);
    let kept: Vec<_> = written.iter().filter(|(l, _)| l.seq == last).cloned().collect();
    assert_eq!(scan_all(&log), kept);
    assert_eq!(log.read(written[0].0).unwrap(), None);
}

/// A log of two segments whose last frame (in segment 2) is `last_len` payload bytes; returns the
/// directory, the frames and where the last frame starts.
fn two_segments(dir: &Path, last_len: usize) -> (Vec<(Loc, Vec<u8>)>, u64) {
    let (mut log, _) = SegmentLog::open(dir, opts(400)).unwrap();
    let mut written = Vec::new();
    // Single frames (24 to 120 bytes) until one lands in segment 2.
    while written.last().is_none_or(|(l, _): &(Loc, Vec<u8>)| l.seq < 2) {
        written.extend(fill(&mut log, written.len() as u64, 1, 1));
    }
    let last = vec![0x5a; last_len];
    let loc = log.append(&[&last]).unwrap()[0];
    log.sync().unwrap();
    assert!(loc.seq >= 2 && loc.offset > HEADER_BYTES, "{loc:?}");
    written.push((loc, last));
    (written, loc.offset)
}

#[test]
fn a_torn_last_frame_of_every_length_is_truncated_to_the_last_whole_frame() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let (written, start) = two_segments(&base, 20);
    let whole = start + FRAME_OVERHEAD + 20;
    let last_seq = written.last().unwrap().0.seq;
    for cut in start + 1..whole {
        let d = dir.path().join(format!("cut{cut}"));
        fs::create_dir(&d).unwrap();
        for e in fs::read_dir(&base).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        let f = OpenOptions::new().write(true).open(seg_path(&d, last_seq)).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let (mut log, report) = SegmentLog::open(&d, opts(400)).unwrap();
        assert_eq!(
            report.torn_tail,
            Some(TornTail { seq: last_seq, offset: start, dropped: cut - start, header: false }),
            "cut at {cut}"
        );
        assert_eq!(file_len(&seg_path(&d, last_seq)), start, "cut at {cut}");
        assert_eq!(scan_all(&log), written[..written.len() - 1], "cut at {cut}");
        // Appends after the truncation work and survive a reopen.
        let more = fill(&mut log, 100, 2, 2);
        drop(log);
        let (log, report) = SegmentLog::open(&d, opts(400)).unwrap();
        assert_eq!(report.torn_tail, None);
        let mut expect = written[..written.len() - 1].to_vec();
        expect.extend(more);
        assert_eq!(scan_all(&log), expect, "cut at {cut}");
    }
}

#[test]
fn a_zeroed_or_garbled_tail_with_nothing_valid_after_it_is_torn() {
    let dir = tempfile::tempdir().unwrap();
    let (written, start) = two_segments(dir.path(), 20);
    let last = seg_path(dir.path(), written.last().unwrap().0.seq);
    // The last frame's bytes zeroed (a file extended before its data reached the disk).
    let mut b = fs::read(&last).unwrap();
    b[start as usize..].fill(0);
    fs::write(&last, &b).unwrap();
    let (_, report) = SegmentLog::open(dir.path(), opts(400)).unwrap();
    assert_eq!(report.torn_tail.map(|t| (t.offset, t.dropped)), Some((start, 28)));
    assert_eq!(file_len(&last), start);
}

#[test]
fn a_torn_header_of_a_fresh_last_segment_of_every_length_is_reinitialised() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let (mut log, _) = SegmentLog::open(&base, opts(400)).unwrap();
    let written = fill(&mut log, 0, 4, 2);
    drop(log);
    let next = written.last().unwrap().0.seq + 1;
    let mut cases: Vec<Vec<u8>> = (0..HEADER_BYTES as usize).map(|n| header(next)[..n].to_vec()).collect();
    cases.push(vec![0; HEADER_BYTES as usize]);
    cases.push(vec![0; 5]);
    for (i, bytes) in cases.iter().enumerate() {
        let d = dir.path().join(format!("case{i}"));
        fs::create_dir(&d).unwrap();
        for e in fs::read_dir(&base).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        fs::write(seg_path(&d, next), bytes).unwrap();
        let (mut log, report) = SegmentLog::open(&d, opts(400)).unwrap();
        assert_eq!(
            report.torn_tail,
            Some(TornTail { seq: next, offset: 0, dropped: bytes.len() as u64, header: true }),
            "case {i}"
        );
        assert_eq!(fs::read(seg_path(&d, next)).unwrap(), header(next), "case {i}");
        assert_eq!(scan_all(&log), written, "case {i}");
        // The re-initialised segment is empty: a group over the size limit still goes into it.
        let big = [0x11u8; 500];
        let locs = log.append(&[&big, b"after"]).unwrap();
        log.sync().unwrap();
        assert_eq!(locs[0], Loc { seq: next, offset: HEADER_BYTES, len: 500 }, "case {i}");
        let loc = locs[1];
        assert_eq!(loc, Loc { seq: next, offset: HEADER_BYTES + 508, len: 5 }, "case {i}");
        drop(log);
        let (log, report) = SegmentLog::open(&d, opts(400)).unwrap();
        assert_eq!(report.torn_tail, None);
        assert_eq!(log.read(loc).unwrap().as_deref(), Some(&b"after"[..]));
    }
}

/// Opens `dir`, expecting `Corrupt` naming `seq` and `offset`, with nothing changed on disk.
fn expect_corrupt(dir: &Path, seq: u64, offset: u64) -> (String, CodecError) {
    let before = snapshot(dir);
    let err = SegmentLog::open(dir, opts(400)).unwrap_err();
    let (what, source) = corrupt_what(err);
    assert!(what.contains(&segment_file_name(seq)), "{what}");
    assert!(what.contains(&format!("at offset {offset}")), "{what}");
    assert_eq!(snapshot(dir), before, "nothing truncated or deleted");
    (what, source)
}

/// Two segments as [`two_segments`] makes them; the last segment's seq and its first frame, which
/// valid frames follow.
fn first_frame_of_last_segment(dir: &Path) -> (u64, Loc) {
    let (written, _) = two_segments(dir, 20);
    let last_seq = written.last().unwrap().0.seq;
    (last_seq, written.iter().find(|(l, _)| l.seq == last_seq).unwrap().0)
}

#[test]
fn a_flipped_byte_in_a_middle_frame_of_the_last_segment_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (last_seq, middle) = first_frame_of_last_segment(dir.path());
    flip(&seg_path(dir.path(), last_seq), middle.offset + FRAME_OVERHEAD + 3);
    let (what, source) = expect_corrupt(dir.path(), last_seq, middle.offset);
    assert!(matches!(source, CodecError::Checksum { .. }), "{source:?}");
    assert!(what.contains("a valid frame follows"), "{what}");
}

#[test]
fn a_flipped_length_of_a_middle_frame_is_corrupt_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (last_seq, middle) = first_frame_of_last_segment(dir.path());
    // A length past the end of the file but under the frame limit: it looks like a partial frame,
    // but valid frames follow it.
    let p = seg_path(dir.path(), last_seq);
    let mut b = fs::read(&p).unwrap();
    assert!(b.len() < 4000);
    b[middle.offset as usize..middle.offset as usize + 4].copy_from_slice(&4000u32.to_be_bytes());
    fs::write(&p, b).unwrap();
    let (what, source) = expect_corrupt(dir.path(), last_seq, middle.offset);
    assert!(matches!(source, CodecError::LengthMismatch { declared: 4000, .. }), "{source:?}");
    assert!(what.contains("a valid frame follows"), "{what}");
}

#[test]
fn a_flipped_byte_in_an_older_segment_is_corrupt_even_in_its_last_frame() {
    let dir = tempfile::tempdir().unwrap();
    let (written, _) = two_segments(dir.path(), 20);
    let last_of_1 = written.iter().rfind(|(l, _)| l.seq == 1).unwrap().0;
    flip(&seg_path(dir.path(), 1), last_of_1.offset + FRAME_OVERHEAD + last_of_1.len as u64 - 1);
    let (what, source) = expect_corrupt(dir.path(), 1, last_of_1.offset);
    assert!(matches!(source, CodecError::Checksum { .. }), "{source:?}");
    assert!(what.contains("older segment"), "{what}");
    // A truncated older segment is corrupt too.
    let p = seg_path(dir.path(), 1);
    let mut b = fs::read(&p).unwrap();
    b[(last_of_1.offset + FRAME_OVERHEAD + last_of_1.len as u64 - 1) as usize] ^= 0x40;
    b.truncate(b.len() - 1);
    fs::write(&p, b).unwrap();
    let (_, source) = expect_corrupt(dir.path(), 1, last_of_1.offset);
    assert!(matches!(source, CodecError::LengthMismatch { .. }), "{source:?}");
}

#[test]
fn a_bad_header_is_corrupt() {
    for (at, what) in [(0u64, "bad magic"), (9, "names segment")] {
        let dir = tempfile::tempdir().unwrap();
        two_segments(dir.path(), 20);
        flip(&seg_path(dir.path(), 1), at);
        let (msg, _) = expect_corrupt(dir.path(), 1, if at == 0 { 0 } else { 8 });
        assert!(msg.contains(what), "{msg}");
        // The last segment's header too (it holds frames: not a torn header).
        let dir = tempfile::tempdir().unwrap();
        let (written, _) = two_segments(dir.path(), 20);
        let last = written.last().unwrap().0.seq;
        flip(&seg_path(dir.path(), last), at);
        expect_corrupt(dir.path(), last, if at == 0 { 0 } else { 8 });
    }
    // A header of a newer format version.
    let dir = tempfile::tempdir().unwrap();
    two_segments(dir.path(), 20);
    flip(&seg_path(dir.path(), 1), 7);
    let err = SegmentLog::open(dir.path(), opts(400)).unwrap_err();
    assert!(matches!(err, StoreError::UnsupportedFormat { ref found, .. } if found.contains("version 65")), "{err:?}");
    // A garbled partial header of the last segment is not torn: corrupt.
    let dir = tempfile::tempdir().unwrap();
    let (written, _) = two_segments(dir.path(), 20);
    let next = written.last().unwrap().0.seq + 1;
    fs::write(seg_path(dir.path(), next), b"TWxx").unwrap();
    expect_corrupt(dir.path(), next, 0);
}

#[test]
fn an_absurd_length_is_corrupt_without_a_giant_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let (written, start) = two_segments(dir.path(), 20);
    let last = written.last().unwrap().0.seq;
    let p = seg_path(dir.path(), last);
    let mut b = fs::read(&p).unwrap();
    // The last frame's length: 0xffff_fff0 (its CRC no longer matters).
    b[start as usize..start as usize + 4].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    fs::write(&p, b).unwrap();
    let (_, source) = expect_corrupt(dir.path(), last, start);
    assert_eq!(source, CodecError::TooLarge(0xffff_fff0));
}

#[test]
fn a_missing_middle_segment_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    two_segments(dir.path(), 20);
    let (mut log, _) = SegmentLog::open(dir.path(), opts(400)).unwrap();
    assert_eq!(log.append(&[&[1u8; 390]]).unwrap()[0].seq, 3);
    log.sync().unwrap();
    drop(log);
    fs::remove_file(seg_path(dir.path(), 2)).unwrap();
    let (what, _) = expect_corrupt(dir.path(), 2, 0);
    assert!(what.contains("missing"), "{what}");
}

#[test]
fn other_files_are_reported_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (written, _) = two_segments(dir.path(), 20);
    fs::write(dir.path().join("README"), b"x").unwrap();
    fs::write(dir.path().join("000000000000000A.seg"), b"upper").unwrap();
    fs::create_dir(dir.path().join("0000000000000099.seg")).unwrap();
    let (log, report) = SegmentLog::open(dir.path(), opts(400)).unwrap();
    assert_eq!(report.ignored.len(), 3, "{:?}", report.ignored);
    assert_eq!(scan_all(&log), written);
    assert_eq!(fs::read(dir.path().join("README")).unwrap(), b"x");
    assert_eq!(fs::read(dir.path().join("000000000000000A.seg")).unwrap(), b"upper");
}

#[test]
fn a_second_open_of_the_same_directory_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = SegmentLog::open(dir.path(), opts(400)).unwrap();
    let err = SegmentLog::open(dir.path(), opts(400)).unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    drop(log);
    SegmentLog::open(dir.path(), opts(400)).unwrap();
}

/// Replaces the active segment's file handle (same seq and counters) with `file`.
fn swap_active_file(log: &mut SegmentLog, file: File) {
    let old = log.active.clone().unwrap();
    let seg = Arc::new(Seg {
        seq: old.seq,
        file,
        written: AtomicU64::new(old.written.load(Ordering::SeqCst)),
        frames: AtomicU64::new(old.frames.load(Ordering::SeqCst)),
        synced: AtomicU64::new(old.synced.load(Ordering::SeqCst)),
    });
    write_lock(&log.shared.segs).insert(old.seq, Arc::clone(&seg));
    log.active = Some(seg);
}

fn assert_poisoned(log: &mut SegmentLog, loc: Loc) {
    assert!(log.is_poisoned());
    assert!(matches!(log.append(&[b"x"]), Err(StoreError::Poisoned)));
    assert!(matches!(log.sync(), Err(StoreError::Poisoned)));
    assert!(matches!(log.remove_segments_below(u64::MAX), Err(StoreError::Poisoned)));
    assert!(matches!(log.read(loc), Err(StoreError::Poisoned)));
    assert!(matches!(log.scan(|_, _| ControlFlow::Continue(())), Err(StoreError::Poisoned)));
}

#[test]
fn a_failed_write_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    let written = fill(&mut log, 0, 2, 2);
    // /dev/full: every write fails with ENOSPC.
    swap_active_file(&mut log, OpenOptions::new().write(true).open("/dev/full").unwrap());
    let err = log.append(&[b"lost"]).unwrap_err();
    match &err {
        StoreError::Io { op, source } => {
            assert_eq!(*op, "segment write");
            assert_eq!(source.kind(), ErrorKind::StorageFull);
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("segment write"), "{err}");
    assert_poisoned(&mut log, written[0].0);
    drop(log);
    let (log, _) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    assert_eq!(scan_all(&log), written);
}

/// Makes an unsynced frame's `fdatasync` fail, syncs with `sync`, and checks that it failed and
/// poisoned the log.
fn assert_a_failed_sync_poisons(sync: impl FnOnce(&mut SegmentLog) -> Result<(), StoreError>) {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    let written = fill(&mut log, 0, 2, 2);
    append_unsynced(&mut log, 10, 1);
    // fdatasync of a character device fails (EINVAL).
    swap_active_file(&mut log, OpenOptions::new().write(true).open("/dev/full").unwrap());
    let err = sync(&mut log).unwrap_err();
    assert!(matches!(err, StoreError::Io { op: "segment sync", .. }), "{err:?}");
    assert_poisoned(&mut log, written[0].0);
}

#[test]
fn a_failed_sync_poisons_the_log() {
    assert_a_failed_sync_poisons(|log| log.sync());
}

#[test]
fn a_failed_rotation_poisons_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(200)).unwrap();
    let written = fill(&mut log, 0, 1, 1);
    // The next segment's name is taken: O_EXCL refuses it.
    fs::write(seg_path(dir.path(), 2), b"someone else's").unwrap();
    let err = log.append(&[&[0u8; 190]]).unwrap_err();
    assert!(
        matches!(&err, StoreError::Io { op: "segment create", source } if source.kind() == ErrorKind::AlreadyExists),
        "{err:?}"
    );
    assert_poisoned(&mut log, written[0].0);
    assert_eq!(fs::read(seg_path(dir.path(), 2)).unwrap(), b"someone else's");
}

#[test]
fn read_and_scan_check_frames_again() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    let written = fill(&mut log, 0, 3, 2);
    let (loc, _) = written[3];
    // Corrupted under the open log (a bad disk): the next read of that frame says so.
    flip(&seg_path(dir.path(), loc.seq), loc.offset + FRAME_OVERHEAD);
    let (what, source) = corrupt_what(log.read(loc).unwrap_err());
    assert!(matches!(source, CodecError::Checksum { .. }), "{source:?}");
    assert!(what.contains(&format!("{} at offset {}", segment_file_name(loc.seq), loc.offset)), "{what}");
    let (what, _) = corrupt_what(log.scan(|_, _| ControlFlow::Continue(())).unwrap_err());
    assert!(what.contains(&format!("at offset {}", loc.offset)), "{what}");
    // Other frames still read; a Loc with the wrong length, or past the end, is refused.
    assert_eq!(log.read(written[2].0).unwrap().as_deref(), Some(written[2].1.as_slice()));
    let wrong = Loc { len: written[2].0.len + 1, ..written[2].0 };
    assert!(matches!(log.read(wrong), Err(StoreError::Corrupt { .. })));
    let past = Loc { offset: 1 << 30, ..written[2].0 };
    assert!(matches!(log.read(past), Err(StoreError::Corrupt { .. })));
    assert!(!log.is_poisoned());
}

/// Appends one group of payloads `from..from + n` without syncing.
fn append_unsynced(log: &mut SegmentLog, from: u64, n: u64) -> Vec<(Loc, Vec<u8>)> {
    let ps: Vec<Vec<u8>> = (from..from + n).map(payload).collect();
    let refs: Vec<&[u8]> = ps.iter().map(|p| p.as_slice()).collect();
    log.append(&refs).unwrap().into_iter().zip(ps).collect()
}

#[test]
fn a_sync_point_syncs_on_another_thread_while_the_writer_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    let mut durable = fill(&mut log, 0, 2, 2);
    let first = append_unsynced(&mut log, 10, 3);
    let point = log.sync_point().unwrap();
    // The writer goes on: the next group is appended before the first one is durable.
    let second = append_unsynced(&mut log, 20, 2);
    assert_eq!(scan_all(&log), durable, "nothing unsynced is visible");
    std::thread::scope(|s| s.spawn(move || point.sync()).join().unwrap()).unwrap();
    durable.extend(first);
    assert_eq!(scan_all(&log), durable, "the point covers the first group, not the second");
    log.sync().unwrap();
    durable.extend(second);
    assert_eq!(scan_all(&log), durable);
    drop(log);
    let (log, report) = SegmentLog::open(dir.path(), opts(1 << 20)).unwrap();
    assert!(report.torn_tail.is_none());
    assert_eq!(scan_all(&log), durable);
}

#[test]
fn a_dropped_sync_point_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments: the groups below rotate, leaving an unsynced segment behind the active one.
    let (mut log, _) = SegmentLog::open(dir.path(), opts(300)).unwrap();
    let mut written = Vec::new();
    for g in 0..4 {
        written.extend(append_unsynced(&mut log, g * 2, 2));
    }
    assert!(log.segments().len() >= 2, "rotated: {:?}", log.segments());
    drop(log.sync_point().unwrap());
    log.sync().unwrap();
    assert_eq!(scan_all(&log), written, "the next sync covers what the dropped point would have");
}

#[test]
fn sync_points_on_several_threads_leave_every_acknowledged_group_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = SegmentLog::open(dir.path(), opts(2_000)).unwrap();
    let reader = log.reader();
    let mut acked = Vec::new();
    std::thread::scope(|s| {
        let mut pending = Vec::new();
        for g in 0..40 {
            let group = append_unsynced(&mut log, g * 3, 3);
            let point = log.sync_point().unwrap();
            pending.push((s.spawn(move || point.sync()), group));
            // At most two points in flight, as a pipelined committer would have.
            if pending.len() == 2 {
                let (done, group) = pending.remove(0);
                done.join().unwrap().unwrap();
                for (loc, p) in group {
                    assert_eq!(reader.read(loc).unwrap().as_deref(), Some(p.as_slice()), "acknowledged, so readable");
                    acked.push((loc, p));
                }
            }
        }
        for (done, group) in pending {
            done.join().unwrap().unwrap();
            acked.extend(group);
        }
    });
    assert_eq!(scan_all(&log), acked);
}

#[test]
fn a_failed_sync_point_poisons_the_log() {
    assert_a_failed_sync_poisons(|log| {
        let point = log.sync_point()?;
        std::thread::scope(|s| s.spawn(move || point.sync()).join().unwrap())
    });
}

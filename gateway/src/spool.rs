//! The local append-only spool for usage events that cannot reach Redis.
//!
//! When Redis is slow or down, the publisher moves events here and re-publishes them, oldest
//! first and with their original ids, once it is back; a gateway that restarts re-publishes
//! whatever its spool still holds. The aggregator dedupes by id, so wherever the spool has to
//! choose, it reads an event twice rather than lose it.
//!
//! On disk, `dir` holds segment files `events-<seq as 20 digits>.spool` and a `position` file.
//! A segment is a run of records `len: u32 LE | crc32(payload): u32 LE | payload`, the payload
//! being `shared::encode(event)`. Records go to the newest segment until it holds
//! `segment_bytes`, then to a new one, so consumed events are reclaimed a whole file at a time.
//! `position` holds `<seq> <offset>`, the first unconsumed byte. It is replaced by rename, so it
//! is always the old or the new position, never half of one, and it moves past a segment before
//! that segment is deleted, so a crash in between leaves files the next open knows are consumed.
//!
//! `append` returns once the bytes are written to the file and, by default (`sync`), fsynced:
//! one flush per call, however many events it carries, so the publisher's batching amortises it.
//! Position updates and new or deleted segment files are fsynced too (the directory as well), so
//! neither a process crash nor a host crash loses a spooled event or resurrects a consumed one.
//! Without `sync` only a process crash is covered: what sits in the page cache dies with the host. `open` checks every pending record's
//! CRC and decoding: damage in the middle is skipped by resynchronising at the next intact
//! record, and damage at the end of the newest segment is an interrupted append, which is cut off
//! so that new records follow intact ones.
//!
//! Only the publisher task owns a `Spool`, so nothing here locks. Calls block on `std::fs` (an
//! fsync takes milliseconds); the publisher hands its worker thread's other tasks elsewhere first.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use shared::UsageEvent;

/// Bytes before each payload: its length and its CRC32.
const HEADER: usize = 8;
/// The largest payload a resync accepts as the next intact record after damage. Events are a
/// few hundred bytes; the bound keeps a scan through garbage cheap, and bigger records still read
/// normally wherever the framing is intact.
const MAX_RESYNC_PAYLOAD: usize = 1 << 20;
const POSITION: &str = "position";
const POSITION_TMP: &str = "position.tmp";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// A segment takes no more records once it holds this many bytes.
    pub segment_bytes: u64,
    /// Whether appends and position updates are fsynced. Without it the spool survives a process
    /// crash; with it (the default), also a host crash or power loss, at the price of a disk
    /// flush per call (BENCHMARKS.md).
    pub sync: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_bytes: 16 << 20,
            sync: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool I/O failed on {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("a usage event encodes to {0} bytes, too many for one spool record")]
    EventTooLarge(usize),
    #[error("cannot consume {requested} spooled events: only {pending} are pending")]
    ConsumeBeyondEnd { requested: usize, pending: u64 },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    seq: u64,
    offset: u64,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    /// Bytes of the file that belong to the spool. The file is longer only after a failed write
    /// whose partial record could not be cut off again.
    size: u64,
    /// Intact records not yet consumed.
    pending: u64,
    /// Damaged byte ranges that reads jump over.
    damaged: Vec<Range<u64>>,
}

#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    options: SpoolOptions,
    /// Oldest first: reads start in the front segment, appends go to the back one.
    segments: VecDeque<Segment>,
    /// The first unconsumed byte: in the front segment, or `(next_seq, 0)` when there is none.
    read: Position,
    /// The back segment, opened for appending on first use.
    writer: Option<File>,
    /// False once a failed write left bytes we could not cut off: the next append starts a new
    /// segment rather than write after them.
    back_writable: bool,
    next_seq: u64,
    /// Where each record returned by the last `peek` ends, so `consume` need not read it again.
    peeked: Vec<Position>,
    /// Consumed segments whose files still have to be deleted.
    doomed: Vec<u64>,
    skipped: u64,
    /// fsyncs of files and the directory since `open`, for /metrics.
    syncs: u64,
}

impl Spool {
    /// Opens (creating `dir` if needed) and recovers whatever a previous process left: complete
    /// records are kept; a torn record at the tail of the last segment (crash mid-append) is cut
    /// off.
    pub fn open_with(dir: &Path, options: SpoolOptions) -> Result<Spool, SpoolError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let seqs = list_segments(dir)?;
        let newest = seqs.last().copied();
        let mut spool = Spool {
            dir: dir.to_owned(),
            options,
            segments: VecDeque::new(),
            read: Position { seq: 0, offset: 0 },
            writer: None,
            back_writable: false,
            next_seq: 0,
            peeked: Vec::new(),
            doomed: Vec::new(),
            skipped: 0,
            syncs: 0,
        };

        // Any doubt about the saved position resolves to reading from the oldest segment: that
        // re-publishes events, which the aggregator dedupes, where trusting it could lose them.
        let mut loaded = None;
        let start = match read_position(dir)? {
            Some(p) if seqs.contains(&p.seq) => {
                let (mut segment, pending_after) =
                    spool.load(p.seq, p.offset, Some(p.seq) == newest)?;
                let start = match pending_after {
                    Some(pending) => {
                        segment.pending = pending;
                        Some(p)
                    }
                    None => {
                        tracing::warn!(
                            seq = p.seq,
                            offset = p.offset,
                            "spool read position is not at a record boundary; re-reading the spool"
                        );
                        None
                    }
                };
                loaded = Some(segment);
                start
            }
            // Everything on disk is older than the position: a previous process consumed it and
            // stopped before deleting the files.
            Some(p) if p.offset == 0 && newest.is_none_or(|n| p.seq > n) => Some(p),
            Some(p) => {
                tracing::warn!(
                    seq = p.seq,
                    offset = p.offset,
                    "spool read position names no spooled data; re-reading the whole spool"
                );
                None
            }
            None if !seqs.is_empty() => {
                tracing::warn!(
                    segments = seqs.len(),
                    "no spool read position; re-reading the whole spool"
                );
                None
            }
            None => None,
        };
        spool.read = start.unwrap_or(Position {
            seq: seqs.first().copied().unwrap_or(0),
            offset: 0,
        });

        for &seq in &seqs {
            if seq < spool.read.seq {
                spool.doomed.push(seq);
                continue;
            }
            let segment = match loaded.take_if(|s| s.seq == seq) {
                Some(segment) => segment,
                None => spool.load(seq, 0, Some(seq) == newest)?.0,
            };
            let from = if seq == spool.read.seq {
                spool.read.offset
            } else {
                0
            };
            for range in segment.damaged.iter().filter(|r| r.end > from) {
                tracing::warn!(segment = seq, bytes = ?range, "skipping a damaged spool record");
                spool.skipped += 1;
            }
            spool.segments.push_back(segment);
        }
        spool.next_seq = newest.map_or(0, |n| n + 1).max(spool.read.seq);
        spool.back_writable = !spool.segments.is_empty();
        // Also drops what is fully consumed and makes `position` match what was recovered.
        spool.settle()?;
        Ok(spool)
    }

    /// Appends events durably: a process crash after return loses none (the bytes are written),
    /// and with `sync` neither does a host crash (one fsync for the whole call).
    pub fn append(&mut self, events: &[UsageEvent]) -> Result<(), SpoolError> {
        let mut batch = Vec::new();
        let mut count = 0;
        for event in events {
            let payload = shared::encode(event);
            let len = u32::try_from(payload.len())
                .map_err(|_| SpoolError::EventTooLarge(payload.len()))?;
            if self.back_is_full(batch.len()) {
                self.write_back(&batch, count)?;
                batch.clear();
                count = 0;
                self.rotate()?;
            }
            batch.extend_from_slice(&len.to_le_bytes());
            batch.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
            batch.extend_from_slice(&payload);
            count += 1;
        }
        self.write_back(&batch, count)
    }

    /// Oldest unconsumed events, at most `max`, without consuming them.
    pub fn peek(&mut self, max: usize) -> Result<Vec<UsageEvent>, SpoolError> {
        let (events, ends) = self.read_events(max)?;
        self.peeked = ends;
        Ok(events)
    }

    /// Marks the oldest `n` events consumed (after they were published); persists the read
    /// position and deletes segment files that are fully consumed.
    pub fn consume(&mut self, n: usize) -> Result<(), SpoolError> {
        if n == 0 {
            return Ok(());
        }
        let pending = self.len();
        if n as u64 > pending {
            return Err(SpoolError::ConsumeBeyondEnd {
                requested: n,
                pending,
            });
        }
        let ends = if self.peeked.len() >= n {
            std::mem::take(&mut self.peeked)
        } else {
            self.read_events(n)?.1
        };
        self.peeked.clear();
        // Reading can find fewer records than were counted when damage appeared after `open`.
        let Some(&last) = ends.get(n - 1) else {
            return Err(SpoolError::ConsumeBeyondEnd {
                requested: n,
                pending: self.len(),
            });
        };
        let mut segments = self.segments.iter_mut();
        let mut current = segments.next();
        for end in &ends[..n] {
            while current.as_ref().is_some_and(|s| s.seq != end.seq) {
                current = segments.next();
            }
            if let Some(segment) = current.as_mut() {
                segment.pending = segment.pending.saturating_sub(1);
            }
        }
        self.read = last;
        self.settle()
    }

    /// Events pending.
    pub fn len(&self) -> u64 {
        self.segments.iter().map(|s| s.pending).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk of pending records, for /metrics.
    pub fn bytes(&self) -> u64 {
        let total: u64 = self.segments.iter().map(|s| s.size).sum();
        if self.segments.is_empty() {
            0
        } else {
            total.saturating_sub(self.read.offset)
        }
    }

    /// Damaged records and stretches skipped since `open`, each already logged.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// fsyncs made since `open` (zero without `sync`).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    fn sync_file(&mut self, file: &File, path: &Path) -> Result<(), SpoolError> {
        self.syncs += 1;
        file.sync_data().map_err(io_error(path))
    }

    /// Makes a created, renamed or deleted file name durable.
    fn sync_dir(&mut self) -> Result<(), SpoolError> {
        self.syncs += 1;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error(&self.dir))
    }

    fn back_is_full(&self, buffered: usize) -> bool {
        match self.segments.back() {
            Some(back) if self.back_writable => {
                let size = back.size + buffered as u64;
                size > 0 && size >= self.options.segment_bytes
            }
            _ => true,
        }
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        let seq = self.next_seq;
        let path = segment_path(&self.dir, seq);
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .open(&path)
            .map_err(io_error(&path))?;
        if self.options.sync {
            self.sync_dir()?;
        }
        if self.segments.is_empty() {
            self.read = Position { seq, offset: 0 };
        }
        self.segments.push_back(Segment {
            seq,
            size: 0,
            pending: 0,
            damaged: Vec::new(),
        });
        self.writer = Some(file);
        self.back_writable = true;
        self.next_seq = seq + 1;
        Ok(())
    }

    fn write_back(&mut self, batch: &[u8], count: u64) -> Result<(), SpoolError> {
        if batch.is_empty() {
            return Ok(());
        }
        if !self.back_writable {
            self.rotate()?;
        }
        let Some(back) = self.segments.back_mut() else {
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source: io::Error::other("no spool segment to append to"),
            });
        };
        let path = segment_path(&self.dir, back.seq);
        let file = match self.writer.take() {
            Some(file) => file,
            None => OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(io_error(&path))?,
        };
        let file = self.writer.insert(file);
        if let Err(e) = file.write_all(batch) {
            // A partial record must not stay in front of the next append. If it cannot be cut
            // off, readers still stop at `size`, and later records go to a fresh segment.
            if file.set_len(back.size).is_err() {
                self.writer = None;
                self.back_writable = false;
            }
            return Err(io_error(&path)(e));
        }
        back.size += batch.len() as u64;
        back.pending += count;
        if self.options.sync {
            self.syncs += 1;
            file.sync_data().map_err(io_error(&path))?;
        }
        Ok(())
    }

    /// Reads up to `max` pending events from the read position on, and where each one ends.
    fn read_events(&mut self, max: usize) -> Result<(Vec<UsageEvent>, Vec<Position>), SpoolError> {
        let mut events = Vec::new();
        let mut ends = Vec::new();
        let mut i = 0;
        while events.len() < max && i < self.segments.len() {
            let from = if i == 0 { self.read.offset } else { 0 };
            self.read_segment(i, from, max, &mut events, &mut ends)?;
            i += 1;
        }
        Ok((events, ends))
    }

    fn read_segment(
        &mut self,
        i: usize,
        from: u64,
        max: usize,
        events: &mut Vec<UsageEvent>,
        ends: &mut Vec<Position>,
    ) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.get(i) else {
            return Ok(());
        };
        if segment.pending == 0 {
            return Ok(());
        }
        let seq = segment.seq;
        let path = segment_path(&self.dir, seq);
        let mut reader = BufReader::new(File::open(&path).map_err(io_error(&path))?);
        let mut at = from;
        reader.seek(SeekFrom::Start(at)).map_err(io_error(&path))?;
        let mut found = 0;
        let mut last_rescan = None;
        while events.len() < max {
            let Some(segment) = self.segments.get(i) else {
                break;
            };
            if at >= segment.size {
                break;
            }
            if let Some(range) = segment.damaged.iter().find(|r| r.contains(&at)) {
                at = range.end;
                reader.seek(SeekFrom::Start(at)).map_err(io_error(&path))?;
                continue;
            }
            match read_record(&mut reader, segment.size - at).map_err(io_error(&path))? {
                Some((len, event)) => {
                    at += len;
                    events.push(event);
                    ends.push(Position { seq, offset: at });
                    found += 1;
                }
                None => {
                    // Scanned intact at open, damaged now: the disk or someone else changed it.
                    // A second failure at the same byte means it keeps changing; give up on the
                    // rest of this segment rather than loop.
                    self.rescan(i, at, found, last_rescan == Some(at))?;
                    last_rescan = Some(at);
                    reader.seek(SeekFrom::Start(at)).map_err(io_error(&path))?;
                }
            }
        }
        Ok(())
    }

    /// Re-checks segment `i` from byte `at` after a read found damage there; `found` intact
    /// records were read between the read position and `at`.
    fn rescan(&mut self, i: usize, at: u64, found: u64, give_up: bool) -> Result<(), SpoolError> {
        let Some(segment) = self.segments.get(i) else {
            return Ok(());
        };
        let path = segment_path(&self.dir, segment.seq);
        let scanned = if give_up {
            None
        } else {
            let mut data = Vec::new();
            let mut file = File::open(&path).map_err(io_error(&path))?;
            file.seek(SeekFrom::Start(at)).map_err(io_error(&path))?;
            file.take(segment.size - at)
                .read_to_end(&mut data)
                .map_err(io_error(&path))?;
            Some(scan(&data, 0, false))
        };
        let Some(segment) = self.segments.get_mut(i) else {
            return Ok(());
        };
        segment.damaged.retain(|r| r.end <= at);
        let fresh: Vec<Range<u64>> = match scanned {
            Some(scan) => {
                segment.size = at + scan.end as u64;
                segment.pending = found + scan.total;
                scan.damaged
                    .into_iter()
                    .map(|r| r.start + at..r.end + at)
                    .collect()
            }
            None => {
                segment.pending = found;
                std::iter::once(at..segment.size).collect()
            }
        };
        for range in &fresh {
            tracing::warn!(segment = segment.seq, bytes = ?range,
                "skipping a spool record damaged after it was recovered");
        }
        self.skipped += fresh.len() as u64;
        segment.damaged.extend(fresh);
        Ok(())
    }

    /// Reads and checks segment `seq`, cutting off a torn tail if it is the newest. Returns it
    /// with every intact record pending, and how many start at or after `from` if `from` is a
    /// record boundary.
    fn load(
        &mut self,
        seq: u64,
        from: u64,
        newest: bool,
    ) -> Result<(Segment, Option<u64>), SpoolError> {
        let path = segment_path(&self.dir, seq);
        let data = fs::read(&path).map_err(io_error(&path))?;
        let scan = scan(&data, from, newest);
        if scan.end < data.len() {
            tracing::warn!(
                segment = seq,
                at = scan.end,
                bytes = data.len() - scan.end,
                "cutting a torn record off the end of the spool"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_error(&path))?;
            file.set_len(scan.end as u64).map_err(io_error(&path))?;
            if self.options.sync {
                self.sync_file(&file, &path)?;
            }
        }
        let segment = Segment {
            seq,
            size: scan.end as u64,
            pending: scan.total,
            damaged: scan.damaged,
        };
        Ok((segment, scan.pending_from))
    }

    /// Drops segments with nothing left to read, persists the read position, then deletes their
    /// files.
    fn settle(&mut self) -> Result<(), SpoolError> {
        while let Some(front) = self.segments.front() {
            let passed = front.seq < self.read.seq;
            if !passed && front.pending > 0 {
                break;
            }
            self.doomed.push(front.seq);
            self.segments.pop_front();
            if !passed {
                self.read = Position {
                    seq: self.segments.front().map_or(self.next_seq, |s| s.seq),
                    offset: 0,
                };
            }
        }
        if self.segments.is_empty() {
            self.writer = None;
            self.back_writable = false;
        }
        self.write_position()?;
        // Only now that `position` has moved past them: a crash before this point leaves files
        // older than the position, which the next open deletes unread.
        let deleted = !self.doomed.is_empty();
        while let Some(&seq) = self.doomed.last() {
            let path = segment_path(&self.dir, seq);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
            self.doomed.pop();
        }
        if deleted && self.options.sync {
            self.sync_dir()?;
        }
        Ok(())
    }

    fn write_position(&mut self) -> Result<(), SpoolError> {
        let tmp = self.dir.join(POSITION_TMP);
        let mut file = File::create(&tmp).map_err(io_error(&tmp))?;
        file.write_all(format!("{} {}\n", self.read.seq, self.read.offset).as_bytes())
            .map_err(io_error(&tmp))?;
        // The new position must be on disk before the rename makes it the position, or a host
        // crash could leave an empty file under the name (read as "re-read everything").
        if self.options.sync {
            self.sync_file(&file, &tmp)?;
        }
        let path = self.dir.join(POSITION);
        fs::rename(&tmp, &path).map_err(io_error(&path))?;
        if self.options.sync {
            self.sync_dir()?;
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("events-{seq:020}.spool"))
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut seqs = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let name = entry.map_err(io_error(dir))?.file_name();
        let seq = name.to_str().and_then(|name| {
            let digits = name.strip_prefix("events-")?.strip_suffix(".spool")?;
            let well_formed = digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit());
            well_formed.then(|| digits.parse::<u64>().ok()).flatten()
        });
        seqs.extend(seq);
    }
    seqs.sort_unstable();
    Ok(seqs)
}

fn read_position(dir: &Path) -> Result<Option<Position>, SpoolError> {
    let path = dir.join(POSITION);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path)(e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(seq)), Some(Ok(offset)), None) => Ok(Some(Position { seq, offset })),
        _ => {
            tracing::warn!(path = %path.display(), "unreadable spool read position");
            Ok(None)
        }
    }
}

/// What one pass over a segment's bytes found.
struct Scan {
    /// Where the segment's records end: the data's length, or where a torn tail starts.
    end: usize,
    /// Intact records.
    total: u64,
    /// Intact records at or after the offset asked about, if it is a record boundary.
    pending_from: Option<u64>,
    damaged: Vec<Range<u64>>,
}

/// Walks the records in `data`. Damage is skipped up to the next intact record; with
/// `cut_torn_tail`, damage that no intact record follows ends the segment instead.
fn scan(data: &[u8], from: u64, cut_torn_tail: bool) -> Scan {
    let mut damaged = Vec::new();
    let (mut total, mut after) = (0, 0);
    let mut from_is_boundary = false;
    let mut at = 0;
    let end = loop {
        from_is_boundary |= at as u64 == from;
        if at >= data.len() {
            break data.len();
        }
        if let Some(payload) = frame(data, at, usize::MAX) {
            let next = at + HEADER + payload.len();
            if shared::decode(payload).is_ok() {
                total += 1;
                if at as u64 >= from {
                    after += 1;
                }
            } else {
                // The framing is intact, so exactly this record is skipped.
                damaged.push(at as u64..next as u64);
            }
            at = next;
            continue;
        }
        // The length itself may be what is damaged, so it cannot say where the next record
        // starts: search for one.
        match resync(data, at + 1) {
            Some(next) => {
                damaged.push(at as u64..next as u64);
                at = next;
            }
            None if cut_torn_tail => break at,
            None => {
                damaged.push(at as u64..data.len() as u64);
                at = data.len();
            }
        }
    };
    Scan {
        end,
        total,
        pending_from: from_is_boundary.then_some(after),
        damaged,
    }
}

/// The payload of the intact record at `at`, if there is one.
fn frame(data: &[u8], at: usize, max_payload: usize) -> Option<&[u8]> {
    let header = data.get(at..at.checked_add(HEADER)?)?.try_into().ok()?;
    let (len, crc) = split_header(header);
    let len = usize::try_from(len).ok()?;
    if len == 0 || len > max_payload {
        return None;
    }
    let start = at + HEADER;
    let payload = data.get(start..start.checked_add(len)?)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

fn resync(data: &[u8], from: usize) -> Option<usize> {
    (from..data.len()).find(|&at| frame(data, at, MAX_RESYNC_PAYLOAD).is_some())
}

fn split_header(header: [u8; HEADER]) -> (u32, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
    (
        u32::from_le_bytes([l0, l1, l2, l3]),
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

/// Reads the record at the reader's position, with `room` bytes left in the segment. Returns its
/// length on disk and its event, or None if it is not intact or does not decode.
fn read_record(reader: &mut impl Read, room: u64) -> io::Result<Option<(u64, UsageEvent)>> {
    let mut header = [0; HEADER];
    if !read_full(reader, &mut header)? {
        return Ok(None);
    }
    let (len, crc) = split_header(header);
    let on_disk = HEADER as u64 + u64::from(len);
    if len == 0 || on_disk > room {
        return Ok(None);
    }
    let mut payload = vec![0; len as usize];
    if !read_full(reader, &mut payload)? || crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    Ok(shared::decode(&payload).ok().map(|event| (on_disk, event)))
}

fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A directory of its own for each test, removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let name = format!(
                "meter-spool-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(name);
            let _ = fs::remove_dir_all(&path);
            TempDir(path)
        }

        fn open(&self, options: SpoolOptions) -> Spool {
            Spool::open_with(&self.0, options).unwrap()
        }

        fn segments(&self) -> Vec<PathBuf> {
            list_segments(&self.0)
                .unwrap()
                .into_iter()
                .map(|seq| segment_path(&self.0, seq))
                .collect()
        }

        fn only_segment(&self) -> PathBuf {
            let segments = self.segments();
            assert_eq!(segments.len(), 1, "expected one segment: {segments:?}");
            segments[0].clone()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn big() -> SpoolOptions {
        SpoolOptions::default()
    }

    /// About three events per segment.
    fn small() -> SpoolOptions {
        SpoolOptions {
            segment_bytes: 1024,
            sync: false,
        }
    }

    /// One event per segment.
    fn tiny() -> SpoolOptions {
        SpoolOptions {
            segment_bytes: 1,
            sync: false,
        }
    }

    /// A test event whose id and token counts follow `n` (shared with the publisher's tests).
    pub(crate) fn event(n: u64) -> UsageEvent {
        UsageEvent {
            v: shared::SCHEMA_VERSION,
            id: format!("0190a0b0-0000-7000-8000-{n:012}"),
            ts: 1_767_225_600_000,
            key_id: Some("k1".into()),
            account_id: Some("a1".into()),
            provider: "anthropic".into(),
            endpoint: "messages".into(),
            model: "claude-sonnet-4-5".into(),
            status: 200,
            stream: n.is_multiple_of(2),
            latency_us: 1_000 + n,
            ttft_us: Some(100),
            input_tokens: n,
            output_tokens: 2 * n,
            cache_creation_input_tokens: 0,
            cache_creation_1h_input_tokens: 0,
            cache_read_input_tokens: 0,
            service_tier: None,
            error: None,
        }
    }

    fn events(ns: impl IntoIterator<Item = u64>) -> Vec<UsageEvent> {
        ns.into_iter().map(event).collect()
    }

    fn on_disk(event: &UsageEvent) -> u64 {
        (HEADER + shared::encode(event).len()) as u64
    }

    #[track_caller]
    fn check(spool: &mut Spool, want: &[UsageEvent]) {
        assert_eq!(spool.len(), want.len() as u64);
        assert_eq!(spool.peek(usize::MAX).unwrap(), want);
        assert_eq!(spool.bytes(), want.iter().map(on_disk).sum::<u64>());
    }

    /// Byte offsets where each record of a well-formed segment starts.
    fn record_starts(path: &Path) -> Vec<usize> {
        let data = fs::read(path).unwrap();
        let mut starts = Vec::new();
        let mut at = 0;
        while at < data.len() {
            starts.push(at);
            at += HEADER + frame(&data, at, usize::MAX).unwrap().len();
        }
        starts
    }

    fn damage(path: &Path, at: usize, bytes: &[u8]) {
        let mut data = fs::read(path).unwrap();
        data[at..at + bytes.len()].copy_from_slice(bytes);
        fs::write(path, data).unwrap();
    }

    #[test]
    fn events_come_out_in_append_order_across_many_segments() {
        let dir = TempDir::new();
        let mut spool = dir.open(small());
        for batch in 0..10 {
            spool.append(&events(batch * 10..batch * 10 + 10)).unwrap();
        }
        assert!(dir.segments().len() > 20, "{:?}", dir.segments());
        let mut seen = Vec::new();
        while !spool.is_empty() {
            let batch = spool.peek(7).unwrap();
            spool.consume(batch.len()).unwrap();
            seen.extend(batch);
        }
        assert_eq!(seen, events(0..100));
        check(&mut spool, &[]);
    }

    #[test]
    fn appends_while_reading_join_the_end_of_the_queue() {
        let dir = TempDir::new();
        let mut spool = dir.open(small());
        spool.append(&events(0..5)).unwrap();
        assert_eq!(spool.peek(3).unwrap(), events(0..3));
        spool.append(&events(5..9)).unwrap();
        spool.consume(3).unwrap();
        check(&mut spool, &events(3..9));
    }

    #[test]
    fn consume_without_peek_reads_its_way_forward() {
        let dir = TempDir::new();
        let mut spool = dir.open(small());
        spool.append(&events(0..10)).unwrap();
        assert_eq!(spool.peek(2).unwrap(), events(0..2));
        spool.consume(6).unwrap();
        check(&mut spool, &events(6..10));
    }

    #[test]
    fn reopening_keeps_unconsumed_events_in_order_with_their_ids() {
        let dir = TempDir::new();
        let mut spool = dir.open(small());
        spool.append(&events(0..30)).unwrap();
        assert_eq!(spool.peek(12).unwrap(), events(0..12));
        spool.consume(12).unwrap();
        drop(spool);

        let mut spool = dir.open(small());
        check(&mut spool, &events(12..30));
        spool.append(&events(30..32)).unwrap();
        drop(spool);

        check(&mut dir.open(small()), &events(12..32));
    }

    #[test]
    fn the_default_spool_fsyncs_what_it_writes() {
        // A host crash during a Redis outage must not lose what sat in the page cache.
        assert!(SpoolOptions::default().sync);
    }

    #[test]
    fn a_synced_spool_fsyncs_once_per_append_and_an_unsynced_one_never() {
        let dir = TempDir::new();
        let mut spool = dir.open(big());
        let opened = spool.syncs();
        spool.append(&events(0..1)).unwrap();
        // The first append creates the segment: its data, and its name in the directory.
        assert_eq!(spool.syncs(), opened + 2);
        spool.append(&events(1..100)).unwrap();
        assert_eq!(spool.syncs(), opened + 3, "one fsync for a batch of 99");
        spool.consume(50).unwrap();
        assert_eq!(spool.syncs(), opened + 5, "the new position and its rename");
        drop(spool);

        let dir = TempDir::new();
        let mut spool = dir.open(small());
        spool.append(&events(0..10)).unwrap();
        spool.consume(10).unwrap();
        assert_eq!(spool.syncs(), 0);
    }

    #[test]
    fn a_synced_spool_behaves_like_an_unsynced_one() {
        let dir = TempDir::new();
        let synced = SpoolOptions {
            segment_bytes: 1024,
            sync: true,
        };
        let mut spool = dir.open(synced);
        spool.append(&events(0..10)).unwrap();
        spool.consume(4).unwrap();
        drop(spool);
        check(&mut dir.open(synced), &events(4..10));
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_later_appends_follow_the_intact_records() {
        let last_len = on_disk(&event(4)) as usize;
        for kept in [1, 4, 8, 9, last_len / 2, last_len - 1] {
            let dir = TempDir::new();
            dir.open(big()).append(&events(0..5)).unwrap();
            let path = dir.only_segment();
            let intact = record_starts(&path)[4];
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.set_len((intact + kept) as u64).unwrap();

            let mut spool = dir.open(big());
            check(&mut spool, &events(0..4));
            assert_eq!(fs::metadata(&path).unwrap().len(), intact as u64);
            spool.append(&events(5..7)).unwrap();
            let want = events([0, 1, 2, 3, 5, 6]);
            check(&mut spool, &want);
            drop(spool);
            let mut spool = dir.open(big());
            check(&mut spool, &want);
            assert_eq!(spool.skipped(), 0, "kept {kept} bytes of the torn record");
        }
    }

    #[test]
    fn zeroes_after_the_last_record_are_cut_off() {
        // What a power loss can leave when the file grew but its data never reached the disk.
        let dir = TempDir::new();
        dir.open(big()).append(&events(0..3)).unwrap();
        let path = dir.only_segment();
        let intact = fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(intact + 4096).unwrap();

        let mut spool = dir.open(big());
        check(&mut spool, &events(0..3));
        assert_eq!(fs::metadata(&path).unwrap().len(), intact);
        spool.append(&events(3..4)).unwrap();
        drop(spool);
        check(&mut dir.open(big()), &events(0..4));
    }

    #[test]
    fn a_damaged_record_in_the_middle_is_skipped_and_the_rest_read() {
        let cases = [
            "flipped payload byte",
            "huge length",
            "short length",
            "zeroed record",
        ];
        for name in cases {
            let dir = TempDir::new();
            dir.open(big()).append(&events(0..5)).unwrap();
            let path = dir.only_segment();
            let at = record_starts(&path)[2];
            let data = fs::read(&path).unwrap();
            match name {
                "flipped payload byte" => {
                    damage(&path, at + HEADER + 5, &[data[at + HEADER + 5] ^ 0x40])
                }
                "huge length" => damage(&path, at, &0xffff_fff0_u32.to_le_bytes()),
                "short length" => damage(&path, at, &20_u32.to_le_bytes()),
                _ => damage(&path, at, &[0; 100]),
            }

            let mut spool = dir.open(big());
            assert_eq!(spool.skipped(), 1, "{name}");
            assert_eq!(spool.len(), 4, "{name}");
            assert_eq!(
                spool.peek(usize::MAX).unwrap(),
                events([0, 1, 3, 4]),
                "{name}"
            );

            // The position now points at the damaged record, which a reopen must still accept.
            spool.consume(2).unwrap();
            drop(spool);
            let mut spool = dir.open(big());
            assert_eq!(spool.peek(usize::MAX).unwrap(), events([3, 4]), "{name}");
            spool.consume(2).unwrap();
            assert!(spool.is_empty(), "{name}");
            assert_eq!(spool.bytes(), 0, "{name}");
        }
    }

    #[test]
    fn an_intact_record_that_does_not_decode_is_skipped() {
        let dir = TempDir::new();
        dir.open(big()).append(&events(0..2)).unwrap();
        let path = dir.only_segment();
        let payload = b"\xc1 not an event";
        let mut record = (payload.len() as u32).to_le_bytes().to_vec();
        record.extend(crc32fast::hash(payload).to_le_bytes());
        record.extend(payload);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&record).unwrap();
        dir.open(big()).append(&events(2..4)).unwrap();

        let mut spool = dir.open(big());
        assert_eq!(spool.skipped(), 1);
        assert_eq!(spool.len(), 4);
        assert_eq!(spool.peek(usize::MAX).unwrap(), events(0..4));
    }

    #[test]
    fn damage_found_after_open_is_skipped_too() {
        let dir = TempDir::new();
        let mut spool = dir.open(big());
        spool.append(&events(0..5)).unwrap();
        let path = dir.only_segment();
        let at = record_starts(&path)[1];
        damage(&path, at + HEADER + 3, b"\xff\xff");

        assert_eq!(spool.peek(usize::MAX).unwrap(), events([0, 2, 3, 4]));
        assert_eq!(spool.len(), 4);
        assert_eq!(spool.skipped(), 1);
        spool.consume(4).unwrap();
        assert!(spool.is_empty());
    }

    #[test]
    fn consumed_segments_are_deleted() {
        let dir = TempDir::new();
        let mut spool = dir.open(tiny());
        spool.append(&events(0..10)).unwrap();
        let segments = dir.segments();
        assert_eq!(segments.len(), 10);

        spool.consume(3).unwrap();
        assert_eq!(dir.segments(), segments[3..]);
        spool.consume(7).unwrap();
        assert_eq!(dir.segments(), Vec::<PathBuf>::new());
        assert!(dir.0.join(POSITION).exists());

        // A new segment never reuses a consumed one's number.
        spool.append(&events(10..11)).unwrap();
        assert!(dir.only_segment() > segments[9]);
        drop(spool);
        check(&mut dir.open(tiny()), &events(10..11));
    }

    #[test]
    fn segments_left_behind_by_a_crash_after_consuming_are_not_read_again() {
        for consumed in [3, 5] {
            let dir = TempDir::new();
            let mut spool = dir.open(tiny());
            spool.append(&events(0..5)).unwrap();
            let kept: Vec<_> = dir
                .segments()
                .into_iter()
                .map(|p| (p.clone(), fs::read(&p).unwrap()))
                .collect();
            spool.consume(consumed).unwrap();
            drop(spool);
            // As if the process died after writing the position but before deleting any file.
            for (path, data) in &kept {
                fs::write(path, data).unwrap();
            }
            let mut spool = dir.open(tiny());
            check(&mut spool, &events(consumed as u64..5));
            let left: Vec<_> = kept[consumed..].iter().map(|k| k.0.clone()).collect();
            assert_eq!(dir.segments(), left);
        }
    }

    #[test]
    fn a_missing_position_file_means_everything_is_read_again() {
        let dir = TempDir::new();
        let mut spool = dir.open(big());
        spool.append(&events(0..10)).unwrap();
        spool.consume(4).unwrap();
        drop(spool);
        fs::remove_file(dir.0.join(POSITION)).unwrap();
        check(&mut dir.open(big()), &events(0..10));
    }

    #[test]
    fn a_position_that_is_not_a_record_boundary_means_everything_is_read_again() {
        for position in ["0 3", "0 999999", "7 10", "garbage", ""] {
            let dir = TempDir::new();
            let mut spool = dir.open(big());
            spool.append(&events(0..4)).unwrap();
            spool.consume(1).unwrap();
            drop(spool);
            fs::write(dir.0.join(POSITION), position).unwrap();
            check(&mut dir.open(big()), &events(0..4));
        }
    }

    #[test]
    fn len_and_bytes_count_pending_records() {
        let dir = TempDir::new();
        let mut spool = dir.open(small());
        assert!(spool.is_empty());
        assert_eq!((spool.len(), spool.bytes()), (0, 0));

        spool.append(&events(0..7)).unwrap();
        let on_disk_total: u64 = dir
            .segments()
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(spool.bytes(), on_disk_total);
        assert_eq!(spool.len(), 7);

        spool.consume(2).unwrap();
        assert_eq!(spool.len(), 5);
        assert_eq!(
            spool.bytes(),
            on_disk_total - on_disk(&event(0)) - on_disk(&event(1))
        );
        spool.consume(5).unwrap();
        assert_eq!((spool.len(), spool.bytes()), (0, 0));
    }

    #[test]
    fn consuming_more_than_is_pending_is_refused_and_changes_nothing() {
        let dir = TempDir::new();
        let mut spool = dir.open(small());
        spool.append(&events(0..3)).unwrap();
        assert!(matches!(
            spool.consume(4),
            Err(SpoolError::ConsumeBeyondEnd {
                requested: 4,
                pending: 3
            })
        ));
        check(&mut spool, &events(0..3));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u64),
        Peek(usize),
        Consume(usize),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..6_u64).prop_map(Op::Append),
            2 => (0..8_usize).prop_map(Op::Peek),
            3 => (0..8_usize).prop_map(Op::Consume),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn the_spool_behaves_like_a_queue_that_survives_reopening(
            ops in proptest::collection::vec(op(), 1..40),
            segment_bytes in prop_oneof![Just(1_u64), Just(700), Just(4096)],
        ) {
            let options = SpoolOptions { segment_bytes, sync: false };
            let dir = TempDir::new();
            let mut spool = dir.open(options);
            let mut model = VecDeque::new();
            let mut next = 0;
            for op in ops {
                match op {
                    Op::Append(k) => {
                        let batch = events(next..next + k);
                        next += k;
                        spool.append(&batch).unwrap();
                        model.extend(batch);
                    }
                    Op::Peek(m) => {
                        let want: Vec<_> = model.iter().take(m).cloned().collect();
                        prop_assert_eq!(spool.peek(m).unwrap(), want);
                    }
                    Op::Consume(j) if j > model.len() => {
                        prop_assert!(spool.consume(j).is_err());
                    }
                    Op::Consume(j) => {
                        spool.consume(j).unwrap();
                        model.drain(..j);
                    }
                    Op::Reopen => {
                        drop(spool);
                        spool = dir.open(options);
                    }
                }
                prop_assert_eq!(spool.len(), model.len() as u64);
                prop_assert_eq!(spool.bytes(), model.iter().map(on_disk).sum::<u64>());
            }
            let want: Vec<_> = model.into_iter().collect();
            prop_assert_eq!(spool.peek(usize::MAX).unwrap(), want);
            prop_assert_eq!(spool.skipped(), 0);
        }
    }
}

//! Writing a whole image into the live host's mirror file without the page cache.
//!
//! The mirror (`outgoing/image.db`) is written once per whole image and read back only
//! for the few chunks an offer or an ssh transport needs. Buffered writes would copy every
//! byte into page-cache pages (on the VMs measured here, fresh pages cost two to three
//! times a plain copy: the largest cost of the live host during a full snapshot) and keep
//! a second copy of the conode's database in the live host's memory. So aligned runs of
//! chunks are gathered into a few reused buffers and written with `O_DIRECT` by a thread
//! of their own, beside the take.
//!
//! The take never waits for the disk: when every buffer is still being written, a piece
//! goes through the page cache instead. Where the filesystem refuses `O_DIRECT` (tmpfs on older kernels, some FUSE mounts), or
//! for a piece that is not aligned (the last, short chunk), the same bytes are written
//! through the page cache: the file's content is the same either way. It must never be
//! used for a file that is read while it is written: nothing is there until
//! [`DirectWriter::finish`] returns.

use nix::errno::Errno;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;

/// Alignment of `O_DIRECT` offsets, lengths and buffers: the largest logical block size
/// of the disks we run on.
const ALIGN: usize = 4096;
/// One write: 4 MiB of contiguous chunks.
const BUF: usize = 4 << 20;
/// Buffers in flight: the take fills one while the thread writes the others. When all
/// are in flight, pieces are written through the page cache instead of waiting.
const BUFFERS: usize = 4;

/// A buffer whose usable part starts at an `ALIGN` boundary.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new() -> Aligned {
        let raw = vec![0u8; BUF + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        Aligned { raw, start, len: 0 }
    }

    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn room(&self) -> usize {
        BUF - self.len
    }

    fn push(&mut self, b: &[u8]) {
        let at = self.start + self.len;
        self.raw[at..at + b.len()].copy_from_slice(b);
        self.len += b.len();
    }
}

/// Writes pieces of a file at their offsets, aligned runs with `O_DIRECT`.
pub struct DirectWriter {
    /// The file through the page cache: unaligned pieces, and the fallback.
    file: File,
    /// The batch being gathered: its offset in the file and its bytes.
    cur: Option<(u64, Aligned)>,
    to_writer: Option<mpsc::SyncSender<(u64, Aligned)>>,
    free: mpsc::Receiver<Aligned>,
    writer: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl DirectWriter {
    /// Write into `path`, already open as `file` (read-write).
    pub fn new(path: &Path, file: &File) -> std::io::Result<DirectWriter> {
        let buffered = file.try_clone()?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
            .ok();
        let (to_writer, jobs) = mpsc::sync_channel::<(u64, Aligned)>(BUFFERS);
        let (give_back, free) = mpsc::sync_channel::<Aligned>(BUFFERS);
        for _ in 0..BUFFERS {
            give_back
                .send(Aligned::new())
                .expect("room for every buffer");
        }
        let fallback = file.try_clone()?;
        let writer = std::thread::Builder::new()
            .name("mirror-writer".into())
            .spawn(move || write_loop(direct, fallback, jobs, give_back))?;
        Ok(DirectWriter {
            file: buffered,
            cur: None,
            to_writer: Some(to_writer),
            free,
            writer: Some(writer),
        })
    }

    /// Write `b` at `offset`. Nothing is guaranteed to be in the file before [`finish`].
    ///
    /// [`finish`]: DirectWriter::finish
    pub fn write_at(&mut self, b: &[u8], offset: u64) -> std::io::Result<()> {
        let aligned = offset.is_multiple_of(ALIGN as u64) && b.len().is_multiple_of(ALIGN);
        if !aligned || b.len() > BUF {
            return self.file.write_all_at(b, offset);
        }
        let follows = self
            .cur
            .as_ref()
            .is_some_and(|(at, buf)| at + buf.len as u64 == offset && buf.room() >= b.len());
        if !follows {
            self.submit()?;
            match self.free.try_recv() {
                Ok(buf) => self.cur = Some((offset, buf)),
                // Every buffer is still being written: the disk is behind. The take must
                // not wait for it (the conode's writers wait for the take), so this piece
                // goes through the page cache.
                Err(mpsc::TryRecvError::Empty) => return self.file.write_all_at(b, offset),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(self.join().err().unwrap_or_else(gone))
                }
            }
        }
        let (_, buf) = self.cur.as_mut().expect("set above");
        buf.push(b);
        Ok(())
    }

    /// Hand the gathered batch to the writer thread.
    fn submit(&mut self) -> std::io::Result<()> {
        if let Some(job) = self.cur.take() {
            let tx = self.to_writer.as_ref().ok_or_else(gone)?;
            if tx.send(job).is_err() {
                // The thread ended early: its error is the one to report.
                return Err(self.join().err().unwrap_or_else(gone));
            }
        }
        Ok(())
    }

    fn join(&mut self) -> std::io::Result<()> {
        self.to_writer = None;
        match self.writer.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "the mirror writer thread panicked: this is a bug",
                ))
            }),
            None => Ok(()),
        }
    }

    /// Write what is gathered, wait for every write, and report the first error.
    pub fn finish(mut self) -> std::io::Result<()> {
        let sent = self.submit();
        let joined = self.join();
        sent.and(joined)
    }
}

impl Drop for DirectWriter {
    fn drop(&mut self) {
        let _ = self.join();
    }
}

fn gone() -> std::io::Error {
    std::io::Error::other("the mirror writer thread ended early")
}

fn write_loop(
    mut direct: Option<File>,
    buffered: File,
    jobs: mpsc::Receiver<(u64, Aligned)>,
    give_back: mpsc::SyncSender<Aligned>,
) -> std::io::Result<()> {
    for (offset, mut buf) in jobs {
        let bytes = buf.bytes();
        let r = match direct.as_ref().map(|d| d.write_all_at(bytes, offset)) {
            Some(Err(e)) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                // The filesystem takes O_DIRECT opens but not the writes: page cache from
                // now on.
                direct = None;
                buffered.write_all_at(bytes, offset)
            }
            Some(r) => r,
            None => buffered.write_all_at(bytes, offset),
        };
        r?;
        buf.len = 0;
        // The take may be done with its buffers already.
        let _ = give_back.send(buf);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Aligned runs, gaps, out-of-order pieces, an unaligned tail and a piece over the
    /// buffer size all land where a plain `pwrite` would put them.
    fn writes_land_where_pwrite_puts_them(dir: &Path) {
        let path = dir.join("mirror.db");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut model = vec![0u8; 24 << 20];
        let mut pieces: Vec<(u64, Vec<u8>)> = Vec::new();
        // 16 KiB chunks in order, across several buffers.
        for i in 0..700u64 {
            pieces.push((i * 16384, pattern(16384, i as u8)));
        }
        // A gap, then pieces behind the current batch, then a large one and a short tail.
        pieces.push((14 << 20, pattern(16384, 1)));
        pieces.push((12 << 20, pattern(8192, 2)));
        pieces.push((16 << 20, pattern(5 << 20, 3)));
        pieces.push(((22 << 20) + 4096, pattern(1000, 4)));
        let mut w = DirectWriter::new(&path, &file).unwrap();
        for (at, b) in &pieces {
            w.write_at(b, *at).unwrap();
            model[*at as usize..*at as usize + b.len()].copy_from_slice(b);
        }
        w.finish().unwrap();
        let end = (22 << 20) + 4096 + 1000;
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), end);
        assert!(got == model[..end], "the file differs from the model");
    }

    #[test]
    fn direct_writes_land_where_pwrite_puts_them() {
        // On the machine's disk (ext4 here): O_DIRECT.
        let dir = tempfile::tempdir().unwrap();
        writes_land_where_pwrite_puts_them(dir.path());
    }

    #[test]
    fn on_tmpfs_the_same_bytes_land() {
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "this test needs the tmpfs at /dev/shm");
        let dir = tempfile::tempdir_in(shm).unwrap();
        writes_land_where_pwrite_puts_them(dir.path());
    }
}

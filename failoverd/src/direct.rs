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
//! goes through the page cache instead. Where the filesystem refuses `O_DIRECT` (tmpfs
//! before Linux 6.6, some FUSE mounts), or for a piece that is not aligned (the last,
//! short chunk), the same bytes are written through the page cache: the file's content is
//! the same either way. [`DirectWriter::finish`] says how many bytes took each way
//! ([`Written`]), so a test can tell the two apart. It must never be used for a file that
//! is read while it is written: nothing is there until [`DirectWriter::finish`] returns.

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

/// How many bytes a [`DirectWriter`] wrote with `O_DIRECT` and how many through the page
/// cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub direct: u64,
    pub buffered: u64,
}

/// Writes pieces of a file at their offsets, aligned runs with `O_DIRECT`.
pub struct DirectWriter {
    /// The file through the page cache: unaligned pieces, and the fallback.
    file: File,
    /// Bytes written to `file` by [`DirectWriter::write_at`] itself.
    buffered: u64,
    /// The batch being gathered: its offset in the file and its bytes.
    cur: Option<(u64, Aligned)>,
    to_writer: Option<mpsc::SyncSender<(u64, Aligned)>>,
    free: mpsc::Receiver<Aligned>,
    writer: Option<std::thread::JoinHandle<std::io::Result<Written>>>,
}

impl DirectWriter {
    /// Write into `path`, already open as `file` (read-write).
    pub fn new(path: &Path, file: &File) -> std::io::Result<DirectWriter> {
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(path)
            .ok();
        DirectWriter::start(direct, file)
    }

    /// Write with `direct` (the file opened with `O_DIRECT`, `None` where that was
    /// refused) and `file`.
    fn start(direct: Option<File>, file: &File) -> std::io::Result<DirectWriter> {
        let buffered = file.try_clone()?;
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
            buffered: 0,
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
            return self.write_buffered(b, offset);
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
                Err(mpsc::TryRecvError::Empty) => return self.write_buffered(b, offset),
                Err(mpsc::TryRecvError::Disconnected) => {
                    return Err(self.join().err().unwrap_or_else(gone))
                }
            }
        }
        let (_, buf) = self.cur.as_mut().expect("set above");
        buf.push(b);
        Ok(())
    }

    fn write_buffered(&mut self, b: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(b, offset)?;
        self.buffered += b.len() as u64;
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

    /// What the writer thread wrote, once it is done.
    fn join(&mut self) -> std::io::Result<Written> {
        self.to_writer = None;
        match self.writer.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "the mirror writer thread panicked: this is a bug",
                ))
            }),
            None => Ok(Written::default()),
        }
    }

    /// Write what is gathered, wait for every write, and report the first error, or how
    /// many bytes went with `O_DIRECT` and how many through the page cache.
    pub fn finish(mut self) -> std::io::Result<Written> {
        let sent = self.submit();
        let joined = self.join();
        let thread = sent.and(joined)?;
        Ok(Written {
            direct: thread.direct,
            buffered: thread.buffered + self.buffered,
        })
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
) -> std::io::Result<Written> {
    let mut written = Written::default();
    for (offset, mut buf) in jobs {
        let bytes = buf.bytes();
        match direct.as_ref().map(|d| d.write_all_at(bytes, offset)) {
            Some(Ok(())) => written.direct += bytes.len() as u64,
            Some(Err(e)) if e.raw_os_error() == Some(Errno::EINVAL as i32) => {
                // The filesystem takes O_DIRECT opens but not the writes: page cache from
                // now on.
                direct = None;
                buffered.write_all_at(bytes, offset)?;
                written.buffered += bytes.len() as u64;
            }
            Some(Err(e)) => return Err(e),
            None => {
                buffered.write_all_at(bytes, offset)?;
                written.buffered += bytes.len() as u64;
            }
        }
        buf.len = 0;
        // The take may be done with its buffers already.
        let _ = give_back.send(buf);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::statfs::{statfs, FsType, EXT4_SUPER_MAGIC, TMPFS_MAGIC};

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Fails the test unless `dir` is on the filesystem `want` (named `name`).
    fn assert_filesystem(dir: &Path, want: FsType, name: &str) {
        let st = statfs(dir).unwrap_or_else(|e| panic!("statfs {}: {e}", dir.display()));
        assert!(
            st.filesystem_type() == want,
            "{} is on {:?}, not {name}: this test checks what O_DIRECT does on {name}",
            dir.display(),
            st.filesystem_type()
        );
    }

    fn open_rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap()
    }

    /// Write `pieces` into a new file in `dir` (with `O_DIRECT` refused if `refused`),
    /// check that every byte lands where a plain `pwrite` would put it, and return what
    /// went which way.
    fn write_and_compare(dir: &Path, pieces: &[(u64, Vec<u8>)], refused: bool) -> Written {
        let path = dir.join("mirror.db");
        let file = open_rw(&path);
        let end = pieces
            .iter()
            .map(|(at, b)| *at as usize + b.len())
            .max()
            .unwrap();
        let mut model = vec![0u8; end];
        let mut w = if refused {
            DirectWriter::start(None, &file).unwrap()
        } else {
            DirectWriter::new(&path, &file).unwrap()
        };
        for (at, b) in pieces {
            w.write_at(b, *at).unwrap();
            model[*at as usize..*at as usize + b.len()].copy_from_slice(b);
        }
        let written = w.finish().unwrap();
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), end);
        assert!(got == model, "the file differs from the model");
        let total: u64 = pieces.iter().map(|(_, b)| b.len() as u64).sum();
        assert_eq!(
            written.direct + written.buffered,
            total,
            "every byte is counted once: {written:?}"
        );
        written
    }

    /// Aligned runs, gaps, out-of-order pieces, an unaligned tail and a piece over the
    /// buffer size.
    fn mixed_pieces() -> Vec<(u64, Vec<u8>)> {
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
        pieces
    }

    /// 12 MiB of 16 KiB chunks in order: three buffers, so no piece ever waits for a free
    /// one and each goes with `O_DIRECT` where the filesystem takes it.
    fn aligned_run() -> Vec<(u64, Vec<u8>)> {
        (0..768u64)
            .map(|i| (i * 16384, pattern(16384, i as u8)))
            .collect()
    }

    /// Whether the filesystem of `dir` takes an aligned `O_DIRECT` write, asked directly.
    fn takes_o_direct(dir: &Path) -> bool {
        let path = dir.join("probe");
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(&path);
        let r = direct.and_then(|f| {
            let mut buf = Aligned::new();
            buf.push(&[7u8; ALIGN]);
            f.write_all_at(buf.bytes(), 0)
        });
        let _ = std::fs::remove_file(&path);
        match r {
            Ok(()) => true,
            Err(e) if e.raw_os_error() == Some(Errno::EINVAL as i32) => false,
            Err(e) => panic!("probing O_DIRECT in {}: {e}", dir.display()),
        }
    }

    #[test]
    fn on_ext4_aligned_runs_go_through_o_direct() {
        let tmp = std::env::temp_dir();
        assert_filesystem(&tmp, EXT4_SUPER_MAGIC, "ext4");
        let dir = tempfile::tempdir_in(&tmp).unwrap();
        let mixed = write_and_compare(dir.path(), &mixed_pieces(), false);
        // The first 4 MiB batch always finds a free buffer; the unaligned tail never
        // goes direct.
        assert!(
            mixed.direct >= BUF as u64,
            "at least the first 4 MiB batch must go with O_DIRECT on ext4: {mixed:?}"
        );
        assert!(mixed.buffered >= 1000, "{mixed:?}");
        let run = write_and_compare(dir.path(), &aligned_run(), false);
        assert_eq!(
            run,
            Written {
                direct: 12 << 20,
                buffered: 0
            },
            "a fully aligned run on ext4 goes with O_DIRECT, all of it"
        );
    }

    #[test]
    fn where_o_direct_is_refused_every_byte_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let mixed = write_and_compare(dir.path(), &mixed_pieces(), true);
        assert_eq!(mixed.direct, 0, "{mixed:?}");
        let run = write_and_compare(dir.path(), &aligned_run(), true);
        assert_eq!(
            run,
            Written {
                direct: 0,
                buffered: 12 << 20
            }
        );
    }

    /// tmpfs takes `O_DIRECT` since Linux 6.6 and refused it before: the writer must use
    /// it exactly when the kernel does, and the bytes land either way.
    #[test]
    fn on_tmpfs_o_direct_is_used_exactly_when_the_kernel_takes_it() {
        let shm = Path::new("/dev/shm");
        assert_filesystem(shm, TMPFS_MAGIC, "tmpfs");
        let dir = tempfile::tempdir_in(shm).unwrap();
        let takes = takes_o_direct(dir.path());
        write_and_compare(dir.path(), &mixed_pieces(), false);
        let run = write_and_compare(dir.path(), &aligned_run(), false);
        let want = if takes {
            Written {
                direct: 12 << 20,
                buffered: 0,
            }
        } else {
            Written {
                direct: 0,
                buffered: 12 << 20,
            }
        };
        assert_eq!(run, want, "the kernel takes O_DIRECT on tmpfs: {takes}");
    }
}

//! Chunking and BLAKE3 chunk hashes: the body of a snapshot manifest.
//!
//! A snapshot is a page image of the conode's redb file: pages keep their offsets, and two
//! snapshots taken a little apart differ only in the pages written between them. Nothing
//! ever shifts, so chunks are fixed: every chunk is [`Params::size`] bytes at a multiple
//! of it (the last one may be shorter). A written page changes exactly the chunk it falls
//! in, a run of free pages gives the same chunks wherever it is, and cutting costs nothing
//! (a content-defined cut, as rsync's or FastCDC's, would only pay to find insertions that
//! a page image never has).
//!
//! Boundaries depend only on the file's length and [`Params`], never on how the bytes
//! were read: the same file always gives the same chunks, on any host.

use nix::errno::Errno;
use nix::fcntl::FallocateFlags;
use nix::libc::off_t;

/// The chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    pub size: u32,
}

impl Params {
    /// 16 KiB: four pages, so one written page costs at most 12 KiB of neighbours; a
    /// 1 GiB snapshot has 65 536 chunks (a 2.4 MB chunk list), and BLAKE3 hashes 16 KiB
    /// with all its SIMD lanes busy.
    pub const DEFAULT: Params = Params { size: 16 << 10 };

    /// Check the size (a manifest from the network carries it).
    pub fn check(&self) -> Result<(), String> {
        if !self.size.is_power_of_two() || self.size < 4096 || self.size > 16 << 20 {
            return Err(format!(
                "bad chunk size {}: need a power of two from 4096 to 16 MiB",
                self.size
            ));
        }
        Ok(())
    }
}

/// One chunk: its place in the file and the BLAKE3 hash of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

/// Length of the first chunk of `data`, which starts at `offset` in the file: up to the
/// next multiple of the chunk size, or all of `data` if it ends first (callers pass at
/// least a chunk's worth unless at the end of the file).
pub fn cut(data: &[u8], p: &Params, offset: u64) -> usize {
    let room = (p.size as u64 - offset % p.size as u64) as usize;
    data.len().min(room)
}

/// The hash of a chunk of `len` zero bytes (free pages past the end of what redb wrote
/// read as zeros).
pub fn zeros_hash(len: u32) -> [u8; 32] {
    static DEFAULT: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    if len == Params::DEFAULT.size {
        return *DEFAULT.get_or_init(|| hash_zeros(len));
    }
    hash_zeros(len)
}

fn hash_zeros(len: u32) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 4096];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(zeros.len());
        h.update(&zeros[..n]);
        left -= n;
    }
    *h.finalize().as_bytes()
}

/// Split `data` (a whole file in memory) into chunks and hash them.
pub fn chunk_slice(data: &[u8], p: &Params) -> Vec<Chunk> {
    let mut out = Vec::with_capacity(data.len() / p.size as usize + 1);
    let mut off = 0usize;
    while off < data.len() {
        let len = cut(&data[off..], p, off as u64);
        out.push(Chunk {
            offset: off as u64,
            len: len as u32,
            hash: *blake3::hash(&data[off..off + len]).as_bytes(),
        });
        off += len;
    }
    out
}

/// Split a stream pushed to it piece by piece into chunks (the same chunks as
/// [`chunk_slice`] of the whole), handing each to `on_chunk` with its bytes.
pub struct Chunker {
    params: Params,
    buf: Vec<u8>,
    offset: u64,
    chunks: Vec<Chunk>,
}

impl Chunker {
    pub fn new(params: Params) -> Chunker {
        Chunker {
            params,
            buf: Vec::with_capacity(2 * params.size as usize),
            offset: 0,
            chunks: Vec::new(),
        }
    }

    /// Add bytes; every complete chunk goes to `on_chunk`. Less than a chunk is held
    /// between calls; the rest is cut where it lies, without copying.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        on_chunk: &mut impl FnMut(&Chunk, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let max = self.params.size as usize;
        // Held bytes first (always less than a chunk, from an aligned offset): complete
        // them to a chunk with the head of `data` and cut it.
        if !self.buf.is_empty() {
            let need = (max - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..need]);
            if self.buf.len() < max {
                return Ok(());
            }
            emit(&mut self.chunks, &mut self.offset, &self.buf, on_chunk)?;
            self.buf.clear();
            data = &data[need..];
        }
        let mut start = 0;
        while data.len() - start >= max {
            let rest = &data[start..];
            let len = cut(rest, &self.params, self.offset);
            emit(&mut self.chunks, &mut self.offset, &rest[..len], on_chunk)?;
            start += len;
        }
        self.buf.extend_from_slice(&data[start..]);
        Ok(())
    }

    /// The stream ended: cut what is left, return every chunk.
    pub fn finish<E>(
        mut self,
        on_chunk: &mut impl FnMut(&Chunk, &[u8]) -> Result<(), E>,
    ) -> Result<Vec<Chunk>, E> {
        // Less than a chunk is held: the last, short chunk.
        if !self.buf.is_empty() {
            emit(&mut self.chunks, &mut self.offset, &self.buf, on_chunk)?;
        }
        Ok(self.chunks)
    }
}

/// Hand `b` to `on_chunk` as the chunk at `*offset`, record it, move past it.
fn emit<E>(
    chunks: &mut Vec<Chunk>,
    offset: &mut u64,
    b: &[u8],
    on_chunk: &mut impl FnMut(&Chunk, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    let c = Chunk {
        offset: *offset,
        len: b.len() as u32,
        hash: *blake3::hash(b).as_bytes(),
    };
    on_chunk(&c, b)?;
    chunks.push(c);
    *offset += b.len() as u64;
    Ok(())
}

/// Make `len` bytes of `file` at `offset` zeros without writing them: a hole punched in
/// the file (the range stays inside it), or written zeros where the filesystem cannot.
pub fn punch_zeros(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    fallocate_zeros(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// `fallocate(mode)` on the range (a mode that leaves it reading as zeros), or written
/// zeros where the filesystem does not support the mode.
pub fn fallocate_zeros(
    file: &std::fs::File,
    mode: FallocateFlags,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    let (Ok(at), Ok(n)) = (off_t::try_from(offset), off_t::try_from(len)) else {
        return Err(std::io::Error::other(format!(
            "fallocate of {len} bytes at {offset}: past the largest file offset"
        )));
    };
    match nix::fcntl::fallocate(file, mode, at, n) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP) => write_zeros(file, offset, len),
        Err(e) => Err(e.into()),
    }
}

/// Write `len` zero bytes at `offset`.
pub fn write_zeros(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Where each chunk is: offset → (length, hash), to tell which chunks of a new snapshot an
/// older file already holds in the same place.
pub fn by_offset(chunks: &[Chunk]) -> std::collections::HashMap<u64, (u32, [u8; 32])> {
    chunks.iter().map(|c| (c.offset, (c.len, c.hash))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn chunks_cover_the_file_within_limits() {
        let p = Params::DEFAULT;
        let data = pseudo_random(3 << 20, 7);
        let chunks = chunk_slice(&data, &p);
        let mut off = 0u64;
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.offset, off);
            assert_eq!(c.offset % p.size as u64, 0, "chunk {i} is not aligned");
            if i + 1 < chunks.len() {
                assert_eq!(c.len, p.size, "chunk {i}");
            } else {
                assert!(c.len <= p.size && c.len > 0);
            }
            assert_eq!(
                c.hash,
                *blake3::hash(&data[off as usize..][..c.len as usize]).as_bytes()
            );
            off += c.len as u64;
        }
        assert_eq!(off, data.len() as u64);
        assert_eq!(chunks.len(), data.len().div_ceil(p.size as usize));
    }

    #[test]
    fn pages_written_in_an_image_change_only_their_chunks() {
        let p = Params::DEFAULT;
        // An image: data, then a long run of free (zero) pages.
        let mut old = pseudo_random(6 << 20, 11);
        old.extend(std::iter::repeat_n(0u8, 3 << 20));
        let mut new = old.clone();
        // Pages written: scattered ones, and the first page of the free run.
        let pages = [100usize, 700, 701, 1200, 1536];
        for (k, &pg) in pages.iter().enumerate() {
            new[pg * 4096..(pg + 1) * 4096].copy_from_slice(&pseudo_random(4096, 20 + k as u64));
        }
        let held: std::collections::HashSet<(u64, u32, [u8; 32])> = chunk_slice(&old, &p)
            .iter()
            .map(|c| (c.offset, c.len, c.hash))
            .collect();
        let changed: u64 = chunk_slice(&new, &p)
            .iter()
            .filter(|c| !held.contains(&(c.offset, c.len, c.hash)))
            .map(|c| c.len as u64)
            .sum();
        // Pages 700 and 701 share a chunk: four chunks, and not a byte more.
        assert!(
            changed == 4 * p.size as u64,
            "{changed} bytes of chunks changed for {} pages written",
            pages.len()
        );
    }

    #[test]
    fn zeros_hash_is_the_hash_of_zeros() {
        for len in [1u32, 4095, 4096, 16 << 10, (16 << 10) + 3] {
            assert_eq!(
                zeros_hash(len),
                *blake3::hash(&vec![0u8; len as usize]).as_bytes()
            );
        }
    }

    #[test]
    fn empty_and_tiny_inputs() {
        let p = Params::DEFAULT;
        assert!(chunk_slice(&[], &p).is_empty());
        let one = chunk_slice(b"abc", &p);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].hash, *blake3::hash(b"abc").as_bytes());
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(Params::DEFAULT.check().is_ok());
        for size in [0, 1, 2048, 12288, 32 << 20] {
            assert!(Params { size }.check().is_err(), "{size}");
        }
        assert!(Params { size: 4096 }.check().is_ok());
    }

    #[test]
    fn pushed_pieces_give_the_same_chunks_and_bytes_as_the_whole() {
        let data = pseudo_random(700_000, 9);
        let p = Params::DEFAULT;
        let whole = chunk_slice(&data, &p);
        // 0: pieces of varying sizes, below and above a chunk.
        for piece in [1usize, 977, 16383, 16384, 16385, 100_003, 1 << 20, 0] {
            let mut ch = Chunker::new(p);
            let mut rebuilt = Vec::new();
            let mut on = |c: &Chunk, b: &[u8]| {
                assert_eq!(c.offset as usize, rebuilt.len());
                assert_eq!(c.len as usize, b.len());
                rebuilt.extend_from_slice(b);
                Ok::<(), ()>(())
            };
            let sizes = [1usize, 70_000, 5_000, 300_000, 16 << 10, 3];
            let mut at = 0;
            for k in 0.. {
                if at == data.len() {
                    break;
                }
                let n = if piece == 0 {
                    sizes[k % sizes.len()]
                } else {
                    piece
                };
                let end = (at + n).min(data.len());
                ch.push(&data[at..end], &mut on).unwrap();
                at = end;
            }
            let got = ch.finish(&mut on).unwrap();
            assert_eq!(got, whole, "pieces of {piece}");
            assert_eq!(rebuilt, data, "pieces of {piece}");
        }
    }
}

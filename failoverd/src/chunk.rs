//! Chunking and BLAKE3 chunk hashes: the body of a snapshot manifest.
//!
//! A snapshot is a page image of the conode's redb file: pages keep their offsets, and two
//! snapshots taken a little apart differ only in the pages written between them. Chunks
//! are cut where the content says (a gear rolling hash, as in FastCDC) and also at every
//! multiple of `max` (see [`cut`]), so a written page changes only the chunk it falls in,
//! and runs of free pages stay cut at the same places whatever is allocated before them.
//!
//! Boundaries depend only on the bytes, their offsets and [`Params`], never on how the
//! bytes were read: the same file always gives the same chunks, on any host.

/// Chunk size limits. `min <= avg <= max`, `avg` a power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Params {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Params {
    /// 4 KiB .. 16 KiB .. 64 KiB: a 1 GiB snapshot has about 65 000 chunks, and an inserted
    /// block costs about one chunk of neighbours beyond its own bytes.
    pub const DEFAULT: Params = Params {
        min: 4 << 10,
        avg: 16 << 10,
        max: 64 << 10,
    };

    /// Check the limits (a manifest from the network carries them).
    pub fn check(&self) -> Result<(), String> {
        if !self.avg.is_power_of_two()
            || self.avg < 256
            || self.min < 64
            || self.min > self.avg
            || self.avg > self.max
            || self.max > 16 << 20
        {
            return Err(format!(
                "bad chunk sizes min {} avg {} max {}: need 64 <= min <= avg <= max <= 16 MiB, avg a power of two >= 256",
                self.min, self.avg, self.max
            ));
        }
        Ok(())
    }

    fn masks(&self) -> (u64, u64) {
        let bits = self.avg.trailing_zeros();
        // Normalized chunking: harder to cut before `avg`, easier after. Top bits of the
        // gear hash depend on the last 64 bytes.
        let small = u64::MAX << (64 - (bits + 2).min(63));
        let large = u64::MAX << (64 - bits.saturating_sub(2).max(1));
        (small, large)
    }
}

/// One chunk: its place in the file and the BLAKE3 hash of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u32,
    pub hash: [u8; 32],
}

static GEAR: [u64; 256] = gear_table();

const fn gear_table() -> [u64; 256] {
    // splitmix64 from a fixed seed: the table is part of the format.
    let mut t = [0u64; 256];
    let mut s: u64 = 0x6661_696c_6f76_6572; // "failover"
    let mut i = 0;
    while i < 256 {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        t[i] = z ^ (z >> 31);
        i += 1;
    }
    t
}

/// Length of the first chunk of `data`, which starts at `offset` in the file (all of it
/// if shorter than `max` and no cut is found; callers pass at least `max` bytes unless at
/// the end of the file).
///
/// A chunk never crosses a multiple of `max` in the file: snapshots are page images, whose
/// long runs of free pages (zeros, or the same stale bytes) would otherwise be cut relative
/// to where the run starts, so that every chunk of the run moves when a page is allocated
/// at its start. Aligned, they stay where they are, and only the chunks around written
/// pages change.
pub fn cut(data: &[u8], p: &Params, offset: u64) -> usize {
    let (min, avg, max) = (p.min as usize, p.avg as usize, p.max as usize);
    let room = (p.max as u64 - offset % p.max as u64) as usize;
    let n = data.len().min(room);
    if n <= min {
        return n;
    }
    let end = n.min(max);
    let normal = end.min(avg);
    let (small, large) = p.masks();
    let mut h: u64 = 0;
    let mut i = min;
    while i < normal {
        h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
        if h & small == 0 {
            return i + 1;
        }
        i += 1;
    }
    while i < end {
        h = (h << 1).wrapping_add(GEAR[data[i] as usize]);
        if h & large == 0 {
            return i + 1;
        }
        i += 1;
    }
    end
}

/// Split `data` (a whole file in memory) into chunks and hash them.
pub fn chunk_slice(data: &[u8], p: &Params) -> Vec<Chunk> {
    let mut out = Vec::with_capacity(data.len() / p.avg as usize + 1);
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
            buf: Vec::with_capacity(2 * params.max as usize),
            offset: 0,
            chunks: Vec::new(),
        }
    }

    /// Add bytes; every chunk that is complete (at least `max` bytes follow its start, so
    /// its end cannot depend on bytes not seen yet) goes to `on_chunk`. Fewer than `max`
    /// bytes are held between calls; the rest is cut where it lies, without copying.
    pub fn push<E>(
        &mut self,
        mut data: &[u8],
        on_chunk: &mut impl FnMut(&Chunk, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let max = self.params.max as usize;
        // Held bytes first: complete them to `max` with the head of `data`, cut one chunk,
        // and give back the bytes of `data` it did not take.
        while !self.buf.is_empty() {
            let held = self.buf.len();
            let need = max.saturating_sub(held).min(data.len());
            self.buf.extend_from_slice(&data[..need]);
            if self.buf.len() < max {
                return Ok(());
            }
            let len = cut(&self.buf, &self.params, self.offset);
            emit(
                &mut self.chunks,
                &mut self.offset,
                &self.buf[..len],
                on_chunk,
            )?;
            if len >= held {
                data = &data[len - held..];
                self.buf.clear();
            } else {
                self.buf.truncate(held);
                self.buf.drain(..len);
            }
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
        while !self.buf.is_empty() {
            let len = cut(&self.buf, &self.params, self.offset);
            emit(
                &mut self.chunks,
                &mut self.offset,
                &self.buf[..len],
                on_chunk,
            )?;
            self.buf.drain(..len);
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
            assert!(c.len <= p.max);
            let end = c.offset + c.len as u64;
            assert!(
                c.offset / p.max as u64 == (end - 1) / p.max as u64,
                "chunk {i} crosses a multiple of max"
            );
            if i + 1 < chunks.len() && !end.is_multiple_of(p.max as u64) {
                assert!(c.len > p.min, "chunk {i} is {} bytes", c.len);
            }
            off += c.len as u64;
        }
        assert_eq!(off, data.len() as u64);
        let avg = data.len() / chunks.len();
        assert!(
            (p.avg as usize / 2..p.avg as usize * 2).contains(&avg),
            "average chunk {avg} bytes"
        );
    }

    #[test]
    fn pages_written_in_an_image_change_only_their_chunks() {
        let p = Params::DEFAULT;
        // An image: data, then a long run of free (zero) pages.
        let mut old = pseudo_random(6 << 20, 11);
        old.extend(std::iter::repeat_n(0u8, 3 << 20));
        let mut new = old.clone();
        // Pages written: scattered ones, and the first page of the free run (which used
        // to shift every chunk of the run).
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
        assert!(changed >= 4 * 4096);
        assert!(
            changed <= pages.len() as u64 * 2 * p.max as u64,
            "{changed} bytes of chunks changed for {} pages written",
            pages.len()
        );
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
        for (min, avg, max) in [(0, 1024, 4096), (2048, 1000, 4096), (64, 4096, 1024)] {
            assert!(Params { min, avg, max }.check().is_err());
        }
    }

    #[test]
    fn pushed_pieces_give_the_same_chunks_and_bytes_as_the_whole() {
        let data = pseudo_random(700_000, 9);
        let p = Params::DEFAULT;
        let whole = chunk_slice(&data, &p);
        // 0: pieces of varying sizes, below and above `max`.
        for piece in [1usize, 977, 65535, 65536, 65537, 100_003, 1 << 20, 0] {
            let mut ch = Chunker::new(p);
            let mut rebuilt = Vec::new();
            let mut on = |c: &Chunk, b: &[u8]| {
                assert_eq!(c.offset as usize, rebuilt.len());
                assert_eq!(c.len as usize, b.len());
                rebuilt.extend_from_slice(b);
                Ok::<(), ()>(())
            };
            let sizes = [1usize, 70_000, 5_000, 300_000, 64 << 10, 3];
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

//! Which pages of the database file were written since a page image was taken, so that
//! the next image can carry only those (`image since=TOKEN` on the admin socket).
//!
//! [`Tracked`] is the redb storage backend of the conode: redb's own file backend, with
//! every `write` and `set_len` recorded in a [`DirtyLog`] before it is passed on. Each
//! image gets a **token**; the log keeps, for the newest [`KEPT_TOKENS`] tokens, the pages
//! written since each was handed out. A token from an image the client did not finish
//! (a broken transfer) therefore still works, and names every page written since.
//!
//! Tokens start with a random-enough instance number (the time in nanoseconds at open and
//! the process id), so a token from before a restart is unknown to the new process and
//! gets a whole image. The log never claims a page is clean that may not be: a shrink of
//! the file marks the cut pages (a later growth reads them back as zeros), and past
//! [`MAX_PAGES`] pages per token the token is dropped (a whole image follows).

use std::collections::{BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

type BackendIoError = std::io::Error;

/// Granularity of the log, in bytes (redb's page size).
pub const PAGE: u64 = 4096;
/// Tokens whose written pages are kept.
pub const KEPT_TOKENS: usize = 3;
/// Pages recorded per token at most (1 GiB of changes); past it the token is dropped.
pub const MAX_PAGES: usize = 1 << 18;

#[derive(Debug, Default)]
struct Log {
    instance: u64,
    next: u64,
    /// Oldest first: (token number, pages written since it was handed out).
    since: VecDeque<(u64, BTreeSet<u64>)>,
}

/// The pages written since each of the newest tokens (shared by [`Tracked`] and the image).
#[derive(Debug, Default)]
pub struct DirtyLog(Mutex<Log>);

impl DirtyLog {
    pub fn new() -> Arc<DirtyLog> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let instance = nanos ^ ((std::process::id() as u64) << 40);
        Arc::new(DirtyLog(Mutex::new(Log {
            instance,
            ..Default::default()
        })))
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mark(&self, start: u64, end: u64) {
        if end <= start {
            return;
        }
        let mut l = self.log();
        let (first, last) = (start / PAGE, (end - 1) / PAGE);
        l.since.retain_mut(|(_, pages)| {
            pages.extend(first..=last);
            pages.len() <= MAX_PAGES
        });
    }

    /// Whether any page was written since the newest token was handed out (true when
    /// none was yet).
    pub fn written_since_newest(&self) -> bool {
        self.log().since.back().is_none_or(|(_, p)| !p.is_empty())
    }

    /// Hand out a new token and, if `since` is a token still kept, the pages written
    /// since it (sorted). Call it while no write can run (the image holds the writers).
    pub fn rotate(&self, since: Option<&str>) -> (String, Option<Vec<u64>>) {
        let mut l = self.log();
        let pages = since
            .and_then(|t| parse_token(t, l.instance))
            .and_then(|n| l.since.iter().find(|(k, _)| *k == n))
            .map(|(_, p)| p.iter().copied().collect());
        let n = l.next;
        l.next += 1;
        l.since.push_back((n, BTreeSet::new()));
        while l.since.len() > KEPT_TOKENS {
            l.since.pop_front();
        }
        (format!("{:016x}-{n}", l.instance), pages)
    }
}

fn parse_token(t: &str, instance: u64) -> Option<u64> {
    let (i, n) = t.split_once('-')?;
    if u64::from_str_radix(i, 16).ok()? != instance {
        return None;
    }
    n.parse().ok()
}

/// redb's file backend, recording what is written into a [`DirtyLog`].
#[derive(Debug)]
pub struct Tracked {
    inner: FileBackend,
    log: Arc<DirtyLog>,
}

impl Tracked {
    pub fn new(inner: FileBackend, log: Arc<DirtyLog>) -> Tracked {
        Tracked { inner, log }
    }
}

impl StorageBackend for Tracked {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        let old = self.inner.len()?;
        if len < old {
            // Cut pages read back as zeros if the file grows again: an image must send them.
            self.log.mark(len, old);
        }
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        self.log.mark(offset, offset + data.len() as u64);
        self.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), BackendIoError> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_the_pages_written_since_it_and_only_kept_tokens_work() {
        let log = DirtyLog::new();
        let (t0, none) = log.rotate(None);
        assert!(none.is_none());
        log.mark(PAGE * 3 + 10, PAGE * 5 + 1);
        let (t1, p) = log.rotate(Some(&t0));
        assert_eq!(p, Some(vec![3, 4, 5]));
        log.mark(0, 1);
        // A retry with the older token still sees everything since it.
        let (_, p) = log.rotate(Some(&t0));
        assert_eq!(p, Some(vec![0, 3, 4, 5]));
        let (_, p) = log.rotate(Some(&t1));
        assert_eq!(p, Some(vec![0]));
        // Three newer tokens pushed t0 out; foreign and malformed tokens are unknown.
        assert_eq!(log.rotate(Some(&t0)).1, None);
        assert_eq!(log.rotate(Some("0000000000000001-1")).1, None);
        assert_eq!(log.rotate(Some("garbage")).1, None);
    }

    #[test]
    fn a_token_with_too_many_pages_is_dropped() {
        let log = DirtyLog::new();
        let (t, _) = log.rotate(None);
        log.mark(0, PAGE * (MAX_PAGES as u64 + 1));
        assert_eq!(log.rotate(Some(&t)).1, None);
    }
}

//! One accept loop for every listener of the daemon (peer port, control socket,
//! `/metrics`), in the manner of mini-redis: a semaphore bounds the connections served at
//! once (beyond it, new connections wait in the kernel's backlog), and an accept error
//! (EMFILE, ENFILE, ENOBUFS…) backs off instead of spinning.
//!
//! Never does any work of a connection itself: each connection runs in a task of its own.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

/// A listening socket: TCP or Unix.
pub trait Listener: Send + 'static {
    type Io: Send + 'static;
    /// The next connection and where it comes from, in words.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, String)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, String)> {
        let (s, a) = tokio::net::TcpListener::accept(self).await?;
        Ok((s, a.to_string()))
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, String)> {
        let (s, _) = tokio::net::UnixListener::accept(self).await?;
        Ok((s, "the control socket".to_string()))
    }
}

/// The first and the longest wait after an accept error.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accept connections on `listener` until `shutdown` turns true, each served by `serve` in
/// a task of its own, at most `limit` at once. Returns only at shutdown.
pub async fn serve<L, F, Fut>(
    name: &'static str,
    listener: L,
    limit: usize,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) -> Result<(), String>
where
    L: Listener,
    F: Fn(L::Io, String) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limit));
    let mut backoff = BACKOFF_MIN;
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.map_err(|_| format!("{name}: the connection limit was closed: this is a bug"))?,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        match accepted {
            Ok((io, from)) => {
                backoff = BACKOFF_MIN;
                let fut = serve(io, from);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("{name}: accept failed: {e}; trying again in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => return Ok(()),
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A listener that fails like a process out of file descriptors.
    struct Failing(Arc<AtomicUsize>);

    impl Listener for Failing {
        type Io = ();
        async fn accept(&self) -> std::io::Result<((), String)> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Err(std::io::Error::from_raw_os_error(24)) // EMFILE
        }
    }

    #[tokio::test]
    async fn accept_errors_back_off_instead_of_spinning() {
        let calls = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = watch::channel(false);
        let t = tokio::spawn(serve("test", Failing(calls.clone()), 4, rx, |_, _| async {}));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.send(true).unwrap();
        t.await.unwrap().unwrap();
        // 10 ms doubling to 1 s: about 8 tries in 1.5 s, not millions.
        let n = calls.load(Ordering::SeqCst);
        assert!((3..=20).contains(&n), "{n} accepts in 1.5 s");
    }

    #[tokio::test]
    async fn at_most_limit_connections_are_served_at_once() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let busy = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (b, m) = (busy.clone(), most.clone());
        let t = tokio::spawn(serve("test", l, 2, rx, move |_s, _| {
            let (b, m) = (b.clone(), m.clone());
            async move {
                let now = b.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                b.fetch_sub(1, Ordering::SeqCst);
            }
        }));
        let mut conns = Vec::new();
        for _ in 0..6 {
            conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(900)).await;
        tx.send(true).unwrap();
        t.await.unwrap().unwrap();
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }
}

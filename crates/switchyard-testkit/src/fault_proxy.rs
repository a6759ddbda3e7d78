//! A TCP proxy that can cut every connection through it, for testing what a
//! transport does when its broker connection dies (the shared broker itself
//! must never be restarted by a test).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards connections from a local port to `upstream`; [`cut`](Self::cut)
/// drops every live connection at once (new ones are accepted again).
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use switchyard_testkit::FaultProxy;
///
/// let proxy = FaultProxy::start("127.0.0.1:5672").await?;
/// let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
/// // ... connect through `url`, then:
/// proxy.cut();
/// # Ok(()) }
/// ```
pub struct FaultProxy {
    addr: SocketAddr,
    cuts: watch::Sender<u64>,
    live: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on an ephemeral port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: &str) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cuts, _) = watch::channel(0u64);
        let live = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_owned();
        let accept = tokio::spawn({
            let cuts = cuts.clone();
            let live = Arc::clone(&live);
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut cut = cuts.subscribe();
                    let upstream = upstream.clone();
                    let live = Arc::clone(&live);
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        live.fetch_add(1, Ordering::SeqCst);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = cut.changed() => {}
                        }
                        live.fetch_sub(1, Ordering::SeqCst);
                        // Both sockets drop here: the peers see the connection die.
                    });
                }
            }
        });
        Ok(FaultProxy {
            addr,
            cuts,
            live,
            accept,
        })
    }

    /// The address to connect to instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections currently forwarded.
    pub fn live_connections(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Drops every live connection.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

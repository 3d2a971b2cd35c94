//! The target's TLS listener: TCP connections accepted, their handshakes
//! run each in its own task under a deadline, and only finished TLS
//! streams handed to axum. A handshake never runs in the accept loop, so a
//! peer that connects and says nothing cannot hold up the others.
//!
//! Calls `tlsconf` (through `serve`), tokio-rustls.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// How long a peer has to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for axum to take them.
const READY_QUEUE: usize = 64;

pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; must run inside a tokio runtime. The
    /// accept loop ends when the listener is dropped.
    pub fn start(tcp: TcpListener, config: Arc<ServerConfig>) -> io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(READY_QUEUE);
        let acceptor = TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tokio::select! {
                    r = tcp.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            accept_failed(e).await;
                            continue;
                        }
                    },
                    _ = tx.closed() => return,
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            // Closed only when the server is stopping.
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => log::debug!("{peer}: TLS handshake failed: {e}"),
                        Err(_) => log::debug!("{peer}: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

/// What axum's own TCP listener does: errors that concern one connection
/// are dropped, others (out of file descriptors) are logged and waited
/// out so the loop does not spin.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    log::error!("accepting a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop holds the sender until this listener is
            // dropped, so this is unreachable; wait rather than panic.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

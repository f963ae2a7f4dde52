//! A small HTTP/1.1 client over a Unix socket (hyper), used by the CLI to reach the daemon and by
//! the daemon to reach each VMM's API socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
pub use hyper::Method;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {path} failed: {source}")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("bad request to {}: {source}", .path.display())]
    Build {
        path: PathBuf,
        #[source]
        source: hyper::http::Error,
    },
}

impl ClientError {
    /// Whether nobody is listening (no socket file, or a stale one).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Connect { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused))
    }
}

/// How long a connect keeps retrying a socket that exists but does not accept yet.
const CONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(1000);

/// Connects, retrying briefly where the socket file exists but nobody accepts yet: a VMM (or a
/// daemon) binds its socket a moment before it calls listen(), and connect() in that window gets
/// ECONNREFUSED; a full backlog gets EAGAIN. A missing file is reported at once.
pub async fn connect(sock: &Path) -> Result<tokio::net::UnixStream, ClientError> {
    let deadline = tokio::time::Instant::now() + CONNECT_RETRY;
    let mut pause = std::time::Duration::from_millis(1);
    loop {
        match tokio::net::UnixStream::connect(sock).await {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::WouldBlock
                ) && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(50));
            }
            Err(source) => {
                return Err(ClientError::Connect {
                    path: sock.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Sends one request and returns the response with its body still streaming.
pub async fn send(
    sock: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<Response<Incoming>, ClientError> {
    let stream = connect(sock).await?;
    let http = |source| ClientError::Http {
        path: sock.to_path_buf(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(async move {
        // The connection ends with the response; its error, if any, surfaces through `send_request`.
        let _ = conn.await;
    });
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, "localhost");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|source| ClientError::Build {
            path: sock.to_path_buf(),
            source,
        })?;
    sender.send_request(req).await.map_err(http)
}

/// Sends one request and collects the whole response body.
pub async fn call(
    sock: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let resp = send(sock, method, uri, body).await?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|source| ClientError::Http {
            path: sock.to_path_buf(),
            source,
        })?
        .to_bytes();
    Ok((status, bytes))
}

/// The `fault_message` of an error body, or the body itself when it is not one.
pub fn fault_text(body: &[u8]) -> String {
    match serde_json::from_slice::<corefour_api::Fault>(body) {
        Ok(f) => f.fault_message,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

/// The same calls for synchronous callers (the CLI): each runs on a small current-thread runtime.
pub mod blocking {
    use std::path::Path;

    use hyper::body::Bytes;
    use hyper::{Method, StatusCode};

    use super::ClientError;

    pub struct Client {
        rt: tokio::runtime::Runtime,
    }

    impl Client {
        pub fn new() -> std::io::Result<Client> {
            Ok(Client {
                rt: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            })
        }

        pub fn call(
            &self,
            sock: &Path,
            method: Method,
            uri: &str,
            body: Option<Vec<u8>>,
        ) -> Result<(StatusCode, Bytes), ClientError> {
            self.rt.block_on(super::call(sock, method, uri, body))
        }

        /// Streams the response body to `sink` chunk by chunk (for `console --follow`).
        pub fn stream(
            &self,
            sock: &Path,
            uri: &str,
            mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
        ) -> Result<StatusCode, ClientError> {
            use http_body_util::BodyExt;
            self.rt.block_on(async {
                let resp = super::send(sock, Method::GET, uri, None).await?;
                let status = resp.status();
                let mut body = resp.into_body();
                while let Some(frame) = body.frame().await {
                    let frame = frame.map_err(|source| ClientError::Http {
                        path: sock.to_path_buf(),
                        source,
                    })?;
                    if let Some(data) = frame.data_ref() {
                        if sink(data).is_err() {
                            break;
                        }
                    }
                }
                Ok(status)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that is bound but not yet listening refuses connections; the client waits for
    /// listen() instead of failing.
    #[test]
    fn connect_waits_for_listen_after_bind() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("s.sock");
        // SAFETY: plain socket/bind/listen syscalls on a sockaddr_un built below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        // SAFETY: zeroed sockaddr_un is a valid value; the path fits in sun_path.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (i, b) in path.as_os_str().as_encoded_bytes().iter().enumerate() {
            addr.sun_path[i] = *b as libc::c_char;
        }
        // SAFETY: fd is a fresh socket and addr a valid sockaddr_un of the given size.
        let r = unsafe {
            libc::bind(
                fd,
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let listener = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            // SAFETY: fd is the bound socket from above, owned by this test.
            assert_eq!(unsafe { libc::listen(fd, 8) }, 0);
            fd
        });
        let t0 = std::time::Instant::now();
        let r = rt.block_on(connect(&path));
        assert!(r.is_ok(), "{r:?}");
        assert!(t0.elapsed() >= std::time::Duration::from_millis(90));
        let fd = listener.join().unwrap();
        // SAFETY: closing the socket this test opened.
        unsafe { libc::close(fd) };
        // No file at all: an error at once.
        let t0 = std::time::Instant::now();
        let e = rt
            .block_on(connect(&t.path().join("none.sock")))
            .unwrap_err();
        assert!(e.is_unreachable());
        assert!(t0.elapsed() < std::time::Duration::from_millis(50));
    }
}

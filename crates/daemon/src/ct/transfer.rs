//! Moving archives over a daemon's socket without holding them in memory: a response body
//! streamed into a file (`ct export`), a file streamed as a request body (`ct import`, `ct move`).
//! The general client (`crate::client`) collects bodies whole, which is right for JSON only.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot connect to the daemon at {path}: {source}")]
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
    #[error("bad request: {0}")]
    Build(#[source] hyper::http::Error),
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start an async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

const CHUNK: usize = 256 << 10;

type FileBody =
    StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

fn file_body(file: tokio::fs::File, progress: Box<dyn FnMut(u64) + Send>) -> FileBody {
    let s = futures_util::stream::unfold(Some((file, progress)), |st| async move {
        let (mut f, mut tick) = st?;
        let mut buf = vec![0u8; CHUNK];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                tick(n as u64);
                Some((Ok(Frame::data(Bytes::from(buf))), Some((f, tick))))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    StreamBody::new(futures_util::StreamExt::boxed(s))
}

async fn connect<B>(
    sock: &Path,
) -> Result<hyper::client::conn::http1::SendRequest<B>, TransferError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = crate::client::connect(sock).await.map_err(|e| match e {
        crate::client::ClientError::Connect { path, source } => {
            TransferError::Connect { path, source }
        }
        other => TransferError::Connect {
            path: sock.to_path_buf(),
            source: std::io::Error::other(other.to_string()),
        },
    })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| TransferError::Http {
            path: sock.to_path_buf(),
            source,
        })?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// `method uri` with a JSON body; a 2xx response body goes into `out` (through `out.partial`
/// and a rename), anything else comes back whole for its error message.
pub async fn download(
    sock: &Path,
    method: Method,
    uri: &str,
    json: Option<Vec<u8>>,
    out: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<(StatusCode, Bytes), TransferError> {
    let http = |source| TransferError::Http {
        path: sock.to_path_buf(),
        source,
    };
    let mut sender = connect::<http_body_util::Full<Bytes>>(sock).await?;
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, "localhost");
    if json.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(http_body_util::Full::new(Bytes::from(
            json.unwrap_or_default(),
        )))
        .map_err(TransferError::Build)?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let b = body.collect().await.map_err(http)?.to_bytes();
        return Ok((status, b));
    }
    let partial = out.with_extension("partial");
    let file_err = |what, source| TransferError::File {
        what,
        path: partial.clone(),
        source,
    };
    let mut f = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| file_err("cannot create", e))?;
    let r = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(http)?;
            if let Some(d) = frame.data_ref() {
                f.write_all(d)
                    .await
                    .map_err(|e| file_err("cannot write", e))?;
                progress(d.len() as u64);
            }
        }
        f.sync_all().await.map_err(|e| file_err("cannot sync", e))?;
        tokio::fs::rename(&partial, out)
            .await
            .map_err(|e| file_err("cannot rename", e))
    }
    .await;
    if r.is_err() {
        let _ = tokio::fs::remove_file(&partial).await;
    }
    r.map(|()| (status, Bytes::new()))
}

/// `POST uri` with `file` as the body, streamed; returns the whole response.
pub async fn upload(
    sock: &Path,
    uri: &str,
    file: &Path,
    progress: Box<dyn FnMut(u64) + Send>,
) -> Result<(StatusCode, Bytes), TransferError> {
    let http = |source| TransferError::Http {
        path: sock.to_path_buf(),
        source,
    };
    let f = tokio::fs::File::open(file)
        .await
        .map_err(|source| TransferError::File {
            what: "cannot open",
            path: file.to_path_buf(),
            source,
        })?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut sender = connect::<FileBody>(sock).await?;
    let req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::CONTENT_TYPE, "application/zstd")
        .header(hyper::header::CONTENT_LENGTH, len)
        .body(file_body(f, progress))
        .map_err(TransferError::Build)?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status();
    let b = resp.into_body().collect().await.map_err(http)?.to_bytes();
    Ok((status, b))
}

/// The same for synchronous callers (the CLI).
pub mod blocking {
    use super::*;

    fn rt() -> Result<tokio::runtime::Runtime, TransferError> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(TransferError::Runtime)
    }

    pub fn download(
        sock: &Path,
        method: Method,
        uri: &str,
        json: Option<Vec<u8>>,
        out: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(StatusCode, Bytes), TransferError> {
        rt()?.block_on(super::download(sock, method, uri, json, out, progress))
    }

    pub fn upload(
        sock: &Path,
        uri: &str,
        file: &Path,
        progress: Box<dyn FnMut(u64) + Send>,
    ) -> Result<(StatusCode, Bytes), TransferError> {
        rt()?.block_on(super::upload(sock, uri, file, progress))
    }
}

//! The REST API: routes, request parsing, and serving on a Unix socket.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use corefour_api::{StopRequest, VmCreate, VmInfo, VmLimits};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::DaemonError;
use crate::lifecycle::Daemon;

/// Every route the daemon serves (method, path template); the OpenAPI document must describe each.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/openapi.json"),
    ("get", "/v1/vms"),
    ("post", "/v1/vms"),
    ("get", "/v1/vms/{name}"),
    ("patch", "/v1/vms/{name}"),
    ("delete", "/v1/vms/{name}"),
    ("post", "/v1/vms/{name}/start"),
    ("post", "/v1/vms/{name}/stop"),
    ("post", "/v1/vms/{name}/kill"),
    ("post", "/v1/vms/{name}/pause"),
    ("post", "/v1/vms/{name}/resume"),
    ("post", "/v1/vms/{name}/snapshot"),
    ("post", "/v1/vms/{name}/clone"),
    ("post", "/v1/vms/{name}/restore"),
    ("post", "/v1/vms/{name}/migrate"),
    ("get", "/v1/vms/{name}/console"),
    ("get", "/v1/events"),
];

type AppState = State<Arc<Daemon>>;
type ApiResult<T> = Result<T, DaemonError>;

/// The VMs or the containers of this daemon: the verbs `/v1/vms` and `/v1/cts` answer alike, so
/// one set of generic handlers (below) serves both; only the types and a few constants differ.
pub(crate) trait Instances: Send + Sync + 'static {
    type Create: DeserializeOwned + Send;
    type Limits: DeserializeOwned + Send;
    type Info: Serialize + Send;
    /// What a create and a limits body are called in a 400's message.
    const CREATE_BODY: &'static str;
    const LIMITS_BODY: &'static str;
    /// The grace period of a stop request without `timeout_secs`.
    const DEFAULT_STOP_TIMEOUT: Duration;
    /// How a console follower polls for new output.
    const CONSOLE_POLL: ConsolePoll;

    fn list(&self) -> ApiResult<Vec<Self::Info>>;
    fn info(&self, name: &str) -> ApiResult<Self::Info>;
    fn console_path(&self, name: &str) -> ApiResult<PathBuf>;
    /// Whether the instance's process still runs (a console follower stops once it does not).
    fn is_active(&self, name: &str) -> bool;
    fn create(
        self: &Arc<Self>,
        req: Self::Create,
    ) -> impl Future<Output = ApiResult<Self::Info>> + Send;
    fn set_limits(
        self: &Arc<Self>,
        name: &str,
        req: Self::Limits,
    ) -> impl Future<Output = ApiResult<Self::Info>> + Send;
    fn delete(
        self: &Arc<Self>,
        name: &str,
        force: bool,
    ) -> impl Future<Output = ApiResult<()>> + Send;
    fn start(self: &Arc<Self>, name: &str) -> impl Future<Output = ApiResult<Self::Info>> + Send;
    fn stop(
        self: &Arc<Self>,
        name: &str,
        timeout: Duration,
    ) -> impl Future<Output = ApiResult<Self::Info>> + Send;
    fn kill(self: &Arc<Self>, name: &str) -> impl Future<Output = ApiResult<Self::Info>> + Send;
    fn pause(self: &Arc<Self>, name: &str) -> impl Future<Output = ApiResult<Self::Info>> + Send;
    fn resume(self: &Arc<Self>, name: &str) -> impl Future<Output = ApiResult<Self::Info>> + Send;
}

/// `impl Instances for T { types and constants }` whose verbs are T's inherent ones of the same
/// names (other code in the daemon calls those directly, without the trait).
macro_rules! forward_instances {
    ($t:ty { $($items:item)* }) => {
        impl $crate::server::Instances for $t {
            $($items)*

            fn list(&self) -> Result<Vec<Self::Info>, $crate::DaemonError> {
                <$t>::list(self)
            }
            fn info(&self, name: &str) -> Result<Self::Info, $crate::DaemonError> {
                <$t>::info(self, name)
            }
            fn console_path(&self, name: &str) -> Result<std::path::PathBuf, $crate::DaemonError> {
                <$t>::console_path(self, name)
            }
            fn is_active(&self, name: &str) -> bool {
                <$t>::is_active(self, name)
            }
            fn create(
                self: &std::sync::Arc<Self>,
                req: Self::Create,
            ) -> impl std::future::Future<Output = Result<Self::Info, $crate::DaemonError>> + Send {
                <$t>::create(self, req)
            }
            fn set_limits(
                self: &std::sync::Arc<Self>,
                name: &str,
                req: Self::Limits,
            ) -> impl std::future::Future<Output = Result<Self::Info, $crate::DaemonError>> + Send {
                <$t>::set_limits(self, name, req)
            }
            fn delete(
                self: &std::sync::Arc<Self>,
                name: &str,
                force: bool,
            ) -> impl std::future::Future<Output = Result<(), $crate::DaemonError>> + Send {
                <$t>::delete(self, name, force)
            }
            fn start(
                self: &std::sync::Arc<Self>,
                name: &str,
            ) -> impl std::future::Future<Output = Result<Self::Info, $crate::DaemonError>> + Send {
                <$t>::start(self, name)
            }
            fn stop(
                self: &std::sync::Arc<Self>,
                name: &str,
                timeout: std::time::Duration,
            ) -> impl std::future::Future<Output = Result<Self::Info, $crate::DaemonError>> + Send {
                <$t>::stop(self, name, timeout)
            }
            fn kill(
                self: &std::sync::Arc<Self>,
                name: &str,
            ) -> impl std::future::Future<Output = Result<Self::Info, $crate::DaemonError>> + Send {
                <$t>::kill(self, name)
            }
            fn pause(
                self: &std::sync::Arc<Self>,
                name: &str,
            ) -> impl std::future::Future<Output = Result<Self::Info, $crate::DaemonError>> + Send {
                <$t>::pause(self, name)
            }
            fn resume(
                self: &std::sync::Arc<Self>,
                name: &str,
            ) -> impl std::future::Future<Output = Result<Self::Info, $crate::DaemonError>> + Send {
                <$t>::resume(self, name)
            }
        }
    };
}
pub(crate) use forward_instances;

/// The routes every kind of instance has under `base` (`/v1/vms`, `/v1/cts`).
pub(crate) fn instance_routes<I: Instances>(base: &str) -> Router<Arc<I>> {
    let one = format!("{base}/{{name}}");
    Router::new()
        .route(base, get(list::<I>).post(create::<I>))
        .route(&one, get(info::<I>).patch(patch::<I>).delete(delete::<I>))
        .route(&format!("{one}/start"), post(start::<I>))
        .route(&format!("{one}/stop"), post(stop::<I>))
        .route(&format!("{one}/kill"), post(kill::<I>))
        .route(&format!("{one}/pause"), post(pause::<I>))
        .route(&format!("{one}/resume"), post(resume::<I>))
        .route(&format!("{one}/console"), get(console::<I>))
}

pub fn router(d: Arc<Daemon>, cts: Arc<crate::ct::Cts>) -> Router {
    let ct_routes = crate::ct::routes::router(cts);
    instance_routes::<Daemon>("/v1/vms")
        .route("/openapi.json", get(openapi))
        .route("/v1/vms/{name}/snapshot", post(snapshot_vm))
        .route("/v1/vms/{name}/clone", post(clone_vm))
        .route("/v1/vms/{name}/restore", post(restore_vm))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/events", get(events))
        .fallback(no_route)
        .with_state(d)
        .merge(ct_routes)
}

forward_instances!(Daemon {
    type Create = VmCreate;
    type Limits = VmLimits;
    type Info = VmInfo;
    const CREATE_BODY: &'static str = "create";
    const LIMITS_BODY: &'static str = "limits";
    const DEFAULT_STOP_TIMEOUT: Duration = crate::lifecycle::DEFAULT_STOP_TIMEOUT;
    // Fine-grained while a VM boots (a bench waits for its first line), coarse for a long-lived
    // follower.
    const CONSOLE_POLL: ConsolePoll = ConsolePoll {
        first: Duration::from_millis(2),
        first_second_cap: Duration::from_millis(4),
        cap: Duration::from_millis(100),
    };
});

async fn no_route(uri: axum::http::Uri, method: axum::http::Method) -> DaemonError {
    DaemonError::NotFound(format!(
        "no route {method} {}: see GET /openapi.json",
        uri.path()
    ))
}

/// Parses a JSON body with serde's own message ("unknown field `vcpu`, expected one of ...") and a
/// 400, where axum's extractor would answer 422 with a generic text.
fn parse_body<T: DeserializeOwned>(body: &[u8], what: &str) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| DaemonError::BadRequest(format!("invalid {what} request body: {e}")))
}

/// A body that may be empty: empty (or whitespace) means the request's defaults.
pub(crate) fn parse_optional_body<T: DeserializeOwned + Default>(
    body: &[u8],
    what: &str,
) -> ApiResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_body(body, what)
    }
}

/// The grace period of a stop request (`{"timeout_secs": N}` or an empty body).
fn stop_timeout(body: &[u8], default: Duration) -> ApiResult<Duration> {
    let req: StopRequest = parse_optional_body(body, "stop")?;
    Ok(req.timeout_secs.map_or(default, Duration::from_secs))
}

/// Query strings are parsed by hand for the same reason: one error format, with the field named.
pub(crate) type QueryMap = std::collections::BTreeMap<String, String>;

pub(crate) fn parse_query<T: DeserializeOwned>(q: QueryMap) -> ApiResult<T> {
    // Query values arrive as strings; let numbers and booleans through as such.
    let obj = q
        .into_iter()
        .map(|(k, s)| {
            let v = serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s));
            (k, v)
        })
        .collect();
    serde_json::from_value(serde_json::Value::Object(obj))
        .map_err(|e| DaemonError::BadRequest(format!("invalid query string: {e}")))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        corefour_api::OPENAPI_JSON,
    )
        .into_response()
}

async fn list<I: Instances>(State(i): State<Arc<I>>) -> ApiResult<Response> {
    Ok(Json(i.list()?).into_response())
}

async fn create<I: Instances>(State(i): State<Arc<I>>, body: Bytes) -> ApiResult<Response> {
    let req: I::Create = parse_body(&body, I::CREATE_BODY)?;
    let info = i.create(req).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn info<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    Ok(Json(i.info(&name)?).into_response())
}

async fn patch<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: I::Limits = parse_body(&body, I::LIMITS_BODY)?;
    Ok(Json(i.set_limits(&name, req).await?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    force: bool,
}

async fn delete<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<QueryMap>,
) -> ApiResult<Response> {
    let q: DeleteQuery = parse_query(q)?;
    i.delete(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    Ok(Json(i.start(&name).await?).into_response())
}

async fn stop<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let timeout = stop_timeout(&body, I::DEFAULT_STOP_TIMEOUT)?;
    Ok(Json(i.stop(&name, timeout).await?).into_response())
}

async fn kill<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    Ok(Json(i.kill(&name).await?).into_response())
}

async fn pause<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    Ok(Json(i.pause(&name).await?).into_response())
}

async fn resume<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Response> {
    Ok(Json(i.resume(&name).await?).into_response())
}

async fn snapshot_vm(
    State(d): AppState,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: crate::lifecycle::SnapshotRequest = if body.is_empty() {
        Default::default()
    } else {
        parse_body(&body, "snapshot")?
    };
    Ok(Json(d.snapshot(&name, req).await?).into_response())
}

async fn clone_vm(
    State(d): AppState,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: crate::lifecycle::CloneRequest = parse_body(&body, "clone")?;
    let info = d.clone_vm(&name, req).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn restore_vm(
    State(d): AppState,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: crate::lifecycle::RestoreRequest = parse_body(&body, "restore")?;
    Ok(Json(d.restore(&name, req).await?).into_response())
}

async fn migrate_vm(
    State(d): AppState,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: crate::lifecycle::MigrateRequest = parse_body(&body, "migrate")?;
    Ok(Json(d.migrate(&name, req).await?).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Events after this id; absent: the newest `limit`.
    since: Option<i64>,
    limit: Option<u32>,
}

async fn events(State(d): AppState, Query(q): Query<QueryMap>) -> ApiResult<Response> {
    let q: EventsQuery = parse_query(q)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let evs = match q.since {
        Some(s) => d.inventory().events_since(s, limit)?,
        None => d.inventory().last_events(limit)?,
    };
    Ok(Json(evs).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    /// Keep the response open and stream new output until the instance stops.
    #[serde(default)]
    follow: bool,
    /// Start at this byte offset of the log.
    #[serde(default)]
    offset: u64,
}

/// How a console follower waits between reads that found nothing: `first`, doubling up to
/// `first_second_cap` within the first second of the request and up to `cap` after it.
pub(crate) struct ConsolePoll {
    pub(crate) first: Duration,
    pub(crate) first_second_cap: Duration,
    pub(crate) cap: Duration,
}

/// The console log; with `follow`, a stream that ends once the instance has stopped and all is
/// sent.
async fn console<I: Instances>(
    State(i): State<Arc<I>>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<QueryMap>,
) -> ApiResult<Response> {
    let q: ConsoleQuery = parse_query(q)?;
    let path = i.console_path(&name)?;
    let text = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    // Sent in chunks of at most 1 MiB, so a long log never sits in memory whole.
    let follow = q.follow;
    let started = tokio::time::Instant::now();
    let stream = futures_util::stream::unfold(
        (i, name, LogTail::new(path, q.offset)),
        move |(i, name, mut tail)| async move {
            let poll = I::CONSOLE_POLL;
            let mut backoff = poll.first;
            loop {
                // Read the activity flag before the file: output written before the process
                // exited is then always seen by the read that follows.
                let active = follow && i.is_active(&name);
                let chunk = tail.read();
                if !chunk.is_empty() {
                    return Some((Ok::<_, std::io::Error>(chunk), (i, name, tail)));
                }
                if !active {
                    return None;
                }
                tokio::time::sleep(backoff).await;
                let cap = if started.elapsed() < Duration::from_secs(1) {
                    poll.first_second_cap
                } else {
                    poll.cap
                };
                backoff = (backoff * 2).min(cap);
            }
        },
    );
    Ok((text, Body::from_stream(stream)).into_response())
}

/// A console log read from an offset on, the file kept open between reads. Plain std I/O: a read
/// of a local file that is being appended to does not block, and tokio's file type would cost a
/// blocking-pool round trip per poll.
struct LogTail {
    path: PathBuf,
    file: Option<std::fs::File>,
    off: u64,
}

impl LogTail {
    fn new(path: PathBuf, off: u64) -> LogTail {
        LogTail {
            path,
            file: None,
            off,
        }
    }

    /// Up to 1 MiB of new bytes (empty: nothing new yet, or no log yet).
    fn read(&mut self) -> Vec<u8> {
        use std::io::{Read, Seek};
        if self.file.is_none() {
            let Ok(mut f) = std::fs::File::open(&self.path) else {
                return Vec::new();
            };
            if f.seek(std::io::SeekFrom::Start(self.off)).is_err() {
                return Vec::new();
            }
            self.file = Some(f);
        }
        let mut buf = Vec::new();
        if let Some(f) = &mut self.file {
            let _ = f.take(1 << 20).read_to_end(&mut buf);
            // Shorter than where we are: the log was rotated (copied away and truncated in
            // place, see console_rotate); go on from its new start.
            if buf.is_empty() && f.metadata().is_ok_and(|m| m.len() < self.off) {
                self.off = 0;
                if f.seek(std::io::SeekFrom::Start(0)).is_ok() {
                    let _ = f.take(1 << 20).read_to_end(&mut buf);
                }
            }
        }
        self.off += buf.len() as u64;
        buf
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("another corefour daemon already listens on {0}")]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown group {0:?}")]
    Group(String),
    #[error("cannot set the owner or mode of {path}: {source}")]
    Perm {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket: mode 0600 (root only), or 0660 owned by `group` when one is given. A stale
/// socket file (nobody answering) is replaced; a live one is an error.
pub fn bind(path: &Path, group: Option<&str>) -> Result<tokio::net::UnixListener, ServeError> {
    let bind_err = |source| ServeError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let gid = match group {
        Some(g) => Some(lookup_group(g).ok_or_else(|| ServeError::Group(g.to_string()))?),
        None => None,
    };
    // The umask makes the socket private from its first moment; chmod below only widens it.
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(bind_err)?;
    let perm_err = |source| ServeError::Perm {
        path: path.to_path_buf(),
        source,
    };
    if let Some(gid) = gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(perm_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(perm_err)?;
    }
    listener.set_nonblocking(true).map_err(bind_err)?;
    tokio::net::UnixListener::from_std(listener).map_err(bind_err)
}

fn lookup_group(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Some(gid);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Serves until SIGINT or SIGTERM. VMs keep running when the daemon exits; the next daemon finds
/// them again.
pub async fn serve(
    listener: tokio::net::UnixListener,
    d: Arc<Daemon>,
    cts: Arc<crate::ct::Cts>,
) -> std::io::Result<()> {
    let app = router(d, cts);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutting down; running VMs keep running");
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_covers_every_route() {
        let doc: serde_json::Value = serde_json::from_str(corefour_api::OPENAPI_JSON).unwrap();
        let all: Vec<_> = ROUTES.iter().chain(crate::ct::routes::ROUTES).collect();
        for (method, path) in all.iter().copied() {
            assert!(
                doc["paths"][path][method].is_object(),
                "openapi.json lacks {method} {path}"
            );
        }
        // ...and describes nothing the daemon does not serve.
        let paths = doc["paths"].as_object().unwrap();
        for (p, ops) in paths {
            for m in ops.as_object().unwrap().keys() {
                assert!(
                    all.contains(&&(m.as_str(), p.as_str())),
                    "openapi.json describes {m} {p}, which the daemon does not serve"
                );
            }
        }
    }

    #[test]
    fn log_tail_starts_over_after_a_rotation() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("console.log");
        std::fs::write(&p, b"first part\n").unwrap();
        let mut tail = LogTail::new(p.clone(), 0);
        assert_eq!(tail.read(), b"first part\n");
        assert!(tail.read().is_empty());
        crate::console_rotate::rotate_if_larger(&p, 4).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"new"))
            .unwrap();
        assert_eq!(tail.read(), b"new");
    }

    #[test]
    fn groups_resolve() {
        assert_eq!(lookup_group("root"), Some(0));
        assert_eq!(lookup_group("7"), Some(7));
        assert_eq!(lookup_group("no-such-group-c4"), None);
    }
}

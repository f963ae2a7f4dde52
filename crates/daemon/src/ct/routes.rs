//! `/v1/cts`: the container routes, merged into the daemon's router.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use corefour_api::{CtCreate, CtExport, CtInfo, CtLimits};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::archive::Scratch;
use super::Cts;
use crate::error::DaemonError;
use crate::server::{
    forward_instances, instance_routes, parse_optional_body, parse_query, ConsolePoll, QueryMap,
};

/// Every container route (method, path template); the OpenAPI document describes each.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/cts"),
    ("post", "/v1/cts"),
    ("get", "/v1/cts/events"),
    ("post", "/v1/cts/import"),
    ("get", "/v1/cts/{name}"),
    ("patch", "/v1/cts/{name}"),
    ("delete", "/v1/cts/{name}"),
    ("post", "/v1/cts/{name}/start"),
    ("post", "/v1/cts/{name}/stop"),
    ("post", "/v1/cts/{name}/kill"),
    ("post", "/v1/cts/{name}/pause"),
    ("post", "/v1/cts/{name}/resume"),
    ("get", "/v1/cts/{name}/console"),
    ("post", "/v1/cts/{name}/export"),
];

type St = State<Arc<Cts>>;
type ApiResult<T> = Result<T, DaemonError>;

pub fn router(cts: Arc<Cts>) -> Router {
    instance_routes::<Cts>("/v1/cts")
        .route("/v1/cts/events", get(events))
        .route("/v1/cts/import", post(import))
        .route("/v1/cts/{name}/export", post(export))
        .with_state(cts)
}

forward_instances!(Cts {
    type Create = CtCreate;
    type Limits = CtLimits;
    type Info = CtInfo;
    const CREATE_BODY: &'static str = "container create";
    const LIMITS_BODY: &'static str = "container limits";
    const DEFAULT_STOP_TIMEOUT: Duration = super::DEFAULT_STOP_TIMEOUT;
    const CONSOLE_POLL: ConsolePoll = ConsolePoll {
        first: Duration::from_millis(100),
        first_second_cap: Duration::from_millis(100),
        cap: Duration::from_millis(100),
    };
});

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Only this container's events.
    name: Option<String>,
    since: Option<i64>,
    limit: Option<u32>,
}

async fn events(State(c): St, Query(q): Query<QueryMap>) -> ApiResult<Response> {
    let q: EventsQuery = parse_query(q)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let evs = c.inv().ct_events(q.name.as_deref(), q.since, limit)?;
    Ok(Json(evs).into_response())
}

/// The archive of a stopped container as the response body (application/zstd). It is built in
/// a scratch file first (the manifest comes last and needs every member hashed), which is
/// unlinked once open, so an interrupted download leaves nothing behind.
async fn export(State(c): St, UrlPath(name): UrlPath<String>, body: Bytes) -> ApiResult<Response> {
    let req: CtExport = parse_optional_body(&body, "export")?;
    crate::names::validate_name(&name)?;
    let work = Scratch::new(c.base(), "export", &name)?;
    let out = work.0.join("archive.tar.zst");
    c.export(&name, req.full, out.clone(), work.0.clone())
        .await?;
    let file = tokio::fs::File::open(&out)
        .await
        .map_err(|e| DaemonError::io(format!("cannot open {}", out.display()), e))?;
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    drop(work);
    let stream = futures_util::stream::unfold(Some(file), |f| async move {
        use tokio::io::AsyncReadExt;
        let mut f = f?;
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/zstd".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    /// Register under this name instead of the exported one.
    name: Option<String>,
    /// Start the container once registered.
    #[serde(default)]
    start: bool,
}

/// The request body is an archive from `export`; it is stored, verified in full (every member's
/// SHA-256), and only then registered.
async fn import(State(c): St, Query(q): Query<QueryMap>, body: Body) -> ApiResult<Response> {
    let q: ImportQuery = parse_query(q)?;
    if let Some(n) = &q.name {
        crate::names::validate_name(n)?;
    }
    let work = Scratch::new(c.base(), "upload", q.name.as_deref().unwrap_or("archive"))?;
    let path = work.0.join("archive.tar.zst");
    let mut f = tokio::fs::File::create(&path)
        .await
        .map_err(|e| DaemonError::io(format!("cannot create {}", path.display()), e))?;
    let mut data = body.into_data_stream();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| {
            DaemonError::BadRequest(format!(
                "the upload was cut off: {e}; nothing was registered"
            ))
        })?;
        f.write_all(&chunk)
            .await
            .map_err(|e| DaemonError::io(format!("cannot write {}", path.display()), e))?;
    }
    f.flush()
        .await
        .map_err(|e| DaemonError::io(format!("cannot write {}", path.display()), e))?;
    drop(f);
    let info = c.import(path, q.name, q.start).await;
    drop(work);
    Ok((StatusCode::CREATED, Json(info?)).into_response())
}

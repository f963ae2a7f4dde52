//! The VMM's own API socket: HTTP/1.1 over a Unix socket, JSON bodies (notes/vmm-contract.md).
//!
//! A blocking server on one thread, parsed with httparse, rather than hyper/tokio: it serves a
//! handful of requests in a VM's life, and a runtime would cost the VMM more start-up time and
//! resident memory than everything else it does (see `corefour bench vmm`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::control::{Control, ControlError, Outcome};

const MAX_HEAD: usize = 16 * 1024;
const MAX_CONNECTIONS: usize = 16;
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("cannot listen on API socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The fixed facts GET /vm reports.
#[derive(Debug, Clone)]
pub struct VmInfo {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub backend: &'static str,
    /// The virtio-balloon, if the VM has one (`/balloon`, see virtio_devices::balloon_api).
    pub balloon: Option<corefour_devices::virtio::balloon::BalloonHandle>,
}

#[derive(Serialize)]
struct VmState<'a> {
    state: &'a str,
    vcpus: u32,
    memory_mib: u64,
    backend: &'a str,
    pid: u32,
}

/// One of MAX_CONNECTIONS connection slots, given back on drop.
struct Slot(Arc<(Mutex<usize>, Condvar)>);

impl Slot {
    fn take(active: &Arc<(Mutex<usize>, Condvar)>) -> Slot {
        let (count, cv) = &**active;
        let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
        while *n >= MAX_CONNECTIONS {
            n = cv.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n += 1;
        Slot(active.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (count, cv) = &*self.0;
        let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
        *n -= 1;
        cv.notify_one();
    }
}

/// Stops the server and removes the socket file when dropped.
pub struct ApiHandle {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Drop for ApiHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept call so the thread sees `stop`.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The requests that need the whole VM (memory, vCPUs, devices) rather than its run state:
/// snapshots and migration. Each returns the JSON to answer with, or (status, message).
pub trait StateApi: Send + Sync {
    fn snapshot(&self, body: &[u8]) -> Result<serde_json::Value, (u16, String)>;
    /// On success the VM lives elsewhere: the server ends this VMM after answering.
    fn migrate(&self, body: &[u8]) -> Result<serde_json::Value, (u16, String)>;
}

pub fn start(
    path: &Path,
    info: VmInfo,
    control: Arc<Control>,
    state: Option<Arc<dyn StateApi>>,
) -> Result<ApiHandle, ApiError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse {
                path: path.to_path_buf(),
            });
        }
        // A stale socket left by a VMM that was killed.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let active = Arc::new((Mutex::new(0usize), Condvar::new()));
    std::thread::Builder::new()
        .name("api".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                // A thread per connection: an HTTP client keeps idle connections open in its
                // pool, and one of those must not hold up the next request. A connection that
                // stays idle is closed after the timeout; past MAX_CONNECTIONS new ones wait.
                let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                let slot = Slot::take(&active);
                let (info, control, state) = (info.clone(), control.clone(), state.clone());
                let spawned = std::thread::Builder::new()
                    .name("api-conn".into())
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        let _slot = slot;
                        serve(conn, &info, &control, state.as_deref());
                    });
                // Without a thread the connection is dropped; the client sees it closed.
                drop(spawned);
            }
        })
        .map_err(ApiError::Thread)?;
    Ok(ApiHandle {
        path: path.to_path_buf(),
        stop,
    })
}

/// A parsed request: method, path, whether the client wants the connection kept.
pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) body: Vec<u8>,
    pub(crate) close: bool,
}

/// Reads one request head (and discards its body). None on EOF or a broken request.
pub(crate) fn read_request(r: &mut BufReader<UnixStream>) -> Result<Option<Request>, String> {
    let mut head = Vec::new();
    loop {
        let n = r.read_until(b'\n', &mut head).map_err(|e| e.to_string())?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err("connection closed inside a request".into())
            };
        }
        if head.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
        if head.ends_with(b"\r\n\r\n") || head == b"\r\n" || head.ends_with(b"\n\n") {
            if head == b"\r\n" {
                head.clear(); // tolerate a stray blank line between requests
                continue;
            }
            break;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request".into()),
        Err(e) => return Err(format!("malformed request: {e}")),
    }
    let mut body_len = 0usize;
    let mut close = req.version == Some(0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad Content-Length")?;
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = h.value.eq_ignore_ascii_case(b"close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked bodies are not accepted; send Content-Length".into());
        }
    }
    if body_len > MAX_BODY {
        return Err("request body too large".into());
    }
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(Some(Request {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        body,
        close,
    }))
}

pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Option<String>,
    /// Runs after the response is written (shutdown must answer before the VMM exits).
    pub(crate) after: Option<Box<dyn FnOnce()>>,
}

pub(crate) fn fault(status: u16, msg: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({ "fault_message": msg.to_string() }).to_string();
    Response {
        status,
        body: Some(body),
        after: None,
    }
}

fn no_content() -> Response {
    Response {
        status: 204,
        body: None,
        after: None,
    }
}

fn control_error(e: ControlError) -> Response {
    match e {
        ControlError::PauseTimeout(_) => fault(500, e),
        _ => fault(409, e),
    }
}

pub(crate) fn json_ok(v: serde_json::Value) -> Response {
    Response {
        status: 200,
        body: Some(v.to_string()),
        after: None,
    }
}

fn route(
    req: &Request,
    info: &VmInfo,
    control: &Arc<Control>,
    state: Option<&dyn StateApi>,
) -> Response {
    let path = req.path.split('?').next().unwrap_or("");
    match (req.method.as_str(), path) {
        ("GET", "/vm") => {
            let s = VmState {
                state: control.state_name(),
                vcpus: info.vcpus,
                memory_mib: info.memory_mib,
                backend: info.backend,
                pid: std::process::id(),
            };
            match serde_json::to_string(&s) {
                Ok(body) => Response {
                    status: 200,
                    body: Some(body),
                    after: None,
                },
                Err(e) => fault(500, e),
            }
        }
        ("PUT", "/vm/pause") => control.pause().map_or_else(control_error, |_| no_content()),
        ("PUT", "/vm/resume") => control
            .resume()
            .map_or_else(control_error, |_| no_content()),
        ("PUT", "/vm/shutdown") => {
            let c = control.clone();
            Response {
                status: 204,
                body: None,
                after: Some(Box::new(move || c.finish(Outcome::Shutdown))),
            }
        }
        (method, "/balloon") => {
            let query = req.path.split_once('?').map_or("", |(_, q)| q);
            let (status, body) =
                crate::virtio_devices::balloon_api(info.balloon.as_ref(), method, query);
            Response {
                status,
                body,
                after: None,
            }
        }
        (method, "/vm/disks/dirty") => match crate::disk_dirty_api::handle(method, &req.body) {
            Ok(Some(v)) => json_ok(v),
            Ok(None) => no_content(),
            Err((code, msg)) => fault(code, msg),
        },
        ("PUT", "/vm/snapshot") => match state {
            Some(st) => st
                .snapshot(&req.body)
                .map_or_else(|(code, msg)| fault(code, msg), json_ok),
            None => fault(400, "snapshots are not available on this VMM"),
        },
        ("PUT", "/vm/migrate") => match state {
            Some(st) => match st.migrate(&req.body) {
                Ok(v) => {
                    let c = control.clone();
                    Response {
                        status: 200,
                        body: Some(v.to_string()),
                        after: Some(Box::new(move || c.finish(Outcome::Shutdown))),
                    }
                }
                Err((code, msg)) => fault(code, msg),
            },
            None => fault(400, "migration is not available on this VMM"),
        },
        (
            _,
            "/vm" | "/vm/pause" | "/vm/resume" | "/vm/shutdown" | "/vm/snapshot" | "/vm/migrate",
        ) => fault(400, format!("{} is not allowed on {path}", req.method)),
        _ => fault(404, format!("no such resource: {path}")),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Internal Server Error",
    }
}

pub(crate) fn write_response(
    w: &mut UnixStream,
    resp: &Response,
    close: bool,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    if let Some(body) = &resp.body {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    } else if resp.status != 204 {
        out.push_str("Content-Length: 0\r\n");
    }
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    if let Some(body) = &resp.body {
        out.push_str(body);
    }
    w.write_all(out.as_bytes())?;
    w.flush()
}

fn serve(conn: UnixStream, info: &VmInfo, control: &Arc<Control>, state: Option<&dyn StateApi>) {
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        match read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(req)) => {
                let resp = route(&req, info, control, state);
                let ok = write_response(&mut writer, &resp, req.close).is_ok();
                if let Some(after) = resp.after {
                    after();
                }
                if !ok || req.close {
                    return;
                }
            }
            Err(msg) => {
                let _ = write_response(&mut writer, &fault(400, msg), true);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Directive;

    fn request(path: &Path, raw: &str) -> String {
        let mut s = UnixStream::connect(path).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    proptest::proptest! {
        #[test]
        fn random_requests_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let (mut client, server) = UnixStream::pair().unwrap();
            client.write_all(&bytes).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            let info = VmInfo { vcpus: 1, memory_mib: 1, backend: "kvm", balloon: None };
            let control = Control::new(1);
            // A pause with no vCPU thread would wait; keep the fake VM stopping instead.
            control.finish(Outcome::Shutdown);
            serve(server, &info, &control, None);
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out);
        }
    }

    #[test]
    fn serves_the_contract() {
        let dir = std::env::temp_dir().join(format!("c4-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vmm.sock");
        let control = Control::new(1);
        // One fake vCPU thread that parks on pause like a real one.
        let c2 = control.clone();
        let vcpu = std::thread::spawn(move || {
            while c2.wait_runnable() == Directive::Run {
                std::thread::sleep(Duration::from_millis(1));
            }
            c2.vcpu_exited();
        });
        let info = VmInfo {
            vcpus: 1,
            memory_mib: 64,
            backend: "kvm",
            balloon: None,
        };
        let h = start(&sock, info.clone(), control.clone(), None).unwrap();
        assert!(matches!(
            start(&sock, info, control.clone(), None),
            Err(ApiError::InUse { .. })
        ));

        // An idle keep-alive connection (as a client's pool holds) must not block others.
        let _idle = UnixStream::connect(&sock).unwrap();
        let get = "GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let r = request(&sock, get);
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let body: serde_json::Value =
            serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["state"], "running");
        assert_eq!(body["vcpus"], 1);
        assert_eq!(body["pid"], std::process::id());

        // Keep-alive: two requests on one connection.
        let two = "PUT /vm/pause HTTP/1.1\r\nContent-Length: 0\r\n\r\n\
                   GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n";
        let r = request(&sock, two);
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        assert!(r.contains("\"state\":\"paused\""), "{r}");

        let r = request(&sock, "PUT /vm/pause HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(
            r.starts_with("HTTP/1.1 409") && r.contains("fault_message"),
            "{r}"
        );
        let r = request(
            &sock,
            "PUT /vm/resume HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        let r = request(&sock, "GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = request(&sock, "DELETE /vm HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = request(&sock, "garbage\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 400"), "{r}");
        let r = request(
            &sock,
            "PUT /vm/shutdown HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
        assert_eq!(
            control.wait_outcome(None, Duration::from_millis(10), || {}),
            Outcome::Shutdown
        );
        vcpu.join().unwrap();
        drop(h);
        let e = crate::api_client::call(&sock, "GET", "/vm", None, Duration::from_secs(1));
        assert!(matches!(
            e,
            Err(crate::api_client::ApiClientError::Connect { .. })
        ));
        assert!(!sock.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

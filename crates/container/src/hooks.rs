//! Hooks: each gets the container state JSON on stdin, its own args and env, and a timeout.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::Hook;

use crate::state::OciState;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    #[error("{kind} hook {path}: cannot run: {cause}")]
    Spawn {
        kind: &'static str,
        path: String,
        cause: std::io::Error,
    },
    #[error("{kind} hook {path} failed: {status}")]
    Failed {
        kind: &'static str,
        path: String,
        status: String,
    },
    #[error("{kind} hook {path} timed out after {secs} s and was killed")]
    Timeout {
        kind: &'static str,
        path: String,
        secs: i64,
    },
}

/// Runs `hooks` in order; the first failure stops the rest.
pub fn run(kind: &'static str, hooks: &[Hook], state: &OciState) -> Result<(), HookError> {
    if hooks.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(state).unwrap_or_default();
    for h in hooks {
        run_one(kind, h, &json)?;
    }
    Ok(())
}

fn run_one(kind: &'static str, h: &Hook, state: &[u8]) -> Result<(), HookError> {
    let path = h.path().display().to_string();
    let mut cmd = Command::new(h.path());
    if let Some(args) = h.args() {
        if let Some((a0, rest)) = args.split_first() {
            cmd.arg0(a0).args(rest);
        }
    }
    cmd.env_clear();
    for kv in h.env().iter().flatten() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().map_err(|cause| HookError::Spawn {
        kind,
        path: path.clone(),
        cause,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin must not fail the write.
        let _ = stdin.write_all(state);
    }
    let deadline = h
        .timeout()
        .filter(|t| *t > 0)
        .map(|t| (t, Instant::now() + Duration::from_secs(t as u64)));
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(cause) => return Err(HookError::Spawn { kind, path, cause }),
        }
        if let Some((secs, d)) = deadline {
            if Instant::now() >= d {
                let _ = child.kill();
                let _ = child.wait();
                return Err(HookError::Timeout { kind, path, secs });
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if status.success() {
        Ok(())
    } else {
        Err(HookError::Failed {
            kind,
            path,
            status: status.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Status;

    fn hook(json: &str) -> Hook {
        serde_json::from_str(json).unwrap()
    }

    fn state() -> OciState {
        OciState {
            oci_version: "1.0.2".into(),
            id: "h1".into(),
            status: Status::Created,
            pid: 1,
            bundle: "/b".into(),
            annotations: Default::default(),
        }
    }

    #[test]
    fn hook_reads_state_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = hook(&format!(
            r#"{{"path":"/bin/sh","args":["sh","-c","cat > {0}; echo \"$X\" >> {0}"],"env":["X=yes"]}}"#,
            out.display()
        ));
        run("poststart", &[h], &state()).unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert!(text.contains("\"id\":\"h1\""), "{text}");
        assert!(text.ends_with("yes\n"));
    }

    #[test]
    fn failure_and_timeout() {
        let e = run("prestart", &[hook(r#"{"path":"/bin/false"}"#)], &state()).unwrap_err();
        assert!(matches!(e, HookError::Failed { .. }));
        let e = run(
            "prestart",
            &[hook(
                r#"{"path":"/bin/sleep","args":["sleep","5"],"timeout":1}"#,
            )],
            &state(),
        )
        .unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }));
        let e = run(
            "prestart",
            &[hook(r#"{"path":"/nonexistent/hook"}"#)],
            &state(),
        )
        .unwrap_err();
        assert!(matches!(e, HookError::Spawn { .. }));
    }
}

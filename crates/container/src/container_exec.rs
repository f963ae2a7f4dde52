//! `exec`: run another process inside a running container: join its cgroup and namespaces,
//! fork once more so the PID namespace applies, then set up the process like the init does.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::sched::{setns, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use oci_spec::runtime::Process;

use crate::cgroups::CgroupManager;
use crate::spec::Bundle;
use crate::state::Status;
use crate::ContainerError;

#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub user: Option<(u32, u32)>,
    /// A process.json replacing the config's process entirely.
    pub process: Option<Process>,
    pub detach: bool,
    pub pid_file: Option<std::path::PathBuf>,
    /// Give the process a terminal (`-t`); the config's process.json may ask for one too.
    pub tty: bool,
    /// Where the pty master goes: a socket path (`--console-socket`) or a connected fd.
    pub console_socket: Option<std::path::PathBuf>,
    pub console_fd: Option<std::sync::Arc<OwnedFd>>,
}

/// Order matters: user first (it owns the others), mount last (it changes our root).
const NS_ORDER: &[(&str, CloneFlags)] = &[
    ("user", CloneFlags::CLONE_NEWUSER),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("net", CloneFlags::CLONE_NEWNET),
    ("pid", CloneFlags::CLONE_NEWPID),
    ("cgroup", CloneFlags::CLONE_NEWCGROUP),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

fn same_ns(pid: i32, name: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(format!("/proc/{pid}/ns/{name}"));
    let b = std::fs::metadata(format!("/proc/self/ns/{name}"));
    matches!((a, b), (Ok(a), Ok(b)) if a.ino() == b.ino() && a.dev() == b.dev())
}

/// Runs the process; returns its exit code (128+signal when killed), or 0 when detached.
pub fn exec(root: &Path, id: &str, opts: &ExecOptions) -> Result<i32, ContainerError> {
    exec_with(root, id, opts, &mut |_| {})
}

/// As `exec`; `started` runs in this process once the process exists (with its PID), before the
/// wait: the place to start threads (none may exist while we fork).
pub fn exec_with(
    root: &Path,
    id: &str,
    opts: &ExecOptions,
    started: &mut dyn FnMut(i32),
) -> Result<i32, ContainerError> {
    let st = crate::container_state::load(root, id)?;
    if st.oci.status != Status::Running {
        return Err(ContainerError::WrongStatus {
            id: id.into(),
            status: st.oci.status.to_string(),
            what: "exec needs a running container".into(),
        });
    }
    let bundle = Bundle::load(&st.oci.bundle)?;
    let spec = bundle.spec;
    let mut process = match &opts.process {
        Some(p) => p.clone(),
        None => spec
            .process()
            .clone()
            .ok_or_else(|| ContainerError::Init("process is missing".into()))?,
    };
    if opts.process.is_none() {
        if opts.args.is_empty() {
            return Err(ContainerError::Init("exec: name a command to run".into()));
        }
        process.set_args(Some(opts.args.clone()));
        process.set_terminal(Some(opts.tty));
        let mut env = process.env().clone().unwrap_or_default();
        for kv in &opts.env {
            let key = kv.split('=').next().unwrap_or("");
            env.retain(|e| e.split('=').next() != Some(key));
            env.push(kv.clone());
        }
        process.set_env(Some(env));
        if let Some(c) = &opts.cwd {
            process.set_cwd(c.into());
        }
        if let Some((uid, gid)) = opts.user {
            let mut u = process.user().clone();
            u.set_uid(uid);
            u.set_gid(gid);
            process.set_user(u);
        }
    }
    let caps = process
        .capabilities()
        .as_ref()
        .map(crate::capabilities::Sets::from_spec)
        .transpose()?;
    let seccomp = spec
        .linux()
        .as_ref()
        .and_then(|l| l.seccomp().as_ref())
        .map(crate::seccomp::build)
        .transpose()?;
    let mut fds: Vec<(OwnedFd, CloneFlags)> = Vec::new();
    for (name, flag) in NS_ORDER {
        if same_ns(st.oci.pid, name) {
            continue;
        }
        let path = format!("/proc/{}/ns/{name}", st.oci.pid);
        let f = std::fs::File::open(&path)
            .map_err(|e| ContainerError::io(format!("open {path}"), e))?;
        fds.push((f.into(), *flag));
    }
    let cg = crate::cgroups::manager(&st.cgroup)?;
    let console = if process.terminal() == Some(true) {
        match (&opts.console_socket, &opts.console_fd) {
            (Some(p), _) => Some(crate::console::connect_socket(p)?),
            (None, Some(fd)) => Some(
                fd.as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| ContainerError::io("duplicate the console socket", e))?,
            ),
            (None, None) => {
                return Err(ContainerError::Init(
                    "a terminal needs --console-socket".into(),
                ))
            }
        }
    } else {
        None
    };
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| ContainerError::sys("pipe", e))?;

    // SAFETY: the CLI is single-threaded; the child only calls into our own setup code.
    match unsafe { fork() }.map_err(|e| ContainerError::sys("fork", e))? {
        ForkResult::Child => {
            drop(rd);
            let code = match exec_child(
                &cg,
                &fds,
                &process,
                caps,
                seccomp,
                opts.detach,
                &wr,
                console,
            ) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("corefour: exec: {e}");
                    255
                }
            };
            // SAFETY: leave the forked child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let mut buf = [0u8; 4];
            let got = nix::unistd::read(&rd, &mut buf).unwrap_or(0);
            if got == 4 {
                let pid = i32::from_le_bytes(buf);
                if let Some(pf) = &opts.pid_file {
                    crate::container_create::write_pid_file(pf, pid)?;
                }
                started(pid);
            }
            let code = wait_code(child)?;
            Ok(code)
        }
    }
}

fn wait_code(pid: Pid) -> Result<i32, ContainerError> {
    loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(ContainerError::sys("wait", e)),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn exec_child(
    cg: &crate::cgroups::Manager,
    fds: &[(OwnedFd, CloneFlags)],
    process: &Process,
    caps: Option<crate::capabilities::Sets>,
    seccomp: Option<libseccomp::ScmpFilterContext>,
    detach: bool,
    wr: &OwnedFd,
    console: Option<OwnedFd>,
) -> Result<i32, ContainerError> {
    cg.add_task(std::process::id() as i32)?;
    for (fd, flag) in fds {
        setns(fd.as_fd(), *flag)
            .map_err(|e| ContainerError::sys(format!("join namespace {flag:?}"), e))?;
    }
    // SAFETY: single-threaded after fork.
    match unsafe { fork() }.map_err(|e| ContainerError::sys("fork into the PID namespace", e))? {
        ForkResult::Parent { child } => {
            let _ = nix::unistd::write(wr, &child.as_raw().to_le_bytes());
            if detach {
                return Ok(0);
            }
            wait_code(child)
        }
        ForkResult::Child => {
            if let Some(sock) = console {
                // The container's /dev/ptmx: we are in its mount namespace now.
                let (master, slave) = crate::console::open_pty()?;
                crate::console::send_fd(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    std::os::fd::AsRawFd::as_raw_fd(&master),
                )?;
                drop(master);
                crate::console::become_tty(&slave)?;
            }
            let env = process.env().clone().unwrap_or_default();
            let argv = process.args().clone().unwrap_or_default();
            let exe = crate::process::find_executable(
                argv.first().map(String::as_str).unwrap_or(""),
                &env,
            )?;
            crate::process::set_rlimits(process.rlimits().as_deref().unwrap_or(&[]))?;
            let nnp = process.no_new_privileges() == Some(true);
            if !nnp {
                if let Some(f) = &seccomp {
                    crate::seccomp::load(f)?;
                }
            }
            if let Some(c) = &caps {
                crate::capabilities::drop_bounding(c)?;
            }
            crate::process::set_user(process)?;
            if let Some(c) = &caps {
                crate::capabilities::apply(c)?;
            }
            nix::unistd::chdir(process.cwd()).map_err(|e| {
                ContainerError::sys(format!("chdir {}", process.cwd().display()), e)
            })?;
            if nnp {
                // SAFETY: prctl with integer arguments.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                if let Some(f) = &seccomp {
                    crate::seccomp::load(f)?;
                }
            }
            // SAFETY: restore the default SIGPIPE disposition before exec (Rust ignores it).
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            let exe_c = crate::process::cstrings(&[exe.display().to_string()])?;
            let e = nix::unistd::execve(
                &exe_c[0],
                &crate::process::cstrings(&argv)?,
                &crate::process::cstrings(&env)?,
            )
            .err()
            .unwrap_or(nix::Error::UnknownErrno);
            Err(ContainerError::sys(format!("exec {}", exe.display()), e))
        }
    }
}

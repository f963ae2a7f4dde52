//! The container init: runs in the cloned child, sets the container up, reports `Ready`, waits for
//! `start` on the init socket, then becomes the user process with execve. Never returns.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use nix::sched::{unshare, CloneFlags};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::capabilities::Sets;
use crate::namespaces::Plan;
use crate::state::{OciState, Status};
use crate::sync::{Channel, Msg};
use crate::ContainerError;

/// Everything the init needs, prepared by `create` before the clone (so errors surface there).
pub struct InitArgs {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub spec: Spec,
    pub plan: Plan,
    pub sync: Channel,
    pub listener: UnixListener,
    pub console: Option<OwnedFd>,
    pub caps: Option<Sets>,
    pub seccomp: Option<libseccomp::ScmpFilterContext>,
    pub cgroup_v2: bool,
    /// v1 `tasks` files to write "0" into (see `CgroupManager::self_join_files`).
    pub cgroup_join: Vec<PathBuf>,
    pub stdio: Option<std::sync::Arc<OwnedFd>>,
}

/// Entry point in the child. Reports any failure to the parent, then exits.
pub fn run(mut args: InitArgs) -> ! {
    let code = match setup(&mut args) {
        Ok(()) => 0,
        Err(e) => {
            let msg = match e {
                ContainerError::Init(s) => s,
                e => e.to_string(),
            };
            let _ = args.sync.send(&Msg::Error(msg));
            1
        }
    };
    // SAFETY: _exit skips atexit handlers and stdio flushing that belong to the parent's copy.
    unsafe { libc::_exit(code) }
}

fn hook_state(a: &InitArgs, pid: i32) -> OciState {
    OciState {
        oci_version: a.spec.version().clone(),
        id: a.id.clone(),
        status: Status::Created,
        pid,
        bundle: a.bundle.clone(),
        annotations: a.spec.annotations().clone().unwrap_or_default(),
    }
}

fn setup(a: &mut InitArgs) -> Result<(), ContainerError> {
    let mut host_pid = 0;
    loop {
        match a.sync.recv()? {
            Msg::Pid(p) => host_pid = p,
            Msg::Go => break,
            m => return Err(crate::sync::SyncError::Unexpected(m).into()),
        }
    }
    if let Some(out) = &a.stdio {
        let null = std::fs::File::open("/dev/null")
            .map_err(|e| ContainerError::io("open /dev/null", e))?;
        // SAFETY: dup2 onto the stdio numbers from descriptors we own.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(out.as_raw_fd(), 1);
            libc::dup2(out.as_raw_fd(), 2);
        }
    }
    // Before any namespace change: the host's cgroupfs is still reachable and we are still root there.
    crate::cgroups::join_self(&a.cgroup_join)?;
    let user_joined = a.plan.joins(LinuxNamespaceType::User);
    for (kind, path) in &a.plan.join {
        if *kind == LinuxNamespaceType::Pid && !user_joined {
            continue; // joined by the parent before the clone
        }
        crate::namespaces::join(*kind, path)?;
    }
    if user_joined {
        let rest = a.plan.new;
        unshare(rest).map_err(|e| ContainerError::sys("unshare namespaces", e))?;
        if rest.contains(CloneFlags::CLONE_NEWPID) || a.plan.joins(LinuxNamespaceType::Pid) {
            // SAFETY: single-threaded child; the grandchild continues with the same state.
            match unsafe { nix::unistd::fork() }
                .map_err(|e| ContainerError::sys("fork into the PID namespace", e))?
            {
                nix::unistd::ForkResult::Parent { child } => {
                    let _ = a.sync.send(&Msg::Pid(child.as_raw()));
                    // SAFETY: plain exit of the intermediate process.
                    unsafe { libc::_exit(0) }
                }
                nix::unistd::ForkResult::Child => {}
            }
        }
    } else if a.plan.creates(LinuxNamespaceType::Cgroup) {
        // Unshared only now that the parent moved us into the container's cgroup, so it is our root.
        unshare(CloneFlags::CLONE_NEWCGROUP)
            .map_err(|e| ContainerError::sys("unshare cgroup namespace", e))?;
    }
    let in_user_ns = a.plan.has(LinuxNamespaceType::User);
    if a.plan.creates(LinuxNamespaceType::User) {
        let root = nix::unistd::Uid::from_raw(0);
        let rootg = nix::unistd::Gid::from_raw(0);
        // Become the namespace's root (the maps are written); harmless if 0 is mapped to us already.
        let _ = nix::unistd::setresgid(rootg, rootg, rootg);
        let _ = nix::unistd::setresuid(root, root, root);
    }

    crate::rootfs::prepare(&a.rootfs, &a.spec, in_user_ns, a.cgroup_v2)?;

    let hooks = a.spec.hooks().clone().unwrap_or_default();
    let has_runtime_hooks = hooks.prestart().as_ref().is_some_and(|h| !h.is_empty())
        || hooks
            .create_runtime()
            .as_ref()
            .is_some_and(|h| !h.is_empty());
    if has_runtime_hooks {
        a.sync.send(&Msg::RunHooks)?;
        match a.sync.recv()? {
            Msg::HooksDone => {}
            m => return Err(crate::sync::SyncError::Unexpected(m).into()),
        }
    }
    if let Some(h) = hooks.create_container() {
        crate::hooks::run("createContainer", h, &hook_state(a, host_pid))?;
    }

    crate::rootfs::pivot(&a.rootfs, &a.spec)?;
    crate::rootfs::finish(&a.spec)?;

    if a.plan.has(LinuxNamespaceType::Uts) {
        if let Some(h) = a.spec.hostname().as_deref().filter(|h| !h.is_empty()) {
            nix::unistd::sethostname(h).map_err(|e| ContainerError::sys("sethostname", e))?;
        }
        if let Some(d) = a.spec.domainname().as_deref().filter(|d| !d.is_empty()) {
            // SAFETY: pointer and length describe a live byte slice.
            if unsafe { libc::setdomainname(d.as_ptr().cast(), d.len()) } != 0 {
                return Err(ContainerError::sys("setdomainname", nix::Error::last()));
            }
        }
    }
    if let Some(sysctl) = a.spec.linux().as_ref().and_then(|l| l.sysctl().clone()) {
        for (k, v) in sysctl {
            let path = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
            crate::util::write_file(&path, &v)
                .map_err(|e| ContainerError::io(format!("sysctl {k}={v}"), e))?;
        }
    }
    let process = a
        .spec
        .process()
        .clone()
        .ok_or_else(|| ContainerError::Init("process is missing".into()))?;
    if process.terminal() == Some(true) {
        let sock = a.console.take().ok_or_else(|| {
            ContainerError::Init("terminal requested but no console socket".into())
        })?;
        let (master, slave) = crate::console::open_pty()?;
        crate::console::send_fd(sock.as_raw_fd(), master.as_raw_fd())?;
        drop(master);
        crate::console::become_tty(&slave)?;
    }
    crate::process::set_rlimits(process.rlimits().as_deref().unwrap_or(&[]))?;
    if let Some(adj) = process.oom_score_adj() {
        crate::process::set_oom_score_adj(adj)?;
    }
    let env = process.env().clone().unwrap_or_default();
    let argv = process.args().clone().unwrap_or_default();
    let exe =
        crate::process::find_executable(argv.first().map(String::as_str).unwrap_or(""), &env)?;
    let exe_c = crate::process::cstrings(&[exe.display().to_string()])?;
    let argv_c = crate::process::cstrings(&argv)?;
    let env_c = crate::process::cstrings(&env)?;

    let nnp = process.no_new_privileges() == Some(true);
    let start_hooks = hooks
        .start_container()
        .as_ref()
        .is_some_and(|h| !h.is_empty());
    // Drop privileges before `Ready` when nothing privileged is left to do after `start` (no
    // startContainer hooks, and no seccomp filter that would have to be loaded before the drop):
    // failures then surface at create, and `start` only has to release an exec.
    let early = !start_hooks && (nnp || a.seccomp.is_none());
    if early {
        drop_privileges(a, &process)?;
    }
    a.sync.send(&Msg::Ready)?;

    // Wait for `start`: it connects and sends one byte.
    let mut conn = loop {
        match a.listener.accept() {
            Ok((mut c, _)) => {
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() && b[0] == b'S' {
                    break c;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ContainerError::io("wait for start", e)),
        }
    };
    if let Err(e) = finish_and_exec(
        a, &process, &hooks, host_pid, early, &exe_c[0], &argv_c, &env_c, &conn,
    ) {
        let _ = conn.write_all(e.to_string().as_bytes());
        // SAFETY: exit of the failed init.
        unsafe { libc::_exit(127) }
    }
    unreachable_exit()
}

/// seccomp (when it must precede the drop), bounding set, user, capabilities, cwd.
fn drop_privileges(
    a: &InitArgs,
    process: &oci_spec::runtime::Process,
) -> Result<(), ContainerError> {
    let nnp = process.no_new_privileges() == Some(true);
    if !nnp {
        // Without no_new_privs the filter needs CAP_SYS_ADMIN: load it while we still have it.
        if let Some(f) = &a.seccomp {
            crate::seccomp::load(f)?;
        }
    }
    if let Some(c) = &a.caps {
        crate::capabilities::drop_bounding(c)?;
    }
    crate::process::set_user(process)?;
    if let Some(c) = &a.caps {
        crate::capabilities::apply(c)?;
    } else if process.user().uid() != 0 {
        caps::clear(None, caps::CapSet::Permitted)
            .map_err(|e| ContainerError::Init(e.to_string()))?;
    }
    nix::unistd::chdir(process.cwd())
        .map_err(|e| ContainerError::sys(format!("chdir {}", process.cwd().display()), e))?;
    Ok(())
}

fn unreachable_exit() -> Result<(), ContainerError> {
    Err(ContainerError::Init("execve returned".into()))
}

#[allow(clippy::too_many_arguments)]
fn finish_and_exec(
    a: &InitArgs,
    process: &oci_spec::runtime::Process,
    hooks: &oci_spec::runtime::Hooks,
    host_pid: i32,
    privileges_dropped: bool,
    exe: &std::ffi::CString,
    argv: &[std::ffi::CString],
    env: &[std::ffi::CString],
    conn: &UnixStream,
) -> Result<(), ContainerError> {
    // The start connection must close on exec: that EOF tells `start` the process runs.
    nix::fcntl::fcntl(
        conn,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| ContainerError::sys("cloexec", e))?;
    if let Some(h) = hooks.start_container() {
        let mut st = hook_state(a, host_pid);
        st.status = Status::Running;
        crate::hooks::run("startContainer", h, &st)?;
    }
    let nnp = process.no_new_privileges() == Some(true);
    if !privileges_dropped {
        drop_privileges(a, process)?;
    }
    if nnp {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(ContainerError::sys(
                "prctl(PR_SET_NO_NEW_PRIVS)",
                nix::Error::last(),
            ));
        }
        if let Some(f) = &a.seccomp {
            crate::seccomp::load(f)?;
        }
    }
    // Rust ignores SIGPIPE at start-up and an ignored signal stays ignored across exec.
    // SAFETY: restoring the default disposition is async-signal-safe.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let e = nix::unistd::execve(exe, argv, env)
        .err()
        .unwrap_or(nix::Error::UnknownErrno);
    Err(ContainerError::sys(
        format!("exec {}", exe.to_string_lossy()),
        e,
    ))
}

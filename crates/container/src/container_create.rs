//! `create`: parse the bundle, make the state directory and cgroup, clone the init with its new
//! namespaces, answer its requests (ID maps, hooks) and return once it waits for `start`.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use oci_spec::runtime::LinuxNamespaceType;

use crate::cgroups::{CgroupConfig, CgroupManager, Version};
use crate::init::InitArgs;
use crate::namespaces::Plan;
use crate::spec::Bundle;
use crate::state::{ContainerState, OciState, Status, INIT_SOCKET};
use crate::sync::{Channel, Msg};
use crate::ContainerError;

#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub id: String,
    pub bundle: PathBuf,
    pub state_root: PathBuf,
    pub pid_file: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    /// Hierarchy root override for tests (see `CgroupConfig::root`).
    pub cgroup_root: Option<PathBuf>,
    /// An already-connected console socket (instead of `console_socket`).
    pub console_fd: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    /// Where the init's stdout and stderr go (stdin becomes /dev/null); inherited when unset.
    pub stdio: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
}

/// Removes what a failed create left: the init, the cgroup, the state directory.
struct Cleanup {
    dir: Option<PathBuf>,
    cgroup: Option<crate::cgroups::Manager>,
    child: Option<i32>,
}

impl Cleanup {
    fn disarm(&mut self) {
        self.dir = None;
        self.cgroup = None;
        self.child = None;
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pid) = self.child.take() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
        }
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.remove();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Clones with `flags` like fork(2): the child returns 0 and runs on a copy of our stack.
fn clone_child(flags: nix::sched::CloneFlags) -> Result<i32, ContainerError> {
    // SAFETY: a null stack makes clone behave like fork; the CLI is single-threaded, so the
    // child's copy of every lock and allocator is consistent.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags.bits() as libc::c_long) | libc::SIGCHLD as libc::c_long,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        return Err(ContainerError::sys(
            "clone the container init",
            nix::Error::last(),
        ));
    }
    Ok(r as i32)
}

/// Creates the container; returns its state (status `created`).
pub fn create(opts: &CreateOptions) -> Result<ContainerState, ContainerError> {
    if !crate::state::validate_id(&opts.id) {
        return Err(ContainerError::BadId(opts.id.clone()));
    }
    let bundle = Bundle::load(&opts.bundle)?;
    let spec = &bundle.spec;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| ContainerError::Init("process is missing".into()))?;
    if process.terminal() == Some(true)
        && opts.console_socket.is_none()
        && opts.console_fd.is_none()
    {
        return Err(ContainerError::Init(
            "process.terminal is true: pass --console-socket (or set terminal to false)".into(),
        ));
    }
    let linux = spec.linux().clone().unwrap_or_default();
    let caps = process
        .capabilities()
        .as_ref()
        .map(crate::capabilities::Sets::from_spec)
        .transpose()?;
    let seccomp = linux
        .seccomp()
        .as_ref()
        .map(crate::seccomp::build)
        .transpose()?;
    let plan = Plan::from_spec(linux.namespaces().as_deref().unwrap_or(&[]));

    std::fs::create_dir_all(&opts.state_root).map_err(|e| {
        ContainerError::io(
            format!("create state root {}", opts.state_root.display()),
            e,
        )
    })?;
    let dir = ContainerState::dir(&opts.state_root, &opts.id);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(ContainerError::Exists {
                id: opts.id.clone(),
                dir,
            });
        }
        Err(e) => return Err(ContainerError::io(format!("create {}", dir.display()), e)),
    }
    let mut cleanup = Cleanup {
        dir: Some(dir.clone()),
        cgroup: None,
        child: None,
    };

    let mut cg_cfg = CgroupConfig::for_container(linux.cgroups_path().as_deref(), &opts.id);
    if opts.cgroup_root.is_some() {
        cg_cfg.root = opts.cgroup_root.clone();
    }
    let cg = crate::cgroups::manager(&cg_cfg)?;
    // As runc does, the config's device nodes are allowed by the device cgroup too.
    let mut resources = linux.resources().clone();
    if let (Some(r), Some(devs)) = (resources.as_mut(), linux.devices()) {
        if let Some(rules) = r.devices_mut() {
            rules.extend(devs.iter().map(oci_spec::runtime::LinuxDeviceCgroup::from));
        }
    }
    match cg.create(resources.as_ref()) {
        Ok(()) => cleanup.cgroup = Some(cg),
        // Rootless and no limits asked for: run without a cgroup of our own, as runc does.
        Err(e)
            if e.is_permission()
                && !nix::unistd::geteuid().is_root()
                && !has_limits(linux.resources().as_ref()) =>
        {
            let _ = cg.remove();
            cg_cfg.disabled = true;
        }
        Err(e) => {
            let _ = cg.remove();
            return Err(e.into());
        }
    }

    let sock_path = dir.join(INIT_SOCKET);
    let listener = UnixListener::bind(&sock_path)
        .map_err(|e| ContainerError::io(format!("bind {}", sock_path.display()), e))?;
    let console = match (&opts.console_socket, &opts.console_fd) {
        (Some(p), _) => Some(crate::console::connect_socket(p)?),
        (None, Some(fd)) => Some(
            std::os::fd::AsFd::as_fd(fd.as_ref())
                .try_clone_to_owned()
                .map_err(|e| ContainerError::io("duplicate the console socket", e))?,
        ),
        (None, None) => None,
    };
    let (parent_ch, child_ch) = Channel::pair()?;

    let user_joined = plan.joins(LinuxNamespaceType::User);
    let mut clone_flags = nix::sched::CloneFlags::empty();
    if !user_joined {
        if let Some((_, p)) = plan
            .join
            .iter()
            .find(|(k, _)| *k == LinuxNamespaceType::Pid)
        {
            // Only our children enter it; this process stays where it is.
            crate::namespaces::join(LinuxNamespaceType::Pid, p)?;
        }
        clone_flags = plan.new & !nix::sched::CloneFlags::CLONE_NEWCGROUP;
    }
    // The init may fork once more (PID namespace under a joined user namespace): make it our child.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    // In a new or joined user namespace the init may not be allowed to write host cgroup files.
    let cgroup_join = match &cleanup.cgroup {
        Some(c) if !plan.has(LinuxNamespaceType::User) => c.self_join_files(),
        _ => Vec::new(),
    };
    let parent_adds_task = cgroup_join.is_empty();
    let mut pid = clone_child(clone_flags)?;
    if pid == 0 {
        drop(parent_ch);
        crate::init::run(InitArgs {
            id: opts.id.clone(),
            bundle: bundle.dir.clone(),
            rootfs: bundle.rootfs.clone(),
            spec: spec.clone(),
            plan,
            sync: child_ch,
            listener,
            console,
            caps,
            seccomp,
            cgroup_v2: cg_cfg.version == Version::V2,
            cgroup_join,
            stdio: opts.stdio.clone(),
        });
    }
    cleanup.child = Some(pid);
    drop(child_ch);
    drop(listener);
    drop(console);

    if plan.creates(LinuxNamespaceType::User) {
        crate::namespaces::write_id_maps(
            pid,
            linux.uid_mappings().as_deref().unwrap_or(&[]),
            linux.gid_mappings().as_deref().unwrap_or(&[]),
        )?;
    }
    if let (Some(cg), true) = (&cleanup.cgroup, parent_adds_task) {
        cg.add_task(pid)?;
    }
    parent_ch.send(&Msg::Pid(pid))?;
    parent_ch.send(&Msg::Go)?;

    let mut oci = OciState {
        oci_version: spec.version().clone(),
        id: opts.id.clone(),
        status: Status::Creating,
        pid,
        bundle: bundle.dir.clone(),
        annotations: spec.annotations().clone().unwrap_or_default(),
    };
    let hooks = spec.hooks().clone();
    loop {
        match parent_ch.recv() {
            Ok(Msg::Ready) => break,
            Ok(Msg::Pid(p)) => {
                let _ = waitpid(Pid::from_raw(pid), None);
                pid = p;
                oci.pid = p;
                cleanup.child = Some(p);
            }
            Ok(Msg::RunHooks) => {
                if let Some(h) = &hooks {
                    crate::hooks::run("prestart", h.prestart().as_deref().unwrap_or(&[]), &oci)?;
                    crate::hooks::run(
                        "createRuntime",
                        h.create_runtime().as_deref().unwrap_or(&[]),
                        &oci,
                    )?;
                }
                parent_ch.send(&Msg::HooksDone)?;
            }
            Ok(Msg::Error(e)) => return Err(ContainerError::Init(e)),
            Ok(m) => return Err(crate::sync::SyncError::Unexpected(m).into()),
            Err(e) => return Err(e.into()),
        }
    }
    oci.status = Status::Created;
    let ticks = crate::util::process_start_ticks(pid)
        .map(|(t, _)| t)
        .unwrap_or(0);
    let state = ContainerState {
        oci,
        rootfs: bundle.rootfs.clone(),
        created: crate::util::rfc3339_now(),
        init_start_ticks: ticks,
        cgroup: cg_cfg,
        hooks,
        // SAFETY: getuid cannot fail.
        owner: unsafe { libc::getuid() },
    };
    state.save(&opts.state_root)?;
    if let Some(pf) = &opts.pid_file {
        write_pid_file(pf, pid)?;
    }
    cleanup.disarm();
    Ok(state)
}

fn has_limits(r: Option<&oci_spec::runtime::LinuxResources>) -> bool {
    r.is_some_and(|r| {
        r.memory().is_some()
            || r.cpu().is_some()
            || r.pids().is_some()
            || r.block_io().is_some()
            || r.hugepage_limits().is_some()
            || r.unified().as_ref().is_some_and(|u| !u.is_empty())
    })
}

/// Writes the PID atomically (temp + rename), as containerd expects.
pub fn write_pid_file(path: &Path, pid: i32) -> Result<(), ContainerError> {
    let tmp = path.with_extension("tmp-corefour");
    std::fs::write(&tmp, pid.to_string())
        .map_err(|e| ContainerError::io(format!("write pid file {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| ContainerError::io(format!("write pid file {}", path.display()), e))
}

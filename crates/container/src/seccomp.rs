//! Translates the config's seccomp section into a filter with libseccomp (it handles per-rule
//! actions, argument comparisons and architectures, which a single-action BPF builder cannot).

use std::str::FromStr;

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeccompError {
    #[error("seccomp: {what}: {msg}")]
    Build { what: String, msg: String },
    #[error("seccomp: action {0} is not supported (no notify listener)")]
    Unsupported(String),
}

fn err(what: impl Into<String>, e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Build {
        what: what.into(),
        msg: e.to_string(),
    }
}

fn action(a: LinuxSeccompAction, errno: Option<u32>) -> Result<ScmpAction, SeccompError> {
    Ok(match a {
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        LinuxSeccompAction::ScmpActErrno => {
            ScmpAction::Errno(errno.unwrap_or(libc::EPERM as u32) as i32)
        }
        LinuxSeccompAction::ScmpActTrace => {
            ScmpAction::Trace(errno.unwrap_or(libc::EPERM as u32) as u16)
        }
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::Unsupported("SCMP_ACT_NOTIFY".into()))
        }
    })
}

fn op(o: LinuxSeccompOperator, value_two: Option<u64>) -> ScmpCompareOp {
    match o {
        LinuxSeccompOperator::ScmpCmpNe => ScmpCompareOp::NotEqual,
        LinuxSeccompOperator::ScmpCmpLt => ScmpCompareOp::Less,
        LinuxSeccompOperator::ScmpCmpLe => ScmpCompareOp::LessOrEqual,
        LinuxSeccompOperator::ScmpCmpEq => ScmpCompareOp::Equal,
        LinuxSeccompOperator::ScmpCmpGe => ScmpCompareOp::GreaterEqual,
        LinuxSeccompOperator::ScmpCmpGt => ScmpCompareOp::Greater,
        LinuxSeccompOperator::ScmpCmpMaskedEq => ScmpCompareOp::MaskedEqual(value_two.unwrap_or(0)),
    }
}

/// Builds the filter (not loaded yet): done at create time so a bad profile fails `create`.
pub fn build(cfg: &LinuxSeccomp) -> Result<ScmpFilterContext, SeccompError> {
    let default = action(cfg.default_action(), cfg.default_errno_ret())?;
    let mut ctx = ScmpFilterContext::new(default).map_err(|e| err("init", e))?;
    for arch in cfg.architectures().iter().flatten() {
        let name = serde_json::to_value(arch)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let a = ScmpArch::from_str(&name).map_err(|e| err(format!("architecture {name}"), e))?;
        ctx.add_arch(a)
            .map_err(|e| err(format!("add architecture {name}"), e))?;
    }
    for flag in cfg.flags().iter().flatten() {
        match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => {
                ctx.set_ctl_log(true).map_err(|e| err("flag log", e))?;
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => {
                ctx.set_ctl_tsync(true).map_err(|e| err("flag tsync", e))?;
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                ctx.set_ctl_ssb(true)
                    .map_err(|e| err("flag spec_allow", e))?;
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {}
        }
    }
    // The runtime sets no_new_privs itself when the config asks; libseccomp must not force it.
    ctx.set_ctl_nnp(false).map_err(|e| err("nnp", e))?;
    for rule in cfg.syscalls().iter().flatten() {
        let act = action(rule.action(), rule.errno_ret())?;
        if act == default {
            continue;
        }
        let conds: Vec<ScmpArgCompare> = rule
            .args()
            .iter()
            .flatten()
            .map(|a| ScmpArgCompare::new(a.index() as u32, op(a.op(), a.value_two()), a.value()))
            .collect();
        for name in rule.names() {
            // Names this kernel/libseccomp does not know are skipped, as runc does.
            let Ok(sc) = ScmpSyscall::from_name(name) else {
                continue;
            };
            let r = if conds.is_empty() {
                ctx.add_rule(act, sc)
            } else {
                ctx.add_rule_conditional(act, sc, &conds)
            };
            r.map_err(|e| err(format!("rule for {name}"), e))?;
        }
    }
    Ok(ctx)
}

pub fn load(ctx: &ScmpFilterContext) -> Result<(), SeccompError> {
    ctx.load().map_err(|e| err("load", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_profile_with_args_and_errno() {
        let cfg: LinuxSeccomp = serde_json::from_str(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
                "syscalls":[{"names":["mkdir","mkdirat"],"action":"SCMP_ACT_ERRNO","errnoRet":1},
                            {"names":["personality"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":8,"op":"SCMP_CMP_EQ"}]},
                            {"names":["no_such_syscall_xyz"],"action":"SCMP_ACT_KILL"}]}"#,
        )
        .unwrap();
        let ctx = build(&cfg).unwrap();
        let f = tempfile::tempfile().unwrap();
        ctx.export_bpf(&f).unwrap();
        assert!(f.metadata().unwrap().len() >= 8 * 10);
    }
}

//! The OCI runtime and system containers: namespaces, cgroups v1/v2, rootfs, seccomp, capabilities, templates.

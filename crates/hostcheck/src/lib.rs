//! Probes the host: CPU flags, /dev/kvm and its capabilities, KVM flavour, cgroups, namespaces, overlayfs, tun.

//! The KVM backend of the hypervisor traits (kvm-ioctls).

pub mod state;

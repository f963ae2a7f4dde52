//! The software CPU backend: an x86-64 interpreter behind the hypervisor traits.

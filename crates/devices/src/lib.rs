//! Legacy and virtio devices; each sees only its bus offset and guest memory.

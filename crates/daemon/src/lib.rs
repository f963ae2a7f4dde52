//! The corefour daemon: inventory, lifecycle, export/import, clone, migration orchestration.

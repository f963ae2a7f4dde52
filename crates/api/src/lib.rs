//! REST types shared by daemon, VMM and CLI.

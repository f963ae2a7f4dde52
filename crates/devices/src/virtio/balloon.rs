//! balloon

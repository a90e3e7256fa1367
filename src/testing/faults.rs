//! Fault tests (placeholder).

//! Scenario and simulation tests that span several rdax components.
//!
//! The pool engine's crash simulation lives in `tests/tests/crash.rs`; it drives the real
//! pool code over the simulated-pmem medium from `rdaxd::pool::media::sim`.

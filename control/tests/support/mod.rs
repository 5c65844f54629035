//! Shared test support for the API source tests.

pub mod apiserver;

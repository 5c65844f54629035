//! Shared test support: the scripted API server and daemon helpers.

pub mod apiserver;
pub mod daemon;

//! clustergate-control library: Kubernetes semantics and table building.
//!
//! - [`manifest`]: reading Services and EndpointSlices (k8s-openapi types) from
//!   a YAML manifest (`kubectl get -o yaml` Lists, `---` documents, or one object).
//! - [`kube_source`]: the same objects from a live API server (watchers).
//! - [`model`]: kube-proxy's semantics, from those objects to [`Frontend`]s.
//! - [`incremental`]: the same model, kept up to date per changed object.
//! - [`ip`]: addresses and CIDRs read as kube-proxy reads them (sloppily).
//! - `show` (the `impl Model` blocks behind [`Model::to_json`],
//!   [`Model::to_table`] and [`Model::service_specs`]): presenting a model and
//!   handing its served frontends to the dataplane's table builder.
//!
//! The rules, and what is skipped versus refused, are in `docs/semantics.md`.

use std::path::{Path, PathBuf};

use thiserror::Error;

pub mod incremental;
pub mod ip;
pub mod kube_source;
pub mod manifest;
pub mod manifest_dir;
pub mod model;
pub mod policy;
pub mod publish;
mod show;

pub use manifest::{label, parse_manifest, parse_manifest_strict, ManifestError, Objects, Skipped};
pub use model::{
    build_model, Backend, Frontend, Model, ModelError, ModelOptions, DEFAULT_PROXY_NAME,
    DEFAULT_RETURN_PATH, RETURN_PATH_ANNOTATION,
};

/// Why a manifest file gave no model. Each variant names the file.
#[derive(Debug, Error)]
pub enum ControlError {
    /// The file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a readable manifest.
    #[error("{}: {source}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ManifestError,
    },
    /// A file of a manifest directory (or the directory) cannot be used.
    #[error(transparent)]
    Dir(#[from] manifest_dir::DirError),
    /// The path is neither a file nor a directory.
    #[error("{}: --manifest is neither a file nor a directory", path.display())]
    NotFileOrDir {
        /// The path.
        path: PathBuf,
    },
    /// The objects are refused (`--strict` only).
    #[error("{}: {source}", path.display())]
    Model {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: ModelError,
    },
}

/// Reads, parses and models a manifest file (or every manifest file of a
/// directory, see [`manifest_dir`]) with `options` (see
/// [`build_model`]): objects that cannot be used are skipped
/// ([`Model::skipped`], [`Model::errors`]).
///
/// # Errors
/// The file cannot be read, or [`parse_manifest`] refuses it; the error
/// names the file.
pub fn load_manifest_file(path: &Path, options: &ModelOptions) -> Result<Model, ControlError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            let dir = manifest_dir::ManifestDir::load(path)?;
            return Ok(build_model(&dir.objects(), options));
        }
        Ok(meta) if !meta.is_file() => {
            return Err(ControlError::NotFileOrDir {
                path: path.to_owned(),
            })
        }
        _ => {}
    }
    let text = std::fs::read_to_string(path).map_err(|source| ControlError::Read {
        path: path.to_owned(),
        source,
    })?;
    let objects = parse_manifest(&text).map_err(|source| ControlError::Manifest {
        path: path.to_owned(),
        source,
    })?;
    Ok(build_model(&objects, options))
}

/// [`load_manifest_file`], refusing the whole file for any error of
/// [`Model::errors`] (`--strict`).
///
/// # Errors
/// As [`load_manifest_file`], and the first of [`Model::errors`].
pub fn load_manifest_file_strict(
    path: &Path,
    options: &ModelOptions,
) -> Result<Model, ControlError> {
    load_manifest_file(path, options)?
        .strict()
        .map_err(|source| ControlError::Model {
            path: path.to_owned(),
            source,
        })
}

//! A manifest directory (`--manifest DIR`): every `*.yaml` and `*.yml` file
//! in it (not recursive; hidden files and editor temp files are ignored),
//! each read as a manifest of its own; the objects of all files form one
//! model, in file name order.
//!
//! Each file keeps its own last good objects: a file that cannot be read or
//! parsed is reported by name and its previous objects stay in the model. The
//! same object (kind, namespace, name) in two files: the one in the file first
//! in name order is used, the other is skipped as a duplicate naming both
//! files. `run` re-reads only the files that changed ([`ManifestDir::refresh`]).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use thiserror::Error;

use crate::manifest::{
    identity, label, parse_manifest_cached, DocumentCache, ManifestError, Objects, Skipped,
};

/// Why one file of a manifest directory was not (re-)read.
#[derive(Debug, Error)]
pub enum DirError {
    /// The directory cannot be listed.
    #[error("cannot list manifest directory {}: {source}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file cannot be read.
    #[error("cannot read manifest {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not a manifest (not YAML).
    #[error("manifest {}: {source}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        source: ManifestError,
    },
}

/// Whether `name` is a manifest file of a directory: ends in `.yaml` or
/// `.yml`, and is neither hidden (`.x.yaml`, vim's `.x.yaml.swp`) nor an
/// editor's temp or backup file (`#x.yaml#`, `x.yaml~`, `x.yaml.tmp`).
#[must_use]
pub fn is_manifest_name(name: &str) -> bool {
    !name.starts_with('.')
        && !name.starts_with('#')
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// When a file was last seen changed: mtime, length and inode.
type Stamp = (Option<SystemTime>, u64, u64);

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    (meta.modified().ok(), meta.len(), meta.ino())
}

#[derive(Debug, Default)]
struct File {
    stamp: Option<Stamp>,
    /// The last good objects.
    objects: Objects,
    /// Why the file on disk now is not used (its last good objects are).
    error: Option<String>,
    /// Its documents as last parsed: a write that changes one document
    /// parses that one again only.
    documents: DocumentCache,
}

/// The files of a manifest directory and their last good objects.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<String, File>,
}

impl ManifestDir {
    /// An empty view of `dir`; [`ManifestDir::rescan`] reads it.
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Reads every manifest file of `dir` once (`show`, `build`).
    ///
    /// # Errors
    /// The directory cannot be listed, or the first file (in name order)
    /// that cannot be read or is not YAML.
    pub fn load(dir: &Path) -> Result<Self, DirError> {
        let mut d = Self::new(dir);
        let (_, mut errors) = d.rescan()?;
        if errors.is_empty() {
            Ok(d)
        } else {
            Err(errors.remove(0))
        }
    }

    /// The directory.
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lists the directory and re-reads the files that are new or whose
    /// mtime, size or inode changed; forgets the files that are gone. Returns
    /// whether any file's objects changed, and the files that could not be
    /// read (their last good objects are kept), in name order.
    ///
    /// # Errors
    /// The directory cannot be listed (nothing is changed).
    pub fn rescan(&mut self) -> Result<(bool, Vec<DirError>), DirError> {
        let list = |source| DirError::List {
            path: self.dir.clone(),
            source,
        };
        let mut now = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(list)? {
            let entry = entry.map_err(list)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !is_manifest_name(&name) {
                continue;
            }
            // Follows symlinks, as a ConfigMap volume's `..data` links are.
            if let Ok(meta) = std::fs::metadata(entry.path()) {
                if meta.is_file() {
                    now.insert(name, stamp(&meta));
                }
            }
        }
        let gone: Vec<String> = self
            .files
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        let mut changed = !gone.is_empty();
        for name in gone {
            self.files.remove(&name);
        }
        let mut errors = Vec::new();
        for (name, st) in now {
            if self.files.get(&name).and_then(|f| f.stamp) == Some(st) {
                continue;
            }
            match self.refresh(&name) {
                Ok(c) => changed |= c,
                Err(e) => errors.push(e),
            }
        }
        Ok((changed, errors))
    }

    /// Re-reads the file `name` of the directory (after an inotify event):
    /// a file that is gone is forgotten; one that cannot be read or parsed
    /// keeps its last good objects. Returns whether the file's objects
    /// changed. Names that are not manifest files are ignored.
    ///
    /// # Errors
    /// The file cannot be read, or is not YAML (nothing is changed but the
    /// note of the error, which [`ManifestDir::objects`] reports).
    pub fn refresh(&mut self, name: &str) -> Result<bool, DirError> {
        if !is_manifest_name(name) {
            return Ok(false);
        }
        let path = self.dir.join(name);
        let meta = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return Ok(self.files.remove(name).is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(self.files.remove(name).is_some());
            }
            Err(source) => return Err(self.failed(name, DirError::Read { path, source })),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(self.files.remove(name).is_some());
            }
            Err(source) => return Err(self.failed(name, DirError::Read { path, source })),
        };
        let documents = &mut self.files.entry(name.to_owned()).or_default().documents;
        match parse_manifest_cached(&text, documents) {
            Ok(objects) => {
                let file = self.files.entry(name.to_owned()).or_default();
                file.stamp = Some(stamp(&meta));
                let had_error = file.error.take().is_some();
                if file.objects == objects && file.stamp.is_some() && !had_error {
                    return Ok(false);
                }
                file.objects = objects;
                Ok(true)
            }
            Err(source) => {
                let e = DirError::Manifest { path, source };
                let file = self.files.entry(name.to_owned()).or_default();
                file.stamp = Some(stamp(&meta));
                Err(self.failed(name, e))
            }
        }
    }

    /// Notes `e` on the file `name` (its last good objects stay).
    fn failed(&mut self, name: &str, e: DirError) -> DirError {
        let file = self.files.entry(name.to_owned()).or_default();
        file.error = Some(e.to_string());
        e
    }

    /// The names of the files read, in name order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.files.keys().map(String::as_str)
    }

    /// The objects of all files, in file name order (see [`merge_files`]).
    #[must_use]
    pub fn objects(&self) -> Objects {
        merge_files(
            &self.dir,
            self.files
                .iter()
                .map(|(name, f)| (name.as_str(), &f.objects, f.error.as_deref())),
        )
    }

    /// The last good objects of the file `name`, and why the file as it is
    /// now is not used, if it is not; `None`: no such file.
    #[must_use]
    pub fn file(&self, name: &str) -> Option<(&Objects, Option<&str>)> {
        self.files
            .get(name)
            .map(|f| (&f.objects, f.error.as_deref()))
    }
}

/// The objects of the files of `dir` (name, last good objects, why the file
/// now is not used), given in file name order, as one list. An object (kind,
/// namespace, name) also in a file earlier in name order is skipped as a
/// duplicate naming both files; a file whose last read failed is listed in
/// `skipped` (with its last good objects used).
#[must_use]
pub fn merge_files<'a>(
    dir: &Path,
    files: impl IntoIterator<Item = (&'a str, &'a Objects, Option<&'a str>)>,
) -> Objects {
    let mut out = Objects::default();
    let mut owner: HashMap<(&'static str, String, String), &str> = HashMap::new();
    for (file_name, o, error) in files {
        if let Some(error) = error {
            out.skipped.push(Skipped::new(
                format!("file {}", dir.join(file_name).display()),
                label::INVALID_VALUE,
                format!("{error}; the file's last good objects are kept"),
            ));
        }
        // Keeps `item` unless a file before `file_name` has its identity.
        let mut keep = |kind: &'static str, ns: &str, name: &str| -> bool {
            let key = (kind, ns.to_owned(), name.to_owned());
            match owner.get(&key) {
                Some(first) if *first != file_name => {
                    let object = if ns.is_empty() {
                        format!("{kind} {name}")
                    } else {
                        format!("{kind} {ns}/{name}")
                    };
                    let message = format!(
                        "in both {} and {}; the one in {} (first in name order) is used",
                        dir.join(first).display(),
                        dir.join(file_name).display(),
                        dir.join(first).display(),
                    );
                    out.skipped.push(Skipped::new(
                        object.clone(),
                        label::DUPLICATE,
                        message.clone(),
                    ));
                    // What `--strict` refuses, as a duplicate in one file.
                    out.errors.push(ManifestError::Object { object, message });
                    false
                }
                Some(_) => true,
                None => {
                    owner.insert(key, file_name);
                    true
                }
            }
        };
        for s in &o.services {
            let (ns, n) = identity(&s.metadata);
            if keep("Service", ns, n) {
                out.services.push(s.clone());
            }
        }
        for s in &o.slices {
            let (ns, n) = identity(&s.metadata);
            if keep("EndpointSlice", ns, n) {
                out.slices.push(s.clone());
            }
        }
        for s in &o.nodes {
            if keep("Node", "", s.metadata.name.as_deref().unwrap_or("")) {
                out.nodes.push(s.clone());
            }
        }
        for s in &o.pods {
            let (ns, n) = identity(&s.metadata);
            if keep("Pod", ns, n) {
                out.pods.push(s.clone());
            }
        }
        for s in &o.namespaces {
            if keep("Namespace", "", s.metadata.name.as_deref().unwrap_or("")) {
                out.namespaces.push(s.clone());
            }
        }
        for s in &o.policies {
            let (ns, n) = identity(&s.metadata);
            if keep("NetworkPolicy", ns, n) {
                out.policies.push(s.clone());
            }
        }
        out.skipped.extend(o.skipped.iter().cloned());
        out.errors.extend(o.errors.iter().cloned());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::is_manifest_name;

    #[test]
    fn only_yaml_files_that_are_not_hidden_or_temp_count() {
        for good in ["a.yaml", "b.yml", "web-10.yaml"] {
            assert!(is_manifest_name(good), "{good}");
        }
        for bad in [
            ".a.yaml",
            ".a.yaml.swp",
            "a.yaml~",
            "#a.yaml#",
            "a.yaml.tmp",
            "a.tmp",
            "a.json",
            "..data",
        ] {
            assert!(!is_manifest_name(bad), "{bad}");
        }
    }
}

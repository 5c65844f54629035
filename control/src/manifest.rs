//! Reading a static manifest: Kubernetes objects as YAML, into k8s-openapi types.
//!
//! Owns: [`parse_manifest`] and [`Objects`]. A manifest is what
//! `kubectl get services,endpointslices -A -o yaml` prints (one document whose
//! `kind` is `List`, or any `…List` with `items`), or several documents
//! separated by `---`, or a single object. Empty documents are fine.
//!
//! Only `v1` `Service`, `discovery.k8s.io/v1` `EndpointSlice`, `v1` `Node`,
//! and, for NetworkPolicy, `v1` `Pod`, `v1` `Namespace` and
//! `networking.k8s.io/v1` `NetworkPolicy` objects are kept; every other
//! object is listed in [`Objects::skipped`] with a reason.
//! Unknown fields (status, managedFields, …) are ignored, as k8s-openapi does.
//!
//! Refused (a [`ManifestError::Syntax`]): text that is not YAML. Skipped, one
//! by one (in [`Objects::skipped`], and as errors in [`Objects::errors`],
//! which `--strict` refuses): a document or list item that is not a mapping,
//! an object without `kind`, `apiVersion` or (for the kinds we read)
//! `metadata.name`, and a Service, EndpointSlice or Node whose fields have the
//! wrong type (the reason names the field path, e.g. `spec.ports[0].port`).
//! Field *values* are checked later, by [`crate::model::build_model`], and
//! only for objects that are served.
//!
//! Must never: panic on any input.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_norway::Value;
use thiserror::Error;

/// The kinds a manifest may hold, for messages.
pub const READ_KINDS: &str = "Service, EndpointSlice, Node, Pod, Namespace and NetworkPolicy";

/// The namespace of an object whose `metadata.namespace` is absent (as
/// `kubectl apply` would put it, without `-n`).
pub const DEFAULT_NAMESPACE: &str = "default";

/// An object (or part of one) that is not used, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Skipped {
    /// `"Kind ns/name"` (`"Kind name"` for objects without a namespace).
    pub object: String,
    /// Why, for people: the field first where there is one
    /// (`spec.clusterIP: "10.0.0.x" is not an IP address; …`).
    pub reason: String,
    /// Why, as a short stable label (one of [`label`]): the `reason` label of
    /// the `clustergate_control_objects_skipped` gauge.
    pub label: &'static str,
}

impl Skipped {
    /// A skip entry: `label` is one of [`label`].
    #[must_use]
    pub fn new(object: impl Into<String>, label: &'static str, reason: impl Into<String>) -> Self {
        Self {
            object: object.into(),
            reason: reason.into(),
            label,
        }
    }

    /// The object's kind: the first word of [`Skipped::object`], or
    /// `"unknown"` for a document without one (`"document 2: …"`).
    #[must_use]
    pub fn kind(&self) -> &str {
        let first = self
            .object
            .split_once(' ')
            .map_or(self.object.as_str(), |(k, _)| k);
        if first.starts_with(|c: char| c.is_ascii_uppercase()) {
            first
        } else {
            "unknown"
        }
    }
}

/// The labels of [`Skipped::label`], stable for metrics and alerts.
pub mod label {
    /// A kind or apiVersion clustergate does not read.
    pub const UNSUPPORTED: &str = "unsupported";
    /// Labelled for another proxy (`service.kubernetes.io/service-proxy-name`).
    pub const OTHER_PROXY: &str = "other_proxy";
    /// Nothing to proxy, as kube-proxy decides too: ExternalName, headless,
    /// no cluster IP, no ports, FQDN slices, `ipMode: Proxy`.
    pub const NOT_PROXIED: &str = "not_proxied";
    /// An EndpointSlice with no Service served (no label, no such Service, or
    /// the Service is skipped).
    pub const NO_SERVICE: &str = "no_service";
    /// An endpoint without addresses, a slice port without a number.
    pub const EMPTY: &str = "empty";
    /// An address or CIDR that does not parse (even as kube-proxy's sloppy
    /// parser reads it), or an IPv4-mapped IPv6 address.
    pub const INVALID_ADDRESS: &str = "invalid_address";
    /// Any other value that cannot be used (a port, protocol, type, policy,
    /// annotation…).
    pub const INVALID_VALUE: &str = "invalid_value";
    /// An address of a family the Service has no cluster IP of.
    pub const WRONG_FAMILY: &str = "wrong_family";
    /// A node port or health-check node port outside `--service-node-port-range`.
    pub const OUT_OF_RANGE: &str = "out_of_range";
    /// The same object a second time (the first is used).
    pub const DUPLICATE: &str = "duplicate";
    /// An address, port or prefix another object has first.
    pub const CONFLICT: &str = "conflict";
    /// Not skipped: a caveat about something used ([`crate::Model::notes`]).
    pub const NOTE: &str = "note";
}

/// The objects of a manifest, in manifest order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    /// `v1` Services.
    pub services: Vec<Service>,
    /// `discovery.k8s.io/v1` EndpointSlices.
    pub slices: Vec<EndpointSlice>,
    /// `v1` Nodes (for `internalTrafficPolicy: Local`: their pod CIDRs and
    /// addresses say which node a client is on).
    pub nodes: Vec<Node>,
    /// `v1` Pods (NetworkPolicy: labels, addresses, named ports).
    pub pods: Vec<Pod>,
    /// `v1` Namespaces (NetworkPolicy: their labels).
    pub namespaces: Vec<Namespace>,
    /// `networking.k8s.io/v1` NetworkPolicies.
    pub policies: Vec<NetworkPolicy>,
    /// Objects of other kinds or versions, and objects that cannot be read.
    pub skipped: Vec<Skipped>,
    /// Why objects could not be read (each is also in `skipped`), in
    /// manifest order; `--strict` refuses the manifest for the first.
    pub errors: Vec<ManifestError>,
}

/// Why a manifest was refused as a whole.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// The text is not YAML (the message carries line and column).
    #[error("not valid YAML: {message}")]
    Syntax {
        /// The YAML parser's message, with its position.
        message: String,
        /// 1-based line of the error, when known.
        line: Option<usize>,
        /// 1-based column of the error, when known.
        column: Option<usize>,
    },
    /// An object (or a document that should be one) cannot be read.
    #[error("{object}: {message}")]
    Object {
        /// `"Service ns/name"`, or where it is (`"document 2, items[3]"`) when
        /// it has no name.
        object: String,
        /// What is wrong, starting with the field path where there is one.
        message: String,
    },
}

/// Parses a manifest into Services, EndpointSlices, Nodes and skipped objects.
///
/// # Errors
/// Text that is not YAML. Objects that cannot be read are skipped (see the
/// module documentation).
pub fn parse_manifest(text: &str) -> Result<Objects, ManifestError> {
    parse_documents(text, 0).map(|(objects, _)| objects)
}

/// The objects of the documents of `text`, numbered from `first + 1`, and
/// the number of documents.
fn parse_documents(text: &str, first: usize) -> Result<(Objects, usize), ManifestError> {
    let mut out = Objects::default();
    let mut n = 0;
    for (i, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let mut value = Value::deserialize(doc).map_err(syntax)?;
        value.apply_merge().map_err(syntax)?;
        collect_or_skip(value, &format!("document {}", first + i + 1), &mut out);
        n = i + 1;
    }
    Ok((out, n))
}

/// The objects of the documents of a manifest last read, by (number of the
/// first document, text), for [`parse_manifest_cached`].
#[derive(Debug, Default)]
pub struct DocumentCache {
    parts: HashMap<(usize, String), (Objects, usize)>,
}

/// Whether `line` is a YAML document marker (`---` or `...` at the start of
/// a line, then a space, a tab or the end of the line).
fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

/// [`parse_manifest`], parsing again only the documents whose text changed
/// since the last call with `cache`: a file of 100 Services where one
/// changed costs one document, not 100.
///
/// The text is cut before each line that starts with `---` (YAML forbids
/// such a line inside a document, block scalars included); each part is
/// parsed alone, which gives the same documents since a YAML document never
/// refers to another (anchors are per document). Text with directives
/// (`%`), `...` end markers or a byte order mark, and any part that is not
/// YAML, are parsed whole, so errors name the line of the whole file.
///
/// # Errors
/// As [`parse_manifest`].
pub fn parse_manifest_cached(
    text: &str,
    cache: &mut DocumentCache,
) -> Result<Objects, ManifestError> {
    let whole = |cache: &mut DocumentCache| {
        cache.parts.clear();
        parse_manifest(text)
    };
    if text.starts_with('\u{feff}') {
        return whole(cache);
    }
    let mut parts: Vec<&str> = Vec::new();
    let mut start = 0;
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.starts_with('%') || is_marker(line, "...") {
            return whole(cache);
        }
        if is_marker(line, "---") && at > start {
            parts.push(&text[start..at]);
            start = at;
        }
        at += line.len();
    }
    if at > start {
        parts.push(&text[start..at]);
    }
    // Blank lines and comments before the first `---` are no document in
    // the whole file (alone, they would be an empty one).
    if parts.len() > 1
        && !is_marker(parts[0].lines().next().unwrap_or(""), "---")
        && parts[0].lines().all(|l| {
            let l = l.trim_start();
            l.is_empty() || l.starts_with('#')
        })
    {
        parts.remove(0);
    }
    let mut next = HashMap::with_capacity(parts.len());
    let mut out = Objects::default();
    let mut first = 0;
    for part in parts {
        let key = (first, part.to_owned());
        let (objects, n) = match cache.parts.remove(&key) {
            Some(done) => done,
            None => match parse_documents(part, first) {
                Ok(done) => done,
                Err(_) => return whole(cache),
            },
        };
        out.services.extend(objects.services.iter().cloned());
        out.slices.extend(objects.slices.iter().cloned());
        out.nodes.extend(objects.nodes.iter().cloned());
        out.pods.extend(objects.pods.iter().cloned());
        out.namespaces.extend(objects.namespaces.iter().cloned());
        out.policies.extend(objects.policies.iter().cloned());
        out.skipped.extend(objects.skipped.iter().cloned());
        out.errors.extend(objects.errors.iter().cloned());
        first += n;
        next.insert(key, (objects, n));
    }
    cache.parts = next;
    Ok(out)
}

/// [`parse_manifest`], refusing the manifest for the first object that
/// cannot be read (`--strict`).
///
/// # Errors
/// YAML syntax, and the first of [`Objects::errors`].
pub fn parse_manifest_strict(text: &str) -> Result<Objects, ManifestError> {
    let objects = parse_manifest(text)?;
    match objects.errors.first() {
        Some(e) => Err(e.clone()),
        None => Ok(objects),
    }
}

/// [`collect`], skipping (and noting) what cannot be read.
fn collect_or_skip(value: Value, place: &str, out: &mut Objects) {
    if let Err(e) = collect(value, place, out) {
        if let ManifestError::Object { object, message } = &e {
            out.skipped.push(Skipped::new(
                object.clone(),
                label::INVALID_VALUE,
                format!("{message}; the object is skipped"),
            ));
        }
        out.errors.push(e);
    }
}

fn syntax(e: serde_norway::Error) -> ManifestError {
    let loc = e.location();
    ManifestError::Syntax {
        message: e.to_string(),
        line: loc.as_ref().map(serde_norway::Location::line),
        column: loc.as_ref().map(serde_norway::Location::column),
    }
}

/// A YAML value's kind, for messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Sequence(_) => "sequence",
        Value::Mapping(_) => "mapping",
        Value::Tagged(_) => "tagged value",
    }
}

/// A string field of a mapping: `Ok(None)` when absent or null.
fn str_field<'a>(v: &'a Value, key: &str, place: &str) -> Result<Option<&'a str>, ManifestError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ManifestError::Object {
            object: place.to_owned(),
            message: format!("{key}: expected a string, found a {}", type_name(other)),
        }),
    }
}

/// `"Kind ns/name"` from an untyped object, if it has a name.
fn label_of(kind: &str, v: &Value, namespaced: bool) -> Option<String> {
    let meta = v.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|s| !s.is_empty())?;
    match meta.get("namespace").and_then(Value::as_str) {
        Some(ns) if !ns.is_empty() => Some(format!("{kind} {ns}/{name}")),
        _ if namespaced => Some(format!("{kind} {DEFAULT_NAMESPACE}/{name}")),
        _ => Some(format!("{kind} {name}")),
    }
}

fn collect(value: Value, place: &str, out: &mut Objects) -> Result<(), ManifestError> {
    let mut value = match value {
        Value::Null => return Ok(()), // an empty document
        Value::Mapping(_) => value,
        other => {
            return Err(ManifestError::Object {
                object: place.to_owned(),
                message: format!(
                    "expected a Kubernetes object (a mapping), found a {}",
                    type_name(&other)
                ),
            })
        }
    };
    let Some(kind) = str_field(&value, "kind", place)?.filter(|k| !k.is_empty()) else {
        return Err(ManifestError::Object {
            object: place.to_owned(),
            message: "kind: missing".to_owned(),
        });
    };
    let kind = kind.to_owned();
    // A list: `kind: List` as kubectl prints, or a typed list (ServiceList, …).
    if kind == "List" || (kind.ends_with("List") && value.get("items").is_some()) {
        let items = value.get_mut("items").map(std::mem::take);
        return match items {
            None | Some(Value::Null) => Ok(()),
            Some(Value::Sequence(items)) => {
                for (j, item) in items.into_iter().enumerate() {
                    collect_or_skip(item, &format!("{place}, items[{j}]"), out);
                }
                Ok(())
            }
            Some(other) => Err(ManifestError::Object {
                object: format!("{kind} ({place})"),
                message: format!("items: expected a sequence, found a {}", type_name(&other)),
            }),
        };
    }
    let named = |namespaced| label_of(&kind, &value, namespaced);
    let Some(api_version) = str_field(&value, "apiVersion", place)?.filter(|a| !a.is_empty())
    else {
        return Err(ManifestError::Object {
            object: named(false).unwrap_or_else(|| format!("{kind} ({place})")),
            message: "apiVersion: missing".to_owned(),
        });
    };
    match (api_version, kind.as_str()) {
        ("v1", "Service") => {
            let svc: Service = typed(&value, &kind, place)?;
            out.services.push(svc);
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            let slice: EndpointSlice = typed(&value, &kind, place)?;
            out.slices.push(slice);
        }
        ("v1", "Node") => {
            let node: Node = typed_as(&value, &kind, place, false)?;
            out.nodes.push(node);
        }
        ("v1", "Pod") => {
            let pod: Pod = typed(&value, &kind, place)?;
            out.pods.push(pod);
        }
        ("v1", "Namespace") => {
            let ns: Namespace = typed_as(&value, &kind, place, false)?;
            out.namespaces.push(ns);
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let np: NetworkPolicy = typed(&value, &kind, place)?;
            out.policies.push(np);
        }
        (_, "Service" | "EndpointSlice" | "Node" | "Pod" | "Namespace" | "NetworkPolicy") => {
            let cluster_scoped = matches!(kind.as_str(), "Node" | "Namespace");
            let object = named(!cluster_scoped).unwrap_or_else(|| format!("{kind} ({place})"));
            let want = match kind.as_str() {
                "EndpointSlice" => "discovery.k8s.io/v1",
                "NetworkPolicy" => "networking.k8s.io/v1",
                _ => "v1",
            };
            out.skipped.push(Skipped::new(
                object,
                label::UNSUPPORTED,
                format!("apiVersion {api_version} is not read (clustergate reads {kind} {want})"),
            ));
        }
        _ => {
            let object = named(false).unwrap_or_else(|| format!("{kind} ({place})"));
            out.skipped.push(Skipped::new(
                object,
                label::UNSUPPORTED,
                format!("kind {kind} ({api_version}) is not read (clustergate reads {READ_KINDS})"),
            ));
        }
    }
    Ok(())
}

/// Decodes a Service or EndpointSlice, naming the object and the field path on
/// error. On error the object is written back to YAML text and read from
/// there, so the YAML deserializer can report the path (`spec.ports[1].port`);
/// the line and column it would add refer to that text, not the manifest, and
/// are dropped.
fn typed<T: DeserializeOwned>(value: &Value, kind: &str, place: &str) -> Result<T, ManifestError> {
    typed_as(value, kind, place, true)
}

/// [`typed`] for a namespaced object or (`namespaced` false) a cluster-scoped one.
fn typed_as<T: DeserializeOwned>(
    value: &Value,
    kind: &str,
    place: &str,
    namespaced: bool,
) -> Result<T, ManifestError> {
    let Some(object) = label_of(kind, value, namespaced) else {
        return Err(ManifestError::Object {
            object: format!("{kind} ({place})"),
            message: "metadata.name: missing".to_owned(),
        });
    };
    let err = |message: String| ManifestError::Object {
        object: object.clone(),
        message,
    };
    // Fast path: straight from the parsed value. Only when that fails is the
    // object written back and read again, for an error that names the field.
    if let Ok(t) = T::deserialize(value) {
        return Ok(t);
    }
    let text = serde_norway::to_string(value).map_err(|e| err(e.to_string()))?;
    serde_norway::from_str(&text).map_err(|e| {
        let mut message = e.to_string();
        if let Some(loc) = e.location() {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_owned();
            }
        }
        err(message)
    })
}

/// `(namespace, name)` of an object, with the default namespace filled in.
#[must_use]
pub fn identity(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    let ns = meta
        .namespace
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE);
    (ns, meta.name.as_deref().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly on purpose

    use super::*;

    #[test]
    fn empty_and_comment_only_manifests_have_no_objects() {
        for text in ["", "# nothing\n", "---\n---\n", "---\n# c\n---\n\n"] {
            let o = parse_manifest(text).unwrap();
            assert_eq!(o, Objects::default(), "{text:?}");
        }
    }

    /// The error of the first object that cannot be read.
    fn first_error(text: &str) -> ManifestError {
        let objects = parse_manifest(text).unwrap();
        assert_eq!(
            objects.skipped.len(),
            objects.errors.len()
                + objects
                    .skipped
                    .iter()
                    .filter(|s| s.label == label::UNSUPPORTED)
                    .count(),
            "each error is skipped: {objects:?}"
        );
        parse_manifest_strict(text).unwrap_err()
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let e = parse_manifest("kind: List\nitems: [1, 2\nb: 3\n").unwrap_err();
        match &e {
            ManifestError::Syntax { line, .. } => assert!(line.is_some(), "{e}"),
            ManifestError::Object { .. } => panic!("{e}"),
        }
        assert!(e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_field_path() {
        let e = first_error(
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports:\n  - port: 80\n  - port: eighty\n",
        );
        let s = e.to_string();
        assert!(
            s.starts_with("Service default/web: spec.ports[1].port: invalid type"),
            "{s}"
        );
        assert!(!s.contains(" at line "), "{s}");
    }

    #[test]
    fn scalars_and_nameless_objects_are_refused() {
        let e = first_error("a: 1\n---\n- 1\n");
        assert_eq!(
            e.to_string(),
            "document 1: kind: missing",
            "the first problem wins"
        );
        let e = first_error("--- 42\n");
        assert_eq!(
            e.to_string(),
            "document 1: expected a Kubernetes object (a mapping), found a number"
        );
        let e = first_error("apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {namespace: x}\n");
        assert_eq!(
            e.to_string(),
            "Service (document 1, items[0]): metadata.name: missing"
        );
    }

    #[test]
    fn one_unreadable_object_skips_only_itself() {
        let objects = parse_manifest(
            "apiVersion: v1\nkind: List\nitems:\n\
             - {apiVersion: v1, kind: Service, metadata: {name: bad}, spec: {ports: [{port: eighty}]}}\n\
             - {apiVersion: v1, kind: Service, metadata: {name: good}, spec: {clusterIP: 198.19.0.1}}\n\
             ---\n42\n",
        )
        .unwrap();
        let names: Vec<_> = objects
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["good"]);
        let skipped: Vec<(&str, &str, &str)> = objects
            .skipped
            .iter()
            .map(|s| (s.kind(), s.object.as_str(), s.label))
            .collect();
        assert_eq!(
            skipped,
            [
                ("Service", "Service default/bad", "invalid_value"),
                ("unknown", "document 2", "invalid_value"),
            ]
        );
        assert!(
            objects.skipped[0]
                .reason
                .starts_with("spec.ports[0].port: invalid type"),
            "{:?}",
            objects.skipped
        );
        assert_eq!(objects.errors.len(), 2);
    }
}

//! clustergate-control library: Kubernetes semantics and table building.

//! clustergate's table builder: control builds, the dataplane looks up.
//!
//! Everything that makes a service table and publishes it, off the packet
//! path: the Maglev ring builder ([`maglev`]), tables from plain
//! descriptions ([`table`]: the spec types, the `Table::build*`
//! constructors through [`TableBuild`], and control's incremental
//! [`table::Builder`]), and the snapshot writer ([`snapshot`]: encoding,
//! the publish protocol, compaction, pruning; [`delta`]: delta files).
//!
//! It depends on `clustergate-dataplane` for the records, [`Table`] and the
//! shared-memory ABI, and builds every table through the dataplane's
//! validating constructors (`Front::new`, `Table::from_blocks`), so a
//! table built here passes the same checks as one read from a snapshot.
//! The gateway binary does not link this crate.
//!
//! [`Table`]: clustergate_dataplane::table::Table
#![forbid(unsafe_code)]

pub mod delta;
pub mod maglev;
pub mod snapshot;
pub mod table;

pub use table::TableBuild;

//! Publishing the model's tables as snapshots (`run`'s last step).
//!
//! A [`Publisher`] keeps the snapshot [`Writer`], a table [`Builder`] and the
//! table it published last. Each publish builds only what changed:
//! - **in place** (the common case: endpoints moved, a Service's port
//!   changed its return path, …): given the Services whose frontends
//!   changed ([`TableChanges`] from the incremental model), only their
//!   specs are made and compared, only the frontends whose spec changed are
//!   built again, and the new table shares every other block and the index
//!   with the last one ([`Builder::update`]). Its cost does not grow with the
//!   number of Services;
//! - **whole**, when frontends were added or removed, the nodes or the
//!   policy changed, on the first publish, after a failed one, or without
//!   [`TableChanges`] (a single manifest file): the whole spec is made and
//!   [`Builder::build`] still shares every unchanged frontend's block.
//!
//! Either way the writer publishes a delta from the last table when only
//! frontends changed ([`Writer::publish_change`]).

use std::path::Path;

use anyhow::{Context, Result};
use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_builder::snapshot::{Writer, Written};
use clustergate_builder::table::{Builder, RingSizes, ServiceSpec, Update};
use clustergate_builder::TableBuild;
use clustergate_dataplane::snapshot;
use clustergate_dataplane::table::Table;
use tracing::{debug, info, warn};

use crate::incremental::TableChanges;
use crate::show::frontend_spec;
use crate::Model;

/// What [`Publisher::publish`] published.
#[derive(Debug)]
pub struct Published {
    /// Its generation.
    pub generation: u64,
    /// Its number of frontends.
    pub frontends: usize,
    /// Built in place ([`Builder::update`]) rather than whole.
    pub in_place: bool,
    /// How it was written.
    pub written: Written,
}

/// Builds and publishes tables into one snapshot directory (see the module
/// docs).
#[derive(Debug)]
pub struct Publisher {
    writer: Writer,
    builder: Builder,
    last: Option<Table>,
    /// The next publish builds the whole table: nothing published yet by
    /// this publisher, or the last publish failed (the changes it was given
    /// are not in `last`).
    whole_next: bool,
}

impl Publisher {
    /// Opens the snapshot directory `dir` (creating it if needed). Maglev
    /// rings keep the sizes of the snapshot `dir` holds now, so that a
    /// restarted control keeps them (a ring of another size remaps nearly
    /// all its flows); without a snapshot every ring gets a fresh size, and
    /// one that cannot be read is warned about. The first publish is always
    /// a full snapshot.
    ///
    /// # Errors
    /// The directory cannot be opened or locked ([`Writer::open`]).
    pub fn open(dir: &Path, seed: u64) -> Result<Self> {
        let writer = Writer::open(dir)
            .with_context(|| format!("opening snapshot directory {}", dir.display()))?;
        let sizes = match snapshot::load_current(dir) {
            Ok(Some(table)) => {
                let sizes = table.ring_sizes();
                info!(
                    generation = table.generation(),
                    rings = sizes.len(),
                    "keeping the Maglev ring sizes of the published snapshot"
                );
                sizes
            }
            Ok(None) => RingSizes::default(),
            Err(e) => {
                warn!(dir = %dir.display(), "cannot read the published snapshot ({e}); Maglev rings get fresh sizes");
                RingSizes::default()
            }
        };
        Ok(Self {
            writer,
            builder: Builder::new(seed, DEFAULT_MAX_RING_SIZE, sizes),
            last: None,
            whole_next: true,
        })
    }

    /// The generation the next publish gets.
    #[must_use]
    pub fn next_generation(&self) -> u64 {
        self.writer.next_generation()
    }

    /// The table published last by this publisher.
    #[must_use]
    pub fn last(&self) -> Option<&Table> {
        self.last.as_ref()
    }

    /// Builds and publishes the tables of `model`, unless they equal the
    /// last ones (`Ok(None)`). `changes`: what changed in `model`'s tables
    /// since the last call ([`crate::incremental::IncrementalModel::take_table_changes`]);
    /// `None`: unknown, the whole table is built.
    ///
    /// # Errors
    /// A table that cannot be built (nothing is published, the last
    /// generation stays), or the snapshot cannot be written.
    pub fn publish(
        &mut self,
        model: &Model,
        changes: Option<&TableChanges>,
    ) -> Result<Option<Published>> {
        let result = self.try_publish(model, changes);
        // The changes taken for a failed publish are not in `last`: the
        // next one rebuilds the whole table from the model.
        self.whole_next = result.is_err();
        result
    }

    fn try_publish(
        &mut self,
        model: &Model,
        changes: Option<&TableChanges>,
    ) -> Result<Option<Published>> {
        let generation = self.writer.next_generation();
        let mut table = None;
        if let (Some(c), Some(last), false) = (changes, self.last.as_ref(), self.whole_next) {
            if !c.whole && model.frontends.len() == last.frontends().len() {
                let specs: Vec<(usize, ServiceSpec)> = c
                    .services
                    .iter()
                    .flat_map(|k| model.frontends_of_service(k))
                    .map(|i| (i, frontend_spec(&model.frontends[i])))
                    .collect();
                match self
                    .builder
                    .update(generation, last, specs.iter().map(|(i, s)| (*i, s)))
                    .context("building the table")?
                {
                    Update::Table(t) => table = Some((t, true)),
                    Update::Unchanged => return Ok(None),
                    Update::Reshaped => {
                        debug!("a changed frontend is not in place: building the whole table");
                    }
                }
            }
        }
        let (table, in_place) = match table {
            Some(t) => t,
            None => {
                let spec = model.table_spec();
                let table = self
                    .builder
                    .build(generation, &spec)
                    .context("building the table")?;
                if self.last.as_ref().is_some_and(|l| table.same_blocks(l)) {
                    return Ok(None);
                }
                (table, false)
            }
        };
        let written = self
            .writer
            .publish_change(&table, self.last.as_ref())
            .context("publishing the snapshot")?;
        let published = Published {
            generation,
            frontends: table.frontends().len(),
            in_place,
            written,
        };
        self.last = Some(table);
        Ok(Some(published))
    }
}

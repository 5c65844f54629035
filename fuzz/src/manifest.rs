//! The manifest target: control's YAML manifest reader and model builder,
//! through to the table and the snapshot it publishes.
//!
//! Input: the manifest text (bytes that are not UTF-8 are skipped, as
//! `std::fs::read_to_string` refuses them). An even length uses the default
//! options; an odd length DSR by default, a narrow node-port range and
//! node ports on two prefixes only.
//!
//! Checked: nothing panics; every refusal names what is wrong; every model the lenient reader gives is one the table
//! builder accepts (a manifest control reads can always be published), and
//! its snapshot decodes to a table that encodes to the same bytes.

use clustergate_control::{build_model, parse_manifest, ModelOptions};
use clustergate_builder::maglev::DEFAULT_MAX_RING_SIZE;
use clustergate_dataplane::snapshot::decode;
use clustergate_builder::snapshot::encode;
use clustergate_builder::TableBuild;
use clustergate_dataplane::table::{ReturnPath, Table};

fn options(odd: bool) -> ModelOptions {
    if odd {
        ModelOptions {
            return_path: ReturnPath::Dsr,
            node_port_range: 30_000..=30_100,
            node_port_addresses: vec![
                "198.18.0.0/16".parse().expect("fuzz prefix"),
                "2001:db8::/32".parse().expect("fuzz prefix"),
            ],
            ..ModelOptions::default()
        }
    } else {
        ModelOptions::default()
    }
}

/// Runs one input (see the module's docs); panics on a broken property.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let objects = match parse_manifest(text) {
        Ok(o) => o,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // What `--strict` refuses is named.
    if let Some(e) = objects.errors.first() {
        assert!(!e.to_string().is_empty());
    }
    let model = build_model(&objects, &options(data.len() % 2 == 1));
    let _ = model.to_json();
    let _ = model.to_table();
    let table = Table::build_full(1, 0, &model.table_spec(), DEFAULT_MAX_RING_SIZE)
        .unwrap_or_else(|e| panic!("a model the table builder refuses: {e}"));
    let bytes = encode(&table);
    let back = decode(&bytes).unwrap_or_else(|e| panic!("control's snapshot refused: {e}"));
    assert!(encode(&back) == bytes, "the snapshot does not round-trip");
    let _ = model.strict();
}

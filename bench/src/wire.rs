//! Bench frames on the wire (being written).

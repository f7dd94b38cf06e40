//! keel-dataflows

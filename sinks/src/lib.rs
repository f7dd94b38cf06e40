//! keel-sinks

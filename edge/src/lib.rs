//! keel-edge

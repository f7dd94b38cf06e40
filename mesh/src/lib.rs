//! keel-mesh

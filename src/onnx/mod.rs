//! ONNX graphs: the protobuf messages, building a transformer graph with hook tensors, and
//! writing weights as external data.

pub mod build;
pub mod proto;
pub mod surgery;
pub mod writer;

//! ONNX graphs: the protobuf messages, building a transformer graph with hook tensors,
//! writing weights as external data, and differentiating a graph (reverse mode).

pub mod autodiff;
pub mod build;
pub mod proto;
pub mod surgery;
pub mod writer;

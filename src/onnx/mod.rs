//! ONNX graphs: the protobuf messages, building a transformer graph with hook tensors,
//! writing weights as external data, differentiating a graph (reverse mode), and making its
//! backward pass optional.

pub mod autodiff;
pub mod build;
pub mod optional;
pub mod proto;
pub mod surgery;
pub mod writer;

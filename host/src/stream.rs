//! The one stream shape every streaming operation returns, whatever its error type. The
//! operations below the gRPC layer yield their own errors (`AgentError`, `VmError`); the
//! gRPC layer maps each item to `tonic::Status` ([`crate::service::status`]).

use std::pin::Pin;
use tokio_stream::Stream;

/// A boxed stream of results, `Send` and owning everything it needs.
pub type BoxStream<T, E> = Pin<Box<dyn Stream<Item = Result<T, E>> + Send + 'static>>;

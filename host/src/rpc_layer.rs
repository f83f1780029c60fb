//! The gRPC server's edge, as one tower layer around every service (`Server::layer`): a
//! `tracing` span for each request and the per-method RPC metrics. No handler knows about it.
//!
//! - **Span** `rpc{method=StartVM vm=web1 id=17}`: entered while the handler's future runs,
//!   so every log line the handler writes names the method, the VM and the request. The VM
//!   comes from the request's top-level `vm_id` field, read from the first body frame of a
//!   unary or server-streaming call (a client-streaming call is not held up for it); which
//!   field number that is comes from the compiled descriptors ([`MethodTable`]).
//! - **Metrics** ([`RpcMetrics`]), in the names Prometheus' gRPC exporters use:
//!   `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}` and the
//!   `grpc_server_handling_seconds` histogram, labelled by `grpc_service` and `grpc_method`.
//!   A call is handled when its status is known: from the response headers (an error
//!   answered at once) or the trailers (the end of a unary reply or of a stream); a stream
//!   the client drops first counts as `Cancelled`. Methods not in the descriptors count under
//!   `grpc_service="unknown"`, so a client cannot grow the label sets.

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tonic::Code;
use tracing::Instrument;

/// Upper bounds of the latency histogram, in seconds.
pub const LATENCY_BUCKETS_S: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0,
];

/// Longest VM id put into a span; a longer one is cut.
const MAX_SPAN_VM_BYTES: usize = 128;

/// What the layer knows about one method, from the descriptors.
#[derive(Debug, Clone)]
struct MethodInfo {
    service: Arc<str>,
    method: Arc<str>,
    /// Field number of the request's top-level `vm_id` string, when the request has one
    /// and arrives whole before the handler needs it (not client-streaming).
    vm_field: Option<u32>,
}

/// Every method of the served services, by request path (`/pkg.Service/Method`).
#[derive(Debug, Clone, Default)]
pub struct MethodTable {
    by_path: HashMap<String, MethodInfo>,
}

impl MethodTable {
    /// Reads the services and request messages of an encoded `FileDescriptorSet`.
    pub fn from_descriptors(encoded: &[u8]) -> Result<MethodTable, prost::DecodeError> {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(encoded)?;
        let mut vm_fields = HashMap::new();
        for file in &set.file {
            let pkg = file.package();
            for msg in &file.message_type {
                let field = msg.field.iter().find(|f| {
                    f.name() == "vm_id"
                        && f.r#type() == prost_types::field_descriptor_proto::Type::String
                });
                if let Some(f) = field {
                    vm_fields.insert(format!(".{pkg}.{}", msg.name()), f.number() as u32);
                }
            }
        }
        let mut by_path = HashMap::new();
        for file in &set.file {
            let pkg = file.package();
            for svc in &file.service {
                let service: Arc<str> = format!("{pkg}.{}", svc.name()).into();
                for m in &svc.method {
                    let vm_field = if m.client_streaming() {
                        None
                    } else {
                        vm_fields.get(m.input_type()).copied()
                    };
                    by_path.insert(
                        format!("/{service}/{}", m.name()),
                        MethodInfo {
                            service: service.clone(),
                            method: m.name().into(),
                            vm_field,
                        },
                    );
                }
            }
        }
        Ok(MethodTable { by_path })
    }

    /// Adds the methods of another descriptor set (the standard health and reflection
    /// services, served beside ours).
    pub fn extend_from_descriptors(&mut self, encoded: &[u8]) -> Result<(), prost::DecodeError> {
        let other = MethodTable::from_descriptors(encoded)?;
        self.by_path.extend(other.by_path);
        Ok(())
    }

    /// Every service qx-node serves: ours, health, and reflection v1 and v1alpha.
    pub fn served() -> Result<MethodTable, prost::DecodeError> {
        let mut t = MethodTable::from_descriptors(crate::pb::FILE_DESCRIPTOR_SET)?;
        t.extend_from_descriptors(tonic_health::pb::FILE_DESCRIPTOR_SET)?;
        t.extend_from_descriptors(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)?;
        t.extend_from_descriptors(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)?;
        Ok(t)
    }

    fn get(&self, path: &str) -> Option<&MethodInfo> {
        self.by_path.get(path)
    }
}

/// `(grpc_service, grpc_method)`.
type MethodKey = (Arc<str>, Arc<str>);

/// Latency histogram and status counts of one method.
#[derive(Debug, Default)]
struct MethodStats {
    started: u64,
    /// Cumulative counts per bucket of [`LATENCY_BUCKETS_S`], then the total count.
    buckets: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum_s: f64,
    handled: BTreeMap<i32, u64>,
}

/// The RPC figures of the server, rendered into the Prometheus endpoint.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    methods: Mutex<BTreeMap<MethodKey, MethodStats>>,
}

impl RpcMetrics {
    fn with<R>(&self, key: &MethodKey, f: impl FnOnce(&mut MethodStats) -> R) -> R {
        let mut map = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(key.clone()).or_default())
    }

    fn started(&self, key: &MethodKey) {
        self.with(key, |s| s.started += 1);
    }

    fn handled(&self, key: &MethodKey, code: Code, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        self.with(key, |s| {
            *s.handled.entry(code as i32).or_default() += 1;
            for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
                if secs <= *le {
                    s.buckets[i] += 1;
                }
            }
            s.count += 1;
            s.sum_s += secs;
        });
    }

    /// Appends the figures in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let map = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        let head = |out: &mut String, name: &str, help: &str, kind: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            out,
            "grpc_server_started_total",
            "RPCs started on the server, by method.",
            "counter",
        );
        for ((svc, m), s) in map.iter() {
            let _ = writeln!(
                out,
                "grpc_server_started_total{{grpc_service=\"{svc}\",grpc_method=\"{m}\"}} {}",
                s.started
            );
        }
        head(
            out,
            "grpc_server_handled_total",
            "RPCs completed on the server, by method and status code.",
            "counter",
        );
        for ((svc, m), s) in map.iter() {
            for (code, n) in &s.handled {
                let _ = writeln!(
                    out,
                    "grpc_server_handled_total{{grpc_service=\"{svc}\",grpc_method=\"{m}\",grpc_code=\"{:?}\"}} {n}",
                    Code::from(*code)
                );
            }
        }
        head(
            out,
            "grpc_server_handling_seconds",
            "Time from the request to the final status (the end of a stream), by method.",
            "histogram",
        );
        for ((svc, m), s) in map.iter() {
            let labels = format!("grpc_service=\"{svc}\",grpc_method=\"{m}\"");
            for (le, n) in LATENCY_BUCKETS_S.iter().zip(s.buckets) {
                let _ = writeln!(
                    out,
                    "grpc_server_handling_seconds_bucket{{{labels},le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "grpc_server_handling_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n\
                 grpc_server_handling_seconds_sum{{{labels}}} {}\n\
                 grpc_server_handling_seconds_count{{{labels}}} {}",
                s.count, s.sum_s, s.count
            );
        }
    }
}

/// The layer: wraps every service of the server in an [`RpcService`].
#[derive(Debug, Clone)]
pub struct RpcLayer {
    table: Arc<MethodTable>,
    metrics: Arc<RpcMetrics>,
    next_id: Arc<AtomicU64>,
}

impl RpcLayer {
    pub fn new(table: MethodTable, metrics: Arc<RpcMetrics>) -> RpcLayer {
        RpcLayer {
            table: Arc::new(table),
            metrics,
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            layer: self.clone(),
        }
    }
}

/// One service wrapped by [`RpcLayer`].
#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    layer: RpcLayer,
}

type ReqBody = tonic::body::Body;

impl<S, B> tower::Service<http::Request<ReqBody>> for RpcService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send,
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
{
    type Response = http::Response<MeteredBody<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        // The clone that was made ready serves this call; the fresh clone waits for the next.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let start = Instant::now();
        let info = self.layer.table.get(req.uri().path()).cloned();
        let key: MethodKey = match &info {
            Some(i) => (i.service.clone(), i.method.clone()),
            None => ("unknown".into(), "unknown".into()),
        };
        let id = self.layer.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("rpc", method = &*key.1, vm = tracing::field::Empty, id);
        let metrics = self.layer.metrics.clone();
        metrics.started(&key);
        Box::pin(
            async move {
                let req = match info.and_then(|i| i.vm_field) {
                    Some(field) => peek_vm(req, field).await,
                    None => req,
                };
                tracing::debug!(path = req.uri().path(), "request");
                let resp = inner.call(req).await?;
                let mut done = Handled {
                    metrics,
                    key,
                    start,
                    span: tracing::Span::current(),
                    recorded: false,
                };
                if let Some(code) = header_code(resp.headers()) {
                    done.record(code);
                }
                Ok(resp.map(|body| MeteredBody { body, done }))
            }
            .instrument(span),
        )
    }
}

/// Reads the first body frame, records the VM id it names in the current span, and hands
/// the body on unchanged.
async fn peek_vm(req: http::Request<ReqBody>, field: u32) -> http::Request<ReqBody> {
    let (parts, mut body) = req.into_parts();
    let first = body.frame().await;
    if let Some(Ok(frame)) = &first {
        if let Some(vm) = frame.data_ref().and_then(|d| vm_id_in_grpc_frame(d, field)) {
            tracing::Span::current().record("vm", vm.as_str());
        }
    }
    let body = ReqBody::new(Prepended { first, rest: body });
    http::Request::from_parts(parts, body)
}

/// Finds string field `field` at the top level of the protobuf message in a gRPC frame
/// (flag byte, 4-byte length, message). Only what the buffer holds is read; anything odd
/// (compressed, truncated, a malformed key) gives `None`.
pub fn vm_id_in_grpc_frame(frame: &[u8], field: u32) -> Option<String> {
    let mut b = frame;
    if b.len() < 5 || b[0] != 0 {
        return None;
    }
    b.advance(5);
    while b.has_remaining() {
        let key = prost::encoding::decode_varint(&mut b).ok()?;
        let (number, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut b).ok()?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if b.remaining() < n {
                    return None;
                }
                b.advance(n);
            }
            2 => {
                let len = usize::try_from(prost::encoding::decode_varint(&mut b).ok()?).ok()?;
                if b.remaining() < len {
                    return None;
                }
                if number == field {
                    let v = &b[..len.min(MAX_SPAN_VM_BYTES)];
                    return Some(String::from_utf8_lossy(v).into_owned());
                }
                b.advance(len);
            }
            _ => return None,
        }
    }
    None
}

/// The status code a response's headers already carry (an error answered at once).
fn header_code(h: &http::HeaderMap) -> Option<Code> {
    let v = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(Code::from(v))
}

/// Records a call's status exactly once: when it is known, or as `Cancelled` when the
/// response is dropped first.
#[derive(Debug)]
struct Handled {
    metrics: Arc<RpcMetrics>,
    key: MethodKey,
    start: Instant,
    span: tracing::Span,
    recorded: bool,
}

impl Handled {
    fn record(&mut self, code: Code) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let elapsed = self.start.elapsed();
        self.metrics.handled(&self.key, code, elapsed);
        self.span.in_scope(
            || tracing::debug!(code = ?code, elapsed_ms = elapsed.as_millis() as u64, "handled"),
        );
    }
}

impl Drop for Handled {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

/// The response body, watched for the trailers that carry the final status.
#[derive(Debug)]
pub struct MeteredBody<B> {
    body: B,
    done: Handled,
}

impl<B> HttpBody for MeteredBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(header_code) {
                    this.done.record(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.done.record(Code::Internal),
            Poll::Ready(None) => this.done.record(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A request body with its first frame already read.
#[derive(Debug)]
struct Prepended {
    first: Option<Result<Frame<Bytes>, tonic::Status>>,
    rest: ReqBody,
}

impl HttpBody for Prepended {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(f));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(msg: &[u8]) -> Vec<u8> {
        let mut f = vec![0];
        f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        f.extend_from_slice(msg);
        f
    }

    #[test]
    fn vm_id_is_found_after_other_fields_and_oddities_give_none() {
        use prost::Message as _;
        let msg = crate::pb::GuestLogsRequest {
            vm_id: "web1".into(),
            ..Default::default()
        };
        let bytes = frame(&msg.encode_to_vec());
        assert_eq!(vm_id_in_grpc_frame(&bytes, 1).as_deref(), Some("web1"));
        // A varint and a fixed64 before the string.
        let mut m = vec![0x10, 0x96, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8];
        m.extend_from_slice(&[0x1a, 2, b'd', b'b']);
        assert_eq!(vm_id_in_grpc_frame(&frame(&m), 3).as_deref(), Some("db"));
        assert_eq!(vm_id_in_grpc_frame(&frame(&m), 4), None);
        // Truncated, compressed, garbage wire type, empty.
        assert_eq!(vm_id_in_grpc_frame(&bytes[..bytes.len() - 1], 1), None);
        let mut compressed = bytes.clone();
        compressed[0] = 1;
        assert_eq!(vm_id_in_grpc_frame(&compressed, 1), None);
        assert_eq!(vm_id_in_grpc_frame(&frame(&[0x0f, 0xff]), 1), None);
        assert_eq!(vm_id_in_grpc_frame(&[], 1), None);
        // A huge id is cut.
        let long = frame(
            &crate::pb::AgentRequest {
                vm_id: "x".repeat(10_000),
                timeout_ms: 0,
            }
            .encode_to_vec(),
        );
        assert_eq!(
            vm_id_in_grpc_frame(&long, 1).map(|s| s.len()),
            Some(MAX_SPAN_VM_BYTES)
        );
    }

    #[test]
    fn method_table_knows_vm_fields_and_skips_client_streams() {
        let t = MethodTable::from_descriptors(crate::pb::FILE_DESCRIPTOR_SET).unwrap_or_default();
        let get = |m: &str| t.get(&format!("/quantix.node.v1.NodeDaemonService/{m}"));
        assert_eq!(get("StartVM").and_then(|i| i.vm_field), Some(1));
        assert_eq!(get("StreamTelemetry").and_then(|i| i.vm_field), Some(1));
        assert!(get("WriteGuestFile").is_some_and(|i| i.vm_field.is_none()));
        assert!(get("GetNodeInfo").is_some_and(|i| i.vm_field.is_none()));
        assert!(t.get("/x.Y/Z").is_none());
    }

    #[test]
    fn histogram_and_codes_render_cumulatively() {
        let m = RpcMetrics::default();
        let key: MethodKey = ("quantix.node.v1.NodeDaemonService".into(), "StartVM".into());
        m.started(&key);
        m.started(&key);
        m.handled(&key, Code::Ok, Duration::from_millis(3));
        m.handled(&key, Code::NotFound, Duration::from_secs(2));
        let mut out = String::new();
        m.render(&mut out);
        let l = "grpc_service=\"quantix.node.v1.NodeDaemonService\",grpc_method=\"StartVM\"";
        for line in [
            format!("grpc_server_started_total{{{l}}} 2"),
            format!("grpc_server_handled_total{{{l},grpc_code=\"Ok\"}} 1"),
            format!("grpc_server_handled_total{{{l},grpc_code=\"NotFound\"}} 1"),
            format!("grpc_server_handling_seconds_bucket{{{l},le=\"0.001\"}} 0"),
            format!("grpc_server_handling_seconds_bucket{{{l},le=\"0.005\"}} 1"),
            format!("grpc_server_handling_seconds_bucket{{{l},le=\"2.5\"}} 2"),
            format!("grpc_server_handling_seconds_bucket{{{l},le=\"+Inf\"}} 2"),
            format!("grpc_server_handling_seconds_count{{{l}}} 2"),
        ] {
            assert!(out.lines().any(|x| x == line), "missing {line}\n{out}");
        }
    }
}

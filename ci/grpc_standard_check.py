"""Drives qx-node's standard gRPC services with the reference gRPC client (grpcio):
server reflection (v1alpha, as grpcurl and most tools speak it) and health checking.

Usage: grpc_standard_check.py ADDR EXPECTED_STATUS
  EXPECTED_STATUS: SERVING or NOT_SERVING, for the overall service "" and NodeDaemonService.
Exits non-zero with a message on the first mismatch.
"""

import sys

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

NODE = "quantix.node.v1.NodeDaemonService"


def fail(msg):
    print(f"grpc-standard: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def reflect(channel, **req):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**req)]), timeout=30)
    )
    if len(replies) != 1:
        fail(f"reflection: {len(replies)} replies to one request")
    return replies[0]


def main():
    addr, expected = sys.argv[1], sys.argv[2]
    channel = grpc.insecure_channel(addr)
    # qx-node logs "gRPC on" just before its listener binds: wait for the connection.
    grpc.channel_ready_future(channel).result(timeout=30)

    # Reflection: the services, then the file that defines ours, and its methods.
    services = {s.name for s in reflect(channel, list_services="").list_services_response.service}
    for want in (NODE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
        if want not in services:
            fail(f"reflection lists {sorted(services)}, not {want}")
    reply = reflect(channel, file_containing_symbol=NODE)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in reply.file_descriptor_response.file_descriptor_proto
    ]
    methods = {
        m.name
        for f in files
        for s in f.service
        if f"{f.package}.{s.name}" == NODE
        for m in s.method
    }
    for want in ("GetNodeInfo", "StartVM", "StreamExecInGuest", "WriteGuestFile"):
        if want not in methods:
            fail(f"reflection: {NODE} has no method {want} ({len(methods)} methods)")
    # An unknown symbol: NOT_FOUND, as an error_response or as the stream's status.
    try:
        code = reflect(channel, file_containing_symbol="no.such.Service").error_response.error_code
    except grpc.RpcError as e:
        code = e.code().value[0]
    if code != grpc.StatusCode.NOT_FOUND.value[0]:
        fail(f"reflection: unknown symbol answered code {code}, expected NOT_FOUND")
    print(f"grpc-standard: reflection: {len(services)} services, {NODE} with {len(methods)} methods")

    # Health: Check for the server and for our service, Watch's first answer, unknown names.
    health = health_pb2_grpc.HealthStub(channel)
    want = health_pb2.HealthCheckResponse.ServingStatus.Value(expected)
    for name in ("", NODE):
        got = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30).status
        if got != want:
            fail(f"health {name!r}: {health_pb2.HealthCheckResponse.ServingStatus.Name(got)}, expected {expected}")
    watch = health.Watch(health_pb2.HealthCheckRequest(service=NODE), timeout=30)
    first = next(watch).status
    watch.cancel()
    if first != want:
        fail(f"health Watch: first status {first}, expected {expected}")
    try:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=30)
        fail("health: an unknown service was answered")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            fail(f"health: unknown service gave {e.code()}, expected NOT_FOUND")
    print(f"grpc-standard: health: {expected} for '' and {NODE}; unknown service NOT_FOUND")


if __name__ == "__main__":
    main()

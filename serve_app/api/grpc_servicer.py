"""The `grpc_servicer_functions` entry of the Serve config, imported by every Serve proxy.

It registers the explorer's gRPC service (serve_app/api/protos/chatglm2.proto) as the generated `add_ChatGLM2Servicer_to_server`
would, but with request decoders that never raise: bytes that are not a valid message (corrupt wire format, a string
field that is not UTF-8) reach the ingress as an `UndecodableRequest`, which answers INVALID_ARGUMENT with the reason,
where a raising decoder would make gRPC answer UNKNOWN.

Only grpc and the generated messages are imported here: the proxy process must not load torch or the app.
"""

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from serve_app.api.protos.chatglm2_pb2 import ChatRequest, ChatResponse, GenerateRequest, GenerateResponse

SERVICE = "chatglm2.ChatGLM2"


@dataclass
class UndecodableRequest:
    """Request bytes that do not decode as the method's message type; the ingress answers INVALID_ARGUMENT."""

    message_type: str
    problem: str


def _decoder(message_type) -> Callable[[bytes], object]:
    def decode(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            # "Error parsing message with type 'chatglm2.X': String field had bad UTF-8" -> the last part
            return UndecodableRequest(message_type.DESCRIPTOR.full_name, str(exc).rpartition(": ")[2])

    return decode


def add_servicer_to_server(servicer, server) -> None:
    """The `grpc_servicer_functions` entry of the Serve config: the ChatGLM2 service, as the generated
    `add_ChatGLM2Servicer_to_server` registers it, but with request decoders that never raise."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=_decoder(GenerateRequest),
            response_serializer=GenerateResponse.SerializeToString),
        "StreamGenerate": grpc.unary_stream_rpc_method_handler(
            servicer.StreamGenerate, request_deserializer=_decoder(GenerateRequest),
            response_serializer=GenerateResponse.SerializeToString),
        "StreamChat": grpc.unary_stream_rpc_method_handler(
            servicer.StreamChat, request_deserializer=_decoder(ChatRequest),
            response_serializer=ChatResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)

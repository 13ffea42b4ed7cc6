"""gRPC's generic server types, and the one way this server's interceptors wrap a method.

grpc-stubs declares ServerInterceptor and RpcMethodHandler generic over request and
response types, but at run time they are plain classes that cannot be subscripted:
the interceptors subclass and annotate with these aliases instead.

Every interceptor here (authentication, call limits, the refusal observer) replaces a
method's behaviour with a wrapped one; `WrappingInterceptor` holds the part they share:
the continuation, a per-method cache (so a wrapped handler is built once, and an
inner interceptor's own cache keeps hitting), and rebuilding the handler of the right
kind (unary/stream in/out) around the new behaviour.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    InterceptorBase = grpc.ServerInterceptor[Any, Any]
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
    GenericHandlerBase = grpc.GenericRpcHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    InterceptorBase = grpc.ServerInterceptor
    GenericHandler = grpc.GenericRpcHandler
    GenericHandlerBase = grpc.GenericRpcHandler

Behavior = Callable[[Any, Any], Any]


def rewrap(handler: Handler, wrap: Callable[[Behavior, bool, bool], Behavior]) -> Handler:
    """`handler` with its behaviour replaced by `wrap(behaviour, streaming_in,
    streaming_out)`, keeping its kind and (de)serializers."""
    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False, False), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, False, True), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, True, False), **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream, True, True), **kwargs)
    raise TypeError("method handler has no behavior")


class WrappingInterceptor(InterceptorBase):
    """Wraps each method once (`_wrap`), and hands out the same wrapped handler after."""

    def __init__(self) -> None:
        self._wrap_lock = threading.Lock()
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        with self._wrap_lock:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler, method: str) -> Handler:
        raise NotImplementedError


__all__ = ["Behavior", "GenericHandler", "GenericHandlerBase", "Handler", "InterceptorBase",
           "WrappingInterceptor", "rewrap"]

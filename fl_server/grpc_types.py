"""Names for gRPC's generic server types.

grpc-stubs declares ServerInterceptor and RpcMethodHandler generic over request and
response types, but at run time they are plain classes that cannot be subscripted:
the interceptors subclass and annotate with these aliases instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
    InterceptorBase = grpc.ServerInterceptor[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
    InterceptorBase = grpc.ServerInterceptor

__all__ = ["Handler", "InterceptorBase"]

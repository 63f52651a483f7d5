"""A small client for TorchServe 0.12's Open Inference Protocol gRPC service (`ts_open_inference_protocol=true`).

TorchServe serves the KServe OIP proto on its gRPC inference port, but under its own package name
(`org.pytorch.serve.grpc.openinference.GRPCInferenceService`), so tritonclient's gRPC client, which calls
`inference.GRPCInferenceService`, gets UNIMPLEMENTED. The messages are wire-identical, so this client sends
tritonclient's own protobuf classes to TorchServe's method names. Two more quirks of TorchServe's bridge:
- it reads only the typed `contents` fields (raw_input_contents is dropped) and has no FP16 field, so inputs
  go as typed contents and FP16 is refused here;
- ServerMetadata is unimplemented, and ModelMetadata lists no inputs or outputs.
Every call takes the inference token as `authorization: Bearer <key>` metadata.

Needs the dev extra (`tritonclient[grpc]`); imported only where used.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

SERVICE = "/org.pytorch.serve.grpc.openinference.GRPCInferenceService/"

# numpy dtype kind/size -> (OIP datatype, InferTensorContents field); BYTES handled apart.
_CONTENTS = {
    "bool": ("BOOL", "bool_contents"), "int8": ("INT8", "int_contents"), "int16": ("INT16", "int_contents"),
    "int32": ("INT32", "int_contents"), "int64": ("INT64", "int64_contents"), "uint8": ("UINT8", "uint_contents"),
    "uint16": ("UINT16", "uint_contents"), "uint32": ("UINT32", "uint_contents"),
    "uint64": ("UINT64", "uint64_contents"), "float32": ("FP32", "fp32_contents"), "float64": ("FP64", "fp64_contents"),
}
_FIELD_OF = {datatype: (field, np.dtype(name)) for name, (datatype, field) in _CONTENTS.items()}


class OipGrpcError(RuntimeError):
    """The server answered a ModelInfer with an error (carried as the `error` output, see handlers/oip.py)."""


class OipGrpcClient:
    """Calls TorchServe's OIP gRPC service at `target` ("host:port" of grpc_inference_port)."""

    def __init__(self, target: str, token: Optional[str] = None, timeout: float = 30.0):
        import grpc

        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: str, request: Any, response_type: Any) -> Any:
        stub = self.channel.unary_unary(SERVICE + method, request_serializer=request.SerializeToString,
                                        response_deserializer=response_type.FromString)
        return stub(request, metadata=self.metadata, timeout=self.timeout)

    def server_live(self) -> bool:
        from tritonclient.grpc import service_pb2 as pb

        return self._call("ServerLive", pb.ServerLiveRequest(), pb.ServerLiveResponse).live

    def server_ready(self) -> bool:
        from tritonclient.grpc import service_pb2 as pb

        return self._call("ServerReady", pb.ServerReadyRequest(), pb.ServerReadyResponse).ready

    def model_ready(self, name: str, version: str = "") -> bool:
        from tritonclient.grpc import service_pb2 as pb

        return self._call("ModelReady", pb.ModelReadyRequest(name=name, version=version), pb.ModelReadyResponse).ready

    def model_metadata(self, name: str, version: str = "") -> dict:
        from tritonclient.grpc import service_pb2 as pb

        reply = self._call("ModelMetadata", pb.ModelMetadataRequest(name=name, version=version),
                           pb.ModelMetadataResponse)
        return {"name": reply.name, "versions": list(reply.versions), "platform": reply.platform}

    def infer(self, model: str, inputs: dict[str, np.ndarray], version: str = "",
              request_id: str = "") -> dict[str, np.ndarray]:
        """ModelInfer: named arrays in, named arrays out. Raises OipGrpcError when the handler refused the input."""
        from tritonclient.grpc import service_pb2 as pb

        request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
        for name, array in inputs.items():
            request.inputs.append(_tensor(pb, name, np.asarray(array)))
        reply = self._call("ModelInfer", request, pb.ModelInferResponse)
        outputs = {t.name: _array(t) for t in reply.outputs}
        if "error" in outputs and len(outputs) == 1:
            raise OipGrpcError(outputs["error"].reshape(-1)[0].decode("utf-8", "replace"))
        return outputs


def _tensor(pb: Any, name: str, array: np.ndarray) -> Any:
    tensor = pb.ModelInferRequest.InferInputTensor(name=name, shape=list(array.shape))
    if array.dtype.kind in "OSU":
        tensor.datatype = "BYTES"
        tensor.contents.bytes_contents.extend(v.encode("utf-8") if isinstance(v, str) else bytes(v)
                                              for v in array.reshape(-1))
        return tensor
    if array.dtype.name not in _CONTENTS:
        raise ValueError(f"TorchServe's OIP gRPC bridge cannot carry {array.dtype} (no FP16 field): "
                         "send FP32 or use the HTTP endpoint")
    tensor.datatype, field = _CONTENTS[array.dtype.name]
    getattr(tensor.contents, field).extend(array.reshape(-1).tolist())
    return tensor


def _array(tensor: Any) -> np.ndarray:
    shape = list(tensor.shape)
    if tensor.datatype == "BYTES":
        # TorchServe writes each BYTES value as its JSON text (a quoted string).
        values = [v[1:-1] if v[:1] == b'"' and v[-1:] == b'"' else v for v in tensor.contents.bytes_contents]
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    if tensor.datatype not in _FIELD_OF:
        raise OipGrpcError(f"output '{tensor.name}' is {tensor.datatype}, which TorchServe's bridge cannot carry")
    field, dtype = _FIELD_OF[tensor.datatype]
    return np.asarray(getattr(tensor.contents, field), dtype=dtype).reshape(shape)

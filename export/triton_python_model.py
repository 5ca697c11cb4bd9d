"""Triton python-backend model: runs the version's ONNX file with ONNX Runtime on the CPU.

``fashion export`` copies this file to ``<repository>/<name>/<version>/model.py``. It serves the same
``model.onnx`` that the production config (``platform: "onnxruntime_onnx"``) serves, for the
pip-installed Triton that only has the python backend; ``--model-config-name cpu`` selects it.

Triton's dynamic batcher hands ``execute`` several requests at once; they are concatenated into one
ONNX Runtime call and the outputs are split back per request. Parameters (``configs/*.pbtxt``):
``model_filename`` (default ``model.onnx``), ``intra_op_threads`` (0 = ONNX Runtime's default),
``inter_op_threads``, ``allow_spinning`` ("0" or "1"; empty = ONNX Runtime's default). Needs only NumPy
and ONNX Runtime in the stub's Python.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        filename = params.get("model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads") or 0)
        options.inter_op_num_threads = int(params.get("inter_op_threads") or 0)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # "0" stops idle intra-op threads from busy-waiting for work: on a few shared cores their spinning
        # takes the CPU that Triton, the gateway and decoding need.
        spinning = params.get("allow_spinning", "")
        if spinning in ("0", "1"):
            options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        missing = set(self.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise pb_utils.TritonModelException(f"{filename} has no outputs {sorted(missing)}")

    def execute(self, requests):
        arrays, sizes = [], []
        for request in requests:
            array = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
            arrays.append(array)
            sizes.append(len(array))
        try:
            batch = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            results = self.session.run(self.outputs, {self.input_name: batch})
        except Exception as e:  # one bad batch fails its requests, never the model
            error = pb_utils.TritonError(f"ONNX Runtime failed: {e}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size], dtype=np.float32))
                for name, out in zip(self.outputs, results, strict=True)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.session = None

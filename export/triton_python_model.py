"""Triton python-backend model: runs the version's ONNX file on the CPU with ONNX Runtime or OpenVINO.

``fashion export`` copies this file to ``<repository>/<name>/<version>/model.py``. It serves the files the
production configs serve, for the pip-installed Triton that only has the python backend;
``--model-config-name cpu`` selects the candidate the export measured fastest among those that passed the
accuracy gate (``export.runtimes``).

Triton's dynamic batcher hands ``execute`` several requests at once; they are concatenated into one call
and the outputs are split back per request. Parameters (``configs/*.pbtxt``, written by
``export.runtimes.session_settings``): ``runtime`` (``onnxruntime`` or ``openvino``), ``model_filename``
(default ``model.onnx``), ``inference_precision`` (OpenVINO's hint: ``f32`` or ``bf16``),
``intra_op_threads`` (0 = the runtime's default), ``inter_op_threads``, ``allow_spinning`` (ONNX Runtime;
"0" or "1"). Needs NumPy and the runtime in the stub's Python.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def _onnxruntime(path, params):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads") or 0)
    options.inter_op_num_threads = int(params.get("inter_op_threads") or 0)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # "0" stops idle intra-op threads from busy-waiting for work: on a few shared cores their spinning
    # takes the CPU that Triton, the gateway and decoding need.
    spinning = params.get("allow_spinning", "")
    if spinning in ("0", "1"):
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]

    def run(input_name, batch, wanted):
        return session.run(wanted, {input_name: batch})

    return run, names


def _openvino(path, params):
    import openvino as ov

    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if params.get("intra_op_threads"):
        config["INFERENCE_NUM_THREADS"] = params["intra_op_threads"]
    if params.get("inference_precision"):
        config["INFERENCE_PRECISION_HINT"] = params["inference_precision"]
    compiled = ov.Core().compile_model(path, "CPU", config)
    request = compiled.create_infer_request()
    ports = {o.get_any_name(): o for o in compiled.outputs}

    def run(input_name, batch, wanted):
        result = request.infer({input_name: batch})
        return [result[ports[name]] for name in wanted]

    return run, list(ports)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        filename = params.get("model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        runtime = params.get("runtime") or "onnxruntime"
        builders = {"onnxruntime": _onnxruntime, "openvino": _openvino}
        if runtime not in builders:
            raise pb_utils.TritonModelException(f"unknown runtime {runtime!r}; use onnxruntime or openvino")
        try:
            self.run, names = builders[runtime](path, params)
        except ImportError as e:
            raise pb_utils.TritonModelException(f"{runtime} is not installed in Triton's Python: {e}") from e
        self.runtime = runtime
        self.input_name = config["input"][0]["name"]
        self.outputs = [o["name"] for o in config["output"]]
        missing = set(self.outputs) - set(names)
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
            results = self.run(self.input_name, batch, self.outputs)
        except Exception as e:  # one bad batch fails its requests, never the model
            error = pb_utils.TritonError(f"{self.runtime} failed: {e}")
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
        self.run = None

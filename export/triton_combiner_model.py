"""Triton python-backend model of an ensemble's combiner (``export.ensemble``), for the pip-installed Triton.

``fashion export --ensemble`` copies this file to ``<repository>/<name>_combine/<version>/model.py`` next to
``model.onnx``: the combiner graph, ``w·pA + (1−w)·pB`` per attribute with the weights fitted on the
validation photos. It runs that one graph with ONNX Runtime, so the Triton ensemble and the single composed
graph (which holds the same combiner nodes) compute the same thing. The NGC image runs ``model.onnx`` with
its ``onnxruntime_onnx`` backend instead (``config.pbtxt``).

The requests the dynamic batcher hands ``execute`` are concatenated, run once and split back.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = (
            1  # a few multiply-adds per row: threads would cost more than they save
        )
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = os.path.join(folder, "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        missing = set(self.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise pb_utils.TritonModelException(f"model.onnx has no outputs {sorted(missing)}")

    def execute(self, requests):
        arrays = {name: [] for name in self.inputs}
        sizes = []
        for request in requests:
            for name in self.inputs:
                arrays[name].append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(len(arrays[self.inputs[0]][-1]))
        try:
            feed = {name: np.concatenate(chunks) for name, chunks in arrays.items()}
            results = self.session.run(self.outputs, feed)
        except Exception as e:  # one bad batch fails its requests, never the model
            error = pb_utils.TritonError(f"combiner failed: {e}")
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

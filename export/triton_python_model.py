"""Triton python-backend model: runs the version's ONNX file on the CPU with ONNX Runtime or OpenVINO.

``fashion export`` copies this file to ``<repository>/<name>/<version>/model.py`` and ``export/sessions.py``
next to it. It serves the files the production configs serve, for the pip-installed Triton that only has the
python backend; ``--model-config-name cpu`` selects the candidate the export measured fastest among those
that passed the accuracy gate (``export.runtimes``).

The session is built exactly as the export built the one it gated and timed: the config's parameters
(written from ``export.sessions.SessionSpec.parameters``) are read back into a ``SessionSpec`` and handed
to ``export.sessions.open_session``. Triton's python stub cannot import the project package, so that one
module is loaded from this file's own folder.

An ensemble's combiner (``export.ensemble``) is served by this same file: ``fashion export --ensemble``
copies it (``export.ensemble.COMBINER_MODEL``) to
``<repository>/<name>_combine/<version>/model.py`` next to ``model.onnx``, the combiner graph
(``w·pA + (1−w)·pB`` per attribute, the weights fitted on the validation photos), and no ``sessions.py``:
a version folder without one runs its ``model.onnx`` with ONNX Runtime, feeding the config's inputs by name,
so the Triton ensemble and the single composed graph (which holds the same combiner nodes) compute the same
thing. The NGC image runs that ``model.onnx`` with its ``onnxruntime_onnx`` backend instead.

Triton's dynamic batcher hands ``execute`` several requests at once; they are concatenated into one call
and the outputs are split back per request. A model that reads titles has a second input (the title's
ids, all zeros for a request without a title): every request carries it, so requests with and without a
title share a batch, and the session (``Session.__call__``) feeds both. Needs NumPy and the runtime in the
stub's Python.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

SESSIONS_MODULE = "sessions.py"


def load_sessions(folder):
    """``sessions.py`` of ``folder`` (the version folder; in the project, ``export/``) as a module."""
    name = "fashion_tagger_sessions"
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, SESSIONS_MODULE))
    if spec is None or spec.loader is None:
        raise ImportError(f"no {SESSIONS_MODULE} in {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        if os.path.exists(os.path.join(folder, SESSIONS_MODULE)):
            self._open_session(config, folder)
        else:  # an ensemble's combiner: export.ensemble.write_combiner copies no sessions.py
            self._open_combiner(folder)

    def _open_session(self, config, folder):
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        sessions = load_sessions(folder)
        try:
            spec = sessions.SessionSpec.from_parameters(params)
        except sessions.SessionSpecError as e:
            raise pb_utils.TritonModelException(f"configs: {e}") from e
        try:
            self.session = sessions.open_session(spec, os.path.join(folder, spec.file))
        except ImportError as e:
            why = f"{spec.runtime} is not installed in Triton's Python: {e}"
            raise pb_utils.TritonModelException(why) from e
        self.runtime = spec.runtime
        if len(self.inputs) != (2 if self.session.reads_titles else 1):  # the image, then a title's ids
            reads = "an image and a title" if self.session.reads_titles else "an image"
            raise pb_utils.TritonModelException(
                f"the config's inputs are {self.inputs}; {spec.file} reads {reads}"
            )
        missing = set(self.outputs) - set(self.session.output_names)
        if missing:
            raise pb_utils.TritonModelException(f"{spec.file} has no outputs {sorted(missing)}")
        order = [self.session.output_names.index(name) for name in self.outputs]

        def run(batch):
            produced = self.session(*batch)
            return [produced[i] for i in order]

        self.run = run

    def _open_combiner(self, folder):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a few multiply-adds a row: threads would cost more than they save
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        path = os.path.join(folder, "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.runtime = "combiner"
        missing = set(self.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise pb_utils.TritonModelException(f"model.onnx has no outputs {sorted(missing)}")

        def run(batch):
            return self.session.run(self.outputs, dict(zip(self.inputs, batch, strict=True)))

        self.run = run

    def execute(self, requests):
        arrays = [[] for _ in self.inputs]
        sizes = []
        for request in requests:
            for name, chunks in zip(self.inputs, arrays, strict=True):
                chunks.append(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
            sizes.append(len(arrays[0][-1]))
        try:
            batch = [chunks[0] if len(chunks) == 1 else np.concatenate(chunks) for chunks in arrays]
            results = self.run(batch)
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
        self.session = None

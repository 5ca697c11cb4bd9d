"""``fashion bench``'s baseline, as most tutorials deploy it: one Flask process, PyTorch eager per request.

Each request decodes the upload with Pillow (full-size decode, plain resize, no DCT downscale), builds a
tensor and runs the model eagerly under ``torch.no_grad()``, one image at a time, in Flask's threaded
development server. Same weights and heads as the exported model (``--model-dir`` holds ``weights.pt``
and ``model.json``, written by ``loadtest.bench``).

    python -m loadtest.naive_server --model-dir DIR --port 8090
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path


def create_app(model_dir: str | Path):
    import numpy as np
    import torch
    from flask import Flask, jsonify, request
    from PIL import Image

    from fashion.contract import Preprocessing
    from fashion.schema import LabelSchema
    from training.model import build_model

    spec = json.loads((Path(model_dir) / "model.json").read_text())
    schema = LabelSchema.from_dict(spec["schema"])
    pre = Preprocessing.from_dict(spec["preprocessing"])
    net = build_model(spec["backbone"], schema, pre)
    net.load_state_dict(torch.load(Path(model_dir) / "weights.pt", map_location="cpu"))
    net.eval()
    size = pre.image_size
    app = Flask(__name__)

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.post("/predict")
    def predict():
        image = Image.open(io.BytesIO(request.get_data())).convert("RGB").resize((size, size))
        batch = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())[None]
        with torch.no_grad():
            probs = net.probabilities(batch)
        return jsonify(
            predictions={
                a.name: {"label": a.classes[int(p[0].argmax())], "score": float(p[0].max())}
                for a, p in zip(schema.attributes, probs.values(), strict=True)
            }
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    create_app(args.model_dir).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()

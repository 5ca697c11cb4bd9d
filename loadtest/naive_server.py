"""``fashion bench``'s baseline, as most tutorials deploy it: one Flask process, PyTorch eager per request.

Each request decodes the upload with Pillow (full-size decode, plain resize, no DCT downscale), builds a
tensor and runs the model eagerly under ``torch.no_grad()``, one image at a time, in Flask's threaded
development server. The same checkpoint the exported model comes from (``--checkpoint``).

    python -m loadtest.naive_server --checkpoint models/default/model.pt --port 8090
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request
from PIL import Image

from training.checkpoint import load_checkpoint


def create_app(checkpoint: str | Path):
    import torch


    ckpt = load_checkpoint(checkpoint)
    net, schema = ckpt.model.eval(), ckpt.schema
    size = ckpt.preprocessing.image_size
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
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    create_app(args.checkpoint).run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()

# Triton with the model repository baked in, for modelRepository.source=image in the Helm chart
# (an init container copies /models out of this image) or to run on its own:
#   (first `fashion export` the model into model_repository/: fashion/config.pbtxt, fashion/<version>/...)
#   docker build -f docker/triton.Dockerfile -t <registry>/fashion-tagger-triton:0.1.0 .
# Not buildable on the development machines (no Docker engine, no access to nvcr.io there).
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:25.10-py3
FROM ${TRITON_IMAGE}

# Read-only for the server: files stay root-owned and world-readable.
COPY model_repository/ /models/

# triton-server (uid 1000) is the NGC image's non-root user.
USER 1000:1000

EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models", "--model-control-mode=explicit", "--load-model=fashion"]

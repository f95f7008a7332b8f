# kinsight's image: the binary, the bundled models and ONNX Runtime on a distroless base.
# The controller, the API and the worker Jobs all run it (see charts/kinsight).
#
# The build context is the small folder scripts/build-image.sh stages (never the checkout):
#   kinsight        the binary (debug info stripped)
#   models/         catalog.yaml, *.onnx, *.labels, *.LICENSE, README.md
#   onnxruntime/    libonnxruntime.so (+ its provider libraries, e.g. CUDA's)
#
#   scripts/build-image.sh                              # buildah, local base, no registry
#   scripts/build-image.sh --stage-only ctx && docker build -f Dockerfile ctx
#   ... --build-arg BASE=nvcr.io/nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04   # CUDA variant
ARG BASE=gcr.io/distroless/cc-debian12:nonroot
FROM ${BASE}
ARG BINARY=kinsight
COPY ${BINARY} /usr/local/bin/kinsight
COPY models/ /opt/kinsight/models/
COPY onnxruntime/ /opt/kinsight/lib/
# Where kinsight finds ONNX Runtime and the bundled catalog (the chart's paths: modelsDir,
# ortDylibPath); the chart's own catalog ConfigMap overrides KINSIGHT_CATALOG.
ENV ORT_DYLIB_PATH=/opt/kinsight/lib/libonnxruntime.so \
    KINSIGHT_CATALOG=/opt/kinsight/models/catalog.yaml \
    KINSIGHT_MODELS_DIR=/opt/kinsight/models
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kinsight"]

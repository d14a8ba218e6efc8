# label-studio-sam3: the ML backend (`serve`, the default) or an rq worker (`worker`) from one image.
#   docker build -t label-studio-sam3 .
#   docker run --gpus all -p 9090:9090 -e HF_TOKEN=... label-studio-sam3
# The base brings CUDA, cuDNN, torch and torchvision; pick another tag with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    PORT=9090

# Dependencies first (a layer that survives code changes), pinned to what the tests passed with.
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY backend/__init__.py backend/__init__.py
RUN pip install -c constraints.txt . && pip uninstall -y label-studio-sam3
COPY backend backend
RUN pip install --no-deps -c constraints.txt .

# Not root; the Hugging Face cache is a volume, so the weights download once.
RUN useradd --create-home --uid 1000 app && mkdir -p /data/huggingface && chown -R app /data
USER app
VOLUME ["/data/huggingface"]
EXPOSE 9090

# Healthy once the model is loaded (`serve`), or once a worker reports its model loaded and Redis reachable
# (`worker`: `health` reads its report); the first start downloads the weights (~3.4 GB in fp32).
HEALTHCHECK --interval=15s --timeout=10s --start-period=30m --retries=3 CMD ["label-studio-sam3", "health"]

ENTRYPOINT ["label-studio-sam3"]
CMD ["serve"]

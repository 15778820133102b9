# Image for every supcon-stream service in docker-compose.yml (learner, sidecar, replay jobs).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# CPU build of torch from the PyTorch index by default; docker-compose.gpu.yml passes a CUDA
# index and the gpu extra (faiss-gpu).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=cpu
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY consumers ./consumers
COPY memory_bank ./memory_bank
COPY configs ./configs
# A C compiler builds the event decoder's native scanner (consumers/_eventscan.c).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir ".[${EXTRAS}]" \
    && apt-get purge -y gcc libc6-dev && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 supcon && mkdir -p /var/lib/supcon-stream \
    && chown supcon /var/lib/supcon-stream
USER supcon
ENTRYPOINT ["supcon-stream"]
CMD ["--help"]

# Image for every supcon-stream service in docker-compose.yml (learner, sidecar, replay jobs).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# CPU build of torch from the PyTorch index; a GPU image would use a CUDA base and the gpu extra.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY consumers ./consumers
COPY memory_bank ./memory_bank
COPY configs ./configs
RUN pip install --no-cache-dir ".[cpu]"
RUN useradd --create-home --uid 10001 supcon && mkdir -p /var/lib/supcon-stream \
    && chown supcon /var/lib/supcon-stream
USER supcon
ENTRYPOINT ["supcon-stream"]
CMD ["--help"]

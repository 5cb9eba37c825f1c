# One image for the api and the worker processes (`qadistill api`, `qadistill worker`).
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN useradd --create-home --uid 1000 qadistill
WORKDIR /srv/qadistill

# Dependencies first, so a code change does not reinstall torch.
COPY pyproject.toml README.md ./
RUN mkdir -p app workers && touch app/__init__.py workers/__init__.py \
    && pip install '.[s3,models]' \
    && pip uninstall -y qadistill

COPY app ./app
COPY workers ./workers
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-deps . && mkdir -p /var/lib/qadistill && chown qadistill /var/lib/qadistill

USER qadistill
ENV QADISTILL_HOME=/var/lib/qadistill
EXPOSE 8000
CMD ["qadistill", "api", "--host", "0.0.0.0", "--port", "8000"]

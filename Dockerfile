# Image of the backend server and the GPU workers (docker-compose.yml runs `python -m backend serve|worker`).
# torch's PyPI wheels bring their own CUDA runtime, so a slim Python base works for GPU workers too
# (the host needs the NVIDIA driver and the NVIDIA container toolkit).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

WORKDIR /app

# Same order as scripts/setup_venv.sh: pinned requirements, then sam2 built against the installed torch
# (without build isolation it would download another torch).
COPY requirements.txt ./
RUN pip install -U pip setuptools wheel \
    && pip install -r requirements.txt \
    && SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0

COPY evf_sam ./evf_sam
COPY backend ./backend
COPY models ./models
COPY label_config.xml ./

RUN useradd --create-home --uid 1000 app \
    && mkdir -p /cache/huggingface /data/corrections /data/checkpoints \
    && chown -R app /cache /data
USER app

EXPOSE 9090
CMD ["python", "-m", "backend", "serve"]

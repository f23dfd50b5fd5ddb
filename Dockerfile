# cifar-pl in a container: `docker run IMAGE [overrides]` is `python train.py [overrides]`.
#
#   docker build -t cifar-pl .
#   docker run --rm -v "$PWD/data:/data" -v "$PWD/outputs:/outputs" cifar-pl trainer.max_epochs=25 data=fashion_mnist
#
# Datasets are read from (and downloaded into) /data, runs are written under /outputs (the image sets
# CIFAR_PL_DATA_DIR and CIFAR_PL_OUTPUT_DIR, which conf/paths and conf/hydra read). See docs/containers.md.
ARG BASE_IMAGE=python:3.11-slim

# The dependency list, read from pyproject.toml (kept in one place). The next stage copies only this list, so
# editing anything else in pyproject.toml (tool settings, the version) does not reinstall PyTorch either.
FROM ${BASE_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt

FROM ${BASE_IMAGE}

# PyPI's torch wheels bundle the CUDA libraries (several GB). For a CPU-only image, install torch and
# torchvision from PyTorch's own index instead:  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The dependencies, in a layer of their own: editing the code does not reinstall PyTorch.
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN python3 -m venv "${VIRTUAL_ENV}" \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch torchvision; \
    fi \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# The user the container runs as (not root); build with --build-arg UID=$(id -u) --build-arg GID=$(id -g) for
# the files it writes into bind-mounted folders to be yours.
ARG UID=1000
ARG GID=1000
RUN groupadd --gid "${GID}" app \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /usr/sbin/nologin app

WORKDIR /app

# The project itself (see .dockerignore for what is copied).
COPY . .
RUN pip install --no-cache-dir --no-deps --editable . \
    && mkdir -p /data /outputs \
    && chown app:app /data /outputs

ENV CIFAR_PL_DATA_DIR=/data \
    CIFAR_PL_OUTPUT_DIR=/outputs \
    CIFAR_PL_MULTIRUN_DIR=/outputs/multirun
VOLUME ["/data", "/outputs"]
USER app

ENTRYPOINT ["python", "train.py"]
CMD []

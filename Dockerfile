# syntax=docker/dockerfile:1
# Relay + operator image (`atlax relay`, `atlax operator`). Multi-stage: wheels are built in the
# first stage; the final stage has no compiler and runs as an unprivileged user.
#
# BASE_IMAGE: any Debian-based image with Python 3.11 and pip. hack/cluster builds this same file
# offline on a local Debian base made with mmdebstrap (--build-arg BASE_IMAGE=localhost/atlax-base:bookworm).
ARG BASE_IMAGE=python:3.11.10-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY atlax ./atlax
COPY operator ./operator
# Where pip finds packages: PyPI by default. Without PyPI (hack/cluster images), wheels built on
# the host are mounted read-only: --build-arg PIP_SOURCE="--no-index --find-links /wheelhouse".
ARG PIP_SOURCE=""
RUN pip wheel --no-cache-dir $PIP_SOURCE --wheel-dir /wheels --constraint constraints.txt ".[operator,fast]"

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 atlax && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin atlax
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "atlax[operator,fast]" && rm -rf /wheels
USER 10001:10001
EXPOSE 7443 9100
ENTRYPOINT ["atlax"]
CMD ["--help"]

# syntax=docker/dockerfile:1
# Relay + operator image (`atlax relay`, `atlax operator`). Multi-stage: wheels are built in the
# first stage; the final stage has no compiler and runs as an unprivileged user.
FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY atlax ./atlax
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt ".[operator,fast]"

FROM python:3.11.10-slim-bookworm
RUN groupadd --gid 10001 atlax && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin atlax
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels "atlax[operator,fast]" && rm -rf /wheels
USER 10001:10001
EXPOSE 7443 9100
ENTRYPOINT ["atlax"]
CMD ["--help"]

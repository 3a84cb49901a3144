# One image, two entry points: python -m agentrun_operator (also .webhooks) and
# python -m agentrun_sse. Built from a wheelhouse made on the host (`make wheelhouse`), so no
# step here needs the network: it builds the same online and on an air-gapped machine. The
# dependencies are uv.lock's versions, hash-checked; agentrun itself goes in without them.
# The base must carry the Python minor the wheelhouse was built for (3.11).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG WHEELHOUSE=dist/wheelhouse
COPY ${WHEELHOUSE} /tmp/wheels
RUN python3 -m venv /opt/agentrun \
 && /opt/agentrun/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels \
      --require-hashes -r /tmp/wheels/requirements.txt \
 && /opt/agentrun/bin/pip install --no-index --no-cache-dir --no-deps /tmp/wheels/agentrun-*.whl \
 && rm -rf /tmp/wheels \
 && /opt/agentrun/bin/python -m compileall -q /opt/agentrun/lib \
 && (getent group agentrun || groupadd --gid 10001 agentrun) \
 && (getent passwd agentrun || useradd --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin agentrun)

ENV PATH=/opt/agentrun/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
EXPOSE 8080 8081 9443
CMD ["python", "-m", "agentrun_operator"]

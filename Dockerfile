# The Flywheel worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
RUN pip install --no-cache-dir .
COPY sql ./sql
COPY schemas ./schemas
COPY config ./config
ENV FLYWHEEL_HOME=/app \
    FLYWHEEL_DATA_DIR=/data
VOLUME /data
EXPOSE 8088 8089
ENTRYPOINT ["flywheel"]
CMD ["worker"]

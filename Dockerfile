# One image for the api, the workers and the migration job; docker-compose.yml picks the command.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /app
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY service ./service
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX_URL" -c constraints.txt .
ENV HOST=0.0.0.0 PORT=8000 MODELPRESS_DATA_DIR=/data
EXPOSE 8000
CMD ["python", "-m", "service"]

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY shared ./shared
COPY services ./services
COPY migrations ./migrations
COPY seeds ./seeds
RUN pip install . && useradd --system --uid 10001 kpi
USER kpi
# Each service is `python -m services.<name>`; docker-compose.yml sets the command.
CMD ["python", "-m", "services.trigger_checker"]

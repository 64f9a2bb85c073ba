# The demo network's fake HasOffers (docker-compose's `fake_hasoffers`, profile "demo"):
# test code, so a stage of its own that the product image never contains. Standard
# library only.
FROM python:3.11-slim AS fake-hasoffers
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY testkit/__init__.py ./testkit/
COPY testkit/fake_hasoffers ./testkit/fake_hasoffers
USER nobody
ENTRYPOINT ["python", "-m", "testkit.fake_hasoffers"]

# The product image: the last stage, so a plain `docker build .` builds it. Only what
# the wheel holds (shared, services, migrations) and the example seed.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini requirements.lock ./
COPY shared ./shared
COPY services ./services
COPY migrations ./migrations
COPY seeds ./seeds
# The dependencies pinned and hash-checked (requirements.lock), then the project alone.
RUN pip install --require-hashes --no-deps -r requirements.lock && pip install --no-deps . && pip check \
    && useradd --system --uid 10001 kpi \
    && mkdir /var/lib/kpi-broker && chown kpi /var/lib/kpi-broker
# /var/lib/kpi-broker: where `kpi broker definitions` writes RabbitMQ's users (a volume).
USER kpi
# Each service is `python -m services.<name>`; docker-compose.yml sets the command.
CMD ["python", "-m", "services.trigger_checker"]

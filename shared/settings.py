"""All configuration, read from the environment (or a .env file) once, in main().

Every secret (a field typed SecretStr) can also be read from a file named by
`<NAME>_FILE` (the Docker secrets convention): `DATABASE_PASSWORD_FILE=/run/secrets/db`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError
from sqlalchemy.engine import make_url


def _is_secret(field: FieldInfo) -> bool:
    return field.annotation is SecretStr or SecretStr in getattr(field.annotation, "__args__", ())


class SecretFiles(PydanticBaseSettingsSource):
    """`<NAME>_FILE` in the environment: the secret NAME is the file's content (one
    trailing line break removed). Setting both NAME and NAME_FILE is an error."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        variable = f"{field_name.upper()}_FILE"
        path = os.environ.get(variable)
        if not path or not _is_secret(field):
            return None, field_name, False
        if os.environ.get(field_name.upper()) is not None:
            raise SettingsError(f"set {field_name.upper()} or {variable}, not both")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None
        return text.removesuffix("\n").removesuffix("\r"), field_name, False

    def __call__(self) -> dict[str, Any]:
        values = {}
        for name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, name)
            if value is not None:
                values[name] = value
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, SecretFiles(settings_cls), dotenv_settings, file_secret_settings

    # Connections. URLs may carry passwords, so they are secrets too; a password may
    # also come on its own (DATABASE_PASSWORD, AMQP_PASSWORD), which replaces the URL's.
    database_url: SecretStr = SecretStr("postgresql+psycopg2://postgres@127.0.0.1:5432/kpi")
    database_password: SecretStr | None = None
    # TLS to PostgreSQL: libpq's sslmode (`verify-full` checks the certificate and the
    # host name) and the CA certificates it trusts.
    database_sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    database_sslrootcert: str | None = None
    # One URL, or the nodes of a cluster comma-separated (tried in turn). `amqps://` is
    # TLS with the certificate and host name verified, against the system's CAs or
    # AMQP_CA_FILE's.
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F")
    amqp_password: SecretStr | None = None
    amqp_ca_file: str | None = None
    kpi_exchange: str = Field("kpi.events", min_length=1, max_length=200)
    # Queues (shared/rabbitmq/topology.py). Every process of a deployment must agree;
    # `kpi queues upgrade` moves existing queues to new settings.
    kpi_queue_type: Literal["quorum", "classic"] = "quorum"
    # Returns of a message to a quorum work queue (its consumer crashed or lost its
    # connection) before RabbitMQ dead-letters it.
    kpi_delivery_limit: int = Field(20, ge=1, le=1_000_000)

    # HasOffers
    # The network's own API host; `{network_id}` is replaced by HASOFFERS_NETWORK_ID. A URL
    # without it (a proxy, the legacy https://api.hasoffers.com/Apiv3/json) gets NetworkId
    # in the query string.
    hasoffers_base_url: str = "https://{network_id}.api.hasoffers.com/Apiv3/json"
    hasoffers_network_id: str | None = None
    hasoffers_network_token: SecretStr | None = None
    hasoffers_timeout_seconds: float = Field(30.0, gt=0)
    hasoffers_max_attempts: int = Field(5, ge=1)
    # The zone the network reports Stat.date / Stat.hour in (its own setting in HasOffers).
    hasoffers_timezone: str = "UTC"
    # The network's API limit, shared by every process through PostgreSQL when
    # hasoffers_rate_limit_shared (else counted per process).
    hasoffers_rate_limit_calls: int = Field(50, ge=1)
    hasoffers_rate_limit_seconds: float = Field(10.0, gt=0)
    hasoffers_rate_limit_shared: bool = True

    # Outgoing mail
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(25, gt=0, lt=65536)
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    # STARTTLS with the certificate and host name verified (against the system's CAs or
    # SMTP_CA_FILE's); a server that does not offer it gets no mail. Turn it off only for
    # a sink on the same host.
    smtp_starttls: bool = True
    smtp_ca_file: str | None = None
    smtp_timeout_seconds: float = Field(30.0, gt=0)
    mail_from: str = "kpi@localhost"

    actions_dry_run: bool = False
    # Rejects that may succeed in any 60 minutes, network-wide; beyond, they are held for an
    # operator (kpi held). 0: no reject runs at all.
    kpi_max_rejects_per_hour: int = Field(25, ge=0)
    # How often each action_runner sends closed digests, due reminders and cap alerts.
    kpi_actions_tick_seconds: float = Field(5.0, gt=0, le=60)

    # Consumer behaviour
    kpi_prefetch: int = Field(4, ge=1, le=1000)
    # Messages one process handles at once, each on a thread of its own; unset: the
    # service's default (the action_runner 4, whose runs mostly wait on SMTP, HasOffers and
    # commits; the others 1). Safe wherever replicas are: they share nothing else.
    kpi_workers: int | None = Field(None, ge=1, le=64)
    kpi_retry_limit: int = Field(5, ge=0)
    # The retry queue holds a message this long before it goes back to the work queue.
    kpi_retry_delay_ms: int = Field(5000, ge=0)
    kpi_startup_attempts: int = Field(10, ge=1)
    kpi_heartbeat_seconds: int = Field(30, ge=0)
    # A metric value measured later than now + this is invalid (a clock gone wrong, or a
    # year-9999 typo that would freeze its pair's state).
    kpi_max_clock_skew_seconds: int = Field(3600, ge=0, le=7 * 24 * 3600)
    # metric_values and trigger_checks: days kept (whole day partitions dropped by the
    # trigger_checker, shared/partitions.py); 0 = keep everything.
    kpi_retention_days: int = Field(90, ge=0, le=100 * 366)

    # Observability
    kpi_log_level: str = "INFO"
    kpi_log_json: bool = False
    kpi_metrics_port: int = Field(0, ge=0, lt=65536)  # 0 = no metrics/health endpoint
    # A directory: the consumer's threads run under cProfile and write their profiles
    # there at shutdown (shared/profiling.py; the benchmarks' --profile). Costs CPU.
    kpi_profile: str | None = None

    # Metric computation (DESIGN.md section 5)
    kpi_lookback_hours: int = Field(24, gt=0, le=24 * 93)
    kpi_click_cost: float = Field(0.0, ge=0, allow_inf_nan=False)
    kpi_min_clicks: int = Field(0, ge=0)
    kpi_min_conversions: int = Field(0, ge=0)
    kpi_report_page_size: int = Field(10000, gt=0, le=100000)
    # Schedule: seconds between loads of every metric, and of the reference data; 0 = off.
    kpi_schedule_metrics_seconds: int = Field(0, ge=0)
    kpi_schedule_reference_seconds: int = Field(0, ge=0)

    # The operators' console (`kpi web`): HTTP Basic credentials.
    kpi_web_user: str | None = None
    kpi_web_password: SecretStr | None = None

    @field_validator("hasoffers_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"not an IANA time zone name: {value!r} (e.g. UTC, America/New_York)") from None
        return value

    @model_validator(mode="after")
    def _connection_urls(self) -> Settings:
        """Fold the separate password and TLS settings into the URLs every caller uses."""
        if self.database_password is not None or self.database_sslmode or self.database_sslrootcert:
            url = make_url(self.database_url.get_secret_value())
            if self.database_password is not None:
                url = url.set(password=self.database_password.get_secret_value())
            query = dict(url.query)
            if self.database_sslmode:
                query["sslmode"] = self.database_sslmode
            if self.database_sslrootcert:
                query["sslrootcert"] = self.database_sslrootcert
            self.database_url = SecretStr(url.set(query=query).render_as_string(hide_password=False))
        if self.amqp_password is not None or self.amqp_ca_file:
            password = self.amqp_password.get_secret_value() if self.amqp_password is not None else None
            self.amqp_url = SecretStr(",".join(
                _amqp_node(node.strip(), password, self.amqp_ca_file)
                for node in self.amqp_url.get_secret_value().split(",") if node.strip()))
        return self


def _amqp_node(url: str, password: str | None, ca_file: str | None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if password is not None:
        user = parts.username or "guest"
        host = netloc.rpartition("@")[2]
        # Commas too: AMQP_URL's nodes are separated by them.
        netloc = f"{user}:{quote(password, safe='')}@{host}"
    query = parts.query
    if ca_file and parts.scheme == "amqps":
        # pika's own URL option: a TLS context that trusts these CAs and checks the host name.
        options = {"cafile": ca_file, "server_hostname": parts.hostname}
        query = urlencode([*parse_qsl(query), ("ssl_options", repr(options))], quote_via=quote, safe="")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class ConfigurationError(Exception):
    """The environment does not make valid settings: one line naming each bad variable."""


def load_settings() -> Settings:
    """Settings() for a process's main(): a bad variable is a ConfigurationError, never a
    traceback; the value is shown only for settings that are not secrets."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            secret = field in Settings.model_fields and "SecretStr" in str(Settings.model_fields[field].annotation)
            given = "" if secret or error["type"] == "missing" else f" (got {str(error.get('input'))[:40]!r})"
            problems.append(f"{field.upper()}: {error['msg']}{given}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
    except (ValueError, OSError) as exc:  # e.g. a .env file or a secret file that cannot be read
        raise ConfigurationError(f"invalid configuration: {str(exc).strip().splitlines()[0]}") from None

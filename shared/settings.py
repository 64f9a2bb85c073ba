"""All configuration, read from the environment (or a .env file) once, in main()."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Connections. URLs may carry passwords, so they are secrets too.
    database_url: SecretStr = SecretStr("postgresql+psycopg2://postgres@127.0.0.1:5432/kpi")
    # One URL, or the nodes of a cluster comma-separated (tried in turn).
    amqp_url: SecretStr = SecretStr("amqp://guest:guest@127.0.0.1:5672/%2F")
    kpi_exchange: str = Field("kpi.events", min_length=1, max_length=200)
    # Queues (shared/rabbitmq/topology.py). Every process of a deployment must agree;
    # `kpi queues upgrade` moves existing queues to new settings.
    kpi_queue_type: Literal["quorum", "classic"] = "quorum"
    # Returns of a message to a quorum work queue (its consumer crashed or lost its
    # connection) before RabbitMQ dead-letters it.
    kpi_delivery_limit: int = Field(20, ge=1, le=1_000_000)

    # HasOffers
    hasoffers_base_url: str = "https://api.hasoffers.com/Apiv3/json"
    hasoffers_network_id: str | None = None
    hasoffers_network_token: SecretStr | None = None
    hasoffers_timeout_seconds: float = Field(30.0, gt=0)
    hasoffers_max_attempts: int = Field(5, ge=1)

    # Outgoing mail
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(25, gt=0, lt=65536)
    smtp_user: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
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
    kpi_retry_limit: int = Field(5, ge=0)
    # The retry queue holds a message this long before it goes back to the work queue.
    kpi_retry_delay_ms: int = Field(5000, ge=0)
    kpi_startup_attempts: int = Field(10, ge=1)
    kpi_heartbeat_seconds: int = Field(30, ge=0)
    # A metric value measured later than now + this is invalid (a clock gone wrong, or a
    # year-9999 typo that would freeze its pair's state).
    kpi_max_clock_skew_seconds: int = Field(3600, ge=0, le=7 * 24 * 3600)

    # Observability
    kpi_log_level: str = "INFO"
    kpi_log_json: bool = False
    kpi_metrics_port: int = Field(0, ge=0, lt=65536)  # 0 = no metrics/health endpoint

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

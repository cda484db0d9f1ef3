"""Settings: one validated object, read once and passed down.

Sources, highest priority first:

1. environment variables ``PACS_AGENT_<SECTION>__<KEY>`` (for example
   ``PACS_AGENT_LISTENER__PORT=104``), top-level keys as ``PACS_AGENT_<KEY>``;
2. a TOML file given by ``--config FILE`` or ``PACS_AGENT_CONFIG``;
3. the defaults below, each documented in docs/configuration.md.

All state (spool, results, embedded database and broker) lives under ``data_dir``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from pacs_agent.domain.uids import DEFAULT_UID_ROOT, validate_uid_root

CONFIG_ENV = "PACS_AGENT_CONFIG"
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: no backslash


def _ae_title(value: str) -> str:
    if not _AE_TITLE_RE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters, no '\\')")
    return value.strip()


AETitle = Annotated[str, AfterValidator(_ae_title)]


def _require_unique(values: list[str], what: str) -> None:
    """Raise ValueError naming the values of ``values`` that occur more than once."""
    duplicated = sorted({v for v in values if values.count(v) > 1})
    if duplicated:
        raise ValueError(f"{what} must be unique: {duplicated}")


class Section(BaseModel):
    """A settings section: unknown keys are an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class AllowedCaller(Section):
    """A calling AE title the listener accepts, optionally only from some addresses."""

    ae_title: AETitle
    hosts: list[str] = Field(default_factory=list)
    """IP addresses or networks (``10.1.2.3``, ``10.1.0.0/16``) it may call from; empty: any."""

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for host in v:
            ipaddress.ip_network(host, strict=False)  # ValueError names the bad entry
        return v


class ListenerSettings(Section):
    """The DICOM listener (C-ECHO and C-STORE SCP) run by ``pacs-agent serve``."""

    ae_title: AETitle = "PACSAGENT"
    """Called AE title the listener answers to."""
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default; see docs/configuration.md before widening it."""
    port: int = Field(11112, ge=1, le=65535)
    """TCP port of the listener."""
    max_pdu: int = Field(131072, ge=0)
    """Maximum PDU size we receive (0 = unlimited)."""
    max_associations: int = Field(16, ge=1)
    """Concurrent associations accepted by each listener process; more are rejected
    (transient, try later). With ``processes`` N the service admits up to N times this."""
    processes: int = Field(1, ge=1, le=64)
    """Listener processes sharing the port (pre-forked by ``serve``, one accepting socket).
    1: the listener runs inside the ``serve`` process. More spread associations over cores
    on a machine with more cores than senders (decision 0013)."""
    memory_per_instance_mb: int = Field(64, ge=1)
    """A data set larger than this is gathered in a temporary file in the spool, not in
    memory, while it arrives."""
    max_instance_mb: int = Field(8192, ge=0)
    """A data set larger than this is refused: C-STORE answered 0xA700 when its last
    fragment arrives, its bytes discarded as they come (the association goes on). 0: no
    limit."""
    acse_timeout_s: float = Field(30.0, gt=0)
    """A connection that sends no A-ASSOCIATE-RQ within this time is closed."""
    dimse_timeout_s: float = Field(60.0, gt=0)
    """Each PDU of a DIMSE message that has started must arrive within this time."""
    network_timeout_s: float = Field(120.0, gt=0)
    """An association idle between messages for this long is aborted."""
    allowed_callers: list[AllowedCaller] = Field(default_factory=list)
    """Calling AE titles accepted; others are rejected (A-ASSOCIATE-RJ, calling AE title not
    recognised). Empty: any caller, allowed only on a loopback ``host`` or with
    ``allow_any_caller``."""
    allow_any_caller: bool = False
    """Accept any calling AE title on a non-loopback ``host`` with no ``allowed_callers``."""
    duplicates: Literal["keep-first", "replace", "keep-both"] = "replace"
    """An instance received again with other bytes: keep the first copy, replace it (and
    re-open its study), or keep both (the second copy is recorded, not processed)."""
    tls_certificate: Path | None = None
    """PEM server certificate (chain): the listener then speaks DICOM TLS only."""
    tls_private_key: Path | None = None
    """PEM private key of ``tls_certificate``."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: when set, callers must present a client certificate it signed."""

    @model_validator(mode="after")
    def _tls_pair(self) -> ListenerSettings:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together")
        if self.tls_client_ca is not None and self.tls_certificate is None:
            raise ValueError("tls_client_ca needs tls_certificate and tls_private_key")
        return self


class DatabaseSettings(Section):
    url: SecretStr | None = None
    """SQLAlchemy URL. Default: SQLite at ``<data_dir>/pacs-agent.db``."""
    auto_upgrade: bool = True
    """``serve`` and ``worker`` run ``db upgrade`` at start. Turn off when a DBA migrates."""


class BrokerSettings(Section):
    url: SecretStr | None = None
    """Celery broker URL (``redis://...``, ``amqp://...``). Default: embedded, no server:
    kombu's filesystem transport under ``<data_dir>/broker``."""
    polling_interval_s: float = Field(0.05, gt=0)
    """How often the embedded broker is polled (ignored by Redis and RabbitMQ)."""
    inference_queue: str = "inference"
    io_queue: str = "io"
    max_queued: int = Field(8, ge=0)
    """At most this many inference jobs wait in the broker; the rest wait in the database,
    highest priority first, so an urgent study overtakes a routine backlog on every broker.
    Keep it at least the total inference concurrency of your workers (0: no limit)."""


class AssemblerSettings(Section):
    """When is a study complete? See ``pacs_agent.domain.completeness``."""

    idle_timeout_s: float = Field(3.0, ge=0)
    """Complete this long after the sending association was released with no new instance."""
    unreleased_timeout_s: float = Field(120.0, gt=0)
    """Complete this long after the last instance even if the association never released
    (aborted, or a sender that keeps it open)."""
    max_wait_s: float = Field(3600.0, gt=0)
    """Forced close: complete this long after the first instance, whatever else happens."""
    poll_interval_s: float = Field(0.25, gt=0)
    """How often the scheduler checks studies and the job table."""
    late_instance: Literal["reprocess", "ignore"] = "reprocess"
    """An instance for a study already complete: ``reprocess`` re-opens the study (new jobs
    supersede the old ones); ``ignore`` stores and indexes it but leaves the study as it is."""


class RoutingRule(Section):
    """Which models run on which series. All given conditions must hold."""

    name: str
    models: list[str]
    """Model names (from the model cards) to run on a matching series."""
    priority: int = 0
    """Higher runs first (urgent before routine)."""
    modality: list[str] = Field(default_factory=list)
    """Series Modality in this list (empty: any)."""
    body_part_examined: list[str] = Field(default_factory=list)
    """BodyPartExamined in this list (case ignored; empty: any)."""
    study_description: str | None = None
    """Regex searched in StudyDescription (case ignored)."""
    series_description: str | None = None
    """Regex searched in SeriesDescription (case ignored)."""
    sop_class_uid: list[str] = Field(default_factory=list)
    """Some instance of the series has one of these SOP Class UIDs."""
    image_type_includes: list[str] = Field(default_factory=list)
    """ImageType must contain every one of these values (e.g. ``AXIAL``)."""
    image_type_excludes: list[str] = Field(default_factory=list)
    """ImageType must contain none of these values (e.g. ``LOCALIZER``)."""
    slice_thickness_min: float | None = None
    slice_thickness_max: float | None = None
    """SliceThickness range in mm (inclusive)."""
    min_instances: int = Field(1, ge=0)
    max_instances: int | None = None
    calling_ae_title: list[str] = Field(default_factory=list)
    """The series was sent by one of these calling AE titles."""
    idle_timeout_s: float | None = Field(None, ge=0)
    """This rule's own ``assembler.idle_timeout_s`` (None: the assembler's)."""
    max_wait_s: float | None = Field(None, gt=0)
    """This rule's own ``assembler.max_wait_s`` (None: the assembler's)."""

    @field_validator("study_description", "series_description")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
        return v


def _default_rules() -> list[RoutingRule]:
    return [
        RoutingRule(name="ct-demo", modality=["CT"], models=["demo_ct_blob_seg"]),
        RoutingRule(name="cr-dx-demo", modality=["CR", "DX"], models=["demo_cr_nodule_cls"]),
    ]


class ModelTimeLimits(Section):
    soft_s: float = Field(gt=0)
    """The job fails with ``SoftTimeLimitExceeded`` after this long."""
    hard_s: float = Field(gt=0)
    """The worker process running the job is killed after this long."""


class ModelsSettings(Section):
    directory: Path | None = None
    """Directory of MONAI bundles, one per subdirectory. Default: the demo bundles shipped
    in ``workers/bundles``."""
    rules: list[RoutingRule] = Field(default_factory=_default_rules)
    time_limits: dict[str, ModelTimeLimits] = Field(default_factory=dict)
    """Per-model time limits by model name; others get the ``[worker]`` defaults."""


class WorkerSettings(Section):
    device: str = "auto"
    """Inference device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    oom_cpu_fallback: bool = False
    """After CUDA runs out of memory (memory released), run the job again on the CPU at once
    instead of failing it (it is then retried later, like any transient error)."""
    concurrency: int = Field(1, ge=1)
    embedded: bool = True
    """``serve`` starts a worker subprocess for both queues (``--no-worker`` overrides)."""
    lease_s: float = Field(60.0, gt=0)
    """A running job's lease; the worker renews it every third of it while the job runs.
    A job whose lease expires (its worker died) is sent again by the sweeper."""
    max_attempts: int = Field(3, ge=1)
    """A job is tried at most this often (transient errors, lost workers); then it fails."""
    retry_backoff_s: float = Field(10.0, ge=0)
    """Delay before the first retry after a transient error; doubles with each attempt."""
    retry_backoff_max_s: float = Field(300.0, ge=0)
    """Longest delay between retries."""
    soft_time_limit_s: float = Field(1800.0, gt=0)
    """Default soft time limit of a model run (``[models.time_limits]`` overrides)."""
    time_limit_s: float = Field(1860.0, gt=0)
    """Default hard time limit: the worker process is killed and the job tried again."""
    requeue_after_s: float = Field(300.0, gt=0)
    """A queued job not picked up for this long (a lost broker message) is sent again."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v):
            return v
        raise ValueError(f"device {v!r}: expected auto, cpu, cuda or cuda:N")


class DicomDestination(Section):
    """A DICOM peer that receives our SEG and SR by C-STORE (optionally over TLS)."""

    kind: Literal["dicom"] = "dicom"
    name: str = Field(min_length=1, max_length=64)
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    """Speak DICOM TLS to the peer (its certificate is verified against ``tls_ca``)."""
    tls_ca: Path | None = None
    """PEM CA bundle that signed the peer's certificate. Default: the system's CAs."""
    tls_certificate: Path | None = None
    """PEM client certificate, for peers that ask for one (with ``tls_private_key``)."""
    tls_private_key: Path | None = None
    tls_check_hostname: bool = True
    """The peer's certificate must name ``host``."""
    max_attempts: int | None = Field(None, ge=1)
    """Attempts before ``export_failed``. Default: ``export.max_attempts``."""

    @model_validator(mode="after")
    def _tls_pair(self) -> DicomDestination:
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ValueError("tls_certificate and tls_private_key go together")
        return self


class DicomWebDestination(Section):
    """A DICOMweb origin server that receives our SEG and SR by STOW-RS."""

    kind: Literal["dicomweb"]
    name: str = Field(min_length=1, max_length=64)
    url: str
    """Base URL of the DICOMweb service (the STOW-RS path ``/studies`` is appended)."""
    username: str | None = None
    """HTTP basic authentication (with ``password``)."""
    password: SecretStr | None = None
    token: SecretStr | None = None
    """Bearer token (instead of ``username``/``password``)."""
    ca_file: Path | None = None
    """PEM CA bundle for an https URL. Default: the system's CAs."""
    max_attempts: int | None = Field(None, ge=1)
    """Attempts before ``export_failed``. Default: ``export.max_attempts``."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _auth(self) -> DicomWebDestination:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        if self.token is not None and self.username is not None:
            raise ValueError("give either a token or a username and password, not both")
        return self


def _destination_kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "dicom"))
    return str(getattr(value, "kind", "dicom"))


Destination = Annotated[
    Annotated[DicomDestination, Tag("dicom")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


class ExportSettings(Section):
    destinations: list[Destination] = Field(default_factory=list)
    """Where results are sent. Empty: results stay under ``<data_dir>/results``."""
    calling_ae_title: AETitle = "PACSAGENT"
    timeout_s: float = Field(30.0, gt=0)
    include_empty_seg: bool = False
    """Send a SEG even when nothing was found (the SR always says what was not found)."""
    max_attempts: int = Field(5, ge=1)
    """Attempts per destination before the job ends ``export_failed`` (retry by command)."""
    backoff_initial_s: float = Field(2.0, ge=0)
    """Wait before the second attempt; each further wait is ``backoff_factor`` times longer."""
    backoff_factor: float = Field(2.0, ge=1)
    backoff_max_s: float = Field(60.0, ge=0)
    """Longest wait between two attempts."""
    failure_notices: bool = True
    """When a job fails for good, send the destinations an SR saying the AI could not process
    the series, and why (docs/conformance.md)."""

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, v: list[Any]) -> list[Any]:
        _require_unique([d.name for d in v], "destination names")
        return v


class StorageSettings(Section):
    """Where received instances and results live when they are not under ``data_dir``.

    Workers on other hosts read the spool and write results: point both at shared storage
    (NFS, CephFS) on every host, each host keeping its own ``data_dir``."""

    spool_dir: Path | None = None
    """Received instances. Default: ``<data_dir>/spool``."""
    results_dir: Path | None = None
    """SEG and SR files the inference workers write and the io workers export. Default:
    ``<data_dir>/results``."""


NotifyEvent = Literal["findings", "failed"]


class _Notifier(Section):
    name: str = Field(min_length=1, max_length=64)
    """Names the notifier in ``notify list`` and in the database (unique)."""
    events: list[NotifyEvent] = Field(default_factory=lambda: ["findings", "failed"])  # type: ignore[arg-type]
    """``findings``: a job succeeded (its findings and the study's AI flag); ``failed``: the
    AI could not process a series (the job failed for good)."""
    max_attempts: int | None = Field(None, ge=1)
    """Attempts before the notification ends ``failed``. Default: ``notify.max_attempts``."""


class Hl7Notifier(_Notifier):
    """HL7 v2.5.1 ORU^R01 over MLLP to a RIS (one message, then its ACK, per connection)."""

    kind: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    events: list[NotifyEvent] = Field(default_factory=lambda: ["findings"])  # type: ignore[arg-type]
    sending_application: str = Field("PACS-AGENT", min_length=1, max_length=180)
    """MSH-3."""
    sending_facility: str = Field("", max_length=180)
    """MSH-4."""
    receiving_application: str = Field("", max_length=180)
    """MSH-5."""
    receiving_facility: str = Field("", max_length=180)
    """MSH-6."""


class FhirNotifier(_Notifier):
    """A FHIR R4 server: a transaction Bundle with a DiagnosticReport and its Observations."""

    kind: Literal["fhir"]
    base_url: str
    """The FHIR base URL; the Bundle is POSTed to it."""
    token: SecretStr | None = None
    """Bearer token sent as ``Authorization: Bearer ...``."""
    ca_file: Path | None = None
    """PEM CA bundle for an https URL. Default: the system's CAs."""

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/")


class WebhookNotifier(_Notifier):
    """An HTTP endpoint that receives a signed JSON document (docs/integration.md)."""

    kind: Literal["webhook"]
    url: str
    secret: SecretStr = Field(min_length=16)
    """Shared secret of the HMAC-SHA256 signature (at least 16 characters)."""
    ca_file: Path | None = None
    """PEM CA bundle for an https URL. Default: the system's CAs."""

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v


Notifier = Annotated[
    Hl7Notifier | FhirNotifier | WebhookNotifier,
    Field(discriminator="kind"),
]


class NotifySettings(Section):
    """Worklist integration: findings and AI flags out to RIS / worklist systems."""

    notifiers: list[Notifier] = Field(default_factory=list)
    """Where notifications go (several at once). Empty: none are made."""
    max_attempts: int = Field(10, ge=1)
    """Attempts per notification before it ends ``failed`` (``notify retry`` sends again)."""
    backoff_initial_s: float = Field(5.0, ge=0)
    """Wait before the second attempt; each further wait is ``backoff_factor`` times longer."""
    backoff_factor: float = Field(2.0, ge=1)
    backoff_max_s: float = Field(600.0, ge=0)
    """Longest wait between two attempts."""
    timeout_s: float = Field(10.0, gt=0)
    """Connect, send and answer (HL7 ACK, HTTP response) time limit of one attempt."""

    @field_validator("notifiers")
    @classmethod
    def _unique_names(cls, v: list[Any]) -> list[Any]:
        _require_unique([n.name for n in v], "notifier names")
        return v


class ApiSettings(Section):
    """The HTTP API, metrics and dashboard (``pacs-agent api``, or inside ``serve``)."""

    enabled: bool = True
    """``serve`` also starts the API (``pacs-agent api`` runs it alone)."""
    host: str = "127.0.0.1"
    """Address to bind. Loopback by default; another address needs tokens."""
    port: int = Field(8080, ge=1, le=65535)
    """TCP port of the API and dashboard."""
    read_tokens: list[SecretStr] = Field(default_factory=list)
    """Bearer tokens that may read (each the token itself, or ``sha256:<hex digest>``)."""
    admin_tokens: list[SecretStr] = Field(default_factory=list)
    """Bearer tokens that may also reprocess, retry and cancel (same forms)."""
    access_log: bool = True
    """Log one line per request: method, path (never the query string), status, time."""

    @field_validator("read_tokens", "admin_tokens")
    @classmethod
    def _tokens(cls, v: list[SecretStr]) -> list[SecretStr]:
        for token in v:
            raw = token.get_secret_value()
            if raw.startswith("sha256:"):
                if not re.fullmatch(r"sha256:[0-9a-f]{64}", raw):
                    raise ValueError("a hashed token is 'sha256:' and 64 lowercase hex digits")
            elif len(raw) < 16:
                raise ValueError("a token must be at least 16 characters long")
        return v


class UpsSubscriber(Section):
    """A worklist client's AE that may subscribe to UPS events: where to send them."""

    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)


class UpsSettings(Section):
    """The DICOM UPS SCP (IHE AIW-I): AI jobs as Unified Procedure Steps (decision 0019)."""

    enabled: bool = False
    """Start the UPS SCP (Push, Pull, Watch, Event, Query) inside ``pacs-agent serve``."""
    ae_title: AETitle = "PACSAGENT"
    """The UPS SCP's AE title; also the calling AE title of its N-EVENT-REPORTs."""
    host: str = "127.0.0.1"
    port: int = Field(11113, ge=1, le=65535)
    """Its own port: the listener's upper layer carries only C-ECHO and C-STORE."""
    subscribers: list[UpsSubscriber] = Field(default_factory=list)
    """The worklist clients: only they may associate, and their reports go to host:port."""
    poll_interval_s: float = Field(1.0, gt=0)
    """How often job states are compared with the workitems and pending events sent."""
    retry_initial_s: float = Field(2.0, ge=0)
    """First wait before an event report that failed is sent again; doubles each time."""
    retry_max_s: float = Field(300.0, ge=0)
    """Longest wait between tries; an undelivered event is kept until it is delivered."""
    timeout_s: float = Field(10.0, gt=0)
    """Association, DIMSE and network timeout of an N-EVENT-REPORT association."""
    max_find_results: int = Field(1000, ge=1)
    """C-FIND returns at most this many workitems (newest first)."""

    @field_validator("subscribers")
    @classmethod
    def _unique_titles(cls, v: list[UpsSubscriber]) -> list[UpsSubscriber]:
        _require_unique([s.ae_title for s in v], "ups.subscribers AE titles")
        return v

    @model_validator(mode="after")
    def _clients_known(self) -> UpsSettings:
        if self.enabled and not self.subscribers:
            raise ValueError(
                "ups.enabled needs ups.subscribers: only the worklist clients listed there "
                "may associate with the UPS SCP (AE title, host and port of each)"
            )
        return self


class RetentionSettings(Section):
    days: int | None = Field(None, ge=1)
    """``pacs-agent purge`` without ``--older-than-days`` or ``--study`` removes the studies
    with no activity for this many days (spool files, results, rows). None: off."""


class QueryRetrieveSettings(Section):
    """The PACS that ``pacs-agent retrieve`` queries (C-FIND) and asks to send (C-MOVE)."""

    ae_title: AETitle | None = None
    """Called AE title of the PACS's query/retrieve SCP. None: retrieve is not configured."""
    host: str = "127.0.0.1"
    port: int = Field(104, ge=1, le=65535)
    calling_ae_title: AETitle | None = None
    """Our AE title towards the PACS. Default: ``export.calling_ae_title``."""
    move_destination: AETitle | None = None
    """The AE title the PACS sends the study to (the PACS must know it with our listener's
    host and port). Default: ``listener.ae_title``."""
    timeout_s: float = Field(30.0, gt=0)
    """Association and per-response timeout; a C-MOVE waits this long between responses."""
    method: Literal["move", "get"] = "move"
    """``move``: C-MOVE to our listener (the PACS must know it). ``get``: C-GET over our own
    association (for a PACS that cannot connect to us), then C-STORE to our listener."""


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def level_no(self) -> int:
        return int(logging.getLevelName(self.level))


class Settings(BaseSettings):
    """The effective settings of one pacs-agent process."""

    model_config = SettingsConfigDict(
        env_prefix="PACS_AGENT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    data_dir: Path = Path("./var")
    """All state lives here: spool, results, embedded database and broker."""
    uid_root: str = DEFAULT_UID_ROOT
    """Root of the UIDs we create (your organisation's root, or 2.25 for UUID-derived UIDs)."""
    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    assembler: AssemblerSettings = Field(default_factory=AssemblerSettings)
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    ups: UpsSettings = Field(default_factory=UpsSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    query_retrieve: QueryRetrieveSettings = Field(default_factory=QueryRetrieveSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, v: str) -> str:
        return validate_uid_root(v)

    @model_validator(mode="after")
    def _absolute_data_dir(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = settings_cls.model_config.get("toml_file")
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    # Derived paths and URLs: the one place that knows the layout of data_dir.
    @property
    def spool_dir(self) -> Path:
        if self.storage.spool_dir is not None:
            return self.storage.spool_dir.expanduser().resolve()
        return self.data_dir / "spool"

    @property
    def results_dir(self) -> Path:
        if self.storage.results_dir is not None:
            return self.storage.results_dir.expanduser().resolve()
        return self.data_dir / "results"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def database_url(self) -> str:
        if self.database.url is not None:
            return self.database.url.get_secret_value()
        return f"sqlite:///{self.data_dir / 'pacs-agent.db'}"

    @property
    def broker_url(self) -> str | None:
        """The broker URL, or None for the embedded filesystem broker."""
        return self.broker.url.get_secret_value() if self.broker.url is not None else None

    @property
    def models_dir(self) -> Path:
        if self.models.directory is not None:
            return self.models.directory.expanduser().resolve()
        return Path(__file__).resolve().parent.parent / "workers" / "bundles"


class ConfigError(Exception):
    """The configuration cannot be used; the message says what and where."""


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Read and validate the settings once.

    ``config_file`` defaults to ``$PACS_AGENT_CONFIG``. Raises ConfigError with a readable
    message for a missing file or invalid values.
    """
    path = config_file if config_file is not None else os.environ.get(CONFIG_ENV)
    if path:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"configuration file {path} does not exist")

    class _FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=str(path) if path else None)

    try:
        settings = _FileSettings(**overrides)
    except Exception as exc:  # pydantic.ValidationError, tomllib.TOMLDecodeError
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{exc}") from exc
    return Settings.model_validate(settings.model_dump())


_SECRET_URL = re.compile(r"(?P<scheme>[a-z0-9+]+://)(?P<user>[^:/@]*):(?P<pw>[^@]*)@")


def mask_url(url: str) -> str:
    """Hide the password in a URL: ``redis://u:secret@h`` -> ``redis://u:***@h``."""
    return _SECRET_URL.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def effective_settings(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, secrets masked, derived values filled in."""
    data = settings.model_dump(mode="json")
    data["database"]["url"] = mask_url(settings.database_url)
    data["broker"]["url"] = (
        mask_url(settings.broker_url) if settings.broker_url else f"embedded: {settings.broker_dir}"
    )
    data["models"]["directory"] = str(settings.models_dir)
    return data

"""A gateway's configuration (``config/edge/<gateway>.toml``): who it is, what it polls, how it
batches and where its outbox lives."""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge.devices import DeviceMap, DeviceMapError, load_model
from edge.wire import MAX_READINGS_PER_BATCH, Ident, Quantity

DEFAULT_QUANTITIES = (Quantity.ENERGY_IMPORT_KWH, Quantity.POWER_W)


# tcp: Modbus TCP (MBAP framing).  rtu_over_tcp: RTU frames (with CRC) over a TCP socket -- what a
# transparent RS485-to-Ethernet converter (USR-TCP232, Moxa NPort in TCP server mode) speaks.
# rtu: RTU frames on the gateway's own serial line (a USB-RS485 adapter, /dev/ttyUSB0); needs pyserial.
Transport = Literal["tcp", "rtu_over_tcp", "rtu"]
SERIAL_FIELDS = ("serial_port", "baudrate", "parity", "stopbits", "bytesize")
BAUDRATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)
# Modbus over serial line: 0 is broadcast (no reply), 248-255 are reserved.  A Modbus TCP server
# may use any unit id (0 and 255 are common for a device that is its own server).
RTU_UNIT_IDS = range(1, 248)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")


def check_host(host: str) -> str:
    """An IPv4/IPv6 address or a DNS name; all-numeric dotted names must be valid IPv4."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    labels = host.split(".")
    if all(label.isdigit() for label in labels) or not _HOSTNAME.match(host):
        raise ValueError(f"{host!r} is neither an IP address nor a host name")
    return host


class EdgeMeter(BaseModel):
    """A meter the gateway polls: a Modbus endpoint and unit id, decoded with ``model``'s map."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: Ident
    host: str | None = None  # tcp and rtu_over_tcp
    port: Annotated[int, Field(ge=1, le=65535)] = 502
    transport: Transport = "tcp"
    # rtu: the serial line.  Meters on one line share all of these (one bus, one speed).
    serial_port: Annotated[str, Field(min_length=1)] | None = None  # /dev/ttyUSB0, /dev/ttyS1
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit_id: Annotated[int, Field(ge=0, le=255)]  # rtu and rtu_over_tcp: 1-247
    model: Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]
    quantities: tuple[Quantity, ...] | None = None  # None: the gateway's default
    # Meters wired to instrument transformers report secondary values: primary = value * CT * PT.
    ct_ratio: Annotated[float, Field(gt=0)] = 1.0
    pt_ratio: Annotated[float, Field(gt=0)] = 1.0
    # None: the gateway's modbus_timeout_s / modbus_retries.
    timeout_s: Annotated[float, Field(gt=0, le=60)] | None = None
    retries: Annotated[int, Field(ge=0, le=10)] | None = None
    # Largest plausible active power (primary side); enables spike detection when set.
    max_power_w: Annotated[float, Field(gt=0)] | None = None
    # Some devices (and RS-485 converters) need a breather: between two requests, and after the
    # connection opened.  None: the gateway's setting.
    pause_between_requests_s: Annotated[float, Field(ge=0, le=10)] | None = None
    pause_after_connect_s: Annotated[float, Field(ge=0, le=60)] | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, host: str | None) -> str | None:
        return None if host is None else check_host(host)

    @model_validator(mode="after")
    def _endpoint(self) -> EdgeMeter:
        if self.transport != "tcp" and self.unit_id not in RTU_UNIT_IDS:
            raise ValueError(
                f"meter {self.id}: unit_id {self.unit_id} is not a Modbus RTU slave address (1-247; "
                "0 is broadcast, 248-255 are reserved)"
            )
        if self.transport == "rtu":
            if self.serial_port is None:
                raise ValueError(
                    f'meter {self.id}: transport "rtu" needs serial_port (the RS485 line, e.g. /dev/ttyUSB0)'
                )
            if self.host is not None or "port" in self.model_fields_set:
                raise ValueError(
                    f'meter {self.id}: host and port are for tcp transports; transport "rtu" uses serial_port'
                )
            if self.baudrate not in BAUDRATES:
                rates = ", ".join(map(str, BAUDRATES))
                raise ValueError(f"meter {self.id}: baudrate {self.baudrate} is not one of {rates}")
        else:
            if self.host is None:
                raise ValueError(f'meter {self.id}: transport "{self.transport}" needs host')
            if serial := sorted(set(SERIAL_FIELDS) & self.model_fields_set):
                names = ", ".join(serial)
                raise ValueError(f'meter {self.id}: {names} need transport = "rtu" (not "{self.transport}")')
        return self

    @property
    def endpoint(self) -> str:
        """Where the meter's connection goes: meters with the same endpoint share it."""
        return self.serial_port if self.transport == "rtu" else f"{self.host}:{self.port}"  # type: ignore[return-value]

    @property
    def serial_settings(self) -> tuple[int, str, int, int]:
        return (self.baudrate, self.parity, self.stopbits, self.bytesize)

    @property
    def ratio(self) -> float:
        return self.ct_ratio * self.pt_ratio


class EdgeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    supplier: Ident
    site: Ident
    gateway: Ident
    poll_interval_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    quantities: Annotated[tuple[Quantity, ...], Field(min_length=1)] = DEFAULT_QUANTITIES
    max_readings_per_batch: Annotated[int, Field(ge=1, le=MAX_READINGS_PER_BATCH)] = 1000
    # Bounded outbox: past this many unacknowledged batches the oldest are dropped (and counted),
    # so a long broker outage cannot fill the gateway's disk.
    outbox_max_batches: Annotated[int, Field(ge=1)] = 100_000
    # Relative paths are under the state directory (Settings().stack.state_dir).
    outbox_path: Path = Path("edge/outbox.sqlite")
    modbus_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    modbus_retries: Annotated[int, Field(ge=0, le=10)] = 1
    # Eviction when the outbox is full: the oldest unsent batches go first (counted and metered).
    # Past data is what a long outage made stale; the newest readings keep the site visible.
    outbox_eviction: Literal["drop_oldest"] = "drop_oldest"
    # Batches per wall second handed to MQTT when backfilling after an outage, so the uplink of
    # a factory (often a 4G router) and the broker are not flooded.
    backfill_batches_per_s: Annotated[float, Field(gt=0)] = 50.0
    # Readings stamped outside [now - max_reading_age_s, now + max_clock_ahead_s] of the gateway
    # clock, or while the measured clock offset exceeds max_clock_offset_s, are quarantined.
    max_clock_offset_s: Annotated[float, Field(gt=0)] = 300.0
    # An HTTP(S) URL whose Date header is the clock reference (htpdate style: no NTP needed).
    clock_reference_url: str | None = None
    clock_check_interval_s: Annotated[float, Field(gt=0)] = 600.0  # wall seconds
    # Prometheus /metrics on 127.0.0.1:metrics_port (0: off).
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 0
    # Batches handed to the MQTT client at once; the rest wait in the outbox.
    max_inflight: Annotated[int, Field(ge=1, le=10_000)] = 100
    pause_between_requests_s: Annotated[float, Field(ge=0, le=10)] = 0.0
    pause_after_connect_s: Annotated[float, Field(ge=0, le=60)] = 0.0
    # The serial number is read when a connection opens and then every serial_refresh_s (wall
    # seconds): a changed serial means the meter was replaced.
    serial_refresh_s: Annotated[float, Field(gt=0)] = 900.0
    # Counter sanity (edge.counters): a dip of at most counter_dip_tolerance (counter units) is
    # a glitch; a larger drop counts as a reset/replacement only once this many reads confirm it.
    counter_dip_tolerance: Annotated[float, Field(ge=0)] = 1.0
    counter_drop_confirmations: Annotated[int, Field(ge=1, le=100)] = 3
    meters: Annotated[tuple[EdgeMeter, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _unique(self) -> EdgeConfig:
        ids = [m.id for m in self.meters]
        if dupes := sorted({i for i in ids if ids.count(i) > 1}):
            raise ValueError(f"meter ids must be unique; repeated: {', '.join(dupes)}")
        transports: dict[str, str] = {}
        lines: dict[str, tuple[int, str, int, int]] = {}
        for m in self.meters:
            if transports.setdefault(m.endpoint, m.transport) != m.transport:
                raise ValueError(f"meters on {m.endpoint} must share one transport")
            if m.transport == "rtu" and lines.setdefault(m.endpoint, m.serial_settings) != m.serial_settings:
                raise ValueError(
                    f"meters on serial line {m.endpoint} must share baudrate, parity, stopbits and bytesize"
                )
        units = [(m.endpoint, m.unit_id) for m in self.meters]
        if dupes_u := sorted({f"{e}/{u}" for e, u in units if units.count((e, u)) > 1}):
            raise ValueError(f"two meters share an endpoint and unit id: {', '.join(dupes_u)}")
        return self

    def quantities_of(self, meter: EdgeMeter) -> tuple[Quantity, ...]:
        return meter.quantities if meter.quantities is not None else self.quantities

    def timeout_of(self, meter: EdgeMeter) -> float:
        return meter.timeout_s if meter.timeout_s is not None else self.modbus_timeout_s

    def retries_of(self, meter: EdgeMeter) -> int:
        return meter.retries if meter.retries is not None else self.modbus_retries

    def pause_between_of(self, meter: EdgeMeter) -> float:
        p = meter.pause_between_requests_s
        return p if p is not None else self.pause_between_requests_s

    def pause_after_connect_of(self, meter: EdgeMeter) -> float:
        p = meter.pause_after_connect_s
        return p if p is not None else self.pause_after_connect_s

    def resolved_outbox(self, state_dir: Path) -> Path:
        return self.outbox_path if self.outbox_path.is_absolute() else state_dir / self.outbox_path


class EdgeConfigError(ValueError):
    """A config that cannot be used; the message names the file and every problem."""


def load_edge_config(path: Path) -> EdgeConfig:
    """The validated config; every problem is reported with the file, line and meter id."""
    try:
        text = path.read_text()
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise EdgeConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgeConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return EdgeConfig.model_validate(data)
    except ValidationError as exc:
        where = ConfigLines(text)
        errors = exc.errors()
        if any(len(e["loc"]) > 1 and e["loc"][0] == "meters" for e in errors):
            # pydantic also reports the meters tuple "too short" once its invalid items are out
            errors = [e for e in errors if not (e["loc"] == ("meters",) and e["type"] == "too_short")]
        problems = [where.locate(err["loc"], data, err["msg"]) for err in errors]
        raise EdgeConfigError(f"{path}: " + "; ".join(problems)) from None


class ConfigLines:
    """Line numbers of a gateway config's keys and ``[[meters]]`` tables, for error messages."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.meters = [i for i, line in enumerate(self.lines) if line.strip().startswith("[[meters]]")]

    def meter_line(self, index: int, key: str | None = None) -> int:
        """1-based line of meter ``index``'s table, or of its ``key`` when given and present."""
        if index >= len(self.meters):
            return 0
        start = self.meters[index]
        end = self.meters[index + 1] if index + 1 < len(self.meters) else len(self.lines)
        if key is not None:
            for i in range(start + 1, end):
                if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i]):
                    return i + 1
        return start + 1

    def key_line(self, key: str) -> int:
        end = self.meters[0] if self.meters else len(self.lines)
        return next((i + 1 for i in range(end) if re.match(rf"\s*{re.escape(key)}\s*=", self.lines[i])), 0)

    def locate(self, loc: tuple[int | str, ...], data: dict[str, Any], msg: str) -> str:
        msg = msg.removeprefix("Value error, ")
        if len(loc) >= 2 and loc[0] == "meters" and isinstance(loc[1], int):
            index, key = loc[1], (str(loc[2]) if len(loc) > 2 else None)
            meters = data.get("meters") or []
            raw = meters[index] if index < len(meters) and isinstance(meters[index], dict) else {}
            ident = raw.get("id", f"#{index + 1}")
            field_name = ".".join(str(p) for p in loc[2:])
            what = f"meter {ident}: {field_name}: {msg}" if field_name else msg
            if not field_name and not msg.startswith(f"meter {ident}"):
                what = f"meter {ident}: {msg}"
            return f"line {self.meter_line(index, key)}: {what}"
        if loc and isinstance(loc[0], str) and (line := self.key_line(loc[0])):
            return f"line {line}: {'.'.join(str(p) for p in loc)}: {msg}"
        return f"{'.'.join(str(p) for p in loc) or '(top level)'}: {msg}"


def check_transports(config: EdgeConfig) -> None:
    """What the gateway must have installed for the config's transports."""
    if any(m.transport == "rtu" for m in config.meters):
        try:
            import serial  # noqa: F401
        except ImportError:
            raise EdgeConfigError(
                'transport "rtu" needs pyserial on the gateway: pip install "scopemeter[edge]"'
            ) from None


def load_device_maps(
    config: EdgeConfig, config_dir: Path, source: Path | None = None
) -> dict[str, DeviceMap]:
    """The register map of every model the config uses, checked to map every wanted quantity.
    With ``source`` (the config file), problems name the file and the meter's line."""
    maps: dict[str, DeviceMap] = {}
    problems: list[str] = []
    lines = ConfigLines(source.read_text()) if source is not None and source.is_file() else None

    def where(index: int, key: str) -> str:
        return f"{source}: line {lines.meter_line(index, key)}: " if lines is not None else ""

    for index, meter in enumerate(config.meters):
        if meter.model not in maps:
            try:
                maps[meter.model] = load_model(config_dir, meter.model)
            except DeviceMapError as exc:
                problems.append(f"{where(index, 'model')}meter {meter.id}: {exc}")
                continue
        mapped = maps[meter.model].by_quantity()
        missing = [q.value for q in config.quantities_of(meter) if q not in mapped]
        if missing:
            problems.append(
                f"{where(index, 'model')}meter {meter.id}: model {meter.model} maps no register for "
                f"{', '.join(missing)}"
            )
    if problems:
        raise EdgeConfigError("; ".join(dict.fromkeys(problems)))
    return maps

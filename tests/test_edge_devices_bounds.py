"""Register limits (edge.devices.Register): where each integer type wraps and its lowest value,
against two's-complement arithmetic written out here (int16: -32768..32767, uint16: 0..65535, ...),
scaled, and overridden by a device's own rollover. The wrap point decides whether a counter falling
to near zero is a wrap or a drop. Written for the mutants ``make mutate`` found alive (issue 17)."""

from __future__ import annotations

import math

import pytest

from edge.devices import DataType, Register

LIMITS = {  # (max, min) of the raw integer
    DataType.INT16: (32_767, -32_768),
    DataType.UINT16: (65_535, 0),
    DataType.INT32: (2_147_483_647, -2_147_483_648),
    DataType.UINT32: (4_294_967_295, 0),
    DataType.INT64: (9_223_372_036_854_775_807, -9_223_372_036_854_775_808),
    DataType.UINT64: (18_446_744_073_709_551_615, 0),
}


def reg(data_type: DataType, **kw: object) -> Register:
    return Register(name="e", address=0, data_type=data_type, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("data_type", list(LIMITS))
def test_integer_limits_are_the_types_own(data_type: DataType) -> None:
    hi, lo = LIMITS[data_type]
    r = reg(data_type, scale=0.1)
    assert r.max_raw == float(hi) * 0.1 and r.wraps_at == float(hi) * 0.1
    assert r.min_raw == float(lo) * 0.1
    # The extremes encode and decode back (a float cannot hold 64-bit extremes exactly).
    if hi < 2**53:
        plain = reg(data_type)
        for raw in (hi, lo):
            assert plain.decode(plain.encode(float(raw))) == float(raw)


@pytest.mark.parametrize("data_type", [DataType.FLOAT32, DataType.FLOAT64])
def test_floats_never_wrap(data_type: DataType) -> None:
    r = reg(data_type)
    assert r.max_raw == math.inf and r.wraps_at == math.inf and r.min_raw == -math.inf


def test_a_device_rollover_overrides_the_type_limit() -> None:
    assert reg(DataType.UINT32, scale=0.1, rollover=99_999.9).wraps_at == 99_999.9
    assert reg(DataType.UINT32, scale=0.1, rollover=99_999.9).max_raw == 4_294_967_295 * 0.1


def test_a_ct_scaled_counter_wraps_at_the_scaled_limit() -> None:
    """A meter behind CTs reports secondary kWh; the agent multiplies by CT × PT, so the primary
    counter wraps at the register's limit × CT × PT, not at the register's own limit."""
    from datetime import timedelta

    from edge.devices import load_model
    from edge.modbus import ModbusPoller
    from edge.wire import Quality, Quantity
    from tests.test_edge_drivers import CONFIG_DIR, T0, edge_config, frozen_clock

    meter = {"id": "m1", "unit_id": 1, "model": "carlo_gavazzi_em24", "ct_ratio": 40, "pt_ratio": 100}
    config = edge_config(1502, [meter])  # never connected: only the quality decision is used
    poller = ModbusPoller(config, {"carlo_gavazzi_em24": load_model(CONFIG_DIR, "carlo_gavazzi_em24")},
                          frozen_clock())  # fmt: skip
    (m,) = config.meters
    (energy,) = [r for r in load_model(CONFIG_DIR, "carlo_gavazzi_em24").registers
                 if r.quantity == Quantity.ENERGY_IMPORT_KWH]  # fmt: skip
    top = energy.wraps_at * 4000  # int32 × 0.1 kWh × CT 40 × PT 100
    try:
        assert poller._quality(m, energy, 0.95 * top, T0, None) == Quality.GOOD
        assert poller._quality(m, energy, 0.01 * top, T0 + timedelta(minutes=1), None) == Quality.COUNTER_WRAP
        # Near the top of the register's own range, but far below the scaled one: a drop, not a wrap.
        poller.guard.states.clear()
        assert poller._quality(m, energy, 0.95 * energy.wraps_at, T0, None) == Quality.GOOD
        low = poller._quality(m, energy, 0.01 * energy.wraps_at, T0 + timedelta(minutes=1), None)
        assert low == Quality.OUT_OF_RANGE
    finally:
        poller.close()


def test_an_unknown_model_names_every_map_there_is(tmp_path: object) -> None:
    from pathlib import Path

    from edge.devices import PACKAGED_MAPS, DeviceMapError, load_model

    config_dir = Path(str(tmp_path))
    (config_dir / "devices").mkdir()
    own = (PACKAGED_MAPS / "eastron_sdm120.toml").read_text().replace(
        'model = "eastron_sdm120"', 'model = "site_meter"'
    )
    (config_dir / "devices" / "site_meter.toml").write_text(own)
    models = sorted({p.stem for p in PACKAGED_MAPS.glob("*.toml")} | {"site_meter"})
    with pytest.raises(DeviceMapError) as err:
        load_model(config_dir, "nope")
    assert str(err.value) == f"no device map for model 'nope'; available models: {', '.join(models)}"
    assert load_model(config_dir, "site_meter").model == "site_meter"  # the override directory is read
    # An override of a packaged model wins over the package.
    (config_dir / "devices" / "eastron_sdm120.toml").write_text(
        own.replace('model = "site_meter"', 'model = "eastron_sdm120"')
    )
    from edge.devices import model_path

    assert model_path(config_dir, "eastron_sdm120") == config_dir / "devices" / "eastron_sdm120.toml"
    assert model_path(config_dir, "eastron_sdm630") == PACKAGED_MAPS / "eastron_sdm630.toml"


def test_a_one_based_map_shifts_its_identification_register_too() -> None:
    from edge.devices import PACKAGED_MAPS, load_device_map

    em24 = load_device_map(PACKAGED_MAPS / "carlo_gavazzi_em24.toml")
    assert em24.identification is not None and em24.address_base == 0
    one_based = em24.model_copy(update={
        "address_base": 1,
        "registers": tuple(r.model_copy(update={"address": r.address + 1}) for r in em24.registers),
        "identification": em24.identification.model_copy(update={"address": em24.identification.address + 1}),
    })  # fmt: skip
    wire = one_based.on_wire()
    assert wire.address_base == 0
    assert wire.identification == em24.identification
    assert [r.address for r in wire.registers] == [r.address for r in em24.registers]


def test_device_map_refusals_say_what_is_wrong(tmp_path: object) -> None:
    from pathlib import Path

    from edge.devices import DeviceMapError, RegisterType, load_device_map

    missing = Path(str(tmp_path)) / "gone.toml"
    with pytest.raises(DeviceMapError) as missing_err:
        load_device_map(missing)
    assert str(missing_err.value) == f"{missing}: no such device map"
    with pytest.raises(ValueError, match=r"^e: expected 2 registers, got 1$"):
        reg(DataType.UINT32).decode([1])
    # The identification register is read with its own function code.
    from edge.devices import PACKAGED_MAPS

    ident = load_device_map(PACKAGED_MAPS / "carlo_gavazzi_em24.toml").identification
    assert ident is not None
    for kind in RegisterType:
        assert ident.model_copy(update={"type": kind}).register().type == kind

-- scopemeter schema: per-meter plausibility and the quarantine of implausible readings (issue 11).
-- max_kw: the most the metered circuit can draw, in the counter's unit per hour (kW for a kWh
-- counter). A counter step larger than max_kw × the interval is implausible (compute.kernels).
ALTER TABLE meters ADD COLUMN max_kw double precision CHECK (max_kw > 0 AND max_kw < 'Infinity');

-- Readings the compute engine held back: kept in ``readings`` as received, listed here with why.
-- Rebuilt by every recompute over the range it covers, so it always matches the current readings
-- and registry; intervals touching them count no energy, statements list them and are not Final.
CREATE TABLE quarantined_readings (
    meter_id    text NOT NULL,
    quantity    text NOT NULL,
    ts          timestamptz NOT NULL,
    value       double precision NOT NULL,
    reason      text NOT NULL CHECK (reason IN ('non_finite_value', 'implausible_jump')),
    detail      text NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, quantity, ts)
);

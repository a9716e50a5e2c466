-- scopemeter schema v1: fleet registry, factor library, rollups.
-- Raw readings and their storage path (TimescaleDB or native partitions) are 0002_readings.sql.

CREATE TABLE suppliers (
    supplier_id text PRIMARY KEY,
    name        text NOT NULL
);

CREATE TABLE sites (
    site_id     text PRIMARY KEY,
    supplier_id text NOT NULL REFERENCES suppliers,
    name        text NOT NULL,
    grid_region text NOT NULL,
    timezone    text NOT NULL DEFAULT 'UTC'
);

CREATE TABLE gateways (
    gateway_id text PRIMARY KEY,
    site_id    text NOT NULL REFERENCES sites
);

CREATE TABLE meters (
    meter_id   text PRIMARY KEY,
    site_id    text NOT NULL REFERENCES sites,
    gateway_id text REFERENCES gateways,
    carrier    text NOT NULL,          -- electricity, natural_gas, diesel, ...
    model      text NOT NULL,          -- device profile, e.g. eastron_sdm630
    unit_id    integer,
    ct_ratio   double precision NOT NULL DEFAULT 1,
    pt_ratio   double precision NOT NULL DEFAULT 1
);

-- Versioned emission factors, keyed by publisher + series + region + carrier + validity.
CREATE TABLE emission_factors (
    factor_id   text PRIMARY KEY,
    publisher   text NOT NULL,
    series      text NOT NULL,
    region      text NOT NULL,
    carrier     text NOT NULL,
    valid_from  date NOT NULL,
    valid_to    date NOT NULL,         -- exclusive
    kg_co2e_per_unit double precision NOT NULL,
    unit        text NOT NULL,         -- kWh, m3, ...
    version     integer NOT NULL,
    source      text NOT NULL,
    CHECK (valid_from < valid_to)
);

-- Energy per meter and 15-minute bucket, recomputed deterministically from readings.
CREATE TABLE meter_energy_15m (
    meter_id text NOT NULL,
    bucket   timestamptz NOT NULL,
    kwh      double precision NOT NULL,
    PRIMARY KEY (meter_id, bucket)
);

-- Per-site Scope 1/2 rollups; every row names the factor it used.
CREATE TABLE site_rollups_15m (
    site_id     text NOT NULL,
    bucket      timestamptz NOT NULL,
    carrier     text NOT NULL,
    scope       smallint NOT NULL,
    method      text NOT NULL,         -- location | market (scope 2), direct (scope 1)
    kwh         double precision NOT NULL,
    kg_co2e     double precision,      -- NULL where no factor covers the bucket
    factor_id   text REFERENCES emission_factors,
    computed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, bucket, carrier, scope, method)
);

-- scopemeter schema v1: fleet registry, factor library, raw readings, rollups.
-- Plain PostgreSQL path: readings are range-partitioned by month; partitions are created on demand
-- by scopemeter_ensure_partitions(), which the writer calls before it copies rows of a new month.

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

CREATE TABLE readings (
    meter_id    text NOT NULL,
    quantity    text NOT NULL,
    ts          timestamptz NOT NULL,
    value       double precision NOT NULL,
    quality     integer NOT NULL DEFAULT 0,
    site_id     text NOT NULL,
    gateway_id  text NOT NULL,
    batch_seq   bigint NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (meter_id, quantity, ts)
) PARTITION BY RANGE (ts);

CREATE FUNCTION scopemeter_ensure_partitions(t_min timestamptz, t_max timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', t_min AT TIME ZONE 'UTC')::date;
    created integer := 0;
    name text;
BEGIN
    -- Serialise concurrent writers creating the same month.
    PERFORM pg_advisory_xact_lock(hashtext('scopemeter_readings_partitions'));
    WHILE m <= (t_max AT TIME ZONE 'UTC')::date LOOP
        name := format('readings_y%sm%s', to_char(m, 'YYYY'), to_char(m, 'MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                name, (m::timestamp AT TIME ZONE 'UTC'),
                ((m + interval '1 month')::timestamp AT TIME ZONE 'UTC'));
            created := created + 1;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END $$;

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

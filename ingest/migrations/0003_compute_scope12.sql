-- scopemeter schema: compute for Scope 1 and 2 (issue 5).
-- Counter handling per meter, measured vs estimated energy and coverage, factor provenance with
-- per-gas values, contractual instruments and market-based Scope 2.

-- Rollover value of the meter's register (wrap recovery) and the longest interval still measured.
ALTER TABLE meters
    ADD COLUMN counter_max double precision CHECK (counter_max > 0),
    ADD COLUMN max_gap_s   double precision CHECK (max_gap_s > 0);

-- A site may use another published factor series than the configured default (e.g. UK DESNZ).
ALTER TABLE sites ADD COLUMN factor_series text;

-- ``kwh`` is the meter's counter unit (kWh for electricity, m3 for gas) and includes the estimated
-- part; ``measured_ms`` is the time of the bucket covered by measured intervals; ``flags`` are the
-- compute.kernels interval flags (wrap, reset, replacement, drop, gap, estimated) OR-ed.
ALTER TABLE meter_energy_15m
    ADD COLUMN kwh_estimated double precision NOT NULL DEFAULT 0,
    ADD COLUMN measured_ms   bigint NOT NULL DEFAULT 0,
    ADD COLUMN flags         integer NOT NULL DEFAULT 0;

-- ``kwh`` holds the activity in ``activity_unit`` (kWh for Scope 2, the fuel's unit for Scope 1).
-- ``coverage`` = measured meter-time / (registered meters of the carrier × bucket length).
ALTER TABLE site_rollups_15m
    ADD COLUMN activity_unit text NOT NULL DEFAULT 'kWh',
    ADD COLUMN kwh_estimated double precision NOT NULL DEFAULT 0,
    ADD COLUMN coverage      double precision,
    ADD COLUMN kg_co2        double precision,
    ADD COLUMN kg_ch4        double precision,
    ADD COLUMN kg_n2o        double precision;

-- Provenance: the year the factor describes, the GWP set its CO2e uses, and the per-gas values.
ALTER TABLE emission_factors
    ADD COLUMN data_year       integer,
    ADD COLUMN gwp_set         text,
    ADD COLUMN kg_co2_per_unit double precision,
    ADD COLUMN kg_ch4_per_unit double precision,
    ADD COLUMN kg_n2o_per_unit double precision;

-- Hourly rollups are exact sums of the quarter hours (the kernels apportion linearly).
CREATE VIEW site_rollups_1h AS
SELECT site_id, date_trunc('hour', bucket) AS bucket, carrier, scope, method, activity_unit,
       sum(kwh ORDER BY bucket) AS kwh, sum(kwh_estimated ORDER BY bucket) AS kwh_estimated,
       avg(coverage) AS coverage, sum(kg_co2e ORDER BY bucket) AS kg_co2e,
       count(*) FILTER (WHERE kg_co2e IS NULL) AS buckets_without_factor
FROM site_rollups_15m
GROUP BY site_id, date_trunc('hour', bucket), carrier, scope, method, activity_unit;

-- Contractual instruments for market-based Scope 2 (China GEC: 1 certificate = 1 MWh; I-REC; PPA).
CREATE TABLE contractual_instruments (
    instrument_id   text PRIMARY KEY,
    site_id         text NOT NULL REFERENCES sites,
    kind            text NOT NULL,            -- gec | i-rec | ppa | green-tariff
    carrier         text NOT NULL DEFAULT 'electricity',
    mwh             double precision NOT NULL CHECK (mwh > 0),
    period_start    date NOT NULL,            -- site-local dates, end exclusive
    period_end      date NOT NULL,
    kg_co2e_per_kwh double precision NOT NULL DEFAULT 0 CHECK (kg_co2e_per_kwh >= 0),
    hourly          boolean NOT NULL DEFAULT false,  -- hourly matching: MWh spread evenly, no banking
    reference       text NOT NULL,            -- certificate serials / contract id
    CHECK (period_start < period_end)
);

-- Market-based Scope 2 per site, carrier and hour: instruments claimed first, residual factor for
-- the rest (market = location where no instrument and no residual factor exists).
CREATE TABLE site_market_1h (
    site_id          text NOT NULL REFERENCES sites,
    bucket           timestamptz NOT NULL,
    carrier          text NOT NULL,
    kwh              double precision NOT NULL,
    kwh_instruments  double precision NOT NULL,
    kg_co2e          double precision,
    residual_factor_id text REFERENCES emission_factors,
    instrument_ids   text[] NOT NULL DEFAULT '{}',
    computed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site_id, bucket, carrier)
);

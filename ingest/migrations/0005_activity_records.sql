-- scopemeter schema: non-metered activity data (issue 14): refrigerant top-ups, fuel bought by
-- invoice, on-site generation. Entered from config/activity.toml or a CSV with provenance; never
-- metered, and statements say so. Emissions are computed when the file is applied.
CREATE TABLE activity_records (
    record_id            text PRIMARY KEY,
    site_id              text NOT NULL REFERENCES sites,
    kind                 text NOT NULL CHECK (kind IN ('refrigerant', 'fuel_purchase', 'generation')),
    period_start         date NOT NULL,             -- site-local dates, end exclusive
    period_end           date NOT NULL,
    scope                smallint,                  -- 1 for refrigerants and fuel; NULL for generation
    carrier              text,                      -- fuel purchases and generation (electricity)
    gas                  text,                      -- refrigerants: HFC-134a, R-410A, ...
    amount               double precision NOT NULL CHECK (amount >= 0),
    unit                 text NOT NULL,
    cv_basis             text NOT NULL DEFAULT '',
    reference_conditions text NOT NULL DEFAULT '',
    fuel_type            text NOT NULL DEFAULT '',
    exported_kwh         double precision,          -- generation: exported to the grid
    gwp_set              text,
    kg_co2e              double precision,          -- NULL where refused
    kg_co2               double precision,
    kg_ch4               double precision,
    kg_n2o               double precision,
    kg_hfc               double precision,
    factor_id            text REFERENCES emission_factors,
    refusal              text,
    provenance           text NOT NULL,
    metered              boolean NOT NULL DEFAULT false CHECK (NOT metered),
    applied_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (period_start < period_end)
);
CREATE INDEX activity_records_site_period ON activity_records (site_id, period_start);

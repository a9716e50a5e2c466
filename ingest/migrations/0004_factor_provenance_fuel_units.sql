-- scopemeter schema: disclosure-grade factor metadata, fuel meters in their own units, per-site
-- fuel factor series and explicit refusals (issue 14).

-- What each factor is: gases covered (CO2 only or CO2e), CV basis of fuels, gas volume reference
-- conditions, coal/fuel type, and the energy content (NCV) behind a mass/volume factor.
ALTER TABLE emission_factors
    ADD COLUMN gases                text,
    ADD COLUMN cv_basis             text NOT NULL DEFAULT '',
    ADD COLUMN reference_conditions text NOT NULL DEFAULT '',
    ADD COLUMN fuel_type            text NOT NULL DEFAULT '',
    ADD COLUMN ncv                  double precision,
    ADD COLUMN ncv_unit             text,
    ADD COLUMN ncv_source           text;

-- The published series a site's Scope 1 fuel factors come from (default: settings).
ALTER TABLE sites ADD COLUMN fuel_series text;

-- A fuel meter counts in its own unit (natural gas: m3 or kWh; diesel/LPG: l or kg; coal: kg), with
-- the CV basis of a kWh gas meter, the reference conditions of an m3 gas meter and the coal type.
ALTER TABLE meters
    ADD COLUMN activity_unit        text,
    ADD COLUMN cv_basis             text NOT NULL DEFAULT '',
    ADD COLUMN reference_conditions text NOT NULL DEFAULT '',
    ADD COLUMN fuel_type            text NOT NULL DEFAULT '';

-- Rollups are per activity class (carrier + unit + basis + fuel type), so two gas meters of a site
-- in m3 and kWh never mix. ``refusal`` says why a row has no emissions (no factor for the carrier,
-- e.g. cooling without a supplier factor): statements read it to block Final.
ALTER TABLE site_rollups_15m
    ADD COLUMN cv_basis             text NOT NULL DEFAULT '',
    ADD COLUMN reference_conditions text NOT NULL DEFAULT '',
    ADD COLUMN fuel_type            text NOT NULL DEFAULT '',
    ADD COLUMN refusal              text;
ALTER TABLE site_rollups_15m DROP CONSTRAINT site_rollups_15m_pkey;
ALTER TABLE site_rollups_15m ADD PRIMARY KEY
    (site_id, bucket, carrier, scope, method, activity_unit, cv_basis, reference_conditions, fuel_type);

-- Per site, carrier and activity class: the buckets whose emissions could not be computed and why.
CREATE VIEW site_refusals AS
SELECT site_id, carrier, scope, activity_unit, cv_basis, reference_conditions, fuel_type, refusal,
       min(bucket) AS first_bucket, max(bucket) AS last_bucket, count(*) AS buckets,
       sum(kwh) AS activity
FROM site_rollups_15m
WHERE refusal IS NOT NULL
GROUP BY site_id, carrier, scope, activity_unit, cv_basis, reference_conditions, fuel_type, refusal;

-- scopemeter schema: the contractual instrument ledger and its claims (issue 13).
-- GHG Protocol Scope 2 Guidance (2015), Table 7.1 Scope 2 Quality Criteria: an instrument is
-- unique (criterion 2: serial range, refused at load when two overlap), retired on behalf of the
-- reporting entity (criterion 3: retirement evidence), of a vintage close to the consumption
-- (criterion 4: generation period) and from the same market (criterion 5: market boundary).

ALTER TABLE contractual_instruments
    ADD COLUMN serial_prefix   text,      -- registry + batch, e.g. "GEC-2026-GD"; NULL for contracts
    ADD COLUMN serial_first    bigint,
    ADD COLUMN serial_last     bigint,
    ADD COLUMN market_boundary text NOT NULL DEFAULT '',
    ADD COLUMN evidence        text NOT NULL DEFAULT '',  -- retirement / cancellation evidence
    ADD CONSTRAINT contractual_instruments_serials_check CHECK (
        (serial_prefix IS NULL AND serial_first IS NULL AND serial_last IS NULL)
        OR (serial_prefix IS NOT NULL AND serial_first IS NOT NULL AND serial_last >= serial_first));

-- Which fallback the uncovered rest of an hour used: residual-mix | excl-market-nonfossil | location.
ALTER TABLE site_market_1h ADD COLUMN residual_basis text;

-- One row per instrument, site, carrier and hour: the kWh of that hour the instrument covers.
-- Written only by compute.market, which rebuilds whole connected groups of instrument periods.
CREATE TABLE instrument_claims (
    instrument_id text NOT NULL REFERENCES contractual_instruments ON DELETE CASCADE,
    site_id       text NOT NULL REFERENCES sites,
    carrier       text NOT NULL,
    bucket        timestamptz NOT NULL,
    kwh           double precision NOT NULL CHECK (kwh > 0),
    PRIMARY KEY (instrument_id, site_id, carrier, bucket)
);
CREATE INDEX instrument_claims_site_bucket ON instrument_claims (site_id, bucket);

-- Each MWh is claimed at most once: no instrument's claims may exceed its volume. Checked per
-- statement over the instruments the statement touched, so a bulk insert costs one query.
CREATE FUNCTION scopemeter_check_claims() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT c.instrument_id, sum(c.kwh) AS kwh, i.mwh INTO bad
    FROM instrument_claims c JOIN contractual_instruments i USING (instrument_id)
    WHERE c.instrument_id IN (SELECT DISTINCT instrument_id FROM new_claims)
    GROUP BY c.instrument_id, i.mwh
    HAVING sum(c.kwh) > i.mwh * 1000 * (1 + 1e-9)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'instrument % would be claimed for % kWh, more than its % MWh',
            bad.instrument_id, bad.kwh, bad.mwh USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER instrument_claims_within_volume AFTER INSERT ON instrument_claims
    REFERENCING NEW TABLE AS new_claims FOR EACH STATEMENT EXECUTE FUNCTION scopemeter_check_claims();

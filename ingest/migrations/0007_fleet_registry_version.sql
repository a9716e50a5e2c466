-- scopemeter schema: a version of the fleet registry (issue 11).
-- The ingest bridge checks every reading against the registry it holds in memory. It polls this
-- one-row counter and reloads the registry only when it moved; every statement that changes
-- suppliers, sites, gateways or meters bumps it in the same transaction.

CREATE TABLE fleet_registry_version (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version   bigint NOT NULL DEFAULT 1
);
INSERT INTO fleet_registry_version DEFAULT VALUES;

CREATE FUNCTION scopemeter_bump_registry_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE fleet_registry_version SET version = version + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER suppliers_registry_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON suppliers
    FOR EACH STATEMENT EXECUTE FUNCTION scopemeter_bump_registry_version();
CREATE TRIGGER sites_registry_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON sites
    FOR EACH STATEMENT EXECUTE FUNCTION scopemeter_bump_registry_version();
CREATE TRIGGER gateways_registry_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON gateways
    FOR EACH STATEMENT EXECUTE FUNCTION scopemeter_bump_registry_version();
CREATE TRIGGER meters_registry_version AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON meters
    FOR EACH STATEMENT EXECUTE FUNCTION scopemeter_bump_registry_version();

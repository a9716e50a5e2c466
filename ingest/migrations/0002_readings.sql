-- scopemeter schema v2: raw readings and their storage path, chosen once, here.
--
-- TimescaleDB path (the extension is available): readings is a hypertable with 1-day chunks,
-- compressed (segmentby meter_id, quantity; orderby ts) by a compression policy and trimmed by a
-- retention policy; TimescaleDB creates chunks on insert and runs both policies as background jobs.
-- Native path (plain PostgreSQL): readings is range-partitioned by UTC month (readings_yYYYYmMM);
-- scopemeter_ensure_partitions() creates missing months (the writer calls it before it copies rows
-- of a new month) and scopemeter_apply_retention() drops months past the horizon (run it from cron:
-- `scopemeter db retention`).
--
-- The GUC scopemeter.storage picks the path: auto (default: TimescaleDB when available) | timescaledb
-- | native (`scopemeter db migrate --storage ...` sets it). The choice and the horizons are recorded
-- in scopemeter_storage; change the horizons with scopemeter_set_storage_policy().
-- On both paths the primary key (meter_id, quantity, ts) is the reading identity: duplicates are
-- dropped by INSERT ... ON CONFLICT DO NOTHING, also across partitions, chunks and compressed chunks.

CREATE TABLE scopemeter_storage (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    backend        text NOT NULL CHECK (backend IN ('timescaledb', 'native')),
    chunk_interval interval NOT NULL,   -- hypertable chunk width, or native partition width
    compress_after interval,            -- NULL: rows are never compressed (always so on the native path)
    retain_for     interval,            -- NULL: rows are kept forever
    chosen_at      timestamptz NOT NULL DEFAULT now()
);

DO $$
DECLARE
    wanted    text := coalesce(nullif(current_setting('scopemeter.storage', true), ''), 'auto');
    available boolean := EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb');
    -- One definition of the table for both paths.
    columns   text := $cols$
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
    $cols$;
    -- Default horizons. 1-day chunks keep a chunk of a 1000-meter fleet polled every minute near
    -- 300 MB; compression waits until the month a statement covers and its late data are settled;
    -- raw readings are kept 10 years, the record-keeping period of EU ETS monitoring (MRR art. 67).
    chunk     interval := interval '1 day';
    compress  interval := interval '45 days';
    retain    interval := interval '10 years';
BEGIN
    IF wanted NOT IN ('auto', 'timescaledb', 'native') THEN
        RAISE EXCEPTION 'scopemeter.storage must be auto, timescaledb or native, not %', wanted;
    END IF;
    IF wanted = 'timescaledb' AND NOT available THEN
        RAISE EXCEPTION 'scopemeter.storage = timescaledb, but this server has no timescaledb extension'
            USING HINT = 'install TimescaleDB, or migrate with --storage native';
    END IF;

    IF wanted = 'native' OR NOT available THEN
        EXECUTE 'CREATE TABLE readings (' || columns || ') PARTITION BY RANGE (ts)';
        INSERT INTO scopemeter_storage (backend, chunk_interval, compress_after, retain_for)
        VALUES ('native', interval '1 month', NULL, retain);
    ELSE
        CREATE EXTENSION IF NOT EXISTS timescaledb;
        EXECUTE 'CREATE TABLE readings (' || columns || ')';
        -- No default ts index: every query goes by the primary key (meter, quantity, time range).
        PERFORM create_hypertable('readings', by_range('ts', chunk), create_default_indexes => false);
        ALTER TABLE readings SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'meter_id, quantity',
            timescaledb.compress_orderby = 'ts'
        );
        PERFORM add_compression_policy('readings', compress_after => compress);
        PERFORM add_retention_policy('readings', drop_after => retain);
        INSERT INTO scopemeter_storage (backend, chunk_interval, compress_after, retain_for)
        VALUES ('timescaledb', chunk, compress, retain);
    END IF;
END $$;

-- Create the monthly partitions covering [t_min, t_max]; returns how many it created.
-- A no-op returning 0 on TimescaleDB, which creates chunks on insert.
-- Each partition is created detached and then attached: ATTACH PARTITION takes only a SHARE UPDATE
-- EXCLUSIVE lock on readings, so writers and long readers (compute, statements) are not blocked, and
-- a caller that already read readings in its transaction cannot deadlock with a concurrent creator.
CREATE FUNCTION scopemeter_ensure_partitions(t_min timestamptz, t_max timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m       date;
    part    text;
    created integer := 0;
BEGIN
    IF (SELECT backend FROM scopemeter_storage) = 'timescaledb' THEN
        RETURN 0;
    END IF;
    IF t_min IS NULL OR t_max IS NULL OR t_min > t_max THEN
        RAISE EXCEPTION 'scopemeter_ensure_partitions: need t_min <= t_max, got [%, %]', t_min, t_max;
    END IF;
    FOR m IN
        SELECT generate_series(date_trunc('month', t_min AT TIME ZONE 'UTC'),
                               date_trunc('month', t_max AT TIME ZONE 'UTC'), interval '1 month')::date
    LOOP
        part := format('readings_y%sm%s', to_char(m, 'YYYY'), to_char(m, 'MM'));
        CONTINUE WHEN scopemeter_partition_exists(part);
        -- Serialise creators; look again under the lock (a new statement, so a fresh snapshot).
        PERFORM pg_advisory_xact_lock(hashtext('scopemeter_readings_partitions'));
        CONTINUE WHEN scopemeter_partition_exists(part);
        EXECUTE format('CREATE TABLE %I (LIKE readings INCLUDING DEFAULTS)', part);
        EXECUTE format('ALTER TABLE readings ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)', part,
                       m::timestamp AT TIME ZONE 'UTC',
                       (m + interval '1 month')::timestamp AT TIME ZONE 'UTC');
        created := created + 1;
    END LOOP;
    RETURN created;
END $$;

CREATE FUNCTION scopemeter_partition_exists(part text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_class c
        WHERE c.relname = part
          AND c.relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'readings'::regclass))
$$;

-- Drop the readings older than retain_for before ``as_of``; returns the partitions or chunks dropped.
-- Native path: whole months whose end is at or before the horizon. TimescaleDB path: the retention
-- policy does this on its own schedule; this runs the same drop_chunks now.
CREATE FUNCTION scopemeter_apply_retention(as_of timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    s       scopemeter_storage;
    horizon timestamptz;
    part    text;
    dropped integer := 0;
BEGIN
    SELECT * INTO s FROM scopemeter_storage;
    IF s.retain_for IS NULL THEN
        RETURN 0;
    END IF;
    horizon := as_of - s.retain_for;
    IF s.backend = 'timescaledb' THEN
        SELECT count(*) INTO dropped FROM drop_chunks('readings', older_than => horizon);
        RETURN dropped;
    END IF;
    FOR part IN
        SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'readings'::regclass AND c.relname ~ '^readings_y\d{4}m\d{2}$'
          AND (make_date(substr(c.relname, 11, 4)::int, substr(c.relname, 16, 2)::int, 1)
               + interval '1 month')::timestamp AT TIME ZONE 'UTC' <= horizon
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', part);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;

-- Change the horizons (NULL: never compress / keep forever). On TimescaleDB the policies are
-- replaced; on the native path compression does not exist and retention is scopemeter_apply_retention().
CREATE FUNCTION scopemeter_set_storage_policy(compress_after interval, retain_for interval) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    backend text := (SELECT s.backend FROM scopemeter_storage s);
BEGIN
    IF backend = 'native' AND compress_after IS NOT NULL THEN
        RAISE EXCEPTION 'compression needs TimescaleDB; this database stores readings in native partitions'
            USING HINT = 'pass NULL as compress_after';
    END IF;
    IF backend = 'timescaledb' THEN
        PERFORM remove_compression_policy('readings', if_exists => true);
        PERFORM remove_retention_policy('readings', if_exists => true);
        IF compress_after IS NOT NULL THEN
            PERFORM add_compression_policy('readings', compress_after => compress_after);
        END IF;
        IF retain_for IS NOT NULL THEN
            PERFORM add_retention_policy('readings', drop_after => retain_for);
        END IF;
    END IF;
    UPDATE scopemeter_storage s SET compress_after = $1, retain_for = $2;
END $$;

-- outbox_emit: table-less mode (outbox-relay run --source messages). Writes one event as a
-- transactional logical decoding message, published if and only if the calling transaction
-- commits, and returns its id. No row is written. The schema below is replaced by a quoted
-- identifier.
CREATE OR REPLACE FUNCTION {{schema}}.outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT NULL,
    id             uuid  DEFAULT gen_random_uuid(),
    prefix         text  DEFAULT 'outbox'
) RETURNS uuid
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    IF aggregate_type IS NULL OR aggregate_type = '' OR aggregate_id IS NULL OR aggregate_id = ''
       OR event_type IS NULL OR event_type = '' OR payload IS NULL OR id IS NULL THEN
        RAISE EXCEPTION 'outbox_emit: aggregate_type, aggregate_id, event_type, payload and id must not be NULL or empty';
    END IF;
    IF headers IS NOT NULL AND jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'outbox_emit: headers must be a JSON object of strings, got %', jsonb_typeof(headers);
    END IF;
    PERFORM pg_logical_emit_message(true, prefix, jsonb_build_object(
        'id', id, 'aggregate_type', aggregate_type, 'aggregate_id', aggregate_id,
        'event_type', event_type, 'payload', payload, 'headers', headers, 'created_at', now())::text);
    RETURN id;
END
$fn$;

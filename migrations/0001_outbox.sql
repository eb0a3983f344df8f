-- The outbox table. Its name below is replaced by a quoted identifier (no placeholder may
-- appear in a comment: see TestTemplates_PlaceholdersOutsideComments).
CREATE TABLE IF NOT EXISTS {{table}} (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);

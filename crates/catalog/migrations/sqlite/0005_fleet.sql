-- Columns a PostgreSQL catalog uses for fleets (the tick a run was
-- scheduled for, the node holding it); always NULL in a SQLite catalog, so
-- the queries both catalogs share read the same columns.
ALTER TABLE runs ADD COLUMN scheduled_for TEXT;
ALTER TABLE runs ADD COLUMN node TEXT;

-- A run whose attempt passed its fence (right before it publishes) is
-- never run again: if its node dies before it says how the run ended, the
-- run ends interrupted instead of going back to pending (a second run
-- would publish a second backup of the same tick).
ALTER TABLE runs ADD COLUMN publishing BOOLEAN NOT NULL DEFAULT false;


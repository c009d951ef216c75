-- Inbox bodies become bytes with a codec (intake stores them LZ4-compressed, see
-- src/store/body.rs); rows already stored keep their JSON text under codec 'json'. EXTERNAL
-- storage: the bytes are compressed already, so TOAST should not try again.
ALTER TABLE inbox ALTER COLUMN body TYPE BYTEA USING convert_to(body, 'UTF8');
ALTER TABLE inbox ALTER COLUMN body SET STORAGE EXTERNAL;
ALTER TABLE inbox ADD COLUMN body_codec TEXT NOT NULL DEFAULT 'json';

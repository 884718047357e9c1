-- folders.uid_validity was the creation time in seconds. An account removed and added again (or
-- any folder created again under the same name) within one second got its predecessor's value, so
-- POP3 handed out the same UIDLs (uid_validity.uid) for different messages, and clients that leave
-- mail on the server skipped the new mail (RFC 1939 section 7: a unique-id is never reused).
-- New folders now take it from a sequence: never repeated, ascending (RFC 3501's rule for a
-- mailbox created again), and within IMAP's 32 bits. Existing folders keep theirs (and their
-- UIDLs, which clients have recorded).
CREATE SEQUENCE folder_uid_validity AS bigint MINVALUE 1 MAXVALUE 4294967295 NO CYCLE OWNED BY folders.uid_validity;
-- Above every value handed out so far: those were times in seconds, none later than now.
SELECT setval('folder_uid_validity', greatest((SELECT max(uid_validity) FROM folders), extract(epoch FROM now())::bigint, 1));

-- Not a column default: the MDA files with INSERT ... ON CONFLICT DO UPDATE, which evaluates the
-- defaults for every delivery, so a nextval() default would use up the range one delivery at a
-- time. An AFTER INSERT row trigger fires only for rows really inserted (a new folder). 0 means
-- "assign one"; until the trigger runs at the end of the inserting statement, that statement's
-- RETURNING sees 0.
ALTER TABLE folders ALTER COLUMN uid_validity SET DEFAULT 0;
CREATE FUNCTION assign_folder_uid_validity() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  UPDATE folders SET uid_validity = nextval('folder_uid_validity')
   WHERE account_id = NEW.account_id AND name = NEW.name;
  RETURN NULL;
END
$$;
CREATE TRIGGER folders_uid_validity AFTER INSERT ON folders
  FOR EACH ROW WHEN (NEW.uid_validity = 0) EXECUTE FUNCTION assign_folder_uid_validity();

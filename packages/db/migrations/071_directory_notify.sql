-- Recipient lookups are served from memory (DirectoryCache); every change that can alter a
-- route commits a notification on 'directory_changed' so each process empties its cache.
-- accounts: only the columns routing reads, so the MDA's quota updates and password changes stay quiet.
CREATE FUNCTION notify_directory_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('directory_changed', TG_TABLE_NAME);
  RETURN NULL;
END
$$;
CREATE TRIGGER domains_directory_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON domains
  FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed();
CREATE TRIGGER aliases_directory_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON aliases
  FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed();
CREATE TRIGGER accounts_directory_changed AFTER INSERT OR DELETE OR TRUNCATE ON accounts
  FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed();
CREATE TRIGGER accounts_route_changed AFTER UPDATE OF id, address, domain_id, disabled ON accounts
  FOR EACH STATEMENT EXECUTE FUNCTION notify_directory_changed();

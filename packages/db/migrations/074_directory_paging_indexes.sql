-- The admin API and mailctl page through domains, accounts and aliases by key in byte order
-- (`ORDER BY key COLLATE "C"`, `key COLLATE "C" > $after`), so a page is exact whatever the
-- database's collation. The unique indexes use the database collation and cannot serve that
-- order; without these a page of 100 accounts read and sorted the whole table.
CREATE INDEX domains_name_c ON domains (name COLLATE "C");
CREATE INDEX accounts_address_c ON accounts (address COLLATE "C");
CREATE INDEX accounts_domain_address_c ON accounts (domain_id, address COLLATE "C");
CREATE INDEX aliases_address_c ON aliases (address COLLATE "C");
CREATE INDEX aliases_domain_address_c ON aliases (domain_id, address COLLATE "C");
